//! The Service set every benchmark uses, and what kube-proxy makes of it: N ClusterIP
//! services × 4 endpoints (one EndpointSlice each) as k8s-openapi objects for our Model, and
//! the same set as kube-proxy's iptables-mode nat table (KUBE-SERVICES → KUBE-SVC-* with
//! `statistic --mode random` → KUBE-SEP-* DNAT, comments included) and nftables-mode ruleset
//! (one verdict map on `daddr . l4proto . dport`, `numgen random mod 4 vmap` per service).

use std::{fmt::Write as _, net::Ipv4Addr, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use lb_userspace::{
    loader, maglev,
    model::{self, Cluster, NodeContext, NodePortAddresses},
    objects,
    reconcile::Limits,
};

/// The services' protocol: TCP for the control plane, UDP for packet-rate runs (a UDP
/// packet is a flow on its own, so a generator needs no handshake).
#[derive(Clone, Copy, Debug)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// As Kubernetes spells it.
    pub fn k8s(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }

    /// As iptables and nft spell it.
    pub fn nft(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

pub const ENDPOINTS: u32 = 4;
pub const NS: &str = "default";

pub fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + (i % 65_536))
}

pub fn svc_port(i: u32) -> u16 {
    80 + (i / 65_536) as u16
}

/// Endpoint `k` (unique address:port over the whole set, inside 198.18.0.0/15).
pub fn endpoint(k: u32) -> (Ipv4Addr, u16) {
    (Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (k % 131_072)), 9000 + (k / 131_072) as u16)
}

pub fn service(i: u32, proto: Proto) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}")),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(vip(i).to_string()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: svc_port(i).into(),
                protocol: Some(proto.k8s().into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn slice(i: u32, eps: &[(Ipv4Addr, u16)], proto: Proto) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}-abc")),
            namespace: Some(NS.into()),
            labels: Some([(model::SERVICE_NAME_LABEL.to_string(), format!("svc-{i}"))].into()),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        // Slices of one service share the target port; ours are all the first endpoint's.
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(eps[0].1.into()),
            protocol: Some(proto.k8s().into()),
            ..Default::default()
        }]),
        endpoints: eps
            .iter()
            .map(|(ip, _)| Endpoint {
                addresses: vec![ip.to_string()],
                conditions: Some(EndpointConditions { ready: Some(true), ..Default::default() }),
                ..Default::default()
            })
            .collect(),
    }
}

/// Endpoints of service `i`: 4 consecutive endpoints, same port (one slice port).
pub fn endpoints_of(i: u32) -> Vec<(Ipv4Addr, u16)> {
    let port = endpoint(i * ENDPOINTS).1;
    (0..ENDPOINTS).map(|j| (endpoint(i * ENDPOINTS + j).0, port)).collect()
}

pub fn cluster(n: u32, proto: Proto) -> Cluster {
    let mut c = Cluster::default();
    let ns: lb_userspace::model::Name = NS.into();
    for i in 0..n {
        c.services.insert(
            (ns.clone(), format!("svc-{i}").into()),
            Arc::new(objects::Service::from(&service(i, proto))),
        );
        c.slices.insert(
            (ns.clone(), format!("svc-{i}-abc").into()),
            Arc::new(objects::Slice::from(&slice(i, &endpoints_of(i), proto))),
        );
    }
    c
}

pub fn node() -> NodeContext {
    NodeContext {
        name: "bench".into(),
        nodeport_addresses: NodePortAddresses::Primary,
        fallback_addresses: vec![],
    }
}

/// A chain-name hash like kube-proxy's (16 base32-ish characters).
pub fn chain_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016X}")
}

pub fn svc_chain(i: u32) -> String {
    format!("KUBE-SVC-{}", chain_hash(&format!("{NS}/svc-{i}:http")))
}

pub fn sep_chain(i: u32, ep: (Ipv4Addr, u16)) -> String {
    format!("KUBE-SEP-{}", chain_hash(&format!("{NS}/svc-{i}:http{}:{}", ep.0, ep.1)))
}

pub fn nft_svc_chain(i: u32) -> String {
    format!("service-{}", &chain_hash(&format!("{NS}/svc-{i}:http"))[..8])
}

pub fn nft_ep_chain(i: u32, ep: (Ipv4Addr, u16)) -> String {
    format!("endpoint-{}", &chain_hash(&format!("{i}{}:{}", ep.0, ep.1))[..8])
}

pub fn iptables_service(out: &mut String, i: u32, eps: &[(Ipv4Addr, u16)], proto: Proto, declare: bool) {
    let p = proto.nft();
    let svc = svc_chain(i);
    if declare {
        let _ = writeln!(out, ":{svc} - [0:0]");
    }
    for ep in eps {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(i, *ep));
    }
    let n = eps.len();
    for (k, ep) in eps.iter().enumerate() {
        let sep = sep_chain(i, *ep);
        if k + 1 < n {
            let p = 1.0 / (n - k) as f64;
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{NS}/svc-{i}:http -> {}:{}\" -m statistic --mode random --probability {p:.10} -j {sep}",
                ep.0, ep.1
            );
        } else {
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{NS}/svc-{i}:http -> {}:{}\" -j {sep}",
                ep.0, ep.1
            );
        }
    }
    for ep in eps {
        let sep = sep_chain(i, *ep);
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment \"{NS}/svc-{i}:http\" -s {}/32 -j KUBE-MARK-MASQ",
            ep.0
        );
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment \"{NS}/svc-{i}:http\" -m {p} -p {p} -j DNAT --to-destination {}:{}",
            ep.0, ep.1
        );
    }
}

