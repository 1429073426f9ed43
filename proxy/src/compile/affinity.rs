//! ClientIP affinity entries that a change made stale, and the pure decision of which to
//! delete.
//!
//! The kernel keeps ClientIP affinity in the dynamic maps `affinity-T` (see the layout in
//! [`crate::compile`]): `saddr . vip . proto . port → endpoint ip . port`, consulted *before*
//! dispatch. When an endpoint leaves a Service, or stops being one that address dispatches to
//! (not ready any more, topology, traffic policy), an entry pointing to it keeps sending its
//! client there until the entry times out (3 h by default). kube-proxy deletes its
//! per-endpoint affinity sets together with the endpoint, so clients move at once; we get the
//! same by deleting such entries right after the sync that removed the endpoint:
//!
//! 1. [`Compiler::affinity_touched`](super::Compiler::affinity_touched): the destinations
//!    that lost an endpoint (or their affinity with that timeout) in the change, per timeout;
//! 2. [`Compiler::affinity_targets`](super::Compiler::affinity_targets): where entries for each
//!    may still point, as committed;
//! 3. the sync reads `affinity-T` back and [`stale_entries`] picks the entries to delete;
//! 4. one transaction deletes them (`Dataplane::sync`, [`crate::sync`]).
//!
//! Only destinations that lost an endpoint are examined, so a sync that changes no Service
//! with affinity, or only adds endpoints, reads nothing back.

use std::collections::{BTreeMap, BTreeSet};

use crate::nft::ir::{Key, Value};

/// The service side of an affinity map key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AffinityDestination {
    /// `vip . proto . port`: a cluster, external or load-balancer IP.
    Address(Key),
    /// `proto . port` of a node port: entries for it carry the node address the client
    /// used as `vip`.
    NodePort(Key),
}

impl AffinityDestination {
    /// The values: `vip . proto . port` or `proto . port`.
    pub fn key(&self) -> &[Value] {
        match self {
            AffinityDestination::Address(k) | AffinityDestination::NodePort(k) => k,
        }
    }
}

/// Touched destinations, by affinity timeout in seconds.
pub type Touched = BTreeMap<u64, BTreeSet<AffinityDestination>>;

/// For the destinations of one affinity map: the endpoints (`ip . port`) its entries may
/// still point to (empty: none).
pub type AffinityTargets = BTreeMap<AffinityDestination, BTreeSet<Key>>;

/// Whether the affinity entry `key` (`saddr . vip . proto . port`) belongs to one of `dests`,
/// by the same rule as [`stale_entries`]: its address if that is a destination, else its node
/// port unless the address is a service address.
pub fn belongs_to(
    key: &[Value],
    dests: &BTreeSet<AffinityDestination>,
    is_service_address: impl Fn(&[Value]) -> bool,
) -> bool {
    let [_, vip, proto, port] = key else {
        return false;
    };
    dests.contains(&AffinityDestination::Address(vec![*vip, *proto, *port]))
        || (!is_service_address(&[*vip, *proto, *port])
            && dests.contains(&AffinityDestination::NodePort(vec![*proto, *port])))
}

/// Adds `more` to `into`.
pub fn merge(into: &mut Touched, more: Touched) {
    for (secs, dests) in more {
        into.entry(secs).or_default().extend(dests);
    }
}

