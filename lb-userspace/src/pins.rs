//! Pinned maps carry their layout (type, key and value size, flags, max_entries), and a pin
//! is only reused when it has exactly the layout this build wants. Otherwise it is migrated:
//! the old pin is moved aside (`migrating/NAME`), the object is loaded with a fresh map in its
//! place, the entries are copied across (flows included), the programs swap atomically into
//! their pinned links, the entries the old programs wrote meanwhile are copied again, and
//! the old pin goes. So `--max-flows` and the other capacities can change on a running node
//! without dropping a connection. A layout that cannot be migrated is refused, naming the
//! map and the difference: nothing is silently reused.
//!
//! A migration interrupted by a crash resumes on the next start (the old pins remain in `migrating/`).

use std::{
    collections::BTreeMap,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::maps::MapData;
use lb_common::{abi::FlowValue, ct, maps};

use crate::rawmap::{self, Layout};

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("parsing the eBPF object: {0}")]
    Object(String),
    #[error(
        "pinned map {path}: has {have}, this build wants {want}; cannot migrate it ({why}). \
         Remove the pin directory to start afresh (this drops the map's state)"
    )]
    Incompatible { path: PathBuf, have: Layout, want: Layout, why: &'static str },
    #[error("pinned map {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("migrating {map}: {what}")]
    Copy { map: String, what: String },
}

/// How a map with another layout is carried over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// Same key and value: entries copied as they are (a capacity change).
    Copy,
    /// The flow table of the release before flow life cycles (48-byte values, LRU): each
    /// entry gets a state (established) and a last-seen time (now).
    Flows48,
    /// The Maglev array of the releases before two slots shared an element (a `u32` per
    /// element, padded to 8 bytes by the kernel): slot `i` moves to half `i % 2` of element
    /// `i / 2`, so every table stays where the service entries point.
    MaglevPacked,
    /// The agent writes the whole content at start (settings, XDP ports), or the content
    /// lives for milliseconds: nothing to copy.
    Rewritten,
}

/// Maps the agent fills itself on every start, the event ring (whose events are not kept)
/// and the fragment table (a datagram's fragments arrive within milliseconds: at worst the
/// few being reassembled during an upgrade are lost, as on a lossy link).
const REWRITTEN: [&str; 5] =
    [maps::CONFIG, maps::XDP_TX_PORTS, maps::POD_PORTS, maps::EVENTS, maps::FRAGMENTS];

/// Maps only the agent writes (the programs read them): nothing changes them between the
/// first copy and the programs' swap, so they are not copied again (a grown Maglev array
/// holds millions of elements).
const AGENT_WRITTEN: [&str; 5] =
    [maps::SERVICES, maps::BACKENDS, maps::MAGLEV, maps::MEMBERS, maps::SOURCE_RANGES];

/// The layouts this build's object wants for its pinned maps, with `max_entries` overridden
/// as the loader will.
pub fn wanted(
    object: &[u8],
    max_entries: &BTreeMap<&str, u32>,
) -> Result<BTreeMap<String, Layout>, PinError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| PinError::Object(e.to_string()))?;
    Ok(obj
        .maps
        .iter()
        .filter(|(_, m)| m.pinning() == aya_obj::maps::PinningType::ByName)
        .map(|(name, m)| {
            let max = max_entries.get(name.as_str()).copied().unwrap_or(m.max_entries());
            (
                name.clone(),
                Layout {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries: max,
                    flags: m.map_flags(),
                },
            )
        })
        .collect())
}

fn open(path: &Path) -> Result<MapData, PinError> {
    MapData::from_pin(path)
        .map_err(|e| PinError::Io { path: path.to_path_buf(), source: std::io::Error::other(e) })
}

fn pin_layout(path: &Path) -> Result<Layout, PinError> {
    let m = open(path)?;
    rawmap::layout(m.fd().as_fd()).map_err(|source| PinError::Io { path: path.to_path_buf(), source })
}

/// `max_entries` of map `name` pinned in `dir` (of the old pin while a migration of it is
/// unfinished), if it is pinned there.
pub fn pinned_max_entries(dir: &Path, name: &str) -> Option<u32> {
    let old = old_path(dir, name);
    let path = if old.exists() { old } else { dir.join(name) };
    pin_layout(&path).ok().map(|l| l.max_entries)
}

