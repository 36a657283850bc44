//! Metrics, logs and `lazypull stats` against what really happened: bytes counted by the proxy
//! in front of a real registry, a layer without a TOC, and a trace-level log of an
//! authenticated pull that must hold no secret.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::Duration;

use common::{build_tar, busybox_layer, estargz_layer, lazypull, runnable_config, E};
use lazypull_tests::{
    free_port, gzip, CountingProxy, ImageSpec, Layer, PushedImage, RegistryAuth, TestRegistry,
    TokenIssuer,
};

fn have_runc() -> bool {
    std::path::Path::new("/usr/sbin/runc").exists()
        || std::path::Path::new("/usr/bin/runc").exists()
}

async fn push_small(registry: &TestRegistry, repo: &str, estargz: bool) -> PushedImage {
    let data = build_tar(vec![
        E::Dir("srv", 0o755),
        E::File("srv/hello.txt", 0o644, b"hello from the image\n".to_vec()),
        E::File("srv/other.txt", 0o644, vec![b'x'; 300_000]),
        // Incompressible bulk behind them, so reading them is not served by the TOC read of
        // the blob's tail.
        E::File(
            "srv/bulk.bin",
            0o644,
            lazypull_tests::random_bytes(6 << 20, 9),
        ),
    ]);
    let tars = [data, busybox_layer(&["srv/hello.txt".to_string()])];
    let layers: Vec<Layer> = tars
        .iter()
        .map(|t| {
            if estargz {
                estargz_layer(t, None).0
            } else {
                Layer::new(gzip(t))
            }
        })
        .collect();
    let mut spec = ImageSpec::new(layers, "linux", "amd64");
    spec.config = runnable_config();
    registry.pusher().push_image_with(repo, "v1", &spec).await
}

