//! Conversion at the edge: Kubernetes API objects (`k8s-openapi` types) in, validated `lb-core`
//! model values out, or an error naming the object and the field.
//!
//! Filtering follows kube-proxy (`ShouldSkipService` and the informers' label selector):
//! objects labelled `service.kubernetes.io/headless` are skipped, and so are objects labelled
//! `service.kubernetes.io/service-proxy-name` unless the label equals our configured proxy
//! name; ExternalName Services and Services without a cluster IP are skipped. A skip is not an
//! error: it is reported as [`Converted::Skipped`] with the reason.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU16;

use k8s_openapi::api::core::v1::{Node as K8sNode, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_core::{
    Conditions, Endpoint, IpFamily, ModelError, Node, Protocol, ServicePort, ServiceType,
    TrafficPolicy,
};

/// Label that marks the objects of headless Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label that hands an object to an alternative service proxy.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label linking an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The node label carrying the zone.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Upper bound on endpoints accepted from one EndpointSlice. The API allows 1000; anything
/// larger is malformed and rejected so one object cannot balloon the dataplane.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 1000;

/// An object or a field of it was invalid: `Service shop/web: field spec.ports[0].port: …`,
/// or `Node node-a: field …` for a cluster-scoped object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {}{name}: field {field}: {reason}", namespaced(namespace))]
pub struct ConvertError {
    /// `Service`, `EndpointSlice` or `Node`.
    pub kind: &'static str,
    /// Namespace (empty for Nodes).
    pub namespace: String,
    /// Object name.
    pub name: String,
    /// Field path, as in the API (`spec.ports[0].port`).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

/// `namespace/`, or nothing for a cluster-scoped object.
fn namespaced(namespace: &str) -> String {
    if namespace.is_empty() {
        String::new()
    } else {
        format!("{namespace}/")
    }
}

/// The outcome of converting an object that was not invalid.
#[derive(Debug, Clone, PartialEq)]
pub enum Converted<T> {
    /// The object is for us.
    Accepted(T),
    /// The object is valid but not proxied (headless, other proxy, ExternalName, …).
    Skipped(String),
}

/// Settings that decide which objects are ours.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Our `serviceProxyName`: when set, only objects labelled with it are handled; when empty,
    /// objects carrying the label at all are skipped.
    pub service_proxy_name: Option<String>,
}

impl Filter {
    /// Why objects with these labels are not ours, if they are not.
    pub fn skip_reason(&self, labels: Option<&BTreeMap<String, String>>) -> Option<String> {
        let get = |k: &str| labels.and_then(|l| l.get(k));
        if get(LABEL_HEADLESS).is_some() {
            return Some(format!("labelled {LABEL_HEADLESS}"));
        }
        match (get(LABEL_SERVICE_PROXY_NAME), &self.service_proxy_name) {
            (None, None) => None,
            (Some(v), Some(ours)) if v == ours => None,
            (Some(v), _) => Some(format!("{LABEL_SERVICE_PROXY_NAME}={v} is another proxy's")),
            (None, Some(ours)) => Some(format!("not labelled {LABEL_SERVICE_PROXY_NAME}={ours}")),
        }
    }
}

/// Identity of a Service: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Converts a Service into its ports.
pub fn service(
    svc: &Service,
    filter: &Filter,
) -> Result<Converted<Vec<ServicePort>>, ConvertError> {
    let meta = &svc.metadata;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let name = meta.name.clone().unwrap_or_default();
    let err = |field: String, reason: String| ConvertError {
        kind: "Service",
        namespace: namespace.clone(),
        name: name.clone(),
        field,
        reason,
    };
    if name.is_empty() {
        return Err(err("metadata.name".into(), "must not be empty".into()));
    }
    if let Some(reason) = filter.skip_reason(meta.labels.as_ref()) {
        return Ok(Converted::Skipped(reason));
    }
    let Some(spec) = &svc.spec else {
        return Err(err("spec".into(), "missing".into()));
    };
    let type_str = spec.type_.as_deref().unwrap_or("ClusterIP");
    if type_str == "ExternalName" {
        return Ok(Converted::Skipped(
            "type ExternalName is not proxied".into(),
        ));
    }
    let service_type: ServiceType = type_str
        .parse()
        .map_err(|r: String| err("spec.type".into(), r))?;
    let mut cluster_ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.cluster_ip.clone());
    }
    if cluster_ips.iter().all(|ip| ip.is_empty() || ip == "None") {
        return Ok(Converted::Skipped("no cluster IP (headless)".into()));
    }
    let policy = |field: &str, v: &Option<String>| -> Result<TrafficPolicy, ConvertError> {
        v.as_deref()
            .unwrap_or("")
            .parse()
            .map_err(|r: String| err(field.into(), r))
    };
    let etp = policy("spec.externalTrafficPolicy", &spec.external_traffic_policy)?;
    let itp = policy("spec.internalTrafficPolicy", &spec.internal_traffic_policy)?;
    let lb_ips: Vec<String> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ingress| {
            ingress
                .iter()
                // `ipMode: Proxy` ingress is served by the load balancer itself (KEP-1860).
                .filter(|i| i.ip_mode.as_deref().is_none_or(|m| m == "VIP"))
                .filter_map(|i| i.ip.clone())
                .filter(|ip| !ip.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let affinity_timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .map(i64::from);
    let client_ip_affinity = match spec.session_affinity.as_deref() {
        None | Some("") | Some("None") => false,
        Some("ClientIP") => true,
        Some(other) => {
            return Err(err(
                "spec.sessionAffinity".into(),
                format!("unknown value {other:?}"),
            ));
        }
    };
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return Err(err(
            "spec.ports".into(),
            "a Service needs at least one port".into(),
        ));
    }
    let mut out = Vec::with_capacity(ports.len());
    for (i, p) in ports.iter().enumerate() {
        let protocol: Protocol = p
            .protocol
            .as_deref()
            .unwrap_or("TCP")
            .parse()
            .map_err(|r: String| err(format!("spec.ports[{i}].protocol"), r))?;
        let mut b = ServicePort::builder(
            &namespace,
            &name,
            p.name.as_deref().unwrap_or(""),
            protocol,
            i64::from(p.port),
        )
        .node_port(p.node_port.map_or(0, i64::from))
        .cluster_ips(&cluster_ips)
        .ip_families(spec.ip_families.clone().unwrap_or_default())
        .external_ips(spec.external_ips.clone().unwrap_or_default())
        .load_balancer_ips(&lb_ips)
        .load_balancer_source_ranges(spec.load_balancer_source_ranges.clone().unwrap_or_default())
        .service_type(service_type)
        .external_traffic_policy(etp)
        .internal_traffic_policy(itp)
        .traffic_distribution(
            spec.traffic_distribution
                .as_deref()
                .map(|d| match d.parse() {
                    Ok(d) => d,
                    Err(never) => match never {},
                }),
        );
        if service_type == ServiceType::LoadBalancer && etp == TrafficPolicy::Local {
            b = b.health_check_node_port(spec.health_check_node_port.map_or(0, i64::from));
        }
        if client_ip_affinity {
            b = b.client_ip_affinity(affinity_timeout);
        }
        let port = b.build().map_err(|e| err(service_field(i, &e), e.reason))?;
        out.push(port);
    }
    Ok(Converted::Accepted(out))
}

