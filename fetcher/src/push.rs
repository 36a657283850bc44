//! Pushing to a registry: blob existence checks, cross-repository mounts, monolithic blob
//! uploads streamed from a file, and manifests.
//!
//! Why on top of [`Registry`]: a push needs the same endpoints (`hosts.toml`), TLS settings,
//! credentials, token flow and retries as a pull, only with `push` in the token scope
//! (`repository:NAME:pull,push`). Uploads are monolithic (POST opens an upload session, one PUT
//! carries the whole blob and its digest) because every registry supports that and the blobs
//! `lazypull convert` pushes are complete local files: the body is streamed from the file and
//! never held in memory, and a failed attempt starts again from a fresh session. The registry
//! checks the digest of what it received, so a corrupt upload is refused, never stored.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, Response, StatusCode};
use tokio::io::AsyncReadExt;
use url::Url;

use crate::digest::{Algorithm, Digest, Verifier};
use crate::error::Error;
use crate::hosts::Endpoint;
use crate::reference::Reference;
use crate::registry::{self, Attempt, Registry, Target};

/// Size of the reads that feed an upload body.
const UPLOAD_READ: usize = 256 << 10;

/// Called during an upload with the bytes of the blob sent so far in the current attempt (it
/// starts again from 0 when an attempt is retried), so a terminal can show a bar.
pub type UploadProgress = Arc<dyn Fn(u64) + Send + Sync>;

/// Why a push failed. The messages name the registry, the repository and the object, and say
/// what to do where there is something to do.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// No credentials, wrong credentials, or credentials without push access.
    #[error("unauthorized to push to {repository} on {host}: {detail}")]
    Unauthorized {
        /// Registry host.
        host: String,
        /// The repository pushed to.
        repository: String,
        /// What the registry or token server said, with a hint.
        detail: String,
    },
    /// The registry refused a blob upload (digest mismatch, size limit, invalid upload).
    #[error("registry {host} refused blob {digest} for {repository}: {detail}")]
    BlobRejected {
        /// Registry host.
        host: String,
        /// The repository pushed to.
        repository: String,
        /// The blob.
        digest: Box<Digest>,
        /// The registry's error code and message.
        detail: String,
    },
    /// The registry refused a manifest (unknown blobs, invalid document, unsupported type).
    #[error("registry {host} refused manifest {reference}: {detail}")]
    ManifestRejected {
        /// Registry host.
        host: String,
        /// The manifest's reference (tag or digest).
        reference: String,
        /// The registry's error code and message.
        detail: String,
    },
    /// The registry reports a different digest for what it stored than the content has.
    #[error("registry {host} stored {what} as {actual}, but the content pushed hashes to {expected}; a proxy or the registry altered it")]
    DigestMismatch {
        /// Registry host.
        host: String,
        /// What was pushed.
        what: String,
        /// Digest of the content sent.
        expected: Box<Digest>,
        /// Digest the registry announced.
        actual: Box<Digest>,
    },
    /// The local file to upload could not be read.
    #[error("reading {}: {source}", path.display())]
    LocalFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The reference cannot be pushed to as given.
    #[error("cannot push to {reference}: {detail}")]
    BadReference {
        /// The reference.
        reference: String,
        /// What is wrong.
        detail: String,
    },
    /// Any other registry failure (unreachable, timeout, 5xx after retries, bad response).
    #[error(transparent)]
    Registry(#[from] Error),
}

/// What [`Registry::push_blob_file`] had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobPush {
    /// The repository already had the blob: nothing was sent.
    Exists,
    /// The registry linked the blob from another repository: nothing was sent.
    Mounted,
    /// The blob was uploaded.
    Uploaded,
}

/// Options of [`Registry::push_blob_file`].
#[derive(Clone, Default)]
pub struct PushBlobOptions {
    /// A repository of the same registry that may already hold the blob: try a
    /// cross-repository mount from it before uploading.
    pub mount_from: Option<Reference>,
    /// Progress of the upload, if one happens.
    pub progress: Option<UploadProgress>,
}

impl std::fmt::Debug for PushBlobOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushBlobOptions")
            .field("mount_from", &self.mount_from)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// Where the bytes of an upload come from.
enum Source<'a> {
    File { path: &'a Path, size: u64 },
    Memory(Bytes),
}

