//! Traffic classes: for one service port on this node, what happens to a new connection,
//! given how it reached the Service (the [`Destination`] kind) and where it came from (the
//! [`Source`]).
//!
//! [`classify`] answers three questions, the Kubernetes traffic policies restated as one pure
//! function that the dataplane compiler, the healthCheckNodePort responders and the
//! no-local-endpoints metrics all ask, so they cannot disagree:
//!
//! * **which endpoint set** serves it ([`EndpointSet::Cluster`] or [`EndpointSet::Local`], as
//!   [`categorize`](crate::categorize()) computes them);
//! * **whether it is masqueraded** (source NAT to the node's address), so that replies come
//!   back through this node;
//! * with [`TrafficClass::outcome`], what happens when that set is **empty**: *reject* (ICMP
//!   port unreachable) when the Service has no usable endpoint anywhere, *drop* when it has
//!   some but a Local policy leaves none for this traffic.
//!
//! # The rules
//!
//! As kube-proxy applies them (`pkg/proxy/nftables/proxier.go`, v1.33–v1.35), following the
//! Service API's definitions of `externalTrafficPolicy` and `internalTrafficPolicy` (KEP-2086):
//!
//! 1. **Cluster IP** ("internal traffic"): `internalTrafficPolicy: Local` sends it to the
//!    node-local endpoints only, `Cluster` to every endpoint (KEP-2086), from any source.
//!    It is masqueraded when `masqueradeAll` is set, or when a local-traffic detector
//!    (`detectLocalMode`) exists and says the source is not a pod (off-cluster traffic to a
//!    cluster IP, e.g. through a static route to the Service range, must come back through
//!    this node). Without a detector nothing is masqueraded (but hairpin traffic).
//! 2. **External IP, load-balancer IP, node port** ("external traffic"), with
//!    `externalTrafficPolicy: Cluster` (or a Local policy that does not take effect because
//!    the Service is not externally accessible): every endpoint, always masqueraded.
//! 3. External traffic with an effective `externalTrafficPolicy: Local`: traffic from
//!    elsewhere goes to the node-local endpoints, unmasqueraded, so the backend sees the
//!    client's address. Two sources are **short-circuited** to every endpoint instead, as if
//!    they had used the cluster IP: pods (as the detector recognises them; their traffic to an
//!    external address never needs to leave the cluster; not masqueraded) and the node itself
//!    (masqueraded, since a reply to the node's own address would not come back through
//!    DNAT otherwise). A pod the detector cannot recognise is traffic from elsewhere.
//! 4. **Empty set**: reject when the Service has no usable endpoint at all; drop when it has
//!    some, but not in the set this traffic uses (a Local policy on a node without local
//!    endpoints), so that a load balancer's health check, not the client, finds out.
//!
//! `loadBalancerSourceRanges` are decided before any of this ([`allowed_sources`]).
//!
//! ```
//! use lb_core::traffic::{self, Destination, Masquerading, Source};
//! use lb_core::{EndpointSet, Protocol, ServicePort, ServiceType, TrafficPolicy};
//!
//! let port = ServicePort::builder("shop", "web", "http", Protocol::Tcp, 80)
//!     .cluster_ips(["10.96.0.10"])
//!     .service_type(ServiceType::LoadBalancer)
//!     .node_port(30080)
//!     .load_balancer_ips(["192.0.2.10"])
//!     .external_traffic_policy(TrafficPolicy::Local)
//!     .build()?;
//! let rules = Masquerading { masquerade_all: false, detects_pods: true };
//! let outside = traffic::classify(&port, Destination::LoadBalancerIp, Source::Elsewhere, rules);
//! assert_eq!(outside.endpoints, EndpointSet::Local);
//! assert!(!outside.masquerade());
//! let node = traffic::classify(&port, Destination::LoadBalancerIp, Source::Node, rules);
//! assert_eq!(node.endpoints, EndpointSet::Cluster);
//! assert!(node.masquerade());
//! # Ok::<(), lb_core::ModelError>(())
//! ```

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::categorize::{Categorized, EndpointSet};
use crate::model::{Node, ServicePort};

