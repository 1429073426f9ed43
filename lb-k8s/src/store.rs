//! The store: model values keyed by object, updated by events, and the snapshots the compiler
//! reads.
//!
//! Updates are plain synchronous calls: one [`StoreEvent`] at a time through [`Store::apply`]
//! (the shape of kube-runtime's store writer), or the direct setters it is built on. A re-list
//! (`Init`, `InitApply`…, `InitDone`) *replaces* everything of its kind when it completes, so
//! nothing stale survives a watch restart — a Service or EndpointSlice deleted while the watch
//! was down is gone after `InitDone` — while the old state keeps serving until then. Every
//! update records which Services changed, so a sync can be incremental; a re-list that lists
//! the same objects again marks nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use lb_core::{Endpoint, Node, ServicePort, ServicePortName};

use crate::convert::{ServiceKey, Slice};

/// Identity of an EndpointSlice: namespace and name.
pub type SliceKey = (String, String);

/// One watch event of one kind, already converted to model values (kube-runtime's
/// `watcher::Event`, keyed).
///
/// `Init` starts a re-list, `InitApply` lists one object, `InitDone` ends it: only then does
/// the listed set replace the kind's objects. `Apply` and `Delete` take effect at once; one
/// arriving during a re-list also updates the re-list, since it is newer than what was listed.
#[derive(Debug, Clone, PartialEq)]
pub enum Event<K, V> {
    /// An object was added or changed.
    Apply(K, V),
    /// An object was deleted (or is no longer ours).
    Delete(K),
    /// A re-list starts; an unfinished earlier one is discarded.
    Init,
    /// One object of the re-list.
    InitApply(K, V),
    /// The re-list is complete: everything of the kind not listed is removed.
    InitDone,
}

/// This node as converted from its Node object: the model value and whether it is eligible
/// for load-balancer traffic ([`crate::convert::NodeState`]).
pub type NodeState = crate::convert::NodeState;

/// An event for the store, per kind.
///
/// The Node kind holds one object, this node: a `Delete` is ignored (the last known Node keeps
/// its zone and addresses; kube-proxy likewise keeps running on a node whose object is gone),
/// and a re-list that does not find it keeps the last one.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreEvent {
    /// A Service, keyed by namespace and name, with its ports.
    Service(Event<ServiceKey, Vec<ServicePort>>),
    /// An EndpointSlice, keyed by namespace and name.
    Slice(Event<SliceKey, Slice>),
    /// This node's Node object, keyed by name.
    Node(Event<String, NodeState>),
}

/// The kinds of objects the store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Services.
    Service,
    /// EndpointSlices.
    Slice,
    /// This node's Node.
    Node,
}

impl StoreEvent {
    /// The kind of object the event is about.
    pub fn kind(&self) -> Kind {
        match self {
            StoreEvent::Service(_) => Kind::Service,
            StoreEvent::Slice(_) => Kind::Slice,
            StoreEvent::Node(_) => Kind::Node,
        }
    }
}

/// A re-list in progress for each kind (`None`: none).
#[derive(Debug, Default, Clone)]
struct Relists {
    services: Option<BTreeMap<ServiceKey, Vec<ServicePort>>>,
    slices: Option<BTreeMap<SliceKey, Slice>>,
    node: Option<Option<NodeState>>,
}

/// Services, EndpointSlices and this node, as model values.
#[derive(Debug, Default, Clone)]
pub struct Store {
    services: BTreeMap<ServiceKey, Vec<ServicePort>>,
    /// Slices by owning Service and slice name, so a Service's slices are one range away.
    slices: BTreeMap<(ServiceKey, String), Slice>,
    /// Which Service each slice (namespace, name) belongs to.
    owner: BTreeMap<SliceKey, ServiceKey>,
    node: Option<Node>,
    /// KEP-3836: whether this node may receive load-balancer traffic (true until a Node
    /// object says otherwise).
    node_ineligible: bool,
    changed: BTreeSet<ServiceKey>,
    node_changed: bool,
    relists: Relists,
    /// Kinds whose first re-list completed.
    listed: BTreeSet<Kind>,
    /// The node and zone names of the endpoints held, one copy each (shared by the
    /// endpoints: [`Endpoint::share_names`]).
    names: HashSet<Arc<str>>,
    /// The number of names after they were last pruned of those no endpoint uses.
    names_pruned_at: usize,
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

