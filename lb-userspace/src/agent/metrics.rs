//! `/metrics`, through `prometheus-client`. The agent's own figures are gauges, counters and
//! histograms the sync loop and the GC thread keep up to date; the datapath's counters are
//! read from the pinned maps by a collector, at most once a second whatever the scrape
//! rate (`Datapath`). Nothing here walks the flow table: its figures are the GC pass's.
//!
//! Labels: per-Service series carry `namespace`, `service`, `port` (the port's name) and
//! `protocol`, plus `service_id` (a port has one datapath service per scope and family);
//! backends carry `backend` (`ip:port`). So the series count is bounded by the maps'
//! capacities (`--max-services`, `--max-backends`), never by traffic.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, Instant},
};

use lb_common::{abi::*, verdict::Reason};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::Registry,
};

use super::lock;
use crate::{
    conntrack_gc::PassStats,
    dataplane::{AyaDataplane, Dataplane as _},
    report,
};

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// How long a read of the datapath's counters serves scrapes.
const DATAPATH_CACHE: Duration = Duration::from_secs(1);

/// The agent's figures, shared by the sync loop (which sets them) and the HTTP thread.
#[derive(Clone)]
pub struct AgentMetrics {
    pub sync_duration: Histogram,
    pub programming_duration: Histogram,
    pub last_sync_timestamp: FloatGauge,
    pub service_changes: Counter,
    pub endpoint_changes: Counter,
    pub syncs: Counter,
    pub sync_errors: Counter,
    source_errors: Counter,
    pub frontends: Gauge,
    pub backends: Gauge,
    pub frontend_conflicts: Gauge,
    pub unprogrammed: Family<Labels, Gauge>,
    pub xdp_attached: Family<Labels, Gauge>,
    pub tc_attached: Gauge,
    pub maps_grown: Counter,
    pub gc: GcMetrics,
}

/// The flow-table GC's figures (set by its thread).
#[derive(Clone, Default)]
pub struct GcMetrics {
    pub passes: Counter,
    pub errors: Counter,
    pub expired: Counter,
    entries: Gauge,
    capacity: Gauge,
    fill: FloatGauge,
    under_pressure: Gauge,
    by_state: Family<Labels, Gauge>,
    snat_ports: Family<Labels, Gauge>,
    pass_seconds: FloatGauge,
}

impl GcMetrics {
    /// The figures of a finished pass.
    pub fn pass(&self, p: &PassStats) {
        self.expired.inc_by(p.removed_pairs as u64);
        self.entries.set(p.entries as i64);
        self.capacity.set(i64::from(p.capacity));
        self.fill.set(p.fill());
        self.under_pressure.set(i64::from(p.under_pressure));
        self.by_state.clear();
        for (state, n) in &p.by_state {
            self.by_state.get_or_create(&label("state", state)).set(*n as i64);
        }
        self.snat_ports.clear();
        for (address, n) in &p.snat_ports {
            self.snat_ports.get_or_create(&label("address", address)).set(*n as i64);
        }
        self.pass_seconds.set(p.took.as_secs_f64());
    }
}

