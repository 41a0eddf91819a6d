//! Backend choice for a new flow: ClientIP affinity if the service asks for it, else the
//! service's Maglev range indexed by the flow hash (or a random slot with `--lb-algorithm
//! random`). Membership (`lb_members`) decides whether an affinity entry or a UDP flow may
//! stay on its backend. Every map value is copied out before use.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{abi::*, hash::flow_hash, maglev};

use aya_ebpf::maps::lpm_trie::Key;

use crate::maps::{AFFINITY, BACKENDS, CONFIG, MAGLEV, MEMBERS, SOURCE_RANGES};

/// The datapath-wide settings. A reference is fine here: an ARRAY element is never freed
/// or reused, only rewritten (rarely) by the agent.
#[inline(always)]
pub fn config_ref() -> Option<&'static Config> {
    CONFIG.get(0)
}

/// Datapath-wide flags (`CFG_F_*`).
#[inline(always)]
pub fn config_flags() -> u32 {
    // SAFETY: a valid map value pointer; one aligned word read.
    CONFIG.get_ptr(0).map(|c| unsafe { core::ptr::addr_of!((*c).flags).read_volatile() }).unwrap_or(0)
}

/// The source NAT address for a flow of this family, if one is configured.
#[inline(always)]
pub fn snat_addr(client: &Addr) -> Option<Addr> {
    let c = CONFIG.get_ptr(0)?;
    // SAFETY: a valid map value pointer; the address is copied.
    let a = unsafe { if is_v4(client) { (*c).snat_v4 } else { (*c).snat_v6 } };
    if a == [0; 4] { None } else { Some(a) }
}

/// Backend `backend_id`'s membership of service `service_id`, if it has one.
#[inline(always)]
pub fn member(service_id: u32, backend_id: u32) -> Option<MemberValue> {
    let p = MEMBERS.get_ptr(&MemberKey { service_id, backend_id })?;
    // SAFETY: a valid map value pointer, copied at once.
    Some(unsafe { p.read() })
}

/// Whether flow `v` may stay where it is: its backend is still a member of its service
/// (usable or terminating) at the same address. A direct flow (service id 0) always may.
#[inline(always)]
pub fn still_member(v: &FlowValue) -> bool {
    v.service_id == 0
        || (member(v.service_id, v.backend_id).is_some() && still_backend(v.backend_id, &v.addr, v.port))
}

/// Whether a new flow to `be` must be source-NATed: external traffic to a backend on another
/// node (its reply must come back through us), and hairpin (a pod reaching itself through
/// its Service would otherwise see its own address as the source).
#[inline(always)]
pub fn needs_snat(svc: &ServiceValue, be: &BackendValue, key: &FlowKey) -> bool {
    lb_common::rules::needs_snat(svc, be, &key.src)
}

/// `loadBalancerSourceRanges`: is `src` inside one of the service's ranges?
#[inline(always)]
pub fn source_allowed(service_id: u32, src: &Addr) -> bool {
    let key = Key::new(32 + 128, SourceRangeKey { service_id, addr: *src });
    SOURCE_RANGES.get(&key).is_some()
}

/// The backend entry for `id` (a copy), if it is in use.
#[inline(always)]
pub fn backend(id: u32) -> Option<BackendValue> {
    let p = BACKENDS.get_ptr(id)?;
    // SAFETY: a valid map value pointer, copied at once.
    let b = unsafe { p.read() };
    if b.flags & BE_F_PRESENT == 0 { None } else { Some(b) }
}

/// True while `id` still names the backend a flow was translated to. (Ids are reused after a
/// backend goes away, so the address and port are compared too.)
#[inline(always)]
pub fn still_backend(id: u32, addr: &Addr, port: u16) -> bool {
    match backend(id) {
        Some(b) => b.addr == *addr && b.port == port,
        None => false,
    }
}

/// Picks a backend id for a new flow of `svc`. `None`: the table pointed at nothing usable.
#[inline(always)]
pub fn pick(svc: &ServiceValue, key: &FlowKey, now: u64) -> Option<u32> {
    if svc.flags & SVC_F_AFFINITY != 0 {
        return pick_with_affinity(svc, key, now);
    }
    pick_slot(svc, key)
}

#[inline(always)]
fn pick_slot(svc: &ServiceValue, key: &FlowKey) -> Option<u32> {
    let hash = if config_flags() & CFG_F_RANDOM != 0 {
        // SAFETY: helper without arguments.
        unsafe { bpf_get_prandom_u32() }
    } else {
        flow_hash(key)
    };
    let slot = svc.maglev_offset.wrapping_add(maglev::slot(hash, svc.maglev_size));
    // Two slots to an element (`MAGLEV_SLOTS_PER_ENTRY`).
    let id = MAGLEV.get_ptr(slot / 2).map(|p| {
        // SAFETY: a valid map value pointer; one aligned word of it.
        unsafe { p.cast::<u32>().add((slot & 1) as usize).read() }
    })?;
    backend(id).map(|_| id)
}

#[inline(always)]
fn pick_with_affinity(svc: &ServiceValue, key: &FlowKey, now: u64) -> Option<u32> {
    let akey = AffinityKey { client: key.src, service_id: svc.service_id };
    if let Some(p) = AFFINITY.get_ptr_mut(&akey) {
        // SAFETY: a valid map value pointer, copied at once.
        let a = unsafe { p.read() };
        // Honoured only under the membership it was made for (`rules::affinity_honoured`).
        let m = member(svc.service_id, a.backend_id);
        if lb_common::rules::affinity_honoured(svc, &a, m, backend(a.backend_id).is_some(), now) {
            // SAFETY: valid pointer; at worst refreshes a recycled entry's timestamp.
            unsafe { core::ptr::addr_of_mut!((*p).last_seen_ns).write_volatile(now) };
            return Some(a.backend_id);
        }
    }
    let id = pick_slot(svc, key)?;
    let generation = member(svc.service_id, id).map(|m| m.generation).unwrap_or(0);
    let v = AffinityValue { backend_id: id, generation, last_seen_ns: now };
    let _ = AFFINITY.insert(&akey, &v, 0);
    Some(id)
}
