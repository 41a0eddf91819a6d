//! `lb agent`: loads the datapath (reusing pinned maps, so flows survive a restart), attaches
//! it, and keeps the maps equal to what the Model makes of the source's objects.
//!
//! One thread runs the loop (a tokio current-thread runtime): the source, the sync
//! (`sync`), attachment of appearing links (`attachments`) and the health-check
//! responders; `/metrics`, `/healthz` and `/livez` have a thread of their own (`serve`), the
//! flow-table GC another (`state`). A sync is a pure plan plus map writes, milliseconds even
//! at thousands of services, so nothing else needs to run beside it.

mod attachments;
mod bpf_messages;
pub mod growth;
pub mod metrics;
mod serve;
mod state;
pub mod sync;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_common::abi::*;

use self::{
    attachments::Attachments,
    metrics::{AgentMetrics, Datapath},
    state::{GcState, Reporter, Shared, Status},
    sync::{Outcome, Syncer},
};
use crate::{
    addr_filter, attach, conntrack_gc,
    dataplane::AyaDataplane,
    host_clients, links, loader, logging,
    model::{NodeContext, NodePortAddresses},
    reconcile::{Applied, Limits},
    report,
    source::{
        ChangeSource as _, Source,
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
    /// `--node-hook tc`: `xdp_ifaces` run the TC program at ingress instead of XDP.
    pub node_tc: bool,
    /// `CFG_F_HOST_ROUTING`: translated packets leave TC for their next hop.
    pub host_routing: bool,
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
    /// Which capacities grow when full (`--max-backends`, `--max-maglev-slots` `auto`).
    pub growable: growth::Growable,
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
    /// `--bpf-log`: the datapath's debug messages compiled in at load.
    pub bpf_log: loader::BpfLog,
    /// `--min-sync-period`: the floor between two syncs (zero: none).
    pub min_sync_period: Duration,
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

/// The guarded value, even if a thread panicked holding it (what it guards stays usable).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the agent until SIGINT/SIGTERM.
pub fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    anyhow::ensure!(!(cfg.node_tc && cfg.xdp_forward), "--xdp-forward needs --node-hook xdp");
    logging::init(cfg.log_format, cfg.bpf_log);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run_async(cfg))
}

async fn run_async(mut cfg: AgentConfig) -> anyhow::Result<()> {
    let start = Instant::now();
    if let Some(note) = &cfg.config_note {
        log(note);
    }
    let kube_client = preflight(&cfg).await?;
    // Before anything is touched: the capabilities, then one agent per pin dir.
    crate::caps::check()?;
    let _pin_lock = crate::bpffs::lock_pin_dir(&cfg.pin_dir)?;
    cfg.capacities = growth::at_start(cfg.capacities, cfg.growable, &cfg.pin_dir);
    let (mut ebpf, mut dp, applied, migration) = load(&cfg)?;
    // Before any program of this build runs: a new filter (a first start, an upgrade) must
    // list what the pinned maps already name. (A reload to grow maps keeps the filter's
    // map, bits and all: it is not done again then.)
    attachments::list_pinned_addresses(&mut dp, &applied, &cfg.pin_dir)
        .context("filling the address pre-filter")?;
    if cfg.bpf_log != loader::BpfLog::Off {
        bpf_messages::start(&mut ebpf, cfg.bpf_log);
    }
    let status = Status::new(cfg.healthz_stale_after);
    // Link and manifest events wake the loop at once; the tick is the safety net.
    let wake = Arc::new(tokio::sync::Notify::new());
    let w = wake.clone();
    let mut attachments = Attachments::start(ebpf, &cfg, &mut dp, &status, move || w.notify_one())?;
    // Every program is swapped in now: what the old programs wrote to migrated maps since
    // the first copy is copied again, and the old maps go.
    if !migration.is_empty() {
        let n = migration.finish().context("finishing the pinned-map migration")?;
        log(format!("migration done ({n} entries written meanwhile copied again)"));
    }
    attachments.check_pod_sources(&cfg, &mut dp)?;
    let metrics = AgentMetrics::new();
    metrics.attachments(&lock(&status));
    let gc_stop = Arc::new(AtomicBool::new(false));
    let gc = state::spawn_gc(&cfg, gc_stop.clone(), metrics.gc.clone());
    let datapath = Datapath::new(cfg.pin_dir.clone());
    serve::spawn_http(&cfg, status.clone(), &metrics, datapath.clone())?;
    let source = open_source(&cfg, kube_client, &wake)?;
    let mut agent = Agent {
        syncer: Syncer::new(applied, Limits::of(&cfg.capacities)),
        clock: flow_clock(),
        reporter: Reporter::new(&cfg, start),
        retention: addr_filter::Retention::default(),
        health_servers: BTreeMap::new(),
        last_resync: Instant::now(),
        last_sync: None,
        held_until: None,
        mtu_floor: ReadLately::default(),
        host_addresses: ReadLately::default(),
        contested_frontends: 0,
        growth_failed: None,
        cfg,
        dp,
        attachments,
        source,
        status,
        metrics,
        datapath,
        gc,
    };
    let result = agent.run(&wake).await;
    state::stop_gc(&gc_stop);
    result?;
    log(format!(
        "stopping: the datapath stays attached and its maps pinned in {} (a restarted agent takes over; \
             `lb agent --cleanup` detaches it)",
        agent.cfg.pin_dir.display()
    ));
    Ok(())
}

