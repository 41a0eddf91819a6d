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
        /// A git revision whose datapath object is built and timed side by side (the
        /// previous `main`, say): every path is reported as a ratio against it.
        #[arg(long, value_name = "REV")]
        baseline: Option<String>,
    },
    /// The flow table: a GC pass at 100k, 1M and the maximum entries; new connections per
    /// second through source NAT vs without; new connections under a SYN flood.
    Conntrack {
        /// Shorter runs (10 s connection-rate windows instead of 60 s).
        #[arg(long)]
        quick: bool,
    },
    /// Control plane: full sync of N services × 4 endpoints and one endpoint change, ours vs
    /// iptables-restore vs nft -f of kube-proxy-shaped rules; Maglev disruption.
    Control {
        /// 1k, 10k, 30k services (else also 100k), ours timed 3 times a row (else 5; the
        /// median is reported) and a 2-minute cap per baseline step.
        #[arg(long)]
        quick: bool,
        /// Service counts to sweep, comma-separated.
        #[arg(long)]
        services: Option<String>,
        /// Run nft -f up to this many services (default 10000; it takes minutes beyond).
        #[arg(long)]
        nft_max: Option<u32>,
        /// Run iptables-restore up to this many services (default: all; 0 times ours
        /// alone, e.g. under a profiler).
        #[arg(long)]
        iptables_max: Option<u32>,
    },
    /// Established flows through a forwarding node: delivered packets/s and CPU ns per
    /// packet, ours vs iptables vs nftables vs plain forwarding (trafgen), and the native
    /// XDP path vs the XDP redirect floor (the live-frames generator).
    Throughput {
        /// 2-second windows instead of 5.
        #[arg(long)]
        quick: bool,
    },
    /// Every packet a new flow, 1 to 30 000 services: packets/s per variant (VIP first and
    /// last in the iptables chain) and each variant's slope.
    Newflows {
        /// 2-second windows instead of 5, 2-minute cap per ruleset load.
        #[arg(long)]
        quick: bool,
        /// Service counts to sweep, comma-separated (default 1,1000,10000,30000).
        #[arg(long)]
        services: Option<String>,
        /// Run nftables up to this many services (default 10000; nft -f is slow beyond).
        #[arg(long)]
        nft_max: Option<u32>,
    },
    /// First-packet (SYN → SYN/ACK) p50/p99 vs number of services through a forwarding
    /// namespace, ours vs iptables vs nftables vs plain forwarding; and connection setup and
    /// request/response from a lab pod via the VIP and direct. Builds the lab binaries first.
    Latency {
        /// 5 000 connections per cell instead of 20 000 (2 000 in the lab).
        #[arg(long)]
        quick: bool,
        /// Service counts of the first-packet sweep, comma-separated (default 1,1000,10000,30000).
        #[arg(long)]
        services: Option<String>,
        /// Load nftables up to this many services (default 10000).
        #[arg(long)]
        nft_max: Option<u32>,
    },
    /// The real agent's resident memory and its maps' kernel memory at 1k, 10k, 30k (and
    /// 100k) Services, per Service, beside Cilium's Maglev cost.
    Memory {
        #[arg(long)]
        quick: bool,
        /// Service counts to sweep, comma-separated.
        #[arg(long)]
        services: Option<String>,
    },
    /// A stream of EndpointSlice updates at 100, 1 000 and 5 000 per second (30 s each) over
    /// 30k and 100k Services: programming latency p50/p99 and CPU, the real agent on the
    /// API stand-in and on manifest files vs kube-proxy-shaped iptables-restore and nft -f
    /// syncs. Builds the lab
    /// binaries first.
    Churn {
        /// 10-second windows instead of 30.
        #[arg(long)]
        quick: bool,
        /// Service counts, comma-separated (default 30000,100000).
        #[arg(long)]
        services: Option<String>,
        /// Run nftables up to this many services (default 10000).
        #[arg(long)]
        nft_max: Option<u32>,
        /// Only these variants, comma-separated: kube, manifests, iptables, nftables.
        #[arg(long)]
        only: Option<String>,
    },
    /// Pod → ClusterIP → pod in the lab (backend local and remote): iperf3 stream, request/
    /// response and CPU per byte and per request — ours with TC host routing and without,
    /// kube-proxy-shaped iptables and nftables, and direct pod to pod. Builds the lab
    /// binaries first.
    Podpath {
        /// 2-second runs, once each, instead of 5-second runs, best of three.
        #[arg(long)]
        quick: bool,
    },
    /// New TCP connections per second from a lab pod, via the VIP and direct.
    Connrate {
        #[arg(long)]
        quick: bool,
    },
    /// Every benchmark above, in order (`--quick`: the smaller sweeps, well under ten minutes).
    All {
        #[arg(long)]
        quick: bool,
        /// Passed to `prog --baseline`.
        #[arg(long, value_name = "REV")]
        baseline: Option<String>,
    },
}

fn bench_bin() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root()).args(["run", "--release", "-q", "-p", "lb-tests", "--bin", "lb-bench", "--"]);
    cmd
}

