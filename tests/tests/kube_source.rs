//! The Kubernetes source against an in-process API server stand-in (`lb_tests::api`), with
//! the real `kube` client and watcher. After each scenario, the fake Dataplane (programmed
//! incrementally from what the source delivered, through the real Model and Reconciler)
//! must equal what the Model computes from the stand-in's objects, programmed from scratch.
//! No root needed: this is tier L1 (run by `cargo xtask test` with the host tests).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use lb_common::abi::*;
use lb_tests::api::{ApiStandIn, Kind};
use lb_userspace::{
    agent::sync::Syncer,
    dataplane::{Dataplane, FakeDataplane},
    model::{self, NodeContext, NodePortAddresses},
    reconcile::{self, Applied, Limits},
    source::{Source, kube::KubeSource},
};
use serde_json::{Value, json};

const LIMITS: Limits = Limits {
    max_table: 65_537,
    maglev_slots: 1 << 20,
    backends: 4096,
    services: 4096,
    frontends: 1 << 20,
    source_ranges: 16_384,
    members: 1 << 20,
};

fn node() -> NodeContext {
    NodeContext {
        name: "node-1".into(),
        nodeport_addresses: NodePortAddresses::Primary,
        fallback_addresses: vec![],
    }
}

/// What a datapath does, independent of ids: frontend -> (flags, backends new flows get).
type View = BTreeMap<(IpAddr, u16, u8), (u32, BTreeSet<(IpAddr, u16, u8)>)>;

fn view(dp: &FakeDataplane) -> View {
    dp.services
        .iter()
        .map(|(k, v)| {
            let ids: BTreeSet<u32> =
                dp.read_maglev(v.maglev_offset, v.maglev_size).unwrap().into_iter().collect();
            let bes = ids.iter().map(|id| dp.backends[id]).map(|b| (b.ip(), b.port(), b.flags)).collect();
            ((k.ip(), k.port(), k.proto), (v.flags, bes))
        })
        .collect()
}

/// The datapath the Model makes of the stand-in's objects, programmed from scratch.
fn expected(api: &ApiStandIn) -> View {
    let desired = model::desired(&api.cluster(), &node());
    let mut dp = FakeDataplane::default();
    let mut applied = Applied::default();
    let ops = reconcile::plan(&desired, &applied, &LIMITS).complete().unwrap();
    reconcile::execute(&mut dp, &mut applied, &ops).unwrap();
    view(&dp)
}

/// The agent's sync (`lb_userspace::agent::sync::Syncer`, the code `lb agent` runs) on the
/// kube source and a fake datapath, turned by the test.
struct Agent {
    src: Source,
    wake: Arc<tokio::sync::Notify>,
    dp: FakeDataplane,
    syncer: Syncer,
}

impl Agent {
    fn start(api: &ApiStandIn, dp: FakeDataplane) -> Agent {
        let wake = Arc::new(tokio::sync::Notify::new());
        let src = Source::Kube(KubeSource::start(api.client(), "node-1", wake.clone(), |m| eprintln!("{m}")));
        let syncer = Syncer::new(Applied::read(&dp).unwrap(), LIMITS);
        Agent { src, wake, dp, syncer }
    }

    fn kube(&self) -> &KubeSource {
        match &self.src {
            Source::Kube(k) => k,
            Source::Folder { .. } => unreachable!("started on the API"),
        }
    }

    fn sync_once(&mut self) {
        let outcome = self.syncer.sync(
            &mut self.dp,
            &mut self.src,
            &node(),
            lb_userspace::agent::sync::Hooks {
                config_for: |_: &[_]| Config::default(),
                names: |_: &_| {},
                outgrown: lb_userspace::agent::sync::never_outgrown,
                own_backend: None::<fn()>,
            },
            false,
            Instant::now(),
        );
        if let Some(o) = outcome.expect("the fake's maps read back") {
            assert!(o.ok(), "a sync failed: {o:?}");
        }
    }

