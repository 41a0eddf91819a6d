//! The Maglev tables of a first sync, built by a thread per CPU alongside the (sequential)
//! plan.
//!
//! A first sync of 100 000 Services builds 100 000 tables: about two thirds of the plan's
//! time on one CPU. A fresh table depends only on its backends' names and its size, not on the
//! ids the plan hands out, so each is built ahead as positions in its service's backend list
//! (`maglev::fresh_positions`), packed as the agent keeps tables (`compact_table`), and the
//! plan numbers it once the backends have ids.

use std::{
    io::Write,
    net::IpAddr,
    sync::{
        Condvar, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
};

use lb_common::abi::ServiceKey;

use crate::{
    applied::Applied,
    compact_table::Table,
    maglev,
    model::{Backend, Desired},
    parallel,
    sorted_set::SortedSet,
};

/// A service's table built ahead: per slot, the position of its backend in the service's
/// `backends` (in their set order; `Table::renumbered` gives it the ids). Its size is its
/// length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreshTable {
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

/// Appends `b`'s name to `out`: `ip:port` as `Display` writes them, an IPv4 one digit by
/// digit (the formatter's machinery was a tenth of a first sync's table building).
fn write_name(out: &mut Vec<u8>, b: &Backend) {
    match b.ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                write_decimal(out, octet.into());
            }
            out.push(b':');
            write_decimal(out, b.port.into());
        }
        // (Writing to a Vec cannot fail.)
        IpAddr::V6(_) => {
            let _ = write!(out, "{}:{}", b.ip, b.port);
        }
    }
}

/// `n` in decimal, as `Display` writes it.
fn write_decimal(out: &mut Vec<u8>, n: u32) {
    let mut digits = [0u8; 10];
    let (mut n, mut at) = (n, digits.len());
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Runs `plan` with a source of each service's fresh table, in `desired`'s order: `Some` when
/// none of its frontends is in `applied` (so the plan builds it from nothing). The tables are
/// built alongside the plan by a builder per CPU, in chunks, ahead of it: the plan waits for
/// a chunk a builder is at, and builds one no builder has reached. (A builder per CPU *beside*
/// the plan's thread: with one builder fewer the plan built a fifth of the tables itself and
/// the plan took 530 ms at 100 000 Services instead of 390-410.) Every table is `None` when
/// there are too few or one CPU: the plan then builds every table itself.
pub fn alongside<R>(
    desired: &Desired,
    applied: &Applied,
    max_table: u32,
    plan: impl FnOnce(&mut dyn FnMut() -> Option<FreshTable>) -> R,
) -> R {
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
    let threads = parallel::cpus();
    if threads < 2 || jobs.iter().flatten().count() < PARALLEL_FROM {
        return plan(&mut || None);
    }
    let work = Work {
        chunks: jobs.chunks(CHUNK).map(|_| (Mutex::new(Chunk::Todo), Condvar::new())).collect(),
        jobs,
        next: AtomicUsize::new(0),
        max_table,
    };
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| work.build_ahead());
        }
        let (mut index, mut current) = (0, Vec::new().into_iter());
        plan(&mut || {
            if index % CHUNK == 0 {
                current = work.take(index / CHUNK).into_iter();
            }
            index += 1;
            current.next().flatten()
        })
    })
}

/// Services per chunk of tables: a few milliseconds of work, so the threads seldom meet.
const CHUNK: usize = 256;

enum Chunk {
    Todo,
    Building,
    Done(Vec<Option<FreshTable>>),
    Taken,
}

/// The tables to build, in chunks that the builders and the plan claim.
struct Work<'a> {
    jobs: Vec<Option<&'a SortedSet<Backend>>>,
    chunks: Vec<(Mutex<Chunk>, Condvar)>,
    /// The next chunk a builder looks at.
    next: AtomicUsize,
    max_table: u32,
}

