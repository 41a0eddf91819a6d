//! Loads the embedded eBPF object, pinning every map under the pin dir. If the maps are
//! already pinned there (agent restart) with the layout this build wants, the kernel objects
//! are reused as they are: the flow table, backends and Maglev tables survive, so a restart
//! drops no traffic. A pin with another layout (a changed capacity, an older release) is
//! migrated into a new map (`pins`), or refused with a message naming it.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, Xdp},
};
use lb_common::maps;

use crate::bpffs;

/// The datapath object built by build.rs (aya-build) from `lb-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// An XDP program that only passes: the floor the benchmarks subtract.
pub static EMPTY_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-empty"));

/// The forwarding benchmarks' sink, XDP forwarding floor and live-frames generator.
pub static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench-progs"));

pub const XDP_PROGRAM: &str = "lb_xdp";
pub const TC_PROGRAM: &str = "lb_tc_pod";
/// `lb_tc_pod` with the too-big answer, for the node interfaces with `--node-hook tc`;
/// loaded only then (`load_node_tc`): it doubles what the verifier walks.
pub const NODE_TC_PROGRAM: &str = "lb_tc_node";
/// At TC ingress of the XDP interfaces, with host routing on (`lb-ebpf/src/host_route.rs`).
pub const UPLINK_PROGRAM: &str = "lb_tc_uplink";
/// At TC egress of the pod and node interfaces: replies of the node's own stack for a
/// backend at one of its addresses (`lb-ebpf/src/datapath.rs`, `stack_reply`).
pub const EGRESS_PROGRAM: &str = "lb_tc_egress";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("pin dir {0}: its parent is not a bpf filesystem (mount one: `mount -t bpf bpf {1}`)")]
    NotBpffs(PathBuf, PathBuf),
    #[error("pin dir {path}: {source}")]
    PinDir { path: PathBuf, source: std::io::Error },
    #[error("loading the eBPF object: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("program {0} missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error(transparent)]
    Pins(#[from] crate::pins::PinError),
}

/// Map sizes, fixed at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacities {
    pub frontends: u32,
    pub services: u32,
    pub backends: u32,
    pub maglev_slots: u32,
    pub flows: u32,
    pub fragments: u32,
    pub affinity: u32,
    pub source_ranges: u32,
    pub members: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Capacities {
            frontends: maps::DEFAULT_MAX_FRONTENDS,
            services: maps::DEFAULT_MAX_SERVICES,
            backends: maps::DEFAULT_MAX_BACKENDS,
            maglev_slots: maps::DEFAULT_MAGLEV_SLOTS,
            flows: maps::DEFAULT_MAX_FLOWS,
            fragments: maps::DEFAULT_MAX_FRAGMENTS,
            affinity: maps::DEFAULT_MAX_AFFINITY,
            source_ranges: maps::DEFAULT_MAX_SOURCE_RANGES,
            members: maps::DEFAULT_MAX_MEMBERS,
        }
    }
}

impl Capacities {
    /// `max_entries` of each map these capacities size.
    pub fn max_entries(&self) -> std::collections::BTreeMap<&'static str, u32> {
        std::collections::BTreeMap::from([
            (maps::SERVICES, self.frontends),
            (maps::BACKENDS, self.backends),
            (maps::MAGLEV, self.maglev_slots.div_ceil(maps::MAGLEV_SLOTS_PER_ENTRY)),
            (maps::CONNTRACK, self.flows),
            (maps::FRAGMENTS, self.fragments),
            (maps::AFFINITY, self.affinity),
            (maps::SOURCE_RANGES, self.source_ranges),
            (maps::STATS_SERVICE, self.services),
            (maps::STATS_BACKEND, self.backends),
            (maps::MEMBERS, self.members),
        ])
    }
}

/// Loads (and verifies) both programs with their maps pinned in `pin_dir`, migrating pins
/// whose layout differs and finishing the migration at once (for callers that attach
/// nothing; the agent uses `load_migrating`).
pub fn load(pin_dir: &Path, caps: &Capacities) -> Result<Ebpf, LoadError> {
    let (ebpf, migration) = load_migrating(pin_dir, caps)?;
    migration.finish()?;
    Ok(ebpf)
}

/// Loads (and verifies) both programs with their maps pinned in `pin_dir`. Pins whose layout
/// differs from this build's are migrated (`pins`): their entries are in the new maps when
/// this returns; call `Migration::finish` once the programs are swapped in.
pub fn load_migrating(
    pin_dir: &Path,
    caps: &Capacities,
) -> Result<(Ebpf, crate::pins::Migration), LoadError> {
    load_migrating_with_log(pin_dir, caps, BpfLog::Off)
}

/// `--bpf-log`: which of the datapath's debug messages (`aya-log`) are compiled in at load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum BpfLog {
    /// None: the verifier removes every message's code.
    #[default]
    Off,
    Error,
    /// Failed map writes, backend ids without a backend.
    Warn,
    /// And capacities met: flow table full, no source-NAT port.
    Info,
    /// And every other drop and refusal.
    Debug,
    Trace,
}

impl BpfLog {
    /// `AYA_LOG_LEVEL`: aya-log's level number (0: nothing).
    pub fn level(self) -> u8 {
        self as u8
    }
}

/// Sets the datapath's log level in `loader` (every loader of our objects must: aya-log's
/// default is everything on). Objects without aya-log are fine.
pub fn set_bpf_log(loader: &mut EbpfLoader<'_>, log: BpfLog) {
    // A static: the loader keeps a reference until `load`.
    static LEVELS: [u8; 6] = [0, 1, 2, 3, 4, 5];
    loader.override_global("AYA_LOG_LEVEL", &LEVELS[log.level() as usize], false);
}

