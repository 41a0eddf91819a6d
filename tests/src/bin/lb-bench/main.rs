//! Benchmark measurements that need the real datapath (run by `cargo xtask bench ...`).
//!
//! `control` (control.rs): how fast a Service set reaches the datapath, vs iptables-restore
//! and nft -f of kube-proxy-shaped rules. `latency`, `connrate` (clients.rs): real TCP
//! clients in the lab, via the VIP and direct.
//!
//! `prog` (prog.rs): BPF_PROG_TEST_RUN cost per packet of `lb_xdp`, ours beside a baseline
//! revision's object and the empty program. `conntrack` (conntrack.rs): the flow table's GC
//! and source-NAT connection rate.

use std::{fs, path::PathBuf};

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[global_allocator]
static ALLOCATOR: heap_count::Counting = heap_count::Counting;

mod churn;
mod clients;
mod conntrack;
mod control;
mod first_packet;
mod forward;
mod heap_count;
mod load;
mod memory;
mod monitor_cost;
mod plot;
mod podpath;
mod prog;
mod scratch_agent;
mod services;
mod source_check;
mod topo;

/// The options of a sweep over service counts against iptables and nftables.
#[derive(clap::Args)]
struct Sweep {
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Service counts to sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,30000")]
    services: Vec<u32>,
    /// nftables is loaded up to this many services (nft -f takes ~20-100 s at 10k here).
    #[arg(long, default_value_t = 10_000)]
    nft_max: u32,
}

#[derive(Subcommand)]
enum Cmd {
    /// First-packet latency vs number of services (ours, iptables, nftables, through a
    /// forwarding namespace), and connect / request-response from a lab pod via the VIP and
    /// direct.
    Latency(#[command(flatten)] Sweep),
    /// New connections per second from a lab pod, via the VIP and direct.
    Connrate {
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// The real agent's resident memory and its maps' kernel memory at N Services.
    Memory {
        /// 1k, 10k, 30k instead of also 100k.
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        #[arg(long, value_delimiter = ',')]
        services: Vec<u32>,
    },
    /// Full sync and one-endpoint change: ours vs iptables-restore vs nft -f; Maglev
    /// disruption.
    Control {
        /// Smaller sweep (1k, 10k, 30k), ours timed 3 times a row instead of 5 (the median is
        /// reported), and a 2-minute cap per baseline step.
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// Service counts (default: 1000,10000,30000 with --quick, else also 100000).
        #[arg(long, value_delimiter = ',')]
        services: Vec<u32>,
        /// nft -f is run up to this many services (it is slow: ~100 s at 10k here).
        #[arg(long, default_value_t = 10_000)]
        nft_max: u32,
        /// iptables-restore is run up to this many services (0: ours alone, e.g. to profile it).
        #[arg(long, default_value_t = u32::MAX)]
        iptables_max: u32,
    },
    /// Established flows through a forwarding node: ours vs iptables vs nftables vs plain
    /// forwarding, delivered packets/s and CPU ns per packet.
    Throughput {
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// Every packet a new flow, 1 to 30 000 services: packets/s per variant and its slope.
    Newflows(#[command(flatten)] Sweep),
    /// Per-packet program cost vs number of services, ours beside a baseline object.
    Prog {
        /// Fewer calls per case and a smaller sweep.
        #[arg(long)]
        quick: bool,
        /// Where to write prog.md / prog.json.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// Service counts to sweep.
        #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,100000")]
        services: Vec<u32>,
        /// Another build's datapath object (`cargo xtask bench prog --baseline REV` builds it).
        #[arg(long)]
        baseline_object: Option<PathBuf>,
        /// The baseline's name in the report.
        #[arg(long, default_value = "baseline")]
        baseline_name: String,
    },
    /// A stream of EndpointSlice updates at 100, 1 000 and 5 000 per second over N Services:
    /// programming latency p50/p99 and CPU, ours (kube source) vs kube-proxy-shaped
    /// iptables-restore and nft -f syncs.
    Churn {
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// Service counts (default 30000,100000).
        #[arg(long, value_delimiter = ',', default_value = "30000,100000")]
        services: Vec<u32>,
        /// nft -f is run up to this many services (its full load is slow).
        #[arg(long, default_value_t = 10_000)]
        nft_max: u32,
        /// Only these variants, comma-separated: kube, manifests, iptables, nftables (default:
        /// all). To compare builds on one variant without the others' minutes.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Pod → ClusterIP → pod (local and remote backend): stream throughput, request/response
    /// and CPU, ours with and without host routing vs iptables, nftables and direct.
    Podpath {
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// The flow table: GC pass cost by size, connection rate through source NAT.
    Conntrack {
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
}

pub(crate) fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string()
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Prog { quick, out, services, baseline_object, baseline_name } => {
            prog::run(quick, out, &services, baseline_object.map(|p| (baseline_name, p)))
        }
        Cmd::Conntrack { quick, out } => conntrack::run(quick, out),
        Cmd::Podpath { quick, out } => podpath::run(quick, out),
        Cmd::Churn { quick, out, services, nft_max, only } => {
            churn::run(quick, out, &services, nft_max, &only)
        }
        Cmd::Latency(s) => clients::latency(s.quick, s.out, &s.services, s.nft_max),
        Cmd::Connrate { quick, out } => clients::connrate(quick, out),
        Cmd::Throughput { quick, out } => forward::throughput(quick, out),
        Cmd::Newflows(s) => forward::newflows(s.quick, s.out, &s.services, s.nft_max),
        Cmd::Memory { quick, out, services } => {
            let sweep = match (services.is_empty(), quick) {
                (false, _) => services,
                (true, true) => vec![1_000, 10_000, 30_000],
                (true, false) => vec![1_000, 10_000, 30_000, 100_000],
            };
            memory::run(quick, out, &sweep)
        }
        Cmd::Control { quick, out, services, nft_max, iptables_max } => {
            let sweep = if !services.is_empty() {
                services
            } else if quick {
                vec![1_000, 10_000, 30_000]
            } else {
                vec![1_000, 10_000, 30_000, 100_000]
            };
            control::run(quick, out, &sweep, nft_max, iptables_max)
        }
    }
}
