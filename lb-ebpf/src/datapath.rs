//! The decision, shared by both hooks: parse, follow a known flow or pick a backend for a
//! new one, translate, or reject. Returns the verdict and its reason; the caller maps the
//! verdict to its hook's return code.

use lb_common::{
    abi::*,
    ct::{CT_CLOSED, CT_FIN},
    verdict::{Action, Reason, pack, unpack},
};

use crate::{
    conntrack, events,
    maps::{ADDR_FILTER, SERVICES, Scratch},
    nat::{Packet, Side, apply},
    parse::{FRAG_FIRST, FRAG_LATER, Headers, Outcome, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, parse},
    pmtu,
    reject::{self, reject},
    related, select, stats, zero,
};

/// `NODE_IFACE`: the program runs on a node interface (`lb_xdp`, `lb_tc_node`), where a
/// translated packet too big for its route is answered here (`pmtu`), and `lb monitor` names
/// the TC hook `tc-node`. Off in `lb_tc_pod`: the check would double the instructions the
/// verifier walks (371 000 → 815 000 measured) for pods, whose MTU, set by their CNI, fits
/// the node's paths.
#[inline(always)]
pub fn process<P: Packet, const NODE_IFACE: bool>(pkt: &mut P) -> Outcome {
    let bytes = pkt.len();
    // SAFETY: all-zero `Headers` are valid (integers, bools, addresses).
    let mut h = core::mem::MaybeUninit::uninit();
    let h: &mut Headers = unsafe { zero::zeroed(&mut h) };
    let out = match parse(pkt.data(), pkt.data_end(), h) {
        // Neither address is one we act on: none of ours, without the table lookups. (A later
        // fragment carries no ports; its own table decides.)
        Ok(()) if h.frag != FRAG_LATER && none_of_ours(h) => (Action::Pass, Reason::NoFrontend),
        // A translated packet too big for its route is answered instead (`pmtu`). Checked
        // here, once the deciding frames are gone: at TC their stack is at the verifier's
        // limit.
        Ok(()) => match handle(pkt, h, bytes) {
            (Action::Pass, Reason::NewFlow | Reason::FlowHit | Reason::Reply)
                if NODE_IFACE && pmtu::over_floor(pkt, h) && pmtu::exceeded(pkt, h) =>
            {
                unpack(pmtu::answer(pkt, h))
            }
            out => out,
        },
        // An ICMP error about one of our flows is translated back (`related`).
        Err((Action::Pass, Reason::NotTcpUdp)) => unpack(related::translate(pkt)),
        // Malformed but not for a frontend: untouched, as any packet not ours.
        Err((Action::Drop, Reason::MalformedIp | Reason::TruncatedL4)) if !for_frontend(h) => {
            (Action::Pass, Reason::MalformedPassed)
        }
        Err(out) => out,
    };
    stats::reason(out.1, bytes);
    let hook = if NODE_IFACE && P::HOOK == HOOK_TC { HOOK_TC_NODE } else { P::HOOK };
    events::verdict(pkt, h, out, bytes, hook);
    out
}

