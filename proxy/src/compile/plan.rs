//! The incremental compiler: per-service-port fragments, who owns each element, and the
//! transaction between the committed state and a changed one ([`Compiler::plan`]), adopted
//! once the kernel accepted it ([`Compiler::commit`]).

mod purge;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use lb_core::{IpFamily, Node, ServicePortName};
use rustc_hash::FxHashMap as HashMap;
use smallvec::SmallVec;

use crate::nft::ir::{Element, SetSpec, Table, TableId, Value};
use crate::nft::{ApplyError, Command, Sink, Transaction};
use crate::store::{ServiceEntry, Snapshot};

use super::config::Config;
use super::layout::{Dispatch, Fam, SetRef};
use super::packed::{KeyHash, Record, hash_encoded, key_hash, set_of_prefix, set_prefix};
use super::service::{Builder, Fragment};
use super::skeleton::{Sizes, apply_sizes, fit_sizes, skeleton, traffic_sets};

/// What the compiler produced besides the table: figures for logs and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Service ports programmed for this family.
    pub service_ports: usize,
    /// Endpoint elements in the endpoint maps.
    pub endpoint_elements: usize,
}

/// Builds the table for `family` from a whole snapshot (a full sync, `render`, tests).
pub fn compile(snapshot: &Snapshot, config: &Config, family: IpFamily) -> (TableId, Table, Stats) {
    let mut c = Compiler::new(config.for_node(&snapshot.node), family);
    let changes: Vec<_> = snapshot
        .services
        .iter()
        .map(|(name, e)| (name.clone(), Some(e)))
        .collect();
    let plan = c.plan(&snapshot.node, changes);
    c.commit(plan);
    let stats = c.stats();
    (c.table_id(), c.table(), stats)
}

/// Who contributes which element: for every (set, key), by the hash of the key, the
/// contributing service ports, sorted. The kernel holds the first contributor's element, which
/// lives in that service port's [`Fragment`] (not copied here, nor is the key: issue 13).
///
/// A name is shared with the [`Compiler`]'s fragment map (8 bytes per owner).
type Owners = HashMap<KeyHash, OwnerList>;

/// The contributors of one key, sorted; never empty. Almost every key has one, held in place:
/// a map entry is 32 bytes, where a vector was 40 and an allocation of its own (issue 13: at
/// 50k Services × 10 endpoints the map holds 1.15M keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum OwnerList {
    One(Arc<ServicePortName>),
    /// Two or more. Boxed, so the list is one pointer and a tag (16 bytes); a vector would
    /// make every entry 40.
    #[allow(clippy::box_collection)]
    Many(Box<Vec<Arc<ServicePortName>>>),
}

impl OwnerList {
    /// The list of `owners` (sorted), or `None` when there is none.
    fn of(mut owners: Vec<Arc<ServicePortName>>) -> Option<OwnerList> {
        match owners.len() {
            0 => None,
            1 => owners.pop().map(OwnerList::One),
            _ => {
                owners.shrink_to_fit();
                Some(OwnerList::Many(Box::new(owners)))
            }
        }
    }

    pub(super) fn as_slice(&self) -> &[Arc<ServicePortName>] {
        match self {
            OwnerList::One(o) => std::slice::from_ref(o),
            OwnerList::Many(v) => v,
        }
    }

    /// The first contributor: the one whose element the kernel holds.
    pub(super) fn first(&self) -> &Arc<ServicePortName> {
        &self.as_slice()[0]
    }

    /// Adds `name` in its place, unless it is there.
    fn insert(&mut self, name: &Arc<ServicePortName>) {
        match self {
            OwnerList::One(one) if one == name => {}
            OwnerList::One(one) => {
                let (first, second) = if *one < *name {
                    (one.clone(), name.clone())
                } else {
                    (name.clone(), one.clone())
                };
                *self = OwnerList::Many(Box::new(vec![first, second]));
            }
            OwnerList::Many(all) => {
                if let Err(i) = all.binary_search(name) {
                    all.insert(i, name.clone());
                }
            }
        }
    }
}

/// One (set, key) a plan touches: its owners after the change, and the elements the changed
/// owners gave it before and after (`seen`), each named by the address of its shared name.
struct Touched<'a> {
    hash: KeyHash,
    key: &'a [u8],
    /// The first owner before the change: its element is the one the kernel holds.
    before: Option<&'a Arc<ServicePortName>>,
    owners: Vec<Arc<ServicePortName>>,
    seen: Seen<'a>,
}

impl<'a> Touched<'a> {
    fn new(hash: KeyHash, key: &'a [u8], owners: Option<&'a OwnerList>) -> Self {
        Touched {
            hash,
            key,
            before: owners.map(OwnerList::first),
            owners: owners.map_or_else(Vec::new, |o| o.as_slice().to_vec()),
            seen: SmallVec::new(),
        }
    }
}

/// The entry of `key` among `touched`, added (with its committed owners) when first met.
fn touch<'t, 'a>(
    index: &mut HashMap<KeyHash, u32>,
    touched: &'t mut Vec<Touched<'a>>,
    owners: &'a Owners,
    key: &'a [u8],
) -> &'t mut Touched<'a> {
    let h = hash_encoded(key);
    let next = touched.len();
    let i = *index
        .entry(h)
        .or_insert_with(|| u32::try_from(next).expect("fewer than 2^32 elements in one plan"))
        as usize;
    if i == next {
        touched.push(Touched::new(h, key, owners.get(&h)));
    }
    &mut touched[i]
}

/// Elements of a key by owner: (the owner's shared name's address, after the change?, element),
/// in the order the owner's records gave them. Addresses, not references: comparing them
/// reads nothing else (this runs once per element of a full sync).
type Seen<'a> = SmallVec<[(usize, bool, &'a [u8]); 1]>;

/// Decoded elements to add, by set, as commands of `tx`: one per set. Element order inside one
/// message does not matter to the kernel; not sorting keeps a large change linear.
fn push_adds(
    tx: &mut Transaction,
    id: &TableId,
    adds: BTreeMap<SetRef, Vec<(Vec<Value>, Element)>>,
) {
    for (set, elements) in adds {
        tx.push(Command::AddElements {
            table: id.clone(),
            set: set.name(),
            elements,
        });
    }
}

