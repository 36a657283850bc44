//! Writing zstd:chunked: a tar stream in, a zstd:chunked blob out, in one streaming pass.
//!
//! Layout (as containers/storage writes it, so podman and skopeo read our blobs and we read
//! theirs): the tar stream passes through byte for byte (the layer's diff ID does not change),
//! cut into zstd frames: tar headers, padding and the data of non-regular entries go into
//! "header" frames, and every chunk of a regular file's content starts a frame of its own, so
//! decompressing from a chunk's offset yields its first byte. Chunk boundaries come from the
//! same rolling checksum containers/storage uses (bup's rollsum over a 64-byte window, a cut
//! where its low 16 bits are all ones: about 64 KiB on average), so identical content makes
//! identical chunks whichever tool wrote the layer; `chunk_size` caps a chunk. After the tar
//! stream: the TOC, the tar-split metadata and the 64-byte footer, each in a skippable frame.
//!
//! Frames are compressed on worker threads when the machine has more than one core (each frame
//! is independent, so the blob is byte-identical either way); the calling thread parses,
//! hashes and cuts chunks, and writes the frames in order.
//!
//! Memory is bounded by one chunk, one header frame (flushed every [`HEADER_FRAME_CAP`] bytes),
//! a few frames in flight per worker, the TOC and the compressed tar-split (both proportional
//! to the number of entries): file data is streamed, never held. Reordering for prefetch spools
//! the input to an unlinked temporary file.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::rc::Rc;

use base64::Engine as _;
use lazypull_fetcher::digest::Verifier;
use lazypull_fetcher::{Algorithm, Digest};
use serde::Serialize;
use tar::EntryType;

use super::{
    layer_annotations, TarSplitPosition, TocPosition, ZstdChunkedError, FOOTER_MAGIC, FOOTER_SIZE,
    MANIFEST_TYPE_CRFS, SKIPPABLE_HEADER, SKIPPABLE_MAGIC,
};
use crate::estargz::TOC_TAR_NAME;
use crate::toc::json::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK};
use crate::toc::spool::{numeric, plan_prefetch, PlannedEntry};
use crate::toc::time::format_rfc3339;
use crate::toc::{path_problem, split_path};

const BLOCK: u64 = 512;
const COPY_BUF: usize = 64 * 1024;
/// Uncompressed bytes after which a header frame is closed and a new one started (nothing
/// points into header frames, so they can be cut anywhere; this bounds memory when a layer
/// has long runs of entries without content).
pub const HEADER_FRAME_CAP: usize = 1 << 20;
/// Largest tar-split segment written as one record (larger raw runs are split).
const TAR_SPLIT_SEGMENT_CAP: usize = 1 << 20;
/// Bits of the rolling checksum that must all be ones at a chunk boundary (containers/storage's
/// `RollsumBits`).
const ROLLSUM_BITS: u32 = 16;

/// How to write the blob.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Largest chunk of a regular file in one zstd frame (default 4 MiB). Chunk boundaries are
    /// content-defined (about 64 KiB on average, as containers/storage cuts them); this only
    /// caps chunks in content where the rolling checksum finds no boundary.
    pub chunk_size: u64,
    /// zstd level of every frame (default 10, containers/storage's default). Level 3 writes
    /// several times faster for about 10% larger layers.
    pub level: i32,
    /// Paths to place first (with their parent directories and hard-link targets), so a reader
    /// can prefetch them with one range request (the `--optimize` access profile). The blob
    /// offset where their data ends is recorded in the TOC under [`PREFETCH_END_KEY`].
    /// `None` keeps the input order and records nothing.
    pub prefetch: Option<Vec<String>>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            chunk_size: 4 << 20,
            level: 10,
            prefetch: None,
        }
    }
}

/// What was written: everything an image manifest and config need for the new layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenLayer {
    /// SHA-256 of the compressed TOC (the manifest-checksum annotation).
    pub manifest_checksum: Digest,
    /// SHA-256 of the TOC JSON.
    pub toc_digest: Digest,
    /// Where the TOC is (the manifest-position annotation).
    pub toc: TocPosition,
    /// Where the tar-split data is (the tarsplit-position annotation).
    pub tar_split: TarSplitPosition,
    /// SHA-256 of the compressed tar-split data (`tarSplitDigest` in the TOC).
    pub tar_split_digest: Digest,
    /// SHA-256 of the uncompressed tar stream (the image config's diff ID). Equal to the
    /// input's digest unless entries were reordered, dropped (an eStargz input's TOC and
    /// landmarks) or normalised (GNU sparse files are stored expanded).
    pub diff_id: Digest,
    /// SHA-256 of the blob (the manifest's layer digest).
    pub blob_digest: Digest,
    /// Blob size in bytes.
    pub blob_size: u64,
    /// Uncompressed tar size.
    pub uncompressed_size: u64,
}

impl WrittenLayer {
    /// The layer annotations the image manifest must carry so that readers (podman, skopeo,
    /// lazypull) find the TOC without reading the footer.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        layer_annotations(&self.manifest_checksum, &self.toc, Some(&self.tar_split))
    }
}

/// Converts the tar stream `tar_in` into a zstd:chunked blob written to `out`.
pub fn write_zstd_chunked<R: Read, W: Write>(
    tar_in: R,
    out: W,
    opts: &WriterOptions,
) -> Result<WrittenLayer, ZstdChunkedError> {
    if opts.chunk_size == 0 || opts.chunk_size > crate::toc::MAX_CHUNK_SIZE {
        return Err(ZstdChunkedError::BadOptions(format!(
            "chunk_size must be 1 to {} bytes (readers refuse larger chunks)",
            crate::toc::MAX_CHUNK_SIZE
        )));
    }
    let chunk_cap = usize::try_from(opts.chunk_size)
        .map_err(|_| ZstdChunkedError::BadOptions("chunk_size is too large".into()))?;
    let range = zstd::compression_level_range();
    let (lo, hi) = (*range.start(), *range.end());
    if !range.contains(&opts.level) {
        return Err(ZstdChunkedError::BadOptions(format!(
            "zstd level {} is outside {lo}..={hi}",
            opts.level
        )));
    }
    // Compression runs on worker threads when there is more than one core; the calling thread
    // parses, hashes, chunks and writes the frames in order.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = if cores > 1 { cores.min(4) } else { 0 };
    write_with_workers(tar_in, out, opts, chunk_cap, workers)
}

/// [`write_zstd_chunked`] with `workers` compression threads (0: compress inline). Every frame
/// is compressed on its own, so the blob is the same whatever the number of workers.
fn write_with_workers<R: Read, W: Write>(
    tar_in: R,
    out: W,
    opts: &WriterOptions,
    chunk_cap: usize,
    workers: usize,
) -> Result<WrittenLayer, ZstdChunkedError> {
    std::thread::scope(|scope| {
        let frames = Frames::new(out, opts.level, workers, scope)?;
        let mut w = Writer::new(frames, opts.level, chunk_cap)?;
        match &opts.prefetch {
            None => parse_tar(tar_in, &mut w)?,
            Some(list) => {
                let mut spool = Spool::new()?;
                parse_tar(tar_in, &mut spool)?;
                spool.replay(&mut w, list)?;
            }
        }
        w.finish()
    })
}

fn input_err(at: &str) -> impl Fn(io::Error) -> ZstdChunkedError + '_ {
    move |source| ZstdChunkedError::InputTar {
        at: if at.is_empty() {
            String::new()
        } else {
            format!(" at {at:?}")
        },
        source,
    }
}

fn io_err(context: &'static str) -> impl Fn(io::Error) -> ZstdChunkedError {
    move |source| ZstdChunkedError::Io { context, source }
}

fn padding(size: u64) -> usize {
    ((BLOCK - size % BLOCK) % BLOCK) as usize
}

// ---------------------------------------------------------------------------------------------
// Checksums

/// bup's rolling checksum (as in librsync, perkeep and containers/storage): an Adler-32-like
/// pair of sums over the last 64 bytes. The caller keeps the window (the 64 bytes before the
/// one being added), which lets the hot loop read it straight from its buffer.
struct RollSum {
    s1: u32,
    s2: u32,
}

impl RollSum {
    const WINDOW: usize = 64;
    const CHAR_OFFSET: u32 = 31;

    fn new() -> RollSum {
        let w = Self::WINDOW as u32;
        RollSum {
            s1: w * Self::CHAR_OFFSET,
            s2: w * (w - 1) * Self::CHAR_OFFSET,
        }
    }

    /// Adds `add`, dropping `drop` (the byte 64 positions earlier; 0 at the start of a file).
    #[inline(always)]
    fn roll(&mut self, drop: u8, add: u8) {
        let drop = u32::from(drop);
        self.s1 = self.s1.wrapping_add(u32::from(add)).wrapping_sub(drop);
        self.s2 = self
            .s2
            .wrapping_add(self.s1)
            .wrapping_sub((Self::WINDOW as u32).wrapping_mul(drop.wrapping_add(Self::CHAR_OFFSET)));
    }

    #[inline(always)]
    fn on_split(&self) -> bool {
        let mask = (1u32 << ROLLSUM_BITS) - 1;
        self.s2 & mask == mask
    }
}

/// CRC-64 with the ISO polynomial, as Go's `hash/crc64` computes it (tar-split stores it per
/// file so containers/storage can check the content it reassembles). Slicing-by-8, as Go does.
struct Crc64 {
    tables: &'static [[u64; 256]; 8],
    crc: u64,
}

