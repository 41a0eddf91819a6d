//! L2: BPF_PROG_TEST_RUN fixtures. The real object is loaded through the agent's loader and
//! programmed through the agent's `Dataplane`; every case compares the verdict, the output
//! bytes (checksums recomputed independently) and the counters. Expected backends are
//! predicted on the host with lb-common.

#[macro_use]
mod common;

use common::*;
use lb_common::{abi::*, verdict::Reason};
use lb_userspace::dataplane::Dataplane;

fn backend_ip(bes: &[Be], id: u32) -> std::net::IpAddr {
    ip(bes.iter().find(|b| b.id == id).expect("predicted id is one of ours").ip)
}

/// Runs `spec` to a VIP, checks it is DNATed to the predicted backend with everything else
/// unchanged.
fn expect_dnat(l: &Loaded, svc: &Programmed, bes: &[Be], spec: &Spec, tc: bool) -> u32 {
    let input = spec.build();
    let (rc, out) = if tc { l.run_tc(&input) } else { l.run_xdp(&input) };
    assert_eq!(rc, if tc { TC_ACT_UNSPEC } else { XDP_PASS });
    let want_id = svc.predict(&spec.key());
    let be = bes.iter().find(|b| b.id == want_id).expect("predicted id is one of ours");
    let seen = inspect(&out);
    assert_eq!((seen.dst, seen.dport), (ip(be.ip), be.port), "predicted backend");
    assert_eq!((seen.src, seen.sport), (spec.src, spec.sport), "source untouched");
    assert_eq!(out.len(), input.len());
    // Only the destination address, port and checksums differ.
    let want = Spec { dst: seen.dst, dport: be.port, ..spec.clone() }.build();
    assert_eq!(out, want, "byte-exact against a packet built for the backend");
    want_id
}

#[test]
fn tcp_syn_v4_goes_to_predicted_backend() {
    require_root!();
    let mut l = Loaded::new();
    let svc = program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    for port in 40000..40016 {
        expect_dnat(&l, &svc, &BES4, &Spec::tcp(CLIENT4, port, VIP4, 80), false);
    }
    assert_eq!(reason(&l, Reason::NewFlow), 16);
    assert_eq!(l.dp.service_counter(1).unwrap().packets, 16);
}

#[test]
fn udp_v4_goes_to_predicted_backend() {
    require_root!();
    let mut l = Loaded::new();
    let svc = program(&mut l.dp, 1, (VIP4, 53, PROTO_UDP), &BES4, 0, 0);
    let mut seen = std::collections::BTreeSet::new();
    for port in 1000..1064 {
        seen.insert(expect_dnat(&l, &svc, &BES4, &Spec::udp(CLIENT4, port, VIP4, 53), false));
    }
    assert_eq!(seen.len(), 3, "64 flows spread over all three backends");
}

#[test]
fn tcp_syn_v6_goes_to_predicted_backend() {
    require_root!();
    let mut l = Loaded::new();
    let svc = program(&mut l.dp, 2, (VIP6, 443, PROTO_TCP), &BES6, 0, 0);
    for port in 50000..50008 {
        expect_dnat(&l, &svc, &BES6, &Spec::tcp(CLIENT6, port, VIP6, 443), false);
    }
}

#[test]
fn udp_v6_goes_to_predicted_backend() {
    require_root!();
    let mut l = Loaded::new();
    let svc = program(&mut l.dp, 2, (VIP6, 53, PROTO_UDP), &BES6, 0, 0);
    for port in 2000..2008 {
        expect_dnat(&l, &svc, &BES6, &Spec::udp(CLIENT6, port, VIP6, 53), false);
    }
}

#[test]
fn tc_translates_tcp_v4_and_udp_v6() {
    require_root!();
    let mut l = Loaded::new();
    let s4 = program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    let s6 = program(&mut l.dp, 2, (VIP6, 53, PROTO_UDP), &BES6, 1000, 0);
    expect_dnat(&l, &s4, &BES4, &Spec::tcp(CLIENT4, 40000, VIP4, 80), true);
    expect_dnat(&l, &s6, &BES6, &Spec::udp(CLIENT6, 40000, VIP6, 53), true);
}

#[test]
fn second_packet_hits_conntrack_after_table_change() {
    require_root!();
    let mut l = Loaded::new();
    let svc = program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    let syn = Spec::tcp(CLIENT4, 41000, VIP4, 80);
    let first = expect_dnat(&l, &svc, &BES4, &syn, false);
    // Rebuild the table so that every slot points at another backend.
    let other = BES4.iter().find(|b| b.id != first).unwrap();
    let table = vec![other.id; svc.value.maglev_size as usize];
    l.dp.write_maglev(svc.value.maglev_offset, &table).unwrap();
    let ack = syn.clone().flags(TCP_ACK).payload(b"GET / HTTP/1.1\r\n\r\n");
    let (rc, out) = l.run_xdp(&ack.build());
    assert_eq!(rc, XDP_PASS);
    assert_eq!(inspect(&out).dst, backend_ip(&BES4, first), "flow keeps its backend");
    assert_eq!(reason(&l, Reason::FlowHit), 1);
    // A new flow follows the new table.
    let (_, out) = l.run_xdp(&Spec::tcp(CLIENT4, 41001, VIP4, 80).build());
    assert_eq!(inspect(&out).dst, ip(other.ip));
}

#[test]
fn reply_from_backend_leaves_with_vip_source_v4_tcp() {
    require_root!();
    let mut l = Loaded::new();
    let svc = program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    let syn = Spec::tcp(CLIENT4, 42000, VIP4, 80);
    let id = expect_dnat(&l, &svc, &BES4, &syn, false);
    let be = BES4.iter().find(|b| b.id == id).unwrap();
    let synack = Spec::tcp(be.ip, 9376, CLIENT4, 42000).flags(TCP_SYN | TCP_ACK);
    for tc in [false, true] {
        let input = synack.build();
        let (rc, out) = if tc { l.run_tc(&input) } else { l.run_xdp(&input) };
        assert_eq!(rc, if tc { TC_ACT_UNSPEC } else { XDP_PASS });
        let want = Spec { src: ip(VIP4), sport: 80, ..synack.clone() }.build();
        assert_eq!(out, want, "reply rewritten to VIP:80, checksums exact");
    }
    assert_eq!(reason(&l, Reason::Reply), 2);
}

#[test]
fn reply_from_backend_leaves_with_vip_source_v6_udp() {
    require_root!();
    let mut l = Loaded::new();
    let svc = program(&mut l.dp, 2, (VIP6, 53, PROTO_UDP), &BES6, 0, 0);
    let q = Spec::udp(CLIENT6, 3333, VIP6, 53);
    let id = expect_dnat(&l, &svc, &BES6, &q, false);
    let be = BES6.iter().find(|b| b.id == id).unwrap();
    let answer = Spec::udp(be.ip, 9376, CLIENT6, 3333).payload(b"answer");
    let (rc, out) = l.run_xdp(&answer.build());
    assert_eq!(rc, XDP_PASS);
    assert_eq!(out, Spec { src: ip(VIP6), sport: 53, ..answer.clone() }.build());
}

/// `lb_tc_egress`: the node's own stack answers for a backend at one of the node's addresses
/// (a hostNetwork pod), and that answer passes no ingress hook. It leaves with the
/// frontend's address, byte-exact, TCP and IPv6 UDP, counted as a reply. A packet of no flow
/// of ours and a flow's forward direction pass untouched and uncounted.
#[test]
fn egress_restores_the_frontend_on_answers_of_the_nodes_own_stack() {
    require_root!();
    let mut l = Loaded::new();
    let s4 = program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    let s6 = program(&mut l.dp, 2, (VIP6, 53, PROTO_UDP), &BES6, 1000, 0);
    let syn = Spec::tcp(CLIENT4, 42000, VIP4, 80);
    let q = Spec::udp(CLIENT6, 3333, VIP6, 53);
    let id4 = expect_dnat(&l, &s4, &BES4, &syn, true);
    let id6 = expect_dnat(&l, &s6, &BES6, &q, true);
    let be = |bes: &[Be], id: u32| bes.iter().find(|b| b.id == id).unwrap().ip;
    let synack = Spec::tcp(be(&BES4, id4), 9376, CLIENT4, 42000).flags(TCP_SYN | TCP_ACK);
    let answer = Spec::udp(be(&BES6, id6), 9376, CLIENT6, 3333).payload(b"answer");
    for (reply, (vip, port)) in [(&synack, (VIP4, 80)), (&answer, (VIP6, 53))] {
        let (rc, out) = l.run_egress(&reply.build());
        assert_eq!(rc, TC_ACT_UNSPEC);
        assert_eq!(out, Spec { src: ip(vip), sport: port, ..reply.clone() }.build(), "{reply:?}");
    }
    assert_eq!(reason(&l, Reason::Reply), 2);
    // The node's port unreachable about the UDP query as it arrived (to the backend): about
    // the query as the client sent it (the socket matches the quote), as `related` does at
    // every hook.
    let arrived = Spec { dst: answer.src, dport: 9376, ..q.clone() }.build();
    let err = icmp_error(&answer.src.to_string(), CLIENT6, (1, 4), 0, &arrived);
    let (rc, out) = l.run_egress(&err);
    assert_eq!(rc, TC_ACT_UNSPEC);
    let seen = inspect(&out);
    assert_eq!((seen.src, seen.dst, seen.icmp), (answer.src, ip(CLIENT6), Some((1, 4))));
    assert_eq!(&seen.l4[8..], &q.build()[14..14 + 48], "the quote as the client sent it");
    assert_eq!(reason(&l, Reason::IcmpRelated), 1);
    let untouched = [Spec { dport: 42001, ..synack.clone() }.build(), syn.flags(TCP_ACK).build()];
    for pkt in untouched {
        assert_eq!(l.run_egress(&pkt), (TC_ACT_UNSPEC, pkt.clone()));
    }
    assert_eq!(reason(&l, Reason::Reply), 2);
    assert_eq!(reason(&l, Reason::NoFrontend), 0, "what is not ours is not counted");
}

