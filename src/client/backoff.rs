//! Reconnect delays: exponential backoff with jitter.

use std::time::Duration;

use crate::rand::Rng;

/// The delay before each reconnect attempt.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Starts at `initial`, doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            failures: 0,
        }
    }

    /// The delay before the next attempt, drawn from [step/2, step] where step doubles with
    /// each failure since the last success.
    pub fn next_delay(&mut self, rng: &mut Rng) -> Duration {
        let step = self
            .initial
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = step / 2;
        let span = (step - half).as_nanos() as u64;
        let extra = if span == 0 {
            0
        } else {
            rng.next_u64() % (span + 1)
        };
        half + Duration::from_nanos(extra)
    }

    /// A login succeeded: the next failure starts from `initial` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_with_jitter_and_stop_at_the_max() {
        let mut rng = Rng::seeded(42);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let expected_steps = [100, 200, 400, 800, 800, 800];
        for step in expected_steps {
            let d = b.next_delay(&mut rng).as_millis() as u64;
            assert!(
                (step / 2..=step).contains(&d),
                "{d} ms not within [{}, {step}]",
                step / 2
            );
        }
        b.reset();
        assert!(b.next_delay(&mut rng) <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_clients_apart() {
        let delays: std::collections::HashSet<_> = (0..20)
            .map(|seed| {
                let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
                b.next_delay(&mut Rng::seeded(seed * 7919))
            })
            .collect();
        assert!(delays.len() > 10, "only {} distinct delays", delays.len());
    }
}
