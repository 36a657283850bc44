//! Serving file content from chunks: cache, fetch, decompress, verify.
//!
//! [`LayerSource`] is the data path of docs/design.md section 3. A read of `[offset, offset+len)` of a
//! file maps to the chunks covering it; each chunk comes from the content-addressed
//! [`ChunkCache`] or, on a miss, from the blob (its compressed span, through the
//! [`BlobReader`], which merges the spans of one read into one request), is decompressed,
//! verified against its digest, stored in the cache, and copied into the reply. Nothing
//! unverified leaves this module: a digest mismatch refetches once, then fails the read with
//! EIO and logs the layer and chunk.
//!
//! Reads also trigger read-ahead: a file that is being read is usually read whole (or mapped
//! and paged in), so the rest of it is fetched at prefetch priority right away, instead of one
//! round trip per 128 KiB kernel request.

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use lazypull_fetcher::cache::Lookup;
use lazypull_fetcher::{BlobReader, ChunkCache, Digest, Priority};
use tokio::sync::{watch, Semaphore};

use crate::toc::{Chunk, Kind, Layer, NodeId};

/// How chunks are compressed in the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// One gzip member per chunk (eStargz).
    Gzip,
    /// One zstd frame per chunk (zstd:chunked; also eStargz-style TOCs in zstd, where several
    /// chunks may share a frame and `inner_offset` says where a chunk starts).
    Zstd,
}

/// Most decompressed bytes one read-around or one fill batch holds at once (each chunk is at
/// most [`crate::toc::MAX_CHUNK_SIZE`]): batches are sized in compressed bytes, and a hostile
/// layer can make chunks compress a thousandfold.
const MAX_HELD_BYTES: u64 = 64 << 20;

/// Why a chunk could not be served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChunkError {
    /// Fetching the compressed span failed.
    #[error("layer {layer}: fetching chunk at blob offset {offset}: {source}")]
    Fetch {
        /// Layer digest.
        layer: Digest,
        /// Blob offset of the chunk.
        offset: u64,
        /// The fetcher's error.
        source: Box<lazypull_fetcher::Error>,
    },
    /// The compressed data did not decompress to the chunk.
    #[error("layer {layer}: chunk at blob offset {offset} is corrupt: {detail}")]
    Corrupt {
        /// Layer digest.
        layer: Digest,
        /// Blob offset of the chunk.
        offset: u64,
        /// What was wrong.
        detail: String,
    },
    /// The chunk's bytes do not match its digest (after one refetch).
    #[error("layer {layer}: chunk at blob offset {offset} does not match its digest {expected}")]
    Digest {
        /// Layer digest.
        layer: Digest,
        /// Blob offset of the chunk.
        offset: u64,
        /// The digest from the TOC.
        expected: Box<Digest>,
    },
    /// The TOC gave no digest for this chunk, so it cannot be verified and is not served.
    #[error("layer {layer}: chunk at blob offset {offset} has no digest; refusing to serve unverified data")]
    Unverifiable {
        /// Layer digest.
        layer: Digest,
        /// Blob offset of the chunk.
        offset: u64,
    },
    /// The layer describes a chunk with a digest that names content of another size (the
    /// cache already holds that digest, verified, with a different length). No bytes of it
    /// are served: a digest names one content, so the description is wrong.
    #[error("layer {layer}: chunk at blob offset {offset} claims {size} bytes for digest {digest}, whose verified content has {actual} bytes")]
    SizeConflict {
        /// Layer digest.
        layer: Digest,
        /// Blob offset of the chunk.
        offset: u64,
        /// The digest from the TOC.
        digest: Box<Digest>,
        /// The size the TOC claims.
        size: u64,
        /// The size of the verified content of that digest.
        actual: u64,
    },
    /// The node is not a regular file.
    #[error("node {0} is not a regular file")]
    NotAFile(NodeId),
    /// A task of the data path panicked or was cancelled, or the process is shutting down
    /// (its message). Cache failures are not here: the data path serves around them.
    #[error("data path task failed: {0}")]
    Task(String),
}

impl ChunkError {
    /// The errno a filesystem read should fail with.
    pub fn errno(&self) -> i32 {
        match self {
            ChunkError::NotAFile(_) => libc::EISDIR,
            _ => libc::EIO,
        }
    }
}

/// Counters of one layer's data path.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Chunks served from the cache.
    pub cache_hits: AtomicU64,
    /// Chunks fetched from the registry.
    pub fetched_chunks: AtomicU64,
    /// Compressed bytes fetched from the registry.
    pub fetched_bytes: AtomicU64,
    /// Chunks whose digest did not match.
    pub digest_mismatches: AtomicU64,
    /// Chunks of the layer known to be in the cache after a fill pass.
    pub filled_chunks: AtomicU64,
}

