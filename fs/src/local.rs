//! Serving layers that cannot be read lazily: a verified whole-layer fetch, converted once into
//! a local eStargz file, then served through the same chunk path as lazy layers.
//!
//! A plain `tar+gzip`, `tar+zstd` or uncompressed layer has no table of contents, so there is
//! nothing to mount before the whole blob has been read. Rather than refusing such images, the
//! layer is downloaded whole (the registry client hashes the stream and keeps nothing that does
//! not match the manifest's digest), decompressed, and rewritten by the eStargz writer into
//! `<local_dir>/<hex>.estargz` (stored deflate blocks: it never crosses the network again). That file
//! is then read through [`BlobReader::local`], so the layer model, chunk verification, cache and
//! FUSE code are exactly the lazy ones.
//!
//! Files in `local_dir`, all named by the layer digest's hex:
//! - `<hex>.estargz`: the converted layer; written to a temporary name, fsynced and renamed, so
//!   it is either complete or absent. Reused as is after a daemon restart (no network).
//! - `<hex>.download`: the verified compressed blob, only between download and conversion. A
//!   leftover one (crash during conversion) is re-hashed and reused if it still matches.
//! - `<hex>.partial-<pid>`, `<hex>.estargz.tmp-<pid>-<n>`: work in progress; leftovers of dead
//!   processes are removed.
//!
//! One conversion runs per layer at a time in this process: concurrent openers of a digest
//! wait for the first and then reuse its file. The work runs in its own task, so an opener
//! that gives up does not leave half-done files behind for the next one to trip over. Two
//! processes sharing a `local_dir` are safe too (temporary names carry the PID and the final
//! rename is atomic); they just may both do the work.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use lazypull_fetcher::digest::Verifier;
use lazypull_fetcher::{BlobReader, ChunkCache, Digest, FetchEngine, Priority, Reference};

use crate::chunks::{Compression, LayerSource, SourceConfig};
use crate::estargz::{self, EstargzError, ReaderConfig, WriterOptions};
use crate::open::{LayerDescriptor, OpenError, OpenedLayer, Served};

/// Extension of the converted, ready-to-serve layer file.
const ESTARGZ_EXT: &str = "estargz";
/// Extension of the verified compressed blob kept between download and conversion.
const DOWNLOAD_EXT: &str = "download";
/// gzip level of the local copy: 0, stored blocks. The copy is read from a local disk and never
/// sent over a network, so speed matters far more than its size: on a 300 MB tar of shared
/// libraries (zlib-rs backend), level 0 writes at 690 MB/s and reads at 815 MB/s, where level 1
/// writes at 150 MB/s and reads at 255 MB/s and is 2.2x smaller. The copy then takes the tar's
/// size on disk, as an unpacked snapshot does.
const LOCAL_GZIP_LEVEL: u32 = 0;
/// How often (in compressed input bytes) conversion progress is reported.
const PROGRESS_EVERY: u64 = 4 << 20;

/// How a layer blob is compressed, as told by its media type (and checked against the blob's
/// magic bytes before decompressing, because registries in the wild mislabel layers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    /// gzip (`tar+gzip`, Docker `tar.gzip`); possibly eStargz.
    Gzip,
    /// zstd (`tar+zstd`); possibly zstd:chunked.
    Zstd,
    /// An uncompressed tar.
    None,
}

impl LayerCompression {
    /// The compression of an OCI or Docker layer media type, or why the media type is not a
    /// layer lazypull can serve (encrypted, foreign artifact, missing). Parameters after `;`
    /// and letter case are ignored.
    pub fn from_media_type(media_type: &str) -> Result<LayerCompression, String> {
        let mt = media_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if mt.contains("+encrypted") {
            return Err("encrypted layers (ocicrypt) cannot be decrypted by lazypull".into());
        }
        match mt.as_str() {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar" => Ok(LayerCompression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Ok(LayerCompression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Ok(LayerCompression::Zstd),
            "" => Err("the manifest gives the layer no media type".into()),
            _ => Err(
                "not a layer media type lazypull knows; expected an OCI or Docker tar, tar+gzip \
                 or tar+zstd layer"
                    .into(),
            ),
        }
    }

    /// The compression the blob's first bytes show: gzip and zstd (also a skippable frame)
    /// magic, else an uncompressed tar. Content wins over the media type when they disagree,
    /// because registries in the wild mislabel layers.
    pub fn sniff(head: &[u8]) -> LayerCompression {
        if head.starts_with(&[0x1f, 0x8b]) {
            LayerCompression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
            || (head.len() >= 4 && head[0] & 0xf0 == 0x50 && head[1..4] == [0x2a, 0x4d, 0x18])
        {
            LayerCompression::Zstd
        } else {
            LayerCompression::None
        }
    }

    /// The tar inside `input`, decompressed as `self` says. Every conversion (the whole-layer
    /// fallback, `lazypull convert` and `push`) reads layers through this one decoder set, so
    /// a layer the daemon serves is one `convert` accepts: concatenated gzip members (pigz)
    /// and zstd written with long-distance matching (`zstd --long`, windows up to 2 GiB).
    pub fn decoder<'a, R: io::BufRead + 'a>(self, input: R) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            LayerCompression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
            LayerCompression::Zstd => {
                let mut d = zstd::stream::read::Decoder::with_buffer(input)?;
                d.window_log_max(31)?;
                Box::new(d)
            }
            LayerCompression::None => Box::new(input),
        })
    }
}

