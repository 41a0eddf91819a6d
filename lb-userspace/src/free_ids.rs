//! Which ids of a map are free to hand out, kept up to date as ids are used and released,
//! and the pool one plan takes its new ids from.
//!
//! Why a kept set and not a search: a plan used to find a free id by walking the used ids
//! from the bottom, once per plan. Under a stream of EndpointSlice updates every sync plans a
//! few new backends, and at 100 000 Services the walk crossed 400 000 used ids each time.

use std::collections::BTreeSet;

/// The free ids of one map: every id from `top` on, and the ones below it in `gaps`. Id 0
/// is never free (it means "none" in the maps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreeIds {
    gaps: BTreeSet<u32>,
    top: u32,
}

impl Default for FreeIds {
    fn default() -> Self {
        FreeIds { gaps: BTreeSet::new(), top: 1 }
    }
}

impl FreeIds {
    /// The ids not in `used` (ascending or not).
    pub fn all_but(used: impl IntoIterator<Item = u32>) -> Self {
        let mut free = FreeIds::default();
        for id in used {
            free.take(id);
        }
        free
    }

    /// `id` is in use now.
    pub fn take(&mut self, id: u32) {
        if id == 0 {
            return;
        }
        if id >= self.top {
            self.gaps.extend(self.top..id);
            self.top = id + 1;
        } else {
            self.gaps.remove(&id);
        }
    }

    /// `id` is free again.
    pub fn give(&mut self, id: u32) {
        if id == 0 || id >= self.top {
            return;
        }
        if id + 1 == self.top {
            // Lower the top over the free ids below it, so the gaps stay few.
            self.top = id;
            while let Some(&last) = self.gaps.last()
                && last + 1 == self.top
            {
                self.gaps.pop_last();
                self.top = last;
            }
        } else {
            self.gaps.insert(id);
        }
    }

    pub fn is_free(&self, id: u32) -> bool {
        id != 0 && (id >= self.top || self.gaps.contains(&id))
    }

    /// The free ids from `from` on, in order (without end: the caller bounds them).
    fn from(&self, from: u32) -> impl Iterator<Item = u32> + '_ {
        self.gaps.range(from..).copied().chain(self.top.max(from).max(1)..=u32::MAX)
    }
}

/// The new ids one plan hands out: the lowest free one it has not taken yet, searched from a
/// cursor past the last one taken (it moves back when an id is given back).
pub struct IdPool {
    /// A bit per id (a full sync takes hundreds of thousands, nearly all in a row).
    taken: Vec<u64>,
    cursor: u32,
}

impl Default for IdPool {
    fn default() -> Self {
        IdPool { taken: Vec::new(), cursor: 1 }
    }
}

impl IdPool {
    /// A free id below `capacity`, now taken by this plan.
    pub fn take(&mut self, free: &FreeIds, capacity: u32) -> Option<u32> {
        let id = free.from(self.cursor).find(|id| !self.is_taken(*id))?;
        if id >= capacity {
            return None;
        }
        let (word, bit) = Self::at(id);
        if word >= self.taken.len() {
            self.taken.resize(word + 1, 0);
        }
        self.taken[word] |= bit;
        self.cursor = id + 1;
        Some(id)
    }

    /// An id this plan took goes back (its service did not fit).
    pub fn give_back(&mut self, id: u32) {
        if self.is_taken(id) {
            let (word, bit) = Self::at(id);
            self.taken[word] &= !bit;
            self.cursor = self.cursor.min(id);
        }
    }

    fn is_taken(&self, id: u32) -> bool {
        let (word, bit) = Self::at(id);
        self.taken.get(word).is_some_and(|w| w & bit != 0)
    }

    fn at(id: u32) -> (usize, u64) {
        ((id / 64) as usize, 1 << (id % 64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ids_follow_takes_and_gives() {
        let mut f = FreeIds::all_but([3, 1, 5]);
        assert_eq!(f.from(1).take(4).collect::<Vec<_>>(), [2, 4, 6, 7]);
        f.give(3);
        assert_eq!(f.from(1).take(4).collect::<Vec<_>>(), [2, 3, 4, 6]);
        // Giving the highest used id lowers the top over the gaps below it.
        f.give(5);
        assert_eq!(f, FreeIds::all_but([1]));
        assert!(f.is_free(2) && !f.is_free(1) && !f.is_free(0));
        f.take(0);
        f.give(0);
        assert_eq!(f, FreeIds::all_but([1]));
        assert_eq!(FreeIds::all_but([]), FreeIds::default());
    }

    #[test]
    fn a_pool_hands_out_each_free_id_once_within_capacity() {
        let free = FreeIds::all_but([1, 2, 3, 5, 6]);
        let mut pool = IdPool::default();
        assert_eq!(pool.take(&free, 9), Some(4));
        assert_eq!(pool.take(&free, 9), Some(7));
        assert_eq!(pool.take(&free, 9), Some(8));
        assert_eq!(pool.take(&free, 9), None, "9 is past the capacity");
        pool.give_back(7);
        assert_eq!(pool.take(&free, 9), Some(7));
        pool.give_back(42);
        assert_eq!(pool.take(&free, 9), None, "an id never taken does not move the cursor");
        let mut empty = IdPool::default();
        assert_eq!(empty.take(&FreeIds::default(), 2), Some(1));
        assert_eq!(empty.take(&FreeIds::default(), 2), None);
    }
}
