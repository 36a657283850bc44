//! The error type of registry operations.
//!
//! Messages are written for the person at the terminal: they name the host and the object, say
//! what failed and, where there is one, what to do. They never contain credentials, tokens or
//! signed URLs (query strings are stripped before a URL reaches an error).
//!
//! The type is `Clone` because one failed fetch is reported to every reader that was waiting on
//! it (single-flight), so sources are kept as text.

use std::sync::Arc;

use crate::credentials::CredentialError;
use crate::digest::Digest;
use crate::hosts::HostsError;

/// Why a registry operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The registry could not be reached (DNS, refused, reset, TLS) after every retry.
    #[error("cannot reach registry {host}: {detail} (after {attempts} attempts); check that it is up and reachable, and the host's hosts.toml")]
    Unreachable {
        /// Registry or mirror host.
        host: String,
        /// What the transport reported.
        detail: String,
        /// How many attempts were made.
        attempts: u32,
    },
    /// The registry stopped sending for longer than the idle timeout.
    #[error("registry {host} timed out while {what} (no data within the configured idle timeout)")]
    Timeout {
        /// Registry host.
        host: String,
        /// The operation that stalled.
        what: String,
    },
    /// Authentication failed: no or wrong credentials, or insufficient scope.
    #[error("unauthorized: registry {host} refused access to {repository}: {detail}")]
    Unauthorized {
        /// Registry host.
        host: String,
        /// Repository the access was for.
        repository: String,
        /// What the registry or token server said, plus a hint.
        detail: String,
    },
    /// Manifest, tag or blob does not exist.
    #[error("not found: {what} in {host}")]
    NotFound {
        /// Registry host.
        host: String,
        /// The missing object (`manifest busybox:1.36`, `blob sha256:...`).
        what: String,
    },
    /// The registry answered with a status lazypull cannot act on.
    #[error("registry {host} answered {status} to {what}: {detail}")]
    Status {
        /// Registry host.
        host: String,
        /// HTTP status code.
        status: u16,
        /// The request (`GET blob sha256:...`).
        what: String,
        /// Body excerpt or error code from the registry.
        detail: String,
    },
    /// Downloaded content does not hash to the digest it was requested by.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}; the registry or a proxy altered the data, nothing was kept")]
    DigestMismatch {
        /// What was fetched.
        what: String,
        /// The digest asked for.
        expected: Box<Digest>,
        /// The digest of what arrived.
        actual: Box<Digest>,
    },
    /// The registry's answer ended before the whole object arrived: the stored blob is
    /// shorter than the manifest says, or the connection was cut mid-body. Distinct from
    /// [`Error::Unreachable`]: the registry did answer.
    #[error("registry {host} sent only {got} of the {expected} bytes of {what}: the response was cut short (a truncated blob in the registry, or a proxy or connection that ended the body early)")]
    Truncated {
        /// Registry host.
        host: String,
        /// The object (`blob sha256:...`, with the range when it was a range read).
        what: String,
        /// Bytes received.
        got: u64,
        /// Bytes expected (the manifest's size, or the response's own length).
        expected: u64,
    },
    /// A range inside the size the manifest gives was refused as not satisfiable (416): the
    /// registry holds fewer bytes of the blob than the manifest says.
    #[error("registry {host} holds fewer bytes of {what} than the manifest says (bytes from {offset} are not satisfiable): the blob in the registry is truncated; push the image again")]
    BlobTruncated {
        /// Registry host.
        host: String,
        /// The object and range.
        what: String,
        /// Start of the refused range.
        offset: u64,
    },
    /// The response was malformed (short body, bad Content-Range, bad JSON...).
    #[error("invalid response from {host} for {what}: {detail}")]
    InvalidResponse {
        /// Registry host.
        host: String,
        /// The request.
        what: String,
        /// What was wrong.
        detail: String,
    },
    /// A manifest or index could not be understood.
    #[error("invalid manifest {reference}: {detail}")]
    Manifest {
        /// Reference or digest of the manifest.
        reference: String,
        /// What was wrong.
        detail: String,
    },
    /// An index has no manifest for the wanted platform.
    #[error("{reference} has no image for platform {wanted}; available: {available}")]
    NoPlatform {
        /// The image reference.
        reference: String,
        /// The platform asked for.
        wanted: String,
        /// The platforms the index lists.
        available: String,
    },
    /// A range outside the blob was asked for.
    #[error("range {offset}+{len} is outside blob {digest} of {size} bytes")]
    OutOfRange {
        /// The blob.
        digest: Digest,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Blob size.
        size: u64,
    },
    /// No endpoint of the host configuration may serve this kind of request.
    #[error(
        "no endpoint configured for {host} can {capability}; check its hosts.toml capabilities"
    )]
    NoEndpoint {
        /// Registry host.
        host: String,
        /// `pull` or `resolve`.
        capability: &'static str,
    },
    /// Credentials could not be read.
    #[error(transparent)]
    Credentials(Arc<CredentialError>),
    /// hosts.toml could not be read.
    #[error(transparent)]
    Hosts(Arc<HostsError>),
    /// Local I/O (writing a downloaded blob).
    #[error("{what}: {detail}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        detail: String,
    },
    /// Reading a blob kept in a local file failed (deleted, truncated, disk error). Separate
    /// from [`Error::Io`] so callers can tell a broken local copy (rebuild it) from a failed
    /// download.
    #[error("reading {len} bytes at offset {offset} of the local copy of blob {digest} ({path}): {detail}")]
    LocalRead {
        /// The blob (boxed: digests are large and errors should stay small).
        digest: Box<Digest>,
        /// The local file.
        path: String,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// The OS error.
        detail: String,
    },
}

impl Error {
    /// Whether retrying the same request later might succeed (used by callers that fall back).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Unreachable { .. }
                | Error::Timeout { .. }
                | Error::Truncated { .. }
                | Error::Status { status: 500.., .. }
        )
    }
}

impl From<CredentialError> for Error {
    fn from(e: CredentialError) -> Self {
        Error::Credentials(Arc::new(e))
    }
}

impl From<HostsError> for Error {
    fn from(e: HostsError) -> Self {
        Error::Hosts(Arc::new(e))
    }
}
