//! zstd:chunked: the lazily pullable zstd layer format of containers/storage (podman, CRI-O).
//!
//! A zstd:chunked blob is an ordinary `tar+zstd` layer (`zstd -dc | tar -x` unpacks it) made of
//! many zstd frames: tar headers sit in frames of their own and every chunk of a regular file's
//! content starts a new frame, so a chunk can be decompressed alone. After the last frame of the
//! tar stream come three skippable frames (which every zstd decoder skips): the zstd-compressed
//! table of contents ("manifest", a CRFS/eStargz-like JSON), the zstd-compressed tar-split
//! metadata (lets containers/storage rebuild the exact tar stream), and a binary footer saying
//! where the first two are. The manifest annotations of the layer repeat those positions and
//! carry the digest of the compressed TOC, so a reader needs one range request to mount the
//! layer and then fetches chunks on demand.
//!
//! - [`reader`]: pure, synchronous parsing of the blob bytes holding the TOC into a verified
//!   [`crate::toc::Layer`] (the caller does the I/O).
//! - [`writer`]: streaming conversion of a tar stream into a zstd:chunked blob (`lazypull
//!   convert --format zstd-chunked` and the tests).
//!
//! Facts follow containers/storage `pkg/chunked` (`internal/minimal/compression.go`,
//! `compressor/compressor.go`), checked against the blobs skopeo 1.9.3 writes on this machine
//! (older `io.containers.zstd-chunked.*` annotation names and a 40-byte footer with the magic
//! `GnUlInUx`) and stargz-snapshotter's `ctr-remote images convert --zstdchunked` (an eStargz TOC,
//! landmarks included, in the same skippable-frame layout).

pub mod reader;
pub mod writer;

pub use reader::{open_toc, parse_footer, Footer, OpenedToc, TocHint, FOOTER_PROBE_LEN};
pub use writer::{write_zstd_chunked, WriterOptions, WrittenLayer};

use std::collections::BTreeMap;

use lazypull_fetcher::Digest;

use crate::toc::json::TocJsonError;

/// Annotation with the digest of the compressed TOC (containers/storage's "TOC digest" of a
/// zstd:chunked layer).
pub const MANIFEST_CHECKSUM_ANNOTATION: &str =
    "io.github.containers.zstd-chunked.manifest-checksum";
/// Annotation `offset:compressedLength:uncompressedLength:type` of the TOC frame's payload.
pub const MANIFEST_POSITION_ANNOTATION: &str =
    "io.github.containers.zstd-chunked.manifest-position";
/// Annotation `offset:compressedLength:uncompressedLength` of the tar-split frame's payload.
pub const TARSPLIT_POSITION_ANNOTATION: &str =
    "io.github.containers.zstd-chunked.tarsplit-position";
/// The name of [`MANIFEST_CHECKSUM_ANNOTATION`] before containers/storage 1.50 (skopeo 1.9,
/// podman 4.3 and stargz-snapshotter still write and read it).
pub const LEGACY_MANIFEST_CHECKSUM_ANNOTATION: &str =
    "io.containers.zstd-chunked.manifest-checksum";
/// The older name of [`MANIFEST_POSITION_ANNOTATION`].
pub const LEGACY_MANIFEST_POSITION_ANNOTATION: &str =
    "io.containers.zstd-chunked.manifest-position";

/// The only TOC type defined: a CRFS-compatible JSON TOC.
pub const MANIFEST_TYPE_CRFS: u64 = 1;

/// TOC-level key with where the prefetch area ends; defined with the TOC JSON it belongs to.
pub use crate::toc::json::PREFETCH_END_KEY;

/// Magic of a zstd skippable frame (the first byte may be `0x50..=0x5f`).
const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
/// Bytes of a skippable frame's header (magic and little-endian u32 length).
const SKIPPABLE_HEADER: u64 = 8;
/// Magic of a zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Footer magic written since containers/storage 1.50 (64-byte footer with tar-split fields).
const FOOTER_MAGIC: &[u8; 8] = b"GNUlInUx";
/// Footer magic of the original 40-byte footer (skopeo 1.9, stargz-snapshotter).
const LEGACY_FOOTER_MAGIC: &[u8; 8] = b"GnUlInUx";
/// Size of the current footer payload.
const FOOTER_SIZE: usize = 64;

