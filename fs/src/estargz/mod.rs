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

pub use reader::{
    open_toc, parse_footer, tail_read_len, Footer, OpenedToc, Prefetch, ReaderConfig, FOOTER_SIZE,
    LEGACY_FOOTER_SIZE,
};
pub use writer::{write_estargz, WriterOptions, WrittenLayer};

use lazypull_fetcher::Digest;

use crate::toc::TocError;

/// Name of the tar entry holding the TOC JSON; fixed by the format so readers can find it.
pub const TOC_TAR_NAME: &str = "stargz.index.json";

/// Landmark entry: files before it are the ones to prefetch.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";

/// Landmark entry: the layer has nothing worth prefetching.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";

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
    /// The TOC is not the JSON object the format describes.
    #[error("TOC JSON is invalid: {detail}")]
    TocJson {
        /// What is wrong (with serde's line/column).
        detail: String,
    },
    /// The TOC declares a version other than 1.
    #[error("unsupported TOC version {0} (only version 1 is defined)")]
    UnsupportedVersion(String),
    /// More TOC entries than [`ReaderConfig::max_entries`].
    #[error("TOC has more than {limit} entries")]
    TooManyEntries {
        /// The configured limit.
        limit: usize,
    },
    /// The TOC JSON does not hash to the digest from the manifest.
    #[error("TOC digest mismatch: the manifest annotation says {expected}, the TOC JSON hashes to {actual}")]
    TocDigestMismatch {
        /// Digest from the manifest (boxed: digests are large and errors should stay small).
        expected: Box<Digest>,
        /// Digest of the TOC received.
        actual: Box<Digest>,
    },
    /// A TOC entry has a type the format does not define.
    #[error("TOC entry #{index} ({name:?}) has unknown type {kind:?}")]
    UnknownType {
        /// Position in the TOC's entry list.
        index: usize,
        /// Its name.
        name: String,
        /// The type found.
        kind: String,
    },
    /// A `chunk` entry that does not continue a non-empty regular file.
    #[error("TOC entry #{index} ({name:?}) is a chunk that does not continue a preceding non-empty regular file{detail}")]
    OrphanChunk {
        /// Position in the TOC's entry list.
        index: usize,
        /// Its name.
        name: String,
        /// Extra context (what precedes it).
        detail: String,
    },
    /// An entry's blob offset lies outside the data area before the TOC.
    #[error("TOC entry #{index} ({name:?}) has {field} {offset}, outside the blob's data area [0, {toc_offset})")]
    OffsetOutOfRange {
        /// Position in the TOC's entry list.
        index: usize,
        /// Its name.
        name: String,
        /// Which field.
        field: &'static str,
        /// The value found (may be negative).
        offset: i128,
        /// Where the TOC starts.
        toc_offset: u64,
    },
    /// An entry field is malformed (negative size, bad digest, bad base64, ...).
    #[error("TOC entry #{index} ({name:?}): {detail}")]
    BadEntry {
        /// Position in the TOC's entry list.
        index: usize,
        /// Its name.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// The layer model rejected an entry (bad path, chunks not covering the file, missing
    /// hard-link target, ...).
    #[error("TOC entry #{index} ({name:?}): {source}")]
    Layer {
        /// Position in the TOC's entry list.
        index: usize,
        /// Its name.
        name: String,
        /// Why the model rejected it.
        source: TocError,
    },
    /// Hard links that point at each other in a cycle.
    #[error("hard link {path:?} -> {target:?} is part of a hard-link loop")]
    HardlinkLoop {
        /// One link of the loop.
        path: String,
        /// Its target.
        target: String,
    },
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
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm), so TOC
/// times convert without a date-time dependency.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number from [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Parses an RFC 3339 time (`2019-08-20T10:30:43Z`, optional fraction, `Z` or `±hh:mm`) to
/// whole seconds since the epoch; the TOC's `modtime` is written this way by Go.
pub(crate) fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(r)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        part.iter().try_fold(0u32, |acc, d| {
            acc.checked_mul(10)?.checked_add(u32::from(d - b'0'))
        })
    };
    let sep = |i: usize, allowed: &[u8]| b.get(i).is_some_and(|c| allowed.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, min, sec) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if day == 0 || day > month_days || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        c @ (b'+' | b'-') if i + 6 == b.len() && sep(i + 3, b":") => {
            let (oh, om) = (digits(i + 1..i + 3)?, digits(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = i64::from(oh * 3600 + om * 60);
            if *c == b'-' {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    let days = days_from_civil(i64::from(year), month, day);
    Some(days * 86_400 + i64::from(hour * 3600 + min * 60 + sec) - offset)
}

/// Formats seconds since the epoch as the TOC's UTC RFC 3339 `modtime`; `None` outside years
/// 0..=9999, which RFC 3339 cannot express.
pub(crate) fn format_rfc3339(secs: i64) -> Option<String> {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    if !(0..=9999).contains(&year) {
        return None;
    }
    Some(format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    ))
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
