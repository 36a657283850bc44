//! The TOC JSON shared by eStargz and zstd:chunked: streamed, checked and turned into a
//! [`Layer`].
//!
//! Both formats describe their files with the same CRFS-style JSON table of contents (an object
//! with `version` and `entries`, one entry per file and per extra chunk). They differ only in
//! where the TOC is stored, how it is compressed and a few fields, which a [`Dialect`] names.
//! The format readers find, decompress and verify the TOC bytes; this module owns everything
//! after that, so a rule about entries (a limit, a hard-link order, a landmark) is written once.
//!
//! Entries are converted while the JSON streams by, so a TOC of millions of entries is never
//! held twice, and every number taken from it is checked before it is used: a hostile TOC
//! gives a [`TocJsonError`] naming the entry, never a panic or an unbounded allocation.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

use base64::Engine as _;
use lazypull_fetcher::Digest;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Number;

use super::time::parse_rfc3339;
use super::{split_path, Chunk, Entry, Kind, Layer, LayerBuilder, TocError};

/// Path of the eStargz landmark entry: chunks before it are the ones the workload reads first.
/// stargz-snapshotter writes it in zstd:chunked TOCs too, so both dialects honour it.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";

/// Path of the eStargz landmark entry that says nothing is worth prefetching.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";

/// Top-level TOC key (an extension: other readers ignore unknown keys) in which lazypull's
/// zstd:chunked writer records the blob offset where the data of the entries it placed first
/// for prefetching ends; 0 means "nothing to prefetch". zstd:chunked has no landmark files, and
/// adding one would put a stray file into every container that podman unpacks from the layer.
pub const PREFETCH_END_KEY: &str = "lazypull.prefetchEnd";

/// Manifest layer annotation with the digest of the TOC JSON. stargz-snapshotter sets it on
/// eStargz layers and on its zstd:chunked layers, so both readers check it.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";

/// What one format's TOC may contain beyond the common fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dialect {
    /// The format's name, for error messages.
    pub format: &'static str,
    /// TOC versions the format defines.
    pub versions: &'static [u64],
    /// How an error says which versions are defined.
    pub versions_text: &'static str,
    /// containers/storage's additions: an entry's `endOffset` and `chunkType`, and the
    /// top-level `tarSplitDigest` and [`PREFETCH_END_KEY`]. eStargz ignores these keys, as
    /// stargz-snapshotter does.
    pub frame_fields: bool,
}

/// eStargz (stargz-snapshotter's `estargz` package): version 1, data in gzip members.
pub const ESTARGZ: Dialect = Dialect {
    format: "eStargz",
    versions: &[1],
    versions_text: "only version 1 is defined",
    frame_fields: false,
};

/// zstd:chunked (containers/storage, and stargz-snapshotter's eStargz-style TOC in zstd).
pub const ZSTD_CHUNKED: Dialect = Dialect {
    format: "zstd:chunked",
    versions: &[1, 2],
    versions_text: "versions 1 and 2 are defined",
    frame_fields: true,
};

/// Limits on what a blob may make the reader allocate. A TOC comes from an untrusted registry
/// before its digest can be checked, so each size it claims is bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderConfig {
    /// Largest compressed TOC member accepted (default 64 MiB).
    pub max_toc_bytes: u64,
    /// Largest decompressed TOC JSON accepted (default 256 MiB).
    pub max_toc_json_bytes: u64,
    /// Most TOC entries (files plus chunks) accepted (default 4 Mi).
    pub max_entries: usize,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        ReaderConfig {
            max_toc_bytes: 64 << 20,
            max_toc_json_bytes: 256 << 20,
            max_entries: 4 << 20,
        }
    }
}

/// What the prefetch hints of a TOC (landmark entries or [`PREFETCH_END_KEY`]) say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch {
    /// `.no.prefetch.landmark`: the builder decided nothing is worth prefetching.
    None,
    /// Chunks whose data starts before `blob_offset` belong to the files the workload reads
    /// first; fetch `[0, blob_offset)` eagerly.
    Until {
        /// Blob offset where the prefetch area ends.
        blob_offset: u64,
    },
    /// No hint: the builder said nothing either way.
    Unspecified,
}

