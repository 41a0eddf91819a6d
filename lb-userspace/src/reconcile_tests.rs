use std::collections::BTreeMap;

use super::*;
use crate::{
    dataplane::FakeDataplane,
    model::{Family, Scope, ServiceRef},
};

const LIMITS: Limits = Limits {
    max_table: 65_537,
    maglev_slots: 100_000,
    backends: 1_000,
    services: 1_000,
    frontends: 1 << 20,
    source_ranges: 16_384,
    members: 1 << 20,
};

fn sref(name: &str) -> ServiceRef {
    ServiceRef {
        namespace: "default".into(),
        name: name.into(),
        port_name: "http".into(),
        proto: PROTO_TCP,
        scope: Scope::Cluster,
        family: Family::V4,
    }
}

fn be(last: u8) -> Backend {
    Backend { ip: IpAddr::from([198, 18, 1, last]), port: 9376, local: last < 100, terminating: false }
}

fn service(vip: u8, backends: &[u8]) -> DesiredService {
    DesiredService {
        frontends: [(IpAddr::from([198, 19, 0, vip]), 80)].into(),
        backends: backends.iter().map(|b| be(*b)).collect(),
        kept: Default::default(),
        affinity_timeout: None,
        no_backend: NoBackend::Reject,
        source_ranges: vec![],
        external: false,
    }
}

fn desired(services: Vec<(&str, DesiredService)>) -> Desired {
    Desired { services: services.into_iter().map(|(n, s)| (sref(n), s)).collect(), ..Default::default() }
}

/// Plans, applies to the fake, checks that the state read back is what was recorded and that
/// planning again yields nothing. Returns the ops.
fn sync(dp: &mut FakeDataplane, d: &Desired) -> Vec<MapOp> {
    let mut applied = Applied::read(dp).unwrap();
    let ops = plan(d, &applied, &LIMITS).complete().unwrap();
    execute(dp, &mut applied, &ops).unwrap();
    assert_eq!(applied, Applied::read(dp).unwrap(), "recorded state differs from the maps");
    assert_eq!(plan(d, &applied, &LIMITS).complete().unwrap(), vec![], "second plan is not empty");
    ops
}

fn value(dp: &FakeDataplane, vip: u8) -> ServiceValue {
    dp.services[&ServiceKey::new(IpAddr::from([198, 19, 0, vip]), 80, PROTO_TCP)]
}

fn table(dp: &FakeDataplane, vip: u8) -> Vec<u32> {
    let v = value(dp, vip);
    dp.read_maglev(v.maglev_offset, v.maglev_size).unwrap()
}

fn backend_id(dp: &FakeDataplane, last: u8) -> u32 {
    *dp.backends.iter().find(|(_, b)| b.ip() == be(last).ip).unwrap().0
}

#[test]
fn a_new_service_is_built_before_its_frontend_appears() {
    let mut dp = FakeDataplane::default();
    sync(&mut dp, &desired(vec![("web", service(10, &[1, 2, 3]))]));
    let kinds: Vec<&str> = dp.log.iter().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "set_backend",
            "set_backend",
            "set_backend",
            "set_member",
            "set_member",
            "set_member",
            "write_maglev",
            "set_service"
        ]
    );
    let v = value(&dp, 10);
    assert_eq!((v.backend_count, v.maglev_size), (3, 307));
    let t = table(&dp, 10);
    let ids: BTreeSet<u32> = t.iter().copied().collect();
    assert_eq!(ids, [1, 2, 3].into());
    assert!(dp.backends.values().all(|b| b.flags & BE_F_LOCAL != 0 && b.port() == 9376));
}

