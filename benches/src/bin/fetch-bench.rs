//! Fetcher benchmark: blob reader throughput against curl on the same blob in the same run,
//! and chunk cache hit latency.
//!
//! `cargo run --release -p lazypull-benches --bin fetch-bench [-- --runs N]`
//!
//! Starts a real docker-registry on loopback, pushes a 256 MiB random blob, then alternates
//! `curl` of the whole blob with the blob reader fetching it in 4 MiB ranges, 8 in flight,
//! and prints medians and the ratio. Absolute numbers drift on a shared machine; the ratio
//! measured in one run is what to compare.

use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lazypull_benches::{arg, median, mib_per_sec, percentile, process_cpu};
use lazypull_fetcher::credentials::CredentialStore;
use lazypull_fetcher::hosts::HostsConfig;
use lazypull_fetcher::{
    CacheConfig, ChunkCache, Digest, EngineConfig, FetchEngine, Priority, Reference, Registry,
    RegistryConfig,
};
use lazypull_tests::{random_bytes, TestRegistry};

const BLOB: usize = 256 << 20;
const DEFAULT_RANGE: u64 = 4 << 20;
const DEFAULT_IN_FLIGHT: usize = 8;

fn main() {
    let runs = arg("--runs").unwrap_or(5) as usize;
    let range = arg("--range-mib").map(|m| m << 20).unwrap_or(DEFAULT_RANGE);
    let in_flight = arg("--in-flight").unwrap_or(DEFAULT_IN_FLIGHT as u64) as usize;
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(bench(runs, range, in_flight));
}

async fn bench(runs: usize, range: u64, in_flight: usize) {
    let registry = TestRegistry::plain();
    let data = random_bytes(BLOB, 1);
    let digest = registry.pusher().push_blob("bench/blob", &data).await;
    let url = format!("{}/v2/bench/blob/blobs/{digest}", registry.url());
    let hosts = tempfile::tempdir().expect("tempdir");
    let reference: Reference = format!("{}/bench/blob:latest", registry.host())
        .parse()
        .expect("reference");

    let mut curl_times = Vec::new();
    let mut curl_range_times = Vec::new();
    let mut reader_times = Vec::new();
    let mut reader_cpu = Duration::ZERO;
    for _ in 0..runs {
        curl_times.push(curl(&url));
        curl_range_times.push(curl_ranges(&url, range));
        // A fresh client per run, so connection set-up is paid as curl pays it.
        let reg = Registry::new(RegistryConfig {
            hosts: HostsConfig::new(vec![hosts.path().to_path_buf()]),
            credentials: CredentialStore::empty(),
            ..RegistryConfig::default()
        });
        let engine = FetchEngine::new(reg, EngineConfig::default());
        let cpu = process_cpu();
        reader_times.push(read_all(&engine, &reference, digest, range, in_flight).await);
        reader_cpu += process_cpu() - cpu;
    }
    let c = median(&mut curl_times);
    let cr = median(&mut curl_range_times);
    let r = median(&mut reader_times);
    println!(
        "blob reader throughput, {} MiB blob on loopback, {runs} runs (median):",
        BLOB >> 20
    );
    println!(
        "  curl (one GET)                      {:8.1} MiB/s  ({:?})",
        mib_per_sec(BLOB as u64, c),
        c
    );
    println!(
        "  blob reader ({} MiB ranges, {in_flight} in flight) {:8.1} MiB/s  ({:?})",
        range >> 20,
        mib_per_sec(BLOB as u64, r),
        r
    );
    println!(
        "  curl ({} MiB ranges, sequential)    {:8.1} MiB/s  ({:?})",
        range >> 20,
        mib_per_sec(BLOB as u64, cr),
        cr
    );
    println!(
        "  ratio reader/curl: {:.2}  (target >= 0.90); reader/curl-ranges: {:.2}",
        c.as_secs_f64() / r.as_secs_f64(),
        cr.as_secs_f64() / r.as_secs_f64()
    );
    println!(
        "  reader CPU: {:.0} ms per GiB (client side only)",
        reader_cpu.as_secs_f64() * 1000.0 / (runs as f64 * BLOB as f64 / (1u64 << 30) as f64)
    );

    cache_latency();
}

fn curl(url: &str) -> Duration {
    let start = Instant::now();
    let status = Command::new("curl")
        .args(["-sf", "-o", "/dev/null", url])
        .status()
        .expect("curl not found: apt-get install curl");
    assert!(status.success(), "curl failed");
    start.elapsed()
}

/// The same bytes in the reader's request pattern: one curl process, one connection,
/// `range`-sized Range requests one after another.
fn curl_ranges(url: &str, range: u64) -> Duration {
    let mut args: Vec<String> = vec!["-sf".into()];
    let mut off = 0u64;
    while off < BLOB as u64 {
        if off > 0 {
            args.push("--next".into());
        }
        args.extend([
            "-r".into(),
            format!("{}-{}", off, off + range - 1),
            "-o".into(),
            "/dev/null".into(),
            url.to_string(),
        ]);
        off += range;
    }
    let start = Instant::now();
    let status = Command::new("curl")
        .args(&args)
        .status()
        .expect("curl not found: apt-get install curl");
    assert!(status.success(), "curl failed");
    start.elapsed()
}

async fn read_all(
    engine: &FetchEngine,
    reference: &Reference,
    digest: Digest,
    range: u64,
    in_flight: usize,
) -> Duration {
    let blob = engine.blob(reference, digest, Some(BLOB as u64));
    let start = Instant::now();
    let total: u64 = futures::stream::iter((0..BLOB as u64).step_by(range as usize))
        .map(|off| {
            let blob = blob.clone();
            async move {
                blob.read_at(off, range, Priority::OnDemand)
                    .await
                    .expect("range read")
                    .len() as u64
            }
        })
        .buffer_unordered(in_flight)
        .fold(0, |a, n| async move { a + n })
        .await;
    assert_eq!(total, BLOB as u64);
    start.elapsed()
}

fn cache_latency() {
    const CHUNK: usize = 64 << 10;
    const N: usize = 2000;
    let dir = tempfile::tempdir().expect("tempdir");
    for (label, memory) in [("disk + verify", 0u64), ("memory hot set", 256 << 20)] {
        let cache = ChunkCache::open(
            dir.path().join(label.replace(' ', "_")),
            CacheConfig {
                memory_bytes: memory,
                ..CacheConfig::default()
            },
        )
        .expect("cache");
        let chunks: Vec<(Digest, Vec<u8>)> = (0..N)
            .map(|i| {
                let c = random_bytes(CHUNK, i as u64);
                (Digest::sha256_of(&c), c)
            })
            .collect();
        for (d, c) in &chunks {
            cache.put(d, c).expect("put");
        }
        let mut times: Vec<Duration> = chunks
            .iter()
            .map(|(d, _)| {
                let start = Instant::now();
                let got = cache.get(d).expect("get").expect("hit");
                let t = start.elapsed();
                assert_eq!(got.len(), CHUNK);
                t
            })
            .collect();
        times.sort();
        println!(
            "chunk cache hit, 64 KiB, {label:15}: p50 {:?}  p99 {:?}  ({N} reads)",
            percentile(&times, 50.0),
            percentile(&times, 99.0)
        );
    }
}
