//! `lb agent --config FILE`: kube-proxy's configuration file (`KubeProxyConfiguration`,
//! `kubeproxy.config.k8s.io/v1alpha1`), so an operator can mount the cluster's `kube-proxy`
//! ConfigMap as it is. The file (or a ConfigMap manifest holding it under `config.conf`) is
//! turned into the agent flags it stands for; a flag given on the command line wins, as with
//! kube-proxy. Fields with no equivalent here are reported once, by name.

use std::path::Path;

use anyhow::{Context as _, bail};
use serde_yaml_ng::Value;

/// The agent flags `--config FILE` stands for that the command line does not give (`sub`:
/// the agent's matches), as arguments to append; and what to log about the file.
pub fn extra_args(path: &Path, sub: &clap::ArgMatches) -> anyhow::Result<(Vec<String>, String)> {
    let file = read(path)?;
    let given = |id: &str| sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    let (mut args, mut used, mut overridden) = (Vec::new(), Vec::new(), Vec::new());
    for (id, value) in &file.flags {
        // A manifest folder excludes a kubeconfig: the file's is for the cluster case.
        if given(id) || (*id == "kubeconfig" && given("manifests")) {
            overridden.push(*id);
            continue;
        }
        args.push(format!("--{}", id.replace('_', "-")));
        args.push(value.clone());
        used.push(*id);
    }
    let list = |v: &[&str]| if v.is_empty() { "none".to_string() } else { v.join(", ") };
    let ignored: Vec<&str> = file.ignored.iter().map(String::as_str).collect();
    let note = format!(
        "kube-proxy configuration {}: applied {}; overridden by flags {}; ignored (no equivalent in lb) {}",
        path.display(),
        list(&used),
        list(&overridden),
        list(&ignored)
    );
    Ok((args, note))
}

/// What a configuration file says, as agent flags.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FromFile {
    /// `(flag id, value)`: the clap id of the agent flag (its field name) and the value as
    /// the flag takes it.
    pub flags: Vec<(&'static str, String)>,
    /// Fields read but without effect, by path (`iptables`, `conntrack.maxPerCore`).
    pub ignored: Vec<String>,
}

/// The `KubeProxyConfiguration` fields the agent honours: the path, and the flag.
const HONOURED: [(&str, &str); 13] = [
    ("metricsBindAddress", "metrics_bind_address"),
    ("healthzBindAddress", "healthz_bind_address"),
    ("nodePortAddresses", "nodeport_addresses"),
    ("hostnameOverride", "node_name"),
    ("clientConnection.kubeconfig", "kubeconfig"),
    ("conntrack.tcpEstablishedTimeout", "conntrack_tcp_timeout_established"),
    ("conntrack.tcpCloseWaitTimeout", "conntrack_tcp_timeout_close_wait"),
    ("conntrack.udpTimeout", "conntrack_udp_timeout"),
    ("conntrack.udpStreamTimeout", "conntrack_udp_timeout_stream"),
    ("configSyncPeriod", "config_sync_period"),
    // Per mode in this API version; lb has one mode, so whichever the file sets.
    ("iptables.minSyncPeriod", "min_sync_period"),
    ("nftables.minSyncPeriod", "min_sync_period"),
    ("ipvs.minSyncPeriod", "min_sync_period"),
];

/// Reads `path`.
pub fn read(path: &Path) -> anyhow::Result<FromFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--config {}", path.display()))?;
    parse(&text).with_context(|| format!("--config {}", path.display()))
}

/// Parses a `KubeProxyConfiguration`, or a ConfigMap holding one under `config.conf` (the
/// key kubeadm's `kube-proxy` ConfigMap uses).
pub fn parse(text: &str) -> anyhow::Result<FromFile> {
    let doc: Value = serde_yaml_ng::from_str(text).context("not YAML")?;
    let doc = match doc.get("kind").and_then(Value::as_str) {
        Some("ConfigMap") => {
            let inner = doc
                .get("data")
                .and_then(|d| d.get("config.conf"))
                .and_then(Value::as_str)
                .context("a ConfigMap without data.config.conf")?;
            serde_yaml_ng::from_str(inner).context("data.config.conf: not YAML")?
        }
        _ => doc,
    };
    match (doc.get("apiVersion").and_then(Value::as_str), doc.get("kind").and_then(Value::as_str)) {
        (Some("kubeproxy.config.k8s.io/v1alpha1"), Some("KubeProxyConfiguration")) => {}
        (api, kind) => bail!(
            "expected apiVersion kubeproxy.config.k8s.io/v1alpha1, kind KubeProxyConfiguration; found {} {}",
            api.unwrap_or("(none)"),
            kind.unwrap_or("(none)")
        ),
    }
    let mut out = FromFile::default();
    let Value::Mapping(top) = &doc else { bail!("not a mapping") };
    for (key, value) in top {
        let key = key.as_str().unwrap_or_default();
        match key {
            "apiVersion" | "kind" => {}
            // Nested objects: each field honoured or reported on its own.
            "clientConnection" | "conntrack" | "iptables" | "nftables" | "ipvs" => match value {
                Value::Mapping(fields) => {
                    for (k, v) in fields {
                        field(&mut out, &format!("{key}.{}", k.as_str().unwrap_or_default()), v)?;
                    }
                }
                Value::Null => {}
                _ => bail!("{key}: not a mapping"),
            },
            "bindAddress" => bind_address(&mut out, value, top)?,
            _ => field(&mut out, key, value)?,
        }
    }
    Ok(out)
}

