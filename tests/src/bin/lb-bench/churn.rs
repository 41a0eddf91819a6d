//! `churn`: a steady stream of EndpointSlice updates over N Services × 4 endpoints, at rising
//! rates, as rollouts, autoscaling and flapping probes send them. Each update moves one
//! Service's slice to a port no backend has (so its arrival in the datapath is one new
//! backend to look for); the generator sends them evenly spread at 100, 1 000 and 5 000 per
//! second for a window each.
//!
//! * ours: the real agent (in a scratch namespace) watching the API stand-in, which serves
//!   the updates as watch events; a poller scans the pinned backends (mmap) and times each
//!   update from its send to the first scan that sees it (an upper bound: the scan's end).
//!   CPU: the agent's user + system time over the window.
//! * iptables, nftables: kube-proxy's sync loop without a floor: every sync takes all updates
//!   that arrived while the last one ran and applies them as one `iptables-restore
//!   --noflush` (the changed service chains, new endpoint chains, old ones deleted) or one
//!   `nft -f` delta; an update's latency ends when its sync returns. CPU: the tools' own
//!   time (kube-proxy's rule building is not counted).
//!
//! Goal (issue 15): at 30 000 Services, p99 < 20 ms at 1 000 updates/s with under half a core.

use std::{
    collections::HashMap,
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::ensure;
use lb_tests::{
    api::{ApiStandIn, Kind},
    lab::{Bins, in_netns},
    netns::Scratch,
};
use lb_userspace::dataplane::{AyaDataplane, Dataplane as _};
use serde_json::json;

use crate::{clients::percentile, scratch_agent::ScratchAgent, services::*};

const RATES: [u32; 3] = [100, 1_000, 5_000];
const GOAL_SERVICES: u32 = 30_000;
const GOAL_RATE: u32 = 1_000;
const GOAL_P99_MS: f64 = 20.0;
const GOAL_CORES: f64 = 0.5;
/// How long after a window the stragglers are waited for.
const DRAIN: Duration = Duration::from_secs(10);
/// What a baseline's sync loop returns: the latencies (ms), its CPU seconds, the ports it
/// left programmed, whether it stalled.
type SyncLoop = (Vec<f64>, f64, HashMap<u32, u16>, bool);

/// How long the agent is left alone after its first sync.
const SETTLE_AFTER_START: Duration = Duration::from_secs(5);
/// A baseline sync that takes longer is stopped: the tool is overwhelmed at that rate.
const STALLED: Duration = Duration::from_secs(60);
/// The p99 this benchmark calls the limit of a rate.
const LIMIT_P99_MS: f64 = 100.0;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Ours,
    OursManifests,
    Iptables,
    Nftables,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Ours => "ours (kube source)",
            Variant::OursManifests => "ours (manifest files)",
            Variant::Iptables => "iptables-restore --noflush",
            Variant::Nftables => "nft -f delta",
        }
    }
}

/// One update: Service `service` moves to `port`; sent at `sent`.
#[derive(Clone, Copy)]
struct Update {
    service: u32,
    port: u16,
    sent: Instant,
}

/// Update `j`'s Service and port: round-robin over the Services, ports from 10 000 (the set
/// uses 9000-9003), so a Service's new backend is one nobody has.
fn update(j: u64, n: u32) -> (u32, u16) {
    ((j % u64::from(n)) as u32, 10_000 + (j % 50_000) as u16)
}

fn eps_at(i: u32, port: u16) -> Vec<(Ipv4Addr, u16)> {
    endpoints_of(i).into_iter().map(|(a, _)| (a, port)).collect()
}

/// What one rate did.
#[derive(Clone, Debug, Default)]
struct Window {
    rate: u32,
    sent: usize,
    /// Latencies (ms) of the updates seen in time.
    latencies: Vec<f64>,
    /// CPU seconds per second of window.
    cores: f64,
    /// Ours: the median time of one scan of the pinned backends (latencies are upper bounds
    /// by that much).
    scan_ms: Option<f64>,
}

impl Window {
    fn lost(&self) -> usize {
        self.sent - self.latencies.len()
    }

