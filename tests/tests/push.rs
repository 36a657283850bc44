//! Integration tests of the push client (`lazypull_fetcher::push`) against a real
//! `docker-registry`: uploads streamed from files, manifests, cross-repository mounts, and the
//! authentication flows (open, htpasswd, token) with the errors a user sees when refused.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use lazypull_fetcher::credentials::{CredentialStore, Credentials};
use lazypull_fetcher::hosts::HostsConfig;
use lazypull_fetcher::retry::RetryPolicy;
use lazypull_fetcher::{
    BlobPush, Digest, Manifest, PushBlobOptions, PushError, Reference, Registry, RegistryConfig,
};
use lazypull_tests::{
    random_bytes, CountingProxy, RegistryAuth, TestRegistry, TokenIssuer, TokenIssuerConfig,
};
use serde_json::json;

/// A client isolated from the host's configuration, with only the given credentials.
fn client(hosts_dir: &Path, creds: Option<(&str, Credentials)>) -> Registry {
    let mut store = CredentialStore::empty();
    if let Some((host, c)) = creds {
        store = store.with_static(host, c);
    }
    Registry::new(RegistryConfig {
        hosts: HostsConfig::new(vec![hosts_dir.to_path_buf()]),
        credentials: store,
        connect_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            max_total: Duration::from_secs(5),
        },
        ..RegistryConfig::default()
    })
}

fn reference(host: &str, repo: &str, tag: &str) -> Reference {
    format!("{host}/{repo}:{tag}").parse().unwrap()
}

/// Writes `data` to a file in `dir` and returns its path and digest.
fn blob_file(dir: &Path, name: &str, data: &[u8]) -> (std::path::PathBuf, Digest) {
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    (path, Digest::sha256_of(data))
}

/// An OCI manifest of one gzip layer and a config.
fn manifest(config: (&Digest, usize), layer: (&Digest, usize)) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config.0.to_string(),
            "size": config.1,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer.0.to_string(),
            "size": layer.1,
        }],
    }))
    .unwrap()
}

/// Pushes a config and a layer (from a file) and a manifest under `r`'s tag with `reg`;
/// returns the manifest digest, layer digest and layer bytes.
async fn push_small_image(reg: &Registry, r: &Reference, dir: &Path) -> (Digest, Digest, Vec<u8>) {
    let layer = random_bytes(3 << 20, 11);
    let (path, layer_digest) = blob_file(dir, "layer", &layer);
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = Digest::sha256_of(config);
    assert!(!reg.blob_exists(r, &layer_digest).await.unwrap());
    let sent = reg
        .upload_blob_from_file(r, &layer_digest, &path)
        .await
        .unwrap();
    assert_eq!(sent, layer.len() as u64);
    assert!(reg.blob_exists(r, &layer_digest).await.unwrap());
    reg.upload_blob_bytes(r, &config_digest, Bytes::from_static(config))
        .await
        .unwrap();
    let m = manifest((&config_digest, config.len()), (&layer_digest, layer.len()));
    let digest = reg
        .put_manifest(r, &m, "application/vnd.oci.image.manifest.v1+json")
        .await
        .unwrap();
    assert_eq!(digest, Digest::sha256_of(&m));
    (digest, layer_digest, layer)
}

