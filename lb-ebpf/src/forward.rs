//! XDP forwarding (`CFG_F_XDP_FORWARD`, `lb agent --xdp-forward`): a packet `lb_xdp` has
//! translated leaves from XDP instead of climbing the node's stack. The kernel FIB picks the
//! egress port and next hop; the TTL drops by one and the MACs are set as the stack would;
//! then XDP_TX when the egress is the ingress port, else a redirect — only to ports in
//! `lb_xdp_tx_ports` (the agent's XDP interfaces, whose drivers take redirected frames). Any
//! other case (no route, neighbour not resolved yet, local destination, MTU, VLAN) goes up
//! the stack unchanged, which resolves it. Opt-in: forwarded packets skip the node's
//! netfilter.

use aya_ebpf::{bindings::xdp_action, helpers::generated::bpf_fib_lookup, programs::XdpContext};
use lb_common::abi::*;

use crate::{
    fib::{BPF_FIB_LKUP_RET_SUCCESS, FibParams, decrement_ttl, params_from_frame, set_macs},
    maps::{STATS_XDP_FORWARD, XDP_TX_PORTS},
};

#[inline(always)]
fn count(slot: u32, bytes: u64) {
    if let Some(c) = STATS_XDP_FORWARD.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Forwards a translated packet: the XDP verdict, or None to pass it to the stack.
#[inline(always)]
pub fn translated(ctx: &XdpContext) -> Option<u32> {
    let flags = crate::select::config_flags();
    if flags & CFG_F_XDP_FORWARD == 0 {
        return None;
    }
    let verdict = forward(ctx);
    let slot = match verdict {
        Some(xdp_action::XDP_TX) => XDP_FWD_TX,
        Some(_) => XDP_FWD_REDIRECTED,
        None => XDP_FWD_TO_STACK,
    };
    count(slot, (ctx.data_end() - ctx.data()) as u64);
    verdict
}

#[inline(never)]
fn forward(ctx: &XdpContext) -> Option<u32> {
    let (data, end) = (ctx.data(), ctx.data_end());
    // SAFETY: ctx.ctx is the program's context; ingress_ifindex is a plain field.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    // SAFETY: all-zero `FibParams` are valid (integers).
    let mut p = core::mem::MaybeUninit::uninit();
    let p: &mut FibParams = unsafe { crate::zero::zeroed(&mut p) };
    p.ifindex = ingress;
    params_from_frame(data, end, p, true)?;
    // SAFETY: helper call with a valid context and a 64-byte parameter block.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            (p as *mut FibParams).cast(),
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS || XDP_TX_PORTS.get(p.ifindex).is_none() {
        return None;
    }
    // Committed: decrement TTL / hop limit, set the MACs.
    if !decrement_ttl(data, end, p.family) {
        return None;
    }
    // SAFETY: `decrement_ttl` found the headers in place.
    unsafe { set_macs(data, p) };
    if p.ifindex == ingress {
        return Some(xdp_action::XDP_TX);
    }
    // Fails only if the port left the map since the check: the frame is already rewritten
    // for the next hop, so the stack could not take it.
    Some(XDP_TX_PORTS.redirect(p.ifindex, 0).unwrap_or(xdp_action::XDP_DROP))
}
