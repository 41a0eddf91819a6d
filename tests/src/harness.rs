//! Shared helpers for the privileged tests: the privilege gate, a loaded datapath in a
//! private pin dir (removed on drop, also when a test fails), and packet builders.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp},
};
use lb_common::{abi::*, csum};
use lb_userspace::{
    dataplane::{AyaDataplane, Dataplane},
    loader, maglev,
};

/// True if privileged tests can run here. Without root they are skipped loudly — unless
/// `LB_REQUIRE_PRIVILEGED=1` (CI), where that is a failure.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("LB_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("privileged test cannot run (not root) and LB_REQUIRE_PRIVILEGED=1");
    }
    eprintln!("SKIP: privileged test needs root");
    false
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A loaded datapath with its maps pinned in a private directory.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub dp: AyaDataplane,
    pub pin_dir: PathBuf,
}

impl Default for Loaded {
    fn default() -> Self {
        Self::new()
    }
}

impl Loaded {
    pub fn new() -> Self {
        Self::with_caps(&loader::Capacities { flows: 65_536, maglev_slots: 1 << 20, ..Default::default() })
    }

    pub fn with_caps(caps: &loader::Capacities) -> Self {
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/lb-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let ebpf = match loader::load(&pin_dir, caps) {
            Ok(e) => e,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&pin_dir);
                panic!("load datapath: {e:?}");
            }
        };
        let dp = match AyaDataplane::open(&pin_dir) {
            Ok(dp) => dp,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&pin_dir);
                panic!("open pinned maps: {e:?}");
            }
        };
        Loaded { ebpf, dp, pin_dir }
    }

    pub fn xdp(&self) -> &Xdp {
        self.ebpf.program(loader::XDP_PROGRAM).unwrap().try_into().unwrap()
    }

    pub fn tc(&self) -> &SchedClassifier {
        self.ebpf.program(loader::TC_PROGRAM).unwrap().try_into().unwrap()
    }

    /// Runs `lb_xdp` once on `pkt`: (return code, output bytes).
    pub fn run_xdp(&self, pkt: &[u8]) -> (u32, Vec<u8>) {
        run(self.xdp(), pkt)
    }

    /// Runs `lb_tc_pod` once on `pkt`: (return code, output bytes).
    pub fn run_tc(&self, pkt: &[u8]) -> (u32, Vec<u8>) {
        run(self.tc(), pkt)
    }

    /// Runs `lb_tc_pod` once on `pkt` arriving on interface `ifindex`: the return code.
    pub fn run_tc_on(&self, pkt: &[u8], ifindex: u32) -> u32 {
        run_with_skb(self.tc(), pkt, &skb_ctx(ifindex)).0
    }

    /// Runs `lb_tc_egress` once on `pkt`, as a packet the node's own stack sends: (return
    /// code, output bytes).
    pub fn run_egress(&self, pkt: &[u8]) -> (u32, Vec<u8>) {
        let egress: &SchedClassifier = self.ebpf.program(loader::EGRESS_PROGRAM).unwrap().try_into().unwrap();
        run(egress, pkt)
    }

    /// Loads `lb_tc_node` (`--node-hook tc`'s program), which the agent loads only when asked.
    pub fn load_node_tc(&mut self) {
        loader::load_node_tc(&mut self.ebpf).expect("load lb_tc_node");
    }

    /// `lb_tc_node` (after `load_node_tc`) once on `pkt` as a GSO (or GRO) packet of
    /// `segments` segments of `gso_size` payload bytes each (`__sk_buff`'s `gso_segs` at byte
    /// 164, `gso_size` at 176), `gso_size` 0 for a plain one: (return code, output bytes).
    pub fn run_tc_node(&self, pkt: &[u8], gso_size: u32, segments: u32) -> (u32, Vec<u8>) {
        let mut ctx = skb_ctx(0);
        ctx[164..168].copy_from_slice(&segments.to_ne_bytes());
        ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes());
        let node: &SchedClassifier = self.ebpf.program(loader::NODE_TC_PROGRAM).unwrap().try_into().unwrap();
        run_with_skb(node, pkt, &ctx)
    }
}

