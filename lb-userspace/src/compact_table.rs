//! A Maglev table as the agent remembers it: its distinct backend ids and, per slot, which of
//! them the slot holds, in as few bits as their count needs. The planner keeps one per table
//! the maps hold (to rebuild a table with only the removed backend's share of flows moved);
//! at 4 backends a table has 401 slots: 2 bits a slot is 101 bytes, against 1.6 KB of ids.

/// A table's slots as indexes into its sorted distinct backend ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    members: Vec<u32>,
    slots: Slots,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Slots {
    /// Up to 256 distinct backends: an index per slot, `bits` (1, 2, 4 or 8) each, packed
    /// from the low bits of each byte up.
    Packed { bits: u8, len: u32, bytes: Box<[u8]> },
    /// More: the ids themselves.
    Wide(Box<[u32]>),
}

impl Slots {
    /// `indexes` (each below `members`) packed in the fewest bits that hold `members - 1`.
    fn packed(members: usize, len: usize, indexes: impl Iterator<Item = u8>) -> Self {
        let bits: u8 = match members {
            0..=2 => 1,
            3..=4 => 2,
            5..=16 => 4,
            _ => 8,
        };
        let (log, per_byte) = per_byte(bits);
        let mut bytes = vec![0u8; len.div_ceil(per_byte)].into_boxed_slice();
        for (i, index) in indexes.enumerate() {
            bytes[i >> log] |= index << ((i & (per_byte - 1)) as u8 * bits);
        }
        Slots::Packed { bits, len: len as u32, bytes }
    }
}

impl Table {
    pub fn new(ids: &[u32]) -> Self {
        let members = distinct(ids);
        let slots = if members.len() <= 256 {
            // `members` is sorted and distinct: a slot's index is how many members are below
            // its id (a compare of every member when they are few, which vectorises: a first
            // sync records 100 000 tables of 401 slots).
            let index = |id: &u32| match members.len() {
                0..=16 => members.iter().filter(|m| *m < id).count(),
                _ => members.binary_search(id).unwrap_or(0),
            };
            Slots::packed(members.len(), ids.len(), ids.iter().map(|id| index(id) as u8))
        } else {
            Slots::Wide(ids.into())
        };
        Table { members, slots }
    }

    /// A table built ahead as each slot's position among `n` backends (`fresh_tables`), its
    /// members the positions `0..n` until `renumbered`. When every backend has a slot (the
    /// table is at least `n` long) a position is its own rank: packed as it is, no search.
    pub fn of_positions(positions: &[u32], n: usize) -> Self {
        if n > 256 || positions.len() < n {
            return Table::new(positions);
        }
        let slots = Slots::packed(n, positions.len(), positions.iter().map(|p| *p as u8));
        Table { members: (0..n as u32).collect(), slots }
    }

    /// This table of positions (`of_positions`) with each position `p` replaced by the id
    /// `in_order[p]`. A first sync hands out ids in the backends' order, so the ranks stay
    /// and only the members change.
    pub fn renumbered(self, in_order: &[u32]) -> Self {
        let ranks_kept = matches!(self.slots, Slots::Packed { .. })
            && self.members.len() == in_order.len()
            && self.members.iter().enumerate().all(|(i, p)| *p as usize == i)
            && in_order.is_sorted_by(|a, b| a < b);
        if ranks_kept {
            // In place: the table was built on another thread, and freeing its members here
            // (another allocator arena) cost more than the copy.
            let mut t = self;
            t.members.copy_from_slice(in_order);
            return t;
        }
        let ids: Vec<u32> = self.iter().map(|p| in_order[p as usize]).collect();
        Table::new(&ids)
    }

