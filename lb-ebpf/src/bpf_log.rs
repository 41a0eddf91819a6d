//! Debug messages through `aya-log`, for `lb agent --bpf-log debug`: every drop and refusal
//! with its kind, reason, interface and 5-tuple, read by the agent into its own log (target
//! `bpf`).
//!
//! Off by default, and then free: the level is a load-time constant (`AYA_LOG_LEVEL` in
//! `.rodata`, set by the loader), so the verifier drops the code behind the check as dead
//! and the JIT never sees it. The check sits in `events::emit`, a subprogram the drop and
//! reject paths already call, so the packet paths' own frames do not grow (the TC
//! program's stack is spent to the byte).
//!
//! Cheap for the verifier when on: the message is a global function, verified once on its
//! own instead of once per path that reaches it.

use aya_log_ebpf::{
    debug,
    macro_support::{Level, level_enabled},
};
use lb_common::abi::Addr;

use crate::parse::Headers;

/// Writes the message for a drop or refusal of packet `h` on interface `ifindex`:
/// `kind_reason` is the event's kind (`EVENT_DROP`, `EVENT_REJECT`) over its reason.
#[inline(always)]
pub fn verdict(h: &Headers, kind_reason: u32, ifindex: u32) {
    if level_enabled(Level::Debug) {
        lb_log_message(h, kind_reason, ifindex);
    }
}

/// A global function: verified once, apart from its callers.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_log_message(h: *const Headers, kind_reason: u32, ifindex: u32) -> u32 {
    // Verified alone, the function cannot know its callers pass a valid pointer.
    if h.is_null() {
        return 0;
    }
    // SAFETY: not null; the callers pass their packet's headers.
    let h = unsafe { &*h };
    let (kind, reason) = (kind_reason >> 8, kind_reason & 0xff);
    // SAFETY: same size, any bit pattern is valid; the words hold the packet's bytes.
    let (src, dst) = unsafe {
        (core::mem::transmute::<Addr, [u8; 16]>(h.src), core::mem::transmute::<Addr, [u8; 16]>(h.dst))
    };
    let (sport, dport) = (u16::from_be(h.sport), u16::from_be(h.dport));
    let ctx = ();
    debug!(
        &ctx,
        target: "bpf",
        "datapath event {} reason {} if {} proto {} [{:i}]:{} -> [{:i}]:{}",
        kind, reason, ifindex, h.proto, src, sport, dst, dport
    );
    0
}
