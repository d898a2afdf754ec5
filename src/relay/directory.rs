//! The user directory: which connections each logged-in user id has.

use std::hash::Hasher;

use super::hashing::{id_map, IdMap};
use crate::proto::UserId;
use crate::ConnId;

/// The connections of one user. Almost every user has one, so that case needs no heap.
#[derive(Debug)]
enum Devices {
    One(ConnId),
    Many(Vec<ConnId>),
}

impl Devices {
    fn as_slice(&self) -> &[ConnId] {
        match self {
            Devices::One(id) => std::slice::from_ref(id),
            Devices::Many(ids) => ids,
        }
    }
}

/// Maps user ids to their connections. Lookups are O(1); the map holds only users that are
/// logged in, so its size is bounded by the connection limit. Seeded (see `hashing.rs`).
#[derive(Debug)]
pub struct Directory {
    users: IdMap<UserId, Devices>,
}

impl Directory {
    /// An empty directory hashed with `seed`.
    pub fn new(seed: u64) -> Directory {
        Directory {
            users: id_map(seed),
        }
    }

    /// The connections of `user`, in login order; empty when the user is offline.
    pub fn devices(&self, user: UserId) -> &[ConnId] {
        self.users.get(&user).map_or(&[], Devices::as_slice)
    }

    /// Every user with at least one connection, in no particular order.
    pub fn user_ids(&self) -> impl Iterator<Item = UserId> + '_ {
        self.users.keys().copied()
    }

    /// Number of users with at least one connection.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Adds `conn` to `user`'s connections.
    pub fn insert(&mut self, user: UserId, conn: ConnId) {
        match self.users.get_mut(&user) {
            None => {
                self.users.insert(user, Devices::One(conn));
            }
            Some(Devices::Many(ids)) => ids.push(conn),
            Some(devices @ Devices::One(_)) => {
                let Devices::One(first) = *devices else {
                    unreachable!()
                };
                *devices = Devices::Many(vec![first, conn]);
            }
        }
    }

    /// Removes `conn` from `user`'s connections; the user disappears with its last one.
    pub fn remove(&mut self, user: UserId, conn: ConnId) {
        let Some(devices) = self.users.get_mut(&user) else {
            return;
        };
        match devices {
            Devices::One(id) if *id == conn => {
                self.users.remove(&user);
            }
            Devices::One(_) => {}
            Devices::Many(ids) => {
                ids.retain(|id| *id != conn);
                match ids.len() {
                    0 => {
                        self.users.remove(&user);
                    }
                    1 => *devices = Devices::One(ids[0]),
                    _ => {}
                }
            }
        }
    }
}

/// A fast unseeded hasher for keys the relay chooses itself (connection ids), never for a
/// value a peer picks: those maps use the seeded [`super::hashing::IdMap`].
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_then_many_then_none() {
        let mut d = Directory::new(1);
        let u = UserId(7);
        assert!(d.devices(u).is_empty());
        d.insert(u, ConnId(1));
        d.insert(u, ConnId(2));
        d.insert(u, ConnId(3));
        assert_eq!(d.devices(u), &[ConnId(1), ConnId(2), ConnId(3)]);
        d.remove(u, ConnId(2));
        assert_eq!(d.devices(u), &[ConnId(1), ConnId(3)]);
        d.remove(u, ConnId(1));
        assert_eq!(d.devices(u), &[ConnId(3)]);
        d.remove(u, ConnId(9));
        assert_eq!(d.devices(u), &[ConnId(3)]);
        d.remove(u, ConnId(3));
        assert!(d.devices(u).is_empty());
        assert_eq!(d.users(), 0);
    }
}
