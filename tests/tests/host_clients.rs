//! L3: clients on the node itself (its shell, daemons, hostNetwork pods), served at connect
//! time by the cgroup `sock_addr` programs (`lb_ebpf::sock`): the classic first test of a
//! fresh cluster, `curl CLUSTER-IP` from the node, which kube-proxy answers in `nat OUTPUT`.
//! Each scenario runs from the lab node's network namespace, where the agent runs.

mod services;

use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use lb_common::verdict::Reason;
use lb_tests::lab::{Answer, Lab, POD_PORT, Pod, curl, in_netns, node_ip, sa, wait_for};
use services::*;

/// Connect-time decisions counted on `node` (`lb stats`: `host_connect`, `host_refused`).
fn host_decisions(lab: &Lab, node: u8, r: Reason) -> u64 {
    lab.counted(node, r).unwrap()
}

/// `lb explain --from-host DST` on node-1.
fn explain_from_host(lab: &Lab, dst: &str) -> String {
    let lb = lab.state.bins.lb.to_string_lossy().into_owned();
    let pin = lab.pin_dir(1).to_string_lossy().into_owned();
    let args = [lb.as_str(), "--pin-dir", &pin, "explain", "--from-host", dst];
    lb_tests::lab::sh(&mut lb_tests::lab::in_ns(&lab.node_netns(1), &args)).expect("lb explain --from-host")
}

/// `curl http://to/` from `ns` until every pod of `want` answered (Kubernetes' n²+30 rule).
fn curl_reaches_all(ns: &str, to: SocketAddr, want: &[&str]) {
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..want.len() * want.len() + 30 {
        match curl(ns, &format!("http://{to}/")) {
            Answer::Reply(body, _) => {
                seen.insert(body.split_whitespace().next().unwrap_or_default().to_string());
            }
            other => panic!("curl {to} from {ns}: {other:?}"),
        }
        if want.iter().all(|w| seen.contains(*w)) {
            return;
        }
    }
    panic!("curl {to} from {ns}: only {seen:?} answered");
}

/// A request on an unconnected UDP socket: the answer, and the address it came from.
fn udp_sendto(to: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(ASK))?;
    s.send_to(b"hello\n", to)?;
    let mut buf = [0u8; 512];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

/// A UDP socket of namespace `ns` connected to `to`.
fn connected_udp(ns: &str, to: SocketAddr) -> UdpSocket {
    in_netns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(to).unwrap();
        s.set_read_timeout(Some(ASK)).unwrap();
        s
    })
    .unwrap()
}

/// The pod name in an `lb-serve` answer (`NAME CLIENT`).
fn pod_of(answer: &str) -> String {
    answer.split_whitespace().next().unwrap_or_default().to_string()
}

#[test]
fn node_clients_reach_services_at_connect_time_and_see_the_service_address() {
    let Some(lab) = lab() else { return };
    let node = lab.node_netns(1);
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    let vip_sa = sa(vip(), 80);
    apply(&lab, &(web("NodePort", "") + &web_slice(&ready(&all))), "service up", || {
        matches!(curl(&node, &format!("http://{vip_sa}/")), Answer::Reply(..))
    });
    let before = host_decisions(&lab, 1, Reason::HostConnect);
    // curl from the node's shell spreads over the local (web-1, web-2) and remote (web-3)
    // backends.
    curl_reaches_all(&node, vip_sa, &["web-1", "web-2", "web-3"]);
    // A NodePort on the node's own address, as a hostNetwork client would use it.
    curl_reaches_all(&node, sa(node_ip(1), 30080), &["web-1", "web-2", "web-3"]);
    assert!(host_decisions(&lab, 1, Reason::HostConnect) > before, "no connect-time decision counted");
    let why = explain_from_host(&lab, "198.19.0.10:80/tcp");
    for p in &all {
        assert!(why.contains(&format!("{}:{POD_PORT}", p.ip)), "{} missing from:\n{why}", p.name);
    }

    // A restarted agent swaps its programs into place: still served, one link per hook.
    let mut lab = lab;
    lab.stop_agent(1);
    assert!(
        matches!(curl(&node, &format!("http://{vip_sa}/")), Answer::Reply(..)),
        "served while the agent is down"
    );
    lab.start_agent(1, &[]).unwrap();
    curl_reaches_all(&node, vip_sa, &["web-1", "web-2", "web-3"]);
    let links = std::fs::read_dir(lab.pin_dir(1).join("links")).unwrap().flatten();
    let sock_links = links.filter(|e| e.file_name().to_string_lossy().starts_with("sock-")).count();
    assert_eq!(sock_links, 8, "one pinned link per connect-time hook");

    // getpeername shows the Service, not the backend; so does an unconnected UDP reply.
    let (peer, udp) = in_netns(&node, move || {
        let s = TcpStream::connect_timeout(&vip_sa, ASK).expect("connect");
        (s.peer_addr().unwrap(), udp_sendto(vip_sa))
    })
    .unwrap();
    assert_eq!(peer, vip_sa, "getpeername");
    let (answer, from) = udp.expect("UDP answer");
    assert_eq!(from, vip_sa, "UDP reply source ({answer})");

    // A pod's namespace is the packet path's: no connect-time decision for its requests.
    let client = lab.pod("client").ns.clone();
    let (host_before, flows_before) =
        (host_decisions(&lab, 1, Reason::HostConnect), host_decisions(&lab, 1, Reason::NewFlow));
    for _ in 0..5 {
        assert!(matches!(ask(&client, vip_sa, Proto::Tcp), Answer::Reply(..)));
    }
    assert_eq!(host_decisions(&lab, 1, Reason::HostConnect), host_before, "a pod's sockets were touched");
    assert!(host_decisions(&lab, 1, Reason::NewFlow) >= flows_before + 5, "the pod's flows took the TC path");

    // No endpoint: the connect fails at once with ECONNREFUSED, TCP and UDP; so does a port
    // the ClusterIP does not serve.
    apply(&lab, &(web("NodePort", "") + &web_slice(&[])), "no endpoints", || {
        curl(&node, &format!("http://{vip_sa}/")) == Answer::Refused
    });
    let refused = in_netns(&node, move || {
        let t = Instant::now();
        let tcp = TcpStream::connect_timeout(&vip_sa, ASK).map(|_| ()).map_err(|e| e.kind());
        let udp = UdpSocket::bind("0.0.0.0:0").and_then(|s| s.connect(vip_sa)).map_err(|e| e.kind());
        let other = TcpStream::connect_timeout(&sa(vip(), 8443), ASK).map(|_| ()).map_err(|e| e.kind());
        (tcp, udp, other, t.elapsed())
    })
    .unwrap();
    let refused_kind = Err(std::io::ErrorKind::ConnectionRefused);
    assert_eq!((refused.0, refused.1, refused.2), (refused_kind, refused_kind, refused_kind));
    assert!(refused.3 < Duration::from_millis(100), "refusals took {:?}", refused.3);
    assert!(host_decisions(&lab, 1, Reason::HostRefused) >= 3);
    let why = explain_from_host(&lab, "198.19.0.10:80/tcp");
    assert!(why.contains("no usable backend: the call fails with ECONNREFUSED"), "{why}");
}

