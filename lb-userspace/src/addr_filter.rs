//! Which addresses the datapath's address pre-filter (`lb_common::addr_filter`) must list.
//!
//! Listing is immediate: the dataplane sets an address's bit before it writes any entry that
//! names it. Unlisting waits. An address that no frontend or backend names any more may
//! still be in live flows: a TCP connection to a removed backend keeps going there, and a
//! removed Service's flows run until they end. So it stays listed until a conntrack GC pass
//! that began `MARGIN` after it left finds no flow acting on it. No flow can start on it
//! after it left (new flows come only from frontend and backend entries), so such a pass
//! sees every flow that could still need it.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use lb_common::abi::Addr;

use crate::reconcile::Applied;

/// Beyond the time an address left: a packet that read the old entries just before may
/// still be creating its flow; a pass must begin after it has.
pub const MARGIN: Duration = Duration::from_secs(1);

/// The addresses the maps name, and those that left lately.
#[derive(Debug, Default)]
pub struct Retention {
    named: BTreeSet<Addr>,
    left: BTreeMap<Addr, Instant>,
}

/// Every address `applied`'s frontends and backends name.
pub fn named(applied: &Applied) -> BTreeSet<Addr> {
    let frontends = applied.services.keys().map(|k| k.addr);
    frontends.chain(applied.backends.values().map(|b| b.addr)).collect()
}

impl Retention {
    /// The maps now name `now_named`; `listed` were listed since the last call (some may
    /// have come and gone in between).
    pub fn synced(&mut self, now_named: BTreeSet<Addr>, listed: &[Addr], now: Instant) {
        for gone in self.named.iter().chain(listed).filter(|a| !now_named.contains(*a)) {
            self.left.insert(*gone, now);
        }
        for back in &now_named {
            self.left.remove(back);
        }
        self.named = now_named;
    }

    /// After a GC pass that began at `pass_began` and found flows acting on `referenced`
    /// (sorted): the addresses to list, every other one may go.
    pub fn after_pass(&mut self, referenced: &[Addr], pass_began: Instant) -> BTreeSet<Addr> {
        self.left.retain(|a, left| referenced.binary_search(a).is_ok() || *left + MARGIN > pass_began);
        let mut keep = self.named.clone();
        keep.extend(self.left.keys());
        keep.extend(referenced);
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(n: u32) -> Addr {
        [0, 0, 0, n]
    }

    /// An address that left stays listed while a flow acts on it, and while no pass that
    /// began a margin after it left has looked; then it goes. One that comes back is named
    /// again and stays.
    #[test]
    fn an_address_leaves_only_after_a_later_pass_finds_no_flow_on_it() {
        let t0 = Instant::now();
        let mut r = Retention::default();
        r.synced([a(1), a(2), a(3)].into(), &[a(1), a(2), a(3)], t0);
        // 4 came and went between two looks.
        r.synced([a(1)].into(), &[a(4)], t0 + Duration::from_secs(10));
        // A pass that began before the margin was over: nothing goes yet.
        let keep = r.after_pass(&[], t0 + Duration::from_secs(10) + MARGIN / 2);
        assert_eq!(keep, [a(1), a(2), a(3), a(4)].into());
        // A later pass: 2 still has a flow, 3 and 4 have none.
        let keep = r.after_pass(&[a(2)], t0 + Duration::from_secs(12));
        assert_eq!(keep, [a(1), a(2)].into());
        // Its flow ended: the next pass lets 2 go.
        let keep = r.after_pass(&[], t0 + Duration::from_secs(22));
        assert_eq!(keep, [a(1)].into());
        // Flows on addresses no entry ever named (a port clash, say) keep them listed too.
        assert_eq!(r.after_pass(&[a(9)], t0 + Duration::from_secs(30)), [a(1), a(9)].into());
        // An address that comes back is named again, whatever the passes find.
        r.synced([a(1), a(3)].into(), &[a(3)], t0 + Duration::from_secs(40));
        assert_eq!(r.after_pass(&[], t0 + Duration::from_secs(50)), [a(1), a(3)].into());
    }
}
