//! Object names and layout: every nftables object the compiler creates is named here, once,
//! stable and greppable, so a rendered ruleset explains itself; with the per-family
//! vocabulary ([`Fam`]) and the endpoint maps and their `pick-N` chains ([`Dispatch`]).

use std::net::IpAddr;

use ipnet::IpNet;
use lb_core::{IpFamily, Protocol};

use crate::nft::ir::{CtKey, DataType, Expr, MetaKey, NatFamily, Payload, Value};

/// Name of our tables (`table ip lb-proxy`, `table ip6 lb-proxy`).
pub const TABLE: &str = "lb-proxy";
/// The comment on our tables.
pub const TABLE_COMMENT: &str = "rules for lb-proxy, a kube-proxy replacement";

// Object names: stable and greppable, so a rendered ruleset explains itself. Names made
// of a prefix and a number (`pick-N`, `affinity-T`) are built below, from their prefixes.

// Base chains, at kube-proxy's hooks and priorities.
pub const FILTER_PREROUTING_PRE_DNAT: &str = "filter-prerouting-pre-dnat";
pub const FILTER_OUTPUT_PRE_DNAT: &str = "filter-output-pre-dnat";
pub const FILTER_INPUT: &str = "filter-input";
pub const FILTER_FORWARD: &str = "filter-forward";
pub const FILTER_OUTPUT: &str = "filter-output";
pub const NAT_PREROUTING: &str = "nat-prerouting";
pub const NAT_OUTPUT: &str = "nat-output";
pub const NAT_POSTROUTING: &str = "nat-postrouting";

// Regular chains.
pub const SERVICES: &str = "services";
pub const MASQUERADING: &str = "masquerading";
pub const REJECT_CHAIN: &str = "reject-chain";
pub const FIREWALL_CHECK: &str = "firewall-check";
pub const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";
pub const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
pub const AFFINITY_RECORD: &str = "affinity-record";
pub const AFFINITY_RECORD_PREROUTING: &str = "affinity-record-prerouting";
pub const AFFINITY_RECORD_OUTPUT: &str = "affinity-record-output";

// Sets and maps.
pub const CLUSTER_IPS: &str = "cluster-ips";
pub const SERVICE_IPS: &str = "service-ips";
pub const EXTERNAL_LOCAL_IPS: &str = "external-local-ips";
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
pub const NODEPORT_EXTERNAL_LOCAL: &str = "nodeport-external-local";
pub const ENDPOINTS: &str = "endpoints";
pub const ENDPOINTS_LOCAL: &str = "endpoints-local";
pub const NODEPORT_ENDPOINTS: &str = "nodeport-endpoints";
pub const NODEPORT_ENDPOINTS_LOCAL: &str = "nodeport-endpoints-local";
pub const MASQ_IPS: &str = "masquerade-ips";
pub const MASQ_LOCAL_SOURCE_IPS: &str = "masquerade-local-source-ips";
pub const MASQ_NODEPORTS: &str = "masquerade-nodeports";
pub const MASQ_LOCAL_SOURCE_NODEPORTS: &str = "masquerade-local-source-nodeports";
pub const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
pub const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
pub const FIREWALL_IPS: &str = "firewall-ips";
pub const FIREWALL_ALLOW: &str = "firewall-allow";
pub const HAIRPIN: &str = "hairpin";
pub const SERVICE_CIDRS: &str = "service-cidrs";
pub const NODEPORT_IPS: &str = "nodeport-ips";
pub const SERVICE_TRAFFIC: &str = "service-traffic";
pub const NODEPORT_TRAFFIC: &str = "nodeport-traffic";
pub const COUNT_SERVICE_TRAFFIC: &str = "count-service-traffic";

/// The four endpoint maps and their dispatch chains; each with a uniform random choice, or
/// (`Sticky…`, for Services with ClientIP affinity) a choice by a hash of the client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Dispatch {
    /// `daddr . proto . port . bucket`, the set used by `service-ips`.
    Ips,
    /// The same for eTP Local external traffic.
    IpsLocal,
    /// `proto . port . bucket`, the set used by `service-nodeports`.
    NodePorts,
    /// The same for eTP Local external traffic.
    NodePortsLocal,
    /// As `Ips`, the bucket a hash of the client address.
    StickyIps,
    /// As `IpsLocal`, the bucket a hash of the client address.
    StickyIpsLocal,
    /// As `NodePorts`, the bucket a hash of the client address.
    StickyNodePorts,
    /// As `NodePortsLocal`, the bucket a hash of the client address.
    StickyNodePortsLocal,
}

