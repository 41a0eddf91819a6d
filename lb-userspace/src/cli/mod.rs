//! The `lb` command line: the agent's flags and the read-only inspection commands.

pub mod agent;
pub mod inspect;
pub mod kube_proxy_config;
pub mod monitor;
pub mod status;
