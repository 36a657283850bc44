//! The background fill's share of the link: it takes what reads someone waits on leave idle.
//!
//! The fill exists so that a layer becomes complete without anyone waiting for it; it must
//! never be what a waiting read queues behind. Connection priorities are not enough for that:
//! when the link itself is the bottleneck (a shaped WAN, a busy uplink), every fill byte
//! already in flight delays the bytes of a read that arrives after it, and a fill of 8 MiB
//! batches on seven layers at once put 56 MiB (over 2 s at 200 Mbit/s) ahead of each read of a
//! starting python container. So, process-wide:
//! - a fill batch starts only when no on-demand fetch is in flight, none finished within
//!   [`QUIET`], and no prefetch is running (prefetches are what the workload reads next);
//! - at most [`IN_FLIGHT`] fill bytes are in flight across all layers, which bounds what a
//!   read arriving mid-batch waits behind (4 MiB: 170 ms at 200 Mbit/s, 3 ms at 10 Gbit/s)
//!   while still keeping a link busy between reads (two 2 MiB requests cover a 20 ms round
//!   trip at 1.6 Gbit/s).
//!
//! - but a workload that has been reading for [`HEAVY_AFTER`] without a pause reads much, and
//!   its reads are mostly serial (a `cat` of every file, a loader walking a tree): waiting for
//!   it to pause would leave the link idle between its reads and make it slower than a full
//!   pull. Then the fill runs alongside it, one batch at a time (a read waits behind at most
//!   2 MiB), so a full read of an image is never slower than fetching it whole.
//!
//! On-demand fetches and prefetches announce themselves with the guards below; the fill asks
//! for its turn with [`fill_turn`].

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long on-demand fetches must have been quiet before a fill batch starts: reads of a
/// starting program come in bursts separated by its own work, and the fill uses the gaps.
pub const QUIET: Duration = Duration::from_millis(300);

/// Fill bytes in flight across the process at most.
pub const IN_FLIGHT: u64 = 4 << 20;

/// Decompressed fill bytes held across the process at most: batches are cut by compressed
/// size, and a hostile layer can make chunks compress a thousandfold.
pub const HELD: u64 = 64 << 20;

/// How long on-demand fetches must have kept on (no pause of [`QUIET`]) before the fill runs
/// alongside them. A starting python image reads in bursts for 2-5 s, where the fill should
/// stay out of the way; a workload still reading after that reads much.
pub const HEAVY_AFTER: Duration = Duration::from_secs(4);

/// The unit of [`IN_FLIGHT`]'s semaphore.
const UNIT: u64 = 64 << 10;

/// How often a waiting fill looks again while fetches someone waits on are in flight.
const POLL: Duration = Duration::from_millis(20);

static ON_DEMAND: AtomicUsize = AtomicUsize::new(0);
static PREFETCHING: AtomicUsize = AtomicUsize::new(0);
/// Milliseconds since [`EPOCH`] when the last on-demand fetch ended (0: none yet).
static LAST_ON_DEMAND_MS: AtomicU64 = AtomicU64::new(0);
/// Milliseconds since [`EPOCH`] when the current run of on-demand fetches began.
static BUSY_SINCE_MS: AtomicU64 = AtomicU64::new(0);
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
static FILL_BYTES: LazyLock<Arc<Semaphore>> =
    LazyLock::new(|| Arc::new(Semaphore::new((IN_FLIGHT / UNIT) as usize)));

/// An on-demand fetch in flight: the fill waits while one lives and for [`QUIET`] after.
#[derive(Debug)]
pub struct OnDemand(());

impl OnDemand {
    /// Counts a fetch a process waits on until the guard is dropped.
    pub fn start() -> OnDemand {
        let idle = ON_DEMAND.fetch_add(1, Ordering::SeqCst) == 0
            && since_last_on_demand().is_none_or(|s| s >= QUIET);
        if idle {
            BUSY_SINCE_MS.store(now_ms(), Ordering::SeqCst);
        }
        OnDemand(())
    }
}