/// The keys of the affinity entries (`saddr . vip . proto . port`, with data
/// `endpoint ip . port`) that point to an endpoint their destination no longer dispatches to.
///
/// An entry belongs to the destination `vip . proto . port` when that is a touched address;
/// otherwise to the touched node port `proto . port`, unless `vip . proto . port` is a
/// service address (`is_service_address`): such traffic dispatches through the service
/// addresses before the node ports. Entries of untouched destinations, and malformed ones,
/// are kept.
pub fn stale_entries<'a>(
    targets: &AffinityTargets,
    entries: impl IntoIterator<Item = (&'a Key, Option<&'a Key>)>,
    is_service_address: impl Fn(&[Value]) -> bool,
) -> Vec<Key> {
    let mut stale = Vec::new();
    for (key, data) in entries {
        let (Some(data), [_, vip, proto, port]) = (data, key.as_slice()) else {
            continue;
        };
        let address = vec![*vip, *proto, *port];
        let allowed = match targets.get(&AffinityDestination::Address(address)) {
            Some(a) => a,
            None if is_service_address(&[*vip, *proto, *port]) => continue,
            None => match targets.get(&AffinityDestination::NodePort(vec![*proto, *port])) {
                Some(a) => a,
                None => continue,
            },
        };
        if !allowed.contains(data) {
            stale.push(key.clone());
        }
    }
    stale
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

    fn decide(t: &AffinityTargets, entries: &[(Key, Key)], service: &[(&str, u16)]) -> Vec<Key> {
        let service: Vec<Key> = service
            .iter()
            .map(|(v, p)| vec![ip(v), Value::TCP, Value::Port(*p)])
            .collect();
        stale_entries(t, entries.iter().map(|(k, d)| (k, Some(d))), |k| {
            service.iter().any(|s| s == k)
        })
    }

    #[test]
    fn an_entry_pointing_to_a_removed_endpoint_is_stale_and_others_stay() {
        let t = targets(&[(address("10.96.0.1", 80), &["10.244.0.2", "10.244.0.3"])]);
        let entries = [
            entry("10.100.0.2", "10.96.0.1", 80, "10.244.0.1"),
            entry("10.100.0.3", "10.96.0.1", 80, "10.244.0.2"),
            entry("10.100.0.4", "10.96.0.1", 80, "10.244.0.3"),
        ];
        assert_eq!(decide(&t, &entries, &[]), vec![entries[0].0.clone()]);
    }

    #[test]
    fn entries_of_untouched_destinations_are_kept() {
        let t = targets(&[(address("10.96.0.1", 80), &[])]);
        let entries = [
            entry("10.100.0.2", "10.96.0.2", 80, "10.244.0.1"),
            entry("10.100.0.2", "10.96.0.1", 443, "10.244.0.1"),
        ];
        assert!(decide(&t, &entries, &[]).is_empty());
    }

    #[test]
    fn a_destination_without_endpoints_makes_every_entry_stale() {
        let t = targets(&[(address("10.96.0.1", 80), &[])]);
        let entries = [
            entry("10.100.0.2", "10.96.0.1", 80, "10.244.0.1"),
            entry("10.100.0.3", "10.96.0.1", 80, "10.244.0.2"),
        ];
        assert_eq!(decide(&t, &entries, &[]).len(), 2);
    }

    #[test]
    fn node_port_entries_match_on_protocol_and_port_whatever_the_node_address() {
        let t = targets(&[(node_port(30080), &["10.244.0.2"])]);
        let entries = [
            entry("10.100.0.2", "10.100.0.1", 30080, "10.244.0.1"),
            entry("10.100.0.2", "10.200.0.1", 30080, "10.244.0.1"),
            entry("10.100.0.3", "10.100.0.1", 30080, "10.244.0.2"),
            entry("10.100.0.3", "10.100.0.1", 30081, "10.244.0.1"),
        ];
        assert_eq!(
            decide(&t, &entries, &[]),
            vec![entries[0].0.clone(), entries[1].0.clone()]
        );
    }

    #[test]
    fn a_service_address_on_a_node_port_number_is_not_judged_as_the_node_port() {
        // 10.96.0.9:30080 is another Service's address (untouched): its entries are not ours
        // to judge, although its port equals a touched node port.
        let t = targets(&[(node_port(30080), &["10.244.0.2"])]);
        let entries = [entry("10.100.0.2", "10.96.0.9", 30080, "10.244.0.7")];
        assert!(decide(&t, &entries, &[("10.96.0.9", 30080)]).is_empty());
        assert_eq!(decide(&t, &entries, &[]).len(), 1);
    }

    #[test]
    fn a_touched_address_wins_over_a_touched_node_port() {
        let t = targets(&[
            (address("10.96.0.1", 30080), &["10.244.0.1"]),
            (node_port(30080), &["10.244.0.2"]),
        ]);
        let entries = [
            entry("10.100.0.2", "10.96.0.1", 30080, "10.244.0.1"),
            entry("10.100.0.2", "10.100.0.1", 30080, "10.244.0.1"),
        ];
        assert_eq!(decide(&t, &entries, &[]), vec![entries[1].0.clone()]);
    }

    #[test]
    fn entries_without_data_or_with_an_unexpected_key_are_kept() {
        let t = targets(&[(address("10.96.0.1", 80), &[])]);
        let (k, _) = entry("10.100.0.2", "10.96.0.1", 80, "10.244.0.1");
        let short = vec![ip("10.96.0.1"), Value::TCP, Value::Port(80)];
        let d = ep("10.244.0.1");
        let stale = stale_entries(&t, [(&k, None), (&short, Some(&d))], |_| false);
        assert!(stale.is_empty());
    }
}
