//! `throughput` and `newflows`: packets through a forwarding node (`topo`), ours against
//! kube-proxy's iptables and nftables rules for the same Service set, plain forwarding and
//! the generator alone, all in one run (DESIGN.md §7, §9). The Service set is
//! `services::cluster(n, UDP)`: a UDP packet is a flow of its own, so the generator needs no
//! handshake. How a cell is measured: `load`.

use std::{fmt::Write as _, fs, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, bail, ensure};
use lb_common::{
    abi::{XDP_FWD_REDIRECTED, XDP_FWD_TO_STACK, XDP_FWD_TX},
    verdict::Reason,
};
use lb_tests::harness::{Spec, privileged};
use serde_json::json;

use crate::{
    load::*,
    plot,
    services::*,
    topo::{BenchProgs, PROTO, Topo, Variant, XdpMode, program},
};

/// How a cell is driven and measured.
#[derive(Clone, Copy)]
struct Load {
    traffic: Traffic,
    generator: Gen,
    window: Duration,
    /// Longest a ruleset may take to load.
    limit: Duration,
}

/// One cell: fresh topology, the variant's rules for `n` services, traffic to service
/// `target` (to its first endpoint for plain forwarding). None when the rules did not load
/// within `limit`.
fn cell(
    progs: &BenchProgs,
    variant: Variant,
    n: u32,
    targets: &[u32],
    load: Load,
) -> anyhow::Result<Vec<Option<Sample>>> {
    let Load { traffic, generator, window, limit } = load;
    let mut topo = Topo::build(progs, variant)?;
    for &t in targets {
        for (ep, _) in endpoints_of(t) {
            topo.route(ep)?;
        }
    }
    let mode = if generator == Gen::LiveFrames { XdpMode::Native } else { XdpMode::Generic };
    let Some(took) = program(progs, &mut topo, variant, mode, (n, PROTO), limit)? else {
        eprintln!("  {}: rules for {n} services did not load within {limit:?}", variant.name());
        return Ok(vec![None; targets.len()]);
    };
    let mut out = Vec::new();
    for &t in targets {
        let (dst, dport) = match variant {
            Variant::Plain | Variant::Generator => endpoints_of(t)[0],
            _ => (vip(t), svc_port(t)),
        };
        let s = match generator {
            Gen::Trafgen => {
                let conf = trafgen_conf(&topo.f0_mac, dst, dport, traffic);
                sample(&topo, variant, || trafgen(&topo, &conf), || tx_packets(&topo.source.0, "g0"), window)?
            }
            Gen::LiveFrames => {
                ensure!(traffic == Traffic::Established, "live frames repeat one frame: established only");
                let frame =
                    Spec::udp("198.19.224.1", 10_000, &dst.to_string(), dport).payload(&[0x41; 22]).build();
                let src = &topo.source.0;
                sample(
                    &topo,
                    variant,
                    || LiveFrames::start(progs, &topo, frame),
                    || xdp_xmit(src, "g0"),
                    window,
                )?
            }
        };
        eprintln!(
            "  {} ({n} services, service #{t}, rules in {:.1} s): offered {:.0} kpps, delivered {:.0} kpps, {:.0} CPU ns/packet",
            variant.name(),
            took.as_secs_f64(),
            s.offered_pps / 1e3,
            s.delivered_pps / 1e3,
            s.cpu_ns
        );
        if let Some(l) = &topo.ours {
            let c = |slot| l.dp.xdp_forward_counter(slot).map(|c| c.packets).unwrap_or(0);
            let r = |r| l.dp.reason_counter(r).map(|c| c.packets).unwrap_or(0);
            eprintln!(
                "    datapath: new flow {}, flow hit {}, no frontend {}; at XDP: redirected {}, XDP_TX {}, to the stack {}",
                r(Reason::NewFlow),
                r(Reason::FlowHit),
                r(Reason::NoFrontend),
                c(XDP_FWD_REDIRECTED),
                c(XDP_FWD_TX),
                c(XDP_FWD_TO_STACK)
            );
        }
        out.push(Some(s));
    }
    drop(topo);
    Ok(out)
}

