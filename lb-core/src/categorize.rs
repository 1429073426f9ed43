//! Categorisation: which endpoints of a service port may serve which traffic on one node.
//!
//! This is a readable restatement of kube-proxy's `CategorizeEndpoints`
//! (`pkg/proxy/topology.go`, Kubernetes 1.34+). For one service port on one node it yields:
//!
//! * the **cluster** set: endpoints for traffic under the Cluster policy (internal traffic with
//!   `internalTrafficPolicy: Cluster`, external traffic with `externalTrafficPolicy: Cluster`,
//!   and pod or node traffic short-circuited under eTP Local), after topology hints;
//! * the **local** set: endpoints on this node, for traffic under a Local policy;
//! * **all** endpoints this node may send to (the union);
//! * whether the service has **any** usable endpoint anywhere (which decides between *reject*
//!   and *drop* when a set is empty).
//!
//! The rules, in order:
//!
//! 1. **Ready first, then serving-terminating.** An endpoint is usable when it is `ready`. When a
//!    set would have no ready endpoint, it falls back to endpoints that are `serving` and
//!    `terminating` (graceful termination). The cluster and local sets fall back independently.
//!    A non-serving endpoint is never used.
//! 2. **Topology applies to the cluster set only**, and only to ready endpoints:
//!    * *PreferSameNode*: when every ready endpoint has `hints.forNodes` and at least one names
//!      this node, only endpoints hinted for this node are used;
//!    * otherwise *PreferSameZone*: when every ready endpoint has `hints.forZones` and at least
//!      one names this node's zone, only endpoints hinted for that zone are used;
//!    * otherwise no topology filtering. A node without a zone label never matches a zone hint,
//!      so it gets no zone filtering.
//! 3. **The local set** holds endpoints whose `nodeName` is this node: ready ones if any,
//!    otherwise serving-terminating ones.
//! 4. **Which sets exist** follows the policies: a port uses the cluster set unless
//!    `internalTrafficPolicy` is Local and it has no external entry point; it uses the local set
//!    when `internalTrafficPolicy` is Local or an effective `externalTrafficPolicy` Local has an
//!    external entry point (see [`ServicePort::uses_cluster_endpoints`]).
//!
//! For every endpoint left out of a set, [`Categorized::why_excluded`] gives an [`Exclusion`]
//! whose `Display` is a sentence a person can read.
//!
//! ```
//! use lb_core::{categorize, Endpoint, EndpointSet, Node, Protocol, ServicePort};
//!
//! let svc = ServicePort::builder("shop", "web", "http", Protocol::Tcp, 80)
//!     .cluster_ips(["10.96.0.10"])
//!     .build()?;
//! let node = Node::new("node-a", Some("zone-a"))?;
//! let endpoints = vec![
//!     Endpoint::builder("10.0.1.5", 8080).zone("zone-a").hints_for_zones(["zone-a"]).build()?,
//!     Endpoint::builder("10.0.2.7", 8080).zone("zone-b").hints_for_zones(["zone-b"]).build()?,
//! ];
//! let c = categorize(&svc, &endpoints, &node);
//! let chosen: Vec<_> = c.cluster().map(|e| e.addr().to_string()).collect();
//! assert_eq!(chosen, ["10.0.1.5:8080"]);
//! let why = c.why_excluded(EndpointSet::Cluster, 1).map(|r| r.to_string());
//! assert_eq!(why.as_deref(), Some("hinted for zones [zone-b], not for this node's zone zone-a"));
//! # Ok::<(), lb_core::ModelError>(())
//! ```

use std::fmt;

use crate::model::{Endpoint, Node, ServicePort};

/// The topology filtering chosen for the cluster set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopologyMode {
    /// No filtering: every usable endpoint.
    None,
    /// Only endpoints hinted for this node's zone.
    PreferSameZone,
    /// Only endpoints hinted for this node.
    PreferSameNode,
}

