//! Test harness for lazypull: real parts started and torn down by the tests themselves.
//!
//! - [`registry::TestRegistry`]: a real `docker-registry` (CNCF distribution 2.8) process on a
//!   free loopback port with its own config and storage in a temp dir, optionally behind htpasswd
//!   or token authentication. Killed by PID and cleaned up on drop (also when a test panics).
//! - [`token::TokenIssuer`]: a Docker registry token server (ES256 JWTs with an `x5c` chain that
//!   the real registry verifies against its `rootcertbundle`).
//! - [`proxy::CountingProxy`]: an HTTP/1.1 reverse proxy that records every request and can add
//!   latency, throttle bandwidth, drop `Range` headers, reject multi-range requests, inject
//!   failures and abort bodies.
//! - [`push::Pusher`]: puts blobs, manifests, images and indexes into a registry over HTTP.
//! - [`util`]: free ports, deterministic random data, gzip.
//!
//! Everything here may panic with a descriptive message on failure: it is test code.

pub mod containerd;
pub mod driver;
pub mod images;
pub mod podman;
pub mod proxy;
pub mod push;
pub mod registry;
pub mod runnable;
mod server;
pub mod token;
pub mod tree;
pub mod util;

pub use containerd::TestContainerd;
pub use driver::Lazypull;
pub use lazypull_fetcher::Digest;
pub use podman::Podman;
pub use proxy::{BodyOutcome, CountingProxy, RecordedRequest};
pub use push::{
    ImageSpec, Layer, ManifestFormat, PushAuth, PushedImage, Pusher, MEDIA_TYPE_DOCKER_CONFIG,
    MEDIA_TYPE_DOCKER_LAYER_GZIP, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_LAYER, MEDIA_TYPE_OCI_LAYER_GZIP,
    MEDIA_TYPE_OCI_LAYER_ZSTD, MEDIA_TYPE_OCI_MANIFEST,
};
pub use registry::{RegistryAuth, TestRegistry};
pub use token::{Access, CredentialCheck, TokenIssuer, TokenIssuerConfig, TokenRequest};
pub use util::{free_port, gzip, pid_alive, random_bytes, Waiting};
