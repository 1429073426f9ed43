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
//! one endpoint. Here affinity lives in maps shared by every Service, keyed by what the packet
//! carries: the service address, or the node port (on any node address). Two things make the
//! addresses of a service port agree: a client without an entry is given the endpoint that a
//! hash of its address picks (`pick-sticky-N`), the same through every address (they list the
//! same endpoints in the same order); and a connection records its endpoint for every address
//! of its service port that dispatches to the same endpoint set at once, through the service
//! port's record chain (`compile::sticky`), so a later first connection through another address
//! finds the entry even after the endpoints changed. One difference remains: after the
//! timeout the client's next choice is the same endpoint again while the endpoints are
//! unchanged (kube-proxy picks at random; Kubernetes promises stickiness within the timeout,
//! not a new choice after it).
//!
//! Only destinations that lost an endpoint are examined, so a sync that changes no Service
//! with affinity, or only adds endpoints, reads nothing back.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::nft::ir::{
    DataType, Expr, Key, KeySpec, MapData, Set, SetFlags, SetSpec, Table, TableId, Value,
};
use crate::nft::{Command, ListedElement};

use super::layout::{
    DPORT, Fam, L4PROTO, SetRef, affinity_keys, affinity_map, affinity_nodeport_keys,
    affinity_nodeport_map, pl,
};

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

    /// The key map that sends this destination's connections to its record chain:
    /// `affinity-keys-T` or `affinity-nodeport-keys-T`.
    pub(super) fn key_set(&self, secs: u64) -> SetRef {
        match self {
            AffinityDestination::Address(_) => SetRef::AffinityKeys(secs),
            AffinityDestination::NodePort(_) => SetRef::AffinityNodePortKeys(secs),
        }
    }

    /// The affinity map holding this destination's entries: `affinity-T` or
    /// `affinity-nodeport-T`.
    pub(super) fn map(&self, secs: u64) -> String {
        match self {
            AffinityDestination::Address(_) => affinity_map(secs),
            AffinityDestination::NodePort(_) => affinity_nodeport_map(secs),
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
    pub(super) table: TableId,
    pub(super) f: Fam,
    pub(super) targets: BTreeMap<u64, AffinityTargets>,
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
pub(super) fn affinity_maps(f: Fam, secs: u64) -> [AffinityMap; 2] {
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

/// Keys and destinations for the affinity tests (here and in `plan::purge`): clients and
/// endpoints on port 8080, TCP.
#[cfg(test)]
pub(super) mod fixtures {
    use std::net::Ipv4Addr;

    use super::AffinityDestination;
    use crate::nft::ir::{Key, Value};

    pub(crate) fn ip(s: &str) -> Value {
        Value::Ipv4(s.parse::<Ipv4Addr>().expect("address"))
    }

    pub(crate) fn ep(s: &str) -> Key {
        vec![ip(s), Value::Port(8080)]
    }

    /// An entry of `affinity-T`: `client . vip . tcp . port → to:8080`.
    pub(crate) fn entry(client: &str, vip: &str, port: u16, to: &str) -> (Key, Key) {
        (
            vec![ip(client), ip(vip), Value::TCP, Value::Port(port)],
            ep(to),
        )
    }

    /// An entry of `affinity-nodeport-T`: `client . tcp . port → to:8080`.
    pub(crate) fn np_entry(client: &str, port: u16, to: &str) -> (Key, Key) {
        (vec![ip(client), Value::TCP, Value::Port(port)], ep(to))
    }

    pub(crate) fn address(vip: &str, port: u16) -> AffinityDestination {
        AffinityDestination::Address(vec![ip(vip), Value::TCP, Value::Port(port)])
    }

    pub(crate) fn node_port(port: u16) -> AffinityDestination {
        AffinityDestination::NodePort(vec![Value::TCP, Value::Port(port)])
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    fn targets(list: &[(AffinityDestination, &[&str])]) -> AffinityTargets {
        list.iter()
            .map(|(d, eps)| (d.clone(), eps.iter().map(|e| ep(e)).collect()))
            .collect()
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
}
