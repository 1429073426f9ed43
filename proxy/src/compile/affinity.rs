//! ClientIP affinity in one place: the affinity maps (names, declarations), which entries a
//! change made stale, and the transaction that deletes them, computed from what was read back
//! from the kernel. The caller only reads and applies (`crate::sync`).
//!
//! The kernel keeps ClientIP affinity in the dynamic maps `affinity-T` and
//! `affinity-nodeport-T` (see the layout in [`crate::compile`]): `saddr . vip . proto . port`
//! and `saddr . proto . port → endpoint ip . port`, consulted *before* dispatch. When an
//! endpoint leaves a Service, or stops being one that address dispatches to (not ready any
//! more, topology, traffic policy), an entry pointing to it keeps sending its client there
//! until the entry times out (3 h by default). kube-proxy deletes its per-endpoint affinity
//! sets together with the endpoint, so clients move at once; we get the same by deleting such
//! entries with the sync that removed the endpoint:
//!
//! 1. [`Compiler::affinity_touched`]: the destinations that lost an endpoint (or their
//!    affinity with that timeout) in the change, per timeout;
//! 2. [`Compiler::affinity_purge_after`] (in the state the plan leads to) or
//!    [`Compiler::affinity_purge`] (as committed): a [`Purge`] knowing where entries for each
//!    destination may still point, and which maps to read back ([`Purge::maps`]);
//! 3. the sync reads those maps, and [`Purge::deletes`] (through [`stale_entries`]) returns
//!    the commands deleting the stale entries;
//! 4. the transaction that removes the endpoints carries them, and a second look right after
//!    catches entries recorded meanwhile (`Dataplane::sync`, [`crate::sync`]).
//!
//! A full sync replaces the tables, emptying the maps: the sync reads them first
//! ([`Compiler::affinity_maps_after`]) and puts back what is still valid
//! ([`Compiler::affinity_carry_over`]).
//!
//! # Per service port, and what differs from kube-proxy
//!
//! kube-proxy keeps one affinity set per endpoint of each service port, so a client reaching
//! the cluster IP, an external or load-balancer IP and the node port of one service port gets
//! one endpoint. Here affinity lives in maps shared by every Service (so kernel objects do not
//! grow with Services), keyed by what the packet carries: the service address, or the node
//! port (on any node address); nftables cannot feed one lookup's result (a service-port id)
//! into another lookup's key within a rule without a scratch register (the packet mark, which
//! belongs to others). What makes the addresses agree is the first choice: a client without an
//! entry is given the endpoint that a hash of its address picks (`pick-sticky-N`), and every
//! address of the service port lists the same endpoints in the same order, so all of them
//! choose the same one. Two differences remain: when the endpoints change while a client holds
//! an entry for one address, its first connection through another address may choose anew
//! (kube-proxy would keep it on the entry's endpoint); and after the timeout the client's
//! next choice is the same endpoint again while the endpoints are unchanged (kube-proxy picks
//! at random; Kubernetes promises stickiness within the timeout, not a new choice after it).
//!
//! Only destinations that lost an endpoint are examined, so a sync that changes no Service
//! with affinity, or only adds endpoints, reads nothing back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use lb_core::ServicePortName;
use rustc_hash::FxHashMap as HashMap;

use crate::nft::ir::{
    DataType, Element, Expr, Key, KeySpec, MapData, Set, SetFlags, SetSpec, Table, TableId, Value,
};
use crate::nft::{Command, ListedElement};

use super::layout::{
    DPORT, Fam, L4PROTO, SetRef, affinity_keys, affinity_map, affinity_nodeport_keys,
    affinity_nodeport_map, pl,
};
use super::packed::{KeyHash, key_hash};
use super::plan::{Compiler, Plan};
use super::service::Fragment;

