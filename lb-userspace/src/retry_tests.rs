use super::*;
use crate::model::{Family, NoBackend, Scope};

fn sref(name: &str) -> ServiceRef {
    ServiceRef {
        namespace: "default".into(),
        name: name.into(),
        port_name: "".into(),
        proto: lb_common::abi::PROTO_TCP,
        scope: Scope::Cluster,
        family: Family::V4,
    }
}

fn service(port: u16) -> DesiredService {
    DesiredService {
        frontends: [(IpAddr::from([198, 19, 0, 1]), port)].into(),
        backends: Default::default(),
        kept: Default::default(),
        affinity_timeout: None,
        no_backend: NoBackend::Reject,
        source_ranges: vec![],
        external: false,
    }
}

fn changed(name: &str, old: Option<DesiredService>) -> Delta {
    Delta { services: [(sref(name), old)].into(), ..Default::default() }
}

#[test]
fn backoff_doubles_with_jitter_up_to_the_cap() {
    let mut r = Retry::new();
    let mut last = Duration::ZERO;
    for attempt in 1..=12 {
        r.attempts = attempt;
        let base = FIRST_BACKOFF.saturating_mul(1 << (attempt - 1)).min(MAX_BACKOFF);
        let waits: Vec<Duration> = (0..50).map(|_| r.backoff()).collect();
        assert!(
            waits.iter().all(|w| *w >= base.mul_f64(0.75) && *w <= base.mul_f64(1.25)),
            "{attempt}: {waits:?}"
        );
        assert!(waits.iter().any(|w| *w != waits[0]), "jittered");
        let mean = waits.iter().sum::<Duration>() / 50;
        assert!(mean >= last || base == MAX_BACKOFF);
        last = mean;
    }
    assert!(last <= MAX_BACKOFF.mul_f64(1.25));
}

#[test]
fn a_failure_is_retried_later_against_the_version_the_maps_hold() {
    let mut r = Retry::new();
    let t0 = Instant::now();
    let (old, new) = (service(80), service(81));
    let desired = Desired { services: [(sref("a"), new.clone())].into(), ..Default::default() };
    let delta = changed("a", Some(old.clone()));
    let lines = r.settle(&desired, &delta, &[(sref("a"), PlanError::ServicesFull(1))], true, t0);
    assert!(lines[0].contains("default/a") && lines[0].contains("--max-services"), "{lines:?}");
    assert!(lines[1].starts_with("next try in"));
    assert!(!r.due(t0) && r.due(t0 + MAX_BACKOFF * 2));
    // An unrelated change is planned on its own; the owed service is not due yet.
    let mut unrelated = changed("b", None);
    r.prepare(&mut unrelated, r.due(t0), |_| false);
    assert_eq!(unrelated.services.len(), 1);
    // A change to the skipped service itself is planned against what the maps hold.
    let mut again = changed("a", Some(new));
    r.prepare(&mut again, false, |_| false);
    assert_eq!(again.services[&sref("a")], Some(old.clone()));
    // Once due, it joins the delta, with the endpoints it held back that nobody uses now.
    r.gone = [(IpAddr::from([198, 18, 1, 1]), 80), (IpAddr::from([198, 18, 1, 2]), 80)].into();
    let mut due = Delta::default();
    r.prepare(&mut due, true, |a| a.0 == IpAddr::from([198, 18, 1, 1]));
    assert_eq!(due.services[&sref("a")], Some(old));
    assert_eq!(due.backends_gone, [(IpAddr::from([198, 18, 1, 2]), 80)].into());
    // It goes through: nothing owed, said once.
    let lines = r.settle(&desired, &due, &[], true, t0);
    assert_eq!(lines, ["default/a/TCP/cluster: programmed now"]);
    assert!(r.is_empty() && !r.due(t0));
}

#[test]
fn the_same_failure_is_logged_once_a_minute_and_a_new_one_at_once() {
    let mut r = Retry::new();
    let t0 = Instant::now();
    let desired = Desired::default();
    let fail = |e| vec![(sref("a"), e)];
    assert!(!r.settle(&desired, &changed("a", None), &fail(PlanError::MaglevFull(7)), true, t0).is_empty());
    let t1 = t0 + Duration::from_secs(5);
    assert!(r.settle(&desired, &changed("a", None), &fail(PlanError::MaglevFull(7)), true, t1).is_empty());
    let t2 = t0 + Duration::from_secs(10);
    assert!(!r.settle(&desired, &changed("a", None), &fail(PlanError::MaglevFull(9)), true, t2).is_empty());
    let t3 = t2 + LOG_EVERY;
    assert!(!r.settle(&desired, &changed("a", None), &fail(PlanError::MaglevFull(9)), true, t3).is_empty());
    assert_eq!(r.skipped().count(), 1);
}

#[test]
fn a_failed_write_owes_a_full_plan_until_one_succeeds() {
    let mut r = Retry::new();
    let t0 = Instant::now();
    r.settle(&Desired::default(), &changed("a", None), &[], false, t0);
    assert!(!r.is_empty());
    let mut d = Delta::default();
    r.prepare(&mut d, true, |_| false);
    assert!(d.all);
    r.settle(&Desired::default(), &d, &[], true, t0);
    assert!(r.is_empty());
}

#[test]
fn many_skipped_services_are_summed_up_after_the_first_few() {
    let mut r = Retry::new();
    let t0 = Instant::now();
    let names: Vec<String> = (0..25).map(|i| format!("s{i:02}")).collect();
    let desired =
        Desired { services: names.iter().map(|n| (sref(n), service(80))).collect(), ..Default::default() };
    let delta = Delta { all: true, ..Default::default() };
    let failed: Vec<(ServiceRef, PlanError)> =
        names.iter().map(|n| (sref(n), PlanError::MaglevFull(401))).collect();
    let lines = r.settle(&desired, &delta, &failed, true, t0);
    assert_eq!(lines.len(), LINES_EACH + 2, "{lines:?}");
    assert!(lines[LINES_EACH].contains("and 15 more not programmed"), "{lines:?}");
    assert_eq!(r.skipped_count(), 25, "every one is still owed");
    // All fit on the next (full) plan: ten named, the rest counted.
    let lines = r.settle(&desired, &delta, &[], true, t0 + Duration::from_secs(1));
    assert_eq!(lines.len(), LINES_EACH + 1, "{lines:?}");
    assert!(lines[LINES_EACH].contains("and 15 more programmed now"), "{lines:?}");
    assert!(r.is_empty());
}