/// Why a TOC's JSON or one of its entries was refused. Every variant names the entry involved,
/// because these errors end up in logs of a daemon mounting someone else's image.
#[derive(Debug, thiserror::Error)]
pub enum TocJsonError {
    /// The TOC is not the JSON object the format describes.
    #[error("TOC JSON is invalid: {detail}")]
    TocJson {
        /// What is wrong (with serde's line/column).
        detail: String,
    },
    /// The TOC declares a version its format does not define.
    #[error("unsupported {format} TOC version {found} ({defined})")]
    UnsupportedVersion {
        /// The format read.
        format: &'static str,
        /// The version found.
        found: String,
        /// Which versions are defined.
        defined: &'static str,
    },
    /// More TOC entries than the reader's limit.
    #[error("TOC has more than {limit} entries")]
    TooManyEntries {
        /// The configured limit.
        limit: usize,
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
    #[error("TOC entry #{index} ({name:?}) has {field} {offset}, outside the blob's data area [0, {data_end})")]
    OffsetOutOfRange {
        /// Position in the TOC's entry list.
        index: usize,
        /// Its name.
        name: String,
        /// Which field.
        field: &'static str,
        /// The value found (may be negative).
        offset: i128,
        /// Where the data area ends (where the TOC or the first metadata frame starts).
        data_end: u64,
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
}

/// A TOC whose entries have been checked, with its top-level fields.
pub struct ParsedToc {
    conv: Converter,
    /// The TOC's `version` (one the dialect defines).
    pub version: u32,
    /// `tarSplitDigest` (zstd:chunked: digest of the compressed tar-split data).
    pub tar_split_digest: Option<Digest>,
    /// [`PREFETCH_END_KEY`], checked to lie inside the data area.
    pub prefetch_end: Option<u64>,
}

impl ParsedToc {
    /// Fills in each chunk's compressed length, resolves hard links and builds the layer; the
    /// prefetch hint comes from the landmark entries, else from [`PREFETCH_END_KEY`].
    pub fn build(self) -> Result<(Layer, Prefetch), TocJsonError> {
        self.conv.build(self.prefetch_end)
    }
}

/// One TOC entry as JSON. Numbers are kept as [`Number`] so negative, fractional or huge
/// values get a precise error; unknown fields (`accesstime`, `changetime`, `userName`, ...) are
/// ignored.
#[derive(Deserialize, Default)]
#[serde(default)]
struct JsonEntry {
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    size: Option<Number>,
    modtime: Option<String>,
    #[serde(rename = "linkName")]
    link_name: Option<String>,
    mode: Option<Number>,
    uid: Option<Number>,
    gid: Option<Number>,
    offset: Option<Number>,
    #[serde(rename = "endOffset")]
    end_offset: Option<Number>,
    #[serde(rename = "innerOffset")]
    inner_offset: Option<Number>,
    #[serde(rename = "devMajor")]
    dev_major: Option<Number>,
    #[serde(rename = "devMinor")]
    dev_minor: Option<Number>,
    xattrs: Option<BTreeMap<String, Option<String>>>,
    digest: Option<String>,
    #[serde(rename = "chunkOffset")]
    chunk_offset: Option<Number>,
    #[serde(rename = "chunkSize")]
    chunk_size: Option<Number>,
    #[serde(rename = "chunkDigest")]
    chunk_digest: Option<String>,
    #[serde(rename = "chunkType")]
    chunk_type: Option<String>,
}

/// The non-empty regular file whose chunk list `chunk` entries may still extend.
struct OpenFile {
    pos: usize,
    path: String,
}

/// Turns TOC entries into model entries as the JSON is parsed, so the JSON entries are never
/// all held at once.
struct Converter {
    /// End of the data area (where the TOC or the first metadata frame starts).
    area_end: u64,
    dialect: Dialect,
    max_entries: usize,
    seen: usize,
    /// (TOC index, entry); chunk `blob_len`s are filled in by [`Converter::build`].
    entries: Vec<(usize, Entry)>,
    /// Every frame boundary named by an entry (`offset`s and `endOffset`s), to find where each
    /// chunk's frames end.
    bounds: Vec<u64>,
    open: Option<OpenFile>,
    no_prefetch: bool,
    prefetch_at: Option<u64>,
}

fn bad_entry(index: usize, name: &str, detail: String) -> TocJsonError {
    TocJsonError::BadEntry {
        index,
        name: name.to_string(),
        detail,
    }
}

fn num_u64(
    index: usize,
    name: &str,
    field: &'static str,
    n: &Option<Number>,
) -> Result<Option<u64>, TocJsonError> {
    match n {
        None => Ok(None),
        Some(n) => n.as_u64().map(Some).ok_or_else(|| {
            bad_entry(
                index,
                name,
                format!("{field} {n} is not a non-negative 64-bit integer"),
            )
        }),
    }
}

fn num_u32(
    index: usize,
    name: &str,
    field: &'static str,
    n: &Option<Number>,
) -> Result<u32, TocJsonError> {
    match num_u64(index, name, field, n)? {
        None => Ok(0),
        Some(v) => u32::try_from(v)
            .map_err(|_| bad_entry(index, name, format!("{field} {v} does not fit in 32 bits"))),
    }
}

fn parse_digest(
    index: usize,
    name: &str,
    field: &'static str,
    s: &Option<String>,
) -> Result<Option<Digest>, TocJsonError> {
    match s.as_deref() {
        None | Some("") => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|e| bad_entry(index, name, format!("{field}: {e}"))),
    }
}

impl Converter {
    fn new(area_end: u64, max_entries: usize, dialect: Dialect) -> Converter {
        Converter {
            area_end,
            dialect,
            max_entries,
            seen: 0,
            entries: Vec::new(),
            bounds: Vec::new(),
            open: None,
            no_prefetch: false,
            prefetch_at: None,
        }
    }

