//! ClientIP affinity per service *port*: the record chains.
//!
//! Kubernetes keeps a client's affinity per service port: through the cluster IP, an external
//! or load-balancer IP and the node port it reaches one endpoint for the timeout. The affinity
//! maps are keyed per address (`saddr . vip . proto . port`, and `saddr . proto . port` for the
//! node port), so a connection records its endpoint for *every* address of its service port
//! that dispatches to the same endpoint set, at once: the per-timeout key maps
//! (`affinity-keys-T`, `affinity-nodeport-keys-T`) send it (`goto`) to the service port's record
//! chain, which holds one `update` per such address with the address as constants in the key:
//!
//! ```text
//! update @affinity-10800 { ip saddr . 10.96.0.10 . 6 . 80 : ip daddr . th dport }
//! update @affinity-10800 { ip saddr . 192.0.2.20 . 6 . 80 : ip daddr . th dport }
//! update @affinity-nodeport-10800 { ip saddr . 6 . 30080 : ip daddr . th dport }
//! ```
//!
//! So a first connection through another address finds the entry even when the endpoints
//! changed since (a fresh choice, a hash of the client address over the new endpoint list,
//! could pick another one). Addresses share a chain only when they dispatch to the same
//! endpoints: the cluster IP by the internal traffic policy, the external addresses and the
//! node port by the external one; under `externalTrafficPolicy: Local` (outside clients to
//! node-local endpoints) they never share, so an entry is never one that its address could
//! not have chosen, and the stale-entry purge ([`super::affinity`]) stays per address.

use std::hash::Hasher;

use lb_core::ServicePortName;

use crate::nft::Command;
use crate::nft::ir::{
    Chain, ChainSpec, DynsetOp, Element, Expr, Rule, Stmt, Table, TableId, Value, Verdict,
};

use super::affinity::AffinityDestination;
use super::layout::{DPORT, Fam, SetRef, pl};

/// The key-map elements of a service port: (map, key, `goto` its record chain).
pub(super) type KeyElements = Vec<(SetRef, Vec<Value>, Element)>;

/// A service port's record chains and their rules.
pub(super) type RecordChains = Vec<(String, Vec<Rule>)>;

/// Prefix of the record chains.
const RECORD_PREFIX: &str = "affinity-record.";

/// The name of a service port's record chain: `affinity-record.<namespace>.<name>[.<port
/// name>]` (DNS labels, so `.` separates them unambiguously), with `.external` for the
/// external addresses when they dispatch to other endpoints than the cluster IP. A name over
/// nft's 64 characters ([`crate::nft::ir::valid_name`]) is replaced by a hash of it
/// (`affinity-record.<16 hex digits>[.external]`).
pub(super) fn record_chain(name: &ServicePortName, external: bool) -> String {
    let mut s = format!("{RECORD_PREFIX}{}.{}", name.namespace, name.name);
    if !name.port_name.is_empty() {
        s.push('.');
        s.push_str(&name.port_name);
    }
    let suffix = if external { ".external" } else { "" };
    if s.len() + suffix.len() > 64 {
        let mut h = rustc_hash::FxHasher::default();
        h.write(s.as_bytes());
        s = format!("{RECORD_PREFIX}{:016x}", h.finish());
    }
    s + suffix
}

/// Adds a service port's record chains and the key-map elements that send its connections
/// there, from its affinity destinations (`frag.affinity`, the cluster IP first). `split`:
/// the external addresses dispatch outside clients and the node's own traffic to different
/// endpoint sets (eTP Local), so they never share the cluster IP's chain.
pub(super) fn record(
    f: Fam,
    affinity: &[(u64, AffinityDestination, Vec<Vec<Value>>)],
    name: &ServicePortName,
    split: bool,
) -> (KeyElements, RecordChains) {
    let Some((_, _, cluster_allowed)) = affinity.first() else {
        return (Vec::new(), Vec::new());
    };
    let base = record_chain(name, false);
    let external = record_chain(name, true);
    let mut chains: Vec<(String, Vec<Rule>)> = Vec::new();
    let mut elems = Vec::new();
    for (i, (secs, dest, allowed)) in affinity.iter().enumerate() {
        let shares = i == 0 || (!split && allowed == cluster_allowed);
        let chain = if shares { &base } else { &external };
        let (set, map, key) = (dest.key_set(*secs), dest.map(*secs), dest.key());
        let mut dyn_key = vec![pl(f.saddr)];
        dyn_key.extend(key.iter().map(|v: &Value| Expr::Const(*v)));
        let rule = Rule::new(vec![Stmt::Dynset {
            op: DynsetOp::Update,
            set: map,
            key: dyn_key,
            data: vec![pl(f.daddr), DPORT],
        }]);
        match chains.iter_mut().find(|(n, _)| n == chain) {
            Some((_, rules)) => rules.push(rule),
            None => chains.push((chain.clone(), vec![rule])),
        }
        elems.push((
            set,
            key.to_vec(),
            Element::verdict(Verdict::Goto(chain.clone())),
        ));
    }
    (elems, chains)
}

/// The commands for the record chains of the changed service ports: those that must precede
/// the element commands (new chains; changed ones, flushed and refilled) and those that must
/// follow them (chains no longer used, deleted once no element sends connections there: the
/// kernel refuses to delete a chain still referenced). `before` gives a service port's fragment
/// as the kernel holds it (`None` for a table created by this transaction).
pub(super) fn record_commands<'a>(
    id: &TableId,
    changes: impl Iterator<Item = (&'a ServicePortName, &'a [(String, Vec<Rule>)])>,
    before: impl Fn(&ServicePortName) -> &'a [(String, Vec<Rule>)],
) -> (Vec<Command>, Vec<Command>) {
    let (mut first, mut last) = (Vec::new(), Vec::new());
    for (name, new) in changes {
        let old = before(name);
        for (chain, rules) in new {
            match old.iter().find(|(c, _)| c == chain) {
                Some((_, r)) if r == rules => continue,
                Some(_) => first.push(Command::FlushChain {
                    table: id.clone(),
                    chain: chain.clone(),
                }),
                None => first.push(Command::AddChain {
                    table: id.clone(),
                    chain: chain.clone(),
                    spec: ChainSpec::default(),
                }),
            }
            first.extend(rules.iter().map(|r| Command::AddRule {
                table: id.clone(),
                chain: chain.clone(),
                rule: r.clone(),
            }));
        }
        for (chain, _) in old {
            if !new.iter().any(|(c, _)| c == chain) {
                // The kernel deletes only an empty chain.
                last.push(Command::FlushChain {
                    table: id.clone(),
                    chain: chain.clone(),
                });
                last.push(Command::DeleteChain {
                    table: id.clone(),
                    chain: chain.clone(),
                });
            }
        }
    }
    (first, last)
}

/// Adds every service port's record chains to a table built from the committed state.
pub(super) fn add_record_chains<'a>(
    table: &mut Table,
    records: impl Iterator<Item = &'a [(String, Vec<Rule>)]>,
) {
    for record in records {
        for (chain, rules) in record {
            table.chains.insert(
                chain.clone(),
                Chain {
                    spec: ChainSpec::default(),
                    rules: rules.clone(),
                },
            );
        }
    }
}
