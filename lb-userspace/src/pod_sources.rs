//! The pod source check's known sources: each checked pod interface's host routes (see
//! `routes`), written to `lb_pod_sources` with no expiry. The datapath then passes a pod's
//! first packet on a hash lookup; addresses no host route names (a bridge CNI, a route
//! added since the last scan) still pass through the FIB lookup.

use std::collections::{BTreeMap, BTreeSet};

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use lb_common::{
    abi::{KNOWN_SOURCE, PodSource, addr_from_ip},
    maps,
};

use crate::routes;

/// The host routes out of the interfaces in `checked` (name → ifindex).
pub fn wanted(checked: &BTreeMap<String, u32>) -> BTreeSet<PodSource> {
    routes::host_routes()
        .into_iter()
        .filter_map(|(iface, ip)| Some(PodSource { ifindex: *checked.get(&iface)?, addr: addr_from_ip(ip) }))
        .collect()
}

/// Brings the known sources in the loaded program's `lb_pod_sources` from `had` to `want`.
/// A known source that the LRU evicted is not put back until it leaves `want` and comes back:
/// meanwhile the FIB lookup serves it.
pub fn apply(
    ebpf: &mut Ebpf,
    want: &BTreeSet<PodSource>,
    had: &mut BTreeSet<PodSource>,
) -> anyhow::Result<()> {
    let map = ebpf
        .map_mut(maps::POD_SOURCES)
        .ok_or_else(|| anyhow::anyhow!("{} is not in the program", maps::POD_SOURCES))?;
    let mut map: HashMap<&mut MapData, PodSource, u64> = HashMap::try_from(map)?;
    for gone in had.difference(want) {
        // Already evicted, or since overwritten by a timed entry: either way not known now.
        let _ = map.remove(gone);
    }
    for new in want.difference(had) {
        map.insert(new, KNOWN_SOURCE, 0)?;
    }
    had.clone_from(want);
    Ok(())
}
