//! The Model: a pure function from Kubernetes objects (Services, EndpointSlices, Nodes) to the
//! desired datapath state. Every Service semantic of DESIGN.md §5 lives here; the sources
//! (manifest folder, kube watchers) only collect objects and say which changed, and the
//! reconciler only diffs. `desired` computes everything; `ModelState` keeps the result and
//! recomputes only the Services a `Changes` touches, with the same rules (and the same result:
//! tested), returning a `Delta` for the reconciler.
//!
//! A Service port becomes up to three datapath *services* (one Maglev table each), one per
//! scope, because the scopes can have different backend sets:
//! * `Cluster`: clusterIPs (`internalTrafficPolicy` applies);
//! * `External`: every node address at the nodePort, and externalIPs (`externalTrafficPolicy`);
//! * `LoadBalancer`: `status.loadBalancer.ingress[].ip` (ETP, and `loadBalancerSourceRanges`,
//!   which kube-proxy applies to load-balancer IPs only: a nodePort bypasses them).
//!
//! Each is further split by IP family (dual-stack): frontends of one family only get
//! endpoints of EndpointSlices of the same family.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;

use crate::{
    fast_hash,
    objects::{Service, ServicePort, ServiceType, Skipped, Slice},
    refcount::bump,
    sorted_set::SortedSet,
    sorted_vec, topology,
};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label that names the controller managing a slice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// Its value on slices mirrored from a hand-written Endpoints object.
pub const MIRROR_CONTROLLER: &str = "endpointslicemirroring-controller.k8s.io";

/// A Service with this label belongs to another proxy.
pub const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// A namespace or an object's name, shared: the sources' indexes, the Model's and every
/// `ServiceRef` of a Service hold the one allocation its source made (100 000 Services are
/// otherwise a dozen copies of each name).
pub type Name = Arc<str>;

/// An object's key in `Cluster`: `(namespace, name)`; Nodes `("", name)`.
pub type Key = (Name, Name);

/// Everything the sources have seen, keyed by `(namespace, name)`: Services and slices in the
/// agent's own compact form (`objects`). Objects are shared (`Arc`): a source that keeps
/// them elsewhere too (the manifest folder, per file) holds each once, and a copy of the
/// cluster copies no object.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    pub services: BTreeMap<Key, Arc<Service>>,
    pub slices: BTreeMap<Key, Arc<Slice>>,
    /// Nodes are cluster-scoped: keyed by `("", name)`.
    pub nodes: BTreeMap<Key, Arc<Node>>,
}

impl Cluster {
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(&(Name::from(""), Name::from(name))).map(|n| &**n)
    }
}

/// Which node addresses serve NodePorts (`--nodeport-addresses`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// The node's primary address of each family (kube-proxy's default since 1.31).
    Primary,
    /// Every node address inside one of these ranges.
    Cidrs(Vec<IpNet>),
}

impl std::str::FromStr for NodePortAddresses {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "primary" {
            return Ok(Self::Primary);
        }
        s.split(',')
            .map(|c| c.trim().parse::<IpNet>().map_err(|e| format!("{c:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()
            .map(Self::Cidrs)
    }
}

/// This node, as the Model needs it.
#[derive(Debug, Clone)]
pub struct NodeContext {
    pub name: String,
    pub nodeport_addresses: NodePortAddresses,
    /// Addresses to use when no `Node` object for `name` is known (the agent's interfaces),
    /// primary first.
    pub fallback_addresses: Vec<IpAddr>,
}

impl NodeContext {
    /// The node's addresses, primary first: the Node object's InternalIPs then ExternalIPs,
    /// else the fallback.
    pub fn addresses(&self, cluster: &Cluster) -> Vec<IpAddr> {
        let from_node: Vec<IpAddr> = cluster
            .node(&self.name)
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.addresses.as_ref())
            .map(|addrs| {
                let mut v: Vec<(u8, IpAddr)> = addrs
                    .iter()
                    .filter_map(|a| {
                        let rank = match a.type_.as_str() {
                            "InternalIP" => 0,
                            "ExternalIP" => 1,
                            _ => return None,
                        };
                        a.address.parse().ok().map(|ip| (rank, ip))
                    })
                    .collect();
                v.sort_by_key(|(rank, _)| *rank);
                v.into_iter().map(|(_, ip)| ip).collect()
            })
            .unwrap_or_default();
        if from_node.is_empty() { self.fallback_addresses.clone() } else { from_node }
    }

    /// This node's zone: its Node's `topology.kubernetes.io/zone` label.
    pub fn zone(&self, cluster: &Cluster) -> Option<String> {
        cluster.node(&self.name)?.metadata.labels.as_ref()?.get(topology::ZONE_LABEL).cloned()
    }

    /// The addresses that serve NodePorts on this node.
    pub fn nodeport_ips(&self, cluster: &Cluster) -> Vec<IpAddr> {
        let all = self.addresses(cluster);
        match &self.nodeport_addresses {
            NodePortAddresses::Primary => {
                let v4 = all.iter().find(|a| a.is_ipv4());
                let v6 = all.iter().find(|a| a.is_ipv6());
                v4.into_iter().chain(v6).copied().collect()
            }
            NodePortAddresses::Cidrs(cidrs) => {
                all.into_iter().filter(|a| cidrs.iter().any(|c| c.contains(a))).collect()
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Cluster,
    External,
    LoadBalancer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }
}

/// Identifies one datapath service: a Service port in one scope and family.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    pub namespace: Name,
    pub name: Name,
    pub port_name: Name,
    pub proto: u8,
    pub scope: Scope,
    pub family: Family,
}

impl std::fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        let scope = match self.scope {
            Scope::Cluster => "cluster",
            Scope::External => "external",
            Scope::LoadBalancer => "loadbalancer",
        };
        write!(f, "/{}/{scope}", lb_common::abi::proto_name(self.proto))
    }
}

