//! Retries of token requests: exponential backoff with jitter, bounded by a number of
//! attempts and by a total time.

use std::time::Duration;

/// Wait before the first retry, before jitter.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Maximum wait between two attempts, before jitter.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Retry limits of one token request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included; 1 means no retry.
    pub max_attempts: u32,
    /// Time limit for all attempts and the waits between them. An attempt still running
    /// at the limit is abandoned.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Returns the wait before retry number `retry` (1 for the first) before jitter:
/// 100 ms, doubled for each further retry, at most 2 s.
pub fn backoff(retry: u32) -> Duration {
    let doublings = retry.saturating_sub(1).min(16);
    INITIAL_BACKOFF
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}

/// Applies "equal jitter": a wait between half of `delay` and all of it, chosen by
/// `random`, so agents that lost the provider at the same moment do not retry in step.
pub fn jittered(delay: Duration, random: u64) -> Duration {
    let half = delay / 2;
    let span = (delay - half).as_micros() as u64;
    let extra = if span == 0 { 0 } else { random % (span + 1) };
    half + Duration::from_micros(extra)
}

/// Returns a random number for [`jittered`]. Falls back to the clock's nanoseconds when
/// the operating system provides no random bytes, because jitter needs no secrecy.
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_ok() {
        return u64::from_le_bytes(bytes);
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_cap() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(3), Duration::from_millis(400));
        assert_eq!(backoff(5), Duration::from_millis(1600));
        assert_eq!(backoff(6), MAX_BACKOFF);
        assert_eq!(backoff(40), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
        assert_eq!(backoff(0), INITIAL_BACKOFF);
    }

    #[test]
    fn jitter_stays_within_half_and_full() {
        let delay = Duration::from_millis(400);
        for random in [0, 1, 199_999, 200_000, 200_001, u64::MAX, random_u64()] {
            let wait = jittered(delay, random);
            assert!(wait >= Duration::from_millis(200), "{wait:?} for {random}");
            assert!(wait <= delay, "{wait:?} for {random}");
        }
        assert_eq!(jittered(delay, 0), Duration::from_millis(200));
        assert_eq!(jittered(delay, 200_000), delay);
        assert_eq!(jittered(Duration::ZERO, 7), Duration::ZERO);
    }

    #[test]
    fn jitter_spreads_waits() {
        let delay = Duration::from_secs(1);
        let waits: std::collections::HashSet<Duration> =
            (0..20).map(|_| jittered(delay, random_u64())).collect();
        assert!(waits.len() > 1, "20 draws gave one value: {waits:?}");
    }

    #[test]
    fn default_policy_total_wait_fits_timeout() {
        let policy = RetryPolicy::default();
        let longest_waits: Duration = (1..policy.max_attempts).map(backoff).sum();
        assert_eq!(longest_waits, Duration::from_millis(700));
        assert!(longest_waits < policy.timeout);
    }
}
