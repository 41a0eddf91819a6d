//! `lb-lab`: the network-namespace lab by hand (`up`, `status`, `down`) and the demo.
//! `cargo xtask lab ...` and `cargo xtask demo` run this after building everything.

use std::time::Duration;

use clap::{Parser, Subcommand};
use lb_tests::{
    demo,
    lab::{self, Bins, Lab},
};

#[derive(Parser)]
#[command(about = "Network-namespace lab for the load balancer (root)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the standard lab (2 nodes, 3 backend pods, 2 client pods, agents running) and
    /// leave it up; prints how to use it.
    Up,
    /// List labs, their namespaces and agents.
    Status,
    /// Remove every lab (namespaces, bpffs mount, processes).
    Down,
    /// The walkthrough: ClusterIP and NodePort spreading, endpoint removal, no endpoints.
    Demo,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bins = || Bins::beside(&std::env::current_exe()?);
    match cli.cmd {
        Cmd::Up => {
            let l = Lab::standard(bins()?)?;
            l.write_manifest("web.yaml", &demo::web_manifests(&l, 3))?;
            print_status(&l.state);
            println!("\ntry:  ip netns exec {} curl -s http://{}/", l.pod("client").ns, demo::CLUSTER_IP);
            println!(
                "      ip netns exec {} curl -s http://{}:{}/",
                l.ext_ns(),
                lab::node_ip(1),
                demo::NODE_PORT
            );
            println!("      {} --pin-dir {} service list", l.state.bins.lb.display(), l.pin_dir(1).display());
            println!("edit manifests in {}; remove with: cargo xtask lab down", l.state.manifests.display());
            // Leave it up: the state file lets `down` remove it.
            std::mem::forget(l);
            Ok(())
        }
        Cmd::Status => {
            let labs = Lab::load_all();
            if labs.is_empty() {
                println!("no lab is up");
            }
            for s in &labs {
                print_status(s);
            }
            Ok(())
        }
        Cmd::Down => {
            for s in Lab::load_all() {
                println!("removing lab {} ({} namespaces)", s.name, s.namespaces.len());
                lab::teardown_state(&s, true);
            }
            std::thread::sleep(Duration::from_millis(100));
            Ok(())
        }
        Cmd::Demo => demo::run(bins()?),
    }
}

fn print_status(s: &lab::State) {
    println!("lab {} (state in {})", s.name, s.dir.display());
    println!("  manifests: {}", s.manifests.display());
    for n in 1..=s.nodes {
        let agent = s.agents.iter().find(|a| a.node == n);
        let alive = agent.is_some_and(|a| std::path::Path::new(&format!("/proc/{}", a.pid)).exists());
        println!(
            "  node-{n}  {}  netns {}-node{n}  agent {}",
            lab::node_ip(n),
            s.name,
            match (agent, alive) {
                (Some(a), true) => format!("running (pid {}, log {})", a.pid, a.log.display()),
                (Some(a), false) => format!("DEAD (pid {}, log {})", a.pid, a.log.display()),
                (None, _) => "not started".into(),
            }
        );
    }
    for p in &s.pods {
        println!("  pod {:<10} node-{}  {:<14} netns {}", p.name, p.node, p.ip, p.ns);
    }
    println!("  external client {}  netns {}-ext", lab::EXT_IP, s.name);
}
