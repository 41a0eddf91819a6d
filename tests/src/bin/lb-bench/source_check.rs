//! Part of `prog`: the cost of the pod source check (`lb-ebpf/src/source_check.rs`) on the
//! TC new-flow path. BPF_PROG_TEST_RUN hands the TC program an skb on `lo` unless the
//! context names another interface, and the check asks about the interface the packet
//! came in on; so the runs happen in a private network namespace with veth interfaces that
//! route the clients, named in the test context. The same SYNs (new flows) are timed with
//! the interfaces in `lb_pod_ports` (the check runs and passes) and without (no check), for
//! three kinds of source:
//!
//! * a full node's pods (kubelet's default 110), each on its own veth with a /32 route, its
//!   address given to the check with its interface as the agent does, SYNs from each in turn;
//! * one address the check knows from neither, routed out of the interface: a FIB lookup
//!   once, then remembered for a second;
//! * every SYN from a new such address: a FIB lookup each (a bridge CNI's pods, or a route
//!   the agent has not read yet).

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context as _, ensure};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::abi::{PROTO_TCP, PodPort};
use lb_tests::{harness::*, lab::spawn_in_netns, netns::Scratch};

const BES: [Be; 4] = [
    Be { id: 1, ip: "198.18.1.1", port: 9376 },
    Be { id: 2, ip: "198.18.1.2", port: 9376 },
    Be { id: 3, ip: "198.18.1.3", port: 9376 },
    Be { id: 4, ip: "198.18.1.4", port: 9376 },
];

/// A node's pods: kubelet's default `--max-pods`.
const NODE_PODS: u32 = 110;

/// Pod `k`'s address (on interface `lbp{k}`).
fn pod_ip(k: u32) -> Ipv4Addr {
    (u32::from(Ipv4Addr::new(198, 18, 100, 0)) + k).into()
}

/// Where the SYNs come from.
#[derive(Clone, Copy)]
enum Sources {
    /// The node's pods in turn, each on its interface with its address known.
    Pods,
    /// One address routed out of `lbf`: a FIB lookup, then the cache.
    Remembered,
    /// A new address routed out of `lbf` every time: a FIB lookup each.
    New,
}

/// (interface name, client address) of call `i`.
fn source(sources: Sources, i: u32) -> (String, Ipv4Addr) {
    let fresh = u32::from(Ipv4Addr::new(198, 18, 128, 0));
    match sources {
        Sources::Pods => (format!("lbp{}", i % NODE_PODS), pod_ip(i % NODE_PODS)),
        Sources::Remembered => ("lbf".into(), Ipv4Addr::from(fresh)),
        Sources::New => ("lbf".into(), Ipv4Addr::from(fresh + i)),
    }
}

/// Calls in a row with the check, then as many without: few map rewrites between calls.
const BLOCK: u32 = 500;

/// Median ns of new-flow SYNs at TC with the check and without it: `calls` of each, in
/// alternating blocks over the same sources (the flow table fills as they go, so neither
/// series gets the emptier table).
fn time_new_flows(l: &mut Loaded, calls: u32, sources: Sources) -> anyhow::Result<(f64, f64)> {
    let interfaces = lb_userspace::links::interfaces();
    let ifindex = |name: &str| interfaces.get(name).copied().with_context(|| name.to_string());
    // As the agent sets them: each interface, its pod's address if a host route names it.
    let mut checked = BTreeMap::new();
    for k in 0..NODE_PODS {
        checked.insert(
            ifindex(&format!("lbp{k}"))?,
            PodPort::new(ifindex(&format!("lbp{k}"))?, &[pod_ip(k).into()]),
        );
    }
    checked.insert(ifindex("lbf")?, PodPort::new(ifindex("lbf")?, &[]));
    let unchecked = BTreeMap::new();
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for i in 0..2 * calls {
        let (block, nth) = (i / BLOCK, i % BLOCK);
        let check = block % 2 == 0;
        if nth == 0 {
            l.dp.set_pod_ports(if check { &checked } else { &unchecked })?;
        }
        let (dev, client) = source(sources, block / 2 * BLOCK + nth);
        let ctx = skb_ctx(ifindex(&dev)?);
        let pkt = Spec::tcp(&client.to_string(), 1024 + (i % 60_000) as u16, "198.19.0.10", 80).build();
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

/// Median ns of a new flow at TC, (with the check, without it), per kind of source.
pub struct CheckCosts {
    pub pods: (f64, f64),
    pub remembered: (f64, f64),
    pub new: (f64, f64),
}

/// The namespace: `lbp0..lbp109` with a /32 route each, and `lbf` routing a /17 of clients
/// unknown to the check.
fn node(role: &str) -> anyhow::Result<Scratch> {
    let ns = Scratch::new(role)?;
    let mut batch = String::new();
    for k in 0..NODE_PODS {
        batch +=
            &format!("link add lbp{k} type veth peer name lbq{k}\nlink set lbp{k} up\nlink set lbq{k} up\n");
        batch += &format!("route add {}/32 dev lbp{k}\n", pod_ip(k));
    }
    batch += "link add lbf type veth peer name lbg\nlink set lbf up\nlink set lbg up\n";
    batch += "route add 198.18.128.0/17 dev lbf\n";
    let file = std::env::temp_dir().join(format!("lb-bench-{}-{role}.ip", std::process::id()));
    std::fs::write(&file, batch)?;
    let done = lb_tests::lab::ip(&format!("-n {} -batch {}", ns.0, file.display()));
    let _ = std::fs::remove_file(&file);
    done?;
    lb_tests::lab::sysctl(&ns.0, "net.ipv4.ip_forward", "1")?;
    Ok(ns)
}

pub fn measure(calls: u32) -> anyhow::Result<CheckCosts> {
    let ns = node("src")?;
    // Two series of new flows per run, two entries each, within the 65 536-entry test table
    // (a fresh one per run).
    let calls = calls.min(15_000) / BLOCK * BLOCK;
    // Loaded and run in the namespace, where the interfaces and their routes are.
    spawn_in_netns(&ns.0, move || -> anyhow::Result<CheckCosts> {
        let run = |sources| {
            let mut l = Loaded::new();
            program(&mut l.dp, 1, ("198.19.0.10", 80, PROTO_TCP), &BES, 0, 0);
            time_new_flows(&mut l, calls, sources)
        };
        Ok(CheckCosts {
            pods: run(Sources::Pods)?,
            remembered: run(Sources::Remembered)?,
            new: run(Sources::New)?,
        })
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("timing thread panicked"))??
}
