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
        let per_byte = usize::from(8 / bits);
        let mut bytes = vec![0u8; len.div_ceil(per_byte)].into_boxed_slice();
        for (i, index) in indexes.enumerate() {
            bytes[i / per_byte] |= index << ((i % per_byte) as u8 * bits);
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

    /// A table built ahead as each slot's position in `in_order` (the service's backend ids in
    /// its backends' order, `fresh_tables`): a lookup per slot, no search.
    pub fn from_positions(positions: &[u16], in_order: &[u32]) -> Self {
        // The common case at a first sync: ids handed out in the backends' order, so each
        // position is its own rank (a plain narrowing, no lookup).
        if in_order.len() <= 256 && in_order.is_sorted_by(|a, b| a < b) {
            let slots = Slots::packed(in_order.len(), positions.len(), positions.iter().map(|p| *p as u8));
            return Table { members: in_order.to_vec(), slots };
        }
        let members = distinct(in_order);
        let slots = if members.len() <= 256 {
            let rank: Vec<u8> =
                in_order.iter().map(|id| members.binary_search(id).unwrap_or(0) as u8).collect();
            Slots::packed(members.len(), positions.len(), positions.iter().map(|p| rank[usize::from(*p)]))
        } else {
            Slots::Wide(positions.iter().map(|p| in_order[usize::from(*p)]).collect())
        };
        Table { members, slots }
    }

    /// The backend id of each slot, in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let (packed, wide) = match &self.slots {
            Slots::Packed { bits, len, bytes } => ((*bits, *len as usize, &bytes[..]), &[][..]),
            Slots::Wide(s) => ((8, 0, &[][..]), &s[..]),
        };
        let (bits, len, bytes) = packed;
        let (per_byte, mask) = (usize::from(8 / bits), ((1u16 << bits) - 1) as u8);
        (0..len)
            .map(move |i| {
                let index = (bytes[i / per_byte] >> ((i % per_byte) as u8 * bits)) & mask;
                self.members[usize::from(index)]
            })
            .chain(wide.iter().copied())
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
            assert_eq!((t.ids(), t.len(), t.members().len()), (ids, 1009, n as usize), "{n} members");
            let Slots::Packed { bits: b, bytes, .. } = &t.slots else { panic!("{n}: packed") };
            assert_eq!((*b, bytes.len()), (bits, 1009usize.div_ceil(usize::from(8 / bits))), "{n} members");
        }
        let wide: Vec<u32> = (0..1009u32).map(|i| i % 300 * 11).collect();
        let t = Table::new(&wide);
        assert_eq!((t.ids(), t.members().len()), (wide, 300));
        assert!(matches!(t.slots, Slots::Wide(_)));
        assert!(Table::new(&[]).is_empty());
        // Built from positions: the same table as from its ids.
        let in_order = [90_000, 7, 12, 3];
        let positions: Vec<u16> = (0..401u16).map(|i| i * 7 % 4).collect();
        let ids: Vec<u32> = positions.iter().map(|p| in_order[usize::from(*p)]).collect();
        assert_eq!(Table::from_positions(&positions, &in_order), Table::new(&ids));
        // Ids in ascending order (a first sync's): the same table by the short way.
        let in_order = [3, 7, 12, 90_000];
        let ids: Vec<u32> = positions.iter().map(|p| in_order[usize::from(*p)]).collect();
        assert_eq!(Table::from_positions(&positions, &in_order), Table::new(&ids));
        let in_order: Vec<u32> = (0..300u32).rev().map(|i| i * 11).collect();
        let positions: Vec<u16> = (0..1009u16).map(|i| i % 300).collect();
        let ids: Vec<u32> = positions.iter().map(|p| in_order[usize::from(*p)]).collect();
        assert_eq!(Table::from_positions(&positions, &in_order), Table::new(&ids));
    }
}