#[test]
fn a_connected_udp_socket_of_the_node_leaves_a_removed_backend() {
    let Some(lab) = lab() else { return };
    let node = lab.node_netns(1);
    let all: Vec<Pod> = pods(&lab, &["web-1", "web-2", "web-3"]).into_iter().cloned().collect();
    let vip_sa = sa(vip(), 80);
    let refs: Vec<&Pod> = all.iter().collect();
    apply(&lab, &(web("ClusterIP", "") + &web_slice(&ready(&refs))), "service up", || {
        matches!(curl(&node, &format!("http://{vip_sa}/")), Answer::Reply(..))
    });
    // One connected socket, as a resolver or a metrics agent keeps.
    let socket = connected_udp(&node, vip_sa);
    assert_eq!(socket.peer_addr().unwrap(), vip_sa, "getpeername of a connected UDP socket");
    let ask_on = |s: &UdpSocket| -> std::io::Result<String> {
        s.send(b"hello\n")?;
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf)?;
        Ok(pod_of(&String::from_utf8_lossy(&buf[..n])))
    };
    let first = ask_on(&socket).expect("first answer");
    for _ in 0..3 {
        assert_eq!(ask_on(&socket).unwrap(), first, "a connected socket keeps its backend");
    }
    // Its backend leaves the Service (the pod still runs and would answer): the socket is
    // closed under its owner, whose next call fails; a new socket lands on a live backend.
    let rest: Vec<(&Pod, &str)> = refs.iter().filter(|p| p.name != first).map(|p| (*p, READY)).collect();
    let t0 = Instant::now();
    lab.write_manifest("web.yaml", &(web("ClusterIP", "") + &web_slice(&rest))).unwrap();
    wait_for(LIVE * 2, || Ok(ask_on(&socket).is_err()))
        .expect("the socket still reaches the removed backend");
    let closed_after = t0.elapsed();
    println!("connected UDP socket closed {closed_after:?} after its backend left the Service");
    assert!(closed_after <= LIVE + Duration::from_millis(200), "took {closed_after:?}");
    // The agent logs it just after the close: give a busy machine a moment.
    wait_for(Duration::from_secs(1), || Ok(lab.agent_log(1).contains("connected UDP socket(s)")))
        .unwrap_or_else(|e| panic!("{e}: not logged\n{}", lab.agent_log(1)));
    let again = connected_udp(&node, vip_sa);
    let now = ask_on(&again).expect("answer after reconnecting");
    assert_ne!(now, first);
    // The pod's port itself was never the issue: it still answers directly.
    let removed = all.iter().find(|p| p.name == first).unwrap();
    let direct = in_netns(&node, {
        let to = sa(removed.ip, POD_PORT);
        move || udp_sendto(to)
    })
    .unwrap();
    assert_eq!(pod_of(&direct.expect("direct answer").0), first);
}
