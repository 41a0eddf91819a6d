//! The network-namespace lab (DESIGN.md §8): two nodes joined by an underlay, pods on each,
//! an external client, and a real `lb agent` per node.
//!
//! ```text
//!   ext (198.18.0.100) ─┐
//!                       ├─ br0 (namespace "sw": the underlay switch)
//!   node-1 eth0 ────────┤   198.18.0.1   XDP           pods 198.18.1.0/24, veth lbp-*  TC
//!   node-2 eth0 ────────┘   198.18.0.2   XDP           pods 198.18.2.0/24, veth lbp-*  TC
//! ```
//!
//! Dual stack: every address above has an IPv6 twin from 2001:2::/48 (RFC 5180), the
//! underlay 2001:2::/64 (ext 2001:2::100, node N 2001:2::N), node N's pods 2001:2:0:N::/64
//! (pod `host` is 2001:2:0:N::`host`, the gateway 2001:2:0:N::1). Service addresses live
//! outside both: 198.19.0.0/16 and 2001:2:0:8000::/49, routed by ext via node-1.
//!
//! Routing is what a simple host-gateway CNI does: each pod has a /32 (and a /128) and a
//! default route via its node's gateway address (198.18.N.1, on every host-side veth); each
//! node routes its pods' /32s to their veths and the other node's pod /24 (/64) via that
//! node's underlay address.
//! The underlay and the external client have TX checksum offload off, like real NICs (XDP
//! rewrites need complete checksums); pod veths keep it on, so TC sees CHECKSUM_PARTIAL.
//!
//! Names carry a per-run prefix; everything (namespaces, the bpffs mount for the agents'
//! pins, processes) is recorded in a state file and removed by `down`, by `Drop`, and by
//! `lb-lab down` for a lab whose owner died.

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// Where lab state files live.
pub const STATE_ROOT: &str = "/run/lb-lab";
/// The port every backend pod serves (like `serve_hostname`).
pub const POD_PORT: u16 = 9376;
/// A second port the standard backend pods serve (multi-port and named-port tests).
pub const POD_PORT_ALT: u16 = 8080;
/// The external client's address on the underlay.
pub const EXT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The external client's IPv6 address on the underlay.
pub const EXT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x100);
/// Where the lab's IPv6 Service addresses (ClusterIPs, LoadBalancer IPs) live: ext routes
/// it via node-1, as it does 198.19.0.0/16.
pub const SERVICE_NET6: &str = "2001:2:0:8000::/49";

/// The node's underlay address (`node` counts from 1).
pub fn node_ip(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, node)
}

/// A pod address on `node`.
pub fn pod_ip(node: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, node, host)
}

/// The node's IPv6 underlay address.
pub fn node_ip6(node: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, node.into())
}

/// A pod's IPv6 address on `node`.
pub fn pod_ip6(node: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, node.into(), 0, 0, 0, host.into())
}

/// Binaries the lab runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bins {
    pub lb: PathBuf,
    pub serve: PathBuf,
}

