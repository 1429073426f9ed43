//! Conntrack cleanup: deleting the connection-tracking entries that would keep a UDP (or SCTP)
//! client on a backend that is gone, or on a service address that was not mapped to any backend.
//!
//! Why (kube-proxy `pkg/proxy/conntrack`): NAT is decided on the first packet of a flow and
//! remembered in its conntrack entry; later packets follow the entry, not the ruleset. UDP has
//! no teardown, so a client that keeps sending from one source port keeps refreshing an entry
//! that DNATs to an endpoint which left the Service (a black hole, or a stale backend that still
//! answers), or an entry recorded before the Service had endpoints, which is not DNATed at all.
//! Such a client is stuck until it pauses for the UDP timeout. TCP needs none of this: a dead
//! peer resets or times out, and the client reconnects from a new port.
//!
//! Two stages, like the rest of the proxy:
//!
//! ```text
//! ServicePorts (previous) ─┐
//!                          ├─► plan (pure) ─► Filters ─► Conntrack::delete_matching (netlink)
//! ServicePorts (next) ─────┘                              one dump per family, batched deletes
//! ```
//!
//! [`cleanup`] joins them; a sync loop calls it after every successful sync, with the service
//! ports it had at the previous successful cleanup and the ones it has now (see
//! `crate::reconcile`). The rules are kube-proxy's diff-based ones (v1.28–v1.31,
//! `CleanStaleEntries`), and in the same dump the whole table is reconciled against the
//! serving endpoints, as kube-proxy does since v1.32 ([`Reconciler`]): that also cleans flows
//! that went stale while lb-proxy was not running. Two deliberate differences: **SCTP is cleaned as well as UDP**
//! (upstream cleans UDP only; an SCTP association to a removed endpoint is just as stuck, since
//! SCTP heartbeats keep the entry alive), and filters carry the service port as well as the
//! address, so a change to one port of a multi-port Service leaves the other ports' flows alone.

mod netlink;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use lb_core::{IpFamily, Protocol, ServicePortName};

use crate::store::{ServiceEntry, Snapshot};

pub use netlink::{Conntrack, ConntrackError};

/// What cleanup needs to know about one UDP or SCTP service port: plain values, so plans are
/// easy to test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortState {
    /// `UDP` or `SCTP` (TCP ports are never cleaned, and [`plan`] ignores them).
    pub protocol: Protocol,
    /// The service port (`spec.ports[].port`).
    pub port: u16,
    /// Every address the port is reachable at on `port`: cluster IPs, external IPs and
    /// load-balancer IPs.
    pub addresses: Vec<IpAddr>,
    /// The node port, if any (reachable at every node address).
    pub node_port: Option<u16>,
    /// The addresses of the *serving* endpoints (ready, or terminating but still serving).
    /// Like kube-proxy, this ignores traffic policies, topology and the terminating state: any
    /// serving endpoint keeps its flows ("changes to the service should not affect existing
    /// flows").
    pub endpoints: BTreeSet<IpAddr>,
}

impl ServicePortState {
    /// The state of a merged store entry; `None` for TCP ports.
    pub fn from_entry(entry: &ServiceEntry) -> Option<Self> {
        let port = &entry.port;
        if !cleaned(port.protocol()) {
            return None;
        }
        Some(Self {
            protocol: port.protocol(),
            port: port.port(),
            addresses: port
                .cluster_ips()
                .iter()
                .chain(port.external_ips())
                .chain(port.load_balancer_ips())
                .copied()
                .collect(),
            node_port: port.node_port(),
            endpoints: entry
                .endpoints
                .iter()
                .filter(|e| e.is_serving())
                .map(|e| e.ip())
                .collect(),
        })
    }
}

/// The UDP and SCTP service ports of a moment, by name: what [`plan`] compares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServicePorts {
    ports: BTreeMap<ServicePortName, ServicePortState>,
}

impl ServicePorts {
    /// No service ports (the state before the first sync).
    pub fn new() -> Self {
        Self::default()
    }

