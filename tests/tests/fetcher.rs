//! Integration tests of lazypull-fetcher against a real `docker-registry`.
//!
//! Requests are counted by a `CountingProxy` in front of the registry; faults are real (the
//! registry process is killed, paused, restarted; its stored blob is altered on disk).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lazypull_fetcher::credentials::{CredentialStore, Credentials};
use lazypull_fetcher::hosts::HostsConfig;
use lazypull_fetcher::retry::RetryPolicy;
use lazypull_fetcher::{
    CacheConfig, ChunkCache, Digest, EngineConfig, Error, FetchEngine, Platform, Priority,
    Reference, Registry, RegistryConfig,
};
use lazypull_tests::{
    random_bytes, CountingProxy, ImageSpec, Layer, RegistryAuth, TestRegistry, TokenIssuer,
};
use rand::{Rng, SeedableRng};

/// A client isolated from the host's configuration: an empty hosts dir, only the given
/// credentials, short retry bounds so fault tests finish quickly.
fn client(hosts_dir: &Path, creds: Option<(&str, Credentials)>) -> Registry {
    let mut store = CredentialStore::empty();
    if let Some((host, c)) = creds {
        store = store.with_static(host, c);
    }
    Registry::new(RegistryConfig {
        hosts: HostsConfig::new(vec![hosts_dir.to_path_buf()]),
        credentials: store,
        connect_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            max_total: Duration::from_secs(3),
        },
        ..RegistryConfig::default()
    })
}

fn reference(host: &str, repo: &str) -> Reference {
    format!("{host}/{repo}:latest").parse().unwrap()
}

fn gets(proxy: &CountingProxy, digest: &Digest) -> usize {
    let needle = format!("/blobs/{digest}");
    proxy.count(|r| r.method == "GET" && r.path.contains(&needle))
}

#[tokio::test(flavor = "multi_thread")]
async fn index_resolves_per_platform() {
    let registry = TestRegistry::plain();
    let pusher = registry.pusher();
    let amd = pusher
        .push_image(
            "multi/app",
            "amd64",
            &[b"amd64 layer".to_vec()],
            "linux",
            "amd64",
        )
        .await;
    let arm = pusher
        .push_image_with(
            "multi/app",
            "arm64",
            &ImageSpec::new(vec![Layer::new(b"arm64 layer".to_vec())], "linux", "arm64"),
        )
        .await;
    let index = pusher
        .push_index(
            "multi/app",
            "latest",
            &[
                (
                    amd.manifest_digest,
                    amd.manifest_size(),
                    "linux",
                    "amd64",
                    None,
                ),
                (
                    arm.manifest_digest,
                    arm.manifest_size(),
                    "linux",
                    "arm64",
                    Some("v8"),
                ),
            ],
        )
        .await;
    let hosts = tempfile::tempdir().unwrap();
    let reg = client(hosts.path(), None);
    let r = reference(&registry.host(), "multi/app");

    let got = reg
        .resolve(&r, &"linux/amd64".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(got.manifest.digest, amd.manifest_digest);
    assert_eq!(got.index.as_ref().unwrap().digest, index);
    assert_eq!(got.reference.digest(), Some(&index));
    assert_eq!(&got.manifest.bytes[..], &amd.manifest_bytes[..]);
    let layer = got.image().unwrap().layers()[0].digest().to_string();
    assert_eq!(layer, amd.layer_digests[0].to_string());

    let got = reg
        .resolve(&r, &"linux/arm64/v8".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(got.manifest.digest, arm.manifest_digest);
    let config = reg.fetch_blob(&r, &arm.config_digest).await.unwrap();
    assert_eq!(&config[..], &arm.config_bytes[..]);

    let err = reg
        .resolve(&r, &"linux/s390x".parse().unwrap())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::NoPlatform { .. }), "{msg}");
    assert!(
        msg.contains("linux/amd64") && msg.contains("linux/arm64/v8"),
        "{msg}"
    );

    // A single-platform tag resolves to itself with no index.
    let direct = reg
        .resolve(
            &reference(&registry.host(), "multi/app").with_tag_for_test("amd64"),
            &Platform::host(),
        )
        .await
        .unwrap();
    assert!(direct.index.is_none());
    assert_eq!(direct.manifest.digest, amd.manifest_digest);

    let missing = reg
        .fetch_manifest(&reference(&registry.host(), "multi/nothing"))
        .await
        .unwrap_err();
    assert!(matches!(missing, Error::NotFound { .. }), "{missing}");
}

trait WithTag {
    fn with_tag_for_test(&self, tag: &str) -> Reference;
}

