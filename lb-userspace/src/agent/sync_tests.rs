//! The sync on its own: a fake source, `FakeDataplane`, and a clock the test moves.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::{
    dataplane::FakeDataplane,
    model::{Cluster, NodePortAddresses},
    source::manifests::{cluster_from, parse},
};

type NoNames = fn(&crate::model::Desired);
type Outgrown = fn(&Needs) -> bool;
type NoOwnBackend = fn();

/// A sync's hooks that write `config`, ignore the names, never grow the maps and do not
/// ask about backends at the node's addresses.
fn hooks(config: Config) -> Hooks<impl FnOnce(&[IpAddr]) -> Config, NoNames, Outgrown, NoOwnBackend> {
    Hooks {
        config_for: move |_: &[IpAddr]| config,
        names: |_| {},
        outgrown: never_outgrown,
        own_backend: None,
    }
}

/// Objects the test edits, and the changes it announces.
struct FakeSource {
    cluster: Cluster,
    pending: Option<Changes>,
}

impl ChangeSource for FakeSource {
    fn changed(&mut self) -> Option<Changes> {
        self.pending.take()
    }
    fn with_cluster<R>(&self, f: impl FnOnce(&Cluster) -> R) -> R {
        f(&self.cluster)
    }
    fn take_triggers(&self) -> Vec<jiff::Timestamp> {
        Vec::new()
    }
    fn errors(&self) -> u64 {
        0
    }
}

/// Service `name` on ClusterIP `vip`:80 with two ready endpoints.
fn service(name: &str, vip: &str, pods: [&str; 2]) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {vip}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{port: 8080, protocol: TCP}}]\nendpoints: [{{addresses: ['{}']}}, {{addresses: ['{}']}}]\n---\n",
        pods[0], pods[1]
    )
}

fn two_services() -> FakeSource {
    let yaml = service("web-a", "198.19.0.1", ["198.18.1.10", "198.18.1.11"])
        + &service("web-b", "198.19.0.2", ["198.18.1.20", "198.18.1.21"]);
    let cluster = cluster_from(parse(&yaml, false).expect("test YAML parses"));
    FakeSource { cluster, pending: Some(Changes::everything()) }
}

fn node() -> NodeContext {
    NodeContext {
        name: "node-a".into(),
        nodeport_addresses: NodePortAddresses::Primary,
        fallback_addresses: vec![IpAddr::from([198, 18, 0, 1])],
    }
}

fn limits() -> Limits {
    Limits {
        max_table: lb_common::maglev::DEFAULT_MAX_TABLE,
        maglev_slots: 1 << 16,
        backends: 1024,
        services: 1024,
        frontends: 1024,
        source_ranges: 64,
        members: 1024,
    }
}

fn turn(s: &mut Syncer, dp: &mut FakeDataplane, src: &mut FakeSource, now: Instant) -> Option<Outcome> {
    s.sync(dp, src, &node(), hooks(Config::default()), false, now).expect("the fake's maps read back")
}

/// The Service ports in the fake's maps, as `ip:port` (not the ClusterIPs' entries for
/// ports they do not serve, port 0).
fn frontends(dp: &FakeDataplane) -> Vec<String> {
    dp.services.keys().filter(|k| k.port() != 0).map(|k| format!("{}:{}", k.ip(), k.port())).collect()
}

/// Writes that fail: the sync reports it, nothing spins while the retry waits, and once the
/// maps take writes again the owed full plan programs everything.
#[test]
fn a_failed_write_is_retried_in_full_after_a_backoff_and_recovers() {
    let mut dp = FakeDataplane { broken: true, ..Default::default() };
    let mut src = two_services();
    let mut s = Syncer::new(Applied::read(&dp).unwrap(), limits());
    let t0 = Instant::now();
    let first = turn(&mut s, &mut dp, &mut src, t0).expect("everything is new");
    assert!(!first.written && !first.settled && !first.ok(), "{first:?}");
    assert!(first.writes > 0);
    assert!(dp.services.is_empty() && dp.backends.is_empty());
    assert!(!s.retry().is_empty(), "a full plan is owed");

    // Nothing new and the backoff (at least 375 ms) not over: no turn.
    assert_eq!(turn(&mut s, &mut dp, &mut src, t0 + Duration::from_millis(100)), None);

    dp.broken = false;
    let again = turn(&mut s, &mut dp, &mut src, t0 + Duration::from_secs(2)).expect("the retry is due");
    assert!(again.ok() && again.settled, "{again:?}");
    assert_eq!(frontends(&dp), ["198.19.0.1:80", "198.19.0.2:80"]);
    assert_eq!(dp.backends.len(), 4);
    assert!(s.retry().is_empty());
    // Settled: no further turns.
    assert_eq!(turn(&mut s, &mut dp, &mut src, t0 + Duration::from_secs(60)), None);
}