#[test]
fn removing_a_backend_moves_only_its_slots_and_keeps_ids_and_size() {
    let mut dp = FakeDataplane::default();
    sync(&mut dp, &desired(vec![("web", service(10, &[1, 2, 3, 4]))]));
    let before = table(&dp, 10);
    let old = value(&dp, 10);
    let gone = backend_id(&dp, 2);
    dp.log.clear();
    sync(&mut dp, &desired(vec![("web", service(10, &[1, 3, 4]))]));
    let after = table(&dp, 10);
    let new = value(&dp, 10);
    assert_eq!(new.service_id, old.service_id);
    assert_eq!(new.maglev_size, old.maglev_size, "size kept on removal");
    assert_ne!(new.maglev_offset, old.maglev_offset, "a changed table goes to a fresh range");
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    assert_eq!(moved, before.iter().filter(|id| **id == gone).count(), "only the removed share moves");
    assert!(!after.contains(&gone));
    // The flip happens before the backend is removed.
    assert_eq!(dp.log.last().unwrap(), &format!("remove_backend {gone}"));
    let flip = dp.log.iter().position(|l| l.starts_with("set_service")).unwrap();
    let write = dp.log.iter().position(|l| l.starts_with("write_maglev")).unwrap();
    assert!(write < flip);
    // The other backends kept their ids.
    for b in [1, 3, 4] {
        assert!(after.contains(&backend_id(&dp, b)));
    }
}

#[test]
fn new_tables_never_overwrite_a_live_range_and_old_ranges_are_reused() {
    let mut dp = FakeDataplane::default();
    sync(&mut dp, &desired(vec![("a", service(10, &[1, 2])), ("b", service(11, &[3]))]));
    let (a0, b0) = (value(&dp, 10), value(&dp, 11));
    sync(&mut dp, &desired(vec![("a", service(10, &[1, 2, 5])), ("b", service(11, &[3]))]));
    let a1 = value(&dp, 10);
    let live = |v: &ServiceValue| v.maglev_offset..v.maglev_offset + v.maglev_size;
    assert!(!live(&a0).contains(&a1.maglev_offset) && !live(&b0).contains(&a1.maglev_offset));
    assert_eq!(value(&dp, 11), b0, "untouched service untouched");
    // a0's range is free again: the next table that fits may take it.
    sync(&mut dp, &desired(vec![("a", service(10, &[1, 2, 5])), ("b", service(11, &[3, 4]))]));
    assert_eq!(value(&dp, 11).maglev_offset, a0.maglev_offset);
}

#[test]
fn restart_reads_the_maps_and_plans_nothing_and_keeps_ids() {
    let mut dp = FakeDataplane::default();
    let d = desired(vec![("a", service(10, &[1, 2])), ("b", service(11, &[3]))]);
    sync(&mut dp, &d);
    let ids = (value(&dp, 10).service_id, value(&dp, 11).service_id, backend_id(&dp, 3));
    // A new agent: only the maps survive.
    let applied = Applied::read(&dp).unwrap();
    assert_eq!(plan(&d, &applied, &LIMITS).complete().unwrap(), vec![]);
    // Services listed in another order (another name) keep their ids too.
    let d2 = desired(vec![("z", service(10, &[1, 2])), ("b", service(11, &[3, 4]))]);
    sync(&mut dp, &d2);
    assert_eq!((value(&dp, 10).service_id, value(&dp, 11).service_id, backend_id(&dp, 3)), ids);
}

#[test]
fn deleting_a_service_removes_frontend_then_backends() {
    let mut dp = FakeDataplane::default();
    sync(&mut dp, &desired(vec![("a", service(10, &[1, 2])), ("b", service(11, &[2, 3]))]));
    dp.log.clear();
    sync(&mut dp, &desired(vec![("b", service(11, &[2, 3]))]));
    assert_eq!(
        dp.log,
        ["remove_service 198.19.0.10:80", "remove_member 1/1", "remove_member 1/2", "remove_backend 1"]
    );
    assert_eq!(dp.backends.len(), 2, "a backend shared with a live service stays");
    sync(&mut dp, &Desired::default());
    assert!(dp.services.is_empty() && dp.backends.is_empty());
}

#[test]
fn terminating_backends_are_kept_for_existing_flows_but_not_in_the_table() {
    let mut dp = FakeDataplane::default();
    let mut s = service(10, &[1]);
    s.kept.insert(Backend { terminating: true, ..be(2) });
    sync(&mut dp, &desired(vec![("web", s)]));
    let id2 = backend_id(&dp, 2);
    assert_ne!(dp.backends[&id2].flags & BE_F_TERMINATING, 0);
    assert!(!table(&dp, 10).contains(&id2));
    assert_eq!(value(&dp, 10).backend_count, 1);
}

