//! The only module that touches `aya::maps`. `Dataplane` is what the reconciler writes
//! through; `AyaDataplane` opens the pinned maps (so it works whether the agent that loaded
//! them is running or not), `FakeDataplane` keeps the same state in memory for tests.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::maps::{
    Array, DevMapHash, HashMap, Map, MapData, PerCpuArray,
    lpm_trie::{Key, LpmTrie},
};
use std::os::fd::AsFd as _;

use crate::{
    compact_table::Table,
    mmap_array::{MmapArray, WindowedArray},
};
use ipnet::IpNet;
use lb_common::{abi::*, maps, verdict::Reason};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("opening pinned map {path}: {source} (is the agent loaded with this --pin-dir?)")]
    Open { path: PathBuf, source: aya::maps::MapError },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: aya::maps::MapError },
    #[error("map {map}: mapping it into memory: {source}")]
    Mmap { map: &'static str, source: std::io::Error },
    #[error("map {map}: writing an entry: {source}")]
    Write { map: &'static str, source: std::io::Error },
    #[error("map {map}: index {index} out of range (capacity {capacity})")]
    OutOfRange { map: &'static str, index: u32, capacity: u32 },
}

type Result<T> = std::result::Result<T, DataplaneError>;

/// Writes and reads of the datapath state the agent owns.
pub trait Dataplane {
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()>;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<()>;
    fn set_backend(&mut self, id: u32, value: &BackendValue) -> Result<()>;
    /// Clears the slot (flags 0): the kernel then treats the id as gone.
    fn remove_backend(&mut self, id: u32) -> Result<()>;
    /// Writes backend ids into the Maglev array from `offset`.
    fn write_maglev(&mut self, offset: u32, ids: &[u32]) -> Result<()>;
    /// `write_maglev` of a table as the planner keeps it.
    fn write_table(&mut self, offset: u32, table: &Table) -> Result<()> {
        self.write_maglev(offset, &table.ids())
    }
    /// `write_table` of each `(offset, table)`, in any order.
    fn write_tables(&mut self, tables: &[(u32, &Table)]) -> Result<()> {
        tables.iter().try_for_each(|(offset, table)| self.write_table(*offset, table))
    }
    fn set_config(&mut self, config: &Config) -> Result<()>;
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>>;
    /// Backends in use (flags with `BE_F_PRESENT`).
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>>;
    fn read_maglev(&self, offset: u32, len: u32) -> Result<Vec<u32>>;
    /// Lets sources in `net` reach the frontends of `service_id` (`SVC_F_SOURCE_RANGES`).
    fn allow_source(&mut self, service_id: u32, net: &IpNet) -> Result<()>;
    fn disallow_source(&mut self, service_id: u32, net: &IpNet) -> Result<()>;
    fn source_ranges(&self) -> Result<Vec<(u32, IpNet)>>;
    /// Makes `key.backend_id` a member of service `key.service_id` (`lb_members`).
    fn set_member(&mut self, key: &MemberKey, value: &MemberValue) -> Result<()>;
    fn remove_member(&mut self, key: &MemberKey) -> Result<()>;
    fn members(&self) -> Result<Vec<(MemberKey, MemberValue)>>;

    /// Many `set_service`s, in order; on an error, those before it are written. The kernel
    /// datapath makes it one syscall: a full sync of 100 000 Services is a handful of calls,
    /// not a million.
    fn set_services(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> Result<()> {
        entries.iter().try_for_each(|(k, v)| self.set_service(k, v))
    }
    /// Many `set_backend`s, in order (as `set_services`).
    fn set_backends(&mut self, entries: &[(u32, BackendValue)]) -> Result<()> {
        entries.iter().try_for_each(|(id, v)| self.set_backend(*id, v))
    }
    /// Many `set_member`s, in order (as `set_services`).
    fn set_members(&mut self, entries: &[(MemberKey, MemberValue)]) -> Result<()> {
        entries.iter().try_for_each(|(k, v)| self.set_member(k, v))
    }
}

/// `values` as the bytes the kernel takes (plain `repr(C)` map types without padding).
fn bytes_of<T: aya::Pod>(values: &[T]) -> &[u8] {
    // SAFETY: `Pod` types are plain data without padding; the slice covers exactly them.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), std::mem::size_of_val(values)) }
}

/// From this many tables a run of Maglev writes is split between two threads.
const PARALLEL_TABLES: usize = 4096;

/// `table`'s slots written at `offset` of `array`, unpacked through `buffer`.
fn write_unpacked(
    array: &mut WindowedArray,
    buffer: &mut Vec<u32>,
    offset: u32,
    table: &Table,
) -> Result<()> {
    table.ids_into(buffer);
    array.write_slice(offset, buffer)
}

/// From this many entries a batch is written by two threads, half each: the kernel's hash
/// inserts (about 0.3 µs an entry) are most of a full sync's writes, and the map's buckets
/// have locks of their own.
const PARALLEL_BATCH: usize = 65_536;

/// Writes `entries` into the hash map behind `fd` in batch calls (two threads for a large
/// batch). On an error the entries of that call are written one by one from where it
/// stopped, so the error names the entry; with two threads the other half may be in too
/// (the caller then writes each entry again, recording those the kernel takes).
fn hash_batch<K: aya::Pod + Sync, V: aya::Pod + Sync>(
    fd: std::os::fd::BorrowedFd<'_>,
    map: &'static str,
    entries: &[(K, V)],
) -> Result<()> {
    if entries.len() < PARALLEL_BATCH || crate::parallel::cpus() < 2 {
        return hash_batch_on_this_thread(fd, map, entries);
    }
    let (first, second) = entries.split_at(entries.len() / 2);
    on_two_threads(
        map,
        "batch writer",
        || hash_batch_on_this_thread(fd, map, first),
        || hash_batch_on_this_thread(fd, map, second),
    )
}

/// Runs `here` on this thread and `there` on a scoped second one; `here`'s error first. A
/// panic of the second thread is a write error of `map` naming `what`.
fn on_two_threads(
    map: &'static str,
    what: &str,
    here: impl FnOnce() -> Result<()>,
    there: impl FnOnce() -> Result<()> + Send,
) -> Result<()> {
    std::thread::scope(|scope| {
        let other = scope.spawn(there);
        let here = here();
        let there = other.join().unwrap_or_else(|_| {
            Err(DataplaneError::Write { map, source: std::io::Error::other(format!("{what} panicked")) })
        });
        here.and(there)
    })
}

fn hash_batch_on_this_thread<K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
    map: &'static str,
    entries: &[(K, V)],
) -> Result<()> {
    let keys: Vec<K> = entries.iter().map(|(k, _)| *k).collect();
    let values: Vec<V> = entries.iter().map(|(_, v)| *v).collect();
    match crate::rawmap::update_batch(fd, std::mem::size_of::<K>(), bytes_of(&keys), bytes_of(&values)) {
        Ok(()) => Ok(()),
        Err((done, _)) => {
            for (k, v) in &entries[done.min(entries.len())..] {
                crate::rawmap::update(
                    fd,
                    bytes_of(std::slice::from_ref(k)),
                    bytes_of(std::slice::from_ref(v)),
                    0,
                )
                .map_err(|source| DataplaneError::Write { map, source })?;
            }
            Ok(())
        }
    }
}

/// The trie key of `net` for `service_id` (the prefix counts the 32 id bits; IPv4 ranges are
/// IPv4-mapped, so their prefix also counts the 96 mapping bits).
pub fn source_range_key(service_id: u32, net: &IpNet) -> Key<SourceRangeKey> {
    let bits = match net {
        IpNet::V4(n) => 96 + n.prefix_len() as u32,
        IpNet::V6(n) => n.prefix_len() as u32,
    };
    Key::new(32 + bits, SourceRangeKey { service_id, addr: addr_from_ip(net.network()) })
}

fn source_range_from_key(key: &Key<SourceRangeKey>) -> Option<(u32, IpNet)> {
    let data = key.data();
    let ip = ip_from_addr(&data.addr);
    let bits = key.prefix_len().checked_sub(32)?;
    let prefix = if ip.is_ipv4() { bits.checked_sub(96)? } else { bits };
    IpNet::new(ip, prefix as u8).ok().map(|n| (data.service_id, n))
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

/// The pinned maps of a loaded datapath.
pub struct AyaDataplane {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: Array<MapData, BackendValue>,
    maglev: WindowedArray,
    backends_view: WindowedArray,
    conntrack: HashMap<MapData, FlowKey, FlowValue>,
    flow_capacity: u32,
    members: HashMap<MapData, MemberKey, MemberValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    config: Array<MapData, Config>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    stats_reason: PerCpuArray<MapData, Counter>,
    stats_service: PerCpuArray<MapData, Counter>,
    stats_backend: PerCpuArray<MapData, Counter>,
    xdp_tx_ports: DevMapHash<MapData>,
    stats_xdp_forward: PerCpuArray<MapData, Counter>,
    stats_host_routing: PerCpuArray<MapData, Counter>,
    stats_events: PerCpuArray<MapData, Counter>,
    pod_ports: HashMap<MapData, u32, PodPort>,
    addr_filter: MmapArray,
    sock_rev: HashMap<MapData, SockRevKey, SockRevValue>,
    /// The frontend and membership maps again, for batched writes (`rawmap`).
    services_fd: MapData,
    members_fd: MapData,
    /// Addresses listed since `take_listed` (a full sync lists hundreds of thousands).
    listed: Listed,
    /// A table's slots unpacked on their way to the Maglev array, kept between writes.
    unpacked: Vec<u32>,
    /// The Maglev array again, for a second thread's writes (`write_tables`): a window of
    /// its own, unmapped after.
    maglev_beside: WindowedArray,
}

/// Addresses listed since they were last taken, appended as they come: a full sync of
/// 100 000 Services lists half a million, and a hash insert each took ~50 ms of it. Repeats
/// are dropped only once the list has grown well past its distinct count (a sort), so its
/// memory stays bounded under a stream of syncs.
#[derive(Default)]
struct Listed {
    addrs: Vec<Addr>,
    distinct: usize,
}

impl Listed {
    fn push(&mut self, addr: Addr) {
        self.addrs.push(addr);
        if self.addrs.len() >= (4 * self.distinct).max(1 << 20) {
            self.addrs.sort_unstable();
            self.addrs.dedup();
            self.distinct = self.addrs.len();
        }
    }

    fn take(&mut self) -> Vec<Addr> {
        self.distinct = 0;
        std::mem::take(&mut self.addrs)
    }
}

fn open(dir: &Path, name: &'static str) -> Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).map_err(|source| DataplaneError::Open { path, source })
}

impl AyaDataplane {
    /// Opens the maps pinned in `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let conntrack = open(pin_dir, maps::CONNTRACK)?;
        let flow_capacity = conntrack.info().map_err(map_err(maps::CONNTRACK))?.max_entries();
        Ok(AyaDataplane {
            services: HashMap::try_from(Map::HashMap(open(pin_dir, maps::SERVICES)?))
                .map_err(map_err(maps::SERVICES))?,
            backends: Array::try_from(Map::Array(open(pin_dir, maps::BACKENDS)?))
                .map_err(map_err(maps::BACKENDS))?,
            maglev: WindowedArray::slots(open(pin_dir, maps::MAGLEV)?, maps::MAGLEV, size_of::<u32>())?,
            backends_view: WindowedArray::new(open(pin_dir, maps::BACKENDS)?, maps::BACKENDS)?,
            conntrack: HashMap::try_from(Map::HashMap(conntrack)).map_err(map_err(maps::CONNTRACK))?,
            flow_capacity,
            members: HashMap::try_from(Map::HashMap(open(pin_dir, maps::MEMBERS)?))
                .map_err(map_err(maps::MEMBERS))?,
            affinity: HashMap::try_from(Map::LruHashMap(open(pin_dir, maps::AFFINITY)?))
                .map_err(map_err(maps::AFFINITY))?,
            config: Array::try_from(Map::Array(open(pin_dir, maps::CONFIG)?))
                .map_err(map_err(maps::CONFIG))?,
            source_ranges: LpmTrie::try_from(Map::LpmTrie(open(pin_dir, maps::SOURCE_RANGES)?))
                .map_err(map_err(maps::SOURCE_RANGES))?,
            stats_reason: PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, maps::STATS_REASON)?))
                .map_err(map_err(maps::STATS_REASON))?,
            stats_service: PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, maps::STATS_SERVICE)?))
                .map_err(map_err(maps::STATS_SERVICE))?,
            stats_backend: PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, maps::STATS_BACKEND)?))
                .map_err(map_err(maps::STATS_BACKEND))?,
            xdp_tx_ports: DevMapHash::try_from(Map::DevMapHash(open(pin_dir, maps::XDP_TX_PORTS)?))
                .map_err(map_err(maps::XDP_TX_PORTS))?,
            stats_xdp_forward: PerCpuArray::try_from(Map::PerCpuArray(open(
                pin_dir,
                maps::STATS_XDP_FORWARD,
            )?))
            .map_err(map_err(maps::STATS_XDP_FORWARD))?,
            stats_host_routing: PerCpuArray::try_from(Map::PerCpuArray(open(
                pin_dir,
                maps::STATS_HOST_ROUTING,
            )?))
            .map_err(map_err(maps::STATS_HOST_ROUTING))?,
            stats_events: PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, maps::STATS_EVENTS)?))
                .map_err(map_err(maps::STATS_EVENTS))?,
            pod_ports: HashMap::try_from(Map::HashMap(open(pin_dir, maps::POD_PORTS)?))
                .map_err(map_err(maps::POD_PORTS))?,
            addr_filter: MmapArray::new(open(pin_dir, maps::ADDR_FILTER)?, maps::ADDR_FILTER)?,
            sock_rev: HashMap::try_from(Map::LruHashMap(open(pin_dir, maps::SOCK_REV)?))
                .map_err(map_err(maps::SOCK_REV))?,
            services_fd: open(pin_dir, maps::SERVICES)?,
            members_fd: open(pin_dir, maps::MEMBERS)?,
            listed: Listed::default(),
            unpacked: Vec::new(),
            maglev_beside: WindowedArray::slots(
                open(pin_dir, maps::MAGLEV)?,
                maps::MAGLEV,
                size_of::<u32>(),
            )?,
        })
    }

    /// Sets `addr`'s bit in the address pre-filter (`lb_common::addr_filter`): done before any
    /// entry naming it is written, so the datapath never filters out a packet it must handle.
    pub fn list_address(&mut self, addr: &Addr) {
        self.listed.push(*addr);
        let (word, bit) = lb_common::addr_filter::slot(addr);
        let cur: u64 = self.addr_filter.read(word);
        if cur & bit == 0 {
            self.addr_filter.write(word, cur | bit);
        }
    }

    /// Makes the address pre-filter hold exactly the bits of `addrs` (the agent's narrowing,
    /// once no entry and no live flow names the others). Returns the words changed.
    pub fn set_address_filter<'a>(&mut self, addrs: impl IntoIterator<Item = &'a Addr>) -> usize {
        let mut want = vec![0u64; lb_common::addr_filter::WORDS as usize];
        for a in addrs {
            let (word, bit) = lb_common::addr_filter::slot(a);
            want[word as usize] |= bit;
        }
        let mut changed = 0;
        for (i, w) in want.into_iter().enumerate() {
            // A word is stored whole: a reader sees the old one or the new one.
            if self.addr_filter.read::<u64>(i as u32) != w {
                self.addr_filter.write(i as u32, w);
                changed += 1;
            }
        }
        changed
    }

    /// Whether `addr`'s bit is set in the address pre-filter.
    pub fn address_listed(&self, addr: &Addr) -> bool {
        let (word, bit) = lb_common::addr_filter::slot(addr);
        self.addr_filter.read::<u64>(word) & bit != 0
    }

    /// The addresses listed since the last call (some maybe more than once).
    pub fn take_listed(&mut self) -> Vec<Addr> {
        self.listed.take()
    }

    /// Bytes of the maps mapped into this process now: the address pre-filter, and at most a
    /// window of the Maglev and backend arrays (`mmap_array`).
    pub fn mapped_bytes(&self) -> usize {
        self.addr_filter.bytes() + self.maglev.mapped_bytes() + self.backends_view.mapped_bytes()
    }

    /// Bits set in the address pre-filter.
    pub fn address_filter_bits(&self) -> u32 {
        (0..lb_common::addr_filter::WORDS).map(|i| self.addr_filter.read::<u64>(i).count_ones()).sum()
    }

    /// Makes `ports` (pod interface -> the interface its addresses may also route through,
    /// and its pod's known addresses) the interfaces whose sources the TC program checks,
    /// and only those.
    pub fn set_pod_ports(&mut self, ports: &std::collections::BTreeMap<u32, PodPort>) -> Result<()> {
        let old: Vec<u32> = self.pod_ports.keys().filter_map(|k| k.ok()).collect();
        for k in old.iter().filter(|k| !ports.contains_key(k)) {
            self.pod_ports.remove(k).map_err(map_err(maps::POD_PORTS))?;
        }
        for (ifindex, port) in ports {
            self.pod_ports.insert(ifindex, port, 0).map_err(map_err(maps::POD_PORTS))?;
        }
        Ok(())
    }

    /// The interfaces whose sources are checked, with their bridge (or themselves) and known
    /// addresses.
    pub fn pod_ports(&self) -> Vec<(u32, PodPort)> {
        self.pod_ports.iter().filter_map(|r| r.ok()).collect()
    }

    /// Makes `ifindexes` the ports XDP forwarding may redirect to (and only those).
    pub fn set_xdp_tx_ports(&mut self, ifindexes: &[u32]) -> Result<()> {
        let old: Vec<u32> = self.xdp_tx_ports.keys().filter_map(|k| k.ok()).collect();
        for k in old.iter().filter(|k| !ifindexes.contains(k)) {
            self.xdp_tx_ports.remove(*k).map_err(map_err(maps::XDP_TX_PORTS))?;
        }
        for &i in ifindexes {
            self.xdp_tx_ports.insert(i, i, None, 0).map_err(|e| match e {
                aya::maps::xdp::XdpMapError::MapError(e) => map_err(maps::XDP_TX_PORTS)(e),
                // Only with a program fd, which we never pass.
                e => DataplaneError::Map {
                    map: maps::XDP_TX_PORTS,
                    source: aya::maps::MapError::InvalidName { name: e.to_string() },
                },
            })?;
        }
        Ok(())
    }

    /// The ports XDP forwarding may redirect to.
    pub fn xdp_tx_ports(&self) -> Vec<u32> {
        self.xdp_tx_ports.keys().filter_map(|k| k.ok()).collect()
    }

    /// XDP forwarding counter `slot` (`XDP_FWD_*`), summed over CPUs.
    pub fn xdp_forward_counter(&self, slot: u32) -> Result<Counter> {
        Self::sum(&self.stats_xdp_forward, maps::STATS_XDP_FORWARD, slot)
    }

    /// TC host routing counter `slot` (`HOST_ROUTE_*`), summed over CPUs.
    pub fn host_routing_counter(&self, slot: u32) -> Result<Counter> {
        Self::sum(&self.stats_host_routing, maps::STATS_HOST_ROUTING, slot)
    }

    /// Monitor events written (`EVENTS_SENT`) or lost to a full ring (`EVENTS_LOST`).
    pub fn events_counter(&self, slot: u32) -> Result<Counter> {
        Self::sum(&self.stats_events, maps::STATS_EVENTS, slot)
    }

    /// Every flow-table entry.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>> {
        self.conntrack.iter().collect::<std::result::Result<_, _>>().map_err(map_err(maps::CONNTRACK))
    }

    /// The flow table's capacity (`--max-flows`), as the kernel has it.
    pub fn flow_capacity(&self) -> Result<u32> {
        Ok(self.flow_capacity)
    }

    /// Removes one flow-table entry (tests; the GC removes pairs in batches).
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
        self.conntrack.remove(key).map_err(map_err(maps::CONNTRACK))
    }

    /// Writes one flow-table entry as it is (tests: entries with chosen timestamps).
    pub fn set_flow(&mut self, key: &FlowKey, value: &FlowValue) -> Result<()> {
        self.list_address(&key.src);
        self.list_address(&key.dst);
        self.conntrack.insert(key, value, 0).map_err(map_err(maps::CONNTRACK))
    }

    /// The frontend entry for `key`, if any.
    pub fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
        self.services.get(key, 0).ok()
    }

    /// The datapath-wide settings.
    pub fn config(&self) -> Result<Config> {
        self.config.get(&0, 0).map_err(map_err(maps::CONFIG))
    }

    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        self.conntrack.get(key, 0).ok()
    }

    /// The affinity entry of a client of a service, if any (`lb explain`).
    pub fn affinity(&self, key: &AffinityKey) -> Option<AffinityValue> {
        self.affinity.get(key, 0).ok()
    }

    /// A backend's membership of a service, if any.
    pub fn member(&self, key: &MemberKey) -> Option<MemberValue> {
        self.members.get(key, 0).ok()
    }

    /// What a host socket connected to `key.addr` asked for (`sock`), if it was pointed
    /// there at connect time.
    pub fn sock_rev(&self, key: &SockRevKey) -> Option<SockRevValue> {
        self.sock_rev.get(key, 0).ok()
    }

    /// Backend `id`'s entry, if it is in use.
    pub fn backend(&self, id: u32) -> Option<BackendValue> {
        // Out of range: an error from the read, so none.
        let v: BackendValue = self.backends_view.read(id).ok()?;
        (v.flags & BE_F_PRESENT != 0).then_some(v)
    }

    /// Drops every flow-table entry (tests, `lb conntrack flush`).
    pub fn flush_flows(&mut self) -> Result<usize> {
        let keys: Vec<FlowKey> =
            self.conntrack.keys().collect::<std::result::Result<_, _>>().map_err(map_err(maps::CONNTRACK))?;
        for k in &keys {
            let _ = self.conntrack.remove(k);
        }
        Ok(keys.len())
    }

    fn sum(map: &PerCpuArray<MapData, Counter>, name: &'static str, index: u32) -> Result<Counter> {
        let values = map.get(&index, 0).map_err(map_err(name))?;
        Ok(values.iter().fold(Counter::default(), |a, c| Counter {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
        }))
    }

    /// Counter of one verdict reason, summed over CPUs.
    pub fn reason_counter(&self, r: Reason) -> Result<Counter> {
        Self::sum(&self.stats_reason, maps::STATS_REASON, r as u32)
    }

    pub fn service_counter(&self, id: u32) -> Result<Counter> {
        Self::sum(&self.stats_service, maps::STATS_SERVICE, id)
    }

    pub fn backend_counter(&self, id: u32) -> Result<Counter> {
        Self::sum(&self.stats_backend, maps::STATS_BACKEND, id)
    }
}