fn label(name: &str, value: impl ToString) -> Labels {
    vec![(name.to_string(), value.to_string())]
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        AgentMetrics {
            // kube-proxy's layouts: 1 ms doubling 15 times for syncs; for programming
            // latency 0.25 s steps to 0.5 s, 1 s steps to 59 s, 5 s to 115 s, 30 s to 300 s.
            sync_duration: Histogram::new((0..15).map(|i| 0.001 * 2f64.powi(i))),
            programming_duration: Histogram::new(
                [0.25, 0.5]
                    .into_iter()
                    .chain((1..=59).map(f64::from))
                    .chain((0..12).map(|i| 60.0 + 5.0 * f64::from(i)))
                    .chain((0..7).map(|i| 120.0 + 30.0 * f64::from(i))),
            ),
            last_sync_timestamp: FloatGauge::default(),
            service_changes: Counter::default(),
            endpoint_changes: Counter::default(),
            syncs: Counter::default(),
            sync_errors: Counter::default(),
            source_errors: Counter::default(),
            frontends: Gauge::default(),
            backends: Gauge::default(),
            frontend_conflicts: Gauge::default(),
            unprogrammed: Family::default(),
            xdp_attached: Family::default(),
            tc_attached: Gauge::default(),
            maps_grown: Counter::default(),
            gc: GcMetrics::default(),
        }
    }

    /// The source's running error count, as a counter.
    pub fn source_errors(&self, total: u64) {
        let seen = self.source_errors.get();
        if total > seen {
            self.source_errors.inc_by(total - seen);
        }
    }

    /// The registry that serves `/metrics`: these figures and the datapath's.
    pub fn registry(&self, datapath: Datapath) -> Registry {
        let mut r = Registry::default();
        r.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "Time to plan and write one sync of the datapath maps",
            self.sync_duration.clone(),
        );
        r.register(
            "kubeproxy_network_programming_duration_seconds",
            "From an EndpointSlice change (its last-change-trigger-time annotation) to the datapath programmed",
            self.programming_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "When the datapath maps were last synced successfully (seconds since the epoch)",
            self.last_sync_timestamp.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Service changes the source reported",
            self.service_changes.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "EndpointSlice changes the source reported",
            self.endpoint_changes.clone(),
        );
        r.register("lb_syncs", "Syncs of the datapath maps", self.syncs.clone());
        r.register("lb_sync_errors", "Syncs that failed (state kept, retried)", self.sync_errors.clone());
        r.register(
            "lb_source_errors",
            "Manifest files or API objects rejected (last good content kept)",
            self.source_errors.clone(),
        );
        r.register("lb_frontends", "Frontend entries in the datapath", self.frontends.clone());
        r.register("lb_backends", "Backend entries in the datapath", self.backends.clone());
        r.register(
            "lb_frontend_conflicts",
            "Frontends (ip, port, protocol) claimed by more than one Service or port: the oldest has it, the others are logged as skipped",
            self.frontend_conflicts.clone(),
        );
        r.register(
            "lb_service_unprogrammed",
            "Datapath services skipped because a map is at its capacity (their maps keep what they held; retried with backoff)",
            self.unprogrammed.clone(),
        );
        r.register(
            "lb_xdp_attached",
            "XDP attachment per interface (mode label; generic is the slow fallback)",
            self.xdp_attached.clone(),
        );
        r.register("lb_tc_attached", "Interfaces with the TC program", self.tc_attached.clone());
        r.register(
            "lb_maps_grown",
            "Times the Maglev array or the backend maps grew because Services did not fit (--max-maglev-slots, --max-backends auto)",
            self.maps_grown.clone(),
        );
        let gc = &self.gc;
        r.register("lb_conntrack_gc_passes", "Flow-table GC passes", gc.passes.clone());
        r.register("lb_conntrack_gc_errors", "Flow-table GC passes that failed", gc.errors.clone());
        r.register(
            "lb_conntrack_expired",
            "Flows (both directions) removed by the GC: closed, idle past their timeout, or unfinished handshakes under pressure",
            gc.expired.clone(),
        );
        r.register(
            "lb_conntrack_entries_total",
            "Flow-table entries (forward and reply), at the last GC pass",
            gc.entries.clone(),
        );
        r.register("lb_conntrack_capacity", "Flow-table capacity (--max-flows)", gc.capacity.clone());
        r.register("lb_conntrack_fill_ratio", "Flow-table entries / capacity", gc.fill.clone());
        r.register(
            "lb_conntrack_under_pressure",
            "1 while the table is over half full: unfinished handshakes expire early",
            gc.under_pressure.clone(),
        );
        r.register("lb_conntrack_entries", "Flows by state, at the last GC pass", gc.by_state.clone());
        r.register(
            "lb_snat_ports_in_use",
            "Source-NAT ports held by flows, per node address",
            gc.snat_ports.clone(),
        );
        r.register("lb_conntrack_gc_duration_seconds", "Time the last GC pass took", gc.pass_seconds.clone());
        r.register_collector(Box::new(datapath));
        r
    }

    /// A sync's figures.
    pub fn synced(&self, took: Duration, ok: bool) {
        self.syncs.inc();
        self.sync_duration.observe(took.as_secs_f64());
        if !ok {
            self.sync_errors.inc();
        } else {
            let now = jiff::Timestamp::now().as_millisecond() as f64 / 1e3;
            self.last_sync_timestamp.set(now);
        }
    }

    /// What the programs are attached to, as the status says (at start, and after each
    /// link scan: TC links come and go without a sync).
    pub fn attachments(&self, st: &super::state::Status) {
        for (iface, how) in &st.xdp {
            let labels = vec![("iface".to_string(), iface.clone()), ("mode".to_string(), format!("{how:?}"))];
            self.xdp_attached.get_or_create(&labels).set(1);
        }
        self.tc_attached.set(st.tc.len() as i64);
    }

    /// The skipped services, with why.
    pub fn set_unprogrammed<'a>(&self, skipped: impl Iterator<Item = (String, String)> + 'a) {
        self.unprogrammed.clear();
        for (service, why) in skipped {
            let labels = vec![("service".to_string(), service), ("reason".to_string(), why)];
            self.unprogrammed.get_or_create(&labels).set(1);
        }
    }
}

