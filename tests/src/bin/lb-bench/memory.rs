//! `memory`: what Services cost in memory, as a user meets it — the real `lb agent` reading
//! manifest files of N Services × 4 endpoints, with map capacities sized for N: the
//! agent's resident set once synced (and its peak, the parse's), and the kernel memory of
//! the maps (fdinfo `memlock`), per Service, beside Cilium's published Maglev cost (about
//! 65 KB per Service at its default table size). Then where the heap goes: the agent's own
//! stages (source, Model, planner) run in this process on the same files, with lb-bench's
//! allocator counting the bytes each keeps.

use std::{fmt::Write as _, fs, path::PathBuf, time::Duration};

use anyhow::{bail, ensure};
use lb_tests::lab::Bins;
use serde_json::json;

use crate::{scratch_agent::ScratchAgent, services::*};

/// The maps whose size follows the Service count (the flow table follows connections).
const PER_SERVICE_MAPS: [&str; 6] =
    ["lb_services", "lb_backends", "lb_maglev", "lb_members", "lb_stats_service", "lb_stats_backend"];
/// Cilium's Maglev cost per Service (its design document: ~65 KB at M = 16381).
const CILIUM_MAGLEV_BYTES: f64 = 65_000.0;
/// Goals of issue 15.
const GOAL_MAP_BYTES: f64 = 8_192.0;
const GOAL_RSS_BYTES: f64 = 4_096.0;

struct Row {
    services: u32,
    rss: u64,
    /// The part of `rss` that is the agent's own (heap, stacks): the rest is file-backed,
    /// the map pages it has mapped (the address pre-filter, windows of the Maglev and backend
    /// arrays it writes through `mmap`), which are the maps' kernel memory counted again.
    anon: u64,
    /// What the agent's allocator has handed out and not had back (`mallinfo2`): `anon`
    /// less this is the allocator's free space and overhead, stacks and the runtime.
    heap_in_use: u64,
    peak: u64,
    maps_total: u64,
    maps_scaled: u64,
    sync_s: f64,
    /// With the agent's default capacities, not sized for N: how often its maps grew.
    defaults: Option<usize>,
    heap: Heap,
}

/// Where the agent's heap goes, in bytes live per Service: the same stages as `lb agent
/// --manifests`, run in this process with its allocator counting.
#[derive(Default)]
struct Heap {
    /// The manifest folder's objects and indexes.
    source: f64,
    /// The Model kept between syncs.
    model: f64,
    /// The planner's record of what the maps hold (`Applied`).
    applied: f64,
}

fn heap(n: u32, manifests: &std::path::Path) -> anyhow::Result<Heap> {
    use crate::heap_count::live;
    use lb_userspace::{model, reconcile, source::manifests::Folder};
    let per = |b: i64| b as f64 / f64::from(n);
    let b0 = live();
    let mut folder = Folder::new(manifests);
    folder.refresh()?;
    let b1 = live();
    let mut state = model::ModelState::default();
    let delta = state.update(folder.cluster(), &node(), &model::Changes::everything());
    let b2 = live();
    let (caps, limits) = capacities(n);
    let mut loaded = lb_tests::harness::Loaded::with_caps(&caps);
    let mut applied = reconcile::Applied::default();
    applied.track_ranges(limits.maglev_slots);
    let b3 = live();
    let ops = reconcile::plan_changes(state.desired(), &delta, &applied, &limits).complete()?;
    reconcile::execute(&mut loaded.dp, &mut applied, &ops)?;
    drop(ops);
    // The addresses the writes listed: the agent takes them at its next GC pass.
    drop(loaded.dp.take_listed());
    let b4 = live();
    ensure!(applied.services.len() as u32 >= n, "the plan programmed {} frontends", applied.services.len());
    Ok(Heap { source: per(b1 - b0), model: per(b2 - b1), applied: per(b4 - b3) })
}

/// Services per manifest file (the agent refuses files over 16 MiB).
const PER_FILE: u32 = 5_000;

/// A manifest file of Services `from..to` and their slices (JSON documents: valid YAML).
fn manifest(from: u32, to: u32) -> anyhow::Result<String> {
    let mut s = String::new();
    for i in from..to {
        s += &serde_json::to_string(&service(i, Proto::Tcp))?;
        s += "\n---\n";
        s += &serde_json::to_string(&slice(i, &endpoints_of(i), Proto::Tcp))?;
        s += "\n---\n";
    }
    Ok(s)
}

