//! The manifest-folder source: `*.yaml|*.yml|*.json`, multi-document, kinds `v1/Service`,
//! `discovery.k8s.io/v1/EndpointSlice` and `v1/Node`, parsed into k8s-openapi's types.
//!
//! Changes are noticed through inotify at once (`watch`), and the folder is also polled
//! (mtime, size, inode) every `POLL` as a safety net, so a change is live in milliseconds
//! whatever wrote it. Each file is all-or-nothing: one that fails to parse or validate
//! is reported with its path and reason, and its last good content stays in effect.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::Deserialize as _;

use super::{saver::Saver, slim::Keep, watch::Watch};
use crate::{
    model::{Changes, Cluster, Key, Name, SERVICE_NAME_LABEL},
    objects, sorted_vec,
};

/// How often the folder is checked without an inotify event.
pub const POLL: Duration = Duration::from_millis(250);

/// How long a file read after its writer closed it must then stay closed before it is
/// applied. The kernel makes a write visible a moment before it queues the write's event,
/// so a read that races a rewrite is only known to be whole once no event has come for a
/// while after it.
pub const SETTLE: Duration = Duration::from_millis(50);

/// A changed file that its writer has not closed is read anyway once its content is this
/// old (a writer that never closes must not freeze its file's changes).
pub const WRITER_PATIENCE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{dir}: {source}")]
    Dir { dir: PathBuf, source: std::io::Error },
}

/// One object of a kind we use.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Node(Arc<Node>),
}

impl Object {
    /// Kind and `Cluster` key (`(namespace, name)`; Nodes `("", name)`).
    fn id(&self) -> Id {
        let (kind, meta) = match self {
            Object::Service(s) => (Kind::Service, &s.metadata),
            Object::EndpointSlice(s) => (Kind::EndpointSlice, &s.metadata),
            Object::Node(n) => (Kind::Node, &n.metadata),
        };
        let ns = match self {
            Object::Node(_) => "",
            _ => meta.namespace.as_deref().unwrap_or("default"),
        };
        (kind, (ns.into(), meta.name.as_deref().unwrap_or_default().into()))
    }

    /// What the agent keeps of it (`slim`).
    pub fn kept(&self) -> Kept {
        match self {
            Object::Service(s) => Kept::Service(Arc::new(s.keep())),
            Object::EndpointSlice(s) => Kept::Slice(Arc::new(s.keep())),
            Object::Node(n) => Kept::Node(Arc::new(n.keep())),
        }
    }
}

/// What the agent keeps of an object (`slim`), as the merged `Cluster` holds it.
#[derive(Debug, Clone, PartialEq)]
pub enum Kept {
    Service(Arc<objects::Service>),
    Slice(Arc<objects::Slice>),
    Node(Arc<Node>),
}

/// `Kind namespace/name` (`Node name`) for messages.
fn describe((kind, (ns, name)): &Id) -> String {
    if ns.is_empty() { format!("{kind} {name}") } else { format!("{kind} {ns}/{name}") }
}

/// The largest manifest file read (bigger ones are refused before parsing).
pub const MAX_FILE_BYTES: usize = 16 << 20;
/// The deepest `[`/`{` nesting accepted. Checked before the YAML parser runs: deeply nested
/// flow collections cost it quadratic time (a 400 KB file held it for minutes).
pub const MAX_NESTING: usize = 100;

