//! Why the datapath did what it did to a packet. One enum, used as the index of the
//! per-reason counters, so the agent and `lb stats` name exactly what the program counted.

/// The reason behind every verdict. `repr(u32)`: the value is the counter index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed untouched.
    NotIp = 0,
    /// IP but neither TCP nor UDP: passed untouched.
    NotTcpUdp = 1,
    /// TCP/UDP to an address:port that is no frontend: passed untouched.
    NoFrontend = 2,
    /// New flow translated to a backend.
    NewFlow = 3,
    /// Packet of a known flow translated (flow table hit).
    FlowHit = 4,
    /// Reply from a backend translated back to the frontend address.
    Reply = 5,
    /// Frontend without usable backend: TCP RST / ICMP port unreachable sent back.
    RejectNoBackend = 6,
    /// Frontend without usable backend, configured or required to drop.
    DropNoBackend = 7,
    /// Ethernet header cut short: dropped.
    TruncatedEth = 8,
    /// IPv4/IPv6 header invalid (IHL < 5, bad version, total length below the header) in a
    /// packet to a ClusterIP: dropped. (To any other address: `MalformedPassed`.)
    MalformedIp = 9,
    /// TCP/UDP header cut short in a packet for a frontend: dropped.
    TruncatedL4 = 10,
    /// Non-first IPv4 fragment of a translated datagram: translated like its first fragment.
    FragmentFollowed = 11,
    /// Non-first IPv4 fragment whose first fragment was not seen (or not ours): passed.
    FragmentUnknown = 12,
    /// IPv6 with extension headers (fragments included): passed untouched, not translated.
    Ipv6ExtHeader = 13,
    /// A map update failed (flow table full of pinned entries...): packet dropped.
    MapError = 14,
    /// Backend id from the Maglev table had no backend entry (should never happen): dropped.
    BackendMissing = 15,
    /// Reject could not be built (packet too short to quote): dropped instead.
    RejectFailed = 16,
    /// Source outside the service's `loadBalancerSourceRanges`: dropped.
    SourceRangeDenied = 17,
    /// A ClusterIP on a port it does not serve: rejected like a closed port.
    RejectUnknownPort = 18,
    /// A flow needing source NAT found no free port (or no node address): dropped.
    SnatFailed = 19,
    /// A TCP RST for no known flow: dropped; it creates nothing.
    NoFlowRst = 20,
    /// A TCP segment other than SYN or RST for no known flow to a frontend (its flow ended
    /// or was never seen): answered with a RST, creates nothing.
    RejectNoFlow = 21,
    /// A new flow found no room in the flow table: dropped (established flows are never
    /// pushed out; the client retries its SYN).
    FlowTableFull = 22,
    /// A direct connection's reply tuple clashed with a live Service flow: its source port
    /// was rewritten (as netfilter does) and the flow recorded.
    PortClash = 23,
    /// A malformed IP header or a cut-short TCP/UDP header in a packet that is not for a
    /// frontend: passed untouched (the stack decides, as without us).
    MalformedPassed = 24,
    /// An IPv6 packet with an IPv4-mapped address (`::ffff:a.b.c.d`, never valid on the
    /// wire): passed untouched, never matched against IPv4 state.
    V4MappedV6 = 25,
    /// A TCP RST or ICMP answer over the answer rate (`--answer-rate`): dropped instead.
    AnswerRateLimited = 26,
    /// Writing the translation into the packet failed (a load, store or bound): dropped.
    RewriteFailed = 27,
    /// A checksum helper refused the update: dropped.
    ChecksumFailed = 28,
    /// Making room for (or trimming) an answer failed: dropped instead of answered.
    AdjustRoomFailed = 29,
    /// A packet from a pod interface that would create or change flow state under a source
    /// address the kernel does not route back to that interface: dropped.
    SpoofedSource = 30,
    /// A socket in the node's own network namespace connected (or sent a UDP datagram) to a
    /// frontend: pointed at a backend at connect time, its packets need no translation.
    HostConnect = 31,
    /// The same to a frontend with no usable backend, or to a ClusterIP port it does not
    /// serve: the call failed with ECONNREFUSED.
    HostRefused = 32,
    /// A translated packet too big for its route (IPv4 with DF, or IPv6): answered with ICMP
    /// fragmentation needed / packet too big quoting it as it arrived (`pmtu`), so the
    /// sender lowers its segment size instead of the path black-holing.
    FragNeeded = 33,
    /// An ICMP/ICMPv6 error about one of our flows (its quote is a packet we translated):
    /// translated back, outer destination and quote, for the sender to see (`related`).
    IcmpRelated = 34,
}

impl Reason {
    pub const COUNT: u32 = 35;

