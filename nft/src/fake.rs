//! An in-memory backend that applies transactions to a [`Ruleset`] and validates them like
//! the kernel would where that is cheap. Atomic: on error, nothing changes.

use std::collections::{BTreeMap, BTreeSet};

use super::ir::{Chain, ElementData, Key, Ruleset, Set, Table, TableId};
use super::transaction::{Command, Transaction};
use super::validate::{self, CheckError};
use super::{ApplyError, Backend, ListedElement, render};

/// Why the fake refuses a command, as the kernel would: a check of [`validate`] on the
/// command alone, or a conflict with what the ruleset holds at that point.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The command itself is invalid.
    #[error(transparent)]
    Check(#[from] CheckError),
    /// The command's table does not exist.
    #[error("table {table} does not exist")]
    NoTable {
        /// The table.
        table: TableId,
    },
    /// `add table` of a table that exists with another comment.
    #[error("table {table} exists with another comment")]
    TableComment {
        /// The table.
        table: TableId,
    },
    /// The command's chain does not exist.
    #[error("no chain {chain}")]
    NoChain {
        /// The chain.
        chain: String,
    },
    /// `add chain` of a chain that exists with other properties.
    #[error("chain {chain} exists with other properties")]
    ChainExists {
        /// The chain.
        chain: String,
    },
    /// `delete chain` of a chain with rules.
    #[error("chain {chain} is not empty")]
    ChainNotEmpty {
        /// The chain.
        chain: String,
    },
    /// `delete chain` of a chain a rule or verdict element still jumps to.
    #[error("chain {chain} is still referenced")]
    ChainReferenced {
        /// The chain.
        chain: String,
    },
    /// The command's set or map does not exist.
    #[error("no set {set}")]
    NoSet {
        /// The set.
        set: String,
    },
    /// `add set` of a set that exists with other properties.
    #[error("set {set} exists with other properties")]
    SetExists {
        /// The set.
        set: String,
    },
    /// `delete set` of a set a rule still uses.
    #[error("set {set} is still referenced by a rule")]
    SetReferenced {
        /// The set.
        set: String,
    },
    /// An element command without elements.
    #[error("empty element list for {set}")]
    NoElements {
        /// The set.
        set: String,
    },
    /// Elements added to or deleted from a `constant` set after the transaction that
    /// created it.
    #[error("set {set} is constant")]
    ConstantSet {
        /// The set.
        set: String,
    },
    /// `create element` of a key the set holds.
    #[error("element {key:?} already exists in {set}")]
    ElementExists {
        /// The set.
        set: String,
        /// The key.
        key: Key,
    },
    /// `delete element` of a key the set does not hold.
    #[error("element {key:?} does not exist in {set}")]
    NoElement {
        /// The set.
        set: String,
        /// The key.
        key: Key,
    },
    /// More elements than the set's `size` (the kernel's `ENFILE`).
    #[error("set {set} is full: it may hold {size} elements")]
    SetFull {
        /// The set.
        set: String,
        /// Its size.
        size: u32,
    },
    /// Two elements of an interval set that overlap (rendered as nft writes them).
    #[error("element {first} overlaps {second} in {set}")]
    Overlap {
        /// The set.
        set: String,
        /// One element.
        first: String,
        /// The other.
        second: String,
    },
}

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

fn table_mut<'a>(rs: &'a mut Ruleset, id: &TableId) -> Result<&'a mut Table, StateError> {
    rs.tables
        .get_mut(id)
        .ok_or_else(|| StateError::NoTable { table: id.clone() })
}

fn no_chain(chain: &str) -> StateError {
    StateError::NoChain {
        chain: chain.to_owned(),
    }
}

