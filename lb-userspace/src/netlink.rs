//! One netlink request and its replies, for the few kernel conversations the agent has
//! without a netlink crate: XDP attachments and routes (rtnetlink), sockets (sock_diag).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

pub const NLMSG_HDR: usize = 16;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

/// Sends request `kind` (with `NLM_F_REQUEST | flags`) and `body` on a `protocol` socket, and
/// hands each reply message but the end (type, payload) to `each` until it returns false,
/// the dump ends, or an ack arrives. A negative ack is the error.
pub fn exchange(
    protocol: i32,
    kind: u16,
    flags: i32,
    body: &[u8],
    mut each: impl FnMut(u16, &[u8]) -> bool,
) -> io::Result<()> {
    // SAFETY: a plain socket; owned by `OwnedFd` from here on.
    let sock = unsafe {
        let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(fd)
    };
    let mut msg = Vec::with_capacity(NLMSG_HDR + body.len());
    msg.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | flags) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    msg.extend_from_slice(body);
    // SAFETY: sending our own buffer on our socket (to the kernel: a zeroed sockaddr_nl).
    let sent = unsafe {
        let mut to: libc::sockaddr_nl = std::mem::zeroed();
        to.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            &to as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: reading into our own buffer.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut data = &buf[..n as usize];
        while data.len() >= NLMSG_HDR {
            let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
            let kind = u16::from_ne_bytes([data[4], data[5]]);
            if len < NLMSG_HDR || len > data.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink reply"));
            }
            let payload = &data[NLMSG_HDR..len];
            match kind as i32 {
                libc::NLMSG_ERROR => {
                    let code = payload.get(..4).map_or(0, |c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]));
                    return if code == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-code)) };
                }
                libc::NLMSG_DONE => return Ok(()),
                _ => {
                    if !each(kind, payload) {
                        return Ok(());
                    }
                }
            }
            data = &data[len.next_multiple_of(4).min(data.len())..];
        }
    }
}

/// Appends attribute `kind` with `value` to `buf`.
pub fn push_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    buf.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// The attributes in `buf`: (type without flags, value).
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((kind, value))
    })
}

/// The `mtu` metric of every route of this network namespace (rtnetlink dump, both
/// families): routes that set one (`ip route ... mtu 1400`).
pub fn route_mtus() -> io::Result<Vec<u32>> {
    const RTM_F_SIZE: usize = 12; // struct rtmsg
    const RTA_METRICS: u16 = 8;
    const RTAX_MTU: u16 = 2;
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let mut rtmsg = [0u8; RTM_F_SIZE];
        rtmsg[0] = family;
        exchange(libc::NETLINK_ROUTE, libc::RTM_GETROUTE, libc::NLM_F_DUMP, &rtmsg, |kind, payload| {
            if kind == libc::RTM_NEWROUTE && payload.len() >= RTM_F_SIZE {
                for (t, v) in attrs(&payload[RTM_F_SIZE..]) {
                    if t != RTA_METRICS {
                        continue;
                    }
                    for (m, mv) in attrs(v) {
                        if m == RTAX_MTU && mv.len() >= 4 {
                            out.push(u32::from_ne_bytes([mv[0], mv[1], mv[2], mv[3]]));
                        }
                    }
                }
            }
            true
        })?;
    }
    Ok(out)
}
