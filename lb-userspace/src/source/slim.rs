//! What the agent keeps of each object as it arrives, from either source: the fields the
//! Model reads, nothing else.
//!
//! Objects from an API server carry `managedFields`, annotations, owner references and
//! (Nodes) image lists and conditions: kilobytes per object that no part of the agent reads,
//! held for as long as the object lives, on every node. Services and EndpointSlices are kept
//! in the agent's own compact form (`objects`); a Node (one per agent) is slimmed to its
//! addresses and zone label. (`desired()` of a cluster as `kubectl get -o yaml` shows it is
//! that of its bare form: tested below.)

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{Node, NodeStatus, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{objects, topology::ZONE_LABEL};

/// An object as it arrives, and what the agent keeps of it.
pub trait Keep: Sized {
    type Kept;
    fn keep(&self) -> Self::Kept;
}

impl Keep for Service {
    type Kept = objects::Service;
    fn keep(&self) -> objects::Service {
        objects::Service::from(self)
    }
}

impl Keep for EndpointSlice {
    type Kept = objects::Slice;
    fn keep(&self) -> objects::Slice {
        objects::Slice::from(self)
    }
}

impl Keep for Node {
    type Kept = Node;
    /// The name, the zone label and the addresses.
    fn keep(&self) -> Node {
        let labels: Option<BTreeMap<String, String>> = self.metadata.labels.as_ref().map(|l| {
            l.iter().filter(|(k, _)| k.as_str() == ZONE_LABEL).map(|(k, v)| (k.clone(), v.clone())).collect()
        });
        let addresses = self.status.as_ref().and_then(|s| s.addresses.clone());
        Node {
            metadata: ObjectMeta {
                name: self.metadata.name.clone(),
                labels: labels.filter(|l| !l.is_empty()),
                ..Default::default()
            },
            spec: None,
            status: addresses.map(|a| NodeStatus { addresses: Some(a), ..Default::default() }),
        }
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

    /// The same cluster with only the fields the Model reads.
    const BARE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, creationTimestamp: "2026-11-01T10:00:00Z"}
spec:
  type: LoadBalancer
  clusterIP: 198.19.0.10
  selector: {app: web}
  externalTrafficPolicy: Local
  healthCheckNodePort: 31000
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, nodePort: 30080}]
status:
  loadBalancer: {ingress: [{ip: 198.18.100.1}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [198.18.1.10], nodeName: node-1, hints: {forZones: [{name: zone-a}]}}
- addresses: [198.18.2.10]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: node-2
---
apiVersion: v1
kind: Node
metadata: {name: node-1, labels: {topology.kubernetes.io/zone: zone-a}}
status: {addresses: [{type: InternalIP, address: 198.18.0.1}]}
"#;

    fn cluster(text: &str) -> Cluster {
        manifests::cluster_from(manifests::parse(text, false).unwrap())
    }

    #[test]
    fn a_busy_clusters_objects_give_what_their_bare_form_gives() {
        let node = model::NodeContext {
            name: "node-1".into(),
            nodeport_addresses: model::NodePortAddresses::Primary,
            fallback_addresses: vec![],
        };
        let full = model::desired(&cluster(FULL), &node);
        assert!(!full.services.is_empty() && !full.health_checks.is_empty());
        assert_eq!(model::desired(&cluster(BARE), &node), full);
        assert_eq!(cluster(BARE).services, cluster(FULL).services);
        assert_eq!(cluster(BARE).slices, cluster(FULL).slices);
    }

    #[test]
    fn what_is_kept_is_what_the_rules_read() {
        let c = cluster(FULL);
        let svc = c.services.values().next().unwrap();
        assert_eq!(*svc.cluster_ips, ["198.19.0.10".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(svc.affinity_timeout, Some(model::DEFAULT_AFFINITY_TIMEOUT));
        assert!(svc.external_local && svc.selected && svc.created.is_some());
        let slice = c.slices.values().next().unwrap();
        assert_eq!(slice.service.as_deref(), Some("web"));
        let [a, b] = &*slice.endpoints else { panic!("two endpoints: {slice:?}") };
        assert_eq!(a.hints().zones, ["zone-a"]);
        assert!(a.ready && !b.ready && b.serving && b.terminating && b.hints.is_none());
        let node = c.nodes.values().next().unwrap();
        assert_eq!(node.status.as_ref().unwrap().images, None);
        assert_eq!(node.metadata.labels.as_ref().unwrap().len(), 1);
    }
}