impl Crc64 {
    fn new() -> Crc64 {
        static TABLES: std::sync::OnceLock<[[u64; 256]; 8]> = std::sync::OnceLock::new();
        let tables = TABLES.get_or_init(|| {
            const POLY: u64 = 0xD800_0000_0000_0000;
            let mut t0 = [0u64; 256];
            for (i, slot) in t0.iter_mut().enumerate() {
                let mut crc = i as u64;
                for _ in 0..8 {
                    crc = if crc & 1 == 1 {
                        (crc >> 1) ^ POLY
                    } else {
                        crc >> 1
                    };
                }
                *slot = crc;
            }
            // Table k advances a byte's contribution by k more bytes.
            let mut t = [t0; 8];
            for k in 1..8 {
                let prev = t[k - 1];
                for (slot, p) in t[k].iter_mut().zip(prev) {
                    *slot = t0[(p & 0xff) as usize] ^ (p >> 8);
                }
            }
            t
        });
        Crc64 { tables, crc: !0 }
    }

    fn update(&mut self, data: &[u8]) {
        let t = self.tables;
        let mut crc = self.crc;
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            crc ^= u64::from_le_bytes(b);
            crc = t[7][(crc & 0xff) as usize]
                ^ t[6][((crc >> 8) & 0xff) as usize]
                ^ t[5][((crc >> 16) & 0xff) as usize]
                ^ t[4][((crc >> 24) & 0xff) as usize]
                ^ t[3][((crc >> 32) & 0xff) as usize]
                ^ t[2][((crc >> 40) & 0xff) as usize]
                ^ t[1][((crc >> 48) & 0xff) as usize]
                ^ t[0][(crc >> 56) as usize];
        }
        for &b in words.remainder() {
            crc = t[0][((crc as u8) ^ b) as usize] ^ (crc >> 8);
        }
        self.crc = crc;
    }

    fn finish(&self) -> [u8; 8] {
        (!self.crc).to_be_bytes()
    }
}

// ---------------------------------------------------------------------------------------------
// Output

/// The blob being written: counts and hashes every compressed byte.
struct BlobSink<W: Write> {
    out: BufWriter<W>,
    len: u64,
    hash: Verifier,
}

impl<W: Write> BlobSink<W> {
    fn put(&mut self, data: &[u8]) -> Result<(), ZstdChunkedError> {
        self.out
            .write_all(data)
            .map_err(io_err("writing the zstd:chunked blob"))?;
        self.len += data.len() as u64;
        self.hash.update(data);
        Ok(())
    }

    fn skippable(&mut self, payload: &[u8]) -> Result<(), ZstdChunkedError> {
        let len = u32::try_from(payload.len()).map_err(|_| ZstdChunkedError::Io {
            context: "writing a skippable frame",
            source: io::Error::other(format!(
                "{} bytes do not fit one skippable frame (4 GiB at most)",
                payload.len()
            )),
        })?;
        self.put(&SKIPPABLE_MAGIC)?;
        self.put(&len.to_le_bytes())?;
        self.put(payload)
    }
}

/// One TOC entry as written, in containers/storage's field order (Go's `omitempty` fields are
/// skipped when zero).
#[derive(Serialize, Default, Clone, Debug)]
struct TocEntryOut {
    #[serde(rename = "type")]
    kind: &'static str,
    name: String,
    #[serde(rename = "linkName", skip_serializing_if = "String::is_empty")]
    link_name: String,
    #[serde(skip_serializing_if = "is_zero")]
    mode: u64,
    #[serde(skip_serializing_if = "is_zero")]
    size: u64,
    #[serde(skip_serializing_if = "is_zero")]
    uid: u64,
    #[serde(skip_serializing_if = "is_zero")]
    gid: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    modtime: Option<String>,
    #[serde(rename = "devMajor", skip_serializing_if = "is_zero")]
    dev_major: u64,
    #[serde(rename = "devMinor", skip_serializing_if = "is_zero")]
    dev_minor: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    xattrs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    digest: String,
    #[serde(skip_serializing_if = "is_zero")]
    offset: u64,
    #[serde(rename = "endOffset", skip_serializing_if = "is_zero")]
    end_offset: u64,
    #[serde(rename = "chunkSize", skip_serializing_if = "is_zero")]
    chunk_size: u64,
    #[serde(rename = "chunkOffset", skip_serializing_if = "is_zero")]
    chunk_offset: u64,
    #[serde(rename = "chunkDigest", skip_serializing_if = "String::is_empty")]
    chunk_digest: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The TOC document. The prefetch key ([`super::PREFETCH_END_KEY`]) is an extension other
/// readers ignore.
#[derive(Serialize)]
struct TocOut<'a> {
    version: u32,
    entries: &'a [TocEntryOut],
    #[serde(rename = "tarSplitDigest")]
    tar_split_digest: String,
    #[serde(
        rename = "lazypull.prefetchEnd",
        skip_serializing_if = "Option::is_none"
    )]
    prefetch_end: Option<u64>,
}

/// The tar-split metadata: newline-delimited JSON records (raw segments and file entries, in
/// stream order), zstd-compressed as it is produced.
struct TarSplit {
    enc: zstd::stream::write::Encoder<'static, HashedVec>,
    uncompressed: u64,
    position: u64,
    pending: Vec<u8>,
    line: Vec<u8>,
}

/// A growing buffer that hashes what is appended.
struct HashedVec {
    data: Vec<u8>,
    hash: Verifier,
}

impl Write for HashedVec {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.data.extend_from_slice(buf);
        self.hash.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TarSplit {
    fn new(level: i32) -> Result<TarSplit, ZstdChunkedError> {
        let mut enc = zstd::stream::write::Encoder::new(
            HashedVec {
                data: Vec::new(),
                hash: Verifier::new(Algorithm::Sha256),
            },
            level,
        )
        .map_err(io_err("starting the tar-split compressor"))?;
        enc.include_checksum(true)
            .map_err(io_err("starting the tar-split compressor"))?;
        Ok(TarSplit {
            enc,
            uncompressed: 0,
            position: 0,
            pending: Vec::new(),
            line: Vec::new(),
        })
    }

    /// Raw bytes, gathered into the next segment record.
    fn raw(&mut self, data: &[u8]) -> Result<(), ZstdChunkedError> {
        let mut data = data;
        while !data.is_empty() {
            let room = TAR_SPLIT_SEGMENT_CAP - self.pending.len();
            let (now, rest) = data.split_at(room.min(data.len()));
            self.pending.extend_from_slice(now);
            data = rest;
            if self.pending.len() >= TAR_SPLIT_SEGMENT_CAP {
                self.flush_segment()?;
            }
        }
        Ok(())
    }

    fn flush_segment(&mut self) -> Result<(), ZstdChunkedError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let payload = base64::engine::general_purpose::STANDARD.encode(&self.pending);
        self.pending.clear();
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        write!(
            line,
            "{{\"type\":2,\"payload\":\"{payload}\",\"position\":{}}}",
            self.position
        )
        .map_err(io_err("building tar-split"))?;
        self.emit(line)
    }

    /// A file record: `name` with `size` content bytes (taken from the extracted file when the
    /// tar is reassembled) and their CRC-64.
    fn file(
        &mut self,
        name: &str,
        size: u64,
        crc: Option<[u8; 8]>,
    ) -> Result<(), ZstdChunkedError> {
        self.flush_segment()?;
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        let name_json =
            serde_json::to_string(name).map_err(|e| io_err("building tar-split")(e.into()))?;
        write!(line, "{{\"type\":1,\"name\":{name_json},").map_err(io_err("building tar-split"))?;
        if size > 0 {
            write!(line, "\"size\":{size},").map_err(io_err("building tar-split"))?;
        }
        match crc {
            Some(c) => write!(
                line,
                "\"payload\":\"{}\",",
                base64::engine::general_purpose::STANDARD.encode(c)
            ),
            None => write!(line, "\"payload\":null,"),
        }
        .map_err(io_err("building tar-split"))?;
        write!(line, "\"position\":{}}}", self.position).map_err(io_err("building tar-split"))?;
        self.emit(line)
    }

    fn emit(&mut self, mut line: Vec<u8>) -> Result<(), ZstdChunkedError> {
        line.push(b'\n');
        self.enc
            .write_all(&line)
            .map_err(io_err("compressing tar-split"))?;
        self.uncompressed += line.len() as u64;
        self.position += 1;
        self.line = line;
        Ok(())
    }

    /// The compressed data, its digest and uncompressed length.
    fn finish(mut self) -> Result<(Vec<u8>, Digest, u64), ZstdChunkedError> {
        self.flush_segment()?;
        let out = self.enc.finish().map_err(io_err("compressing tar-split"))?;
        Ok((out.data, out.hash.finish(), self.uncompressed))
    }
}

/// What the writer knows about one tar entry.
#[derive(Debug, Clone)]
struct ItemInfo {
    /// The TOC entry (offsets not yet filled); `None` for entries the TOC does not describe
    /// (PAX global headers).
    toc: Option<TocEntryOut>,
    /// Name for the tar-split file record.
    split_name: String,
    /// Data bytes following the header.
    data_size: u64,
    /// Regular file: the data is content, cut into chunks.
    regular: bool,
    /// Normalised path (prefetch planning).
    path: String,
    /// Normalised hard-link target (prefetch planning).
    hardlink_target: Option<String>,
}

