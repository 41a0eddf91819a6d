//! Builds the eBPF object (lb-ebpf) for the BPF target with aya-build and leaves it in
//! OUT_DIR, where `include_bytes_aligned!` embeds it into the `lb` binary.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?
        .join("lb-ebpf");
    let root = root.to_str().context("non-UTF-8 path")?;
    // Rebuild when the shared ABI changes too.
    println!("cargo:rerun-if-changed={}/../lb-common/src", root);
    let package = Package { name: "lb-ebpf", root_dir: root, ..Default::default() };
    aya_build::build_ebpf([package], Toolchain::default())
}
