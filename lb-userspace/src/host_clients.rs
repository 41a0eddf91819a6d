//! Clients on the node itself (`--cgroup-root`): the datapath's cgroup `sock_addr` programs
//! (`lb_ebpf::sock`) are attached to the cgroup2 root, where they see every socket of the
//! machine and act on those in the agent's network namespace. This module attaches them
//! (links pinned beside the others, so they outlive the agent and a restart swaps them with
//! no gap) and keeps connected UDP sockets off backends that left their Service: such a
//! socket never asks again, so it is destroyed (`SOCK_DESTROY`, as `ss -K` does) and its
//! owner's next call fails and reconnects, to a live backend.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink, links::PinnedLink},
};
use lb_common::abi::*;

use crate::{dataplane::AyaDataplane, netlink};

/// The connect-time programs, each on its own hook.
pub const PROGRAMS: [&str; 8] = [
    "lb_connect4",
    "lb_connect6",
    "lb_sendmsg4",
    "lb_sendmsg6",
    "lb_recvmsg4",
    "lb_recvmsg6",
    "lb_getpeername4",
    "lb_getpeername6",
];

/// `--cgroup-root`'s default (Cilium's flag has the same name).
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where the link of program `name` is pinned.
pub fn link_pin_path(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join("links").join(format!("sock-{name}"))
}

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: a valid C string and an out-parameter of the right type.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == CGROUP2_SUPER_MAGIC
}

/// The cgroup2 hierarchy to attach to: `path` if it is one. On a hybrid (v1 + v2) host
/// `/sys/fs/cgroup` is a tmpfs, so for the default path the cgroup2 mount found in
/// `/proc/self/mountinfo` (often `/sys/fs/cgroup/unified`) is taken instead, or, with none
/// visible, one the agent mounts at `/run/lb/cgroupv2`.
pub fn cgroup2_root(path: &Path) -> io::Result<PathBuf> {
    if is_cgroup2(path) {
        return Ok(path.to_path_buf());
    }
    if path == Path::new(DEFAULT_CGROUP_ROOT) {
        let info = std::fs::read_to_string("/proc/self/mountinfo")?;
        // Fields: id parent major:minor root mount-point options... - fstype source options.
        let found = info.lines().find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(point))
        });
        if let Some(p) = found.filter(|p| is_cgroup2(p)) {
            return Ok(p);
        }
        // None visible here (`ip netns exec` remounts /sys without it): mount one of our own,
        // as Cilium does. Every cgroup2 mount shows the same hierarchy.
        let own = Path::new(OWN_CGROUP2);
        if !is_cgroup2(own) {
            std::fs::create_dir_all(own)?;
            mount_cgroup2(own)?;
        }
        return Ok(own.to_path_buf());
    }
    Err(io::Error::other(format!(
        "{} is not a cgroup2 file system (mount one, or point --cgroup-root at it)",
        path.display()
    )))
}

/// Where the agent mounts cgroup2 when none is mounted.
const OWN_CGROUP2: &str = "/run/lb/cgroupv2";

fn mount_cgroup2(at: &Path) -> io::Result<()> {
    let target = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: valid C strings; no mount data.
    let rc =
        unsafe { libc::mount(c"none".as_ptr(), target.as_ptr(), c"cgroup2".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::other(format!("mounting cgroup2 at {}: {e}", at.display())));
    }
    Ok(())
}