/// Receives the input tar in order: each entry's header bytes, its data (as content or raw),
/// the raw bytes between entries, and the end of the archive.
trait Consumer {
    /// A new entry starts with `head` (its extension headers and header).
    fn entry(&mut self, info: &ItemInfo, head: &[u8]) -> Result<(), ZstdChunkedError>;
    /// The content of the current (regular) entry, `info.data_size` bytes.
    fn content(&mut self, info: &ItemInfo, data: &mut dyn Read) -> Result<(), ZstdChunkedError>;
    /// Raw tar bytes: padding, data of non-regular entries.
    fn raw(&mut self, data: &[u8]) -> Result<(), ZstdChunkedError>;
    /// The end-of-archive blocks and anything after them follow (as `raw`).
    fn trailer(&mut self) -> Result<(), ZstdChunkedError>;
}

/// A frame submitted for compression; its blob extent is known once it is written.
type FrameId = usize;

/// Most frames compressing or waiting to be written at once (bounds memory to a few chunks).
const MAX_IN_FLIGHT_PER_WORKER: usize = 3;

struct Job {
    id: FrameId,
    data: Vec<u8>,
}

struct Done {
    id: FrameId,
    compressed: io::Result<Vec<u8>>,
    /// The uncompressed buffer, handed back for reuse.
    data: Vec<u8>,
}

/// Compresses frames (inline, or on worker threads) and writes them to the blob in order,
/// recording each frame's extent.
struct Frames<W: Write> {
    sink: BlobSink<W>,
    /// `(start, end)` in the blob of every frame written, by id.
    extents: Vec<(u64, u64)>,
    next_id: FrameId,
    engine: Engine,
}

enum Engine {
    Inline {
        compressor: zstd::bulk::Compressor<'static>,
        scratch: Vec<u8>,
    },
    Pool {
        jobs: Option<std::sync::mpsc::SyncSender<Job>>,
        results: std::sync::mpsc::Receiver<Done>,
        /// Results that arrived before an earlier frame's.
        early: BTreeMap<FrameId, io::Result<Vec<u8>>>,
        in_flight: usize,
        max_in_flight: usize,
        free: Vec<Vec<u8>>,
    },
}

fn compressor(level: i32) -> io::Result<zstd::bulk::Compressor<'static>> {
    let mut c = zstd::bulk::Compressor::new(level)?;
    c.include_checksum(true)?;
    Ok(c)
}

fn compress_frame(
    c: &mut zstd::bulk::Compressor<'static>,
    data: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    out.clear();
    out.reserve(zstd::zstd_safe::compress_bound(data.len()));
    c.compress_to_buffer(data, out).map(|_| ())
}

impl<W: Write> Frames<W> {
    fn new<'scope, 'env>(
        out: W,
        level: i32,
        workers: usize,
        scope: &'scope std::thread::Scope<'scope, 'env>,
    ) -> Result<Self, ZstdChunkedError> {
        let sink = BlobSink {
            out: BufWriter::with_capacity(256 * 1024, out),
            len: 0,
            hash: Verifier::new(Algorithm::Sha256),
        };
        let engine = if workers == 0 {
            Engine::Inline {
                compressor: compressor(level).map_err(io_err("starting the compressor"))?,
                scratch: Vec::new(),
            }
        } else {
            let max_in_flight = workers * MAX_IN_FLIGHT_PER_WORKER;
            let (jobs, job_rx) = std::sync::mpsc::sync_channel::<Job>(max_in_flight);
            let (done_tx, results) = std::sync::mpsc::channel::<Done>();
            let job_rx = std::sync::Arc::new(parking_lot::Mutex::new(job_rx));
            for _ in 0..workers {
                let mut c = compressor(level).map_err(io_err("starting the compressor"))?;
                let job_rx = job_rx.clone();
                let done_tx = done_tx.clone();
                scope.spawn(move || loop {
                    let job = job_rx.lock().recv();
                    let Ok(job) = job else { return };
                    let mut out = Vec::new();
                    // A panic must not leave the writer waiting for this frame forever.
                    let compressed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        compress_frame(&mut c, &job.data, &mut out)
                    }))
                    .unwrap_or_else(|_| Err(io::Error::other("the compressor panicked")))
                    .map(|()| out);
                    let done = Done {
                        id: job.id,
                        compressed,
                        data: job.data,
                    };
                    if done_tx.send(done).is_err() {
                        return;
                    }
                });
            }
            Engine::Pool {
                jobs: Some(jobs),
                results,
                early: BTreeMap::new(),
                in_flight: 0,
                max_in_flight,
                free: Vec::new(),
            }
        };
        Ok(Frames {
            sink,
            extents: Vec::new(),
            next_id: 0,
            engine,
        })
    }

    /// An empty buffer for the next frame's data (recycled from finished frames).
    fn buffer(&mut self) -> Vec<u8> {
        match &mut self.engine {
            Engine::Pool { free, .. } => free.pop().unwrap_or_default(),
            Engine::Inline { .. } => Vec::new(),
        }
    }

    /// Queues `data` as the next frame and returns its id.
    fn submit(&mut self, data: Vec<u8>) -> Result<FrameId, ZstdChunkedError> {
        let id = self.next_id;
        self.next_id += 1;
        match &mut self.engine {
            Engine::Inline {
                compressor,
                scratch,
            } => {
                compress_frame(compressor, &data, scratch)
                    .map_err(io_err("compressing a frame"))?;
                let start = self.sink.len;
                self.sink.put(scratch)?;
                self.extents.push((start, self.sink.len));
            }
            Engine::Pool {
                jobs, in_flight, ..
            } => {
                let sent = jobs.as_ref().map(|j| j.send(Job { id, data }));
                if !matches!(sent, Some(Ok(()))) {
                    return Err(ZstdChunkedError::Io {
                        context: "compressing a frame",
                        source: io::Error::other("the compression workers stopped"),
                    });
                }
                *in_flight += 1;
                self.drain(false)?;
            }
        }
        Ok(id)
    }

    /// Writes the frames that are done, in order; with `all`, waits for every frame.
    fn drain(&mut self, all: bool) -> Result<(), ZstdChunkedError> {
        let Engine::Pool {
            results,
            early,
            in_flight,
            max_in_flight,
            free,
            ..
        } = &mut self.engine
        else {
            return Ok(());
        };
        loop {
            // Write whatever is next in order.
            while let Some(compressed) = early.remove(&self.extents.len()) {
                let compressed = compressed.map_err(io_err("compressing a frame"))?;
                let start = self.sink.len;
                self.sink.put(&compressed)?;
                self.extents.push((start, self.sink.len));
                *in_flight -= 1;
            }
            let must_wait = if all {
                *in_flight > 0
            } else {
                *in_flight >= *max_in_flight
            };
            let done = if must_wait {
                results.recv().map_err(|_| ZstdChunkedError::Io {
                    context: "compressing a frame",
                    source: io::Error::other("the compression workers stopped"),
                })?
            } else {
                match results.try_recv() {
                    Ok(d) => d,
                    Err(_) => return Ok(()),
                }
            };
            let mut data = done.data;
            data.clear();
            if free.len() < *max_in_flight {
                free.push(data);
            }
            early.insert(done.id, done.compressed);
        }
    }

    /// `(start, end)` of a written frame.
    fn extent(&self, id: FrameId) -> (u64, u64) {
        self.extents.get(id).copied().unwrap_or((0, 0))
    }
}

/// Where a TOC entry's data lies, in frame ids (resolved into blob offsets at the end).
struct Placement {
    entry: usize,
    first: FrameId,
    last: FrameId,
}

/// The writer proper.
struct Writer<W: Write> {
    frames: Frames<W>,
    /// Uncompressed bytes of the open header frame.
    head: Vec<u8>,
    /// Chunk being gathered.
    chunk: Vec<u8>,
    chunk_cap: usize,
    diff: Verifier,
    tar_len: u64,
    toc: Vec<TocEntryOut>,
    placements: Vec<Placement>,
    tar_split: TarSplit,
    /// Read buffer with 64 bytes of room in front for the rolling checksum's window.
    buf: Vec<u8>,
    /// Frames written before the prefetch boundary, when reordering.
    prefetch_frames: Option<FrameId>,
    level: i32,
}

/// Bytes of the rolling checksum's window.
const WINDOW: usize = RollSum::WINDOW;

impl<W: Write> Writer<W> {
    fn new(frames: Frames<W>, level: i32, chunk_cap: usize) -> Result<Self, ZstdChunkedError> {
        Ok(Writer {
            frames,
            head: Vec::new(),
            chunk: Vec::new(),
            chunk_cap,
            diff: Verifier::new(Algorithm::Sha256),
            tar_len: 0,
            toc: Vec::new(),
            placements: Vec::new(),
            tar_split: TarSplit::new(level)?,
            buf: vec![0; WINDOW + COPY_BUF],
            prefetch_frames: None,
            level,
        })
    }

    /// Appends uncompressed tar bytes that belong in header frames.
    fn head_bytes(&mut self, data: &[u8]) -> Result<(), ZstdChunkedError> {
        self.diff.update(data);
        self.tar_len += data.len() as u64;
        let mut data = data;
        while !data.is_empty() {
            let room = HEADER_FRAME_CAP - self.head.len();
            let (now, rest) = data.split_at(room.min(data.len()));
            self.head.extend_from_slice(now);
            data = rest;
            if self.head.len() >= HEADER_FRAME_CAP {
                self.close_head()?;
            }
        }
        Ok(())
    }