impl Source<'_> {
    fn len(&self) -> u64 {
        match self {
            Source::File { size, .. } => *size,
            Source::Memory(b) => b.len() as u64,
        }
    }

    /// A fresh body for one attempt.
    fn body(&self, progress: Option<UploadProgress>) -> Result<reqwest::Body, Error> {
        match self {
            Source::Memory(b) => Ok(reqwest::Body::from(b.clone())),
            Source::File { path, .. } => {
                let file = std::fs::File::open(path).map_err(|e| Error::Io {
                    what: format!("opening {} for upload", path.display()),
                    detail: e.to_string(),
                })?;
                let file = tokio::fs::File::from_std(file);
                let stream = futures::stream::try_unfold(
                    (file, 0u64, progress),
                    |(mut file, sent, progress)| async move {
                        let mut buf = vec![0u8; UPLOAD_READ];
                        let n = file.read(&mut buf).await?;
                        if n == 0 {
                            return Ok::<_, std::io::Error>(None);
                        }
                        buf.truncate(n);
                        let sent = sent + n as u64;
                        if let Some(p) = &progress {
                            p(sent);
                        }
                        Ok(Some((Bytes::from(buf), (file, sent, progress))))
                    },
                );
                Ok(reqwest::Body::wrap_stream(stream))
            }
        }
    }
}

/// The outcome of one upload-session attempt.
enum Session {
    Mounted,
    Uploaded,
    /// A mount was asked for without a body and the registry opened an upload instead.
    NotMounted,
}

fn push_scope(reference: &Reference) -> String {
    format!("repository:{}:pull,push", reference.repository())
}

/// Maps a registry error to the push error a user should see: refusals of access become
/// [`PushError::Unauthorized`] naming the repository pushed to.
fn push_error(e: Error, reference: &Reference) -> PushError {
    match e {
        Error::Unauthorized { host, detail, .. } => PushError::Unauthorized {
            host,
            repository: reference.repository().to_string(),
            detail,
        },
        other => PushError::Registry(other),
    }
}

fn location_of(resp: &Response, host: &str, what: &str) -> Result<Url, Attempt> {
    resp.headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|l| resp.url().join(l).ok())
        .ok_or_else(|| {
            Attempt::Fatal(Error::InvalidResponse {
                host: host.to_string(),
                what: what.to_string(),
                detail: "upload session answer without a valid Location".into(),
            })
        })
}

