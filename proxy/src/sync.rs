//! The dataplane: the store's state, compiled per IP family, applied through a backend.
//!
//! A sync is incremental: only the Services the store marks as changed are recompiled, and
//! the transaction holds only their element changes (plus any new `pick-N` chain). A full
//! sync replaces both tables in one atomic transaction (`add table` + `delete table` +
//! everything), which also repairs rules someone else changed or deleted. When the kernel
//! rejects a transaction nothing is committed, the previous ruleset keeps serving, and the
//! next sync is a full one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use lb_core::{IpFamily, ServicePortName};

use crate::compile::{Compiler, Config, Plan};
use crate::convert::ServiceKey;
use crate::nft::{ApplyError, Backend, Command, Transaction};
use crate::store::{ServiceEntry, Store};

/// What a sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// A full sync (table replaced) rather than an incremental one.
    pub full: bool,
    /// Commands in the transaction.
    pub commands: usize,
    /// Elements added or deleted.
    pub elements: usize,
    /// Service ports recompiled.
    pub service_ports: usize,
    /// Time to compute the transaction (snapshot, categorise, compile, diff).
    pub compute: Duration,
    /// Time the kernel took to accept it.
    pub apply: Duration,
    /// Time to adopt the new state after the kernel accepted it.
    pub commit: Duration,
    /// The Services this sync recompiled (every Service for a full sync).
    pub changed_services: Vec<ServiceKey>,
}

/// Compiles and applies. Owns the backend.
#[derive(Debug)]
pub struct Dataplane<B> {
    backend: B,
    config: Config,
    compilers: [Compiler; 2],
    /// The service ports each Service had at the last successful sync.
    ports: BTreeMap<ServiceKey, Vec<ServicePortName>>,
    needs_full: bool,
}

impl<B: Backend> Dataplane<B> {
    /// A dataplane that has programmed nothing yet; the first sync is a full one.
    pub fn new(backend: B, config: Config) -> Self {
        let compilers = [
            Compiler::new(config.clone(), IpFamily::V4),
            Compiler::new(config.clone(), IpFamily::V6),
        ];
        Self {
            backend,
            config,
            compilers,
            ports: BTreeMap::new(),
            needs_full: true,
        }
    }

    /// The backend (e.g. the fake's ruleset in tests).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutable (tests inject failures through it).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Requests a full sync next time (periodic resync, node change, after a failure).
    pub fn request_full_sync(&mut self) {
        self.needs_full = true;
    }

    /// The committed tables (what the kernel holds after the last successful sync).
    pub fn ruleset(&self) -> crate::nft::ir::Ruleset {
        let mut rs = crate::nft::ir::Ruleset::default();
        for c in &self.compilers {
            rs.tables.insert(c.table_id(), c.table());
        }
        rs
    }

    /// Syncs the store's changes (or everything, when a full sync is due). Does nothing when
    /// nothing changed. The store must know its node.
    pub fn sync(&mut self, store: &mut Store) -> Result<SyncReport, ApplyError> {
        let (changed, node_changed) = store.take_changes();
        if self.needs_full || node_changed {
            return self.full_sync(store);
        }
        if changed.is_empty() {
            return Ok(SyncReport::default());
        }
        let Some(node) = store.node().cloned() else {
            return Ok(SyncReport::default());
        };
        let started = Instant::now();
        let mut entries: BTreeMap<ServiceKey, Vec<ServiceEntry>> = BTreeMap::new();
        for key in &changed {
            entries.insert(key.clone(), store.entries(key));
        }
        let mut changes: Vec<(ServicePortName, Option<&ServiceEntry>)> = Vec::new();
        for (key, es) in &entries {
            let now: BTreeSet<&ServicePortName> = es.iter().map(|e| e.port.name()).collect();
            for old in self.ports.get(key).into_iter().flatten() {
                if !now.contains(old) {
                    changes.push((old.clone(), None));
                }
            }
            changes.extend(es.iter().map(|e| (e.port.name().clone(), Some(e))));
        }
        let plans: Vec<Plan> = self
            .compilers
            .iter()
            .map(|c| c.plan(&node, changes.iter().cloned()))
            .collect();
        let mut tx = Transaction::new();
        for p in &plans {
            tx.commands.extend(p.tx.commands.iter().cloned());
        }
        let compute = started.elapsed();
        let report = SyncReport {
            full: false,
            commands: tx.commands.len(),
            elements: tx.element_count(),
            service_ports: changes.len(),
            compute,
            apply: Duration::ZERO,
            commit: Duration::ZERO,
            changed_services: changed.iter().cloned().collect(),
        };
        if tx.is_empty() {
            self.commit(plans, &entries);
            return Ok(report);
        }
        let t = Instant::now();
        if let Err(e) = self.backend.apply(&tx) {
            self.needs_full = true;
            return Err(e);
        }
        let apply = t.elapsed();
        let t = Instant::now();
        self.commit(plans, &entries);
        Ok(SyncReport {
            apply,
            commit: t.elapsed(),
            ..report
        })
    }

    fn commit(&mut self, plans: Vec<Plan>, entries: &BTreeMap<ServiceKey, Vec<ServiceEntry>>) {
        for (c, p) in self.compilers.iter_mut().zip(plans) {
            c.commit(p);
        }
        for (key, es) in entries {
            if es.is_empty() {
                self.ports.remove(key);
            } else {
                self.ports.insert(
                    key.clone(),
                    es.iter().map(|e| e.port.name().clone()).collect(),
                );
            }
        }
    }

    /// Replaces both tables with everything in the store, atomically.
    pub fn full_sync(&mut self, store: &Store) -> Result<SyncReport, ApplyError> {
        let started = Instant::now();
        let Some(snapshot) = store.snapshot() else {
            return Ok(SyncReport::default());
        };
        let mut compilers = [
            Compiler::new(self.config.clone(), IpFamily::V4),
            Compiler::new(self.config.clone(), IpFamily::V6),
        ];
        let mut tx = Transaction::new();
        let mut plans = Vec::new();
        for c in &compilers {
            // Creating then deleting our table first makes the batch replace whatever an
            // earlier run, or someone else, left in it.
            tx.push(Command::AddTable {
                table: c.table_id(),
                comment: Some(crate::compile::TABLE_COMMENT.into()),
            });
            tx.push(Command::DeleteTable {
                table: c.table_id(),
            });
            let p = c.plan(
                &snapshot.node,
                snapshot.services.iter().map(|(n, e)| (n.clone(), Some(e))),
            );
            tx.commands.extend(p.tx.commands.iter().cloned());
            plans.push(p);
        }
        let compute = started.elapsed();
        let t = Instant::now();
        if let Err(e) = self.backend.apply(&tx) {
            self.needs_full = true;
            return Err(e);
        }
        let apply = t.elapsed();
        let t = Instant::now();
        for (c, p) in compilers.iter_mut().zip(plans) {
            c.commit(p);
        }
        self.compilers = compilers;
        self.ports.clear();
        for name in snapshot.services.keys() {
            let key = ServiceKey {
                namespace: name.namespace.to_string(),
                name: name.name.to_string(),
            };
            self.ports.entry(key).or_default().push(name.clone());
        }
        self.needs_full = false;
        Ok(SyncReport {
            full: true,
            commands: tx.commands.len(),
            elements: tx.element_count(),
            service_ports: snapshot.services.len(),
            compute,
            apply,
            commit: t.elapsed(),
            changed_services: self.ports.keys().cloned().collect(),
        })
    }
}
