//! Reading eStargz: footer -> TOC member -> verified TOC JSON -> [`crate::toc::Layer`].
//!
//! Everything here is pure and synchronous: the caller fetches the blob's tail (see
//! [`tail_read_len`]) and hands the bytes over, so the same code serves HTTP range reads, local
//! files and tests, and a hostile blob can at worst produce an error (never a panic, never an
//! unbounded allocation: every size taken from the blob is checked against [`ReaderConfig`]).

use std::io::Read;

use flate2::read::GzDecoder;
use lazypull_fetcher::digest::Verifier;
use lazypull_fetcher::Digest;

use super::{EstargzError, EXTERNAL_TOC_FOOTER_SIZE, TOC_TAR_NAME};
use crate::toc::json::{parse_toc_json, Prefetch, ReaderConfig, ESTARGZ};
use crate::toc::Layer;

/// Size of the eStargz footer: gzip header (10) + XLEN (2) + Extra (`SG`, LEN, 22 bytes) (26) +
/// empty stored deflate block (5) + gzip trailer (8).
pub const FOOTER_SIZE: usize = 51;

/// Size of the footer of the original (CRFS) stargz: like eStargz but the Extra field is the
/// bare `%016xSTARGZ` without the RFC 1952 subfield header. Still found in old images.
pub const LEGACY_FOOTER_SIZE: usize = 47;

const GZIP_MAGIC: [u8; 3] = [0x1f, 0x8b, 0x08];
const FHCRC: u8 = 0x02;
const FEXTRA: u8 = 0x04;
const FNAME: u8 = 0x08;
const FCOMMENT: u8 = 0x10;
const FRESERVED: u8 = 0xe0;
/// The body of an empty gzip member as Go's `NoCompression` writes it: a final stored block of
/// length 0, then CRC32 0 and ISIZE 0.
const EMPTY_MEMBER_BODY: [u8; 13] = [0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0];
const EXTERNAL_TOC_MAGIC: &[u8] = b"STARGZEXTERNALTOC";
/// Decompressed bytes allowed in the TOC member beyond the JSON itself (tar headers, PAX
/// records, padding and the end-of-archive blocks).
const TOC_TAR_SLACK: u64 = 64 * 1024;

/// What the blob's last bytes say about where its TOC is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Footer {
    /// eStargz footer (51 bytes).
    Estargz {
        /// Blob offset of the TOC's gzip member.
        toc_offset: u64,
    },
    /// Legacy stargz footer (47 bytes).
    Legacy {
        /// Blob offset of the TOC's gzip member.
        toc_offset: u64,
    },
    /// The TOC lives outside the blob (46-byte footer ending in `STARGZEXTERNALTOC`).
    /// Recognised so the error can say so, but not supported.
    ExternalToc,
}

/// A parsed and verified TOC.
#[derive(Debug)]
pub struct OpenedToc {
    /// The layer's tree and chunk table.
    pub layer: Layer,
    /// SHA-256 of the TOC JSON, to compare with (or record as) the manifest annotation.
    pub toc_digest: Digest,
    /// Blob offset of the TOC member (the end of the data area).
    pub toc_offset: u64,
    /// Prefetch hint from the landmark entries.
    pub prefetch: Prefetch,
    /// Uncompressed size of the layer tar. eStargz does not record it inside the blob, so the
    /// reader leaves it `None`; callers that have the `io.containers.estargz.uncompressed-size`
    /// annotation fill it in.
    pub uncompressed_size: Option<u64>,
}

/// Parses the footer at the end of `tail` (the last bytes of the blob; give at least
/// [`FOOTER_SIZE`] when the blob is that large). Tries the 51-byte eStargz footer, then the
/// 47-byte legacy one, then the 46-byte external-TOC one; returns the footer and its length.
pub fn parse_footer(tail: &[u8]) -> Result<(Footer, usize), EstargzError> {
    if tail.len() < EXTERNAL_TOC_FOOTER_SIZE {
        return Err(EstargzError::TruncatedFooter {
            len: tail.len(),
            min: EXTERNAL_TOC_FOOTER_SIZE,
        });
    }
    let mut problems = Vec::new();
    for size in [FOOTER_SIZE, LEGACY_FOOTER_SIZE, EXTERNAL_TOC_FOOTER_SIZE] {
        let Some(bytes) = tail.len().checked_sub(size).and_then(|s| tail.get(s..)) else {
            problems.push(format!("{size}-byte footer: blob tail too short"));
            continue;
        };
        let parsed = match size {
            FOOTER_SIZE => parse_estargz_footer(bytes),
            LEGACY_FOOTER_SIZE => parse_legacy_footer(bytes),
            _ => parse_external_footer(bytes),
        };
        match parsed {
            Ok(f) => return Ok((f, size)),
            Err(e) => problems.push(format!("as a {size}-byte footer: {e}")),
        }
    }
    Err(EstargzError::BadFooter {
        detail: problems.join("; "),
    })
}

