//! The flow table: a forward entry per client flow (which backend) and a reverse entry per
//! backend-side flow (which frontend to restore on replies), plus the fragment table that
//! lets non-first fragments (IPv4 and IPv6) follow their first fragment.
//!
//! Life cycle (rules in `lb_common::ct`): only a TCP SYN or a UDP datagram opens a flow; each
//! packet moves its direction's state and refreshes its last-seen time; the agent's GC
//! removes closed and idle pairs. The table is a plain HASH, so nothing else removes an
//! entry: the two directions are created together (reverse first, rolled back if the
//! forward cannot be stored) and removed together (`forget_pair`, `reclaim`).
//!
//! Values are copied out right after a lookup: a deleted element of a preallocated map is
//! reused by the next insert, so a pointer may come to show another flow. The only writes
//! through a pointer are last-seen refreshes (at worst one keeps a recycled entry alive for
//! one more timeout); a state change replaces the entry by key.

use aya_ebpf::{
    bindings::{BPF_EXIST, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_coarse_ns},
};
use lb_common::{abi::*, ct};

use crate::{
    maps::{CONNTRACK, FRAGMENTS, SCRATCH, SNAT_CURSOR, Scratch},
    nat::Side,
    parse::Headers,
    select,
};

const EEXIST: i32 = 17;

/// The clock of `last_seen_ns`: CLOCK_MONOTONIC to a tick (plenty for timeouts in seconds),
/// from jiffies as the agent calibrated it (`Config::tick_*`): the verifier inlines
/// `bpf_jiffies64` into a load, where a clock helper cost ~20 ns per packet. Before the agent
/// has calibrated it, the coarse monotonic clock.
#[inline(always)]
pub fn now() -> u64 {
    if let Some(c) = select::config_ref()
        && c.tick_ns != 0
    {
        // SAFETY: helper without arguments.
        let j = unsafe { bpf_jiffies64() };
        return c.tick_t0.wrapping_add(j.wrapping_sub(c.tick_j0).wrapping_mul(c.tick_ns));
    }
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
pub fn flow_key(h: &Headers) -> FlowKey {
    FlowKey { src: h.src, dst: h.dst, sport: h.sport, dport: h.dport, proto: h.proto, _pad: [0, 0, 0] }
}

/// This CPU's scratch slot: flow values being worked on, kept off the 512-byte stack.
#[inline(always)]
pub fn scratch() -> Option<*mut Scratch> {
    SCRATCH.get_ptr_mut(0)
}

/// Copies the entry for `key` into `out`; returns where it lives (for `touch`).
#[inline(always)]
pub fn lookup(key: &FlowKey, out: &mut FlowValue) -> Option<*mut FlowValue> {
    let p = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a valid map value pointer; copied at once (see the module docs).
    unsafe { core::ptr::copy_nonoverlapping(p, out, 1) };
    Some(p)
}

/// This direction of flow `key` (copied in `v`) carried packet `h`: moves its state
/// (replacing the entry by key, so the write cannot land on another flow) or refreshes its
/// last-seen time.
#[inline(always)]
pub fn touch(key: &FlowKey, p: *mut FlowValue, v: &mut FlowValue, h: &Headers, now: u64) {
    let next = ct::next_state(v.state, h.proto, h.tcp_flags);
    if next != v.state {
        v.state = next;
        v.last_seen_ns = now;
        let _ = CONNTRACK.insert(key, &*v, BPF_EXIST as u64);
    } else if now.wrapping_sub(v.last_seen_ns) > ct::TOUCH_NS {
        // SAFETY: a valid map value pointer; a plain aligned store (see the module docs).
        unsafe { core::ptr::addr_of_mut!((*p).last_seen_ns).write_volatile(now) };
    }
}

/// Removes flow `key` -> `v` and its other direction.
#[inline(always)]
pub fn forget_pair(key: &FlowKey, v: &FlowValue) {
    let other = if v.direction == FLOW_FORWARD { ct::reverse_key(key, v) } else { ct::forward_key(key, v) };
    let _ = CONNTRACK.remove(key);
    let _ = CONNTRACK.remove(&other);
}

/// Removes the flow whose reply direction is `rkey` if it is over (closed or expired; an
/// orphan always is). True when `rkey` is free afterwards. Not inlined: its two copies must
/// not add to the caller's stack.
#[inline(never)]
fn reclaim(rkey: &FlowKey, now: u64) -> bool {
    let Some(s) = scratch() else { return false };
    // SAFETY: this CPU's scratch slot; `a` and `b` are reclaim's alone.
    let (rv, fv) = unsafe { (&mut (*s).a, &mut (*s).b) };
    if lookup(rkey, rv).is_none() {
        return true;
    }
    if rv.direction != FLOW_REPLY {
        return false;
    }
    let fkey = ct::forward_key(rkey, rv);
    // The forward entry counts only if it still names this reply entry.
    let has_fwd =
        lookup(&fkey, fv).is_some() && fv.direction == FLOW_FORWARD && ct::names_reverse(&fkey, fv, rkey);
    let Some(cfg) = select::config_ref() else { return false };
    if !ct::reclaimable(rkey.proto, has_fwd.then_some(&*fv), Some(&*rv), &cfg.timeouts, now) {
        return false;
    }
    if has_fwd {
        let _ = CONNTRACK.remove(&fkey);
    }
    let _ = CONNTRACK.remove(rkey);
    true
}

/// Why a flow could not be recorded.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CreateError {
    /// The table has no room (or a map update failed).
    Full = 1,
    /// Source NAT needed, but no node address is configured or no port was free.
    Snat = 2,
}

