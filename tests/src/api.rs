//! An in-process stand-in for the Kubernetes API server, for the three collections the agent
//! watches. It speaks the real wire format — what the `kube` client sends and parses:
//! lists with `metadata.resourceVersion`, `watch=true` streams of newline-delimited
//! `ADDED`/`MODIFIED`/`DELETED`/`BOOKMARK` events from a resource version, `ERROR` events
//! with a `410 Expired` Status for versions older than the compaction point, `503` while
//! "unavailable", slow lists, and watches dropped on demand. Field selectors on
//! `metadata.name` are honoured (the agent's Node watch uses one).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::{Query, Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn from_path(path: &str) -> Option<Kind> {
        match path {
            "/api/v1/services" => Some(Kind::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlice),
            "/api/v1/nodes" => Some(Kind::Node),
            _ => None,
        }
    }

    fn path(self) -> &'static str {
        match self {
            Kind::Service => "/api/v1/services",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Node => "/api/v1/nodes",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }
}

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    kind: Kind,
    typ: &'static str,
    object: Value,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: Vec<Event>,
    /// Watches from a version older than this get 410 Gone.
    compacted: u64,
    unavailable: bool,
    list_delay: Duration,
    /// Requests served, as `METHOD path?query` (for assertions on relists).
    requests: Vec<String>,
}

#[derive(Clone)]
struct Shared {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<Event>,
    drops: watch::Sender<u64>,
}

/// The stand-in: its state, served on one or more listeners.
#[derive(Clone)]
pub struct ApiStandIn {
    pub addr: SocketAddr,
    shared: Shared,
}

fn object_key(kind: Kind, obj: &Value) -> (Kind, String, String) {
    let meta = &obj["metadata"];
    let ns = if kind == Kind::Node { "" } else { meta["namespace"].as_str().unwrap_or("default") };
    (kind, ns.to_string(), meta["name"].as_str().unwrap_or_default().to_string())
}

fn matches_selector(obj: &Value, selector: Option<&str>) -> bool {
    match selector.and_then(|s| s.strip_prefix("metadata.name=")) {
        Some(name) => obj["metadata"]["name"] == name,
        None => true,
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

impl ApiStandIn {
    /// Serves on 127.0.0.1 (a free port) of the current network namespace.
    pub async fn start() -> ApiStandIn {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Self::start_on(listener)
    }

    /// Serves on `listener` (bound by the caller, in whatever namespace it chose). Must run
    /// inside a tokio runtime.
    pub fn start_on(listener: std::net::TcpListener) -> ApiStandIn {
        let (events, _) = broadcast::channel(4096);
        let (drops, _) = watch::channel(0);
        let shared =
            Shared { inner: Arc::new(Mutex::new(Inner { rv: 1, ..Default::default() })), events, drops };
        let s = ApiStandIn { addr: listener.local_addr().unwrap(), shared };
        s.serve(listener);
        s
    }

    /// Serves the same state on another listener too.
    pub fn serve(&self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).unwrap();
        // TCP_NODELAY, as the real API server (Go) sets on every connection: without it a
        // watch event written behind an unacknowledged one waits for the delayed ACK (~40 ms).
        let listener =
            axum::serve::ListenerExt::tap_io(tokio::net::TcpListener::from_std(listener).unwrap(), |s| {
                let _ = s.set_nodelay(true);
            });
        let app = axum::Router::new().fallback(handle).with_state(self.shared.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
    }

    /// A `kube` client for this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// A kubeconfig file's text pointing at `http://addr`.
    pub fn kubeconfig(addr: SocketAddr) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster: {{server: 'http://{addr}'}}\n\
             users:\n- name: standin\n  user: {{}}\ncontexts:\n- name: standin\n  context: {{cluster: standin, user: standin}}\n\
             current-context: standin\n"
        )
    }

    /// Creates or replaces an object (ADDED or MODIFIED to watchers).
    pub fn apply(&self, kind: Kind, mut obj: Value) {
        let mut g = self.shared.inner.lock().unwrap();
        g.rv += 1;
        let rv = g.rv;
        obj["apiVersion"] = json!(kind.api_version());
        obj["kind"] = json!(kind.name());
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if kind != Kind::Node && obj["metadata"]["namespace"].is_null() {
            obj["metadata"]["namespace"] = json!("default");
        }
        let key = object_key(kind, &obj);
        let typ = if g.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        g.objects.insert(key, obj.clone());
        let ev = Event { rv, kind, typ, object: obj };
        g.history.push(ev.clone());
        let _ = self.shared.events.send(ev);
    }

    /// Deletes an object (DELETED to watchers).
    pub fn delete(&self, kind: Kind, ns: &str, name: &str) {
        let mut g = self.shared.inner.lock().unwrap();
        let ns = if kind == Kind::Node { "" } else { ns };
        let Some(mut obj) = g.objects.remove(&(kind, ns.to_string(), name.to_string())) else { return };
        g.rv += 1;
        let rv = g.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ev = Event { rv, kind, typ: "DELETED", object: obj };
        g.history.push(ev.clone());
        let _ = self.shared.events.send(ev);
    }

    /// Ends every open watch (the client reconnects from its last resource version).
    pub fn drop_watches(&self) {
        self.shared.drops.send_modify(|g| *g += 1);
    }

    /// Forgets history: watches resuming from any version seen so far get 410 Gone.
    pub fn compact(&self) {
        let mut g = self.shared.inner.lock().unwrap();
        g.compacted = g.rv + 1;
    }

    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.inner.lock().unwrap().unavailable = unavailable;
    }

    pub fn set_list_delay(&self, d: Duration) {
        self.shared.inner.lock().unwrap().list_delay = d;
    }

    /// The objects as k8s-openapi types: the ground truth for the Model.
    pub fn cluster(&self) -> lb_userspace::model::Cluster {
        let g = self.shared.inner.lock().unwrap();
        let mut c = lb_userspace::model::Cluster::default();
        for ((kind, ns, name), v) in &g.objects {
            let k: lb_userspace::model::Key = (ns.as_str().into(), name.as_str().into());
            fn typed<T: serde::de::DeserializeOwned + lb_userspace::source::slim::Keep>(
                v: &Value,
            ) -> std::sync::Arc<T::Kept> {
                let object: T = serde_json::from_value(v.clone())
                    .expect("stand-in objects are valid k8s-openapi objects");
                std::sync::Arc::new(object.keep())
            }
            match kind {
                Kind::Service => drop(c.services.insert(k, typed::<k8s_openapi::api::core::v1::Service>(v))),
                Kind::EndpointSlice => {
                    drop(c.slices.insert(k, typed::<k8s_openapi::api::discovery::v1::EndpointSlice>(v)))
                }
                Kind::Node => drop(c.nodes.insert(k, typed::<k8s_openapi::api::core::v1::Node>(v))),
            }
        }
        c
    }

    /// Lists requested so far for `kind` (not watches; failed ones count).
    pub fn lists(&self, kind: Kind) -> usize {
        let prefix = format!("{}?", kind.path());
        let g = self.shared.inner.lock().unwrap();
        g.requests.iter().filter(|r| r.contains(&prefix) && !r.contains("watch=true")).count()
    }

    /// Requests of any kind (lists and watches, failed ones too) made so far.
    pub fn requests(&self) -> usize {
        self.shared.inner.lock().unwrap().requests.len()
    }
}