/// Why [`TopologyMode`] came out the way it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopologyReason {
    /// The port does not use the cluster set, so topology is irrelevant.
    ClusterSetNotUsed,
    /// No endpoint is ready; hints are only read from ready endpoints.
    NoReadyEndpoints,
    /// No ready endpoint carries any hint.
    NoHints,
    /// Every ready endpoint has node hints and at least one names this node.
    NodeHintsMatch,
    /// Every ready endpoint has zone hints and at least one names this node's zone.
    ZoneHintsMatch,
    /// Some ready endpoint has no zone hint, so zone hints are ignored.
    SomeEndpointLacksZoneHints,
    /// Every ready endpoint has zone hints, but the node has no zone label.
    NodeHasNoZone,
    /// Every ready endpoint has zone hints, but none names this node's zone.
    NoEndpointHintedForZone,
}

/// The topology decision for a categorisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Topology {
    /// The filtering applied to the cluster set.
    pub mode: TopologyMode,
    /// Why.
    pub reason: TopologyReason,
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.reason {
            TopologyReason::ClusterSetNotUsed => {
                "no topology filtering: the port uses only node-local endpoints"
            }
            TopologyReason::NoReadyEndpoints => "no topology filtering: no endpoint is ready",
            TopologyReason::NoHints => "no topology filtering: endpoints carry no hints",
            TopologyReason::NodeHintsMatch => {
                "PreferSameNode: every ready endpoint has node hints and some are for this node"
            }
            TopologyReason::ZoneHintsMatch => {
                "PreferSameZone: every ready endpoint has zone hints and some are for this node's zone"
            }
            TopologyReason::SomeEndpointLacksZoneHints => {
                "no topology filtering: some ready endpoint has no zone hint"
            }
            TopologyReason::NodeHasNoZone => {
                "no topology filtering: the node has no topology.kubernetes.io/zone label"
            }
            TopologyReason::NoEndpointHintedForZone => {
                "no topology filtering: no endpoint is hinted for this node's zone"
            }
        })
    }
}

/// One of the endpoint sets a categorisation yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndpointSet {
    /// Endpoints for Cluster-policy traffic.
    Cluster,
    /// Endpoints for Local-policy traffic.
    Local,
    /// Every endpoint the node may send to.
    All,
}

/// Why an endpoint is not in a set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exclusion {
    /// The port does not use the cluster set (`internalTrafficPolicy: Local` and no external
    /// entry point).
    ClusterSetNotUsed,
    /// The port does not use the local set (no Local policy in effect).
    LocalSetNotUsed,
    /// The endpoint is neither ready nor serving-and-terminating.
    NotReady {
        /// Its `serving` condition.
        serving: bool,
        /// Its `terminating` condition.
        terminating: bool,
    },
    /// The endpoint is serving but terminating, and ready endpoints exist for this set, so
    /// terminating ones are not used.
    TerminatingWhileReadyExist,
    /// PreferSameZone is in effect and the endpoint is not hinted for this node's zone.
    HintedForOtherZones {
        /// This node's zone.
        node_zone: String,
        /// The zones the endpoint is hinted for.
        hints: Vec<String>,
    },
    /// PreferSameNode is in effect and the endpoint is not hinted for this node.
    HintedForOtherNodes {
        /// This node's name.
        node: String,
        /// The nodes the endpoint is hinted for.
        hints: Vec<String>,
    },
    /// A Local policy applies and the endpoint runs on another node (or on no known node).
    NotOnThisNode {
        /// The endpoint's `nodeName`, if any.
        endpoint_node: Option<String>,
    },
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exclusion::ClusterSetNotUsed => f.write_str(
                "the port uses only node-local endpoints (internalTrafficPolicy Local, no external access)",
            ),
            Exclusion::LocalSetNotUsed => {
                f.write_str("the port has no Local traffic policy in effect")
            }
            Exclusion::NotReady { serving, terminating } => write!(
                f,
                "not ready (serving={serving}, terminating={terminating}); only ready or serving-terminating endpoints are used"
            ),
            Exclusion::TerminatingWhileReadyExist => {
                f.write_str("terminating, and ready endpoints are available")
            }
            Exclusion::HintedForOtherZones { node_zone, hints } => {
                write!(f, "hinted for zones [{}], not for this node's zone {node_zone}", hints.join(", "))
            }
            Exclusion::HintedForOtherNodes { node, hints } => {
                write!(f, "hinted for nodes [{}], not for this node {node}", hints.join(", "))
            }
            Exclusion::NotOnThisNode { endpoint_node: Some(n) } => {
                write!(f, "runs on node {n}, not on this node")
            }
            Exclusion::NotOnThisNode { endpoint_node: None } => {
                f.write_str("has no nodeName, so it is not on this node")
            }
        }
    }
}