/// Checks the fixed parts of a footer member and returns its Extra field.
fn footer_extra(p: &[u8]) -> Result<&[u8], String> {
    if p.get(..3) != Some(&GZIP_MAGIC[..]) {
        return Err("no gzip header (1f 8b 08) at its start".into());
    }
    let flags = p.get(3).copied().unwrap_or(0);
    if flags & FEXTRA == 0 {
        return Err("gzip header has no Extra field".into());
    }
    if flags & (FHCRC | FNAME | FCOMMENT | FRESERVED) != 0 {
        return Err(format!("unexpected gzip header flags {flags:#04x}"));
    }
    let xlen = match p.get(10..12) {
        Some(&[a, b]) => u16::from_le_bytes([a, b]) as usize,
        _ => return Err("truncated gzip header".into()),
    };
    let extra = p
        .get(12..12 + xlen)
        .ok_or_else(|| format!("Extra field of {xlen} bytes does not fit"))?;
    let body = p.get(12 + xlen..).unwrap_or(&[]);
    if body != EMPTY_MEMBER_BODY {
        return Err(format!(
            "gzip body is not an empty stored block with a zero trailer ({} bytes after the Extra field)",
            body.len()
        ));
    }
    Ok(extra)
}

fn parse_hex_offset(hex: &[u8]) -> Result<u64, String> {
    if hex.len() != 16 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return Err(format!(
            "TOC offset {:?} is not 16 hex digits",
            String::from_utf8_lossy(hex)
        ));
    }
    let s = std::str::from_utf8(hex).map_err(|e| e.to_string())?;
    u64::from_str_radix(s, 16).map_err(|e| e.to_string())
}

fn parse_estargz_footer(p: &[u8]) -> Result<Footer, String> {
    let extra = footer_extra(p)?;
    if extra.len() != 26 {
        return Err(format!("Extra field is {} bytes, expected 26", extra.len()));
    }
    if extra.get(..2) != Some(&b"SG"[..]) {
        return Err("Extra subfield id is not 'SG'".into());
    }
    if extra.get(2..4) != Some(&[22u8, 0][..]) {
        return Err("Extra subfield length is not 22".into());
    }
    if extra.get(20..) != Some(&b"STARGZ"[..]) {
        return Err("magic STARGZ missing from the Extra subfield".into());
    }
    let toc_offset = parse_hex_offset(extra.get(4..20).unwrap_or(&[]))?;
    Ok(Footer::Estargz { toc_offset })
}

fn parse_legacy_footer(p: &[u8]) -> Result<Footer, String> {
    let extra = footer_extra(p)?;
    if extra.len() != 22 {
        return Err(format!("Extra field is {} bytes, expected 22", extra.len()));
    }
    if extra.get(16..) != Some(&b"STARGZ"[..]) {
        return Err("magic STARGZ missing from the Extra field".into());
    }
    let toc_offset = parse_hex_offset(extra.get(..16).unwrap_or(&[]))?;
    Ok(Footer::Legacy { toc_offset })
}

fn parse_external_footer(p: &[u8]) -> Result<Footer, String> {
    let extra = footer_extra(p)?;
    if extra.len() != 21
        || extra.get(..2) != Some(&b"SG"[..])
        || extra.get(2..4) != Some(&[17u8, 0][..])
        || extra.get(4..) != Some(EXTERNAL_TOC_MAGIC)
    {
        return Err("Extra field is not the external-TOC marker".into());
    }
    Ok(Footer::ExternalToc)
}

