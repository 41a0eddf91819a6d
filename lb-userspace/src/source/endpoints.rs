//! Hand-written `v1/Endpoints` in manifest mode, mirrored into EndpointSlices the way
//! Kubernetes' EndpointSlice mirroring controller does it: one slice per subset and address
//! family, `addresses` ready and `notReadyAddresses` not, the subset's ports, labelled with
//! the Service's name and as mirrored. The Model uses mirrored slices only for a Service
//! without a selector, as the controller mirrors only those. (In a cluster the controller has
//! already done this: the kube source does not read Endpoints.)

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    api::{
        core::v1::{EndpointAddress, Endpoints},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::model::{MANAGED_BY_LABEL, MIRROR_CONTROLLER, SERVICE_NAME_LABEL};

/// The slices mirroring `ep`, and a warning for each address that is not an IP address
/// (skipped, as the controller skips them).
pub fn mirror(ep: &Endpoints) -> Result<(Vec<EndpointSlice>, Vec<String>), String> {
    let name = ep.metadata.name.as_deref().filter(|n| !n.is_empty()).ok_or("metadata.name is missing")?;
    let ns = ep.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let (mut slices, mut warnings) = (Vec::new(), Vec::new());
    for (i, subset) in ep.subsets.iter().flatten().enumerate() {
        let ports: Vec<EndpointPort> = subset
            .ports
            .iter()
            .flatten()
            .map(|p| EndpointPort {
                name: p.name.clone(),
                port: Some(p.port),
                protocol: p.protocol.clone(),
                app_protocol: p.app_protocol.clone(),
            })
            .collect();
        let ready = subset.addresses.iter().flatten().map(|a| (a, true));
        let not_ready = subset.not_ready_addresses.iter().flatten().map(|a| (a, false));
        let mut by_family: BTreeMap<&str, Vec<Endpoint>> = BTreeMap::new();
        for (j, (a, ready)) in ready.chain(not_ready).enumerate() {
            let Ok(ip) = a.ip.parse::<IpAddr>() else {
                warnings.push(format!("subsets[{i}]: address {j} {:?} is not an IP address (skipped)", a.ip));
                continue;
            };
            let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
            by_family.entry(family).or_default().push(endpoint(a, ip, ready));
        }
        for (family, endpoints) in by_family {
            let suffix = if family == "IPv6" { "-v6" } else { "" };
            slices.push(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(format!("{name}-mirror-{i}{suffix}")),
                    namespace: Some(ns.clone()),
                    labels: Some(BTreeMap::from([
                        (SERVICE_NAME_LABEL.to_string(), name.to_string()),
                        (MANAGED_BY_LABEL.to_string(), MIRROR_CONTROLLER.to_string()),
                    ])),
                    ..Default::default()
                },
                address_type: family.to_string(),
                endpoints,
                ports: Some(ports.clone()),
            });
        }
    }
    Ok((slices, warnings))
}

fn endpoint(a: &EndpointAddress, ip: IpAddr, ready: bool) -> Endpoint {
    Endpoint {
        addresses: vec![ip.to_string()],
        conditions: Some(EndpointConditions { ready: Some(ready), ..Default::default() }),
        hostname: a.hostname.clone(),
        node_name: a.node_name.clone(),
        target_ref: a.target_ref.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A subset with ready and not-ready addresses of both families and two ports: one slice
    /// per family, each with both ports and the readiness of each address; a bad address is
    /// skipped with a warning.
    #[test]
    fn subsets_become_one_slice_per_subset_and_family() {
        let yaml = "
metadata: {name: db, namespace: prod}
subsets:
- addresses: [{ip: 198.18.5.1, nodeName: n1}, {ip: '2001:2::5'}, {ip: not-an-ip}]
  notReadyAddresses: [{ip: 198.18.5.2}]
  ports: [{name: sql, port: 5432}, {name: metrics, port: 9187, protocol: TCP}]
- addresses: [{ip: 198.18.6.1}]
  ports: [{port: 53, protocol: UDP}]
";
        let ep: Endpoints = serde_yaml_ng::from_str(yaml).unwrap();
        let (slices, warnings) = mirror(&ep).unwrap();
        let names: Vec<_> = slices.iter().map(|s| s.metadata.name.clone().unwrap()).collect();
        assert_eq!(names, ["db-mirror-0", "db-mirror-0-v6", "db-mirror-1"]);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let v4 = &slices[0];
        assert_eq!(v4.address_type, "IPv4");
        assert_eq!(v4.metadata.namespace.as_deref(), Some("prod"));
        assert!(crate::objects::Slice::from(v4).mirrored);
        assert_eq!(v4.metadata.labels.as_ref().unwrap()[SERVICE_NAME_LABEL], "db");
        let seen: Vec<_> = v4
            .endpoints
            .iter()
            .map(|e| (e.addresses[0].as_str(), e.conditions.as_ref().unwrap().ready, e.node_name.as_deref()))
            .collect();
        assert_eq!(seen, [("198.18.5.1", Some(true), Some("n1")), ("198.18.5.2", Some(false), None)]);
        assert_eq!(v4.ports.as_ref().unwrap().len(), 2);
        assert_eq!(slices[1].endpoints[0].addresses, ["2001:2::5"]);
        assert_eq!(slices[2].ports.as_ref().unwrap()[0].protocol.as_deref(), Some("UDP"));
    }
}
