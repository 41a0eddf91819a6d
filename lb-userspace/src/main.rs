//! `lb`: the agent (`lb agent`) and the commands that inspect the datapath's pinned maps.

mod cli;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::loader::DEFAULT_PIN_DIR;

#[derive(Parser)]
#[command(name = "lb", about = "eBPF/XDP service load balancer (kube-proxy replacement)", version)]
struct Cli {
    /// Where the datapath's maps are pinned.
    #[arg(long, global = true, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Output format of the inspection commands.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent: load and attach the datapath, keep it in sync with the cluster (or a
    /// folder of manifests).
    Agent(Box<cli::agent::AgentArgs>),
    #[command(flatten)]
    Inspect(cli::inspect::Inspect),
    /// Dropped and rejected packets as they happen, with the reason: `lb monitor --type drop
    /// -o json`. The datapath writes events only while a monitor runs.
    Monitor(cli::monitor::MonitorArgs),
    /// The agent on this pin dir at a glance: running or not, its source, last sync, skipped
    /// Services, attachments, the flow table, and each map's fill. Exits 1 when no agent
    /// runs there.
    Status,
    /// Print a shell completion script: `lb completions bash > /etc/bash_completion.d/lb`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `lb man | man -l -`.
    Man,
}

fn main() -> anyhow::Result<()> {
    let cli = with_config_file(Cli::parse(), std::env::args_os().collect())?;
    match cli.cmd {
        Cmd::Agent(mut args) => {
            // `--pin-dir` is global: it applies to the agent too.
            args.pin_dir = cli.pin_dir;
            if args.cleanup {
                return cleanup(&args.pin_dir);
            }
            lb_userspace::agent::run(args.config())
        }
        Cmd::Inspect(cmd) => cli::inspect::run(cmd, &cli.pin_dir, cli.output == Format::Json),
        Cmd::Status => cli::status::run(&cli.pin_dir, cli.output == Format::Json),
        Cmd::Monitor(args) => cli::monitor::run(args, &cli.pin_dir, cli.output == Format::Json),
        Cmd::Completions { shell } => print(&completions(shell)),
        Cmd::Man => print(&man_page()?),
    }
}

/// `lb agent --config FILE`: the command line again, with the flags the file stands for
/// that it does not give itself (`cli::kube_proxy_config`), so they go through the same
/// parsers and checks.
fn with_config_file(cli: Cli, argv: Vec<std::ffi::OsString>) -> anyhow::Result<Cli> {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let Cmd::Agent(args) = &cli.cmd else { return Ok(cli) };
    let Some(path) = args.config.clone() else { return Ok(cli) };
    let matches = Cli::command().try_get_matches_from(&argv)?;
    let sub = matches.subcommand_matches("agent").expect("the agent subcommand");
    let (extra, note) = cli::kube_proxy_config::extra_args(&path, sub)?;
    let all = argv.into_iter().chain(extra.into_iter().map(Into::into));
    let matches = Cli::command()
        .try_get_matches_from(all)
        .map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    if let Cmd::Agent(args) = &mut cli.cmd {
        args.config_note = Some(note);
    }
    Ok(cli)
}

fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    use clap::CommandFactory as _;
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "lb", &mut out);
    out
}

fn man_page() -> std::io::Result<Vec<u8>> {
    use clap::CommandFactory as _;
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut out)?;
    Ok(out)
}

