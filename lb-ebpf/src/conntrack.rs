//! The flow table: a forward entry per client flow (which backend) and a reverse entry per
//! backend-side flow (which frontend to restore on replies), plus the fragment table that
//! lets non-first IPv4 fragments follow their first fragment.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32};
use lb_common::abi::*;

use crate::{
    maps::{CONNTRACK, FRAGMENTS},
    nat::Side,
    parse::Headers,
    select,
};

#[inline(always)]
pub fn flow_key(h: &Headers) -> FlowKey {
    FlowKey { src: h.src, dst: h.dst, sport: h.sport, dport: h.dport, proto: h.proto, _pad: [0; 3] }
}

#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<&'static FlowValue> {
    // SAFETY: read in place; a concurrent update of the same flow writes the same kind of
    // value, so a torn read at worst sends one packet the way it was going anyway.
    unsafe { CONNTRACK.get(key) }
}

#[inline(always)]
pub fn forget(key: &FlowKey) {
    let _ = CONNTRACK.remove(key);
}

/// Removes the reverse entry keyed by the reply tuple of `h`'s connection, if there is one.
#[inline(always)]
pub fn forget_stale_reply(h: &Headers) {
    let reply =
        FlowKey { src: h.dst, dst: h.src, sport: h.dport, dport: h.sport, proto: h.proto, _pad: [0; 3] };
    if lookup(&reply).is_some_and(|v| v.direction == FLOW_REPLY) {
        forget(&reply);
    }
}

/// Why a flow could not be recorded.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CreateError {
    /// A map update failed.
    Map = 1,
    /// Source NAT needed, but no node address is configured or no port was free.
    Snat = 2,
}

/// Source ports handed out for source-NATed flows: above Linux's default ephemeral range
/// (32768-60999), so they do not collide with the node's own connections.
const SNAT_PORT_MIN: u32 = 61_000;
const SNAT_PORTS: u32 = 65_536 - SNAT_PORT_MIN;
/// Random ports tried before giving up on a flow.
const SNAT_TRIES: u32 = 8;

/// Records a new flow of `svc` (client -> frontend) translated to `backend`, source-NATed when
/// `select::needs_snat` says so; writes its forward entry to `out`. Returns 0 or a
/// `CreateError` code.
#[inline(always)]
pub fn create(
    key: &FlowKey,
    svc: &ServiceValue,
    backend_id: u32,
    backend: &BackendValue,
    out: &mut FlowValue,
) -> u32 {
    match try_create(key, svc, backend_id, backend, out) {
        Ok(()) => 0,
        Err(e) => e as u32,
    }
}

#[inline(always)]
fn try_create(
    key: &FlowKey,
    svc: &ServiceValue,
    backend_id: u32,
    backend: &BackendValue,
    fwd: &mut FlowValue,
) -> Result<(), CreateError> {
    let service_id = svc.service_id;
    let snat = select::needs_snat(svc, backend, key);
    *fwd = FlowValue {
        addr: backend.addr,
        port: backend.port,
        direction: FLOW_FORWARD,
        backend_id,
        service_id,
        ..FlowValue::default()
    };
    let mut rkey = FlowKey {
        src: backend.addr,
        dst: key.src,
        sport: backend.port,
        dport: key.sport,
        proto: key.proto,
        _pad: [0; 3],
    };
    let mut rev = FlowValue {
        addr: key.dst,
        port: key.dport,
        direction: FLOW_REPLY,
        backend_id,
        service_id,
        ..FlowValue::default()
    };
    // Reverse first: a reply must never arrive before its way back exists.
    if snat {
        let node = select::snat_addr(&key.src).ok_or(CreateError::Snat)?;
        rev.flags = FLOW_F_SNAT;
        rev.nat_addr = key.src;
        rev.nat_port = key.sport;
        rkey.dst = node;
        let mut claimed = false;
        let mut i = 0;
        while i < SNAT_TRIES {
            // SAFETY: helper without arguments.
            let port = SNAT_PORT_MIN + unsafe { bpf_get_prandom_u32() } % SNAT_PORTS;
            rkey.dport = (port as u16).to_be();
            // NOEXIST claims the port atomically against other CPUs.
            if CONNTRACK.insert(&rkey, &rev, BPF_NOEXIST as u64).is_ok() {
                claimed = true;
                break;
            }
            i += 1;
        }
        if !claimed {
            return Err(CreateError::Snat);
        }
        fwd.flags = FLOW_F_SNAT;
        fwd.nat_addr = node;
        fwd.nat_port = rkey.dport;
    } else {
        CONNTRACK.insert(&rkey, &rev, 0).map_err(|_| CreateError::Map)?;
    }
    CONNTRACK.insert(key, fwd, 0).map_err(|_| CreateError::Map)
}

#[inline(always)]
fn fragment_key(h: &Headers) -> FragmentKey {
    FragmentKey { src: h.src[3], dst: h.dst[3], id: h.ip_id, proto: h.proto, _pad: 0 }
}

/// A first IPv4 fragment was translated: later fragments of the datagram get the same.
#[inline(always)]
pub fn remember_fragment(h: &Headers, side: Side, addr: &Addr, service_id: u32) {
    let v = FragmentValue {
        addr: addr[3],
        direction: if side == Side::Dst { FLOW_FORWARD } else { FLOW_REPLY },
        _pad: [0; 3],
        service_id,
    };
    let _ = FRAGMENTS.insert(&fragment_key(h), &v, 0);
}

#[inline(always)]
pub fn fragment(h: &Headers) -> Option<FragmentValue> {
    // SAFETY: copied out at once.
    unsafe { FRAGMENTS.get(&fragment_key(h)).copied() }
}
