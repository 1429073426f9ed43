//! The compiler: a [`Snapshot`] of service ports and endpoints, categorised by `lb-core` for
//! this node, becomes one nftables table per IP family.
//!
//! # Layout
//!
//! The layout is built for scale: a packet's cost does not depend on the number of Services
//! (every decision is one map lookup), and the number of kernel sets, maps and chains does not
//! grow with Services or endpoints. Services and endpoints live in map *elements*, so a change
//! to one endpoint is a handful of element adds and deletes.
//!
//! * `services` (from `nat-prerouting` and `nat-output`) first marks connections that must be
//!   masqueraded, then applies ClientIP affinity, then dispatches on the destination:
//!   `daddr . proto . dport` through the verdict maps `service-ips` (cluster IPs, external IPs,
//!   load-balancer IPs) and `service-nodeports` (`proto . dport` on node addresses).
//! * A verdict is `goto pick-N`: one chain per endpoint count `N` in use, whose single rule is
//!   `dnat to daddr . proto . dport . numgen random mod N map @endpoints`, so choosing uniformly
//!   among N endpoints needs no per-Service object. Chains exist only for counts in use.
//! * Traffic policies: with `externalTrafficPolicy: Local`, external traffic that is neither
//!   from a pod nor from the node itself goes through `external-local-ips` /
//!   `nodeport-external-local` to the node-local endpoints (kept in `endpoints-local`), unmasqueraded
//!   so the backend sees the client; pods and the node are short-circuited to all endpoints
//!   (as kube-proxy does). With no local endpoint the connection is dropped.
//! * No endpoints: `no-endpoint-services` / `no-endpoint-nodeports` in the filter hooks reject
//!   (ICMP port unreachable) when the Service has no endpoint at all, and drop when it has
//!   endpoints but none usable under a Local policy.
//! * `loadBalancerSourceRanges`: `firewall-check`, before DNAT, drops connections to a
//!   load-balancer IP whose source is not in `firewall-allow` (`vip . proto . port . cidr`).
//! * ClientIP affinity: per timeout `T` in use, the dynamic maps `affinity-T`
//!   (`saddr . vip . proto . port → endpoint`, service addresses) and `affinity-nodeport-T`
//!   (`saddr . proto . port → endpoint`, node ports on any node address), consulted before
//!   dispatch and refreshed by every new connection in `affinity-record`, which runs right
//!   after the nat hooks of prerouting and output (so connections to the node itself are
//!   recorded too) and only for connections dispatched for a service address or node port with
//!   affinity. The kernel expires entries `T` after the client's last new connection, as
//!   kube-proxy's affinity sets do. A client without an entry is dispatched through
//!   `pick-sticky-N`, which chooses by `jhash` of its address instead of `numgen random`: every
//!   address of the service port lists the same endpoints in the same order, so the client
//!   lands on one endpoint whichever address it uses, as kube-proxy's per-service-port
//!   affinity does; see [`affinity`] for what differs.
//! * Masquerade: a mark bit (`0x4000` by default) set before DNAT and turned into
//!   `masquerade fully-random` in `masquerading`; hairpin connections (a pod reaching itself
//!   through a Service) are found with the `hairpin` set.
//! * Traffic counters: the sets `service-traffic` (`vip . proto . port`) and
//!   `nodeport-traffic` (`proto . port`) hold every service address and node port, each
//!   element with its own counter (the set's `counter`). Every packet of a DNATed connection,
//!   both directions, goes through `count-service-traffic` from the filter input, forward and
//!   output hooks, whose lookup of the connection's *original* destination counts it. Two
//!   sets, whatever the number of Services; read back per service port for `/metrics`.

pub mod affinity;

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::FxHashMap as HashMap;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use lb_core::{EndpointSet, IpFamily, Node, Protocol, ServicePort, ServicePortName, categorize};

use crate::nft::ir::{
    BaseChain, Chain, ChainSpec, ChainType, CmpOp, CtKey, CtState, CtStatus, DataType, DynsetOp,
    Element, Expr, FibAddr, Hook, IfName, KeySpec, MapData, MarkOp, MetaKey, NatFamily, Payload,
    Policy, Rule, Set, SetFlags, SetSpec, Stmt, Table, TableId, Value, Verdict,
};
use crate::nft::{Command, Transaction};
use crate::store::{ServiceEntry, Snapshot};

use self::affinity::{AffinityDestination, AffinityTargets, Touched};

