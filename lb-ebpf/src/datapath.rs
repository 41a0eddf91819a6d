//! The decision, shared by both hooks: parse, follow a known flow or pick a backend for a
//! new one, translate, or reject. Returns the verdict and its reason; the caller maps the
//! verdict to its hook's return code.

use lb_common::{
    abi::*,
    verdict::{Action, Reason},
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
    let out = match parse(pkt.data(), pkt.data_end()) {
        Ok(h) => handle(pkt, &h, bytes),
        Err(out) => out,
    };
    stats::reason(out.1, bytes);
    out
}

#[inline(always)]
fn translate<P: Packet>(pkt: &mut P, h: &Headers, side: Side, v: &FlowValue, bytes: u32) -> Result<(), ()> {
    apply(pkt, h, side, &v.addr, v.port)?;
    if h.frag == FRAG_FIRST {
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
            return match translate(pkt, h, Side::Src, &v, bytes) {
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
            return match translate(pkt, h, Side::Dst, &v, bytes) {
                Ok(()) => (Action::Pass, Reason::FlowHit),
                Err(()) => MAP_ERR,
            };
        }
        conntrack::forget(&key);
    }

    let skey = ServiceKey { addr: h.dst, port: h.dport, proto: h.proto, _pad: 0 };
    // SAFETY: copied out at once.
    let Some(svc) = (unsafe { SERVICES.get(&skey).copied() }) else {
        return (Action::Pass, Reason::NoFrontend);
    };
    if svc.backend_count == 0 {
        stats::service(svc.service_id, bytes);
        return no_backend(pkt, h, &svc);
    }
    let Some(id) = select::pick(&svc, &key) else {
        return (Action::Drop, Reason::BackendMissing);
    };
    let Some(be) = select::backend(id) else {
        return (Action::Drop, Reason::BackendMissing);
    };
    let Ok(v) = conntrack::create(&key, svc.service_id, id, be) else {
        return MAP_ERR;
    };
    if translate(pkt, h, Side::Dst, &v, bytes).is_err() {
        return MAP_ERR;
    }
    (Action::Pass, Reason::NewFlow)
}

#[inline(always)]
fn no_backend<P: Packet>(pkt: &mut P, h: &Headers, svc: &ServiceValue) -> Outcome {
    if svc.flags & SVC_F_DROP_NO_BACKEND != 0 || select::config_flags() & CFG_F_NO_BACKEND_DROP != 0 {
        return (Action::Drop, Reason::DropNoBackend);
    }
    if h.frag == FRAG_FIRST {
        // Quoting a fragment is legal, but the rest of the datagram would follow unanswered;
        // dropping is what a closed port would look like to the sender anyway.
        return (Action::Drop, Reason::RejectFailed);
    }
    match reject(pkt, h) {
        Ok(()) => (Action::Bounce, Reason::RejectNoBackend),
        Err(()) => (Action::Drop, Reason::RejectFailed),
    }
}
