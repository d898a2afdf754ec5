//! The adaptive heartbeat interval: how long the client lets the link stay silent before it
//! sends a PING.
//!
//! A mobile network's NAT or firewall forgets an idle TCP flow after a timeout the client
//! cannot see; heartbeating more often than needed costs battery and radio time. The relay
//! announces bounds in LOGIN_OK when the LOGIN carried the HEARTBEAT flag (protocol.md,
//! section 5.2): never more often than `min`, and at least every `max` (its own ping
//! interval) keeps the relay from PINGing. Within them the client learns the longest
//! interval the current network keeps alive:
//!
//! - It starts at `ClientConfig::heartbeat_interval`, clamped to `[min, max]`.
//! - A heartbeat is *answered* when, after a PING sent at the learning interval, a frame
//!   arrives before the heartbeat timeout: the link survived that much silence. After
//!   [`PROBE_AFTER`] answered heartbeats in a row the interval is *lengthened* by
//!   [`STEP_PERCENT`] % (at least [`MIN_STEP`]), up to `max`.
//! - A heartbeat that gets *no answer* (the link died silently) takes the interval back to
//!   the last one that was answered, and the learning stops there ("stable"): no more
//!   probing upward on this network. When no interval was answered yet on this network,
//!   the interval is halved instead (not below `min`), and probing goes on from there.
//! - What was learned is kept across reconnects (the network is the same); `reset`, on
//!   the app's "network changed", starts over from the configured interval.
//!
//! Without bounds (a relay that does not know the HEARTBEAT flag) the interval is the
//! configured one, fixed: exactly the behaviour of a client without this module.
//!
//! The state is pure (no clock, no I/O): [`ClientCore`](super::ClientCore) tells it what
//! happened.

use std::time::Duration;

use crate::proto::HeartbeatBounds;

/// Answered heartbeats in a row at one interval before the next longer one is tried.
pub const PROBE_AFTER: u32 = 3;
/// How much longer each probe is than the interval before it, in percent.
pub const STEP_PERCENT: u32 = 25;
/// The smallest lengthening of one probe.
pub const MIN_STEP: Duration = Duration::from_secs(1);

/// The heartbeat interval and what the client learned about it on this network.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    /// The configured interval: the start value, and the fixed one without bounds.
    configured: Duration,
    /// `(min, max)` from the last LOGIN_OK that had them.
    bounds: Option<(Duration, Duration)>,
    /// The interval in use while learning.
    current: Duration,
    /// The longest interval answered on this network.
    last_good: Option<Duration>,
    /// Heartbeats answered in a row at `current`.
    answered: u32,
    /// A silent drop happened: `current` stays until the next network change.
    stable: bool,
}

impl Heartbeat {
    /// The fixed `configured` interval, until bounds arrive.
    pub fn new(configured: Duration) -> Heartbeat {
        Heartbeat {
            configured,
            bounds: None,
            current: configured,
            last_good: None,
            answered: 0,
            stable: false,
        }
    }

    /// The interval to heartbeat at while the app is in the foreground.
    pub fn interval(&self) -> Duration {
        match self.bounds {
            Some(_) => self.current,
            None => self.configured,
        }
    }

    /// The relay's upper bound, if it sent bounds: what a client in the background uses.
    pub fn max(&self) -> Option<Duration> {
        self.bounds.map(|(_, max)| max)
    }

    /// True once a silent drop fixed the interval for this network.
    #[cfg(test)]
    pub fn is_stable(&self) -> bool {
        self.stable
    }

    /// A LOGIN_OK arrived, with or without bounds. Bounds the relay sent are kept, and the
    /// learned interval is brought within them; a `min` above `max` (a broken relay) is
    /// taken as `max`. Without bounds the configured interval applies (and what was learned
    /// stays for a later link that has them).
    pub fn set_bounds(&mut self, bounds: Option<HeartbeatBounds>) {
        let Some(b) = bounds else {
            self.bounds = None;
            return;
        };
        let max = Duration::from_millis(u64::from(b.max_ms));
        let min = Duration::from_millis(u64::from(b.min_ms)).min(max);
        if self.bounds.is_none() && self.last_good.is_none() && !self.stable {
            // First bounds on this network: start from the configured interval.
            self.current = self.configured;
        }
        self.bounds = Some((min, max));
        self.current = self.current.clamp(min, max);
        self.last_good = self.last_good.map(|g| g.clamp(min, max));
    }

