//! `lb agent` flags. Names follow kube-proxy's where one exists, so an operator's muscle
//! memory carries over.

use std::{net::SocketAddr, path::PathBuf};

use clap::Args;
use lb_common::abi::CtTimeouts;
use lb_userspace::{
    agent::{
        AgentConfig, Algorithm, NoBackendResponse,
        growth::{Growable, MapSize},
    },
    attach::Legacy,
    loader::BpfLog,
    loader::Capacities,
    logging::LogFormat,
    model::NodePortAddresses,
};

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Folder of Service, EndpointSlice and Node manifests (YAML or JSON, multi-document).
    /// Changes are live within a second; a broken file is reported and its last good
    /// content stays applied.
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig of the cluster to watch. Without it and without `--manifests`: `KUBECONFIG`,
    /// `~/.kube/config`, or the in-cluster service account (the DaemonSet case).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name: endpoints with this `nodeName` are local (externalTrafficPolicy and
    /// internalTrafficPolicy Local), and the Node of this name gives the NodePort addresses.
    #[arg(long, default_value_t = hostname())]
    pub node_name: String,
    /// Node interface for the XDP program (NodePort, LoadBalancer IPs, externalIPs, replies
    /// from remote backends). Native mode, generic fallback reported. Repeatable.
    #[arg(long = "xdp-iface", value_name = "IFACE")]
    pub xdp_ifaces: Vec<String>,
    /// Forward translated packets at XDP: after the rewrite, a FIB lookup picks the next
    /// hop, and the packet leaves by XDP_TX or a redirect to another `--xdp-iface` without
    /// entering the node's stack (no netfilter on the way). Packets the FIB cannot resolve
    /// yet (no neighbour entry, local, MTU) still go up the stack.
    #[arg(long)]
    pub xdp_forward: bool,
    /// Where the node interfaces (`--xdp-iface`) run the datapath: `xdp`, before the node's
    /// stack allocates anything; or `tc`, the TC program pod interfaces run, plus XDP's
    /// "fragmentation needed" answer (`lb_tc_node`, loaded only then, which adds a few
    /// seconds to the start), at their ingress instead. `tc` is for interfaces without native
    /// XDP, where generic XDP copies and linearizes large packets, and for veth node
    /// interfaces (kind and other Docker-based nodes), where XDP receives every TCP segment a
    /// local socket sent only after copying it. With `tc` there is no `--xdp-forward`, and
    /// unanswerable traffic costs an skb before it is dropped.
    #[arg(long, value_enum, default_value_t = NodeHook::Xdp)]
    pub node_hook: NodeHook,
    /// TC host routing (on; `--host-routing=false` turns it off): a packet the TC program
    /// translated (a pod's request to a Service, a local backend's reply) goes straight to
    /// its next hop: into a local backend pod with `bpf_redirect_peer`, to a remote one out
    /// of the FIB's egress interface with `bpf_redirect_neigh`. So does what the XDP program
    /// translated for a local pod (a remote backend's reply to a pod client, an outside
    /// client's request to a local backend), from a small TC program on the XDP interfaces
    /// (what XDP translated for a next hop outside the node takes the stack, which applies
    /// the route's MTU, or `--xdp-forward`).
    /// Such packets skip the node's routing, netfilter (no iptables rule or conntrack entry
    /// sees them) and qdisc. Packets the FIB cannot resolve (no route, a local address, over
    /// the MTU) take the stack, counted as `host-route-to-stack` in `lb stats`.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_value_t = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub host_routing: bool,
    /// Pod-facing interface name or glob (`lxc*`) for the TC program (ClusterIP for pods,
    /// replies from local backends). Globs follow links as they appear. Repeatable. Once a
    /// backend is at one of the node's own addresses (hostNetwork pods), these and the
    /// `--xdp-iface` interfaces also run the egress program: the replies the node's own
    /// stack sends for it leave with the Service's address.
    #[arg(long = "tc-iface", value_name = "IFACE|GLOB")]
    pub tc_ifaces: Vec<String>,
    /// Check that a packet from a pod interface which would create or change flow state
    /// comes from an address the node routes back to that interface (or to the bridge it
    /// belongs to): `strict`; or `off`, for networks where pods send from addresses routed
    /// elsewhere.
    #[arg(long, value_enum, default_value_t = SourceCheck::Strict)]
    pub pod_source_check: SourceCheck,
    /// Attach these hooks the way kernels without bpf_link XDP (before 5.9) or tcx (before
    /// 6.6) need, which the agent otherwise picks only on such kernels: `xdp` through
    /// netlink, `tc` as a clsact filter. For testing that path on a newer kernel; both
    /// outlive the agent like the default modes. Comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "xdp,tc")]
    pub netlink_attach: Vec<NetlinkHook>,
    /// The cgroup2 hierarchy where connect-time programs serve clients on the node itself
    /// (its shell, daemons and hostNetwork pods), as kube-proxy's `nat OUTPUT` chain does: a
    /// TCP connect or UDP send from the agent's network namespace to a frontend is pointed at
    /// a backend, `getpeername` and replies show the Service address, no endpoint fails with
    /// ECONNREFUSED. Other namespaces (pods) are left to the packet path. On a hybrid cgroup
    /// host the default finds the cgroup2 mount (`/sys/fs/cgroup/unified`). `off`: none.
    #[arg(long, default_value = lb_userspace::host_clients::DEFAULT_CGROUP_ROOT, value_name = "PATH|off")]
    pub cgroup_root: PathBuf,
    /// Node addresses that serve NodePorts: `primary` (the node's first address of each
    /// family) or a comma-separated CIDR list.
    #[arg(long, default_value = "primary", value_name = "CIDR,..|primary")]
    pub nodeport_addresses: NodePortAddresses,
    /// Log lines as `text` (`[uptime] message`) or `json` (one object per line: `timestamp`,
    /// `level`, `message`, `uptime_s`, and a sync's counts). `RUST_LOG` filters (default
    /// `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The datapath's own messages (why a packet was dropped or refused), read into this
    /// log with target `bpf`: `warn` (failed map writes), `info` (and capacities met: flow
    /// table full, no source-NAT port), `debug` (and every drop and refusal). Set at load:
    /// `off` leaves no message code in the programs, so it costs nothing.
    #[arg(long, value_enum, default_value_t = BpfLog::Off, value_name = "LEVEL")]
    pub bpf_log: BpfLog,
    /// Set from the global `--pin-dir`.
    #[arg(skip)]
    pub pin_dir: PathBuf,
    /// Detach every program of ours from this node's interfaces (pinned XDP and tcx links,
    /// netlink XDP, our clsact filter), remove the pin dir with its maps, and exit
    /// (kube-proxy's flag). Refused while an agent runs on the pin dir; finding nothing to
    /// remove is fine. Run it after stopping the DaemonSet to take the datapath out.
    #[arg(long)]
    pub cleanup: bool,
    /// Prometheus metrics (`/metrics`).
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: SocketAddr,
    /// `/healthz` and `/livez`.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: SocketAddr,
    /// `/healthz` answers 503 once changes have waited this long for a successful sync
    /// (syncs failing, or the loop stuck); `/livez` once the sync loop has not turned for
    /// this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration_secs, value_name = "DURATION")]
    pub healthz_stale_after: u32,
    /// How new flows pick a backend.
    #[arg(long, value_enum, default_value_t = Algorithm::Maglev)]
    pub lb_algorithm: Algorithm,
    /// What a frontend with no endpoint answers.
    #[arg(long, value_enum, default_value_t = NoBackendResponse::Reject)]
    pub no_backend_response: NoBackendResponse,
    /// How long an established TCP flow may stay idle (kube-proxy's flag; `24h0m0s`, `90s`).
    #[arg(long, default_value = "24h", value_parser = parse_duration_secs, value_name = "DURATION")]
    pub conntrack_tcp_timeout_established: u32,
    /// How long a TCP flow may stay idle once one side has sent FIN (kube-proxy's flag).
    #[arg(long, default_value = "1h", value_parser = parse_duration_secs, value_name = "DURATION")]
    pub conntrack_tcp_timeout_close_wait: u32,
    /// How long a TCP handshake (SYN seen, not yet acknowledged by the client) is kept.
    #[arg(long, default_value = "60s", value_parser = parse_duration_secs, value_name = "DURATION")]
    pub conntrack_tcp_timeout_syn: u32,
    /// How long a TCP flow is kept after FINs both ways (its source port may be reused by a
    /// new flow at once anyway).
    #[arg(long, default_value = "10s", value_parser = parse_duration_secs, value_name = "DURATION")]
    pub conntrack_tcp_timeout_time_wait: u32,
    /// How long a UDP flow that never got a reply may stay idle (kube-proxy's flag).
    #[arg(long, default_value = "30s", value_parser = parse_duration_secs, value_name = "DURATION")]
    pub conntrack_udp_timeout: u32,
    /// How long a UDP flow with replies may stay idle (kube-proxy's flag).
    #[arg(long, default_value = "120s", value_parser = parse_duration_secs, value_name = "DURATION")]
    pub conntrack_udp_timeout_stream: u32,
    /// How often the flow table is swept for closed and idle flows (sooner when it is more
    /// than half full).
    #[arg(long, default_value = "10s", value_parser = parse_duration_secs, value_name = "DURATION")]
    pub conntrack_gc_interval: u32,
    /// Source ports for source-NATed flows (NodePort to remote pods, hairpin) and port
    /// clashes, `FROM-TO`. Keep it outside the node's ephemeral range
    /// (`net.ipv4.ip_local_port_range`, 32768-60999 by default).
    #[arg(long, default_value = "61000-65535", value_parser = parse_port_range, value_name = "FROM-TO")]
    pub snat_port_range: (u16, u16),
    /// TCP RSTs and ICMP port-unreachables the datapath may send per second (node total,
    /// shared out per CPU), like the kernel's `icmp_msgs_per_sec`: spoofed sources cannot
    /// make it a reflector. Answers over it are dropped (`answer_rate_limited`). 0: no limit.
    #[arg(long, default_value_t = 1000, value_name = "PER_SECOND")]
    pub answer_rate: u32,
    /// Answers that may go at once above the rate (node total), like `icmp_msgs_burst`.
    #[arg(long, default_value_t = 50)]
    pub answer_burst: u32,
    /// Flow-table entries (forward and reply count separately). Changing it on a running node
    /// migrates the table (no flow lost).
    #[arg(long, default_value_t = Capacities::default().flows)]
    pub max_flows: u32,
    /// Frontend entries (VIP, port, protocol).
    #[arg(long, default_value_t = Capacities::default().frontends)]
    pub max_frontends: u32,
    /// Datapath service ids (one per Service port and protocol).
    #[arg(long, default_value_t = Capacities::default().services)]
    pub max_services: u32,
    /// Backend ids (distinct endpoint ip:port): `N`, or `auto` (262144 to start, doubled
    /// or more whenever Services do not fit, up to 4194304; a grown size is kept across
    /// restarts), or `auto:N` (the same from N). Growing loads the datapath again into
    /// larger maps: seconds, no flow lost.
    #[arg(long, default_value = "auto", value_parser = parse_backends, value_name = "N|auto|auto:N")]
    pub max_backends: MapSize,
    /// Maglev lookup slots shared by all services (4 bytes each; a service of N backends
    /// takes the smallest prime >= 100 x N: 401 slots, 1.6 KB, for 4 backends): `N`, or
    /// `auto` (8388608 to start, about 20 000 such services, grown like `--max-backends`
    /// up to 268435456), or `auto:N`.
    #[arg(long, default_value = "auto", value_parser = parse_maglev_slots, value_name = "N|auto|auto:N")]
    pub max_maglev_slots: MapSize,
    /// `loadBalancerSourceRanges` entries over all services.
    #[arg(long, default_value_t = Capacities::default().source_ranges)]
    pub max_source_ranges: u32,
    /// `sessionAffinity: ClientIP` entries (client, service).
    #[arg(long, default_value_t = Capacities::default().affinity)]
    pub max_affinity: u32,
    /// (service, backend) memberships.
    #[arg(long, default_value_t = Capacities::default().members)]
    pub max_members: u32,
    /// Where the agent keeps state that is not in maps: with `--manifests`, each file's last
    /// good content (`manifests/`), so a restart while a file is broken still serves it. One
    /// per agent, like `--pin-dir`.
    #[arg(long, default_value = "/var/lib/lb", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// kube-proxy's configuration file (`KubeProxyConfiguration`, or the `kube-proxy`
    /// ConfigMap holding it as `config.conf`): its bind addresses, `nodePortAddresses`,
    /// `hostnameOverride`, `clientConnection.kubeconfig`, `conntrack` timeouts,
    /// `configSyncPeriod` and the modes' `minSyncPeriod` become the flags they stand for; a
    /// flag given here wins. Fields without an equivalent are logged once, by name.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// How often everything is re-planned against what the kernel holds, besides the
    /// changes the source reports (kube-proxy's flag; `0` turns it off).
    #[arg(long, default_value = "15m", value_parser = parse_sync_period, value_name = "DURATION")]
    pub config_sync_period: u32,
    /// kube-proxy's floor between syncs: changes that arrive sooner wait and go in one sync
    /// (`1s`, `250ms`). Off by default: a change after a quiet spell is synced at once, and
    /// under a stream of changes each sync takes all that arrived while the last one ran.
    #[arg(long, default_value = "0s", value_parser = parse_min_sync_period, value_name = "DURATION")]
    pub min_sync_period: std::time::Duration,
    /// What `--config` did, for the log (set by `main`).
    #[arg(skip)]
    pub config_note: Option<String>,
}

