//! The lab Services the L3 tests share: the `web` Service and its slice, applying a
//! manifest and waiting until both agents synced and traffic shows it, asking the VIP from a
//! pod, and a long-lived connection.
#![allow(dead_code, reason = "each test file uses a subset")]

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use lb_tests::{
    harness::privileged,
    lab::{Answer, Bins, Lab, POD_PORT, Pod, in_netns, in_ns, sa, slice_yaml, tcp_ask, udp_ask, wait_for},
};

pub const VIP: &str = "198.19.0.10";
pub const LB_IP: &str = "198.19.100.1";
/// A change must be visible in traffic within this (Kubernetes allows 30 s or more).
pub const LIVE: Duration = Duration::from_secs(1);
pub const ASK: Duration = Duration::from_millis(600);

pub fn lab() -> Option<Lab> {
    if !privileged() {
        return None;
    }
    let bins = Bins::beside(&std::env::current_exe().unwrap()).expect("lab binaries");
    Some(Lab::standard(bins).expect("standard lab"))
}

/// The standard lab's namespaces and pods with no agent yet (a test starts them its way).
pub fn lab_without_agents() -> Option<Lab> {
    if !privileged() {
        return None;
    }
    let bins = Bins::beside(&std::env::current_exe().unwrap()).expect("lab binaries");
    Some(Lab::standard_topology(bins).expect("lab"))
}

pub fn vip() -> IpAddr {
    VIP.parse().unwrap()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Proto {
    Tcp,
    Udp,
}

pub fn ask(ns: &str, to: SocketAddr, p: Proto) -> Answer {
    match p {
        Proto::Tcp => tcp_ask(ns, to, ASK),
        Proto::Udp => udp_ask(ns, to, 0, ASK),
    }
}

/// Service `name` with the given spec lines (YAML, indented by two) and optional status.
pub fn service(name: &str, spec: &str, status: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n{spec}\nstatus: {{{status}}}\n---\n"
    )
}

pub const READY: &str = "ready: true";

/// The default web Service: ClusterIP VIP:80 -> 9376 (TCP and UDP, port names `http` and
/// `udp`), NodePort 30080 (TCP).
pub fn web(type_: &str, extra: &str) -> String {
    service(
        "web",
        &format!(
            "  type: {type_}\n  clusterIP: {VIP}\n{extra}  ports:\n  - {{name: http, port: 80, targetPort: {POD_PORT}, nodePort: 30080}}\n  - {{name: udp, port: 80, protocol: UDP, targetPort: {POD_PORT}, nodePort: 30080}}\n"
        ),
        "",
    )
}

/// web as a LoadBalancer (`LB_IP`, TCP only) that admits only `ranges`
/// (`loadBalancerSourceRanges`, comma-separated).
pub fn web_lb_with_ranges(ranges: &str) -> String {
    service(
        "web",
        &format!(
            "  type: LoadBalancer\n  clusterIP: {VIP}\n  loadBalancerSourceRanges: [{ranges}]\n  ports:\n  - {{name: http, port: 80, targetPort: {POD_PORT}, nodePort: 30080}}\n"
        ),
        &format!("loadBalancer: {{ingress: [{{ip: {LB_IP}}}]}}"),
    )
}

pub fn web_slice(endpoints: &[(&Pod, &str)]) -> String {
    slice_yaml("web-1", "web", &[("http", POD_PORT, "TCP"), ("udp", POD_PORT, "UDP")], endpoints)
}

/// The default web Service (ClusterIP) over `pods`, all ready; returns once a `p` request
/// from `ns` to the VIP is answered.
pub fn web_up(lab: &Lab, ns: &str, pods: &[&Pod], p: Proto) {
    apply(lab, &(web("ClusterIP", "") + &web_slice(&ready(pods))), "service up", || {
        matches!(ask(ns, sa(vip(), 80), p), Answer::Reply(..))
    });
}

pub fn pods<'a>(lab: &'a Lab, names: &[&str]) -> Vec<&'a Pod> {
    names.iter().map(|n| lab.pod(n)).collect()
}

pub fn ready<'a>(pods: &[&'a Pod]) -> Vec<(&'a Pod, &'static str)> {
    pods.iter().map(|p| (*p, READY)).collect()
}

/// `GET path` on node `node`'s health port (10256): the status code and how long it took.
pub fn health(lab: &Lab, node: u8, path: &str) -> (String, Duration) {
    let t = Instant::now();
    let out = in_ns(
        &lab.node_netns(node),
        &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2"],
    )
    .arg(format!("http://127.0.0.1:10256{path}"))
    .output()
    .unwrap();
    (String::from_utf8_lossy(&out.stdout).into_owned(), t.elapsed())
}

/// Syncs in the agent's log, text or JSON (`--log-format`).
pub fn syncs(lab: &Lab, node: u8) -> usize {
    let log = lab.agent_log(node);
    log.matches("] synced:").count() + log.matches("\"message\":\"synced:").count()
}