/// The owners of every key of `changes`' fragments, from nothing committed: each key's
/// service ports, sorted; each set's element count; and, for every record of the fragments
/// in order, whether its service port is its key's first owner (whose element the kernel
/// gets). `changes` must be sorted by name: a key's first owner is then the first to give
/// it.
fn owners_of(
    changes: &[(Arc<ServicePortName>, Option<Fragment>)],
) -> (Owners, HashMap<String, usize>, Vec<bool>) {
    debug_assert!(in_name_order(changes));
    let records = changes
        .iter()
        .flat_map(|(_, f)| f.iter().map(|f| f.elems.records().count()))
        .sum();
    let mut owners: Owners = HashMap::with_capacity_and_hasher(records, Default::default());
    let mut first = Vec::with_capacity(records);
    // Distinct keys per set (by the set's part of the encoded key): its element count.
    let mut per_set: HashMap<&[u8], usize> = HashMap::default();
    for (name, frag) in changes {
        for r in frag.iter().flat_map(|f| f.elems.records()) {
            first.push(match owners.entry(hash_encoded(r.key)) {
                Entry::Occupied(mut o) => {
                    o.get_mut().insert(name);
                    Arc::ptr_eq(o.get().first(), name)
                }
                Entry::Vacant(v) => {
                    v.insert(OwnerList::One(name.clone()));
                    *per_set.entry(set_prefix(r.key)).or_default() += 1;
                    true
                }
            });
        }
    }
    let elements = per_set
        .into_iter()
        .map(|(prefix, n)| (set_of_prefix(prefix).name(), n))
        .collect();
    // The shared keys' lists grew by doubling: kept as long as the state, they are shrunk.
    for o in owners.values_mut() {
        if let OwnerList::Many(all) = o {
            all.shrink_to_fit();
        }
    }
    (owners, elements, first)
}

/// Whether `changes` are sorted by service port name.
fn in_name_order(changes: &[(Arc<ServicePortName>, Option<Fragment>)]) -> bool {
    changes.is_sorted_by(|a, b| a.0 <= b.0)
}

/// The element `owner` gave the key before or `after` the change (its last record with it),
/// if it is among `seen`.
fn seen<'a>(seen: &Seen<'a>, owner: &Arc<ServicePortName>, after: bool) -> Option<&'a [u8]> {
    let owner = Arc::as_ptr(owner) as usize;
    seen.iter()
        .rev()
        .find(|(m, a, _)| *m == owner && *a == after)
        .map(|(_, _, e)| *e)
}

/// A part of a plan's touched keys, decoded: their owners after the change, and the
/// elements to delete and to add.
struct Decoded {
    owners: Vec<(KeyHash, Vec<Arc<ServicePortName>>)>,
    deletes: BTreeMap<SetRef, Vec<Vec<Value>>>,
    adds: BTreeMap<SetRef, Vec<(Vec<Value>, Element)>>,
}

/// The incremental compiler for one IP family.
///
/// It keeps every service port's [`Fragment`] and who owns each element, so a change to one
/// Service costs work proportional to that Service, not to the cluster: [`Compiler::plan`]
/// computes the transaction for a set of changed service ports without touching the state,
/// and [`Compiler::commit`] adopts it once the kernel accepted the transaction. A rejected
/// transaction is simply not committed, so the compiler keeps describing what the kernel holds.
#[derive(Debug)]
pub struct Compiler {
    pub(super) f: Fam,
    pub(super) config: Config,
    pub(super) fragments: HashMap<Arc<ServicePortName>, Fragment>,
    pub(super) owners: Owners,
    pub(super) counts: BTreeMap<(Dispatch, usize), usize>,
    pub(super) timeouts: BTreeMap<u64, usize>,
    /// `pick-N` chains and affinity sets that exist in the kernel (a superset of what is in
    /// use: unused ones are only removed by a full sync).
    pub(super) installed_counts: BTreeSet<(Dispatch, usize)>,
    pub(super) installed_timeouts: BTreeSet<u64>,
    /// The `size` of each set as the kernel holds it: fitted to the set's elements by the
    /// last full sync ([`fit_sizes`]). A change keeps them; one that outgrows a set is
    /// refused by the kernel and becomes a full sync, which fits them anew.
    pub(super) installed_sizes: Sizes,
    pub(super) installed: bool,
}

/// How many elements of a fresh table are decoded before they are handed on
/// ([`Compiler::plan_streamed`]): about 2 MiB of decoded elements at a time. Smaller waves
/// only add commands to the batch; at 10k Services × 10 endpoints, waves of 8k keys instead of
/// 32k lower `run --once`'s peak from 103 to 96 MiB for 2 % more time (issue 13).
pub const STREAM_KEYS: usize = 1 << 13;

/// The new fragments of some service ports (`None`: the service port is gone or programs
/// nothing), from [`Compiler::fragments`], for [`Compiler::plan_fragments`].
#[derive(Debug, Default)]
pub struct Fragments(Vec<(ServicePortName, Option<Fragment>)>);

impl Fragments {
    /// Adds `more` after these (built in parts, e.g. a full sync's chunks of Services).
    pub fn append(&mut self, mut more: Fragments) {
        self.0.append(&mut more.0);
    }

    /// The ClientIP affinity timeouts the fragments use.
    pub(super) fn timeouts(&self) -> impl Iterator<Item = u64> + '_ {
        self.0
            .iter()
            .flat_map(|(_, f)| f.iter().flat_map(|f| f.timeouts.iter().copied()))
    }
}

/// A computed but not yet committed change: the transaction and the state it leads to.
#[derive(Debug)]
pub struct Plan {
    /// The transaction to apply.
    pub tx: Transaction,
    pub(super) changes: Vec<(Arc<ServicePortName>, Option<Fragment>)>,
    /// The keys whose owners change: those that still have some, with them...
    pub(super) touched: Owners,
    /// ...and those that no longer have any.
    pub(super) gone: Vec<KeyHash>,
    pub(super) installed_counts: BTreeSet<(Dispatch, usize)>,
    pub(super) installed_timeouts: BTreeSet<u64>,
    pub(super) installed_sizes: Sizes,
}

