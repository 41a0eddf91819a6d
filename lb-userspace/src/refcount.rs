//! Users counted per key: a key is in the map while it has users, and goes with the last one.

use std::{collections::BTreeMap, hash::Hash};

use crate::fast_hash;

/// A map of user counts: ordered (`BTreeMap`) or hashed (`fast_hash::Map`).
pub trait Counts<K> {
    /// One more user: one lookup, the key inserted if new. Returns the count.
    fn increment(&mut self, key: K) -> u32;
    fn count_mut(&mut self, key: &K) -> Option<&mut u32>;
    fn remove_count(&mut self, key: &K);
}

impl<K: Ord> Counts<K> for BTreeMap<K, u32> {
    fn increment(&mut self, key: K) -> u32 {
        let n = self.entry(key).or_insert(0);
        *n += 1;
        *n
    }
    fn count_mut(&mut self, key: &K) -> Option<&mut u32> {
        self.get_mut(key)
    }
    fn remove_count(&mut self, key: &K) {
        self.remove(key);
    }
}

impl<K: Hash + Eq> Counts<K> for fast_hash::Map<K, u32> {
    fn increment(&mut self, key: K) -> u32 {
        let n = self.entry(key).or_insert(0);
        *n += 1;
        *n
    }
    fn count_mut(&mut self, key: &K) -> Option<&mut u32> {
        self.get_mut(key)
    }
    fn remove_count(&mut self, key: &K) {
        self.remove(key);
    }
}

/// One more (`up`) or one fewer user of `key`; returns how many it has left (0: the key is
/// gone from the map).
pub fn bump<K>(map: &mut impl Counts<K>, key: K, up: bool) -> u32 {
    if up {
        return map.increment(key);
    }
    let left = match map.count_mut(&key) {
        Some(n) => {
            *n -= 1;
            *n
        }
        None => return 0,
    };
    if left == 0 {
        map.remove_count(&key);
    }
    left
}
