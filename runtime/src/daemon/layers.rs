//! Layer mounts, shared by every image that has the layer and counted by reference: one FUSE
//! mount per layer at `<root>/layers/<hex>`, prefetched and filled in the background.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use lazypull_fetcher::{Digest, Reference};
use lazypull_fs::background;
use lazypull_fs::chunks::{LayerSource, SourceConfig};
use lazypull_fs::estargz::{Prefetch, ReaderConfig};
use lazypull_fs::fuse::{LayerMount, MountOptions};
use lazypull_fs::open::{open_layer, LayerDescriptor, Served};

use super::store::LayerRecord;
use super::{Events, Shared, State};

/// One mounted layer.
pub struct LayerEntry {
    mount: Option<LayerMount>,
    /// Its content.
    pub source: LayerSource,
    /// Its mount point.
    pub dir: PathBuf,
    /// Images holding it.
    refs: usize,
    fill: tokio::task::JoinHandle<()>,
    /// Served from a local copy (the layer had no TOC), so always complete.
    pub local: bool,
    /// The image reference it was first mounted for (its blob's repository).
    pub reference: Reference,
    /// Compressed size.
    pub size: u64,
    /// When it was mounted.
    pub mounted_at: std::time::Instant,
}

impl LayerEntry {
    /// The FUSE mount's counters.
    pub fn fs_stats(&self) -> lazypull_fs::fuse::FsStats {
        self.mount.as_ref().map(|m| m.stats()).unwrap_or_default()
    }

    /// The FUSE mount's access log: files opened, in the order first opened.
    pub fn opened(&self) -> Vec<lazypull_fs::fuse::OpenedFile> {
        self.mount.as_ref().map(|m| m.opened()).unwrap_or_default()
    }
}

pub(super) fn descriptor(l: &LayerRecord) -> Result<LayerDescriptor> {
    Ok(LayerDescriptor {
        digest: l.digest.parse()?,
        size: l.size,
        media_type: l.media_type.clone(),
        annotations: l.annotations.clone(),
    })
}

