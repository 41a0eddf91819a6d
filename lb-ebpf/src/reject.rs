//! Answers for a frontend with no usable backend, like kube-proxy's REJECT: a TCP RST, or an
//! ICMP / ICMPv6 port unreachable quoting the offending datagram. The packet is turned into
//! the answer in place and sent back where it came from.
//!
//! Layout of the ICMP answer, the same for both hooks (only "make room" differs):
//! `[link header][new IP header][ICMP header][original IP header][first 8 bytes of L4]`.

use lb_common::{abi::PROTO_TCP, csum, verdict::Reason};

use crate::{
    conntrack,
    maps::ANSWER_BUCKET,
    nat::Packet,
    parse::{Headers, Ipv4Hdr, Ipv6Hdr, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, TcpHdr, ptr_at, read},
    select,
};

/// Building the answer failed (a bound, or a RST that must not be answered).
const FAIL: Reason = Reason::RejectFailed;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

/// Whether this CPU may send one more answer now (`Config::answer_cost_ns`: like the
/// kernel's `icmp_msgs_per_sec` and `icmp_msgs_burst`, so that spoofed sources cannot turn
/// the datapath into a reflector at line rate), taking it if so.
#[inline(always)]
pub fn answer_allowed() -> bool {
    let Some(c) = select::config_ref() else { return true };
    let (cost, cap) = (c.answer_cost_ns, c.answer_cap_ns);
    if cost == 0 {
        return true;
    }
    let Some(b) = ANSWER_BUCKET.get_ptr_mut(0) else { return true };
    // SAFETY: this CPU's slot, used by this packet only.
    unsafe { (*b).take(conntrack::now(), cost, cap) }
}

/// Turns the packet into its rejection. `Err`: why not; the caller drops it instead.
#[inline(always)]
pub fn reject<P: Packet>(pkt: &mut P, h: &Headers) -> Result<(), Reason> {
    if h.proto == PROTO_TCP { tcp_rst(pkt, h) } else { port_unreachable(pkt, h) }
}

#[inline(always)]
fn write<T>(data: usize, end: usize, off: usize, v: T) -> Result<(), Reason> {
    let p = ptr_at::<T>(data, end, off).ok_or(FAIL)?;
    // SAFETY: bounds-checked pointer into the packet.
    unsafe { p.write_unaligned(v) };
    Ok(())
}

/// One's-complement sum of a header built on the stack.
#[inline(always)]
fn sum_struct<T>(v: &T) -> u32 {
    let words = core::mem::size_of::<T>() / 2;
    let p = v as *const T as *const u16;
    let mut acc = 0u32;
    let mut i = 0;
    while i < words {
        // SAFETY: i < size_of::<T>() / 2, inside `v`.
        acc += unsafe { p.add(i).read_unaligned() } as u32;
        i += 1;
    }
    acc
}

/// Pseudo-header sum (the same word contributions for IPv4 and IPv6, see RFC 2460 §8.1).
#[inline(always)]
fn pseudo_sum(src: &[u32; 4], dst: &[u32; 4], v6: bool, proto: u8, len: u16) -> u32 {
    let mut acc = (proto as u16).to_be() as u32 + len.to_be() as u32;
    if v6 {
        let mut i = 0;
        while i < 4 {
            acc = csum::add32(acc, src[i]);
            acc = csum::add32(acc, dst[i]);
            i += 1;
        }
    } else {
        acc = csum::add32(acc, src[3]);
        acc = csum::add32(acc, dst[3]);
    }
    acc
}

/// Sums `len` bytes (a multiple of 4, at most 80) of the packet from `off`.
#[inline(always)]
fn sum_packet(data: usize, end: usize, off: usize, len: usize) -> Result<u32, Reason> {
    let mut acc = 0u32;
    let mut i = 0;
    while i < 20 {
        if i * 4 >= len {
            break;
        }
        let w: u32 = read(data, end, off + i * 4).ok_or(FAIL)?;
        acc = csum::add32(acc, w);
        i += 1;
    }
    Ok(acc)
}

/// Reshapes the packet for an ICMP answer: `room` bytes (the new IP and ICMP headers) right
/// after the `l2`-byte link header, then the first `quote` bytes of the original IP packet.
#[inline(always)]
fn make_room<P: Packet>(pkt: &mut P, l2: usize, room: usize, quote: usize) -> Result<(), Reason> {
    if pkt.gso_size() != 0 {
        // A GSO packet (TC) is cut first, which makes it a plain one: the kernel grows only
        // GSO packets whose type it knows how to resegment.
        pkt.truncate((l2 + room + quote) as u32)?;
    }
    pkt.grow_after_l2(l2, room as u32)?;
    pkt.truncate((l2 + room + quote) as u32)
}