    /// The UDP and SCTP ports among `entries`.
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = &'a ServiceEntry>) -> Self {
        let ports = entries
            .into_iter()
            .filter_map(|e| Some((e.port.name().clone(), ServicePortState::from_entry(e)?)))
            .collect();
        Self { ports }
    }

    /// The UDP and SCTP ports of a store snapshot.
    pub fn from_snapshot(snapshot: &Snapshot) -> Self {
        Self::from_entries(snapshot.services.values())
    }

    /// Adds or replaces one port.
    pub fn insert(&mut self, name: ServicePortName, state: ServicePortState) {
        self.ports.insert(name, state);
    }

    /// Removes one port.
    pub fn remove(&mut self, name: &ServicePortName) -> Option<ServicePortState> {
        self.ports.remove(name)
    }

    /// Number of ports.
    pub fn len(&self) -> usize {
        self.ports.len()
    }

    /// Whether there are no ports.
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    /// For every destination a client can address, the serving endpoints behind it.
    fn destinations(&self) -> BTreeMap<(Protocol, Destination), BTreeSet<IpAddr>> {
        let mut out: BTreeMap<_, BTreeSet<IpAddr>> = BTreeMap::new();
        for s in self.ports.values().filter(|s| cleaned(s.protocol)) {
            for &ip in &s.addresses {
                // A flow to an IPv4 address is DNATed to IPv4 endpoints only.
                let same_family = s.endpoints.iter().filter(|e| e.is_ipv4() == ip.is_ipv4());
                out.entry((s.protocol, Destination::Service { ip, port: s.port }))
                    .or_default()
                    .extend(same_family);
            }
            if let Some(np) = s.node_port {
                out.entry((s.protocol, Destination::NodePort(np)))
                    .or_default()
                    .extend(s.endpoints.iter().copied());
            }
        }
        out
    }
}

/// Whether flows of `protocol` are cleaned: UDP and SCTP (see the module documentation).
pub fn cleaned(protocol: Protocol) -> bool {
    matches!(protocol, Protocol::Udp | Protocol::Sctp)
}

/// Where a client sent a flow: its original destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Destination {
    /// A service address (cluster, external or load-balancer IP) and the service port.
    Service {
        /// The address.
        ip: IpAddr,
        /// The service port.
        port: u16,
    },
    /// A node port, at any address.
    NodePort(u16),
}

/// Which entries to a destination a filter deletes, by the source of their reply direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReplySource {
    /// Flows DNATed to this endpoint (`--reply-src ENDPOINT`).
    Endpoint(IpAddr),
    /// Flows that were not DNATed at all: their reply comes from the address the client sent to
    /// (reply source = original destination). They were recorded while the destination had no
    /// endpoints.
    Unmapped,
}

/// One deletion rule, in the terms of `conntrack -D`: protocol, original destination (address
/// and port, or port only for node ports), reply source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Filter {
    /// `UDP` or `SCTP`.
    pub protocol: Protocol,
    /// The flow's original destination.
    pub destination: Destination,
    /// The flow's reply source.
    pub reply_source: ReplySource,
}

impl Filter {
    /// Whether this filter deletes `flow`.
    pub fn matches(&self, flow: &Flow) -> bool {
        if flow.protocol != ip_protocol(self.protocol) {
            return false;
        }
        let to_destination = match self.destination {
            Destination::Service { ip, port } => {
                flow.orig_dst == ip && flow.orig_dst_port == Some(port)
            }
            Destination::NodePort(port) => flow.orig_dst_port == Some(port),
        };
        to_destination
            && match self.reply_source {
                ReplySource::Endpoint(ip) => flow.reply_src == ip,
                ReplySource::Unmapped => flow.reply_src == flow.orig_dst,
            }
    }

    /// The address families whose tables may hold flows this filter deletes.
    fn families(&self) -> Vec<IpFamily> {
        match (self.destination, self.reply_source) {
            (Destination::Service { ip, .. }, _) | (_, ReplySource::Endpoint(ip)) => {
                vec![IpFamily::of(&ip)]
            }
            (Destination::NodePort(_), ReplySource::Unmapped) => vec![IpFamily::V4, IpFamily::V6],
        }
    }
}