#[test]
fn no_backends_reject_or_drop_flags_and_cluster_vip_markers() {
    let mut dp = FakeDataplane::default();
    let mut local = service(11, &[]);
    local.no_backend = NoBackend::Drop;
    local.external = true;
    local.affinity_timeout = Some(30);
    let mut d = desired(vec![("a", service(10, &[])), ("b", local)]);
    d.cluster_vips.insert(IpAddr::from([198, 19, 0, 10]));
    sync(&mut dp, &d);
    let a = value(&dp, 10);
    assert_eq!((a.backend_count, a.maglev_size, a.flags), (0, 0, 0));
    let b = value(&dp, 11);
    assert_eq!(b.flags, SVC_F_DROP_NO_BACKEND | SVC_F_EXTERNAL | SVC_F_AFFINITY);
    assert_eq!(b.affinity_timeout, 30);
    let marker = ServiceKey::new(IpAddr::from([198, 19, 0, 10]), 0, 0);
    assert_eq!(dp.services[&marker], ServiceValue::default());
    assert!(dp.log.iter().all(|l| !l.starts_with("write_maglev")));
    d.cluster_vips.clear();
    sync(&mut dp, &d);
    assert!(!dp.services.contains_key(&marker));
}

#[test]
fn source_ranges_are_allowed_before_the_flip_and_removed_after() {
    let mut dp = FakeDataplane::default();
    let mut s = service(10, &[1]);
    s.source_ranges = vec!["198.18.0.100/32".parse().unwrap()];
    sync(&mut dp, &desired(vec![("web", s.clone())]));
    let id = value(&dp, 10).service_id;
    assert_eq!(dp.source_ranges, [(id, "198.18.0.100/32".parse().unwrap())].into());
    assert_ne!(value(&dp, 10).flags & SVC_F_SOURCE_RANGES, 0);
    let allow = dp.log.iter().position(|l| l.starts_with("allow_source")).unwrap();
    let flip = dp.log.iter().position(|l| l.starts_with("set_service")).unwrap();
    assert!(allow < flip);
    s.source_ranges.clear();
    dp.log.clear();
    sync(&mut dp, &desired(vec![("web", s)]));
    assert_eq!(dp.log, ["set_service 198.19.0.10:80", &format!("disallow_source {id} 198.18.0.100/32")]);
}

#[test]
fn limits_are_reported() {
    let small = Limits { backends: 3, ..LIMITS };
    let d = desired(vec![("web", service(10, &[1, 2, 3]))]);
    assert_eq!(plan(&d, &Applied::default(), &small).complete(), Err(PlanError::BackendsFull(3)));
    let small = Limits { maglev_slots: 100, ..LIMITS };
    assert_eq!(plan(&d, &Applied::default(), &small).complete(), Err(PlanError::MaglevFull(307)));
    let small = Limits { frontends: 0, ..LIMITS };
    assert_eq!(plan(&d, &Applied::default(), &small).complete(), Err(PlanError::FrontendsFull(0)));
    let small = Limits { members: 2, ..LIMITS };
    assert_eq!(plan(&d, &Applied::default(), &small).complete(), Err(PlanError::MembersFull(2)));
    let mut s = service(10, &[1]);
    s.source_ranges = vec!["198.18.0.0/24".parse().unwrap(), "198.18.1.0/24".parse().unwrap()];
    let small = Limits { source_ranges: 1, ..LIMITS };
    assert_eq!(
        plan(&desired(vec![("web", s)]), &Applied::default(), &small).complete(),
        Err(PlanError::SourceRangesFull { need: 2, capacity: 1 })
    );
    let msg = PlanError::SourceRangesFull { need: 2, capacity: 1 }.to_string();
    assert!(msg.contains("--max-source-ranges"), "{msg}");
}

/// The services of `d`, each with its own frontend and backends 10*i+1..=10*i+n.
fn many(n: u8, backends: u8) -> Vec<(String, DesiredService)> {
    (1..=n)
        .map(|i| (format!("svc{i:02}"), service(i, &(1..=backends).map(|b| 10 * i + b).collect::<Vec<_>>())))
        .collect()
}

fn desired_of(services: &[(String, DesiredService)]) -> Desired {
    desired(services.iter().map(|(n, s)| (n.as_str(), s.clone())).collect())
}

