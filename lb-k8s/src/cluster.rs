//! What an embedder asks: "a connection arrived for this address, protocol and port: which
//! Service port is it, and which endpoints may serve it on this node?"
//!
//! [`Cluster`] is fed Service, EndpointSlice and Node objects as a watch (or a directory of
//! manifests) delivers them; [`Cluster::index`] freezes the current state into a
//! [`ServiceIndex`], an immutable lookup table (share it behind an `Arc` and swap it on
//! change). [`ServiceIndex::lookup`] covers every entry point kube-proxy programs: cluster IPs,
//! external IPs, load-balancer IPs (VIP mode) and node ports.
//!
//! Which endpoints serve, per entry point (kube-proxy's rules, decided by
//! [`lb_core::categorize()`]):
//!
//! | reached via | endpoint set |
//! | --- | --- |
//! | cluster IP | `internalTrafficPolicy: Local` → this node's endpoints, else the cluster set |
//! | node port, external IP, load-balancer IP | effective `externalTrafficPolicy: Local` → this node's endpoints, else the cluster set |
//!
//! The external row is for clients outside the cluster. kube-proxy sends traffic from pods and
//! from the node itself to the cluster set even under `externalTrafficPolicy: Local`; an
//! embedder that can tell should use [`Lookup::categorized`]`.cluster()` for such clients.
//! An empty set means the connection must be refused (kube-proxy rejects, or drops under a
//! Local policy with only remote endpoints).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node as K8sNode, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_core::{
    Categorized, Endpoint, EndpointSet, IpFamily, Node, Protocol, ServicePort, categorize,
};

use crate::convert::{self, ConvertError, Converted, Filter, ServiceKey};
use crate::store::{ServiceEntry, Snapshot, Store};

/// Services, EndpointSlices and this node, fed as Kubernetes objects.
///
/// Every update is a plain synchronous call. An invalid object is reported with the error
/// naming it and its field, and the last good version stays in place (as in the daemon); a
/// valid object that is not proxied (headless, another proxy's, ExternalName) removes any
/// earlier version.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    filter: Filter,
    store: Store,
    node_port_addresses: Vec<IpNet>,
}

impl Cluster {
    /// An empty cluster view; `filter` decides which objects are ours (use
    /// `Filter::default()` unless you run as an alternative service proxy).
    pub fn new(filter: Filter) -> Self {
        Self {
            filter,
            ..Self::default()
        }
    }

    /// Restricts node ports to these local addresses (kube-proxy's `--nodeport-addresses`);
    /// by default a node port answers on any address that is not a Service address.
    #[must_use]
    pub fn with_node_port_addresses(mut self, cidrs: impl IntoIterator<Item = IpNet>) -> Self {
        self.node_port_addresses = cidrs.into_iter().collect();
        self
    }

    /// Adds or replaces a Service.
    ///
    /// # Errors
    ///
    /// The Service is invalid; the previous version of it, if any, stays.
    pub fn apply_service(&mut self, svc: &Service) -> Result<(), ConvertError> {
        let key = service_key(svc);
        match convert::service(svc, &self.filter)? {
            Converted::Accepted(ports) => self.store.apply_service(key, Some(ports)),
            Converted::Skipped(_) => self.store.apply_service(key, None),
        }
        Ok(())
    }

    /// Removes a Service (only its namespace and name are read).
    pub fn delete_service(&mut self, svc: &Service) {
        self.store.apply_service(service_key(svc), None);
    }

    /// Adds or replaces an EndpointSlice. Invalid endpoints are left out and returned; the rest
    /// of the slice is used.
    ///
    /// # Errors
    ///
    /// The slice as a whole is invalid (an unknown `addressType`, a bad port); the previous
    /// version of it, if any, stays.
    pub fn apply_endpoint_slice(
        &mut self,
        slice: &EndpointSlice,
    ) -> Result<Vec<ConvertError>, ConvertError> {
        let key = slice_key(slice);
        let (converted, errors) = convert::endpoint_slice(slice, &self.filter)?;
        match converted {
            Converted::Accepted(s) => self.store.apply_slice(key, Some(s)),
            Converted::Skipped(_) => self.store.apply_slice(key, None),
        }
        Ok(errors)
    }

    /// Removes an EndpointSlice (only its namespace and name are read).
    pub fn delete_endpoint_slice(&mut self, slice: &EndpointSlice) {
        self.store.apply_slice(slice_key(slice), None);
    }

