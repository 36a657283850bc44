//! Reading zstd:chunked: annotations or footer -> compressed TOC -> verified TOC JSON ->
//! [`crate::toc::Layer`].
//!
//! Everything here is pure and synchronous: the caller fetches the bytes holding the TOC (the
//! range the manifest-position annotation names, or the blob's tail when the annotations are
//! missing) and hands them over. A hostile blob can at worst produce an error: every size taken
//! from the blob or the annotations is checked against [`ReaderConfig`] before it is used.
//!
//! Two TOC dialects are read: containers/storage's (a `reg` entry's `offset`/`endOffset` span
//! its frames, `chunk` entries follow it, `chunkType` may be `zeros`) and stargz-snapshotter's
//! (an eStargz TOC: no `endOffset`, a chunk's frames end where the next one starts, `innerOffset`
//! and the `.prefetch.landmark` / `.no.prefetch.landmark` entries).

use std::collections::HashMap;
use std::io::Read;

use lazypull_fetcher::digest::Verifier;
use lazypull_fetcher::Digest;

use super::{
    TarSplitPosition, TocPosition, ZstdChunkedError, FOOTER_MAGIC, FOOTER_SIZE,
    LEGACY_FOOTER_MAGIC, LEGACY_MANIFEST_CHECKSUM_ANNOTATION, LEGACY_MANIFEST_POSITION_ANNOTATION,
    MANIFEST_CHECKSUM_ANNOTATION, MANIFEST_POSITION_ANNOTATION, MANIFEST_TYPE_CRFS,
    SKIPPABLE_HEADER, SKIPPABLE_MAGIC, TARSPLIT_POSITION_ANNOTATION, ZSTD_MAGIC,
};
use crate::toc::json::{
    parse_toc_json, Prefetch, ReaderConfig, TOC_DIGEST_ANNOTATION, ZSTD_CHUNKED,
};
use crate::toc::Layer;

/// Footer payload sizes seen in the wild, largest first: 64 (current, with tar-split fields),
/// 56 (containers/storage for a while in 2023), 40 (the original; skopeo 1.9,
/// stargz-snapshotter).
const FOOTER_SIZES: [usize; 3] = [FOOTER_SIZE, 56, 40];

/// Bytes to read from the end of a blob to find any footer (the largest payload plus its
/// skippable-frame header).
pub const FOOTER_PROBE_LEN: usize = FOOTER_SIZE + SKIPPABLE_HEADER as usize;

/// What the manifest says about a zstd:chunked layer (all optional: a layer whose annotations
/// were dropped is found by its footer).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TocHint {
    /// From the manifest-position annotation.
    pub toc: Option<TocPosition>,
    /// From the tarsplit-position annotation.
    pub tar_split: Option<TarSplitPosition>,
    /// From the manifest-checksum annotation: digest of the compressed TOC.
    pub manifest_checksum: Option<Digest>,
    /// From `containerd.io/snapshot/stargz/toc.digest`: digest of the TOC JSON.
    pub toc_digest: Option<Digest>,
}

fn annotation<'a>(
    a: &'a HashMap<String, String>,
    keys: [&'static str; 2],
) -> Option<(&'static str, &'a str)> {
    keys.into_iter()
        .find_map(|k| a.get(k).map(|v| (k, v.as_str())))
}

fn parse_numbers<const N: usize>(
    key: &'static str,
    value: &str,
) -> Result<[u64; N], ZstdChunkedError> {
    let bad = |detail: String| ZstdChunkedError::BadAnnotation {
        key,
        value: value.to_string(),
        detail,
    };
    let parts: Vec<&str> = value.split(':').collect();
    if parts.len() != N {
        return Err(bad(format!(
            "expected {N} colon-separated decimal numbers, found {}",
            parts.len()
        )));
    }
    let mut out = [0u64; N];
    for (o, p) in out.iter_mut().zip(parts) {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(format!("{p:?} is not a decimal number")));
        }
        *o = p
            .parse()
            .map_err(|e| bad(format!("{p:?} is not a 64-bit number: {e}")))?;
    }
    Ok(out)
}

impl TocHint {
    /// Reads the zstd:chunked annotations of a layer descriptor (current names first, then the
    /// older `io.containers.*` ones). Absent annotations are `None`; malformed ones are errors,
    /// since a manifest that names a TOC it does not describe must not be trusted.
    pub fn from_annotations(a: &HashMap<String, String>) -> Result<TocHint, ZstdChunkedError> {
        let mut hint = TocHint::default();
        if let Some((key, v)) = annotation(
            a,
            [
                MANIFEST_POSITION_ANNOTATION,
                LEGACY_MANIFEST_POSITION_ANNOTATION,
            ],
        ) {
            let [offset, compressed_len, uncompressed_len, manifest_type] =
                parse_numbers::<4>(key, v)?;
            hint.toc = Some(TocPosition {
                offset,
                compressed_len,
                uncompressed_len,
                manifest_type,
            });
        }
        if let Some(v) = a.get(TARSPLIT_POSITION_ANNOTATION) {
            let [offset, compressed_len, uncompressed_len] =
                parse_numbers::<3>(TARSPLIT_POSITION_ANNOTATION, v)?;
            hint.tar_split = Some(TarSplitPosition {
                offset,
                compressed_len,
                uncompressed_len,
            });
        }
        if let Some((key, v)) = annotation(
            a,
            [
                MANIFEST_CHECKSUM_ANNOTATION,
                LEGACY_MANIFEST_CHECKSUM_ANNOTATION,
            ],
        ) {
            hint.manifest_checksum =
                Some(v.parse().map_err(|e| ZstdChunkedError::BadAnnotation {
                    key,
                    value: v.to_string(),
                    detail: format!("not a digest: {e}"),
                })?);
        }
        if hint.is_zstd_chunked() {
            if let Some(v) = a.get(TOC_DIGEST_ANNOTATION) {
                hint.toc_digest = Some(v.parse().map_err(|e| ZstdChunkedError::BadAnnotation {
                    key: TOC_DIGEST_ANNOTATION,
                    value: v.to_string(),
                    detail: format!("not a digest: {e}"),
                })?);
            }
        }
        Ok(hint)
    }