/// One field: the flag it stands for (unless it is unset: null, empty, or a zero duration,
/// which kube-proxy reads as "leave the default"), or ignored.
fn field(out: &mut FromFile, path: &str, value: &Value) -> anyhow::Result<()> {
    let Some(&(_, flag)) = HONOURED.iter().find(|(p, _)| *p == path) else {
        out.ignored.push(path.to_string());
        return Ok(());
    };
    let text = match value {
        Value::Null => return Ok(()),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Sequence(items) => {
            let items: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
            items.join(",")
        }
        _ => bail!("{path}: expected a string"),
    };
    let text = match flag {
        // kube-proxy writes `:10249` for "all addresses".
        "metrics_bind_address" | "healthz_bind_address" if text.starts_with(':') => format!("0.0.0.0{text}"),
        _ => text,
    };
    let duration = path.starts_with("conntrack.") || path.ends_with("SyncPeriod");
    let unset = text.is_empty() || (duration && super::agent::is_zero_duration(&text));
    if !unset {
        out.flags.push((flag, text));
    }
    Ok(())
}

/// `bindAddress`: an address other than 0.0.0.0 or :: names the node's address, which is
/// where NodePorts are served, unless `nodePortAddresses` says otherwise.
fn bind_address(out: &mut FromFile, value: &Value, top: &serde_yaml_ng::Mapping) -> anyhow::Result<()> {
    let Some(text) = value.as_str().filter(|s| !s.is_empty()) else { return Ok(()) };
    let ip: std::net::IpAddr = text.parse().with_context(|| format!("bindAddress {text:?}"))?;
    let node_ports_given =
        top.get("nodePortAddresses").and_then(Value::as_sequence).is_some_and(|s| !s.is_empty());
    if !ip.is_unspecified() && !node_ports_given {
        let bits = if ip.is_ipv4() { 32 } else { 128 };
        out.flags.push(("nodeport_addresses", format!("{ip}/{bits}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `kubeadm init` (v1.34) puts in the `kube-proxy` ConfigMap's `config.conf`.
    const KUBEADM: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

    #[test]
    fn kubeadms_defaults_give_the_kubeconfig_and_report_the_rest() {
        let f = parse(KUBEADM).unwrap();
        // Zero durations and empty strings leave the defaults, as in kube-proxy.
        assert_eq!(f.flags, vec![("kubeconfig", "/var/lib/kube-proxy/kubeconfig.conf".to_string())]);
        for name in [
            "clusterCIDR",
            "iptables.masqueradeAll",
            "iptables.syncPeriod",
            "ipvs.scheduler",
            "mode",
            "conntrack.maxPerCore",
            "clientConnection.qps",
            "winkernel",
        ] {
            assert!(f.ignored.iter().any(|i| i == name), "{name} not reported: {:?}", f.ignored);
        }
        assert!(!f.ignored.iter().any(|i| i == "conntrack.udpTimeout" || i == "bindAddress"));
    }

    #[test]
    fn set_values_become_flags() {
        let text = KUBEADM
            .replace("metricsBindAddress: \"\"", "metricsBindAddress: :10249")
            .replace("healthzBindAddress: \"\"", "healthzBindAddress: 127.0.0.1:10256")
            .replace("hostnameOverride: \"\"", "hostnameOverride: node-7")
            .replace("  tcpEstablishedTimeout: null", "  tcpEstablishedTimeout: 2h0m0s")
            .replace("  udpTimeout: 0s", "  udpTimeout: 45s")
            .replace("nodePortAddresses: null", "nodePortAddresses: [198.18.0.0/24, 2001:2::/64]")
            .replace(
                "  masqueradeBit: null\n  minSyncPeriod: 0s\n  syncPeriod: 0s\nipvs",
                "  masqueradeBit: null\n  minSyncPeriod: 1s\n  syncPeriod: 0s\nipvs",
            );
        let f = parse(&text).unwrap();
        for want in [
            ("metrics_bind_address", "0.0.0.0:10249"),
            ("healthz_bind_address", "127.0.0.1:10256"),
            ("node_name", "node-7"),
            ("conntrack_tcp_timeout_established", "2h0m0s"),
            ("conntrack_udp_timeout", "45s"),
            ("nodeport_addresses", "198.18.0.0/24,2001:2::/64"),
            ("min_sync_period", "1s"),
        ] {
            assert!(f.flags.contains(&(want.0, want.1.to_string())), "{want:?} in {:?}", f.flags);
        }
    }

    #[test]
    fn a_bind_address_names_the_nodeport_address_unless_node_port_addresses_do() {
        let text = KUBEADM.replace("bindAddress: 0.0.0.0", "bindAddress: 198.18.0.1");
        assert!(parse(&text).unwrap().flags.contains(&("nodeport_addresses", "198.18.0.1/32".into())));
        let both = text.replace("nodePortAddresses: null", "nodePortAddresses: [198.18.0.0/24]");
        let flags = parse(&both).unwrap().flags;
        assert_eq!(flags.iter().filter(|(f, _)| *f == "nodeport_addresses").count(), 1);
        assert!(flags.contains(&("nodeport_addresses", "198.18.0.0/24".into())));
    }

    #[test]
    fn the_configmap_itself_is_read_and_anything_else_refused() {
        let indented: String = KUBEADM.lines().map(|l| format!("    {l}\n")).collect();
        let cm = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: kube-proxy, namespace: kube-system}}\ndata:\n  config.conf: |-\n{indented}"
        );
        assert_eq!(parse(&cm).unwrap(), parse(KUBEADM).unwrap());
        let err = parse("apiVersion: v1\nkind: Service\n").unwrap_err();
        assert!(format!("{err:#}").contains("KubeProxyConfiguration"), "{err:#}");
        assert!(parse("[1, 2").is_err());
    }
}