    /// Replaces every Service (a watch's re-list, kube-runtime's `Init` … `InitDone`):
    /// Services not listed are gone, so nothing deleted during a watch outage survives.
    /// Invalid Services are left out, as in the daemon, and returned.
    pub fn replace_services<'s>(
        &mut self,
        all: impl IntoIterator<Item = &'s Service>,
    ) -> Vec<ConvertError> {
        let mut errors = Vec::new();
        let mut accepted = Vec::new();
        for svc in all {
            match convert::service(svc, &self.filter) {
                Ok(Converted::Accepted(ports)) => accepted.push((service_key(svc), ports)),
                Ok(Converted::Skipped(_)) => {}
                Err(e) => errors.push(e),
            }
        }
        self.store.replace_services(accepted);
        errors
    }

    /// Replaces every EndpointSlice (a re-list): slices not listed are gone. Invalid slices are
    /// left out and invalid endpoints dropped; both are returned.
    pub fn replace_endpoint_slices<'s>(
        &mut self,
        all: impl IntoIterator<Item = &'s EndpointSlice>,
    ) -> Vec<ConvertError> {
        let mut errors = Vec::new();
        let mut accepted = Vec::new();
        for slice in all {
            match convert::endpoint_slice(slice, &self.filter) {
                Ok((Converted::Accepted(s), errs)) => {
                    errors.extend(errs);
                    accepted.push((slice_key(slice), s));
                }
                Ok((Converted::Skipped(_), _)) => {}
                Err(e) => errors.push(e),
            }
        }
        self.store.replace_slices(accepted);
        errors
    }

    /// Sets this node from its Node object (name and `topology.kubernetes.io/zone` label).
    ///
    /// # Errors
    ///
    /// The Node has no name.
    pub fn set_node(&mut self, node: &K8sNode) -> Result<(), ConvertError> {
        self.store.set_node(convert::node(node)?);
        Ok(())
    }

    /// Sets this node from model values (when there is no Node object to read).
    pub fn set_node_model(&mut self, node: Node) {
        self.store.set_node(node);
    }

    /// The underlying store (merged entries per Service, change tracking).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The lookup table for the current state, or `None` until this node is known.
    pub fn index(&self) -> Option<ServiceIndex> {
        self.store
            .snapshot()
            .map(|s| ServiceIndex::new(&s, self.node_port_addresses.clone()))
    }
}

fn service_key(svc: &Service) -> ServiceKey {
    ServiceKey {
        namespace: svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: svc.metadata.name.clone().unwrap_or_default(),
    }
}

fn slice_key(slice: &EndpointSlice) -> (String, String) {
    (
        slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        slice.metadata.name.clone().unwrap_or_default(),
    )
}

/// How a connection reached a Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Via {
    /// One of `spec.clusterIPs`.
    ClusterIp,
    /// One of `spec.externalIPs`.
    ExternalIp,
    /// A VIP-mode `status.loadBalancer.ingress[].ip`.
    LoadBalancerIp,
    /// `spec.ports[].nodePort` on an address of this node.
    NodePort,
}

impl Via {
    /// Whether this entry point is external (everything but the cluster IP), so that
    /// `externalTrafficPolicy` applies.
    pub fn is_external(self) -> bool {
        self != Via::ClusterIp
    }
}

/// One entry point of a Service port: where connections for it arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    /// The address; `None` for a node port (any address of the node).
    pub address: Option<IpAddr>,
    /// The protocol.
    pub protocol: Protocol,
    /// The port (the node port for [`Via::NodePort`]).
    pub port: u16,
    /// Which kind of entry point it is.
    pub via: Via,
}

/// A Service port with its merged endpoints and the endpoint sets for internal and external
/// traffic, decided once when the index is built.
#[derive(Debug)]
struct Entry {
    entry: ServiceEntry,
    internal: Vec<Endpoint>,
    external: Vec<Endpoint>,
}

/// An immutable lookup table from (address, protocol, port) to a Service port and the
/// endpoints that serve it on this node. Build it with [`Cluster::index`] or
/// [`ServiceIndex::new`].
#[derive(Debug)]
pub struct ServiceIndex {
    node: Node,
    entries: Vec<Entry>,
    by_address: HashMap<(IpAddr, Protocol, u16), (Via, usize)>,
    /// Every Service address, so a node-port lookup can tell them from node addresses.
    service_addresses: HashSet<IpAddr>,
    by_node_port: HashMap<(Protocol, u16), usize>,
    node_port_addresses: Vec<IpNet>,
}