    /// Whether an annotation ties the TOC to the manifest (the compressed TOC's checksum or the
    /// TOC JSON's digest). Without one, nothing the TOC says can be trusted.
    pub fn is_bound(&self) -> bool {
        self.manifest_checksum.is_some() || self.toc_digest.is_some()
    }

    /// Whether the annotations mark the layer as zstd:chunked.
    pub fn is_zstd_chunked(&self) -> bool {
        self.toc.is_some() || self.manifest_checksum.is_some()
    }

    /// The blob range `[start, end)` holding the compressed TOC, when the annotations give it
    /// and it fits a blob of `blob_size` bytes (the skippable-frame header is included so the
    /// reader can check it).
    pub fn toc_range(&self, blob_size: u64) -> Option<(u64, u64)> {
        let toc = self.toc?;
        let start = toc.offset.checked_sub(SKIPPABLE_HEADER)?;
        let end = toc.offset.checked_add(toc.compressed_len)?;
        (end <= blob_size).then_some((start, end))
    }
}

/// A parsed footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    /// Where the TOC is.
    pub toc: TocPosition,
    /// Where the tar-split data is (64-byte footers only).
    pub tar_split: Option<TarSplitPosition>,
    /// Bytes of the footer's skippable frame, header included (the blob ends with them).
    pub frame_len: usize,
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn is_skippable_header(h: &[u8], payload_len: usize) -> bool {
    h.len() == 8
        && h[0] & 0xf0 == SKIPPABLE_MAGIC[0]
        && h[1..4] == SKIPPABLE_MAGIC[1..4]
        && u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize == payload_len
}

/// Parses the footer at the end of `tail` (the last bytes of the blob; give at least
/// [`FOOTER_PROBE_LEN`] when the blob is that large). The footer is the last skippable frame:
/// its payload of 64, 56 or 40 bytes ends with the magic `GNUlInUx` (or the original
/// `GnUlInUx`).
pub fn parse_footer(tail: &[u8]) -> Result<Footer, ZstdChunkedError> {
    let min = 40 + SKIPPABLE_HEADER as usize;
    if tail.len() < min {
        return Err(ZstdChunkedError::TruncatedFooter {
            len: tail.len(),
            min,
        });
    }
    let magic = &tail[tail.len() - 8..];
    if magic != FOOTER_MAGIC && magic != LEGACY_FOOTER_MAGIC {
        return Err(ZstdChunkedError::BadFooter {
            detail: format!(
                "the blob does not end with the magic GNUlInUx or GnUlInUx (found {:02x?})",
                magic
            ),
        });
    }
    for size in FOOTER_SIZES {
        let Some(start) = tail.len().checked_sub(size + SKIPPABLE_HEADER as usize) else {
            continue;
        };
        let header = &tail[start..start + 8];
        if !is_skippable_header(header, size) {
            continue;
        }
        let p = &tail[start + 8..];
        let toc = TocPosition {
            offset: le_u64(p, 0),
            compressed_len: le_u64(p, 8),
            uncompressed_len: le_u64(p, 16),
            manifest_type: le_u64(p, 24),
        };
        let tar_split = (size == FOOTER_SIZE && le_u64(p, 32) != 0).then(|| TarSplitPosition {
            offset: le_u64(p, 32),
            compressed_len: le_u64(p, 40),
            uncompressed_len: le_u64(p, 48),
        });
        return Ok(Footer {
            toc,
            tar_split,
            frame_len: size + SKIPPABLE_HEADER as usize,
        });
    }
    Err(ZstdChunkedError::BadFooter {
        detail:
            "the magic is not preceded by a skippable-frame header for a 64-, 56- or 40-byte footer"
                .into(),
    })
}

/// A parsed and verified TOC.
#[derive(Debug)]
pub struct OpenedToc {
    /// The layer's tree and chunk table.
    pub layer: Layer,
    /// SHA-256 of the compressed TOC: the manifest-checksum annotation, and what
    /// containers/storage calls the layer's TOC digest.
    pub manifest_checksum: Digest,
    /// SHA-256 of the TOC JSON.
    pub toc_digest: Digest,
    /// Where the TOC is.
    pub toc: TocPosition,
    /// Where the tar-split data is, when the annotations or the footer say.
    pub tar_split: Option<TarSplitPosition>,
    /// `tarSplitDigest` from the TOC (digest of the compressed tar-split data).
    pub tar_split_digest: Option<Digest>,
    /// TOC version (1, or 2 for layers written without tar-split).
    pub version: u32,
    /// What to prefetch: from landmark entries (stargz-snapshotter) or lazypull's TOC key.
    pub prefetch: Prefetch,
    /// Whether the TOC was found through the footer (no annotations).
    pub from_footer: bool,
}

