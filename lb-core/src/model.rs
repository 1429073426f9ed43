//! The validated model: service ports, endpoints and the local node.
//!
//! Values are built from plain Rust values (strings, integers, booleans) through builders that
//! validate every field once; after `build()` succeeds the value cannot be invalid, so the rest of
//! the library never re-checks. A rejected value yields a [`ModelError`] naming the object and
//! the field in the Kubernetes API's own spelling (`port`, `clusterIPs[1]`,
//! `sessionAffinityConfig.clientIP.timeoutSeconds`, …), so an operator can find it in the YAML.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU16;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

#[cfg(feature = "serde")]
mod wire;

/// A value was rejected while building a model object.
///
/// `object` names the object (`service ns/name port http`, `endpoint 10.0.0.1:80`, `node n1`),
/// `field` the offending field, `reason` what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: field {field}: {reason}")]
pub struct ModelError {
    /// The object the value belongs to.
    pub object: String,
    /// The field, spelled as in the Kubernetes API.
    pub field: String,
    /// What is wrong with the value.
    pub reason: String,
}

/// An object's name for an error, formatted only when one is made: a kind, then a value
/// (`service port ns/name:port/TCP`, `endpoint 10.0.0.1:80`).
#[derive(Clone, Copy)]
struct Named<'a>(&'static str, &'a dyn fmt::Display);

impl fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.0, self.1)
    }
}

/// An endpoint's address as given to its builder, valid or not, and its port.
struct EndpointAt<'a>(&'a Result<IpAddr, String>, i64);

impl fmt::Display for EndpointAt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Ok(ip) => write!(f, "{ip}:{}", self.1),
            Err(text) => write!(f, "{text}:{}", self.1),
        }
    }
}

impl ModelError {
    fn new(object: impl fmt::Display, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            object: object.to_string(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// An IP address as the builders accept it: already parsed ([`IpAddr`], [`Ipv4Addr`],
/// [`Ipv6Addr`]) or as text (`&str`, `String`, as the Kubernetes API spells it). Text is
/// parsed, and every address checked, by `build`, which names the field of a bad one.
pub trait IpInput {
    /// The address, or the text that is not one (reported by `build`).
    fn into_ip(self) -> Result<IpAddr, String>;
}

impl IpInput for IpAddr {
    fn into_ip(self) -> Result<IpAddr, String> {
        Ok(self)
    }
}
impl IpInput for &IpAddr {
    fn into_ip(self) -> Result<IpAddr, String> {
        Ok(*self)
    }
}
impl IpInput for Ipv4Addr {
    fn into_ip(self) -> Result<IpAddr, String> {
        Ok(IpAddr::V4(self))
    }
}
impl IpInput for Ipv6Addr {
    fn into_ip(self) -> Result<IpAddr, String> {
        Ok(IpAddr::V6(self))
    }
}
impl IpInput for &str {
    fn into_ip(self) -> Result<IpAddr, String> {
        self.parse().map_err(|_| self.to_string())
    }
}
impl IpInput for &&str {
    fn into_ip(self) -> Result<IpAddr, String> {
        (*self).into_ip()
    }
}
impl IpInput for String {
    fn into_ip(self) -> Result<IpAddr, String> {
        self.as_str().into_ip()
    }
}
impl IpInput for &String {
    fn into_ip(self) -> Result<IpAddr, String> {
        self.as_str().into_ip()
    }
}

fn ips<I: IntoIterator<Item = A>, A: IpInput>(items: I) -> Vec<Result<IpAddr, String>> {
    items.into_iter().map(IpInput::into_ip).collect()
}

/// Transport protocol of a service port (Kubernetes `protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Protocol {
    /// `TCP` (the Kubernetes default).
    #[cfg_attr(feature = "serde", serde(rename = "TCP"))]
    Tcp,
    /// `UDP`.
    #[cfg_attr(feature = "serde", serde(rename = "UDP"))]
    Udp,
    /// `SCTP`.
    #[cfg_attr(feature = "serde", serde(rename = "SCTP"))]
    Sctp,
}

impl Protocol {
    /// The spelling nftables and kube-proxy chain names use: `tcp`, `udp`, `sctp`.
    pub fn as_lower_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
    /// The Kubernetes API spelling: `TCP`, `UDP`, `SCTP`.
    pub fn as_api_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_api_str())
    }
}

impl FromStr for Protocol {
    type Err = String;
    /// Parses the Kubernetes spelling (`TCP`, `UDP`, `SCTP`); case-insensitive for embedders.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            _ => Err(format!(
                "unsupported protocol {s:?} (want TCP, UDP or SCTP)"
            )),
        }
    }
}