/// Takes a reference on each layer, mounting those not mounted yet; the TOCs of the new ones
/// are fetched in parallel. On failure every reference taken is given back. Returns a
/// one-phrase summary ("3 lazy, 1 fetched whole").
pub async fn acquire_all(
    state: &Shared,
    reference: &Reference,
    layers: &[LayerRecord],
    events: &Events,
) -> Result<String> {
    let descs: Vec<LayerDescriptor> = layers.iter().map(descriptor).collect::<Result<_>>()?;
    let (engine, cache, root, settings, keeper) = {
        let st = state.lock().await;
        (
            st.engine.clone(),
            st.cache.clone(),
            st.settings.root.clone(),
            st.settings.clone(),
            st.keeper.clone(),
        )
    };
    // Canonical, as the mount table (and so the keeper's keys) name mounts; the parent only:
    // resolving a mount point the keeper holds would wait for this process to serve it.
    let layers_dir = root
        .join("layers")
        .canonicalize()
        .unwrap_or_else(|_| root.join("layers"));
    let missing: Vec<&LayerDescriptor> = {
        let st = state.lock().await;
        let mut seen = std::collections::HashSet::new();
        descs
            .iter()
            .filter(|d| !st.layers.contains_key(&d.digest) && seen.insert(d.digest))
            .collect()
    };
    let source_config = SourceConfig {
        fill_rate: (settings.fill_rate > 0).then_some(settings.fill_rate << 20),
        ..SourceConfig::default()
    };
    let opened = futures::future::join_all(missing.iter().map(|d| {
        let (engine, cache, reference, source_config) = (
            engine.clone(),
            cache.clone(),
            reference.clone(),
            source_config.clone(),
        );
        let local_dir = root.join("local");
        let span = tracing::info_span!("mount", layer = %d.digest, image = %reference);
        let open = async move {
            open_layer(
                &engine,
                &cache,
                &reference,
                d,
                &ReaderConfig::default(),
                source_config,
                &local_dir,
            )
            .await
            .with_context(|| format!("opening a layer ({})", d.media_type))
        };
        tracing::Instrument::instrument(open, span)
    }))
    .await;
    let mut new_entries = Vec::new();
    // Layers this call mounted anew: the ones to drop again if the image fails.
    let mut fresh = std::collections::HashSet::new();
    let mut failure = None;
    for (desc, opened) in missing.iter().zip(opened) {
        let opened = match opened {
            Ok(o) => o,
            Err(e) => {
                super::metrics::count_open_failure(&e);
                tracing::warn!(layer = %desc.digest, image = %reference, error = %crate::report::chain(&e), "layer cannot be mounted");
                failure.get_or_insert(e);
                continue;
            }
        };
        let dir = layers_dir.join(desc.digest.hex());
        let opts = MountOptions {
            fsname: format!("lazypull:{}", desc.digest),
            journal: Some(journal_path(&root, &desc.digest)),
            ..MountOptions::default()
        };
        let inherited = state.lock().await.inherited.remove(&dir);
        let model = super::keeper::model_fingerprint(&opened);
        // A mount served from another model (its TOC refused since, say) cannot be taken over:
        // the kernel's node ids would name other files. Its users lose it; they would
        // otherwise read the wrong files.
        let inherited = inherited.and_then(|i| match &i.model {
            Some(m) if *m != model => {
                tracing::warn!(layer = %desc.digest, was = %m, now = %model,
                    "the previous daemon served this layer from another model; mounting anew (its users lose it)");
                let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
                if let Some(k) = &keeper {
                    k.forget(&dir);
                }
                None
            }
            _ => Some(i),
        });
        let taken = inherited.and_then(|inherited| {
            match LayerMount::take_over(
                opened.source.layer().clone(),
                Arc::new(opened.source.clone()),
                &dir,
                opts.clone(),
                inherited.device,
                inherited.offer,
            ) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(layer = %desc.digest, error = %e,
                        "cannot take over the previous daemon's mount; mounting anew (its users lose it)");
                    let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
                    if let Some(k) = &keeper {
                        k.forget(&dir);
                    }
                    None
                }
            }
        });
        let took_over = taken.is_some();
        let mounted = match taken {
            Some(m) => Ok(m),
            None => std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating {}", dir.display()))
                .and_then(|()| {
                    let _ = lazypull_fs::fuse::unmount_stale(&dir);
                    LayerMount::mount(
                        opened.source.layer().clone(),
                        Arc::new(opened.source.clone()),
                        &dir,
                        opts,
                    )
                    .with_context(|| format!("mounting layer {} at {}", desc.digest, dir.display()))
                }),
        };
        if let (Ok(m), Some(k)) = (&mounted, &keeper) {
            if let Some((device, offer)) = m.connection() {
                let record = layers.iter().find(|l| l.digest == desc.digest.to_string());
                let meta = super::keeper::Inherited::encode(offer, reference, record, &model);
                if let Err(e) = k.put(m.mountpoint(), &meta, device) {
                    tracing::warn!(layer = %desc.digest, error = %crate::report::chain(&e),
                        "the FUSE keeper does not hold this mount; a daemon restart would cut its users off");
                }
            }
        }
        match mounted {
            Ok(mount) => {
                let local = match &opened.served {
                    Served::Lazy => {
                        let _ = events.send(format!(
                            "{}: mounted lazily ({} entries)",
                            short(&desc.digest),
                            opened.source.layer().len()
                        ));
                        false
                    }
                    Served::Local { reason, .. } => {
                        super::metrics::FALLBACKS
                            .with_label_values(&["no_toc"])
                            .inc();
                        tracing::warn!(
                            layer = %desc.digest,
                            image = %reference,
                            reason = %reason,
                            "layer fetched whole, not lazily"
                        );
                        let _ = events
                            .send(format!("{}: fetched whole ({reason})", short(&desc.digest)));
                        true
                    }
                };
                // A local copy is read from disk: nothing to prefetch or fill.
                let fill = spawn_fill(
                    opened.source.clone(),
                    if settings.prefetch && !local {
                        opened.prefetch
                    } else {
                        Prefetch::None
                    },
                    settings.background_fill && !local,
                );
                if !took_over {
                    fresh.insert(desc.digest);
                }
                new_entries.push((
                    desc.digest,
                    LayerEntry {
                        mount: Some(mount),
                        source: opened.source,
                        dir,
                        refs: 0,
                        fill,
                        local,
                        reference: reference.clone(),
                        size: desc.size,
                        mounted_at: std::time::Instant::now(),
                    },
                ));
            }
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    let mut st = state.lock().await;
    for (d, e) in new_entries {
        st.layers.insert(d, e);
    }
    if let Some(e) = failure {
        // Layers this call mounted for this image alone go again. Taken-over mounts stay:
        // running containers use them, and dropping one would end the keeper's hold on it.
        let orphans: Vec<Digest> = st
            .layers
            .iter()
            .filter(|(d, l)| l.refs == 0 && fresh.contains(*d))
            .map(|(d, _)| *d)
            .collect();
        for d in orphans {
            drop_layer(&mut st, &d);
        }
        return Err(e);
    }
    for d in &descs {
        if let Some(l) = st.layers.get_mut(&d.digest) {
            l.refs += 1;
        }
    }
    let local = descs
        .iter()
        .filter(|d| st.layers.get(&d.digest).is_some_and(|l| l.local))
        .count();
    Ok(if local == 0 {
        format!("{} lazy", descs.len())
    } else {
        format!("{} lazy, {local} fetched whole", descs.len() - local)
    })
}

