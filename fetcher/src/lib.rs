//! lazypull-fetcher: everything that talks to registries and keeps their bytes locally.
//!
//! The crate knows nothing of filesystems. It resolves image references to manifests, reads
//! blobs (whole and by range) with authentication, retries and per-host configuration
//! ([`registry::Registry`]), pushes blobs and manifests for `lazypull convert`
//! ([`push`]), stores and finds artifacts next to an image ([`referrers`]), schedules ranged reads by priority with single-flight and merging
//! ([`blob::FetchEngine`]), and stores verified chunks in a content-addressed on-disk cache
//! ([`cache::ChunkCache`]).

pub mod auth;
pub mod blob;
pub mod cache;
pub mod credentials;
pub mod digest;
pub mod error;
pub mod hosts;
pub mod limiter;
pub mod manifest;
pub mod metrics;
pub mod push;
pub mod reference;
pub mod referrers;
pub mod registry;
pub mod retry;

pub use blob::{BlobReader, BlobStats, EngineConfig, FetchEngine, Priority};
pub use cache::{CacheConfig, ChunkCache};
pub use credentials::{CredentialStore, Credentials};
pub use digest::{Algorithm, Digest};
pub use error::Error;
pub use hosts::HostsConfig;
pub use manifest::{FetchedManifest, Manifest, Platform};
pub use push::{BlobPush, PushBlobOptions, PushError};
pub use reference::Reference;
pub use registry::{Registry, RegistryConfig, ResolvedImage};
