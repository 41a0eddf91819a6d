//! `throughput` and `newflows`: packets through a forwarding node, ours against kube-proxy's
//! iptables and nftables rules for the same Service set, plain forwarding and the generator
//! alone, all in one run (DESIGN.md §7, §9).
//!
//! Topology, fresh for every variant so no state leaks between them:
//! `gen` (trafgen on g0) → f0 [`fwd`: the variant under test] f1 → s0 (`sink`: XDP drop).
//! The Service set is `services::cluster(n, UDP)` (a UDP packet is a flow of its own, so the
//! generator needs no handshake); `fwd` routes only the target service's endpoints to the
//! sink, so a packet that was not translated is not counted.
//!
//! On veth the whole path runs on the sending CPU, so the delivered rate is bounded by the
//! generator sharing that CPU. Each cell therefore reports, over the same window: offered and
//! delivered packets/s, and CPU time of all CPUs (/proc/stat) per delivered packet; the
//! forwarding cost is that minus the generator's own cost per offered packet (measured alone,
//! generator → XDP drop at f0). Ratios between variants are taken on that net cost: it is
//! what bounds a forwarding core.

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMap, Map, MapData},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
};
use aya_obj::programs::XdpAttachType;
use lb_common::{
    abi::{CFG_F_XDP_FORWARD, XDP_FWD_REDIRECTED, XDP_FWD_TO_STACK, XDP_FWD_TX},
    verdict::Reason,
};
use lb_tests::{
    harness::{Loaded, Spec, privileged},
    lab::{in_netns, in_ns, nsip, sh, spawn_in_netns, sysctl},
};
use lb_userspace::{
    dataplane::{AyaDataplane, Dataplane as _},
    loader, maglev, model,
    reconcile::{self, Applied, Limits},
};
use serde_json::json;

use crate::{netns::Scratch, plot, services::*};

/// Packet-rate runs use UDP services (a UDP packet is a flow of its own); first-packet runs
/// TCP (connect() times the SYN → SYN/ACK).
const PROTO: Proto = Proto::Udp;
const FWD_IN: &str = "198.19.255.2";
const GEN_ADDR: &str = "198.19.255.1";
const FWD_OUT: &str = "198.19.255.5";
const SINK_ADDR: &str = "198.19.255.6";

/// Established traffic: this many flows, round robin.
const EST_FLOWS: u32 = 64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Variant {
    /// trafgen → XDP drop at f0: what the generator itself costs.
    Generator,
    /// Routing only, packets sent to the backend's address.
    Plain,
    Iptables,
    Nftables,
    /// Our datapath at XDP on f0, translated packets handed to the stack (the default).
    Ours,
    /// The same with `--xdp-forward`: FIB lookup and redirect to f1 from XDP.
    OursXdpForward,
    /// The XDP forwarding floor: a program that only redirects f0 → f1.
    XdpFloor,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Generator => "generator alone",
            Variant::Plain => "plain forwarding",
            Variant::Iptables => "iptables",
            Variant::Nftables => "nftables",
            Variant::Ours => "ours",
            Variant::OursXdpForward => "ours, --xdp-forward",
            Variant::XdpFloor => "XDP redirect only (floor)",
        }
    }
}

/// How our program is attached to the veths.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    Native,
    /// Under trafgen: native XDP on a veth receives through a 256-slot ring, and on this
    /// kernel the sender's queue stalls for seconds at a time when a program that passes to
    /// the stack lets that ring fill (offered rates fell from ~1 Mpps to 0-300 kpps between
    /// identical runs). A NIC has no such ring; generic mode keeps the veth's plain receive
    /// path. (Live frames arrive as XDP frames, which only native mode takes.)
    Generic,
}

impl XdpMode {
    fn ip_keyword(self) -> &'static str {
        match self {
            XdpMode::Native => "xdpdrv",
            XdpMode::Generic => "xdpgeneric",
        }
    }
}

/// Which generator drives a cell.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Gen {
    /// trafgen through g0's kernel transmit path (every variant; our programs run in
    /// generic mode, see `program`).
    Trafgen,
    /// Our live-frames generator: XDP frames into f0's native XDP (XDP-to-XDP variants).
    LiveFrames,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// `EST_FLOWS` flows, over and over.
    Established,
    /// Random source address (4 096) × random source port: practically every packet new.
    NewFlows,
}

