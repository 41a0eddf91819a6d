//! L3: the real `lb agent` on two lab nodes, real clients between namespaces. One test per
//! scenario of `../shared/reference/k8s-service-e2e-scenarios.md` §4 (and the issue's list),
//! with DESIGN.md §5's verdicts (reject vs drop) and tighter timings than Kubernetes allows:
//! a change must be live within a second.

mod services;

use std::{
    collections::BTreeSet,
    io::Write as _,
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_tests::lab::{
    self, Answer, Bins, EXT_IP, Lab, POD_PORT, POD_PORT_ALT, Pod, curl, in_netns, node_ip, sa, slice_yaml,
    tcp_ask, udp_ask, wait_for,
};
use services::*;

#[test]
fn cluster_ip_tcp_and_udp_reach_every_backend_from_both_nodes_with_the_pod_source_kept() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    apply(&lab, &(web("ClusterIP", "") + &web_slice(&ready(&all))), "service up", || {
        lab.has_frontend(1, vip(), 80).unwrap_or(false) && lab.has_frontend(2, vip(), 80).unwrap_or(false)
    });
    for client in ["client", "client-2"] {
        let ns = lab.pod(client).ns.clone();
        for p in [Proto::Tcp, Proto::Udp] {
            // TCP connects and a connected UDP socket accepts the reply: both mean the reply
            // came from VIP:80.
            let (_, clients) = reach_all(&ns, sa(vip(), 80), p, &["web-1", "web-2", "web-3"]);
            assert_eq!(clients, [lab.pod(client).ip.to_string()].into(), "pod source address kept ({p:?})");
        }
    }
}

#[test]
fn hairpin_a_pod_reaches_itself_through_its_service() {
    let Some(lab) = lab() else { return };
    let w1 = lab.pod("web-1").clone();
    apply(&lab, &(web("ClusterIP", "") + &web_slice(&[(&w1, READY)])), "service up", || {
        matches!(tcp_ask(&lab.pod("client").ns, sa(vip(), 80), ASK), Answer::Reply(..))
    });
    for p in [Proto::Tcp, Proto::Udp] {
        match ask(&w1.ns, sa(vip(), 80), p) {
            // Source-NATed to the node: a pod cannot accept a packet from itself.
            Answer::Reply(pod, client) => {
                assert_eq!(pod, "web-1");
                assert!(client.starts_with(&format!("{}:", node_ip(1))), "{p:?}: seen from {client}");
            }
            other => panic!("hairpin {p:?}: {other:?}"),
        }
    }
}

#[test]
fn nodeport_and_load_balancer_ip_from_outside_reach_local_and_remote_backends() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let yaml = service(
        "web",
        &format!(
            "  type: LoadBalancer\n  clusterIP: {VIP}\n  ports:\n  - {{name: http, port: 80, targetPort: {POD_PORT}, nodePort: 30080}}\n  - {{name: udp, port: 80, protocol: UDP, targetPort: {POD_PORT}, nodePort: 30080}}\n"
        ),
        &format!("loadBalancer: {{ingress: [{{ip: {LB_IP}}}]}}"),
    ) + &web_slice(&ready(&all));
    apply(&lab, &yaml, "service up", || {
        lab.has_frontend(1, LB_IP.parse().unwrap(), 80).unwrap_or(false)
            && lab.has_frontend(2, IpAddr::V4(node_ip(2)), 30080).unwrap_or(false)
    });
    let ext = lab.ext_ns();
    for to in [sa(node_ip(1), 30080), sa(node_ip(2), 30080), sa(LB_IP.parse::<IpAddr>().unwrap(), 80)] {
        for p in [Proto::Tcp, Proto::Udp] {
            let (seen, clients) = reach_all(&ext, to, p, &["web-1", "web-2", "web-3"]);
            // Local backends see the client; remote ones the node that source-NATed.
            assert!(clients.contains(&EXT_IP.to_string()), "{to} {p:?}: {clients:?} ({seen:?})");
            assert!(
                clients.iter().all(|c| *c == EXT_IP.to_string() || c.starts_with("198.18.0.")),
                "{clients:?}"
            );
        }
    }
    // A real client too: curl through node-2's NodePort.
    assert!(matches!(curl(&ext, &format!("http://{}:30080/", node_ip(2))), Answer::Reply(..)));
    // A secondary node address does not serve NodePorts (`--nodeport-addresses primary`).
    let secondary: IpAddr = "198.18.0.51".parse().unwrap();
    lab::sh(&mut lab::in_ns(
        &format!("{}-node1", lab.state.name),
        &["ip", "addr", "add", "198.18.0.51/24", "dev", "eth0"],
    ))
    .unwrap();
    let nodes = lab.node_manifests().replace(
        "address: 198.18.0.1}",
        "address: 198.18.0.1}\n  - {type: InternalIP, address: 198.18.0.51}",
    );
    lab.write_manifest("nodes.yaml", &nodes).unwrap();
    wait_for(LIVE, || Ok(lab.agent_log(1).matches("synced").count() >= 3)).unwrap();
    assert!(!lab.has_frontend(1, secondary, 30080).unwrap());
    // Nothing listens there on the node itself: its own stack refuses.
    assert_eq!(tcp_ask(&ext, sa(secondary, 30080), ASK), Answer::Refused);
    assert!(lab.has_frontend(1, IpAddr::V4(node_ip(1)), 30080).unwrap());
}

#[test]
fn multi_slice_merge_with_per_slice_named_ports_and_multi_port() {
    let Some(lab) = lab() else { return };
    // Selector-less Service; its ports are matched by name in each slice, and the `http`
    // target differs per slice (web-1 serves it on 9376, web-3 on 8080).
    let yaml = service(
        "web",
        &format!(
            "  clusterIP: {VIP}\n  ports:\n  - {{name: http, port: 80, targetPort: http}}\n  - {{name: alt, port: 81, targetPort: {POD_PORT_ALT}}}\n"
        ),
        "",
    ) + "---\n"
        + &slice_yaml(
            "web-a",
            "web",
            &[("http", POD_PORT, "TCP"), ("alt", POD_PORT_ALT, "TCP")],
            &[(lab.pod("web-1"), READY)],
        )
        + "---\n"
        + &slice_yaml("web-b", "web", &[("http", POD_PORT_ALT, "TCP")], &[(lab.pod("web-3"), READY)]);
    apply(&lab, &yaml, "service up", || lab.has_frontend(1, vip(), 81).unwrap_or(false));
    let ns = lab.pod("client").ns.clone();
    reach_all(&ns, sa(vip(), 80), Proto::Tcp, &["web-1", "web-3"]);
    // Port 81 only has web-1's slice.
    reach_all(&ns, sa(vip(), 81), Proto::Tcp, &["web-1"]);
}

#[test]
fn same_port_tcp_and_udp_and_live_protocol_removal() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-3"]);
    let ns = lab.pod("client").ns.clone();
    web_up(&lab, &ns, &all, Proto::Udp);
    reach_all(&ns, sa(vip(), 80), Proto::Tcp, &["web-1", "web-3"]);
    reach_all(&ns, sa(vip(), 80), Proto::Udp, &["web-1", "web-3"]);
    // Remove the UDP port: UDP to it is refused (ICMP port unreachable) within a second.
    let tcp_only = service(
        "web",
        &format!("  clusterIP: {VIP}\n  ports:\n  - {{name: http, port: 80, targetPort: {POD_PORT}}}\n"),
        "",
    ) + &web_slice(&ready(&all));
    apply(&lab, &tcp_only, "UDP port removed", || udp_ask(&ns, sa(vip(), 80), 0, ASK) == Answer::Refused);
    assert!(matches!(tcp_ask(&ns, sa(vip(), 80), ASK), Answer::Reply(..)));
}

#[test]
fn session_affinity_keeps_one_backend_per_client_and_can_be_switched_off() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let sticky = web(
        "ClusterIP",
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
    );
    let ns = lab.pod("client").ns.clone();
    apply(&lab, &(sticky + &web_slice(&ready(&all))), "service up", || {
        matches!(tcp_ask(&ns, sa(vip(), 80), ASK), Answer::Reply(..))
    });
    for p in [Proto::Tcp, Proto::Udp] {
        let pods: BTreeSet<String> =
            (0..15).filter_map(|_| ask(&ns, sa(vip(), 80), p).pod().map(str::to_string)).collect();
        assert_eq!(pods.len(), 1, "{p:?}: {pods:?}");
    }
    // A short timeout: after an idle second the client is free again, so over a few idle
    // periods its new connections land on more than one backend.
    let short = web(
        "ClusterIP",
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n",
    );
    lab.write_manifest("web.yaml", &(short + &web_slice(&ready(&all)))).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut after_idle = BTreeSet::new();
    for _ in 0..6 {
        let first = tcp_ask(&ns, sa(vip(), 80), ASK).pod().expect("answer").to_string();
        // Within the timeout it sticks.
        assert_eq!(tcp_ask(&ns, sa(vip(), 80), ASK).pod(), Some(first.as_str()));
        after_idle.insert(first);
        std::thread::sleep(Duration::from_millis(1200));
    }
    assert!(after_idle.len() > 1, "affinity never expired: {after_idle:?}");
    // Off again: new connections spread.
    apply(&lab, &(web("ClusterIP", "") + &web_slice(&ready(&all))), "affinity off", || {
        (0..12)
            .filter_map(|_| tcp_ask(&ns, sa(vip(), 80), ASK).pod().map(str::to_string))
            .collect::<BTreeSet<_>>()
            .len()
            > 1
    });
}

#[test]
fn external_traffic_policy_local_uses_local_endpoints_keeps_client_ip_and_drops_elsewhere() {
    let Some(lab) = lab() else { return };
    let w3 = lab.pod("web-3").clone();
    let yaml = service(
        "web",
        &format!(
            "  type: LoadBalancer\n  clusterIP: {VIP}\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  ports:\n  - {{name: http, port: 80, targetPort: {POD_PORT}, nodePort: 30080}}\n"
        ),
        &format!("loadBalancer: {{ingress: [{{ip: {LB_IP}}}]}}"),
    );
    let ext = lab.ext_ns();
    apply(&lab, &(yaml.clone() + &web_slice(&[(&w3, READY)])), "service up", || {
        matches!(tcp_ask(&ext, sa(node_ip(2), 30080), ASK), Answer::Reply(..))
    });
    for _ in 0..5 {
        match tcp_ask(&ext, sa(node_ip(2), 30080), ASK) {
            Answer::Reply(pod, client) => {
                assert_eq!(pod, "web-3");
                assert!(client.starts_with(&format!("{EXT_IP}:")), "client address not kept: {client}");
            }
            other => panic!("ETP=Local via node-2: {other:?}"),
        }
    }
    // node-1 has no local endpoint: dropped, not refused.
    assert_eq!(tcp_ask(&ext, sa(node_ip(1), 30080), ASK), Answer::Timeout);
    // healthCheckNodePort: node-2 200 with one endpoint, node-1 503.
    let hc = |n: u8| curl_status(&ext, &format!("http://{}:32000/", node_ip(n)));
    assert_eq!(hc(2).0, 200, "{:?}", hc(2));
    assert!(hc(2).1.contains("\"localEndpoints\":1"), "{:?}", hc(2));
    assert_eq!(hc(1).0, 503);
    // Cluster-internal traffic is not affected: the ClusterIP from node-1 reaches web-3.
    assert_eq!(tcp_ask(&lab.pod("client").ns, sa(vip(), 80), ASK).pod(), Some("web-3"));
    // Only a terminating endpoint left: 503, while traffic keeps flowing to it.
    apply(
        &lab,
        &(yaml + &web_slice(&[(&w3, "ready: false, serving: true, terminating: true")])),
        "terminating",
        || hc(2).0 == 503,
    );
    assert_eq!(tcp_ask(&ext, sa(node_ip(2), 30080), ASK).pod(), Some("web-3"));
}

fn curl_status(ns: &str, url: &str) -> (u16, String) {
    let out =
        lab::in_ns(ns, &["curl", "-s", "--max-time", "2", "-w", "\n%{http_code}", url]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn internal_traffic_policy_local_has_no_fallback_to_remote_endpoints() {
    let Some(lab) = lab() else { return };
    let w3 = lab.pod("web-3").clone();
    let yaml = web("ClusterIP", "  internalTrafficPolicy: Local\n") + &web_slice(&[(&w3, READY)]);
    let c2 = lab.pod("client-2").ns.clone();
    apply(&lab, &yaml, "service up", || tcp_ask(&c2, sa(vip(), 80), ASK).pod() == Some("web-3"));
    // node-1 has no local endpoint: dropped (not refused, no fallback to web-3).
    let c1 = lab.pod("client").ns.clone();
    assert_eq!(tcp_ask(&c1, sa(vip(), 80), ASK), Answer::Timeout);
    assert_eq!(udp_ask(&c1, sa(vip(), 80), 0, ASK), Answer::Timeout);
}

#[test]
fn open_tcp_connection_survives_removal_of_other_backends_and_table_changes() {
    let Some(mut lab) = lab() else { return };
    lab.add_pod(2, "web-4", 11, Some(&[POD_PORT])).unwrap();
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let ns = lab.pod("client").ns.clone();
    web_up(&lab, &ns, &all, Proto::Tcp);
    let mut conn = Conn::open(&ns, sa(vip(), 80));
    let mine = conn.ask().expect("first answer");
    // Remove the others, add a new one: the table changes, the connection stays.
    let others: Vec<&str> = ["web-1", "web-2", "web-3"].into_iter().filter(|p| *p != mine).collect();
    let keep = pods(&lab, &[mine.as_str(), "web-4"]);
    apply(&lab, &(web("ClusterIP", "") + &web_slice(&ready(&keep))), "table changed", || {
        let seen: BTreeSet<String> =
            (0..8).filter_map(|_| tcp_ask(&ns, sa(vip(), 80), ASK).pod().map(str::to_string)).collect();
        !seen.iter().any(|p| others.contains(&p.as_str()))
    });
    for _ in 0..5 {
        assert_eq!(conn.ask().as_deref(), Some(mine.as_str()), "the open connection moved or broke");
    }
}

#[test]
fn terminating_endpoint_keeps_its_connection_and_gets_no_new_ones() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let ns = lab.pod("client").ns.clone();
    web_up(&lab, &ns, &all, Proto::Tcp);
    let mut conn = Conn::open(&ns, sa(vip(), 80));
    let mine = conn.ask().expect("first answer");
    let eps: Vec<(&Pod, &str)> = all
        .iter()
        .map(|p| (*p, if p.name == mine { "ready: false, serving: true, terminating: true" } else { READY }))
        .collect();
    apply(&lab, &(web("ClusterIP", "") + &web_slice(&eps)), "terminating", || {
        (0..10).all(|_| tcp_ask(&ns, sa(vip(), 80), ASK).pod().is_some_and(|p| p != mine))
    });
    for _ in 0..20 {
        assert_ne!(
            tcp_ask(&ns, sa(vip(), 80), ASK).pod(),
            Some(mine.as_str()),
            "new flow to a terminating endpoint"
        );
    }
    assert_eq!(conn.ask().as_deref(), Some(mine.as_str()), "the terminating endpoint's connection broke");
    // serving=false is never used, even as a fallback.
    let not_serving: Vec<(&Pod, &str)> =
        all.iter().map(|p| (*p, "ready: false, serving: false, terminating: true")).collect();
    apply(&lab, &(web("ClusterIP", "") + &web_slice(&not_serving)), "none serving", || {
        tcp_ask(&ns, sa(vip(), 80), ASK) == Answer::Refused
    });
}

#[test]
fn no_endpoints_refuse_at_once_tcp_rst_udp_icmp_unknown_port_and_nodeport() {
    let Some(lab) = lab() else { return };
    let ns = lab.pod("client").ns.clone();
    let ext = lab.ext_ns();
    // An empty slice, as a scaled-to-zero Deployment leaves.
    apply(&lab, &(web("NodePort", "") + &web_slice(&[])), "service up", || {
        tcp_ask(&ns, sa(vip(), 80), ASK) == Answer::Refused
    });
    for (who, ns, to) in [("pod", &ns, sa(vip(), 80)), ("external", &ext, sa(node_ip(1), 30080))] {
        for p in [Proto::Tcp, Proto::Udp] {
            let t = Instant::now();
            assert_eq!(ask(ns, to, p), Answer::Refused, "{who} {p:?}");
            assert!(t.elapsed() < Duration::from_millis(200), "{who} {p:?}: refused after {:?}", t.elapsed());
        }
    }
    // A port the ClusterIP does not serve is refused too.
    assert_eq!(tcp_ask(&ns, sa(vip(), 8443), ASK), Answer::Refused);
    assert_eq!(udp_ask(&ns, sa(vip(), 5353), 0, ASK), Answer::Refused);
    // Without any slice at all: same.
    apply(&lab, &web("NodePort", ""), "no slice", || tcp_ask(&ns, sa(vip(), 80), ASK) == Answer::Refused);
    // Deleting the Service tears everything down: the VIP is just an unrouted address again.
    lab.remove_manifest("web.yaml").unwrap();
    wait_for(LIVE, || {
        Ok(!lab.has_frontend(1, vip(), 80)? && !lab.has_frontend(1, IpAddr::V4(node_ip(1)), 30080)?)
    })
    .unwrap();
    assert!(!matches!(tcp_ask(&ns, sa(vip(), 80), ASK), Answer::Reply(..) | Answer::Refused));
}

#[test]
fn udp_flow_with_a_fixed_source_port_moves_off_a_removed_backend_within_a_second() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let ns = lab.pod("client").ns.clone();
    web_up(&lab, &ns, &all, Proto::Udp);
    const SPORT: u16 = 40_000;
    let first = udp_ask(&ns, sa(vip(), 80), SPORT, ASK).pod().expect("answer").to_string();
    // Sticks while nothing changes: every answer from the same pod. (UDP is not resent: on
    // a loaded CI machine one datagram of five may be lost, which says nothing of the flow.)
    let answers: Vec<String> =
        (0..5).filter_map(|_| udp_ask(&ns, sa(vip(), 80), SPORT, ASK).pod().map(str::to_string)).collect();
    assert!(answers.len() >= 4 && answers.iter().all(|p| *p == first), "{first} then {answers:?}");
    // Remove it from the slice (the pod keeps running and would still answer).
    let rest: Vec<(&Pod, &str)> = all.iter().filter(|p| p.name != first).map(|p| (*p, READY)).collect();
    let t0 = Instant::now();
    lab.write_manifest("web.yaml", &(web("ClusterIP", "") + &web_slice(&rest))).unwrap();
    let moved = wait_for(LIVE * 3, || {
        Ok(udp_ask(&ns, sa(vip(), 80), SPORT, Duration::from_millis(100)).pod().is_some_and(|p| p != first))
    })
    .expect("UDP flow never moved");
    println!("UDP flow with fixed source port moved off the removed backend after {moved:?}");
    assert!(t0.elapsed() <= LIVE + Duration::from_millis(200), "took {:?}", t0.elapsed());
    // Endpoints that start out unready: refused while none is ready, answered within a
    // second of becoming ready, from the same source port.
    let unready: Vec<(&Pod, &str)> = all.iter().map(|p| (*p, "ready: false")).collect();
    apply(&lab, &(web("ClusterIP", "") + &web_slice(&unready)), "unready", || {
        udp_ask(&ns, sa(vip(), 80), SPORT, ASK) == Answer::Refused
    });
    apply(&lab, &(web("ClusterIP", "") + &web_slice(&ready(&all))), "ready again", || {
        matches!(udp_ask(&ns, sa(vip(), 80), SPORT, Duration::from_millis(100)), Answer::Reply(..))
    });
}