    /// Ends the open header frame, so the next byte starts a new frame.
    fn close_head(&mut self) -> Result<(), ZstdChunkedError> {
        if self.head.is_empty() {
            return Ok(());
        }
        let next = self.frames.buffer();
        let head = std::mem::replace(&mut self.head, next);
        self.frames.submit(head)?;
        Ok(())
    }

    /// Submits the chunk gathered so far as a frame; returns (frame, size, digest).
    fn emit_chunk(&mut self) -> Result<(FrameId, u64, Digest), ZstdChunkedError> {
        let next = self.frames.buffer();
        let chunk = std::mem::replace(&mut self.chunk, next);
        let digest = Digest::sha256_of(&chunk);
        let size = chunk.len() as u64;
        let id = self.frames.submit(chunk)?;
        Ok((id, size, digest))
    }

    /// Marks the prefetch boundary: everything submitted so far is prefetched (`any`: the
    /// front holds entries; otherwise there is nothing to prefetch).
    fn mark_prefetch_end(&mut self, any: bool) -> Result<(), ZstdChunkedError> {
        self.close_head()?;
        self.prefetch_frames = Some(if any { self.frames.next_id } else { 0 });
        Ok(())
    }

    fn finish(mut self) -> Result<WrittenLayer, ZstdChunkedError> {
        self.close_head()?;
        self.frames.drain(true)?;
        for p in &self.placements {
            let (start, _) = self.frames.extent(p.first);
            let (_, end) = self.frames.extent(p.last);
            if let Some(e) = self.toc.get_mut(p.entry) {
                e.offset = start;
                if e.kind != "chunk" {
                    e.end_offset = end;
                }
            }
        }
        let prefetch_end = self.prefetch_frames.map(|n| match n {
            0 => 0,
            n => self.frames.extent(n - 1).1,
        });
        let (ts_data, ts_digest, ts_len) = self.tar_split.finish()?;
        let json = serde_json::to_vec(&TocOut {
            version: 1,
            entries: &self.toc,
            tar_split_digest: ts_digest.to_string(),
            prefetch_end,
        })
        .map_err(|e| io_err("serialising the TOC")(e.into()))?;
        let toc_digest = Digest::sha256_of(&json);
        let compressed = compressor(self.level)
            .and_then(|mut c| c.compress(&json))
            .map_err(io_err("compressing the TOC"))?;
        let sink = &mut self.frames.sink;
        let toc = TocPosition {
            offset: sink.len + SKIPPABLE_HEADER,
            compressed_len: compressed.len() as u64,
            uncompressed_len: json.len() as u64,
            manifest_type: MANIFEST_TYPE_CRFS,
        };
        sink.skippable(&compressed)?;
        let tar_split = TarSplitPosition {
            offset: sink.len + SKIPPABLE_HEADER,
            compressed_len: ts_data.len() as u64,
            uncompressed_len: ts_len,
        };
        sink.skippable(&ts_data)?;
        sink.skippable(&footer_bytes(&toc, Some(&tar_split)))?;
        sink.out
            .flush()
            .map_err(io_err("flushing the zstd:chunked blob"))?;
        let blob_size = sink.len;
        let blob_digest =
            std::mem::replace(&mut sink.hash, Verifier::new(Algorithm::Sha256)).finish();
        Ok(WrittenLayer {
            manifest_checksum: Digest::sha256_of(&compressed),
            toc_digest,
            toc,
            tar_split,
            tar_split_digest: ts_digest,
            diff_id: self.diff.finish(),
            blob_digest,
            blob_size,
            uncompressed_size: self.tar_len,
        })
    }
}

impl<W: Write> Consumer for Writer<W> {
    fn entry(&mut self, info: &ItemInfo, head: &[u8]) -> Result<(), ZstdChunkedError> {
        self.head_bytes(head)?;
        self.tar_split.raw(head)?;
        if info.regular && info.data_size > 0 {
            // The TOC and tar-split records follow the content.
            return Ok(());
        }
        self.tar_split.file(&info.split_name, 0, None)?;
        if let Some(t) = &info.toc {
            self.toc.push(t.clone());
        }
        Ok(())
    }

    fn content(&mut self, info: &ItemInfo, data: &mut dyn Read) -> Result<(), ZstdChunkedError> {
        self.close_head()?;
        let size = info.data_size;
        let mut file_hash = Verifier::new(Algorithm::Sha256);
        let mut crc = Crc64::new();
        let mut roll = RollSum::new();
        // (file offset, size, frame, digest) of every chunk.
        let mut chunks: Vec<(u64, u64, FrameId, Digest)> = Vec::new();
        let mut file_off = 0u64;
        let mut left = size;
        let mut buf = std::mem::take(&mut self.buf);
        // The window starts as zeros at each file, as containers/storage's does.
        buf[..WINDOW].fill(0);
        let result = (|| {
            while left > 0 {
                let want = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(buf.len() - WINDOW);
                let got = match data.read(&mut buf[WINDOW..WINDOW + want]) {
                    Ok(0) => {
                        return Err(ZstdChunkedError::BadInput {
                            path: info.split_name.clone(),
                            detail: format!(
                                "data ends after {} of {size} bytes",
                                size.saturating_sub(left)
                            ),
                        })
                    }
                    Ok(g) => g,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(input_err(&info.split_name)(e)),
                };
                let block = &buf[WINDOW..WINDOW + got];
                file_hash.update(block);
                crc.update(block);
                self.diff.update(block);
                self.tar_len += got as u64;
                left -= got as u64;
                // buf[i] leaves the window as buf[i + WINDOW] enters it.
                let mut from = 0;
                let mut room = self.chunk_cap - self.chunk.len();
                for i in 0..got {
                    roll.roll(buf[i], buf[i + WINDOW]);
                    if roll.on_split() || i + 1 - from >= room {
                        self.chunk
                            .extend_from_slice(&buf[WINDOW + from..WINDOW + i + 1]);
                        from = i + 1;
                        let (id, n, d) = self.emit_chunk()?;
                        chunks.push((file_off, n, id, d));
                        file_off += n;
                        room = self.chunk_cap;
                    }
                }
                self.chunk
                    .extend_from_slice(&buf[WINDOW + from..WINDOW + got]);
                // The last 64 bytes seen (the window) go in front of the next block.
                buf.copy_within(got..got + WINDOW, 0);
            }
            if !self.chunk.is_empty() {
                let (id, n, d) = self.emit_chunk()?;
                chunks.push((file_off, n, id, d));
            }
            Ok(())
        })();
        self.buf = buf;
        result?;
        self.tar_split
            .file(&info.split_name, size, Some(crc.finish()))?;
        let Some(mut reg) = info.toc.clone() else {
            return Ok(());
        };
        reg.digest = file_hash.finish().to_string();
        let (Some(first), Some(last)) = (chunks.first(), chunks.last()) else {
            self.toc.push(reg);
            return Ok(());
        };
        self.placements.push(Placement {
            entry: self.toc.len(),
            first: first.2,
            last: last.2,
        });
        if chunks.len() == 1 {
            self.toc.push(reg);
            return Ok(());
        }
        reg.chunk_size = first.1;
        reg.chunk_digest = first.3.to_string();
        let name = reg.name.clone();
        self.toc.push(reg);
        for &(file_off, n, id, d) in &chunks[1..] {
            self.placements.push(Placement {
                entry: self.toc.len(),
                first: id,
                last: id,
            });
            self.toc.push(TocEntryOut {
                kind: "chunk",
                name: name.clone(),
                chunk_offset: file_off,
                chunk_size: n,
                chunk_digest: d.to_string(),
                ..TocEntryOut::default()
            });
        }
        Ok(())
    }

    fn raw(&mut self, data: &[u8]) -> Result<(), ZstdChunkedError> {
        self.head_bytes(data)?;
        self.tar_split.raw(data)
    }

    fn trailer(&mut self) -> Result<(), ZstdChunkedError> {
        Ok(())
    }
}

/// The 64-byte footer (current containers/storage layout), without its skippable-frame header.
pub(crate) fn footer_bytes(toc: &TocPosition, tar_split: Option<&TarSplitPosition>) -> Vec<u8> {
    let mut f = Vec::with_capacity(FOOTER_SIZE);
    let ts = tar_split.copied().unwrap_or(TarSplitPosition {
        offset: 0,
        compressed_len: 0,
        uncompressed_len: 0,
    });
    for v in [
        toc.offset,
        toc.compressed_len,
        toc.uncompressed_len,
        toc.manifest_type,
        ts.offset,
        ts.compressed_len,
        ts.uncompressed_len,
    ] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(FOOTER_MAGIC);
    f
}

// ---------------------------------------------------------------------------------------------
// Input

/// Passes the input through to the tar reader, keeping a copy of what it reads while
/// `recording` (headers and padding: everything but entry data), so the output is the input
/// byte for byte.
struct Tee<R> {
    inner: R,
    state: Rc<RefCell<TeeState>>,
}

#[derive(Default)]
struct TeeState {
    recording: bool,
    recorded: Vec<u8>,
    /// Bytes read while not recording (the current entry's stored data).
    passed: u64,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut st = self.state.borrow_mut();
        if st.recording {
            st.recorded.extend_from_slice(&buf[..n]);
        } else {
            st.passed += n as u64;
        }
        Ok(n)
    }
}