    /// Applies one event; returns whether the serving state changed (a Service or this node
    /// was marked changed, or the node's eligibility flipped). Events of a re-list change
    /// nothing until its `InitDone`.
    pub fn apply(&mut self, event: StoreEvent) -> bool {
        let kind = event.kind();
        match event {
            StoreEvent::Service(e) => match e {
                Event::Apply(k, v) => {
                    if let Some(buf) = &mut self.relists.services {
                        buf.insert(k.clone(), v.clone());
                    }
                    self.put_service(k, Some(v))
                }
                Event::Delete(k) => {
                    if let Some(buf) = &mut self.relists.services {
                        buf.remove(&k);
                    }
                    self.put_service(k, None)
                }
                Event::Init => {
                    self.relists.services = Some(BTreeMap::new());
                    false
                }
                Event::InitApply(k, v) => {
                    self.relists.services.get_or_insert_default().insert(k, v);
                    false
                }
                Event::InitDone => {
                    let all = self.relists.services.take().unwrap_or_default();
                    self.listed.insert(kind);
                    self.swap_services(all)
                }
            },
            StoreEvent::Slice(e) => match e {
                Event::Apply(k, v) => {
                    if let Some(buf) = &mut self.relists.slices {
                        buf.insert(k.clone(), v.clone());
                    }
                    self.put_slice(k, Some(v))
                }
                Event::Delete(k) => {
                    if let Some(buf) = &mut self.relists.slices {
                        buf.remove(&k);
                    }
                    self.put_slice(k, None)
                }
                Event::Init => {
                    self.relists.slices = Some(BTreeMap::new());
                    false
                }
                Event::InitApply(k, v) => {
                    self.relists.slices.get_or_insert_default().insert(k, v);
                    false
                }
                Event::InitDone => {
                    let all = self.relists.slices.take().unwrap_or_default();
                    self.listed.insert(kind);
                    self.swap_slices(all)
                }
            },
            StoreEvent::Node(e) => match e {
                Event::Apply(_, n) => {
                    if let Some(buf) = &mut self.relists.node {
                        *buf = Some(n.clone());
                    }
                    self.set_node_state(n)
                }
                Event::Delete(_) => false,
                Event::Init => {
                    self.relists.node = Some(None);
                    false
                }
                Event::InitApply(_, n) => {
                    *self.relists.node.get_or_insert_default() = Some(n);
                    false
                }
                Event::InitDone => {
                    self.listed.insert(kind);
                    match self.relists.node.take().flatten() {
                        Some(n) => self.set_node_state(n),
                        None => false,
                    }
                }
            },
        }
    }

    /// Whether a re-list of `kind` completed at least once.
    pub fn listed(&self, kind: Kind) -> bool {
        self.listed.contains(&kind)
    }

    /// The events that make another store hold exactly this one's Services, EndpointSlices and
    /// node: one complete re-list per kind (the node's only when it is known).
    pub fn into_relist(self) -> Vec<StoreEvent> {
        let mut events = Vec::with_capacity(self.services.len() + self.slices.len() + 9);
        events.push(StoreEvent::Service(Event::Init));
        for (k, v) in self.services {
            events.push(StoreEvent::Service(Event::InitApply(k, v)));
        }
        events.push(StoreEvent::Service(Event::InitDone));
        events.push(StoreEvent::Slice(Event::Init));
        for ((svc, name), v) in self.slices {
            events.push(StoreEvent::Slice(Event::InitApply(
                (svc.namespace, name),
                v,
            )));
        }
        events.push(StoreEvent::Slice(Event::InitDone));
        if let Some(node) = self.node {
            events.push(StoreEvent::Node(Event::Init));
            let state = NodeState {
                node: node.clone(),
                eligible: !self.node_ineligible,
            };
            events.push(StoreEvent::Node(Event::InitApply(
                node.name().to_string(),
                state,
            )));
            events.push(StoreEvent::Node(Event::InitDone));
        }
        events
    }

