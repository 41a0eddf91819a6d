//! `lb agent`: loads the datapath (reusing pinned maps, so flows survive a restart), attaches
//! it, and keeps the maps equal to what the Model makes of the source's objects.
//!
//! One thread runs everything (a tokio current-thread runtime): the source poll, the
//! reconciler, attachment of appearing links, and the HTTP servers. A sync is a pure plan
//! plus map writes, milliseconds even at thousands of services, so nothing else needs to
//! run beside it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::Ebpf;
use lb_common::{abi::*, verdict::Reason};

use crate::{
    addr_filter,
    attach::{self, Attached, Hook},
    conntrack_gc,
    dataplane::{AyaDataplane, Dataplane},
    host_clients,
    http::{self, Histogram, Response},
    links, loader, logging,
    model::{self, HealthCheck, NodeContext, NodePortAddresses},
    reconcile::{self, Applied, Limits},
    report,
    retry::Retry,
    routes,
    source::{
        kube::{self as kube_source, KubeSource},
        manifests::{self, Folder},
        watch::Watch,
    },
};

/// `--lb-algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Algorithm {
    /// Consistent hashing: a flow's backend changes only if its own backend goes away.
    Maglev,
    /// A random backend per new flow.
    Random,
}

/// `--no-backend-response`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NoBackendResponse {
    /// TCP RST / ICMP port unreachable, like kube-proxy.
    Reject,
    /// Silently drop.
    Drop,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The manifest folder; `None`: the Kubernetes API.
    pub manifests: Option<PathBuf>,
    /// `--kubeconfig`; without it (and without `manifests`) the usual inference.
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    pub xdp_ifaces: Vec<String>,
    /// Forward translated packets at XDP (`CFG_F_XDP_FORWARD`) out of `xdp_ifaces`.
    pub xdp_forward: bool,
    pub tc_ifaces: Vec<String>,
    /// `--netlink-attach`: the old kernels' attach modes, forced.
    pub legacy_attach: attach::Legacy,
    /// `--pod-source-check strict`: the TC program checks pod sources on the interfaces it
    /// is attached to.
    pub pod_source_check: bool,
    pub nodeport_addresses: NodePortAddresses,
    /// `--cgroup-root`: where the connect-time programs for the node's own clients attach
    /// (`host_clients`); `None`: not attached.
    pub cgroup_root: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub metrics_bind: SocketAddr,
    pub healthz_bind: SocketAddr,
    pub algorithm: Algorithm,
    pub no_backend: NoBackendResponse,
    pub capacities: loader::Capacities,
    /// Flow life times (`--conntrack-*`).
    pub timeouts: CtTimeouts,
    /// `--conntrack-gc-interval`.
    pub gc_interval: Duration,
    /// `--snat-port-range`, inclusive.
    pub snat_ports: (u16, u16),
    /// `/healthz` fails when changes have waited longer than this for a successful sync.
    pub healthz_stale_after: Duration,
    /// `--answer-rate` (per second, 0: unlimited) and `--answer-burst`, node totals.
    pub answer_limit: (u32, u32),
    /// `--state-dir`: the manifest files' last good copies.
    pub state_dir: PathBuf,
    pub log_format: logging::LogFormat,
    /// `--config-sync-period`: a full re-plan against the kernel's maps this often.
    pub config_sync_period: Option<Duration>,
    /// What `--config` applied and ignored, logged at start.
    pub config_note: Option<String>,
}

/// A log line (`logging`): with the time since start, so a reader can see how fast things
/// happened.
fn log(msg: impl AsRef<str>) {
    logging::line(msg.as_ref());
}

/// The status the loop writes and the HTTP servers (on their own thread) read.
type Shared = Arc<std::sync::Mutex<Status>>;

/// The guarded value, even if a thread panicked holding it (what it guards stays usable).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the HTTP servers report.
struct Status {
    sync_duration: Histogram,
    programming_duration: Histogram,
    syncs: u64,
    sync_errors: u64,
    source_errors: u64,
    last_sync_ok: Option<Instant>,
    /// The same in seconds since the epoch (`kubeproxy_sync_proxy_rules_last_timestamp_seconds`).
    last_sync_ok_unix: f64,
    /// Service and EndpointSlice changes the source reported (kube-proxy's change counters).
    service_changes: u64,
    endpoint_changes: u64,
    /// Since when changes have waited for a successful sync (None: nothing pending).
    pending_since: Option<Instant>,
    /// The sync loop's last turn: /livez fails when it stops turning.
    loop_turn: Instant,
    /// `--healthz-stale-after`.
    stale_after: Duration,
    xdp: BTreeMap<String, Attached>,
    /// The cgroup2 hierarchy the connect-time programs are attached to, if they are.
    sock_cgroup: Option<std::path::PathBuf>,
    tc: BTreeMap<String, (u32, Attached)>,
    frontends: usize,
    backends: usize,
    /// Frontends claimed by more than one Service (or port): one has it, the others are
    /// reported in the log.
    contested_frontends: usize,
    /// Services the planner skipped (a map at its capacity), with why.
    unprogrammed: Vec<(String, String)>,
    /// The Service behind each frontend (`Reporter::names`), for the metrics' labels.
    frontend_names: Arc<BTreeMap<String, report::FrontendName>>,
    last_sync: Option<report::LastSync>,
    health_checks: BTreeMap<u16, HealthCheck>,
}

/// What the flow-table GC reports (written by its thread, read by `/metrics`).
#[derive(Default)]
struct GcState {
    last: Option<conntrack_gc::PassStats>,
    /// When `last` ended.
    last_at: Option<Instant>,
    /// When the last pass began, and the addresses its flows act on: for the sync loop to
    /// narrow the address pre-filter.
    for_filter: Option<(Instant, Vec<Addr>)>,
    passes: u64,
    errors: u64,
    expired_pairs: u64,
    orphans: u64,
}

