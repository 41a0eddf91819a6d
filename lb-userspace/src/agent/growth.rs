//! Maps that grow when full (`--max-backends` and `--max-maglev-slots` `auto`, the
//! defaults). The kernel preallocates the Maglev array and the backend arrays whole, so
//! sizing them for the largest cluster would cost every node ~200 MB whatever it runs. They
//! start at their default size instead; when a full plan (the first sync of a large
//! cluster) needs more than they hold, or a sync skips Services because one of them is
//! full, the agent loads the datapath again with it larger, as an upgrade does (`pins`):
//! the entries are copied into the new maps, the programs swap atomically into their links,
//! what the old programs wrote meanwhile is copied again, and the Services are planned once
//! more. The flow table is not touched, so no connection notices. Growing before the first
//! plan saves writing the Services that fit only to plan them all again (at 100 000
//! Services on the default sizes, seconds and the second plan's peak memory).

use std::{collections::HashSet, net::IpAddr, time::Instant};

use super::{Agent, log, sync::Needs};
use crate::{
    loader::{BpfLog, Capacities},
    maglev,
    model::{Desired, ServiceRef},
    reconcile::{Applied, Limits, PlanError},
};

/// `--max-backends` / `--max-maglev-slots`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapSize {
    /// This size: a Service that does not fit is skipped (and reported).
    Fixed(u32),
    /// Starts at this size (or the size pinned by an earlier agent, if larger) and grows.
    Auto(u32),
}

impl MapSize {
    /// `N`, `auto` (starting at `default`) or `auto:N`.
    pub fn parse(s: &str, default: u32) -> Result<Self, String> {
        let number = |n: &str| n.parse::<u32>().map_err(|e| format!("{n:?}: {e} (want N, auto or auto:N)"));
        match s.strip_prefix("auto") {
            Some("") => Ok(MapSize::Auto(default)),
            Some(rest) => match rest.strip_prefix(':') {
                Some(n) => Ok(MapSize::Auto(number(n)?.max(1))),
                None => Err(format!("{s:?}: want N, auto or auto:N")),
            },
            None => Ok(MapSize::Fixed(number(s)?)),
        }
    }

    pub fn size(self) -> u32 {
        match self {
            MapSize::Fixed(n) | MapSize::Auto(n) => n,
        }
    }

    pub fn grows(self) -> bool {
        matches!(self, MapSize::Auto(_))
    }
}

/// The largest sizes growth goes to: 1 GiB of Maglev slots (about 650 000 Services of 4
/// endpoints), 4 Mi backend ids. Past them a Service is skipped as with a fixed size.
pub const AUTO_MAX_MAGLEV_SLOTS: u32 = 1 << 28;
pub const AUTO_MAX_BACKENDS: u32 = 1 << 22;

/// Which of the two maps may grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Growable {
    pub backends: bool,
    pub maglev_slots: bool,
}

/// The capacities to start with: a growable map keeps the size an earlier agent grew it to
/// (shrinking it would not hold its entries).
pub fn at_start(caps: Capacities, growable: Growable, pin_dir: &std::path::Path) -> Capacities {
    use lb_common::maps;
    let pinned = |name| crate::pins::pinned_max_entries(pin_dir, name).unwrap_or(0);
    let mut c = caps;
    if growable.backends {
        c.backends = c.backends.max(pinned(maps::BACKENDS));
    }
    if growable.maglev_slots {
        c.maglev_slots =
            c.maglev_slots.max(pinned(maps::MAGLEV).saturating_mul(maps::MAGLEV_SLOTS_PER_ENTRY));
    }
    c
}