fn no_set(set: &str) -> StateError {
    StateError::NoSet {
        set: set.to_owned(),
    }
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
) -> Result<(), StateError> {
    let family = c.table().family;
    match c {
        Command::AddTable { table, comment } => {
            validate::name("table", &table.name)?;
            validate::comment(comment)?;
            match rs.tables.get(table) {
                Some(t) if t.comment != *comment => {
                    return Err(StateError::TableComment {
                        table: table.clone(),
                    });
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
            rs.tables.remove(table).ok_or_else(|| StateError::NoTable {
                table: table.clone(),
            })?;
        }
        Command::AddChain { table, chain, spec } => {
            validate::name("chain", chain)?;
            validate::chain_spec(spec)?;
            let t = table_mut(rs, table)?;
            match t.chains.get(chain) {
                Some(c) if c.spec != *spec => {
                    return Err(StateError::ChainExists {
                        chain: chain.clone(),
                    });
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
            let c = t.chains.get_mut(chain).ok_or_else(|| no_chain(chain))?;
            c.rules.clear();
        }
        Command::DeleteChain { table, chain } => {
            let t = table_mut(rs, table)?;
            let c = t.chains.get(chain).ok_or_else(|| no_chain(chain))?;
            if !c.rules.is_empty() {
                return Err(StateError::ChainNotEmpty {
                    chain: chain.clone(),
                });
            }
            if chain_referenced(t, chain) {
                return Err(StateError::ChainReferenced {
                    chain: chain.clone(),
                });
            }
            t.chains.remove(chain);
        }
        Command::AddSet { table, set, spec } => {
            validate::name("set", set)?;
            validate::set_spec(spec, family)?;
            let t = table_mut(rs, table)?;
            match t.sets.get(set) {
                Some(s) if s.spec != *spec => {
                    return Err(StateError::SetExists { set: set.clone() });
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
            let s = t.sets.get_mut(set).ok_or_else(|| no_set(set))?;
            s.elements.clear();
        }
        Command::DeleteSet { table, set, .. } => {
            let t = table_mut(rs, table)?;
            if !t.sets.contains_key(set) {
                return Err(no_set(set));
            }
            if t.chains
                .values()
                .any(|c| c.rules.iter().any(|r| r.set_refs().any(|s| s == set)))
            {
                return Err(StateError::SetReferenced { set: set.clone() });
            }
            t.sets.remove(set);
        }
        Command::AddElements {
            table,
            set,
            elements,
        } => {
            if elements.is_empty() {
                return Err(StateError::NoElements { set: set.clone() });
            }
            let t = table_mut(rs, table)?;
            let s = t.sets.get(set).ok_or_else(|| no_set(set))?;
            if s.spec.flags.constant && !created.contains(&(table.clone(), set.clone())) {
                return Err(StateError::ConstantSet { set: set.clone() });
            }
            for (k, e) in elements {
                validate::element(t, &s.spec, k, e)?;
            }
            let s = t.sets.get_mut(set).ok_or_else(|| no_set(set))?;
            for (k, e) in elements {
                if s.elements.insert(k.clone(), e.clone()).is_some() {
                    return Err(StateError::ElementExists {
                        set: set.clone(),
                        key: k.clone(),
                    });
                }
            }
            // As the kernel counts: the elements the set holds at this point of the
            // transaction (those deleted earlier in it make room).
            // A size of 0 is none, as for the kernel.
            if let Some(size) = s
                .spec
                .size
                .filter(|&n| n > 0 && s.elements.len() > n as usize)
            {
                return Err(StateError::SetFull {
                    set: set.clone(),
                    size,
                });
            }
            if s.spec.flags.interval {
                if let Some((a, b)) = validate::overlapping(s.elements.keys()) {
                    return Err(StateError::Overlap {
                        set: set.clone(),
                        first: render::values(a),
                        second: render::values(b),
                    });
                }
            }
        }
        Command::DeleteElements { table, set, keys } => {
            if keys.is_empty() {
                return Err(StateError::NoElements { set: set.clone() });
            }
            let t = table_mut(rs, table)?;
            let s = t.sets.get_mut(set).ok_or_else(|| no_set(set))?;
            if s.spec.flags.constant {
                return Err(StateError::ConstantSet { set: set.clone() });
            }
            for k in keys {
                if s.elements.remove(k).is_none() {
                    return Err(StateError::NoElement {
                        set: set.clone(),
                        key: k.clone(),
                    });
                }
            }
        }
        Command::AddRule { table, chain, rule } => {
            let t = table_mut(rs, table)?;
            let c = t.chains.get(chain).ok_or_else(|| no_chain(chain))?;
            validate::rule(t, family, &c.spec, rule)?;
            let c = t.chains.get_mut(chain).ok_or_else(|| no_chain(chain))?;
            c.rules.push(rule.clone());
        }
    }
    Ok(())
}
