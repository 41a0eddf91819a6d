//! Host routes: the addresses the kernel routes straight out of one interface, /32 or /128,
//! with no gateway, as veth-per-pod CNIs install them for each pod. Read from
//! /proc/net/route (the main table) and /proc/net/ipv6_route (every table).
//!
//! The agent gives them to the pod source check with each interface (`lb_pod_ports`), so
//! that a pod's packets pass on the lookup the check makes anyway, not on a FIB lookup.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// `RTF_GATEWAY`: the route goes through a next hop, not straight to the address.
const RTF_GATEWAY: u32 = 0x2;
/// `RTF_REJECT`: an unreachable or prohibit route.
const RTF_REJECT: u32 = 0x200;
/// IPv6 `RTF_LOCAL`: one of this host's own addresses.
const RTF_LOCAL: u32 = 0x8000_0000;

/// Every host route of the node, as (interface name, address).
pub fn host_routes() -> Vec<(String, IpAddr)> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let v4 = parse_v4(&read("/proc/thread-self/net/route")).into_iter().map(|(i, a)| (i, IpAddr::V4(a)));
    let v6 = parse_v6(&read("/proc/thread-self/net/ipv6_route")).into_iter().map(|(i, a)| (i, IpAddr::V6(a)));
    v4.chain(v6).collect()
}

/// `/proc/net/route`: a header line, then `Iface Destination Gateway Flags RefCnt Use Metric
/// Mask ...`, addresses as the hex of the network-order word read as a native integer.
fn parse_v4(text: &str) -> Vec<(String, Ipv4Addr)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let hex = |i: usize| f.get(i).and_then(|s| u32::from_str_radix(s, 16).ok());
            let (dst, flags, mask) = (hex(1)?, hex(3)?, hex(7)?);
            let host = mask == u32::MAX && flags & (RTF_GATEWAY | RTF_REJECT) == 0;
            host.then(|| (f[0].to_string(), Ipv4Addr::from(dst.to_ne_bytes())))
        })
        .collect()
}

/// `/proc/net/ipv6_route`: `dst dst_len src src_len next_hop metric refcnt use flags iface`,
/// addresses as 32 hex digits, lengths and flags in hex.
fn parse_v6(text: &str) -> Vec<(String, Ipv6Addr)> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                return None;
            }
            let dst = u128::from_str_radix(f[0], 16).ok()?;
            let (len, flags) = (u32::from_str_radix(f[1], 16).ok()?, u32::from_str_radix(f[8], 16).ok()?);
            let host = len == 128 && flags & (RTF_GATEWAY | RTF_REJECT | RTF_LOCAL) == 0 && f[9] != "lo";
            host.then(|| (f[9].to_string(), Ipv6Addr::from(dst)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as this kernel writes them (`ip route add 198.18.1.2/32 dev lbp-web-1` and the
    /// like), with the routes that are not host routes around them.
    #[test]
    fn host_routes_are_direct_single_address_routes() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            lbp-web-1\t020112C6\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
            eth0\t030112C6\t010200C0\t0007\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
            eth0\t040112C6\t00000000\t0205\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        assert_eq!(parse_v4(v4), vec![("lbp-web-1".to_string(), Ipv4Addr::new(198, 18, 1, 2))]);
        let v6 = "20010002000000010000000000000002 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001 lbp-web-1\n\
            20010002000000010000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n\
            20010002000000010000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001 lbp-web-1\n\
            20010002000000010000000000000003 80 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n\
            00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n";
        assert_eq!(parse_v6(v6), vec![("lbp-web-1".to_string(), "2001:2:0:1::2".parse().unwrap())]);
    }
}