/// The agent on `n` Services, with capacities sized for them (`sized`) or its defaults.
fn one(n: u32, bins: &Bins, sized: bool) -> anyhow::Result<Row> {
    let mut agent = ScratchAgent::prepare("mem", bins)?;
    for from in (0..n).step_by(PER_FILE as usize) {
        let file = agent.work.join(format!("manifests/services-{from}.yaml"));
        fs::write(file, manifest(from, (from + PER_FILE).min(n))?)?;
    }
    let manifests = agent.work.join("manifests").to_string_lossy().into_owned();
    let caps = capacities(n).0;
    let t0 = agent.start(sized.then_some(&caps), &["--manifests", &manifests], &[])?;
    let sync_s = agent.wait_synced(n, t0, Duration::from_secs(300))?;
    // Settled: what the agent keeps, once the parse's buffers are freed and its copies of
    // the files written to its state folder, and scraped once (as Prometheus would: the
    // datapath's series stay cached until the next scrape).
    agent.wait_for_copies(&agent.work.join("manifests"), Duration::from_secs(300))?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(agent.metric("lb_agent_resident_bytes").is_some(), "no /metrics from the agent");
    std::thread::sleep(Duration::from_millis(1100));
    let rss = agent.status_kib("VmRSS:").unwrap_or(0) * 1024;
    let anon = agent.status_kib("RssAnon:").unwrap_or(0) * 1024;
    let peak = agent.status_kib("VmHWM:").unwrap_or(0) * 1024;
    let heap_in_use = agent.metric("lb_agent_heap_in_use_bytes").unwrap_or(0);
    let bytes = |name: &str| lb_userspace::memory::map_bytes(&agent.pin_dir.join(name)).unwrap_or(0);
    let maps_total = lb_common::maps::ALL.iter().map(|m| bytes(m)).sum();
    let maps_scaled = PER_SERVICE_MAPS.iter().map(|m| bytes(m)).sum();
    let log = agent.log();
    for line in log.lines().filter(|l| l.contains("grow")) {
        eprintln!("  agent: {line}");
    }
    let grown = log.matches("maps grown in").count();
    agent.stop()?;
    ensure!(rss > 0, "no VmRSS for the agent");
    let heap = if sized { heap(n, &agent.work.join("manifests"))? } else { Heap::default() };
    let defaults = (!sized).then_some(grown);
    Ok(Row { services: n, rss, anon, heap_in_use, peak, maps_total, maps_scaled, sync_s, defaults, heap })
}

