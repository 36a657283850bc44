//! The blob reader engine: ranged reads of remote blobs, shared, merged and prioritised.
//!
//! A lazily mounted layer turns every cache miss into a ranged read of its blob. Three things
//! keep that cheap:
//! - **single-flight**: a read that falls inside a range already queued or in flight waits for
//!   that fetch instead of sending its own (32 readers of one chunk cost one GET);
//! - **merging**: reads queued together whose ranges touch or lie within `merge_gap` of each
//!   other go out as one request (up to `max_request`), so a burst of small reads costs one
//!   round trip, not one each;
//! - **priorities**: each host has a bounded number of connections; a free connection goes to
//!   on-demand reads before prefetch before background fill, and `reserved_on_demand`
//!   connections are never given to the lower classes.
//!
//! Batching needs no timer: the first reader of a batch becomes its dispatcher and yields once
//! before sending, so every read issued in the same scheduling round joins the batch.
//!
//! A [`BlobReader`] can also read a blob kept in a local file ([`BlobReader::local`]): layers
//! that cannot be read lazily are fetched whole, converted and then served through the same
//! chunk path, so the layer code above does not care where the bytes come from.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::digest::Digest;
use crate::error::Error;
use crate::limiter::PriorityLimiter;
use crate::metrics::Reason;
use crate::reference::Reference;
use crate::registry::Registry;

/// How urgent a read is. Ordered: `OnDemand` > `ReadAhead` > `Prefetch` > `Background`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Filling the rest of a layer while nobody waits.
    Background = 0,
    /// Fetching what the workload is known to read soon (a recorded list or the eStargz
    /// prefetch landmark).
    Prefetch = 1,
    /// The rest of a file a process has started reading: nobody waits on it yet, so it never
    /// takes the slots kept for blocked reads, but it was caused by a read and is counted
    /// under [`Reason::OnDemand`].
    ReadAhead = 2,
    /// A process is blocked on this read.
    OnDemand = 3,
}

/// Tuning of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Reads whose ranges are at most this far apart are fetched as one request (the gap is
    /// downloaded and discarded: cheaper than a round trip).
    pub merge_gap: u64,
    /// Largest merged request.
    pub max_request: u64,
    /// Concurrent requests per registry host.
    pub connections_per_host: usize,
    /// Of those, how many only on-demand reads may use.
    pub reserved_on_demand: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            merge_gap: 64 << 10,
            max_request: 16 << 20,
            connections_per_host: 8,
            reserved_on_demand: 2,
        }
    }
}

/// Result shared by every reader waiting on one fetch.
type Shared = Option<Result<Bytes, Error>>;

/// One range queued or in flight.
#[derive(Debug)]
struct Flight {
    start: u64,
    end: u64,
    priority: Arc<AtomicU8>,
    /// A read of the layer's table of contents (accounted apart from content reads).
    toc: bool,
    tx: watch::Sender<Shared>,
}

impl Flight {
    fn covers(&self, start: u64, end: u64) -> bool {
        self.start <= start && end <= self.end
    }
}

#[derive(Debug, Default)]
struct BlobQueue {
    /// Reads not yet sent, in arrival order.
    queued: Vec<Arc<Flight>>,
    /// Requests being fetched (merged spans).
    inflight: Vec<Arc<Flight>>,
    /// Whether some reader has taken on dispatching the queue.
    dispatching: bool,
}

#[derive(Debug)]
struct BlobState {
    reference: Reference,
    digest: Digest,
    size: Option<u64>,
    queue: Mutex<BlobQueue>,
    /// Bytes then requests received, per [`Reason`] (index).
    counters: [AtomicU64; 8],
}

/// What one blob's reads fetched from the registry, by reason: for per-layer statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlobStats {
    /// Bytes received, indexed by [`Reason`] as `usize`.
    pub bytes: [u64; 4],
    /// Requests completed, indexed likewise.
    pub requests: [u64; 4],
}

impl BlobStats {
    /// Bytes received for `reason`.
    pub fn bytes_for(&self, reason: Reason) -> u64 {
        self.bytes[reason as usize]
    }

    /// All bytes received.
    pub fn total_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }
}

#[derive(Debug)]
struct EngineInner {
    registry: Registry,
    config: EngineConfig,
    limiters: Mutex<HashMap<String, Arc<PriorityLimiter>>>,
    blobs: Mutex<HashMap<(String, String, Digest), Weak<BlobState>>>,
}

