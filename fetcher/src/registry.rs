//! The registry client: manifests, blobs and ranges over the OCI distribution API.
//!
//! One [`Registry`] serves every host. Per request it walks the host's endpoints from
//! `hosts.toml` (mirrors first, the registry last), authenticates (Bearer token flow or Basic),
//! retries transient failures with capped back-off, follows blob redirects and remembers the
//! redirected URL so later ranges of the same blob skip the registry, and verifies everything it
//! can by digest. Ranged reads cannot be verified here (the caller verifies chunk digests);
//! whole blobs and manifests always are.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use parking_lot::Mutex;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, Response, StatusCode};
use tokio::io::AsyncWriteExt;
use url::Url;

use crate::auth::{parse_challenge, Challenge, TokenCache, TokenKey, TokenResponse};
use crate::credentials::{CredentialStore, Credentials};
use crate::digest::{Digest, Verifier};
use crate::error::Error;
use crate::hosts::{Endpoint, HostsConfig};
use crate::manifest::{self, FetchedManifest, Manifest, Platform};
use crate::reference::Reference;
use crate::retry::{parse_retry_after, RetryPolicy};

/// Largest manifest or config document accepted (they are a few KiB; this stops a hostile
/// registry from filling memory).
pub const MAX_DOCUMENT_BYTES: u64 = 8 << 20;

/// How the client talks to registries. Every field has a sensible default.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Per-host mirrors, TLS and plain-HTTP settings.
    pub hosts: HostsConfig,
    /// Where passwords and tokens come from.
    pub credentials: CredentialStore,
    /// Limit for establishing a TCP/TLS connection.
    pub connect_timeout: Duration,
    /// Limit for a response (headers or the next body bytes) to make progress.
    pub idle_timeout: Duration,
    /// Overall limit for small requests (manifests, tokens, HEAD).
    pub request_timeout: Duration,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// How long a blob's redirected URL is reused for later ranges.
    pub redirect_ttl: Duration,
    /// `User-Agent` sent with every request.
    pub user_agent: String,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            hosts: HostsConfig::default_dirs(),
            credentials: CredentialStore::from_env(),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            redirect_ttl: Duration::from_secs(300),
            user_agent: concat!("lazypull/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// An image resolved to one platform's manifest.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The reference, pinned to the digest it resolved to (the index's when there is one).
    pub reference: Reference,
    /// The index, when the reference named one.
    pub index: Option<FetchedManifest>,
    /// The image manifest for the selected platform.
    pub manifest: FetchedManifest,
}

impl ResolvedImage {
    /// The image manifest (always `Manifest::Image` by construction).
    pub fn image(&self) -> Option<&oci_spec::image::ImageManifest> {
        match &self.manifest.manifest {
            Manifest::Image(m) => Some(m),
            Manifest::Index(_) => None,
        }
    }
}

/// Counters of what the client did, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RegistryStats {
    /// HTTP requests sent to registries and mirrors (token requests excluded).
    pub requests: u64,
    /// Token requests sent to token servers.
    pub token_requests: u64,
    /// Body bytes received for blobs.
    pub blob_bytes: u64,
    /// Attempts that were retried.
    pub retries: u64,
}

/// A registry client shared by every layer and image; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

struct Inner {
    config: RegistryConfig,
    clients: Mutex<HashMap<String, reqwest::Client>>,
    tokens: TokenCache,
    /// Last challenge seen per endpoint host, so later requests authenticate up front.
    challenges: Mutex<HashMap<String, Challenge>>,
    /// Credentials by host, looked up once (helpers are slow).
    creds: Mutex<HashMap<String, Option<Credentials>>>,
    /// Redirected blob URLs: (registry, repository, digest) -> (url, fetched at).
    redirects: Mutex<HashMap<BlobKey, (Url, Instant)>>,
    /// Hosts seen answering a Range request with the whole blob.
    no_range: Mutex<HashSet<String>>,
    requests: AtomicU64,
    token_requests: AtomicU64,
    blob_bytes: AtomicU64,
    retries: AtomicU64,
}

/// A blob in a repository: (registry, repository, digest).
type BlobKey = (String, String, Digest);

/// Outcome of one attempt inside a retry loop.
pub(crate) enum Attempt {
    /// Worth trying again (after `after`, if the server said).
    Retry(Error, Option<Duration>),
    /// Final.
    Fatal(Error),
}

impl From<Error> for Attempt {
    fn from(e: Error) -> Self {
        if e.is_transient() {
            Attempt::Retry(e, None)
        } else {
            Attempt::Fatal(e)
        }
    }
}

/// What a request is for: the repository (auth scope) and a description for errors.
pub(crate) struct Target<'a> {
    pub(crate) reference: &'a Reference,
    pub(crate) what: String,
}

/// Makes a request body, once per attempt: a streamed body cannot be replayed, so a request
/// retried after a 401 (or a transient failure) needs a fresh one.
pub(crate) type BodyFactory<'a> = &'a (dyn Fn() -> Result<reqwest::Body, Error> + Send + Sync);

