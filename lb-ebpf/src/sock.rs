//! Connect-time load balancing for clients in the node's own network namespace: the node's
//! shell, its daemons and hostNetwork pods. Their packets leave through the host stack, past
//! every hook the packet path has, so kube-proxy answers them in its `nat OUTPUT` chain; here
//! cgroup `sock_addr` programs point the socket itself at a backend:
//! * `connect` (TCP and UDP) and `sendmsg` (unconnected UDP) to a frontend: the destination
//!   becomes a backend chosen from the Service's Maglev table (or affinity entry), the same
//!   tables the packet path reads. The socket's packets then need no translation at all.
//! * a frontend with no usable backend, or a ClusterIP port it does not serve: the call fails
//!   with ECONNREFUSED, as a closed port would answer.
//! * `getpeername` and `recvmsg` show the frontend instead of the backend, from the
//!   `lb_sock_rev` entry the first step wrote (keyed by the socket's cookie).
//!
//! Only sockets in the agent's network namespace (`Config::host_netns_cookie`) are touched:
//! pods keep the TC path, and other namespaces on the machine are left alone.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{abi::*, verdict::Reason};

use core::mem::MaybeUninit;

use crate::{
    conntrack,
    maps::{SERVICES, SOCK_REV},
    select, stats, zero,
};

/// What a `sock_addr` program returns to let the call proceed.
pub const PROCEED: i32 = 1;
/// ... and to fail it (with the error set through `bpf_set_retval`).
const FAIL: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// Whether the socket lives in the agent's network namespace.
#[inline(always)]
fn in_host_ns(ctx: &SockAddrContext) -> bool {
    let Some(c) = select::config_ref() else { return false };
    let want = c.host_netns_cookie;
    // SAFETY: helper on our own context.
    want != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == want
}

/// The call's address (IPv4 as IPv4-mapped) and port (network order).
#[inline(always)]
fn user_addr(ctx: &SockAddrContext, v6: bool) -> (Addr, u16) {
    let sa = ctx.sock_addr;
    // SAFETY: fields of our own context; the verifier checks each access for the hook.
    unsafe {
        let addr = if v6 {
            [(*sa).user_ip6[0], (*sa).user_ip6[1], (*sa).user_ip6[2], (*sa).user_ip6[3]]
        } else {
            v4_mapped((*sa).user_ip4)
        };
        (addr, (*sa).user_port as u16)
    }
}

#[inline(always)]
fn set_user_addr(ctx: &SockAddrContext, v6: bool, addr: &Addr, port: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: writable fields of our own context (4-byte stores, as the kernel requires).
    unsafe {
        if v6 {
            (*sa).user_ip6[0] = addr[0];
            (*sa).user_ip6[1] = addr[1];
            (*sa).user_ip6[2] = addr[2];
            (*sa).user_ip6[3] = addr[3];
        } else {
            (*sa).user_ip4 = addr[3];
        }
        (*sa).user_port = port as u32;
    }
}

/// `connect` (TCP, UDP) and `sendmsg` (UDP) to a frontend: points the call at a backend.
#[inline(always)]
pub fn connect(ctx: &SockAddrContext, v6: bool) -> i32 {
    if !in_host_ns(ctx) {
        return PROCEED;
    }
    // SAFETY: a readable field of our own context.
    let proto = unsafe { (*ctx.sock_addr).protocol } as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return PROCEED;
    }
    let (addr, port) = user_addr(ctx, v6);
    // An IPv4-mapped address through an IPv6 socket is IPv4 traffic: the IPv4 hooks do not
    // see it, and the packet path translates it instead.
    if v6 && is_v4(&addr) {
        return PROCEED;
    }
    let skey = ServiceKey { addr, port, proto, _pad: 0 };
    let Some(svc) = SERVICES.get_ptr(&skey).map(|p| {
        // SAFETY: a valid map value pointer, copied at once.
        unsafe { p.read() }
    }) else {
        // A ClusterIP's other ports are closed, as on the packet path.
        let vip = ServiceKey { addr, port: 0, proto: 0, _pad: 0 };
        if SERVICES.get_ptr(&vip).is_some() {
            return refuse();
        }
        return PROCEED;
    };
    if svc.backend_count == 0 {
        return refuse();
    }
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The flow key the choice hashes: the node's address as the client (what the backend
    // will see, and what affinity keys on), the socket's cookie for the source port, so one
    // socket keeps its backend while sockets spread.
    // Keys and values are zeroed word by word: zero fields in a literal become a `memset`
    // call (`zero`).
    let mut k = MaybeUninit::uninit();
    // SAFETY: all-zero bytes are a valid `FlowKey` (integers).
    let key: &mut FlowKey = unsafe { zero::zeroed(&mut k) };
    if let Some(node) = select::snat_addr(&addr) {
        key.src = node;
    }
    key.dst = addr;
    key.sport = (cookie ^ (cookie >> 16) ^ (cookie >> 32)) as u16;
    key.dport = port;
    key.proto = proto;
    let Some(id) = select::pick(&svc, key, conntrack::now()) else { return PROCEED };
    let Some(be) = select::backend(id) else { return PROCEED };
    let rkey = rev_key(cookie, &be.addr, be.port);
    let mut v = MaybeUninit::uninit();
    // SAFETY: all-zero bytes are a valid `SockRevValue` (integers).
    let rev: &mut SockRevValue = unsafe { zero::zeroed(&mut v) };
    rev.addr = addr;
    rev.port = port;
    rev.service_id = svc.service_id;
    rev.backend_id = id;
    // Without it `getpeername` would show the backend: still a working socket.
    let _ = SOCK_REV.insert(&rkey, rev, 0);
    set_user_addr(ctx, v6, &be.addr, be.port);
    stats::reason(Reason::HostConnect, 0);
    stats::service(svc.service_id, 0);
    PROCEED
}

#[inline(always)]
fn rev_key(cookie: u64, addr: &Addr, port: u16) -> SockRevKey {
    let mut k = MaybeUninit::uninit();
    // SAFETY: all-zero bytes are a valid `SockRevKey` (integers).
    let key: &mut SockRevKey = unsafe { zero::zeroed(&mut k) };
    key.cookie = cookie;
    key.addr = *addr;
    key.port = port;
    *key
}

#[inline(always)]
fn refuse() -> i32 {
    stats::reason(Reason::HostRefused, 0);
    // SAFETY: helper call; the kernel returns this error from the call.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    FAIL
}

/// `getpeername` and `recvmsg`: a backend this socket was pointed at shows as its frontend.
/// These hooks cannot fail a call: always `PROCEED`.
#[inline(always)]
pub fn restore(ctx: &SockAddrContext, v6: bool) -> i32 {
    if !in_host_ns(ctx) {
        return PROCEED;
    }
    let (addr, port) = user_addr(ctx, v6);
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(p) = SOCK_REV.get_ptr(&rev_key(cookie, &addr, port)) {
        // SAFETY: a valid map value pointer, copied at once.
        let v = unsafe { p.read() };
        set_user_addr(ctx, v6, &v.addr, v.port);
    }
    PROCEED
}