#[test]
fn arp_passes_untouched() {
    require_root!();
    let l = Loaded::new();
    let mut arp = Vec::new();
    arp.extend_from_slice(&[0xff; 6]);
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[198, 18, 100, 1, 0, 0, 0, 0, 0, 0, 198, 19, 0, 10]);
    for tc in [false, true] {
        let (rc, out) = if tc { l.run_tc(&arp) } else { l.run_xdp(&arp) };
        assert_eq!(rc, if tc { TC_ACT_UNSPEC } else { XDP_PASS });
        assert_eq!(out, arp);
    }
    assert_eq!(reason(&l, Reason::NotIp), 2);
}

#[test]
fn non_frontend_ip_passes_untouched() {
    require_root!();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    for p in [
        Spec::tcp(CLIENT4, 1, "198.19.0.11", 80).build(), // other IP
        Spec::tcp(CLIENT4, 1, VIP4, 81).build(),          // other port (no frontend entry)
        Spec::udp(CLIENT4, 1, VIP4, 80).build(),          // other protocol
        Spec::tcp(CLIENT6, 1, VIP6, 80).build(),
    ] {
        let (rc, out) = l.run_xdp(&p);
        assert_eq!(rc, XDP_PASS);
        assert_eq!(out, p);
    }
    assert_eq!(reason(&l, Reason::NoFrontend), 4);
}

#[test]
fn icmp_passes_untouched() {
    require_root!();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    let mut echo = Spec::tcp(CLIENT4, 0, VIP4, 0);
    echo.proto = 1;
    let p = echo.build_with_l4(&[8, 0, 0xf7, 0xff, 0, 0, 0, 0]);
    let (rc, out) = l.run_xdp(&p);
    assert_eq!((rc, out), (XDP_PASS, p));
    assert_eq!(reason(&l, Reason::NotTcpUdp), 1);
}

#[test]
fn malformed_packets_pass_untouched_unless_for_a_frontend() {
    require_root!();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    // VIP4 is a ClusterIP: every port of it is ours.
    l.dp.set_service(&ServiceKey::new(ip(VIP4), 0, 0), &ServiceValue::default()).unwrap();
    let full = Spec::tcp(CLIENT4, 1234, VIP4, 80).build();
    let elsewhere = Spec::tcp(CLIENT4, 1234, "198.19.0.99", 80).build();
    let bad_ihl = |p: &[u8]| {
        let mut p = p.to_vec();
        p[14] = 0x44;
        p
    };
    // Ethernet cut short: a VLAN tag without the inner ethertype. (BPF_PROG_TEST_RUN refuses
    // frames under 14 bytes, so the kernel never hands us a shorter one either.)
    let mut vlan = full[..14].to_vec();
    vlan[12..14].copy_from_slice(&[0x81, 0x00]);
    assert_eq!(l.run_xdp(&vlan).0, XDP_DROP);
    // For a frontend: dropped. TCP cut short (ports present, checksum missing), and an IHL
    // below 5 to the ClusterIP.
    assert_eq!(l.run_xdp(&full[..14 + 20 + 10]).0, XDP_DROP);
    assert_eq!(l.run_xdp(&bad_ihl(&full)).0, XDP_DROP);
    assert_eq!(reason(&l, Reason::TruncatedL4), 1);
    assert_eq!(reason(&l, Reason::MalformedIp), 1);
    // Not for a frontend: passed byte for byte, at both hooks. The same two, to another
    // address; a header cut before its destination; and an IPv6 header cut short.
    let v6 = Spec::udp(CLIENT6, 1, VIP6, 53).build();
    let cases: [(Vec<u8>, bool); 5] = [
        (elsewhere[..14 + 20 + 10].to_vec(), true),
        (bad_ihl(&elsewhere), true),
        (full[..14 + 12].to_vec(), false),
        (v6[..14 + 30].to_vec(), false),
        // A port of VIP4 that no frontend serves is still the ClusterIP's: see above. A TCP
        // header cut before its ports, to an address that is no ClusterIP:
        (elsewhere[..14 + 20 + 2].to_vec(), true),
    ];
    let mut passed = 0;
    for (p, at_tc) in &cases {
        assert_eq!(l.run_xdp(p), (XDP_PASS, p.clone()), "{p:02x?}");
        passed += 1;
        // (At TC the kernel refuses frames whose IP header is cut short before the program.)
        if *at_tc {
            assert_eq!(l.run_tc(p), (TC_ACT_UNSPEC, p.clone()));
            passed += 1;
        }
    }
    assert_eq!(reason(&l, Reason::MalformedPassed), passed);
    assert_eq!(reason(&l, Reason::TruncatedEth), 1);
    assert_eq!((reason(&l, Reason::TruncatedL4), reason(&l, Reason::MalformedIp)), (1, 1));
}

#[test]
fn an_ipv4_mapped_ipv6_packet_never_matches_ipv4_state() {
    require_root!();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    l.dp.set_service(&ServiceKey::new(ip(VIP4), 0, 0), &ServiceValue::default()).unwrap();
    let to_vip = Spec::tcp(CLIENT6, 40_000, "::ffff:198.19.0.10", 80).build();
    let from_mapped = Spec::tcp("::ffff:198.18.100.1", 40_000, VIP6, 80).build();
    for p in [&to_vip, &from_mapped] {
        assert_eq!(l.run_xdp(p), (XDP_PASS, p.clone()));
        assert_eq!(l.run_tc(p), (TC_ACT_UNSPEC, p.clone()));
    }
    assert_eq!(reason(&l, Reason::V4MappedV6), 4);
    assert_eq!(reason(&l, Reason::NewFlow), 0);
}

/// Pins this thread to CPU 0: the answer budget is per CPU.
fn on_cpu_zero() {
    // SAFETY: a zeroed cpu_set_t with bit 0 set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0);
    }
}

#[test]
fn answers_are_rate_limited_per_cpu() {
    require_root!();
    on_cpu_zero();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &[], 0, 0);
    program(&mut l.dp, 2, (VIP4, 53, PROTO_UDP), &[], 0, 0);
    // One answer a second, bursts of three.
    let (cost, cap) = (1_000_000_000, 3_000_000_000);
    l.dp.set_config(&Config { answer_cost_ns: cost, answer_cap_ns: cap, ..Config::default() }).unwrap();
    let mut answered = 0;
    for i in 0..10u16 {
        let syn = Spec::tcp(CLIENT4, 40_000 + i, VIP4, 80).build();
        let dgram = Spec::udp(CLIENT4, 40_000 + i, VIP4, 53).build();
        for p in [syn, dgram] {
            match l.run_xdp(&p).0 {
                XDP_TX => answered += 1,
                rc => assert_eq!(rc, XDP_DROP),
            }
        }
    }
    assert_eq!(answered, 3, "the burst, then nothing within the same second");
    assert_eq!(reason(&l, Reason::AnswerRateLimited), 17);
    assert_eq!(reason(&l, Reason::RejectNoBackend), 3);
    // No limit configured: every one answered.
    l.dp.set_config(&Config::default()).unwrap();
    let syn = Spec::tcp(CLIENT4, 50_000, VIP4, 80).build();
    assert!((0..20).all(|_| l.run_xdp(&syn).0 == XDP_TX));
}

#[test]
fn ipv4_options_are_translated_with_exact_checksums() {
    require_root!();
    let mut l = Loaded::new();
    let svc = program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    let mut spec = Spec::tcp(CLIENT4, 43000, VIP4, 80);
    spec.ip_options = vec![0x07, 0x07, 0x04, 0, 0, 0, 0, 0x01]; // record route + NOP
    for tc in [false, true] {
        let mut s = spec.clone();
        s.sport += tc as u16;
        expect_dnat(&l, &svc, &BES4, &s, tc);
    }
}

#[test]
fn fragments_follow_the_first_fragment() {
    require_root!();
    let mut l = Loaded::new();
    let svc = program(&mut l.dp, 1, (VIP4, 53, PROTO_UDP), &BES4, 0, 0);
    let mut spec = Spec::udp(CLIENT4, 5353, VIP4, 53).payload(&[0xab; 64]);
    spec.ip_id = 0x4242;
    let seg = spec.segment();
    let (head, tail) = seg.split_at(32);
    let mut first = spec.clone();
    first.frag = 0x2000; // MF, offset 0
    let mut later = spec.clone();
    later.frag = 32 / 8; // offset 32 bytes, last fragment

    let (rc, out) = l.run_xdp(&first.build_with_l4(head));
    assert_eq!(rc, XDP_PASS);
    let id = svc.predict(&spec.key());
    let be = backend_ip(&BES4, id);
    let seen = inspect(&out);
    assert_eq!((seen.dst, seen.dport), (be, 9376));
    // The first fragment's UDP checksum covers the whole datagram: reassembled, it must be
    // exactly the datagram built for the backend.
    let want = Spec { dst: be, dport: 9376, ..spec.clone() }.segment();
    assert_eq!(&out[34..], &want[..32]);

    let (rc, out) = l.run_xdp(&later.build_with_l4(tail));
    assert_eq!(rc, XDP_PASS);
    let seen = inspect(&out);
    assert_eq!(seen.dst, be, "later fragment follows");
    assert_eq!(&out[34..], tail, "payload untouched");
    assert_eq!(reason(&l, Reason::FragmentFollowed), 1);
}

#[test]
fn unknown_later_fragment_passes_untouched() {
    require_root!();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (VIP4, 53, PROTO_UDP), &BES4, 0, 0);
    let mut spec = Spec::udp(CLIENT4, 5353, VIP4, 53);
    spec.frag = 8;
    let p = spec.build_with_l4(&[1; 24]);
    let (rc, out) = l.run_xdp(&p);
    assert_eq!((rc, out), (XDP_PASS, p));
    assert_eq!(reason(&l, Reason::FragmentUnknown), 1);
}