/// Starts the GC thread; it stops when `stop` is set.
fn spawn_gc(cfg: &AgentConfig, stop: Arc<AtomicBool>) -> Arc<std::sync::Mutex<GcState>> {
    let state = Arc::new(std::sync::Mutex::new(GcState::default()));
    let (st, pin_dir, timeouts, interval) =
        (state.clone(), cfg.pin_dir.clone(), cfg.timeouts, cfg.gc_interval);
    std::thread::spawn(move || {
        let mut last_log = Instant::now() - Duration::from_secs(3600);
        conntrack_gc::run(&pin_dir, timeouts, interval, &stop, |r| {
            let mut g = lock(&st);
            g.passes += 1;
            match r {
                Ok(mut p) => {
                    g.for_filter = Some((Instant::now() - p.took, std::mem::take(&mut p.referenced)));
                    g.expired_pairs += p.removed_pairs as u64;
                    g.orphans += p.removed_orphans as u64;
                    // At most a line a minute, and only when something happened.
                    if (p.removed_pairs > 0 || p.under_pressure)
                        && last_log.elapsed() > Duration::from_secs(60)
                    {
                        last_log = Instant::now();
                        log(format!(
                            "conntrack GC: {} entries ({:.0}% full{}), removed {} closed or idle flows in {:.1} ms",
                            p.entries,
                            p.fill() * 100.0,
                            if p.under_pressure {
                                ", under pressure: unfinished handshakes expire early"
                            } else {
                                ""
                            },
                            p.removed_pairs,
                            p.took.as_secs_f64() * 1e3
                        ));
                    }
                    g.last = Some(p);
                    g.last_at = Some(Instant::now());
                }
                Err(e) => {
                    g.errors += 1;
                    if g.errors.is_power_of_two() {
                        log(format!("error: conntrack GC pass failed ({e}); {} so far", g.errors));
                    }
                }
            }
        });
    });
    state
}

/// Lists in the address pre-filter every address the pinned maps name: frontends, backends
/// and both ends of every flow.
fn list_pinned_addresses(
    dp: &mut AyaDataplane,
    applied: &Applied,
    pin_dir: &std::path::Path,
) -> anyhow::Result<()> {
    use std::os::fd::AsFd as _;
    let map = conntrack_gc::open(pin_dir)?;
    let fd = map.fd().as_fd();
    let flows = conntrack_gc::entries(fd, &crate::rawmap::layout(fd)?)?;
    let mut all = addr_filter::named(applied);
    all.extend(flows.iter().flat_map(|(k, _)| [k.src, k.dst]));
    for a in &all {
        dp.list_address(a);
    }
    Ok(())
}

/// Runs the agent until SIGINT/SIGTERM.
pub fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    logging::init(cfg.log_format);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run_async(cfg))
}