impl Dispatch {
    pub(super) fn map(self) -> &'static str {
        match self {
            Dispatch::Ips | Dispatch::StickyIps => ENDPOINTS,
            Dispatch::IpsLocal | Dispatch::StickyIpsLocal => ENDPOINTS_LOCAL,
            Dispatch::NodePorts | Dispatch::StickyNodePorts => NODEPORT_ENDPOINTS,
            Dispatch::NodePortsLocal | Dispatch::StickyNodePortsLocal => NODEPORT_ENDPOINTS_LOCAL,
        }
    }
    pub(super) fn chain(self, n: usize) -> String {
        let prefix = match self {
            Dispatch::Ips => "pick",
            Dispatch::IpsLocal => "pick-local",
            Dispatch::NodePorts => "nodeport-pick",
            Dispatch::NodePortsLocal => "nodeport-pick-local",
            Dispatch::StickyIps => "pick-sticky",
            Dispatch::StickyIpsLocal => "pick-sticky-local",
            Dispatch::StickyNodePorts => "nodeport-pick-sticky",
            Dispatch::StickyNodePortsLocal => "nodeport-pick-sticky-local",
        };
        format!("{prefix}-{n}")
    }
    pub(super) fn has_daddr(self) -> bool {
        matches!(
            self,
            Dispatch::Ips | Dispatch::IpsLocal | Dispatch::StickyIps | Dispatch::StickyIpsLocal
        )
    }
    pub(super) fn is_sticky(self) -> bool {
        matches!(
            self,
            Dispatch::StickyIps
                | Dispatch::StickyIpsLocal
                | Dispatch::StickyNodePorts
                | Dispatch::StickyNodePortsLocal
        )
    }
    /// The sticky variant (a hash of the client address chooses).
    pub(super) fn sticky(self) -> Self {
        match self {
            Dispatch::Ips => Dispatch::StickyIps,
            Dispatch::IpsLocal => Dispatch::StickyIpsLocal,
            Dispatch::NodePorts => Dispatch::StickyNodePorts,
            Dispatch::NodePortsLocal => Dispatch::StickyNodePortsLocal,
            other => other,
        }
    }
}

/// Per-family vocabulary.
#[derive(Debug, Clone, Copy)]
pub(super) struct Fam {
    pub(super) family: IpFamily,
    pub(super) addr: DataType,
    pub(super) saddr: Payload,
    pub(super) daddr: Payload,
    pub(super) ct_daddr: CtKey,
    pub(super) nat: NatFamily,
}

impl Fam {
    pub(super) fn new(family: IpFamily) -> Self {
        match family {
            IpFamily::V4 => Fam {
                family,
                addr: DataType::Ipv4Addr,
                saddr: Payload::IpSaddr,
                daddr: Payload::IpDaddr,
                ct_daddr: CtKey::OriginalIpDaddr,
                nat: NatFamily::Ip,
            },
            IpFamily::V6 => Fam {
                family,
                addr: DataType::Ipv6Addr,
                saddr: Payload::Ip6Saddr,
                daddr: Payload::Ip6Daddr,
                ct_daddr: CtKey::OriginalIp6Daddr,
                nat: NatFamily::Ip6,
            },
        }
    }
    pub(super) fn table_family(self) -> crate::nft::ir::Family {
        match self.family {
            IpFamily::V4 => crate::nft::ir::Family::Ip,
            IpFamily::V6 => crate::nft::ir::Family::Ip6,
        }
    }
    pub(super) fn is(self, ip: &IpAddr) -> bool {
        IpFamily::of(ip) == self.family
    }
    pub(super) fn loopback(self) -> Value {
        match self.family {
            IpFamily::V4 => Value::Ipv4Net("127.0.0.0/8".parse().expect("valid literal")),
            IpFamily::V6 => Value::Ipv6(std::net::Ipv6Addr::LOCALHOST),
        }
    }
}

pub(super) fn ip_value(ip: IpAddr) -> Value {
    match ip {
        IpAddr::V4(a) => Value::Ipv4(a),
        IpAddr::V6(a) => Value::Ipv6(a),
    }
}

pub(super) fn net_value(net: IpNet) -> Value {
    match net {
        IpNet::V4(n) => Value::Ipv4Net(n),
        IpNet::V6(n) => Value::Ipv6Net(n),
    }
}

pub(super) fn proto_value(p: Protocol) -> Value {
    match p {
        Protocol::Tcp => Value::TCP,
        Protocol::Udp => Value::UDP,
        Protocol::Sctp => Value::SCTP,
    }
}

pub(super) fn pl(p: Payload) -> Expr {
    Expr::Payload(p)
}

pub(super) const L4PROTO: Expr = Expr::Meta(MetaKey::L4Proto);
pub(super) const DPORT: Expr = Expr::Payload(Payload::ThDport);

/// A set of the table, by name: the static ones, and the per-timeout affinity key sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum SetRef {
    Static(&'static str),
    AffinityKeys(u64),
    AffinityNodePortKeys(u64),
}

impl SetRef {
    pub(super) fn name(self) -> String {
        match self {
            SetRef::Static(s) => s.to_string(),
            SetRef::AffinityKeys(t) => affinity_keys(t),
            SetRef::AffinityNodePortKeys(t) => affinity_nodeport_keys(t),
        }
    }
}

