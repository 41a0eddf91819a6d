//! `latency` and `connrate`: real TCP clients in a pod of the two-node lab (the real agents,
//! the real datapath at TC), through the Service VIP and, as the baseline measured in the
//! same run, straight to the backend pod.
//!
//! * `latency`: connection setup (connect() = SYN → SYN/ACK) p50/p99 with 1 service and with
//!   10 000 services loaded, and request/response round trips on one open connection.
//! * `connrate`: new connections per second (connect, one request, close), back to back.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use lb_tests::{
    harness::privileged,
    lab::{Bins, Lab, POD_PORT, in_netns, sa, slice_yaml, wait_for},
};
use serde_json::json;

const VIP: &str = "198.19.0.10";

fn web(lab: &Lab) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: {VIP}, ports: [{{name: http, port: 80, targetPort: {POD_PORT}}}]}}\n---\n{}",
        slice_yaml("web-1", "web", &[("http", POD_PORT, "TCP")], &[(lab.pod("web-1"), "ready: true")])
    )
}

/// `n` more Services (each with one endpoint) in one file, so the VIP under test is one of
/// many.
fn filler(n: u32) -> String {
    let mut s = String::new();
    for i in 0..n {
        let vip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 19, 128, 0)) + i);
        let _ = write!(
            s,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: f{i}}}\nspec: {{clusterIP: {vip}, ports: [{{name: http, port: 80}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: f{i}, labels: {{kubernetes.io/service-name: f{i}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: {POD_PORT}}}]\nendpoints: [{{addresses: ['198.18.1.11']}}]\n---\n"
        );
    }
    s
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Connection setup times (µs) from `ns` to `to`.
fn connect_times(ns: &str, to: SocketAddr, n: usize) -> anyhow::Result<Vec<f64>> {
    in_netns(ns, move || -> anyhow::Result<Vec<f64>> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(1))
                .with_context(|| format!("connect #{i} to {to}"))?;
            out.push(t.elapsed().as_secs_f64() * 1e6);
            drop(s);
        }
        Ok(out)
    })?
}