#[test]
fn broken_manifest_is_reported_with_file_and_reason_and_changes_nothing() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-3"]);
    let ns = lab.pod("client").ns.clone();
    let good = web("ClusterIP", "") + &web_slice(&ready(&all));
    apply(&lab, &good, "service up", || matches!(tcp_ask(&ns, sa(vip(), 80), ASK), Answer::Reply(..)));
    // A broken version: invalid YAML types, and one with an invalid clusterIP.
    for (bad, reason) in [
        (good.replace("port: 80,", "port: eighty,"), "document"),
        (good.replace(VIP, "198.19.0.300"), "clusterIP"),
    ] {
        lab.write_manifest("web.yaml", &bad).unwrap();
        wait_for(LIVE, || Ok(lab.agent_log(1).contains(reason) && lab.agent_log(1).contains("web.yaml")))
            .unwrap_or_else(|_| panic!("no error naming web.yaml and {reason:?}:\n{}", lab.agent_log(1)));
        std::thread::sleep(Duration::from_millis(300));
        reach_all(&ns, sa(vip(), 80), Proto::Tcp, &["web-1", "web-3"]);
    }
    assert!(lab.agent_log(1).contains("keeping its last good content"));
}

#[test]
fn change_to_datapath_latency_is_measured_and_under_a_second() {
    let Some(lab) = lab() else { return };
    let ns = lab.pod("client").ns.clone();
    let w1 = lab.pod("web-1").clone();
    let w3 = lab.pod("web-3").clone();
    apply(&lab, &(web("ClusterIP", "") + &web_slice(&[(&w1, READY)])), "service up", || {
        udp_ask(&ns, sa(vip(), 80), 0, ASK).pod() == Some("web-1")
    });
    let mut samples = Vec::new();
    for (from, to) in [(&w1, &w3), (&w3, &w1), (&w1, &w3), (&w3, &w1), (&w1, &w3)] {
        let t0 = Instant::now();
        lab.write_manifest("web.yaml", &(web("ClusterIP", "") + &web_slice(&[(to, READY)]))).unwrap();
        // Probe back to back with fresh flows (each answered in well under a millisecond):
        // the time of the first request that lands on the new backend.
        let landed = loop {
            let sent = t0.elapsed();
            if udp_ask(&ns, sa(vip(), 80), 0, Duration::from_millis(50)).pod() == Some(&to.name) {
                break sent;
            }
            assert!(sent < LIVE * 3, "{} -> {}: no packet on the new backend", from.name, to.name);
        };
        samples.push(landed);
    }
    samples.sort();
    println!(
        "change-to-datapath latency (manifest write -> first packet on the new backend): min {:?}, median {:?}, max {:?} ({} samples; inotify, {} ms poll as fallback)",
        samples[0],
        samples[samples.len() / 2],
        samples[samples.len() - 1],
        samples.len(),
        lb_userspace::source::manifests::POLL.as_millis()
    );
    assert!(samples[samples.len() - 1] < LIVE, "{samples:?}");
}

#[test]
fn load_balancer_source_ranges_allow_drop_and_nodeport_bypass() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-3"]);
    let lb = |ranges: &str| web_lb_with_ranges(ranges) + &web_slice(&ready(&all));
    let ext = lab.ext_ns();
    let lb_ip: IpAddr = LB_IP.parse().unwrap();
    apply(&lab, &lb(&format!("{EXT_IP}/32")), "allowed", || {
        matches!(tcp_ask(&ext, sa(lb_ip, 80), ASK), Answer::Reply(..))
    });
    apply(&lab, &lb("198.18.9.0/24"), "denied", || tcp_ask(&ext, sa(lb_ip, 80), ASK) == Answer::Timeout);
    // The nodePort bypasses the ranges.
    assert!(matches!(tcp_ask(&ext, sa(node_ip(1), 30080), ASK), Answer::Reply(..)));
    // Scaled to zero, from an allowed source: refused.
    let zero = lb(&format!("{EXT_IP}/32")).replace(&web_slice(&ready(&all)), &web_slice(&[]));
    apply(&lab, &zero, "scaled to zero", || tcp_ask(&ext, sa(lb_ip, 80), ASK) == Answer::Refused);
}

#[test]
fn large_udp_datagrams_are_fragmented_and_still_translated() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-3"]);
    let ns = lab.pod("client").ns.clone();
    web_up(&lab, &ns, &all, Proto::Udp);
    let to = sa(vip(), 80);
    for _ in 0..6 {
        let reply = big_datagram(&ns, to).expect("2000-byte datagram answered");
        assert!(reply.starts_with("web-"), "{reply}");
    }
}

/// The API server stand-in, served on 127.0.0.1:6443 inside both nodes' namespaces (each
/// agent reaches "its" API server), running on a thread of its own.
fn api_in_nodes(lab: &Lab) -> lb_tests::api::ApiStandIn {
    let listeners: Vec<std::net::TcpListener> = [1, 2]
        .iter()
        .map(|n| {
            in_netns(&lab.node_netns(*n), || std::net::TcpListener::bind("127.0.0.1:6443")).unwrap().unwrap()
        })
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let mut it = listeners.into_iter();
            let api = lb_tests::api::ApiStandIn::start_on(it.next().unwrap());
            for l in it {
                api.serve(l);
            }
            tx.send(api).unwrap();
            std::future::pending::<()>().await;
        });
    });
    rx.recv().unwrap()
}

fn api_slice(pods: &[&Pod]) -> serde_json::Value {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let eps: Vec<serde_json::Value> = pods
        .iter()
        .map(|p| serde_json::json!({"addresses": [p.ip.to_string()], "nodeName": format!("node-{}", p.node), "conditions": {"ready": true}}))
        .collect();
    serde_json::json!({
        "metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"},
                     "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": jiff_free_rfc3339(now)}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": POD_PORT, "protocol": "TCP"}], "endpoints": eps})
}

/// Seconds since the epoch as RFC 3339 (UTC), without a date library.
fn jiff_free_rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[test]
fn kube_source_programs_the_datapath_and_a_lost_api_server_keeps_it() {
    use lb_tests::api::Kind;
    use serde_json::json;
    let Some(mut lab) = lab_without_agents() else { return };
    let api = api_in_nodes(&lab);
    for n in 1..=2u8 {
        api.apply(Kind::Node, json!({"metadata": {"name": format!("node-{n}")},
                                     "status": {"addresses": [{"type": "InternalIP", "address": node_ip(n).to_string()}]}}));
    }
    api.apply(
        Kind::Service,
        json!({"metadata": {"name": "web"}, "spec": {"type": "NodePort", "clusterIP": VIP,
        "ports": [{"name": "http", "port": 80, "targetPort": POD_PORT, "nodePort": 30080}]}}),
    );
    api.apply(Kind::EndpointSlice, api_slice(&pods(&lab, &["web-1", "web-3"])));
    let kc = lab.state.dir.join("kubeconfig");
    std::fs::write(&kc, lb_tests::api::ApiStandIn::kubeconfig("127.0.0.1:6443".parse().unwrap())).unwrap();
    lab.start_agent_kube(1, &kc).unwrap();
    lab.start_agent_kube(2, &kc).unwrap();
    let ns = lab.pod("client").ns.clone();
    wait_for(LIVE * 5, || Ok(matches!(tcp_ask(&ns, sa(vip(), 80), ASK), Answer::Reply(..)))).unwrap();
    reach_all(&ns, sa(vip(), 80), Proto::Tcp, &["web-1", "web-3"]);
    reach_all(&lab.ext_ns(), sa(node_ip(2), 30080), Proto::Tcp, &["web-1", "web-3"]);

    // An endpoint change through the API is live within a second.
    let t0 = Instant::now();
    api.apply(Kind::EndpointSlice, api_slice(&pods(&lab, &["web-3"])));
    wait_for(LIVE, || Ok(!lab.has_backend(1, IpAddr::V4(lab.pod("web-1").ip), POD_PORT)?)).unwrap();
    println!("kube source: endpoint removal in the datapath after {:?}", t0.elapsed());
    reach_all(&ns, sa(vip(), 80), Proto::Tcp, &["web-3"]);

    // The API server goes away: the datapath stays as it was.
    api.set_unavailable(true);
    api.drop_watches();
    for _ in 0..10 {
        assert_eq!(tcp_ask(&ns, sa(vip(), 80), ASK).pod(), Some("web-3"));
        std::thread::sleep(Duration::from_millis(200));
    }
    api.set_unavailable(false);
    api.apply(Kind::EndpointSlice, api_slice(&pods(&lab, &["web-2", "web-3"])));
    wait_for(LIVE * 15, || lab.has_backend(1, IpAddr::V4(lab.pod("web-2").ip), POD_PORT)).unwrap();
    reach_all(&ns, sa(vip(), 80), Proto::Tcp, &["web-2", "web-3"]);

    // Programming latency is measured like kube-proxy does.
    let metrics = lab.metrics(1).unwrap();
    let count = Lab::metric(&metrics, "kubeproxy_network_programming_duration_seconds_count").unwrap_or(0);
    assert!(count >= 2, "programming latency not observed:\n{metrics}");
    // The datapath's counters come with it (read off the agent's loop).
    let new_flows = Lab::metric(&metrics, "lb_packets_total{reason=\"new_flow\"}").unwrap_or(0);
    assert!(new_flows > 0, "no datapath counters:\n{metrics}");
    assert!(
        metrics.contains("lb_conntrack_entries_total ") && metrics.contains("lb_xdp_forward_packets_total{")
    );
    lab.teardown();
}

#[test]
fn agent_restart_loses_no_connection_flow_or_id() {
    let Some(mut lab) = lab() else { return };
    let owned: Vec<Pod> = ["web-1", "web-2", "web-3"].iter().map(|n| lab.pod(n).clone()).collect();
    let all: Vec<&Pod> = owned.iter().collect();
    let ns = lab.pod("client").ns.clone();
    web_up(&lab, &ns, &all, Proto::Tcp);
    let mut conn = Conn::open(&ns, sa(vip(), 80));
    let mine = conn.ask().expect("first answer");
    const SPORT: u16 = 41_000;
    let udp_backend = udp_ask(&ns, sa(vip(), 80), SPORT, ASK).pod().expect("udp").to_string();
    let services = |lab: &Lab| {
        use lb_userspace::dataplane::{AyaDataplane, Dataplane as _};
        let mut s = AyaDataplane::open(&lab.pin_dir(1)).unwrap().services().unwrap();
        s.sort_by_key(|(k, _)| *k);
        s
    };
    let before = services(&lab);

    lab.stop_agent(1);
    // No agent: the datapath stays attached and keeps serving, old flows and new.
    assert_eq!(conn.ask().as_deref(), Some(mine.as_str()));
    reach_all(&ns, sa(vip(), 80), Proto::Tcp, &["web-1", "web-2", "web-3"]);

    lab.start_agent(1, &[]).unwrap();
    assert!(lab.agent_log(1).contains("(Replaced)"), "the new agent must take over the pinned links");
    assert_eq!(conn.ask().as_deref(), Some(mine.as_str()), "the open connection survived the restart");
    assert_eq!(udp_ask(&ns, sa(vip(), 80), SPORT, ASK).pod(), Some(udp_backend.as_str()));
    assert_eq!(services(&lab), before, "frontends, ids and tables unchanged by the restart");
    // And the new agent is in charge.
    apply(&lab, &(web("ClusterIP", "") + &web_slice(&ready(&all[..2]))), "after restart", || {
        !lab.has_backend(1, IpAddr::V4(lab.pod("web-3").ip), POD_PORT).unwrap_or(true)
    });
}