    /// p50 and p99 in ms, an update never seen counting as slower than all.
    fn p(&self, q: f64) -> f64 {
        if self.latencies.is_empty() || (self.lost() as f64) > (1.0 - q) * self.sent as f64 {
            return f64::INFINITY;
        }
        let mut all = self.latencies.clone();
        all.extend(std::iter::repeat_n(f64::INFINITY, self.lost()));
        percentile(&mut all, q)
    }
}

/// Sends updates at `rate` per second for `d` through `send`, numbering from `*next`.
fn generate(rate: u32, d: Duration, n: u32, next: &mut u64, mut send: impl FnMut(Update)) -> usize {
    let t0 = Instant::now();
    let mut sent = 0u64;
    while t0.elapsed() < d {
        let due = (t0.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        while sent < due {
            let (service, port) = update(*next, n);
            *next += 1;
            sent += 1;
            send(Update { service, port, sent: Instant::now() });
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    sent as usize
}

fn slice_json(i: u32, port: u16) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::to_value(slice(i, &eps_at(i, port), Proto::Tcp))?)
}

/// Services in flight the capacities leave room for: a changed table takes a fresh range and
/// its old one is held back for the reconciler's quarantine (200 ms), so at 5 000 updates/s
/// about 1 000 tables and their backends are in flight at once.
const IN_FLIGHT: u32 = 1_024;

fn churn_capacities(n: u32) -> lb_userspace::loader::Capacities {
    let (mut caps, _) = capacities(n);
    let m = lb_userspace::maglev::table_size(ENDPOINTS as usize, lb_common::maglev::DEFAULT_MAX_TABLE);
    caps.maglev_slots = (n + IN_FLIGHT) * m;
    caps.backends = ENDPOINTS * (n + 2 * IN_FLIGHT);
    caps.members = ENDPOINTS * (n + 2 * IN_FLIGHT);
    caps
}

/// Where the agent reads the Services from, and how an update reaches it.
enum Feed {
    /// Watch events from the API stand-in.
    Api(ApiStandIn),
    /// Manifest files: the Services in files of 1 000, each slice in a file of its own, which
    /// an update replaces as editors and config tools do (written aside, renamed into place).
    Files(PathBuf),
}

impl Feed {
    fn send(&self, u: &Update) -> anyhow::Result<()> {
        let v = slice_json(u.service, u.port)?;
        match self {
            Feed::Api(api) => api.apply(Kind::EndpointSlice, v),
            Feed::Files(dir) => {
                let tmp = dir.join(format!(".slice-{}.tmp", u.service));
                fs::write(&tmp, serde_json::to_string(&v)?)?;
                fs::rename(&tmp, dir.join(format!("slice-{}.yaml", u.service)))?;
            }
        }
        Ok(())
    }
}

fn ours(n: u32, bins: &Bins, window: Duration, variant: Variant) -> anyhow::Result<Vec<Window>> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let _guard = rt.enter();
    let mut agent = ScratchAgent::prepare("churn", bins)?;
    let (feed, source) = if variant == Variant::Ours {
        // The stand-in listens inside the agent's namespace.
        let listener = in_netns(&agent.ns.0, || std::net::TcpListener::bind("127.0.0.1:0"))??;
        let api = ApiStandIn::start_on(listener);
        api.apply(Kind::Node, json!({"metadata": {"name": "bench"}, "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.1"}]}}));
        for i in 0..n {
            api.apply(Kind::Service, serde_json::to_value(service(i, Proto::Tcp))?);
            api.apply(Kind::EndpointSlice, serde_json::to_value(slice(i, &endpoints_of(i), Proto::Tcp))?);
        }
        let kubeconfig = agent.work.join("kubeconfig");
        fs::write(&kubeconfig, ApiStandIn::kubeconfig(api.addr))?;
        (Feed::Api(api), vec!["--kubeconfig".to_string(), kubeconfig.to_string_lossy().into_owned()])
    } else {
        agent.manifests_in_memory()?;
        let dir = agent.work.join("manifests");
        for from in (0..n).step_by(1_000) {
            let mut text = String::new();
            for i in from..(from + 1_000).min(n) {
                text += &serde_json::to_string(&service(i, Proto::Tcp))?;
                text += "\n---\n";
            }
            fs::write(dir.join(format!("services-{from}.yaml")), text)?;
        }
        for i in 0..n {
            let v = serde_json::to_string(&slice(i, &endpoints_of(i), Proto::Tcp))?;
            fs::write(dir.join(format!("slice-{i}.yaml")), v)?;
        }
        let source = vec!["--manifests".to_string(), dir.to_string_lossy().into_owned()];
        (Feed::Files(dir), source)
    };
    let source: Vec<&str> = source.iter().map(String::as_str).collect();
    let t0 = agent.start(Some(&churn_capacities(n)), &source, &[])?;
    let synced = agent.wait_synced(n, t0, Duration::from_secs(300))?;
    // Steady state: the start's one-time work (the manifest source's copies of its files in
    // the state folder, written by their own thread) is over before the first window.
    let copies = agent.work.join("state/manifests");
    if let Feed::Files(dir) = &feed {
        agent.wait_for_copies(dir, Duration::from_secs(300))?;
    }
    std::thread::sleep(SETTLE_AFTER_START);
    eprintln!("  ours: first sync of {n} services in {synced:.1} s");
    let pending: Arc<Mutex<HashMap<(Ipv4Addr, u16), Instant>>> = Arc::default();
    let mut windows = Vec::new();
    let mut next = 0u64;
    for rate in RATES {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Vec<f64>>> = Arc::default();
        let poller = {
            let (pending, seen, stop, pins) =
                (pending.clone(), seen.clone(), stop.clone(), agent.pin_dir.clone());
            std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
                let mut scans = Vec::new();
                let dp = AyaDataplane::open(&pins)?;
                while !stop.load(Ordering::Relaxed) {
                    // A scan a millisecond (the resolution of the figures): scanning back to
                    // back would take a core from the agent on this 2-core machine.
                    std::thread::sleep(Duration::from_millis(1));
                    if pending.lock().unwrap().is_empty() {
                        continue;
                    }
                    let began = Instant::now();
                    let Ok(backends) = dp.backends() else { continue };
                    let now = Instant::now();
                    scans.push((now - began).as_secs_f64() * 1e3);
                    let mut pending = pending.lock().unwrap();
                    let mut seen = seen.lock().unwrap();
                    for (_, b) in backends {
                        let IpAddr::V4(a) = b.ip() else { continue };
                        if let Some(sent) = pending.remove(&(a, b.port())) {
                            seen.push((now - sent).as_secs_f64() * 1e3);
                        }
                    }
                }
                Ok(scans)
            })
        };
        let cpu0 = agent.cpu_seconds();
        let t = Instant::now();
        let mut updated = std::collections::HashSet::new();
        let sent = generate(rate, window, n, &mut next, |u| {
            updated.insert(u.service);
            let first = endpoints_of(u.service)[0].0;
            pending.lock().unwrap().insert((first, u.port), u.sent);
            if let Err(e) = feed.send(&u) {
                eprintln!("  an update was not sent: {e:#}");
            }
        });
        let drain = Instant::now();
        while !pending.lock().unwrap().is_empty() && drain.elapsed() < DRAIN {
            std::thread::sleep(Duration::from_millis(10));
        }
        let elapsed = t.elapsed().as_secs_f64();
        // The manifest source copies changed files at idle priority: its CPU counts once the
        // copies have caught up with the window.
        if let Feed::Files(dir) = &feed {
            let copied = |i: &u32| {
                let name = format!("slice-{i}.yaml");
                fs::read(dir.join(&name)).ok() == fs::read(copies.join(&name)).ok()
            };
            let t0 = Instant::now();
            // Each file is compared until its copy is found up to date, not again after.
            updated.retain(|i| !copied(i));
            while !updated.is_empty() && t0.elapsed() < DRAIN {
                std::thread::sleep(Duration::from_millis(100));
                updated.retain(|i| !copied(i));
            }
        }
        // Over the window and the drain, as for the baselines (whose syncs run on into it).
        let cores = (agent.cpu_seconds() - cpu0) / elapsed;
        stop.store(true, Ordering::Relaxed);
        let mut scans = poller.join().map_err(|_| anyhow::anyhow!("poller panicked"))??;
        let scan_ms = (!scans.is_empty()).then(|| percentile(&mut scans, 0.5));
        pending.lock().unwrap().clear();
        let latencies = std::mem::take(&mut *seen.lock().unwrap());
        let w = Window { rate, sent, latencies, cores, scan_ms };
        report_window(variant, &w);
        windows.push(w);
    }
    agent.stop()?;
    Ok(windows)
}

