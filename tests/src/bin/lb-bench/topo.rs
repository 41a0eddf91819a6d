//! The forwarding topology of the packet benchmarks, fresh for every variant so no state
//! leaks between them: `gen` (the generator on g0) → f0 [`fwd`: the variant under test] f1 →
//! s0 (`sink`). `fwd` routes only the target service's endpoints to the sink, so a packet
//! that was not translated is not counted. Also: the bench programs, and loading each
//! variant's rules for a Service set (ours through the agent's Model and plan).

use std::{
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{DevMap, Map, MapData},
    programs::Xdp,
};
use lb_common::abi::CFG_F_XDP_FORWARD;
use lb_tests::{
    harness::Loaded,
    lab::{in_netns, nsip, sh, sysctl},
};
use lb_userspace::{
    dataplane::{AyaDataplane, Dataplane as _},
    loader, model,
    reconcile::{self, Applied},
};

use crate::services::*;
use lb_tests::netns::Scratch;

/// Packet-rate runs use UDP services (a UDP packet is a flow of its own); first-packet runs
/// TCP (connect() times the SYN → SYN/ACK).
pub const PROTO: Proto = Proto::Udp;
pub const FWD_IN: &str = "198.19.255.2";
pub const GEN_ADDR: &str = "198.19.255.1";
pub const FWD_OUT: &str = "198.19.255.5";
pub const SINK_ADDR: &str = "198.19.255.6";

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
    pub fn name(self) -> &'static str {
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
    pub fn ip_keyword(self) -> &'static str {
        match self {
            XdpMode::Native => "xdpdrv",
            XdpMode::Generic => "xdpgeneric",
        }
    }
}

/// The three namespaces and what runs in them; all removed on drop.
pub struct Topo {
    pub source: Scratch,
    pub fwd: Scratch,
    pub sink: Scratch,
    pub f0_mac: String,
    /// Our datapath, when the variant is ours (its pins go with it).
    pub ours: Option<Loaded>,
}

pub fn ifindex(ns: &str, dev: &str) -> anyhow::Result<u32> {
    let j: serde_json::Value = serde_json::from_str(&nsip(ns, &format!("-j link show {dev}"))?)?;
    Ok(j[0]["ifindex"].as_u64().context("no ifindex")? as u32)
}

pub fn mac(ns: &str, dev: &str) -> anyhow::Result<String> {
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
pub const OUT_MAP: &str = "lb_bench_out";
/// `lb_gen`'s 64-byte frame (slot 0 of an ARRAY).
pub const FRAME_MAP: &str = "lb_bench_frame";

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
    pub fn build(progs: &BenchProgs, variant: Variant) -> anyhow::Result<Topo> {
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
    pub fn serving() -> anyhow::Result<Topo> {
        let topo = Topo::wire()?;
        nsip(&topo.source.0, &format!("route add default via {FWD_IN}"))?;
        nsip(&topo.sink.0, &format!("route add default via {FWD_OUT}"))?;
        Ok(topo)
    }

    /// Namespaces, veths, addresses, forwarding on in `fwd`.
    pub fn wire() -> anyhow::Result<Topo> {
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
    pub fn route(&self, addr: Ipv4Addr) -> anyhow::Result<()> {
        nsip(&self.fwd.0, &format!("route replace {addr}/32 via {SINK_ADDR}")).map(|_| ())
    }

    /// Where the variant counts delivered packets: (namespace, device).
    pub fn counted_at(&self, variant: Variant) -> (&str, &str) {
        if variant == Variant::Generator { (&self.fwd.0, "f0") } else { (&self.sink.0, "s0") }
    }
}

/// Loads the variant's rules for `n` services into `fwd`; None when it took longer than
/// `limit` (the cell is then not measured).
pub fn program(
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
pub fn ours(n: u32, proto: Proto) -> anyhow::Result<Loaded> {
    let (caps, limits) = capacities(n);
    let mut l = Loaded::with_caps(&caps);
    let desired = model::desired(&cluster(n, proto), &node());
    let mut applied = Applied::default();
    let ops = reconcile::plan(&desired, &applied, &limits).complete()?;
    reconcile::execute(&mut l.dp, &mut applied, &ops)?;
    Ok(l)
}
