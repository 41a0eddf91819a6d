//! Read-only commands over the pinned maps: `lb service|backend|conntrack list`, `lb stats`.
//! They work whether the agent runs or not.

use std::path::Path;

use anyhow::Context as _;
use clap::Subcommand;
use lb_common::{abi::*, ct, verdict::Reason};
use lb_userspace::{
    dataplane::{AyaDataplane, Dataplane},
    describe::{backend_flags, fmt_ip, service_flags},
};
use serde_json::json;

#[derive(Subcommand)]
pub enum Inspect {
    /// Frontends (VIP:port/proto) and their Maglev tables.
    Service {
        #[command(subcommand)]
        cmd: ListCmd,
    },
    /// Backends by id.
    Backend {
        #[command(subcommand)]
        cmd: ListCmd,
    },
    /// Flow-table entries (forward and reply).
    Conntrack {
        #[command(subcommand)]
        cmd: ListCmd,
    },
    /// Packet counters by verdict reason, summed over CPUs.
    Stats,
    /// Which backend a flow gets, and why: `lb explain 198.18.1.100:40000 198.19.0.10:80/tcp`;
    /// for a socket of the node itself: `lb explain --from-host 198.19.0.10:80/tcp`.
    Explain {
        /// Explain a connect from the node's own network namespace (connect-time load
        /// balancing): the one argument is the frontend.
        #[arg(long)]
        from_host: bool,
        /// Client address, `IP` or `IP:PORT` (with `--from-host`: the frontend).
        src: String,
        /// Frontend, `IP:PORT[/tcp|udp]` (tcp by default).
        #[arg(required_unless_present = "from_host")]
        dst: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum ListCmd {
    List,
}

/// Runs one of the read-only commands against the maps pinned in `pin_dir`.
pub fn run(cmd: Inspect, pin_dir: &Path, json: bool) -> anyhow::Result<()> {
    let dp = AyaDataplane::open(pin_dir).with_context(|| format!("pin dir {}", pin_dir.display()))?;
    match cmd {
        Inspect::Explain { from_host, src, dst } => {
            let lines = match (from_host, dst) {
                (true, None) => lb_userspace::explain::explain_from_host(&dp, &src)?,
                (true, Some(_)) => anyhow::bail!("--from-host takes one argument, the frontend"),
                (false, Some(dst)) => lb_userspace::explain::explain(&dp, &src, &dst)?,
                (false, None) => anyhow::bail!("want SRC and DST"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&lines)?);
            } else {
                for l in lines {
                    println!("{l}");
                }
            }
        }
        Inspect::Service { cmd: ListCmd::List } => {
            let mut rows = dp.services()?;
            rows.sort_by_key(|(k, _)| (k.ip(), k.port(), k.proto));
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(k, v)| {
                        json!({"frontend": format!("{}:{}/{}", fmt_ip(k.ip()), k.port(), proto_name(k.proto)),
                               "service_id": v.service_id, "backends": v.backend_count,
                               "maglev_offset": v.maglev_offset, "maglev_size": v.maglev_size, "flags": v.flags})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<40} {:>6} {:>8} {:>10} {:>6}  FLAGS",
                    "FRONTEND", "ID", "BACKENDS", "OFFSET", "SLOTS"
                );
                for (k, v) in rows {
                    let fe = if k.proto == 0 {
                        format!("{}:* (unserved ports rejected)", fmt_ip(k.ip()))
                    } else {
                        format!("{}:{}/{}", fmt_ip(k.ip()), k.port(), proto_name(k.proto))
                    };
                    println!(
                        "{fe:<40} {:>6} {:>8} {:>10} {:>6}  {}",
                        v.service_id,
                        v.backend_count,
                        v.maglev_offset,
                        v.maglev_size,
                        service_flags(v.flags)
                    );
                }
            }
        }
        Inspect::Backend { cmd: ListCmd::List } => {
            let rows = dp.backends()?;
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(id, b)| json!({"id": id, "address": fmt_ip(b.ip()), "port": b.port(), "flags": b.flags}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:>8}  {:<40}  FLAGS", "ID", "ADDRESS");
                for (id, b) in rows {
                    println!(
                        "{id:>8}  {:<40}  {}",
                        format!("{}:{}", fmt_ip(b.ip()), b.port()),
                        backend_flags(b.flags)
                    );
                }
            }
        }
        Inspect::Conntrack { cmd: ListCmd::List } => {
            let rows = dp.flows()?;
            let by_key: std::collections::HashMap<FlowKey, FlowValue> = rows.iter().copied().collect();
            let now = lb_userspace::conntrack_gc::monotonic_ns();
            let secs = |ns: u64| now.saturating_sub(ns) / lb_common::ct::NS_PER_SEC;
            let show = |k: &FlowKey, v: &FlowValue| {
                let src = format!("{}:{}", fmt_ip(ip_from_addr(&k.src)), u16::from_be(k.sport));
                let dst = format!("{}:{}", fmt_ip(ip_from_addr(&k.dst)), u16::from_be(k.dport));
                let mut to = format!("{}:{}", fmt_ip(ip_from_addr(&v.addr)), u16::from_be(v.port));
                if v.flags & FLOW_F_SNAT != 0 {
                    // Forward: new source; reply: new destination (the original client).
                    let nat = format!("{}:{}", fmt_ip(ip_from_addr(&v.nat_addr)), u16::from_be(v.nat_port));
                    to = if v.direction == FLOW_FORWARD {
                        format!("{to} snat {nat}")
                    } else {
                        format!("{to} to {nat}")
                    };
                }
                let forward = v.direction == FLOW_FORWARD;
                // The pair's state and idle time need the other direction too.
                let other_key = if forward { ct::reverse_key(k, v) } else { ct::forward_key(k, v) };
                let other = by_key.get(&other_key);
                let (fwd_state, rev_state) = match other {
                    Some(o) if forward => (v.state, o.state),
                    Some(o) => (o.state, v.state),
                    None => (v.state, v.state),
                };
                let state =
                    if other.is_some() { ct::state_name(k.proto, fwd_state, rev_state) } else { "half" };
                let last = other.map_or(v.last_seen_ns, |o| o.last_seen_ns.max(v.last_seen_ns));
                let dir = if forward { "forward" } else { "reply" };
                (
                    proto_name(k.proto),
                    src,
                    dst,
                    dir,
                    to,
                    v.backend_id,
                    v.service_id,
                    state,
                    secs(v.created_ns),
                    secs(last),
                )
            };
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(k, v)| {
                        let (p, s, d, dir, to, b, svc, state, age, idle) = show(k, v);
                        json!({"proto": p, "src": s, "dst": d, "direction": dir, "rewrite_to": to, "backend_id": b,
                               "service_id": svc, "state": state, "age_seconds": age, "idle_seconds": idle})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<5} {:<46} {:<46} {:<8} {:<46} {:>7} {:<11} {:>8} {:>8}",
                    "PROTO", "SOURCE", "DESTINATION", "DIR", "REWRITE TO", "BACKEND", "STATE", "AGE", "IDLE"
                );
                for (k, v) in &rows {
                    let (p, s, d, dir, to, b, _, state, age, idle) = show(k, v);
                    println!(
                        "{p:<5} {s:<46} {d:<46} {dir:<8} {to:<46} {b:>7} {state:<11} {:>8} {:>8}",
                        format!("{age}s"),
                        format!("{idle}s")
                    );
                }
                let capacity = dp.flow_capacity()?;
                eprintln!(
                    "{} entries of {capacity} ({:.1}% full)",
                    rows.len(),
                    rows.len() as f64 * 100.0 / capacity.max(1) as f64
                );
            }
        }
        Inspect::Stats => {
            let mut rows = Vec::new();
            for r in Reason::ALL {
                rows.push((r.name(), dp.reason_counter(r)?));
            }
            // What became of translated packets at XDP under --xdp-forward.
            for (slot, name) in [
                (XDP_FWD_REDIRECTED, "xdp-redirected"),
                (XDP_FWD_TX, "xdp-tx"),
                (XDP_FWD_TO_STACK, "xdp-to-stack"),
            ] {
                rows.push((name, dp.xdp_forward_counter(slot)?));
            }
            // What became of translated packets at TC under --host-routing.
            for (slot, name) in [
                (HOST_ROUTE_PEER, "host-route-peer"),
                (HOST_ROUTE_NEIGH, "host-route-neigh"),
                (HOST_ROUTE_TO_STACK, "host-route-to-stack"),
                (HOST_ROUTE_NO_METADATA, "host-route-no-metadata"),
            ] {
                rows.push((name, dp.host_routing_counter(slot)?));
            }
            if json {
                let v: serde_json::Map<_, _> = rows
                    .iter()
                    .map(|(n, c)| (n.to_string(), json!({"packets": c.packets, "bytes": c.bytes})))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<20} {:>14} {:>16}", "REASON", "PACKETS", "BYTES");
                for (n, c) in rows {
                    println!("{n:<20} {:>14} {:>16}", c.packets, c.bytes);
                }
            }
        }
    }
    Ok(())
}