/// The capacities that would let the `skipped` Services fit, if a growable map is what
/// kept them out: each map short of room grows to what is in use plus what they need, an
/// eighth to spare, and at least double (so a stream of new Services reloads the datapath
/// a handful of times, not once per sync). None: growing would not help.
pub fn wanted<'a>(
    caps: &Capacities,
    growable: Growable,
    desired: &Desired,
    applied: &Applied,
    skipped: impl Iterator<Item = (&'a ServiceRef, &'a PlanError)>,
) -> Option<Capacities> {
    if !growable.backends && !growable.maglev_slots {
        return None;
    }
    let (mut short_of_slots, mut short_of_ids) = (false, false);
    let (mut slots_needed, mut fresh) = (0u64, HashSet::<(IpAddr, u16)>::new());
    for (sref, e) in skipped {
        match e {
            PlanError::MaglevFull(_) => short_of_slots = true,
            PlanError::BackendsFull(_) => short_of_ids = true,
            _ => continue,
        }
        let Some(s) = desired.services.get(sref) else { continue };
        slots_needed += u64::from(maglev::table_size(s.backends.len(), lb_common::maglev::DEFAULT_MAX_TABLE));
        let new = s.backends.iter().chain(&s.kept).map(|b| (b.ip, b.port));
        fresh.extend(new.filter(|a| !applied.index.by_addr.contains_key(a)));
    }
    let q = &applied.index.quarantine;
    let slots_used: u64 = applied.tables.values().map(|t| u64::from(t.len())).sum::<u64>()
        + q.ranges.iter().map(|(_, _, len)| u64::from(*len)).sum::<u64>();
    let ids_used = (applied.backends.len() + q.backend_ids.len()) as u64;
    let slots =
        grown(caps.maglev_slots, slots_used + slots_needed, short_of_slots, AUTO_MAX_MAGLEV_SLOTS, 1 << 16)
            .filter(|_| growable.maglev_slots);
    let ids = grown(caps.backends, ids_used + fresh.len() as u64, short_of_ids, AUTO_MAX_BACKENDS, 1 << 10)
        .filter(|_| growable.backends);
    if slots.is_none() && ids.is_none() {
        return None;
    }
    Some(Capacities {
        maglev_slots: slots.unwrap_or(caps.maglev_slots),
        backends: ids.unwrap_or(caps.backends),
        ..*caps
    })
}

/// The capacities a full plan of `needs` wants, if a growable map is too small for it. None:
/// they fit (or cannot grow): the plan goes ahead, and what does not fit is skipped.
pub fn before_plan(caps: &Capacities, growable: Growable, needs: &Needs) -> Option<Capacities> {
    let slots = grown(caps.maglev_slots, needs.maglev_slots, false, AUTO_MAX_MAGLEV_SLOTS, 1 << 16)
        .filter(|_| growable.maglev_slots);
    let ids =
        grown(caps.backends, needs.backends, false, AUTO_MAX_BACKENDS, 1 << 10).filter(|_| growable.backends);
    if slots.is_none() && ids.is_none() {
        return None;
    }
    Some(Capacities {
        maglev_slots: slots.unwrap_or(caps.maglev_slots),
        backends: ids.unwrap_or(caps.backends),
        ..*caps
    })
}

/// A map of `size` that must hold `want` (or was found `short`, its room held back or cut
/// up): its new size, a multiple of `align` up to `ceiling`; None if it need not or cannot
/// grow.
fn grown(size: u32, want: u64, short: bool, ceiling: u32, align: u32) -> Option<u32> {
    if !short && want <= u64::from(size) {
        return None;
    }
    let target = (want + want / 8).max(u64::from(size) * 2).next_multiple_of(u64::from(align));
    let new = target.min(u64::from(ceiling)) as u32;
    (new > size).then_some(new)
}

/// How long a failed growth waits before it is tried again (each try loads the datapath).
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

impl Agent {
    /// Whether growing is held off: it failed less than `RETRY_AFTER` ago.
    pub(super) fn growth_held_off(&self) -> bool {
        self.growth_failed.is_some_and(|t| t.elapsed() < RETRY_AFTER)
    }

    /// After a sync that skipped Services: grows the maps that kept them out, if they may.
    pub(super) fn grow_if_full(&mut self) {
        if self.growth_held_off() {
            return;
        }
        let caps = self.cfg.capacities;
        let (desired, applied) = (self.syncer.desired(), self.syncer.applied());
        if let Some(want) = wanted(&caps, self.cfg.growable, desired, applied, self.syncer.retry().skipped())
        {
            self.grow(want, "Services did not fit");
        }
    }