impl Compiler {
    /// An empty compiler: nothing programmed yet.
    pub fn new(config: Config, family: IpFamily) -> Self {
        Compiler {
            f: Fam::new(family),
            config,
            fragments: HashMap::default(),
            owners: HashMap::default(),
            counts: BTreeMap::new(),
            timeouts: BTreeMap::new(),
            installed_counts: BTreeSet::new(),
            installed_timeouts: BTreeSet::new(),
            installed_sizes: Sizes::new(),
            installed: false,
        }
    }

    /// The table this compiler programs.
    pub fn table_id(&self) -> TableId {
        TableId::new(self.f.table_family(), self.config.table.clone())
    }

    /// Whether the table exists in the kernel (a plan was committed).
    pub fn is_installed(&self) -> bool {
        self.installed
    }

    /// Figures for logs and metrics.
    pub fn stats(&self) -> Stats {
        Stats {
            service_ports: self.fragments.len(),
            endpoint_elements: self.fragments.values().map(|f| f.endpoint_elements).sum(),
        }
    }

    /// The fragment of one service port (empty when it has no cluster IP of this family).
    pub fn fragment(&self, node: &Node, entry: &ServiceEntry) -> Fragment {
        let mut b = Builder {
            f: self.f,
            frag: Fragment::default(),
            sticky: entry.port.session_affinity().timeout().is_some(),
            rules: self.config.masquerading(self.f),
        };
        let endpoints: Vec<_> = entry
            .endpoints
            .iter()
            .filter(|e| self.f.is(&e.ip()))
            .cloned()
            .collect();
        b.service(&entry.port, &endpoints, node);
        // Complete: shrunk here, on the thread that built it, not copied when committed.
        b.frag.elems.shrink_to_fit();
        b.frag
    }

    /// The transaction that brings the kernel from the committed state to one where the given
    /// service ports have their new content (`None`: deleted). Does not change the compiler.
    pub fn plan<'e>(
        &self,
        node: &Node,
        changes: impl IntoIterator<Item = (ServicePortName, Option<&'e ServiceEntry>)>,
    ) -> Plan {
        self.plan_fragments(self.fragments(node, changes))
    }

    /// The first half of [`Compiler::plan`]: the fragments of the given service ports, built
    /// on every core when there are many. They borrow nothing, so a full sync frees the
    /// entries they were built from before the rest of the plan is computed (issue 13).
    pub fn fragments<'e>(
        &self,
        node: &Node,
        changes: impl IntoIterator<Item = (ServicePortName, Option<&'e ServiceEntry>)>,
    ) -> Fragments {
        let changes: Vec<(ServicePortName, Option<&ServiceEntry>)> = changes.into_iter().collect();
        let fragments = crate::par::map(&changes, |(_, e)| {
            e.map(|e| self.fragment(node, e))
                .filter(|f| *f != Fragment::default())
        });
        Fragments(
            changes
                .into_iter()
                .zip(fragments)
                .map(|((name, _), frag)| (name, frag))
                .collect(),
        )
    }

    /// The second half of [`Compiler::plan`]: the transaction for `fragments`.
    pub fn plan_fragments(&self, fragments: Fragments) -> Plan {
        let mut tx = Transaction::new();
        let mut plan = self
            .plan_streamed(fragments, &mut |mut piece| {
                tx.commands.append(&mut piece.commands);
                Ok(())
            })
            .expect("collecting the pieces does not fail");
        plan.tx = tx;
        plan
    }