/// IP family of an address or service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum IpFamily {
    /// IPv4.
    #[cfg_attr(feature = "serde", serde(rename = "IPv4"))]
    V4,
    /// IPv6.
    #[cfg_attr(feature = "serde", serde(rename = "IPv6"))]
    V6,
}

impl IpFamily {
    /// The family of `ip`.
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

impl FromStr for IpFamily {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "IPv4" => Ok(IpFamily::V4),
            "IPv6" => Ok(IpFamily::V6),
            _ => Err(format!("unknown IP family {s:?} (want IPv4 or IPv6)")),
        }
    }
}

/// Service `type`. `ExternalName` services have no proxy behaviour and are not representable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum ServiceType {
    /// `ClusterIP` (the default).
    #[default]
    #[cfg_attr(feature = "serde", serde(rename = "ClusterIP"))]
    ClusterIp,
    /// `NodePort`.
    NodePort,
    /// `LoadBalancer`.
    LoadBalancer,
}

impl FromStr for ServiceType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" | "ClusterIP" => Ok(ServiceType::ClusterIp),
            "NodePort" => Ok(ServiceType::NodePort),
            "LoadBalancer" => Ok(ServiceType::LoadBalancer),
            "ExternalName" => Err("ExternalName services are not proxied".to_string()),
            _ => Err(format!("unknown service type {s:?}")),
        }
    }
}

/// `externalTrafficPolicy` / `internalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum TrafficPolicy {
    /// Any ready endpoint in the cluster may serve (the default).
    #[default]
    Cluster,
    /// Only endpoints on the receiving node may serve.
    Local,
}

impl FromStr for TrafficPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" | "Cluster" => Ok(TrafficPolicy::Cluster),
            "Local" => Ok(TrafficPolicy::Local),
            _ => Err(format!(
                "unknown traffic policy {s:?} (want Cluster or Local)"
            )),
        }
    }
}

/// Kubernetes' default ClientIP affinity timeout: 3 hours.
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;
/// The largest ClientIP affinity timeout the Kubernetes API accepts: 1 day.
pub const MAX_AFFINITY_TIMEOUT_SECONDS: u32 = 86_400;

/// `sessionAffinity` with its `sessionAffinityConfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(into = "wire::AffinityRepr", try_from = "wire::AffinityRepr")
)]
pub enum SessionAffinity {
    /// No affinity: every new connection picks independently.
    #[default]
    None,
    /// Connections from one client IP go to the same endpoint until `timeout` passes without a
    /// new connection from that client.
    ClientIp {
        /// In `1..=86400` seconds, validated.
        timeout: Duration,
    },
}

impl SessionAffinity {
    /// ClientIP affinity with `timeoutSeconds` (`None` means Kubernetes' default, 10800 s).
    ///
    /// Kubernetes accepts `1..=86400`; anything else is an error naming the field.
    pub fn client_ip(timeout_seconds: Option<i64>) -> Result<Self, String> {
        let secs = timeout_seconds.unwrap_or(i64::from(DEFAULT_AFFINITY_TIMEOUT_SECONDS));
        if !(1..=i64::from(MAX_AFFINITY_TIMEOUT_SECONDS)).contains(&secs) {
            return Err(format!(
                "{secs} is out of range 1..={MAX_AFFINITY_TIMEOUT_SECONDS} seconds"
            ));
        }
        Ok(SessionAffinity::ClientIp {
            timeout: Duration::from_secs(secs.unsigned_abs()),
        })
    }

    /// The affinity timeout, if any.
    pub fn timeout(&self) -> Option<Duration> {
        match self {
            SessionAffinity::None => None,
            SessionAffinity::ClientIp { timeout } => Some(*timeout),
        }
    }
}

/// `spec.trafficDistribution`.
///
/// Kube-proxy does not act on this field directly: the EndpointSlice controller turns it into
/// endpoint hints, and categorisation follows the hints. It is carried so that `explain` can show
/// it next to the hints it produced.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(into = "String", from = "String")
)]
pub enum TrafficDistribution {
    /// `PreferSameZone`, or its older alias `PreferClose`.
    PreferSameZone,
    /// `PreferSameNode`.
    PreferSameNode,
    /// A value this version does not know; kept verbatim and otherwise ignored, as the API says
    /// unknown values are.
    Other(String),
}

impl TrafficDistribution {
    /// The API spelling (`PreferSameZone`, `PreferSameNode`, or an unknown value verbatim).
    pub fn as_str(&self) -> &str {
        match self {
            TrafficDistribution::PreferSameZone => "PreferSameZone",
            TrafficDistribution::PreferSameNode => "PreferSameNode",
            TrafficDistribution::Other(s) => s,
        }
    }
}

impl From<String> for TrafficDistribution {
    fn from(s: String) -> Self {
        match s.parse() {
            Ok(d) => d,
            Err(never) => match never {},
        }
    }
}

