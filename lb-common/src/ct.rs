//! The flow life cycle, shared by the datapath (state updates, reclaiming a port from a dead
//! flow) and the agent's GC (which pairs to remove), so both judge a flow by one rule.
//!
//! Each direction's entry records what that direction carried (`CT_*`): the datapath sees
//! one direction per packet and never reads the other entry on the hot path. A flow's state
//! is the pair's: `pair_timeout` combines the two.
//!
//! TCP: a SYN opens a flow (`CT_NEW` forward); the client's first ACK establishes it; a FIN
//! marks its direction `CT_FIN`; a RST marks it `CT_CLOSED`. UDP: a datagram opens a flow;
//! a reply marks the reverse entry `CT_ESTABLISHED` (a "stream", with the longer timeout).

use crate::abi::{Config, CtTimeouts, FLOW_F_SNAT, FlowKey, FlowValue, PROTO_TCP};

/// Forward: SYN seen (TCP) / first datagram (UDP). Reverse: nothing carried yet.
pub const CT_NEW: u8 = 0;
/// This direction carried an ACK (TCP) or a datagram after the first (UDP).
pub const CT_ESTABLISHED: u8 = 1;
/// This direction sent a FIN.
pub const CT_FIN: u8 = 2;
/// A RST went this way.
pub const CT_CLOSED: u8 = 3;

/// `last_seen_ns` is refreshed at most this often (a write per packet would bounce the
/// entry's cache line between CPUs for nothing: timeouts are whole seconds).
pub const TOUCH_NS: u64 = 1_000_000_000;

pub const NS_PER_SEC: u64 = 1_000_000_000;

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The state of one direction after it carried a packet with `tcp_flags` (ignored for UDP).
#[inline(always)]
pub fn next_state(cur: u8, proto: u8, tcp_flags: u8) -> u8 {
    if proto != PROTO_TCP {
        return CT_ESTABLISHED;
    }
    if tcp_flags & TCP_RST != 0 || cur == CT_CLOSED {
        CT_CLOSED
    } else if tcp_flags & TCP_FIN != 0 || cur == CT_FIN {
        CT_FIN
    } else if tcp_flags & TCP_ACK != 0 {
        CT_ESTABLISHED
    } else {
        cur
    }
}

/// The flow is over for sure: a RST, or FINs both ways. Its source port may be reused at
/// once (as netfilter reuses a closed tuple), and a new SYN on its tuple opens a new flow.
#[inline(always)]
pub fn is_closed(proto: u8, fwd: u8, rev: u8) -> bool {
    proto == PROTO_TCP && (fwd == CT_CLOSED || rev == CT_CLOSED || (fwd == CT_FIN && rev == CT_FIN))
}

/// Zero (a config slot the agent has not written yet) means the default.
#[inline(always)]
fn or_default(v: u32, d: u32) -> u64 {
    (if v == 0 { d } else { v }) as u64
}

/// How long, in seconds, a pair in these states may stay idle.
#[inline(always)]
pub fn pair_timeout(proto: u8, fwd: u8, rev: u8, t: &CtTimeouts) -> u64 {
    // A constant: no 32-byte default struct on the BPF stack.
    const D: CtTimeouts = CtTimeouts::DEFAULT;
    if proto != PROTO_TCP {
        return if rev == CT_ESTABLISHED {
            or_default(t.udp_stream, D.udp_stream)
        } else {
            or_default(t.udp, D.udp)
        };
    }
    if fwd == CT_CLOSED || rev == CT_CLOSED {
        or_default(t.tcp_close, D.tcp_close)
    } else if fwd == CT_FIN && rev == CT_FIN {
        or_default(t.tcp_time_wait, D.tcp_time_wait)
    } else if fwd == CT_FIN || rev == CT_FIN {
        or_default(t.tcp_close_wait, D.tcp_close_wait)
    } else if fwd == CT_ESTABLISHED {
        or_default(t.tcp_established, D.tcp_established)
    } else {
        or_default(t.tcp_syn, D.tcp_syn)
    }
}

/// The name of a pair's state, as `lb conntrack list` and the metrics show it (the timeout
/// `pair_timeout` applies is the one of the same name).
pub fn state_name(proto: u8, fwd: u8, rev: u8) -> &'static str {
    if proto != PROTO_TCP {
        return if rev == CT_ESTABLISHED { "udp_stream" } else { "udp" };
    }
    if fwd == CT_CLOSED || rev == CT_CLOSED {
        "close"
    } else if fwd == CT_FIN && rev == CT_FIN {
        "time_wait"
    } else if fwd == CT_FIN || rev == CT_FIN {
        "close_wait"
    } else if fwd == CT_ESTABLISHED {
        "established"
    } else {
        "syn_sent"
    }
}