/// The three namespaces and what runs in them; all removed on drop.
struct Topo {
    source: Scratch,
    fwd: Scratch,
    sink: Scratch,
    f0_mac: String,
    /// Our datapath, when the variant is ours (its pins go with it).
    ours: Option<Loaded>,
}

fn ifindex(ns: &str, dev: &str) -> anyhow::Result<u32> {
    let j: serde_json::Value = serde_json::from_str(&nsip(ns, &format!("-j link show {dev}"))?)?;
    Ok(j[0]["ifindex"].as_u64().context("no ifindex")? as u32)
}

fn mac(ns: &str, dev: &str) -> anyhow::Result<String> {
    let j: serde_json::Value = serde_json::from_str(&nsip(ns, &format!("-j link show {dev}"))?)?;
    Ok(j[0]["address"].as_str().context("no MAC")?.to_string())
}

/// The bench programs (sink, XDP forwarding floor, generator), loaded and pinned in a bpffs
/// of our own under /run (`ip netns exec` remounts /sys, hiding /sys/fs/bpf), so iproute2
/// can attach them in any namespace.
pub struct BenchProgs {
    /// Holds the programs while we run (the pins hold them too).
    _ebpf: Ebpf,
    pub dir: PathBuf,
}

/// `lb_redirect`'s egress (slot 0 of a DEVMAP).
const OUT_MAP: &str = "lb_bench_out";
/// `lb_gen`'s 64-byte frame (slot 0 of an ARRAY).
const FRAME_MAP: &str = "lb_bench_frame";

impl BenchProgs {
    pub fn load() -> anyhow::Result<BenchProgs> {
        let dir = PathBuf::from(format!("/run/lb-bench-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        sh(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&dir))?;
        let mut ebpf = EbpfLoader::new().load(loader::BENCH_OBJECT).context("loading the bench programs")?;
        for name in ["lb_drop", "lb_redirect", "lb_gen"] {
            let p: &mut Xdp = ebpf.program_mut(name).context(name)?.try_into()?;
            p.load()?;
            p.pin(dir.join(name)).with_context(|| format!("pinning {name}"))?;
        }
        for map in [OUT_MAP, FRAME_MAP] {
            ebpf.map_mut(map).context(map)?.pin(dir.join(map))?;
        }
        Ok(BenchProgs { _ebpf: ebpf, dir })
    }

    /// Attaches pinned program `name` to `dev` in `ns`, in `mode` (`xdpdrv`: native,
    /// `xdpgeneric`).
    pub fn attach(&self, name: &str, ns: &str, dev: &str, mode: &str) -> anyhow::Result<()> {
        nsip(ns, &format!("link set dev {dev} {mode} pinned {}", self.dir.join(name).display())).map(|_| ())
    }
}

impl Drop for BenchProgs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = fs::remove_dir(&self.dir);
    }
}

impl Topo {
    /// The packet-rate topology: the sink drops at XDP (at f0 for the generator alone).
    fn build(progs: &BenchProgs, variant: Variant) -> anyhow::Result<Topo> {
        let topo = Topo::wire()?;
        if variant == Variant::Generator {
            progs.attach("lb_drop", &topo.fwd.0, "f0", "xdpdrv")?;
        } else {
            progs.attach("lb_drop", &topo.sink.0, "s0", "xdpdrv")?;
        }
        Ok(topo)
    }

    /// The latency topology: the sink answers (a server on the target's endpoint
    /// addresses), and both ends route through `fwd`.
    fn serving() -> anyhow::Result<Topo> {
        let topo = Topo::wire()?;
        nsip(&topo.source.0, &format!("route add default via {FWD_IN}"))?;
        nsip(&topo.sink.0, &format!("route add default via {FWD_OUT}"))?;
        Ok(topo)
    }

