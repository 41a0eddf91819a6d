//! Map keys and values, `#[repr(C)]`, no implicit padding, no bool/enum/Option, locked by
//! compile-time size and offset asserts.
//!
//! Addresses: one 16-byte form for both families — IPv6 as is, IPv4 as the IPv4-mapped IPv6
//! address `::ffff:a.b.c.d`. This deviates from "separate v4 and v6 maps" in DESIGN.md §3 on
//! purpose: one map set and one code path in the kernel (half the maps to pin, reconcile and
//! verify), for 12 extra key bytes. Addresses and ports are kept exactly as they sit in the
//! packet (network byte order); `Addr` words are raw memory words, not numbers.

/// An address in packet byte order, IPv4 mapped into IPv6.
pub type Addr = [u32; 4];

/// `IPPROTO_TCP`.
pub const PROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const PROTO_UDP: u8 = 17;

/// Third word of an IPv4-mapped address (`00 00 ff ff` in memory).
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Maps a raw IPv4 address word (as read from the packet) to the 16-byte form.
#[inline(always)]
pub const fn v4_mapped(raw: u32) -> Addr {
    [0, 0, V4_MAPPED_WORD, raw]
}

/// True for an IPv4-mapped address.
#[inline(always)]
pub const fn is_v4(addr: &Addr) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
}

/// Frontend key: virtual address, port, protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Service flag: `sessionAffinity: ClientIP`.
pub const SVC_F_AFFINITY: u32 = 1 << 0;
/// Service flag: with no backend, drop instead of rejecting (ETP/ITP Local with no local
/// endpoint, as kube-proxy does).
pub const SVC_F_DROP_NO_BACKEND: u32 = 1 << 1;
/// Service flag: frontends reached from outside the cluster (NodePort, LoadBalancer IPs,
/// externalIPs): a remote backend gets the flow source-NATed to the node address.
pub const SVC_F_EXTERNAL: u32 = 1 << 2;
/// Service flag: only sources in `lb_source_ranges` for this service may connect
/// (`loadBalancerSourceRanges`); others are dropped.
pub const SVC_F_SOURCE_RANGES: u32 = 1 << 3;

/// Frontend value: which service it is and where its Maglev table lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Stable id (index of the per-service counters).
    pub service_id: u32,
    /// Usable backends; 0 means reject (or drop with `SVC_F_DROP_NO_BACKEND`).
    pub backend_count: u32,
    /// First slot of this service's range in the Maglev array.
    pub maglev_offset: u32,
    /// Slots in the range (a prime, or 0 with no backend).
    pub maglev_size: u32,
    /// `SVC_F_*`.
    pub flags: u32,
    /// ClientIP affinity idle timeout, seconds.
    pub affinity_timeout: u32,
}

/// Backend flag: the entry is in use (an ARRAY slot always exists).
pub const BE_F_PRESENT: u8 = 1 << 0;
/// Backend flag: terminating (serving, not ready): kept for existing flows.
pub const BE_F_TERMINATING: u8 = 1 << 1;
/// Backend flag: on this node.
pub const BE_F_LOCAL: u8 = 1 << 2;

/// Backend value, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendValue {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    /// `BE_F_*`.
    pub flags: u8,
    pub _pad: u8,
}

/// A flow as seen in the packet: source, destination, ports, protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Flow direction: client -> frontend; rewrite the destination.
pub const FLOW_FORWARD: u8 = 1;
/// Flow direction: backend -> client; rewrite the source back to the frontend.
pub const FLOW_REPLY: u8 = 2;

/// Flow flag: the flow is source-NATed; `nat_addr:nat_port` is the other rewritten end. (A
/// port clash is solved the same way, with the client's own address as `nat_addr`.)
pub const FLOW_F_SNAT: u8 = 1 << 0;

