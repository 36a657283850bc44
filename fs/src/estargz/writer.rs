//! Writing eStargz: a tar stream in, an eStargz blob out, in one streaming pass.
//!
//! Layout (as stargz-snapshotter writes it, so its tools and ours read each other's blobs):
//! every chunk of a regular file starts a new gzip member whose uncompressed data begins with
//! the chunk's bytes; tar headers and padding go at the end of the member before, so decompressing
//! from a chunk's offset yields its first byte at position 0. After the last entry, the TOC is
//! a tar entry `stargz.index.json` (plus the end-of-archive blocks) in its own member, then the
//! 51-byte footer. The whole output stays a valid `tar.gz`.
//!
//! Memory is bounded by a small copy buffer plus the TOC being built: file data is streamed,
//! never held. Reordering for prefetch spools the input to an unlinked temporary file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};

use base64::Engine as _;
use flate2::Compression;
use flate2::{Compress, Crc, FlushCompress, Status};
use lazypull_fetcher::digest::Verifier;
use lazypull_fetcher::{Algorithm, Digest};
use serde::Serialize;
use tar::EntryType;

use super::{
    EstargzError, LANDMARK_CONTENTS, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME,
};
use crate::toc::spool::{numeric, plan_prefetch, PlannedEntry};
use crate::toc::time::format_rfc3339;
use crate::toc::{path_problem, split_path};

const BLOCK: u64 = 512;
const COPY_BUF: usize = 64 * 1024;

/// How to write the blob.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Largest chunk of a regular file in one gzip member (default 4 MiB, as stargz-snapshotter):
    /// the unit of lazy fetching and verification, so smaller chunks mean less over-fetch per
    /// read but a larger TOC.
    pub chunk_size: u64,
    /// gzip level of every member (default: flate2's default, level 6).
    pub level: Compression,
    /// Paths to place first, followed by `.prefetch.landmark`, so a reader can prefetch them
    /// with one range request (the `--optimize` access profile). `None` writes
    /// `.no.prefetch.landmark` and keeps the input order.
    pub prefetch: Option<Vec<String>>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            chunk_size: 4 << 20,
            level: Compression::default(),
            prefetch: None,
        }
    }
}

/// What was written: everything an image manifest and config need for the new layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenLayer {
    /// SHA-256 of the TOC JSON (the `containerd.io/snapshot/stargz/toc.digest` annotation).
    pub toc_digest: Digest,
    /// SHA-256 of the uncompressed tar stream produced (the image config's diff id).
    pub diff_id: Digest,
    /// SHA-256 of the blob (the manifest's layer digest).
    pub blob_digest: Digest,
    /// Blob size in bytes.
    pub blob_size: u64,
    /// Uncompressed tar size (the `io.containers.estargz.uncompressed-size` annotation).
    pub uncompressed_size: u64,
}

/// Converts the tar stream `tar_in` into an eStargz blob written to `out`.
pub fn write_estargz<R: Read, W: Write>(
    tar_in: R,
    out: W,
    opts: &WriterOptions,
) -> Result<WrittenLayer, EstargzError> {
    if opts.chunk_size == 0 || opts.chunk_size > crate::toc::MAX_CHUNK_SIZE {
        return Err(EstargzError::BadOptions(format!(
            "chunk_size must be 1 to {} bytes (readers refuse larger chunks)",
            crate::toc::MAX_CHUNK_SIZE
        )));
    }
    let mut w = Writer::new(out, opts);
    match &opts.prefetch {
        None => {
            w.write_landmark(NO_PREFETCH_LANDMARK)?;
            let mut archive = tar::Archive::new(tar_in);
            let entries = archive.entries().map_err(input_err(""))?;
            for entry in entries {
                let mut entry = entry.map_err(input_err(""))?;
                if entry.header().entry_type() == EntryType::XGlobalHeader {
                    w.write_raw(&mut entry)?;
                } else {
                    w.write_entry(&mut entry)?;
                }
            }
        }
        Some(list) => write_reordered(&mut w, tar_in, list)?,
    }
    w.finish()
}

fn input_err(at: &str) -> impl Fn(io::Error) -> EstargzError + '_ {
    move |source| EstargzError::InputTar {
        at: if at.is_empty() {
            String::new()
        } else {
            format!(" at {at:?}")
        },
        source,
    }
}

fn io_err(context: &'static str) -> impl Fn(io::Error) -> EstargzError {
    move |source| EstargzError::Io { context, source }
}

/// The blob being written: counts and hashes every compressed byte. Buffered, because gzip
/// members and headers arrive in small writes and `out` may be a bare file or socket.
struct BlobSink<W: Write> {
    out: BufWriter<W>,
    len: u64,
    hash: Verifier,
}