    /// The backend id of each slot, in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let (packed, wide) = match &self.slots {
            Slots::Packed { bits, len, bytes } => ((*bits, *len as usize, &bytes[..]), &[][..]),
            Slots::Wide(s) => ((8, 0, &[][..]), &s[..]),
        };
        let (bits, len, bytes) = packed;
        let ((log, per_byte), mask) = (per_byte(bits), ((1u16 << bits) - 1) as u8);
        (0..len)
            .map(move |i| {
                let index = (bytes[i >> log] >> ((i & (per_byte - 1)) as u8 * bits)) & mask;
                self.members[usize::from(index)]
            })
            .chain(wide.iter().copied())
    }

    /// The backend id of each slot, into `out` (cleared first): as `iter`, a byte of packed
    /// slots at a time through a small lookup table, which a first sync of 100 000 tables
    /// (40 million slots) writes in a fraction of the slot-by-slot time.
    pub fn ids_into(&self, out: &mut Vec<u32>) {
        out.clear();
        match &self.slots {
            Slots::Packed { bits: 1, len, bytes } => unpack::<1>(&self.members, bytes, *len, out),
            Slots::Packed { bits: 2, len, bytes } => unpack::<2>(&self.members, bytes, *len, out),
            Slots::Packed { bits: 4, len, bytes } => unpack::<4>(&self.members, bytes, *len, out),
            Slots::Packed { len, bytes, .. } => unpack::<8>(&self.members, bytes, *len, out),
            Slots::Wide(s) => out.extend_from_slice(s),
        }
    }

    /// The distinct backend ids, sorted.
    pub fn members(&self) -> &[u32] {
        &self.members
    }

    /// Slots in the table.
    pub fn len(&self) -> u32 {
        match &self.slots {
            Slots::Packed { len, .. } => *len,
            Slots::Wide(s) => s.len() as u32,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The backend id of each slot, as the map holds them.
    pub fn ids(&self) -> Vec<u32> {
        self.iter().collect()
    }
}

/// Slots per byte at `bits` (1, 2, 4 or 8) a slot, and its log2: a slot's byte is found by a
/// shift, not a division (a first sync reads 40 million slots at 100 000 Services).
fn per_byte(bits: u8) -> (u32, usize) {
    let log = 3 - bits.trailing_zeros();
    (log, 1 << log)
}

/// Slots packed `BITS` a slot (`Slots::Packed`) as the ids of `members`, appended to `out`.
fn unpack<const BITS: usize>(members: &[u32], bytes: &[u8], len: u32, out: &mut Vec<u32>) {
    let per_byte = 8 / BITS;
    let mask = (1usize << BITS) - 1;
    // Every index a slot can hold has an entry: no bounds check in the loop.
    let mut lut = [0u32; 256];
    lut[..members.len()].copy_from_slice(members);
    let lut = &lut[..=mask];
    out.resize(bytes.len() * per_byte, 0);
    for (chunk, byte) in out.chunks_exact_mut(per_byte).zip(bytes) {
        for (k, slot) in chunk.iter_mut().enumerate() {
            *slot = lut[(usize::from(*byte) >> (k * BITS)) & mask];
        }
    }
    out.truncate(len as usize);
}

/// The distinct ids of `ids`, sorted. Most tables have a handful among hundreds of slots:
/// gathered by a scan, not by sorting every slot (which took 9 µs a table, most of a first
/// sync's map-write time at 100 000 Services).
fn distinct(ids: &[u32]) -> Vec<u32> {
    const FEW: usize = 16;
    let mut few: Vec<u32> = Vec::with_capacity(FEW);
    let mut last = None;
    for id in ids {
        // (Runs of one id are common in a table rebuilt from its previous one.)
        if last != Some(id) && !few.contains(id) {
            if few.len() == FEW {
                let mut all = ids.to_vec();
                all.sort_unstable();
                all.dedup();
                return all;
            }
            few.push(*id);
        }
        last = Some(id);
    }
    few.sort_unstable();
    few
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_reads_back_as_it_was_written_packed_or_wide() {
        let narrow: Vec<u32> = (0..401u32).map(|i| [7, 3, 90_000, 12][(i * 7 % 4) as usize]).collect();
        let t = Table::new(&narrow);
        assert_eq!((t.ids(), t.len(), t.members()), (narrow.clone(), 401, &[3, 7, 12, 90_000][..]));
        assert!(matches!(t.slots, Slots::Packed { bits: 2, .. }));
        // More than a scan gathers, still narrow.
        let mid: Vec<u32> = (0..401u32).map(|i| (i * 13) % 40 * 3 + 1).collect();
        let t = Table::new(&mid);
        assert_eq!((t.ids(), t.members().len()), (mid, 40));
        assert!(t.members().is_sorted());
        assert!(matches!(t.slots, Slots::Packed { bits: 8, .. }));
        // Every width, and a length that leaves the last byte part full.
        for (n, bits) in [(1, 1), (2, 1), (3, 2), (4, 2), (5, 4), (16, 4), (17, 8), (256, 8)] {
            let ids: Vec<u32> = (0..1009u32).map(|i| (i * 7919) % n * 5 + 2).collect();
            let t = Table::new(&ids);
            let mut unpacked = vec![1, 2, 3];
            t.ids_into(&mut unpacked);
            assert_eq!(unpacked, ids, "{n} members, unpacked by byte");
            assert_eq!((t.ids(), t.len(), t.members().len()), (ids, 1009, n as usize), "{n} members");
            let Slots::Packed { bits: b, bytes, .. } = &t.slots else { panic!("{n}: packed") };
            assert_eq!((*b, bytes.len()), (bits, 1009usize.div_ceil(usize::from(8 / bits))), "{n} members");
        }
        let wide: Vec<u32> = (0..1009u32).map(|i| i % 300 * 11).collect();
        let t = Table::new(&wide);
        assert_eq!((t.ids(), t.members().len()), (wide.clone(), 300));
        let mut unpacked = Vec::new();
        t.ids_into(&mut unpacked);
        assert_eq!(unpacked, wide);
        assert!(matches!(t.slots, Slots::Wide(_)));
        assert!(Table::new(&[]).is_empty());
        // Built from positions: the same table as from its ids.
        let in_order = [90_000, 7, 12, 3];
        let positions: Vec<u32> = (0..401u32).map(|i| i * 7 % 4).collect();
        let ids: Vec<u32> = positions.iter().map(|p| in_order[*p as usize]).collect();
        assert_eq!(Table::of_positions(&positions, 4).renumbered(&in_order), Table::new(&ids));
        // Ids in ascending order (a first sync's): the same table by the short way.
        let in_order = [3, 7, 12, 90_000];
        let ids: Vec<u32> = positions.iter().map(|p| in_order[*p as usize]).collect();
        assert_eq!(Table::of_positions(&positions, 4).renumbered(&in_order), Table::new(&ids));
        // More backends than a byte holds, and a table too short for every backend.
        let in_order: Vec<u32> = (0..300u32).rev().map(|i| i * 11).collect();
        let positions: Vec<u32> = (0..1009u32).map(|i| i % 300).collect();
        let ids: Vec<u32> = positions.iter().map(|p| in_order[*p as usize]).collect();
        assert_eq!(Table::of_positions(&positions, 300).renumbered(&in_order), Table::new(&ids));
        let in_order: Vec<u32> = (10..20u32).collect();
        let positions: Vec<u32> = (0..7u32).map(|i| i * 3 % 10).collect();
        let ids: Vec<u32> = positions.iter().map(|p| in_order[*p as usize]).collect();
        assert_eq!(Table::of_positions(&positions, 10).renumbered(&in_order), Table::new(&ids));
    }
}