/// Where the TOC is: the payload of its skippable frame (`offset` is past the frame's 8-byte
/// header), as in the manifest-position annotation and the footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TocPosition {
    /// Blob offset of the compressed TOC.
    pub offset: u64,
    /// Length of the compressed TOC.
    pub compressed_len: u64,
    /// Length of the TOC JSON.
    pub uncompressed_len: u64,
    /// TOC type; only [`MANIFEST_TYPE_CRFS`] is defined.
    pub manifest_type: u64,
}

impl TocPosition {
    /// The manifest-position annotation value.
    pub fn annotation(&self) -> String {
        format!(
            "{}:{}:{}:{}",
            self.offset, self.compressed_len, self.uncompressed_len, self.manifest_type
        )
    }
}

/// Where the tar-split metadata is (payload of its skippable frame). lazypull does not need it
/// to serve files; it is kept so a layer can be described (and rewritten) faithfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TarSplitPosition {
    /// Blob offset of the compressed tar-split data.
    pub offset: u64,
    /// Its compressed length.
    pub compressed_len: u64,
    /// Its uncompressed length.
    pub uncompressed_len: u64,
}

impl TarSplitPosition {
    /// The tarsplit-position annotation value.
    pub fn annotation(&self) -> String {
        format!(
            "{}:{}:{}",
            self.offset, self.compressed_len, self.uncompressed_len
        )
    }
}

/// The annotations a manifest needs for a zstd:chunked layer with this TOC (and tar-split):
/// current names, plus the older `io.containers.*` names so podman 4.3 / skopeo 1.9 era
/// readers recognise the layer too.
pub fn layer_annotations(
    manifest_checksum: &Digest,
    toc: &TocPosition,
    tar_split: Option<&TarSplitPosition>,
) -> BTreeMap<String, String> {
    let mut a = BTreeMap::new();
    for key in [
        MANIFEST_CHECKSUM_ANNOTATION,
        LEGACY_MANIFEST_CHECKSUM_ANNOTATION,
    ] {
        a.insert(key.to_string(), manifest_checksum.to_string());
    }
    for key in [
        MANIFEST_POSITION_ANNOTATION,
        LEGACY_MANIFEST_POSITION_ANNOTATION,
    ] {
        a.insert(key.to_string(), toc.annotation());
    }
    if let Some(ts) = tar_split {
        a.insert(TARSPLIT_POSITION_ANNOTATION.to_string(), ts.annotation());
    }
    a
}