/// Which part of a whole-layer fetch a [`Progress`] report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Downloading the compressed blob from the registry.
    Download,
    /// Converting the downloaded blob into the local eStargz copy.
    Convert,
}

/// Progress of a whole-layer fetch, so a terminal can show a bar and a daemon can report on
/// the slow path it had to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The layer.
    pub layer: Digest,
    /// What is being done.
    pub phase: Phase,
    /// Compressed bytes downloaded, or compressed bytes consumed by the conversion.
    pub done: u64,
    /// The compressed blob size.
    pub total: u64,
}

/// A progress callback; called from async tasks and from blocking threads.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// Where the local eStargz copy of `layer` lives (or would live) in `local_dir`, for callers
/// that account for or delete it.
pub fn local_copy_path(local_dir: &Path, layer: &Digest) -> PathBuf {
    local_dir.join(format!("{}.{ESTARGZ_EXT}", layer.hex()))
}

/// Deletes every file of `layer` in `local_dir` (the local copy, a pending download and work
/// in progress), for `rmi`/`prune`. Returns whether the local copy existed. Must not run while
/// the layer is being opened; an already opened layer keeps reading its (unlinked) file.
pub fn remove_local_copy(local_dir: &Path, layer: &Digest) -> io::Result<bool> {
    let path = local_copy_path(local_dir, layer);
    let existed = match std::fs::remove_file(&path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    remove_if_exists(&download_path(local_dir, layer))?;
    remove_stale_work(local_dir, layer, true);
    Ok(existed)
}

/// Where the verified compressed blob waits between download and conversion; one that exists
/// means an earlier run chose the whole fetch for this layer.
pub(crate) fn download_path(local_dir: &Path, layer: &Digest) -> PathBuf {
    local_dir.join(format!("{}.{DOWNLOAD_EXT}", layer.hex()))
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes `<hex>.partial-<pid>` and `<hex>.estargz.tmp-<pid>-<n>` files left by processes
/// that are gone (or by this one: all of its work on a layer runs under the layer's lock, which
/// the caller holds). With `all`, removes them whoever wrote them.
fn remove_stale_work(local_dir: &Path, layer: &Digest, all: bool) {
    let Ok(entries) = std::fs::read_dir(local_dir) else {
        return;
    };
    let hex = layer.hex();
    let partial = format!("{hex}.partial-");
    let tmp = format!("{hex}.{ESTARGZ_EXT}.tmp-");
    let me = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name
            .strip_prefix(&partial)
            .or_else(|| name.strip_prefix(&tmp))
        else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        let stale = all
            || match pid {
                Some(pid) if pid != me => !Path::new(&format!("/proc/{pid}")).exists(),
                _ => true,
            };
        if stale {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::debug!(file = %entry.path().display(), "removed stale layer work file")
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove stale layer work file")
                }
            }
        }
    }
}

/// The per-layer lock that makes a conversion single-flight within the process.
fn layer_lock(path: &Path) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: OnceLock<parking_lot::Mutex<HashMap<PathBuf, Weak<tokio::sync::Mutex<()>>>>> =
        OnceLock::new();
    let mut locks = LOCKS.get_or_init(Default::default).lock();
    if let Some(lock) = locks.get(path).and_then(Weak::upgrade) {
        return lock;
    }
    locks.retain(|_, w| w.strong_count() > 0);
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    locks.insert(path.to_path_buf(), Arc::downgrade(&lock));
    lock
}

/// Everything the whole-layer path needs, owned, so it can run in its own task.
pub(crate) struct LocalRequest {
    pub engine: FetchEngine,
    pub cache: ChunkCache,
    pub reference: Reference,
    pub desc: LayerDescriptor,
    pub reader: ReaderConfig,
    pub source: SourceConfig,
    pub local_dir: PathBuf,
    pub reason: String,
    pub progress: Option<ProgressFn>,
}

/// Serves `desc` from a valid local copy if one exists, without any network access; `None`
/// when there is none (or it is unusable, in which case it is removed, to be rebuilt).
pub(crate) async fn reuse_local(
    cache: &ChunkCache,
    desc: &LayerDescriptor,
    reader: &ReaderConfig,
    source: &SourceConfig,
    local_dir: &Path,
    reason: &str,
) -> Option<OpenedLayer> {
    let path = local_copy_path(local_dir, &desc.digest);
    if !path.exists() {
        return None;
    }
    let lock = layer_lock(&path);
    let _guard = lock.lock().await;
    try_reuse(cache, desc, reader, source, &path, reason).await
}

