//! L2: the flow table's life cycle, through the real object and the agent's `Dataplane` and
//! GC: states, what may open a flow, pairs removed together, SNAT ports that come back,
//! membership for affinity and UDP, port clashes, a full table.

#[macro_use]
mod common;

use std::os::fd::AsFd as _;

use common::*;
use lb_common::{abi::*, ct, verdict::Reason};
use lb_userspace::{conntrack_gc, dataplane::Dataplane};

const VIP4_B: &str = "198.19.0.11";

fn state(l: &Loaded, key: &FlowKey) -> u8 {
    l.dp.flow(key).expect("flow entry").state
}

fn be_of(id: u32) -> Be {
    *BES4.iter().find(|b| b.id == id).unwrap()
}

/// Points every slot of `svc`'s table at backend `id`.
fn table_to(l: &mut Loaded, svc: &Programmed, id: u32) {
    l.dp.write_maglev(svc.value.maglev_offset, &vec![id; svc.value.maglev_size as usize]).unwrap();
}

#[test]
fn tcp_state_walks_syn_established_fin_and_closed() {
    require_root!();
    let mut l = Loaded::new();
    let svc = program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    let syn = Spec::tcp(CLIENT4, 40000, VIP4, 80);
    let (rc, _) = l.run_xdp(&syn.build());
    assert_eq!(rc, XDP_PASS);
    let be = be_of(svc.predict(&syn.key()));
    let fwd = syn.key();
    let rev = FlowKey::new(ip(be.ip), be.port, ip(CLIENT4), 40000, PROTO_TCP);
    assert_eq!((state(&l, &fwd), state(&l, &rev)), (ct::CT_NEW, ct::CT_NEW), "a SYN opens the flow");
    l.run_xdp(&syn.build());
    assert_eq!(state(&l, &fwd), ct::CT_NEW, "a retransmitted SYN does not establish it");
    let synack = Spec::tcp(be.ip, be.port, CLIENT4, 40000).flags(TCP_SYN | TCP_ACK);
    l.run_tc(&synack.build());
    assert_eq!(state(&l, &rev), ct::CT_ESTABLISHED);
    let name = |l: &Loaded| ct::state_name(PROTO_TCP, state(l, &fwd), state(l, &rev));
    assert_eq!(name(&l), "syn_sent", "not established before the client's ACK");
    l.run_xdp(&syn.clone().flags(TCP_ACK).build());
    assert_eq!(name(&l), "established");
    l.run_xdp(&syn.clone().flags(TCP_ACK | TCP_FIN).build());
    assert_eq!(name(&l), "close_wait");
    l.run_tc(&synack.clone().flags(TCP_ACK | TCP_FIN).build());
    assert_eq!(name(&l), "time_wait");
    l.run_xdp(&syn.clone().flags(TCP_RST).build());
    assert_eq!(name(&l), "close");
    // A new SYN on the closed tuple opens a new flow (new backend choice, state NEW).
    let new_flows = reason(&l, Reason::NewFlow);
    l.run_xdp(&syn.build());
    assert_eq!(reason(&l, Reason::NewFlow), new_flows + 1);
    assert_eq!((state(&l, &fwd), state(&l, &rev)), (ct::CT_NEW, ct::CT_NEW));
    let v = l.dp.flow(&fwd).unwrap();
    assert!(v.last_seen_ns > 0 && v.created_ns > 0 && v.last_seen_ns >= v.created_ns);
}

/// The flow clock from jiffies, as the agent calibrates it, reads CLOCK_MONOTONIC to a tick
/// or two; uncalibrated, the programs fall back to the coarse clock helper.
#[test]
fn the_jiffies_flow_clock_tracks_the_monotonic_clock() {
    require_root!();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    let created = |l: &Loaded, port: u16| {
        let spec = Spec::tcp(CLIENT4, port, VIP4, 80);
        let before = conntrack_gc::monotonic_ns();
        l.run_xdp(&spec.build());
        (before, l.dp.flow(&spec.key()).unwrap().created_ns)
    };
    let within = |(t, c): (u64, u64)| c.abs_diff(t) < 50_000_000;
    assert!(within(created(&l, 50000)), "coarse helper");
    let (tick_ns, tick_j0, tick_t0) = conntrack_gc::tick_calibration().expect("/proc/timer_list");
    assert!([1_000_000, 3_333_333, 4_000_000, 10_000_000].contains(&tick_ns), "tick {tick_ns} ns");
    l.dp.set_config(&Config { tick_ns, tick_j0, tick_t0, ..Config::default() }).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(within(created(&l, 50001)), "jiffies clock");
}

