//! One service port's contribution to the table ([`Fragment`]): its elements in the static
//! sets and maps, written from the traffic classes [`lb_core::traffic`] decides and the
//! endpoint sets [`lb_core::categorize`] yields.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use lb_core::traffic::{self, Destination, Masquerading, Outcome, Source, TrafficClass};
use lb_core::{EndpointSet, Node, ServicePort, categorize};

use crate::nft::ir::{Element, Rule, Value, Verdict};

use super::affinity::AffinityDestination;
use super::layout::*;
use super::packed::Packed;

/// What one service port contributes to the table: elements, endpoint counts (for the
/// `pick-N` chains) and affinity timeouts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fragment {
    /// The elements, packed (a few bytes per value; issue 13).
    pub(super) elems: Packed,
    pub(super) counts: BTreeSet<(Dispatch, usize)>,
    pub(super) timeouts: BTreeSet<u64>,
    pub(super) endpoint_elements: usize,
    /// ClientIP affinity: per timeout and destination, the endpoints (`ip . port`, sorted)
    /// that destination dispatches to, so stale affinity entries can be found
    /// ([`Compiler::affinity_targets`]).
    pub(super) affinity: Vec<(u64, AffinityDestination, Vec<Vec<Value>>)>,
    /// ClientIP affinity: the service port's record chains, by name, with their rules
    /// ([`super::sticky`]); the key-map elements in `elems` send connections there.
    pub(super) record: Vec<(String, Vec<Rule>)>,
}

/// The traffic classes of a service port's external addresses and node port.
#[derive(Debug, Clone, Copy)]
struct External {
    /// Traffic from elsewhere.
    outside: TrafficClass,
    /// Traffic from pods and from the node itself (one endpoint set for both).
    short_circuit: TrafficClass,
}

impl External {
    /// Whether outside traffic uses another set than the short-circuited sources (eTP Local).
    fn split(self) -> bool {
        self.outside.endpoints != self.short_circuit.endpoints
    }
}

/// Builds one service port's [`Fragment`].
pub(super) struct Builder {
    pub(super) f: Fam,
    pub(super) frag: Fragment,
    /// The service port has ClientIP affinity: its first connections choose by a hash of the
    /// client address ([`Dispatch::sticky`]).
    pub(super) sticky: bool,
    /// The node's masquerading settings, for [`traffic::classify`].
    pub(super) rules: Masquerading,
}

impl Builder {
    fn elem(&mut self, set: &'static str, key: Vec<Value>, e: Element) {
        self.frag.elems.push(SetRef::Static(set), &key, &e);
    }

