//! BPF arrays (`BPF_F_MMAPABLE`) read and written through memory instead of syscalls.
//!
//! A Maglev table of 401 slots is one memory copy, a full sync of 100 000 services takes
//! milliseconds instead of 40 million syscalls, and a scan of the backend array is a memory
//! walk. Readers in the kernel see each value change atomically (values are at most 8 bytes
//! and aligned).
//!
//! The kernel inserts every page of a mapping when it is made (`remap_vmalloc_range`), and
//! those pages count in the agent's resident set: a Maglev array sized for 100 000 Services
//! (160 MB) mapped whole would add 1.7 KB per Service to it, the map's kernel memory counted
//! a second time. So the large arrays are mapped a window at a time (`WindowedArray`): at
//! most `WINDOW` bytes stay mapped between accesses, a run of writes in ascending order (a
//! full sync) moves the window forward, and an access wider than a window gets a mapping of
//! its own, dropped after it.

use std::{cell::RefCell, os::fd::AsFd as _, os::fd::AsRawFd as _};

use aya::maps::MapData;

use crate::dataplane::DataplaneError;

type Result<T> = std::result::Result<T, DataplaneError>;

const PAGE: usize = 4096;

/// Bytes a `WindowedArray` keeps mapped between accesses. One mapping of it costs tens of
/// microseconds (the kernel inserts its 256 pages), so a full sync of 160 MB of Maglev
/// tables remaps 160 times, and a one-table change once at most.
pub const WINDOW: usize = 1 << 20;

/// Where the values of an array lie: the kernel keeps each element `round_up(value_size,
/// 8)` bytes from the last.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    /// Values addressed (elements, or slots of elements).
    len: u32,
    /// Bytes from one addressed value to the next.
    stride: usize,
    /// The whole array, rounded up to pages.
    bytes: usize,
}

impl Geometry {
    fn of(map: &MapData, name: &'static str, slot: Option<usize>) -> Result<Self> {
        let info = map.info().map_err(|source| DataplaneError::Map { map: name, source })?;
        let element = (info.value_size() as usize).next_multiple_of(8);
        let stride = slot.unwrap_or(element);
        Ok(Geometry {
            len: (info.max_entries() as usize * element / stride) as u32,
            stride,
            bytes: (info.max_entries() as usize * element).next_multiple_of(PAGE),
        })
    }
}

/// One shared mapping of `bytes` bytes of a map from byte `start` (page-aligned).
struct Mapping {
    ptr: *mut u8,
    start: usize,
    bytes: usize,
}

impl Mapping {
    /// Covers nothing: for empty ranges, which read and write nothing.
    const EMPTY: Mapping = Mapping { ptr: std::ptr::null_mut(), start: 0, bytes: 0 };

    fn new(map: &MapData, name: &'static str, start: usize, bytes: usize) -> Result<Self> {
        debug_assert!(start.is_multiple_of(PAGE) && bytes > 0);
        // SAFETY: a shared mapping of a BPF array fd we hold, inside the array's pages (the
        // caller keeps `start + bytes` within `Geometry::bytes`).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                start as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DataplaneError::Mmap { map: name, source: std::io::Error::last_os_error() });
        }
        Ok(Mapping { ptr: ptr.cast(), start, bytes })
    }

    fn covers(&self, from: usize, to: usize) -> bool {
        self.start <= from && to <= self.start + self.bytes
    }

    /// The value of type `T` at array byte `at` (covered by this mapping).
    fn read<T: Copy>(&self, at: usize) -> T {
        debug_assert!(self.covers(at, at + size_of::<T>()));
        // SAFETY: inside the mapping; T is a plain value type.
        unsafe { self.ptr.add(at - self.start).cast::<T>().read_unaligned() }
    }

    fn write<T: Copy>(&self, at: usize, v: T) {
        debug_assert!(self.covers(at, at + size_of::<T>()));
        // SAFETY: as in `read`; the mapping is shared with the kernel, which is the point.
        unsafe { self.ptr.add(at - self.start).cast::<T>().write_unaligned(v) }
    }

    /// `values` copied to array byte `at` on (covered by this mapping).
    fn copy_from<T: Copy>(&self, at: usize, values: &[T]) {
        if values.is_empty() {
            return;
        }
        debug_assert!(self.covers(at, at + size_of_val(values)));
        // SAFETY: inside the mapping (the caller checked the range); T is a plain value type
        // and the kernel's memory never overlaps ours.
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr().cast::<u8>(),
                self.ptr.add(at - self.start),
                size_of_val(values),
            )
        }
    }
}

// SAFETY: a mapping is memory this process owns (shared with the kernel, which is the
// point); handing it to another thread moves no access the borrow rules do not govern.
unsafe impl Send for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.bytes > 0 {
            // SAFETY: unmapping exactly what `new` mapped.
            unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
        }
    }
}

fn out_of_range(name: &'static str, g: &Geometry, offset: u32, n: u32) -> Result<()> {
    let end = offset as u64 + n as u64;
    if end > g.len as u64 {
        return Err(DataplaneError::OutOfRange { map: name, index: end as u32, capacity: g.len });
    }
    Ok(())
}

/// A small array mapped whole for the agent's lifetime (the address pre-filter, 132 KB).
pub struct MmapArray {
    geometry: Geometry,
    mapping: Mapping,
    _map: MapData,
}

