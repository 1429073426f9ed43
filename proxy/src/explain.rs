//! `explain`: for a destination (address, port, protocol) and a source address, which Service
//! port a connection hits on this node, which endpoints may serve it and why each other one may
//! not, whether it is masqueraded, and whether ClientIP affinity applies.
//!
//! It reads the same snapshot and configuration as the compiler and follows the same rules
//! (`lb_core::categorize` and the compiler's traffic classes), so what it says is what the
//! rules do. Upstream kube-proxy has no such tool (kubernetes#74677).

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use lb_core::{EndpointSet, IpFamily, Protocol, ServicePort, categorize};
use serde::{Deserialize, Serialize};

use crate::compile::{Config, DetectLocal};
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
    /// Whether `from` is an address of this node itself (host-network client).
    pub from_node: bool,
    /// Whether `to` is an address of this node (a NodePort is tried when no Service address
    /// matches).
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

fn family_match(a: &IpAddr, b: &IpAddr) -> bool {
    IpFamily::of(a) == IpFamily::of(b)
}

/// Finds the Service port for `q` and explains what happens.
pub fn explain(snapshot: &Snapshot, config: &Config, q: &Query) -> Explanation {
    let mut found: Option<(&ServicePort, &[lb_core::Endpoint], Entry)> = None;
    for entry in snapshot.services.values() {
        let p = &entry.port;
        if p.protocol() != q.protocol {
            continue;
        }
        let hit = if p.port() == q.port && p.cluster_ips().contains(&q.to) {
            Some(Entry::ClusterIp)
        } else if p.port() == q.port && p.load_balancer_ips().contains(&q.to) {
            Some(Entry::LoadBalancerIp)
        } else if p.port() == q.port && p.external_ips().contains(&q.to) {
            Some(Entry::ExternalIp)
        } else {
            None
        };
        if let Some(e) = hit {
            found = Some((p, &entry.endpoints, e));
            break;
        }
    }
    // A cluster IP is never a node address: no node port there.
    let cluster_ip_owner = snapshot
        .services
        .values()
        .find(|e| e.port.cluster_ips().contains(&q.to));
    if found.is_none() && q.to_node && cluster_ip_owner.is_none() {
        found = snapshot
            .services
            .values()
            .find(|e| e.port.protocol() == q.protocol && e.port.node_port() == Some(q.port))
            .map(|e| (&e.port, e.endpoints.as_slice(), Entry::NodePort));
    }
    let Some((port, all_endpoints, entry)) = found else {
        // Still addressed to a cluster IP after the dispatch: the ruleset rejects it
        // (`service-endpoints-check`), as kube-proxy does, rather than routing it off the node.
        if let Some(owner) = cluster_ip_owner {
            let name = owner.port.name();
            return Explanation {
                outcome: format!(
                    "reject: {} is the cluster IP of {}/{}, which has no port {}/{} (ICMP port unreachable)",
                    q.to, name.namespace, name.name, q.port, q.protocol
                ),
                ..Explanation::nothing()
            };
        }
        // An address of a ServiceCIDR that no Service holds: dropped, as kube-proxy does.
        if let Some(range) = config.service_cidrs.iter().find(|n| n.contains(&q.to)) {
            return Explanation {
                outcome: format!(
                    "drop: {} is in the ServiceCIDR {range} but no Service holds it (an unallocated cluster IP)",
                    q.to
                ),
                ..Explanation::nothing()
            };
        }
        return Explanation {
            service_port: None,
            entry: None,
            endpoint_set: None,
            topology: None,
            endpoints: vec![],
            outcome: "no-match: no Service port has this destination; lb-proxy does not touch it"
                .into(),
            masquerade: "no".into(),
            affinity: None,
            source_ranges: None,
        };
    };
    let family = IpFamily::of(&q.to);
    let endpoints: Vec<_> = all_endpoints
        .iter()
        .filter(|e| IpFamily::of(&e.ip()) == family)
        .cloned()
        .collect();
    let c = categorize(port, &endpoints, &snapshot.node);
    // Pod traffic as the ruleset recognises it (detectLocalMode): by source CIDR, or by the
    // interface a packet arrives on, which an address alone cannot tell.
    let detect = config.for_node(&snapshot.node).detect_local;
    let first_of_family = |cidrs: &[IpNet]| {
        cidrs
            .iter()
            .find(|n| family_match(&n.addr(), &q.to))
            .copied()
    };
    let (pod_cidr, pod_interface) = match &detect {
        DetectLocal::ClusterCidr => (first_of_family(&config.cluster_cidrs), None),
        DetectLocal::NodeCidr(cidrs) => (first_of_family(cidrs), None),
        DetectLocal::BridgeInterface(n) => (None, Some(n.as_str().to_string())),
        DetectLocal::InterfaceNamePrefix(n) => (None, Some(format!("{}*", n.as_str()))),
    };
    let from_pod = pod_cidr.is_some_and(|n| n.contains(&q.from));
    let external = entry != Entry::ClusterIp;
    // The endpoint set, as the compiler's traffic classes choose it.
    let (set, set_why) = if !external {
        if port.internal_policy_local() {
            (
                EndpointSet::Local,
                "internalTrafficPolicy Local: node-local endpoints only",
            )
        } else {
            (
                EndpointSet::Cluster,
                "internalTrafficPolicy Cluster: every usable endpoint",
            )
        }
    } else if port.external_policy_local() {
        if q.from_node {
            (
                EndpointSet::Cluster,
                "externalTrafficPolicy Local, but traffic from the node itself is short-circuited to every endpoint",
            )
        } else if from_pod {
            (
                EndpointSet::Cluster,
                "externalTrafficPolicy Local, but traffic from a pod is short-circuited to every endpoint",
            )
        } else {
            (
                EndpointSet::Local,
                "externalTrafficPolicy Local: node-local endpoints only, client address preserved",
            )
        }
    } else {
        (
            EndpointSet::Cluster,
            "externalTrafficPolicy Cluster: every usable endpoint",
        )
    };
    let verdicts: Vec<EndpointVerdict> = endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let why = c.why_excluded(set, i);
            EndpointVerdict {
                endpoint: e.addr().to_string(),
                node: e.node_name().map(str::to_string),
                eligible: why.is_none(),
                reason: why.map(|r| r.to_string()),
            }
        })
        .collect();
    let eligible = c.indices(set);
    let firewall = (entry == Entry::LoadBalancerIp)
        .then(|| {
            let ranges: Vec<&IpNet> = port
                .load_balancer_source_ranges()
                .iter()
                .filter(|n| family_match(&n.addr(), &q.to))
                .collect();
            (!ranges.is_empty()).then(|| {
                let list = ranges
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                // kube-proxy's allowFromNode (see the compiler): the node reaching a
                // load-balancer IP assigned to itself comes from that IP.
                let from_node_vip = q.from == q.to
                    && ranges
                        .iter()
                        .any(|r| snapshot.node.addresses().iter().any(|a| r.contains(a)));
                if from_node_vip || ranges.iter().any(|r| r.contains(&q.from)) {
                    format!("allowed: {} is in [{list}]", q.from)
                } else {
                    format!("blocked: {} is not in [{list}]", q.from)
                }
            })
        })
        .flatten();
    let outcome = if firewall
        .as_deref()
        .is_some_and(|f| f.starts_with("blocked"))
    {
        "firewall-drop: dropped before DNAT by loadBalancerSourceRanges".to_string()
    } else if !eligible.is_empty() {
        format!(
            "dnat: to one of {} endpoints, chosen uniformly at random",
            eligible.len()
        )
    } else if c.has_any_endpoints() {
        "drop: the Service has endpoints, but none this traffic may use (Local policy)".into()
    } else {
        "reject: the Service has no usable endpoints (ICMP port unreachable)".into()
    };
    let hairpin = eligible
        .iter()
        .any(|&i| endpoints[i as usize].ip() == q.from);
    let masquerade = if !outcome.starts_with("dnat") {
        "no: the connection is not forwarded".to_string()
    } else if external && !port.external_policy_local() {
        "yes: externalTrafficPolicy Cluster masquerades external traffic".into()
    } else if external && q.from_node {
        "yes: traffic from the node itself to an eTP Local address is masqueraded".into()
    } else if !external && config.masquerade_all {
        "yes: masqueradeAll".into()
    } else if !external && let Some(cidr) = pod_cidr.filter(|_| !from_pod) {
        let which = if matches!(detect, DetectLocal::NodeCidr(_)) {
            "node's pod CIDR"
        } else {
            "cluster CIDR"
        };
        format!("yes: the source is outside the {which} ({cidr})")
    } else if !external && let Some(interface) = &pod_interface {
        format!("yes, unless the connection arrives on interface {interface} (a pod's)")
    } else if hairpin {
        "only if the endpoint chosen is the client itself (hairpin)".into()
    } else {
        "no: the backend sees the client's address".into()
    };
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
        outcome,
        masquerade,
        affinity,
        source_ranges: firewall,
    }
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
