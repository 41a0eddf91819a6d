//! What the programs are attached to: XDP on the named interfaces, TC on every matching
//! one as links come and go, the egress program on both, and the connect-time programs on
//! the node's cgroup2 root.

use std::{collections::BTreeMap, net::IpAddr};

use aya::Ebpf;
use lb_common::abi::*;

use super::{AgentConfig, lock, log, state::Shared};
use crate::{
    addr_filter,
    attach::{self, Hook},
    conntrack_gc,
    dataplane::AyaDataplane,
    host_clients, links,
    reconcile::Applied,
    routes,
};

/// Lists in the address pre-filter every address the pinned maps name: frontends, backends
/// and both ends of every flow.
pub fn list_pinned_addresses(
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

/// The pod interfaces whose sources the TC program checks: every attached one, with its
/// bridge (or itself) and the addresses host routes send out of it (its pod's, with a
/// veth-per-pod CNI); none with `--pod-source-check off`.
pub fn pod_ports(cfg: &AgentConfig, tc_links: &BTreeMap<String, PodLink>) -> BTreeMap<u32, PodPort> {
    if !cfg.pod_source_check {
        return BTreeMap::new();
    }
    let all = links::interfaces();
    let routes = routes::host_routes();
    tc_links
        .iter()
        .map(|(name, (ifindex, ..))| {
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
pub fn log_pod_ports(ports: &BTreeMap<u32, PodPort>) {
    let known: usize = ports.values().map(|p| p.addrs.iter().filter(|a| **a != NO_ADDR).count()).sum();
    log(format!(
        "pod source check on {} interfaces, {known} pod addresses known from host routes",
        ports.len()
    ));
}

/// A pod interface's attachments: the TC program at ingress and, once attached, the egress
/// program.
pub type PodLink = (u32, attach::Holder, Option<attach::Holder>);

/// Attaches the TC program (and the egress one) to matching interfaces that appeared, and
/// forgets gone ones.
pub fn sync_links(
    ebpf: &mut Ebpf,
    cfg: &AgentConfig,
    patterns: &links::Patterns,
    tc_links: &mut BTreeMap<String, PodLink>,
    egress: bool,
    status: &Shared,
) {
    let want = patterns.select(&links::interfaces());
    let stale: Vec<String> =
        tc_links.iter().filter(|(n, (idx, ..))| want.get(*n) != Some(idx)).map(|(n, _)| n.clone()).collect();
    for name in stale {
        if let Some((_, holder, egress)) = tc_links.remove(&name) {
            holder.release();
            if let Some(egress) = egress {
                egress.release();
            }
        }
        let mut st = lock(status);
        st.tc.remove(&name);
        st.egress.remove(&name);
        drop(st);
        log(format!("TC detached from {name} (link gone)"));
    }
    for (name, idx) in want {
        if tc_links.contains_key(&name) {
            continue;
        }
        match attach::attach_pinned(ebpf, Hook::Tc, &name, &cfg.pin_dir, cfg.legacy_attach) {
            Ok((how, holder)) => {
                let _ = attach::accept_local(&name);
                let egress = if egress { attach_egress(ebpf, cfg, &name, status) } else { None };
                tc_links.insert(name.clone(), (idx, holder, egress));
                lock(status).tc.insert(name.clone(), (idx, how));
                log(format!("TC attached to {name} ({how:?})"));
            }
            // The link may have vanished between listing and attaching; the next scan decides.
            Err(e) => log(format!("warning: {e}")),
        }
    }
}

/// Whether an earlier agent attached the egress program: it stays on.
fn egress_pinned(cfg: &AgentConfig) -> bool {
    let Ok(dir) = std::fs::read_dir(cfg.pin_dir.join("links")) else { return false };
    dir.flatten().any(|e| e.file_name().to_string_lossy().starts_with("egress-"))
}

/// The egress program on `iface` (`lb_tc_egress`): replies the node's own stack sends for a
/// backend at one of its addresses. A failure costs only those: logged.
fn attach_egress(ebpf: &mut Ebpf, cfg: &AgentConfig, iface: &str, status: &Shared) -> Option<attach::Holder> {
    match attach::attach_pinned(ebpf, Hook::Egress, iface, &cfg.pin_dir, cfg.legacy_attach) {
        Ok((how, holder)) => {
            lock(status).egress.insert(iface.to_string(), how);
            Some(holder)
        }
        Err(e) => {
            log(format!(
                "warning: {e}; replies the node sends out of {iface} for a backend at its own address keep that address"
            ));
            None
        }
    }
}

/// Attaches the connect-time programs for the node's own clients (`host_clients`); returns
/// the network namespace cookie they act in and the cgroup2 hierarchy, or 0 (with a
/// warning) when they cannot run here: the packet path works without them.
pub fn attach_host_clients(
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

/// The datapath on node interface `iface`: XDP, or with `--node-hook tc` the TC program at
/// its ingress. What an earlier agent attached in the other way is taken off once this is in
/// (so the interface is never without one).
fn attach_node(
    ebpf: &mut Ebpf,
    cfg: &AgentConfig,
    iface: &str,
) -> Result<attach::Attached, attach::AttachError> {
    let (hook, other) = if cfg.node_tc { (Hook::NodeTc, Hook::Xdp) } else { (Hook::Xdp, Hook::NodeTc) };
    let (how, _holder) = attach::attach_pinned(ebpf, hook, iface, &cfg.pin_dir, cfg.legacy_attach)?;
    attach::detach(other, iface, &cfg.pin_dir);
    Ok(how)
}

/// Loads `lb_tc_node` for `--node-hook tc` (the agent loads it only then), saying how long
/// the verifier took and how much of its budget the program uses.
fn load_node_tc(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let started = std::time::Instant::now();
    crate::loader::load_node_tc(ebpf).context("--node-hook tc")?;
    let walked = crate::loader::verified_instructions(ebpf)
        .into_iter()
        .find_map(|(name, n)| (name == crate::loader::NODE_TC_PROGRAM).then_some(n)?)
        .map_or(String::new(), |n| {
            format!(", {n} instructions verified of {}", crate::loader::VERIFIER_BUDGET)
        });
    log(format!(
        "{} loaded for --node-hook tc in {:.1} s{walked}",
        crate::loader::NODE_TC_PROGRAM,
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Records node interface `iface`'s attachment for `lb status` (and, for XDP, `/metrics`).
fn note_node(status: &Shared, cfg: &AgentConfig, iface: &str, how: attach::Attached) {
    let mut st = lock(status);
    if cfg.node_tc {
        st.node_tc.insert(iface.to_string(), how)
    } else {
        st.xdp.insert(iface.to_string(), how)
    };
}

/// With host routing, the uplink program on every XDP interface: what XDP translated and
/// left to the stack goes on to its next hop from TC (`lb-ebpf/src/host_route.rs`). Without,
/// an earlier agent's is taken off. A failure costs only the shortcut: logged.
pub fn attach_uplinks(ebpf: &mut Ebpf, cfg: &AgentConfig, status: &Shared) {
    for iface in &cfg.xdp_ifaces {
        // With the TC program on the node interface, it routes what it translated itself.
        if !cfg.host_routing || cfg.node_tc {
            attach::detach(Hook::Uplink, iface, &cfg.pin_dir);
            continue;
        }
        match attach::attach_pinned(ebpf, Hook::Uplink, iface, &cfg.pin_dir, cfg.legacy_attach) {
            Ok((how, _holder)) => {
                lock(status).uplink.insert(iface.clone(), how);
            }
            Err(e) => log(format!(
                "warning: {e}; what XDP translates on {iface} takes the node's stack (no host routing)"
            )),
        }
    }
}

/// Pins left by an earlier agent for interfaces this one will not serve (gone, or no longer
/// named by the flags): removing them detaches those programs.
pub fn remove_stale_link_pins(cfg: &AgentConfig, tc: &links::Patterns) {
    let present = links::interfaces();
    let Ok(dir) = std::fs::read_dir(cfg.pin_dir.join("links")) else { return };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let keep = match name.split_once('-') {
            Some(("xdp", iface)) => !cfg.node_tc && cfg.xdp_ifaces.iter().any(|i| i == iface),
            Some(("nodetc", iface)) => cfg.node_tc && cfg.xdp_ifaces.iter().any(|i| i == iface),
            Some(("tc", iface)) => tc.matches(iface) && present.contains_key(iface),
            Some(("uplink", iface)) => {
                cfg.host_routing && !cfg.node_tc && cfg.xdp_ifaces.iter().any(|i| i == iface)
            }
            Some(("egress", iface)) => {
                cfg.xdp_ifaces.iter().any(|i| i == iface)
                    || (tc.matches(iface) && present.contains_key(iface))
            }
            Some(("sock", _)) => cfg.cgroup_root.is_some(),
            _ => true,
        };
        if !keep {
            let _ = std::fs::remove_file(entry.path());
            log(format!("removed stale link pin {name}"));
        }
    }
}

/// The programs' attachments the loop keeps up to date.
pub struct Attachments {
    pub ebpf: Ebpf,
    tc_patterns: links::Patterns,
    tc_links: BTreeMap<String, PodLink>,
    /// The pod ports the source check covers, as last written.
    checked: BTreeMap<u32, PodPort>,
    /// Set by netlink link events.
    links_changed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    last_scan: std::time::Instant,
    /// The network namespace cookie the connect-time programs act in (0: not attached).
    pub host_cookie: u64,
    /// The egress program is on (`enable_egress`).
    egress: bool,
}

impl Attachments {
    /// Attaches everything at start: XDP to `--xdp-iface`, the connect-time programs, TC to
    /// the matching links (and, with them, every program of this build is in), the egress
    /// program to both if an earlier agent had it on, then the pod source checks. Link events call `wake`.
    pub fn start(
        mut ebpf: Ebpf,
        cfg: &AgentConfig,
        dp: &mut AyaDataplane,
        status: &Shared,
        wake: impl Fn() + Send + 'static,
    ) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let tc_patterns = links::Patterns::new(&cfg.tc_ifaces).context("--tc-iface")?;
        let present = links::interfaces();
        if cfg.node_tc && !cfg.xdp_ifaces.is_empty() {
            load_node_tc(&mut ebpf)?;
        }
        for iface in &cfg.xdp_ifaces {
            let how = attach_node(&mut ebpf, cfg, iface)?;
            if let Err(e) = attach::accept_local(iface) {
                log(format!("warning: {iface}: cannot set accept_local ({e}); SNAT replies may be dropped"));
            }
            let hook = if cfg.node_tc { "TC (--node-hook tc)" } else { "XDP" };
            log(format!("{hook} attached to {iface} ({how:?})"));
            note_node(status, cfg, iface, how);
        }
        // Forwarding at XDP may send only out of our own XDP interfaces; without
        // --xdp-forward the map is emptied so a previous agent's ports do not linger.
        let tx_ports: Vec<u32> = if cfg.xdp_forward {
            cfg.xdp_ifaces.iter().filter_map(|i| present.get(i).copied()).collect()
        } else {
            vec![]
        };
        dp.set_xdp_tx_ports(&tx_ports)?;
        if cfg.xdp_forward {
            log(format!("XDP forwarding on, out of {}", cfg.xdp_ifaces.join(", ")));
        }
        attach_uplinks(&mut ebpf, cfg, status);
        if cfg.host_routing {
            log(
                "TC host routing on: translated pod traffic, and what XDP translated, goes straight to its next hop, past the node's netfilter",
            );
        }
        let links_changed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        if let Err(e) = links::watch(links_changed.clone(), wake) {
            log(format!("warning: no netlink link events ({e}); rescanning interfaces every second"));
        }
        let (host_cookie, sock_cgroup) = match cfg.cgroup_root.as_deref() {
            Some(root) => attach_host_clients(&mut ebpf, root, &cfg.pin_dir),
            None => (0, None),
        };
        lock(status).sock_cgroup = sock_cgroup;
        remove_stale_link_pins(cfg, &tc_patterns);
        let mut a = Attachments {
            ebpf,
            tc_patterns,
            tc_links: BTreeMap::new(),
            checked: BTreeMap::new(),
            links_changed,
            last_scan: std::time::Instant::now(),
            host_cookie,
            egress: false,
        };
        sync_links(&mut a.ebpf, cfg, &a.tc_patterns, &mut a.tc_links, false, status);
        if egress_pinned(cfg) {
            a.enable_egress(cfg, status, "an earlier agent had it on");
        }
        Ok(a)
    }

    /// After the datapath was loaded again (`growth`): every attachment moves to `ebpf`'s
    /// programs, each replaced atomically in its link, and the old object goes. An interface
    /// that cannot take the new program (gone meanwhile) is logged; the next scan decides.
    pub fn swap_in(&mut self, mut ebpf: Ebpf, cfg: &AgentConfig, status: &Shared) {
        for iface in &cfg.xdp_ifaces {
            match attach_node(&mut ebpf, cfg, iface) {
                Ok(how) => note_node(status, cfg, iface, how),
                Err(e) => log(format!("warning: {iface} keeps the old program: {e}")),
            }
            if self.egress {
                attach_egress(&mut ebpf, cfg, iface, status);
            }
        }
        attach_uplinks(&mut ebpf, cfg, status);
        if self.host_cookie != 0
            && let Some(root) = cfg.cgroup_root.as_deref()
        {
            self.host_cookie = attach_host_clients(&mut ebpf, root, &cfg.pin_dir).0;
        }
        for (name, (_, holder, egress)) in self.tc_links.iter_mut() {
            match attach::attach_pinned(&mut ebpf, Hook::Tc, name, &cfg.pin_dir, cfg.legacy_attach) {
                Ok((_, new)) => *holder = new,
                Err(e) => log(format!("warning: TC on {name} keeps the old program: {e}")),
            }
            if self.egress {
                *egress = attach_egress(&mut ebpf, cfg, name, status).or(egress.take());
            }
        }
        self.ebpf = ebpf;
    }

    /// Whether the egress program is on.
    pub fn egress_on(&self) -> bool {
        self.egress
    }

    /// Puts the egress program on every node and pod interface, once a backend is at one of
    /// the node's own addresses (a hostNetwork pod): its replies leave the node's own stack,
    /// past every ingress hook. Off until then, so other nodes' packets never run it. It
    /// stays on (and the next agent keeps it) while flows to such a backend may be open.
    /// `why` goes to the log.
    pub fn enable_egress(&mut self, cfg: &AgentConfig, status: &Shared, why: &str) {
        if self.egress {
            return;
        }
        self.egress = true;
        for iface in &cfg.xdp_ifaces {
            attach_egress(&mut self.ebpf, cfg, iface, status);
        }
        for (name, (_, _, egress)) in self.tc_links.iter_mut() {
            *egress = attach_egress(&mut self.ebpf, cfg, name, status);
        }
        log(format!(
            "{} attached at TC egress of {} interfaces: {why}",
            crate::loader::EGRESS_PROGRAM,
            lock(status).egress.len()
        ));
    }

    /// Writes the pod source checks for the attached links (at start, after a migration).
    pub fn check_pod_sources(&mut self, cfg: &AgentConfig, dp: &mut AyaDataplane) -> anyhow::Result<()> {
        self.checked = pod_ports(cfg, &self.tc_links);
        dp.set_pod_ports(&self.checked)?;
        log_pod_ports(&self.checked);
        Ok(())
    }

    /// After a link event, or a second after the last scan: attaches TC to new matching
    /// links, forgets gone ones, and updates the pod source checks.
    pub fn rescan(&mut self, cfg: &AgentConfig, dp: &mut AyaDataplane, status: &Shared) {
        use std::sync::atomic::Ordering;
        let event = self.links_changed.swap(false, Ordering::AcqRel);
        if !event && self.last_scan.elapsed() < std::time::Duration::from_secs(1) {
            return;
        }
        self.last_scan = std::time::Instant::now();
        sync_links(&mut self.ebpf, cfg, &self.tc_patterns, &mut self.tc_links, self.egress, status);
        let want = pod_ports(cfg, &self.tc_links);
        if want != self.checked {
            match dp.set_pod_ports(&want) {
                Ok(()) => log_pod_ports(&want),
                Err(e) => log(format!("warning: pod source checks not updated: {e}")),
            }
            self.checked = want;
        }
    }
}
