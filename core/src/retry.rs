//! Retry policy: exponential backoff with full jitter on the upper half, so a burst of failures
//! spreads out instead of retrying in lockstep.

use std::time::Duration;

/// Delay before retry number `attempt` (1 = first retry): base * 2^(attempt-1), capped, then a
/// random point in [delay/2, delay].
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(30));
    let full = exp.min(cap).as_micros() as u64;
    let half = full / 2;
    Duration::from_micros(half + fastrand::u64(0..=full - half))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(60);
        for _ in 0..100 {
            let d1 = backoff(1, base, cap);
            assert!(d1 >= Duration::from_millis(500) && d1 <= base);
            let d4 = backoff(4, base, cap);
            assert!(d4 >= Duration::from_secs(4) && d4 <= Duration::from_secs(8));
            assert!(backoff(40, base, cap) <= cap);
        }
    }
}
