//! The flow table's garbage collector: removes closed and idle flows, both directions
//! together, so their SNAT ports come back and the table stays bounded by what is live.
//!
//! Why in the agent and not BPF timers: a pass reads the whole table with batched lookups
//! (one syscall per 8 192 entries) and deletes with batched deletes, off the packet path
//! entirely; the datapath pays one coarse clock read and, at most once a second per flow,
//! a timestamp store. Timers would add a timer object to every entry (and their setup to
//! every new flow). `bench conntrack` measures a pass at 100k and 1M entries.
//!
//! Pressure: when the table is over `PRESSURE_FILL` full, handshakes that did not complete
//! within `PRESSURE_SYN_TIMEOUT` are removed (a SYN flood fills the table with those; live
//! flows are never touched), and the next pass comes sooner.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    os::fd::{AsFd as _, BorrowedFd},
    path::Path,
    time::{Duration, Instant},
};

use lb_common::{abi::*, ct};

use crate::rawmap::{self, Layout};

/// Above this fill the GC treats unfinished handshakes as expendable.
pub const PRESSURE_FILL: f64 = 0.5;
/// How long an unfinished handshake may wait under pressure.
pub const PRESSURE_SYN_TIMEOUT: u64 = 2;
/// A direction whose other half is missing is left alone this long: a flow being created
/// (reverse entry first) or removed (both, one after the other) is briefly half there.
const ORPHAN_GRACE_NS: u64 = 10 * ct::NS_PER_SEC;

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_(coarse_)ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * ct::NS_PER_SEC + ts.tv_nsec as u64
}

/// One reading of `/proc/timer_list`: (CLOCK_MONOTONIC ns, jiffies), taken together.
fn timer_list() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/timer_list").ok()?;
    let field = |prefix: &str, suffix: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().trim_end_matches(suffix).trim().parse().ok())
    };
    Some((field("now at ", "nsecs")?, field("jiffies: ", "")?))
}

/// The datapath clock's calibration, `(tick_ns, jiffies, ns at those jiffies)` (see
/// `Config::tick_ns`): the kernel's HZ from two readings of jiffies 100 ms apart, and a
/// reading of both clocks together. `None` where /proc/timer_list cannot be read (the
/// programs then keep the coarse clock helper).
pub fn tick_calibration() -> Option<(u64, u64, u64)> {
    let (t1, j1) = timer_list()?;
    std::thread::sleep(Duration::from_millis(100));
    let (t2, j2) = timer_list()?;
    let rate = (j2 - j1) as f64 / ((t2 - t1) as f64 / 1e9);
    let hz = [100u64, 250, 300, 1000]
        .into_iter()
        .min_by(|a, b| (rate - *a as f64).abs().total_cmp(&(rate - *b as f64).abs()))?;
    // The kernel's TICK_NSEC.
    Some(((1_000_000_000 + hz / 2) / hz, j2, t2))
}

/// FxHash-style hasher for the pass's index of a million flow keys: SipHash (std's
/// default, built against collision attacks on untrusted input) took most of a pass; these
/// keys come from our own table.
#[derive(Default)]
struct FastHasher(u64);

impl std::hash::Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_ne_bytes(w));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(v.into());
    }
    fn write_u16(&mut self, v: u16) {
        self.write_u64(v.into());
    }
    fn write_u8(&mut self, v: u8) {
        self.write_u64(v.into());
    }
}

type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FastHasher>>;

/// What one pass saw and did.
#[derive(Debug, Clone, Default)]
pub struct PassStats {
    /// Entries (both directions) before the pass.
    pub entries: usize,
    pub capacity: u32,
    /// Pairs removed by this pass, and entries without their other half.
    pub removed_pairs: usize,
    pub removed_orphans: usize,
    /// Pairs by state name (`ct::state_name`).
    pub by_state: BTreeMap<&'static str, u64>,
    /// Source-NAT ports held, per node address.
    pub snat_ports: BTreeMap<IpAddr, u64>,
    pub took: Duration,
    pub under_pressure: bool,
    /// The addresses the flows in the table act on (a forward entry's destination, a reply
    /// entry's source), sorted: what the address pre-filter must keep listing.
    pub referenced: Vec<Addr>,
}

impl PassStats {
    pub fn fill(&self) -> f64 {
        if self.capacity == 0 { 0.0 } else { self.entries as f64 / self.capacity as f64 }
    }
}

fn read<T: Copy>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>());
    // SAFETY: at least size_of::<T>() bytes; T is plain data (map ABI types).
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) }
}