/// How `have` becomes `want` for map `name`, or why it cannot.
fn how(name: &str, have: &Layout, want: &Layout) -> Result<How, &'static str> {
    if REWRITTEN.contains(&name) {
        return Ok(How::Rewritten);
    }
    if have.key_size != want.key_size {
        return Err("the key size differs");
    }
    if name == maps::CONNTRACK && have.value_size == 48 && want.value_size == size_of::<FlowValue>() as u32 {
        return Ok(How::Flows48);
    }
    if name == maps::MAGLEV && have.value_size == 4 && want.value_size == 4 * maps::MAGLEV_SLOTS_PER_ENTRY {
        return Ok(How::MaglevPacked);
    }
    if have.value_size != want.value_size {
        return Err("the value size differs");
    }
    if have.map_type != want.map_type {
        return Err("the map type differs");
    }
    Ok(How::Copy)
}

/// Flags the kernel sets on its own (devmaps are read-only to programs): not a difference.
const KERNEL_FLAGS: u32 = 1 << 7 | 1 << 8; // BPF_F_RDONLY_PROG, BPF_F_WRONLY_PROG

fn same(have: &Layout, want: &Layout) -> bool {
    Layout { flags: have.flags & !KERNEL_FLAGS, ..*have }
        == Layout { flags: want.flags & !KERNEL_FLAGS, ..*want }
}

/// Where an old pin waits during a migration (bpffs allows no `.` in names).
const OLD_DIR: &str = "migrating";

fn old_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(OLD_DIR).join(name)
}

/// Maps being migrated: their old pins, moved aside, until `finish`.
#[derive(Debug, Default)]
pub struct Migration {
    dir: PathBuf,
    maps: Vec<(String, How, Layout)>,
}

/// Compares every pin in `dir` with `want`; moves those to migrate aside. Call before loading
/// the object (which then creates fresh maps in their place).
pub fn prepare(dir: &Path, want: &BTreeMap<String, Layout>) -> Result<Migration, PinError> {
    let mut m = Migration { dir: dir.to_path_buf(), maps: Vec::new() };
    for (name, want) in want {
        let (path, old) = (dir.join(name), old_path(dir, name));
        if old.exists() {
            // An interrupted migration: its old map still holds what must be copied.
            let have = pin_layout(&old)?;
            let how = how(name, &have, want).map_err(|why| PinError::Incompatible {
                path: old.clone(),
                have,
                want: *want,
                why,
            })?;
            if path.exists() && !same(&pin_layout(&path)?, want) {
                std::fs::remove_file(&path).map_err(|source| PinError::Io { path: path.clone(), source })?;
            }
            m.maps.push((name.clone(), how, have));
            continue;
        }
        if !path.exists() {
            continue;
        }
        let have = pin_layout(&path)?;
        if same(&have, want) {
            continue;
        }
        let how = how(name, &have, want).map_err(|why| PinError::Incompatible {
            path: path.clone(),
            have,
            want: *want,
            why,
        })?;
        let io = |source| PinError::Io { path: old.clone(), source };
        std::fs::create_dir_all(dir.join(OLD_DIR)).map_err(io)?;
        std::fs::rename(&path, &old).map_err(|source| PinError::Io { path: path.clone(), source })?;
        m.maps.push((name.clone(), how, have));
    }
    Ok(m)
}

impl Migration {
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// What is migrated, for the log: `name (old layout)`.
    pub fn describe(&self) -> Vec<String> {
        self.maps.iter().map(|(n, how, l)| format!("{n} ({how:?} from {l})")).collect()
    }

    /// Copies every old map's entries into the new pinned map; entries already there (the
    /// new programs' own) win. Returns the entries copied.
    pub fn copy(&self) -> Result<usize, PinError> {
        self.copy_maps(|_| true)
    }

    fn copy_maps(&self, wanted: impl Fn(&str) -> bool) -> Result<usize, PinError> {
        let mut total = 0;
        for (name, how, have) in &self.maps {
            if *how == How::Rewritten || !wanted(name) {
                continue;
            }
            total += self.copy_one(name, *how, have)?;
        }
        Ok(total)
    }

