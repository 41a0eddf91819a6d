//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! All values are raw memory words exactly as read from the packet (no byte swapping): the
//! one's-complement sum is byte-order independent, so reading and writing in the same order
//! gives the right bytes. The XDP path calls these directly; the host tests prove them equal
//! to a full recompute.

/// Folds a 32-bit one's-complement accumulator to 16 bits (not inverted).
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds the two 16-bit halves of a raw 32-bit word to an accumulator.
#[inline(always)]
pub const fn add32(acc: u32, word: u32) -> u32 {
    acc + (word & 0xffff) + (word >> 16)
}

/// RFC 1624 eqn. 3 for one 16-bit field: `HC' = ~(~HC + ~m + m')`.
#[inline(always)]
pub const fn update16(csum: u16, old: u16, new: u16) -> u16 {
    !fold(!csum as u32 + !old as u32 + new as u32)
}

/// RFC 1624 for a 32-bit field (an IPv4 address).
#[inline(always)]
pub const fn update32(csum: u16, old: u32, new: u32) -> u16 {
    let acc = !csum as u32;
    let acc = add32(acc, !old);
    let acc = add32(acc, new);
    !fold(acc)
}

/// RFC 1624 for an address in the 16-byte form. For IPv4-mapped addresses only the last word
/// changes (the mapped prefix is the same on both sides), so this is right for both families.
#[inline(always)]
pub const fn update_addr(csum: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    let mut acc = !csum as u32;
    let mut i = 0;
    while i < 4 {
        acc = add32(acc, !old[i]);
        acc = add32(acc, new[i]);
        i += 1;
    }
    !fold(acc)
}

/// Rewrites a TCP/UDP checksum for an address change (pseudo-header) and a port change.
///
/// `udp`: an IPv4 UDP checksum of 0 means "none" and stays 0; a computed 0 is sent as
/// 0xffff (RFC 768), for both families.
#[inline(always)]
pub const fn l4_rewrite(
    csum: u16,
    old_addr: &[u32; 4],
    new_addr: &[u32; 4],
    old_port: u16,
    new_port: u16,
    udp: bool,
) -> u16 {
    if udp && csum == 0 {
        return 0;
    }
    let c = update_addr(csum, old_addr, new_addr);
    let c = update16(c, old_port, new_port);
    if udp && c == 0 { 0xffff } else { c }
}

/// Full one's-complement sum of a byte slice (odd length padded with zero), not folded.
#[cfg(any(feature = "user", test))]
pub fn sum_bytes(data: &[u8]) -> u32 {
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_ne_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += u16::from_ne_bytes([*last, 0]) as u64;
    }
    while acc >> 32 != 0 {
        acc = (acc & 0xffff_ffff) + (acc >> 32);
    }
    let acc = acc as u32;
    (acc & 0xffff) + (acc >> 16)
}

/// Full Internet checksum of a byte slice, as stored in a header (raw memory order).
#[cfg(any(feature = "user", test))]
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum_bytes(data))
}