async fn run_async(cfg: AgentConfig) -> anyhow::Result<()> {
    let start = Instant::now();
    if let Some(note) = &cfg.config_note {
        log(note);
    }
    if let Some(dir) = cfg.manifests.as_ref().filter(|d| !d.is_dir()) {
        anyhow::bail!("--manifests {}: not a directory", dir.display());
    }
    // Connect first: a configuration error should stop us before we touch the datapath.
    let kube_client = match &cfg.manifests {
        Some(_) => None,
        None => Some(kube_source::client(cfg.kubeconfig.as_deref()).await?),
    };
    let tc_patterns = links::Patterns::new(&cfg.tc_ifaces).context("--tc-iface")?;
    let present = links::interfaces();
    for iface in &cfg.xdp_ifaces {
        if !present.contains_key(iface) {
            anyhow::bail!("--xdp-iface {iface}: no such interface (have: {})", names(&present));
        }
    }

    // Before anything is touched: the capabilities, then one agent per pin dir.
    crate::caps::check()?;
    let _pin_lock = crate::bpffs::lock_pin_dir(&cfg.pin_dir)?;
    let (mut ebpf, migration) = loader::load_migrating(&cfg.pin_dir, &cfg.capacities)
        .with_context(|| format!("loading the datapath with maps pinned in {}", cfg.pin_dir.display()))?;
    if !migration.is_empty() {
        log(format!(
            "pinned maps with another layout migrated into new maps: {}",
            migration.describe().join(", ")
        ));
    }
    let mut dp = AyaDataplane::open(&cfg.pin_dir)?;
    let mut applied = Applied::read(&dp)?;
    // Before any program of this build runs: a new filter (a first start, an upgrade) must
    // list what the pinned maps already name.
    list_pinned_addresses(&mut dp, &applied, &cfg.pin_dir).context("filling the address pre-filter")?;
    let mut retention = addr_filter::Retention::default();
    log(format!(
        "datapath loaded; pinned maps in {} hold {} frontends and {} backends",
        cfg.pin_dir.display(),
        applied.services.len(),
        applied.backends.len()
    ));

    let status: Shared = Arc::new(std::sync::Mutex::new(Status {
        sync_duration: Histogram::kube_proxy_buckets(),
        programming_duration: Histogram::network_programming_buckets(),
        syncs: 0,
        sync_errors: 0,
        source_errors: 0,
        last_sync_ok: None,
        last_sync_ok_unix: 0.0,
        service_changes: 0,
        endpoint_changes: 0,
        pending_since: None,
        loop_turn: Instant::now(),
        stale_after: cfg.healthz_stale_after,
        xdp: BTreeMap::new(),
        sock_cgroup: None,
        tc: BTreeMap::new(),
        frontends: applied.services.len(),
        backends: applied.backends.len(),
        contested_frontends: 0,
        unprogrammed: Vec::new(),
        frontend_names: Arc::default(),
        last_sync: None,
        health_checks: BTreeMap::new(),
    }));

    for iface in &cfg.xdp_ifaces {
        let (how, _holder) =
            attach::attach_pinned(&mut ebpf, Hook::Xdp, iface, &cfg.pin_dir, cfg.legacy_attach)?;
        if let Err(e) = attach::accept_local(iface) {
            log(format!("warning: {iface}: cannot set accept_local ({e}); SNAT replies may be dropped"));
        }
        log(format!("XDP attached to {iface} ({how:?})"));
        lock(&status).xdp.insert(iface.clone(), how);
    }
    // Forwarding at XDP may send only out of our own XDP interfaces; without --xdp-forward
    // the map is emptied so a previous agent's ports do not linger.
    let tx_ports: Vec<u32> = if cfg.xdp_forward {
        cfg.xdp_ifaces.iter().filter_map(|i| present.get(i).copied()).collect()
    } else {
        vec![]
    };
    dp.set_xdp_tx_ports(&tx_ports)?;
    if cfg.xdp_forward {
        log(format!("XDP forwarding on, out of {}", cfg.xdp_ifaces.join(", ")));
    }
    // Link and manifest events wake the loop at once; the tick is the safety net.
    let wake = Arc::new(tokio::sync::Notify::new());
    let links_changed = Arc::new(AtomicBool::new(true));
    let w = wake.clone();
    if let Err(e) = links::watch(links_changed.clone(), move || w.notify_one()) {
        log(format!("warning: no netlink link events ({e}); rescanning interfaces every second"));
    }
    let (host_cookie, sock_cgroup) = match cfg.cgroup_root.as_deref() {
        Some(root) => attach_host_clients(&mut ebpf, root, &cfg.pin_dir),
        None => (0, None),
    };
    lock(&status).sock_cgroup = sock_cgroup;
    let mut tc_links: BTreeMap<String, (u32, attach::Holder)> = BTreeMap::new();
    remove_stale_link_pins(&cfg, &tc_patterns);
    // Every program is swapped in now: what the old programs wrote to migrated maps since
    // the first copy is copied again, and the old maps go.
    sync_links(&mut ebpf, &cfg, &tc_patterns, &mut tc_links, &status);
    let mut last_link_scan = Instant::now();
    if !migration.is_empty() {
        let n = migration.finish().context("finishing the pinned-map migration")?;
        log(format!("migration done ({n} entries written meanwhile copied again)"));
    }
    let mut checked = pod_ports(&cfg, &tc_links);
    dp.set_pod_ports(&checked)?;
    log_pod_ports(&checked);
    let gc_stop = Arc::new(AtomicBool::new(false));
    let gc = spawn_gc(&cfg, gc_stop.clone());

    spawn_http(&cfg, status.clone(), gc.clone())?;
    let mut health_servers: BTreeMap<u16, tokio::task::JoinHandle<()>> = BTreeMap::new();

    let limits = Limits::of(&cfg.capacities);
    let mut config = Config::default();
    let clock = conntrack_gc::tick_calibration();
    match clock {
        Some((tick, _, _)) => log(format!("flow clock: jiffies, {} Hz", 1_000_000_000 / tick)),
        None => log(
            "warning: /proc/timer_list unreadable: the datapath reads its clock through a helper (slower)",
        ),
    }
    // The Model between syncs; what a sync could not program is retried with backoff.
    let mut model_state = model::ModelState::default();
    let mut retry = Retry::new();
    // The Model's notes already logged.
    let mut said: BTreeSet<(String, String)> = BTreeSet::new();
    applied.track_ranges(cfg.capacities.maglev_slots);
    let mut tick = tokio::time::interval(manifests::POLL);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut source = match (&cfg.manifests, kube_client) {
        (Some(dir), _) => {
            let mut folder = Folder::new(dir)
                .with_state(&cfg.state_dir.join("manifests"))
                .with_context(|| format!("--state-dir {}", cfg.state_dir.display()))?;
            let w = wake.clone();
            match Watch::start(dir, move || w.notify_one()) {
                Ok(watch) => folder.watched_by(watch),
                Err(e) => log(format!("warning: no inotify on {} ({e}); polling only", dir.display())),
            }
            log(format!(
                "watching {} (inotify, and a poll every {} ms)",
                dir.display(),
                manifests::POLL.as_millis()
            ));
            Source::Folder(Box::new(folder))
        }
        (None, Some(client)) => {
            let logger = move |m: String| log(m);
            let src = KubeSource::start(client, &cfg.node_name, wake.clone(), logger);
            log(format!(
                "watching Services, EndpointSlices and Node {} through the API server",
                cfg.node_name
            ));
            Source::Kube(src)
        }
        (None, None) => unreachable!("a client exists without --manifests"),
    };
    let mut last_resync = Instant::now();
    let mut reporter = Reporter::new(&cfg, start);
    reporter.write(&status, &gc);

    loop {
        // A file read after its close is applied once it has settled: look again then.
        let settle = match &source {
            Source::Folder(folder) => folder.settle_deadline(),
            Source::Kube(_) => None,
        };
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(settle.unwrap_or_else(Instant::now).into()), if settle.is_some() => {}
            _ = wake.notified() => {
                if matches!(source, Source::Folder(_)) {
                    // Let a burst of file events (an editor's write) settle into one sync.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
        lock(&status).loop_turn = Instant::now();
        if links_changed.swap(false, Ordering::AcqRel) || last_link_scan.elapsed() > Duration::from_secs(1) {
            last_link_scan = Instant::now();
            sync_links(&mut ebpf, &cfg, &tc_patterns, &mut tc_links, &status);
            let want = pod_ports(&cfg, &tc_links);
            if want != checked {
                match dp.set_pod_ports(&want) {
                    Ok(()) => log_pod_ports(&want),
                    Err(e) => log(format!("warning: pod source checks not updated: {e}")),
                }
                checked = want;
            }
        }
        // A GC pass finished: unlist what no entry and no flow acts on any more.
        let pass = lock(&gc).for_filter.take();
        if let Some((began, referenced)) = pass {
            let listed = dp.take_listed();
            retention.synced(addr_filter::named(&applied), &listed, Instant::now());
            dp.set_address_filter(&retention.after_pass(&referenced, began));
        }
        if reporter.due() {
            reporter.write(&status, &gc);
        }
        // New changes, plus the services skipped last time once their retry is due.
        let now = Instant::now();
        let due = retry.due(now);
        let resync = cfg.config_sync_period.is_some_and(|p| last_resync.elapsed() >= p);
        let mut changes = match source.changed(&status) {
            Some(c) => c,
            None if due || resync => model::Changes::default(),
            None => continue,
        };
        if resync {
            // Everything re-planned against what the kernel holds now: repairs a map
            // someone else wrote to, or an entry a bug lost.
            last_resync = Instant::now();
            changes.all = true;
            applied = Applied::read(&dp)?;
            applied.track_ranges(limits.maglev_slots);
            log("periodic resync (--config-sync-period): everything re-planned against the maps");
        }
        {
            let mut st = lock(&status);
            st.pending_since.get_or_insert_with(Instant::now);
            st.service_changes += changes.services.len() as u64;
            st.endpoint_changes += changes.slices.len() as u64;
        }
        let t0 = Instant::now();
        let node = NodeContext {
            name: cfg.node_name.clone(),
            nodeport_addresses: cfg.nodeport_addresses.clone(),
            fallback_addresses: fallback_addresses(&cfg.xdp_ifaces),
        };
        let (mut delta, node_addresses) = source.with_cluster(|cluster| {
            let delta = model_state.update(cluster, &node, &changes);
            (delta, node.addresses(cluster))
        });
        retry.prepare(&mut delta, due, |a| model_state.uses_backend(a));
        let desired = model_state.desired();
        let mut want_config = datapath_config(&cfg, &node_addresses, clock);
        want_config.host_netns_cookie = host_cookie;
        want_config.mtu_floor = links::mtu_floor();
        if want_config != config {
            dp.set_config(&want_config)?;
            config = want_config;
            log(format!(
                "source NAT address {:?} / {:?}; packets over {} bytes checked against their route's MTU at XDP",
                nat_ip(&config.snat_v4),
                nat_ip(&config.snat_v6),
                config.mtu_floor
            ));
        }
        let plan = reconcile::plan_changes(desired, &delta, &applied, &limits);
        let result = reconcile::execute(&mut dp, &mut applied, &plan.ops);
        let took = t0.elapsed();
        if host_cookie != 0 && result.is_ok() && !plan.ops.is_empty() {
            match host_clients::destroy_stale_udp(&dp) {
                Ok(0) => {}
                Ok(n) => log(format!(
                    "closed {n} connected UDP socket(s) of the node whose backend left its Service (they reconnect to a live one)"
                )),
                Err(e) => log(format!("warning: checking the node's connected UDP sockets: {e}")),
            }
        }
        for line in retry.settle(desired, &delta, &plan.failed, result.is_ok(), Instant::now()) {
            log(line);
        }
        if delta.all || !delta.services.is_empty() {
            reporter.names(desired);
            lock(&status).frontend_names = reporter.names.clone();
        }
        let mut st = lock(&status);
        st.syncs += 1;
        st.sync_duration.observe(took.as_secs_f64());
        st.last_sync = Some(report::LastSync {
            at: report::timestamp_ago(Duration::ZERO),
            duration_ms: took.as_secs_f64() * 1e3,
            ok: result.is_ok() && plan.failed.is_empty(),
            services: desired.services.len(),
            frontends: applied.services.len(),
            backends: applied.backends.len(),
        });
        st.frontends = applied.services.len();
        st.backends = applied.backends.len();
        st.contested_frontends = model_state.contested_frontends();
        st.unprogrammed = retry.skipped().map(|(s, e)| (s.to_string(), e.to_string())).collect();
        if !plan.failed.is_empty() {
            st.sync_errors += 1;
        }
        match result {
            Ok(()) => {
                st.last_sync_ok = Some(Instant::now());
                st.last_sync_ok_unix = jiff::Timestamp::now().as_millisecond() as f64 / 1e3;
                // Skipped services keep changes pending: /healthz fails once they are stale.
                if retry.is_empty() {
                    st.pending_since = None;
                    let now = jiff::Timestamp::now();
                    for t in source.take_triggers() {
                        let secs = now.duration_since(t).as_secs_f64();
                        st.programming_duration.observe(secs.max(0.0));
                    }
                }
                let changed = if delta.all { "all".to_string() } else { delta.services.len().to_string() };
                let duration_ms = took.as_secs_f64() * 1e3;
                tracing::info!(
                    uptime_s = logging::uptime_s(),
                    services = desired.services.len(),
                    not_programmed = retry.skipped_count(),
                    frontends = applied.services.len(),
                    backends = applied.backends.len(),
                    changed = changed.as_str(),
                    writes = plan.ops.len(),
                    duration_ms,
                    "synced: {} services ({} not programmed), {} frontends, {} backends; {changed} changed, {} map writes in {duration_ms:.2} ms",
                    desired.services.len(),
                    retry.skipped_count(),
                    applied.services.len(),
                    applied.backends.len(),
                    plan.ops.len(),
                );
            }
            Err(e) => {
                st.sync_errors += 1;
                log(format!("error: sync failed: {e:#}; will retry in full"));
                // Re-read what the kernel really holds before planning again.
                applied = Applied::read(&dp)?;
                applied.track_ranges(limits.maglev_slots);
            }
        }
        // Each note once, while it holds (a Service skipped, a warning about it).
        let notes: BTreeSet<(String, String)> = desired.notes.iter().cloned().collect();
        for (what, why) in notes.difference(&said) {
            log(format!("{what}: {why}"));
        }
        said = notes;
        st.health_checks = desired.health_checks.clone();
        drop(st);
        sync_health_servers(&mut health_servers, &desired.health_checks, &status);
        reporter.write(&status, &gc);
    }
    gc_stop.store(true, Ordering::Relaxed);
    log(format!(
        "stopping: the datapath stays attached and its maps pinned in {} (a restarted agent takes over; \
             remove that directory to detach)",
        cfg.pin_dir.display()
    ));
    Ok(())
}

/// Writes the agent's report for `lb status` (`report`), and the frontend names when they
/// changed: after each sync, and every `report::EVERY` for the GC's figures.
struct Reporter {
    pin_dir: std::path::PathBuf,
    base: report::Report,
    last: Instant,
    names: Arc<BTreeMap<String, report::FrontendName>>,
    names_changed: bool,
}

impl Reporter {
    fn new(cfg: &AgentConfig, start: Instant) -> Reporter {
        let source = match &cfg.manifests {
            Some(dir) => {
                report::SourceState { kind: "manifests".into(), detail: dir.display().to_string(), errors: 0 }
            }
            None => report::SourceState {
                kind: "kubernetes".into(),
                detail: format!("node {}", cfg.node_name),
                errors: 0,
            },
        };
        let base = report::Report {
            version: env!("CARGO_PKG_VERSION").into(),
            datapath_object: report::object_hash(loader::EBPF_OBJECT),
            pid: std::process::id(),
            started_at: report::timestamp_ago(start.elapsed()),
            source,
            ..Default::default()
        };
        Reporter {
            pin_dir: cfg.pin_dir.clone(),
            base,
            last: Instant::now(),
            names: Arc::default(),
            names_changed: true,
        }
    }

    /// The Service behind each frontend of `desired`, and behind each ClusterIP as a whole.
    fn names(&mut self, desired: &model::Desired) {
        let mut names = BTreeMap::new();
        for (sref, ds) in &desired.services {
            let name = report::FrontendName {
                namespace: sref.namespace.clone(),
                service: sref.name.clone(),
                port: sref.port_name.clone(),
            };
            for &(ip, port) in &ds.frontends {
                names.insert(report::frontend_key(ip, Some((port, sref.proto))), name.clone());
                if desired.cluster_vips.contains(&ip) {
                    let whole = report::FrontendName { port: String::new(), ..name.clone() };
                    names.insert(report::frontend_key(ip, None), whole);
                }
            }
        }
        if names != *self.names {
            self.names = Arc::new(names);
            self.names_changed = true;
        }
    }

    fn due(&self) -> bool {
        self.last.elapsed() >= report::EVERY
    }

    fn write(&mut self, status: &Shared, gc: &std::sync::Mutex<GcState>) {
        let mut r = self.base.clone();
        {
            let st = lock(status);
            r.source.errors = st.source_errors;
            let xdp = st.xdp.iter().map(|(i, how)| (i, "xdp", how));
            let tc = st.tc.iter().map(|(i, (_, how))| (i, "tc", how));
            r.attachments = xdp
                .chain(tc)
                .map(|(i, hook, how)| report::Attachment {
                    interface: i.clone(),
                    hook: hook.into(),
                    mode: how.mode().into(),
                })
                .collect();
            if let Some(cgroup) = &st.sock_cgroup {
                r.attachments.push(report::Attachment {
                    interface: cgroup.display().to_string(),
                    hook: "sock".into(),
                    mode: "cgroup connect, sendmsg, recvmsg, getpeername (bpf_link)".into(),
                });
            }
            r.syncs = st.syncs;
            r.sync_errors = st.sync_errors;
            r.last_sync = st.last_sync.clone();
            r.skipped = st
                .unprogrammed
                .iter()
                .map(|(s, why)| report::Skipped { service: s.clone(), why: why.clone() })
                .collect();
            r.contested_frontends = st.contested_frontends;
        }
        let g = lock(gc);
        if let (Some(p), Some(ended)) = (&g.last, g.last_at) {
            r.flow_table = Some(report::FlowTable {
                entries: p.entries,
                capacity: p.capacity,
                by_state: p.by_state.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                snat_ports: p.snat_ports.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                at: report::timestamp_ago(ended.elapsed()),
                pass_ms: p.took.as_secs_f64() * 1e3,
            });
        }
        drop(g);
        if self.names_changed {
            match report::write_names(&self.pin_dir, &self.names) {
                Ok(()) => self.names_changed = false,
                Err(e) => log(format!("warning: cannot write the frontend names: {e}")),
            }
        }
        r.written_at = report::timestamp_ago(Duration::ZERO);
        if let Err(e) = report::write(&self.pin_dir, &r) {
            log(format!("warning: cannot write the status report: {e}"));
        }
        self.last = Instant::now();
    }
}

/// Where objects come from, and what changed since the last sync.
enum Source {
    Folder(Box<Folder>),
    Kube(KubeSource),
}

impl Source {
    /// What changed since the last call, if anything (the first time: everything).
    fn changed(&mut self, status: &Shared) -> Option<model::Changes> {
        match self {
            Source::Folder(folder) => {
                match folder.refresh() {
                    Ok((_, errors)) => {
                        for e in &errors {
                            lock(status).source_errors += 1;
                            log(format!("error: {e}; keeping its last good content"));
                        }
                    }
                    Err(e) => log(format!("error: {e}")),
                }
                for w in folder.take_warnings() {
                    log(format!("warning: {w}"));
                }
                Some(folder.take_changes()).filter(|c| !c.is_empty())
            }
            Source::Kube(src) => {
                lock(status).source_errors = src.errors();
                src.take_changes()
            }
        }
    }

    /// Runs `f` on the objects as they are now.
    fn with_cluster<R>(&self, f: impl FnOnce(&model::Cluster) -> R) -> R {
        match self {
            Source::Folder(folder) => f(folder.cluster()),
            Source::Kube(src) => src.with_cluster(f),
        }
    }

    fn take_triggers(&self) -> Vec<jiff::Timestamp> {
        match self {
            Source::Folder(_) => Vec::new(),
            Source::Kube(src) => src.take_triggers(),
        }
    }
}

fn names(ifaces: &BTreeMap<String, u32>) -> String {
    ifaces.keys().cloned().collect::<Vec<_>>().join(", ")
}

fn nat_ip(a: &Addr) -> Option<IpAddr> {
    (*a != [0; 4]).then(|| ip_from_addr(a))
}

/// Addresses to use without a Node object: those of the XDP interfaces first (the node's
/// external addresses), then the others.
fn fallback_addresses(xdp_ifaces: &[String]) -> Vec<IpAddr> {
    let all = links::addresses();
    let (mut first, rest): (Vec<_>, Vec<_>) = all.into_iter().partition(|(n, _)| xdp_ifaces.contains(n));
    first.extend(rest);
    first.into_iter().map(|(_, ip)| ip).collect()
}

fn datapath_config(cfg: &AgentConfig, node_addresses: &[IpAddr], clock: Option<(u64, u64, u64)>) -> Config {
    let (tick_ns, tick_j0, tick_t0) = clock.unwrap_or_default();
    let mut c = Config {
        snat_port_min: cfg.snat_ports.0,
        snat_port_max: cfg.snat_ports.1,
        timeouts: cfg.timeouts,
        tick_ns,
        tick_j0,
        tick_t0,
        ..Config::default()
    };
    if cfg.algorithm == Algorithm::Random {
        c.flags |= CFG_F_RANDOM;
    }
    if cfg.no_backend == NoBackendResponse::Drop {
        c.flags |= CFG_F_NO_BACKEND_DROP;
    }
    if cfg.xdp_forward {
        c.flags |= CFG_F_XDP_FORWARD;
    }
    (c.answer_cost_ns, c.answer_cap_ns) = answer_bucket(cfg.answer_limit, aya::util::nr_cpus().unwrap_or(1));
    if let Some(v4) = node_addresses.iter().find(|a| a.is_ipv4()) {
        c.snat_v4 = addr_from_ip(*v4);
    }
    if let Some(v6) = node_addresses.iter().find(|a| a.is_ipv6()) {
        c.snat_v6 = addr_from_ip(*v6);
    }
    c
}

/// Each CPU's answer bucket for a node-wide `(rate per second, burst)` over `cpus` CPUs:
/// (cost of one answer, credit cap), in ns. Each CPU gets its share of both, at least one.
pub fn answer_bucket((rate, burst): (u32, u32), cpus: usize) -> (u64, u64) {
    if rate == 0 {
        return (0, 0);
    }
    let cpus = cpus.max(1) as u64;
    let per_cpu = (u64::from(rate) / cpus).max(1);
    let cost = 1_000_000_000 / per_cpu;
    let burst = (u64::from(burst) / cpus).max(1);
    (cost, cost * burst)
}

/// The pod interfaces whose sources the TC program checks: every attached one, with its
/// bridge (or itself) and the addresses host routes send out of it (its pod's, with a
/// veth-per-pod CNI); none with `--pod-source-check off`.
fn pod_ports(
    cfg: &AgentConfig,
    tc_links: &BTreeMap<String, (u32, attach::Holder)>,
) -> BTreeMap<u32, PodPort> {
    if !cfg.pod_source_check {
        return BTreeMap::new();
    }
    let all = links::interfaces();
    let routes = routes::host_routes();
    tc_links
        .iter()
        .map(|(name, (ifindex, _))| {
            let also = links::master(name).and_then(|m| all.get(&m).copied()).unwrap_or(*ifindex);
            // One address per family first: a dual-stack pod's two.
            let mine: Vec<IpAddr> = routes.iter().filter(|(i, _)| i == name).map(|(_, a)| *a).collect();
            let v4 = mine.iter().find(|a| a.is_ipv4());
            let v6 = mine.iter().find(|a| a.is_ipv6());
            let addrs: Vec<IpAddr> = v4.into_iter().chain(v6).chain(&mine).copied().collect();
            (*ifindex, PodPort::new(also, &addrs))
        })
        .collect()
}

/// Says how many interfaces the source check covers and how many pod addresses it knows.
fn log_pod_ports(ports: &BTreeMap<u32, PodPort>) {
    let known: usize = ports.values().map(|p| p.addrs.iter().filter(|a| **a != NO_ADDR).count()).sum();
    log(format!(
        "pod source check on {} interfaces, {known} pod addresses known from host routes",
        ports.len()
    ));
}

/// Attaches the TC program to matching interfaces that appeared, and forgets gone ones.
fn sync_links(
    ebpf: &mut Ebpf,
    cfg: &AgentConfig,
    patterns: &links::Patterns,
    tc_links: &mut BTreeMap<String, (u32, attach::Holder)>,
    status: &Shared,
) {
    let want = patterns.select(&links::interfaces());
    let stale: Vec<String> =
        tc_links.iter().filter(|(n, (idx, _))| want.get(*n) != Some(idx)).map(|(n, _)| n.clone()).collect();
    for name in stale {
        if let Some((_, holder)) = tc_links.remove(&name) {
            holder.release();
        }
        lock(status).tc.remove(&name);
        log(format!("TC detached from {name} (link gone)"));
    }
    for (name, idx) in want {
        if tc_links.contains_key(&name) {
            continue;
        }
        match attach::attach_pinned(ebpf, Hook::Tc, &name, &cfg.pin_dir, cfg.legacy_attach) {
            Ok((how, holder)) => {
                let _ = attach::accept_local(&name);
                tc_links.insert(name.clone(), (idx, holder));
                lock(status).tc.insert(name.clone(), (idx, how));
                log(format!("TC attached to {name} ({how:?})"));
            }
            // The link may have vanished between listing and attaching; the next scan decides.
            Err(e) => log(format!("warning: {e}")),
        }
    }
}

/// Pins left by an earlier agent for interfaces this one will not serve (gone, or no longer
/// named by the flags): removing them detaches those programs.
/// Attaches the connect-time programs for the node's own clients (`host_clients`); returns
/// the network namespace cookie they act in and the cgroup2 hierarchy, or 0 (with a
/// warning) when they cannot run here: the packet path works without them.
fn attach_host_clients(
    ebpf: &mut aya::Ebpf,
    root: &std::path::Path,
    pin_dir: &std::path::Path,
) -> (u64, Option<std::path::PathBuf>) {
    let attached = host_clients::cgroup2_root(root)
        .map_err(anyhow::Error::from)
        .and_then(|r| host_clients::attach(ebpf, &r, pin_dir).map(|()| r))
        .and_then(|r| Ok((r, host_clients::netns_cookie()?)));
    match attached {
        Ok((r, cookie)) => {
            log(format!("clients on this node served at connect time (cgroup {})", r.display()));
            (cookie, Some(r))
        }
        Err(e) => {
            log(format!("warning: clients on this node (its shell, hostNetwork pods) are not served: {e:#}"));
            (0, None)
        }
    }
}

fn remove_stale_link_pins(cfg: &AgentConfig, tc: &links::Patterns) {
    let present = links::interfaces();
    let Ok(dir) = std::fs::read_dir(cfg.pin_dir.join("links")) else { return };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let keep = match name.split_once('-') {
            Some(("xdp", iface)) => cfg.xdp_ifaces.iter().any(|i| i == iface),
            Some(("tc", iface)) => tc.matches(iface) && present.contains_key(iface),
            Some(("sock", _)) => cfg.cgroup_root.is_some(),
            _ => true,
        };
        if !keep {
            let _ = std::fs::remove_file(entry.path());
            log(format!("removed stale link pin {name}"));
        }
    }
}

/// One HTTP responder per `healthCheckNodePort`, started and stopped as Services change.
fn sync_health_servers(
    servers: &mut BTreeMap<u16, tokio::task::JoinHandle<()>>,
    want: &BTreeMap<u16, HealthCheck>,
    status: &Shared,
) {
    servers.retain(|port, task| {
        let keep = want.contains_key(port);
        if !keep {
            task.abort();
        }
        keep
    });
    for port in want.keys() {
        if servers.contains_key(port) {
            continue;
        }
        let addr = SocketAddr::from(([0, 0, 0, 0], *port));
        let listener = match std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
        {
            Ok(l) => l,
            Err(e) => {
                log(format!("warning: healthCheckNodePort {port}: {e}"));
                continue;
            }
        };
        let status = status.clone();
        let port = *port;
        servers.insert(
            port,
            tokio::task::spawn_local(http::serve(listener, move |_path| {
                let hc = lock(&status).health_checks.get(&port).cloned();
                async move {
                    let (service, n) = hc.map(|h| (h.service, h.local_endpoints)).unwrap_or_default();
                    let (ns, name) = service.split_once('/').unwrap_or(("", ""));
                    let body =
                        serde_json::json!({"service": {"namespace": ns, "name": name}, "localEndpoints": n});
                    Response::json(if n > 0 { 200 } else { 503 }, body.to_string())
                }
            })),
        );
    }
}

/// `/metrics` on `--metrics-bind-address`, `/healthz` and `/livez` on `--healthz-bind-address`,
/// served from a thread of their own: they answer within milliseconds whatever the sync loop
/// is doing (parsing a file, planning, writing maps).
fn spawn_http(cfg: &AgentConfig, status: Shared, gc: Arc<std::sync::Mutex<GcState>>) -> anyhow::Result<()> {
    let bind = |addr: SocketAddr, what: &str| {
        std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| anyhow::anyhow!("{what}: binding {addr}: {e}"))
    };
    let metrics = bind(cfg.metrics_bind, "--metrics-bind-address")?;
    let healthz = bind(cfg.healthz_bind, "--healthz-bind-address")?;
    let pin_dir = cfg.pin_dir.clone();
    std::thread::Builder::new().name("http".into()).spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let (Ok(metrics), Ok(healthz)) =
                (tokio::net::TcpListener::from_std(metrics), tokio::net::TcpListener::from_std(healthz))
            else {
                return;
            };
            let st = status.clone();
            tokio::task::spawn_local(http::serve(metrics, move |path| {
                let r = match path.as_str() {
                    "/metrics" => {
                        // The datapath's counters (a walk of the flow table among them) are read
                        // on a blocking thread.
                        let status = render_status(&lock(&st)) + &render_gc(&lock(&gc));
                        let names = lock(&st).frontend_names.clone();
                        let pins = pin_dir.clone();
                        return futures::future::Either::Left(async move {
                            let datapath =
                                tokio::task::spawn_blocking(move || render_datapath(&pins, &names))
                                    .await
                                    .unwrap_or_default();
                            Response::text(200, status + &datapath)
                        });
                    }
                    "/healthz" => healthz_answer(&lock(&st)),
                    "/livez" => livez_answer(&lock(&st)),
                    _ => Response::text(404, "try /metrics\n"),
                };
                futures::future::Either::Right(async move { r })
            }));
            http::serve(healthz, move |path| {
                let r = match path.as_str() {
                    "/healthz" => healthz_answer(&lock(&status)),
                    "/livez" => livez_answer(&lock(&status)),
                    _ => Response::text(404, "try /healthz or /livez\n"),
                };
                async move { r }
            })
            .await;
        });
    })?;
    log(format!(
        "metrics on http://{}/metrics, health on http://{}/healthz",
        cfg.metrics_bind, cfg.healthz_bind
    ));
    Ok(())
}