    fn copy_one(&self, name: &str, how: How, have: &Layout) -> Result<usize, PinError> {
        let err = |what: String| PinError::Copy { map: name.to_string(), what };
        let old = open(&old_path(&self.dir, name))?;
        let new = open(&self.dir.join(name))?;
        let new_layout = rawmap::layout(new.fd().as_fd()).map_err(|e| err(e.to_string()))?;
        // Batched reads of the old map: a 4M-slot Maglev array takes a thousand calls, not
        // eight million (which held a restarted agent's health back for tens of seconds).
        let (keys, values) = rawmap::read_all(old.fd().as_fd(), have).map_err(|e| err(e.to_string()))?;
        let (keys, values) = match how {
            How::MaglevPacked => pack_slots(&keys, &values, rawmap::value_buf_len(have)),
            _ => (keys, values),
        };
        let (ks, vs) = match how {
            How::MaglevPacked => (4, 8),
            _ => (have.key_size as usize, rawmap::value_buf_len(have)),
        };
        let is_array = matches!(have.map_type, 2 | 6); // ARRAY, PERCPU_ARRAY
        let too_small = || {
            err(format!(
                "the new map ({} entries) cannot hold the old one's entries; raise its capacity",
                new_layout.max_entries
            ))
        };
        if is_array && how == How::Copy {
            // Batched: a grown Maglev array holds millions of set elements.
            return copy_array(new.fd().as_fd(), (ks, vs), &keys, &values).map_err(|e| {
                match e.raw_os_error() {
                    Some(libc::E2BIG) => too_small(),
                    _ => err(e.to_string()),
                }
            });
        }
        let now = crate::conntrack_gc::monotonic_ns();
        let mut copied = 0;
        for (key, value) in keys.chunks_exact(ks).zip(values.chunks_exact(vs)) {
            if is_array && value.iter().all(|b| *b == 0) {
                continue;
            }
            let value = match how {
                How::Flows48 => flow48_to_current(value, now),
                _ => value.to_vec(),
            };
            // Arrays always hold every index: overwrite. Hashes: the new map's entry wins.
            let flags = if is_array { 0 } else { rawmap::NOEXIST };
            match rawmap::update(new.fd().as_fd(), key, &value, flags) {
                Ok(()) => copied += 1,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) if e.raw_os_error() == Some(libc::E2BIG) => return Err(too_small()),
                Err(e) => return Err(err(e.to_string())),
            }
        }
        Ok(copied)
    }

    /// After the programs swapped to the new maps: copies what the old programs wrote in the
    /// meantime, then removes the old pins.
    pub fn finish(self) -> Result<usize, PinError> {
        let copied = self.copy_maps(|name| !AGENT_WRITTEN.contains(&name))?;
        for (name, _, _) in &self.maps {
            let path = old_path(&self.dir, name);
            std::fs::remove_file(&path).map_err(|source| PinError::Io { path, source })?;
        }
        let _ = std::fs::remove_dir(self.dir.join(OLD_DIR));
        Ok(copied)
    }

    /// Undoes `prepare` when the new object could not be loaded or attached: the new pins
    /// go and the old ones come back (the old programs never left them).
    pub fn abandon(self) {
        for (name, _, _) in &self.maps {
            let _ = std::fs::remove_file(self.dir.join(name));
            let _ = std::fs::rename(old_path(&self.dir, name), self.dir.join(name));
        }
        let _ = std::fs::remove_dir(self.dir.join(OLD_DIR));
    }
}

/// Writes the elements of an array's `(keys, values)` (entries of `sizes`: key and value
/// bytes) that are not all zero into array `fd`, a batch of `COPY_BATCH` per call. Returns
/// how many.
fn copy_array(
    fd: std::os::fd::BorrowedFd<'_>,
    (ks, vs): (usize, usize),
    keys: &[u8],
    values: &[u8],
) -> std::io::Result<usize> {
    const COPY_BATCH: usize = 65_536;
    let (mut set_keys, mut set_values) = (Vec::new(), Vec::new());
    for (key, value) in keys.chunks_exact(ks).zip(values.chunks_exact(vs)) {
        if value.iter().any(|b| *b != 0) {
            set_keys.extend_from_slice(key);
            set_values.extend_from_slice(value);
        }
    }
    for (k, v) in set_keys.chunks(ks * COPY_BATCH).zip(set_values.chunks(vs * COPY_BATCH)) {
        rawmap::update_batch(fd, ks, k, v).map_err(|(_, e)| e)?;
    }
    Ok(set_keys.len() / ks.max(1))
}