const IN_CLUSTER: u8 = 1;
const IN_LOCAL: u8 = 2;

/// The result of [`categorize`]: endpoint sets as indices into the input slice, with the
/// decisions that produced them.
#[derive(Debug, Clone)]
pub struct Categorized<'a> {
    endpoints: &'a [Endpoint],
    node: &'a Node,
    uses_cluster: bool,
    uses_local: bool,
    membership: Vec<u8>,
    cluster: Vec<u32>,
    local: Vec<u32>,
    all: Vec<u32>,
    has_any: bool,
    topology: Topology,
    cluster_uses_terminating: bool,
    local_uses_terminating: bool,
}

impl<'a> Categorized<'a> {
    /// The endpoints that were categorised.
    pub fn endpoints(&self) -> &'a [Endpoint] {
        self.endpoints
    }
    /// Indices of the cluster set, in input order (empty when the port does not use it).
    pub fn cluster_indices(&self) -> &[u32] {
        &self.cluster
    }
    /// Indices of the local set, in input order (empty when the port does not use it).
    pub fn local_indices(&self) -> &[u32] {
        &self.local
    }
    /// Indices of every endpoint this node may send to, in input order.
    pub fn all_indices(&self) -> &[u32] {
        &self.all
    }
    /// Indices of `set`.
    pub fn indices(&self, set: EndpointSet) -> &[u32] {
        match set {
            EndpointSet::Cluster => &self.cluster,
            EndpointSet::Local => &self.local,
            EndpointSet::All => &self.all,
        }
    }
    /// The endpoints of `set`.
    pub fn iter(&self, set: EndpointSet) -> impl ExactSizeIterator<Item = &'a Endpoint> + '_ {
        let endpoints = self.endpoints;
        self.indices(set)
            .iter()
            .map(move |&i| &endpoints[i as usize])
    }
    /// The cluster set.
    pub fn cluster(&self) -> impl ExactSizeIterator<Item = &'a Endpoint> + '_ {
        self.iter(EndpointSet::Cluster)
    }
    /// The local set.
    pub fn local(&self) -> impl ExactSizeIterator<Item = &'a Endpoint> + '_ {
        self.iter(EndpointSet::Local)
    }
    /// Every endpoint this node may send to.
    pub fn all(&self) -> impl ExactSizeIterator<Item = &'a Endpoint> + '_ {
        self.iter(EndpointSet::All)
    }
    /// Whether the port uses the cluster set.
    pub fn uses_cluster(&self) -> bool {
        self.uses_cluster
    }
    /// Whether the port uses the local set.
    pub fn uses_local(&self) -> bool {
        self.uses_local
    }
    /// Whether the service has a usable endpoint anywhere in the cluster. When a set is empty
    /// but this is true, traffic is dropped (a Local policy without local endpoints); when it is
    /// false, traffic is rejected.
    pub fn has_any_endpoints(&self) -> bool {
        self.has_any
    }
    /// The topology decision for the cluster set.
    pub fn topology(&self) -> Topology {
        self.topology
    }
    /// Whether the cluster set fell back to serving-terminating endpoints.
    pub fn cluster_uses_terminating(&self) -> bool {
        self.cluster_uses_terminating
    }
    /// Whether the local set fell back to serving-terminating endpoints.
    pub fn local_uses_terminating(&self) -> bool {
        self.local_uses_terminating
    }

    /// Why endpoint `index` is not in `set`, or `None` if it is (or `index` is out of range).
    pub fn why_excluded(&self, set: EndpointSet, index: usize) -> Option<Exclusion> {
        let flags = *self.membership.get(index)?;
        let ep = &self.endpoints[index];
        match set {
            EndpointSet::Cluster if flags & IN_CLUSTER == 0 => Some(self.cluster_exclusion(ep)),
            EndpointSet::Local if flags & IN_LOCAL == 0 => Some(self.local_exclusion(ep)),
            EndpointSet::All if flags == 0 => Some(if self.uses_cluster {
                self.cluster_exclusion(ep)
            } else {
                self.local_exclusion(ep)
            }),
            _ => None,
        }
    }

    /// Every endpoint left out of `set`, with the reason, in input order.
    pub fn exclusions(&self, set: EndpointSet) -> Vec<(usize, Exclusion)> {
        (0..self.endpoints.len())
            .filter_map(|i| self.why_excluded(set, i).map(|r| (i, r)))
            .collect()
    }

    fn cluster_exclusion(&self, ep: &Endpoint) -> Exclusion {
        if !self.uses_cluster {
            return Exclusion::ClusterSetNotUsed;
        }
        if let Some(reason) = readiness_exclusion(ep, self.cluster_uses_terminating) {
            return reason;
        }
        // Ready but filtered out: only topology does that.
        match self.topology.mode {
            TopologyMode::PreferSameNode => Exclusion::HintedForOtherNodes {
                node: self.node.name().to_string(),
                hints: ep.hints_for_nodes().iter().map(|h| h.to_string()).collect(),
            },
            TopologyMode::PreferSameZone | TopologyMode::None => Exclusion::HintedForOtherZones {
                node_zone: self.node.zone().unwrap_or_default().to_string(),
                hints: ep.hints_for_zones().iter().map(|h| h.to_string()).collect(),
            },
        }
    }

    fn local_exclusion(&self, ep: &Endpoint) -> Exclusion {
        if !self.uses_local {
            return Exclusion::LocalSetNotUsed;
        }
        if !ep.is_local_to(self.node) {
            return Exclusion::NotOnThisNode {
                endpoint_node: ep.node_name().map(str::to_string),
            };
        }
        readiness_exclusion(ep, self.local_uses_terminating)
            .unwrap_or(Exclusion::TerminatingWhileReadyExist)
    }
}