/// One series of a datapath metric: its labels and value.
type Row = (RowLabels, u64);

/// A datapath series' labels as the cache keeps them: compact (a read at 100 000 Services
/// holds 200 000 rows, and label strings made at read time cost a kilobyte per Service
/// until the next scrape); names and addresses are written out when a scrape encodes them.
#[derive(Debug)]
enum RowLabels {
    None,
    One(&'static str, &'static str),
    Backend(std::net::IpAddr, u16),
    /// A service id, and a frontend of it whose Service names it (`names`).
    Service {
        id: u32,
        frontend: (std::net::IpAddr, u16, u8),
    },
}

impl RowLabels {
    fn encoded<'a>(&self, names: &'a report::FrontendNames) -> Vec<(&'static str, Cow<'a, str>)> {
        match *self {
            RowLabels::None => vec![],
            RowLabels::One(name, value) => vec![(name, value.into())],
            RowLabels::Backend(ip, port) => vec![("backend", format!("{ip}:{port}").into())],
            RowLabels::Service { id, frontend } => {
                let (ip, port, proto) = frontend;
                let mut labels = match names.get(&report::Frontend { ip, port_proto: Some((port, proto)) }) {
                    Some(n) => vec![
                        ("namespace", (*n.namespace).into()),
                        ("service", (*n.service).into()),
                        ("port", (*n.port).into()),
                        ("protocol", proto_name(proto).into()),
                    ],
                    None => vec![],
                };
                labels.push(("service_id", id.to_string().into()));
                labels
            }
        }
    }
}

/// The datapath's series, the names they were read with, and when.
type Snapshot = (Instant, Arc<(Vec<Series>, Names)>);
type Names = Arc<report::FrontendNames>;

/// A datapath metric as read from the maps.
struct Series {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    rows: Vec<Row>,
}

/// The datapath's counters and sizes, read from the pinned maps (cached `DATAPATH_CACHE`).
#[derive(Debug, Clone)]
pub struct Datapath {
    pin_dir: PathBuf,
    /// The Service behind each frontend (`report::FrontendName`), set by the sync loop.
    pub names: Arc<Mutex<Names>>,
    cache: Arc<Mutex<Option<Snapshot>>>,
}

impl std::fmt::Debug for Series {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} series)", self.name, self.rows.len())
    }
}

impl Datapath {
    pub fn new(pin_dir: PathBuf) -> Self {
        Datapath { pin_dir, names: Arc::default(), cache: Arc::default() }
    }

    /// The series, read again when the last read is older than `DATAPATH_CACHE`. Concurrent
    /// scrapes wait for one read.
    fn series(&self) -> Arc<(Vec<Series>, Names)> {
        let mut cache = lock(&self.cache);
        if let Some((_, s)) = cache.as_ref().filter(|(at, _)| at.elapsed() < DATAPATH_CACHE) {
            return s.clone();
        }
        let names = lock(&self.names).clone();
        let s = Arc::new((read_datapath(&self.pin_dir), names));
        *cache = Some((Instant::now(), s.clone()));
        s
    }
}

impl Collector for Datapath {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let cached = self.series();
        let (series, names) = &*cached;
        for s in series {
            let mut metric = encoder.encode_descriptor(s.name, s.help, None, s.kind)?;
            for (labels, v) in &s.rows {
                let labels = labels.encoded(names);
                let one = metric.encode_family(&labels)?;
                match s.kind {
                    MetricType::Counter => ConstCounter::new(*v).encode(one)?,
                    _ => ConstGauge::new(*v as i64).encode(one)?,
                }
            }
        }
        Ok(())
    }
}