/// `(keys, values)` of a one-slot-per-element Maglev array (`u32` index keys, values of
/// `stride` bytes holding one `u32`) as those of the two-slot layout: element `i / 2`, the
/// slot in half `i % 2`. Elements whose slots are all unset are left out.
fn pack_slots(keys: &[u8], values: &[u8], stride: usize) -> (Vec<u8>, Vec<u8>) {
    let mut packed: BTreeMap<u32, [u32; 2]> = BTreeMap::new();
    for (k, v) in keys.chunks_exact(4).zip(values.chunks_exact(stride)) {
        let slot = u32::from_ne_bytes(k.try_into().expect("4-byte key"));
        let id = u32::from_ne_bytes(v[..4].try_into().expect("4-byte value"));
        if id != 0 {
            packed.entry(slot / 2).or_default()[(slot % 2) as usize] = id;
        }
    }
    let keys = packed.keys().flat_map(|e| e.to_ne_bytes()).collect();
    let values = packed.values().flat_map(|pair| pair.iter().flat_map(|id| id.to_ne_bytes())).collect();
    (keys, values)
}

/// The 48-byte flow value of the release before life cycles: the same fields up to
/// `service_id`, then no state and no times.
fn flow48_to_current(old: &[u8], now: u64) -> Vec<u8> {
    let mut v = old.to_vec();
    v.resize(size_of::<FlowValue>(), 0);
    v[38] = ct::CT_ESTABLISHED; // state
    v[48..56].copy_from_slice(&now.to_ne_bytes()); // last_seen_ns
    v[56..64].copy_from_slice(&now.to_ne_bytes()); // created_ns
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(map_type: u32, value_size: u32, max_entries: u32) -> Layout {
        Layout { map_type, key_size: 40, value_size, max_entries, flags: 0 }
    }

    #[test]
    fn only_compatible_layouts_migrate() {
        assert_eq!(how("lb_affinity", &l(9, 16, 10), &l(9, 16, 20)), Ok(How::Copy));
        assert_eq!(how(maps::CONNTRACK, &l(9, 48, 10), &l(1, 64, 20)), Ok(How::Flows48));
        assert_eq!(how(maps::CONFIG, &l(2, 40, 1), &l(2, 72, 1)), Ok(How::Rewritten));
        assert!(how("lb_affinity", &l(9, 16, 10), &l(9, 24, 10)).is_err());
        assert!(how("lb_affinity", &l(9, 16, 10), &l(1, 16, 10)).is_err());
        let mut k = l(9, 16, 10);
        k.key_size = 20;
        assert!(how("lb_affinity", &k, &l(9, 16, 10)).is_err());
    }

    #[test]
    fn the_one_slot_maglev_array_migrates_packed() {
        let maglev =
            |value_size, max_entries| Layout { map_type: 2, key_size: 4, value_size, max_entries, flags: 0 };
        assert_eq!(how(maps::MAGLEV, &maglev(4, 8), &maglev(8, 4)), Ok(How::MaglevPacked));
        assert!(how(maps::MAGLEV, &maglev(4, 8), &maglev(12, 4)).is_err());
        // Slots 0..5 of the old array (ids 0, 7, 0, 0, 9, 3): element 0 holds (0, 7),
        // element 1 nothing (left out), element 2 (9, 3).
        let keys: Vec<u8> = (0u32..6).flat_map(|k| k.to_ne_bytes()).collect();
        let values: Vec<u8> = [0u32, 7, 0, 0, 9, 3].iter().flat_map(|v| v.to_ne_bytes()).collect();
        let (k, v) = pack_slots(&keys, &values, 4);
        let words = |b: &[u8]| {
            b.chunks_exact(4).map(|w| u32::from_ne_bytes(w.try_into().unwrap())).collect::<Vec<_>>()
        };
        assert_eq!(words(&k), [0, 2]);
        assert_eq!(words(&v), [0, 7, 9, 3]);
    }

    #[test]
    fn old_flows_become_established_now() {
        let mut old = vec![0u8; 48];
        old[36] = lb_common::abi::FLOW_FORWARD;
        old[40..44].copy_from_slice(&7u32.to_ne_bytes());
        let new = flow48_to_current(&old, 123);
        assert_eq!(new.len(), 64);
        // SAFETY: FlowValue is plain data of exactly this size.
        let v: FlowValue = unsafe { std::ptr::read_unaligned(new.as_ptr().cast()) };
        assert_eq!(
            (v.direction, v.backend_id, v.state, v.last_seen_ns, v.created_ns),
            (1, 7, ct::CT_ESTABLISHED, 123, 123)
        );
    }
}