/// Writes `bytes` to stdout; a reader that stopped early (`| head`) is no error.
fn print(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    match std::io::stdout().write_all(bytes) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// `lb agent --cleanup`: everything of ours detached and the pins gone, said line by line.
fn cleanup(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    let _lock = lb_userspace::bpffs::lock_pin_dir(pin_dir)?;
    let done = lb_userspace::attach::cleanup(pin_dir)
        .map_err(|e| anyhow::anyhow!("cleaning up {}: {e}", pin_dir.display()))?;
    for link in &done.links {
        println!("detached pinned link {link}");
    }
    for iface in &done.netlink_xdp {
        println!("detached XDP (netlink) from {iface}");
    }
    for iface in &done.clsact {
        println!("removed the clsact filter from {iface}");
    }
    match done.pin_dir {
        true => println!("removed {} and its maps", pin_dir.display()),
        false => println!("{}: not there; nothing pinned", pin_dir.display()),
    }
    let report = lb_userspace::report::path(pin_dir);
    if lb_userspace::report::remove(pin_dir)
        .map_err(|e| anyhow::anyhow!("removing {}: {e}", report.display()))?
    {
        println!("removed the status report {}", report.display());
    }
    Ok(())
}

#[cfg(test)]
mod generated_docs {
    /// Completions for each shell and the man page come from the same clap definitions, so
    /// they name the subcommands and the newest flags.
    #[test]
    fn completions_and_the_man_page_cover_the_cli() {
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
            let text = String::from_utf8(super::completions(shell)).unwrap();
            assert!(
                text.contains("agent") && text.contains("cleanup") && text.contains("pin-dir"),
                "{shell}"
            );
        }
        let man = String::from_utf8(super::man_page().unwrap()).unwrap();
        assert!(man.starts_with(".ie") && man.contains(".TH lb 1") && man.contains("agent"), "{man}");
    }
}

#[cfg(test)]
#[path = "cli/deploy_tests.rs"]
mod deploy_tests;

#[cfg(test)]
mod config_file {
    use clap::Parser as _;

    use super::*;

    fn agent(argv: &[&str]) -> anyhow::Result<Box<cli::agent::AgentArgs>> {
        let argv: Vec<std::ffi::OsString> = argv.iter().map(Into::into).collect();
        match with_config_file(Cli::try_parse_from(&argv)?, argv)?.cmd {
            Cmd::Agent(a) => Ok(a),
            _ => unreachable!(),
        }
    }

    /// The file's values take effect, a flag on the command line wins over the file, and
    /// the log line names what was applied, overridden and ignored.
    #[test]
    fn the_file_sets_flags_the_command_line_does_not_give() {
        let path = std::env::temp_dir().join(format!("lb-kube-proxy-config-{}.yaml", std::process::id()));
        std::fs::write(
            &path,
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\n\
             metricsBindAddress: 127.0.0.1:20249\nhealthzBindAddress: 0.0.0.0:20256\nhostnameOverride: node-from-file\n\
             configSyncPeriod: 5m\nconntrack: {tcpEstablishedTimeout: 2h0m0s, udpTimeout: 0s, maxPerCore: 32768}\n",
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let a =
            agent(&["lb", "agent", "--manifests", "/tmp", "--config", file, "--node-name", "node-from-flag"])
                .unwrap();
        assert_eq!(a.metrics_bind_address, "127.0.0.1:20249".parse().unwrap());
        assert_eq!(a.healthz_bind_address, "0.0.0.0:20256".parse().unwrap());
        assert_eq!(a.node_name, "node-from-flag", "the flag wins");
        assert_eq!(a.conntrack_tcp_timeout_established, 7200);
        assert_eq!(a.conntrack_udp_timeout, 30, "0s leaves the default");
        assert_eq!(a.config_sync_period, 300);
        let note = a.config_note.unwrap();
        for want in [
            "overridden by flags node_name",
            "ignored (no equivalent in lb) mode, conntrack.maxPerCore",
            "metrics_bind_address",
        ] {
            assert!(note.contains(want), "{want:?} not in {note:?}");
        }
        // A bad value in the file is refused, naming the file.
        std::fs::write(&path, "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmetricsBindAddress: nowhere\n").unwrap();
        let err = agent(&["lb", "agent", "--manifests", "/tmp", "--config", file]).unwrap_err();
        assert!(format!("{err:#}").contains(file) && format!("{err:#}").contains("nowhere"), "{err:#}");
        let _ = std::fs::remove_file(&path);
    }
}