/// `--xdp-forward`: a NodePort packet for a remote backend is translated and sent back out of
/// eth0 at XDP (XDP_TX), and so is the reply on its way back to the client; packets for a
/// local backend (egress: a pod veth, not an XDP port) still go up the stack. Every backend
/// answers over TCP and UDP, and node-1's counters show the XDP_TX path was taken.
#[test]
fn xdp_forward_sends_remote_backend_traffic_from_xdp() {
    use lb_common::abi::{XDP_FWD_REDIRECTED, XDP_FWD_TO_STACK, XDP_FWD_TX};
    use lb_userspace::dataplane::AyaDataplane;

    let Some(mut lab) = lab() else { return };
    for node in [1, 2] {
        lab.stop_agent(node);
        lab.start_agent(node, &["--xdp-forward"]).unwrap();
    }
    assert!(lab.agent_log(1).contains("XDP forwarding on, out of eth0"), "{}", lab.agent_log(1));
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    apply(&lab, &(web("NodePort", "") + &web_slice(&ready(&all))), "service up", || {
        lab.has_frontend(1, IpAddr::V4(node_ip(1)), 30080).unwrap_or(false)
    });
    let ext = lab.ext_ns();
    let counter =
        |slot| AyaDataplane::open(&lab.pin_dir(1)).unwrap().xdp_forward_counter(slot).unwrap().packets;
    let tx_before = counter(XDP_FWD_TX);
    for p in [Proto::Tcp, Proto::Udp] {
        let (seen, clients) = reach_all(&ext, sa(node_ip(1), 30080), p, &["web-1", "web-2", "web-3"]);
        assert_eq!(seen.len(), 3, "{p:?}: {seen:?}");
        // web-3 is remote: node-1 source-NATs, and the backend sees node-1.
        assert!(clients.contains(&node_ip(1).to_string()), "{p:?}: {clients:?}");
    }
    assert!(matches!(curl(&ext, &format!("http://{}:30080/", node_ip(1))), Answer::Reply(..)));
    let tx = counter(XDP_FWD_TX) - tx_before;
    // At least one request and one reply per answer web-3 gave went out by XDP_TX.
    assert!(tx >= 2, "XDP_TX {tx}, to stack {}", counter(XDP_FWD_TO_STACK));
    // There is no second XDP port on a lab node: nothing to redirect to.
    assert_eq!(counter(XDP_FWD_REDIRECTED), 0);
}

/// TC host routing (on by default): a pod's requests to a ClusterIP and the local backends'
/// replies leave TC straight for their next hop, past the node's netfilter, and so do the
/// remote backend's replies, translated by XDP on node-1's eth0 and sent on by the uplink
/// program at its TC ingress. With `--host-routing=false`, node-1's FORWARD chain counts the
/// client's packets to the backends and every backend's replies (web-1/web-2's, and web-3's
/// with the VIP as source once translated); with it on, the same traffic (TCP and UDP, to the
/// local web-1 and web-2 and the remote web-3) reaches every backend with the client's
/// address kept, the chain counts none of it, and the host-routing counters show peer
/// redirects (into the client and the local pods) and neighbour redirects (web-3 through the
/// underlay). A packet the FIB has no next hop for falls back to the stack and is counted so.
#[test]
fn host_routing_delivers_pod_traffic_past_the_nodes_stack() {
    use lb_common::abi::{HOST_ROUTE_NEIGH, HOST_ROUTE_PEER, HOST_ROUTE_TO_STACK};
    use lb_userspace::dataplane::AyaDataplane;

    let Some(mut lab) = lab() else { return };
    let ns = lab.pod("client").ns.clone();
    let client = lab.pod("client").ip.to_string();
    let node1 = lab.node_netns(1);
    let iptables = |args: &str| {
        let args: Vec<&str> = args.split_whitespace().collect();
        lab::sh(&mut lab::in_ns(&node1, &[&["iptables", "-w"], &args[..]].concat())).unwrap()
    };
    // The replies' sources as node-1 forwards them: the local pods', and the VIP (web-3's
    // replies, translated at XDP).
    let repliers = format!("{},{},{}", lab.pod("web-1").ip, lab.pod("web-2").ip, vip());
    iptables(&format!("-I FORWARD -s {client} -j ACCEPT"));
    iptables(&format!("-I FORWARD -s {repliers} -d {client} -j ACCEPT"));
    // Packets counted by the two rules (the second is three rules, one per source).
    let forwarded = || -> u64 {
        iptables("-nvxL FORWARD")
            .lines()
            .filter(|l| l.contains(&client))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    };
    let exercise = || {
        for p in [Proto::Tcp, Proto::Udp] {
            let (seen, clients) = reach_all(&ns, sa(vip(), 80), p, &["web-1", "web-2", "web-3"]);
            assert_eq!(seen.len(), 3, "{p:?}: {seen:?}");
            assert_eq!(clients, BTreeSet::from([client.clone()]), "{p:?}: the pod source is kept");
        }
        assert!(matches!(curl(&ns, &format!("http://{}/", vip())), Answer::Reply(..)));
    };

    for node in [1, 2] {
        lab.stop_agent(node);
        lab.start_agent(node, &["--host-routing=false"]).unwrap();
    }
    web_up(&lab, &ns, &pods(&lab, &["web-1", "web-2", "web-3"]), Proto::Tcp);
    let before = forwarded();
    exercise();
    let through_stack = forwarded() - before;
    assert!(through_stack > 0, "without host routing the node forwards the pod's packets");
    let vip_replies = || -> u64 {
        iptables("-nvxL FORWARD")
            .lines()
            .filter(|l| l.contains(&client) && l.contains(&vip().to_string()))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    };
    assert!(vip_replies() > 0, "without host routing web-3's translated replies take the stack");

    for node in [1, 2] {
        lab.stop_agent(node);
        lab.start_agent(node, &[]).unwrap();
    }
    assert!(lab.agent_log(1).contains("TC host routing on"), "{}", lab.agent_log(1));
    let listed = wait_for(Duration::from_secs(5), || Ok(status(&lab, 1).2.contains("tc-uplink")));
    assert!(listed.is_ok(), "the uplink program is listed on eth0: {}", status(&lab, 1).2);
    let counter =
        |slot| AyaDataplane::open(&lab.pin_dir(1)).unwrap().host_routing_counter(slot).unwrap().packets;
    let (peer0, neigh0) = (counter(HOST_ROUTE_PEER), counter(HOST_ROUTE_NEIGH));
    let before = forwarded();
    exercise();
    let (peer, neigh) = (counter(HOST_ROUTE_PEER) - peer0, counter(HOST_ROUTE_NEIGH) - neigh0);
    assert_eq!(forwarded() - before, 0, "host-routed packets never reach the FORWARD chain");
    // Each answer of web-1/web-2 took at least a request and a reply; each of web-3's a request
    // (out of the underlay) and a reply (into the client, from the uplink program).
    assert!(peer >= 10, "peer redirects {peer}");
    assert!(neigh >= 2, "neighbour redirects {neigh}");

    // A backend the FIB has no next hop for (an unreachable route) is left to the stack,
    // which refuses it as before, and counted.
    let nowhere = lab::pod_ip(1, 50);
    lab::sh(&mut lab::in_ns(&node1, &["ip", "route", "add", "unreachable", &format!("{nowhere}/32")]))
        .unwrap();
    let to_stack0 = counter(HOST_ROUTE_TO_STACK);
    let gone = Pod { ip: nowhere, ..lab.pod("web-1").clone() };
    apply(&lab, &(web("ClusterIP", "") + &web_slice(&ready(&[&gone]))), "unroutable backend", || {
        lab.has_backend(1, IpAddr::V4(nowhere), POD_PORT).unwrap_or(false)
    });
    assert!(!matches!(tcp_ask(&ns, sa(vip(), 80), ASK), Answer::Reply(..)));
    assert!(counter(HOST_ROUTE_TO_STACK) > to_stack0, "the unroutable packet was counted as to-stack");
}

/// Endpoints at a node's own address, as hostNetwork pods have (the API server behind
/// `kubernetes.default` on a control-plane node): scenarios 16 and 40. A pod on that node, a
/// pod on the other node, an outside client through either node's NodePort, and the node
/// itself all reach it, TCP and UDP, answered from the address they asked. The answers to a
/// pod on the node and to its own NodePort leave the node's stack past every ingress hook:
/// the egress program translates them (before it, they came from 198.18.0.1:10180, which no
/// socket of the client's matches).
#[test]
fn a_backend_at_the_nodes_own_address_serves_pods_nodeports_and_the_node() {
    const HOST_VIP: &str = "198.19.0.20";
    const HOST_PORT: u16 = 10180;
    let Some(mut lab) = lab() else { return };
    let host = lab.add_host_pod(1, "host-1", &[HOST_PORT]).unwrap();
    let vip: IpAddr = HOST_VIP.parse().unwrap();
    let spec = format!(
        "  type: NodePort\n  clusterIP: {HOST_VIP}\n  ports:\n  - {{name: http, port: 80, targetPort: {HOST_PORT}, nodePort: 30180}}\n  - {{name: udp, port: 80, protocol: UDP, targetPort: {HOST_PORT}, nodePort: 30180}}\n"
    );
    let ports = [("http", HOST_PORT, "TCP"), ("udp", HOST_PORT, "UDP")];
    let yaml = service("host", &spec, "") + &slice_yaml("host-1", "host", &ports, &[(&host, READY)]);
    apply(&lab, &yaml, "service up", || {
        lab.has_frontend(1, vip, 80).unwrap_or(false) && lab.has_frontend(2, vip, 80).unwrap_or(false)
    });
    let replies = lab.counted(1, lb_common::verdict::Reason::Reply).unwrap();
    let askers = [
        ("a pod on node-1", lab.pod("client").ns.clone(), sa(vip, 80)),
        ("a pod on node-2", lab.pod("client-2").ns.clone(), sa(vip, 80)),
        ("outside, NodePort on node-1", lab.ext_ns(), sa(node_ip(1), 30180)),
        ("outside, NodePort on node-2", lab.ext_ns(), sa(node_ip(2), 30180)),
        ("node-1 itself", lab.node_netns(1), sa(vip, 80)),
    ];
    for (who, ns, to) in &askers {
        for p in [Proto::Tcp, Proto::Udp] {
            match ask(ns, *to, p) {
                Answer::Reply(name, _) => assert_eq!(name, "host-1", "{who}, {p:?}"),
                other => panic!("{who}, {p:?} to {to}: {other:?}\nnode-1 agent:\n{}", lab.agent_log(1)),
            }
        }
    }
    assert!(
        lab.counted(1, lb_common::verdict::Reason::Reply).unwrap() > replies,
        "node-1 counted the replies"
    );
    // The egress program runs only where a backend is at the node's own address.
    let on_node_1 = egress_hooks(&lab, 1);
    assert!(on_node_1.contains("eth0") && on_node_1.contains("lbp-client"), "{on_node_1:?}");
    assert_eq!(egress_hooks(&lab, 2), BTreeSet::new(), "none on node-2");
    assert!(lab.agent_log(1).contains("lb_tc_egress attached at TC egress"), "{}", lab.agent_log(1));
    // A restarted agent keeps it (its first sync writes no backend): open flows to that
    // backend go on.
    let mut conn = Conn::open(&lab.pod("client").ns, sa(vip, 80));
    lab.stop_agent(1);
    lab.start_agent(1, &[]).unwrap();
    assert_eq!(egress_hooks(&lab, 1), on_node_1);
    assert_eq!(conn.ask().as_deref(), Some("host-1"), "the open connection still answers");
}

/// The interfaces `lb status` lists with the egress program on `node`.
fn egress_hooks(lab: &Lab, node: u8) -> BTreeSet<String> {
    let (_, s, _) = status(lab, node);
    let all = s["report"]["attachments"].as_array().cloned().unwrap_or_default();
    all.iter().filter(|a| a["hook"] == "tc-egress").map(|a| a["interface"].as_str().unwrap().into()).collect()
}

/// `--node-hook tc`: no XDP on the node interfaces; the TC program at their ingress serves
/// what XDP would: NodePort traffic to local and remote backends (TCP and UDP, the remote
/// one source-NATed) and the remote backend's replies to a pod's ClusterIP requests, with
/// host routing. `lb status` lists it as `tc-node`. Back on `--node-hook xdp`, XDP is in
/// and the TC program is off the interface again.
#[test]
fn node_hook_tc_serves_the_node_interfaces_without_xdp() {
    let Some(mut lab) = lab() else { return };
    let node1 = lab.node_netns(1);
    let ip_link = |ns: &str| lab::sh(&mut lab::in_ns(ns, &["ip", "-d", "link", "show", "eth0"])).unwrap();
    let node_tc_pin = lab.pin_dir(1).join("links/nodetc-eth0");
    for node in [1, 2] {
        lab.stop_agent(node);
        lab.start_agent(node, &["--node-hook", "tc"]).unwrap();
    }
    assert!(lab.agent_log(1).contains("TC (--node-hook tc) attached to eth0"), "{}", lab.agent_log(1));
    assert!(!ip_link(&node1).contains("xdp"), "no XDP left on eth0: {}", ip_link(&node1));
    assert!(node_tc_pin.exists(), "the TC link is pinned");
    let listed = wait_for(Duration::from_secs(5), || Ok(status(&lab, 1).2.contains("tc-node")));
    assert!(listed.is_ok(), "listed as tc-node: {}", status(&lab, 1).2);
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    apply(&lab, &(web("NodePort", "") + &web_slice(&ready(&all))), "service up", || {
        lab.has_frontend(1, IpAddr::V4(node_ip(1)), 30080).unwrap_or(false)
            && lab.has_frontend(1, vip(), 80).unwrap_or(false)
    });
    let ext = lab.ext_ns();
    for p in [Proto::Tcp, Proto::Udp] {
        let (seen, clients) = reach_all(&ext, sa(node_ip(1), 30080), p, &["web-1", "web-2", "web-3"]);
        assert_eq!(seen.len(), 3, "{p:?}: {seen:?}");
        // web-1/web-2 are local and see the client; web-3 sees node-1, which source-NATed.
        assert_eq!(clients, BTreeSet::from([EXT_IP.to_string(), node_ip(1).to_string()]), "{p:?}");
    }
    assert!(matches!(curl(&ext, &format!("http://{}:30080/", node_ip(1))), Answer::Reply(..)));
    // `lb monitor` names the hook: TC on a node interface.
    let e = first_new_flow_event(&lab, || {
        let _ = tcp_ask(&ext, sa(node_ip(1), 30080), ASK);
    });
    assert_eq!((e["interface"].as_str(), e["hook"].as_str()), (Some("eth0"), Some("tc-node")), "{e}");
    let ns = lab.pod("client").ns.clone();
    for p in [Proto::Tcp, Proto::Udp] {
        let (seen, clients) = reach_all(&ns, sa(vip(), 80), p, &["web-1", "web-2", "web-3"]);
        assert_eq!(seen.len(), 3, "{p:?}: {seen:?}");
        assert_eq!(clients, BTreeSet::from([lab.pod("client").ip.to_string()]), "{p:?}");
    }
    lab.stop_agent(1);
    lab.start_agent(1, &[]).unwrap();
    assert!(ip_link(&node1).contains("xdp"), "XDP back on eth0: {}", ip_link(&node1));
    assert!(!node_tc_pin.exists(), "the TC link is gone with its pin");
    assert!(!status(&lab, 1).2.contains("tc-node"), "{}", status(&lab, 1).2);
    let (seen, _) = reach_all(&ext, sa(node_ip(1), 30080), Proto::Tcp, &["web-1", "web-2", "web-3"]);
    assert_eq!(seen.len(), 3, "{seen:?}");
}