/// Parses, verifies and builds the layer from blob bytes holding the TOC.
///
/// `data` holds bytes `[data_start, data_start + data.len())` of the blob. With a TOC position
/// in `hint` (the annotations), they must cover the compressed TOC; without one they must end
/// at the blob's end (the footer says where the TOC is), and [`ZstdChunkedError::NeedMore`]
/// says from where to read when they do not reach back to the TOC (the size limits are checked
/// first, so a hostile footer cannot make the caller fetch gigabytes). The compressed TOC is
/// checked against the manifest checksum (and the JSON against the eStargz TOC digest) before
/// any entry is trusted.
pub fn open_toc(
    data: &[u8],
    data_start: u64,
    blob_size: u64,
    hint: &TocHint,
    cfg: &ReaderConfig,
) -> Result<OpenedToc, ZstdChunkedError> {
    let data_end = u64::try_from(data.len())
        .ok()
        .and_then(|l| data_start.checked_add(l))
        .filter(|e| *e <= blob_size)
        .ok_or(ZstdChunkedError::BadTail {
            start: data_start,
            len: data.len(),
            blob_size,
        })?;
    let (toc, mut tar_split, metadata_end, from_footer) = match hint.toc {
        Some(toc) => (toc, hint.tar_split, blob_size, false),
        None => {
            if data_end != blob_size {
                return Err(ZstdChunkedError::BadTail {
                    start: data_start,
                    len: data.len(),
                    blob_size,
                });
            }
            if data.len() < FOOTER_PROBE_LEN && data_start > 0 {
                return Err(ZstdChunkedError::NeedMore {
                    from: blob_size.saturating_sub(FOOTER_PROBE_LEN as u64),
                });
            }
            let footer = parse_footer(data)?;
            let footer_start = blob_size - footer.frame_len as u64;
            (footer.toc, footer.tar_split, footer_start, true)
        }
    };
    if toc.manifest_type != MANIFEST_TYPE_CRFS {
        return Err(ZstdChunkedError::UnsupportedManifestType(toc.manifest_type));
    }
    let bad_pos = |detail: &str| ZstdChunkedError::BadPosition {
        what: "the compressed TOC",
        offset: toc.offset,
        len: toc.compressed_len,
        blob_size,
        detail: detail.to_string(),
    };
    if toc.compressed_len == 0 {
        return Err(bad_pos("the TOC is empty"));
    }
    let toc_end = toc
        .offset
        .checked_add(toc.compressed_len)
        .ok_or_else(|| bad_pos("the end overflows"))?;
    if toc.offset < SKIPPABLE_HEADER || toc_end > metadata_end {
        return Err(bad_pos(if from_footer {
            "it must lie in a skippable frame before the footer"
        } else {
            "it must lie in a skippable frame inside the blob"
        }));
    }
    if toc.compressed_len > cfg.max_toc_bytes {
        return Err(ZstdChunkedError::TooLarge {
            what: "compressed TOC",
            size: toc.compressed_len,
            limit: cfg.max_toc_bytes,
        });
    }
    if toc.uncompressed_len > cfg.max_toc_json_bytes {
        return Err(ZstdChunkedError::TooLarge {
            what: "TOC JSON",
            size: toc.uncompressed_len,
            limit: cfg.max_toc_json_bytes,
        });
    }
    let frame_start = toc.offset - SKIPPABLE_HEADER;
    // The data area ends where the first metadata frame starts.
    let mut area_end = frame_start;
    if let Some(ts) = tar_split {
        let ts_end = ts.offset.checked_add(ts.compressed_len);
        let fits = ts.offset >= SKIPPABLE_HEADER && ts_end.is_some_and(|e| e <= metadata_end);
        if !fits || ts.compressed_len == 0 {
            if from_footer {
                // The footer is informational; a tar-split position that makes no sense is
                // ignored (lazypull does not need it).
                tar_split = None;
            } else {
                return Err(ZstdChunkedError::BadPosition {
                    what: "the tar-split data",
                    offset: ts.offset,
                    len: ts.compressed_len,
                    blob_size,
                    detail: "it must lie in a skippable frame inside the blob".into(),
                });
            }
        } else {
            area_end = area_end.min(ts.offset - SKIPPABLE_HEADER);
        }
    }
    if toc.offset < data_start {
        return Err(ZstdChunkedError::NeedMore { from: frame_start });
    }
    if toc_end > data_end {
        return Err(ZstdChunkedError::ShortData {
            have: data_end,
            need: toc_end,
        });
    }
    let rel = |o: u64| usize::try_from(o - data_start).unwrap_or(usize::MAX);
    let compressed =
        data.get(rel(toc.offset)..rel(toc_end))
            .ok_or(ZstdChunkedError::ShortData {
                have: data_end,
                need: toc_end,
            })?;
    if frame_start >= data_start {
        let header = data.get(rel(frame_start)..rel(toc.offset)).unwrap_or(&[]);
        if !is_skippable_header(header, compressed.len()) {
            return Err(bad_pos(
                "the 8 bytes before it are not a skippable-frame header of its length",
            ));
        }
    }
    let manifest_checksum = Digest::sha256_of(compressed);
    if let Some(expected) = &hint.manifest_checksum {
        let actual = match expected.algorithm() {
            a if a == manifest_checksum.algorithm() => manifest_checksum,
            a => {
                let mut v = Verifier::new(a);
                v.update(compressed);
                v.finish()
            }
        };
        if actual != *expected {
            return Err(ZstdChunkedError::ManifestChecksumMismatch {
                expected: Box::new(*expected),
                actual: Box::new(actual),
            });
        }
    }
    let json = decompress_toc(compressed, toc.offset, toc.uncompressed_len, cfg)?;
    let toc_digest = Digest::sha256_of(&json);
    if let Some(expected) = &hint.toc_digest {
        let mut v = Verifier::new(expected.algorithm());
        v.update(&json);
        let actual = v.finish();
        if actual != *expected {
            return Err(ZstdChunkedError::TocDigestMismatch {
                expected: Box::new(*expected),
                actual: Box::new(actual),
            });
        }
    }
    let parsed = parse_toc_json(&json, area_end, cfg.max_entries, ZSTD_CHUNKED)?;
    drop(json);
    let tar_split_digest = parsed.tar_split_digest;
    let version = parsed.version;
    let (layer, prefetch) = parsed.build()?;
    Ok(OpenedToc {
        layer,
        manifest_checksum,
        toc_digest,
        toc,
        tar_split,
        tar_split_digest,
        version,
        prefetch,
        from_footer,
    })
}