impl WithTag for Reference {
    fn with_tag_for_test(&self, tag: &str) -> Reference {
        format!("{}/{}:{tag}", self.registry(), self.repository())
            .parse()
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn random_ranges_are_byte_exact() {
    let registry = TestRegistry::plain();
    let data = random_bytes(64 << 20, 7);
    let digest = registry.pusher().push_blob("big/blob", &data).await;
    let hosts = tempfile::tempdir().unwrap();
    let reg = client(hosts.path(), None);
    let r = reference(&registry.host(), "big/blob");
    assert_eq!(reg.blob_size(&r, &digest).await.unwrap(), data.len() as u64);

    let engine = FetchEngine::new(reg, EngineConfig::default());
    let blob = engine.blob(&r, digest, Some(data.len() as u64));
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let ranges: Vec<(u64, u64)> = (0..1000)
        .map(|_| {
            let off = rng.gen_range(0..data.len() as u64);
            let len = rng.gen_range(1..=(256 << 10)).min(data.len() as u64 - off);
            (off, len)
        })
        .collect();
    // 16 at a time, like a busy filesystem.
    for batch in ranges.chunks(16) {
        let reads = batch.iter().map(|&(off, len)| {
            let blob = blob.clone();
            async move { (off, len, blob.read_at(off, len, Priority::OnDemand).await) }
        });
        for (off, len, got) in futures::future::join_all(reads).await {
            let got = got.unwrap();
            assert_eq!(got.len() as u64, len);
            assert!(
                got[..] == data[off as usize..(off + len) as usize],
                "range {off}+{len} differs"
            );
        }
    }
    let err = blob
        .read_at(data.len() as u64 - 10, 11, Priority::OnDemand)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::OutOfRange { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn altered_blob_is_reported_and_nothing_kept() {
    let registry = TestRegistry::plain();
    let data = random_bytes(3 << 20, 9);
    let digest = registry.pusher().push_blob("alter/me", &data).await;
    let mut altered = data.clone();
    altered[12345] ^= 0x40;
    std::fs::write(registry.blob_data_path(&digest), &altered).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let reg = client(dir.path(), None);
    let r = reference(&registry.host(), "alter/me");
    let dest = dir.path().join("blob");
    let err = reg
        .download_blob(&r, &digest, None, &dest, &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&digest.to_string()) && msg.contains(&Digest::sha256_of(&altered).to_string()),
        "{msg}"
    );
    assert!(!dest.exists(), "a blob that failed verification was kept");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    let err = reg.fetch_blob(&r, &digest).await.unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");

    // A chunk cache refuses the bad bytes too: nothing is cached.
    let cache = ChunkCache::open(dir.path().join("cache"), CacheConfig::default()).unwrap();
    let bytes = reg
        .read_range(&r, &digest, 0, data.len() as u64)
        .await
        .unwrap();
    assert!(cache.put(&digest, &bytes).is_err());
    assert!(!cache.contains(&digest));
    assert_eq!(cache.stats().used_bytes, 0);

    // Restored content downloads and verifies.
    std::fs::write(registry.blob_data_path(&digest), &data).unwrap();
    let n = reg
        .download_blob(&r, &digest, None, &dest, &|_| {})
        .await
        .unwrap();
    assert_eq!(n, data.len() as u64);
    assert!(std::fs::read(&dest).unwrap() == data);
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_flow_against_token_registry() {
    let issuer = TokenIssuer::with_user("alice", "s3cret-pass");
    let registry = TestRegistry::start(RegistryAuth::Token(issuer.clone()));
    let pushed = registry
        .pusher()
        .push_image(
            "private/app",
            "latest",
            &[random_bytes(1 << 20, 3)],
            "linux",
            "amd64",
        )
        .await;
    issuer.reset();
    let hosts = tempfile::tempdir().unwrap();
    let host = registry.host();
    let r = reference(&host, "private/app");

    // Valid credentials: resolve, then many blob reads, all with one token.
    let good = client(
        hosts.path(),
        Some((&host, Credentials::new("alice", "s3cret-pass"))),
    );
    let resolved = good.resolve(&r, &Platform::host()).await.unwrap();
    assert_eq!(resolved.manifest.digest, pushed.manifest_digest);
    let layer = pushed.layer_digests[0];
    for i in 0..20u64 {
        let got = good.read_range(&r, &layer, i * 1000, 1000).await.unwrap();
        assert_eq!(got.len(), 1000);
    }
    let blob = good.fetch_blob(&r, &pushed.config_digest).await.unwrap();
    assert_eq!(&blob[..], &pushed.config_bytes[..]);
    assert_eq!(
        issuer.request_count(),
        1,
        "token not reused: {:?}",
        issuer.requests()
    );
    assert_eq!(good.stats().token_requests, 1);
    let req = &issuer.requests()[0];
    assert_eq!(req.user.as_deref(), Some("alice"));
    assert_eq!(req.scopes, vec!["repository:private/app:pull".to_string()]);

    // Wrong password: a clear unauthorized error that does not leak the password.
    let bad = client(
        hosts.path(),
        Some((&host, Credentials::new("alice", "wrong-horse"))),
    );
    let err = bad.resolve(&r, &Platform::host()).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Unauthorized { .. }), "{msg}");
    assert!(msg.starts_with("unauthorized"), "{msg}");
    assert!(msg.contains("rejected the credentials"), "{msg}");
    assert!(!msg.contains("wrong-horse"), "password leaked: {msg}");

    // No credentials at all: unauthorized with a hint to log in.
    let anon = client(hosts.path(), None);
    let err = anon.resolve(&r, &Platform::host()).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Unauthorized { .. }), "{msg}");
    assert!(msg.contains("login"), "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_token_is_refreshed() {
    let issuer = TokenIssuer::with_user("bob", "pw");
    let registry = TestRegistry::start(RegistryAuth::Token(issuer.clone()));
    let data = random_bytes(64 << 10, 4);
    let digest = registry.pusher().push_blob("refresh/blob", &data).await;
    issuer.reset();
    // Tokens the registry stops accepting ~3 s after issue (its leeway is 60 s past `exp`),
    // while the client, told they live 6 s, still holds them: the refresh must come from the
    // registry's 401.
    issuer.set_token_lifetime(Duration::from_secs(6));
    issuer.set_exp_shift(-63);
    let hosts = tempfile::tempdir().unwrap();
    let host = registry.host();
    let reg = client(hosts.path(), Some((&host, Credentials::new("bob", "pw"))));
    let r = reference(&host, "refresh/blob");
    assert!(reg.read_range(&r, &digest, 0, 100).await.unwrap()[..] == data[..100]);
    tokio::time::sleep(Duration::from_millis(4600)).await;
    assert!(reg.read_range(&r, &digest, 100, 100).await.unwrap()[..] == data[100..200]);
    assert_eq!(
        issuer.request_count(),
        2,
        "expected one refresh after the 401"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_registry() {
    let registry = TestRegistry::start(RegistryAuth::htpasswd("carol", "pa55"));
    let data = random_bytes(10_000, 5);
    let digest = registry.pusher().push_blob("basic/blob", &data).await;
    let hosts = tempfile::tempdir().unwrap();
    let host = registry.host();
    let r = reference(&host, "basic/blob");
    let reg = client(
        hosts.path(),
        Some((&host, Credentials::new("carol", "pa55"))),
    );
    assert!(reg.fetch_blob(&r, &digest).await.unwrap()[..] == data[..]);
    let anon = client(hosts.path(), None);
    let err = anon.fetch_blob(&r, &digest).await.unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn single_flight_and_merging() {
    let registry = TestRegistry::plain();
    let data = random_bytes(8 << 20, 11);
    let digest = registry.pusher().push_blob("sf/blob", &data).await;
    let proxy = CountingProxy::start(&registry.host());
    proxy.set_delay(Duration::from_millis(50));
    let hosts = tempfile::tempdir().unwrap();
    let r = reference(&proxy.host(), "sf/blob");
    let engine = FetchEngine::new(client(hosts.path(), None), EngineConfig::default());

    // 32 readers of the same 4 MiB range, from separate tasks: one GET.
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let blob = engine.blob(&r, digest, Some(data.len() as u64));
        tasks.push(tokio::spawn(async move {
            blob.read_at(1 << 20, 4 << 20, Priority::OnDemand).await
        }));
    }
    for t in tasks {
        let got = t.await.unwrap().unwrap();
        assert!(got[..] == data[1 << 20..5 << 20]);
    }
    assert_eq!(gets(&proxy, &digest), 1, "{:#?}", proxy.requests());

    // 100 adjacent 4 KiB reads issued together: at most two GETs.
    proxy.reset();
    let blob = engine.blob(&r, digest, Some(data.len() as u64));
    let reads = (0..100u64).map(|i| {
        let blob = blob.clone();
        async move { blob.read_at(i * 4096, 4096, Priority::OnDemand).await }
    });
    let results = futures::future::join_all(reads).await;
    for (i, got) in results.into_iter().enumerate() {
        let got = got.unwrap();
        assert!(got[..] == data[i * 4096..(i + 1) * 4096], "read {i}");
    }
    let n = gets(&proxy, &digest);
    assert!((1..=2).contains(&n), "{n} GETs for 100 adjacent reads");

    // Reads far apart are not merged (the gap would cost more than a round trip).
    proxy.reset();
    let reads = [0u64, 4 << 20].map(|off| {
        let blob = blob.clone();
        async move { blob.read_at(off, 4096, Priority::OnDemand).await }
    });
    for got in futures::future::join_all(reads).await {
        assert_eq!(got.unwrap().len(), 4096);
    }
    assert_eq!(gets(&proxy, &digest), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn on_demand_reads_overtake_background_fill() {
    let registry = TestRegistry::plain();
    let data = random_bytes(32 << 20, 12);
    let digest = registry.pusher().push_blob("prio/blob", &data).await;
    let proxy = CountingProxy::start(&registry.host());
    proxy.set_delay(Duration::from_millis(100));
    let hosts = tempfile::tempdir().unwrap();
    let r = reference(&proxy.host(), "prio/blob");
    let engine = FetchEngine::new(
        client(hosts.path(), None),
        EngineConfig {
            connections_per_host: 3,
            reserved_on_demand: 1,
            merge_gap: 0,
            ..EngineConfig::default()
        },
    );
    let blob = engine.blob(&r, digest, Some(data.len() as u64));
    // 16 separate background reads (1 MiB apart, so never merged): with 2 usable connections
    // and 100 ms each they take ~800 ms.
    let mut bg = Vec::new();
    for i in 0..16u64 {
        let blob = blob.clone();
        bg.push(tokio::spawn(async move {
            blob.read_at(i * (2 << 20), 4096, Priority::Background)
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let start = Instant::now();
    let got = blob
        .read_at(31 << 20, 4096, Priority::OnDemand)
        .await
        .unwrap();
    let waited = start.elapsed();
    assert!(got[..] == data[31 << 20..(31 << 20) + 4096]);
    assert!(
        waited < Duration::from_millis(400),
        "on-demand read waited {waited:?} behind background fill"
    );
    for t in bg {
        t.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_killed_mid_read_then_restarted() {
    let mut registry = TestRegistry::plain();
    let data = random_bytes(64 << 20, 13);
    let digest = registry.pusher().push_blob("fault/blob", &data).await;
    let proxy = CountingProxy::start(&registry.host());
    proxy.set_rate_limit(Some(8 << 20));
    let hosts = tempfile::tempdir().unwrap();
    let r = reference(&proxy.host(), "fault/blob");
    let reg = client(hosts.path(), None);
    let reader = {
        let (reg, r) = (reg.clone(), r.clone());
        tokio::spawn(async move { reg.read_range(&r, &digest, 0, 64 << 20).await })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    registry.kill();
    let killed = Instant::now();
    let err = reader.await.unwrap().unwrap_err();
    let elapsed = killed.elapsed();
    // Retry budget is 3 s plus one 2 s idle timeout.
    assert!(elapsed < Duration::from_secs(6), "error took {elapsed:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&proxy.host()),
        "error does not name the host: {msg}"
    );

    registry.restart();
    proxy.set_rate_limit(None);
    let got = reg.read_range(&r, &digest, 5 << 20, 1 << 20).await.unwrap();
    assert!(got[..] == data[5 << 20..6 << 20]);
}

#[tokio::test(flavor = "multi_thread")]
async fn paused_registry_times_out() {
    let mut registry = TestRegistry::plain();
    let data = random_bytes(1 << 20, 14);
    let digest = registry.pusher().push_blob("pause/blob", &data).await;
    let hosts = tempfile::tempdir().unwrap();
    let r = reference(&registry.host(), "pause/blob");
    let reg = client(hosts.path(), None);
    registry.pause();
    let start = Instant::now();
    let err = reg.read_range(&r, &digest, 0, 1000).await.unwrap_err();
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(8), "took {elapsed:?}");
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    registry.resume();
    assert!(reg.read_range(&r, &digest, 0, 1000).await.unwrap()[..] == data[..1000]);
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_registry_fails_fast_with_its_name() {
    let hosts = tempfile::tempdir().unwrap();
    let port = lazypull_tests::free_port();
    let host = format!("127.0.0.1:{port}");
    let reg = client(hosts.path(), None);
    let start = Instant::now();
    let err = reg
        .fetch_manifest(&reference(&host, "none/here"))
        .await
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&host) && msg.contains("cannot reach"), "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_errors_are_retried_and_range_ignoring_hosts_work() {
    let registry = TestRegistry::plain();
    let data = random_bytes(2 << 20, 15);
    let digest = registry.pusher().push_blob("flaky/blob", &data).await;
    let proxy = CountingProxy::start(&registry.host());
    let hosts = tempfile::tempdir().unwrap();
    let r = reference(&proxy.host(), "flaky/blob");
    let reg = client(hosts.path(), None);

    proxy.fail_next(2, 503);
    let got = reg.read_range(&r, &digest, 1000, 5000).await.unwrap();
    assert!(got[..] == data[1000..6000]);
    assert!(reg.stats().retries >= 2);

    assert!(!reg.ignores_ranges(&proxy.host()));
    proxy.set_ignore_range(true);
    let got = reg.read_range(&r, &digest, 1 << 20, 4096).await.unwrap();
    assert!(got[..] == data[1 << 20..(1 << 20) + 4096]);
    assert!(reg.ignores_ranges(&proxy.host()));
}

#[tokio::test(flavor = "multi_thread")]
async fn mirrors_from_hosts_toml_are_tried_first() {
    let registry = TestRegistry::plain();
    let data = random_bytes(100_000, 16);
    let digest = registry.pusher().push_blob("mirror/blob", &data).await;
    let mirror = CountingProxy::start(&registry.host());
    let dead_port = lazypull_tests::free_port();
    let hosts = tempfile::tempdir().unwrap();
    let dir = hosts.path().join(registry.host());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n\n[host.\"http://127.0.0.1:{dead_port}\"]\ncapabilities = [\"pull\", \"resolve\"]\n\n[host.\"http://{}\"]\ncapabilities = [\"pull\", \"resolve\"]\n",
            registry.host(),
            mirror.host()
        ),
    )
    .unwrap();
    let reg = client(hosts.path(), None);
    let r = reference(&registry.host(), "mirror/blob");
    assert!(reg.fetch_blob(&r, &digest).await.unwrap()[..] == data[..]);
    assert_eq!(gets(&mirror, &digest), 1, "the live mirror was not used");
}

#[tokio::test(flavor = "multi_thread")]
async fn chunk_cache_with_registry() {
    let mut registry = TestRegistry::plain();
    let chunk = random_bytes(256 << 10, 17);
    let d1 = registry.pusher().push_blob("layer/one", &chunk).await;
    let d2 = registry.pusher().push_blob("layer/two", &chunk).await;
    assert_eq!(d1, d2);
    let dir = tempfile::tempdir().unwrap();
    let reg = client(dir.path(), None);
    let cfg = CacheConfig {
        memory_bytes: 0,
        ..CacheConfig::default()
    };
    let cache = ChunkCache::open(dir.path().join("cache"), cfg.clone()).unwrap();
    let len = chunk.len() as u64;

    // The same chunk fetched through two layers (repositories) is stored once.
    for repo in ["layer/one", "layer/two"] {
        let r = reference(&registry.host(), repo);
        let bytes = reg.read_range(&r, &d1, 0, len).await.unwrap();
        cache.put(&d1, &bytes).unwrap();
    }
    assert_eq!(cache.stats().entries, 1);
    assert_eq!(cache.stats().used_bytes, len);
    let path = cache.path_of(&d1).unwrap();

    // A flipped byte on disk is detected at read, and a refetch repairs it.
    let mut bad = std::fs::read(&path).unwrap();
    bad[777] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    assert!(cache.get(&d1).unwrap().is_none());
    assert_eq!(cache.stats().corruptions, 1);
    let r = reference(&registry.host(), "layer/one");
    let bytes = reg.read_range(&r, &d1, 0, len).await.unwrap();
    cache.put(&d1, &bytes).unwrap();
    assert!(cache.get(&d1).unwrap().unwrap()[..] == chunk[..]);

    // After a restart (new cache on the same dir) the chunk is served with the registry gone.
    drop(cache);
    registry.kill();
    let cache = ChunkCache::open(dir.path().join("cache"), cfg).unwrap();
    assert!(cache.get(&d1).unwrap().unwrap()[..] == chunk[..]);
    assert_eq!(cache.stats().used_bytes, len);
}

#[test]
fn engine_handles_are_shared_per_blob() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let hosts = tempfile::tempdir().unwrap();
        let engine = Arc::new(FetchEngine::new(
            client(hosts.path(), None),
            EngineConfig::default(),
        ));
        let r = reference("127.0.0.1:1", "x/y");
        let d = Digest::sha256_of(b"x");
        let a = engine.blob(&r, d, Some(10));
        let b = engine.blob(&r, d, Some(10));
        assert_eq!(a.digest(), b.digest());
        let err = a.read_at(5, 10, Priority::OnDemand).await.unwrap_err();
        assert!(matches!(err, Error::OutOfRange { .. }));
    });
}
