//! L2 fuzzing of the real programs: random frames, and valid Ethernet/VLAN/IPv4/IPv6/TCP/UDP
//! packets with random fields, lengths, flags, options and fragments (some then cut short or
//! with a byte changed), through `lb_xdp` and `lb_tc_pod` by BPF_PROG_TEST_RUN, each checked
//! against a host oracle: the verdict; the exact bytes of a packet not for us; the addresses
//! and ports of a translated one and, for packets not mangled on purpose, every other byte
//! and valid checksums; a valid RST or ICMP answer. Flows (with their TCP state, from
//! `lb_common::ct`), replies and fragments carry over from packet to packet, as they do in the
//! kernel, and the oracle keeps the same state. Every packet is counted under exactly one
//! verdict reason, and each reason's counter equals the oracle's count for it.
//!
//! `cargo xtask test` runs `LB_FUZZ_PACKETS` (default 100 000); `cargo xtask fuzz` a million.

#[macro_use]
mod common;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::Instant,
};

use common::*;
use lb_common::{abi::*, ct, verdict::Reason};
use lb_userspace::dataplane::Dataplane;

/// (source, source port, destination, destination port, protocol).
type Tuple = (IpAddr, u16, IpAddr, u16, u8);

struct Frontend {
    vip: IpAddr,
    port: u16,
    proto: u8,
    bes: &'static [Be],
    programmed: Programmed,
}

/// What the datapath must do with a packet.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// Passed, byte for byte.
    Untouched,
    Dropped,
    /// Turned into a RST or ICMP answer and sent back.
    Answered,
    /// Passed with this tuple (source and destination address and port).
    Translated(Tuple),
    /// A later fragment: passed with its destination (or, for a reply, source) address
    /// rewritten to this.
    Fragment {
        reply: bool,
        addr: IpAddr,
    },
    /// State the oracle does not model (a port clash): any verdict.
    Unchecked,
}

/// The headers as the datapath reads them.
struct Parsed {
    l3: usize,
    l4: usize,
    v6: bool,
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    flags: u8,
    first_fragment: bool,
    later_fragment: bool,
    ip_id: u32,
}

enum Parse {
    Ok(Parsed),
    /// Not TCP or UDP over IP: passed untouched, for this reason.
    NotOurs(Reason),
    /// A VLAN tag cut short.
    Drop,
    /// Malformed: what could be read of its destination, protocol and port.
    Malformed(Option<IpAddr>, u8, u16),
}

fn be16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

fn addr(b: &[u8]) -> IpAddr {
    if b.len() == 4 {
        IpAddr::from(<[u8; 4]>::try_from(b).unwrap())
    } else {
        IpAddr::from(<[u8; 16]>::try_from(b).unwrap())
    }
}

fn is_mapped(a: &IpAddr) -> bool {
    matches!(a, IpAddr::V6(v) if v.to_ipv4_mapped().is_some())
}

