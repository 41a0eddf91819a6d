//! The manifest-folder source: `*.yaml|*.yml|*.json`, multi-document, kinds `v1/Service`,
//! `discovery.k8s.io/v1/EndpointSlice` and `v1/Node`, parsed into k8s-openapi's types.
//!
//! Changes are noticed through inotify at once (`watch`), and the folder is also polled
//! (mtime, size, inode) every `POLL` as a safety net, so a change is live in milliseconds
//! whatever wrote it. Each file is all-or-nothing: one that fails to parse or validate
//! is reported with its path and reason, and its last good content stays in effect.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize as _;

use crate::model::{Cluster, SERVICE_NAME_LABEL};

/// How often the folder is checked without an inotify event.
pub const POLL: Duration = Duration::from_millis(250);

/// Calls `on_change` whenever something in `dir` is created, written, moved or deleted
/// (inotify, from a reader thread for the life of the process).
pub fn watch(dir: &Path, on_change: impl Fn() + Send + 'static) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // SAFETY: inotify syscalls; the fd is owned by `OwnedFd` from here on.
    let fd = unsafe {
        let fd = libc::inotify_init1(libc::IN_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(fd)
    };
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mask = libc::IN_CLOSE_WRITE
        | libc::IN_MOVED_TO
        | libc::IN_MOVED_FROM
        | libc::IN_DELETE
        | libc::IN_CREATE
        | libc::IN_MODIFY
        | libc::IN_ATTRIB;
    // SAFETY: valid fd and C string.
    if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::thread::Builder::new().name("inotify-manifests".into()).spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // SAFETY: reading into our own buffer.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if n <= 0 {
                return;
            }
            on_change();
        }
    })?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{dir}: {source}")]
    Dir { dir: PathBuf, source: std::io::Error },
}

/// One object of a kind we use.
#[derive(Debug, Clone)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
}

impl Object {
    fn id(&self) -> (&'static str, String) {
        let (kind, meta) = match self {
            Object::Service(s) => ("Service", &s.metadata),
            Object::EndpointSlice(s) => ("EndpointSlice", &s.metadata),
            Object::Node(n) => ("Node", &n.metadata),
        };
        (
            kind,
            format!(
                "{}/{}",
                meta.namespace.as_deref().unwrap_or("default"),
                meta.name.as_deref().unwrap_or("")
            ),
        )
    }
}

/// Parses one file's text: every document, or the first error (with the document number).
pub fn parse(text: &str, json: bool) -> Result<Vec<Object>, String> {
    let docs: Vec<serde_json::Value> = if json {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        // A JSON file holds one object or a `v1/List`.
        match v.get("items").and_then(|i| i.as_array()) {
            Some(items) if v.get("kind").and_then(|k| k.as_str()) == Some("List") => items.clone(),
            _ => vec![v],
        }
    } else {
        let mut docs = Vec::new();
        for (i, d) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let v = serde_json::Value::deserialize(d).map_err(|e| format!("document {}: {e}", i + 1))?;
            if !v.is_null() {
                docs.push(v);
            }
        }
        docs
    };
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        if let Some(o) = object(doc).map_err(|e| format!("document {}: {e}", i + 1))? {
            out.push(o);
        }
    }
    Ok(out)
}

/// One document: `Ok(None)` for kinds we do not use (a folder may hold Deployments too).
fn object(doc: serde_json::Value) -> Result<Option<Object>, String> {
    let api = doc.get("apiVersion").and_then(|v| v.as_str()).unwrap_or("").to_string();
    let kind = doc.get("kind").and_then(|v| v.as_str()).ok_or("no kind")?.to_string();
    let o = match (api.as_str(), kind.as_str()) {
        ("v1", "Service") => Object::Service(Box::new(from_value(doc)?)),
        ("discovery.k8s.io/v1", "EndpointSlice") => Object::EndpointSlice(Box::new(from_value(doc)?)),
        ("v1", "Node") => Object::Node(Box::new(from_value(doc)?)),
        (_, "Service" | "EndpointSlice" | "Node") => {
            return Err(format!("{kind}: unsupported apiVersion {api:?}"));
        }
        _ => return Ok(None),
    };
    validate(&o).map_err(|e| format!("{} {}: {e}", o.id().0, o.id().1))?;
    Ok(Some(o))
}

fn from_value<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| e.to_string())
}

fn ip(s: &str, what: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|_| format!("{what} {s:?} is not an IP address"))
}

fn port(p: i32, what: &str) -> Result<(), String> {
    if (1..=65535).contains(&p) { Ok(()) } else { Err(format!("{what} {p} is out of range 1-65535")) }
}

fn protocol(p: Option<&str>) -> Result<(), String> {
    match p.unwrap_or("TCP") {
        "TCP" | "UDP" | "SCTP" => Ok(()),
        other => Err(format!("protocol {other:?} is not TCP, UDP or SCTP")),
    }
}