/// How many bytes from the end of a blob of `blob_size` bytes to read first. One read should
/// usually bring the footer and the whole TOC (saving a round trip); a compressed TOC is
/// typically well under 2% of its layer, so read 1/64 of the blob, at least 1 MiB and at most
/// 16 MiB, never more than the blob. A larger TOC costs one more read via
/// [`EstargzError::NeedMore`].
pub fn tail_read_len(blob_size: u64) -> u64 {
    (blob_size / 64).clamp(1 << 20, 16 << 20).min(blob_size)
}

/// Parses, verifies and builds the layer from the blob's tail.
///
/// `tail` holds bytes `[tail_start, blob_size)` of the blob; it must include the whole TOC
/// member and the footer, otherwise [`EstargzError::NeedMore`] says from which offset to read
/// (the size limits are checked first, so a hostile footer cannot make the caller fetch
/// gigabytes). With `expected_toc_digest` (the manifest's
/// `containerd.io/snapshot/stargz/toc.digest` annotation) the TOC JSON is checked before any
/// entry is trusted.
pub fn open_toc(
    tail: &[u8],
    tail_start: u64,
    blob_size: u64,
    expected_toc_digest: Option<&Digest>,
    cfg: &ReaderConfig,
) -> Result<OpenedToc, EstargzError> {
    let tail_len = tail.len();
    let tail_end = u64::try_from(tail_len)
        .ok()
        .and_then(|l| tail_start.checked_add(l));
    if tail_end != Some(blob_size) {
        return Err(EstargzError::BadTail {
            tail_start,
            tail_len,
            blob_size,
        });
    }
    if tail_len < FOOTER_SIZE && tail_start > 0 {
        return Err(EstargzError::NeedMore {
            from: blob_size.saturating_sub(FOOTER_SIZE as u64),
        });
    }
    let (footer, footer_len) = parse_footer(tail)?;
    let toc_offset = match footer {
        Footer::Estargz { toc_offset } | Footer::Legacy { toc_offset } => toc_offset,
        Footer::ExternalToc => return Err(EstargzError::ExternalTocUnsupported),
    };
    // parse_footer succeeded, so the tail (and the blob) holds at least footer_len bytes.
    let footer_start = blob_size.saturating_sub(footer_len as u64);
    if toc_offset >= blob_size {
        return Err(EstargzError::TocOffsetOutOfRange {
            toc_offset,
            blob_size,
        });
    }
    if toc_offset >= footer_start {
        return Err(EstargzError::TocOffsetInFooter {
            toc_offset,
            footer_start,
            footer_len,
        });
    }
    let toc_len = footer_start - toc_offset;
    if toc_len > cfg.max_toc_bytes {
        return Err(EstargzError::TooLarge {
            what: "compressed TOC member",
            size: toc_len,
            limit: cfg.max_toc_bytes,
        });
    }
    if toc_offset < tail_start {
        return Err(EstargzError::NeedMore { from: toc_offset });
    }
    let member = usize::try_from(toc_offset - tail_start)
        .ok()
        .zip(usize::try_from(footer_start - tail_start).ok())
        .and_then(|(a, b)| tail.get(a..b))
        .ok_or(EstargzError::NeedMore { from: toc_offset })?;

    let json = read_toc_json(member, toc_offset, cfg)?;
    let json = &json[..];
    let toc_digest = Digest::sha256_of(json);
    if let Some(expected) = expected_toc_digest {
        let mut v = Verifier::new(expected.algorithm());
        v.update(json);
        let actual = v.finish();
        if actual != *expected {
            return Err(EstargzError::TocDigestMismatch {
                expected: Box::new(*expected),
                actual: Box::new(actual),
            });
        }
    }
    let (layer, prefetch) = parse_toc_json(json, toc_offset, cfg.max_entries, ESTARGZ)?.build()?;
    Ok(OpenedToc {
        layer,
        toc_digest,
        toc_offset,
        prefetch,
        uncompressed_size: None,
    })
}