fn parse_backends(s: &str) -> Result<MapSize, String> {
    MapSize::parse(s, Capacities::default().backends)
}

fn parse_maglev_slots(s: &str) -> Result<MapSize, String> {
    MapSize::parse(s, Capacities::default().maglev_slots)
}

/// Whether `s` is a zero duration (`0`, `0s`, `0h0m0s`): kube-proxy's "not set".
pub fn is_zero_duration(s: &str) -> bool {
    s.trim_end_matches(|c: char| c.is_ascii_alphabetic() || c == '0').is_empty()
}

/// `--config-sync-period`: a duration, or 0 (off).
fn parse_sync_period(s: &str) -> Result<u32, String> {
    if is_zero_duration(s) {
        return Ok(0);
    }
    parse_duration_secs(s)
}

/// A Go-style duration as kube-proxy takes it (`24h0m0s`, `1h`, `90s`, `500ms` rounds up to
/// a second), or plain seconds; in whole seconds, at least one.
pub fn parse_duration_secs(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse::<u32>() {
        return if n > 0 { Ok(n) } else { Err("must be at least 1s".into()) };
    }
    let secs = go_duration_ms(s)?.div_ceil(1000);
    match u32::try_from(secs) {
        Ok(0) => Err("must be at least 1s".into()),
        Ok(v) => Ok(v),
        Err(_) => Err(format!("{s:?}: too long")),
    }
}