/// This process's network namespace cookie (`SO_NETNS_COOKIE`, Linux 5.14).
pub fn netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket call; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd of ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: out-parameters of the right size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Loads the connect-time programs and attaches each to `root` through a pinned link. A link
/// pinned by an earlier agent stays attached until the new one is in (both may run for a
/// moment: the second sees a backend address, not a frontend, and leaves it).
pub fn attach(ebpf: &mut Ebpf, root: &Path, pin_dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let cgroup = std::fs::File::open(root).with_context(|| format!("opening {}", root.display()))?;
    let _ = std::fs::create_dir_all(pin_dir.join("links"));
    for name in PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("the object has no program {name}"))?
            .try_into()
            .with_context(|| format!("{name}: not a cgroup sock_addr program"))?;
        prog.load().with_context(|| format!("verifying {name}"))?;
        let path = link_pin_path(pin_dir, name);
        let old = PinnedLink::from_pin(&path).ok().and_then(|l| l.unpin().ok());
        let id = prog
            // A bpf_link (kernel 5.7, which the netns cookie needs anyway) takes no mode flag
            // and always lets several programs share the hook.
            .attach(&cgroup, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to {}", root.display()))?;
        let link: FdLink = prog.take_link(id)?.try_into().with_context(|| format!("{name}: no bpf_link"))?;
        link.pin(&path).with_context(|| format!("pinning {name}'s link"))?;
        // The earlier agent's link goes now that ours runs.
        drop(old);
    }
    Ok(())
}

// sock_diag (linux/sock_diag.h, linux/inet_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const TCP_ESTABLISHED: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    iface: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagReq {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
}

fn as_bytes<T>(v: &T) -> &[u8] {
    // SAFETY: plain-data repr(C) structs without padding holes read as bytes.
    unsafe { std::slice::from_raw_parts((v as *const T).cast(), size_of::<T>()) }
}

/// A connected UDP socket of this network namespace: family and its sock_diag id.
struct UdpSocket {
    family: u8,
    id: SockId,
}

fn connected_udp(family: u8) -> io::Result<Vec<UdpSocket>> {
    let req = DiagReq {
        family,
        protocol: libc::IPPROTO_UDP as u8,
        states: 1 << TCP_ESTABLISHED,
        ..Default::default()
    };
    let mut out = Vec::new();
    netlink::exchange(
        libc::NETLINK_SOCK_DIAG,
        SOCK_DIAG_BY_FAMILY,
        libc::NLM_F_DUMP,
        as_bytes(&req),
        |_, p| {
            if p.len() >= size_of::<DiagMsg>() {
                // SAFETY: a whole message's bytes; read unaligned.
                let m: DiagMsg = unsafe { std::ptr::read_unaligned(p.as_ptr().cast()) };
                out.push(UdpSocket { family: m.family, id: m.id });
            }
            true
        },
    )?;
    Ok(out)
}

fn destroy(s: &UdpSocket) -> io::Result<()> {
    let req = DiagReq {
        family: s.family,
        protocol: libc::IPPROTO_UDP as u8,
        states: u32::MAX,
        id: s.id,
        ..Default::default()
    };
    netlink::exchange(libc::NETLINK_SOCK_DIAG, SOCK_DESTROY, libc::NLM_F_ACK, as_bytes(&req), |_, _| true)
}

/// The socket's destination as the datapath spells addresses.
fn dst_addr(s: &UdpSocket) -> Addr {
    if s.family == libc::AF_INET as u8 { v4_mapped(s.id.dst[0]) } else { s.id.dst }
}

/// Destroys the connected UDP sockets of this network namespace that connect-time load
/// balancing pointed at a backend no longer in their Service (the packet path's membership
/// rule: a member, usable or terminating, at the same address). Returns how many.
pub fn destroy_stale_udp(dp: &AyaDataplane) -> io::Result<usize> {
    let mut n = 0;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for s in connected_udp(family)? {
            let cookie = u64::from(s.id.cookie[0]) | u64::from(s.id.cookie[1]) << 32;
            let key = SockRevKey { cookie, addr: dst_addr(&s), port: s.id.dport, _pad: [0; 3] };
            let Some(v) = dp.sock_rev(&key) else { continue };
            let member =
                dp.member(&MemberKey { service_id: v.service_id, backend_id: v.backend_id }).is_some();
            let same = dp.backend(v.backend_id).is_some_and(|b| b.addr == key.addr && b.port == key.port);
            if member && same {
                continue;
            }
            match destroy(&s) {
                Ok(()) => n += 1,
                // Closed meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(n)
}