/// Name of our tables (`table ip lb-proxy`, `table ip6 lb-proxy`).
pub const TABLE: &str = "lb-proxy";
/// The comment on our tables.
pub const TABLE_COMMENT: &str = "rules for lb-proxy, a kube-proxy replacement";

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
    fn mark(&self) -> u32 {
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
    fn local_matches(&self, f: Fam) -> Vec<(Expr, Value)> {
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

    /// Whether `primary` cannot be resolved for `node` (its addresses are unknown), so
    /// NodePorts are served on every local address.
    pub fn node_port_fallback(&self, node: &Node) -> bool {
        self.nodeport_addresses == NodePortAddresses::Primary && node.addresses().is_empty()
    }

    /// The CIDRs NodePorts are limited to, `None` for every local address but loopback.
    fn nodeport_cidrs(&self) -> Option<&[IpNet]> {
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

// Object names: stable and greppable, so a rendered ruleset explains itself.
const SERVICES: &str = "services";
const MASQUERADING: &str = "masquerading";
const REJECT_CHAIN: &str = "reject-chain";
const FIREWALL_CHECK: &str = "firewall-check";
const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";
const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
const AFFINITY_RECORD: &str = "affinity-record";
const AFFINITY_RECORD_PREROUTING: &str = "affinity-record-prerouting";
const AFFINITY_RECORD_OUTPUT: &str = "affinity-record-output";

const CLUSTER_IPS: &str = "cluster-ips";
const SERVICE_IPS: &str = "service-ips";
const EXTERNAL_LOCAL_IPS: &str = "external-local-ips";
const SERVICE_NODEPORTS: &str = "service-nodeports";
const NODEPORT_EXTERNAL_LOCAL: &str = "nodeport-external-local";
const ENDPOINTS: &str = "endpoints";
const ENDPOINTS_LOCAL: &str = "endpoints-local";
const NODEPORT_ENDPOINTS: &str = "nodeport-endpoints";
const NODEPORT_ENDPOINTS_LOCAL: &str = "nodeport-endpoints-local";
const MASQ_IPS: &str = "masquerade-ips";
const MASQ_LOCAL_SOURCE_IPS: &str = "masquerade-local-source-ips";
const MASQ_NODEPORTS: &str = "masquerade-nodeports";
const MASQ_LOCAL_SOURCE_NODEPORTS: &str = "masquerade-local-source-nodeports";
const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
const FIREWALL_IPS: &str = "firewall-ips";
const FIREWALL_ALLOW: &str = "firewall-allow";
const HAIRPIN: &str = "hairpin";
const SERVICE_CIDRS: &str = "service-cidrs";
const NODEPORT_IPS: &str = "nodeport-ips";
const SERVICE_TRAFFIC: &str = "service-traffic";
const NODEPORT_TRAFFIC: &str = "nodeport-traffic";
const COUNT_SERVICE_TRAFFIC: &str = "count-service-traffic";

/// The four endpoint maps and their dispatch chains; each with a uniform random choice, or
/// (`Sticky…`, for Services with ClientIP affinity) a choice by a hash of the client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Dispatch {
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
    fn map(self) -> &'static str {
        match self {
            Dispatch::Ips | Dispatch::StickyIps => ENDPOINTS,
            Dispatch::IpsLocal | Dispatch::StickyIpsLocal => ENDPOINTS_LOCAL,
            Dispatch::NodePorts | Dispatch::StickyNodePorts => NODEPORT_ENDPOINTS,
            Dispatch::NodePortsLocal | Dispatch::StickyNodePortsLocal => NODEPORT_ENDPOINTS_LOCAL,
        }
    }
    fn chain(self, n: usize) -> String {
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
    fn has_daddr(self) -> bool {
        matches!(
            self,
            Dispatch::Ips | Dispatch::IpsLocal | Dispatch::StickyIps | Dispatch::StickyIpsLocal
        )
    }
    fn is_sticky(self) -> bool {
        matches!(
            self,
            Dispatch::StickyIps
                | Dispatch::StickyIpsLocal
                | Dispatch::StickyNodePorts
                | Dispatch::StickyNodePortsLocal
        )
    }
    /// The sticky variant (a hash of the client address chooses).
    fn sticky(self) -> Self {
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
struct Fam {
    family: IpFamily,
    addr: DataType,
    saddr: Payload,
    daddr: Payload,
    ct_daddr: CtKey,
    nat: NatFamily,
}

impl Fam {
    fn new(family: IpFamily) -> Self {
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
    fn table_family(self) -> crate::nft::ir::Family {
        match self.family {
            IpFamily::V4 => crate::nft::ir::Family::Ip,
            IpFamily::V6 => crate::nft::ir::Family::Ip6,
        }
    }
    fn is(self, ip: &IpAddr) -> bool {
        IpFamily::of(ip) == self.family
    }
    fn loopback(self) -> Value {
        match self.family {
            IpFamily::V4 => Value::Ipv4Net("127.0.0.0/8".parse().expect("valid literal")),
            IpFamily::V6 => Value::Ipv6(std::net::Ipv6Addr::LOCALHOST),
        }
    }
}

fn ip_value(ip: IpAddr) -> Value {
    match ip {
        IpAddr::V4(a) => Value::Ipv4(a),
        IpAddr::V6(a) => Value::Ipv6(a),
    }
}

fn net_value(net: IpNet) -> Value {
    match net {
        IpNet::V4(n) => Value::Ipv4Net(n),
        IpNet::V6(n) => Value::Ipv6Net(n),
    }
}

fn proto_value(p: Protocol) -> Value {
    match p {
        Protocol::Tcp => Value::TCP,
        Protocol::Udp => Value::UDP,
        Protocol::Sctp => Value::SCTP,
    }
}

fn pl(p: Payload) -> Expr {
    Expr::Payload(p)
}

const L4PROTO: Expr = Expr::Meta(MetaKey::L4Proto);
const DPORT: Expr = Expr::Payload(Payload::ThDport);

/// What the compiler produced besides the table: figures for logs and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Service ports programmed for this family.
    pub service_ports: usize,
    /// Endpoint elements in the endpoint maps.
    pub endpoint_elements: usize,
}

/// Builds the table for `family` from a whole snapshot (a full sync, `render`, tests).
pub fn compile(snapshot: &Snapshot, config: &Config, family: IpFamily) -> (TableId, Table, Stats) {
    let mut c = Compiler::new(config.for_node(&snapshot.node), family);
    let changes: Vec<_> = snapshot
        .services
        .iter()
        .map(|(name, e)| (name.clone(), Some(e)))
        .collect();
    let plan = c.plan(&snapshot.node, changes);
    c.commit(plan);
    let stats = c.stats();
    (c.table_id(), c.table(), stats)
}

/// Who contributes which element: for every (set, key), the contributing service ports,
/// sorted. The kernel holds the first contributor's element, which lives in that service
/// port's [`Fragment`] (not copied here: one copy of each element, issue 13).
type Owners = HashMap<ElemKey, Vec<ServicePortName>>;

/// A set of the table, by name: the static ones, and the per-timeout affinity key sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum SetRef {
    Static(&'static str),
    AffinityKeys(u64),
    AffinityNodePortKeys(u64),
}

impl SetRef {
    fn name(self) -> String {
        match self {
            SetRef::Static(s) => s.to_string(),
            SetRef::AffinityKeys(t) => affinity_keys(t),
            SetRef::AffinityNodePortKeys(t) => affinity_nodeport_keys(t),
        }
    }
}

/// An element of the table: its set and key.
type ElemKey = (SetRef, Vec<Value>);

/// The incremental compiler for one IP family.
///
/// It keeps every service port's [`Fragment`] and who owns each element, so a change to one
/// Service costs work proportional to that Service, not to the cluster: [`Compiler::plan`]
/// computes the transaction for a set of changed service ports without touching the state,
/// and [`Compiler::commit`] adopts it once the kernel accepted the transaction. A rejected
/// transaction is simply not committed, so the compiler keeps describing what the kernel holds.
#[derive(Debug)]
pub struct Compiler {
    f: Fam,
    config: Config,
    fragments: HashMap<ServicePortName, Fragment>,
    owners: Owners,
    counts: BTreeMap<(Dispatch, usize), usize>,
    timeouts: BTreeMap<u64, usize>,
    /// `pick-N` chains and affinity sets that exist in the kernel (a superset of what is in
    /// use: unused ones are only removed by a full sync).
    installed_counts: BTreeSet<(Dispatch, usize)>,
    installed_timeouts: BTreeSet<u64>,
    installed: bool,
}

/// A computed but not yet committed change: the transaction and the state it leads to.
#[derive(Debug)]
pub struct Plan {
    /// The transaction to apply.
    pub tx: Transaction,
    changes: Vec<(ServicePortName, Option<Fragment>)>,
    touched: Owners,
    installed_counts: BTreeSet<(Dispatch, usize)>,
    installed_timeouts: BTreeSet<u64>,
}

impl Compiler {
    /// An empty compiler: nothing programmed yet.
    pub fn new(config: Config, family: IpFamily) -> Self {
        Compiler {
            f: Fam::new(family),
            config,
            fragments: HashMap::default(),
            owners: HashMap::default(),
            counts: BTreeMap::new(),
            timeouts: BTreeMap::new(),
            installed_counts: BTreeSet::new(),
            installed_timeouts: BTreeSet::new(),
            installed: false,
        }
    }

    /// The table this compiler programs.
    pub fn table_id(&self) -> TableId {
        TableId::new(self.f.table_family(), self.config.table.clone())
    }

    /// Whether the table exists in the kernel (a plan was committed since the last
    /// [`Compiler::forget_installed`]).
    pub fn is_installed(&self) -> bool {
        self.installed
    }

    /// Declares that the kernel no longer holds our table (deleted, or never programmed): the
    /// next plan creates it from scratch with every element.
    pub fn forget_installed(&mut self) {
        self.installed = false;
    }

    /// Figures for logs and metrics.
    pub fn stats(&self) -> Stats {
        Stats {
            service_ports: self.fragments.len(),
            endpoint_elements: self.fragments.values().map(|f| f.endpoint_elements).sum(),
        }
    }

    /// The fragment of one service port (empty when it has no cluster IP of this family).
    pub fn fragment(&self, node: &Node, entry: &ServiceEntry) -> Fragment {
        let mut b = Builder {
            f: self.f,
            frag: Fragment::default(),
            sticky: entry.port.session_affinity().timeout().is_some(),
        };
        let endpoints: Vec<_> = entry
            .endpoints
            .iter()
            .filter(|e| self.f.is(&e.ip()))
            .cloned()
            .collect();
        b.service(&entry.port, &endpoints, node);
        b.frag
    }

    /// The transaction that brings the kernel from the committed state to one where the given
    /// service ports have their new content (`None`: deleted). Does not change the compiler.
    pub fn plan<'e>(
        &self,
        node: &Node,
        changes: impl IntoIterator<Item = (ServicePortName, Option<&'e ServiceEntry>)>,
    ) -> Plan {
        let changes: Vec<(ServicePortName, Option<Fragment>)> = changes
            .into_iter()
            .map(|(name, e)| {
                (
                    name,
                    e.map(|e| self.fragment(node, e))
                        .filter(|f| *f != Fragment::default()),
                )
            })
            .filter(|(name, frag)| self.fragments.get(name) != frag.as_ref())
            .collect();
        // Structural objects: new endpoint counts and timeouts need chains and sets first.
        let mut counts = self.installed_counts.clone();
        let mut timeouts = self.installed_timeouts.clone();
        for (_, frag) in &changes {
            if let Some(f) = frag {
                counts.extend(f.counts.iter().copied());
                timeouts.extend(f.timeouts.iter().copied());
            }
        }
        let id = self.table_id();
        let mut tx = Transaction::new();
        let fresh = !self.installed;
        let before = if fresh {
            crate::nft::ir::Ruleset::default()
        } else {
            one_table(
                &id,
                skeleton(
                    self.f,
                    &self.config,
                    &self.installed_counts,
                    &self.installed_timeouts,
                ),
            )
        };
        let after = one_table(&id, skeleton(self.f, &self.config, &counts, &timeouts));
        tx.commands
            .extend(crate::nft::diff::diff(&before, &after).commands);

        // Elements: for every touched (set, key), its contributors after the change, and the
        // effective element (the first contributor's) before and after.
        let capacity = changes
            .iter()
            .flat_map(|(_, f)| f)
            .map(|f| f.elems.len())
            .sum();
        let mut touched: Owners = HashMap::with_capacity_and_hasher(capacity, Default::default());
        for (name, frag) in &changes {
            if let Some(old) = self.fragments.get(name) {
                for (set, key, _) in &old.elems {
                    let k = (*set, key.clone());
                    let owners = touched
                        .entry(k)
                        .or_insert_with_key(|k| self.owners.get(k).cloned().unwrap_or_default());
                    owners.retain(|n| n != name);
                }
            }
            for (set, key, _) in frag.iter().flat_map(|f| &f.elems) {
                let k = (*set, key.clone());
                let owners = touched
                    .entry(k)
                    .or_insert_with_key(|k| self.owners.get(k).cloned().unwrap_or_default());
                if let Err(i) = owners.binary_search(name) {
                    owners.insert(i, name.clone());
                }
            }
        }
        let changed: HashMap<&ServicePortName, Option<&Fragment>> =
            changes.iter().map(|(n, f)| (n, f.as_ref())).collect();
        let after = |name: &ServicePortName| match changed.get(name) {
            Some(f) => *f,
            None => self.fragments.get(name),
        };
        let mut deletes: BTreeMap<SetRef, Vec<Vec<Value>>> = BTreeMap::new();
        let mut adds: BTreeMap<SetRef, Vec<(Vec<Value>, Element)>> = BTreeMap::new();
        for (k, owners) in &touched {
            let old = self
                .owners
                .get(k)
                .and_then(|o| o.first())
                .and_then(|n| element_in(self.fragments.get(n), k));
            let new = owners.first().and_then(|n| element_in(after(n), k));
            if old == new {
                continue;
            }
            if old.is_some() {
                deletes.entry(k.0).or_default().push(k.1.clone());
            }
            if let Some(e) = new {
                adds.entry(k.0).or_default().push((k.1.clone(), e.clone()));
            }
        }
        // Element order inside one message does not matter to the kernel; not sorting keeps a
        // full sync linear.
        for (set, keys) in deletes {
            tx.push(Command::DeleteElements {
                table: id.clone(),
                set: set.name(),
                keys,
            });
        }
        for (set, elements) in adds {
            tx.push(Command::AddElements {
                table: id.clone(),
                set: set.name(),
                elements,
            });
        }
        Plan {
            tx,
            changes,
            touched,
            installed_counts: counts,
            installed_timeouts: timeouts,
        }
    }

    /// Adopts a plan whose transaction the kernel accepted.
    pub fn commit(&mut self, mut plan: Plan) {
        // Owner lists are built by `insert` (capacity 4) and almost always hold one owner:
        // shrinking them is most of the memory a synced compiler holds (issue 13).
        if self.owners.is_empty() {
            // A first or full sync: the plan's view is the whole state; adopt it as is.
            plan.touched.retain(|_, owners| {
                owners.shrink_to_fit();
                !owners.is_empty()
            });
            self.owners = std::mem::take(&mut plan.touched);
        }
        for (k, mut owners) in plan.touched {
            if owners.is_empty() {
                self.owners.remove(&k);
            } else {
                owners.shrink_to_fit();
                self.owners.insert(k, owners);
            }
        }
        for (name, frag) in plan.changes {
            if let Some(old) = self.fragments.remove(&name) {
                for c in &old.counts {
                    dec(&mut self.counts, c);
                }
                for t in &old.timeouts {
                    dec(&mut self.timeouts, t);
                }
            }
            if let Some(mut new) = frag {
                new.elems.shrink_to_fit();
                for c in &new.counts {
                    *self.counts.entry(*c).or_default() += 1;
                }
                for t in &new.timeouts {
                    *self.timeouts.entry(*t).or_default() += 1;
                }
                self.fragments.insert(name, new);
            }
        }
        self.installed_counts = plan.installed_counts;
        self.installed_timeouts = plan.installed_timeouts;
        self.installed = true;
    }

    /// The table as committed, elements included, with only the chains and sets in use (what
    /// a full sync installs).
    pub fn table(&self) -> Table {
        let counts: BTreeSet<_> = self.counts.keys().copied().collect();
        let timeouts: BTreeSet<_> = self.timeouts.keys().copied().collect();
        let mut table = skeleton(self.f, &self.config, &counts, &timeouts);
        for (k, owners) in &self.owners {
            let e = owners
                .first()
                .and_then(|n| element_in(self.fragments.get(n), k));
            if let (Some(s), Some(e)) = (table.sets.get_mut(&k.0.name()), e) {
                s.elements.insert(k.1.clone(), e.clone());
            }
        }
        table
    }

    /// Forgets which chains and sets beyond those in use exist, after a full sync replaced
    /// the table with [`Compiler::table`].
    pub fn mark_full_sync(&mut self) {
        self.installed_counts = self.counts.keys().copied().collect();
        self.installed_timeouts = self.timeouts.keys().copied().collect();
    }
}

impl Compiler {
    /// The ClientIP affinity destinations whose entries a plan may make stale, per timeout:
    /// those for which a changed service port loses an endpoint, or which it no longer has
    /// with that timeout (deleted, affinity dropped, timeout changed). A change that only
    /// adds endpoints touches nothing, so reads nothing back. Call it before
    /// [`Compiler::commit`].
    pub fn affinity_touched(&self, plan: &Plan) -> Touched {
        let mut touched = Touched::new();
        for (name, frag) in &plan.changes {
            let Some(old) = self.fragments.get(name) else {
                continue;
            };
            for (secs, dest, old_eps) in &old.affinity {
                let now = frag
                    .iter()
                    .flat_map(|f| &f.affinity)
                    .find(|(s, d, _)| s == secs && d == dest)
                    .map(|(_, _, eps)| eps);
                let lost =
                    now.is_none_or(|now| old_eps.iter().any(|e| now.binary_search(e).is_err()));
                if lost {
                    touched.entry(*secs).or_default().insert(dest.clone());
                }
            }
        }
        touched
    }

    /// For every touched (timeout, destination), the endpoints its affinity entries may still
    /// point to, as committed: the union over the service ports that now have that
    /// destination with that timeout (none: every entry is stale, e.g. the Service or its
    /// affinity is gone, or its timeout changed).
    pub fn affinity_targets(&self, touched: &Touched) -> BTreeMap<u64, AffinityTargets> {
        self.targets_with(
            touched,
            |k| self.owners.get(k),
            |name| self.fragments.get(name),
        )
    }

    /// As [`Compiler::affinity_targets`], in the state `plan` leads to, before it is
    /// committed: so the transaction that takes endpoints away also deletes the affinity
    /// entries pointing to them.
    pub fn affinity_targets_after(
        &self,
        plan: &Plan,
        touched: &Touched,
    ) -> BTreeMap<u64, AffinityTargets> {
        let changed: HashMap<&ServicePortName, Option<&Fragment>> =
            plan.changes.iter().map(|(n, f)| (n, f.as_ref())).collect();
        self.targets_with(
            touched,
            |k| plan.touched.get(k).or_else(|| self.owners.get(k)),
            |name| match changed.get(name) {
                Some(f) => *f,
                None => self.fragments.get(name),
            },
        )
    }

    fn targets_with<'s>(
        &self,
        touched: &Touched,
        owners_of: impl Fn(&ElemKey) -> Option<&'s Vec<ServicePortName>>,
        fragment_of: impl Fn(&ServicePortName) -> Option<&'s Fragment>,
    ) -> BTreeMap<u64, AffinityTargets> {
        let mut out: BTreeMap<u64, AffinityTargets> = BTreeMap::new();
        for (&secs, dests) in touched {
            let targets = out.entry(secs).or_default();
            for dest in dests {
                let set = match dest {
                    AffinityDestination::Address(_) => SetRef::AffinityKeys(secs),
                    AffinityDestination::NodePort(_) => SetRef::AffinityNodePortKeys(secs),
                };
                let allowed = targets.entry(dest.clone()).or_default();
                for name in owners_of(&(set, dest.key().to_vec())).into_iter().flatten() {
                    let Some(frag) = fragment_of(name) else {
                        continue;
                    };
                    for (s, d, eps) in &frag.affinity {
                        if *s == secs && d == dest {
                            allowed.extend(eps.iter().cloned());
                        }
                    }
                }
            }
        }
        out
    }

    /// Every affinity destination of every committed service port, by timeout (what a full
    /// sync checks carried-over entries against).
    pub fn all_affinity(&self) -> Touched {
        let mut all = Touched::new();
        for frag in self.fragments.values() {
            for (secs, dest, _) in &frag.affinity {
                all.entry(*secs).or_default().insert(dest.clone());
            }
        }
        all
    }

    /// The affinity timeouts a plan leaves in use.
    pub fn plan_timeouts(plan: &Plan) -> BTreeSet<u64> {
        plan.installed_timeouts.clone()
    }

    /// The traffic counting sets (`service-traffic`, `nodeport-traffic`) and their specs,
    /// to read their counters back.
    pub fn traffic_sets(&self) -> [(&'static str, SetSpec); 2] {
        traffic_sets(self.f)
    }

    /// The service port that element `key` of traffic set `set` counts for (its first
    /// contributor, as committed).
    pub fn traffic_owner(&self, set: &'static str, key: &[Value]) -> Option<&ServicePortName> {
        self.owners
            .get(&(SetRef::Static(set), key.to_vec()))
            .and_then(|o| o.first())
    }

    /// The spec of the ClientIP affinity map for timeout `secs` (to read it back).
    pub fn affinity_map_spec(&self, secs: u64) -> SetSpec {
        affinity_map_spec(self.f, secs)
    }

    /// The spec of the node-port ClientIP affinity map for timeout `secs`.
    pub fn affinity_nodeport_map_spec(&self, secs: u64) -> SetSpec {
        affinity_nodeport_map_spec(self.f, secs)
    }
}

/// The element `fragment` contributes for `key` (its last, as a later one replaces an earlier
/// one with the same key).
fn element_in<'f>(fragment: Option<&'f Fragment>, key: &ElemKey) -> Option<&'f Element> {
    fragment?
        .elems
        .iter()
        .rev()
        .find(|(set, k, _)| *set == key.0 && *k == key.1)
        .map(|(_, _, e)| e)
}

fn dec<K: Ord>(m: &mut BTreeMap<K, usize>, k: &K) {
    if let Some(n) = m.get_mut(k) {
        *n -= 1;
        if *n == 0 {
            m.remove(k);
        }
    }
}

fn one_table(id: &TableId, t: Table) -> crate::nft::ir::Ruleset {
    let mut rs = crate::nft::ir::Ruleset::default();
    rs.tables.insert(id.clone(), t);
    rs
}

/// The static sets and maps, without elements.
fn skeleton_sets(f: Fam, config: &Config) -> Table {
    let mut table = Table {
        comment: Some(TABLE_COMMENT.into()),
        ..Table::default()
    };
    let key3 = || vec![f.addr, DataType::InetProto, DataType::InetService];
    let np2 = || vec![DataType::InetProto, DataType::InetService];
    let mut add = |name: &str, spec: SetSpec, comment: &str| {
        let spec = SetSpec {
            comment: Some(comment.into()),
            ..spec
        };
        table.sets.insert(name.into(), Set::new(spec));
    };
    add(
        CLUSTER_IPS,
        SetSpec::set(vec![f.addr]),
        "active cluster IPs",
    );
    add(
        SERVICE_IPS,
        SetSpec::map(KeySpec::Types(key3()), MapData::Verdict),
        "cluster, external and load-balancer IPs: dispatch to endpoints",
    );
    add(
        EXTERNAL_LOCAL_IPS,
        SetSpec::map(KeySpec::Types(key3()), MapData::Verdict),
        "external traffic to eTP Local services: node-local endpoints",
    );
    add(
        SERVICE_NODEPORTS,
        SetSpec::map(KeySpec::Types(np2()), MapData::Verdict),
        "NodePort traffic: dispatch to endpoints",
    );
    add(
        NODEPORT_EXTERNAL_LOCAL,
        SetSpec::map(KeySpec::Types(np2()), MapData::Verdict),
        "external NodePort traffic to eTP Local services",
    );
    let ep_map = |with_daddr: bool| {
        let mut key = Vec::new();
        if with_daddr {
            key.push(pl(f.daddr));
        }
        key.extend([L4PROTO, DPORT, Expr::NumgenRandom { modulus: 1 }]);
        SetSpec::map(
            KeySpec::Typeof(key),
            MapData::Values(KeySpec::Typeof(vec![pl(f.daddr), DPORT])),
        )
    };
    add(
        ENDPOINTS,
        ep_map(true),
        "service address . bucket -> endpoint",
    );
    add(
        ENDPOINTS_LOCAL,
        ep_map(true),
        "as endpoints, node-local endpoints only",
    );
    add(
        NODEPORT_ENDPOINTS,
        ep_map(false),
        "node port . bucket -> endpoint",
    );
    add(
        NODEPORT_ENDPOINTS_LOCAL,
        ep_map(false),
        "as nodeport-endpoints, node-local only",
    );
    add(
        MASQ_IPS,
        SetSpec::set(key3()),
        "external addresses of eTP Cluster services",
    );
    add(
        MASQ_LOCAL_SOURCE_IPS,
        SetSpec::set(key3()),
        "external addresses of eTP Local services: masquerade the node's own traffic",
    );
    add(
        MASQ_NODEPORTS,
        SetSpec::set(np2()),
        "node ports of eTP Cluster services",
    );
    add(
        MASQ_LOCAL_SOURCE_NODEPORTS,
        SetSpec::set(np2()),
        "node ports of eTP Local services",
    );
    add(
        NO_ENDPOINT_SERVICES,
        SetSpec::map(KeySpec::Types(key3()), MapData::Verdict),
        "reject or drop traffic to service addresses without usable endpoints",
    );
    add(
        NO_ENDPOINT_NODEPORTS,
        SetSpec::map(KeySpec::Types(np2()), MapData::Verdict),
        "reject or drop traffic to node ports without usable endpoints",
    );
    add(
        FIREWALL_IPS,
        SetSpec::set(key3()),
        "load-balancer IPs with source ranges",
    );
    let mut allow = SetSpec::set({
        let mut k = key3();
        k.push(f.addr);
        k
    });
    allow.flags.interval = true;
    add(
        FIREWALL_ALLOW,
        allow,
        "load-balancer IP . proto . port . allowed source range",
    );
    add(
        HAIRPIN,
        SetSpec::set(vec![f.addr, f.addr]),
        "endpoint . endpoint: hairpin",
    );
    for (name, spec) in traffic_sets(f) {
        let comment = spec.comment.clone().unwrap_or_default();
        add(name, spec, &comment);
    }
    let mut cidrs = SetSpec::set(vec![f.addr]);
    cidrs.flags.interval = true;
    add(SERVICE_CIDRS, cidrs, "ServiceCIDRs: cluster IP ranges");
    if config.nodeport_cidrs().is_some() {
        let mut s = SetSpec::set(vec![f.addr]);
        s.flags.interval = true;
        add(NODEPORT_IPS, s, "addresses that accept NodePort traffic");
        // Overlapping intervals are refused by the kernel: merge them first.
        let cidrs: Vec<IpNet> = config
            .nodeport_cidrs()
            .into_iter()
            .flatten()
            .filter(|n| f.is(&n.addr()))
            .copied()
            .collect();
        if let Some(set) = table.sets.get_mut(NODEPORT_IPS) {
            for n in IpNet::aggregate(&cidrs) {
                set.elements.insert(vec![net_value(n)], Element::key_only());
            }
        }
    }
    let in_family: Vec<IpNet> = config
        .service_cidrs
        .iter()
        .filter(|n| f.is(&n.addr()))
        .copied()
        .collect();
    if let Some(set) = table.sets.get_mut(SERVICE_CIDRS) {
        // Overlapping intervals are refused by the kernel: merge them first.
        for n in IpNet::aggregate(&in_family) {
            set.elements.insert(vec![net_value(n)], Element::key_only());
        }
    }
    table
}

/// What one service port contributes to the table: elements, endpoint counts (for the
/// `pick-N` chains) and affinity timeouts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fragment {
    elems: Vec<(SetRef, Vec<Value>, Element)>,
    counts: BTreeSet<(Dispatch, usize)>,
    timeouts: BTreeSet<u64>,
    endpoint_elements: usize,
    /// ClientIP affinity: per timeout and destination, the endpoints (`ip . port`, sorted)
    /// that destination dispatches to, so stale affinity entries can be found
    /// ([`Compiler::affinity_targets`]).
    affinity: Vec<(u64, AffinityDestination, Vec<Vec<Value>>)>,
}

/// Builds one service port's [`Fragment`].
struct Builder {
    f: Fam,
    frag: Fragment,
    /// The service port has ClientIP affinity: its first connections choose by a hash of the
    /// client address ([`Dispatch::sticky`]).
    sticky: bool,
}

impl Builder {
    fn elem(&mut self, set: &'static str, key: Vec<Value>, e: Element) {
        self.frag.elems.push((SetRef::Static(set), key, e));
    }

    fn service(&mut self, port: &ServicePort, endpoints: &[lb_core::Endpoint], node: &Node) {
        let f = self.f;
        let Some(&cluster_ip) = port.cluster_ips().iter().find(|ip| f.is(ip)) else {
            return;
        };
        let c = categorize(port, endpoints, node);
        let proto = proto_value(port.protocol());
        let svc_port = Value::Port(port.port());
        let comment = Some(port.name().to_string()).filter(|s| s.len() < 128);
        let to_vals = |set: EndpointSet| -> Vec<Vec<Value>> {
            c.iter(set)
                .map(|e| vec![ip_value(e.ip()), Value::Port(e.port())])
                .collect()
        };
        let cluster = to_vals(EndpointSet::Cluster);
        let local = to_vals(EndpointSet::Local);
        let no_endpoint = if c.has_any_endpoints() {
            Element {
                comment: comment.clone(),
                ..Element::verdict(Verdict::Drop)
            }
        } else {
            Element {
                comment: comment.clone(),
                ..Element::verdict(Verdict::Goto(REJECT_CHAIN.into()))
            }
        };
        for e in c.all() {
            let ip = ip_value(e.ip());
            self.elem(HAIRPIN, vec![ip, ip], Element::key_only());
        }
        let timeout = port.session_affinity().timeout();

        // Internal traffic to the cluster IP.
        let cip = ip_value(cluster_ip);
        self.elem(CLUSTER_IPS, vec![cip], Element::key_only());
        let internal = if port.internal_policy_local() {
            &local
        } else {
            &cluster
        };
        let key = vec![cip, proto, svc_port];
        let counted = Element {
            comment: comment.clone(),
            ..Element::key_only()
        };
        self.elem(SERVICE_TRAFFIC, key.clone(), counted.clone());
        self.dispatch(
            Dispatch::Ips,
            SERVICE_IPS,
            &key,
            internal,
            &no_endpoint,
            &comment,
        );
        self.affinity(timeout, AffinityKey::Ip(key), &[internal.as_slice()]);

        // External addresses: external IPs and load-balancer IPs of this family.
        let externals: Vec<IpAddr> = port
            .external_ips()
            .iter()
            .chain(port.load_balancer_ips())
            .filter(|ip| f.is(ip) && **ip != cluster_ip)
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let etp_local = port.external_policy_local();
        // Where external destinations dispatch: with eTP Local, outside clients go to the
        // local endpoints and pods and the node itself to all of them.
        let external_sets: &[&[Vec<Value>]] = if etp_local {
            &[cluster.as_slice(), local.as_slice()]
        } else {
            &[cluster.as_slice()]
        };
        for ip in externals {
            let key = vec![ip_value(ip), proto, svc_port];
            self.elem(SERVICE_TRAFFIC, key.clone(), counted.clone());
            self.external(
                Dispatch::Ips,
                &key,
                &cluster,
                &local,
                etp_local,
                &no_endpoint,
                &comment,
            );
            self.affinity(timeout, AffinityKey::Ip(key.clone()), external_sets);
            if port.load_balancer_ips().contains(&ip) {
                let ranges: Vec<IpNet> = port
                    .load_balancer_source_ranges()
                    .iter()
                    .filter(|n| f.is(&n.addr()))
                    .copied()
                    .collect();
                if !ranges.is_empty() {
                    self.elem(FIREWALL_IPS, key.clone(), Element::key_only());
                    // kube-proxy's allowFromNode: when a range holds the node's IP, the node
                    // itself may reach a load-balancer IP assigned to it, whose connections
                    // then come from the load-balancer IP itself.
                    let mut allowed = ranges.clone();
                    if ranges
                        .iter()
                        .any(|r| node.addresses().iter().any(|a| r.contains(a)))
                    {
                        allowed.push(IpNet::from(ip));
                    }
                    // Overlapping intervals are refused by the kernel: merge them first.
                    for r in IpNet::aggregate(&allowed) {
                        let mut k = key.clone();
                        k.push(net_value(r));
                        self.elem(FIREWALL_ALLOW, k, Element::key_only());
                    }
                }
            }
        }

        // NodePort.
        if let Some(np) = port.node_port() {
            let key = vec![proto, Value::Port(np)];
            self.elem(NODEPORT_TRAFFIC, key.clone(), counted.clone());
            self.external(
                Dispatch::NodePorts,
                &key,
                &cluster,
                &local,
                etp_local,
                &no_endpoint,
                &comment,
            );
            self.affinity(timeout, AffinityKey::NodePort(key), external_sets);
        }
    }

    /// An external entry point: eTP Cluster masquerades and uses all endpoints; eTP Local uses
    /// local endpoints for outside traffic and all endpoints for pods and the node itself.
    #[allow(clippy::too_many_arguments)]
    fn external(
        &mut self,
        d: Dispatch,
        key: &[Value],
        cluster: &[Vec<Value>],
        local: &[Vec<Value>],
        etp_local: bool,
        no_endpoint: &Element,
        comment: &Option<String>,
    ) {
        let (vmap, local_vmap, masq, masq_local, local_dispatch) = if d == Dispatch::Ips {
            (
                SERVICE_IPS,
                EXTERNAL_LOCAL_IPS,
                MASQ_IPS,
                MASQ_LOCAL_SOURCE_IPS,
                Dispatch::IpsLocal,
            )
        } else {
            (
                SERVICE_NODEPORTS,
                NODEPORT_EXTERNAL_LOCAL,
                MASQ_NODEPORTS,
                MASQ_LOCAL_SOURCE_NODEPORTS,
                Dispatch::NodePortsLocal,
            )
        };
        if !etp_local {
            self.elem(masq, key.to_vec(), Element::key_only());
            self.dispatch(d, vmap, key, cluster, no_endpoint, comment);
            return;
        }
        self.elem(masq_local, key.to_vec(), Element::key_only());
        // Pods and the node itself: all endpoints (short-circuit), no filter entry needed when
        // there are some, since the connection is DNATed before the filter hooks.
        let none = Element::verdict(Verdict::Return);
        if cluster.is_empty() {
            self.no_endpoint(d, key, no_endpoint.clone());
        } else {
            self.add_dispatch(d, vmap, key, cluster, comment);
        }
        if local.is_empty() {
            // Outside traffic must not fall through to the short-circuit path: stop here and
            // let the filter hooks drop (or reject) it.
            self.elem(
                local_vmap,
                key.to_vec(),
                Element {
                    comment: comment.clone(),
                    ..none
                },
            );
            self.no_endpoint(d, key, no_endpoint.clone());
        } else {
            self.add_dispatch(local_dispatch, local_vmap, key, local, comment);
        }
    }

    fn no_endpoint(&mut self, d: Dispatch, key: &[Value], e: Element) {
        let map = if d.has_daddr() {
            NO_ENDPOINT_SERVICES
        } else {
            NO_ENDPOINT_NODEPORTS
        };
        self.elem(map, key.to_vec(), e);
    }

    fn dispatch(
        &mut self,
        d: Dispatch,
        vmap: &'static str,
        key: &[Value],
        endpoints: &[Vec<Value>],
        no_endpoint: &Element,
        comment: &Option<String>,
    ) {
        if endpoints.is_empty() {
            self.no_endpoint(d, key, no_endpoint.clone());
        } else {
            self.add_dispatch(d, vmap, key, endpoints, comment);
        }
    }

    fn add_dispatch(
        &mut self,
        d: Dispatch,
        vmap: &'static str,
        key: &[Value],
        endpoints: &[Vec<Value>],
        comment: &Option<String>,
    ) {
        let n = endpoints.len();
        // ClientIP affinity: a client without an affinity entry (its first connection, or one
        // after the timeout) gets the endpoint a hash of its address picks, the same through
        // every address of the service port (the endpoint lists are the same, in the same
        // order), so it lands on one endpoint whether it comes by the cluster IP, an external
        // or load-balancer IP or the node port; each address's affinity entry then keeps it
        // there for the timeout, also across endpoint changes.
        let d = if self.sticky { d.sticky() } else { d };
        self.frag.counts.insert((d, n));
        let verdict = Element {
            comment: comment.clone(),
            ..Element::verdict(Verdict::Goto(d.chain(n)))
        };
        self.elem(vmap, key.to_vec(), verdict);
        for (i, ep) in endpoints.iter().enumerate() {
            let mut k = key.to_vec();
            k.push(Value::Integer(i as u32));
            self.elem(d.map(), k, Element::values(ep.clone()));
            self.frag.endpoint_elements += 1;
        }
    }

    fn affinity(
        &mut self,
        timeout: Option<Duration>,
        key: AffinityKey,
        endpoints: &[&[Vec<Value>]],
    ) {
        let Some(t) = timeout else { return };
        let secs = t.as_secs();
        self.frag.timeouts.insert(secs);
        let allowed: Vec<Vec<Value>> = endpoints
            .iter()
            .flat_map(|s| s.iter().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let (set, dest) = match key {
            AffinityKey::Ip(k) => (SetRef::AffinityKeys(secs), AffinityDestination::Address(k)),
            AffinityKey::NodePort(k) => (
                SetRef::AffinityNodePortKeys(secs),
                AffinityDestination::NodePort(k),
            ),
        };
        self.frag
            .elems
            .push((set, dest.key().to_vec(), Element::key_only()));
        self.frag.affinity.push((secs, dest, allowed));
    }
}

/// The traffic counting sets: service addresses and node ports, a counter per element.
fn traffic_sets(f: Fam) -> [(&'static str, SetSpec); 2] {
    let counted = |key: Vec<DataType>, comment: &str| {
        let mut s = SetSpec::set(key);
        s.flags.counter = true;
        s.comment = Some(comment.into());
        s
    };
    [
        (
            SERVICE_TRAFFIC,
            counted(
                vec![f.addr, DataType::InetProto, DataType::InetService],
                "service addresses: packets and bytes of their connections",
            ),
        ),
        (
            NODEPORT_TRAFFIC,
            counted(
                vec![DataType::InetProto, DataType::InetService],
                "node ports: packets and bytes of their connections",
            ),
        ),
    ]
}

/// The affinity map for timeout `secs`: `saddr . vip . proto . port → endpoint`.
fn affinity_map_spec(f: Fam, secs: u64) -> SetSpec {
    dynamic_affinity_map(
        vec![pl(f.saddr), pl(f.daddr), L4PROTO, DPORT],
        f,
        secs,
        format!("ClientIP affinity, timeout {secs}s"),
    )
}

/// The node-port affinity map for timeout `secs`: `saddr . proto . port → endpoint`, whatever
/// node address the client used (a Service port's affinity does not depend on the address).
fn affinity_nodeport_map_spec(f: Fam, secs: u64) -> SetSpec {
    dynamic_affinity_map(
        vec![pl(f.saddr), L4PROTO, DPORT],
        f,
        secs,
        format!("ClientIP affinity on node ports, timeout {secs}s"),
    )
}

/// A map from `key` to an endpoint (`daddr . dport`) that the packet path updates, whose
/// elements expire `secs` after their last update.
fn dynamic_affinity_map(key: Vec<Expr>, f: Fam, secs: u64, comment: String) -> SetSpec {
    let mut spec = SetSpec::map(
        KeySpec::Typeof(key),
        MapData::Values(KeySpec::Typeof(vec![pl(f.daddr), DPORT])),
    );
    spec.flags = SetFlags {
        dynamic: true,
        timeout: true,
        ..SetFlags::default()
    };
    spec.timeout = Some(Duration::from_secs(secs));
    spec.comment = Some(comment);
    spec
}

/// The affinity maps and key sets for timeout `secs`.
fn affinity_sets(f: Fam, table: &mut Table, secs: u64) {
    table
        .sets
        .insert(affinity_map(secs), Set::new(affinity_map_spec(f, secs)));
    table.sets.insert(
        affinity_nodeport_map(secs),
        Set::new(affinity_nodeport_map_spec(f, secs)),
    );
    // Plain `type` keys (not `typeof … ct original proto-dst`): nft 1.0.6 can then load the
    // rendered elements, and the rules give `ct original proto-dst` its protocol context.
    let mut keys = SetSpec::set(vec![f.addr, DataType::InetProto, DataType::InetService]);
    keys.comment = Some(format!("service addresses with affinity timeout {secs}s"));
    table.sets.insert(affinity_keys(secs), Set::new(keys));
    let mut np = SetSpec::set(vec![DataType::InetProto, DataType::InetService]);
    np.comment = Some(format!("node ports with affinity timeout {secs}s"));
    table
        .sets
        .insert(affinity_nodeport_keys(secs), Set::new(np));
}

/// The whole table without elements: static sets, affinity sets for `timeouts`, and chains,
/// with a `pick-N` chain for every endpoint count in `counts`.
fn skeleton(
    f: Fam,
    cfg: &Config,
    counts: &BTreeSet<(Dispatch, usize)>,
    timeouts: &BTreeSet<u64>,
) -> Table {
    let mut table = skeleton_sets(f, cfg);
    for &secs in timeouts {
        affinity_sets(f, &mut table, secs);
    }
    let mark = cfg.mark();
    let mut chains: BTreeMap<String, Chain> = BTreeMap::new();
    let base = |kind, hook, priority| ChainSpec {
        base: Some(BaseChain {
            kind,
            hook,
            priority,
            policy: Policy::Accept,
        }),
        comment: None,
    };
    let regular = |comment: &str| ChainSpec {
        base: None,
        comment: Some(comment.into()),
    };
    let jump = |c: &str| Stmt::Verdict(Verdict::Jump(c.into()));
    let new = Stmt::CtState(CtState::New);
    let set_mark = Stmt::SetMark(MarkOp::Or(mark));
    let k3 = || vec![pl(f.daddr), L4PROTO, DPORT];
    let k2 = || vec![L4PROTO, DPORT];
    let lookup = |key: Vec<Expr>, set: &str| Stmt::Lookup {
        key,
        set: set.into(),
        negate: false,
    };
    let vmap = |key: Vec<Expr>, map: &str| Stmt::Vmap {
        key,
        map: map.into(),
    };
    let fib_saddr_local = Stmt::FibLocal(FibAddr::Saddr);
    // Destination is a NodePort address of this node.
    let nodeport_dest: Vec<Stmt> = match cfg.nodeport_cidrs() {
        None => vec![
            Stmt::FibLocal(FibAddr::Daddr),
            Stmt::Match {
                left: pl(f.daddr),
                op: CmpOp::Ne,
                right: f.loopback(),
            },
        ],
        Some(_) => vec![
            Stmt::FibLocal(FibAddr::Daddr),
            lookup(vec![pl(f.daddr)], NODEPORT_IPS),
        ],
    };
    let with = |pre: &[Stmt], more: Vec<Stmt>| -> Rule {
        let mut v = pre.to_vec();
        v.extend(more);
        Rule::new(v)
    };
    let local = cfg.local_matches(f);

    // nat: masquerade marks, affinity, dispatch.
    let mut services = Vec::new();
    if cfg.masquerade_all {
        services.push(
            Rule::new(vec![
                lookup(vec![pl(f.daddr)], CLUSTER_IPS),
                set_mark.clone(),
            ])
            .with_comment("masquerade all cluster IP traffic"),
        );
    } else {
        for (left, right) in &local {
            services.push(
                Rule::new(vec![
                    lookup(vec![pl(f.daddr)], CLUSTER_IPS),
                    Stmt::Match {
                        left: *left,
                        op: CmpOp::Ne,
                        right: *right,
                    },
                    set_mark.clone(),
                ])
                .with_comment("masquerade cluster IP traffic from outside the cluster"),
            );
        }
    }
    services.push(Rule::new(vec![lookup(k3(), MASQ_IPS), set_mark.clone()]));
    services.push(Rule::new(vec![
        fib_saddr_local.clone(),
        lookup(k3(), MASQ_LOCAL_SOURCE_IPS),
        set_mark.clone(),
    ]));
    services.push(with(
        &nodeport_dest,
        vec![lookup(k2(), MASQ_NODEPORTS), set_mark.clone()],
    ));
    services.push(with(
        &nodeport_dest,
        vec![
            fib_saddr_local.clone(),
            lookup(k2(), MASQ_LOCAL_SOURCE_NODEPORTS),
            set_mark.clone(),
        ],
    ));
    for &secs in timeouts {
        services.push(
            Rule::new(vec![Stmt::DnatMap {
                family: f.nat,
                key: vec![pl(f.saddr), pl(f.daddr), L4PROTO, DPORT],
                map: affinity_map(secs),
            }])
            .with_comment("ClientIP affinity"),
        );
    }
    // Node ports after every service address, as dispatch does: a service address (e.g. an
    // external IP that is also a node address) never takes a node port's affinity.
    for &secs in timeouts {
        services.push(
            with(
                &nodeport_dest,
                vec![
                    Stmt::Lookup {
                        key: k3(),
                        set: SERVICE_TRAFFIC.into(),
                        negate: true,
                    },
                    Stmt::DnatMap {
                        family: f.nat,
                        key: vec![pl(f.saddr), L4PROTO, DPORT],
                        map: affinity_nodeport_map(secs),
                    },
                ],
            )
            .with_comment("ClientIP affinity on node ports"),
        );
    }
    // Dispatch. Pods and the node itself are short-circuited to all endpoints before the
    // eTP Local maps are consulted for everything else.
    services.push(Rule::new(vec![
        fib_saddr_local.clone(),
        vmap(k3(), SERVICE_IPS),
    ]));
    for (left, right) in &local {
        services.push(Rule::new(vec![
            Stmt::Match {
                left: *left,
                op: CmpOp::Eq,
                right: *right,
            },
            vmap(k3(), SERVICE_IPS),
        ]));
    }
    services.push(Rule::new(vec![vmap(k3(), EXTERNAL_LOCAL_IPS)]));
    services.push(Rule::new(vec![vmap(k3(), SERVICE_IPS)]));
    services.push(with(
        &nodeport_dest,
        vec![fib_saddr_local.clone(), vmap(k2(), SERVICE_NODEPORTS)],
    ));
    for (left, right) in &local {
        services.push(with(
            &nodeport_dest,
            vec![
                Stmt::Match {
                    left: *left,
                    op: CmpOp::Eq,
                    right: *right,
                },
                vmap(k2(), SERVICE_NODEPORTS),
            ],
        ));
    }
    services.push(with(
        &nodeport_dest,
        vec![vmap(k2(), NODEPORT_EXTERNAL_LOCAL)],
    ));
    services.push(with(&nodeport_dest, vec![vmap(k2(), SERVICE_NODEPORTS)]));
    chains.insert(
        SERVICES.into(),
        Chain {
            spec: regular("dispatch to service endpoints"),
            rules: services,
        },
    );

    for &(d, n) in counts {
        let mut key = Vec::new();
        if d.has_daddr() {
            key.push(pl(f.daddr));
        }
        let (bucket, what) = if d.is_sticky() {
            (
                Expr::Jhash {
                    of: f.saddr,
                    modulus: n as u32,
                },
                "choice by client address",
            )
        } else {
            (Expr::NumgenRandom { modulus: n as u32 }, "uniform choice")
        };
        key.extend([L4PROTO, DPORT, bucket]);
        chains.insert(
            d.chain(n),
            Chain {
                spec: regular(&format!("{what} among {n} endpoints")),
                rules: vec![Rule::new(vec![Stmt::DnatMap {
                    family: f.nat,
                    key,
                    map: d.map().into(),
                }])],
            },
        );
    }

    chains.insert(
        MASQUERADING.into(),
        Chain {
            spec: regular("masquerade marked and hairpin connections"),
            rules: vec![
                Rule::new(vec![
                    Stmt::MarkMatch {
                        mask: mark,
                        op: CmpOp::Ne,
                        value: 0,
                    },
                    Stmt::SetMark(MarkOp::Xor(mark)),
                    Stmt::Masquerade { fully_random: true },
                ]),
                Rule::new(vec![
                    Stmt::CtStatus(CtStatus::Dnat),
                    lookup(vec![pl(f.saddr), pl(f.daddr)], HAIRPIN),
                    Stmt::Masquerade { fully_random: true },
                ]),
            ],
        },
    );

    // Affinity: remember the endpoint every new connection was sent to, right where it was
    // chosen: just after the nat hooks of prerouting and output, which every connection
    // traverses (postrouting is never reached by connections delivered to the node itself, e.g.
    // to a host-network endpoint). Only connections dispatched for a service address or node
    // port with affinity are recorded: a node port entry needs an original destination that is
    // no service address (another Service's cluster IP on the same port number is not it).
    if !timeouts.is_empty() {
        let mut rules = Vec::new();
        let orig3 = || {
            vec![
                Expr::Ct(f.ct_daddr),
                L4PROTO,
                Expr::Ct(CtKey::OriginalProtoDst),
            ]
        };
        for &secs in timeouts {
            let data = vec![pl(f.daddr), DPORT];
            let mut key = vec![pl(f.saddr)];
            key.extend(orig3());
            let update = Stmt::Dynset {
                op: DynsetOp::Update,
                set: affinity_map(secs),
                key,
                data: data.clone(),
            };
            let update_nodeport = Stmt::Dynset {
                op: DynsetOp::Update,
                set: affinity_nodeport_map(secs),
                key: vec![pl(f.saddr), L4PROTO, Expr::Ct(CtKey::OriginalProtoDst)],
                data,
            };
            // One rule per protocol: nft 1.0.6 only parses `ct original proto-dst` in a
            // concatenation once the rule has fixed the protocol.
            for proto in [Value::TCP, Value::UDP, Value::SCTP] {
                let l4 = Stmt::Match {
                    left: L4PROTO,
                    op: CmpOp::Eq,
                    right: proto,
                };
                rules.push(Rule::new(vec![
                    l4.clone(),
                    new.clone(),
                    Stmt::CtStatus(CtStatus::Dnat),
                    lookup(orig3(), &affinity_keys(secs)),
                    update.clone(),
                ]));
                rules.push(Rule::new(vec![
                    l4,
                    new.clone(),
                    Stmt::CtStatus(CtStatus::Dnat),
                    Stmt::Lookup {
                        key: orig3(),
                        set: SERVICE_TRAFFIC.into(),
                        negate: true,
                    },
                    lookup(
                        vec![L4PROTO, Expr::Ct(CtKey::OriginalProtoDst)],
                        &affinity_nodeport_keys(secs),
                    ),
                    update_nodeport.clone(),
                ]));
            }
        }
        chains.insert(
            AFFINITY_RECORD.into(),
            Chain {
                spec: regular("remember the endpoint chosen for a ClientIP affinity service"),
                rules,
            },
        );
        for (name, hook) in [
            (AFFINITY_RECORD_PREROUTING, Hook::Prerouting),
            (AFFINITY_RECORD_OUTPUT, Hook::Output),
        ] {
            chains.insert(
                name.into(),
                Chain {
                    spec: base(ChainType::Filter, hook, -99),
                    rules: vec![Rule::new(vec![jump(AFFINITY_RECORD)])],
                },
            );
        }
    }

    // filter: source ranges before DNAT, no-endpoint verdicts after.
    chains.insert(
        FIREWALL_CHECK.into(),
        Chain {
            spec: regular("loadBalancerSourceRanges"),
            rules: vec![Rule::new(vec![
                lookup(k3(), FIREWALL_IPS),
                Stmt::Lookup {
                    key: vec![pl(f.daddr), L4PROTO, DPORT, pl(f.saddr)],
                    set: FIREWALL_ALLOW.into(),
                    negate: true,
                },
                Stmt::Verdict(Verdict::Drop),
            ])],
        },
    );
    chains.insert(
        SERVICE_ENDPOINTS_CHECK.into(),
        Chain {
            spec: regular("service addresses without usable endpoints"),
            rules: vec![
                Rule::new(vec![vmap(k3(), NO_ENDPOINT_SERVICES)]),
                // Still addressed to a cluster IP after DNAT: a port the Service does not have.
                // Reject it, as kube-proxy does, rather than route it off the node.
                Rule::new(vec![lookup(vec![pl(f.daddr)], CLUSTER_IPS), Stmt::Reject])
                    .with_comment("reject traffic to invalid ports of cluster IPs"),
                // An address of a ServiceCIDR that no Service holds: dropped, as kube-proxy's
                // "Drop traffic to unallocated ClusterIPs".
                Rule::new(vec![
                    lookup(vec![pl(f.daddr)], SERVICE_CIDRS),
                    Stmt::Verdict(Verdict::Drop),
                ])
                .with_comment("drop traffic to unallocated cluster IPs"),
            ],
        },
    );
    chains.insert(
        NODEPORT_ENDPOINTS_CHECK.into(),
        Chain {
            spec: regular("node ports without usable endpoints"),
            rules: vec![with(
                &nodeport_dest,
                vec![vmap(k2(), NO_ENDPOINT_NODEPORTS)],
            )],
        },
    );
    // Counters: the original destination of every packet of a DNATed connection. nft 1.0.6
    // parses `ct original proto-dst` in a concatenation only once the protocol is known,
    // hence one rule per protocol.
    let mut counting = Vec::new();
    for proto in [Value::TCP, Value::UDP, Value::SCTP] {
        let l4 = Stmt::Match {
            left: L4PROTO,
            op: CmpOp::Eq,
            right: proto,
        };
        let orig_port = Expr::Ct(CtKey::OriginalProtoDst);
        for (key, set) in [
            (
                vec![Expr::Ct(f.ct_daddr), L4PROTO, orig_port],
                SERVICE_TRAFFIC,
            ),
            (vec![L4PROTO, orig_port], NODEPORT_TRAFFIC),
        ] {
            counting.push(Rule::new(vec![
                l4.clone(),
                lookup(key, set),
                Stmt::Verdict(Verdict::Return),
            ]));
        }
    }
    chains.insert(
        COUNT_SERVICE_TRAFFIC.into(),
        Chain {
            spec: regular("count the packets of connections to service addresses and node ports"),
            rules: counting,
        },
    );
    chains.insert(
        REJECT_CHAIN.into(),
        Chain {
            spec: regular("reject: the service has no endpoints"),
            rules: vec![Rule::new(vec![Stmt::Reject])],
        },
    );

    // Base chains, at kube-proxy's hooks and priorities.
    let count = vec![Stmt::CtStatus(CtStatus::Dnat), jump(COUNT_SERVICE_TRAFFIC)];
    let base_rules = [
        (
            "filter-prerouting-pre-dnat",
            ChainType::Filter,
            Hook::Prerouting,
            -110,
            vec![vec![new.clone(), jump(FIREWALL_CHECK)]],
        ),
        (
            "filter-output-pre-dnat",
            ChainType::Filter,
            Hook::Output,
            -110,
            vec![vec![new.clone(), jump(FIREWALL_CHECK)]],
        ),
        (
            "filter-input",
            ChainType::Filter,
            Hook::Input,
            0,
            vec![
                vec![new.clone(), jump(NODEPORT_ENDPOINTS_CHECK)],
                vec![new.clone(), jump(SERVICE_ENDPOINTS_CHECK)],
                count.clone(),
            ],
        ),
        (
            "filter-forward",
            ChainType::Filter,
            Hook::Forward,
            0,
            vec![
                vec![new.clone(), jump(SERVICE_ENDPOINTS_CHECK)],
                count.clone(),
            ],
        ),
        (
            "filter-output",
            ChainType::Filter,
            Hook::Output,
            0,
            vec![
                vec![new.clone(), jump(SERVICE_ENDPOINTS_CHECK)],
                count.clone(),
            ],
        ),
        (
            "nat-prerouting",
            ChainType::Nat,
            Hook::Prerouting,
            -100,
            vec![vec![jump(SERVICES)]],
        ),
        (
            "nat-output",
            ChainType::Nat,
            Hook::Output,
            -100,
            vec![vec![jump(SERVICES)]],
        ),
        (
            "nat-postrouting",
            ChainType::Nat,
            Hook::Postrouting,
            100,
            vec![vec![jump(MASQUERADING)]],
        ),
    ];
    for (name, kind, hook, prio, rules) in base_rules {
        chains.insert(
            name.into(),
            Chain {
                spec: base(kind, hook, prio),
                rules: rules.into_iter().map(Rule::new).collect(),
            },
        );
    }
    table.chains = chains;
    table
}

enum AffinityKey {
    Ip(Vec<Value>),
    NodePort(Vec<Value>),
}

/// Name of the ClientIP affinity map for timeout `secs` (`affinity-10800`).
pub fn affinity_map(secs: u64) -> String {
    format!("affinity-{secs}")
}
/// Name of the node-port ClientIP affinity map for timeout `secs` (`affinity-nodeport-10800`).
pub fn affinity_nodeport_map(secs: u64) -> String {
    format!("affinity-nodeport-{secs}")
}
fn affinity_keys(secs: u64) -> String {
    format!("affinity-keys-{secs}")
}
fn affinity_nodeport_keys(secs: u64) -> String {
    format!("affinity-nodeport-keys-{secs}")
}