fn announced_digest(resp: &Response) -> Option<Digest> {
    resp.headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

impl Registry {
    /// The endpoint pushes go to: the first one of the host configuration allowed to push
    /// (normally the registry itself; mirrors are for pulling).
    fn push_endpoint(&self, reference: &Reference) -> Result<Endpoint, PushError> {
        self.endpoints(reference, "push")?
            .into_iter()
            .next()
            .ok_or_else(|| {
                PushError::Registry(Error::NoEndpoint {
                    host: reference.registry().to_string(),
                    capability: "push",
                })
            })
    }

    /// Whether the repository of `reference` has the blob `digest` (HEAD). Lets a push skip
    /// blobs the registry already has.
    pub async fn blob_exists(
        &self,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<bool, PushError> {
        let ep = self.push_endpoint(reference)?;
        let target = Target {
            reference,
            what: format!("blob {digest}"),
        };
        let url = registry::join(&ep, &format!("{}/blobs/{digest}", reference.repository()));
        let scope = push_scope(reference);
        let resp = self
            .retrying(&ep.host, || {
                self.send_scoped(
                    &ep,
                    &target,
                    Method::HEAD,
                    url.clone(),
                    HeaderMap::new(),
                    true,
                    &scope,
                    None,
                )
            })
            .await
            .map_err(|e| push_error(e, reference))?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(push_error(
                registry::status_error(resp, &ep.host, &target.what).await,
                reference,
            )),
        }
    }

    /// Asks the registry to link blob `digest` from repository `from` into the repository of
    /// `reference` without sending it. `Ok(false)` when it cannot (different registry, blob not
    /// there, or the registry does not mount); the caller then uploads.
    pub async fn mount_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        from: &Reference,
    ) -> Result<bool, PushError> {
        if from.registry() != reference.registry() || from.repository() == reference.repository() {
            return Ok(false);
        }
        let outcome = self
            .upload(reference, digest, None, Some(from), None)
            .await?;
        Ok(matches!(outcome, Session::Mounted))
    }

    /// Uploads the file at `path` as blob `digest` of the repository of `reference`; returns
    /// the bytes sent. The file is streamed, not loaded; the registry verifies the digest.
    pub async fn upload_blob_from_file(
        &self,
        reference: &Reference,
        digest: &Digest,
        path: &Path,
    ) -> Result<u64, PushError> {
        let size = file_size(path)?;
        self.upload(
            reference,
            digest,
            Some(Source::File { path, size }),
            None,
            None,
        )
        .await?;
        Ok(size)
    }

    /// Uploads a small blob held in memory (an image config) as blob `digest`.
    pub async fn upload_blob_bytes(
        &self,
        reference: &Reference,
        digest: &Digest,
        data: Bytes,
    ) -> Result<u64, PushError> {
        let len = data.len() as u64;
        self.upload(reference, digest, Some(Source::Memory(data)), None, None)
            .await?;
        Ok(len)
    }

    /// Puts blob `digest` (the file at `path`) into the repository of `reference` the cheapest
    /// way: nothing if it is there already, a cross-repository mount when `opts.mount_from`
    /// names a repository of the same registry that has it, else an upload.
    pub async fn push_blob_file(
        &self,
        reference: &Reference,
        digest: &Digest,
        path: &Path,
        opts: &PushBlobOptions,
    ) -> Result<BlobPush, PushError> {
        if self.blob_exists(reference, digest).await? {
            return Ok(BlobPush::Exists);
        }
        let size = file_size(path)?;
        let from = opts.mount_from.as_ref().filter(|f| {
            f.registry() == reference.registry() && f.repository() != reference.repository()
        });
        let outcome = self
            .upload(
                reference,
                digest,
                Some(Source::File { path, size }),
                from,
                opts.progress.clone(),
            )
            .await?;
        Ok(match outcome {
            Session::Mounted => BlobPush::Mounted,
            Session::Uploaded | Session::NotMounted => BlobPush::Uploaded,
        })
    }

    /// One upload session, retried as a whole: POST (with `mount`/`from` when given), then,
    /// unless the registry mounted the blob, one PUT of the whole body with `?digest=`. Without
    /// a body (a mount-only attempt) an opened session is cancelled.
    async fn upload(
        &self,
        reference: &Reference,
        digest: &Digest,
        source: Option<Source<'_>>,
        mount_from: Option<&Reference>,
        progress: Option<UploadProgress>,
    ) -> Result<Session, PushError> {
        let ep = self.push_endpoint(reference)?;
        let repo = reference.repository();
        let target = Target {
            reference,
            what: format!("upload of blob {digest}"),
        };
        let mut scope = push_scope(reference);
        let mut start = registry::join(&ep, &format!("{repo}/blobs/uploads/"));
        if let Some(from) = mount_from {
            start
                .query_pairs_mut()
                .append_pair("mount", &digest.to_string())
                .append_pair("from", from.repository());
            scope.push_str(&format!(" repository:{}:pull", from.repository()));
        }
        let result = self
            .retrying(&ep.host, || async {
                let mut headers = HeaderMap::new();
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
                let resp = self
                    .send_scoped(
                        &ep,
                        &target,
                        Method::POST,
                        start.clone(),
                        headers,
                        true,
                        &scope,
                        None,
                    )
                    .await?;
                match resp.status() {
                    StatusCode::CREATED if mount_from.is_some() => return Ok(Session::Mounted),
                    StatusCode::ACCEPTED => {}
                    _ => {
                        return Err(Attempt::from(
                            registry::status_error(resp, &ep.host, &target.what).await,
                        ))
                    }
                }
                let location = location_of(&resp, &ep.host, &target.what)?;
                let Some(source) = &source else {
                    // A mount-only attempt: the registry could not mount; drop the session.
                    let _ = self
                        .send_scoped(
                            &ep,
                            &target,
                            Method::DELETE,
                            location,
                            HeaderMap::new(),
                            true,
                            &scope,
                            None,
                        )
                        .await;
                    return Ok(Session::NotMounted);
                };
                let mut put = location;
                put.query_pairs_mut()
                    .append_pair("digest", &digest.to_string());
                let mut headers = HeaderMap::new();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(source.len()));
                let make = || source.body(progress.clone());
                let put_host = registry::host_of(&put);
                let resp = if put_host == ep.host {
                    self.send_scoped(
                        &ep,
                        &target,
                        Method::PUT,
                        put,
                        headers,
                        false,
                        &scope,
                        Some(&make),
                    )
                    .await?
                } else {
                    // An upload URL on another host (a storage backend): no registry
                    // credentials go there.
                    let client = self.client_for(None, &put_host).map_err(Attempt::Fatal)?;
                    let resp = client
                        .put(put)
                        .headers(headers)
                        .body(make().map_err(Attempt::Fatal)?)
                        .send()
                        .await
                        .map_err(|e| registry::transport_error(e, &put_host, &target.what, 1))?;
                    registry::classify_status(resp, &put_host, &target.what).await?
                };
                match resp.status() {
                    s if s.is_success() => {
                        if let Some(actual) = announced_digest(&resp) {
                            if actual != *digest {
                                return Err(Attempt::Fatal(Error::DigestMismatch {
                                    what: format!("uploaded blob in {repo} on {put_host}"),
                                    expected: Box::new(*digest),
                                    actual: Box::new(actual),
                                }));
                            }
                        }
                        Ok(Session::Uploaded)
                    }
                    // The session expired or was lost (registry restarted): start again.
                    StatusCode::NOT_FOUND => {
                        let e = registry::status_error(resp, &put_host, &target.what).await;
                        Err(Attempt::Retry(e, None))
                    }
                    _ => Err(Attempt::Fatal(
                        registry::status_error(resp, &put_host, &target.what).await,
                    )),
                }
            })
            .await;
        result.map_err(|e| match e {
            Error::Status {
                host,
                status: 400..=499,
                detail,
                ..
            } => PushError::BlobRejected {
                host,
                repository: repo.to_string(),
                digest: Box::new(*digest),
                detail,
            },
            Error::DigestMismatch {
                what,
                expected,
                actual,
            } if what.starts_with("uploaded blob") => PushError::DigestMismatch {
                host: ep.host.clone(),
                what,
                expected,
                actual,
            },
            e => push_error(e, reference),
        })
    }

    /// Stores `bytes` as a manifest (or index) of media type `media_type` under `reference`
    /// (its tag, or its digest when pinned) and returns the manifest's digest. Every blob and
    /// child manifest it refers to must be in the repository already.
    pub async fn put_manifest(
        &self,
        reference: &Reference,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<Digest, PushError> {
        let algorithm = reference
            .digest()
            .map(|d| d.algorithm())
            .unwrap_or(Algorithm::Sha256);
        let mut v = Verifier::new(algorithm);
        v.update(bytes);
        let expected = v.finish();
        if let Some(pinned) = reference.digest() {
            if *pinned != expected {
                return Err(PushError::BadReference {
                    reference: reference.to_string(),
                    detail: format!(
                        "the manifest hashes to {expected}, not to the digest the reference names"
                    ),
                });
            }
        }
        let content_type =
            HeaderValue::from_str(media_type).map_err(|_| PushError::BadReference {
                reference: reference.to_string(),
                detail: format!("media type {media_type:?} is not a valid header value"),
            })?;
        let ep = self.push_endpoint(reference)?;
        let mref = reference.manifest_reference();
        let target = Target {
            reference,
            what: format!("manifest {}", reference.familiar()),
        };
        let url = registry::join(&ep, &format!("{}/manifests/{mref}", reference.repository()));
        let scope = push_scope(reference);
        let body = Bytes::copy_from_slice(bytes);
        let make = || Ok(reqwest::Body::from(body.clone()));
        let resp = self
            .retrying(&ep.host, || async {
                let mut headers = HeaderMap::new();
                headers.insert(header::CONTENT_TYPE, content_type.clone());
                let resp = self
                    .send_scoped(
                        &ep,
                        &target,
                        Method::PUT,
                        url.clone(),
                        headers,
                        true,
                        &scope,
                        Some(&make),
                    )
                    .await?;
                if resp.status().is_success() {
                    Ok(Ok(resp))
                } else {
                    let status = resp.status();
                    let e = registry::status_error(resp, &ep.host, &target.what).await;
                    if status.is_client_error() {
                        Ok(Err(e))
                    } else {
                        Err(Attempt::from(e))
                    }
                }
            })
            .await
            .map_err(|e| push_error(e, reference))?;
        let resp = match resp {
            Ok(r) => r,
            Err(Error::Status { host, detail, .. }) => {
                return Err(PushError::ManifestRejected {
                    host,
                    reference: reference.familiar(),
                    detail,
                })
            }
            Err(e) => return Err(push_error(e, reference)),
        };
        if let Some(actual) = announced_digest(&resp) {
            if actual.algorithm() == expected.algorithm() && actual != expected {
                return Err(PushError::DigestMismatch {
                    host: ep.host.clone(),
                    what: format!("manifest {}", reference.familiar()),
                    expected: Box::new(expected),
                    actual: Box::new(actual),
                });
            }
        }
        Ok(expected)
    }
}

fn file_size(path: &Path) -> Result<u64, PushError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|source| PushError::LocalFile {
            path: path.to_path_buf(),
            source,
        })
}