/// Name of the ClientIP affinity map for timeout `secs` (`affinity-10800`).
pub fn affinity_map(secs: u64) -> String {
    format!("affinity-{secs}")
}
/// Name of the node-port ClientIP affinity map for timeout `secs` (`affinity-nodeport-10800`).
pub fn affinity_nodeport_map(secs: u64) -> String {
    format!("affinity-nodeport-{secs}")
}
pub(super) fn affinity_keys(secs: u64) -> String {
    format!("affinity-keys-{secs}")
}
pub(super) fn affinity_nodeport_keys(secs: u64) -> String {
    format!("affinity-nodeport-keys-{secs}")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every fixed object name.
    const NAMES: &[&str] = &[
        FILTER_PREROUTING_PRE_DNAT,
        FILTER_OUTPUT_PRE_DNAT,
        FILTER_INPUT,
        FILTER_FORWARD,
        FILTER_OUTPUT,
        NAT_PREROUTING,
        NAT_OUTPUT,
        NAT_POSTROUTING,
        SERVICES,
        MASQUERADING,
        REJECT_CHAIN,
        FIREWALL_CHECK,
        SERVICE_ENDPOINTS_CHECK,
        NODEPORT_ENDPOINTS_CHECK,
        AFFINITY_RECORD,
        AFFINITY_RECORD_PREROUTING,
        AFFINITY_RECORD_OUTPUT,
        CLUSTER_IPS,
        SERVICE_IPS,
        EXTERNAL_LOCAL_IPS,
        SERVICE_NODEPORTS,
        NODEPORT_EXTERNAL_LOCAL,
        ENDPOINTS,
        ENDPOINTS_LOCAL,
        NODEPORT_ENDPOINTS,
        NODEPORT_ENDPOINTS_LOCAL,
        MASQ_IPS,
        MASQ_LOCAL_SOURCE_IPS,
        MASQ_NODEPORTS,
        MASQ_LOCAL_SOURCE_NODEPORTS,
        NO_ENDPOINT_SERVICES,
        NO_ENDPOINT_NODEPORTS,
        FIREWALL_IPS,
        FIREWALL_ALLOW,
        HAIRPIN,
        SERVICE_CIDRS,
        NODEPORT_IPS,
        SERVICE_TRAFFIC,
        NODEPORT_TRAFFIC,
        COUNT_SERVICE_TRAFFIC,
    ];

    const DISPATCHES: [Dispatch; 8] = [
        Dispatch::Ips,
        Dispatch::IpsLocal,
        Dispatch::NodePorts,
        Dispatch::NodePortsLocal,
        Dispatch::StickyIps,
        Dispatch::StickyIpsLocal,
        Dispatch::StickyNodePorts,
        Dispatch::StickyNodePortsLocal,
    ];

    #[test]
    fn every_object_name_is_unique_including_numbered_chains_and_affinity_sets() {
        let mut names: Vec<String> = NAMES.iter().map(|n| n.to_string()).collect();
        for d in DISPATCHES {
            names.push(d.chain(2));
        }
        for secs in [10, 10800] {
            names.extend([
                affinity_map(secs),
                affinity_nodeport_map(secs),
                affinity_keys(secs),
                affinity_nodeport_keys(secs),
            ]);
        }
        let unique: BTreeSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
    }

    #[test]
    fn object_names_are_stable() {
        // Renamed objects break upgrades (a full sync replaces the table, but operators' and
        // tests' greps) and the README: change these only on purpose.
        assert_eq!(TABLE, "lb-proxy");
        assert_eq!(SERVICE_IPS, "service-ips");
        assert_eq!(NO_ENDPOINT_SERVICES, "no-endpoint-services");
        assert_eq!(Dispatch::Ips.chain(3), "pick-3");
        assert_eq!(
            Dispatch::StickyNodePortsLocal.chain(1),
            "nodeport-pick-sticky-local-1"
        );
        assert_eq!(affinity_map(10800), "affinity-10800");
        assert_eq!(affinity_nodeport_map(10800), "affinity-nodeport-10800");
        assert_eq!(SetRef::AffinityKeys(60).name(), "affinity-keys-60");
        assert_eq!(
            SetRef::AffinityNodePortKeys(60).name(),
            "affinity-nodeport-keys-60"
        );
        assert_eq!(SetRef::Static(HAIRPIN).name(), "hairpin");
    }

    #[test]
    fn each_dispatch_reads_the_endpoint_map_of_its_kind() {
        for d in DISPATCHES {
            assert_eq!(d.sticky().map(), d.map(), "{d:?}");
            assert!(d.sticky().is_sticky(), "{d:?}");
            assert_eq!(d.sticky().has_daddr(), d.has_daddr(), "{d:?}");
            let local = matches!(
                d,
                Dispatch::IpsLocal
                    | Dispatch::NodePortsLocal
                    | Dispatch::StickyIpsLocal
                    | Dispatch::StickyNodePortsLocal
            );
            assert_eq!(d.map().ends_with("-local"), local, "{d:?}");
            assert_eq!(d.map().starts_with("nodeport-"), !d.has_daddr(), "{d:?}");
        }
    }
}