/// A TC program once on `pkt` with the `struct __sk_buff` test context `ctx`: (return code,
/// output bytes).
fn run_with_skb(prog: &SchedClassifier, pkt: &[u8], ctx: &[u8; 192]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; pkt.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(pkt),
        data_out: Some(&mut out),
        ctx_in: Some(ctx),
        ..TestRunOptions::new()
    };
    let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// A `struct __sk_buff` test context naming `ifindex` (its field at byte 40), the rest zero:
/// a TC test run "arriving on" that interface.
pub fn skb_ctx(ifindex: u32) -> [u8; 192] {
    let mut c = [0u8; 192];
    c[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    c
}

/// One BPF_PROG_TEST_RUN call: (return code, output packet), or the kernel's refusal (it
/// turns down some frames before the program runs, such as a cut-short IPv6 header at TC).
pub fn try_run<P>(prog: &P, pkt: &[u8]) -> Result<(u32, Vec<u8>), aya::programs::ProgramError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; pkt.len() + 256];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(pkt),
        data_out: Some(&mut out),
        ..TestRunOptions::new()
    })?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

/// One BPF_PROG_TEST_RUN call, repeat 1: (return code, output packet, kernel-reported ns).
pub fn run_timed<P>(prog: &P, pkt: &[u8]) -> (u32, Vec<u8>, u64)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; pkt.len() + 256];
    let r = prog
        .test_run(TestRunOptions { data_in: Some(pkt), data_out: Some(&mut out), ..TestRunOptions::new() })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out, r.duration.as_nanos() as u64)
}

