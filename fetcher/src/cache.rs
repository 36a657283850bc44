//! On-disk, content-addressed, verified chunk cache.
//!
//! Chunks are named by their digest, so identical chunks from different layers and images are
//! stored once, and a chunk enters the cache only after its bytes were hashed and matched its
//! digest: nothing unverified is ever served from here.
//!
//! # Layout
//! `<dir>/blobs/<algorithm>/<first 2 hex>/<full hex>` holds one file per chunk; `<dir>/tmp/` holds
//! temporary files being written. A chunk is written to a temporary file and renamed to its final
//! name, so readers never see a half-written file under a final name (barring the crash case
//! below). Prefix directories are created on demand and never removed, so creating one needs no
//! lock. One process owns a cache directory at a time.
//!
//! # Memory
//! The disk index (digest -> size, ordered by recency) lives in memory and is rebuilt on
//! [`ChunkCache::open`] by scanning `blobs/` (recency from file mtimes, which disk reads refresh
//! at most every ten minutes). A small hot set of chunk contents, bounded by
//! [`CacheConfig::memory_bytes`], serves repeated reads of the same chunk (a FUSE read is 128 KiB,
//! a chunk is often larger) without touching the disk. The hot set only holds chunks that are also
//! on disk.
//!
//! # Durability (fsync policy)
//! With `fsync = false` (the default) nothing is flushed. After a crash, a chunk file may exist
//! under its final name with truncated or garbage contents only if the filesystem persisted the
//! rename before the data. With `verify_on_read` (the default) every disk read is re-hashed, so
//! such a file is detected, deleted and counted as a corruption, and [`ChunkCache::get`] returns
//! `None` so the caller refetches it: a crash costs refetches, never wrong bytes.
//! With `fsync = true` the temporary file is fsynced before the rename and its directory after,
//! so a chunk that [`ChunkCache::put`] reported stored survives power loss.
//!
//! # Concurrency
//! One mutex guards the index, the hot set and the counters. Hashing, writing and reading chunk
//! data happen outside it; the rename that publishes a chunk and the unlinks that evict chunks
//! happen under it, so the index and the files in `blobs/` always agree (`used_bytes` is the sum
//! of the sizes of the files). Each published file gets a generation number, so a reader that
//! finds corrupt data deletes the file only if it is still the one it read.
//! The API is synchronous `std::fs`; async callers use `spawn_blocking`.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;
use tracing::{debug, warn};

use crate::digest::{Algorithm, Digest, Verifier};

/// A disk read refreshes the file's mtime (the recency kept across restarts) only when it is
/// older than this, so hot chunks do not cost a metadata write per read.
const TOUCH_INTERVAL: Duration = Duration::from_secs(600);

/// Why a cache operation failed. Messages name the file or chunk and the OS error, because a
/// cache error usually means a full or broken disk that an operator has to find.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A filesystem operation on the cache directory failed.
    #[error("chunk cache: cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done ("create directory", "read", "remove", ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Writing a chunk failed (ENOSPC, EIO...); the temporary file was removed and the index is
    /// unchanged.
    #[error("chunk cache: cannot store chunk {digest} at {}: {source}", path.display())]
    Store {
        /// The chunk being stored.
        digest: Digest,
        /// The temporary or final file involved.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The data given to [`ChunkCache::put`] does not hash to its digest; nothing was written.
    /// (Digests are boxed: a `Digest` is 65 bytes and errors should stay small.)
    #[error("chunk cache: refusing to store chunk: data hashes to {actual}, expected {expected}")]
    DigestMismatch {
        /// The digest the caller claimed.
        expected: Box<Digest>,
        /// The digest of the data actually given.
        actual: Box<Digest>,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Cache tuning. Sizes are budgets, not preallocations.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Bytes of chunk data kept on disk; least-recently-used chunks are evicted beyond it.
    pub budget_bytes: u64,
    /// Bytes of chunk data kept in the in-memory hot set (0 disables it).
    pub memory_bytes: u64,
    /// Re-hash chunks read from disk, so a file damaged by a crash or a bad disk is refetched
    /// instead of served.
    pub verify_on_read: bool,
    /// fsync each chunk and its directory so stored chunks survive power loss (slower writes).
    pub fsync: bool,
}

impl Default for CacheConfig {
    /// 10 GiB on disk, 64 MiB in memory, verify reads, no fsync (see the module docs).
    fn default() -> Self {
        CacheConfig {
            budget_bytes: 10 << 30,
            memory_bytes: 64 << 20,
            verify_on_read: true,
            fsync: false,
        }
    }
}

/// A snapshot of the cache's size and counters, for metrics and `lazypull` status output.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Bytes of chunk files on disk.
    pub used_bytes: u64,
    /// The configured disk budget.
    pub budget_bytes: u64,
    /// Chunks on disk.
    pub entries: u64,
    /// Bytes held by the in-memory hot set.
    pub memory_bytes: u64,
    /// `get` calls that returned data (from memory or disk).
    pub hits: u64,
    /// The subset of `hits` served from the hot set.
    pub memory_hits: u64,
    /// `get` calls that returned `None` (absent, vanished or corrupt).
    pub misses: u64,
    /// Chunks newly written to disk.
    pub inserts: u64,
    /// Chunks evicted to stay within the budget.
    pub evictions: u64,
    /// Chunk files whose contents no longer matched their digest (deleted on detection).
    pub corruptions: u64,
}

