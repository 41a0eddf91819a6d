//! Table-driven tests of the Model, one group per row of DESIGN.md §5. Inputs are the same
//! YAML a user writes; expectations are the frontends and backends of each datapath service.

use lb_common::abi::{PROTO_TCP, PROTO_UDP};

use super::*;
use crate::source::manifests::{cluster_from, parse};

const NODE: &str = "node-a";

fn node_yaml() -> &'static str {
    "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  addresses:\n  - {type: Hostname, address: node-a}\n  - {type: InternalIP, address: 198.18.0.1}\n  - {type: InternalIP, address: 198.18.5.1}\n  - {type: InternalIP, address: 'fd00::1'}\n"
}

fn run_with(yaml: &str, nodeports: NodePortAddresses) -> Desired {
    let text = format!("{}---\n{yaml}", node_yaml());
    let cluster = cluster_from(parse(&text, false).expect("test YAML parses"));
    let node = NodeContext { name: NODE.into(), nodeport_addresses: nodeports, fallback_addresses: vec![] };
    desired(&cluster, &node)
}

fn run(yaml: &str) -> Desired {
    run_with(yaml, NodePortAddresses::Primary)
}

fn svc<'a>(d: &'a Desired, port_name: &str, proto: u8, scope: Scope, family: Family) -> &'a DesiredService {
    let key = ServiceRef {
        namespace: "default".into(),
        name: "web".into(),
        port_name: port_name.into(),
        proto,
        scope,
        family,
    };
    d.services
        .get(&key)
        .unwrap_or_else(|| panic!("no {key}; have {:?}", d.services.keys().collect::<Vec<_>>()))
}

fn fe(list: &[(&str, u16)]) -> SortedSet<(IpAddr, u16)> {
    list.iter().map(|(ip, p)| (ip.parse().unwrap(), *p)).collect()
}

fn ips(set: &SortedSet<Backend>) -> Vec<String> {
    set.iter().map(|b| format!("{}:{}", b.ip, b.port)).collect()
}

/// A Service `web` (spec given as a YAML flow map body) and its slices.
fn service(spec: &str, status: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{{spec}}}\nstatus: {{{status}}}\n---\n"
    )
}

fn slice(name: &str, family: &str, ports: &str, endpoints: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, labels: {{kubernetes.io/service-name: web}}}}\naddressType: {family}\nports: [{ports}]\nendpoints: [{endpoints}]\n---\n"
    )
}

fn ep(ip: &str, node: &str, cond: &str) -> String {
    format!("{{addresses: ['{ip}'], nodeName: {node}, conditions: {{{cond}}}}},")
}

fn three_pods() -> String {
    slice(
        "web-1",
        "IPv4",
        "{name: http, port: 9376, protocol: TCP}",
        &[
            ep("198.18.1.10", NODE, "ready: true"),
            ep("198.18.1.11", NODE, ""),
            ep("198.18.2.10", "node-b", "ready: true"),
        ]
        .concat(),
    )
}

const HTTP: &str = "ports: [{name: http, port: 80, targetPort: 9376, nodePort: 30080}]";

#[test]
fn cluster_ip_gets_ready_endpoints_with_the_slice_port() {
    let d = run(&(service(&format!("clusterIP: 198.19.0.10, {HTTP}"), "") + &three_pods()));
    let s = svc(&d, "http", PROTO_TCP, Scope::Cluster, Family::V4);
    assert_eq!(s.frontends, fe(&[("198.19.0.10", 80)]));
    assert_eq!(ips(&s.backends), ["198.18.1.10:9376", "198.18.1.11:9376", "198.18.2.10:9376"]);
    assert_eq!(s.backends.iter().filter(|b| b.local).count(), 2);
    assert_eq!(s.no_backend, NoBackend::Reject);
    assert!(!s.external && s.affinity_timeout.is_none());
    // ClusterIP only: no external scope.
    assert_eq!(d.services.len(), 1);
    assert!(d.cluster_vips.contains(&"198.19.0.10".parse().unwrap()));
}

#[test]
fn nodeport_serves_the_primary_address_or_the_configured_ranges() {
    let yaml = service(&format!("type: NodePort, clusterIP: 198.19.0.10, {HTTP}"), "") + &three_pods();
    let d = run(&yaml);
    let s = svc(&d, "http", PROTO_TCP, Scope::External, Family::V4);
    assert_eq!(s.frontends, fe(&[("198.18.0.1", 30080)]));
    assert!(s.external);
    assert_eq!(s.backends.len(), 3);
    let d = run_with(&yaml, "198.18.0.0/16".parse().unwrap());
    let s = svc(&d, "http", PROTO_TCP, Scope::External, Family::V4);
    assert_eq!(s.frontends, fe(&[("198.18.0.1", 30080), ("198.18.5.1", 30080)]));
    let d = run_with(&yaml, "198.18.5.0/24".parse().unwrap());
    assert_eq!(
        svc(&d, "http", PROTO_TCP, Scope::External, Family::V4).frontends,
        fe(&[("198.18.5.1", 30080)])
    );
}

