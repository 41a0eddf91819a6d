//! L3 over IPv6: the lab is dual-stack (`lb_tests::lab`: every node, pod and client has an
//! address from 2001:2::/48 too) and the `web` Service here is `RequireDualStack`, with a
//! ClusterIP of each family and one EndpointSlice per family, as Kubernetes writes them.
//! Each scenario the IPv4 tests (`e2e.rs`) cover for an address family runs here over IPv6,
//! and checks that the IPv4 half of the same Service keeps answering.

mod services;

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_tests::lab::{Answer, EXT_IP6, Lab, POD_PORT, Pod, in_netns, node_ip6, sa, slice_yaml6, tcp_ask};
use services::*;

/// web's IPv6 ClusterIP and LoadBalancer IP (in `lab::SERVICE_NET6`, routed via node-1).
const VIP6: &str = "2001:2:0:8000::10";
const LB_IP6: &str = "2001:2:0:8064::1";

fn vip6() -> IpAddr {
    VIP6.parse().unwrap()
}

fn lb_ip6() -> IpAddr {
    LB_IP6.parse().unwrap()
}

/// The web Service, dual-stack: `type_` with `extra` spec lines (indented by two) and
/// `status`; TCP and UDP port 80 → 9376, NodePort 30080.
fn web6(type_: &str, extra: &str, status: &str) -> String {
    service(
        "web",
        &format!(
            "  type: {type_}\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: {VIP}\n  clusterIPs: [{VIP}, '{VIP6}']\n{extra}  ports:\n  - {{name: http, port: 80, targetPort: {POD_PORT}, nodePort: 30080}}\n  - {{name: udp, port: 80, protocol: UDP, targetPort: {POD_PORT}, nodePort: 30080}}\n"
        ),
        status,
    )
}

/// web's two slices, IPv4 and IPv6, over the same pods.
fn web_slices(endpoints: &[(&Pod, &str)]) -> String {
    let ports = [("http", POD_PORT, "TCP"), ("udp", POD_PORT, "UDP")];
    web_slice(endpoints) + "---\n" + &slice_yaml6("web-v6", "web", &ports, endpoints)
}

/// `[ip]`, as a client address shows in an answer (`[ip]:port`, the port cut off).
fn bracketed(ip: impl Into<IpAddr>) -> String {
    format!("[{}]", ip.into())
}

/// Applies `yaml` and waits until `ns` gets an answer over TCP from `to`.
fn up(lab: &Lab, yaml: &str, ns: &str, to: SocketAddr) {
    apply(lab, yaml, "service up", || matches!(tcp_ask(ns, to, ASK), Answer::Reply(..)));
}

#[test]
fn cluster_ip_over_ipv6_reaches_every_backend_from_both_nodes_with_the_pod_source_kept() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    up(&lab, &(web6("ClusterIP", "", "") + &web_slices(&ready(&all))), &lab.pod("client").ns, sa(vip6(), 80));
    for client in ["client", "client-2"] {
        let ns = lab.pod(client).ns.clone();
        for p in [Proto::Tcp, Proto::Udp] {
            let (_, clients) = reach_all(&ns, sa(vip6(), 80), p, &["web-1", "web-2", "web-3"]);
            assert_eq!(clients, [bracketed(lab.pod(client).ip6)].into(), "pod source address kept ({p:?})");
            // The Service's other family answers too.
            let (_, clients) = reach_all(&ns, sa(vip(), 80), p, &["web-1", "web-2", "web-3"]);
            assert_eq!(clients, [lab.pod(client).ip.to_string()].into(), "IPv4 ({p:?})");
        }
    }
}

#[test]
fn hairpin_over_ipv6_is_source_nated_to_the_node() {
    let Some(lab) = lab() else { return };
    let w1 = lab.pod("web-1").clone();
    up(
        &lab,
        &(web6("ClusterIP", "", "") + &web_slices(&[(&w1, READY)])),
        &lab.pod("client").ns,
        sa(vip6(), 80),
    );
    for p in [Proto::Tcp, Proto::Udp] {
        match ask(&w1.ns, sa(vip6(), 80), p) {
            Answer::Reply(pod, client) => {
                assert_eq!(pod, "web-1");
                assert!(client.starts_with(&bracketed(node_ip6(1))), "{p:?}: seen from {client}");
            }
            other => panic!("hairpin {p:?}: {other:?}"),
        }
    }
}