/// kube-proxy's iptables-mode nat table for `n` services.
pub fn iptables_rules(n: u32, proto: Proto) -> String {
    iptables_rules_for((0..n).map(|i| (i, endpoints_of(i))), proto)
}

/// kube-proxy's iptables-mode nat table for services `i` (at `vip(i)`) with their endpoints.
pub fn iptables_rules_for(set: impl Iterator<Item = (u32, Vec<(Ipv4Addr, u16)>)>, proto: Proto) -> String {
    let p = proto.nft();
    let mut out = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    let mut services = String::new();
    let mut chains = String::new();
    for (i, eps) in set {
        let _ = writeln!(
            services,
            "-A KUBE-SERVICES -m comment --comment \"{NS}/svc-{i}:http cluster IP\" -m {p} -p {p} -d {}/32 --dport {} -j {}",
            vip(i),
            svc_port(i),
            svc_chain(i)
        );
        iptables_service(&mut chains, i, &eps, proto, true);
    }
    out.push_str(&chains);
    out.push_str("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    out.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    out.push_str(&services);
    out.push_str("COMMIT\n");
    out
}

/// kube-proxy's partial sync after one endpoint of service `i` changed: the service chain
/// rewritten, the new endpoint chain added, the old one deleted (`--noflush`).
pub fn iptables_change(i: u32, new_eps: &[(Ipv4Addr, u16)], gone: (Ipv4Addr, u16), proto: Proto) -> String {
    let mut out = String::from("*nat\n");
    iptables_service(&mut out, i, new_eps, proto, true);
    let _ = writeln!(out, "-F {}\n-X {}", sep_chain(i, gone), sep_chain(i, gone));
    out.push_str("COMMIT\n");
    out
}

pub fn nft_service(out: &mut String, i: u32, eps: &[(Ipv4Addr, u16)], proto: Proto) {
    let p = proto.nft();
    let svc = nft_svc_chain(i);
    let map: Vec<String> =
        eps.iter().enumerate().map(|(k, ep)| format!("{k} : goto {}", nft_ep_chain(i, *ep))).collect();
    // Endpoint chains first: the service's vmap jumps to them.
    for ep in eps {
        let c = nft_ep_chain(i, *ep);
        let _ = writeln!(out, "add chain ip kube-proxy {c}");
        let _ = writeln!(out, "flush chain ip kube-proxy {c}");
        let _ = writeln!(out, "add rule ip kube-proxy {c} ip saddr {} jump mark-for-masquerade", ep.0);
        let _ = writeln!(out, "add rule ip kube-proxy {c} meta l4proto {p} dnat to {}:{}", ep.0, ep.1);
    }
    let _ = writeln!(out, "add chain ip kube-proxy {svc}");
    let _ = writeln!(out, "flush chain ip kube-proxy {svc}");
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {svc} numgen random mod {} vmap {{ {} }}",
        eps.len(),
        map.join(", ")
    );
}

/// kube-proxy's nftables-mode ruleset for `n` services.
pub fn nft_rules(n: u32, proto: Proto) -> String {
    nft_rules_for((0..n).map(|i| (i, endpoints_of(i))), proto)
}

/// kube-proxy's nftables-mode ruleset for services `i` (at `vip(i)`) with their endpoints.
pub fn nft_rules_for(set: impl Iterator<Item = (u32, Vec<(Ipv4Addr, u16)>)>, proto: Proto) -> String {
    let p = proto.nft();
    let mut out = String::from(
        "add table ip kube-proxy\n\
         add chain ip kube-proxy mark-for-masquerade\n\
         add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n\
         add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n\
         add chain ip kube-proxy services\n\
         add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority dstnat ; policy accept ; }\n\
         add rule ip kube-proxy nat-prerouting jump services\n",
    );
    let mut elements = Vec::new();
    for (i, eps) in set {
        nft_service(&mut out, i, &eps, proto);
        elements.push(format!("{} . {p} . {} : goto {}", vip(i), svc_port(i), nft_svc_chain(i)));
    }
    for chunk in elements.chunks(1000) {
        let _ = writeln!(out, "add element ip kube-proxy service-ips {{ {} }}", chunk.join(", "));
    }
    out
}

pub fn nft_change(i: u32, new_eps: &[(Ipv4Addr, u16)], gone: (Ipv4Addr, u16), proto: Proto) -> String {
    let mut out = String::new();
    nft_service(&mut out, i, new_eps, proto);
    let _ = writeln!(out, "delete chain ip kube-proxy {}", nft_ep_chain(i, gone));
    out
}

/// Map capacities that hold the `n`-service set (with room to spare), and the plan's limits
/// for them.
pub fn capacities(n: u32) -> (loader::Capacities, Limits) {
    let m = maglev::table_size(ENDPOINTS as usize, lb_common::maglev::DEFAULT_MAX_TABLE);
    let caps = loader::Capacities {
        frontends: 2 * n + 1024,
        services: n + 1024,
        backends: ENDPOINTS * n + 1024,
        maglev_slots: (n + 4) * m,
        members: ENDPOINTS * n + 1024,
        ..Default::default()
    };
    let limits = Limits::of(&caps);
    (caps, limits)
}
