//! `explain`: for a destination (address, port, protocol) and a source address, which Service
//! port a connection hits on this node, which endpoints may serve it and why each other one may
//! not, whether it is masqueraded, and whether ClientIP affinity applies.
//!
//! The traffic decisions come from the ruleset itself: [`answer`] traces a packet through the
//! compiled (or, from the daemon, the programmed) ruleset with [`crate::nft::trace`], so what
//! it says is what the rules do — which endpoints are reachable, DNAT, reject or drop,
//! masquerade, loadBalancerSourceRanges. This module only presents the trace: it finds the
//! Service port the trace dispatched through (by the element the rules found) and the source
//! the rules recognised (the node, a pod, elsewhere), names the endpoint set and the
//! masquerade reason with `lb_core::traffic::classify` (the function the compiler wrote the
//! rules from), and gives the reason for every endpoint left out from `lb_core::categorize`.
//! It holds no Kubernetes traffic rule of its own; where the trace and the class disagree (a
//! ruleset read back from the kernel that another program changed, a compiler bug), the trace
//! wins and the answer says what the traffic policy would have done. The objects it reads are
//! named by the compiler's layout ([`crate::compile::names`]). Upstream kube-proxy has no such
//! tool (kubernetes#74677).
//!
//! What the trace is told about the node (the answers of `fib … type local`): the Node
//! object's addresses, the destination when [`Query::to_node`] says it may be a node address
//! (never a cluster IP: those are virtual), and the source exactly when [`Query::from_node`].

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use lb_core::traffic::{self, Destination, MasqueradeReason, Source, TrafficClass};
use lb_core::{EndpointSet, IpFamily, Protocol, ServicePort, categorize};
use serde::{Deserialize, Serialize};

use crate::compile::Config;
use crate::nft::ir::{CmpOp, Expr, FibAddr, MarkOp, MetaKey, Payload, Rule, Ruleset, Stmt, Value};
use crate::nft::trace::{self, Fate, Host, Origin, Outcome, Packet, Path, Step, Trace, TraceError};
use crate::store::Snapshot;

/// What is being asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Destination address (cluster IP, external IP, load-balancer IP or a node address).
    pub to: IpAddr,
    /// Destination port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// Source address of the client.
    pub from: IpAddr,
    /// Whether `from` is an address of this node itself (host-network client): the packet is
    /// then generated locally.
    pub from_node: bool,
    /// Whether `to` may be an address of this node (so node ports are served on it), besides
    /// the Node object's addresses. A cluster IP never is.
    pub to_node: bool,
}

/// How the destination was matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Entry {
    /// A cluster IP.
    ClusterIp,
    /// An external IP.
    ExternalIp,
    /// A load-balancer ingress IP.
    LoadBalancerIp,
    /// A node port on a node address.
    NodePort,
}

/// One endpoint and its verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointVerdict {
    /// `ip:port`.
    pub endpoint: String,
    /// `nodeName`.
    pub node: Option<String>,
    /// Whether it may serve this connection.
    pub eligible: bool,
    /// Why not, when it may not.
    pub reason: Option<String>,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// The Service port hit (`ns/name:port`), or `None` when nothing matches.
    pub service_port: Option<String>,
    /// How the destination matched.
    pub entry: Option<Entry>,
    /// Which endpoint set serves this traffic (`cluster` or `local`) and why.
    pub endpoint_set: Option<String>,
    /// The topology decision for the cluster set.
    pub topology: Option<String>,
    /// Every endpoint with its verdict.
    pub endpoints: Vec<EndpointVerdict>,
    /// What happens to the connection: `dnat`, `reject`, `drop`, `firewall-drop`, `no-match`.
    pub outcome: String,
    /// Whether the source address is masqueraded (and why).
    pub masquerade: String,
    /// ClientIP affinity, if any.
    pub affinity: Option<String>,
    /// `loadBalancerSourceRanges` verdict, if any apply.
    pub source_ranges: Option<String>,
}

