//! `prog`: BPF_PROG_TEST_RUN cost per packet of `lb_xdp` — conntrack hit, new flow, no
//! frontend — with 1 to 100 000 services loaded, for our object and, side by side in the
//! same run, a baseline object (another revision, `--baseline REV`), beside an empty XDP
//! program timed the same way, in alternating turns (DESIGN.md §7): one run per call
//! (repeat = 1, since with repeat > 1 the kernel re-runs the already rewritten packet), many
//! calls, median of the kernel-reported durations, every return code checked,
//! `kernel.bpf_stats_enabled` off and restored. Flatness compares each row with ours at one
//! service timed in the same turns (rows are minutes apart, and this VM's speed drifts).
//! Both objects are loaded and programmed the same way, through their maps by name
//! (services, backends, Maglev, and memberships where the object has them), so a baseline
//! with another flow-table layout is timed fairly.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap},
    programs::Xdp,
};
use lb_common::abi::*;
use lb_tests::harness::*;
use lb_userspace::{loader, maglev};
use serde_json::json;

use crate::plot;

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

pub fn median(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    v[v.len() / 2] as f64
}

fn vip(i: u32) -> String {
    // 198.19.0.0/16 holds 65 536 VIPs; beyond that, vary the port instead (below).
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + (i % 65_536)).to_string()
}

fn port(i: u32) -> u16 {
    80 + (i / 65_536) as u16
}

/// One object's costs at one service count.
#[derive(Clone, Copy)]
struct Costs {
    hit: f64,
    new: f64,
    miss: f64,
    /// A flow hit of the IPv6 Service.
    hit6: f64,
}

struct Row {
    services: u32,
    empty: f64,
    ours: Costs,
    baseline: Option<Costs>,
    /// Ours with one service in the same turns, its flow table as large: flatness compares
    /// programs that shared the VM's moments, not rows taken a minute apart.
    one_service: Costs,
}

/// A loaded object with its maps pinned in a private directory (removed on drop).
pub struct Variant {
    pub ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl Drop for Variant {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.pin_dir);
    }
}

const BACKENDS: u32 = 4;

pub fn load(object: &[u8], tag: &str, caps: &loader::Capacities) -> anyhow::Result<Variant> {
    let root = Path::new(lb_userspace::bpffs::BPF_FS_ROOT);
    // Mounted on demand, as the agent does: a fresh boot may not have it yet.
    ensure!(
        lb_userspace::bpffs::ensure_mounted(root),
        "no bpffs at {} and mounting one failed",
        root.display()
    );
    let pin_dir = root.join(format!("lb-bench-{}-{tag}", std::process::id()));
    fs::create_dir_all(&pin_dir).with_context(|| format!("creating {}", pin_dir.display()))?;
    let mut l = EbpfLoader::new();
    l.default_map_pin_directory(&pin_dir);
    // As the agent loads it by default (--bpf-log off): no message code.
    loader::set_bpf_log(&mut l, loader::BpfLog::Off);
    for (name, max) in caps.max_entries() {
        l.map_max_entries(name, max);
    }
    let mut v =
        Variant { ebpf: l.load(object).with_context(|| format!("loading the {tag} object"))?, pin_dir };
    let xdp: &mut Xdp = v.ebpf.program_mut(loader::XDP_PROGRAM).context("lb_xdp")?.try_into()?;
    xdp.load().with_context(|| format!("verifying the {tag} object"))?;
    Ok(v)
}