/// Like kube-proxy's: healthy once a sync succeeded, unless changes have waited longer than
/// `--healthz-stale-after` for one (syncs failing, or the loop stuck).
fn healthz_answer(st: &Status) -> Response {
    let ago = |t: Instant| format!("{:.1}s ago", t.elapsed().as_secs_f64());
    let Some(last) = st.last_sync_ok else {
        return Response::json(503, "{\"lastUpdated\": null, \"reason\": \"no successful sync yet\"}");
    };
    match st.pending_since.filter(|p| p.elapsed() > st.stale_after) {
        Some(p) => Response::json(
            503,
            format!(
                "{{\"lastUpdated\": \"{}\", \"reason\": \"changes pending since {} ({} failed syncs so far, {} services not programmed)\"}}",
                ago(last),
                ago(p),
                st.sync_errors,
                st.unprogrammed.len()
            ),
        ),
        None => Response::json(200, format!("{{\"lastUpdated\": \"{}\"}}", ago(last))),
    }
}

/// Alive while the sync loop turns (it turns at least every 250 ms), whatever the syncs do.
fn livez_answer(st: &Status) -> Response {
    let idle = st.loop_turn.elapsed();
    let code = if idle > st.stale_after { 503 } else { 200 };
    Response::json(code, format!("{{\"loopTurn\": \"{:.1}s ago\"}}", idle.as_secs_f64()))
}