/// `--min-sync-period`: a Go-style duration (`1s`, `250ms`, `0s`: off) or plain seconds.
fn parse_min_sync_period(s: &str) -> Result<std::time::Duration, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(n));
    }
    let ms = go_duration_ms(s)?;
    if ms > 60_000 {
        return Err(format!("{s:?}: at most a minute (changes would wait that long)"));
    }
    Ok(std::time::Duration::from_millis(ms))
}

/// A Go-style duration (`24h0m0s`, `90s`, `250ms`) in milliseconds.
fn go_duration_ms(s: &str) -> Result<u64, String> {
    let mut total_ms: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let n: u64 =
            rest[..digits].parse().map_err(|_| format!("{s:?}: expected a duration like 24h0m0s or 90s"))?;
        rest = &rest[digits..];
        let unit = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let ms = match &rest[..unit] {
            "h" => 3_600_000,
            "m" => 60_000,
            "s" => 1_000,
            "ms" => 1,
            u => return Err(format!("{s:?}: unknown unit {u:?} (h, m, s, ms)")),
        };
        total_ms = total_ms.saturating_add(n.saturating_mul(ms));
        rest = &rest[unit..];
    }
    Ok(total_ms)
}

/// `FROM-TO`, inclusive, FROM <= TO, FROM >= 1024.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?}: expected FROM-TO, like 61000-65535"))?;
    let port = |p: &str| p.trim().parse::<u16>().map_err(|_| format!("{s:?}: {p:?} is not a port"));
    let (from, to) = (port(a)?, port(b)?);
    if from < 1024 || from > to {
        return Err(format!("{s:?}: need 1024 <= FROM <= TO"));
    }
    Ok((from, to))
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|b| *b == 0).unwrap_or(0);
    if ok { String::from_utf8_lossy(&buf[..end]).into_owned() } else { String::new() }
}