fn header(title: &str, quick: bool, window: Duration) -> String {
    format!(
        "### `cargo xtask bench {title}` — {}\n\nKernel {}, {} CPUs. trafgen (one CPU, 60-byte UDP frames) → veth → forwarding namespace (the variant) → veth → XDP drop sink; a fresh topology per variant; {:.0} s windows. CPU = all CPUs from /proc/stat per delivered packet; net = minus the generator's own cost per offered packet (generator alone → XDP drop), the figure the ratios use. Service set: N UDP ClusterIP services × {ENDPOINTS} endpoints, the same objects our Model gets and the same set as kube-proxy-shaped rules.\n\n",
        if quick { "quick" } else { "full" },
        crate::kernel(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        window.as_secs_f64(),
    )
}

pub fn require_tools() -> anyhow::Result<()> {
    if !privileged() {
        bail!("this benchmark needs root");
    }
    for tool in ["trafgen", "ethtool", "iptables-restore", "nft"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output()?.status.success();
        ensure!(found, "{tool} not found: run `cargo xtask setup`");
    }
    Ok(())
}

/// Runs `variants` with established flows from `generator`: (variant, sample) rows, the
/// generator alone first.
fn established(
    progs: &BenchProgs,
    generator: Gen,
    variants: &[Variant],
    n: u32,
    window: Duration,
) -> anyhow::Result<Vec<(Variant, Sample)>> {
    let mut rows = Vec::new();
    for &v in [Variant::Generator].iter().chain(variants) {
        eprintln!("bench throughput: {} ({}) ...", v.name(), gen_name(generator));
        let s = cell(
            progs,
            v,
            n,
            &[n - 1],
            Load { traffic: Traffic::Established, generator, window, limit: Duration::from_secs(120) },
        )?[0];
        rows.push((v, s.context("rules did not load")?));
    }
    Ok(rows)
}

fn gen_name(g: Gen) -> &'static str {
    match g {
        Gen::Trafgen => "trafgen",
        Gen::LiveFrames => "live frames",
    }
}

/// Markdown rows of one generator's table; `vs` is the variant the ratios compare to.
fn table(md: &mut String, rows: &[(Variant, Sample)], vs: Variant) {
    let g = rows[0].1.cpu_ns_offered;
    let base = rows.iter().find(|r| r.0 == vs).map(|r| r.1.net_ns(g)).unwrap_or(f64::NAN);
    md.push_str("| variant | offered (kpps) | delivered (kpps) | CPU ns / packet | net ns / packet | net cost ÷ ours |\n|---|---:|---:|---:|---:|---:|\n");
    for (v, s) in rows {
        let (net, ratio) = if *v == Variant::Generator {
            (format!("({g:.0} per offered)"), "–".to_string())
        } else {
            (format!("{:.0}", s.net_ns(g)), format!("{:.2}", s.net_ns(g) / base))
        };
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {net} | {ratio} |",
            v.name(),
            s.offered_pps / 1e3,
            s.delivered_pps / 1e3,
            s.cpu_ns
        );
    }
}

