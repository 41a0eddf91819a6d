//! The Reconciler: a pure diff from the desired state (Model) to the map writes that get the
//! datapath there. `plan(desired, applied)` returns ops; applying them and planning again
//! returns nothing. `plan_changes(desired, delta, applied)` returns the same ops for the
//! datapath services a Model delta names, so a sync costs what changed (`Applied.index` keeps
//! the lookups a full plan would rebuild).
//!
//! * `Applied` is read back from the maps themselves, so a restarted agent continues from what
//!   the kernel holds: ids stay stable across updates and restarts because a service keeps the
//!   id of the frontend entries it already has, and a backend the id of its `ip:port`.
//! * Order: backends, allowed source ranges and new Maglev ranges first, then frontend entries
//!   flip to them, then removals. A packet therefore never sees a service whose table or
//!   backends are half written. A table is never rewritten in place: a changed table goes to a
//!   fresh range, and the old range becomes free once no frontend points at it. Ids freed by a
//!   plan are not reused within it, so a live table never names a backend of another service.
//! * One service that cannot be programmed (a map at its capacity) is skipped and reported
//!   in `Plan::failed`; the maps keep what they held of it, and every other service is
//!   planned as usual. Each fallible step (ids, counts, the Maglev range) runs before the
//!   service's first write is queued, so a skipped service leaves no partial entry.
//! * Maglev tables keep their size while backends are removed (shrinking to a quarter of the
//!   ideal size at most), and are rebuilt from the applied table so only the removed
//!   backend's share of flows moves (`maglev::rebuild`).

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;
use lb_common::abi::*;

pub use crate::applied::{Applied, Index, QUARANTINE, Quarantine};
use crate::{
    compact_table::Table,
    dataplane::{Dataplane, DataplaneError},
    fast_hash,
    free_ids::IdPool,
    fresh_tables::{self, FreshTable},
    loader::Capacities,
    maglev,
    model::{Backend, Delta, Desired, DesiredService, NoBackend, ServiceRef},
    range_alloc::RangeAlloc,
};

/// One write to the datapath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapOp {
    SetBackend { id: u32, value: BackendValue },
    SetMember { key: MemberKey, value: MemberValue },
    AllowSource { service_id: u32, net: IpNet },
    WriteMaglev { offset: u32, table: Table },
    SetService { key: ServiceKey, value: ServiceValue },
    RemoveService { key: ServiceKey },
    DisallowSource { service_id: u32, net: IpNet },
    RemoveMember { key: MemberKey },
    RemoveBackend { id: u32 },
}

/// Limits the plan must respect (the maps' capacities).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_table: u32,
    pub maglev_slots: u32,
    pub backends: u32,
    pub services: u32,
    pub frontends: u32,
    pub source_ranges: u32,
    pub members: u32,
}

impl Limits {
    pub fn of(c: &Capacities) -> Self {
        Limits {
            max_table: lb_common::maglev::DEFAULT_MAX_TABLE,
            maglev_slots: c.maglev_slots,
            backends: c.backends,
            services: c.services,
            frontends: c.frontends,
            source_ranges: c.source_ranges,
            members: c.members,
        }
    }
}

/// Why a service could not be programmed: a map at its capacity, with the flag that raises it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("backend map full ({0} entries; raise --max-backends)")]
    BackendsFull(u32),
    #[error("service ids exhausted ({0}; raise --max-services)")]
    ServicesFull(u32),
    #[error("Maglev array full: no room for {0} more slots (raise --max-maglev-slots)")]
    MaglevFull(u32),
    #[error("frontend map full ({0} entries; raise --max-frontends)")]
    FrontendsFull(u32),
    #[error(
        "source-range map full: {need} more entries do not fit in {capacity} (raise --max-source-ranges)"
    )]
    SourceRangesFull { need: u32, capacity: u32 },
    #[error("membership map full ({0} entries; raise --max-members)")]
    MembersFull(u32),
}

/// A plan: the writes, and the services left as they were because they did not fit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<MapOp>,
    pub failed: Vec<(ServiceRef, PlanError)>,
}

impl Plan {
    /// The ops when every service fit, else the first failure.
    pub fn complete(self) -> Result<Vec<MapOp>, PlanError> {
        match self.failed.into_iter().next() {
            None => Ok(self.ops),
            Some((_, e)) => Err(e),
        }
    }
}

