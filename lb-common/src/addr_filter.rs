//! The address pre-filter (`lb_addr_filter`): a bitmap with a bit set for every address the
//! datapath may have to act on. Those are the frontend addresses (ClusterIPs, NodePort node
//! addresses, LoadBalancer and external IPs), the backend addresses, and the addresses of
//! every flow still in the table. A packet whose source and destination bits are both clear
//! is none of ours: it passes as `no_frontend` after two array reads, without the flow-table
//! and frontend lookups. A bit two addresses share by hash costs only those lookups.
//!
//! The agent sets an address's bit before writing an entry that names it, and clears it
//! only when no entry and no live flow has named it for a while (`addr_filter` in the agent).
//! One copy of the hash, used by the programs and by the agent.

use crate::abi::Addr;

/// Words of the bitmap: 2^20 bits, 128 KiB.
pub const WORDS: u32 = 1 << 14;

/// The word of the bitmap that holds `addr`'s bit, and that bit.
#[inline(always)]
pub fn slot(addr: &Addr) -> (u32, u64) {
    let x = addr[0] ^ addr[1].rotate_left(8) ^ addr[2].rotate_left(16) ^ addr[3].rotate_left(24);
    // Fibonacci hashing: the top 20 bits of the product.
    let bit = x.wrapping_mul(0x9e37_79b1) >> 12;
    (bit >> 6, 1u64 << (bit & 63))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::addr_from_ip;

    /// Neighbouring addresses (a pod CIDR, a service CIDR) spread over the bitmap: a /16 of
    /// IPv4 and 65 536 IPv6 addresses set few bits twice.
    #[test]
    fn neighbouring_addresses_spread() {
        for base in ["198.18.0.0", "2001:2::"] {
            let ip: std::net::IpAddr = base.parse().unwrap();
            let mut bits = std::collections::BTreeSet::new();
            for i in 0..65_536u32 {
                let a = match ip {
                    std::net::IpAddr::V4(v) => {
                        std::net::IpAddr::from(std::net::Ipv4Addr::from(u32::from(v) + i))
                    }
                    std::net::IpAddr::V6(v) => {
                        std::net::IpAddr::from(std::net::Ipv6Addr::from(u128::from(v) + i as u128))
                    }
                };
                let (w, m) = slot(&addr_from_ip(a));
                assert!(w < WORDS && m.count_ones() == 1);
                bits.insert((w, m.trailing_zeros()));
            }
            // 65 536 random picks of 2^20 bits leave about 63 500 distinct.
            assert!(bits.len() > 62_000, "{base}: {} distinct bits", bits.len());
        }
    }
}
