//! Per-CPU packet/byte counters: no atomics needed, the agent sums the CPUs.

use aya_ebpf::maps::PerCpuArray;
use lb_common::{abi::Counter, verdict::Reason};

use crate::maps::{STATS_BACKEND, STATS_REASON, STATS_SERVICE};

#[inline(always)]
fn bump(map: &PerCpuArray<Counter>, index: u32, bytes: u32) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

#[inline(always)]
pub fn reason(r: Reason, bytes: u32) {
    bump(&STATS_REASON, r as u32, bytes);
}

#[inline(always)]
pub fn service(id: u32, bytes: u32) {
    bump(&STATS_SERVICE, id, bytes);
}

#[inline(always)]
pub fn backend(id: u32, bytes: u32) {
    bump(&STATS_BACKEND, id, bytes);
}