    /// Runs the loop until the datapath equals the Model of the stand-in's objects.
    async fn converge(&mut self, api: &ApiStandIn, what: &str) {
        let want = expected(api);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.sync_once();
            if view(&self.dp) == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: did not converge\nhave {:#?}\nwant {want:#?}",
                view(&self.dp)
            );
            let _ = tokio::time::timeout(Duration::from_millis(50), self.wake.notified()).await;
        }
    }

    /// Runs the loop for `d`, checking `invariant` on the datapath all along.
    async fn hold(&mut self, d: Duration, what: &str, invariant: impl Fn(&View) -> bool) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.sync_once();
            assert!(invariant(&view(&self.dp)), "{what}: {:#?}", view(&self.dp));
            let _ = tokio::time::timeout(Duration::from_millis(20), self.wake.notified()).await;
        }
    }
}

fn service(name: &str, vip: &str, ports: Value) -> Value {
    json!({"metadata": {"name": name}, "spec": {"type": "NodePort", "clusterIP": vip, "ports": ports}})
}

fn http() -> Value {
    json!([{"name": "http", "port": 80, "targetPort": 9376, "nodePort": 30080}])
}

fn slice(name: &str, service: &str, port: u16, ips: &[&str]) -> Value {
    let eps: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "nodeName": "node-1", "conditions": {"ready": true}}))
        .collect();
    json!({"metadata": {"name": name, "labels": {"kubernetes.io/service-name": service},
                        "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-22T04:00:00Z"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}], "endpoints": eps})
}

fn node_object() -> Value {
    json!({"metadata": {"name": "node-1"}, "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.1"}]}})
}

fn seed(api: &ApiStandIn) {
    api.apply(Kind::Node, node_object());
    // Another node: the agent's field selector must keep it out.
    api.apply(Kind::Node, json!({"metadata": {"name": "node-2"}, "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.2"}]}}));
    api.apply(Kind::Service, service("web", "198.19.0.10", http()));
    api.apply(Kind::EndpointSlice, slice("web-a", "web", 9376, &["198.18.1.10", "198.18.1.11"]));
    api.apply(
        Kind::Service,
        service("db", "198.19.0.20", json!([{"name": "http", "port": 80, "nodePort": 30081}])),
    );
    api.apply(Kind::EndpointSlice, slice("db-a", "db", 5432, &["198.18.1.20"]));
}

fn has_frontend(v: &View, ip: &str, port: u16) -> bool {
    v.contains_key(&(ip.parse().unwrap(), port, PROTO_TCP))
}

fn backends_of(v: &View, ip: &str, port: u16) -> usize {
    v.get(&(ip.parse().unwrap(), port, PROTO_TCP)).map_or(0, |(_, b)| b.len())
}

async fn local<F: std::future::Future<Output = ()>>(f: F) {
    tokio::task::LocalSet::new().run_until(f).await;
}