/// TCP/UDP checksum with its pseudo-header. `src`/`dst` are 4 or 16 bytes; the checksum
/// field inside `segment` must be zero. UDP's 0 result is returned as 0xffff.
#[cfg(any(feature = "user", test))]
pub fn l4_checksum(src: &[u8], dst: &[u8], proto: u8, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    if src.len() == 4 {
        pseudo.extend_from_slice(&[0, proto]);
        pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    } else {
        pseudo.extend_from_slice(&(segment.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, proto]);
    }
    let acc = sum_bytes(&pseudo) as u64 + sum_bytes(segment) as u64;
    let c = !fold((acc as u32).wrapping_add((acc >> 32) as u32));
    if proto == crate::abi::PROTO_UDP && c == 0 { 0xffff } else { c }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{PROTO_TCP, PROTO_UDP};
    use proptest::prelude::*;

    fn word(b: &[u8]) -> u32 {
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    }
    fn addr16(b: &[u8]) -> [u32; 4] {
        if b.len() == 4 {
            crate::abi::v4_mapped(word(b))
        } else {
            [word(&b[0..]), word(&b[4..]), word(&b[8..]), word(&b[12..])]
        }
    }

    /// Builds an IPv4 header with `opts` option words and a valid checksum.
    fn ipv4_header(src: [u8; 4], dst: [u8; 4], opts: &[u8], total: u16, proto: u8) -> Vec<u8> {
        let ihl = 5 + opts.len() / 4;
        let mut h = vec![0x40 | ihl as u8, 0];
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(opts);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_ne_bytes());
        h
    }

    /// A segment (TCP 20-byte or UDP 8-byte header + payload) with a valid checksum.
    fn segment(src: &[u8], dst: &[u8], proto: u8, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&sport.to_be_bytes());
        s.extend_from_slice(&dport.to_be_bytes());
        if proto == PROTO_TCP {
            s.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        } else {
            let len = (8 + payload.len()) as u16;
            s.extend_from_slice(&len.to_be_bytes());
            s.extend_from_slice(&[0, 0]);
        }
        s.extend_from_slice(payload);
        let off = if proto == PROTO_TCP { 16 } else { 6 };
        let c = l4_checksum(src, dst, proto, &s);
        s[off..off + 2].copy_from_slice(&c.to_ne_bytes());
        s
    }

    fn csum_at(b: &[u8], off: usize) -> u16 {
        u16::from_ne_bytes([b[off], b[off + 1]])
    }

    proptest! {
        /// IPv4 (with 0..=10 option words): rewriting the destination address and port
        /// incrementally gives exactly the full recompute, for the IP and the L4 checksum.
        #[test]
        fn ipv4_dnat_matches_full_recompute(
            src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), new_dst in any::<[u8; 4]>(),
            sport in any::<u16>(), dport in any::<u16>(), new_dport in any::<u16>(),
            nopts in 0usize..=10, optbyte in any::<u8>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            tcp in any::<bool>(),
        ) {
            let proto = if tcp { PROTO_TCP } else { PROTO_UDP };
            let opts = vec![optbyte; nopts * 4];
            let seg = segment(&src, &dst, proto, sport, dport, &payload);
            let ip = ipv4_header(src, dst, &opts, (20 + opts.len() + seg.len()) as u16, proto);
            let coff = if tcp { 16 } else { 6 };

            let new_ip_csum = update32(csum_at(&ip, 10), word(&dst), word(&new_dst));
            let new_l4 = l4_rewrite(csum_at(&seg, coff), &addr16(&dst), &addr16(&new_dst),
                dport.to_be(), new_dport.to_be(), !tcp);

            let want_ip = ipv4_header(src, new_dst, &opts, (20 + opts.len() + seg.len()) as u16, proto);
            let want_seg = segment(&src, &new_dst, proto, sport, new_dport, &payload);
            prop_assert_eq!(new_ip_csum, csum_at(&want_ip, 10));
            prop_assert_eq!(new_l4, csum_at(&want_seg, coff));
        }

        /// IPv6: pseudo-header address and port rewrite, source or destination side.
        #[test]
        fn ipv6_nat_matches_full_recompute(
            src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), new_addr in any::<[u8; 16]>(),
            sport in any::<u16>(), dport in any::<u16>(), new_port in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            tcp in any::<bool>(), rewrite_src in any::<bool>(),
        ) {
            let proto = if tcp { PROTO_TCP } else { PROTO_UDP };
            let coff = if tcp { 16 } else { 6 };
            let seg = segment(&src, &dst, proto, sport, dport, &payload);
            let (old_a, old_p) = if rewrite_src { (src, sport) } else { (dst, dport) };
            let got = l4_rewrite(csum_at(&seg, coff), &addr16(&old_a), &addr16(&new_addr),
                old_p.to_be(), new_port.to_be(), !tcp);
            let want = if rewrite_src {
                segment(&new_addr, &dst, proto, new_port, dport, &payload)
            } else {
                segment(&src, &new_addr, proto, sport, new_port, &payload)
            };
            prop_assert_eq!(got, csum_at(&want, coff));
        }

        /// IPv4 UDP without checksum: stays without checksum.
        #[test]
        fn udp_zero_checksum_stays_zero(
            old in any::<[u8; 4]>(), new in any::<[u8; 4]>(), p in any::<u16>(), q in any::<u16>(),
        ) {
            prop_assert_eq!(l4_rewrite(0, &addr16(&old), &addr16(&new), p, q, true), 0);
        }
    }

    #[test]
    fn udp_result_zero_is_sent_as_ffff() {
        // Find a rewrite whose true checksum is 0 (0xffff on the wire) and check it.
        let src = [198, 18, 0, 1];
        let port = 80u16;
        for hi in 0..=255u8 {
            for last in 0..=255u8 {
                let dst = [198, 19, hi, last];
                let full = segment(&src, &dst, PROTO_UDP, 1000, port, b"x");
                if csum_at(&full, 6) == 0xffff {
                    let orig = segment(&src, &[198, 19, 9, 9], PROTO_UDP, 1000, 53, b"x");
                    let got = l4_rewrite(
                        csum_at(&orig, 6),
                        &addr16(&[198, 19, 9, 9]),
                        &addr16(&dst),
                        53u16.to_be(),
                        port.to_be(),
                        true,
                    );
                    assert_eq!(got, 0xffff);
                    return;
                }
            }
        }
        panic!("no zero-checksum case found");
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3 example bytes: sum 0xddf2 in big-endian words.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(u16::from_be_bytes(fold(sum_bytes(&data)).to_ne_bytes()), 0xddf2);
    }
}