    /// Namespaces, veths, addresses, forwarding on in `fwd`.
    fn wire() -> anyhow::Result<Topo> {
        let source = Scratch::new("gen")?;
        let fwd = Scratch::new("fwd")?;
        let sink = Scratch::new("sink")?;
        let (g, f, s) = (&source.0, &fwd.0, &sink.0);
        sh(Command::new("ip")
            .args(["link", "add", "g0", "netns", g, "type", "veth", "peer", "f0", "netns", f]))?;
        sh(Command::new("ip")
            .args(["link", "add", "f1", "netns", f, "type", "veth", "peer", "s0", "netns", s]))?;
        for (ns, dev, addr) in
            [(g, "g0", GEN_ADDR), (f, "f0", FWD_IN), (f, "f1", FWD_OUT), (s, "s0", SINK_ADDR)]
        {
            nsip(ns, &format!("addr add {addr}/30 dev {dev}"))?;
            nsip(ns, &format!("link set {dev} up"))?;
        }
        sysctl(f, "net.ipv4.ip_forward", "1")?;
        // Generated sources are not routed back through f0; strict reverse-path filtering
        // would drop them.
        for dev in ["all", "default", "f0"] {
            sysctl(f, &format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
        }
        // A dropping sink drops ARP too: its neighbour entry is static.
        nsip(f, &format!("neigh add {SINK_ADDR} lladdr {} dev f1 nud permanent", mac(s, "s0")?))?;
        let f0_mac = mac(f, "f0")?;
        Ok(Topo { source, fwd, sink, f0_mac, ours: None })
    }

    /// Routes `addr` to the sink.
    fn route(&self, addr: Ipv4Addr) -> anyhow::Result<()> {
        nsip(&self.fwd.0, &format!("route replace {addr}/32 via {SINK_ADDR}")).map(|_| ())
    }

    /// Where the variant counts delivered packets: (namespace, device).
    fn counted_at(&self, variant: Variant) -> (&str, &str) {
        if variant == Variant::Generator { (&self.fwd.0, "f0") } else { (&self.sink.0, "s0") }
    }
}

/// Loads the variant's rules for `n` services into `fwd`; None when it took longer than
/// `limit` (the cell is then not measured).
fn program(
    progs: &BenchProgs,
    topo: &mut Topo,
    variant: Variant,
    mode: XdpMode,
    (n, proto): (u32, Proto),
    limit: Duration,
) -> anyhow::Result<Option<Duration>> {
    let work = std::env::temp_dir().join(format!("lb-bench-fwd-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let t = Instant::now();
    let took = match variant {
        Variant::Generator | Variant::Plain => Some(t.elapsed()),
        Variant::XdpFloor => {
            progs.attach("lb_redirect", &topo.fwd.0, "f0", "xdpdrv")?;
            // Devmap ifindexes resolve in the writer's namespace: write from inside `fwd`.
            let (pin, f1) = (progs.dir.join(OUT_MAP), ifindex(&topo.fwd.0, "f1")?);
            in_netns(&topo.fwd.0, move || -> anyhow::Result<()> {
                let mut m = DevMap::try_from(Map::DevMap(MapData::from_pin(&pin)?))?;
                m.set(0, f1, None, 0)?;
                Ok(())
            })??;
            Some(t.elapsed())
        }
        Variant::Iptables => {
            let f = work.join("iptables.rules");
            fs::write(&f, iptables_rules(n, proto))?;
            topo.fwd.time("iptables-restore", &[], &f, limit)?
        }
        Variant::Nftables => {
            let f = work.join("nft.rules");
            fs::write(&f, nft_rules(n, proto))?;
            topo.fwd.time("nft", &["-f", "-"], &f, limit)?
        }
        Variant::Ours | Variant::OursXdpForward => {
            let mut l = ours(n, proto)?;
            let pin = progs.dir.join("ours");
            let _ = fs::remove_file(&pin);
            let p: &mut Xdp = l.ebpf.program_mut(loader::XDP_PROGRAM).context("lb_xdp")?.try_into()?;
            p.pin(&pin)?;
            // Both node ports run the program, as `lb agent --xdp-iface f0 --xdp-iface f1`.
            progs.attach("ours", &topo.fwd.0, "f0", mode.ip_keyword())?;
            progs.attach("ours", &topo.fwd.0, "f1", mode.ip_keyword())?;
            if variant == Variant::OursXdpForward {
                let mut config = l.dp.config()?;
                config.flags |= CFG_F_XDP_FORWARD;
                l.dp.set_config(&config)?;
                // The kernel resolves a devmap's ifindexes in the writer's namespace: write
                // from inside `fwd`, or they would name root-namespace devices.
                let ports = [ifindex(&topo.fwd.0, "f0")?, ifindex(&topo.fwd.0, "f1")?];
                let pins = l.pin_dir.clone();
                in_netns(&topo.fwd.0, move || AyaDataplane::open(&pins)?.set_xdp_tx_ports(&ports))??;
            }
            topo.ours = Some(l);
            Some(t.elapsed())
        }
    };
    let _ = fs::remove_dir_all(&work);
    Ok(took)
}

/// Our datapath, loaded and synced with the `n`-service set by the agent's Model and plan.
fn ours(n: u32, proto: Proto) -> anyhow::Result<Loaded> {
    let m = maglev::table_size(ENDPOINTS as usize, lb_common::maglev::DEFAULT_MAX_TABLE);
    let caps = loader::Capacities {
        frontends: 2 * n + 1024,
        services: n + 1024,
        backends: ENDPOINTS * n + 1024,
        maglev_slots: (n + 4) * m,
        ..Default::default()
    };
    let limits = Limits {
        max_table: lb_common::maglev::DEFAULT_MAX_TABLE,
        maglev_slots: caps.maglev_slots,
        backends: caps.backends,
        services: caps.services,
    };
    let mut l = Loaded::with_caps(&caps);
    let desired = model::desired(&cluster(n, proto), &node());
    let mut applied = Applied::default();
    let ops = reconcile::plan(&desired, &applied, &limits)?;
    reconcile::execute(&mut l.dp, &mut applied, &ops)?;
    Ok(l)
}

/// trafgen's packet: 60-byte UDP frames to `dst:dport`, established or new flows.
fn trafgen_conf(f0_mac: &str, dst: Ipv4Addr, dport: u16, traffic: Traffic) -> String {
    let (src, sport) = match traffic {
        Traffic::Established => {
            ("198.19.224.1".to_string(), format!("dinc(10000, {})", 10_000 + EST_FLOWS - 1))
        }
        Traffic::NewFlows => {
            // 198.19.224.0/20: outside every endpoint and link address of the set.
            let lo = u32::from(Ipv4Addr::new(198, 19, 224, 0));
            (format!("drnd({lo}, {})", lo + 4095), "drnd(1024, 65535)".to_string())
        }
    };
    format!(
        "{{ eth(da={f0_mac}, type=0x0800), ipv4(sa={src}, da={dst}, ttl=64), udp(sp={sport}, dp={dport}), fill(0x41, 18) }}\n"
    )
}

/// CPU time of all CPUs (ns) from /proc/stat, idle, iowait and steal left out.
fn busy_ns() -> anyhow::Result<u64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    ensure!(v.len() >= 7, "short /proc/stat line");
    // user nice system idle iowait irq softirq: ticks of 1/100 s (USER_HZ).
    Ok((v[0] + v[1] + v[2] + v[5] + v[6]) * 10_000_000)
}

/// Packets the XDP drop program threw away on `dev` (the veth's per-queue counters).
fn xdp_drops(ns: &str, dev: &str) -> anyhow::Result<u64> {
    let out = sh(&mut in_ns(ns, &["ethtool", "-S", dev]))?;
    let total = out
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .filter(|(k, _)| k.ends_with("_xdp_drops"))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum();
    Ok(total)
}

fn tx_packets(ns: &str, dev: &str) -> anyhow::Result<u64> {
    let j: serde_json::Value = serde_json::from_str(&nsip(ns, &format!("-s -j link show {dev}"))?)?;
    j[0]["stats64"]["tx"]["packets"].as_u64().context("no tx stats")
}

/// One measured window.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub offered_pps: f64,
    pub delivered_pps: f64,
    /// CPU ns (all CPUs) per delivered packet.
    pub cpu_ns: f64,
    /// The same window's CPU ns per offered packet (for the generator's own cost).
    pub cpu_ns_offered: f64,
}

impl Sample {
    /// CPU ns per delivered packet beyond the generator's `gen` ns per offered packet.
    pub fn net_ns(&self, generator: f64) -> f64 {
        let busy = self.cpu_ns * self.delivered_pps;
        ((busy - generator * self.offered_pps) / self.delivered_pps).max(1.0)
    }
}

/// A running trafgen and its config file, both gone on drop.
struct Trafgen(Child, PathBuf);

impl Drop for Trafgen {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.1);
        // trafgen's workers are its children: signal the process group we gave it.
        // SAFETY: signalling our own child's group by its pid.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGINT) };
        let _ = self.0.wait();
    }
}