/// Ports a new flow probes before giving up: from this CPU's cursor on, so consecutive flows
/// take consecutive ports and a port comes back into turn only after the whole range.
const SNAT_PROBES: u32 = 16;

/// Claims a free destination port for reply key `rkey` (its other fields set) in the SNAT
/// range, storing the scratch slot's `rev` there. Returns the port (network order), or
/// `Err` with the first port found taken (0: none, the table is full): the oldest in this
/// CPU's turn, the one worth reclaiming. Not inlined, and `reclaim` is not called from it:
/// the two frames stay side by side on the stack, not on top of each other.
#[inline(never)]
fn claim_port(rkey: &mut FlowKey, rev: &FlowValue) -> Result<u16, u16> {
    let (min, max) = match select::config_ref() {
        Some(c) => ct::snat_ports(c),
        None => (DEFAULT_SNAT_PORT_MIN as u32, DEFAULT_SNAT_PORT_MAX as u32),
    };
    let span = max - min + 1;
    let cursor = SNAT_CURSOR.get_ptr_mut(0).ok_or(0u16)?;
    // SAFETY: this CPU's slot; no one else writes it.
    let mut c = unsafe { *cursor };
    if c == 0 {
        // Each CPU starts somewhere else in the range.
        // SAFETY: helper without arguments.
        c = unsafe { bpf_get_prandom_u32() } | 1;
    }
    let mut first_taken = 0u16;
    let mut first_at = 0;
    let mut i = 0;
    while i < SNAT_PROBES {
        // checked_rem: no division-by-zero panic path for the verifier to reject.
        let port = ((min + c.wrapping_add(i).checked_rem(span).unwrap_or(0)) as u16).to_be();
        rkey.dport = port;
        // NOEXIST claims the port atomically against other CPUs.
        match CONNTRACK.insert(&*rkey, rev, BPF_NOEXIST as u64) {
            Ok(()) => {
                // SAFETY: as above.
                unsafe { *cursor = c.wrapping_add(i + 1) };
                return Ok(port);
            }
            Err(e) if e == -EEXIST => {
                if first_taken == 0 {
                    first_taken = port;
                    first_at = i;
                }
            }
            Err(_) => return Err(0),
        }
        i += 1;
    }
    // The next search starts after the port offered for reclaiming, which is the oldest in
    // this CPU's turn: consecutive flows take over consecutive closed flows' ports.
    // SAFETY: as above.
    unsafe { *cursor = c.wrapping_add(first_at + 1) };
    Err(first_taken)
}

/// Ports offered for taking over, from the first taken one on, when every probed port was
/// taken: with several CPUs, the oldest port in one CPU's turn may be another CPU's newest.
const RECLAIM_TRIES: u32 = 4;

/// `claim_port`, then, if every probed port was taken, the first of them whose flow is over
/// (closed or expired) is taken over.
#[inline(always)]
fn claim_or_reclaim(rkey: &mut FlowKey, rev: &FlowValue, now: u64) -> Result<u16, CreateError> {
    let first = match claim_port(rkey, rev) {
        Ok(port) => return Ok(port),
        Err(0) => return Err(CreateError::Full),
        Err(port) => u16::from_be(port) as u32,
    };
    let (min, max) = match select::config_ref() {
        Some(c) => ct::snat_ports(c),
        None => (DEFAULT_SNAT_PORT_MIN as u32, DEFAULT_SNAT_PORT_MAX as u32),
    };
    let mut j = 0;
    while j < RECLAIM_TRIES {
        let mut port = first + j;
        if port > max {
            port = min + (port - max - 1);
        }
        rkey.dport = (port as u16).to_be();
        if reclaim(rkey, now) && CONNTRACK.insert(&*rkey, rev, BPF_NOEXIST as u64).is_ok() {
            if let Some(cursor) = SNAT_CURSOR.get_ptr_mut(0) {
                // SAFETY: this CPU's slot. `claim_port` left it just after `first`.
                unsafe { *cursor = (*cursor).wrapping_add(j) };
            }
            return Ok(rkey.dport);
        }
        j += 1;
    }
    Err(CreateError::Snat)
}

