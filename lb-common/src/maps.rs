//! Map names (the pin file names under the pin dir) and default capacities.
//!
//! Both sides use these constants, so a rename cannot leave the agent opening a map the
//! program no longer has.

/// Frontends: `ServiceKey -> ServiceValue` (HASH).
pub const SERVICES: &str = "lb_services";
/// Backends: `backend_id -> BackendValue` (ARRAY, id 0 is never used).
pub const BACKENDS: &str = "lb_backends";
/// Maglev lookup tables of all services, one contiguous range each (ARRAY of backend ids).
pub const MAGLEV: &str = "lb_maglev";
/// Flow table: forward and reverse entries (HASH `FlowKey -> FlowValue`). Not an LRU: the
/// kernel never evicts a live flow (or one half of it); the agent's GC removes pairs.
pub const CONNTRACK: &str = "lb_conntrack";
/// Non-first fragments (IPv4 and IPv6) follow their first fragment's translation (LRU_HASH).
pub const FRAGMENTS: &str = "lb_fragments";
/// `sessionAffinity: ClientIP` (LRU_HASH `AffinityKey -> AffinityValue`).
pub const AFFINITY: &str = "lb_affinity";
/// Service membership: `MemberKey -> MemberValue` (HASH), for affinity and UDP flows.
pub const MEMBERS: &str = "lb_members";
/// Where each CPU's next SNAT port search starts (PERCPU_ARRAY of one u32).
pub const SNAT_CURSOR: &str = "lb_snat_cursor";
/// Per-CPU working space of the programs (not pinned: it holds nothing between packets).
pub const SCRATCH: &str = "lb_scratch";
/// Each CPU's credit for TCP RST and ICMP answers (PERCPU_ARRAY of one `AnswerBucket`; not
/// pinned: a restart merely refills it).
pub const ANSWER_BUCKET: &str = "lb_answer_bucket";
/// Datapath-wide settings (ARRAY of one `Config`).
pub const CONFIG: &str = "lb_config";
/// `loadBalancerSourceRanges`: LPM_TRIE of `SourceRangeKey -> u8` (present = allowed).
pub const SOURCE_RANGES: &str = "lb_source_ranges";
/// Ports XDP may forward to (DEVMAP_HASH `ifindex -> ifindex`): the agent's XDP interfaces.
pub const XDP_TX_PORTS: &str = "lb_xdp_tx_ports";
/// Per-CPU counters of XDP forwarding (`XDP_FWD_*` slots).
pub const STATS_XDP_FORWARD: &str = "lb_stats_xdp_forward";
/// Per-CPU counters of TC host routing (`HOST_ROUTE_*` slots).
pub const STATS_HOST_ROUTING: &str = "lb_stats_host_routing";
/// Per-CPU counters per verdict reason (PERCPU_ARRAY of `Counter`).
pub const STATS_REASON: &str = "lb_stats_reason";
/// Per-CPU counters per service id.
pub const STATS_SERVICE: &str = "lb_stats_service";
/// Per-CPU counters per backend id.
pub const STATS_BACKEND: &str = "lb_stats_backend";
/// Pod interfaces whose sources are checked (HASH `ifindex -> abi::PodPort`): each attached
/// TC interface, with the interface its addresses may also route through (its bridge, or
/// itself) and the pod's addresses the agent knows from host routes.
pub const POD_PORTS: &str = "lb_pod_ports";
/// Pod interfaces at most (`lb_pod_ports`).
pub const MAX_POD_PORTS: u32 = 65_536;
/// Sources the pod source check passed lately through the FIB (LRU `PodSource -> ns`; not
/// pinned: a cache).
pub const POD_SOURCES: &str = "lb_pod_sources";
/// Entries of `lb_pod_sources`.
pub const MAX_POD_SOURCES: u32 = 16_384;

/// The address pre-filter (ARRAY of `addr_filter::WORDS` u64, mmapable): see `addr_filter`.
pub const ADDR_FILTER: &str = "lb_addr_filter";

/// Datapath events for `lb monitor` (RINGBUF of `abi::Event`).
pub const EVENTS: &str = "lb_events";
/// Bytes of `lb_events`.
pub const EVENTS_BYTES: u32 = 1 << 18;
/// Whether a monitor wants events (ARRAY of one `abi::MonitorLease`).
pub const MONITOR: &str = "lb_monitor";
/// Per-CPU counters of events sent and lost (`abi::EVENTS_*` slots).
pub const STATS_EVENTS: &str = "lb_stats_events";
/// Host sockets pointed at a backend at connect time: `SockRevKey -> SockRevValue`
/// (LRU_HASH), for `getpeername`, `recvmsg` and the agent's check of connected UDP sockets.
pub const SOCK_REV: &str = "lb_sock_rev";
pub const DEFAULT_MAX_SOCK_REV: u32 = 65_536;
/// aya-log's message ring (`--bpf-log`), a fresh one per loaded program.
pub const BPF_LOG: &str = "AYA_LOGS";
/// The object's read-only globals (aya-log's level), frozen at load.
pub const RODATA: &str = ".rodata";
/// The maps that are not pinned: they hold nothing a restart must keep.
pub const UNPINNED: [&str; 5] = [SCRATCH, ANSWER_BUCKET, POD_SOURCES, BPF_LOG, RODATA];

/// Every pinned map, in the order the agent opens them.
pub const ALL: [&str; 22] = [
    SERVICES,
    BACKENDS,
    MAGLEV,
    CONNTRACK,
    FRAGMENTS,
    AFFINITY,
    CONFIG,
    SOURCE_RANGES,
    STATS_REASON,
    STATS_SERVICE,
    STATS_BACKEND,
    XDP_TX_PORTS,
    STATS_XDP_FORWARD,
    STATS_HOST_ROUTING,
    MEMBERS,
    SNAT_CURSOR,
    POD_PORTS,
    ADDR_FILTER,
    EVENTS,
    MONITOR,
    STATS_EVENTS,
    SOCK_REV,
];

/// Frontend entries (VIP, port, proto); the loader can raise it.
pub const DEFAULT_MAX_FRONTENDS: u32 = 262_144;
/// Service ids (also the size of the per-service counters).
pub const DEFAULT_MAX_SERVICES: u32 = 131_072;
/// Backend ids (also the size of the per-backend counters).
pub const DEFAULT_MAX_BACKENDS: u32 = 262_144;
/// Maglev slots shared by all services: 4 bytes each, two to an array element
/// (`MAGLEV_SLOTS_PER_ENTRY`; the kernel rounds an array's values up to 8 bytes). 8M slots
/// (32 MiB) hold about 20 000 Services of 4 endpoints.
pub const DEFAULT_MAGLEV_SLOTS: u32 = 8 * 1024 * 1024;
/// Maglev slots (backend ids, `u32`) in one element of the Maglev array: slot `s` is half
/// `s % 2` of element `s / 2`.
pub const MAGLEV_SLOTS_PER_ENTRY: u32 = 2;
/// Flow entries (forward and reverse count separately).
pub const DEFAULT_MAX_FLOWS: u32 = 524_288;
pub const DEFAULT_MAX_FRAGMENTS: u32 = 16_384;
/// (service, backend) memberships.
pub const DEFAULT_MAX_MEMBERS: u32 = 524_288;
pub const DEFAULT_MAX_AFFINITY: u32 = 131_072;
pub const DEFAULT_MAX_SOURCE_RANGES: u32 = 16_384;
pub const MAX_XDP_TX_PORTS: u32 = 256;
