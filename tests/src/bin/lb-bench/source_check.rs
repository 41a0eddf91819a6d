//! Part of `prog`: the cost of the pod source check (`lb-ebpf/src/source_check.rs`) on the
//! TC new-flow path. BPF_PROG_TEST_RUN hands the TC program an skb on `lo` unless the
//! context names another interface, and the check asks the FIB where the client lives; so
//! the runs happen in a private network namespace with a veth interface that routes the
//! clients' prefix, named in the test context. The same SYNs (new flows) are timed with the
//! interface in `lb_pod_ports` (the check runs and passes) and without it (no check).

use std::{collections::BTreeMap, process::Command};

use anyhow::{Context as _, ensure};

use crate::netns::Scratch;
use aya::programs::{TestRun, TestRunOptions};
use lb_common::abi::PROTO_TCP;
use lb_tests::{
    harness::*,
    lab::{sh, spawn_in_netns},
};

const BES: [Be; 4] = [
    Be { id: 1, ip: "198.18.1.1", port: 9376 },
    Be { id: 2, ip: "198.18.1.2", port: 9376 },
    Be { id: 3, ip: "198.18.1.3", port: 9376 },
    Be { id: 4, ip: "198.18.1.4", port: 9376 },
];

/// `struct __sk_buff` naming `ifindex` (its field at byte 40), the rest zero.
fn skb_ctx(ifindex: u32) -> [u8; 192] {
    let mut c = [0u8; 192];
    c[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    c
}

/// Median ns of new-flow SYNs at TC with the check and without it: `calls` of each,
/// interleaved (the flow table fills as they go, so neither series gets the emptier table).
/// `fresh`: every SYN from another client address (the check's cache never helps), else all
/// from one (it always does, after the first).
fn time_new_flows(l: &mut Loaded, ifindex: u32, calls: u32, fresh: bool) -> anyhow::Result<(f64, f64)> {
    let ctx = skb_ctx(ifindex);
    let (mut on, mut off) = (Vec::new(), Vec::new());
    let (checked, unchecked) = (BTreeMap::from([(ifindex, ifindex)]), BTreeMap::new());
    for i in 0..2 * calls {
        let check = i % 2 == 0;
        l.dp.set_pod_ports(if check { &checked } else { &unchecked })?;
        let client = if fresh {
            std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 128, 0)) + i).to_string()
        } else {
            "198.18.100.1".to_string()
        };
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

/// Median ns of a new flow at TC: (with the check and a remembered source, without the
/// check) and (with the check and a new source every time, without the check).
pub type CheckCosts = ((f64, f64), (f64, f64));

pub fn measure(calls: u32) -> anyhow::Result<CheckCosts> {
    let ns = Scratch::new("src")?;
    for cmd in [
        "ip link add lbb0 type veth peer name lbb1",
        "ip link set lbb0 up",
        "ip link set lbb1 up",
        "ip route add 198.18.100.0/24 dev lbb0",
        "ip route add 198.18.128.0/17 dev lbb0",
        "sysctl -qw net.ipv4.ip_forward=1",
    ] {
        sh(Command::new("ip").args(["netns", "exec", &ns.0]).args(cmd.split(' ')))?;
    }
    // Two runs of two series of new flows, two entries each, within the 65 536-entry test
    // table: a fresh one per run.
    let calls = calls.min(15_000);
    // Loaded and run in the namespace, where the interface and its route are.
    spawn_in_netns(&ns.0, move || -> anyhow::Result<CheckCosts> {
        let ifindex = lb_userspace::links::interfaces().get("lbb0").copied().context("lbb0")?;
        let run = |fresh| {
            let mut l = Loaded::new();
            program(&mut l.dp, 1, ("198.19.0.10", 80, PROTO_TCP), &BES, 0, 0);
            time_new_flows(&mut l, ifindex, calls, fresh)
        };
        Ok((run(false)?, run(true)?))
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("timing thread panicked"))??
}
