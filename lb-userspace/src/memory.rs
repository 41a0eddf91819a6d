//! What the load balancer costs in memory: the agent's resident set, and the kernel memory of
//! each pinned map (the `memlock` its fdinfo reports: what the kernel charges for it).

use std::{
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::Path,
};

/// This process's resident set (`VmRSS`), in bytes.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    field(&status, "VmRSS:").map(|kib| kib * 1024)
}

/// Gives the heap's free pages back to the kernel. A full sync (and the parse before it)
/// allocates a multiple of what the agent keeps; the allocator holds on to freed memory, so
/// without this the resident set would stay at that peak for good.
pub fn return_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The kernel memory of the map pinned at `pin`, in bytes.
pub fn map_bytes(pin: &Path) -> Option<u64> {
    let map = aya::maps::MapData::from_pin(pin).ok()?;
    fd_bytes(map.fd().as_fd())
}

/// The kernel memory of the map behind `fd`, in bytes.
pub fn fd_bytes(fd: BorrowedFd<'_>) -> Option<u64> {
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    field(&fdinfo, "memlock:")
}

/// The number after `name` on its line of a `/proc` key-value file (`VmRSS:   1234 kB`).
fn field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_parse() {
        let fdinfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nmap_type:\t1\nkey_size:\t40\nvalue_size:\t64\nmax_entries:\t524288\nmap_flags:\t0x0\nmap_extra:\t0x0\nmemlock:\t71311616\nmap_id:\t42\n";
        assert_eq!(field(fdinfo, "memlock:"), Some(71_311_616));
        assert_eq!(field("Name:\tlb\nVmRSS:\t   20480 kB\n", "VmRSS:"), Some(20_480));
        assert_eq!(field("VmHWM: 1 kB\n", "VmRSS:"), None);
        // This process has a resident set.
        assert!(resident_bytes().is_some_and(|b| b > 0));
    }
}