fn run<P>(prog: &P, pkt: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let (rc, out, _) = run_timed(prog, pkt);
    (rc, out)
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

// ---------------------------------------------------------------------------------------
// Programming the maps through the agent's Dataplane.

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const TC_ACT_UNSPEC: u32 = u32::MAX; // -1
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A backend of a test service.
#[derive(Clone, Copy)]
pub struct Be {
    pub id: u32,
    pub ip: &'static str,
    pub port: u16,
}

/// What the host knows about a programmed service: enough to predict the kernel's choice.
pub struct Programmed {
    pub value: ServiceValue,
    pub table: Vec<u32>,
}

impl Programmed {
    /// The backend id the datapath must pick for this flow (computed on the host with
    /// lb-common's flow hash and slot choice).
    pub fn predict(&self, key: &FlowKey) -> u32 {
        self.table[lb_common::maglev::slot(lb_common::hash::flow_hash(key), self.value.maglev_size) as usize]
    }
}

/// Writes backends, their memberships (generation: the backend id), a Maglev table at
/// `offset` and the frontend entry, in that order.
pub fn program(
    dp: &mut impl Dataplane,
    service_id: u32,
    (vip, port, proto): (&str, u16, u8),
    backends: &[Be],
    offset: u32,
    flags: u32,
) -> Programmed {
    for b in backends {
        dp.set_backend(b.id, &BackendValue::new(ip(b.ip), b.port, BE_F_PRESENT)).unwrap();
        let member = MemberValue { generation: b.id, flags: MEMBER_F_USABLE };
        dp.set_member(&MemberKey { service_id, backend_id: b.id }, &member).unwrap();
    }
    let named: Vec<(u32, Vec<u8>)> =
        backends.iter().map(|b| (b.id, format!("{}:{}", b.ip, b.port).into_bytes())).collect();
    let size = maglev::table_size(backends.len(), lb_common::maglev::DEFAULT_MAX_TABLE);
    let table = maglev::build(&named, size);
    dp.write_maglev(offset, &table).unwrap();
    let value = ServiceValue {
        service_id,
        backend_count: backends.len() as u32,
        maglev_offset: offset,
        maglev_size: size,
        flags,
        affinity_timeout: 10_800,
    };
    dp.set_service(&ServiceKey::new(ip(vip), port, proto), &value).unwrap();
    Programmed { value, table }
}

// ---------------------------------------------------------------------------------------
// Packets: built with full, independently computed checksums.

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// A packet to build. Defaults: TCP SYN, no options, complete checksums.
#[derive(Debug, Clone)]
pub struct Spec {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
    pub ip_options: Vec<u8>,
    pub vlan: Option<u16>,
    /// IPv4 fragment field (host order: flags << 13 | offset in 8-byte units).
    pub frag: u16,
    pub ip_id: u16,
    pub udp_zero_csum: bool,
}

impl Spec {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Spec {
            src: ip(src),
            dst: ip(dst),
            sport,
            dport,
            proto: PROTO_TCP,
            tcp_flags: TCP_SYN,
            seq: 1000,
            ack: 0,
            payload: Vec::new(),
            ip_options: Vec::new(),
            vlan: None,
            frag: 0,
            ip_id: 0x1234,
            udp_zero_csum: false,
        }
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Spec {
            proto: PROTO_UDP,
            tcp_flags: 0,
            payload: b"hello".to_vec(),
            ..Self::tcp(src, sport, dst, dport)
        }
    }

    pub fn flags(mut self, f: u8) -> Self {
        self.tcp_flags = f;
        self
    }

    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    pub fn key(&self) -> FlowKey {
        FlowKey::new(self.src, self.sport, self.dst, self.dport, self.proto)
    }

    /// The L4 segment (header + payload) with a valid checksum.
    pub fn segment(&self) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&self.sport.to_be_bytes());
        s.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == PROTO_TCP {
            s.extend_from_slice(&self.seq.to_be_bytes());
            s.extend_from_slice(&self.ack.to_be_bytes());
            s.extend_from_slice(&[0x50, self.tcp_flags, 0xff, 0xff, 0, 0, 0, 0]);
        } else {
            s.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            s.extend_from_slice(&[0, 0]);
        }
        s.extend_from_slice(&self.payload);
        let off = if self.proto == PROTO_TCP { 16 } else { 6 };
        if !(self.proto == PROTO_UDP && self.udp_zero_csum) {
            let c = csum::l4_checksum(&ip_bytes(self.src), &ip_bytes(self.dst), self.proto, &s);
            s[off..off + 2].copy_from_slice(&c.to_ne_bytes());
        }
        s
    }

    pub fn build(&self) -> Vec<u8> {
        self.build_with_l4(&self.segment())
    }

    /// Ethernet + IP around `l4` bytes (which may be a fragment of a segment).
    pub fn build_with_l4(&self, l4: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&NODE_MAC);
        p.extend_from_slice(&CLIENT_MAC);
        if let Some(tag) = self.vlan {
            p.extend_from_slice(&[0x81, 0x00]);
            p.extend_from_slice(&tag.to_be_bytes());
        }
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                p.extend_from_slice(&[0x08, 0x00]);
                let ihl = 5 + self.ip_options.len() / 4;
                let mut h = vec![0x40 | ihl as u8, 0];
                h.extend_from_slice(&((ihl * 4 + l4.len()) as u16).to_be_bytes());
                h.extend_from_slice(&self.ip_id.to_be_bytes());
                h.extend_from_slice(&self.frag.to_be_bytes());
                h.extend_from_slice(&[64, self.proto, 0, 0]);
                h.extend_from_slice(&s.octets());
                h.extend_from_slice(&d.octets());
                h.extend_from_slice(&self.ip_options);
                let c = csum::checksum(&h);
                h[10..12].copy_from_slice(&c.to_ne_bytes());
                p.extend_from_slice(&h);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                p.extend_from_slice(&[0x86, 0xdd]);
                p.extend_from_slice(&[0x60, 0, 0, 0]);
                p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                p.extend_from_slice(&[self.proto, 64]);
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
            }
            _ => panic!("mixed families"),
        }
        p.extend_from_slice(l4);
        p
    }
}

pub fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

/// What an output packet says, after checking every checksum in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// ICMP type/code for ICMP and ICMPv6.
    pub icmp: Option<(u8, u8)>,
    /// The L4 bytes (segment or ICMP message).
    pub l4: Vec<u8>,
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
}