async fn handle(
    State(shared): State<Shared>,
    Query(q): Query<BTreeMap<String, String>>,
    req: Request,
) -> Response {
    let path = req.uri().path().to_string();
    let Some(kind) = Kind::from_path(&path) else {
        return (StatusCode::NOT_FOUND, axum::Json(status(404, "NotFound", &path))).into_response();
    };
    let (unavailable, delay) = {
        let mut g = shared.inner.lock().unwrap();
        g.requests.push(format!("{} {}", req.method(), req.uri()));
        (g.unavailable, g.list_delay)
    };
    if unavailable {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(status(503, "ServiceUnavailable", "stand-in down")),
        )
            .into_response();
    }
    let selector = q.get("fieldSelector").cloned();
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let timeout = q.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290u64);
        return watch_response(shared, kind, from, selector, Duration::from_secs(timeout));
    }
    tokio::time::sleep(delay).await;
    let g = shared.inner.lock().unwrap();
    let items: Vec<&Value> = g
        .objects
        .iter()
        .filter(|((k, _, _), v)| *k == kind && matches_selector(v, selector.as_deref()))
        .map(|(_, v)| v)
        .collect();
    let body = json!({"apiVersion": kind.api_version(), "kind": format!("{}List", kind.name()),
                      "metadata": {"resourceVersion": g.rv.to_string()}, "items": items});
    axum::Json(body).into_response()
}

fn line(v: &Value) -> Result<Bytes, Infallible> {
    let mut s = v.to_string();
    s.push('\n');
    Ok(Bytes::from(s))
}

fn watch_response(
    shared: Shared,
    kind: Kind,
    from: u64,
    selector: Option<String>,
    timeout: Duration,
) -> Response {
    // Subscribe before reading history (under the lock) so no event falls in between.
    let (backlog, mut live, mut last) = {
        let g = shared.inner.lock().unwrap();
        if from < g.compacted {
            let msg = format!("too old resource version: {from} ({})", g.compacted);
            let ev = json!({"type": "ERROR", "object": status(410, "Expired", &msg)});
            return Response::new(Body::from_stream(futures::stream::iter([line(&ev)])));
        }
        let backlog: Vec<Event> =
            g.history.iter().filter(|e| e.kind == kind && e.rv > from).cloned().collect();
        (backlog, shared.events.subscribe(), g.rv)
    };
    let mut drops = shared.drops.subscribe();
    drops.mark_unchanged();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(async move {
        let send = |e: &Event| json!({"type": e.typ, "object": e.object});
        for e in backlog.iter().filter(|e| matches_selector(&e.object, selector.as_deref())) {
            if tx.send(line(&send(e))).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut bookmarks = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                ev = live.recv() => match ev {
                    // Published under the lock after our history snapshot: all new.
                    Ok(e) => {
                        last = e.rv;
                        let ours = e.kind == kind && matches_selector(&e.object, selector.as_deref());
                        if ours && tx.send(line(&send(&e))).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                },
                _ = bookmarks.tick() => {
                    // Only versions this stream has passed: a resume from it misses nothing.
                    let rv = last;
                    let b = json!({"type": "BOOKMARK", "object": {"kind": kind.name(), "apiVersion": kind.api_version(),
                                   "metadata": {"resourceVersion": rv.to_string()}}});
                    if tx.send(line(&b)).await.is_err() {
                        return;
                    }
                }
                _ = drops.changed() => return,
                _ = &mut deadline => return,
            }
        }
    });
    Response::new(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)))
}
