//! Header parsing: Ethernet (one optional 802.1Q tag), IPv4 (any IHL), IPv6 (no extension
//! headers but a fragment header right after the fixed one), TCP and UDP. Every read is bounds-checked against `data_end`; the outcome for
//! a packet we cannot or must not handle is a verdict and a reason, never a fault. A
//! malformed packet still leaves in `Headers` what could be read of its destination (the
//! caller drops it only if it was for a frontend), and an IPv6 packet with an IPv4-mapped
//! address is never ours: it must not match IPv4 state.

use lb_common::{
    abi::{Addr, PROTO_TCP, PROTO_UDP, is_v4, v4_mapped},
    verdict::{Action, Reason},
};

/// A verdict with its reason: what to do and which counter says why.
pub type Outcome = (Action, Reason);

const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// Not a fragment, or the first fragment (carries the L4 header).
pub const FRAG_NONE: u8 = 0;
pub const FRAG_FIRST: u8 = 1;
/// A non-first fragment: no L4 header, follows the first fragment's translation.
pub const FRAG_LATER: u8 = 2;

/// IPv6 next-header value of the fragment header.
const IPV6_FRAGMENT: u8 = 44;

/// TCP flags we look at.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// IPv4 header without options.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag: u16,
    pub ttl: u8,
    pub proto: u8,
    pub csum: u16,
    pub src: u32,
    pub dst: u32,
}

/// The IPv6 fragment header (RFC 8200 §4.5).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6FragHdr {
    pub next: u8,
    pub _reserved: u8,
    /// Offset in 8-byte units (13 bits), two reserved bits, M (more fragments).
    pub offset_flags: u16,
    pub id: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    pub vtc_flow: u32,
    pub payload_len: u16,
    pub next: u8,
    pub hop: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

/// TCP header without options.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHdr {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub doff: u8,
    pub flags: u8,
    pub window: u16,
    pub csum: u16,
    pub urg: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub sport: u16,
    pub dport: u16,
    pub len: u16,
    pub csum: u16,
}

/// Where the headers are and what they say.
#[derive(Default)]
pub struct Headers {
    pub l3_off: usize,
    pub l4_off: usize,
    pub v6: bool,
    pub proto: u8,
    pub frag: u8,
    /// The fragment identification (raw): IPv4's 16 bits, or the IPv6 fragment header's 32.
    pub ip_id: u32,
    pub tcp_flags: u8,
    pub src: Addr,
    pub dst: Addr,
    /// Raw (network order).
    pub sport: u16,
    /// Raw (network order).
    pub dport: u16,
}

impl Headers {
    /// Offset of the TCP/UDP checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off + if self.proto == PROTO_TCP { 16 } else { 6 }
    }
}

/// A bounds-checked pointer to a `T` at `off` bytes into the packet.
#[inline(always)]
pub fn ptr_at<T>(data: usize, end: usize, off: usize) -> Option<*mut T> {
    let start = data + off;
    if start + core::mem::size_of::<T>() > end {
        return None;
    }
    Some(start as *mut T)
}

/// Reads a `T` at `off`, if it is inside the packet.
///
/// Whole headers are read with one bounds check each: the verifier does not follow LLVM
/// when it merges per-field checks. Plain (not byte-wise) loads: BPF on the JITs we run
/// allows unaligned packet access, and IP headers sit at offset 14.
#[inline(always)]
pub fn read<T: Copy>(data: usize, end: usize, off: usize) -> Option<T> {
    // SAFETY: bounds checked by ptr_at; packet memory is readable.
    ptr_at::<T>(data, end, off).map(|p| unsafe { p.read() })
}

/// Loads the IPv6 address at packet pointer `p`, a word at a time: a whole-array copy out of
/// the packet becomes a call to the byte-at-a-time `memmove` (see `zero`).
///
/// # Safety
/// 16 bounds-checked bytes at `p` (unaligned packet access: see `read`).
#[inline(always)]
pub unsafe fn load_addr(p: *const Addr) -> Addr {
    let w = p as *const u32;
    // SAFETY: the caller's 16 bytes.
    unsafe { [w.read(), w.add(1).read(), w.add(2).read(), w.add(3).read()] }
}

/// Stores `a` at packet pointer `p` a word at a time, each word read volatile (else LLVM
/// merges the four into a `memmove` call).
///
/// # Safety
/// 16 bounds-checked writable bytes at `p`.
#[inline(always)]
pub unsafe fn store_addr(p: *mut Addr, a: &Addr) {
    let w = p as *mut u32;
    // SAFETY: the caller's 16 bytes; `a` is a valid reference.
    unsafe {
        w.write(core::ptr::read_volatile(&a[0]));
        w.add(1).write(core::ptr::read_volatile(&a[1]));
        w.add(2).write(core::ptr::read_volatile(&a[2]));
        w.add(3).write(core::ptr::read_volatile(&a[3]));
    }
}