#[test]
fn no_backend_tcp_v4_gets_rst() {
    require_root!();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &[], 0, 0);
    let syn = Spec { seq: 0xdead_beef, ..Spec::tcp(CLIENT4, 44000, VIP4, 80) };
    for tc in [false, true] {
        let (rc, out) = if tc { l.run_tc(&syn.build()) } else { l.run_xdp(&syn.build()) };
        assert_eq!(rc, if tc { TC_ACT_REDIRECT } else { XDP_TX });
        let seen = inspect(&out);
        assert_eq!((seen.src, seen.sport, seen.dst, seen.dport), (ip(VIP4), 80, ip(CLIENT4), 44000));
        assert_eq!(seen.tcp_flags, TCP_RST | TCP_ACK);
        assert_eq!((seen.seq, seen.ack), (0, 0xdead_bef0), "acks the SYN");
        assert_eq!((seen.eth_dst, seen.eth_src), (CLIENT_MAC, NODE_MAC));
        assert_eq!(out.len(), 14 + 20 + 20);
    }
    assert_eq!(reason(&l, Reason::RejectNoBackend), 2);
    assert_eq!(l.dp.service_counter(1).unwrap().packets, 2);
}

#[test]
fn no_backend_tcp_ack_with_data_gets_rst_at_its_ack() {
    require_root!();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (VIP6, 80, PROTO_TCP), &[], 0, 0);
    let seg = Spec { seq: 5, ack: 777, ..Spec::tcp(CLIENT6, 44001, VIP6, 80) }
        .flags(TCP_ACK | TCP_PSH)
        .payload(b"data");
    let (rc, out) = l.run_xdp(&seg.build());
    assert_eq!(rc, XDP_TX);
    let seen = inspect(&out);
    assert_eq!((seen.src, seen.dst, seen.dport), (ip(VIP6), ip(CLIENT6), 44001));
    assert_eq!((seen.tcp_flags, seen.seq), (TCP_RST, 777));
    assert_eq!(out.len(), 14 + 40 + 20);
}

#[test]
fn rst_to_no_backend_is_not_answered() {
    require_root!();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &[], 0, 0);
    let rst = Spec::tcp(CLIENT4, 44002, VIP4, 80).flags(TCP_RST);
    assert_eq!(l.run_xdp(&rst.build()).0, XDP_DROP);
    assert_eq!(reason(&l, Reason::RejectFailed), 1);
}

#[test]
fn no_backend_udp_v4_gets_icmp_port_unreachable() {
    require_root!();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (VIP4, 53, PROTO_UDP), &[], 0, 0);
    let q = Spec::udp(CLIENT4, 5000, VIP4, 53).payload(&[7; 100]);
    let input = q.build();
    for tc in [false, true] {
        let (rc, out) = if tc { l.run_tc(&input) } else { l.run_xdp(&input) };
        assert_eq!(rc, if tc { TC_ACT_REDIRECT } else { XDP_TX });
        let seen = inspect(&out);
        assert_eq!((seen.src, seen.dst, seen.icmp), (ip(VIP4), ip(CLIENT4), Some((3, 3))));
        // Quotes the original IP header and the first 8 bytes of UDP, unchanged.
        assert_eq!(&seen.l4[8..], &input[14..14 + 20 + 8]);
        assert_eq!(out.len(), 14 + 20 + 8 + 28);
    }
}

#[test]
fn no_backend_udp_v6_gets_icmpv6_port_unreachable() {
    require_root!();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (VIP6, 53, PROTO_UDP), &[], 0, 0);
    let input = Spec::udp(CLIENT6, 5000, VIP6, 53).payload(&[9; 300]).build();
    for tc in [false, true] {
        let (rc, out) = if tc { l.run_tc(&input) } else { l.run_xdp(&input) };
        assert_eq!(rc, if tc { TC_ACT_REDIRECT } else { XDP_TX });
        let seen = inspect(&out);
        assert_eq!((seen.src, seen.dst, seen.icmp), (ip(VIP6), ip(CLIENT6), Some((1, 4))));
        assert_eq!(&seen.l4[8..], &input[14..14 + 48]);
    }
}

#[test]
fn no_backend_drop_when_configured() {
    require_root!();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &[], 0, 0);
    program(&mut l.dp, 2, (VIP4, 81, PROTO_TCP), &[], 0, SVC_F_DROP_NO_BACKEND);
    // Per service (ETP/ITP Local with no local endpoint).
    assert_eq!(l.run_xdp(&Spec::tcp(CLIENT4, 1, VIP4, 81).build()).0, XDP_DROP);
    // Globally (--no-backend-response drop).
    assert_eq!(l.run_xdp(&Spec::tcp(CLIENT4, 1, VIP4, 80).build()).0, XDP_TX);
    l.dp.set_config(&Config { flags: CFG_F_NO_BACKEND_DROP, ..Config::default() }).unwrap();
    assert_eq!(l.run_xdp(&Spec::tcp(CLIENT4, 1, VIP4, 80).build()).0, XDP_DROP);
    assert_eq!(reason(&l, Reason::DropNoBackend), 2);
}

#[test]
fn same_ip_two_ports_two_protocols() {
    require_root!();
    let mut l = Loaded::new();
    let web = [Be { id: 1, ip: "198.18.1.1", port: 8080 }];
    let tls = [Be { id: 2, ip: "198.18.1.2", port: 8443 }];
    let dns_udp = [Be { id: 3, ip: "198.18.1.3", port: 53 }];
    let dns_tcp = [Be { id: 4, ip: "198.18.1.4", port: 5353 }];
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &web, 0, 0);
    program(&mut l.dp, 2, (VIP4, 443, PROTO_TCP), &tls, 200, 0);
    program(&mut l.dp, 3, (VIP4, 53, PROTO_UDP), &dns_udp, 400, 0);
    program(&mut l.dp, 4, (VIP4, 53, PROTO_TCP), &dns_tcp, 600, 0);
    for (spec, want) in [
        (Spec::tcp(CLIENT4, 1, VIP4, 80), ("198.18.1.1", 8080)),
        (Spec::tcp(CLIENT4, 1, VIP4, 443), ("198.18.1.2", 8443)),
        (Spec::udp(CLIENT4, 1, VIP4, 53), ("198.18.1.3", 53)),
        (Spec::tcp(CLIENT4, 1, VIP4, 53), ("198.18.1.4", 5353)),
    ] {
        let (_, out) = l.run_xdp(&spec.build());
        let seen = inspect(&out);
        assert_eq!((seen.dst, seen.dport), (ip(want.0), want.1));
    }
}

#[test]
fn udp_zero_checksum_stays_zero() {
    require_root!();
    let mut l = Loaded::new();
    let svc = program(&mut l.dp, 1, (VIP4, 53, PROTO_UDP), &BES4, 0, 0);
    let spec = Spec { udp_zero_csum: true, ..Spec::udp(CLIENT4, 6000, VIP4, 53) };
    for tc in [false, true] {
        let (_, out) = if tc { l.run_tc(&spec.build()) } else { l.run_xdp(&spec.build()) };
        let be = backend_ip(&BES4, svc.predict(&spec.key()));
        assert_eq!(out, Spec { dst: be, dport: 9376, ..spec.clone() }.build());
        assert_eq!(&out[40..42], &[0, 0]);
    }
}

#[test]
fn vlan_tagged_frames_are_translated() {
    require_root!();
    let mut l = Loaded::new();
    let svc = program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    let spec = Spec { vlan: Some(100), ..Spec::tcp(CLIENT4, 45000, VIP4, 80) };
    expect_dnat(&l, &svc, &BES4, &spec, false);
}

#[test]
fn removed_backend_udp_moves_tcp_stays_syn_moves() {
    require_root!();
    let mut l = Loaded::new();
    let svc_u = program(&mut l.dp, 1, (VIP4, 53, PROTO_UDP), &BES4, 0, 0);
    let q = Spec::udp(CLIENT4, 12345, VIP4, 53);
    let first = expect_dnat(&l, &svc_u, &BES4, &q, false);
    let tcp_bes = [Be { id: 21, ip: "198.18.2.1", port: 80 }, Be { id: 22, ip: "198.18.2.2", port: 80 }];
    let svc_t = program(&mut l.dp, 2, (VIP4, 80, PROTO_TCP), &tcp_bes, 1000, 0);
    let syn = Spec::tcp(CLIENT4, 23456, VIP4, 80);
    let tfirst = expect_dnat(&l, &svc_t, &tcp_bes, &syn, false);

    // Remove the chosen backends and rebuild both services without them.
    let rest_u: Vec<Be> = BES4.iter().copied().filter(|b| b.id != first).collect();
    let rest_t: Vec<Be> = tcp_bes.iter().copied().filter(|b| b.id != tfirst).collect();
    l.dp.remove_backend(first).unwrap();
    l.dp.remove_backend(tfirst).unwrap();
    program(&mut l.dp, 1, (VIP4, 53, PROTO_UDP), &rest_u, 2000, 0);
    program(&mut l.dp, 2, (VIP4, 80, PROTO_TCP), &rest_t, 3000, 0);

    // Same UDP 5-tuple: moved at once to a live backend.
    let (_, out) = l.run_xdp(&q.build());
    let moved = inspect(&out).dst;
    assert!(rest_u.iter().any(|b| ip(b.ip) == moved), "UDP moved to a live backend");
    // The open TCP connection keeps going where it was.
    let (_, out) = l.run_xdp(&syn.clone().flags(TCP_ACK).build());
    assert_eq!(inspect(&out).dst, backend_ip(&tcp_bes, tfirst));
    // A new SYN reusing that 5-tuple gets a live backend.
    let (_, out) = l.run_xdp(&syn.build());
    assert_eq!(inspect(&out).dst, ip(rest_t[0].ip));
}

