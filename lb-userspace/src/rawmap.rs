//! Type-agnostic access to a BPF map through its file descriptor: its layout, and entries as
//! bytes. The pin migration (`pins`) copies maps of any type with it, without knowing their
//! Rust key and value types; the typed work stays in `dataplane`.

use std::os::fd::{AsRawFd, BorrowedFd};

/// A map's layout, as the kernel reports it (`bpf_map_info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {} key {} B value {} B flags {:#x} max_entries {}",
            self.map_type, self.key_size, self.value_size, self.flags, self.max_entries
        )
    }
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `BPF_NOEXIST`.
pub const NOEXIST: u64 = 1;

const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The first fields of `struct bpf_map_info` (the kernel fills what fits).
#[repr(C)]
#[derive(Default)]
struct MapInfoPrefix {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: bpf(2) with a pointer to an attribute struct of the size we pass.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

/// The layout of the map behind `fd`.
pub fn layout(fd: BorrowedFd<'_>) -> std::io::Result<Layout> {
    let mut info = MapInfoPrefix::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<MapInfoPrefix>() as u32,
        info: &mut info as *mut _ as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(Layout {
        map_type: info.map_type,
        key_size: info.key_size,
        value_size: info.value_size,
        max_entries: info.max_entries,
        flags: info.map_flags,
    })
}

fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .map(|r| r.split('-').next_back().and_then(|n| n.parse::<usize>().ok()))
                .max()
                .flatten()
        })
        .map_or(1, |last| last + 1)
}

/// Bytes one lookup returns: per-CPU maps hold a value per possible CPU, 8-byte aligned.
pub fn value_buf_len(l: &Layout) -> usize {
    match l.map_type {
        BPF_MAP_TYPE_PERCPU_HASH | BPF_MAP_TYPE_PERCPU_ARRAY | BPF_MAP_TYPE_LRU_PERCPU_HASH => {
            (l.value_size as usize).next_multiple_of(8) * possible_cpus()
        }
        _ => l.value_size as usize,
    }
}

/// Every key of the map (`BPF_MAP_GET_NEXT_KEY` walk).
pub fn keys(fd: BorrowedFd<'_>, l: &Layout) -> std::io::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut prev: Option<Vec<u8>> = None;
    loop {
        let mut next = vec![0u8; l.key_size as usize];
        let mut attr = MapElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: prev.as_ref().map_or(0, |k| k.as_ptr() as u64),
            value: next.as_mut_ptr() as u64,
            ..Default::default()
        };
        match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {
                out.push(next.clone());
                prev = Some(next);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
    }
}

/// The value of `key`, `None` if absent.
pub fn lookup(fd: BorrowedFd<'_>, l: &Layout, key: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
    let mut value = vec![0u8; value_buf_len(l)];
    let mut attr = MapElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        ..Default::default()
    };
    match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn update(fd: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u64) -> std::io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags,
        ..Default::default()
    };
    sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// Reads the whole map (hash types) in batches of `batch` entries: (keys, values), each
/// entry `key_size` / `value_size` bytes in one flat buffer. One syscall per batch instead
/// of two per entry: the GC reads a million entries in tens of milliseconds.
pub fn lookup_batch_all(fd: BorrowedFd<'_>, l: &Layout, batch: u32) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let (ks, vs) = (l.key_size as usize, value_buf_len(l));
    let mut keys = Vec::new();
    let mut values = Vec::new();
    let mut token = [0u8; 8];
    let mut first = true;
    let mut kbuf = vec![0u8; ks * batch as usize];
    let mut vbuf = vec![0u8; vs * batch as usize];
    loop {
        // The kernel reads in_batch and writes the next token to out_batch: two buffers.
        let in_copy = token;
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { in_copy.as_ptr() as u64 },
            out_batch: token.as_mut_ptr() as u64,
            keys: kbuf.as_mut_ptr() as u64,
            values: vbuf.as_mut_ptr() as u64,
            count: batch,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = attr.count as usize;
        keys.extend_from_slice(&kbuf[..n * ks]);
        values.extend_from_slice(&vbuf[..n * vs]);
        match r {
            Ok(_) => first = false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok((keys, values)),
            Err(e) => return Err(e),
        }
    }
}

/// Every entry of the map, as `lookup_batch_all` gives them: batched where the map type
/// supports it, else (LPM tries) one key at a time.
pub fn read_all(fd: BorrowedFd<'_>, l: &Layout) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    match lookup_batch_all(fd, l, 4096) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP) | Some(524)) => {
            let (mut keys, mut values) = (Vec::new(), Vec::new());
            for key in self::keys(fd, l)? {
                if let Some(v) = lookup(fd, l, &key)? {
                    keys.extend_from_slice(&key);
                    values.extend_from_slice(&v);
                }
            }
            Ok((keys, values))
        }
        other => other,
    }
}

/// Deletes `keys` (a flat buffer of `key_size`-byte keys) in one call; keys already gone
/// are skipped. Returns how many were deleted.
pub fn delete_batch(fd: BorrowedFd<'_>, l: &Layout, keys: &[u8]) -> std::io::Result<usize> {
    let ks = l.key_size as usize;
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: (rest.len() / ks) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = sys_bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        let done = attr.count as usize;
        deleted += done;
        match r {
            Ok(_) => break,
            // Stopped at a key that is gone (a packet or the datapath removed it): skip it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                rest = &rest[((done + 1) * ks).min(rest.len())..]
            }
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// Writes `keys` and `values` (flat buffers of `key_size`- and `value_size`-byte entries,
/// the same count) in one call. An error says how many went in before it (`Err((done, e))`).
pub fn update_batch(
    fd: BorrowedFd<'_>,
    key_size: usize,
    keys: &[u8],
    values: &[u8],
) -> Result<(), (usize, std::io::Error)> {
    let count = keys.len() / key_size.max(1);
    if count == 0 {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: count as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    match sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
        Ok(_) => Ok(()),
        Err(e) => Err((attr.count as usize, e)),
    }
}