fn service_field(i: usize, e: &ModelError) -> String {
    match e.field.as_str() {
        "port" | "nodePort" | "protocol" | "name" => format!("spec.ports[{i}].{}", e.field),
        f if f.starts_with("status.") => f.to_string(),
        f => format!("spec.{f}"),
    }
}

/// One port of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    /// Port name (matches the Service port's name).
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Port number on the endpoints.
    pub port: NonZeroU16,
}

/// A converted EndpointSlice: which Service it belongs to, its family, ports and endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    /// The Service, from the `kubernetes.io/service-name` label.
    pub service: ServiceKey,
    /// `addressType`.
    pub family: IpFamily,
    /// `ports`.
    pub ports: Vec<SlicePort>,
    /// The validated endpoints. Their port is a placeholder: an EndpointSlice lists ports
    /// separately, and [`Slice::endpoints_for`] gives the endpoints of one port.
    pub endpoints: Vec<Endpoint>,
}

impl Slice {
    /// The endpoints serving port `port` of this slice.
    pub fn endpoints_for(&self, port: NonZeroU16) -> impl Iterator<Item = Endpoint> + '_ {
        self.endpoints.iter().map(move |e| e.with_port(port))
    }
}

/// Converts an EndpointSlice. Invalid endpoints are dropped and reported in the returned list
/// of errors; the rest of the slice is still used.
pub fn endpoint_slice(
    slice: &EndpointSlice,
    filter: &Filter,
) -> Result<(Converted<Slice>, Vec<ConvertError>), ConvertError> {
    let meta = &slice.metadata;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let name = meta.name.clone().unwrap_or_default();
    let err = |field: String, reason: String| ConvertError {
        kind: "EndpointSlice",
        namespace: namespace.clone(),
        name: name.clone(),
        field,
        reason,
    };
    if let Some(reason) = filter.skip_reason(meta.labels.as_ref()) {
        return Ok((Converted::Skipped(reason), vec![]));
    }
    let Some(service) = meta.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) else {
        return Ok((
            Converted::Skipped(format!("no {LABEL_SERVICE_NAME} label")),
            vec![],
        ));
    };
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        "FQDN" => return Ok((Converted::Skipped("addressType FQDN".into()), vec![])),
        other => {
            return Err(err(
                "addressType".into(),
                format!("unknown value {other:?}"),
            ));
        }
    };
    let mut ports = Vec::new();
    for (i, p) in slice
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        // kube-proxy ignores ports without a number or protocol.
        let (Some(port), Some(protocol)) = (p.port, p.protocol.as_deref()) else {
            continue;
        };
        let protocol: Protocol = protocol
            .parse()
            .map_err(|r: String| err(format!("ports[{i}].protocol"), r))?;
        let port = u16::try_from(port)
            .ok()
            .and_then(NonZeroU16::new)
            .ok_or_else(|| {
                err(
                    format!("ports[{i}].port"),
                    format!("{port} is not a valid port"),
                )
            })?;
        ports.push(SlicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol,
            port,
        });
    }
    let raw = slice.endpoints.as_deref().unwrap_or_default();
    if raw.len() > MAX_ENDPOINTS_PER_SLICE {
        return Err(err(
            "endpoints".into(),
            format!(
                "{} endpoints exceed the limit of {MAX_ENDPOINTS_PER_SLICE}",
                raw.len()
            ),
        ));
    }
    let mut endpoints = Vec::with_capacity(raw.len());
    let mut errors = Vec::new();
    for (i, e) in raw.iter().enumerate() {
        let Some(address) = e.addresses.first() else {
            errors.push(err(format!("endpoints[{i}].addresses"), "empty".into()));
            continue;
        };
        let c = e.conditions.as_ref();
        let hints = e.hints.as_ref();
        let mut b = Endpoint::builder(address, 1)
            .conditions(Conditions::from_api(
                c.and_then(|c| c.ready),
                c.and_then(|c| c.serving),
                c.and_then(|c| c.terminating),
            ))
            .hints_for_zones(
                hints
                    .and_then(|h| h.for_zones.as_deref())
                    .unwrap_or_default()
                    .iter()
                    .map(|z| &z.name),
            )
            .hints_for_nodes(
                hints
                    .and_then(|h| h.for_nodes.as_deref())
                    .unwrap_or_default()
                    .iter()
                    .map(|n| &n.name),
            );
        if let Some(n) = &e.node_name {
            b = b.node_name(n);
        }
        if let Some(z) = &e.zone {
            b = b.zone(z);
        }
        match b.build() {
            Ok(built) if IpFamily::of(&built.ip()) != family => errors.push(err(
                format!("endpoints[{i}].addresses[0]"),
                format!("{address} is not an {family} address (addressType {family})"),
            )),
            Ok(built) => endpoints.push(built),
            Err(e) => errors.push(err(format!("endpoints[{i}].{}", e.field), e.reason)),
        }
    }
    let slice = Slice {
        service: ServiceKey {
            namespace: namespace.clone(),
            name: service.clone(),
        },
        family,
        ports,
        endpoints,
    };
    Ok((Converted::Accepted(slice), errors))
}