/// The service side of an affinity map key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AffinityDestination {
    /// `vip . proto . port`: a cluster, external or load-balancer IP (map `affinity-T`).
    Address(Key),
    /// `proto . port` of a node port (map `affinity-nodeport-T`, whatever node address the
    /// client used).
    NodePort(Key),
}

impl AffinityDestination {
    /// The values: `vip . proto . port` or `proto . port`.
    pub fn key(&self) -> &[Value] {
        match self {
            AffinityDestination::Address(k) | AffinityDestination::NodePort(k) => k,
        }
    }

    /// The destination of an affinity entry `saddr . vip . proto . port` (map `affinity-T`) or
    /// `saddr . proto . port` (map `affinity-nodeport-T`); `None` for anything else.
    pub fn of_entry(key: &[Value]) -> Option<AffinityDestination> {
        match key {
            [_, vip, proto, port] => Some(AffinityDestination::Address(vec![*vip, *proto, *port])),
            [_, proto, port] => Some(AffinityDestination::NodePort(vec![*proto, *port])),
            _ => None,
        }
    }
}

/// Touched destinations, by affinity timeout in seconds.
pub type Touched = BTreeMap<u64, BTreeSet<AffinityDestination>>;

/// For the destinations of one affinity map: the endpoints (`ip . port`) its entries may
/// still point to (empty: none).
pub type AffinityTargets = BTreeMap<AffinityDestination, BTreeSet<Key>>;

/// Whether the affinity entry `key` belongs to one of `dests`.
pub fn belongs_to(key: &[Value], dests: &BTreeSet<AffinityDestination>) -> bool {
    AffinityDestination::of_entry(key).is_some_and(|d| dests.contains(&d))
}

/// Adds `more` to `into`.
pub fn merge(into: &mut Touched, more: Touched) {
    for (secs, dests) in more {
        into.entry(secs).or_default().extend(dests);
    }
}