/// `services` frontends, all on one Maglev table of four backends (only the measured one's
/// table is read while timing), memberships of the measured one where the object has them.
fn program(ebpf: &mut Ebpf, services: u32, target: u32) -> anyhow::Result<()> {
    let m = maglev::table_size(BACKENDS as usize, lb_common::maglev::DEFAULT_MAX_TABLE);
    let named: Vec<(u32, Vec<u8>)> =
        (1..=BACKENDS).map(|i| (i, format!("198.18.1.{i}:9376").into_bytes())).collect();
    {
        let mut b: Array<_, BackendValue> =
            Array::try_from(ebpf.map_mut("lb_backends").context("lb_backends")?)?;
        for (id, _) in &named {
            b.set(*id, BackendValue::new(ip(&format!("198.18.1.{id}")), 9376, BE_F_PRESENT), 0)?;
        }
    }
    // Two slots to an element; a baseline from before that holds one.
    // The IPv6 Service's backends and table, after the IPv4 one's (an even offset: two
    // slots to an element).
    let named6: Vec<(u32, Vec<u8>)> =
        (1..=BACKENDS).map(|i| (BACKENDS + i, format!("[{}]:9376", backend6(i)).into_bytes())).collect();
    {
        let mut b: Array<_, BackendValue> =
            Array::try_from(ebpf.map_mut("lb_backends").context("lb_backends")?)?;
        for i in 1..=BACKENDS {
            b.set(BACKENDS + i, BackendValue::new(ip(&backend6(i)), 9376, BE_F_PRESENT), 0)?;
        }
    }
    let offset6 = m.next_multiple_of(2);
    let mut table = maglev::build(&named, m);
    table.resize(offset6 as usize, 0);
    table.extend(maglev::build(&named6, m));
    let two = Array::<_, [u32; 2]>::try_from(ebpf.map_mut("lb_maglev").context("lb_maglev")?);
    if let Ok(mut t) = two {
        for (i, pair) in table.chunks(2).enumerate() {
            t.set(i as u32, [pair[0], pair.get(1).copied().unwrap_or(0)], 0)?;
        }
    } else {
        let mut t: Array<_, u32> = Array::try_from(ebpf.map_mut("lb_maglev").context("lb_maglev")?)?;
        for (i, id) in table.into_iter().enumerate() {
            t.set(i as u32, id, 0)?;
        }
    }
    if let Some(map) = ebpf.map_mut("lb_members") {
        let mut mm: HashMap<_, MemberKey, MemberValue> = HashMap::try_from(map)?;
        for (service_id, named) in [(target + 1, &named), (SERVICE6_ID, &named6)] {
            for (id, _) in named {
                let v = MemberValue { generation: *id, flags: MEMBER_F_USABLE };
                mm.insert(MemberKey { service_id, backend_id: *id }, v, 0)?;
            }
        }
    }
    // The agent calibrates the flow clock; an object with another Config layout (a
    // baseline from before it) is left as it is.
    if let (Some(map), Some((tick_ns, tick_j0, tick_t0))) =
        (ebpf.map_mut("lb_config"), lb_userspace::conntrack_gc::tick_calibration())
        && let Ok(mut c) = Array::<_, Config>::try_from(map)
    {
        c.set(0, Config { tick_ns, tick_j0, tick_t0, ..Config::default() }, 0)?;
    }
    // The address pre-filter: every VIP and backend listed, as the agent's dataplane does.
    let vips = (0..services).map(|s| ip(&vip(s))).chain([ip(VIP6)]);
    let backends = (1..=BACKENDS).flat_map(|i| [ip(&format!("198.18.1.{i}")), ip(&backend6(i))]);
    list_addresses(ebpf, vips.chain(backends))?;
    let mut sv: HashMap<_, ServiceKey, ServiceValue> =
        HashMap::try_from(ebpf.map_mut("lb_services").context("lb_services")?)?;
    for s in 0..services {
        let value = ServiceValue {
            service_id: s + 1,
            backend_count: BACKENDS,
            maglev_offset: 0,
            maglev_size: m,
            flags: 0,
            affinity_timeout: 0,
        };
        sv.insert(ServiceKey::new(ip(&vip(s)), port(s), PROTO_TCP), value, 0)?;
    }
    let value = ServiceValue {
        service_id: SERVICE6_ID,
        backend_count: BACKENDS,
        maglev_offset: offset6,
        maglev_size: m,
        flags: 0,
        affinity_timeout: 0,
    };
    sv.insert(ServiceKey::new(ip(VIP6), 80, PROTO_TCP), value, 0)?;
    Ok(())
}

