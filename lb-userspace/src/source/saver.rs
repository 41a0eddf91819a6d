//! Keeps the last good copy of each manifest file in the state folder, off the sync loop, so
//! that a restart while a file is broken still serves its objects.
//!
//! Why batched, and why two threads: creating a file costs far more than parsing one (about
//! 40% of the agent's time when files were copied from the sync loop at 1 000 changes a
//! second), and a batch written from the loop stalled syncs for hundreds of milliseconds. So
//! copies are written at most once per `SAVE_EVERY`, only the latest version of each file,
//! at idle priority; the copies are at most that much behind (more while the CPU is busy),
//! and up to date once the agent stops.
//!
//! The sync loop shares a lock with the collecting thread only, which runs at normal
//! priority and holds it for a map insert or a `take`. The idle-priority writer never touches
//! that lock: it is handed one batch at a time. (With the one thread at idle priority doing
//! both, it was preempted while holding the lock whenever the CPU was busy, and the sync
//! loop's next change waited for it: tens of milliseconds under a stream of changes.)

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Condvar, Mutex, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// How often the copies are brought up to date.
pub const SAVE_EVERY: Duration = Duration::from_secs(1);

/// The size of the texts of a batch after which the writer gives the memory back.
const LARGE_BATCH: usize = 1 << 20;

/// The collecting thread; dropping it writes what is still owed and waits for that.
#[derive(Debug)]
pub struct Saver {
    owed: Arc<(Mutex<Owed>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

/// The copies not written yet: the latest text of each file (`None`: to be removed). Kept by
/// file, not queued by change, so it stays as small as the folder however far the writer
/// falls behind (the writer holds at most one batch besides).
#[derive(Debug, Default)]
struct Owed {
    files: BTreeMap<PathBuf, Option<String>>,
    stopping: bool,
}

type Batch = BTreeMap<PathBuf, Option<String>>;

impl Saver {
    pub fn start() -> std::io::Result<Self> {
        let (to_writer, batches) = mpsc::sync_channel::<Batch>(0);
        let writer = std::thread::Builder::new().name("manifest-writer".into()).spawn(move || {
            lower_priority();
            for batch in batches {
                let bytes: usize = batch.values().flatten().map(String::len).sum();
                write(batch);
                // The texts of a whole folder (a first sync's) are freed here, after the
                // sync gave its own garbage back: given back too.
                if bytes >= LARGE_BATCH {
                    crate::memory::return_freed();
                }
            }
        })?;
        let owed: Arc<(Mutex<Owed>, Condvar)> = Arc::default();
        let theirs = owed.clone();
        let thread = std::thread::Builder::new()
            .name("manifest-saver".into())
            .spawn(move || collect(&theirs, to_writer, writer))?;
        Ok(Saver { owed, thread: Some(thread) })
    }

    /// `to` is to hold `text` (or to go, for `None`).
    pub fn put(&self, to: PathBuf, text: Option<String>) {
        let (owed, wake) = &*self.owed;
        let mut o = lock(owed);
        let first = o.files.is_empty();
        o.files.insert(to, text);
        drop(o);
        // Later ones are picked up when the batch is due.
        if first {
            wake.notify_one();
        }
    }
}

impl Drop for Saver {
    fn drop(&mut self) {
        let (owed, wake) = &*self.owed;
        lock(owed).stopping = true;
        wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock(owed: &Mutex<Owed>) -> std::sync::MutexGuard<'_, Owed> {
    owed.lock().unwrap_or_else(|e| e.into_inner())
}

/// Background work: the copies may lag, the sync loop must not. Under a stream of changes a
/// second's copies take a good part of a core, which would otherwise delay syncs by tens of
/// milliseconds. (Failing to lower it only costs that.)
fn lower_priority() {
    let idle = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is this thread; a valid parameter struct.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) };
}

/// Gathers the owed copies and hands them to the writer once per `SAVE_EVERY` (at once when
/// nothing was written for that long), and all that is left when the agent stops.
fn collect(shared: &(Mutex<Owed>, Condvar), to_writer: mpsc::SyncSender<Batch>, writer: JoinHandle<()>) {
    let (owed, wake) = shared;
    let mut written = Instant::now().checked_sub(SAVE_EVERY).unwrap_or_else(Instant::now);
    loop {
        let mut o = lock(owed);
        // Something owed and due (or the agent stopping), or wait.
        loop {
            let due = written + SAVE_EVERY;
            if o.stopping || (!o.files.is_empty() && Instant::now() >= due) {
                break;
            }
            o = if o.files.is_empty() {
                wake.wait(o).unwrap_or_else(|e| e.into_inner())
            } else {
                wake.wait_timeout(o, due.saturating_duration_since(Instant::now()))
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            };
        }
        let (files, stopping) = (std::mem::take(&mut o.files), o.stopping);
        drop(o);
        // Waits, without the lock, until the writer has finished the previous batch: the
        // owed map keeps collecting meanwhile.
        if !files.is_empty() && to_writer.send(files).is_err() {
            return;
        }
        written = Instant::now();
        if stopping && lock(owed).files.is_empty() {
            drop(to_writer);
            let _ = writer.join();
            return;
        }
    }
}

fn write(owed: BTreeMap<PathBuf, Option<String>>) {
    for (to, text) in owed {
        let Some(text) = text else {
            let _ = std::fs::remove_file(&to);
            continue;
        };
        if std::fs::read_to_string(&to).is_ok_and(|old| old == text) {
            continue;
        }
        // Written aside, then renamed: never half there.
        let tmp = to.with_extension("tmp-saving");
        if std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &to)).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first copy is written at once; those that follow within `SAVE_EVERY` wait and only
    /// the last version of a file is written; dropping the saver writes what is owed.
    #[test]
    fn copies_are_batched_and_the_latest_is_written_by_the_drop() {
        let dir = std::env::temp_dir().join(format!("lb-saver-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.yaml"), dir.join("b.yaml"));
        let saver = Saver::start().unwrap();
        saver.put(a.clone(), Some("one".into()));
        let t0 = Instant::now();
        while std::fs::read_to_string(&a).ok().as_deref() != Some("one") {
            assert!(t0.elapsed() < Duration::from_secs(2), "the first copy is written at once");
            std::thread::sleep(Duration::from_millis(5));
        }
        for i in 0..100 {
            saver.put(a.clone(), Some(format!("v{i}")));
        }
        saver.put(b.clone(), Some("b".into()));
        saver.put(b.clone(), None);
        assert!(lock(&saver.owed.0).files.len() <= 2, "one entry per file, however many versions");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "one", "held back until SAVE_EVERY");
        drop(saver);
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "v99");
        assert!(!b.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
