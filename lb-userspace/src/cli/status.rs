//! `lb status`: one screen on the agent and its datapath. What only the agent knows comes
//! from its report (`lb_userspace::report`); whether it runs, and each map's fill, from the
//! kernel now.

use std::{os::fd::AsFd as _, path::Path};

use lb_userspace::{bpffs, loader, memory, rawmap, report};
use serde::Serialize;

#[derive(Serialize)]
struct Status {
    agent_pid: Option<i32>,
    agent_memory: Option<memory::ProcessMemory>,
    /// The datapath object this `lb` carries (`report::object_hash`).
    cli_datapath_object: String,
    report: Option<report::Report>,
    maps: Vec<MapFill>,
}

#[derive(Serialize)]
struct MapFill {
    name: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    /// Entries held (hash-like maps; an array always holds its capacity).
    entries: Option<usize>,
    capacity: u32,
    memory_bytes: Option<u64>,
}

/// Prints the status of the agent on `pin_dir`. Exits 1 (after printing) when no agent runs
/// there, so scripts can test it.
pub fn run(pin_dir: &Path, json: bool) -> anyhow::Result<()> {
    let agent_pid = bpffs::lock_holder(pin_dir);
    let status = Status {
        agent_pid,
        agent_memory: agent_pid.and_then(|pid| memory::of_process(&pid.to_string())),
        cli_datapath_object: report::object_hash(loader::EBPF_OBJECT),
        report: report::read(pin_dir)?,
        maps: maps(pin_dir),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(pin_dir, &status));
    }
    if status.agent_pid.is_none() {
        std::process::exit(1);
    }
    Ok(())
}

fn maps(pin_dir: &Path) -> Vec<MapFill> {
    lb_common::maps::ALL
        .iter()
        .filter_map(|&name| {
            let pin = pin_dir.join(name);
            let map = aya::maps::MapData::from_pin(&pin).ok()?;
            let layout = rawmap::layout(map.fd().as_fd()).ok()?;
            let (kind, hashed) = type_name(layout.map_type);
            let entries =
                if hashed { rawmap::keys(map.fd().as_fd(), &layout).ok().map(|k| k.len()) } else { None };
            Some(MapFill {
                name,
                kind,
                entries,
                // The Maglev array's in slots, as `--max-maglev-slots` gives it.
                capacity: if name == lb_common::maps::MAGLEV {
                    layout.max_entries * lb_common::maps::MAGLEV_SLOTS_PER_ENTRY
                } else {
                    layout.max_entries
                },
                memory_bytes: memory::fd_bytes(map.fd().as_fd()),
            })
        })
        .collect()
}

/// The map type's name, and whether its entries can be counted (arrays always hold all).
fn type_name(t: u32) -> (&'static str, bool) {
    match t {
        1 => ("hash", true),
        2 => ("array", false),
        5 => ("percpu_hash", true),
        6 => ("percpu_array", false),
        9 => ("lru_hash", true),
        10 => ("lru_percpu_hash", true),
        11 => ("lpm_trie", true),
        25 => ("devmap_hash", true),
        27 => ("ringbuf", false),
        _ => ("other", false),
    }
}

fn render(pin_dir: &Path, s: &Status) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out += &format!("{k:<12}{v}\n");
    let same = |h: &str| if h == s.cli_datapath_object { "this lb's too" } else { "NOT this lb's" };
    match (&s.agent_pid, &s.report) {
        (Some(pid), Some(r)) => line(
            "agent",
            format!(
                "running, pid {pid}; lb {}, datapath {} ({})",
                r.version,
                r.datapath_object,
                same(&r.datapath_object)
            ),
        ),
        (Some(pid), None) => line("agent", format!("running, pid {pid}; no report yet")),
        (None, Some(r)) => line(
            "agent",
            format!(
                "NOT RUNNING on {} (last report by pid {} at {})",
                pin_dir.display(),
                r.pid,
                r.written_at
            ),
        ),
        (None, None) => line("agent", format!("NOT RUNNING on {}; none has reported", pin_dir.display())),
    }
    if let Some(r) = &s.report {
        line("started", r.started_at.clone());
        line(
            "source",
            format!("{} {} ({} rejected or failed)", r.source.kind, r.source.detail, r.source.errors),
        );
        let last = match &r.last_sync {
            Some(l) => format!(
                "; last {} {} in {:.2} ms: {} services, {} frontends, {} backends",
                l.at,
                if l.ok { "ok" } else { "FAILED" },
                l.duration_ms,
                l.services,
                l.frontends,
                l.backends
            ),
            None => "; none yet".into(),
        };
        line("syncs", format!("{} ({} failed){last}", r.syncs, r.sync_errors));
        match r.skipped.as_slice() {
            [] => line("skipped", "none".into()),
            list => {
                for (i, sk) in list.iter().enumerate() {
                    line(if i == 0 { "skipped" } else { "" }, format!("{}: {}", sk.service, sk.why));
                }
            }
        }
        if r.contested_frontends > 0 {
            line(
                "contested",
                format!("{} frontends claimed twice (see the agent log)", r.contested_frontends),
            );
        }
        match r.attachments.as_slice() {
            [] => line("attached", "nothing".into()),
            list => {
                for (i, a) in list.iter().enumerate() {
                    line(
                        if i == 0 { "attached" } else { "" },
                        format!("{:<16} {:<4} {}", a.interface, a.hook, a.mode),
                    );
                }
            }
        }
        if let Some(f) = &r.flow_table {
            let states: Vec<String> = f.by_state.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let snat: Vec<String> = f.snat_ports.iter().map(|(k, v)| format!("{k} {v}")).collect();
            line(
                "flows",
                format!(
                    "{} entries of {} at the GC pass of {} ({:.1} ms); pairs: {}; SNAT ports: {}",
                    f.entries,
                    f.capacity,
                    f.at,
                    f.pass_ms,
                    if states.is_empty() { "none".into() } else { states.join(", ") },
                    if snat.is_empty() { "none".into() } else { snat.join(", ") }
                ),
            );
        }
        line("report", format!("written {}", r.written_at));
    }
    let maps_total: u64 = s.maps.iter().filter_map(|m| m.memory_bytes).sum();
    let agent = s.agent_memory.map_or("agent -".to_string(), |m| {
        format!(
            "agent {} resident, {} of it its own (the rest: map pages it maps)",
            size(m.resident_bytes),
            size(m.anonymous_bytes)
        )
    });
    line("memory", format!("{agent}; maps {} in the kernel", size(maps_total)));
    out += &format!("\n{:<22} {:<14} {:>10} {:>10} {:>12}\n", "MAP", "TYPE", "ENTRIES", "CAPACITY", "MEMORY");
    for m in &s.maps {
        let entries = m.entries.map_or("-".to_string(), |n| n.to_string());
        let mem = m.memory_bytes.map_or("-".to_string(), size);
        out += &format!("{:<22} {:<14} {entries:>10} {:>10} {mem:>12}\n", m.name, m.kind, m.capacity);
    }
    if s.maps.is_empty() {
        out += &format!("(no pinned maps in {})\n", pin_dir.display());
    }
    out
}

/// Bytes in KiB under a MiB, else MiB.
fn size(b: u64) -> String {
    if b < 1 << 20 {
        format!("{:.0} KiB", b as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
    }
}
