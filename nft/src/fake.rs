//! An in-memory backend that applies transactions to a [`Ruleset`] and validates them like
//! the kernel would where that is cheap. Atomic: on error, nothing changes.

use std::collections::{BTreeMap, BTreeSet};

use super::ir::{Chain, ElementData, Key, Ruleset, Set, Table, TableId};
use super::transaction::{Command, Transaction};
use super::{ApplyError, Backend, ListedElement, render, validate};

/// The fake backend: its `ruleset` is what the "kernel" holds.
#[derive(Debug, Clone, Default)]
pub struct Fake {
    /// The applied ruleset.
    pub ruleset: Ruleset,
    /// Number of successful `apply` calls (for tests asserting that nothing was sent).
    pub applies: usize,
    /// What the "data path" counted, by table, set and key, for sets with the `counter` flag
    /// (tests set it; elements without an entry read back as zero).
    pub counters: BTreeMap<(TableId, String, Key), super::ElementCounter>,
}

impl Backend for Fake {
    fn apply(&mut self, tx: &Transaction) -> Result<(), ApplyError> {
        let mut next = self.ruleset.clone();
        let mut created = BTreeSet::new();
        for (i, c) in tx.commands.iter().enumerate() {
            apply_command(&mut next, &mut created, c).map_err(|r| ApplyError::invalid(i, c, r))?;
        }
        self.ruleset = next;
        self.applies += 1;
        Ok(())
    }

    fn list_elements(
        &mut self,
        table: &TableId,
        set: &str,
        spec: &super::ir::SetSpec,
    ) -> Result<Vec<ListedElement>, ApplyError> {
        let Some(s) = self.ruleset.tables.get(table).and_then(|t| t.sets.get(set)) else {
            // As the kernel answers.
            return Err(ApplyError::Netlink {
                step: "dump",
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            });
        };
        if spec.flags.interval {
            return Err(ApplyError::Unsupported("listing interval sets"));
        }
        Ok(s.elements
            .iter()
            .map(|(key, e)| ListedElement {
                key: key.clone(),
                data: match &e.data {
                    Some(ElementData::Values(v)) => Some(v.clone()),
                    _ => None,
                },
                counter: s.spec.flags.counter.then(|| {
                    self.counters
                        .get(&(table.clone(), set.to_string(), key.clone()))
                        .copied()
                        .unwrap_or_default()
                }),
            })
            .collect())
    }
}

fn table_mut<'a>(rs: &'a mut Ruleset, id: &TableId) -> Result<&'a mut Table, String> {
    rs.tables
        .get_mut(id)
        .ok_or_else(|| format!("table {id} does not exist"))
}

fn chain_referenced(t: &Table, name: &str) -> bool {
    t.chains
        .values()
        .any(|c| c.rules.iter().any(|r| r.chain_targets().any(|x| x == name)))
        || t.sets.values().any(|s| {
            s.elements.values().any(
                |e| matches!(&e.data, Some(ElementData::Verdict(v)) if v.target() == Some(name)),
            )
        })
}

