//! Where Kubernetes objects come from: a folder of manifests, or the API server.
//! Sources only collect objects; all semantics live in the Model.

pub mod endpoints;
pub mod kube;
pub mod manifests;
pub mod watch;
