//! `cargo xtask lab up|down|status` and `cargo xtask demo`: build the agent, the pod server
//! and the lab tool, then run `lb-lab` (tests/src/bin/lb-lab.rs), which owns the topology.

use std::process::Command;

use clap::Subcommand;

use crate::run::{root, run as run_cmd};

#[derive(Subcommand, Clone, Copy)]
pub enum Action {
    /// Build the standard lab and leave it up (2 nodes, 3 backend pods, agents running).
    Up,
    /// Remove every lab: namespaces, the agents' bpffs mount, processes.
    Down,
    /// Show the labs that are up.
    Status,
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Builds `lb`, `lb-serve` and `lb-lab` (debug: they land side by side in target/debug).
pub fn build() -> anyhow::Result<()> {
    eprintln!("== building the agent and the lab tools");
    run_cmd(cargo().args(["build", "-p", "lb-userspace", "-p", "lb-tests", "--bins"]))
}

fn lab_tool(arg: &str) -> anyhow::Result<()> {
    run_cmd(Command::new(root().join("target/debug/lb-lab")).arg(arg).env("RUST_BACKTRACE", "0"))
}

pub fn run(action: Action) -> anyhow::Result<()> {
    match action {
        Action::Up => {
            build()?;
            lab_tool("up")
        }
        Action::Down => lab_tool("down"),
        Action::Status => lab_tool("status"),
    }
}

pub fn demo() -> anyhow::Result<()> {
    build()?;
    eprintln!("== demo");
    lab_tool("demo")
}