async fn try_reuse(
    cache: &ChunkCache,
    desc: &LayerDescriptor,
    reader: &ReaderConfig,
    source: &SourceConfig,
    path: &Path,
    reason: &str,
) -> Option<OpenedLayer> {
    if !path.exists() {
        return None;
    }
    match open_local_file(cache, desc, reader, source.clone(), path, reason).await {
        Ok(opened) => {
            tracing::info!(layer = %desc.digest, path = %path.display(), reason,
                "serving layer from its local eStargz copy (no registry access)");
            Some(opened)
        }
        Err(e) => {
            tracing::warn!(layer = %desc.digest, path = %path.display(), error = %e,
                "local copy of the layer is unusable; removing it to fetch and convert again");
            if let Err(e) = remove_if_exists(path) {
                tracing::warn!(layer = %desc.digest, path = %path.display(), error = %e,
                    "cannot remove the unusable local copy");
            }
            None
        }
    }
}

/// The whole-layer path: reuse a local copy if a concurrent opener just made one, else
/// download (verified), convert, and open the result. Runs in its own task holding the
/// layer's lock, so it completes (and cleans up) even if the caller stops waiting.
pub(crate) async fn fetch_local(req: LocalRequest) -> Result<OpenedLayer, OpenError> {
    let layer = req.desc.digest;
    let path = local_copy_path(&req.local_dir, &layer);
    let task_path = path.clone();
    let lock = layer_lock(&path).lock_owned().await;
    let task = tokio::spawn(async move {
        let _guard = lock;
        if let Some(opened) = try_reuse(
            &req.cache,
            &req.desc,
            &req.reader,
            &req.source,
            &path,
            &req.reason,
        )
        .await
        {
            return Ok(opened);
        }
        fetch_and_convert(&req, &path).await?;
        let opened = open_local_file(
            &req.cache,
            &req.desc,
            &req.reader,
            req.source.clone(),
            &path,
            &req.reason,
        )
        .await;
        if opened.is_err() {
            // Never leave a copy behind that the next open would only have to throw away.
            let _ = remove_if_exists(&path);
        }
        opened
    });
    task.await.map_err(|e| OpenError::Local {
        layer,
        path: task_path,
        detail: format!("the whole-layer fetch task failed: {e}"),
    })?
}

async fn fetch_and_convert(req: &LocalRequest, dest: &Path) -> Result<(), OpenError> {
    let desc = &req.desc;
    let layer = desc.digest;
    let local_err = |path: &Path, detail: String| OpenError::Local {
        layer,
        path: path.to_path_buf(),
        detail,
    };
    tokio::fs::create_dir_all(&req.local_dir)
        .await
        .map_err(|e| local_err(&req.local_dir, format!("creating the directory: {e}")))?;
    remove_stale_work(&req.local_dir, &layer, false);
    let download = download_path(&req.local_dir, &layer);
    let started = Instant::now();

    let reused = if download.exists() {
        let (d, p) = (download.clone(), layer);
        match tokio::task::spawn_blocking(move || hash_file(&d, p)).await {
            Ok(Ok(actual)) if actual == layer => true,
            other => {
                tracing::warn!(layer = %layer, file = %download.display(), result = ?other.map(|r| r.map(|d| d.to_string())),
                    "leftover download does not match the layer digest; downloading again");
                remove_if_exists(&download).map_err(|e| {
                    local_err(&download, format!("removing a bad leftover download: {e}"))
                })?;
                false
            }
        }
    } else {
        false
    };
    let hint = LayerCompression::from_media_type(&desc.media_type).ok();
    let mut streamed = None;
    if reused {
        tracing::info!(layer = %layer, size = desc.size, reason = %req.reason,
            "layer has no usable TOC; converting the verified download left by an earlier run");
    } else {
        tracing::info!(layer = %layer, size = desc.size, media_type = %desc.media_type,
            reason = %req.reason,
            "layer cannot be served lazily; fetching it whole (verified) into the local store");
        let progress = req.progress.clone();
        let total = desc.size;
        let report = move |done: u64| {
            if let Some(p) = &progress {
                p(&Progress {
                    layer,
                    phase: Phase::Download,
                    done,
                    total,
                });
            }
        };
        // The conversion follows the download as it is written, so the two overlap instead of
        // adding up; its input is hashed and must match the layer digest before its result is
        // used.
        let state = Arc::new(DownloadState::default());
        let tail = TailReader::new(&download, Arc::clone(&state), layer);
        let (dst, dir, progress) = (
            dest.to_path_buf(),
            req.local_dir.clone(),
            req.progress.clone(),
        );
        let converting = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let check = tail.checker();
            let r = convert_input(
                Box::new(tail),
                total,
                &dst,
                &dir,
                layer,
                hint,
                progress.as_ref(),
                Some(check),
            );
            (r, started.elapsed())
        });
        let downloaded = req
            .engine
            .registry()
            .download_blob(
                &req.reference,
                &layer,
                Some(req.desc.size),
                &download,
                &report,
            )
            .await;
        state.finish(downloaded.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        let converted = converting.await;
        downloaded.map_err(|source| OpenError::Fetch { layer, source })?;
        match converted {
            Ok((Ok(done), took)) => streamed = Some((done, took)),
            Ok((Err(e), _)) => tracing::warn!(layer = %layer, error = %e,
                "converting during the download failed; converting the verified download"),
            Err(e) => tracing::warn!(layer = %layer, error = %e,
                "conversion task failed; converting the verified download"),
        }
    }
    let downloaded = started.elapsed();

    let (converted, convert_time) = match streamed {
        Some((done, took)) => (Ok(done), took),
        None => {
            let (src, dst, dir) = (download.clone(), dest.to_path_buf(), req.local_dir.clone());
            let progress = req.progress.clone();
            let convert_started = Instant::now();
            let converted = tokio::task::spawn_blocking(move || {
                convert(&src, &dst, &dir, layer, hint, progress.as_ref())
            })
            .await
            .map_err(|e| local_err(dest, format!("conversion task failed: {e}")))?;
            (converted, convert_started.elapsed())
        }
    };
    if let Err(e) = remove_if_exists(&download) {
        tracing::warn!(layer = %layer, file = %download.display(), error = %e,
            "cannot remove the downloaded blob after conversion");
    }
    let (input_bytes, written) = converted.map_err(|e| *e)?;
    let secs = convert_time.as_secs_f64().max(1e-6);
    tracing::info!(
        layer = %layer,
        blob_bytes = input_bytes,
        tar_bytes = written.uncompressed_size,
        local_bytes = written.blob_size,
        download_ms = downloaded.as_millis() as u64,
        convert_ms = convert_time.as_millis() as u64,
        overlapped = !reused,
        convert_mb_per_s = format!("{:.1}", written.uncompressed_size as f64 / secs / 1e6),
        path = %dest.display(),
        "layer fetched whole and converted to a local eStargz copy"
    );
    Ok(())
}