/// The agent's own metrics.
fn render_status(st: &Status) -> String {
    let mut s = st.sync_duration.render(
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "Time to plan and write one sync of the datapath maps.",
    );
    s += &st.programming_duration.render(
        "kubeproxy_network_programming_duration_seconds",
        "From an EndpointSlice change (its last-change-trigger-time annotation) to the datapath programmed.",
    );
    let counter =
        |name: &str, help: &str, v: u64| format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n");
    let gauge = |name: &str, help: &str, v: String| {
        format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n")
    };
    s += &gauge(
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "When the datapath maps were last synced successfully (seconds since the epoch).",
        format!("{:.3}", st.last_sync_ok_unix),
    );
    s += &counter(
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "Service changes the source reported.",
        st.service_changes,
    );
    s += &counter(
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "EndpointSlice changes the source reported.",
        st.endpoint_changes,
    );
    s += &counter("lb_syncs_total", "Syncs of the datapath maps.", st.syncs);
    s += &counter("lb_sync_errors_total", "Syncs that failed (state kept, retried).", st.sync_errors);
    s += &counter(
        "lb_source_errors_total",
        "Manifest files rejected (last good content kept).",
        st.source_errors,
    );
    s += &gauge("lb_frontends", "Frontend entries in the datapath.", st.frontends.to_string());
    s += &gauge("lb_backends", "Backend entries in the datapath.", st.backends.to_string());
    s += &gauge(
        "lb_frontend_conflicts",
        "Frontends (ip, port, protocol) claimed by more than one Service or port: the oldest has it, the others are logged as skipped.",
        st.contested_frontends.to_string(),
    );
    s += "# HELP lb_service_unprogrammed Datapath services skipped because a map is at its capacity (their maps keep what they held; retried with backoff).\n# TYPE lb_service_unprogrammed gauge\n";
    for (service, why) in &st.unprogrammed {
        let why = why.replace('\\', "\\\\").replace('"', "\\\"");
        s += &format!("lb_service_unprogrammed{{service=\"{service}\",reason=\"{why}\"}} 1\n");
    }
    s += "# HELP lb_xdp_attached XDP attachment per interface (mode label; generic is the slow fallback).\n# TYPE lb_xdp_attached gauge\n";
    for (iface, how) in &st.xdp {
        s += &format!("lb_xdp_attached{{iface=\"{iface}\",mode=\"{how:?}\"}} 1\n");
    }
    s += &gauge("lb_tc_attached", "Interfaces with the TC program.", st.tc.len().to_string());
    s
}

