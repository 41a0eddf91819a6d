//! A Maglev table as the agent remembers it: its distinct backend ids and, per slot, which of
//! them the slot holds. The planner keeps one per table the maps hold (to rebuild a table
//! with only the removed backend's share of flows moved); at 4 backends a table has 401
//! slots, so one byte per slot instead of a 4-byte id is 1.2 KB less per Service.

/// A table's slots as indexes into its sorted distinct backend ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    members: Vec<u32>,
    slots: Slots,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Slots {
    /// Up to 256 distinct backends: an index per slot.
    Narrow(Box<[u8]>),
    /// More: the ids themselves.
    Wide(Box<[u32]>),
}

impl Table {
    pub fn new(ids: &[u32]) -> Self {
        let mut members = ids.to_vec();
        members.sort_unstable();
        members.dedup();
        let slots = if members.len() <= 256 {
            // `members` is sorted: the slot's index is where its id sits.
            Slots::Narrow(ids.iter().map(|id| members.binary_search(id).unwrap_or(0) as u8).collect())
        } else {
            Slots::Wide(ids.into())
        };
        Table { members, slots }
    }

    /// The distinct backend ids, sorted.
    pub fn members(&self) -> &[u32] {
        &self.members
    }

    /// Slots in the table.
    pub fn len(&self) -> u32 {
        match &self.slots {
            Slots::Narrow(s) => s.len() as u32,
            Slots::Wide(s) => s.len() as u32,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The backend id of each slot, as the map holds them.
    pub fn ids(&self) -> Vec<u32> {
        match &self.slots {
            Slots::Narrow(s) => s.iter().map(|i| self.members[*i as usize]).collect(),
            Slots::Wide(s) => s.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_reads_back_as_it_was_written_narrow_or_wide() {
        let narrow: Vec<u32> = (0..401u32).map(|i| [7, 3, 90_000, 12][(i * 7 % 4) as usize]).collect();
        let t = Table::new(&narrow);
        assert_eq!((t.ids(), t.len(), t.members()), (narrow.clone(), 401, &[3, 7, 12, 90_000][..]));
        assert!(matches!(t.slots, Slots::Narrow(_)));
        let wide: Vec<u32> = (0..1009u32).map(|i| i % 300 * 11).collect();
        let t = Table::new(&wide);
        assert_eq!((t.ids(), t.members().len()), (wide, 300));
        assert!(matches!(t.slots, Slots::Wide(_)));
        assert!(Table::new(&[]).is_empty());
    }
}