/// `throughput`: established flows through each variant, 1 000 services loaded. trafgen
/// drives every variant through the kernel's transmit path; the live-frames generator then
/// drives the XDP-to-XDP paths (the redirect-only floor and ours with --xdp-forward) in
/// native mode.
pub fn throughput(quick: bool, out: PathBuf) -> anyhow::Result<()> {
    require_tools()?;
    let window = Duration::from_secs(if quick { 2 } else { 5 });
    let n = 1_000;
    let progs = BenchProgs::load()?;
    use Variant::*;
    let kernel_path =
        established(&progs, Gen::Trafgen, &[Plain, Iptables, Nftables, Ours, OursXdpForward], n, window)?;
    let xdp_path = established(&progs, Gen::LiveFrames, &[XdpFloor, OursXdpForward], n, window)?;

    let net = |rows: &[(Variant, Sample)], v: Variant| {
        let g = rows[0].1.cpu_ns_offered;
        rows.iter().find(|r| r.0 == v).map(|r| r.1.net_ns(g)).unwrap_or(f64::NAN)
    };
    let rate =
        |v: Variant| kernel_path.iter().find(|r| r.0 == v).map(|r| r.1.delivered_pps).unwrap_or(f64::NAN);
    let ours_native = net(&xdp_path, OursXdpForward);
    let mut md = header("throughput", quick, window);
    let _ = writeln!(
        md,
        "Established flows, {n} services loaded, traffic to the last one.\n\n**Through the kernel's transmit path** (trafgen, {EST_FLOWS} flows; our program in generic XDP mode on the veth):\n"
    );
    table(&mut md, &kernel_path, Ours);
    let _ = writeln!(
        md,
        "\n**XDP to XDP** (our live-frames generator: BPF_PROG_TEST_RUN, `xdp_live_frames`, one flow; native XDP on f0 — how a NIC driver runs it):\n"
    );
    table(&mut md, &xdp_path, OursXdpForward);
    let _ = writeln!(
        md,
        "\nGoals (net cost per packet, iptables ÷ ours): ≥ 3× iptables → {:.2}× with ours handing packets to the stack, {:.2}× with --xdp-forward in generic mode, {:.2}× with --xdp-forward in native mode (live frames; the generators differ, each netted out). ≥ 1.5× nftables → {:.2}× / {:.2}× / {:.2}×. Delivered rate, same generator: ours ÷ iptables {:.2}×, ours ÷ nftables {:.2}×; ours native vs the XDP floor: {:.2}× the floor's net cost.",
        net(&kernel_path, Iptables) / net(&kernel_path, Ours),
        net(&kernel_path, Iptables) / net(&kernel_path, OursXdpForward),
        net(&kernel_path, Iptables) / ours_native,
        net(&kernel_path, Nftables) / net(&kernel_path, Ours),
        net(&kernel_path, Nftables) / net(&kernel_path, OursXdpForward),
        net(&kernel_path, Nftables) / ours_native,
        rate(Ours) / rate(Iptables),
        rate(Ours) / rate(Nftables),
        ours_native / net(&xdp_path, XdpFloor),
    );
    println!("{md}");
    fs::create_dir_all(&out)?;
    fs::write(out.join("throughput.md"), &md)?;
    let js = |rows: &[(Variant, Sample)]| {
        let g = rows[0].1.cpu_ns_offered;
        rows.iter()
            .map(|(v, s)| {
                json!({
                    "variant": v.name(), "offered_pps": s.offered_pps, "delivered_pps": s.delivered_pps,
                    "cpu_ns_per_packet": s.cpu_ns, "net_ns_per_packet": s.net_ns(g),
                })
            })
            .collect::<Vec<_>>()
    };
    let j = json!({
        "kernel": crate::kernel(),
        "services": n,
        "trafgen": js(&kernel_path),
        "live_frames": js(&xdp_path),
    });
    fs::write(out.join("throughput.json"), serde_json::to_string_pretty(&j)?)?;
    eprintln!("bench throughput: wrote {}", out.join("throughput.md").display());
    Ok(())
}

/// A `newflows` row: one service count.
struct NewRow {
    services: u32,
    ours: Option<Sample>,
    ipt_first: Option<Sample>,
    ipt_last: Option<Sample>,
    nft: Option<Sample>,
}