/// The datapath's counters, straight from the pinned maps; per-Service series labelled with
/// the Service of one of the id's frontends (`names`).
fn render_datapath(pin_dir: &std::path::Path, names: &BTreeMap<String, report::FrontendName>) -> String {
    let mut s = String::new();
    if let Ok(dp) = AyaDataplane::open(pin_dir) {
        s += "# HELP lb_packets_total Packets by datapath verdict reason.\n# TYPE lb_packets_total counter\n";
        let mut bytes = String::from(
            "# HELP lb_bytes_total Bytes by datapath verdict reason.\n# TYPE lb_bytes_total counter\n",
        );
        for r in Reason::ALL {
            if let Ok(c) = dp.reason_counter(r) {
                s += &format!("lb_packets_total{{reason=\"{}\"}} {}\n", r.name(), c.packets);
                bytes += &format!("lb_bytes_total{{reason=\"{}\"}} {}\n", r.name(), c.bytes);
            }
        }
        s += &bytes;
        s += "# HELP lb_xdp_forward_packets_total Translated packets at XDP under --xdp-forward, by what became of them.\n# TYPE lb_xdp_forward_packets_total counter\n";
        for (slot, result) in
            [(XDP_FWD_REDIRECTED, "redirected"), (XDP_FWD_TX, "tx"), (XDP_FWD_TO_STACK, "to_stack")]
        {
            if let Ok(c) = dp.xdp_forward_counter(slot) {
                s += &format!("lb_xdp_forward_packets_total{{result=\"{result}\"}} {}\n", c.packets);
            }
        }
        s += "# HELP lb_monitor_events_total Datapath events for `lb monitor`: written to the ring, or lost to a full one (none while no monitor runs).\n# TYPE lb_monitor_events_total counter\n";
        for (slot, result) in [(EVENTS_SENT, "sent"), (EVENTS_LOST, "lost")] {
            if let Ok(c) = dp.events_counter(slot) {
                s += &format!("lb_monitor_events_total{{result=\"{result}\"}} {}\n", c.packets);
            }
        }
        s += "# HELP lb_agent_resident_bytes The agent's resident memory (VmRSS).\n# TYPE lb_agent_resident_bytes gauge\n";
        if let Some(b) = crate::memory::resident_bytes() {
            s += &format!("lb_agent_resident_bytes {b}\n");
        }
        s += "# HELP lb_map_memory_bytes Kernel memory of each pinned map (its fdinfo memlock).\n# TYPE lb_map_memory_bytes gauge\n";
        for name in lb_common::maps::ALL {
            if let Some(b) = crate::memory::map_bytes(&pin_dir.join(name)) {
                s += &format!("lb_map_memory_bytes{{map=\"{name}\"}} {b}\n");
            }
        }
        s += "# HELP lb_address_filter_bits Bits set in the address pre-filter (of 1048576): frontend, backend and live-flow addresses, less hash collisions.\n# TYPE lb_address_filter_bits gauge\n";
        s += &format!("lb_address_filter_bits {}\n", dp.address_filter_bits());
        // Each service id with the Service (namespace, name, port, protocol) of a frontend
        // of it. The id stays a label: a port has one id per scope (cluster, external) and
        // IP family, so the names alone could repeat.
        let mut ids: BTreeMap<u32, String> = BTreeMap::new();
        for (k, v) in dp.services().unwrap_or_default() {
            let name = names.get(&report::frontend_key(k.ip(), Some((k.port(), k.proto))));
            let labels = match name {
                Some(n) => format!(
                    "namespace=\"{}\",service=\"{}\",port=\"{}\",protocol=\"{}\",",
                    n.namespace,
                    n.service,
                    n.port,
                    proto_name(k.proto)
                ),
                None => String::new(),
            };
            let entry = ids.entry(v.service_id).or_default();
            if entry.is_empty() {
                *entry = labels;
            }
        }
        s += "# HELP lb_service_packets_total Packets per datapath service (a Service port, per scope and IP family), both directions.\n# TYPE lb_service_packets_total counter\n";
        for (id, labels) in ids {
            if let Ok(c) = dp.service_counter(id) {
                s += &format!("lb_service_packets_total{{{labels}service_id=\"{id}\"}} {}\n", c.packets);
            }
        }
        s +=
            "# HELP lb_backend_packets_total Packets per backend.\n# TYPE lb_backend_packets_total counter\n";
        for (id, b) in dp.backends().unwrap_or_default() {
            if let Ok(c) = dp.backend_counter(id) {
                s += &format!(
                    "lb_backend_packets_total{{backend=\"{}:{}\"}} {}\n",
                    b.ip(),
                    b.port(),
                    c.packets
                );
            }
        }
    }
    s
}