/// Records a new flow of `svc` (client -> frontend) translated to `backend`; its forward
/// entry is left in the scratch slot's `flow`. Returns 0 or a `CreateError` code. Not
/// inlined: its frame is not stacked on the backend choice's.
#[inline(never)]
pub fn create(key: &FlowKey, svc: &ServiceValue, backend_id: u32, backend: &BackendValue, now: u64) -> u32 {
    match try_create(key, svc, backend_id, backend, now) {
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
    now: u64,
) -> Result<(), CreateError> {
    let s = scratch().ok_or(CreateError::Full)?;
    // SAFETY: this CPU's scratch slot; `flow` and `rev` are the new flow's.
    let (fwd, rev) = unsafe { (&mut (*s).flow, &mut (*s).rev) };
    // Field by field: a struct literal would be built on the stack first.
    fwd.addr = backend.addr;
    // SAFETY: a field of this CPU's scratch slot. Volatile: four zero stores would be merged
    // into a `memset` call (see `zero`).
    unsafe { core::ptr::addr_of_mut!(fwd.nat_addr).write_volatile([0, 0, 0, 0]) };
    fwd.port = backend.port;
    fwd.nat_port = 0;
    fwd.direction = FLOW_FORWARD;
    fwd.flags = 0;
    fwd.state = ct::CT_NEW;
    fwd._pad = 0;
    fwd.backend_id = backend_id;
    fwd.service_id = svc.service_id;
    fwd.last_seen_ns = now;
    fwd.created_ns = now;
    // SAFETY: two distinct fields of the scratch slot.
    unsafe { core::ptr::copy_nonoverlapping(fwd as *const FlowValue, rev as *mut FlowValue, 1) };
    rev.addr = key.dst;
    rev.port = key.dport;
    rev.direction = FLOW_REPLY;
    let mut rkey = ct::reverse_key(key, fwd);
    // Reverse first: a reply must never arrive before its way back exists.
    let nat_addr = if select::needs_snat(svc, backend, key) {
        Some(select::snat_addr(&key.src).ok_or(CreateError::Snat)?)
    } else {
        match CONNTRACK.insert(&rkey, &*rev, BPF_NOEXIST as u64) {
            Ok(()) => None,
            Err(e) if e != -EEXIST => return Err(CreateError::Full),
            // The reply tuple is taken: by a flow that is over (take it), or by a live one
            // (another Service flow from the same client port to the same backend): then
            // this flow's source port is rewritten, as netfilter does on a clash.
            Err(_) if reclaim(&rkey, now) && CONNTRACK.insert(&rkey, &*rev, BPF_NOEXIST as u64).is_ok() => {
                None
            }
            Err(_) => Some(key.src),
        }
    };
    if let Some(nat) = nat_addr {
        rev.flags = FLOW_F_SNAT;
        rev.nat_addr = key.src;
        rev.nat_port = key.sport;
        rkey.dst = nat;
        fwd.flags = FLOW_F_SNAT;
        fwd.nat_addr = nat;
        fwd.nat_port = claim_or_reclaim(&mut rkey, rev, now)?;
    }
    if CONNTRACK.insert(key, &*fwd, 0).is_err() {
        let _ = CONNTRACK.remove(&rkey);
        return Err(CreateError::Full);
    }
    Ok(())
}

/// A direct (non-Service) TCP SYN from a pod whose reply tuple is a Service flow's reverse
/// entry. A flow that is over is removed (the client reused its port): false. A live one
/// keeps it: true, and the caller records the direct connection with its source port
/// rewritten, so the replies of each go back to their own socket.
#[inline(never)]
pub fn direct_clash(h: &Headers, now: u64) -> bool {
    let rkey =
        FlowKey { src: h.dst, dst: h.src, sport: h.dport, dport: h.sport, proto: h.proto, _pad: [0, 0, 0] };
    let is_reply = CONNTRACK.get_ptr(&rkey).is_some_and(|p| {
        // SAFETY: a valid map value pointer; one byte read.
        unsafe { core::ptr::addr_of!((*p).direction).read_volatile() == FLOW_REPLY }
    });
    is_reply && !reclaim(&rkey, now)
}

#[inline(always)]
fn fragment_key(h: &Headers) -> FragmentKey {
    FragmentKey { src: h.src, dst: h.dst, id: h.ip_id, proto: h.proto, _pad: [0, 0, 0] }
}

/// A first fragment was translated on `side` with flow `v`: later fragments of the datagram
/// get the addresses it left with (both sides of a source-NATed flow). The entry is built in
/// the scratch slot: this sits at the end of the deepest call chain.
#[inline(never)]
pub fn remember_fragment(h: &Headers, side: Side, v: &FlowValue) {
    let Some(s) = scratch() else { return };
    // SAFETY: this CPU's scratch slot, used by this packet only.
    let (key, f) = unsafe { (&mut (*s).frag_key, &mut (*s).frag) };
    *key = fragment_key(h);
    let snat = v.flags & FLOW_F_SNAT != 0;
    (f.src, f.dst) = (h.src, h.dst);
    if side == Side::Dst {
        f.dst = v.addr;
        if snat {
            f.src = v.nat_addr;
        }
    } else {
        f.src = v.addr;
        if snat {
            f.dst = v.nat_addr;
        }
    }
    f.service_id = v.service_id;
    let _ = FRAGMENTS.insert(key, f, 0);
}

#[inline(always)]
pub fn fragment(h: &Headers) -> Option<FragmentValue> {
    // SAFETY: copied out at once.
    unsafe { FRAGMENTS.get(&fragment_key(h)).copied() }
}