impl Dataplane for AyaDataplane {
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.list_address(&key.addr);
        self.services.insert(key, value, 0).map_err(map_err(maps::SERVICES))
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.services.remove(key).map_err(map_err(maps::SERVICES))
    }

    fn set_backend(&mut self, id: u32, value: &BackendValue) -> Result<()> {
        let capacity = self.backends.len();
        if id >= capacity {
            return Err(DataplaneError::OutOfRange { map: maps::BACKENDS, index: id, capacity });
        }
        if value.flags & BE_F_PRESENT != 0 {
            self.list_address(&value.addr);
        }
        self.backends.set(id, value, 0).map_err(map_err(maps::BACKENDS))
    }

    fn remove_backend(&mut self, id: u32) -> Result<()> {
        self.set_backend(id, &BackendValue::default())
    }

    fn write_maglev(&mut self, offset: u32, ids: &[u32]) -> Result<()> {
        self.maglev.write_slice(offset, ids)
    }

    fn write_table(&mut self, offset: u32, table: &Table) -> Result<()> {
        write_unpacked(&mut self.maglev, &mut self.unpacked, offset, table)
    }

    /// A large run (a first sync's) is split with a second thread, each half through a
    /// window of its own: unpacking the slots made the tables of a first sync of 100 000
    /// Services a third of its map writes, on one CPU.
    fn write_tables(&mut self, tables: &[(u32, &Table)]) -> Result<()> {
        let write_all = |array: &mut WindowedArray, buffer: &mut Vec<u32>, tables: &[(u32, &Table)]| {
            tables.iter().try_for_each(|(offset, table)| write_unpacked(array, buffer, *offset, table))
        };
        if tables.len() < PARALLEL_TABLES || crate::parallel::cpus() < 2 {
            return write_all(&mut self.maglev, &mut self.unpacked, tables);
        }
        // This thread takes the second half: its window stays where the next tables go.
        let (first, second) = tables.split_at(tables.len() / 2);
        let (beside, mut beside_buffer) = (&mut self.maglev_beside, Vec::new());
        let written = on_two_threads(
            maps::MAGLEV,
            "table writer",
            || write_all(&mut self.maglev, &mut self.unpacked, second),
            move || write_all(beside, &mut beside_buffer, first),
        );
        self.maglev_beside.unmap();
        written
    }

    fn set_config(&mut self, config: &Config) -> Result<()> {
        self.config.set(0, config, 0).map_err(map_err(maps::CONFIG))
    }

    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>> {
        self.services.iter().collect::<std::result::Result<_, _>>().map_err(map_err(maps::SERVICES))
    }

    fn backends(&self) -> Result<Vec<(u32, BackendValue)>> {
        let mut present = Vec::new();
        self.backends_view.read_run(0, self.backends_view.len(), |i, v: BackendValue| {
            if v.flags & BE_F_PRESENT != 0 {
                present.push((i, v));
            }
        })?;
        Ok(present)
    }

    fn read_maglev(&self, offset: u32, len: u32) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(len as usize);
        self.maglev.read_run(offset, len, |_, id: u32| ids.push(id))?;
        Ok(ids)
    }

    fn allow_source(&mut self, service_id: u32, net: &IpNet) -> Result<()> {
        self.source_ranges
            .insert(&source_range_key(service_id, net), 1, 0)
            .map_err(map_err(maps::SOURCE_RANGES))
    }

    fn disallow_source(&mut self, service_id: u32, net: &IpNet) -> Result<()> {
        self.source_ranges.remove(&source_range_key(service_id, net)).map_err(map_err(maps::SOURCE_RANGES))
    }

    fn source_ranges(&self) -> Result<Vec<(u32, IpNet)>> {
        let keys: Vec<Key<SourceRangeKey>> = self
            .source_ranges
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(maps::SOURCE_RANGES))?;
        Ok(keys.iter().filter_map(source_range_from_key).collect())
    }

    fn set_member(&mut self, key: &MemberKey, value: &MemberValue) -> Result<()> {
        self.members.insert(key, value, 0).map_err(map_err(maps::MEMBERS))
    }

    fn remove_member(&mut self, key: &MemberKey) -> Result<()> {
        self.members.remove(key).map_err(map_err(maps::MEMBERS))
    }

    fn members(&self) -> Result<Vec<(MemberKey, MemberValue)>> {
        self.members.iter().collect::<std::result::Result<_, _>>().map_err(map_err(maps::MEMBERS))
    }

    fn set_services(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> Result<()> {
        for (k, _) in entries {
            self.list_address(&k.addr);
        }
        hash_batch(self.services_fd.fd().as_fd(), maps::SERVICES, entries)
    }

    /// Through the array's mapping: no syscall at all.
    fn set_backends(&mut self, entries: &[(u32, BackendValue)]) -> Result<()> {
        for (id, v) in entries {
            if v.flags & BE_F_PRESENT != 0 {
                self.list_address(&v.addr);
            }
            self.backends_view.write(*id, *v)?;
        }
        Ok(())
    }

    fn set_members(&mut self, entries: &[(MemberKey, MemberValue)]) -> Result<()> {
        hash_batch(self.members_fd.fd().as_fd(), maps::MEMBERS, entries)
    }
}

