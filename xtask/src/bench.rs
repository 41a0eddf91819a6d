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
    /// Control plane: full sync of N services × 4 endpoints and one endpoint change, ours vs
    /// iptables-restore vs nft -f of kube-proxy-shaped rules; Maglev disruption.
    Control {
        /// 1k, 10k, 30k services (else also 100k) and a 2-minute cap per baseline step.
        #[arg(long)]
        quick: bool,
        /// Service counts to sweep, comma-separated.
        #[arg(long)]
        services: Option<String>,
        /// Run nft -f up to this many services (default 10000; it takes minutes beyond).
        #[arg(long)]
        nft_max: Option<u32>,
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
    /// Connection setup and request/response p50/p99 from a lab pod, via the VIP (1 and
    /// 10 000 services) and direct to the pod. Builds the lab binaries first.
    Latency {
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
    },
}

fn bench_bin() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root()).args(["run", "--release", "-q", "-p", "lb-tests", "--bin", "lb-bench", "--"]);
    cmd
}

pub fn run(which: Which) -> anyhow::Result<()> {
    let out = root().join("target/bench");
    match which {
        Which::Prog { quick, services } => {
            let mut cmd = bench_bin();
            cmd.arg("prog").arg("--out").arg(&out);
            if quick {
                cmd.arg("--quick");
            }
            if let Some(s) = services {
                cmd.arg("--services").arg(s);
            }
            run_cmd(&mut cmd)
        }
        Which::Control { quick, services, nft_max } => {
            let mut cmd = bench_bin();
            cmd.arg("control").arg("--out").arg(&out);
            if quick {
                cmd.arg("--quick");
            }
            if let Some(s) = services {
                cmd.arg("--services").arg(s);
            }
            if let Some(n) = nft_max {
                cmd.arg("--nft-max").arg(n.to_string());
            }
            run_cmd(&mut cmd)
        }
        Which::Throughput { quick } => {
            let mut cmd = bench_bin();
            cmd.arg("throughput").arg("--out").arg(&out);
            if quick {
                cmd.arg("--quick");
            }
            run_cmd(&mut cmd)
        }
        Which::Newflows { quick, services, nft_max } => {
            let mut cmd = bench_bin();
            cmd.arg("newflows").arg("--out").arg(&out);
            if quick {
                cmd.arg("--quick");
            }
            if let Some(s) = services {
                cmd.arg("--services").arg(s);
            }
            if let Some(n) = nft_max {
                cmd.arg("--nft-max").arg(n.to_string());
            }
            run_cmd(&mut cmd)
        }
        Which::Latency { quick } | Which::Connrate { quick } => {
            let name = if matches!(which, Which::Latency { .. }) { "latency" } else { "connrate" };
            // The lab runs `lb` and `lb-serve` from the same target directory as lb-bench.
            run_cmd(
                Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                    .current_dir(root())
                    .args(["build", "--release", "-p", "lb-userspace", "-p", "lb-tests", "--bins"]),
            )?;
            let mut cmd = bench_bin();
            cmd.arg(name).arg("--out").arg(&out);
            if quick {
                cmd.arg("--quick");
            }
            run_cmd(&mut cmd)
        }
        Which::All { quick } => {
            run(Which::Prog { quick, services: None })?;
            run(Which::Throughput { quick })?;
            run(Which::Newflows { quick, services: None, nft_max: None })?;
            run(Which::Control { quick, services: None, nft_max: None })?;
            run(Which::Latency { quick })?;
            run(Which::Connrate { quick })?;
            eprintln!("bench all: results in {}", out.display());
            Ok(())
        }
    }
}