#[tokio::test(flavor = "current_thread")]
async fn initial_sync_and_add_modify_delete() {
    local(async {
        let api = ApiStandIn::start().await;
        seed(&api);
        let mut agent = Agent::start(&api, FakeDataplane::default());
        agent.converge(&api, "initial sync").await;
        let v = view(&agent.dp);
        assert!(has_frontend(&v, "198.19.0.10", 80) && has_frontend(&v, "198.18.0.1", 30080), "{v:#?}");
        assert!(!has_frontend(&v, "198.18.0.2", 30080), "another node's address must not serve NodePorts");
        assert_eq!(backends_of(&v, "198.19.0.10", 80), 2);

        api.apply(Kind::Service, service("new", "198.19.0.30", json!([{"name": "http", "port": 8080}])));
        api.apply(Kind::EndpointSlice, slice("new-a", "new", 80, &["198.18.1.30"]));
        agent.converge(&api, "add").await;
        api.apply(
            Kind::EndpointSlice,
            slice("web-a", "web", 9376, &["198.18.1.10", "198.18.1.12", "198.18.1.13"]),
        );
        agent.converge(&api, "modify").await;
        assert_eq!(backends_of(&view(&agent.dp), "198.19.0.10", 80), 3);
        api.delete(Kind::Service, "default", "db");
        api.delete(Kind::EndpointSlice, "default", "db-a");
        agent.converge(&api, "delete").await;
        assert!(!has_frontend(&view(&agent.dp), "198.19.0.20", 80));
        // Changes after the initial list carry trigger times (programming latency).
        assert!(!agent.kube().take_triggers().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn service_split_over_slices_and_a_slice_moving_between_services() {
    local(async {
        let api = ApiStandIn::start().await;
        seed(&api);
        api.apply(Kind::EndpointSlice, slice("web-b", "web", 9376, &["198.18.2.10"]));
        let mut agent = Agent::start(&api, FakeDataplane::default());
        agent.converge(&api, "two slices").await;
        assert_eq!(backends_of(&view(&agent.dp), "198.19.0.10", 80), 3);
        // web-b now belongs to db (label change): it leaves web and joins db.
        api.apply(Kind::EndpointSlice, slice("web-b", "db", 5432, &["198.18.2.10"]));
        agent.converge(&api, "slice moved").await;
        let v = view(&agent.dp);
        assert_eq!((backends_of(&v, "198.19.0.10", 80), backends_of(&v, "198.19.0.20", 80)), (2, 2));
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn disconnect_and_resume_without_relisting() {
    local(async {
        let api = ApiStandIn::start().await;
        seed(&api);
        let mut agent = Agent::start(&api, FakeDataplane::default());
        agent.converge(&api, "initial").await;
        let lists = api.lists(Kind::Service);
        api.drop_watches();
        // Changes while the watches are down arrive when they resume from their version.
        api.apply(Kind::EndpointSlice, slice("web-a", "web", 9376, &["198.18.1.10"]));
        agent.converge(&api, "resumed").await;
        assert_eq!(api.lists(Kind::Service), lists, "a resumable watch must not relist");
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn gone_410_relists_and_removes_what_was_deleted_meanwhile_without_flapping() {
    local(async {
        let api = ApiStandIn::start().await;
        seed(&api);
        let mut agent = Agent::start(&api, FakeDataplane::default());
        agent.converge(&api, "initial").await;
        let lists = api.lists(Kind::EndpointSlice);
        // Disconnected: db is deleted and history is compacted, so the resume gets 410.
        api.set_list_delay(Duration::from_millis(800));
        api.drop_watches();
        api.delete(Kind::Service, "default", "db");
        api.delete(Kind::EndpointSlice, "default", "db-a");
        api.compact();
        // While the relist is slow, nothing flaps: web keeps its frontend and backends.
        agent
            .hold(Duration::from_millis(600), "during relist", |v| backends_of(v, "198.19.0.10", 80) == 2)
            .await;
        agent.converge(&api, "after relist").await;
        assert!(!has_frontend(&view(&agent.dp), "198.19.0.20", 80), "deleted while away");
        // Each watcher meets its 410 when its own backoff lets it reconnect: the slices' relist
        // may come after the Services' has already brought the datapath to the new state.
        let deadline = Instant::now() + Duration::from_secs(10);
        while api.lists(Kind::EndpointSlice) <= lists && Instant::now() < deadline {
            agent.hold(Duration::from_millis(50), "waiting for the slices' relist", |_| true).await;
        }
        assert!(api.lists(Kind::EndpointSlice) > lists, "410 must trigger a relist");
        agent.converge(&api, "after the slices' relist").await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn api_unavailable_at_start_and_later_never_empties_the_datapath() {
    local(async {
        let api = ApiStandIn::start().await;
        seed(&api);
        // A restarted agent: the pinned maps already hold web and db.
        let mut dp = FakeDataplane::default();
        let mut applied = Applied::default();
        let desired = model::desired(&api.cluster(), &node());
        let ops = reconcile::plan(&desired, &applied, &LIMITS).complete().unwrap();
        reconcile::execute(&mut dp, &mut applied, &ops).unwrap();
        let before = view(&dp);
        api.set_unavailable(true);
        let mut agent = Agent::start(&api, dp);
        agent.hold(Duration::from_millis(1500), "API down at start", |v| *v == before).await;
        assert!(agent.kube().snapshot().is_none());
        assert!(api.lists(Kind::Service) > 0, "the client kept trying");
        api.set_unavailable(false);
        agent.converge(&api, "API back").await;
        // Down again, later: state kept.
        api.set_unavailable(true);
        api.drop_watches();
        let kept = view(&agent.dp);
        // A broken watch is resumed from its version, not relisted: count every request.
        let tries = api.requests();
        agent.hold(Duration::from_millis(1500), "API down later", |v| *v == kept).await;
        // Not a dead client that would also keep the state: it keeps asking, state kept all
        // along. (Its backoff carries over from the outage at start, as kube's watcher resets
        // it only after two quiet minutes: the next try may be seconds away.)
        let deadline = Instant::now() + Duration::from_secs(20);
        while api.requests() == tries {
            assert!(Instant::now() < deadline, "no request tried while down for 20 s");
            agent.hold(Duration::from_millis(200), "API down later", |v| *v == kept).await;
        }
        api.set_unavailable(false);
        api.apply(Kind::EndpointSlice, slice("web-a", "web", 9376, &["198.18.1.99"]));
        agent.converge(&api, "API back again").await;
    })
    .await;
}

/// An API server's objects carry managedFields, annotations, owner references and (Nodes)
/// image lists: kilobytes per object that no rule reads. The source keeps only what the
/// Model reads (`source::slim`), and the Model's answer is the same.
#[tokio::test(flavor = "current_thread")]
async fn the_source_keeps_only_what_the_model_reads() {
    local(async {
        let api = ApiStandIn::start().await;
        seed(&api);
        let managed = json!([{"manager": "kubectl", "operation": "Update", "apiVersion": "v1",
                              "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:ports": {}}}}]);
        let mut web = service("web", "198.19.0.10", http());
        web["metadata"]["managedFields"] = managed.clone();
        web["metadata"]["annotations"] = json!({"kubectl.kubernetes.io/last-applied-configuration": "{}"});
        web["metadata"]["labels"] = json!({"app": "web"});
        api.apply(Kind::Service, web);
        let mut s = slice("web-a", "web", 9376, &["198.18.1.10", "198.18.1.11"]);
        s["metadata"]["managedFields"] = managed;
        s["endpoints"][0]["targetRef"] = json!({"kind": "Pod", "name": "web-0", "namespace": "default"});
        api.apply(Kind::EndpointSlice, s);
        let mut n = node_object();
        n["status"]["images"] = json!([{"names": ["registry.example/app:v1"], "sizeBytes": 1000000}]);
        api.apply(Kind::Node, n);
        let mut agent = Agent::start(&api, FakeDataplane::default());
        agent.converge(&api, "initial sync").await;
        // What is kept of each is what its bare form gives: the extra fields leave nothing.
        let bare_web: k8s_openapi::api::core::v1::Service =
            serde_json::from_value(service("web", "198.19.0.10", http())).unwrap();
        let bare_slice: k8s_openapi::api::discovery::v1::EndpointSlice =
            serde_json::from_value(slice("web-a", "web", 9376, &["198.18.1.10", "198.18.1.11"])).unwrap();
        agent.kube().with_cluster(|c| {
            let web = &c.services[&("default".into(), "web".into())];
            assert_eq!(**web, lb_userspace::objects::Service::from(&bare_web));
            let s = &c.slices[&("default".into(), "web-a".into())];
            assert_eq!(**s, lb_userspace::objects::Slice::from(&bare_slice));
            assert_eq!(s.service.as_deref(), Some("web"), "the service-name label is read");
            let node = c.node("node-1").expect("this node");
            assert_eq!(node.status.as_ref().and_then(|s| s.images.as_ref()), None);
        });
    })
    .await;
}
