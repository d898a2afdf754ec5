//! The devices of one user that stored delivery keeps a cursor for (protocol.md, section
//! 15.1): what each has acknowledged, and when it was last heard of.
//!
//! A device is named by its *tag* ([`crate::proto::device_tag`]): a connection that named
//! no device at LOGIN is the user's default device, tag 0. A stored message is deleted
//! once every device tracked here has acknowledged it ([`DeviceCursors::floor`]). A device
//! not heard of (no INBOX_SYNC, no INBOX_ACK) for the retention time, or the least recently
//! heard of when a new one would pass the limit, is forgotten: it no longer holds messages
//! back, and when it comes back it is told of what it may have missed.

/// One tracked device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceCursor {
    /// The device's tag.
    pub device: u64,
    /// Every sequence number up to this one was acknowledged by the device (or is its own
    /// copy of a message it sent).
    pub acked: u64,
    /// When it last synced or acknowledged (Unix milliseconds).
    pub seen_ms: u64,
}

/// The tracked devices of one user, in the order they were first seen. Small: at most the
/// device limit (16 by default), so lookups are a scan.
#[derive(Clone, Debug, Default)]
pub struct DeviceCursors {
    cursors: Vec<DeviceCursor>,
}

impl DeviceCursors {
    /// Devices tracked.
    pub fn len(&self) -> usize {
        self.cursors.len()
    }

    /// True when no device is tracked.
    pub fn is_empty(&self) -> bool {
        self.cursors.is_empty()
    }

    /// The cursor of `device`, if tracked.
    pub fn get(&self, device: u64) -> Option<&DeviceCursor> {
        self.cursors.iter().find(|c| c.device == device)
    }

    /// The cursor of `device`, if tracked, to change.
    pub fn get_mut(&mut self, device: u64) -> Option<&mut DeviceCursor> {
        self.cursors.iter_mut().find(|c| c.device == device)
    }

    /// Every tracked cursor.
    pub fn iter(&self) -> impl Iterator<Item = &DeviceCursor> {
        self.cursors.iter()
    }

    /// Sets (or adds) a cursor exactly as given: replay of a recorded one.
    pub fn set(&mut self, cursor: DeviceCursor) {
        match self.get_mut(cursor.device) {
            Some(c) => *c = cursor,
            None => self.cursors.push(cursor),
        }
    }

    /// Adds a device that is not tracked; if that makes more than `max`, forgets the least
    /// recently seen other one and returns its tag.
    pub fn add(&mut self, cursor: DeviceCursor, max: usize) -> Option<u64> {
        self.cursors.push(cursor);
        if self.cursors.len() <= max.max(1) {
            return None;
        }
        let (at, _) = self
            .cursors
            .iter()
            .enumerate()
            .filter(|(_, c)| c.device != cursor.device)
            .min_by_key(|(_, c)| c.seen_ms)?;
        Some(self.cursors.remove(at).device)
    }

    /// Forgets `device`; true if it was tracked.
    pub fn remove(&mut self, device: u64) -> bool {
        let before = self.cursors.len();
        self.cursors.retain(|c| c.device != device);
        self.cursors.len() != before
    }

    /// Forgets every device not seen for `retention_ms` by `now_ms`; their tags go to
    /// `forgotten`.
    pub fn prune(&mut self, now_ms: u64, retention_ms: u64, forgotten: &mut Vec<u64>) {
        self.cursors.retain(|c| {
            let keep = now_ms.saturating_sub(c.seen_ms) <= retention_ms;
            if !keep {
                forgotten.push(c.device);
            }
            keep
        });
    }

    /// The highest sequence number every tracked device has acknowledged: messages up to
    /// it may be deleted. `None` with no device tracked (nothing may be deleted for them).
    pub fn floor(&self) -> Option<u64> {
        self.cursors.iter().map(|c| c.acked).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor(device: u64, acked: u64, seen_ms: u64) -> DeviceCursor {
        DeviceCursor {
            device,
            acked,
            seen_ms,
        }
    }

    #[test]
    fn the_floor_is_the_slowest_device() {
        let mut d = DeviceCursors::default();
        assert_eq!(d.floor(), None);
        d.set(cursor(1, 9, 0));
        d.set(cursor(2, 4, 0));
        assert_eq!(d.floor(), Some(4));
        d.set(cursor(2, 12, 0));
        assert_eq!(d.floor(), Some(9));
    }

    #[test]
    fn past_the_limit_the_least_recently_seen_other_device_goes() {
        let mut d = DeviceCursors::default();
        d.set(cursor(1, 0, 50));
        d.set(cursor(2, 0, 10));
        assert_eq!(
            d.add(cursor(3, 0, 5), 2),
            Some(2),
            "3 is the new one: 2 goes"
        );
        assert!(d.get(3).is_some() && d.get(1).is_some() && d.get(2).is_none());
        assert_eq!(d.add(cursor(4, 0, 60), 3), None);
    }

    #[test]
    fn devices_not_seen_within_the_retention_are_forgotten() {
        let mut d = DeviceCursors::default();
        d.set(cursor(1, 0, 1_000));
        d.set(cursor(2, 0, 5_000));
        let mut gone = Vec::new();
        d.prune(11_000, 8_000, &mut gone);
        assert_eq!(gone, [1]);
        assert_eq!(d.len(), 1);
        assert!(d.remove(2));
        assert!(!d.remove(2));
        assert!(d.is_empty());
    }
}