/// Reads the TOC JSON out of the TOC's gzip member, decompressing no more than the tar
/// headers (at most [`TOC_TAR_SLACK`] bytes) and the JSON size the tar header declares (itself
/// bounded by the limit): a member that would decompress to gigabytes is refused as soon as
/// its header is read, not after.
fn read_toc_json(member: &[u8], offset: u64, cfg: &ReaderConfig) -> Result<Vec<u8>, EstargzError> {
    if member.get(..2) != Some(&GZIP_MAGIC[..2]) {
        return Err(EstargzError::TocGzip {
            offset,
            detail: "member does not start with the gzip magic 1f 8b".into(),
        });
    }
    let gzip_err = |e: std::io::Error| EstargzError::TocGzip {
        offset,
        detail: e.to_string(),
    };
    let bad = |detail: String| EstargzError::TocTar { offset, detail };
    let mut dec = GzDecoder::new(member);
    let mut head = Vec::new();
    (&mut dec)
        .take(TOC_TAR_SLACK)
        .read_to_end(&mut head)
        .map_err(gzip_err)?;
    let (start, size) = {
        let mut archive = tar::Archive::new(&head[..]);
        let mut entries = archive.entries().map_err(|e| bad(e.to_string()))?;
        let entry = match entries.next() {
            None => return Err(bad("the member holds no tar entry".into())),
            Some(Err(e)) => {
                return Err(bad(format!(
                    "{e} (the tar headers must fit in the first {TOC_TAR_SLACK} bytes)"
                )))
            }
            Some(Ok(e)) => e,
        };
        let name = entry.path_bytes();
        if &*name != TOC_TAR_NAME.as_bytes() {
            let shown: String = String::from_utf8_lossy(&name).chars().take(200).collect();
            return Err(bad(format!("first entry is named {shown:?}")));
        }
        if !entry.header().entry_type().is_file() {
            return Err(bad(format!(
                "entry has tar type {:?}, not a regular file",
                entry.header().entry_type()
            )));
        }
        (entry.raw_file_position(), entry.size())
    };
    if size > cfg.max_toc_json_bytes {
        return Err(EstargzError::TooLarge {
            what: "TOC JSON",
            size,
            limit: cfg.max_toc_json_bytes,
        });
    }
    let short = |have: u64| {
        bad(format!(
            "tar header claims {size} bytes of JSON but the member holds only {have} after the header"
        ))
    };
    // `start` lies within `head` (the header was parsed from it) and `size` is bounded above.
    let start = usize::try_from(start).unwrap_or(usize::MAX).min(head.len());
    let want = usize::try_from(size).map_err(|_| short(0))?;
    let in_head = (head.len() - start).min(want);
    let mut json = Vec::with_capacity(want);
    json.extend_from_slice(&head[start..start + in_head]);
    drop(head);
    let rest = (want - in_head) as u64;
    if rest > 0 {
        (&mut dec)
            .take(rest)
            .read_to_end(&mut json)
            .map_err(gzip_err)?;
    }
    if json.len() != want {
        return Err(short(json.len() as u64));
    }
    Ok(json)
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use proptest::prelude::*;

    use super::super::testutil::{blob_with_member, blob_with_toc, gzip, tar_file, toc};
    use super::super::writer::{footer_bytes, write_estargz, WriterOptions};
    use super::*;
    use crate::toc::json::TocJsonError;

    fn open(blob: &[u8]) -> Result<OpenedToc, EstargzError> {
        open_toc(blob, 0, blob.len() as u64, None, &ReaderConfig::default())
    }

    #[test]
    fn refuses_the_shared_entry_cases() {
        use crate::toc::json::conformance::entry_cases;
        for (name, entries, expected) in entry_cases() {
            match open(&blob_with_toc(&toc(&entries))) {
                Err(EstargzError::Toc(e)) => assert!(expected(&e), "{name}: {e}"),
                other => panic!("{name}: unexpected {other:?}"),
            }
        }
    }

    fn d(data: &[u8]) -> String {
        Digest::sha256_of(data).to_string()
    }

    /// A small real blob from the writer.
    fn sample_blob() -> &'static [u8] {
        static BLOB: OnceLock<Vec<u8>> = OnceLock::new();
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
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(3000);
            b.append_data(&mut h, "bin/sh", &[7u8; 3000][..]).unwrap();
            let tar = b.into_inner().unwrap();
            let opts = WriterOptions {
                chunk_size: 1024,
                ..WriterOptions::default()
            };
            let mut out = Vec::new();
            write_estargz(&tar[..], &mut out, &opts).unwrap();
            out
        })
    }

    #[test]
    fn footer_round_trip_and_variants() {
        let f = footer_bytes(0x1234_5678_9abc);
        assert_eq!(f.len(), FOOTER_SIZE);
        // The footer is an empty gzip member.
        let mut out = Vec::new();
        GzDecoder::new(&f[..]).read_to_end(&mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(
            parse_footer(&f).unwrap(),
            (
                Footer::Estargz {
                    toc_offset: 0x1234_5678_9abc
                },
                FOOTER_SIZE
            )
        );
        // With more bytes before it.
        let mut tail = vec![9u8; 100];
        tail.extend_from_slice(&f);
        assert_eq!(parse_footer(&tail).unwrap().1, FOOTER_SIZE);

        // Legacy: bare "%016xSTARGZ" Extra field.
        let mut legacy = vec![0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 22, 0];
        legacy.extend_from_slice(b"00000000000003e8STARGZ");
        legacy.extend_from_slice(&EMPTY_MEMBER_BODY);
        assert_eq!(legacy.len(), LEGACY_FOOTER_SIZE);
        let mut tail = vec![1u8; 10];
        tail.extend_from_slice(&legacy);
        assert_eq!(
            parse_footer(&tail).unwrap(),
            (Footer::Legacy { toc_offset: 1000 }, LEGACY_FOOTER_SIZE)
        );

        // External TOC.
        let mut ext = vec![
            0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 21, 0, b'S', b'G', 17, 0,
        ];
        ext.extend_from_slice(EXTERNAL_TOC_MAGIC);
        ext.extend_from_slice(&EMPTY_MEMBER_BODY);
        assert_eq!(ext.len(), EXTERNAL_TOC_FOOTER_SIZE);
        assert_eq!(
            parse_footer(&ext).unwrap(),
            (Footer::ExternalToc, EXTERNAL_TOC_FOOTER_SIZE)
        );
        let mut blob = vec![0u8; 1000];
        blob.extend_from_slice(&ext);
        assert!(matches!(
            open(&blob),
            Err(EstargzError::ExternalTocUnsupported)
        ));
    }

    #[test]
    fn legacy_blob_opens() {
        let json = toc(&format!(
            r#"{{"name":"a","type":"reg","size":1,"offset":10,"digest":"{}"}}"#,
            d(b"a")
        ));
        let member = gzip(&tar_file(TOC_TAR_NAME, json.as_bytes()));
        let mut blob = vec![0u8; 100];
        blob.extend_from_slice(&member);
        blob.extend_from_slice(&[0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 22, 0]);
        blob.extend_from_slice(b"0000000000000064STARGZ");
        blob.extend_from_slice(&EMPTY_MEMBER_BODY);
        let opened = open(&blob).unwrap();
        assert_eq!(opened.toc_offset, 100);
        let id = opened.layer.resolve("a").unwrap();
        let c = opened.layer.chunks(id);
        assert_eq!((c[0].blob_offset, c[0].blob_len), (10, 90));
        assert_eq!(c[0].digest, Some(Digest::sha256_of(b"a")));
        assert_eq!(opened.prefetch, Prefetch::Unspecified);
    }

    #[test]
    fn chunk_lengths_inner_offsets_and_forward_hardlinks() {
        let json = toc(&format!(
            concat!(
                r#"{{"name":"h","type":"hardlink","linkName":"f"}},"#,
                r#"{{"name":"f","type":"reg","size":10,"offset":100,"chunkSize":4,"chunkDigest":"{a}","digest":"{b}","mode":33261,"uid":5,"gid":6,"modtime":"2019-08-20T10:30:43Z"}},"#,
                r#"{{"name":"f","type":"chunk","offset":100,"innerOffset":4,"chunkOffset":4,"chunkSize":4,"chunkDigest":"{a}"}},"#,
                r#"{{"type":"chunk","offset":300,"chunkOffset":8,"chunkDigest":"{c}"}},"#,
                r#"{{"name":".prefetch.landmark","type":"reg","size":1,"offset":400,"chunkDigest":"{a}"}},"#,
                r#"{{"name":"g","type":"reg","size":2,"offset":500,"digest":"{c}","xattrs":{{"user.k":"dmFs"}}}}"#
            ),
            a = d(b"x"),
            b = d(b"y"),
            c = d(b"z")
        ));
        let opened = open(&blob_with_toc(&json)).unwrap();
        let l = &opened.layer;
        let f = l.resolve("f").unwrap();
        assert_eq!(l.resolve("h"), Some(f));
        assert_eq!(l.node(f).unwrap().nlink, 2);
        let n = l.node(f).unwrap();
        assert_eq!(
            (n.mode, n.uid, n.gid, n.mtime),
            (0o755, 5, 6, 1_566_297_043)
        );
        let c: Vec<(u64, u64, u64, u64, u64)> = l
            .chunks(f)
            .iter()
            .map(|c| {
                (
                    c.file_offset,
                    c.size,
                    c.blob_offset,
                    c.blob_len,
                    c.inner_offset,
                )
            })
            .collect();
        assert_eq!(
            c,
            vec![
                (0, 4, 100, 200, 0),
                (4, 4, 100, 200, 4),
                (8, 2, 300, 100, 0)
            ]
        );
        assert_eq!(l.file_digest(f), Some(&Digest::sha256_of(b"y")));
        assert_eq!(l.resolve(".prefetch.landmark"), None);
        assert_eq!(opened.prefetch, Prefetch::Until { blob_offset: 400 });
        let g = l.resolve("g").unwrap();
        // Last chunk ends at the TOC.
        assert_eq!(l.chunks(g)[0].blob_len, 4096 - 500);
        let x: Vec<(&[u8], &[u8])> = l.xattrs(g).collect();
        assert_eq!(x, vec![(&b"user.k"[..], &b"val"[..])]);
    }

    #[test]
    fn need_more_when_tail_misses_the_toc() {
        let blob = sample_blob();
        let len = blob.len() as u64;
        let full = open(blob).unwrap();
        let tail = &blob[blob.len() - 60..];
        match open_toc(tail, len - 60, len, None, &ReaderConfig::default()) {
            Err(EstargzError::NeedMore { from }) => assert_eq!(from, full.toc_offset),
            other => panic!("{other:?}"),
        }
        let from = full.toc_offset as usize;
        let again = open_toc(
            &blob[from..],
            from as u64,
            len,
            Some(&full.toc_digest),
            &ReaderConfig::default(),
        )
        .unwrap();
        assert_eq!(again.toc_digest, full.toc_digest);
        // A tail shorter than the footer asks for the footer.
        match open_toc(
            &blob[blob.len() - 10..],
            len - 10,
            len,
            None,
            &ReaderConfig::default(),
        ) {
            Err(EstargzError::NeedMore { from }) => assert_eq!(from, len - 51),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tail_read_len_is_bounded() {
        assert_eq!(tail_read_len(100), 100);
        assert_eq!(tail_read_len(10 << 20), 1 << 20);
        assert_eq!(tail_read_len(640 << 20), 10 << 20);
        assert_eq!(tail_read_len(u64::MAX), 16 << 20);
    }

    type Case = (
        &'static str,
        Box<dyn Fn() -> Result<OpenedToc, EstargzError>>,
        fn(&EstargzError) -> bool,
    );

    #[test]
    fn hostile_inputs_give_specific_errors() {
        let cases: Vec<Case> = vec![
            (
                "truncated footer",
                Box::new(|| {
                    let f = footer_bytes(0);
                    open_toc(&f[..30], 0, 30, None, &ReaderConfig::default())
                }),
                |e| matches!(e, EstargzError::TruncatedFooter { len: 30, .. }),
            ),
            (
                "wrong magic",
                Box::new(|| {
                    let mut b = sample_blob().to_vec();
                    let n = b.len();
                    b[n - 14] = b'Y'; // STARGZ -> STARGY
                    open(&b)
                }),
                |e| matches!(e, EstargzError::BadFooter { detail } if detail.contains("STARGZ")),
            ),
            (
                "garbled footer body",
                Box::new(|| {
                    let mut b = sample_blob().to_vec();
                    let n = b.len();
                    b[n - 3] = 1; // ISIZE != 0
                    open(&b)
                }),
                |e| matches!(e, EstargzError::BadFooter { .. }),
            ),
            (
                "toc_offset past end",
                Box::new(|| {
                    let mut b = vec![0u8; 100];
                    b.extend_from_slice(&footer_bytes(1000));
                    open(&b)
                }),
                |e| {
                    matches!(
                        e,
                        EstargzError::TocOffsetOutOfRange {
                            toc_offset: 1000,
                            blob_size: 151
                        }
                    )
                },
            ),
            (
                "toc_offset inside footer",
                Box::new(|| {
                    let mut b = vec![0u8; 100];
                    b.extend_from_slice(&footer_bytes(110));
                    open(&b)
                }),
                |e| {
                    matches!(
                        e,
                        EstargzError::TocOffsetInFooter {
                            toc_offset: 110,
                            footer_start: 100,
                            ..
                        }
                    )
                },
            ),
            (
                "TOC member not gzip",
                Box::new(|| open(&blob_with_member(10, b"this is not gzip at all"))),
                |e| matches!(e, EstargzError::TocGzip { offset: 10, .. }),
            ),
            (
                "TOC member corrupt gzip",
                Box::new(|| {
                    let mut m = gzip(&tar_file(TOC_TAR_NAME, toc("").as_bytes()));
                    let n = m.len();
                    m[n - 6] ^= 0xff; // CRC
                    open(&blob_with_member(10, &m))
                }),
                |e| matches!(e, EstargzError::TocGzip { .. }),
            ),
            (
                "TOC gzip bomb",
                Box::new(|| {
                    let mut h = tar::Header::new_ustar();
                    h.set_path(TOC_TAR_NAME).unwrap();
                    h.set_size(100 << 20);
                    h.set_cksum();
                    let mut data = h.as_bytes().to_vec();
                    data.resize(8 << 20, b' ');
                    let blob = blob_with_member(10, &gzip(&data));
                    let cfg = ReaderConfig {
                        max_toc_json_bytes: 1 << 20,
                        ..ReaderConfig::default()
                    };
                    open_toc(&blob, 0, blob.len() as u64, None, &cfg)
                }),
                |e| {
                    matches!(
                        e,
                        EstargzError::TooLarge {
                            what: "TOC JSON",
                            ..
                        }
                    )
                },
            ),
            (
                "TOC member larger than its tar header says",
                Box::new(|| {
                    let mut h = tar::Header::new_ustar();
                    h.set_path(TOC_TAR_NAME).unwrap();
                    h.set_size(100);
                    h.set_cksum();
                    let mut data = h.as_bytes().to_vec();
                    data.resize(64 << 20, b' ');
                    let blob = blob_with_member(10, &gzip(&data));
                    // Only the declared 100 bytes are decompressed: they are no JSON.
                    open_toc(&blob, 0, blob.len() as u64, None, &ReaderConfig::default())
                }),
                |e| matches!(e, EstargzError::Toc(TocJsonError::TocJson { .. })),
            ),
            (
                "compressed TOC over limit",
                Box::new(|| {
                    let blob = sample_blob();
                    let cfg = ReaderConfig {
                        max_toc_bytes: 10,
                        ..ReaderConfig::default()
                    };
                    open_toc(blob, 0, blob.len() as u64, None, &cfg)
                }),
                |e| {
                    matches!(
                        e,
                        EstargzError::TooLarge {
                            what: "compressed TOC member",
                            limit: 10,
                            ..
                        }
                    )
                },
            ),
            (
                "tar size claims more than present",
                Box::new(|| {
                    let mut t = tar_file(TOC_TAR_NAME, toc("").as_bytes());
                    t.truncate(512 + 10);
                    open(&blob_with_member(10, &gzip(&t)))
                }),
                |e| matches!(e, EstargzError::TocTar { detail, .. } if detail.contains("claims")),
            ),
            (
                "TOC entry misnamed",
                Box::new(|| open(&blob_with_member(10, &gzip(&tar_file("other.json", b"{}"))))),
                |e| matches!(e, EstargzError::TocTar { detail, .. } if detail.contains("other.json")),
            ),
            (
                "non-JSON",
                Box::new(|| open(&blob_with_toc("not json"))),
                |e| matches!(e, EstargzError::Toc(TocJsonError::TocJson { .. })),
            ),
            (
                "JSON not an object",
                Box::new(|| open(&blob_with_toc("[1,2,3]"))),
                |e| matches!(e, EstargzError::Toc(TocJsonError::TocJson { .. })),
            ),
            (
                "missing version",
                Box::new(|| open(&blob_with_toc(r#"{"entries":[]}"#))),
                |e| matches!(e, EstargzError::Toc(TocJsonError::TocJson { detail }) if detail.contains("version")),
            ),
            (
                "version 2",
                Box::new(|| {
                    open(&blob_with_toc(
                        r#"{"version":2,"entries":[{"weird":true}]}"#,
                    ))
                }),
                |e| matches!(e, EstargzError::Toc(TocJsonError::UnsupportedVersion { found: v, .. }) if v == "2"),
            ),
            (
                "TOC digest mismatch",
                Box::new(|| {
                    let blob = sample_blob();
                    let wrong = Digest::sha256_of(b"something else");
                    open_toc(
                        blob,
                        0,
                        blob.len() as u64,
                        Some(&wrong),
                        &ReaderConfig::default(),
                    )
                }),
                |e| matches!(e, EstargzError::TocDigestMismatch { .. }),
            ),
            (
                "too many entries",
                Box::new(|| {
                    let blob = blob_with_toc(&toc(&[r#"{"name":"d","type":"dir"}"#; 5].join(",")));
                    let cfg = ReaderConfig {
                        max_entries: 3,
                        ..ReaderConfig::default()
                    };
                    open_toc(&blob, 0, blob.len() as u64, None, &cfg)
                }),
                |e| {
                    matches!(
                        e,
                        EstargzError::Toc(TocJsonError::TooManyEntries { limit: 3 })
                    )
                },
            ),
            (
                "tail not at the blob end",
                Box::new(|| {
                    let blob = sample_blob();
                    open_toc(
                        blob,
                        0,
                        blob.len() as u64 + 1,
                        None,
                        &ReaderConfig::default(),
                    )
                }),
                |e| matches!(e, EstargzError::BadTail { .. }),
            ),
        ];
        assert!(cases.len() >= 15);
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
        fn parse_footer_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_footer(&bytes);
            let blob_size = bytes.len() as u64;
            let _ = open_toc(&bytes, 0, blob_size, None, &ReaderConfig::default());
        }

        #[test]
        fn footer_mutations_never_panic(edits in proptest::collection::vec((0usize..51, any::<u8>()), 1..6)) {
            let f = footer_bytes(1234);
            let (m, _) = mutate(&f, &edits, 0);
            let _ = parse_footer(&m);
        }

        #[test]
        fn blob_tail_mutations_never_panic(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            cut in any::<usize>(),
            tail_edits in proptest::collection::vec((0usize..400, any::<u8>()), 0..4),
        ) {
            let base = sample_blob();
            let (mut tail, start) = mutate(base, &edits, cut);
            let n = tail.len();
            for (i, v) in tail_edits {
                if i < n {
                    tail[n - 1 - i] = v;
                }
            }
            let _ = open_toc(&tail, start, base.len() as u64, None, &ReaderConfig::default());
        }

        #[test]
        fn toc_json_mutations_never_panic(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            trunc in any::<usize>(),
        ) {
            let (x, y) = (d(b"x"), d(b"y"));
            let json = toc(&format!(
                r#"{{"name":"d/","type":"dir","mode":16877,"modtime":"2019-08-20T10:30:43Z"}},{{"name":"d/f","type":"reg","size":10,"offset":100,"chunkSize":6,"chunkDigest":"{x}","xattrs":{{"a":"Yg=="}}}},{{"name":"d/f","type":"chunk","offset":200,"chunkOffset":6,"chunkDigest":"{y}"}},{{"name":"l","type":"hardlink","linkName":"d/f"}},{{"name":"c","type":"char","devMajor":1,"devMinor":3}},{{"name":".prefetch.landmark","type":"reg","size":1,"offset":300,"chunkDigest":"{x}"}}"#
            ));
            prop_assert!(open(&blob_with_toc(&json)).is_ok());
            let mut j = json.into_bytes();
            let n = j.len();
            for (i, v) in edits {
                j[i % n] = v;
            }
            j.truncate(n - trunc % 8);
            let s = String::from_utf8_lossy(&j).into_owned();
            let _ = open(&blob_with_toc(&s));
        }
    }
}