fn utf8(path: &str, what: &str, bytes: &[u8]) -> Result<String, ZstdChunkedError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| ZstdChunkedError::BadInput {
        path: path.to_string(),
        detail: format!("{what} is not valid UTF-8, which the JSON TOC cannot carry"),
    })
}

/// What [`describe`] makes of an entry.
enum Described {
    /// Write it (info), replacing the raw header with `normalised` when set.
    Keep(Box<ItemInfo>, Option<Vec<u8>>),
    /// An eStargz artefact (its TOC or a landmark) from converting an eStargz layer: drop it.
    Drop,
}

/// Reads an entry's metadata into its TOC entry.
fn describe<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Described, ZstdChunkedError> {
    let raw_path = entry.path_bytes().into_owned();
    let lossy = String::from_utf8_lossy(&raw_path).into_owned();
    let etype = entry.header().entry_type();
    if etype == EntryType::XGlobalHeader {
        return Ok(Described::Keep(
            Box::new(ItemInfo {
                toc: None,
                split_name: lossy,
                data_size: entry.size(),
                regular: false,
                path: String::new(),
                hardlink_target: None,
            }),
            None,
        ));
    }
    let path = utf8(&lossy, "the path", &raw_path)?;
    let bad = |detail: String| ZstdChunkedError::BadInput {
        path: crate::toc::shorten(&lossy),
        detail,
    };
    let parts = split_path(&path).map_err(|e| bad(path_problem(&e)))?;
    let norm = parts.join("/");
    if norm == TOC_TAR_NAME || norm == PREFETCH_LANDMARK || norm == NO_PREFETCH_LANDMARK {
        return Ok(Described::Drop);
    }
    let (kind, regular) = match etype {
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => ("reg", true),
        EntryType::Link => ("hardlink", false),
        EntryType::Symlink => ("symlink", false),
        EntryType::Char => ("char", false),
        EntryType::Block => ("block", false),
        EntryType::Directory => ("dir", false),
        EntryType::Fifo => ("fifo", false),
        other => {
            return Err(bad(format!(
                "tar entry type {other:?} cannot be stored in zstd:chunked"
            )))
        }
    };
    let mut records: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    if let Some(exts) = entry.pax_extensions().map_err(input_err(&lossy))? {
        for ext in exts {
            let ext = ext.map_err(input_err(&lossy))?;
            records.push((ext.key_bytes().to_vec(), ext.value_bytes().to_vec()));
        }
    }
    let pax = |key: &str| {
        records
            .iter()
            .find(|(k, _)| k.as_slice() == key.as_bytes())
            .map(|(_, v)| v.as_slice())
    };
    let data_size = entry.size();
    let header = entry.header();
    let mut toc = TocEntryOut {
        kind,
        name: path.clone(),
        mode: numeric(&header.as_old().mode, header.mode().map(u64::from))
            .map_err(input_err(&lossy))?,
        uid: numeric(&header.as_old().uid, header.uid()).map_err(input_err(&lossy))?,
        gid: numeric(&header.as_old().gid, header.gid()).map_err(input_err(&lossy))?,
        ..TocEntryOut::default()
    };
    let mtime = pax("mtime")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.split('.').next())
        .and_then(|v| v.parse::<i64>().ok())
        .or_else(|| {
            numeric(&header.as_old().mtime, header.mtime())
                .ok()
                .and_then(|m| i64::try_from(m).ok())
        })
        .unwrap_or(0);
    toc.modtime = format_rfc3339(mtime);
    for (k, v) in &records {
        if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
            let name = utf8(&lossy, "an xattr name", name)?;
            toc.xattrs
                .insert(name, base64::engine::general_purpose::STANDARD.encode(v));
        }
    }
    let mut hardlink_target = None;
    match kind {
        "reg" => toc.size = data_size,
        "symlink" | "hardlink" => {
            let l = entry
                .link_name_bytes()
                .ok_or_else(|| bad("link without a target".into()))?;
            toc.link_name = utf8(&lossy, "the link target", &l)?;
            if kind == "hardlink" {
                hardlink_target = split_path(&toc.link_name).ok().map(|p| p.join("/"));
            }
        }
        "char" | "block" => {
            let dev = |r: io::Result<Option<u32>>| r.map(|d| u64::from(d.unwrap_or(0)));
            toc.dev_major = dev(header.device_major()).map_err(input_err(&lossy))?;
            toc.dev_minor = dev(header.device_minor()).map_err(input_err(&lossy))?;
        }
        _ => {}
    }
    let normalised = if matches!(etype, EntryType::GNUSparse) {
        // The tar reader expands sparse files; store them as plain files of their real size.
        let mut h = header.clone();
        h.set_entry_type(EntryType::Regular);
        h.set_size(data_size);
        if let Some(gnu) = h.as_gnu_mut() {
            for s in gnu.sparse.iter_mut() {
                s.offset = [0; 12];
                s.numbytes = [0; 12];
            }
            gnu.isextended = [0];
            gnu.realsize = [0; 12];
        }
        h.set_cksum();
        Some(h.as_bytes().to_vec())
    } else {
        None
    };
    Ok(Described::Keep(
        Box::new(ItemInfo {
            toc: Some(toc),
            split_name: path,
            data_size,
            regular,
            path: norm,
            hardlink_target,
        }),
        normalised,
    ))
}

/// Reads the tar stream, handing every byte of it to `c` in order.
fn parse_tar<R: Read>(tar_in: R, c: &mut dyn Consumer) -> Result<(), ZstdChunkedError> {
    let state = Rc::new(RefCell::new(TeeState {
        recording: true,
        ..TeeState::default()
    }));
    let mut archive = tar::Archive::new(Tee {
        inner: tar_in,
        state: state.clone(),
    });
    let mut entries = archive.entries().map_err(input_err(""))?;
    // Padding owed by the previous entry, and whether it was dropped or normalised.
    let mut prev_pad = 0usize;
    let mut prev_dropped = false;
    let mut prev_forced_pad: Option<usize> = None;
    loop {
        {
            let mut st = state.borrow_mut();
            st.recording = true;
            st.recorded.clear();
            st.passed = 0;
        }
        let next = entries.next();
        let recorded = std::mem::take(&mut state.borrow_mut().recorded);
        let split = prev_pad.min(recorded.len());
        let (pad, head) = recorded.split_at(split);
        match prev_forced_pad.take() {
            Some(n) => c.raw(&[0u8; BLOCK as usize][..n])?,
            None if !prev_dropped => c.raw(pad)?,
            None => {}
        }
        let mut entry = match next {
            None => {
                c.trailer()?;
                c.raw(head)?;
                break;
            }
            Some(e) => e.map_err(input_err(""))?,
        };
        // The extension headers and the header were read; now the data, unrecorded.
        state.borrow_mut().recording = false;
        let described = describe(&mut entry)?;
        let (info, normalised) = match described {
            Described::Drop => {
                io::copy(&mut entry, &mut io::sink()).map_err(input_err(""))?;
                prev_pad = padding(state.borrow().passed);
                prev_dropped = true;
                continue;
            }
            Described::Keep(info, normalised) => (info, normalised),
        };
        prev_dropped = false;
        let head: Vec<u8> = match &normalised {
            None => head.to_vec(),
            Some(h) => {
                // Keep the extension headers; replace the header and its sparse blocks.
                let keep = head_extension_len(head);
                let mut v = head[..keep].to_vec();
                v.extend_from_slice(h);
                v
            }
        };
        c.entry(&info, &head)?;
        if info.regular && info.data_size > 0 {
            c.content(&info, &mut entry)?;
        } else if info.data_size > 0 {
            let mut buf = vec![0u8; COPY_BUF];
            let mut left = info.data_size;
            while left > 0 {
                let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let got = match entry.read(&mut buf[..want]) {
                    Ok(0) => {
                        return Err(ZstdChunkedError::BadInput {
                            path: info.split_name.clone(),
                            detail: "entry data ends early".into(),
                        })
                    }
                    Ok(g) => g,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(input_err(&info.split_name)(e)),
                };
                c.raw(&buf[..got])?;
                left -= got as u64;
            }
        }
        let passed = state.borrow().passed;
        prev_pad = padding(passed);
        if normalised.is_some() {
            prev_forced_pad = Some(padding(info.data_size));
        }
    }
    // Anything after the end-of-archive block (usually the second zero block).
    let mut tee = archive.into_inner();
    tee.state.borrow_mut().recording = false;
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = match tee.inner.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(input_err("the end of the archive")(e)),
        };
        c.raw(&buf[..n])?;
    }
    Ok(())
}

/// Length of the extension headers (PAX `x`, GNU `L`/`K` and their data) at the start of
/// `head`, i.e. where the main header starts.
fn head_extension_len(head: &[u8]) -> usize {
    let mut pos = 0usize;
    while let Some(block) = head.get(pos..pos + BLOCK as usize) {
        let Ok(h) = <&[u8; 512]>::try_from(block) else {
            break;
        };
        let header = tar::Header::from_byte_slice(h);
        let t = header.entry_type();
        if !(t.is_pax_local_extensions() || t.is_gnu_longname() || t.is_gnu_longlink()) {
            return pos;
        }
        let size = header.entry_size().unwrap_or(0);
        let data = size.div_ceil(BLOCK) * BLOCK;
        pos = pos
            .saturating_add(BLOCK as usize)
            .saturating_add(usize::try_from(data).unwrap_or(usize::MAX));
    }
    pos.min(head.len())
}