/// `--pod-source-check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceCheck {
    Strict,
    Off,
}

/// `--node-hook`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NodeHook {
    Xdp,
    Tc,
}

/// A hook `--netlink-attach` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetlinkHook {
    Xdp,
    Tc,
}

impl AgentArgs {
    pub fn config(self) -> AgentConfig {
        AgentConfig {
            manifests: self.manifests,
            kubeconfig: self.kubeconfig,
            node_name: self.node_name,
            xdp_ifaces: self.xdp_ifaces,
            xdp_forward: self.xdp_forward,
            node_tc: self.node_hook == NodeHook::Tc,
            host_routing: self.host_routing,
            tc_ifaces: self.tc_ifaces,
            pod_source_check: self.pod_source_check == SourceCheck::Strict,
            legacy_attach: Legacy {
                netlink_xdp: self.netlink_attach.contains(&NetlinkHook::Xdp),
                clsact: self.netlink_attach.contains(&NetlinkHook::Tc),
            },
            nodeport_addresses: self.nodeport_addresses,
            cgroup_root: (self.cgroup_root.as_os_str() != "off").then_some(self.cgroup_root),
            pin_dir: self.pin_dir,
            metrics_bind: self.metrics_bind_address,
            healthz_bind: self.healthz_bind_address,
            algorithm: self.lb_algorithm,
            no_backend: self.no_backend_response,
            capacities: Capacities {
                frontends: self.max_frontends,
                services: self.max_services,
                backends: self.max_backends.size(),
                maglev_slots: self.max_maglev_slots.size(),
                flows: self.max_flows,
                source_ranges: self.max_source_ranges,
                affinity: self.max_affinity,
                members: self.max_members,
                ..Capacities::default()
            },
            growable: Growable {
                backends: self.max_backends.grows(),
                maglev_slots: self.max_maglev_slots.grows(),
            },
            timeouts: CtTimeouts {
                tcp_syn: self.conntrack_tcp_timeout_syn,
                tcp_established: self.conntrack_tcp_timeout_established,
                tcp_close_wait: self.conntrack_tcp_timeout_close_wait,
                tcp_time_wait: self.conntrack_tcp_timeout_time_wait,
                tcp_close: CtTimeouts::DEFAULT.tcp_close,
                udp: self.conntrack_udp_timeout,
                udp_stream: self.conntrack_udp_timeout_stream,
                _pad: 0,
            },
            gc_interval: std::time::Duration::from_secs(self.conntrack_gc_interval.into()),
            snat_ports: self.snat_port_range,
            state_dir: self.state_dir,
            log_format: self.log_format,
            bpf_log: self.bpf_log,
            min_sync_period: self.min_sync_period,
            config_sync_period: (self.config_sync_period > 0)
                .then(|| std::time::Duration::from_secs(self.config_sync_period.into())),
            config_note: self.config_note,
            healthz_stale_after: std::time::Duration::from_secs(self.healthz_stale_after.into()),
            answer_limit: (self.answer_rate, self.answer_burst),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kube_proxy_flags() {
        assert_eq!(parse_duration_secs("24h0m0s"), Ok(86_400));
        assert_eq!(parse_duration_secs("1h"), Ok(3_600));
        assert_eq!(parse_duration_secs("1m30s"), Ok(90));
        assert_eq!(parse_duration_secs("45"), Ok(45));
        assert_eq!(parse_duration_secs("500ms"), Ok(1));
        assert!(parse_duration_secs("0s").is_err());
        assert!(parse_duration_secs("10d").is_err());
        assert!(parse_duration_secs("h").is_err());
    }

    #[test]
    fn min_sync_periods_take_milliseconds() {
        use std::time::Duration;
        assert_eq!(parse_min_sync_period("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_min_sync_period("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_min_sync_period("1s500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_min_sync_period("2"), Ok(Duration::from_secs(2)));
        assert!(parse_min_sync_period("2m").is_err(), "over a minute");
        assert!(parse_min_sync_period("fast").is_err());
    }

    #[test]
    fn port_ranges_are_checked() {
        assert_eq!(parse_port_range("61000-65535"), Ok((61000, 65535)));
        assert!(parse_port_range("65535-61000").is_err());
        assert!(parse_port_range("80-90").is_err());
        assert!(parse_port_range("61000").is_err());
    }
}
