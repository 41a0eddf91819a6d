//! Where Kubernetes objects come from: a folder of manifests (and, later, the API server).
//! Sources only collect objects; all semantics live in the Model.

pub mod manifests;
