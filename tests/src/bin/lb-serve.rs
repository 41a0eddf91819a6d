//! `lb-serve`: the lab's backend pod server, like Kubernetes' `serve_hostname` / agnhost
//! `netexec`. On every `--port` it answers:
//! * HTTP `GET /` or `/hostname` with the pod name, `GET /clientip` with the client's
//!   `ip:port` as the pod sees it;
//! * any other TCP line with `NAME CLIENT` (one answer per line, for long-lived connections);
//! * every UDP datagram with `NAME CLIENT`.
//!
//! It listens on IPv4 and, where the pod has IPv6, on IPv6 (sockets of one family each, so
//! an IPv4 client shows as itself, not as `::ffff:a.b.c.d`).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
};

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The name to answer with.
    #[arg(long)]
    name: String,
    /// TCP and UDP port to serve (repeatable).
    #[arg(long = "port", required = true)]
    ports: Vec<u16>,
    /// Serve on this address only (repeatable), instead of every address of the namespace:
    /// then a UDP answer leaves from the address asked, as on a node with many addresses.
    #[arg(long = "address")]
    addresses: Vec<IpAddr>,
}

fn http(
    stream: &mut TcpStream,
    first: &str,
    reader: &mut BufReader<TcpStream>,
    name: &str,
    peer: SocketAddr,
) {
    // Skip the request headers.
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) && line.trim() != "" {
        line.clear();
    }
    let path = first.split(' ').nth(1).unwrap_or("/");
    let body = match path {
        "/clientip" => format!("{peer}\n"),
        _ => format!("{name}\n"),
    };
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn tcp_conn(mut stream: TcpStream, name: String) {
    let Ok(peer) = stream.peer_addr() else { return };
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut line = String::new();
    let mut first = true;
    while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        if first && line.starts_with("GET ") {
            let l = line.clone();
            http(&mut stream, l.trim_end(), &mut reader, &name, peer);
            return;
        }
        first = false;
        // One write per answer: a formatted write would go out in pieces and meet Nagle
        // and delayed ACKs (40 ms round trips).
        if stream.write_all(format!("{name} {peer}\n").as_bytes()).is_err() {
            return;
        }
        line.clear();
    }
}

/// A socket of `ty` bound to `ip:port`, IPv6 sockets for IPv6 only.
fn bound(ip: IpAddr, port: u16, ty: socket2::Type) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Socket};
    let s = Socket::new(Domain::for_address(SocketAddr::new(ip, port)), ty, None)?;
    if ip.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if ty == socket2::Type::STREAM {
        // As std's TcpListener::bind does: a restarted server rebinds at once.
        s.set_reuse_address(true)?;
    }
    s.bind(&SocketAddr::new(ip, port).into())?;
    Ok(s)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut threads = Vec::new();
    let v6 = std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|t| !t.trim().is_empty());
    let families: &[IpAddr] = if !args.addresses.is_empty() {
        &args.addresses
    } else if v6 {
        &[IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)]
    } else {
        &[IpAddr::V4(Ipv4Addr::UNSPECIFIED)]
    };
    for (port, any) in args.ports.iter().flat_map(|p| families.iter().map(move |a| (*p, *a))) {
        let tcp = bound(any, port, socket2::Type::STREAM)?;
        // A deep accept queue: benchmarks open thousands of connections back to back, and
        // std's 128 overflowed here (SYNs dropped, 1 s retransmits).
        tcp.listen(4096)?;
        let tcp: TcpListener = tcp.into();
        let udp: UdpSocket = bound(any, port, socket2::Type::DGRAM)?.into();
        let name = args.name.clone();
        threads.push(thread::spawn(move || {
            for s in tcp.incoming().flatten() {
                let name = name.clone();
                thread::spawn(move || tcp_conn(s, name));
            }
        }));
        let name = args.name.clone();
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok((_, peer)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(format!("{name} {peer}\n").as_bytes(), peer);
            }
        }));
    }
    eprintln!("{}: serving", args.name);
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