/// The oracle's header parsing: the same rules as `lb-ebpf/src/parse.rs`, written again.
fn parse(p: &[u8]) -> Parse {
    let mut l3 = 14;
    let mut et = be16(p, 12);
    if et == 0x8100 || et == 0x88a8 {
        if p.len() < 18 {
            return Parse::Drop;
        }
        et = be16(p, 16);
        l3 = 18;
    }
    let (v6, src, dst, proto, l4, first, later, ip_id) = match et {
        0x0800 => {
            if p.len() < l3 + 20 {
                return Parse::Malformed(None, 0, 0);
            }
            let dst = addr(&p[l3 + 16..l3 + 20]);
            let ihl = (p[l3] & 0xf) as usize * 4;
            if p[l3] >> 4 != 4 || ihl < 20 || l3 + ihl > p.len() || (be16(p, l3 + 2) as usize) < ihl {
                return Parse::Malformed(Some(dst), 0, 0);
            }
            let proto = p[l3 + 9];
            if proto != PROTO_TCP && proto != PROTO_UDP {
                return Parse::NotOurs(Reason::NotTcpUdp);
            }
            let frag = be16(p, l3 + 6);
            let later = frag & 0x1fff != 0;
            let first = !later && frag & 0x2000 != 0;
            (false, addr(&p[l3 + 12..l3 + 16]), dst, proto, l3 + ihl, first, later, be16(p, l3 + 4).into())
        }
        0x86dd => {
            if p.len() < l3 + 40 {
                return Parse::Malformed(None, 0, 0);
            }
            let (src, dst) = (addr(&p[l3 + 8..l3 + 24]), addr(&p[l3 + 24..l3 + 40]));
            if p[l3] >> 4 != 6 {
                return Parse::Malformed(Some(dst), 0, 0);
            }
            if is_mapped(&src) || is_mapped(&dst) {
                return Parse::NotOurs(Reason::V4MappedV6);
            }
            let proto = p[l3 + 6];
            if proto == 44 {
                // A fragment header right after the fixed one, in front of TCP or UDP.
                if p.len() < l3 + 48 {
                    return Parse::Malformed(Some(dst), 0, 0);
                }
                let inner = p[l3 + 40];
                if inner != PROTO_TCP && inner != PROTO_UDP {
                    return Parse::NotOurs(Reason::Ipv6ExtHeader);
                }
                let offset_flags = be16(p, l3 + 42);
                let later = offset_flags >> 3 != 0;
                let first = !later && offset_flags & 1 != 0;
                let id = u32::from_be_bytes(p[l3 + 44..l3 + 48].try_into().unwrap());
                (true, src, dst, inner, l3 + 48, first, later, id)
            } else {
                if matches!(proto, 0 | 43 | 60) {
                    return Parse::NotOurs(Reason::Ipv6ExtHeader);
                }
                if proto != PROTO_TCP && proto != PROTO_UDP {
                    return Parse::NotOurs(Reason::NotTcpUdp);
                }
                (true, src, dst, proto, l3 + 40, false, false, 0)
            }
        }
        _ => return Parse::NotOurs(Reason::NotIp),
    };
    let mut h = Parsed {
        l3,
        l4,
        v6,
        proto,
        src,
        dst,
        sport: 0,
        dport: 0,
        flags: 0,
        first_fragment: first,
        later_fragment: later,
        ip_id,
    };
    if later {
        return Parse::Ok(h);
    }
    if p.len() < l4 + 4 {
        return Parse::Malformed(Some(dst), proto, 0);
    }
    h.sport = be16(p, l4);
    h.dport = be16(p, l4 + 2);
    let need = if proto == PROTO_TCP { 20 } else { 8 };
    if p.len() < l4 + need {
        return Parse::Malformed(Some(dst), proto, h.dport);
    }
    if proto == PROTO_TCP {
        h.flags = p[l4 + 13];
    }
    Parse::Ok(h)
}

/// The datapath's state as the oracle sees it.
struct Oracle {
    frontends: Vec<Frontend>,
    cluster_ips: Vec<IpAddr>,
    /// Forward tuples with a flow -> the state of that direction (`lb_common::ct`).
    flows: HashMap<Tuple, u8>,
    /// Reply tuple -> the frontend address and port the reply leaves from.
    replies: HashMap<Tuple, (IpAddr, u16)>,
    /// (source, destination, IP id, protocol) of translated first fragments -> whether a
    /// reply, and the address their later fragments get.
    fragments: HashMap<(IpAddr, IpAddr, u32, u8), (bool, IpAddr)>,
}

impl Oracle {
    fn frontend(&self, dst: IpAddr, port: u16, proto: u8) -> Option<&Frontend> {
        self.frontends.iter().find(|f| f.vip == dst && f.port == port && f.proto == proto)
    }

    /// A refusal for `reason` at `tc` or the node hook: an answer, or a drop where none can
    /// be built (a fragment, a RST, or an ICMP answer to a VLAN-tagged frame at TC, where the
    /// kernel cannot make room in front of a tagged frame's IP header).
    fn refuse(h: &Parsed, tc: bool, reason: Reason) -> (Expect, Reason) {
        if h.first_fragment || (h.proto == PROTO_TCP && h.flags & TCP_RST != 0) {
            (Expect::Dropped, Reason::RejectFailed)
        } else if tc && h.proto == PROTO_UDP && h.l3 == 18 {
            (Expect::Dropped, Reason::AdjustRoomFailed)
        } else {
            (Expect::Answered, reason)
        }
    }

    /// What must happen to `p` at the pod hook (`tc`) or the node hook, and the reason it is
    /// counted under (`None`: not modelled); updates the state.
    fn expect(&mut self, p: &[u8], tc: bool) -> (Expect, Option<Reason>) {
        let (expect, reason) = self.verdict(p, tc);
        let modelled = !matches!(expect, Expect::Unchecked);
        (expect, modelled.then_some(reason))
    }

