//! Floods for the L3 tests: TCP SYNs (or UDP datagrams) from random sources inside one lab
//! prefix (the lab's own address plan: nothing leaves it, and answers to those sources die
//! at the nodes for want of a route), paced and bounded in time.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use crate::{
    harness::{Spec, TCP_SYN},
    lab::spawn_in_netns,
};

/// A running flood; `join` for the number of packets sent.
pub struct Flood(std::thread::JoinHandle<anyhow::Result<std::io::Result<u64>>>);

/// What a flood sends.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Syn,
    Udp,
}

impl Flood {
    /// Floods `dst` from namespace `ns` with SYNs from random addresses of `sources` (a
    /// prefix of the lab's range) and random ports, `pps` a second, for `duration`.
    pub fn start(
        ns: &str,
        dst: SocketAddrV4,
        sources: (Ipv4Addr, u8),
        pps: u64,
        duration: Duration,
    ) -> anyhow::Result<Flood> {
        Self::start_kind(ns, dst, sources, pps, duration, Kind::Syn)
    }

    /// `start`, sending `kind`.
    pub fn start_kind(
        ns: &str,
        dst: SocketAddrV4,
        sources: (Ipv4Addr, u8),
        pps: u64,
        duration: Duration,
        kind: Kind,
    ) -> anyhow::Result<Flood> {
        assert!(
            u32::from(sources.0) >> 17 == u32::from(Ipv4Addr::new(198, 18, 0, 0)) >> 17,
            "lab sources only"
        );
        Ok(Flood(spawn_in_netns(ns, move || send(dst, sources, pps, duration, kind))?))
    }

    pub fn join(self) -> anyhow::Result<u64> {
        let r = self.0.join().map_err(|_| anyhow::anyhow!("flood thread panicked"))??;
        Ok(r?)
    }
}

fn send(
    dst: SocketAddrV4,
    (net, bits): (Ipv4Addr, u8),
    pps: u64,
    duration: Duration,
    kind: Kind,
) -> std::io::Result<u64> {
    let raw = Raw::open(*dst.ip())?;
    let host_bits = 32 - bits as u32;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64;
    let mut next = move || {
        // xorshift64*: cheap and good enough to spread sources.
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let (start, mut sent) = (Instant::now(), 0u64);
    while start.elapsed() < duration {
        // Paced in batches of a millisecond's worth.
        let due = (start.elapsed().as_secs_f64() * pps as f64) as u64;
        if sent >= due {
            std::thread::sleep(Duration::from_micros(500));
            continue;
        }
        let r = next();
        let host = (r as u32) & ((1u32 << host_bits) - 1);
        let src = Ipv4Addr::from(u32::from(net) | host.max(1));
        let sport = 1024 + ((r >> 32) as u16 % 60_000);
        let (src, to_ip) = (src.to_string(), dst.ip().to_string());
        let pkt = match kind {
            Kind::Syn => Spec::tcp(&src, sport, &to_ip, dst.port()).flags(TCP_SYN).build(),
            Kind::Udp => Spec::udp(&src, sport, &to_ip, dst.port()).payload(b"flood").build(),
        };
        if raw.send(&pkt[14..]) {
            sent += 1;
        }
    }
    Ok(sent)
}

/// A raw IPv4 socket: sends IP packets as written, source address included (the kernel
/// fills in the total length and the header checksum).
pub struct Raw {
    fd: i32,
    to: libc::sockaddr_in,
}

impl Raw {
    pub fn open(dst: Ipv4Addr) -> std::io::Result<Raw> {
        // SAFETY: a raw IPv4 socket; IPPROTO_RAW implies IP_HDRINCL (we write the header).
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(dst.octets()) },
            sin_zero: [0; 8],
        };
        Ok(Raw { fd, to })
    }

    /// Sends one IP packet; whether the kernel took it.
    pub fn send(&self, ip: &[u8]) -> bool {
        // SAFETY: sendto with a valid buffer and address.
        let rc = unsafe {
            libc::sendto(
                self.fd,
                ip.as_ptr().cast(),
                ip.len(),
                0,
                (&self.to as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            )
        };
        rc >= 0
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        // SAFETY: closing our own socket.
        unsafe { libc::close(self.fd) };
    }
}

/// Sends `frames` (built with `Spec`: the Ethernet header is left out) from namespace `ns`
/// to `dst` through a raw socket, source addresses as written: for spoofing tests. Returns
/// how many the kernel took.
pub fn send_raw(ns: &str, dst: Ipv4Addr, frames: Vec<Vec<u8>>) -> anyhow::Result<u64> {
    let sent = spawn_in_netns(ns, move || -> std::io::Result<u64> {
        let raw = Raw::open(dst)?;
        Ok(frames.iter().filter(|f| raw.send(&f[14..])).count() as u64)
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
    Ok(sent?)
}
