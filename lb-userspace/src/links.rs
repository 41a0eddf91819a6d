//! Network interfaces: listing them, matching `--tc-iface` names and globs, and hearing about
//! links that appear or disappear (an rtnetlink socket subscribed to link events), so pod
//! interfaces created after the agent started get the TC program within milliseconds.

use std::{
    collections::BTreeMap,
    ffi::CStr,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

/// Every interface: name -> ifindex.
pub fn interfaces() -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.insert(name, (*p).if_index);
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// The interface `name` is enslaved to (a bridge, a bond), if any: its `master` in sysfs.
pub fn master(name: &str) -> Option<String> {
    let link = std::fs::read_link(format!("/sys/class/net/{name}/master")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Interface addresses (no loopback, no link-local), in the order the kernel lists them.
pub fn addresses() -> Vec<(String, IpAddr)> {
    let mut out = Vec::new();
    // SAFETY: getifaddrs fills a linked list we walk read-only and free.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut p = head;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() {
                let name = CStr::from_ptr((*p).ifa_name).to_string_lossy().into_owned();
                let ip = match (*a).sa_family as i32 {
                    libc::AF_INET => {
                        let sin = &*(a as *const libc::sockaddr_in);
                        Some(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(a as *const libc::sockaddr_in6);
                        Some(IpAddr::from(sin6.sin6_addr.s6_addr))
                    }
                    _ => None,
                };
                if let Some(ip) = ip.filter(|ip| !ip.is_loopback() && !is_link_local(ip)) {
                    out.push((name, ip));
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// `--tc-iface` patterns: exact names or shell globs (`lxc*`, `veth?ab`).
#[derive(Debug, Clone)]
pub struct Patterns(Vec<glob::Pattern>);

impl Patterns {
    pub fn new(patterns: &[String]) -> Result<Self, glob::PatternError> {
        patterns.iter().map(|p| glob::Pattern::new(p)).collect::<Result<_, _>>().map(Patterns)
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| p.matches(name))
    }

    /// Matching interfaces now present.
    pub fn select(&self, all: &BTreeMap<String, u32>) -> BTreeMap<String, u32> {
        all.iter().filter(|(n, _)| self.matches(n)).map(|(n, i)| (n.clone(), *i)).collect()
    }
}

/// Sets `changed` (and calls `wake`) whenever the kernel reports a link added, removed or
/// changed. Runs a blocking reader thread for the life of the process.
pub fn watch(changed: Arc<AtomicBool>, wake: impl Fn() + Send + 'static) -> std::io::Result<()> {
    // SAFETY: plain socket syscalls; the fd is owned by `OwnedFd` from here on.
    let fd = unsafe {
        let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(fd)
    };
    // SAFETY: a zeroed sockaddr_nl with the link multicast group.
    unsafe {
        let mut sa: libc::sockaddr_nl = std::mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups = libc::RTMGRP_LINK as u32;
        let len = std::mem::size_of::<libc::sockaddr_nl>() as u32;
        if libc::bind(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    std::thread::Builder::new().name("netlink-links".into()).spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: reading into our own buffer.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                // ENOBUFS (we fell behind): a rescan catches up all the same.
                changed.store(true, Ordering::Release);
                wake();
                continue;
            }
            // Any message means "look again": the rescan is cheap and exact.
            changed.store(true, Ordering::Release);
            wake();
        }
    })?;
    Ok(())
}

/// The smallest MTU of this network namespace's interfaces and routes (a route's `mtu`
/// metric): translated packets longer than it are checked against their route at XDP
/// (`Config::mtu_floor`). 0 when nothing could be read.
pub fn mtu_floor() -> u32 {
    let links = std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("mtu")).ok()?.trim().parse::<u32>().ok());
    let routes = crate::netlink::route_mtus().unwrap_or_default();
    links.chain(routes).filter(|m| *m >= 68).min().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_and_names() {
        let p = Patterns::new(&["lbp*".into(), "eth0".into()]).unwrap();
        let all: BTreeMap<String, u32> =
            [("lo".into(), 1), ("eth0".into(), 2), ("lbp-a".into(), 3), ("eth1".into(), 4)].into();
        assert_eq!(p.select(&all).keys().collect::<Vec<_>>(), ["eth0", "lbp-a"]);
        assert!(Patterns::new(&["[".into()]).is_err());
    }

    #[test]
    fn loopback_is_listed_and_addresses_skip_it() {
        assert!(interfaces().contains_key("lo"));
        assert!(addresses().iter().all(|(_, ip)| !ip.is_loopback()));
    }
}