impl Drop for OnDemand {
    fn drop(&mut self) {
        LAST_ON_DEMAND_MS.store(now_ms(), Ordering::SeqCst);
        ON_DEMAND.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A prefetch running (the landmark's files, a recorded profile): the fill waits for it.
#[derive(Debug)]
pub struct Prefetching(());

impl Prefetching {
    /// Counts one prefetch until the guard is dropped.
    pub fn start() -> Prefetching {
        PREFETCHING.fetch_add(1, Ordering::SeqCst);
        Prefetching(())
    }
}

impl Drop for Prefetching {
    fn drop(&mut self) {
        PREFETCHING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Milliseconds since [`EPOCH`], at least 1 (0 means "never").
fn now_ms() -> u64 {
    (EPOCH.elapsed().as_millis() as u64).max(1)
}

/// On-demand fetches have kept on for [`HEAVY_AFTER`] and still do.
fn heavy_reading() -> bool {
    let busy =
        ON_DEMAND.load(Ordering::SeqCst) > 0 || since_last_on_demand().is_some_and(|s| s < QUIET);
    let since = BUSY_SINCE_MS.load(Ordering::SeqCst);
    busy && since > 0 && now_ms().saturating_sub(since) >= HEAVY_AFTER.as_millis() as u64
}

/// Time since the last on-demand fetch ended (`None`: there was none yet).
pub fn since_last_on_demand() -> Option<Duration> {
    let last = LAST_ON_DEMAND_MS.load(Ordering::SeqCst);
    (last > 0)
        .then(|| Duration::from_millis((EPOCH.elapsed().as_millis() as u64).saturating_sub(last)))
}

/// On-demand fetches in flight now.
pub fn on_demand_in_flight() -> usize {
    ON_DEMAND.load(Ordering::SeqCst)
}

/// Whether a fill may run alongside on-demand reads: a workload has been reading without a
/// pause for [`HEAVY_AFTER`] (it reads much, and waiting for a pause would leave the link idle
/// between its serial reads) and no prefetch runs (prefetch always goes first).
fn may_run_alongside() -> bool {
    heavy_reading() && PREFETCHING.load(Ordering::SeqCst) == 0
}

/// How long background work should still wait before its next step (`None`: go now).
fn wait_needed(quiet: Duration) -> Option<Duration> {
    if ON_DEMAND.load(Ordering::SeqCst) > 0 || PREFETCHING.load(Ordering::SeqCst) > 0 {
        return Some(POLL);
    }
    since_last_on_demand().and_then(|since| quiet.checked_sub(since))
}

/// Waits until a layer's fill may begin: on-demand fetches have been quiet for `quiet` (the
/// start of a container is over), or a workload has been reading for [`HEAVY_AFTER`] without
/// a pause and no prefetch runs (it reads much: waiting for a pause would leave the link idle
/// between its serial reads). Each batch then still asks [`fill_turn`].
pub async fn wait_fill_start(quiet: Duration) {
    loop {
        match wait_needed(quiet) {
            None => return,
            Some(_) if may_run_alongside() => return,
            Some(wait) => tokio::time::sleep(wait.max(Duration::from_millis(5))).await,
        }
    }
}

/// A fill batch's right to be in flight; dropping it frees its share.
#[derive(Debug)]
pub struct FillTurn {
    _bytes: OwnedSemaphorePermit,
    _alongside: Option<OwnedSemaphorePermit>,
}

/// The one fill batch that may run alongside a heavy reader.
static ALONGSIDE: LazyLock<Arc<Semaphore>> = LazyLock::new(|| Arc::new(Semaphore::new(1)));

/// The right to have `bytes` of fill in flight, holding `held` bytes once decompressed (at
/// most [`IN_FLIGHT`] and [`HELD`] are granted at once):
/// granted when nothing anyone waits on is being fetched, or, one batch at a time, alongside a
/// workload that has been reading for [`HEAVY_AFTER`]; never during a prefetch.
pub async fn fill_turn(bytes: u64, held: u64) -> FillTurn {
    // A batch is charged by its compressed bytes or its share of HELD, whichever is more.
    let all = IN_FLIGHT / UNIT;
    let units = bytes
        .div_ceil(UNIT)
        .max(held.div_ceil(HELD / all))
        .clamp(1, all) as u32;
    let acquire = |sem: &LazyLock<Arc<Semaphore>>, n: u32| {
        let sem = Arc::clone(sem);
        async move {
            sem.acquire_many_owned(n)
                .await
                .expect("fill semaphores are never closed")
        }
    };
    loop {
        match wait_needed(QUIET) {
            None => {
                let permit = acquire(&FILL_BYTES, units).await;
                // A read may have started while this waited for in-flight fill to drain: then
                // the rules for running alongside reads decide, on the next pass.
                if wait_needed(QUIET).is_none() {
                    return FillTurn {
                        _bytes: permit,
                        _alongside: None,
                    };
                }
            }
            Some(_) if may_run_alongside() => {
                let alongside = acquire(&ALONGSIDE, 1).await;
                let permit = acquire(&FILL_BYTES, units).await;
                // A prefetch may have started meanwhile: it goes first.
                if PREFETCHING.load(Ordering::SeqCst) == 0 {
                    return FillTurn {
                        _bytes: permit,
                        _alongside: Some(alongside),
                    };
                }
            }
            Some(wait) => tokio::time::sleep(wait.max(Duration::from_millis(5))).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the counters are process-wide, and tests of one binary run in parallel.
    #[tokio::test]
    async fn fill_waits_for_reads_and_prefetches_and_is_bounded() {
        // Nothing running: the fill goes at once.
        // A batch of few compressed bytes that decompress to HELD takes the whole budget.
        let first = tokio::time::timeout(Duration::from_secs(5), fill_turn(64 << 10, HELD))
            .await
            .expect("an idle link must be given to the fill");
        // The budget is taken: a second batch waits for the first to finish.
        let second = tokio::spawn(fill_turn(1 << 20, 0));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !second.is_finished(),
            "more than IN_FLIGHT or HELD bytes granted"
        );
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("freed budget not granted")
            .unwrap();
        drop(second);

        // An on-demand fetch in flight holds the fill back, and so does the quiet period
        // after it.
        let read = OnDemand::start();
        assert_eq!(on_demand_in_flight(), 1);
        let waiting = tokio::spawn(fill_turn(1 << 20, 0));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiting.is_finished(),
            "fill started during an on-demand fetch"
        );
        let ended = Instant::now();
        drop(read);
        let permit = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("fill never resumed")
            .unwrap();
        assert!(
            ended.elapsed() >= QUIET - Duration::from_millis(10),
            "fill resumed {:?} after the read, before the quiet period",
            ended.elapsed()
        );
        drop(permit);

        // A prefetch holds it back too.
        let prefetch = Prefetching::start();
        let waiting = tokio::spawn(fill_turn(1 << 20, 0));
        tokio::time::sleep(Duration::from_millis(QUIET.as_millis() as u64 + 100)).await;
        assert!(!waiting.is_finished(), "fill started during a prefetch");
        drop(prefetch);
        let permit = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("fill never resumed after the prefetch")
            .unwrap();
        drop(permit);

        // A workload that keeps reading gets the fill alongside it after HEAVY_AFTER, one
        // batch at a time; a layer's fill that waits to begin begins then too.
        tokio::time::sleep(QUIET).await;
        let read = OnDemand::start();
        let waiting = tokio::spawn(fill_turn(1 << 20, 0));
        let beginning = tokio::spawn(wait_fill_start(Duration::from_secs(2)));
        tokio::time::sleep(HEAVY_AFTER - Duration::from_millis(500)).await;
        assert!(
            !waiting.is_finished(),
            "fill ran alongside a short run of reads"
        );
        assert!(
            !beginning.is_finished(),
            "a fill began during a short run of reads"
        );
        tokio::time::timeout(Duration::from_secs(5), beginning)
            .await
            .expect("a fill never began alongside a heavy reader")
            .unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("fill never ran alongside a heavy reader")
            .unwrap();
        let second = tokio::spawn(fill_turn(1 << 20, 0));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!second.is_finished(), "two batches ran alongside a reader");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the next batch never ran alongside")
            .unwrap();
        drop(second);
        drop(read);
    }
}