/// Parses the headers into `h` (in place: no copies of the struct on the BPF stack), or
/// returns the verdict for a packet that is not ours or is malformed.
#[inline(always)]
pub fn parse(data: usize, end: usize, h: &mut Headers) -> Result<(), Outcome> {
    const TRUNC_ETH: Outcome = (Action::Drop, Reason::TruncatedEth);

    let mut l3_off = ETH_LEN;
    let mut proto_be: u16 = read(data, end, 12).ok_or(TRUNC_ETH)?;
    if proto_be == ETH_P_8021Q.to_be() || proto_be == ETH_P_8021AD.to_be() {
        proto_be = read(data, end, 16).ok_or(TRUNC_ETH)?;
        l3_off = ETH_LEN + 4;
    }
    let ethertype = u16::from_be(proto_be);
    if ethertype == ETH_P_IP {
        parse_v4(data, end, l3_off, h)
    } else if ethertype == ETH_P_IPV6 {
        parse_v6(data, end, l3_off, h)
    } else {
        Err((Action::Pass, Reason::NotIp))
    }
}

const BAD_IP: Outcome = (Action::Drop, Reason::MalformedIp);

#[inline(always)]
fn parse_v4(data: usize, end: usize, l3: usize, h: &mut Headers) -> Result<(), Outcome> {
    let ip: Ipv4Hdr = read(data, end, l3).ok_or(BAD_IP)?;
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < 20 || data + l3 + ihl > end || (u16::from_be(ip.tot_len) as usize) < ihl {
        // Malformed: its destination still says whether it was for a frontend.
        h.dst = v4_mapped(ip.dst);
        return Err(BAD_IP);
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP {
        return Err((Action::Pass, Reason::NotTcpUdp));
    }
    let frag_field = u16::from_be(ip.frag);
    h.frag = if frag_field & 0x1fff != 0 {
        FRAG_LATER
    } else if frag_field & 0x2000 != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    };
    h.l3_off = l3;
    h.l4_off = l3 + ihl;
    h.v6 = false;
    h.proto = ip.proto;
    h.ip_id = ip.id as u32;
    h.src = v4_mapped(ip.src);
    h.dst = v4_mapped(ip.dst);
    if h.frag == FRAG_LATER {
        return Ok(());
    }
    parse_l4(data, end, h)
}

#[inline(always)]
fn parse_v6(data: usize, end: usize, l3: usize, h: &mut Headers) -> Result<(), Outcome> {
    let ip: Ipv6Hdr = read(data, end, l3).ok_or(BAD_IP)?;
    if (ip.vtc_flow as u8) >> 4 != 6 {
        // Malformed: its destination still says whether it was for a frontend.
        h.v6 = true;
        h.dst = ip.dst;
        return Err(BAD_IP);
    }
    if is_v4(&ip.src) || is_v4(&ip.dst) {
        return Err((Action::Pass, Reason::V4MappedV6));
    }
    let (mut proto, mut l4_off, mut frag, mut id) = (ip.next, l3 + 40, FRAG_NONE, 0);
    if ip.next == IPV6_FRAGMENT {
        // A fragment header right after the fixed one: its datagram follows its flow like an
        // IPv4 one. Anything behind it but TCP or UDP is an extension chain we leave alone.
        let Some(f) = read::<Ipv6FragHdr>(data, end, l3 + 40) else {
            h.v6 = true;
            h.dst = ip.dst;
            return Err(BAD_IP);
        };
        if f.next != PROTO_TCP && f.next != PROTO_UDP {
            return Err((Action::Pass, Reason::Ipv6ExtHeader));
        }
        let offset_flags = u16::from_be(f.offset_flags);
        frag = if offset_flags >> 3 != 0 {
            FRAG_LATER
        } else if offset_flags & 1 != 0 {
            FRAG_FIRST
        } else {
            // An atomic fragment (offset 0, no more): a whole datagram.
            FRAG_NONE
        };
        (proto, l4_off, id) = (f.next, l3 + 48, f.id);
    } else if ip.next != PROTO_TCP && ip.next != PROTO_UDP {
        // Hop-by-hop, routing, destination options: not translated (documented).
        let r = if matches!(ip.next, 0 | 43 | 60) { Reason::Ipv6ExtHeader } else { Reason::NotTcpUdp };
        return Err((Action::Pass, r));
    }
    h.l3_off = l3;
    h.l4_off = l4_off;
    h.v6 = true;
    h.proto = proto;
    h.frag = frag;
    h.ip_id = id;
    h.src = ip.src;
    h.dst = ip.dst;
    if frag == FRAG_LATER {
        return Ok(());
    }
    parse_l4(data, end, h)
}

/// Ports (and TCP flags); the whole fixed L4 header must be present, checksum included.
/// A cut-short header still leaves its ports, if present, to tell which frontend it was for.
#[inline(always)]
fn parse_l4(data: usize, end: usize, h: &mut Headers) -> Result<(), Outcome> {
    const TRUNC: Outcome = (Action::Drop, Reason::TruncatedL4);
    if h.proto == PROTO_TCP {
        if let Some(t) = read::<TcpHdr>(data, end, h.l4_off) {
            h.sport = t.sport;
            h.dport = t.dport;
            h.tcp_flags = t.flags;
            return Ok(());
        }
    } else if let Some(u) = read::<UdpHdr>(data, end, h.l4_off) {
        h.sport = u.sport;
        h.dport = u.dport;
        return Ok(());
    }
    // Cut short: the ports, if they are there, tell whether it was for a frontend.
    if let Some(ports) = read::<[u16; 2]>(data, end, h.l4_off) {
        h.sport = ports[0];
        h.dport = ports[1];
    }
    Err(TRUNC)
}
