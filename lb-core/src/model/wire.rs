//! The serialised form of the model (feature `serde`), in the Kubernetes API's spelling.
//!
//! Validated types never deserialise around their builders: each goes through a plain mirror
//! struct and the same `build()` as code does, so a bad value in JSON or YAML is rejected with
//! the [`ModelError`] naming the object and field, exactly as from code.

use serde::{Deserialize, Serialize};

use super::{
    Conditions, Endpoint, IpFamily, ModelError, Node, Protocol, ServicePort, ServiceType,
    SessionAffinity, TrafficDistribution, TrafficPolicy,
};

/// `sessionAffinity` with its timeout: `{"type": "None"}` or
/// `{"type": "ClientIP", "timeoutSeconds": 10800}`.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub(crate) enum AffinityRepr {
    None,
    #[serde(rename = "ClientIP", rename_all = "camelCase")]
    ClientIp {
        #[serde(default)]
        timeout_seconds: Option<i64>,
    },
}

impl From<SessionAffinity> for AffinityRepr {
    fn from(a: SessionAffinity) -> Self {
        match a {
            SessionAffinity::None => AffinityRepr::None,
            SessionAffinity::ClientIp { timeout } => AffinityRepr::ClientIp {
                timeout_seconds: Some(i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX)),
            },
        }
    }
}

impl TryFrom<AffinityRepr> for SessionAffinity {
    type Error = String;
    fn try_from(r: AffinityRepr) -> Result<Self, String> {
        match r {
            AffinityRepr::None => Ok(SessionAffinity::None),
            AffinityRepr::ClientIp { timeout_seconds } => {
                SessionAffinity::client_ip(timeout_seconds)
                    .map_err(|reason| format!("sessionAffinity: field timeoutSeconds: {reason}"))
            }
        }
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A [`ServicePort`] as plain values.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ServicePortRepr {
    namespace: String,
    name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    port_name: String,
    #[serde(default = "tcp")]
    protocol: Protocol,
    port: i64,
    #[serde(default, skip_serializing_if = "is_default")]
    node_port: i64,
    #[serde(rename = "clusterIPs", default)]
    cluster_ips: Vec<String>,
    #[serde(rename = "externalIPs", default, skip_serializing_if = "Vec::is_empty")]
    external_ips: Vec<String>,
    #[serde(
        rename = "loadBalancerIPs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    load_balancer_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    load_balancer_source_ranges: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ip_families: Vec<IpFamily>,
    #[serde(rename = "type", default)]
    service_type: ServiceType,
    #[serde(default)]
    external_traffic_policy: TrafficPolicy,
    #[serde(default)]
    internal_traffic_policy: TrafficPolicy,
    #[serde(default, skip_serializing_if = "is_default")]
    health_check_node_port: i64,
    #[serde(default)]
    session_affinity: SessionAffinity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    traffic_distribution: Option<TrafficDistribution>,
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

impl From<ServicePort> for ServicePortRepr {
    fn from(p: ServicePort) -> Self {
        let texts = |ips: &[std::net::IpAddr]| ips.iter().map(ToString::to_string).collect();
        ServicePortRepr {
            namespace: p.name.namespace.to_string(),
            name: p.name.name.to_string(),
            port_name: p.name.port_name.to_string(),
            protocol: p.name.protocol,
            port: i64::from(p.port()),
            node_port: p.node_port().map_or(0, i64::from),
            cluster_ips: texts(&p.cluster_ips),
            external_ips: texts(&p.external_ips),
            load_balancer_ips: texts(&p.load_balancer_ips),
            load_balancer_source_ranges: p
                .load_balancer_source_ranges
                .iter()
                .map(ToString::to_string)
                .collect(),
            ip_families: p.ip_families.clone(),
            service_type: p.service_type,
            external_traffic_policy: p.external_traffic_policy,
            internal_traffic_policy: p.internal_traffic_policy,
            health_check_node_port: p.health_check_node_port().map_or(0, i64::from),
            session_affinity: p.session_affinity,
            traffic_distribution: p.traffic_distribution,
        }
    }
}

impl TryFrom<ServicePortRepr> for ServicePort {
    type Error = ModelError;
    fn try_from(r: ServicePortRepr) -> Result<Self, ModelError> {
        ServicePort::builder(&r.namespace, &r.name, &r.port_name, r.protocol, r.port)
            .node_port(r.node_port)
            .cluster_ips(r.cluster_ips)
            .external_ips(r.external_ips)
            .load_balancer_ips(r.load_balancer_ips)
            .load_balancer_source_ranges(r.load_balancer_source_ranges)
            .ip_families(r.ip_families.iter().map(ToString::to_string))
            .service_type(r.service_type)
            .external_traffic_policy(r.external_traffic_policy)
            .internal_traffic_policy(r.internal_traffic_policy)
            .health_check_node_port(r.health_check_node_port)
            .session_affinity(r.session_affinity)
            .traffic_distribution(r.traffic_distribution)
            .build()
    }
}

/// An [`Endpoint`] as plain values.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct EndpointRepr {
    address: String,
    port: i64,
    #[serde(default = "ready")]
    conditions: Conditions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    zone: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    hints_for_zones: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    hints_for_nodes: Vec<String>,
}

fn ready() -> Conditions {
    Conditions::READY
}

impl From<Endpoint> for EndpointRepr {
    fn from(e: Endpoint) -> Self {
        let texts = |v: &[Box<str>]| v.iter().map(ToString::to_string).collect();
        EndpointRepr {
            address: e.ip().to_string(),
            port: i64::from(e.port()),
            conditions: e.conditions,
            node_name: e.node_name.as_deref().map(str::to_string),
            zone: e.zone.as_deref().map(str::to_string),
            hints_for_zones: texts(e.hints_for_zones()),
            hints_for_nodes: texts(e.hints_for_nodes()),
        }
    }
}

impl TryFrom<EndpointRepr> for Endpoint {
    type Error = ModelError;
    fn try_from(r: EndpointRepr) -> Result<Self, ModelError> {
        let mut b = Endpoint::builder(r.address, r.port)
            .conditions(r.conditions)
            .hints_for_zones(r.hints_for_zones)
            .hints_for_nodes(r.hints_for_nodes);
        if let Some(n) = &r.node_name {
            b = b.node_name(n);
        }
        if let Some(z) = &r.zone {
            b = b.zone(z);
        }
        b.build()
    }
}

/// A [`Node`] as plain values.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NodeRepr {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    zone: Option<String>,
}

impl From<Node> for NodeRepr {
    fn from(n: Node) -> Self {
        NodeRepr {
            name: n.name.to_string(),
            zone: n.zone.as_deref().map(str::to_string),
        }
    }
}

impl TryFrom<NodeRepr> for Node {
    type Error = ModelError;
    fn try_from(r: NodeRepr) -> Result<Self, ModelError> {
        Node::new(&r.name, r.zone.as_deref())
    }
}