#[test]
fn nodeport_and_load_balancer_ip_over_ipv6_reach_local_and_remote_backends() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let status = format!("loadBalancer: {{ingress: [{{ip: {LB_IP}}}, {{ip: '{LB_IP6}'}}]}}");
    let ext = lab.ext_ns();
    up(&lab, &(web6("LoadBalancer", "", &status) + &web_slices(&ready(&all))), &ext, sa(lb_ip6(), 80));
    let nodes: Vec<String> = [1, 2].map(|n| bracketed(node_ip6(n))).to_vec();
    for to in [sa(node_ip6(1), 30080), sa(node_ip6(2), 30080), sa(lb_ip6(), 80)] {
        for p in [Proto::Tcp, Proto::Udp] {
            let (seen, clients) = reach_all(&ext, to, p, &["web-1", "web-2", "web-3"]);
            // Local backends see the client; remote ones the node that source-NATed.
            assert!(clients.contains(&bracketed(EXT_IP6)), "{to} {p:?}: {clients:?} ({seen:?})");
            assert!(clients.iter().all(|c| *c == bracketed(EXT_IP6) || nodes.contains(c)), "{clients:?}");
        }
    }
    let (_, clients) =
        reach_all(&ext, sa(LB_IP.parse::<IpAddr>().unwrap(), 80), Proto::Tcp, &["web-1", "web-2", "web-3"]);
    assert!(clients.contains(&lb_tests::lab::EXT_IP.to_string()), "IPv4 LoadBalancer IP: {clients:?}");
}

#[test]
fn external_traffic_policy_local_over_ipv6_keeps_the_client_address_and_drops_elsewhere() {
    let Some(lab) = lab() else { return };
    let w3 = lab.pod("web-3").clone();
    let ext = lab.ext_ns();
    let yaml = web6("NodePort", "  externalTrafficPolicy: Local\n", "") + &web_slices(&[(&w3, READY)]);
    up(&lab, &yaml, &ext, sa(node_ip6(2), 30080));
    for p in [Proto::Tcp, Proto::Udp] {
        for _ in 0..5 {
            match ask(&ext, sa(node_ip6(2), 30080), p) {
                Answer::Reply(pod, client) => {
                    assert_eq!(pod, "web-3");
                    assert!(
                        client.starts_with(&bracketed(EXT_IP6)),
                        "{p:?}: client address not kept: {client}"
                    );
                }
                other => panic!("ETP=Local via node-2, {p:?}: {other:?}"),
            }
        }
    }
    // node-1 has no local endpoint: dropped, not refused.
    assert_eq!(tcp_ask(&ext, sa(node_ip6(1), 30080), ASK), Answer::Timeout);
}

#[test]
fn session_affinity_over_ipv6_keeps_one_backend_per_client() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let sticky = web6(
        "ClusterIP",
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
        "",
    );
    let ns = lab.pod("client").ns.clone();
    up(&lab, &(sticky + &web_slices(&ready(&all))), &ns, sa(vip6(), 80));
    for p in [Proto::Tcp, Proto::Udp] {
        let pods: BTreeSet<String> =
            (0..15).filter_map(|_| ask(&ns, sa(vip6(), 80), p).pod().map(str::to_string)).collect();
        assert_eq!(pods.len(), 1, "{p:?}: {pods:?}");
    }
}

#[test]
fn no_endpoints_over_ipv6_refuse_at_once_with_a_rst_and_an_icmpv6_unreachable() {
    let Some(lab) = lab() else { return };
    let ns = lab.pod("client").ns.clone();
    let ext = lab.ext_ns();
    apply(&lab, &(web6("NodePort", "", "") + &web_slices(&[])), "service up", || {
        tcp_ask(&ns, sa(vip6(), 80), ASK) == Answer::Refused
    });
    for (who, ns, to) in [("pod", &ns, sa(vip6(), 80)), ("external", &ext, sa(node_ip6(1), 30080))] {
        for p in [Proto::Tcp, Proto::Udp] {
            let t = Instant::now();
            assert_eq!(ask(ns, to, p), Answer::Refused, "{who} {p:?}");
            assert!(t.elapsed() < Duration::from_millis(200), "{who} {p:?}: refused after {:?}", t.elapsed());
        }
    }
}

