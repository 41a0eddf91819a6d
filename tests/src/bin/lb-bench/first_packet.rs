//! First-packet latency (SYN → SYN/ACK) vs number of services through the forwarding
//! topology: ours, kube-proxy-shaped iptables and nftables for the same TCP Service set, and
//! plain forwarding, each connection a new flow to a server on the last service's endpoints.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use lb_tests::lab::{in_netns, nsip};

use crate::{
    forward::require_tools,
    services::*,
    topo::{BenchProgs, Topo, Variant, XdpMode, program},
};

/// A TCP server in the sink on `port` of every address: accepts and closes until dropped.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(ns: &str, port: u16) -> anyhow::Result<Server> {
        let listener = in_netns(ns, move || std::net::TcpListener::bind(("0.0.0.0", port)))??;
        // SAFETY: listen() again on our own listening socket only resizes its backlog (std's
        // 128 overflows between two polls of the accept loop below).
        unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) };
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => drop(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Ok(Server { stop, thread: Some(thread) })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connection setup (SYN → SYN/ACK) p50 and p99 in µs.
#[derive(Clone, Copy, Debug)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
}

/// One first-packet measurement: `variant` with `n` services loaded, `samples` connections
/// from `gen` to the last service (to its first endpoint for plain forwarding), each a new
/// flow through the forwarding namespace. None when the rules did not load within `limit`.
fn first_packet_cell(
    variant: Variant,
    n: u32,
    samples: usize,
    limit: Duration,
) -> anyhow::Result<Option<Percentiles>> {
    let progs = BenchProgs::load()?;
    let mut topo = Topo::serving()?;
    let target = n - 1;
    let eps = endpoints_of(target);
    for (ep, _) in &eps {
        topo.route(*ep)?;
        nsip(&topo.sink.0, &format!("addr add {ep}/32 dev lo"))?;
    }
    nsip(&topo.sink.0, "link set lo up")?;
    // The server sees the generator's address: its replies go back through `fwd`.
    let _server = Server::start(&topo.sink.0, eps[0].1)?;
    if program(&progs, &mut topo, variant, XdpMode::Generic, (n, Proto::Tcp), limit)?.is_none() {
        return Ok(None);
    }
    let to = match variant {
        Variant::Plain => std::net::SocketAddr::from(eps[0]),
        _ => std::net::SocketAddr::from((vip(target), svc_port(target))),
    };
    // Warm up: neighbour entries, the service's first flow.
    crate::clients::connect_times(&topo.source.0, to, 20)?;
    let mut t = crate::clients::connect_times(&topo.source.0, to, samples)?;
    Ok(Some(Percentiles {
        p50: crate::clients::percentile(&mut t, 0.5),
        p99: crate::clients::percentile(&mut t, 0.99),
    }))
}

/// A row of the first-packet sweep.
pub struct FirstPacketRow {
    pub services: u32,
    pub ours: Option<Percentiles>,
    pub iptables: Option<Percentiles>,
    pub nftables: Option<Percentiles>,
}

/// First-packet latency through the forwarding namespace, ours vs iptables vs nftables,
/// for each service count; and direct (plain forwarding, no load balancer).
pub fn first_packet(
    sweep: &[u32],
    nft_max: u32,
    samples: usize,
) -> anyhow::Result<(Vec<FirstPacketRow>, Percentiles)> {
    require_tools()?;
    let limit = Duration::from_secs(120);
    let direct = first_packet_cell(Variant::Plain, 1, samples, limit)?.context("plain forwarding")?;
    eprintln!(
        "bench latency: first packet, plain forwarding: p50 {:.0} µs, p99 {:.0} µs",
        direct.p50, direct.p99
    );
    let mut rows = Vec::new();
    for &n in sweep.iter().filter(|n| **n > 0) {
        let mut row = FirstPacketRow { services: n, ours: None, iptables: None, nftables: None };
        for v in [Variant::Ours, Variant::Iptables, Variant::Nftables] {
            if v == Variant::Nftables && n > nft_max {
                continue;
            }
            let p = first_packet_cell(v, n, samples, limit)?;
            if let Some(p) = p {
                eprintln!(
                    "bench latency: first packet, {} at {n} services: p50 {:.0} µs, p99 {:.0} µs",
                    v.name(),
                    p.p50,
                    p.p99
                );
            }
            match v {
                Variant::Ours => row.ours = p,
                Variant::Iptables => row.iptables = p,
                _ => row.nftables = p,
            }
        }
        rows.push(row);
    }
    Ok((rows, direct))
}