impl MmapArray {
    pub fn new(map: MapData, name: &'static str) -> Result<Self> {
        let geometry = Geometry::of(&map, name, None)?;
        let mapping = Mapping::new(&map, name, 0, geometry.bytes)?;
        Ok(MmapArray { geometry, mapping, _map: map })
    }

    /// Bytes mapped.
    pub fn bytes(&self) -> usize {
        self.mapping.bytes
    }

    /// Element `i`; the caller keeps `i` below the array's length (a fixed layout).
    pub fn read<T: Copy>(&self, i: u32) -> T {
        assert!(i < self.geometry.len && size_of::<T>() <= self.geometry.stride);
        self.mapping.read(i as usize * self.geometry.stride)
    }

    pub fn write<T: Copy>(&mut self, i: u32, v: T) {
        assert!(i < self.geometry.len && size_of::<T>() <= self.geometry.stride);
        self.mapping.write(i as usize * self.geometry.stride, v)
    }
}

/// A large array mapped a window at a time (see the module doc).
pub struct WindowedArray {
    geometry: Geometry,
    name: &'static str,
    window: RefCell<Option<Mapping>>,
    map: MapData,
}

impl WindowedArray {
    /// Addressed by element.
    pub fn new(map: MapData, name: &'static str) -> Result<Self> {
        Self::with_geometry(map, name, None)
    }

    /// Addressed by slot: each element holds several `slot`-byte values side by side (the
    /// Maglev array's two ids), so slot `i` is at byte `i * slot`.
    pub fn slots(map: MapData, name: &'static str, slot: usize) -> Result<Self> {
        Self::with_geometry(map, name, Some(slot))
    }

    fn with_geometry(map: MapData, name: &'static str, slot: Option<usize>) -> Result<Self> {
        let geometry = Geometry::of(&map, name, slot)?;
        Ok(WindowedArray { geometry, name, window: RefCell::new(None), map })
    }

    /// Values addressed.
    pub fn len(&self) -> u32 {
        self.geometry.len
    }

    pub fn is_empty(&self) -> bool {
        self.geometry.len == 0
    }

    /// Unmaps the window (until the next access).
    pub fn unmap(&mut self) {
        *self.window.get_mut() = None;
    }

    /// Bytes mapped now (between accesses at most `WINDOW`).
    pub fn mapped_bytes(&self) -> usize {
        self.window.borrow().as_ref().map_or(0, |m| m.bytes)
    }

    /// Runs `f` with a mapping that covers values `offset..offset + n`, and the byte where
    /// value `offset` starts: the current window, a new window from the range's first page,
    /// or, for a range wider than a window, a mapping of its own.
    fn with_range<R>(&self, offset: u32, n: u32, f: impl FnOnce(&Mapping, usize) -> R) -> Result<R> {
        out_of_range(self.name, &self.geometry, offset, n)?;
        if n == 0 {
            // Nothing to map (and at the array's end, nothing could be).
            return Ok(f(&Mapping::EMPTY, 0));
        }
        let from = offset as usize * self.geometry.stride;
        let to = from + n as usize * self.geometry.stride;
        let mut window = self.window.borrow_mut();
        if let Some(w) = window.as_ref().filter(|w| w.covers(from, to)) {
            return Ok(f(w, from));
        }
        let start = from / PAGE * PAGE;
        let end = to.next_multiple_of(PAGE);
        if end - start > WINDOW {
            let own = Mapping::new(&self.map, self.name, start, end - start)?;
            return Ok(f(&own, from));
        }
        // Drop the old window first: never two mapped at once.
        *window = None;
        let w = window.insert(Mapping::new(
            &self.map,
            self.name,
            start,
            (start + WINDOW).min(self.geometry.bytes) - start,
        )?);
        Ok(f(w, from))
    }

    pub fn read<T: Copy>(&self, i: u32) -> Result<T> {
        debug_assert!(size_of::<T>() <= self.geometry.stride);
        self.with_range(i, 1, |m, at| m.read(at))
    }

    pub fn write<T: Copy>(&mut self, i: u32, v: T) -> Result<()> {
        debug_assert!(size_of::<T>() <= self.geometry.stride);
        self.with_range(i, 1, |m, at| m.write(at, v))
    }

    /// Calls `f` with each index and value of `offset..offset + n`, in order.
    pub fn read_run<T: Copy>(&self, offset: u32, n: u32, mut f: impl FnMut(u32, T)) -> Result<()> {
        debug_assert!(size_of::<T>() <= self.geometry.stride);
        let stride = self.geometry.stride;
        self.with_range(offset, n, |m, at| {
            for k in 0..n {
                f(offset + k, m.read(at + k as usize * stride));
            }
        })
    }

    /// Writes `values` from `offset`, in one copy: for arrays addressed by values that lie
    /// side by side (the Maglev array's slots). (A plain copy may write a value in parts:
    /// fine for the Maglev array, whose tables are written to ranges no reader uses yet —
    /// `reconcile` never rewrites one in place.)
    pub fn write_slice<T: Copy>(&mut self, offset: u32, values: &[T]) -> Result<()> {
        assert_eq!(self.geometry.stride, size_of::<T>(), "{}: values not side by side", self.name);
        self.with_range(offset, values.len() as u32, |m, at| m.copy_from(at, values))
    }
}