/// `lb monitor -o json` with `extra` on node-1, once it has said (on stderr, which then
/// closes for us) that its lease is set.
fn start_monitor(lab: &Lab, extra: &[&str]) -> std::process::Child {
    use std::io::BufRead as _;
    let (lb, pin_dir) = (lab.state.bins.lb.to_string_lossy().into_owned(), lab.pin_dir(1));
    let mut args = vec![lb.as_str(), "--pin-dir", pin_dir.to_str().unwrap(), "monitor", "-o", "json"];
    args.extend_from_slice(extra);
    let mut child = lab::in_ns(&lab.node_netns(1), &args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    std::io::BufReader::new(child.stderr.take().unwrap()).read_line(&mut said).unwrap();
    assert!(said.contains("monitor:"), "{said}");
    child
}

/// The first new-flow event `lb monitor -o json` shows on node-1 while `traffic` runs.
fn first_new_flow_event(lab: &Lab, traffic: impl Fn()) -> serde_json::Value {
    let mut monitor = start_monitor(lab, &["--type", "new-flow", "--count", "1"]);
    traffic();
    let out = wait_child(&mut monitor, Duration::from_secs(10));
    serde_json::from_str(out.lines().next().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// One agent per pin dir: a second `lb agent` on node-1's pin dir exits at once, naming the
/// running agent's pid, and the first one keeps serving.
#[test]
fn a_second_agent_on_the_same_pin_dir_is_refused_naming_the_holder() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let ns = lab.pod("client").ns.clone();
    web_up(&lab, &ns, &all, Proto::Tcp);
    let bins = Bins::beside(&std::env::current_exe().unwrap()).unwrap();
    let empty = std::env::temp_dir().join(format!("lb-second-agent-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let t0 = Instant::now();
    let out = lab::in_ns(&lab.node_netns(1), &[bins.lb.to_str().unwrap(), "agent"])
        .arg("--pin-dir")
        .arg(lab.pin_dir(1))
        .arg("--manifests")
        .arg(&empty)
        .args(["--node-name", "node-1", "--xdp-iface", "eth0"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir(&empty);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second agent must not run: {err}");
    assert!(t0.elapsed() < Duration::from_secs(5), "it must exit at once");
    assert!(err.contains("another lb agent (pid "), "{err}");
    // The first agent still serves and syncs.
    assert!(matches!(tcp_ask(&ns, sa(vip(), 80), ASK), Answer::Reply(..)));
    apply(&lab, &(web("ClusterIP", "") + &web_slice(&ready(&all[..2]))), "first agent in charge", || {
        !lab.has_backend(1, IpAddr::V4(lab.pod("web-3").ip), POD_PORT).unwrap_or(true)
    });
}

/// A second Service claiming the `web` VIP and port (in another namespace, created later)
/// takes nothing: a client asking all along gets only web's pods and no failure, and
/// deleting the second Service leaves web's frontend alone. In the other order (the claimant
/// older), web's arrival and departure leave the older one's traffic alone.
#[test]
fn a_second_service_on_the_same_vip_takes_nothing_in_either_order() {
    let Some(lab) = lab() else { return };
    let client = lab.pod("client").ns.clone();
    let at = |ts: &str| format!("creationTimestamp: '{ts}'");
    let web_yaml = |ts: &str| {
        service(
            "web",
            &format!("  clusterIP: {VIP}\n  ports:\n  - {{name: http, port: 80, targetPort: {POD_PORT}}}\n"),
            "",
        )
        .replace("metadata: {name: web}", &format!("metadata: {{name: web, {}}}", at(ts)))
            + &slice_yaml(
                "web-1",
                "web",
                &[("http", POD_PORT, "TCP")],
                &ready(&pods(&lab, &["web-1", "web-2"])),
            )
    };
    let thief_yaml = |ts: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: thief, namespace: other, {}}}\nspec: {{clusterIP: {VIP}, ports: [{{name: http, port: 80, targetPort: {POD_PORT}}}]}}\n---\n{}",
            at(ts),
            slice_yaml("thief-1", "thief", &[("http", POD_PORT, "TCP")], &ready(&pods(&lab, &["web-3"])))
                .replace("metadata: {name: thief-1,", "metadata: {name: thief-1, namespace: other,")
        )
    };
    for (owner, owner_pods, other) in
        [("web", ["web-1", "web-2"], "thief"), ("thief", ["web-3", "web-3"], "web")]
    {
        let (owner_yaml, other_yaml) = if owner == "web" {
            (web_yaml("2024-01-01T00:00:00Z"), thief_yaml("2025-01-01T00:00:00Z"))
        } else {
            (thief_yaml("2024-01-01T00:00:00Z"), web_yaml("2025-01-01T00:00:00Z"))
        };
        lab.remove_manifest("web.yaml").ok();
        lab.remove_manifest("other.yaml").ok();
        lab.write_manifest("owner.yaml", &owner_yaml).unwrap();
        wait_for(Duration::from_secs(3), || {
            Ok(tcp_ask(&client, sa(vip(), 80), ASK).pod().is_some_and(|p| owner_pods.contains(&p)))
        })
        .unwrap();
        let asker = Asker::start(&client, sa(vip(), 80));
        std::thread::sleep(Duration::from_millis(500));
        lab.write_manifest("other.yaml", &other_yaml).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        lab.remove_manifest("other.yaml").unwrap();
        std::thread::sleep(Duration::from_secs(2));
        let (answered, failures) = asker.finish();
        assert!(failures.is_empty(), "{owner} owns the VIP; {other} came and went: failures {failures:?}");
        assert!(
            answered.iter().all(|p| owner_pods.contains(&p.as_str())),
            "{owner}'s VIP answered by {answered:?}"
        );
        let log = lab.agent_log(1);
        assert!(log.contains("is already") && log.contains(other), "the loser is reported:\n{log}");
        lab.remove_manifest("owner.yaml").unwrap();
    }
}

/// A restart while a manifest is broken: the new agent serves the file's last good content
/// (saved in its state dir) and says so; a client asking all along never fails.
#[test]
fn a_restart_with_a_broken_manifest_keeps_its_services() {
    let Some(mut lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let client = lab.pod("client").ns.clone();
    web_up(&lab, &client, &all, Proto::Tcp);
    let asker = Asker::start(&client, sa(vip(), 80));
    lab.write_manifest("web.yaml", "kind: Service\n  broken: [indentation").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    lab.stop_agent(1);
    lab.start_agent(1, &[]).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (answered, failures) = asker.finish();
    assert!(failures.is_empty(), "{failures:?}\n{}", lab.agent_log(1));
    assert_eq!(answered.len(), 3, "{answered:?}");
    let log = lab.agent_log(1);
    assert!(log.contains("serving its last good content saved before the restart"), "{log}");
    assert!(lab.has_frontend(1, vip(), 80).unwrap(), "the frontend is still programmed");
}

/// A manifest rewritten in place — in two chunks 1.5 s apart, and by `cat x > f` five times
/// — is applied only whole: the second Service in it never disappears. (Rewrites back to back
/// within one clock tick of the previous close can still be read half-way: see
/// `manifests::closed_since_written`.)
#[test]
fn a_manifest_rewritten_in_place_is_applied_only_whole() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let client = lab.pod("client").ns.clone();
    let api_vip: IpAddr = "198.19.0.11".parse().unwrap();
    let api = service(
        "api",
        &format!("  clusterIP: {api_vip}\n  ports:\n  - {{name: http, port: 80, targetPort: {POD_PORT}}}\n"),
        "",
    ) + &slice_yaml("api-1", "api", &[("http", POD_PORT, "TCP")], &ready(&all));
    // Cut at a document boundary: the first chunk alone is a valid file without `api`.
    let first = web("ClusterIP", "") + &web_slice(&ready(&all));
    let whole = first.clone() + "---\n" + &api;
    apply(&lab, &whole, "both up", || matches!(tcp_ask(&client, sa(api_vip, 80), ASK), Answer::Reply(..)));
    let asker = Asker::start(&client, sa(api_vip, 80));
    let path = lab.state.manifests.join("web.yaml");
    {
        let mut f = std::fs::File::create(&path).unwrap(); // truncates, like `>`
        f.write_all(first.as_bytes()).unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        f.write_all(&whole.as_bytes()[first.len()..]).unwrap();
    }
    // `cat x > f` five times, 200 ms apart.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(200));
        let mut f = std::fs::File::create(&path).unwrap();
        for chunk in whole.as_bytes().chunks(64) {
            f.write_all(chunk).unwrap();
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let (_, failures) = asker.finish();
    assert!(failures.is_empty(), "the second Service went away: {failures:?}\n{}", lab.agent_log(1));
}

/// `/healthz` goes to 503 within `--healthz-stale-after` while syncs fail (a Service set over
/// `--max-services`), answering in milliseconds all along, while `/livez` stays 200; it comes
/// back to 200 once a sync succeeds. The datapath keeps serving what it had.
#[test]
fn healthz_fails_while_syncs_fail_and_recovers() {
    let Some(mut lab) = lab() else { return };
    lab.stop_agent(1);
    lab.start_agent(1, &["--healthz-stale-after", "2s", "--max-services", "4"]).unwrap();
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let client = lab.pod("client").ns.clone();
    web_up(&lab, &client, &all, Proto::Tcp);
    let get = |path: &str| health(&lab, 1, path);
    assert_eq!(get("/healthz").0, "200");
    let asker = Asker::start(&client, sa(vip(), 80));
    let extra: String = (0..3)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: extra-{i}}}\nspec: {{clusterIP: 198.19.0.{}, ports: [{{name: http, port: 80}}]}}\n---\n",
                20 + i
            )
        })
        .collect();
    lab.write_manifest("extra.yaml", &extra).unwrap();
    let t0 = Instant::now();
    let mut slowest = Duration::ZERO;
    loop {
        let (code, took) = get("/healthz");
        slowest = slowest.max(took);
        if code == "503" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(6),
            "/healthz still {code} while syncs fail\n{}",
            lab.agent_log(1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let went_bad = t0.elapsed();
    assert!(went_bad >= Duration::from_secs(2), "503 only after the threshold ({went_bad:?})");
    assert_eq!(get("/livez").0, "200", "the loop is alive");
    assert!(slowest < Duration::from_millis(500), "health answered slowly: {slowest:?}");
    lab.remove_manifest("extra.yaml").unwrap();
    wait_for(Duration::from_secs(3), || Ok(get("/healthz").0 == "200"))
        .expect("back to 200 after a good sync");
    let (_, failures) = asker.finish();
    assert!(failures.is_empty(), "the datapath kept serving: {failures:?}");
    assert!(lab.agent_log(1).contains("service ids exhausted"), "{}", lab.agent_log(1));
}

/// 50 ClusterIP Services next to `web`; `svc-7`'s endpoints are `seven`.
fn fifty_services(all: &[&Pod], seven: &[&Pod]) -> String {
    (1..=50)
        .map(|i| {
            let name = format!("svc-{i}");
            service(
                &name,
                &format!("  clusterIP: 198.19.1.{i}\n  ports:\n  - {{name: http, port: 80, targetPort: {POD_PORT}}}\n"),
                "",
            ) + &slice_yaml(&format!("{name}-1"), &name, &[("http", POD_PORT, "TCP")], &ready(if i == 7 { seven } else { all }))
                + "---\n"
        })
        .collect()
}

/// A Service with `endpoints` made-up endpoints (198.18.200.x, never asked) and `extra` spec.
fn big_service(endpoints: u8, type_: &str, extra: &str, status: &str) -> String {
    let eps: Vec<String> = (1..=endpoints)
        .map(|i| format!("{{addresses: ['198.18.200.{i}'], nodeName: node-2, conditions: {{ready: true}}}}"))
        .collect();
    service(
        "big",
        &format!(
            "  type: {type_}\n  clusterIP: 198.19.2.1\n{extra}  ports:\n  - {{name: http, port: 80, targetPort: {POD_PORT}, nodePort: 30090}}\n"
        ),
        status,
    ) + &format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: big-1, labels: {{kubernetes.io/service-name: big}}}}\naddressType: IPv4\nports: [{{name: http, port: {POD_PORT}, protocol: TCP}}]\nendpoints: [{}]\n",
        eps.join(", ")
    )
}

/// One Service over each capacity, next to 50 good ones: it alone is skipped, named in the
/// log and in `lb_service_unprogrammed` with the flag that raises the limit, while the 50
/// are programmed, an endpoint change in one of them during the failure is applied, and
/// `web` serves throughout (restarts included). Nothing of the skipped Service's port
/// reaches a map.
#[test]
fn a_service_over_a_capacity_is_skipped_and_everything_else_applied() {
    let Some(mut lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let client = lab.pod("client").ns.clone();
    web_up(&lab, &client, &all, Proto::Tcp);
    // svc-7 with all three endpoints, and with two.
    let (fifty, fifty_changed) = (fifty_services(&all, &all), fifty_services(&all, &all[..2]));
    lab.write_manifest("others.yaml", &fifty).unwrap();
    let others_up =
        |lab: &Lab| (1..=50).all(|i| lab.has_frontend(1, IpAddr::from([198, 19, 1, i]), 80).unwrap_or(false));
    wait_for(Duration::from_secs(5), || Ok(others_up(&lab))).expect("50 Services programmed");
    let frontends = Lab::metric(&lab.metrics(1).unwrap(), "lb_frontends").expect("lb_frontends");
    let asker = Asker::start(&client, sa(vip(), 80));
    let lb = format!("loadBalancer: {{ingress: [{{ip: {LB_IP}}}]}}");
    let ranges = "  loadBalancerSourceRanges: [198.18.0.0/24, 198.18.1.0/24, 198.18.2.0/24, 198.18.3.0/24, 198.18.4.0/24]\n";
    // web: 2 service ids and 6 memberships; the 50: 50 ids and 150 memberships; 3 endpoints.
    // Ids start at 1, so a capacity of N holds N - 1 of them.
    let cases: Vec<(&str, String, String)> = vec![
        ("--max-services", "53".into(), big_service(3, "ClusterIP", "", "")),
        ("--max-backends", "8".into(), big_service(10, "ClusterIP", "", "")),
        ("--max-maglev-slots", "20000".into(), big_service(50, "ClusterIP", "", "")),
        // 156 memberships, 155 once svc-7 loses an endpoint: big's 3 fit in neither.
        ("--max-members", "157".into(), big_service(3, "ClusterIP", "", "")),
        ("--max-frontends", (frontends + 1).to_string(), big_service(3, "ClusterIP", "", "")),
        ("--max-source-ranges", "4".into(), big_service(3, "LoadBalancer", ranges, &lb)),
    ];
    let seven = IpAddr::from([198, 19, 1, 7]);
    for (flag, value, big) in cases {
        lab.stop_agent(1);
        lab.start_agent(1, &[flag, &value]).unwrap();
        let t0 = Instant::now();
        lab.write_manifest("big.yaml", &big).unwrap();
        let said = |lab: &Lab| {
            lab.agent_log(1)
                .lines()
                .any(|l| l.contains("default/big") && l.contains("not programmed") && l.contains(flag))
        };
        wait_for(LIVE * 2, || Ok(said(&lab))).unwrap_or_else(|e| panic!("{flag}: {e}\n{}", lab.agent_log(1)));
        // An endpoint change elsewhere is applied during the failure.
        lab.write_manifest("others.yaml", &fifty_changed).unwrap();
        wait_for(LIVE, || Ok(lab.frontend(1, seven, 80)?.map(|v| v.backend_count) == Some(2)))
            .unwrap_or_else(|e| panic!("{flag}: svc-7's change not applied: {e}\n{}", lab.agent_log(1)));
        assert!(t0.elapsed() < LIVE * 3, "{flag}: {:?}", t0.elapsed());
        assert!(others_up(&lab), "{flag}: the 50 stay programmed");
        let metrics = lab.metrics(1).unwrap();
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("lb_service_unprogrammed{service=\"default/big") && l.contains(flag)),
            "{flag}:\n{metrics}"
        );
        if flag != "--max-source-ranges" {
            // The whole Service is one port, skipped before any write.
            assert!(!lab.has_frontend(1, IpAddr::from([198, 19, 2, 1]), 80).unwrap(), "{flag}");
            assert!(!lab.has_backend(1, IpAddr::from([198, 18, 200, 1]), POD_PORT).unwrap(), "{flag}");
        } else {
            // Its ClusterIP and NodePort are programmed; its LoadBalancer frontend is not, and
            // none of its ranges is in the map.
            assert!(!lab.has_frontend(1, LB_IP.parse().unwrap(), 80).unwrap());
            let dp = lb_userspace::dataplane::AyaDataplane::open(&lab.pin_dir(1)).unwrap();
            use lb_userspace::dataplane::Dataplane as _;
            assert_eq!(dp.source_ranges().unwrap(), vec![], "nothing partial");
        }
        // Back to the good state for the next case.
        lab.remove_manifest("big.yaml").unwrap();
        lab.write_manifest("others.yaml", &fifty).unwrap();
        wait_for(LIVE, || Ok(lab.frontend(1, seven, 80)?.map(|v| v.backend_count) == Some(3))).unwrap();
        wait_for(LIVE, || Ok(!lab.metrics(1)?.contains("lb_service_unprogrammed{")))
            .unwrap_or_else(|e| panic!("{flag}: still reported: {e}\n{}", lab.agent_log(1)));
    }
    let (_, failures) = asker.finish();
    assert!(failures.is_empty(), "web failed: {failures:?}");
}

