//! The agent's report for `lb status`: what only the running agent knows (its source, its
//! attachments, its last sync, the Services it skipped, the flow table as its GC last saw
//! it), written as JSON beside the pin dir's lock file after each sync and at most every
//! `EVERY` otherwise, replaced atomically. `lb status` adds what the kernel says now:
//! whether the agent still holds the lock, and each map's fill.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::model::Name;

/// How often the report is rewritten when no sync happened (the GC figures move).
pub const EVERY: Duration = Duration::from_secs(2);
/// How soon after a sync the report is written again, at the soonest.
pub const AFTER_SYNC: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// `lb` version of the agent.
    pub version: String,
    /// `object_hash` of the datapath object the agent loaded.
    pub datapath_object: String,
    pub pid: u32,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339: when this report was written.
    pub written_at: String,
    pub source: SourceState,
    pub attachments: Vec<Attachment>,
    pub syncs: u64,
    pub sync_errors: u64,
    pub last_sync: Option<LastSync>,
    /// Services the planner could not program (a capacity), with why.
    pub skipped: Vec<Skipped>,
    /// Frontends claimed by more than one Service port.
    pub contested_frontends: usize,
    pub flow_table: Option<FlowTable>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SourceState {
    /// `manifests` or `kubernetes`.
    pub kind: String,
    /// The manifest folder, or the node whose objects are watched.
    pub detail: String,
    /// Objects rejected (bad manifests) or failed watch requests so far.
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Attachment {
    pub interface: String,
    /// `xdp` or `tc`.
    pub hook: String,
    /// How: `native`, `generic`, `netlink`, `tcx`, `clsact`, `replaced`.
    pub mode: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LastSync {
    /// RFC 3339.
    pub at: String,
    pub duration_ms: f64,
    pub ok: bool,
    pub services: usize,
    pub frontends: usize,
    pub backends: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Skipped {
    pub service: String,
    pub why: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FlowTable {
    /// Entries (both directions) when the GC pass began.
    pub entries: usize,
    pub capacity: u32,
    /// Flow pairs by state.
    pub by_state: BTreeMap<String, u64>,
    /// Source-NAT ports held, per node address.
    pub snat_ports: BTreeMap<String, u64>,
    /// RFC 3339: when that GC pass ended.
    pub at: String,
    pub pass_ms: f64,
}

/// Where the report of the agent on `pin_dir` is: beside its lock file.
pub fn path(pin_dir: &Path) -> PathBuf {
    crate::bpffs::lock_path(pin_dir).with_extension("status.json")
}

/// Writes `report` for `pin_dir`: to a temporary file, then renamed over the last one, so a
/// reader sees one whole report or the previous one.
pub fn write(pin_dir: &Path, report: &Report) -> std::io::Result<()> {
    replace(&path(pin_dir), &serde_json::to_vec_pretty(report)?)
}

/// Writes `bytes` to a temporary file beside `to`, then renames it over `to`.
fn replace(to: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = to.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, to)
}

/// The last report written for `pin_dir`, if any.
pub fn read(pin_dir: &Path) -> anyhow::Result<Option<Report>> {
    let p = path(pin_dir);
    match std::fs::read(&p) {
        Ok(bytes) => {
            Ok(Some(serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("{}: {e}", p.display())),
    }
}

/// Removes the report and the frontend names of `pin_dir` (`--cleanup`): whether there was
/// a report. Absent is fine.
pub fn remove(pin_dir: &Path) -> std::io::Result<bool> {
    let gone = |p: PathBuf| match std::fs::remove_file(p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    };
    gone(names_path(pin_dir))?;
    gone(path(pin_dir))
}

/// The Service behind a frontend, for `lb monitor` (which sees only addresses).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FrontendName {
    pub namespace: Name,
    pub service: Name,
    /// The Service port's name (empty for an unnamed port, or for a whole ClusterIP).
    pub port: Name,
}

/// Where the frontend names of the agent on `pin_dir` are, beside its report. Kept apart
/// from it: they change only when Services do, and may be many.
pub fn names_path(pin_dir: &Path) -> PathBuf {
    crate::bpffs::lock_path(pin_dir).with_extension("frontends.json")
}

/// The key of a frontend in the names file: `ip:port/tcp|udp` (`[ip]:port/...` for IPv6)
/// from a port and an `abi::PROTO_*`, or the bare address of a ClusterIP (any port of it).
pub fn frontend_key(ip: std::net::IpAddr, port_proto: Option<(u16, u8)>) -> String {
    let name = |proto| if proto == lb_common::abi::PROTO_UDP { "udp" } else { "tcp" };
    match (ip, port_proto) {
        (_, None) => ip.to_string(),
        (std::net::IpAddr::V6(v6), Some((port, proto))) => format!("[{v6}]:{port}/{}", name(proto)),
        (v4, Some((port, proto))) => format!("{v4}:{port}/{}", name(proto)),
    }
}

/// A frontend as the agent keeps its name: an address with a port and an `abi::PROTO_*`,
/// or a ClusterIP as a whole (no port). The names file spells it `frontend_key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Frontend {
    pub ip: std::net::IpAddr,
    pub port_proto: Option<(u16, u8)>,
}

/// The Service behind each frontend, as the agent keeps it (no string per key: 100 000
/// Services have twice as many entries).
pub type FrontendNames = BTreeMap<Frontend, FrontendName>;

/// Writes the frontend names, replacing the last ones whole.
pub fn write_names(pin_dir: &Path, names: &FrontendNames) -> std::io::Result<()> {
    /// The names keyed by `frontend_key`, written as they are spelled.
    struct Keyed<'a>(&'a FrontendNames);
    impl Serialize for Keyed<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(self.0.iter().map(|(f, n)| (frontend_key(f.ip, f.port_proto), n)))
        }
    }
    replace(&names_path(pin_dir), &serde_json::to_vec(&Keyed(names))?)
}