    /// Adds, replaces (`Some`) or deletes (`None`) one Service.
    pub fn apply_service(&mut self, key: ServiceKey, ports: Option<Vec<ServicePort>>) {
        self.put_service(key, ports);
    }

    /// Adds, replaces (`Some`) or deletes (`None`) one EndpointSlice.
    pub fn apply_slice(&mut self, key: SliceKey, slice: Option<Slice>) {
        self.put_slice(key, slice);
    }

    /// Replaces every Service (a re-list): anything not listed is gone.
    pub fn replace_services(
        &mut self,
        all: impl IntoIterator<Item = (ServiceKey, Vec<ServicePort>)>,
    ) {
        self.swap_services(all);
    }

    /// Replaces every EndpointSlice (a re-list): anything not listed is gone.
    pub fn replace_slices(&mut self, all: impl IntoIterator<Item = (SliceKey, Slice)>) {
        self.swap_slices(all);
    }

    /// Sets this node. A zone change changes every Service's topology.
    pub fn set_node(&mut self, node: Node) {
        self.put_node(node);
    }

    /// [`Store::apply_service`]; returns whether it changed.
    fn put_service(&mut self, key: ServiceKey, ports: Option<Vec<ServicePort>>) -> bool {
        if self.services.get(&key) == ports.as_ref() {
            return false;
        }
        match ports {
            Some(p) => self.services.insert(key.clone(), p),
            None => self.services.remove(&key),
        };
        self.changed.insert(key);
        true
    }

    /// [`Store::apply_slice`]; returns whether it changed.
    fn put_slice(&mut self, key: SliceKey, slice: Option<Slice>) -> bool {
        let old = self
            .owner
            .get(&key)
            .and_then(|svc| self.slices.get(&(svc.clone(), key.1.clone())));
        if old == slice.as_ref() {
            return false;
        }
        if let Some(svc) = self.owner.remove(&key) {
            self.slices.remove(&(svc.clone(), key.1.clone()));
            self.changed.insert(svc);
        }
        if let Some(s) = slice {
            self.changed.insert(s.service.clone());
            self.place_slice(key, s);
            if self.names.len() > 2 * self.names_pruned_at + 1024 {
                // Nodes come and go: forget the names no endpoint holds any more.
                self.names.retain(|n| Arc::strong_count(n) > 1);
                self.names_pruned_at = self.names.len();
            }
        }
        true
    }

    /// Puts `slice` under `key` (replacing the slice of that key), sharing its endpoints'
    /// names; records no change.
    fn place_slice(&mut self, key: SliceKey, mut slice: Slice) {
        for e in &mut slice.endpoints {
            e.share_names(&mut self.names);
        }
        if let Some(svc) = self.owner.insert(key.clone(), slice.service.clone()) {
            self.slices.remove(&(svc, key.1.clone()));
        }
        self.slices.insert((slice.service.clone(), key.1), slice);
    }

    /// [`Store::replace_services`]; returns whether any Service changed.
    fn swap_services(
        &mut self,
        all: impl IntoIterator<Item = (ServiceKey, Vec<ServicePort>)>,
    ) -> bool {
        let new: BTreeMap<_, _> = all.into_iter().collect();
        let changed = &mut self.changed;
        let any = for_each_difference(&self.services, &new, |k| {
            changed.insert(k.clone());
        });
        self.services = new;
        any
    }

