//! What operators see: the Prometheus endpoint (`--metrics-address`, path `/metrics`) and the
//! per-layer statistics behind `lazypull stats`.
//!
//! Event metrics (registry traffic, FUSE operations, network waits, fallbacks) are recorded
//! where they happen, in the process's default registry. State metrics (cache, layers, fill
//! progress) are read from the daemon's state at scrape time, so they can never drift from it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::LazyLock;

use anyhow::{Context, Result};
use lazypull_fetcher::metrics::Reason;
use lazypull_fetcher::Digest;
use lazypull_fs::toc::NodeId;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{register_int_counter_vec, Encoder, IntCounterVec, TextEncoder};

use super::layers::LayerEntry;
use super::{Shared, State};
use crate::api::{ByReason, ImageStats, LayerStats, OpenedPath, SlowReadInfo};

/// `lazypull_fallbacks_total{cause}`: layers (or whole pulls) that could not be served lazily.
pub static FALLBACKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "lazypull_fallbacks_total",
        "Layers or pulls that could not be served lazily, by cause \
         (no_toc: fetched whole; auth, registry_error: the pull failed; snapshotter, \
         layer_store: left to containerd / podman to download).",
        &["cause"]
    )
    .expect("metric registers once")
});

/// `lazypull_profiles_total{outcome}`: pulls that prefetched what the image's last
/// start read (`prefetched`), and starts recorded for the next pull (`learned`).
pub static PROFILES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "lazypull_profiles_total",
        "Learned prefetch profiles, by outcome (prefetched: a pull prefetched what the \
         image's last start read; learned: a start was recorded for the next pull).",
        &["outcome"]
    )
    .expect("metric registers once")
});

/// Most layers given their own `layer` label in fill-progress series (bounded cardinality).
const MAX_LAYER_SERIES: usize = 256;

/// Counts a layer that could not be opened lazily, by the cause in its error chain.
pub fn count_open_failure(err: &anyhow::Error) {
    let auth = err.chain().any(|e| {
        matches!(
            e.downcast_ref::<lazypull_fetcher::Error>(),
            Some(lazypull_fetcher::Error::Unauthorized { .. })
        ) || matches!(
            e.downcast_ref::<lazypull_fs::open::OpenError>(),
            Some(lazypull_fs::open::OpenError::Fetch {
                source: lazypull_fetcher::Error::Unauthorized { .. },
                ..
            })
        )
    });
    let cause = if auth { "auth" } else { "registry_error" };
    FALLBACKS.with_label_values(&[cause]).inc();
}

fn by_reason(values: [u64; 4]) -> ByReason {
    ByReason {
        on_demand: values[Reason::OnDemand as usize],
        prefetch: values[Reason::Prefetch as usize],
        background: values[Reason::Background as usize],
        toc: values[Reason::Toc as usize],
    }
}

/// Path of `node` in the layer, as `/a/b`, for people reading stats.
fn path_of(layer: &lazypull_fs::toc::Layer, node: NodeId) -> String {
    layer
        .path(node)
        .map(|p| format!("/{p}"))
        .unwrap_or_else(|| format!("<inode {node}>"))
}