impl fmt::Display for Filter {
    /// The equivalent `conntrack -D` arguments.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-p {}", self.protocol.as_lower_str())?;
        match self.destination {
            Destination::Service { ip, port } => write!(f, " --orig-dst {ip} --dport {port}")?,
            Destination::NodePort(port) => write!(f, " --dport {port}")?,
        }
        match self.reply_source {
            ReplySource::Endpoint(ip) => write!(f, " --reply-src {ip}"),
            ReplySource::Unmapped => f.write_str(" --reply-src <orig-dst>"),
        }
    }
}

/// The fields of one conntrack entry that filters look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// IP protocol number (17 UDP, 132 SCTP, …).
    pub protocol: u8,
    /// Original source address.
    pub orig_src: IpAddr,
    /// Original source port (`None` for port-less protocols).
    pub orig_src_port: Option<u16>,
    /// Original destination address: where the client sent it.
    pub orig_dst: IpAddr,
    /// Original destination port.
    pub orig_dst_port: Option<u16>,
    /// Reply source address: the endpoint it was DNATed to, or `orig_dst` if not DNATed.
    pub reply_src: IpAddr,
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port = |p: Option<u16>| p.map_or(String::new(), |p| format!(":{p}"));
        write!(
            f,
            "proto {} {}{} -> {}{} (reply from {})",
            self.protocol,
            self.orig_src,
            port(self.orig_src_port),
            self.orig_dst,
            port(self.orig_dst_port),
            self.reply_src
        )
    }
}

/// The conntrack deletions a change from `previous` to `next` calls for (kube-proxy's
/// `deleteStaleEndpointConntrackEntries` / `deleteStaleServiceConntrackEntries`, for UDP and
/// SCTP):
///
/// * **An endpoint left a destination** (removed from the EndpointSlice, no longer serving, or
///   its Service, service port, or that address of it is gone): delete the flows to that
///   destination whose reply source is the endpoint ([`ReplySource::Endpoint`]). The ruleset no
///   longer sends new flows there, but existing entries would keep DNATing to it.
/// * **A destination gained its first endpoint** (including a destination that did not exist
///   before, e.g. a new Service): delete the flows to it that were not DNATed
///   ([`ReplySource::Unmapped`]), recorded while nothing could serve them. Note that packets
///   this proxy *rejects* leave no entry (they are dropped before conntrack confirms the flow);
///   the stuck entries come from traffic that passed un-DNATed, e.g. before the Service existed
///   or before this node programmed it.
///
/// A destination is a service address with the service port, or a node port. Deterministic:
/// the filters come sorted and de-duplicated.
pub fn plan(previous: &ServicePorts, next: &ServicePorts) -> BTreeSet<Filter> {
    let before = previous.destinations();
    let after = next.destinations();
    let none = BTreeSet::new();
    let mut filters = BTreeSet::new();
    for (&(protocol, destination), was) in &before {
        let now = after.get(&(protocol, destination)).unwrap_or(&none);
        filters.extend(was.difference(now).map(|&ip| Filter {
            protocol,
            destination,
            reply_source: ReplySource::Endpoint(ip),
        }));
    }
    for (&(protocol, destination), now) in &after {
        let was = before.get(&(protocol, destination)).unwrap_or(&none);
        if was.is_empty() && !now.is_empty() {
            filters.insert(Filter {
                protocol,
                destination,
                reply_source: ReplySource::Unmapped,
            });
        }
    }
    filters
}

/// Deletes, in the caller's network namespace, the flows the change from `previous` to `next`
/// made stale ([`plan`]) and every flow the whole table holds that `serving` shows stale
/// ([`Reconciler`]), in one dump per family; returns the number of entries deleted. Opens no
/// socket when there is no UDP or SCTP service port and nothing to delete.
///
/// `serving` is every UDP and SCTP service port now (for `lb-proxy run`, `next` itself). The
/// reconciliation repairs what a diff cannot see: flows that went stale while lb-proxy was not
/// running (an endpoint removed during a restart), or whose deletion raced with new packets.
///
/// Call it after a successful sync, so the ruleset already sends new flows where they belong.
/// On error, keep `previous`: the next call then retries these deletions.
pub fn cleanup(
    previous: &ServicePorts,
    next: &ServicePorts,
    serving: &ServicePorts,
) -> Result<usize, ConntrackError> {
    let filters = plan(previous, next);
    let reconciler = Reconciler::new(serving);
    if filters.is_empty() && reconciler.is_empty() {
        return Ok(0);
    }
    Conntrack::open()?.delete_stale(&filters, &reconciler)
}

