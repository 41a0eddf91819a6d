//! `deploy/` is real: its manifests parse as the Kubernetes types, the RBAC rules grant
//! exactly what the agent's watchers call, and the DaemonSet's arguments parse as `lb agent`
//! flags.

use std::collections::BTreeSet;

use clap::Parser as _;
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use lb_userspace::source::kube::REQUIRED_ACCESS;
use serde::Deserialize as _;

fn docs(file: &str) -> Vec<serde_json::Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde_json::Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn one<T: serde::de::DeserializeOwned>(docs: &[serde_json::Value], kind: &str) -> T {
    let v = docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"));
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{kind} does not parse: {e}"))
}

#[test]
fn rbac_grants_exactly_what_the_agent_calls() {
    let d = docs("rbac.yaml");
    let sa: ServiceAccount = one(&d, "ServiceAccount");
    let role: ClusterRole = one(&d, "ClusterRole");
    let binding: ClusterRoleBinding = one(&d, "ClusterRoleBinding");
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                for v in &rule.verbs {
                    granted.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
    }
    let needed: BTreeSet<(String, String, String)> = REQUIRED_ACCESS
        .iter()
        .flat_map(|(g, r, verbs)| verbs.iter().map(move |v| (g.to_string(), r.to_string(), v.to_string())))
        .collect();
    assert_eq!(granted, needed);
    assert_eq!(binding.role_ref.name, role.metadata.name.clone().unwrap());
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!((subject.kind.as_str(), Some(&subject.name)), ("ServiceAccount", sa.metadata.name.as_ref()));
    assert_eq!(subject.namespace, sa.metadata.namespace);
}

#[test]
fn daemonset_runs_the_agent_like_kube_proxy_with_least_capabilities() {
    let d = docs("daemonset.yaml");
    let ds: DaemonSet = one(&d, "DaemonSet");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("lb"));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert!(
        pod.tolerations.unwrap().iter().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none())
    );
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(added, ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"].into());
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref().and_then(|p| p.http_get.as_ref()).map(|h| h.path.clone().unwrap_or_default())
    };
    assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/livez"));
    assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/healthz"));
    assert!(c.volume_mounts.iter().flatten().any(|m| m.mount_path == "/sys/fs/bpf"));
    // The host's cgroup2 hierarchy, where the connect-time programs attach.
    let cgroup = c.volume_mounts.iter().flatten().find(|m| m.name == "cgroup").expect("cgroup mount");
    let host_cgroup =
        pod.volumes.iter().flatten().find(|v| v.name == "cgroup").and_then(|v| v.host_path.clone());
    assert_eq!(host_cgroup.map(|h| h.path).as_deref(), Some("/sys/fs/cgroup"));
    // No privileged helper and no node-wide sysctl: the agent sets accept_local on the
    // interfaces it attaches to.
    assert!(pod.init_containers.is_none(), "no init container");
    assert!(
        !std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/daemonset.yaml"))
            .unwrap()
            .contains("accept_local")
    );
    // The arguments are `lb agent` flags (kube source: no --manifests).
    let args: Vec<String> =
        c.args.clone().unwrap().iter().map(|a| a.replace("$(NODE_NAME)", "node-1")).collect();
    let cli = crate::Cli::try_parse_from(std::iter::once("lb".to_string()).chain(args))
        .expect("DaemonSet args parse");
    match cli.cmd {
        crate::Cmd::Agent(a) => {
            assert!(a.manifests.is_none() && a.kubeconfig.is_none(), "in-cluster configuration");
            assert_eq!(a.node_name, "node-1");
            assert_eq!(a.cgroup_root.to_str(), Some(cgroup.mount_path.as_str()));
            assert_eq!(a.healthz_bind_address.port(), 10256);
            assert!(a.metrics_bind_address.ip().is_loopback(), "metrics on loopback, like kube-proxy");
        }
        _ => panic!("not `lb agent`"),
    }
}