/// Starts a load with `start`, lets it settle, then samples over `window`: delivered
/// packets at the variant's sink, offered packets by `offered()`, CPU time of all CPUs.
fn sample<G>(
    topo: &Topo,
    variant: Variant,
    start: impl FnOnce() -> anyhow::Result<G>,
    offered: impl Fn() -> anyhow::Result<u64>,
    window: Duration,
) -> anyhow::Result<Sample> {
    let load = start()?;
    std::thread::sleep(Duration::from_millis(500));
    let (ns, dev) = topo.counted_at(variant);
    let (d0, t0, c0, at0) = (xdp_drops(ns, dev)?, offered()?, busy_ns()?, Instant::now());
    std::thread::sleep(window);
    let (d1, t1, c1, secs) = (xdp_drops(ns, dev)?, offered()?, busy_ns()?, at0.elapsed().as_secs_f64());
    drop(load);
    let delivered = (d1 - d0) as f64;
    let offered = (t1 - t0) as f64;
    ensure!(offered > 0.0, "{}: the generator sent nothing", variant.name());
    ensure!(delivered > 0.0, "{}: nothing reached the sink", variant.name());
    let busy = (c1 - c0) as f64;
    Ok(Sample {
        offered_pps: offered / secs,
        delivered_pps: delivered / secs,
        cpu_ns: busy / delivered,
        cpu_ns_offered: busy / offered,
    })
}

