//! `cargo xtask bench ...`: builds the measurement binary in release mode and runs it.
//! Results (markdown + JSON) land in target/bench/.

use std::process::Command;

use clap::Subcommand;

use crate::run::{root, run as run_cmd};

#[derive(Subcommand, Clone)]
pub enum Which {
    /// BPF_PROG_TEST_RUN cost per packet of lb_xdp (hit / new flow / miss) for 1 to 100 000
    /// services, beside an empty XDP program timed the same way.
    Prog {
        /// 20 000 calls per cell instead of 100 000.
        #[arg(long)]
        quick: bool,
        /// Service counts to sweep, comma-separated (default 1,1000,10000,100000).
        #[arg(long)]
        services: Option<String>,
    },
}

pub fn run(which: Which) -> anyhow::Result<()> {
    let out = root().join("target/bench");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root()).args(["run", "--release", "-q", "-p", "lb-tests", "--bin", "lb-bench", "--"]);
    match which {
        Which::Prog { quick, services } => {
            cmd.arg("prog").arg("--out").arg(&out);
            if quick {
                cmd.arg("--quick");
            }
            if let Some(s) = services {
                cmd.arg("--services").arg(s);
            }
        }
    }
    run_cmd(&mut cmd)
}