// ---------------------------------------------------------------------------------------------
// Prefetch reordering

/// A spool file for reordering, with the error that says so.
fn spool_file() -> Result<File, ZstdChunkedError> {
    crate::toc::spool::spool_file("zstdchunked")
        .map_err(io_err("creating a spool file for reordering"))
}

/// Where one entry sits in the spool: its head, data and trailing raw bytes (padding).
struct Spooled {
    info: ItemInfo,
    start: u64,
    head: u64,
    data: u64,
    tail: u64,
}

impl PlannedEntry for Spooled {
    fn path(&self) -> &str {
        &self.info.path
    }
    fn hardlink_target(&self) -> Option<&str> {
        self.info.hardlink_target.as_deref()
    }
}

/// First pass of a reordering conversion: the input, spooled with an index.
struct Spool {
    out: BufWriter<File>,
    pos: u64,
    items: Vec<Spooled>,
    /// Raw bytes before the first entry.
    lead: u64,
    /// Start of the end-of-archive bytes, once met.
    trailer: Option<u64>,
}

impl Spool {
    fn new() -> Result<Spool, ZstdChunkedError> {
        Ok(Spool {
            out: BufWriter::with_capacity(256 * 1024, spool_file()?),
            pos: 0,
            items: Vec::new(),
            lead: 0,
            trailer: None,
        })
    }

    fn put(&mut self, data: &[u8]) -> Result<(), ZstdChunkedError> {
        self.out
            .write_all(data)
            .map_err(io_err("writing the spool file"))?;
        self.pos += data.len() as u64;
        Ok(())
    }

    /// Second pass: the prefetched entries first, then the rest in input order, then the end
    /// of the archive.
    fn replay<W: Write>(self, w: &mut Writer<W>, list: &[String]) -> Result<(), ZstdChunkedError> {
        let file = self
            .out
            .into_inner()
            .map_err(|e| io_err("writing the spool file")(e.into_error()))?;
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        let front = plan_prefetch(&self.items, list);
        let mut moved = vec![false; self.items.len()];
        for &i in &front {
            if let Some(m) = moved.get_mut(i) {
                *m = true;
            }
        }
        let copy_raw = |reader: &mut BufReader<File>,
                        w: &mut Writer<W>,
                        start: u64,
                        len: u64|
         -> Result<(), ZstdChunkedError> {
            reader
                .seek(SeekFrom::Start(start))
                .map_err(io_err("reading the spool file"))?;
            let mut buf = vec![0u8; COPY_BUF];
            let mut left = len;
            while left > 0 {
                let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                reader
                    .read_exact(&mut buf[..want])
                    .map_err(io_err("reading the spool file"))?;
                w.raw(&buf[..want])?;
                left -= want as u64;
            }
            Ok(())
        };
        let emit = |reader: &mut BufReader<File>,
                    w: &mut Writer<W>,
                    s: &Spooled|
         -> Result<(), ZstdChunkedError> {
            reader
                .seek(SeekFrom::Start(s.start))
                .map_err(io_err("reading the spool file"))?;
            let mut head = vec![0u8; usize::try_from(s.head).unwrap_or(0)];
            reader
                .read_exact(&mut head)
                .map_err(io_err("reading the spool file"))?;
            w.entry(&s.info, &head)?;
            if s.info.regular && s.data > 0 {
                let mut data = (&mut *reader).take(s.data);
                w.content(&s.info, &mut data)?;
            } else {
                copy_raw(reader, w, s.start + s.head, s.data)?;
            }
            copy_raw(reader, w, s.start + s.head + s.data, s.tail)
        };
        copy_raw(&mut reader, w, 0, self.lead)?;
        for &i in &front {
            if let Some(s) = self.items.get(i) {
                emit(&mut reader, w, s)?;
            }
        }
        w.mark_prefetch_end(!front.is_empty())?;
        for (i, s) in self.items.iter().enumerate() {
            if !moved.get(i).copied().unwrap_or(false) {
                emit(&mut reader, w, s)?;
            }
        }
        if let Some(t) = self.trailer {
            copy_raw(&mut reader, w, t, self.pos - t)?;
        }
        Ok(())
    }
}

impl Consumer for Spool {
    fn entry(&mut self, info: &ItemInfo, head: &[u8]) -> Result<(), ZstdChunkedError> {
        let start = self.pos;
        self.put(head)?;
        self.items.push(Spooled {
            info: info.clone(),
            start,
            head: head.len() as u64,
            data: 0,
            tail: 0,
        });
        Ok(())
    }

    fn content(&mut self, info: &ItemInfo, data: &mut dyn Read) -> Result<(), ZstdChunkedError> {
        let copied = io::copy(&mut data.take(info.data_size), &mut self.out)
            .map_err(input_err(&info.split_name))?;
        if copied != info.data_size {
            return Err(ZstdChunkedError::BadInput {
                path: info.split_name.clone(),
                detail: format!("data ends after {copied} of {} bytes", info.data_size),
            });
        }
        self.pos += copied;
        if let Some(s) = self.items.last_mut() {
            s.data += copied;
        }
        Ok(())
    }

    fn raw(&mut self, data: &[u8]) -> Result<(), ZstdChunkedError> {
        self.put(data)?;
        let n = data.len() as u64;
        if self.trailer.is_some() {
            return Ok(());
        }
        match self.items.last_mut() {
            // Data of a non-regular entry, then its padding: both follow its head.
            Some(s) if s.tail == 0 && !(s.info.regular && s.info.data_size > 0) => {
                if s.data < s.info.data_size {
                    s.data += n;
                } else {
                    s.tail += n;
                }
            }
            Some(s) => s.tail += n,
            None => self.lead += n,
        }
        Ok(())
    }

    fn trailer(&mut self) -> Result<(), ZstdChunkedError> {
        self.trailer = Some(self.pos);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::collections::HashMap;
    use std::io::Read;

    use super::super::reader::{open_toc, TocHint};
    use super::super::PREFETCH_END_KEY;
    use super::*;
    use crate::estargz::{Prefetch, ReaderConfig};
    use crate::toc::sample::{self, header, pseudo_random};
    use crate::toc::{Chunk, Layer, NodeId};

    /// The sample layer with content-defined chunking's edge cases: random data cut often,
    /// constant runs cut only at the cap.
    fn input_tar() -> (Vec<u8>, BTreeMap<String, Vec<u8>>) {
        sample::input_tar(vec![
            ("usr/bin/big", 0o4755, pseudo_random(3 << 20, 1)),
            ("usr/bin/zeros", 0o644, vec![0u8; 300_000]),
            ("usr/bin/ones", 0o644, vec![0xffu8; 300_000]),
        ])
    }

    fn write(tar_in: &[u8], opts: &WriterOptions) -> (Vec<u8>, WrittenLayer) {
        let mut blob = Vec::new();
        let w = write_zstd_chunked(tar_in, &mut blob, opts).unwrap();
        (blob, w)
    }

    fn hint_of(w: &WrittenLayer) -> TocHint {
        let a: HashMap<String, String> = w.annotations().into_iter().collect();
        TocHint::from_annotations(&a).unwrap()
    }

    /// Decompresses one chunk straight from the blob, as the filesystem will.
    fn read_chunk(blob: &[u8], c: &Chunk) -> Vec<u8> {
        let unit = &blob[c.blob_offset as usize..(c.blob_offset + c.blob_len) as usize];
        let mut out = Vec::new();
        zstd::stream::read::Decoder::with_buffer(unit)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out[c.inner_offset as usize..(c.inner_offset + c.size) as usize].to_vec()
    }

    fn read_file(layer: &Layer, blob: &[u8], id: NodeId) -> Vec<u8> {
        let mut out = Vec::new();
        for c in layer.chunks(id) {
            let data = read_chunk(blob, c);
            assert_eq!(c.file_offset, out.len() as u64);
            assert!(c.digest.unwrap().matches(&data), "chunk digest");
            out.extend_from_slice(&data);
        }
        out
    }

    fn unzstd(blob: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        zstd::stream::read::Decoder::with_buffer(blob)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    fn names(raw_tar: &[u8]) -> Vec<String> {
        let mut a = tar::Archive::new(raw_tar);
        a.entries()
            .unwrap()
            .map(|e| String::from_utf8(e.unwrap().path_bytes().into_owned()).unwrap())
            .collect()
    }

    /// The tar-split records of a blob, decompressed.
    fn tar_split_records(blob: &[u8], w: &WrittenLayer) -> Vec<serde_json::Value> {
        let ts = &blob[w.tar_split.offset as usize
            ..(w.tar_split.offset + w.tar_split.compressed_len) as usize];
        assert_eq!(Digest::sha256_of(ts), w.tar_split_digest);
        let raw = unzstd(ts);
        assert_eq!(raw.len() as u64, w.tar_split.uncompressed_len);
        raw.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    /// Rebuilds the tar stream from tar-split records and the files' contents, as
    /// containers/storage does after a partial pull.
    fn reassemble(records: &[serde_json::Value], contents: &HashMap<String, Vec<u8>>) -> Vec<u8> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut out = Vec::new();
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r["position"].as_u64(), Some(i as u64));
            match r["type"].as_u64() {
                Some(2) => out.extend(b64.decode(r["payload"].as_str().unwrap()).unwrap()),
                Some(1) => {
                    let size = r["size"].as_u64().unwrap_or(0);
                    if size == 0 {
                        assert!(r["payload"].is_null());
                        continue;
                    }
                    let name = r["name"].as_str().unwrap();
                    let data = &contents[name];
                    assert_eq!(data.len() as u64, size, "{name}");
                    let mut crc = Crc64::new();
                    crc.update(data);
                    let want = b64.encode(crc.finish());
                    assert_eq!(r["payload"].as_str(), Some(want.as_str()), "{name} crc");
                    out.extend_from_slice(data);
                }
                other => panic!("record type {other:?}"),
            }
        }
        out
    }