/// One endpoint as a backend: where to send, and what the datapath must know about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
    pub local: bool,
    pub terminating: bool,
}

/// What a frontend does when it has no usable backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoBackend {
    /// TCP RST / ICMP port unreachable, like kube-proxy's REJECT.
    Reject,
    /// Silently dropped (ETP/ITP=Local with no local endpoint).
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    /// `(ip, port)`; the protocol is the ServiceRef's.
    pub frontends: SortedSet<(IpAddr, u16)>,
    /// Backends new flows may pick.
    pub backends: SortedSet<Backend>,
    /// Serving but terminating endpoints not picked for new flows: they stay known to the
    /// datapath so their existing flows (UDP too) continue.
    pub kept: SortedSet<Backend>,
    pub affinity_timeout: Option<u32>,
    pub no_backend: NoBackend,
    /// Empty: any source.
    pub source_ranges: Vec<IpNet>,
    /// Frontends reached from outside the cluster: traffic to remote backends is source-NATed.
    pub external: bool,
}

/// The `healthCheckNodePort` answer of an ETP=Local Service: 200 with local ready endpoints,
/// 503 without, so load balancers send traffic only to nodes that can serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: String,
    pub local_endpoints: usize,
}

/// The desired datapath state, plus what the agent should report about the input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub services: BTreeMap<ServiceRef, DesiredService>,
    /// VIPs (clusterIPs) whose unserved ports are rejected, like kube-proxy does.
    pub cluster_vips: BTreeSet<IpAddr>,
    /// Node addresses that serve NodePorts.
    pub node_ips: Vec<IpAddr>,
    /// This node's zone (`topology.kubernetes.io/zone`), for topology hints.
    pub node_zone: Option<String>,
    /// `healthCheckNodePort` -> the service and its ready local endpoints (ETP=Local).
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// What to tell the operator about Services, by Service (or port): those skipped and why
    /// (ExternalName, headless, another proxy's, a frontend another Service owns), and
    /// warnings (a port name no slice has, a family without slices).
    pub notes: Vec<(String, String)>,
}

/// Why a Service is not ours to proxy, if it is not and the operator should be told.
fn ignored(svc: &Service) -> Option<&'static str> {
    match svc.skipped {
        Some(Skipped::Because(why)) => Some(why),
        _ => None,
    }
}

/// The Model: `(cluster objects, this node) -> desired state`.
pub fn desired(cluster: &Cluster, node: &NodeContext) -> Desired {
    let mut out =
        Desired { node_ips: node.nodeport_ips(cluster), node_zone: node.zone(cluster), ..Default::default() };
    // Slices by the Service they belong to.
    let mut slices: BTreeMap<(&str, &str), Vec<&Slice>> = BTreeMap::new();
    for ((ns, _), s) in &cluster.slices {
        if let Some(svc) = s.service.as_deref() {
            slices.entry((&**ns, svc)).or_default().push(s);
        }
    }
    // Every Service first (their frontend claims all known), then each one settled.
    let mut claims = Claims::default();
    let mut each = Vec::new();
    let here = Here { node, node_ips: &out.node_ips, zone: out.node_zone.as_deref() };
    for ((ns, name), svc) in &cluster.services {
        let mut one = Part::default();
        if let Some(why) = ignored(svc) {
            one.notes.push((format!("{ns}/{name}"), format!("skipped: {why}")));
        } else if svc.skipped.is_none() {
            let svc_slices = slices.get(&(&**ns, &**name)).map(Vec::as_slice).unwrap_or(&[]);
            service(&mut one, &here, ns, name, svc, svc_slices);
            claims.add(svc, &one.services);
            out.cluster_vips.extend(svc.cluster_ips.iter().copied());
        }
        each.push(one);
    }
    for mut one in each {
        claims.settle(&mut one.services, &mut one.notes);
        out.services.extend(one.services);
        out.health_checks.append(&mut one.health_checks);
        out.notes.append(&mut one.notes);
    }
    out
}

/// What one Service adds to the desired state, computed on its own (its frontend claims
/// not settled yet). Its datapath services in a `Vec`: a Service has a handful, and a
/// B-tree of them per Service cost a 2 KB node each at a full sync.
#[derive(Debug, Default)]
struct Part {
    services: Vec<(ServiceRef, DesiredService)>,
    health_checks: BTreeMap<u16, HealthCheck>,
    notes: Vec<(String, String)>,
}

/// Where the Model computes: this node, its NodePort addresses and its zone.
struct Here<'a> {
    node: &'a NodeContext,
    node_ips: &'a [IpAddr],
    zone: Option<&'a str>,
}

/// A frontend: address, port, protocol.
type Frontend = (IpAddr, u16, u8);

