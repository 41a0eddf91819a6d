//! Every map of the datapath. Names must equal `lb_common::maps` (the attribute needs a
//! literal; `tests/` checks the loaded object against the constants). All are pinned by name,
//! so a restarted agent reopens the same maps and no flow is lost. Capacities here are
//! defaults; the loader resizes them before load.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{abi::*, maps::*};

#[map(name = "lb_services")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(DEFAULT_MAX_FRONTENDS, 0);

/// Mmapable: the agent scans it (restart, CLI, metrics) as memory, not one syscall per id.
#[map(name = "lb_backends")]
pub static BACKENDS: Array<BackendValue> = Array::pinned(DEFAULT_MAX_BACKENDS, BPF_F_MMAPABLE);

/// Mmapable: the agent writes whole tables with memcpy instead of one syscall per slot.
/// Two slots (backend ids) to an element, since the kernel pads an array's values to 8 bytes:
/// slot `s` is half `s % 2` of element `s / 2`. Each service still owns one range of slots
/// (DESIGN.md §3), counted in slots.
#[map(name = "lb_maglev")]
pub static MAGLEV: Array<[u32; MAGLEV_SLOTS_PER_ENTRY as usize]> =
    Array::pinned(DEFAULT_MAGLEV_SLOTS / MAGLEV_SLOTS_PER_ENTRY, BPF_F_MMAPABLE);

/// A plain (preallocated) HASH, not an LRU: the kernel never evicts a live flow, nor one
/// direction of it. Pairs leave together: closed or expired (the agent's GC), taken over
/// when closed (SNAT ports), or replaced when their backend left (UDP, new SYN).
#[map(name = "lb_conntrack")]
pub static CONNTRACK: HashMap<FlowKey, FlowValue> = HashMap::pinned(DEFAULT_MAX_FLOWS, 0);

#[map(name = "lb_members")]
pub static MEMBERS: HashMap<MemberKey, MemberValue> = HashMap::pinned(DEFAULT_MAX_MEMBERS, 0);

#[map(name = "lb_snat_cursor")]
pub static SNAT_CURSOR: PerCpuArray<u32> = PerCpuArray::pinned(1, 0);

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

#[map(name = "lb_stats_host_routing")]
pub static STATS_HOST_ROUTING: PerCpuArray<Counter> = PerCpuArray::pinned(HOST_ROUTE_SLOTS, 0);

#[map(name = "lb_stats_reason")]
pub static STATS_REASON: PerCpuArray<Counter> = PerCpuArray::pinned(lb_common::verdict::Reason::COUNT, 0);

#[map(name = "lb_stats_service")]
pub static STATS_SERVICE: PerCpuArray<Counter> = PerCpuArray::pinned(DEFAULT_MAX_SERVICES, 0);

#[map(name = "lb_stats_backend")]
pub static STATS_BACKEND: PerCpuArray<Counter> = PerCpuArray::pinned(DEFAULT_MAX_BACKENDS, 0);

/// Flow values being worked on by this CPU's packet (`conntrack::scratch`): kept off the
/// 512-byte BPF stack. Not pinned: it holds nothing between packets.
#[repr(C)]
pub struct Scratch {
    /// The packet's flow key.
    pub key: FlowKey,
    /// The flow the packet is translated with (a known flow's copy, or the new forward entry).
    pub flow: FlowValue,
    /// A new flow's reverse entry.
    pub rev: FlowValue,
    /// `reclaim`'s copies of a reply entry and its forward entry.
    pub a: FlowValue,
    pub b: FlowValue,
    /// `pmtu`'s FIB query, and the MTU it found for the answer.
    pub fib: crate::fib::FibParams,
    /// `related`'s addresses.
    pub related: crate::related::Work,
    /// `remember_fragment`'s entry of the fragment table.
    pub frag_key: FragmentKey,
    pub frag: FragmentValue,
}

#[map(name = "lb_scratch")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's credit for TCP RST and ICMP answers (`reject::answer_allowed`). Not pinned: a
/// restart merely refills it.
#[map(name = "lb_answer_bucket")]
pub static ANSWER_BUCKET: PerCpuArray<AnswerBucket> = PerCpuArray::with_max_entries(1, 0);

/// Pod interfaces whose sources `source_check` verifies: ifindex -> the other interface its
/// pod's addresses may route through (its bridge, or itself), and those addresses.
#[map(name = "lb_pod_ports")]
pub static POD_PORTS: HashMap<u32, PodPort> = HashMap::pinned(MAX_POD_PORTS, 0);

/// The address pre-filter (`lb_common::addr_filter`); written by the agent through mmap.
#[map(name = "lb_addr_filter")]
pub static ADDR_FILTER: Array<u64> = Array::pinned(lb_common::addr_filter::WORDS, BPF_F_MMAPABLE);

/// Sources `source_check` passed lately, with when: a pod's next SYNs within a second skip
/// the FIB lookup. Not pinned: a cache.
#[map(name = "lb_pod_sources")]
pub static POD_SOURCES: LruHashMap<PodSource, u64> = LruHashMap::with_max_entries(MAX_POD_SOURCES, 0);

/// Events for `lb monitor` (`abi::Event`), written only while a monitor's lease runs.
#[map(name = "lb_events")]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

/// Host sockets pointed at a backend at connect time (`sock`): what they asked for.
#[map(name = "lb_sock_rev")]
pub static SOCK_REV: LruHashMap<SockRevKey, SockRevValue> = LruHashMap::pinned(DEFAULT_MAX_SOCK_REV, 0);

#[map(name = "lb_monitor")]
pub static MONITOR: Array<MonitorLease> = Array::pinned(1, 0);

#[map(name = "lb_stats_events")]
pub static STATS_EVENTS: PerCpuArray<Counter> = PerCpuArray::pinned(EVENTS_SLOTS, 0);