/// The whole-table rule of kube-proxy's `CleanStaleEntries` (`pkg/proxy/conntrack/cleanup.go`,
/// v1.32+), for UDP and SCTP: a flow whose original destination is a service address and
/// port, or a node port, is stale when
///
/// * it was DNATed (reply source ≠ original destination) to an address that is no serving
///   endpoint of that destination now, or
/// * it was not DNATed, and the destination has serving endpoints now (new packets of it would
///   be DNATed; the entry keeps them un-DNATed).
///
/// Everything else is kept, unlike upstream, which also deletes un-DNATed flows to
/// destinations without endpoints: those are harmless (the ruleset rejects new ones) and
/// deleting them on every sync would only churn. Flows to destinations lb-proxy does not serve
/// are never touched.
#[derive(Debug, Default)]
pub struct Reconciler {
    services: HashMap<(u8, IpAddr, u16), HashSet<IpAddr>>,
    node_ports: HashMap<(u8, u16), HashSet<IpAddr>>,
}

impl Reconciler {
    /// The rule for the UDP and SCTP service ports `serving`.
    pub fn new(serving: &ServicePorts) -> Self {
        let mut r = Reconciler::default();
        for ((protocol, destination), endpoints) in serving.destinations() {
            let proto = ip_protocol(protocol);
            let set = match destination {
                Destination::Service { ip, port } => {
                    r.services.entry((proto, ip, port)).or_default()
                }
                Destination::NodePort(port) => r.node_ports.entry((proto, port)).or_default(),
            };
            set.extend(endpoints);
        }
        r
    }

    /// Whether there is no destination to reconcile.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.node_ports.is_empty()
    }

    /// Whether `flow` is stale (see the type's documentation). A service address wins over a
    /// node port of the same number, as in the ruleset.
    pub fn is_stale(&self, flow: &Flow) -> bool {
        let Some(port) = flow.orig_dst_port else {
            return false;
        };
        let endpoints = match self.services.get(&(flow.protocol, flow.orig_dst, port)) {
            Some(e) => e,
            None => match self.node_ports.get(&(flow.protocol, port)) {
                Some(e) => e,
                None => return false,
            },
        };
        if flow.reply_src == flow.orig_dst {
            !endpoints.is_empty()
        } else {
            !endpoints.contains(&flow.reply_src)
        }
    }

    /// The address families whose tables may hold flows it deletes.
    fn families(&self) -> BTreeSet<IpFamily> {
        if !self.node_ports.is_empty() {
            return [IpFamily::V4, IpFamily::V6].into();
        }
        self.services
            .keys()
            .map(|(_, ip, _)| IpFamily::of(ip))
            .collect()
    }
}

/// The IP protocol number of a service protocol.
pub fn ip_protocol(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

/// Filters indexed for matching a large table: one hash lookup per entry and destination kind.
#[derive(Debug, Default)]
pub struct Matcher {
    services: HashMap<(u8, IpAddr, u16), Replies>,
    node_ports: HashMap<(u8, u16), Replies>,
}

#[derive(Debug, Default)]
struct Replies {
    endpoints: HashSet<IpAddr>,
    unmapped: bool,
}

impl Replies {
    fn add(&mut self, reply: ReplySource) {
        match reply {
            ReplySource::Endpoint(ip) => {
                self.endpoints.insert(ip);
            }
            ReplySource::Unmapped => self.unmapped = true,
        }
    }

    fn matches(&self, flow: &Flow) -> bool {
        (self.unmapped && flow.reply_src == flow.orig_dst)
            || self.endpoints.contains(&flow.reply_src)
    }
}

impl Matcher {
    /// Indexes `filters`.
    pub fn new<'a>(filters: impl IntoIterator<Item = &'a Filter>) -> Self {
        let mut m = Matcher::default();
        for f in filters {
            let proto = ip_protocol(f.protocol);
            match f.destination {
                Destination::Service { ip, port } => m
                    .services
                    .entry((proto, ip, port))
                    .or_default()
                    .add(f.reply_source),
                Destination::NodePort(port) => m
                    .node_ports
                    .entry((proto, port))
                    .or_default()
                    .add(f.reply_source),
            }
        }
        m
    }

    /// Whether any filter deletes `flow` (the same answer as `filters.any(|f| f.matches(flow))`).
    pub fn matches(&self, flow: &Flow) -> bool {
        let Some(port) = flow.orig_dst_port else {
            return false;
        };
        self.services
            .get(&(flow.protocol, flow.orig_dst, port))
            .is_some_and(|r| r.matches(flow))
            || self
                .node_ports
                .get(&(flow.protocol, port))
                .is_some_and(|r| r.matches(flow))
    }
}

