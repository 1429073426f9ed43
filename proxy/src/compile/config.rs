//! The compiler's configuration: how the node's traffic is classified (cluster CIDRs,
//! `detectLocalMode`, masquerading) and where NodePorts listen (`nodePortAddresses`).

use ipnet::IpNet;
use lb_core::traffic::Masquerading;
use lb_core::{IpFamily, Node};

use crate::nft::ir::{Expr, IfName, MetaKey, Value};

use super::layout::{Fam, TABLE, net_value, pl};

/// How the node's traffic is classified and where NodePorts listen.
#[derive(Debug, Clone)]
pub struct Config {
    /// The pods' CIDRs (kube-proxy's `clusterCIDR`): sources inside are "in the cluster".
    /// Traffic from outside them to a cluster IP is masqueraded, and pod traffic to an external
    /// address of an eTP Local Service is short-circuited to all endpoints.
    pub cluster_cidrs: Vec<IpNet>,
    /// Masquerade every connection to a cluster IP.
    pub masquerade_all: bool,
    /// The mark bit that requests masquerading (kube-proxy's `masqueradeBit`, default 14).
    pub masquerade_bit: u8,
    /// Where NodePorts are served (kube-proxy's `nodePortAddresses`). [`NodePortAddresses::Primary`]
    /// must be resolved against the Node with [`Config::for_node`] before compiling.
    pub nodeport_addresses: NodePortAddresses,
    /// The ranges cluster IPs are allocated from (the `networking.k8s.io/v1` ServiceCIDRs, or
    /// `--service-cidr`): traffic to an address inside them that no Service holds is dropped,
    /// as kube-proxy does, instead of being routed off the node. Empty: nothing dropped.
    pub service_cidrs: Vec<IpNet>,
    /// Name of the nftables tables.
    pub table: String,
    /// How traffic from pods is told apart (kube-proxy's `detectLocalMode`).
    pub detect_local: DetectLocal,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cluster_cidrs: Vec::new(),
            masquerade_all: false,
            masquerade_bit: 14,
            nodeport_addresses: NodePortAddresses::Primary,
            service_cidrs: Vec::new(),
            table: TABLE.to_string(),
            detect_local: DetectLocal::ClusterCidr,
        }
    }
}

/// How traffic from pods ("local traffic") is recognised: kube-proxy's `detectLocalMode`
/// (`pkg/proxy/util/localdetector.go`). Pod traffic to a cluster IP is not masqueraded, and
/// pod traffic to an external address of an `externalTrafficPolicy: Local` Service is
/// short-circuited to every endpoint; everything else counts as coming from outside.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DetectLocal {
    /// `ClusterCIDR` (the default): sources in [`Config::cluster_cidrs`] (the first of each
    /// family). No cluster CIDR: nothing is local.
    #[default]
    ClusterCidr,
    /// `NodeCIDR`: sources in this node's pod CIDRs (the Node's `spec.podCIDRs`), which
    /// [`Config::for_node`] fills in from the Node, so a change of the Node follows at the
    /// next sync. A Node without pod CIDRs: nothing is local.
    NodeCidr(Vec<IpNet>),
    /// `BridgeInterface`: packets that arrive on this bridge (`iifname "cbr0"`).
    BridgeInterface(IfName),
    /// `InterfaceNamePrefix`: packets that arrive on an interface whose name starts with this
    /// prefix (`iifname "veth*"`).
    InterfaceNamePrefix(IfName),
}

impl Config {
    pub(super) fn mark(&self) -> u32 {
        1u32 << self.masquerade_bit.min(31)
    }

    /// This configuration with [`NodePortAddresses::Primary`] resolved for `node`: its
    /// primary addresses (one per family, from the Node's `status.addresses`), as kube-proxy
    /// resolves `primary`. A node whose addresses are not known (no Node object, or one
    /// without InternalIP/ExternalIP) serves NodePorts on every local address, as before
    /// `primary` existed, and the caller should say so ([`Config::node_port_fallback`]).
    /// Node address changes reach the dataplane because a Node change is a full sync.
    /// With `detectLocalMode: NodeCIDR`, the node's pod CIDRs are filled in too.
    pub fn for_node(&self, node: &Node) -> Config {
        let mut c = self.clone();
        if c.nodeport_addresses == NodePortAddresses::Primary {
            c.nodeport_addresses = if node.addresses().is_empty() {
                NodePortAddresses::All
            } else {
                NodePortAddresses::Cidrs(node.addresses().iter().map(|&a| IpNet::from(a)).collect())
            };
        }
        if let DetectLocal::NodeCidr(cidrs) = &mut c.detect_local {
            *cidrs = node.pod_cidrs().to_vec();
        }
        c
    }