impl<W: Write> Write for BlobSink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.len += n as u64;
        self.hash.update(buf.get(..n).unwrap_or(buf));
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The gzip members of the blob, written one after another by one compressor that is reset
/// between members. A compressor's state is hundreds of KiB; allocating one per member (one per
/// chunk: tens of thousands per layer) left a converting daemon with 1.1 GB of fragmented heap
/// for 111 MB live (heaptrack, a 22,000-file python image).
struct Members<W: Write> {
    sink: BlobSink<W>,
    deflate: Compress,
    crc: Crc,
    /// A member is open: its header is written, its trailer is not.
    open: bool,
    /// Header byte 8 (XFL) as flate2 writes it for this level.
    xfl: u8,
    /// A write failed: the blob is unusable.
    broken: bool,
    /// Input waiting for a whole staging block.
    staged: Vec<u8>,
    out: Vec<u8>,
}

/// Output buffer of the compressor.
const DEFLATE_OUT: usize = 64 << 10;
/// Input is compressed in blocks of this size.
const STAGE: usize = 64 << 10;

impl<W: Write> Members<W> {
    fn new(sink: BlobSink<W>, level: Compression) -> Self {
        let xfl = if level.level() >= Compression::best().level() {
            2
        } else if level.level() <= Compression::fast().level() {
            4
        } else {
            0
        };
        Members {
            sink,
            deflate: Compress::new(level, false),
            crc: Crc::new(),
            open: false,
            xfl,
            broken: false,
            staged: Vec::with_capacity(STAGE),
            out: Vec::with_capacity(DEFLATE_OUT),
        }
    }

    fn check(&self) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::other("an earlier write failed"));
        }
        Ok(())
    }

    /// Compresses `data` into the current member, opening one if none is open.
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.check()?;
        let r = self.write_inner(data);
        self.broken |= r.is_err();
        r
    }

    fn write_inner(&mut self, data: &[u8]) -> io::Result<()> {
        if !self.open {
            // ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL OS=unknown, as flate2's GzEncoder writes.
            self.sink
                .write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, self.xfl, 255])?;
            self.deflate.reset();
            self.crc.reset();
            self.open = true;
        }
        self.crc.update(data);
        // The compressor sees whole staging blocks only, so a member's bytes do not depend on
        // how its input was cut into writes (stored blocks would).
        let mut data = data;
        while !data.is_empty() {
            let take = (STAGE - self.staged.len()).min(data.len());
            self.staged.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.staged.len() == STAGE {
                self.compress_staged()?;
            }
        }
        Ok(())
    }

    /// Compresses and writes out what is staged.
    fn compress_staged(&mut self) -> io::Result<()> {
        let mut input = &self.staged[..];
        while !input.is_empty() {
            self.out.clear();
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(input, &mut self.out, FlushCompress::None)
                .map_err(io::Error::other)?;
            let used = usize::try_from(self.deflate.total_in() - before).unwrap_or(input.len());
            input = input.get(used..).unwrap_or_default();
            self.sink.write_all(&self.out)?;
        }
        self.staged.clear();
        Ok(())
    }

    /// Ends the current member (if one is open): the rest of the deflate stream, then CRC-32
    /// and length.
    fn close(&mut self) -> io::Result<()> {
        self.check()?;
        if !self.open {
            return Ok(());
        }
        let r = self.close_inner();
        self.broken |= r.is_err();
        r
    }

    fn close_inner(&mut self) -> io::Result<()> {
        self.compress_staged()?;
        loop {
            self.out.clear();
            let status = self
                .deflate
                .compress_vec(&[], &mut self.out, FlushCompress::Finish)
                .map_err(io::Error::other)?;
            self.sink.write_all(&self.out)?;
            if status == Status::StreamEnd {
                break;
            }
        }
        self.sink.write_all(&self.crc.sum().to_le_bytes())?;
        self.sink.write_all(&self.crc.amount().to_le_bytes())?;
        self.open = false;
        Ok(())
    }
}

/// One TOC entry as written (Go's `omitempty` fields are skipped when zero).
#[derive(Serialize, Default)]
struct TocEntryOut {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "is_zero")]
    size: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    modtime: String,
    #[serde(rename = "linkName", skip_serializing_if = "String::is_empty")]
    link_name: String,
    #[serde(skip_serializing_if = "is_zero")]
    mode: u64,
    #[serde(skip_serializing_if = "is_zero")]
    uid: u64,
    #[serde(skip_serializing_if = "is_zero")]
    gid: u64,
    #[serde(rename = "userName", skip_serializing_if = "String::is_empty")]
    user_name: String,
    #[serde(rename = "groupName", skip_serializing_if = "String::is_empty")]
    group_name: String,
    #[serde(skip_serializing_if = "is_zero")]
    offset: u64,
    #[serde(rename = "devMajor", skip_serializing_if = "is_zero")]
    dev_major: u64,
    #[serde(rename = "devMinor", skip_serializing_if = "is_zero")]
    dev_minor: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    xattrs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    digest: String,
    #[serde(rename = "chunkOffset", skip_serializing_if = "is_zero")]
    chunk_offset: u64,
    #[serde(rename = "chunkSize", skip_serializing_if = "is_zero")]
    chunk_size: u64,
    #[serde(rename = "chunkDigest", skip_serializing_if = "String::is_empty")]
    chunk_digest: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Serialize)]