/// At TC egress (`lb_tc_egress`): a packet the node's own stack sends, in reply to a flow
/// translated at ingress to a backend at one of the node's addresses (a hostNetwork pod,
/// as the API server behind `kubernetes.default` is on a control-plane node). Such a reply
/// passes no ingress hook of ours: its source goes back to the frontend here, as netfilter's
/// conntrack does on output for kube-proxy. So do the later fragments of such a reply and an
/// ICMP error the stack sends about such a flow. Everything else (forwarded packets, the
/// node's other traffic) passes untouched and uncounted.
#[inline(always)]
pub fn stack_reply<P: Packet>(pkt: &mut P) -> Action {
    let bytes = pkt.len();
    // SAFETY: all-zero `Headers` are valid (integers, bools, addresses).
    let mut h = core::mem::MaybeUninit::uninit();
    let h: &mut Headers = unsafe { zero::zeroed(&mut h) };
    let out = match parse(pkt.data(), pkt.data_end(), h) {
        // A reply's source is a backend address, listed in the pre-filter.
        Ok(()) if !listed(&h.src) => return Action::Pass,
        Ok(()) if h.frag == FRAG_LATER => unpack(later_fragment(pkt, h, bytes)),
        Ok(()) => unpack(stack_reply_flow(pkt, h, bytes)),
        // The parse stops before the addresses here; the node sends few ICMP messages, and
        // `related` passes any that is not an error about one of our flows.
        Err((Action::Pass, Reason::NotTcpUdp)) => unpack(related::translate(pkt)),
        Err(_) => return Action::Pass,
    };
    if out.0 == Action::Pass
        && !matches!(out.1, Reason::Reply | Reason::FragmentFollowed | Reason::IcmpRelated)
    {
        return Action::Pass;
    }
    stats::reason(out.1, bytes);
    events::verdict(pkt, h, out, bytes, HOOK_TC_EGRESS);
    out.0
}

/// `stack_reply` for a TCP segment or UDP datagram: translated if it is the reply direction
/// of a flow, else `(Pass, NoFrontend)`. Not inlined: the flow value stays out of the entry
/// function's frame.
#[inline(never)]
fn stack_reply_flow<P: Packet>(pkt: &mut P, h: &Headers, bytes: u32) -> u32 {
    let Some(s) = conntrack::scratch() else { return pack(Action::Drop, Reason::MapError) };
    // SAFETY: this CPU's scratch slot, used by this packet only.
    let (key, v) = unsafe { (&mut (*s).key, &mut (*s).flow) };
    *key = conntrack::flow_key(h);
    match conntrack::lookup(key, v) {
        Some(p) if v.direction == FLOW_REPLY => {
            conntrack::touch(key, p, v, h, conntrack::now());
            match translate(pkt, h, Side::Src, v, bytes) {
                Ok(()) => pack(Action::Pass, Reason::Reply),
                Err(r) => pack(Action::Drop, r),
            }
        }
        _ => pack(Action::Pass, Reason::NoFrontend),
    }
}

/// Whether neither address of the packet is listed in the address pre-filter
/// (`lb_common::addr_filter`). A failed read counts as listed: the full lookups decide.
/// Inlined: a BPF-to-BPF call costs ~10 ns where returns go through a mitigation thunk
/// (SRSO "Safe RET" on the lab's AMD machines), a fifth of the flow-hit path.
#[inline(always)]
fn none_of_ours(h: &Headers) -> bool {
    !listed(&h.dst) && !listed(&h.src)
}

#[inline(always)]
fn listed(addr: &Addr) -> bool {
    let (word, bit) = lb_common::addr_filter::slot(addr);
    ADDR_FILTER.get(word).is_none_or(|w| *w & bit != 0)
}

/// Whether a malformed packet was meant for a frontend: its address and port (when the
/// ports could be read), or a ClusterIP (whose every port is ours). Not inlined: its keys
/// would otherwise sit in the entry function's frame, under the deepest call chain.
#[inline(never)]
fn for_frontend(h: &Headers) -> bool {
    // An IPv4-mapped destination in an IPv6 header never names IPv4 state.
    if h.v6 && is_v4(&h.dst) {
        return false;
    }
    (h.dport != 0
        && SERVICES.get_ptr(&ServiceKey { addr: h.dst, port: h.dport, proto: h.proto, _pad: 0 }).is_some())
        || is_cluster_ip(h)
}

/// Rewrites `side` to the flow's address (forward: destination to the backend; reply: source
/// back to the frontend) and, for a source-NATed flow, the other side too. Not inlined: the
/// checksum arithmetic spills registers, and in its own frame that stack is not added to
/// the new-flow path's.
#[inline(never)]
fn translate<P: Packet>(
    pkt: &mut P,
    h: &Headers,
    side: Side,
    v: &FlowValue,
    bytes: u32,
) -> Result<(), Reason> {
    translate_here(pkt, h, side, v, bytes)
}