/// SHA-256 (or the digest's algorithm) of a whole file.
fn hash_file(path: &Path, like: Digest) -> io::Result<Digest> {
    let mut f = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut v = Verifier::new(like.algorithm());
    loop {
        let buf = f.fill_buf()?;
        if buf.is_empty() {
            return Ok(v.finish());
        }
        v.update(buf);
        let n = buf.len();
        f.consume(n);
    }
}

/// How a download ended, for a reader following its file.
#[derive(Debug, Default)]
struct DownloadState {
    ended: parking_lot::Mutex<Option<Result<(), String>>>,
}

impl DownloadState {
    fn finish(&self, result: Result<(), String>) {
        *self.ended.lock() = Some(result);
    }

    fn ended(&self) -> Option<Result<(), String>> {
        self.ended.lock().clone()
    }
}

/// Reads the blob a download is still writing (its partial file, then the final one), waiting
/// at the end for more, and hashes every byte it returns: a retried download rewrites the
/// file from the start, so only the hash tells whether the bytes read were the layer.
struct TailReader {
    inner: Arc<parking_lot::Mutex<TailInner>>,
}

struct TailInner {
    partial: PathBuf,
    complete: PathBuf,
    file: Option<File>,
    pos: u64,
    verifier: Option<Verifier>,
    layer: Digest,
    state: Arc<DownloadState>,
}

/// How long a reader at the end of a running download waits before looking again.
const TAIL_POLL: std::time::Duration = std::time::Duration::from_millis(2);

impl TailReader {
    fn new(download: &Path, state: Arc<DownloadState>, layer: Digest) -> TailReader {
        TailReader {
            inner: Arc::new(parking_lot::Mutex::new(TailInner {
                partial: lazypull_fetcher::Registry::partial_download_path(download),
                complete: download.to_path_buf(),
                file: None,
                pos: 0,
                verifier: Some(Verifier::new(layer.algorithm())),
                layer,
                state,
            })),
        }
    }

    /// The check that the bytes read, read to the download's end, are the layer.
    fn checker(&self) -> InputCheck {
        let inner = Arc::clone(&self.inner);
        Box::new(move || {
            // Decoders may stop before trailing bytes (padding): hash those too. The lock is
            // not held while waiting for the download.
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let got = inner.lock().try_read(&mut buf);
                match got.map_err(|e| e.to_string())? {
                    Some(0) => break,
                    Some(_) => {}
                    None => std::thread::sleep(TAIL_POLL),
                }
            }
            let mut t = inner.lock();
            let v = t.verifier.take().ok_or("input checked twice")?;
            let actual = v.finish();
            if actual == t.layer {
                Ok(())
            } else {
                Err(format!(
                    "the bytes converted during the download hash to {actual}, not the layer \
                     digest (the download was retried)"
                ))
            }
        })
    }
}