#[test]
fn ipv6_extension_headers_pass_untouched() {
    require_root!();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (VIP6, 53, PROTO_UDP), &BES6, 0, 0);
    let udp = [0, 1, 0, 53, 0, 8, 0, 0];
    // A hop-by-hop header (a PadN option) before UDP; then a fragment header followed by
    // destination options: chains we do not walk.
    for (first, ext) in [(0u8, [17, 0, 1, 4, 0, 0, 0, 0]), (44, [60, 0, 0, 1, 0, 0, 0, 1])] {
        let mut spec = Spec::udp(CLIENT6, 1, VIP6, 53);
        spec.proto = first;
        let p = spec.build_with_l4(&[&ext[..], &udp[..]].concat());
        let (rc, out) = l.run_xdp(&p);
        assert_eq!((rc, out), (XDP_PASS, p));
    }
    assert_eq!(reason(&l, Reason::Ipv6ExtHeader), 2);
}

/// An IPv6 fragment header (RFC 8200 §4.5): `next`, the fragment's offset in bytes (a
/// multiple of 8), more fragments, identification.
fn frag6(next: u8, offset: u16, more: bool, id: u32) -> Vec<u8> {
    let mut f = vec![next, 0];
    f.extend_from_slice(&(offset | more as u16).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f
}

#[test]
fn ipv6_fragments_follow_the_first_fragment_at_both_hooks() {
    require_root!();
    for tc in [false, true] {
        let mut l = Loaded::new();
        let svc = program(&mut l.dp, 1, (VIP6, 53, PROTO_UDP), &BES6, 0, 0);
        let spec = Spec::udp(CLIENT6, 5353, VIP6, 53).payload(&[0xab; 64]);
        let seg = spec.segment();
        let (head, tail) = seg.split_at(32);
        let frame = |offset: u16, more: bool, part: &[u8]| {
            let mut s = spec.clone();
            s.proto = 44;
            s.build_with_l4(&[frag6(PROTO_UDP, offset, more, 0x4242_0001), part.to_vec()].concat())
        };
        let run = |p: &[u8]| if tc { l.run_tc(p) } else { l.run_xdp(p) };
        let passed = if tc { TC_ACT_UNSPEC } else { XDP_PASS };
        let be = backend_ip(&BES6, svc.predict(&spec.key()));
        // Ethernet 14, IPv6 40 (destination at 38..54), fragment header 8, then UDP.
        let first = frame(0, true, head);
        let (rc, out) = run(&first);
        assert_eq!(rc, passed, "tc {tc}");
        assert_eq!(&out[38..54], &ip_bytes(be)[..], "first fragment to the backend (tc {tc})");
        // Its UDP checksum covers the whole datagram: reassembled, it must be exactly the
        // datagram built for the backend.
        let want = Spec { dst: be, dport: 9376, ..spec.clone() }.segment();
        assert_eq!(&out[62..], &want[..32], "tc {tc}");
        assert_eq!((&out[..38], &out[54..62]), (&first[..38], &first[54..62]), "the rest as sent");

        let later = frame(32, false, tail);
        let (rc, out) = run(&later);
        assert_eq!(rc, passed);
        let mut want = later.clone();
        want[38..54].copy_from_slice(&ip_bytes(be));
        assert_eq!(out, want, "the later fragment follows, nothing else changed (tc {tc})");
        assert_eq!(reason(&l, Reason::FragmentFollowed), 1);
    }
}

#[test]
fn a_later_ipv4_fragment_of_a_source_nated_flow_follows_it() {
    require_root!();
    let mut l = Loaded::new();
    set_node_address(&mut l);
    // Remote backends: an external client's flow is source-NATed to the node.
    let svc = program(&mut l.dp, 1, (NODE4, 30080, PROTO_UDP), &BES4, 0, SVC_F_EXTERNAL);
    let mut spec = Spec::udp(CLIENT4, 5353, NODE4, 30080).payload(&[0xcd; 64]);
    spec.ip_id = 0x5151;
    let seg = spec.segment();
    let (head, tail) = seg.split_at(32);
    let (mut first, mut later) = (spec.clone(), spec.clone());
    first.frag = 0x2000; // MF, offset 0
    later.frag = 32 / 8;
    let (rc, out) = l.run_xdp(&first.build_with_l4(head));
    assert_eq!(rc, XDP_PASS);
    let seen = inspect(&out);
    let be = backend_ip(&BES4, svc.predict(&spec.key()));
    assert_eq!((seen.src, seen.dst, seen.dport), (ip(NODE4), be, 9376));
    let translated = Spec { src: ip(NODE4), sport: seen.sport, dst: be, dport: 9376, ..spec.clone() };
    assert_eq!(&out[34..], &translated.segment()[..32], "first fragment: both sides, checksum of the whole");

    let (rc, out) = l.run_xdp(&later.build_with_l4(tail));
    assert_eq!(rc, XDP_PASS);
    let want = Spec { src: ip(NODE4), dst: be, ..later.clone() }.build_with_l4(tail);
    assert_eq!(out, want, "both addresses rewritten, IPv4 checksum exact, payload untouched");
    assert_eq!(reason(&l, Reason::FragmentFollowed), 1);
}

#[test]
fn client_ip_affinity_keeps_one_backend() {
    require_root!();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, SVC_F_AFFINITY);
    let mut chosen = std::collections::BTreeSet::new();
    for port in 30000..30032 {
        let (_, out) = l.run_xdp(&Spec::tcp(CLIENT4, port, VIP4, 80).build());
        chosen.insert(inspect(&out).dst);
    }
    assert_eq!(chosen.len(), 1, "every flow of one client lands on one backend");
    // Another client may land elsewhere, but is sticky too.
    let mut other = std::collections::BTreeSet::new();
    for port in 30000..30008 {
        let (_, out) = l.run_xdp(&Spec::tcp("198.18.100.2", port, VIP4, 80).build());
        other.insert(inspect(&out).dst);
    }
    assert_eq!(other.len(), 1);
}

#[test]
fn random_algorithm_spreads_over_backends() {
    require_root!();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    l.dp.set_config(&Config { flags: CFG_F_RANDOM, ..Config::default() }).unwrap();
    let mut chosen = std::collections::BTreeSet::new();
    for _ in 0..64 {
        // Same 5-tuple every time (flow table flushed): only randomness can spread it.
        l.dp.flush_flows().unwrap();
        let (_, out) = l.run_xdp(&Spec::tcp(CLIENT4, 30000, VIP4, 80).build());
        chosen.insert(inspect(&out).dst);
    }
    assert_eq!(chosen.len(), 3);
}

#[test]
fn per_backend_counters_count_packets_and_bytes() {
    require_root!();
    let mut l = Loaded::new();
    let svc = program(&mut l.dp, 7, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    let spec = Spec::tcp(CLIENT4, 31000, VIP4, 80);
    let id = svc.predict(&spec.key());
    let len = spec.build().len() as u64;
    for _ in 0..3 {
        l.run_xdp(&spec.build());
    }
    let c = l.dp.backend_counter(id).unwrap();
    assert_eq!((c.packets, c.bytes), (3, 3 * len));
    assert_eq!(l.dp.service_counter(7).unwrap().packets, 3);
    assert_eq!((reason(&l, Reason::NewFlow), reason(&l, Reason::FlowHit)), (1, 2));
}

#[test]
fn object_maps_match_the_shared_names() {
    require_root!();
    let l = Loaded::new();
    let mut names: Vec<&str> =
        l.ebpf.maps().map(|(n, _)| n).filter(|n| !lb_common::maps::UNPINNED.contains(n)).collect();
    names.sort();
    let mut want = lb_common::maps::ALL.to_vec();
    want.sort();
    assert_eq!(names, want);
    for n in lb_common::maps::ALL {
        assert!(l.pin_dir.join(n).exists(), "{n} pinned");
    }
}

#[test]
fn reload_reuses_pinned_maps() {
    require_root!();
    let mut l = Loaded::new();
    let svc = program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    let syn = Spec::tcp(CLIENT4, 32000, VIP4, 80);
    let id = expect_dnat(&l, &svc, &BES4, &syn, false);
    // "Restart": load the object again over the same pins; state and flows survive.
    let again = lb_userspace::loader::load(
        &l.pin_dir,
        &lb_userspace::loader::Capacities { flows: 65_536, maglev_slots: 1 << 20, ..Default::default() },
    )
    .unwrap();
    let xdp: &aya::programs::Xdp = again.program("lb_xdp").unwrap().try_into().unwrap();
    let (_, out, _) = run_timed(xdp, &syn.clone().flags(TCP_ACK).build());
    assert_eq!(inspect(&out).dst, backend_ip(&BES4, id));
    assert_eq!(reason(&l, Reason::FlowHit), 1, "the new program counts into the same maps");
}

// ---------------------------------------------------------------------------------------
// Source NAT, source ranges, unserved ClusterIP ports.

fn set_node_address(l: &mut Loaded) {
    let c = Config { snat_v4: addr_from_ip(ip(NODE4)), ..Config::default() };
    l.dp.set_config(&c).unwrap();
}

#[test]
fn external_flow_to_a_remote_backend_is_source_natted_and_its_reply_restored() {
    require_root!();
    let mut l = Loaded::new();
    set_node_address(&mut l);
    // `program` marks backends present but not local: they live on another node.
    let svc = program(&mut l.dp, 1, (NODE4, 30080, PROTO_TCP), &BES4, 0, SVC_F_EXTERNAL);
    let syn = Spec::tcp(CLIENT4, 40000, NODE4, 30080);
    let (rc, out) = l.run_xdp(&syn.build());
    assert_eq!(rc, XDP_PASS);
    let seen = inspect(&out);
    let be = BES4.iter().find(|b| b.id == svc.predict(&syn.key())).unwrap();
    assert_eq!((seen.dst, seen.dport), (ip(be.ip), 9376));
    assert_eq!(seen.src, ip(NODE4), "source NATed to the node");
    assert!((61_000..=65_535).contains(&seen.sport), "port {} outside the SNAT range", seen.sport);
    let want = Spec { src: ip(NODE4), sport: seen.sport, dst: ip(be.ip), dport: 9376, ..syn.clone() }.build();
    assert_eq!(out, want, "byte-exact, checksums included");
    // The backend answers the node; the reply leaves from the frontend to the client.
    let synack = Spec::tcp(be.ip, 9376, NODE4, seen.sport).flags(TCP_SYN | TCP_ACK);
    let (rc, out) = l.run_xdp(&synack.build());
    assert_eq!(rc, XDP_PASS);
    let want =
        Spec { src: ip(NODE4), sport: 30080, dst: ip(CLIENT4), dport: 40000, ..synack.clone() }.build();
    assert_eq!(out, want);
    // The second segment of the flow gets the same translation.
    let (_, again) = l.run_xdp(&syn.clone().flags(TCP_ACK).build());
    assert_eq!((inspect(&again).src, inspect(&again).sport), (ip(NODE4), seen.sport));
    let flows = l.dp.flows().unwrap();
    assert_eq!(flows.iter().filter(|(_, v)| v.flags & FLOW_F_SNAT != 0).count(), 2);
}

#[test]
fn external_flow_to_a_local_backend_keeps_the_client_address() {
    require_root!();
    let mut l = Loaded::new();
    set_node_address(&mut l);
    let svc = program(&mut l.dp, 1, (NODE4, 30080, PROTO_UDP), &BES4, 0, SVC_F_EXTERNAL);
    for b in &BES4 {
        l.dp.set_backend(b.id, &BackendValue::new(ip(b.ip), b.port, BE_F_PRESENT | BE_F_LOCAL)).unwrap();
    }
    expect_dnat(&l, &svc, &BES4, &Spec::udp(CLIENT4, 5000, NODE4, 30080), false);
}

#[test]
fn hairpin_is_source_natted_to_the_node() {
    require_root!();
    let mut l = Loaded::new();
    set_node_address(&mut l);
    let only = [BES4[0]];
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &only, 0, 0);
    // The backend pod itself calls the ClusterIP (at TC, on its host-side interface).
    let syn = Spec::tcp(only[0].ip, 45000, VIP4, 80);
    let (rc, out) = l.run_tc(&syn.build());
    assert_eq!(rc, TC_ACT_UNSPEC);
    let seen = inspect(&out);
    assert_eq!((seen.src, seen.dst, seen.dport), (ip(NODE4), ip(only[0].ip), 9376));
    let reply = Spec::tcp(only[0].ip, 9376, NODE4, seen.sport).flags(TCP_SYN | TCP_ACK);
    let (_, out) = l.run_tc(&reply.build());
    let back = inspect(&out);
    assert_eq!((back.src, back.sport, back.dst, back.dport), (ip(VIP4), 80, ip(only[0].ip), 45000));
}

