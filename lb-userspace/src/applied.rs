//! What the maps hold, as far as the reconciler cares (`Applied`), and the lookups over it
//! that keep a plan of a few changes from rebuilding them from every entry (`Index`).
//! `execute` records each op here once the kernel has it.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
};

use ipnet::IpNet;
use lb_common::abi::*;

use crate::{
    compact_table::Table,
    dataplane::{Dataplane, DataplaneError},
    fast_hash,
    free_ids::FreeIds,
    range_alloc::RangeAlloc,
    reconcile::MapOp,
    refcount::bump,
};

/// What the maps hold, as far as the reconciler cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, BackendValue>,
    /// Tables of the ranges frontends point at, by offset (with their distinct backend ids).
    pub tables: BTreeMap<u32, Table>,
    pub source_ranges: BTreeSet<(u32, IpNet)>,
    /// Which backend ids each service id holds (usable or terminating), for affinity and UDP
    /// flows in the datapath.
    pub members: BTreeMap<MemberKey, MemberValue>,
    /// Lookups over the fields above, kept up to date by `record`, so a plan of a few
    /// changes does not rebuild them from every entry.
    pub index: Index,
}

/// Indexes derived from `Applied`'s maps. They take part in no comparison: two `Applied`
/// are equal when their maps are.
#[derive(Debug, Clone, Default)]
pub struct Index {
    /// Backend id of each `ip:port`.
    pub by_addr: fast_hash::Map<(IpAddr, u16), u32>,
    /// Frontend entries per service id.
    pub service_ids: BTreeMap<u32, u32>,
    /// Frontend entries pointing at each table offset.
    pub table_users: BTreeMap<u32, u32>,
    /// Free Maglev ranges; built on first use (it needs the capacity), then kept.
    pub ranges: Option<RangeAlloc>,
    /// Backend ids neither in the backend map nor in quarantine.
    pub free_backend_ids: FreeIds,
    /// Service ids no frontend entry points at.
    pub free_service_ids: FreeIds,
    /// The highest membership generation handed out.
    pub max_generation: u32,
    /// Maglev ranges and backend ids given up lately: not reused until `QUARANTINE` has
    /// passed, so a packet that read a service entry just before it flipped never finds its
    /// old table or backend ids taken by another service.
    pub quarantine: Quarantine,
}

/// How long a released Maglev range or backend id stays unused: far longer than any program
/// run (microseconds) that may still hold the old service entry, and short enough that the
/// ranges held back under a burst of table rewrites stay a small part of the array.
pub const QUARANTINE: std::time::Duration = std::time::Duration::from_millis(200);

#[derive(Debug, Clone)]
pub struct Quarantine {
    /// `QUARANTINE`; tests that run many syncs in a row without a clock set zero.
    pub hold: std::time::Duration,
    /// In the order they were given up (so the ones whose time is up are at the front).
    pub ranges: VecDeque<(std::time::Instant, u32, u32)>,
    pub backend_ids: VecDeque<(std::time::Instant, u32)>,
}

impl Default for Quarantine {
    fn default() -> Self {
        Quarantine { hold: QUARANTINE, ranges: VecDeque::new(), backend_ids: VecDeque::new() }
    }
}

impl PartialEq for Index {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Index {}

impl Applied {
    /// Reads the state back from the maps.
    pub fn read(dp: &impl Dataplane) -> Result<Self, DataplaneError> {
        let services: BTreeMap<_, _> = dp.services()?.into_iter().collect();
        // Read in ascending offsets: the array is mapped a window at a time.
        let ranges: BTreeMap<u32, u32> = services
            .values()
            .filter(|v| v.maglev_size > 0)
            .map(|v| (v.maglev_offset, v.maglev_size))
            .collect();
        let mut tables = BTreeMap::new();
        for (offset, size) in ranges {
            tables.insert(offset, Table::new(&dp.read_maglev(offset, size)?));
        }
        let backends: BTreeMap<u32, BackendValue> = dp.backends()?.into_iter().collect();
        let members: BTreeMap<MemberKey, MemberValue> = dp.members()?.into_iter().collect();
        let mut index = Index {
            by_addr: backends.iter().map(|(id, b)| ((b.ip(), b.port()), *id)).collect(),
            max_generation: members.values().map(|m| m.generation).max().unwrap_or(0),
            free_backend_ids: FreeIds::all_but(backends.keys().copied()),
            ..Default::default()
        };
        for v in services.values() {
            bump(&mut index.service_ids, v.service_id, true);
            index.free_service_ids.take(v.service_id);
            if v.maglev_size > 0 {
                bump(&mut index.table_users, v.maglev_offset, true);
            }
        }
        Ok(Applied {
            services,
            backends,
            tables,
            source_ranges: dp.source_ranges()?.into_iter().collect(),
            members,
            index,
        })
    }