#[test]
fn load_balancer_ingress_ips_except_proxy_mode_and_external_ips() {
    let d = run(&(service(
        &format!("type: LoadBalancer, clusterIP: 198.19.0.10, externalIPs: [198.19.9.9], {HTTP}"),
        "loadBalancer: {ingress: [{ip: 198.19.100.1}, {ip: 198.19.100.2, ipMode: Proxy}, {ip: 198.19.100.3, ipMode: VIP}]}",
    ) + &three_pods()));
    let lb = svc(&d, "http", PROTO_TCP, Scope::LoadBalancer, Family::V4);
    assert_eq!(lb.frontends, fe(&[("198.19.100.1", 80), ("198.19.100.3", 80)]));
    let ext = svc(&d, "http", PROTO_TCP, Scope::External, Family::V4);
    assert_eq!(ext.frontends, fe(&[("198.19.9.9", 80), ("198.18.0.1", 30080)]));
    // A ClusterIP Service's LB status is not served.
    let d = run(&(service(
        &format!("clusterIP: 198.19.0.10, {HTTP}"),
        "loadBalancer: {ingress: [{ip: 198.19.100.1}]}",
    ) + &three_pods()));
    assert_eq!(d.services.len(), 1);
}

#[test]
fn multi_port_same_port_tcp_and_udp_and_named_ports_per_slice() {
    let spec = "clusterIP: 198.19.0.10, ports: [{name: http, port: 80, targetPort: http}, \
                {name: dns, port: 53, protocol: UDP, targetPort: 5353}, {name: dns-tcp, port: 53, protocol: TCP}]";
    // Two slices: the named port `http` resolves to a different number in each.
    let yaml = service(spec, "")
        + &slice(
            "web-a",
            "IPv4",
            "{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}",
            &ep("198.18.1.10", NODE, ""),
        )
        + &slice(
            "web-b",
            "IPv4",
            "{name: http, port: 9090}, {name: dns-tcp, port: 5353}",
            &ep("198.18.2.10", "node-b", ""),
        );
    let d = run(&yaml);
    assert_eq!(
        ips(&svc(&d, "http", PROTO_TCP, Scope::Cluster, Family::V4).backends),
        ["198.18.1.10:8080", "198.18.2.10:9090"]
    );
    assert_eq!(ips(&svc(&d, "dns", PROTO_UDP, Scope::Cluster, Family::V4).backends), ["198.18.1.10:5353"]);
    let tcp53 = svc(&d, "dns-tcp", PROTO_TCP, Scope::Cluster, Family::V4);
    assert_eq!(tcp53.frontends, fe(&[("198.19.0.10", 53)]));
    assert_eq!(ips(&tcp53.backends), ["198.18.2.10:5353"]);
}

#[test]
fn slice_port_protocol_must_match() {
    let yaml = service("clusterIP: 198.19.0.10, ports: [{name: p, port: 53, protocol: UDP}]", "")
        + &slice("web-a", "IPv4", "{name: p, port: 53, protocol: TCP}", &ep("198.18.1.10", NODE, ""));
    assert!(svc(&run(&yaml), "p", PROTO_UDP, Scope::Cluster, Family::V4).backends.is_empty());
}