impl From<TrafficDistribution> for String {
    fn from(d: TrafficDistribution) -> Self {
        d.as_str().to_string()
    }
}

impl FromStr for TrafficDistribution {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "PreferClose" | "PreferSameZone" => TrafficDistribution::PreferSameZone,
            "PreferSameNode" => TrafficDistribution::PreferSameNode,
            other => TrafficDistribution::Other(other.to_string()),
        })
    }
}

/// Identity of one port of one Service: `namespace/name:portName` plus the protocol, the key
/// kube-proxy uses (`ServicePortName`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "camelCase"))]
pub struct ServicePortName {
    /// Service namespace.
    pub namespace: Arc<str>,
    /// Service name.
    pub name: Arc<str>,
    /// The port's `name` (may be empty for a single-port Service).
    pub port_name: Arc<str>,
    /// The port's protocol.
    pub protocol: Protocol,
}

impl ServicePortName {
    /// A name from its parts.
    pub fn new(namespace: &str, name: &str, port_name: &str, protocol: Protocol) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            port_name: port_name.into(),
            protocol,
        }
    }
}

impl fmt::Display for ServicePortName {
    /// `ns/name:port` (kube-proxy's spelling), with `/PROTO` appended for non-TCP ports.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        if self.protocol != Protocol::Tcp {
            write!(f, "/{}", self.protocol)?;
        }
        Ok(())
    }
}

/// One validated Service port with everything that decides how traffic to it is handled.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(into = "wire::ServicePortRepr", try_from = "wire::ServicePortRepr")
)]
pub struct ServicePort {
    name: ServicePortName,
    port: NonZeroU16,
    node_port: Option<NonZeroU16>,
    cluster_ips: Vec<IpAddr>,
    external_ips: Vec<IpAddr>,
    load_balancer_ips: Vec<IpAddr>,
    load_balancer_source_ranges: Vec<IpNet>,
    ip_families: Vec<IpFamily>,
    service_type: ServiceType,
    external_traffic_policy: TrafficPolicy,
    internal_traffic_policy: TrafficPolicy,
    health_check_node_port: Option<NonZeroU16>,
    session_affinity: SessionAffinity,
    traffic_distribution: Option<TrafficDistribution>,
}

impl ServicePort {
    /// Starts a builder for port `port` (`spec.ports[].port`) of Service `namespace/name`.
    ///
    /// `port` is any integer (`u16`, or the API's `i32`); `build` checks its range.
    pub fn builder(
        namespace: &str,
        name: &str,
        port_name: &str,
        protocol: Protocol,
        port: impl Into<i64>,
    ) -> ServicePortBuilder {
        ServicePortBuilder {
            name: ServicePortName::new(namespace, name, port_name, protocol),
            port: port.into(),
            node_port: 0,
            cluster_ips: Vec::new(),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            load_balancer_source_ranges: Vec::new(),
            ip_families: Vec::new(),
            service_type: ServiceType::ClusterIp,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            health_check_node_port: 0,
            session_affinity: RawAffinity::Valid(SessionAffinity::None),
            traffic_distribution: None,
        }
    }

    /// The port's identity.
    pub fn name(&self) -> &ServicePortName {
        &self.name
    }
    /// Its protocol.
    pub fn protocol(&self) -> Protocol {
        self.name.protocol
    }
    /// `spec.ports[].port`.
    pub fn port(&self) -> u16 {
        self.port.get()
    }
    /// `spec.ports[].nodePort`, if allocated.
    pub fn node_port(&self) -> Option<u16> {
        self.node_port.map(NonZeroU16::get)
    }
    /// `spec.clusterIPs` (one per family).
    pub fn cluster_ips(&self) -> &[IpAddr] {
        &self.cluster_ips
    }
    /// `spec.externalIPs`.
    pub fn external_ips(&self) -> &[IpAddr] {
        &self.external_ips
    }
    /// `status.loadBalancer.ingress[].ip` of VIP mode (`ipMode: Proxy` ingress is left out by the
    /// caller, as kube-proxy ignores it).
    pub fn load_balancer_ips(&self) -> &[IpAddr] {
        &self.load_balancer_ips
    }
    /// `spec.loadBalancerSourceRanges`.
    pub fn load_balancer_source_ranges(&self) -> &[IpNet] {
        &self.load_balancer_source_ranges
    }
    /// `spec.ipFamilies`.
    pub fn ip_families(&self) -> &[IpFamily] {
        &self.ip_families
    }
    /// `spec.type`.
    pub fn service_type(&self) -> ServiceType {
        self.service_type
    }
    /// `spec.externalTrafficPolicy` as written (see [`ServicePort::external_policy_local`] for
    /// whether it takes effect).
    pub fn external_traffic_policy(&self) -> TrafficPolicy {
        self.external_traffic_policy
    }
    /// `spec.internalTrafficPolicy`.
    pub fn internal_traffic_policy(&self) -> TrafficPolicy {
        self.internal_traffic_policy
    }
    /// `spec.healthCheckNodePort`.
    pub fn health_check_node_port(&self) -> Option<u16> {
        self.health_check_node_port.map(NonZeroU16::get)
    }
    /// `spec.sessionAffinity` with its timeout.
    pub fn session_affinity(&self) -> SessionAffinity {
        self.session_affinity
    }
    /// `spec.trafficDistribution`.
    pub fn traffic_distribution(&self) -> Option<&TrafficDistribution> {
        self.traffic_distribution.as_ref()
    }