/// One IPv6 Service beside the IPv4 ones, for the IPv6 flow hit.
const VIP6: &str = "2001:2::10";
const CLIENT6: &str = "2001:2::100";
/// Past any IPv4 service's id (at most 100 000 here).
const SERVICE6_ID: u32 = 1 << 20;

fn backend6(i: u32) -> String {
    format!("2001:2:1::{i}")
}

/// Sets the address pre-filter bits of `addrs`, where the object has a filter (a baseline
/// may not).
pub fn list_addresses(ebpf: &mut Ebpf, addrs: impl Iterator<Item = std::net::IpAddr>) -> anyhow::Result<()> {
    let Some(map) = ebpf.map_mut(lb_common::maps::ADDR_FILTER) else { return Ok(()) };
    let mut filter: Array<_, u64> = Array::try_from(map)?;
    let mut words: std::collections::BTreeMap<u32, u64> = Default::default();
    for a in addrs {
        let (word, bit) = lb_common::addr_filter::slot(&addr_from_ip(a));
        *words.entry(word).or_default() |= bit;
    }
    for (word, bits) in words {
        filter.set(word, bits, 0)?;
    }
    Ok(())
}

/// Calls of one program in a row before the next program's turn: long enough to keep the
/// caches the program would keep, short enough that a slow spell of the VM falls on every
/// program alike.
const BLOCK: u32 = 500;

/// An object loaded and programmed for `services` services with room for `flows` entries,
/// its measured frontend's flow from the warm-up client opened.
fn prepare(object: &[u8], tag: &str, services: u32, flows: u32) -> anyhow::Result<Variant> {
    let caps = loader::Capacities { frontends: services.max(1024) + 1, flows, ..Default::default() };
    let t = Instant::now();
    let mut v = load(object, tag, &caps)?;
    program(&mut v.ebpf, services, services - 1)?;
    eprintln!("  {tag}: loaded and programmed in {} ms", t.elapsed().as_millis());
    let prog: &Xdp = v.ebpf.program(loader::XDP_PROGRAM).unwrap().try_into()?;
    let (dst, dport) = (vip(services - 1), port(services - 1));
    ensure!(
        run_timed(prog, &Spec::tcp("198.18.100.1", 40000, &dst, dport).build()).0 == XDP_PASS,
        "{tag}: warm-up SYN not passed"
    );
    let (rc, out, _) = run_timed(prog, &Spec::tcp(CLIENT6, 40000, VIP6, 80).build());
    let to = inspect(&out).dst;
    ensure!(
        rc == XDP_PASS && (1..=BACKENDS).any(|i| to == ip(&backend6(i))),
        "{tag}: IPv6 warm-up SYN not translated (return code {rc}, to {to})"
    );
    Ok(v)
}

/// Times `calls` single runs of each program, in turns of `BLOCK` calls (so the programs
/// compared share the VM's good and bad moments), the packet of call `i` from `make(i)`;
/// the median of each. `make(p, i)`: the packet of call `i` of program `p`.
fn alternating(
    progs: &[&Xdp],
    calls: u32,
    make: &mut dyn FnMut(usize, u32) -> Vec<u8>,
) -> anyhow::Result<Vec<f64>> {
    let mut d: Vec<Vec<u64>> = progs.iter().map(|_| Vec::with_capacity(calls as usize)).collect();
    let mut start = 0;
    while start < calls {
        let end = (start + BLOCK).min(calls);
        for (p, (prog, d)) in progs.iter().zip(&mut d).enumerate() {
            for i in start..end {
                let (rc, _, ns) = run_timed(*prog, &make(p, i));
                ensure!(rc == XDP_PASS, "call {i}: return code {rc}, expected {XDP_PASS}");
                d.push(ns);
            }
        }
        start = end;
    }
    Ok(d.into_iter().map(median).collect())
}