/// Applies `yaml` as web.yaml, waits until both nodes' agents have synced since, then until
/// `probe` holds; all within `LIVE`.
pub fn apply(lab: &Lab, yaml: &str, what: &str, probe: impl FnMut() -> bool) {
    let before = (syncs(lab, 1), syncs(lab, 2));
    let t0 = Instant::now();
    lab.write_manifest("web.yaml", yaml).unwrap();
    wait_for(LIVE, || Ok(syncs(lab, 1) > before.0 && syncs(lab, 2) > before.1))
        .unwrap_or_else(|e| panic!("{what}: agents did not sync: {e}\nnode-1 agent:\n{}", lab.agent_log(1)));
    let mut probe = probe;
    wait_for(LIVE * 3, || Ok(probe()))
        .unwrap_or_else(|e| panic!("{what}: {e}\nnode-1 agent:\n{}", lab.agent_log(1)));
    let t = t0.elapsed();
    assert!(t <= LIVE, "{what}: took {t:?}");
}

/// Kubernetes' rule: every endpoint answers within n²+30 requests. Returns answers per pod
/// and the client addresses the pods saw.
pub fn reach_all(
    ns: &str,
    to: SocketAddr,
    p: Proto,
    want: &[&str],
) -> (BTreeMap<String, usize>, BTreeSet<String>) {
    let mut seen = BTreeMap::new();
    let mut clients = BTreeSet::new();
    let budget = want.len() * want.len() + 30;
    for _ in 0..budget {
        match ask(ns, to, p) {
            Answer::Reply(pod, client) => {
                *seen.entry(pod).or_insert(0) += 1;
                clients.insert(client.rsplit_once(':').map(|(ip, _)| ip.to_string()).unwrap_or(client));
            }
            other => panic!("{p:?} {to} from {ns}: {other:?}"),
        }
        if want.iter().all(|w| seen.contains_key(*w)) && seen.values().sum::<usize>() >= want.len() * 3 {
            break;
        }
    }
    let got: BTreeSet<&str> = seen.keys().map(String::as_str).collect();
    assert_eq!(got, want.iter().copied().collect(), "{p:?} {to} from {ns}: answers {seen:?}");
    (seen, clients)
}

/// A long-lived TCP connection from `ns` to `to`: send a line, read `NAME CLIENT`.
pub struct Conn(pub BufReader<TcpStream>);

impl Conn {
    pub fn open(ns: &str, to: SocketAddr) -> Conn {
        let s = in_netns(ns, move || TcpStream::connect_timeout(&to, ASK)).unwrap().expect("connect");
        s.set_read_timeout(Some(ASK)).unwrap();
        Conn(BufReader::new(s))
    }

    pub fn ask(&mut self) -> Option<String> {
        self.0.get_mut().write_all(b"ping\n").ok()?;
        let mut line = String::new();
        self.0.read_line(&mut line).ok()?;
        line.split_whitespace().next().map(str::to_string)
    }
}

/// A client asking `to` from `ns` every 50 ms in the background, until `finish`: which pods
/// answered, and every failure with its time.
pub struct Asker {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(BTreeSet<String>, Vec<String>)>,
}

impl Asker {
    pub fn start(ns: &str, to: SocketAddr) -> Asker {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (st, ns) = (stop.clone(), ns.to_string());
        let thread = std::thread::spawn(move || {
            let (t0, mut pods, mut failures) = (Instant::now(), BTreeSet::new(), Vec::new());
            while !st.load(Ordering::Relaxed) {
                match tcp_ask(&ns, to, ASK) {
                    Answer::Reply(pod, _) => {
                        pods.insert(pod);
                    }
                    other => failures.push(format!("at {:.2}s: {other:?}", t0.elapsed().as_secs_f64())),
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (pods, failures)
        });
        Asker { stop, thread }
    }

    /// Stops asking: (pods that answered, failures).
    pub fn finish(self) -> (BTreeSet<String>, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// A 1 MiB line sent on one TCP connection from `ns` to `to`, and the answer line (the
/// server answers once it has the whole line): the answer and how long it all took.
pub fn upload_a_mebibyte(ns: &str, to: SocketAddr) -> std::io::Result<(String, Duration)> {
    in_netns(ns, move || -> std::io::Result<(String, Duration)> {
        let t = Instant::now();
        let mut s = TcpStream::connect_timeout(&to, ASK)?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut line = vec![b'x'; 1 << 20];
        line.push(b'\n');
        s.write_all(&line)?;
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer)?;
        Ok((answer, t.elapsed()))
    })
    .map_err(std::io::Error::other)?
}

/// A 2000-byte UDP datagram, fragmented by the sender's stack (links of 1500 bytes), and its
/// answer, from `ns` to `to`.
pub fn big_datagram(ns: &str, to: SocketAddr) -> std::io::Result<String> {
    in_netns(ns, move || -> std::io::Result<String> {
        let any: IpAddr = if to.is_ipv4() { "0.0.0.0".parse().unwrap() } else { "::".parse().unwrap() };
        let s = std::net::UdpSocket::bind((any, 0))?;
        s.connect(to)?;
        s.set_read_timeout(Some(ASK))?;
        s.send(&[b'x'; 2000])?;
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .map_err(std::io::Error::other)?
}