#[test]
fn source_nat_without_a_node_address_drops_and_counts() {
    require_root!();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (NODE4, 30080, PROTO_TCP), &BES4, 0, SVC_F_EXTERNAL);
    let (rc, _) = l.run_xdp(&Spec::tcp(CLIENT4, 40000, NODE4, 30080).build());
    assert_eq!(rc, XDP_DROP);
    assert_eq!(reason(&l, Reason::SnatFailed), 1);
}

#[test]
fn load_balancer_source_ranges_allow_listed_sources_and_drop_others() {
    require_root!();
    let mut l = Loaded::new();
    let lb = "198.19.100.1";
    let svc = program(&mut l.dp, 7, (lb, 80, PROTO_TCP), &BES4, 0, SVC_F_SOURCE_RANGES);
    l.dp.allow_source(7, &"198.18.100.0/24".parse().unwrap()).unwrap();
    // Another service's range does not count.
    l.dp.allow_source(8, &"198.18.200.0/24".parse().unwrap()).unwrap();
    expect_dnat(&l, &svc, &BES4, &Spec::tcp(CLIENT4, 40000, lb, 80), false);
    let (rc, _) = l.run_xdp(&Spec::tcp("198.18.200.1", 40000, lb, 80).build());
    assert_eq!(rc, XDP_DROP);
    assert_eq!(reason(&l, Reason::SourceRangeDenied), 1);
    let mut listed = l.dp.source_ranges().unwrap();
    listed.sort();
    assert_eq!(
        listed,
        vec![(7, "198.18.100.0/24".parse().unwrap()), (8, "198.18.200.0/24".parse().unwrap())]
    );
}

#[test]
fn cluster_ip_rejects_ports_it_does_not_serve_to_pods() {
    require_root!();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    l.dp.set_service(&ServiceKey::new(ip(VIP4), 0, 0), &ServiceValue::default()).unwrap();
    let (rc, out) = l.run_tc(&Spec::tcp(CLIENT4, 40000, VIP4, 8443).build());
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(inspect(&out).tcp_flags, TCP_RST | TCP_ACK);
    let (rc, out) = l.run_tc(&Spec::udp(CLIENT4, 40000, VIP4, 53).build());
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(inspect(&out).icmp, Some((3, 3)), "ICMP port unreachable");
    assert_eq!(reason(&l, Reason::RejectUnknownPort), 2);
    // Another address on that port is none of our business; neither is the node-interface
    // hook (ClusterIPs are reached from pods; XDP keeps its miss path to one lookup).
    let (rc, _) = l.run_tc(&Spec::tcp(CLIENT4, 40000, "198.19.0.11", 8443).build());
    assert_eq!(rc, TC_ACT_UNSPEC);
    let (rc, _) = l.run_xdp(&Spec::tcp(CLIENT4, 40000, VIP4, 8443).build());
    assert_eq!(rc, XDP_PASS);
}

#[test]
fn a_direct_connection_from_a_reused_port_is_not_taken_for_an_old_service_flow() {
    require_root!();
    let mut l = Loaded::new();
    let only = [BES4[0]];
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &only, 0, 0);
    // A Service flow from port 45000, over (reset); its entries stay until the GC's pass.
    let old = Spec::tcp(CLIENT4, 45000, VIP4, 80);
    l.run_tc(&old.build());
    l.run_tc(&old.flags(TCP_RST).build());
    // The client reuses port 45000 for a direct connection to the pod.
    let direct = Spec::tcp(CLIENT4, 45000, only[0].ip, 9376);
    let (rc, out) = l.run_tc(&direct.build());
    assert_eq!((rc, out), (TC_ACT_UNSPEC, direct.build()), "passed untouched");
    // Its SYN/ACK must come back from the pod, not be rewritten to the VIP.
    let synack = Spec::tcp(only[0].ip, 9376, CLIENT4, 45000).flags(TCP_SYN | TCP_ACK);
    let (_, out) = l.run_tc(&synack.build());
    assert_eq!(out, synack.build());
}

/// `--xdp-forward` forwards only out of the agent's own XDP ports: with none listed, a
/// translated packet goes up the stack exactly as without the option (same bytes: no TTL or
/// MAC change), and the counter says so; an untranslated packet is not counted at all.
#[test]
fn xdp_forward_without_a_port_passes_the_translated_packet_unchanged() {
    require_root!();
    let mut l = Loaded::new();
    let svc = program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    l.dp.set_config(&Config { flags: CFG_F_XDP_FORWARD, ..Config::default() }).unwrap();
    assert_eq!(l.dp.xdp_tx_ports(), Vec::<u32>::new());
    for port in 41000..41004 {
        expect_dnat(&l, &svc, &BES4, &Spec::tcp(CLIENT4, port, VIP4, 80), false);
    }
    let miss = Spec::tcp(CLIENT4, 41000, "198.18.0.1", 80).build();
    assert_eq!(l.run_xdp(&miss), (XDP_PASS, miss.clone()));
    let count = |slot| l.dp.xdp_forward_counter(slot).unwrap().packets;
    assert_eq!((count(XDP_FWD_TO_STACK), count(XDP_FWD_TX), count(XDP_FWD_REDIRECTED)), (4, 0, 0));
}

/// A changed capacity on a running node: the pins are migrated into maps of the new size,
/// with their entries (flows included), and nothing else is left behind.
#[test]
fn a_raised_capacity_migrates_the_pins_with_their_flows() {
    require_root!();
    let mut l = Loaded::new();
    let svc = program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    let syn = Spec::tcp(CLIENT4, 32100, VIP4, 80);
    let id = expect_dnat(&l, &svc, &BES4, &syn, false);
    let bigger =
        lb_userspace::loader::Capacities { flows: 131_072, maglev_slots: 1 << 20, ..Default::default() };
    let again = lb_userspace::loader::load(&l.pin_dir, &bigger).unwrap();
    let dp = lb_userspace::dataplane::AyaDataplane::open(&l.pin_dir).unwrap();
    assert_eq!(dp.flow_capacity().unwrap(), 131_072);
    assert_eq!(dp.flows().unwrap().len(), 2, "both directions of the flow came along");
    let xdp: &aya::programs::Xdp = again.program("lb_xdp").unwrap().try_into().unwrap();
    let (_, out, _) = run_timed(xdp, &syn.clone().flags(TCP_ACK).build());
    assert_eq!(inspect(&out).dst, backend_ip(&BES4, id), "the flow keeps its backend");
    assert!(!l.pin_dir.join("migrating").exists(), "old pins removed");
}

/// A capacity lowered below what the pins hold cannot be migrated: the load fails naming
/// the map, and the old pins are back where they were with their entries (the programs
/// attached to them never left them), with nothing left aside.
#[test]
fn a_capacity_too_small_for_the_pins_is_refused_and_the_pins_stay() {
    require_root!();
    let mut l = Loaded::new();
    // A table in the upper half of the 1M-slot array.
    let svc = program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 1 << 19, 0);
    let size = lb_userspace::maglev::table_size(BES4.len(), lb_common::maglev::DEFAULT_MAX_TABLE);
    let table = l.dp.read_maglev(1 << 19, size).unwrap();
    let smaller = lb_userspace::loader::Capacities { maglev_slots: 4096, ..Default::default() };
    let Err(err) = lb_userspace::loader::load(&l.pin_dir, &smaller) else { panic!("shrunk") };
    let msg = err.to_string();
    assert!(msg.contains("lb_maglev") && msg.contains("raise its capacity"), "{msg}");
    assert!(!l.pin_dir.join("migrating").exists(), "nothing left aside");
    let dp = lb_userspace::dataplane::AyaDataplane::open(&l.pin_dir).unwrap();
    assert_eq!(dp.read_maglev(1 << 19, size).unwrap(), table, "the old array is pinned again");
    let xdp: &aya::programs::Xdp = l.ebpf.program("lb_xdp").unwrap().try_into().unwrap();
    let spec = Spec::tcp(CLIENT4, 32300, VIP4, 80);
    let (_, out, _) = run_timed(xdp, &spec.build());
    assert_eq!(inspect(&out).dst, backend_ip(&BES4, svc.predict(&spec.key())));
}