/// Ours and the baseline (if any) at `services` services, ours with one service (the
/// flatness reference: same flow table, same turns) and the empty program, each path timed
/// for all of them in alternating turns.
fn measure(baseline: Option<&[u8]>, empty: &Xdp, services: u32, calls: u32) -> anyhow::Result<Row> {
    let flows = 2 * calls + 4096;
    let ours = prepare(loader::EBPF_OBJECT, "ours", services, flows)?;
    let base = baseline.map(|obj| prepare(obj, "baseline", services, flows)).transpose()?;
    let one = prepare(loader::EBPF_OBJECT, "ours-1", 1, flows)?;
    fn xdp(v: &Variant) -> anyhow::Result<&Xdp> {
        Ok(v.ebpf.program(loader::XDP_PROGRAM).context("lb_xdp")?.try_into()?)
    }
    let mut progs = vec![xdp(&ours)?];
    if let Some(b) = &base {
        progs.push(xdp(b)?);
    }
    // The reference's frontend is the first service; the others' the last.
    let reference_at = progs.len();
    progs.push(xdp(&one)?);
    let frontend = |p: usize| {
        let s = if p == reference_at { 0 } else { services - 1 };
        (vip(s), port(s))
    };
    // The empty program takes its turns beside the hits.
    let with_empty: Vec<&Xdp> = progs.iter().copied().chain([empty]).collect();
    let acks: Vec<Vec<u8>> = (0..with_empty.len())
        .map(|p| {
            let (dst, dport) = frontend(p);
            Spec::tcp("198.18.100.1", 40000, &dst, dport).flags(TCP_ACK).build()
        })
        .collect();
    let mut hit = alternating(&with_empty, calls, &mut |p, _| acks[p].clone())?;
    let empty_ns = hit.pop().unwrap_or(0.0);
    let ack6 = Spec::tcp(CLIENT6, 40000, VIP6, 80).flags(TCP_ACK).build();
    let hit6 = alternating(&progs, calls, &mut |_, _| ack6.clone())?;
    // A fresh 5-tuple on every call: source address and port both vary.
    let new = alternating(&progs, calls, &mut |p, i| {
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + (i / 50_000));
        let (dst, dport) = frontend(p);
        Spec::tcp(&src.to_string(), 10_000 + (i % 50_000) as u16, &dst, dport).build()
    })?;
    let miss_pkt = Spec::tcp("198.18.100.1", 40000, "198.18.0.1", 80).build();
    let miss = alternating(&progs, calls, &mut |_, _| miss_pkt.clone())?;
    let costs = |i: usize| Costs { hit: hit[i], new: new[i], miss: miss[i], hit6: hit6[i] };
    Ok(Row {
        services,
        empty: empty_ns,
        ours: costs(0),
        baseline: base.is_some().then(|| costs(1)),
        one_service: costs(reference_at),
    })
}

/// Net of the empty program, at least 1 ns (a ratio needs a positive denominator).
fn net(v: f64, empty: f64) -> f64 {
    (v - empty).max(1.0)
}