#[tokio::test(flavor = "multi_thread")]
async fn push_then_fetch_back() {
    let registry = TestRegistry::plain();
    let hosts = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let reg = client(hosts.path(), None);
    let r = reference(&registry.host(), "push/app", "v1");
    let (digest, layer_digest, layer) = push_small_image(&reg, &r, work.path()).await;

    // The manifest comes back by tag and by digest, byte-identical.
    let fetched = reg.fetch_manifest(&r).await.unwrap();
    assert_eq!(fetched.digest, digest);
    assert!(matches!(fetched.manifest, Manifest::Image(_)));
    let by_digest = reg.fetch_manifest(&r.with_digest(digest)).await.unwrap();
    assert_eq!(by_digest.bytes, fetched.bytes);
    // The layer comes back verified and equal.
    let out = work.path().join("back");
    let n = reg
        .download_blob(&r, &layer_digest, None, &out, &|_| {})
        .await
        .unwrap();
    assert_eq!(n, layer.len() as u64);
    assert!(std::fs::read(&out).unwrap() == layer);

    // Pushing again: the blob is found and nothing is sent.
    let (path, _) = blob_file(work.path(), "again", &layer);
    let outcome = reg
        .push_blob_file(&r, &layer_digest, &path, &PushBlobOptions::default())
        .await
        .unwrap();
    assert_eq!(outcome, BlobPush::Exists);

    // A manifest pinned by digest is stored under that digest.
    let pinned = r.with_digest(digest);
    assert_eq!(
        reg.put_manifest(
            &pinned,
            &fetched.bytes,
            "application/vnd.oci.image.manifest.v1+json"
        )
        .await
        .unwrap(),
        digest
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_progress_and_streaming_of_a_large_file() {
    let registry = TestRegistry::plain();
    let hosts = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let reg = client(hosts.path(), None);
    let r = reference(&registry.host(), "push/large", "v1");
    let data = random_bytes(40 << 20, 12);
    let (path, digest) = blob_file(work.path(), "large", &data);
    drop(data);
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let s = seen.clone();
    let opts = PushBlobOptions {
        mount_from: None,
        progress: Some(std::sync::Arc::new(move |n| {
            s.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
        })),
    };
    let outcome = reg.push_blob_file(&r, &digest, &path, &opts).await.unwrap();
    assert_eq!(outcome, BlobPush::Uploaded);
    assert_eq!(seen.load(std::sync::atomic::Ordering::Relaxed), 40 << 20);
    let stored = std::fs::read(registry.blob_data_path(&digest)).unwrap();
    assert_eq!(Digest::sha256_of(&stored), digest);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_digest_and_missing_blobs_are_refused_clearly() {
    let registry = TestRegistry::plain();
    let hosts = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let reg = client(hosts.path(), None);
    let r = reference(&registry.host(), "push/bad", "v1");
    let (path, _) = blob_file(work.path(), "blob", b"some bytes");
    let wrong = Digest::sha256_of(b"other bytes");
    let err = reg
        .upload_blob_from_file(&r, &wrong, &path)
        .await
        .unwrap_err();
    assert!(matches!(err, PushError::BlobRejected { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("refused blob") && msg.contains("DIGEST_INVALID"),
        "{msg}"
    );
    assert!(!reg.blob_exists(&r, &wrong).await.unwrap());

    // A missing local file.
    let err = reg
        .upload_blob_from_file(&r, &wrong, &work.path().join("nope"))
        .await
        .unwrap_err();
    assert!(matches!(err, PushError::LocalFile { .. }), "{err}");

    // A manifest whose blobs the repository lacks.
    let missing = Digest::sha256_of(b"missing");
    let m = manifest((&missing, 7), (&missing, 7));
    let err = reg
        .put_manifest(&r, &m, "application/vnd.oci.image.manifest.v1+json")
        .await
        .unwrap_err();
    assert!(matches!(err, PushError::ManifestRejected { .. }), "{err}");
    assert!(err.to_string().contains("BLOB_UNKNOWN"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cross_repository_mount_sends_no_data() {
    let registry = TestRegistry::plain();
    let proxy = CountingProxy::start(&registry.host());
    let hosts = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let reg = client(hosts.path(), None);
    let src = reference(&proxy.host(), "mount/src", "v1");
    let dst = reference(&proxy.host(), "mount/dst", "v1");
    let data = random_bytes(2 << 20, 13);
    let (path, digest) = blob_file(work.path(), "blob", &data);
    reg.upload_blob_from_file(&src, &digest, &path)
        .await
        .unwrap();
    proxy.reset();

    let opts = PushBlobOptions {
        mount_from: Some(src.clone()),
        progress: None,
    };
    let outcome = reg
        .push_blob_file(&dst, &digest, &path, &opts)
        .await
        .unwrap();
    assert_eq!(outcome, BlobPush::Mounted);
    let puts = proxy.count(|r| r.method == "PUT");
    assert_eq!(puts, 0, "{:#?}", proxy.requests());
    let mounts = proxy.count(|r| {
        r.method == "POST" && r.path.contains("mount=") && r.path.contains("from=mount%2Fsrc")
    });
    assert_eq!(mounts, 1, "{:#?}", proxy.requests());
    assert!(reg.blob_exists(&dst, &digest).await.unwrap());

    // Mounting a blob the source lacks falls back to an upload.
    let other = random_bytes(100_000, 14);
    let (path, digest) = blob_file(work.path(), "other", &other);
    assert!(!reg.mount_blob(&dst, &digest, &src).await.unwrap());
    let outcome = reg
        .push_blob_file(&dst, &digest, &path, &opts)
        .await
        .unwrap();
    assert_eq!(outcome, BlobPush::Uploaded);
    assert!(reg.blob_exists(&dst, &digest).await.unwrap());
    // Another registry is never asked to mount.
    let elsewhere = reference("127.0.0.1:1", "mount/src", "v1");
    assert!(!reg.mount_blob(&dst, &digest, &elsewhere).await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn htpasswd_push_needs_credentials() {
    let registry = TestRegistry::start(RegistryAuth::htpasswd("carol", "pa55"));
    let host = registry.host();
    let hosts = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let r = reference(&host, "basic/app", "v1");

    let good = client(
        hosts.path(),
        Some((&host, Credentials::new("carol", "pa55"))),
    );
    let (digest, _, _) = push_small_image(&good, &r, work.path()).await;
    assert_eq!(good.fetch_manifest(&r).await.unwrap().digest, digest);

    let (path, d) = blob_file(work.path(), "x", b"x");
    let anon = client(hosts.path(), None);
    let err = anon.upload_blob_from_file(&r, &d, &path).await.unwrap_err();
    assert!(matches!(err, PushError::Unauthorized { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("unauthorized to push to basic/app"),
        "{msg}"
    );
    assert!(msg.contains("login"), "{msg}");

    let bad = client(
        hosts.path(),
        Some((&host, Credentials::new("carol", "nope"))),
    );
    let err = bad.upload_blob_from_file(&r, &d, &path).await.unwrap_err();
    assert!(matches!(err, PushError::Unauthorized { .. }), "{err}");
    assert!(!err.to_string().contains("nope"), "password leaked: {err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn token_push_asks_for_push_scope_and_mount_asks_for_both_repositories() {
    let issuer = TokenIssuer::start(TokenIssuerConfig {
        users: vec![("alice".into(), "s3cret".into())],
        allow_anonymous_pull: true,
        ..TokenIssuerConfig::default()
    });
    let registry = TestRegistry::start(RegistryAuth::Token(issuer.clone()));
    let host = registry.host();
    let hosts = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let r = reference(&host, "tok/app", "v1");
    let reg = client(
        hosts.path(),
        Some((&host, Credentials::new("alice", "s3cret"))),
    );
    let (digest, layer_digest, _) = push_small_image(&reg, &r, work.path()).await;
    assert_eq!(reg.fetch_manifest(&r).await.unwrap().digest, digest);
    let scopes: Vec<Vec<String>> = issuer.requests().iter().map(|q| q.scopes.clone()).collect();
    assert!(
        scopes.contains(&vec!["repository:tok/app:pull,push".to_string()]),
        "{scopes:?}"
    );
    assert!(
        issuer.requests().iter().all(|q| q.status == 200),
        "{:?}",
        issuer.requests()
    );
    // One token serves the whole push (HEAD, POST, PUT, manifest).
    let push_tokens = scopes
        .iter()
        .filter(|s| s.as_slice() == ["repository:tok/app:pull,push"])
        .count();
    assert_eq!(push_tokens, 1, "{scopes:?}");

    issuer.reset();
    let dst = reference(&host, "tok/copy", "v1");
    assert!(reg.mount_blob(&dst, &layer_digest, &r).await.unwrap());
    let req = issuer.requests();
    assert_eq!(req.len(), 1, "{req:?}");
    assert_eq!(
        req[0].scopes,
        vec![
            "repository:tok/copy:pull,push".to_string(),
            "repository:tok/app:pull".to_string()
        ]
    );

    // Anonymous users may pull but not push: a clear error, not a hang or a retry loop.
    let anon = client(hosts.path(), None);
    assert!(anon.blob_exists(&r, &layer_digest).await.unwrap());
    let (path, d) = blob_file(work.path(), "y", b"y");
    let err = anon.upload_blob_from_file(&r, &d, &path).await.unwrap_err();
    assert!(matches!(err, PushError::Unauthorized { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("unauthorized to push to tok/app"),
        "{err}"
    );
}