/// Applies one command to `rs`, or explains why the kernel would refuse it. `created` holds
/// the sets created earlier in the same transaction (the only time a constant set takes
/// elements).
pub fn apply_command(
    rs: &mut Ruleset,
    created: &mut BTreeSet<(TableId, String)>,
    c: &Command,
) -> Result<(), String> {
    let family = c.table().family;
    match c {
        Command::AddTable { table, comment } => {
            validate::name("table", &table.name)?;
            validate::comment(comment)?;
            match rs.tables.get(table) {
                Some(t) if t.comment != *comment => {
                    return Err(format!("table {table} exists with another comment"));
                }
                Some(_) => {}
                None => {
                    let t = Table {
                        comment: comment.clone(),
                        ..Table::default()
                    };
                    rs.tables.insert(table.clone(), t);
                }
            }
        }
        Command::DeleteTable { table } => {
            rs.tables
                .remove(table)
                .ok_or_else(|| format!("table {table} does not exist"))?;
        }
        Command::AddChain { table, chain, spec } => {
            validate::name("chain", chain)?;
            validate::chain_spec(spec)?;
            let t = table_mut(rs, table)?;
            match t.chains.get(chain) {
                Some(c) if c.spec != *spec => {
                    return Err(format!("chain {chain} exists with other properties"));
                }
                Some(_) => {}
                None => {
                    t.chains.insert(
                        chain.clone(),
                        Chain {
                            spec: spec.clone(),
                            rules: vec![],
                        },
                    );
                }
            }
        }
        Command::FlushChain { table, chain } => {
            let t = table_mut(rs, table)?;
            let c = t
                .chains
                .get_mut(chain)
                .ok_or_else(|| format!("no chain {chain}"))?;
            c.rules.clear();
        }
        Command::DeleteChain { table, chain } => {
            let t = table_mut(rs, table)?;
            let c = t
                .chains
                .get(chain)
                .ok_or_else(|| format!("no chain {chain}"))?;
            if !c.rules.is_empty() {
                return Err(format!("chain {chain} is not empty"));
            }
            if chain_referenced(t, chain) {
                return Err(format!("chain {chain} is still referenced"));
            }
            t.chains.remove(chain);
        }
        Command::AddSet { table, set, spec } => {
            validate::name("set", set)?;
            validate::set_spec(spec, family)?;
            let t = table_mut(rs, table)?;
            match t.sets.get(set) {
                Some(s) if s.spec != *spec => {
                    return Err(format!("set {set} exists with other properties"));
                }
                Some(_) => {}
                None => {
                    t.sets.insert(set.clone(), Set::new(spec.clone()));
                    created.insert((table.clone(), set.clone()));
                }
            }
        }
        Command::FlushSet { table, set, .. } => {
            let t = table_mut(rs, table)?;
            let s = t.sets.get_mut(set).ok_or_else(|| format!("no set {set}"))?;
            s.elements.clear();
        }
        Command::DeleteSet { table, set, .. } => {
            let t = table_mut(rs, table)?;
            if !t.sets.contains_key(set) {
                return Err(format!("no set {set}"));
            }
            if t.chains
                .values()
                .any(|c| c.rules.iter().any(|r| r.set_refs().any(|s| s == set)))
            {
                return Err(format!("set {set} is still referenced by a rule"));
            }
            t.sets.remove(set);
        }
        Command::AddElements {
            table,
            set,
            elements,
        } => {
            if elements.is_empty() {
                return Err("empty element list".into());
            }
            let t = table_mut(rs, table)?;
            let s = t.sets.get(set).ok_or_else(|| format!("no set {set}"))?;
            if s.spec.flags.constant && !created.contains(&(table.clone(), set.clone())) {
                return Err(format!("set {set} is constant"));
            }
            for (k, e) in elements {
                validate::element(t, &s.spec, k, e)?;
            }
            let s = t.sets.get_mut(set).ok_or_else(|| format!("no set {set}"))?;
            for (k, e) in elements {
                if s.elements.insert(k.clone(), e.clone()).is_some() {
                    return Err(format!("element {k:?} already exists in {set}"));
                }
            }
            if s.spec.flags.interval {
                if let Some((a, b)) = validate::overlapping(s.elements.keys()) {
                    return Err(format!(
                        "element {} overlaps {} in {set}",
                        render::values(a),
                        render::values(b)
                    ));
                }
            }
        }
        Command::DeleteElements { table, set, keys } => {
            if keys.is_empty() {
                return Err("empty element list".into());
            }
            let t = table_mut(rs, table)?;
            let s = t.sets.get_mut(set).ok_or_else(|| format!("no set {set}"))?;
            if s.spec.flags.constant {
                return Err(format!("set {set} is constant"));
            }
            for k in keys {
                if s.elements.remove(k).is_none() {
                    return Err(format!("element {k:?} does not exist in {set}"));
                }
            }
        }
        Command::AddRule { table, chain, rule } => {
            let t = table_mut(rs, table)?;
            let c = t
                .chains
                .get(chain)
                .ok_or_else(|| format!("no chain {chain}"))?;
            validate::rule(t, family, &c.spec, rule)?;
            let c = t
                .chains
                .get_mut(chain)
                .ok_or_else(|| format!("no chain {chain}"))?;
            c.rules.push(rule.clone());
        }
    }
    Ok(())
}