/// Request/response round trips (µs) on one connection.
fn rr_times(ns: &str, to: SocketAddr, n: usize) -> anyhow::Result<Vec<f64>> {
    in_netns(ns, move || -> anyhow::Result<Vec<f64>> {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(1))
            .with_context(|| format!("rr connect to {to}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut w = s.try_clone()?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            w.write_all(b"x\n")?;
            line.clear();
            r.read_line(&mut line)?;
            ensure!(!line.is_empty(), "connection closed");
            out.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(out)
    })?
}

/// Connections per second (connect, one request, close) for `d`.
fn conn_rate(ns: &str, to: SocketAddr, d: Duration) -> anyhow::Result<f64> {
    in_netns(ns, move || -> anyhow::Result<f64> {
        let t = Instant::now();
        let mut n = 0u64;
        let mut line = String::new();
        while t.elapsed() < d {
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            let mut w = s.try_clone()?;
            w.write_all(b"x\n")?;
            line.clear();
            BufReader::new(s).read_line(&mut line)?;
            n += 1;
        }
        Ok(n as f64 / t.elapsed().as_secs_f64())
    })?
}

fn lab() -> anyhow::Result<Lab> {
    ensure!(privileged(), "this benchmark needs root");
    let bins = Bins::beside(&std::env::current_exe()?)?;
    let lab = Lab::standard(bins)?;
    lab.write_manifest("web.yaml", &web(&lab))?;
    let vip = VIP.parse()?;
    wait_for(Duration::from_secs(5), || lab.has_frontend(1, vip, 80))?;
    Ok(lab)
}

pub fn latency(quick: bool, out: PathBuf) -> anyhow::Result<()> {
    let n = if quick { 2_000 } else { 20_000 };
    let lab = lab()?;
    let ns = lab.pod("client").ns.clone();
    let vip = sa(VIP.parse::<std::net::IpAddr>()?, 80);
    let direct = sa(lab.pod("web-1").ip, POD_PORT);
    let mut rows = Vec::new();
    for services in [1u32, 10_000] {
        if services > 1 {
            let t = Instant::now();
            lab.write_manifest("filler.yaml", &filler(services - 1))?;
            let last: std::net::IpAddr =
                std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 19, 128, 0)) + services - 2)
                    .into();
            wait_for(Duration::from_secs(60), || lab.has_frontend(1, last, 80)).context("filler services")?;
            eprintln!("bench latency: {services} services loaded in {:.1} s", t.elapsed().as_secs_f64());
        }
        for (target, to) in [("VIP", vip), ("direct", direct)] {
            if target == "direct" && services > 1 {
                continue; // direct does not depend on the service count
            }
            let mut c = connect_times(&ns, to, n)?;
            let mut r = rr_times(&ns, to, n)?;
            let row = (
                services,
                target,
                percentile(&mut c, 0.5),
                percentile(&mut c, 0.99),
                percentile(&mut r, 0.5),
                percentile(&mut r, 0.99),
            );
            eprintln!(
                "  {services} services, {target}: connect p50 {:.0} µs p99 {:.0} µs; rr p50 {:.0} µs p99 {:.0} µs",
                row.2, row.3, row.4, row.5
            );
            rows.push(row);
        }
    }
    drop(lab);
    let mut md = format!(
        "### `cargo xtask bench latency` — {}\n\nTwo-node lab, client pod → Service VIP (TC datapath) → backend pod on the same node, vs the backend pod directly; {n} samples per cell (Rust client in the pod's namespace; connect = SYN → SYN/ACK).\n\n| services | target | connect p50 (µs) | connect p99 (µs) | request/response p50 (µs) | request/response p99 (µs) |\n|---:|---|---:|---:|---:|---:|\n",
        if quick { "quick" } else { "full" }
    );
    for r in &rows {
        let _ = writeln!(md, "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |", r.0, r.1, r.2, r.3, r.4, r.5);
    }
    let get = |s: u32, t: &str| rows.iter().find(|r| r.0 == s && r.1 == t).copied();
    if let (Some(a), Some(b), Some(d)) = (get(1, "VIP"), get(10_000, "VIP"), get(1, "direct")) {
        let _ = writeln!(
            md,
            "\nFirst-packet p99 at 10 000 services ÷ at 1 (goal ≤ 1.10): {:.2}. Request/response p50 via VIP ÷ direct: {:.2} (rate ratio {:.2}, goal ≥ 0.95).",
            b.3 / a.3,
            a.4 / d.4,
            d.4 / a.4
        );
    }
    println!("{md}");
    fs::create_dir_all(&out)?;
    fs::write(out.join("latency.md"), &md)?;
    let j: Vec<_> = rows
        .iter()
        .map(|r| json!({"services": r.0, "target": r.1, "connect_p50_us": r.2, "connect_p99_us": r.3, "rr_p50_us": r.4, "rr_p99_us": r.5}))
        .collect();
    fs::write(out.join("latency.json"), serde_json::to_string_pretty(&j)?)?;
    Ok(())
}

pub fn connrate(quick: bool, out: PathBuf) -> anyhow::Result<()> {
    let d = if quick { Duration::from_secs(3) } else { Duration::from_secs(15) };
    let lab = lab()?;
    let ns = lab.pod("client").ns.clone();
    let vip = sa(VIP.parse::<std::net::IpAddr>()?, 80);
    let direct = sa(lab.pod("web-1").ip, POD_PORT);
    // Alternate to spread machine noise over both.
    let mut via = Vec::new();
    let mut dir = Vec::new();
    for _ in 0..3 {
        via.push(conn_rate(&ns, vip, d / 3)?);
        dir.push(conn_rate(&ns, direct, d / 3)?);
    }
    drop(lab);
    let (v, r) = (via.iter().sum::<f64>() / 3.0, dir.iter().sum::<f64>() / 3.0);
    let md = format!(
        "### `cargo xtask bench connrate` — {}\n\nNew TCP connections per second (connect, one request, close; one client thread) from a pod, 1 service, alternating VIP and direct in 3 rounds of {:.0} s each.\n\n| target | connections/s |\n|---|---:|\n| VIP | {v:.0} |\n| direct | {r:.0} |\n\nVIP ÷ direct (goal ≥ 0.90): {:.2}.\n",
        if quick { "quick" } else { "full" },
        (d / 3).as_secs_f64(),
        v / r
    );
    println!("{md}");
    fs::create_dir_all(&out)?;
    fs::write(out.join("connrate.md"), &md)?;
    fs::write(
        out.join("connrate.json"),
        serde_json::to_string_pretty(&json!({"vip_per_s": v, "direct_per_s": r}))?,
    )?;
    Ok(())
}