    /// Validates a blob offset field of entry `index`: `offset` must lie inside the data area,
    /// `endOffset` may also be its end.
    fn blob_offset(
        &self,
        index: usize,
        name: &str,
        field: &'static str,
        n: &Option<Number>,
        inclusive_end: bool,
    ) -> Result<Option<u64>, TocJsonError> {
        let Some(n) = n else { return Ok(None) };
        let out_of_range = |offset: i128| TocJsonError::OffsetOutOfRange {
            index,
            name: name.to_string(),
            field,
            offset,
            data_end: self.area_end,
        };
        if let Some(v) = n.as_u64() {
            let ok = if inclusive_end {
                v <= self.area_end
            } else {
                v < self.area_end
            };
            return if ok {
                Ok(Some(v))
            } else {
                Err(out_of_range(i128::from(v)))
            };
        }
        if let Some(v) = n.as_i64() {
            return Err(out_of_range(i128::from(v)));
        }
        Err(bad_entry(
            index,
            name,
            format!("{field} {n} is not an integer"),
        ))
    }

    fn add(&mut self, index: usize, je: JsonEntry) -> Result<(), TocJsonError> {
        self.seen += 1;
        if self.seen > self.max_entries {
            return Err(TocJsonError::TooManyEntries {
                limit: self.max_entries,
            });
        }
        let name = je.name.clone().unwrap_or_default();
        let offset = self.blob_offset(index, &name, "offset", &je.offset, false)?;
        let end_offset = match self.dialect.frame_fields {
            true => self.blob_offset(index, &name, "endOffset", &je.end_offset, true)?,
            false => None,
        };
        if let (Some(o), Some(e)) = (offset, end_offset) {
            if e <= o {
                return Err(bad_entry(
                    index,
                    &name,
                    format!("endOffset {e} is not after offset {o}"),
                ));
            }
        }
        self.bounds.extend(offset);
        self.bounds.extend(end_offset);
        match je.chunk_type.as_deref() {
            _ if !self.dialect.frame_fields => {}
            None | Some("") | Some("zeros") => {}
            Some(other) => {
                return Err(bad_entry(
                    index,
                    &name,
                    format!("unknown chunkType {other:?} (only \"\" and \"zeros\" are defined)"),
                ))
            }
        }
        let kind = match je.kind.as_deref().unwrap_or("") {
            "chunk" => return self.add_chunk(index, &name, &je, offset),
            "dir" => Kind::Dir,
            "reg" | "hardlink" => Kind::File,
            "symlink" => Kind::Symlink,
            "char" => Kind::CharDevice,
            "block" => Kind::BlockDevice,
            "fifo" => Kind::Fifo,
            other => {
                return Err(TocJsonError::UnknownType {
                    index,
                    name,
                    kind: other.to_string(),
                })
            }
        };
        let is_hardlink = je.kind.as_deref() == Some("hardlink");
        self.finish_file()?;

        let parts = split_path(&name).map_err(|source| TocJsonError::Layer {
            index,
            name: name.clone(),
            source,
        })?;
        let path = parts.join("/");
        if path == PREFETCH_LANDMARK {
            self.prefetch_at = offset.or(self.prefetch_at);
            return Ok(());
        }
        if path == NO_PREFETCH_LANDMARK {
            self.no_prefetch = true;
            return Ok(());
        }

        let mut e = Entry::new(name.clone(), kind);
        let mode = num_u64(index, &name, "mode", &je.mode)?.unwrap_or(0);
        e.mode = (mode & 0o7777) as u32;
        e.uid = num_u32(index, &name, "uid", &je.uid)?;
        e.gid = num_u32(index, &name, "gid", &je.gid)?;
        e.mtime = match je.modtime.as_deref() {
            None | Some("") => 0,
            Some(t) => parse_rfc3339(t).ok_or_else(|| {
                bad_entry(
                    index,
                    &name,
                    format!("modtime {t:?} is not an RFC 3339 time"),
                )
            })?,
        };
        if let Some(x) = &je.xattrs {
            for (k, v) in x {
                let value = match v {
                    None => Vec::new(),
                    Some(v) => base64::engine::general_purpose::STANDARD
                        .decode(v)
                        .map_err(|err| {
                            bad_entry(
                                index,
                                &name,
                                format!("xattr {k:?} is not valid base64: {err}"),
                            )
                        })?,
                };
                e.xattrs.push((k.clone(), value));
            }
        }
        match je.kind.as_deref() {
            Some("symlink") => e.link_target = je.link_name.clone(),
            Some("hardlink") => {
                let target = je
                    .link_name
                    .clone()
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| bad_entry(index, &name, "hard link without linkName".into()))?;
                e.hardlink_target = Some(target);
            }
            Some("char") | Some("block") => {
                e.dev_major = num_u32(index, &name, "devMajor", &je.dev_major)?;
                e.dev_minor = num_u32(index, &name, "devMinor", &je.dev_minor)?;
            }
            _ => {}
        }
        if kind == Kind::File && !is_hardlink {
            e.digest = parse_digest(index, &name, "digest", &je.digest)?;
            e.size = num_u64(index, &name, "size", &je.size)?.unwrap_or(0);
            if e.size > 0 {
                let chunk = self.chunk_of(index, &name, &je, offset, e.size)?;
                e.chunks.push(chunk);
                self.open = Some(OpenFile {
                    pos: self.entries.len(),
                    path,
                });
            }
        }
        self.entries.push((index, e));
        Ok(())
    }

