//! L3: the flow table over time, with the real agent and real connections: a soak of 200 000
//! source-NATed connections, a SYN flood beside live connections, endpoints flapping for
//! minutes under traffic, and an agent restart that resizes the table.

mod services;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use lb_common::verdict::Reason;
use lb_tests::{
    flood::{Flood, Kind},
    lab::{self, Lab, Pod, node_ip, sa, spawn_in_netns},
};
use lb_userspace::{conntrack_gc, dataplane::AyaDataplane};
use services::*;

/// One request on a new connection (closed with a FIN): the pod name.
fn one_connection(to: SocketAddr, timeout: Duration) -> Result<String, String> {
    let line = lab::request(to, timeout).map_err(|e| e.to_string())?;
    line.split_whitespace().next().map(str::to_string).ok_or_else(|| "empty answer".into())
}

/// Flow-table entries of `node` right now (one batched read).
fn entries(lab: &Lab, node: u8) -> usize {
    let map = conntrack_gc::open(&lab.pin_dir(node)).expect("pinned flow table");
    let l = lb_userspace::rawmap::layout(map.fd().as_fd()).unwrap();
    conntrack_gc::entries(map.fd().as_fd(), &l).unwrap().len()
}

fn counter(lab: &Lab, node: u8, r: Reason) -> u64 {
    lab.counted(node, r).unwrap()
}

/// `count` sequential connections from `ns` to `to`, each answered by `want`: the failures.
fn sequential(
    ns: &str,
    to: SocketAddr,
    count: u32,
    want: &'static str,
) -> std::thread::JoinHandle<anyhow::Result<Vec<String>>> {
    spawn_in_netns(ns, move || {
        let mut failures = Vec::new();
        for i in 0..count {
            match one_connection(to, Duration::from_secs(3)) {
                Ok(pod) if pod == want => {}
                Ok(pod) => failures.push(format!("#{i}: answered by {pod}")),
                Err(e) => failures.push(format!("#{i}: {e}")),
            }
        }
        failures
    })
    .unwrap()
}

fn restart_agents(lab: &mut Lab, args: &[&str]) {
    for node in [1, 2] {
        lab.stop_agent(node);
        lab.start_agent(node, args).unwrap();
    }
}

