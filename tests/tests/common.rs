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

/// The addresses the L2 tests share: frontends, clients, the node, and three backends per
/// family.
pub const VIP4: &str = "198.19.0.10";
pub const VIP6: &str = "2001:db8:19::10";
pub const CLIENT4: &str = "198.18.100.1";
pub const CLIENT6: &str = "2001:db8:18::100";
pub const NODE4: &str = "198.18.0.1";
pub const BES4: [Be; 3] = [
    Be { id: 1, ip: "198.18.1.1", port: 9376 },
    Be { id: 2, ip: "198.18.1.2", port: 9376 },
    Be { id: 3, ip: "198.18.1.3", port: 9376 },
];
pub const BES6: [Be; 3] = [
    Be { id: 11, ip: "2001:db8:18::1:1", port: 9376 },
    Be { id: 12, ip: "2001:db8:18::1:2", port: 9376 },
    Be { id: 13, ip: "2001:db8:18::1:3", port: 9376 },
];