/// What [`ChunkCache::lookup_in_memory`] can tell without touching the disk.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// The verified bytes, from the hot set.
    Hot(Bytes),
    /// Not cached: fetch it.
    Absent,
    /// Cached on disk only: read it with [`ChunkCache::get`].
    OnDisk,
}

/// Content-addressed store of verified chunks with a disk budget and an in-memory hot set.
/// Cheap to clone (shared state) and safe to use from many threads.
#[derive(Clone)]
pub struct ChunkCache {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    blobs: PathBuf,
    tmp: PathBuf,
    config: CacheConfig,
    state: Mutex<State>,
}

#[derive(Clone, Copy)]
struct Entry {
    size: u64,
    /// Identifies the file currently published under the chunk's name.
    generation: u64,
}

struct State {
    index: LruCache<Digest, Entry>,
    hot: LruCache<Digest, Bytes>,
    used: u64,
    hot_bytes: u64,
    next_generation: u64,
    stats: CacheStats,
}

impl State {
    fn new() -> Self {
        State {
            index: LruCache::unbounded(),
            hot: LruCache::unbounded(),
            used: 0,
            hot_bytes: 0,
            next_generation: 0,
            stats: CacheStats::default(),
        }
    }

    fn insert(&mut self, digest: Digest, size: u64) {
        let generation = self.next_generation;
        self.next_generation += 1;
        self.index.put(digest, Entry { size, generation });
        self.used += size;
    }

    /// The hot-set copy of a chunk, counted as a memory hit and made most recent in both the
    /// hot set and the index.
    fn hot_hit(&mut self, digest: &Digest) -> Option<Bytes> {
        let data = self.hot.get(digest).cloned()?;
        self.index.promote(digest);
        self.stats.hits += 1;
        self.stats.memory_hits += 1;
        Some(data)
    }

    /// Marks a chunk as just used; true if present.
    fn touch(&mut self, digest: &Digest) -> bool {
        let present = self.index.get(digest).is_some();
        self.hot.promote(digest);
        present
    }

    /// Whether the file published as `generation` is still the chunk's file.
    fn is_current(&self, digest: &Digest, generation: u64) -> bool {
        self.index.peek(digest).map(|e| e.generation) == Some(generation)
    }

    fn hot_remove(&mut self, digest: &Digest) {
        if let Some(old) = self.hot.pop(digest) {
            self.hot_bytes -= old.len() as u64;
        }
    }

    fn hot_insert(&mut self, digest: Digest, data: Bytes, limit: u64) {
        let len = data.len() as u64;
        if limit == 0 || len > limit {
            return;
        }
        if let Some(old) = self.hot.put(digest, data) {
            self.hot_bytes -= old.len() as u64;
        }
        self.hot_bytes += len;
        while self.hot_bytes > limit {
            match self.hot.pop_lru() {
                Some((_, old)) => self.hot_bytes -= old.len() as u64,
                None => break,
            }
        }
    }

    /// Drops a chunk from the index and the hot set (the caller deals with the file).
    fn forget(&mut self, digest: &Digest) -> Option<Entry> {
        let entry = self.index.pop(digest)?;
        self.used -= entry.size;
        self.hot_remove(digest);
        Some(entry)
    }

    /// Unlinks least-recently-used chunks until `used <= budget`, never `keep`.
    fn evict(&mut self, inner: &Inner, keep: Option<&Digest>) {
        while self.used > inner.config.budget_bytes {
            let Some((digest, entry)) = self.index.pop_lru() else {
                break;
            };
            if Some(&digest) == keep {
                // Only possible if it is the sole entry; it fits the budget by construction.
                self.index.put(digest, entry);
                break;
            }
            self.used -= entry.size;
            self.hot_remove(&digest);
            self.stats.evictions += 1;
            let path = inner.blob_path(&digest);
            match remove_if_exists(&path) {
                Ok(()) => debug!(%digest, size = entry.size, "evicted chunk"),
                // The bytes stay on disk unaccounted until the next open rescans.
                Err(e) => warn!(%digest, path = %path.display(), error = %e, "cannot evict chunk"),
            }
        }
    }
}

