//! lazypull-fs: image layer formats and the lazy FUSE filesystem.
//!
//! [`toc`] is the one in-memory model of a layer that every format reader fills and the
//! filesystem serves from.

pub mod toc;