    /// Every reason, in counter order.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::NotIp,
        Reason::NotTcpUdp,
        Reason::NoFrontend,
        Reason::NewFlow,
        Reason::FlowHit,
        Reason::Reply,
        Reason::RejectNoBackend,
        Reason::DropNoBackend,
        Reason::TruncatedEth,
        Reason::MalformedIp,
        Reason::TruncatedL4,
        Reason::FragmentFollowed,
        Reason::FragmentUnknown,
        Reason::Ipv6ExtHeader,
        Reason::MapError,
        Reason::BackendMissing,
        Reason::RejectFailed,
        Reason::SourceRangeDenied,
        Reason::RejectUnknownPort,
        Reason::SnatFailed,
        Reason::NoFlowRst,
        Reason::RejectNoFlow,
        Reason::FlowTableFull,
        Reason::PortClash,
        Reason::MalformedPassed,
        Reason::V4MappedV6,
        Reason::AnswerRateLimited,
        Reason::RewriteFailed,
        Reason::ChecksumFailed,
        Reason::AdjustRoomFailed,
        Reason::SpoofedSource,
        Reason::HostConnect,
        Reason::HostRefused,
        Reason::FragNeeded,
        Reason::IcmpRelated,
    ];

    /// Stable snake_case name used in metrics labels and CLI output.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::NotIp => "not_ip",
            Reason::NotTcpUdp => "not_tcp_udp",
            Reason::NoFrontend => "no_frontend",
            Reason::NewFlow => "new_flow",
            Reason::FlowHit => "flow_hit",
            Reason::Reply => "reply",
            Reason::RejectNoBackend => "reject_no_backend",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::TruncatedEth => "truncated_eth",
            Reason::MalformedIp => "malformed_ip",
            Reason::TruncatedL4 => "truncated_l4",
            Reason::FragmentFollowed => "fragment_followed",
            Reason::FragmentUnknown => "fragment_unknown",
            Reason::Ipv6ExtHeader => "ipv6_ext_header",
            Reason::MapError => "map_error",
            Reason::BackendMissing => "backend_missing",
            Reason::RejectFailed => "reject_failed",
            Reason::SourceRangeDenied => "source_range_denied",
            Reason::RejectUnknownPort => "reject_unknown_port",
            Reason::SnatFailed => "snat_failed",
            Reason::NoFlowRst => "no_flow_rst",
            Reason::RejectNoFlow => "reject_no_flow",
            Reason::FlowTableFull => "flow_table_full",
            Reason::PortClash => "port_clash",
            Reason::MalformedPassed => "malformed_passed",
            Reason::V4MappedV6 => "v4_mapped_v6",
            Reason::AnswerRateLimited => "answer_rate_limited",
            Reason::RewriteFailed => "rewrite_failed",
            Reason::ChecksumFailed => "checksum_failed",
            Reason::AdjustRoomFailed => "adjust_room_failed",
            Reason::SpoofedSource => "spoofed_source",
            Reason::HostConnect => "host_connect",
            Reason::HostRefused => "host_refused",
            Reason::FragNeeded => "frag_needed",
            Reason::IcmpRelated => "icmp_related",
        }
    }
}

impl Reason {
    /// The reason with counter index `v` (`MapError` for an unknown index).
    pub const fn from_u32(v: u32) -> Reason {
        match v {
            0 => Reason::NotIp,
            1 => Reason::NotTcpUdp,
            2 => Reason::NoFrontend,
            3 => Reason::NewFlow,
            4 => Reason::FlowHit,
            5 => Reason::Reply,
            6 => Reason::RejectNoBackend,
            7 => Reason::DropNoBackend,
            8 => Reason::TruncatedEth,
            9 => Reason::MalformedIp,
            10 => Reason::TruncatedL4,
            11 => Reason::FragmentFollowed,
            12 => Reason::FragmentUnknown,
            13 => Reason::Ipv6ExtHeader,
            14 => Reason::MapError,
            15 => Reason::BackendMissing,
            16 => Reason::RejectFailed,
            17 => Reason::SourceRangeDenied,
            18 => Reason::RejectUnknownPort,
            19 => Reason::SnatFailed,
            20 => Reason::NoFlowRst,
            21 => Reason::RejectNoFlow,
            22 => Reason::FlowTableFull,
            23 => Reason::PortClash,
            24 => Reason::MalformedPassed,
            25 => Reason::V4MappedV6,
            26 => Reason::AnswerRateLimited,
            27 => Reason::RewriteFailed,
            28 => Reason::ChecksumFailed,
            29 => Reason::AdjustRoomFailed,
            30 => Reason::SpoofedSource,
            31 => Reason::HostConnect,
            32 => Reason::HostRefused,
            33 => Reason::FragNeeded,
            34 => Reason::IcmpRelated,
            _ => Reason::MapError,
        }
    }
}

/// What happens to the packet; each program maps it to its own return code in one place.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Continue into the kernel stack (possibly rewritten).
    Pass,
    /// Drop.
    Drop,
    /// Send the (rewritten) packet back out of the interface it came in on.
    Bounce,
}

/// An action and its reason packed in one scalar: BPF subprograms cannot return structs.
pub const fn pack(action: Action, reason: Reason) -> u32 {
    (action as u32) << 16 | reason as u32
}

pub const fn unpack(v: u32) -> (Action, Reason) {
    let action = match v >> 16 {
        0 => Action::Pass,
        1 => Action::Drop,
        _ => Action::Bounce,
    };
    (action, Reason::from_u32(v & 0xffff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_counter_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{}", r.name());
            assert_eq!(Reason::from_u32(i as u32), *r);
        }
    }

    #[test]
    fn pack_round_trips() {
        for a in [Action::Pass, Action::Drop, Action::Bounce] {
            for r in Reason::ALL {
                assert_eq!(unpack(pack(a, r)), (a, r));
            }
        }
    }
}
