//! The sync on its own: a fake source, `FakeDataplane`, and a clock the test moves.

use std::collections::BTreeMap;

use super::*;
use crate::{
    dataplane::FakeDataplane,
    model::{Cluster, NodePortAddresses},
    source::manifests::{cluster_from, parse},
};

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
    s.sync(dp, src, &node(), |_| Config::default(), false, now).expect("the fake's maps read back")
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
    src.cluster.services.remove(&("default".to_string(), gone.to_string()));
    src.cluster.slices.retain(|(_, name), _| !name.starts_with(gone));
    src.pending =
        Some(Changes { services: [("default".to_string(), gone.to_string())].into(), ..Default::default() });
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
    let first = s.sync(&mut dp, &mut src, &node(), |_| cfg(1000), false, t0).unwrap().unwrap();
    assert!(first.config_written);
    let resync = s.sync(&mut dp, &mut src, &node(), |_| cfg(1000), true, t0).unwrap().unwrap();
    assert!(!resync.config_written && resync.ok() && resync.writes == 0, "{resync:?}");
    let changed = s.sync(&mut dp, &mut src, &node(), |_| cfg(2000), true, t0).unwrap().unwrap();
    assert!(changed.config_written);
    assert_eq!(dp.config.snat_port_min, 2000);
}