    /// Whether the Service accepts traffic from outside the cluster at all, by its type
    /// (Kubernetes' `ExternallyAccessible`: LoadBalancer, NodePort, or ClusterIP with
    /// externalIPs). This decides whether `externalTrafficPolicy` applies.
    pub fn service_externally_accessible(&self) -> bool {
        matches!(
            self.service_type,
            ServiceType::LoadBalancer | ServiceType::NodePort
        ) || (self.service_type == ServiceType::ClusterIp && !self.external_ips.is_empty())
    }

    /// Whether this port has an external entry point: a node port, a load-balancer IP or an
    /// external IP (kube-proxy's `ServicePort.ExternallyAccessible`).
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.load_balancer_ips.is_empty()
            || !self.external_ips.is_empty()
    }

    /// `externalTrafficPolicy: Local` that takes effect: it only counts for externally
    /// accessible Services.
    pub fn external_policy_local(&self) -> bool {
        self.external_traffic_policy == TrafficPolicy::Local && self.service_externally_accessible()
    }

    /// `internalTrafficPolicy: Local`.
    pub fn internal_policy_local(&self) -> bool {
        self.internal_traffic_policy == TrafficPolicy::Local
    }

    /// Whether this port needs the cluster-wide endpoint set: internal traffic with policy
    /// Cluster, or any external traffic (even with eTP Local, pods and the node itself are
    /// short-circuited to cluster endpoints).
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local() || self.externally_accessible()
    }

    /// Whether this port needs the node-local endpoint set: iTP Local, or an effective eTP Local
    /// with an external entry point.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local()
            || (self.external_policy_local() && self.externally_accessible())
    }
}

/// Builder for [`ServicePort`]; every setter takes a plain value, `build` validates them all.
#[derive(Debug, Clone)]
#[must_use]
pub struct ServicePortBuilder {
    name: ServicePortName,
    port: i64,
    node_port: i64,
    cluster_ips: Vec<Result<IpAddr, String>>,
    external_ips: Vec<Result<IpAddr, String>>,
    load_balancer_ips: Vec<Result<IpAddr, String>>,
    load_balancer_source_ranges: Vec<String>,
    ip_families: Vec<String>,
    service_type: ServiceType,
    external_traffic_policy: TrafficPolicy,
    internal_traffic_policy: TrafficPolicy,
    health_check_node_port: i64,
    session_affinity: RawAffinity,
    traffic_distribution: Option<TrafficDistribution>,
}

/// Affinity as given to the builder, validated in `build` so the error can name the object.
#[derive(Debug, Clone, Copy)]
enum RawAffinity {
    Valid(SessionAffinity),
    ClientIp(Option<i64>),
}

fn strings<I, S>(items: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    items.into_iter().map(|s| s.as_ref().to_string()).collect()
}

