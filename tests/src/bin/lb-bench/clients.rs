//! `latency` and `connrate`: real TCP clients in a pod of the two-node lab (the real agents,
//! the real datapath at TC), through the Service VIP and, as the baseline measured in the
//! same run, straight to the backend pod.
//!
//! * `latency`: connection setup (connect() = SYN → SYN/ACK) p50/p99 and request/response
//!   round trips on one open connection (the first-packet sweep against iptables and
//!   nftables is `forward::first_packet`, reported in the same table set).
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

pub(crate) const VIP: &str = "198.19.0.10";

fn web(lab: &Lab) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: {VIP}, ports: [{{name: http, port: 80, targetPort: {POD_PORT}}}]}}\n---\n{}",
        slice_yaml("web-1", "web", &[("http", POD_PORT, "TCP")], &[(lab.pod("web-1"), "ready: true")])
    )
}

pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Connection setup times (µs) from `ns` to `to`.
pub fn connect_times(ns: &str, to: SocketAddr, n: usize) -> anyhow::Result<Vec<f64>> {
    in_netns(ns, move || -> anyhow::Result<Vec<f64>> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(1))
                .with_context(|| format!("connect #{i} to {to}"))?;
            out.push(t.elapsed().as_secs_f64() * 1e6);
            abort(s);
            if i % 1000 == 999 {
                // Let a thread-per-connection server (lb-serve) catch up with its accept
                // queue: back to back, 20 000 connections overflowed it after ~5 000.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(out)
    })?
}