    /// Like [`Compiler::plan_fragments`], handing the transaction to `sink` in pieces, in
    /// order, instead of in the plan (whose `tx` is then empty). For a table not yet
    /// installed (a full sync), the elements are decoded [`STREAM_KEYS`] at a time, so with a
    /// backend that encodes each piece as it comes ([`Backend::apply_streamed`]) the elements
    /// are never all held decoded (issue 13: a full sync's peak memory). A change to an
    /// installed table gives its deletes before its adds, as one piece each.
    ///
    /// [`Backend::apply_streamed`]: crate::nft::Backend::apply_streamed
    pub fn plan_streamed(
        &self,
        fragments: Fragments,
        sink: &mut Sink<'_>,
    ) -> Result<Plan, ApplyError> {
        let mut changes: Vec<(Arc<ServicePortName>, Option<Fragment>)> = fragments
            .0
            .into_iter()
            .filter(|(name, frag)| self.fragments.get(name) != frag.as_ref())
            .map(|(name, frag)| {
                // The committed name, shared by its owner lists, or a new one.
                let name = match self.fragments.get_key_value(&name) {
                    Some((shared, _)) => shared.clone(),
                    None => Arc::new(name),
                };
                (name, frag)
            })
            .collect();
        // Structural objects: new endpoint counts and timeouts need chains and sets first.
        let mut counts = self.installed_counts.clone();
        let mut timeouts = self.installed_timeouts.clone();
        for (_, frag) in &changes {
            if let Some(f) = frag {
                counts.extend(f.counts.iter().copied());
                timeouts.extend(f.timeouts.iter().copied());
            }
        }
        let id = self.table_id();
        let mut tx = Transaction::new();
        let fresh = !self.installed;
        if fresh && !in_name_order(&changes) {
            // A full sync's fragments come in name order; others are put in it, so that each
            // key's first owner is the first to give it (`owners_of`).
            changes.sort_by(|a, b| a.0.cmp(&b.0));
        }
        // A fresh table's sets are sized to fit their elements. A change keeps the sizes the
        // kernel holds, and gives a set it adds (the key maps of a new affinity timeout) the
        // smallest size: should the change overfill it, the kernel refuses the change and the
        // dataplane turns it into a full sync (`crate::sync`).
        let owners_fresh = fresh.then(|| owners_of(&changes));
        let mut after = skeleton(self.f, &self.config, &counts, &timeouts);
        let sizes = match &owners_fresh {
            Some((_, elements, _)) => fit_sizes(&after, |set| elements.get(set).copied()),
            None => {
                let mut sizes = self.installed_sizes.clone();
                for (set, size) in fit_sizes(&after, |_| None) {
                    sizes.entry(set).or_insert(size);
                }
                sizes
            }
        };
        apply_sizes(&mut after, &sizes);
        let before = if fresh {
            crate::nft::ir::Ruleset::default()
        } else {
            let mut before = skeleton(
                self.f,
                &self.config,
                &self.installed_counts,
                &self.installed_timeouts,
            );
            apply_sizes(&mut before, &sizes);
            one_table(&id, before)
        };
        let after = one_table(&id, after);
        tx.commands
            .extend(crate::nft::diff::diff(&before, &after).commands);
        // Record chains (ClientIP affinity): created before the elements that send
        // connections there, deleted after the last of those is.
        let none: &[(String, Vec<crate::nft::ir::Rule>)] = &[];
        let (chains_first, chains_last) = super::sticky::record_commands(
            &id,
            changes
                .iter()
                .map(|(n, f)| (n.as_ref(), f.as_ref().map_or(none, |f| f.record.as_slice()))),
            |n| {
                self.fragments
                    .get(n)
                    .filter(|_| !fresh)
                    .map_or(none, |f| f.record.as_slice())
            },
        );
        tx.commands.extend(chains_first);
        sink(tx)?;
        if let Some((owners, _, first)) = owners_fresh {
            // Nothing committed (a full sync's new compiler): no element to compare with, no
            // record chain to delete last.
            debug_assert!(self.fragments.is_empty() && chains_last.is_empty());
            self.add_all(&changes, &first, sink)?;
            return Ok(Plan {
                tx: Transaction::new(),
                touched: owners,
                gone: Vec::new(),
                changes,
                installed_counts: counts,
                installed_timeouts: timeouts,
                installed_sizes: sizes,
            });
        }

        // Elements: for every touched (set, key), its contributors after the change, and the
        // effective element (the first contributor's) before and after. Keys are compared as
        // their encoding, elements too; only what goes into the transaction is decoded.
        // At most one entry per record of the changed fragments, old and new: sized exactly,
        // the vector never doubles (a full sync's peak memory, issue 13).
        let capacity = changes
            .iter()
            .map(|(name, f)| {
                let old = self
                    .fragments
                    .get(name)
                    .map_or(0, |o| o.elems.records().count());
                old + f.as_ref().map_or(0, |f| f.elems.records().count())
            })
            .sum();
        // Each touched key once, in the order first met, found by its hash.
        let mut index: HashMap<KeyHash, u32> =
            HashMap::with_capacity_and_hasher(capacity, Default::default());
        let mut touched: Vec<Touched<'_>> = Vec::with_capacity(capacity);
        for (name, frag) in &changes {
            if let Some(old) = self.fragments.get(name) {
                for r in old.elems.records() {
                    let t = touch(&mut index, &mut touched, &self.owners, r.key);
                    t.owners.retain(|n| n != name);
                    t.seen.push((Arc::as_ptr(name) as usize, false, r.elem));
                }
            }
            for r in frag.iter().flat_map(|f| f.elems.records()) {
                let t = touch(&mut index, &mut touched, &self.owners, r.key);
                if let Err(i) = t.owners.binary_search(name) {
                    // Almost every key has one owner: no spare capacity while the plan holds
                    // the list of every touched key.
                    t.owners.reserve_exact(1);
                    t.owners.insert(i, name.clone());
                }
                t.seen.push((Arc::as_ptr(name) as usize, true, r.elem));
            }
        }
        drop(index);
        let mut owners_after: Owners =
            HashMap::with_capacity_and_hasher(touched.len(), Default::default());
        let mut gone = Vec::new();
        // The touched keys are decoded in parts, in parallel when there are many. Each part's
        // elements go in commands of their own (several for one set are one transaction all
        // the same): merging them per set would copy every element once more. All deletes come
        // before all adds.
        let decoded = crate::par::map_parts_mut(&mut touched, |part| self.decode(part));
        drop(touched);
        let (mut deletes, mut adds) = (Transaction::new(), Transaction::new());
        for part in decoded {
            for (hash, owners) in part.owners {
                match OwnerList::of(owners) {
                    Some(o) => {
                        owners_after.insert(hash, o);
                    }
                    None => gone.push(hash),
                }
            }
            for (set, keys) in part.deletes {
                deletes.push(Command::DeleteElements {
                    table: id.clone(),
                    set: set.name(),
                    keys,
                });
            }
            push_adds(&mut adds, &id, part.adds);
        }
        if !deletes.is_empty() {
            sink(deletes)?;
        }
        if !adds.is_empty() {
            sink(adds)?;
        }
        sink(Transaction {
            commands: chains_last,
        })?;
        // Sorted: the affinity purge looks keys up in it.
        gone.sort_unstable();
        Ok(Plan {
            tx: Transaction::new(),
            changes,
            touched: owners_after,
            gone,
            installed_counts: counts,
            installed_timeouts: timeouts,
            installed_sizes: sizes,
        })
    }

