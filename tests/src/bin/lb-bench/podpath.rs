//! `podpath`: pod → ClusterIP → pod in the two-node lab, to a backend on the client's node
//! (local) and on the other node (remote): a TCP stream (iperf3) and request/response on one
//! connection (lb-serve), with the machine's CPU time over each run. Variants, each in a lab
//! of its own so no variant's hooks reach another's (the labs are all up at once, in their
//! own namespaces, and the variants take turns: round after round, each variant runs once,
//! so a slow spell of the VM falls on all of them alike; request/response in 100 ms slices,
//! `SLICE`, on connections kept open):
//!
//! * direct: pod to pod, nothing loaded (the floor);
//! * direct with an empty XDP program on both nodes' underlay interface: the floor for any
//!   XDP datapath in this lab, where the underlay is a veth (a veth hands a cloned or
//!   non-linear skb — every TCP segment a local socket sends — to XDP only after copying it
//!   into a page of its own);
//! * iptables, nftables: kube-proxy's rules for the same Services on the client's node;
//! * ours through the stack (`--host-routing=false`) and with TC host routing;
//! * ours with TC host routing and the TC program on the node interfaces instead of XDP
//!   (`--node-hook tc`), which spares the underlay veth its copy for XDP.
//!
//! Goals (issue 15): CPU per byte ≥ 1.5× better than iptables, request/response ≥ 0.98× direct.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use lb_tests::{
    harness::privileged,
    lab::{Bins, Lab, POD_PORT, in_netns, in_ns, sa, sh, slice_yaml, wait_for},
};
use serde_json::json;

use crate::{load::busy_ns, services::*};

const STREAM_PORT: u16 = 5201;
const GOAL_CPU_PER_BYTE: f64 = 1.5;
const GOAL_RR_VS_DIRECT: f64 = 0.98;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Direct,
    DirectEmptyXdp,
    Iptables,
    Nftables,
    OursStack,
    OursHostRouting,
    OursNodeTc,
}

impl Variant {
    const ALL: [Variant; 7] = [
        Variant::Direct,
        Variant::DirectEmptyXdp,
        Variant::Iptables,
        Variant::Nftables,
        Variant::OursStack,
        Variant::OursHostRouting,
        Variant::OursNodeTc,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct pod → pod",
            Variant::DirectEmptyXdp => "direct, empty XDP on the underlay",
            Variant::Iptables => "iptables (kube-proxy)",
            Variant::Nftables => "nftables (kube-proxy)",
            Variant::OursStack => "ours, through the stack",
            Variant::OursHostRouting => "ours, host routing",
            Variant::OursNodeTc => "ours, host routing, node hook at TC",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::DirectEmptyXdp => "direct_empty_xdp",
            Variant::Iptables => "iptables",
            Variant::Nftables => "nftables",
            Variant::OursStack => "ours_stack",
            Variant::OursHostRouting => "ours_host_routing",
            Variant::OursNodeTc => "ours_node_tc",
        }
    }
}

/// Where the backend is: `web-1` on the client's node, `web-3` on the other.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Local,
    Remote,
}

impl Backend {
    fn pod(self) -> &'static str {
        match self {
            Backend::Local => "web-1",
            Backend::Remote => "web-3",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Backend::Local => "local",
            Backend::Remote => "remote",
        }
    }
}

/// The Service (index into `services::vip`, port 80) for a backend and target port.
fn service_index(b: Backend, target: u16) -> u32 {
    20 + (b == Backend::Remote) as u32 + 2 * (target == STREAM_PORT) as u32
}

/// The four Services: request/response and stream, to the local and to the remote backend.
fn services() -> impl Iterator<Item = (u32, Backend, u16)> {
    [Backend::Local, Backend::Remote]
        .into_iter()
        .flat_map(|b| [POD_PORT, STREAM_PORT].map(|port| (service_index(b, port), b, port)))
}

/// The four Services with their one endpoint each, for the iptables and nftables rules.
fn service_set(lab: &Lab) -> Vec<(u32, Vec<(Ipv4Addr, u16)>)> {
    services().map(|(i, b, port)| (i, vec![(lab.pod(b.pod()).ip, port)])).collect()
}