impl Bins {
    /// `lb` and `lb-serve` next to the running executable (cargo puts every binary of the
    /// workspace in the same target directory).
    pub fn beside(exe: &Path) -> anyhow::Result<Bins> {
        let mut dir = exe.parent().context("executable has no directory")?.to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let bins = Bins { lb: dir.join("lb"), serve: dir.join("lb-serve") };
        for b in [&bins.lb, &bins.serve] {
            if !b.exists() {
                bail!(
                    "{} is missing: build it first (cargo build -p lb-userspace -p lb-tests --bins)",
                    b.display()
                );
            }
        }
        Ok(bins)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pod {
    pub name: String,
    pub node: u8,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub ns: String,
    pub host_if: String,
    /// The server's pid (none for client pods).
    pub server: Option<u32>,
    /// A hostNetwork pod: it runs in its node's namespace, at the node's address.
    #[serde(default)]
    pub host_network: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Agent {
    pub node: u8,
    pub pid: u32,
    pub log: PathBuf,
    pub pin_dir: PathBuf,
}

/// Everything the lab created, persisted so another process can tear it down.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub name: String,
    pub dir: PathBuf,
    pub bpffs: PathBuf,
    pub manifests: PathBuf,
    pub namespaces: Vec<String>,
    pub nodes: u8,
    pub pods: Vec<Pod>,
    pub agents: Vec<Agent>,
    pub bins: Bins,
}

pub struct Lab {
    pub state: State,
    /// Children we started (reaped on stop), by pid.
    children: BTreeMap<u32, Child>,
    torn_down: bool,
}

/// Runs a command; fails with its stderr.
pub fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS` (split on whitespace).
pub fn ip(args: &str) -> anyhow::Result<String> {
    sh(Command::new("ip").args(args.split_whitespace()))
}

/// `ip netns exec NS ...`
pub fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

/// The `/metrics` page of the agent in namespace `ns` (at its default bind address), given
/// up after `max_secs`.
pub fn metrics_in(ns: &str, max_secs: u32) -> anyhow::Result<String> {
    let max = max_secs.to_string();
    sh(&mut in_ns(ns, &["curl", "-s", "--max-time", &max, "http://127.0.0.1:10249/metrics"]))
}

/// `ip -n NS ARGS`.
pub fn nsip(ns: &str, args: &str) -> anyhow::Result<String> {
    ip(&format!("-n {ns} {args}"))
}

/// `sysctl -w KEY=VALUE` in namespace NS.
pub fn sysctl(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    sh(&mut in_ns(ns, &["sysctl", "-qw", &format!("{key}={value}")])).map(|_| ())
}

impl Lab {
    /// Creates the switch, the external client and `nodes` nodes (no pods, no agents yet).
    /// On failure everything created so far is removed.
    pub fn up(nodes: u8, bins: Bins) -> anyhow::Result<Lab> {
        let name = format!(
            "lb{}x{}",
            std::process::id(),
            LAB_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let dir = Path::new(STATE_ROOT).join(&name);
        fs::create_dir_all(dir.join("manifests"))?;
        let state = State {
            name: name.clone(),
            bpffs: dir.join("bpf"),
            manifests: dir.join("manifests"),
            dir,
            namespaces: Vec::new(),
            nodes,
            pods: Vec::new(),
            agents: Vec::new(),
            bins,
        };
        let mut lab = Lab { state, children: BTreeMap::new(), torn_down: false };
        lab.save()?;
        if let Err(e) = lab.build(nodes) {
            lab.teardown();
            return Err(e.context("building the lab (everything created was removed)"));
        }
        Ok(lab)
    }

    fn ns_name(&self, role: &str) -> String {
        format!("{}-{role}", self.state.name)
    }

    fn add_ns(&mut self, role: &str) -> anyhow::Result<String> {
        let ns = self.ns_name(role);
        ip(&format!("netns add {ns}"))?;
        self.state.namespaces.push(ns.clone());
        self.save()?;
        nsip(&ns, "link set lo up")?;
        Ok(ns)
    }

    fn build(&mut self, nodes: u8) -> anyhow::Result<()> {
        fs::create_dir_all(&self.state.bpffs)?;
        sh(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&self.state.bpffs))?;
        let sw = self.add_ns("sw")?;
        nsip(&sw, "link add br0 type bridge")?;
        nsip(&sw, "link set br0 up")?;
        let ext = self.add_ns("ext")?;
        self.underlay_port(&ext, "ext", EXT_IP, EXT_IP6)?;
        sh(&mut in_ns(&ext, &["ethtool", "-K", "eth0", "tx", "off"]))?;
        nsip(&ext, &format!("route add 198.19.0.0/16 via {}", node_ip(1)))?;
        nsip(&ext, &format!("-6 route add {SERVICE_NET6} via {}", node_ip6(1)))?;
        for n in 1..=nodes {
            let ns = self.add_ns(&format!("node{n}"))?;
            self.underlay_port(&ns, &format!("n{n}"), node_ip(n), node_ip6(n))?;
            sh(&mut in_ns(&ns, &["ethtool", "-K", "eth0", "tx", "off"]))?;
            for (k, v) in [
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                ("net.ipv4.conf.all.send_redirects", "0"),
                ("net.ipv4.conf.default.send_redirects", "0"),
                ("net.ipv4.conf.eth0.send_redirects", "0"),
                ("net.ipv6.conf.all.forwarding", "1"),
            ] {
                sysctl(&ns, k, v)?;
            }
            for other in (1..=nodes).filter(|o| *o != n) {
                nsip(&ns, &format!("route add 198.18.{other}.0/24 via {}", node_ip(other)))?;
                nsip(&ns, &format!("-6 route add {}/64 via {}", pod_ip6(other, 0), node_ip6(other)))?;
            }
        }
        self.save()
    }

    /// The lab's pass-everything XDP object (the empty program), written into its state
    /// folder on first use: for `ip link set ... xdpdrv obj`.
    pub fn xdp_pass_object(&self) -> anyhow::Result<PathBuf> {
        let pass = self.state.dir.join("xdp-pass.o");
        if !pass.exists() {
            fs::write(&pass, lb_userspace::loader::EMPTY_OBJECT)?;
        }
        Ok(pass)
    }

    /// A veth from `ns` (as eth0 with `addr`/24 and `addr6`/64) into the switch's bridge.
    fn underlay_port(&self, ns: &str, tag: &str, addr: Ipv4Addr, addr6: Ipv6Addr) -> anyhow::Result<()> {
        let sw = self.ns_name("sw");
        let peer = format!("{}-{tag}", self.short());
        ip(&format!("link add {peer} netns {sw} type veth peer name eth0 netns {ns}"))?;
        nsip(&sw, &format!("link set {peer} master br0 up"))?;
        // The switch side receives the frames our XDP program bounces (XDP_TX, rejects). A
        // veth only takes such frames reliably when it runs an XDP program itself (with GRO
        // alone most were lost here): a pass-everything program, as a real switch port needs
        // none of this.
        let pass = self.xdp_pass_object()?;
        nsip(&sw, &format!("link set dev {peer} xdpdrv obj {} sec xdp", pass.display()))?;
        nsip(ns, &format!("addr add {addr}/24 dev eth0"))?;
        // No duplicate address detection: the address is usable at once, as the lab's own.
        nsip(ns, &format!("-6 addr add {addr6}/64 dev eth0 nodad"))?;
        nsip(ns, "link set eth0 up")?;
        Ok(())
    }

    /// A short unique tag for interface names (15 characters at most).
    fn short(&self) -> String {
        let n = &self.state.name;
        n[n.len().saturating_sub(6)..].to_string()
    }

    fn node_ns(&self, node: u8) -> String {
        self.ns_name(&format!("node{node}"))
    }

    /// Adds a pod on `node` with addresses 198.18.`node`.`host` and 2001:2:0:`node`::`host`;
    /// with `serve`, starts `lb-serve` on `ports` (the pod's name is the answer).
    pub fn add_pod(&mut self, node: u8, name: &str, host: u8, serve: Option<&[u16]>) -> anyhow::Result<Pod> {
        let ns = self.add_ns(&format!("pod-{name}"))?;
        let node_ns = self.node_ns(node);
        let host_if = format!("lbp-{}", &name[..name.len().min(11)]);
        let addr = pod_ip(node, host);
        let gw = pod_ip(node, 1);
        let (addr6, gw6) = (pod_ip6(node, host), pod_ip6(node, 1));
        ip(&format!("link add {host_if} netns {node_ns} type veth peer name eth0 netns {ns}"))?;
        nsip(&node_ns, &format!("addr add {gw}/32 dev {host_if}"))?;
        nsip(&node_ns, &format!("-6 addr add {gw6}/128 dev {host_if} nodad"))?;
        nsip(&node_ns, &format!("link set {host_if} up"))?;
        nsip(&node_ns, &format!("route add {addr}/32 dev {host_if}"))?;
        nsip(&node_ns, &format!("-6 route add {addr6}/128 dev {host_if}"))?;
        sysctl(&node_ns, &format!("net.ipv4.conf.{host_if}.rp_filter"), "0")?;
        nsip(&ns, &format!("addr add {addr}/32 dev eth0"))?;
        nsip(&ns, &format!("-6 addr add {addr6}/128 dev eth0 nodad"))?;
        nsip(&ns, "link set eth0 up")?;
        nsip(&ns, &format!("route add {gw} dev eth0 scope link"))?;
        nsip(&ns, &format!("route add default via {gw} dev eth0"))?;
        nsip(&ns, &format!("-6 route add {gw6} dev eth0"))?;
        nsip(&ns, &format!("-6 route add default via {gw6} dev eth0"))?;
        let mut pod = Pod {
            name: name.into(),
            node,
            ip: addr,
            ip6: addr6,
            ns: ns.clone(),
            host_if,
            server: None,
            host_network: false,
        };
        if let Some(ports) = serve {
            pod.server = Some(self.serve(&pod, ports, &[])?);
        }
        self.state.pods.push(pod.clone());
        self.save()?;
        if let Some(ports) = serve {
            self.wait_serving(&pod, ports[0])?;
        }
        Ok(pod)
    }

    /// Adds a hostNetwork pod on `node`: `lb-serve` in the node's namespace, answering on
    /// `ports` at the node's addresses (an endpoint at 198.18.0.`node`).
    pub fn add_host_pod(&mut self, node: u8, name: &str, ports: &[u16]) -> anyhow::Result<Pod> {
        let mut pod = Pod {
            name: name.into(),
            node,
            ip: node_ip(node),
            ip6: node_ip6(node),
            ns: self.node_ns(node),
            host_if: String::new(),
            server: None,
            host_network: true,
        };
        let addresses = [IpAddr::V4(pod.ip), IpAddr::V6(pod.ip6)];
        pod.server = Some(self.serve(&pod, ports, &addresses)?);
        self.state.pods.push(pod.clone());
        self.save()?;
        self.wait_serving(&pod, ports[0])?;
        Ok(pod)
    }

    /// Starts `lb-serve` for `pod` in its namespace: on `addresses` only, or on all.
    fn serve(&mut self, pod: &Pod, ports: &[u16], addresses: &[IpAddr]) -> anyhow::Result<u32> {
        let mut cmd = in_ns(&pod.ns, &[self.state.bins.serve.to_str().unwrap(), "--name", &pod.name]);
        for p in ports {
            cmd.args(["--port", &p.to_string()]);
        }
        for a in addresses {
            cmd.args(["--address", &a.to_string()]);
        }
        let log = fs::File::create(self.state.dir.join(format!("pod-{}.log", pod.name)))?;
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().context("starting lb-serve")?;
        let pid = child.id();
        self.children.insert(pid, child);
        Ok(pid)
    }

    fn wait_serving(&self, pod: &Pod, port: u16) -> anyhow::Result<()> {
        wait_for(Duration::from_secs(5), || {
            sh(&mut in_ns(&pod.ns, &["ss", "-Hltn"])).map(|o| o.contains(&format!(":{port}")))
        })
        .with_context(|| format!("pod {}: server did not start", pod.name))?;
        Ok(())
    }

    /// Removes a pod (its server, namespace and veth).
    pub fn remove_pod(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(i) = self.state.pods.iter().position(|p| p.name == name) else { bail!("no pod {name}") };
        let pod = self.state.pods.remove(i);
        if let Some(pid) = pod.server {
            self.stop(pid);
        }
        if pod.host_network {
            return self.save();
        }
        ip(&format!("netns del {}", pod.ns))?;
        self.state.namespaces.retain(|n| *n != pod.ns);
        self.save()
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.state.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn ext_ns(&self) -> String {
        self.ns_name("ext")
    }

    /// Writes a manifest file into the agents' folder (atomically: write, then rename).
    pub fn write_manifest(&self, file: &str, yaml: &str) -> anyhow::Result<()> {
        let tmp = self.state.manifests.join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml)?;
        fs::rename(&tmp, self.state.manifests.join(file))?;
        Ok(())
    }

    pub fn remove_manifest(&self, file: &str) -> anyhow::Result<()> {
        fs::remove_file(self.state.manifests.join(file)).map_err(Into::into)
    }

    /// The Node objects of the lab's nodes (their InternalIPs).
    pub fn node_manifests(&self) -> String {
        (1..=self.state.nodes)
            .map(|n| {
                format!(
                    "apiVersion: v1\nkind: Node\nmetadata: {{name: node-{n}}}\nstatus:\n  addresses:\n  - {{type: InternalIP, address: {}}}\n  - {{type: InternalIP, address: '{}'}}\n---\n",
                    node_ip(n),
                    node_ip6(n)
                )
            })
            .collect()
    }

    /// Starts `lb agent` on `node` (node name `node-N`, XDP on eth0, TC on `lbp-*`) reading
    /// the lab's manifest folder, and waits until it reports healthy.
    pub fn start_agent(&mut self, node: u8, extra: &[&str]) -> anyhow::Result<()> {
        let manifests = self.state.manifests.to_string_lossy().into_owned();
        let mut args = vec!["--manifests", manifests.as_str()];
        args.extend_from_slice(extra);
        self.launch_agent(node, &args)
    }

    /// Starts `lb agent` on `node` watching the API server of `kubeconfig`.
    pub fn start_agent_kube(&mut self, node: u8, kubeconfig: &Path) -> anyhow::Result<()> {
        let kc = kubeconfig.to_string_lossy().into_owned();
        self.launch_agent(node, &["--kubeconfig", kc.as_str()])
    }

    fn launch_agent(&mut self, node: u8, source_args: &[&str]) -> anyhow::Result<()> {
        let ns = self.node_ns(node);
        let pin_dir = self.state.bpffs.join(format!("node{node}"));
        let log_path = self.state.dir.join(format!("agent-node{node}.log"));
        let log = fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut cmd = in_ns(&ns, &[self.state.bins.lb.to_str().unwrap(), "agent"]);
        cmd.arg("--pin-dir")
            .arg(&pin_dir)
            .args(["--node-name", &format!("node-{node}"), "--xdp-iface", "eth0", "--tc-iface", "lbp-*"])
            .arg("--state-dir")
            .arg(self.state.dir.join(format!("state-node{node}")))
            .args(source_args);
        let child = cmd.stdout(log.try_clone()?).stderr(log).spawn().context("starting lb agent")?;
        let pid = child.id();
        self.children.insert(pid, child);
        self.state.agents.push(Agent { node, pid, log: log_path.clone(), pin_dir });
        self.save()?;
        // Loading takes 7-12 s on the lab's 2-CPU VM, more with `--node-hook tc` (a third big
        // program) and while other tests load theirs.
        wait_for(Duration::from_secs(60), || {
            if let Some(c) = self.children.get_mut(&pid)
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!("lb agent exited ({status}):\n{}", fs::read_to_string(&log_path).unwrap_or_default());
            }
            Ok(sh(&mut in_ns(&ns, &["curl", "-sf", "--max-time", "1", "http://127.0.0.1:10256/healthz"]))
                .is_ok())
        })
        .with_context(|| {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!("agent on node-{node} not healthy; the end of its log:\n{}", tail.join("\n"))
        })?;
        Ok(())
    }

    /// The network namespace of `node`.
    pub fn node_netns(&self, node: u8) -> String {
        self.node_ns(node)
    }

    /// Stops the agent of `node` (SIGTERM, then waits).
    pub fn stop_agent(&mut self, node: u8) {
        let pids: Vec<u32> = self.state.agents.iter().filter(|a| a.node == node).map(|a| a.pid).collect();
        for pid in pids {
            self.stop(pid);
        }
        self.state.agents.retain(|a| a.node != node);
        let _ = self.save();
    }

    pub fn agent_log(&self, node: u8) -> String {
        fs::read_to_string(self.state.dir.join(format!("agent-node{node}.log"))).unwrap_or_default()
    }

    /// Whether node `node`'s datapath has the TCP frontend `ip:port` (read from its pins).
    pub fn has_frontend(&self, node: u8, ip: IpAddr, port: u16) -> anyhow::Result<bool> {
        Ok(self.frontend(node, ip, port)?.is_some())
    }

    /// Node `node`'s TCP frontend entry for `ip:port`, if it has one (read from its pins).
    pub fn frontend(
        &self,
        node: u8,
        ip: IpAddr,
        port: u16,
    ) -> anyhow::Result<Option<lb_common::abi::ServiceValue>> {
        use lb_userspace::dataplane::{AyaDataplane, Dataplane as _};
        let key = lb_common::abi::ServiceKey::new(ip, port, lb_common::abi::PROTO_TCP);
        let dp = AyaDataplane::open(&self.pin_dir(node))?;
        Ok(dp.services()?.into_iter().find(|(k, _)| *k == key).map(|(_, v)| v))
    }

    /// Packets node `node`'s datapath counted for verdict reason `r` (`lb stats`), read from
    /// its pins.
    pub fn counted(&self, node: u8, r: lb_common::verdict::Reason) -> anyhow::Result<u64> {
        let dp = lb_userspace::dataplane::AyaDataplane::open(&self.pin_dir(node))?;
        Ok(dp.reason_counter(r)?.packets)
    }

    /// Node `node`'s agent's `/metrics` page.
    pub fn metrics(&self, node: u8) -> anyhow::Result<String> {
        metrics_in(&self.node_netns(node), 2)
    }

    /// The value of `series` (name and labels, as in the text) in a `/metrics` text.
    pub fn metric(metrics: &str, series: &str) -> Option<u64> {
        metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Whether node `node`'s datapath has backend `ip:port` (read from its pins).
    pub fn has_backend(&self, node: u8, ip: IpAddr, port: u16) -> anyhow::Result<bool> {
        use lb_userspace::dataplane::{AyaDataplane, Dataplane as _};
        let dp = AyaDataplane::open(&self.pin_dir(node))?;
        Ok(dp.backends()?.iter().any(|(_, b)| b.ip() == ip && b.port() == port))
    }

    pub fn pin_dir(&self, node: u8) -> PathBuf {
        self.state.bpffs.join(format!("node{node}"))
    }

    fn stop(&mut self, pid: u32) {
        // SAFETY: signalling a process we started (tracked by pid).
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        if let Some(mut c) = self.children.remove(&pid) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn save(&self) -> anyhow::Result<()> {
        fs::write(self.state.dir.join("state.json"), serde_json::to_string_pretty(&self.state)?)?;
        Ok(())
    }

    /// Removes everything; safe to call twice.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        let pids: Vec<u32> = self
            .state
            .agents
            .iter()
            .map(|a| a.pid)
            .chain(self.state.pods.iter().filter_map(|p| p.server))
            .collect();
        for pid in pids {
            self.stop(pid);
        }
        teardown_state(&self.state, false);
    }

    /// The standard lab: two nodes; on node-1 a client pod and backends `web-1`, `web-2`; on
    /// node-2 backend `web-3` and a client pod `client-2` (backends serve 9376 and 8080); Node objects written; agents
    /// running on both nodes.
    pub fn standard(bins: Bins) -> anyhow::Result<Lab> {
        let mut lab = Lab::standard_topology(bins)?;
        lab.write_manifest("nodes.yaml", &lab.node_manifests())?;
        lab.start_agent(1, &[])?;
        lab.start_agent(2, &[])?;
        Ok(lab)
    }

    /// The standard lab's namespaces and pods, without agents.
    pub fn standard_topology(bins: Bins) -> anyhow::Result<Lab> {
        let mut lab = Lab::up(2, bins)?;
        lab.add_pod(1, "client", 100, None)?;
        lab.add_pod(1, "web-1", 10, Some(&[POD_PORT, POD_PORT_ALT]))?;
        lab.add_pod(1, "web-2", 11, Some(&[POD_PORT, POD_PORT_ALT]))?;
        lab.add_pod(2, "web-3", 10, Some(&[POD_PORT, POD_PORT_ALT]))?;
        lab.add_pod(2, "client-2", 100, None)?;
        Ok(lab)
    }

    /// Loads a lab left by another process (for `lb-lab down|status`).
    pub fn load_all() -> Vec<State> {
        let Ok(dir) = fs::read_dir(STATE_ROOT) else { return Vec::new() };
        dir.flatten()
            .filter_map(|e| fs::read_to_string(e.path().join("state.json")).ok())
            .filter_map(|s| serde_json::from_str(&s).ok())
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Removes what `state` records. `kill`: also signal its processes (they are not our
/// children: another `lb-lab` started them; the pids come from its state file).
pub fn teardown_state(state: &State, kill: bool) {
    if kill {
        for pid in state.agents.iter().map(|a| a.pid).chain(state.pods.iter().filter_map(|p| p.server)) {
            // Only if the pid still runs one of the lab's binaries: pids get reused.
            // A binary rebuilt since shows as `PATH (deleted)`: still the lab's.
            let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            let exe = PathBuf::from(exe.to_string_lossy().trim_end_matches(" (deleted)"));
            if exe == state.bins.lb || exe == state.bins.serve {
                // SAFETY: plain kill of a process this lab started.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    for ns in state.namespaces.iter().rev() {
        let _ = ip(&format!("netns del {ns}"));
    }
    let _ = Command::new("umount").arg(&state.bpffs).output();
    // The agents' pin-dir lock files (they outlive the agents on purpose): those of every
    // pin dir under the lab's bpffs.
    let base = lb_userspace::bpffs::lock_path(&state.bpffs);
    if let (Some(dir), Some(stem)) = (base.parent(), base.file_stem().and_then(|s| s.to_str())) {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_name().to_str().is_some_and(|n| n.starts_with(stem)) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    let _ = fs::remove_dir_all(&state.dir);
}

static LAB_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Polls `f` until it returns true or `timeout` passes; an error from `f` ends the wait.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if f()? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `f` on a thread that joined network namespace `ns`: sockets it creates stay in that
/// namespace, whichever thread uses them later. This is how tests act as a pod's client.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    spawn_in_netns(ns, f)?.join().map_err(|_| anyhow::anyhow!("client thread panicked"))?
}

/// Starts `f` on a new thread that joined network namespace `ns`; join it for the result.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<T>>> {
    let file = fs::File::open(format!("/var/run/netns/{ns}")).with_context(|| format!("netns {ns}"))?;
    Ok(std::thread::spawn(move || {
        // SAFETY: setns on this (fresh, private) thread with a valid namespace fd.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(anyhow::anyhow!("setns: {}", std::io::Error::last_os_error()));
        }
        Ok(f())
    }))
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The server's reply: `(pod name, client address as the pod saw it)`.
    Reply(String, String),
    /// TCP RST or ICMP port unreachable.
    Refused,
    /// Nothing within the timeout (dropped).
    Timeout,
    Other(String),
}

impl Answer {
    pub fn pod(&self) -> Option<&str> {
        match self {
            Answer::Reply(p, _) => Some(p),
            _ => None,
        }
    }
}

fn parse_reply(s: &str) -> Answer {
    let mut it = s.split_whitespace();
    match (it.next(), it.next()) {
        (Some(p), Some(c)) => Answer::Reply(p.into(), c.into()),
        _ => Answer::Other(format!("unexpected reply {s:?}")),
    }
}

fn io_answer(e: std::io::Error) -> Answer {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset => Answer::Refused,
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Answer::Timeout,
        _ => Answer::Other(e.to_string()),
    }
}

/// One request on a new connection from this thread's namespace: connect, a line, the
/// answer line (`NAME CLIENT` from `lb-serve`), close.
pub fn request(to: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    use std::io::{BufRead as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&to, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"hello\n")?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line)?;
    Ok(line)
}

/// One TCP request (a line) from `ns` to `to`.
pub fn tcp_ask(ns: &str, to: SocketAddr, timeout: Duration) -> Answer {
    let r = in_netns(ns, move || request(to, timeout));
    match r {
        Ok(Ok(line)) => parse_reply(&line),
        Ok(Err(e)) => io_answer(e),
        Err(e) => Answer::Other(e.to_string()),
    }
}

/// One UDP request from `ns` to `to`, from source port `sport` (0: any).
pub fn udp_ask(ns: &str, to: SocketAddr, sport: u16, timeout: Duration) -> Answer {
    let r = in_netns(ns, move || -> std::io::Result<String> {
        let any: IpAddr =
            if to.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
        let s = std::net::UdpSocket::bind((any, sport))?;
        s.connect(to)?;
        s.set_read_timeout(Some(timeout))?;
        s.send(b"hello\n")?;
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    });
    match r {
        Ok(Ok(line)) => parse_reply(&line),
        Ok(Err(e)) => io_answer(e),
        Err(e) => Answer::Other(e.to_string()),
    }
}

/// `curl` from `ns`: the body, or the failure.
pub fn curl(ns: &str, url: &str) -> Answer {
    match in_ns(ns, &["curl", "-s", "-S", "--max-time", "2", url]).output() {
        Ok(o) if o.status.success() => {
            Answer::Reply(String::from_utf8_lossy(&o.stdout).trim().to_string(), String::new())
        }
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr).to_string();
            match o.status.code() {
                Some(7) => Answer::Refused,
                Some(28) => Answer::Timeout,
                _ => Answer::Other(err),
            }
        }
        Err(e) => Answer::Other(e.to_string()),
    }
}

/// An EndpointSlice for Service `service` with `ports` (`name`, port, protocol) and
/// endpoints given as `(pod, conditions)`, conditions in YAML flow form (`ready: true`).
pub fn slice_yaml(
    name: &str,
    service: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[(&Pod, &str)],
) -> String {
    family_slice_yaml(false, name, service, ports, endpoints)
}

/// `slice_yaml` with the pods' IPv6 addresses (`addressType: IPv6`): a dual-stack Service
/// has one slice per family.
pub fn slice_yaml6(
    name: &str,
    service: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[(&Pod, &str)],
) -> String {
    family_slice_yaml(true, name, service, ports, endpoints)
}

fn family_slice_yaml(
    v6: bool,
    name: &str,
    service: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[(&Pod, &str)],
) -> String {
    let ports: Vec<String> =
        ports.iter().map(|(n, p, proto)| format!("{{name: '{n}', port: {p}, protocol: {proto}}}")).collect();
    let address = |p: &Pod| if v6 { p.ip6.to_string() } else { p.ip.to_string() };
    let eps: Vec<String> = endpoints
        .iter()
        .map(|(p, c)| {
            format!("{{addresses: ['{}'], nodeName: node-{}, conditions: {{{c}}}}}", address(p), p.node)
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: {}\nports: [{}]\nendpoints: [{}]\n",
        if v6 { "IPv6" } else { "IPv4" },
        ports.join(", "),
        eps.join(", ")
    )
}

/// `ip:port` as a socket address.
pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}
