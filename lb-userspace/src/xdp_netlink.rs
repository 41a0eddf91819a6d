//! XDP attached through rtnetlink: the path of kernels without bpf_link XDP (before 5.9),
//! and of `--netlink-attach xdp`, which forces it so that it can be tested on newer ones.
//!
//! Such an attachment belongs to the interface, not to a file descriptor: it stays when the
//! agent exits, and the next agent swaps its program in with one RTM_SETLINK, which the
//! kernel does atomically (no packet meets the interface without a program). aya's own
//! netlink fallback cannot be used for this: it always sets `XDP_FLAGS_UPDATE_IF_NOEXIST`
//! (a restarted agent gets EBUSY) and detaches when its link is dropped. Before replacing,
//! the attached program's name is checked, so a foreign XDP program is never replaced.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

// <linux/if_link.h>
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_FLAGS: u16 = 3;
const IFLA_XDP_PROG_ID: u16 = 4;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
pub const XDP_FLAGS_UPDATE_IF_NOEXIST: u32 = 1;
pub const XDP_FLAGS_SKB_MODE: u32 = 2;
pub const XDP_FLAGS_DRV_MODE: u32 = 4;
/// `IFLA_XDP_ATTACHED` values.
pub const XDP_ATTACHED_NONE: u8 = 0;
pub const XDP_ATTACHED_SKB: u8 = 2;

const NLMSG_HDR: usize = 16;
const IFINFOMSG: usize = 16;

/// The XDP program on an interface, as rtnetlink reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachedXdp {
    pub prog_id: u32,
    /// `XDP_ATTACHED_*`: driver, generic, offloaded or several.
    pub mode: u8,
}

/// Puts `prog_fd` on `ifindex` (or takes the program off with `None`). Without
/// `XDP_FLAGS_UPDATE_IF_NOEXIST` in `flags`, a program already there in the same mode is
/// replaced in place.
pub fn set(ifindex: u32, prog_fd: Option<RawFd>, flags: u32) -> io::Result<()> {
    let mut attrs = Vec::new();
    push_attr(&mut attrs, IFLA_XDP_FD, &prog_fd.unwrap_or(-1).to_ne_bytes());
    push_attr(&mut attrs, IFLA_XDP_FLAGS, &flags.to_ne_bytes());
    let mut body = ifinfomsg(ifindex);
    push_attr(&mut body, libc::IFLA_XDP | NLA_F_NESTED, &attrs);
    request(libc::RTM_SETLINK, libc::NLM_F_ACK, &body).map(|_| ())
}

/// The XDP program attached to `ifindex`, if any.
pub fn attached(ifindex: u32) -> io::Result<Option<AttachedXdp>> {
    let reply = request(libc::RTM_GETLINK, 0, &ifinfomsg(ifindex))?;
    let Some(link) = reply.get(IFINFOMSG..) else { return Ok(None) };
    let Some(xdp) = attrs(link).find(|(t, _)| *t == libc::IFLA_XDP).map(|(_, v)| v) else { return Ok(None) };
    let mut out = AttachedXdp { prog_id: 0, mode: XDP_ATTACHED_NONE };
    for (t, v) in attrs(xdp) {
        match t {
            IFLA_XDP_ATTACHED => out.mode = v.first().copied().unwrap_or(0),
            IFLA_XDP_PROG_ID if v.len() >= 4 => out.prog_id = u32::from_ne_bytes([v[0], v[1], v[2], v[3]]),
            _ => {}
        }
    }
    Ok((out.mode != XDP_ATTACHED_NONE && out.prog_id != 0).then_some(out))
}

/// The name of loaded program `id` (as the kernel keeps it: 15 characters at most).
pub fn program_name(id: u32) -> Option<String> {
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_string))
}

fn ifinfomsg(ifindex: u32) -> Vec<u8> {
    let mut m = vec![0u8; IFINFOMSG];
    m[0] = libc::AF_UNSPEC as u8;
    m[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    m
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    buf.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// The attributes in `buf`: (type without flags, value).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
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

/// Sends one request and returns the payload of its reply (empty for a plain ack); a
/// negative ack is the error.
fn request(kind: u16, flags: i32, body: &[u8]) -> io::Result<Vec<u8>> {
    // SAFETY: a plain socket; owned by `OwnedFd` from here on.
    let sock = unsafe {
        let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE);
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
    let mut buf = vec![0u8; 32 * 1024];
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
                    return if code == 0 { Ok(Vec::new()) } else { Err(io::Error::from_raw_os_error(-code)) };
                }
                libc::NLMSG_DONE => return Ok(Vec::new()),
                _ if kind == libc::RTM_NEWLINK => return Ok(payload.to_vec()),
                _ => {}
            }
            data = &data[len.next_multiple_of(4).min(data.len())..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_aligned_and_read_back() {
        let mut buf = Vec::new();
        push_attr(&mut buf, IFLA_XDP_ATTACHED, &[1]);
        push_attr(&mut buf, IFLA_XDP_PROG_ID | NLA_F_NESTED, &42u32.to_ne_bytes());
        assert_eq!(buf.len(), 8 + 8);
        let got: Vec<(u16, Vec<u8>)> = attrs(&buf).map(|(t, v)| (t, v.to_vec())).collect();
        assert_eq!(got, vec![(IFLA_XDP_ATTACHED, vec![1]), (IFLA_XDP_PROG_ID, 42u32.to_ne_bytes().to_vec())]);
        // A length past the end stops the walk instead of reading beyond it.
        assert_eq!(attrs(&[200, 0, 1, 0, 0, 0]).count(), 0);
    }

    #[test]
    fn loopback_has_no_xdp_program() {
        // Reading needs no privilege.
        assert_eq!(attached(1).unwrap(), None);
    }
}
