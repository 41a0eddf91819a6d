//! Shared by the privileged tests (`tests/`) and the benchmark binary (`lb-bench`): the
//! privilege gate, a loaded datapath in a private pin dir, map programming through the
//! agent's `Dataplane`, and packet builders/inspectors with independent checksums.

pub mod api;
pub mod demo;
pub mod flood;
pub mod harness;
pub mod lab;
pub mod netns;
