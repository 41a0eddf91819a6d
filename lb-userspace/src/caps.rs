//! The capabilities the agent needs, checked at start so that a missing one is named at once
//! instead of surfacing later as an `Operation not permitted` from some syscall.

/// What each needed capability is for. The DaemonSet grants these, plus CAP_SYS_RESOURCE,
/// which only kernels before 5.11 need (they charge maps to RLIMIT_MEMLOCK; later ones to
/// the memory cgroup): see `needed`.
pub const NEEDED: [(u32, &str, &str); 3] = [
    (39, "CAP_BPF", "load programs, create and pin maps"),
    (38, "CAP_PERFMON", "programs that read kernel memory (map values, helpers)"),
    (12, "CAP_NET_ADMIN", "attach XDP and tcx/clsact, netlink, per-interface sysctls"),
];

/// CAP_SYS_RESOURCE, needed before Linux 5.11.
const SYS_RESOURCE: (u32, &str, &str) = (24, "CAP_SYS_RESOURCE", "lift RLIMIT_MEMLOCK (kernels before 5.11)");

/// The needed capabilities on kernel `release` (`6.18.44-...`).
fn needed(release: &str) -> Vec<(u32, &'static str, &'static str)> {
    let mut v: Vec<u32> = release.split(['.', '-']).take(2).filter_map(|n| n.parse().ok()).collect();
    v.resize(2, 0);
    let mut caps = NEEDED.to_vec();
    if (v[0], v[1]) < (5, 11) {
        caps.push(SYS_RESOURCE);
    }
    caps
}

const CAP_SYS_ADMIN: u32 = 21;

/// The effective capability set of this process (`CapEff` in /proc/self/status).
fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// The needed capabilities `eff` lacks. CAP_SYS_ADMIN stands for CAP_BPF and CAP_PERFMON, as
/// on kernels before 5.8.
pub fn missing(eff: u64, release: &str) -> Vec<(&'static str, &'static str)> {
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    needed(release)
        .iter()
        .filter(|(bit, _, _)| {
            let covered = matches!(*bit, 38 | 39) && has(CAP_SYS_ADMIN);
            !has(*bit) && !covered
        })
        .map(|(_, name, why)| (*name, *why))
        .collect()
}

/// Fails with the missing capabilities named, and what each is for.
pub fn check() -> anyhow::Result<()> {
    let Some(eff) = effective() else { return Ok(()) };
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let lacking = missing(eff, release.trim());
    if lacking.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = lacking.iter().map(|(n, why)| format!("{n} ({why})")).collect();
    anyhow::bail!(
        "missing capabilities: {}; grant them (the DaemonSet in deploy/ does) or run as root",
        list.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_missing_capability_is_named() {
        let all: u64 = NEEDED.iter().map(|(b, _, _)| 1u64 << b).sum();
        assert!(missing(all, "6.18.44").is_empty());
        assert_eq!(missing(all & !(1 << 12), "6.18.44"), [("CAP_NET_ADMIN", NEEDED[2].2)]);
        assert!(
            missing((1 << 21) | (1 << 12), "6.1.0-13-amd64").is_empty(),
            "SYS_ADMIN covers BPF and PERFMON"
        );
        assert_eq!(missing(0, "6.18.44").len(), 3);
        assert_eq!(missing(all, "5.10.0-28-amd64"), [("CAP_SYS_RESOURCE", SYS_RESOURCE.2)], "old kernels");
        assert!(missing(all | (1 << 24), "5.4.0").is_empty());
    }
}
