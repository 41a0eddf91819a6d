//! Datapath rules the host applies too (`lb explain`): one copy, used by the programs and
//! by the agent's tools, so an explanation cannot drift from what the programs do.

use crate::abi::*;

/// Whether a new flow to backend `be` of service `svc` from `client` must be source-NATed:
/// external traffic to a backend on another node (its reply must come back through us), and
/// hairpin (a pod reaching itself through its Service would see its own address as the
/// source).
#[inline(always)]
pub fn needs_snat(svc: &ServiceValue, be: &BackendValue, client: &Addr) -> bool {
    (svc.flags & SVC_F_EXTERNAL != 0 && be.flags & BE_F_LOCAL == 0) || be.addr == *client
}

/// Whether a frontend with no usable backend drops (true) or refuses (false) a new flow:
/// its own flag (traffic policy Local without a local endpoint) or `--no-backend-response
/// drop` (`config_flags`).
#[inline(always)]
pub fn no_backend_drops(svc: &ServiceValue, config_flags: u32) -> bool {
    svc.flags & SVC_F_DROP_NO_BACKEND != 0 || config_flags & CFG_F_NO_BACKEND_DROP != 0
}

/// Whether affinity entry `a` of service `svc` still decides a new flow at `now_ns`: not
/// expired, and made under the membership that still holds (`member`: the backend's
/// membership of `svc` now, if any): the backend has not left, turned terminating, or left
/// and come back (maybe as another pod under the same id). `backend_present`: the backend
/// id is in use.
#[inline(always)]
pub fn affinity_honoured(
    svc: &ServiceValue,
    a: &AffinityValue,
    member: Option<MemberValue>,
    backend_present: bool,
    now_ns: u64,
) -> bool {
    let timeout_ns = svc.affinity_timeout as u64 * 1_000_000_000;
    let current = member.is_some_and(|m| m.generation == a.generation && m.flags & MEMBER_F_USABLE != 0);
    now_ns.wrapping_sub(a.last_seen_ns) < timeout_ns && current && backend_present
}