/// Why a zstd:chunked blob could not be read or written. Every variant names the entry, offset
/// or limit involved: these errors end up in logs of a daemon mounting someone else's image.
#[derive(Debug, thiserror::Error)]
pub enum ZstdChunkedError {
    /// The tail is shorter than the smallest footer.
    #[error("blob tail of {len} bytes is too short for a zstd:chunked footer (at least {min} bytes are needed)")]
    TruncatedFooter {
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        min: usize,
    },
    /// The last bytes are not a zstd:chunked footer.
    #[error("not a zstd:chunked blob: invalid footer: {detail}")]
    BadFooter {
        /// What is wrong.
        detail: String,
    },
    /// A zstd:chunked annotation cannot be parsed.
    #[error("annotation {key}={value:?} is invalid: {detail}")]
    BadAnnotation {
        /// The annotation.
        key: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        detail: String,
    },
    /// The TOC (or tar-split) position lies outside the blob or overlaps the footer.
    #[error(
        "{what} at [{offset}, {offset}+{len}) does not fit the {blob_size}-byte blob: {detail}"
    )]
    BadPosition {
        /// What was located.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// Blob size.
        blob_size: u64,
        /// What is wrong.
        detail: String,
    },
    /// The TOC is of a type other than the CRFS JSON one.
    #[error(
        "unsupported zstd:chunked manifest type {0} (only type 1, a CRFS JSON TOC, is defined)"
    )]
    UnsupportedManifestType(u64),
    /// The bytes given do not match the blob (they run past its end).
    #[error("{len} bytes at offset {start} run past the end of the {blob_size}-byte blob")]
    BadTail {
        /// Offset of the first byte given.
        start: u64,
        /// Bytes given.
        len: usize,
        /// Blob size.
        blob_size: u64,
    },
    /// The bytes given start after the TOC: read the blob again from `from`.
    #[error(
        "the bytes given do not reach back to the TOC; read the blob again from offset {from}"
    )]
    NeedMore {
        /// Offset to read from.
        from: u64,
    },
    /// The bytes given end before the TOC does.
    #[error("the bytes given end at offset {have}, before the TOC ends at {need}")]
    ShortData {
        /// Where the bytes given end.
        have: u64,
        /// Where they must end.
        need: u64,
    },
    /// A size limit of the reader configuration was exceeded.
    #[error("{what} exceeds the limit of {limit} bytes ({size} bytes seen)")]
    TooLarge {
        /// What was measured.
        what: &'static str,
        /// Its size, or how far reading got before stopping.
        size: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The compressed TOC does not hash to the manifest-checksum annotation.
    #[error("zstd:chunked manifest checksum mismatch: the annotation says {expected}, the compressed TOC hashes to {actual}")]
    ManifestChecksumMismatch {
        /// Digest from the annotation.
        expected: Box<Digest>,
        /// Digest of the bytes received.
        actual: Box<Digest>,
    },
    /// The TOC JSON does not hash to the eStargz TOC digest annotation (stargz-snapshotter's
    /// zstd:chunked layers carry it too).
    #[error(
        "TOC digest mismatch: the annotation says {expected}, the TOC JSON hashes to {actual}"
    )]
    TocDigestMismatch {
        /// Digest from the annotation.
        expected: Box<Digest>,
        /// Digest of the TOC JSON.
        actual: Box<Digest>,
    },
    /// The TOC frame is not valid zstd.
    #[error("compressed TOC at offset {offset} is invalid: {detail}")]
    TocZstd {
        /// Blob offset of the compressed TOC.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// Writer options are unusable.
    #[error("invalid zstd:chunked writer options: {0}")]
    BadOptions(String),
    /// An input tar entry cannot be represented in zstd:chunked.
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
    use super::*;

    /// A skippable frame holding `payload`.
    pub fn skippable(payload: &[u8]) -> Vec<u8> {
        let mut f = SKIPPABLE_MAGIC.to_vec();
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A blob: 4096 bytes of data area (one zstd frame of zeros padded with a skippable frame),
    /// the TOC `json` in its frame, and a 64-byte footer. Returns the blob and the hint the
    /// annotations would give.
    pub fn blob_with_toc(json: &str) -> (Vec<u8>, TocHint) {
        let mut blob = zstd::encode_all(&[0u8; 100][..], 3).unwrap();
        let pad = 4096 - blob.len() - 8;
        blob.extend_from_slice(&skippable(&vec![0u8; pad]));
        assert_eq!(blob.len(), 4096);
        let compressed = zstd::encode_all(json.as_bytes(), 3).unwrap();
        let toc = TocPosition {
            offset: blob.len() as u64 + 8,
            compressed_len: compressed.len() as u64,
            uncompressed_len: json.len() as u64,
            manifest_type: MANIFEST_TYPE_CRFS,
        };
        blob.extend_from_slice(&skippable(&compressed));
        blob.extend_from_slice(&skippable(&writer::footer_bytes(&toc, None)));
        let hint = TocHint {
            toc: Some(toc),
            tar_split: None,
            manifest_checksum: Some(Digest::sha256_of(&compressed)),
            toc_digest: None,
        };
        (blob, hint)
    }

    /// `{"version":1,"entries":[<entries>]}`.
    pub fn toc(entries: &str) -> String {
        format!(r#"{{"version":1,"entries":[{entries}]}}"#)
    }
}