/// Converts this node's Node object: its name and zone label.
pub fn node(n: &K8sNode) -> Result<Node, ConvertError> {
    let name = n.metadata.name.clone().unwrap_or_default();
    let zone = n
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_ZONE))
        .map(String::as_str);
    // The primary address per family, as kube-proxy's node IPs: InternalIP first, then
    // ExternalIP. Unparsable addresses are ignored.
    let listed = n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    let addresses = ["InternalIP", "ExternalIP"].into_iter().flat_map(|kind| {
        listed
            .iter()
            .filter(move |a| a.type_ == kind)
            .filter_map(|a| a.address.parse::<std::net::IpAddr>().ok())
    });
    let error = |field: String, reason: String| ConvertError {
        kind: "Node",
        namespace: String::new(),
        name: name.clone(),
        field,
        reason,
    };
    // `spec.podCIDRs` (the older `spec.podCIDR` when it is absent): kube-proxy's NodeCIDR
    // local-traffic detection. The API server validates them, so a bad one is a broken manifest.
    let spec = n.spec.as_ref();
    let (pod_cidrs, field): (Vec<&String>, &str) = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(list) if !list.is_empty() => (list.iter().collect(), "spec.podCIDRs"),
        _ => (
            spec.and_then(|s| s.pod_cidr.as_ref()).into_iter().collect(),
            "spec.podCIDR",
        ),
    };
    let pod_cidrs = pod_cidrs
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            c.parse::<ipnet::IpNet>().map_err(|_| {
                let field = if field == "spec.podCIDRs" {
                    format!("{field}[{i}]")
                } else {
                    field.to_string()
                };
                error(field, format!("{c:?} is not a CIDR"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Node::new(&name, zone)
        .map(|n| n.with_addresses(addresses).with_pod_cidrs(pod_cidrs))
        .map_err(|e| error(e.field, e.reason))
}

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// This node as converted from its Node object, with whether it may receive load-balancer
/// traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeState {
    /// The model value ([`node`]).
    pub node: Node,
    /// KEP-3836: a node being deleted (`metadata.deletionTimestamp` set), or tainted
    /// `ToBeDeletedByClusterAutoscaler`, is not eligible: kube-proxy's `/healthz` then answers
    /// 503 so load balancers drain it before it goes.
    pub eligible: bool,
}

/// Converts a Node ([`node`]) and decides its load-balancer eligibility (KEP-3836).
pub fn node_state(n: &K8sNode) -> Result<NodeState, ConvertError> {
    let eligible = n.metadata.deletion_timestamp.is_none()
        && !n
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TAINT_TO_BE_DELETED));
    Ok(NodeState {
        node: node(n)?,
        eligible,
    })
}

