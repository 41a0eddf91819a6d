//! Events for `lb monitor`: a dropped or rejected packet, with its headers as it arrived and
//! the verdict's reason, written to the `lb_events` ring buffer while a monitor holds a lease
//! (`abi::MonitorLease`). New flows are reported too when the lease asks, one in `sample`.
//! Without a lease, the drop, reject and new-flow paths pay a call and one array read; the
//! hit path nothing. `--bpf-log debug` messages start here too (`bpf_log`).

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
};
use lb_common::{
    abi::*,
    verdict::{Action, Reason},
};

use crate::{
    maps::{EVENTS, MONITOR, STATS_EVENTS},
    nat::Packet,
    parse::Headers,
};

/// Reports a drop or a rejection (`out`) of packet `h`, or a new flow (sampled), if a
/// monitor wants it; `hook` is `Event::hook`.
#[inline(always)]
pub fn verdict<P: Packet>(pkt: &P, h: &Headers, out: (Action, Reason), bytes: u32, hook: u8) {
    let kind = match out {
        (Action::Drop, _) => EVENT_DROP,
        (Action::Bounce, _) => EVENT_REJECT,
        (Action::Pass, Reason::NewFlow) => EVENT_NEW_FLOW,
        (Action::Pass, _) => return,
    };
    emit(h, (kind as u32) << 8 | out.1 as u32, pkt.ifindex(), hook as u32, bytes);
}

/// Not inlined: its frame stays off the packet paths' stack, and the drop paths share it.
#[inline(never)]
fn emit(h: &Headers, kind_reason: u32, ifindex: u32, hook: u32, bytes: u32) {
    let kind = (kind_reason >> 8) as u8;
    if kind != EVENT_NEW_FLOW {
        crate::bpf_log::verdict(h, kind_reason, ifindex);
    }
    let Some(lease) = MONITOR.get_ptr(0) else { return };
    // SAFETY: a valid map value pointer; plain reads.
    let (until, kinds, sample) = unsafe { ((*lease).until_ns, (*lease).kinds, (*lease).sample) };
    if kinds & (1 << kind) == 0 {
        return;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now > until {
        return;
    }
    // SAFETY: helper without arguments.
    if kind == EVENT_NEW_FLOW && sample > 1 && unsafe { bpf_get_prandom_u32() } % sample != 0 {
        return;
    }
    // A new flow's backend: the flow just recorded in this CPU's scratch slot.
    let flow = if kind == EVENT_NEW_FLOW { crate::conntrack::scratch() } else { None };
    let Some(mut slot) = EVENTS.reserve::<Event>(0) else {
        count(EVENTS_LOST);
        return;
    };
    let e = slot.as_mut_ptr();
    // SAFETY: the reserved slot is ours until submitted; every field is written.
    unsafe {
        (*e).time_ns = now;
        (*e).src = h.src;
        (*e).dst = h.dst;
        (*e).ifindex = ifindex;
        (*e).sport = h.sport;
        (*e).dport = h.dport;
        (*e).proto = h.proto;
        (*e).hook = hook as u8;
        (*e).kind = kind;
        (*e).reason = kind_reason as u8;
        (*e).len = bytes;
        // Word by word, volatile: zeroes LLVM would merge into a `memset` call.
        let x = &raw mut (*e).xlate;
        match flow {
            // This CPU's scratch slot, filled by this packet's new flow.
            Some(f) => {
                for i in 0..4 {
                    core::ptr::write_volatile(&raw mut (*x)[i], (*f).flow.addr[i]);
                }
                core::ptr::write_volatile(&raw mut (*e).xlate_port, (*f).flow.port);
            }
            None => {
                for i in 0..4 {
                    core::ptr::write_volatile(&raw mut (*x)[i], 0);
                }
                core::ptr::write_volatile(&raw mut (*e).xlate_port, 0);
            }
        }
        core::ptr::write_volatile(&raw mut (*e)._pad, 0);
    }
    // No wakeup: `lb monitor` polls the ring, and waking a waiter from the packet path
    // cost ~5 µs per event here.
    slot.submit(BPF_RB_NO_WAKEUP as u64);
    count(EVENTS_SENT);
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(c) = STATS_EVENTS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { (*c).packets += 1 };
    }
}