/// Who claims a frontend, in the order of precedence: the oldest Service (creationTimestamp;
/// one without comes after those with), then namespace/name and port name — as the API
/// server's allocator would have had it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    no_timestamp: bool,
    timestamp: jiff::Timestamp,
    sref: ServiceRef,
}

impl Claim {
    fn of(&self, key: &Key) -> bool {
        self.sref.namespace == key.0 && self.sref.name == key.1
    }
}

/// A frontend's claims in order: the first inline (nearly always the only one: 100 000
/// frontends of one claim each are no allocation each), the others, in a conflict, in a
/// sorted `Vec`.
#[derive(Debug, PartialEq, Eq)]
struct Claimants {
    first: Claim,
    rest: Vec<Claim>,
}

impl Claimants {
    fn insert(&mut self, c: Claim) {
        if c < self.first {
            let was_first = std::mem::replace(&mut self.first, c);
            sorted_vec::insert(&mut self.rest, was_first);
        } else if c != self.first {
            sorted_vec::insert(&mut self.rest, c);
        }
    }

    /// Keeps the claims `keep` holds; false when none is left.
    fn retain(&mut self, keep: impl Fn(&Claim) -> bool) -> bool {
        self.rest.retain(&keep);
        if !keep(&self.first) {
            if self.rest.is_empty() {
                return false;
            }
            self.first = self.rest.remove(0);
        }
        true
    }

    fn contested(&self) -> bool {
        !self.rest.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = &Claim> {
        std::iter::once(&self.first).chain(&self.rest)
    }
}

/// Every frontend's claimants. Two Services (or two ports of one) that claim the same
/// frontend do not take it from each other: the first claim has it, the others are notes
/// for it and reported, and removing or changing one of them never touches the frontend of
/// the one that has it.
#[derive(Debug, Default)]
struct Claims {
    by_frontend: fast_hash::Map<Frontend, Claimants>,
    /// Frontends with more than one claim.
    contested: usize,
}

impl Claims {
    fn reserve(&mut self, frontends: usize) {
        self.by_frontend.reserve(frontends);
    }

    fn claims(svc: &Service, services: &[(ServiceRef, DesiredService)]) -> Vec<(Frontend, Claim)> {
        let mut out = Vec::new();
        for (r, v) in services {
            let claim = Claim {
                no_timestamp: svc.created.is_none(),
                timestamp: svc.created.unwrap_or(jiff::Timestamp::UNIX_EPOCH),
                sref: r.clone(),
            };
            out.extend(v.frontends.iter().map(|(ip, port)| ((*ip, *port, r.proto), claim.clone())));
        }
        out
    }

    /// Registers `svc`'s claims (its datapath services as computed); returns the frontends
    /// claimed.
    fn add(&mut self, svc: &Service, services: &[(ServiceRef, DesiredService)]) -> Vec<Frontend> {
        let claims = Self::claims(svc, services);
        let frontends = claims.iter().map(|(fe, _)| *fe).collect();
        for (fe, c) in claims {
            match self.by_frontend.entry(fe) {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    let was = e.get().contested();
                    e.get_mut().insert(c);
                    self.contested += usize::from(!was && e.get().contested());
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(Claimants { first: c, rest: Vec::new() });
                }
            }
        }
        frontends
    }

    /// Drops Service `key`'s claims on `frontends`.
    fn remove(&mut self, key: &Key, frontends: &[Frontend]) {
        for fe in frontends {
            if let Some(set) = self.by_frontend.get_mut(fe) {
                let was = set.contested();
                let left = set.retain(|c| !c.of(key));
                self.contested -= usize::from(was && !(left && set.contested()));
                if !left {
                    self.by_frontend.remove(fe);
                }
            }
        }
    }

    /// Keeps in `services` only the frontends each one has first claim on; notes the others
    /// in `notes`. A datapath service left without a frontend goes.
    fn settle(&self, services: &mut Vec<(ServiceRef, DesiredService)>, notes: &mut Vec<(String, String)>) {
        // Nearly always no frontend has two claims: nothing to look up.
        for (r, v) in services.iter_mut().filter(|_| self.contested > 0) {
            let uncontested = |(ip, port): &(IpAddr, u16)| {
                self.by_frontend
                    .get(&(*ip, *port, r.proto))
                    .is_none_or(|c| !c.contested() || c.first.sref == *r)
            };
            if v.frontends.iter().all(uncontested) {
                continue;
            }
            v.frontends.retain(|(ip, port)| {
                let Some(first) = self.by_frontend.get(&(*ip, *port, r.proto)).map(|s| &s.first) else {
                    return true;
                };
                if first.sref == *r {
                    return true;
                }
                let w = &first.sref;
                notes.push((
                    format!("{}/{}:{}", r.namespace, r.name, r.port_name),
                    format!(
                        "skipped: frontend {}:{port}/{} is already {}/{}:{}'s (claimed first: older, or first by name); not programmed for this one",
                        fmt_ip(*ip),
                        lb_common::abi::proto_name(r.proto),
                        w.namespace,
                        w.name,
                        w.port_name
                    ),
                ));
                false
            });
        }
        services.retain(|(_, v)| !v.frontends.is_empty());
    }

    /// The Services claiming any of `frontends`.
    fn claimants(&self, frontends: impl Iterator<Item = Frontend>) -> BTreeSet<Key> {
        frontends
            .filter_map(|fe| self.by_frontend.get(&fe))
            .flat_map(Claimants::iter)
            .map(|c| (c.sref.namespace.clone(), c.sref.name.clone()))
            .collect()
    }