/// Shared scheduler of ranged blob reads; one per daemon. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FetchEngine {
    inner: Arc<EngineInner>,
}

/// Ranged reads of one blob, either from a registry through the engine or from a local file.
///
/// Remote readers of the same blob (same registry, repository and digest) share queue and
/// flights, however they were obtained. Local readers ([`BlobReader::local`]) do positional
/// reads of their file on the blocking pool; no scheduling is needed for a disk.
#[derive(Debug, Clone)]
pub struct BlobReader {
    source: Source,
}

/// Where a [`BlobReader`]'s bytes come from.
#[derive(Debug, Clone)]
enum Source {
    Remote(RemoteBlob),
    Local(Arc<LocalBlob>),
}

/// A registry blob read through the engine.
#[derive(Debug, Clone)]
struct RemoteBlob {
    engine: Arc<EngineInner>,
    state: Arc<BlobState>,
}

/// A blob in a local file, opened once (so a later rename or unlink of the path does not
/// change what is read).
#[derive(Debug)]
struct LocalBlob {
    file: File,
    path: PathBuf,
    digest: Digest,
    size: u64,
}

impl FetchEngine {
    /// An engine reading through `registry`.
    pub fn new(registry: Registry, config: EngineConfig) -> FetchEngine {
        FetchEngine {
            inner: Arc::new(EngineInner {
                registry,
                config,
                limiters: Mutex::default(),
                blobs: Mutex::default(),
            }),
        }
    }

    /// The registry client underneath.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// A reader for blob `digest` of `reference`'s repository; `size`, when known (from the
    /// manifest), bounds reads.
    pub fn blob(&self, reference: &Reference, digest: Digest, size: Option<u64>) -> BlobReader {
        let key = (
            reference.registry().to_string(),
            reference.repository().to_string(),
            digest,
        );
        let mut blobs = self.inner.blobs.lock();
        if let Some(state) = blobs.get(&key).and_then(Weak::upgrade) {
            return BlobReader {
                source: Source::Remote(RemoteBlob {
                    engine: self.inner.clone(),
                    state,
                }),
            };
        }
        blobs.retain(|_, w| w.strong_count() > 0);
        let state = Arc::new(BlobState {
            reference: reference.clone(),
            digest,
            size,
            queue: Mutex::default(),
            counters: Default::default(),
        });
        blobs.insert(key, Arc::downgrade(&state));
        BlobReader {
            source: Source::Remote(RemoteBlob {
                engine: self.inner.clone(),
                state,
            }),
        }
    }
}

/// Gives the dispatching role back if a dispatcher is cancelled before sending its batch, so
/// queued readers are never stranded.
struct DispatchGuard {
    reader: Option<RemoteBlob>,
}

impl Drop for DispatchGuard {
    fn drop(&mut self) {
        if let Some(r) = self.reader.take() {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move { r.dispatch() });
            } else {
                r.state.queue.lock().dispatching = false;
            }
        }
    }
}

impl BlobReader {
    /// A reader of the blob kept in the local file `path`, named `digest` in logs and errors
    /// (for a layer converted locally, the registry layer it was made from). The size is the
    /// file's size at open; the file is kept open, so replacing the path later does not
    /// change what this reader sees. Reads are not verified here, exactly as for remote
    /// blobs: the caller checks chunk digests.
    pub fn local(path: &Path, digest: Digest) -> std::io::Result<BlobReader> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            ));
        }
        Ok(BlobReader {
            source: Source::Local(Arc::new(LocalBlob {
                file,
                path: path.to_path_buf(),
                digest,
                size: meta.len(),
            })),
        })
    }

    /// The blob's digest.
    pub fn digest(&self) -> Digest {
        match &self.source {
            Source::Remote(r) => r.state.digest,
            Source::Local(l) => l.digest,
        }
    }

    /// The blob's size if it is known (given by the manifest, or the local file's size).
    pub fn size(&self) -> Option<u64> {
        match &self.source {
            Source::Remote(r) => r.state.size,
            Source::Local(l) => Some(l.size),
        }
    }

    /// The local file this reader reads, or `None` for a registry blob (lets callers tell a
    /// layer that no longer needs the network).
    pub fn local_path(&self) -> Option<&Path> {
        match &self.source {
            Source::Remote(_) => None,
            Source::Local(l) => Some(&l.path),
        }
    }

    /// Reads `len` bytes at `offset` (unverified: the caller checks chunk digests). A range
    /// that does not fit in the blob fails with [`Error::OutOfRange`]; `priority` orders
    /// registry requests and is irrelevant for local files.
    pub async fn read_at(&self, offset: u64, len: u64, priority: Priority) -> Result<Bytes, Error> {
        match &self.source {
            Source::Remote(r) => r.read_at(offset, len, priority, false).await,
            Source::Local(l) => l.clone().read_at(offset, len).await,
        }
    }

    /// [`BlobReader::read_at`] at on-demand priority for a layer's table of contents, so its
    /// bytes are counted under [`Reason::Toc`] rather than as content read on demand.
    pub async fn read_toc_at(&self, offset: u64, len: u64) -> Result<Bytes, Error> {
        match &self.source {
            Source::Remote(r) => r.read_at(offset, len, Priority::OnDemand, true).await,
            Source::Local(l) => l.clone().read_at(offset, len).await,
        }
    }

    /// What this blob's reads have fetched from the registry so far (zeros for a local file).
    pub fn stats(&self) -> BlobStats {
        match &self.source {
            Source::Remote(r) => {
                let c = &r.state.counters;
                let mut st = BlobStats::default();
                for i in 0..4 {
                    st.bytes[i] = c[i].load(Ordering::Relaxed);
                    st.requests[i] = c[4 + i].load(Ordering::Relaxed);
                }
                st
            }
            Source::Local(_) => BlobStats::default(),
        }
    }
}

