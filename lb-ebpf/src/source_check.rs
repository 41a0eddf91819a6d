//! Pods may create or change flow state only under their own addresses. A packet that would
//! (a new flow, a port clash, a SYN, FIN or RST of a known flow) arriving on a pod
//! interface the agent attached (`lb_pod_ports`) must come from an address the kernel
//! routes back out of that interface, or out of the bridge it belongs to: a strict
//! reverse-path check through the FIB. Without it a pod could open, close or take over
//! flows under another pod's address. Packets that only use state (data of a known flow)
//! pay nothing; interfaces not in the map (none attached by an agent) are not checked.
//!
//! A source that passed is remembered for a second (`lb_pod_sources`): a FIB lookup costs
//! about a third of a new flow, a cache hit a few percent. Only sources that passed are
//! remembered, so a spoofing pod cannot plant an entry.
//!
//! Before either, the pod's own addresses: the agent puts in each interface's `lb_pod_ports`
//! entry the addresses it finds in host routes out of it (the usual veth-per-pod CNI gives
//! each pod one per family), so a pod's packets pass on the lookup the check makes anyway.

use aya_ebpf::helpers::generated::bpf_fib_lookup;
use lb_common::abi::{Addr, PodSource};

use crate::{
    conntrack,
    fib::{
        AF_INET, AF_INET6, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, FibParams,
    },
    maps::{POD_PORTS, POD_SOURCES},
};

/// How long a source that passed is trusted without a new lookup.
const TRUSTED_NS: u64 = 1_000_000_000;

/// Whether `src`, seen arriving on `ingress`, is routed back there. `ctx`: the program's
/// context, for the helper. Not inlined: the 64-byte FIB block stays off the callers' frames.
#[inline(never)]
pub fn source_ok(ctx: *mut core::ffi::c_void, ingress: u32, src: &Addr, v6: bool) -> bool {
    // SAFETY: copied out at once.
    let Some(port) = (unsafe { POD_PORTS.get(&ingress).copied() }) else { return true };
    if port.addrs[0] == *src || port.addrs[1] == *src {
        return true;
    }
    let key = PodSource { ifindex: ingress, addr: *src };
    let now = conntrack::now();
    // SAFETY: copied out at once.
    if let Some(seen) = unsafe { POD_SOURCES.get(&key).copied() }
        && now.wrapping_sub(seen) < TRUSTED_NS
    {
        return true;
    }
    // SAFETY: all-zero `FibParams` are valid (integers).
    let mut p = core::mem::MaybeUninit::uninit();
    let p: &mut FibParams = unsafe { crate::zero::zeroed(&mut p) };
    p.ifindex = ingress;
    if v6 {
        p.family = AF_INET6;
        p.dst = *src;
    } else {
        p.family = AF_INET;
        p.dst[0] = src[3];
    }
    // SAFETY: helper call with the program's context and a 64-byte parameter block.
    let rc = unsafe { bpf_fib_lookup(ctx, (p as *mut FibParams).cast(), 64, 0) };
    // Forwarding off on the interface (a family this node does not route): nothing to
    // check against, and the kernel will not forward the packet anyway.
    let ok = rc == BPF_FIB_LKUP_RET_FWD_DISABLED
        || ((rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH)
            && (p.ifindex == ingress || p.ifindex == port.also));
    if ok {
        let _ = POD_SOURCES.insert(&key, &now, 0);
    }
    ok
}