/// The compiler's objects this module reads in a trace, grouped by what they tell: the
/// names themselves are the compiler's ([`crate::compile::names`]), defined once in its
/// layout. A test checks that each exists in a compiled table, so an object the compiler stops
/// creating cannot silently blind `explain`.
pub mod names {
    use crate::compile::names as n;

    pub use n::{
        CLUSTER_IPS, FIREWALL_CHECK, HAIRPIN, NO_ENDPOINT_NODEPORTS, NO_ENDPOINT_SERVICES,
        SERVICE_CIDRS, SERVICES,
    };

    /// Verdict maps that dispatch a service address.
    pub const ADDRESS_DISPATCH: &[&str] = &[n::SERVICE_IPS, n::EXTERNAL_LOCAL_IPS];
    /// Verdict maps that dispatch a node port.
    pub const NODEPORT_DISPATCH: &[&str] = &[n::SERVICE_NODEPORTS, n::NODEPORT_EXTERNAL_LOCAL];
    /// Maps that send external traffic of eTP Local Services to node-local endpoints.
    pub const LOCAL_DISPATCH: &[&str] = &[
        n::EXTERNAL_LOCAL_IPS,
        n::NODEPORT_EXTERNAL_LOCAL,
        n::ENDPOINTS_LOCAL,
        n::NODEPORT_ENDPOINTS_LOCAL,
    ];
    /// Maps that send external traffic to the cluster endpoint set (every usable endpoint:
    /// eTP Cluster, or the short-circuit of eTP Local). For a cluster IP they hold the set its
    /// class chose, so they tell nothing about the set.
    pub const CLUSTER_DISPATCH: &[&str] = &[
        n::SERVICE_IPS,
        n::SERVICE_NODEPORTS,
        n::ENDPOINTS,
        n::NODEPORT_ENDPOINTS,
    ];
    /// Masquerade marks for eTP Cluster external addresses and node ports.
    pub const MASQ_CLUSTER: &[&str] = &[n::MASQ_IPS, n::MASQ_NODEPORTS];
    /// Masquerade marks for the node's own traffic to eTP Local addresses and node ports.
    pub const MASQ_LOCAL_SOURCE: &[&str] =
        &[n::MASQ_LOCAL_SOURCE_IPS, n::MASQ_LOCAL_SOURCE_NODEPORTS];
}

/// Compiles `snapshot` with `config` in process and explains `q` from the trace of that
/// ruleset (the manifests' `explain`).
pub fn explain(snapshot: &Snapshot, config: &Config, q: &Query) -> Explanation {
    let mut rs = Ruleset::default();
    for family in [IpFamily::V4, IpFamily::V6] {
        let (id, table, _) = crate::compile::compile(snapshot, config, family);
        rs.tables.insert(id, table);
    }
    answer_or_report(&rs, snapshot, config, q)
}

/// Why the tables could not be read back from the kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelReadError {
    /// `nft` could not be started.
    #[error("cannot run `nft -j list table {family} {table}`")]
    Spawn {
        /// Family keyword.
        family: &'static str,
        /// Table name.
        table: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `nft` failed (no such table, no permission).
    #[error("`nft -j list table {family} {table}` failed: {stderr}")]
    Failed {
        /// Family keyword.
        family: &'static str,
        /// Table name.
        table: String,
        /// What nft said.
        stderr: String,
    },
    /// Its output is not the IR's subset.
    #[error("reading `nft -j list table {family} {table}`")]
    Json {
        /// Family keyword.
        family: &'static str,
        /// Table name.
        table: String,
        /// Why.
        #[source]
        source: crate::nft::json::JsonError,
    },
}