/// The Maglev array and the backend maps grow when Services do not fit (`auto`, the
/// default; `auto:N` here so that 50 Services overflow them): an agent started at 4096 slots
/// and 8 backend ids loads the datapath again with larger maps and programs all 50 and a
/// Service of 10 endpoints, while a connection opened before stays on its backend and `web`
/// serves throughout. A restart with the same flags keeps the grown maps (no migration back).
#[test]
fn full_maps_grow_so_every_service_fits_and_no_connection_notices() {
    let Some(mut lab) = lab_without_agents() else { return };
    lab.write_manifest("nodes.yaml", &lab.node_manifests()).unwrap();
    let flags = ["--max-maglev-slots", "auto:4096", "--max-backends", "auto:8"];
    lab.start_agent(1, &flags).unwrap();
    lab.start_agent(2, &[]).unwrap();
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let client = lab.pod("client").ns.clone();
    web_up(&lab, &client, &all, Proto::Tcp);
    let maglev_elements = |lab: &Lab| {
        let path = lab.pin_dir(1).join(lb_common::maps::MAGLEV);
        let map = aya::maps::MapData::from_pin(&path).expect("maglev pin");
        use std::os::fd::AsFd as _;
        lb_userspace::rawmap::layout(map.fd().as_fd()).expect("layout").max_entries
    };
    assert_eq!(maglev_elements(&lab), 2048, "4096 slots, two to an element");
    let mut conn = Conn::open(&client, sa(vip(), 80));
    let mine = conn.ask().expect("first answer");
    let asker = Asker::start(&client, sa(vip(), 80));
    // 50 tables of 307 slots, and 10 more backends than the 8 ids.
    lab.write_manifest("others.yaml", &fifty_services(&all, &all)).unwrap();
    lab.write_manifest("big.yaml", &big_service(10, "ClusterIP", "", "")).unwrap();
    let all_up = |lab: &Lab| -> anyhow::Result<bool> {
        Ok((1..=50).all(|i| lab.has_frontend(1, IpAddr::from([198, 19, 1, i]), 80).unwrap_or(false))
            && lab.frontend(1, IpAddr::from([198, 19, 2, 1]), 80)?.map(|v| v.backend_count) == Some(10))
    };
    let took = wait_for(Duration::from_secs(60), || all_up(&lab))
        .unwrap_or_else(|e| panic!("not every Service programmed: {e}\n{}", lab.agent_log(1)));
    println!("51 Services over full maps programmed after {took:?}");
    for l in lab.agent_log(1).lines().filter(|l| l.contains("grow")) {
        println!("{l}");
    }
    let log = lab.agent_log(1);
    assert!(log.contains("growing the Maglev array 4096 -> "), "{log}");
    assert!(log.contains("backend maps 8 -> "), "{log}");
    assert!(log.contains("maps grown in"), "{log}");
    assert!(maglev_elements(&lab) * 2 >= 50 * 307, "{log}");
    assert!(Lab::metric(&lab.metrics(1).unwrap(), "lb_maps_grown_total").is_some_and(|n| n >= 1));
    wait_for(LIVE, || Ok(!lab.metrics(1)?.contains("lb_service_unprogrammed{")))
        .unwrap_or_else(|e| panic!("still reported unprogrammed: {e}\n{}", lab.agent_log(1)));
    for _ in 0..5 {
        assert_eq!(conn.ask().as_deref(), Some(mine.as_str()), "the open connection moved or broke");
    }
    reach_all(&client, sa(IpAddr::from([198, 19, 1, 50]), 80), Proto::Tcp, &["web-1", "web-2", "web-3"]);
    // Restarted with the same flags: the grown maps are kept as they are.
    let grown = maglev_elements(&lab);
    lab.stop_agent(1);
    lab.start_agent(1, &flags).unwrap();
    assert!(all_up(&lab).unwrap(), "{}", lab.agent_log(1));
    assert_eq!(maglev_elements(&lab), grown);
    let log = lab.agent_log(1);
    let restarted = &log[log.rfind("datapath loaded").expect("a second start")..];
    assert!(!restarted.contains("migrated"), "{restarted}");
    assert_eq!(conn.ask().as_deref(), Some(mine.as_str()), "the open connection moved or broke");
    let (_, failures) = asker.finish();
    assert!(failures.is_empty(), "web failed: {failures:?}");
}

/// An agent started over a folder whose Services outgrow its maps (`auto:N`) grows them
/// before its first plan, counted from the Model: one growth, no Service ever skipped (every
/// sync line says `0 not programmed`), all 51 programmed.
#[test]
fn an_agent_started_over_more_services_than_its_maps_hold_grows_them_before_planning() {
    let Some(mut lab) = lab_without_agents() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    lab.write_manifest("nodes.yaml", &lab.node_manifests()).unwrap();
    lab.write_manifest("others.yaml", &fifty_services(&all, &all)).unwrap();
    lab.write_manifest("big.yaml", &big_service(10, "ClusterIP", "", "")).unwrap();
    lab.start_agent(1, &["--max-maglev-slots", "auto:4096", "--max-backends", "auto:8"]).unwrap();
    let all_up = || -> anyhow::Result<bool> {
        Ok((1..=50).all(|i| lab.has_frontend(1, IpAddr::from([198, 19, 1, i]), 80).unwrap_or(false))
            && lab.frontend(1, IpAddr::from([198, 19, 2, 1]), 80)?.map(|v| v.backend_count) == Some(10))
    };
    wait_for(Duration::from_secs(60), all_up)
        .unwrap_or_else(|e| panic!("not every Service programmed: {e}\n{}", lab.agent_log(1)));
    let log = lab.agent_log(1);
    assert!(log.contains("counted before the plan"), "{log}");
    assert_eq!(log.matches("maps grown in").count(), 1, "{log}");
    assert!(!log.contains("did not fit"), "{log}");
    let synced: Vec<&str> = log.lines().filter(|l| l.contains("synced:")).collect();
    assert!(!synced.is_empty() && synced.iter().all(|l| l.contains("(0 not programmed)")), "{log}");
}

/// Every kind of bad or odd input a user may leave in the folder gets its log line (named
/// by file and field), while `web` serves throughout: rejected objects keep the rest of
/// the folder applied, warnings leave the object applied, special files are skipped once.
#[test]
fn bad_and_odd_manifests_are_each_reported_while_web_serves() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let client = lab.pod("client").ns.clone();
    web_up(&lab, &client, &all, Proto::Tcp);
    let asker = Asker::start(&client, sa(vip(), 80));
    let api = |spec: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: api}}\nspec: {{clusterIP: 198.19.0.30, {spec}}}\n---\n"
        )
    };
    let api_slice = slice_yaml("api-1", "api", &[("http", POD_PORT, "TCP")], &ready(&all));
    let dir = lab.state.manifests.clone();
    let bad = dir.join("bad.yaml");
    let said = |what: &str, want: &[&str]| {
        wait_for(LIVE * 3, || Ok(lab.agent_log(1).lines().any(|l| want.iter().all(|w| l.contains(w)))))
            .unwrap_or_else(|e| panic!("{what}: no line with {want:?}: {e}\n{}", lab.agent_log(1)));
    };
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "one port number twice",
            api("ports: [{name: a, port: 80}, {name: b, port: 80}]"),
            vec!["bad.yaml", "spec.ports[1]: Duplicate value: port 80"],
        ),
        (
            "one port name twice",
            api("ports: [{name: a, port: 80}, {name: a, port: 81}]"),
            vec!["bad.yaml", "spec.ports[1].name: Duplicate value"],
        ),
        (
            "type: Bogus",
            api("type: Bogus, ports: [{port: 80}]"),
            vec!["bad.yaml", "spec.type: Unsupported value: \"Bogus\""],
        ),
        (
            "externalTrafficPolicy: Lcoal",
            api("externalTrafficPolicy: Lcoal, ports: [{port: 80}]"),
            vec!["bad.yaml", "spec.externalTrafficPolicy: Unsupported value: \"Lcoal\""],
        ),
        (
            "targetPort 0",
            api("ports: [{port: 80, targetPort: 0}]"),
            vec!["bad.yaml", "spec.ports[0].targetPort: Invalid value: 0"],
        ),
        (
            "targetPort 70000",
            api("ports: [{port: 80, targetPort: 70000}]"),
            vec!["bad.yaml", "spec.ports[0].targetPort: Invalid value: 70000"],
        ),
        (
            "unknown fields",
            api("selektor: {app: api}, ports: [{name: http, port: 80, targetport: 9376}]") + &api_slice,
            vec![
                "bad.yaml",
                "Service default/api: unknown fields spec.ports[0].targetport, spec.selektor (ignored)",
            ],
        ),
        (
            "a port name no slice has",
            api(&format!("ports: [{{name: web, port: 80, targetPort: {POD_PORT}}}]")) + &api_slice,
            vec!["default/api:web", "no EndpointSlice port is named \"web\""],
        ),
        (
            "an IPv6 ClusterIP with only IPv4 slices",
            api(&format!("ports: [{{name: http, port: 80, targetPort: {POD_PORT}}}]"))
                .replace("clusterIP: 198.19.0.30", "clusterIP: '2001:2:0:19::30', ipFamilies: [IPv6]")
                + &api_slice,
            vec!["default/api", "IPv6 clusterIP 2001:2:0:19::30 but no IPv6 EndpointSlice"],
        ),
    ];
    for (what, yaml, want) in cases {
        lab.write_manifest("bad.yaml", &yaml).unwrap();
        said(what, &want);
        lab.remove_manifest("bad.yaml").unwrap();
    }
    // 200 000-deep nesting: refused before the parser runs, within a second, while the
    // health endpoints answer.
    let t0 = Instant::now();
    lab.write_manifest("bad.yaml", &format!("a: {}{}\n", "[".repeat(200_000), "]".repeat(200_000))).unwrap();
    let mut slowest = Duration::ZERO;
    while !lab.agent_log(1).contains("bad.yaml: nested deeper than 100 levels") {
        assert!(t0.elapsed() < LIVE, "deep nesting not refused within a second:\n{}", lab.agent_log(1));
        let (code, took) = health(&lab, 1, "/healthz");
        assert_eq!(code, "200");
        slowest = slowest.max(took);
    }
    assert!(slowest < Duration::from_millis(500), "/healthz answered slowly: {slowest:?}");
    lab.remove_manifest("bad.yaml").unwrap();
    // A byte-order mark is read: the Service is programmed.
    let api_vip: IpAddr = "198.19.0.30".parse().unwrap();
    let good_api = api(&format!("ports: [{{name: http, port: 80, targetPort: {POD_PORT}}}]")) + &api_slice;
    lab.write_manifest("bad.yaml", &format!("\u{feff}{good_api}")).unwrap();
    wait_for(LIVE, || lab.has_frontend(1, api_vip, 80)).expect("a file with a byte-order mark is applied");
    // A directory where that file was: it goes (its Service with it), and one line says why.
    std::fs::remove_file(&bad).unwrap();
    std::fs::create_dir(&bad).unwrap();
    said("a directory", &["bad.yaml: skipped: a directory"]);
    wait_for(LIVE, || Ok(!lab.has_frontend(1, api_vip, 80)?)).unwrap();
    std::fs::remove_dir(&bad).unwrap();
    // A FIFO, a dangling link, a link loop: one line each, once.
    let fifo = std::ffi::CString::new(dir.join("fifo.yaml").to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    std::os::unix::fs::symlink(dir.join("nowhere"), dir.join("dangling.yaml")).unwrap();
    std::os::unix::fs::symlink(dir.join("loop.yaml"), dir.join("loop.yaml")).unwrap();
    said("a FIFO", &["fifo.yaml: skipped: not a regular file"]);
    said("a dangling link", &["dangling.yaml: skipped: No such file or directory"]);
    said("a link loop", &["loop.yaml: skipped: Too many levels of symbolic links"]);
    std::thread::sleep(Duration::from_secs(1));
    let log = lab.agent_log(1);
    for name in ["fifo.yaml", "dangling.yaml", "loop.yaml"] {
        assert_eq!(log.matches(&format!("{name}: skipped")).count(), 1, "{name} reported once:\n{log}");
        std::fs::remove_file(dir.join(name)).unwrap();
    }
    let (_, failures) = asker.finish();
    assert!(failures.is_empty(), "web failed: {failures:?}\n{}", lab.agent_log(1));
}

