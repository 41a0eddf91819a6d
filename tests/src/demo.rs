//! `cargo xtask demo`: the kube-proxy walkthrough on the lab. A 3-replica dual-stack Service
//! (port 80 -> targetPort 9376, NodePort 30080); requests from a pod to both ClusterIPs
//! (IPv4 and IPv6) and from outside to the NodePort and from the node's own shell, showing
//! which pod answered; a selector-less
//! Service with hand-written Endpoints; a pod removed from the EndpointSlice and traffic
//! moving off it; the Service with no endpoints refusing at once. Each step checks
//! what it shows; the run fails if one did not behave.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::bail;

use crate::lab::{self, Answer, Bins, Lab, POD_PORT, curl, slice_yaml, slice_yaml6};

pub const CLUSTER_IP: &str = "198.19.0.10";
/// web's IPv6 ClusterIP (the lab's Service prefix, `lab::SERVICE_NET6`).
pub const CLUSTER_IP6: &str = "2001:2:0:8000::10";
pub const NODE_PORT: u16 = 30080;
/// The selector-less Service of the demo's hand-written Endpoints.
pub const LEGACY_IP: &str = "198.19.0.30";

/// A Service without a selector and its `v1/Endpoints`, pointing at `addr` (in a cluster:
/// a database outside it, say).
fn legacy_manifests(addr: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: legacy}}\nspec:\n  clusterIP: {LEGACY_IP}\n  \
         ports: [{{name: http, port: 80, targetPort: {POD_PORT}}}]\n---\napiVersion: v1\nkind: Endpoints\n\
         metadata: {{name: legacy}}\nsubsets:\n- addresses: [{{ip: {addr}}}]\n  ports: [{{name: http, port: {POD_PORT}}}]\n"
    )
}

/// Service `web` and its EndpointSlice over the first `replicas` of web-1..web-3 (all ready).
pub fn web_manifests(lab: &Lab, replicas: usize) -> String {
    let pods: Vec<&lab::Pod> =
        ["web-1", "web-2", "web-3"].iter().take(replicas).map(|n| lab.pod(n)).collect();
    web_with(&pods.iter().map(|p| (*p, "ready: true")).collect::<Vec<_>>())
}

/// web over `endpoints`: dual-stack, so one slice per family, as Kubernetes writes them.
fn web_with(endpoints: &[(&lab::Pod, &str)]) -> String {
    let ports = [("http", POD_PORT, "TCP")];
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  type: NodePort\n  \
         ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: {CLUSTER_IP}\n  \
         clusterIPs: [{CLUSTER_IP}, '{CLUSTER_IP6}']\n  \
         ports: [{{name: http, port: 80, targetPort: {POD_PORT}, nodePort: {NODE_PORT}}}]\n---\n{}---\n{}",
        slice_yaml("web-abc12", "web", &ports, endpoints),
        slice_yaml6("web-def34", "web", &ports, endpoints)
    )
}

fn step(n: u32, title: &str) {
    println!("\n\x1b[1m== {n}. {title}\x1b[0m");
}

/// `count` curls from `ns` to `url`, printing each answer; returns answers per pod.
fn spread(ns: &str, url: &str, count: usize) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut seen = BTreeMap::new();
    for i in 1..=count {
        match curl(ns, url) {
            Answer::Reply(pod, _) => {
                println!("   request {i:>2}: answered by {pod}");
                *seen.entry(pod).or_insert(0) += 1;
            }
            other => bail!("request {i} to {url} failed: {other:?}"),
        }
    }
    Ok(seen)
}

/// Every pod of `want` must answer. Kubernetes' e2e rule: within n²+30 requests, so a pod
/// that did not show up among the requests printed gets the rest of that budget.
fn check_all(ns: &str, url: &str, mut seen: BTreeMap<String, usize>, want: &[&str]) -> anyhow::Result<()> {
    println!("   -> {}", seen.iter().map(|(p, n)| format!("{p}: {n}")).collect::<Vec<_>>().join(", "));
    let budget = want.len() * want.len() + 30;
    let mut sent: usize = seen.values().sum();
    while want.iter().any(|p| !seen.contains_key(*p)) && sent < budget {
        if let Answer::Reply(pod, _) = curl(ns, url) {
            sent += 1;
            if !seen.contains_key(&pod) {
                println!("   ({pod} answered request {sent})");
            }
            *seen.entry(pod).or_insert(0) += 1;
        }
    }
    let missing: Vec<&&str> = want.iter().filter(|p| !seen.contains_key(**p)).collect();
    if !missing.is_empty() {
        bail!("pods {missing:?} never answered in {budget} requests");
    }
    Ok(())
}

pub fn run(bins: Bins) -> anyhow::Result<()> {
    println!("Building the lab: 2 nodes, pods web-1 and web-2 on node-1, web-3 on node-2,");
    println!("a client pod on node-1, an external client, and `lb agent` on both nodes ...");
    let t = Instant::now();
    let mut lab = Lab::standard(bins)?;
    println!("lab {} up in {:.1} s", lab.state.name, t.elapsed().as_secs_f64());
    let result = walkthrough(&mut lab);
    if result.is_err() {
        println!("\nagent log (node-1):\n{}", lab.agent_log(1));
    }
    println!("\nRemoving the lab ...");
    lab.teardown();
    match &result {
        Ok(()) => println!("\x1b[1mdemo: every step behaved\x1b[0m"),
        Err(e) => println!("\x1b[1mdemo FAILED: {e:#}\x1b[0m"),
    }
    result
}