/// The frontend names the agent on `pin_dir` wrote last (none if it never did).
pub fn read_names(pin_dir: &Path) -> BTreeMap<String, FrontendName> {
    std::fs::read(names_path(pin_dir)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// A short, stable name of a datapath object (FNV-1a, 64 bits): enough to tell two builds
/// apart in `lb status`, not a security digest.
pub fn object_hash(object: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in object {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// RFC 3339 of a point `ago` before now.
pub fn timestamp_ago(ago: Duration) -> String {
    let now = jiff::Timestamp::now();
    let then = jiff::SignedDuration::try_from(ago).ok().and_then(|d| now.checked_sub(d).ok()).unwrap_or(now);
    format!("{then:.3}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_survives_the_round_trip_and_is_replaced_whole() {
        let pin_dir = std::env::temp_dir().join(format!("lb-report-test-{}", std::process::id()));
        let mut r = Report { version: "1".into(), pid: 7, syncs: 3, ..Default::default() };
        r.skipped.push(Skipped { service: "default/big".into(), why: "no room".into() });
        write(&pin_dir, &r).unwrap();
        assert_eq!(read(&pin_dir).unwrap(), Some(r.clone()));
        r.syncs = 4;
        write(&pin_dir, &r).unwrap();
        assert_eq!(read(&pin_dir).unwrap().unwrap().syncs, 4);
        let web = FrontendName { namespace: "default".into(), service: "web".into(), port: "http".into() };
        let whole = FrontendName { port: "".into(), ..web.clone() };
        let vip = "198.19.0.10".parse().unwrap();
        let names = FrontendNames::from([
            (Frontend { ip: vip, port_proto: Some((80, lb_common::abi::PROTO_TCP)) }, web.clone()),
            (Frontend { ip: vip, port_proto: None }, whole.clone()),
        ]);
        write_names(&pin_dir, &names).unwrap();
        // Written keyed as `lb monitor` looks them up.
        let written = read_names(&pin_dir);
        assert_eq!(
            written,
            BTreeMap::from([("198.19.0.10:80/tcp".into(), web), ("198.19.0.10".into(), whole)])
        );
        let udp = frontend_key("2001:2::1".parse().unwrap(), Some((80, lb_common::abi::PROTO_UDP)));
        assert_eq!(udp, "[2001:2::1]:80/udp");
        assert!(remove(&pin_dir).unwrap());
        assert_eq!(read(&pin_dir).unwrap(), None);
        assert!(read_names(&pin_dir).is_empty());
        assert!(!remove(&pin_dir).unwrap(), "a second removal finds nothing");
    }

    #[test]
    fn object_hashes_tell_builds_apart() {
        assert_eq!(object_hash(b""), "cbf29ce484222325");
        assert_ne!(object_hash(b"a"), object_hash(b"b"));
    }
}