/// `GET /metrics`, parsed with an independent parser of the text format.
fn scrape(port: u16) -> (String, prometheus_parse::Scrape) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    // Chunked transfer encoding: keep only the payload lines.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
    (body, scrape)
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn on_demand_bytes_match_the_registry_and_stats_match_metrics() {
    if !have_runc() {
        eprintln!("runc not installed; skipping");
        return;
    }
    let registry = TestRegistry::plain();
    let proxy = CountingProxy::start(&registry.host());
    let pushed = push_small(&registry, "obs/app", true).await;
    let sizes: HashMap<String, u64> = pushed
        .layer_digests
        .iter()
        .zip(&pushed.layer_sizes)
        .map(|(d, s)| (d.to_string(), *s))
        .collect();
    let port = free_port();
    let image = format!("{}/obs/app:v1", proxy.host());
    let addr = format!("127.0.0.1:{port}");
    tokio::task::block_in_place(|| {
        let lp = lazypull(&[
            "--metrics-address",
            &addr,
            "--background-fill",
            "false",
            "--prefetch",
            "false",
        ]);
        let out = lp.cmd(&[
            "run",
            "--rm",
            &image,
            "cat",
            "/srv/hello.txt",
            "/srv/other.txt",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout.len(), 21 + 300_000);

        // The access log: what the container opened, in order, as a prefetch list.
        let accessed = lp.ok(&["stats", "--accessed", &image]);
        let files: Vec<&str> = accessed.lines().collect();
        let srv: Vec<&str> = files
            .iter()
            .copied()
            .filter(|f| f.starts_with("srv/"))
            .collect();
        assert_eq!(srv, ["srv/hello.txt", "srv/other.txt"], "{accessed}");
        assert!(files.contains(&"bin/busybox"), "exec of cat: {accessed}");
        let unique: std::collections::HashSet<&&str> = files.iter().collect();
        assert_eq!(unique.len(), files.len(), "a file listed twice: {accessed}");

        // Ranged blob reads at the registry: those ending at the blob's end are TOC reads.
        let mut toc = 0u64;
        let mut content = 0u64;
        for r in proxy.requests() {
            let Some(range) = &r.range else { continue };
            let digest = r.path.rsplit('/').next().unwrap_or_default().to_string();
            let Some(size) = sizes.get(&digest) else {
                continue;
            };
            let end: u64 = range.rsplit('-').next().unwrap().parse().unwrap();
            if end + 1 == *size {
                toc += r.body_bytes;
            } else {
                content += r.body_bytes;
            }
        }
        assert!(content > 0 && toc > 0, "content {content}, toc {toc}");
        let (text, scrape) = scrape(port);
        let on_demand = value(
            &scrape,
            "lazypull_registry_fetched_bytes_total",
            &[("reason", "on_demand")],
        );
        let toc_metric = value(
            &scrape,
            "lazypull_registry_fetched_bytes_total",
            &[("reason", "toc")],
        );
        assert!(
            (on_demand - content as f64).abs() <= content as f64 * 0.01,
            "on_demand metric {on_demand} vs registry {content}\n{text}"
        );
        assert_eq!(toc_metric as u64, toc, "toc bytes");
        assert!(
            value(
                &scrape,
                "lazypull_fuse_operation_duration_seconds_count",
                &[("op", "read")]
            ) > 0.0
                || text.contains("lazypull_fuse_operation_duration_seconds_count{op=\"read\"}")
        );
        assert_eq!(value(&scrape, "lazypull_layers_mounted", &[]), 2.0);
        assert!(value(&scrape, "lazypull_cache_entries", &[]) > 0.0);

        // `stats --json` says the same as the metrics, layer by layer.
        let stats: serde_json::Value = serde_json::from_str(&lp.ok(&["stats", "--json"])).unwrap();
        let layers = stats[0]["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2);
        let mut sum = 0u64;
        for l in layers {
            let digest = l["digest"].as_str().unwrap();
            let od = l["fetched_bytes"]["on_demand"].as_u64().unwrap();
            sum += od;
            assert_eq!(
                value(
                    &scrape,
                    "lazypull_layer_on_demand_bytes",
                    &[("layer", digest)]
                ) as u64,
                od,
                "layer {digest}"
            );
        }
        assert_eq!(sum as f64, on_demand);
        let human = lp.ok(&["stats"]);
        assert!(
            human.contains("obs/app") && human.contains("ON-DEMAND"),
            "{human}"
        );
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_layer_without_toc_is_counted_and_logged_as_a_fallback() {
    let registry = TestRegistry::plain();
    push_small(&registry, "obs/plain", false).await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    tokio::task::block_in_place(|| {
        let lp = lazypull(&["--metrics-address", &addr]);
        lp.ok(&["pull", &format!("{}/obs/plain:v1", registry.host())]);
        let (text, scrape) = scrape(port);
        assert_eq!(
            value(&scrape, "lazypull_fallbacks_total", &[("cause", "no_toc")]),
            2.0,
            "{text}"
        );
        let log = lp.log();
        let warn = log
            .lines()
            .find(|l| l.contains("WARN") && l.contains("fetched whole"))
            .unwrap_or_else(|| panic!("no warning about the fallback:\n{log}"));
        assert!(
            warn.contains("no eStargz TOC") || warn.contains("TOC"),
            "{warn}"
        );
        let images = lp.ok(&["images"]);
        assert!(images.contains("100%"), "{images}");
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn trace_log_of_an_authenticated_pull_has_no_secrets() {
    let issuer = TokenIssuer::with_user("alice", "s3cret-p4ss");
    let registry = TestRegistry::start(RegistryAuth::Token(issuer));
    push_small(&registry, "obs/private", true).await;
    let home = tempfile::tempdir().unwrap();
    let auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(b"alice:s3cret-p4ss")
    };
    std::fs::write(
        home.path().join("config.json"),
        format!(
            "{{\"auths\":{{\"{}\":{{\"auth\":\"{auth}\"}}}}}}",
            registry.host()
        ),
    )
    .unwrap();
    tokio::task::block_in_place(|| {
        let lp = lazypull(&[]);
        let out = lp
            .command()
            .env("DOCKER_CONFIG", home.path())
            .env("RUST_LOG", "trace")
            .args(["pull", &format!("{}/obs/private:v1", registry.host())])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            lp.log()
        );
        // The daemon was started by that command, with its environment and log level.
        let out2 = lp
            .command()
            .env("DOCKER_CONFIG", home.path())
            .env("RUST_LOG", "trace")
            .args([
                "run",
                "--rm",
                &format!("{}/obs/private:v1", registry.host()),
                "cat",
                "/srv/hello.txt",
            ])
            .output()
            .unwrap();
        let log = format!(
            "{}{}{}",
            lp.log(),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out2.stderr)
        );
        assert!(
            log.lines().count() > 50,
            "expected a trace-level log:\n{log}"
        );
        assert!(
            log.contains("TRACE") || log.contains("DEBUG"),
            "not a trace log"
        );
        assert!(!log.contains("s3cret-p4ss"), "password in the log");
        assert!(!log.contains(&auth), "basic auth in the log");
        // Bearer tokens the registry issued are JWTs ("eyJ...").
        assert!(
            !log.contains("eyJ"),
            "a token in the log:\n{}",
            log.lines()
                .filter(|l| l.contains("eyJ"))
                .take(3)
                .collect::<Vec<_>>()
                .join("\n")
        );
    });
}