/// Whether a pair (either entry may be missing: an orphan is always expired) may be removed
/// at `now_ns`.
#[inline(always)]
pub fn expired(
    proto: u8,
    fwd: Option<&FlowValue>,
    rev: Option<&FlowValue>,
    t: &CtTimeouts,
    now_ns: u64,
) -> bool {
    let (Some(f), Some(r)) = (fwd, rev) else { return true };
    let last = if f.last_seen_ns > r.last_seen_ns { f.last_seen_ns } else { r.last_seen_ns };
    let idle = now_ns.saturating_sub(last);
    idle > pair_timeout(proto, f.state, r.state, t) * NS_PER_SEC
}

/// Whether the pair may be taken over by a new flow: closed, or expired.
#[inline(always)]
pub fn reclaimable(
    proto: u8,
    fwd: Option<&FlowValue>,
    rev: Option<&FlowValue>,
    t: &CtTimeouts,
    now: u64,
) -> bool {
    match (fwd, rev) {
        (Some(f), Some(r)) if is_closed(proto, f.state, r.state) => true,
        _ => expired(proto, fwd, rev, t, now),
    }
}

/// The key of the reply direction of forward flow `key` -> `v`: from the backend to the
/// client, or to the NAT address and port for a source-NATed flow.
#[inline(always)]
pub fn reverse_key(key: &FlowKey, v: &FlowValue) -> FlowKey {
    let snat = v.flags & FLOW_F_SNAT != 0;
    FlowKey {
        src: v.addr,
        dst: if snat { v.nat_addr } else { key.src },
        sport: v.port,
        dport: if snat { v.nat_port } else { key.sport },
        proto: key.proto,
        _pad: [0, 0, 0],
    }
}

/// Whether forward entry `key` -> `v` has `rkey` as its reply direction (compared field by
/// field: no key is built on the BPF stack).
#[inline(always)]
pub fn names_reverse(key: &FlowKey, v: &FlowValue, rkey: &FlowKey) -> bool {
    let snat = v.flags & FLOW_F_SNAT != 0;
    let (dst, dport) = if snat { (&v.nat_addr, v.nat_port) } else { (&key.src, key.sport) };
    rkey.src == v.addr
        && rkey.sport == v.port
        && rkey.dst == *dst
        && rkey.dport == dport
        && rkey.proto == key.proto
}

/// The key of the forward direction of reply entry `key` -> `v` (inverse of `reverse_key`).
#[inline(always)]
pub fn forward_key(key: &FlowKey, v: &FlowValue) -> FlowKey {
    let snat = v.flags & FLOW_F_SNAT != 0;
    FlowKey {
        src: if snat { v.nat_addr } else { key.dst },
        dst: v.addr,
        sport: if snat { v.nat_port } else { key.dport },
        dport: v.port,
        proto: key.proto,
        _pad: [0, 0, 0],
    }
}

