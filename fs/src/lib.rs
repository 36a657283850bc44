//! lazypull-fs: image layer formats and the lazy FUSE filesystem.
//!
//! - [`toc`]: the one in-memory model of a layer that every format reader fills and the
//!   filesystem serves from.
//! - [`estargz`]: the eStargz reader (footer + TOC -> model) and writer.
//! - [`zstd_chunked`]: the zstd:chunked reader (annotations or footer + TOC -> model) and
//!   writer.
//! - [`background`]: the background fill's share of the link (it yields to reads someone
//!   waits on and to prefetches).
//! - [`chunks`]: the data path: cache, fetch, decompress, verify; read-ahead, prefetch, fill.
//! - [`fuse`]: the read-only FUSE filesystem of one layer (async reads, passthrough).
//! - [`open`]: opening a registry layer: lazily (eStargz, zstd:chunked) or by a verified whole
//!   fetch.
//! - [`takeover`]: serving a live FUSE connection a killed daemon left (restart without
//!   breaking running containers).
//! - [`local`]: the whole-fetch path: download, convert once to a local eStargz copy, serve.

pub mod background;
pub mod chunks;
pub mod estargz;
pub mod fuse;
pub mod local;
pub mod metrics;
pub mod open;
pub mod takeover;
pub mod toc;
pub mod zstd_chunked;
