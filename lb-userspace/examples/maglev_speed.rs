//! Micro-benchmark of the Maglev builder: time per fresh table, as a first sync builds them.
//!
//! `cargo run --release -p lb-userspace --example maglev_speed [TABLES] [BACKENDS]` (defaults
//! 20 000 and 4). Prints the time per table of seven rounds and a checksum of all the
//! tables: two builds that print the same checksum built the same tables. Compare builds in
//! alternating runs: the lab VMs drift.

use std::time::Instant;

fn main() {
    let arg =
        |i: usize, default: usize| std::env::args().nth(i).map_or(default, |s| s.parse().expect("a number"));
    let (tables, backends) = (arg(1, 20_000), arg(2, 4));
    let names: Vec<Vec<Vec<u8>>> = (0..tables)
        .map(|s| {
            (0..backends).map(|b| format!("10.{}.{}.{b}:8080", s / 256 % 256, s % 256).into_bytes()).collect()
        })
        .collect();
    let size = lb_userspace::maglev::table_size(backends, lb_common::maglev::DEFAULT_MAX_TABLE);
    for round in 0..7 {
        // Only the builds are timed (a clock read each, ~1 % of a table); the checksum is not.
        let (mut spent, mut checksum) = (std::time::Duration::ZERO, 0u64);
        for service in &names {
            let refs: Vec<&[u8]> = service.iter().map(Vec::as_slice).collect();
            let t = Instant::now();
            let table = lb_userspace::maglev::fresh_positions(&refs, size);
            spent += t.elapsed();
            checksum = table
                .iter()
                .fold(checksum, |sum, position| sum.wrapping_mul(31).wrapping_add(*position as u64));
        }
        let per_table = spent.as_secs_f64() * 1e6 / tables as f64;
        println!("round {round}: {per_table:.2} µs per table (M = {size}), checksum {checksum:016x}");
    }
}
