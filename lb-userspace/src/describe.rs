//! How the CLI names what it shows: addresses (IPv6 bracketed, ready for `:port`) and the
//! flag bits of services and backends. Shared by `lb explain` and the list commands.

use lb_common::abi::*;

pub fn fmt_ip(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    }
}

/// The names of the bits of `f` set, comma-separated.
fn flag_names(f: u32, names: &[(u32, &str)]) -> String {
    names.iter().filter(|(bit, _)| f & bit != 0).map(|(_, n)| *n).collect::<Vec<_>>().join(",")
}

pub fn service_flags(f: u32) -> String {
    flag_names(
        f,
        &[
            (SVC_F_AFFINITY, "affinity"),
            (SVC_F_DROP_NO_BACKEND, "drop-no-backend"),
            (SVC_F_EXTERNAL, "external"),
            (SVC_F_SOURCE_RANGES, "source-ranges"),
        ],
    )
}

pub fn backend_flags(f: u8) -> String {
    flag_names(f.into(), &[(BE_F_TERMINATING.into(), "terminating"), (BE_F_LOCAL.into(), "local")])
}