#[test]
fn a_rst_or_a_bare_ack_without_a_flow_creates_nothing() {
    require_root!();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    let rst = Spec::tcp(CLIENT4, 40001, VIP4, 80).flags(TCP_RST);
    let (rc, _) = l.run_xdp(&rst.build());
    assert_eq!(rc, XDP_DROP, "a RST is never answered");
    assert_eq!(reason(&l, Reason::NoFlowRst), 1);
    let ack = Spec::tcp(CLIENT4, 40002, VIP4, 80).flags(TCP_ACK).payload(b"GET /");
    let (rc, out) = l.run_xdp(&ack.build());
    assert_eq!(rc, XDP_TX, "a segment of an unknown connection is answered with a RST");
    let seen = inspect(&out);
    assert_eq!((seen.src, seen.sport, seen.dst, seen.dport), (ip(VIP4), 80, ip(CLIENT4), 40002));
    assert_eq!(seen.tcp_flags & TCP_RST, TCP_RST);
    assert_eq!(reason(&l, Reason::RejectNoFlow), 1);
    assert_eq!(l.dp.flows().unwrap().len(), 0, "no state from either");
    assert_eq!(reason(&l, Reason::NewFlow), 0);
}

#[test]
fn affinity_is_not_honoured_once_its_backend_left_the_service_or_came_back() {
    require_root!();
    let mut l = Loaded::new();
    let svc = program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, SVC_F_AFFINITY);
    let first = svc.predict(&Spec::tcp(CLIENT4, 30000, VIP4, 80).key());
    let other = BES4.iter().find(|b| b.id != first).unwrap().id;
    let pick = |l: &Loaded, port: u16| inspect(&l.run_xdp(&Spec::tcp(CLIENT4, port, VIP4, 80).build()).1).dst;
    assert_eq!(pick(&l, 30000), ip(be_of(first).ip));
    // The table now says `other` for every flow; affinity still holds the client to `first`.
    table_to(&mut l, &svc, other);
    assert_eq!(pick(&l, 30001), ip(be_of(first).ip), "affinity honoured while a member");
    // `first` leaves the service (it stays a backend, of no service here).
    let key = MemberKey { service_id: 1, backend_id: first };
    l.dp.remove_member(&key).unwrap();
    assert_eq!(pick(&l, 30002), ip(be_of(other).ip), "not honoured after it left");
    // Back to `first` by affinity for a while, then the id comes back as a new membership.
    l.dp.set_member(&key, &MemberValue { generation: first, flags: MEMBER_F_USABLE }).unwrap();
    table_to(&mut l, &svc, first);
    assert_eq!(pick(&l, 30003), ip(be_of(other).ip), "the entry made for `other` holds");
    l.dp.remove_member(&MemberKey { service_id: 1, backend_id: other }).unwrap();
    l.dp.set_member(
        &MemberKey { service_id: 1, backend_id: other },
        &MemberValue { generation: 99, flags: MEMBER_F_USABLE },
    )
    .unwrap();
    assert_eq!(pick(&l, 30004), ip(be_of(first).ip), "not honoured for a membership that came back");
    // Terminating (not usable for new flows): not honoured either.
    table_to(&mut l, &svc, other);
    l.dp.set_member(&key, &MemberValue { generation: first, flags: 0 }).unwrap();
    assert_eq!(pick(&l, 30005), ip(be_of(other).ip), "not honoured for a terminating member");
}

#[test]
fn udp_moves_when_its_backend_leaves_the_service_but_still_serves_another() {
    require_root!();
    let mut l = Loaded::new();
    let a = program(&mut l.dp, 1, (VIP4, 53, PROTO_UDP), &BES4, 0, 0);
    // Service B is served by the same pods (same ip:port, same backend ids).
    program(&mut l.dp, 2, (VIP4_B, 53, PROTO_UDP), &BES4, 1000, 0);
    let q = Spec::udp(CLIENT4, 5353, VIP4, 53);
    let first = a.predict(&q.key());
    let other = BES4.iter().find(|b| b.id != first).unwrap().id;
    assert_eq!(inspect(&l.run_xdp(&q.build()).1).dst, ip(be_of(first).ip));
    // `first` leaves A (A's table no longer has it) but still serves B.
    table_to(&mut l, &a, other);
    l.dp.remove_member(&MemberKey { service_id: 1, backend_id: first }).unwrap();
    let (_, out) = l.run_xdp(&q.build());
    assert_eq!(inspect(&out).dst, ip(be_of(other).ip), "the fixed-port client reaches a member of A at once");
    // While a member (even terminating), a UDP flow stays.
    let q2 = Spec::udp(CLIENT4, 5354, VIP4, 53);
    assert_eq!(inspect(&l.run_xdp(&q2.build()).1).dst, ip(be_of(other).ip));
    l.dp.set_member(
        &MemberKey { service_id: 1, backend_id: other },
        &MemberValue { generation: 7, flags: 0 },
    )
    .unwrap();
    assert_eq!(inspect(&l.run_xdp(&q2.build()).1).dst, ip(be_of(other).ip), "terminating keeps its flows");
}

