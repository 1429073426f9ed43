//! The store: model values keyed by object, updated by events, and the snapshots the compiler
//! reads.
//!
//! Updates are plain synchronous calls. A re-list *replaces* everything of a kind
//! ([`Store::replace_services`], [`Store::replace_slices`]), so nothing stale survives a watch
//! restart. Every update records which Services changed, so a sync can be incremental.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

use lb_core::{Endpoint, Node, ServicePort, ServicePortName};

use crate::convert::{ServiceKey, Slice};

/// Identity of an EndpointSlice: namespace and name.
pub type SliceKey = (String, String);

/// Services, EndpointSlices and this node, as model values.
#[derive(Debug, Default, Clone)]
pub struct Store {
    services: BTreeMap<ServiceKey, Vec<ServicePort>>,
    /// Slices by owning Service and slice name, so a Service's slices are one range away.
    slices: BTreeMap<(ServiceKey, String), Slice>,
    /// Which Service each slice (namespace, name) belongs to.
    owner: BTreeMap<SliceKey, ServiceKey>,
    node: Option<Node>,
    changed: BTreeSet<ServiceKey>,
    node_changed: bool,
}

/// One service port with the endpoints of all its EndpointSlices merged.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceEntry {
    /// The port.
    pub port: ServicePort,
    /// Its endpoints, de-duplicated by address and port, in slice-name order. Of duplicate
    /// copies (an endpoint listed in several slices, e.g. while it moves between slices) the
    /// first non-terminating one wins, as in kube-proxy's `endpointslicecache.go`.
    pub endpoints: Vec<Endpoint>,
}