/// The checks the API server would make on the fields the Model reads.
fn validate(o: &Object) -> Result<(), String> {
    match o {
        Object::Service(s) => {
            s.metadata.name.as_deref().filter(|n| !n.is_empty()).ok_or("metadata.name is missing")?;
            let spec = s.spec.as_ref().ok_or("spec is missing")?;
            for c in spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.iter()) {
                if c != "None" && !c.is_empty() {
                    ip(c, "clusterIP")?;
                }
            }
            for e in spec.external_ips.iter().flatten() {
                ip(e, "externalIP")?;
            }
            for r in spec.load_balancer_source_ranges.iter().flatten() {
                r.trim()
                    .parse::<ipnet::IpNet>()
                    .map_err(|_| format!("loadBalancerSourceRange {r:?} is not a CIDR"))?;
            }
            let ports = spec.ports.as_deref().unwrap_or_default();
            for p in ports {
                port(p.port, "port")?;
                protocol(p.protocol.as_deref())?;
                if let Some(np) = p.node_port {
                    port(np, "nodePort")?;
                }
                if ports.len() > 1 && p.name.as_deref().unwrap_or("").is_empty() {
                    return Err("ports must be named when a Service has more than one".into());
                }
            }
            for i in s
                .status
                .iter()
                .filter_map(|s| s.load_balancer.as_ref())
                .flat_map(|l| l.ingress.iter().flatten())
            {
                if let Some(a) = &i.ip {
                    ip(a, "status.loadBalancer.ingress ip")?;
                }
            }
        }
        Object::EndpointSlice(s) => {
            s.metadata.name.as_deref().filter(|n| !n.is_empty()).ok_or("metadata.name is missing")?;
            let labels = s.metadata.labels.as_ref();
            labels
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .ok_or(format!("label {SERVICE_NAME_LABEL} is missing"))?;
            let family = match s.address_type.as_str() {
                "IPv4" => false,
                "IPv6" => true,
                "FQDN" => return Ok(()),
                other => return Err(format!("addressType {other:?} is not IPv4, IPv6 or FQDN")),
            };
            for p in s.ports.iter().flatten() {
                if let Some(n) = p.port {
                    port(n, "port")?;
                }
                protocol(p.protocol.as_deref())?;
            }
            for e in &s.endpoints {
                let a = e.addresses.first().ok_or("an endpoint has no address")?;
                if ip(a, "endpoint address")?.is_ipv6() != family {
                    return Err(format!(
                        "endpoint address {a} does not match addressType {}",
                        s.address_type
                    ));
                }
            }
        }
        Object::Node(n) => {
            n.metadata.name.as_deref().filter(|n| !n.is_empty()).ok_or("metadata.name is missing")?;
            for a in n.status.iter().flat_map(|s| s.addresses.iter().flatten()) {
                if matches!(a.type_.as_str(), "InternalIP" | "ExternalIP") {
                    ip(&a.address, "node address")?;
                }
            }
        }
    }
    Ok(())
}

/// Reads and parses one file.
pub fn load_file(path: &Path) -> Result<Vec<Object>, ManifestError> {
    let err = |reason: String| ManifestError::File { path: path.to_path_buf(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let json = path.extension().is_some_and(|e| e == "json");
    parse(&text, json).map_err(err)
}

fn is_manifest(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
    !hidden && matches!(ext, "yaml" | "yml" | "json")
}

/// What identifies a file version without reading it.
type Stamp = (i64, i64, u64, u64);

/// The folder's state: the last good objects of every file.
#[derive(Debug, Default)]
pub struct Folder {
    dir: PathBuf,
    files: BTreeMap<PathBuf, (Stamp, Vec<Object>)>,
}

impl Folder {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf(), files: BTreeMap::new() }
    }

    /// Re-reads what changed. Returns whether the good state changed, and the errors of files
    /// that failed (their last good content is kept).
    pub fn refresh(&mut self) -> Result<(bool, Vec<ManifestError>), ManifestError> {
        let dir_err = |source| ManifestError::Dir { dir: self.dir.clone(), source };
        let mut seen = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir).map_err(dir_err)? {
            let Ok(entry) = entry else { continue };
            let path = entry.path();
            if !is_manifest(&path) {
                continue;
            }
            let Ok(md) = std::fs::metadata(&path) else { continue };
            if md.is_file() {
                seen.insert(path, (md.mtime(), md.mtime_nsec(), md.size(), md.ino()));
            }
        }
        let mut changed = false;
        let mut errors = Vec::new();
        let before = self.files.len();
        self.files.retain(|p, _| seen.contains_key(p));
        changed |= self.files.len() != before;
        for (path, stamp) in seen {
            if self.files.get(&path).is_some_and(|(s, _)| *s == stamp) {
                continue;
            }
            match load_file(&path) {
                Ok(objs) => {
                    self.files.insert(path, (stamp, objs));
                    changed = true;
                }
                Err(e) => {
                    // Remember the stamp so the error is reported once per version of the
                    // file, and keep the objects of its last good version.
                    let objs = self.files.remove(&path).map(|(_, o)| o).unwrap_or_default();
                    self.files.insert(path, (stamp, objs));
                    errors.push(e);
                }
            }
        }
        Ok((changed, errors))
    }

    /// The good objects of every file. An object defined in two files: the first file (by
    /// name) wins, and the duplicate is returned as a warning.
    pub fn cluster(&self) -> (Cluster, Vec<String>) {
        let mut c = Cluster::default();
        let mut warnings = Vec::new();
        let mut seen: BTreeMap<(&'static str, String), &Path> = BTreeMap::new();
        for (path, (_, objs)) in &self.files {
            for o in objs {
                let id = o.id();
                if let Some(first) = seen.get(&id) {
                    warnings.push(format!(
                        "{}: {} {} is also defined in {}; ignored here",
                        path.display(),
                        id.0,
                        id.1,
                        first.display()
                    ));
                    continue;
                }
                seen.insert(id, path);
                insert(&mut c, o.clone());
            }
        }
        (c, warnings)
    }
}