/// Plans with `limits`, applies, and checks the maps hold what was recorded.
fn sync_with(dp: &mut FakeDataplane, d: &Desired, limits: &Limits) -> Vec<(ServiceRef, PlanError)> {
    let mut applied = Applied::read(dp).unwrap();
    let p = plan(d, &applied, limits);
    execute(dp, &mut applied, &p.ops).unwrap();
    assert_eq!(applied, Applied::read(dp).unwrap(), "recorded state differs from the maps");
    p.failed
}

/// A batch that fails after entries past the failed one went in (two threads write a large
/// one): what is recorded is what the maps hold, and the next sync writes only the rest.
#[test]
fn a_failed_batch_records_every_entry_the_kernel_took() {
    let services = many(5, 2);
    let refused = ServiceKey::new(IpAddr::from([198, 19, 0, 2]), 80, PROTO_TCP);
    let mut dp = FakeDataplane { refused: Some(refused), ..Default::default() };
    let mut applied = Applied::read(&dp).unwrap();
    let ops = plan(&desired_of(&services), &applied, &LIMITS).complete().unwrap();
    assert!(execute(&mut dp, &mut applied, &ops).is_err());
    assert_eq!(dp.services.len(), 4, "the entries after the refused one are in the map");
    assert_eq!(applied, Applied::read(&dp).unwrap(), "and recorded");
    dp.refused = None;
    let ops = plan(&desired_of(&services), &applied, &LIMITS).complete().unwrap();
    // Its table again (an unused range is freed after a sync) and its frontend; nothing else.
    assert!(
        ops.iter().all(|op| match op {
            MapOp::WriteMaglev { .. } => true,
            MapOp::SetService { key, .. } => *key == refused,
            _ => false,
        }),
        "{ops:?}"
    );
    assert!(ops.iter().any(|op| matches!(op, MapOp::SetService { .. })));
    execute(&mut dp, &mut applied, &ops).unwrap();
    assert_eq!(applied, Applied::read(&dp).unwrap());
    assert_eq!(dp.services.len(), 5);
}

#[test]
fn a_service_over_a_limit_is_skipped_and_the_others_are_applied() {
    // Each of the 5 small services takes 2 backends; "big" wants 30, over --max-backends.
    let mut services = many(5, 2);
    services.push(("big".into(), service(99, &(100..130).collect::<Vec<_>>())));
    let limits = Limits { backends: 20, ..LIMITS };
    let mut dp = FakeDataplane::default();
    let failed = sync_with(&mut dp, &desired_of(&services), &limits);
    assert_eq!(failed, vec![(sref("big"), PlanError::BackendsFull(20))]);
    for i in 1..=5 {
        assert_eq!(value(&dp, i).backend_count, 2);
    }
    // Nothing of the skipped service reached a map.
    assert!(!dp.services.contains_key(&ServiceKey::new(IpAddr::from([198, 19, 0, 99]), 80, PROTO_TCP)));
    assert_eq!(dp.backends.len(), 10);
    assert_eq!(dp.members.len(), 10);
}

#[test]
fn a_skipped_service_keeps_what_the_maps_held_while_the_rest_changes() {
    let mut services = many(3, 2);
    let mut dp = FakeDataplane::default();
    let limits = Limits { maglev_slots: 1_000, ..LIMITS };
    assert_eq!(sync_with(&mut dp, &desired_of(&services), &limits), vec![]);
    let before = (value(&dp, 1), table(&dp, 1));
    // svc01 grows past the Maglev array; svc02 loses an endpoint; svc03 goes.
    services[0].1 = service(1, &(11..=30).collect::<Vec<_>>());
    services[1].1 = service(2, &[21]);
    services.pop();
    let failed = sync_with(&mut dp, &desired_of(&services), &limits);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, sref("svc01"));
    assert!(matches!(failed[0].1, PlanError::MaglevFull(_)));
    assert_eq!((value(&dp, 1), table(&dp, 1)), before, "the skipped service serves as before");
    for id in &before.1 {
        assert!(dp.backends.contains_key(id), "backend {id} of the kept table stays");
    }
    assert_eq!(value(&dp, 2).backend_count, 1, "an endpoint removal elsewhere is applied");
    assert!(!dp.services.contains_key(&ServiceKey::new(IpAddr::from([198, 19, 0, 3]), 80, PROTO_TCP)));
    // Once it fits, it is programmed, and what it no longer uses goes.
    let limits = Limits { maglev_slots: 100_000, ..LIMITS };
    assert_eq!(sync_with(&mut dp, &desired_of(&services), &limits), vec![]);
    assert_eq!(value(&dp, 1).backend_count, 20);
    assert_eq!(plan(&desired_of(&services), &Applied::read(&dp).unwrap(), &limits), Plan::default());
}