#[test]
fn readiness_ready_first_then_serving_terminating_never_unserving() {
    let spec = format!("clusterIP: 198.19.0.10, {HTTP}");
    /// (endpoints as (ip, conditions), new-flow backends, kept)
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a [&'a str]);
    let cases: &[Case] = &[
        (
            &[
                ("198.18.1.10", "ready: true"),
                ("198.18.1.11", "ready: false, serving: true, terminating: true"),
            ],
            &["198.18.1.10:9376"],
            &["198.18.1.11:9376"],
        ),
        (&[("198.18.1.11", "ready: false, serving: true, terminating: true")], &["198.18.1.11:9376"], &[]),
        (&[("198.18.1.11", "ready: false, serving: false, terminating: true")], &[], &[]),
        (&[("198.18.1.12", "ready: false")], &[], &[]),
        (
            &[("198.18.1.12", "ready: false"), ("198.18.1.13", "serving: true, terminating: true")],
            &["198.18.1.13:9376"],
            &[],
        ),
    ];
    for (eps, want, kept) in cases {
        let eps: String = eps.iter().map(|(ip, c)| ep(ip, NODE, c)).collect();
        let d = run(&(service(&spec, "") + &slice("web-1", "IPv4", "{name: http, port: 9376}", &eps)));
        let s = svc(&d, "http", PROTO_TCP, Scope::Cluster, Family::V4);
        assert_eq!(ips(&s.backends), *want, "{eps}");
        assert_eq!(ips(&s.kept), *kept, "{eps}");
        assert!(s.kept.iter().all(|b| b.terminating));
    }
}

#[test]
fn external_traffic_policy_local_keeps_local_endpoints_and_drops() {
    let yaml = service(
        &format!("type: LoadBalancer, clusterIP: 198.19.0.10, externalTrafficPolicy: Local, {HTTP}"),
        "loadBalancer: {ingress: [{ip: 198.19.100.1}]}",
    );
    let d = run(&(yaml.clone() + &three_pods()));
    for scope in [Scope::External, Scope::LoadBalancer] {
        let s = svc(&d, "http", PROTO_TCP, scope, Family::V4);
        assert_eq!(ips(&s.backends), ["198.18.1.10:9376", "198.18.1.11:9376"]);
        assert_eq!(s.no_backend, NoBackend::Drop);
    }
    // Cluster scope is not affected.
    let c = svc(&d, "http", PROTO_TCP, Scope::Cluster, Family::V4);
    assert_eq!(c.backends.len(), 3);
    assert_eq!(c.no_backend, NoBackend::Reject);
    // Only remote endpoints: nothing, and drop.
    let d =
        run(&(yaml + &slice("web-1", "IPv4", "{name: http, port: 9376}", &ep("198.18.2.10", "node-b", ""))));
    assert!(svc(&d, "http", PROTO_TCP, Scope::External, Family::V4).backends.is_empty());
}

#[test]
fn internal_traffic_policy_local() {
    let d = run(&(service(
        &format!("type: NodePort, clusterIP: 198.19.0.10, internalTrafficPolicy: Local, {HTTP}"),
        "",
    ) + &three_pods()));
    let c = svc(&d, "http", PROTO_TCP, Scope::Cluster, Family::V4);
    assert_eq!(ips(&c.backends), ["198.18.1.10:9376", "198.18.1.11:9376"]);
    assert_eq!(c.no_backend, NoBackend::Drop);
    assert_eq!(svc(&d, "http", PROTO_TCP, Scope::External, Family::V4).backends.len(), 3);
}

#[test]
fn session_affinity_with_and_without_timeout() {
    let cases = [
        ("sessionAffinity: ClientIP", Some(DEFAULT_AFFINITY_TIMEOUT)),
        ("sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}", Some(5)),
        ("sessionAffinity: None", None),
        ("publishNotReadyAddresses: false", None),
    ];
    for (aff, want) in cases {
        let d = run(&(service(&format!("clusterIP: 198.19.0.10, {aff}, {HTTP}"), "") + &three_pods()));
        assert_eq!(svc(&d, "http", PROTO_TCP, Scope::Cluster, Family::V4).affinity_timeout, want, "{aff}");
    }
}

#[test]
fn source_ranges_apply_to_load_balancer_ips_only() {
    let d = run(&(service(
        &format!(
            "type: LoadBalancer, clusterIP: 198.19.0.10, loadBalancerSourceRanges: [198.18.0.100/32, 'fd00::/8'], {HTTP}"
        ),
        "loadBalancer: {ingress: [{ip: 198.19.100.1}]}",
    ) + &three_pods()));
    let lb = svc(&d, "http", PROTO_TCP, Scope::LoadBalancer, Family::V4);
    assert_eq!(lb.source_ranges, vec!["198.18.0.100/32".parse::<IpNet>().unwrap()]);
    assert!(svc(&d, "http", PROTO_TCP, Scope::External, Family::V4).source_ranges.is_empty());
    assert!(svc(&d, "http", PROTO_TCP, Scope::Cluster, Family::V4).source_ranges.is_empty());
}

#[test]
fn dual_stack_frontends_get_endpoints_of_their_family() {
    let yaml = service(
        &format!(
            "type: NodePort, clusterIPs: [198.19.0.10, 'fd00:19::10'], ipFamilies: [IPv4, IPv6], {HTTP}"
        ),
        "",
    ) + &three_pods()
        + &slice("web-6", "IPv6", "{name: http, port: 9376}", &ep("fd00:18:1::10", NODE, ""));
    let d = run(&yaml);
    assert_eq!(svc(&d, "http", PROTO_TCP, Scope::Cluster, Family::V4).backends.len(), 3);
    let v6 = svc(&d, "http", PROTO_TCP, Scope::Cluster, Family::V6);
    assert_eq!(v6.frontends, fe(&[("fd00:19::10", 80)]));
    assert_eq!(ips(&v6.backends), ["fd00:18:1::10:9376"]);
    assert_eq!(svc(&d, "http", PROTO_TCP, Scope::External, Family::V6).frontends, fe(&[("fd00::1", 30080)]));
}

#[test]
fn a_port_name_no_slice_has_and_a_family_without_slices_are_warned_about() {
    let warnings = |d: &Desired| -> Vec<String> {
        d.notes
            .iter()
            .filter(|(_, why)| why.starts_with("warning:"))
            .map(|(w, why)| format!("{w} {why}"))
            .collect()
    };
    // Matched by name and protocol, in the slices' family: nothing to say.
    let good = service(&format!("clusterIP: 198.19.0.10, {HTTP}"), "") + &three_pods();
    assert_eq!(warnings(&run(&good)), Vec::<String>::new());
    // The Service says `web`, the slice `http`; and a UDP port the slice has only as TCP.
    let yaml = service(
        "clusterIP: 198.19.0.10, ports: [{name: web, port: 80, targetPort: 9376}, {name: http, port: 81, protocol: UDP}]",
        "",
    ) + &three_pods();
    let w = warnings(&run(&yaml));
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].starts_with("default/web:web ") && w[0].contains("no EndpointSlice port is named \"web\" (TCP)")
    );
    assert!(w[1].starts_with("default/web:http ") && w[1].contains("(UDP)"));
    // An IPv6 ClusterIP with only IPv4 slices.
    let yaml = service(&format!("clusterIP: 'fd00:19::10', ipFamilies: [IPv6], {HTTP}"), "") + &three_pods();
    let w = warnings(&run(&yaml));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("IPv6 clusterIP fd00:19::10 but no IPv6 EndpointSlice"), "{w:?}");
    // No slices at all is not a mismatch (a Service waiting for pods).
    let alone = service(&format!("clusterIP: 'fd00:19::10', {HTTP}"), "");
    assert!(warnings(&run(&alone)).is_empty());
}

