//! Keeps the last good copy of each manifest file in the state folder, on a thread of its
//! own, so that a restart while a file is broken still serves its objects.
//!
//! Why a thread, and why batched: creating a file costs far more than parsing one (about 40%
//! of the agent's time when files were copied from the sync loop at 1 000 changes a second),
//! and a batch written from the loop stalled syncs for hundreds of milliseconds. So copies
//! are written at most once per `SAVE_EVERY`, only the latest version of each file, off the
//! sync loop; the copies are at most that much behind, and up to date once the agent stops.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// How often the copies are brought up to date.
pub const SAVE_EVERY: Duration = Duration::from_secs(1);

/// The saving thread; dropping it writes what is still owed and waits for that.
#[derive(Debug)]
pub struct Saver {
    to: Option<mpsc::Sender<(PathBuf, Option<String>)>>,
    thread: Option<JoinHandle<()>>,
}

impl Saver {
    pub fn start() -> std::io::Result<Self> {
        let (to, from) = mpsc::channel();
        let thread = std::thread::Builder::new().name("manifest-saver".into()).spawn(move || run(from))?;
        Ok(Saver { to: Some(to), thread: Some(thread) })
    }

    /// `to` is to hold `text` (or to go, for `None`).
    pub fn put(&self, to: PathBuf, text: Option<String>) {
        if let Some(tx) = &self.to {
            let _ = tx.send((to, text));
        }
    }
}

impl Drop for Saver {
    fn drop(&mut self) {
        self.to = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(from: mpsc::Receiver<(PathBuf, Option<String>)>) {
    let mut owed: BTreeMap<PathBuf, Option<String>> = BTreeMap::new();
    let mut written = Instant::now().checked_sub(SAVE_EVERY).unwrap_or_else(Instant::now);
    loop {
        let due = written + SAVE_EVERY;
        let next = if owed.is_empty() {
            from.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        } else {
            from.recv_timeout(due.saturating_duration_since(Instant::now()))
        };
        match next {
            Ok((to, text)) => {
                owed.insert(to, text);
                if Instant::now() < due {
                    continue;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                write(std::mem::take(&mut owed));
                return;
            }
        }
        write(std::mem::take(&mut owed));
        written = Instant::now();
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
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "one", "held back until SAVE_EVERY");
        drop(saver);
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "v99");
        assert!(!b.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