#[test]
fn two_service_flows_with_one_reply_tuple_get_the_second_source_port_rewritten() {
    require_root!();
    let mut l = Loaded::new();
    let only = [BES4[0]];
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &only, 0, 0);
    program(&mut l.dp, 2, (VIP4_B, 80, PROTO_TCP), &only, 1000, 0);
    // One client port, two Services, one pod: both flows would have the same reply tuple.
    let (_, out1) = l.run_tc(&Spec::tcp(CLIENT4, 5000, VIP4, 80).build());
    assert_eq!(inspect(&out1).sport, 5000, "the first keeps its port");
    let (_, out2) = l.run_tc(&Spec::tcp(CLIENT4, 5000, VIP4_B, 80).build());
    let s2 = inspect(&out2);
    assert_eq!((s2.src, s2.dst, s2.dport), (ip(CLIENT4), ip(only[0].ip), 9376));
    assert!((61_000..=65_535).contains(&s2.sport), "the second's source port rewritten ({})", s2.sport);
    // Each reply goes back to its own Service address and the client's real port.
    let r1 = Spec::tcp(only[0].ip, 9376, CLIENT4, 5000).flags(TCP_SYN | TCP_ACK);
    let b1 = inspect(&l.run_tc(&r1.build()).1);
    assert_eq!((b1.src, b1.sport, b1.dport), (ip(VIP4), 80, 5000));
    let r2 = Spec::tcp(only[0].ip, 9376, CLIENT4, s2.sport).flags(TCP_SYN | TCP_ACK);
    let (_, out) = l.run_tc(&r2.build());
    let want = Spec { src: ip(VIP4_B), sport: 80, dport: 5000, ..r2.clone() }.build();
    assert_eq!(out, want, "byte-exact, checksums included");
}

#[test]
fn a_direct_connection_clashing_with_a_live_service_flow_gets_its_source_port_rewritten() {
    require_root!();
    let mut l = Loaded::new();
    let only = [BES4[0]];
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &only, 0, 0);
    l.run_tc(&Spec::tcp(CLIENT4, 45000, VIP4, 80).build());
    // The same client port, directly to the pod, while the Service flow lives.
    let direct = Spec::tcp(CLIENT4, 45000, only[0].ip, 9376);
    let (rc, out) = l.run_tc(&direct.build());
    assert_eq!(rc, TC_ACT_UNSPEC);
    let seen = inspect(&out);
    assert_eq!((seen.src, seen.dst, seen.dport), (ip(CLIENT4), ip(only[0].ip), 9376));
    assert!((61_000..=65_535).contains(&seen.sport), "rewritten port {}", seen.sport);
    assert_eq!(reason(&l, Reason::PortClash), 1);
    // The direct connection's SYN/ACK comes back from the pod to the client's real port...
    let synack = Spec::tcp(only[0].ip, 9376, CLIENT4, seen.sport).flags(TCP_SYN | TCP_ACK);
    let (_, out) = l.run_tc(&synack.build());
    assert_eq!(out, Spec { dport: 45000, ..synack.clone() }.build());
    // ...and the Service flow's still comes from the VIP.
    let svc_reply = Spec::tcp(only[0].ip, 9376, CLIENT4, 45000).flags(TCP_SYN | TCP_ACK);
    let b = inspect(&l.run_tc(&svc_reply.build()).1);
    assert_eq!((b.src, b.sport), (ip(VIP4), 80));
}

