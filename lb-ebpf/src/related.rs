//! ICMP errors about translated flows, at both hooks: netfilter's RELATED translation. A router
//! (or a backend's node) that cannot deliver a packet we translated sends its error to that
//! packet's source — the node when it was source-NATed, the frontend address for a reply —
//! quoting it as translated, which no socket matches: clients never learn of an unreachable
//! port or a smaller path MTU behind a VIP. So an ICMP destination unreachable (packet too
//! big included) or time exceeded, IPv4 or IPv6, whose quoted TCP/UDP packet is one of our
//! flows (its reverse tuple is in the flow table) is turned back into the error about the
//! packet as its sender sent it: the quote's addresses and ports un-translated, the outer
//! destination set to that sender, every checksum updated (the quote's IP and TCP/UDP
//! checksums, the ICMP checksum, the outer IP header). Any other ICMP passes untouched.
//!
//! At XDP the errors come from the network (a router, another node's backend); at TC from
//! a local pod (a backend's closed port, a client's), entering through its interface.

use lb_common::{
    abi::*,
    csum,
    verdict::{Action, Reason, pack},
};

use crate::{
    conntrack,
    nat::Packet,
    parse::{Ipv4Hdr, Ipv6Hdr, load_addr, ptr_at, read, store_addr},
};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

/// Where the parts of an ICMP error sit, and what they say. Each header is read whole, once:
/// the verifier cannot follow LLVM when it merges per-field bounds checks.
struct Error {
    v6: bool,
    l3: usize,
    icmp: usize,
    inner: usize,
    inner_l4: usize,
    proto: u8,
    /// The outer (IPv4) header checksum.
    o_csum: u16,
    /// The ICMP checksum.
    icmp_csum: u16,
    /// The quote's (IPv4) header checksum, and first 8 bytes of TCP/UDP.
    q_csum: u16,
    q_l4: [u16; 4],
}

/// The addresses being worked on, in this CPU's scratch slot: on the stack they would not
/// fit under the XDP program's own frame.
#[repr(C)]
pub struct Work {
    /// The outer destination, and the quote's source and destination: as received, then
    /// as they become.
    pub o_dst: Addr,
    pub q_src: Addr,
    pub q_dst: Addr,
    pub n_src: Addr,
    pub n_dst: Addr,
}

#[inline(always)]
fn write<T>(data: usize, end: usize, off: usize, v: T) -> Option<()> {
    let p = ptr_at::<T>(data, end, off)?;
    // SAFETY: bounds-checked pointer into the packet.
    unsafe { p.write_unaligned(v) };
    Some(())
}

/// The ICMP error's layout, if the packet is one with a TCP/UDP quote.
#[inline(always)]
fn locate(data: usize, end: usize, w: &mut Work) -> Option<Error> {
    let mut l3 = 14;
    let eth: [u16; 9] = read(data, end, 0).unwrap_or([0; 9]);
    let mut et = eth[6];
    if et == 0x8100u16.to_be() || et == 0x88a8u16.to_be() {
        l3 = 18;
        et = eth[8];
    }
    if et == 0x0800u16.to_be() {
        let ip: Ipv4Hdr = read(data, end, l3)?;
        let ihl = ((ip.vihl & 0x0f) as usize) * 4;
        // A fragment of an error is not one to rewrite.
        if ip.proto != IPPROTO_ICMP || ihl < 20 || u16::from_be(ip.frag) & 0x3fff != 0 {
            return None;
        }
        let icmp = l3 + ihl;
        let hdr: [u8; 4] = read(data, end, icmp)?;
        if hdr[0] != 3 && hdr[0] != 11 {
            return None;
        }
        let inner = icmp + 8;
        let q: Ipv4Hdr = read(data, end, inner)?;
        let qihl = ((q.vihl & 0x0f) as usize) * 4;
        if q.vihl >> 4 != 4 || qihl < 20 || (q.proto != PROTO_TCP && q.proto != PROTO_UDP) {
            return None;
        }
        let inner_l4 = inner + qihl;
        let q_l4: [u16; 4] = read(data, end, inner_l4)?;
        w.o_dst = v4_mapped(ip.dst);
        w.q_src = v4_mapped(q.src);
        w.q_dst = v4_mapped(q.dst);
        Some(Error {
            v6: false,
            l3,
            icmp,
            inner,
            inner_l4,
            proto: q.proto,
            o_csum: ip.csum,
            icmp_csum: u16::from_ne_bytes([hdr[2], hdr[3]]),
            q_csum: q.csum,
            q_l4,
        })
    } else if et == 0x86ddu16.to_be() {
        let ip: Ipv6Hdr = read(data, end, l3)?;
        if ip.next != IPPROTO_ICMPV6 {
            return None;
        }
        let icmp = l3 + 40;
        let hdr: [u8; 4] = read(data, end, icmp)?;
        if hdr[0] != 1 && hdr[0] != 2 && hdr[0] != 3 {
            return None;
        }
        let inner = icmp + 8;
        // Version, class, flow, length, next header and hop limit; the addresses below.
        let q: [u8; 8] = read(data, end, inner)?;
        let next = q[6];
        if next != PROTO_TCP && next != PROTO_UDP {
            return None;
        }
        let inner_l4 = inner + 40;
        let q_l4: [u16; 4] = read(data, end, inner_l4)?;
        set(&mut w.o_dst, &ip.dst);
        read_addr(data, end, inner + 8, &mut w.q_src)?;
        read_addr(data, end, inner + 24, &mut w.q_dst)?;
        Some(Error {
            v6: true,
            l3,
            icmp,
            inner,
            inner_l4,
            proto: next,
            o_csum: 0,
            icmp_csum: u16::from_ne_bytes([hdr[2], hdr[3]]),
            q_csum: 0,
            q_l4,
        })
    } else {
        None
    }
}