    /// Frontends with more than one claimant.
    pub fn contested(&self) -> usize {
        self.contested
    }
}

fn fmt_ip(ip: IpAddr) -> String {
    if ip.is_ipv6() { format!("[{ip}]") } else { ip.to_string() }
}

fn service(out: &mut Part, here: &Here, ns: &Name, name: &Name, svc: &Service, slices: &[&Slice]) {
    let node = here.node;
    // Mirrored slices count only for a Service without a selector: those are the only ones
    // the mirroring controller mirrors.
    let slices: Vec<&Slice> = slices.iter().copied().filter(|s| !(svc.selected && s.mirrored)).collect();
    let slices = slices.as_slice();
    let lb_ips: &[IpAddr] =
        if svc.service_type == ServiceType::LoadBalancer { &svc.ingress_ips } else { &[] };
    let nodeport_ips = if svc.service_type == ServiceType::ClusterIp { &[] } else { here.node_ips };
    if let Some(port) = svc.health_check_node_port
        && svc.service_type == ServiceType::LoadBalancer
        && svc.external_local
    {
        let local: BTreeSet<IpAddr> = slices
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .filter(|ep| ep.on_node(&node.name) && ep.ready)
            .filter_map(|ep| ep.address)
            .collect();
        out.health_checks
            .insert(port, HealthCheck { service: format!("{ns}/{name}"), local_endpoints: local.len() });
    }

    warn_about_slices(&mut out.notes, ns, name, svc, slices);
    // Nearly always one datapath service a port (one scope, one family): one allocation.
    out.services.reserve_exact(svc.ports.len());
    for port in svc.ports.iter() {
        let Some(proto) = port.protocol.number() else {
            out.notes.push((format!("{ns}/{name}:{}", port.port), "skipped: protocol not supported".into()));
            continue;
        };
        let Ok(svc_port) = u16::try_from(port.port) else { continue };
        let mut scopes: Vec<(Scope, Vec<(IpAddr, u16)>)> = vec![
            (Scope::Cluster, svc.cluster_ips.iter().map(|ip| (*ip, svc_port)).collect()),
            (
                Scope::External,
                svc.external_ips
                    .iter()
                    .map(|ip| (*ip, svc_port))
                    .chain(
                        port.node_port
                            .into_iter()
                            .flat_map(|np| nodeport_ips.iter().map(move |ip| (*ip, np))),
                    )
                    .collect(),
            ),
            (Scope::LoadBalancer, lb_ips.iter().map(|ip| (*ip, svc_port)).collect()),
        ];
        scopes.retain(|(_, f)| !f.is_empty());
        for (scope, frontends) in scopes {
            let local_only = if scope == Scope::Cluster { svc.internal_local } else { svc.external_local };
            for family in [Family::V4, Family::V6] {
                let frontends: SortedSet<(IpAddr, u16)> =
                    frontends.iter().filter(|(ip, _)| Family::of(ip) == family).copied().collect();
                if frontends.is_empty() {
                    continue;
                }
                let zone = here.zone;
                let (backends, kept) = endpoints(node, zone, port, proto, family, slices, local_only);
                let key = ServiceRef {
                    namespace: ns.clone(),
                    name: name.clone(),
                    port_name: port.name.clone(),
                    proto,
                    scope,
                    family,
                };
                let value = DesiredService {
                    frontends,
                    backends,
                    kept,
                    affinity_timeout: svc.affinity_timeout,
                    no_backend: if local_only { NoBackend::Drop } else { NoBackend::Reject },
                    source_ranges: if scope == Scope::LoadBalancer {
                        svc.source_ranges
                            .iter()
                            .filter(|r| Family::of(&r.addr()) == family)
                            .copied()
                            .collect()
                    } else {
                        Vec::new()
                    },
                    external: scope != Scope::Cluster,
                };
                // (A port listed twice counts once, its last time, as in a map.)
                match out.services.iter_mut().find(|(r, _)| *r == key) {
                    Some(had) => had.1 = value,
                    None => out.services.push((key, value)),
                }
            }
        }
    }
}

/// Notes what leaves a Service without endpoints although it has slices, which kube-proxy
/// users otherwise find only by a failing request: a port name (and protocol) no slice port
/// has, and a ClusterIP family no slice has.
fn warn_about_slices(
    notes: &mut Vec<(String, String)>,
    ns: &str,
    name: &str,
    svc: &Service,
    slices: &[&Slice],
) {
    if slices.is_empty() {
        return;
    }
    for family in [Family::V4, Family::V6] {
        let label = match family {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        };
        if let Some(ip) = svc.cluster_ips.iter().find(|ip| Family::of(ip) == family)
            && !slices.iter().any(|s| s.family == Some(family))
        {
            notes.push((
                format!("{ns}/{name}"),
                format!("warning: {label} clusterIP {ip} but no {label} EndpointSlice; it has no endpoints in that family"),
            ));
        }
    }
    let slice_ports: Vec<_> = slices.iter().flat_map(|s| s.ports.iter()).collect();
    if slice_ports.is_empty() {
        return;
    }
    for port in svc.ports.iter() {
        let matched = slice_ports.iter().any(|p| *p.name == *port.name && p.protocol == port.protocol);
        if !matched {
            let want = &port.name;
            notes.push((
                format!(
                    "{ns}/{name}:{}",
                    if want.is_empty() { port.port.to_string() } else { want.to_string() }
                ),
                format!(
                    "warning: no EndpointSlice port is named {want:?} ({}); this port has no endpoints",
                    port.protocol.as_str()
                ),
            ));
        }
    }
}