impl Inner {
    fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blobs
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }
}

/// Passes writes through while hashing them.
struct HashingWriter<'a> {
    inner: &'a mut dyn Write,
    verifier: crate::digest::Verifier,
    written: u64,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.verifier.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn hash(algorithm: Algorithm, data: &[u8]) -> Digest {
    let mut v = Verifier::new(algorithm);
    v.update(data);
    v.finish()
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn sync_dir(path: &Path) -> Result<(), CacheError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", path))
}

/// Reads a chunk file, refreshing its mtime when stale (recency across restarts).
fn read_chunk(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    let meta = file.metadata()?;
    let mut data = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.read_to_end(&mut data)?;
    let now = SystemTime::now();
    let stale = meta
        .modified()
        .ok()
        .and_then(|m| now.duration_since(m).ok())
        .is_some_and(|age| age > TOUCH_INTERVAL);
    if stale {
        if let Err(e) = file.set_modified(now) {
            debug!(path = %path.display(), error = %e, "cannot refresh chunk mtime");
        }
    }
    Ok(data)
}

/// Every chunk file under `blobs/`, as (digest, size, mtime).
fn scan(blobs: &Path) -> Result<Vec<(Digest, u64, SystemTime)>, CacheError> {
    let mut found = Vec::new();
    for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
        let alg_dir = blobs.join(algorithm.as_str());
        if !alg_dir.is_dir() {
            continue;
        }
        for prefix in fs::read_dir(&alg_dir).map_err(io_err("list", &alg_dir))? {
            let prefix = prefix.map_err(io_err("list", &alg_dir))?;
            let prefix_path = prefix.path();
            if !prefix_path.is_dir() {
                continue;
            }
            for file in fs::read_dir(&prefix_path).map_err(io_err("list", &prefix_path))? {
                let file = file.map_err(io_err("list", &prefix_path))?;
                let path = file.path();
                let meta = file.metadata().map_err(io_err("stat", &path))?;
                let name = file.file_name();
                let name = name.to_string_lossy();
                let digest = format!("{}:{name}", algorithm.as_str()).parse::<Digest>();
                match digest {
                    Ok(d) if meta.is_file() && prefix.file_name().to_str() == name.get(..2) => {
                        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                        found.push((d, meta.len(), mtime));
                    }
                    _ => warn!(path = %path.display(), "ignoring unexpected file in chunk cache"),
                }
            }
        }
    }
    Ok(found)
}