    /// [`Store::replace_slices`]; returns whether any Service's slices changed.
    fn swap_slices(&mut self, all: impl IntoIterator<Item = (SliceKey, Slice)>) -> bool {
        let mut fresh = Store::default();
        for (k, s) in all {
            fresh.place_slice(k, s);
        }
        fresh.names_pruned_at = fresh.names.len();
        let changed = &mut self.changed;
        // Slices are keyed by their Service first: its differing slices come in a row.
        let mut last: Option<&ServiceKey> = None;
        let any = for_each_difference(&self.slices, &fresh.slices, |(svc, _)| {
            if last != Some(svc) {
                changed.insert(svc.clone());
                last = Some(svc);
            }
        });
        self.slices = fresh.slices;
        self.owner = fresh.owner;
        self.names = fresh.names;
        self.names_pruned_at = fresh.names_pruned_at;
        any
    }

    /// [`Store::set_node`]; returns whether it changed.
    fn put_node(&mut self, node: Node) -> bool {
        if self.node.as_ref() != Some(&node) {
            self.node = Some(node);
            self.node_changed = true;
            return true;
        }
        false
    }

    /// Sets this node and its eligibility; returns whether either changed.
    pub fn set_node_state(&mut self, state: NodeState) -> bool {
        let eligibility = self.node_ineligible == state.eligible;
        self.node_ineligible = !state.eligible;
        self.put_node(state.node) | eligibility
    }

