//! The flow table: a forward entry per client flow (which backend) and a reverse entry per
//! backend-side flow (which frontend to restore on replies), plus the fragment table that
//! lets non-first IPv4 fragments follow their first fragment.

use lb_common::abi::*;

use crate::{
    maps::{CONNTRACK, FRAGMENTS},
    nat::Side,
    parse::Headers,
};

#[inline(always)]
pub fn flow_key(h: &Headers) -> FlowKey {
    FlowKey { src: h.src, dst: h.dst, sport: h.sport, dport: h.dport, proto: h.proto, _pad: [0; 3] }
}

#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<FlowValue> {
    // SAFETY: the value is copied out at once.
    unsafe { CONNTRACK.get(key).copied() }
}

#[inline(always)]
pub fn forget(key: &FlowKey) {
    let _ = CONNTRACK.remove(key);
}

/// Records a new flow client -> frontend translated to `backend`; returns its forward entry.
#[inline(always)]
pub fn create(
    key: &FlowKey,
    service_id: u32,
    backend_id: u32,
    backend: &BackendValue,
) -> Result<FlowValue, ()> {
    let fwd = FlowValue {
        addr: backend.addr,
        port: backend.port,
        direction: FLOW_FORWARD,
        _pad: 0,
        backend_id,
        service_id,
        _pad2: 0,
    };
    let rkey = FlowKey {
        src: backend.addr,
        dst: key.src,
        sport: backend.port,
        dport: key.sport,
        proto: key.proto,
        _pad: [0; 3],
    };
    let rev = FlowValue {
        addr: key.dst,
        port: key.dport,
        direction: FLOW_REPLY,
        _pad: 0,
        backend_id,
        service_id,
        _pad2: 0,
    };
    // Reverse first: a reply must never arrive before its way back exists.
    CONNTRACK.insert(&rkey, &rev, 0).map_err(|_| ())?;
    CONNTRACK.insert(key, &fwd, 0).map_err(|_| ())?;
    Ok(fwd)
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
