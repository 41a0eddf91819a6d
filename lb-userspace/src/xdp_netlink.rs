//! XDP attached through rtnetlink: the path of kernels without bpf_link XDP (before 5.9),
//! and of `--netlink-attach xdp`, which forces it so that it can be tested on newer ones.
//!
//! Such an attachment belongs to the interface, not to a file descriptor: it stays when the
//! agent exits, and the next agent swaps its program in with one RTM_SETLINK, which the
//! kernel does atomically (no packet meets the interface without a program). aya's own
//! netlink fallback cannot be used for this: it always sets `XDP_FLAGS_UPDATE_IF_NOEXIST`
//! (a restarted agent gets EBUSY) and detaches when its link is dropped. Before replacing,
//! the attached program's name is checked, so a foreign XDP program is never replaced.

use std::{io, os::fd::RawFd};

use crate::netlink::{self, attrs, push_attr};

// <linux/if_link.h>
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_FLAGS: u16 = 3;
const IFLA_XDP_PROG_ID: u16 = 4;
const NLA_F_NESTED: u16 = 1 << 15;
pub const XDP_FLAGS_UPDATE_IF_NOEXIST: u32 = 1;
pub const XDP_FLAGS_SKB_MODE: u32 = 2;
pub const XDP_FLAGS_DRV_MODE: u32 = 4;
/// `IFLA_XDP_ATTACHED` values.
pub const XDP_ATTACHED_NONE: u8 = 0;
pub const XDP_ATTACHED_SKB: u8 = 2;

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

/// Sends one request and returns the payload of its reply (empty for a plain ack); a
/// negative ack is the error.
fn request(kind: u16, flags: i32, body: &[u8]) -> io::Result<Vec<u8>> {
    let mut reply = Vec::new();
    netlink::exchange(libc::NETLINK_ROUTE, kind, flags, body, |k, payload| {
        if k == libc::RTM_NEWLINK {
            reply = payload.to_vec();
            return false;
        }
        true
    })?;
    Ok(reply)
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