/// One layer's statistics.
pub fn layer_stats(st: &State, digest: &Digest, l: &LayerEntry, accessed: bool) -> LayerStats {
    let blob = st.engine.blob(&l.reference, *digest, Some(l.size)).stats();
    let chunks = l.source.layer().all_chunks();
    let cached = if l.local {
        chunks.len()
    } else {
        chunks
            .iter()
            .filter(|c| c.digest.is_some_and(|d| st.cache.contains(&d)))
            .count()
    };
    let secs = l.mounted_at.elapsed().as_secs_f64().max(0.001);
    let fs = l.fs_stats();
    LayerStats {
        digest: digest.to_string(),
        size: l.size,
        served: if l.local { "local" } else { "lazy" }.to_string(),
        chunks: chunks.len() as u64,
        chunks_cached: cached as u64,
        percent_cached: if chunks.is_empty() {
            100.0
        } else {
            cached as f64 * 100.0 / chunks.len() as f64
        },
        fetched_bytes: by_reason(blob.bytes),
        requests: by_reason(blob.requests),
        fill_rate: blob.bytes_for(Reason::Background) as f64 / secs,
        digest_mismatches: l
            .source
            .stats()
            .digest_mismatches
            .load(std::sync::atomic::Ordering::Relaxed),
        slowest_reads: fs
            .slowest_reads
            .iter()
            .map(|r| SlowReadInfo {
                path: path_of(l.source.layer(), r.node),
                offset: r.offset,
                len: r.len,
                seconds: r.seconds,
            })
            .collect(),
        opened_files: fs.opened_files,
        opened: if accessed {
            let layer = l.source.layer();
            l.opened()
                .into_iter()
                .filter_map(|o| {
                    Some(OpenedPath {
                        path: layer.path(o.node)?,
                        size: layer.node(o.node)?.size,
                        sequence: o.sequence,
                    })
                })
                .collect()
        } else {
            Vec::new()
        },
    }
}

/// Statistics of the images matching `target` (a reference, or a layer digest or prefix;
/// everything when `None`).
pub fn image_stats(st: &State, target: Option<&str>, accessed: bool) -> Vec<ImageStats> {
    let wanted_image = target.and_then(|t| st.find_image(t));
    let layer_filter = target
        .filter(|_| wanted_image.is_none())
        .map(|t| t.strip_prefix("sha256:").unwrap_or(t).to_string());
    st.images
        .values()
        .filter(|e| {
            wanted_image
                .as_ref()
                .is_none_or(|k| *k == e.record.reference)
        })
        .filter_map(|e| {
            let layers: Vec<LayerStats> = e
                .record
                .layers
                .iter()
                .filter_map(|l| {
                    let d: Digest = l.digest.parse().ok()?;
                    if let Some(f) = &layer_filter {
                        if !d.hex().starts_with(f.as_str()) {
                            return None;
                        }
                    }
                    st.layers
                        .get(&d)
                        .map(|entry| layer_stats(st, &d, entry, accessed))
                })
                .collect();
            (!layers.is_empty() || (target.is_none() && layer_filter.is_none())).then(|| {
                ImageStats {
                    reference: e.record.reference.clone(),
                    digest: e.record.digest.clone(),
                    layers,
                }
            })
        })
        .collect()
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

fn family(
    name: &str,
    help: &str,
    kind: MetricType,
    samples: Vec<(Vec<LabelPair>, f64)>,
) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    for (labels, v) in samples {
        let mut m = Metric::default();
        m.set_label(labels);
        match kind {
            MetricType::COUNTER => {
                let mut c = Counter::default();
                c.set_value(v);
                m.set_counter(c);
            }
            _ => {
                let mut g = Gauge::default();
                g.set_value(v);
                m.set_gauge(g);
            }
        }
        f.mut_metric().push(m);
    }
    f
}

