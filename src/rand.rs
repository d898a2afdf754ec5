//! The small random source the crate needs: reconnect jitter and message-id tags in the
//! SDK, store epochs in the relay. Shared by both layers so neither depends on the other.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// A xorshift64* generator seeded from the process's hash randomness and the clock. Not for
/// secrets: it spreads reconnects and makes message ids unique per client instance.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded differently in every process and every call.
    pub fn from_entropy() -> Rng {
        let mut h = RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        Rng(h.finish() | 1)
    }

    /// A generator with a fixed seed, for tests.
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}