/// The body of `translate`, inlined where it is called.
#[inline(always)]
fn translate_here<P: Packet>(
    pkt: &mut P,
    h: &Headers,
    side: Side,
    v: &FlowValue,
    bytes: u32,
) -> Result<(), Reason> {
    apply(pkt, h, side, &v.addr, v.port)?;
    if v.flags & FLOW_F_SNAT != 0 {
        apply(pkt, h, side.other(), &v.nat_addr, v.nat_port)?;
    }
    if h.frag == FRAG_FIRST {
        // Later fragments carry no ports: they follow with the addresses this one left with.
        conntrack::remember_fragment(h, side, v);
    }
    stats::service(v.service_id, bytes);
    stats::backend(v.backend_id, bytes);
    Ok(())
}

#[inline(always)]
fn handle<P: Packet>(pkt: &mut P, h: &Headers, bytes: u32) -> Outcome {
    const MAP_ERR: Outcome = (Action::Drop, Reason::MapError);

    if h.frag == FRAG_LATER {
        return unpack(later_fragment(pkt, h, bytes));
    }

    let Some(s) = conntrack::scratch() else { return MAP_ERR };
    // SAFETY: this CPU's scratch slot, used by this packet only.
    unsafe { (*s).key = conntrack::flow_key(h) };
    // The scratch slot is looked up once and handed on.
    let known = known_flow(pkt, h, bytes, s);
    if known != NOT_KNOWN {
        return unpack(known);
    }
    unpack(frontend(pkt, h, bytes, s))
}

/// A non-first fragment: the addresses its datagram's first fragment left with, or
/// untouched when that one was not ours (or not seen). Not inlined: the fragment's value
/// would otherwise sit in the entry function's frame, under the deepest call chain.
#[inline(never)]
fn later_fragment<P: Packet>(pkt: &mut P, h: &Headers, bytes: u32) -> u32 {
    let Some(f) = conntrack::fragment(h) else { return pack(Action::Pass, Reason::FragmentUnknown) };
    if let Err(r) = pkt.rewrite_l3(h, Side::Src, &f.src).and_then(|()| pkt.rewrite_l3(h, Side::Dst, &f.dst)) {
        return pack(Action::Drop, r);
    }
    stats::service(f.service_id, bytes);
    pack(Action::Pass, Reason::FragmentFollowed)
}

/// `known_flow` and `direct_clash`: the packet is not theirs, carry on.
const NOT_KNOWN: u32 = u32::MAX;