#[test]
fn ignored_services() {
    let cases = [
        ("type: ExternalName, externalName: example.com", "ExternalName"),
        ("clusterIP: None, ports: [{port: 80}]", "headless"),
    ];
    for (spec, why) in cases {
        let d = run(&(service(spec, "") + &three_pods()));
        assert!(d.services.is_empty(), "{spec}");
        assert!(d.notes[0].1.contains(why));
    }
    let other = "apiVersion: v1\nkind: Service\nmetadata: {name: web, labels: {service.kubernetes.io/service-proxy-name: other}}\nspec: {clusterIP: 198.19.0.10, ports: [{port: 80}]}\n";
    let d = run(other);
    assert!(d.services.is_empty() && d.notes[0].1.contains("another proxy"));
}

#[test]
fn no_slices_or_empty_slice_means_no_backends_and_reject() {
    for extra in [String::new(), slice("web-1", "IPv4", "{name: http, port: 9376}", "")] {
        let d = run(&(service(&format!("type: NodePort, clusterIP: 198.19.0.10, {HTTP}"), "") + &extra));
        for scope in [Scope::Cluster, Scope::External] {
            let s = svc(&d, "http", PROTO_TCP, scope, Family::V4);
            assert!(s.backends.is_empty());
            assert_eq!(s.no_backend, NoBackend::Reject);
        }
    }
}

#[test]
fn node_addresses_fall_back_to_interfaces_without_a_node_object() {
    let cluster = Cluster::default();
    let node = NodeContext {
        name: "other".into(),
        nodeport_addresses: NodePortAddresses::Primary,
        fallback_addresses: vec!["198.18.0.2".parse().unwrap(), "198.18.9.2".parse().unwrap()],
    };
    assert_eq!(node.nodeport_ips(&cluster), vec!["198.18.0.2".parse::<IpAddr>().unwrap()]);
    assert!("primary".parse::<NodePortAddresses>().is_ok());
    assert!("198.18.0.0/16, fd00::/8".parse::<NodePortAddresses>().is_ok());
    assert!("nonsense".parse::<NodePortAddresses>().is_err());
}

#[test]
fn health_check_node_port_counts_local_ready_endpoints() {
    let spec = format!(
        "type: LoadBalancer, clusterIP: 198.19.0.10, externalTrafficPolicy: Local, healthCheckNodePort: 32000, {HTTP}"
    );
    let d = run(&(service(&spec, "") + &three_pods()));
    assert_eq!(d.health_checks[&32000], HealthCheck { service: "default/web".into(), local_endpoints: 2 });
    // Only terminating local endpoints: 503 territory, while they still serve traffic.
    let eps = ep("198.18.1.10", NODE, "ready: false, serving: true, terminating: true");
    let d = run(&(service(&spec, "") + &slice("web-1", "IPv4", "{name: http, port: 9376}", &eps)));
    assert_eq!(d.health_checks[&32000].local_endpoints, 0);
    assert_eq!(svc(&d, "http", PROTO_TCP, Scope::External, Family::V4).backends.len(), 1);
    // Cluster policy: no health check.
    let d =
        run(&(service(&format!("type: LoadBalancer, clusterIP: 198.19.0.10, {HTTP}"), "") + &three_pods()));
    assert!(d.health_checks.is_empty());
}