    /// Whether this node may receive load-balancer traffic (KEP-3836; see
    /// [`crate::convert::NodeState`]). True until a Node object says otherwise.
    pub fn node_eligible(&self) -> bool {
        !self.node_ineligible
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

    /// The keys of the Services held, in order.
    pub fn service_keys(&self) -> impl ExactSizeIterator<Item = &ServiceKey> {
        self.services.keys()
    }

    /// The ports of one Service (empty when unknown), without merging its slices.
    pub fn ports(&self, key: &ServiceKey) -> &[ServicePort] {
        self.services.get(key).map_or(&[], Vec::as_slice)
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
        let services = by_name(self.services.keys().map(|key| self.entries(key)));
        Some(Snapshot { node, services })
    }
}

/// Services' merged entries ([`Store::entries`]) by service port name, as a [`Snapshot`] holds
/// them (of two entries with one name, the later one).
pub fn by_name(
    entries: impl IntoIterator<Item = Vec<ServiceEntry>>,
) -> BTreeMap<ServicePortName, ServiceEntry> {
    entries
        .into_iter()
        .flatten()
        .map(|e| (e.port.name().clone(), e))
        .collect()
}

/// Calls `differs` with every key whose value differs between `old` and `new` (held by one
/// only, or by both with unequal values), in key order, walking both maps once; returns
/// whether there was any.
fn for_each_difference<'a, K: Ord, V: PartialEq>(
    old: &'a BTreeMap<K, V>,
    new: &'a BTreeMap<K, V>,
    mut differs: impl FnMut(&'a K),
) -> bool {
    let (mut old, mut new) = (old.iter().peekable(), new.iter().peekable());
    let mut any = false;
    loop {
        let key = match (old.peek().copied(), new.peek().copied()) {
            (None, None) => return any,
            (Some((k, _)), None) => {
                old.next();
                k
            }
            (None, Some((k, _))) => {
                new.next();
                k
            }
            (Some((ko, vo)), Some((kn, vn))) => match ko.cmp(kn) {
                std::cmp::Ordering::Less => {
                    old.next();
                    ko
                }
                std::cmp::Ordering::Greater => {
                    new.next();
                    kn
                }
                std::cmp::Ordering::Equal => {
                    old.next();
                    new.next();
                    if vo == vn {
                        continue;
                    }
                    ko
                }
            },
        };
        any = true;
        differs(key);
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

    /// A slice of `n` endpoints, endpoint `i` on node `node-{(first + i)}`.
    fn slice_on_nodes(first: usize, n: usize) -> Slice {
        let mut s = slice(&[]);
        s.endpoints = (0..n)
            .map(|i| {
                Endpoint::builder(format!("10.0.{}.{}", i / 200, i % 200 + 1), 1)
                    .node_name(&format!("node-{}", first + i))
                    .zone("z1")
                    .build()
                    .expect("valid endpoint")
            })
            .collect();
        s
    }

    #[test]
    fn endpoints_on_one_node_share_its_name_and_names_no_endpoint_uses_are_forgotten() {
        let mut store = Store::new();
        store.apply_slice(("ns".into(), "a".into()), Some(slice_on_nodes(0, 3)));
        store.apply_slice(("ns".into(), "b".into()), Some(slice_on_nodes(1, 3)));
        let node_of = |store: &Store, s: &str, i: usize| {
            let slice = &store.slices[&(key(), s.to_string())];
            slice.endpoints[i].node_name().expect("node").as_ptr()
        };
        // a[1] and b[0] are on node-1; every endpoint is in zone z1.
        assert_eq!(node_of(&store, "a", 1), node_of(&store, "b", 0));
        assert_eq!(store.names.len(), 4 + 1, "node-0..node-3 and z1");
        // Thousands of nodes come and go: the names kept follow the endpoints held.
        for round in 0..10 {
            let s = slice_on_nodes(1000 * (round + 1), 1000);
            store.apply_slice(("ns".into(), "a".into()), Some(s));
        }
        assert!(
            store.names.len() <= 3 * 1000 + 1024,
            "{} names kept",
            store.names.len()
        );
        // A name kept through the pruning is still the one copy: a new endpoint on node-1
        // gets b's.
        store.apply_slice(("ns".into(), "c".into()), Some(slice_on_nodes(1, 1)));
        assert_eq!(node_of(&store, "c", 0), node_of(&store, "b", 0));
        // A re-list adopts the names of what it holds.
        let all: Vec<_> = ["b", "c"]
            .map(|s| {
                let k = ("ns".to_string(), s.to_string());
                (k, store.slices[&(key(), s.to_string())].clone())
            })
            .into();
        store.replace_slices(all);
        assert_eq!(store.names.len(), 3 + 1, "node-1..node-3 and z1");
        assert_eq!(node_of(&store, "c", 0), node_of(&store, "b", 0));
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

    // Re-list semantics (kube-runtime's Init / InitApply / InitDone), without HTTP.

    fn skey(name: &str) -> ServiceKey {
        ServiceKey {
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    fn ports(name: &str, port: u16) -> Vec<ServicePort> {
        vec![
            ServicePort::builder("ns", name, "http", Protocol::Tcp, port)
                .cluster_ips(["10.96.0.1"])
                .build()
                .expect("valid port"),
        ]
    }

    fn slice_of(service: &str, ips: &[&str]) -> Slice {
        let mut s = slice(
            &ips.iter()
                .map(|ip| (*ip, Conditions::READY))
                .collect::<Vec<_>>(),
        );
        s.service = skey(service);
        s
    }

    fn svc(e: Event<ServiceKey, Vec<ServicePort>>) -> StoreEvent {
        StoreEvent::Service(e)
    }

    fn sl(e: Event<SliceKey, Slice>) -> StoreEvent {
        StoreEvent::Slice(e)
    }

    fn sk(name: &str) -> SliceKey {
        ("ns".into(), name.into())
    }

    fn addrs(store: &Store, service: &str) -> Vec<String> {
        store
            .entries(&skey(service))
            .iter()
            .flat_map(|e| e.endpoints.iter().map(|ep| ep.addr().to_string()))
            .collect()
    }

    fn names(set: &BTreeSet<ServiceKey>) -> Vec<&str> {
        set.iter().map(|k| k.name.as_str()).collect()
    }

    /// A store holding Services a and b, slices a-1 (of a) and b-1 (of b), changes taken.
    fn populated() -> Store {
        let mut store = Store::new();
        for e in [
            svc(Event::Init),
            svc(Event::InitApply(skey("a"), ports("a", 80))),
            svc(Event::InitApply(skey("b"), ports("b", 81))),
            svc(Event::InitDone),
            sl(Event::Init),
            sl(Event::InitApply(sk("a-1"), slice_of("a", &["10.244.0.1"]))),
            sl(Event::InitApply(sk("b-1"), slice_of("b", &["10.244.0.2"]))),
            sl(Event::InitDone),
        ] {
            store.apply(e);
        }
        store.take_changes();
        store
    }

    #[test]
    fn a_relist_removes_services_and_slices_deleted_while_the_watch_was_down() {
        let mut store = populated();
        for e in [
            svc(Event::Init),
            svc(Event::InitApply(skey("a"), ports("a", 80))),
            sl(Event::Init),
        ] {
            assert!(!store.apply(e), "nothing changes before InitDone");
        }
        assert!(store.apply(svc(Event::InitDone)));
        assert_eq!(store.service_count(), 1);
        assert!(store.entries(&skey("b")).is_empty());
        // The slice re-list lists nothing: a's endpoints are gone with its slice.
        assert!(store.apply(sl(Event::InitDone)));
        assert_eq!(addrs(&store, "a"), Vec::<String>::new());
        assert_eq!(names(&store.take_changes().0), ["a", "b"]);
    }

    #[test]
    fn a_relist_of_unchanged_objects_marks_nothing_changed() {
        let mut store = populated();
        for e in [
            svc(Event::Init),
            svc(Event::InitApply(skey("b"), ports("b", 81))),
            svc(Event::InitApply(skey("a"), ports("a", 80))),
            svc(Event::InitDone),
            sl(Event::Init),
            sl(Event::InitApply(sk("b-1"), slice_of("b", &["10.244.0.2"]))),
            sl(Event::InitApply(sk("a-1"), slice_of("a", &["10.244.0.1"]))),
            sl(Event::InitDone),
        ] {
            assert!(!store.apply(e));
        }
        assert!(!store.has_changes());
        assert_eq!(addrs(&store, "a"), ["10.244.0.1:8080"]);
    }

    #[test]
    fn a_relist_marks_only_the_services_whose_objects_differ() {
        let mut store = populated();
        for e in [
            sl(Event::Init),
            sl(Event::InitApply(sk("a-1"), slice_of("a", &["10.244.0.1"]))),
            sl(Event::InitApply(sk("b-1"), slice_of("b", &["10.244.0.9"]))),
        ] {
            store.apply(e);
        }
        assert!(store.apply(sl(Event::InitDone)));
        assert_eq!(names(&store.take_changes().0), ["b"]);
        assert_eq!(addrs(&store, "b"), ["10.244.0.9:8080"]);
    }

    #[test]
    fn a_relist_marks_services_of_slices_added_removed_changed_or_moved_and_no_other() {
        let mut store = Store::new();
        let relist = |store: &mut Store, slices: Vec<(&str, Slice)>| {
            store.apply(sl(Event::Init));
            for (k, s) in slices {
                store.apply(sl(Event::InitApply(sk(k), s)));
            }
            store.apply(sl(Event::InitDone));
        };
        relist(
            &mut store,
            vec![
                ("a-1", slice_of("a", &["10.244.0.1"])),
                ("c-1", slice_of("c", &["10.244.0.3"])),
                ("c-2", slice_of("c", &["10.244.0.4"])),
                ("e-1", slice_of("e", &["10.244.0.6"])),
                ("m-1", slice_of("x", &["10.244.0.7"])),
                ("z-1", slice_of("z", &["10.244.0.9"])),
            ],
        );
        assert_eq!(
            names(&store.take_changes().0),
            ["a", "c", "e", "x", "z"],
            "a first list marks every Service with a slice"
        );
        // a-1 removed, b-1 added, c-2 changed (c-1 not), d-1 added, e-1 unchanged, m-1 moved
        // from Service x to y, z-1 unchanged and last (the walk's tail).
        relist(
            &mut store,
            vec![
                ("b-1", slice_of("b", &["10.244.0.2"])),
                ("c-1", slice_of("c", &["10.244.0.3"])),
                ("c-2", slice_of("c", &["10.244.0.5"])),
                ("d-1", slice_of("d", &["10.244.0.8"])),
                ("e-1", slice_of("e", &["10.244.0.6"])),
                ("m-1", slice_of("y", &["10.244.0.7"])),
                ("z-1", slice_of("z", &["10.244.0.9"])),
            ],
        );
        assert_eq!(
            names(&store.take_changes().0),
            ["a", "b", "c", "d", "x", "y"]
        );
    }

    #[test]
    fn the_difference_walk_finds_keys_of_one_map_only_and_unequal_values_at_both_ends() {
        let map = |kv: &[(u8, char)]| kv.iter().copied().collect::<BTreeMap<u8, char>>();
        let differing = |old: &BTreeMap<u8, char>, new: &BTreeMap<u8, char>| {
            let mut keys = Vec::new();
            let any = for_each_difference(old, new, |k| keys.push(*k));
            assert_eq!(any, !keys.is_empty());
            keys
        };
        let old = map(&[(1, 'a'), (3, 'c'), (4, 'd'), (9, 'i')]);
        let new = map(&[(0, 'z'), (3, 'c'), (4, 'x'), (5, 'e')]);
        assert_eq!(differing(&old, &new), [0, 1, 4, 5, 9]);
        assert_eq!(differing(&new, &old), [0, 1, 4, 5, 9]);
        assert_eq!(differing(&old, &old), Vec::<u8>::new());
        assert_eq!(differing(&old, &BTreeMap::new()), [1, 3, 4, 9]);
        assert_eq!(differing(&BTreeMap::new(), &new), [0, 3, 4, 5]);
    }

    #[test]
    fn the_old_state_keeps_serving_during_a_relist_and_kinds_interleave() {
        let mut store = populated();
        // Services and slices re-list at the same time, their events interleaved.
        for e in [
            svc(Event::Init),
            sl(Event::Init),
            sl(Event::InitApply(sk("a-1"), slice_of("a", &["10.244.0.5"]))),
            svc(Event::InitApply(skey("a"), ports("a", 80))),
        ] {
            store.apply(e);
            assert_eq!(store.service_count(), 2);
            assert_eq!(addrs(&store, "a"), ["10.244.0.1:8080"]);
            assert_eq!(addrs(&store, "b"), ["10.244.0.2:8080"]);
        }
        // The slices finish first: b's slice is gone, a's updated; b's Service still serves.
        store.apply(sl(Event::InitDone));
        assert_eq!(addrs(&store, "a"), ["10.244.0.5:8080"]);
        assert_eq!(store.service_count(), 2);
        store.apply(svc(Event::InitDone));
        assert_eq!(store.service_count(), 1);
        assert_eq!(names(&store.take_changes().0), ["a", "b"]);
    }

    #[test]
    fn an_init_without_init_done_is_discarded_by_the_next_init() {
        let mut store = populated();
        for e in [
            svc(Event::Init),
            svc(Event::InitApply(skey("c"), ports("c", 82))),
            // The watch failed before InitDone and starts over.
            svc(Event::Init),
            svc(Event::InitApply(skey("a"), ports("a", 80))),
            svc(Event::InitApply(skey("b"), ports("b", 81))),
        ] {
            store.apply(e);
        }
        assert_eq!(
            store.service_count(),
            2,
            "unfinished re-lists change nothing"
        );
        assert!(!store.apply(svc(Event::InitDone)));
        assert!(
            store.entries(&skey("c")).is_empty(),
            "c was listed by the abandoned re-list only"
        );
        assert!(!store.has_changes());
    }

    #[test]
    fn deletes_and_applies_during_a_relist_take_effect_now_and_survive_init_done() {
        let mut store = populated();
        for e in [
            svc(Event::Init),
            svc(Event::InitApply(skey("a"), ports("a", 80))),
            svc(Event::InitApply(skey("b"), ports("b", 81))),
        ] {
            store.apply(e);
        }
        // Newer than the list: b is deleted and c added while the re-list runs.
        assert!(store.apply(svc(Event::Delete(skey("b")))));
        assert!(store.apply(svc(Event::Apply(skey("c"), ports("c", 82)))));
        assert_eq!(store.service_count(), 2, "a and c serve at once");
        assert_eq!(names(&store.take_changes().0), ["b", "c"]);
        assert!(
            !store.apply(svc(Event::InitDone)),
            "the re-list agrees with the live state"
        );
        assert!(store.entries(&skey("b")).is_empty());
        assert_eq!(store.entries(&skey("c")).len(), 1);
    }

    #[test]
    fn a_slice_deleted_while_its_service_stays_takes_its_endpoints_with_it() {
        let mut store = populated();
        store.apply(sl(Event::Apply(sk("a-2"), slice_of("a", &["10.244.0.3"]))));
        assert_eq!(addrs(&store, "a"), ["10.244.0.1:8080", "10.244.0.3:8080"]);
        store.take_changes();
        assert!(store.apply(sl(Event::Delete(sk("a-1")))));
        assert_eq!(addrs(&store, "a"), ["10.244.0.3:8080"]);
        assert_eq!(store.service_count(), 2);
        assert_eq!(names(&store.take_changes().0), ["a"]);
        // And through a re-list that no longer lists a-2.
        for e in [
            sl(Event::Init),
            sl(Event::InitApply(sk("b-1"), slice_of("b", &["10.244.0.2"]))),
            sl(Event::InitDone),
        ] {
            store.apply(e);
        }
        assert_eq!(addrs(&store, "a"), Vec::<String>::new());
        assert_eq!(store.entries(&skey("a")).len(), 1, "the Service port stays");
        assert_eq!(names(&store.take_changes().0), ["a"]);
    }

    #[test]
    fn a_store_relisted_into_another_makes_it_equal() {
        let source = populated();
        let mut target = Store::new();
        target.apply(svc(Event::Apply(skey("z"), ports("z", 99))));
        for e in source.clone().into_relist() {
            target.apply(e);
        }
        assert_eq!(target.service_count(), 2);
        assert_eq!(addrs(&target, "a"), addrs(&source, "a"));
        assert_eq!(addrs(&target, "b"), addrs(&source, "b"));
        assert!(target.listed(Kind::Service) && target.listed(Kind::Slice));
        assert!(!target.listed(Kind::Node), "the source knew no node");
    }

    #[test]
    fn the_node_keeps_its_last_state_when_deleted_or_not_relisted_and_tracks_eligibility() {
        let mut store = Store::new();
        let n1 = |eligible| NodeState {
            node: Node::new("n1", Some("z1")).expect("valid node"),
            eligible,
        };
        let node = |e| StoreEvent::Node(e);
        assert!(!store.listed(Kind::Node));
        store.apply(node(Event::Init));
        assert!(store.node().is_none());
        assert!(!store.apply(node(Event::InitApply("n1".into(), n1(true)))));
        assert!(store.apply(node(Event::InitDone)));
        assert!(store.listed(Kind::Node));
        assert_eq!(store.node().map(Node::name), Some("n1"));
        assert!(store.node_eligible());
        assert!(store.apply(node(Event::Apply("n1".into(), n1(false)))));
        assert!(!store.node_eligible());
        assert!(!store.apply(node(Event::Delete("n1".into()))));
        store.apply(node(Event::Init));
        assert!(!store.apply(node(Event::InitDone)));
        assert_eq!(store.node().map(Node::name), Some("n1"));
    }
}
