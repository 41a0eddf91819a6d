//! L1: the datapath's header parser, `lb-ebpf/src/parse.rs`, the very source compiled for the
//! host, under proptest (no kernel, no root):
//!
//! * any bytes: the outcome and the headers read do not depend on what lies past the
//!   packet's end (a read past it would see one of two different tails);
//! * valid packets as the harness builds them (either family, TCP or UDP, any addresses,
//!   ports and flags, a VLAN tag or not, IPv4 options, any payload): their headers, found
//!   where they are;
//! * the same cut short at every length: refused as a cut-short Ethernet, IP or L4 header
//!   exactly while the headers are incomplete, with the ports when they are there.
//!
//! The packet sits two bytes past a 4-byte boundary, as the kernel aligns it (NET_IP_ALIGN),
//! so that its IP and L4 headers are aligned for the host's loads as they are in BPF.

#[path = "../../lb-ebpf/src/parse.rs"]
#[allow(dead_code, reason = "the datapath uses all of it; these tests only the parser")]
mod parse;

use std::net::IpAddr;

use lb_common::{
    abi::{PROTO_TCP, addr_from_ip},
    verdict::{Action, Reason},
};
use lb_tests::harness::Spec;
use parse::{FRAG_NONE, Headers, Outcome};
use proptest::prelude::*;

/// What `parse` says of `pkt`, with the 64 bytes after its end set to `tail`.
fn parse_after(pkt: &[u8], tail: u8) -> (Result<(), Outcome>, Headers) {
    // u32 words: 4-byte aligned; the packet starts at byte 2.
    let mut words = vec![0u32; (pkt.len() + 2 + 64).div_ceil(4)];
    // SAFETY: the byte view of our own buffer, within its length.
    let buf = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 4) };
    buf.fill(tail);
    buf[2..2 + pkt.len()].copy_from_slice(pkt);
    let data = buf.as_ptr() as usize + 2;
    let mut h = Headers::default();
    (parse::parse(data, data + pkt.len(), &mut h), h)
}

/// The outcome and every header field, with the bytes after the end set to `tail`.
fn parse_with_tail(pkt: &[u8], tail: u8) -> (Result<(), Outcome>, Vec<u64>) {
    let (out, h) = parse_after(pkt, tail);
    (out, fields(&h))
}

/// Every field of `h`, for comparison.
fn fields(h: &Headers) -> Vec<u64> {
    let mut v = vec![h.l3_off as u64, h.l4_off as u64, h.v6 as u64, h.proto as u64, h.frag as u64];
    v.extend([h.ip_id as u64, h.tcp_flags as u64, h.sport as u64, h.dport as u64]);
    v.extend(h.src.iter().chain(&h.dst).map(|w| *w as u64));
    v
}

fn parse_ok(pkt: &[u8]) -> (Result<(), Outcome>, Headers) {
    parse_after(pkt, 0)
}

fn address(v6: bool) -> impl Strategy<Value = IpAddr> {
    if v6 {
        // Not IPv4-mapped: those are never ours (a case of their own below).
        any::<[u8; 16]>()
            .prop_filter("not v4-mapped", |b| b[..12] != [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff])
            .prop_map(IpAddr::from)
            .boxed()
    } else {
        any::<[u8; 4]>().prop_map(IpAddr::from).boxed()
    }
}