/// The endpoints of one Service port: `(for new flows, kept for existing flows)`.
/// Ports come from each slice's own `ports`, matched by name and protocol; readiness follows
/// KEP-1669: ready endpoints if any, else serving+terminating ones.
fn endpoints(
    node: &NodeContext,
    zone: Option<&str>,
    port: &ServicePort,
    proto: u8,
    family: Family,
    slices: &[&Slice],
    local_only: bool,
) -> (SortedSet<Backend>, SortedSet<Backend>) {
    let mut ready = Vec::with_capacity(slices.iter().map(|s| s.endpoints.len()).sum());
    let mut serving_terminating = Vec::new();
    for slice in slices.iter().filter(|s| s.family == Some(family)) {
        let Some(target) = slice.ports.iter().find_map(|p| {
            if *p.name == *port.name && p.protocol.number() == Some(proto) { p.port } else { None }
        }) else {
            continue;
        };
        for ep in slice.endpoints.iter() {
            let local = ep.on_node(&node.name);
            if local_only && !local {
                continue;
            }
            let Some(ip) = ep.address else { continue };
            if Family::of(&ip) != family {
                continue;
            }
            let be = (Backend { ip, port: target, local, terminating: ep.terminating }, ep.hints());
            if ep.ready {
                ready.push(be);
            } else if ep.serving && ep.terminating {
                serving_terminating.push(be);
            }
        }
    }
    // Topology hints narrow what is reached cluster-wide, never the local endpoints.
    let mode = if local_only {
        topology::Mode::All
    } else {
        topology::mode(ready.iter().map(|(_, h)| *h), &node.name, zone)
    };
    let usable = |list: &[(Backend, &topology::Hints)]| -> SortedSet<Backend> {
        list.iter().filter(|(_, h)| topology::available(mode, h, &node.name, zone)).map(|(b, _)| *b).collect()
    };
    let all = |list: &[(Backend, &topology::Hints)]| -> SortedSet<Backend> {
        list.iter().map(|(b, _)| *b).collect()
    };
    let ready_here = usable(&ready);
    if ready_here.is_empty() {
        (usable(&serving_terminating), SortedSet::default())
    } else {
        (ready_here, all(&serving_terminating))
    }
}

/// Which objects changed since the last sync, as keys into `Cluster`. The sources collect
/// them so a sync recomputes only the Services a change touches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Anything may have changed (first sync, a relist, this node's Node): start over.
    pub all: bool,
    pub services: BTreeSet<Key>,
    pub slices: BTreeSet<Key>,
}

impl Changes {
    pub fn everything() -> Self {
        Changes { all: true, ..Default::default() }
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.services.is_empty() && self.slices.is_empty()
    }

    /// Adds `other`'s changes to these.
    pub fn merge(&mut self, other: Changes) {
        self.all |= other.all;
        self.services.extend(other.services);
        self.slices.extend(other.slices);
    }
}

/// What one update of the Model changed: the datapath services whose desired value changed,
/// each with its value before (None: new), and the cluster VIPs that came and went. `all`:
/// recomputed from scratch, so everything may differ (the reconciler plans in full).
#[derive(Debug, Clone, Default)]
pub struct Delta {
    pub all: bool,
    pub services: BTreeMap<ServiceRef, Option<DesiredService>>,
    pub vips_added: BTreeSet<IpAddr>,
    pub vips_removed: BTreeSet<IpAddr>,
    /// Endpoints (`ip:port`) no datapath service uses any more.
    pub backends_gone: BTreeSet<(IpAddr, u16)>,
}

/// The Model kept between syncs. `update` recomputes only the Services named by the changes
/// (and those whose EndpointSlices changed), so a one-endpoint change costs the same at 10
/// or 100 000 Services; its result always equals `desired(cluster, node)` (tested).
#[derive(Debug, Default)]
pub struct ModelState {
    desired: Desired,
    /// The frontends claimed and cluster VIPs held by each Service we proxy, and the
    /// health-check ports and notes of those that have some (its datapath services are
    /// found in `desired`: `refs_of`).
    held: BTreeMap<Key, Held>,
    vip_users: fast_hash::Map<IpAddr, u32>,
    health_ports: BTreeMap<Key, Vec<u16>>,
    notes: BTreeMap<Key, Vec<(String, String)>>,
    /// EndpointSlice → its Service (by the service-name label), and the reverse.
    slice_owner: BTreeMap<Key, Key>,
    slices_of: BTreeMap<Key, Vec<Key>>,
    /// Datapath services using each endpoint (`backends` or `kept`).
    backend_users: fast_hash::Map<(IpAddr, u16), u32>,
    /// Who claims each frontend.
    claims: Claims,
    /// Within one update: VIPs whose first event was an add (absent before the update).
    vips_born: BTreeSet<IpAddr>,
    ready: bool,
}

/// What a Service we proxy holds: the frontends it claims, and its cluster VIPs.
#[derive(Debug, Default, PartialEq, Eq)]
struct Held {
    claims: Vec<Frontend>,
    vips: Vec<IpAddr>,
}