impl ServicePortBuilder {
    /// `spec.ports[].nodePort`; 0 means none.
    pub fn node_port(mut self, node_port: impl Into<i64>) -> Self {
        self.node_port = node_port.into();
        self
    }
    /// `spec.clusterIPs`.
    pub fn cluster_ips<I: IntoIterator<Item = A>, A: IpInput>(mut self, addresses: I) -> Self {
        self.cluster_ips = ips(addresses);
        self
    }
    /// `spec.externalIPs`.
    pub fn external_ips<I: IntoIterator<Item = A>, A: IpInput>(mut self, addresses: I) -> Self {
        self.external_ips = ips(addresses);
        self
    }
    /// VIP-mode `status.loadBalancer.ingress[].ip`.
    pub fn load_balancer_ips<I: IntoIterator<Item = A>, A: IpInput>(
        mut self,
        addresses: I,
    ) -> Self {
        self.load_balancer_ips = ips(addresses);
        self
    }
    /// `spec.loadBalancerSourceRanges` (CIDRs; surrounding whitespace is ignored, as upstream).
    pub fn load_balancer_source_ranges<I: IntoIterator<Item = S>, S: AsRef<str>>(
        mut self,
        cidrs: I,
    ) -> Self {
        self.load_balancer_source_ranges = strings(cidrs);
        self
    }
    /// `spec.ipFamilies`; when empty, derived from the cluster IPs.
    pub fn ip_families<I: IntoIterator<Item = S>, S: AsRef<str>>(mut self, families: I) -> Self {
        self.ip_families = strings(families);
        self
    }
    /// `spec.type`.
    pub fn service_type(mut self, service_type: ServiceType) -> Self {
        self.service_type = service_type;
        self
    }
    /// `spec.externalTrafficPolicy`.
    pub fn external_traffic_policy(mut self, policy: TrafficPolicy) -> Self {
        self.external_traffic_policy = policy;
        self
    }
    /// `spec.internalTrafficPolicy`.
    pub fn internal_traffic_policy(mut self, policy: TrafficPolicy) -> Self {
        self.internal_traffic_policy = policy;
        self
    }
    /// `spec.healthCheckNodePort`; 0 means none.
    pub fn health_check_node_port(mut self, port: impl Into<i64>) -> Self {
        self.health_check_node_port = port.into();
        self
    }
    /// `spec.sessionAffinity` (see [`SessionAffinity::client_ip`] to validate a timeout).
    pub fn session_affinity(mut self, affinity: SessionAffinity) -> Self {
        self.session_affinity = RawAffinity::Valid(affinity);
        self
    }
    /// `spec.sessionAffinity: ClientIP` with `timeoutSeconds` (`None` for the 10800 s default);
    /// an out-of-range timeout is reported by `build`, naming the field.
    pub fn client_ip_affinity(mut self, timeout_seconds: Option<i64>) -> Self {
        self.session_affinity = RawAffinity::ClientIp(timeout_seconds);
        self
    }
    /// `spec.trafficDistribution`.
    pub fn traffic_distribution(mut self, distribution: Option<TrafficDistribution>) -> Self {
        self.traffic_distribution = distribution;
        self
    }

    /// Validates every field.
    pub fn build(self) -> Result<ServicePort, ModelError> {
        // Formatted only for an error: most builds succeed.
        let obj = Named("service port", &self.name);
        let err = |field: &str, reason: String| ModelError::new(obj, field, reason);

        let port = port_value(self.port).map_err(|r| err("port", r))?;
        let node_port = optional_port(self.node_port).map_err(|r| err("nodePort", r))?;
        let health_check_node_port = optional_port(self.health_check_node_port)
            .map_err(|r| err("healthCheckNodePort", r))?;
        let cluster_ips =
            parse_ips(&self.cluster_ips, "clusterIPs").map_err(|(f, r)| err(&f, r))?;
        let external_ips =
            parse_ips(&self.external_ips, "externalIPs").map_err(|(f, r)| err(&f, r))?;
        let load_balancer_ips = parse_ips(&self.load_balancer_ips, "status.loadBalancer.ingress")
            .map_err(|(f, r)| err(&f, r))?;
        let mut load_balancer_source_ranges =
            Vec::with_capacity(self.load_balancer_source_ranges.len());
        for (i, raw) in self.load_balancer_source_ranges.iter().enumerate() {
            let net: IpNet = raw.trim().parse().map_err(|_| {
                err(
                    &format!("loadBalancerSourceRanges[{i}]"),
                    format!("invalid CIDR {raw:?}"),
                )
            })?;
            load_balancer_source_ranges.push(net.trunc());
        }
        let mut ip_families = Vec::with_capacity(self.ip_families.len());
        for (i, raw) in self.ip_families.iter().enumerate() {
            let fam: IpFamily = raw
                .parse()
                .map_err(|r| err(&format!("ipFamilies[{i}]"), r))?;
            if ip_families.contains(&fam) {
                return Err(err(
                    &format!("ipFamilies[{i}]"),
                    format!("duplicate family {fam}"),
                ));
            }
            ip_families.push(fam);
        }
        if ip_families.is_empty() {
            for ip in &cluster_ips {
                let fam = IpFamily::of(ip);
                if !ip_families.contains(&fam) {
                    ip_families.push(fam);
                }
            }
        }
        for (i, ip) in cluster_ips.iter().enumerate() {
            if !ip_families.contains(&IpFamily::of(ip)) {
                return Err(err(
                    &format!("clusterIPs[{i}]"),
                    format!("{ip} is not of a family listed in ipFamilies"),
                ));
            }
        }
        if cluster_ips.len() > 2
            || (cluster_ips.len() == 2
                && IpFamily::of(&cluster_ips[0]) == IpFamily::of(&cluster_ips[1]))
        {
            return Err(err(
                "clusterIPs",
                "at most one cluster IP per family".to_string(),
            ));
        }
        let session_affinity = match self.session_affinity {
            RawAffinity::Valid(a) => a,
            RawAffinity::ClientIp(secs) => SessionAffinity::client_ip(secs)
                .map_err(|r| err("sessionAffinityConfig.clientIP.timeoutSeconds", r))?,
        };
        if let SessionAffinity::ClientIp { timeout } = session_affinity {
            let max = Duration::from_secs(u64::from(MAX_AFFINITY_TIMEOUT_SECONDS));
            if timeout < Duration::from_secs(1) || timeout > max {
                return Err(err(
                    "sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!(
                        "{timeout:?} is out of range 1..={MAX_AFFINITY_TIMEOUT_SECONDS} seconds"
                    ),
                ));
            }
        }
        Ok(ServicePort {
            name: self.name,
            port,
            node_port,
            cluster_ips,
            external_ips,
            load_balancer_ips,
            load_balancer_source_ranges,
            ip_families,
            service_type: self.service_type,
            external_traffic_policy: self.external_traffic_policy,
            internal_traffic_policy: self.internal_traffic_policy,
            health_check_node_port,
            session_affinity,
            traffic_distribution: self.traffic_distribution,
        })
    }
}

