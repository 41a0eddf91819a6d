//! The Kubernetes source: `kube::runtime::watcher` (with backoff) on Services, EndpointSlices
//! and this node's Node, feeding the same Model as the manifest folder.
//!
//! List semantics, which keep the datapath steady while the API server misbehaves:
//! * A (re)list is buffered and replaces that kind's objects in one step when it is complete
//!   (`InitDone`): objects that disappeared while we were not watching are removed then, and
//!   nothing flaps in between.
//! * Until every kind has been listed once, there is no snapshot: the agent keeps whatever the
//!   pinned maps hold (a restarted agent does not empty the datapath while it connects).
//! * Errors (API server gone, 410 Gone, dropped watches) never touch the objects; the watcher
//!   retries with backoff and relists when the resource version expired.

use std::{cell::RefCell, collections::BTreeMap, fmt::Debug, rc::Rc, sync::Arc};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;

use super::slim::Keep;
use crate::{
    model::{Changes, Cluster, Key},
    objects,
};

/// The EndpointSlice annotation kube-proxy measures network programming latency from.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// What the agent needs from the API server (checked against `deploy/rbac.yaml` by a test):
/// `(API group, resource, verbs)`.
pub const REQUIRED_ACCESS: &[(&str, &str, &[&str])] = &[
    ("", "services", &["list", "watch"]),
    ("discovery.k8s.io", "endpointslices", &["list", "watch"]),
    ("", "nodes", &["get", "list", "watch"]),
];

#[derive(Default)]
struct Store {
    cluster: Cluster,
    /// Per kind (services, slices, node): listed completely at least once.
    listed: [bool; 3],
    /// Bumped on every change of `cluster`.
    generation: u64,
    /// What changed since the agent last took the changes.
    changes: Changes,
    /// Trigger times of EndpointSlice changes not yet programmed.
    triggers: Vec<jiff::Timestamp>,
    errors: u64,
}

/// The watchers' shared state; cheap to clone.
#[derive(Clone)]
pub struct KubeSource {
    store: Rc<RefCell<Store>>,
}

/// A kind we watch and where it lives in `Cluster`.
trait Watched: Resource<DynamicType = ()> + Keep + Clone + DeserializeOwned + Debug + Send + 'static {
    const SLOT: usize;
    const NAME: &'static str;
    fn map(c: &mut Cluster) -> &mut BTreeMap<Key, Arc<Self::Kept>>;
    /// Notes that the object `key` of this kind changed.
    fn note(changes: &mut Changes, key: Key);
    /// When the change this object carries was triggered (EndpointSlices only).
    fn trigger_time(&self) -> Option<jiff::Timestamp> {
        None
    }
}

fn key(meta: &ObjectMeta) -> Key {
    (meta.namespace.as_deref().unwrap_or_default().into(), meta.name.as_deref().unwrap_or_default().into())
}

impl Watched for Service {
    const SLOT: usize = 0;
    const NAME: &'static str = "services";
    fn map(c: &mut Cluster) -> &mut BTreeMap<Key, Arc<objects::Service>> {
        &mut c.services
    }
    fn note(changes: &mut Changes, key: Key) {
        changes.services.insert(key);
    }
}

impl Watched for EndpointSlice {
    const SLOT: usize = 1;
    const NAME: &'static str = "endpointslices";
    fn map(c: &mut Cluster) -> &mut BTreeMap<Key, Arc<objects::Slice>> {
        &mut c.slices
    }
    fn note(changes: &mut Changes, key: Key) {
        changes.slices.insert(key);
    }
    fn trigger_time(&self) -> Option<jiff::Timestamp> {
        self.metadata.annotations.as_ref()?.get(TRIGGER_TIME_ANNOTATION)?.parse().ok()
    }
}

impl Watched for Node {
    const SLOT: usize = 2;
    const NAME: &'static str = "nodes";
    fn map(c: &mut Cluster) -> &mut BTreeMap<Key, Arc<Self>> {
        &mut c.nodes
    }
    /// This node's addresses feed every NodePort: everything is recomputed.
    fn note(changes: &mut Changes, _key: Key) {
        changes.all = true;
    }
}

