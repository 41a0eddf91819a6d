//! Where Kubernetes objects come from: a folder of manifests, or the API server.
//! Sources only collect objects; all semantics live in the Model.

pub mod endpoints;
pub mod kube;
pub mod manifests;
pub mod saver;
pub mod slim;
pub mod watch;

use std::time::Instant;

use crate::{
    logging,
    model::{Changes, Cluster},
};

/// What the sync loop needs of a source: what changed, and the objects as they are now.
pub trait ChangeSource {
    /// What changed since the last call, if anything (the first time: everything). Errors
    /// are logged and counted here; what they spoiled keeps its last good state.
    fn changed(&mut self) -> Option<Changes>;
    /// Runs `f` on the objects as they are now.
    fn with_cluster<R>(&self, f: impl FnOnce(&Cluster) -> R) -> R;
    /// The `endpoints.kubernetes.io/last-change-trigger-time` of the slices changed since
    /// the last call (kube-proxy's network programming latency).
    fn take_triggers(&self) -> Vec<jiff::Timestamp>;
    /// Objects or files rejected so far.
    fn errors(&self) -> u64;
}

/// The agent's source: a folder of manifests, or the API server.
pub enum Source {
    Folder { folder: Box<manifests::Folder>, errors: u64 },
    Kube(kube::KubeSource),
}

impl Source {
    pub fn folder(folder: manifests::Folder) -> Self {
        Source::Folder { folder: Box::new(folder), errors: 0 }
    }

    /// When a file read after its close has settled and should be looked at again.
    pub fn settle_deadline(&self) -> Option<Instant> {
        match self {
            Source::Folder { folder, .. } => folder.settle_deadline(),
            Source::Kube(_) => None,
        }
    }
}

impl ChangeSource for Source {
    fn changed(&mut self) -> Option<Changes> {
        match self {
            Source::Folder { folder, errors } => {
                match folder.refresh() {
                    Ok((_, bad)) => {
                        for e in &bad {
                            *errors += 1;
                            logging::line(&format!("error: {e}; keeping its last good content"));
                        }
                    }
                    Err(e) => logging::line(&format!("error: {e}")),
                }
                for w in folder.take_warnings() {
                    logging::line(&format!("warning: {w}"));
                }
                Some(folder.take_changes()).filter(|c| !c.is_empty())
            }
            Source::Kube(src) => src.take_changes(),
        }
    }

    fn with_cluster<R>(&self, f: impl FnOnce(&Cluster) -> R) -> R {
        match self {
            Source::Folder { folder, .. } => f(folder.cluster()),
            Source::Kube(src) => src.with_cluster(f),
        }
    }

    fn take_triggers(&self) -> Vec<jiff::Timestamp> {
        match self {
            Source::Folder { .. } => Vec::new(),
            Source::Kube(src) => src.take_triggers(),
        }
    }

    fn errors(&self) -> u64 {
        match self {
            Source::Folder { errors, .. } => *errors,
            Source::Kube(src) => src.errors(),
        }
    }
}