fn manifests(lab: &Lab) -> String {
    let mut y = String::new();
    for (i, b, port) in services() {
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}}}\nspec: {{clusterIP: {}, ports: [{{name: http, port: {}, targetPort: {port}}}]}}\n---\n{}---\n",
            vip(i),
            svc_port(i),
            slice_yaml(
                &format!("svc-{i}-a"),
                &format!("svc-{i}"),
                &[("http", port, "TCP")],
                &[(lab.pod(b.pod()), "ready: true")]
            )
        );
    }
    y
}

/// An iperf3 server in each backend pod, stopped (by pid) when dropped.
struct Servers(Vec<Child>);

impl Servers {
    fn start(lab: &Lab) -> anyhow::Result<Servers> {
        let mut v = Vec::new();
        for b in [Backend::Local, Backend::Remote] {
            let child = in_ns(&lab.pod(b.pod()).ns, &["iperf3", "-s", "-p", &STREAM_PORT.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting iperf3 -s (cargo xtask setup installs it)")?;
            v.push(child);
        }
        let servers = Servers(v);
        for b in [Backend::Local, Backend::Remote] {
            let to = sa(lab.pod(b.pod()).ip, STREAM_PORT);
            wait_for(Duration::from_secs(5), || {
                in_netns(&lab.pod("client").ns, move || {
                    TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_ok()
                })
            })
            .with_context(|| format!("iperf3 server on {to}"))?;
        }
        Ok(servers)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One measurement: what moved and the machine's CPU time for it.
#[derive(Clone, Debug, Default)]
struct Cell {
    /// Stream: bytes received per second.
    stream_bps: f64,
    /// Stream: CPU ns per byte (= CPU seconds per GB).
    stream_cpu_ns_per_byte: f64,
    /// Request/response: round trips per second on one connection.
    rr_per_s: f64,
    /// Request/response: CPU µs per round trip.
    rr_cpu_us: f64,
    /// Request/response: round trips per second in each round's slice.
    rr_slices: Vec<f64>,
}

/// The median over rounds of `a`'s rate ÷ `b`'s in the same round: the two ran one slice
/// apart, so the VM's moods fall on both.
fn paired_ratio(a: &Cell, b: &Cell) -> f64 {
    let r: Vec<f64> = a.rr_slices.iter().zip(&b.rr_slices).map(|(x, y)| x / y.max(1e-9)).collect();
    if r.is_empty() { a.rr_per_s / b.rr_per_s.max(1e-9) } else { crate::control::median(r) }
}

fn stream(ns: &str, to: SocketAddr, secs: u32) -> anyhow::Result<(f64, f64)> {
    let cpu0 = busy_ns()?;
    let out = sh(&mut in_ns(
        ns,
        &["iperf3", "-c", &to.ip().to_string(), "-p", &to.port().to_string(), "-t", &secs.to_string(), "-J"],
    ))
    .with_context(|| format!("iperf3 to {to}"))?;
    let cpu = busy_ns()? - cpu0;
    let j: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    let bytes = j["end"]["sum_received"]["bytes"].as_f64().context("iperf3: no bytes received")?;
    let seconds = j["end"]["sum_received"]["seconds"].as_f64().context("iperf3: no duration")?;
    ensure!(bytes > 0.0 && seconds > 0.0, "iperf3 to {to} moved nothing");
    Ok((bytes / seconds, cpu as f64 / bytes))
}

/// Request/response slices run in turns: each variant and backend gets `SLICE` of round
/// trips on its own connection, then the next; round after round, the order rotating. On
/// this VM the rate moved by a third between 2-second runs; slices this short put every
/// variant into the same moments, so the VM's moods cancel out of the ratios.
const SLICE: Duration = Duration::from_millis(100);

/// One kept-open request/response connection (2-byte request, one-line answer) and what
/// its slices added up to.
struct RrConn {
    to: SocketAddr,
    w: TcpStream,
    r: BufReader<TcpStream>,
    line: String,
    round_trips: u64,
    seconds: f64,
    cpu_ns: u64,
    /// Round trips per second in each slice.
    rates: Vec<f64>,
}

impl RrConn {
    /// Connects from network namespace `ns` (the socket stays in it, whichever thread uses it).
    fn open(ns: &str, to: SocketAddr) -> anyhow::Result<RrConn> {
        let s = in_netns(ns, move || TcpStream::connect_timeout(&to, Duration::from_secs(1)))?
            .with_context(|| format!("connect {to}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        let w = s.try_clone()?;
        Ok(RrConn {
            to,
            w,
            r: BufReader::new(s),
            line: String::new(),
            round_trips: 0,
            seconds: 0.0,
            cpu_ns: 0,
            rates: Vec::new(),
        })
    }

    /// Round trips for `d`, with the machine's CPU time over them.
    fn slice(&mut self, d: Duration) -> anyhow::Result<()> {
        let cpu0 = busy_ns()?;
        let t = Instant::now();
        let n0 = self.round_trips;
        while t.elapsed() < d {
            self.w.write_all(b"x\n")?;
            self.line.clear();
            self.r.read_line(&mut self.line)?;
            ensure!(!self.line.is_empty(), "connection to {} closed", self.to);
            self.round_trips += 1;
        }
        let seconds = t.elapsed().as_secs_f64();
        self.seconds += seconds;
        self.rates.push((self.round_trips - n0) as f64 / seconds);
        self.cpu_ns += busy_ns()? - cpu0;
        Ok(())
    }

    /// Round trips per second and CPU µs per round trip over every slice.
    fn totals(&self) -> (f64, f64) {
        let n = self.round_trips.max(1) as f64;
        (self.round_trips as f64 / self.seconds.max(1e-9), self.cpu_ns as f64 / n / 1000.0)
    }
}

/// Request/response through every lab, `per_pair` for each variant and backend in all, in
/// `SLICE`s taking turns, into each one's cell.
fn request_response(
    labs: &[(Variant, Servers, Lab)],
    per_pair: Duration,
    cells: &mut [(Variant, Backend, Cell)],
) -> anyhow::Result<()> {
    let mut conns = Vec::new();
    for (v, _, lab) in labs {
        for b in [Backend::Local, Backend::Remote] {
            conns.push((*v, b, RrConn::open(&lab.pod("client").ns, target(lab, *v, b, POD_PORT))?));
        }
    }
    let rounds = (per_pair.as_millis() / SLICE.as_millis()).max(1) as usize;
    for round in 0..rounds {
        for k in 0..conns.len() {
            let i = (round + k) % conns.len();
            conns[i].2.slice(SLICE)?;
        }
    }
    for (v, b, conn) in conns {
        let (rate, cpu) = conn.totals();
        eprintln!("  {} / {}: request/response {rate:.0}/s at {cpu:.1} CPU µs each", v.name(), b.name());
        if let Some((_, _, c)) = cells.iter_mut().find(|(cv, cb, _)| *cv == v && *cb == b) {
            (c.rr_per_s, c.rr_cpu_us, c.rr_slices) = (rate, cpu, conn.rates);
        }
    }
    Ok(())
}

/// Where variant `v`'s client connects for `b`'s server on `port`: the pod itself (direct)
/// or the Service.
fn target(lab: &Lab, v: Variant, b: Backend, port: u16) -> SocketAddr {
    if matches!(v, Variant::Direct | Variant::DirectEmptyXdp) {
        sa(lab.pod(b.pod()).ip, port)
    } else {
        let i = service_index(b, port);
        sa(vip(i), svc_port(i))
    }
}

impl Cell {
    /// Keeps the better of this stream run and `o` (the VM's noise only ever slows a run
    /// down).
    fn keep_better_stream(&mut self, o: &Cell) {
        if o.stream_bps > self.stream_bps {
            (self.stream_bps, self.stream_cpu_ns_per_byte) = (o.stream_bps, o.stream_cpu_ns_per_byte);
        }
    }
}

/// One stream run for a variant and backend.
fn cell(lab: &Lab, v: Variant, b: Backend, secs: u32) -> anyhow::Result<Cell> {
    let (stream_bps, stream_cpu_ns_per_byte) =
        stream(&lab.pod("client").ns, target(lab, v, b, STREAM_PORT), secs)?;
    let c = Cell { stream_bps, stream_cpu_ns_per_byte, ..Cell::default() };
    eprintln!(
        "  {} / {}: stream {:.2} Gbit/s at {:.3} CPU ns/byte",
        v.name(),
        b.name(),
        c.stream_bps * 8e-9,
        c.stream_cpu_ns_per_byte,
    );
    Ok(c)
}

/// A fresh lab set up for `v`: rules loaded or agents started, Services answering.
fn lab_for(v: Variant, bins: &Bins, work: &std::path::Path) -> anyhow::Result<Lab> {
    let mut lab = Lab::standard_topology(bins.clone())?;
    let node1 = lab.node_netns(1);
    match v {
        Variant::Direct => {}
        Variant::DirectEmptyXdp => {
            let pass = lab.xdp_pass_object()?.display().to_string();
            for n in [1, 2] {
                let attach = ["ip", "link", "set", "dev", "eth0", "xdpdrv", "obj", &pass, "sec", "xdp"];
                sh(&mut in_ns(&lab.node_netns(n), &attach)).context("attaching the empty XDP program")?;
            }
        }
        Variant::Iptables => {
            let f = work.join("podpath.iptables");
            fs::write(&f, iptables_rules_for(service_set(&lab).into_iter(), Proto::Tcp))?;
            sh(in_ns(&node1, &["iptables-restore"]).stdin(fs::File::open(&f)?))
                .context("iptables-restore")?;
        }
        Variant::Nftables => {
            let f = work.join("podpath.nft");
            fs::write(&f, nft_rules_for(service_set(&lab).into_iter(), Proto::Tcp))?;
            sh(in_ns(&node1, &["nft", "-f"]).arg(&f)).context("nft -f")?;
        }
        Variant::OursStack | Variant::OursHostRouting | Variant::OursNodeTc => {
            lab.write_manifest("nodes.yaml", &lab.node_manifests())?;
            lab.write_manifest("podpath.yaml", &manifests(&lab))?;
            let flags: &[&str] = match v {
                Variant::OursStack => &["--host-routing=false"],
                Variant::OursNodeTc => &["--host-routing=true", "--node-hook", "tc"],
                _ => &["--host-routing=true"],
            };
            lab.start_agent(1, flags)?;
            lab.start_agent(2, flags)?;
            for (i, _, _) in services() {
                wait_for(Duration::from_secs(5), || lab.has_frontend(1, IpAddr::V4(vip(i)), svc_port(i)))?;
            }
        }
    }
    Ok(lab)
}

pub fn run(quick: bool, out: PathBuf) -> anyhow::Result<()> {
    ensure!(privileged(), "this benchmark needs root");
    let bins = Bins::beside(&std::env::current_exe()?)?;
    let (secs, reps) = if quick { (2, 3) } else { (5, 5) };
    // Request/response per variant and backend, in slices: 60 rounds when quick.
    let rr_secs = if quick { 6 } else { 12 };
    let work = std::env::temp_dir().join(format!("lb-bench-podpath-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let mut cells: Vec<(Variant, Backend, Cell)> = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        // Servers before labs in each pair: they stop (by pid) before their lab goes.
        let mut labs = Vec::new();
        for v in Variant::ALL {
            eprintln!("bench podpath: setting up {} ...", v.name());
            let lab = lab_for(v, &bins, &work)?;
            let servers = Servers::start(&lab)?;
            labs.push((v, servers, lab));
        }
        for round in 1..=reps {
            eprintln!("bench podpath: round {round} of {reps} ...");
            for (v, _, lab) in &labs {
                for b in [Backend::Local, Backend::Remote] {
                    let c = cell(lab, *v, b, secs)?;
                    match cells.iter_mut().find(|(cv, cb, _)| cv == v && *cb == b) {
                        Some((_, _, best)) => best.keep_better_stream(&c),
                        None => cells.push((*v, b, c)),
                    }
                }
            }
        }
        eprintln!(
            "bench podpath: request/response, {} ms slices taking turns, {rr_secs} s per variant and backend ...",
            SLICE.as_millis()
        );
        request_response(&labs, Duration::from_secs(rr_secs.into()), &mut cells)?;
        Ok(())
    })();
    let _ = fs::remove_dir_all(&work);
    result?;
    report(quick, &out, (secs, reps, rr_secs), &cells)
}

fn report(
    quick: bool,
    out: &std::path::Path,
    (secs, reps, rr_secs): (u32, u32, u32),
    cells: &[(Variant, Backend, Cell)],
) -> anyhow::Result<()> {
    let get = |v: Variant, b: Backend| cells.iter().find(|(cv, cb, _)| *cv == v && *cb == b).map(|c| &c.2);
    let mut md = format!(
        "### `cargo xtask bench podpath` — {}\n\nKernel {}. Two-node lab: a client pod → ClusterIP → a backend pod on the same node (local) or the other node (remote, through the underlay). Stream: iperf3, {secs} s, the better of {reps} runs, the variants taking turns (each round runs every variant once). Request/response: 2-byte request, one-line answer, on one TCP connection per variant and backend kept open, in {slice} ms slices taking turns (each round every connection once, the order rotating), {rr_secs} s per connection in all; the \"vs\" columns for request/response are the median over rounds of the two rates in the same round. CPU: the whole machine's busy time during the run (all of client, backend, both nodes' stacks). Each variant in a lab of its own, all up at once; iptables and nftables are kube-proxy's rules for the same Services on the client's node.\n\n| variant | backend | stream (Gbit/s) | CPU ns per byte | request/response (/s) | CPU µs per request | CPU/byte vs iptables | req/resp vs direct | req/resp vs direct with empty XDP |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n",
        if quick { "quick" } else { "full" },
        super::kernel(),
        slice = SLICE.as_millis(),
    );
    for (v, b, c) in cells {
        let ipt = get(Variant::Iptables, *b).map(|i| i.stream_cpu_ns_per_byte / c.stream_cpu_ns_per_byte);
        let direct = get(Variant::Direct, *b).map(|d| paired_ratio(c, d));
        let floor = get(Variant::DirectEmptyXdp, *b).map(|d| paired_ratio(c, d));
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {:.3} | {:.0} | {:.1} | {} | {} | {} |",
            v.name(),
            b.name(),
            c.stream_bps * 8e-9,
            c.stream_cpu_ns_per_byte,
            c.rr_per_s,
            c.rr_cpu_us,
            ipt.map(|r| format!("{r:.2}×")).unwrap_or_default(),
            direct.map(|r| format!("{r:.2}×")).unwrap_or_default(),
            floor.map(|r| format!("{r:.2}×")).unwrap_or_default(),
        );
    }
    for (ours, label) in [
        (Variant::OursHostRouting, "ours with host routing"),
        (Variant::OursNodeTc, "ours with host routing and `--node-hook tc`"),
    ] {
        let _ = write!(md, "\nGoals ({label}): ");
        for b in [Backend::Local, Backend::Remote] {
            if let (Some(o), Some(i), Some(d)) =
                (get(ours, b), get(Variant::Iptables, b), get(Variant::Direct, b))
            {
                let cpu = i.stream_cpu_ns_per_byte / o.stream_cpu_ns_per_byte;
                let rr = paired_ratio(o, d);
                let floor = get(Variant::DirectEmptyXdp, b)
                    .map(|f| {
                        format!(" (against direct with the empty XDP program: {:.2}×)", paired_ratio(o, f))
                    })
                    .unwrap_or_default();
                let _ = write!(
                    md,
                    "{}: CPU per byte ≥ {GOAL_CPU_PER_BYTE}× better than iptables → {cpu:.2}× ({}); request/response ≥ {GOAL_RR_VS_DIRECT}× direct → {rr:.2}× ({}){floor}. ",
                    b.name(),
                    if cpu >= GOAL_CPU_PER_BYTE { "met" } else { "missed" },
                    if rr >= GOAL_RR_VS_DIRECT { "met" } else { "missed" },
                );
            }
        }
        md.push('\n');
    }
    md.push('\n');
    println!("{md}");
    fs::create_dir_all(out)?;
    fs::write(out.join("podpath.md"), &md)?;
    let j = json!({
        "kernel": super::kernel(),
        "seconds": secs,
        "reps": reps,
        "rr_seconds": rr_secs,
        "rr_slice_ms": SLICE.as_millis() as u64,
        "cells": cells.iter().map(|(v, b, c)| json!({
            "variant": v.key(), "backend": b.name(),
            "stream_bytes_per_s": c.stream_bps, "stream_cpu_ns_per_byte": c.stream_cpu_ns_per_byte,
            "rr_per_s": c.rr_per_s, "rr_cpu_us": c.rr_cpu_us, "rr_slices_per_s": c.rr_slices,
        })).collect::<Vec<_>>(),
    });
    fs::write(out.join("podpath.json"), serde_json::to_string_pretty(&j)?)?;
    eprintln!("bench podpath: wrote {}", out.join("podpath.md").display());
    Ok(())
}