    /// A heartbeat PING sent at [`interval`](Self::interval) was answered in time.
    pub fn answered(&mut self) {
        let Some((_, max)) = self.bounds else {
            return;
        };
        self.last_good = Some(self.last_good.map_or(self.current, |g| g.max(self.current)));
        if self.stable || self.current >= max {
            return;
        }
        self.answered += 1;
        if self.answered >= PROBE_AFTER {
            self.answered = 0;
            let step = (self.current * STEP_PERCENT / 100).max(MIN_STEP);
            self.current = (self.current + step).min(max);
        }
    }

    /// A heartbeat PING sent at [`interval`](Self::interval) got no answer: the link died
    /// silently.
    pub fn silent_drop(&mut self) {
        let Some((min, _)) = self.bounds else {
            return;
        };
        self.answered = 0;
        match self.last_good {
            Some(good) if good < self.current => {
                self.current = good;
                self.stable = true;
            }
            // The last answered interval failed too (or none was answered yet): shorter,
            // still learning.
            _ => {
                self.current = (self.current / 2).max(min);
                self.last_good = None;
            }
        }
    }

    /// The network changed: what was learned no longer holds; start over from the
    /// configured interval (within the bounds, if any).
    pub fn reset(&mut self) {
        self.current = match self.bounds {
            Some((min, max)) => self.configured.clamp(min, max),
            None => self.configured,
        };
        self.last_good = None;
        self.answered = 0;
        self.stable = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(min_s: u32, max_s: u32) -> Option<HeartbeatBounds> {
        Some(HeartbeatBounds {
            min_ms: min_s * 1000,
            max_ms: max_s * 1000,
        })
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn without_bounds_the_interval_is_fixed() {
        let mut h = Heartbeat::new(S(20));
        for _ in 0..10 {
            h.answered();
        }
        h.silent_drop();
        assert_eq!(h.interval(), S(20));
        assert_eq!(h.max(), None);
    }

    #[test]
    fn the_start_is_clamped_into_the_bounds() {
        let mut h = Heartbeat::new(S(20));
        h.set_bounds(bounds(30, 60));
        assert_eq!(h.interval(), S(30));
        let mut h = Heartbeat::new(S(20));
        h.set_bounds(bounds(5, 10));
        assert_eq!(h.interval(), S(10));
    }

    #[test]
    fn grows_after_answered_heartbeats_up_to_max_and_a_drop_goes_back() {
        let mut h = Heartbeat::new(S(20));
        h.set_bounds(bounds(10, 30));
        for _ in 0..PROBE_AFTER - 1 {
            h.answered();
        }
        assert_eq!(h.interval(), S(20));
        h.answered();
        assert_eq!(h.interval(), S(25));
        for _ in 0..PROBE_AFTER {
            h.answered();
        }
        assert_eq!(h.interval(), S(30)); // 31.25 capped
        h.silent_drop();
        // 30 was never answered: back to 25, which was.
        assert_eq!(h.interval(), S(25));
        assert!(h.is_stable());
        h.reset();
        // With nothing answered on this network, a drop halves the interval.
        h.silent_drop();
        assert_eq!(h.interval(), S(10));
        assert!(!h.is_stable());
    }

    #[test]
    fn a_silent_drop_after_a_probe_returns_to_the_last_good_and_is_stable() {
        let mut h = Heartbeat::new(S(20));
        h.set_bounds(bounds(10, 60));
        for _ in 0..PROBE_AFTER {
            h.answered();
        }
        assert_eq!(h.interval(), S(25));
        h.silent_drop();
        assert_eq!(h.interval(), S(20));
        assert!(h.is_stable());
        for _ in 0..10 {
            h.answered();
        }
        assert_eq!(h.interval(), S(20));
        h.reset();
        assert!(!h.is_stable());
        assert_eq!(h.interval(), S(20));
    }

    #[test]
    fn never_below_min() {
        let mut h = Heartbeat::new(S(12));
        h.set_bounds(bounds(10, 60));
        h.silent_drop();
        assert_eq!(h.interval(), S(10));
        h.silent_drop();
        assert_eq!(h.interval(), S(10));
    }
}
