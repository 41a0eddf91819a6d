//! `lb monitor`: dropped and rejected packets as they happen, with the reason, and new
//! flows with their backend (sampled), from the datapath's event ring (`lb_events`). While it runs it renews a lease in `lb_monitor`
//! (`abi::MonitorLease`); without one the programs write no event, and a monitor killed
//! without clean-up stops them within `LEASE` anyway.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{Array, Map, MapData, RingBuf};
use clap::{Args, ValueEnum};
use lb_common::{
    abi::*,
    maps::{EVENTS, MONITOR},
    verdict::Reason,
};
use lb_userspace::{
    conntrack_gc::monotonic_ns,
    report::{self, FrontendName},
};
use serde::Serialize;

/// How long a lease lasts; it is renewed every second.
const LEASE: Duration = Duration::from_secs(3);

#[derive(Args)]
pub struct MonitorArgs {
    /// Which events: `drop`, `reject` (a TCP RST or ICMP unreachable sent back), `new-flow`
    /// (a new flow translated to a backend, one in `--sample`); drop and reject by default.
    /// Repeat or separate with commas.
    #[arg(long = "type", value_enum, value_delimiter = ',')]
    types: Vec<Kind>,
    /// With `--type new-flow`: report one new flow in N (chosen at random), so a traffic
    /// generator's flood does not fill the ring. 1: every one.
    #[arg(long, default_value_t = 1, value_name = "N")]
    sample: u32,
    /// Only these verdict reasons (as `lb stats` names them: `reject_no_backend`,
    /// `source_range_denied`, `malformed_ip`, ...). Repeat or separate with commas.
    #[arg(long, value_delimiter = ',')]
    reason: Vec<String>,
    /// Only packets to this Service's frontends, `NAMESPACE/NAME` (from the agent's
    /// frontend names: packets to no frontend never match).
    #[arg(long, value_name = "NS/NAME")]
    service: Option<String>,
    /// Exit after this many events.
    #[arg(long)]
    count: Option<u64>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Kind {
    Drop,
    Reject,
    NewFlow,
}

impl Kind {
    fn event(self) -> u8 {
        match self {
            Kind::Drop => EVENT_DROP,
            Kind::Reject => EVENT_REJECT,
            Kind::NewFlow => EVENT_NEW_FLOW,
        }
    }

    fn bit(self) -> u32 {
        1 << self.event()
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Drop => "drop",
            Kind::Reject => "reject",
            Kind::NewFlow => "new-flow",
        }
    }
}

/// One decoded event, as `-o json` prints it.
#[derive(Serialize)]
struct Shown {
    /// RFC 3339.
    time: String,
    interface: String,
    hook: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    reason: &'static str,
    protocol: String,
    src: String,
    dst: String,
    /// A new flow's destination after translation (its backend).
    #[serde(skip_serializing_if = "Option::is_none")]
    translated: Option<String>,
    bytes: u32,
    /// The Service of the destination frontend, `namespace/name[:port]`, if it is one.
    service: Option<String>,
}