fn bytes_of<T>(v: &T) -> &[u8] {
    // SAFETY: viewing a plain-data value (map ABI type, no padding) as its bytes.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

/// Reads the whole table.
pub fn entries(fd: BorrowedFd<'_>, l: &Layout) -> std::io::Result<Vec<(FlowKey, FlowValue)>> {
    let (keys, values) = rawmap::lookup_batch_all(fd, l, 8192)?;
    let (ks, vs) = (l.key_size as usize, l.value_size as usize);
    Ok(keys.chunks_exact(ks).zip(values.chunks_exact(vs)).map(|(k, v)| (read(k), read(v))).collect())
}

/// One pass over the table behind `fd`: removes every pair that is expired by `timeouts`
/// at `now` (and, under pressure, unfinished handshakes older than `PRESSURE_SYN_TIMEOUT`).
pub fn pass(fd: BorrowedFd<'_>, timeouts: &CtTimeouts, now: u64) -> std::io::Result<PassStats> {
    let t0 = Instant::now();
    let l = rawmap::layout(fd)?;
    let all = entries(fd, &l)?;
    let mut stats = PassStats { entries: all.len(), capacity: l.max_entries, ..Default::default() };
    stats.under_pressure = stats.fill() > PRESSURE_FILL;
    let index: FastMap<FlowKey, usize> = all.iter().enumerate().map(|(i, (k, _))| (*k, i)).collect();
    let referenced: FastMap<Addr, ()> =
        all.iter().map(|(k, v)| (if v.direction == FLOW_FORWARD { k.dst } else { k.src }, ())).collect();
    stats.referenced = referenced.into_keys().collect();
    stats.referenced.sort_unstable();
    let mut paired = vec![false; all.len()];
    let mut doomed: Vec<(FlowKey, FlowValue)> = Vec::new();
    let mut orphans: Vec<FlowKey> = Vec::new();
    for (i, (key, fwd)) in all.iter().enumerate() {
        if fwd.direction != FLOW_FORWARD {
            continue;
        }
        let rkey = ct::reverse_key(key, fwd);
        let rev = index
            .get(&rkey)
            .map(|&j| (j, &all[j].1))
            .filter(|(_, r)| r.direction == FLOW_REPLY && ct::forward_key(&rkey, r) == *key);
        let Some((j, rev)) = rev else { continue };
        paired[i] = true;
        paired[j] = true;
        *stats.by_state.entry(ct::state_name(key.proto, fwd.state, rev.state)).or_default() += 1;
        if fwd.flags & FLOW_F_SNAT != 0 && fwd.nat_addr != key.src {
            *stats.snat_ports.entry(ip_from_addr(&fwd.nat_addr)).or_default() += 1;
        }
        let handshake_stale = stats.under_pressure
            && key.proto == PROTO_TCP
            && fwd.state == ct::CT_NEW
            && now.saturating_sub(fwd.last_seen_ns.max(rev.last_seen_ns))
                > PRESSURE_SYN_TIMEOUT * ct::NS_PER_SEC;
        if handshake_stale || ct::expired(key.proto, Some(fwd), Some(rev), timeouts, now) {
            doomed.push((*key, *fwd));
        }
    }
    for (i, (key, v)) in all.iter().enumerate() {
        if !paired[i] && now.saturating_sub(v.last_seen_ns) > ORPHAN_GRACE_NS {
            orphans.push(*key);
        }
    }
    // Re-check each doomed flow against the table as it is now: a packet may have refreshed
    // it since the snapshot, or a new SYN reopened its tuple as a new flow.
    let mut delete = Vec::with_capacity(doomed.len() * 2 * l.key_size as usize);
    for (key, snap) in &doomed {
        let Some(cur) = rawmap::lookup(fd, &l, bytes_of(key))? else { continue };
        let cur: FlowValue = read(&cur);
        if cur.created_ns != snap.created_ns
            || cur.last_seen_ns != snap.last_seen_ns
            || cur.state != snap.state
        {
            continue;
        }
        delete.extend_from_slice(bytes_of(key));
        delete.extend_from_slice(bytes_of(&ct::reverse_key(key, snap)));
        stats.removed_pairs += 1;
    }
    for key in &orphans {
        delete.extend_from_slice(bytes_of(key));
    }
    stats.removed_orphans = orphans.len();
    rawmap::delete_batch(fd, &l, &delete)?;
    stats.took = t0.elapsed();
    Ok(stats)
}

/// When the next pass is due: sooner the fuller the table.
pub fn next_interval(base: Duration, last: &PassStats) -> Duration {
    if last.under_pressure { (base / 10).max(Duration::from_millis(200)) } else { base }
}

/// Opens the pinned flow table of `pin_dir`.
pub fn open(pin_dir: &Path) -> Result<aya::maps::MapData, aya::maps::MapError> {
    aya::maps::MapData::from_pin(pin_dir.join(lb_common::maps::CONNTRACK))
}

/// Runs `pass` on the pinned table every `interval` (sooner under pressure) until `stop`;
/// hands each pass's result to `report`.
pub fn run(
    pin_dir: &Path,
    timeouts: CtTimeouts,
    interval: Duration,
    stop: &std::sync::atomic::AtomicBool,
    mut report: impl FnMut(std::io::Result<PassStats>),
) {
    let map = match open(pin_dir) {
        Ok(m) => m,
        Err(e) => return report(Err(std::io::Error::other(e))),
    };
    // The first pass at once: the table's figures are there from the start.
    let mut wait = Duration::ZERO;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let r = pass(map.fd().as_fd(), &timeouts, monotonic_ns());
        if let Ok(s) = &r {
            wait = next_interval(interval, s);
        }
        report(r);
    }
}