#[test]
fn snat_ports_come_back_when_flows_close() {
    require_root!();
    let mut l = Loaded::new();
    // Ten ports: without reuse of closed flows' ports, the eleventh hairpin would fail.
    let c = Config {
        snat_v4: addr_from_ip(ip(NODE4)),
        snat_port_min: 61000,
        snat_port_max: 61009,
        ..Config::default()
    };
    l.dp.set_config(&c).unwrap();
    let only = [BES4[0]];
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &only, 0, 0);
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..500u16 {
        let syn = Spec::tcp(only[0].ip, 20000 + i, VIP4, 80);
        let (rc, out) = l.run_tc(&syn.build());
        assert_eq!(rc, TC_ACT_UNSPEC, "hairpin {i}");
        let seen = inspect(&out);
        assert_eq!(seen.src, ip(NODE4), "hairpin {i} source-NATed");
        ports.insert(seen.sport);
        // The client closes the connection: its port may be reused at once.
        l.run_tc(&syn.clone().flags(TCP_RST).build());
    }
    assert_eq!(reason(&l, Reason::SnatFailed), 0);
    assert_eq!(reason(&l, Reason::NewFlow), 500);
    assert!(ports.iter().all(|p| (61000..=61009).contains(p)), "{ports:?}");
    assert!(l.dp.flows().unwrap().len() <= 20, "closed flows were taken over, not accumulated");
    // Ten live flows hold every port: the next one has none (and nothing live was taken).
    for i in 0..10u16 {
        l.run_tc(&Spec::tcp(only[0].ip, 30000 + i, VIP4, 80).build());
    }
    let (rc, _) = l.run_tc(&Spec::tcp(only[0].ip, 31000, VIP4, 80).build());
    assert_eq!(rc, TC_ACT_SHOT);
    assert_eq!(reason(&l, Reason::SnatFailed), 1);
}

/// A GC pass over entries written with chosen timestamps: expired pairs go with both
/// directions, live ones stay, half pairs go after their grace time.
#[test]
fn gc_removes_closed_and_idle_pairs_together_and_keeps_live_ones() {
    require_root!();
    let mut l = Loaded::new();
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    program(&mut l.dp, 2, (VIP4, 53, PROTO_UDP), &BES4, 1000, 0);
    let open = |l: &Loaded, spec: &Spec| l.run_xdp(&spec.build());
    let syns: Vec<Spec> = (0..4).map(|i| Spec::tcp(CLIENT4, 41000 + i, VIP4, 80)).collect();
    for s in &syns {
        open(&l, s);
        open(&l, &s.clone().flags(TCP_ACK));
    }
    let udp = Spec::udp(CLIENT4, 41100, VIP4, 53);
    open(&l, &udp);
    assert_eq!(l.dp.flows().unwrap().len(), 10);
    // The pass runs at a chosen time `now`, a day and more after the real clock.
    let now = conntrack_gc::monotonic_ns() + 100_000 * ct::NS_PER_SEC;
    let ago = |s: u64| now - s * ct::NS_PER_SEC;
    // Rewrite both directions of a flow with a state and a last-seen time.
    let age = |l: &mut Loaded, key: &FlowKey, fwd_state: u8, rev_state: u8, seen: u64| {
        let v = l.dp.flow(key).unwrap();
        let rkey = ct::reverse_key(key, &v);
        let r = l.dp.flow(&rkey).unwrap();
        l.dp.set_flow(key, &FlowValue { state: fwd_state, last_seen_ns: seen, ..v }).unwrap();
        l.dp.set_flow(&rkey, &FlowValue { state: rev_state, last_seen_ns: seen, ..r }).unwrap();
    };
    // 0: established, idle 2 h (timeout 24 h): stays. 1: established, idle 25 h: goes.
    age(&mut l, &syns[0].key(), ct::CT_ESTABLISHED, ct::CT_ESTABLISHED, ago(7_200));
    age(&mut l, &syns[1].key(), ct::CT_ESTABLISHED, ct::CT_ESTABLISHED, ago(90_000));
    // 2: FIN both ways 11 s ago (time-wait 10 s): goes. 3: RST 5 s ago (close 10 s): stays.
    age(&mut l, &syns[2].key(), ct::CT_FIN, ct::CT_FIN, ago(11));
    age(&mut l, &syns[3].key(), ct::CT_ESTABLISHED, ct::CT_CLOSED, ago(5));
    // UDP without a reply, idle 31 s (timeout 30 s): goes.
    age(&mut l, &udp.key(), ct::CT_NEW, ct::CT_NEW, ago(31));
    // A half pair: a reverse entry whose forward is gone, 20 s old.
    let orphan = FlowKey::new(ip("198.18.1.9"), 9376, ip(CLIENT4), 41200, PROTO_TCP);
    let half = FlowValue {
        direction: FLOW_REPLY,
        addr: addr_from_ip(ip(VIP4)),
        port: 80u16.to_be(),
        last_seen_ns: ago(20),
        ..Default::default()
    };
    l.dp.set_flow(&orphan, &half).unwrap();
    let map = conntrack_gc::open(&l.pin_dir).unwrap();
    let stats = conntrack_gc::pass(map.fd().as_fd(), &CtTimeouts::default(), now).unwrap();
    assert_eq!((stats.entries, stats.removed_pairs, stats.removed_orphans), (11, 3, 1));
    let left: std::collections::HashSet<FlowKey> =
        l.dp.flows().unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(left.len(), 4, "two pairs left");
    assert!(left.contains(&syns[0].key()) && left.contains(&syns[3].key()));
    assert_eq!(stats.by_state.get("established"), Some(&2));
    // A second pass finds nothing more to do.
    let again = conntrack_gc::pass(map.fd().as_fd(), &CtTimeouts::default(), now).unwrap();
    assert_eq!((again.removed_pairs, again.removed_orphans), (0, 0));
}