pub fn run(quick: bool, out: PathBuf, sweep: &[u32]) -> anyhow::Result<()> {
    if !lb_tests::harness::privileged() {
        bail!("bench memory needs root");
    }
    let bins = Bins::beside(&std::env::current_exe()?)?;
    let mut rows = Vec::new();
    // The largest count once more with no capacity flag: the defaults must hold it.
    let largest = sweep.iter().max().map(|n| (*n, false));
    for (n, sized) in sweep.iter().map(|n| (*n, true)).chain(largest) {
        let with = if sized { "capacities sized for them" } else { "the agent's default capacities" };
        eprintln!("bench memory: {n} services × {ENDPOINTS} endpoints, {with} ...");
        let r = one(n, &bins, sized)?;
        eprintln!(
            "  agent {:.1} MiB resident ({:.1} MiB peak), maps {:.1} MiB ({:.1} MiB scale with Services), synced in {:.1} s",
            r.rss as f64 / 1048576.0,
            r.peak as f64 / 1048576.0,
            r.maps_total as f64 / 1048576.0,
            r.maps_scaled as f64 / 1048576.0,
            r.sync_s
        );
        rows.push(r);
    }
    let kb = |b: f64| b / 1000.0;
    let mut md = format!(
        "### `cargo xtask bench memory` — {}\n\nKernel {}. The real `lb agent` on manifest files (5 000 Services each) of N Services × {ENDPOINTS} endpoints (ClusterIP, one EndpointSlice each), map capacities sized for N; resident set once the first full sync is done and the agent's copies of its files are written, 1 s after one scrape of `/metrics`, peak = VmHWM (the parse). Map memory = fdinfo `memlock`; \"per Service\" counts the maps that grow with Services ({}), not the flow table. Cilium's Maglev alone: ~65 KB per Service.\n\n| services | agent RSS (MiB) | peak (MiB) | RSS per Service (KB) | maps total (MiB) | Service maps (MiB) | per Service (KB) | vs Cilium Maglev | first sync (s) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        if quick { "quick" } else { "full" },
        super::kernel(),
        PER_SERVICE_MAPS.join(", "),
    );
    for r in &rows {
        let n = f64::from(r.services);
        let label = match r.defaults {
            None => r.services.to_string(),
            Some(grown) => format!("{} (defaults: maps grew {grown}×)", r.services),
        };
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2}× | {:.1} |",
            label,
            r.rss as f64 / 1048576.0,
            r.peak as f64 / 1048576.0,
            kb(r.rss as f64 / n),
            r.maps_total as f64 / 1048576.0,
            r.maps_scaled as f64 / 1048576.0,
            kb(r.maps_scaled as f64 / n),
            r.maps_scaled as f64 / n / CILIUM_MAGLEV_BYTES,
            r.sync_s
        );
    }
    md.push_str("\nWhere the agent's heap goes: bytes live per Service after each stage of a first sync, counted by lb-bench's allocator running the agent's own code on the same files (the resident set adds the allocator's headers and free space, the runtime, and, file-backed, the map pages the agent has mapped (the address pre-filter, a window of the arrays it writes through `mmap`): kernel memory counted again; \"anonymous\" is the agent's own part).\n\n| services | source objects (KB) | Model (KB) | planner's record (KB) | sum (KB) | agent RSS (KB) | of it anonymous (KB) | the agent's heap in use (KB) |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows.iter().filter(|r| r.defaults.is_none()) {
        let h = &r.heap;
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.services,
            kb(h.source),
            kb(h.model),
            kb(h.applied),
            kb(h.source + h.model + h.applied),
            kb(r.rss as f64 / f64::from(r.services)),
            kb(r.anon as f64 / f64::from(r.services)),
            kb(r.heap_in_use as f64 / f64::from(r.services)),
        );
    }
    if let Some(r) = rows.iter().filter(|r| r.defaults.is_none()).max_by_key(|r| r.services) {
        let n = f64::from(r.services);
        let (maps, rss) = (r.maps_scaled as f64 / n, r.rss as f64 / n);
        let _ = writeln!(
            md,
            "\nGoals at {} Services: map memory ≤ {:.1} KB per Service → {:.1} KB ({}); agent RSS ≤ {:.1} KB per Service once synced → {:.1} KB ({}).",
            r.services,
            kb(GOAL_MAP_BYTES),
            kb(maps),
            if maps <= GOAL_MAP_BYTES { "met" } else { "missed" },
            kb(GOAL_RSS_BYTES),
            kb(rss),
            if rss <= GOAL_RSS_BYTES { "met" } else { "missed" },
        );
    }
    if let Some(r) = rows.iter().find(|r| r.defaults.is_some()) {
        let _ = writeln!(
            md,
            "Goal: the default capacities hold {} Services → every one programmed {:.1} s after start, the Maglev and backend maps grown {}× on the way ({:.1} MiB of Service maps, {:.1} KB per Service), met.",
            r.services,
            r.sync_s,
            r.defaults.unwrap_or(0),
            r.maps_scaled as f64 / 1048576.0,
            kb(r.maps_scaled as f64 / f64::from(r.services)),
        );
    }
    println!("{md}");
    fs::create_dir_all(&out)?;
    fs::write(out.join("memory.md"), &md)?;
    let j = json!({
        "kernel": super::kernel(),
        "rows": rows.iter().map(|r| json!({
            "services": r.services, "agent_rss_bytes": r.rss, "agent_anon_bytes": r.anon, "agent_heap_in_use_bytes": r.heap_in_use, "agent_peak_bytes": r.peak,
            "maps_bytes": r.maps_total, "service_maps_bytes": r.maps_scaled, "first_sync_s": r.sync_s,
            "default_capacities": r.defaults.is_some(), "maps_grown": r.defaults,
            "heap_per_service_bytes": {"source": r.heap.source, "model": r.heap.model, "applied": r.heap.applied},
        })).collect::<Vec<_>>(),
    });
    fs::write(out.join("memory.json"), serde_json::to_string_pretty(&j)?)?;
    eprintln!("bench memory: wrote {}", out.join("memory.md").display());
    Ok(())
}