    /// Frees the quarantined ranges and ids whose time is up.
    pub fn release_quarantine(&mut self) {
        let now = std::time::Instant::now();
        let index = &mut self.index;
        let hold = index.quarantine.hold;
        let q = &mut index.quarantine;
        while let Some(&(t, id)) = q.backend_ids.front()
            && now.duration_since(t) >= hold
        {
            q.backend_ids.pop_front();
            // (Unless a failed sync's redo quarantined it twice and it was reused meanwhile.)
            if !self.backends.contains_key(&id) {
                index.free_backend_ids.give(id);
            }
        }
        while let Some(&(t, off, len)) = q.ranges.front()
            && now.duration_since(t) >= hold
        {
            q.ranges.pop_front();
            if let Some(r) = &mut index.ranges {
                r.free(off, len);
            }
        }
    }

    /// When the first quarantined range or id is free again, if any is held.
    pub fn quarantine_ends(&self) -> Option<std::time::Instant> {
        let q = &self.index.quarantine;
        let range = q.ranges.front().map(|(t, _, _)| *t);
        range.into_iter().chain(q.backend_ids.front().map(|(t, _)| *t)).min().map(|t| t + q.hold)
    }

    /// The free Maglev ranges for a plan (built from the tables the first time).
    pub(crate) fn free_ranges(&self, capacity: u32) -> RangeAlloc {
        if let Some(r) = &self.index.ranges {
            return r.clone();
        }
        let mut r = RangeAlloc::new(capacity);
        for (off, t) in &self.tables {
            r.reserve(*off, t.len());
        }
        r
    }

    /// Starts keeping the free ranges (`capacity`: the Maglev array's), so that plans need
    /// not rebuild them from every table.
    pub fn track_ranges(&mut self, capacity: u32) {
        if self.index.ranges.is_none() {
            self.index.ranges = Some(self.free_ranges(capacity));
        }
    }

    /// One fewer frontend entry points at `offset`: the table goes with the last one.
    fn release_table(&mut self, offset: u32) {
        if bump(&mut self.index.table_users, offset, false) == 0
            && let Some(t) = self.tables.remove(&offset)
            && self.index.ranges.is_some()
        {
            self.index.quarantine.ranges.push_back((std::time::Instant::now(), offset, t.len()));
        }
    }

    /// Records a batch of ops of one kind as done, as `record` would one by one. A first
    /// sync fills empty maps with hundreds of thousands of entries: those are built in one
    /// sorted pass instead of one B-tree insert each (at 100 000 Services the inserts took
    /// a third of the map-write time).
    pub fn record_all(&mut self, ops: &[MapOp]) {
        if ops.len() < BULK || !self.record_into_empty(ops) {
            ops.iter().for_each(|op| self.record(op));
        }
    }

    /// `record_all` of a batch of backend, membership or frontend writes into maps that hold
    /// none yet, with distinct keys. False (nothing recorded) otherwise.
    fn record_into_empty(&mut self, ops: &[MapOp]) -> bool {
        let index = &mut self.index;
        match &ops[0] {
            MapOp::SetBackend { .. } => {
                let entries = ops.iter().filter_map(|op| match op {
                    MapOp::SetBackend { id, value } => Some((*id, *value)),
                    _ => None,
                });
                if !index.by_addr.is_empty() || !fill_empty(&mut self.backends, entries, ops.len()) {
                    return false;
                }
                // (The last id written for an address wins, as one by one.)
                // Sized first: collected from a filter, the table grew by doubling.
                index.by_addr.reserve(ops.len());
                index.by_addr.extend(ops.iter().filter_map(|op| match op {
                    MapOp::SetBackend { id, value } => Some(((value.ip(), value.port()), *id)),
                    _ => None,
                }));
                self.backends.keys().for_each(|id| index.free_backend_ids.take(*id));
                true
            }
            MapOp::SetMember { .. } => {
                let entries = ops.iter().filter_map(|op| match op {
                    MapOp::SetMember { key, value } => Some((*key, *value)),
                    _ => None,
                });
                if !fill_empty(&mut self.members, entries, ops.len()) {
                    return false;
                }
                let top = self.members.values().map(|m| m.generation).max().unwrap_or(0);
                index.max_generation = index.max_generation.max(top);
                true
            }
            MapOp::SetService { .. } => {
                let entries = ops.iter().filter_map(|op| match op {
                    MapOp::SetService { key, value } => Some((*key, *value)),
                    _ => None,
                });
                if !index.service_ids.is_empty()
                    || !index.table_users.is_empty()
                    || !fill_empty(&mut self.services, entries, ops.len())
                {
                    return false;
                }
                let values = self.services.values();
                index.service_ids = counts(values.clone().map(|v| v.service_id));
                index.table_users = counts(values.filter(|v| v.maglev_size > 0).map(|v| v.maglev_offset));
                // Ascending, so the free-id set never holds a gap that is taken the next moment.
                index.service_ids.keys().for_each(|id| index.free_service_ids.take(*id));
                true
            }
            _ => false,
        }
    }