/// A full table refuses new flows (counted) and never pushes established ones out; under
/// pressure the GC clears handshakes that never completed, and new flows get in again.
#[test]
fn a_full_table_refuses_new_flows_keeps_established_ones_and_recovers() {
    require_root!();
    let caps = lb_userspace::loader::Capacities { flows: 256, maglev_slots: 1 << 20, ..Default::default() };
    let mut l = Loaded::with_caps(&caps);
    program(&mut l.dp, 1, (VIP4, 80, PROTO_TCP), &BES4, 0, 0);
    let live: Vec<Spec> = (0..20).map(|i| Spec::tcp(CLIENT4, 42000 + i, VIP4, 80)).collect();
    for s in &live {
        l.run_xdp(&s.build());
        l.run_xdp(&s.clone().flags(TCP_ACK).build());
    }
    // A SYN flood from many sources.
    let mut refused = 0;
    for i in 0..2000u32 {
        let src = format!("198.18.{}.{}", 200 + i / 250, 1 + i % 250);
        let (rc, _) = l.run_xdp(&Spec::tcp(&src, 1024 + (i % 60000) as u16, VIP4, 80).build());
        if rc == XDP_DROP {
            refused += 1;
        }
    }
    assert!(refused > 1000, "the table filled up ({refused} refused)");
    assert_eq!(reason(&l, Reason::FlowTableFull), refused);
    for s in &live {
        let (rc, _) = l.run_xdp(&s.clone().flags(TCP_ACK).payload(b"x").build());
        assert_eq!(rc, XDP_PASS, "established flows keep working");
    }
    assert_eq!(reason(&l, Reason::FlowHit) as usize, 2 * live.len());
    // The GC, 3 s later, removes the stale handshakes (under pressure), not the live flows.
    let map = conntrack_gc::open(&l.pin_dir).unwrap();
    let later = conntrack_gc::monotonic_ns() + 3 * ct::NS_PER_SEC;
    let stats = conntrack_gc::pass(map.fd().as_fd(), &CtTimeouts::default(), later).unwrap();
    assert!(stats.under_pressure);
    assert_eq!(l.dp.flows().unwrap().len(), 2 * live.len(), "only the established flows are left");
    let (rc, _) = l.run_xdp(&Spec::tcp("198.18.99.1", 5000, VIP4, 80).build());
    assert_eq!(rc, XDP_PASS, "a new flow gets in again");
}