/// In each attach mode of kernels without bpf_link XDP or tcx, forced with
/// `--netlink-attach`, the programs stay attached while the agent is stopped, and the next
/// agent replaces them in place: a client asking the ClusterIP (the pod's TC hook) and one
/// asking a NodePort from outside (the node's XDP hook) every 50 ms see no failure across
/// the stop, the time without an agent and the restart.
#[test]
fn each_fallback_attach_mode_survives_a_restart() {
    let Some(mut lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let (client, client_if) = (lab.pod("client").ns.clone(), lab.pod("client").host_if.clone());
    let ext = lab.ext_ns();
    let node_port = sa(node_ip(1), 30080);
    apply(&lab, &(web("NodePort", "") + &web_slice(&ready(&all))), "NodePort up", || {
        matches!(tcp_ask(&ext, node_port, ASK), Answer::Reply(..))
    });
    let node = lab.node_netns(1);
    let xdp_prog = || lab::sh(&mut lab::in_ns(&node, &["ip", "-d", "link", "show", "dev", "eth0"])).unwrap();
    let tc_filters =
        || lab::sh(&mut lab::in_ns(&node, &["tc", "filter", "show", "dev", &client_if, "ingress"])).unwrap();
    for (hooks, mode) in [("xdp", "(XdpNetlink)"), ("tc", "(TcClsact)")] {
        // Into the mode before the clients start: leaving a bpf_link for netlink XDP has a gap.
        lab.stop_agent(1);
        lab.start_agent(1, &["--netlink-attach", hooks]).unwrap();
        assert!(lab.agent_log(1).contains(mode), "{hooks}: {}", lab.agent_log(1));
        let inside = Asker::start(&client, sa(vip(), 80));
        let outside = Asker::start(&ext, node_port);
        std::thread::sleep(Duration::from_millis(500));
        lab.stop_agent(1);
        // No agent: the programs are still there, and serve.
        if hooks == "xdp" {
            let link = xdp_prog();
            assert!(link.contains("prog/xdp") && !link.contains("link_id"), "netlink XDP stays:\n{link}");
        } else {
            let filters = tc_filters();
            assert!(
                filters.contains("pref 19522") && filters.contains("lb_tc_pod"),
                "clsact filter stays:\n{filters}"
            );
        }
        std::thread::sleep(Duration::from_secs(1));
        let log_before = lab.agent_log(1).len();
        lab.start_agent(1, &["--netlink-attach", hooks]).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let (_, inside) = inside.finish();
        let (_, outside) = outside.finish();
        let log = lab.agent_log(1);
        assert!(
            inside.is_empty() && outside.is_empty(),
            "{hooks}: ClusterIP {inside:?}, NodePort {outside:?}\n{log}"
        );
        let attach = if hooks == "xdp" { "XDP attached to eth0 (Replaced)" } else { "(Replaced)" };
        assert!(log[log_before..].contains(attach), "{hooks}: replaced in place:\n{}", &log[log_before..]);
        if hooks == "tc" {
            assert_eq!(tc_filters().matches("direct-action").count(), 1, "one filter:\n{}", tc_filters());
        }
    }
}

/// A pod cannot create flow state under another pod's address. The client pod holds a
/// direct keep-alive connection to web-1 (a scrape, say) while web-2 sends SYNs, ACKs and
/// RSTs with the client's address and port to the VIP, whose only endpoint is web-1. Such a
/// SYN used to plant the reply entry `web-1 -> client` of a Service flow, which then
/// rewrote web-1's answers on the direct connection to come from the VIP, and it broke.
/// Now the connection never fails and every spoofed packet is refused and counted.
#[test]
fn a_pod_cannot_create_flow_state_under_another_pods_address() {
    use lb_common::verdict::Reason;
    use lb_tests::harness::{Spec, TCP_ACK, TCP_RST, TCP_SYN};
    let Some(mut lab) = lab() else { return };
    // LB_TEST_POD_SOURCE_CHECK=off shows the attack working.
    let check = std::env::var("LB_TEST_POD_SOURCE_CHECK").unwrap_or_else(|_| "strict".into());
    lab.stop_agent(1);
    lab.start_agent(1, &["--pod-source-check", &check]).unwrap();
    let web1 = lab.pod("web-1").clone();
    let client = lab.pod("client").clone();
    web_up(&lab, &client.ns, &[&web1], Proto::Tcp);
    let mut direct = Conn::open(&client.ns, sa(web1.ip, POD_PORT));
    assert_eq!(direct.ask().as_deref(), Some("web-1"));
    let port = direct.0.get_ref().local_addr().unwrap().port();
    let spoofed = || lab.counted(1, Reason::SpoofedSource).unwrap();
    let before = spoofed();
    let frames: Vec<Vec<u8>> = (0..20)
        .flat_map(|_| [TCP_SYN, TCP_ACK, TCP_RST])
        .map(|f| Spec { seq: 7, ..Spec::tcp(&client.ip.to_string(), port, VIP, 80) }.flags(f).build())
        .collect();
    let sent = lb_tests::flood::send_raw(&lab.pod("web-2").ns, VIP.parse().unwrap(), frames).unwrap();
    assert_eq!(sent, 60);
    for i in 0..20 {
        assert_eq!(direct.ask().as_deref(), Some("web-1"), "the direct connection failed at request {i}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(spoofed() - before, 60, "every spoofed packet refused");
    if check == "strict" {
        // Every pod interface's host route is a known source: a pod's first SYN is a hash hit.
        let log = lab.agent_log(1);
        let line = log.lines().rfind(|l| l.contains("pod addresses known from host routes")).expect(&log);
        let n = |before: &str| -> usize {
            let head = &line[..line.find(before).unwrap()];
            head.split_whitespace().last().unwrap().parse().unwrap()
        };
        let (known, interfaces) = (n(" pod addresses known"), n(" interfaces"));
        assert!(interfaces >= 3 && known >= interfaces, "{line}");
    }
}

/// `lb agent --cleanup` (kube-proxy's flag) after an agent stopped, in the default attach
/// modes (bpf_link XDP, tcx) and in the netlink ones: nothing of ours stays attached (no XDP
/// on eth0, no clsact filter of ours on the client's interface), the pin dir is gone, and
/// the client's requests to the VIP are no longer answered. A second run finds nothing and
/// succeeds too.
#[test]
fn cleanup_detaches_everything_removes_the_pins_and_can_run_twice() {
    let Some(mut lab) = lab() else { return };
    let all: Vec<Pod> = pods(&lab, &["web-1", "web-2", "web-3"]).into_iter().cloned().collect();
    let (client, client_if) = (lab.pod("client").ns.clone(), lab.pod("client").host_if.clone());
    let node = lab.node_netns(1);
    let pin_dir = lab.pin_dir(1);
    let lb = lab.state.bins.lb.to_string_lossy().into_owned();
    for extra in [&[][..], &["--netlink-attach", "xdp,tc"][..]] {
        lab.stop_agent(1);
        // Written afresh below, so that its sync is one to wait for.
        let _ = lab.remove_manifest("web.yaml");
        lab.start_agent(1, extra).unwrap();
        web_up(&lab, &client, &all.iter().collect::<Vec<_>>(), Proto::Tcp);
        lab.stop_agent(1);
        for run in 1..=2 {
            let out = lab::sh(&mut lab::in_ns(
                &node,
                &[&lb, "agent", "--pin-dir", pin_dir.to_str().unwrap(), "--cleanup"],
            ))
            .unwrap_or_else(|e| panic!("{extra:?}: cleanup run {run}: {e}"));
            eprintln!("{extra:?}, run {run}:\n{out}");
        }
        let link = lab::sh(&mut lab::in_ns(&node, &["ip", "-d", "link", "show", "dev", "eth0"])).unwrap();
        assert!(!link.contains("xdp"), "{extra:?}: XDP still on eth0:\n{link}");
        let filters =
            lab::sh(&mut lab::in_ns(&node, &["tc", "filter", "show", "dev", &client_if, "ingress"])).unwrap();
        assert!(!filters.contains("lb_tc_pod"), "{extra:?}: our filter stays:\n{filters}");
        assert!(!pin_dir.exists(), "{extra:?}: {} stays", pin_dir.display());
        assert!(
            !matches!(tcp_ask(&client, sa(vip(), 80), ASK), Answer::Reply(..)),
            "{extra:?}: the VIP still answers: a program of ours is still attached"
        );
    }
    lab.start_agent(1, &[]).unwrap();
}

/// `lb status` for `node`: whether it exited 0 (an agent runs), its JSON, and its table.
fn status(lab: &Lab, node: u8) -> (bool, serde_json::Value, String) {
    let (lb, pin_dir) = (lab.state.bins.lb.to_string_lossy().into_owned(), lab.pin_dir(node));
    let run = |json: bool| {
        let mut args = vec![lb.as_str(), "--pin-dir", pin_dir.to_str().unwrap(), "status"];
        if json {
            args.extend(["-o", "json"]);
        }
        lab::in_ns(&lab.node_netns(node), &args).output().expect("lb status runs")
    };
    let (json, table) = (run(true), run(false));
    assert_eq!(json.status.code(), table.status.code(), "both forms exit alike");
    let value = serde_json::from_slice(&json.stdout)
        .unwrap_or_else(|e| panic!("lb status -o json: {e}:\n{}", String::from_utf8_lossy(&json.stdout)));
    (json.status.success(), value, String::from_utf8_lossy(&table.stdout).into_owned())
}

/// `lb status` names the running agent and what it runs (its source, its attachments, its
/// last sync, the flow table as its GC saw it, each map's fill and capacity), a Service a
/// capacity keeps out, and, once the agent stops, says so and exits 1.
#[test]
fn status_shows_the_agent_its_attachments_last_sync_skipped_services_and_map_fill() {
    let Some(mut lab) = lab() else { return };
    let all: Vec<Pod> = pods(&lab, &["web-1", "web-2", "web-3"]).into_iter().cloned().collect();
    let (client, client_if) = (lab.pod("client").ns.clone(), lab.pod("client").host_if.clone());
    lab.stop_agent(1);
    let earlier = lab.agent_log(1).len();
    let flags = ["--max-services", "3", "--conntrack-gc-interval", "1s", "--log-format", "json"];
    lab.start_agent(1, &flags).unwrap();
    let pid = lab.state.agents.iter().find(|a| a.node == 1).unwrap().pid as i64;
    web_up(&lab, &client, &all.iter().collect::<Vec<_>>(), Proto::Tcp);
    // web takes two service ids (its TCP and UDP ports): a third Service does not fit.
    lab.write_manifest("big.yaml", &big_service(3, "ClusterIP", "", "")).unwrap();
    let skipped = |s: &serde_json::Value| {
        s["report"]["skipped"].as_array().into_iter().flatten().any(|k| {
            k["service"].as_str().unwrap_or("").starts_with("default/big")
                && k["why"].as_str().unwrap_or("").contains("--max-services")
        })
    };
    let mut s = serde_json::Value::Null;
    wait_for(LIVE * 3, || {
        s = status(&lab, 1).1;
        Ok(skipped(&s) && !s["report"]["flow_table"].is_null())
    })
    .unwrap_or_else(|e| panic!("{e}: {s:#}\n{}", lab.agent_log(1)));
    let (running, s, table) = status(&lab, 1);
    assert!(running, "{table}");
    let r = &s["report"];
    assert_eq!(s["agent_pid"].as_i64(), Some(pid), "{s:#}");
    assert_eq!(r["pid"].as_i64(), Some(pid));
    assert_eq!(r["datapath_object"], s["cli_datapath_object"], "the agent runs this build's datapath");
    assert_eq!(r["source"]["kind"], "manifests");
    assert_eq!(r["source"]["detail"].as_str(), lab.state.manifests.to_str());
    let attached = |iface: &str, hook: &str| {
        r["attachments"].as_array().unwrap().iter().any(|a| a["interface"] == iface && a["hook"] == hook)
    };
    assert!(attached("eth0", "xdp") && attached(&client_if, "tc"), "{:#}", r["attachments"]);
    assert!(r["last_sync"]["at"].is_string() && r["last_sync"]["duration_ms"].is_f64(), "{r:#}");
    assert!(r["syncs"].as_u64().unwrap() >= 2, "{r:#}");
    let map = |name: &str| s["maps"].as_array().unwrap().iter().find(|m| m["name"] == name).cloned().unwrap();
    let metrics = lab.metrics(1).unwrap();
    let frontends = Lab::metric(&metrics, "lb_frontends").unwrap();
    assert_eq!(map("lb_services")["entries"].as_u64(), Some(frontends), "{:#}", map("lb_services"));
    assert_eq!(map("lb_services")["type"], "hash");
    assert_eq!(map("lb_conntrack")["capacity"].as_u64(), Some(lb_common::maps::DEFAULT_MAX_FLOWS as u64));
    assert_eq!(r["flow_table"]["capacity"], map("lb_conntrack")["capacity"]);
    assert!(map("lb_conntrack")["memory_bytes"].as_u64().unwrap() > 0);
    assert!(map("lb_backends")["entries"].is_null(), "an array has no count of its own");
    // The agent's memory: its resident set, and its own part of it (without mapped map pages).
    let (resident, own) = (&s["agent_memory"]["resident_bytes"], &s["agent_memory"]["anonymous_bytes"]);
    assert!(own.as_u64().unwrap() > 1 << 20 && own.as_u64() < resident.as_u64(), "{s:#}");
    for want in [
        "running, pid",
        "this lb's too",
        "manifests",
        "default/big",
        "--max-services",
        "lb_conntrack",
        "resident",
        "of it its own",
    ] {
        assert!(table.contains(want), "no {want:?} in:\n{table}");
    }
    // --log-format json: every line an object with the documented fields; a sync's counts.
    let log = lab.agent_log(1)[earlier..].to_string();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for l in &lines {
        assert!(
            l["timestamp"].is_string()
                && l["level"].is_string()
                && l["message"].is_string()
                && l["uptime_s"].is_f64(),
            "{l}"
        );
    }
    let synced =
        lines.iter().find(|l| l["message"].as_str().unwrap().starts_with("synced:")).expect("a sync line");
    assert!(
        synced["services"].is_u64() && synced["writes"].is_u64() && synced["duration_ms"].is_f64(),
        "{synced}"
    );
    // Inside the sync's span, with its counts and duration.
    let span = &synced["span"];
    assert!(
        span["name"] == "sync"
            && span["service_changes"].is_u64()
            && span["writes"] == synced["writes"]
            && span["duration_ms"].is_f64(),
        "{synced}"
    );
    assert!(
        lines.iter().any(|l| l["level"] == "ERROR"
            || l["level"] == "WARN"
            || l["message"].as_str().unwrap().contains("not programmed")),
        "big's skip is logged:\n{log}"
    );
    lab.remove_manifest("big.yaml").unwrap();
    lab.stop_agent(1);
    let (running, s, table) = status(&lab, 1);
    assert!(!running, "exit 0 without an agent:\n{table}");
    assert!(s["agent_pid"].is_null() && s["report"]["pid"].as_i64() == Some(pid), "{s:#}");
    assert!(table.contains("NOT RUNNING"), "{table}");
    lab.start_agent(1, &[]).unwrap();
}

/// `lb monitor -o json`: a TCP and a UDP packet to a ClusterIP port no Service serves (each
/// refused), one to a Service whose only endpoint is on the other node under
/// `internalTrafficPolicy: Local` (dropped), and one from outside to a LoadBalancer IP whose
/// source ranges leave it out (dropped at XDP) show up with their reason, hook, interface,
/// addresses and Service. Without a monitor the datapath writes no event, also once one has exited.
#[test]
fn monitor_shows_drops_and_rejects_with_their_reason_and_costs_nothing_without_a_reader() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let (client, client_ip, client_if) = {
        let c = lab.pod("client");
        (c.ns.clone(), c.ip.to_string(), c.host_if.clone())
    };
    web_up(&lab, &client, &all, Proto::Tcp);
    // Read from the pinned counter itself: /metrics reads it at most once a second.
    let sent = || {
        let dp = lb_userspace::dataplane::AyaDataplane::open(&lab.pin_dir(1)).unwrap();
        dp.events_counter(lb_common::abi::EVENTS_SENT).unwrap().packets
    };
    let before = sent();
    assert_eq!(tcp_ask(&client, sa(vip(), 81), ASK), Answer::Refused);
    assert_eq!(sent(), before, "an event written with no monitor running");

    let pin_dir = lab.pin_dir(1);
    let mut monitor = start_monitor(&lab, &["--count", "5"]);
    assert_eq!(tcp_ask(&client, sa(vip(), 81), ASK), Answer::Refused);
    assert_eq!(udp_ask(&client, sa(vip(), 81), 0, ASK), Answer::Refused);
    let w3 = lab.pod("web-3").clone();
    let local = web("ClusterIP", "  internalTrafficPolicy: Local\n") + &web_slice(&[(&w3, READY)]);
    apply(&lab, &local, "local only", || {
        lab.frontend(1, vip(), 80)
            .ok()
            .flatten()
            .is_some_and(|v| v.flags & lb_common::abi::SVC_F_DROP_NO_BACKEND != 0 || v.backend_count == 0)
    });
    assert_eq!(tcp_ask(&client, sa(vip(), 80), ASK), Answer::Timeout);
    // From outside, to a LoadBalancer IP whose source ranges leave the client out: dropped
    // at XDP on the node's interface.
    let denied = web_lb_with_ranges("198.18.9.0/24") + &web_slice(&ready(&all));
    let lb_ip: IpAddr = LB_IP.parse().unwrap();
    apply(&lab, &denied, "denied", || lab.has_frontend(1, lb_ip, 80).unwrap_or(false));
    assert_eq!(tcp_ask(&lab.ext_ns(), sa(lb_ip, 80), ASK), Answer::Timeout);
    // A malformed frame: a TCP header cut short after 8 bytes, to the ClusterIP's port.
    let vip_v4 = match vip() {
        IpAddr::V4(v) => v,
        IpAddr::V6(_) => unreachable!("the lab's ClusterIP is IPv4"),
    };
    let frame = lb_tests::harness::Spec::tcp(&client_ip, 40000, VIP, 80)
        .build_with_l4(&[0x9c, 0x40, 0, 80, 0, 0, 0, 1]);
    let taken =
        lab::in_netns(&client, move || lb_tests::flood::Raw::open(vip_v4).map(|r| r.send(&frame[14..])));
    assert!(taken.unwrap().unwrap(), "the malformed frame was not sent");
    let out = wait_child(&mut monitor, Duration::from_secs(10));
    let events: Vec<serde_json::Value> =
        out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert_eq!(events.len(), 5, "{out}");
    // A port the ClusterIP does not serve is named by the ClusterIP's Service; a frontend by
    // its Service port.
    let want = [
        ("reject", "reject_unknown_port", "tcp", format!("{}:81", VIP), "default/web"),
        ("reject", "reject_unknown_port", "udp", format!("{}:81", VIP), "default/web"),
        ("drop", "drop_no_backend", "tcp", format!("{}:80", VIP), "default/web:http"),
    ];
    for (e, (kind, reason, proto, dst, service)) in events[..3].iter().zip(want) {
        assert_eq!(
            e["service"].as_str(),
            Some(service),
            "{e}\nnames: {:?}\n{}",
            std::fs::read_to_string(lb_userspace::report::names_path(&pin_dir)),
            lab.agent_log(1)
        );
        assert_eq!((e["type"].as_str(), e["reason"].as_str()), (Some(kind), Some(reason)), "{e}");
        assert_eq!(e["protocol"].as_str(), Some(proto), "{e}");
        assert_eq!(e["dst"].as_str(), Some(dst.as_str()), "{e}");
        assert!(e["src"].as_str().unwrap().starts_with(&format!("{client_ip}:")), "{e}");
        assert_eq!(
            (e["interface"].as_str(), e["hook"].as_str()),
            (Some(client_if.as_str()), Some("tc")),
            "{e}"
        );
    }
    let e = &events[3];
    assert_eq!(
        (e["type"].as_str(), e["reason"].as_str()),
        (Some("drop"), Some("source_range_denied")),
        "{e}"
    );
    assert_eq!((e["interface"].as_str(), e["hook"].as_str()), (Some("eth0"), Some("xdp")), "{e}");
    assert_eq!(e["dst"].as_str(), Some(format!("{LB_IP}:80").as_str()), "{e}");
    assert!(e["src"].as_str().unwrap().starts_with(&format!("{EXT_IP}:")), "{e}");
    assert_eq!(e["service"].as_str(), Some("default/web:http"), "{e}");
    // The malformed frame: dropped at the client's TC, with its 5-tuple (the ports are in
    // the 8 bytes it has) and the Service port it was for.
    let e = &events[4];
    assert_eq!((e["type"].as_str(), e["reason"].as_str()), (Some("drop"), Some("truncated_l4")), "{e}");
    assert_eq!((e["interface"].as_str(), e["hook"].as_str()), (Some(client_if.as_str()), Some("tc")), "{e}");
    assert_eq!(e["protocol"].as_str(), Some("tcp"), "{e}");
    assert_eq!(e["src"].as_str(), Some(format!("{client_ip}:40000").as_str()), "{e}");
    assert_eq!(e["dst"].as_str(), Some(format!("{VIP}:80").as_str()), "{e}");
    assert_eq!(e["service"].as_str(), Some("default/web:http"), "{e}");
    // The monitor gave its lease up on exit.
    let before = sent();
    assert_eq!(tcp_ask(&client, sa(vip(), 81), ASK), Answer::Refused);
    assert_eq!(sent(), before, "an event written after the monitor exited");
}

/// `/metrics` labels each Service port's packet counter with its namespace, Service, port
/// name and protocol, and counts exactly: 10 UDP exchanges with web add 20 packets (request
/// and reply) to web's UDP port on the client's node. kube-proxy's last-sync timestamp and
/// change counters are there too.
#[test]
fn metrics_count_each_service_port_by_name_exactly() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let client = lab.pod("client").ns.clone();
    web_up(&lab, &client, &all, Proto::Udp);
    // Parsed as Prometheus parses it: the per-Service series carry the documented labels.
    let udp_packets = || {
        let text = lab.metrics(1).unwrap();
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .unwrap_or_else(|e| panic!("{e}: {text}"));
        let series: Vec<&prometheus_parse::Sample> =
            scrape.samples.iter().filter(|s| s.metric == "lb_service_packets_total").collect();
        for s in &series {
            let mut names: Vec<&str> = s.labels.keys().map(String::as_str).collect();
            names.sort();
            assert!(
                names == ["namespace", "port", "protocol", "service", "service_id"]
                    || names == ["service_id"],
                "label names: {:?}",
                s.labels
            );
        }
        let mine: Vec<&&prometheus_parse::Sample> = series
            .iter()
            .filter(|s| {
                (
                    s.labels.get("namespace"),
                    s.labels.get("service"),
                    s.labels.get("port"),
                    s.labels.get("protocol"),
                ) == (Some("default"), Some("web"), Some("udp"), Some("UDP"))
            })
            .collect();
        assert_eq!(mine.len(), 1, "one series for web's UDP port in the cluster scope:\n{text}");
        match mine[0].value {
            prometheus_parse::Value::Counter(v) => v as u64,
            ref other => panic!("lb_service_packets_total is a counter, not {other:?}"),
        }
    };
    let before = udp_packets();
    for i in 0..10 {
        assert!(matches!(udp_ask(&client, sa(vip(), 80), 0, ASK), Answer::Reply(..)), "exchange {i}");
    }
    // The datapath's counters are read at most once a second (metrics.rs): the count shows
    // within the next read, and stays exact.
    lab::wait_for(Duration::from_secs(3), || Ok(udp_packets() - before >= 20)).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(udp_packets() - before, 20, "a request and a reply per exchange");
    let metrics = lab.metrics(1).unwrap();
    let last: Option<f64> = metrics.lines().find_map(|l| {
        l.strip_prefix("kubeproxy_sync_proxy_rules_last_timestamp_seconds ")?.trim().parse().ok()
    });
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(last.is_some_and(|t| t > now - 600.0 && t <= now), "{metrics}");
    assert!(
        Lab::metric(&metrics, "kubeproxy_sync_proxy_rules_service_changes_total").is_some_and(|n| n >= 1)
    );
    assert!(
        Lab::metric(&metrics, "kubeproxy_sync_proxy_rules_endpoint_changes_total").is_some_and(|n| n >= 1)
    );
}

/// `--config` with kube-proxy's file: its `configSyncPeriod` takes effect (a frontend
/// deleted from the pinned map behind the agent's back is back within the period), and the
/// log names what the file set and what it ignored.
#[test]
fn kube_proxy_config_file_sets_the_resync_that_repairs_a_map() {
    use lb_userspace::dataplane::Dataplane as _;
    let Some(mut lab) = lab() else { return };
    let all: Vec<Pod> = pods(&lab, &["web-1", "web-2", "web-3"]).into_iter().cloned().collect();
    let client = lab.pod("client").ns.clone();
    let file = lab.state.dir.join("kube-proxy.conf");
    std::fs::write(
        &file,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: iptables\n\
         configSyncPeriod: 2s\nconntrack: {udpTimeout: 45s}\n",
    )
    .unwrap();
    lab.stop_agent(1);
    lab.start_agent(1, &["--config", file.to_str().unwrap()]).unwrap();
    web_up(&lab, &client, &all.iter().collect::<Vec<_>>(), Proto::Tcp);
    let log = lab.agent_log(1);
    assert!(
        log.contains("applied config_sync_period, conntrack_udp_timeout;")
            && log.contains("ignored (no equivalent in lb) mode"),
        "{log}"
    );
    let key = lb_common::abi::ServiceKey::new(vip(), 80, lb_common::abi::PROTO_TCP);
    let mut dp = lb_userspace::dataplane::AyaDataplane::open(&lab.pin_dir(1)).unwrap();
    dp.remove_service(&key).unwrap();
    assert!(!lab.has_frontend(1, vip(), 80).unwrap());
    let took = wait_for(Duration::from_secs(5), || lab.has_frontend(1, vip(), 80))
        .unwrap_or_else(|e| panic!("not repaired: {e}\n{}", lab.agent_log(1)));
    eprintln!("frontend restored {took:?} after its removal (period 2 s)");
    assert!(matches!(tcp_ask(&client, sa(vip(), 80), ASK), Answer::Reply(..)));
    lab.stop_agent(1);
    lab.start_agent(1, &[]).unwrap();
}

/// Waits for `child` to exit (killing it after `limit`) and returns its stdout.
fn wait_child(child: &mut std::process::Child, limit: Duration) -> String {
    use std::io::Read as _;
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    out
}

/// Topology hints as the EndpointSlice controller writes them for `trafficDistribution:
/// PreferSameNode` (each endpoint for its own node): a client on node-1 reaches only node-1's
/// pods, one on node-2 only node-2's; once node-2 has no ready endpoint, its client spreads
/// over node-1's.
#[test]
fn prefer_same_node_keeps_traffic_on_the_node_and_spreads_when_it_has_no_endpoint() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let (client1, client2) = (lab.pod("client").ns.clone(), lab.pod("client-2").ns.clone());
    let slice = |web3_ready: bool| {
        let eps: Vec<String> = all
            .iter()
            .map(|p| {
                let ready = p.name != "web-3" || web3_ready;
                format!(
                    "{{addresses: ['{}'], nodeName: node-{n}, conditions: {{ready: {ready}}}, hints: {{forNodes: [{{name: node-{n}}}]}}}}",
                    p.ip,
                    n = p.node
                )
            })
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: {POD_PORT}, protocol: TCP}}]\nendpoints: [{}]\n",
            eps.join(", ")
        )
    };
    let served = |ns: &str| -> BTreeSet<String> {
        (0..16)
            .filter_map(|_| match tcp_ask(ns, sa(vip(), 80), ASK) {
                Answer::Reply(pod, _) => Some(pod),
                _ => None,
            })
            .collect()
    };
    let names = |list: &[&str]| -> BTreeSet<String> { list.iter().map(|s| s.to_string()).collect() };
    let spec = "  trafficDistribution: PreferSameNode\n";
    apply(&lab, &(web("ClusterIP", spec) + &slice(true)), "web with hints", || {
        served(&client2) == names(&["web-3"])
    });
    assert_eq!(served(&client1), names(&["web-1", "web-2"]), "node-1's client stays on node-1");
    assert_eq!(served(&client2), names(&["web-3"]), "node-2's client stays on node-2");
    apply(&lab, &(web("ClusterIP", spec) + &slice(false)), "web-3 not ready", || {
        !served(&client2).contains("web-3")
    });
    assert_eq!(served(&client2), names(&["web-1", "web-2"]), "no endpoint on node-2: spread over the rest");
}