impl ServiceIndex {
    /// Indexes a snapshot. Node ports answer on addresses within `node_port_addresses`, or on
    /// any address that is not a Service address when it is empty.
    ///
    /// Two Service ports claiming the same entry point is a misconfiguration the API server
    /// mostly prevents (it cannot for external IPs); the first in `namespace/name:port` order
    /// keeps it.
    pub fn new(snapshot: &Snapshot, node_port_addresses: Vec<IpNet>) -> Self {
        let node = snapshot.node.clone();
        let mut entries = Vec::with_capacity(snapshot.services.len());
        let mut by_address = HashMap::new();
        let mut by_node_port = HashMap::new();
        for entry in snapshot.services.values() {
            let i = entries.len();
            let port = &entry.port;
            let proto = port.protocol();
            let c = categorize(port, &entry.endpoints, &node);
            let set = |local: bool| -> Vec<Endpoint> {
                let s = if local {
                    EndpointSet::Local
                } else {
                    EndpointSet::Cluster
                };
                c.iter(s).cloned().collect()
            };
            let internal = set(port.internal_policy_local());
            let external = set(port.external_policy_local());
            let frontends = [
                (port.cluster_ips(), Via::ClusterIp),
                (port.external_ips(), Via::ExternalIp),
                (port.load_balancer_ips(), Via::LoadBalancerIp),
            ];
            for (ips, via) in frontends {
                for ip in ips {
                    by_address
                        .entry((*ip, proto, port.port()))
                        .or_insert((via, i));
                }
            }
            if let Some(np) = port.node_port() {
                by_node_port.entry((proto, np)).or_insert(i);
            }
            entries.push(Entry {
                entry: entry.clone(),
                internal,
                external,
            });
        }
        let service_addresses = by_address.keys().map(|&(ip, _, _)| ip).collect();
        Self {
            node,
            entries,
            by_address,
            service_addresses,
            by_node_port,
            node_port_addresses,
        }
    }

    /// The Service port a connection to `address`:`port` over `protocol` is for, with the
    /// endpoints that serve it on this node; `None` when no Service has that entry point.
    ///
    /// Service addresses (cluster, external and load-balancer IPs) are matched first; then
    /// node ports, on an address of the Service's IP families that `node_port_addresses`
    /// allows.
    pub fn lookup(&self, address: IpAddr, protocol: Protocol, port: u16) -> Option<Lookup<'_>> {
        if let Some(&(via, i)) = self.by_address.get(&(address, protocol, port)) {
            return Some(self.hit(i, via));
        }
        let &i = self.by_node_port.get(&(protocol, port))?;
        let sp = &self.entries[i].entry.port;
        let family_ok = sp.ip_families().contains(&IpFamily::of(&address));
        let address_ok = if self.node_port_addresses.is_empty() {
            !self.service_addresses.contains(&address)
        } else {
            self.node_port_addresses
                .iter()
                .any(|n| n.contains(&address))
        };
        (family_ok && address_ok).then(|| self.hit(i, Via::NodePort))
    }

    fn hit(&self, i: usize, via: Via) -> Lookup<'_> {
        Lookup {
            entry: &self.entries[i],
            via,
            node: &self.node,
        }
    }

    /// Every entry point of every Service port, sorted (for opening listeners, or for
    /// printing what is served).
    pub fn frontends(&self) -> Vec<(Frontend, &ServicePort)> {
        let mut out: Vec<(Frontend, &ServicePort)> = self
            .by_address
            .iter()
            .map(|(&(ip, protocol, port), &(via, i))| {
                (
                    Frontend {
                        address: Some(ip),
                        protocol,
                        port,
                        via,
                    },
                    &self.entries[i].entry.port,
                )
            })
            .chain(self.by_node_port.iter().map(|(&(protocol, port), &i)| {
                (
                    Frontend {
                        address: None,
                        protocol,
                        port,
                        via: Via::NodePort,
                    },
                    &self.entries[i].entry.port,
                )
            }))
            .collect();
        out.sort_by_key(|&(f, _)| f);
        out
    }

    /// This node.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Number of Service ports indexed.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no Service port is indexed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The answer of [`ServiceIndex::lookup`].
#[derive(Debug, Clone, Copy)]
pub struct Lookup<'a> {
    entry: &'a Entry,
    via: Via,
    node: &'a Node,
}

impl<'a> Lookup<'a> {
    /// The Service port.
    pub fn service_port(&self) -> &'a ServicePort {
        &self.entry.entry.port
    }

    /// How the connection reached it.
    pub fn via(&self) -> Via {
        self.via
    }

    /// Which endpoint set serves this entry point (see the [module documentation](self)).
    pub fn endpoint_set(&self) -> EndpointSet {
        let port = self.service_port();
        let local = if self.via.is_external() {
            port.external_policy_local()
        } else {
            port.internal_policy_local()
        };
        if local {
            EndpointSet::Local
        } else {
            EndpointSet::Cluster
        }
    }

    /// The endpoints that may serve a new connection from a client outside the cluster, in
    /// slice order; empty means refuse the connection. Pick with `lb_core::pick`,
    /// `lb_core::affinity` (when [`ServicePort::session_affinity`] says ClientIP) or
    /// `lb_core::maglev`.
    pub fn endpoints(&self) -> &'a [Endpoint] {
        if self.via.is_external() {
            &self.entry.external
        } else {
            &self.entry.internal
        }
    }

    /// Every endpoint of the Service port, merged from all its EndpointSlices, usable or not.
    pub fn all_endpoints(&self) -> &'a [Endpoint] {
        &self.entry.entry.endpoints
    }

    /// The full categorisation on this node, with the reason every endpoint was left out of
    /// each set (computed on demand).
    pub fn categorized(&self) -> Categorized<'a> {
        categorize(self.service_port(), self.all_endpoints(), self.node)
    }
}