/// The ranges of a `networking.k8s.io/v1` ServiceCIDR (`spec.cidrs`, at most one per family),
/// which cluster IPs are allocated from. kube-proxy drops traffic to an address inside them
/// that no Service holds.
pub fn service_cidr(
    c: &k8s_openapi::api::networking::v1::ServiceCIDR,
) -> Result<Vec<ipnet::IpNet>, ConvertError> {
    let cidrs = c
        .spec
        .as_ref()
        .and_then(|s| s.cidrs.as_deref())
        .unwrap_or_default();
    cidrs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<ipnet::IpNet>()
                .map(|n| n.trunc())
                .map_err(|_| ConvertError {
                    kind: "ServiceCIDR",
                    namespace: String::new(),
                    name: c.metadata.name.clone().unwrap_or_default(),
                    field: format!("spec.cidrs[{i}]"),
                    reason: format!("{s:?} is not a CIDR"),
                })
        })
        .collect()
}

#[cfg(test)]
mod node_tests {
    use super::*;

    fn k8s_node(json: &str) -> K8sNode {
        serde_json::from_str(json).expect("a Node in JSON")
    }

    #[test]
    fn a_node_carries_its_pod_cidrs_from_pod_cidrs_or_else_pod_cidr() {
        let n = node(&k8s_node(
            r#"{"metadata":{"name":"n1"},"spec":{"podCIDR":"10.1.0.0/24","podCIDRs":["10.244.1.0/24","fd00:244:1::/64"]}}"#,
        ))
        .expect("valid");
        let got: Vec<String> = n.pod_cidrs().iter().map(|c| c.to_string()).collect();
        assert_eq!(got, ["10.244.1.0/24", "fd00:244:1::/64"]);
        let n = node(&k8s_node(
            r#"{"metadata":{"name":"n1"},"spec":{"podCIDR":"10.1.0.0/24"}}"#,
        ))
        .expect("valid");
        assert_eq!(
            n.pod_cidrs(),
            ["10.1.0.0/24".parse::<ipnet::IpNet>().expect("CIDR")]
        );
        let n = node(&k8s_node(r#"{"metadata":{"name":"n1"}}"#)).expect("valid");
        assert!(n.pod_cidrs().is_empty());
    }

    #[test]
    fn a_node_being_deleted_or_marked_by_the_autoscaler_is_not_eligible_for_load_balancer_traffic()
    {
        let plain = k8s_node(r#"{"metadata":{"name":"n1"}}"#);
        assert!(node_state(&plain).expect("valid").eligible);
        let deleting =
            k8s_node(r#"{"metadata":{"name":"n1","deletionTimestamp":"2026-01-01T00:00:00Z"}}"#);
        assert!(!node_state(&deleting).expect("valid").eligible);
        let tainted = k8s_node(
            r#"{"metadata":{"name":"n1"},"spec":{"taints":[{"key":"ToBeDeletedByClusterAutoscaler","effect":"NoSchedule"}]}}"#,
        );
        let state = node_state(&tainted).expect("valid");
        assert!(!state.eligible);
        assert_eq!(state.node.name(), "n1");
        let other_taint = k8s_node(
            r#"{"metadata":{"name":"n1"},"spec":{"taints":[{"key":"node.kubernetes.io/unschedulable","effect":"NoSchedule"}]}}"#,
        );
        assert!(node_state(&other_taint).expect("valid").eligible);
    }

    #[test]
    fn a_node_with_a_bad_pod_cidr_is_an_error_naming_the_field() {
        let e = node(&k8s_node(
            r#"{"metadata":{"name":"n1"},"spec":{"podCIDRs":["10.244.1.0/24","nonsense"]}}"#,
        ))
        .expect_err("invalid");
        assert_eq!((e.kind, e.name.as_str()), ("Node", "n1"));
        assert_eq!(e.field, "spec.podCIDRs[1]");
    }
}