/// A Service without a selector and a hand-written `v1/Endpoints` object of the same name
/// (manifest mode; in a cluster the mirroring controller turns it into slices): served on
/// the Endpoints' addresses, and a change to the Endpoints is live within a second.
#[test]
fn a_selectorless_service_with_hand_written_endpoints_is_served_and_follows_them() {
    let Some(lab) = lab() else { return };
    let client = lab.pod("client").ns.clone();
    let (web1, web2) = (lab.pod("web-1").clone(), lab.pod("web-2").clone());
    let db: IpAddr = "198.19.0.12".parse().unwrap();
    let manifest = |pod: &Pod| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: db}}\nspec: {{clusterIP: {db}, ports: [{{name: sql, port: 80, targetPort: {POD_PORT}}}]}}\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: db}}\nsubsets:\n- addresses: [{{ip: {}}}]\n  ports: [{{name: sql, port: {POD_PORT}}}]\n",
            pod.ip
        )
    };
    let answered_by =
        |name: &str| matches!(tcp_ask(&client, sa(db, 80), ASK), Answer::Reply(p, _) if p == name);
    lab.write_manifest("db.yaml", &manifest(&web1)).unwrap();
    wait_for(LIVE * 3, || Ok(answered_by("web-1"))).unwrap_or_else(|e| panic!("{e}\n{}", lab.agent_log(1)));
    lab.write_manifest("db.yaml", &manifest(&web2)).unwrap();
    let took = wait_for(LIVE, || Ok(answered_by("web-2")))
        .unwrap_or_else(|e| panic!("the change was not live within a second: {e}\n{}", lab.agent_log(1)));
    eprintln!("Endpoints change live in {took:?}");
    for _ in 0..5 {
        assert!(answered_by("web-2"), "only the new address serves");
    }
}

/// The address pre-filter unlists an address only when nothing acts on it any more. With
/// GC passes every second, web is deleted while the client holds a keep-alive connection
/// through its VIP: the connection keeps working, as with kube-proxy, whose conntrack entry
/// outlives the rule, because its VIP and backend stay listed while the other two backends
/// (no flow left on them) are unlisted. Once the connection ends and its flow is gone, the
/// VIP is unlisted too.
#[test]
fn a_deleted_services_open_connection_keeps_its_addresses_listed_until_it_ends() {
    use lb_common::abi::addr_from_ip;
    let Some(mut lab) = lab() else { return };
    lab.stop_agent(1);
    let fast_gc = ["--conntrack-gc-interval", "1s", "--conntrack-tcp-timeout-time-wait", "1s"];
    lab.start_agent(1, &fast_gc).unwrap();
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let client = lab.pod("client").ns.clone();
    web_up(&lab, &client, &all, Proto::Tcp);
    let listed = |lab: &Lab, ip: IpAddr| {
        lb_userspace::dataplane::AyaDataplane::open(&lab.pin_dir(1))
            .unwrap()
            .address_listed(&addr_from_ip(ip))
    };
    let mut conn = Conn::open(&client, sa(vip(), 80));
    let who = conn.ask().expect("a first answer");
    let (mine, others): (Vec<&Pod>, Vec<&Pod>) = all.iter().partition(|p| p.name == who);
    lab.remove_manifest("web.yaml").unwrap();
    wait_for(LIVE, || Ok(!lab.has_frontend(1, vip(), 80)?)).expect("web removed");
    wait_for(Duration::from_secs(10), || Ok(others.iter().all(|p| !listed(&lab, p.ip.into()))))
        .unwrap_or_else(|e| panic!("backends without flows stay listed: {e}\n{}", lab.agent_log(1)));
    assert!(listed(&lab, vip()) && listed(&lab, mine[0].ip.into()), "the open connection's addresses");
    let bits = |lab: &Lab| -> u64 {
        let m = lab.metrics(1).unwrap();
        Lab::metric(&m, "lb_address_filter_bits").expect(&m)
    };
    let with_the_connection = bits(&lab);
    // The memory figures beside it: the agent's resident set and each map's kernel memory.
    let metrics = lab.metrics(1).unwrap();
    let gauge = |series: &str| Lab::metric(&metrics, series).unwrap_or(0);
    for l in
        metrics.lines().filter(|l| l.starts_with("lb_map_memory_bytes") || l.starts_with("lb_agent_resident"))
    {
        eprintln!("{l}");
    }
    assert!(gauge("lb_agent_resident_bytes") > 1 << 20, "{metrics}");
    // Its own memory, without the mmap'd map pages: some, and less than the resident set.
    let anonymous = gauge("lb_agent_anonymous_bytes");
    assert!(anonymous > 1 << 20 && anonymous < gauge("lb_agent_resident_bytes"), "{metrics}");
    // Its allocator's live bytes: some, and bounded (under 1 GiB for the lab's few Services).
    let heap = gauge("lb_agent_heap_in_use_bytes");
    assert!(heap > 64 << 10 && heap < 1 << 30, "{metrics}");
    assert!(gauge("lb_map_memory_bytes{map=\"lb_conntrack\"}") > 1 << 20, "{metrics}");
    assert!(gauge("lb_map_memory_bytes{map=\"lb_addr_filter\"}") >= 128 << 10, "{metrics}");
    for i in 0..5 {
        assert_eq!(conn.ask().as_deref(), Some(who.as_str()), "request {i} after web was deleted");
    }
    drop(conn);
    wait_for(Duration::from_secs(10), || Ok(!listed(&lab, vip())))
        .unwrap_or_else(|e| panic!("the VIP stays listed after its last flow: {e}\n{}", lab.agent_log(1)));
    // (/metrics reads the filter at most once a second.)
    wait_for(Duration::from_secs(3), || Ok(bits(&lab) < with_the_connection))
        .expect("lb_address_filter_bits goes down");
}

