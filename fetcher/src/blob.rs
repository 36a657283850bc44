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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::digest::Digest;
use crate::error::Error;
use crate::limiter::PriorityLimiter;
use crate::reference::Reference;
use crate::registry::Registry;

/// How urgent a read is. Ordered: `OnDemand` > `Prefetch` > `Background`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Filling the rest of a layer while nobody waits.
    Background = 0,
    /// Fetching what the workload is known to read soon.
    Prefetch = 1,
    /// A process is blocked on this read.
    OnDemand = 2,
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

/// Ranged reads of one blob through the engine. Readers of the same blob (same registry,
/// repository and digest) share queue and flights, however they were obtained.
#[derive(Debug, Clone)]
pub struct BlobReader {
    engine: Arc<EngineInner>,
    state: Arc<BlobState>,
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
                engine: self.inner.clone(),
                state,
            };
        }
        blobs.retain(|_, w| w.strong_count() > 0);
        let state = Arc::new(BlobState {
            reference: reference.clone(),
            digest,
            size,
            queue: Mutex::default(),
        });
        blobs.insert(key, Arc::downgrade(&state));
        BlobReader {
            engine: self.inner.clone(),
            state,
        }
    }
}

/// Gives the dispatching role back if a dispatcher is cancelled before sending its batch, so
/// queued readers are never stranded.
struct DispatchGuard {
    reader: Option<BlobReader>,
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
    /// The blob's digest.
    pub fn digest(&self) -> Digest {
        self.state.digest
    }

    /// The blob's size if it was given.
    pub fn size(&self) -> Option<u64> {
        self.state.size
    }

    /// Reads `len` bytes at `offset` (unverified: the caller checks chunk digests).
    pub async fn read_at(&self, offset: u64, len: u64, priority: Priority) -> Result<Bytes, Error> {
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
            tokio::spawn(async move { reader.fetch_span(span, members).await });
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

fn make_span(
    (start, end, priority, members): (u64, u64, u8, Vec<Arc<Flight>>),
) -> (Arc<Flight>, Vec<Arc<Flight>>) {
    let (tx, _) = watch::channel(None);
    (
        Arc::new(Flight {
            start,
            end,
            priority: Arc::new(AtomicU8::new(priority)),
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