/// A small deterministic generator for the randomised test below.
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn random_service(rng: &mut Rng, i: u64, shared_vips: bool) -> Service {
    let ty = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"][rng.next(4) as usize];
    // healthCheckNodePorts are unique per Service (the API server allocates them).
    let etp = if rng.next(3) == 0 {
        format!("externalTrafficPolicy: Local, healthCheckNodePort: {},", 32000 + i)
    } else {
        String::new()
    };
    // Shared VIPs test the Model's refcounts; the datapath needs them unique.
    let vip =
        if shared_vips { format!("198.19.0.{}", 1 + rng.next(6)) } else { format!("198.19.0.{}", 10 + i) };
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{type: {ty}, {etp} clusterIP: {vip}, ports: [{{name: http, port: 80, nodePort: {}}}, {{name: dns, port: 53, protocol: UDP}}]}}\nstatus: {{loadBalancer: {{ingress: [{{ip: 198.19.100.{i}}}]}}}}\n",
        30000 + i
    );
    match parse(&yaml, false).unwrap().pop().unwrap() {
        crate::source::manifests::Object::Service(s) => Service::from(&*s),
        _ => unreachable!(),
    }
}

/// `per_pod`: an endpoint's node and conditions follow from its address (as they do in a
/// cluster, where they come from the pod), else they are random per slice.
fn random_slice(rng: &mut Rng, j: u64, per_pod: bool) -> Slice {
    let owner = rng.next(8);
    const CONDS: [&str; 3] = ["ready: true", "ready: false, serving: true, terminating: true", ""];
    let eps: String = (0..rng.next(4))
        .map(|_| {
            let host = rng.next(20);
            let (n, k) = if per_pod { (host % 2, host % 3) } else { (rng.next(2), rng.next(3)) };
            let node = if n == 0 { NODE } else { "node-b" };
            ep(&format!("198.18.1.{host}"), node, CONDS[k as usize])
        })
        .collect();
    let yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: e{j}, labels: {{kubernetes.io/service-name: s{owner}}}}}\naddressType: IPv4\nports: [{{name: http, port: 9376}}, {{name: dns, port: 5353, protocol: UDP}}]\nendpoints: [{eps}]\n"
    );
    match parse(&yaml, false).unwrap().pop().unwrap() {
        crate::source::manifests::Object::EndpointSlice(s) => Slice::from(&*s),
        _ => unreachable!(),
    }
}

/// The incremental Model equals the full one after every change: services added, changed
/// (type, VIP, policies) and removed, slices changed, moved between services and removed,
/// with VIPs shared between services.
/// Random changes to Services (`shared_vips`: VIPs may collide) and slices, `steps` times;
/// `check` sees the cluster and the changes after each.
fn random_changes(
    steps: usize,
    shared_vips: bool,
    per_pod: bool,
    mut check: impl FnMut(usize, &Cluster, &Changes),
) {
    let text = node_yaml().to_string();
    let mut cluster = cluster_from(parse(&text, false).unwrap());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    check(0, &cluster, &Changes::everything());
    for step in 1..=steps {
        let mut changes = Changes::default();
        for _ in 0..1 + rng.next(3) {
            if rng.next(2) == 0 {
                let i = rng.next(8);
                let key: Key = ("default".into(), format!("s{i}").into());
                if rng.next(4) == 0 {
                    cluster.services.remove(&key);
                } else {
                    cluster.services.insert(key.clone(), random_service(&mut rng, i, shared_vips).into());
                }
                changes.services.insert(key);
            } else {
                let j = rng.next(12);
                let key: Key = ("default".into(), format!("e{j}").into());
                if rng.next(4) == 0 {
                    cluster.slices.remove(&key);
                } else {
                    cluster.slices.insert(key.clone(), random_slice(&mut rng, j, per_pod).into());
                }
                changes.slices.insert(key);
            }
        }
        check(step, &cluster, &changes);
    }
}

fn test_node() -> NodeContext {
    NodeContext {
        name: NODE.into(),
        nodeport_addresses: NodePortAddresses::Primary,
        fallback_addresses: vec![],
    }
}