/// The state metrics, read now.
fn state_families(st: &State) -> Vec<MetricFamily> {
    use MetricType::{COUNTER, GAUGE};
    let c = st.cache.stats();
    let one =
        |name: &str, help: &str, kind, v: u64| family(name, help, kind, vec![(vec![], v as f64)]);
    let mut out = vec![
        one(
            "lazypull_cache_used_bytes",
            "Bytes of chunks in the local cache.",
            GAUGE,
            c.used_bytes,
        ),
        one(
            "lazypull_cache_budget_bytes",
            "The cache's byte budget (--cache-mib).",
            GAUGE,
            c.budget_bytes,
        ),
        one(
            "lazypull_cache_entries",
            "Chunks in the local cache.",
            GAUGE,
            c.entries,
        ),
        one(
            "lazypull_cache_hits_total",
            "Chunk reads served by the cache.",
            COUNTER,
            c.hits,
        ),
        one(
            "lazypull_cache_misses_total",
            "Chunk reads the cache could not serve.",
            COUNTER,
            c.misses,
        ),
        one(
            "lazypull_cache_evictions_total",
            "Chunks evicted to stay within the budget.",
            COUNTER,
            c.evictions,
        ),
        one(
            "lazypull_cache_verification_failures_total",
            "Cached chunks found corrupt on read (deleted and refetched).",
            COUNTER,
            c.corruptions,
        ),
        one(
            "lazypull_images",
            "Pulled images.",
            GAUGE,
            st.images.len() as u64,
        ),
    ];
    let mut complete = 0u64;
    let mut filling = 0u64;
    let mut mismatches = 0u64;
    let mut progress = Vec::new();
    let mut on_demand_by_layer = Vec::new();
    for (d, l) in &st.layers {
        let s = layer_stats(st, d, l, false);
        mismatches += s.digest_mismatches;
        if s.chunks_cached >= s.chunks {
            complete += 1;
        } else if s.fetched_bytes.background > 0 {
            filling += 1;
        }
        if progress.len() < MAX_LAYER_SERIES {
            progress.push((vec![label("layer", &s.digest)], s.percent_cached / 100.0));
            on_demand_by_layer.push((
                vec![label("layer", &s.digest)],
                s.fetched_bytes.on_demand as f64,
            ));
        }
    }
    out.push(one(
        "lazypull_layers_mounted",
        "Layers mounted.",
        GAUGE,
        st.layers.len() as u64,
    ));
    out.push(one(
        "lazypull_layers_complete",
        "Mounted layers whose every chunk is local.",
        GAUGE,
        complete,
    ));
    out.push(one(
        "lazypull_layers_filling",
        "Mounted layers being fetched in the background.",
        GAUGE,
        filling,
    ));
    out.push(family(
        "lazypull_layer_cached_ratio",
        "Share of a mounted layer's chunks that are local (1 = complete).",
        GAUGE,
        progress,
    ));
    out.push(family(
        "lazypull_layer_on_demand_bytes",
        "Registry bytes a mounted layer fetched on demand.",
        GAUGE,
        on_demand_by_layer,
    ));
    out.push(one(
        "lazypull_chunk_digest_mismatches_total",
        "Fetched chunks whose digest did not match, in mounted layers.",
        COUNTER,
        mismatches,
    ));
    let mut statuses: HashMap<&str, u64> = HashMap::new();
    for c in st.containers.values() {
        *statuses.entry(c.status.as_str()).or_default() += 1;
    }
    out.push(family(
        "lazypull_containers",
        "Containers by last reported status.",
        GAUGE,
        statuses
            .into_iter()
            .map(|(s, n)| (vec![label("status", s)], n as f64))
            .collect(),
    ));
    out
}

/// The whole exposition, in the Prometheus text format.
pub async fn render(state: &Shared) -> Result<String> {
    LazyLock::force(&FALLBACKS);
    LazyLock::force(&PROFILES);
    let mut families = prometheus::gather();
    {
        let st = state.lock().await;
        families.extend(tokio::task::block_in_place(|| state_families(&st)));
    }
    // The encoder refuses families without samples (a label set not seen yet).
    families.retain(|f| !f.get_metric().is_empty());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut out)
        .context("encoding metrics")?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Serves `GET /metrics` on `addr` until the daemon stops.
pub async fn serve(addr: SocketAddr, state: Shared) -> Result<()> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    tracing::info!(address = %addr, "metrics at http://{addr}/metrics");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move {
                            let resp = if req.uri().path() != "/metrics" {
                                Response::builder()
                                    .status(StatusCode::NOT_FOUND)
                                    .body(Full::new(Bytes::from("try /metrics\n")))
                            } else {
                                match render(&state).await {
                                    Ok(text) => Response::builder()
                                        .header("content-type", "text/plain; version=0.0.4")
                                        .body(Full::new(Bytes::from(text))),
                                    Err(e) => Response::builder()
                                        .status(StatusCode::INTERNAL_SERVER_ERROR)
                                        .body(Full::new(Bytes::from(format!(
                                            "{}\n",
                                            crate::report::chain(&e)
                                        )))),
                                }
                            };
                            resp
                        }
                    },
                );
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    Ok(())
}