/// A valid TCP or UDP packet of either family, with random fields.
fn spec() -> impl Strategy<Value = Spec> {
    any::<bool>().prop_flat_map(|v6| {
        (
            address(v6),
            address(v6),
            any::<u16>(),
            any::<u16>(),
            any::<bool>(),
            any::<u8>(),
            proptest::option::of(0u16..4096),
            0usize..3,
            proptest::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(move |(src, dst, sport, dport, tcp, flags, vlan, options, payload)| {
                let (s, d) = (src.to_string(), dst.to_string());
                let mut spec = if tcp {
                    Spec::tcp(&s, sport, &d, dport).flags(flags)
                } else {
                    Spec::udp(&s, sport, &d, dport)
                };
                spec.vlan = vlan;
                if !v6 {
                    spec.ip_options = vec![1; 4 * options];
                }
                spec.payload = payload;
                spec
            })
    })
}

/// Where the L4 header of `spec`'s packet starts, and its length.
fn l4_of(spec: &Spec) -> (usize, usize) {
    let l3 = if spec.vlan.is_some() { 18 } else { 14 };
    let l4 = l3 + if spec.src.is_ipv6() { 40 } else { 20 + spec.ip_options.len() };
    (l4, if spec.proto == PROTO_TCP { 20 } else { 8 })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_parse_the_same_whatever_follows_them(bytes in proptest::collection::vec(any::<u8>(), 0..120), ethertype in 0usize..4) {
        let mut pkt = bytes;
        // Mostly IP ethertypes, so the parse goes deep.
        if pkt.len() >= 14 && ethertype < 3 {
            let et: [u8; 2] = [[0x08, 0x00], [0x86, 0xdd], [0x81, 0x00]][ethertype];
            pkt[12..14].copy_from_slice(&et);
            if ethertype == 2 && pkt.len() >= 18 {
                pkt[16..18].copy_from_slice(&[0x08, 0x00]);
            }
        }
        let (a, b) = (parse_with_tail(&pkt, 0x00), parse_with_tail(&pkt, 0xff));
        prop_assert_eq!(a, b);
    }

    #[test]
    fn valid_packets_parse_to_their_headers(spec in spec()) {
        let pkt = spec.build();
        let (out, h) = parse_ok(&pkt);
        prop_assert_eq!(out, Ok(()));
        let (l4, _) = l4_of(&spec);
        prop_assert_eq!(h.l3_off, if spec.vlan.is_some() { 18 } else { 14 });
        prop_assert_eq!(h.l4_off, l4);
        prop_assert_eq!(h.v6, spec.src.is_ipv6());
        prop_assert_eq!(h.proto, spec.proto);
        prop_assert_eq!(h.frag, FRAG_NONE);
        prop_assert_eq!((h.src, h.dst), (addr_from_ip(spec.src), addr_from_ip(spec.dst)));
        prop_assert_eq!((u16::from_be(h.sport), u16::from_be(h.dport)), (spec.sport, spec.dport));
        prop_assert_eq!(h.tcp_flags, if spec.proto == PROTO_TCP { spec.tcp_flags } else { 0 });
    }

    #[test]
    fn cut_short_packets_are_refused_while_a_header_is_incomplete(spec in spec()) {
        let pkt = spec.build();
        let (l4, l4_len) = l4_of(&spec);
        let l3 = if spec.vlan.is_some() { 18 } else { 14 };
        for n in 0..pkt.len() {
            let (out, h) = parse_ok(&pkt[..n]);
            let want = if n < l3 {
                Err((Action::Drop, Reason::TruncatedEth))
            } else if n < l4 {
                Err((Action::Drop, Reason::MalformedIp))
            } else if n < l4 + l4_len {
                Err((Action::Drop, Reason::TruncatedL4))
            } else {
                Ok(())
            };
            // (Between l3 + 20 and l4: the IPv4 header is whole, its options are not.)
            prop_assert_eq!(out, want, "cut at {} of {}", n, pkt.len());
            if n >= l4 + 4 {
                prop_assert_eq!((u16::from_be(h.sport), u16::from_be(h.dport)), (spec.sport, spec.dport));
            }
        }
    }

    #[test]
    fn ipv4_mapped_ipv6_addresses_are_never_ours(v4 in any::<[u8; 4]>(), other in address(true), mapped_src in any::<bool>(), tcp in any::<bool>()) {
        let mapped = std::net::Ipv4Addr::from(v4).to_ipv6_mapped().to_string();
        let other = other.to_string();
        let (s, d) = if mapped_src { (&mapped, &other) } else { (&other, &mapped) };
        let spec = if tcp { Spec::tcp(s, 1, d, 2) } else { Spec::udp(s, 1, d, 2) };
        prop_assert_eq!(parse_ok(&spec.build()).0, Err((Action::Pass, Reason::V4MappedV6)));
    }
}

/// Not TCP or UDP: passed, by the reason that says which.
#[test]
fn other_protocols_pass_by_their_reason() {
    for (proto, reason) in [
        (1, Reason::NotTcpUdp),
        (58, Reason::NotTcpUdp),
        (0, Reason::Ipv6ExtHeader),
        (44, Reason::Ipv6ExtHeader),
    ] {
        let mut spec = Spec::udp("2001:2::1", 1, "2001:2::2", 2);
        spec.proto = proto;
        assert_eq!(
            parse_ok(&spec.build_with_l4(&[0; 8])).0,
            Err((Action::Pass, reason)),
            "IPv6 next header {proto}"
        );
    }
    let mut spec = Spec::udp("198.18.0.1", 1, "198.18.0.2", 2);
    spec.proto = 1;
    assert_eq!(parse_ok(&spec.build_with_l4(&[0; 8])).0, Err((Action::Pass, Reason::NotTcpUdp)));
    let arp = [&[0xff; 12][..], &[0x08, 0x06], &[0; 28]].concat();
    assert_eq!(parse_ok(&arp).0, Err((Action::Pass, Reason::NotIp)));
}