fn port_value(raw: i64) -> Result<NonZeroU16, String> {
    u16::try_from(raw)
        .ok()
        .and_then(NonZeroU16::new)
        .ok_or_else(|| format!("{raw} is not a valid port (1..=65535)"))
}

fn optional_port(raw: i64) -> Result<Option<NonZeroU16>, String> {
    if raw == 0 {
        Ok(None)
    } else {
        port_value(raw).map(Some)
    }
}

fn parse_ips(raw: &[Result<IpAddr, String>], field: &str) -> Result<Vec<IpAddr>, (String, String)> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, s) in raw.iter().enumerate() {
        let ip: IpAddr = s
            .clone()
            .map_err(|s| (format!("{field}[{i}]"), format!("invalid IP address {s:?}")))?;
        if ip.is_unspecified() || ip.is_multicast() {
            return Err((
                format!("{field}[{i}]"),
                format!("{ip} cannot be a service address"),
            ));
        }
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// The state of an endpoint, from its EndpointSlice `conditions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Conditions {
    /// `ready`: the endpoint may receive new traffic.
    pub ready: bool,
    /// `serving`: like ready, but regardless of terminating state.
    pub serving: bool,
    /// `terminating`: the endpoint is shutting down.
    pub terminating: bool,
}

impl Conditions {
    /// A ready, serving, non-terminating endpoint.
    pub const READY: Conditions = Conditions {
        ready: true,
        serving: true,
        terminating: false,
    };
    /// A terminating endpoint that still serves (used only when nothing is ready).
    pub const SERVING_TERMINATING: Conditions = Conditions {
        ready: false,
        serving: true,
        terminating: true,
    };
    /// A terminating endpoint that no longer serves.
    pub const TERMINATING: Conditions = Conditions {
        ready: false,
        serving: false,
        terminating: true,
    };
    /// An endpoint that is neither ready nor serving.
    pub const NOT_READY: Conditions = Conditions {
        ready: false,
        serving: false,
        terminating: false,
    };

    /// Conditions as Kubernetes reports them: an unset `ready` or `serving` means true, an unset
    /// `terminating` means false (EndpointSlice API semantics).
    pub fn from_api(ready: Option<bool>, serving: Option<bool>, terminating: Option<bool>) -> Self {
        Self {
            ready: ready.unwrap_or(true),
            serving: serving.unwrap_or(true),
            terminating: terminating.unwrap_or(false),
        }
    }

    /// Whether the endpoint may be used at all: ready, or serving while terminating.
    pub fn usable(&self) -> bool {
        self.ready || (self.serving && self.terminating)
    }
}

/// One backend of a service port: an address, port, conditions, location and hints.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(into = "wire::EndpointRepr", try_from = "wire::EndpointRepr")
)]
pub struct Endpoint {
    addr: SocketAddr,
    conditions: Conditions,
    node_name: Option<Arc<str>>,
    zone: Option<Arc<str>>,
    /// Boxed, and `None` when there is none: most endpoints have no hints, and an endpoint is
    /// 80 bytes instead of 104 (a node holds one per endpoint of the cluster).
    hints: Option<Box<Hints>>,
}

/// An endpoint's topology hints (at least one).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hints {
    for_zones: Box<[Box<str>]>,
    for_nodes: Box<[Box<str>]>,
}