/// `lb-bench NAME --out DIR [--quick] [--services S] [--nft-max N]`.
fn bench(name: &str, quick: bool, services: Option<String>, nft_max: Option<u32>) -> anyhow::Result<()> {
    run_cmd(&mut bench_cmd(name, quick, services, nft_max))
}

/// The `lb-bench NAME` command line, to run or to add to.
fn bench_cmd(name: &str, quick: bool, services: Option<String>, nft_max: Option<u32>) -> Command {
    let mut cmd = bench_bin();
    cmd.arg(name).arg("--out").arg(root().join("target/bench"));
    if quick {
        cmd.arg("--quick");
    }
    if let Some(s) = services {
        cmd.arg("--services").arg(s);
    }
    if let Some(n) = nft_max {
        cmd.arg("--nft-max").arg(n.to_string());
    }
    cmd
}

/// The lab runs `lb` and `lb-serve` from the same target directory as lb-bench.
fn build_lab_binaries() -> anyhow::Result<()> {
    run_cmd(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).current_dir(root()).args([
            "build",
            "--release",
            "-p",
            "lb-userspace",
            "-p",
            "lb-tests",
            "--bins",
        ]),
    )
}

/// Builds the datapath object (`lb`, the eBPF ELF) of git revision `rev` in a worktree under
/// target/, the way aya-build builds ours; returns its path.
fn baseline_object(rev: &str) -> anyhow::Result<std::path::PathBuf> {
    let commit =
        crate::run::output(Command::new("git").current_dir(root()).args(["rev-parse", "--short", rev]))
            .ok_or_else(|| anyhow::anyhow!("--baseline {rev}: not a git revision here"))?;
    let tree = root().join("target/baseline").join(&commit);
    let object = tree.join("target/bpfel-unknown-none/release/lb");
    if object.exists() {
        eprintln!("bench: baseline {rev} ({commit}) already built: {}", object.display());
        return Ok(object);
    }
    if !tree.exists() {
        run_cmd(
            Command::new("git")
                .current_dir(root())
                .args(["worktree", "add", "--detach"])
                .arg(&tree)
                .arg(&commit),
        )?;
    }
    eprintln!("bench: building the datapath object of {rev} ({commit}) ...");
    run_cmd(
        Command::new("rustup")
            .current_dir(&tree)
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                "--cfg=bpf_target_arch=\"x86_64\"\u{1f}-Cdebuginfo=2\u{1f}-Clink-arg=--btf",
            )
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .args(["run", "nightly", "cargo", "build", "--package", "lb-ebpf", "--bins", "--release"])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"]),
    )?;
    Ok(object)
}

pub fn run(which: Which) -> anyhow::Result<()> {
    match which {
        Which::Prog { quick, services, baseline } => {
            let mut cmd = bench_cmd("prog", quick, services, None);
            if let Some(rev) = baseline {
                cmd.arg("--baseline-object").arg(baseline_object(&rev)?).arg("--baseline-name").arg(rev);
            }
            run_cmd(&mut cmd)
        }
        Which::Conntrack { quick } => {
            build_lab_binaries()?;
            bench("conntrack", quick, None, None)
        }
        Which::Throughput { quick } => bench("throughput", quick, None, None),
        Which::Newflows { quick, services, nft_max } => bench("newflows", quick, services, nft_max),
        Which::Control { quick, services, nft_max, iptables_max } => {
            let mut cmd = bench_cmd("control", quick, services, nft_max);
            if let Some(n) = iptables_max {
                cmd.arg("--iptables-max").arg(n.to_string());
            }
            run_cmd(&mut cmd)
        }
        Which::Latency { quick, services, nft_max } => {
            build_lab_binaries()?;
            bench("latency", quick, services, nft_max)
        }
        Which::Connrate { quick } => {
            build_lab_binaries()?;
            bench("connrate", quick, None, None)
        }
        Which::Churn { quick, services, nft_max, only } => {
            build_lab_binaries()?;
            let mut cmd = bench_cmd("churn", quick, services, nft_max);
            if let Some(o) = only {
                cmd.arg("--only").arg(o);
            }
            run_cmd(&mut cmd)
        }
        Which::Podpath { quick } => {
            build_lab_binaries()?;
            bench("podpath", quick, None, None)
        }
        Which::Memory { quick, services } => {
            build_lab_binaries()?;
            bench("memory", quick, services, None)
        }
        Which::All { quick, baseline } => {
            run(Which::Prog { quick, services: None, baseline })?;
            run(Which::Conntrack { quick })?;
            run(Which::Throughput { quick })?;
            run(Which::Newflows { quick, services: None, nft_max: None })?;
            run(Which::Control { quick, services: None, nft_max: None, iptables_max: None })?;
            run(Which::Latency { quick, services: None, nft_max: None })?;
            run(Which::Connrate { quick })?;
            run(Which::Podpath { quick })?;
            run(Which::Churn { quick, services: None, nft_max: None, only: None })?;
            run(Which::Memory { quick, services: None })?;
            eprintln!("bench all: results in {}", root().join("target/bench").display());
            Ok(())
        }
    }
}