/// The readiness reason an endpoint is out of a set that does (`fallback`) or does not use
/// serving-terminating endpoints; `None` when readiness is not the reason.
fn readiness_exclusion(ep: &Endpoint, fallback: bool) -> Option<Exclusion> {
    let c = ep.conditions();
    let serving_terminating = c.serving && c.terminating;
    if fallback {
        (!serving_terminating).then_some(Exclusion::NotReady {
            serving: c.serving,
            terminating: c.terminating,
        })
    } else if c.ready {
        None
    } else if serving_terminating {
        Some(Exclusion::TerminatingWhileReadyExist)
    } else {
        Some(Exclusion::NotReady {
            serving: c.serving,
            terminating: c.terminating,
        })
    }
}

/// Categorises `endpoints` of `service` for `node`. See the module documentation for the rules.
///
/// Endpoints are expected to be de-duplicated by address and port (the proxy's store does that
/// when merging EndpointSlices); sets are returned in input order.
pub fn categorize<'a>(
    service: &ServicePort,
    endpoints: &'a [Endpoint],
    node: &'a Node,
) -> Categorized<'a> {
    let uses_cluster = service.uses_cluster_endpoints();
    let uses_local = service.uses_local_endpoints();
    let n = endpoints.len();
    let mut out = Categorized {
        endpoints,
        node,
        uses_cluster,
        uses_local,
        membership: vec![0; n],
        cluster: Vec::new(),
        local: Vec::new(),
        all: Vec::new(),
        has_any: false,
        topology: Topology {
            mode: TopologyMode::None,
            reason: TopologyReason::ClusterSetNotUsed,
        },
        cluster_uses_terminating: false,
        local_uses_terminating: false,
    };
    if n == 0 {
        if uses_cluster {
            out.topology.reason = TopologyReason::NoReadyEndpoints;
        }
        return out;
    }
    out.has_any = endpoints.iter().any(|e| e.conditions().usable());

    if uses_cluster {
        out.topology = topology_from_hints(endpoints, node);
        let mode = out.topology.mode;
        let zone = node.zone().unwrap_or_default();
        let in_topology = |ep: &Endpoint| match mode {
            TopologyMode::None => true,
            TopologyMode::PreferSameZone => ep.hinted_for_zone(zone),
            TopologyMode::PreferSameNode => ep.hinted_for_node(node.name()),
        };
        out.cluster = select(endpoints, |ep| ep.is_ready() && in_topology(ep));
        if out.cluster.is_empty() {
            // No ready endpoint anywhere (topology never empties a set that has ready ones).
            out.cluster = select(endpoints, |ep| ep.is_serving() && ep.is_terminating());
            out.cluster_uses_terminating = true;
        }
        for &i in &out.cluster {
            out.membership[i as usize] |= IN_CLUSTER;
        }
    }

    if uses_local {
        let is_local = |ep: &Endpoint| ep.is_local_to(node);
        out.local = select(endpoints, |ep| is_local(ep) && ep.is_ready());
        if out.local.is_empty() {
            out.local = select(endpoints, |ep| {
                is_local(ep) && ep.is_serving() && ep.is_terminating()
            });
            out.local_uses_terminating = true;
        }
        for &i in &out.local {
            out.membership[i as usize] |= IN_LOCAL;
        }
    }

    out.all = if !uses_local {
        out.cluster.clone()
    } else if !uses_cluster {
        out.local.clone()
    } else {
        (0..n as u32)
            .filter(|&i| out.membership[i as usize] != 0)
            .collect()
    };
    out
}