    pub(super) fn service(
        &mut self,
        port: &ServicePort,
        endpoints: &[lb_core::Endpoint],
        node: &Node,
    ) {
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
        // The endpoints of a class's set (`classify` yields Cluster or Local, never All).
        let values = |class: TrafficClass| match class.endpoints {
            EndpointSet::Local => &local,
            EndpointSet::Cluster | EndpointSet::All => &cluster,
        };
        let rules = self.rules;
        let class = |d: Destination, s: Source| traffic::classify(port, d, s, rules);
        // An empty set is dropped or rejected the same way whatever the destination.
        let no_endpoint = match traffic::when_empty(c.has_any_endpoints()) {
            Outcome::Reject => Element {
                comment: comment.clone(),
                ..Element::verdict(Verdict::Goto(REJECT_CHAIN.into()))
            },
            Outcome::Drop | Outcome::Serve(_) => Element {
                comment: comment.clone(),
                ..Element::verdict(Verdict::Drop)
            },
        };
        for e in c.all() {
            let ip = ip_value(e.ip());
            self.elem(HAIRPIN, vec![ip, ip], Element::key_only());
        }
        let timeout = port.session_affinity().timeout();

        // Internal traffic to the cluster IP.
        let cip = ip_value(cluster_ip);
        self.elem(CLUSTER_IPS, vec![cip], Element::key_only());
        // Internal traffic uses one set whatever its source; only masquerading depends on
        // the source, which the skeleton's rules decide.
        let internal = values(class(Destination::ClusterIp, Source::Elsewhere));
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
        // Where external destinations dispatch (every kind of external address is classed
        // alike): outside clients by their class, pods and the node itself by theirs (the
        // same set for both: the skeleton sends both through `service-ips`).
        let external = External {
            outside: class(Destination::ExternalIp, Source::Elsewhere),
            short_circuit: class(Destination::ExternalIp, Source::Node),
        };
        let outside_set = values(external.outside).as_slice();
        let short_set = values(external.short_circuit).as_slice();
        let external_sets: &[&[Vec<Value>]] = if external.split() {
            &[short_set, outside_set]
        } else {
            &[outside_set]
        };
        for ip in externals {
            let key = vec![ip_value(ip), proto, svc_port];
            self.elem(SERVICE_TRAFFIC, key.clone(), counted.clone());
            self.external(
                Dispatch::Ips,
                &key,
                short_set,
                outside_set,
                external,
                &no_endpoint,
                &comment,
            );
            self.affinity(timeout, AffinityKey::Ip(key.clone()), external_sets);
            // loadBalancerSourceRanges, with kube-proxy's allowFromNode.
            if let Some(allowed) = traffic::allowed_sources(port, ip, node) {
                self.elem(FIREWALL_IPS, key.clone(), Element::key_only());
                // Overlapping intervals are refused by the kernel: merge them first.
                for r in IpNet::aggregate(&allowed) {
                    let mut k = key.clone();
                    k.push(net_value(r));
                    self.elem(FIREWALL_ALLOW, k, Element::key_only());
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
                short_set,
                outside_set,
                external,
                &no_endpoint,
                &comment,
            );
            self.affinity(timeout, AffinityKey::NodePort(key), external_sets);
        }
        let (elems, chains) =
            super::sticky::record(f, &self.frag.affinity, port.name(), external.split());
        for (set, key, e) in elems {
            self.frag.elems.push(set, &key, &e);
        }
        self.frag.record = chains;
    }

    /// An external entry point, from the classes of its traffic: one set for every source
    /// (eTP Cluster: every endpoint, masqueraded), or a split (eTP Local: outside traffic to
    /// the node-local endpoints through the `…-local` maps, unmasqueraded; pods and the node
    /// itself short-circuited to every endpoint, the node's traffic masqueraded).
    #[allow(clippy::too_many_arguments)]
    fn external(
        &mut self,
        d: Dispatch,
        key: &[Value],
        short_set: &[Vec<Value>],
        outside_set: &[Vec<Value>],
        classes: External,
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
        // Masquerading: every source (`masquerade-…`), or only the node's own traffic
        // (`masquerade-local-source-…`, whose rule matches `fib saddr type local`).
        if classes.outside.masquerade() {
            self.elem(masq, key.to_vec(), Element::key_only());
        } else if classes.short_circuit.masquerade() {
            self.elem(masq_local, key.to_vec(), Element::key_only());
        }
        if !classes.split() {
            self.dispatch(d, vmap, key, outside_set, no_endpoint, comment);
            return;
        }
        // Pods and the node itself: short-circuited, no filter entry needed when there are
        // endpoints, since the connection is DNATed before the filter hooks.
        let none = Element::verdict(Verdict::Return);
        if short_set.is_empty() {
            self.no_endpoint(d, key, no_endpoint.clone());
        } else {
            self.add_dispatch(d, vmap, key, short_set, comment);
        }
        if outside_set.is_empty() {
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
            self.add_dispatch(local_dispatch, local_vmap, key, outside_set, comment);
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
        // The key-map elements (to the record chain) are added by `sticky::record`.
        let dest = match key {
            AffinityKey::Ip(k) => AffinityDestination::Address(k),
            AffinityKey::NodePort(k) => AffinityDestination::NodePort(k),
        };
        self.frag.affinity.push((secs, dest, allowed));
    }
}

pub(super) enum AffinityKey {
    Ip(Vec<Value>),
    NodePort(Vec<Value>),
}