fn report_window(v: Variant, w: &Window) {
    eprintln!(
        "  {} at {}/s: {} updates, p50 {:.1} ms, p99 {:.1} ms, {} not applied within {DRAIN:?}, {:.2} cores, scan {}",
        v.name(),
        w.rate,
        w.sent,
        w.p(0.5),
        w.p(0.99),
        w.lost(),
        w.cores,
        w.scan_ms.map_or("–".into(), |s| format!("{s:.1} ms"))
    );
}

/// CPU seconds of this process's waited-for children so far.
fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(ru.ru_utime) + s(ru.ru_stime)
}

/// One kube-proxy-shaped sync of `batch` (latest port per Service wins): the delta text.
fn delta(v: Variant, batch: &HashMap<u32, u16>, current: &mut HashMap<u32, u16>) -> String {
    let mut out = String::new();
    if v == Variant::Iptables {
        out.push_str("*nat\n");
    }
    for (&i, &port) in batch {
        let old = current.insert(i, port).map(|p| eps_at(i, p)).unwrap_or_else(|| endpoints_of(i));
        if v == Variant::Iptables {
            iptables_service(&mut out, i, &eps_at(i, port), Proto::Tcp, true);
            for ep in old {
                let c = sep_chain(i, ep);
                let _ = writeln!(out, "-F {c}\n-X {c}");
            }
        } else {
            nft_service(&mut out, i, &eps_at(i, port), Proto::Tcp);
            for ep in old {
                let _ = writeln!(out, "delete chain ip kube-proxy {}", nft_ep_chain(i, ep));
            }
        }
    }
    if v == Variant::Iptables {
        out.push_str("COMMIT\n");
    }
    out
}