/// The SNAT port range of `c` (`--snat-port-range`), or the default when unset or invalid.
#[inline(always)]
pub fn snat_ports(c: &Config) -> (u32, u32) {
    if c.snat_port_min == 0 || c.snat_port_max < c.snat_port_min {
        (crate::abi::DEFAULT_SNAT_PORT_MIN as u32, crate::abi::DEFAULT_SNAT_PORT_MAX as u32)
    } else {
        (c.snat_port_min as u32, c.snat_port_max as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{FLOW_FORWARD, FLOW_REPLY, PROTO_UDP};
    use std::net::IpAddr;

    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;

    #[test]
    fn tcp_walks_syn_established_fin_closed() {
        let mut s = CT_NEW;
        s = next_state(s, PROTO_TCP, SYN);
        assert_eq!(s, CT_NEW, "a SYN (or its retransmission) does not establish");
        s = next_state(s, PROTO_TCP, ACK);
        assert_eq!(s, CT_ESTABLISHED);
        s = next_state(s, PROTO_TCP, ACK | TCP_FIN);
        assert_eq!(s, CT_FIN);
        assert_eq!(next_state(s, PROTO_TCP, ACK), CT_FIN, "FIN sticks");
        assert_eq!(next_state(s, PROTO_TCP, TCP_RST), CT_CLOSED);
        assert_eq!(next_state(CT_CLOSED, PROTO_TCP, ACK), CT_CLOSED, "closed sticks");
        assert_eq!(next_state(CT_NEW, PROTO_UDP, 0), CT_ESTABLISHED);
    }

    #[test]
    fn timeouts_follow_the_pair_state() {
        let t = CtTimeouts::default();
        assert_eq!(pair_timeout(PROTO_TCP, CT_NEW, CT_NEW, &t), 60);
        assert_eq!(
            pair_timeout(PROTO_TCP, CT_NEW, CT_ESTABLISHED, &t),
            60,
            "SYN/ACK alone is not established"
        );
        assert_eq!(pair_timeout(PROTO_TCP, CT_ESTABLISHED, CT_ESTABLISHED, &t), 86_400);
        assert_eq!(pair_timeout(PROTO_TCP, CT_FIN, CT_ESTABLISHED, &t), 3_600);
        assert_eq!(pair_timeout(PROTO_TCP, CT_FIN, CT_FIN, &t), 10);
        assert_eq!(pair_timeout(PROTO_TCP, CT_ESTABLISHED, CT_CLOSED, &t), 10);
        assert_eq!(pair_timeout(PROTO_UDP, CT_NEW, CT_NEW, &t), 30);
        assert_eq!(pair_timeout(PROTO_UDP, CT_ESTABLISHED, CT_ESTABLISHED, &t), 120);
        let zero = CtTimeouts {
            tcp_syn: 0,
            tcp_established: 0,
            tcp_close_wait: 0,
            tcp_time_wait: 0,
            tcp_close: 0,
            udp: 0,
            udp_stream: 0,
            _pad: 0,
        };
        assert_eq!(pair_timeout(PROTO_TCP, CT_NEW, CT_NEW, &zero), 60, "unset means default");
    }

    #[test]
    fn expiry_uses_the_later_direction_and_orphans_expire() {
        let t = CtTimeouts::default();
        let f = FlowValue { state: CT_ESTABLISHED, last_seen_ns: 0, ..Default::default() };
        let r = FlowValue { state: CT_ESTABLISHED, last_seen_ns: 100 * NS_PER_SEC, ..Default::default() };
        let udp_t = CtTimeouts { udp_stream: 120, ..t };
        assert!(!expired(PROTO_UDP, Some(&f), Some(&r), &udp_t, 200 * NS_PER_SEC));
        assert!(expired(PROTO_UDP, Some(&f), Some(&r), &udp_t, 221 * NS_PER_SEC));
        assert!(expired(PROTO_TCP, None, Some(&r), &t, 0));
        let closed = FlowValue { state: CT_CLOSED, ..r };
        assert!(reclaimable(PROTO_TCP, Some(&f), Some(&closed), &t, 100 * NS_PER_SEC));
        assert!(!reclaimable(PROTO_TCP, Some(&f), Some(&r), &t, 100 * NS_PER_SEC));
    }

    #[test]
    fn forward_and_reverse_keys_are_inverse() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let key = FlowKey::new(ip("198.18.100.1"), 40000, ip("198.19.0.10"), 80, PROTO_TCP);
        let be = crate::abi::addr_from_ip(ip("198.18.1.1"));
        let plain =
            FlowValue { addr: be, port: 9376u16.to_be(), direction: FLOW_FORWARD, ..Default::default() };
        let rk = reverse_key(&key, &plain);
        assert!(names_reverse(&key, &plain, &rk));
        assert!(!names_reverse(&key, &plain, &FlowKey { sport: 1, ..rk }));
        assert_eq!(rk, FlowKey::new(ip("198.18.1.1"), 9376, ip("198.18.100.1"), 40000, PROTO_TCP));
        let rv = FlowValue { addr: key.dst, port: key.dport, direction: FLOW_REPLY, ..Default::default() };
        assert_eq!(forward_key(&rk, &rv), key);
        let node = crate::abi::addr_from_ip(ip("198.18.0.1"));
        let nat = FlowValue { flags: FLOW_F_SNAT, nat_addr: node, nat_port: 61000u16.to_be(), ..plain };
        let rk = reverse_key(&key, &nat);
        assert_eq!(rk, FlowKey::new(ip("198.18.1.1"), 9376, ip("198.18.0.1"), 61000, PROTO_TCP));
        let rv = FlowValue { flags: FLOW_F_SNAT, nat_addr: key.src, nat_port: key.sport, ..rv };
        assert_eq!(forward_key(&rk, &rv), key);
    }
}