/// Reads the datapath's figures from the pinned maps; per-Service series name a frontend
/// of their id, to be labelled with its Service.
fn read_datapath(pin_dir: &std::path::Path) -> Vec<Series> {
    let counter = |name, help, rows| Series { name, help, kind: MetricType::Counter, rows };
    let gauge = |name, help, rows| Series { name, help, kind: MetricType::Gauge, rows };
    let mut out = Vec::new();
    let own = crate::memory::of_process("self");
    let resident = own.map(|m| (RowLabels::None, m.resident_bytes)).into_iter().collect();
    out.push(gauge("lb_agent_resident_bytes", "The agent's resident memory (VmRSS)", resident));
    let anonymous = own.map(|m| (RowLabels::None, m.anonymous_bytes)).into_iter().collect();
    out.push(gauge(
        "lb_agent_anonymous_bytes",
        "The agent's own resident memory (RssAnon: VmRSS without the map pages it mmaps)",
        anonymous,
    ));
    let heap = crate::memory::heap_in_use().map(|b| (RowLabels::None, b)).into_iter().collect();
    out.push(gauge(
        "lb_agent_heap_in_use_bytes",
        "The agent's heap in use (allocated and not freed; RssAnon less this is the allocator's free space and overhead)",
        heap,
    ));
    let Ok(dp) = AyaDataplane::open(pin_dir) else { return out };
    let (mut packets, mut bytes) = (Vec::new(), Vec::new());
    for r in Reason::ALL {
        if let Ok(c) = dp.reason_counter(r) {
            packets.push((RowLabels::One("reason", r.name()), c.packets));
            bytes.push((RowLabels::One("reason", r.name()), c.bytes));
        }
    }
    out.push(counter("lb_packets", "Packets by datapath verdict reason", packets));
    out.push(counter("lb_bytes", "Bytes by datapath verdict reason", bytes));
    let forwarded = [(XDP_FWD_REDIRECTED, "redirected"), (XDP_FWD_TX, "tx"), (XDP_FWD_TO_STACK, "to_stack")]
        .into_iter()
        .filter_map(|(slot, result)| {
            Some((RowLabels::One("result", result), dp.xdp_forward_counter(slot).ok()?.packets))
        })
        .collect();
    out.push(counter(
        "lb_xdp_forward_packets",
        "Translated packets at XDP under --xdp-forward, by what became of them",
        forwarded,
    ));
    let routed = [
        (HOST_ROUTE_PEER, "peer"),
        (HOST_ROUTE_NEIGH, "neigh"),
        (HOST_ROUTE_TO_STACK, "to_stack"),
        (HOST_ROUTE_NO_METADATA, "no_metadata"),
    ]
    .into_iter()
    .filter_map(|(slot, result)| {
        Some((RowLabels::One("result", result), dp.host_routing_counter(slot).ok()?.packets))
    })
    .collect();
    out.push(counter(
        "lb_host_routing_packets",
        "Translated packets under --host-routing (at TC, and those XDP left to the stack), by what became of them",
        routed,
    ));
    let events = [(EVENTS_SENT, "sent"), (EVENTS_LOST, "lost")]
        .into_iter()
        .filter_map(|(slot, result)| {
            Some((RowLabels::One("result", result), dp.events_counter(slot).ok()?.packets))
        })
        .collect();
    out.push(counter(
        "lb_monitor_events",
        "Datapath events for `lb monitor`: written to the ring, or lost to a full one (none while no monitor runs)",
        events,
    ));
    let maps = lb_common::maps::ALL
        .iter()
        .filter_map(|name| {
            Some((RowLabels::One("map", name), crate::memory::map_bytes(&pin_dir.join(name))?))
        })
        .collect();
    out.push(gauge("lb_map_memory_bytes", "Kernel memory of each pinned map (its fdinfo memlock)", maps));
    out.push(gauge(
        "lb_address_filter_bits",
        "Bits set in the address pre-filter (of 1048576): frontend, backend and live-flow addresses, less hash collisions",
        vec![(RowLabels::None, u64::from(dp.address_filter_bits()))],
    ));
    // Each service id with the Service (namespace, name, port, protocol) of a frontend of
    // it. The id stays a label: a port has one id per scope (cluster, external) and IP
    // family, so the names alone could repeat.
    let mut ids: BTreeMap<u32, (std::net::IpAddr, u16, u8)> = BTreeMap::new();
    for (k, v) in dp.services().unwrap_or_default() {
        ids.entry(v.service_id).or_insert((k.ip(), k.port(), k.proto));
    }
    let services = ids
        .into_iter()
        .filter_map(|(id, frontend)| {
            let c = dp.service_counter(id).ok()?;
            Some((RowLabels::Service { id, frontend }, c.packets))
        })
        .collect();
    out.push(counter(
        "lb_service_packets",
        "Packets per datapath service (a Service port, per scope and IP family), both directions",
        services,
    ));
    let backends = dp
        .backends()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(id, b)| {
            Some((RowLabels::Backend(b.ip(), b.port()), dp.backend_counter(id).ok()?.packets))
        })
        .collect();
    out.push(counter("lb_backend_packets", "Packets per backend", backends));
    out
}

/// The registry's text (Prometheus text format 0.0.4).
pub fn render(registry: &Registry) -> String {
    let mut s = String::new();
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut s, registry);
    // (A large text gives its memory, and its rows' garbage, back once sent: `http::Large`.)
    s
}

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