fn select(endpoints: &[Endpoint], keep: impl Fn(&Endpoint) -> bool) -> Vec<u32> {
    let mut out = Vec::with_capacity(endpoints.len());
    for (i, ep) in endpoints.iter().enumerate() {
        if keep(ep) {
            // Slices are bounded far below u32::MAX by the proxy's validation.
            out.push(i as u32);
        }
    }
    out
}

/// Chooses the topology mode from the hints of the ready endpoints (kube-proxy's
/// `topologyModeFromHints`).
fn topology_from_hints(endpoints: &[Endpoint], node: &Node) -> Topology {
    let zone = node.zone();
    let mut any_ready = false;
    let mut all_node_hints = true;
    let mut node_hinted = false;
    let mut all_zone_hints = true;
    let mut any_zone_hints = false;
    let mut zone_hinted = false;
    for ep in endpoints.iter().filter(|e| e.is_ready()) {
        any_ready = true;
        if ep.hints_for_nodes().is_empty() {
            all_node_hints = false;
        } else if ep.hinted_for_node(node.name()) {
            node_hinted = true;
        }
        if ep.hints_for_zones().is_empty() {
            all_zone_hints = false;
        } else {
            any_zone_hints = true;
            if zone.is_some_and(|z| ep.hinted_for_zone(z)) {
                zone_hinted = true;
            }
        }
    }
    let (mode, reason) = if !any_ready {
        (TopologyMode::None, TopologyReason::NoReadyEndpoints)
    } else if all_node_hints && node_hinted {
        (TopologyMode::PreferSameNode, TopologyReason::NodeHintsMatch)
    } else if all_zone_hints && zone_hinted {
        (TopologyMode::PreferSameZone, TopologyReason::ZoneHintsMatch)
    } else if !any_zone_hints {
        (TopologyMode::None, TopologyReason::NoHints)
    } else if !all_zone_hints {
        (
            TopologyMode::None,
            TopologyReason::SomeEndpointLacksZoneHints,
        )
    } else if zone.is_none() {
        (TopologyMode::None, TopologyReason::NodeHasNoZone)
    } else {
        (TopologyMode::None, TopologyReason::NoEndpointHintedForZone)
    };
    Topology { mode, reason }
}