    /// Records an op as done. A table is forgotten (its range free) when the last frontend
    /// entry pointing at it goes or moves.
    pub fn record(&mut self, op: &MapOp) {
        match op {
            MapOp::SetBackend { id, value } => {
                if let Some(old) = self.backends.insert(*id, *value)
                    && self.index.by_addr.get(&(old.ip(), old.port())) == Some(id)
                {
                    self.index.by_addr.remove(&(old.ip(), old.port()));
                }
                self.index.by_addr.insert((value.ip(), value.port()), *id);
                self.index.free_backend_ids.take(*id);
            }
            MapOp::AllowSource { service_id, net } => {
                self.source_ranges.insert((*service_id, *net));
            }
            MapOp::SetMember { key, value } => {
                self.index.max_generation = self.index.max_generation.max(value.generation);
                self.members.insert(*key, *value);
            }
            MapOp::RemoveMember { key } => {
                self.members.remove(key);
            }
            MapOp::WriteMaglev { offset, table } => {
                if let Some(r) = &mut self.index.ranges {
                    r.reserve(*offset, table.len());
                }
                self.tables.insert(*offset, table.clone());
            }
            MapOp::SetService { key, value } => {
                bump(&mut self.index.service_ids, value.service_id, true);
                self.index.free_service_ids.take(value.service_id);
                if value.maglev_size > 0 {
                    bump(&mut self.index.table_users, value.maglev_offset, true);
                }
                if let Some(old) = self.services.insert(*key, *value) {
                    self.forget_entry(&old);
                }
            }
            MapOp::RemoveService { key } => {
                if let Some(old) = self.services.remove(key) {
                    self.forget_entry(&old);
                }
            }
            MapOp::DisallowSource { service_id, net } => {
                self.source_ranges.remove(&(*service_id, *net));
            }
            MapOp::RemoveBackend { id } => {
                self.index.quarantine.backend_ids.push_back((std::time::Instant::now(), *id));
                if let Some(old) = self.backends.remove(id)
                    && self.index.by_addr.get(&(old.ip(), old.port())) == Some(id)
                {
                    self.index.by_addr.remove(&(old.ip(), old.port()));
                }
            }
        }
    }

    fn forget_entry(&mut self, old: &ServiceValue) {
        if bump(&mut self.index.service_ids, old.service_id, false) == 0 {
            self.index.free_service_ids.give(old.service_id);
        }
        if old.maglev_size > 0 {
            self.release_table(old.maglev_offset);
        }
    }

    /// Forgets tables written but never pointed at (a plan that stopped half way).
    pub(crate) fn prune_unused(&mut self, written: &[u32]) {
        for off in written {
            if !self.index.table_users.contains_key(off)
                && let Some(t) = self.tables.remove(off)
                && let Some(r) = &mut self.index.ranges
            {
                r.free(*off, t.len());
            }
        }
    }
}

/// Batches this long or longer are worth a bulk build when their map is empty.
const BULK: usize = 64;

/// Fills the empty `map` with `entries` (`n` of them) in one sorted build, when their keys
/// are distinct. False (the map left empty) otherwise.
fn fill_empty<K: Ord, V>(map: &mut BTreeMap<K, V>, entries: impl Iterator<Item = (K, V)>, n: usize) -> bool {
    if !map.is_empty() {
        return false;
    }
    let built: BTreeMap<K, V> = entries.collect();
    if built.len() != n {
        return false;
    }
    *map = built;
    true
}

/// How many times each key occurs.
fn counts(keys: impl Iterator<Item = u32>) -> BTreeMap<u32, u32> {
    let mut sorted: Vec<u32> = keys.collect();
    sorted.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::new();
    for k in sorted {
        match out.last_mut() {
            Some((last, n)) if *last == k => *n += 1,
            _ => out.push((k, 1)),
        }
    }
    out.into_iter().collect()
}