#[inline(always)]
fn swap_macs(data: usize, end: usize) -> Result<(), Reason> {
    let dst: [u8; 6] = read(data, end, 0).ok_or(FAIL)?;
    let src: [u8; 6] = read(data, end, 6).ok_or(FAIL)?;
    write(data, end, 0, src)?;
    write(data, end, 6, dst)
}

#[inline(always)]
fn tcp_rst<P: Packet>(pkt: &mut P, h: &Headers) -> Result<(), Reason> {
    if h.tcp_flags & TCP_RST != 0 {
        return Err(FAIL); // never answer a RST
    }
    let (data, end) = (pkt.data(), pkt.data_end());
    let t: TcpHdr = read(data, end, h.l4_off).ok_or(FAIL)?;
    let (seq, ack) = (u32::from_be(t.seq), u32::from_be(t.ack));
    let doff = ((t.doff >> 4) as u32) * 4;
    let l3_len = (h.l4_off - h.l3_off) as u32;
    let (ip_payload, v4) = if h.v6 {
        let ip: Ipv6Hdr = read(data, end, h.l3_off).ok_or(FAIL)?;
        (u16::from_be(ip.payload_len) as u32, None)
    } else {
        let ip: Ipv4Hdr = read(data, end, h.l3_off).ok_or(FAIL)?;
        ((u16::from_be(ip.tot_len) as u32).saturating_sub(l3_len), Some(ip))
    };
    let seg_len = ip_payload.saturating_sub(doff)
        + (h.tcp_flags & TCP_SYN != 0) as u32
        + (h.tcp_flags & TCP_FIN != 0) as u32;

    pkt.truncate((h.l4_off + 20) as u32)?;
    let (data, end) = (pkt.data(), pkt.data_end());
    swap_macs(data, end)?;

    match v4 {
        None => {
            let ip = Ipv6Hdr {
                vtc_flow: 0x6000_0000u32.to_be(),
                payload_len: 20u16.to_be(),
                next: PROTO_TCP,
                hop: 64,
                src: h.dst,
                dst: h.src,
            };
            write(data, end, h.l3_off, ip)?;
        }
        Some(orig) => {
            // Keep the original IHL (options stay); new length, addresses and checksum.
            let ip = Ipv4Hdr {
                vihl: orig.vihl,
                tos: 0,
                tot_len: ((l3_len + 20) as u16).to_be(),
                id: 0,
                frag: 0,
                ttl: 64,
                proto: PROTO_TCP,
                csum: 0,
                src: h.dst[3],
                dst: h.src[3],
            };
            write(data, end, h.l3_off, ip)?;
            let sum = sum_packet(data, end, h.l3_off, l3_len as usize)?;
            write(data, end, h.l3_off + 10, !csum::fold(sum))?;
        }
    }

    let (rseq, rack, rflags) = if h.tcp_flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        (0, seq.wrapping_add(seg_len), TCP_RST | TCP_ACK)
    };
    let mut tcp = TcpHdr {
        sport: h.dport,
        dport: h.sport,
        seq: rseq.to_be(),
        ack: rack.to_be(),
        doff: 0x50,
        flags: rflags,
        window: 0,
        csum: 0,
        urg: 0,
    };
    let sum = pseudo_sum(&h.dst, &h.src, h.v6, PROTO_TCP, 20) + sum_struct(&tcp);
    tcp.csum = !csum::fold(sum);
    write(data, end, h.l4_off, tcp)
}