/// Loads the XDP and the TC program on two threads: the verifier takes seconds over each of
/// them (about 3 s apiece on a small VM), and an agent that restarts applies no change
/// until both are in. The uplink and egress programs, far smaller, go with the TC one.
fn load_both_programs(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    let prog_err = |name| move |source| LoadError::Program { name, source };
    let (mut xdp, mut tc, mut uplink, mut egress) = (None, None, None, None);
    for (name, program) in ebpf.programs_mut() {
        match name {
            XDP_PROGRAM => xdp = Some(<&mut Xdp>::try_from(program).map_err(prog_err(XDP_PROGRAM))?),
            TC_PROGRAM => tc = Some(classifier(program, TC_PROGRAM)?),
            UPLINK_PROGRAM => uplink = Some(classifier(program, UPLINK_PROGRAM)?),
            EGRESS_PROGRAM => egress = Some(classifier(program, EGRESS_PROGRAM)?),
            _ => {}
        }
    }
    let xdp = xdp.ok_or(LoadError::MissingProgram(XDP_PROGRAM))?;
    let tc = tc.ok_or(LoadError::MissingProgram(TC_PROGRAM))?;
    let uplink = uplink.ok_or(LoadError::MissingProgram(UPLINK_PROGRAM))?;
    let egress = egress.ok_or(LoadError::MissingProgram(EGRESS_PROGRAM))?;
    std::thread::scope(|s| {
        let tc_loaded = s.spawn(|| {
            tc.load().map_err(prog_err(TC_PROGRAM))?;
            uplink.load().map_err(prog_err(UPLINK_PROGRAM))?;
            egress.load().map_err(prog_err(EGRESS_PROGRAM))
        });
        let xdp_loaded = xdp.load().map_err(prog_err(XDP_PROGRAM));
        let tc_loaded = tc_loaded.join().expect("the TC program's loader thread panicked");
        xdp_loaded.and(tc_loaded)
    })
}

fn classifier<'a>(
    program: &'a mut aya::programs::Program,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoadError> {
    program.try_into().map_err(|source| LoadError::Program { name, source })
}

/// Loads `lb_tc_node` into the kernel unless it is already: only an agent with `--node-hook
/// tc` needs it, and its verification takes as long as the other two programs'.
pub fn load_node_tc(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    let prog_err = |source| LoadError::Program { name: NODE_TC_PROGRAM, source };
    let program = ebpf.program_mut(NODE_TC_PROGRAM).ok_or(LoadError::MissingProgram(NODE_TC_PROGRAM))?;
    let tc = <&mut SchedClassifier>::try_from(program).map_err(prog_err)?;
    if tc.fd().is_ok() {
        return Ok(());
    }
    tc.load().map_err(prog_err)
}

/// The kernel's limit on instructions the verifier walks for one program.
pub const VERIFIER_BUDGET: u32 = 1_000_000;

/// How many instructions the verifier walked for each big program loaded (kernels from
/// 5.16 say; `lb_tc_node` only once loaded): the headroom left under `VERIFIER_BUDGET` for
/// the next feature.
pub fn verified_instructions(ebpf: &Ebpf) -> Vec<(&'static str, Option<u32>)> {
    // A program's info is there once it is loaded.
    let info = |name| ebpf.program(name).and_then(|p| p.info().ok());
    let count = |name| info(name).and_then(|i| i.verified_instruction_count());
    let mut out = vec![
        (XDP_PROGRAM, count(XDP_PROGRAM)),
        (TC_PROGRAM, count(TC_PROGRAM)),
        (EGRESS_PROGRAM, count(EGRESS_PROGRAM)),
    ];
    if let Some(node) = info(NODE_TC_PROGRAM) {
        out.push((NODE_TC_PROGRAM, node.verified_instruction_count()));
    }
    out
}

/// `load_migrating`, with the datapath's debug messages at `log`.
pub fn load_migrating_with_log(
    pin_dir: &Path,
    caps: &Capacities,
    log: BpfLog,
) -> Result<(Ebpf, crate::pins::Migration), LoadError> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/")).to_path_buf();
    if !bpffs::is_bpffs(&parent) && !bpffs::is_bpffs(pin_dir) {
        // The standard place is mounted on demand (once, whoever races us), like systemd
        // or Cilium do.
        if parent != Path::new(bpffs::BPF_FS_ROOT) || !bpffs::ensure_mounted(&parent) {
            return Err(LoadError::NotBpffs(pin_dir.to_path_buf(), parent));
        }
    }
    std::fs::create_dir_all(pin_dir)
        .map_err(|source| LoadError::PinDir { path: pin_dir.to_path_buf(), source })?;
    let sizes = caps.max_entries();
    let migration = crate::pins::prepare(pin_dir, &crate::pins::wanted(EBPF_OBJECT, &sizes)?)?;
    let loaded = load_pinned(pin_dir, &sizes, log).and_then(|ebpf| {
        migration.copy()?;
        Ok(ebpf)
    });
    match loaded {
        Ok(ebpf) => Ok((ebpf, migration)),
        Err(e) => {
            // The old programs still run on the old maps: their pins come back.
            migration.abandon();
            Err(e)
        }
    }
}

/// Loads the object with its maps pinned in `pin_dir`, sized `sizes`, and verifies both
/// programs.
fn load_pinned(
    pin_dir: &Path,
    sizes: &std::collections::BTreeMap<&'static str, u32>,
    log: BpfLog,
) -> Result<Ebpf, LoadError> {
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pin_dir);
    set_bpf_log(&mut loader, log);
    for (name, max) in sizes {
        loader.map_max_entries(name, *max);
    }
    let mut ebpf = loader.load(EBPF_OBJECT)?;
    load_both_programs(&mut ebpf)?;
    Ok(ebpf)
}