impl ChunkCache {
    /// Opens (creating if needed) the cache in `dir`: removes temporary files left by a crash,
    /// rebuilds the index from the chunk files (oldest mtime = least recently used) and evicts
    /// down to the budget, so a restarted daemon keeps serving what it fetched before.
    pub fn open(dir: impl AsRef<Path>, config: CacheConfig) -> Result<Self, CacheError> {
        let dir = dir.as_ref().to_path_buf();
        let blobs = dir.join("blobs");
        let tmp = dir.join("tmp");
        for d in [&dir, &blobs, &tmp] {
            fs::create_dir_all(d).map_err(io_err("create directory", d))?;
        }
        for entry in fs::read_dir(&tmp).map_err(io_err("list", &tmp))? {
            let entry = entry.map_err(io_err("list", &tmp))?;
            let path = entry.path();
            let removed = match entry.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
                _ => fs::remove_file(&path),
            };
            match removed {
                Ok(()) => debug!(path = %path.display(), "removed stale temporary file"),
                Err(e) => warn!(path = %path.display(), error = %e, "cannot remove stale file"),
            }
        }
        let mut found = scan(&blobs)?;
        found.sort_by(|a, b| a.2.cmp(&b.2).then(a.0.cmp(&b.0)));
        let mut state = State::new();
        for (digest, size, _) in found {
            state.insert(digest, size);
        }
        let inner = Inner {
            dir,
            blobs,
            tmp,
            config,
            state: Mutex::new(State::new()),
        };
        state.evict(&inner, None);
        *inner.state.lock() = state;
        debug!(dir = %inner.dir.display(), "chunk cache opened");
        Ok(ChunkCache {
            inner: Arc::new(inner),
        })
    }

    /// Returns a chunk's verified bytes, or `None` if absent, so the caller fetches it. A disk
    /// file that no longer matches its digest (crash, bad disk) is deleted and reported as `None`
    /// rather than served. Errors are reserved for unreadable files (EIO, EACCES).
    pub fn get(&self, digest: &Digest) -> Result<Option<Bytes>, CacheError> {
        let inner = &*self.inner;
        let generation = {
            let mut st = inner.state.lock();
            if let Some(data) = st.hot_hit(digest) {
                return Ok(Some(data));
            }
            match st.index.get(digest) {
                Some(e) => e.generation,
                None => {
                    st.stats.misses += 1;
                    return Ok(None);
                }
            }
        };
        let path = inner.blob_path(digest);
        let data = match read_chunk(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Evicted meanwhile, or deleted behind our back: drop it if it is still ours.
                let mut st = inner.state.lock();
                if st.is_current(digest, generation) {
                    warn!(%digest, path = %path.display(), "chunk file vanished");
                    st.forget(digest);
                }
                st.stats.misses += 1;
                return Ok(None);
            }
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        if inner.config.verify_on_read && !digest.matches(&data) {
            let mut st = inner.state.lock();
            if st.is_current(digest, generation) {
                remove_if_exists(&path).map_err(io_err("remove corrupt chunk", &path))?;
                st.forget(digest);
            }
            st.stats.corruptions += 1;
            st.stats.misses += 1;
            warn!(%digest, path = %path.display(), "corrupt chunk file deleted; it will be refetched");
            return Ok(None);
        }
        let data = Bytes::from(data);
        let mut st = inner.state.lock();
        st.stats.hits += 1;
        if st.is_current(digest, generation) {
            st.hot_insert(*digest, data.clone(), inner.config.memory_bytes);
        }
        Ok(Some(data))
    }

    /// Answers from memory alone: the hot-set copy, [`Lookup::Absent`] (counted as a miss), or
    /// [`Lookup::OnDisk`] when only [`ChunkCache::get`] (a file read) can tell. Async callers use
    /// it to skip a trip to a blocking thread for most lookups, so the misses of one read reach
    /// the blob reader together and their ranges merge into few requests.
    pub fn lookup_in_memory(&self, digest: &Digest) -> Lookup {
        let mut st = self.inner.state.lock();
        if let Some(data) = st.hot_hit(digest) {
            return Lookup::Hot(data);
        }
        if st.index.contains(digest) {
            return Lookup::OnDisk;
        }
        st.stats.misses += 1;
        Lookup::Absent
    }

    /// Stores a chunk after checking `data` against `digest` (a mismatch is an error and writes
    /// nothing). Storing a chunk that is already present only refreshes its recency, which is how
    /// identical chunks from different layers end up stored once. Evicts least-recently-used
    /// chunks (never this one) to stay within the budget; a chunk larger than the whole budget is
    /// silently not stored. On a write error the temporary file is removed and the index is
    /// unchanged.
    pub fn put(&self, digest: &Digest, data: &[u8]) -> Result<(), CacheError> {
        let actual = hash(digest.algorithm(), data);
        if actual != *digest {
            return Err(CacheError::DigestMismatch {
                expected: Box::new(*digest),
                actual: Box::new(actual),
            });
        }
        let size = data.len() as u64;
        let hot = (size <= self.inner.config.memory_bytes).then(|| Bytes::copy_from_slice(data));
        self.store(digest, size, hot, |w| w.write_all(data))
    }

    /// Keeps a chunk the caller has verified in the memory hot set only, never on disk: for
    /// content that already has a durable verified copy elsewhere (a whole-fetched layer's
    /// local copy), where a second copy in the cache would cost a hash, a write and the disk
    /// space of the layer again. Repeated reads of the chunk (a FUSE read is 128 KiB of a chunk
    /// of up to 4 MiB) are then served from memory.
    pub fn remember(&self, digest: &Digest, data: Bytes) {
        let mut st = self.inner.state.lock();
        st.hot_insert(*digest, data, self.inner.config.memory_bytes);
    }

    /// Stores content too large to hold in memory (a whole file assembled from its chunks, for
    /// FUSE passthrough): `write` streams exactly `size` bytes into the cache's temporary file,
    /// which is hashed on the way and published under `digest` only if it matches. Same rules
    /// as [`ChunkCache::put`] otherwise; the content does not enter the memory hot set.
    pub fn put_with(
        &self,
        digest: &Digest,
        size: u64,
        write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<(), CacheError> {
        let mut verified = None;
        let result = self.store(digest, size, None, |w| {
            let mut hashing = HashingWriter {
                inner: w,
                verifier: crate::digest::Verifier::new(digest.algorithm()),
                written: 0,
            };
            write(&mut hashing)?;
            verified = Some((hashing.verifier.finish(), hashing.written));
            match verified {
                Some((actual, n)) if actual == *digest && n == size => Ok(()),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "digest mismatch",
                )),
            }
        });
        match (result, verified) {
            (Err(CacheError::Store { .. }), Some((actual, _))) if actual != *digest => {
                Err(CacheError::DigestMismatch {
                    expected: Box::new(*digest),
                    actual: Box::new(actual),
                })
            }
            (r, _) => r,
        }
    }

    /// Writes content to a temporary file with `write`, then publishes it under `digest`
    /// (the caller has verified, or `write` verifies and fails).
    fn store(
        &self,
        digest: &Digest,
        size: u64,
        hot: Option<Bytes>,
        write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<(), CacheError> {
        let inner = &*self.inner;
        if size > inner.config.budget_bytes {
            debug!(%digest, size, budget = inner.config.budget_bytes, "chunk larger than cache budget; not stored");
            return Ok(());
        }
        if inner.state.lock().touch(digest) {
            return Ok(());
        }
        let final_path = inner.blob_path(digest);
        let parent = final_path.parent().unwrap_or(&inner.blobs).to_path_buf();
        fs::create_dir_all(&parent).map_err(io_err("create directory", &parent))?;
        let store_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CacheError::Store {
                digest: *digest,
                path,
                source,
            }
        };
        // Dropping `tmp` on any error path removes the temporary file.
        let mut tmp = tempfile::Builder::new()
            .prefix("chunk-")
            .tempfile_in(&inner.tmp)
            .map_err(store_err(&inner.tmp))?;
        {
            let mut out = io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
            write(&mut out).map_err(store_err(&inner.tmp))?;
            out.flush().map_err(store_err(&inner.tmp))?;
        }
        if inner.config.fsync {
            tmp.as_file().sync_all().map_err(store_err(tmp.path()))?;
        }
        let file = {
            let mut st = inner.state.lock();
            if st.touch(digest) {
                // Another thread published it while we were writing; ours is dropped below.
                drop(st);
                drop(tmp);
                return Ok(());
            }
            let file = tmp.persist(&final_path).map_err(|e| CacheError::Store {
                digest: *digest,
                path: final_path.clone(),
                source: e.error,
            })?;
            st.insert(*digest, size);
            st.stats.inserts += 1;
            if let Some(hot) = hot {
                st.hot_insert(*digest, hot, inner.config.memory_bytes);
            }
            st.evict(inner, Some(digest));
            file
        };
        drop(file);
        if inner.config.fsync {
            sync_dir(&parent)?;
        }
        Ok(())
    }

    /// Whether the chunk is on disk, without reading it or changing its recency (for planning
    /// fetches and prefetch).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.inner.state.lock().index.contains(digest)
    }

    /// Size of a cached chunk, if present. A digest names one content, so a caller that
    /// expects another size holds an inconsistent description and must not use the chunk.
    pub fn size_of(&self, digest: &Digest) -> Option<u64> {
        self.inner.state.lock().index.peek(digest).map(|e| e.size)
    }

    /// Deletes a chunk; returns whether it was present. For explicit pruning and for callers
    /// that found a chunk unusable.
    pub fn remove(&self, digest: &Digest) -> Result<bool, CacheError> {
        let inner = &*self.inner;
        let mut st = inner.state.lock();
        if !st.index.contains(digest) {
            return Ok(false);
        }
        let path = inner.blob_path(digest);
        remove_if_exists(&path).map_err(io_err("remove", &path))?;
        st.forget(digest);
        Ok(true)
    }

    /// Deletes every chunk `keep` does not want; returns how many and their bytes. For
    /// `prune --all`, which keeps only what mounted layers can still read.
    pub fn retain(&self, keep: impl Fn(&Digest) -> bool) -> Result<(usize, u64), CacheError> {
        let inner = &*self.inner;
        let mut st = inner.state.lock();
        let doomed: Vec<(Digest, u64)> = st
            .index
            .iter()
            .filter(|(d, _)| !keep(d))
            .map(|(d, e)| (*d, e.size))
            .collect();
        let (mut count, mut bytes) = (0, 0);
        for (digest, size) in doomed {
            let path = inner.blob_path(&digest);
            remove_if_exists(&path).map_err(io_err("remove", &path))?;
            st.forget(&digest);
            count += 1;
            bytes += size;
        }
        Ok((count, bytes))
    }

    /// The backing file of a present chunk (refreshing its recency), so a fully cached file can
    /// be served by FUSE passthrough. The file may be evicted later; an fd opened on it stays
    /// valid, but open it promptly.
    pub fn path_of(&self, digest: &Digest) -> Option<PathBuf> {
        let mut st = self.inner.state.lock();
        st.index.get(digest)?;
        Some(self.inner.blob_path(digest))
    }

    /// Current sizes and counters, for metrics.
    pub fn stats(&self) -> CacheStats {
        let st = self.inner.state.lock();
        CacheStats {
            used_bytes: st.used,
            budget_bytes: self.inner.config.budget_bytes,
            entries: st.index.len() as u64,
            memory_bytes: st.hot_bytes,
            ..st.stats.clone()
        }
    }

    /// The cache directory, for logs and status output.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn cfg(budget_bytes: u64, memory_bytes: u64) -> CacheConfig {
        let verify_on_read = true;
        CacheConfig {
            budget_bytes,
            memory_bytes,
            verify_on_read,
            fsync: false,
        }
    }

    fn chunk(seed: u8, len: usize) -> (Digest, Vec<u8>) {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        (Digest::sha256_of(&data), data)
    }

    /// Every file under `dir` (recursively) with its size.
    fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
        let (mut out, mut stack) = (Vec::new(), vec![dir.to_path_buf()]);
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap().map(Result::unwrap) {
                let meta = e.metadata().unwrap();
                if meta.is_dir() {
                    stack.push(e.path());
                } else {
                    out.push((e.path(), meta.len()));
                }
            }
        }
        out
    }

    /// used_bytes and entries match the files really on disk, within budget.
    fn assert_consistent(cache: &ChunkCache) {
        let files = files_under(&cache.dir().join("blobs"));
        let s = cache.stats();
        assert_eq!(s.used_bytes, files.iter().map(|f| f.1).sum::<u64>());
        assert_eq!(s.entries, files.len() as u64);
        assert!(
            s.used_bytes <= s.budget_bytes && s.memory_bytes <= cache.inner.config.memory_bytes
        );
    }

    #[test]
    fn put_get_remove_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), cfg(1 << 20, 0)).unwrap();
        let (d, data) = chunk(1, 1000);
        assert_eq!(cache.get(&d).unwrap(), None);
        cache.put(&d, &data).unwrap();
        assert!(cache.contains(&d));
        assert_eq!(cache.get(&d).unwrap().unwrap(), data);
        let path = cache.path_of(&d).unwrap();
        let hex = d.hex();
        assert!(path.ends_with(format!("blobs/sha256/{}/{hex}", &hex[..2])));
        assert_eq!(fs::read(&path).unwrap(), data);
        let s = cache.stats();
        assert_eq!((s.hits, s.misses, s.inserts, s.entries), (1, 1, 1, 1));
        assert_consistent(&cache);
        assert!(cache.remove(&d).unwrap());
        assert!(!cache.remove(&d).unwrap());
        assert!(!path.exists() && cache.path_of(&d).is_none());
        assert_eq!(cache.stats().used_bytes, 0);
    }

    #[test]
    fn retain_deletes_what_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), cfg(1 << 20, 1 << 20)).unwrap();
        let chunks: Vec<_> = (0..4).map(|i| chunk(i, 100 + i as usize)).collect();
        for (d, data) in &chunks {
            cache.put(d, data).unwrap();
        }
        let kept = chunks[1].0;
        let (count, bytes) = cache.retain(|d| *d == kept).unwrap();
        assert_eq!((count, bytes), (3, 100 + 102 + 103));
        assert!(cache.contains(&kept));
        for (d, _) in chunks.iter().filter(|(d, _)| *d != kept) {
            assert!(!cache.contains(d) && cache.get(d).unwrap().is_none());
        }
        assert_eq!(cache.stats().used_bytes, 101);
        assert_consistent(&cache);
        // Reopened from disk: the deleted chunks are gone there too.
        drop(cache);
        let cache = ChunkCache::open(dir.path(), cfg(1 << 20, 0)).unwrap();
        assert_eq!(cache.stats().entries, 1);
    }

    #[test]
    fn memory_lookup_tells_hot_absent_and_on_disk_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (d, data) = chunk(4, 1000);
        let hot = ChunkCache::open(dir.path().join("hot"), cfg(1 << 20, 1 << 20)).unwrap();
        assert!(matches!(hot.lookup_in_memory(&d), Lookup::Absent));
        hot.put(&d, &data).unwrap();
        match hot.lookup_in_memory(&d) {
            Lookup::Hot(got) => assert_eq!(got, data),
            other => panic!("expected a hot-set hit, got {other:?}"),
        }
        let s = hot.stats();
        assert_eq!((s.hits, s.memory_hits, s.misses), (1, 1, 1));
        let cold = ChunkCache::open(dir.path().join("cold"), cfg(1 << 20, 0)).unwrap();
        cold.put(&d, &data).unwrap();
        assert!(matches!(cold.lookup_in_memory(&d), Lookup::OnDisk));
        assert_eq!(cold.get(&d).unwrap().unwrap(), data);
    }

    #[test]
    fn remembered_chunks_are_served_from_memory_and_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let (d, data) = chunk(5, 1000);
        let cache = ChunkCache::open(dir.path(), cfg(1 << 20, 1 << 20)).unwrap();
        cache.remember(&d, Bytes::from(data.clone()));
        match cache.lookup_in_memory(&d) {
            Lookup::Hot(got) => assert_eq!(got, data),
            other => panic!("expected a hot-set hit, got {other:?}"),
        }
        assert_eq!(cache.get(&d).unwrap().unwrap(), data);
        assert!(!cache.contains(&d) && cache.path_of(&d).is_none());
        assert!(files_under(&cache.dir().join("blobs")).is_empty());
        assert_eq!(cache.stats().entries, 0);
        // Without a memory budget nothing is kept at all.
        let cold = ChunkCache::open(dir.path().join("cold"), cfg(1 << 20, 0)).unwrap();
        cold.remember(&d, Bytes::from(data));
        assert!(matches!(cold.lookup_in_memory(&d), Lookup::Absent));
    }

    #[test]
    fn same_chunk_from_two_layers_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), CacheConfig::default()).unwrap();
        let (d, data) = chunk(2, 4096);
        cache.put(&d, &data).unwrap();
        cache.put(&d, &data).unwrap();
        assert_eq!(files_under(&dir.path().join("blobs")).len(), 1);
        let s = cache.stats();
        assert_eq!((s.used_bytes, s.entries, s.inserts), (4096, 1, 1));
        assert!(files_under(&dir.path().join("tmp")).is_empty());
    }

    #[test]
    fn put_with_streams_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), cfg(1 << 30, 0)).unwrap();
        let (d, data) = chunk(9, 3 << 20);
        cache
            .put_with(&d, data.len() as u64, |w| {
                for piece in data.chunks(100_000) {
                    w.write_all(piece)?;
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(&cache.get(&d).unwrap().unwrap()[..], &data[..]);
        let (d2, _) = chunk(10, 1000);
        let err = cache
            .put_with(&d2, 4, |w| w.write_all(b"evil"))
            .unwrap_err();
        assert!(matches!(err, CacheError::DigestMismatch { .. }), "{err}");
        assert!(!cache.contains(&d2));
        assert_consistent(&cache);
        assert!(files_under(&dir.path().join("tmp")).is_empty());
    }

    #[test]
    fn wrong_digest_is_rejected_and_nothing_written() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), CacheConfig::default()).unwrap();
        let (d, mut data) = chunk(3, 100);
        data[0] ^= 1;
        match cache.put(&d, &data) {
            Err(CacheError::DigestMismatch { expected, actual }) => {
                assert_eq!((*expected, *actual), (d, Digest::sha256_of(&data)));
            }
            other => panic!("expected mismatch, got {other:?}"),
        }
        assert!(files_under(dir.path()).is_empty());
        assert!(!cache.contains(&d));
        assert_eq!(cache.stats().inserts, 0);
    }

    #[test]
    fn eviction_is_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), cfg(300, 1 << 20)).unwrap();
        let [a, b, c, d] = [1, 2, 3, 4].map(|s| chunk(s, 100));
        for (dg, data) in [&a, &b, &c] {
            cache.put(dg, data).unwrap();
        }
        assert_eq!(cache.get(&a.0).unwrap().unwrap(), a.1);
        cache.put(&d.0, &d.1).unwrap();
        assert!(cache.contains(&a.0) && cache.contains(&c.0) && cache.contains(&d.0));
        assert!(!cache.contains(&b.0));
        assert_eq!(cache.get(&b.0).unwrap(), None);
        let s = cache.stats();
        assert_eq!((s.used_bytes, s.evictions), (300, 1));
        assert_consistent(&cache);
        // A chunk larger than the whole budget is not stored and evicts nothing.
        let big = chunk(5, 301);
        cache.put(&big.0, &big.1).unwrap();
        assert!(!cache.contains(&big.0));
        assert_eq!(cache.stats().entries, 3);
    }

    #[test]
    fn corrupt_file_detected_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), cfg(1 << 20, 0)).unwrap();
        let (d, data) = chunk(6, 512);
        cache.put(&d, &data).unwrap();
        let path = cache.path_of(&d).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        bytes[100] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(cache.get(&d).unwrap(), None);
        let s = cache.stats();
        assert_eq!((s.corruptions, s.used_bytes, s.entries), (1, 0, 0));
        assert!(!path.exists() && !cache.contains(&d));
        cache.put(&d, &data).unwrap(); // refetched
        assert_eq!(cache.get(&d).unwrap().unwrap(), data);
    }

    #[test]
    fn reopen_serves_chunks_keeps_mtime_recency_and_cleans_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<_> = (0..5)
            .map(|i| chunk(10 + i, 200 + usize::from(i)))
            .collect();
        let cache = ChunkCache::open(dir.path(), CacheConfig::default()).unwrap();
        for (d, data) in &chunks {
            cache.put(d, data).unwrap();
        }
        let before = cache.stats();
        drop(cache);
        fs::write(dir.path().join("tmp/chunk-stale"), b"half written").unwrap();
        fs::create_dir(dir.path().join("tmp/stale-dir")).unwrap();
        let cache = ChunkCache::open(dir.path(), cfg(1 << 20, 0)).unwrap();
        assert!(fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .next()
            .is_none());
        let after = cache.stats();
        assert_eq!((after.used_bytes, after.entries), (before.used_bytes, 5));
        for (d, data) in &chunks {
            assert_eq!(cache.get(d).unwrap().unwrap(), *data);
        }
        assert_consistent(&cache);
        // Age the files, chunk 0 oldest, then read only chunk 0: that refreshes its mtime.
        let now = SystemTime::now();
        for (i, (d, _)) in chunks.iter().enumerate() {
            let age = if i == 0 { 7200 } else { 3600 + 60 * i as u64 };
            let f = File::options().write(true).open(cache.path_of(d).unwrap());
            f.unwrap()
                .set_modified(now - Duration::from_secs(age))
                .unwrap();
        }
        drop(cache);
        let cache = ChunkCache::open(dir.path(), cfg(1 << 20, 0)).unwrap();
        assert_eq!(cache.get(&chunks[0].0).unwrap().unwrap(), chunks[0].1);
        drop(cache);
        // Reopening with a smaller budget keeps the two most recent: 0 (read) and 1 (youngest).
        let cache = ChunkCache::open(dir.path(), cfg(450, 0)).unwrap();
        assert_eq!(cache.stats().entries, 2);
        assert!(cache.contains(&chunks[0].0) && cache.contains(&chunks[1].0));
        assert_consistent(&cache);
    }

    #[test]
    fn concurrent_puts_and_gets_stay_consistent() {
        for budget in [1 << 20, 2000] {
            let dir = tempfile::tempdir().unwrap();
            let cache = ChunkCache::open(dir.path(), cfg(budget, 1000)).unwrap();
            let chunks: Arc<Vec<_>> = Arc::new(
                (0..24)
                    .map(|i| chunk(i, 50 + 37 * usize::from(i)))
                    .collect(),
            );
            let threads: Vec<_> = (0..8)
                .map(|t| {
                    let (cache, chunks) = (cache.clone(), Arc::clone(&chunks));
                    std::thread::spawn(move || {
                        for round in 0..200 {
                            let (d, data) = &chunks[(t * 7 + round * 5) % chunks.len()];
                            cache.put(d, data).unwrap();
                            let (d, data) = &chunks[(t + round * 3) % chunks.len()];
                            if let Some(got) = cache.get(d).unwrap() {
                                assert_eq!(got, *data);
                            }
                            if round % 50 == 49 {
                                cache.remove(d).unwrap();
                            }
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert_consistent(&cache);
            if budget == 1 << 20 {
                for (d, data) in chunks.iter() {
                    cache.put(d, data).unwrap();
                }
                assert_eq!(cache.stats().entries, chunks.len() as u64);
                assert_consistent(&cache);
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(usize),
        Get(usize),
        Remove(usize),
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn random_ops_keep_invariants(
            sizes in proptest::collection::vec(0usize..260, 8),
            ops in proptest::collection::vec(prop_oneof![
                3 => (0..8usize).prop_map(Op::Put),
                3 => (0..8usize).prop_map(Op::Get),
                1 => (0..8usize).prop_map(Op::Remove),
            ], 1..60),
            memory in 0u64..400,
            verify in any::<bool>(),
        ) {
            let budget = 500;
            let dir = tempfile::tempdir().unwrap();
            let config = CacheConfig { verify_on_read: verify, ..cfg(budget, memory) };
            let cache = ChunkCache::open(dir.path(), config).unwrap();
            let chunks: Vec<_> = sizes.iter().enumerate().map(|(i, &n)| chunk(i as u8, n)).collect();
            // Model: chunks removed (and not put since) must be absent.
            let mut absent: HashSet<usize> = (0..chunks.len()).collect();
            for op in ops {
                match op {
                    Op::Put(i) => {
                        cache.put(&chunks[i].0, &chunks[i].1).unwrap();
                        absent.remove(&i);
                        // The chunk just inserted is never the one evicted.
                        prop_assert!(cache.contains(&chunks[i].0) || sizes[i] as u64 > budget);
                    }
                    Op::Get(i) => {
                        if let Some(got) = cache.get(&chunks[i].0).unwrap() {
                            prop_assert_eq!(&got[..], &chunks[i].1[..]);
                            prop_assert!(!absent.contains(&i));
                        }
                    }
                    Op::Remove(i) => {
                        cache.remove(&chunks[i].0).unwrap();
                        absent.insert(i);
                        prop_assert!(!cache.contains(&chunks[i].0));
                    }
                }
                assert_consistent(&cache);
                prop_assert_eq!(cache.stats().corruptions, 0);
            }
        }
    }
}
