//! TC host routing (`CFG_F_HOST_ROUTING`, `lb agent --host-routing`): a packet `lb_tc_pod`
//! has translated (a pod's request to a Service, a local backend's reply) leaves TC for its
//! next hop instead of climbing the node's stack (routing, netfilter, neighbour lookup,
//! qdisc). The kernel FIB picks the egress interface:
//!
//! * one of our pod interfaces, neighbour known: the MACs are set and the packet goes
//!   straight into that pod's namespace (`bpf_redirect_peer`, the veth's peer ingress);
//! * any other egress (a remote backend through the underlay), or a pod whose neighbour is
//!   not resolved yet: out of that interface, the kernel filling in the next hop's MAC
//!   (`bpf_redirect_neigh`);
//! * no next hop (no route, a local address, over the MTU, forwarding off): the stack, which
//!   resolves or answers it, as without host routing.
//!
//! Either way the TTL drops by one, as the stack's forwarding would. Opt-in: these packets
//! skip the node's netfilter.
//!
//! Packets `lb_xdp` translated on a node interface for a local pod (a remote backend's reply
//! to a pod client, an outside client's request to a local backend) take the same shortcut
//! into the pod: when XDP leaves such a packet to the stack, it marks it in the packet's
//! metadata (`mark`), and `lb_tc_uplink`, at TC ingress of the same interface, sends the
//! marked ones on from here (`marked`). Only into a pod (`Hop::PodOnly`): a packet headed
//! back out to the network is left to the stack, whose forwarding applies the route's MTU
//! (the skb check here sees only the device's; at XDP, `--xdp-forward` is the shortcut for
//! those). Only our XDP program writes that metadata, and the stack ignores it; a driver
//! without XDP metadata leaves the packet unmarked, to take the stack as before.

use aya_ebpf::{
    bindings::TC_ACT_REDIRECT,
    helpers::generated::{bpf_fib_lookup, bpf_redirect_neigh, bpf_redirect_peer, bpf_xdp_adjust_meta},
    programs::{TcContext, XdpContext},
};
use lb_common::abi::*;

use crate::{
    fib::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, FibParams, decrement_ttl, params_from_frame,
        set_macs,
    },
    maps::{POD_PORTS, STATS_HOST_ROUTING},
};

#[inline(always)]
fn count(slot: u32, bytes: u64) {
    if let Some(c) = STATS_HOST_ROUTING.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Where a hook may send a packet from TC.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Into a local pod, or out towards any next hop (`lb_tc_pod`).
    Any,
    /// Into a local pod only (`lb_tc_uplink`).
    PodOnly,
}

/// Sends a translated packet to its next hop: the TC verdict, or None to let it take the
/// stack. Not inlined: called from the entry point once `process` has returned, so its frame
/// (the 64-byte FIB block) is not added to the decision's chain, which is at the stack limit.
#[inline(never)]
pub fn translated(ctx: &TcContext, hop: Hop) -> Option<i32> {
    if crate::select::config_flags() & CFG_F_HOST_ROUTING == 0 {
        return None;
    }
    let bytes = ctx.len() as u64;
    let verdict = route(ctx, hop);
    let slot = match verdict {
        Some(Via::Peer) => HOST_ROUTE_PEER,
        Some(Via::Neigh) => HOST_ROUTE_NEIGH,
        None => HOST_ROUTE_TO_STACK,
    };
    count(slot, bytes);
    verdict.map(|_| TC_ACT_REDIRECT)
}

/// The metadata `mark` leaves in front of a packet ("LBhr").
const MARK: u32 = 0x4c42_6872;
const MARK_LEN: usize = core::mem::size_of::<u32>();

/// At XDP: a packet translated there and left to the stack is marked for `lb_tc_uplink`, with
/// host routing on. A driver that keeps no metadata refuses the room: the packet goes
/// unmarked, counted (`HOST_ROUTE_NO_METADATA`).
#[inline(always)]
pub fn mark(ctx: &XdpContext) {
    if crate::select::config_flags() & CFG_F_HOST_ROUTING == 0 {
        return;
    }
    // SAFETY: helper call with our context; it moves only `data_meta`.
    let room = unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(MARK_LEN as i32)) } == 0;
    let (meta, data) = (ctx.metadata(), ctx.data());
    if !room || meta + MARK_LEN > data {
        count(HOST_ROUTE_NO_METADATA, (ctx.data_end() - data) as u64);
        return;
    }
    // SAFETY: the 4 bytes of metadata checked above.
    unsafe { (meta as *mut u32).write_unaligned(MARK) };
}

/// At TC: whether our XDP program marked this packet (`mark`).
#[inline(always)]
pub fn marked(ctx: &TcContext) -> bool {
    // SAFETY: reading our own skb's packet pointers.
    let (meta, data) = unsafe { ((*ctx.skb.skb).data_meta as usize, (*ctx.skb.skb).data as usize) };
    // SAFETY: the 4 bytes of metadata checked first.
    meta + MARK_LEN <= data && unsafe { (meta as *const u32).read_unaligned() } == MARK
}

enum Via {
    Peer,
    Neigh,
}

#[inline(always)]
fn route(ctx: &TcContext, hop: Hop) -> Option<Via> {
    // SAFETY: all-zero `FibParams` are valid (integers).
    let mut p = core::mem::MaybeUninit::uninit();
    let p: &mut FibParams = unsafe { crate::zero::zeroed(&mut p) };
    // SAFETY: reading our own skb's ingress interface.
    p.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // No length: the helper then checks the skb against the MTU itself, and skips the check
    // for a GSO packet (a pod's TCP sends 64 KB at a time), which egress segments.
    params_from_frame(ctx.data(), ctx.data_end(), p, false)?;
    // SAFETY: helper call with our skb and a 64-byte parameter block.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            (p as *mut FibParams).cast(),
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return None;
    }
    let peer = rc == BPF_FIB_LKUP_RET_SUCCESS && POD_PORTS.get_ptr(&p.ifindex).is_some();
    if !peer && hop == Hop::PodOnly {
        return None;
    }
    let data = ctx.data();
    if !decrement_ttl(data, ctx.data_end(), p.family) {
        return None;
    }
    if peer {
        // SAFETY: `decrement_ttl` found the headers in place.
        unsafe { set_macs(data, p) };
        // SAFETY: helper call; `lb_tc_pod` runs at TC ingress, where a peer redirect is valid.
        return (unsafe { bpf_redirect_peer(p.ifindex, 0) } == TC_ACT_REDIRECT as i64).then_some(Via::Peer);
    }
    // SAFETY: helper call; no parameters: the kernel routes the packet to its next hop itself.
    (unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) } == TC_ACT_REDIRECT as i64)
        .then_some(Via::Neigh)
}