    /// The chunk a `reg` or `chunk` entry describes (`blob_len` still 0).
    fn chunk_of(
        &self,
        index: usize,
        name: &str,
        je: &JsonEntry,
        offset: Option<u64>,
        file_size: u64,
    ) -> Result<Chunk, TocJsonError> {
        let bad = |detail: String| bad_entry(index, name, detail);
        let blob_offset = offset.ok_or_else(|| bad("file data without an offset".into()))?;
        let file_offset = num_u64(index, name, "chunkOffset", &je.chunk_offset)?.unwrap_or(0);
        let size = match num_u64(index, name, "chunkSize", &je.chunk_size)? {
            Some(s) if s > 0 => s,
            // 0 or absent: the chunk runs to the end of the file.
            _ => file_size.checked_sub(file_offset).ok_or_else(|| {
                bad(format!(
                    "chunkOffset {file_offset} lies beyond the file size {file_size}"
                ))
            })?,
        };
        let inner_offset = num_u64(index, name, "innerOffset", &je.inner_offset)?.unwrap_or(0);
        if inner_offset.checked_add(size).is_none() {
            return Err(bad(format!(
                "innerOffset {inner_offset} plus chunk size {size} overflows"
            )));
        }
        Ok(Chunk {
            file_offset,
            size,
            blob_offset,
            blob_len: 0,
            inner_offset,
            digest: parse_digest(index, name, "chunkDigest", &je.chunk_digest)?,
        })
    }

    fn add_chunk(
        &mut self,
        index: usize,
        name: &str,
        je: &JsonEntry,
        offset: Option<u64>,
    ) -> Result<(), TocJsonError> {
        let orphan = |detail: String| TocJsonError::OrphanChunk {
            index,
            name: name.to_string(),
            detail,
        };
        let Some(open) = &self.open else {
            return Err(orphan(String::new()));
        };
        if !name.is_empty() {
            let same = split_path(name).is_ok_and(|p| p.join("/") == open.path);
            if !same {
                return Err(orphan(format!(" (it follows {:?})", open.path)));
            }
        }
        let pos = open.pos;
        let file_size = self.entries.get(pos).map(|(_, e)| e.size).unwrap_or(0);
        let chunk = self.chunk_of(index, name, je, offset, file_size)?;
        if let Some((_, e)) = self.entries.get_mut(pos) {
            e.chunks.push(chunk);
        }
        Ok(())
    }