impl LocalBlob {
    async fn read_at(self: Arc<Self>, offset: u64, len: u64) -> Result<Bytes, Error> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let out_of_range = || Error::OutOfRange {
            digest: self.digest,
            offset,
            len,
            size: self.size,
        };
        let end = offset.checked_add(len).ok_or_else(out_of_range)?;
        if end > self.size {
            return Err(out_of_range());
        }
        let n = usize::try_from(len).map_err(|_| out_of_range())?;
        let this = self.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; n];
            this.file.read_exact_at(&mut buf, offset).map(|()| buf)
        })
        .await;
        let local_err = |detail: String| Error::LocalRead {
            digest: Box::new(self.digest),
            path: self.path.display().to_string(),
            offset,
            len,
            detail,
        };
        match joined {
            Ok(Ok(buf)) => Ok(Bytes::from(buf)),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(local_err(
                "the file is shorter than when it was opened (truncated?)".into(),
            )),
            Ok(Err(e)) => Err(local_err(e.to_string())),
            Err(e) => Err(local_err(format!("read task failed: {e}"))),
        }
    }
}

impl RemoteBlob {
    async fn read_at(
        &self,
        offset: u64,
        len: u64,
        priority: Priority,
        toc: bool,
    ) -> Result<Bytes, Error> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let end = offset.checked_add(len).ok_or(Error::OutOfRange {
            digest: self.state.digest,
            offset,
            len,
            size: self.state.size.unwrap_or(u64::MAX),
        })?;
        if let Some(size) = self.state.size {
            if end > size {
                return Err(Error::OutOfRange {
                    digest: self.state.digest,
                    offset,
                    len,
                    size,
                });
            }
        }
        let (flight, dispatcher) = {
            let mut q = self.state.queue.lock();
            let existing = q
                .inflight
                .iter()
                .chain(q.queued.iter())
                .find(|f| f.covers(offset, end))
                .cloned();
            match existing {
                Some(f) => {
                    f.priority.fetch_max(priority as u8, Ordering::Relaxed);
                    (f, false)
                }
                None => {
                    let (tx, _) = watch::channel(None);
                    let f = Arc::new(Flight {
                        start: offset,
                        end,
                        priority: Arc::new(AtomicU8::new(priority as u8)),
                        toc,
                        tx,
                    });
                    q.queued.push(f.clone());
                    let dispatcher = !q.dispatching;
                    q.dispatching = true;
                    (f, dispatcher)
                }
            }
        };
        let mut rx = flight.tx.subscribe();
        if dispatcher {
            let mut guard = DispatchGuard {
                reader: Some(self.clone()),
            };
            // Let every read issued in this scheduling round queue up, then send the batch.
            tokio::task::yield_now().await;
            guard.reader = None;
            self.dispatch();
        }
        let result = rx
            .wait_for(|v| v.is_some())
            .await
            .map_err(|_| Error::Io {
                what: format!("read of blob {}", self.state.digest),
                detail: "fetch task ended without a result".into(),
            })?
            .clone();
        match result {
            Some(Ok(bytes)) => {
                let from = (offset - flight.start) as usize;
                Ok(bytes.slice(from..from + len as usize))
            }
            Some(Err(e)) => Err(e),
            None => unreachable_none(),
        }
    }

    /// Sends everything queued: sorts by offset, merges neighbours into spans and starts one
    /// fetch task per span.
    fn dispatch(&self) {
        let cfg = &self.engine.config;
        let spans = {
            let mut q = self.state.queue.lock();
            q.dispatching = false;
            let mut queued = std::mem::take(&mut q.queued);
            queued.sort_by_key(|f| (f.start, std::cmp::Reverse(f.end)));
            let mut spans: Vec<(Arc<Flight>, Vec<Arc<Flight>>)> = Vec::new();
            let mut current: Option<(u64, u64, u8, Vec<Arc<Flight>>)> = None;
            for f in queued {
                let p = f.priority.load(Ordering::Relaxed);
                current = match current.take() {
                    Some((s, e, cp, mut members))
                        if f.start <= e.saturating_add(cfg.merge_gap)
                            && f.end.max(e) - s <= cfg.max_request =>
                    {
                        let e2 = e.max(f.end);
                        members.push(f);
                        Some((s, e2, cp.max(p), members))
                    }
                    Some(done) => {
                        spans.push(make_span(done));
                        Some((f.start, f.end, p, vec![f]))
                    }
                    None => Some((f.start, f.end, p, vec![f])),
                };
            }
            if let Some(done) = current {
                spans.push(make_span(done));
            }
            for (span, _) in &spans {
                q.inflight.push(span.clone());
            }
            spans
        };
        for (span, members) in spans {
            let reader = self.clone();
            let trace = tracing::debug_span!(
                "fetch",
                blob = %self.state.digest,
                host = %self.state.reference.registry(),
                offset = span.start,
                len = span.end - span.start,
            );
            tokio::spawn(tracing::Instrument::instrument(
                async move { reader.fetch_span(span, members).await },
                trace,
            ));
        }
    }

    async fn fetch_span(self, span: Arc<Flight>, members: Vec<Arc<Flight>>) {
        let host = self.state.reference.registry().to_string();
        let limiter = {
            let cfg = &self.engine.config;
            self.engine
                .limiters
                .lock()
                .entry(host)
                .or_insert_with(|| {
                    PriorityLimiter::new(
                        cfg.connections_per_host,
                        cfg.reserved_on_demand,
                        Priority::OnDemand as u8,
                    )
                })
                .clone()
        };
        // Priorities of members may be raised while queued: the span follows the highest.
        for m in &members {
            span.priority
                .fetch_max(m.priority.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let permit = limiter.acquire(span.priority.clone()).await;
        let started = std::time::Instant::now();
        let result = self
            .engine
            .registry
            .read_range(
                &self.state.reference,
                &self.state.digest,
                span.start,
                span.end - span.start,
            )
            .await;
        drop(permit);
        self.account(&span, &result, started.elapsed());
        {
            let mut q = self.state.queue.lock();
            q.inflight.retain(|f| !Arc::ptr_eq(f, &span));
        }
        for m in &members {
            let r = match &result {
                Ok(bytes) => {
                    let from = (m.start - span.start) as usize;
                    Ok(bytes.slice(from..from + (m.end - m.start) as usize))
                }
                Err(e) => Err(e.clone()),
            };
            m.tx.send_replace(Some(r));
        }
        span.tx.send_replace(Some(result));
    }
}

impl RemoteBlob {
    /// Counts a finished request in the blob's statistics and the process metrics, under the
    /// reason of its most urgent member (a TOC read when every member is one).
    fn account(&self, span: &Flight, result: &Result<Bytes, Error>, took: std::time::Duration) {
        let host = self.state.reference.registry();
        let m = crate::metrics::fetch_metrics();
        let bytes = match result {
            Ok(b) => b.len() as u64,
            Err(_) => {
                m.errors.with_label_values(&[host]).inc();
                return;
            }
        };
        let reason = if span.toc {
            Reason::Toc
        } else {
            match span.priority.load(Ordering::Relaxed) {
                p if p >= Priority::ReadAhead as u8 => Reason::OnDemand,
                p if p == Priority::Prefetch as u8 => Reason::Prefetch,
                _ => Reason::Background,
            }
        };
        self.state.counters[reason as usize].fetch_add(bytes, Ordering::Relaxed);
        self.state.counters[4 + reason as usize].fetch_add(1, Ordering::Relaxed);
        m.bytes
            .with_label_values(&[host, reason.as_str()])
            .inc_by(bytes);
        m.requests.with_label_values(&[host, reason.as_str()]).inc();
        m.latency
            .with_label_values(&[host])
            .observe(took.as_secs_f64());
    }
}

fn make_span(
    (start, end, priority, members): (u64, u64, u8, Vec<Arc<Flight>>),
) -> (Arc<Flight>, Vec<Arc<Flight>>) {
    let (tx, _) = watch::channel(None);
    let toc = !members.is_empty() && members.iter().all(|m| m.toc);
    (
        Arc::new(Flight {
            start,
            end,
            priority: Arc::new(AtomicU8::new(priority)),
            toc,
            tx,
        }),
        members,
    )
}

#[cold]
fn unreachable_none() -> Result<Bytes, Error> {
    Err(Error::Io {
        what: "blob read".into(),
        detail: "internal: empty fetch result".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_blob(data: &[u8]) -> (tempfile::TempDir, PathBuf, BlobReader) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, data).unwrap();
        let reader = BlobReader::local(&path, Digest::sha256_of(data)).unwrap();
        (dir, path, reader)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[tokio::test]
    async fn local_reads_ranges_and_reports_digest_size_and_path() {
        let data = pattern(100_000);
        let (_dir, path, r) = local_blob(&data);
        assert_eq!(r.digest(), Digest::sha256_of(&data));
        assert_eq!(r.size(), Some(100_000));
        assert_eq!(r.local_path(), Some(path.as_path()));
        for (off, len) in [
            (0u64, 1u64),
            (0, 100_000),
            (99_999, 1),
            (12_345, 54_321),
            (50, 0),
        ] {
            let got = r.read_at(off, len, Priority::OnDemand).await.unwrap();
            assert_eq!(
                &got[..],
                &data[off as usize..(off + len) as usize],
                "{off}+{len}"
            );
        }
    }

    #[tokio::test]
    async fn local_out_of_range_reads_fail_like_remote_ones() {
        let data = pattern(1000);
        let (_dir, _path, r) = local_blob(&data);
        let digest = r.digest();
        for (off, len) in [
            (1000u64, 1u64),
            (999, 2),
            (0, 1001),
            (5000, 10),
            (u64::MAX, 1),
            (1, u64::MAX),
        ] {
            match r.read_at(off, len, Priority::Background).await {
                Err(Error::OutOfRange {
                    digest: d,
                    offset,
                    len: l,
                    size,
                }) => {
                    assert_eq!((d, offset, l, size), (digest, off, len, 1000));
                }
                other => panic!("{off}+{len}: expected OutOfRange, got {other:?}"),
            }
        }
        // An empty read is fine anywhere, as for remote blobs.
        assert!(r
            .read_at(u64::MAX, 0, Priority::OnDemand)
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn local_reader_keeps_its_file_and_reports_truncation() {
        let data = pattern(4096);
        let (_dir, path, r) = local_blob(&data);
        // Unlinking (or replacing) the path does not affect an open reader.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            &r.read_at(4000, 96, Priority::OnDemand).await.unwrap()[..],
            &data[4000..]
        );

        let (_dir2, path2, r2) = local_blob(&data);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path2)
            .unwrap()
            .set_len(100)
            .unwrap();
        let err = r2.read_at(50, 100, Priority::OnDemand).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::LocalRead {
                    offset: 50,
                    len: 100,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&path2.display().to_string()) && msg.contains("shorter"),
            "{msg}"
        );
        assert!(!err.is_transient());
    }

    #[tokio::test]
    async fn local_reader_rejects_missing_files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::sha256_of(b"x");
        let missing = BlobReader::local(&dir.path().join("nope"), d).unwrap_err();
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
        let is_dir = BlobReader::local(dir.path(), d).unwrap_err();
        assert_eq!(is_dir.kind(), std::io::ErrorKind::InvalidInput);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn local_concurrent_reads_return_their_own_ranges() {
        let data = pattern(1 << 20);
        let (_dir, _path, r) = local_blob(&data);
        let reads = (0..64u64).map(|i| {
            let r = r.clone();
            async move {
                (
                    i,
                    r.read_at(i * 16_000, 9_000, Priority::OnDemand)
                        .await
                        .unwrap(),
                )
            }
        });
        for (i, got) in futures::future::join_all(reads).await {
            let off = (i * 16_000) as usize;
            assert_eq!(&got[..], &data[off..off + 9_000]);
        }
    }
}