/// Reads an IPv6 address from the packet into `to` (`parse::load_addr`).
#[inline(always)]
fn read_addr(data: usize, end: usize, off: usize, to: &mut Addr) -> Option<()> {
    let p = ptr_at::<Addr>(data, end, off)?;
    // SAFETY: bounds-checked above for all 16 bytes.
    *to = unsafe { load_addr(p) };
    Some(())
}

/// Writes an address into the packet (`parse::store_addr` for IPv6).
#[inline(always)]
fn write_addr(data: usize, end: usize, off: usize, v6: bool, a: &Addr) -> Option<()> {
    if v6 {
        let p = ptr_at::<Addr>(data, end, off)?;
        // SAFETY: bounds-checked above for all 16 bytes.
        unsafe { store_addr(p, a) };
        Some(())
    } else {
        // SAFETY: a valid reference; volatile, as `store_addr` reads.
        write(data, end, off, unsafe { core::ptr::read_volatile(&a[3]) })
    }
}

/// One's-complement sum of replacing `old` by `new` (RFC 1624), over the words that differ.
#[inline(always)]
fn diff_addr(acc: u32, old: &Addr, new: &Addr) -> u32 {
    let mut acc = acc;
    let mut i = 0;
    while i < 4 {
        acc = csum::add32(acc, !old[i]);
        acc = csum::add32(acc, new[i]);
        i += 1;
    }
    acc
}

/// `*dst = *src` between scratch fields: the read is volatile, or LLVM would make the copy
/// a `memmove` call (a byte loop on BPF; see `zero`).
#[inline(always)]
fn set(dst: &mut Addr, src: &Addr) {
    // SAFETY: a valid reference.
    *dst = unsafe { core::ptr::read_volatile(src) };
}

#[inline(always)]
fn diff16(acc: u32, old: u16, new: u16) -> u32 {
    acc + (!old) as u32 + new as u32
}

/// Translates an ICMP error about one of our flows back (see the module docs). Returns the
/// outcome packed: `(Pass, IcmpRelated)`, or `(Pass, NotTcpUdp)` for any other packet.
#[inline(never)]
pub fn translate<P: Packet>(pkt: &mut P) -> u32 {
    match try_translate(pkt) {
        Some(()) => pack(Action::Pass, Reason::IcmpRelated),
        None => pack(Action::Pass, Reason::NotTcpUdp),
    }
}