    /// Closes the open file: a single chunk without `chunkDigest` takes the file's `digest`
    /// (containers/storage writes chunk fields only for files of several chunks); every chunk
    /// must then have a digest, since unverifiable data is never served.
    fn finish_file(&mut self) -> Result<(), TocJsonError> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let Some((index, e)) = self.entries.get_mut(open.pos) else {
            return Ok(());
        };
        if let [only] = e.chunks.as_mut_slice() {
            if only.digest.is_none() {
                only.digest = e.digest;
            }
        }
        if let Some(c) = e.chunks.iter().find(|c| c.digest.is_none()) {
            return Err(bad_entry(
                *index,
                &e.path,
                format!(
                    "chunk at file offset {} has no chunkDigest (nor is it a whole file with a digest), so it could not be verified",
                    c.file_offset
                ),
            ));
        }
        Ok(())
    }

    /// Fills chunk lengths and builds the tree.
    fn build(mut self, prefetch_end: Option<u64>) -> Result<(Layer, Prefetch), TocJsonError> {
        self.finish_file()?;
        let mut bounds = std::mem::take(&mut self.bounds);
        bounds.sort_unstable();
        bounds.dedup();
        let area_end = self.area_end;
        for (_, e) in &mut self.entries {
            for c in &mut e.chunks {
                let i = bounds.partition_point(|&o| o <= c.blob_offset);
                let next = bounds.get(i).copied().unwrap_or(area_end);
                c.blob_len = next.saturating_sub(c.blob_offset);
            }
        }
        drop(bounds);

        let mut b = LayerBuilder::new();
        let mut deferred: Vec<Deferred> = Vec::new();
        let mut deferred_by_path: HashMap<String, usize> = HashMap::new();
        for (index, entry) in std::mem::take(&mut self.entries) {
            let layer_err = |source: TocError, name: &str| TocJsonError::Layer {
                index,
                name: name.to_string(),
                source,
            };
            if !deferred_by_path.is_empty() {
                if let Some(j) = deferred_by_path.remove(&norm(&entry.path)) {
                    if let Some(d) = deferred.get_mut(j) {
                        d.superseded = true;
                    }
                }
            }
            match &entry.hardlink_target {
                Some(target) => match b.add(entry.clone()) {
                    Ok(()) => {}
                    // A target that comes later (a reordered TOC): link once all is known.
                    Err(TocError::BadHardlink { .. }) => {
                        let path = norm(&entry.path);
                        let target = norm(target);
                        deferred_by_path.insert(path, deferred.len());
                        deferred.push(Deferred {
                            index,
                            entry,
                            target,
                            superseded: false,
                        });
                    }
                    Err(e) => return Err(layer_err(e, &entry.path)),
                },
                None => {
                    let name = entry.path.clone();
                    b.add(entry).map_err(|e| layer_err(e, &name))?;
                }
            }
        }
        for i in hardlink_order(&deferred, &deferred_by_path)? {
            let Some(d) = deferred.get(i) else { continue };
            b.add(d.entry.clone())
                .map_err(|source| TocJsonError::Layer {
                    index: d.index,
                    name: d.entry.path.clone(),
                    source,
                })?;
        }
        let prefetch = if self.no_prefetch {
            Prefetch::None
        } else if let Some(blob_offset) = self.prefetch_at {
            Prefetch::Until { blob_offset }
        } else {
            match prefetch_end {
                Some(0) => Prefetch::None,
                Some(blob_offset) => Prefetch::Until { blob_offset },
                None => Prefetch::Unspecified,
            }
        };
        Ok((b.build(), prefetch))
    }
}

/// A hard link whose target was not (yet) in the tree when it was met.
struct Deferred {
    index: usize,
    entry: Entry,
    target: String,
    /// A later entry with the same path replaced it.
    superseded: bool,
}

fn norm(path: &str) -> String {
    split_path(path)
        .map(|p| p.join("/"))
        .unwrap_or_else(|_| path.to_string())
}