/// The torn-read test: a sync loop rewrites 40 services through the agent's own reconciler
/// (tables flip to fresh ranges, backends come and go, their ids are reused by other
/// services) while packets run on this thread. Every new flow must land on a backend of its
/// own service's pool — never on one of another service.
#[test]
fn new_flows_never_land_on_another_services_backend_while_services_are_rewritten() {
    use lb_userspace::{
        dataplane::AyaDataplane,
        model::{Backend, Desired, DesiredService, Family, NoBackend, Scope, ServiceRef},
        reconcile::{Applied, Limits, execute, plan},
    };
    use std::{
        net::IpAddr,
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, Ordering},
        },
        time::{Duration, Instant},
    };
    require_root!();
    const SERVICES: u8 = 40;
    const POOL: u8 = 6;
    let l = Loaded::with_caps(&lb_userspace::loader::Capacities {
        flows: 1 << 20,
        maglev_slots: 1 << 20,
        ..Default::default()
    });
    let vip = |i: u8| IpAddr::from([198, 19, 1, i]);
    let pool = |i: u8| (1..=POOL).map(move |h| IpAddr::from([198, 18, 100 + i, h]));
    let stop = Arc::new(AtomicBool::new(false));
    let syncs = Arc::new(AtomicU64::new(0));
    let syncer = {
        let (stop, syncs, pin_dir) = (stop.clone(), syncs.clone(), l.pin_dir.clone());
        std::thread::spawn(move || {
            let mut dp = AyaDataplane::open(&pin_dir).unwrap();
            let limits = Limits {
                max_table: 65_537,
                maglev_slots: 1 << 20,
                backends: 262_144,
                services: 1_000,
                frontends: 1 << 20,
                source_ranges: 16_384,
                members: 1 << 20,
            };
            let mut applied = Applied::read(&dp).unwrap();
            applied.track_ranges(limits.maglev_slots);
            let mut seed = 0x1234_5678_u64;
            while !stop.load(Ordering::Relaxed) {
                let mut services = std::collections::BTreeMap::new();
                for i in 0..SERVICES {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    // A changing, never empty subset of this service's own pool.
                    let mask = ((seed >> 33) as u8 % ((1 << POOL) - 1)) + 1;
                    let backends = pool(i)
                        .enumerate()
                        .filter(|(h, _)| mask & (1 << h) != 0)
                        .map(|(_, ip)| Backend { ip, port: 9376, local: true, terminating: false })
                        .collect();
                    let sref = ServiceRef {
                        namespace: "default".into(),
                        name: format!("s{i}").into(),
                        port_name: "http".into(),
                        proto: PROTO_TCP,
                        scope: Scope::Cluster,
                        family: Family::V4,
                    };
                    let s = DesiredService {
                        frontends: [(vip(i), 80)].into(),
                        backends,
                        kept: Default::default(),
                        affinity_timeout: None,
                        no_backend: NoBackend::Reject,
                        source_ranges: vec![],
                        external: false,
                    };
                    services.insert(sref, s);
                }
                let desired = Desired { services, ..Default::default() };
                let ops = plan(&desired, &applied, &limits).complete().unwrap();
                execute(&mut dp, &mut applied, &ops).unwrap();
                syncs.fetch_add(1, Ordering::Relaxed);
                // A hundred full rewrites a second: a busy cluster's worth, and more.
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    while syncs.load(Ordering::Relaxed) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (t0, mut checked, mut wrong) = (Instant::now(), 0u64, Vec::new());
    let mut n: u32 = 0;
    // Five seconds, and on a loaded machine until the counts asserted below are reached
    // (bounded: a machine that cannot reach them in 30 s fails).
    let enough = |checked: u64| checked > 10_000 && syncs.load(Ordering::Relaxed) > 50;
    while t0.elapsed() < Duration::from_secs(5)
        || (!enough(checked) && t0.elapsed() < Duration::from_secs(30))
    {
        n += 1;
        let i = (n % SERVICES as u32) as u8;
        let client = format!("198.18.200.{}", 1 + (n / 60_000) % 250);
        let spec = Spec::tcp(&client, 1024 + (n % 60_000) as u16, &vip(i).to_string(), 80);
        let (rc, out) = l.run_tc(&spec.build());
        let stats: Vec<(&str, u64)> =
            Reason::ALL.iter().map(|r| (r.name(), reason(&l, *r))).filter(|(_, n)| *n > 0).collect();
        assert_eq!(rc, TC_ACT_UNSPEC, "service {i} always has a backend: {stats:?}");
        let dst = inspect(&out).dst;
        checked += 1;
        if !pool(i).any(|ip| ip == dst) {
            wrong.push((i, dst));
        }
    }
    stop.store(true, Ordering::Relaxed);
    syncer.join().unwrap();
    let syncs = syncs.load(Ordering::Relaxed);
    eprintln!("torn reads: {checked} new flows over {syncs} syncs, {} on a foreign backend", wrong.len());
    assert!(syncs > 50 && checked > 10_000, "{syncs} syncs, {checked} packets");
    assert!(wrong.is_empty(), "flows on another service's backend: {:?}", &wrong[..wrong.len().min(10)]);
}