/// Streams events from the datapath pinned in `pin_dir` until interrupted (or `--count`).
pub fn run(args: MonitorArgs, pin_dir: &Path, json: bool) -> anyhow::Result<()> {
    let reasons = wanted_reasons(&args.reason)?;
    let kinds = if args.types.is_empty() { vec![Kind::Drop, Kind::Reject] } else { args.types.clone() };
    let bits = kinds.iter().fold(0, |b, k| b | k.bit());
    let open = |name: &str| -> anyhow::Result<Map> {
        let pin = pin_dir.join(name);
        let data = MapData::from_pin(&pin).with_context(|| {
            format!(
                "{}: no such pinned map (is the agent's datapath, of this version, on --pin-dir?)",
                pin.display()
            )
        })?;
        Ok(Map::from_map_data(data)?)
    };
    let mut ring = RingBuf::try_from(open(EVENTS)?)?;
    let lease: Array<MapData, MonitorLease> = Array::try_from(open(MONITOR)?)?;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    if args.sample == 0 {
        anyhow::bail!("--sample 0: one in zero flows; use 1 for every one");
    }
    let mut lease = Lease { map: lease, bits, sample: args.sample, renewed: None };
    lease.renew()?;
    eprintln!(
        "monitor: {} events from {} (Ctrl-C to stop)",
        kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(" and "),
        pin_dir.display()
    );
    let ifaces: BTreeMap<u32, String> =
        lb_userspace::links::interfaces().into_iter().map(|(n, i)| (i, n)).collect();
    let mut services = Names::new(pin_dir);
    let mut shown = 0u64;
    while !STOP.load(Ordering::Relaxed) && args.count.is_none_or(|c| shown < c) {
        lease.renew_if_due()?;
        let mut idle = true;
        while let Some(item) = ring.next() {
            if idle {
                // A batch begins: the names as the agent wrote them last (one stat).
                services.reload_if_changed();
            }
            idle = false;
            let Some(e) = decode(&item) else { continue };
            drop(item);
            if !reasons.as_ref().is_none_or(|r| r.contains(&e.reason)) || bits & (1 << e.kind) == 0 {
                continue;
            }
            if services.of(&e).is_none() {
                // The agent writes the names just after a sync's maps: a flow to a Service
                // that sync made can come first.
                services.reload_after_a_miss();
            }
            let service = services.of(&e);
            let named =
                |want: &String| service.is_some_and(|n| format!("{}/{}", n.namespace, n.service) == *want);
            if args.service.as_ref().is_some_and(|want| !named(want)) {
                continue;
            }
            let s = show(&e, &ifaces, service);
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!(
                    "{} {:<14} {:<9} {:<8} {:<24} {:<4} {} -> {}{}{} ({} bytes)",
                    s.time,
                    s.interface,
                    s.hook,
                    s.kind,
                    s.reason,
                    s.protocol,
                    s.src,
                    s.dst,
                    s.translated.as_ref().map_or(String::new(), |t| format!(" => {t}")),
                    s.service.as_ref().map_or(String::new(), |n| format!(" [{n}]")),
                    s.bytes
                );
            }
            shown += 1;
            if args.count.is_some_and(|c| shown >= c) {
                break;
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    lease.end();
    Ok(())
}

/// Set by SIGINT and SIGTERM: the loop ends and the lease is given up.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// The reasons asked for, checked against the datapath's names.
fn wanted_reasons(names: &[String]) -> anyhow::Result<Option<Vec<u8>>> {
    if names.is_empty() {
        return Ok(None);
    }
    names
        .iter()
        .map(|n| {
            Reason::ALL.iter().find(|r| r.name() == n).map(|r| *r as u8).ok_or_else(|| {
                let all: Vec<&str> = Reason::ALL.iter().map(|r| r.name()).collect();
                anyhow::anyhow!("--reason {n}: no such reason (have: {})", all.join(", "))
            })
        })
        .collect::<anyhow::Result<Vec<u8>>>()
        .map(Some)
}

fn decode(bytes: &[u8]) -> Option<Event> {
    // SAFETY: `Event` is plain data; the length is checked and the read unaligned.
    (bytes.len() >= size_of::<Event>()).then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

fn show(e: &Event, ifaces: &BTreeMap<u32, String>, service: Option<&FrontendName>) -> Shown {
    let endpoint = |a: &Addr, port: u16| match (ip_from_addr(a), e.proto) {
        (IpAddr::V6(ip), PROTO_TCP | PROTO_UDP) => format!("[{ip}]:{}", u16::from_be(port)),
        (ip, PROTO_TCP | PROTO_UDP) => format!("{ip}:{}", u16::from_be(port)),
        (ip, _) => ip.to_string(),
    };
    Shown {
        time: wall_clock(e.time_ns),
        interface: ifaces.get(&e.ifindex).cloned().unwrap_or_else(|| format!("if{}", e.ifindex)),
        hook: match e.hook {
            HOOK_XDP => "xdp",
            HOOK_TC_NODE => "tc-node",
            HOOK_TC_EGRESS => "tc-egress",
            _ => "tc",
        },
        kind: [Kind::Drop, Kind::Reject, Kind::NewFlow]
            .into_iter()
            .find(|k| k.event() == e.kind)
            .map_or("?", |k| k.name()),
        reason: Reason::ALL.get(e.reason as usize).map_or("?", |r| r.name()),
        protocol: match e.proto {
            PROTO_TCP => "tcp".into(),
            PROTO_UDP => "udp".into(),
            p => format!("ip-proto-{p}"),
        },
        src: endpoint(&e.src, e.sport),
        dst: endpoint(&e.dst, e.dport),
        translated: (e.kind == EVENT_NEW_FLOW).then(|| endpoint(&e.xlate, e.xlate_port)),
        bytes: e.len,
        service: service.map(|n| {
            let port = if n.port.is_empty() { String::new() } else { format!(":{}", n.port) };
            format!("{}/{}{port}", n.namespace, n.service)
        }),
    }
}

/// The agent's frontend names (`report::read_names`), reread when the file changes.
struct Names {
    pin_dir: std::path::PathBuf,
    /// The file last read: its inode (the agent replaces it whole, by a rename) and mtime
    /// (coarse: two writes within a clock tick share it).
    seen: Option<(u64, std::time::SystemTime)>,
    by_frontend: BTreeMap<String, FrontendName>,
    /// When an event named no Service last made us look at the file again.
    missed: Option<std::time::Instant>,
}

impl Names {
    fn new(pin_dir: &Path) -> Names {
        let mut n =
            Names { pin_dir: pin_dir.to_path_buf(), seen: None, by_frontend: BTreeMap::new(), missed: None };
        n.reload_if_changed();
        n
    }

    /// `reload_if_changed` for an event that named no Service, at most every 50 ms: most
    /// such events are about no Service at all, and each look is a `stat`.
    fn reload_after_a_miss(&mut self) {
        if self.missed.is_none_or(|t| t.elapsed() >= Duration::from_millis(50)) {
            self.missed = Some(std::time::Instant::now());
            self.reload_if_changed();
        }
    }

    fn reload_if_changed(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        let modified = std::fs::metadata(report::names_path(&self.pin_dir))
            .and_then(|m| Ok((m.ino(), m.modified()?)))
            .ok();
        if modified != self.seen {
            self.seen = modified;
            self.by_frontend = report::read_names(&self.pin_dir);
        }
    }

    /// The Service of the event's destination: its frontend, else its ClusterIP.
    fn of(&self, e: &Event) -> Option<&FrontendName> {
        let ip = ip_from_addr(&e.dst);
        let frontend = matches!(e.proto, PROTO_TCP | PROTO_UDP)
            .then(|| self.by_frontend.get(&report::frontend_key(ip, Some((u16::from_be(e.dport), e.proto)))))
            .flatten();
        frontend.or_else(|| self.by_frontend.get(&report::frontend_key(ip, None)))
    }
}

/// RFC 3339 of a CLOCK_MONOTONIC reading (the programs' clock), through the wall clock now.
fn wall_clock(mono_ns: u64) -> String {
    let ago = Duration::from_nanos(monotonic_ns().saturating_sub(mono_ns));
    lb_userspace::report::timestamp_ago(ago)
}

/// This monitor's claim on events: renewed every second, given up on exit.
struct Lease {
    map: Array<MapData, MonitorLease>,
    bits: u32,
    sample: u32,
    renewed: Option<std::time::Instant>,
}

impl Lease {
    fn renew(&mut self) -> anyhow::Result<()> {
        let now = monotonic_ns();
        // Another monitor's live lease keeps the kinds it asked for, and the finer sample.
        let other = self.map.get(&0, 0).ok().filter(|l| l.until_ns > now);
        let kinds = self.bits | other.map_or(0, |l| l.kinds);
        let sample = other.filter(|l| l.kinds & (1 << EVENT_NEW_FLOW) != 0).map_or(self.sample, |l| {
            if self.bits & (1 << EVENT_NEW_FLOW) == 0 {
                l.sample.max(1)
            } else {
                self.sample.min(l.sample.max(1))
            }
        });
        let until_ns = now + LEASE.as_nanos() as u64;
        self.map.set(0, MonitorLease { until_ns, kinds, sample }, 0)?;
        self.renewed = Some(std::time::Instant::now());
        Ok(())
    }

    fn renew_if_due(&mut self) -> anyhow::Result<()> {
        if self.renewed.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            self.renew()?;
        }
        Ok(())
    }

    /// Ends the lease now (another monitor renews its own within a second).
    fn end(&mut self) {
        let _ = self.map.set(0, MonitorLease::default(), 0);
    }
}
