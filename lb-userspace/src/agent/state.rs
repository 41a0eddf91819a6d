//! What the sync loop knows and others read: the status behind `/healthz`, `/livez` and the
//! `lb status` report, and the flow-table GC's last pass.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use super::{AgentConfig, lock, log, metrics::GcMetrics};
use crate::{attach::Attached, conntrack_gc, loader, model, report};

/// The status the loop writes and the HTTP servers (on their own thread) read.
pub type Shared = Arc<std::sync::Mutex<Status>>;

pub struct Status {
    pub syncs: u64,
    pub sync_errors: u64,
    pub source_errors: u64,
    pub last_sync_ok: Option<Instant>,
    /// Since when changes have waited for a successful sync (None: nothing pending).
    pub pending_since: Option<Instant>,
    /// The sync loop's last turn: /livez fails when it stops turning.
    pub loop_turn: Instant,
    /// `--healthz-stale-after`.
    pub stale_after: Duration,
    pub xdp: BTreeMap<String, Attached>,
    /// The cgroup2 hierarchy the connect-time programs are attached to, if they are.
    pub sock_cgroup: Option<std::path::PathBuf>,
    pub tc: BTreeMap<String, (u32, Attached)>,
    /// The uplink program on the XDP interfaces (host routing of what XDP translated).
    pub uplink: BTreeMap<String, Attached>,
    /// The TC program on the node interfaces in place of XDP (`--node-hook tc`).
    pub node_tc: BTreeMap<String, Attached>,
    /// The egress program on pod and node interfaces (replies of the node's own stack).
    pub egress: BTreeMap<String, Attached>,
    /// Frontends claimed by more than one Service (or port): one has it, the others are
    /// reported in the log.
    pub contested_frontends: usize,
    /// Services the planner skipped (a map at its capacity), with why.
    pub unprogrammed: Vec<(String, String)>,
    pub last_sync: Option<report::LastSync>,
    pub health_checks: BTreeMap<u16, model::HealthCheck>,
}

impl Status {
    pub fn new(stale_after: Duration) -> Shared {
        Arc::new(std::sync::Mutex::new(Status {
            syncs: 0,
            sync_errors: 0,
            source_errors: 0,
            last_sync_ok: None,
            pending_since: None,
            loop_turn: Instant::now(),
            stale_after,
            xdp: BTreeMap::new(),
            sock_cgroup: None,
            tc: BTreeMap::new(),
            uplink: BTreeMap::new(),
            node_tc: BTreeMap::new(),
            egress: BTreeMap::new(),
            contested_frontends: 0,
            unprogrammed: Vec::new(),
            last_sync: None,
            health_checks: BTreeMap::new(),
        }))
    }
}

/// What the flow-table GC reports (written by its thread).
#[derive(Default)]
pub struct GcState {
    pub last: Option<conntrack_gc::PassStats>,
    /// When `last` ended.
    pub last_at: Option<Instant>,
    /// When the last pass began, and the addresses its flows act on: for the sync loop to
    /// narrow the address pre-filter.
    pub for_filter: Option<(Instant, Vec<lb_common::abi::Addr>)>,
    errors: u64,
}

/// Starts the GC thread; it stops when `stop` is set.
pub fn spawn_gc(
    cfg: &AgentConfig,
    stop: Arc<AtomicBool>,
    metrics: GcMetrics,
) -> Arc<std::sync::Mutex<GcState>> {
    let state = Arc::new(std::sync::Mutex::new(GcState::default()));
    let (st, pin_dir, timeouts, interval) =
        (state.clone(), cfg.pin_dir.clone(), cfg.timeouts, cfg.gc_interval);
    std::thread::spawn(move || {
        let mut last_log = Instant::now() - Duration::from_secs(3600);
        conntrack_gc::run(&pin_dir, timeouts, interval, &stop, |r| {
            let mut g = lock(&st);
            metrics.passes.inc();
            match r {
                Ok(mut p) => {
                    g.for_filter = Some((Instant::now() - p.took, std::mem::take(&mut p.referenced)));
                    metrics.pass(&p);
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
                    metrics.errors.inc();
                    if g.errors.is_power_of_two() {
                        log(format!("error: conntrack GC pass failed ({e}); {} so far", g.errors));
                    }
                }
            }
        });
    });
    state
}