fn kernel_rules(
    v: Variant,
    n: u32,
    window: Duration,
    limit: Duration,
) -> anyhow::Result<Option<Vec<Window>>> {
    let ns = Arc::new(Scratch::new("churnk")?);
    let work = std::env::temp_dir().join(format!("lb-bench-churn-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let result = (|| -> anyhow::Result<Option<Vec<Window>>> {
        let f = work.join("full.rules");
        let (tool, full_args, delta_args): (&str, &[&str], &[&str]) = match v {
            Variant::Iptables => {
                fs::write(&f, iptables_rules(n, Proto::Tcp))?;
                ("iptables-restore", &[], &["--noflush"])
            }
            _ => {
                fs::write(&f, nft_rules(n, Proto::Tcp))?;
                ("nft", &["-f", "-"], &["-f", "-"])
            }
        };
        let Some(load) = ns.time(tool, full_args, &f, limit)? else {
            eprintln!("  {}: loading {n} services took over {limit:?}: not run", v.name());
            return Ok(None);
        };
        eprintln!("  {}: {n} services loaded in {:.1} s", v.name(), load.as_secs_f64());
        let mut current = HashMap::new();
        let mut windows = Vec::new();
        let mut next = 0u64;
        for rate in RATES {
            let queue: Arc<Mutex<Vec<Update>>> = Arc::default();
            let stop = Arc::new(AtomicBool::new(false));
            let syncer = {
                let (queue, stop, scratch, work) = (queue.clone(), stop.clone(), ns.clone(), work.clone());
                let mut current = std::mem::take(&mut current);
                std::thread::spawn(move || -> anyhow::Result<SyncLoop> {
                    let mut latencies = Vec::new();
                    let mut stalled = false;
                    let cpu0 = children_cpu();
                    let f = work.join("delta.rules");
                    loop {
                        let batch = std::mem::take(&mut *queue.lock().unwrap());
                        if batch.is_empty() {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(1));
                            continue;
                        }
                        let latest: HashMap<u32, u16> = batch.iter().map(|u| (u.service, u.port)).collect();
                        fs::write(&f, delta(v, &latest, &mut current))?;
                        if scratch.time(tool, delta_args, &f, STALLED)?.is_none() {
                            // Overwhelmed: what it had not applied counts as not applied.
                            stalled = true;
                            break;
                        }
                        let done = Instant::now();
                        latencies.extend(batch.iter().map(|u| (done - u.sent).as_secs_f64() * 1e3));
                    }
                    Ok((latencies, children_cpu() - cpu0, current, stalled))
                })
            };
            let t = Instant::now();
            let sent = generate(rate, window, n, &mut next, |u| queue.lock().unwrap().push(u));
            // The syncs still owed are finished (the drain), then the thread stops.
            let drain = Instant::now();
            while !queue.lock().unwrap().is_empty() && drain.elapsed() < DRAIN {
                std::thread::sleep(Duration::from_millis(10));
            }
            stop.store(true, Ordering::Relaxed);
            let (mut latencies, cpu, back, stalled) =
                syncer.join().map_err(|_| anyhow::anyhow!("sync thread panicked"))??;
            current = back;
            let elapsed = t.elapsed().as_secs_f64();
            // Syncs that ended after the drain count as not applied in time.
            latencies.retain(|l| *l <= (window + DRAIN).as_secs_f64() * 1e3);
            let w = Window { rate, sent, latencies, cores: cpu / elapsed, scan_ms: None };
            report_window(v, &w);
            windows.push(w);
            if stalled {
                eprintln!("  {}: one sync took over {STALLED:?}; the higher rates are not run", v.name());
                break;
            }
        }
        Ok(Some(windows))
    })();
    let _ = fs::remove_dir_all(&work);
    drop(ns);
    result
}