    /// How pod traffic of family `f` is matched: `(what, value)` pairs compared with `==`
    /// (pod traffic) or `!=` (everything else). Empty: nothing is recognised as pod traffic.
    pub(super) fn local_matches(&self, f: Fam) -> Vec<(Expr, Value)> {
        let first_cidr = |cidrs: &[IpNet]| -> Vec<(Expr, Value)> {
            // kube-proxy takes one CIDR per family; a source outside one may be inside
            // another, so only the first is used (as the masquerade rule must be one match).
            cidrs
                .iter()
                .find(|n| f.is(&n.addr()))
                .map(|n| (pl(f.saddr), net_value(*n)))
                .into_iter()
                .collect()
        };
        match &self.detect_local {
            DetectLocal::ClusterCidr => first_cidr(&self.cluster_cidrs),
            DetectLocal::NodeCidr(cidrs) => first_cidr(cidrs),
            DetectLocal::BridgeInterface(name) | DetectLocal::InterfaceNamePrefix(name) => {
                vec![(Expr::Meta(MetaKey::IifName), Value::IfName(*name))]
            }
        }
    }

    /// The settings [`lb_core::traffic::classify`] needs for family `f`: `masqueradeAll`, and
    /// whether pods can be told apart (a local-traffic detector exists for `f`).
    pub(super) fn masquerading(&self, f: Fam) -> Masquerading {
        Masquerading {
            masquerade_all: self.masquerade_all,
            detects_pods: !self.local_matches(f).is_empty(),
        }
    }

    /// The settings [`lb_core::traffic::classify`] needs for traffic of `family`, as the
    /// compiler uses them (so a reader of the ruleset classifies as the compiler did).
    pub fn masquerading_of(&self, family: IpFamily) -> Masquerading {
        self.masquerading(Fam::new(family))
    }

    /// Whether `primary` cannot be resolved for `node` (its addresses are unknown), so
    /// NodePorts are served on every local address.
    pub fn node_port_fallback(&self, node: &Node) -> bool {
        self.nodeport_addresses == NodePortAddresses::Primary && node.addresses().is_empty()
    }

    /// The CIDRs NodePorts are limited to, `None` for every local address but loopback.
    pub(super) fn nodeport_cidrs(&self) -> Option<&[IpNet]> {
        match &self.nodeport_addresses {
            NodePortAddresses::All | NodePortAddresses::Primary => None,
            NodePortAddresses::Cidrs(c) => Some(c),
        }
    }
}

/// Where NodePorts are served: kube-proxy's `nodePortAddresses` (`--nodeport-addresses`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NodePortAddresses {
    /// Every local address but loopback (`fib daddr type local`).
    All,
    /// The node's primary address of each family, from its Node object: kube-proxy's
    /// `primary`, the default of its nftables mode.
    #[default]
    Primary,
    /// Local addresses within these CIDRs; a family without a CIDR serves no NodePort.
    Cidrs(Vec<IpNet>),
}

impl std::str::FromStr for NodePortAddresses {
    type Err = String;

    /// `primary`, or comma-separated CIDRs ([`NodePortAddresses::from_items`]).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let items: Vec<&str> = s.split(',').map(str::trim).collect();
        Self::from_items(&items)
    }
}

impl NodePortAddresses {
    /// From the items of `nodePortAddresses`, as kube-proxy's nftables mode reads them:
    /// nothing or `["primary"]` is [`NodePortAddresses::Primary`]; `0.0.0.0/0` together with
    /// `::/0` is every local address; otherwise CIDRs. `primary` mixed with CIDRs is refused,
    /// as kube-proxy's validation does.
    pub fn from_items(items: &[&str]) -> Result<Self, String> {
        let items: Vec<&str> = items.iter().copied().filter(|i| !i.is_empty()).collect();
        if items.contains(&"primary") {
            return if items.len() == 1 {
                Ok(Self::Primary)
            } else {
                Err("\"primary\" must be the only value".into())
            };
        }
        if items.is_empty() {
            return Ok(Self::Primary);
        }
        let cidrs = items
            .iter()
            .map(|s| {
                s.parse::<IpNet>()
                    .map(|n| n.trunc())
                    .map_err(|_| format!("{s:?} is neither a CIDR nor \"primary\""))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let everything = |v4: bool| {
            cidrs
                .iter()
                .any(|n| n.prefix_len() == 0 && n.addr().is_ipv4() == v4)
        };
        if everything(true) && everything(false) {
            return Ok(Self::All);
        }
        Ok(Self::Cidrs(cidrs))
    }
}