#[test]
fn xdp_forward_over_ipv6_sends_remote_backend_traffic_from_xdp() {
    use lb_common::abi::XDP_FWD_TX;
    use lb_userspace::dataplane::AyaDataplane;

    let Some(mut lab) = lab() else { return };
    for node in [1, 2] {
        lab.stop_agent(node);
        lab.start_agent(node, &["--xdp-forward"]).unwrap();
    }
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let ext = lab.ext_ns();
    up(&lab, &(web6("NodePort", "", "") + &web_slices(&ready(&all))), &ext, sa(node_ip6(1), 30080));
    let counter =
        |slot| AyaDataplane::open(&lab.pin_dir(1)).unwrap().xdp_forward_counter(slot).unwrap().packets;
    let tx_before = counter(XDP_FWD_TX);
    for p in [Proto::Tcp, Proto::Udp] {
        let (seen, clients) = reach_all(&ext, sa(node_ip6(1), 30080), p, &["web-1", "web-2", "web-3"]);
        assert!(clients.contains(&bracketed(node_ip6(1))), "{p:?}: {clients:?} ({seen:?})");
    }
    let tx = counter(XDP_FWD_TX) - tx_before;
    assert!(tx >= 2, "XDP_TX {tx}: web-3's requests and replies did not leave from XDP");
}

/// As `e2e::a_nodeport_upload_to_a_remote_backend_across_a_smaller_mtu_completes`, over
/// IPv6: the path node-1 → node-2 gets a 1400-byte MTU; a 1 MiB upload from ext through
/// node-1's NodePort, source-NATed to web-3 on node-2, needs the XDP program's packet-too-big
/// answer (node-1's stack would send its own to the translated source, itself, and the
/// upload would hang).
#[test]
fn a_nodeport_upload_over_ipv6_across_a_smaller_mtu_completes() {
    let Some(lab) = lab() else { return };
    let node1 = lab.node_netns(1);
    let route = format!("{}/64", lb_tests::lab::pod_ip6(2, 0));
    lb_tests::lab::sh(&mut lb_tests::lab::in_ns(
        &node1,
        &["ip", "-6", "route", "replace", &route, "via", &node_ip6(2).to_string(), "mtu", "lock", "1400"],
    ))
    .unwrap();
    let web3 = lab.pod("web-3").clone();
    let ext = lab.ext_ns();
    up(&lab, &(web6("NodePort", "", "") + &web_slices(&[(&web3, READY)])), &ext, sa(node_ip6(1), 30080));
    let answered = || lab.counted(1, lb_common::verdict::Reason::FragNeeded).unwrap();
    let before = answered();
    let to = sa(node_ip6(1), 30080);
    let (answer, took) = upload_a_mebibyte(&ext, to)
        .unwrap_or_else(|e| panic!("the upload did not complete: {e} ({} answers)", answered() - before));
    println!(
        "1 MiB upload over IPv6 across the 1400-byte path: {took:?}, {} too-big answers",
        answered() - before
    );
    assert!(answer.starts_with("web-3 "), "{answer:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(answered() > before, "no packet-too-big answer counted");
}

/// Fragmented datagrams follow their flow in both families: from a pod to the ClusterIP
/// (translated at TC), and from outside to a NodePort whose only backend is on the other
/// node (translated at XDP and source-NATed, so later fragments need both addresses).
/// Untranslated, a later fragment would go to the Service address and the datagram be lost.
#[test]
fn fragmented_datagrams_follow_their_flow_in_both_families_source_nated_or_not() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-3"]);
    let client = lab.pod("client").ns.clone();
    up(&lab, &(web6("NodePort", "", "") + &web_slices(&ready(&all))), &client, sa(vip6(), 80));
    let followed = |node| lab.counted(node, lb_common::verdict::Reason::FragmentFollowed).unwrap();
    for to in [sa(vip(), 80), sa(vip6(), 80)] {
        for _ in 0..6 {
            let reply =
                big_datagram(&client, to).unwrap_or_else(|e| panic!("{to}: 2000 bytes not answered: {e}"));
            assert!(reply.starts_with("web-"), "{reply}");
        }
    }
    let w3 = lab.pod("web-3").clone();
    apply(&lab, &(web6("NodePort", "", "") + &web_slices(&[(&w3, READY)])), "web-3 only", || {
        (0..4).all(|_| tcp_ask(&lab.ext_ns(), sa(node_ip6(1), 30080), ASK).pod() == Some("web-3"))
    });
    let before = followed(1);
    for to in [sa(lb_tests::lab::node_ip(1), 30080), sa(node_ip6(1), 30080)] {
        let reply =
            big_datagram(&lab.ext_ns(), to).unwrap_or_else(|e| panic!("{to}: 2000 bytes not answered: {e}"));
        assert!(reply.starts_with("web-3 "), "{to}: {reply}");
        // Source-NATed: web-3 saw node-1.
        assert!(
            reply.contains(&node_ip6(1).to_string())
                || reply.contains(&lb_tests::lab::node_ip(1).to_string())
        );
    }
    assert!(followed(1) >= before + 2, "node-1 counted {} followed fragments", followed(1) - before);
}