/// In-memory stand-in with the same observable state, for reconciler tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FakeDataplane {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, BackendValue>,
    pub maglev: BTreeMap<u32, u32>,
    pub config: Config,
    pub source_ranges: std::collections::BTreeSet<(u32, IpNet)>,
    pub members: BTreeMap<MemberKey, MemberValue>,
    /// Every write, in order, to check op ordering.
    pub log: Vec<String>,
    /// Every write fails (a full map, a kernel refusing), as the sync loop must survive.
    pub broken: bool,
    /// A frontend the "kernel" refuses. A batch holding it fails after writing every other
    /// entry, as a batch written by two threads may (`hash_batch`).
    pub refused: Option<ServiceKey>,
}

impl FakeDataplane {
    /// Fails like a kernel map write when `broken`.
    fn write(&self, map: &'static str) -> Result<()> {
        if self.broken {
            return Err(DataplaneError::Map { map, source: aya::maps::MapError::KeyNotFound });
        }
        Ok(())
    }
}

/// Deleting an absent key fails in the kernel (ENOENT); so it does in the fake, so that a
/// plan deleting anything twice fails its tests.
fn absent_is_an_error(was_there: bool, map: &'static str) -> Result<()> {
    if was_there {
        Ok(())
    } else {
        Err(DataplaneError::Map { map, source: aya::maps::MapError::KeyNotFound })
    }
}

