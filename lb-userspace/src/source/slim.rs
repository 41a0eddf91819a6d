//! What the agent keeps of each object: the fields the Model reads, nothing else.
//!
//! Objects from an API server carry `managedFields`, annotations, owner references and
//! (Nodes) image lists and conditions: kilobytes per object that no part of the agent reads,
//! held for as long as the object lives, on every node. Both sources slim each object as it
//! arrives, so the agent's memory follows what it uses. (`desired()` of a slimmed cluster is
//! the full one's: tested below.)

use std::sync::Arc;

use k8s_openapi::{
    api::{
        core::v1::{LoadBalancerStatus, Node, NodeStatus, Service, ServiceStatus},
        discovery::v1::{Endpoint, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{
    model::{MANAGED_BY_LABEL, PROXY_NAME_LABEL, SERVICE_NAME_LABEL},
    topology::ZONE_LABEL,
};

/// An object that can be slimmed: what both sources call on what they keep.
pub trait Slim: Sized + Clone {
    fn slim(self) -> Self;

    /// `slim` of a shared object (moved out when this is the only reference).
    fn slim_shared(this: Arc<Self>) -> Arc<Self> {
        Arc::new(Arc::unwrap_or_clone(this).slim())
    }
}

impl Slim for Service {
    fn slim(self) -> Self {
        service(self)
    }
}

impl Slim for EndpointSlice {
    fn slim(self) -> Self {
        slice(self)
    }
}

impl Slim for Node {
    fn slim(self) -> Self {
        node(self)
    }
}

/// Name, namespace, creation time (it settles who owns a contested frontend) and the labels
/// in `keep`.
fn meta(m: ObjectMeta, keep: &[&str]) -> ObjectMeta {
    let labels = m.labels.map(|l| l.into_iter().filter(|(k, _)| keep.contains(&k.as_str())).collect());
    ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        creation_timestamp: m.creation_timestamp,
        labels: labels.filter(|l: &std::collections::BTreeMap<_, _>| !l.is_empty()),
        ..Default::default()
    }
}

/// The spec whole (small, and read nearly everywhere), the load balancer's status.
pub fn service(s: Service) -> Service {
    let load_balancer =
        s.status.and_then(|st| st.load_balancer).filter(|lb| lb != &LoadBalancerStatus::default());
    Service {
        metadata: meta(s.metadata, &[PROXY_NAME_LABEL]),
        spec: s.spec,
        status: load_balancer.map(|lb| ServiceStatus { load_balancer: Some(lb), ..Default::default() }),
    }
}

/// Addresses, conditions, node and hints of each endpoint; the ports; the owner label.
pub fn slice(s: EndpointSlice) -> EndpointSlice {
    let endpoints = s
        .endpoints
        .into_iter()
        .map(|e| Endpoint {
            addresses: e.addresses,
            conditions: e.conditions,
            hints: e.hints,
            node_name: e.node_name,
            ..Default::default()
        })
        .collect();
    EndpointSlice {
        metadata: meta(s.metadata, &[SERVICE_NAME_LABEL, MANAGED_BY_LABEL]),
        address_type: s.address_type,
        endpoints,
        ports: s.ports,
    }
}

/// The zone label and the addresses.
pub fn node(n: Node) -> Node {
    let addresses = n.status.and_then(|s| s.addresses);
    Node {
        metadata: meta(n.metadata, &[ZONE_LABEL]),
        spec: None,
        status: addresses.map(|a| NodeStatus { addresses: Some(a), ..Default::default() }),
    }
}

#[cfg(test)]
mod tests {
    use crate::{
        model::{self, Cluster},
        source::manifests,
    };

    /// What `kubectl get -o yaml` shows of a busy cluster: every field a real API server
    /// fills in, most of which no rule reads.
    const FULL: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  uid: 4b8a3c1e-0000-4000-8000-000000000001
  resourceVersion: "123456"
  creationTimestamp: "2026-11-01T10:00:00Z"
  labels: {app: web, team: shop}
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: '{"apiVersion":"v1","kind":"Service","metadata":{"name":"web"}}'
  managedFields:
  - manager: kubectl-client-side-apply
    operation: Update
    apiVersion: v1
    time: "2026-11-01T10:00:00Z"
    fieldsType: FieldsV1
    fieldsV1: {"f:spec": {"f:ports": {}}}
spec:
  type: LoadBalancer
  clusterIP: 198.19.0.10
  clusterIPs: [198.19.0.10]
  ipFamilies: [IPv4]
  selector: {app: web}
  externalTrafficPolicy: Local
  healthCheckNodePort: 31000
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}]
status:
  loadBalancer: {ingress: [{ip: 198.18.100.1}]}
  conditions: [{type: Ready, status: "True", lastTransitionTime: "2026-11-01T10:00:00Z", reason: x, message: y}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels: {kubernetes.io/service-name: web, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io, app: web}
  annotations: {endpoints.kubernetes.io/last-change-trigger-time: "2026-11-01T10:00:00Z"}
  ownerReferences: [{apiVersion: v1, kind: Service, name: web, uid: 4b8a3c1e-0000-4000-8000-000000000001}]
  generateName: web-
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [198.18.1.10]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-1
  zone: zone-a
  hostname: web-0
  targetRef: {kind: Pod, name: web-0, namespace: default, uid: 4b8a3c1e-0000-4000-8000-000000000002}
  hints: {forZones: [{name: zone-a}]}
- addresses: [198.18.2.10]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: node-2
  zone: zone-b
  targetRef: {kind: Pod, name: web-1, namespace: default}
---
apiVersion: v1
kind: Node
metadata:
  name: node-1
  labels: {topology.kubernetes.io/zone: zone-a, kubernetes.io/hostname: node-1}
spec: {podCIDR: 198.18.64.0/24}
status:
  addresses: [{type: InternalIP, address: 198.18.0.1}, {type: Hostname, address: node-1}]
  images: [{names: [registry.example/app:v1], sizeBytes: 1000000}]
  nodeInfo: {architecture: amd64, bootID: b, containerRuntimeVersion: c, kernelVersion: k, kubeProxyVersion: p, kubeletVersion: v, machineID: m, operatingSystem: linux, osImage: o, systemUUID: s}
"#;

    fn cluster(slimmed: bool) -> Cluster {
        let objects = manifests::parse(FULL, false).unwrap();
        let objects = objects.into_iter().map(|o| if slimmed { o.slimmed() } else { o });
        manifests::cluster_from(objects.collect())
    }

    #[test]
    fn a_slimmed_cluster_gives_the_same_desired_state() {
        let node = model::NodeContext {
            name: "node-1".into(),
            nodeport_addresses: model::NodePortAddresses::Primary,
            fallback_addresses: vec![],
        };
        let full = model::desired(&cluster(false), &node);
        assert!(!full.services.is_empty() && !full.health_checks.is_empty());
        assert_eq!(model::desired(&cluster(true), &node), full);
    }

    #[test]
    fn slimming_drops_what_no_rule_reads() {
        let c = cluster(true);
        let svc = c.services.values().next().unwrap();
        assert_eq!(svc.metadata.managed_fields, None);
        assert_eq!(svc.metadata.annotations, None);
        assert_eq!(svc.metadata.labels, None, "app and team are not read");
        assert_eq!(svc.status.as_ref().unwrap().conditions, None);
        let slice = c.slices.values().next().unwrap();
        assert_eq!(slice.metadata.labels.as_ref().unwrap().len(), 2);
        assert!(slice.endpoints.iter().all(|e| e.target_ref.is_none() && e.zone.is_none()));
        let node = c.nodes.values().next().unwrap();
        assert_eq!(node.status.as_ref().unwrap().images, None);
        assert_eq!(node.metadata.labels.as_ref().unwrap().len(), 1);
    }
}
