//! Watching the manifest folder with inotify: wake the sync loop on any change, and know for
//! each file whether its writer has closed it since it last changed, so that a file rewritten
//! in place (`cat x > f`, or written in chunks) is never applied half-written.
//!
//! Why this is exact, with no timestamps: the kernel queues a write's event before the write
//! returns, in order. The reader thread raises `reading` before it takes events off the
//! queue, and lowers it only once they are applied to `state`. So a reader of a file that,
//! holding `state`'s lock, finds the file's close still current, nothing queued, and then no
//! events in hand, knows nothing has touched the file between its close and that moment.
//!
//! The reader thread reads without the lock and holds it only to apply what it read: the
//! sync loop takes that lock for every changed file, and a reader preempted in the middle of
//! a long read loop under it stalled the loop for milliseconds on a busy node.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::{OsStr, OsString},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    os::unix::ffi::OsStrExt as _,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::SeqCst},
    },
};

/// An inotify watch on one folder, with its reader thread.
pub struct Watch {
    fd: OwnedFd,
    state: Mutex<Closes>,
    /// Events taken off the queue and not yet applied to `state`.
    reading: AtomicBool,
}

/// Which files are closed since their last change: name → the close's number, and whether
/// that "close" was a rename into place. A file that changed since its close has no entry.
/// Also the names touched since the folder last took them (so a refresh need not stat every
/// file), unless events were lost.
#[derive(Default)]
struct Closes {
    last: u64,
    by_name: BTreeMap<OsString, (u64, bool)>,
    touched: BTreeSet<OsString>,
    overflowed: bool,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("fd", &self.fd).finish_non_exhaustive()
    }
}

impl Watch {
    /// Watches `dir` for the life of the process, calling `on_change` after each batch of
    /// events (something created, written, closed, moved or deleted).
    pub fn start(dir: &Path, on_change: impl Fn() + Send + 'static) -> std::io::Result<Arc<Watch>> {
        // SAFETY: inotify syscalls; the fd is owned by `OwnedFd` from here on.
        let fd = unsafe {
            let fd = libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            OwnedFd::from_raw_fd(fd)
        };
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_DELETE
            | libc::IN_CREATE
            | libc::IN_MODIFY
            | libc::IN_ATTRIB;
        // SAFETY: valid fd and C string.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let watch = Arc::new(Watch { fd, state: Mutex::default(), reading: AtomicBool::new(false) });
        let reader = watch.clone();
        std::thread::Builder::new().name("inotify-manifests".into()).spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            while reader.wait_readable() {
                if reader.consume(&mut buf).is_err() {
                    return;
                }
                on_change();
            }
        })?;
        Ok(watch)
    }

    /// The number of `name`'s last close, if it is closed since it last changed.
    pub fn closed(&self, name: &OsStr) -> Option<u64> {
        self.lock().by_name.get(name).map(|(close, _)| *close)
    }

    /// Whether close number `close` of `name` was a rename into place: the file was whole
    /// before it had this name, so it need not settle.
    pub fn moved_in(&self, name: &OsStr, close: u64) -> bool {
        self.lock().by_name.get(name) == Some(&(close, true))
    }

    /// The names touched since the last call; `None` when events were lost: then the whole
    /// folder must be read.
    pub fn take_touched(&self) -> Option<BTreeSet<OsString>> {
        let mut state = self.lock();
        let touched = std::mem::take(&mut state.touched);
        (!std::mem::replace(&mut state.overflowed, false)).then_some(touched)
    }

    /// Whether `name` is still as it was at close number `close`: that close is still its
    /// last event, no event waits unread, and none is in the reader's hands.
    pub fn still_closed(&self, name: &OsStr, close: u64) -> bool {
        let state = self.lock();
        // A failed poll counts as "something waits": the safe answer. `reading` is looked at
        // after the poll: an event taken off the queue before the poll is in hand by then.
        state.by_name.get(name).map(|(c, _)| *c) == Some(close)
            && matches!(self.poll(0), Ok(false))
            && !self.reading.load(SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Closes> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks until events wait; false if the fd failed.
    fn wait_readable(&self) -> bool {
        loop {
            match self.poll(-1) {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// Whether an event waits, within `timeout_ms` (-1: forever).
    fn poll(&self, timeout_ms: i32) -> std::io::Result<bool> {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut pfd, 1, timeout_ms) } {
            n if n < 0 => Err(std::io::Error::last_os_error()),
            n => Ok(n > 0),
        }
    }

    /// Reads and applies every waiting event; the lock is held only to apply each read's.
    fn consume(&self, buf: &mut [u8]) -> std::io::Result<()> {
        loop {
            self.reading.store(true, SeqCst);
            let read = self.read_and_apply(buf);
            self.reading.store(false, SeqCst);
            match read {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// One read of the queue, applied; false when it was empty.
    fn read_and_apply(&self, buf: &mut [u8]) -> std::io::Result<bool> {
        const HEADER: usize = size_of::<libc::inotify_event>();
        // SAFETY: reading into our own buffer.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::WouldBlock { Ok(false) } else { Err(e) };
        }
        let n = n as usize;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut state = self.lock();
        let mut off = 0;
        while off + HEADER <= n {
            // SAFETY: the kernel wrote a whole event header at `off`.
            let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
            let name = &buf[off + HEADER..(off + HEADER + ev.len as usize).min(n)];
            let name = OsStr::from_bytes(name.split(|b| *b == 0).next().unwrap_or(&[]));
            state.apply(ev.mask, name);
            off += HEADER + ev.len as usize;
        }
        Ok(true)
    }
}

impl Closes {
    fn apply(&mut self, mask: u32, name: &OsStr) {
        if mask & libc::IN_Q_OVERFLOW != 0 {
            // Events were lost: no close can be trusted, and any file may have changed.
            self.by_name.clear();
            self.touched.clear();
            self.overflowed = true;
            return;
        }
        self.touched.insert(name.to_os_string());
        if mask & (libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO) != 0 {
            self.last += 1;
            self.by_name.insert(name.to_os_string(), (self.last, mask & libc::IN_MOVED_TO != 0));
        } else {
            self.by_name.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn wait_until(mut f: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < Duration::from_secs(5), "the watcher saw nothing in 5 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A close is trusted only with nothing queued and nothing in the reader's hands: events
    /// taken off the queue but not applied yet (the reader holds no lock while it reads) make
    /// `still_closed` say no, as a queued event does.
    #[test]
    fn a_close_is_not_trusted_while_events_are_in_hand() {
        let dir = std::env::temp_dir().join(format!("lb-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let watch = Watch::start(&dir, || {}).unwrap();
        std::fs::write(dir.join("a.yaml"), "x").unwrap();
        let name = OsStr::new("a.yaml");
        wait_until(|| watch.closed(name).is_some());
        let close = watch.closed(name).unwrap();
        wait_until(|| watch.still_closed(name, close));
        watch.reading.store(true, SeqCst);
        assert!(!watch.still_closed(name, close), "events in hand");
        watch.reading.store(false, SeqCst);
        assert!(watch.still_closed(name, close));
        std::fs::write(dir.join("a.yaml"), "y").unwrap();
        wait_until(|| watch.closed(name).is_some_and(|c| c > close));
        assert!(!watch.still_closed(name, close), "written again since that close");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