/// The keys of the affinity entries (`saddr . vip . proto . port` or `saddr . proto . port`,
/// with data `endpoint ip . port`) that point to an endpoint their destination no longer
/// dispatches to. Entries of untouched destinations, and malformed ones, are kept.
pub fn stale_entries<'a>(
    targets: &AffinityTargets,
    entries: impl IntoIterator<Item = (&'a Key, Option<&'a Key>)>,
) -> Vec<Key> {
    let mut stale = Vec::new();
    for (key, data) in entries {
        let (Some(data), Some(dest)) = (data, AffinityDestination::of_entry(key)) else {
            continue;
        };
        if targets
            .get(&dest)
            .is_some_and(|allowed| !allowed.contains(data))
        {
            stale.push(key.clone());
        }
    }
    stale
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
            |k| self.owners.get(&k),
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
        let changed: HashMap<&ServicePortName, Option<&Fragment>> = plan
            .changes
            .iter()
            .map(|(n, f)| (&**n, f.as_ref()))
            .collect();
        self.targets_with(
            touched,
            |k| plan.touched.get(&k).or_else(|| self.owners.get(&k)),
            |name| match changed.get(name) {
                Some(f) => *f,
                None => self.fragments.get(name),
            },
        )
    }

    fn targets_with<'s>(
        &self,
        touched: &Touched,
        owners_of: impl Fn(KeyHash) -> Option<&'s Vec<Arc<ServicePortName>>>,
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
                for name in owners_of(key_hash(set, dest.key())).into_iter().flatten() {
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

    /// The two affinity maps of timeout `secs`: service addresses (`affinity-T`) and node
    /// ports (`affinity-nodeport-T`), in that order.
    pub fn affinity_maps(&self, secs: u64) -> [AffinityMap; 2] {
        affinity_maps(self.f, secs)
    }

    /// The affinity maps the table holds once `plan` is applied: those to read back before a
    /// full sync replaces the table, to carry their entries over
    /// ([`Compiler::affinity_carry_over`]).
    pub fn affinity_maps_after(&self, plan: &Plan) -> Vec<AffinityMap> {
        plan.installed_timeouts
            .iter()
            .flat_map(|&secs| self.affinity_maps(secs))
            .collect()
    }

    /// The purge of the stale entries of `pending` destinations, as committed (a second look
    /// after the transaction, or a retry).
    pub fn affinity_purge(&self, pending: &Touched) -> Purge {
        Purge {
            table: self.table_id(),
            f: self.f,
            targets: self.affinity_targets(pending),
        }
    }

    /// The purge of the stale entries of `touched` destinations in the state `plan` leads to,
    /// so the transaction that takes endpoints away also deletes the entries pointing to them.
    pub fn affinity_purge_after(&self, plan: &Plan, touched: &Touched) -> Purge {
        Purge {
            table: self.table_id(),
            f: self.f,
            targets: self.affinity_targets_after(plan, touched),
        }
    }

    /// After a full sync replaced the table (and so emptied its affinity maps), the commands
    /// putting back the entries `read` before it that still point to an endpoint their
    /// destination may use, for destinations that still have affinity with that timeout.
    /// Entries come back with the map's full timeout, as if the client had just connected.
    pub fn affinity_carry_over(&self, read: ReadBack) -> Vec<Command> {
        let table = self.table_id();
        let all = self.all_affinity();
        let mut out = Vec::new();
        for (map, listed) in read {
            let secs = map.secs;
            let Some(dests) = all.get(&secs) else {
                continue;
            };
            let mut touched = Touched::new();
            touched.insert(secs, dests.clone());
            let Some(targets) = self.affinity_targets(&touched).remove(&secs) else {
                continue;
            };
            let stale: BTreeSet<_> =
                stale_entries(&targets, listed.iter().map(|e| (&e.key, e.data.as_ref())))
                    .into_iter()
                    .collect();
            let elements: Vec<_> = listed
                .into_iter()
                .filter(|e| !stale.contains(&e.key))
                .filter_map(|e| e.data.map(|d| (e.key, Element::values(d))))
                // Only entries for a destination that still has affinity with this timeout.
                .filter(|(k, _)| belongs_to(k, dests))
                .collect();
            if !elements.is_empty() {
                out.push(Command::AddElements {
                    table: table.clone(),
                    set: map.name,
                    elements,
                });
            }
        }
        out
    }
}

/// One ClientIP affinity map of a table, to read back: its timeout, name and declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffinityMap {
    /// The timeout, in seconds.
    pub secs: u64,
    /// `affinity-T` or `affinity-nodeport-T`.
    pub name: String,
    /// How it is declared (the backend decodes the listed elements with it).
    pub spec: SetSpec,
}

/// What was read back from the kernel: affinity maps with the elements each listed. A map the
/// kernel does not hold is left out (it has no entries).
pub type ReadBack = Vec<(AffinityMap, Vec<ListedElement>)>;

/// The deletion of stale affinity entries in one table, in two pure halves around the read:
/// [`Purge::maps`] says which maps to read back, [`Purge::deletes`] turns what they hold into
/// the commands to apply. The caller does the I/O (`crate::sync`).
#[derive(Debug, Clone)]
pub struct Purge {
    table: TableId,
    f: Fam,
    targets: BTreeMap<u64, AffinityTargets>,
}

impl Purge {
    /// The table whose maps are read.
    pub fn table(&self) -> &TableId {
        &self.table
    }

    /// Whether there is nothing to look at (no touched destination).
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// The maps to read back: both maps of every timeout with a touched destination.
    pub fn maps(&self) -> Vec<AffinityMap> {
        self.targets
            .keys()
            .flat_map(|&secs| affinity_maps(self.f, secs))
            .collect()
    }

