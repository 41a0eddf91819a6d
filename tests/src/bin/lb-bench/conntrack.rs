//! `conntrack`: the flow table's costs.
//!
//! * GC: one pass (the agent's `conntrack_gc::pass`) over a table of 100k, 1M and 4M
//!   entries (4M: a full `--max-flows 4194304` table), wall and CPU time, once with nothing
//!   to remove and once removing half the flows (both directions each).
//! * Connection rate through source NAT: a pod reaching itself through its Service (hairpin,
//!   source-NATed to the node) against another pod on the same node reaching the same
//!   backend through the same Service (no NAT), in the same run; goal ≥ 0.9.
//! * New connections under a SYN flood at a NodePort (from random lab sources), beside a
//!   keep-alive client: success rate and keep-alive failures.

use std::{
    fmt::Write as _,
    fs,
    net::{SocketAddr, SocketAddrV4},
    os::fd::AsFd as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_common::{abi::*, ct};
use lb_tests::{
    flood::Flood,
    harness::{Loaded, ip, privileged},
    lab::{self, node_ip, sa},
};
use lb_userspace::{conntrack_gc, loader};
use serde_json::json;

use crate::clients;

/// CPU time of this thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

struct GcRow {
    entries: usize,
    read: Duration,
    idle_wall: Duration,
    idle_cpu: Duration,
    purge_wall: Duration,
    purge_cpu: Duration,
    removed: usize,
}

/// Fills a table of `capacity` with `pairs` established pairs, half of them idle for two days.
fn gc_row(pairs: u32, capacity: u32) -> anyhow::Result<GcRow> {
    let caps = loader::Capacities { flows: capacity, maglev_slots: 1 << 16, ..Default::default() };
    let l = Loaded::with_caps(&caps);
    let map = conntrack_gc::open(&l.pin_dir)?;
    let fd = map.fd().as_fd();
    let now = conntrack_gc::monotonic_ns() + 3 * 86_400 * ct::NS_PER_SEC;
    let t = Instant::now();
    let (vip, be) = (addr_from_ip(ip("198.19.0.10")), addr_from_ip(ip("198.18.1.1")));
    for i in 0..pairs {
        let client = addr_from_ip(std::net::Ipv4Addr::from(0xc612_8000u32 + (i >> 14)).into());
        let sport = (1024 + (i & 0x3fff)) as u16;
        let key = FlowKey {
            src: client,
            dst: vip,
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        let seen = if i % 2 == 0 { now - 60 * ct::NS_PER_SEC } else { now - 2 * 86_400 * ct::NS_PER_SEC };
        let fwd = FlowValue {
            addr: be,
            port: 9376u16.to_be(),
            direction: FLOW_FORWARD,
            state: ct::CT_ESTABLISHED,
            backend_id: 1,
            service_id: 1,
            last_seen_ns: seen,
            created_ns: seen,
            ..Default::default()
        };
        let rkey = ct::reverse_key(&key, &fwd);
        let rev = FlowValue { addr: vip, port: 80u16.to_be(), direction: FLOW_REPLY, ..fwd };
        update(fd, &key, &fwd)?;
        update(fd, &rkey, &rev)?;
    }
    eprintln!("  {} entries written in {} ms", 2 * pairs, t.elapsed().as_millis());
    let timeouts = CtTimeouts::default();
    // The batched read alone: the kernel's share of a pass.
    let (w, l) = (Instant::now(), lb_userspace::rawmap::layout(fd)?);
    conntrack_gc::entries(fd, &l)?;
    let read = w.elapsed();
    // Nothing to remove: a pass at a time when the older half is a minute idle.
    let (w, c) = (Instant::now(), thread_cpu());
    let idle = conntrack_gc::pass(fd, &timeouts, now - 2 * 86_400 * ct::NS_PER_SEC + 60 * ct::NS_PER_SEC)?;
    let (idle_wall, idle_cpu) = (w.elapsed(), thread_cpu() - c);
    anyhow::ensure!(idle.removed_pairs == 0, "nothing should expire yet");
    let (w, c) = (Instant::now(), thread_cpu());
    let purge = conntrack_gc::pass(fd, &timeouts, now)?;
    let (purge_wall, purge_cpu) = (w.elapsed(), thread_cpu() - c);
    Ok(GcRow {
        entries: idle.entries,
        read,
        idle_wall,
        idle_cpu,
        purge_wall,
        purge_cpu,
        removed: purge.removed_pairs,
    })
}

fn update(fd: std::os::fd::BorrowedFd<'_>, key: &FlowKey, value: &FlowValue) -> anyhow::Result<()> {
    // SAFETY: viewing plain map ABI values as their bytes.
    let bytes = |p: *const u8, n| unsafe { std::slice::from_raw_parts(p, n) };
    lb_userspace::rawmap::update(
        fd,
        bytes((key as *const FlowKey).cast(), size_of::<FlowKey>()),
        bytes((value as *const FlowValue).cast(), size_of::<FlowValue>()),
        0,
    )
    .context("filling the flow table")
}

pub fn run(quick: bool, out: PathBuf) -> anyhow::Result<()> {
    anyhow::ensure!(privileged(), "bench conntrack needs root");
    let mut md = format!(
        "### `cargo xtask bench conntrack` — {}\n\nKernel {}, {} CPUs.\n\n",
        if quick { "quick" } else { "full" },
        crate::kernel(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let mut gc = Vec::new();
    for (pairs, capacity) in [(50_000u32, 131_072u32), (500_000, 1_048_576), (2_097_152, 4_194_304)] {
        eprintln!("bench conntrack: GC over {} entries (capacity {capacity}) ...", 2 * pairs);
        gc.push((capacity, gc_row(pairs, capacity)?));
    }
    md.push_str("GC pass (`conntrack_gc::pass`: batched read of the whole table, batched delete), one thread:\n\n| entries | capacity | batched read alone | pass, nothing expired: wall | CPU | pass removing half: wall | CPU | pairs removed |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (cap, r) in &gc {
        writeln!(
            md,
            "| {} | {cap} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {} |",
            r.entries,
            r.read.as_secs_f64() * 1e3,
            r.idle_wall.as_secs_f64() * 1e3,
            r.idle_cpu.as_secs_f64() * 1e3,
            r.purge_wall.as_secs_f64() * 1e3,
            r.purge_cpu.as_secs_f64() * 1e3,
            r.removed
        )?;
    }

    eprintln!("bench conntrack: connection rate through source NAT (lab) ...");
    let lab = clients::lab()?;
    let vip: SocketAddr = sa(clients::VIP.parse::<std::net::IpAddr>()?, 80);
    let (hair, client) = (lab.pod("web-1").ns.clone(), lab.pod("client").ns.clone());
    for ns in [&hair, &client, &lab.ext_ns()] {
        lab::sysctl(ns, "net.ipv4.tcp_tw_reuse", "1")?;
    }
    let window = Duration::from_secs(if quick { 10 } else { 60 });
    let direct = clients::conn_rate(&client, vip, window)?;
    let snat = clients::conn_rate(&hair, vip, window)?;
    writeln!(
        md,
        "\nNew connections per second over {} s (connect, one request, close), same Service and backend pod: without source NAT (another pod on the node) {direct:.0}/s, source-NATed (the pod itself, hairpin) {snat:.0}/s: **{:.2}×** (goal ≥ 0.9).",
        window.as_secs(),
        snat / direct
    )?;

    eprintln!("bench conntrack: new connections under a SYN flood ...");
    let nodeport = service_nodeport(&lab)?;
    let ext = lab.ext_ns();
    let flood_for = Duration::from_secs(10);
    let flood = Flood::start(
        &ext,
        SocketAddrV4::new(node_ip(1), 30081),
        ("198.18.128.0".parse()?, 17),
        100_000,
        flood_for,
    )?;
    let (ok, tried) = lab::in_netns(&ext, move || {
        let (t, mut ok, mut tried) = (Instant::now(), 0u32, 0u32);
        while t.elapsed() < flood_for {
            tried += 1;
            if lab::request(nodeport, Duration::from_secs(1)).is_ok() {
                ok += 1;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (ok, tried)
    })?;
    let sent = flood.join()?;
    writeln!(
        md,
        "\nSYN flood at a NodePort, {sent} SYNs over {} s from random lab sources (100k/s offered): new connections beside it {ok}/{tried} succeeded ({:.0}%).",
        flood_for.as_secs(),
        ok as f64 * 100.0 / tried.max(1) as f64
    )?;

    println!("{md}");
    fs::create_dir_all(&out)?;
    fs::write(out.join("conntrack.md"), &md)?;
    let j = json!({
        "kernel": crate::kernel(),
        "gc": gc.iter().map(|(cap, r)| json!({"entries": r.entries, "capacity": cap,
            "idle_wall_ms": r.idle_wall.as_secs_f64() * 1e3, "idle_cpu_ms": r.idle_cpu.as_secs_f64() * 1e3,
            "purge_wall_ms": r.purge_wall.as_secs_f64() * 1e3, "purge_cpu_ms": r.purge_cpu.as_secs_f64() * 1e3,
            "removed_pairs": r.removed})).collect::<Vec<_>>(),
        "conn_rate": {"direct_per_s": direct, "snat_per_s": snat, "ratio": snat / direct},
        "flood": {"syns": sent, "new_ok": ok, "new_tried": tried},
    });
    fs::write(out.join("conntrack.json"), serde_json::to_string_pretty(&j)?)?;
    eprintln!("bench conntrack: wrote {}", out.join("conntrack.md").display());
    Ok(())
}

/// A NodePort Service (30081) over the three lab pods, beside the bench's web Service.
fn service_nodeport(lab: &lab::Lab) -> anyhow::Result<SocketAddr> {
    let pods = [lab.pod("web-1"), lab.pod("web-2"), lab.pod("web-3")];
    let eps: Vec<(&lab::Pod, &str)> = pods.iter().map(|p| (*p, "ready: true")).collect();
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: np}}\nspec: {{type: NodePort, clusterIP: 198.19.0.11, ports: [{{name: http, port: 80, targetPort: {}, nodePort: 30081}}]}}\n---\n{}",
        lab::POD_PORT,
        lab::slice_yaml("np-1", "np", &[("http", lab::POD_PORT, "TCP")], &eps)
    );
    lab.write_manifest("np.yaml", &yaml)?;
    lab::wait_for(Duration::from_secs(5), || lab.has_frontend(1, node_ip(1).into(), 30081))?;
    Ok(sa(node_ip(1), 30081))
}