/// A map of layout `def`, made outside any object: what an earlier or later release would
/// have left pinned.
fn map_of(def: aya_obj::maps::bpf_map_def, name: &str) -> aya::maps::MapData {
    let obj = aya_obj::maps::Map::Legacy(aya_obj::maps::LegacyMap {
        def,
        inner_def: None,
        section_index: 0,
        section_kind: aya_obj::EbpfSectionKind::Maps,
        symbol_index: None,
        data: Vec::new(),
    });
    aya::maps::MapData::create(obj, name, None).unwrap()
}

/// The Maglev array of the releases with one slot per element (a `u32` padded to 8 bytes)
/// is migrated packed, two slots to an element, each table where the service entries point:
/// new flows pick the same backends after the upgrade.
#[test]
fn a_one_slot_per_element_maglev_array_migrates_packed() {
    use std::os::fd::AsFd as _;
    require_root!();
    let mut l = Loaded::new();
    // At an odd offset, the table starts in the second half of an element.
    let svc = program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 3, 0);
    let size = lb_userspace::maglev::table_size(BES4.len(), lb_common::maglev::DEFAULT_MAX_TABLE);
    let table = l.dp.read_maglev(3, size).unwrap();
    let path = l.pin_dir.join(lb_common::maps::MAGLEV);
    std::fs::remove_file(&path).unwrap();
    let def = aya_obj::maps::bpf_map_def {
        map_type: 2,
        key_size: 4,
        value_size: 4,
        max_entries: 4096,
        map_flags: 1 << 10, // BPF_F_MMAPABLE
        ..Default::default()
    };
    let old = map_of(def, "lb_maglev");
    for (i, id) in table.iter().enumerate() {
        let slot = 3 + i as u32;
        lb_userspace::rawmap::update(old.fd().as_fd(), &slot.to_ne_bytes(), &id.to_ne_bytes(), 0).unwrap();
    }
    old.pin(&path).unwrap();
    let again = lb_userspace::loader::load(&l.pin_dir, &Default::default()).unwrap();
    let dp = lb_userspace::dataplane::AyaDataplane::open(&l.pin_dir).unwrap();
    assert_eq!(dp.read_maglev(3, size).unwrap(), table, "the table where the service points");
    let xdp: &aya::programs::Xdp = again.program("lb_xdp").unwrap().try_into().unwrap();
    for port in 32200..32216 {
        let spec = Spec::tcp(CLIENT4, port, VIP4, 80);
        let (_, out, _) = run_timed(xdp, &spec.build());
        assert_eq!(inspect(&out).dst, backend_ip(&BES4, svc.predict(&spec.key())), "port {port}");
    }
    assert!(!l.pin_dir.join("migrating").exists(), "old pins removed");
}

/// The Maglev array is mapped a window at a time: tables written in any order, across window
/// boundaries and at the array's end, read back the same through another opening of the maps
/// (and through one read wider than a window), and no more than a window stays mapped.
#[test]
fn maglev_tables_written_through_windows_read_back_and_stay_unmapped() {
    use lb_userspace::mmap_array::WINDOW;
    require_root!();
    let mut l = Loaded::new();
    let slots = 1u32 << 20; // `Loaded::new`'s array: 4 MB, four windows
    let per_window = (WINDOW / 4) as u32;
    let offsets = [slots - 401, 0, per_window - 200, 3 * per_window - 1, 401, 2 * per_window + 7];
    let table = |k: usize| (0..401u32).map(|i| (k as u32 + 1) * 1000 + i).collect::<Vec<_>>();
    let base = l.dp.mapped_bytes(); // the address pre-filter, mapped whole
    for (k, off) in offsets.iter().enumerate() {
        l.dp.write_maglev(*off, &table(k)).unwrap();
        assert!(l.dp.mapped_bytes() <= base + WINDOW, "{} bytes mapped", l.dp.mapped_bytes());
    }
    let dp = lb_userspace::dataplane::AyaDataplane::open(&l.pin_dir).unwrap();
    for (k, off) in offsets.iter().enumerate() {
        assert_eq!(dp.read_maglev(*off, 401).unwrap(), table(k), "table at slot {off}");
    }
    let whole = dp.read_maglev(0, slots).unwrap();
    for (k, off) in offsets.iter().enumerate() {
        assert_eq!(
            whole[*off as usize..*off as usize + 401],
            table(k)[..],
            "table at slot {off}, read whole"
        );
    }
    assert!(dp.mapped_bytes() <= base + WINDOW, "a wide read is not kept mapped");
    assert!(dp.read_maglev(slots - 400, 401).is_err(), "past the end");
    assert_eq!(dp.read_maglev(slots, 0).unwrap(), Vec::<u32>::new(), "nothing, at the end");
}

/// A first sync's run of tables, written by two threads through windows of their own (packed
/// tables of 1 to 5 backends, as the planner keeps them), reads back slot for slot, and
/// leaves one window mapped, where the run ended.
#[test]
fn a_large_run_of_tables_written_by_two_threads_reads_back() {
    use lb_userspace::{compact_table::Table, mmap_array::WINDOW};
    require_root!();
    let mut l = Loaded::new();
    let base = l.dp.mapped_bytes();
    let ids = |k: u32| -> Vec<u32> { (0..101u32).map(|i| 1 + k * 8 + (i * 7 + k) % (1 + k % 5)).collect() };
    let tables: Vec<(u32, Table)> = (0..6000u32).map(|k| (k * 101, Table::new(&ids(k)))).collect();
    let run: Vec<(u32, &Table)> = tables.iter().map(|(offset, table)| (*offset, table)).collect();
    l.dp.write_tables(&run).unwrap();
    assert!(l.dp.mapped_bytes() <= base + WINDOW, "{} bytes mapped", l.dp.mapped_bytes());
    let whole = l.dp.read_maglev(0, 6000 * 101).unwrap();
    for k in 0..6000u32 {
        assert_eq!(whole[(k * 101) as usize..][..101], ids(k)[..], "table {k}");
    }
}

/// A pin this build cannot carry over is refused, naming the map: never reused blindly.
#[test]
fn an_incompatible_pin_is_refused_by_name() {
    require_root!();
    let l = Loaded::new();
    let path = l.pin_dir.join(lb_common::maps::AFFINITY);
    std::fs::remove_file(&path).unwrap();
    // An affinity map with a value of another size, as a future release might leave.
    let def = aya_obj::maps::bpf_map_def {
        map_type: 9,
        key_size: 20,
        value_size: 24,
        max_entries: 16,
        ..Default::default()
    };
    map_of(def, "lb_affinity").pin(&path).unwrap();
    let Err(err) = lb_userspace::loader::load(&l.pin_dir, &Default::default()) else { panic!("reused") };
    let msg = err.to_string();
    assert!(msg.contains("lb_affinity") && msg.contains("value size"), "{msg}");
}

/// The pod source check trusts the addresses the agent gives each interface, and only there.
/// In a namespace whose pod interface `lbb0` routes 198.18.100.0/24 and 198.18.101.9/32, a
/// SYN from 198.18.101.7 (no route) arriving on `lbb0` is refused; given to `lbb1`, still
/// refused; given to `lbb0` (either slot), translated; taken back, refused again. The
/// agent's reading of host routes finds `lbb0`'s /32 and not its /24.
#[test]
fn known_pod_addresses_pass_only_on_their_own_interface() {
    use lb_tests::{lab::in_netns, netns::routed_veth};
    use lb_userspace::{links, routes};
    use std::{collections::BTreeMap, net::IpAddr};
    require_root!();
    let ns = routed_veth("known", &["198.18.100.0/24", "198.18.101.9/32"]).unwrap();
    in_netns(&ns.0, || {
        let (pod, other) = (links::interfaces()["lbb0"], links::interfaces()["lbb1"]);
        let mut l = Loaded::new();
        program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
        let syn = |port| Spec::tcp("198.18.101.7", port, VIP4, 80).build();
        let (me, v6) = (ip("198.18.101.7"), ip("2001:2::7"));
        let set = |l: &mut Loaded, ports: &[(u32, &[IpAddr])]| {
            let ports = ports.iter().map(|(i, a)| (*i, PodPort::new(pod, a))).collect::<BTreeMap<_, _>>();
            l.dp.set_pod_ports(&ports).unwrap();
        };
        set(&mut l, &[(pod, &[])]);
        assert_eq!(l.run_tc_on(&syn(1000), pod), TC_ACT_SHOT, "no route, not known");
        set(&mut l, &[(pod, &[]), (other, &[me])]);
        assert_eq!(l.run_tc_on(&syn(1001), pod), TC_ACT_SHOT, "known on another interface");
        set(&mut l, &[(pod, &[me])]);
        assert_eq!(l.run_tc_on(&syn(1002), pod), TC_ACT_UNSPEC, "known here: translated");
        set(&mut l, &[(pod, &[v6, me])]);
        assert_eq!(l.run_tc_on(&syn(1003), pod), TC_ACT_UNSPEC, "in the second slot too");
        set(&mut l, &[(pod, &[v6])]);
        assert_eq!(l.run_tc_on(&syn(1004), pod), TC_ACT_SHOT, "no longer known");
        assert_eq!(reason(&l, Reason::NewFlow), 2);
        assert_eq!(reason(&l, Reason::SpoofedSource), 3);
        let found: Vec<_> = routes::host_routes().into_iter().filter(|(i, _)| i == "lbb0").collect();
        assert_eq!(found, vec![("lbb0".to_string(), ip("198.18.101.9"))]);
    })
    .unwrap();
}

/// A network namespace of its own for a test whose program consults the FIB (removed on drop).
struct FibNetns(String);