/// The variants `--only` names (all when empty).
fn chosen(only: &[String]) -> anyhow::Result<Vec<Variant>> {
    let all = [
        ("kube", Variant::Ours),
        ("manifests", Variant::OursManifests),
        ("iptables", Variant::Iptables),
        ("nftables", Variant::Nftables),
    ];
    if only.is_empty() {
        return Ok(all.iter().map(|(_, v)| *v).collect());
    }
    only.iter()
        .map(|name| {
            all.iter().find(|(n, _)| n == name).map(|(_, v)| *v).ok_or_else(|| {
                let names: Vec<&str> = all.iter().map(|(n, _)| *n).collect();
                anyhow::anyhow!("--only {name}: not a variant ({})", names.join(", "))
            })
        })
        .collect()
}

pub fn run(quick: bool, out: PathBuf, sweep: &[u32], nft_max: u32, only: &[String]) -> anyhow::Result<()> {
    ensure!(lb_tests::harness::privileged(), "bench churn needs root");
    let variants = chosen(only)?;
    let bins = Bins::beside(&std::env::current_exe()?)?;
    let window = Duration::from_secs(if quick { 10 } else { 30 });
    let limit = Duration::from_secs(120);
    let mut rows: Vec<(u32, Variant, Option<Vec<Window>>)> = Vec::new();
    for &n in sweep {
        eprintln!("bench churn: {n} services × {ENDPOINTS} endpoints, {window:?} per rate ...");
        for &v in &variants {
            let windows = match v {
                Variant::Ours | Variant::OursManifests => Some(ours(n, &bins, window, v)?),
                Variant::Nftables if n > nft_max => None,
                Variant::Iptables | Variant::Nftables => kernel_rules(v, n, window, limit)?,
            };
            rows.push((n, v, windows));
        }
    }
    report(quick, &out, window, nft_max, &rows)
}

fn ms(x: f64) -> String {
    if x.is_finite() { format!("{x:.1}") } else { "—".into() }
}

