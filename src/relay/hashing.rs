//! Hashing for every map keyed by a value a peer chooses (user ids, room ids, addresses).
//!
//! Ids are picked by whoever connects, so a fixed hash function would let an attacker
//! choose ids that all collide and turn every lookup into a scan. Each map is seeded from
//! the seed the relay was created with ([`super::Relay::new`]): the caller draws it from
//! entropy in production and fixes it in tests and simulations, so the core itself never
//! reads entropy. foldhash is fast on u64 keys and, seeded per process, leaves an attacker
//! nothing to precompute.

use std::collections::HashMap;

/// The hasher builder of every peer-keyed map.
pub type IdState = foldhash::fast::FixedState;

/// A map keyed by a peer-chosen value.
pub type IdMap<K, V> = HashMap<K, V, IdState>;

/// An empty map hashed with `seed`.
pub fn id_map<K, V>(seed: u64) -> IdMap<K, V> {
    HashMap::with_hasher(IdState::with_seed(seed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn the_seed_changes_every_hash() {
        let (a, b) = (IdState::with_seed(1), IdState::with_seed(2));
        let same = (0u64..1000)
            .filter(|id| a.hash_one(id) == b.hash_one(id))
            .count();
        assert_eq!(same, 0);
    }
}
