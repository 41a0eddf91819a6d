//! The Reconciler: a pure diff from the desired state (Model) to the map writes that get the
//! datapath there. `plan(desired, applied)` returns ops; applying them and planning again
//! returns nothing.
//!
//! * `Applied` is read back from the maps themselves, so a restarted agent continues from what
//!   the kernel holds: ids stay stable across updates and restarts because a service keeps the
//!   id of the frontend entries it already has, and a backend the id of its `ip:port`.
//! * Order: backends, allowed source ranges and new Maglev ranges first, then frontend entries
//!   flip to them, then removals. A packet therefore never sees a service whose table or
//!   backends are half written. A table is never rewritten in place: a changed table goes to a
//!   fresh range, and the old range becomes free once no frontend points at it. Ids freed by a
//!   plan are not reused within it, so a live table never names a backend of another service.
//! * Maglev tables keep their size while backends are removed (shrinking to a quarter of the
//!   ideal size at most), and are rebuilt from the applied table so only the removed
//!   backend's share of flows moves (`maglev::rebuild`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use lb_common::abi::*;

use crate::{
    dataplane::{Dataplane, DataplaneError},
    maglev,
    model::{Backend, Desired, DesiredService, NoBackend},
    range_alloc::RangeAlloc,
};

/// One write to the datapath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapOp {
    SetBackend { id: u32, value: BackendValue },
    AllowSource { service_id: u32, net: IpNet },
    WriteMaglev { offset: u32, table: Vec<u32> },
    SetService { key: ServiceKey, value: ServiceValue },
    RemoveService { key: ServiceKey },
    DisallowSource { service_id: u32, net: IpNet },
    RemoveBackend { id: u32 },
}

/// Limits the plan must respect (the maps' capacities).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_table: u32,
    pub maglev_slots: u32,
    pub backends: u32,
    pub services: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("backend map full ({0} entries)")]
    BackendsFull(u32),
    #[error("service ids exhausted ({0})")]
    ServicesFull(u32),
    #[error("Maglev array full: no room for {0} more slots")]
    MaglevFull(u32),
}

/// What the maps hold, as far as the reconciler cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, BackendValue>,
    /// Tables of the ranges frontends point at, by offset.
    pub tables: BTreeMap<u32, Vec<u32>>,
    /// The distinct backend ids of each table, sorted (kept with `tables`).
    pub table_members: BTreeMap<u32, Vec<u32>>,
    pub source_ranges: BTreeSet<(u32, IpNet)>,
}

impl Applied {
    /// Reads the state back from the maps.
    pub fn read(dp: &impl Dataplane) -> Result<Self, DataplaneError> {
        let services: BTreeMap<_, _> = dp.services()?.into_iter().collect();
        let mut tables = BTreeMap::new();
        for v in services.values().filter(|v| v.maglev_size > 0) {
            if let std::collections::btree_map::Entry::Vacant(e) = tables.entry(v.maglev_offset) {
                e.insert(dp.read_maglev(v.maglev_offset, v.maglev_size)?);
            }
        }
        let table_members = tables.iter().map(|(off, t)| (*off, members_of(t))).collect();
        Ok(Applied {
            services,
            backends: dp.backends()?.into_iter().collect(),
            tables,
            table_members,
            source_ranges: dp.source_ranges()?.into_iter().collect(),
        })
    }

    /// Records an op as done.
    pub fn record(&mut self, op: &MapOp) {
        match op {
            MapOp::SetBackend { id, value } => {
                self.backends.insert(*id, *value);
            }
            MapOp::AllowSource { service_id, net } => {
                self.source_ranges.insert((*service_id, *net));
            }
            MapOp::WriteMaglev { offset, table } => {
                self.table_members.insert(*offset, members_of(table));
                self.tables.insert(*offset, table.clone());
            }
            MapOp::SetService { key, value } => {
                self.services.insert(*key, *value);
            }
            MapOp::RemoveService { key } => {
                self.services.remove(key);
            }
            MapOp::DisallowSource { service_id, net } => {
                self.source_ranges.remove(&(*service_id, *net));
            }
            MapOp::RemoveBackend { id } => {
                self.backends.remove(id);
            }
        }
    }

    /// Forgets tables no frontend points at any more (their ranges are free).
    pub fn prune_tables(&mut self) {
        let live: BTreeSet<u32> =
            self.services.values().filter(|v| v.maglev_size > 0).map(|v| v.maglev_offset).collect();
        self.tables.retain(|off, _| live.contains(off));
        self.table_members.retain(|off, _| live.contains(off));
    }
}

