//! What the agent keeps of each Service and EndpointSlice: the fields the Model reads, in
//! types of its own, converted once as an object arrives (from either source).
//!
//! k8s-openapi's types hold every field of the API, mostly as optional strings: an
//! `EndpointSlice` is 432 bytes before its first endpoint, each `Endpoint` 352 more, and each
//! address, condition and name is another allocation. The agent holds every Service and slice
//! of the cluster for as long as they live, on every node, so it keeps this form instead:
//! addresses parsed, conditions resolved to Kubernetes' defaults, policies as flags. The
//! Model reads nothing else, so `desired()` of a cluster is the same whichever form it was
//! read from (tested in `source::slim`).

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use k8s_openapi::api::{core::v1, discovery::v1 as discovery};
use lb_common::abi::{PROTO_TCP, PROTO_UDP};

use crate::{model, topology::Hints};

/// A port's protocol as written; `None` in the API means TCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    /// Another one (SCTP, or a typo), kept by name for the messages that mention it.
    Other(Box<str>),
}

impl Protocol {
    fn of(p: Option<&str>) -> Self {
        match p.unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => Protocol::Other(other.into()),
        }
    }

    /// The protocol number the datapath uses, if it proxies this protocol.
    pub fn number(&self) -> Option<u8> {
        match self {
            Protocol::Tcp => Some(PROTO_TCP),
            Protocol::Udp => Some(PROTO_UDP),
            Protocol::Other(_) => None,
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Other(p) => p,
        }
    }
}

/// `spec.type`; anything unknown acts as ClusterIP, as it did before types existed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// Why a Service gets no datapath state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skipped {
    /// Without a spec there is nothing to proxy, and nothing to say.
    Silently,
    /// Said in the operator's notes.
    Because(&'static str),
}

/// One `spec.ports` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Empty when unnamed. Shared with the `ServiceRef`s the Model makes of the port.
    pub name: model::Name,
    pub protocol: Protocol,
    pub port: i32,
    /// Unset, zero or out of range: none.
    pub node_port: Option<u16>,
}

/// A Service as the Model reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub skipped: Option<Skipped>,
    /// `metadata.creationTimestamp`: settles who owns a contested frontend.
    pub created: Option<jiff::Timestamp>,
    pub service_type: ServiceType,
    /// It has a non-empty selector (so mirrored slices are not its own).
    pub selected: bool,
    pub external_local: bool,
    pub internal_local: bool,
    /// `sessionAffinity: ClientIP`, with its timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// `clusterIPs` (else `clusterIP`), those that parse.
    pub cluster_ips: Box<[IpAddr]>,
    pub external_ips: Box<[IpAddr]>,
    /// `status.loadBalancer.ingress[].ip`, except those in `ipMode: Proxy` (the load balancer
    /// terminates and sends to the node: not a VIP of ours).
    pub ingress_ips: Box<[IpAddr]>,
    pub source_ranges: Box<[IpNet]>,
    /// Unset, zero or out of range: none.
    pub health_check_node_port: Option<u16>,
    pub ports: Box<[ServicePort]>,
}

/// One port of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    /// Empty when unnamed.
    pub name: Box<str>,
    pub protocol: Protocol,
    /// Unset or out of range: none (the port then matches nothing).
    pub port: Option<u16>,
}

/// One endpoint of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The first address (Kubernetes allows exactly one today), if it parses.
    pub address: Option<IpAddr>,
    /// The conditions with Kubernetes' defaults: ready and serving default to true,
    /// terminating to false; ready implies not terminating.
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<Box<str>>,
    /// Topology hints; most endpoints have none.
    pub hints: Option<Box<Hints>>,
}

static NO_HINTS: Hints = Hints { nodes: Vec::new(), zones: Vec::new() };

impl Endpoint {
    pub fn hints(&self) -> &Hints {
        self.hints.as_deref().unwrap_or(&NO_HINTS)
    }

    pub fn on_node(&self, node: &str) -> bool {
        self.node_name.as_deref() == Some(node)
    }
}

/// An EndpointSlice as the Model reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    /// The Service it belongs to (`kubernetes.io/service-name`).
    pub service: Option<model::Name>,
    /// Mirrored from a hand-written Endpoints object.
    pub mirrored: bool,
    /// `addressType`; FQDN slices (none) serve no family.
    pub family: Option<model::Family>,
    pub ports: Box<[SlicePort]>,
    pub endpoints: Box<[Endpoint]>,
}

fn label<'a>(labels: Option<&'a BTreeMap<String, String>>, name: &str) -> Option<&'a str> {
    labels?.get(name).map(String::as_str)
}

fn ips<'a>(it: impl IntoIterator<Item = &'a String>) -> Box<[IpAddr]> {
    it.into_iter().filter_map(|s| s.parse().ok()).collect()
}

fn small_port(p: Option<i32>) -> Option<u16> {
    p.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0)
}