impl Registry {
    /// A client with `config`.
    pub fn new(config: RegistryConfig) -> Registry {
        Registry {
            inner: Arc::new(Inner {
                config,
                clients: Mutex::default(),
                tokens: TokenCache::default(),
                challenges: Mutex::default(),
                creds: Mutex::default(),
                redirects: Mutex::default(),
                no_range: Mutex::default(),
                requests: AtomicU64::new(0),
                token_requests: AtomicU64::new(0),
                blob_bytes: AtomicU64::new(0),
                retries: AtomicU64::new(0),
            }),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &RegistryConfig {
        &self.inner.config
    }

    /// What the client has done so far.
    pub fn stats(&self) -> RegistryStats {
        let i = &self.inner;
        RegistryStats {
            requests: i.requests.load(Ordering::Relaxed),
            token_requests: i.token_requests.load(Ordering::Relaxed),
            blob_bytes: i.blob_bytes.load(Ordering::Relaxed),
            retries: i.retries.load(Ordering::Relaxed),
        }
    }

    /// Whether `host` was seen ignoring Range requests (answering 200 with the whole blob).
    /// Callers should then fetch whole blobs once instead of many ranges.
    pub fn ignores_ranges(&self, host: &str) -> bool {
        self.inner.no_range.lock().contains(host)
    }

    /// Resolves `reference` to the image manifest for `platform`, following an index.
    pub async fn resolve(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<ResolvedImage, Error> {
        let top = self.fetch_manifest(reference).await?;
        let pinned = reference.with_digest(top.digest);
        match &top.manifest {
            Manifest::Image(_) => Ok(ResolvedImage {
                reference: pinned,
                index: None,
                manifest: top,
            }),
            Manifest::Index(index) => {
                let desc = platform.select(index).ok_or_else(|| Error::NoPlatform {
                    reference: reference.to_string(),
                    wanted: platform.to_string(),
                    available: manifest::describe_platforms(index),
                })?;
                let digest = manifest::descriptor_digest(desc)?;
                let child = self.fetch_manifest(&reference.with_digest(digest)).await?;
                if !matches!(child.manifest, Manifest::Image(_)) {
                    return Err(Error::Manifest {
                        reference: format!("{reference}@{digest}"),
                        detail: "an index entry for a platform points to another index".into(),
                    });
                }
                Ok(ResolvedImage {
                    reference: pinned,
                    index: Some(top),
                    manifest: child,
                })
            }
        }
    }

    /// Fetches the manifest or index `reference` names (its digest if pinned, else its tag)
    /// and verifies it against the digest it was asked by or the registry announced.
    pub async fn fetch_manifest(&self, reference: &Reference) -> Result<FetchedManifest, Error> {
        let by_digest = reference.digest().copied();
        let mref = reference.manifest_reference();
        let capability = if by_digest.is_some() {
            "pull"
        } else {
            "resolve"
        };
        let target = Target {
            reference,
            what: format!("manifest {}", reference.familiar()),
        };
        let path = format!("{}/manifests/{}", reference.repository(), mref);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static(manifest::MANIFEST_ACCEPT),
        );
        let (resp, host) = self
            .get_from_endpoints(&target, capability, &path, headers, true)
            .await?;
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        let announced = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        let bytes = read_limited(resp, MAX_DOCUMENT_BYTES, &host, &target.what).await?;
        let algorithm = by_digest
            .or(announced)
            .map(|d| d.algorithm())
            .unwrap_or(crate::digest::Algorithm::Sha256);
        let mut v = Verifier::new(algorithm);
        v.update(&bytes);
        let actual = v.finish();
        if let Some(expected) = by_digest.or(announced) {
            if expected != actual {
                return Err(Error::DigestMismatch {
                    what: target.what,
                    expected: Box::new(expected),
                    actual: Box::new(actual),
                });
            }
        }
        let parsed = Manifest::parse(&media_type, &bytes, &reference.to_string())?;
        let media_type = if media_type.is_empty() {
            match &parsed {
                Manifest::Image(_) => manifest::OCI_MANIFEST.to_string(),
                Manifest::Index(_) => manifest::OCI_INDEX.to_string(),
            }
        } else {
            media_type
        };
        Ok(FetchedManifest {
            digest: actual,
            media_type,
            bytes,
            manifest: parsed,
        })
    }

    /// Size of a blob (HEAD). Fails with `NotFound` if no endpoint has it.
    pub async fn blob_size(&self, reference: &Reference, digest: &Digest) -> Result<u64, Error> {
        let target = Target {
            reference,
            what: format!("blob {digest}"),
        };
        let path = format!("{}/blobs/{}", reference.repository(), digest);
        let eps = self.endpoints(reference, "pull")?;
        let mut last = None;
        for ep in &eps {
            let url = join(ep, &path);
            let result = self
                .retrying(&ep.host, || {
                    self.send(
                        ep,
                        &target,
                        Method::HEAD,
                        url.clone(),
                        HeaderMap::new(),
                        true,
                    )
                })
                .await;
            match result {
                Ok(resp) if resp.status().is_success() => {
                    return resp
                        .headers()
                        .get(header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| Error::InvalidResponse {
                            host: ep.host.clone(),
                            what: target.what.clone(),
                            detail: "HEAD without Content-Length".into(),
                        });
                }
                Ok(resp) => last = Some(status_error(resp, &ep.host, &target.what).await),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(Error::NoEndpoint {
            host: reference.registry().to_string(),
            capability: "pull",
        }))
    }

    /// Fetches a small blob (an image config) whole into memory, verified.
    pub async fn fetch_blob(&self, reference: &Reference, digest: &Digest) -> Result<Bytes, Error> {
        let what = format!("blob {digest}");
        self.retrying(reference.registry(), || async {
            let (resp, host) = self.blob_get(reference, digest, None).await?;
            let bytes = read_limited(resp, MAX_DOCUMENT_BYTES, &host, &what)
                .await
                .map_err(Attempt::from)?;
            self.inner
                .blob_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            verify(digest, &bytes, &what).map_err(Attempt::Fatal)?;
            Ok(bytes)
        })
        .await
    }

    /// Where [`Registry::download_blob`] writes `dest` while the download runs (renamed to
    /// `dest` once verified): a reader may follow it to work on the bytes as they arrive, but
    /// must check them against the digest itself (a retried download rewrites the file).
    pub fn partial_download_path(dest: &Path) -> std::path::PathBuf {
        dest.with_extension(format!("partial-{}", std::process::id()))
    }

    /// Streams a blob to `dest`, verifying its size (`size`, from the manifest, when known)
    /// and digest. On any failure (including a digest mismatch) nothing is left at `dest`; the
    /// file appears only complete and verified (written to a temporary name, then renamed).
    /// `progress` is called with the bytes so far.
    pub async fn download_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: Option<u64>,
        dest: &Path,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<u64, Error> {
        let what = format!("blob {digest}");
        let tmp = Registry::partial_download_path(dest);
        let io = |e: std::io::Error, doing: &str| Error::Io {
            what: format!("{doing} {}", tmp.display()),
            detail: e.to_string(),
        };
        let result = self
            .retrying(reference.registry(), || async {
                let (resp, host) = self.blob_get(reference, digest, None).await?;
                let mut file = tokio::fs::File::create(&tmp)
                    .await
                    .map_err(|e| Attempt::Fatal(io(e, "create")))?;
                let mut verifier = Verifier::new(digest.algorithm());
                let mut total = 0u64;
                let expected = size.or(resp.content_length());
                let mut stream = resp.bytes_stream();
                while let Some(piece) = stream.next().await {
                    let piece = piece.map_err(|e| body_error(e, &host, &what, total, expected))?;
                    if size.is_some_and(|size| total.saturating_add(piece.len() as u64) > size) {
                        // More than the manifest says: stop before it fills the disk.
                        return Err(Attempt::Fatal(Error::InvalidResponse {
                            host,
                            what: what.clone(),
                            detail: format!(
                                "more than the manifest's {} bytes arrived",
                                size.unwrap_or(0)
                            ),
                        }));
                    }
                    verifier.update(&piece);
                    file.write_all(&piece)
                        .await
                        .map_err(|e| Attempt::Fatal(io(e, "write")))?;
                    total += piece.len() as u64;
                    self.inner
                        .blob_bytes
                        .fetch_add(piece.len() as u64, Ordering::Relaxed);
                    progress(total);
                }
                file.flush()
                    .await
                    .map_err(|e| Attempt::Fatal(io(e, "flush")))?;
                match expected {
                    Some(expected) if total < expected => {
                        return Err(Attempt::Retry(
                            Error::Truncated {
                                host,
                                what: what.clone(),
                                got: total,
                                expected,
                            },
                            None,
                        ))
                    }
                    Some(expected) if size.is_some() && total > expected => {
                        return Err(Attempt::Fatal(Error::InvalidResponse {
                            host,
                            what: what.clone(),
                            detail: format!(
                                "{total} bytes arrived where the manifest says {expected}"
                            ),
                        }))
                    }
                    _ => {}
                }
                let actual = verifier.finish();
                if actual != *digest {
                    return Err(Attempt::Fatal(Error::DigestMismatch {
                        what: what.clone(),
                        expected: Box::new(*digest),
                        actual: Box::new(actual),
                    }));
                }
                Ok(total)
            })
            .await;
        match result {
            Ok(n) => {
                tokio::fs::rename(&tmp, dest)
                    .await
                    .map_err(|e| io(e, "rename"))?;
                Ok(n)
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    /// Reads `len` bytes at `offset` of a blob with one Range request (retried as a whole on
    /// transient failure). The bytes are NOT verified: the caller checks chunk digests. A
    /// registry that ignores Range is handled (the wanted slice is cut from the stream) and
    /// remembered, see [`Registry::ignores_ranges`].
    pub async fn read_range(
        &self,
        reference: &Reference,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, Error> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let what = format!("blob {digest} range {offset}+{len}");
        self.retrying(reference.registry(), || async {
            let (resp, host) = self
                .blob_get(reference, digest, Some((offset, len)))
                .await
                .map_err(|a| truncated_on_416(a, &what, offset))?;
            let skip = match resp.status() {
                StatusCode::PARTIAL_CONTENT => {
                    let start = resp
                        .headers()
                        .get(header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(content_range_start);
                    match start {
                        Some(s) if s == offset => 0,
                        other => {
                            return Err(Attempt::Fatal(Error::InvalidResponse {
                                host,
                                what: what.clone(),
                                detail: format!(
                                    "Content-Range starts at {other:?}, expected {offset}"
                                ),
                            }))
                        }
                    }
                }
                _ => {
                    if self.inner.no_range.lock().insert(host.clone()) {
                        tracing::warn!(
                            host = %host,
                            "registry ignores Range requests (answered 200 with the whole blob); lazy reads from it cost whole-blob transfers"
                        );
                    }
                    offset
                }
            };
            let mut buf = BytesMut::with_capacity(len.min(64 << 20) as usize);
            let mut skipped = 0u64;
            let mut stream = resp.bytes_stream();
            while let Some(piece) = stream.next().await {
                let mut piece = piece.map_err(|e| {
                    let got = (buf.len() as u64).saturating_add(skipped);
                    body_error(e, &host, &what, got, Some(len.saturating_add(skip)))
                })?;
                self.inner
                    .blob_bytes
                    .fetch_add(piece.len() as u64, Ordering::Relaxed);
                if skipped < skip {
                    let drop = (skip - skipped).min(piece.len() as u64);
                    skipped += drop;
                    let _ = piece.split_to(drop as usize);
                }
                let want = (len - buf.len() as u64).min(piece.len() as u64) as usize;
                buf.extend_from_slice(&piece[..want]);
                if buf.len() as u64 == len {
                    break;
                }
            }
            if (buf.len() as u64) < len {
                return Err(Attempt::Retry(
                    Error::Truncated {
                        host,
                        what: what.clone(),
                        got: buf.len() as u64,
                        expected: len,
                    },
                    None,
                ));
            }
            Ok(buf.freeze())
        })
        .await
    }

    /// GET of a blob (optionally a range), through a remembered redirect when fresh, else
    /// through the endpoints. Returns a successful response and the host that answered.
    async fn blob_get(
        &self,
        reference: &Reference,
        digest: &Digest,
        range: Option<(u64, u64)>,
    ) -> Result<(Response, String), Attempt> {
        let mut headers = HeaderMap::new();
        if let Some((offset, len)) = range {
            let v = format!("bytes={}-{}", offset, offset + len - 1);
            if let Ok(v) = HeaderValue::from_str(&v) {
                headers.insert(header::RANGE, v);
            }
        }
        let key = (
            reference.registry().to_string(),
            reference.repository().to_string(),
            *digest,
        );
        let cached = {
            let mut map = self.inner.redirects.lock();
            match map.get(&key) {
                Some((url, at)) if at.elapsed() < self.inner.config.redirect_ttl => {
                    Some(url.clone())
                }
                Some(_) => {
                    map.remove(&key);
                    None
                }
                None => None,
            }
        };
        let target = Target {
            reference,
            what: format!("blob {digest}"),
        };
        if let Some(url) = cached {
            match self.plain_get(&url, headers.clone(), &target).await {
                Ok(resp) if resp.status().is_success() => {
                    let host = host_of(&url);
                    return Ok((resp, host));
                }
                _ => {
                    tracing::debug!(%digest, "redirected blob URL no longer valid; asking the registry again");
                    self.inner.redirects.lock().remove(&key);
                }
            }
        }
        let path = format!("{}/blobs/{}", reference.repository(), digest);
        let (resp, host) = self
            .get_from_endpoints(&target, "pull", &path, headers.clone(), false)
            .await
            .map_err(Attempt::from)?;
        if resp.status().is_redirection() {
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| resp.url().join(l).ok())
                .ok_or_else(|| {
                    Attempt::Fatal(Error::InvalidResponse {
                        host: host.clone(),
                        what: target.what.clone(),
                        detail: "redirect without a valid Location".into(),
                    })
                })?;
            self.inner
                .redirects
                .lock()
                .insert(key, (location.clone(), Instant::now()));
            let resp = self.plain_get(&location, headers, &target).await?;
            let host = host_of(&location);
            if !resp.status().is_success() {
                return Err(Attempt::from(status_error(resp, &host, &target.what).await));
            }
            return Ok((resp, host));
        }
        Ok((resp, host))
    }

    /// GET of a redirected (pre-signed) URL: no registry credentials go there.
    async fn plain_get(
        &self,
        url: &Url,
        headers: HeaderMap,
        target: &Target<'_>,
    ) -> Result<Response, Attempt> {
        let host = host_of(url);
        let client = self.client_for(None, &host).map_err(Attempt::Fatal)?;
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        let resp = client
            .get(url.clone())
            .headers(headers)
            .send()
            .await
            .map_err(|e| transport_error(e, &host, &target.what, 1))?;
        classify_status(resp, &host, &target.what).await
    }

    /// Tries each endpoint with `capability` in order: the first success (or redirect, when
    /// `follow` is false) wins; a 404 moves on to the next endpoint; a mirror that fails moves
    /// on too; the last error is returned.
    async fn get_from_endpoints(
        &self,
        target: &Target<'_>,
        capability: &'static str,
        path: &str,
        headers: HeaderMap,
        small: bool,
    ) -> Result<(Response, String), Error> {
        let eps = self.endpoints(target.reference, capability)?;
        let mut last = None;
        for ep in &eps {
            let url = join(ep, path);
            let result = self
                .retrying(&ep.host, || {
                    self.send(ep, target, Method::GET, url.clone(), headers.clone(), small)
                })
                .await;
            match result {
                Ok(resp) if resp.status().is_success() || resp.status().is_redirection() => {
                    return Ok((resp, ep.host.clone()))
                }
                Ok(resp) => {
                    let e = status_error(resp, &ep.host, &target.what).await;
                    if ep.is_mirror {
                        tracing::debug!(mirror = %ep.host, error = %e, "mirror failed, trying next endpoint");
                    }
                    last = Some(e);
                }
                Err(e) => {
                    if ep.is_mirror {
                        tracing::warn!(mirror = %ep.host, error = %e, "mirror unreachable, trying next endpoint");
                    }
                    if matches!(e, Error::Unauthorized { .. }) && !ep.is_mirror {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(Error::NoEndpoint {
            host: target.reference.registry().to_string(),
            capability,
        }))
    }

    pub(crate) fn endpoints(
        &self,
        reference: &Reference,
        capability: &str,
    ) -> Result<Vec<Endpoint>, Error> {
        let all = self.inner.config.hosts.endpoints(reference.registry())?;
        let eps: Vec<Endpoint> = all
            .into_iter()
            .filter(|e| match capability {
                "resolve" => e.capabilities.resolve,
                "push" => e.capabilities.push,
                _ => e.capabilities.pull,
            })
            .collect();
        Ok(eps)
    }

    /// Runs `attempt` until it succeeds, fails finally, or the retry policy gives up.
    pub(crate) async fn retrying<T, F, Fut>(&self, host: &str, mut attempt: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Attempt>>,
    {
        let policy = &self.inner.config.retry;
        let start = Instant::now();
        let mut n = 0u32;
        loop {
            n += 1;
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(e, after)) => {
                    let wait = policy.backoff(n, after);
                    if !policy.should_retry(n, start.elapsed(), wait) {
                        return Err(match e {
                            Error::Unreachable { host, detail, .. } => Error::Unreachable {
                                host,
                                detail,
                                attempts: n,
                            },
                            e => e,
                        });
                    }
                    tracing::debug!(%host, attempt = n, error = %e, wait_ms = wait.as_millis() as u64, "retrying");
                    self.inner.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// One request to an endpoint with authentication: up-front when the host's challenge is
    /// known, else on the first 401 (then once more with fresh credentials/token).
    async fn send(
        &self,
        ep: &Endpoint,
        target: &Target<'_>,
        method: Method,
        url: Url,
        headers: HeaderMap,
        small: bool,
    ) -> Result<Response, Attempt> {
        let scope = format!("repository:{}:pull", target.reference.repository());
        self.send_scoped(ep, target, method, url, headers, small, &scope, None)
            .await
    }

    /// [`Registry::send`] with an explicit token scope (space-separated scopes for requests
    /// that touch two repositories, as a cross-repository mount) and an optional body, made
    /// afresh for every attempt.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send_scoped(
        &self,
        ep: &Endpoint,
        target: &Target<'_>,
        method: Method,
        url: Url,
        headers: HeaderMap,
        small: bool,
        scope: &str,
        body: Option<BodyFactory<'_>>,
    ) -> Result<Response, Attempt> {
        let client = self
            .client_for(Some(ep), &ep.host)
            .map_err(Attempt::Fatal)?;
        let scope = scope.to_string();
        let mut reauthed = false;
        loop {
            let challenge = self.inner.challenges.lock().get(&ep.host).cloned();
            let auth = match &challenge {
                Some(c) => self.authorization(ep, target, c, &scope).await?,
                None => None,
            };
            let mut req = client
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            for (k, v) in &ep.headers {
                req = req.header(k.as_str(), v.as_str());
            }
            if let Some(a) = &auth {
                req = req.header(header::AUTHORIZATION, a.as_str());
            }
            if let Some(make) = body {
                req = req.body(make().map_err(Attempt::Fatal)?);
            }
            if small {
                req = req.timeout(self.inner.config.request_timeout);
            }
            self.inner.requests.fetch_add(1, Ordering::Relaxed);
            let resp = req
                .send()
                .await
                .map_err(|e| transport_error(e, &ep.host, &target.what, 1))?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return classify_status(resp, &ep.host, &target.what).await;
            }
            let header_challenge = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_challenge);
            if reauthed || header_challenge.is_none() {
                let detail = error_detail(resp).await;
                let creds = self
                    .credentials(&ep.host, target.reference.registry())
                    .await
                    .map_err(Attempt::Fatal)?;
                let hint = match creds {
                    None => format!("{detail}; no credentials found for {}: log in with `docker login {}` or `podman login {}`", ep.host, ep.host, ep.host),
                    Some(c) => format!("{detail}; the credentials of user {:?} for {} were rejected or lack access to this repository", c.username, ep.host),
                };
                return Err(Attempt::Fatal(Error::Unauthorized {
                    host: ep.host.clone(),
                    repository: target.reference.repository().to_string(),
                    detail: hint,
                }));
            }
            reauthed = true;
            if let Some(Challenge::Bearer { realm, service, .. }) = &challenge {
                self.inner.tokens.invalidate(&TokenKey {
                    realm: realm.clone(),
                    service: service.clone().unwrap_or_default(),
                    scope: scope.clone(),
                });
            }
            if let Some(c) = header_challenge {
                self.inner.challenges.lock().insert(ep.host.clone(), c);
            }
        }
    }

    /// The `Authorization` value for a request under `challenge`, fetching a token if needed.
    async fn authorization(
        &self,
        ep: &Endpoint,
        target: &Target<'_>,
        challenge: &Challenge,
        scope: &str,
    ) -> Result<Option<String>, Attempt> {
        let creds = self
            .credentials(&ep.host, target.reference.registry())
            .await
            .map_err(Attempt::Fatal)?;
        match challenge {
            Challenge::Basic { .. } => Ok(creds.map(|c| c.basic_header_value())),
            Challenge::Bearer { realm, service, .. } => {
                let key = TokenKey {
                    realm: realm.clone(),
                    service: service.clone().unwrap_or_default(),
                    scope: scope.to_string(),
                };
                if let Some(t) = self.inner.tokens.get(&key) {
                    return Ok(Some(format!("Bearer {t}")));
                }
                let token = self.fetch_token(ep, target, &key, creds.as_ref()).await?;
                Ok(token.map(|t| format!("Bearer {t}")))
            }
        }
    }

    /// Asks a token server for a token (GET with Basic credentials, or the OAuth2 refresh-token
    /// POST when the credential is an identity token). Anonymous when there are no credentials.
    async fn fetch_token(
        &self,
        ep: &Endpoint,
        target: &Target<'_>,
        key: &TokenKey,
        creds: Option<&Credentials>,
    ) -> Result<Option<String>, Attempt> {
        let realm = Url::parse(&key.realm).map_err(|e| {
            Attempt::Fatal(Error::InvalidResponse {
                host: ep.host.clone(),
                what: target.what.clone(),
                detail: format!("token realm {:?} is not a URL: {e}", key.realm),
            })
        })?;
        let realm_host = host_of(&realm);
        let client = self.client_for(None, &realm_host).map_err(Attempt::Fatal)?;
        let what = format!("token for {}", key.scope);
        let req = match creds {
            Some(c) if c.is_identity_token() => {
                let form = [
                    ("grant_type", "refresh_token"),
                    ("refresh_token", c.secret.as_str()),
                    ("service", key.service.as_str()),
                    ("scope", key.scope.as_str()),
                    ("client_id", "lazypull"),
                ];
                client.post(realm.clone()).form(&form)
            }
            other => {
                let mut url = realm.clone();
                {
                    let mut q = url.query_pairs_mut();
                    if !key.service.is_empty() {
                        q.append_pair("service", &key.service);
                    }
                    // One `scope` parameter per scope, as the token specification has it (a
                    // cross-repository mount asks for two repositories).
                    for scope in key.scope.split_whitespace() {
                        q.append_pair("scope", scope);
                    }
                }
                let req = client.get(url);
                match other {
                    Some(c) => req.header(header::AUTHORIZATION, c.basic_header_value()),
                    None => req,
                }
            }
        };
        self.inner.token_requests.fetch_add(1, Ordering::Relaxed);
        let resp = req
            .timeout(self.inner.config.request_timeout)
            .send()
            .await
            .map_err(|e| transport_error(e, &realm_host, &what, 1))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let detail = match creds {
                Some(c) => format!(
                    "the token server {realm_host} rejected the credentials of user {:?}; check `docker login {}`",
                    c.username,
                    target.reference.registry()
                ),
                None => format!(
                    "the token server {realm_host} requires credentials and none were found for {}; log in with `docker login` or `podman login`",
                    target.reference.registry()
                ),
            };
            return Err(Attempt::Fatal(Error::Unauthorized {
                host: ep.host.clone(),
                repository: target.reference.repository().to_string(),
                detail,
            }));
        }
        let resp = classify_status(resp, &realm_host, &what).await?;
        if !resp.status().is_success() {
            return Err(Attempt::from(status_error(resp, &realm_host, &what).await));
        }
        let body = read_limited(resp, 1 << 20, &realm_host, &what)
            .await
            .map_err(Attempt::from)?;
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            Attempt::Fatal(Error::InvalidResponse {
                host: realm_host.clone(),
                what: what.clone(),
                detail: format!("token response is not JSON: {e}"),
            })
        })?;
        let (token, lifetime) = parsed.into_token().ok_or_else(|| {
            Attempt::Fatal(Error::InvalidResponse {
                host: realm_host.clone(),
                what: what.clone(),
                detail: "token response has no token".into(),
            })
        })?;
        self.inner.tokens.put(key.clone(), token.clone(), lifetime);
        Ok(Some(token))
    }

    /// Credentials for an endpoint host (falling back to the registry's name for mirrors),
    /// looked up once per host.
    async fn credentials(&self, host: &str, registry: &str) -> Result<Option<Credentials>, Error> {
        if let Some(c) = self.inner.creds.lock().get(host) {
            return Ok(c.clone());
        }
        let store = self.inner.config.credentials.clone();
        let (h, r) = (host.to_string(), registry.to_string());
        let found = tokio::task::spawn_blocking(move || -> Result<Option<Credentials>, Error> {
            match store.lookup(&h)? {
                Some(c) => Ok(Some(c)),
                None if h != r => Ok(store.lookup(&r)?),
                None => Ok(None),
            }
        })
        .await
        .map_err(|e| Error::Io {
            what: "credential lookup".into(),
            detail: e.to_string(),
        })??;
        self.inner
            .creds
            .lock()
            .insert(host.to_string(), found.clone());
        Ok(found)
    }

    /// The HTTP client for an endpoint's TLS settings (shared per host so connections pool).
    pub(crate) fn client_for(
        &self,
        ep: Option<&Endpoint>,
        host: &str,
    ) -> Result<reqwest::Client, Error> {
        let key = match ep {
            Some(_) => format!("ep:{host}"),
            None => "plain".to_string(),
        };
        if let Some(c) = self.inner.clients.lock().get(&key) {
            return Ok(c.clone());
        }
        let cfg = &self.inner.config;
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(cfg.connect_timeout)
            .read_timeout(cfg.idle_timeout)
            .tcp_nodelay(true)
            .pool_max_idle_per_host(32)
            .user_agent(cfg.user_agent.clone());
        if let Some(ep) = ep {
            let tls_err = |path: &Path, e: String| Error::Io {
                what: format!("TLS setting {} for {}", path.display(), ep.host),
                detail: e,
            };
            if ep.skip_verify {
                b = b.danger_accept_invalid_certs(true);
            }
            for ca in &ep.ca {
                let pem = std::fs::read(ca).map_err(|e| tls_err(ca, e.to_string()))?;
                for cert in reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| tls_err(ca, e.to_string()))?
                {
                    b = b.add_root_certificate(cert);
                }
            }
            if let Some((cert, key)) = ep.client_cert.first() {
                let mut pem = std::fs::read(cert).map_err(|e| tls_err(cert, e.to_string()))?;
                if let Some(key) = key {
                    pem.extend(std::fs::read(key).map_err(|e| tls_err(key, e.to_string()))?);
                }
                let id =
                    reqwest::Identity::from_pem(&pem).map_err(|e| tls_err(cert, e.to_string()))?;
                b = b.identity(id);
            }
        }
        let client = b.build().map_err(|e| Error::Io {
            what: format!("HTTP client for {host}"),
            detail: e.without_url().to_string(),
        })?;
        self.inner.clients.lock().insert(key, client.clone());
        Ok(client)
    }
}

pub(crate) fn join(ep: &Endpoint, path: &str) -> Url {
    let mut url = ep.base.clone();
    let base = url.path().trim_end_matches('/').to_string();
    url.set_path(&format!("{base}/{path}"));
    url
}

pub(crate) fn host_of(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => "unknown host".to_string(),
    }
}

fn verify(digest: &Digest, data: &[u8], what: &str) -> Result<(), Error> {
    let mut v = Verifier::new(digest.algorithm());
    v.update(data);
    let actual = v.finish();
    if actual == *digest {
        Ok(())
    } else {
        Err(Error::DigestMismatch {
            what: what.to_string(),
            expected: Box::new(*digest),
            actual: Box::new(actual),
        })
    }
}

/// Parses the first byte position of `Content-Range: bytes START-END/TOTAL`.
fn content_range_start(v: &str) -> Option<u64> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    rest.split('-').next()?.trim().parse().ok()
}

/// Maps a transport failure to a retryable error; the URL (which may carry a signed query) is
/// left out.
pub(crate) fn transport_error(e: reqwest::Error, host: &str, what: &str, attempts: u32) -> Attempt {
    let timeout = e.is_timeout();
    let mut causes = String::new();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        causes.push_str(": ");
        causes.push_str(&s.to_string());
        source = s.source();
    }
    let detail = format!("{}{causes}", e.without_url());
    if timeout {
        Attempt::Retry(
            Error::Timeout {
                host: host.to_string(),
                what: format!("fetching {what}"),
            },
            None,
        )
    } else {
        Attempt::Retry(
            Error::Unreachable {
                host: host.to_string(),
                detail,
                attempts,
            },
            None,
        )
    }
}

/// A 416 answer to a range the caller took from the manifest's size: the registry's copy of
/// the blob is shorter than the manifest says.
fn truncated_on_416(a: Attempt, what: &str, offset: u64) -> Attempt {
    match a {
        Attempt::Fatal(Error::Status {
            host, status: 416, ..
        })
        | Attempt::Retry(
            Error::Status {
                host, status: 416, ..
            },
            _,
        ) => Attempt::Fatal(Error::BlobTruncated {
            host,
            what: what.to_string(),
            offset,
        }),
        a => a,
    }
}

/// A failure while a response body streams in: the registry answered, so a body cut short is
/// reported as such (retried, like any transient failure), not as an unreachable registry;
/// a stall stays a timeout.
fn body_error(
    e: reqwest::Error,
    host: &str,
    what: &str,
    got: u64,
    expected: Option<u64>,
) -> Attempt {
    match expected {
        Some(expected) if !e.is_timeout() => Attempt::Retry(
            Error::Truncated {
                host: host.to_string(),
                what: what.to_string(),
                got,
                expected,
            },
            None,
        ),
        _ => transport_error(e, host, what, 1),
    }
}

/// Passes successes, redirects and final statuses through; turns 429 and 5xx into retries.
pub(crate) async fn classify_status(
    resp: Response,
    host: &str,
    what: &str,
) -> Result<Response, Attempt> {
    let status = resp.status();
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        let after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let detail = error_detail(resp).await;
        return Err(Attempt::Retry(
            Error::Status {
                host: host.to_string(),
                status: status.as_u16(),
                what: what.to_string(),
                detail,
            },
            after,
        ));
    }
    Ok(resp)
}

/// The error for a final non-success status.
pub(crate) async fn status_error(resp: Response, host: &str, what: &str) -> Error {
    let status = resp.status();
    let detail = error_detail(resp).await;
    match status {
        StatusCode::NOT_FOUND => Error::NotFound {
            host: host.to_string(),
            what: what.to_string(),
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Error::Unauthorized {
            host: host.to_string(),
            repository: what.to_string(),
            detail,
        },
        _ => Error::Status {
            host: host.to_string(),
            status: status.as_u16(),
            what: what.to_string(),
            detail,
        },
    }
}

/// A short, printable excerpt of an error body (registries send JSON `errors` arrays).
pub(crate) async fn error_detail(resp: Response) -> String {
    let status = resp.status();
    let body = read_limited(resp, 4096, "", "").await.unwrap_or_default();
    #[derive(serde::Deserialize)]
    struct Errs {
        errors: Vec<E>,
    }
    #[derive(serde::Deserialize)]
    struct E {
        code: Option<String>,
        message: Option<String>,
    }
    if let Ok(errs) = serde_json::from_slice::<Errs>(&body) {
        let parts: Vec<String> = errs
            .errors
            .iter()
            .map(|e| {
                format!(
                    "{}: {}",
                    e.code.as_deref().unwrap_or("ERROR"),
                    e.message.as_deref().unwrap_or("")
                )
            })
            .collect();
        if !parts.is_empty() {
            return parts.join("; ");
        }
    }
    let text: String = String::from_utf8_lossy(&body)
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    if text.trim().is_empty() {
        status.to_string()
    } else {
        format!("{status}: {}", text.trim())
    }
}

/// Reads a whole body, refusing more than `limit` bytes.
async fn read_limited(resp: Response, limit: u64, host: &str, what: &str) -> Result<Bytes, Error> {
    if let Some(len) = resp.content_length() {
        if len > limit {
            return Err(Error::InvalidResponse {
                host: host.to_string(),
                what: what.to_string(),
                detail: format!("{len} bytes is more than the {limit} allowed"),
            });
        }
    }
    let mut buf = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| match transport_error(e, host, what, 1) {
            Attempt::Retry(e, _) | Attempt::Fatal(e) => e,
        })?;
        if buf.len() as u64 + piece.len() as u64 > limit {
            return Err(Error::InvalidResponse {
                host: host.to_string(),
                what: what.to_string(),
                detail: format!("body larger than the {limit} bytes allowed"),
            });
        }
        buf.extend_from_slice(&piece);
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(content_range_start("bytes 100-199/1000"), Some(100));
        assert_eq!(content_range_start("bytes 0-0/*"), Some(0));
        assert_eq!(content_range_start("items 1-2/3"), None);
    }
}