    /// Hands on, in waves of about [`STREAM_KEYS`] elements, the elements of a table that
    /// holds nothing yet: of every key, its first owner's (last) element, `first` telling
    /// for each record of `changes` in order whether its owner is the key's first
    /// ([`owners_of`]). Without the bookkeeping a change to committed state needs (the
    /// touched keys, with their owners before and after and the elements seen), a full
    /// sync's peak memory is lower by about a third (issue 13).
    fn add_all(
        &self,
        changes: &[(Arc<ServicePortName>, Option<Fragment>)],
        first: &[bool],
        sink: &mut Sink<'_>,
    ) -> Result<(), ApplyError> {
        let id = self.table_id();
        // Of every fragment's records whose owner is their key's first, those no later
        // record with the same key replaces. (A record and the later ones with its key
        // have the same owner, so the same `first`.)
        let mut offset = 0;
        let mut records = changes.iter().flat_map(|(_, frag)| {
            let all: SmallVec<[Record<'_>; 32]> =
                frag.iter().flat_map(|f| f.elems.records()).collect();
            let first = &first[offset..offset + all.len()];
            offset += all.len();
            let last: SmallVec<[Record<'_>; 32]> = if all.len() <= 32 {
                (all.iter().enumerate())
                    .filter(|(i, r)| first[*i] && !all[i + 1..].iter().any(|l| l.key == r.key))
                    .map(|(_, r)| *r)
                    .collect()
            } else {
                // A service port with many endpoints: by a set of the keys met, from the end.
                let mut met = rustc_hash::FxHashSet::default();
                let mut last: SmallVec<_> = (all.iter().enumerate().rev())
                    .filter(|(i, r)| met.insert(r.key) && first[*i])
                    .map(|(_, r)| *r)
                    .collect();
                last.reverse();
                last
            };
            last
        });
        let mut wave: Vec<Record<'_>> = Vec::new();
        loop {
            wave.clear();
            wave.extend(records.by_ref().take(STREAM_KEYS));
            if wave.is_empty() {
                break;
            }
            let decoded = crate::par::map_parts_mut(&mut wave, |part| {
                let mut adds: BTreeMap<SetRef, Vec<(Vec<Value>, Element)>> = BTreeMap::new();
                for r in part.iter() {
                    let (set, values) = r.decode_key();
                    adds.entry(set).or_default().push((values, r.decode_elem()));
                }
                adds
            });
            let mut adds = Transaction::new();
            for part in decoded {
                push_adds(&mut adds, &id, part);
            }
            if !adds.is_empty() {
                sink(adds)?;
            }
        }
        Ok(())
    }

    /// The owners after the change of `touched` keys, and the elements to delete and add for
    /// those whose effective element (the first owner's) changes.
    fn decode(&self, touched: &mut [Touched<'_>]) -> Decoded {
        let mut d = Decoded {
            owners: Vec::with_capacity(touched.len()),
            deletes: BTreeMap::new(),
            adds: BTreeMap::new(),
        };
        for t in touched {
            let key = t.key;
            // The effective element before and after: the first owner's. A changed owner's
            // element was seen when the key was touched (its last record with the key wins,
            // as in `find`); only an unchanged owner's is looked up in its fragment.
            let old = t.before.and_then(|n| {
                seen(&t.seen, n, false).or_else(|| self.fragments.get(n)?.elems.find(key))
            });
            let new = t.owners.first().and_then(|n| {
                seen(&t.seen, n, true).or_else(|| self.fragments.get(n)?.elems.find(key))
            });
            d.owners.push((t.hash, std::mem::take(&mut t.owners)));
            if old == new {
                continue;
            }
            let record = Record {
                key,
                elem: new.unwrap_or_default(),
            };
            let (set, values) = record.decode_key();
            match new {
                Some(_) => {
                    if old.is_some() {
                        d.deletes.entry(set).or_default().push(values.clone());
                    }
                    d.adds
                        .entry(set)
                        .or_default()
                        .push((values, record.decode_elem()));
                }
                None => d.deletes.entry(set).or_default().push(values),
            }
        }
        d
    }

    /// Adopts a plan whose transaction the kernel accepted.
    pub fn commit(&mut self, mut plan: Plan) {
        if self.owners.is_empty() {
            // A first or full sync: the plan's view is the whole state; adopt it as is.
            self.owners = std::mem::take(&mut plan.touched);
        }
        self.owners.extend(plan.touched);
        for k in plan.gone {
            self.owners.remove(&k);
        }
        for (name, frag) in plan.changes {
            if let Some(old) = self.fragments.remove(&name) {
                for c in &old.counts {
                    dec(&mut self.counts, c);
                }
                for t in &old.timeouts {
                    dec(&mut self.timeouts, t);
                }
            }
            if let Some(mut new) = frag {
                new.elems.shrink_to_fit();
                for c in &new.counts {
                    *self.counts.entry(*c).or_default() += 1;
                }
                for t in &new.timeouts {
                    *self.timeouts.entry(*t).or_default() += 1;
                }
                self.fragments.insert(name, new);
            }
        }
        self.installed_counts = plan.installed_counts;
        self.installed_timeouts = plan.installed_timeouts;
        self.installed_sizes = plan.installed_sizes;
        self.installed = true;
    }

    /// The table as committed, elements included, with only the chains and sets in use (what
    /// a full sync installs).
    pub fn table(&self) -> Table {
        let counts: BTreeSet<_> = self.counts.keys().copied().collect();
        let timeouts: BTreeSet<_> = self.timeouts.keys().copied().collect();
        let mut table = skeleton(self.f, &self.config, &counts, &timeouts);
        super::sticky::add_record_chains(
            &mut table,
            self.fragments.values().map(|f| f.record.as_slice()),
        );
        // Every fragment's records, in order (a later one with the same key replaces an
        // earlier one), of the keys it is the first contributor of.
        for (name, frag) in &self.fragments {
            for r in frag.elems.records() {
                let first = self.owners.get(&hash_encoded(r.key)).map(OwnerList::first);
                if first.is_none_or(|f| !Arc::ptr_eq(f, name) && f != name) {
                    continue;
                }
                let (set, key) = r.decode_key();
                if let Some(s) = table.sets.get_mut(&set.name()) {
                    s.elements.insert(key, r.decode_elem());
                }
            }
        }
        let sizes = fit_sizes(&table, |set| table.sets.get(set).map(|s| s.elements.len()));
        apply_sizes(&mut table, &sizes);
        table
    }

    /// [`Compiler::table`] with the set sizes the kernel holds: those of the last full sync
    /// (and the smallest for a set a change added since), where [`Compiler::table`] gives the
    /// sizes a full sync would give now.
    pub fn installed_table(&self) -> Table {
        let mut table = self.table();
        apply_sizes(&mut table, &self.installed_sizes);
        table
    }

    /// Forgets which chains and sets beyond those in use exist, after a full sync replaced
    /// the table with [`Compiler::table`].
    pub fn mark_full_sync(&mut self) {
        self.installed_counts = self.counts.keys().copied().collect();
        self.installed_timeouts = self.timeouts.keys().copied().collect();
        self.installed_sizes = self
            .table()
            .sets
            .into_iter()
            .filter_map(|(name, s)| Some((name, s.spec.size?)))
            .collect();
    }
}

impl Compiler {
    /// The traffic counting sets (`service-traffic`, `nodeport-traffic`) and their specs,
    /// to read their counters back.
    pub fn traffic_sets(&self) -> [(&'static str, SetSpec); 2] {
        traffic_sets(self.f)
    }

    /// The service port that element `key` of traffic set `set` counts for (its first
    /// contributor, as committed).
    pub fn traffic_owner(&self, set: &'static str, key: &[Value]) -> Option<&ServicePortName> {
        self.owners
            .get(&key_hash(SetRef::Static(set), key))
            .map(|o| &**o.first())
    }
}

pub(super) fn dec<K: Ord>(m: &mut BTreeMap<K, usize>, k: &K) {
    if let Some(n) = m.get_mut(k) {
        *n -= 1;
        if *n == 0 {
            m.remove(k);
        }
    }
}

pub(super) fn one_table(id: &TableId, t: Table) -> crate::nft::ir::Ruleset {
    let mut rs = crate::nft::ir::Ruleset::default();
    rs.tables.insert(id.clone(), t);
    rs
}

#[cfg(test)]
mod tests {
    use lb_core::{Endpoint, Protocol, ServicePort, ServiceType};

    use super::*;
    use crate::nft::Backend;
    use crate::nft::fake::Fake;

    fn node() -> Node {
        Node::new("node-a", None).expect("valid node")
    }

    fn entry(name: &str, affinity: bool, eps: &[&str]) -> ServiceEntry {
        let mut b = ServicePort::builder("ns", name, "http", Protocol::Tcp, 80)
            .cluster_ips(["10.96.0.1"])
            .service_type(ServiceType::NodePort)
            .node_port(30080);
        if affinity {
            b = b.client_ip_affinity(Some(600));
        }
        ServiceEntry {
            port: b.build().expect("valid service"),
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

    /// How many elements each set of the table `fake` holds has, for those with any.
    fn elements(fake: &Fake, id: &TableId) -> BTreeMap<String, usize> {
        fake.ruleset.tables[id]
            .sets
            .iter()
            .filter(|(_, s)| !s.elements.is_empty())
            .map(|(name, s)| (name.clone(), s.elements.len()))
            .collect()
    }

    #[test]
    fn adding_then_deleting_service_ports_returns_to_the_empty_state() {
        let config = Config {
            cluster_cidrs: vec!["10.244.0.0/16".parse().expect("literal CIDR")],
            ..Config::default()
        };
        let empty = Compiler::new(config.clone(), IpFamily::V4);
        let mut c = Compiler::new(config, IpFamily::V4);
        let mut fake = Fake::default();
        // Nothing yet: the plan creates the table, without elements.
        let p = c.plan(&node(), []);
        fake.apply(&p.tx).expect("valid transaction");
        c.commit(p);
        let id = c.table_id();
        let before = elements(&fake, &id);

        let a = entry("a", true, &["10.244.1.1", "10.244.1.2"]);
        let b = entry("b", false, &["10.244.2.1"]);
        let names = [a.port.name().clone(), b.port.name().clone()];
        let p = c.plan(
            &node(),
            [(names[0].clone(), Some(&a)), (names[1].clone(), Some(&b))],
        );
        fake.apply(&p.tx).expect("valid transaction");
        c.commit(p);
        assert_eq!(c.stats().service_ports, 2);
        assert_eq!(
            c.stats().endpoint_elements,
            6,
            "2 + 1 endpoints, each for cluster IP and node port"
        );
        assert_ne!(elements(&fake, &id), before);

        let p = c.plan(&node(), names.iter().map(|n| (n.clone(), None)));
        // Elements, then the affinity Service's record chain (no element refers to it then).
        let n = p.tx.commands.len();
        assert!(
            p.tx.commands[..n - 2]
                .iter()
                .all(|c| matches!(c, Command::DeleteElements { .. }))
                && matches!(&p.tx.commands[n - 2], Command::FlushChain { chain, .. } if chain == "affinity-record.ns.a.http")
                && matches!(&p.tx.commands[n - 1], Command::DeleteChain { chain, .. } if chain == "affinity-record.ns.a.http"),
            "a deletion only deletes elements and record chains: {}",
            p.tx.to_nft()
        );
        fake.apply(&p.tx).expect("valid transaction");
        c.commit(p);
        assert_eq!(c.stats(), Stats::default());
        assert!(c.owners.is_empty() && c.fragments.is_empty());
        assert!(c.counts.is_empty() && c.timeouts.is_empty());
        assert_eq!(c.table(), empty.table(), "what a full sync would install");
        assert_eq!(elements(&fake, &id), before, "what the kernel holds");
        // The chains and sets of the counts and timeouts once used stay until a full sync.
        assert!(
            fake.ruleset.tables[&id]
                .chains
                .contains_key("pick-sticky-2")
        );
        c.mark_full_sync();
        assert!(c.installed_counts.is_empty() && c.installed_timeouts.is_empty());
    }

    #[test]
    fn a_plan_changes_nothing_until_it_is_committed() {
        let mut c = Compiler::new(Config::default(), IpFamily::V4);
        let a = entry("a", false, &["10.244.1.1"]);
        let p = c.plan(&node(), [(a.port.name().clone(), Some(&a))]);
        assert!(!p.tx.is_empty());
        assert_eq!(c.stats(), Stats::default());
        assert!(!c.is_installed());
        drop(p);
        // Planned again, the same transaction: the rejected plan left no trace.
        let again = c.plan(&node(), [(a.port.name().clone(), Some(&a))]);
        c.commit(again);
        assert_eq!(c.stats().service_ports, 1);
        // An unchanged service port plans to nothing.
        let p = c.plan(&node(), [(a.port.name().clone(), Some(&a))]);
        assert!(p.tx.is_empty(), "{}", p.tx.to_nft());
    }

    /// A full sync sizes each set for the elements it installs: the per-set counts taken while
    /// the ownership map is built must be exactly the element counts of the table, in every
    /// set and both families, with keys several service ports share (a node port, an external
    /// IP, an endpoint) counted once. A wrong count could make a set too small (every full
    /// sync refused) or waste kernel memory; `fit_size` hides counts up to 512, so the counts
    /// themselves are compared.
    #[test]
    fn a_fresh_plan_counts_each_sets_elements_as_the_table_holds_them() {
        use lb_core::TrafficPolicy;
        let entries: Vec<ServiceEntry> = (0..40u32)
            .map(|i| {
                let mut b = ServicePort::builder("ns", &format!("s{i}"), "http", Protocol::Tcp, 80)
                    .cluster_ips([format!("10.96.0.{i}"), format!("fd00:96::{i}")])
                    .service_type(ServiceType::NodePort)
                    // Shared by several service ports.
                    .node_port(30000 + i64::from(i % 7))
                    .external_ips(["198.51.100.7", "2001:db8::7"]);
                match i % 4 {
                    0 => {
                        b = b
                            .service_type(ServiceType::LoadBalancer)
                            .load_balancer_ips([format!("192.0.2.{i}"), format!("2001:db8:1::{i}")])
                            .load_balancer_source_ranges(["10.0.0.0/8", "fd00::/8"])
                            .external_traffic_policy(TrafficPolicy::Local)
                    }
                    1 => b = b.client_ip_affinity(Some(60 + i64::from(i % 3))),
                    2 => b = b.internal_traffic_policy(TrafficPolicy::Local),
                    _ => {}
                }
                let endpoints = (0..u8::try_from(i % 4).expect("small"))
                    .flat_map(|j| {
                        // One endpoint every service port has, and some of their own.
                        let ips = [
                            format!("10.200.{i}.{j}"),
                            format!("fd00:200::{i}:{j}"),
                            "10.201.0.1".into(),
                        ];
                        ips.into_iter().map(move |ip| {
                            Endpoint::builder(ip, 8080)
                                .node_name(if j % 2 == 0 { "node-a" } else { "node-b" })
                                .build()
                                .expect("valid endpoint")
                        })
                    })
                    .collect();
                ServiceEntry {
                    port: b.build().expect("valid service"),
                    endpoints,
                }
            })
            .collect();
        for family in [IpFamily::V4, IpFamily::V6] {
            let mut c = Compiler::new(Config::default(), family);
            let p = c.plan(
                &node(),
                entries.iter().map(|e| (e.port.name().clone(), Some(e))),
            );
            let (_, counted, _) = owners_of(&p.changes);
            c.commit(p);
            let table = c.table();
            let mut held = 0;
            for (name, set) in &table.sets {
                if set.spec.size.is_none() {
                    continue;
                }
                held += set.elements.len();
                assert_eq!(
                    counted.get(name).copied().unwrap_or(0),
                    set.elements.len(),
                    "{family:?} {name}"
                );
            }
            assert!(held > 300, "{family:?}: {held} elements in sized sets");
            for shared in ["nodeport-endpoints", "service-nodeports"] {
                assert!(counted.contains_key(shared), "{family:?} {shared}");
            }
            // The kernel's sizes are the ones this count gives.
            assert_eq!(c.installed_table(), table);
        }
    }

    /// `n` endpoints of the `i`-th generated Service (`10.{100 + i / 250}.{i % 250}.{1..=n}`).
    fn endpoints(i: u32, n: u8) -> Vec<Endpoint> {
        let (hi, lo) = (i / 250, i % 250);
        (1..=n)
            .map(|j| {
                Endpoint::builder(format!("10.{}.{lo}.{j}", 100 + hi), 8080)
                    .build()
                    .expect("valid endpoint")
            })
            .collect()
    }

    #[test]
    fn a_plan_of_thousands_of_service_ports_decoded_in_parallel_installs_what_one_port_at_a_time_does()
     {
        // Every entry has the same node port, so its keys have 600 owners; the cluster IPs
        // and endpoints have one each. Far above PARALLEL_MIN touched keys.
        let entries: Vec<ServiceEntry> = (0..600u32)
            .map(|i| {
                let (hi, lo) = (i / 250, i % 250);
                let mut b = ServicePort::builder("ns", &format!("s{i}"), "http", Protocol::Tcp, 80)
                    .cluster_ips([format!("10.96.{hi}.{lo}")])
                    .service_type(ServiceType::NodePort)
                    .node_port(30080);
                if i % 3 == 0 {
                    b = b.client_ip_affinity(Some(600));
                }
                ServiceEntry {
                    port: b.build().expect("valid service"),
                    endpoints: endpoints(i, 3),
                }
            })
            .collect();
        let names: Vec<ServicePortName> = entries.iter().map(|e| e.port.name().clone()).collect();
        let config = Config::default();

        let mut bulk = Compiler::new(config.clone(), IpFamily::V4);
        let mut bulk_kernel = Fake::default();
        let p = bulk.plan(&node(), names.iter().cloned().zip(entries.iter().map(Some)));
        assert!(
            p.touched.len() + p.gone.len() >= crate::par::PARALLEL_MIN,
            "{} keys",
            p.touched.len() + p.gone.len()
        );
        bulk_kernel
            .apply(&without_sizes(&p.tx))
            .expect("valid transaction");
        bulk.commit(p);

        let mut single = Compiler::new(config, IpFamily::V4);
        let mut single_kernel = Fake::default();
        for (n, e) in names.iter().zip(&entries) {
            let p = single.plan(&node(), [(n.clone(), Some(e))]);
            single_kernel
                .apply(&without_sizes(&p.tx))
                .expect("valid transaction");
            single.commit(p);
        }
        let id = bulk.table_id();
        assert_eq!(
            bulk_kernel.ruleset.tables[&id], single_kernel.ruleset.tables[&id],
            "one plan of every port, and one plan per port, install the same table"
        );
        assert_eq!(bulk.table(), single.table());
        assert_eq!(bulk.owners, single.owners);

        // Every second port deleted: in one plan, and one at a time.
        let p = bulk.plan(&node(), names.iter().step_by(2).map(|n| (n.clone(), None)));
        bulk_kernel
            .apply(&without_sizes(&p.tx))
            .expect("valid transaction");
        bulk.commit(p);
        for n in names.iter().step_by(2) {
            let p = single.plan(&node(), [(n.clone(), None)]);
            single_kernel
                .apply(&without_sizes(&p.tx))
                .expect("valid transaction");
            single.commit(p);
        }
        assert_eq!(
            bulk_kernel.ruleset.tables[&id],
            single_kernel.ruleset.tables[&id]
        );
        assert_eq!(bulk.owners, single.owners);
        assert_eq!(bulk.stats().service_ports, 300);
    }

    /// `tx` with its sets created without a size. A full sync sizes sets for the elements it
    /// installs (`proxy/tests/sync.rs` tests that); one port at a time from nothing, the
    /// sets outgrow what the first port's plan gives them.
    fn without_sizes(tx: &Transaction) -> Transaction {
        let mut tx = tx.clone();
        for c in &mut tx.commands {
            if let Command::AddSet { spec, .. } = c {
                spec.size = None;
            }
        }
        tx
    }

    #[test]
    fn an_owner_list_is_two_words_and_keeps_its_owners_sorted() {
        // Two words on a 64-bit target: a tag and a pointer.
        #[cfg(target_pointer_width = "64")]
        assert_eq!(std::mem::size_of::<OwnerList>(), 16);
        let name = |n: &str| Arc::new(ServicePortName::new("ns", n, "", Protocol::Tcp));
        let (a, b, c) = (name("a"), name("b"), name("c"));
        let mut list = OwnerList::One(b.clone());
        list.insert(&c);
        list.insert(&a);
        list.insert(&b);
        assert_eq!(list.as_slice(), [a.clone(), b.clone(), c.clone()]);
        assert_eq!(list.first(), &a);
        assert_eq!(OwnerList::of(vec![c.clone()]), Some(OwnerList::One(c)));
        assert_eq!(OwnerList::of(vec![]), None);
    }

    #[test]
    fn a_fresh_table_gets_each_keys_first_owners_last_element() {
        // Crafted fragments: one owner gives a key twice (its later record replaces the
        // earlier), two owners share a key (the first by name wins, whatever the order of
        // the changes), and `table()` (elements by committed owners) is the reference.
        let set = SetRef::Static(super::super::layout::CLUSTER_IPS);
        let key = |i: u8| vec![Value::Ipv4(std::net::Ipv4Addr::new(10, 96, 0, i))];
        let elem = |c: &str| Element {
            comment: Some(c.into()),
            ..Element::key_only()
        };
        let frag = |records: &[(u8, String)]| {
            let mut f = Fragment::default();
            for (k, c) in records {
                f.elems.push(set, &key(*k), &elem(c));
            }
            Some(f)
        };
        let name = |n: &str| ServicePortName::new("ns", n, "http", Protocol::Tcp);
        let records = |r: &[(u8, &str)]| -> Vec<(u8, String)> {
            r.iter().map(|(k, c)| (*k, c.to_string())).collect()
        };
        // A large fragment too (many endpoints), with a key given twice.
        let mut many = vec![(10, "c10-old".to_string())];
        many.extend((11..60).map(|k| (k, format!("c{k}"))));
        many.push((10, "c10".into()));
        let changes = Fragments(vec![
            (name("b"), frag(&records(&[(2, "b2"), (3, "b3")]))),
            (
                name("a"),
                frag(&records(&[(1, "a1-old"), (2, "a2"), (1, "a1")])),
            ),
            (name("c"), frag(&many)),
        ]);
        let mut c = Compiler::new(Config::default(), IpFamily::V4);
        let plan = c.plan_fragments(changes);
        let mut added = BTreeMap::new();
        for cmd in &plan.tx.commands {
            if let Command::AddElements { set, elements, .. } = cmd {
                for (k, e) in elements {
                    assert!(
                        added.insert((set.clone(), k.clone()), e.clone()).is_none(),
                        "{set} {k:?} added twice"
                    );
                }
            }
        }
        let comment = |i: u8| {
            added[&(super::super::layout::CLUSTER_IPS.to_string(), key(i))]
                .comment
                .clone()
        };
        assert_eq!(
            [comment(1), comment(2), comment(3), comment(10), comment(59)],
            [
                Some("a1".into()),
                Some("a2".into()),
                Some("b3".into()),
                Some("c10".into()),
                Some("c59".into())
            ]
        );
        c.commit(plan);
        let table = c.table();
        let installed: BTreeMap<_, _> = (table.sets.iter())
            .flat_map(|(s, set)| {
                (set.elements.iter()).map(move |(k, e)| ((s.clone(), k.clone()), e.clone()))
            })
            .collect();
        assert_eq!(added, installed);
    }

    #[test]
    fn a_fresh_table_larger_than_one_wave_is_handed_on_in_pieces_that_install_every_element() {
        let entries: Vec<ServiceEntry> = (0..4000u32)
            .map(|i| {
                let (hi, lo) = (i / 250, i % 250);
                ServiceEntry {
                    port: ServicePort::builder("ns", &format!("s{i}"), "http", Protocol::Tcp, 80)
                        .cluster_ips([format!("10.96.{hi}.{lo}")])
                        .build()
                        .expect("valid service"),
                    endpoints: endpoints(i, 5),
                }
            })
            .collect();
        let mut c = Compiler::new(Config::default(), IpFamily::V4);
        let fragments = c.fragments(
            &node(),
            entries.iter().map(|e| (e.port.name().clone(), Some(e))),
        );
        let mut kernel = Fake::default();
        let (mut pieces, mut largest) = (0, 0);
        let mut plan = None;
        let mut fragments = Some(fragments);
        kernel
            .apply_streamed(&mut |sink| {
                let mut counting = |piece: Transaction| {
                    pieces += 1;
                    largest = largest.max(piece.element_count());
                    sink(piece)
                };
                let f = fragments.take().expect("produced once");
                plan = Some(c.plan_streamed(f, &mut counting)?);
                Ok(())
            })
            .expect("valid transaction");
        let plan = plan.expect("planned");
        assert!(
            plan.touched.len() > STREAM_KEYS,
            "{} keys",
            plan.touched.len()
        );
        assert!(plan.tx.is_empty(), "the pieces went to the sink");
        // Head, then two waves of adds at least; no piece holds more than a wave.
        assert!(pieces >= 4, "{pieces} pieces");
        assert!(largest <= STREAM_KEYS, "a piece of {largest} elements");
        c.commit(plan);
        assert_eq!(
            kernel.ruleset.tables[&c.table_id()],
            c.table(),
            "what the pieces installed is the committed table"
        );
    }
}
