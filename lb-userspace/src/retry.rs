//! Services the last plans could not program, and when to try them again.
//!
//! A service skipped by the planner (a map at its capacity) keeps what the maps hold of it;
//! everything else is applied. The skipped ones are planned again with exponential backoff
//! and jitter, so a node at a limit does not spin on the same failure, while a change that
//! touches one of them is planned at once. Their log lines are rate-limited: a failure is
//! logged when it first happens or changes, and otherwise once a minute.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::{
    model::{Delta, Desired, DesiredService, ServiceRef},
    reconcile::PlanError,
};

/// The first retry comes after this; each further failure doubles it, up to `MAX_BACKOFF`.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often a failure that did not change is logged again.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct Retry {
    /// Each skipped service, with the version of it the maps hold (`None`: not programmed, or
    /// unknown after a full plan).
    services: BTreeMap<ServiceRef, Option<DesiredService>>,
    /// Endpoints the Model let go of while a skipped service's maps still used them.
    gone: BTreeSet<(IpAddr, u16)>,
    /// A full plan is owed: the last one failed, or a map write did.
    full: bool,
    /// Failed attempts in a row, for the backoff.
    attempts: u32,
    next: Option<Instant>,
    /// The error last logged for each service, and when.
    logged: BTreeMap<ServiceRef, (PlanError, Instant)>,
    /// Jitter state (xorshift; the spread matters, not its quality).
    seed: u64,
}

/// Services named one by one per sync in each kind of line (skipped, programmed now): a map
/// full at 100 000 Services must not write 80 000 lines.
const LINES_EACH: usize = 10;

impl Retry {
    pub fn new() -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Retry { seed: nanos.as_nanos() as u64 | 1, ..Default::default() }
    }

    /// Nothing is owed.
    pub fn is_empty(&self) -> bool {
        !self.full && self.services.is_empty()
    }

    /// The skipped services.
    pub fn skipped(&self) -> impl Iterator<Item = (&ServiceRef, &PlanError)> {
        self.logged.iter().filter(|(s, _)| self.services.contains_key(*s)).map(|(s, (e, _))| (s, e))
    }

    pub fn skipped_count(&self) -> usize {
        self.services.len()
    }

    /// Whether the next try is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        !self.is_empty() && self.next.is_none_or(|t| now >= t)
    }

    /// When the next try is due, if anything is owed.
    pub fn next(&self) -> Option<Instant> {
        if self.is_empty() { None } else { self.next }
    }

    /// Brings the next try forward to `t` at the latest: room held back for a moment (the
    /// reconciler's quarantine) is free then, and waiting out a backoff would only add delay.
    pub fn no_later_than(&mut self, t: Instant) {
        if !self.is_empty() {
            self.next = Some(self.next.map_or(t, |n| n.min(t)));
        }
    }

    /// A full plan is owed (after a map write failed).
    pub fn owe_full(&mut self) {
        self.full = true;
    }

    /// Prepares `delta` for planning. A skipped service it names is planned against the
    /// version the maps hold, not the one that failed. When the retry is `due`, the skipped
    /// services and the endpoints they held back join it (those no service uses any more),
    /// or, when a full plan is owed, the delta becomes a full one.
    pub fn prepare(&mut self, delta: &mut Delta, due: bool, in_use: impl Fn(&(IpAddr, u16)) -> bool) {
        for (sref, old) in delta.services.iter_mut() {
            if let Some(held) = self.services.get(sref) {
                *old = held.clone();
            }
        }
        if !due {
            return;
        }
        if self.full {
            delta.all = true;
        }
        for (sref, held) in &self.services {
            delta.services.entry(sref.clone()).or_insert_with(|| held.clone());
        }
        delta.backends_gone.extend(self.gone.iter().filter(|a| !in_use(a)).copied());
    }

    /// Records the outcome of planning `delta` (already prepared) for `desired`: `failed` are
    /// the services skipped, `ok` whether the map writes went through. Returns the log lines
    /// to print.
    pub fn settle(
        &mut self,
        desired: &Desired,
        delta: &Delta,
        failed: &[(ServiceRef, PlanError)],
        ok: bool,
        now: Instant,
    ) -> Vec<String> {
        let mut lines = Vec::new();
        if !ok {
            self.full = true;
        } else if delta.all {
            self.full = false;
        }
        let failed_now: BTreeMap<&ServiceRef, &PlanError> = failed.iter().map(|(s, e)| (s, e)).collect();
        // Planned services that went through are no longer owed.
        let planned: Vec<ServiceRef> = if delta.all {
            self.services.keys().cloned().collect()
        } else {
            delta.services.keys().filter(|s| self.services.contains_key(*s)).cloned().collect()
        };
        let mut programmed = 0;
        for sref in planned {
            if ok && !failed_now.contains_key(&sref) {
                self.services.remove(&sref);
                if self.logged.remove(&sref).is_some() {
                    programmed += 1;
                    if programmed <= LINES_EACH {
                        lines.push(format!("{sref}: programmed now"));
                    }
                }
            }
        }
        if programmed > LINES_EACH {
            lines.push(format!("... and {} more programmed now", programmed - LINES_EACH));
        }
        let mut said = 0;
        for (sref, e) in &failed_now {
            // The maps still hold the version they held before this plan. A full plan keeps
            // only the entries of the version it was given.
            let held = if delta.all {
                desired.services.get(*sref).cloned()
            } else {
                delta.services.get(*sref).cloned().flatten()
            };
            self.services.entry((*sref).clone()).or_insert(held);
            let repeat = matches!(self.logged.get(*sref), Some((last, at)) if last == *e && now.duration_since(*at) < LOG_EVERY);
            if !repeat {
                said += 1;
                if said <= LINES_EACH {
                    lines.push(format!(
                        "error: {sref} not programmed: {e}; the rest is applied, its maps keep what they held"
                    ));
                }
                self.logged.insert((*sref).clone(), ((*e).clone(), now));
            }
        }
        if said > LINES_EACH {
            lines.push(format!(
                "error: ... and {} more not programmed (`lb status` and lb_service_unprogrammed list them all)",
                said - LINES_EACH
            ));
        }
        self.gone.extend(delta.backends_gone.iter().copied());
        if self.services.is_empty() {
            self.gone.clear();
        }
        if self.is_empty() {
            self.attempts = 0;
            self.next = None;
        } else if failed.is_empty() && ok && !self.due(now) {
            // This plan did not touch the owed services: their timer runs on.
        } else {
            self.attempts = self.attempts.saturating_add(1);
            let wait = self.backoff();
            self.next = Some(now + wait);
            if !lines.is_empty() {
                lines.push(format!("next try in {:.1} s", wait.as_secs_f64()));
            }
        }
        lines
    }

    /// `FIRST_BACKOFF` doubled per failed attempt, capped, times a random 0.75–1.25.
    fn backoff(&mut self) -> Duration {
        let base =
            FIRST_BACKOFF.saturating_mul(1 << self.attempts.saturating_sub(1).min(16)).min(MAX_BACKOFF);
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let jitter = 0.75 + (self.seed % 1000) as f64 / 2000.0;
        base.mul_f64(jitter)
    }
}

#[cfg(test)]
#[path = "retry_tests.rs"]
mod tests;