/// Incremental syncs (ModelState + plan_changes) leave the maps exactly where a full plan
/// wants them, and the applied state's indexes equal those read back from the maps.
#[test]
fn incremental_sync_leaves_nothing_for_a_full_plan() {
    use crate::{
        dataplane::FakeDataplane,
        reconcile::{Applied, Limits, execute, plan, plan_changes},
    };
    const LIMITS: Limits = Limits {
        max_table: 65_537,
        maglev_slots: 200_000,
        backends: 1_000,
        services: 1_000,
        frontends: 1 << 20,
        source_ranges: 16_384,
        members: 1 << 20,
    };
    let node = test_node();
    let mut state = ModelState::default();
    let mut dp = FakeDataplane::default();
    let mut applied = Applied::read(&dp).unwrap();
    applied.track_ranges(LIMITS.maglev_slots);
    applied.index.quarantine.hold = std::time::Duration::ZERO;
    random_changes(800, false, true, |step, cluster, changes| {
        let delta = state.update(cluster, &node, changes);
        let ops = plan_changes(state.desired(), &delta, &applied, &LIMITS).complete().unwrap();
        execute(&mut dp, &mut applied, &ops).unwrap();
        let read = Applied::read(&dp).unwrap();
        assert_eq!(applied, read, "step {step}: recorded state differs from the maps");
        assert_eq!(applied.index.by_addr, read.index.by_addr, "step {step}");
        assert_eq!(applied.index.service_ids, read.index.service_ids, "step {step}");
        assert_eq!(applied.index.table_users, read.index.table_users, "step {step}");
        assert_eq!(applied.index.free_service_ids, read.index.free_service_ids, "step {step}");
        // Once the quarantine (zero here) is over, the same backend ids are free.
        applied.release_quarantine();
        assert_eq!(applied.index.free_backend_ids, read.index.free_backend_ids, "step {step}");
        let rest = plan(state.desired(), &applied, &LIMITS).complete().unwrap();
        assert_eq!(rest, vec![], "step {step}: {changes:?} left work for a full plan (ops were {ops:?})");
    });
}

#[test]
fn incremental_model_equals_the_full_model_after_every_change() {
    let node = test_node();
    let mut state = ModelState::default();
    random_changes(600, true, false, |step, cluster, changes| {
        let before = state.desired().clone();
        let delta = state.update(cluster, &node, changes);
        let full = desired(cluster, &node);
        assert_eq!(state.desired(), &full, "step {step}: {changes:?}");
        if step == 0 {
            assert!(delta.all, "the first update starts from scratch");
            return;
        }
        // The delta names exactly the datapath services that differ, with their old values.
        let differ: BTreeSet<&ServiceRef> = before
            .services
            .keys()
            .chain(full.services.keys())
            .filter(|r| before.services.get(*r) != full.services.get(*r))
            .collect();
        assert_eq!(differ, delta.services.keys().collect(), "step {step}");
        for (r, old) in &delta.services {
            assert_eq!(old.as_ref(), before.services.get(r), "step {step}: {r}");
        }
        let added: BTreeSet<IpAddr> = full.cluster_vips.difference(&before.cluster_vips).copied().collect();
        let removed: BTreeSet<IpAddr> = before.cluster_vips.difference(&full.cluster_vips).copied().collect();
        assert_eq!((added, removed), (delta.vips_added.clone(), delta.vips_removed.clone()), "step {step}");
        let used = |d: &Desired| -> BTreeSet<(IpAddr, u16)> {
            d.services
                .values()
                .flat_map(|s| s.backends.iter().chain(&s.kept))
                .map(|b| (b.ip, b.port))
                .collect()
        };
        let gone: BTreeSet<_> = used(&before).difference(&used(&full)).copied().collect();
        assert_eq!(gone, delta.backends_gone, "step {step}");
        // A rebuild from this cluster (a relist, a restart) reaches the same state, its
        // indexes included: what the next incremental update starts from.
        if step % 25 == 0 {
            let mut fresh = ModelState::default();
            fresh.update(cluster, &node, &Changes::everything());
            assert_same_state(&fresh, &state, step);
        }
    });
}

fn assert_same_state(a: &ModelState, b: &ModelState, step: usize) {
    assert_eq!(a.desired, b.desired, "step {step}: desired");
    assert_eq!(a.held, b.held, "step {step}: claims and VIPs per Service");
    assert_eq!(a.claims.by_frontend, b.claims.by_frontend, "step {step}: claims");
    assert_eq!(a.claims.contested, b.claims.contested, "step {step}: contested frontends");
    assert_eq!(a.slice_owner, b.slice_owner, "step {step}: slice owners");
    // (An incremental update may leave a Service with no slice left an empty list.)
    let listed = |m: &BTreeMap<Key, Vec<Key>>| {
        m.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>()
    };
    assert_eq!(listed(&a.slices_of), listed(&b.slices_of), "step {step}: slices per Service");
    assert_eq!(a.vip_users, b.vip_users, "step {step}: VIP users");
    assert_eq!(a.backend_users, b.backend_users, "step {step}: endpoint users");
    assert_eq!(a.health_ports, b.health_ports, "step {step}: health-check ports");
    assert_eq!(a.notes, b.notes, "step {step}: notes");
}