impl Dataplane for FakeDataplane {
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.write("lb_services")?;
        if self.refused == Some(*key) {
            return Err(DataplaneError::Map { map: "lb_services", source: aya::maps::MapError::KeyNotFound });
        }
        self.log.push(format!("set_service {}:{}", key.ip(), key.port()));
        self.services.insert(*key, *value);
        Ok(())
    }

    fn set_services(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> Result<()> {
        let mut result = Ok(());
        for (k, v) in entries {
            if let Err(e) = self.set_service(k, v) {
                result = result.and(Err(e));
            }
        }
        result
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.log.push(format!("remove_service {}:{}", key.ip(), key.port()));
        absent_is_an_error(self.services.remove(key).is_some(), "lb_services")
    }

    fn set_backend(&mut self, id: u32, value: &BackendValue) -> Result<()> {
        self.write("lb_backends")?;
        self.log.push(format!("set_backend {id}"));
        self.backends.insert(id, *value);
        Ok(())
    }

    fn remove_backend(&mut self, id: u32) -> Result<()> {
        self.log.push(format!("remove_backend {id}"));
        self.backends.remove(&id);
        Ok(())
    }

    fn write_maglev(&mut self, offset: u32, ids: &[u32]) -> Result<()> {
        self.write("lb_maglev")?;
        self.log.push(format!("write_maglev {offset}+{}", ids.len()));
        for (i, id) in ids.iter().enumerate() {
            self.maglev.insert(offset + i as u32, *id);
        }
        Ok(())
    }

    fn set_config(&mut self, config: &Config) -> Result<()> {
        self.config = *config;
        Ok(())
    }

    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn backends(&self) -> Result<Vec<(u32, BackendValue)>> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn read_maglev(&self, offset: u32, len: u32) -> Result<Vec<u32>> {
        Ok((offset..offset + len).map(|i| self.maglev.get(&i).copied().unwrap_or(0)).collect())
    }

    fn allow_source(&mut self, service_id: u32, net: &IpNet) -> Result<()> {
        self.log.push(format!("allow_source {service_id} {net}"));
        self.source_ranges.insert((service_id, *net));
        Ok(())
    }

    fn disallow_source(&mut self, service_id: u32, net: &IpNet) -> Result<()> {
        self.log.push(format!("disallow_source {service_id} {net}"));
        absent_is_an_error(self.source_ranges.remove(&(service_id, *net)), "lb_source_ranges")
    }

    fn source_ranges(&self) -> Result<Vec<(u32, IpNet)>> {
        Ok(self.source_ranges.iter().copied().collect())
    }

    fn set_member(&mut self, key: &MemberKey, value: &MemberValue) -> Result<()> {
        self.write("lb_members")?;
        self.log.push(format!("set_member {}/{}", key.service_id, key.backend_id));
        self.members.insert(*key, *value);
        Ok(())
    }

    fn remove_member(&mut self, key: &MemberKey) -> Result<()> {
        self.log.push(format!("remove_member {}/{}", key.service_id, key.backend_id));
        // Like the kernel: deleting an absent key is an error (ENOENT).
        absent_is_an_error(self.members.remove(key).is_some(), "lb_members")
    }

    fn members(&self) -> Result<Vec<(MemberKey, MemberValue)>> {
        Ok(self.members.iter().map(|(k, v)| (*k, *v)).collect())
    }
}