/// Limits of read-ahead and background fill.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// How far past a read the rest of the file is fetched at prefetch priority.
    pub read_ahead: u64,
    /// Compressed bytes of the chunks that follow a file in the blob (usually its neighbours
    /// in the directory, read next by importers and loaders) fetched along with an on-demand
    /// read, so a workload of many small files pays few round trips.
    pub read_around: u64,
    /// Compressed bytes per prefetch batch (issued together so they merge); background-fill
    /// batches are at most half of [`crate::background::IN_FLIGHT`].
    pub fill_batch: u64,
    /// Cap of the background fill in compressed bytes per second (`None`: as fast as the
    /// connections allow; on-demand reads still go first).
    pub fill_rate: Option<u64>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            read_ahead: 32 << 20,
            read_around: 1 << 20,
            fill_batch: 8 << 20,
            fill_rate: None,
        }
    }
}

/// File content of one layer, served from cache and blob. Cheap to clone.
#[derive(Clone)]
pub struct LayerSource {
    inner: Arc<Inner>,
}

struct Inner {
    layer: Arc<Layer>,
    blob: BlobReader,
    cache: ChunkCache,
    compression: Compression,
    config: SourceConfig,
    stats: SourceStats,
    runtime: tokio::runtime::Handle,
    /// Chunk indices (into `layer.all_chunks()`) in blob order, for read-around.
    blob_order: Vec<u32>,
    /// Profile prefetches running on this layer: while one runs, it says what the workload
    /// reads, and read-around's guesses would only compete with it for the link.
    guided: AtomicUsize,
    /// Chunks being loaded: later readers of the same chunk wait for the first one's result
    /// instead of fetching overlapping ranges again. Keyed by digest and size, so a chunk that
    /// claims another chunk's digest with a different size never receives its bytes.
    loading: parking_lot::Mutex<HashMap<LoadKey, watch::Receiver<Loaded>>>,
}

/// What identifies a chunk's content: its digest and its length.
type LoadKey = (Digest, u64);

/// The shared outcome of loading one chunk.
type Loaded = Option<Result<Bytes, ChunkError>>;

/// Bounds CPU-heavy work (decompression, hashing, cache disk reads) to the number of cores,
/// process-wide: unbounded `spawn_blocking` would run hundreds of multi-MiB decompressions at
/// once and leave glibc's per-thread arenas holding hundreds of MiB afterwards.
fn cpu_permits() -> &'static Arc<Semaphore> {
    static PERMITS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    PERMITS.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get());
        Arc::new(Semaphore::new(n))
    })
}

/// Runs `work` on the blocking pool under a CPU permit.
async fn cpu<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ChunkError> {
    let _permit = cpu_permits()
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| ChunkError::Task(format!("CPU pool: {e}")))?;
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ChunkError::Task(format!("decompression: {e}")))
}

impl std::fmt::Debug for LayerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LayerSource({})", self.inner.blob.digest())
    }
}