    /// Loads the datapath again with the maps at `want`'s sizes (`why` for the log); a
    /// failure leaves the old maps serving and holds growth off for `RETRY_AFTER`.
    pub(super) fn grow(&mut self, want: Capacities, why: &str) {
        let caps = self.cfg.capacities;
        let mut what = Vec::new();
        if want.maglev_slots != caps.maglev_slots {
            what.push(format!("Maglev array {} -> {} slots", caps.maglev_slots, want.maglev_slots));
        }
        if want.backends != caps.backends {
            what.push(format!("backend maps {} -> {} entries", caps.backends, want.backends));
        }
        log(format!(
            "growing the {}: {why}; loading the datapath again with the larger maps (flows and entries kept)",
            what.join(", ")
        ));
        let t0 = Instant::now();
        match self.reload(want) {
            Ok(copied) => {
                self.growth_failed = None;
                self.metrics.maps_grown.inc();
                log(format!(
                    "maps grown in {} ms ({copied} entries the programs wrote meanwhile copied again); the Services are planned again",
                    t0.elapsed().as_millis()
                ));
            }
            Err(e) => {
                self.growth_failed = Some(Instant::now());
                log(format!(
                    "warning: growing the maps failed: {e:#}; the old maps serve on, the Services stay skipped (tried again in {} s)",
                    RETRY_AFTER.as_secs()
                ));
            }
        }
    }

    /// Loads the datapath with `caps` (the pinned maps of another size migrated), moves
    /// every attachment to it, and plans everything again against the new maps.
    fn reload(&mut self, caps: Capacities) -> anyhow::Result<usize> {
        let mut cfg = self.cfg.clone();
        cfg.capacities = caps;
        let (mut ebpf, dp, applied, migration) = super::load(&cfg)?;
        if cfg.bpf_log != BpfLog::Off {
            super::bpf_messages::start(&mut ebpf, cfg.bpf_log);
        }
        self.attachments.swap_in(ebpf, &cfg, &self.status);
        // The new programs run on the new maps from here: so does the agent, whatever the
        // last copy does.
        self.dp = dp;
        self.cfg = cfg;
        self.syncer.reloaded(applied, Limits::of(&caps));
        match migration.finish() {
            Ok(copied) => Ok(copied),
            Err(e) => {
                // The old pins stay aside; the next start copies them again.
                log(format!("warning: finishing the pinned-map migration: {e}"));
                Ok(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_fixed_auto_or_auto_from() {
        assert_eq!(MapSize::parse("4096", 7), Ok(MapSize::Fixed(4096)));
        assert_eq!(MapSize::parse("auto", 7), Ok(MapSize::Auto(7)));
        assert_eq!(MapSize::parse("auto:64", 7), Ok(MapSize::Auto(64)));
        assert!(MapSize::parse("auto64", 7).is_err());
        assert!(MapSize::parse("auto:", 7).is_err());
        assert!(MapSize::parse("big", 7).is_err());
    }

    /// Before a full plan: a growable map smaller than the need grows to it plus an eighth
    /// (or double); a map that holds it, or a fixed one, stays.
    #[test]
    fn a_full_plan_grows_only_the_growable_maps_it_outgrows() {
        let caps = Capacities { maglev_slots: 8 << 20, backends: 1 << 18, ..Capacities::default() };
        let both = Growable { backends: true, maglev_slots: true };
        let needs = Needs { maglev_slots: 40 << 20, backends: 100_000 };
        let want = before_plan(&caps, both, &needs).expect("the Maglev array is short");
        assert_eq!((want.maglev_slots, want.backends), (45 << 20, 1 << 18));
        let fixed = Growable { backends: true, maglev_slots: false };
        assert_eq!(before_plan(&caps, fixed, &needs), None);
        let fits = Needs { maglev_slots: 8 << 20, backends: 1 << 18 };
        assert_eq!(before_plan(&caps, both, &fits), None);
        let ids = before_plan(&caps, both, &Needs { backends: 400_000, ..fits }).unwrap();
        assert_eq!((ids.maglev_slots, ids.backends), (8 << 20, 524_288));
    }

    #[test]
    fn a_short_map_grows_to_its_need_with_room_or_doubles() {
        // Needing 40M slots of an 8M array: 45M, aligned.
        assert_eq!(grown(8 << 20, 40 << 20, true, 1 << 28, 1 << 16), Some(45 << 20));
        // A little short: doubled.
        assert_eq!(grown(1000, 1001, true, 1 << 28, 1), Some(2000));
        // Room enough and not found short: stays.
        assert_eq!(grown(1000, 1000, false, 1 << 28, 1), None);
        // Found short although the count fits (room held back, cut up): doubled.
        assert_eq!(grown(1000, 10, true, 1 << 28, 1), Some(2000));
        // At the ceiling: no growth.
        assert_eq!(grown(1 << 28, 1 << 29, true, 1 << 28, 1), None);
        assert_eq!(grown(3 << 26, 1 << 29, true, 1 << 28, 1), Some(1 << 28));
    }
}