    fn verdict(&mut self, p: &[u8], tc: bool) -> (Expect, Reason) {
        use Reason::*;
        let h = match parse(p) {
            Parse::NotOurs(reason) => return (Expect::Untouched, reason),
            Parse::Drop => return (Expect::Dropped, TruncatedEth),
            Parse::Malformed(dst, proto, dport) => {
                let ours = dst.is_some_and(|d| {
                    (dport != 0 && self.frontend(d, dport, proto).is_some()) || self.cluster_ips.contains(&d)
                });
                let bad = if proto == 0 { MalformedIp } else { TruncatedL4 };
                return if ours { (Expect::Dropped, bad) } else { (Expect::Untouched, MalformedPassed) };
            }
            Parse::Ok(h) => h,
        };
        if h.later_fragment {
            return match self.fragments.get(&(h.src, h.dst, h.ip_id, h.proto)) {
                Some((reply, addr)) => (Expect::Fragment { reply: *reply, addr: *addr }, FragmentFollowed),
                None => (Expect::Untouched, FragmentUnknown),
            };
        }
        let tuple = (h.src, h.sport, h.dst, h.dport, h.proto);
        let syn = h.proto == PROTO_TCP && h.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if let Some((vip, port)) = self.replies.get(&tuple).copied() {
            if h.first_fragment {
                self.fragments.insert((h.src, h.dst, h.ip_id, h.proto), (true, vip));
            }
            return (Expect::Translated((vip, port, h.dst, h.dport, h.proto)), Reply);
        }
        let Some(f) = self.frontend(h.dst, h.dport, h.proto) else {
            if tc && self.cluster_ips.contains(&h.dst) {
                return Self::refuse(&h, tc, RejectUnknownPort);
            }
            if tc && syn && self.replies.contains_key(&(h.dst, h.dport, h.src, h.sport, h.proto)) {
                return (Expect::Unchecked, PortClash);
            }
            return (Expect::Untouched, NoFrontend);
        };
        let state = self.flows.get(&tuple).copied();
        // A SYN on a flow whose connection ended opens a new flow.
        let reopen = syn && matches!(state, Some(ct::CT_FIN | ct::CT_CLOSED));
        let known = state.is_some() && !reopen;
        if !known {
            if f.bes.is_empty() {
                return Self::refuse(&h, tc, RejectNoBackend);
            }
            if h.proto == PROTO_TCP && !syn {
                return if h.flags & TCP_RST != 0 {
                    (Expect::Dropped, NoFlowRst)
                } else {
                    Self::refuse(&h, tc, RejectNoFlow)
                };
            }
        }
        let id = f.programmed.predict(&FlowKey::new(h.src, h.sport, h.dst, h.dport, h.proto));
        let be = f.bes.iter().find(|b| b.id == id).expect("a predicted backend");
        let (be_ip, vip, port) = (ip(be.ip), f.vip, f.port);
        if !known && be_ip == h.src {
            // A hairpin: source NAT, and no node address is configured here.
            return (Expect::Dropped, SnatFailed);
        }
        let state = state.filter(|_| known).map_or(ct::CT_NEW, |s| ct::next_state(s, h.proto, h.flags));
        self.flows.insert(tuple, state);
        self.replies.insert((be_ip, be.port, h.src, h.sport, h.proto), (vip, port));
        if h.first_fragment {
            self.fragments.insert((h.src, h.dst, h.ip_id, h.proto), (false, be_ip));
        }
        let reason = if known { FlowHit } else { NewFlow };
        (Expect::Translated((h.src, h.sport, be_ip, be.port, h.proto)), reason)
    }
}

