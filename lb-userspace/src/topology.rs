//! Topology-aware routing with kube-proxy's rules (`pkg/proxy/topology.go`). The EndpointSlice
//! controller turns a Service's `trafficDistribution` (PreferClose, PreferSameZone,
//! PreferSameNode) or topology mode into per-endpoint hints (`forZones`, `forNodes`); the
//! proxy follows the hints only:
//!
//! * same node, when every ready endpoint has node hints and one of them names this node;
//! * else same zone, when every ready endpoint has zone hints and one names this node's zone
//!   (`topology.kubernetes.io/zone` on its Node);
//! * else every endpoint.
//!
//! Only endpoints a Service reaches cluster-wide are narrowed: with a `Local` traffic policy
//! the local endpoints are used as they are. In manifest mode the slices carry the hints, as
//! the controller would have written them.

use k8s_openapi::api::discovery::v1::Endpoint;

/// The node label that names its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Which endpoints a Service's traffic from this node may go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    All,
    SameNode,
    SameZone,
}

/// An endpoint's hints: the nodes and the zones it is for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hints {
    pub nodes: Vec<String>,
    pub zones: Vec<String>,
}

impl Hints {
    pub fn of(ep: &Endpoint) -> Hints {
        let h = ep.hints.as_ref();
        Hints {
            nodes: h
                .and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|n| n.name.clone())
                .collect(),
            zones: h
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect(),
        }
    }
}

/// The mode the hints of the ready endpoints allow on node `node` in zone `zone`.
pub fn mode<'a>(ready: impl IntoIterator<Item = &'a Hints>, node: &str, zone: Option<&str>) -> Mode {
    let (mut all_node_hints, mut for_node) = (true, false);
    let (mut all_zone_hints, mut for_zone) = (true, false);
    for h in ready {
        if h.nodes.is_empty() {
            all_node_hints = false;
        } else if h.nodes.iter().any(|n| n == node) {
            for_node = true;
        }
        if h.zones.is_empty() {
            all_zone_hints = false;
        } else if zone.is_some_and(|z| h.zones.iter().any(|hz| hz == z)) {
            for_zone = true;
        }
    }
    if all_node_hints && for_node {
        Mode::SameNode
    } else if all_zone_hints && for_zone {
        Mode::SameZone
    } else {
        Mode::All
    }
}

/// Whether an endpoint with hints `h` may be used in `mode`.
pub fn available(mode: Mode, h: &Hints, node: &str, zone: Option<&str>) -> bool {
    match mode {
        Mode::All => true,
        Mode::SameNode => h.nodes.iter().any(|n| n == node),
        Mode::SameZone => zone.is_some_and(|z| h.zones.iter().any(|hz| hz == z)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(nodes: &[&str], zones: &[&str]) -> Hints {
        Hints {
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            zones: zones.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// kube-proxy's cases, from its documented behaviour: (ready endpoints' hints, node's
    /// zone, the mode on node `a` in that zone).
    #[test]
    fn the_mode_follows_kube_proxys_rules() {
        let cases: Vec<(&str, Vec<Hints>, Option<&str>, Mode)> = vec![
            ("no hints at all", vec![h(&[], &[]), h(&[], &[])], Some("z1"), Mode::All),
            (
                "zone hints, one for this zone",
                vec![h(&[], &["z1"]), h(&[], &["z2"])],
                Some("z1"),
                Mode::SameZone,
            ),
            ("zone hints, none for this zone", vec![h(&[], &["z2"]), h(&[], &["z3"])], Some("z1"), Mode::All),
            ("an endpoint without a zone hint", vec![h(&[], &["z1"]), h(&[], &[])], Some("z1"), Mode::All),
            ("the node has no zone label", vec![h(&[], &["z1"]), h(&[], &["z2"])], None, Mode::All),
            (
                "node hints, one for this node",
                vec![h(&["a"], &["z1"]), h(&["b"], &["z1"])],
                Some("z1"),
                Mode::SameNode,
            ),
            (
                "node hints, none for this node: zone hints decide",
                vec![h(&["b"], &["z1"]), h(&["c"], &["z2"])],
                Some("z1"),
                Mode::SameZone,
            ),
            (
                "an endpoint without a node hint: zone hints decide",
                vec![h(&["a"], &["z1"]), h(&[], &["z1"])],
                Some("z1"),
                Mode::SameZone,
            ),
            (
                "node hints only, one for this node",
                vec![h(&["a"], &[]), h(&["b"], &[])],
                None,
                Mode::SameNode,
            ),
            ("no ready endpoints", vec![], Some("z1"), Mode::All),
        ];
        for (what, ready, zone, want) in cases {
            assert_eq!(mode(&ready, "a", zone), want, "{what}");
        }
    }

    #[test]
    fn availability_in_each_mode() {
        let (mine, other) = (h(&["a"], &["z1"]), h(&["b"], &["z2"]));
        assert!(available(Mode::All, &other, "a", Some("z1")));
        assert!(
            available(Mode::SameNode, &mine, "a", Some("z1"))
                && !available(Mode::SameNode, &other, "a", Some("z1"))
        );
        assert!(
            available(Mode::SameZone, &mine, "a", Some("z1"))
                && !available(Mode::SameZone, &other, "a", Some("z1"))
        );
        assert!(!available(Mode::SameZone, &mine, "a", None));
    }
}
