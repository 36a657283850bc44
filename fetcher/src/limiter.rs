//! A connection limiter that serves waiters by priority.
//!
//! Each registry host gets a fixed number of concurrent requests. When they are all busy, the
//! next free slot goes to the most urgent waiter (a read a process is blocked on before a
//! prefetch before a background fill), and a few slots are kept for on-demand reads only, so a
//! background fill that has taken every other slot never delays a read someone waits on.
//! Priorities are read when a slot frees up, so a queued background request that an on-demand
//! reader joins later is promoted.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

/// A priority as stored in an `AtomicU8`: higher is more urgent.
pub type SharedPriority = Arc<AtomicU8>;

/// Bounded concurrency with priority hand-off and a reserve for the most urgent class.
#[derive(Debug)]
pub struct PriorityLimiter {
    state: Mutex<State>,
    urgent: u8,
    reserved: usize,
}

#[derive(Debug)]
struct State {
    available: usize,
    seq: u64,
    waiters: Vec<Waiter>,
}

#[derive(Debug)]
struct Waiter {
    priority: SharedPriority,
    seq: u64,
    tx: oneshot::Sender<Permit>,
}

/// A held slot; dropping it frees the slot for the next waiter.
#[derive(Debug)]
pub struct Permit {
    limiter: Option<Arc<PriorityLimiter>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(l) = self.limiter.take() {
            l.release();
        }
    }
}

impl PriorityLimiter {
    /// `slots` concurrent holders; `reserved` of them only for priority `urgent` and above.
    pub fn new(slots: usize, reserved: usize, urgent: u8) -> Arc<Self> {
        let slots = slots.max(1);
        Arc::new(PriorityLimiter {
            state: Mutex::new(State {
                available: slots,
                seq: 0,
                waiters: Vec::new(),
            }),
            urgent,
            reserved: reserved.min(slots - 1),
        })
    }

    fn eligible(&self, available: usize, priority: u8) -> bool {
        if priority >= self.urgent {
            available > 0
        } else {
            available > self.reserved
        }
    }

    /// Waits for a slot. `priority` may be raised by others while waiting.
    pub async fn acquire(self: &Arc<Self>, priority: SharedPriority) -> Permit {
        let rx = {
            let mut st = self.state.lock();
            let p = priority.load(Ordering::Relaxed);
            let nobody_better = !st
                .waiters
                .iter()
                .any(|w| w.priority.load(Ordering::Relaxed) >= p);
            if nobody_better && self.eligible(st.available, p) {
                st.available -= 1;
                return Permit {
                    limiter: Some(self.clone()),
                };
            }
            let (tx, rx) = oneshot::channel();
            st.seq += 1;
            let seq = st.seq;
            st.waiters.push(Waiter { priority, seq, tx });
            rx
        };
        match rx.await {
            Ok(p) => p,
            // The limiter hands out a permit before dropping a sender, so this only happens if
            // the limiter itself is gone; a dummy permit keeps the caller going.
            Err(_) => Permit { limiter: None },
        }
    }

    fn release(self: &Arc<Self>) {
        let mut st = self.state.lock();
        st.available += 1;
        loop {
            // Most urgent first, then oldest.
            let best = st
                .waiters
                .iter()
                .enumerate()
                .filter(|(_, w)| self.eligible(st.available, w.priority.load(Ordering::Relaxed)))
                .max_by_key(|(_, w)| (w.priority.load(Ordering::Relaxed), std::cmp::Reverse(w.seq)))
                .map(|(i, _)| i);
            let Some(i) = best else { break };
            let w = st.waiters.swap_remove(i);
            st.available -= 1;
            let permit = Permit {
                limiter: Some(self.clone()),
            };
            if let Err(mut p) = w.tx.send(permit) {
                // The waiter gave up: take the slot back without re-entering this lock.
                p.limiter = None;
                st.available += 1;
            } else {
                break;
            }
        }
    }

    /// Free slots right now (for tests and metrics).
    pub fn available(&self) -> usize {
        self.state.lock().available
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn prio(p: u8) -> SharedPriority {
        Arc::new(AtomicU8::new(p))
    }

    #[tokio::test]
    async fn serves_most_urgent_first_and_keeps_reserve() {
        let l = PriorityLimiter::new(3, 1, 2);
        // Background may take only 2 of 3 slots.
        let a = l.acquire(prio(0)).await;
        let b = l.acquire(prio(0)).await;
        let l2 = l.clone();
        let bg = tokio::spawn(async move { l2.acquire(prio(0)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !bg.is_finished(),
            "background must not take the reserved slot"
        );
        // An on-demand read gets the reserved slot at once.
        let c = tokio::time::timeout(Duration::from_secs(1), l.acquire(prio(2)))
            .await
            .expect("urgent read waited behind background");
        // Queue a prefetch and an on-demand behind the background one; on release the
        // on-demand wins, then prefetch, then background.
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, p) in [("prefetch", 1u8), ("ondemand", 2u8)] {
            let (l, order) = (l.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _p = l.acquire(prio(p)).await;
                order.lock().push(name);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(c);
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(a);
        drop(b);
        for t in tasks {
            t.await.unwrap();
        }
        let _bg = bg.await.unwrap();
        assert_eq!(*order.lock(), vec!["ondemand", "prefetch"]);
    }

    #[tokio::test]
    async fn promotion_and_cancellation() {
        let l = PriorityLimiter::new(1, 0, 2);
        let held = l.acquire(prio(2)).await;
        let p = prio(0);
        let l2 = l.clone();
        let p2 = p.clone();
        let waiter = tokio::spawn(async move { l2.acquire(p2).await });
        let l3 = l.clone();
        let cancelled = tokio::spawn(async move { l3.acquire(prio(1)).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        cancelled.abort();
        p.store(2, Ordering::Relaxed); // promoted while waiting
        drop(held);
        let got = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(l.available(), 0);
        drop(got);
        assert_eq!(l.available(), 1);
    }
}
