//! Capped exponential back-off: how long to wait between attempts, and when to give up.
//!
//! A registry that is down must surface as an error in bounded time, never as a hang, while a
//! registry that hiccups (a 503 during a deploy, a reset connection) must not fail a container
//! start. The policy bounds both the number of attempts and the total time spent.

use std::time::Duration;

use rand::Rng;

/// When and how often to retry a failed request.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Wait before the second attempt; doubles each time.
    pub initial_backoff: Duration,
    /// Upper bound of one wait.
    pub max_backoff: Duration,
    /// No new attempt starts once this much time has passed since the first.
    pub max_total: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            max_total: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based), with up to 25% random jitter so
    /// many readers failing together do not retry in lock-step. `retry_after` (from a 429/503
    /// `Retry-After` header) is honoured, capped by `max_backoff` times four.
    pub fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(ra) = retry_after {
            return ra.min(self.max_backoff * 4);
        }
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let base = exp.min(self.max_backoff);
        let jitter = rand::thread_rng().gen_range(0..=base.as_millis() as u64 / 4);
        base + Duration::from_millis(jitter)
    }

    /// Whether another attempt may start after `attempt` attempts and `elapsed` time, given
    /// the wait that would come first.
    pub fn should_retry(&self, attempt: u32, elapsed: Duration, wait: Duration) -> bool {
        attempt < self.max_attempts && elapsed + wait < self.max_total
    }
}

/// Parses a `Retry-After` header value: delta seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default();
        let b1 = p.backoff(1, None);
        assert!(b1 >= Duration::from_millis(100) && b1 <= Duration::from_millis(125));
        let b3 = p.backoff(3, None);
        assert!(b3 >= Duration::from_millis(400) && b3 <= Duration::from_millis(500));
        let b20 = p.backoff(20, None);
        assert!(b20 >= Duration::from_secs(2) && b20 <= Duration::from_millis(2500));
        assert_eq!(
            p.backoff(1, Some(Duration::from_secs(1))),
            Duration::from_secs(1)
        );
        assert_eq!(
            p.backoff(1, Some(Duration::from_secs(3600))),
            Duration::from_secs(8)
        );
    }

    #[test]
    fn gives_up_on_attempts_and_time() {
        let p = RetryPolicy::default();
        assert!(p.should_retry(1, Duration::ZERO, Duration::from_millis(100)));
        assert!(!p.should_retry(5, Duration::ZERO, Duration::from_millis(100)));
        assert!(!p.should_retry(2, Duration::from_secs(19), Duration::from_secs(2)));
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