impl KubeSource {
    /// Starts the three watchers on the current `LocalSet`; `wake` is notified on every
    /// change, `log` receives warnings (API errors).
    pub fn start(
        client: Client,
        node_name: &str,
        wake: Arc<tokio::sync::Notify>,
        log: impl Fn(String) + Clone + 'static,
    ) -> KubeSource {
        let source = KubeSource { store: Rc::new(RefCell::new(Store::default())) };
        let node_cfg = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
        tokio::task::spawn_local(source.clone().watch::<Service>(
            Api::all(client.clone()),
            watcher::Config::default(),
            wake.clone(),
            log.clone(),
        ));
        tokio::task::spawn_local(source.clone().watch::<EndpointSlice>(
            Api::all(client.clone()),
            watcher::Config::default(),
            wake.clone(),
            log.clone(),
        ));
        tokio::task::spawn_local(source.clone().watch::<Node>(Api::all(client), node_cfg, wake, log));
        source
    }

    async fn watch<K: Watched>(
        self,
        api: Api<K>,
        cfg: watcher::Config,
        wake: Arc<tokio::sync::Notify>,
        log: impl Fn(String),
    ) {
        let mut stream = watcher(api, cfg).default_backoff().boxed_local();
        let mut buffer: BTreeMap<Key, Arc<K::Kept>> = BTreeMap::new();
        while let Some(event) = stream.next().await {
            let mut s = self.store.borrow_mut();
            match event {
                Ok(watcher::Event::Init) => buffer.clear(),
                Ok(watcher::Event::InitApply(o)) => {
                    buffer.insert(key(o.meta()), Arc::new(o.keep()));
                }
                Ok(watcher::Event::InitDone) => {
                    *K::map(&mut s.cluster) = std::mem::take(&mut buffer);
                    s.listed[K::SLOT] = true;
                    s.generation += 1;
                    // A relist replaces the whole kind.
                    s.changes.all = true;
                }
                Ok(watcher::Event::Apply(o)) => {
                    if let Some(t) = o.trigger_time() {
                        s.triggers.push(t);
                    }
                    let k = key(o.meta());
                    K::note(&mut s.changes, k.clone());
                    K::map(&mut s.cluster).insert(k, Arc::new(o.keep()));
                    s.generation += 1;
                }
                Ok(watcher::Event::Delete(o)) => {
                    let k = key(o.meta());
                    K::map(&mut s.cluster).remove(&k);
                    K::note(&mut s.changes, k);
                    s.generation += 1;
                }
                Err(e) => {
                    s.errors += 1;
                    log(format!("warning: watching {}: {e}; keeping the last state, retrying", K::NAME));
                    continue;
                }
            }
            drop(s);
            wake.notify_one();
        }
    }

    /// The objects and their generation, once every kind has been listed; `None` before.
    pub fn snapshot(&self) -> Option<(Cluster, u64)> {
        let s = self.store.borrow();
        s.listed.iter().all(|l| *l).then(|| (s.cluster.clone(), s.generation))
    }

    /// What changed since the last call, once every kind has been listed (the first call
    /// then says "all"); `None` before, or when nothing changed.
    pub fn take_changes(&self) -> Option<Changes> {
        let mut s = self.store.borrow_mut();
        if !s.listed.iter().all(|l| *l) || s.changes.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut s.changes))
    }

    /// Runs `f` on the objects as they are now (no copy).
    pub fn with_cluster<R>(&self, f: impl FnOnce(&Cluster) -> R) -> R {
        f(&self.store.borrow().cluster)
    }

    /// The generation of the objects (changes whenever they do).
    pub fn generation(&self) -> u64 {
        self.store.borrow().generation
    }

    /// Trigger times of EndpointSlice changes seen since the last call.
    pub fn take_triggers(&self) -> Vec<jiff::Timestamp> {
        std::mem::take(&mut self.store.borrow_mut().triggers)
    }

    /// Watch errors so far.
    pub fn errors(&self) -> u64 {
        self.store.borrow().errors
    }
}

/// A client from `--kubeconfig PATH`, else the usual inference (`KUBECONFIG`,
/// `~/.kube/config`, in-cluster service account).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("--kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| anyhow::anyhow!("--kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            anyhow::anyhow!(
                "no cluster configuration ({e}); pass --kubeconfig, run in a pod, or use --manifests DIR"
            )
        })?,
    };
    Client::try_from(config).map_err(|e| anyhow::anyhow!("Kubernetes client: {e}"))
}