/// Flow table value: one per direction. The two entries of a flow are created together,
/// removed together, and each names the other's key (`lb_common::ct::{forward_key,
/// reverse_key}`), so neither can outlive the other.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    /// New destination (forward: the backend) or new source (reply: the frontend).
    pub addr: Addr,
    /// With `FLOW_F_SNAT`: new source (forward: node address) or new destination (reply: the
    /// original client).
    pub nat_addr: Addr,
    /// Network byte order.
    pub port: u16,
    /// Network byte order.
    pub nat_port: u16,
    /// `FLOW_FORWARD` or `FLOW_REPLY`.
    pub direction: u8,
    /// `FLOW_F_*`.
    pub flags: u8,
    /// `ct::CT_*`: what this direction has carried so far.
    pub state: u8,
    pub _pad: u8,
    pub backend_id: u32,
    pub service_id: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last packet this direction carried,
    /// refreshed at most every `ct::TOUCH_NS`.
    pub last_seen_ns: u64,
    /// `bpf_ktime_get_ns` when the flow was created.
    pub created_ns: u64,
}

/// Membership key: a backend id in a service (`lb_members`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
pub struct MemberKey {
    pub service_id: u32,
    pub backend_id: u32,
}

/// Member flag: new flows may go to it (it is in the service's Maglev table); without it the
/// backend only keeps its existing flows (terminating).
pub const MEMBER_F_USABLE: u32 = 1 << 0;

/// Membership value. `generation` changes whenever the membership is created anew (the id
/// left the service and came back, maybe as another pod), so an affinity entry made for an
/// earlier membership is not honoured.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MemberValue {
    pub generation: u32,
    /// `MEMBER_F_*`.
    pub flags: u32,
}

/// Key data of the source-range LPM trie: service id, then the source address (the trie's
/// prefix length counts the 32 service-id bits too).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SourceRangeKey {
    pub service_id: u32,
    pub addr: Addr,
}

/// Key of the fragment table: a datagram being fragmented (IPv4, or IPv6 with a fragment
/// header), as its fragments arrive, before translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragmentKey {
    pub src: Addr,
    pub dst: Addr,
    /// The identification, network byte order: IPv4's 16 bits (in the low-addressed two
    /// bytes), or the IPv6 fragment header's 32.
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// What later fragments get: the addresses the first fragment left with (both sides: a
/// source-NATed flow rewrites both), so they follow it without an L4 header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragmentValue {
    pub src: Addr,
    pub dst: Addr,
    pub service_id: u32,
}

/// Affinity key: service and client address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityKey {
    pub client: Addr,
    pub service_id: u32,
}

/// Affinity value: the backend chosen and when the client was last seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    /// `MemberValue::generation` of the membership the choice was made under.
    pub generation: u32,
    /// `bpf_ktime_get_ns` at the last new flow of this client.
    pub last_seen_ns: u64,
}

/// Config flag: pick a random slot of the service's range instead of the flow-hash slot.
pub const CFG_F_RANDOM: u32 = 1 << 0;
/// Config flag: frontends without backends drop instead of rejecting.
pub const CFG_F_NO_BACKEND_DROP: u32 = 1 << 1;
/// Config flag: translated packets at XDP are forwarded there (FIB lookup, then XDP_TX or a
/// redirect to a port in `lb_xdp_tx_ports`) instead of going up the node's stack.
pub const CFG_F_XDP_FORWARD: u32 = 1 << 2;

/// Slots of `lb_stats_xdp_forward`: what became of translated packets at XDP.
pub const XDP_FWD_REDIRECTED: u32 = 0;
pub const XDP_FWD_TX: u32 = 1;
/// FIB lookup failed (no route, no neighbour yet, local, MTU) or the egress port is not one
/// of ours: handed to the stack, which resolves it.
pub const XDP_FWD_TO_STACK: u32 = 2;
pub const XDP_FWD_SLOTS: u32 = 3;

/// Config flag: packets `lb_tc_pod` has translated leave TC for their next hop (TC host
/// routing: `bpf_redirect_peer` into a local pod, `bpf_redirect_neigh` otherwise) instead of
/// going through the node's routing and netfilter.
pub const CFG_F_HOST_ROUTING: u32 = 1 << 3;

