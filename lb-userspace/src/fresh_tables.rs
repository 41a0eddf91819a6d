//! The Maglev tables of a first sync, built on every CPU ahead of the (sequential) plan.
//!
//! A first sync of 100 000 Services builds 100 000 tables: about a third of the plan's time
//! on one CPU. A fresh table depends only on its backends' names and its size, not on the
//! ids the plan hands out, so each is built ahead as positions in its service's backend list
//! (`maglev::fresh_positions`), packed as the agent keeps tables (`compact_table`), and the
//! plan numbers it once the backends have ids.

use std::{io::Write, num::NonZero};

use lb_common::abi::ServiceKey;

use crate::{
    applied::Applied,
    compact_table::Table,
    maglev,
    model::{Backend, Desired},
    sorted_set::SortedSet,
};

/// A service's table built ahead: its size and, per slot, the position of its backend in the
/// service's `backends` (in their set order; `Table::renumbered` gives it the ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreshTable {
    pub size: u32,
    pub positions: Table,
}

/// Below this many new tables one thread is about as fast as several.
const PARALLEL_FROM: usize = 1024;

/// The stable name a backend's slots are hashed by.
pub fn name(b: &Backend) -> Vec<u8> {
    let mut out = Vec::new();
    write_name(&mut out, b);
    out
}

/// Appends `b`'s name to `out`.
fn write_name(out: &mut Vec<u8>, b: &Backend) {
    // (Writing to a Vec cannot fail.)
    let _ = write!(out, "{}:{}", b.ip, b.port);
}

/// For each service of `desired`, in order: its fresh table when none of its frontends is in
/// `applied` (so the plan builds it from nothing). Empty when there are too few such tables
/// or one CPU: the plan then builds every table itself.
pub fn build_all(desired: &Desired, applied: &Applied, max_table: u32) -> Vec<Option<FreshTable>> {
    let jobs: Vec<Option<&SortedSet<Backend>>> = desired
        .services
        .iter()
        .map(|(sref, s)| {
            let known = s
                .frontends
                .iter()
                .any(|(ip, port)| applied.services.contains_key(&ServiceKey::new(*ip, *port, sref.proto)));
            (!known && !s.backends.is_empty()).then_some(&s.backends)
        })
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, NonZero::get);
    if threads < 2 || jobs.iter().flatten().count() < PARALLEL_FROM {
        return Vec::new();
    }
    let chunk = jobs.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = jobs
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    let mut names = Vec::new();
                    part.iter().map(|j| j.map(|b| table(b, max_table, &mut names))).collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("a table builder panicked")).collect()
    })
}

/// `backends`' fresh table; `buf` holds their names (one buffer reused for every table).
fn table(backends: &SortedSet<Backend>, max_table: u32, buf: &mut Vec<u8>) -> FreshTable {
    buf.clear();
    let mut ends = Vec::with_capacity(backends.len());
    for b in backends.iter() {
        write_name(buf, b);
        ends.push(buf.len());
    }
    let names: Vec<&[u8]> = ends
        .iter()
        .scan(0, |start, end| {
            let name = &buf[*start..*end];
            *start = *end;
            Some(name)
        })
        .collect();
    let size = maglev::table_size(backends.len(), max_table);
    let positions = maglev::fresh_positions(&names, size);
    FreshTable { size, positions: Table::of_positions(&positions, backends.len()) }
}