#[test]
fn plan_changes_keeps_a_skipped_service_and_its_endpoints() {
    let services = many(2, 2);
    let mut dp = FakeDataplane::default();
    let limits = Limits { source_ranges: 2, ..LIMITS };
    sync_with(&mut dp, &desired_of(&services), &limits);
    let old = services[0].1.clone();
    let mut grown = service(1, &[12, 13]);
    grown.source_ranges = (0..3).map(|i| format!("198.18.{i}.0/24").parse().unwrap()).collect();
    let now = desired_of(&[("svc01".to_string(), grown), services[1].clone()]);
    // The Model says endpoint .11 is gone (svc01 dropped it) and svc01 changed.
    let delta = Delta {
        services: [(sref("svc01"), Some(old))].into(),
        backends_gone: [(be(11).ip, be(11).port)].into(),
        ..Default::default()
    };
    let mut applied = Applied::read(&dp).unwrap();
    let before = value(&dp, 1);
    let p = plan_changes(&now, &delta, &applied, &limits);
    assert_eq!(p.failed, vec![(sref("svc01"), PlanError::SourceRangesFull { need: 3, capacity: 2 })]);
    assert_eq!(p.ops, vec![], "nothing partial, and the kept table's endpoint stays");
    execute(&mut dp, &mut applied, &p.ops).unwrap();
    assert_eq!(value(&dp, 1), before);
}

#[test]
fn table_size_is_kept_until_a_quarter() {
    assert_eq!(table_size(4, 0, 65_537), 401);
    assert_eq!(table_size(3, 401, 65_537), 401);
    assert_eq!(table_size(1, 401, 65_537), 401);
    assert_eq!(table_size(1, 503, 65_537), 101);
    assert_eq!(table_size(5, 401, 65_537), 503);
    assert_eq!(table_size(0, 401, 65_537), 0);
}

#[test]
fn plan_changes_reports_full_maps_like_plan() {
    let d = desired(vec![("a", service(1, &[1, 2, 3]))]);
    let delta = Delta { services: [(sref("a"), None)].into(), ..Default::default() };
    let small = Limits { backends: 3, ..LIMITS };
    let applied = Applied::default();
    assert_eq!(plan_changes(&d, &delta, &applied, &small).complete(), Err(PlanError::BackendsFull(3)));
    assert_eq!(plan(&d, &applied, &small).complete(), Err(PlanError::BackendsFull(3)));
    let one_id = Limits { services: 1, ..LIMITS };
    assert_eq!(plan_changes(&d, &delta, &applied, &one_id).complete(), Err(PlanError::ServicesFull(1)));
}