/// Two Services claiming one frontend: the older has it (creationTimestamp, then
/// namespace/name), the other is reported, and removing either never takes the frontend
/// from the one that has it — in full and incremental computation alike.
#[test]
fn a_frontend_claimed_twice_stays_with_the_older_service() {
    let svc_at = |ns: &str, name: &str, ts: &str, vip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}, creationTimestamp: '{ts}'}}\nspec: {{clusterIP: {vip}, ports: [{{name: http, port: 80}}]}}\n---\n"
        )
    };
    let old = svc_at("zzz", "web", "2024-01-01T00:00:00Z", "198.19.0.10");
    let new = svc_at("aaa", "thief", "2025-01-01T00:00:00Z", "198.19.0.10");
    let owner = |d: &Desired| -> Vec<String> {
        d.services
            .iter()
            .filter(|(_, s)| s.frontends.contains(&("198.19.0.10".parse().unwrap(), 80)))
            .map(|(r, _)| format!("{}/{}", r.namespace, r.name))
            .collect()
    };
    for (label, yaml) in [("old first", old.clone() + &new), ("new first", new.clone() + &old)] {
        let d = run(&yaml);
        assert_eq!(owner(&d), ["zzz/web"], "{label}: the older one, though its name sorts last");
        let note =
            d.notes.iter().find(|(what, _)| what.starts_with("aaa/thief")).expect("the loser is reported");
        assert!(note.1.contains("198.19.0.10:80/TCP") && note.1.contains("zzz/web"), "{note:?}");
    }
    // Incrementally: the newer one comes and goes, then the older one goes.
    let node = NodeContext {
        name: NODE.into(),
        nodeport_addresses: NodePortAddresses::Primary,
        fallback_addresses: vec![],
    };
    let cluster_of = |yaml: &str| cluster_from(parse(&format!("{}---\n{yaml}", node_yaml()), false).unwrap());
    let mut state = ModelState::default();
    let c1 = cluster_of(&old);
    state.update(&c1, &node, &Changes::everything());
    let c2 = cluster_of(&(old.clone() + &new));
    let thief: Key = ("aaa".into(), "thief".into());
    let web: Key = ("zzz".into(), "web".into());
    let only = |k: &Key| Changes { services: [k.clone()].into(), ..Default::default() };
    let delta = state.update(&c2, &node, &only(&thief));
    assert_eq!(owner(state.desired()), ["zzz/web"]);
    assert!(delta.services.values().all(|old| old.is_none()), "nothing of the owner's changed: {delta:?}");
    state.update(&c1, &node, &only(&thief));
    assert_eq!(owner(state.desired()), ["zzz/web"], "removing the loser leaves the owner's frontend");
    assert_eq!(state.desired(), &desired(&c1, &node));
    state.update(&c2, &node, &only(&thief));
    let c3 = cluster_of(&new);
    state.update(&c3, &node, &only(&web));
    assert_eq!(owner(state.desired()), ["aaa/thief"], "the owner gone, the other one takes over");
    assert_eq!(state.desired(), &desired(&c3, &node));
}

/// The same port number twice in one Service (under two names; the API server and our
/// manifest reader reject it, so it is made here by hand): the first name has the frontend,
/// the second is reported; neither leaves an empty entry behind.
#[test]
fn a_port_number_twice_in_one_service_is_programmed_once_and_reported() {
    let yaml = service(
        "clusterIP: 198.19.0.10, ports: [{name: a, port: 80, targetPort: 9376}, {name: b, port: 81, targetPort: 8080}]",
        "",
    ) + &slice(
        "web-1",
        "IPv4",
        "{name: a, port: 9376}, {name: b, port: 8080}",
        &ep("198.18.1.1", NODE, "ready: true"),
    );
    let mut cluster = cluster_from(parse(&format!("{}---\n{yaml}", node_yaml()), false).unwrap());
    let web = cluster.services.get_mut(&("default".into(), "web".into())).unwrap();
    std::sync::Arc::make_mut(web).ports[1].port = 80;
    let node = NodeContext {
        name: NODE.into(),
        nodeport_addresses: NodePortAddresses::Primary,
        fallback_addresses: vec![],
    };
    let d = desired(&cluster, &node);
    let with_80: Vec<&ServiceRef> = d
        .services
        .iter()
        .filter(|(_, s)| s.frontends.contains(&("198.19.0.10".parse().unwrap(), 80)))
        .map(|(r, _)| r)
        .collect();
    assert_eq!(with_80.len(), 1);
    assert_eq!(&*with_80[0].port_name, "a");
    assert!(
        d.notes.iter().any(|(what, why)| what == "default/web:b" && why.contains("default/web:a")),
        "{:?}",
        d.notes
    );
}