/// Orders deferred hard links so each comes after the deferred link it points to; a cycle is
/// an error (it can never be resolved).
fn hardlink_order(
    deferred: &[Deferred],
    by_path: &HashMap<String, usize>,
) -> Result<Vec<usize>, TocJsonError> {
    const NEW: u8 = 0;
    const ACTIVE: u8 = 1;
    let mut state = vec![NEW; deferred.len()];
    let mut order = Vec::with_capacity(deferred.len());
    for start in 0..deferred.len() {
        if deferred.get(start).is_none_or(|d| d.superseded) {
            continue;
        }
        let mut chain = Vec::new();
        let mut cur = start;
        loop {
            match state.get(cur).copied() {
                Some(NEW) => {}
                Some(ACTIVE) => {
                    let d = deferred.get(cur);
                    return Err(TocJsonError::HardlinkLoop {
                        path: d.map(|d| d.entry.path.clone()).unwrap_or_default(),
                        target: d
                            .and_then(|d| d.entry.hardlink_target.clone())
                            .unwrap_or_default(),
                    });
                }
                _ => break,
            }
            if let Some(s) = state.get_mut(cur) {
                *s = ACTIVE;
            }
            chain.push(cur);
            match deferred.get(cur).and_then(|d| by_path.get(&d.target)) {
                Some(&next) => cur = next,
                None => break,
            }
        }
        for &c in chain.iter().rev() {
            if let Some(s) = state.get_mut(c) {
                *s = 2;
            }
            order.push(c);
        }
    }
    Ok(order)
}

/// Parses the TOC JSON of `dialect`, converting entries as they stream by. `area_end` is where
/// the data area ends (no entry's data may lie at or past it); at most `max_entries` entries
/// are accepted.
pub fn parse_toc_json(
    json: &[u8],
    area_end: u64,
    max_entries: usize,
    dialect: Dialect,
) -> Result<ParsedToc, TocJsonError> {
    let side: RefCell<Option<TocJsonError>> = RefCell::new(None);
    let conv = RefCell::new(Converter::new(area_end, max_entries, dialect));
    let mut de = serde_json::Deserializer::from_slice(json);
    let result = serde::Deserializer::deserialize_map(
        &mut de,
        TocVisitor {
            side: &side,
            conv: &conv,
            dialect,
        },
    )
    .and_then(|v| de.end().map(|()| v));
    if let Some(e) = side.into_inner() {
        return Err(e);
    }
    let top = result.map_err(|e| TocJsonError::TocJson {
        detail: e.to_string(),
    })?;
    let Some(version) = top.version else {
        return Err(TocJsonError::TocJson {
            detail: "the TOC object has no \"version\"".into(),
        });
    };
    if !top.had_entries {
        return Err(TocJsonError::TocJson {
            detail: "the TOC object has no \"entries\" array".into(),
        });
    }
    let tar_split_digest = match top.tar_split_digest.as_deref() {
        None | Some("") => None,
        Some(s) => Some(s.parse().map_err(|e| TocJsonError::TocJson {
            detail: format!("tarSplitDigest {s:?} is not a digest: {e}"),
        })?),
    };
    if let Some(end) = top.prefetch_end {
        if end > area_end {
            return Err(TocJsonError::TocJson {
                detail: format!(
                    "{PREFETCH_END_KEY} {end} lies past the data area, which ends at {area_end}"
                ),
            });
        }
    }
    Ok(ParsedToc {
        conv: conv.into_inner(),
        version,
        tar_split_digest,
        prefetch_end: top.prefetch_end,
    })
}

/// What the top-level visitor collects.
struct Top {
    version: Option<u32>,
    had_entries: bool,
    tar_split_digest: Option<String>,
    prefetch_end: Option<u64>,
}

/// Visits the top-level TOC object, ignoring unknown keys.
struct TocVisitor<'a> {
    side: &'a RefCell<Option<TocJsonError>>,
    conv: &'a RefCell<Converter>,
    dialect: Dialect,
}

