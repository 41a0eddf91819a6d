//! L1: the shape of the datapath object itself (no root needed).
//!
//! LLVM's BPF backend expands `memcpy` into loads and stores, but a `memset` or `memmove`
//! it leaves as a call to compiler-builtins' byte-at-a-time loop: zeroing the parsed
//! headers that way once cost every packet some 30 ns (`lb-ebpf/src/zero.rs`). So no
//! program may call one of those functions; a change that brings one back fails here, not
//! in a benchmark read months later.

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionKind};

/// compiler-builtins' memory functions: each a byte loop on BPF.
const BYTE_LOOPS: [&str; 5] = ["memset", "memmove", "memcpy", "memcmp", "bcmp"];

#[test]
fn no_program_calls_a_byte_loop_memory_function() {
    let file = object::File::parse(lb_userspace::loader::EBPF_OBJECT).expect("the datapath object parses");
    let mut relocations = 0;
    let mut calls = Vec::new();
    for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
        for (offset, rel) in section.relocations() {
            relocations += 1;
            let RelocationTarget::Symbol(index) = rel.target() else { continue };
            let name = file.symbol_by_index(index).and_then(|s| s.name()).unwrap_or("?");
            if BYTE_LOOPS.contains(&name) {
                calls.push(format!("{} +{offset:#x}: {name}", section.name().unwrap_or("?")));
            }
        }
    }
    // Not vacuous: every map access is a relocation, so a readable object has many.
    assert!(relocations > 50, "only {relocations} relocations read: is this the datapath object?");
    assert!(
        calls.is_empty(),
        "calls to byte-loop memory functions (see lb-ebpf/src/zero.rs):\n{}",
        calls.join("\n")
    );
}
