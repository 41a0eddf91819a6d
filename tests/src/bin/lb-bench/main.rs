//! Benchmark measurements that need the real datapath (run by `cargo xtask bench ...`).
//!
//! `control` (control.rs): how fast a Service set reaches the datapath, vs iptables-restore
//! and nft -f of kube-proxy-shaped rules. `latency`, `connrate` (clients.rs): real TCP
//! clients in the lab, via the VIP and direct.
//!
//! `prog`: BPF_PROG_TEST_RUN cost per packet of `lb_xdp` — conntrack hit, new flow, no
//! frontend — with 1 to 100 000 services loaded, beside an empty XDP program timed the same
//! way in the same run (DESIGN.md §7): one run per call (repeat = 1, since with repeat > 1 the
//! kernel re-runs the already rewritten packet), many calls, median of the kernel-reported
//! durations, every return code checked, `kernel.bpf_stats_enabled` off and restored.

use std::{fs, net::Ipv4Addr, path::PathBuf, time::Instant};

use anyhow::{Context as _, bail, ensure};
use aya::{EbpfLoader, programs::Xdp};
use clap::{Parser, Subcommand};
use lb_common::abi::*;
use lb_tests::harness::*;
use lb_userspace::{dataplane::Dataplane, loader, maglev};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

mod clients;
mod control;
mod first_packet;
mod forward;
mod load;
mod netns;
mod plot;
mod services;
mod topo;

/// The options of a sweep over service counts against iptables and nftables.
#[derive(clap::Args)]
struct Sweep {
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Service counts to sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,30000")]
    services: Vec<u32>,
    /// nftables is loaded up to this many services (nft -f takes ~20-100 s at 10k here).
    #[arg(long, default_value_t = 10_000)]
    nft_max: u32,
}