impl Endpoint {
    /// Starts a builder for endpoint `ip`:`port` with ready conditions.
    ///
    /// `ip` is an [`IpAddr`] or its text; `port` any integer (`u16`, or the API's `i32`).
    /// `build` validates both:
    ///
    /// ```
    /// use std::net::{IpAddr, Ipv4Addr};
    /// use lb_core::Endpoint;
    ///
    /// let typed = Endpoint::builder(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 8080_u16).build()?;
    /// let text = Endpoint::builder("10.0.0.1", 8080).build()?;
    /// assert_eq!(typed, text);
    /// # Ok::<(), lb_core::ModelError>(())
    /// ```
    pub fn builder(ip: impl IpInput, port: impl Into<i64>) -> EndpointBuilder {
        EndpointBuilder {
            ip: ip.into_ip(),
            port: port.into(),
            conditions: Conditions::READY,
            node_name: None,
            zone: None,
            hints_for_zones: Vec::new(),
            hints_for_nodes: Vec::new(),
        }
    }
    /// The same endpoint serving another port (an EndpointSlice lists ports separately from
    /// endpoints; this avoids validating the endpoint once per port).
    pub fn with_port(&self, port: NonZeroU16) -> Endpoint {
        Endpoint {
            addr: SocketAddr::new(self.addr.ip(), port.get()),
            ..self.clone()
        }
    }

    /// Address and port.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// Address.
    pub fn ip(&self) -> IpAddr {
        self.addr.ip()
    }
    /// Port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
    /// Conditions.
    pub fn conditions(&self) -> Conditions {
        self.conditions
    }
    /// `ready`.
    pub fn is_ready(&self) -> bool {
        self.conditions.ready
    }
    /// `serving`.
    pub fn is_serving(&self) -> bool {
        self.conditions.serving
    }
    /// `terminating`.
    pub fn is_terminating(&self) -> bool {
        self.conditions.terminating
    }
    /// `nodeName`.
    pub fn node_name(&self) -> Option<&str> {
        self.node_name.as_deref()
    }
    /// `zone`.
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }
    /// `hints.forZones[].name`.
    pub fn hints_for_zones(&self) -> &[Box<str>] {
        self.hints.as_deref().map_or(&[], |h| &h.for_zones)
    }
    /// `hints.forNodes[].name`.
    pub fn hints_for_nodes(&self) -> &[Box<str>] {
        self.hints.as_deref().map_or(&[], |h| &h.for_nodes)
    }

    /// Makes the endpoint's node and zone names the equal copies held in `names`, adding
    /// those not there yet: whoever keeps many endpoints (a store of a whole cluster) calls it
    /// for each, so the endpoints of one node share one copy of its name.
    pub fn share_names(&mut self, names: &mut std::collections::HashSet<Arc<str>>) {
        for name in [&mut self.node_name, &mut self.zone].into_iter().flatten() {
            match names.get(&**name) {
                Some(shared) => *name = shared.clone(),
                None => {
                    names.insert(name.clone());
                }
            }
        }
    }
    /// Whether the endpoint runs on `node`.
    pub fn is_local_to(&self, node: &Node) -> bool {
        self.node_name.as_deref() == Some(node.name())
    }
    pub(crate) fn hinted_for_zone(&self, zone: &str) -> bool {
        self.hints_for_zones().iter().any(|z| &**z == zone)
    }
    pub(crate) fn hinted_for_node(&self, node: &str) -> bool {
        self.hints_for_nodes().iter().any(|n| &**n == node)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)
    }
}

/// Builder for [`Endpoint`].
#[derive(Debug, Clone)]
#[must_use]
pub struct EndpointBuilder {
    ip: Result<IpAddr, String>,
    port: i64,
    conditions: Conditions,
    node_name: Option<Arc<str>>,
    zone: Option<Arc<str>>,
    hints_for_zones: Vec<String>,
    hints_for_nodes: Vec<String>,
}

impl EndpointBuilder {
    /// Sets all three conditions.
    pub fn conditions(mut self, conditions: Conditions) -> Self {
        self.conditions = conditions;
        self
    }
    /// `conditions.ready`.
    pub fn ready(mut self, ready: bool) -> Self {
        self.conditions.ready = ready;
        self
    }
    /// `conditions.serving`.
    pub fn serving(mut self, serving: bool) -> Self {
        self.conditions.serving = serving;
        self
    }
    /// `conditions.terminating`.
    pub fn terminating(mut self, terminating: bool) -> Self {
        self.conditions.terminating = terminating;
        self
    }
    /// `nodeName`.
    pub fn node_name(mut self, node: &str) -> Self {
        self.node_name = Some(Arc::from(node));
        self
    }
    /// `zone`.
    pub fn zone(mut self, zone: &str) -> Self {
        self.zone = Some(Arc::from(zone));
        self
    }
    /// `hints.forZones`.
    pub fn hints_for_zones<I: IntoIterator<Item = S>, S: AsRef<str>>(mut self, zones: I) -> Self {
        self.hints_for_zones = strings(zones);
        self
    }
    /// `hints.forNodes`.
    pub fn hints_for_nodes<I: IntoIterator<Item = S>, S: AsRef<str>>(mut self, nodes: I) -> Self {
        self.hints_for_nodes = strings(nodes);
        self
    }