/// How a connection reached the Service: the kind of address it was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Destination {
    /// One of the Service's cluster IPs (`spec.clusterIPs`): internal traffic.
    ClusterIp,
    /// One of its `spec.externalIPs`: external traffic.
    ExternalIp,
    /// One of its load-balancer ingress IPs (`status.loadBalancer.ingress[].ip`): external
    /// traffic.
    LoadBalancerIp,
    /// Its node port, on an address of this node that serves node ports: external traffic.
    NodePort,
}

impl Destination {
    /// Every kind, in declaration order.
    pub const ALL: [Destination; 4] = [
        Destination::ClusterIp,
        Destination::ExternalIp,
        Destination::LoadBalancerIp,
        Destination::NodePort,
    ];

    /// Whether `externalTrafficPolicy` governs it (everything but the cluster IP).
    pub fn is_external(self) -> bool {
        self != Destination::ClusterIp
    }
}

/// Where a connection comes from, as this node can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// A pod, as kube-proxy's local-traffic detector (`detectLocalMode`) recognises one: by
    /// the cluster's or this node's pod CIDR, or by the interface the packet arrived on.
    /// Without a detector ([`Masquerading::detects_pods`] false) no source is a pod: this is
    /// then treated as [`Source::Elsewhere`].
    Pod,
    /// The node itself (host-network processes; a local source address).
    Node,
    /// Anything else: another node, a client outside the cluster.
    Elsewhere,
}

impl Source {
    /// Every source, in declaration order.
    pub const ALL: [Source; 3] = [Source::Pod, Source::Node, Source::Elsewhere];
}

/// The node-wide settings that change a traffic class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Masquerading {
    /// kube-proxy's `masqueradeAll`: masquerade every connection to a cluster IP.
    pub masquerade_all: bool,
    /// Whether a local-traffic detector exists (`detectLocalMode` with its CIDR or interface
    /// known): pods can be told apart from other sources.
    pub detects_pods: bool,
}

/// Why a connection is served by its endpoint set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Cluster IP, `internalTrafficPolicy: Cluster`.
    InternalCluster,
    /// Cluster IP, `internalTrafficPolicy: Local`.
    InternalLocal,
    /// External traffic, `externalTrafficPolicy: Cluster` (or Local without effect).
    ExternalCluster,
    /// External traffic from elsewhere, `externalTrafficPolicy: Local`.
    ExternalLocal,
    /// External traffic from a pod, `externalTrafficPolicy: Local`: short-circuited.
    PodShortCircuit,
    /// External traffic from the node itself, `externalTrafficPolicy: Local`: short-circuited.
    NodeShortCircuit,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::InternalCluster => "internalTrafficPolicy Cluster: every usable endpoint",
            Reason::InternalLocal => "internalTrafficPolicy Local: node-local endpoints only",
            Reason::ExternalCluster => "externalTrafficPolicy Cluster: every usable endpoint",
            Reason::ExternalLocal => {
                "externalTrafficPolicy Local: node-local endpoints only, client address preserved"
            }
            Reason::PodShortCircuit => {
                "externalTrafficPolicy Local, but traffic from a pod is short-circuited to every endpoint"
            }
            Reason::NodeShortCircuit => {
                "externalTrafficPolicy Local, but traffic from the node itself is short-circuited to every endpoint"
            }
        })
    }
}

/// Why a connection is masqueraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MasqueradeReason {
    /// `masqueradeAll`, to a cluster IP.
    MasqueradeAll,
    /// To a cluster IP from a source the local-traffic detector says is not a pod.
    NotFromPod,
    /// External traffic under `externalTrafficPolicy: Cluster`.
    ExternalCluster,
    /// From the node itself to an external address of an `externalTrafficPolicy: Local`
    /// Service.
    FromNode,
}