/// Performs `ops` in order, recording each in `applied` once the kernel has it.
pub fn execute(dp: &mut impl Dataplane, applied: &mut Applied, ops: &[MapOp]) -> Result<(), DataplaneError> {
    for op in ops {
        match op {
            MapOp::SetBackend { id, value } => dp.set_backend(*id, value)?,
            MapOp::AllowSource { service_id, net } => dp.allow_source(*service_id, net)?,
            MapOp::WriteMaglev { offset, table } => dp.write_maglev(*offset, table)?,
            MapOp::SetService { key, value } => dp.set_service(key, value)?,
            MapOp::RemoveService { key } => dp.remove_service(key)?,
            MapOp::DisallowSource { service_id, net } => dp.disallow_source(*service_id, net)?,
            MapOp::RemoveBackend { id } => dp.remove_backend(*id)?,
        }
        applied.record(op);
    }
    applied.prune_tables();
    Ok(())
}

fn members_of(table: &[u32]) -> Vec<u32> {
    let mut ids = table.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn backend_flags(b: &Backend) -> u8 {
    let mut f = BE_F_PRESENT;
    if b.local {
        f |= BE_F_LOCAL;
    }
    if b.terminating {
        f |= BE_F_TERMINATING;
    }
    f
}

/// The Maglev size for `n` backends given the current size: kept while it is at least the
/// ideal and at most four times it (removals do not reshuffle every flow), else the ideal.
fn table_size(n: usize, current: u32, max: u32) -> u32 {
    if n == 0 {
        return 0;
    }
    let ideal = maglev::table_size(n, max);
    if current >= ideal && current <= ideal.saturating_mul(4) { current } else { ideal }
}

fn lowest_free(used: &BTreeSet<u32>, from: u32, capacity: u32) -> Option<u32> {
    (from..capacity).find(|i| !used.contains(i))
}

fn service_flags(s: &DesiredService) -> u32 {
    let mut f = 0;
    if s.affinity_timeout.is_some() {
        f |= SVC_F_AFFINITY;
    }
    if s.no_backend == NoBackend::Drop {
        f |= SVC_F_DROP_NO_BACKEND;
    }
    if s.external {
        f |= SVC_F_EXTERNAL;
    }
    if !s.source_ranges.is_empty() {
        f |= SVC_F_SOURCE_RANGES;
    }
    f
}

/// The ops that take the maps from `applied` to `desired`.
pub fn plan(desired: &Desired, applied: &Applied, limits: &Limits) -> Result<Vec<MapOp>, PlanError> {
    let mut set_backends = Vec::new();
    let mut allow = Vec::new();
    let mut tables = Vec::new();
    let mut set_services = Vec::new();

    // Backends: keep the id of every ip:port the maps already hold.
    let by_addr: BTreeMap<(IpAddr, u16), u32> =
        applied.backends.iter().map(|(id, b)| ((b.ip(), b.port()), *id)).collect();
    let mut used_ids: BTreeSet<u32> = applied.backends.keys().copied().collect();
    used_ids.insert(0); // id 0 is "none" in the Maglev array's unused slots.
    let mut backend_ids: BTreeMap<(IpAddr, u16), u32> = BTreeMap::new();
    let mut next_id = 1;
    for s in desired.services.values() {
        for b in s.backends.iter().chain(&s.kept) {
            let addr = (b.ip, b.port);
            if backend_ids.contains_key(&addr) {
                continue;
            }
            let id = match by_addr.get(&addr) {
                Some(id) => *id,
                None => {
                    let id = lowest_free(&used_ids, next_id, limits.backends)
                        .ok_or(PlanError::BackendsFull(limits.backends))?;
                    used_ids.insert(id);
                    next_id = id + 1;
                    id
                }
            };
            backend_ids.insert(addr, id);
            let value = BackendValue::new(b.ip, b.port, backend_flags(b));
            if applied.backends.get(&id) != Some(&value) {
                set_backends.push(MapOp::SetBackend { id, value });
            }
        }
    }

    // Maglev ranges in use stay reserved for this whole plan (old tables serve until the flip).
    let mut ranges = RangeAlloc::new(limits.maglev_slots);
    for v in applied.services.values().filter(|v| v.maglev_size > 0) {
        ranges.reserve(v.maglev_offset, v.maglev_size);
    }
    let mut used_services: BTreeSet<u32> = applied.services.values().map(|v| v.service_id).collect();
    used_services.insert(0);
    let mut claimed: BTreeSet<u32> = BTreeSet::new();
    let mut wanted_keys: BTreeSet<ServiceKey> = BTreeSet::new();
    let mut wanted_ranges: BTreeSet<(u32, IpNet)> = BTreeSet::new();
    let mut next_service = 1;

    for (sref, s) in &desired.services {
        let keys: Vec<ServiceKey> =
            s.frontends.iter().map(|(ip, port)| ServiceKey::new(*ip, *port, sref.proto)).collect();
        // The id (and table) of the first frontend already applied and not claimed yet.
        let previous =
            keys.iter().filter_map(|k| applied.services.get(k)).find(|v| !claimed.contains(&v.service_id));
        let service_id = match previous {
            Some(v) => v.service_id,
            None => {
                let id = lowest_free(&used_services, next_service, limits.services)
                    .ok_or(PlanError::ServicesFull(limits.services))?;
                used_services.insert(id);
                next_service = id + 1;
                id
            }
        };
        claimed.insert(service_id);

        let mut ids: Vec<u32> = s.backends.iter().map(|b| backend_ids[&(b.ip, b.port)]).collect();
        ids.sort_unstable();
        let size = table_size(ids.len(), previous.map_or(0, |v| v.maglev_size), limits.max_table);
        let prev_table =
            previous.filter(|v| v.maglev_size == size).and_then(|v| applied.tables.get(&v.maglev_offset));
        // The common case at scale: nothing changed for this service. Its table already holds
        // exactly these backends (the builder gives every member slots), so no rebuild.
        let unchanged = previous
            .filter(|v| prev_table.is_some() && applied.table_members.get(&v.maglev_offset) == Some(&ids));
        let offset = if let Some(v) = unchanged {
            v.maglev_offset
        } else if size == 0 {
            0
        } else {
            let members: Vec<(u32, Vec<u8>)> = s
                .backends
                .iter()
                .map(|b| (backend_ids[&(b.ip, b.port)], format!("{}:{}", b.ip, b.port).into_bytes()))
                .collect();
            let table = maglev::rebuild(prev_table.map(Vec::as_slice), &members, size);
            match (previous, prev_table) {
                (Some(v), Some(t)) if *t == table => v.maglev_offset,
                _ => {
                    let off = ranges.alloc(size).map_err(|_| PlanError::MaglevFull(size))?;
                    tables.push(MapOp::WriteMaglev { offset: off, table });
                    off
                }
            }
        };
        let value = ServiceValue {
            service_id,
            backend_count: ids.len() as u32,
            maglev_offset: offset,
            maglev_size: size,
            flags: service_flags(s),
            affinity_timeout: s.affinity_timeout.unwrap_or(0),
        };
        for net in &s.source_ranges {
            wanted_ranges.insert((service_id, *net));
            if !applied.source_ranges.contains(&(service_id, *net)) {
                allow.push(MapOp::AllowSource { service_id, net: *net });
            }
        }
        for key in keys {
            wanted_keys.insert(key);
            if applied.services.get(&key) != Some(&value) {
                set_services.push(MapOp::SetService { key, value });
            }
        }
    }

    // ClusterIPs answer on every port: unserved ports are rejected through a port-0 entry.
    for vip in &desired.cluster_vips {
        let key = ServiceKey::new(*vip, 0, 0);
        wanted_keys.insert(key);
        if !applied.services.contains_key(&key) {
            set_services.push(MapOp::SetService { key, value: ServiceValue::default() });
        }
    }

    let mut ops = set_backends;
    ops.extend(allow);
    ops.extend(tables);
    ops.extend(set_services);
    ops.extend(
        applied
            .services
            .keys()
            .filter(|k| !wanted_keys.contains(k))
            .map(|key| MapOp::RemoveService { key: *key }),
    );
    ops.extend(
        applied
            .source_ranges
            .iter()
            .filter(|r| !wanted_ranges.contains(r))
            .map(|(service_id, net)| MapOp::DisallowSource { service_id: *service_id, net: *net }),
    );
    let wanted_ids: BTreeSet<u32> = backend_ids.values().copied().collect();
    ops.extend(
        applied
            .backends
            .keys()
            .filter(|id| !wanted_ids.contains(id))
            .map(|id| MapOp::RemoveBackend { id: *id }),
    );
    Ok(ops)
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