impl Work<'_> {
    fn lock(&self, k: usize) -> MutexGuard<'_, Chunk> {
        self.chunks[k].0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn build(&self, k: usize, names: &mut Vec<u8>) -> Vec<Option<FreshTable>> {
        let jobs = self.jobs.chunks(CHUNK).nth(k).unwrap_or_default();
        jobs.iter().map(|j| j.map(|b| table(b, self.max_table, names))).collect()
    }

    /// A builder: each chunk no one has claimed yet, in order.
    fn build_ahead(&self) {
        let mut names = Vec::new();
        loop {
            let k = self.next.fetch_add(1, Ordering::Relaxed);
            if k >= self.chunks.len() {
                return;
            }
            let mut chunk = self.lock(k);
            if !matches!(*chunk, Chunk::Todo) {
                continue;
            }
            *chunk = Chunk::Building;
            drop(chunk);
            // Should the build panic, the chunk goes back to `Todo` for the plan to build
            // (and meet the panic itself) instead of waiting for it for ever.
            let mut guard = Claimed { work: self, k, built: None };
            guard.built = Some(self.build(k, &mut names));
        }
    }

    /// Chunk `k`'s tables, for the plan: built by a builder (waiting for it if it is at it),
    /// or here when no one has started it.
    fn take(&self, k: usize) -> Vec<Option<FreshTable>> {
        let mut chunk = self.lock(k);
        loop {
            match std::mem::replace(&mut *chunk, Chunk::Taken) {
                Chunk::Done(tables) => return tables,
                Chunk::Todo | Chunk::Taken => {
                    drop(chunk);
                    return self.build(k, &mut Vec::new());
                }
                Chunk::Building => {
                    *chunk = Chunk::Building;
                    chunk = self.chunks[k].1.wait(chunk).unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }
}

/// A chunk a builder is at: when dropped, it is `Done` with what was built, or `Todo` again.
struct Claimed<'w, 'a> {
    work: &'w Work<'a>,
    k: usize,
    built: Option<Vec<Option<FreshTable>>>,
}

impl Drop for Claimed<'_, '_> {
    fn drop(&mut self) {
        *self.work.lock(self.k) = match self.built.take() {
            Some(tables) => Chunk::Done(tables),
            None => Chunk::Todo,
        };
        self.work.chunks[self.k].1.notify_all();
    }
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
    FreshTable { positions: Table::of_positions(&positions, backends.len()) }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    #[test]
    fn a_backend_is_named_as_display_writes_it() {
        // The name decides its slots: every node and release must write the same bytes.
        let ips =
            ["0.0.0.0", "198.18.0.1", "255.255.255.255", "10.200.7.99", "2001:2::1", "::ffff:198.18.0.1"];
        for (ip, port) in ips.iter().flat_map(|ip| [0u16, 7, 80, 9376, 65_535].map(|p| (ip, p))) {
            let b = Backend { ip: ip.parse().unwrap(), port, local: false, terminating: false };
            assert_eq!(String::from_utf8(name(&b)).unwrap(), format!("{}:{port}", b.ip));
        }
    }

    #[test]
    fn the_plan_takes_chunks_built_ahead_and_builds_those_no_builder_reached() {
        let sets: Vec<SortedSet<Backend>> = (0..3 * CHUNK as u32)
            .map(|i| {
                (1..=4)
                    .map(|k| Backend {
                        ip: IpAddr::V4(Ipv4Addr::from(0xc612_0000 + i * 8 + k)),
                        port: 8080,
                        local: false,
                        terminating: false,
                    })
                    .collect()
            })
            .collect();
        let mut jobs: Vec<Option<&SortedSet<Backend>>> = sets.iter().map(Some).collect();
        jobs[5] = None;
        let work = Work {
            chunks: (0..3).map(|_| (Mutex::new(Chunk::Todo), Condvar::new())).collect(),
            jobs,
            // A builder that starts at the second chunk: the first is left to the plan.
            next: AtomicUsize::new(1),
            max_table: 65_537,
        };
        work.build_ahead();
        assert!(matches!(*work.lock(0), Chunk::Todo));
        assert!(matches!(*work.lock(2), Chunk::Done(_)));
        let taken: Vec<Option<FreshTable>> = (0..3).flat_map(|k| work.take(k)).collect();
        let expected: Vec<Option<FreshTable>> =
            work.jobs.iter().map(|j| j.map(|b| table(b, 65_537, &mut Vec::new()))).collect();
        assert_eq!(taken, expected);
        assert_eq!(taken[5], None);
        assert_eq!(taken[7].as_ref().map(|t| t.positions.len()), Some(401));
    }
}
