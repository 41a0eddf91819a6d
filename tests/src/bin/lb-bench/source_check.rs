//! Part of `prog`: the cost of the pod source check (`lb-ebpf/src/source_check.rs`) on the
//! TC new-flow path. BPF_PROG_TEST_RUN hands the TC program an skb on `lo` unless the
//! context names another interface, and the check asks the FIB where the client lives; so
//! the runs happen in a private network namespace with a veth interface that routes the
//! clients' prefix, named in the test context. The same SYNs (new flows) are timed with the
//! interface in `lb_pod_ports` (the check runs and passes) and without it (no check), for
//! three kinds of source: one seen within the second (cached), a new one that the agent
//! knows from a host route (what a veth-per-pod CNI gives each pod), and a new one only the
//! FIB can vouch for (a bridge CNI's pod, or a route the agent has not seen yet).

use std::collections::BTreeMap;

use anyhow::{Context as _, ensure};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::abi::{PROTO_TCP, PodSource, addr_from_ip};
use lb_tests::{harness::*, lab::spawn_in_netns, netns::routed_veth};
use lb_userspace::pod_sources;

const BES: [Be; 4] = [
    Be { id: 1, ip: "198.18.1.1", port: 9376 },
    Be { id: 2, ip: "198.18.1.2", port: 9376 },
    Be { id: 3, ip: "198.18.1.3", port: 9376 },
    Be { id: 4, ip: "198.18.1.4", port: 9376 },
];

/// Where the SYNs' sources come from.
#[derive(Clone, Copy, PartialEq)]
enum Sources {
    /// All from one address: after the first, the check's cache answers.
    Remembered,
    /// Each from another address, every one known to the check from a host route.
    Known,
    /// Each from another address, none known: a FIB lookup each.
    New,
}

/// The client address of call `i`.
fn client(sources: Sources, i: u32) -> std::net::Ipv4Addr {
    match sources {
        Sources::Remembered => std::net::Ipv4Addr::new(198, 18, 100, 1),
        Sources::Known | Sources::New => (u32::from(std::net::Ipv4Addr::new(198, 18, 128, 0)) + i).into(),
    }
}

/// Median ns of new-flow SYNs at TC with the check and without it: `calls` of each,
/// interleaved (the flow table fills as they go, so neither series gets the emptier table).
fn time_new_flows(l: &mut Loaded, ifindex: u32, calls: u32, sources: Sources) -> anyhow::Result<(f64, f64)> {
    let ctx = skb_ctx(ifindex);
    let (mut on, mut off) = (Vec::new(), Vec::new());
    let (checked, unchecked) = (BTreeMap::from([(ifindex, ifindex)]), BTreeMap::new());
    if sources == Sources::Known {
        // As the agent does, for the addresses of the checked calls.
        let known = (0..calls)
            .map(|i| PodSource { ifindex, addr: addr_from_ip(client(sources, 2 * i).into()) })
            .collect();
        pod_sources::apply(&mut l.ebpf, &known, &mut Default::default())?;
    }
    for i in 0..2 * calls {
        let check = i % 2 == 0;
        l.dp.set_pod_ports(if check { &checked } else { &unchecked })?;
        let client = client(sources, i).to_string();
        let pkt = Spec::tcp(&client, 1024 + (i % 60_000) as u16, "198.19.0.10", 80).build();
        let mut out = vec![0u8; pkt.len() + 64];
        let r = l.tc().test_run(TestRunOptions {
            data_in: Some(&pkt),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::new()
        })?;
        ensure!(r.return_value == TC_ACT_UNSPEC, "call {i}: return code {}", r.return_value);
        let ns = r.duration.as_nanos() as u64;
        if check { on.push(ns) } else { off.push(ns) }
    }
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2] as f64
    };
    Ok((median(on), median(off)))
}

/// Median ns of a new flow at TC, (with the check, without it), for a remembered source, a
/// known new source and an unknown new source.
pub struct CheckCosts {
    pub remembered: (f64, f64),
    pub known: (f64, f64),
    pub new: (f64, f64),
}

pub fn measure(calls: u32) -> anyhow::Result<CheckCosts> {
    let ns = routed_veth("src", &["198.18.100.0/24", "198.18.128.0/17"])?;
    // Two series of new flows per run, two entries each, within the 65 536-entry test table
    // (a fresh one per run); the known sources within the 16 384-entry cache.
    let calls = calls.min(15_000);
    // Loaded and run in the namespace, where the interface and its route are.
    spawn_in_netns(&ns.0, move || -> anyhow::Result<CheckCosts> {
        let ifindex = lb_userspace::links::interfaces().get("lbb0").copied().context("lbb0")?;
        let run = |sources| {
            let mut l = Loaded::new();
            program(&mut l.dp, 1, ("198.19.0.10", 80, PROTO_TCP), &BES, 0, 0);
            time_new_flows(&mut l, ifindex, calls, sources)
        };
        Ok(CheckCosts {
            remembered: run(Sources::Remembered)?,
            known: run(Sources::Known)?,
            new: run(Sources::New)?,
        })
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("timing thread panicked"))??
}