/// xorshift64*: reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// `min` random bytes and up to `spread - 1` more.
    fn bytes(&mut self, min: usize, spread: u64) -> Vec<u8> {
        let n = min + self.below(spread) as usize;
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One packet, and whether it was mangled on purpose (then checksums are not checked).
fn generate(r: &mut Rng, replies: &HashMap<Tuple, (IpAddr, u16)>) -> (Vec<u8>, bool) {
    let kind = r.below(100);
    if kind < 10 {
        let mut p = r.bytes(14, 107);
        let ets: [[u8; 2]; 4] = [[0x08, 0x00], [0x86, 0xdd], [0x81, 0x00], [0x08, 0x06]];
        if r.chance(70) {
            p[12..14].copy_from_slice(&ets[r.below(4) as usize]);
        }
        return (p, true);
    }
    if kind < 25 && !replies.is_empty() {
        // A reply of a known flow, from its backend.
        let n = r.below(replies.len() as u64) as usize;
        let ((src, sport, dst, dport, proto), _) = replies.iter().nth(n).unwrap();
        let mut s = if *proto == PROTO_TCP {
            Spec::tcp(&src.to_string(), *sport, &dst.to_string(), *dport).flags(TCP_ACK)
        } else {
            Spec::udp(&src.to_string(), *sport, &dst.to_string(), *dport)
        };
        s.payload = r.bytes(0, 32);
        return mutate(r, s.build());
    }
    let v6 = r.chance(40);
    let client = if v6 {
        format!("2001:db8:18::100:{}", 1 + r.below(16))
    } else {
        format!("198.18.100.{}", 1 + r.below(16))
    };
    let (vip, other) = if v6 { (VIP6, "2001:db8:19::77") } else { (VIP4, "198.19.7.7") };
    let dst = match r.below(10) {
        0 => other.to_string(),
        1 if v6 => "::ffff:198.19.0.10".to_string(),
        _ => vip.to_string(),
    };
    let dport = [80, 53, 81, 80, 53, 1 + r.below(65_535) as u16][r.below(6) as usize];
    let sport = 40_000 + r.below(64) as u16;
    let mut s = if r.chance(60) {
        let flags =
            [TCP_SYN, TCP_SYN, TCP_ACK, TCP_SYN | TCP_ACK, TCP_RST, TCP_FIN | TCP_ACK, TCP_PSH | TCP_ACK, 0];
        let f = if r.chance(10) { r.next() as u8 } else { flags[r.below(8) as usize] };
        Spec::tcp(&client, sport, &dst, dport).flags(f)
    } else {
        Spec::udp(&client, sport, &dst, dport)
    };
    if dst.contains("::ffff:") {
        s.src = ip("2001:db8:18::100:1");
    }
    s.payload = r.bytes(0, 48);
    if r.chance(10) {
        s.vlan = Some(r.below(4096) as u16);
    }
    if !v6 && r.chance(10) {
        s.ip_options = vec![1; 4 * (1 + r.below(2) as usize)];
    }
    if r.chance(8) {
        s.proto = [1, 58, 0, 43, 44, 60][r.below(6) as usize];
        return (s.build_with_l4(&r.bytes(8, 16)), true);
    }
    if s.proto == PROTO_UDP && r.chance(15) {
        // Fragments of one datagram: the first (with the UDP header), or a later one; IPv6's
        // in a fragment header.
        let id = r.below(8) as u16;
        let seg = s.segment();
        let first = r.chance(50);
        let part = if first { seg[..seg.len().min(16)].to_vec() } else { r.bytes(8, 24) };
        if v6 {
            s.proto = 44;
            let offset: u16 = if first { 1 } else { (2 + r.below(8) as u16) << 3 };
            let header = [[PROTO_UDP, 0], offset.to_be_bytes(), [0, 0], id.to_be_bytes()].concat();
            return (s.build_with_l4(&[header, part].concat()), false);
        }
        s.ip_id = id;
        s.frag = if first { 0x2000 } else { 2 + r.below(8) as u16 };
        return (s.build_with_l4(&part), false);
    }
    mutate(r, s.build())
}

/// Sometimes cuts the packet short or changes one header byte.
fn mutate(r: &mut Rng, mut p: Vec<u8>) -> (Vec<u8>, bool) {
    if r.chance(10) {
        p.truncate(14 + r.below((p.len() - 13) as u64) as usize);
        return (p, true);
    }
    if r.chance(8) {
        let i = 12 + r.below((p.len().min(80) - 12) as u64) as usize;
        p[i] = r.next() as u8;
        return (p, true);
    }
    (p, false)
}

/// `p` with its addresses and ports set to `t` (where the oracle's parser finds them); a
/// later fragment gets only the address (`reply`: its source, else its destination).
fn rewritten(p: &[u8], t: &Tuple) -> Vec<u8> {
    let Parse::Ok(h) = parse(p) else { panic!("a translated packet parses") };
    let mut out = p.to_vec();
    let (s, d, n) = if h.v6 { (h.l3 + 8, h.l3 + 24, 16) } else { (h.l3 + 12, h.l3 + 16, 4) };
    out[s..s + n].copy_from_slice(&ip_bytes(t.0));
    out[d..d + n].copy_from_slice(&ip_bytes(t.2));
    if !h.later_fragment {
        out[h.l4..h.l4 + 2].copy_from_slice(&t.1.to_be_bytes());
        out[h.l4 + 2..h.l4 + 4].copy_from_slice(&t.3.to_be_bytes());
    }
    out
}

/// `p` with its IPv4 header and TCP/UDP checksums zeroed: what is left must match byte for
/// byte (the checksums themselves are checked by `inspect`; an updated one may be 0xffff
/// where one computed afresh is 0, both valid).
fn without_checksums(p: &[u8]) -> Vec<u8> {
    let Parse::Ok(h) = parse(p) else { panic!("a translated packet parses") };
    let mut out = p.to_vec();
    if !h.v6 {
        out[h.l3 + 10..h.l3 + 12].fill(0);
    }
    let at = h.l4 + if h.proto == PROTO_TCP { 16 } else { 6 };
    if !h.later_fragment && out.len() >= at + 2 {
        out[at..at + 2].fill(0);
    }
    out
}

/// A later fragment's addresses, with its source (`reply`) or destination set to `to`
/// (ports unused: a later fragment has none).
fn tuple_of_fragment(p: &[u8], reply: bool, to: IpAddr) -> Option<Tuple> {
    let Parse::Ok(h) = parse(p) else { return None };
    Some(if reply { (to, 0, h.dst, 0, h.proto) } else { (h.src, 0, to, 0, h.proto) })
}

/// The tuple of a frame the oracle parsed (addresses and ports where they are).
fn tuple_of(p: &[u8]) -> Option<Tuple> {
    match parse(p) {
        Parse::Ok(h) if !h.later_fragment => {
            let (s, d) = if h.v6 { (h.l3 + 8, h.l3 + 24) } else { (h.l3 + 12, h.l3 + 16) };
            let n = if h.v6 { 16 } else { 4 };
            Some((addr(&p[s..s + n]), be16(p, h.l4), addr(&p[d..d + n]), be16(p, h.l4 + 2), h.proto))
        }
        _ => None,
    }
}

#[test]
fn random_and_mangled_packets_get_the_oracles_verdict() {
    require_root!();
    let packets: u64 = std::env::var("LB_FUZZ_PACKETS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let seed: u64 = std::env::var("LB_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_1b5e);
    let mut l = Loaded::new();
    let mut o = Oracle {
        frontends: Vec::new(),
        cluster_ips: vec![ip(VIP4)],
        flows: HashMap::new(),
        replies: HashMap::new(),
        fragments: HashMap::new(),
    };
    let mut offset = 0;
    for (id, (vip, port, proto, bes)) in [
        (VIP4, 80, PROTO_TCP, &BES4[..]),
        (VIP4, 53, PROTO_UDP, &BES4[..]),
        (VIP4, 81, PROTO_TCP, &[][..]),
        (VIP6, 80, PROTO_TCP, &BES6[..]),
        (VIP6, 53, PROTO_UDP, &BES6[..]),
    ]
    .into_iter()
    .enumerate()
    {
        let programmed = program(&mut l.dp, id as u32 + 1, (vip, port, proto), bes, offset, 0);
        offset += programmed.value.maglev_size;
        o.frontends.push(Frontend { vip: ip(vip), port, proto, bes, programmed });
    }
    l.dp.set_service(&ServiceKey::new(ip(VIP4), 0, 0), &ServiceValue::default()).unwrap();

    let mut r = Rng(seed);
    let mut cases: BTreeMap<String, u64> = BTreeMap::new();
    // The reasons the oracle expects to be counted, and the packets it does not model.
    let (mut reasons, mut slack) = ([0u64; Reason::COUNT as usize], 0u64);
    let (mut run, mut refused) = (0u64, 0u64);
    let t0 = Instant::now();
    for n in 0..packets {
        let (p, mangled) = generate(&mut r, &o.replies);
        let tc = r.chance(50);
        let result = if tc { try_run(l.tc(), &p) } else { try_run(l.xdp(), &p) };
        let Ok((rc, out)) = result else {
            // The kernel turned the frame down before the program (TC and cut-short headers).
            refused += 1;
            continue;
        };
        run += 1;
        let (want, want_reason) = o.expect(&p, tc);
        match want_reason {
            Some(r) => reasons[r as usize] += 1,
            None => slack += 1,
        }
        let (pass, drop, answer) =
            if tc { (TC_ACT_UNSPEC, TC_ACT_SHOT, TC_ACT_REDIRECT) } else { (XDP_PASS, XDP_DROP, XDP_TX) };
        let hook = if tc { "tc" } else { "xdp" };
        let what = || format!("packet {n} (seed {seed:#x}) at {hook}: {p:02x?}\nwant {want:?}, got {rc}");
        match &want {
            Expect::Untouched => {
                assert_eq!(rc, pass, "{}", what());
                assert_eq!(out, p, "{}", what());
            }
            Expect::Dropped => assert_eq!(rc, drop, "{}", what()),
            Expect::Answered => {
                assert_eq!(rc, answer, "{}", what());
                if !mangled {
                    let seen = inspect(&out);
                    assert!(seen.tcp_flags & TCP_RST != 0 || seen.icmp.is_some(), "{}", what());
                }
            }
            Expect::Translated(t) => {
                assert_eq!(rc, pass, "{}", what());
                assert_eq!(tuple_of(&out).as_ref(), Some(t), "{}", what());
                if !mangled {
                    inspect(&out);
                    let want = without_checksums(&rewritten(&p, t));
                    assert_eq!(without_checksums(&out), want, "every byte: {}", what());
                }
            }
            Expect::Fragment { reply, addr: a } => {
                assert_eq!(rc, pass, "{}", what());
                let l3 = if be16(&p, 12) == 0x8100 { 18 } else { 14 };
                let (at, n) = match (be16(&p, l3 - 2) == 0x86dd, *reply) {
                    (false, true) => (l3 + 12, 4),
                    (false, false) => (l3 + 16, 4),
                    (true, true) => (l3 + 8, 16),
                    (true, false) => (l3 + 24, 16),
                };
                assert_eq!(addr(&out[at..at + n]), *a, "{}", what());
                if !mangled {
                    inspect(&out);
                    let Some(t) = tuple_of_fragment(&p, *reply, *a) else { unreachable!() };
                    let want = without_checksums(&rewritten(&p, &t));
                    assert_eq!(without_checksums(&out), want, "every byte: {}", what());
                }
            }
            Expect::Unchecked => {}
        }
        let kind = format!("{want:?}").split(['(', ' ']).next().unwrap().to_string();
        *cases.entry(format!("{hook} {kind}")).or_default() += 1;
    }
    let took = t0.elapsed();
    let counted: u64 = Reason::ALL.iter().map(|r| reason(&l, *r)).sum();
    assert_eq!(counted, run, "every packet run is counted under exactly one reason");
    // Each reason's counter matches the oracle's count (up to the packets it does not model).
    let wrong: Vec<String> = Reason::ALL
        .iter()
        .map(|r| (r, reason(&l, *r), reasons[*r as usize]))
        .filter(|(_, got, want)| got.abs_diff(*want) > slack)
        .map(|(r, got, want)| format!("{r:?}: {got} counted, the oracle expects {want}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "counters off by more than {slack} (the packets not modelled):\n{}",
        wrong.join("\n")
    );
    eprintln!(
        "fuzz: {run} packets through the programs ({refused} refused by the kernel before them) in {:.1} s, {:.0} packets/s",
        took.as_secs_f64(),
        run as f64 / took.as_secs_f64()
    );
    for (case, n) in &cases {
        eprintln!("  {case:<18} {n}");
    }
    eprintln!("  by reason (each equal to the oracle's count, ±{slack} not modelled):");
    for r in Reason::ALL.iter().filter(|r| reasons[**r as usize] > 0) {
        eprintln!("    {:<22} {}", r.name(), reason(&l, *r));
    }
    for want in
        ["xdp Untouched", "tc Untouched", "xdp Translated", "tc Translated", "xdp Answered", "xdp Dropped"]
    {
        assert!(cases.get(want).copied().unwrap_or(0) > 0, "no {want} case: the generator lost its spread");
    }
}