    #[test]
    fn round_trip() {
        let (tar_in, files) = input_tar();
        let opts = WriterOptions {
            chunk_size: 1 << 20,
            level: 3,
            ..WriterOptions::default()
        };
        let (blob, w) = write(&tar_in, &opts);
        assert_eq!(w.blob_size, blob.len() as u64);
        assert_eq!(w.blob_digest, Digest::sha256_of(&blob));
        // The tar stream passes through unchanged.
        assert_eq!(w.diff_id, Digest::sha256_of(&tar_in));
        assert_eq!(w.uncompressed_size, tar_in.len() as u64);
        assert_eq!(unzstd(&blob), tar_in);

        let hint = hint_of(&w);
        assert_eq!(hint.toc, Some(w.toc));
        assert_eq!(hint.tar_split, Some(w.tar_split));
        let opened =
            open_toc(&blob, 0, blob.len() as u64, &hint, &ReaderConfig::default()).unwrap();
        assert_eq!(opened.manifest_checksum, w.manifest_checksum);
        assert_eq!(opened.toc_digest, w.toc_digest);
        assert_eq!(opened.tar_split_digest, Some(w.tar_split_digest));
        assert_eq!(opened.prefetch, Prefetch::Unspecified);
        assert!(!opened.from_footer);
        let l = &opened.layer;
        sample::assert_tree(l, &files, &|id| read_file(l, &blob, id));
        for c in l.all_chunks() {
            assert!(c.size <= opts.chunk_size, "chunk of {}", c.size);
            assert_eq!(c.inner_offset, 0);
        }
        // Content-defined chunks: the random file is cut many times, the constant ones only
        // at the cap (the rolling checksum never fires on a constant run).
        let big = l.resolve("usr/bin/big").unwrap();
        assert!(l.chunks(big).len() > 10, "{}", l.chunks(big).len());
        assert_eq!(l.chunks(l.resolve("usr/bin/zeros").unwrap()).len(), 1);

        // The footer alone finds the same TOC.
        let by_footer = open_toc(
            &blob,
            0,
            blob.len() as u64,
            &TocHint::default(),
            &ReaderConfig::default(),
        )
        .unwrap();
        assert!(by_footer.from_footer);
        assert_eq!(by_footer.toc, w.toc);
        assert_eq!(by_footer.tar_split, Some(w.tar_split));
        assert_eq!(by_footer.manifest_checksum, w.manifest_checksum);

        // The tar-split data rebuilds the exact tar stream from the files' contents.
        let records = tar_split_records(&blob, &w);
        let contents: HashMap<String, Vec<u8>> = files.into_iter().collect();
        assert_eq!(reassemble(&records, &contents), tar_in);

        // The annotations, in both spellings.
        let a = w.annotations();
        assert_eq!(
            a["io.github.containers.zstd-chunked.manifest-checksum"],
            w.manifest_checksum.to_string()
        );
        assert_eq!(
            a["io.containers.zstd-chunked.manifest-position"],
            format!(
                "{}:{}:{}:1",
                w.toc.offset, w.toc.compressed_len, w.toc.uncompressed_len
            )
        );
        assert_eq!(
            a["io.github.containers.zstd-chunked.tarsplit-position"],
            format!(
                "{}:{}:{}",
                w.tar_split.offset, w.tar_split.compressed_len, w.tar_split.uncompressed_len
            )
        );
    }

