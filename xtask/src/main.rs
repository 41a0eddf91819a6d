//! Project tasks: `cargo xtask setup | test | audit | bench | lab | demo`.
//!
//! xtask deliberately depends on nothing of the project itself: on a fresh machine it must
//! build (and install bpf-linker) before the eBPF crate can be compiled.

mod audit;
mod bench;
mod lab;
mod run;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Set-up, tests and benchmarks of the eBPF service load balancer")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: Debian packages (LLVM 22, lab tools), rust-src for the
    /// nightly eBPF toolchain, bpf-linker built against LLVM 22. Idempotent and fast.
    Setup,
    /// Run every test tier: lint, L1 host unit tests, L2 BPF_PROG_TEST_RUN fixtures (root),
    /// L3 end-to-end tests on network-namespace labs with the real agent (root).
    /// With LB_REQUIRE_PRIVILEGED=1 a privileged test that cannot run is a failure.
    Test,
    /// Dependency audit: cargo-deny's advisories (against the RustSec snapshot kept in
    /// deny/advisory-db), licenses, bans and sources. Part of `test`.
    Audit {
        /// Refresh deny/advisory-db from a clone of the RustSec advisory database at this
        /// path (on a machine that reaches it), instead of auditing.
        #[arg(long, value_name = "CLONE")]
        refresh: Option<std::path::PathBuf>,
    },
    /// Fuzzing: random and mangled packets through both real programs (BPF_PROG_TEST_RUN)
    /// against the host oracle of tests/tests/fuzz.rs; prints packets per second and the
    /// cases met. `test` runs a short version (100 000 packets). Root.
    Fuzz {
        #[arg(long, default_value_t = 1_000_000)]
        packets: u64,
        /// The generator's seed (a failure names the one it ran with).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// The walkthrough on a network-namespace lab: a 3-replica Service reached through its
    /// ClusterIP from a pod and its NodePort from outside, a pod removed, no endpoints.
    /// Installs what is missing and builds first; removes the lab at the end. Root.
    Demo,
    /// The network-namespace lab by hand (root).
    Lab {
        #[command(subcommand)]
        action: lab::Action,
    },
    /// Benchmarks; results go to target/bench/.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Fuzz { packets, seed } => {
            setup::run()?;
            test::fuzz(packets, seed)
        }
        Cmd::Audit { refresh } => {
            setup::run()?;
            audit::run(refresh)
        }
        Cmd::Test => {
            setup::run()?;
            test::run()
        }
        Cmd::Demo => {
            setup::run()?;
            lab::demo()
        }
        Cmd::Lab { action } => {
            if matches!(action, lab::Action::Up) {
                setup::run()?;
            }
            lab::run(action)
        }
        Cmd::Bench { which } => {
            setup::run()?;
            bench::run(which)
        }
    }
}
