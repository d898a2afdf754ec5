//! A token bucket for per-connection send rates. Time comes in as `now`; nothing here reads
//! the clock.

use std::time::Instant;

/// Tokens are counted in thousandths so slow rates refill smoothly without floats.
const MILLI: u64 = 1000;

/// A token bucket that starts full.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokenBucket {
    milli_tokens: u64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// Takes one token if there is one. `per_second == 0` means unlimited.
    pub fn try_take(&mut self, now: Instant, per_second: u32, burst: u32) -> bool {
        if per_second == 0 {
            return true;
        }
        let cap = u64::from(burst.max(1)) * MILLI;
        self.milli_tokens = match self.last {
            None => cap,
            Some(last) => {
                let micros = now.saturating_duration_since(last).as_micros();
                let refill = micros.saturating_mul(u128::from(per_second)) / 1000;
                u64::try_from(refill)
                    .unwrap_or(u64::MAX)
                    .saturating_add(self.milli_tokens)
                    .min(cap)
            }
        };
        self.last = Some(now);
        if self.milli_tokens >= MILLI {
            self.milli_tokens -= MILLI;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill_at_the_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::default();
        let taken = (0..20).filter(|_| bucket.try_take(t0, 10, 5)).count();
        assert_eq!(taken, 5, "the burst");
        assert!(!bucket.try_take(t0 + Duration::from_millis(99), 10, 5));
        // 0.99 tokens kept from the failed try plus 1.01 refilled: exactly two.
        let at = t0 + Duration::from_millis(200);
        let taken = (0..5).filter(|_| bucket.try_take(at, 10, 5)).count();
        assert_eq!(taken, 2);
        let later = t0 + Duration::from_secs(60);
        let taken = (0..20).filter(|_| bucket.try_take(later, 10, 5)).count();
        assert_eq!(taken, 5, "refill stops at the burst size");
        assert!(TokenBucket::default().try_take(t0, 0, 0), "0 = unlimited");
    }
}