/// How long on-demand reads must have been quiet before a layer's background fill starts:
/// the start of a container is a burst of reads the fill should not enter (measured by
/// run-bench: 1.2x instead of 5x faster than a full pull when the fill starts at mount); a
/// workload that keeps reading past that burst gets the fill alongside it. Once started, each
/// fill batch still waits for reads and prefetches ([`lazypull_fs::background`]).
const FILL_QUIET: std::time::Duration = std::time::Duration::from_secs(2);

fn spawn_fill(
    source: LayerSource,
    prefetch: Prefetch,
    background_fill: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let digest = source.digest();
        if let Prefetch::Until { blob_offset } = prefetch {
            let _counted = background::Prefetching::start();
            if let Err(e) = source.prefetch(blob_offset).await {
                tracing::warn!(layer = %digest, error = %e, "prefetch incomplete");
            }
        }
        if !background_fill {
            return;
        }
        tokio::time::sleep(FILL_QUIET).await;
        background::wait_fill_start(FILL_QUIET).await;
        match source.fill().await {
            Ok(()) => tracing::info!(layer = %digest, "layer fully cached"),
            Err(e) => tracing::warn!(layer = %digest, error = %e, "background fill incomplete"),
        }
    })
}

/// Gives back one reference on each layer; unmounts those nobody holds.
pub fn release_all(st: &mut State, layers: &[LayerRecord]) {
    for l in layers {
        let Ok(d) = l.digest.parse::<Digest>() else {
            continue;
        };
        let gone = match st.layers.get_mut(&d) {
            Some(e) => {
                e.refs = e.refs.saturating_sub(1);
                e.refs == 0
            }
            None => false,
        };
        if gone {
            drop_layer(st, &d);
            // Nobody uses the layer any more: its local copy and saved TOC go too (chunks
            // stay in the cache, which evicts by its own budget).
            let local_dir = st.settings.root.join("local");
            let _ = lazypull_fs::local::remove_local_copy(&local_dir, &d);
            let _ = std::fs::remove_file(lazypull_fs::open::saved_toc_path(&local_dir, &d));
            let _ = std::fs::remove_file(super::layer_store::blob_copy_path(&local_dir, &d));
        }
    }
}

/// The open-file journal of a layer's mount (for a successor daemon's takeover).
fn journal_path(root: &std::path::Path, digest: &Digest) -> PathBuf {
    root.join("journal").join(digest.hex())
}

/// Unmounts a layer regardless of references (shutdown, failed pulls).
pub fn drop_layer(st: &mut State, digest: &Digest) {
    if let Some(mut l) = st.layers.remove(digest) {
        l.fill.abort();
        if let Some(m) = l.mount.take() {
            let mountpoint = m.mountpoint().to_path_buf();
            if let Err(e) = m.unmount() {
                tracing::warn!(layer = %digest, error = %e, "unmounting layer");
            }
            if let Some(k) = &st.keeper {
                k.forget(&mountpoint);
            }
        }
        let _ = std::fs::remove_file(journal_path(&st.settings.root, digest));
        let _ = std::fs::remove_dir(&l.dir);
        tracing::debug!(layer = %digest, "layer unmounted");
    }
}

/// `sha256:0123456789ab`.
pub fn short(d: &Digest) -> String {
    let s = d.to_string();
    s.chars().take(19).collect()
}
