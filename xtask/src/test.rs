//! `cargo xtask test`: every tier, in order, each failing loudly.
//!
//! * lint — `cargo fmt --check`, `cargo clippy -D warnings` (the datapath too, for the BPF
//!   target); audit — `cargo deny` against the
//!   advisory snapshot in `deny/advisory-db`
//! * L1 — host unit tests (lb-common, lb-userspace) and the kube source against an API
//!   server stand-in: no root needed
//! * L2 — BPF_PROG_TEST_RUN fixtures (lb-tests), 100 000 fuzzed packets against a host oracle,
//!   and the `lb` CLI against real pinned maps:
//!   root; with `LB_REQUIRE_PRIVILEGED=1` a test that cannot run fails instead of skipping.
//! * L3 — the real `lb agent` on network-namespace labs with real clients (root, same rule),
//!   then the flow-table soak, flood, churn and resize tests (about seven minutes).

use std::process::Command;

use crate::run::{root, run as run_cmd};

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

pub fn run_lint() -> anyhow::Result<()> {
    eprintln!("== lint");
    run_cmd(cargo().args(["fmt", "--all", "--check"]))?;
    run_cmd(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The datapath, for the target it runs on (its own target dir: a check build of core
    // must not invalidate the real one aya-build makes).
    run_cmd(
        Command::new("rustup")
            .current_dir(root())
            .args([
                "run",
                crate::setup::EBPF_TOOLCHAIN,
                "cargo",
                "clippy",
                "-q",
                "-p",
                "lb-ebpf",
                "--lib",
                "--bins",
            ])
            .args([
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--target-dir",
                "target/clippy-bpf",
            ])
            .args(["--", "-D", "warnings"]),
    )
}

pub fn run() -> anyhow::Result<()> {
    run_lint()?;
    crate::audit::run(None)?;
    eprintln!("== L1 host unit tests");
    run_cmd(cargo().args(["test", "-p", "lb-common", "-p", "lb-userspace", "--lib", "--bins"]))?;
    // The Kubernetes source against the in-process API server stand-in, and the datapath's
    // header parser compiled for the host, the datapath object's shape (no root needed).
    run_cmd(cargo().args([
        "test",
        "-p",
        "lb-tests",
        "--test",
        "kube_source",
        "--test",
        "parser",
        "--test",
        "datapath_object",
    ]))?;
    eprintln!("== L2 BPF_PROG_TEST_RUN fixtures (root)");
    run_cmd(cargo().args([
        "test",
        "-p",
        "lb-tests",
        "--lib",
        "--bins",
        "--test",
        "prog_fixtures",
        "--test",
        "flow_life_cycle",
        "--test",
        "fuzz",
        "--test",
        "explain_agrees",
    ]))?;
    run_cmd(cargo().args(["test", "-p", "lb-userspace", "--test", "cli"]))?;
    // The lab runs the `lb` binary, which integration tests of lb-tests do not build.
    crate::lab::build()?;
    eprintln!("== L3 end-to-end on network-namespace labs (root)");
    run_cmd(cargo().args([
        "test",
        "-p",
        "lb-tests",
        "--test",
        "e2e",
        "--test",
        "host_clients",
        "--test",
        "dual_stack",
        "--",
        "--test-threads",
        "2",
    ]))?;
    // The flow table over time: a 200 000-connection soak, a SYN flood, five minutes of
    // endpoint churn, a resizing restart. One at a time: they measure what they load.
    run_cmd(cargo().args([
        "test",
        "-p",
        "lb-tests",
        "--test",
        "flows",
        "--",
        "--test-threads",
        "1",
        "--nocapture",
    ]))?;
    eprintln!("== all test tiers passed");
    Ok(())
}

/// `cargo xtask fuzz`: the fuzz test with `packets` packets, its figures printed.
pub fn fuzz(packets: u64, seed: Option<u64>) -> anyhow::Result<()> {
    let mut c = cargo();
    c.args(["test", "-p", "lb-tests", "--test", "fuzz", "--", "--nocapture"])
        .env("LB_FUZZ_PACKETS", packets.to_string());
    if let Some(seed) = seed {
        c.env("LB_FUZZ_SEED", seed.to_string());
    }
    run_cmd(&mut c)
}