/// The address families a set of filters needs dumped, in order.
fn families(filters: &BTreeSet<Filter>) -> BTreeSet<IpFamily> {
    filters.iter().flat_map(Filter::families).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn name(svc: &str, protocol: Protocol) -> ServicePortName {
        ServicePortName::new("ns", svc, "p", protocol)
    }

    fn state(
        protocol: Protocol,
        addresses: &[&str],
        node_port: Option<u16>,
        eps: &[&str],
    ) -> ServicePortState {
        ServicePortState {
            protocol,
            port: 53,
            addresses: addresses.iter().map(|a| ip(a)).collect(),
            node_port,
            endpoints: eps.iter().map(|e| ip(e)).collect(),
        }
    }

    fn ports(items: &[(&str, ServicePortState)]) -> ServicePorts {
        let mut p = ServicePorts::new();
        for (svc, s) in items {
            p.insert(name(svc, s.protocol), s.clone());
        }
        p
    }

    fn svc(protocol: Protocol, addr: &str, reply: ReplySource) -> Filter {
        Filter {
            protocol,
            destination: Destination::Service {
                ip: ip(addr),
                port: 53,
            },
            reply_source: reply,
        }
    }

    fn ep(s: &str) -> ReplySource {
        ReplySource::Endpoint(ip(s))
    }

    fn flow(proto: u8, dst: &str, dport: u16, reply_src: &str) -> Flow {
        Flow {
            protocol: proto,
            orig_src: ip("10.100.0.2"),
            orig_src_port: Some(40000),
            orig_dst: ip(dst),
            orig_dst_port: Some(dport),
            reply_src: ip(reply_src),
        }
    }

    #[test]
    fn nothing_changed_plans_nothing() {
        let p = ports(&[(
            "dns",
            state(
                Protocol::Udp,
                &["10.96.0.10"],
                Some(30053),
                &["10.244.1.10"],
            ),
        )]);
        assert!(plan(&p, &p).is_empty());
    }

    #[test]
    fn endpoint_leaving_deletes_its_flows_to_every_service_address_and_the_node_port() {
        let before = ports(&[(
            "dns",
            state(
                Protocol::Udp,
                &["10.96.0.10", "192.0.2.7", "198.51.100.1"],
                Some(30053),
                &["10.244.1.10", "10.244.1.11"],
            ),
        )]);
        let after = ports(&[(
            "dns",
            state(
                Protocol::Udp,
                &["10.96.0.10", "192.0.2.7", "198.51.100.1"],
                Some(30053),
                &["10.244.1.11"],
            ),
        )]);
        let got: Vec<String> = plan(&before, &after)
            .iter()
            .map(Filter::to_string)
            .collect();
        assert_eq!(
            got,
            [
                "-p udp --orig-dst 10.96.0.10 --dport 53 --reply-src 10.244.1.10",
                "-p udp --orig-dst 192.0.2.7 --dport 53 --reply-src 10.244.1.10",
                "-p udp --orig-dst 198.51.100.1 --dport 53 --reply-src 10.244.1.10",
                "-p udp --dport 30053 --reply-src 10.244.1.10",
            ]
        );
    }

    #[test]
    fn first_endpoint_deletes_unmapped_flows_to_every_service_address_and_the_node_port() {
        let before = ports(&[(
            "dns",
            state(
                Protocol::Udp,
                &["10.96.0.10", "192.0.2.7"],
                Some(30053),
                &[],
            ),
        )]);
        let after = ports(&[(
            "dns",
            state(
                Protocol::Udp,
                &["10.96.0.10", "192.0.2.7"],
                Some(30053),
                &["10.244.1.10"],
            ),
        )]);
        let got: Vec<String> = plan(&before, &after)
            .iter()
            .map(Filter::to_string)
            .collect();
        assert_eq!(
            got,
            [
                "-p udp --orig-dst 10.96.0.10 --dport 53 --reply-src <orig-dst>",
                "-p udp --orig-dst 192.0.2.7 --dport 53 --reply-src <orig-dst>",
                "-p udp --dport 30053 --reply-src <orig-dst>",
            ]
        );
    }

    #[test]
    fn a_new_service_with_endpoints_counts_as_gaining_its_first_endpoint() {
        let after = ports(&[(
            "dns",
            state(Protocol::Udp, &["10.96.0.10"], None, &["10.244.1.10"]),
        )]);
        let got = plan(&ServicePorts::new(), &after);
        assert_eq!(
            got,
            BTreeSet::from([svc(Protocol::Udp, "10.96.0.10", ReplySource::Unmapped)])
        );
    }

    #[test]
    fn a_second_endpoint_deletes_nothing() {
        let before = ports(&[(
            "dns",
            state(
                Protocol::Udp,
                &["10.96.0.10"],
                Some(30053),
                &["10.244.1.10"],
            ),
        )]);
        let after = ports(&[(
            "dns",
            state(
                Protocol::Udp,
                &["10.96.0.10"],
                Some(30053),
                &["10.244.1.10", "10.244.1.11"],
            ),
        )]);
        assert!(plan(&before, &after).is_empty());
    }

    #[test]
    fn the_last_endpoint_leaving_deletes_its_flows_and_plans_no_unmapped_cleanup() {
        let before = ports(&[(
            "dns",
            state(Protocol::Udp, &["10.96.0.10"], None, &["10.244.1.10"]),
        )]);
        let after = ports(&[("dns", state(Protocol::Udp, &["10.96.0.10"], None, &[]))]);
        assert_eq!(
            plan(&before, &after),
            BTreeSet::from([svc(Protocol::Udp, "10.96.0.10", ep("10.244.1.10"))])
        );
    }

    #[test]
    fn a_deleted_service_deletes_the_flows_to_its_endpoints() {
        let before = ports(&[(
            "dns",
            state(Protocol::Udp, &["10.96.0.10"], None, &["10.244.1.10"]),
        )]);
        assert_eq!(
            plan(&before, &ServicePorts::new()),
            BTreeSet::from([svc(Protocol::Udp, "10.96.0.10", ep("10.244.1.10"))])
        );
    }

    #[test]
    fn a_removed_external_ip_deletes_the_flows_through_it_only() {
        let before = ports(&[(
            "dns",
            state(
                Protocol::Udp,
                &["10.96.0.10", "192.0.2.7"],
                None,
                &["10.244.1.10"],
            ),
        )]);
        let after = ports(&[(
            "dns",
            state(Protocol::Udp, &["10.96.0.10"], None, &["10.244.1.10"]),
        )]);
        assert_eq!(
            plan(&before, &after),
            BTreeSet::from([svc(Protocol::Udp, "192.0.2.7", ep("10.244.1.10"))])
        );
    }

    #[test]
    fn sctp_is_cleaned_like_udp_and_tcp_is_never_cleaned() {
        let before = ports(&[
            (
                "sctp",
                state(Protocol::Sctp, &["10.96.0.11"], None, &["10.244.1.10"]),
            ),
            (
                "tcp",
                state(Protocol::Tcp, &["10.96.0.12"], None, &["10.244.1.10"]),
            ),
        ]);
        let after = ports(&[
            ("sctp", state(Protocol::Sctp, &["10.96.0.11"], None, &[])),
            ("tcp", state(Protocol::Tcp, &["10.96.0.12"], None, &[])),
        ]);
        assert_eq!(
            plan(&before, &after),
            BTreeSet::from([svc(Protocol::Sctp, "10.96.0.11", ep("10.244.1.10"))])
        );
    }

    #[test]
    fn dual_stack_addresses_are_paired_with_endpoints_of_their_own_family() {
        let before = ports(&[(
            "dns",
            state(
                Protocol::Udp,
                &["10.96.0.10", "fd00:96::10"],
                None,
                &["10.244.1.10", "fd00:244:1::10"],
            ),
        )]);
        let after = ports(&[(
            "dns",
            state(Protocol::Udp, &["10.96.0.10", "fd00:96::10"], None, &[]),
        )]);
        assert_eq!(
            plan(&before, &after),
            BTreeSet::from([
                svc(Protocol::Udp, "10.96.0.10", ep("10.244.1.10")),
                svc(Protocol::Udp, "fd00:96::10", ep("fd00:244:1::10")),
            ])
        );
    }

    #[test]
    fn endpoint_filters_match_flows_dnated_to_that_endpoint_on_that_port_only() {
        let f = svc(Protocol::Udp, "10.96.0.10", ep("10.244.1.10"));
        assert!(f.matches(&flow(17, "10.96.0.10", 53, "10.244.1.10")));
        assert!(
            !f.matches(&flow(17, "10.96.0.10", 53, "10.244.1.11")),
            "other endpoint"
        );
        assert!(
            !f.matches(&flow(17, "10.96.0.10", 54, "10.244.1.10")),
            "other port"
        );
        assert!(!f.matches(&flow(6, "10.96.0.10", 53, "10.244.1.10")), "TCP");
        assert!(
            !f.matches(&flow(17, "10.96.0.11", 53, "10.244.1.10")),
            "other address"
        );
    }

    #[test]
    fn unmapped_filters_match_only_flows_that_were_not_dnated() {
        let f = svc(Protocol::Udp, "10.96.0.10", ReplySource::Unmapped);
        assert!(f.matches(&flow(17, "10.96.0.10", 53, "10.96.0.10")));
        assert!(!f.matches(&flow(17, "10.96.0.10", 53, "10.244.1.10")));
        let np = Filter {
            protocol: Protocol::Udp,
            destination: Destination::NodePort(30053),
            reply_source: ReplySource::Unmapped,
        };
        assert!(
            np.matches(&flow(17, "10.100.0.1", 30053, "10.100.0.1")),
            "any node address"
        );
        assert!(!np.matches(&flow(17, "10.100.0.1", 30053, "10.244.1.10")));
    }

    #[test]
    fn the_matcher_agrees_with_the_filters() {
        let filters = BTreeSet::from([
            svc(Protocol::Udp, "10.96.0.10", ep("10.244.1.10")),
            svc(Protocol::Udp, "10.96.0.11", ReplySource::Unmapped),
            svc(Protocol::Sctp, "10.96.0.12", ep("10.244.1.12")),
            Filter {
                protocol: Protocol::Udp,
                destination: Destination::NodePort(30053),
                reply_source: ep("10.244.1.10"),
            },
        ]);
        let m = Matcher::new(&filters);
        let dsts = ["10.96.0.10", "10.96.0.11", "10.96.0.12", "10.100.0.1"];
        let replies = [
            "10.244.1.10",
            "10.244.1.12",
            "10.96.0.10",
            "10.96.0.11",
            "10.100.0.1",
        ];
        for proto in [6, 17, 132] {
            for dst in dsts {
                for dport in [53, 54, 30053] {
                    for reply in replies {
                        let f = flow(proto, dst, dport, reply);
                        assert_eq!(m.matches(&f), filters.iter().any(|x| x.matches(&f)), "{f}");
                    }
                }
            }
        }
    }

    #[test]
    fn only_the_families_the_filters_touch_are_dumped() {
        let v4 = BTreeSet::from([svc(Protocol::Udp, "10.96.0.10", ep("10.244.1.10"))]);
        assert_eq!(families(&v4), BTreeSet::from([IpFamily::V4]));
        let np = BTreeSet::from([Filter {
            protocol: Protocol::Udp,
            destination: Destination::NodePort(30053),
            reply_source: ReplySource::Unmapped,
        }]);
        assert_eq!(families(&np), BTreeSet::from([IpFamily::V4, IpFamily::V6]));
    }

    #[test]
    fn store_entries_keep_serving_endpoints_and_skip_tcp_ports() {
        use lb_core::{Conditions, Endpoint, ServicePort};
        let port = |proto| {
            ServicePort::builder("ns", "dns", "p", proto, 53)
                .cluster_ips(["10.96.0.10"])
                .external_ips(["192.0.2.7"])
                .node_port(30053)
                .service_type(lb_core::ServiceType::NodePort)
                .build()
                .unwrap()
        };
        let eps = vec![
            Endpoint::builder("10.244.1.10", 5353).build().unwrap(),
            Endpoint::builder("10.244.1.11", 5353)
                .conditions(Conditions::SERVING_TERMINATING)
                .build()
                .unwrap(),
            Endpoint::builder("10.244.1.12", 5353)
                .conditions(Conditions::NOT_READY)
                .build()
                .unwrap(),
        ];
        let udp = ServiceEntry {
            port: port(Protocol::Udp),
            endpoints: eps.clone(),
        };
        let tcp = ServiceEntry {
            port: port(Protocol::Tcp),
            endpoints: eps,
        };
        let p = ServicePorts::from_entries([&udp, &tcp]);
        assert_eq!(p.len(), 1);
        let s = ServicePortState::from_entry(&udp).unwrap();
        assert_eq!(s.addresses, [ip("10.96.0.10"), ip("192.0.2.7")]);
        assert_eq!(s.node_port, Some(30053));
        assert_eq!(
            s.endpoints,
            BTreeSet::from([ip("10.244.1.10"), ip("10.244.1.11")])
        );
    }

    #[test]
    fn reconciling_deletes_flows_to_endpoints_that_no_longer_serve_and_unmapped_flows_to_served_destinations()
     {
        // Issue 9, point 9: what the whole table shows stale, whatever happened before.
        let r = Reconciler::new(&ports(&[
            (
                "dns",
                state(
                    Protocol::Udp,
                    &["10.96.0.10"],
                    Some(30053),
                    &["10.244.1.11"],
                ),
            ),
            ("empty", state(Protocol::Udp, &["10.96.0.11"], None, &[])),
        ]));
        // DNATed to an endpoint that left (the service address and the node port).
        assert!(r.is_stale(&flow(17, "10.96.0.10", 53, "10.244.1.10")));
        assert!(r.is_stale(&flow(17, "10.100.0.1", 30053, "10.244.1.10")));
        // Not DNATed, but the destination has a serving endpoint now.
        assert!(r.is_stale(&flow(17, "10.96.0.10", 53, "10.96.0.10")));
        assert!(r.is_stale(&flow(17, "10.100.0.1", 30053, "10.100.0.1")));
        // Kept: DNATed to a serving endpoint.
        assert!(!r.is_stale(&flow(17, "10.96.0.10", 53, "10.244.1.11")));
        assert!(!r.is_stale(&flow(17, "10.200.0.1", 30053, "10.244.1.11")));
        // Kept: not DNATed to a destination without endpoints (rejected anew anyway).
        assert!(!r.is_stale(&flow(17, "10.96.0.11", 53, "10.96.0.11")));
        // But DNATed to an endpoint of a destination that has none left: stale.
        assert!(r.is_stale(&flow(17, "10.96.0.11", 53, "10.244.1.10")));
        // Kept: other destinations, other ports, other protocols.
        assert!(!r.is_stale(&flow(17, "10.96.0.12", 53, "10.244.1.10")));
        assert!(!r.is_stale(&flow(17, "10.96.0.10", 54, "10.244.1.10")));
        assert!(!r.is_stale(&flow(6, "10.96.0.10", 53, "10.244.1.10")));
        assert!(!r.is_stale(&flow(132, "10.96.0.10", 53, "10.244.1.10")));
    }

    #[test]
    fn reconciling_judges_a_service_address_before_a_node_port_of_the_same_number() {
        let mut other = state(Protocol::Udp, &["10.96.0.20"], None, &["10.244.1.20"]);
        other.port = 30053;
        let r = Reconciler::new(&ports(&[
            (
                "dns",
                state(
                    Protocol::Udp,
                    &["10.96.0.10"],
                    Some(30053),
                    &["10.244.1.11"],
                ),
            ),
            ("other", other),
        ]));
        assert!(!r.is_stale(&flow(17, "10.96.0.20", 30053, "10.244.1.20")));
        assert!(r.is_stale(&flow(17, "10.96.0.20", 30053, "10.244.1.11")));
        assert_eq!(r.families(), [IpFamily::V4, IpFamily::V6].into());
        assert!(Reconciler::new(&ServicePorts::new()).is_empty());
    }
}
