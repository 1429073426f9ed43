//! The dataplane: the store's state, compiled per IP family, applied through a backend.
//!
//! A sync is incremental: only the Services the store marks as changed are recompiled, and
//! the transaction holds only their element changes (plus any new `pick-N` chain). A full
//! sync replaces both tables in one atomic transaction (`add table` + `delete table` +
//! everything), which also repairs rules someone else changed or deleted. When the kernel
//! rejects a transaction nothing is committed, the previous ruleset keeps serving, and the
//! next sync is a full one; a change refused because it overfills a set (`ENFILE`: a full
//! sync gives every set a size, [`crate::compile::fit_size`]) becomes a full sync at once,
//! which sizes the sets anew.
//!
//! When an incremental sync takes endpoints away from Services with ClientIP affinity, the
//! affinity entries that point to an endpoint their destination no longer dispatches to are
//! read back and deleted in the same transaction as the endpoint change
//! ([`crate::compile::affinity`]), so sticky clients move at once instead of when their entry
//! times out; a second look right after the transaction deletes entries recorded while it was
//! being prepared. A failed purge is retried by the next sync; a full sync replaces the
//! tables and carries over only the entries that are still valid.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use lb_core::{IpFamily, ServicePortName};

use crate::compile::affinity::{self, Purge, ReadBack, Touched};
use crate::compile::{Compiler, Config, Fragments, Plan};
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
    /// ClientIP affinity entries deleted because they pointed to an endpoint their
    /// destination no longer dispatches to.
    pub affinity_purged: usize,
    /// Why reading back or deleting stale affinity entries failed (retried by the next sync;
    /// the ruleset itself was applied).
    pub affinity_purge_error: Option<String>,
}