/// Slots of `lb_stats_host_routing`: what became of packets `lb_tc_pod` translated (or
/// `lb_tc_uplink` found marked by `lb_xdp`) while host routing is on.
/// Straight into a local pod's namespace (`bpf_redirect_peer`).
pub const HOST_ROUTE_PEER: u32 = 0;
/// Out of the FIB's egress interface, the kernel resolving the neighbour
/// (`bpf_redirect_neigh`): a remote backend, or a local pod whose neighbour entry is not
/// resolved yet.
pub const HOST_ROUTE_NEIGH: u32 = 1;
/// The FIB had no next hop to give (no route, local address, MTU, forwarding off), or, for a
/// packet XDP translated, the next hop is outside the node: handed to the stack, which
/// resolves it or answers.
pub const HOST_ROUTE_TO_STACK: u32 = 2;
/// Translated at XDP, but the driver keeps no metadata for the mark (`bpf_xdp_adjust_meta`
/// refused): the packet takes the stack unmarked.
pub const HOST_ROUTE_NO_METADATA: u32 = 3;
pub const HOST_ROUTE_SLOTS: u32 = 4;

/// Flow life times per state, seconds (kube-proxy's `--conntrack-*` flags; `ct::pair_timeout`
/// says which applies).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    /// TCP: SYN seen, handshake not completed by the client.
    pub tcp_syn: u32,
    pub tcp_established: u32,
    /// TCP: one side sent FIN.
    pub tcp_close_wait: u32,
    /// TCP: both sides sent FIN.
    pub tcp_time_wait: u32,
    /// TCP: a RST was seen.
    pub tcp_close: u32,
    /// UDP: no reply seen yet.
    pub udp: u32,
    /// UDP: replies seen.
    pub udp_stream: u32,
    pub _pad: u32,
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl CtTimeouts {
    /// kube-proxy's defaults where it has a flag (established 24 h, close-wait 1 h),
    /// nf_conntrack's for UDP (30 s / 120 s), Cilium's for SYN (60 s) and closed flows (10 s).
    pub const DEFAULT: CtTimeouts = CtTimeouts {
        tcp_syn: 60,
        tcp_established: 86_400,
        tcp_close_wait: 3_600,
        tcp_time_wait: 10,
        tcp_close: 10,
        udp: 30,
        udp_stream: 120,
        _pad: 0,
    };
}

/// Source ports handed out for source-NATed flows (and port clashes), by default above
/// Linux's default ephemeral range (32768-60999), so they do not collide with the node's
/// own connections.
pub const DEFAULT_SNAT_PORT_MIN: u16 = 61_000;
pub const DEFAULT_SNAT_PORT_MAX: u16 = 65_535;

/// Datapath-wide settings, slot 0 of `CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// `CFG_F_*`.
    pub flags: u32,
    /// `--snat-port-range`, host order, inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Source address for source-NATed IPv4 flows (the node address, IPv4-mapped); zero: none.
    pub snat_v4: Addr,
    /// Source address for source-NATed IPv6 flows; zero: none.
    pub snat_v6: Addr,
    pub timeouts: CtTimeouts,
    /// The flows' clock from jiffies (`bpf_jiffies64`, inlined by the verifier: far cheaper
    /// than a clock helper on every packet): CLOCK_MONOTONIC ns =
    /// `tick_t0 + (jiffies - tick_j0) * tick_ns`, calibrated by the agent. Zero `tick_ns`:
    /// not calibrated, the programs read the coarse monotonic clock instead.
    pub tick_ns: u64,
    pub tick_j0: u64,
    pub tick_t0: u64,
    /// Rate limit of TCP RST and ICMP answers, per CPU (a token bucket kept as credit in
    /// nanoseconds): one answer costs `answer_cost_ns` of credit, and credit accrues with
    /// time up to `answer_cap_ns` (the burst). Zero cost: no limit.
    pub answer_cost_ns: u64,
    pub answer_cap_ns: u64,
    /// The agent's network namespace (its `SO_NETNS_COOKIE`): the connect-time programs act
    /// only on sockets there (the node's own processes). Zero: they act on none.
    pub host_netns_cookie: u64,
    /// Translated packets longer than this (L3 bytes) are checked against their route's MTU
    /// (`lb_ebpf::pmtu`): the smallest MTU of the node's links and routes. 0: never.
    pub mtu_floor: u32,
    pub _pad2: u32,
}