/// A full plan whose needs the caller says outgrow the maps writes nothing and owes itself
/// at once: the caller grows the maps, and the next turn (with nothing new from the source)
/// plans everything. The hook hears the needs: two tables of two backends, four endpoints.
#[test]
fn a_full_plan_that_outgrows_the_maps_waits_for_them_to_grow() {
    let mut dp = FakeDataplane::default();
    let mut src = two_services();
    let mut s = Syncer::new(Applied::read(&dp).unwrap(), limits());
    let t0 = Instant::now();
    let mut heard = None;
    let outgrown = |n: &Needs| {
        heard = Some(*n);
        true
    };
    let hooks = Hooks {
        config_for: |_: &[IpAddr]| Config::default(),
        names: |_: &_| {},
        outgrown,
        own_backend: None::<NoOwnBackend>,
    };
    let waited = s.sync(&mut dp, &mut src, &node(), hooks, false, t0).unwrap();
    assert_eq!(waited, None, "nothing planned");
    let table = crate::maglev::table_size(2, lb_common::maglev::DEFAULT_MAX_TABLE);
    assert_eq!(heard, Some(Needs { maglev_slots: 2 * u64::from(table), backends: 4 }));
    assert!(dp.services.is_empty() && dp.backends.is_empty(), "nothing written");
    let then = turn(&mut s, &mut dp, &mut src, t0).expect("the full plan is owed at once");
    assert!(then.ok() && then.settled, "{then:?}");
    assert_eq!(frontends(&dp), ["198.19.0.1:80", "198.19.0.2:80"]);
}

/// A plan that cannot place a Service (a map at its capacity) applies the rest, and the
/// skipped Service is programmed by the retry once room is made.
#[test]
fn a_skipped_service_is_programmed_by_the_retry_once_room_is_made() {
    let mut dp = FakeDataplane::default();
    let mut src = two_services();
    let mut s = Syncer::new(Applied::read(&dp).unwrap(), Limits { services: 2, ..limits() });
    let t0 = Instant::now();
    let first = turn(&mut s, &mut dp, &mut src, t0).unwrap();
    assert!(first.written && first.skipped == 1 && !first.settled && !first.ok(), "{first:?}");
    let programmed = frontends(&dp);
    assert_eq!(programmed.len(), 1, "one fits: {programmed:?}");
    let (gone, other) = if programmed[0] == "198.19.0.1:80" {
        ("web-a", "198.19.0.2:80")
    } else {
        ("web-b", "198.19.0.1:80")
    };

    // The programmed Service is deleted: planned at once; the skipped one waits its turn.
    src.cluster.services.remove(&("default".into(), gone.into()));
    src.cluster.slices.retain(|(_, name), _| !name.starts_with(gone));
    src.pending = Some(Changes { services: [("default".into(), gone.into())].into(), ..Default::default() });
    let deleted = turn(&mut s, &mut dp, &mut src, t0 + Duration::from_millis(1)).unwrap();
    assert!(deleted.written && !deleted.settled, "{deleted:?}");
    assert!(frontends(&dp).is_empty());

    let retried = turn(&mut s, &mut dp, &mut src, t0 + Duration::from_secs(2)).expect("the retry is due");
    assert!(retried.ok() && retried.settled, "{retried:?}");
    assert_eq!(frontends(&dp), [other]);
    let backends: BTreeMap<u32, _> = dp.backends.clone();
    assert_eq!(backends.len(), 2, "only the remaining Service's backends");
}

/// The datapath configuration is written on the first sync and again only when it changes.
#[test]
fn the_configuration_is_written_when_it_changes() {
    let mut dp = FakeDataplane::default();
    let mut src = two_services();
    let mut s = Syncer::new(Applied::read(&dp).unwrap(), limits());
    let t0 = Instant::now();
    let cfg = |port| Config { snat_port_min: port, ..Config::default() };
    let first = s.sync(&mut dp, &mut src, &node(), hooks(cfg(1000)), false, t0).unwrap().unwrap();
    assert!(first.config_written);
    let resync = s.sync(&mut dp, &mut src, &node(), hooks(cfg(1000)), true, t0).unwrap().unwrap();
    assert!(!resync.config_written && resync.ok() && resync.writes == 0, "{resync:?}");
    let changed = s.sync(&mut dp, &mut src, &node(), hooks(cfg(2000)), true, t0).unwrap().unwrap();
    assert!(changed.config_written);
    assert_eq!(dp.config.snat_port_min, 2000);
    // The node changed under it (a route's MTU, say) with nothing from the source: no sync
    // until the agent says the configuration is owed, then one that writes it.
    assert!(s.sync(&mut dp, &mut src, &node(), hooks(cfg(3000)), false, t0).unwrap().is_none());
    s.owe_config();
    let owed = s.sync(&mut dp, &mut src, &node(), hooks(cfg(3000)), false, t0).unwrap().unwrap();
    assert!(owed.config_written && owed.writes == 0, "{owed:?}");
    assert_eq!(dp.config.snat_port_min, 3000);
    assert!(s.sync(&mut dp, &mut src, &node(), hooks(cfg(3000)), false, t0).unwrap().is_none());
}

