//! eStargz: the lazily pullable gzip layer format of containerd's stargz-snapshotter.
//!
//! An eStargz blob is an ordinary `tar.gz` (any tar + gzip tool unpacks it) built so that each
//! file chunk starts its own gzip member; a JSON table of contents (TOC) in the tar entry
//! `stargz.index.json` near the end says where every chunk starts, and a 51-byte footer (an
//! empty gzip member whose Extra field holds `%016xSTARGZ`) says where the TOC starts. A reader
//! therefore needs only the blob's tail to mount the layer and then fetches chunks on demand.
//!
//! - [`reader`]: pure, synchronous parsing of a blob's tail into a verified [`crate::toc::Layer`]
//!   (the caller does the I/O, so the same code serves HTTP ranges, files and tests).
//! - [`writer`]: streaming conversion of a tar stream into an eStargz blob (`lazypull convert`
//!   and the tests).
//!
//! Facts follow containerd/stargz-snapshotter `docs/estargz.md` and its `estargz` Go package.

pub mod reader;
pub mod writer;

pub use crate::toc::json::{
    Prefetch, ReaderConfig, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_DIGEST_ANNOTATION,
};
pub use reader::{
    open_toc, parse_footer, tail_read_len, Footer, OpenedToc, FOOTER_SIZE, LEGACY_FOOTER_SIZE,
};
pub use writer::{write_estargz, WriterOptions, WrittenLayer};

use lazypull_fetcher::Digest;

use crate::toc::json::TocJsonError;

/// Manifest layer annotation with the size of the uncompressed tar, which eStargz does not
/// record inside the blob.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";

/// Name of the tar entry holding the TOC JSON; fixed by the format so readers can find it.
pub const TOC_TAR_NAME: &str = "stargz.index.json";

/// Size of the footer of a layer whose TOC lives outside the blob (`STARGZEXTERNALTOC`).
pub const EXTERNAL_TOC_FOOTER_SIZE: usize = 46;

/// Content of the landmark files (one byte, `0x0f`), as the format prescribes.
const LANDMARK_CONTENTS: u8 = 0x0f;

/// Why an eStargz blob could not be read or written. Every variant names the entry, offset or
/// limit involved, because these errors end up in logs of a daemon mounting someone else's
/// image, where "invalid TOC" alone would be useless.
#[derive(Debug, thiserror::Error)]
pub enum EstargzError {
    /// The tail is shorter than the smallest footer.
    #[error("blob tail of {len} bytes is too short for an eStargz footer (at least {min} bytes are needed)")]
    TruncatedFooter {
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        min: usize,
    },
    /// The last bytes are not an eStargz (or legacy stargz) footer.
    #[error("not an eStargz blob: invalid footer: {detail}")]
    BadFooter {
        /// What is wrong.
        detail: String,
    },
    /// The footer says the TOC is stored outside the blob, which is not supported yet.
    #[error("this layer keeps its TOC outside the blob (external-TOC eStargz, footer ends in STARGZEXTERNALTOC); lazypull does not support external TOCs yet, so the layer must be pulled normally")]
    ExternalTocUnsupported,
    /// The caller's tail does not end at the blob's end.
    #[error(
        "tail of {tail_len} bytes at offset {tail_start} does not end at the blob size {blob_size}"
    )]
    BadTail {
        /// Offset of the tail's first byte.
        tail_start: u64,
        /// Length of the tail.
        tail_len: usize,
        /// Blob size.
        blob_size: u64,
    },
    /// The footer points past the end of the blob.
    #[error("footer points to the TOC at offset {toc_offset}, past the end of the {blob_size}-byte blob")]
    TocOffsetOutOfRange {
        /// Offset from the footer.
        toc_offset: u64,
        /// Blob size.
        blob_size: u64,
    },
    /// The footer points into itself.
    #[error("footer points to the TOC at offset {toc_offset}, inside the {footer_len}-byte footer starting at offset {footer_start}")]
    TocOffsetInFooter {
        /// Offset from the footer.
        toc_offset: u64,
        /// Where the footer starts.
        footer_start: u64,
        /// Footer length.
        footer_len: usize,
    },
    /// The tail given does not include the whole TOC: read `[from, blob_size)` and call again.
    #[error(
        "the blob tail does not reach back to the TOC; read the blob again from offset {from}"
    )]
    NeedMore {
        /// Offset to read from.
        from: u64,
    },
    /// A size limit of [`ReaderConfig`] was exceeded.
    #[error("{what} exceeds the limit of {limit} bytes ({size} bytes seen)")]
    TooLarge {
        /// What was measured.
        what: &'static str,
        /// Its size, or how far reading got before stopping.
        size: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The TOC member is not valid gzip.
    #[error("TOC gzip member at offset {offset} is invalid: {detail}")]
    TocGzip {
        /// Blob offset of the member.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// The TOC member does not hold a `stargz.index.json` tar entry.
    #[error(
        "TOC member at offset {offset} does not hold a valid {TOC_TAR_NAME} tar entry: {detail}"
    )]
    TocTar {
        /// Blob offset of the member.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// The TOC JSON does not hash to the digest from the manifest.
    #[error("TOC digest mismatch: the manifest annotation says {expected}, the TOC JSON hashes to {actual}")]
    TocDigestMismatch {
        /// Digest from the manifest (boxed: digests are large and errors should stay small).
        expected: Box<Digest>,
        /// Digest of the TOC received.
        actual: Box<Digest>,
    },
    /// The layer model rejected an entry (bad path, chunks not covering the file, missing
    /// [`WriterOptions`] are unusable.
    #[error("invalid eStargz writer options: {0}")]
    BadOptions(String),
    /// An input tar entry cannot be represented in eStargz.
    #[error("input tar entry {path:?}: {detail}")]
    BadInput {
        /// The entry's path (lossy).
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// The input is not a readable tar stream.
    #[error("reading the input tar{at}: {source}")]
    InputTar {
        /// Which entry, when known.
        at: String,
        /// The tar reader's error.
        source: std::io::Error,
    },
    /// Writing the output (or the spool file) failed.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The TOC JSON or one of its entries was refused.
    #[error(transparent)]
    Toc(#[from] TocJsonError),
}

/// Builders shared by the reader's and writer's tests.
#[cfg(test)]
pub(crate) mod testutil {
    use std::io::Write;

    use flate2::write::GzEncoder;
    use flate2::Compression;

    /// A gzip member holding `data`.
    pub fn gzip(data: &[u8]) -> Vec<u8> {
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    /// A tar stream with one regular file `name` holding `data`, and the end-of-archive blocks.
    pub fn tar_file(name: &str, data: &[u8]) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
        out
    }

    /// A blob: `prefix_len` bytes of filler (the "data area"), the TOC member `member`, and a
    /// footer pointing at it.
    pub fn blob_with_member(prefix_len: usize, member: &[u8]) -> Vec<u8> {
        let mut blob = vec![0u8; prefix_len];
        let toc_offset = blob.len() as u64;
        blob.extend_from_slice(member);
        blob.extend_from_slice(&super::writer::footer_bytes(toc_offset));
        blob
    }

    /// A blob whose TOC is `json`, after 4096 bytes of data area.
    pub fn blob_with_toc(json: &str) -> Vec<u8> {
        blob_with_member(4096, &gzip(&tar_file(super::TOC_TAR_NAME, json.as_bytes())))
    }

    /// `{"version":1,"entries":[<entries>]}`.
    pub fn toc(entries: &str) -> String {
        format!(r#"{{"version":1,"entries":[{entries}]}}"#)
    }
}