/// A host socket's view of a Service (`lb_sock_rev` key): the socket (its cookie) and the
/// backend the connect-time program sent it to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub _pad: [u16; 3],
}

/// The frontend a host socket asked for (`lb_sock_rev` value): what `getpeername` and
/// `recvmsg` show instead of the backend, and the (service, backend) pair whose membership
/// the agent checks for connected UDP sockets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevValue {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
    pub service_id: u32,
    pub backend_id: u32,
    pub _pad2: u32,
}

/// A checked pod interface (`lb_pod_ports` value): the interface its addresses may also
/// route through (its bridge, or itself), and up to two addresses of its pod that the agent
/// found in host routes out of it (`NO_ADDR`: none). A source equal to one of them passes the
/// check with no further lookup; any other goes through the FIB.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodPort {
    pub also: u32,
    pub addrs: [Addr; 2],
}

/// An empty `PodPort` address slot: ff..ff, a multicast address, never a packet's source.
pub const NO_ADDR: Addr = [u32::MAX; 4];

/// A source address seen on a pod interface (`lb_pod_sources`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodSource {
    pub ifindex: u32,
    pub addr: Addr,
}

/// One CPU's answer credit (`lb_answer_bucket`): nanoseconds of credit, and when it was last
/// brought up to date.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AnswerBucket {
    pub credit_ns: u64,
    pub last_ns: u64,
}

impl AnswerBucket {
    /// Whether an answer may go at `now`, taking its cost if so: the credit grows by the
    /// time passed, capped at `cap_ns`. The same arithmetic in the programs and in tests.
    #[inline(always)]
    pub fn take(&mut self, now: u64, cost_ns: u64, cap_ns: u64) -> bool {
        if cost_ns == 0 {
            return true;
        }
        let grown = self.credit_ns.saturating_add(now.saturating_sub(self.last_ns));
        self.credit_ns = if grown > cap_ns { cap_ns } else { grown };
        self.last_ns = now;
        if self.credit_ns < cost_ns {
            return false;
        }
        self.credit_ns -= cost_ns;
        true
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            flags: 0,
            snat_port_min: DEFAULT_SNAT_PORT_MIN,
            snat_port_max: DEFAULT_SNAT_PORT_MAX,
            snat_v4: [0; 4],
            snat_v6: [0; 4],
            timeouts: CtTimeouts::default(),
            tick_ns: 0,
            tick_j0: 0,
            tick_t0: 0,
            answer_cost_ns: 0,
            answer_cap_ns: 0,
            host_netns_cookie: 0,
            mtu_floor: 0,
            _pad2: 0,
        }
    }
}

/// A per-CPU packet and byte counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// `Event::kind`: a dropped packet.
pub const EVENT_DROP: u8 = 1;
/// `Event::kind`: a packet answered with a TCP RST or ICMP unreachable.
pub const EVENT_REJECT: u8 = 2;
/// A new flow translated to a backend (sampled: `MonitorLease::sample`).
pub const EVENT_NEW_FLOW: u8 = 3;
/// `Event::hook`.
pub const HOOK_XDP: u8 = 1;
/// TC on a pod interface (`lb_tc_pod`).
pub const HOOK_TC: u8 = 2;
/// TC on a node interface (`lb_tc_node`, `--node-hook tc`).
pub const HOOK_TC_NODE: u8 = 3;
/// TC egress (`lb_tc_egress`): replies the node's own stack sends.
pub const HOOK_TC_EGRESS: u8 = 4;

/// One datapath event in `lb_events` (ring buffer), for `lb monitor`: the packet's headers
/// as they arrived and the verdict's reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Event {
    /// CLOCK_MONOTONIC, coarse.
    pub time_ns: u64,
    pub src: Addr,
    pub dst: Addr,
    pub ifindex: u32,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    /// `HOOK_*`.
    pub hook: u8,
    /// `EVENT_*`.
    pub kind: u8,
    /// `verdict::Reason`.
    pub reason: u8,
    pub len: u32,
    /// A new flow's translated destination (its backend); zero for drops and rejects.
    pub xlate: Addr,
    /// Network byte order.
    pub xlate_port: u16,
    pub _pad: u16,
}