/// Parses an output frame and asserts that its IP, TCP/UDP or ICMP checksums are right.
pub fn inspect(p: &[u8]) -> Seen {
    let mut off = 12;
    let mut et = u16::from_be_bytes([p[12], p[13]]);
    if et == 0x8100 {
        et = u16::from_be_bytes([p[16], p[17]]);
        off = 16;
    }
    let l3 = off + 2;
    let eth_dst: [u8; 6] = p[0..6].try_into().unwrap();
    let eth_src: [u8; 6] = p[6..12].try_into().unwrap();
    let mut fragment = false;
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, &[u8]) = if et == 0x0800 {
        fragment = u16::from_be_bytes([p[l3 + 6], p[l3 + 7]]) & 0x3fff != 0;
        let ihl = (p[l3] & 0xf) as usize * 4;
        assert_eq!(csum::checksum(&p[l3..l3 + ihl]), 0, "IPv4 header checksum");
        let total = u16::from_be_bytes([p[l3 + 2], p[l3 + 3]]) as usize;
        assert_eq!(total, p.len() - l3, "IPv4 total length matches the frame");
        let s: [u8; 4] = p[l3 + 12..l3 + 16].try_into().unwrap();
        let d: [u8; 4] = p[l3 + 16..l3 + 20].try_into().unwrap();
        (IpAddr::from(s), IpAddr::from(d), p[l3 + 9], &p[l3 + ihl..])
    } else {
        assert_eq!(et, 0x86dd);
        let plen = u16::from_be_bytes([p[l3 + 4], p[l3 + 5]]) as usize;
        assert_eq!(plen, p.len() - l3 - 40, "IPv6 payload length matches the frame");
        let s: [u8; 16] = p[l3 + 8..l3 + 24].try_into().unwrap();
        let d: [u8; 16] = p[l3 + 24..l3 + 40].try_into().unwrap();
        if p[l3 + 6] == 44 {
            // A fragment header: the protocol is behind it; a later fragment has no L4 header.
            fragment = true;
            let later = u16::from_be_bytes([p[l3 + 42], p[l3 + 43]]) >> 3 != 0;
            let l4 = if later { &[][..] } else { &p[l3 + 48..] };
            (IpAddr::from(s), IpAddr::from(d), p[l3 + 40], l4)
        } else {
            (IpAddr::from(s), IpAddr::from(d), p[l3 + 6], &p[l3 + 40..])
        }
    };
    let mut seen = Seen {
        src,
        dst,
        proto,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        seq: 0,
        ack: 0,
        icmp: None,
        l4: l4.to_vec(),
        eth_dst,
        eth_src,
    };
    match proto {
        PROTO_TCP | PROTO_UDP if fragment && l4.len() < 8 => {}
        PROTO_TCP | PROTO_UDP => {
            seen.sport = u16::from_be_bytes([l4[0], l4[1]]);
            seen.dport = u16::from_be_bytes([l4[2], l4[3]]);
            let coff = if proto == PROTO_TCP { 16 } else { 6 };
            let stored = u16::from_ne_bytes([l4[coff], l4[coff + 1]]);
            // A fragment's checksum covers the whole datagram: checked by the caller.
            let no_checksum = proto == PROTO_UDP && stored == 0 && src.is_ipv4();
            if !fragment && !no_checksum {
                let mut z = l4.to_vec();
                z[coff] = 0;
                z[coff + 1] = 0;
                let want = csum::l4_checksum(&ip_bytes(src), &ip_bytes(dst), proto, &z);
                assert_eq!(stored, want, "L4 checksum");
            }
            if proto == PROTO_TCP {
                seen.seq = u32::from_be_bytes(l4[4..8].try_into().unwrap());
                seen.ack = u32::from_be_bytes(l4[8..12].try_into().unwrap());
                seen.tcp_flags = l4[13];
            }
        }
        1 => {
            assert_eq!(csum::checksum(l4), 0, "ICMP checksum");
            seen.icmp = Some((l4[0], l4[1]));
        }
        58 => {
            let mut z = l4.to_vec();
            z[2] = 0;
            z[3] = 0;
            let want = csum::l4_checksum(&ip_bytes(src), &ip_bytes(dst), 58, &z);
            assert_eq!(u16::from_ne_bytes([l4[2], l4[3]]), want, "ICMPv6 checksum");
            seen.icmp = Some((l4[0], l4[1]));
        }
        _ => {}
    }
    seen
}
