//! `prog`, the drop and reject path with and without `lb monitor`: SYNs to a Service with no
//! endpoint, each answered with a RST at XDP, timed in alternating blocks with no monitor
//! lease and with one held (the event written to the ring, which is drained between calls,
//! outside the timed run). The hit and new-flow paths carry no event code: the main table
//! shows them against the previous revision.

use std::time::Duration;

use anyhow::Context as _;
use aya::{
    maps::{Array, HashMap, MapData, RingBuf},
    programs::Xdp,
};
use lb_common::abi::*;
use lb_tests::harness::*;
use lb_userspace::loader;

const BLOCK: u32 = 500;

/// Median gross ns per rejected SYN: (no monitor, a monitor holding the lease).
pub fn measure(calls: u32) -> anyhow::Result<(f64, f64)> {
    let caps = loader::Capacities { frontends: 1024, flows: 8192, ..Default::default() };
    let mut v = crate::prog::load(loader::EBPF_OBJECT, "monitor", &caps)?;
    let vip = "198.19.9.9";
    {
        let mut services: HashMap<_, ServiceKey, ServiceValue> =
            HashMap::try_from(v.ebpf.map_mut("lb_services").context("lb_services")?)?;
        let none = ServiceValue { service_id: 1, ..Default::default() };
        services.insert(ServiceKey::new(ip(vip), 80, PROTO_TCP), none, 0)?;
    }
    // Listed in the address pre-filter, as the agent lists every frontend.
    crate::prog::list_addresses(&mut v.ebpf, std::iter::once(ip(vip)))?;
    let mut lease: Array<MapData, MonitorLease> =
        Array::try_from(v.ebpf.take_map("lb_monitor").context("lb_monitor")?)?;
    let mut ring = RingBuf::try_from(v.ebpf.take_map("lb_events").context("lb_events")?)?;
    let prog: &Xdp = v.ebpf.program(loader::XDP_PROGRAM).unwrap().try_into()?;
    let syn = Spec::tcp("198.18.100.1", 40000, vip, 80).build();
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let mut events = 0u64;
    for i in 0..2 * calls {
        let watching = (i / BLOCK) % 2 == 1;
        if i % BLOCK == 0 {
            let until_ns = if watching { u64::MAX } else { 0 };
            let kinds = 1 << EVENT_DROP | 1 << EVENT_REJECT;
            lease.set(0, MonitorLease { until_ns, kinds, sample: 1 }, 0)?;
        }
        let (rc, _, ns) = run_timed(prog, &syn);
        anyhow::ensure!(rc == XDP_TX, "call {i}: return code {rc}, expected XDP_TX (a RST)");
        if watching {
            on.push(ns);
            while ring.next().is_some() {
                events += 1;
            }
        } else {
            off.push(ns);
        }
    }
    anyhow::ensure!(events == calls as u64, "{events} events read for {calls} watched calls");
    // No event may come while no monitor watches.
    std::thread::sleep(Duration::from_millis(10));
    anyhow::ensure!(ring.next().is_none(), "an event with no lease");
    Ok((crate::prog::median(off), crate::prog::median(on)))
}
