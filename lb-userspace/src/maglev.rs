//! Maglev lookup-table builder (Eisenbud et al., NSDI '16, §3.4).
//!
//! Each backend gets a permutation of the M slots from two hashes of its name; backends take
//! turns claiming their next free preferred slot until the table is full, so every backend
//! gets M/N ± 1 slots.
//!
//! Plain Maglev moves more than the removed backend's share when the set changes (measured
//! here at M ≈ 100·N: 1.1× the ideal at N = 5, 1.25× at N = 10, 2× at N = 50), because the
//! turn order shifts for every later slot. `rebuild` therefore starts from the table the
//! datapath holds: slots whose backend is still there and under its quota stay put, and only
//! the freed slots are refilled by the same turn-taking. Removing one of N backends then moves
//! exactly its slots (1/N), adding one moves exactly the newcomer's quota, and balance stays
//! M/N ± 1. The result depends on the previous table; a fresh start (`build`) is plain
//! Maglev and the same on every node.

use lb_common::maglev::SLOTS_PER_BACKEND;

/// Smallest prime >= `n`.
pub fn next_prime(n: u32) -> u32 {
    let mut c = n.max(2);
    while !is_prime(c) {
        c += 1;
    }
    c
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d * d <= n as u64 {
        if (n as u64).is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Table size for `backends` backends: the smallest prime >= 100 x N, bounded by the largest
/// prime <= `max_size`. 0 with no backends.
pub fn table_size(backends: usize, max_size: u32) -> u32 {
    if backends == 0 {
        return 0;
    }
    let want = (backends as u64 * SLOTS_PER_BACKEND as u64).min(max_size as u64) as u32;
    let p = next_prime(want);
    if p <= max_size { p } else { (2..=max_size).rev().find(|&c| is_prime(c)).unwrap_or(2) }
}

/// 64-bit FNV-1a with a murmur3 finaliser: stable across Rust releases and machines, so a
/// restarted agent (or another node) builds the identical table.
fn name_hash(name: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in name {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Builds a table of `size` slots (a prime) over `backends` (`(id, stable name)`), returning
/// the backend id of every slot. Backends are sorted by name first, so the input order does
/// not matter.
pub fn build(backends: &[(u32, Vec<u8>)], size: u32) -> Vec<u32> {
    rebuild(None, backends, size)
}

/// Like `build`, but keeps every slot of `previous` (same size) whose backend remains, up to
/// each backend's fair quota: minimal disruption when the backend set changes.
pub fn rebuild(previous: Option<&[u32]>, backends: &[(u32, Vec<u8>)], size: u32) -> Vec<u32> {
    let names: Vec<&[u8]> = backends.iter().map(|(_, name)| name.as_slice()).collect();
    let ids: Vec<u32> = backends.iter().map(|(id, _)| *id).collect();
    positions(previous.map(|p| (p, ids.as_slice())), &names, size)
        .into_iter()
        .map(|i| ids[i as usize])
        .collect()
}

/// A fresh table (`build`) as positions in `names` instead of ids: it can be built before
/// the backends have ids (the planner builds the new tables of a first sync on every CPU,
/// then numbers them).
pub fn fresh_positions(names: &[&[u8]], size: u32) -> Vec<u32> {
    positions(None, names, size)
}

/// One backend's turn state: its permutation (`next` slot to try, stepped by `skips[0]`;
/// `skips` holds that step's first four multiples mod M), its fair quota and the slots it
/// has. One vector of these instead of one per field: a first sync builds 100 000 tables,
/// and their allocations were a fifth of the time.
struct Turn {
    index: u32,
    next: u64,
    skips: [u64; 4],
    quota: u32,
    count: u32,
}

/// The table over `names` as each slot's position in `names`. `previous`: the table the
/// datapath holds and the ids of `names` in order, to keep what it can of it.
fn positions(previous: Option<(&[u32], &[u32])>, names: &[&[u8]], size: u32) -> Vec<u32> {
    if names.is_empty() || size == 0 {
        return Vec::new();
    }
    let m = size as u64;
    let n = names.len() as u32;
    let mut turns: Vec<Turn> = (0..n)
        .map(|index| {
            let name = names[index as usize];
            let skip = if m > 1 { name_hash(name, 0x7f4a_7c15) % (m - 1) + 1 } else { 1 };
            let skips = [skip, (2 * skip) % m, (3 * skip) % m, (4 * skip) % m];
            Turn { index, next: name_hash(name, 0x9e37_79b9) % m, skips, quota: 0, count: 0 }
        })
        .collect();
    // Turns go by name, so the input order does not matter. Fair quotas: M/N each, the first
    // M mod N backends (by name) one more.
    turns.sort_by(|a, b| names[a.index as usize].cmp(names[b.index as usize]));
    for (rank, t) in turns.iter_mut().enumerate() {
        t.quota = size / n + u32::from((rank as u32) < size % n);
    }
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0usize;
    if let Some((prev, ids)) = previous.filter(|(p, _)| p.len() == size as usize) {
        let rank_of: std::collections::HashMap<u32, usize> =
            turns.iter().enumerate().map(|(rank, t)| (ids[t.index as usize], rank)).collect();
        for (slot, id) in prev.iter().enumerate() {
            if let Some(&rank) = rank_of.get(id)
                && turns[rank].count < turns[rank].quota
            {
                table[slot] = turns[rank].index;
                turns[rank].count += 1;
                filled += 1;
            }
        }
    }
    // Each backend's next candidate slot, `(offset + j * skip) mod m` for its j-th try, is
    // stepped by adds and compares instead of a division per probe (skip < m). Four tries are
    // looked at per step, each one add from the first, so they do not wait on each other:
    // most tries are made near the end of the fill, where a backend passes many taken slots
    // (about 6.6 tries per slot at 4 backends). 15-20 % less time per table than one try per
    // step, with the same result (tested against the paper's definition).
    let add = |p: u64, k: u64| if p + k >= m { p + k - m } else { p + k };
    'fill: while filled < size as usize {
        for t in turns.iter_mut() {
            if t.count >= t.quota {
                continue;
            }
            let [s1, s2, s3, s4] = t.skips;
            let mut c = t.next;
            let claimed = loop {
                let tries = [c, add(c, s1), add(c, s2), add(c, s3)];
                let free = tries.map(|p| table[p as usize] == u32::MAX);
                let mask = free.iter().enumerate().fold(0u32, |m, (i, f)| m | (u32::from(*f) << i));
                if mask != 0 {
                    break tries[mask.trailing_zeros() as usize];
                }
                c = add(c, s4);
            };
            table[claimed as usize] = t.index;
            t.next = add(claimed, s1);
            t.count += 1;
            filled += 1;
            if filled == size as usize {
                break 'fill;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn backends(n: u32) -> Vec<(u32, Vec<u8>)> {
        (1..=n).map(|i| (i, format!("198.18.1.{i}:9376").into_bytes())).collect()
    }

    /// The population as the paper writes it (a division per probe), kept to check that the
    /// stepped version builds the very same tables: other nodes and restarted agents must.
    fn by_definition(previous: Option<&[u32]>, backends: &[(u32, Vec<u8>)], size: u32) -> Vec<u32> {
        let mut sorted: Vec<&(u32, Vec<u8>)> = backends.iter().collect();
        sorted.sort_by(|a, b| a.1.cmp(&b.1));
        let m = size as u64;
        let perms: Vec<(u64, u64)> = sorted
            .iter()
            .map(|(_, name)| {
                let skip = if m > 1 { name_hash(name, 0x7f4a_7c15) % (m - 1) + 1 } else { 1 };
                (name_hash(name, 0x9e37_79b9) % m, skip)
            })
            .collect();
        let n = sorted.len() as u32;
        let quota: Vec<u32> = (0..n).map(|i| size / n + u32::from(i < size % n)).collect();
        let (mut next, mut count) = (vec![0u64; sorted.len()], vec![0u32; sorted.len()]);
        let mut table = vec![u32::MAX; size as usize];
        let mut filled = 0usize;
        if let Some(prev) = previous {
            for (slot, id) in prev.iter().enumerate() {
                if let Some(i) = sorted.iter().position(|(b, _)| b == id)
                    && count[i] < quota[i]
                {
                    table[slot] = *id;
                    count[i] += 1;
                    filled += 1;
                }
            }
        }
        'fill: while filled < size as usize {
            for (i, (offset, skip)) in perms.iter().enumerate() {
                if count[i] >= quota[i] {
                    continue;
                }
                let mut c = (offset + next[i] * skip) % m;
                while table[c as usize] != u32::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                table[c as usize] = sorted[i].0;
                next[i] += 1;
                count[i] += 1;
                filled += 1;
                if filled == size as usize {
                    break 'fill;
                }
            }
        }
        table
    }

    #[test]
    fn stepping_builds_the_tables_the_definition_does() {
        for n in [1u32, 2, 3, 4, 7, 10, 50] {
            let all = backends(n);
            let size = table_size(n as usize, 65_537);
            let fresh = rebuild(None, &all, size);
            assert_eq!(fresh, by_definition(None, &all, size), "{n} backends");
            // One gone, one new: the previous table's slots kept as the definition keeps them.
            let mut changed: Vec<(u32, Vec<u8>)> = all.iter().skip(1).cloned().collect();
            changed.push((1000, b"198.18.9.9:9376".to_vec()));
            assert_eq!(
                rebuild(Some(&fresh), &changed, size),
                by_definition(Some(&fresh), &changed, size),
                "{n} backends, one replaced"
            );
        }
    }

    #[test]
    fn size_is_smallest_prime_at_least_100n_and_bounded() {
        assert_eq!(table_size(0, 65_537), 0);
        assert_eq!(table_size(1, 65_537), 101);
        assert_eq!(table_size(3, 65_537), 307);
        assert_eq!(table_size(10, 65_537), 1009);
        assert_eq!(table_size(1000, 65_537), 65_537);
        assert_eq!(table_size(1000, 1000), 997);
    }

    #[test]
    fn no_holes_and_deterministic() {
        for n in [1, 2, 3, 7, 50] {
            let m = table_size(n as usize, 65_537);
            let t = build(&backends(n), m);
            assert_eq!(t.len(), m as usize);
            assert!(t.iter().all(|&id| (1..=n).contains(&id)));
            let mut rev = backends(n);
            rev.reverse();
            assert_eq!(t, build(&rev, m), "input order must not matter");
        }
    }

    #[test]
    fn each_share_within_one_percent_of_ideal() {
        for n in [2u32, 3, 5, 10, 33, 100] {
            let m = table_size(n as usize, 65_537);
            let t = build(&backends(n), m);
            let mut count: HashMap<u32, u32> = HashMap::new();
            for id in &t {
                *count.entry(*id).or_default() += 1;
            }
            let ideal = m as f64 / n as f64;
            for id in 1..=n {
                let got = count[&id] as f64;
                assert!(
                    (got - ideal).abs() / ideal <= 0.01 + 1.0 / ideal,
                    "n={n} id={id} got={got} ideal={ideal}"
                );
            }
        }
    }

    #[test]
    fn removing_one_backend_remaps_at_most_1_1_over_n() {
        for n in [3u32, 5, 10, 20, 50, 100] {
            let m = table_size(n as usize, 65_537);
            let before = build(&backends(n), m);
            for gone in [1, n / 2 + 1, n] {
                let rest: Vec<_> = backends(n).into_iter().filter(|(id, _)| *id != gone).collect();
                let after = rebuild(Some(&before), &rest, m);
                assert!(!after.contains(&gone));
                let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
                let ratio = moved as f64 / m as f64;
                assert!(
                    ratio <= 1.1 / n as f64,
                    "n={n} gone={gone} moved {ratio:.4} > {:.4}",
                    1.1 / n as f64
                );
            }
        }
    }

    #[test]
    fn adding_one_backend_remaps_at_most_its_share_and_stays_balanced() {
        for n in [2u32, 4, 9, 30] {
            let m = table_size(n as usize + 1, 65_537);
            let before = build(&backends(n), m);
            let after = rebuild(Some(&before), &backends(n + 1), m);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            assert!(moved as f64 / m as f64 <= 1.1 / (n + 1) as f64, "n={n} moved {moved} of {m}");
            for id in 1..=n + 1 {
                let c = after.iter().filter(|x| **x == id).count() as u32;
                assert!(c == m / (n + 1) || c == m / (n + 1) + 1, "id {id} has {c}");
            }
        }
    }

    #[test]
    fn rebuild_with_a_foreign_table_size_starts_fresh() {
        let t = build(&backends(3), 307);
        assert_eq!(rebuild(Some(&t[..100]), &backends(3), 307), t);
    }
}