/// Ids held back in quarantine are skipped, but a high one must not push the search for a
/// free id past the free low ones: under churn that reported "backend map full" with two
/// thirds of the map free.
#[test]
fn a_quarantined_high_id_leaves_the_free_low_ids_usable() {
    let limits = Limits { backends: 12, ..LIMITS };
    let services = many(5, 2);
    let mut dp = FakeDataplane::default();
    assert_eq!(sync_with(&mut dp, &desired_of(&services), &limits), vec![]);
    assert_eq!(dp.backends.keys().copied().collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
    let mut applied = Applied::read(&dp).unwrap();
    // svc01 goes (ids 1, 2), its quarantine ends; then svc05 goes (ids 9, 10: quarantined).
    applied.index.quarantine.hold = std::time::Duration::ZERO;
    let p = plan(&desired_of(&services[1..]), &applied, &limits);
    execute(&mut dp, &mut applied, &p.ops).unwrap();
    applied.release_quarantine();
    applied.index.quarantine.hold = std::time::Duration::from_secs(60);
    let p = plan(&desired_of(&services[1..4]), &applied, &limits);
    execute(&mut dp, &mut applied, &p.ops).unwrap();
    assert_eq!(applied.index.quarantine.backend_ids.iter().map(|(_, id)| *id).collect::<Vec<_>>(), [9, 10]);
    // A new Service of two endpoints: ids 1 and 2 are free (11 too; 12 is past the capacity).
    let mut now = services[1..4].to_vec();
    now.push(("new".into(), service(99, &[201, 202])));
    let p = plan(&desired_of(&now), &applied, &limits);
    assert_eq!(p.failed, vec![], "ids 1 and 2 are free");
    execute(&mut dp, &mut applied, &p.ops).unwrap();
    assert!(dp.backends.contains_key(&1) && dp.backends.contains_key(&2));
}

#[test]
fn a_first_sync_recorded_in_bulk_is_recorded_as_one_by_one() {
    // Enough services and endpoints that every batch takes the bulk path.
    let services: Vec<(String, DesiredService)> = (1..=80u8)
        .map(|i| {
            let mut s = service(i, &[]);
            s.backends = (1..=4u8)
                .map(|b| Backend {
                    ip: IpAddr::from([198, 18, i, b]),
                    port: 9376,
                    local: false,
                    terminating: false,
                })
                .collect();
            (format!("svc{i:02}"), s)
        })
        .collect();
    let d = desired_of(&services);
    let ops = plan(&d, &Applied::default(), &LIMITS).complete().unwrap();
    let mut dp = FakeDataplane::default();
    let mut bulk = Applied::default();
    execute(&mut dp, &mut bulk, &ops).unwrap();
    let mut one_by_one = Applied::default();
    ops.iter().for_each(|op| one_by_one.record(op));
    assert_eq!(bulk, one_by_one);
    assert_eq!(bulk.members.len(), 320);
    // `Index` takes part in no comparison: its fields one by one.
    let (a, b) = (&bulk.index, &one_by_one.index);
    assert_eq!(a.by_addr, b.by_addr);
    assert_eq!(a.service_ids, b.service_ids);
    assert_eq!(a.table_users, b.table_users);
    assert_eq!(a.free_backend_ids, b.free_backend_ids);
    assert_eq!(a.free_service_ids, b.free_service_ids);
    assert_eq!(a.max_generation, b.max_generation);
    // And the next sync plans from it as from a state read back.
    sync(&mut dp, &d);
}

#[test]
fn tables_built_ahead_are_those_built_one_by_one() {
    // Past `fresh_tables`' threshold: a first sync builds its tables ahead, on every CPU.
    let addr = |i: u32, net: u8| IpAddr::from([198, net, (i >> 8) as u8, i as u8]);
    let services: Vec<(String, DesiredService)> = (0..1100u32)
        .map(|i| {
            let mut s = service(0, &[]);
            s.frontends = [(addr(i, 19), 80)].into();
            // Two of its own, and one every service shares: it sorts last but has the first
            // id, so a table numbered by sorted ids would be wrong.
            let shared = Backend {
                ip: IpAddr::from([198, 18, 255, 255]),
                port: 9000,
                local: false,
                terminating: false,
            };
            s.backends = (1..=2u16)
                .map(|p| Backend { ip: addr(i, 18), port: 9000 + p, local: false, terminating: false })
                .chain([shared])
                .collect();
            (format!("svc{i:04}"), s)
        })
        .collect();
    let d = desired_of(&services);
    let limits = Limits { backends: 4000, services: 2000, maglev_slots: 1 << 20, ..LIMITS };
    let mut dp = FakeDataplane::default();
    let mut applied = Applied::default();
    let ops = plan(&d, &applied, &limits).complete().unwrap();
    execute(&mut dp, &mut applied, &ops).unwrap();
    let ids: BTreeMap<(IpAddr, u16), u32> =
        dp.backends.iter().map(|(id, v)| ((v.ip(), v.port()), *id)).collect();
    let id_of = |b: &Backend| ids[&(b.ip, b.port)];
    for (_, s) in &services {
        let (ip, port) = *s.frontends.first().unwrap();
        let v = dp.services[&ServiceKey::new(ip, port, PROTO_TCP)];
        let named: Vec<(u32, Vec<u8>)> =
            s.backends.iter().map(|b| (id_of(b), fresh_tables::name(b))).collect();
        let one_by_one = maglev::build(&named, maglev::table_size(3, limits.max_table));
        assert_eq!(dp.read_maglev(v.maglev_offset, v.maglev_size).unwrap(), one_by_one, "{ip}");
    }
}