/// The checks that need nothing loaded: the manifest folder exists, the API server answers
/// (a configuration error should stop us before we touch the datapath), the XDP interfaces
/// exist. Returns the API client when there is no manifest folder.
async fn preflight(cfg: &AgentConfig) -> anyhow::Result<Option<kube::Client>> {
    if let Some(dir) = cfg.manifests.as_ref().filter(|d| !d.is_dir()) {
        anyhow::bail!("--manifests {}: not a directory", dir.display());
    }
    let kube_client = match &cfg.manifests {
        Some(_) => None,
        None => Some(kube_source::client(cfg.kubeconfig.as_deref()).await?),
    };
    links::Patterns::new(&cfg.tc_ifaces).context("--tc-iface")?;
    let present = links::interfaces();
    for iface in &cfg.xdp_ifaces {
        if !present.contains_key(iface) {
            anyhow::bail!("--xdp-iface {iface}: no such interface (have: {})", names(&present));
        }
    }
    Ok(kube_client)
}

/// Loads the datapath into the pinned maps (migrating those of another layout), and reads
/// what they hold.
fn load(cfg: &AgentConfig) -> anyhow::Result<(aya::Ebpf, AyaDataplane, Applied, crate::pins::Migration)> {
    let (ebpf, migration) = loader::load_migrating_with_log(&cfg.pin_dir, &cfg.capacities, cfg.bpf_log)
        .with_context(|| format!("loading the datapath with maps pinned in {}", cfg.pin_dir.display()))?;
    if !migration.is_empty() {
        log(format!(
            "pinned maps with another layout migrated into new maps: {}",
            migration.describe().join(", ")
        ));
    }
    let dp = AyaDataplane::open(&cfg.pin_dir)?;
    let applied = Applied::read(&dp)?;
    let verified: Vec<String> = loader::verified_instructions(&ebpf)
        .iter()
        .filter_map(|(name, n)| Some(format!("{name} {}", (*n)?)))
        .collect();
    log(format!(
        "datapath loaded; pinned maps in {} hold {} frontends and {} backends (instructions verified: {} of {})",
        cfg.pin_dir.display(),
        applied.services.len(),
        applied.backends.len(),
        if verified.is_empty() { "not told by this kernel".to_string() } else { verified.join(", ") },
        loader::VERIFIER_BUDGET
    ));
    Ok((ebpf, dp, applied, migration))
}

/// The jiffies calibration the datapath's flow clock uses, if the kernel tells it.
fn flow_clock() -> Option<(u64, u64, u64)> {
    let clock = conntrack_gc::tick_calibration();
    match clock {
        Some((tick, _, _)) => log(format!("flow clock: jiffies, {} Hz", 1_000_000_000 / tick)),
        None => log(
            "warning: /proc/timer_list unreadable: the datapath reads its clock through a helper (slower)",
        ),
    }
    clock
}

/// The manifest folder (watched by inotify, polled as a safety net) or the API server.
fn open_source(
    cfg: &AgentConfig,
    client: Option<kube::Client>,
    wake: &Arc<tokio::sync::Notify>,
) -> anyhow::Result<Source> {
    Ok(match (&cfg.manifests, client) {
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
            Source::folder(folder)
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
    })
}

/// The running agent: what the loop turns.
struct Agent {
    cfg: AgentConfig,
    dp: AyaDataplane,
    attachments: Attachments,
    source: Source,
    syncer: Syncer,
    clock: Option<(u64, u64, u64)>,
    status: Shared,
    metrics: AgentMetrics,
    datapath: Datapath,
    gc: Arc<std::sync::Mutex<GcState>>,
    reporter: Reporter,
    retention: addr_filter::Retention,
    health_servers: BTreeMap<u16, tokio::task::JoinHandle<()>>,
    last_resync: Instant,
    /// When the last sync began (`--min-sync-period` counts from it).
    last_sync: Option<Instant>,
    /// Syncs held back by `--min-sync-period` until then.
    held_until: Option<Instant>,
    /// The MTUs of links and routes, and the node's own addresses (without a Node object):
    /// a sysfs walk, a route dump and a link dump, not redone per sync under a stream.
    mtu_floor: ReadLately<u32>,
    host_addresses: ReadLately<Vec<IpAddr>>,
    /// Frontends claimed by more than one Service: they change only with Services.
    contested_frontends: usize,
    /// When growing the maps last failed (`growth`).
    growth_failed: Option<Instant>,
}