#[derive(Subcommand)]
enum Cmd {
    /// First-packet latency vs number of services (ours, iptables, nftables, through a
    /// forwarding namespace), and connect / request-response from a lab pod via the VIP and
    /// direct.
    Latency(#[command(flatten)] Sweep),
    /// New connections per second from a lab pod, via the VIP and direct.
    Connrate {
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// Full sync and one-endpoint change: ours vs iptables-restore vs nft -f; Maglev
    /// disruption.
    Control {
        /// Smaller sweep (1k, 10k, 30k) and a 2-minute cap per baseline step.
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// Service counts (default: 1000,10000,30000 with --quick, else also 100000).
        #[arg(long, value_delimiter = ',')]
        services: Vec<u32>,
        /// nft -f is run up to this many services (it is slow: ~100 s at 10k here).
        #[arg(long, default_value_t = 10_000)]
        nft_max: u32,
    },
    /// Established flows through a forwarding node: ours vs iptables vs nftables vs plain
    /// forwarding, delivered packets/s and CPU ns per packet.
    Throughput {
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// Every packet a new flow, 1 to 30 000 services: packets/s per variant and its slope.
    Newflows(#[command(flatten)] Sweep),
    /// Per-packet program cost vs number of services.
    Prog {
        /// Fewer calls per case and a smaller sweep.
        #[arg(long)]
        quick: bool,
        /// Where to write prog.md / prog.json.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// Service counts to sweep.
        #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,100000")]
        services: Vec<u32>,
    },
}

/// Katran on these machines, same method, net of the empty program (DESIGN.md §7).
const KATRAN_NET_NEW_TCP: f64 = 873.0;
const KATRAN_NET_HIT_TCP: f64 = 210.0;
const KATRAN_NET_MISS: f64 = 93.0;

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns `kernel.bpf_stats_enabled` off for the measurement and restores it on drop.
struct StatsOff(Option<String>);

impl StatsOff {
    fn new() -> Self {
        let old = fs::read_to_string(STATS_SYSCTL).ok();
        let _ = fs::write(STATS_SYSCTL, "0");
        StatsOff(old)
    }
}

impl Drop for StatsOff {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = fs::write(STATS_SYSCTL, old.trim());
        }
    }
}

fn median(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    v[v.len() / 2] as f64
}

/// Times `calls` single runs of `prog`, packet from `make(i)`, checking each return code.
fn time(prog: &Xdp, calls: u32, want_rc: u32, make: &mut dyn FnMut(u32) -> Vec<u8>) -> anyhow::Result<f64> {
    let mut d = Vec::with_capacity(calls as usize);
    for i in 0..calls {
        let pkt = make(i);
        let (rc, _, ns) = run_timed(prog, &pkt);
        ensure!(rc == want_rc, "call {i}: return code {rc}, expected {want_rc}");
        d.push(ns);
    }
    Ok(median(d))
}

fn vip(i: u32) -> String {
    // 198.19.0.0/16 holds 65 536 VIPs; beyond that, vary the port instead (below).
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + (i % 65_536)).to_string()
}

fn port(i: u32) -> u16 {
    80 + (i / 65_536) as u16
}

struct Row {
    services: u32,
    hit: f64,
    new: f64,
    miss: f64,
    empty: f64,
    setup_ms: u128,
}

fn measure(services: u32, calls: u32, empty: &Xdp) -> anyhow::Result<Row> {
    const BACKENDS: u32 = 4;
    let m = maglev::table_size(BACKENDS as usize, lb_common::maglev::DEFAULT_MAX_TABLE);
    let caps = loader::Capacities {
        frontends: services.max(1024),
        maglev_slots: (services * m).max(1 << 16),
        flows: 2 * calls + 4096,
        ..Default::default()
    };
    let t = Instant::now();
    let mut l = Loaded::with_caps(&caps);
    let bes: Vec<(u32, Vec<u8>)> =
        (1..=BACKENDS).map(|i| (i, format!("198.18.1.{i}:9376").into_bytes())).collect();
    for (id, _) in &bes {
        l.dp.set_backend(*id, &BackendValue::new(ip(&format!("198.18.1.{id}")), 9376, BE_F_PRESENT))?;
    }
    let table = maglev::build(&bes, m);
    for s in 0..services {
        // Every service gets its own range, as in production.
        l.dp.write_maglev(s * m, &table)?;
        let value = ServiceValue {
            service_id: s,
            backend_count: BACKENDS,
            maglev_offset: s * m,
            maglev_size: m,
            flags: 0,
            affinity_timeout: 0,
        };
        l.dp.set_service(&ServiceKey::new(ip(&vip(s)), port(s), PROTO_TCP), &value)?;
    }
    let setup_ms = t.elapsed().as_millis();
    // The measured frontend is the last one inserted.
    let (target, tport) = (vip(services - 1), port(services - 1));
    let prog = l.xdp();

    let syn = Spec::tcp("198.18.100.1", 40000, &target, tport);
    ensure!(run_timed(prog, &syn.build()).0 == XDP_PASS, "warm-up SYN not passed");
    let ack = syn.clone().flags(TCP_ACK).build();
    let hit = time(prog, calls, XDP_PASS, &mut |_| ack.clone())?;

    // A fresh 5-tuple on every call: source address and port both vary.
    let new = time(prog, calls, XDP_PASS, &mut |i| {
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + (i / 50_000));
        Spec::tcp(&src.to_string(), 10_000 + (i % 50_000) as u16, &target, tport).build()
    })?;
    let miss_pkt = Spec::tcp("198.18.100.1", 40000, "198.18.0.1", 80).build();
    let miss = time(prog, calls, XDP_PASS, &mut |_| miss_pkt.clone())?;
    let empty = time(empty, calls, XDP_PASS, &mut |_| ack.clone())?;
    Ok(Row { services, hit, new, miss, empty, setup_ms })
}