    /// The system's zstd and tar read the blob as an ordinary tar+zstd layer.
    #[test]
    fn zstd_and_tar_cli_read_the_blob() {
        let (tar_in, _) = input_tar();
        let (blob, _) = write(&tar_in, &WriterOptions::default());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer.tar.zst");
        std::fs::write(&path, &blob).unwrap();
        let Ok(out) = std::process::Command::new("zstd")
            .args(["-dc", "--no-progress"])
            .arg(&path)
            .output()
        else {
            eprintln!("zstd CLI not installed; skipping (apt-get install -y zstd)");
            return;
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, tar_in, "zstd -dc gives back the input tar");
        let listed = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("zstd -dc {} | tar -tf -", path.display()))
            .output()
            .unwrap();
        assert!(
            listed.status.success(),
            "{}",
            String::from_utf8_lossy(&listed.stderr)
        );
        let stdout = String::from_utf8_lossy(&listed.stdout);
        for name in names(&tar_in) {
            assert!(stdout.lines().any(|l| l == name), "tar -t misses {name}");
        }
    }

    #[test]
    fn same_blob_with_and_without_workers() {
        let (tar_in, _) = input_tar();
        let opts = WriterOptions {
            chunk_size: 100_000,
            level: 3,
            prefetch: Some(vec!["usr/bin/ones".into()]),
        };
        let mut blobs = Vec::new();
        for workers in [0, 1, 3] {
            let mut blob = Vec::new();
            let w = write_with_workers(&tar_in[..], &mut blob, &opts, 100_000, workers).unwrap();
            assert_eq!(w.blob_digest, Digest::sha256_of(&blob));
            blobs.push(blob);
        }
        assert!(blobs[0] == blobs[1] && blobs[1] == blobs[2]);
    }

    /// Writer throughput, inline and with the worker pool, against `zstd` CLI on the same tar
    /// at the same moment (best of three, interleaved, as the machine may be shared). Run:
    /// `cargo test --release -p lazypull-fs --lib -- --ignored --nocapture measure_engines`.
    #[test]
    #[ignore = "measurement"]
    fn measure_engines() {
        let dir =
            std::env::var("LAZYPULL_MEASURE_DIR").unwrap_or_else(|_| "/usr/lib/python3.11".into());
        let tar_in = std::process::Command::new("tar")
            .args(["-C", &dir, "-cf", "-", "."])
            .output()
            .unwrap()
            .stdout;
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &tar_in).unwrap();
        let mb = tar_in.len() as f64 / 1e6;
        for level in [3, 10] {
            let mut best = [f64::MAX; 3];
            for _ in 0..3 {
                for (i, workers) in [0usize, 2].into_iter().enumerate() {
                    let t = std::time::Instant::now();
                    let opts = WriterOptions {
                        level,
                        ..WriterOptions::default()
                    };
                    write_with_workers(&tar_in[..], io::sink(), &opts, 4 << 20, workers).unwrap();
                    best[i] = best[i].min(t.elapsed().as_secs_f64());
                }
                let t = std::time::Instant::now();
                std::process::Command::new("zstd")
                    .args(["-q", "-c", &format!("-{level}")])
                    .arg(file.path())
                    .stdout(std::process::Stdio::null())
                    .status()
                    .unwrap();
                best[2] = best[2].min(t.elapsed().as_secs_f64());
            }
            eprintln!(
                "level {level}, {mb:.0} MB tar: inline {:.1} MB/s, 2 workers {:.1} MB/s, zstd CLI (one stream) {:.1} MB/s",
                mb / best[0],
                mb / best[1],
                mb / best[2]
            );
        }
    }

    #[test]
    fn crc64_matches_go() {
        // CRC-64/GO-ISO check value.
        let mut c = Crc64::new();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0xb909_56c7_75a4_1001u64.to_be_bytes());
    }

    /// Content-defined boundaries survive an insertion: most chunks of a shifted copy are the
    /// same chunks, which is what deduplicates them across layers and images.
    #[test]
    fn chunks_are_content_defined() {
        let data = pseudo_random(2 << 20, 7);
        let mut shifted = b"inserted bytes".to_vec();
        shifted.extend_from_slice(&data);
        let digests = |content: &[u8]| -> Vec<Digest> {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = header(EntryType::Regular, 0o644, content.len() as u64);
            b.append_data(&mut h, "f", content).unwrap();
            let (blob, w) = write(
                &b.into_inner().unwrap(),
                &WriterOptions {
                    level: 1,
                    ..WriterOptions::default()
                },
            );
            let o = open_toc(
                &blob,
                0,
                blob.len() as u64,
                &hint_of(&w),
                &ReaderConfig::default(),
            )
            .unwrap();
            let id = o.layer.resolve("f").unwrap();
            o.layer
                .chunks(id)
                .iter()
                .map(|c| c.digest.unwrap())
                .collect()
        };
        let a = digests(&data);
        let b = digests(&shifted);
        let shared = b.iter().filter(|d| a.contains(d)).count();
        assert!(a.len() > 8);
        assert!(
            shared + 1 >= a.len(),
            "{shared} of {} chunks shared",
            a.len()
        );
    }

    #[test]
    fn prefetch_files_come_first() {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in [
            ("a/x", &b"xx"[..]),
            ("b/y", &b"yy"[..]),
            ("c/", &b""[..]),
            ("c/z", &b"zz"[..]),
            ("d", &b"dd"[..]),
        ] {
            let kind = if path.ends_with('/') {
                EntryType::Directory
            } else {
                EntryType::Regular
            };
            let mut h = header(kind, 0o644, data.len() as u64);
            b.append_data(&mut h, path, data).unwrap();
        }
        // A hard link whose target is not prefetched: the target must move too.
        let mut h = header(EntryType::Link, 0o644, 0);
        b.append_link(&mut h, "e", "d").unwrap();
        let tar_in = b.into_inner().unwrap();
        let opts = WriterOptions {
            prefetch: Some(vec!["c/z".into(), "./e".into(), "missing".into()]),
            ..WriterOptions::default()
        };
        let (blob, w) = write(&tar_in, &opts);
        let raw = unzstd(&blob);
        assert_eq!(names(&raw), vec!["c/", "c/z", "d", "e", "a/x", "b/y"]);
        assert_eq!(w.diff_id, Digest::sha256_of(&raw));
        let opened = open_toc(
            &blob,
            0,
            blob.len() as u64,
            &hint_of(&w),
            &ReaderConfig::default(),
        )
        .unwrap();
        let Prefetch::Until { blob_offset } = opened.prefetch else {
            panic!("{:?}", opened.prefetch)
        };
        let l = &opened.layer;
        for (path, first) in [("c/z", true), ("d", true), ("a/x", false), ("b/y", false)] {
            let id = l.resolve(path).unwrap();
            let c = l.chunks(id);
            assert_eq!(c[0].blob_offset < blob_offset, first, "{path}");
            assert_eq!(
                read_file(l, &blob, id),
                path.rsplit('/').next().unwrap().repeat(2).as_bytes()
            );
        }
        assert_eq!(l.resolve("e"), l.resolve("d"));
        // The reordered stream still reassembles from tar-split.
        let contents: HashMap<String, Vec<u8>> =
            [("a/x", "xx"), ("b/y", "yy"), ("c/z", "zz"), ("d", "dd")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect();
        assert_eq!(reassemble(&tar_split_records(&blob, &w), &contents), raw);

        // Nothing from the list present: input order, "nothing to prefetch".
        let opts = WriterOptions {
            prefetch: Some(vec!["nothing/here".into()]),
            ..WriterOptions::default()
        };
        let (blob, w) = write(&tar_in, &opts);
        assert_eq!(unzstd(&blob), tar_in);
        let opened = open_toc(
            &blob,
            0,
            blob.len() as u64,
            &hint_of(&w),
            &ReaderConfig::default(),
        )
        .unwrap();
        assert_eq!(opened.prefetch, Prefetch::None);
        let toc_json =
            unzstd(&blob[w.toc.offset as usize..(w.toc.offset + w.toc.compressed_len) as usize]);
        let v: serde_json::Value = serde_json::from_slice(&toc_json).unwrap();
        assert_eq!(v[PREFETCH_END_KEY], 0);
    }

    #[test]
    fn estargz_artefacts_are_dropped_and_pax_globals_kept() {
        // An eStargz layer's tar: landmark, files, TOC entry.
        let mut esgz = Vec::new();
        let mut b = tar::Builder::new(Vec::new());
        let records = b"18 comment=hello!\n";
        let mut g = tar::Header::new_ustar();
        g.set_path("pax_global_header").unwrap();
        g.set_entry_type(EntryType::XGlobalHeader);
        g.set_size(records.len() as u64);
        g.set_cksum();
        b.append(&g, &records[..]).unwrap();
        let mut h = header(EntryType::Regular, 0o644, 2);
        b.append_data(&mut h, "f", &b"hi"[..]).unwrap();
        crate::estargz::write_estargz(
            &b.into_inner().unwrap()[..],
            &mut esgz,
            &crate::estargz::WriterOptions::default(),
        )
        .unwrap();
        let mut raw = Vec::new();
        flate2::read::MultiGzDecoder::new(&esgz[..])
            .read_to_end(&mut raw)
            .unwrap();
        assert!(names(&raw).contains(&TOC_TAR_NAME.to_string()));
        for prefetch in [None, Some(vec!["f".to_string()])] {
            let (blob, w) = write(
                &raw,
                &WriterOptions {
                    prefetch,
                    ..WriterOptions::default()
                },
            );
            let out = unzstd(&blob);
            assert_eq!(names(&out), vec!["pax_global_header", "f"]);
            assert_eq!(w.diff_id, Digest::sha256_of(&out));
            let mut a = tar::Archive::new(&out[..]);
            let mut e = a.entries().unwrap().next().unwrap().unwrap();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            assert_eq!(data, records);
            let o = open_toc(
                &blob,
                0,
                blob.len() as u64,
                &hint_of(&w),
                &ReaderConfig::default(),
            )
            .unwrap();
            let f = o.layer.resolve("f").unwrap();
            assert_eq!(read_file(&o.layer, &blob, f), b"hi");
            assert_eq!(o.layer.resolve("pax_global_header"), None);
        }
    }

    /// GNU sparse files (written by GNU tar) are stored expanded, as plain files.
    #[test]
    fn gnu_sparse_files_are_expanded() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sparse");
        {
            let file = std::fs::File::create(&f).unwrap();
            file.set_len(1 << 20).unwrap();
            use std::os::unix::fs::FileExt;
            file.write_all_at(b"middle", 500_000).unwrap();
            file.write_all_at(b"end", (1 << 20) - 3).unwrap();
        }
        let Ok(out) = std::process::Command::new("tar")
            .args(["--sparse", "--format=gnu", "-cf", "-", "-C"])
            .arg(dir.path())
            .arg("sparse")
            .output()
        else {
            eprintln!("GNU tar not installed; skipping");
            return;
        };
        assert!(out.status.success());
        let tar_in = out.stdout;
        assert_eq!(tar_in[156], b'S', "GNU tar wrote a sparse entry");
        let (blob, w) = write(&tar_in, &WriterOptions::default());
        let raw = unzstd(&blob);
        assert_eq!(w.diff_id, Digest::sha256_of(&raw));
        let mut expected = vec![0u8; 1 << 20];
        expected[500_000..500_006].copy_from_slice(b"middle");
        expected[(1 << 20) - 3..].copy_from_slice(b"end");
        // The rewritten stream is a plain tar holding the expanded file.
        let mut a = tar::Archive::new(&raw[..]);
        let mut e = a.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.header().entry_type(), EntryType::Regular);
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        assert!(data == expected);
        let o = open_toc(
            &blob,
            0,
            blob.len() as u64,
            &hint_of(&w),
            &ReaderConfig::default(),
        )
        .unwrap();
        let id = o.layer.resolve("sparse").unwrap();
        assert!(read_file(&o.layer, &blob, id) == expected);
    }

    #[test]
    fn rejects_bad_input_and_options() {
        let mut blob = Vec::new();
        for bad in [
            WriterOptions {
                chunk_size: 0,
                ..WriterOptions::default()
            },
            WriterOptions {
                level: 99,
                ..WriterOptions::default()
            },
        ] {
            assert!(matches!(
                write_zstd_chunked(&[][..], &mut blob, &bad),
                Err(ZstdChunkedError::BadOptions(_))
            ));
        }
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..9].copy_from_slice(b"../escape");
        h.set_size(0);
        h.set_mode(0o644);
        h.set_cksum();
        let mut t = h.as_bytes().to_vec();
        t.extend_from_slice(&[0; 1024]);
        assert!(matches!(
            write_zstd_chunked(&t[..], &mut blob, &WriterOptions::default()),
            Err(ZstdChunkedError::BadInput { .. })
        ));
        // Truncated input data.
        let mut h = header(EntryType::Regular, 0o644, 5000);
        h.set_path("f").unwrap();
        h.set_cksum();
        let mut t = h.as_bytes().to_vec();
        t.extend_from_slice(&[1; 100]);
        assert!(write_zstd_chunked(&t[..], &mut blob, &WriterOptions::default()).is_err());
        // Not a tar at all.
        assert!(write_zstd_chunked(&[7u8; 700][..], &mut blob, &WriterOptions::default()).is_err());
    }

    #[test]
    fn empty_and_trailing_data_pass_through() {
        // An empty archive, and one with garbage after the end-of-archive blocks.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(EntryType::Regular, 0o644, 3);
        b.append_data(&mut h, "x", &b"abc"[..]).unwrap();
        let mut with_trailer = b.into_inner().unwrap();
        with_trailer.extend_from_slice(&[0u8; 4096]);
        with_trailer.extend_from_slice(b"trailing junk");
        for tar_in in [vec![0u8; 1024], Vec::new(), with_trailer] {
            let (blob, w) = write(&tar_in, &WriterOptions::default());
            assert_eq!(unzstd(&blob), tar_in);
            assert_eq!(w.diff_id, Digest::sha256_of(&tar_in));
            let o = open_toc(
                &blob,
                0,
                blob.len() as u64,
                &hint_of(&w),
                &ReaderConfig::default(),
            )
            .unwrap();
            let contents: HashMap<String, Vec<u8>> =
                [("x".to_string(), b"abc".to_vec())].into_iter().collect();
            assert_eq!(reassemble(&tar_split_records(&blob, &w), &contents), tar_in);
            assert!(o.layer.len() <= 2);
        }
    }

    #[test]
    fn prefetch_key_matches_the_serialised_name() {
        let v = serde_json::to_value(TocOut {
            version: 1,
            entries: &[],
            tar_split_digest: String::new(),
            prefetch_end: Some(5),
        })
        .unwrap();
        assert_eq!(v[PREFETCH_END_KEY], 5);
    }
}