impl TailInner {
    /// Bytes at the current position; `None` when the caller should wait and try again
    /// (the download is still running), `Some(0)` at the end of a finished download.
    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        use std::os::unix::fs::FileExt;
        let mut seen_end = false;
        loop {
            if self.file.is_none() {
                self.file = File::open(&self.partial)
                    .or_else(|_| File::open(&self.complete))
                    .ok();
            }
            if let Some(f) = &self.file {
                let n = f.read_at(buf, self.pos)?;
                if n > 0 {
                    if let Some(v) = &mut self.verifier {
                        v.update(&buf[..n]);
                    }
                    self.pos += n as u64;
                    return Ok(Some(n));
                }
            }
            match self.state.ended() {
                // Ended after the read above came back empty: one more read sees any last
                // bytes; empty again is the end.
                Some(Ok(())) if self.file.is_some() && seen_end => return Ok(Some(0)),
                Some(Ok(())) if self.file.is_some() => seen_end = true,
                Some(Ok(())) => {
                    return Err(io::Error::other("the downloaded blob disappeared"));
                }
                Some(Err(e)) => return Err(io::Error::other(format!("download failed: {e}"))),
                None => return Ok(None),
            }
        }
    }
}

impl Read for TailReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // The lock is not held while waiting.
            if let Some(n) = self.inner.lock().try_read(buf)? {
                return Ok(n);
            }
            std::thread::sleep(TAIL_POLL);
        }
    }
}

/// Counts the compressed bytes the conversion consumed and reports them.
struct Counting<R> {
    inner: R,
    done: Arc<AtomicU64>,
    next_report: u64,
    report: Option<Box<dyn Fn(u64) + Send>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let done = self.done.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if done >= self.next_report {
            self.next_report = done + PROGRESS_EVERY;
            if let Some(r) = &self.report {
                r(done);
            }
        }
        Ok(n)
    }
}

/// Converts the verified download `src` into the eStargz file `dest`: temp file, fsync,
/// rename, directory fsync. Returns the compressed bytes read and what was written (the error
/// is boxed: it crosses a thread boundary and `OpenError` is large).
fn convert(
    src: &Path,
    dest: &Path,
    dir: &Path,
    layer: Digest,
    hint: Option<LayerCompression>,
    progress: Option<&ProgressFn>,
) -> Result<(u64, estargz::WrittenLayer), Box<OpenError>> {
    let local_err = |doing: &str, e: io::Error| {
        Box::new(OpenError::Local {
            layer,
            path: src.to_path_buf(),
            detail: format!("{doing}: {e}"),
        })
    };
    let file = File::open(src).map_err(|e| local_err("opening the download", e))?;
    let total = file
        .metadata()
        .map_err(|e| local_err("reading the download's size", e))?
        .len();
    convert_input(
        Box::new(file),
        total,
        dest,
        dir,
        layer,
        hint,
        progress,
        None,
    )
}