/// The distinct endpoints a datapath service uses.
fn addrs(s: &DesiredService) -> Vec<(IpAddr, u16)> {
    let mut v: Vec<_> = s.backends.iter().chain(&s.kept).map(|b| (b.ip, b.port)).collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn owner(key: &Key, slice: &Slice) -> Option<Key> {
    Some((key.0.clone(), slice.service.clone()?))
}

/// The slice indexes (`slice_owner`, `slices_of`) of the slices by owner (`owned`, sorted).
fn slice_indexes(owned: &[(Key, &Key, &Slice)]) -> (BTreeMap<Key, Key>, BTreeMap<Key, Vec<Key>>) {
    let slice_owner = owned.iter().map(|(svc, slice, _)| ((*slice).clone(), svc.clone())).collect();
    let mut slices_of: Vec<(Key, Vec<Key>)> = Vec::new();
    for (svc, slice, _) in owned {
        match slices_of.last_mut() {
            Some((last, keys)) if last == svc => keys.push((*slice).clone()),
            _ => slices_of.push((svc.clone(), vec![(*slice).clone()])),
        }
    }
    (slice_owner, slices_of.into_iter().collect())
}

/// The users of each cluster VIP (as `count_vips` counts them a Service at a time), and the
/// set of those VIPs.
fn vip_usage(services: &[(&Key, &Service)]) -> (fast_hash::Map<IpAddr, u32>, BTreeSet<IpAddr>) {
    let mut users = fast_hash::Map::default();
    users.reserve(services.len());
    for (_, svc) in services {
        for ip in &svc.cluster_ips {
            bump(&mut users, *ip, true);
        }
    }
    let mut vips: Vec<IpAddr> = users.keys().copied().collect();
    vips.sort_unstable();
    (users, vips.into_iter().collect())
}

/// The users of each endpoint, as `count_endpoints` counts them a datapath service at a time
/// (one left without a frontend counts for nothing: `Claims::settle` drops it).
fn endpoint_usage(parts: &[Part]) -> fast_hash::Map<(IpAddr, u16), u32> {
    let services = parts.iter().flat_map(|one| &one.services).filter(|(_, v)| !v.frontends.is_empty());
    let mut users = fast_hash::Map::default();
    users.reserve(services.clone().map(|(_, v)| v.backends.len() + v.kept.len()).sum());
    for (_, v) in services {
        for a in addrs(v) {
            bump(&mut users, a, true);
        }
    }
    users
}

/// What one Service contributes, computed on its own.
enum Computed {
    Part(Part),
    /// Not ours to proxy, with a note for the operator.
    Noted((String, String)),
    /// Not ours to proxy, nothing to say (the source noted it already).
    Skipped,
}

/// Service `key`'s datapath services, health checks and notes as computed on their own
/// (before frontend claims are settled).
fn compute_part(here: &Here, key: &Key, svc: &Service, slices: &[&Slice]) -> Computed {
    let (ns, name) = key;
    if let Some(why) = ignored(svc) {
        return Computed::Noted((format!("{ns}/{name}"), format!("skipped: {why}")));
    }
    if svc.skipped.is_some() {
        return Computed::Skipped;
    }
    let mut out = Part::default();
    service(&mut out, here, ns, name, svc, slices);
    Computed::Part(out)
}

/// What a scoped thread returned; its panic, if it panicked.
fn join<T>(thread: std::thread::ScopedJoinHandle<'_, T>) -> T {
    thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

impl ModelState {
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Brings the desired state up to date with `cluster` after `changes`.
    pub fn update(&mut self, cluster: &Cluster, node: &NodeContext, changes: &Changes) -> Delta {
        let node_ips = node.nodeport_ips(cluster);
        if changes.all
            || !self.ready
            || node_ips != self.desired.node_ips
            || node.zone(cluster) != self.desired.node_zone
        {
            return self.rebuild(cluster, node);
        }
        // The Services to recompute: those changed, and the owners (before and after) of
        // changed slices.
        let mut dirty: BTreeSet<Key> = changes.services.clone();
        for key in &changes.slices {
            if let Some(old) = self.slice_owner.remove(key) {
                if let Some(set) = self.slices_of.get_mut(&old) {
                    sorted_vec::remove(set, key);
                }
                dirty.insert(old);
            }
            if let Some(new) = cluster.slices.get(key).and_then(|s| owner(key, s)) {
                self.slice_owner.insert(key.clone(), new.clone());
                sorted_vec::insert(self.slices_of.entry(new.clone()).or_default(), key.clone());
                dirty.insert(new);
            }
        }
        let mut delta = Delta::default();
        let mut contested: BTreeSet<Frontend> = BTreeSet::new();
        for key in &dirty {
            contested.extend(self.forget(key, &mut delta));
            if let Some(svc) = cluster.services.get(key) {
                self.compute(cluster, node, key, svc, Some(&mut delta));
                contested.extend(self.held.get(key).into_iter().flat_map(|h| &h.claims).copied());
            }
        }
        // Whoever else claims a frontend these Services had or have may have won or lost it:
        // settled again (their own claims do not change, so one round is enough).
        for key in self.claims.claimants(contested.into_iter()) {
            self.forget(&key, &mut delta);
            if let Some(svc) = cluster.services.get(&key) {
                self.compute(cluster, node, &key, svc, Some(&mut delta));
            }
        }
        // A service that changed back and forth within one update is no change.
        delta.services.retain(|r, old| self.desired.services.get(r) != old.as_ref());
        // A VIP may go and come back within one update (a Service recomputed twice): what
        // counts is whether it was there before and is there now.
        let touched: Vec<IpAddr> = delta.vips_added.union(&delta.vips_removed).copied().collect();
        delta.vips_added.clear();
        delta.vips_removed.clear();
        for ip in touched {
            match (!self.vips_born.contains(&ip), self.desired.cluster_vips.contains(&ip)) {
                (false, true) => delta.vips_added.insert(ip),
                (true, false) => delta.vips_removed.insert(ip),
                _ => false,
            };
        }
        self.vips_born.clear();
        let users = &self.backend_users;
        delta.backends_gone.retain(|a| !users.contains_key(a));
        self.desired.notes = self.notes.values().flatten().cloned().collect();
        delta
    }

    /// Recomputes everything (and the indexes) from `cluster`: as `desired` does, every
    /// Service first (so every frontend claim is known), then each one settled; the ordered
    /// maps are built at the end from sorted runs (a full sync of 100 000 Services: one
    /// B-tree insert each took most of the Model's time).
    fn rebuild(&mut self, cluster: &Cluster, node: &NodeContext) -> Delta {
        *self = ModelState { ready: true, ..Default::default() };
        self.desired.node_ips = node.nodeport_ips(cluster);
        self.desired.node_zone = node.zone(cluster);
        // Slices by the Service they belong to, sorted by Service then slice: walked beside
        // the Services (sorted too), no lookup per Service.
        let mut owned: Vec<(Key, &Key, &Slice)> = cluster
            .slices
            .iter()
            .filter_map(|(key, slice)| Some((owner(key, slice)?, key, &**slice)))
            .collect();
        owned.sort_unstable_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        // The slice indexes serve later updates only: built on another CPU meanwhile (a
        // sixth of the Model's time at 100 000 Services, on one CPU).
        std::thread::scope(|scope| {
            let indexes = scope.spawn(|| slice_indexes(&owned));
            let delta = self.rebuild_services(cluster, node, &owned);
            (self.slice_owner, self.slices_of) = join(indexes);
            delta
        })
    }

    /// `rebuild`'s Services, from the slices by owner (`owned`, sorted).
    fn rebuild_services(
        &mut self,
        cluster: &Cluster,
        node: &NodeContext,
        owned: &[(Key, &Key, &Slice)],
    ) -> Delta {
        let here = Here { node, node_ips: &self.desired.node_ips, zone: self.desired.node_zone.as_deref() };
        let (mut kept, mut parts) = (Vec::with_capacity(cluster.services.len()), Vec::new());
        let mut next = 0;
        for (key, svc) in &cluster.services {
            // The slices of Services before this one (none exists) are passed over.
            while owned.get(next).is_some_and(|(owner, _, _)| owner < key) {
                next += 1;
            }
            let from = next;
            while owned.get(next).is_some_and(|(owner, _, _)| owner == key) {
                next += 1;
            }
            let slices: Vec<&Slice> = owned[from..next].iter().map(|(_, _, s)| *s).collect();
            match compute_part(&here, key, svc, &slices) {
                Computed::Part(one) => {
                    kept.push((key, &**svc));
                    parts.push(one);
                }
                Computed::Noted(note) => {
                    self.notes.insert(key.clone(), vec![note]);
                }
                Computed::Skipped => {}
            }
        }
        // Sized ahead (a Service has a frontend at least): growing this table rehashed and
        // copied it several times at 100 000 Services.
        self.claims.reserve(kept.len());
        // Every frontend claimed, then the users of each VIP counted, while another CPU counts
        // the users of each endpoint (a cache miss each: a third of the rest on one CPU), as
        // if no frontend were contested: nearly always so, and counted again below otherwise.
        let (claims, endpoint_users) = std::thread::scope(|scope| {
            let endpoint_users = scope.spawn(|| endpoint_usage(&parts));
            let claims: Vec<Vec<Frontend>> =
                kept.iter().zip(&parts).map(|((_, svc), one)| self.claims.add(svc, &one.services)).collect();
            (self.vip_users, self.desired.cluster_vips) = vip_usage(&kept);
            (claims, join(endpoint_users))
        });
        let recount = self.claims.contested() > 0;
        if !recount {
            self.backend_users = endpoint_users;
        }
        let datapath_services = parts.iter().map(|one| one.services.len()).sum();
        let mut services = Vec::with_capacity(datapath_services);
        let mut held = Vec::with_capacity(kept.len());
        for (((key, svc), mut one), claims) in kept.into_iter().zip(parts).zip(claims) {
            self.claims.settle(&mut one.services, &mut one.notes);
            held.push((key.clone(), Held { claims, vips: svc.cluster_ips.to_vec() }));
            for (r, v) in self.keep_checks_and_notes(key, one) {
                if recount {
                    self.count_endpoints(&v);
                }
                services.push((r, v));
            }
        }
        // Sorted runs (Services in key order, and a ServiceRef sorts by its Service first):
        // built in one pass each, the two at once.
        std::thread::scope(|scope| {
            let held = scope.spawn(|| held.into_iter().collect());
            self.desired.services = services.into_iter().collect();
            self.held = join(held);
        });
        self.desired.notes = self.notes.values().flatten().cloned().collect();
        Delta { all: true, ..Default::default() }
    }

    /// Frontends claimed by more than one Service (or port) now.
    pub fn contested_frontends(&self) -> usize {
        self.claims.contested()
    }

    /// Whether a datapath service uses endpoint `addr` (as a backend or kept).
    pub fn uses_backend(&self, addr: &(IpAddr, u16)) -> bool {
        self.backend_users.contains_key(addr)
    }

    /// How many endpoints datapath services use (as backends or kept).
    pub fn backends_in_use(&self) -> usize {
        self.backend_users.len()
    }

    /// The datapath services of Service `key`: they sort together (`ServiceRef` orders by
    /// namespace and name first), so no index of them is kept.
    fn refs_of(&self, key: &Key) -> Vec<ServiceRef> {
        let first = ServiceRef {
            namespace: key.0.clone(),
            name: key.1.clone(),
            port_name: Name::from(""),
            proto: 0,
            scope: Scope::Cluster,
            family: Family::V4,
        };
        let refs = self.desired.services.range(first..).map(|(r, _)| r);
        refs.take_while(|r| r.namespace == key.0 && r.name == key.1).cloned().collect()
    }

    /// Removes what Service `key` contributed; returns the frontends it claimed.
    fn forget(&mut self, key: &Key, delta: &mut Delta) -> Vec<Frontend> {
        let Held { claims, vips } = self.held.remove(key).unwrap_or_default();
        self.claims.remove(key, &claims);
        for r in self.refs_of(key) {
            let old = self.desired.services.remove(&r);
            for a in old.iter().flat_map(addrs) {
                if bump(&mut self.backend_users, a, false) == 0 {
                    delta.backends_gone.insert(a);
                }
            }
            delta.services.entry(r).or_insert(old);
        }
        for ip in vips {
            if bump(&mut self.vip_users, ip, false) == 0 {
                self.desired.cluster_vips.remove(&ip);
                delta.vips_removed.insert(ip);
            }
        }
        for port in self.health_ports.remove(key).unwrap_or_default() {
            self.desired.health_checks.remove(&port);
        }
        self.notes.remove(key);
        claims
    }

    /// Service `key`'s datapath services, health checks and notes as computed on their own
    /// (before frontend claims are settled); None when it is not ours to proxy (one the
    /// operator should hear of leaves its note).
    fn computed(&mut self, node: &NodeContext, key: &Key, svc: &Service, slices: &[&Slice]) -> Option<Part> {
        let here = Here { node, node_ips: &self.desired.node_ips, zone: self.desired.node_zone.as_deref() };
        match compute_part(&here, key, svc, slices) {
            Computed::Part(out) => Some(out),
            Computed::Noted(note) => {
                self.notes.insert(key.clone(), vec![note]);
                None
            }
            Computed::Skipped => None,
        }
    }

    /// One more user of each of `vips`; a VIP that had none is desired now (and noted in
    /// `delta`, if any).
    fn count_vips(&mut self, vips: &[IpAddr], mut delta: Option<&mut Delta>) {
        for ip in vips {
            if bump(&mut self.vip_users, *ip, true) == 1 {
                self.desired.cluster_vips.insert(*ip);
                if let Some(d) = delta.as_deref_mut() {
                    if !d.vips_removed.contains(ip) && !d.vips_added.contains(ip) {
                        self.vips_born.insert(*ip);
                    }
                    d.vips_added.insert(*ip);
                }
            }
        }
    }

    /// One more user of each endpoint datapath service `v` uses.
    fn count_endpoints(&mut self, v: &DesiredService) {
        for a in addrs(v) {
            bump(&mut self.backend_users, a, true);
        }
    }

    /// Keeps Service `key`'s health checks and notes (few: inserted one by one) from its
    /// settled `part`; returns its datapath services.
    fn keep_checks_and_notes(&mut self, key: &Key, mut part: Part) -> Vec<(ServiceRef, DesiredService)> {
        if !part.health_checks.is_empty() {
            self.health_ports.insert(key.clone(), part.health_checks.keys().copied().collect());
            self.desired.health_checks.append(&mut part.health_checks);
        }
        if !part.notes.is_empty() {
            self.notes.insert(key.clone(), part.notes);
        }
        part.services
    }

    /// Adds what Service `key` contributes (the same rules as `desired`), noting in `delta`
    /// (if any) what changed.
    fn compute(
        &mut self,
        cluster: &Cluster,
        node: &NodeContext,
        key: &Key,
        svc: &Service,
        mut delta: Option<&mut Delta>,
    ) {
        let slices: Vec<&Slice> = self
            .slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| cluster.slices.get(k).map(|s| &**s))
            .collect();
        let Some(mut out) = self.computed(node, key, svc, &slices) else { return };
        let claims = self.claims.add(svc, &out.services);
        self.claims.settle(&mut out.services, &mut out.notes);
        self.count_vips(&svc.cluster_ips, delta.as_deref_mut());
        self.held.insert(key.clone(), Held { claims, vips: svc.cluster_ips.to_vec() });
        for (r, v) in self.keep_checks_and_notes(key, out) {
            self.count_endpoints(&v);
            let old = self.desired.services.insert(r.clone(), v);
            if let Some(d) = delta.as_deref_mut() {
                d.services.entry(r).or_insert(old);
            }
        }
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