#[inline(always)]
fn port_unreachable<P: Packet>(pkt: &mut P, h: &Headers) -> Result<(), Reason> {
    let l2 = h.l3_off;
    let quote = h.l4_off - h.l3_off + 8; // original IP header + 8 bytes of UDP
    let room: usize = if h.v6 { 40 + 8 } else { 20 + 8 };
    make_room(pkt, l2, room, quote)?;
    let (data, end) = (pkt.data(), pkt.data_end());
    swap_macs(data, end)?;
    let icmp_off = l2 + room - 8;
    let icmp_len = 8 + quote;
    if h.v6 {
        let ip = Ipv6Hdr {
            vtc_flow: 0x6000_0000u32.to_be(),
            payload_len: (icmp_len as u16).to_be(),
            next: IPPROTO_ICMPV6,
            hop: 64,
            src: h.dst,
            dst: h.src,
        };
        write(data, end, l2, ip)?;
        // Type 1 (destination unreachable), code 4 (port unreachable).
        write(data, end, icmp_off, [1u8, 4, 0, 0, 0, 0, 0, 0])?;
        let sum = pseudo_sum(&h.dst, &h.src, true, IPPROTO_ICMPV6, icmp_len as u16)
            + sum_packet(data, end, icmp_off, icmp_len)?;
        write(data, end, icmp_off + 2, !csum::fold(sum))
    } else {
        let mut ip = Ipv4Hdr {
            vihl: 0x45,
            tos: 0,
            tot_len: ((20 + icmp_len) as u16).to_be(),
            id: 0,
            frag: 0,
            ttl: 64,
            proto: IPPROTO_ICMP,
            csum: 0,
            src: h.dst[3],
            dst: h.src[3],
        };
        ip.csum = !csum::fold(sum_struct(&ip));
        write(data, end, l2, ip)?;
        // Type 3 (destination unreachable), code 3 (port unreachable).
        write(data, end, icmp_off, [3u8, 3, 0, 0, 0, 0, 0, 0])?;
        let sum = sum_packet(data, end, icmp_off, icmp_len)?;
        write(data, end, icmp_off + 2, !csum::fold(sum))
    }
}

/// Turns the already translated packet into an ICMP "fragmentation needed" (IPv4) / ICMPv6
/// "packet too big" naming `mtu` (`pmtu`), laid out as `port_unreachable`'s answer, quoting
/// the packet as it arrived: the quote's addresses and ports are put back from `h`. (Its own
/// function, not a variant of `port_unreachable`: the TC program's refuse path has no stack
/// left for the generality.)
#[inline(always)]
pub fn too_big<P: Packet>(pkt: &mut P, h: &Headers, mtu: u16) -> Result<(), Reason> {
    let l2 = h.l3_off;
    let l3_len = h.l4_off - h.l3_off;
    let quote = l3_len + 8;
    let room: usize = if h.v6 { 40 + 8 } else { 20 + 8 };
    make_room(pkt, l2, room, quote)?;
    let (data, end) = (pkt.data(), pkt.data_end());
    swap_macs(data, end)?;
    let icmp_off = l2 + room - 8;
    let icmp_len = 8 + quote;
    // The quote as it arrived.
    let q = l2 + room;
    if h.v6 {
        write(data, end, q + 8, h.src)?;
        write(data, end, q + 24, h.dst)?;
    } else {
        write(data, end, q + 12, h.src[3])?;
        write(data, end, q + 16, h.dst[3])?;
        write(data, end, q + 10, 0u16)?;
        let sum = sum_packet(data, end, q, l3_len)?;
        write(data, end, q + 10, !csum::fold(sum))?;
    }
    write(data, end, q + l3_len, h.sport)?;
    write(data, end, q + l3_len + 2, h.dport)?;
    let info = (mtu as u32).to_be();
    if h.v6 {
        let ip = Ipv6Hdr {
            vtc_flow: 0x6000_0000u32.to_be(),
            payload_len: (icmp_len as u16).to_be(),
            next: IPPROTO_ICMPV6,
            hop: 64,
            src: h.dst,
            dst: h.src,
        };
        write(data, end, l2, ip)?;
        // Type 2 (packet too big), code 0, the MTU as 32 bits.
        write(data, end, icmp_off, [2u8, 0, 0, 0])?;
        write(data, end, icmp_off + 4, info)?;
        let sum = pseudo_sum(&h.dst, &h.src, true, IPPROTO_ICMPV6, icmp_len as u16)
            + sum_packet(data, end, icmp_off, icmp_len)?;
        write(data, end, icmp_off + 2, !csum::fold(sum))
    } else {
        let mut ip = Ipv4Hdr {
            vihl: 0x45,
            tos: 0,
            tot_len: ((20 + icmp_len) as u16).to_be(),
            id: 0,
            frag: 0,
            ttl: 64,
            proto: IPPROTO_ICMP,
            csum: 0,
            src: h.dst[3],
            dst: h.src[3],
        };
        ip.csum = !csum::fold(sum_struct(&ip));
        write(data, end, l2, ip)?;
        // Type 3 (destination unreachable), code 4 (fragmentation needed), next-hop MTU
        // in the last 16 bits.
        write(data, end, icmp_off, [3u8, 4, 0, 0])?;
        write(data, end, icmp_off + 4, info)?;
        let sum = sum_packet(data, end, icmp_off, icmp_len)?;
        write(data, end, icmp_off + 2, !csum::fold(sum))
    }
}