pub fn run(
    quick: bool,
    out: PathBuf,
    sweep: &[u32],
    baseline: Option<(String, PathBuf)>,
) -> anyhow::Result<()> {
    if !privileged() {
        bail!("bench prog needs root");
    }
    let calls = if quick { 20_000 } else { 100_000 };
    let base_object = match &baseline {
        Some((name, path)) => {
            Some((name.clone(), fs::read(path).with_context(|| format!("{}", path.display()))?))
        }
        None => None,
    };
    let _stats = StatsOff::new();
    let mut floor = EbpfLoader::new().load(loader::EMPTY_OBJECT).context("loading the empty program")?;
    let empty: &mut Xdp = floor.program_mut("lb_empty").context("lb_empty")?.try_into()?;
    empty.load()?;
    let empty: &Xdp = floor.program("lb_empty").unwrap().try_into()?;

    let mut rows = Vec::new();
    for &n in sweep.iter().filter(|n| **n > 0) {
        eprintln!("bench prog: {n} services, {calls} calls per case ...");
        let row = measure(base_object.as_ref().map(|(_, obj)| obj.as_slice()), empty, n, calls)?;
        let (empty, ours, baseline) = (row.empty, row.ours, row.baseline);
        eprintln!(
            "  ours: hit {:.0} ns, new flow {:.0} ns, miss {:.0} ns; empty {:.0} ns{}",
            ours.hit,
            ours.new,
            ours.miss,
            empty,
            baseline.map_or(String::new(), |b| format!(
                "; baseline: hit {:.0}, new {:.0}, miss {:.0}",
                b.hit, b.new, b.miss
            ))
        );
        rows.push(row);
    }
    eprintln!("bench prog: the pod source check on the TC new-flow path ...");
    let check = crate::source_check::measure(calls)?;
    eprintln!("bench prog: the reject path with and without a monitor ...");
    let (unwatched, watched) = crate::monitor_cost::measure(calls)?;
    let floor = alternating(&[empty], calls, &mut |_, _| {
        Spec::tcp("198.18.100.1", 40000, "198.18.0.1", 80).flags(TCP_ACK).build()
    })?[0];
    let mut md = report(&rows, quick, calls, baseline.as_ref().map(|(n, _)| n.as_str()));
    let case = |what: &str, (on, off): (f64, f64)| {
        format!("{what} {on:.0} ns with it, {off:.0} ns without, {:.2}× gross", on / off)
    };
    md.push_str(&format!(
        "\nPod source check on the TC new-flow path (its own namespace, one service, with and without it in alternating blocks of 500 SYNs): {}; {}; {}.\n",
        case("the 110 pods of a full node in turn, each on its veth with its address known from its host route", check.pods),
        case("one address no host route names, routed out of the interface (a FIB lookup, then remembered for a second)", check.remembered),
        case("every SYN from a new such address (a FIB lookup each)", check.new),
    ));
    md.push_str(&format!(
        "\nThe reject path and `lb monitor` (a SYN to a Service with no endpoint, answered with a RST at XDP; alternating blocks of 500): {unwatched:.0} ns gross with no monitor, {watched:.0} ns while a monitor holds the lease (the event written to the ring); net of the empty program ({floor:.0} ns), {:.2}×.\n",
        (watched - floor).max(1.0) / (unwatched - floor).max(1.0)
    ));
    println!("{md}");
    fs::create_dir_all(&out)?;
    fs::write(out.join("prog.md"), &md)?;
    let costs =
        |c: &Costs| json!({"hit_ns": c.hit, "new_flow_ns": c.new, "miss_ns": c.miss, "hit_ipv6_ns": c.hit6});
    let j = json!({
        "kernel": crate::kernel(),
        "calls": calls,
        "baseline": baseline.as_ref().map(|(n, _)| n.clone()),
        "reject_ns": {"no_monitor": unwatched, "monitor": watched, "empty": floor},
        "rows": rows.iter().map(|r| json!({
            "services": r.services, "empty_ns": r.empty, "ours": costs(&r.ours),
            "ours_one_service": costs(&r.one_service),
            "baseline": r.baseline.as_ref().map(costs),
        })).collect::<Vec<_>>(),
    });
    fs::write(out.join("prog.json"), serde_json::to_string_pretty(&j)?)?;
    chart(&out.join("prog.png"), &rows)?;
    eprintln!("bench prog: wrote {}", out.join("prog.md").display());
    Ok(())
}

