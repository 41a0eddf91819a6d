#![allow(dead_code, unused_macros, reason = "each test file uses a subset")]
pub use lb_tests::harness::*;

/// Returns from a privileged test that cannot run here (after `privileged` said why, or
/// panicked under `LB_REQUIRE_PRIVILEGED=1`).
macro_rules! require_root {
    () => {
        if !privileged() {
            return;
        }
    };
}

/// Packets counted for verdict reason `r`, summed over CPUs.
pub fn reason(l: &Loaded, r: lb_common::verdict::Reason) -> u64 {
    l.dp.reason_counter(r).unwrap().packets
}