/// The tables `table` (`ip` and `ip6`) as the kernel of this network namespace holds them,
/// read with `nft -j list table` (needs the `nft` binary and `CAP_NET_ADMIN`). nft's JSON is
/// lossy in known ways (see [`crate::nft::json`]): a `ct original proto-dst` field is missing
/// from set elements, so the traffic-counting lookups never match — which changes nothing
/// the tracer reports. Dynamic maps hold what the data path added (affinity entries), so a
/// client with an affinity entry is traced to its endpoint. A family whose table does not
/// exist is an error.
pub fn kernel_ruleset(table: &str) -> Result<Ruleset, KernelReadError> {
    let mut rs = Ruleset::default();
    for family in ["ip", "ip6"] {
        let out = std::process::Command::new("nft")
            .args(["-j", "list", "table", family, table])
            .output()
            .map_err(|source| KernelReadError::Spawn {
                family,
                table: table.to_string(),
                source,
            })?;
        if !out.status.success() {
            return Err(KernelReadError::Failed {
                family,
                table: table.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let listed = crate::nft::json::from_nft_json(&String::from_utf8_lossy(&out.stdout))
            .map_err(|source| KernelReadError::Json {
                family,
                table: table.to_string(),
                source,
            })?;
        rs.tables.extend(listed.tables);
    }
    Ok(rs)
}

/// As [`answer`], a trace failure reported in the explanation's outcome (for the daemon,
/// whose answer is a page).
pub fn answer_or_report(
    ruleset: &Ruleset,
    snapshot: &Snapshot,
    config: &Config,
    q: &Query,
) -> Explanation {
    answer(ruleset, snapshot, config, q).unwrap_or_else(|e| Explanation {
        outcome: format!("cannot trace the ruleset: {e}"),
        ..Explanation::nothing()
    })
}

/// Explains `q` by tracing it through `ruleset` (compiled from `snapshot` with `config`, or
/// the one the daemon programmed from them).
pub fn answer(
    ruleset: &Ruleset,
    snapshot: &Snapshot,
    config: &Config,
    q: &Query,
) -> Result<Explanation, TraceError> {
    let config = config.for_node(&snapshot.node);
    let is_cluster_ip = snapshot
        .services
        .values()
        .any(|e| e.port.cluster_ips().contains(&q.to));
    let mut local: BTreeSet<IpAddr> = snapshot.node.addresses().iter().copied().collect();
    // `from_node` says whether the source is one of the node's addresses, either way.
    if q.from_node {
        local.insert(q.from);
    } else {
        local.remove(&q.from);
    }
    if q.to_node && !is_cluster_ip {
        local.insert(q.to);
    }
    let host = Host { local };
    let packet = |iif: Option<String>| {
        let origin = if q.from_node {
            Origin::Local { oif: None }
        } else {
            Origin::Arriving { iif }
        };
        Packet::new(q.from, q.to, proto_number(q.protocol), q.port, origin)
    };
    // Pod traffic told by interface: trace a packet from a non-pod interface, and say when
    // one from a pod's would be masqueraded differently.
    let (t, unless_pod) = match &pod_interface(ruleset) {
        Some((shown, pod_name)) if !q.from_node => {
            // A name that cannot be a pod's: its first letter differs from the pod name's.
            let other = if shown.starts_with('x') {
                "y-outside"
            } else {
                "x-outside"
            };
            let t = trace::trace(ruleset, &host, &packet(Some(other.to_string())))?;
            let pod = trace::trace(ruleset, &host, &packet(Some(pod_name.clone())))?;
            let differs = pod.masquerade_always() != t.masquerade_always();
            (t, differs.then(|| shown.clone()))
        }
        _ => (trace::trace(ruleset, &host, &packet(None))?, None),
    };
    Ok(present(snapshot, &config, q, &t, unless_pod))
}

/// The interface the rules recognise pods by (`detectLocalMode` `BridgeInterface` or
/// `InterfaceNamePrefix`), read from the dispatch rules of `ruleset`: as shown (`veth*`), and
/// a name that is a pod's (`veth0`). `None` when pods are told by their address, or not at all.
fn pod_interface(ruleset: &Ruleset) -> Option<(String, String)> {
    ruleset
        .tables
        .values()
        .filter_map(|t| t.chains.get(names::SERVICES))
        .flat_map(|c| &c.rules)
        .flat_map(|r| &r.stmts)
        .find_map(|st| match st {
            Stmt::Match {
                left: Expr::Meta(MetaKey::IifName),
                op: CmpOp::Eq,
                right: Value::IfName(n),
            } => Some(if n.is_prefix() {
                (format!("{}*", n.as_str()), format!("{}0", n.as_str()))
            } else {
                (n.as_str().to_string(), n.as_str().to_string())
            }),
            _ => None,
        })
}

/// Where a traced connection comes from, as the rules that matched show it: the node itself
/// when one needed `fib saddr type local`, a pod when one needed the local-traffic detector's
/// match (source CIDR or interface, compared with `==`), else elsewhere. Only the `services`
/// chain tells sources apart, and the node's rules come first there, as in
/// [`lb_core::traffic`] (a node address inside the pod CIDR is the node).
fn traced_source(path: &Path) -> Source {
    let mut source = Source::Elsewhere;
    for (chain, rule) in path.rules() {
        if chain != names::SERVICES {
            continue;
        }
        for st in &rule.stmts {
            match st {
                Stmt::FibLocal(FibAddr::Saddr) => return Source::Node,
                Stmt::Match {
                    left:
                        Expr::Meta(MetaKey::IifName)
                        | Expr::Payload(Payload::IpSaddr | Payload::Ip6Saddr),
                    op: CmpOp::Eq,
                    ..
                } => source = Source::Pod,
                _ => {}
            }
        }
    }
    source
}

/// The kind of destination the trace dispatched through.
fn destination(entry: Entry) -> Destination {
    match entry {
        Entry::ClusterIp => Destination::ClusterIp,
        Entry::ExternalIp => Destination::ExternalIp,
        Entry::LoadBalancerIp => Destination::LoadBalancerIp,
        Entry::NodePort => Destination::NodePort,
    }
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

/// How a trace dispatched: the Service port and entry, found by the element the rules hit.
fn dispatched<'s>(
    snapshot: &'s Snapshot,
    q: &Query,
    t: &Trace,
) -> Option<(&'s ServicePort, &'s [lb_core::Endpoint], Entry)> {
    let path = t.paths.first()?;
    for (_, hit) in path.hits() {
        let set = hit.set.as_str();
        let by_address =
            names::ADDRESS_DISPATCH.contains(&set) || set == names::NO_ENDPOINT_SERVICES;
        let by_nodeport =
            names::NODEPORT_DISPATCH.contains(&set) || set == names::NO_ENDPOINT_NODEPORTS;
        if by_address {
            let (Some(addr), Some(Value::Port(port))) = (value_ip(&hit.key[0]), hit.key.get(2))
            else {
                continue;
            };
            for e in snapshot.services.values() {
                let p = &e.port;
                if p.protocol() != q.protocol || p.port() != *port {
                    continue;
                }
                let entry = if p.cluster_ips().contains(&addr) {
                    Entry::ClusterIp
                } else if p.load_balancer_ips().contains(&addr) {
                    Entry::LoadBalancerIp
                } else if p.external_ips().contains(&addr) {
                    Entry::ExternalIp
                } else {
                    continue;
                };
                return Some((p, e.endpoints.as_slice(), entry));
            }
        } else if by_nodeport {
            let Some(Value::Port(port)) = hit.key.get(1) else {
                continue;
            };
            return snapshot
                .services
                .values()
                .find(|e| e.port.protocol() == q.protocol && e.port.node_port() == Some(*port))
                .map(|e| (&e.port, e.endpoints.as_slice(), Entry::NodePort));
        }
    }
    None
}

fn value_ip(v: &Value) -> Option<IpAddr> {
    match v {
        Value::Ipv4(a) => Some(IpAddr::V4(*a)),
        Value::Ipv6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// The last rule a path ran: the one that ended it, when it did not just fall through.
fn last_rule(p: &Path) -> Option<(&str, &Rule, Vec<&str>)> {
    p.steps.iter().rev().find_map(|s| match s {
        Step::Rule {
            chain, rule, hits, ..
        } => Some((
            chain.as_str(),
            rule,
            hits.iter().map(|h| h.set.as_str()).collect(),
        )),
        _ => None,
    })
}

/// Turns a trace into the answer.
fn present(
    snapshot: &Snapshot,
    config: &Config,
    q: &Query,
    t: &Trace,
    unless_pod: Option<String>,
) -> Explanation {
    let outcome = t.outcome();
    let first = t.paths.first();
    let ended_by = first.and_then(last_rule);
    let ended_in = |chain: &str| ended_by.as_ref().is_some_and(|(c, _, _)| *c == chain);
    let ended_on = |set: &str| ended_by.as_ref().is_some_and(|(_, _, s)| s.contains(&set));
    let Some((port, all_endpoints, entry)) = dispatched(snapshot, q, t) else {
        // Nothing dispatched: the rules of the filter hooks, or nothing at all.
        let text = match &outcome {
            Outcome::Reject if ended_on(names::CLUSTER_IPS) => {
                let owner = snapshot
                    .services
                    .values()
                    .find(|e| e.port.cluster_ips().contains(&q.to))
                    .map(|e| {
                        let n = e.port.name();
                        format!("{}/{}", n.namespace, n.name)
                    })
                    .unwrap_or_else(|| "a Service".into());
                format!(
                    "reject: {} is the cluster IP of {owner}, which has no port {}/{} (ICMP port unreachable)",
                    q.to, q.port, q.protocol
                )
            }
            Outcome::Drop if ended_on(names::SERVICE_CIDRS) => {
                let range = first
                    .and_then(|p| p.hits().find(|(_, h)| h.set == names::SERVICE_CIDRS))
                    .and_then(|(_, h)| h.key.first().map(crate::nft::render::value))
                    .unwrap_or_default();
                format!(
                    "drop: {} is in the ServiceCIDR {range} but no Service holds it (an unallocated cluster IP)",
                    q.to
                )
            }
            Outcome::Accept => {
                "no-match: no Service port has this destination; lb-proxy does not touch it"
                    .to_string()
            }
            other => generic_outcome(other, ended_by.as_ref().map(|(c, r, _)| (*c, *r))),
        };
        return Explanation {
            outcome: text,
            ..Explanation::nothing()
        };
    };
    let family = IpFamily::of(&q.to);
    let endpoints: Vec<_> = all_endpoints
        .iter()
        .filter(|e| IpFamily::of(&e.ip()) == family)
        .cloned()
        .collect();
    let c = categorize(port, &endpoints, &snapshot.node);
    // Which of lb-core's sets serves this traffic and why: the traffic class of the entry
    // the rules dispatched through and the source they recognised. The trace is the arbiter:
    // where it dispatched external traffic to the other set, and that set holds other
    // endpoints, the rules win and the answer says so.
    let source = first.map_or(Source::Elsewhere, traced_source);
    let class = traffic::classify(
        port,
        destination(entry),
        source,
        config.masquerading_of(family),
    );
    let via = |maps: &[&str]| {
        first.is_some_and(|p| p.hits().any(|(_, h)| maps.contains(&h.set.as_str())))
    };
    let traced_set = if entry == Entry::ClusterIp {
        None
    } else if via(names::LOCAL_DISPATCH) {
        Some(EndpointSet::Local)
    } else if via(names::CLUSTER_DISPATCH) {
        Some(EndpointSet::Cluster)
    } else {
        None
    };
    let (set, set_why) = match traced_set {
        Some(traced)
            if traced != class.endpoints && c.indices(traced) != c.indices(class.endpoints) =>
        {
            (
                traced,
                format!(
                    "{}, as the rules dispatch it, although the traffic policy says \"{}\"",
                    if traced == EndpointSet::Local {
                        "node-local endpoints only"
                    } else {
                        "every usable endpoint"
                    },
                    class.reason
                ),
            )
        }
        _ => (class.endpoints, class.reason.to_string()),
    };
    let reachable: BTreeSet<SocketAddr> = match &outcome {
        Outcome::Dnat(to) => to.clone(),
        Outcome::Mixed(ends) => ends.iter().filter_map(|e| e.1).collect(),
        _ => BTreeSet::new(),
    };
    let fate = match &outcome {
        Outcome::Drop => Some("dropped"),
        Outcome::Reject => Some("rejected"),
        _ => None,
    };
    let verdicts: Vec<EndpointVerdict> = endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let eligible = reachable.contains(&e.addr());
            let reason = (!eligible).then(|| match (c.why_excluded(set, i), fate) {
                (Some(r), _) => r.to_string(),
                (None, Some(f)) => format!("usable, but this connection is {f} first"),
                (None, None) => "usable, but the rules do not send this connection to it".into(),
            });
            EndpointVerdict {
                endpoint: e.addr().to_string(),
                node: e.node_name().map(str::to_string),
                eligible,
                reason,
            }
        })
        .collect();
    let firewall_drop = matches!(outcome, Outcome::Drop) && ended_in(names::FIREWALL_CHECK);
    let source_ranges = (entry == Entry::LoadBalancerIp)
        .then(|| {
            let ranges: Vec<&IpNet> = port
                .load_balancer_source_ranges()
                .iter()
                .filter(|n| IpFamily::of(&n.addr()) == family)
                .collect();
            (!ranges.is_empty()).then(|| {
                let list = ranges
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                let inside = ranges.iter().any(|r| r.contains(&q.from));
                match (firewall_drop, inside) {
                    (true, _) => format!("blocked: {} is not in [{list}]", q.from),
                    (false, true) => format!("allowed: {} is in [{list}]", q.from),
                    // kube-proxy's allowFromNode (see the compiler).
                    (false, false) => format!(
                        "allowed: {} is not in [{list}], but the rules admit it (the node reaching its own load-balancer IP)",
                        q.from
                    ),
                }
            })
        })
        .flatten();
    let outcome_text = match &outcome {
        _ if firewall_drop => {
            "firewall-drop: dropped before DNAT by loadBalancerSourceRanges".to_string()
        }
        Outcome::Dnat(to) => format!(
            "dnat: to one of {} endpoints, chosen {}",
            to.len(),
            if t.chose_by_hash() {
                "by a hash of the client address (ClientIP affinity)"
            } else {
                "uniformly at random"
            }
        ),
        Outcome::Drop
            if ended_on(names::NO_ENDPOINT_SERVICES) || ended_on(names::NO_ENDPOINT_NODEPORTS) =>
        {
            "drop: the Service has endpoints, but none this traffic may use (Local policy)".into()
        }
        Outcome::Reject => {
            "reject: the Service has no usable endpoints (ICMP port unreachable)".into()
        }
        other => generic_outcome(other, ended_by.as_ref().map(|(c, r, _)| (*c, *r))),
    };
    let masquerade = masquerade_text(config, &class, q, t, &outcome, unless_pod);
    let affinity = port.session_affinity().timeout().map(|t| {
        format!(
            "ClientIP: connections from {} stick to one endpoint until {} s pass without a new one",
            q.from,
            t.as_secs()
        )
    });
    Explanation {
        service_port: Some(port.name().to_string()),
        entry: Some(entry),
        endpoint_set: Some(format!(
            "{}: {set_why}",
            if set == EndpointSet::Local {
                "local"
            } else {
                "cluster"
            }
        )),
        topology: (set == EndpointSet::Cluster).then(|| c.topology().to_string()),
        endpoints: verdicts,
        outcome: outcome_text,
        masquerade,
        affinity,
        source_ranges,
    }
}

/// An outcome no specific wording covers: the class and the rule that ended it.
fn generic_outcome(o: &Outcome, by: Option<(&str, &Rule)>) -> String {
    let by = by
        .map(|(c, r)| format!(" (chain {c}: {})", crate::nft::render::rule(r)))
        .unwrap_or_default();
    match o {
        Outcome::Dnat(to) => format!("dnat: to one of {} endpoints", to.len()),
        Outcome::Drop => format!("drop{by}"),
        Outcome::Reject => format!("reject{by}"),
        Outcome::Accept => "accept: not DNATed".into(),
        Outcome::Mixed(ends) => {
            let list: Vec<String> = ends
                .iter()
                .map(|(f, d)| {
                    let f = match f {
                        Fate::Accept => "accept",
                        Fate::Drop => "drop",
                        Fate::Reject => "reject",
                    };
                    match d {
                        Some(d) => format!("{f} via {d}"),
                        None => f.to_string(),
                    }
                })
                .collect();
            format!("mixed: the choices end differently: {}", list.join(", "))
        }
    }
}

/// Whether the connection is masqueraded and why: the reason of its traffic class
/// ([`TrafficClass::masquerade`]), confirmed by the rule that set the mark in the trace. The
/// trace is the arbiter: where the rules masquerade a connection the class does not (or not
/// one it does, or for another reason), the answer says what the rules do and what the traffic
/// policy says. Hairpin connections are masqueraded whatever the class.
fn masquerade_text(
    config: &Config,
    class: &TrafficClass,
    q: &Query,
    t: &Trace,
    outcome: &Outcome,
    unless_pod: Option<String>,
) -> String {
    if !matches!(outcome, Outcome::Dnat(_)) {
        return "no: the connection is not forwarded".into();
    }
    if let Some(interface) = unless_pod {
        return format!("yes, unless the connection arrives on interface {interface} (a pod's)");
    }
    if !t.masquerade_sometimes() {
        let text = "no: the backend sees the client's address";
        return match class.masquerade {
            None => text.into(),
            Some(r) => format!(
                "{text}, as the rules do it, although the traffic policy says to masquerade (\"{r}\")"
            ),
        };
    }
    if !t.masquerade_always() {
        let targets = t.masqueraded_targets();
        if targets.iter().all(|a| a.ip() == q.from) {
            return "only if the endpoint chosen is the client itself (hairpin)".into();
        }
        let list: Vec<String> = targets.iter().map(|a| a.to_string()).collect();
        return format!("only if the endpoint chosen is one of {}", list.join(", "));
    }
    let Some(path) = t.paths.first() else {
        return "yes".into();
    };
    // The rule that asked for masquerading: the first that set the mark, else the hairpin
    // rule that masqueraded directly.
    let marked = path.steps.iter().find_map(|s| match s {
        Step::Rule { rule, hits, .. }
            if rule
                .stmts
                .iter()
                .any(|st| matches!(st, Stmt::SetMark(MarkOp::Or(_)))) =>
        {
            Some((rule, hits))
        }
        _ => None,
    });
    let Some((rule, hits)) = marked else {
        return "yes: the endpoint is the client itself (hairpin)".into();
    };
    // Which reason the marking rule stands for, by the map it found or the detector match it
    // needed; the text gives the detector's CIDR or interface, which the reason does not.
    let on = |sets: &[&str]| hits.iter().any(|h| sets.contains(&h.set.as_str()));
    let not_pod = rule.stmts.iter().find_map(|st| match st {
        Stmt::Match {
            left,
            op: CmpOp::Ne,
            right,
        } if *left != Expr::Meta(MetaKey::L4Proto) => Some((left, right)),
        _ => None,
    });
    let reason = |r: MasqueradeReason| (Some(r), format!("yes: {r}"));
    let (traced, text) = if on(names::MASQ_CLUSTER) {
        reason(MasqueradeReason::ExternalCluster)
    } else if on(names::MASQ_LOCAL_SOURCE) {
        reason(MasqueradeReason::FromNode)
    } else {
        match not_pod {
            Some((Expr::Meta(MetaKey::IifName), Value::IfName(n))) => (
                Some(MasqueradeReason::NotFromPod),
                format!(
                    "yes: the connection does not arrive on interface {}{} (a pod's)",
                    n.as_str(),
                    if n.is_prefix() { "*" } else { "" }
                ),
            ),
            Some((_, cidr)) => {
                let which = if is_cluster_cidr(config, cidr) {
                    "cluster CIDR"
                } else {
                    "node's pod CIDR"
                };
                (
                    Some(MasqueradeReason::NotFromPod),
                    format!(
                        "yes: the source is outside the {which} ({})",
                        crate::nft::render::value(cidr)
                    ),
                )
            }
            None if on(&[names::CLUSTER_IPS]) => reason(MasqueradeReason::MasqueradeAll),
            None => (
                None,
                format!("yes (rule: {})", crate::nft::render::rule(rule)),
            ),
        }
    };
    match class.masquerade {
        Some(r) if traced == Some(r) => text,
        Some(r) => format!(
            "{text}, as the rules do it, although the traffic policy gives another reason (\"{r}\")"
        ),
        None => format!(
            "{text}, as the rules do it, although the traffic policy says not to masquerade"
        ),
    }
}

/// Whether `cidr`, a detector's match in the rules, is one of the configured cluster CIDRs
/// (else it is the node's pod CIDR: `detectLocalMode: NodeCIDR`).
fn is_cluster_cidr(config: &Config, cidr: &Value) -> bool {
    let net = match cidr {
        Value::Ipv4Net(n) => IpNet::V4(*n),
        Value::Ipv6Net(n) => IpNet::V6(*n),
        _ => return false,
    };
    config.cluster_cidrs.contains(&net)
}

impl Explanation {
    /// No Service port, no endpoints: the base of the answers that name none.
    fn nothing() -> Self {
        Explanation {
            service_port: None,
            entry: None,
            endpoint_set: None,
            topology: None,
            endpoints: vec![],
            outcome: String::new(),
            masquerade: "no".into(),
            affinity: None,
            source_ranges: None,
        }
    }

    /// The answer of a daemon that has not programmed the node yet: what it knows so far may
    /// not be what the kernel does.
    pub fn not_synced() -> Self {
        Explanation {
            outcome: "not synced yet: lb-proxy has not programmed this node since it started \
                      (still listing the cluster's objects); ask again after the first sync"
                .into(),
            ..Explanation::nothing()
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(sp) = &self.service_port else {
            return writeln!(f, "{}", self.outcome);
        };
        let entry = match self.entry {
            Some(Entry::ClusterIp) => "cluster IP",
            Some(Entry::ExternalIp) => "external IP",
            Some(Entry::LoadBalancerIp) => "load-balancer IP",
            Some(Entry::NodePort) => "node port",
            None => "?",
        };
        writeln!(f, "service port: {sp} (via its {entry})")?;
        if let Some(s) = &self.endpoint_set {
            writeln!(f, "endpoints:    {s}")?;
        }
        if let Some(t) = &self.topology {
            writeln!(f, "topology:     {t}")?;
        }
        for e in &self.endpoints {
            let node = e.node.as_deref().unwrap_or("-");
            match &e.reason {
                None => writeln!(f, "  ✓ {:<24} node {node}", e.endpoint)?,
                Some(r) => writeln!(f, "  ✗ {:<24} node {node}: {r}", e.endpoint)?,
            }
        }
        if let Some(r) = &self.source_ranges {
            writeln!(f, "source ranges: {r}")?;
        }
        writeln!(f, "outcome:      {}", self.outcome)?;
        writeln!(f, "masquerade:   {}", self.masquerade)?;
        writeln!(
            f,
            "affinity:     {}",
            self.affinity.as_deref().unwrap_or("none")
        )
    }
}

/// Parses `ADDR:PORT[/PROTO]` (IPv6 as `[ADDR]:PORT`), protocol defaulting to TCP.
pub fn parse_destination(s: &str) -> Result<(IpAddr, u16, Protocol), String> {
    let (addr, proto) = match s.rsplit_once('/') {
        Some((a, p)) => (a, p.parse::<Protocol>()?),
        None => (s, Protocol::Tcp),
    };
    let sa: std::net::SocketAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not ADDR:PORT (IPv6: [ADDR]:PORT)"))?;
    if sa.port() == 0 {
        return Err("port 0 is not a valid destination".into());
    }
    Ok((sa.ip(), sa.port(), proto))
}