/// Performs `ops` in order, recording each in `applied` once the kernel has it.
pub fn execute(dp: &mut impl Dataplane, applied: &mut Applied, ops: &[MapOp]) -> Result<(), DataplaneError> {
    applied.release_quarantine();
    let written: Vec<u32> = ops
        .iter()
        .filter_map(|op| if let MapOp::WriteMaglev { offset, .. } = op { Some(*offset) } else { None })
        .collect();
    let result = execute_ops(dp, applied, ops);
    applied.prune_unused(&written);
    result
}

fn execute_ops(dp: &mut impl Dataplane, applied: &mut Applied, ops: &[MapOp]) -> Result<(), DataplaneError> {
    let mut i = 0;
    while i < ops.len() {
        // A run of writes of one kind (plans write them by phase) goes in one call.
        let run = ops[i..].iter().take_while(|op| same_batch(op, &ops[i])).count().max(1);
        let batch = &ops[i..i + run];
        let written = match &ops[i] {
            MapOp::SetService { .. } if run > 1 => dp.set_services(&collect(batch, |op| match op {
                MapOp::SetService { key, value } => Some((*key, *value)),
                _ => None,
            })),
            MapOp::SetBackend { .. } if run > 1 => dp.set_backends(&collect(batch, |op| match op {
                MapOp::SetBackend { id, value } => Some((*id, *value)),
                _ => None,
            })),
            MapOp::SetMember { .. } if run > 1 => dp.set_members(&collect(batch, |op| match op {
                MapOp::SetMember { key, value } => Some((*key, *value)),
                _ => None,
            })),
            MapOp::WriteMaglev { .. } if run > 1 => {
                let tables: Vec<(u32, &Table)> = batch
                    .iter()
                    .filter_map(|op| match op {
                        MapOp::WriteMaglev { offset, table } => Some((*offset, table)),
                        _ => None,
                    })
                    .collect();
                dp.write_tables(&tables)
            }
            op => execute_one(dp, op),
        };
        match written {
            Ok(()) => applied.record_all(batch),
            // Which of a batch went in is not known (a large one is written by two threads,
            // so entries after the failed one may be in too): each is written again, one by
            // one, and `applied` records exactly those the kernel took (a write is
            // idempotent). The batch's first error stops the sync there.
            Err(_) if run > 1 => {
                let mut first_error = None;
                for op in batch {
                    match execute_one(dp, op) {
                        Ok(()) => applied.record(op),
                        Err(e) => {
                            first_error.get_or_insert(e);
                        }
                    }
                }
                if let Some(e) = first_error {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
        i += run;
    }
    Ok(())
}

fn execute_one(dp: &mut impl Dataplane, op: &MapOp) -> Result<(), DataplaneError> {
    match op {
        MapOp::SetBackend { id, value } => dp.set_backend(*id, value),
        MapOp::AllowSource { service_id, net } => dp.allow_source(*service_id, net),
        MapOp::SetMember { key, value } => dp.set_member(key, value),
        MapOp::RemoveMember { key } => dp.remove_member(key),
        MapOp::WriteMaglev { offset, table } => dp.write_table(*offset, table),
        MapOp::SetService { key, value } => dp.set_service(key, value),
        MapOp::RemoveService { key } => dp.remove_service(key),
        MapOp::DisallowSource { service_id, net } => dp.disallow_source(*service_id, net),
        MapOp::RemoveBackend { id } => dp.remove_backend(*id),
    }
}

/// The memberships service `service_id` wants: its usable backends, and its terminating
/// ones kept for their flows (`ids`: those of `s.backends` then `s.kept`, in order).
/// (Sorted by key, each once: a backend both usable and kept is usable.)
fn member_flags(s: &DesiredService, ids: &[u32], service_id: u32, wanted: &mut Members) {
    let flags = std::iter::repeat_n(MEMBER_F_USABLE, s.backends.len()).chain(std::iter::repeat(0));
    wanted.clear();
    wanted
        .extend(ids.iter().zip(flags).map(|(id, flags)| (MemberKey { service_id, backend_id: *id }, flags)));
    // Stable: the first of a key (usable before kept) stays.
    wanted.sort_by_key(|(key, _)| *key);
    wanted.dedup_by_key(|(key, _)| *key);
}

/// Whether `op` goes in one batch with `first`: both set frontends, backends or members.
fn same_batch(op: &MapOp, first: &MapOp) -> bool {
    matches!(
        (first, op),
        (MapOp::SetService { .. }, MapOp::SetService { .. })
            | (MapOp::SetBackend { .. }, MapOp::SetBackend { .. })
            | (MapOp::SetMember { .. }, MapOp::SetMember { .. })
            | (MapOp::WriteMaglev { .. }, MapOp::WriteMaglev { .. })
    )
}

fn collect<T>(ops: &[MapOp], f: impl Fn(&MapOp) -> Option<T>) -> Vec<T> {
    ops.iter().filter_map(f).collect()
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

/// A service's memberships: each backend id once, with its flags, sorted.
type Members = Vec<(MemberKey, u32)>;

/// A plan being built, shared by `plan` (every service) and `plan_changes` (the changed ones):
/// the writes by phase, and the ids, ranges and entries it has taken so far.
struct Planning<'a> {
    applied: &'a Applied,
    limits: &'a Limits,
    set_backends: Vec<MapOp>,
    set_members: Vec<MapOp>,
    allow: Vec<MapOp>,
    tables: Vec<MapOp>,
    set_services: Vec<MapOp>,
    /// Backend id of every `ip:port` the planned services use.
    backend_ids: fast_hash::Map<(IpAddr, u16), u32>,
    /// New backend ids this plan gave out.
    new_backend_ids: IdPool,
    new_service_ids: IdPool,
    /// Maglev ranges in use stay reserved for the whole plan (old tables serve until the flip).
    ranges: RangeAlloc,
    /// Service ids already given to a planned service.
    claimed: fast_hash::Set<u32>,
    wanted_keys: fast_hash::Set<ServiceKey>,
    wanted_ranges: BTreeSet<(u32, IpNet)>,
    wanted_members: fast_hash::Set<MemberKey>,
    /// Entries this plan adds to the frontend, source-range and membership maps: they are
    /// written before anything is removed, so they must fit next to what the maps hold.
    new_frontends: u32,
    new_ranges: u32,
    new_members: u32,
    /// Backend ids that skipped services still use (their maps stay as they were).
    kept_backend_ids: BTreeSet<u32>,
    failed: Vec<(ServiceRef, PlanError)>,
    /// The last membership generation handed out.
    generation: u32,
    /// Buffers each service's planning reuses (a first sync plans 100 000: their allocations
    /// and frees were a tenth of the plan's time).
    scratch: Scratch,
}

/// A service's working lists while it is planned.
#[derive(Default)]
struct Scratch {
    /// Endpoints that got a backend id from this service.
    fresh: Vec<(IpAddr, u16)>,
    /// Backend ids of its backends, then of its kept endpoints (`Planning::backends`).
    ids: Vec<u32>,
    keys: Vec<ServiceKey>,
    members: Members,
}

impl<'a> Planning<'a> {
    fn new(applied: &'a Applied, limits: &'a Limits) -> Self {
        Planning {
            applied,
            limits,
            set_backends: Vec::new(),
            set_members: Vec::new(),
            allow: Vec::new(),
            tables: Vec::new(),
            set_services: Vec::new(),
            backend_ids: fast_hash::Map::default(),
            new_backend_ids: IdPool::default(),
            new_service_ids: IdPool::default(),
            ranges: applied.free_ranges(limits.maglev_slots),
            claimed: fast_hash::Set::default(),
            wanted_keys: fast_hash::Set::default(),
            wanted_ranges: BTreeSet::new(),
            wanted_members: fast_hash::Set::default(),
            new_frontends: 0,
            new_ranges: 0,
            new_members: 0,
            kept_backend_ids: BTreeSet::new(),
            scratch: Scratch::default(),
            failed: Vec::new(),
            generation: applied.index.max_generation,
        }
    }

    /// Room for every write a full plan of `desired` may queue: a full sync queues a
    /// million at 100 000 Services, and growing the queues copied each many times.
    fn reserve(&mut self, desired: &Desired) {
        let (endpoints, frontends) = desired
            .services
            .values()
            .fold((0, 0), |(e, f), s| (e + s.backends.len() + s.kept.len(), f + s.frontends.len()));
        // The backends come first in `writes`, which appends every other queue to theirs:
        // room for all of them there, so no second buffer of a million ops is allocated
        // (fresh pages cost more than the copy).
        self.set_backends
            .reserve(2 * endpoints + desired.services.len() + frontends + desired.cluster_vips.len());
        self.set_members.reserve(endpoints);
        self.tables.reserve(desired.services.len());
        self.set_services.reserve(frontends + desired.cluster_vips.len());
        self.backend_ids.reserve(endpoints);
        self.wanted_members.reserve(endpoints);
        self.wanted_keys.reserve(frontends + desired.cluster_vips.len());
    }

    /// Plans service `sref`, or, when it does not fit, leaves what the maps hold of it (its
    /// frontends now or as they were in `old`) as it is and reports it.
    /// `built`: its table, when built ahead (`fresh_tables`).
    fn add(
        &mut self,
        sref: &ServiceRef,
        s: &DesiredService,
        old: Option<&DesiredService>,
        built: Option<FreshTable>,
    ) {
        let queued = self.set_backends.len();
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.fresh.clear();
        scratch.ids.clear();
        let result = self
            .backends(s, &mut scratch.fresh, &mut scratch.ids)
            .and_then(|()| self.service(sref.proto, s, &mut scratch, built));
        if let Err(e) = result {
            // `service` fails before queueing anything; `backends` only queues backend writes.
            self.set_backends.truncate(queued);
            for addr in scratch.fresh.drain(..) {
                // Ids taken for it go back, so the services after it can have them.
                if let Some(id) = self.backend_ids.remove(&addr)
                    && self.applied.index.by_addr.get(&addr) != Some(&id)
                {
                    self.new_backend_ids.give_back(id);
                }
            }
            self.keep(sref.proto, s, old);
            self.failed.push((sref.clone(), e));
        }
        self.scratch = scratch;
    }

    /// Gives every endpoint of `s` a backend id: the one the maps hold for its `ip:port`,
    /// else a free one. `fresh` gets the addresses that had none in this plan yet, `ids` the
    /// id of each of `s.backends` then each of `s.kept`, in order (looked up once: a first
    /// sync's half million lookups in a table of that size each missed the cache).
    fn backends(
        &mut self,
        s: &DesiredService,
        fresh: &mut Vec<(IpAddr, u16)>,
        ids: &mut Vec<u32>,
    ) -> Result<(), PlanError> {
        for b in s.backends.iter().chain(&s.kept) {
            let addr = (b.ip, b.port);
            if let Some(id) = self.backend_ids.get(&addr) {
                ids.push(*id);
                continue;
            }
            let id = match self.applied.index.by_addr.get(&addr) {
                Some(id) => *id,
                None => self
                    .new_backend_ids
                    .take(&self.applied.index.free_backend_ids, self.limits.backends)
                    .ok_or(PlanError::BackendsFull(self.limits.backends))?,
            };
            self.backend_ids.insert(addr, id);
            ids.push(id);
            fresh.push(addr);
            let value = BackendValue::new(b.ip, b.port, backend_flags(b));
            if self.applied.backends.get(&id) != Some(&value) {
                self.set_backends.push(MapOp::SetBackend { id, value });
            }
        }
        Ok(())
    }

    /// Plans service `s` (its backends already have ids): its id — that of the first of its
    /// frontends already applied and not claimed yet, else a free one —, its table, source
    /// ranges and frontend entries (`scratch.ids`: as `backends` gave them). Every check
    /// comes before the first write is queued.
    fn service(
        &mut self,
        proto: u8,
        s: &DesiredService,
        scratch: &mut Scratch,
        built: Option<FreshTable>,
    ) -> Result<(), PlanError> {
        let (applied, limits) = (self.applied, self.limits);
        let (ids, keys) = (&scratch.ids, &mut scratch.keys);
        keys.clear();
        keys.extend(s.frontends.iter().map(|(ip, port)| ServiceKey::new(*ip, *port, proto)));
        let new_keys = keys.iter().filter(|k| !applied.services.contains_key(k)).count() as u32;
        if applied.services.len() as u32 + self.new_frontends + new_keys > limits.frontends {
            return Err(PlanError::FrontendsFull(limits.frontends));
        }
        let previous = keys
            .iter()
            .filter_map(|k| applied.services.get(k))
            .find(|v| !self.claimed.contains(&v.service_id));
        let service_id = match previous {
            Some(v) => v.service_id,
            None => self
                .new_service_ids
                .take(&applied.index.free_service_ids, limits.services)
                .ok_or(PlanError::ServicesFull(limits.services))?,
        };
        let members = &mut scratch.members;
        let checked = self
            .fits(s, ids, service_id, members)
            .and_then(|counts| Ok((counts, self.service_value(s, ids, service_id, previous, built)?)));
        let ((new_ranges, new_members), value) = match checked {
            Ok(v) => v,
            Err(e) => {
                if previous.is_none() {
                    self.new_service_ids.give_back(service_id);
                }
                return Err(e);
            }
        };
        self.claimed.insert(service_id);
        self.new_frontends += new_keys;
        self.new_ranges += new_ranges;
        self.new_members += new_members;
        for net in &s.source_ranges {
            self.wanted_ranges.insert((service_id, *net));
            if !applied.source_ranges.contains(&(service_id, *net)) {
                self.allow.push(MapOp::AllowSource { service_id, net: *net });
            }
        }
        self.members(members);
        for key in keys.iter().copied() {
            self.wanted_keys.insert(key);
            if applied.services.get(&key) != Some(&value) {
                self.set_services.push(MapOp::SetService { key, value });
            }
        }
        Ok(())
    }

    /// Whether `s`'s source ranges and memberships fit next to what the maps and this plan
    /// hold: the new ranges, the memberships wanted and how many of them are new.
    /// `members` gets the memberships it wants.
    fn fits(
        &self,
        s: &DesiredService,
        ids: &[u32],
        service_id: u32,
        members: &mut Members,
    ) -> Result<(u32, u32), PlanError> {
        let (applied, limits) = (self.applied, self.limits);
        let new_ranges = s
            .source_ranges
            .iter()
            .filter(|net| !applied.source_ranges.contains(&(service_id, **net)))
            .count() as u32;
        if applied.source_ranges.len() as u32 + self.new_ranges + new_ranges > limits.source_ranges {
            return Err(PlanError::SourceRangesFull { need: new_ranges, capacity: limits.source_ranges });
        }
        member_flags(s, ids, service_id, members);
        let new_members = members.iter().filter(|(k, _)| !applied.members.contains_key(k)).count() as u32;
        if applied.members.len() as u32 + self.new_members + new_members > limits.members {
            return Err(PlanError::MembersFull(limits.members));
        }
        Ok((new_ranges, new_members))
    }

    /// Keeps a skipped service's entries as the maps hold them: its frontends (`s`'s and
    /// `old`'s) with their ids, source ranges, memberships and the backends its tables use.
    fn keep(&mut self, proto: u8, s: &DesiredService, old: Option<&DesiredService>) {
        let applied = self.applied;
        let frontends = s.frontends.iter().chain(old.into_iter().flat_map(|o| &o.frontends));
        for (ip, port) in frontends {
            let key = ServiceKey::new(*ip, *port, proto);
            let Some(v) = applied.services.get(&key) else { continue };
            self.wanted_keys.insert(key);
            if !self.claimed.insert(v.service_id) {
                continue;
            }
            let id = v.service_id;
            // Ranges of the ordered maps, not scans: under churn many services are kept at once.
            let lowest_net =
                IpNet::V4(ipnet::Ipv4Net::new(std::net::Ipv4Addr::UNSPECIFIED, 0).unwrap_or_default());
            let ranges = applied.source_ranges.range((id, lowest_net)..).take_while(|(sid, _)| *sid == id);
            self.wanted_ranges.extend(ranges.copied());
            let members = MemberKey { service_id: id, backend_id: 0 }..=MemberKey {
                service_id: id,
                backend_id: u32::MAX,
            };
            for key in applied.members.range(members).map(|(k, _)| k) {
                self.wanted_members.insert(*key);
                self.kept_backend_ids.insert(key.backend_id);
            }
            if let Some(t) = applied.tables.get(&v.maglev_offset) {
                self.kept_backend_ids.extend(t.members().iter().copied());
            }
        }
    }

    /// Queues the memberships `wanted`. A new membership gets a new generation; a changed
    /// one keeps it.
    fn members(&mut self, wanted: &Members) {
        for &(key, flags) in wanted {
            if !self.wanted_members.insert(key) {
                continue;
            }
            let generation = match self.applied.members.get(&key) {
                Some(m) if m.flags == flags => continue,
                Some(m) => m.generation,
                None => {
                    self.generation += 1;
                    self.generation
                }
            };
            self.set_members.push(MapOp::SetMember { key, value: MemberValue { generation, flags } });
        }
    }

    /// Memberships of `service_ids` held now and no longer wanted.
    fn gone_members(&self, service_ids: impl Iterator<Item = u32>) -> Vec<MapOp> {
        let mut ops = Vec::new();
        for id in service_ids {
            let range = MemberKey { service_id: id, backend_id: 0 }..=MemberKey {
                service_id: id,
                backend_id: u32::MAX,
            };
            ops.extend(
                self.applied
                    .members
                    .range(range)
                    .filter(|(k, _)| !self.wanted_members.contains(k))
                    .map(|(key, _)| MapOp::RemoveMember { key: *key }),
            );
        }
        ops
    }

    /// The frontend value of service `s` with id `service_id`; its Maglev table stays where
    /// it is when its members did not change, else goes to a fresh range (a `WriteMaglev`).
    /// `built`: its table built ahead, used when it is built from nothing at that size.
    fn service_value(
        &mut self,
        s: &DesiredService,
        all_ids: &[u32],
        service_id: u32,
        previous: Option<&ServiceValue>,
        built: Option<FreshTable>,
    ) -> Result<ServiceValue, PlanError> {
        let (applied, limits) = (self.applied, self.limits);
        // The usable backends' ids, in `s.backends`' order.
        let in_order = &all_ids[..s.backends.len()];
        let size = table_size(in_order.len(), previous.map_or(0, |v| v.maglev_size), limits.max_table);
        let prev_table =
            previous.filter(|v| v.maglev_size == size).and_then(|v| applied.tables.get(&v.maglev_offset));
        // The common case at scale: nothing changed for this service. Its table already holds
        // exactly these backends (the builder gives every member slots), so no rebuild.
        let same_members = |t: &Table| {
            let mut ids = in_order.to_vec();
            ids.sort_unstable();
            t.members() == ids.as_slice()
        };
        let unchanged = previous.filter(|_| prev_table.is_some_and(same_members));
        let offset = if let Some(v) = unchanged {
            v.maglev_offset
        } else if size == 0 {
            0
        } else {
            let prev_ids = prev_table.map(Table::ids);
            // None: rebuilt as the maps hold it, so it stays where it is.
            let table = match built.filter(|t| t.positions.len() == size && prev_ids.is_none()) {
                Some(t) => Some(t.positions.renumbered(in_order)),
                None => {
                    let members: Vec<(u32, Vec<u8>)> =
                        s.backends.iter().zip(in_order).map(|(b, id)| (*id, fresh_tables::name(b))).collect();
                    let rebuilt = maglev::rebuild(prev_ids.as_deref(), &members, size);
                    (prev_ids.as_ref() != Some(&rebuilt)).then(|| Table::new(&rebuilt))
                }
            };
            match (table, previous) {
                (Some(table), _) => {
                    let off = self.ranges.alloc(size).map_err(|_| PlanError::MaglevFull(size))?;
                    self.tables.push(MapOp::WriteMaglev { offset: off, table });
                    off
                }
                (None, v) => v.map_or(0, |v| v.maglev_offset),
            }
        };
        Ok(ServiceValue {
            service_id,
            backend_count: in_order.len() as u32,
            maglev_offset: offset,
            maglev_size: size,
            flags: service_flags(s),
            affinity_timeout: s.affinity_timeout.unwrap_or(0),
        })
    }

    /// A ClusterIP answers on every port: its unserved ports are rejected through a port-0
    /// entry.
    fn cluster_vip(&mut self, vip: IpAddr) {
        let key = ServiceKey::new(vip, 0, 0);
        self.wanted_keys.insert(key);
        if !self.applied.services.contains_key(&key) {
            self.new_frontends += 1;
            self.set_services.push(MapOp::SetService { key, value: ServiceValue::default() });
        }
    }

    /// The writes in their order: backends, allowed ranges and tables, then the frontends
    /// that flip to them (the caller appends removals).
    fn writes(&mut self) -> Vec<MapOp> {
        let rest = [&self.set_members, &self.allow, &self.tables, &self.set_services];
        let mut ops = std::mem::take(&mut self.set_backends);
        ops.reserve(rest.iter().map(|q| q.len()).sum());
        ops.append(&mut self.set_members);
        ops.append(&mut self.allow);
        ops.append(&mut self.tables);
        ops.append(&mut self.set_services);
        ops
    }
}

/// The ops that take the maps from `applied` to `desired`.
pub fn plan(desired: &Desired, applied: &Applied, limits: &Limits) -> Plan {
    let mut p = Planning::new(applied, limits);
    p.reserve(desired);
    for vip in &desired.cluster_vips {
        p.cluster_vip(*vip);
    }
    fresh_tables::alongside(desired, applied, limits.max_table, |next_table| {
        for (sref, s) in &desired.services {
            p.add(sref, s, None, next_table());
        }
    });
    let mut ops = p.writes();
    ops.extend(
        applied
            .services
            .keys()
            .filter(|k| !p.wanted_keys.contains(k))
            .map(|key| MapOp::RemoveService { key: *key }),
    );
    ops.extend(
        applied
            .source_ranges
            .iter()
            .filter(|r| !p.wanted_ranges.contains(r))
            .map(|(service_id, net)| MapOp::DisallowSource { service_id: *service_id, net: *net }),
    );
    let member_ids: BTreeSet<u32> = applied.members.keys().map(|k| k.service_id).collect();
    ops.extend(p.gone_members(member_ids.into_iter()));
    let wanted_ids: BTreeSet<u32> = p.backend_ids.values().copied().collect();
    ops.extend(
        applied
            .backends
            .keys()
            .filter(|id| !wanted_ids.contains(id) && !p.kept_backend_ids.contains(id))
            .map(|id| MapOp::RemoveBackend { id: *id }),
    );
    Plan { ops, failed: p.failed }
}

/// The ops for one Model delta, looking only at the datapath services it names (plus the
/// VIPs and endpoints it says came or went): the same ops, in the same order and by the same
/// rules, as `plan` would need (tested: after them `plan` has nothing left to do). A delta
/// that says "all" is planned in full.
pub fn plan_changes(desired: &Desired, delta: &Delta, applied: &Applied, limits: &Limits) -> Plan {
    if delta.all {
        return plan(desired, applied, limits);
    }
    let mut p = Planning::new(applied, limits);
    for vip in &delta.vips_added {
        p.cluster_vip(*vip);
    }
    for (sref, old) in &delta.services {
        if let Some(s) = desired.services.get(sref) {
            p.add(sref, s, old.as_ref(), None);
        }
    }
    let mut ops = p.writes();
    // Frontends the changed services had and no longer have, and VIPs that went.
    let old_keys = || {
        delta.services.iter().flat_map(|(sref, old)| {
            old.iter().flat_map(|o| &o.frontends).map(|(ip, port)| ServiceKey::new(*ip, *port, sref.proto))
        })
    };
    let gone_keys: BTreeSet<ServiceKey> = old_keys()
        .chain(delta.vips_removed.iter().map(|vip| ServiceKey::new(*vip, 0, 0)))
        .filter(|k| !p.wanted_keys.contains(k) && applied.services.contains_key(k))
        .collect();
    ops.extend(gone_keys.into_iter().map(|key| MapOp::RemoveService { key }));
    // Source ranges of the ids the changed services held before.
    let old_ids: BTreeSet<u32> =
        old_keys().filter_map(|k| applied.services.get(&k)).map(|v| v.service_id).collect();
    ops.extend(
        applied
            .source_ranges
            .iter()
            .filter(|r| old_ids.contains(&r.0) && !p.wanted_ranges.contains(r))
            .map(|(service_id, net)| MapOp::DisallowSource { service_id: *service_id, net: *net }),
    );
    let member_ids: BTreeSet<u32> = old_ids.iter().chain(&p.claimed).copied().collect();
    ops.extend(p.gone_members(member_ids.into_iter()));
    ops.extend(
        delta
            .backends_gone
            .iter()
            .filter(|a| !p.backend_ids.contains_key(a))
            .filter_map(|a| applied.index.by_addr.get(a))
            .filter(|id| !p.kept_backend_ids.contains(id))
            .map(|id| MapOp::RemoveBackend { id: *id }),
    );
    Plan { ops, failed: p.failed }
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
