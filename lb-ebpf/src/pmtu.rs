//! Path MTU for translated packets. A packet we translate and pass on is forwarded by the
//! node (its stack, or host routing's redirect, which leaves what is over the MTU to the
//! stack); when it is too big for the route, the stack's ICMP "fragmentation needed" goes to
//! the packet's translated source (the node itself when source-NATed) and quotes the
//! translated header, which no client socket matches: the path black-holes. So a translated
//! packet longer than `Config::mtu_floor` (the smallest MTU of the node's links and routes,
//! set by the agent; 0 turns this off) is checked against the FIB, and one too big for its
//! route (IPv4 with DF, or IPv6) is answered here instead: ICMP fragmentation needed / ICMPv6
//! packet too big with the route's MTU, quoting the packet as it arrived, so the sender's
//! socket (the client, or a backend for a reply) lowers its segment size.
//!
//! On the node interfaces, whichever program runs there: `lb_xdp`, or `lb_tc_node` with
//! `--node-hook tc` (external clients, whose path is the one that changes MTU: a NodePort to
//! a remote backend across a smaller underlay). Not in `lb_tc_pod`: pods get an MTU from
//! their CNI that fits the node's paths, and the check doubles the instructions the verifier
//! walks for a TC program (371 000 → 815 000). At TC a packet may be a GSO or GRO packet
//! standing for several segments: what must fit the route is one segment (`forwarded_len`),
//! as in the stack's own forwarding check.

use aya_ebpf::helpers::generated::bpf_fib_lookup;
use lb_common::{
    abi::PROTO_TCP,
    verdict::{Action, Reason, pack},
};

use crate::{
    conntrack,
    fib::{AF_INET, AF_INET6, BPF_FIB_LKUP_RET_FRAG_NEEDED, FibParams},
    nat::Packet,
    parse::{Headers, read},
    reject, select,
};

/// IPv4 "don't fragment".
const IP_DF: u16 = 0x4000;

/// Whether the packet is longer than `Config::mtu_floor`, so that `exceeded` must look.
/// Inlined: every translated packet asks, and a call costs ~10 ns on the lab's CPUs. A GSO
/// packet (TC) is taken at its largest segment, as if its L4 header had all its options:
/// `exceeded` reads the real one.
#[inline(always)]
pub fn over_floor<P: Packet>(pkt: &P, h: &Headers) -> bool {
    let floor = select::config_ref().map_or(0, |c| c.mtu_floor);
    floor != 0 && forwarded_len(pkt, h, MAX_L4_HEADER) > floor
}

/// The longest TCP header (data offset 15).
const MAX_L4_HEADER: u32 = 60;

/// The IP length the route's MTU applies to: the packet's, or for a GSO packet that of each
/// segment it will be cut into (its IP and L4 headers plus the segment payload), as the
/// stack counts it (`skb_gso_validate_network_len`). Without this, every large send of a
/// pod's TCP socket (tens of kilobytes in one skb) would read as too big.
#[inline(always)]
fn forwarded_len<P: Packet>(pkt: &P, h: &Headers, l4_header: u32) -> u32 {
    let whole = pkt.len().saturating_sub(h.l3_off as u32);
    let gso = pkt.gso_size();
    if gso == 0 {
        return whole;
    }
    let segment = (h.l4_off - h.l3_off) as u32 + l4_header + gso;
    if segment < whole { segment } else { whole }
}

/// Whether the packet, as translated, exceeds its route's MTU, which is then left in the
/// scratch slot for `answer`.
#[inline(never)]
pub fn exceeded<P: Packet>(pkt: &P, h: &Headers) -> bool {
    let l4_header = if pkt.gso_size() == 0 {
        0
    } else if h.proto == PROTO_TCP {
        // The data offset: the header's length in 32-bit words. Two bytes read: for one,
        // LLVM's bounds check takes a form the verifier does not follow.
        read::<[u8; 2]>(pkt.data(), pkt.data_end(), h.l4_off + 12).map_or(20, |b| u32::from(b[0] >> 4) * 4)
    } else {
        8
    };
    let len = forwarded_len(pkt, h, l4_header);
    let (data, end) = (pkt.data(), pkt.data_end());
    // In the scratch slot, not on the stack.
    let Some(s) = conntrack::scratch() else { return false };
    // SAFETY: this CPU's scratch slot; `fib` is this step's.
    let p: &mut FibParams = unsafe { &mut (*s).fib };
    p.sport = 0;
    p.dport = 0;
    p.tos_flowinfo = 0;
    p.vlan = 0;
    p.l4_protocol = h.proto;
    p.tot_len = len as u16;
    p.ifindex = pkt.ifindex();
    // The addresses as translated: read back from the packet.
    if h.v6 {
        let (Some(src), Some(dst)) = (read(data, end, h.l3_off + 8), read(data, end, h.l3_off + 24)) else {
            return false;
        };
        p.family = AF_INET6;
        p.src = src;
        p.dst = dst;
    } else {
        // Without DF the stack fragments it.
        let frag: u16 = read(data, end, h.l3_off + 6).unwrap_or(0);
        let (Some(src), Some(dst)) = (read::<u32>(data, end, h.l3_off + 12), read(data, end, h.l3_off + 16))
        else {
            return false;
        };
        if u16::from_be(frag) & IP_DF == 0 {
            return false;
        }
        p.family = AF_INET;
        p.src = [src, 0, 0, 0];
        p.dst = [dst, 0, 0, 0];
    }
    // SAFETY: a valid context and a 64-byte params struct.
    let rc = unsafe { bpf_fib_lookup(pkt.ctx_ptr(), (p as *mut FibParams).cast(), 64, 0) };
    // On FRAG_NEEDED the kernel wrote the MTU where `tot_len` was; it stays there.
    rc == BPF_FIB_LKUP_RET_FRAG_NEEDED
}

/// Turns the packet `exceeded` found too big into its answer (rate-limited like every
/// answer), naming the MTU left in the scratch slot and quoting the header as it arrived.
/// Returns the outcome packed (`verdict::pack`: BPF functions cannot return pairs).
#[inline(never)]
pub fn answer<P: Packet>(pkt: &mut P, h: &Headers) -> u32 {
    let Some(s) = conntrack::scratch() else { return pack(Action::Drop, Reason::MapError) };
    // SAFETY: this CPU's scratch slot; `exceeded` left the MTU there for this packet.
    let mtu = unsafe { (*s).fib.tot_len };
    if !reject::answer_allowed() {
        return pack(Action::Drop, Reason::AnswerRateLimited);
    }
    match reject::too_big(pkt, h, mtu) {
        Ok(()) => pack(Action::Bounce, Reason::FragNeeded),
        Err(r) => pack(Action::Drop, r),
    }
}