/// The agent runs with exactly the DaemonSet's capabilities (the deploy test keeps that list
/// equal to `deploy/daemonset.yaml`; CAP_SYS_RESOURCE, which only kernels before 5.11 need,
/// may be absent from this machine's bounding set): it attaches and serves. With one of
/// those this kernel needs fewer, it exits at once naming it.
#[test]
fn the_agent_runs_with_the_daemonsets_capabilities_and_names_a_missing_one() {
    let Some(mut lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let client = lab.pod("client").ns.clone();
    web_up(&lab, &client, &all, Proto::Tcp);
    // The DaemonSet's `capabilities.add`, in `caps::NEEDED` order first.
    let caps: Vec<String> = ["bpf", "perfmon", "net_admin", "sys_resource"].map(String::from).to_vec();
    let bins = Bins::beside(&std::env::current_exe().unwrap()).unwrap();
    lab.stop_agent(1);
    let lab = lab; // no more changes to the lab until the end
    let agent = |caps: &[String]| {
        let bounding =
            format!("--bounding-set=-all{}", caps.iter().map(|c| format!(",+{c}")).collect::<String>());
        let mut cmd =
            lab::in_ns(&lab.node_netns(1), &["setpriv", &bounding, "--", bins.lb.to_str().unwrap(), "agent"]);
        cmd.arg("--pin-dir")
            .arg(lab.pin_dir(1))
            .arg("--manifests")
            .arg(&lab.state.manifests)
            .arg("--state-dir")
            .arg(lab.state.dir.join("state-node1"))
            .args(["--node-name", "node-1", "--xdp-iface", "eth0", "--tc-iface", "lbp-*"]);
        cmd
    };
    // One fewer: each one this kernel needs in turn is named.
    for drop in 0..lb_userspace::caps::NEEDED.len() {
        let fewer: Vec<String> =
            caps.iter().enumerate().filter(|(i, _)| *i != drop).map(|(_, c)| c.clone()).collect();
        let out = agent(&fewer).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "ran without {}", caps[drop]);
        let name = lb_userspace::caps::NEEDED[drop].1;
        assert!(err.contains("missing capabilities") && err.contains(name), "without {name}: {err}");
    }
    // Exactly the DaemonSet's: it takes over and serves.
    let log = lab.state.dir.join("agent-capped.log");
    let f = std::fs::File::create(&log).unwrap();
    let mut child = agent(&caps).stdout(f.try_clone().unwrap()).stderr(f).spawn().unwrap();
    // As long as the lab gives any agent: loading verifies the programs, which takes seconds
    // when the other test thread keeps the CPUs busy.
    let t0 = std::time::Instant::now();
    let healthy = wait_for(Duration::from_secs(30), || {
        Ok(lab::sh(&mut lab::in_ns(
            &lab.node_netns(1),
            &["curl", "-sf", "--max-time", "1", "http://127.0.0.1:10256/healthz"],
        ))
        .is_ok())
    });
    eprintln!("the capped agent was healthy after {:.1?}", t0.elapsed());
    let answered = reach_all(&client, sa(vip(), 80), Proto::Tcp, &["web-1", "web-2", "web-3"]);
    // SAFETY: ending the agent this test started, by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    healthy.unwrap_or_else(|e| panic!("capped agent not healthy: {e}\n{text}"));
    assert_eq!(answered.0.len(), 3);
    assert!(text.contains("(Replaced)"), "took over the pinned links:\n{text}");
}

#[test]
fn a_nodeport_upload_to_a_remote_backend_across_a_smaller_mtu_completes() {
    let Some(lab) = lab() else { return };
    narrow_the_path_to_node_2(&lab);
    upload_across_a_smaller_mtu(&lab, "XDP");
}

/// The same with the TC program on the node interfaces (`--node-hook tc`: `lb_tc_node`).
#[test]
fn with_node_hook_tc_a_nodeport_upload_across_a_smaller_mtu_completes() {
    let Some(mut lab) = lab() else { return };
    narrow_the_path_to_node_2(&lab);
    lab.stop_agent(1);
    lab.start_agent(1, &["--node-hook", "tc"]).unwrap();
    assert!(lab.agent_log(1).contains("lb_tc_node loaded"), "{}", lab.agent_log(1));
    upload_across_a_smaller_mtu(&lab, "TC");
}

/// Gives node-1's path to node-2 a smaller MTU (1400) than the clients' links (1500).
/// Locked: the kernel's forwarding honours a route MTU either way, but its FIB helper for
/// programs only a locked one (or the device's MTU, as a real underlay would have).
fn narrow_the_path_to_node_2(lab: &Lab) {
    let node1 = lab.node_netns(1);
    lab::sh(&mut lab::in_ns(
        &node1,
        &["ip", "route", "replace", "198.18.2.0/24", "via", &node_ip(2).to_string(), "mtu", "lock", "1400"],
    ))
    .unwrap();
}

/// A 1 MiB upload from the external client through node-1's NodePort to web-3 on node-2,
/// across the narrowed path: it completes because `hook` (the node interface's program)
/// answers the client's too-big segments.
fn upload_across_a_smaller_mtu(lab: &Lab, hook: &str) {
    let web3 = lab.pod("web-3").clone();
    apply(lab, &(web("NodePort", "") + &web_slice(&[(&web3, READY)])), "service up", || {
        matches!(tcp_ask(&lab.ext_ns(), sa(node_ip(1), 30080), ASK), Answer::Reply(..))
    });
    let answered = || lab.counted(1, lb_common::verdict::Reason::FragNeeded).unwrap();
    let before = answered();
    // 1 MiB as one line, source-NATed to web-3; web-3 answers once it has the whole line.
    // Full-size segments exceed the route: node-1's stack would send its "fragmentation
    // needed" to the translated source, itself, and the upload would hang (frag_needed stays
    // 0 without `pmtu`). The program answers the client instead, which lowers its segment
    // size.
    let to = sa(node_ip(1), 30080);
    let (answer, took) = upload_a_mebibyte(&lab.ext_ns(), to).unwrap_or_else(|e| {
        panic!(
            "the upload did not complete ({hook}): {e} ({} answers)\nnode-1 agent:\n{}",
            answered() - before,
            lab.agent_log(1)
        )
    });
    println!(
        "1 MiB upload across the 1400-byte path ({hook}): {took:?}, {} frag-needed answers",
        answered() - before
    );
    assert!(answer.starts_with("web-3 "), "{answer:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(answered() > before, "no fragmentation-needed answer counted");
}

#[test]
fn a_closed_port_behind_a_vip_is_refused_to_a_udp_client_at_once_local_or_remote() {
    let Some(lab) = lab() else { return };
    // The backend has nothing on 9999: its kernel answers ICMP port unreachable to the
    // client pod on node-1, quoting the datagram as translated (to the backend's 9999).
    // web-3 is on node-2: its error reaches node-1's XDP; web-1 is on node-1: its error
    // enters node-1's TC on its interface. Either translates it back (the quote to
    // VIP:5353), so the client's connected socket sees ECONNREFUSED at once; untranslated,
    // the quote matches no socket and the client waits out its timeout.
    let client = lab.pod("client").ns.clone();
    for (backend, hook) in [("web-3", "XDP"), ("web-1", "TC")] {
        let pod = lab.pod(backend).clone();
        let yaml = service(
            "dns",
            &format!(
                "  clusterIP: {VIP}\n  ports:\n  - {{name: dns, port: 5353, protocol: UDP, targetPort: 9999}}\n"
            ),
            "",
        ) + &slice_yaml("dns-1", "dns", &[("dns", 9999, "UDP")], &[(&pod, READY)]);
        // Up when the client's datagrams reach the backend: the port is closed, so it refuses.
        apply(&lab, &yaml, "service up", || {
            lab.has_backend(1, IpAddr::V4(pod.ip), 9999).unwrap_or(false)
                && udp_ask(&client, sa(vip(), 5353), 0, ASK) == Answer::Refused
        });
        let related = || lab.counted(1, lb_common::verdict::Reason::IcmpRelated).unwrap();
        let before = related();
        let t = Instant::now();
        assert_eq!(
            udp_ask(&client, sa(vip(), 5353), 0, Duration::from_secs(2)),
            Answer::Refused,
            "{backend}"
        );
        let took = t.elapsed();
        println!(
            "UDP to a closed port behind the VIP ({backend}, error translated at {hook}) refused after {took:?}"
        );
        assert!(took < Duration::from_millis(500), "{backend}: took {took:?}");
        assert!(related() > before, "no ICMP error about {backend}'s port translated at node-1's {hook}");
    }
}

/// Fifty clients that trickle their request heads into the health port, a byte every
/// 200 ms, hold connections but stop neither `/metrics` and `/healthz` for others nor the
/// sync loop; the agent cuts each off at its header deadline (5 s).
#[test]
fn slow_clients_on_the_health_port_stop_neither_metrics_nor_syncs() {
    use std::io::{Read as _, Write as _};
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let client = lab.pod("client").ns.clone();
    web_up(&lab, &client, &all, Proto::Tcp);
    let node = lab.node_netns(1);
    let slow = lab::spawn_in_netns(&node, || {
        let mut conns: Vec<std::net::TcpStream> =
            (0..50).map(|_| std::net::TcpStream::connect("127.0.0.1:10256").expect("connect")).collect();
        let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n";
        for i in 0..20 {
            for c in &mut conns {
                let _ = c.write_all(&head[i..=i]);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_millis(2500));
        // Closed by the agent: EOF or a reset, never an answer.
        conns
            .iter()
            .filter(|c| {
                c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                let mut buf = [0u8; 64];
                match (&mut &**c).read(&mut buf) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                }
            })
            .count()
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..5 {
        let t = Instant::now();
        let m = lab.metrics(1).unwrap();
        assert!(m.contains("lb_syncs_total"), "scrape {i}: {m}");
        let health = lab::sh(&mut lab::in_ns(
            &node,
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
                "http://127.0.0.1:10256/healthz",
            ],
        ))
        .unwrap();
        assert_eq!(health, "200", "healthz {i}");
        assert!(t.elapsed() < Duration::from_secs(1), "scrape and probe {i} took {:?}", t.elapsed());
    }
    // The sync loop goes on: a change is in the datapath within a sync.
    let (w1, w2) = (lab.pod("web-1").clone(), lab.pod("web-2").clone());
    let one = web("ClusterIP", "") + &web_slice(&[(&w1, READY)]);
    apply(&lab, &one, "web-1 only", || !lab.has_backend(1, IpAddr::V4(w2.ip), POD_PORT).unwrap_or(true));
    let closed = slow.join().unwrap().unwrap();
    assert_eq!(closed, 50, "slow clients cut off at the header deadline");
}

/// `--bpf-log debug`: a refused packet's reason and 5-tuple reach the agent's log from the
/// datapath itself; with the default (`off`) the same refusal logs nothing.
#[test]
fn bpf_log_debug_brings_the_datapaths_refusals_into_the_agent_log() {
    let Some(mut lab) = lab() else { return };
    let all: Vec<Pod> = pods(&lab, &["web-1", "web-2", "web-3"]).into_iter().cloned().collect();
    let c = lab.pod("client").clone();
    let client = c.ns.clone();
    web_up(&lab, &client, &all.iter().collect::<Vec<_>>(), Proto::Tcp);
    let refusal = format!("datapath reject: reject_unknown_port on {}, tcp {}:", c.host_if, c.ip);
    let to = format!(" -> {VIP}:81");
    let logged = |lab: &Lab, from: usize| {
        lab.agent_log(1)[from..].lines().any(|l| l.contains(&refusal) && l.contains(&to))
    };
    // Off (the default): nothing.
    let from = lab.agent_log(1).len();
    assert_eq!(tcp_ask(&client, sa(vip(), 81), ASK), Answer::Refused);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!logged(&lab, from), "{}", &lab.agent_log(1)[from..]);

    lab.stop_agent(1);
    let from = lab.agent_log(1).len();
    lab.start_agent(1, &["--bpf-log", "debug"]).unwrap();
    wait_for(LIVE * 3, || Ok(tcp_ask(&client, sa(vip(), 80), ASK).pod().is_some())).unwrap();
    assert_eq!(tcp_ask(&client, sa(vip(), 81), ASK), Answer::Refused);
    wait_for(Duration::from_secs(3), || Ok(logged(&lab, from)))
        .unwrap_or_else(|e| panic!("{e}: no {refusal:?} in\n{}", &lab.agent_log(1)[from..]));
    lab.stop_agent(1);
    lab.start_agent(1, &[]).unwrap();
}

/// `lb monitor --type new-flow`: each new flow to a Service with its backend after
/// translation; `--sample 10` reports about one in ten (200 flows: between 4 and 60 shown,
/// bounds a fair sampler misses once in millions of runs).
#[test]
fn monitor_shows_new_flows_with_their_backend_one_in_the_sample() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let client = lab.pod("client").ns.clone();
    web_up(&lab, &client, &all, Proto::Udp);
    let monitor = |extra: &[&str]| start_monitor(&lab, extra);
    let mut every = monitor(&["--type", "new-flow", "--count", "3"]);
    let mut answered = Vec::new();
    for _ in 0..3 {
        match udp_ask(&client, sa(vip(), 80), 0, ASK) {
            Answer::Reply(pod, _) => answered.push(pod),
            other => panic!("{other:?}"),
        }
    }
    let out = wait_child(&mut every, Duration::from_secs(10));
    let events: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.len(), 3, "{out}");
    for (e, pod) in events.iter().zip(&answered) {
        assert_eq!((e["type"].as_str(), e["reason"].as_str()), (Some("new-flow"), Some("new_flow")), "{e}");
        assert_eq!(e["dst"].as_str(), Some(format!("{VIP}:80").as_str()), "{e}");
        assert_eq!(e["service"].as_str(), Some("default/web:udp"), "{e}");
        let backend = lab.pod(pod);
        assert_eq!(e["translated"].as_str(), Some(format!("{}:{POD_PORT}", backend.ip).as_str()), "{e}");
    }

    let mut sampled = monitor(&["--type", "new-flow", "--sample", "10"]);
    for i in 0..200 {
        assert!(matches!(udp_ask(&client, sa(vip(), 80), 0, ASK), Answer::Reply(..)), "flow {i}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let _ = sampled.kill();
    let out = wait_child(&mut sampled, Duration::from_secs(5));
    let n = out.lines().count();
    assert!((4..=60).contains(&n), "{n} of 200 new flows shown at --sample 10:\n{out}");
}

/// `--min-sync-period 2s`: a change after a quiet spell is synced at once; changes in the
/// next two seconds wait and go in together once the floor has passed.
#[test]
fn min_sync_period_holds_changes_to_the_floor_and_syncs_them_together() {
    let Some(mut lab) = lab() else { return };
    let all: Vec<Pod> = pods(&lab, &["web-1", "web-2", "web-3"]).into_iter().cloned().collect();
    let client = lab.pod("client").ns.clone();
    web_up(&lab, &client, &all.iter().collect::<Vec<_>>(), Proto::Tcp);
    lab.stop_agent(1);
    lab.start_agent(1, &["--min-sync-period", "2s"]).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let (w1, w2, w3) = (&all[0], &all[1], &all[2]);
    let has = |p: &Pod| lab.has_backend(1, IpAddr::V4(p.ip), POD_PORT).unwrap();
    let write = |eps: &[(&Pod, &str)]| {
        lab.write_manifest("web.yaml", &(web("ClusterIP", "") + &web_slice(eps))).unwrap();
    };
    // After a quiet spell: at once.
    write(&[(w1, READY)]);
    let t0 = Instant::now();
    wait_for(Duration::from_secs(1), || Ok(!has(w2) && !has(w3))).expect("the first change at once");
    // Two more within the floor: held, then synced together.
    write(&[(w1, READY), (w2, READY)]);
    std::thread::sleep(Duration::from_millis(300));
    write(&[(w1, READY), (w3, READY)]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        t0.elapsed() < Duration::from_millis(1500) && !has(w2) && !has(w3),
        "a change synced within the floor ({:?} after the last sync)\n{}",
        t0.elapsed(),
        lab.agent_log(1)
    );
    wait_for(Duration::from_secs(4), || Ok(has(w3))).expect("the held changes, once the floor passed");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1900), "synced {took:?} after the last sync, under the 2 s floor");
    assert!(!has(w2), "the intermediate state is never programmed");
    lab.stop_agent(1);
    lab.start_agent(1, &[]).unwrap();
}
