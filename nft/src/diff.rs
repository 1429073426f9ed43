//! The smallest transaction from an applied ruleset to a desired one.
//!
//! - Set and map elements are diffed one by one: an element whose data, timeout or comment
//!   changed is deleted and re-added; nothing else is touched by an element change.
//! - A chain whose rule list changed is flushed and rewritten (chains are few and static).
//! - A set or chain whose *properties* changed cannot be altered in place: it is deleted and
//!   re-created, and every chain or element that referenced it is rewritten.
//! - Order is valid for the kernel: everything is created before it is referenced, and
//!   references (rules, verdict elements) are removed before their referents are deleted.

use std::collections::{BTreeMap, BTreeSet};

use super::ir::{Element, ElementData, Key, Ruleset, Table, TableId};
use super::transaction::{Command, Transaction};

impl Transaction {
    /// The transaction that creates `rs` from nothing (tables, sets, chains, elements, rules,
    /// in an order where everything exists before it is referenced): the diff from an empty
    /// ruleset. Defined here, not in [`super::transaction`], so that the dependency goes one
    /// way (diff builds transactions; a transaction knows nothing of diff).
    pub fn create(rs: &Ruleset) -> Self {
        diff(&Ruleset::default(), rs)
    }
}

/// Computes the transaction that turns `applied` into `desired`.
pub fn diff(applied: &Ruleset, desired: &Ruleset) -> Transaction {
    let mut tx = Transaction::new();
    let empty = Table::default();
    for (id, want) in &desired.tables {
        let have = match applied.tables.get(id) {
            Some(have) if have.comment == want.comment => have,
            Some(_) => {
                // A table's comment cannot be changed in place: re-create the whole table.
                tx.push(Command::DeleteTable { table: id.clone() });
                tx.push(Command::AddTable {
                    table: id.clone(),
                    comment: want.comment.clone(),
                });
                &empty
            }
            None => {
                tx.push(Command::AddTable {
                    table: id.clone(),
                    comment: want.comment.clone(),
                });
                &empty
            }
        };
        diff_table(&mut tx, id, have, want);
    }
    for id in applied.tables.keys() {
        if !desired.tables.contains_key(id) {
            tx.push(Command::DeleteTable { table: id.clone() });
        }
    }
    tx
}

fn element_targets(e: &Element) -> Option<&str> {
    match &e.data {
        Some(ElementData::Verdict(v)) => v.target(),
        _ => None,
    }
}

fn diff_table(tx: &mut Transaction, id: &TableId, have: &Table, want: &Table) {
    let t = || id.clone();
    // Sets: new, removed, re-created (spec changed), kept.
    let removed_sets: BTreeSet<&str> = have
        .sets
        .iter()
        .filter(|(n, s)| want.sets.get(*n).is_none_or(|w| w.spec != s.spec))
        .map(|(n, _)| n.as_str())
        .collect();
    let removed_chains: BTreeSet<&str> = have
        .chains
        .iter()
        .filter(|(n, c)| want.chains.get(*n).is_none_or(|w| w.spec != c.spec))
        .map(|(n, _)| n.as_str())
        .collect();
    let recreated_sets: Vec<&str> = removed_sets
        .iter()
        .copied()
        .filter(|n| want.sets.contains_key(*n))
        .collect();
    let recreated_chains: Vec<&str> = removed_chains
        .iter()
        .copied()
        .filter(|n| want.chains.contains_key(*n))
        .collect();

    // 1. Brand-new sets and chains (names not in use yet).
    for (name, s) in &want.sets {
        if !have.sets.contains_key(name) {
            tx.push(Command::AddSet {
                table: t(),
                set: name.clone(),
                spec: s.spec.clone(),
            });
        }
    }
    for (name, c) in &want.chains {
        if !have.chains.contains_key(name) {
            tx.push(Command::AddChain {
                table: t(),
                chain: name.clone(),
                spec: c.spec.clone(),
            });
        }
    }

    // 2. Element deletions in kept sets (also of elements pointing at re-created chains).
    let mut element_adds: BTreeMap<&str, Vec<(Key, Element)>> = BTreeMap::new();
    for (name, old) in &have.sets {
        if removed_sets.contains(name.as_str()) {
            continue;
        }
        let Some(new) = want.sets.get(name) else {
            continue;
        };
        let stale = |e: &Element| element_targets(e).is_some_and(|c| removed_chains.contains(c));
        let dels: Vec<Key> = old
            .elements
            .iter()
            .filter(|(k, e)| new.elements.get(*k) != Some(*e) || stale(e))
            .map(|(k, _)| k.clone())
            .collect();
        if !dels.is_empty() {
            tx.push(Command::DeleteElements {
                table: t(),
                set: name.clone(),
                keys: dels,
            });
        }
        let adds: Vec<(Key, Element)> = new
            .elements
            .iter()
            .filter(|(k, e)| old.elements.get(*k) != Some(*e) || stale(e))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        if !adds.is_empty() {
            element_adds.insert(name, adds);
        }
    }

    // 3. Flush chains whose rules change or that reference something being deleted.
    let mut rewrite: BTreeSet<&str> = BTreeSet::new();
    for (name, old) in &have.chains {
        let removed = removed_chains.contains(name.as_str());
        let refs_removed = old.rules.iter().any(|r| {
            r.set_refs().any(|s| removed_sets.contains(s))
                || r.chain_targets().any(|c| removed_chains.contains(c))
        });
        let changed = want.chains.get(name).is_some_and(|w| w.rules != old.rules);
        if (removed || refs_removed || changed) && !old.rules.is_empty() {
            tx.push(Command::FlushChain {
                table: t(),
                chain: name.clone(),
            });
        }
        if !removed && (refs_removed || changed) {
            rewrite.insert(name);
        }
    }

    // 4. Delete removed sets (verdict elements first), then removed chains.
    for name in &removed_sets {
        let map = have.sets[*name].spec.is_map();
        tx.push(Command::DeleteSet {
            table: t(),
            set: (*name).to_owned(),
            map,
        });
    }
    for name in &removed_chains {
        tx.push(Command::DeleteChain {
            table: t(),
            chain: (*name).to_owned(),
        });
    }

    // 5. Re-create changed chains and sets.
    for name in &recreated_chains {
        let spec = want.chains[*name].spec.clone();
        tx.push(Command::AddChain {
            table: t(),
            chain: (*name).to_owned(),
            spec,
        });
        rewrite.insert(name);
    }
    for name in &recreated_sets {
        let spec = want.sets[*name].spec.clone();
        tx.push(Command::AddSet {
            table: t(),
            set: (*name).to_owned(),
            spec,
        });
    }

    // 6. Element additions: all elements of new/re-created sets, the delta of kept ones.
    for (name, s) in &want.sets {
        let fresh = !have.sets.contains_key(name) || removed_sets.contains(name.as_str());
        let adds = if fresh {
            s.elements
                .iter()
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect()
        } else {
            element_adds.remove(name.as_str()).unwrap_or_default()
        };
        if !adds.is_empty() {
            tx.push(Command::AddElements {
                table: t(),
                set: name.clone(),
                elements: adds,
            });
        }
    }

    // 7. Rules of new, re-created and changed chains.
    for (name, c) in &want.chains {
        if have.chains.contains_key(name) && !rewrite.contains(name.as_str()) {
            continue;
        }
        for r in &c.rules {
            tx.push(Command::AddRule {
                table: t(),
                chain: name.clone(),
                rule: r.clone(),
            });
        }
    }
}
