//! One sync: what the source changed, through the Model and the planner, into the maps.
//! Kept apart from the loop that calls it (timers, links, HTTP) so that it can be tested
//! on its own against `FakeDataplane`, failures and retries included.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::abi::{Addr, Config, addr_from_ip};

use super::log;
use crate::{
    dataplane::{Dataplane, DataplaneError},
    logging,
    model::{self, Changes, Desired, NodeContext},
    reconcile::{self, Applied, Limits, PlanError},
    retry::Retry,
    source::ChangeSource,
};

/// What one sync did.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub took: Duration,
    /// The map writes went through (else the next plan is a full one, against the maps as
    /// they are read back).
    pub written: bool,
    /// Map writes planned.
    pub writes: usize,
    /// Services the planner skipped this time (a map at its capacity).
    pub skipped: usize,
    /// Nothing is owed any more: every change is in the maps.
    pub settled: bool,
    /// Services and EndpointSlices the source reported changed.
    pub service_changes: usize,
    pub endpoint_changes: usize,
    /// A planned Service came, went or changed its frontends, so the frontends' names may
    /// have changed (an endpoint change alone leaves them).
    pub frontends_touched: bool,
    /// The datapath configuration was rewritten.
    pub config_written: bool,
}

impl Outcome {
    /// Everything planned is in the maps.
    pub fn ok(&self) -> bool {
        self.written && self.skipped == 0
    }
}

/// The state that lives from one sync to the next.
pub struct Syncer {
    model: model::ModelState,
    retry: Retry,
    applied: Applied,
    limits: Limits,
    /// The datapath configuration last written.
    config: Option<Config>,
    /// The node changed under the configuration (an MTU, an address): the next turn syncs
    /// even with no change from the source.
    config_owed: bool,
    /// The Model's notes already logged.
    said: BTreeSet<(String, String)>,
}

/// What a sync asks of its caller: `config_for` makes the datapath configuration from the
/// node's addresses; `names` hears the desired state before any map is written when
/// frontends came, went or moved, so whoever names a packet's Service (`lb monitor`) knows
/// it before the first packet; `outgrown` hears, before a full plan, what the desired
/// state needs of the maps that may grow, and says whether the caller grows them first
/// (the plan then waits for it: everything is planned again against the larger maps);
/// `own_backend`, if given, hears before any map is written that the plan writes a backend
/// at one of the node's own addresses (a hostNetwork pod), whose replies leave the node's
/// own stack.
pub struct Hooks<C, N, G, O> {
    pub config_for: C,
    pub names: N,
    pub outgrown: G,
    pub own_backend: Option<O>,
}

/// Whether `ops` write a backend at one of `own` (the node's addresses).
fn writes_own_backend(ops: &[reconcile::MapOp], own: &[IpAddr]) -> bool {
    let own: Vec<Addr> = own.iter().map(|a| addr_from_ip(*a)).collect();
    ops.iter().any(|op| matches!(op, reconcile::MapOp::SetBackend { value, .. } if own.contains(&value.addr)))
}

/// What the desired state needs of the two maps that may grow (`growth`): Maglev slots, a
/// table per datapath service, and backend ids, one per endpoint in use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    pub maglev_slots: u64,
    pub backends: u64,
}

impl Needs {
    fn of(model: &model::ModelState) -> Needs {
        // Table sizes by backend count: the same few counts recur over thousands of Services.
        let mut sizes: Vec<Option<u32>> = Vec::new();
        let mut size = |n: usize| {
            if sizes.len() <= n {
                sizes.resize(n + 1, None);
            }
            *sizes[n]
                .get_or_insert_with(|| crate::maglev::table_size(n, lb_common::maglev::DEFAULT_MAX_TABLE))
        };
        let services = model.desired().services.values();
        Needs {
            maglev_slots: services.map(|s| u64::from(size(s.backends.len()))).sum(),
            backends: model.backends_in_use() as u64,
        }
    }
}

/// Hooks without a growth check, for callers whose maps have a fixed size.
pub fn never_outgrown(_: &Needs) -> bool {
    false
}

impl Syncer {
    /// Starts from what the maps hold (`Applied::read`).
    pub fn new(mut applied: Applied, limits: Limits) -> Self {
        applied.track_ranges(limits.maglev_slots);
        Syncer {
            model: model::ModelState::default(),
            retry: Retry::new(),
            applied,
            limits,
            config: None,
            config_owed: false,
            said: BTreeSet::new(),
        }
    }

    pub fn desired(&self) -> &Desired {
        self.model.desired()
    }

    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    pub fn retry(&self) -> &Retry {
        &self.retry
    }

    pub fn contested_frontends(&self) -> usize {
        self.model.contested_frontends()
    }

    /// The node's MTUs or addresses changed: the configuration is rewritten on the next turn.
    pub fn owe_config(&mut self) {
        self.config_owed = true;
    }

