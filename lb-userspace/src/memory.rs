//! What the load balancer costs in memory: the agent's resident set, and the kernel memory of
//! each pinned map (the `memlock` its fdinfo reports: what the kernel charges for it).

use std::{
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::Path,
};

/// A process's memory as its `/proc/<pid>/status` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ProcessMemory {
    /// `VmRSS`.
    pub resident_bytes: u64,
    /// `RssAnon`: its heap and stacks, without the file-backed pages it maps. The agent
    /// writes the Maglev and backend arrays through `mmap` (a window at a time), so those
    /// pages show in `VmRSS` although they are the maps' kernel memory.
    pub anonymous_bytes: u64,
}

/// The memory of process `pid` (`"self"` for this one).
pub fn of_process(pid: &str) -> Option<ProcessMemory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(ProcessMemory {
        resident_bytes: field(&status, "VmRSS:")? * 1024,
        anonymous_bytes: field(&status, "RssAnon:")? * 1024,
    })
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

/// Bytes this process's allocator has handed out and not had back (`mallinfo2`: in its
/// arenas plus its own mappings). Beside `RssAnon` it tells live data from the allocator's
/// free space and overhead.
pub fn heap_in_use() -> Option<u64> {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let info = unsafe { libc::mallinfo2() };
        Some((info.uordblks + info.hblkhd) as u64)
    }
    #[cfg(not(target_env = "gnu"))]
    None
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
        assert!(of_process("self").is_some_and(|m| m.resident_bytes > 0 && m.anonymous_bytes > 0));
    }
}