fn report(
    quick: bool,
    out: &std::path::Path,
    window: Duration,
    nft_max: u32,
    rows: &[(u32, Variant, Option<Vec<Window>>)],
) -> anyhow::Result<()> {
    let mut md = format!(
        "### `cargo xtask bench churn` — {}\n\nKernel {}. N Services × {ENDPOINTS} endpoints; EndpointSlice updates (a Service's slice moves to a new port: its 4 backends change) sent evenly at each rate for {} s. Latency: update sent → visible in the datapath (ours: the pinned backends, scanned every millisecond — an upper bound by one scan, whose median is the last column; iptables/nftables: the sync that applied it returned). Ours: the real agent on the kube source (API stand-in, watch events), map capacities for N Services plus {IN_FLIGHT} in flight; CPU (over the window and its drain) is the agent's, from {} s after its first sync (for the manifest source, after its copy of every file in its state folder); the manifest source reads each slice from a file of its own, replaced by a rename, in a folder on a tmpfs (on this VM's ext4 the generator's own writes and renames waited on the journal for tens of milliseconds; the agent's state folder stays on disk); its CPU includes the copies of the window's files it keeps in its state folder, written at idle priority, counted once they are written. Baselines: kube-proxy's sync loop without a floor, one `iptables-restore --noflush` / `nft -f` per sync of all updates waiting; CPU is the tools' (nftables above {nft_max} Services and any load over 2 minutes: not run). An update not applied within {} s of the window's end counts as slower than all; a baseline whose sync takes over a minute is stopped there (\"stalled below\": the higher rates are not run).\n\n| services | variant | rate (/s) | updates | p50 (ms) | p99 (ms) | not applied | CPU (cores) | scan (ms) |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
        if quick { "quick" } else { "full" },
        super::kernel(),
        window.as_secs(),
        SETTLE_AFTER_START.as_secs(),
        DRAIN.as_secs()
    );
    let mut limits = String::new();
    for (n, v, windows) in rows {
        let Some(windows) = windows else {
            let _ = writeln!(md, "| {n} | {} | – | – | not run | – | – | – | – |", v.name());
            continue;
        };
        for w in windows {
            let _ = writeln!(
                md,
                "| {n} | {} | {} | {} | {} | {} | {} | {:.2} | {} |",
                v.name(),
                w.rate,
                w.sent,
                ms(w.p(0.5)),
                ms(w.p(0.99)),
                w.lost(),
                w.cores,
                w.scan_ms.map_or("–".into(), ms)
            );
        }
        for rate in &RATES[windows.len()..] {
            let _ = writeln!(md, "| {n} | {} | {rate} | – | stalled below | – | – | – | – |", v.name());
        }
        let limit = windows.iter().find(|w| w.p(0.99) > LIMIT_P99_MS).map(|w| w.rate);
        let _ = writeln!(
            limits,
            "* {n} Services, {}: p99 passes {LIMIT_P99_MS} ms at {}.",
            v.name(),
            limit
                .map(|r| format!("{r} updates/s"))
                .unwrap_or_else(|| format!("none of the rates (up to {})", RATES[2]))
        );
    }
    md.push('\n');
    md.push_str(&limits);
    for (n, v, ws) in rows {
        let Some(w) = ws.iter().flatten().find(|w| w.rate == GOAL_RATE) else { continue };
        if *n != GOAL_SERVICES || !matches!(v, Variant::Ours | Variant::OursManifests) {
            continue;
        }
        let (p99, cores) = (w.p(0.99), w.cores);
        let _ = writeln!(
            md,
            "\nGoal at {GOAL_SERVICES} Services and {GOAL_RATE} updates/s, {}: p99 < {GOAL_P99_MS} ms → {} ms ({}); under {GOAL_CORES} core → {cores:.2} ({}).",
            v.name(),
            ms(p99),
            if p99 < GOAL_P99_MS { "met" } else { "missed" },
            if cores < GOAL_CORES { "met" } else { "missed" },
        );
    }
    println!("{md}");
    fs::create_dir_all(out)?;
    fs::write(out.join("churn.md"), &md)?;
    let j = json!({
        "kernel": super::kernel(),
        "window_s": window.as_secs(),
        "rows": rows.iter().map(|(n, v, ws)| json!({
            "services": n, "variant": v.name(),
            "windows": ws.as_ref().map(|ws| ws.iter().map(|w| json!({
                "rate": w.rate, "updates": w.sent, "p50_ms": w.p(0.5), "p99_ms": w.p(0.99),
                "not_applied": w.lost(), "cores": w.cores, "scan_ms": w.scan_ms,
            })).collect::<Vec<_>>()),
        })).collect::<Vec<_>>(),
    });
    fs::write(out.join("churn.json"), serde_json::to_string_pretty(&j)?)?;
    eprintln!("bench churn: wrote {}", out.join("churn.md").display());
    Ok(())
}