/// `lb_monitor[0]`: whether events are wanted. A reader renews `until_ns` (CLOCK_MONOTONIC)
/// while it runs, so a reader killed without clean-up stops the events within seconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MonitorLease {
    pub until_ns: u64,
    /// Bits `1 << EVENT_*` wanted.
    pub kinds: u32,
    /// New flows: one in this many is reported (0 and 1: every one).
    pub sample: u32,
}

/// `lb_stats_events` slots: events written, and events lost to a full ring.
pub const EVENTS_SENT: u32 = 0;
pub const EVENTS_LOST: u32 = 1;
pub const EVENTS_SLOTS: u32 = 2;

// The ABI lock: the kernel and the agent must agree on every size and offset.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<ServiceKey>() == 20);
    assert!(offset_of!(ServiceKey, port) == 16);
    assert!(offset_of!(ServiceKey, proto) == 18);
    assert!(size_of::<ServiceValue>() == 24);
    assert!(offset_of!(ServiceValue, affinity_timeout) == 20);
    assert!(size_of::<BackendValue>() == 20);
    assert!(offset_of!(BackendValue, flags) == 18);
    assert!(size_of::<FlowKey>() == 40);
    assert!(offset_of!(FlowKey, sport) == 32);
    assert!(offset_of!(FlowKey, proto) == 36);
    assert!(size_of::<FlowValue>() == 64);
    assert!(offset_of!(FlowValue, port) == 32);
    assert!(offset_of!(FlowValue, direction) == 36);
    assert!(offset_of!(FlowValue, state) == 38);
    assert!(offset_of!(FlowValue, backend_id) == 40);
    assert!(offset_of!(FlowValue, last_seen_ns) == 48);
    assert!(offset_of!(FlowValue, created_ns) == 56);
    assert!(size_of::<MemberKey>() == 8);
    assert!(size_of::<MemberValue>() == 8);
    assert!(size_of::<CtTimeouts>() == 32);
    assert!(size_of::<SourceRangeKey>() == 20);
    assert!(size_of::<FragmentKey>() == 40);
    assert!(size_of::<FragmentValue>() == 36);
    assert!(size_of::<AffinityKey>() == 20);
    assert!(size_of::<SockRevKey>() == 32);
    assert!(size_of::<SockRevValue>() == 32);
    assert!(size_of::<AffinityValue>() == 16);
    assert!(offset_of!(AffinityValue, last_seen_ns) == 8);
    assert!(size_of::<Config>() == 128);
    assert!(offset_of!(Config, answer_cost_ns) == 96);
    assert!(size_of::<AnswerBucket>() == 16);
    assert!(size_of::<PodSource>() == 20);
    assert!(size_of::<PodPort>() == 36);
    assert!(offset_of!(Config, tick_ns) == 72);
    assert!(offset_of!(Config, snat_port_min) == 4);
    assert!(offset_of!(Config, snat_v6) == 24);
    assert!(offset_of!(Config, timeouts) == 40);
    assert!(size_of::<Counter>() == 16);
    assert!(size_of::<Event>() == 80);
    assert!(size_of::<MonitorLease>() == 16);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, and have no padding (see the asserts above), so
    // every byte pattern is a valid value.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::MonitorLease {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::BackendValue {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::FragmentKey {}
    unsafe impl aya::Pod for super::FragmentValue {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::SourceRangeKey {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::MemberKey {}
    unsafe impl aya::Pod for super::MemberValue {}
    unsafe impl aya::Pod for super::PodPort {}
    unsafe impl aya::Pod for super::SockRevKey {}
    unsafe impl aya::Pod for super::SockRevValue {}
}

#[cfg(any(feature = "user", test))]
mod host {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    impl PodPort {
        /// Interface `also` with the first two of `addrs` (the rest go unlisted: the FIB
        /// answers for them).
        pub fn new(also: u32, addrs: &[IpAddr]) -> Self {
            let mut p = PodPort { also, addrs: [NO_ADDR; 2] };
            for (slot, ip) in p.addrs.iter_mut().zip(addrs) {
                *slot = addr_from_ip(*ip);
            }
            p
        }
    }

    /// Host `IpAddr` -> 16-byte packet-order form.
    pub fn addr_from_ip(ip: IpAddr) -> Addr {
        let b = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        [w(0), w(4), w(8), w(12)]
    }

    /// 16-byte packet-order form -> host `IpAddr` (IPv4-mapped comes back as IPv4).
    pub fn ip_from_addr(addr: &Addr) -> IpAddr {
        let mut b = [0u8; 16];
        for (i, w) in addr.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        let v6 = Ipv6Addr::from(b);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }

    /// Raw IPv4 word as the packet holds it.
    pub fn raw_v4(ip: Ipv4Addr) -> u32 {
        u32::from_ne_bytes(ip.octets())
    }

    impl ServiceKey {
        pub fn new(ip: IpAddr, port: u16, proto: u8) -> Self {
            ServiceKey { addr: addr_from_ip(ip), port: port.to_be(), proto, _pad: 0 }
        }
        pub fn ip(&self) -> IpAddr {
            ip_from_addr(&self.addr)
        }
        pub fn port(&self) -> u16 {
            u16::from_be(self.port)
        }
    }

    impl BackendValue {
        pub fn new(ip: IpAddr, port: u16, flags: u8) -> Self {
            BackendValue { addr: addr_from_ip(ip), port: port.to_be(), flags, _pad: 0 }
        }
        pub fn ip(&self) -> IpAddr {
            ip_from_addr(&self.addr)
        }
        pub fn port(&self) -> u16 {
            u16::from_be(self.port)
        }
    }

    impl FlowKey {
        pub fn new(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: u8) -> Self {
            FlowKey {
                src: addr_from_ip(src),
                dst: addr_from_ip(dst),
                sport: sport.to_be(),
                dport: dport.to_be(),
                proto,
                _pad: [0; 3],
            }
        }
    }

    /// Protocol name for display.
    pub fn proto_name(proto: u8) -> &'static str {
        match proto {
            PROTO_TCP => "TCP",
            PROTO_UDP => "UDP",
            _ => "?",
        }
    }
}