impl<'de> Visitor<'de> for TocVisitor<'_> {
    type Value = Top;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object with \"version\" and \"entries\"")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
        let mut top = Top {
            version: None,
            had_entries: false,
            tar_split_digest: None,
            prefetch_end: None,
        };
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "version" => {
                    if top.version.is_some() {
                        return Err(de::Error::duplicate_field("version"));
                    }
                    let v: serde_json::Value = map.next_value()?;
                    let defined = v
                        .as_u64()
                        .filter(|n| self.dialect.versions.contains(n))
                        .and_then(|n| u32::try_from(n).ok());
                    let Some(n) = defined else {
                        let msg = format!("unsupported version {v}");
                        *self.side.borrow_mut() = Some(TocJsonError::UnsupportedVersion {
                            format: self.dialect.format,
                            found: v.to_string(),
                            defined: self.dialect.versions_text,
                        });
                        return Err(de::Error::custom(msg));
                    };
                    top.version = Some(n);
                }
                "entries" => {
                    if top.had_entries {
                        return Err(de::Error::duplicate_field("entries"));
                    }
                    top.had_entries = true;
                    map.next_value_seed(EntriesSeed {
                        side: self.side,
                        conv: self.conv,
                    })?;
                }
                "tarSplitDigest" if self.dialect.frame_fields => {
                    top.tar_split_digest = map.next_value::<Option<String>>()?;
                }
                PREFETCH_END_KEY if self.dialect.frame_fields => {
                    top.prefetch_end = Some(map.next_value::<u64>()?);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(top)
    }
}

/// Streams the `entries` array into the [`Converter`].
struct EntriesSeed<'a> {
    side: &'a RefCell<Option<TocJsonError>>,
    conv: &'a RefCell<Converter>,
}

impl<'de> DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EntriesSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of TOC entries")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0usize;
        loop {
            let next = seq
                .next_element::<JsonEntry>()
                .map_err(|e| de::Error::custom(format_args!("TOC entry #{index}: {e}")))?;
            let Some(je) = next else { break };
            let res = self.conv.borrow_mut().add(index, je);
            if let Err(e) = res {
                let msg = e.to_string();
                *self.side.borrow_mut() = Some(e);
                return Err(de::Error::custom(msg));
            }
            index += 1;
        }
        Ok(())
    }
}

/// TOC entry cases every format must refuse the same way: each format's reader test wraps the
/// entries in its own blob (with a data area of [`conformance::AREA_END`] bytes) and checks the
/// error, so a new format gets all of them by adding one test.
#[cfg(test)]
pub(crate) mod conformance {
    use super::TocJsonError;
    use crate::toc::TocError;

    /// Where the data area of the test blobs ends.
    pub const AREA_END: u64 = 4096;

