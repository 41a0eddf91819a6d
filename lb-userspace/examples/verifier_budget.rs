//! How much of the verifier's budget each datapath program uses: the instructions it
//! processed to accept the program (`verified_insns`), against the kernel's limit of one
//! million. A change that branches the packet path (a second call of a large step, another
//! early exit) can multiply that count; this shows how close it came before a load fails
//! with "BPF program is too large". (The other budget, 512 bytes of combined stack, has no
//! counter: a load over it fails with "combined stack size of N calls is ...".)
//!
//! `cargo run --release -p lb-userspace --example verifier_budget` (root: it loads the
//! programs, with their maps pinned in a directory of its own under /sys/fs/bpf, removed
//! afterwards).

use lb_userspace::loader;

/// The kernel's limit of processed instructions per program (`BPF_COMPLEXITY_LIMIT_INSNS`).
const LIMIT: u32 = 1_000_000;

fn main() -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/lb-verifier-budget-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| -> anyhow::Result<()> {
        let ebpf = loader::load(&dir, &loader::Capacities::default())?;
        // The packet programs; the connect-time ones (`sock`) are a few hundred instructions.
        for name in [loader::XDP_PROGRAM, loader::TC_PROGRAM, loader::UPLINK_PROGRAM] {
            let info = ebpf.program(name).and_then(|p| p.info().ok());
            match info.and_then(|i| i.verified_instruction_count()) {
                Some(n) => println!(
                    "{name}: {n} instructions verified, {:.0}% of {LIMIT}",
                    100.0 * n as f64 / LIMIT as f64
                ),
                None => println!("{name}: no count (a kernel before 5.16)"),
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