struct TocOut<'a> {
    version: u32,
    entries: &'a [TocEntryOut],
}

/// An input entry ready to be written: its (normalised) header blocks and TOC entry.
struct Prepared {
    /// PAX header (if any) and the main header, 512-byte blocks.
    blocks: Vec<u8>,
    toc: TocEntryOut,
    /// Bytes of data that follow the header.
    data_size: u64,
    /// Regular file: data is chunked into members.
    regular: bool,
    /// Normalised path (for prefetch planning).
    path: String,
    /// Normalised hard-link target.
    hardlink_target: Option<String>,
}

struct Writer<W: Write> {
    members: Members<W>,
    chunk_size: u64,
    diff: Verifier,
    tar_len: u64,
    toc: Vec<TocEntryOut>,
    buf: Vec<u8>,
}

fn padding(size: u64) -> usize {
    ((BLOCK - size % BLOCK) % BLOCK) as usize
}

impl<W: Write> Writer<W> {
    fn new(out: W, opts: &WriterOptions) -> Self {
        Writer {
            members: Members::new(
                BlobSink {
                    out: BufWriter::with_capacity(256 * 1024, out),
                    len: 0,
                    hash: Verifier::new(Algorithm::Sha256),
                },
                opts.level,
            ),
            chunk_size: opts.chunk_size,
            diff: Verifier::new(Algorithm::Sha256),
            tar_len: 0,
            toc: Vec::new(),
            buf: vec![0; COPY_BUF],
        }
    }

    /// Appends uncompressed tar bytes to the current member, opening one if needed.
    fn tar_write(&mut self, data: &[u8]) -> Result<(), EstargzError> {
        if data.is_empty() {
            return Ok(());
        }
        self.members
            .write(data)
            .map_err(io_err("writing the eStargz blob"))?;
        self.diff.update(data);
        self.tar_len += data.len() as u64;
        Ok(())
    }

    /// Ends the current gzip member, so the next byte starts a new one.
    fn close_member(&mut self) -> Result<(), EstargzError> {
        self.members
            .close()
            .map_err(io_err("finishing a gzip member"))
    }

    /// Blob offset where the next member will start (call after [`Self::close_member`]).
    fn blob_offset(&self) -> u64 {
        self.members.sink.len
    }

    /// Copies exactly `n` data bytes of `entry` into the current member, hashing them into
    /// `hashers`.
    fn copy_data(
        &mut self,
        entry: &mut impl Read,
        n: u64,
        path: &str,
        hashers: &mut [&mut Verifier],
    ) -> Result<(), EstargzError> {
        let mut buf = std::mem::take(&mut self.buf);
        let result = (|| {
            let mut left = n;
            while left > 0 {
                let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let dst = buf.get_mut(..want).unwrap_or_default();
                let got = match entry.read(dst) {
                    Ok(0) => {
                        return Err(EstargzError::BadInput {
                            path: path.to_string(),
                            detail: format!(
                                "data ends after {} of {n} bytes",
                                n.saturating_sub(left)
                            ),
                        })
                    }
                    Ok(g) => g,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(input_err(path)(e)),
                };
                let data = dst.get(..got).unwrap_or_default();
                for h in hashers.iter_mut() {
                    h.update(data);
                }
                self.tar_write(data)?;
                left -= got as u64;
            }
            Ok(())
        })();
        self.buf = buf;
        result
    }

    /// Writes the 1-byte landmark file the format uses to mark the prefetch boundary.
    fn write_landmark(&mut self, name: &str) -> Result<(), EstargzError> {
        let mut h = tar::Header::new_ustar();
        h.set_path(name)
            .map_err(io_err("building a landmark header"))?;
        h.set_entry_type(EntryType::Regular);
        h.set_size(1);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        self.tar_write(h.as_bytes())?;
        self.close_member()?;
        let offset = self.blob_offset();
        self.tar_write(&[LANDMARK_CONTENTS])?;
        let digest = Digest::sha256_of(&[LANDMARK_CONTENTS]).to_string();
        self.toc.push(TocEntryOut {
            name: name.to_string(),
            kind: "reg",
            size: 1,
            mode: 0o644,
            offset,
            digest: digest.clone(),
            chunk_digest: digest,
            ..TocEntryOut::default()
        });
        self.tar_write(&[0u8; 511])
    }