    /// A case: its name, the TOC's `entries` (JSON, without brackets) and the error expected.
    pub type Case = (&'static str, String, fn(&TocJsonError) -> bool);

    fn d(data: &[u8]) -> String {
        lazypull_fetcher::Digest::sha256_of(data).to_string()
    }

    fn reg(name: &str) -> String {
        format!(
            r#"{{"name":{},"type":"reg","size":1,"offset":10,"digest":"{}"}}"#,
            serde_json::to_string(name).unwrap(),
            d(b"z")
        )
    }

    /// Every case (at least 21: a table that shrinks by accident fails its readers' tests).
    pub fn entry_cases() -> Vec<Case> {
        let x = d(b"x");
        let cases: Vec<Case> = vec![
            (
                "unknown type",
                r#"{"name":"s","type":"socket"}"#.into(),
                |e| matches!(e, TocJsonError::UnknownType { index: 0, kind, .. } if kind == "socket"),
            ),
            (
                "chunk entry first",
                format!(
                    r#"{{"name":"f","type":"chunk","offset":10,"chunkOffset":0,"chunkDigest":"{x}"}}"#
                ),
                |e| matches!(e, TocJsonError::OrphanChunk { index: 0, .. }),
            ),
            (
                "chunk of another file",
                format!(
                    r#"{},{{"name":"g","type":"chunk","offset":20,"chunkOffset":1,"chunkDigest":"{x}"}}"#,
                    reg("f")
                ),
                |e| matches!(e, TocJsonError::OrphanChunk { index: 1, .. }),
            ),
            (
                "chunk overlap",
                format!(
                    r#"{{"name":"f","type":"reg","size":10,"offset":100,"chunkSize":6,"chunkDigest":"{x}"}},{{"name":"f","type":"chunk","offset":200,"chunkOffset":4,"chunkDigest":"{x}"}}"#
                ),
                |e| matches!(e, TocJsonError::Layer { index: 0, source: TocError::BadChunks { detail, .. }, .. } if detail.contains("at 4 where 6")),
            ),
            (
                "chunk gap",
                format!(
                    r#"{{"name":"f","type":"reg","size":10,"offset":100,"chunkSize":6,"chunkDigest":"{x}"}},{{"name":"f","type":"chunk","offset":200,"chunkOffset":8,"chunkDigest":"{x}"}}"#
                ),
                |e| matches!(e, TocJsonError::Layer { source: TocError::BadChunks { .. }, .. }),
            ),
            (
                "chunks exceed size",
                format!(
                    r#"{{"name":"f","type":"reg","size":10,"offset":100,"chunkSize":20,"chunkDigest":"{x}"}}"#
                ),
                |e| matches!(e, TocJsonError::Layer { source: TocError::BadChunks { .. }, .. }),
            ),
            (
                "chunk without digest",
                r#"{"name":"f","type":"reg","size":10,"offset":100,"chunkSize":6},{"name":"f","type":"chunk","offset":200,"chunkOffset":6}"#.into(),
                |e| matches!(e, TocJsonError::BadEntry { index: 0, detail, .. } if detail.contains("chunkDigest")),
            ),
            (
                "negative offset",
                format!(
                    r#"{{"name":"f","type":"reg","size":1,"offset":-5,"chunkDigest":"{x}"}}"#
                ),
                |e| matches!(e, TocJsonError::OffsetOutOfRange { offset: -5, field: "offset", .. }),
            ),
            (
                "huge offset",
                format!(
                    r#"{{"name":"f","type":"reg","size":1,"offset":18446744073709551615,"chunkDigest":"{x}"}}"#
                ),
                |e| matches!(e, TocJsonError::OffsetOutOfRange { offset, .. } if *offset == i128::from(u64::MAX)),
            ),
            (
                "offset at the TOC",
                format!(
                    r#"{{"name":"f","type":"reg","size":1,"offset":4096,"chunkDigest":"{x}"}}"#
                ),
                |e| matches!(e, TocJsonError::OffsetOutOfRange { offset: 4096, data_end: AREA_END, .. }),
            ),
            (
                "fractional size",
                r#"{"name":"f","type":"reg","size":1.5}"#.into(),
                |e| matches!(e, TocJsonError::BadEntry { detail, .. } if detail.contains("size")),
            ),
            (
                "dot-dot path",
                reg("../etc/passwd"),
                |e| matches!(e, TocJsonError::Layer { source: TocError::BadPath(_), .. }),
            ),
            (
                "absolute path",
                reg("/abs"),
                |e| matches!(e, TocJsonError::Layer { source: TocError::BadPath(_), .. }),
            ),
            (
                "NUL in name",
                reg("a\u{0}b"),
                |e| matches!(e, TocJsonError::Layer { source: TocError::BadPath(_), .. }),
            ),
            (
                "hardlink to missing file",
                r#"{"name":"h","type":"hardlink","linkName":"missing"}"#.into(),
                |e| matches!(e, TocJsonError::Layer { source: TocError::BadHardlink { .. }, .. }),
            ),
            (
                "hardlink loop",
                r#"{"name":"a","type":"hardlink","linkName":"b"},{"name":"b","type":"hardlink","linkName":"a"}"#.into(),
                |e| matches!(e, TocJsonError::HardlinkLoop { .. }),
            ),
            (
                "hardlink to itself",
                r#"{"name":"a","type":"hardlink","linkName":"./a"}"#.into(),
                |e| matches!(e, TocJsonError::HardlinkLoop { .. }),
            ),
            (
                "bad modtime",
                r#"{"name":"d","type":"dir","modtime":"yesterday"}"#.into(),
                |e| matches!(e, TocJsonError::BadEntry { detail, .. } if detail.contains("modtime")),
            ),
            (
                "bad xattr base64",
                r#"{"name":"d","type":"dir","xattrs":{"user.a":"!!"}}"#.into(),
                |e| matches!(e, TocJsonError::BadEntry { detail, .. } if detail.contains("base64")),
            ),
            (
                "bad digest",
                r#"{"name":"f","type":"reg","size":1,"offset":1,"chunkDigest":"md5:00"}"#.into(),
                |e| matches!(e, TocJsonError::BadEntry { detail, .. } if detail.contains("chunkDigest")),
            ),
            (
                "file data without offset",
                format!(r#"{{"name":"f","type":"reg","size":1,"digest":"{x}"}}"#),
                |e| matches!(e, TocJsonError::BadEntry { detail, .. } if detail.contains("offset")),
            ),
        ];
        assert!(cases.len() >= 21);
        cases
    }
}