/// Checks the conversion's input before its result is put in place.
type InputCheck = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// Converts the compressed layer read from `input` (from its start) into the eStargz file
/// `dest`, as [`convert`] describes. With `check`, the result is put in place only if the
/// check passes once the conversion is done (the input came from a download still running).
#[allow(clippy::too_many_arguments)]
fn convert_input(
    mut input: Box<dyn Read + Send>,
    total: u64,
    dest: &Path,
    dir: &Path,
    layer: Digest,
    hint: Option<LayerCompression>,
    progress: Option<&ProgressFn>,
    check: Option<InputCheck>,
) -> Result<(u64, estargz::WrittenLayer), Box<OpenError>> {
    let local_err = |path: &Path, doing: &str, e: io::Error| {
        Box::new(OpenError::Local {
            layer,
            path: path.to_path_buf(),
            detail: format!("{doing}: {e}"),
        })
    };
    let mut head = Vec::with_capacity(4);
    (&mut input)
        .take(4)
        .read_to_end(&mut head)
        .map_err(|e| local_err(dest, "reading the layer", e))?;
    let actual = LayerCompression::sniff(&head);
    if hint.is_some_and(|h| h != actual) {
        tracing::warn!(layer = %layer, media_type_says = ?hint, content_is = ?actual,
            "layer content does not match its media type; decompressing by content");
    }
    let done = Arc::new(AtomicU64::new(0));
    let report: Option<Box<dyn Fn(u64) + Send>> = progress.cloned().map(|p| {
        Box::new(move |done: u64| {
            p(&Progress {
                layer,
                phase: Phase::Convert,
                done,
                total,
            })
        }) as Box<dyn Fn(u64) + Send>
    });
    let counting = Counting {
        inner: io::Cursor::new(head).chain(input),
        done: done.clone(),
        next_report: 0,
        report,
    };
    let buffered = BufReader::with_capacity(1 << 20, counting);
    let tar_in = actual
        .decoder(buffered)
        .map_err(|e| local_err(dest, "starting the decompressor", e))?;

    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        "{}.{ESTARGZ_EXT}.tmp-{}-{}",
        layer.hex(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result: Result<_, Box<OpenError>> = (|| {
        let out = File::create(&tmp).map_err(|e| local_err(&tmp, "creating", e))?;
        let opts = WriterOptions {
            level: flate2::Compression::new(LOCAL_GZIP_LEVEL),
            ..WriterOptions::default()
        };
        let written = estargz::write_estargz(tar_in, &out, &opts)
            .map_err(|source| Box::new(OpenError::Convert { layer, source }))?;
        if let Some(check) = check {
            check().map_err(|detail| {
                Box::new(OpenError::Local {
                    layer,
                    path: tmp.clone(),
                    detail,
                })
            })?;
        }
        out.sync_all()
            .map_err(|e| local_err(&tmp, "syncing to disk", e))?;
        drop(out);
        std::fs::rename(&tmp, dest).map_err(|e| local_err(dest, "renaming into place", e))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(written)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let written = result?;
    if let Some(p) = progress {
        p(&Progress {
            layer,
            phase: Phase::Convert,
            done: total,
            total,
        });
    }
    Ok((done.load(Ordering::Relaxed), written))
}

/// Opens a local eStargz copy: parses its TOC from the file's tail through the same
/// [`BlobReader`] that will serve the chunks (so both see the same file), and builds the
/// source.
async fn open_local_file(
    cache: &ChunkCache,
    desc: &LayerDescriptor,
    reader: &ReaderConfig,
    source: SourceConfig,
    path: &Path,
    reason: &str,
) -> Result<OpenedLayer, OpenError> {
    let layer = desc.digest;
    let local_err = |detail: String| OpenError::Local {
        layer,
        path: path.to_path_buf(),
        detail,
    };
    let blob = BlobReader::local(path, layer).map_err(|e| local_err(format!("opening: {e}")))?;
    let size = blob.size().unwrap_or(0);
    let mut start = size - estargz::tail_read_len(size);
    let mut tail = blob
        .read_at(start, size - start, Priority::OnDemand)
        .await
        .map_err(|e| local_err(e.to_string()))?;
    let mut retried = false;
    let opened = loop {
        let (r, t) = (reader.clone(), tail.clone());
        let parsed =
            tokio::task::spawn_blocking(move || estargz::open_toc(&t, start, size, None, &r))
                .await
                .map_err(|e| local_err(format!("TOC parsing task failed: {e}")))?;
        match parsed {
            Ok(o) => break o,
            Err(EstargzError::NeedMore { from }) if !retried && from < start => {
                retried = true;
                tail = blob
                    .read_at(from, size - from, Priority::OnDemand)
                    .await
                    .map_err(|e| local_err(e.to_string()))?;
                start = from;
            }
            Err(source) => return Err(OpenError::Toc { layer, source }),
        }
    };
    let source = LayerSource::new(
        Arc::new(opened.layer),
        blob,
        cache.clone(),
        Compression::Gzip,
        source,
        tokio::runtime::Handle::current(),
    );
    Ok(OpenedLayer {
        source,
        prefetch: opened.prefetch,
        toc_digest: opened.toc_digest,
        served: Served::Local {
            reason: reason.to_string(),
            path: path.to_path_buf(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estargz::OpenedToc;

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn media_types_map_to_compressions_or_say_why_not() {
        use LayerCompression::*;
        for (mt, want) in [
            ("application/vnd.oci.image.layer.v1.tar", None),
            ("application/vnd.oci.image.layer.v1.tar+gzip", Gzip),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Zstd),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Gzip,
            ),
            ("application/vnd.docker.image.rootfs.diff.tar.gzip", Gzip),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                Gzip,
            ),
            (
                "Application/VND.oci.image.layer.v1.tar+gzip; charset=x",
                Gzip,
            ),
        ] {
            assert_eq!(LayerCompression::from_media_type(mt), Ok(want), "{mt}");
        }
        for (mt, says) in [
            (
                "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
                "encrypted",
            ),
            (
                "application/vnd.oci.image.config.v1+json",
                "expected an OCI or Docker",
            ),
            ("", "no media type"),
        ] {
            let why = LayerCompression::from_media_type(mt).unwrap_err();
            assert!(why.contains(says), "{mt}: {why}");
        }
    }

    #[test]
    fn sniffing_recognises_gzip_zstd_and_skippable_frames() {
        assert_eq!(
            LayerCompression::sniff(&[0x1f, 0x8b, 8, 0]),
            LayerCompression::Gzip
        );
        assert_eq!(
            LayerCompression::sniff(&[0x28, 0xb5, 0x2f, 0xfd]),
            LayerCompression::Zstd
        );
        assert_eq!(
            LayerCompression::sniff(&[0x5e, 0x2a, 0x4d, 0x18]),
            LayerCompression::Zstd
        );
        assert_eq!(LayerCompression::sniff(b"etc/"), LayerCompression::None);
        assert_eq!(LayerCompression::sniff(&[0x1f]), LayerCompression::None);
        assert_eq!(LayerCompression::sniff(&[]), LayerCompression::None);
    }

    /// Converts `blob` (whatever its media type claims) and reads the result back.
    fn convert_blob(blob: &[u8], hint: LayerCompression) -> Result<OpenedToc, Box<OpenError>> {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("in.download");
        let dest = dir.path().join("out.estargz");
        std::fs::write(&src, blob).unwrap();
        let layer = Digest::sha256_of(blob);
        let result = convert(&src, &dest, dir.path(), layer, Some(hint), None);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "in.download")
            .collect();
        match result {
            Ok((read, _)) => {
                assert_eq!(read, blob.len() as u64, "the whole input was consumed");
                assert_eq!(names, ["out.estargz"]);
                let data = std::fs::read(&dest).unwrap();
                let opened =
                    estargz::open_toc(&data, 0, data.len() as u64, None, &ReaderConfig::default())
                        .unwrap();
                Ok(opened)
            }
            Err(e) => {
                assert!(names.is_empty(), "left behind: {names:?}");
                Err(e)
            }
        }
    }

    #[test]
    fn converts_every_compression_and_trusts_content_over_media_type() {
        let tar = tar_of(&[("a/b", b"hello"), ("c", &[7u8; 70_000])]);
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, &tar).unwrap();
            e.finish().unwrap()
        };
        let zst = zstd::encode_all(&tar[..], 1).unwrap();
        for (blob, hint) in [
            (&gz, LayerCompression::Gzip),
            (&zst, LayerCompression::Zstd),
            (&tar, LayerCompression::None),
            // Mislabelled layers are decompressed by what they are.
            (&zst, LayerCompression::Gzip),
            (&tar, LayerCompression::Zstd),
        ] {
            let opened = convert_blob(blob, hint).unwrap();
            let id = opened.layer.resolve("c").unwrap();
            assert_eq!(opened.layer.node(id).unwrap().size, 70_000);
            assert_eq!(
                opened.layer.file_digest(id),
                Some(&Digest::sha256_of(&[7u8; 70_000]))
            );
            assert!(opened.layer.resolve("a/b").is_some());
        }
        // An empty layer (no entries at all) is a valid, empty tree.
        let opened = convert_blob(&tar_of(&[]), LayerCompression::None).unwrap();
        assert!(opened.layer.resolve("c").is_none());
    }

    #[test]
    fn conversion_failures_are_reported_and_leave_no_files() {
        let tar = tar_of(&[("file", &[1u8; 5000])]);
        // A tar cut short in the middle of a file's data.
        let err = convert_blob(&tar[..2000], LayerCompression::None).unwrap_err();
        assert!(matches!(*err, OpenError::Convert { .. }), "{err:?}");
        // gzip that is not gzip beyond its magic.
        let err = convert_blob(&[0x1f, 0x8b, 0, 0, 1, 2, 3], LayerCompression::Gzip).unwrap_err();
        assert!(matches!(*err, OpenError::Convert { .. }), "{err:?}");
        assert!(
            err.to_string().contains("converting the downloaded layer"),
            "{err}"
        );
    }

    /// Writes `pieces` into the partial download file of `download` with pauses (as a download
    /// would), then renames it into place and reports the end.
    fn fake_download(
        download: PathBuf,
        pieces: Vec<Vec<u8>>,
        restart_after: Option<usize>,
        state: Arc<DownloadState>,
        reader: Arc<parking_lot::Mutex<TailInner>>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let partial = lazypull_fetcher::Registry::partial_download_path(&download);
            let mut f = File::create(&partial).unwrap();
            let mut written = 0u64;
            for (i, p) in pieces.iter().enumerate() {
                std::thread::sleep(std::time::Duration::from_millis(3));
                std::io::Write::write_all(&mut f, p).unwrap();
                written += p.len() as u64;
                if restart_after == Some(i) {
                    // A retried download: once the reader has taken the first attempt's
                    // bytes, the file starts over.
                    // (Or gave up on them: a decoder may fail on the corrupt bytes.)
                    let start = std::time::Instant::now();
                    while reader.lock().pos < written
                        && start.elapsed() < std::time::Duration::from_secs(2)
                    {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    f = File::create(&partial).unwrap();
                }
            }
            drop(f);
            std::fs::rename(&partial, &download).unwrap();
            state.finish(Ok(()));
        })
    }

    #[test]
    fn conversion_follows_a_running_download_and_checks_what_it_read() {
        // Incompressible, so the download comes in many pieces and restarts halfway.
        let tar = tar_of(&[
            ("a/b", b"hello"),
            ("c", &lazypull_tests::random_bytes(300_000, 5)),
        ]);
        let gz = lazypull_tests::gzip(&tar);
        let layer = Digest::sha256_of(&gz);
        let pieces: Vec<Vec<u8>> = gz.chunks(1000).map(<[u8]>::to_vec).collect();
        for restart in [None, Some(pieces.len() / 2)] {
            let dir = tempfile::tempdir().unwrap();
            let download = dir.path().join("x.download");
            let dest = dir.path().join("x.estargz");
            let state = Arc::new(DownloadState::default());
            // With a restart, the first attempt sent a corrupt first half, which the reader
            // has taken: its hash cannot match, though the file ends up right.
            let mut fed = pieces.clone();
            if let Some(r) = restart {
                fed = pieces[..=r].to_vec();
                fed[0][100] ^= 1;
                fed.extend(pieces.iter().cloned());
            }
            let tail = TailReader::new(&download, Arc::clone(&state), layer);
            let writer = fake_download(
                download.clone(),
                fed,
                restart,
                state,
                Arc::clone(&tail.inner),
            );
            let check = tail.checker();
            let result = convert_input(
                Box::new(tail),
                gz.len() as u64,
                &dest,
                dir.path(),
                layer,
                Some(LayerCompression::Gzip),
                None,
                Some(check),
            );
            writer.join().unwrap();
            match restart {
                None => {
                    let (read, _) = result.unwrap();
                    assert_eq!(read, gz.len() as u64);
                    // The same file a conversion of the finished download writes.
                    let src = dir.path().join("whole.download");
                    std::fs::write(&src, &gz).unwrap();
                    let serial = dir.path().join("whole.estargz");
                    convert(&src, &serial, dir.path(), layer, None, None).unwrap();
                    let data = std::fs::read(&dest).unwrap();
                    assert!(data == std::fs::read(&serial).unwrap());
                    estargz::open_toc(&data, 0, data.len() as u64, None, &ReaderConfig::default())
                        .unwrap();
                }
                Some(_) => {
                    assert!(
                        result.is_err(),
                        "a restarted download's bytes were accepted"
                    );
                    assert!(!dest.exists(), "an unchecked conversion was put in place");
                }
            }
        }
    }

    #[test]
    fn a_failed_download_fails_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let download = dir.path().join("y.download");
        let state = Arc::new(DownloadState::default());
        let mut tail = TailReader::new(&download, Arc::clone(&state), Digest::sha256_of(b"y"));
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            tail.read(&mut buf)
        });
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(!t.is_finished(), "the reader did not wait for the download");
        state.finish(Err("registry went away".into()));
        let err = t.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("registry went away"), "{err}");
    }

    #[test]
    fn stale_work_of_dead_processes_is_removed_but_live_work_kept() {
        let dir = tempfile::tempdir().unwrap();
        let layer = Digest::sha256_of(b"layer");
        let hex = layer.hex();
        let other = Digest::sha256_of(b"other").hex();
        // PID 1 is alive; 4194304 is above PID_MAX_LIMIT, so dead.
        let names = [
            format!("{hex}.partial-4194304"),
            format!("{hex}.estargz.tmp-4194304-3"),
            format!("{hex}.partial-1"),
            format!("{hex}.estargz.tmp-1-0"),
            format!("{hex}.partial-{}", std::process::id()),
            format!("{hex}.estargz"),
            format!("{other}.partial-4194304"),
        ];
        for n in &names {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        remove_stale_work(dir.path(), &layer, false);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want = vec![
            format!("{hex}.partial-1"),
            format!("{hex}.estargz.tmp-1-0"),
            format!("{hex}.estargz"),
            format!("{other}.partial-4194304"),
        ];
        want.sort();
        assert_eq!(left, want);
    }
}

