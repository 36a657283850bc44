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

/// The unit of [`IN_FLIGHT`]'s semaphore.
const UNIT: u64 = 64 << 10;

/// How often a waiting fill looks again while fetches someone waits on are in flight.
const POLL: Duration = Duration::from_millis(20);

static ON_DEMAND: AtomicUsize = AtomicUsize::new(0);
static PREFETCHING: AtomicUsize = AtomicUsize::new(0);
/// Milliseconds since [`EPOCH`] when the last on-demand fetch ended (0: none yet).
static LAST_ON_DEMAND_MS: AtomicU64 = AtomicU64::new(0);
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
static FILL_BYTES: LazyLock<Arc<Semaphore>> =
    LazyLock::new(|| Arc::new(Semaphore::new((IN_FLIGHT / UNIT) as usize)));

/// An on-demand fetch in flight: the fill waits while one lives and for [`QUIET`] after.
#[derive(Debug)]
pub struct OnDemand(());

impl OnDemand {
    /// Counts a fetch a process waits on until the guard is dropped.
    pub fn start() -> OnDemand {
        ON_DEMAND.fetch_add(1, Ordering::SeqCst);
        OnDemand(())
    }
}

impl Drop for OnDemand {
    fn drop(&mut self) {
        let ms = EPOCH.elapsed().as_millis() as u64;
        LAST_ON_DEMAND_MS.store(ms.max(1), Ordering::SeqCst);
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

/// How long background work should still wait before its next step (`None`: go now).
fn wait_needed(quiet: Duration) -> Option<Duration> {
    if ON_DEMAND.load(Ordering::SeqCst) > 0 || PREFETCHING.load(Ordering::SeqCst) > 0 {
        return Some(POLL);
    }
    since_last_on_demand().and_then(|since| quiet.checked_sub(since))
}

/// Waits until no on-demand fetch or prefetch is running and on-demand fetches have been
/// quiet for `quiet`.
pub async fn wait_quiet(quiet: Duration) {
    while let Some(wait) = wait_needed(quiet) {
        tokio::time::sleep(wait.max(Duration::from_millis(5))).await;
    }
}

/// The right to have `bytes` of fill in flight (at most [`IN_FLIGHT`] are granted at once);
/// returned when the link is left to the fill, i.e. nothing anyone waits on is being fetched.
pub async fn fill_turn(bytes: u64) -> OwnedSemaphorePermit {
    let units = bytes.div_ceil(UNIT).clamp(1, IN_FLIGHT / UNIT) as u32;
    loop {
        wait_quiet(QUIET).await;
        let permit = FILL_BYTES
            .clone()
            .acquire_many_owned(units)
            .await
            .expect("the fill semaphore is never closed");
        // A read may have started while this waited for in-flight fill to drain.
        if wait_needed(QUIET).is_none() {
            return permit;
        }
        drop(permit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the counters are process-wide, and tests of one binary run in parallel.
    #[tokio::test]
    async fn fill_waits_for_reads_and_prefetches_and_is_bounded() {
        // Nothing running: the fill goes at once.
        let first = tokio::time::timeout(Duration::from_secs(5), fill_turn(IN_FLIGHT))
            .await
            .expect("an idle link must be given to the fill");
        // The budget is taken: a second batch waits for the first to finish.
        let second = tokio::spawn(fill_turn(1 << 20));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "more than IN_FLIGHT bytes granted");
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
        let waiting = tokio::spawn(fill_turn(1 << 20));
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
        let waiting = tokio::spawn(fill_turn(1 << 20));
        tokio::time::sleep(Duration::from_millis(QUIET.as_millis() as u64 + 100)).await;
        assert!(!waiting.is_finished(), "fill started during a prefetch");
        drop(prefetch);
        let permit = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("fill never resumed after the prefetch")
            .unwrap();
        drop(permit);
    }
}
