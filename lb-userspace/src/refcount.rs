//! Users counted per key: a key is in the map while it has users, and goes with the last one.

use std::collections::{BTreeMap, btree_map::Entry};

/// One more (`up`) or one fewer user of `key`; returns how many it has left (0: the key is
/// gone from the map).
pub fn bump<K: Ord>(map: &mut BTreeMap<K, u32>, key: K, up: bool) -> u32 {
    match map.entry(key) {
        Entry::Occupied(mut e) => {
            let left = if up { *e.get() + 1 } else { e.get() - 1 };
            if left == 0 {
                e.remove();
            } else {
                *e.get_mut() = left;
            }
            left
        }
        Entry::Vacant(e) => {
            if up {
                e.insert(1);
            }
            u32::from(up)
        }
    }
}