/// Under churn the Maglev array can be full only of ranges in quarantine (a table changed
/// moments ago keeps its old range unused for `QUARANTINE`). A Service skipped for that is
/// tried again when the quarantine ends, not after the backoff (500 ms and doubling), and is
/// then programmed.
#[test]
fn a_service_skipped_for_quarantined_room_is_retried_when_the_quarantine_ends() {
    let mut dp = FakeDataplane::default();
    let mut src = two_services();
    // Two-endpoint tables take 211 slots: room for the two tables and one more.
    let mut s = Syncer::new(Applied::read(&dp).unwrap(), Limits { maglev_slots: 3 * 211, ..limits() });
    let t0 = Instant::now();
    assert!(turn(&mut s, &mut dp, &mut src, t0).unwrap().ok());
    // web-a changes twice in a row: the first change takes the spare range and quarantines
    // its old one; the second finds no free range.
    let change = |src: &mut FakeSource, pods: [&str; 2]| {
        let yaml = service("web-a", "198.19.0.1", pods);
        for (k, v) in cluster_from(parse(&yaml, false).unwrap()).slices {
            src.cluster.slices.insert(k, v);
        }
        src.pending =
            Some(Changes { slices: [("default".into(), "web-a-1".into())].into(), ..Default::default() });
    };
    change(&mut src, ["198.18.1.10", "198.18.1.12"]);
    assert!(turn(&mut s, &mut dp, &mut src, Instant::now()).unwrap().ok());
    change(&mut src, ["198.18.1.10", "198.18.1.13"]);
    let now = Instant::now();
    let skipped = turn(&mut s, &mut dp, &mut src, now).unwrap();
    assert_eq!(skipped.skipped, 1, "{skipped:?}");
    let next = s.retry().next().expect("a retry is owed");
    assert!(
        next <= now + crate::reconcile::QUARANTINE,
        "retry in {:?}, not after the quarantine",
        next - now
    );
    std::thread::sleep(next.saturating_duration_since(Instant::now()));
    let retried = turn(&mut s, &mut dp, &mut src, Instant::now()).expect("the retry is due");
    assert!(retried.ok() && retried.settled, "{retried:?}");
    assert!(dp.backends.values().any(|b| b.ip() == IpAddr::from([198, 18, 1, 13])));
}

/// web-a's slice moved to `port` (its two endpoints keep their addresses).
fn move_port(src: &mut FakeSource, port: u16, announce: bool) {
    let slice = src.cluster.slices.get_mut(&("default".into(), "web-a-1".into())).unwrap();
    std::sync::Arc::make_mut(slice).ports[0].port = Some(port);
    let change = Changes { slices: [("default".into(), "web-a-1".into())].into(), ..Default::default() };
    if announce || src.pending.is_none() {
        src.pending = Some(change);
    }
}

/// A stream of endpoint changes, one sync each or several per sync: the backends of the
/// versions left behind leave the maps; only the current ones stay.
#[test]
fn backends_left_behind_by_a_stream_of_changes_leave_the_maps() {
    let mut dp = FakeDataplane::default();
    let mut src = two_services();
    let mut s = Syncer::new(Applied::read(&dp).unwrap(), limits());
    assert!(turn(&mut s, &mut dp, &mut src, Instant::now()).unwrap().ok());
    for (i, port) in (9000..9060).enumerate() {
        move_port(&mut src, port, true);
        // Every third change waits for the next one: two versions in one sync.
        if i % 3 == 0 {
            continue;
        }
        assert!(turn(&mut s, &mut dp, &mut src, Instant::now()).unwrap().ok());
    }
    let ports: BTreeSet<u16> = dp.backends.values().map(|b| b.port()).collect();
    assert_eq!(dp.backends.len(), 4, "web-a's two at its last port and web-b's two: {ports:?}");
}