/// `newflows`: every packet a new flow, 1 → 30 000 services.
pub fn newflows(quick: bool, out: PathBuf, sweep: &[u32], nft_max: u32) -> anyhow::Result<()> {
    require_tools()?;
    let window = Duration::from_secs(if quick { 2 } else { 5 });
    let limit = Duration::from_secs(if quick { 120 } else { 600 });
    let progs = BenchProgs::load()?;
    let new = Load { traffic: Traffic::NewFlows, generator: Gen::Trafgen, window, limit };
    eprintln!("bench newflows: generator alone and plain forwarding ...");
    let alone = cell(&progs, Variant::Generator, 1, &[0], new)?[0].unwrap();
    let plain = cell(&progs, Variant::Plain, 1, &[0], new)?[0].unwrap();
    let g = alone.cpu_ns_offered;
    let mut rows = Vec::new();
    for &n in sweep.iter().filter(|n| **n > 0) {
        eprintln!("bench newflows: {n} services ...");
        let ours = cell(&progs, Variant::Ours, n, &[n - 1], new)?[0];
        // The first and the last VIP of KUBE-SERVICES: iptables walks the chain in order.
        let ipt = cell(&progs, Variant::Iptables, n, &[0, n - 1], new)?;
        let nft = if n <= nft_max { cell(&progs, Variant::Nftables, n, &[n - 1], new)?[0] } else { None };
        rows.push(NewRow { services: n, ours, ipt_first: ipt[0], ipt_last: ipt[1], nft });
    }

    let kpps =
        |s: Option<Sample>| s.map(|s| format!("{:.0}", s.delivered_pps / 1e3)).unwrap_or("not run".into());
    let netc = |s: Option<Sample>| s.map(|s| format!("{:.0}", s.net_ns(g))).unwrap_or("–".into());
    let mut md = header("newflows", quick, window);
    let _ = writeln!(
        md,
        "Every packet a new flow (random source address in a /20 × random source port). Plain forwarding: {:.0} kpps delivered, net {:.0} ns/packet; generator alone: {:.0} ns per offered packet.\n\n| services | ours (kpps) | iptables, VIP first (kpps) | iptables, VIP last (kpps) | nftables (kpps) | ours net ns | iptables last net ns | nftables net ns | ours vs iptables last |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        plain.delivered_pps / 1e3,
        plain.net_ns(g),
        g
    );
    for r in &rows {
        let vs = match (r.ours, r.ipt_last) {
            (Some(o), Some(i)) => format!("{:.0}×", o.delivered_pps / i.delivered_pps),
            _ => "–".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {vs} |",
            r.services,
            kpps(r.ours),
            kpps(r.ipt_first),
            kpps(r.ipt_last),
            kpps(r.nft),
            netc(r.ours),
            netc(r.ipt_last),
            netc(r.nft),
        );
    }
    // Slope: delivered rate at the smallest size ÷ at the largest, per variant.
    let slope = |f: fn(&NewRow) -> Option<Sample>| {
        let first = rows.first().and_then(f)?;
        let last = rows.iter().rev().find_map(|r| f(r).map(|s| (r.services, s)))?;
        Some((first.delivered_pps / last.1.delivered_pps, last.0))
    };
    let slope_cell = |s: Option<(f64, u32)>| s.map(|(v, n)| format!("{v:.2} (to {n})")).unwrap_or("–".into());
    let _ = writeln!(
        md,
        "\nSlope, rate with {} service(s) ÷ rate at the largest size measured (goal for ours ≤ 1.1): ours {}, iptables VIP last {}, iptables VIP first {}, nftables {}.",
        rows.first().map(|r| r.services).unwrap_or(0),
        slope_cell(slope(|r| r.ours)),
        slope_cell(slope(|r| r.ipt_last)),
        slope_cell(slope(|r| r.ipt_first)),
        slope_cell(slope(|r| r.nft)),
    );
    if let Some(r) = rows.iter().find(|r| r.services == 30_000)
        && let (Some(o), Some(i)) = (r.ours, r.ipt_last)
    {
        let _ = writeln!(
            md,
            "\nGoal ≥ 30× iptables at 30 000 services (VIP last): {:.0}×.",
            o.delivered_pps / i.delivered_pps
        );
    }
    println!("{md}");
    fs::create_dir_all(&out)?;
    fs::write(out.join("newflows.md"), &md)?;
    let js = |s: Option<Sample>| {
        s.map(|s| json!({"offered_pps": s.offered_pps, "delivered_pps": s.delivered_pps, "cpu_ns_per_packet": s.cpu_ns, "net_ns_per_packet": s.net_ns(g)}))
    };
    let j = json!({
        "kernel": crate::kernel(),
        "generator_ns_per_offered_packet": g,
        "plain": js(Some(plain)),
        "rows": rows.iter().map(|r| json!({
            "services": r.services, "ours": js(r.ours), "iptables_vip_first": js(r.ipt_first),
            "iptables_vip_last": js(r.ipt_last), "nftables": js(r.nft),
        })).collect::<Vec<_>>(),
    });
    fs::write(out.join("newflows.json"), serde_json::to_string_pretty(&j)?)?;
    let line = |name: &str, f: fn(&NewRow) -> Option<Sample>| {
        plot::Series::new(name, rows.iter().map(|r| (r.services, f(r).map(|s| s.delivered_pps / 1e3))))
    };
    plot::chart(
        &out.join("newflows.png"),
        "new flows: delivered kpps vs services",
        "kpps",
        &[
            line("ours", |r| r.ours),
            line("iptables, VIP first", |r| r.ipt_first),
            line("iptables, VIP last", |r| r.ipt_last),
            line("nftables", |r| r.nft),
        ],
    )?;
    eprintln!("bench newflows: wrote {}", out.join("newflows.md").display());
    Ok(())
}