impl FibNetns {
    fn new(tag: &str, setup: &[&str]) -> FibNetns {
        let ns = FibNetns(format!("lbfix-{tag}-{}", std::process::id()));
        let run = |args: &[&str]| {
            let out = std::process::Command::new("ip").args(args).output().expect("ip");
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&["netns", "add", &ns.0]);
        for cmd in setup {
            let args: Vec<&str> = ["-n", ns.0.as_str()].into_iter().chain(cmd.split_whitespace()).collect();
            run(&args);
        }
        ns
    }
}

impl Drop for FibNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A namespace whose backends sit behind a route with a (locked) 1400-byte MTU, forwarding
/// on (what the FIB helper needs to answer FRAG_NEEDED), and a datapath in it with an IPv4
/// and an IPv6 Service there and `Config::mtu_floor` 1300; `body` runs in it.
fn behind_a_1400_byte_route(tag: &str, body: impl FnOnce(&mut Loaded) + Send + 'static) {
    let ns = FibNetns::new(
        tag,
        &[
            "link add d0 type veth peer name d1",
            "link set d0 up",
            "link set lo up",
            "route add 198.18.2.0/24 dev d0 mtu lock 1400",
            "-6 route add 2001:2:0:2::/64 dev d0 mtu lock 1400",
        ],
    );
    for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.0, "sysctl", "-q", "-w", key])
            .output()
            .unwrap();
        assert!(out.status.success(), "{key}");
    }
    // BPF_PROG_TEST_RUN runs the programs on the calling thread's namespace's loopback.
    lb_tests::lab::in_netns(&ns.0, || {
        let mut l = Loaded::new();
        program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &[Be { id: 1, ip: "198.18.2.10", port: 9376 }], 0, 0);
        program(
            &mut l.dp,
            2,
            (VIP6, 80, PROTO_TCP),
            &[Be { id: 2, ip: "2001:2:0:2::10", port: 9376 }],
            8192,
            0,
        );
        l.dp.set_config(&Config { mtu_floor: 1300, ..Config::default() }).unwrap();
        body(&mut l);
    })
    .unwrap();
}

/// Checks that `out` is the too-big answer (ICMP type 3 code 4 / ICMPv6 type 2, MTU 1400)
/// from `vip` to `client`, quoting `input`'s IP header and 8 bytes of TCP as they arrived.
fn assert_too_big_answer(out: &[u8], input: &[u8], client: &str, vip: &str) {
    let v6 = ip(vip).is_ipv6();
    let seen = inspect(out);
    let want = if v6 { (2, 0) } else { (3, 4) };
    assert_eq!((seen.src, seen.dst, seen.icmp), (ip(vip), ip(client), Some(want)));
    // The route's MTU in the last 16 bits of the header (IPv6: of the 32-bit field).
    assert_eq!(u16::from_be_bytes([seen.l4[6], seen.l4[7]]), 1400);
    assert_eq!(&seen.l4[4..6], &[0, 0]);
    // The quote: the IP header and 8 bytes of TCP exactly as the client sent them (the
    // packet had been translated before it turned out too big).
    let l3 = if v6 { 40 } else { 20 };
    assert_eq!(&seen.l4[8..], &input[14..14 + l3 + 8]);
}

#[test]
fn a_translated_packet_too_big_for_its_route_is_answered_quoting_it_as_it_arrived() {
    require_root!();
    behind_a_1400_byte_route("pmtu", |l| {
        for (client, vip) in [(CLIENT4, VIP4), (CLIENT6, VIP6)] {
            let syn = Spec::tcp(client, 40000, vip, 80);
            assert_eq!(l.run_xdp(&syn.build()).0, XDP_PASS, "the SYN is small: translated");
            // A full-size segment with DF (IPv6: always): too big for the 1400-byte route.
            let mut big = Spec::tcp(client, 40000, vip, 80).flags(TCP_ACK).payload(&[0x5a; 1400]);
            big.frag = 0x4000;
            big.seq = 1001;
            let input = big.build();
            let (rc, out) = l.run_xdp(&input);
            assert_eq!(rc, XDP_TX, "answered, not passed");
            assert_too_big_answer(&out, &input, client, vip);
            // Smaller ones still pass, translated.
            let small = Spec::tcp(client, 40000, vip, 80).flags(TCP_ACK).payload(&[1; 1000]);
            assert_eq!(l.run_xdp(&small.build()).0, XDP_PASS);
        }
        assert_eq!(reason(l, Reason::FragNeeded), 2);
        // Without DF an IPv4 packet is the stack's to fragment: passed.
        let mut no_df = Spec::tcp(CLIENT4, 40000, VIP4, 80).flags(TCP_ACK).payload(&[0x5a; 1400]);
        no_df.seq = 2401;
        assert_eq!(l.run_xdp(&no_df.build()).0, XDP_PASS);
        // A floor of 0 turns the check off.
        l.dp.set_config(&Config::default()).unwrap();
        let mut big = Spec::tcp(CLIENT4, 40000, VIP4, 80).flags(TCP_ACK).payload(&[0x5a; 1400]);
        big.frag = 0x4000;
        assert_eq!(l.run_xdp(&big.build()).0, XDP_PASS);
        assert_eq!(reason(l, Reason::FragNeeded), 2);
    });
}

/// The same on the node interfaces with `--node-hook tc` (`lb_tc_node`), where a packet may
/// stand for many segments (GRO on the node interface, GSO from a local socket): what must
/// fit the route is one segment, as in the stack's forwarding check. `lb_tc_pod` (pods, whose
/// MTU the CNI sets to fit) leaves it to the stack.
#[test]
fn at_tc_on_node_interfaces_a_packet_too_big_for_its_route_is_answered_and_a_gso_packet_is_judged_by_its_segments()
 {
    require_root!();
    behind_a_1400_byte_route("pmtutc", |l| {
        l.load_node_tc();
        for (client, vip) in [(CLIENT4, VIP4), (CLIENT6, VIP6)] {
            let syn = Spec::tcp(client, 40002, vip, 80);
            assert_eq!(l.run_tc_node(&syn.build(), 0, 0).0, TC_ACT_UNSPEC, "the SYN is small: translated");
            let segment = |seq: u32, payload: usize| {
                let mut s = Spec::tcp(client, 40002, vip, 80).flags(TCP_ACK).payload(&vec![0x5a; payload]);
                s.frag = 0x4000;
                s.seq = seq;
                s.build()
            };
            // One 1400-byte payload: too big; answered back out of the interface it came in on.
            let input = segment(1001, 1400);
            let (rc, out) = l.run_tc_node(&input, 0, 0);
            assert_eq!(rc, TC_ACT_REDIRECT, "answered, not passed");
            assert_too_big_answer(&out, &input, client, vip);
            // The pod interfaces' program passes it on, translated.
            assert_eq!(l.run_tc(&input).0, TC_ACT_UNSPEC, "lb_tc_pod leaves it to the stack");
            // Two segments of 1300 bytes in one GSO packet (2 600 bytes): each fits the
            // 1400-byte route, so it is translated and passed, not answered.
            let (rc, out) = l.run_tc_node(&segment(2401, 2600), 1300, 2);
            assert_eq!(rc, TC_ACT_UNSPEC, "segments that fit: passed");
            assert_eq!(inspect(&out).icmp, None, "still the TCP segment");
            // A single packet of the same 2 600 bytes is too big; so are two segments of 1380
            // bytes (1 420 and 1 440 bytes of IP each).
            assert_eq!(l.run_tc_node(&segment(5001, 2600), 0, 0).0, TC_ACT_REDIRECT);
            let input = segment(7601, 2760);
            let (rc, out) = l.run_tc_node(&input, 1380, 2);
            assert_eq!(rc, TC_ACT_REDIRECT);
            assert_too_big_answer(&out, &input, client, vip);
        }
        assert_eq!(reason(l, Reason::FragNeeded), 6);
    });
}

/// An ICMP error from `router` to `to` quoting the first 28 (IPv4) / 48 (IPv6) bytes of IP
/// packet `quoted` (a frame), with `kind` (type, code) and 32 bits of `info`.
fn icmp_error(router: &str, to: &str, kind: (u8, u8), info: u32, quoted: &[u8]) -> Vec<u8> {
    let v6 = ip(router).is_ipv6();
    let quote = &quoted[14..14 + if v6 { 48 } else { 28 }];
    let mut icmp = vec![kind.0, kind.1, 0, 0];
    icmp.extend_from_slice(&info.to_be_bytes());
    icmp.extend_from_slice(quote);
    let c = if v6 {
        lb_common::csum::l4_checksum(&ip_bytes(ip(router)), &ip_bytes(ip(to)), 58, &icmp)
    } else {
        !lb_common::csum::fold(lb_common::csum::sum_bytes(&icmp))
    };
    icmp[2..4].copy_from_slice(&c.to_ne_bytes());
    let mut outer = Spec::tcp(router, 0, to, 0);
    outer.proto = if v6 { 58 } else { 1 };
    outer.build_with_l4(&icmp)
}