/// trafgen at full speed on one CPU, sending `conf`'s packets out of g0.
fn trafgen(topo: &Topo, conf: &str) -> anyhow::Result<Trafgen> {
    let path = std::env::temp_dir().join(format!("lb-bench-{}.trafgen", std::process::id()));
    fs::write(&path, conf)?;
    let child =
        in_ns(&topo.source.0, &["trafgen", "-o", "g0", "-i", path.to_str().unwrap(), "-P", "1", "-Q", "-C"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting trafgen")?;
    Ok(Trafgen(child, path))
}

/// The in-project generator: `lb_gen` run by BPF_PROG_TEST_RUN with live frames on g0 (from
/// a thread inside `gen`), each call 2^20 copies of one frame sent by XDP_TX, until dropped.
struct LiveFrames {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<anyhow::Result<()>>>>,
}

impl LiveFrames {
    fn start(progs: &BenchProgs, topo: &Topo, frame: Vec<u8>) -> anyhow::Result<LiveFrames> {
        ensure!(frame.len() == 64, "live frames are 64 bytes");
        let mut words = [0u64; 8];
        for (w, b) in words.iter_mut().zip(frame.chunks(8)) {
            *w = u64::from_ne_bytes(b.try_into()?);
        }
        let mut template: Array<MapData, [u64; 8]> =
            Array::try_from(Map::Array(MapData::from_pin(progs.dir.join(FRAME_MAP))?))?;
        template.set(0, words, 0)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, prog_pin, g0) = (stop.clone(), progs.dir.join("lb_gen"), ifindex(&topo.source.0, "g0")?);
        let thread = spawn_in_netns(&topo.source.0, move || -> anyhow::Result<()> {
            let prog = Xdp::from_pin(&prog_pin, XdpAttachType::Interface)?;
            // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
            // egress_ifindex.
            let mut ctx = Vec::with_capacity(24);
            for v in [0, frame.len() as u32, 0, g0, 0, 0] {
                ctx.extend_from_slice(&v.to_ne_bytes());
            }
            while !flag.load(Ordering::Relaxed) {
                let r = prog.test_run(TestRunOptions {
                    data_in: Some(&frame),
                    ctx_in: Some(&ctx),
                    repeat: 1 << 20,
                    attrs: TestRunAttrs::new().xdp_live_frames(64),
                    ..TestRunOptions::new()
                })?;
                ensure!(r.return_value == 0, "live frames: return {}", r.return_value);
            }
            Ok(())
        })?;
        Ok(LiveFrames { stop, thread: Some(thread) })
    }
}

impl Drop for LiveFrames {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take()
            && let Ok(Ok(Err(e))) = t.join()
        {
            eprintln!("live-frames generator: {e:#}");
        }
    }
}