/// One service port's traffic in one IP family, as the kernel counted it: every packet, in
/// both directions, of the connections DNATed from its service addresses and node port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortTraffic {
    /// The service port.
    pub service_port: ServicePortName,
    /// The family.
    pub family: IpFamily,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
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
    /// Per family, affinity destinations whose stale entries are still to be purged.
    affinity_pending: [Touched; 2],
    /// The CIDRs of the ServiceCIDR objects ([`Dataplane::set_service_cidrs`]).
    service_cidrs: Vec<ipnet::IpNet>,
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
            affinity_pending: [Touched::new(), Touched::new()],
            service_cidrs: Vec::new(),
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

    /// The CIDRs of the ServiceCIDR objects last given (empty: the configured ones apply).
    pub fn service_cidrs(&self) -> &[ipnet::IpNet] {
        &self.service_cidrs
    }

    /// The CIDRs of the cluster's ServiceCIDR objects. While there are none, the configured
    /// ones (`--service-cidr`) apply. A change is programmed by a full sync, as kube-proxy's
    /// `OnServiceCIDRsChanged` (they change about never).
    pub fn set_service_cidrs(&mut self, mut cidrs: Vec<ipnet::IpNet>) {
        cidrs.sort();
        cidrs.dedup();
        if self.service_cidrs != cidrs {
            self.service_cidrs = cidrs;
            self.needs_full = true;
        }
    }

    /// The committed tables (what the kernel holds after the last successful sync, set sizes
    /// included; chains and sets no longer in use, which linger until a full sync, left out).
    pub fn ruleset(&self) -> crate::nft::ir::Ruleset {
        let mut rs = crate::nft::ir::Ruleset::default();
        for c in &self.compilers {
            rs.tables.insert(c.table_id(), c.installed_table());
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
            // Nothing changed; a purge that failed earlier is retried.
            let mut report = SyncReport::default();
            self.purge_affinity(&mut report);
            return Ok(report);
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
        let mut plans: Vec<Plan> = self
            .compilers
            .iter()
            .map(|c| c.plan(&node, changes.iter().cloned()))
            .collect();
        // The plans' transactions are moved, not copied: a full sync holds every element.
        let mut tx = Transaction::new();
        for p in &mut plans {
            tx.commands.append(&mut p.tx.commands);
        }
        let touched: Vec<Touched> = self
            .compilers
            .iter()
            .zip(&plans)
            .map(|(c, p)| c.affinity_touched(p))
            .collect();
        // The affinity entries the change makes stale go in the same transaction. An entry
        // that expires between the read and the apply fails the batch with ENOENT: the batch
        // is then applied without them, and the look after the commit deletes what is left.
        let mut purge = Vec::new();
        for ((c, p), t) in self.compilers.iter().zip(&plans).zip(&touched) {
            if t.is_empty() || !c.is_installed() {
                continue;
            }
            let stale = c.affinity_purge_after(p, t);
            match read_back(&mut self.backend, &stale) {
                Ok(read) => purge.extend(stale.deletes(read)),
                Err(e) => {
                    tracing::warn!(
                        error = %crate::error_chain(&e),
                        "reading ClientIP affinity entries failed; deleting them after the sync"
                    )
                }
            }
        }
        let compute = started.elapsed();
        let mut report = SyncReport {
            full: false,
            commands: tx.commands.len(),
            elements: tx.element_count(),
            service_ports: changes.len(),
            compute,
            apply: Duration::ZERO,
            commit: Duration::ZERO,
            changed_services: changed.iter().cloned().collect(),
            affinity_purged: 0,
            affinity_purge_error: None,
        };
        if !tx.is_empty() {
            let t = Instant::now();
            let purged: usize = purge
                .iter()
                .map(|c| match c {
                    Command::DeleteElements { keys, .. } => keys.len(),
                    _ => 0,
                })
                .sum();
            let without = tx.commands.len();
            tx.commands.extend(purge);
            let mut result = self.backend.apply(&tx);
            if tx.commands.len() > without && result.as_ref().is_err_and(ApplyError::is_not_found) {
                tx.commands.truncate(without);
                result = self.backend.apply(&tx);
            } else if result.is_ok() {
                report.affinity_purged += purged;
            }
            if let Err(e) = result {
                self.needs_full = true;
                if e.is_set_full() {
                    // The change outgrew a set's size: the kernel refused it whole. A full
                    // sync re-creates the sets with room for twice their elements.
                    tracing::info!(
                        error = %crate::error_chain(&e),
                        "a set is full: re-creating the tables with larger sets (full sync)"
                    );
                    return self.full_sync(store);
                }
                return Err(e);
            }
            report.apply = t.elapsed();
        }
        let t = Instant::now();
        self.commit(plans, &entries);
        report.commit = t.elapsed();
        for (pending, t) in self.affinity_pending.iter_mut().zip(touched) {
            affinity::merge(pending, t);
        }
        self.purge_affinity(&mut report);
        Ok(report)
    }

    /// Packets and bytes per service port and family, read from the counters of the
    /// `service-traffic` and `nodeport-traffic` sets and summed over each service port's
    /// addresses and node port (sorted by service port, then family). A counter starts from
    /// zero when its element is added: a new Service, and every full sync, which replaces the
    /// tables.
    pub fn service_traffic(&mut self) -> Result<Vec<ServicePortTraffic>, ApplyError> {
        let mut totals: BTreeMap<(ServicePortName, IpFamily), (u64, u64)> = BTreeMap::new();
        for (c, family) in self.compilers.iter().zip([IpFamily::V4, IpFamily::V6]) {
            if !c.is_installed() {
                continue;
            }
            let table = c.table_id();
            for (set, spec) in c.traffic_sets() {
                for e in self.backend.list_elements(&table, set, &spec)? {
                    let (Some(name), Some(n)) = (c.traffic_owner(set, &e.key), e.counter) else {
                        continue;
                    };
                    let t = totals.entry((name.clone(), family)).or_default();
                    t.0 += n.packets;
                    t.1 += n.bytes;
                }
            }
        }
        Ok(totals
            .into_iter()
            .map(
                |((service_port, family), (packets, bytes))| ServicePortTraffic {
                    service_port,
                    family,
                    packets,
                    bytes,
                },
            )
            .collect())
    }

    /// Deletes the pending stale affinity entries of both families in one transaction, and
    /// records the outcome in `report`. An entry that expired between the read and the
    /// delete fails the transaction with `ENOENT`: read again and retry, a few times.
    fn purge_affinity(&mut self, report: &mut SyncReport) {
        if self.affinity_pending.iter().all(Touched::is_empty) {
            return;
        }
        const ATTEMPTS: usize = 3;
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            let tx = match self.stale_affinity() {
                Ok(tx) if tx.is_empty() => break Ok(0),
                Ok(tx) => tx,
                Err(e) => break Err(e),
            };
            match self.backend.apply(&tx) {
                Ok(()) => break Ok(tx.element_count()),
                Err(e) if e.is_not_found() && attempt < ATTEMPTS => continue,
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok(n) => {
                report.affinity_purged += n;
                self.affinity_pending = [Touched::new(), Touched::new()];
            }
            Err(e) => {
                if matches!(e, ApplyError::Unsupported(_)) {
                    // Retrying cannot help.
                    self.affinity_pending = [Touched::new(), Touched::new()];
                }
                tracing::warn!(
                    error = %crate::error_chain(&e),
                    "deleting stale ClientIP affinity entries failed"
                );
                report.affinity_purge_error = Some(crate::error_chain(&e));
            }
        }
    }

    /// Puts back, after a full sync replaced the tables, the affinity entries read before it
    /// that still point to an endpoint their destination may use. Best effort: a client that
    /// connected in between already has a fresh entry, and the batch then fails as a whole
    /// (logged); stickiness is lost, never correctness. Entries come back with the map's full
    /// timeout, as if the client had just connected.
    fn restore_affinity(&mut self, carried: [ReadBack; 2]) {
        let mut tx = Transaction::new();
        for (c, read) in self.compilers.iter().zip(carried) {
            tx.commands.extend(c.affinity_carry_over(read));
        }
        if tx.is_empty() {
            return;
        }
        if let Err(e) = self.backend.apply(&tx) {
            tracing::warn!(
                error = %crate::error_chain(&e),
                "could not carry ClientIP affinity over a full sync; clients choose anew"
            );
        }
    }

    /// The transaction deleting the pending stale affinity entries, read back from the
    /// backend.
    fn stale_affinity(&mut self) -> Result<Transaction, ApplyError> {
        let mut tx = Transaction::new();
        for (c, pending) in self.compilers.iter().zip(&self.affinity_pending) {
            if pending.is_empty() || !c.is_installed() {
                continue;
            }
            let stale = c.affinity_purge(pending);
            let read = read_back(&mut self.backend, &stale)?;
            tx.commands.extend(stale.deletes(read));
        }
        Ok(tx)
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
        let Some(node) = store.node().cloned() else {
            return Ok(SyncReport::default());
        };
        // Node-dependent settings (`nodePortAddresses: primary`, detectLocalMode NodeCIDR)
        // follow the Node: a change of the Node always brings a full sync.
        if self.config.node_port_fallback(&node) {
            tracing::warn!(
                node = node.name(),
                "nodePortAddresses primary: the Node has no InternalIP or ExternalIP; serving NodePorts on every local address"
            );
        }
        let mut config = self.config.for_node(&node);
        if !self.service_cidrs.is_empty() {
            config.service_cidrs = self.service_cidrs.clone();
        }
        if matches!(&config.detect_local, crate::compile::DetectLocal::NodeCidr(c) if c.is_empty())
        {
            tracing::warn!(
                node = node.name(),
                "detectLocalMode NodeCIDR: the Node has no spec.podCIDRs yet, so no traffic is recognised as coming from a pod"
            );
        }
        let mut compilers = [
            Compiler::new(config.clone(), IpFamily::V4),
            Compiler::new(config, IpFamily::V6),
        ];
        // The fragments of every service port, in name order, built from the merged entries
        // of `FULL_SYNC_SERVICES` Services at a time: a copy of every Service and endpoint is
        // never held whole (issue 13: peak memory), and the entries are merged in parallel.
        let mut fragments = [Fragments::default(), Fragments::default()];
        let mut names: Vec<ServicePortName> = Vec::new();
        let keys: Vec<&ServiceKey> = store.service_keys().collect();
        for chunk in keys.chunks(FULL_SYNC_SERVICES) {
            // Service keys and service port names order alike (namespace, then name), so the
            // chunks' entries follow each other in name order.
            let entries =
                crate::store::by_name(crate::par::map_from(MERGE_PARALLEL_MIN, chunk, |key| {
                    store.entries(key)
                }));
            for (c, f) in compilers.iter().zip(&mut fragments) {
                f.append(c.fragments(&node, entries.iter().map(|(n, e)| (n.clone(), Some(e)))));
            }
            names.extend(entries.into_keys());
        }
        // The entries were merged on other threads, whose jemalloc arenas keep the pages they
        // freed: hand those back before the plans allocate (see `crate::memory`).
        crate::memory::release_freed();
        let service_ports = names.len();
        // Replacing the tables would empty the ClientIP affinity maps: read what they hold
        // now, to put back the entries that are still valid right after.
        let mut carried: [ReadBack; 2] = Default::default();
        for ((c, f), read) in compilers.iter().zip(&fragments).zip(&mut carried) {
            for map in c.affinity_maps_after(f) {
                if let Ok(listed) = self
                    .backend
                    .list_elements(&c.table_id(), &map.name, &map.spec)
                {
                    read.push((map, listed));
                }
            }
        }
        // The plans hand the batch on in pieces, which the backend encodes as they come: the
        // decoded elements are never all held at once (issue 13: peak memory). Computing and
        // encoding interleave; `compute` ends when the last piece is handed on.
        let (mut commands, mut elements) = (0, 0);
        let mut plans = Vec::new();
        let mut fragments = Some(fragments);
        let mut compute = Duration::ZERO;
        let result = self.backend.apply_streamed(&mut |sink| {
            let mut counted = |piece: Transaction| {
                commands += piece.commands.len();
                elements += piece.element_count();
                sink(piece)
            };
            for (c, fragments) in compilers.iter().zip(fragments.take().into_iter().flatten()) {
                // Creating then deleting our table first makes the batch replace whatever an
                // earlier run, or someone else, left in it.
                let mut head = Transaction::new();
                head.push(Command::AddTable {
                    table: c.table_id(),
                    comment: Some(crate::compile::TABLE_COMMENT.into()),
                });
                head.push(Command::DeleteTable {
                    table: c.table_id(),
                });
                counted(head)?;
                plans.push(c.plan_streamed(fragments, &mut counted)?);
            }
            compute = started.elapsed();
            Ok(())
        });
        if let Err(e) = result {
            self.needs_full = true;
            return Err(e);
        }
        let apply = started.elapsed().saturating_sub(compute);
        let t = Instant::now();
        for (c, p) in compilers.iter_mut().zip(plans) {
            c.commit(p);
        }
        self.compilers = compilers;
        self.restore_affinity(carried);
        self.ports.clear();
        for name in names {
            let key = ServiceKey {
                namespace: name.namespace.to_string(),
                name: name.name.to_string(),
            };
            self.ports.entry(key).or_default().push(name);
        }
        self.needs_full = false;
        // The affinity maps were replaced with empty ones.
        self.affinity_pending = [Touched::new(), Touched::new()];
        Ok(SyncReport {
            full: true,
            commands,
            elements,
            service_ports,
            compute,
            apply,
            commit: t.elapsed(),
            changed_services: self.ports.keys().cloned().collect(),
            affinity_purged: 0,
            affinity_purge_error: None,
        })
    }
}

/// Reads back the affinity maps `stale` looks at: backend I/O only, the decision is
/// [`Purge::deletes`]. A map the kernel does not hold has no entries.
fn read_back<B: Backend>(backend: &mut B, stale: &Purge) -> Result<ReadBack, ApplyError> {
    let mut read = Vec::new();
    for map in stale.maps() {
        match backend.list_elements(stale.table(), &map.name, &map.spec) {
            Ok(listed) => read.push((map, listed)),
            // No map, no entries.
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(read)
}

/// A full sync merges and compiles this many Services' entries at a time (at 10 endpoints
/// each, a few MiB of entries; enough service ports for the compile to run in parallel).
pub const FULL_SYNC_SERVICES: usize = 8192;

/// Merging one Service's slices costs microseconds: from this many Services on, a chunk is
/// merged in parallel (`crate::par`: up to four threads).
const MERGE_PARALLEL_MIN: usize = 256;

/// Opens the netfilter netlink socket of the current network namespace: the backend of `run`,
/// `cleanup` and the daemon.
pub fn netlink() -> anyhow::Result<crate::nft::netlink::Netlink> {
    use anyhow::Context as _;
    crate::nft::netlink::Netlink::new().context("opening the netfilter netlink socket")
}
