//! The compiler: a [`Snapshot`](crate::store::Snapshot) of service ports and endpoints,
//! categorised by `lb-core` for this node, becomes one nftables table per IP family.
//!
//! # Module tour
//!
//! | module | owns |
//! | --- | --- |
//! | `config` | [`Config`], [`DetectLocal`], [`NodePortAddresses`]: how the node classifies traffic and where NodePorts listen |
//! | `layout` | every nftables object name, the per-family vocabulary (`Fam`) and the dispatch maps and `pick-N` chains (`Dispatch`) |
//! | `skeleton` | the fixed part of a table: static sets and maps, and every chain and rule |
//! | `service` | one service port's [`Fragment`]: its elements in the static sets and maps |
//! | `packed` | the compact encoding of a fragment's elements and the key hashes element ownership is keyed by |
//! | `plan` | the incremental [`Compiler`] ([`Compiler::plan`] / [`Compiler::commit`]), element ownership, [`Stats`], and [`compile()`] for a whole snapshot |
//! | [`affinity`] | the ClientIP affinity maps (names, specs) and the purge of stale entries from what was read back from the kernel |
//!
//! Which endpoints serve which traffic (destination kind × source), whether it is
//! masqueraded, and what happens without endpoints is Kubernetes policy, decided once in
//! [`lb_core::traffic`]; `service` writes those decisions into map elements and `skeleton`
//! tells the sources apart with rules (pod per detectLocalMode, the node itself, elsewhere).
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
mod config;
mod layout;
mod packed;
mod plan;
mod service;
mod skeleton;
mod sticky;

#[cfg(test)]
mod tests;

pub use config::{Config, DetectLocal, NodePortAddresses};

/// The name of every fixed object of a compiled table, for readers of a compiled or
/// programmed ruleset (`explain`, tests). Each is defined once, in the layout, so a reader
/// cannot fall out of step with a rename; numbered names (`pick-N`, `affinity-T`) are built by
/// [`affinity_map`] and [`affinity_nodeport_map`] and are not listed here.
pub mod names {
    pub use super::layout::{
        AFFINITY_RECORD, AFFINITY_RECORD_OUTPUT, AFFINITY_RECORD_PREROUTING, CLUSTER_IPS,
        COUNT_SERVICE_TRAFFIC, ENDPOINTS, ENDPOINTS_LOCAL, EXTERNAL_LOCAL_IPS, FILTER_FORWARD,
        FILTER_INPUT, FILTER_OUTPUT, FILTER_OUTPUT_PRE_DNAT, FILTER_PREROUTING_PRE_DNAT,
        FIREWALL_ALLOW, FIREWALL_CHECK, FIREWALL_IPS, HAIRPIN, MASQ_IPS, MASQ_LOCAL_SOURCE_IPS,
        MASQ_LOCAL_SOURCE_NODEPORTS, MASQ_NODEPORTS, MASQUERADING, NAT_OUTPUT, NAT_POSTROUTING,
        NAT_PREROUTING, NO_ENDPOINT_NODEPORTS, NO_ENDPOINT_SERVICES, NODEPORT_ENDPOINTS,
        NODEPORT_ENDPOINTS_CHECK, NODEPORT_ENDPOINTS_LOCAL, NODEPORT_EXTERNAL_LOCAL, NODEPORT_IPS,
        NODEPORT_TRAFFIC, REJECT_CHAIN, SERVICE_CIDRS, SERVICE_ENDPOINTS_CHECK, SERVICE_IPS,
        SERVICE_NODEPORTS, SERVICE_TRAFFIC, SERVICES,
    };
}
pub use layout::{TABLE, TABLE_COMMENT, affinity_map, affinity_nodeport_map};
pub use plan::{Compiler, Fragments, Plan, Stats, compile};
pub use service::Fragment;
pub use skeleton::{MIN_SET_SIZE, fit_size};