/// 100 000 hairpin connections (a pod to itself through its ClusterIP) and 100 000 through a
/// NodePort to a pod on the other node, both source-NATed, side by side: not one fails, and
/// the flow table stays bounded by what is live and recently closed, not by the count.
#[test]
fn soak_200k_source_nated_connections_never_fail_and_the_table_stays_bounded() {
    let Some(mut lab) = lab() else { return };
    let per_path: u32 =
        std::env::var("LB_SOAK_CONNECTIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    restart_agents(&mut lab, &["--conntrack-gc-interval", "2s"]);
    let w1 = lab.pod("web-1").clone();
    let ext = lab.ext_ns();
    // Clients reuse their own TIME_WAIT ports, as busy clients are set up to.
    for ns in [&w1.ns, &ext] {
        lab::sysctl(ns, "net.ipv4.tcp_tw_reuse", "1").unwrap();
    }
    apply(&lab, &(web("NodePort", "") + &web_slice(&[(&w1, READY)])), "service up", || {
        lab.has_frontend(2, IpAddr::V4(node_ip(2)), 30080).unwrap_or(false)
    });
    // A connection that stays open and idle through the whole soak (many GC passes).
    let client = lab.pod("client").ns.clone();
    let mut idle = Conn::open(&client, sa(vip(), 80));
    assert_eq!(idle.ask().as_deref(), Some("web-1"));

    let t0 = Instant::now();
    let hairpin = sequential(&w1.ns, sa(vip(), 80), per_path, "web-1");
    let nodeport = sequential(&ext, sa(node_ip(2), 30080), per_path, "web-1");
    let mut peak = [0usize; 2];
    while !(hairpin.is_finished() && nodeport.is_finished()) {
        std::thread::sleep(Duration::from_secs(2));
        for (i, node) in [1u8, 2].into_iter().enumerate() {
            peak[i] = peak[i].max(entries(&lab, node));
        }
    }
    let took = t0.elapsed();
    let failures: Vec<String> =
        [hairpin, nodeport].into_iter().flat_map(|h| h.join().unwrap().unwrap()).collect();
    eprintln!(
        "soak: {} connections in {:.1} s ({:.0}/s), {} failures; flow-table peak entries node-1 {} node-2 {}",
        2 * per_path,
        took.as_secs_f64(),
        2.0 * per_path as f64 / took.as_secs_f64(),
        failures.len(),
        peak[0],
        peak[1]
    );
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(counter(&lab, 1, Reason::SnatFailed) + counter(&lab, 2, Reason::SnatFailed), 0);
    // Without a life cycle every connection leaves two entries (400 000 here); with it the
    // table holds what is live or closed within the last time-wait and GC interval.
    for p in peak {
        assert!(p < 60_000, "flow table grew with the connection count: peak {p} entries");
    }
    assert_eq!(idle.ask().as_deref(), Some("web-1"), "the idle connection outlived the GC passes");
}

/// A SYN flood from random lab sources at a NodePort for ten seconds, while a keep-alive
/// client asks every 100 ms through the same NodePort and another opens new connections:
/// the keep-alive connection is never reset nor moved (each answer comes from the same pod within
/// `KEEP_PATIENCE`); the new-connection success rate is reported.
#[test]
fn a_syn_flood_at_a_nodeport_never_breaks_an_established_connection() {
    let Some(lab) = lab() else { return };
    let all = pods(&lab, &["web-1", "web-2", "web-3"]);
    apply(&lab, &(web("NodePort", "") + &web_slice(&ready(&all))), "service up", || {
        lab.has_frontend(1, IpAddr::V4(node_ip(1)), 30080).unwrap_or(false)
    });
    let ext = lab.ext_ns();
    let nodeport = sa(node_ip(1), 30080);
    let mut keep = Conn::open(&ext, nodeport);
    let first = keep.ask().expect("keep-alive answer");
    // The flood saturates both CPUs of a small VM: the kernel's per-CPU backlog drops
    // packets whatever the datapath, the keep-alive's among them, and TCP resends after its
    // RTO (200 ms, doubling). Broken means reset, closed or answered by another pod, not
    // slow, so each answer gets time for a few resends.
    keep.0.get_ref().set_read_timeout(Some(KEEP_PATIENCE)).unwrap();
    const FLOOD: Duration = Duration::from_secs(10);
    let flood = Flood::start(
        &ext,
        SocketAddrV4::new(node_ip(1), 30080),
        ("198.18.128.0".parse().unwrap(), 17),
        100_000,
        FLOOD,
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, tried) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let newconns = {
        let (stop, ok, tried) = (stop.clone(), ok.clone(), tried.clone());
        spawn_in_netns(&ext, move || {
            while !stop.load(Ordering::Relaxed) {
                tried.fetch_add(1, Ordering::Relaxed);
                if one_connection(nodeport, Duration::from_secs(1)).is_ok() {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .unwrap()
    };
    let t0 = Instant::now();
    let (mut keep_failures, mut asks, mut slowest) = (Vec::new(), 0, Duration::ZERO);
    while t0.elapsed() < FLOOD {
        asks += 1;
        let asked = Instant::now();
        match keep.ask() {
            Some(p) if p == first => slowest = slowest.max(asked.elapsed()),
            other => keep_failures.push(format!("at {:.1}s: {other:?}", t0.elapsed().as_secs_f64())),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    newconns.join().unwrap().unwrap();
    let sent = flood.join().unwrap();
    let (ok, tried) = (ok.load(Ordering::Relaxed), tried.load(Ordering::Relaxed));
    eprintln!(
        "flood: {sent} SYNs in {FLOOD:?}; node-1 refused {} new flows (table full); keep-alive {asks} requests, {} failed, \
         slowest answer {slowest:.2?}; new connections {ok}/{tried} succeeded ({:.0}%)",
        counter(&lab, 1, Reason::FlowTableFull),
        keep_failures.len(),
        ok as f64 * 100.0 / tried.max(1) as f64
    );
    assert!(keep_failures.is_empty(), "keep-alive failures: {keep_failures:?}");
    assert!(sent > 100_000, "the flood ran ({sent} SYNs)");
    // After the flood the GC clears the stale handshakes and new connections get in again.
    wait_for_ok(
        || one_connection(nodeport, Duration::from_secs(1)).is_ok(),
        Duration::from_secs(15),
        "after the flood",
    );
}

/// How long the keep-alive client under a SYN flood waits for each answer: three resends.
const KEEP_PATIENCE: Duration = Duration::from_secs(3);

/// A SYN flood and then a UDP flood from random lab sources at a NodePort with no endpoints,
/// each for two seconds at 20 000 packets a second: the RSTs and ICMP port-unreachables sent
/// back stay within `--answer-rate` (plus the burst), the rest are dropped and counted.
#[test]
fn answers_to_a_flood_stay_within_the_answer_rate() {
    let Some(mut lab) = lab() else { return };
    const RATE: u64 = 200;
    const BURST: u64 = 20;
    lab.stop_agent(1);
    lab.start_agent(1, &["--answer-rate", &RATE.to_string(), "--answer-burst", &BURST.to_string()]).unwrap();
    apply(&lab, &(web("NodePort", "") + &web_slice(&[])), "no endpoints", || {
        lab.has_frontend(1, IpAddr::V4(node_ip(1)), 30080).unwrap_or(false)
    });
    let ext = lab.ext_ns();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    for kind in [Kind::Syn, Kind::Udp] {
        // Let the buckets refill from any earlier answers.
        std::thread::sleep(Duration::from_secs(1));
        let before = (counter(&lab, 1, Reason::RejectNoBackend), counter(&lab, 1, Reason::AnswerRateLimited));
        let t0 = Instant::now();
        let flood = Flood::start_kind(
            &ext,
            SocketAddrV4::new(node_ip(1), 30080),
            ("198.18.128.0".parse().unwrap(), 17),
            20_000,
            Duration::from_secs(2),
            kind,
        )
        .unwrap();
        let sent = flood.join().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let window = t0.elapsed().as_secs_f64();
        let answered = counter(&lab, 1, Reason::RejectNoBackend) - before.0;
        let limited = counter(&lab, 1, Reason::AnswerRateLimited) - before.1;
        // Each CPU gets its share of the rate and of the burst, rounded down, at least one.
        let most = (RATE as f64 * window) as u64 + BURST + cpus;
        eprintln!(
            "{kind:?} flood: {sent} sent in {window:.2} s, {answered} answered (at most {most}), {limited} dropped"
        );
        assert!(answered > 0 && answered <= most, "{kind:?}: {answered} answers, at most {most}");
        assert!(limited + answered >= sent * 9 / 10, "{kind:?}: {sent} sent, {answered} + {limited} seen");
    }
}

fn wait_for_ok(mut f: impl FnMut() -> bool, within: Duration, what: &str) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Endpoints flap every 100 ms for five minutes (`LB_CHURN_SECS`): web-2 and web-3 go
/// through ready, terminating and removed, web-1 stays. Keep-alive connections and new
/// connections run all along: connections on web-1 never fail, no request hangs, and the flow
/// table stays bounded.
#[test]
fn churn_soak_endpoints_flapping_every_100ms_under_traffic() {
    let Some(lab) = lab() else { return };
    let secs: u64 = std::env::var("LB_CHURN_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let owned: Vec<Pod> = ["web-1", "web-2", "web-3"].iter().map(|n| lab.pod(n).clone()).collect();
    let client = lab.pod("client").ns.clone();
    lab::sysctl(&client, "net.ipv4.tcp_tw_reuse", "1").unwrap();
    web_up(&lab, &client, &owned.iter().collect::<Vec<_>>(), Proto::Tcp);
    let mut keep: Vec<(String, Conn)> = (0..8)
        .map(|_| {
            let mut c = Conn::open(&client, sa(vip(), 80));
            (c.ask().expect("keep-alive answer"), c)
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let newconns = {
        let stop = stop.clone();
        spawn_in_netns(&client, move || {
            let (mut ok, mut failed, mut slowest) = (0u64, Vec::new(), Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match one_connection(sa(vip(), 80), Duration::from_secs(2)) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e),
                }
                slowest = slowest.max(t.elapsed());
            }
            (ok, failed, slowest)
        })
        .unwrap()
    };
    // The flapper: web-2 and web-3 cycle through ready, terminating, removed, out of phase.
    const STATES: [Option<&str>; 3] =
        [Some(READY), Some("ready: false, serving: true, terminating: true"), None];
    let (t0, mut step) = (Instant::now(), 0usize);
    let mut keep_failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut peak = 0;
    while t0.elapsed() < Duration::from_secs(secs) {
        let mut eps: Vec<(&Pod, &str)> = vec![(&owned[0], READY)];
        for (i, pod) in owned[1..].iter().enumerate() {
            if let Some(c) = STATES[(step + i) % 3] {
                eps.push((pod, c));
            }
        }
        lab.write_manifest("web.yaml", &(web("ClusterIP", "") + &web_slice(&eps))).unwrap();
        step += 1;
        std::thread::sleep(Duration::from_millis(100));
        if step % 10 == 0 {
            for (pod, c) in keep.iter_mut() {
                if c.ask().as_deref() != Some(pod.as_str()) {
                    *keep_failures.entry(pod.clone()).or_default() += 1;
                }
            }
        }
        if step % 50 == 0 {
            peak = peak.max(entries(&lab, 1));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, slowest) = newconns.join().unwrap().unwrap();
    eprintln!(
        "churn: {secs} s, {step} endpoint changes; new connections {ok} ok, {} failed, slowest {slowest:?}; \
         keep-alive failures {keep_failures:?}; flow-table peak {peak} entries; first failures {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(keep_failures.get("web-1"), None, "connections to the backend that stayed failed");
    assert!(failed.len() as u64 * 1000 <= ok, "new connections failed: {} of {}", failed.len(), ok);
    assert!(
        slowest < Duration::from_secs(3),
        "a request hung ({slowest:?}); failures {:?}",
        &failed[..failed.len().min(5)]
    );
    assert!(peak < 60_000, "flow table not bounded: {peak}");
    assert_eq!(counter(&lab, 1, Reason::SnatFailed), 0);
}

/// `--max-flows` doubled by restarting the agent while a keep-alive client asks every 50 ms:
/// the table is migrated into a bigger map and not one request fails.
#[test]
fn agent_restart_with_doubled_max_flows_fails_no_request() {
    let Some(mut lab) = lab() else { return };
    let owned: Vec<Pod> = ["web-1", "web-2", "web-3"].iter().map(|n| lab.pod(n).clone()).collect();
    let client = lab.pod("client").ns.clone();
    web_up(&lab, &client, &owned.iter().collect::<Vec<_>>(), Proto::Tcp);
    let mut conn = Conn::open(&client, sa(vip(), 80));
    let mine = conn.ask().expect("first answer");
    let before = AyaDataplane::open(&lab.pin_dir(1)).unwrap().flow_capacity().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let asker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut n, mut failures) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                match conn.ask() {
                    Some(p) if p == mine => {}
                    other => failures.push(other),
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (n, failures)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let doubled = (before * 2).to_string();
    lab.stop_agent(1);
    lab.start_agent(1, &["--max-flows", &doubled]).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let (asked, failures) = asker.join().unwrap();
    assert!(failures.is_empty(), "{} of {asked} requests failed: {failures:?}", failures.len());
    assert!(lab.agent_log(1).contains("migrated into new maps"), "{}", lab.agent_log(1));
    assert_eq!(AyaDataplane::open(&lab.pin_dir(1)).unwrap().flow_capacity().unwrap(), before * 2);
    let metrics = lab.metrics(1).unwrap();
    assert!(metrics.contains(&format!("lb_conntrack_capacity {doubled}")), "{metrics}");
    eprintln!("upgrade: {asked} requests over the restart, none failed; capacity {before} -> {doubled}");
}