/// 40 Services of two endpoints; `rounds` syncs of 1 to 5 changes each (a change moves one
/// Service's slice to a new port; a Service may change twice in one sync).
fn churn(limits: Limits, rounds: u32) -> (Syncer, FakeDataplane, FakeSource) {
    let yaml: String = (0..40)
        .map(|i| {
            service(
                &format!("s{i}"),
                &format!("198.19.1.{i}"),
                [&format!("198.18.3.{i}"), &format!("198.18.4.{i}")],
            )
        })
        .collect();
    let cluster = cluster_from(parse(&yaml, false).unwrap());
    let mut src = FakeSource { cluster, pending: Some(Changes::everything()) };
    let mut dp = FakeDataplane::default();
    let mut applied = Applied::read(&dp).unwrap();
    // Nothing leaves quarantine during the stream, however slowly this machine runs it.
    applied.index.quarantine.hold = Duration::from_secs(3600);
    let mut s = Syncer::new(applied, limits);
    assert!(turn(&mut s, &mut dp, &mut src, Instant::now()).unwrap().ok());
    let mut seed = 7u64;
    for round in 0..rounds {
        let mut changes = Changes::default();
        for _ in 0..1 + round % 5 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let name = format!("s{}-1", (seed >> 33) % 40);
            let slice = src.cluster.slices.get_mut(&("default".into(), name.as_str().into())).unwrap();
            std::sync::Arc::make_mut(slice).ports[0].port =
                Some(10_000 + (round as u16 * 7 + (seed >> 40) as u16 % 7));
            changes.slices.insert(("default".into(), name.into()));
        }
        src.pending = Some(changes);
        turn(&mut s, &mut dp, &mut src, Instant::now()).unwrap();
    }
    (s, dp, src)
}

/// With room for everything, every sync of a stream of changes is applied whole and the
/// maps end with the current backends only.
#[test]
fn backends_left_behind_by_many_services_changing_together_leave_the_maps() {
    // Room for every table and id a burst quarantines (this loop runs far faster than 200 ms
    // per round).
    let roomy = Limits { maglev_slots: 1 << 20, backends: 1 << 16, members: 1 << 16, ..limits() };
    let (s, dp, _) = churn(roomy, 300);
    assert!(s.retry().is_empty());
    assert_eq!(dp.backends.len(), 80, "two per Service");
}

/// Tight room: Services are skipped while ranges and ids sit in quarantine. Once the
/// stream stops and the quarantine ends, the retries program everything and the backends
/// of the versions left behind leave the maps.
#[test]
fn services_skipped_under_churn_catch_up_and_leave_no_backend_behind() {
    let tight = Limits { maglev_slots: 1 << 20, backends: 300, members: 1 << 16, ..limits() };
    let (mut s, mut dp, mut src) = churn(tight, 300);
    assert!(!s.retry().is_empty(), "the test must make the planner skip Services");
    // The quarantine ends.
    s.applied.index.quarantine.hold = Duration::ZERO;
    for _ in 0..10 {
        turn(&mut s, &mut dp, &mut src, Instant::now() + Duration::from_secs(60));
        if s.retry().is_empty() {
            break;
        }
    }
    assert!(s.retry().is_empty(), "{} still skipped", s.retry().skipped_count());
    let ports: BTreeSet<u16> = dp.backends.values().map(|b| b.port()).collect();
    assert_eq!(dp.backends.len(), 80, "two per Service: {} ports", ports.len());
}

/// A backend at one of the node's addresses (a hostNetwork pod) is announced (before the
/// plan's writes: the agent attaches the egress program then, so the first reply is
/// translated); Services without one are not.
#[test]
fn a_backend_at_the_nodes_own_address_is_announced_before_it_is_written() {
    let sync_with = |yaml: String| {
        let mut dp = FakeDataplane::default();
        let cluster = cluster_from(parse(&yaml, false).expect("test YAML parses"));
        let mut src = FakeSource { cluster, pending: Some(Changes::everything()) };
        let mut s = Syncer::new(Applied::read(&dp).unwrap(), limits());
        let mut heard = false;
        let own_backend = || heard = true;
        let hooks = Hooks {
            config_for: |_: &[IpAddr]| Config::default(),
            names: |_: &_| {},
            outgrown: never_outgrown,
            own_backend: Some(own_backend),
        };
        s.sync(&mut dp, &mut src, &node(), hooks, false, Instant::now()).unwrap();
        assert_eq!(dp.backends.len(), 2, "both backends written");
        heard
    };
    assert!(sync_with(service("api", "198.19.0.1", ["198.18.0.1", "198.18.0.2"])));
    assert!(!sync_with(service("web", "198.19.0.1", ["198.18.1.10", "198.18.1.11"])));
}