    /// Writes one input entry: headers at the end of the current member, each chunk of a
    /// regular file in a member of its own.
    fn write_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), EstargzError> {
        let Some(p) = prepare(entry)? else {
            return Ok(());
        };
        self.tar_write(&p.blocks)?;
        let mut toc = p.toc;
        let name = toc.name.clone();
        if p.regular {
            let size = p.data_size;
            let mut file_hash = Verifier::new(Algorithm::Sha256);
            if size == 0 {
                toc.digest = file_hash.finish().to_string();
                self.toc.push(toc);
            } else {
                let reg_pos = self.toc.len();
                let mut written = 0u64;
                let mut first = Some(toc);
                while written < size {
                    let this = self.chunk_size.min(size - written);
                    let last = written + this == size;
                    self.close_member()?;
                    let offset = self.blob_offset();
                    let mut chunk_hash = Verifier::new(Algorithm::Sha256);
                    self.copy_data(entry, this, &p.path, &mut [&mut chunk_hash, &mut file_hash])?;
                    let mut t = first.take().unwrap_or_else(|| TocEntryOut {
                        name: name.clone(),
                        kind: "chunk",
                        ..TocEntryOut::default()
                    });
                    t.offset = offset;
                    t.chunk_offset = written;
                    t.chunk_size = if last { 0 } else { this };
                    t.chunk_digest = chunk_hash.finish().to_string();
                    self.toc.push(t);
                    written += this;
                }
                if let Some(reg) = self.toc.get_mut(reg_pos) {
                    reg.digest = file_hash.finish().to_string();
                }
            }
        } else {
            self.toc.push(toc);
            if p.data_size > 0 {
                self.copy_data(entry, p.data_size, &p.path, &mut [])?;
            }
        }
        self.tar_write(&[0u8; BLOCK as usize][..padding(p.data_size)])
    }

    /// Passes an entry the TOC does not describe (a PAX global header) through unchanged.
    fn write_raw<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), EstargzError> {
        let mut h = entry.header().clone();
        h.set_cksum();
        self.tar_write(h.as_bytes())?;
        let size = entry.size();
        self.copy_data(entry, size, "PAX global header", &mut [])?;
        self.tar_write(&[0u8; BLOCK as usize][..padding(size)])
    }

    /// Writes the TOC member and the footer, and reports the digests.
    fn finish(mut self) -> Result<WrittenLayer, EstargzError> {
        self.close_member()?;
        let toc_offset = self.blob_offset();
        let json = serde_json::to_vec(&TocOut {
            version: 1,
            entries: &self.toc,
        })
        .map_err(|e| EstargzError::Io {
            context: "serialising the TOC",
            source: io::Error::other(e),
        })?;
        let toc_digest = Digest::sha256_of(&json);
        let mut h = tar::Header::new_ustar();
        h.set_path(TOC_TAR_NAME)
            .map_err(io_err("building the TOC header"))?;
        h.set_entry_type(EntryType::Regular);
        h.set_size(json.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        self.tar_write(h.as_bytes())?;
        self.tar_write(&json)?;
        self.tar_write(&[0u8; BLOCK as usize][..padding(json.len() as u64)])?;
        // End-of-archive marker: two zero blocks.
        self.tar_write(&[0u8; 2 * BLOCK as usize])?;
        self.close_member()?;
        self.members
            .check()
            .map_err(io_err("writing the eStargz footer"))?;
        let mut sink = self.members.sink;
        sink.write_all(&footer_bytes(toc_offset))
            .map_err(io_err("writing the eStargz footer"))?;
        sink.flush().map_err(io_err("flushing the eStargz blob"))?;
        Ok(WrittenLayer {
            toc_digest,
            diff_id: self.diff.finish(),
            blob_digest: sink.hash.finish(),
            blob_size: sink.len,
            uncompressed_size: self.tar_len,
        })
    }
}

/// The 51-byte eStargz footer pointing at the TOC member at `toc_offset`.
pub(crate) fn footer_bytes(toc_offset: u64) -> Vec<u8> {
    let mut f = Vec::with_capacity(super::FOOTER_SIZE);
    // gzip header: magic, deflate, FEXTRA, mtime 0, XFL 0, OS unknown (as Go writes it).
    f.extend_from_slice(&[0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff]);
    f.extend_from_slice(&26u16.to_le_bytes());
    f.extend_from_slice(b"SG");
    f.extend_from_slice(&22u16.to_le_bytes());
    f.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    // Final stored block of length 0, then CRC32 and ISIZE of nothing.
    f.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    f
}