impl fmt::Display for MasqueradeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MasqueradeReason::MasqueradeAll => "masqueradeAll",
            MasqueradeReason::NotFromPod => "traffic to a cluster IP from outside the pods",
            MasqueradeReason::ExternalCluster => {
                "externalTrafficPolicy Cluster masquerades external traffic"
            }
            MasqueradeReason::FromNode => {
                "traffic from the node itself to an eTP Local address is masqueraded"
            }
        })
    }
}

/// The class of a connection: which endpoint set serves it, and whether it is masqueraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TrafficClass {
    /// [`EndpointSet::Cluster`] or [`EndpointSet::Local`] (never `All`).
    pub endpoints: EndpointSet,
    /// Why that set.
    pub reason: Reason,
    /// Why it is masqueraded; `None`: it is not (the backend sees the client's address,
    /// unless it is the client itself: hairpin traffic is always masqueraded).
    pub masquerade: Option<MasqueradeReason>,
}

/// What happens to a new connection of a class, given the endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// DNAT to one endpoint of the class's set (not empty).
    Serve(EndpointSet),
    /// Dropped: the Service has usable endpoints, none in this traffic's set.
    Drop,
    /// Rejected (ICMP port unreachable, TCP reset): the Service has no usable endpoint.
    Reject,
}

impl TrafficClass {
    /// Whether the connection is masqueraded.
    pub fn masquerade(&self) -> bool {
        self.masquerade.is_some()
    }

    /// What happens to a new connection of this class, with `c` the port's endpoints on this
    /// node (rule 4): served by the set when it has an endpoint, else dropped or rejected.
    pub fn outcome(&self, c: &Categorized<'_>) -> Outcome {
        if c.indices(self.endpoints).is_empty() {
            when_empty(c.has_any_endpoints())
        } else {
            Outcome::Serve(self.endpoints)
        }
    }
}

/// What happens to a connection whose endpoint set is empty (rule 4): [`Outcome::Drop`] when
/// the Service has usable endpoints elsewhere (`has_any_endpoints`, see
/// [`Categorized::has_any_endpoints`]), [`Outcome::Reject`] when it has none.
pub fn when_empty(has_any_endpoints: bool) -> Outcome {
    if has_any_endpoints {
        Outcome::Drop
    } else {
        Outcome::Reject
    }
}

/// The traffic class of a new connection to `port` through `destination` from `source` on
/// this node (rules 1–3 of the [module](self)).
pub fn classify(
    port: &ServicePort,
    destination: Destination,
    source: Source,
    rules: Masquerading,
) -> TrafficClass {
    // A pod the node cannot recognise is, to the rules, traffic from elsewhere.
    let source = match source {
        Source::Pod if !rules.detects_pods => Source::Elsewhere,
        s => s,
    };
    if !destination.is_external() {
        let (endpoints, reason) = if port.internal_policy_local() {
            (EndpointSet::Local, Reason::InternalLocal)
        } else {
            (EndpointSet::Cluster, Reason::InternalCluster)
        };
        let masquerade = if rules.masquerade_all {
            Some(MasqueradeReason::MasqueradeAll)
        } else if rules.detects_pods && source != Source::Pod {
            Some(MasqueradeReason::NotFromPod)
        } else {
            None
        };
        return TrafficClass {
            endpoints,
            reason,
            masquerade,
        };
    }
    if !port.external_policy_local() {
        return TrafficClass {
            endpoints: EndpointSet::Cluster,
            reason: Reason::ExternalCluster,
            masquerade: Some(MasqueradeReason::ExternalCluster),
        };
    }
    match source {
        Source::Pod => TrafficClass {
            endpoints: EndpointSet::Cluster,
            reason: Reason::PodShortCircuit,
            masquerade: None,
        },
        Source::Node => TrafficClass {
            endpoints: EndpointSet::Cluster,
            reason: Reason::NodeShortCircuit,
            masquerade: Some(MasqueradeReason::FromNode),
        },
        Source::Elsewhere => TrafficClass {
            endpoints: EndpointSet::Local,
            reason: Reason::ExternalLocal,
            masquerade: None,
        },
    }
}