fn walkthrough(lab: &mut Lab) -> anyhow::Result<()> {
    let client = lab.pod("client").ns.clone();
    let ext = lab.ext_ns();
    let cluster_url = format!("http://{CLUSTER_IP}/");
    let node_url = format!("http://{}:{NODE_PORT}/", lab::node_ip(1));

    step(
        1,
        &format!(
            "Service web, dual-stack: ClusterIPs {CLUSTER_IP} and {CLUSTER_IP6}, port 80 -> 3 pods :{POD_PORT}, NodePort {NODE_PORT}"
        ),
    );
    lab.write_manifest("web.yaml", &web_manifests(lab, 3))?;
    let t = Instant::now();
    let vip = CLUSTER_IP.parse().expect("literal");
    for node in [1, 2] {
        lab::wait_for(Duration::from_secs(5), || lab.has_frontend(node, vip, 80))?;
    }
    println!(
        "   manifest written; frontend in both nodes' maps after {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    step(2, &format!("12 requests from pod `client` (node-1) to http://{CLUSTER_IP}/"));
    let seen = spread(&client, &cluster_url, 12)?;
    check_all(&client, &cluster_url, seen, &["web-1", "web-2", "web-3"])?;

    let cluster_url6 = format!("http://[{CLUSTER_IP6}]/");
    step(3, &format!("The same Service over IPv6: 12 requests from pod `client` to {cluster_url6}"));
    let seen = spread(&client, &cluster_url6, 12)?;
    check_all(&client, &cluster_url6, seen, &["web-1", "web-2", "web-3"])?;

    step(4, &format!("12 requests from the external client to the NodePort {node_url}"));
    let seen = spread(&ext, &node_url, 12)?;
    check_all(&ext, &node_url, seen, &["web-1", "web-2", "web-3"])?;
    println!("   (web-3 runs on node-2: node-1 source-NATs those flows, like kube-proxy's masquerade)");

    let node = lab.node_netns(1);
    step(5, &format!("12 requests from node-1's own shell: curl {cluster_url} (the classic first test)"));
    println!(
        "   (a process in the node's namespace: its connect is pointed at a pod, kube-proxy's `nat OUTPUT`)"
    );
    let seen = spread(&node, &cluster_url, 12)?;
    check_all(&node, &cluster_url, seen, &["web-1", "web-2", "web-3"])?;

    step(6, &format!("A Service without a selector and a hand-written Endpoints object: {LEGACY_IP}:80"));
    let w3 = lab.pod("web-3").clone();
    lab.write_manifest("legacy.yaml", &legacy_manifests(&w3.ip.to_string()))?;
    let legacy_url = format!("http://{LEGACY_IP}/");
    lab::wait_for(Duration::from_secs(2), || Ok(matches!(curl(&client, &legacy_url), Answer::Reply(..))))?;
    println!(
        "   (Endpoints {}:{POD_PORT}, mirrored into a slice as Kubernetes' mirroring controller does)",
        w3.ip
    );
    let seen = spread(&client, &legacy_url, 3)?;
    if seen.keys().any(|p| p != "web-3") {
        bail!("the hand-written Endpoints name web-3 only: {seen:?}");
    }

    step(7, "web-2 removed from the EndpointSlices");
    let (w1, w3) = (lab.pod("web-1").clone(), lab.pod("web-3").clone());
    lab.write_manifest("web.yaml", &web_with(&[(&w1, "ready: true"), (&w3, "ready: true")]))?;
    // The change is in when neither node's datapath knows web-2 any more; then 30 requests
    // in a row must avoid it.
    let w2 = [IpAddr::V4(lab.pod("web-2").ip), IpAddr::V6(lab.pod("web-2").ip6)];
    let moved = lab::wait_for(Duration::from_secs(2), || {
        for (node, ip) in [1, 2].into_iter().flat_map(|n| w2.map(|ip| (n, ip))) {
            if lab.has_backend(node, ip, POD_PORT)? {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    println!(
        "   web-2 gone from both nodes' datapaths within {:.0} ms of the manifest change (polling their pinned maps)",
        moved.as_secs_f64() * 1e3
    );
    if moved > Duration::from_secs(1) {
        bail!("took more than a second");
    }
    for i in 1..=30 {
        match curl(&client, &cluster_url) {
            Answer::Reply(pod, _) if pod == "web-2" => bail!("request {i} still went to web-2"),
            Answer::Reply(..) => {}
            other => bail!("request {i} failed after the change: {other:?}"),
        }
    }
    println!("   30 requests since: none to web-2, none failed");
    let seen = spread(&client, &cluster_url, 6)?;
    if seen.contains_key("web-2") {
        bail!("web-2 answered after its removal");
    }

    step(8, "All endpoints removed: requests are refused at once (TCP RST), not left hanging");
    lab.write_manifest("web.yaml", &web_with(&[]))?;
    lab::wait_for(Duration::from_secs(2), || Ok(curl(&client, &cluster_url) == Answer::Refused))?;
    let clients = [
        ("pod `client`", &client, &cluster_url),
        ("node-1's shell", &node, &cluster_url),
        ("external client", &ext, &node_url),
    ];
    for (who, ns, url) in clients {
        let t = Instant::now();
        let a = curl(ns, url);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        println!(
            "   {who} -> {url}: {}",
            if a == Answer::Refused { format!("connection refused in {ms:.0} ms") } else { format!("{a:?}") }
        );
        if a != Answer::Refused || ms > 500.0 {
            bail!("{who} was not refused promptly: {a:?} after {ms:.0} ms");
        }
    }
    Ok(())
}
