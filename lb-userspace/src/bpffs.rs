//! The BPF filesystem under the pin dir: mounted once, race-free, and held by one agent.
//!
//! * Mounting at /sys/fs/bpf happens at most once per boot even when many processes start
//!   at once (parallel tests on a fresh machine stacked several bpffs there, hiding each
//!   other's pins): check, take a lock, check again, mount.
//! * One agent per pin dir: an agent takes an exclusive lock tied to the pin dir before it
//!   touches any map; a second one is refused with the holder's pid. bpffs holds no regular
//!   files, so the lock file lives under /run.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The standard mount point, the only one mounted on demand.
pub const BPF_FS_ROOT: &str = "/sys/fs/bpf";

/// Where lock files go: /run on any systemd or container host, else the temp dir.
fn lock_dir() -> PathBuf {
    let run = Path::new("/run");
    let base = if run.is_dir() { run.to_path_buf() } else { std::env::temp_dir() };
    base.join("lb")
}

pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: statfs into a zeroed struct with a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Mounts a bpffs at `at` unless one is there; concurrent callers (threads or processes)
/// mount it once. True when `at` is a bpffs afterwards.
pub fn ensure_mounted(at: &Path) -> bool {
    if is_bpffs(at) {
        return true;
    }
    let dir = lock_dir();
    let _ = std::fs::create_dir_all(&dir);
    let Ok(lock) = File::create(dir.join("bpffs-mount.lock")) else { return false };
    // SAFETY: flock on our own open file; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return false;
    }
    if is_bpffs(at) {
        return true; // mounted by whoever held the lock before us
    }
    let Ok(target) = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: plain mount(2) with valid C strings.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    rc == 0 && is_bpffs(at)
}

/// An agent's hold on its pin dir, released when dropped (or when the process ends).
#[derive(Debug)]
pub struct PinDirLock {
    _file: File,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "pin dir {pin_dir}: another lb agent (pid {pid}) holds it (lock {lock}); one agent per pin dir — \
         stop that one, or give this one its own --pin-dir"
    )]
    Held { pin_dir: PathBuf, pid: i32, lock: PathBuf },
    #[error("pin dir {pin_dir}: lock file {lock}: {source}")]
    Io { pin_dir: PathBuf, lock: PathBuf, source: std::io::Error },
}

/// The lock file of `pin_dir`. It stays after the agent ends (removing a lock file races
/// with the next taker); whoever removes the pin dir may remove it too.
pub fn lock_path(pin_dir: &Path) -> PathBuf {
    let abs = std::path::absolute(pin_dir).unwrap_or_else(|_| pin_dir.to_path_buf());
    let name: String =
        abs.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    lock_dir().join(format!("pin-dir{name}.lock"))
}

/// Takes the exclusive lock of `pin_dir` for this process (POSIX record lock, so a refused
/// caller learns the holder's pid).
pub fn lock_pin_dir(pin_dir: &Path) -> Result<PinDirLock, LockError> {
    let lock = lock_path(pin_dir);
    let io = |source| LockError::Io { pin_dir: pin_dir.to_path_buf(), lock: lock.clone(), source };
    std::fs::create_dir_all(lock_dir()).map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock)
        .map_err(io)?;
    let mut fl = whole_file_write_lock();
    // SAFETY: fcntl record locking on our own fd with a valid struct flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &fl) } == 0 {
        return Ok(PinDirLock { _file: file, path: lock });
    }
    let err = std::io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
        return Err(io(err));
    }
    // SAFETY: as above; F_GETLK fills in the holder.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut fl) };
    Err(LockError::Held { pin_dir: pin_dir.to_path_buf(), pid: fl.l_pid, lock })
}

/// A write lock over the whole file, for `F_SETLK` and `F_GETLK`.
fn whole_file_write_lock() -> libc::flock {
    libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// The pid of the agent holding `pin_dir`'s lock, if one does (from another process: POSIX
/// locks do not conflict with their own holder).
pub fn lock_holder(pin_dir: &Path) -> Option<i32> {
    let file = File::open(lock_path(pin_dir)).ok()?;
    let mut fl = whole_file_write_lock();
    // SAFETY: fcntl F_GETLK on our own fd with a valid struct flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut fl) } != 0 {
        return None;
    }
    (fl.l_type != libc::F_UNLCK as i16).then_some(fl.l_pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_dir_has_one_holder_and_the_refusal_names_it() {
        let dir = std::env::temp_dir().join(format!("lb-lock-test-{}", std::process::id()));
        let first = lock_pin_dir(&dir).unwrap();
        // POSIX locks are per process: a second holder must be another process.
        let me = std::env::current_exe().unwrap();
        let out = std::process::Command::new(me)
            .args(["--exact", "bpffs::tests::child_takes_the_lock", "--nocapture"])
            .env("LB_LOCK_TEST_DIR", &dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(text.contains(&format!("another lb agent (pid {})", std::process::id())), "{text}");
        assert!(text.contains(&format!("holder Some({})", std::process::id())), "{text}");
        drop(first);
        assert!(lock_pin_dir(&dir).is_ok(), "released on drop");
        let _ = std::fs::remove_file(lock_path(&dir));
    }

    /// Run by the test above in a child process.
    #[test]
    fn child_takes_the_lock() {
        let Some(dir) = std::env::var_os("LB_LOCK_TEST_DIR") else { return };
        println!("holder {:?}", lock_holder(Path::new(&dir)));
        match lock_pin_dir(Path::new(&dir)) {
            Ok(_) => println!("child got the lock"),
            Err(e) => println!("{e}"),
        }
    }

    /// Many threads at once on a fresh mount point: one bpffs mounted, not one per caller.
    #[test]
    fn concurrent_callers_mount_one_bpffs() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            if std::env::var("LB_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
                panic!("mount test needs root and LB_REQUIRE_PRIVILEGED=1");
            }
            eprintln!("SKIP: mount test needs root");
            return;
        }
        let at = std::env::temp_dir().join(format!("lb-bpffs-race-{}", std::process::id()));
        std::fs::create_dir_all(&at).unwrap();
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let at = at.clone();
                std::thread::spawn(move || ensure_mounted(&at))
            })
            .collect();
        let ok = threads.into_iter().all(|t| t.join().unwrap());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').nth(4) == Some(at.to_str().unwrap()))
            .count();
        let c = std::ffi::CString::new(at.to_str().unwrap()).unwrap();
        for _ in 0..mounts {
            // SAFETY: unmounting what this test mounted.
            unsafe { libc::umount(c.as_ptr()) };
        }
        let _ = std::fs::remove_dir(&at);
        assert!(ok, "every caller sees a bpffs");
        assert_eq!(mounts, 1, "one bpffs mounted, not one per caller");
    }
}