/// A value read from the system at most once a second.
#[derive(Default)]
struct ReadLately<T> {
    read: Option<(Instant, T)>,
}

impl<T: Clone + PartialEq> ReadLately<T> {
    fn get(&mut self, read: impl FnOnce() -> T) -> T {
        match &self.read {
            Some((at, v)) if at.elapsed() < Duration::from_secs(1) => v.clone(),
            _ => self.read.insert((Instant::now(), read())).1.clone(),
        }
    }

    /// Reads it again if the last read is a second old: whether it changed since.
    fn changed(&mut self, read: impl FnOnce() -> T) -> bool {
        let before = self.read.as_ref().map(|(_, v)| v.clone());
        before.is_some_and(|b| b != self.get(read))
    }
}

impl Agent {
    /// Turns until SIGINT or SIGTERM: on each source or link event, on a settled file, when
    /// a retry comes due, and at least every `manifests::POLL`.
    async fn run(&mut self, wake: &tokio::sync::Notify) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(manifests::POLL);
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        self.reporter.write(&self.status, &self.gc);
        loop {
            // A file read after its close is applied once it has settled: look again then.
            let settle = self.source.settle_deadline();
            let held = self.held_until;
            // A retry comes due (not while --min-sync-period holds syncs back).
            let retry = self.syncer.retry().next().filter(|_| held.is_none());
            tokio::select! {
                _ = tick.tick() => {}
                _ = tokio::time::sleep_until(settle.unwrap_or_else(Instant::now).into()), if settle.is_some() => {}
                _ = tokio::time::sleep_until(held.unwrap_or_else(Instant::now).into()), if held.is_some() => {}
                _ = tokio::time::sleep_until(retry.unwrap_or_else(Instant::now).into()), if retry.is_some() => {}
                // At once, for the folder too: a file is read only once its writer has closed
                // it (or renamed it into place), and what arrives during a sync is taken by
                // the next one together.
                _ = wake.notified() => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = sigterm.recv() => return Ok(()),
            }
            self.turn()?;
        }
    }

    /// One turn: links, the address filter after a GC pass, the report, then a sync if
    /// anything changed or is owed.
    fn turn(&mut self) -> anyhow::Result<()> {
        lock(&self.status).loop_turn = Instant::now();
        self.attachments.rescan(&self.cfg, &mut self.dp, &self.status);
        self.metrics.attachments(&lock(&self.status));
        // A GC pass finished: unlist what no entry and no flow acts on any more.
        let pass = lock(&self.gc).for_filter.take();
        if let Some((began, referenced)) = pass {
            let listed = self.dp.take_listed();
            self.retention.synced(addr_filter::named(self.syncer.applied()), &listed, Instant::now());
            self.dp.set_address_filter(&self.retention.after_pass(&referenced, began));
        }
        if self.reporter.due() {
            self.reporter.write(&self.status, &self.gc);
        }
        // --min-sync-period: what arrives sooner waits (in the source) for one sync then.
        self.held_until =
            self.last_sync.map(|t| t + self.cfg.min_sync_period).filter(|t| *t > Instant::now());
        if self.held_until.is_some() {
            return Ok(());
        }
        let resync = self.cfg.config_sync_period.is_some_and(|p| self.last_resync.elapsed() >= p);
        if resync {
            self.last_resync = Instant::now();
        }
        // The node's MTUs and addresses are read at most once a second; a change is written
        // even when the source brings none.
        let xdp = &self.cfg.xdp_ifaces;
        if self.mtu_floor.changed(links::mtu_floor) | self.host_addresses.changed(|| fallback_addresses(xdp))
        {
            self.syncer.owe_config();
        }
        let node = NodeContext {
            name: self.cfg.node_name.clone(),
            nodeport_addresses: self.cfg.nodeport_addresses.clone(),
            fallback_addresses: self.host_addresses.get(|| fallback_addresses(&self.cfg.xdp_ifaces)),
        };
        let mtu_floor = self.mtu_floor.get(links::mtu_floor);
        let (cfg, clock, cookie) = (&self.cfg, self.clock, self.attachments.host_cookie);
        let config_for = |addresses: &[IpAddr]| {
            let mut c = datapath_config(cfg, addresses, clock);
            c.host_netns_cookie = cookie;
            c.mtu_floor = mtu_floor;
            c
        };
        let (caps, growable, held_off) = (self.cfg.capacities, self.cfg.growable, self.growth_held_off());
        let began = Instant::now();
        let (reporter, datapath) = (&mut self.reporter, &self.datapath);
        let names = |desired: &crate::model::Desired| {
            reporter.names(desired);
            reporter.flush_names();
            *lock(&datapath.names) = reporter.names.clone();
        };
        // A full plan that needs larger maps waits for them (`growth`).
        let mut grow_first = None;
        let outgrown = |needs: &sync::Needs| {
            grow_first = growth::before_plan(&caps, growable, needs).filter(|_| !held_off);
            grow_first.is_some()
        };
        // A backend at one of the node's addresses: the egress program goes on before the
        // plan's writes, so its first reply is translated.
        let (attachments, status) = (&mut self.attachments, &self.status);
        let own_backend = (!attachments.egress_on()).then_some(|| {
            let why = "a backend is at one of this node's addresses, whose replies leave its own stack";
            attachments.enable_egress(cfg, status, why)
        });
        let hooks = sync::Hooks { config_for, names, outgrown, own_backend };
        let outcome = self.syncer.sync(&mut self.dp, &mut self.source, &node, hooks, resync, began)?;
        if let Some(want) = grow_first {
            self.grow(want, "the Services need more room than they have (counted before the plan)");
        }
        if let Some(outcome) = outcome {
            self.last_sync = Some(began);
            self.after_sync(&outcome, began);
            if outcome.skipped > 0 {
                self.grow_if_full();
            }
        }
        Ok(())
    }

    /// What follows a sync: stale UDP sockets of the node closed, the figures, the status,
    /// the health-check responders and the report.
    fn after_sync(&mut self, o: &Outcome, began: Instant) {
        if o.config_written {
            let c = self.dp.config().unwrap_or_default();
            log(format!(
                "source NAT address {:?} / {:?}; packets over {} bytes checked against their route's MTU at XDP",
                nat_ip(&c.snat_v4),
                nat_ip(&c.snat_v6),
                c.mtu_floor
            ));
        }
        if self.attachments.host_cookie != 0 && o.written && o.writes > 0 {
            match host_clients::destroy_stale_udp(&self.dp) {
                Ok(0) => {}
                Ok(n) => log(format!(
                    "closed {n} connected UDP socket(s) of the node whose backend left its Service (they reconnect to a live one)"
                )),
                Err(e) => log(format!("warning: checking the node's connected UDP sockets: {e}")),
            }
        }
        let (desired, applied, retry) = (self.syncer.desired(), self.syncer.applied(), self.syncer.retry());
        let m = &self.metrics;
        m.synced(o.took, o.ok());
        m.service_changes.inc_by(o.service_changes as u64);
        m.endpoint_changes.inc_by(o.endpoint_changes as u64);
        m.source_errors(self.source.errors());
        m.frontends.set(applied.services.len() as i64);
        m.backends.set(applied.backends.len() as i64);
        if o.frontends_touched || o.service_changes > 0 {
            self.contested_frontends = self.syncer.contested_frontends();
        }
        m.frontend_conflicts.set(self.contested_frontends as i64);
        m.set_unprogrammed(retry.skipped().map(|(s, e)| (s.to_string(), e.to_string())));
        let mut st = lock(&self.status);
        st.pending_since.get_or_insert(began);
        st.syncs += 1;
        if !o.ok() {
            st.sync_errors += 1;
        }
        st.source_errors = self.source.errors();
        st.last_sync = Some(report::LastSync {
            at: report::timestamp_ago(Duration::ZERO),
            duration_ms: o.took.as_secs_f64() * 1e3,
            ok: o.ok(),
            services: desired.services.len(),
            frontends: applied.services.len(),
            backends: applied.backends.len(),
        });
        st.contested_frontends = self.contested_frontends;
        st.unprogrammed = retry.skipped().map(|(s, e)| (s.to_string(), e.to_string())).collect();
        if o.written {
            st.last_sync_ok = Some(Instant::now());
        }
        // Skipped services keep changes pending: /healthz fails once they are stale.
        if o.settled {
            st.pending_since = None;
            let now = jiff::Timestamp::now();
            for t in self.source.take_triggers() {
                m.programming_duration.observe(now.duration_since(t).as_secs_f64().max(0.0));
            }
        }
        st.health_checks = desired.health_checks.clone();
        drop(st);
        serve::sync_health_servers(&mut self.health_servers, &desired.health_checks, &self.status);
        self.reporter.dirty = true;
        if self.reporter.due() {
            self.reporter.write(&self.status, &self.gc);
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
    if cfg.host_routing {
        c.flags |= CFG_F_HOST_ROUTING;
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