/// A `Cluster` holding `objs` (later objects replace earlier ones of the same name).
pub fn cluster_from(objs: Vec<Object>) -> Cluster {
    let mut c = Cluster::default();
    for o in objs {
        insert(&mut c, o);
    }
    c
}

fn insert(c: &mut Cluster, o: Object) {
    let key = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        (m.namespace.clone().unwrap_or_else(|| "default".into()), m.name.clone().unwrap_or_default())
    };
    match o {
        Object::Service(s) => {
            c.services.insert(key(&s.metadata), *s);
        }
        Object::EndpointSlice(s) => {
            c.slices.insert(key(&s.metadata), *s);
        }
        Object::Node(n) => {
            c.nodes.insert((String::new(), n.metadata.name.clone().unwrap_or_default()), *n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_with_foreign_kinds() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 198.19.0.10\n  ports: [{port: 80}]\n---\n";
        let objs = parse(text, false).unwrap();
        assert_eq!(objs.len(), 1);
        assert!(matches!(&objs[0], Object::Service(s) if s.metadata.name.as_deref() == Some("web")));
    }

    #[test]
    fn invalid_documents_name_the_document_and_reason() {
        let cases = [
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.0.0.300}\n",
                "clusterIP",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 70000}]}\n",
                "out of range",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80, protocol: ICMP}]}\n",
                "protocol",
            ),
            ("apiVersion: v1\nkind: Service\nspec: {}\n", "metadata.name"),
            ("apiVersion: v2\nkind: Service\nmetadata: {name: a}\n", "apiVersion"),
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a}\naddressType: IPv4\nendpoints: []\n",
                "service-name",
            ),
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a, labels: {kubernetes.io/service-name: s}}\naddressType: IPv4\nendpoints: [{addresses: [\"fd00::1\"]}]\n",
                "does not match",
            ),
            ("kind: Service\n  bad: indent\n x", "document 1"),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: \"eighty\"}]}\n",
                "document 1",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text, false).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err:?} lacks {want:?}");
        }
        assert!(parse("---\n---\n", false).unwrap().is_empty());
    }

    #[test]
    fn json_list() {
        let text = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Node","metadata":{"name":"n1"}}]}"#;
        assert!(matches!(&parse(text, true).unwrap()[..], [Object::Node(_)]));
    }

    #[test]
    fn the_example_folder_parses_into_a_nodeport_service() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/manifests");
        let mut folder = Folder::new(&dir);
        let (_, errors) = folder.refresh().unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        let (cluster, warnings) = folder.cluster();
        assert!(warnings.is_empty());
        let node = crate::model::NodeContext {
            name: "node-1".into(),
            nodeport_addresses: crate::model::NodePortAddresses::Primary,
            fallback_addresses: vec![],
        };
        let d = crate::model::desired(&cluster, &node);
        let fronts: Vec<String> =
            d.services.values().flat_map(|s| s.frontends.iter().map(|(ip, p)| format!("{ip}:{p}"))).collect();
        assert_eq!(fronts, ["198.19.0.10:80", "198.18.0.1:30080"]);
        assert!(d.services.values().all(|s| s.backends.len() == 3));
    }

    #[test]
    fn folder_keeps_the_last_good_version_of_a_broken_file() {
        let dir = std::env::temp_dir().join(format!("lb-manifests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("svc.yaml");
        std::fs::write(&f, "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 198.19.0.10, ports: [{port: 80}]}\n").unwrap();
        std::fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
        let mut folder = Folder::new(&dir);
        let (changed, errors) = folder.refresh().unwrap();
        assert!(changed && errors.is_empty());
        assert_eq!(folder.cluster().0.services.len(), 1);

        std::fs::write(&f, "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: nope}\n")
            .unwrap();
        let (changed, errors) = folder.refresh().unwrap();
        assert!(!changed);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("svc.yaml") && errors[0].to_string().contains("nope"));
        let svc = &folder.cluster().0.services[&("default".to_string(), "web".to_string())];
        assert_eq!(svc.spec.as_ref().unwrap().cluster_ip.as_deref(), Some("198.19.0.10"));
        // Reported once per version of the file.
        assert!(folder.refresh().unwrap().1.is_empty());

        std::fs::remove_file(&f).unwrap();
        assert!(folder.refresh().unwrap().0);
        assert!(folder.cluster().0.services.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