#[inline(always)]
fn is_syn(h: &Headers) -> bool {
    h.proto == PROTO_TCP && h.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

// Stack budget: the verifier allows 512 bytes over the deepest chain of BPF functions. So the
// known-flow path, the frontend path (and its new-flow, SNAT and refuse steps) are separate
// functions called one after another, never nested more than needed, and flow values live in
// this CPU's scratch slot (`conntrack::scratch`) instead of on the stack.

/// A packet of a flow in the table: translated, or `NOT_KNOWN` (no entry, or the flow must
/// pick a backend anew and was removed).
#[inline(never)]
fn known_flow<P: Packet>(pkt: &mut P, h: &Headers, bytes: u32, s: *mut Scratch) -> u32 {
    // SAFETY: this CPU's scratch slot, used by this packet only.
    let (key, v) = unsafe { (&(*s).key, &mut (*s).flow) };
    let Some(p) = conntrack::lookup(key, v) else { return NOT_KNOWN };
    // A SYN, FIN or RST changes the flow's state: only its own pod may send one.
    if P::POD_FACING
        && h.proto == PROTO_TCP
        && h.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0
        && !pkt.source_ok(h)
    {
        return pack(Action::Drop, Reason::SpoofedSource);
    }
    // The clock only once a flow is found: the miss path does without.
    let now = conntrack::now();
    let (side, reason) = if v.direction == FLOW_REPLY {
        (Side::Src, Reason::Reply)
    } else {
        // A flow keeps its backend across table changes while the backend stays in its
        // Service. If it left: TCP segments of the open connection still go there (as with
        // kube-proxy's conntrack), but a UDP packet or a new SYN picks a live backend at
        // once. A SYN on a tuple whose connection ended opens a new flow.
        let syn = is_syn(h);
        let reopen = syn && (v.state == CT_FIN || v.state == CT_CLOSED);
        let moved = (h.proto == PROTO_UDP || syn) && !select::still_member(v);
        if reopen || moved {
            conntrack::forget_pair(key, v);
            return NOT_KNOWN;
        }
        (Side::Dst, Reason::FlowHit)
    };
    conntrack::touch(key, p, v, h, now);
    // Inlined at XDP, where a flow hit is then a single call deep and a BPF-to-BPF call
    // costs ~10 ns of it (see `none_of_ours`); called at TC, whose stack budget the inlined
    // frame would exceed.
    let translated = if P::POD_FACING {
        translate(pkt, h, side, v, bytes)
    } else {
        translate_here(pkt, h, side, v, bytes)
    };
    match translated {
        Ok(()) => pack(Action::Pass, reason),
        Err(r) => pack(Action::Drop, r),
    }
}

/// A packet of no known flow: to a frontend (a new flow, or a refusal), a ClusterIP port it
/// does not serve, a direct connection clashing with a Service flow, or none of ours.
#[inline(never)]
fn frontend<P: Packet>(pkt: &mut P, h: &Headers, bytes: u32, s: *mut Scratch) -> u32 {
    // SAFETY: this CPU's scratch slot, used by this packet only.
    let key = unsafe { &(*s).key };
    let skey = ServiceKey { addr: h.dst, port: h.dport, proto: h.proto, _pad: 0 };
    let Some(svc) = SERVICES.get_ptr(&skey).map(|p| {
        // SAFETY: a valid map value pointer, copied at once: the agent replaces entries, and
        // a replaced element is reused by the next update.
        unsafe { p.read() }
    }) else {
        if P::POD_FACING && is_cluster_ip(h) {
            return refuse(pkt, h, Reason::RejectUnknownPort);
        }
        if P::POD_FACING && is_syn(h) && conntrack::direct_clash(h, conntrack::now()) {
            if !pkt.source_ok(h) {
                return pack(Action::Drop, Reason::SpoofedSource);
            }
            // Recorded as a flow translated to itself: service and backend id 0 (never a
            // real id), where only the source port moves.
            let be = BackendValue { addr: h.dst, port: h.dport, flags: BE_F_PRESENT, _pad: 0 };
            let mut none = core::mem::MaybeUninit::uninit();
            // SAFETY: all-zero `ServiceValue` is valid (integers).
            let none: &ServiceValue = unsafe { zero::zeroed(&mut none) };
            return record(pkt, h, key, none, 0, &be, bytes, Reason::PortClash);
        }
        return pack(Action::Pass, Reason::NoFrontend);
    };
    // A new flow (or its refusal) only under the pod's own address.
    if P::POD_FACING && !pkt.source_ok(h) {
        return pack(Action::Drop, Reason::SpoofedSource);
    }
    match unpack(new_flow(h, key, &svc, bytes)) {
        (Action::Pass, Reason::NewFlow) => {
            // SAFETY: this CPU's scratch slot; `new_flow` left the chosen id there.
            let id = unsafe { (*s).flow.backend_id };
            let Some(be) = select::backend(id) else { return pack(Action::Drop, Reason::BackendMissing) };
            record(pkt, h, key, &svc, id, &be, bytes, Reason::NewFlow)
        }
        (Action::Bounce, reason) => refuse(pkt, h, reason),
        (action, reason) => pack(action, reason),
    }
}

/// Records the new flow (`conntrack::create`) and translates the packet with it.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "inlined into its caller; BPF calls take five")]
fn record<P: Packet>(
    pkt: &mut P,
    h: &Headers,
    key: &FlowKey,
    svc: &ServiceValue,
    id: u32,
    be: &BackendValue,
    bytes: u32,
    reason: Reason,
) -> u32 {
    match conntrack::create(key, svc, id, be, conntrack::now()) {
        0 => translate_new(pkt, h, bytes, reason),
        e if e == conntrack::CreateError::Snat as u32 => pack(Action::Drop, Reason::SnatFailed),
        _ => pack(Action::Drop, Reason::FlowTableFull),
    }
}

/// Translates the packet with the flow just recorded in the scratch slot.
#[inline(always)]
fn translate_new<P: Packet>(pkt: &mut P, h: &Headers, bytes: u32, reason: Reason) -> u32 {
    let Some(s) = conntrack::scratch() else { return pack(Action::Drop, Reason::MapError) };
    // SAFETY: this CPU's scratch slot, used by this packet only.
    match translate(pkt, h, Side::Dst, unsafe { &(*s).flow }, bytes) {
        Ok(()) => pack(Action::Pass, reason),
        Err(r) => pack(Action::Drop, r),
    }
}

/// A packet of no known flow to frontend `svc`: pick a backend, left in the scratch slot's
/// `flow.backend_id` (returns `(Pass, NewFlow)`: the caller records the flow and translates),
/// or say why not (`Bounce`: the caller refuses).
#[inline(never)]
fn new_flow(h: &Headers, key: &FlowKey, svc: &ServiceValue, bytes: u32) -> u32 {
    let (action, reason) = choose(h, key, svc, bytes);
    pack(action, reason)
}

#[inline(always)]
fn choose(h: &Headers, key: &FlowKey, svc: &ServiceValue, bytes: u32) -> Outcome {
    if svc.flags & SVC_F_SOURCE_RANGES != 0 && !select::source_allowed(svc.service_id, &h.src) {
        return (Action::Drop, Reason::SourceRangeDenied);
    }
    if svc.backend_count == 0 {
        stats::service(svc.service_id, bytes);
        return no_backend(svc);
    }
    // Only a SYN opens a TCP flow. Another segment belongs to a connection that ended (or
    // was never seen): a RST is dropped, anything else answered with a RST so the client
    // learns at once, and neither creates state.
    if h.proto == PROTO_TCP && h.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        if h.tcp_flags & TCP_RST != 0 {
            return (Action::Drop, Reason::NoFlowRst);
        }
        return (Action::Bounce, Reason::RejectNoFlow);
    }
    let Some(id) = select::pick(svc, key, conntrack::now()) else {
        return (Action::Drop, Reason::BackendMissing);
    };
    let Some(s) = conntrack::scratch() else { return (Action::Drop, Reason::MapError) };
    // SAFETY: this CPU's scratch slot, used by this packet only.
    unsafe { (*s).flow.backend_id = id };
    (Action::Pass, Reason::NewFlow)
}

/// Not a frontend, but a ClusterIP (its port-0 entry)? Then the port is refused, like
/// kube-proxy's catch-all reject for cluster IPs.
#[inline(always)]
fn is_cluster_ip(h: &Headers) -> bool {
    let vip = ServiceKey { addr: h.dst, port: 0, proto: 0, _pad: 0 };
    SERVICES.get_ptr(&vip).is_some()
}

#[inline(always)]
fn no_backend(svc: &ServiceValue) -> Outcome {
    if lb_common::rules::no_backend_drops(svc, select::config_flags()) {
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
    // Over the answer rate: dropped, as the kernel does past `icmp_msgs_per_sec`.
    if !reject::answer_allowed() {
        return pack(Action::Drop, Reason::AnswerRateLimited);
    }
    match reject(pkt, h) {
        Ok(()) => pack(Action::Bounce, reason),
        Err(r) => pack(Action::Drop, r),
    }
}