impl From<&v1::Service> for Service {
    fn from(svc: &v1::Service) -> Self {
        let labels = svc.metadata.labels.as_ref();
        let Some(spec) = svc.spec.as_ref() else {
            return Service::without_spec();
        };
        let skipped = if spec.type_.as_deref() == Some("ExternalName") {
            Some(Skipped::Because("type ExternalName (DNS only)"))
        } else if spec.cluster_ip.as_deref() == Some("None") {
            Some(Skipped::Because("headless (clusterIP: None)"))
        } else if labels.is_some_and(|l| l.contains_key(model::PROXY_NAME_LABEL)) {
            Some(Skipped::Because("handled by another proxy (service.kubernetes.io/service-proxy-name)"))
        } else {
            None
        };
        let service_type = match spec.type_.as_deref() {
            Some("NodePort") => ServiceType::NodePort,
            Some("LoadBalancer") => ServiceType::LoadBalancer,
            _ => ServiceType::ClusterIp,
        };
        let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .map(|t| t.max(1) as u32)
                .unwrap_or(model::DEFAULT_AFFINITY_TIMEOUT)
        });
        let cluster_ips = match spec.cluster_ips.as_deref() {
            Some(list) if !list.is_empty() => ips(list),
            _ => ips(spec.cluster_ip.iter()),
        };
        let ingress =
            svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
        let ingress_ips = ips(ingress
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip.as_ref()));
        let ports = spec
            .ports
            .iter()
            .flatten()
            .map(|p| ServicePort {
                name: p.name.as_deref().unwrap_or("").into(),
                protocol: Protocol::of(p.protocol.as_deref()),
                port: p.port,
                node_port: small_port(p.node_port),
            })
            .collect();
        Service {
            skipped,
            created: svc.metadata.creation_timestamp.as_ref().map(|t| t.0),
            service_type,
            selected: spec.selector.as_ref().is_some_and(|s| !s.is_empty()),
            external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            affinity_timeout,
            cluster_ips,
            external_ips: ips(spec.external_ips.iter().flatten()),
            ingress_ips,
            source_ranges: spec
                .load_balancer_source_ranges
                .iter()
                .flatten()
                .filter_map(|r| r.trim().parse().ok())
                .collect(),
            health_check_node_port: small_port(spec.health_check_node_port),
            ports,
        }
    }
}

impl Service {
    fn without_spec() -> Self {
        Service {
            skipped: Some(Skipped::Silently),
            created: None,
            service_type: ServiceType::ClusterIp,
            selected: false,
            external_local: false,
            internal_local: false,
            affinity_timeout: None,
            cluster_ips: Box::new([]),
            external_ips: Box::new([]),
            ingress_ips: Box::new([]),
            source_ranges: Box::new([]),
            health_check_node_port: None,
            ports: Box::new([]),
        }
    }
}

impl From<&discovery::Endpoint> for Endpoint {
    fn from(ep: &discovery::Endpoint) -> Self {
        let c = ep.conditions.as_ref();
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        let ready = c.and_then(|c| c.ready).unwrap_or(true) && !terminating;
        let serving = c.and_then(|c| c.serving).or(c.and_then(|c| c.ready)).unwrap_or(true);
        let hints = Hints::of(ep);
        Endpoint {
            address: ep.addresses.first().and_then(|a| a.parse().ok()),
            ready,
            serving,
            terminating,
            node_name: ep.node_name.as_deref().map(Box::from),
            hints: (hints != NO_HINTS).then(|| Box::new(hints)),
        }
    }
}

impl From<&discovery::EndpointSlice> for Slice {
    fn from(s: &discovery::EndpointSlice) -> Self {
        let labels = s.metadata.labels.as_ref();
        Slice {
            service: label(labels, model::SERVICE_NAME_LABEL).map(model::Name::from),
            mirrored: label(labels, model::MANAGED_BY_LABEL) == Some(model::MIRROR_CONTROLLER),
            family: match s.address_type.as_str() {
                "IPv4" => Some(model::Family::V4),
                "IPv6" => Some(model::Family::V6),
                _ => None,
            },
            ports: s
                .ports
                .iter()
                .flatten()
                .map(|p| SlicePort {
                    name: p.name.as_deref().unwrap_or("").into(),
                    protocol: Protocol::of(p.protocol.as_deref()),
                    port: p.port.and_then(|n| u16::try_from(n).ok()),
                })
                .collect(),
            endpoints: s.endpoints.iter().map(Endpoint::from).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_forms_stay_small() {
        // What each Service and endpoint costs the agent before its strings and lists.
        assert!(std::mem::size_of::<Service>() <= 160, "{}", std::mem::size_of::<Service>());
        assert!(std::mem::size_of::<Endpoint>() <= 56, "{}", std::mem::size_of::<Endpoint>());
        assert!(std::mem::size_of::<Slice>() <= 72, "{}", std::mem::size_of::<Slice>());
    }

    #[test]
    fn conditions_take_kubernetes_defaults() {
        let ep = |ready, serving, terminating| discovery::Endpoint {
            addresses: vec!["198.18.1.1".into()],
            conditions: Some(discovery::EndpointConditions { ready, serving, terminating }),
            ..Default::default()
        };
        let kept = |e: &discovery::Endpoint| {
            let e = Endpoint::from(e);
            (e.ready, e.serving, e.terminating)
        };
        assert_eq!(kept(&discovery::Endpoint::default()), (true, true, false), "no conditions");
        assert_eq!(kept(&ep(None, None, Some(true))), (false, true, true), "terminating is not ready");
        assert_eq!(kept(&ep(Some(false), None, None)), (false, false, false), "serving follows ready");
        assert_eq!(kept(&ep(Some(false), Some(true), Some(true))), (false, true, true));
        assert_eq!(Endpoint::from(&ep(None, None, None)).address, Some("198.18.1.1".parse().unwrap()));
    }
}