/// As `e2e::a_closed_port_behind_a_vip_is_refused_to_a_udp_client_at_once_local_or_remote`,
/// over IPv6: the backend's ICMPv6 port unreachable, quoting the datagram as translated, is
/// translated back at node-1's XDP (web-3, remote) or TC (web-1, local), so the client's
/// connected socket is refused at once.
#[test]
fn a_closed_port_behind_an_ipv6_vip_is_refused_at_once_local_or_remote() {
    let Some(lab) = lab() else { return };
    let client = lab.pod("client").ns.clone();
    for backend in ["web-3", "web-1"] {
        let pod = lab.pod(backend).clone();
        let yaml = service(
            "dns",
            &format!(
                "  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv6]\n  clusterIP: '{VIP6}'\n  clusterIPs: ['{VIP6}']\n  ports:\n  - {{name: dns, port: 5353, protocol: UDP, targetPort: 9999}}\n"
            ),
            "",
        ) + &slice_yaml6("dns-1", "dns", &[("dns", 9999, "UDP")], &[(&pod, READY)]);
        apply(&lab, &yaml, "service up", || {
            lab.has_backend(1, IpAddr::V6(pod.ip6), 9999).unwrap_or(false)
                && lb_tests::lab::udp_ask(&client, sa(vip6(), 5353), 0, ASK) == Answer::Refused
        });
        let related = || lab.counted(1, lb_common::verdict::Reason::IcmpRelated).unwrap();
        let before = related();
        let t = Instant::now();
        let answer = lb_tests::lab::udp_ask(&client, sa(vip6(), 5353), 0, Duration::from_secs(2));
        assert_eq!(answer, Answer::Refused, "{backend}");
        assert!(t.elapsed() < Duration::from_millis(500), "{backend}: took {:?}", t.elapsed());
        assert!(related() > before, "no ICMPv6 error about {backend}'s port translated on node-1");
    }
}

/// The node's own clients over IPv6 (`host_clients.rs` over IPv4): served at connect time by
/// the cgroup programs' IPv6 hooks. curl from the node's shell to the IPv6 ClusterIP and to
/// a NodePort on the node's IPv6 address spreads over local and remote backends;
/// getpeername and an unconnected UDP reply show the Service address; with no endpoints the
/// connect fails at once.
#[test]
fn node_clients_over_ipv6_are_served_at_connect_time() {
    use lb_common::verdict::Reason;
    use std::net::{TcpStream, UdpSocket};

    let Some(lab) = lab() else { return };
    let node = lab.node_netns(1);
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let vip_sa = sa(vip6(), 80);
    up(&lab, &(web6("NodePort", "", "") + &web_slices(&ready(&all))), &node, vip_sa);
    let before = lab.counted(1, Reason::HostConnect).unwrap();
    for to in [vip_sa, sa(node_ip6(1), 30080)] {
        let (seen, _) = reach_all(&node, to, Proto::Tcp, &["web-1", "web-2", "web-3"]);
        assert_eq!(seen.len(), 3, "{to}: {seen:?}");
    }
    assert!(lab.counted(1, Reason::HostConnect).unwrap() > before, "no connect-time decision counted");
    let (peer, udp) = in_netns(&node, move || {
        let s = TcpStream::connect_timeout(&vip_sa, ASK).expect("connect");
        let u = UdpSocket::bind("[::]:0").and_then(|u| {
            u.set_read_timeout(Some(ASK))?;
            u.send_to(b"hello\n", vip_sa)?;
            let mut buf = [0u8; 512];
            u.recv_from(&mut buf).map(|(_, from)| from)
        });
        (s.peer_addr().unwrap(), u)
    })
    .unwrap();
    assert_eq!(peer, vip_sa, "getpeername");
    assert_eq!(udp.expect("UDP answer"), vip_sa, "UDP reply source");

    apply(&lab, &(web6("NodePort", "", "") + &web_slices(&[])), "no endpoints", || {
        tcp_ask(&node, vip_sa, ASK) == Answer::Refused
    });
    let refused = in_netns(&node, move || {
        let t = Instant::now();
        let tcp = TcpStream::connect_timeout(&vip_sa, ASK).map(|_| ()).map_err(|e| e.kind());
        let udp = UdpSocket::bind("[::]:0").and_then(|s| s.connect(vip_sa)).map_err(|e| e.kind());
        (tcp, udp, t.elapsed())
    })
    .unwrap();
    let refused_kind = Err(std::io::ErrorKind::ConnectionRefused);
    assert_eq!((refused.0, refused.1), (refused_kind, refused_kind));
    assert!(refused.2 < Duration::from_millis(100), "refusals took {:?}", refused.2);
}
