//! The decision, shared by both hooks: parse, follow a known flow or pick a backend for a
//! new one, translate, or reject. Returns the verdict and its reason; the caller maps the
//! verdict to its hook's return code.

use lb_common::{
    abi::*,
    verdict::{Action, Reason, pack, unpack},
};

use crate::{
    conntrack,
    maps::SERVICES,
    nat::{Packet, Side, apply},
    parse::{FRAG_FIRST, FRAG_LATER, Headers, Outcome, TCP_ACK, TCP_SYN, parse},
    reject::reject,
    select, stats,
};

#[inline(always)]
pub fn process<P: Packet>(pkt: &mut P) -> Outcome {
    let bytes = pkt.len();
    let mut h = Headers::default();
    let out = match parse(pkt.data(), pkt.data_end(), &mut h) {
        Ok(()) => handle(pkt, &h, bytes),
        Err(out) => out,
    };
    stats::reason(out.1, bytes);
    out
}

/// Rewrites `side` to the flow's address (forward: destination to the backend; reply: source
/// back to the frontend) and, for a source-NATed flow, the other side too. Not inlined: the
/// checksum arithmetic spills registers, and in its own frame that stack is not added to
/// the new-flow path's.
#[inline(never)]
fn translate<P: Packet>(pkt: &mut P, h: &Headers, side: Side, v: &FlowValue, bytes: u32) -> Result<(), ()> {
    apply(pkt, h, side, &v.addr, v.port)?;
    if v.flags & FLOW_F_SNAT != 0 {
        apply(pkt, h, side.other(), &v.nat_addr, v.nat_port)?;
    } else if h.frag == FRAG_FIRST {
        // Later fragments follow with the one address rewrite (not offered to NATed flows:
        // those would need two).
        conntrack::remember_fragment(h, side, &v.addr, v.service_id);
    }
    stats::service(v.service_id, bytes);
    stats::backend(v.backend_id, bytes);
    Ok(())
}

#[inline(always)]
fn handle<P: Packet>(pkt: &mut P, h: &Headers, bytes: u32) -> Outcome {
    const MAP_ERR: Outcome = (Action::Drop, Reason::MapError);

    if h.frag == FRAG_LATER {
        return match conntrack::fragment(h) {
            Some(f) => {
                let side = if f.direction == FLOW_FORWARD { Side::Dst } else { Side::Src };
                if pkt.rewrite_v4_l3(h, side, f.addr).is_err() {
                    return MAP_ERR;
                }
                stats::service(f.service_id, bytes);
                (Action::Pass, Reason::FragmentFollowed)
            }
            None => (Action::Pass, Reason::FragmentUnknown),
        };
    }

    let key = conntrack::flow_key(h);
    if let Some(v) = conntrack::lookup(&key) {
        if v.direction == FLOW_REPLY {
            return match translate(pkt, h, Side::Src, v, bytes) {
                Ok(()) => (Action::Pass, Reason::Reply),
                Err(()) => MAP_ERR,
            };
        }
        // A flow keeps its backend across table changes while the backend lives. If it went
        // away: TCP segments of the open connection still go there (as with kube-proxy's
        // conntrack), but a UDP packet or a new SYN picks a live backend at once.
        let is_new_syn = h.proto == PROTO_TCP && h.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let reselect =
            (h.proto == PROTO_UDP || is_new_syn) && !select::still_backend(v.backend_id, &v.addr, v.port);
        if !reselect {
            return match translate(pkt, h, Side::Dst, v, bytes) {
                Ok(()) => (Action::Pass, Reason::FlowHit),
                Err(()) => MAP_ERR,
            };
        }
        conntrack::forget(&key);
    }

    let skey = ServiceKey { addr: h.dst, port: h.dport, proto: h.proto, _pad: 0 };
    // SAFETY: read in place; the agent replaces entries whole.
    let Some(svc) = (unsafe { SERVICES.get(&skey) }) else {
        if P::POD_FACING && is_cluster_ip(h) {
            return unpack(refuse(pkt, h, Reason::RejectUnknownPort));
        }
        if P::POD_FACING && h.proto == PROTO_TCP && h.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            // A new direct connection whose replies would match the reverse entry of an
            // old Service flow from the same client port: that flow is over (the client
            // reuses the port), and its entry would rewrite this connection's SYN/ACK.
            conntrack::forget_stale_reply(h);
        }
        return (Action::Pass, Reason::NoFrontend);
    };
    // Stack budget: choosing, translating and refusing are separate BPF functions called
    // from here, so their frames never add up (the verifier allows 512 bytes over the
    // deepest call chain). Packets of known flows and non-frontend packets call none.
    let mut v = FlowValue::default();
    match unpack(new_flow(h, &key, svc, bytes, &mut v)) {
        (Action::Pass, Reason::NewFlow) => match translate(pkt, h, Side::Dst, &v, bytes) {
            Ok(()) => (Action::Pass, Reason::NewFlow),
            Err(()) => MAP_ERR,
        },
        (Action::Bounce, reason) => unpack(refuse(pkt, h, reason)),
        out => out,
    }
}