/// Throughput of the whole-layer conversion, for tuning (`cargo test --release -p lazypull-fs
/// --lib conversion_throughput -- --ignored --nocapture`).
#[cfg(test)]
mod throughput {
    use super::*;

    #[test]
    #[ignore = "measurement, not a check"]
    fn conversion_throughput() {
        // Half incompressible, half text-like, in files of 4 KiB .. 8 MiB.
        let mut b = tar::Builder::new(Vec::new());
        let mut seed = 1u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut total = 0usize;
        let mut i = 0;
        while total < 64 << 20 {
            let size = [4 << 10, 64 << 10, 1 << 20, 8 << 20][(i / 2) % 4];
            let data: Vec<u8> = if i % 2 == 0 {
                (0..size).map(|_| next() as u8).collect()
            } else {
                (0..size)
                    .map(|j| b"lorem ipsum dolor sit amet\n"[j % 27])
                    .collect()
            };
            let mut h = tar::Header::new_gnu();
            h.set_size(size as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, format!("d/f{i}"), &data[..]).unwrap();
            total += size;
            i += 1;
        }
        let tar = b.into_inner().unwrap();
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            std::io::Write::write_all(&mut e, &tar).unwrap();
            e.finish().unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("in");
        std::fs::write(&src, &gz).unwrap();
        let t = Instant::now();
        let mut sink = Vec::new();
        flate2::read::MultiGzDecoder::new(&gz[..])
            .read_to_end(&mut sink)
            .unwrap();
        let mb = tar.len() as f64 / 1e6;
        eprintln!("gunzip only: {:.0} MB/s", mb / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let dest = dir.path().join("out");
        let layer = Digest::sha256_of(&gz);
        convert(&src, &dest, dir.path(), layer, None, None).unwrap();
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "convert {:.0} MB tar ({:.0} MB gzip -> {:.0} MB eStargz): {secs:.2} s, {:.0} MB/s",
            mb,
            gz.len() as f64 / 1e6,
            std::fs::metadata(&dest).unwrap().len() as f64 / 1e6,
            mb / secs
        );
    }
}