/// The flow table as the last GC pass saw it, and what the GC did so far.
fn render_gc(g: &GcState) -> String {
    let metric = |kind: &str, name: &str, help: &str, rows: Vec<(String, String)>| {
        let mut s = format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
        for (labels, v) in rows {
            s += &format!("{name}{labels} {v}\n");
        }
        s
    };
    let one = |v: String| vec![(String::new(), v)];
    let mut s =
        metric("counter", "lb_conntrack_gc_passes_total", "Flow-table GC passes.", one(g.passes.to_string()));
    s += &metric(
        "counter",
        "lb_conntrack_gc_errors_total",
        "Flow-table GC passes that failed.",
        one(g.errors.to_string()),
    );
    s += &metric(
        "counter",
        "lb_conntrack_expired_total",
        "Flows (both directions) removed by the GC: closed, idle past their timeout, or unfinished handshakes under pressure.",
        one(g.expired_pairs.to_string()),
    );
    let Some(p) = &g.last else { return s };
    s += &metric(
        "gauge",
        "lb_conntrack_entries_total",
        "Flow-table entries (forward and reply), at the last GC pass.",
        one(p.entries.to_string()),
    );
    s += &metric(
        "gauge",
        "lb_conntrack_capacity",
        "Flow-table capacity (--max-flows).",
        one(p.capacity.to_string()),
    );
    s += &metric(
        "gauge",
        "lb_conntrack_fill_ratio",
        "Flow-table entries / capacity.",
        one(format!("{:.4}", p.fill())),
    );
    s += &metric(
        "gauge",
        "lb_conntrack_under_pressure",
        "1 while the table is over half full: unfinished handshakes expire early.",
        one(u8::from(p.under_pressure).to_string()),
    );
    s += &metric(
        "gauge",
        "lb_conntrack_entries",
        "Flows by state, at the last GC pass.",
        p.by_state.iter().map(|(st, n)| (format!("{{state=\"{st}\"}}"), n.to_string())).collect(),
    );
    s += &metric(
        "gauge",
        "lb_snat_ports_in_use",
        "Source-NAT ports held by flows, per node address.",
        p.snat_ports.iter().map(|(a, n)| (format!("{{address=\"{a}\"}}"), n.to_string())).collect(),
    );
    s += &metric(
        "gauge",
        "lb_conntrack_gc_duration_seconds",
        "Time the last GC pass took.",
        one(format!("{:.6}", p.took.as_secs_f64())),
    );
    s
}