/// A packet of no known flow to frontend `svc`: pick a backend and record the flow in `v`
/// (returns `(Pass, NewFlow)`: the caller translates), or say why not (`Bounce`: the caller
/// refuses).
#[inline(never)]
fn new_flow(h: &Headers, key: &FlowKey, svc: &ServiceValue, bytes: u32, v: &mut FlowValue) -> u32 {
    let (action, reason) = choose(h, key, svc, bytes, v);
    pack(action, reason)
}

#[inline(always)]
fn choose(h: &Headers, key: &FlowKey, svc: &ServiceValue, bytes: u32, v: &mut FlowValue) -> Outcome {
    const MAP_ERR: Outcome = (Action::Drop, Reason::MapError);

    if svc.flags & SVC_F_SOURCE_RANGES != 0 && !select::source_allowed(svc.service_id, &h.src) {
        return (Action::Drop, Reason::SourceRangeDenied);
    }
    if svc.backend_count == 0 {
        stats::service(svc.service_id, bytes);
        return no_backend(svc);
    }
    let Some(id) = select::pick(svc, key) else {
        return (Action::Drop, Reason::BackendMissing);
    };
    let Some(be) = select::backend(id) else {
        return (Action::Drop, Reason::BackendMissing);
    };
    match conntrack::create(key, svc, id, be, v) {
        0 => (Action::Pass, Reason::NewFlow),
        e if e == conntrack::CreateError::Snat as u32 => (Action::Drop, Reason::SnatFailed),
        _ => MAP_ERR,
    }
}

/// Not a frontend, but a ClusterIP (its port-0 entry)? Then the port is refused, like
/// kube-proxy's catch-all reject for cluster IPs.
#[inline(always)]
fn is_cluster_ip(h: &Headers) -> bool {
    let vip = ServiceKey { addr: h.dst, port: 0, proto: 0, _pad: 0 };
    // SAFETY: only presence is read.
    unsafe { SERVICES.get(&vip) }.is_some()
}

#[inline(always)]
fn no_backend(svc: &ServiceValue) -> Outcome {
    if svc.flags & SVC_F_DROP_NO_BACKEND != 0 || select::config_flags() & CFG_F_NO_BACKEND_DROP != 0 {
        return (Action::Drop, Reason::DropNoBackend);
    }
    (Action::Bounce, Reason::RejectNoBackend)
}

/// Answers like a closed port (TCP RST / ICMP port unreachable), counted as `reason`. Not
/// inlined: building the answer needs stack the translate path must not pay for.
#[inline(never)]
fn refuse<P: Packet>(pkt: &mut P, h: &Headers, reason: Reason) -> u32 {
    if h.frag == FRAG_FIRST {
        // Quoting a fragment is legal, but the rest of the datagram would follow unanswered;
        // dropping is what a closed port would look like to the sender anyway.
        return pack(Action::Drop, Reason::RejectFailed);
    }
    match reject(pkt, h) {
        Ok(()) => pack(Action::Bounce, reason),
        Err(()) => pack(Action::Drop, Reason::RejectFailed),
    }
}