/// Closes with a RST (SO_LINGER 0): no FIN exchange and no TIME_WAIT on either side, so tens
/// of thousands of back-to-back connections neither run out of ports nor leave the server
/// closing sockets in bursts while later handshakes are being timed.
fn abort(s: TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on our own socket with a correctly sized value.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
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
pub(crate) fn conn_rate(ns: &str, to: SocketAddr, d: Duration) -> anyhow::Result<f64> {
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

pub(crate) fn lab() -> anyhow::Result<Lab> {
    ensure!(privileged(), "this benchmark needs root");
    let bins = Bins::beside(&std::env::current_exe()?)?;
    let lab = Lab::standard(bins)?;
    lab.write_manifest("web.yaml", &web(&lab))?;
    let vip = VIP.parse()?;
    wait_for(Duration::from_secs(5), || lab.has_frontend(1, vip, 80))?;
    Ok(lab)
}

pub fn latency(quick: bool, out: PathBuf, sweep: &[u32], nft_max: u32) -> anyhow::Result<()> {
    let n = if quick { 2_000 } else { 20_000 };
    // First packet vs number of services, against kube-proxy's rules (forwarding namespace).
    let (fp, direct_fp) =
        crate::first_packet::first_packet(sweep, nft_max, if quick { 5_000 } else { 20_000 })?;

    // Connect and request/response in the two-node lab (the TC datapath).
    let lab = lab()?;
    let ns = lab.pod("client").ns.clone();
    let vip = sa(VIP.parse::<std::net::IpAddr>()?, 80);
    let direct = sa(lab.pod("web-1").ip, POD_PORT);
    let mut rows = Vec::new();
    for (target, to) in [("VIP", vip), ("direct", direct)] {
        let mut c = connect_times(&ns, to, n)?;
        let mut r = rr_times(&ns, to, n)?;
        let row = (
            target,
            percentile(&mut c, 0.5),
            percentile(&mut c, 0.99),
            percentile(&mut r, 0.5),
            percentile(&mut r, 0.99),
        );
        eprintln!(
            "  {target}: connect p50 {:.0} µs p99 {:.0} µs; rr p50 {:.0} µs p99 {:.0} µs",
            row.1, row.2, row.3, row.4
        );
        rows.push(row);
    }
    drop(lab);

    let cell = |p: Option<crate::first_packet::Percentiles>, n: u32, max: u32| match p {
        Some(p) => format!("{:.0} / {:.0}", p.p50, p.p99),
        None if n > max => "not run".into(),
        None => "rules did not load".into(),
    };
    let mut md = format!(
        "### `cargo xtask bench latency` — {}\n\n**First packet vs number of services.** Connection setup (connect() = SYN → SYN/ACK, a new flow each) from a client namespace through a forwarding namespace to a server on the last service's endpoints; ours (XDP on both veths, generic mode — see `topo::XdpMode`), kube-proxy-shaped iptables and nftables rules for the same TCP Service set, and plain forwarding to the endpoint (no load balancer): {direct_p50:.0} / {direct_p99:.0} µs. {} connections per cell; kernel {}.\n\n| services | ours p50 / p99 (µs) | iptables p50 / p99 (µs) | nftables p50 / p99 (µs) |\n|---:|---:|---:|---:|\n",
        if quick { "quick" } else { "full" },
        if quick { 5_000 } else { 20_000 },
        crate::kernel(),
        direct_p50 = direct_fp.p50,
        direct_p99 = direct_fp.p99,
    );
    for r in &fp {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            r.services,
            cell(r.ours, r.services, u32::MAX),
            cell(r.iptables, r.services, u32::MAX),
            cell(r.nftables, r.services, nft_max)
        );
    }
    if let (Some(first), Some(last)) = (fp.first(), fp.last())
        && let (Some(a), Some(b)) = (first.ours, last.ours)
    {
        let nft = fp.iter().rev().find_map(|r| r.nftables.map(|p| (r.services, p)));
        let _ =
            writeln!(
                md,
                "\nOurs, p99 at {} ÷ at {} services (goal ≤ 1.10): {:.2}. {}",
                last.services,
                first.services,
                b.p99 / a.p99,
                nft.and_then(|(n, p)| fp.iter().find(|r| r.services == n).and_then(|r| r.ours).map(
                    |o| format!("Ours ÷ nftables p99 at {n} services (goal ≤ 1): {:.2}.", o.p99 / p.p99)
                ))
                .unwrap_or_default()
            );
    }
    let _ = writeln!(
        md,
        "\n**Connect and request/response in the two-node lab**: client pod → Service VIP (TC datapath) → backend pod on the same node, vs the backend pod directly; {n} samples per cell.\n\n| target | connect p50 (µs) | connect p99 (µs) | request/response p50 (µs) | request/response p99 (µs) |\n|---|---:|---:|---:|---:|"
    );
    for r in &rows {
        let _ = writeln!(md, "| {} | {:.0} | {:.0} | {:.0} | {:.0} |", r.0, r.1, r.2, r.3, r.4);
    }
    if let (Some(v), Some(d)) = (rows.iter().find(|r| r.0 == "VIP"), rows.iter().find(|r| r.0 == "direct")) {
        let _ = writeln!(
            md,
            "\nRequest/response rate via the VIP ÷ direct (goal ≥ 0.95): {:.2} (from the p50 round trips).",
            d.3 / v.3
        );
    }
    println!("{md}");
    fs::create_dir_all(&out)?;
    fs::write(out.join("latency.md"), &md)?;
    let pj =
        |p: Option<crate::first_packet::Percentiles>| p.map(|p| json!({"p50_us": p.p50, "p99_us": p.p99}));
    let j = json!({
        "kernel": crate::kernel(),
        "first_packet": {
            "plain_forwarding": pj(Some(direct_fp)),
            "rows": fp.iter().map(|r| json!({
                "services": r.services, "ours": pj(r.ours), "iptables": pj(r.iptables), "nftables": pj(r.nftables),
            })).collect::<Vec<_>>(),
        },
        "lab": rows.iter().map(|r| json!({"target": r.0, "connect_p50_us": r.1, "connect_p99_us": r.2, "rr_p50_us": r.3, "rr_p99_us": r.4})).collect::<Vec<_>>(),
    });
    fs::write(out.join("latency.json"), serde_json::to_string_pretty(&j)?)?;
    type Pick = fn(&crate::first_packet::FirstPacketRow) -> Option<crate::first_packet::Percentiles>;
    let line = |name: &str, f: Pick, p99: bool| {
        crate::plot::Series::new(
            name,
            fp.iter().map(|r| (r.services, f(r).map(|p| if p99 { p.p99 } else { p.p50 }))),
        )
    };
    crate::plot::chart(
        &out.join("latency.png"),
        "first packet (SYN to SYN/ACK) vs services",
        "µs",
        &[
            line("ours p99", |r| r.ours, true),
            line("iptables p99", |r| r.iptables, true),
            line("nftables p99", |r| r.nftables, true),
            line("ours p50", |r| r.ours, false),
            line("iptables p50", |r| r.iptables, false),
            line("nftables p50", |r| r.nftables, false),
        ],
    )?;
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
