//! Every map of the datapath. Names must equal `lb_common::maps` (the attribute needs a
//! literal; `tests/` checks the loaded object against the constants). All are pinned by name,
//! so a restarted agent reopens the same maps and no flow is lost. Capacities here are
//! defaults; the loader resizes them before load.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{abi::*, maps::*};

#[map(name = "lb_services")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(DEFAULT_MAX_FRONTENDS, 0);

/// Mmapable: the agent scans it (restart, CLI, metrics) as memory, not one syscall per id.
#[map(name = "lb_backends")]
pub static BACKENDS: Array<BackendValue> = Array::pinned(DEFAULT_MAX_BACKENDS, BPF_F_MMAPABLE);

/// Mmapable: the agent writes whole tables with memcpy instead of one syscall per slot.
#[map(name = "lb_maglev")]
pub static MAGLEV: Array<u32> = Array::pinned(DEFAULT_MAGLEV_SLOTS, BPF_F_MMAPABLE);

#[map(name = "lb_conntrack")]
pub static CONNTRACK: LruHashMap<FlowKey, FlowValue> = LruHashMap::pinned(DEFAULT_MAX_FLOWS, 0);

#[map(name = "lb_fragments")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentValue> = LruHashMap::pinned(DEFAULT_MAX_FRAGMENTS, 0);

#[map(name = "lb_affinity")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(DEFAULT_MAX_AFFINITY, 0);

#[map(name = "lb_config")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "lb_source_ranges")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> =
    LpmTrie::pinned(DEFAULT_MAX_SOURCE_RANGES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map(name = "lb_xdp_tx_ports")]
pub static XDP_TX_PORTS: DevMapHash = DevMapHash::pinned(MAX_XDP_TX_PORTS, 0);

#[map(name = "lb_stats_xdp_forward")]
pub static STATS_XDP_FORWARD: PerCpuArray<Counter> = PerCpuArray::pinned(XDP_FWD_SLOTS, 0);

#[map(name = "lb_stats_reason")]
pub static STATS_REASON: PerCpuArray<Counter> = PerCpuArray::pinned(lb_common::verdict::Reason::COUNT, 0);

#[map(name = "lb_stats_service")]
pub static STATS_SERVICE: PerCpuArray<Counter> = PerCpuArray::pinned(DEFAULT_MAX_SERVICES, 0);

#[map(name = "lb_stats_backend")]
pub static STATS_BACKEND: PerCpuArray<Counter> = PerCpuArray::pinned(DEFAULT_MAX_BACKENDS, 0);