fn prog(quick: bool, out: PathBuf, sweep: &[u32]) -> anyhow::Result<()> {
    if !privileged() {
        bail!("bench prog needs root");
    }
    let calls = if quick { 20_000 } else { 100_000 };
    let _stats = StatsOff::new();
    let mut floor = EbpfLoader::new().load(loader::EMPTY_OBJECT).context("loading the empty program")?;
    let empty: &mut Xdp = floor.program_mut("lb_empty").context("lb_empty")?.try_into()?;
    empty.load()?;
    let empty: &Xdp = floor.program("lb_empty").unwrap().try_into()?;

    let mut rows = Vec::new();
    for &n in sweep.iter().filter(|n| **n > 0) {
        eprintln!("bench prog: {n} services, {calls} calls per case ...");
        let r = measure(n, calls, empty)?;
        eprintln!(
            "  hit {:.0} ns, new flow {:.0} ns, miss {:.0} ns, empty {:.0} ns (maps filled in {} ms)",
            r.hit, r.new, r.miss, r.empty, r.setup_ms
        );
        rows.push(r);
    }

    let first = &rows[0];
    let last = rows.last().unwrap();
    let mut md = String::new();
    md.push_str(&format!(
        "### `cargo xtask bench prog` — {}\n\nKernel {}, {} CPUs; BPF_PROG_TEST_RUN, repeat 1, median of {calls} calls per cell, `bpf_stats_enabled=0`. Net = minus the empty XDP program measured in the same run and row.\n\n",
        if quick { "quick" } else { "full" },
        kernel(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    ));
    md.push_str("| services | empty (ns) | conntrack hit (ns) | new flow (ns) | no frontend (ns) | net hit | net new | net miss |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in &rows {
        md.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            r.services,
            r.empty,
            r.hit,
            r.new,
            r.miss,
            r.hit - r.empty,
            r.new - r.empty,
            r.miss - r.empty
        ));
    }
    let flat = |f: fn(&Row) -> f64| f(last) / f(first);
    let net = |v: f64, e: f64| (v - e).max(1.0);
    md.push_str(&format!(
        "\nScaling, cost at {} services / cost at 1 (goal ≤ 1.15): hit {:.2}, new flow {:.2}, miss {:.2}.\n\n",
        last.services,
        flat(|r| r.hit),
        flat(|r| r.new),
        flat(|r| r.miss)
    ));
    md.push_str(&format!(
        "Net cost vs Katran (same method on these machines: TCP SYN {KATRAN_NET_NEW_TCP:.0} ns, TCP ACK hit {KATRAN_NET_HIT_TCP:.0} ns, miss {KATRAN_NET_MISS:.0} ns; goal ≤ 0.80) at {} services: new flow {:.2}, hit {:.2}, miss {:.2}.\n",
        last.services,
        net(last.new, last.empty) / KATRAN_NET_NEW_TCP,
        net(last.hit, last.empty) / KATRAN_NET_HIT_TCP,
        net(last.miss, last.empty) / KATRAN_NET_MISS,
    ));
    println!("{md}");
    fs::create_dir_all(&out)?;
    fs::write(out.join("prog.md"), &md)?;
    let j = json!({
        "kernel": kernel(),
        "calls": calls,
        "rows": rows.iter().map(|r| json!({
            "services": r.services, "empty_ns": r.empty, "hit_ns": r.hit, "new_flow_ns": r.new,
            "miss_ns": r.miss, "setup_ms": r.setup_ms as u64,
        })).collect::<Vec<_>>(),
    });
    fs::write(out.join("prog.json"), serde_json::to_string_pretty(&j)?)?;
    let line = |name: &str, f: fn(&Row) -> f64| {
        plot::Series::new(name, rows.iter().map(|r| (r.services, Some(f(r)))))
    };
    plot::chart(
        &out.join("prog.png"),
        "lb_xdp cost per packet vs services (BPF_PROG_TEST_RUN)",
        "ns per packet",
        &[
            line("new flow", |r| r.new),
            line("conntrack hit", |r| r.hit),
            line("no frontend", |r| r.miss),
            line("empty program", |r| r.empty),
        ],
    )?;
    eprintln!("bench prog: wrote {}", out.join("prog.md").display());
    Ok(())
}

fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string()
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Prog { quick, out, services } => prog(quick, out, &services),
        Cmd::Latency(s) => clients::latency(s.quick, s.out, &s.services, s.nft_max),
        Cmd::Connrate { quick, out } => clients::connrate(quick, out),
        Cmd::Throughput { quick, out } => forward::throughput(quick, out),
        Cmd::Newflows(s) => forward::newflows(s.quick, s.out, &s.services, s.nft_max),
        Cmd::Control { quick, out, services, nft_max } => {
            let sweep = if !services.is_empty() {
                services
            } else if quick {
                vec![1_000, 10_000, 30_000]
            } else {
                vec![1_000, 10_000, 30_000, 100_000]
            };
            control::run(quick, out, &sweep, nft_max)
        }
    }
}