/// Encodes PAX records as an `x` entry (header + padded data).
fn pax_blocks(records: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<u8>, EstargzError> {
    let mut data = Vec::new();
    for (k, v) in records {
        // "<len> <key>=<value>\n", where <len> counts itself.
        let base = k.len() + v.len() + 3;
        let mut len = base + base.to_string().len();
        if base + len.to_string().len() != len {
            len = base + len.to_string().len();
        }
        data.extend_from_slice(len.to_string().as_bytes());
        data.push(b' ');
        data.extend_from_slice(k);
        data.push(b'=');
        data.extend_from_slice(v);
        data.push(b'\n');
    }
    let mut h = tar::Header::new_ustar();
    h.set_path("././@PaxHeader")
        .map_err(io_err("building a PAX header"))?;
    h.set_entry_type(EntryType::XHeader);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    let pad = padding(data.len() as u64);
    out.extend_from_slice(&data);
    out.resize(out.len() + pad, 0);
    Ok(out)
}

fn utf8(path: &str, what: &str, bytes: &[u8]) -> Result<String, EstargzError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| EstargzError::BadInput {
        path: path.to_string(),
        detail: format!("{what} is not valid UTF-8, which the JSON TOC cannot carry"),
    })
}

/// Reads an entry's metadata into normalised header blocks and a TOC entry. `None` for
/// entries the writer replaces (an old TOC or landmark) or that are no file (PAX globals are
/// handled by the caller).
fn prepare<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Option<Prepared>, EstargzError> {
    let raw_path = entry.path_bytes().into_owned();
    let lossy = String::from_utf8_lossy(&raw_path).into_owned();
    let path = utf8(&lossy, "the path", &raw_path)?;
    let bad = |detail: String| EstargzError::BadInput {
        path: crate::toc::shorten(&lossy),
        detail,
    };
    let parts = split_path(&path).map_err(|e| bad(path_problem(&e)))?;
    let norm = parts.join("/");
    if norm == TOC_TAR_NAME || norm == PREFETCH_LANDMARK || norm == NO_PREFETCH_LANDMARK {
        // Converting an eStargz layer again: its TOC and landmark are replaced by new ones.
        return Ok(None);
    }
    let etype = entry.header().entry_type();
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
                "tar entry type {other:?} cannot be stored in eStargz"
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
    let link = entry.link_name_bytes().map(|l| l.into_owned());
    let data_size = entry.size();
    let mut header = entry.header().clone();
    if matches!(etype, EntryType::GNUSparse | EntryType::Continuous) {
        // The tar reader expands sparse files; store them as plain files of their real size.
        header.set_entry_type(EntryType::Regular);
        header.set_size(data_size);
        if let Some(gnu) = header.as_gnu_mut() {
            for s in gnu.sparse.iter_mut() {
                s.offset = [0; 12];
                s.numbytes = [0; 12];
            }
            gnu.isextended = [0];
            gnu.realsize = [0; 12];
        }
        for (k, v) in records.iter_mut() {
            if k.as_slice() == b"size" {
                *v = data_size.to_string().into_bytes();
            }
        }
    }
    let has = |records: &[(Vec<u8>, Vec<u8>)], key: &[u8]| records.iter().any(|(k, _)| k == key);
    // Long names (GNU 'L'/'K' or PAX) are carried as PAX records, which every reader knows.
    if *header.path_bytes() != *raw_path && !has(&records, b"path") {
        records.push((b"path".to_vec(), raw_path.clone()));
    }
    if let Some(l) = &link {
        if header.link_name_bytes().as_deref() != Some(l.as_slice()) && !has(&records, b"linkpath")
        {
            records.push((b"linkpath".to_vec(), l.clone()));
        }
    }
    header.set_cksum();

    let pax = |key: &str| {
        records
            .iter()
            .find(|(k, _)| k.as_slice() == key.as_bytes())
            .map(|(_, v)| v.as_slice())
    };
    let mut toc = TocEntryOut {
        name: path.clone(),
        kind,
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
    if mtime != 0 {
        toc.modtime = format_rfc3339(mtime).unwrap_or_default();
    }
    let uname = pax("uname").or(header.username_bytes());
    toc.user_name = uname
        .and_then(|u| std::str::from_utf8(u).ok())
        .unwrap_or_default()
        .to_string();
    let gname = pax("gname").or(header.groupname_bytes());
    toc.group_name = gname
        .and_then(|g| std::str::from_utf8(g).ok())
        .unwrap_or_default()
        .to_string();
    for (k, v) in &records {
        if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
            let name = utf8(&lossy, "an xattr name", name)?;
            let value = base64::engine::general_purpose::STANDARD.encode(v);
            toc.xattrs.insert(name, value);
        }
    }
    let mut hardlink_target = None;
    match kind {
        "reg" => toc.size = data_size,
        "symlink" | "hardlink" => {
            let l = link.ok_or_else(|| bad("link without a target".into()))?;
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
    let mut blocks = Vec::new();
    if !records.is_empty() {
        blocks = pax_blocks(&records)?;
    }
    blocks.extend_from_slice(header.as_bytes());
    Ok(Some(Prepared {
        blocks,
        toc,
        data_size,
        regular,
        path: norm,
        hardlink_target,
    }))
}

/// A spool file for reordering, with the error that says so.
fn spool_file() -> Result<File, EstargzError> {
    crate::toc::spool::spool_file("estargz").map_err(io_err("creating a spool file for reordering"))
}

/// Where an entry sits in the spool, and what prefetch planning needs to know about it.
struct Spooled {
    start: u64,
    path: String,
    hardlink_target: Option<String>,
}

impl PlannedEntry for Spooled {
    fn path(&self) -> &str {
        &self.path
    }
    fn hardlink_target(&self) -> Option<&str> {
        self.hardlink_target.as_deref()
    }
}

/// Prefetch layout: the input is spooled (normalised) to a temporary file, the prefetched
/// entries are written first (after their parent directories and hard-link targets), then the
/// landmark, then everything else in input order.
fn write_reordered<R: Read, W: Write>(
    w: &mut Writer<W>,
    tar_in: R,
    list: &[String],
) -> Result<(), EstargzError> {
    let file = spool_file()?;
    let mut index: Vec<Spooled> = Vec::new();
    {
        let mut out = BufWriter::new(&file);
        let mut pos = 0u64;
        let mut archive = tar::Archive::new(tar_in);
        let zeros = [0u8; BLOCK as usize];
        for entry in archive.entries().map_err(input_err(""))? {
            let mut entry = entry.map_err(input_err(""))?;
            let start = pos;
            let (blocks, size, path, hardlink_target) =
                if entry.header().entry_type() == EntryType::XGlobalHeader {
                    let mut h = entry.header().clone();
                    h.set_cksum();
                    (h.as_bytes().to_vec(), entry.size(), String::new(), None)
                } else {
                    match prepare(&mut entry)? {
                        Some(p) => (p.blocks, p.data_size, p.path, p.hardlink_target),
                        None => continue,
                    }
                };
            out.write_all(&blocks)
                .map_err(io_err("writing the spool file"))?;
            let copied =
                io::copy(&mut (&mut entry).take(size), &mut out).map_err(input_err(&path))?;
            if copied != size {
                return Err(EstargzError::BadInput {
                    path,
                    detail: format!("data ends after {copied} of {size} bytes"),
                });
            }
            let pad = padding(size);
            out.write_all(zeros.get(..pad).unwrap_or_default())
                .map_err(io_err("writing the spool file"))?;
            pos += blocks.len() as u64 + size + pad as u64;
            index.push(Spooled {
                start,
                path,
                hardlink_target,
            });
        }
        out.flush().map_err(io_err("writing the spool file"))?;
    }

    let front = plan_prefetch(&index, list);
    let mut moved = vec![false; index.len()];
    for &i in &front {
        if let Some(m) = moved.get_mut(i) {
            *m = true;
        }
    }
    let rest = (0..index.len()).filter(|&i| !moved.get(i).copied().unwrap_or(false));
    let landmark = if front.is_empty() {
        NO_PREFETCH_LANDMARK
    } else {
        PREFETCH_LANDMARK
    };
    if front.is_empty() {
        w.write_landmark(landmark)?;
    }
    for &i in &front {
        emit_spooled(w, &file, &index, i)?;
    }
    if !front.is_empty() {
        w.write_landmark(landmark)?;
    }
    for i in rest {
        emit_spooled(w, &file, &index, i)?;
    }
    Ok(())
}

fn emit_spooled<W: Write>(
    w: &mut Writer<W>,
    mut file: &File,
    index: &[Spooled],
    i: usize,
) -> Result<(), EstargzError> {
    let Some(s) = index.get(i) else { return Ok(()) };
    file.seek(SeekFrom::Start(s.start))
        .map_err(io_err("reading the spool file"))?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    let mut entries = archive.entries().map_err(input_err(&s.path))?;
    let mut entry = match entries.next() {
        Some(e) => e.map_err(input_err(&s.path))?,
        None => {
            return Err(EstargzError::Io {
                context: "reading the spool file",
                source: io::Error::other(format!("entry {:?} vanished", s.path)),
            })
        }
    };
    if entry.header().entry_type() == EntryType::XGlobalHeader {
        w.write_raw(&mut entry)
    } else {
        w.write_entry(&mut entry)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Read;

    use flate2::read::{GzDecoder, MultiGzDecoder};

    use super::super::{open_toc, Prefetch, ReaderConfig};
    use super::*;
    use crate::toc::sample::{self, header, pseudo_random};
    use crate::toc::{Layer, NodeId};

    /// The sample layer with eStargz's edge sizes: a file of ten 1 MiB chunks, one of exactly two.
    fn input_tar() -> (Vec<u8>, BTreeMap<String, Vec<u8>>) {
        sample::input_tar(vec![
            ("usr/bin/big", 0o4755, pseudo_random(10 << 20, 0)),
            ("usr/bin/exact", 0o755, pseudo_random(2 << 20, 0)),
        ])
    }

    /// Decompresses one chunk straight from the blob, as the filesystem will.
    fn read_chunk(blob: &[u8], c: &crate::toc::Chunk) -> Vec<u8> {
        let member = &blob[c.blob_offset as usize..(c.blob_offset + c.blob_len) as usize];
        let mut out = Vec::new();
        GzDecoder::new(member).read_to_end(&mut out).unwrap();
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

    /// `(path, type, content, xattrs)` of every entry of a tar.gz, in order.
    type Listed = Vec<(String, EntryType, Vec<u8>, Vec<(String, Vec<u8>)>)>;

    fn list_tar(raw: &[u8]) -> Listed {
        let mut out = Vec::new();
        let mut archive = tar::Archive::new(raw);
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let path = String::from_utf8(e.path_bytes().into_owned()).unwrap();
            let kind = e.header().entry_type();
            let mut xattrs = Vec::new();
            // (For a PAX global header this would consume its data.)
            if kind != EntryType::XGlobalHeader {
                if let Some(exts) = e.pax_extensions().unwrap() {
                    for x in exts {
                        let x = x.unwrap();
                        if let Some(k) = x.key().unwrap().strip_prefix("SCHILY.xattr.") {
                            xattrs.push((k.to_string(), x.value_bytes().to_vec()));
                        }
                    }
                }
            }
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.push((path, kind, data, xattrs));
        }
        out
    }

    fn list_targz(blob: &[u8]) -> (Listed, Vec<u8>) {
        let mut raw = Vec::new();
        MultiGzDecoder::new(blob).read_to_end(&mut raw).unwrap();
        (list_tar(&raw), raw)
    }

    #[test]
    fn round_trip() {
        let (tar_in, files) = input_tar();
        let opts = WriterOptions {
            chunk_size: 1 << 20,
            ..WriterOptions::default()
        };
        let mut blob = Vec::new();
        let written = write_estargz(&tar_in[..], &mut blob, &opts).unwrap();
        assert_eq!(written.blob_size, blob.len() as u64);
        assert_eq!(written.blob_digest, Digest::sha256_of(&blob));

        let opened = open_toc(
            &blob,
            0,
            blob.len() as u64,
            Some(&written.toc_digest),
            &ReaderConfig::default(),
        )
        .unwrap();
        assert_eq!(opened.toc_digest, written.toc_digest);
        assert_eq!(opened.prefetch, Prefetch::None);
        let l = &opened.layer;

        sample::assert_tree(l, &files, &|id| read_file(l, &blob, id));
        // Every chunk's member starts with the chunk itself.
        assert!(l.all_chunks().iter().all(|c| c.inner_offset == 0));
        let big = l.resolve("usr/bin/big").unwrap();
        assert_eq!(l.chunks(big).len(), 10);
        assert_eq!(l.chunks(l.resolve("usr/bin/exact").unwrap()).len(), 2);
        // The landmark is not part of the tree.
        assert_eq!(l.resolve(NO_PREFETCH_LANDMARK), None);

        // The blob is an ordinary tar.gz with the same entries.
        let (listed, raw) = list_targz(&blob);
        assert_eq!(written.diff_id, Digest::sha256_of(&raw));
        assert_eq!(written.uncompressed_size, raw.len() as u64);
        let input = list_tar(&tar_in);
        let names: Vec<&str> = listed.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names.first(), Some(&NO_PREFETCH_LANDMARK));
        assert_eq!(names.last(), Some(&TOC_TAR_NAME));
        assert_eq!(listed[1..listed.len() - 1], input[..]);
        let (_, _, toc_json, _) = listed.last().unwrap();
        assert_eq!(Digest::sha256_of(toc_json), written.toc_digest);

        // And the system's tar and gzip agree, when present.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer.tar.gz");
        std::fs::write(&path, &blob).unwrap();
        if let Ok(out) = std::process::Command::new("tar")
            .arg("-tzf")
            .arg(&path)
            .output()
        {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            for (path, ..) in &input {
                assert!(stdout.lines().any(|l| l == path), "tar -t misses {path}");
            }
        }
        if let Ok(out) = std::process::Command::new("gzip")
            .arg("-dc")
            .arg(&path)
            .output()
        {
            assert!(out.status.success());
            assert_eq!(out.stdout, raw);
        }
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
        let mut blob = Vec::new();
        let written = write_estargz(&tar_in[..], &mut blob, &opts).unwrap();
        let (listed, _) = list_targz(&blob);
        let names: Vec<&str> = listed.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "c/",
                "c/z",
                "d",
                "e",
                PREFETCH_LANDMARK,
                "a/x",
                "b/y",
                TOC_TAR_NAME
            ]
        );
        let opened = open_toc(
            &blob,
            0,
            blob.len() as u64,
            Some(&written.toc_digest),
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
                listed.iter().find(|e| e.0 == path).unwrap().2
            );
        }
        assert_eq!(l.resolve("e"), l.resolve("d"));

        // Nothing from the list present: no-prefetch landmark first.
        let opts = WriterOptions {
            prefetch: Some(vec!["nothing/here".into()]),
            ..WriterOptions::default()
        };
        let mut blob = Vec::new();
        write_estargz(&tar_in[..], &mut blob, &opts).unwrap();
        let (listed, _) = list_targz(&blob);
        assert_eq!(listed[0].0, NO_PREFETCH_LANDMARK);
        assert_eq!(listed[1].0, "a/x");
        let opened = open_toc(&blob, 0, blob.len() as u64, None, &ReaderConfig::default()).unwrap();
        assert_eq!(opened.prefetch, Prefetch::None);
    }

    #[test]
    fn converting_twice_replaces_toc_and_landmark() {
        let (tar_in, _) = input_tar();
        let mut once = Vec::new();
        write_estargz(&tar_in[..], &mut once, &WriterOptions::default()).unwrap();
        let mut raw = Vec::new();
        MultiGzDecoder::new(&once[..])
            .read_to_end(&mut raw)
            .unwrap();
        let mut twice = Vec::new();
        let w = write_estargz(&raw[..], &mut twice, &WriterOptions::default()).unwrap();
        let (listed, _) = list_targz(&twice);
        assert_eq!(listed.iter().filter(|e| e.0 == TOC_TAR_NAME).count(), 1);
        assert_eq!(
            listed
                .iter()
                .filter(|e| e.0 == NO_PREFETCH_LANDMARK)
                .count(),
            1
        );
        open_toc(
            &twice,
            0,
            twice.len() as u64,
            Some(&w.toc_digest),
            &ReaderConfig::default(),
        )
        .unwrap();
    }

    #[test]
    fn rejects_bad_input_and_options() {
        let mut blob = Vec::new();
        let zero = WriterOptions {
            chunk_size: 0,
            ..WriterOptions::default()
        };
        assert!(matches!(
            write_estargz(&[][..], &mut blob, &zero),
            Err(EstargzError::BadOptions(_))
        ));
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..9].copy_from_slice(b"../escape");
        h.set_size(0);
        h.set_mode(0o644);
        h.set_cksum();
        let mut t = h.as_bytes().to_vec();
        t.extend_from_slice(&[0; 1024]);
        assert!(matches!(
            write_estargz(&t[..], &mut blob, &WriterOptions::default()),
            Err(EstargzError::BadInput { .. })
        ));
        // Truncated input data.
        let mut h = header(EntryType::Regular, 0o644, 5000);
        h.set_path("f").unwrap();
        h.set_cksum();
        let mut t = h.as_bytes().to_vec();
        t.extend_from_slice(&[1; 100]);
        assert!(write_estargz(&t[..], &mut blob, &WriterOptions::default()).is_err());
    }

    #[test]
    fn pax_global_headers_pass_through() {
        let records = b"18 comment=hello!\n";
        let mut g = tar::Header::new_ustar();
        g.set_path("pax_global_header").unwrap();
        g.set_entry_type(EntryType::XGlobalHeader);
        g.set_size(records.len() as u64);
        g.set_cksum();
        let mut t = g.as_bytes().to_vec();
        t.extend_from_slice(records);
        t.resize(1024, 0);
        let mut h = header(EntryType::Regular, 0o644, 2);
        h.set_path("f").unwrap();
        h.set_cksum();
        t.extend_from_slice(h.as_bytes());
        t.extend_from_slice(b"hi");
        t.resize(t.len() + 510 + 1024, 0);
        for prefetch in [None, Some(vec!["f".to_string()])] {
            let opts = WriterOptions {
                prefetch,
                ..WriterOptions::default()
            };
            let mut blob = Vec::new();
            write_estargz(&t[..], &mut blob, &opts).unwrap();
            let (listed, _) = list_targz(&blob);
            let g = listed
                .iter()
                .find(|e| e.1 == EntryType::XGlobalHeader)
                .unwrap();
            assert_eq!(g.2, records);
            let opened =
                open_toc(&blob, 0, blob.len() as u64, None, &ReaderConfig::default()).unwrap();
            let f = opened.layer.resolve("f").unwrap();
            assert_eq!(read_file(&opened.layer, &blob, f), b"hi");
        }
    }
}