#[inline(always)]
fn try_translate<P: Packet>(pkt: &mut P) -> Option<()> {
    // The context itself, not its loaded fields: LLVM would otherwise pass `data_end` in a
    // register, zero-extended, which the verifier refuses (arithmetic on pkt_end).
    let pkt = core::hint::black_box(pkt);
    let (data, end) = (pkt.data(), pkt.data_end());
    let s = conntrack::scratch()?;
    // SAFETY: this CPU's scratch slot. An ICMP packet never reaches the flow steps that use
    // `key` and `a` (nor `reclaim`): they are this step's.
    let (w, rkey, v) = unsafe { (&mut (*s).related, &mut (*s).key, &mut (*s).a) };
    let e = locate(data, end, w)?;
    let (src_off, dst_off) = if e.v6 { (8, 24) } else { (12, 16) };
    // The quoted packet Q, as we sent it; its reverse is a tuple our flows translate, and
    // the entry says how.
    let (q_sport, q_dport) = (e.q_l4[0], e.q_l4[1]);
    set(&mut rkey.src, &w.q_dst);
    set(&mut rkey.dst, &w.q_src);
    rkey.sport = q_dport;
    rkey.dport = q_sport;
    rkey.proto = e.proto;
    rkey._pad = [0, 0, 0];
    conntrack::lookup(rkey, v)?;
    let snat = v.flags & FLOW_F_SNAT != 0;
    set(&mut w.n_src, &w.q_src);
    set(&mut w.n_dst, &w.q_dst);
    let (mut n_sport, mut n_dport) = (q_sport, q_dport);
    if v.direction == FLOW_REPLY {
        // Q was a forward packet: its destination back to the frontend, its source (when
        // source-NATed) back to the client.
        set(&mut w.n_dst, &v.addr);
        n_dport = v.port;
        if snat {
            set(&mut w.n_src, &v.nat_addr);
            n_sport = v.nat_port;
        }
    } else {
        // Q was a reply: its source back to the backend, its destination (when
        // source-NATed) back to the node's port.
        set(&mut w.n_src, &v.addr);
        n_sport = v.port;
        if snat {
            set(&mut w.n_dst, &v.nat_addr);
            n_dport = v.nat_port;
        }
    }
    // The error goes to whoever sent Q as it was before we translated it: the new source.

    // The ICMP checksum covers the quote (and for ICMPv6 the outer addresses too): every
    // change below is summed into it. All fields sit at even offsets from the ICMP header.
    let mut icmp_acc = 0u32;
    if !e.v6 {
        // The quote's IP header checksum.
        let old = e.q_csum;
        let new = csum::update_addr(csum::update_addr(old, &w.q_src, &w.n_src), &w.q_dst, &w.n_dst);
        write(data, end, e.inner + 10, new)?;
        icmp_acc = diff16(icmp_acc, old, new);
    }
    // The quote's TCP/UDP checksum, when the quote holds it (UDP's zero stays zero).
    let l4_csum = e.inner_l4 + if e.proto == PROTO_TCP { 16 } else { 6 };
    let old_l4 = if e.proto == PROTO_UDP { Some(e.q_l4[3]) } else { read::<u16>(data, end, l4_csum) };
    if let Some(old) = old_l4 {
        let udp = e.proto == PROTO_UDP;
        let c = csum::l4_rewrite(old, &w.q_src, &w.n_src, q_sport, n_sport, udp);
        let new = csum::l4_rewrite(c, &w.q_dst, &w.n_dst, q_dport, n_dport, udp);
        write(data, end, l4_csum, new)?;
        icmp_acc = diff16(icmp_acc, old, new);
    }
    write_addr(data, end, e.inner + src_off, e.v6, &w.n_src)?;
    write_addr(data, end, e.inner + dst_off, e.v6, &w.n_dst)?;
    write(data, end, e.inner_l4, n_sport)?;
    write(data, end, e.inner_l4 + 2, n_dport)?;
    icmp_acc = diff_addr(icmp_acc, &w.q_src, &w.n_src);
    icmp_acc = diff_addr(icmp_acc, &w.q_dst, &w.n_dst);
    icmp_acc = diff16(icmp_acc, q_sport, n_sport);
    icmp_acc = diff16(icmp_acc, q_dport, n_dport);
    write_addr(data, end, e.l3 + dst_off, e.v6, &w.n_src)?;
    if e.v6 {
        icmp_acc = diff_addr(icmp_acc, &w.o_dst, &w.n_src);
    } else {
        write(data, end, e.l3 + 10, csum::update_addr(e.o_csum, &w.o_dst, &w.n_src))?;
    }
    write(data, end, e.icmp + 2, !csum::fold(!e.icmp_csum as u32 + icmp_acc))
}