/// Whether the GC thread should stop: set when the agent stops.
pub fn stop_gc(stop: &AtomicBool) {
    stop.store(true, Ordering::Relaxed);
}

/// Writes the agent's report for `lb status` (`report`), and the frontend names when they
/// changed: after each sync, and every `report::EVERY` for the GC's figures.
pub struct Reporter {
    pin_dir: std::path::PathBuf,
    base: report::Report,
    last: Instant,
    pub names: Arc<report::FrontendNames>,
    names_changed: bool,
    /// A sync changed what the report says since it was last written.
    pub dirty: bool,
}

impl Reporter {
    pub fn new(cfg: &AgentConfig, start: Instant) -> Reporter {
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
            dirty: true,
        }
    }

    /// The Service behind each frontend of `desired`, and behind each ClusterIP as a whole.
    pub fn names(&mut self, desired: &model::Desired) {
        let mut names = BTreeMap::new();
        let no_port = model::Name::from("");
        for (sref, ds) in &desired.services {
            let name = report::FrontendName {
                namespace: sref.namespace.clone(),
                service: sref.name.clone(),
                port: sref.port_name.clone(),
            };
            for &(ip, port) in &ds.frontends {
                names.insert(report::Frontend { ip, port_proto: Some((port, sref.proto)) }, name.clone());
                if desired.cluster_vips.contains(&ip) {
                    let whole = report::FrontendName { port: no_port.clone(), ..name.clone() };
                    names.insert(report::Frontend { ip, port_proto: None }, whole);
                }
            }
        }
        if names != *self.names {
            self.names = Arc::new(names);
            self.names_changed = true;
        }
    }

    /// Writes the frontend names if they changed since the last write. Called right after a
    /// sync, not at the report's pace: `lb monitor` names the Service of a new flow from
    /// this file, and the first flows to a new Service come at once.
    pub fn flush_names(&mut self) {
        if self.names_changed {
            match report::write_names(&self.pin_dir, &self.names) {
                Ok(()) => self.names_changed = false,
                Err(e) => log(format!("warning: cannot write the frontend names: {e}")),
            }
        }
    }

    /// A write is due: the report is `report::EVERY` old, or a sync changed it and the last
    /// write is `report::AFTER_SYNC` old (a stream of syncs writes it a few times a second,
    /// not once per sync).
    pub fn due(&self) -> bool {
        let age = self.last.elapsed();
        age >= report::EVERY || (self.dirty && age >= report::AFTER_SYNC)
    }

    pub fn write(&mut self, status: &Shared, gc: &std::sync::Mutex<GcState>) {
        let mut r = self.base.clone();
        {
            let st = lock(status);
            r.source.errors = st.source_errors;
            let xdp = st.xdp.iter().map(|(i, how)| (i, "xdp", how));
            let tc = st.tc.iter().map(|(i, (_, how))| (i, "tc", how));
            let uplink = st.uplink.iter().map(|(i, how)| (i, "tc-uplink", how));
            let node_tc = st.node_tc.iter().map(|(i, how)| (i, "tc-node", how));
            let egress = st.egress.iter().map(|(i, how)| (i, "tc-egress", how));
            r.attachments = xdp
                .chain(tc)
                .chain(uplink)
                .chain(node_tc)
                .chain(egress)
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
        self.flush_names();
        r.written_at = report::timestamp_ago(Duration::ZERO);
        if let Err(e) = report::write(&self.pin_dir, &r) {
            log(format!("warning: cannot write the status report: {e}"));
        }
        self.last = Instant::now();
        self.dirty = false;
    }
}
