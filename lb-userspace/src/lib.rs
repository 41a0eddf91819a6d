//! The `lb` agent and CLI as a library, so tests drive the same loader and `Dataplane` the
//! agent uses.

pub mod addr_filter;
pub mod agent;
pub mod attach;
pub mod bpffs;
pub mod caps;
pub mod conntrack_gc;
pub mod dataplane;
pub mod http;
pub mod links;
pub mod loader;
pub mod logging;
pub mod maglev;
pub mod memory;
pub mod model;
pub mod pins;
pub mod range_alloc;
pub mod rawmap;
pub mod reconcile;
pub mod refcount;
pub mod report;
pub mod retry;
pub mod routes;
pub mod source;
pub mod topology;
pub mod xdp_netlink;