/// The deepest nesting of flow collections (`[`, `{`) in `text`, outside quoted strings and
/// comments, stopping as soon as it passes `limit`.
fn flow_nesting(text: &str, limit: usize) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let (mut quote, mut comment, mut prev) = (None::<char>, false, '\n');
    for c in text.chars() {
        match (quote, comment) {
            (_, true) => comment = c != '\n',
            (Some(q), _) => {
                if c == q {
                    quote = None;
                }
            }
            (None, _) => match c {
                '"' | '\'' => quote = Some(c),
                '#' if prev.is_whitespace() => comment = true,
                '[' | '{' => {
                    depth += 1;
                    max = max.max(depth);
                    if max > limit {
                        return max;
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
        prev = c;
    }
    max
}

/// Parses one file's text: every document, or the first error (with the document number).
/// A UTF-8 byte-order mark is skipped; a `kind: List` (what `kubectl get -o yaml` writes)
/// stands for its items.
pub fn parse(text: &str, json: bool) -> Result<Vec<Object>, String> {
    parse_with_warnings(text, json).map(|(objects, _)| objects)
}

/// `parse`, plus a warning for each field the objects do not have (a typo such as
/// `targetport`, which the API server would drop with a warning too).
pub fn parse_with_warnings(text: &str, json: bool) -> Result<(Vec<Object>, Vec<String>), String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.len() > MAX_FILE_BYTES {
        return Err(format!("{} bytes, over the {MAX_FILE_BYTES}-byte limit for a manifest", text.len()));
    }
    if flow_nesting(text, MAX_NESTING) > MAX_NESTING {
        return Err(format!("nested deeper than {MAX_NESTING} levels (limit checked before parsing)"));
    }
    // JSON text is read as JSON whatever the file's name: JSON is YAML, but libyaml reads it
    // far slower (under a stream of JSON slices it was a sixth of the agent's CPU). Anything
    // else, or JSON that does not parse, is read as YAML, whose errors are the ones reported.
    let as_json = || text.trim_start().starts_with('{').then(|| serde_json::from_str(text).ok()).flatten();
    let docs: Vec<serde_json::Value> = if json {
        vec![serde_json::from_str(text).map_err(|e| e.to_string())?]
    } else if let Some(doc) = as_json() {
        vec![doc]
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
    let docs = docs.into_iter().flat_map(|v| match v.get("items").and_then(|i| i.as_array()) {
        Some(items) if v.get("kind").and_then(|k| k.as_str()) == Some("List") => items.clone(),
        _ => vec![v],
    });
    let (mut out, mut warnings) = (Vec::new(), Vec::new());
    for (i, doc) in docs.enumerate() {
        let doc_err = |e| format!("document {}: {e}", i + 1);
        if doc.get("apiVersion").and_then(|v| v.as_str()) == Some("v1")
            && doc.get("kind").and_then(|v| v.as_str()) == Some("Endpoints")
        {
            let (slices, said) = endpoints(doc).map_err(doc_err)?;
            warnings.extend(said);
            out.extend(slices);
        } else if let Some((o, unknown)) = object(doc).map_err(doc_err)? {
            if !unknown.is_empty() {
                let fields = if unknown.len() == 1 { "field" } else { "fields" };
                warnings.push(format!(
                    "{}: unknown {fields} {} (ignored)",
                    describe(&o.id()),
                    unknown.join(", ")
                ));
            }
            out.push(o);
        }
    }
    Ok((out, warnings))
}

/// One document, and the fields it has that its kind does not: `Ok(None)` for kinds we do
/// not use (a folder may hold Deployments too).
fn object(doc: serde_json::Value) -> Result<Option<(Object, Vec<String>)>, String> {
    let api = doc.get("apiVersion").and_then(|v| v.as_str()).unwrap_or("").to_string();
    let kind = doc.get("kind").and_then(|v| v.as_str()).ok_or("no kind")?.to_string();
    let (o, known) = match (api.as_str(), kind.as_str()) {
        ("v1", "Service") => typed(&doc, Object::Service)?,
        ("discovery.k8s.io/v1", "EndpointSlice") => typed(&doc, Object::EndpointSlice)?,
        ("v1", "Node") => typed(&doc, Object::Node)?,
        (_, "Service" | "EndpointSlice" | "Node") => {
            return Err(format!("{kind}: unsupported apiVersion {api:?}"));
        }
        _ => return Ok(None),
    };
    validate(&o).map_err(|e| format!("{}: {e}", describe(&o.id())))?;
    let mut unknown = Vec::new();
    unknown_fields(&doc, &known, "", &mut unknown);
    Ok(Some((o, unknown)))
}

/// A `v1/Endpoints` document: the EndpointSlices that mirror it (`endpoints::mirror`), and
/// what to say about it.
fn endpoints(doc: serde_json::Value) -> Result<(Vec<Object>, Vec<String>), String> {
    let ep = k8s_openapi::api::core::v1::Endpoints::deserialize(&doc).map_err(|e| e.to_string())?;
    let what = format!(
        "Endpoints {}/{}",
        ep.metadata.namespace.as_deref().unwrap_or("default"),
        ep.metadata.name.as_deref().unwrap_or("")
    );
    let (slices, said) = super::endpoints::mirror(&ep).map_err(|e| format!("{what}: {e}"))?;
    let mut warnings: Vec<String> = said.into_iter().map(|w| format!("{what}: {w}")).collect();
    let mut unknown = Vec::new();
    unknown_fields(&doc, &serde_json::to_value(&ep).map_err(|e| e.to_string())?, "", &mut unknown);
    if !unknown.is_empty() {
        warnings.push(format!("{what}: unknown fields {} (ignored)", unknown.join(", ")));
    }
    let slices = slices.into_iter().map(|s| Object::EndpointSlice(Arc::new(s)));
    let slices: Vec<Object> = slices.collect();
    for s in &slices {
        validate(s).map_err(|e| format!("{what}: {e}"))?;
    }
    Ok((slices, warnings))
}

/// The typed object, and it written back (what it kept of the document).
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(
    doc: &serde_json::Value,
    wrap: impl FnOnce(Arc<T>) -> Object,
) -> Result<(Object, serde_json::Value), String> {
    // Read from the document in place: a `from_value` would need a deep copy of it.
    let t = T::deserialize(doc).map_err(|e| e.to_string())?;
    let known = serde_json::to_value(&t).map_err(|e| e.to_string())?;
    Ok((wrap(Arc::new(t)), known))
}

/// The paths of `doc`'s fields that `known` (the document as its type read it) lacks; null
/// values are not fields.
fn unknown_fields(doc: &serde_json::Value, known: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    use serde_json::Value;
    match (doc, known) {
        (Value::Object(d), Value::Object(k)) => {
            for (field, v) in d.iter().filter(|(_, v)| !v.is_null()) {
                let here = if path.is_empty() { field.clone() } else { format!("{path}.{field}") };
                match k.get(field) {
                    Some(kv) => unknown_fields(v, kv, &here, out),
                    None => out.push(here),
                }
            }
        }
        (Value::Array(d), Value::Array(k)) => {
            for (i, (dv, kv)) in d.iter().zip(k).enumerate() {
                unknown_fields(dv, kv, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
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
/// `value` (if set) is one of `allowed`.
fn one_of(field: &str, value: Option<&str>, allowed: &[&str]) -> Result<(), String> {
    match value {
        Some(v) if !allowed.contains(&v) => {
            Err(format!("{field}: Unsupported value: {v:?}: supported values: {}", allowed.join(", ")))
        }
        _ => Ok(()),
    }
}

/// A targetPort: a port number 1-65535, or the name of a container port (an IANA service
/// name: at most 15 lowercase letters, digits and dashes, with a letter).
fn target_port(t: Option<&IntOrString>, i: usize) -> Result<(), String> {
    match t {
        Some(IntOrString::Int(n)) if !(1..=65_535).contains(n) => Err(format!(
            "spec.ports[{i}].targetPort: Invalid value: {n}: must be between 1 and 65535, inclusive"
        )),
        Some(IntOrString::String(name)) => {
            let ok = !name.is_empty()
                && name.len() <= 15
                && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && name.chars().any(|c| c.is_ascii_lowercase())
                && !name.starts_with('-')
                && !name.ends_with('-')
                && !name.contains("--");
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "spec.ports[{i}].targetPort: Invalid value: {name:?}: not a port number or a port name"
                ))
            }
        }
        _ => Ok(()),
    }
}

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
            // The enumerations the API server checks, with its wording.
            one_of(
                "spec.type",
                spec.type_.as_deref(),
                &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"],
            )?;
            one_of(
                "spec.externalTrafficPolicy",
                spec.external_traffic_policy.as_deref(),
                &["Cluster", "Local"],
            )?;
            one_of(
                "spec.internalTrafficPolicy",
                spec.internal_traffic_policy.as_deref(),
                &["Cluster", "Local"],
            )?;
            one_of("spec.sessionAffinity", spec.session_affinity.as_deref(), &["None", "ClientIP"])?;
            let ports = spec.ports.as_deref().unwrap_or_default();
            let mut numbers = BTreeSet::new();
            let mut names = BTreeSet::new();
            for (i, p) in ports.iter().enumerate() {
                port(p.port, "port")?;
                protocol(p.protocol.as_deref())?;
                if let Some(np) = p.node_port {
                    port(np, "nodePort")?;
                }
                let name = p.name.as_deref().unwrap_or("");
                if ports.len() > 1 && name.is_empty() {
                    return Err("ports must be named when a Service has more than one".into());
                }
                if !names.insert(name) {
                    return Err(format!("spec.ports[{i}].name: Duplicate value: {name:?}"));
                }
                let proto = p.protocol.as_deref().unwrap_or("TCP");
                if !numbers.insert((p.port, proto)) {
                    return Err(format!(
                        "spec.ports[{i}]: Duplicate value: port {} protocol {proto}",
                        p.port
                    ));
                }
                target_port(p.target_port.as_ref(), i)?;
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
    read_file(path).map(|(_, objs, _)| objs)
}

/// A file's text, its objects and its warnings; or why it is not good.
type FileRead = Result<(String, Vec<Object>, Vec<String>), ManifestError>;

/// Texts at least this long are parsed on a thread of their own (`read_file`).
const OWN_THREAD_BYTES: usize = 1 << 20;

/// Reads and parses one file: its text, objects and warnings.
///
/// A big text is parsed on a thread of its own. The allocator gives each thread its own
/// arena, so the parse's garbage (JSON trees, k8s-openapi objects: several times what is
/// kept) is freed as a block there instead of fragmenting the agent's heap, whose
/// allocations then stay fast: the first sync of 100 000 Services from 20 files took 23.5 s
/// against 28 s parsed on the agent's thread (`bench memory`, two runs each; the same
/// resident set after it, a 7 % higher peak). A small file (a churn update) skips the
/// thread's start.
fn read_file(path: &Path) -> FileRead {
    let err = |reason: String| ManifestError::File { path: path.to_path_buf(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let json = path.extension().is_some_and(|e| e == "json");
    let parse = || parse_with_warnings(&text, json);
    let (objs, warnings) = if text.len() >= OWN_THREAD_BYTES {
        std::thread::scope(|s| s.spawn(parse).join().expect("parser thread"))
    } else {
        parse()
    }
    .map_err(err)?;
    Ok((text, objs, warnings))
}

fn is_manifest(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
    !hidden && matches!(ext, "yaml" | "yml" | "json")
}

/// What identifies a file version without reading it.
type Stamp = (i64, i64, u64, u64);

/// The kinds of object a manifest may define that we use (in the order of their names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    EndpointSlice,
    Node,
    Service,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Service => "Service",
        })
    }
}

/// An object's identity: its kind and its key in `Cluster`.
type Id = (Kind, Key);

/// One file's last good objects, sorted by identity: a sorted `Vec`, not an ordered map (a
/// file's objects are read once and never changed, and at 100 000 Services the map's nodes
/// cost some 60 bytes per Service more).
#[derive(Debug, Default)]
struct FileObjects {
    stamp: Stamp,
    objs: Vec<(Id, Kept)>,
}

impl FileObjects {
    fn new(stamp: Stamp, objs: Vec<Object>) -> Self {
        // The objects of a file mostly share a namespace: they share its name too.
        let mut namespace: Option<Name> = None;
        let mut objs: Vec<(Id, Kept)> = objs
            .iter()
            .map(|o| {
                let (kind, (ns, name)) = o.id();
                let ns = match &namespace {
                    Some(last) if *last == ns => last.clone(),
                    _ => namespace.insert(ns).clone(),
                };
                ((kind, (ns, name)), o.kept())
            })
            .collect();
        // A later object of the same identity in one file replaces the earlier one (a stable
        // sort keeps them in file order; `dedup_by` hands the later one first).
        objs.sort_by(|a, b| a.0.cmp(&b.0));
        objs.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
        objs.shrink_to_fit();
        FileObjects { stamp, objs }
    }

    fn get(&self, id: &Id) -> Option<&Kept> {
        self.objs.binary_search_by(|(i, _)| i.cmp(id)).ok().map(|at| &self.objs[at].1)
    }

    fn ids(&self) -> impl Iterator<Item = &Id> {
        self.objs.iter().map(|(id, _)| id)
    }

    fn into_ids(self) -> impl Iterator<Item = Id> {
        self.objs.into_iter().map(|(id, _)| id)
    }
}

/// The files defining the objects whose identity hashes to one value (`Folder::owners`), in
/// name order: nearly always one, kept without a `Vec` (its allocation would be some 30
/// bytes per object).
#[derive(Debug)]
enum Owners {
    One(Arc<Path>),
    Many(Vec<Arc<Path>>),
}

impl Owners {
    fn files(&self) -> &[Arc<Path>] {
        match self {
            Owners::One(p) => std::slice::from_ref(p),
            Owners::Many(v) => v,
        }
    }

    fn insert(&mut self, file: Arc<Path>) {
        match self {
            Owners::One(p) if *p == file => {}
            Owners::One(p) => {
                let mut v = vec![p.clone()];
                sorted_vec::insert(&mut v, file);
                *self = Owners::Many(v);
            }
            Owners::Many(v) => {
                sorted_vec::insert(v, file);
            }
        }
    }

    /// Removes `file`; false when no file is left.
    fn remove(&mut self, file: &Path) -> bool {
        match self {
            Owners::One(p) => **p != *file,
            Owners::Many(v) => {
                sorted_vec::remove(v, file);
                if let [one] = v.as_slice() {
                    *self = Owners::One(one.clone());
                }
                !self.files().is_empty()
            }
        }
    }
}

/// A file version's identity without reading it: mtime, size and inode.
fn stamp(md: &std::fs::Metadata) -> Stamp {
    (md.mtime(), md.mtime_nsec(), md.size(), md.ino())
}

/// Whether a file not closed since its last write has been left alone for `WRITER_PATIENCE`.
fn written_long_ago(md: &std::fs::Metadata) -> bool {
    md.modified().is_ok_and(|w| w.elapsed().is_ok_and(|age| age >= WRITER_PATIENCE))
}

/// The folder's state: the last good objects of every file, merged into one `Cluster` that is
/// updated object by object, and the changes not yet taken by a sync.
#[derive(Debug, Default)]
pub struct Folder {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileObjects>,
    /// The files defining each object (a merge looks at those, not at every file), by a hash
    /// of its identity: a second copy of every identity would cost some 90 bytes per
    /// Service. Two identities with one hash share a set of files, and a merge asks each
    /// file whether it defines the object, so a collision costs a lookup, never a wrong
    /// answer.
    owners: BTreeMap<u64, Owners>,
    /// Seeded per process: the cluster cannot choose identities that collide.
    owner_hash: foldhash::fast::RandomState,
    merged: Cluster,
    changes: Changes,
    warnings: Vec<String>,
    /// What tells whether a file's writer has closed it; `None`: not watched, files are
    /// applied as soon as seen.
    watch: Option<Arc<Watch>>,
    /// Where each file's last good text is kept, so a restart while a file is broken still
    /// serves its last good objects.
    state: Option<PathBuf>,
    /// Entries that are not manifest files (FIFO, directory, dangling link), reported once.
    reported: BTreeSet<PathBuf>,
    /// The folder has been read once.
    read_once: bool,
    /// Files read after a close, waiting out `SETTLE` before they are applied.
    settling: BTreeMap<PathBuf, Settling>,
    /// Writes the copies in `state`.
    saver: Option<Saver>,
    /// Some entry of the folder is a symbolic link (seen in the last whole read).
    links: bool,
    /// Files changed and not closed yet: looked at again on each refresh (their writer may
    /// never close them: `WRITER_PATIENCE`).
    being_written: BTreeSet<PathBuf>,
}

/// A file's content read after its close number `close`.
#[derive(Debug)]
struct Settling {
    stamp: Stamp,
    close: u64,
    read_at: Instant,
    read: FileRead,
}

impl Folder {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf(), changes: Changes::everything(), ..Default::default() }
    }

    /// Keeps each file's last good text in `state` (created if missing).
    pub fn with_state(mut self, state: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(state)?;
        self.state = Some(state.to_path_buf());
        self.saver = Some(Saver::start()?);
        Ok(self)
    }

    /// From now on a changed file waits until its writer has closed it (or `WRITER_PATIENCE`).
    pub fn watched_by(&mut self, watch: Arc<Watch>) {
        self.watch = Some(watch);
    }

    fn saved(&self, path: &Path) -> Option<PathBuf> {
        Some(self.state.as_ref()?.join(path.file_name()?))
    }

    /// Saves `text` as `path`'s last good content (`None`: the file is gone).
    fn save(&self, path: &Path, text: Option<String>) {
        if let (Some(saver), Some(to)) = (&self.saver, self.saved(path)) {
            saver.put(to, text);
        }
    }

    /// Re-reads what changed. Returns whether the good state changed (the changes wait in
    /// `take_changes`), and the errors of files that failed (their last good content is
    /// kept).
    pub fn refresh(&mut self) -> Result<(bool, Vec<ManifestError>), ManifestError> {
        let dir_err = |source| ManifestError::Dir { dir: self.dir.clone(), source };
        // Watched: only the files touched since the last refresh (and those waiting for their
        // writer) are looked at, not every file of the folder.
        // Links change what a name resolves to without an event for that name (a ConfigMap
        // volume swaps its `..data` link): a folder with any, or a touched name that is a link
        // or a directory now, is read whole.
        let dir = &self.dir;
        let not_a_file =
            |n: &std::ffi::OsString| std::fs::symlink_metadata(dir.join(n)).is_ok_and(|m| !m.is_file());
        let touched = self
            .watch
            .as_ref()
            .and_then(|w| w.take_touched())
            .filter(|names| self.read_once && !self.links && !names.iter().any(not_a_file));
        let whole = touched.is_none();
        let paths: Vec<PathBuf> = match touched {
            Some(names) => {
                let waiting = self.settling.keys().chain(&self.being_written).cloned();
                let touched = names.into_iter().map(|n| self.dir.join(n));
                waiting.chain(touched).collect::<BTreeSet<_>>().into_iter().collect()
            }
            None => {
                let entries: Vec<std::fs::DirEntry> =
                    std::fs::read_dir(&self.dir).map_err(dir_err)?.filter_map(Result::ok).collect();
                self.links = entries.iter().any(|e| e.file_type().is_ok_and(|t| t.is_symlink()));
                entries.iter().map(std::fs::DirEntry::path).collect()
            }
        };
        let mut seen = BTreeMap::new();
        for path in &paths {
            let path = path.clone();
            if !is_manifest(&path) {
                continue;
            }
            self.being_written.remove(&path);
            let md = match std::fs::metadata(&path) {
                Ok(md) if md.is_file() => md,
                // Gone since its event.
                Err(e) if !whole && e.kind() == std::io::ErrorKind::NotFound => continue,
                other => {
                    // A FIFO, a directory, a dangling link or a link loop: once, not each poll.
                    if self.reported.insert(path.clone()) {
                        let why = match other {
                            Ok(md) if md.is_dir() => "a directory".to_string(),
                            Ok(_) => "not a regular file (FIFO, socket or device)".to_string(),
                            Err(e) => e.to_string(),
                        };
                        self.warnings.push(format!("{}: skipped: {why}", path.display()));
                    }
                    continue;
                }
            };
            self.reported.remove(&path);
            let stamp = stamp(&md);
            let changed = self.files.get(&path).is_none_or(|f| f.stamp != stamp);
            // Watched, changed and not closed since (being written): its previous version
            // stays. (Not on the first read: whatever is there at start is taken as it is.)
            let mut close = None;
            if changed
                && self.read_once
                && let (Some(watch), Some(name)) = (&self.watch, path.file_name())
            {
                close = watch.closed(name);
                if close.is_none() && !written_long_ago(&md) {
                    if let Some(f) = self.files.get(&path) {
                        seen.insert(path.clone(), (f.stamp, None));
                    }
                    self.being_written.insert(path);
                    continue;
                }
            }
            seen.insert(path, (stamp, close));
        }
        let mut errors = Vec::new();
        // Identities whose object may differ now.
        let mut dirty: BTreeSet<Id> = BTreeSet::new();
        // Gone: files not seen among those looked at (every file, when the whole folder was).
        let gone: Vec<PathBuf> = if whole {
            self.files.keys().filter(|p| !seen.contains_key(*p)).cloned().collect()
        } else {
            paths.iter().filter(|p| !seen.contains_key(*p) && self.files.contains_key(*p)).cloned().collect()
        };
        if whole {
            self.settling.retain(|p, _| seen.contains_key(p));
        } else {
            for p in paths.iter().filter(|p| !seen.contains_key(*p)) {
                self.settling.remove(p);
            }
        }
        for path in gone {
            if let Some(f) = self.remove_file(&path) {
                dirty.extend(f.into_ids());
            }
            self.save(&path, None);
        }
        for (path, (stamp, close)) in seen {
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let read = match close {
                Some(close) => match self.settled(&path, stamp, close) {
                    Some(read) => read,
                    None => continue,
                },
                None => {
                    let read = read_file(&path);
                    if std::fs::metadata(&path).ok().map(|md| self::stamp(&md)) != Some(stamp) {
                        // Written while being read: its previous version stays for now.
                        continue;
                    }
                    read
                }
            };
            let mut old = self.remove_file(&path).unwrap_or_default();
            match read {
                Ok((text, objs, warnings)) => {
                    self.warnings.extend(warnings.into_iter().map(|w| format!("{}: {w}", path.display())));
                    self.save(&path, Some(text));
                    let new = FileObjects::new(stamp, objs);
                    for id in old.ids().chain(new.ids()) {
                        if old.get(id) != new.get(id) {
                            dirty.insert(id.clone());
                        }
                    }
                    self.insert_file(path, new);
                }
                Err(e) => {
                    // Keep the objects of its last good version: this process's, or, after a
                    // restart, the copy saved on disk.
                    if old.objs.is_empty()
                        && let Some(Ok((_, objs, _))) =
                            self.saved(&path).filter(|p| p.exists()).map(|p| read_file(&p))
                    {
                        self.warnings.push(format!(
                            "{}: serving its last good content saved before the restart ({} objects)",
                            path.display(),
                            objs.len()
                        ));
                        old = FileObjects::new(stamp, objs);
                        dirty.extend(old.ids().cloned());
                    }
                    // Remember the stamp so the error is reported once per version of the
                    // file.
                    self.insert_file(path, FileObjects { stamp, ..old });
                    errors.push(e);
                }
            }
        }
        for id in &dirty {
            self.merge(id);
        }
        self.read_once = true;
        Ok((!self.changes.is_empty(), errors))
    }

    /// When a file read after its close will have settled: the next `refresh` due then.
    pub fn settle_deadline(&self) -> Option<Instant> {
        self.settling.values().map(|s| s.read_at + SETTLE).min()
    }

    /// `path`'s content as its writer closed it (close number `close`), once it was read and
    /// then found still closed `SETTLE` later (at once if it was renamed into place); `None`
    /// meanwhile (read now, or waiting).
    fn settled(&mut self, path: &Path, stamp: Stamp, close: u64) -> Option<FileRead> {
        let (watch, name) = (self.watch.clone()?, path.file_name()?);
        if watch.moved_in(name, close) {
            // Renamed into place: whole already. Taken if nothing touched it while read.
            self.settling.remove(path);
            let read = read_file(path);
            if watch.still_closed(name, close) {
                return Some(read);
            }
            // Something else may have been written meanwhile: looked at again next refresh.
            self.being_written.insert(path.to_path_buf());
            return None;
        }
        if let Some(s) = self.settling.get(path)
            && s.close == close
            && s.stamp == stamp
        {
            if s.read_at.elapsed() < SETTLE {
                return None;
            }
            let s = self.settling.remove(path)?;
            if watch.still_closed(name, close) {
                // An empty file would remove every object it held, and a writer stalled
                // right after its truncation looks just like that (a late close of its last
                // write can even report it closed): empty is believed once it stayed so for
                // `WRITER_PATIENCE`.
                let empty = s.read.as_ref().is_ok_and(|(text, _, _)| text.trim().is_empty());
                let old = std::fs::metadata(path).is_ok_and(|md| written_long_ago(&md));
                if !empty || old {
                    return Some(s.read);
                }
                self.settling.insert(path.to_path_buf(), Settling { read_at: Instant::now(), ..s });
                return None;
            }
        }
        // First seen closed, or written again since: read it (again) and wait.
        let read = read_file(path);
        self.settling.insert(path.to_path_buf(), Settling { stamp, close, read_at: Instant::now(), read });
        None
    }

    /// Where `owners` keeps the files defining `id`.
    fn owner_key(&self, id: &Id) -> u64 {
        std::hash::BuildHasher::hash_one(&self.owner_hash, id)
    }

    fn insert_file(&mut self, path: PathBuf, f: FileObjects) {
        // One path shared by the file's objects (sorted: the first file by name wins).
        let shared: Arc<Path> = path.as_path().into();
        for id in f.ids() {
            match self.owners.entry(self.owner_key(id)) {
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(Owners::One(shared.clone()));
                }
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut().insert(shared.clone()),
            }
        }
        self.files.insert(path, f);
    }

    fn remove_file(&mut self, path: &Path) -> Option<FileObjects> {
        let f = self.files.remove(path)?;
        for id in f.ids() {
            let hash = self.owner_key(id);
            if let Some(owners) = self.owners.get_mut(&hash)
                && !owners.remove(path)
            {
                self.owners.remove(&hash);
            }
        }
        Some(f)
    }

    /// Brings one object of the merged state up to date: the first file (by name) that
    /// defines it wins; a duplicate elsewhere is reported.
    fn merge(&mut self, id: &Id) {
        let files = &self.files;
        let mut defined = self
            .owners
            .get(&self.owner_key(id))
            .into_iter()
            .flat_map(Owners::files)
            .filter_map(|p| files.get(&**p)?.get(id).map(|o| (p, o)));
        let winner = defined.next();
        for (dup, _) in defined {
            let first = winner.map(|(p, _)| p.display().to_string()).unwrap_or_default();
            let what = describe(id);
            self.warnings.push(format!("{}: {what} is also defined in {first}; ignored here", dup.display()));
        }
        let key = id.1.clone();
        match (id.0, winner.map(|(_, o)| o.clone())) {
            (Kind::Service, o) => {
                self.changes.services.insert(key.clone());
                match o {
                    Some(Kept::Service(s)) => self.merged.services.insert(key, s).map(|_| ()),
                    _ => self.merged.services.remove(&key).map(|_| ()),
                };
            }
            (Kind::EndpointSlice, o) => {
                self.changes.slices.insert(key.clone());
                match o {
                    Some(Kept::Slice(s)) => self.merged.slices.insert(key, s).map(|_| ()),
                    _ => self.merged.slices.remove(&key).map(|_| ()),
                };
            }
            (_, o) => {
                // A Node changes addresses: everything is recomputed.
                self.changes.all = true;
                match o {
                    Some(Kept::Node(n)) => self.merged.nodes.insert(key, n).map(|_| ()),
                    _ => self.merged.nodes.remove(&key).map(|_| ()),
                };
            }
        }
    }

    /// The good objects of every file.
    pub fn cluster(&self) -> &Cluster {
        &self.merged
    }

    /// What changed since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Objects defined twice, seen since the last call.
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
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
    let (_, key) = o.id();
    match o.kept() {
        Kept::Service(s) => {
            c.services.insert(key, s);
        }
        Kept::Slice(s) => {
            c.slices.insert(key, s);
        }
        Kept::Node(n) => {
            c.nodes.insert(key, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_byte_order_mark_and_a_yaml_list_are_read() {
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 198.19.0.10\n  ports: [{port: 80}]\n";
        assert_eq!(parse(&format!("\u{feff}{svc}"), false).unwrap().len(), 1);
        let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n  spec: {clusterIP: 198.19.0.10, ports: [{port: 80}]}\n- apiVersion: v1\n  kind: Service\n  metadata: {name: b}\n  spec: {clusterIP: 198.19.0.11, ports: [{port: 80}]}\n";
        assert_eq!(parse(list, false).unwrap().len(), 2);
    }

    #[test]
    fn deep_nesting_is_refused_before_the_parser_runs() {
        let deep = format!("a: {}{}\n", "[".repeat(200_000), "]".repeat(200_000));
        let t = std::time::Instant::now();
        let e = parse(&deep, false).unwrap_err();
        assert!(e.contains("nested deeper than 100"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_millis(100), "{:?}", t.elapsed());
        // Brackets in strings and comments do not count.
        let fine = "apiVersion: v1\nkind: Service\nmetadata: {name: \"[[[[\"} # {{{{\nspec: {clusterIP: 198.19.0.10, ports: [{port: 80}]}\n";
        assert_eq!(flow_nesting(fine, 100), 3);
    }

    #[test]
    fn multi_document_yaml_with_foreign_kinds() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 198.19.0.10\n  ports: [{port: 80}]\n---\n";
        let objs = parse(text, false).unwrap();
        assert_eq!(objs.len(), 1);
        assert!(matches!(&objs[0], Object::Service(s) if s.metadata.name.as_deref() == Some("web")));
    }

    /// What the API server rejects is rejected here too, naming the field.
    #[test]
    fn unsupported_values_and_duplicate_ports_are_rejected_naming_the_field() {
        let svc = |spec: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: a}}\nspec: {{clusterIP: 198.19.0.10, {spec}}}\n"
            )
        };
        for (spec, want) in [
            ("type: Bogus, ports: [{port: 80}]", "spec.type: Unsupported value: \"Bogus\""),
            (
                "externalTrafficPolicy: Lcoal, ports: [{port: 80}]",
                "spec.externalTrafficPolicy: Unsupported value: \"Lcoal\"",
            ),
            ("internalTrafficPolicy: Nowhere, ports: [{port: 80}]", "spec.internalTrafficPolicy"),
            ("sessionAffinity: Sticky, ports: [{port: 80}]", "spec.sessionAffinity"),
            (
                "ports: [{name: a, port: 80}, {name: b, port: 80}]",
                "spec.ports[1]: Duplicate value: port 80 protocol TCP",
            ),
            (
                "ports: [{name: a, port: 80}, {name: a, port: 81}]",
                "spec.ports[1].name: Duplicate value: \"a\"",
            ),
            ("ports: [{port: 80, targetPort: 0}]", "spec.ports[0].targetPort: Invalid value: 0"),
            ("ports: [{port: 80, targetPort: 70000}]", "spec.ports[0].targetPort: Invalid value: 70000"),
            ("ports: [{port: 80, targetPort: Not_A_Name}]", "spec.ports[0].targetPort"),
        ] {
            let e = parse(&svc(spec), false).unwrap_err();
            assert!(e.contains(want), "{spec}: {e}");
        }
        // TCP and UDP on one port number, and named target ports, are fine.
        assert!(
            parse(
                &svc("ports: [{name: a, port: 53}, {name: b, port: 53, protocol: UDP, targetPort: dns-udp}]"),
                false
            )
            .is_ok()
        );
    }

    #[test]
    fn unknown_fields_are_warned_about_by_path() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, colour: blue}\nspec:\n  clusterIP: 198.19.0.10\n  selektor: {app: web}\n  ports: [{name: http, port: 80, targetport: 9376}]\nstatus: {}\n";
        let (objs, warnings) = parse_with_warnings(yaml, false).unwrap();
        assert_eq!(objs.len(), 1);
        assert_eq!(
            warnings,
            [
                "Service shop/web: unknown fields metadata.colour, spec.ports[0].targetport, spec.selektor (ignored)"
            ]
        );
        // Everything the lab and the examples write is known, nulls included.
        let known = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 9376, protocol: TCP}]\nendpoints: [{addresses: ['198.18.1.10'], nodeName: node-1, hints: null, conditions: {ready: true, serving: true, terminating: false}}]\n";
        assert_eq!(parse_with_warnings(known, false).unwrap().1, Vec::<String>::new());
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

    /// JSON in a `.yaml` file takes the JSON parser: the same objects and warnings as the
    /// same documents written as YAML. A YAML flow mapping is not JSON and still parses; broken
    /// JSON gets the YAML parser's error.
    #[test]
    fn json_text_in_a_yaml_file_reads_as_its_yaml_form_does() {
        let service = serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "198.18.100.10", "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP", "tragetPort": 1}]}});
        let slice = serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "endpoints": [{"addresses": ["198.18.1.1"], "conditions": {"ready": true}}], "ports": [{"port": 8080, "protocol": "TCP"}]});
        for doc in [service, slice] {
            let (json_text, yaml_text) =
                (serde_json::to_string_pretty(&doc).unwrap(), serde_yaml_ng::to_string(&doc).unwrap());
            assert!(!yaml_text.trim_start().starts_with('{'));
            let read = parse_with_warnings(&json_text, false).unwrap();
            assert_eq!(read, parse_with_warnings(&yaml_text, false).unwrap());
            let (objects, warnings) = read;
            assert_eq!(objects.len(), 1);
            assert_eq!(
                warnings.len(),
                usize::from(doc["kind"] == "Service"),
                "the misspelt field: {warnings:?}"
            );
        }
        let flow = "{apiVersion: v1, kind: Node, metadata: {name: n1}}";
        assert!(matches!(&parse(flow, false).unwrap()[..], [Object::Node(_)]));
        let broken = parse(r#"{"apiVersion": "v1", "kind": "#, false).unwrap_err();
        assert!(broken.starts_with("document 1:"), "{broken}");
    }

    #[test]
    fn the_example_folder_parses_into_a_nodeport_service_and_a_selectorless_one() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/manifests");
        let mut folder = Folder::new(&dir);
        let (_, errors) = folder.refresh().unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert!(folder.take_warnings().is_empty());
        let cluster = folder.cluster();
        let node = crate::model::NodeContext {
            name: "node-1".into(),
            nodeport_addresses: crate::model::NodePortAddresses::Primary,
            fallback_addresses: vec![],
        };
        let d = crate::model::desired(cluster, &node);
        // Each datapath service of `name` (a scope of a port): its frontends and backends.
        let of = |name: &str| -> Vec<(Vec<String>, usize)> {
            d.services
                .iter()
                .filter(|(k, _)| *k.name == *name)
                .map(|(_, s)| {
                    (s.frontends.iter().map(|(ip, p)| format!("{ip}:{p}")).collect(), s.backends.len())
                })
                .collect()
        };
        let web: Vec<String> =
            of("web").into_iter().flat_map(|(f, n)| f.into_iter().map(move |f| format!("{f} {n}"))).collect();
        assert_eq!(
            web,
            ["198.19.0.10:80 3", "2001:2:0:8000::10:80 3", "198.18.0.1:30080 3", "2001:2::1:30080 3"]
        );
        // The hand-written Endpoints, mirrored.
        assert_eq!(of("legacy"), [(vec!["198.19.0.30:80".to_string()], 1)]);
    }

    /// Within one file the later of two objects with one identity wins; across files the
    /// first file by name, then the next when it goes.
    #[test]
    fn duplicates_within_a_file_and_across_three_files() {
        let dir = scratch_dir("duplicates");
        let svc = |ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n---\n"
            )
        };
        std::fs::write(dir.join("b.yaml"), svc("198.19.0.1") + &svc("198.19.0.2")).unwrap();
        std::fs::write(dir.join("c.yaml"), svc("198.19.0.3")).unwrap();
        let mut folder = Folder::new(&dir);
        folder.refresh().unwrap();
        let ip = |f: &Folder| {
            f.cluster().services.get(&("default".into(), "web".into())).map(|s| s.cluster_ips[0].to_string())
        };
        assert_eq!(ip(&folder).as_deref(), Some("198.19.0.2"), "the later in b.yaml");
        assert_eq!(folder.take_warnings().len(), 1, "c.yaml reported");
        std::fs::write(dir.join("a.yaml"), svc("198.19.0.4")).unwrap();
        folder.refresh().unwrap();
        assert_eq!(ip(&folder).as_deref(), Some("198.19.0.4"), "a.yaml comes first");
        assert_eq!(folder.take_warnings().len(), 2, "b.yaml and c.yaml reported");
        for (gone, next) in [("a.yaml", Some("198.19.0.2")), ("b.yaml", Some("198.19.0.3")), ("c.yaml", None)]
        {
            std::fs::remove_file(dir.join(gone)).unwrap();
            folder.refresh().unwrap();
            assert_eq!(ip(&folder).as_deref(), next, "{gone} removed");
        }
        assert!(folder.owners.is_empty(), "no file is remembered for an object no file defines");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn owners_go_from_one_to_many_and_back() {
        let (a, b): (Arc<Path>, Arc<Path>) = (Path::new("a").into(), Path::new("b").into());
        let mut o = Owners::One(b.clone());
        o.insert(b.clone());
        assert!(matches!(o, Owners::One(_)), "the same file once");
        o.insert(a.clone());
        assert_eq!(o.files(), [a.clone(), b.clone()], "in name order");
        assert!(o.remove(&a) && matches!(&o, Owners::One(p) if *p == b));
        assert!(o.remove(Path::new("c")), "a file it never had");
        assert!(!o.remove(&b), "none left");
    }

    fn scratch_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-manifests-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 198.19.0.10, ports: [{port: 80}]}\n";

    /// A restart while a file is broken: its last good content, saved in the state dir,
    /// is what the new process serves (and says so).
    #[test]
    fn a_restart_with_a_broken_file_serves_its_saved_last_good_content() {
        let (dir, state) = (scratch_dir("restart"), scratch_dir("restart-state"));
        std::fs::write(dir.join("web.yaml"), WEB).unwrap();
        let mut first = Folder::new(&dir).with_state(&state).unwrap();
        first.refresh().unwrap();
        assert_eq!(first.cluster().services.len(), 1);
        std::fs::write(dir.join("web.yaml"), "kind: Service\n  bad: [indent").unwrap();
        // A restart: the first process is gone (its copies written as it stopped).
        drop(first);
        let mut second = Folder::new(&dir).with_state(&state).unwrap();
        let (_, errors) = second.refresh().unwrap();
        assert_eq!(errors.len(), 1, "the broken file is reported");
        assert_eq!(second.cluster().services.len(), 1, "and its last good Service still served");
        assert!(second.take_warnings().iter().any(|w| w.contains("saved before the restart")));
        // Removing the file removes the saved copy too.
        std::fs::remove_file(dir.join("web.yaml")).unwrap();
        second.refresh().unwrap();
        assert!(second.cluster().services.is_empty());
        drop(second);
        assert!(!state.join("web.yaml").exists());
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&state);
    }

    /// Watched, a refresh looks only at the files touched since the last one: a file renamed
    /// into place is applied at that refresh (whole already: no `SETTLE`), a deleted one
    /// goes, a new one comes, and the untouched ones stay as they were.
    #[test]
    fn a_watched_folder_takes_renames_at_once_and_follows_every_touched_file() {
        let dir = scratch_dir("renames");
        let svc = |name: &str, port: u16| {
            WEB.replace("name: web", &format!("name: {name}")).replace("port: 80", &format!("port: {port}"))
        };
        for i in 0..50 {
            std::fs::write(dir.join(format!("s{i}.yaml")), svc(&format!("s{i}"), 80)).unwrap();
        }
        let mut folder = Folder::new(&dir);
        let watch = Watch::start(&dir, || {}).unwrap();
        folder.watched_by(watch.clone());
        folder.refresh().unwrap();
        assert_eq!(folder.cluster().services.len(), 50);
        let port_of =
            |f: &Folder, name: &str| f.cluster().services[&("default".into(), name.into())].ports[0].port;
        // A rename into place; the events are read by the watch's thread: wait for it.
        std::fs::write(dir.join(".s7.tmp"), svc("s7", 81)).unwrap();
        std::fs::rename(dir.join(".s7.tmp"), dir.join("s7.yaml")).unwrap();
        wait_until(|| {
            watch
                .closed(std::ffi::OsStr::new("s7.yaml"))
                .is_some_and(|c| watch.moved_in("s7.yaml".as_ref(), c))
        });
        let (changed, errors) = folder.refresh().unwrap();
        assert!(changed && errors.is_empty());
        assert_eq!(port_of(&folder, "s7"), 81, "applied at once, not after SETTLE");
        folder.take_changes();
        std::fs::remove_file(dir.join("s3.yaml")).unwrap();
        std::fs::write(dir.join("new.yaml"), svc("new", 82)).unwrap();
        wait_until(|| {
            folder.refresh().unwrap();
            folder.cluster().services.len() == 50
                && folder.cluster().services.contains_key(&("default".into(), "new".into()))
        });
        assert!(!folder.cluster().services.contains_key(&("default".into(), "s3".into())));
        assert_eq!(port_of(&folder, "s8"), 80);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A ConfigMap volume: every file a link through `..data`, which the kubelet swaps to a
    /// new directory with one rename — no event names the file. The new content is applied
    /// (once `WRITER_PATIENCE` says its writer is done, as no close of that name is seen).
    #[test]
    fn a_configmap_volume_swapped_under_its_links_is_followed() {
        use std::os::unix::fs::symlink;
        let dir = scratch_dir("configmap");
        let version = |name: &str, port: u16| {
            std::fs::create_dir(dir.join(name)).unwrap();
            std::fs::write(
                dir.join(name).join("web.yaml"),
                WEB.replace("port: 80", &format!("port: {port}")),
            )
            .unwrap();
        };
        version("..2026_a", 80);
        symlink("..2026_a", dir.join("..data")).unwrap();
        symlink("..data/web.yaml", dir.join("web.yaml")).unwrap();
        let mut folder = Folder::new(&dir);
        folder.watched_by(Watch::start(&dir, || {}).unwrap());
        folder.refresh().unwrap();
        let port = |f: &Folder| {
            let web = &f.cluster().services[&("default".into(), "web".into())];
            web.ports[0].port
        };
        assert_eq!(port(&folder), 80);
        version("..2026_b", 81);
        symlink("..2026_b", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        wait_until(|| {
            folder.refresh().unwrap();
            port(&folder) == 81
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A file emptied in place keeps its objects until it has stayed empty for
    /// `WRITER_PATIENCE` (a writer stalled after its truncation looks the same), then they go.
    #[test]
    fn an_emptied_file_is_believed_once_it_stays_empty() {
        let dir = scratch_dir("emptied");
        std::fs::write(dir.join("web.yaml"), WEB).unwrap();
        let mut folder = Folder::new(&dir);
        folder.watched_by(Watch::start(&dir, || {}).unwrap());
        folder.refresh().unwrap();
        std::fs::write(dir.join("web.yaml"), "").unwrap();
        let t0 = std::time::Instant::now();
        while t0.elapsed() < SETTLE * 4 {
            folder.refresh().unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(folder.cluster().services.len(), 1, "kept past SETTLE");
        while t0.elapsed() < WRITER_PATIENCE + Duration::from_secs(2) && !folder.cluster().services.is_empty()
        {
            folder.refresh().unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(folder.cluster().services.is_empty(), "gone once it stayed empty");
        assert!(t0.elapsed() >= WRITER_PATIENCE);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A file open for writing is left at its previous version until its writer closes it
    /// (the real inotify watch).
    #[test]
    fn a_file_being_written_is_applied_once_closed() {
        use std::io::Write as _;
        let dir = scratch_dir("writing");
        std::fs::write(dir.join("web.yaml"), WEB).unwrap();
        let mut folder = Folder::new(&dir);
        let watch = Watch::start(&dir, || {}).unwrap();
        folder.watched_by(watch.clone());
        folder.refresh().unwrap();
        assert_eq!(folder.cluster().services.len(), 1, "what is there at start is read at once");
        let two = format!("{WEB}---\n{}", WEB.replace("name: web", "name: api").replace(".10", ".11"));
        let mut f = std::fs::File::create(dir.join("web.yaml")).unwrap();
        f.write_all(&two.as_bytes()[..WEB.len() + 10]).unwrap();
        // Until the watcher has seen the write, "not closed" would hold for the wrong reason.
        wait_until(|| watch.closed("web.yaml".as_ref()).is_none());
        folder.refresh().unwrap();
        assert_eq!(folder.cluster().services.len(), 1, "half-written: not read");
        f.write_all(&two.as_bytes()[WEB.len() + 10..]).unwrap();
        folder.refresh().unwrap();
        assert_eq!(folder.cluster().services.len(), 1, "whole, but still open");
        drop(f);
        wait_until(|| watch.closed("web.yaml".as_ref()).is_some());
        folder.refresh().unwrap();
        assert_eq!(folder.cluster().services.len(), 1, "read once closed, but not yet settled");
        let deadline = folder.settle_deadline().expect("waiting to settle");
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        folder.refresh().unwrap();
        assert_eq!(folder.cluster().services.len(), 2, "applied once settled");
        assert_eq!(folder.settle_deadline(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn wait_until(mut f: impl FnMut() -> bool) {
        let t0 = std::time::Instant::now();
        while !f() {
            assert!(t0.elapsed() < Duration::from_secs(5), "the watcher saw nothing in 5 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// `cat x > f` over and over (truncate, write in small chunks, close; mostly back to
    /// back, every tenth time a pause), with the folder re-read as fast as it can be
    /// meanwhile, through the real inotify watch: no truncated or half-written file is ever
    /// applied, and the rewrites are (in the pauses).
    #[test]
    fn a_file_rewritten_in_place_over_and_over_is_never_read_half_written() {
        use std::io::Write as _;
        let dir = scratch_dir("rewrites");
        let api = WEB.replace("name: web", "name: api").replace(".10", ".11");
        // Two versions of one file, both with two Services, differing in a port.
        let versions =
            [format!("{WEB}---\n{api}"), format!("{WEB}---\n{}", api.replace("port: 80", "port: 81"))];
        std::fs::write(dir.join("web.yaml"), &versions[0]).unwrap();
        let mut folder = Folder::new(&dir);
        folder.watched_by(Watch::start(&dir, || {}).unwrap());
        folder.refresh().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (dir, stop, versions) = (dir.clone(), stop.clone(), versions.clone());
            std::thread::spawn(move || {
                let mut n = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut f = std::fs::File::create(dir.join("web.yaml")).unwrap();
                    for chunk in versions[n % 2].as_bytes().chunks(16) {
                        f.write_all(chunk).unwrap();
                    }
                    drop(f);
                    n += 1;
                    if n.is_multiple_of(10) {
                        std::thread::sleep(SETTLE * 2);
                    }
                }
                n
            })
        };
        let (t0, mut refreshes, mut applied) = (std::time::Instant::now(), 0, 0);
        while t0.elapsed() < Duration::from_secs(3) {
            let (changed, errors) = folder.refresh().unwrap();
            assert!(errors.is_empty(), "a half-written file was read: {errors:?}");
            let services = &folder.cluster().services;
            assert_eq!(services.len(), 2, "after {refreshes} reads: {services:?}");
            applied += usize::from(changed);
            folder.take_changes();
            refreshes += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let rewrites = writer.join().unwrap();
        assert!(rewrites > 100 && refreshes > 100, "{rewrites} rewrites, {refreshes} reads");
        assert!(applied > 0, "no rewrite applied in {rewrites}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What is not a manifest file gets one log line, not one per poll.
    #[test]
    fn skipped_entries_are_reported_once() {
        let dir = scratch_dir("skipped");
        std::fs::create_dir(dir.join("a-dir.yaml")).unwrap();
        std::os::unix::fs::symlink(dir.join("nowhere"), dir.join("dangling.yaml")).unwrap();
        std::os::unix::fs::symlink(dir.join("loop.yaml"), dir.join("loop.yaml")).unwrap();
        let fifo = std::ffi::CString::new(dir.join("pipe.yaml").to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let mut folder = Folder::new(&dir);
        folder.refresh().unwrap();
        let w = folder.take_warnings();
        assert_eq!(w.len(), 4, "{w:?}");
        for name in ["a-dir.yaml", "dangling.yaml", "loop.yaml", "pipe.yaml"] {
            assert!(w.iter().any(|l| l.contains(name) && l.contains("skipped")), "{name}: {w:?}");
        }
        folder.refresh().unwrap();
        assert!(folder.take_warnings().is_empty(), "once");
        let _ = std::fs::remove_dir_all(&dir);
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
        assert_eq!(folder.cluster().services.len(), 1);
        assert!(folder.take_changes().all, "the first changes are everything");

        std::fs::write(&f, "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: nope}\n")
            .unwrap();
        let (changed, errors) = folder.refresh().unwrap();
        assert!(!changed);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("svc.yaml") && errors[0].to_string().contains("nope"));
        let svc = &folder.cluster().services[&("default".into(), "web".into())];
        assert_eq!(svc.cluster_ips[0].to_string(), "198.19.0.10");
        // Reported once per version of the file.
        assert!(folder.refresh().unwrap().1.is_empty());

        std::fs::remove_file(&f).unwrap();
        assert!(folder.refresh().unwrap().0);
        assert!(folder.cluster().services.is_empty());
        let web: Key = ("default".into(), "web".into());
        assert_eq!(folder.take_changes(), Changes { services: [web].into(), ..Default::default() });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Only the objects that differ are reported as changed; a duplicate is reported and the
    /// first file wins, until it goes.
    #[test]
    fn folder_reports_the_objects_that_changed() {
        let dir = std::env::temp_dir().join(format!("lb-manifests-changes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svc = |name: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n---\n"
            )
        };
        let key = |n: &str| -> Key { ("default".into(), n.into()) };
        std::fs::write(dir.join("a.yaml"), svc("one", "198.19.0.1") + &svc("two", "198.19.0.2")).unwrap();
        let mut folder = Folder::new(&dir);
        folder.refresh().unwrap();
        assert!(folder.take_changes().all);

        std::fs::write(dir.join("a.yaml"), svc("one", "198.19.0.1") + &svc("two", "198.19.0.3")).unwrap();
        assert!(folder.refresh().unwrap().0);
        assert_eq!(folder.take_changes(), Changes { services: [key("two")].into(), ..Default::default() });

        std::fs::write(dir.join("b.yaml"), svc("one", "198.19.0.9")).unwrap();
        folder.refresh().unwrap();
        let warnings = folder.take_warnings();
        assert!(
            warnings.len() == 1 && warnings[0].contains("b.yaml") && warnings[0].contains("a.yaml"),
            "{warnings:?}"
        );
        let ip = |f: &Folder| f.cluster().services[&key("one")].cluster_ips[0].to_string();
        assert_eq!(ip(&folder), "198.19.0.1");

        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        folder.refresh().unwrap();
        assert_eq!(ip(&folder), "198.19.0.9");
        assert!(!folder.cluster().services.contains_key(&key("two")));
        assert_eq!(folder.take_changes().services, [key("one"), key("two")].into());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