/// Everything the compiler needs, at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// This node.
    pub node: Node,
    /// Every service port, by name.
    pub services: BTreeMap<ServicePortName, ServiceEntry>,
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds, replaces (`Some`) or deletes (`None`) one Service.
    pub fn apply_service(&mut self, key: ServiceKey, ports: Option<Vec<ServicePort>>) {
        if self.services.get(&key) == ports.as_ref() {
            return;
        }
        match ports {
            Some(p) => self.services.insert(key.clone(), p),
            None => self.services.remove(&key),
        };
        self.changed.insert(key);
    }

    /// Adds, replaces (`Some`) or deletes (`None`) one EndpointSlice.
    pub fn apply_slice(&mut self, key: SliceKey, slice: Option<Slice>) {
        let old = self
            .owner
            .get(&key)
            .and_then(|svc| self.slices.get(&(svc.clone(), key.1.clone())));
        if old == slice.as_ref() {
            return;
        }
        if let Some(svc) = self.owner.remove(&key) {
            self.slices.remove(&(svc.clone(), key.1.clone()));
            self.changed.insert(svc);
        }
        if let Some(s) = slice {
            self.changed.insert(s.service.clone());
            self.owner.insert(key.clone(), s.service.clone());
            self.slices.insert((s.service.clone(), key.1), s);
        }
    }

    /// Replaces every Service (a re-list): anything not listed is gone.
    pub fn replace_services(
        &mut self,
        all: impl IntoIterator<Item = (ServiceKey, Vec<ServicePort>)>,
    ) {
        let new: BTreeMap<_, _> = all.into_iter().collect();
        let keys: BTreeSet<ServiceKey> = self.services.keys().chain(new.keys()).cloned().collect();
        for k in keys {
            if self.services.get(&k) != new.get(&k) {
                self.changed.insert(k);
            }
        }
        self.services = new;
    }

    /// Replaces every EndpointSlice (a re-list): anything not listed is gone.
    pub fn replace_slices(&mut self, all: impl IntoIterator<Item = (SliceKey, Slice)>) {
        let mut fresh = Store::default();
        for (k, s) in all {
            fresh.apply_slice(k, Some(s));
        }
        let keys: BTreeSet<&(ServiceKey, String)> =
            self.slices.keys().chain(fresh.slices.keys()).collect();
        for k in keys {
            if self.slices.get(k) != fresh.slices.get(k) {
                self.changed.insert(k.0.clone());
            }
        }
        self.slices = fresh.slices;
        self.owner = fresh.owner;
    }

    /// Sets this node. A zone change changes every Service's topology.
    pub fn set_node(&mut self, node: Node) {
        if self.node.as_ref() != Some(&node) {
            self.node = Some(node);
            self.node_changed = true;
        }
    }

    /// This node, once known.
    pub fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }

    /// Takes the set of Services changed since the last call, and whether the node changed.
    pub fn take_changes(&mut self) -> (BTreeSet<ServiceKey>, bool) {
        (
            std::mem::take(&mut self.changed),
            std::mem::replace(&mut self.node_changed, false),
        )
    }

    /// Whether anything changed since the last [`Store::take_changes`].
    pub fn has_changes(&self) -> bool {
        !self.changed.is_empty() || self.node_changed
    }

    /// Number of Services.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The merged entries of one Service (empty when unknown).
    pub fn entries(&self, key: &ServiceKey) -> Vec<ServiceEntry> {
        let Some(ports) = self.services.get(key) else {
            return Vec::new();
        };
        let slices: Vec<&Slice> = self
            .slices
            .range((key.clone(), String::new())..)
            .take_while(|((svc, _), _)| svc == key)
            .map(|(_, s)| s)
            .collect();
        ports
            .iter()
            .map(|port| {
                let mut seen = HashMap::<SocketAddr, usize>::new();
                let mut endpoints: Vec<Endpoint> = Vec::new();
                for s in &slices {
                    for sp in &s.ports {
                        if sp.name != *port.name().port_name || sp.protocol != port.protocol() {
                            continue;
                        }
                        for ep in s.endpoints_for(sp.port) {
                            match seen.get(&ep.addr()) {
                                None => {
                                    seen.insert(ep.addr(), endpoints.len());
                                    endpoints.push(ep);
                                }
                                // Prefer the non-terminating copy of a duplicate.
                                Some(&i)
                                    if endpoints[i].is_terminating() && !ep.is_terminating() =>
                                {
                                    endpoints[i] = ep;
                                }
                                Some(_) => {}
                            }
                        }
                    }
                }
                ServiceEntry {
                    port: port.clone(),
                    endpoints,
                }
            })
            .collect()
    }

    /// A snapshot of everything, or `None` until the node is known.
    pub fn snapshot(&self) -> Option<Snapshot> {
        let node = self.node.clone()?;
        let mut services = BTreeMap::new();
        for key in self.services.keys() {
            for e in self.entries(key) {
                services.insert(e.port.name().clone(), e);
            }
        }
        Some(Snapshot { node, services })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::SlicePort;
    use lb_core::{Conditions, IpFamily, Protocol};
    use std::num::NonZeroU16;

    fn key() -> ServiceKey {
        ServiceKey {
            namespace: "ns".into(),
            name: "web".into(),
        }
    }

    fn slice(eps: &[(&str, Conditions)]) -> Slice {
        Slice {
            service: key(),
            family: IpFamily::V4,
            ports: vec![SlicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: NonZeroU16::new(8080).expect("non-zero"),
            }],
            endpoints: eps
                .iter()
                .map(|(ip, c)| {
                    Endpoint::builder(ip, 1)
                        .conditions(*c)
                        .build()
                        .expect("valid endpoint")
                })
                .collect(),
        }
    }

    fn merged(slices: &[(&str, Slice)]) -> Vec<(String, Conditions)> {
        let mut store = Store::new();
        let port = ServicePort::builder("ns", "web", "http", Protocol::Tcp, 80)
            .cluster_ips(["10.96.0.1"])
            .build()
            .expect("valid port");
        store.apply_service(key(), Some(vec![port]));
        for (name, s) in slices {
            store.apply_slice(("ns".into(), (*name).into()), Some(s.clone()));
        }
        let entries = store.entries(&key());
        entries[0]
            .endpoints
            .iter()
            .map(|e| (e.addr().to_string(), e.conditions()))
            .collect()
    }

    #[test]
    fn a_duplicate_endpoint_keeps_its_non_terminating_copy_whatever_the_slice_order() {
        // Issue 9, point 4 (kube-proxy `endpointslicecache.go`): a ready endpoint listed again
        // as terminating in another slice stays ready, whichever slice sorts first.
        let ready = slice(&[("10.244.0.1", Conditions::READY)]);
        let terminating = slice(&[("10.244.0.1", Conditions::SERVING_TERMINATING)]);
        for order in [
            [("a", terminating.clone()), ("b", ready.clone())],
            [("a", ready.clone()), ("b", terminating.clone())],
        ] {
            assert_eq!(
                merged(&order),
                vec![("10.244.0.1:8080".to_string(), Conditions::READY)],
                "{order:?}"
            );
        }
    }

    #[test]
    fn duplicates_that_are_all_terminating_keep_the_first_copy_and_others_keep_their_order() {
        let a = slice(&[
            ("10.244.0.2", Conditions::SERVING_TERMINATING),
            ("10.244.0.1", Conditions::READY),
        ]);
        let b = slice(&[
            ("10.244.0.2", Conditions::TERMINATING),
            ("10.244.0.3", Conditions::READY),
        ]);
        assert_eq!(
            merged(&[("a", a), ("b", b)]),
            vec![
                (
                    "10.244.0.2:8080".to_string(),
                    Conditions::SERVING_TERMINATING
                ),
                ("10.244.0.1:8080".to_string(), Conditions::READY),
                ("10.244.0.3:8080".to_string(), Conditions::READY),
            ]
        );
    }
}
