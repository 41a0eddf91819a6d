//! Driving and measuring a cell: the generators (trafgen, and our live-frames generator on
//! BPF_PROG_TEST_RUN) and one measured window — offered and delivered packets and CPU time of
//! all CPUs. On veth the whole path runs on the sending CPU, so the delivered rate is bounded
//! by the generator sharing that CPU: the forwarding cost is the CPU time per delivered packet
//! minus the generator's own cost per offered packet (measured alone, generator → XDP drop
//! at f0). Ratios between variants are taken on that net cost: it is what bounds a core.

use std::{
    fs,
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use aya::{
    maps::{Array, Map, MapData},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
};
use aya_obj::programs::XdpAttachType;
use lb_tests::lab::{in_ns, nsip, sh, spawn_in_netns};

use crate::topo::{BenchProgs, FRAME_MAP, Topo, Variant, ifindex};

/// Established traffic: this many flows, round robin.
pub const EST_FLOWS: u32 = 64;

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

/// trafgen's packet: 60-byte UDP frames to `dst:dport`, established or new flows.
pub fn trafgen_conf(f0_mac: &str, dst: Ipv4Addr, dport: u16, traffic: Traffic) -> String {
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
pub fn busy_ns() -> anyhow::Result<u64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    ensure!(v.len() >= 7, "short /proc/stat line");
    // user nice system idle iowait irq softirq: ticks of 1/100 s (USER_HZ).
    Ok((v[0] + v[1] + v[2] + v[5] + v[6]) * 10_000_000)
}

/// The sum of the veth's per-queue ethtool counters named `*_{name}` on `dev`.
fn veth_counter(ns: &str, dev: &str, name: &str) -> anyhow::Result<u64> {
    let out = sh(&mut in_ns(ns, &["ethtool", "-S", dev]))?;
    let suffix = format!("_{name}");
    Ok(out
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .filter(|(k, _)| k.ends_with(&suffix))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum())
}

/// Packets the XDP drop program threw away on `dev`.
pub fn xdp_drops(ns: &str, dev: &str) -> anyhow::Result<u64> {
    veth_counter(ns, dev, "xdp_drops")
}

/// Frames sent out of `dev` by XDP.
pub fn xdp_xmit(ns: &str, dev: &str) -> anyhow::Result<u64> {
    veth_counter(ns, dev, "xdp_xmit")
}

pub fn tx_packets(ns: &str, dev: &str) -> anyhow::Result<u64> {
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
pub struct Trafgen(Child, PathBuf);

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
pub fn sample<G>(
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
pub fn trafgen(topo: &Topo, conf: &str) -> anyhow::Result<Trafgen> {
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
pub struct LiveFrames {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<anyhow::Result<()>>>>,
}

impl LiveFrames {
    pub fn start(progs: &BenchProgs, topo: &Topo, frame: Vec<u8>) -> anyhow::Result<LiveFrames> {
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