#[cfg(any(feature = "user", test))]
pub use host::*;

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn the_answer_bucket_allows_its_burst_then_its_rate() {
        const MS: u64 = 1_000_000;
        // 100 answers a second (10 ms each), bursts of 5.
        let (cost, cap) = (10 * MS, 50 * MS);
        let mut b = AnswerBucket::default();
        let t0 = 1_000_000 * MS;
        let burst = (0..20).filter(|_| b.take(t0, cost, cap)).count();
        assert_eq!(burst, 5, "a full bucket gives its burst, then nothing at the same instant");
        // Over one second in 1 ms steps: 100 more, never more than the rate.
        let mut given = 0;
        for ms in 1..=1000 {
            given += (0..3).filter(|_| b.take(t0 + ms * MS, cost, cap)).count();
        }
        assert_eq!(given, 100);
        // A long pause refills only up to the burst.
        let later = (0..20).filter(|_| b.take(t0 + 3600 * 1000 * MS, cost, cap)).count();
        assert_eq!(later, 5);
        // No cost: no limit.
        assert!((0..1000).all(|_| b.take(t0, 0, 0)));
    }

    #[test]
    fn v4_round_trips_through_mapped_form() {
        let ip: IpAddr = "198.19.0.10".parse().unwrap();
        let a = addr_from_ip(ip);
        assert!(is_v4(&a));
        assert_eq!(a[3], u32::from_ne_bytes([198, 19, 0, 10]));
        assert_eq!(a, v4_mapped(a[3]));
        assert_eq!(ip_from_addr(&a), ip);
    }

    #[test]
    fn v6_round_trips() {
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let a = addr_from_ip(ip);
        assert!(!is_v4(&a));
        assert_eq!(ip_from_addr(&a), ip);
    }

    #[test]
    fn ports_are_network_order() {
        let k = ServiceKey::new("198.19.0.1".parse().unwrap(), 80, PROTO_TCP);
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
        assert_eq!(k.port(), 80);
    }
}