    /// Validates every field.
    pub fn build(self) -> Result<Endpoint, ModelError> {
        // Formatted only for an error: most builds succeed.
        let at = EndpointAt(&self.ip, self.port);
        let obj = Named("endpoint", &at);
        let ip = match &self.ip {
            Ok(ip) => *ip,
            Err(text) => {
                return Err(ModelError::new(
                    obj,
                    "addresses[0]",
                    format!("invalid IP address {text:?}"),
                ));
            }
        };
        if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
            return Err(ModelError::new(
                obj,
                "addresses[0]",
                format!("{ip} cannot be an endpoint address"),
            ));
        }
        let port = port_value(self.port).map_err(|r| ModelError::new(obj, "port", r))?;
        // `ready: true` with `serving: false` is accepted as kube-proxy accepts it
        // (`pkg/proxy/endpointslicecache.go` reads each condition on its own): the endpoint is
        // ready, so it is used; `serving` only matters for terminating endpoints.
        let non_empty = |field: &str, v: Option<Arc<str>>| match v {
            Some(s) if s.is_empty() => Err(ModelError::new(obj, field, "must not be empty")),
            other => Ok(other),
        };
        let node_name = non_empty("nodeName", self.node_name)?;
        let zone = non_empty("zone", self.zone)?;
        let hints = |field: &str, v: Vec<String>| -> Result<Box<[Box<str>]>, ModelError> {
            let mut set = BTreeSet::new();
            for (i, s) in v.into_iter().enumerate() {
                if s.is_empty() {
                    return Err(ModelError::new(
                        obj,
                        format!("{field}[{i}].name"),
                        "must not be empty",
                    ));
                }
                set.insert(s.into_boxed_str());
            }
            Ok(set.into_iter().collect())
        };
        let for_zones = hints("hints.forZones", self.hints_for_zones)?;
        let for_nodes = hints("hints.forNodes", self.hints_for_nodes)?;
        let hints = (!for_zones.is_empty() || !for_nodes.is_empty()).then(|| {
            Box::new(Hints {
                for_zones,
                for_nodes,
            })
        });
        Ok(Endpoint {
            addr: SocketAddr::new(ip, port.get()),
            conditions: self.conditions,
            node_name,
            zone,
            hints,
        })
    }
}

/// The node the decisions are made for: its name and its `topology.kubernetes.io/zone` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(into = "wire::NodeRepr", try_from = "wire::NodeRepr")
)]
pub struct Node {
    name: Arc<str>,
    zone: Option<Arc<str>>,
    addresses: Box<[IpAddr]>,
    pod_cidrs: Box<[IpNet]>,
}

impl Node {
    /// A node called `name` in `zone` (`None` or empty when the node has no zone label).
    pub fn new(name: &str, zone: Option<&str>) -> Result<Self, ModelError> {
        if name.is_empty() {
            return Err(ModelError::new(
                "node",
                "metadata.name",
                "must not be empty",
            ));
        }
        Ok(Self {
            name: name.into(),
            zone: zone.filter(|z| !z.is_empty()).map(Arc::from),
            addresses: Box::default(),
            pod_cidrs: Box::default(),
        })
    }
    /// The same node with its primary addresses: at most one per family, the first of each
    /// family wins (kube-proxy's node IPs, from the Node's `status.addresses`).
    pub fn with_addresses(mut self, addresses: impl IntoIterator<Item = IpAddr>) -> Self {
        let mut primary: Vec<IpAddr> = Vec::new();
        for ip in addresses {
            if !primary.iter().any(|p| p.is_ipv4() == ip.is_ipv4()) {
                primary.push(ip);
            }
        }
        self.addresses = primary.into();
        self
    }
    /// The node's primary addresses, at most one per family (empty when unknown).
    pub fn addresses(&self) -> &[IpAddr] {
        &self.addresses
    }
    /// The same node with the pod CIDRs allocated to it (the Node's `spec.podCIDRs`, at most
    /// one per family: the first of each family wins, as the API server allows no more). They
    /// tell this node's pods apart with kube-proxy's `detectLocalMode: NodeCIDR`.
    pub fn with_pod_cidrs(mut self, cidrs: impl IntoIterator<Item = IpNet>) -> Self {
        let mut kept: Vec<IpNet> = Vec::new();
        for net in cidrs {
            if !kept
                .iter()
                .any(|k| k.addr().is_ipv4() == net.addr().is_ipv4())
            {
                kept.push(net.trunc());
            }
        }
        self.pod_cidrs = kept.into();
        self
    }
    /// The pod CIDRs allocated to this node, at most one per family (empty when unknown).
    pub fn pod_cidrs(&self) -> &[IpNet] {
        &self.pod_cidrs
    }
    /// `metadata.name`.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The `topology.kubernetes.io/zone` label, if set.
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }
}
