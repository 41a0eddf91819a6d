//! Entry points of the datapath. `lb_xdp` runs on node interfaces (external clients, replies
//! from remote backends), `lb_tc_pod` on the host side of pod interfaces (pod clients,
//! replies from local backends), `lb_tc_uplink` at TC ingress of the node interfaces with
//! host routing on (what `lb_xdp` translated for a local pod goes straight into it,
//! `host_route`), `lb_tc_node` on the node interfaces in place of `lb_xdp` with `--node-hook
//! tc`, `lb_tc_egress` at TC egress of both kinds of interface (replies the node's own stack
//! sends for a backend at one of its addresses). `lb_xdp` and the TC programs run the same
//! decision (`datapath::process`); this file only maps verdicts to each hook's return codes,
//! in one place. The `lb_connect*`,
//! `lb_sendmsg*`, `lb_recvmsg*` and `lb_getpeername*` programs serve the node's own sockets
//! at connect time (`sock`).
#![no_std]
#![no_main]
// Map keys and values go to the helpers by reference on purpose: passed by value, a
// 40-byte key is copied onto the 512-byte stack first.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, a 40-byte key is copied onto the 512-byte stack first"
)]

// The panic handler.
use lb_ebpf as _;

mod bpf_log;
mod conntrack;
mod datapath;
mod events;
mod fib;
mod forward;
mod host_route;
mod maps;
mod nat;
mod parse;
mod pmtu;
mod reject;
mod related;
mod select;
mod sock;
mod source_check;
mod stats;
mod zero;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::bpf_redirect,
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use lb_common::verdict::{Action, Reason};

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let mut ctx = ctx;
    match datapath::process::<_, true>(&mut ctx) {
        (Action::Pass, Reason::NewFlow | Reason::FlowHit | Reason::Reply | Reason::FragmentFollowed) => {
            forward::translated(&ctx).unwrap_or_else(|| {
                host_route::mark(&ctx);
                xdp_action::XDP_PASS
            })
        }
        (Action::Pass, _) => xdp_action::XDP_PASS,
        (Action::Drop, _) => xdp_action::XDP_DROP,
        (Action::Bounce, _) => xdp_action::XDP_TX,
    }
}

/// Headers we may touch must be in the linear part of the skb for direct access.
const TC_PULL_LEN: u32 = 128;

#[inline(always)]
fn pull_headers(ctx: &mut TcContext) {
    let want = if ctx.len() < TC_PULL_LEN { ctx.len() } else { TC_PULL_LEN };
    if ctx.data_end() - ctx.data() < want as usize {
        let _ = ctx.pull_data(want);
    }
}

/// Pod interfaces (traffic leaving pods).
#[classifier]
pub fn lb_tc_pod(ctx: TcContext) -> i32 {
    tc::<false>(ctx)
}

/// The node interfaces with `--node-hook tc`, in place of `lb_xdp`: `lb_tc_pod` plus the
/// answer to a translated packet too big for its path (`pmtu`), which external clients
/// behind a smaller path need. Its own program, loaded only when asked for: the check
/// doubles what the verifier walks.
#[classifier]
pub fn lb_tc_node(ctx: TcContext) -> i32 {
    tc::<true>(ctx)
}

#[inline(always)]
fn tc<const NODE_IFACE: bool>(ctx: TcContext) -> i32 {
    let mut ctx = ctx;
    pull_headers(&mut ctx);
    match datapath::process::<_, NODE_IFACE>(&mut ctx) {
        (Action::Pass, Reason::NewFlow | Reason::FlowHit | Reason::Reply | Reason::FragmentFollowed) => {
            host_route::translated(&ctx, host_route::Hop::Any).unwrap_or(TC_ACT_UNSPEC)
        }
        // UNSPEC (tcx: "next"): let other programs on the hook see the packet too.
        (Action::Pass, _) => TC_ACT_UNSPEC,
        (Action::Drop, _) => TC_ACT_SHOT,
        (Action::Bounce, _) => {
            // SAFETY: reading our own skb's ifindex; redirect back out of the same device.
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            // SAFETY: helper call.
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
    }
}

/// Packets `lb_xdp` translated and marked (`host_route::mark`) for a local pod go straight
/// into it, like `lb_tc_pod`'s; everything else takes the stack.
#[classifier]
pub fn lb_tc_uplink(ctx: TcContext) -> i32 {
    if !host_route::marked(&ctx) {
        return TC_ACT_UNSPEC;
    }
    host_route::translated(&ctx, host_route::Hop::PodOnly).unwrap_or(TC_ACT_UNSPEC)
}

/// TC egress of the pod and node interfaces: replies the node's own stack sends for flows
/// translated to a backend at one of its addresses (`datapath::stack_reply`). Only packets
/// the node originated: a forwarded packet came in through an interface (and our ingress
/// hooks) and leaves at once.
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    // SAFETY: the program's own skb; a plain field.
    if unsafe { (*ctx.skb.skb).ingress_ifindex } != 0 {
        return TC_ACT_UNSPEC;
    }
    let mut ctx = ctx;
    pull_headers(&mut ctx);
    match datapath::stack_reply(&mut ctx) {
        Action::Drop => TC_ACT_SHOT,
        _ => TC_ACT_UNSPEC,
    }
}

// Connect-time load balancing for the node's own sockets (`sock`).

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    sock::connect(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::connect(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::connect(&ctx, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, true)
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
