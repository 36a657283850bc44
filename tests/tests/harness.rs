//! Self-tests of the harness against the real `docker-registry`.

use std::net::TcpStream;
use std::time::Duration;

use lazypull_tests::{
    gzip, pid_alive, random_bytes, BodyOutcome, CountingProxy, CredentialCheck, Digest, PushAuth,
    Pusher, RegistryAuth, TestRegistry, TokenIssuer, TokenIssuerConfig,
};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn body_json(resp: reqwest::Response) -> serde_json::Value {
    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
}

fn blob_url(base: &str, repo: &str, digest: &Digest) -> String {
    format!("{base}/v2/{repo}/blobs/{digest}")
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_registry_push_and_get_blob() {
    let registry = TestRegistry::plain();
    let pid = registry.pid();
    assert!(pid_alive(pid));
    let data = random_bytes(1 << 20, 1);
    let digest = registry.pusher().push_blob("test/blob", &data).await;
    assert_eq!(digest, Digest::sha256_of(&data));

    let resp = client()
        .get(blob_url(&registry.url(), "test/blob", &digest))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["docker-content-digest"].to_str().unwrap(),
        digest.to_string()
    );
    let body = resp.bytes().await.unwrap();
    assert_eq!(body.len(), data.len());
    assert!(body[..] == data[..], "blob bytes differ");

    // The blob is where the distribution layout says.
    let on_disk = std::fs::read(registry.blob_data_path(&digest)).unwrap();
    assert!(on_disk == data);
    assert!(registry.log().contains("listening on 127.0.0.1"));

    drop(registry);
    assert!(!pid_alive(pid), "registry {pid} survived drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_records_ranges_and_can_ignore_them() {
    let registry = TestRegistry::plain();
    let data = random_bytes(1 << 20, 2);
    let digest = registry.pusher().push_blob("test/range", &data).await;
    let proxy = CountingProxy::start(&registry.host());
    let url = blob_url(&proxy.url(), "test/range", &digest);

    let resp = client()
        .get(&url)
        .header("Range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.headers()["content-range"].to_str().unwrap(),
        format!("bytes 1000-1999/{}", data.len())
    );
    let body = resp.bytes().await.unwrap();
    assert!(body[..] == data[1000..2000]);

    let reqs = proxy.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    let r = &reqs[0];
    assert_eq!(r.method, "GET");
    assert_eq!(r.path, format!("/v2/test/range/blobs/{digest}"));
    assert_eq!(r.range.as_deref(), Some("bytes=1000-1999"));
    assert_eq!(r.status, 206);
    assert_eq!(r.body_bytes, 1000);
    assert_eq!(r.outcome, BodyOutcome::Complete);

    // An S3-like upstream: the range is ignored and the whole blob comes back.
    proxy.reset();
    proxy.set_ignore_range(true);
    let resp = client()
        .get(&url)
        .header("Range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await.unwrap();
    assert!(body[..] == data[..]);
    assert_eq!(proxy.count(|r| r.range.is_some() && r.status == 200), 1);
    assert_eq!(proxy.total_body_bytes(), data.len() as u64);

    // Multi-range rejection.
    proxy.set_ignore_range(false);
    proxy.set_reject_multi_range(true);
    let resp = client()
        .get(&url)
        .header("Range", "bytes=0-9,100-109")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 501);

    // Injected failures, then normal service again.
    proxy.fail_next(2, 503);
    for _ in 0..2 {
        let resp = client().get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 503);
    }
    let resp = client().get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.unwrap()[..] == data[..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_aborts_and_throttles_bodies() {
    let registry = TestRegistry::plain();
    let data = random_bytes(1 << 20, 3);
    let digest = registry.pusher().push_blob("test/abort", &data).await;
    let proxy = CountingProxy::start(&registry.host());
    let url = blob_url(&proxy.url(), "test/abort", &digest);

    // An aborted body is an error for the client, not a short success.
    proxy.set_abort_after(Some(100_000));
    let resp = client().get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.is_err(), "aborted body read as complete");
    let r = &proxy.requests()[0];
    assert_eq!(r.body_bytes, 100_000);
    assert!(matches!(r.outcome, BodyOutcome::Aborted(_)), "{r:?}");
    proxy.set_abort_after(None);

    // 256 KiB at 1 MiB/s takes about 250 ms.
    proxy.set_rate_limit(Some(1 << 20));
    let start = std::time::Instant::now();
    let resp = client()
        .get(&url)
        .header("Range", "bytes=0-262143")
        .send()
        .await
        .unwrap();
    let body = resp.bytes().await.unwrap();
    let took = start.elapsed();
    assert!(body[..] == data[..262_144]);
    assert!(
        took >= Duration::from_millis(200),
        "rate limit ignored: {took:?}"
    );
    proxy.set_rate_limit(None);

    // Latency.
    proxy.set_delay(Duration::from_millis(300));
    let start = std::time::Instant::now();
    let resp = client().head(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_aborts_when_upstream_dies_mid_body() {
    let mut registry = TestRegistry::plain();
    let data = random_bytes(8 << 20, 4);
    let digest = registry.pusher().push_blob("test/die", &data).await;
    let proxy = CountingProxy::start(&registry.host());
    proxy.set_rate_limit(Some(2 << 20));
    let mut resp = client()
        .get(blob_url(&proxy.url(), "test/die", &digest))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().expect("some body");
    assert!(!first.is_empty());
    registry.kill();
    let mut got = first.len();
    let err = loop {
        match resp.chunk().await {
            Ok(Some(c)) => got += c.len(),
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    // The registry's socket buffers may hold some MiB, but not the whole 8 MiB at 2 MiB/s.
    assert!(
        err.is_some(),
        "body ended cleanly after {got} of {} bytes",
        data.len()
    );
    assert!(got < data.len());
    // A dead upstream answers 502.
    let resp = client()
        .get(blob_url(&proxy.url(), "test/die", &digest))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_registry_accepts_issued_tokens() {
    let issuer = TokenIssuer::with_user("alice", "secret");
    let registry = TestRegistry::start(RegistryAuth::Token(issuer.clone()));
    let data = random_bytes(300_000, 5);
    let digest = registry.pusher().push_blob("private/app", &data).await;

    // Anonymous: 401 pointing at the issuer.
    let resp = client()
        .get(format!("{}/v2/private/app/manifests/x", registry.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
    assert!(challenge.starts_with("Bearer "), "{challenge}");
    assert!(
        challenge.contains(&format!("realm=\"{}\"", issuer.realm())),
        "{challenge}"
    );
    assert!(challenge.contains(&format!("service=\"{}\"", issuer.service())));
    assert!(challenge.contains("scope=\"repository:private/app:pull\""));

    // A token fetched over HTTP with valid Basic creds opens the blob.
    let scope = "repository:private/app:pull";
    let resp = client()
        .get(issuer.realm())
        .query(&[("service", issuer.service()), ("scope", scope)])
        .basic_auth("alice", Some("secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let json: serde_json::Value = body_json(resp).await;
    let token = json["token"].as_str().unwrap().to_string();
    assert_eq!(json["access_token"].as_str(), Some(token.as_str()));
    assert_eq!(json["expires_in"].as_u64(), Some(300));
    assert!(json["issued_at"].as_str().unwrap().ends_with('Z'));
    let resp = client()
        .get(blob_url(&registry.url(), "private/app", &digest))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", registry.log_tail(10));
    assert!(resp.bytes().await.unwrap()[..] == data[..]);

    // The same token does not open another repository.
    let resp = client()
        .get(blob_url(&registry.url(), "private/other", &digest))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // Anonymous token (no anonymous pull): issued, but grants nothing.
    let resp = client()
        .get(issuer.realm())
        .query(&[("service", issuer.service()), ("scope", scope)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let anon: serde_json::Value = body_json(resp).await;
    let resp = client()
        .get(blob_url(&registry.url(), "private/app", &digest))
        .bearer_auth(anon["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // Wrong password.
    let resp = client()
        .get(issuer.realm())
        .query(&[("service", issuer.service()), ("scope", scope)])
        .basic_auth("alice", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    let reqs = issuer.requests();
    assert_eq!(issuer.request_count(), 3);
    assert_eq!(reqs[0].credentials, CredentialCheck::Valid);
    assert_eq!(reqs[0].user.as_deref(), Some("alice"));
    assert_eq!(reqs[0].scopes, vec![scope.to_string()]);
    assert_eq!(reqs[0].granted[0].actions, vec!["pull".to_string()]);
    assert_eq!(reqs[1].credentials, CredentialCheck::Anonymous);
    assert!(reqs[1].granted.is_empty());
    assert_eq!(reqs[2].credentials, CredentialCheck::Invalid);
    assert_eq!(reqs[2].status, 401);

    // A Pusher with a minted Bearer token works too.
    let pusher = Pusher::new(
        &registry.url(),
        PushAuth::Bearer(issuer.mint(&["repository:private/bearer:pull,push"])),
    );
    let d2 = pusher.push_blob("private/bearer", b"hello").await;
    assert_eq!(d2, Digest::sha256_of(b"hello"));
}

#[tokio::test(flavor = "multi_thread")]
async fn token_expiry_and_anonymous_pull() {
    let issuer = TokenIssuer::start(TokenIssuerConfig {
        allow_anonymous_pull: true,
        token_lifetime: Duration::from_secs(2),
        ..TokenIssuerConfig::default()
    });
    let registry = TestRegistry::start(RegistryAuth::Token(issuer.clone()));
    let image = registry
        .pusher()
        .push_image(
            "public/img",
            "v1",
            &[gzip(&random_bytes(10_000, 6))],
            "linux",
            "amd64",
        )
        .await;

    // Anonymous pull allowed.
    let resp = client()
        .get(issuer.realm())
        .query(&[
            ("service", issuer.service()),
            ("scope", "repository:public/img:pull,push"),
        ])
        .send()
        .await
        .unwrap();
    let json: serde_json::Value = body_json(resp).await;
    assert_eq!(json["expires_in"].as_u64(), Some(2));
    let token = json["token"].as_str().unwrap();
    let resp = client()
        .get(format!("{}/v2/public/img/manifests/v1", registry.url()))
        .header("Accept", lazypull_tests::MEDIA_TYPE_OCI_MANIFEST)
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.unwrap()[..] == image.manifest_bytes[..]);
    assert_eq!(issuer.requests()[0].granted[0].actions, vec!["pull"]);

    // With exp shifted past distribution's 60 s leeway, the token dies after its lifetime.
    issuer.set_exp_shift(-60);
    let short = issuer.mint(&["repository:public/img:pull"]);
    let url = format!(
        "{}/v2/public/img/blobs/{}",
        registry.url(),
        image.config_digest
    );
    let resp = client().get(&url).bearer_auth(&short).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let resp = client().get(&url).bearer_auth(&short).send().await.unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn htpasswd_registry_checks_basic_auth() {
    let registry = TestRegistry::start(RegistryAuth::htpasswd("bob", "hunter2"));
    let resp = client()
        .get(format!("{}/v2/", registry.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic "));
    let resp = client()
        .get(format!("{}/v2/", registry.url()))
        .basic_auth("bob", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = client()
        .get(format!("{}/v2/", registry.url()))
        .basic_auth("bob", Some("hunter2"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let data = random_bytes(4096, 7);
    let digest = registry.pusher().push_blob("basic/repo", &data).await;
    let resp = client()
        .get(blob_url(&registry.url(), "basic/repo", &digest))
        .basic_auth("bob", Some("hunter2"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.unwrap()[..] == data[..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_pause_restart() {
    let mut registry = TestRegistry::plain();
    let data = random_bytes(64 * 1024, 8);
    let digest = registry.pusher().push_blob("persist/repo", &data).await;
    let first_pid = registry.pid();

    // Paused: connections are accepted but nothing answers.
    registry.pause();
    let paused = client()
        .get(blob_url(&registry.url(), "persist/repo", &digest))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(paused.unwrap_err().is_timeout());
    registry.resume();
    let resp = client()
        .get(blob_url(&registry.url(), "persist/repo", &digest))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    registry.kill();
    assert!(!pid_alive(first_pid));
    let err = TcpStream::connect(registry.host()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

    registry.restart();
    assert_ne!(registry.pid(), first_pid);
    let resp = client()
        .get(blob_url(&registry.url(), "persist/repo", &digest))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.unwrap()[..] == data[..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn push_image_and_index() {
    let registry = TestRegistry::plain();
    let pusher = registry.pusher();
    let tar = random_bytes(20_000, 9);
    let layer = gzip(&tar);
    let amd = pusher
        .push_image(
            "multi/app",
            "amd64",
            std::slice::from_ref(&layer),
            "linux",
            "amd64",
        )
        .await;
    let arm = pusher
        .push_image(
            "multi/app",
            "arm64",
            std::slice::from_ref(&layer),
            "linux",
            "arm64",
        )
        .await;
    assert_eq!(amd.layer_digests, vec![Digest::sha256_of(&layer)]);
    let config: serde_json::Value = serde_json::from_slice(&amd.config_bytes).unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"][0].as_str().unwrap(),
        Digest::sha256_of(&tar).to_string()
    );
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
    let resp = client()
        .get(format!("{}/v2/multi/app/manifests/latest", registry.url()))
        .header("Accept", lazypull_tests::MEDIA_TYPE_OCI_INDEX)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["docker-content-digest"].to_str().unwrap(),
        index.to_string()
    );
    let json: serde_json::Value = body_json(resp).await;
    assert_eq!(
        json["manifests"][1]["platform"]["variant"].as_str(),
        Some("v8")
    );
    assert_eq!(
        json["manifests"][0]["digest"].as_str().unwrap(),
        amd.manifest_digest.to_string()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn large_blob_streams_through_proxy_both_ways() {
    use sha2::Digest as _;
    let registry = TestRegistry::plain();
    let proxy = CountingProxy::start(&registry.host());
    let data = random_bytes(64 << 20, 10);
    // Upload through the proxy: request bodies stream, Location headers point back at it.
    let digest = Pusher::new(&proxy.url(), PushAuth::None)
        .push_blob("big/blob", &data)
        .await;
    let uploads = proxy.requests();
    assert_eq!(uploads.len(), 2, "{uploads:?}");
    assert_eq!(uploads[0].method, "POST");
    assert_eq!(uploads[1].method, "PUT");
    assert!(uploads[1].path.contains("digest=sha256%3A"));
    assert_eq!(uploads[1].status, 201);
    proxy.reset();

    let mut resp = client()
        .get(blob_url(&proxy.url(), "big/blob", &digest))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut hasher = sha2::Sha256::new();
    let mut total = 0usize;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        total += chunk.len();
        hasher.update(&chunk);
    }
    assert_eq!(total, data.len());
    assert_eq!(hex::encode(hasher.finalize()), digest.hex());
    let r = &proxy.requests()[0];
    assert_eq!(r.body_bytes, data.len() as u64);
    assert_eq!(r.outcome, BodyOutcome::Complete);
}

#[test]
fn registry_is_killed_when_a_test_panics() {
    let pid = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let seen = pid.clone();
    let result = std::panic::catch_unwind(move || {
        let registry = TestRegistry::plain();
        seen.store(registry.pid(), std::sync::atomic::Ordering::SeqCst);
        panic!("deliberate panic with registry {}", registry.pid());
    });
    assert!(result.is_err());
    let pid = pid.load(std::sync::atomic::Ordering::SeqCst);
    assert_ne!(pid, 0);
    assert!(!pid_alive(pid), "registry {pid} outlived a panicking test");
}

#[tokio::test(flavor = "multi_thread")]
async fn token_issuer_oauth_post_and_refresh() {
    let issuer = TokenIssuer::with_user("carol", "pw");
    let resp = client()
        .post(issuer.realm())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=password&service={}&client_id=test&access_type=offline&username=carol&password=pw&scope=repository%3Aa%2Fb%3Apull",
            issuer.service()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let json = body_json(resp).await;
    assert!(json["access_token"].as_str().unwrap().split('.').count() == 3);
    let refresh = json["refresh_token"].as_str().unwrap().to_string();
    let resp = client()
        .post(issuer.realm())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=refresh_token&service={}&client_id=test&refresh_token={refresh}&scope=repository%3Aa%2Fb%3Apull",
            issuer.service()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let reqs = issuer.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].grant_type.as_deref(), Some("refresh_token"));
    assert_eq!(reqs[1].user.as_deref(), Some("carol"));
    assert_eq!(reqs[1].granted[0].name, "a/b");

    issuer.set_fail(Some(503));
    let resp = client().get(issuer.realm()).send().await.unwrap();
    assert_eq!(resp.status(), 503);
}