/// A hand-written Endpoints object (manifest mode): a Service without a selector gets its
/// ready addresses as backends (a not-ready one is left out, as from a slice), on the
/// Endpoints' port; the same Service with a selector ignores it, as the mirroring controller
/// mirrors only selector-less Services.
#[test]
fn hand_written_endpoints_serve_a_service_without_a_selector_only() {
    let endpoints = "apiVersion: v1\nkind: Endpoints\nmetadata: {name: web}\nsubsets:\n- addresses: [{ip: 198.18.7.1}, {ip: 198.18.7.2, nodeName: node-a}]\n  notReadyAddresses: [{ip: 198.18.7.3}]\n  ports: [{name: http, port: 9376}]\n---\n";
    let d = run(&(service(&format!("clusterIP: 198.19.0.10, {HTTP}"), "") + endpoints));
    let s = svc(&d, "http", PROTO_TCP, Scope::Cluster, Family::V4);
    assert_eq!(ips(&s.backends), ["198.18.7.1:9376", "198.18.7.2:9376"]);
    assert_eq!(s.backends.iter().filter(|b| b.local).count(), 1, "nodeName carried over");
    let selected = format!("clusterIP: 198.19.0.10, selector: {{app: web}}, {HTTP}");
    let d = run(&(service(&selected, "") + endpoints));
    assert!(svc(&d, "http", PROTO_TCP, Scope::Cluster, Family::V4).backends.is_empty());
    let d = run(&(service(&selected, "") + endpoints + &three_pods()));
    assert_eq!(
        svc(&d, "http", PROTO_TCP, Scope::Cluster, Family::V4).backends.len(),
        3,
        "its own slices still count"
    );
}

/// Topology hints with kube-proxy's rules, on node-a (zone given on its Node): endpoint A on
/// node-a, B on node-b, each with the hints given; the cluster-wide backends chosen.
#[test]
fn topology_hints_narrow_cluster_wide_traffic_as_kube_proxy_does() {
    let run_in = |zone: Option<&str>, svc_extra: &str, a: &str, b: &str| -> Vec<String> {
        let labels =
            zone.map(|z| format!(", labels: {{topology.kubernetes.io/zone: {z}}}")).unwrap_or_default();
        let node = format!("apiVersion: v1\nkind: Node\nmetadata: {{name: node-a{labels}}}\n---\n");
        let hinted = |ip: &str, on: &str, hints: &str| {
            format!("{{addresses: ['{ip}'], nodeName: {on}, hints: {{{hints}}}}},")
        };
        let yaml = node
            + &service(&format!("clusterIP: 198.19.0.10, {svc_extra}{HTTP}"), "")
            + &slice(
                "web-1",
                "IPv4",
                "{name: http, port: 9376, protocol: TCP}",
                &(hinted("198.18.1.10", NODE, a) + &hinted("198.18.2.10", "node-b", b)),
            );
        let cluster = cluster_from(parse(&yaml, false).expect("test YAML parses"));
        let node = NodeContext {
            name: NODE.into(),
            nodeport_addresses: NodePortAddresses::Primary,
            fallback_addresses: vec![],
        };
        ips(&svc(&desired(&cluster, &node), "http", PROTO_TCP, Scope::Cluster, Family::V4).backends)
    };
    let (a, b) = ("198.18.1.10:9376", "198.18.2.10:9376");
    let z = |zone: &str| format!("forZones: [{{name: {zone}}}]");
    let n = |node: &str, zone: &str| format!("forNodes: [{{name: {node}}}], forZones: [{{name: {zone}}}]");
    // Same zone: only the endpoint for this node's zone.
    assert_eq!(run_in(Some("z1"), "", &z("z1"), &z("z2")), [a]);
    assert_eq!(run_in(Some("z2"), "", &z("z1"), &z("z2")), [b]);
    // No endpoint for this zone, no zone on the node, or one endpoint without hints: all.
    assert_eq!(run_in(Some("z3"), "", &z("z1"), &z("z2")), [a, b]);
    assert_eq!(run_in(None, "", &z("z1"), &z("z2")), [a, b]);
    assert_eq!(run_in(Some("z1"), "", &z("z1"), ""), [a, b]);
    // Same node first (PreferSameNode), both in one zone.
    assert_eq!(run_in(Some("z1"), "", &n(NODE, "z1"), &n("node-b", "z1")), [a]);
    // No node hint for this node: the zone hints decide.
    assert_eq!(run_in(Some("z1"), "", &n("node-c", "z1"), &n("node-b", "z1")), [a, b]);
    // internalTrafficPolicy Local: the local endpoint, whatever the hints say.
    assert_eq!(run_in(Some("z1"), "internalTrafficPolicy: Local, ", &z("z2"), &z("z1")), [a]);
    assert_eq!(run_in(Some("z1"), "", &z("z2"), &z("z1")), [b]);
}
