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

/// `call` with `src_reg` = 1 (BPF_PSEUDO_CALL): a call to a BPF function, not a helper.
const CALL: u8 = 0x85;
const PSEUDO_CALL: u8 = 1;

#[test]
fn no_program_calls_a_byte_loop_memory_function() {
    let file = object::File::parse(lb_userspace::loader::EBPF_OBJECT).expect("the datapath object parses");
    // A function's name by (section, offset). A call's target is a function symbol, or a
    // section symbol plus an offset (the usual form for calls into `.text`), or, within one
    // section, no relocation at all: all three are resolved to a name.
    let name_at = |section: object::SectionIndex, offset: u64| {
        file.symbols()
            .find(|s| s.section_index() == Some(section) && s.address() == offset && s.size() > 0)
            .and_then(|s| s.name().ok().map(str::to_string))
            .unwrap_or_else(|| format!("?@{offset:#x}"))
    };
    let mut resolved = 0;
    let mut calls = Vec::new();
    for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
        let code = section.data().expect("section data");
        let relocations: std::collections::HashMap<u64, _> = section.relocations().collect();
        for (i, insn) in code.chunks_exact(8).enumerate() {
            if insn[0] != CALL || insn[1] >> 4 != PSEUDO_CALL {
                continue;
            }
            let offset = (i * 8) as u64;
            let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]) as i64;
            let target = match relocations.get(&offset).map(|r| r.target()) {
                Some(RelocationTarget::Symbol(index)) => {
                    let symbol = file.symbol_by_index(index).expect("relocation symbol");
                    let section = symbol.section_index().expect("a defined call target");
                    if symbol.kind() == object::SymbolKind::Section {
                        name_at(section, ((imm + 1) * 8) as u64)
                    } else {
                        symbol.name().unwrap_or("?").to_string()
                    }
                }
                Some(_) => continue,
                None => name_at(section.index(), (offset as i64 + (imm + 1) * 8) as u64),
            };
            resolved += 1;
            if BYTE_LOOPS.contains(&target.as_str()) {
                let caller = file
                    .symbols()
                    .filter(|s| s.section_index() == Some(section.index()) && s.size() > 0)
                    .filter(|s| s.address() <= offset && offset < s.address() + s.size())
                    .find_map(|s| s.name().ok())
                    .unwrap_or("?");
                calls.push(format!("{} +{offset:#x} in {caller}: {target}", section.name().unwrap_or("?")));
            }
        }
    }
    // Not vacuous: the programs call their subprograms (`datapath::known_flow`, ...).
    assert!(resolved > 50, "only {resolved} BPF-to-BPF calls resolved: is this the datapath object?");
    assert!(
        calls.is_empty(),
        "calls to byte-loop memory functions (see lb-ebpf/src/zero.rs):\n{}",
        calls.join("\n")
    );
}