    /// The commands deleting, from what was `read`, the entries that point to an endpoint
    /// their destination no longer dispatches to ([`stale_entries`]): one per map with any.
    pub fn deletes(&self, read: ReadBack) -> Vec<Command> {
        let mut out = Vec::new();
        for (map, listed) in read {
            let Some(targets) = self.targets.get(&map.secs) else {
                continue;
            };
            let keys = stale_entries(targets, listed.iter().map(|e| (&e.key, e.data.as_ref())));
            if !keys.is_empty() {
                out.push(Command::DeleteElements {
                    table: self.table.clone(),
                    set: map.name,
                    keys,
                });
            }
        }
        out
    }
}

/// The two affinity maps of timeout `secs` in family `f`.
fn affinity_maps(f: Fam, secs: u64) -> [AffinityMap; 2] {
    [
        AffinityMap {
            secs,
            name: affinity_map(secs),
            spec: affinity_map_spec(f, secs),
        },
        AffinityMap {
            secs,
            name: affinity_nodeport_map(secs),
            spec: affinity_nodeport_map_spec(f, secs),
        },
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
pub(super) fn affinity_sets(f: Fam, table: &mut Table, secs: u64) {
    for map in affinity_maps(f, secs) {
        table.sets.insert(map.name, Set::new(map.spec));
    }
    // Plain `type` keys (not `typeof … ct original proto-dst`): nft 1.0.6 can then load the
    // rendered elements, and the rules give `ct original proto-dst` its protocol context.
    // Verdict maps: each key to its service port's record chain (`sticky`).
    let mut keys = SetSpec::map(
        KeySpec::Types(vec![f.addr, DataType::InetProto, DataType::InetService]),
        MapData::Verdict,
    );
    keys.comment = Some(format!(
        "service addresses with affinity timeout {secs}s -> record chain"
    ));
    table.sets.insert(affinity_keys(secs), Set::new(keys));
    let mut np = SetSpec::map(
        KeySpec::Types(vec![DataType::InetProto, DataType::InetService]),
        MapData::Verdict,
    );
    np.comment = Some(format!(
        "node ports with affinity timeout {secs}s -> record chain"
    ));
    table
        .sets
        .insert(affinity_nodeport_keys(secs), Set::new(np));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(s: &str) -> Value {
        Value::Ipv4(s.parse::<Ipv4Addr>().expect("address"))
    }

    fn ep(s: &str) -> Key {
        vec![ip(s), Value::Port(8080)]
    }

    fn entry(client: &str, vip: &str, port: u16, to: &str) -> (Key, Key) {
        (
            vec![ip(client), ip(vip), Value::TCP, Value::Port(port)],
            ep(to),
        )
    }

    fn np_entry(client: &str, port: u16, to: &str) -> (Key, Key) {
        (vec![ip(client), Value::TCP, Value::Port(port)], ep(to))
    }

    fn targets(list: &[(AffinityDestination, &[&str])]) -> AffinityTargets {
        list.iter()
            .map(|(d, eps)| (d.clone(), eps.iter().map(|e| ep(e)).collect()))
            .collect()
    }

    fn address(vip: &str, port: u16) -> AffinityDestination {
        AffinityDestination::Address(vec![ip(vip), Value::TCP, Value::Port(port)])
    }

    fn node_port(port: u16) -> AffinityDestination {
        AffinityDestination::NodePort(vec![Value::TCP, Value::Port(port)])
    }

    fn decide(t: &AffinityTargets, entries: &[(Key, Key)]) -> Vec<Key> {
        stale_entries(t, entries.iter().map(|(k, d)| (k, Some(d))))
    }

    #[test]
    fn an_entry_pointing_to_a_removed_endpoint_is_stale_and_others_stay() {
        let t = targets(&[(address("10.96.0.1", 80), &["10.244.0.2", "10.244.0.3"])]);
        let entries = [
            entry("10.100.0.2", "10.96.0.1", 80, "10.244.0.1"),
            entry("10.100.0.3", "10.96.0.1", 80, "10.244.0.2"),
            entry("10.100.0.4", "10.96.0.1", 80, "10.244.0.3"),
        ];
        assert_eq!(decide(&t, &entries), vec![entries[0].0.clone()]);
    }

    #[test]
    fn entries_of_untouched_destinations_are_kept() {
        let t = targets(&[(address("10.96.0.1", 80), &[])]);
        let entries = [
            entry("10.100.0.2", "10.96.0.2", 80, "10.244.0.1"),
            entry("10.100.0.2", "10.96.0.1", 443, "10.244.0.1"),
            np_entry("10.100.0.2", 80, "10.244.0.1"),
        ];
        assert!(decide(&t, &entries).is_empty());
    }

    #[test]
    fn a_destination_without_endpoints_makes_every_entry_stale() {
        let t = targets(&[(address("10.96.0.1", 80), &[])]);
        let entries = [
            entry("10.100.0.2", "10.96.0.1", 80, "10.244.0.1"),
            entry("10.100.0.3", "10.96.0.1", 80, "10.244.0.2"),
        ];
        assert_eq!(decide(&t, &entries).len(), 2);
    }

    #[test]
    fn node_port_entries_are_keyed_by_protocol_and_port_only() {
        let t = targets(&[(node_port(30080), &["10.244.0.2"])]);
        let entries = [
            np_entry("10.100.0.2", 30080, "10.244.0.1"),
            np_entry("10.100.0.3", 30080, "10.244.0.2"),
            np_entry("10.100.0.3", 30081, "10.244.0.1"),
            // An address entry on the node port's number is another destination.
            entry("10.100.0.2", "10.96.0.9", 30080, "10.244.0.7"),
        ];
        assert_eq!(decide(&t, &entries), vec![entries[0].0.clone()]);
    }

    #[test]
    fn entries_without_data_or_with_an_unexpected_key_are_kept() {
        let t = targets(&[(address("10.96.0.1", 80), &[])]);
        let (k, _) = entry("10.100.0.2", "10.96.0.1", 80, "10.244.0.1");
        let short = vec![ip("10.96.0.1"), Value::TCP];
        let d = ep("10.244.0.1");
        let stale = stale_entries(&t, [(&k, None), (&short, Some(&d))]);
        assert!(stale.is_empty());
        assert!(belongs_to(&k, &[address("10.96.0.1", 80)].into()));
        assert!(!belongs_to(&short, &[address("10.96.0.1", 80)].into()));
    }

    // The purge and the carry-over, from a compiler's state and what was read back.

    use crate::compile::Config;
    use crate::store::ServiceEntry;
    use lb_core::{Endpoint, IpFamily, Node, Protocol, ServicePort, ServiceType};

    fn node() -> Node {
        Node::new("node-a", None).expect("valid node")
    }

    /// A sticky NodePort service port (cluster IP 10.96.0.1:80, node port 30080) with
    /// endpoints `eps` on port 8080.
    fn sticky(eps: &[&str]) -> ServiceEntry {
        ServiceEntry {
            port: ServicePort::builder("ns", "sticky", "http", Protocol::Tcp, 80)
                .cluster_ips(["10.96.0.1"])
                .service_type(ServiceType::NodePort)
                .node_port(30080)
                .client_ip_affinity(Some(600))
                .build()
                .expect("valid service"),
            endpoints: eps
                .iter()
                .map(|ip| {
                    Endpoint::builder(*ip, 8080)
                        .build()
                        .expect("valid endpoint")
                })
                .collect(),
        }
    }

    fn listed((key, data): (Key, Key)) -> ListedElement {
        ListedElement {
            key,
            data: Some(data),
            counter: None,
        }
    }

    /// What the kernel could hold: entries to the kept and the removed endpoint, through the
    /// cluster IP and the node port, and one of another Service.
    fn read_back(maps: &[AffinityMap]) -> ReadBack {
        let (address, node_port) = (&maps[0], &maps[1]);
        vec![
            (
                address.clone(),
                vec![
                    listed(entry("10.100.0.2", "10.96.0.1", 80, "10.244.0.1")),
                    listed(entry("10.100.0.3", "10.96.0.1", 80, "10.244.0.2")),
                    listed(entry("10.100.0.4", "10.96.0.9", 80, "10.244.0.2")),
                ],
            ),
            (
                node_port.clone(),
                vec![
                    listed(np_entry("10.100.0.2", 30080, "10.244.0.1")),
                    listed(np_entry("10.100.0.3", 30080, "10.244.0.2")),
                ],
            ),
        ]
    }

    #[test]
    fn the_purge_deletes_the_read_back_entries_pointing_to_a_removed_endpoint() {
        let mut c = Compiler::new(Config::default(), IpFamily::V4);
        let before = sticky(&["10.244.0.1", "10.244.0.2"]);
        let name = before.port.name().clone();
        let p = c.plan(&node(), [(name.clone(), Some(&before))]);
        c.commit(p);

        let after = sticky(&["10.244.0.1"]);
        let plan = c.plan(&node(), [(name, Some(&after))]);
        let touched = c.affinity_touched(&plan);
        assert_eq!(
            touched,
            Touched::from([(600, [address("10.96.0.1", 80), node_port(30080)].into())])
        );
        let purge = c.affinity_purge_after(&plan, &touched);
        let maps = purge.maps();
        let names: Vec<&str> = maps.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["affinity-600", "affinity-nodeport-600"]);
        assert_eq!(maps, c.affinity_maps(600));
        let deletes = purge.deletes(read_back(&maps));
        assert_eq!(
            deletes,
            vec![
                Command::DeleteElements {
                    table: c.table_id(),
                    set: "affinity-600".into(),
                    keys: vec![entry("10.100.0.3", "10.96.0.1", 80, "10.244.0.2").0],
                },
                Command::DeleteElements {
                    table: c.table_id(),
                    set: "affinity-nodeport-600".into(),
                    keys: vec![np_entry("10.100.0.3", 30080, "10.244.0.2").0],
                },
            ]
        );
    }

    #[test]
    fn a_change_that_only_adds_endpoints_reads_nothing_back() {
        let mut c = Compiler::new(Config::default(), IpFamily::V4);
        let before = sticky(&["10.244.0.1"]);
        let name = before.port.name().clone();
        let p = c.plan(&node(), [(name.clone(), Some(&before))]);
        c.commit(p);
        let after = sticky(&["10.244.0.1", "10.244.0.2"]);
        let plan = c.plan(&node(), [(name, Some(&after))]);
        let touched = c.affinity_touched(&plan);
        assert!(touched.is_empty());
        assert!(c.affinity_purge_after(&plan, &touched).maps().is_empty());
    }

    #[test]
    fn a_full_sync_carries_over_only_entries_that_are_still_valid() {
        let mut c = Compiler::new(Config::default(), IpFamily::V4);
        let now = sticky(&["10.244.0.1"]);
        let p = c.plan(&node(), [(now.port.name().clone(), Some(&now))]);
        let maps = c.affinity_maps_after(&p);
        assert_eq!(maps, c.affinity_maps(600));
        c.commit(p);
        let adds = c.affinity_carry_over(read_back(&maps));
        let kept = |set: &str, key: (Key, Key)| Command::AddElements {
            table: c.table_id(),
            set: set.into(),
            elements: vec![(key.0, Element::values(key.1))],
        };
        // Entries to the removed endpoint, and of a Service without affinity, stay out.
        assert_eq!(
            adds,
            vec![
                kept(
                    "affinity-600",
                    entry("10.100.0.2", "10.96.0.1", 80, "10.244.0.1")
                ),
                kept(
                    "affinity-nodeport-600",
                    np_entry("10.100.0.2", 30080, "10.244.0.1")
                ),
            ]
        );
    }
}