/// Decompresses the TOC, refusing to produce more than its declared uncompressed length (or,
/// when a writer left that 0, the JSON limit): a frame that would decompress to gigabytes
/// stops right after the declared size.
fn decompress_toc(
    compressed: &[u8],
    offset: u64,
    declared: u64,
    cfg: &ReaderConfig,
) -> Result<Vec<u8>, ZstdChunkedError> {
    let bad = |detail: String| ZstdChunkedError::TocZstd { offset, detail };
    if compressed.get(..4) != Some(&ZSTD_MAGIC[..]) {
        return Err(bad(
            "it does not start with the zstd magic 28 b5 2f fd".into()
        ));
    }
    let (limit, what) = match declared {
        0 => (cfg.max_toc_json_bytes, "decompressed TOC"),
        n => (
            n.min(cfg.max_toc_json_bytes),
            "decompressed TOC (beyond its declared uncompressed length)",
        ),
    };
    let mut out = Vec::new();
    let dec = zstd::stream::read::Decoder::with_buffer(compressed)
        .map_err(|e| bad(format!("zstd decoder: {e}")))?;
    dec.take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| bad(e.to_string()))?;
    let got = out.len() as u64;
    if got > limit {
        return Err(ZstdChunkedError::TooLarge {
            what,
            size: got,
            limit,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use proptest::prelude::*;

    use super::super::testutil::{blob_with_toc, skippable, toc};
    use super::super::writer::{footer_bytes, write_zstd_chunked, WriterOptions};
    use super::super::PREFETCH_END_KEY;
    use super::*;
    use crate::toc::json::TocJsonError;

    fn open(blob: &[u8], hint: &TocHint) -> Result<OpenedToc, ZstdChunkedError> {
        open_toc(blob, 0, blob.len() as u64, hint, &ReaderConfig::default())
    }

    #[test]
    fn refuses_the_shared_entry_cases() {
        use crate::toc::json::conformance::entry_cases;
        for (name, entries, expected) in entry_cases() {
            let (blob, hint) = blob_with_toc(&toc(&entries));
            match open(&blob, &hint) {
                Err(ZstdChunkedError::Toc(e)) => assert!(expected(&e), "{name}: {e}"),
                other => panic!("{name}: unexpected {other:?}"),
            }
        }
    }

    fn d(data: &[u8]) -> String {
        Digest::sha256_of(data).to_string()
    }

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A small real blob from the writer, and the hint its annotations give.
    fn sample() -> &'static (Vec<u8>, TocHint) {
        static BLOB: OnceLock<(Vec<u8>, TocHint)> = OnceLock::new();
        BLOB.get_or_init(|| {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            b.append_data(&mut h, "etc/", &[][..]).unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(5);
            b.append_data(&mut h, "etc/hosts", &b"hello"[..]).unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Link);
            h.set_size(0);
            b.append_link(&mut h, "etc/hosts2", "etc/hosts").unwrap();
            let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, "bin/sh", &data[..]).unwrap();
            let tar = b.into_inner().unwrap();
            let opts = WriterOptions {
                chunk_size: 30_000,
                level: 1,
                ..WriterOptions::default()
            };
            let mut out = Vec::new();
            let w = write_zstd_chunked(&tar[..], &mut out, &opts).unwrap();
            let a: HashMap<String, String> = w.annotations().into_iter().collect();
            (out, TocHint::from_annotations(&a).unwrap())
        })
    }

    #[test]
    fn footer_variants() {
        let toc = TocPosition {
            offset: 1000,
            compressed_len: 200,
            uncompressed_len: 900,
            manifest_type: 1,
        };
        let ts = TarSplitPosition {
            offset: 1208,
            compressed_len: 50,
            uncompressed_len: 300,
        };
        // Current: 64 bytes with tar-split fields.
        let mut tail = vec![7u8; 30];
        tail.extend_from_slice(&skippable(&footer_bytes(&toc, Some(&ts))));
        let f = parse_footer(&tail).unwrap();
        assert_eq!(
            (f.toc, f.tar_split, f.frame_len),
            (toc, Some(ts), FOOTER_PROBE_LEN)
        );
        // The original 40-byte footer with the GnUlInUx magic (skopeo 1.9, ctr-remote).
        let mut p = Vec::new();
        for v in [1000u64, 200, 900, 1] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        p.extend_from_slice(LEGACY_FOOTER_MAGIC);
        let f = parse_footer(&skippable(&p)).unwrap();
        assert_eq!((f.toc, f.tar_split, f.frame_len), (toc, None, 48));
        // The 56-byte footer of 2023.
        let mut p = Vec::new();
        for v in [1000u64, 200, 900, 1, 1208, 50] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        p.extend_from_slice(FOOTER_MAGIC);
        let f = parse_footer(&skippable(&p)).unwrap();
        assert_eq!((f.toc, f.frame_len), (toc, 64));
        // Failures.
        assert!(matches!(
            parse_footer(&[0u8; 20]),
            Err(ZstdChunkedError::TruncatedFooter { len: 20, .. })
        ));
        let mut wrong = skippable(&footer_bytes(&toc, None));
        let n = wrong.len();
        wrong[n - 1] = b'y';
        assert!(
            matches!(parse_footer(&wrong), Err(ZstdChunkedError::BadFooter { detail }) if detail.contains("magic"))
        );
        let mut no_header = vec![0u8; 8];
        no_header.extend_from_slice(&footer_bytes(&toc, None));
        assert!(
            matches!(parse_footer(&no_header), Err(ZstdChunkedError::BadFooter { detail }) if detail.contains("skippable"))
        );
    }

    #[test]
    fn annotations_current_and_legacy() {
        assert_eq!(
            TocHint::from_annotations(&HashMap::new()).unwrap(),
            TocHint::default()
        );
        let c = d(b"x");
        for (pos, sum) in [
            (MANIFEST_POSITION_ANNOTATION, MANIFEST_CHECKSUM_ANNOTATION),
            (
                LEGACY_MANIFEST_POSITION_ANNOTATION,
                LEGACY_MANIFEST_CHECKSUM_ANNOTATION,
            ),
        ] {
            let h = TocHint::from_annotations(&ann(&[
                (pos, "10:20:30:1"),
                (sum, &c),
                (TARSPLIT_POSITION_ANNOTATION, "38:5:9"),
                (TOC_DIGEST_ANNOTATION, &c),
            ]))
            .unwrap();
            assert!(h.is_zstd_chunked());
            assert_eq!(
                h.toc,
                Some(TocPosition {
                    offset: 10,
                    compressed_len: 20,
                    uncompressed_len: 30,
                    manifest_type: 1
                })
            );
            assert_eq!(h.tar_split.map(|t| t.offset), Some(38));
            assert_eq!(h.manifest_checksum, Some(Digest::sha256_of(b"x")));
            assert_eq!(h.toc_digest, Some(Digest::sha256_of(b"x")));
            assert_eq!(h.toc_range(100), Some((2, 30)));
            assert_eq!(h.toc_range(29), None);
        }
        // An eStargz layer's TOC digest alone does not make a layer zstd:chunked.
        let h = TocHint::from_annotations(&ann(&[(TOC_DIGEST_ANNOTATION, &c)])).unwrap();
        assert_eq!(h, TocHint::default());
        for (k, v) in [
            (MANIFEST_POSITION_ANNOTATION, "10:20:30"),
            (MANIFEST_POSITION_ANNOTATION, "10:20:30:1:5"),
            (MANIFEST_POSITION_ANNOTATION, "-1:20:30:1"),
            (MANIFEST_POSITION_ANNOTATION, "1:2:3:99999999999999999999"),
            (LEGACY_MANIFEST_POSITION_ANNOTATION, " 1:2:3:4"),
            (TARSPLIT_POSITION_ANNOTATION, "1:2"),
            (MANIFEST_CHECKSUM_ANNOTATION, "sha256:1234"),
            (LEGACY_MANIFEST_CHECKSUM_ANNOTATION, "nonsense"),
        ] {
            let e = TocHint::from_annotations(&ann(&[(k, v)])).unwrap_err();
            assert!(
                matches!(&e, ZstdChunkedError::BadAnnotation { key, .. } if *key == k),
                "{k}={v}: {e}"
            );
        }
    }

    /// containers/storage's TOC: `./` root, zero access times, `endOffset`, chunk entries with
    /// sizes, single-chunk files verified by their `digest`, `zeros` chunks.
    #[test]
    fn containers_storage_dialect() {
        let json = format!(
            r#"{{"version":1,"entries":[
            {{"type":"dir","name":"./","mode":493,"modtime":"2026-11-23T17:23:35Z","accesstime":"0001-01-01T00:00:00Z","changetime":"0001-01-01T00:00:00Z"}},
            {{"type":"reg","name":"./etc/hostname","mode":420,"size":6,"modtime":"2026-11-23T17:23:35Z","digest":"{h}","offset":120,"endOffset":139}},
            {{"type":"reg","name":"./usr/bin/big","mode":420,"size":10,"digest":"{b}","offset":429,"endOffset":1000,"chunkSize":4,"chunkDigest":"{x}"}},
            {{"type":"chunk","name":"./usr/bin/big","offset":600,"chunkSize":3,"chunkOffset":4,"chunkDigest":"{y}","chunkType":"zeros"}},
            {{"type":"chunk","name":"./usr/bin/big","offset":700,"chunkSize":3,"chunkOffset":7,"chunkDigest":"{y}"}},
            {{"type":"hardlink","name":"./usr/bin/big2","linkName":"./usr/bin/big"}},
            {{"type":"reg","name":"./last","size":1,"digest":"{z}","offset":3000}}
            ],"tarSplitDigest":"{t}"}}"#,
            h = d(b"hostname"),
            b = d(b"big"),
            x = d(b"x"),
            y = d(b"y"),
            z = d(b"z"),
            t = d(b"tar-split"),
        );
        let (blob, hint) = blob_with_toc(&json);
        let o = open(&blob, &hint).unwrap();
        assert_eq!(o.version, 1);
        assert_eq!(o.tar_split_digest, Some(Digest::sha256_of(b"tar-split")));
        assert_eq!(o.prefetch, Prefetch::Unspecified);
        let l = &o.layer;
        assert_eq!(l.node(0).unwrap().mtime, 1_795_454_615);
        let host = l.resolve("etc/hostname").unwrap();
        let c = l.chunks(host);
        assert_eq!(
            (c[0].blob_offset, c[0].blob_len, c[0].digest),
            (120, 19, Some(Digest::sha256_of(b"hostname")))
        );
        let big = l.resolve("usr/bin/big").unwrap();
        let spans: Vec<(u64, u64, u64, u64)> = l
            .chunks(big)
            .iter()
            .map(|c| (c.file_offset, c.size, c.blob_offset, c.blob_len))
            .collect();
        assert_eq!(
            spans,
            vec![(0, 4, 429, 171), (4, 3, 600, 100), (7, 3, 700, 300)]
        );
        assert_eq!(l.resolve("usr/bin/big2"), Some(big));
        // No endOffset: the frames end where the data area does.
        let last = l.resolve("last").unwrap();
        assert_eq!(l.chunks(last)[0].blob_len, 4096 - 3000);
        // Found through the footer too.
        let by_footer = open(&blob, &TocHint::default()).unwrap();
        assert!(by_footer.from_footer);
        assert_eq!(by_footer.manifest_checksum, o.manifest_checksum);
    }

    /// stargz-snapshotter's TOC: an eStargz TOC (landmarks, `innerOffset`, no `endOffset`).
    #[test]
    fn stargz_dialect_and_prefetch() {
        let x = d(b"x");
        let json = toc(&format!(
            concat!(
                r#"{{"name":"f","type":"reg","size":8,"offset":100,"chunkSize":4,"chunkDigest":"{x}"}},"#,
                r#"{{"name":"f","type":"chunk","offset":100,"innerOffset":4,"chunkOffset":4,"chunkDigest":"{x}"}},"#,
                r#"{{"name":".prefetch.landmark","type":"reg","size":1,"offset":300,"chunkDigest":"{x}"}},"#,
                r#"{{"name":"g","type":"reg","size":2,"offset":500,"digest":"{y}"}}"#
            ),
            x = x,
            y = d(b"y")
        ));
        let (blob, hint) = blob_with_toc(&json);
        let o = open(&blob, &hint).unwrap();
        assert_eq!(o.prefetch, Prefetch::Until { blob_offset: 300 });
        assert_eq!(o.layer.resolve(".prefetch.landmark"), None);
        let f = o.layer.resolve("f").unwrap();
        let spans: Vec<(u64, u64, u64)> = o
            .layer
            .chunks(f)
            .iter()
            .map(|c| (c.blob_offset, c.blob_len, c.inner_offset))
            .collect();
        assert_eq!(spans, vec![(100, 200, 0), (100, 200, 4)]);
        let json = toc(r#"{"name":".no.prefetch.landmark","type":"reg","size":1,"offset":10}"#);
        let (blob, hint) = blob_with_toc(&json.replace(
            r#""offset":10}"#,
            &format!(r#""offset":10,"digest":"{x}"}}"#),
        ));
        assert_eq!(open(&blob, &hint).unwrap().prefetch, Prefetch::None);
        // lazypull's own TOC key.
        for (v, want) in [
            (0u64, Prefetch::None),
            (77, Prefetch::Until { blob_offset: 77 }),
        ] {
            let json = format!(r#"{{"version":1,"entries":[],"{PREFETCH_END_KEY}":{v}}}"#);
            let (blob, hint) = blob_with_toc(&json);
            assert_eq!(open(&blob, &hint).unwrap().prefetch, want);
        }
        let json = format!(r#"{{"version":2,"entries":[],"{PREFETCH_END_KEY}":5000}}"#);
        let (blob, hint) = blob_with_toc(&json);
        assert!(
            matches!(open(&blob, &hint), Err(ZstdChunkedError::Toc(TocJsonError::TocJson { detail })) if detail.contains("past the data area"))
        );
    }

    #[test]
    fn need_more_and_short_data() {
        let (blob, hint) = sample();
        let len = blob.len() as u64;
        let full = open(blob, hint).unwrap();
        let frame_start = full.toc.offset - 8;
        // Footer mode: a tail that misses the TOC asks for it; a tiny one for the footer.
        let tail = &blob[blob.len() - 100..];
        match open_toc(
            tail,
            len - 100,
            len,
            &TocHint::default(),
            &ReaderConfig::default(),
        ) {
            Err(ZstdChunkedError::NeedMore { from }) => assert_eq!(from, frame_start),
            other => panic!("{other:?}"),
        }
        match open_toc(
            &blob[blob.len() - 10..],
            len - 10,
            len,
            &TocHint::default(),
            &ReaderConfig::default(),
        ) {
            Err(ZstdChunkedError::NeedMore { from }) => assert_eq!(from, len - 72),
            other => panic!("{other:?}"),
        }
        // Annotation mode: exactly the TOC frame is enough.
        let (s, e) = hint.toc_range(len).unwrap();
        let again = open_toc(
            &blob[s as usize..e as usize],
            s,
            len,
            hint,
            &ReaderConfig::default(),
        )
        .unwrap();
        assert_eq!(again.toc_digest, full.toc_digest);
        assert_eq!(again.layer.len(), full.layer.len());
        match open_toc(
            &blob[s as usize..e as usize - 1],
            s,
            len,
            hint,
            &ReaderConfig::default(),
        ) {
            Err(ZstdChunkedError::ShortData { have, need }) => {
                assert_eq!((have, need), (e - 1, e))
            }
            other => panic!("{other:?}"),
        }
        match open_toc(
            &blob[s as usize + 9..],
            s + 9,
            len,
            hint,
            &ReaderConfig::default(),
        ) {
            Err(ZstdChunkedError::NeedMore { from }) => assert_eq!(from, s),
            other => panic!("{other:?}"),
        }
    }

    type Case = (
        &'static str,
        Box<dyn Fn() -> Result<OpenedToc, ZstdChunkedError>>,
        fn(&ZstdChunkedError) -> bool,
    );

    fn json_case(entries: String) -> Box<dyn Fn() -> Result<OpenedToc, ZstdChunkedError>> {
        Box::new(move || {
            let (blob, hint) = blob_with_toc(&toc(&entries));
            open(&blob, &hint)
        })
    }

    fn with_hint(
        edit: impl Fn(&mut TocHint) + 'static,
    ) -> Box<dyn Fn() -> Result<OpenedToc, ZstdChunkedError>> {
        Box::new(move || {
            let (blob, mut hint) = sample().clone();
            edit(&mut hint);
            open(&blob, &hint)
        })
    }

    fn raw_toc(compressed: Vec<u8>) -> Box<dyn Fn() -> Result<OpenedToc, ZstdChunkedError>> {
        Box::new(move || {
            let mut blob = vec![0u8; 100];
            let toc = TocPosition {
                offset: 108,
                compressed_len: compressed.len() as u64,
                // Unknown (0): only the reader's limit applies.
                uncompressed_len: 0,
                manifest_type: 1,
            };
            blob.extend_from_slice(&skippable(&compressed));
            blob.extend_from_slice(&skippable(&footer_bytes(&toc, None)));
            open(&blob, &TocHint::default())
        })
    }

    #[test]
    fn hostile_inputs_give_specific_errors() {
        let x = d(b"x");
        let cases: Vec<Case> = vec![
            (
                "manifest checksum mismatch",
                with_hint(|h| h.manifest_checksum = Some(Digest::sha256_of(b"other"))),
                |e| matches!(e, ZstdChunkedError::ManifestChecksumMismatch { .. }),
            ),
            (
                "TOC digest mismatch",
                with_hint(|h| h.toc_digest = Some(Digest::sha256_of(b"other"))),
                |e| matches!(e, ZstdChunkedError::TocDigestMismatch { .. }),
            ),
            (
                "manifest type 2",
                with_hint(|h| h.toc.as_mut().unwrap().manifest_type = 2),
                |e| matches!(e, ZstdChunkedError::UnsupportedManifestType(2)),
            ),
            (
                "TOC past the end",
                with_hint(|h| h.toc.as_mut().unwrap().offset = u64::MAX - 3),
                |e| matches!(e, ZstdChunkedError::BadPosition { .. }),
            ),
            (
                "TOC at offset 0",
                with_hint(|h| h.toc.as_mut().unwrap().offset = 0),
                |e| matches!(e, ZstdChunkedError::BadPosition { .. }),
            ),
            (
                "empty TOC",
                with_hint(|h| h.toc.as_mut().unwrap().compressed_len = 0),
                |e| matches!(e, ZstdChunkedError::BadPosition { detail, .. } if detail.contains("empty")),
            ),
            (
                "TOC position not a skippable frame",
                with_hint(|h| h.toc.as_mut().unwrap().offset -= 1),
                |e| matches!(e, ZstdChunkedError::BadPosition { detail, .. } if detail.contains("skippable")),
            ),
            (
                "tar-split outside the blob",
                with_hint(|h| h.tar_split.as_mut().unwrap().compressed_len = u64::MAX),
                |e| {
                    matches!(
                        e,
                        ZstdChunkedError::BadPosition {
                            what: "the tar-split data",
                            ..
                        }
                    )
                },
            ),
            (
                "compressed TOC over limit",
                Box::new(|| {
                    let (blob, hint) = sample();
                    let cfg = ReaderConfig {
                        max_toc_bytes: 10,
                        ..ReaderConfig::default()
                    };
                    open_toc(blob, 0, blob.len() as u64, hint, &cfg)
                }),
                |e| {
                    matches!(
                        e,
                        ZstdChunkedError::TooLarge {
                            what: "compressed TOC",
                            limit: 10,
                            ..
                        }
                    )
                },
            ),
            (
                "declared JSON over limit",
                with_hint(|h| h.toc.as_mut().unwrap().uncompressed_len = u64::MAX),
                |e| {
                    matches!(
                        e,
                        ZstdChunkedError::TooLarge {
                            what: "TOC JSON",
                            ..
                        }
                    )
                },
            ),
            (
                "zstd bomb",
                Box::new(|| {
                    let json = vec![b' '; 4 << 20];
                    let mut blob = vec![0u8; 100];
                    let c = zstd::encode_all(&json[..], 19).unwrap();
                    let toc = TocPosition {
                        offset: 108,
                        compressed_len: c.len() as u64,
                        uncompressed_len: 1,
                        manifest_type: 1,
                    };
                    blob.extend_from_slice(&skippable(&c));
                    blob.extend_from_slice(&skippable(&footer_bytes(&toc, None)));
                    let cfg = ReaderConfig {
                        max_toc_json_bytes: 1 << 20,
                        ..ReaderConfig::default()
                    };
                    open_toc(&blob, 0, blob.len() as u64, &TocHint::default(), &cfg)
                }),
                |e| {
                    matches!(
                        e,
                        ZstdChunkedError::TooLarge {
                            what: "decompressed TOC (beyond its declared uncompressed length)",
                            size: 2,
                            limit: 1
                        }
                    )
                },
            ),
            ("TOC not zstd", raw_toc(b"{\"version\":1}".to_vec()), |e| {
                matches!(e, ZstdChunkedError::TocZstd { offset: 108, .. })
            }),
            (
                "TOC corrupt zstd",
                raw_toc({
                    let mut c = zstd::encode_all(&toc("").into_bytes()[..], 3).unwrap();
                    c.truncate(c.len() - 3);
                    c
                }),
                |e| matches!(e, ZstdChunkedError::TocZstd { .. }),
            ),
            (
                "bytes past the blob end",
                Box::new(|| {
                    let (blob, hint) = sample();
                    open_toc(blob, 1, blob.len() as u64, hint, &ReaderConfig::default())
                }),
                |e| matches!(e, ZstdChunkedError::BadTail { .. }),
            ),
            (
                "non-JSON",
                Box::new(|| {
                    let (blob, hint) = blob_with_toc("not json");
                    open(&blob, &hint)
                }),
                |e| matches!(e, ZstdChunkedError::Toc(TocJsonError::TocJson { .. })),
            ),
            (
                "missing version",
                Box::new(|| {
                    let (blob, hint) = blob_with_toc(r#"{"entries":[]}"#);
                    open(&blob, &hint)
                }),
                |e| matches!(e, ZstdChunkedError::Toc(TocJsonError::TocJson { detail }) if detail.contains("version")),
            ),
            (
                "missing entries",
                Box::new(|| {
                    let (blob, hint) = blob_with_toc(r#"{"version":1}"#);
                    open(&blob, &hint)
                }),
                |e| matches!(e, ZstdChunkedError::Toc(TocJsonError::TocJson { detail }) if detail.contains("entries")),
            ),
            (
                "version 3",
                Box::new(|| {
                    let (blob, hint) = blob_with_toc(r#"{"version":3,"entries":[{"x":1}]}"#);
                    open(&blob, &hint)
                }),
                |e| matches!(e, ZstdChunkedError::Toc(TocJsonError::UnsupportedVersion { found: v, .. }) if v == "3"),
            ),
            (
                "bad tarSplitDigest",
                Box::new(|| {
                    let (blob, hint) =
                        blob_with_toc(r#"{"version":1,"entries":[],"tarSplitDigest":"md5:1"}"#);
                    open(&blob, &hint)
                }),
                |e| matches!(e, ZstdChunkedError::Toc(TocJsonError::TocJson { detail }) if detail.contains("tarSplitDigest")),
            ),
            (
                "unknown chunk type",
                json_case(format!(
                    r#"{{"name":"f","type":"reg","size":1,"offset":10,"digest":"{x}","chunkType":"holes"}}"#
                )),
                |e| matches!(e, ZstdChunkedError::Toc(TocJsonError::BadEntry { detail, .. }) if detail.contains("chunkType")),
            ),
            (
                "endOffset past the data",
                json_case(format!(
                    r#"{{"name":"f","type":"reg","size":1,"offset":10,"endOffset":4097,"digest":"{x}"}}"#
                )),
                |e| {
                    matches!(
                        e,
                        ZstdChunkedError::Toc(TocJsonError::OffsetOutOfRange {
                            field: "endOffset",
                            ..
                        })
                    )
                },
            ),
            (
                "endOffset before offset",
                json_case(format!(
                    r#"{{"name":"f","type":"reg","size":1,"offset":10,"endOffset":10,"digest":"{x}"}}"#
                )),
                |e| matches!(e, ZstdChunkedError::Toc(TocJsonError::BadEntry { detail, .. }) if detail.contains("endOffset")),
            ),
            (
                "too many entries",
                Box::new(|| {
                    let (blob, hint) =
                        blob_with_toc(&toc(&[r#"{"name":"d","type":"dir"}"#; 5].join(",")));
                    let cfg = ReaderConfig {
                        max_entries: 3,
                        ..ReaderConfig::default()
                    };
                    open_toc(&blob, 0, blob.len() as u64, &hint, &cfg)
                }),
                |e| {
                    matches!(
                        e,
                        ZstdChunkedError::Toc(TocJsonError::TooManyEntries { limit: 3 })
                    )
                },
            ),
        ];
        assert!(cases.len() >= 20);
        for (name, run, check) in cases {
            match run() {
                Ok(_) => panic!("{name}: accepted"),
                Err(e) => {
                    eprintln!("{name}: {e}");
                    assert!(check(&e), "{name}: unexpected error {e:?}");
                    assert!(!e.to_string().is_empty());
                }
            }
        }
    }

    fn mutate(base: &[u8], edits: &[(usize, u8)], cut: usize) -> (Vec<u8>, u64) {
        let mut b = base.to_vec();
        let n = b.len();
        for &(i, v) in edits {
            b[i % n] = v;
        }
        let cut = cut % n;
        (b[cut..].to_vec(), cut as u64)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_footer(&bytes);
            let n = bytes.len() as u64;
            let _ = open_toc(&bytes, 0, n, &TocHint::default(), &ReaderConfig::default());
        }

        #[test]
        fn random_footers_never_panic(
            fields in proptest::collection::vec(any::<u64>(), 7),
            size in prop_oneof![Just(40usize), Just(56), Just(64)],
            legacy in any::<bool>(),
            prefix in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut p = Vec::new();
            for f in &fields[..(size - 8) / 8] {
                p.extend_from_slice(&f.to_le_bytes());
            }
            p.extend_from_slice(if legacy { LEGACY_FOOTER_MAGIC } else { FOOTER_MAGIC });
            let mut blob = prefix;
            blob.extend_from_slice(&skippable(&p));
            let f = parse_footer(&blob);
            prop_assert!(f.is_ok());
            let n = blob.len() as u64;
            let _ = open_toc(&blob, 0, n, &TocHint::default(), &ReaderConfig::default());
        }

        #[test]
        fn random_annotations_never_panic(
            pos in "[0-9:]{0,30}",
            ts in "[0-9:x-]{0,20}",
            sum in "(sha256:)?[0-9a-f]{0,64}",
        ) {
            let a = ann(&[
                (MANIFEST_POSITION_ANNOTATION, &pos),
                (TARSPLIT_POSITION_ANNOTATION, &ts),
                (LEGACY_MANIFEST_CHECKSUM_ANNOTATION, &sum),
            ]);
            if let Ok(h) = TocHint::from_annotations(&a) {
                let (blob, _) = sample();
                let _ = h.toc_range(blob.len() as u64);
                let _ = open(blob, &h);
            }
        }

        #[test]
        fn blob_mutations_never_panic(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            cut in any::<usize>(),
            tail_edits in proptest::collection::vec((0usize..400, any::<u8>()), 0..4),
            use_hint in any::<bool>(),
        ) {
            let (base, hint) = sample();
            let (mut tail, start) = mutate(base, &edits, cut);
            let n = tail.len();
            for (i, v) in tail_edits {
                if i < n {
                    tail[n - 1 - i] = v;
                }
            }
            let hint = if use_hint {
                TocHint { manifest_checksum: None, ..hint.clone() }
            } else {
                TocHint::default()
            };
            let _ = open_toc(&tail, start, base.len() as u64, &hint, &ReaderConfig::default());
        }

        #[test]
        fn toc_json_mutations_never_panic(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            trunc in any::<usize>(),
        ) {
            let (x, y) = (d(b"x"), d(b"y"));
            let json = format!(
                r#"{{"version":1,"entries":[{{"type":"dir","name":"./d/","mode":16877,"modtime":"2019-08-20T10:30:43Z","accesstime":"0001-01-01T00:00:00Z"}},{{"type":"reg","name":"./d/f","size":10,"offset":100,"endOffset":300,"chunkSize":6,"chunkDigest":"{x}","xattrs":{{"a":"Yg=="}}}},{{"type":"chunk","name":"./d/f","offset":200,"chunkOffset":6,"chunkSize":4,"chunkDigest":"{y}","chunkType":"zeros"}},{{"type":"hardlink","name":"l","linkName":"./d/f"}},{{"type":"char","name":"c","devMajor":1,"devMinor":3}}],"tarSplitDigest":"{x}","{PREFETCH_END_KEY}":150}}"#
            );
            let (blob, hint) = blob_with_toc(&json);
            prop_assert!(open(&blob, &hint).is_ok());
            let mut j = json.into_bytes();
            let n = j.len();
            for (i, v) in edits {
                j[i % n] = v;
            }
            j.truncate(n - trunc % 8);
            let s = String::from_utf8_lossy(&j).into_owned();
            let (blob, hint) = blob_with_toc(&s);
            let _ = open(&blob, &hint);
        }
    }
}