#[test]
fn icmp_errors_about_translated_flows_are_translated_back_for_their_sender() {
    require_root!();
    let mut l = Loaded::new();
    set_node_address(&mut l);
    let svc = program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    let svc6 = program(&mut l.dp, 2, (VIP6, 80, PROTO_TCP), &BES6, 8192, 0);
    let ext = program(&mut l.dp, 3, (NODE4, 30080, PROTO_TCP), &BES4, 16384, SVC_F_EXTERNAL);
    for (client, vip, svc, bes, router) in
        [(CLIENT4, VIP4, &svc, &BES4[..], "198.18.0.254"), (CLIENT6, VIP6, &svc6, &BES6[..], "2001:2::fe")]
    {
        let syn = Spec::tcp(client, 40000, vip, 80);
        assert_eq!(l.run_xdp(&syn.build()).0, XDP_PASS);
        let be = bes.iter().find(|b| b.id == svc.predict(&syn.key())).unwrap();
        // The backend's reply as it left us, restored to the frontend; a router on the way
        // to the client finds it too big and tells its source, the frontend address.
        let sent = Spec::tcp(be.ip, 9376, client, 40000).flags(TCP_SYN | TCP_ACK);
        let (_, emitted) = l.run_xdp(&sent.build());
        let code = if ip(vip).is_ipv6() { (2, 0) } else { (3, 4) };
        let err = icmp_error(router, vip, code, 1400, &emitted);
        let (rc, out) = l.run_xdp(&err);
        assert_eq!(rc, XDP_PASS);
        let seen = inspect(&out);
        // Now to the backend, about the reply as the backend sent it: byte-exact quote,
        // its IP checksum included.
        assert_eq!((seen.src, seen.dst, seen.icmp), (ip(router), ip(be.ip), Some(code)), "{vip}");
        let l3 = if ip(vip).is_ipv6() { 40 } else { 20 };
        assert_eq!(&seen.l4[8..], &sent.build()[14..14 + l3 + 8], "{vip}: the quote as the backend sent it");
        assert_eq!(&seen.l4[4..8], &1400u32.to_be_bytes());
    }
    // A source-NATed flow: an error about its forward packet comes to the node; it goes on
    // to the client, about the packet as the client sent it.
    let syn = Spec::tcp(CLIENT4, 40001, NODE4, 30080);
    let (_, emitted) = l.run_xdp(&syn.build());
    let be = BES4.iter().find(|b| b.id == ext.predict(&syn.key())).unwrap();
    assert_eq!(inspect(&emitted).dst, ip(be.ip));
    let err = icmp_error("198.18.0.254", NODE4, (3, 1), 0, &emitted);
    let (rc, out) = l.run_xdp(&err);
    assert_eq!(rc, XDP_PASS);
    let seen = inspect(&out);
    assert_eq!((seen.dst, seen.icmp), (ip(CLIENT4), Some((3, 1))));
    assert_eq!(&seen.l4[8..], &syn.build()[14..14 + 28], "the quote as the client sent it");
    assert_eq!(reason(&l, Reason::IcmpRelated), 3);
    // An error about anything else passes untouched.
    let other = Spec::tcp("198.18.0.77", 1234, "198.18.0.78", 80).build();
    let err = icmp_error("198.18.0.254", "198.18.0.77", (3, 3), 0, &other);
    assert_eq!(l.run_xdp(&err), (XDP_PASS, err.clone()));
    assert_eq!(reason(&l, Reason::IcmpRelated), 3);
}

/// The verifier walks every path of each program, up to `VERIFIER_BUDGET` instructions; a
/// change that crosses it cannot load at all. The big programs keep a tenth of the budget free,
/// so the next change learns it is close here, with the figures, not from a failed load.
#[test]
fn the_programs_verify_with_a_tenth_of_the_budget_to_spare() {
    require_root!();
    let mut l = Loaded::new();
    l.load_node_tc();
    assert_eq!(
        lb_userspace::loader::verified_instructions(&l.ebpf).len(),
        4,
        "lb_xdp, lb_tc_pod, lb_tc_egress, lb_tc_node"
    );
    let limit = lb_userspace::loader::VERIFIER_BUDGET / 10 * 9;
    for (name, walked) in lb_userspace::loader::verified_instructions(&l.ebpf) {
        let walked = walked.expect("this kernel (6.18) reports verified instructions");
        println!("{name}: {walked} instructions verified, {limit} allowed here");
        assert!(walked <= limit, "{name}: {walked} instructions verified, over {limit}");
    }
}

/// Each error type, at each hook: a backend's ICMP error about a flow a client opened (a
/// closed port, a packet too big for a link, a TTL run out) quotes the packet as
/// translated and goes to the client; it leaves about the packet as the client sent it (to
/// VIP:80), byte-exact, IPv4 and IPv6. At XDP the backend is on another node; at TC it is a
/// local pod whose error enters through its interface. An error about anything else passes
/// untouched.
#[test]
fn each_icmp_error_type_is_translated_back_at_both_hooks() {
    require_root!();
    for tc in [false, true] {
        let mut l = Loaded::new();
        let svc = program(&mut l.dp, 1, (VIP4, 80, PROTO_UDP), &BES4, 0, 0);
        let svc6 = program(&mut l.dp, 2, (VIP6, 80, PROTO_UDP), &BES6, 8192, 0);
        let run = |p: &[u8]| if tc { l.run_tc(p) } else { l.run_xdp(p) };
        let passed = if tc { TC_ACT_UNSPEC } else { XDP_PASS };
        let kinds4 = [(3, 3), (3, 4), (11, 0)];
        let kinds6 = [(1, 4), (2, 0), (3, 0)];
        let mut translated = 0;
        for (client, vip, svc, bes, kinds) in
            [(CLIENT4, VIP4, &svc, &BES4[..], kinds4), (CLIENT6, VIP6, &svc6, &BES6[..], kinds6)]
        {
            for (i, kind) in kinds.into_iter().enumerate() {
                let sent = Spec::udp(client, 41000 + i as u16, vip, 80);
                let (rc, emitted) = run(&sent.build());
                assert_eq!(rc, passed);
                let be = bes.iter().find(|b| b.id == svc.predict(&sent.key())).unwrap();
                assert_eq!(inspect(&emitted).dst, ip(be.ip));
                let err = icmp_error(be.ip, client, kind, 1280, &emitted);
                let (rc, out) = run(&err);
                let what = format!("tc {tc} {vip} {kind:?}");
                assert_eq!(rc, passed, "{what}");
                let seen = inspect(&out);
                assert_eq!((seen.src, seen.dst, seen.icmp), (ip(be.ip), ip(client), Some(kind)), "{what}");
                let l3 = if ip(vip).is_ipv6() { 40 } else { 20 };
                assert_eq!(&seen.l4[8..], &sent.build()[14..14 + l3 + 8], "{what}: the quote as sent");
                assert_eq!(&seen.l4[4..8], &1280u32.to_be_bytes(), "{what}: the rest as it was");
                translated += 1;
            }
        }
        assert_eq!(reason(&l, Reason::IcmpRelated), translated);
        let other = Spec::udp(BES4[0].ip, 1234, "198.18.0.78", 80).build();
        let err = icmp_error(BES4[0].ip, "198.18.0.78", (3, 3), 0, &other);
        assert_eq!(run(&err), (passed, err.clone()));
        assert_eq!(reason(&l, Reason::IcmpRelated), translated);
    }
}

/// A batch large enough to be written by two threads (`dataplane::hash_batch`) lands whole:
/// every frontend and membership is in the kernel's maps with its value.
#[test]
fn large_batches_written_by_two_threads_land_whole() {
    require_root!();
    let mut l = Loaded::new();
    let n = 100_000u32;
    let frontends: Vec<(ServiceKey, ServiceValue)> = (0..n)
        .map(|i| {
            let vip = std::net::Ipv4Addr::from(0xc613_0000 + i);
            let value = ServiceValue { service_id: i + 1, backend_count: 1, ..Default::default() };
            (ServiceKey::new(vip.into(), 80, PROTO_TCP), value)
        })
        .collect();
    l.dp.set_services(&frontends).unwrap();
    let members: Vec<(MemberKey, MemberValue)> = (0..n)
        .map(|i| {
            (MemberKey { service_id: i + 1, backend_id: i % 7 + 1 }, MemberValue { generation: i, flags: 1 })
        })
        .collect();
    l.dp.set_members(&members).unwrap();
    let mut read = l.dp.services().unwrap();
    read.sort_by_key(|(k, _)| *k);
    let mut want = frontends.clone();
    want.sort_by_key(|(k, _)| *k);
    assert_eq!(read, want, "every frontend, with its value");
    let mut read = l.dp.members().unwrap();
    read.sort_by_key(|(k, _)| *k);
    assert_eq!(read, members, "every membership, with its value");
}

/// Host routing of what XDP translates: with `CFG_F_HOST_ROUTING`, a packet `lb_xdp`
/// translated and passes to the stack carries the 4-byte mark in its metadata for
/// `lb_tc_uplink` (BPF_PROG_TEST_RUN hands the metadata back in front of the frame), the
/// frame itself byte-exact as without; a packet that is not ours, or host routing off, gets
/// none. At TC, a packet without the mark passes the uplink program untouched.
#[test]
fn host_routing_marks_what_xdp_translates_for_the_uplink_program() {
    require_root!();
    let mut l = Loaded::new();
    let svc = program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    let mark = 0x4c42_6872u32.to_ne_bytes();
    let syn = Spec::tcp(CLIENT4, 41100, VIP4, 80);
    expect_dnat(&l, &svc, &BES4, &syn, false);
    l.dp.set_config(&Config { flags: CFG_F_HOST_ROUTING, ..Config::default() }).unwrap();
    let syn = Spec::tcp(CLIENT4, 41101, VIP4, 80);
    let (rc, out) = l.run_xdp(&syn.build());
    assert_eq!(rc, XDP_PASS);
    assert_eq!(out[..4], mark, "the mark in front of the frame");
    let id = svc.predict(&syn.key());
    let be = BES4.iter().find(|b| b.id == id).unwrap();
    assert_eq!(
        out[4..],
        Spec { dst: ip(be.ip), dport: be.port, ..syn.clone() }.build()[..],
        "translated as without"
    );
    let miss = Spec::tcp(CLIENT4, 41100, "198.18.0.1", 80).build();
    assert_eq!(l.run_xdp(&miss), (XDP_PASS, miss.clone()), "not ours: no mark");
    let no_meta = l.dp.host_routing_counter(HOST_ROUTE_NO_METADATA).unwrap().packets;
    assert_eq!(no_meta, 0, "the test run keeps metadata: nothing counted as unmarked");
    let uplink: &aya::programs::SchedClassifier =
        l.ebpf.program(lb_userspace::loader::UPLINK_PROGRAM).unwrap().try_into().unwrap();
    assert_eq!(try_run(uplink, &miss).unwrap(), (TC_ACT_UNSPEC, miss.clone()), "unmarked: the stack's");
}
