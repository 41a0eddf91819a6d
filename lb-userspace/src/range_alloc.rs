//! Contiguous ranges of the shared Maglev array. A service's new table goes into a fresh
//! range, the frontend entry flips to it, then the old range is freed — so no packet ever
//! reads a half-written table. First fit, adjacent free ranges coalesce.

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    #[error("Maglev array full: no free range of {wanted} slots (capacity {capacity}, {free} free in total)")]
    Full { wanted: u32, capacity: u32, free: u32 },
}

/// Free-list allocator over `[0, capacity)`.
#[derive(Debug, Clone)]
pub struct RangeAlloc {
    capacity: u32,
    /// offset -> length of each free range, non-adjacent.
    free: BTreeMap<u32, u32>,
}

impl RangeAlloc {
    pub fn new(capacity: u32) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        RangeAlloc { capacity, free }
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn free_slots(&self) -> u32 {
        self.free.values().sum()
    }

    /// Allocates `len` contiguous slots, returns the offset.
    pub fn alloc(&mut self, len: u32) -> Result<u32, AllocError> {
        if len == 0 {
            return Ok(0);
        }
        let found = self.free.iter().find(|(_, l)| **l >= len).map(|(o, l)| (*o, *l));
        let Some((off, flen)) = found else {
            return Err(AllocError::Full { wanted: len, capacity: self.capacity, free: self.free_slots() });
        };
        self.free.remove(&off);
        if flen > len {
            self.free.insert(off + len, flen - len);
        }
        Ok(off)
    }

    /// Marks `[off, off+len)` as used (rebuilding state from maps after a restart).
    pub fn reserve(&mut self, off: u32, len: u32) -> bool {
        if len == 0 {
            return true;
        }
        let Some((&foff, &flen)) = self.free.range(..=off).next_back() else { return false };
        if foff + flen < off + len {
            return false;
        }
        self.free.remove(&foff);
        if off > foff {
            self.free.insert(foff, off - foff);
        }
        if foff + flen > off + len {
            self.free.insert(off + len, foff + flen - off - len);
        }
        true
    }

    /// Returns `[off, off+len)` to the free list, merging with neighbours.
    pub fn free(&mut self, off: u32, len: u32) {
        if len == 0 {
            return;
        }
        let (mut start, mut end) = (off, off + len);
        if let Some((&poff, &plen)) = self.free.range(..off).next_back() {
            debug_assert!(poff + plen <= off, "double free at {off}");
            if poff + plen == off {
                start = poff;
                self.free.remove(&poff);
            }
        }
        if let Some(&nlen) = self.free.get(&end) {
            self.free.remove(&end);
            end += nlen;
        }
        self.free.insert(start, end - start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_and_reuse() {
        let mut a = RangeAlloc::new(1000);
        let x = a.alloc(101).unwrap();
        let y = a.alloc(307).unwrap();
        assert_eq!((x, y), (0, 101));
        a.free(x, 101);
        assert_eq!(a.alloc(101).unwrap(), 0, "freed range is reused");
        assert_eq!(a.free_slots(), 1000 - 101 - 307);
    }

    #[test]
    fn coalesces_so_fragmentation_heals() {
        let mut a = RangeAlloc::new(300);
        let r: Vec<u32> = (0..3).map(|_| a.alloc(100).unwrap()).collect();
        assert!(a.alloc(1).is_err());
        a.free(r[0], 100);
        a.free(r[2], 100);
        // 200 slots free but not contiguous.
        assert_eq!(a.alloc(200), Err(AllocError::Full { wanted: 200, capacity: 300, free: 200 }));
        a.free(r[1], 100);
        assert_eq!(a.alloc(300).unwrap(), 0, "all three merged into one range");
    }

    #[test]
    fn flip_pattern_never_leaks() {
        // Replace a table again and again (alloc new, free old): usage stays constant.
        let mut a = RangeAlloc::new(10_000);
        let mut cur = a.alloc(401).unwrap();
        for i in 0..1000 {
            let size = if i % 2 == 0 { 307 } else { 401 };
            let new = a.alloc(size).unwrap();
            a.free(cur, if i % 2 == 0 { 401 } else { 307 });
            cur = new;
        }
        assert_eq!(a.free_slots(), 10_000 - 401);
    }

    #[test]
    fn reserve_rebuilds_state() {
        let mut a = RangeAlloc::new(1000);
        assert!(a.reserve(200, 100));
        assert!(!a.reserve(250, 10), "already used");
        assert_eq!(a.alloc(200).unwrap(), 0);
        assert_eq!(a.alloc(1).unwrap(), 300);
    }
}