/// The sources `loadBalancerSourceRanges` let through to `load_balancer_ip`, one of `port`'s
/// load-balancer IPs, on `node`: the port's ranges of that address's family, plus the address
/// itself when one of them holds an address of the node (kube-proxy's `allowFromNode`: a node
/// reaching a load-balancer IP assigned to itself connects from that IP). `None` when nothing
/// is filtered: not a load-balancer IP of the port, or no range of its family. Other
/// destinations (cluster IP, external IPs, node ports) are never filtered.
pub fn allowed_sources(
    port: &ServicePort,
    load_balancer_ip: IpAddr,
    node: &Node,
) -> Option<Vec<IpNet>> {
    if !port.load_balancer_ips().contains(&load_balancer_ip) {
        return None;
    }
    let ranges: Vec<IpNet> = port
        .load_balancer_source_ranges()
        .iter()
        .filter(|n| n.addr().is_ipv4() == load_balancer_ip.is_ipv4())
        .copied()
        .collect();
    if ranges.is_empty() {
        return None;
    }
    let mut allowed = ranges.clone();
    if ranges
        .iter()
        .any(|r| node.addresses().iter().any(|a| r.contains(a)))
    {
        allowed.push(IpNet::from(load_balancer_ip));
    }
    Some(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServiceType, TrafficPolicy};

    fn lb(etp: TrafficPolicy, itp: TrafficPolicy) -> ServicePort {
        ServicePort::builder("ns", "svc", "p80", Protocol::Tcp, 80)
            .cluster_ips(["172.30.0.41"])
            .service_type(ServiceType::LoadBalancer)
            .node_port(3001)
            .load_balancer_ips(["1.2.3.4"])
            .external_traffic_policy(etp)
            .internal_traffic_policy(itp)
            .build()
            .expect("valid service")
    }

    const DETECT: Masquerading = Masquerading {
        masquerade_all: false,
        detects_pods: true,
    };

    #[test]
    fn a_pod_and_the_node_are_short_circuited_to_the_same_set_for_every_port_and_destination() {
        for etp in [TrafficPolicy::Cluster, TrafficPolicy::Local] {
            for itp in [TrafficPolicy::Cluster, TrafficPolicy::Local] {
                let port = lb(etp, itp);
                for d in Destination::ALL {
                    let pod = classify(&port, d, Source::Pod, DETECT);
                    let node = classify(&port, d, Source::Node, DETECT);
                    assert_eq!(pod.endpoints, node.endpoints, "{etp:?} {itp:?} {d:?}");
                }
            }
        }
    }

    #[test]
    fn etp_local_without_effect_on_a_cluster_ip_service_is_cluster() {
        // A ClusterIP Service without external IPs is not externally accessible: its eTP
        // Local does not take effect.
        let port = ServicePort::builder("ns", "svc", "p80", Protocol::Tcp, 80)
            .cluster_ips(["172.30.0.41"])
            .external_traffic_policy(TrafficPolicy::Local)
            .build()
            .expect("valid service");
        let c = classify(&port, Destination::NodePort, Source::Elsewhere, DETECT);
        assert_eq!(c.endpoints, EndpointSet::Cluster);
        assert_eq!(c.reason, Reason::ExternalCluster);
    }

    #[test]
    fn an_empty_set_is_dropped_when_the_service_has_endpoints_and_rejected_otherwise() {
        assert_eq!(when_empty(true), Outcome::Drop);
        assert_eq!(when_empty(false), Outcome::Reject);
    }
}
