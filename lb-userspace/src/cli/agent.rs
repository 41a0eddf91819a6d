//! `lb agent` flags. Names follow kube-proxy's where one exists, so an operator's muscle
//! memory carries over.

use std::{net::SocketAddr, path::PathBuf};

use clap::Args;
use lb_userspace::{
    agent::{AgentConfig, Algorithm, NoBackendResponse},
    loader::Capacities,
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
    /// Pod-facing interface name or glob (`lxc*`) for the TC program (ClusterIP for pods,
    /// replies from local backends). Globs follow links as they appear. Repeatable.
    #[arg(long = "tc-iface", value_name = "IFACE|GLOB")]
    pub tc_ifaces: Vec<String>,
    /// Node addresses that serve NodePorts: `primary` (the node's first address of each
    /// family) or a comma-separated CIDR list.
    #[arg(long, default_value = "primary", value_name = "CIDR,..|primary")]
    pub nodeport_addresses: NodePortAddresses,
    /// Set from the global `--pin-dir`.
    #[arg(skip)]
    pub pin_dir: PathBuf,
    /// Prometheus metrics (`/metrics`).
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: SocketAddr,
    /// `/healthz` and `/livez`.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: SocketAddr,
    /// How new flows pick a backend.
    #[arg(long, value_enum, default_value_t = Algorithm::Maglev)]
    pub lb_algorithm: Algorithm,
    /// What a frontend with no endpoint answers.
    #[arg(long, value_enum, default_value_t = NoBackendResponse::Reject)]
    pub no_backend_response: NoBackendResponse,
    /// Flow-table entries (forward and reply count separately).
    #[arg(long, default_value_t = Capacities::default().flows)]
    pub max_flows: u32,
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|b| *b == 0).unwrap_or(0);
    if ok { String::from_utf8_lossy(&buf[..end]).into_owned() } else { String::new() }
}

impl AgentArgs {
    pub fn config(self) -> AgentConfig {
        AgentConfig {
            manifests: self.manifests,
            kubeconfig: self.kubeconfig,
            node_name: self.node_name,
            xdp_ifaces: self.xdp_ifaces,
            xdp_forward: self.xdp_forward,
            tc_ifaces: self.tc_ifaces,
            nodeport_addresses: self.nodeport_addresses,
            pin_dir: self.pin_dir,
            metrics_bind: self.metrics_bind_address,
            healthz_bind: self.healthz_bind_address,
            algorithm: self.lb_algorithm,
            no_backend: self.no_backend_response,
            capacities: Capacities { flows: self.max_flows, ..Capacities::default() },
        }
    }
}