/// Frames sent out of `dev` by XDP (veth counters).
fn xdp_xmit(ns: &str, dev: &str) -> anyhow::Result<u64> {
    let out = sh(&mut in_ns(ns, &["ethtool", "-S", dev]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .filter(|(k, _)| k.ends_with("_xdp_xmit"))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum())
}

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

fn require_tools() -> anyhow::Result<()> {
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

/// A TCP server in the sink on `port` of every address: accepts and closes until dropped.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(ns: &str, port: u16) -> anyhow::Result<Server> {
        let listener = in_netns(ns, move || std::net::TcpListener::bind(("0.0.0.0", port)))??;
        // SAFETY: listen() again on our own listening socket only resizes its backlog (std's
        // 128 overflows between two polls of the accept loop below).
        unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) };
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => drop(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Ok(Server { stop, thread: Some(thread) })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connection setup (SYN → SYN/ACK) p50 and p99 in µs.
#[derive(Clone, Copy, Debug)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
}

/// One first-packet measurement: `variant` with `n` services loaded, `samples` connections
/// from `gen` to the last service (to its first endpoint for plain forwarding), each a new
/// flow through the forwarding namespace. None when the rules did not load within `limit`.
fn first_packet_cell(
    variant: Variant,
    n: u32,
    samples: usize,
    limit: Duration,
) -> anyhow::Result<Option<Percentiles>> {
    let progs = BenchProgs::load()?;
    let mut topo = Topo::serving()?;
    let target = n - 1;
    let eps = endpoints_of(target);
    for (ep, _) in &eps {
        topo.route(*ep)?;
        nsip(&topo.sink.0, &format!("addr add {ep}/32 dev lo"))?;
    }
    nsip(&topo.sink.0, "link set lo up")?;
    // The server sees the generator's address: its replies go back through `fwd`.
    let _server = Server::start(&topo.sink.0, eps[0].1)?;
    if program(&progs, &mut topo, variant, XdpMode::Generic, (n, Proto::Tcp), limit)?.is_none() {
        return Ok(None);
    }
    let to = match variant {
        Variant::Plain => std::net::SocketAddr::from(eps[0]),
        _ => std::net::SocketAddr::from((vip(target), svc_port(target))),
    };
    // Warm up: neighbour entries, the service's first flow.
    crate::clients::connect_times(&topo.source.0, to, 20)?;
    let mut t = crate::clients::connect_times(&topo.source.0, to, samples)?;
    Ok(Some(Percentiles {
        p50: crate::clients::percentile(&mut t, 0.5),
        p99: crate::clients::percentile(&mut t, 0.99),
    }))
}

/// A row of the first-packet sweep.
pub struct FirstPacketRow {
    pub services: u32,
    pub ours: Option<Percentiles>,
    pub iptables: Option<Percentiles>,
    pub nftables: Option<Percentiles>,
}

/// First-packet latency through the forwarding namespace, ours vs iptables vs nftables,
/// for each service count; and direct (plain forwarding, no load balancer).
pub fn first_packet(
    sweep: &[u32],
    nft_max: u32,
    samples: usize,
) -> anyhow::Result<(Vec<FirstPacketRow>, Percentiles)> {
    require_tools()?;
    let limit = Duration::from_secs(120);
    let direct = first_packet_cell(Variant::Plain, 1, samples, limit)?.context("plain forwarding")?;
    eprintln!(
        "bench latency: first packet, plain forwarding: p50 {:.0} µs, p99 {:.0} µs",
        direct.p50, direct.p99
    );
    let mut rows = Vec::new();
    for &n in sweep.iter().filter(|n| **n > 0) {
        let mut row = FirstPacketRow { services: n, ours: None, iptables: None, nftables: None };
        for v in [Variant::Ours, Variant::Iptables, Variant::Nftables] {
            if v == Variant::Nftables && n > nft_max {
                continue;
            }
            let p = first_packet_cell(v, n, samples, limit)?;
            if let Some(p) = p {
                eprintln!(
                    "bench latency: first packet, {} at {n} services: p50 {:.0} µs, p99 {:.0} µs",
                    v.name(),
                    p.p50,
                    p.p99
                );
            }
            match v {
                Variant::Ours => row.ours = p,
                Variant::Iptables => row.iptables = p,
                _ => row.nftables = p,
            }
        }
        rows.push(row);
    }
    Ok((rows, direct))
}