    /// Syncs what `source` changed (and what is owed, once its retry is `now` due) into
    /// `dp`; `resync` re-plans everything against the maps as they are; `hooks` say what the
    /// caller adds. None: nothing to do. A failed map write is an outcome (retried in full);
    /// failing to read the maps back is an error.
    pub fn sync<D: Dataplane, S: ChangeSource, C, N, G, O>(
        &mut self,
        dp: &mut D,
        source: &mut S,
        node: &NodeContext,
        hooks: Hooks<C, N, G, O>,
        resync: bool,
        now: Instant,
    ) -> Result<Option<Outcome>, DataplaneError>
    where
        C: FnOnce(&[IpAddr]) -> Config,
        N: FnOnce(&model::Desired),
        G: FnOnce(&Needs) -> bool,
        O: FnOnce(),
    {
        let Hooks { config_for, names, outgrown, own_backend } = hooks;
        let due = self.retry.due(now);
        let mut changes = match source.changed() {
            Some(c) => c,
            None if due || resync || self.config_owed => Changes::default(),
            None => return Ok(None),
        };
        if resync {
            // Everything re-planned against what the kernel holds now: repairs a map
            // someone else wrote to, or an entry a bug lost.
            changes.all = true;
            self.reread(dp)?;
            log("periodic resync (--config-sync-period): everything re-planned against the maps");
        }
        let span = tracing::info_span!(
            "sync",
            all = changes.all,
            service_changes = changes.services.len(),
            endpoint_changes = changes.slices.len(),
            writes = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        );
        let _entered = span.enter();
        let t0 = Instant::now();
        let (mut delta, node_addresses) = source.with_cluster(|cluster| {
            let delta = self.model.update(cluster, node, &changes);
            (delta, node.addresses(cluster))
        });
        let model = &self.model;
        self.retry.prepare(&mut delta, due, |a| model.uses_backend(a));
        // A full plan into maps too small for it (the first sync of a large cluster) would
        // write the Services that fit only to plan them all again once the maps grew: the
        // caller grows them first, and the Model's state is planned in full after that.
        if delta.all && outgrown(&Needs::of(&self.model)) {
            self.retry.owe_full();
            self.retry.no_later_than(now);
            return Ok(None);
        }
        let desired = self.model.desired();
        let want = config_for(&node_addresses);
        self.config_owed = false;
        let config_written = self.config != Some(want);
        if config_written {
            dp.set_config(&want)?;
            self.config = Some(want);
        }
        // Room whose quarantine is over is free for this plan.
        self.applied.release_quarantine();
        let plan = reconcile::plan_changes(desired, &delta, &self.applied, &self.limits);
        let frontends_touched = delta.all
            || !delta.vips_added.is_empty()
            || !delta.vips_removed.is_empty()
            || delta.services.iter().any(|(sref, old)| {
                old.as_ref().map(|o| &o.frontends) != desired.services.get(sref).map(|d| &d.frontends)
            });
        if frontends_touched {
            names(desired);
        }
        if let Some(own_backend) = own_backend
            && writes_own_backend(&plan.ops, &node.fallback_addresses)
        {
            own_backend();
        }
        let result = reconcile::execute(dp, &mut self.applied, &plan.ops);
        let took = t0.elapsed();
        for line in self.retry.settle(desired, &delta, &plan.failed, result.is_ok(), now) {
            log(line);
        }
        // Under churn a map can be full only of room held back for a moment (ranges and ids
        // in quarantine): what was skipped is tried again as soon as that room is free.
        let held_back = |e: &PlanError| matches!(e, PlanError::MaglevFull(_) | PlanError::BackendsFull(_));
        if plan.failed.iter().any(|(_, e)| held_back(e))
            && let Some(t) = self.applied.quarantine_ends()
        {
            self.retry.no_later_than(t);
        }
        span.record("writes", plan.ops.len());
        span.record("duration_ms", took.as_secs_f64() * 1e3);
        let outcome = Outcome {
            took,
            written: result.is_ok(),
            writes: plan.ops.len(),
            skipped: plan.failed.len(),
            settled: result.is_ok() && self.retry.is_empty(),
            service_changes: changes.services.len(),
            endpoint_changes: changes.slices.len(),
            frontends_touched,
            config_written,
        };
        match result {
            Ok(()) => {
                let changed = if delta.all { "all".to_string() } else { delta.services.len().to_string() };
                let duration_ms = took.as_secs_f64() * 1e3;
                tracing::info!(
                    uptime_s = logging::uptime_s(),
                    services = desired.services.len(),
                    not_programmed = self.retry.skipped_count(),
                    frontends = self.applied.services.len(),
                    backends = self.applied.backends.len(),
                    changed = changed.as_str(),
                    writes = plan.ops.len(),
                    duration_ms,
                    "synced: {} services ({} not programmed), {} frontends, {} backends; {changed} changed, {} map writes in {duration_ms:.2} ms",
                    desired.services.len(),
                    self.retry.skipped_count(),
                    self.applied.services.len(),
                    self.applied.backends.len(),
                    plan.ops.len(),
                );
            }
            Err(e) => {
                log(format!("error: sync failed: {e:#}; will retry in full"));
                // Re-read what the kernel really holds before planning again.
                self.reread(dp)?;
            }
        }
        // Each note once, while it holds (a Service skipped, a warning about it).
        let notes: BTreeSet<(String, String)> = self.model.desired().notes.iter().cloned().collect();
        for (what, why) in notes.difference(&self.said) {
            log(format!("{what}: {why}"));
        }
        self.said = notes;
        // A full sync, or a large one (a manifest file of thousands of objects re-read): its
        // peak is given back.
        if delta.all || changes.services.len() + changes.slices.len() > 1_000 {
            drop(plan);
            crate::memory::return_freed();
        }
        Ok(Some(outcome))
    }

    /// The datapath was loaded again with larger maps (`growth`): `applied` is what the new
    /// maps hold, and everything is planned again against them at once.
    pub fn reloaded(&mut self, mut applied: Applied, limits: Limits) {
        applied.track_ranges(limits.maglev_slots);
        self.applied = applied;
        self.limits = limits;
        self.retry.owe_full();
        self.retry.no_later_than(Instant::now());
    }

    fn reread(&mut self, dp: &impl Dataplane) -> Result<(), DataplaneError> {
        self.applied = Applied::read(dp)?;
        self.applied.track_ranges(self.limits.maglev_slots);
        Ok(())
    }
}

#[cfg(test)]
#[path = "sync_tests.rs"]
mod tests;
