//! Room membership: which connections are in each room.
//!
//! Members are kept in a dense vector (fan-out walks it front to back) plus a position index
//! so leaving is O(1) (swap-remove). A room exists only while it has members; a
//! connection's own list of rooms lives in its session and is bounded by the rooms limit.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use super::directory::IdHasher;
use super::hashing::{id_map, IdMap};
use super::rate::TokenBucket;
use crate::proto::RoomId;
use crate::ConnId;

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

#[derive(Debug, Default)]
struct Room {
    members: Vec<ConnId>,
    position: FastMap<ConnId, usize>,
    /// Room messages dropped for slow members since the room was created.
    dropped: u64,
    /// The room's total ROOM_SEND rate, over all its members.
    rate: TokenBucket,
}

/// Every room with at least one member. Room ids are chosen by peers: the map is seeded.
#[derive(Debug)]
pub struct Rooms {
    rooms: IdMap<RoomId, Room>,
    /// Members over all rooms.
    memberships: usize,
}

impl Rooms {
    /// No rooms; the map hashed with `seed`.
    pub fn new(seed: u64) -> Rooms {
        Rooms {
            rooms: id_map(seed),
            memberships: 0,
        }
    }

    /// Every room with at least one member, in no particular order.
    pub fn ids(&self) -> impl Iterator<Item = RoomId> + '_ {
        self.rooms.keys().copied()
    }

    /// Takes one token of `room`'s total send rate; false when the room is over it. A
    /// room that does not exist has no members to send to: true.
    pub fn take_send_token(
        &mut self,
        room: RoomId,
        now: std::time::Instant,
        rate: u32,
        burst: u32,
    ) -> bool {
        self.rooms
            .get_mut(&room)
            .is_none_or(|r| r.rate.try_take(now, rate, burst))
    }

    /// The member connections of `room` (empty if it does not exist).
    pub fn members(&self, room: RoomId) -> &[ConnId] {
        self.rooms.get(&room).map_or(&[], |r| &r.members)
    }

    /// Number of members of `room`.
    pub fn count(&self, room: RoomId) -> usize {
        self.rooms.get(&room).map_or(0, |r| r.members.len())
    }

    /// Number of rooms with members.
    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    /// Members over all rooms.
    pub fn memberships(&self) -> usize {
        self.memberships
    }

    /// Adds `conn`; returns false if it was already a member.
    pub fn join(&mut self, room: RoomId, conn: ConnId) -> bool {
        let r = self.rooms.entry(room).or_default();
        if r.position.contains_key(&conn) {
            return false;
        }
        r.position.insert(conn, r.members.len());
        r.members.push(conn);
        self.memberships += 1;
        true
    }

    /// Removes `conn`; returns false if it was not a member. The room goes with its last
    /// member.
    pub fn leave(&mut self, room: RoomId, conn: ConnId) -> bool {
        let Some(r) = self.rooms.get_mut(&room) else {
            return false;
        };
        let Some(at) = r.position.remove(&conn) else {
            return false;
        };
        r.members.swap_remove(at);
        self.memberships -= 1;
        if let Some(&moved) = r.members.get(at) {
            r.position.insert(moved, at);
        }
        if r.members.is_empty() {
            self.rooms.remove(&room);
        }
        true
    }

    /// Counts room messages dropped for slow members of `room`.
    pub fn count_dropped(&mut self, room: RoomId, n: u64) {
        if let Some(r) = self.rooms.get_mut(&room) {
            r.dropped += n;
        }
    }

    /// Room messages dropped for slow members of `room` so far.
    pub fn dropped(&self, room: RoomId) -> u64 {
        self.rooms.get(&room).map_or(0, |r| r.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_leave_keeps_positions_consistent() {
        let mut rooms = Rooms::new(1);
        let room = RoomId(9);
        for i in 0..5 {
            assert!(rooms.join(room, ConnId(i)));
        }
        assert!(!rooms.join(room, ConnId(2)));
        assert!(rooms.leave(room, ConnId(1)));
        assert!(!rooms.leave(room, ConnId(1)));
        assert!(rooms.leave(room, ConnId(4)));
        let mut left: Vec<usize> = rooms.members(room).iter().map(|c| c.0).collect();
        left.sort();
        assert_eq!(left, vec![0, 2, 3]);
        for i in [0, 2, 3] {
            assert!(rooms.leave(room, ConnId(i)));
        }
        assert_eq!(rooms.len(), 0);
        assert_eq!(rooms.count(room), 0);
    }
}
