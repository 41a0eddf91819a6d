//! Backend choice for a new flow: ClientIP affinity if the service asks for it, else the
//! service's Maglev range indexed by the flow hash (or a random slot with `--lb-algorithm
//! random`).

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use lb_common::{abi::*, hash::flow_hash, maglev};

use aya_ebpf::maps::lpm_trie::Key;

use crate::maps::{AFFINITY, BACKENDS, CONFIG, MAGLEV, SOURCE_RANGES};

/// Datapath-wide flags (`CFG_F_*`).
#[inline(always)]
pub fn config_flags() -> u32 {
    CONFIG.get(0).map(|c| c.flags).unwrap_or(0)
}

/// The source NAT address for a flow of this family, if one is configured.
#[inline(always)]
pub fn snat_addr(client: &Addr) -> Option<Addr> {
    let c = CONFIG.get(0)?;
    let a = if is_v4(client) { c.snat_v4 } else { c.snat_v6 };
    if a == [0; 4] { None } else { Some(a) }
}

/// Whether a new flow to `be` must be source-NATed: external traffic to a backend on another
/// node (its reply must come back through us), and hairpin (a pod reaching itself through
/// its Service would otherwise see its own address as the source).
#[inline(always)]
pub fn needs_snat(svc: &ServiceValue, be: &BackendValue, key: &FlowKey) -> bool {
    (svc.flags & SVC_F_EXTERNAL != 0 && be.flags & BE_F_LOCAL == 0) || be.addr == key.src
}

/// `loadBalancerSourceRanges`: is `src` inside one of the service's ranges?
#[inline(always)]
pub fn source_allowed(service_id: u32, src: &Addr) -> bool {
    let key = Key::new(32 + 128, SourceRangeKey { service_id, addr: *src });
    SOURCE_RANGES.get(&key).is_some()
}

/// The backend entry for `id`, if it is in use.
#[inline(always)]
pub fn backend(id: u32) -> Option<&'static BackendValue> {
    let b = BACKENDS.get(id)?;
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
pub fn pick(svc: &ServiceValue, key: &FlowKey) -> Option<u32> {
    if svc.flags & SVC_F_AFFINITY != 0 {
        return pick_with_affinity(svc, key);
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
    let slot = maglev::slot(hash, svc.maglev_size);
    let id = *MAGLEV.get(svc.maglev_offset.wrapping_add(slot))?;
    backend(id).map(|_| id)
}

#[inline(always)]
fn pick_with_affinity(svc: &ServiceValue, key: &FlowKey) -> Option<u32> {
    let akey = AffinityKey { client: key.src, service_id: svc.service_id };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = svc.affinity_timeout as u64 * 1_000_000_000;
    if let Some(a) = AFFINITY.get_ptr_mut(&akey) {
        // SAFETY: valid map value pointer; a racing update at worst refreshes a timestamp.
        unsafe {
            if now.wrapping_sub((*a).last_seen_ns) < timeout_ns && backend((*a).backend_id).is_some() {
                (*a).last_seen_ns = now;
                return Some((*a).backend_id);
            }
        }
    }
    let id = pick_slot(svc, key)?;
    let v = AffinityValue { backend_id: id, _pad: 0, last_seen_ns: now };
    let _ = AFFINITY.insert(&akey, &v, 0);
    Some(id)
}