fn report(rows: &[Row], quick: bool, calls: u32, baseline: Option<&str>) -> String {
    let mut md = format!(
        "### `cargo xtask bench prog{}` — {}\n\nKernel {}, {} CPUs; BPF_PROG_TEST_RUN, repeat 1, median of {calls} calls per cell, `bpf_stats_enabled=0`; each path timed for every program in turns of {BLOCK} calls (ours, the baseline, and the empty program beside the hits), so a slow spell of the VM falls on all alike. Net = minus the empty XDP program measured in the same run and row.{}\n\n",
        baseline.map_or(String::new(), |b| format!(" --baseline {b}")),
        if quick { "quick" } else { "full" },
        crate::kernel(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        baseline.map_or(String::new(), |b| format!(
            " Baseline: the datapath object of `{b}`, loaded and programmed the same way in the same run."
        )),
    );
    md.push_str("| services | empty (ns) | hit (ns) | new flow (ns) | no frontend (ns) | net hit | net new | net miss |");
    if baseline.is_some() {
        md.push_str(" baseline net hit | net new | net miss | ours / baseline: hit | new | miss |");
    }
    md.push_str("\n|---:|---:|---:|---:|---:|---:|---:|---:|");
    if baseline.is_some() {
        md.push_str("---:|---:|---:|---:|---:|---:|");
    }
    md.push('\n');
    for r in rows {
        let (e, o) = (r.empty, r.ours);
        md.push_str(&format!(
            "| {} | {e:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.services,
            o.hit,
            o.new,
            o.miss,
            net(o.hit, e),
            net(o.new, e),
            net(o.miss, e)
        ));
        if let Some(b) = r.baseline {
            md.push_str(&format!(
                " {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
                net(b.hit, e),
                net(b.new, e),
                net(b.miss, e),
                net(o.hit, e) / net(b.hit, e),
                net(o.new, e) / net(b.new, e),
                net(o.miss, e) / net(b.miss, e)
            ));
        }
        md.push('\n');
    }
    let last = rows.last().unwrap();
    let flat = |f: fn(&Costs) -> f64| f(&last.ours) / f(&last.one_service);
    md.push_str(&format!(
        "\nScaling, cost at {} services / cost at 1 service, the two timed in the same turns (goal ≤ 1.15): hit {:.2}, new flow {:.2}, miss {:.2}.\n",
        last.services,
        flat(|c| c.hit),
        flat(|c| c.new),
        flat(|c| c.miss)
    ));
    let hit6 = rows
        .iter()
        .map(|r| {
            let ours = net(r.ours.hit6, r.empty);
            match r.baseline {
                Some(b) => format!(
                    "{}: {ours:.0} ns against {:.0} ({:.2}×)",
                    r.services,
                    net(b.hit6, r.empty),
                    ours / net(b.hit6, r.empty)
                ),
                None => format!("{}: {ours:.0} ns", r.services),
            }
        })
        .collect::<Vec<_>>();
    md.push_str(&format!(
        "IPv6 flow hit (one IPv6 Service beside the IPv4 ones), net, by service count: {}.\n",
        hit6.join("; ")
    ));
    if baseline.is_some() {
        let mean = |f: &dyn Fn(&Row) -> f64| rows.iter().map(f).sum::<f64>() / rows.len() as f64;
        let ratio = |pick: fn(&Costs) -> f64| {
            mean(&|r: &Row| net(pick(&r.ours), r.empty) / net(pick(&r.baseline.unwrap()), r.empty))
        };
        md.push_str(&format!(
            "Net cost against the baseline, mean over the rows (goals: new flow ≤ 0.5, miss ≤ 0.7, hit ≤ 1.1): new flow {:.2}, miss {:.2}, hit {:.2}.\n",
            ratio(|c| c.new),
            ratio(|c| c.miss),
            ratio(|c| c.hit)
        ));
    }
    md
}

fn chart(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let line = |name: &str, f: &dyn Fn(&Row) -> Option<f64>| {
        plot::Series::new(name, rows.iter().map(|r| (r.services, f(r))))
    };
    let mut series = vec![
        line("new flow", &|r| Some(r.ours.new)),
        line("conntrack hit", &|r| Some(r.ours.hit)),
        line("no frontend", &|r| Some(r.ours.miss)),
        line("empty program", &|r| Some(r.empty)),
    ];
    if rows.iter().any(|r| r.baseline.is_some()) {
        series.push(line("baseline new flow", &|r| r.baseline.map(|b| b.new)));
        series.push(line("baseline hit", &|r| r.baseline.map(|b| b.hit)));
        series.push(line("baseline no frontend", &|r| r.baseline.map(|b| b.miss)));
    }
    plot::chart(path, "lb_xdp cost per packet vs services (BPF_PROG_TEST_RUN)", "ns per packet", &series)
}
