//! `cargo xtask setup`: everything a fresh machine needs, installed by the project itself.
//! Each step checks first and does nothing when the thing is there, so a warm run takes
//! well under a second.

use std::{process::Command, time::Instant};

use anyhow::{Context as _, bail};

use crate::run::{output, run as run_cmd};

/// Debian packages: LLVM 22 for bpf-linker, and the lab's tools.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libclang-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
    "iputils-ping",
    "ethtool",
    "iptables",
    "nftables",
    "iperf3",
    "curl",
    "ncat",
    "procps",
    "tcpdump",
    "netsniff-ng",
    "hping3",
    "wrk",
    // The benchmark charts' font.
    "fonts-dejavu-core",
];

pub const EBPF_TOOLCHAIN: &str = "nightly";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

pub fn run() -> anyhow::Result<()> {
    let t = Instant::now();
    apt_packages()?;
    rust_src()?;
    bpf_linker()?;
    cargo_deny()?;
    eprintln!("setup: everything present ({} ms)", t.elapsed().as_millis());
    Ok(())
}

fn missing_packages() -> Vec<&'static str> {
    // dpkg-query exits non-zero when some package is unknown, but still lists the others:
    // read its output whatever the status.
    let text = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Status}\\n"])
        .args(PACKAGES)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let installed = |p: &str| {
        text.lines().any(|l| {
            l.split_once(' ').is_some_and(|(n, s)| n.split(':').next() == Some(p) && s == "installed")
        })
    };
    PACKAGES.iter().copied().filter(|p| !installed(p)).collect()
}

fn apt_packages() -> anyhow::Result<()> {
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    run_cmd(Command::new("apt-get").arg("update").arg("-q"))?;
    run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )?;
    let still = missing_packages();
    if !still.is_empty() {
        bail!("packages still missing after apt-get install: {}", still.join(" "));
    }
    Ok(())
}

/// The eBPF toolchain's components: rust-src (eBPF builds core from source) and clippy
/// (the lint tier checks the datapath for the BPF target too).
const EBPF_COMPONENTS: [&str; 2] = ["rust-src", "clippy"];

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        EBPF_TOOLCHAIN,
    ]));
    match installed {
        Some(list) => {
            for c in EBPF_COMPONENTS.iter().filter(|c| !list.lines().any(|l| l.starts_with(*c))) {
                eprintln!("setup: adding {c} to the {EBPF_TOOLCHAIN} toolchain");
                run_cmd(Command::new("rustup").args(["component", "add", c, "--toolchain", EBPF_TOOLCHAIN]))?;
            }
            Ok(())
        }
        None => {
            eprintln!(
                "setup: installing the {EBPF_TOOLCHAIN} toolchain with {} for the eBPF target",
                EBPF_COMPONENTS.join(" and ")
            );
            let mut cmd = Command::new("rustup");
            cmd.args(["toolchain", "install", EBPF_TOOLCHAIN, "--profile", "minimal"]);
            for c in EBPF_COMPONENTS {
                cmd.args(["--component", c]);
            }
            run_cmd(&mut cmd)
        }
    }
}

/// cargo-deny for `cargo xtask audit` (its database folder name is tied to the version).
fn cargo_deny() -> anyhow::Result<()> {
    if output(Command::new("cargo").args(["deny", "--version"])).is_some_and(|v| v.contains("0.20.2")) {
        return Ok(());
    }
    eprintln!("setup: building cargo-deny (two minutes, once per machine)");
    run_cmd(Command::new("cargo").args(["install", "cargo-deny", "--version", "0.20.2", "--locked"]))
        .context("installing cargo-deny")
}

fn bpf_linker() -> anyhow::Result<()> {
    if output(Command::new("bpf-linker").arg("--version")).is_some() {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker against LLVM 22 (a few minutes, once per machine)");
    let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
    run_cmd(Command::new("cargo").env("PATH", path).args([
        "install",
        "bpf-linker",
        "--version",
        "0.13.0",
        "--locked",
        "--no-default-features",
        "--features",
        "llvm-22",
    ]))
    .context("installing bpf-linker")?;
    Ok(())
}