impl LayerSource {
    /// A source for `layer` whose chunks live in `blob`, cached in `cache`. Reads handed over
    /// by the filesystem run on `runtime`.
    pub fn new(
        layer: Arc<Layer>,
        blob: BlobReader,
        cache: ChunkCache,
        compression: Compression,
        config: SourceConfig,
        runtime: tokio::runtime::Handle,
    ) -> LayerSource {
        let all = layer.all_chunks();
        let mut blob_order: Vec<u32> = (0..all.len() as u32).collect();
        blob_order.sort_by_key(|&i| (all[i as usize].blob_offset, all[i as usize].inner_offset));
        LayerSource {
            inner: Arc::new(Inner {
                layer,
                blob,
                cache,
                compression,
                config,
                stats: SourceStats::default(),
                runtime,
                blob_order,
                guided: AtomicUsize::new(0),
                loading: parking_lot::Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The layer model.
    pub fn layer(&self) -> &Arc<Layer> {
        &self.inner.layer
    }

    /// The layer's counters.
    pub fn stats(&self) -> &SourceStats {
        &self.inner.stats
    }

    /// The layer (blob) digest, for logs.
    pub fn digest(&self) -> Digest {
        self.inner.blob.digest()
    }

    /// Reads `len` bytes at `offset` of file `node` (fewer at end of file).
    pub async fn read(
        &self,
        node: NodeId,
        offset: u64,
        len: u64,
        priority: Priority,
    ) -> Result<Bytes, ChunkError> {
        let layer = &self.inner.layer;
        let n = layer
            .node(node)
            .filter(|n| n.kind == Kind::File)
            .ok_or(ChunkError::NotAFile(node))?;
        let end = offset.saturating_add(len).min(n.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let chunks = layer.chunks(node);
        let first = chunks.partition_point(|c| c.file_offset + c.size <= offset);
        let wanted: Vec<Chunk> = chunks[first..]
            .iter()
            .take_while(|c| c.file_offset < end)
            .copied()
            .collect();
        // Read-ahead: the rest of the file (bounded), in the background, below blocked reads.
        let ahead_end = end.saturating_add(self.inner.config.read_ahead);
        let ahead: Vec<Chunk> = chunks[first + wanted.len()..]
            .iter()
            .take_while(|c| c.file_offset < ahead_end)
            .filter(|c| c.digest.is_some_and(|d| !self.inner.cache.contains(&d)))
            .copied()
            .collect();
        let mut ahead = ahead;
        if priority == Priority::OnDemand {
            if let Some(last) = chunks.last() {
                ahead.extend(self.neighbours(last));
            }
        }
        if !ahead.is_empty() && priority == Priority::OnDemand {
            let this = self.clone();
            self.inner.runtime.spawn(async move {
                let _ = this.fetch_many(&ahead, Priority::ReadAhead).await;
            });
        }
        let parts = self.fetch_many(&wanted, priority).await?;
        // Every part has exactly its chunk's size (checked where it was loaded) and the
        // chunks tile the file (checked when the layer was built); the cut is still checked,
        // so a broken invariant fails this read instead of the daemon.
        let cut = |c: &Chunk, data: &Bytes| {
            let from = offset.saturating_sub(c.file_offset);
            let to = end.min(c.file_offset.saturating_add(c.size)) - c.file_offset;
            usize::try_from(from)
                .ok()
                .zip(usize::try_from(to).ok())
                .filter(|(f, t)| f <= t && *t <= data.len())
                .map(|(f, t)| data.slice(f..t))
                .ok_or_else(|| ChunkError::Corrupt {
                    layer: self.digest(),
                    offset: c.blob_offset,
                    detail: format!(
                        "chunk holds {} bytes, the read needs [{from}, {to})",
                        data.len()
                    ),
                })
        };
        if let ([c], [data]) = (wanted.as_slice(), parts.as_slice()) {
            return cut(c, data);
        }
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for (c, data) in wanted.iter().zip(&parts) {
            out.extend_from_slice(&cut(c, data)?);
        }
        Ok(out.freeze())
    }

    /// Fetches several chunks concurrently (their spans merge into few requests).
    async fn fetch_many(
        &self,
        chunks: &[Chunk],
        priority: Priority,
    ) -> Result<Vec<Bytes>, ChunkError> {
        let reads = chunks.iter().map(|c| self.chunk(c, priority));
        futures::future::join_all(reads).await.into_iter().collect()
    }

    /// Uncached chunks that follow `last` in blob order, up to `read_around` compressed bytes.
    fn neighbours(&self, last: &Chunk) -> Vec<Chunk> {
        let all = self.inner.layer.all_chunks();
        if self.inner.guided.load(Ordering::Relaxed) > 0 {
            return Vec::new();
        }
        let order = &self.inner.blob_order;
        let start = order.partition_point(|&i| {
            let c = &all[i as usize];
            (c.blob_offset, c.inner_offset) <= (last.blob_offset, last.inner_offset)
        });
        let mut budget = self.inner.config.read_around;
        // Decompressed bytes held at once are bounded too: a hostile layer can make chunks
        // compress a thousandfold.
        let mut held = 0u64;
        let mut out = Vec::new();
        for &i in &order[start..] {
            if budget == 0 || held >= MAX_HELD_BYTES {
                break;
            }
            let c = all[i as usize];
            budget = budget.saturating_sub(c.blob_len);
            held = held.saturating_add(c.size);
            if c.digest.is_some_and(|d| !self.inner.cache.contains(&d)) {
                out.push(c);
            }
        }
        out
    }

    /// One verified chunk: from the cache, else fetched (refetched once on mismatch). Readers
    /// of a chunk that is already being loaded wait for that load.
    pub async fn chunk(&self, chunk: &Chunk, priority: Priority) -> Result<Bytes, ChunkError> {
        let digest = chunk.digest.ok_or(ChunkError::Unverifiable {
            layer: self.digest(),
            offset: chunk.blob_offset,
        })?;
        let key = (digest, chunk.size);
        loop {
            let (tx, mut rx) = {
                let mut loading = self.inner.loading.lock();
                match loading.get(&key) {
                    Some(rx) => (None, rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        loading.insert(key, rx.clone());
                        (Some(tx), rx)
                    }
                }
            };
            let Some(tx) = tx else {
                let outcome = rx.wait_for(|v| v.is_some()).await.map(|v| v.clone());
                match outcome {
                    Ok(Some(r)) => return r,
                    // The loader ended without a result (cancelled, or it panicked): drop its
                    // entry if nobody replaced it yet, then load the chunk ourselves. Without
                    // the removal the next turn would find the dead entry again and spin.
                    Ok(None) | Err(_) => self.release(&key, &rx),
                }
                continue;
            };
            let _done = LoadGuard {
                source: self,
                key,
                rx,
            };
            let result = self.load_chunk(chunk, digest, priority).await;
            tx.send_replace(Some(result.clone()));
            return result;
        }
    }

    async fn load_chunk(
        &self,
        chunk: &Chunk,
        digest: Digest,
        priority: Priority,
    ) -> Result<Bytes, ChunkError> {
        let layer = self.digest();
        if let Some(actual) = self
            .inner
            .cache
            .size_of(&digest)
            .filter(|s| *s != chunk.size)
        {
            tracing::error!(layer = %layer, chunk_offset = chunk.blob_offset, chunk_digest = %digest,
                size = chunk.size, actual, "chunk digest names content of another size; refusing the read");
            return Err(ChunkError::SizeConflict {
                layer,
                offset: chunk.blob_offset,
                digest: Box::new(digest),
                size: chunk.size,
                actual,
            });
        }
        let cached = match self.inner.cache.lookup_in_memory(&digest) {
            Lookup::Hot(data) => Some(data),
            Lookup::Absent => None,
            Lookup::OnDisk => {
                let cache = self.inner.cache.clone();
                match cpu(move || cache.get(&digest)).await? {
                    Ok(data) => data,
                    // A cache that cannot be read (disk error) costs a fetch, not the read.
                    Err(e) => {
                        cache_trouble(
                            &layer,
                            "reading a cached chunk failed; fetching it again",
                            &e,
                        );
                        None
                    }
                }
            }
        };
        // The size was checked above, but the entry may have been replaced since.
        if let Some(data) = cached.filter(|d| d.len() as u64 == chunk.size) {
            self.inner.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(data);
        }
        for attempt in 0..2 {
            let waited = std::time::Instant::now();
            // A fetch a process waits on: the background fill leaves the link to it.
            let on_demand = (priority == Priority::OnDemand
                && self.inner.blob.local_path().is_none())
            .then(crate::background::OnDemand::start);
            let compressed = self
                .inner
                .blob
                .read_at(chunk.blob_offset, chunk.blob_len, priority)
                .await
                .map_err(|source| ChunkError::Fetch {
                    layer,
                    offset: chunk.blob_offset,
                    source: Box::new(source),
                })?;
            if priority == Priority::OnDemand && self.inner.blob.local_path().is_none() {
                crate::metrics::observe_network_wait(waited.elapsed().as_secs_f64());
            }
            drop(on_demand);
            self.inner
                .stats
                .fetched_chunks
                .fetch_add(1, Ordering::Relaxed);
            self.inner
                .stats
                .fetched_bytes
                .fetch_add(compressed.len() as u64, Ordering::Relaxed);
            let compression = self.inner.compression;
            let c = *chunk;
            let cache = self.inner.cache.clone();
            // A local copy is itself the verified store of its chunks: they go to memory only.
            let local = self.is_local();
            let verified = cpu(move || -> Result<Option<Bytes>, ChunkError> {
                let data = decompress(compression, &compressed, &c).map_err(|detail| {
                    ChunkError::Corrupt {
                        layer,
                        offset: c.blob_offset,
                        detail,
                    }
                })?;
                if !digest.matches(&data) {
                    return Ok(None);
                }
                let data = Bytes::from(data);
                if local {
                    cache.remember(&digest, data.clone());
                } else if let Err(e) = cache.put(&digest, &data) {
                    // The bytes are verified: a cache that cannot keep them (disk full) costs
                    // a later refetch, never this read.
                    cache_trouble(
                        &layer,
                        "a verified chunk could not be cached; serving it from memory",
                        &e,
                    );
                }
                Ok(Some(data))
            })
            .await?;
            match verified {
                Ok(Some(data)) => return Ok(data),
                Ok(None) | Err(ChunkError::Corrupt { .. }) => {
                    self.inner
                        .stats
                        .digest_mismatches
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        layer = %layer,
                        chunk_offset = chunk.blob_offset,
                        chunk_digest = %digest,
                        attempt,
                        "chunk failed verification"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        tracing::error!(layer = %layer, chunk_offset = chunk.blob_offset, chunk_digest = %digest,
            "chunk failed verification twice; failing the read with EIO");
        Err(ChunkError::Digest {
            layer,
            offset: chunk.blob_offset,
            expected: Box::new(digest),
        })
    }

    /// Removes the loading entry of `key` if it is still the load `rx` belongs to (a later
    /// load of the same chunk keeps its own entry).
    fn release(&self, key: &LoadKey, rx: &watch::Receiver<Loaded>) {
        let mut loading = self.inner.loading.lock();
        if loading.get(key).is_some_and(|r| r.same_channel(rx)) {
            loading.remove(key);
        }
    }

    /// Fetches every chunk whose compressed data starts before `until` (the eStargz prefetch
    /// landmark): the files the workload needs first, in as few requests as possible.
    pub async fn prefetch(&self, until: u64) -> Result<(), ChunkError> {
        self.fill_range(until, Priority::Prefetch).await
    }

    /// Fetches every chunk not yet cached, at background priority, until the layer is fully
    /// local. Chunks that fail are logged and left for on-demand reads.
    pub async fn fill(&self) -> Result<(), ChunkError> {
        self.fill_range(u64::MAX, Priority::Background).await?;
        self.assemble_files().await;
        Ok(())
    }

    /// Writes a whole-file copy of every multi-chunk file (verified against the file digest
    /// from the TOC) into the cache, so FUSE passthrough can serve large files too. Needs
    /// every chunk cached; files without a digest are skipped.
    async fn assemble_files(&self) {
        let layer = self.inner.layer.clone();
        let cache = self.inner.cache.clone();
        let digest = self.digest();
        let work = move || {
            let mut done = 0usize;
            for id in 0..layer.len() as NodeId {
                let chunks = layer.chunks(id);
                let (Some(file_digest), true) = (layer.file_digest(id), chunks.len() > 1) else {
                    continue;
                };
                if cache.contains(file_digest) {
                    continue;
                }
                let size = layer.node(id).map_or(0, |n| n.size);
                let result = cache.put_with(file_digest, size, |w| {
                    for c in chunks {
                        let data = c
                            .digest
                            .and_then(|d| cache.get(&d).ok().flatten())
                            .ok_or_else(|| std::io::Error::other("chunk no longer cached"))?;
                        w.write_all(&data)?;
                    }
                    Ok(())
                });
                match result {
                    Ok(()) => done += 1,
                    Err(e) => tracing::warn!(layer = %digest, node = id, error = %e,
                        "could not assemble a whole-file copy; the file stays served by chunks"),
                }
            }
            done
        };
        match tokio::task::spawn_blocking(work).await {
            Ok(n) if n > 0 => {
                tracing::debug!(layer = %digest, files = n, "whole-file copies ready for passthrough")
            }
            _ => {}
        }
    }

    /// Fetches, at prefetch priority, the chunks of `files` in the order given (a recorded
    /// profile: what the workload opened first comes first); within a batch, requests merge.
    /// Nodes that are not regular files are skipped. While it runs, on-demand reads of the
    /// layer fetch no neighbours (the profile already names what comes next).
    pub async fn prefetch_files(&self, files: &[NodeId]) -> Result<(), ChunkError> {
        struct Guided<'a>(&'a AtomicUsize);
        impl Drop for Guided<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.inner.guided.fetch_add(1, Ordering::Relaxed);
        let _guided = Guided(&self.inner.guided);
        let mut seen = std::collections::HashSet::new();
        let chunks: Vec<Chunk> = files
            .iter()
            .flat_map(|&f| self.inner.layer.chunks(f))
            .filter(|c| seen.insert((c.blob_offset, c.inner_offset)))
            .copied()
            .collect();
        self.fetch_in_batches(chunks, Priority::Prefetch).await
    }

    async fn fill_range(&self, until: u64, priority: Priority) -> Result<(), ChunkError> {
        let mut chunks: Vec<Chunk> = self
            .inner
            .layer
            .all_chunks()
            .iter()
            .filter(|c| c.blob_offset < until)
            .copied()
            .collect();
        chunks.sort_by_key(|c| (c.blob_offset, c.inner_offset));
        chunks.dedup_by_key(|c| (c.blob_offset, c.inner_offset));
        self.fetch_in_batches(chunks, priority).await
    }

    /// Fetches `chunks` (those not cached), in the order given, in batches that merge into few
    /// requests. A prefetch runs its batches one after another at full speed; a background
    /// fill asks for its turn before each batch ([`crate::background::fill_turn`]: only while
    /// nothing anyone waits on is being fetched, and a bounded number of bytes in flight
    /// across the process) and keeps several batches in flight so it reaches line rate in the
    /// gaps it is given.
    async fn fetch_in_batches(
        &self,
        chunks: Vec<Chunk>,
        priority: Priority,
    ) -> Result<(), ChunkError> {
        let background = priority == Priority::Background;
        let (batch_limit, held_limit) = if background {
            (
                self.inner
                    .config
                    .fill_batch
                    .min(crate::background::IN_FLIGHT / 2),
                MAX_HELD_BYTES / 4,
            )
        } else {
            (self.inner.config.fill_batch, MAX_HELD_BYTES)
        };
        let mut batches: Vec<Vec<Chunk>> = Vec::new();
        let (mut batch, mut batch_bytes, mut batch_held) = (Vec::new(), 0u64, 0u64);
        for c in chunks {
            if c.digest.is_some_and(|d| self.inner.cache.contains(&d)) {
                self.inner
                    .stats
                    .filled_chunks
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            batch_bytes += c.blob_len;
            batch_held = batch_held.saturating_add(c.size);
            batch.push(c);
            if batch_bytes >= batch_limit || batch_held >= held_limit {
                batches.push(std::mem::take(&mut batch));
                (batch_bytes, batch_held) = (0, 0);
            }
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
        let rate = match priority {
            Priority::Background => self.inner.config.fill_rate.filter(|r| *r > 0),
            _ => None,
        };
        let started = std::time::Instant::now();
        let mut sent = 0u64;
        let mut first_error = None;
        let mut note = |this: &LayerSource, n: usize, result: Result<(), ChunkError>| {
            if let Err(e) = result {
                tracing::warn!(layer = %this.digest(), error = %e, ?priority, "fill: chunk failed");
                first_error.get_or_insert(e);
            }
            this.inner
                .stats
                .filled_chunks
                .fetch_add(n as u64, Ordering::Relaxed);
        };
        let mut running = tokio::task::JoinSet::new();
        for batch in batches {
            let bytes: u64 = batch.iter().map(|c| c.blob_len).sum();
            if let Some(rate) = rate {
                // Pace: do not start this batch before `sent` bytes would have taken at the
                // capped rate.
                let due = std::time::Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            sent += bytes;
            if !background {
                let result = self.fetch_batch(&batch, priority).await;
                note(self, batch.len(), result);
                continue;
            }
            let held: u64 = batch.iter().map(|c| c.size).sum();
            let turn = crate::background::fill_turn(bytes, held).await;
            while let Some(done) = running.try_join_next() {
                let (n, result) = joined(done);
                note(self, n, result);
            }
            let this = self.clone();
            running.spawn_on(
                async move {
                    let result = this.fetch_batch(&batch, priority).await;
                    drop(turn);
                    (batch.len(), result)
                },
                &self.inner.runtime,
            );
        }
        while let Some(done) = running.join_next().await {
            let (n, result) = joined(done);
            note(self, n, result);
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Fetches one batch of chunks together (their spans merge); the first error, if any.
    async fn fetch_batch(&self, batch: &[Chunk], priority: Priority) -> Result<(), ChunkError> {
        let results =
            futures::future::join_all(batch.iter().map(|c| self.chunk(c, priority))).await;
        results
            .into_iter()
            .find_map(Result::err)
            .map_or(Ok(()), Err)
    }

    /// Caches every chunk lying wholly inside `bytes` (blob bytes starting at `start`), e.g.
    /// the speculative tail read that found the TOC: for small layers that read covers the
    /// whole blob, and the layer is then complete without another request. Runs in the
    /// background, but the chunks it will cache are registered as loading first, so a prefetch
    /// or read of one of them waits for it instead of fetching the same bytes again; chunks
    /// that fail verification are released and fetched by whoever wants them.
    pub fn seed(&self, start: u64, bytes: Bytes) {
        let end = start.saturating_add(bytes.len() as u64);
        let mut claimed: Vec<(Chunk, LoadKey, watch::Sender<Loaded>)> = Vec::new();
        let mut claims: Vec<(LoadKey, watch::Receiver<Loaded>)> = Vec::new();
        {
            let mut loading = self.inner.loading.lock();
            for c in self.inner.layer.all_chunks() {
                let Some(digest) = c.digest else { continue };
                let key = (digest, c.size);
                if c.blob_offset < start
                    || c.blob_offset.saturating_add(c.blob_len) > end
                    || loading.contains_key(&key)
                    || self.inner.cache.contains(&digest)
                {
                    continue;
                }
                let (tx, rx) = watch::channel(None);
                loading.insert(key, rx.clone());
                claimed.push((*c, key, tx));
                claims.push((key, rx));
            }
        }
        if claimed.is_empty() {
            return;
        }
        // Every claim is released when its chunk is done, and all that are left when the work
        // ends in any other way (a panic included), so no reader waits on a dead entry.
        let release = ReleaseOnDrop {
            source: self.clone(),
            claims,
        };
        let work = move || {
            let this = &release.source;
            let mut seeded = 0u64;
            for (c, key, tx) in claimed {
                let unit = usize::try_from(c.blob_offset - start)
                    .ok()
                    .zip(usize::try_from(c.blob_len).ok())
                    .and_then(|(from, len)| bytes.get(from..from.checked_add(len)?));
                let verified = unit
                    .and_then(|unit| decompress(this.inner.compression, unit, &c).ok())
                    .filter(|data| key.0.matches(data));
                if let Some(data) = verified {
                    if this.inner.cache.put(&key.0, &data).is_ok() {
                        seeded += 1;
                    }
                    tx.send_replace(Some(Ok(Bytes::from(data))));
                }
                // Released either way; a waiter whose chunk failed sees the sender gone and
                // loads it itself.
                if let Some((_, rx)) = release.claims.iter().find(|(k, _)| *k == key) {
                    this.release(&key, rx);
                }
                drop(tx);
            }
            if seeded > 0 {
                tracing::debug!(layer = %this.digest(), chunks = seeded, "cached chunks from the TOC read");
            }
        };
        self.inner.runtime.spawn_blocking(work);
    }

    /// Whether the layer is served from a verified local copy of its blob (the whole-layer
    /// fallback) rather than from the registry.
    pub fn is_local(&self) -> bool {
        self.inner.blob.local_path().is_some()
    }

    /// Whether every chunk of the layer is stored on this node: in the cache, or in the local
    /// copy the layer is served from.
    pub fn is_complete(&self) -> bool {
        if self.is_local() {
            return true;
        }
        self.inner
            .layer
            .all_chunks()
            .iter()
            .all(|c| c.digest.is_some_and(|d| self.inner.cache.contains(&d)))
    }

    /// A local file with a regular file's complete, verified content, if one exists: a
    /// single-chunk file's content is exactly its cached chunk file (so most files can be
    /// served by FUSE passthrough without copying); a multi-chunk file has one once the
    /// background fill assembled it (by the file digest).
    pub fn backing_file(&self, node: NodeId) -> Option<std::path::PathBuf> {
        let chunks = self.inner.layer.chunks(node);
        let size = self.inner.layer.node(node)?.size;
        let digest = match chunks {
            [only] => only.digest?,
            [] => return None,
            _ => *self.inner.layer.file_digest(node)?,
        };
        // Only content of exactly the file's size stands for it (a digest the TOC reuses
        // with another size must not become the file).
        if self.inner.cache.size_of(&digest) != Some(size) {
            return None;
        }
        self.inner.cache.path_of(&digest)
    }

    /// Hands a read to the async engine and calls `done` with the result (the FUSE session
    /// thread never waits on the network).
    pub fn spawn_read(
        &self,
        node: NodeId,
        offset: u64,
        size: u32,
        done: Box<dyn FnOnce(Result<Bytes, i32>) + Send>,
    ) {
        let this = self.clone();
        self.inner.runtime.spawn(async move {
            let result = this
                .read(node, offset, u64::from(size), Priority::OnDemand)
                .await;
            done(result.map_err(|e| {
                tracing::warn!(layer = %this.digest(), node, offset, error = %e, "read failed");
                e.errno()
            }));
        });
    }
}

/// Logs a cache failure that the data path works around, at most once per 10 seconds (a full
/// disk fails every chunk), with how many were suppressed in between.
fn cache_trouble(layer: &Digest, what: &str, e: &lazypull_fetcher::cache::CacheError) {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if last.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(10)) {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    *last = Some(std::time::Instant::now());
    let suppressed = SUPPRESSED.swap(0, Ordering::Relaxed);
    tracing::warn!(layer = %layer, error = %e, suppressed, "chunk cache: {what}");
}

/// Removes a chunk from the loading table when its load ends (or is cancelled).
struct LoadGuard<'a> {
    source: &'a LayerSource,
    key: LoadKey,
    rx: watch::Receiver<Loaded>,
}

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        self.source.release(&self.key, &self.rx);
    }
}

/// Removes every chunk a seeding pass claimed from the loading table when the pass ends,
/// however it ends (a panic included).
struct ReleaseOnDrop {
    source: LayerSource,
    claims: Vec<(LoadKey, watch::Receiver<Loaded>)>,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        for (key, rx) in &self.claims {
            self.source.release(key, rx);
        }
    }
}

/// Decompresses one chunk from its compressed unit and cuts out its bytes.
fn decompress(compression: Compression, unit: &[u8], chunk: &Chunk) -> Result<Vec<u8>, String> {
    match compression {
        Compression::Gzip => cut(flate2::read::GzDecoder::new(unit), "gzip member", chunk),
        Compression::Zstd => {
            // A bounded window (the default limit, 128 MiB) keeps a hostile frame header from
            // making the decoder allocate more than a chunk could need.
            let dec =
                zstd::stream::read::Decoder::with_buffer(unit).map_err(|e| format!("zstd: {e}"))?;
            cut(dec, "zstd frame", chunk)
        }
    }
}

/// Skips `chunk.inner_offset` decompressed bytes, then reads exactly the chunk.
fn cut(mut dec: impl Read, unit_name: &str, chunk: &Chunk) -> Result<Vec<u8>, String> {
    if chunk.inner_offset > 0 {
        let skipped = std::io::copy(
            &mut (&mut dec).take(chunk.inner_offset),
            &mut std::io::sink(),
        )
        .map_err(|e| format!("{unit_name}: {e}"))?;
        if skipped != chunk.inner_offset {
            return Err(format!(
                "{unit_name} ends at {skipped}, before the chunk's inner offset {}",
                chunk.inner_offset
            ));
        }
    }
    // The layer model refuses larger chunks; checked again because this allocates.
    if chunk.size > crate::toc::MAX_CHUNK_SIZE {
        return Err(format!(
            "chunk of {} bytes exceeds the {}-byte limit",
            chunk.size,
            crate::toc::MAX_CHUNK_SIZE
        ));
    }
    let size = usize::try_from(chunk.size).map_err(|_| "chunk too large".to_string())?;
    let mut out = vec![0u8; size];
    dec.read_exact(&mut out)
        .map_err(|e| format!("{unit_name} shorter than the chunk's {size} bytes: {e}"))?;
    Ok(out)
}

impl crate::fuse::ContentSource for LayerSource {
    fn read(
        &self,
        node: NodeId,
        offset: u64,
        size: u32,
        done: Box<dyn FnOnce(Result<Bytes, i32>) + Send>,
    ) {
        self.spawn_read(node, offset, size, done);
    }

    fn backing_file(&self, node: NodeId) -> Option<std::path::PathBuf> {
        LayerSource::backing_file(self, node)
    }
}

/// The outcome of a fill batch task: a task that panicked or was cancelled is a failure of
/// its chunks, with the cause, not a success.
fn joined(
    done: Result<(usize, Result<(), ChunkError>), tokio::task::JoinError>,
) -> (usize, Result<(), ChunkError>) {
    done.unwrap_or_else(|e| (0, Err(ChunkError::Task(format!("fill batch: {e}")))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toc::{Entry, LayerBuilder};
    use lazypull_fetcher::CacheConfig;
    use std::time::Duration;

    /// A layer of one file whose only chunk is the gzip member `member` of a local blob, the
    /// chunk claiming `size` bytes with `digest`.
    fn one_file_source(
        dir: &std::path::Path,
        member: &[u8],
        size: u64,
        digest: Digest,
    ) -> (LayerSource, ChunkCache) {
        let blob_path = dir.join("blob");
        std::fs::write(&blob_path, member).unwrap();
        let blob = BlobReader::local(&blob_path, Digest::sha256_of(member)).unwrap();
        let cache = ChunkCache::open(dir.join("cache"), CacheConfig::default()).unwrap();
        let mut e = Entry::new("f", Kind::File);
        e.size = size;
        e.chunks.push(Chunk {
            file_offset: 0,
            size,
            blob_offset: 0,
            blob_len: member.len() as u64,
            inner_offset: 0,
            digest: Some(digest),
        });
        let mut b = LayerBuilder::new();
        b.add(e).unwrap();
        let source = LayerSource::new(
            Arc::new(b.build()),
            blob,
            cache.clone(),
            Compression::Gzip,
            SourceConfig::default(),
            tokio::runtime::Handle::current(),
        );
        (source, cache)
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_loader_that_died_does_not_leave_readers_spinning() {
        let dir = tempfile::tempdir().unwrap();
        let content = b"served after the dead loader".to_vec();
        let d = Digest::sha256_of(&content);
        let (source, _cache) =
            one_file_source(dir.path(), &gzip(&content), content.len() as u64, d);
        let f = source.layer().resolve("f").unwrap();
        // A loader that panicked: its entry stays, its sender is gone, no result was sent.
        let (tx, rx) = watch::channel(None);
        source
            .inner
            .loading
            .lock()
            .insert((d, content.len() as u64), rx);
        drop(tx);
        // On its own task, so a reader that spins (never yields) cannot stall the timeout.
        let reader = source.clone();
        let read = tokio::spawn(async move { reader.read(f, 0, 4096, Priority::OnDemand).await });
        let data = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("a reader spun on the dead loader's entry")
            .unwrap()
            .unwrap();
        assert_eq!(&data[..], &content[..]);
        assert!(source.inner.loading.lock().is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_cached_chunk_of_another_size_is_never_sliced_into_a_reply() {
        let dir = tempfile::tempdir().unwrap();
        // The cache holds the verified 12 bytes of digest `d`; this layer claims `d` for a
        // 4096-byte file (whose member really holds 4096 other bytes).
        let twelve = b"twelve bytes".to_vec();
        let d = Digest::sha256_of(&twelve);
        let other = vec![7u8; 4096];
        let (source, cache) = one_file_source(dir.path(), &gzip(&other), 4096, d);
        cache.put(&d, &twelve).unwrap();
        let f = source.layer().resolve("f").unwrap();
        for (offset, len) in [(0, 4096), (0, 5), (100, 10)] {
            let err = source
                .read(f, offset, len, Priority::OnDemand)
                .await
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    ChunkError::SizeConflict {
                        size: 4096,
                        actual: 12,
                        ..
                    }
                ),
                "{err:?}"
            );
            assert_eq!(err.errno(), libc::EIO);
        }
        // Passthrough is not offered the 12-byte file for the 4096-byte one either.
        assert_eq!(source.backing_file(f), None);
        // Without the conflicting entry, the chunk is fetched, fails its digest and is
        // refused: the member's bytes are never served under another digest.
        cache.remove(&d).unwrap();
        let err = source
            .read(f, 0, 4096, Priority::OnDemand)
            .await
            .unwrap_err();
        assert!(matches!(err, ChunkError::Digest { .. }), "{err:?}");
    }
}
