//! [`FlatAffinityTable`]: the affinity contract on sharded open-addressing tables whose slots
//! hold the whole entry (key, client, expiry, endpoint) inline.
//!
//! # Why a second table
//!
//! [`AffinityTable`](super::AffinityTable) sits on `dashmap` (hashbrown per shard), which
//! accepts any key but pays for it on a cold hit: a read of the shard's control bytes, then of
//! the entry, two dependent cache misses plus a read-write lock. This table restricts the key
//! to `Copy` values (a Service id and the client address: at most 20 bytes, the "128-bit client
//! key" plus the id) and the endpoint to `Copy` values, and stores them in the probed slot
//! itself, so a hit in a table far larger than the caches costs one cache miss for the slot,
//! one for the shard's lock word (shared by every key of the shard, so usually in a cache,
//! though with several threads often another core's), and a few nanoseconds of hashing.
//!
//! # Cost, measured
//!
//! `lb-scale --affinity` (1M clients, 2 threads, uniformly random hits, 2-vCPU VM) measures a
//! hit at 265–305 ns of the thread's own CPU time on a quiet machine, against 190–220 ns for
//! one *dependent* random read in an array of the table's size and about 20 ns for an
//! *independent* one (printed on the lines below it; under load all three grow alike). So a
//! cold hit costs about one uncached read, as designed, but consecutive hits do not overlap
//! the way independent reads do: a hit (hash the key, convert the instant, lock, probe,
//! compare, check eligibility, store) runs a couple of hundred instructions, which fills the
//! CPU's reorder window before the next hit's load is issued — with about 100 instructions of
//! work between independent reads, a read already costs 115–130 ns. The lock is not the
//! limit: a variant with a lock-free hit path (write-once slots, per-thread views of the
//! arrays, a plain store for the refresh) measured no faster (405–430 vs 365–415 ns CPU in
//! the same loaded run) and was dropped. Giving the CPU independent work is what helps: on
//! that variant, touching the slots of 16 connections before picking them halved the cost
//! (160–190 ns per hit), still above the 60 ns of a hit whose slot is already cached.
//!
//! # Layout
//!
//! `SHARDS` shards, chosen by the top bits of the hash, each a [`Mutex`] around a power-of-two
//! array of `Option<Slot>` probed linearly from the low bits of the hash, kept at most 3/4 full
//! (it doubles beyond that). With `u32` keys and `SocketAddr` endpoints a slot is 64 bytes, a
//! cache line's size (not aligned to one: aligning would pad smaller slots, and measured no
//! faster). Removal ([`FlatAffinityTable::reap`], [`FlatAffinityTable::retain`]) rebuilds a
//! shard that lost entries, so there are no tombstones and probe sequences stay short.
//!
//! The contract (hit, miss, overflow, reap, the expiry floor of bounded tables) is
//! [`AffinityTable`](super::AffinityTable)'s, word for word; `lb-core/tests/pickers_props.rs`
//! runs one model-based property test against both.

use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use super::{
    AffinityPick, DefaultHashBuilder, Nanos, NewConnection, Occupancy, Outcome, nanos_since,
    saturating_nanos,
};
use crate::pick;

/// Shards: a power of two well above the thread count of a proxy, so threads rarely meet on a
/// lock, and small enough that a whole-table reap stays cheap.
const SHARD_BITS: u32 = 6;
const SHARDS: usize = 1 << SHARD_BITS;
/// Slots of a shard before its first insertion grows it.
const MIN_SLOTS: usize = 8;
/// Shards a batch holds locked at once: enough connections to keep many cache misses in
/// flight, few enough that another thread rarely waits for them.
const GROUP: usize = 16;

/// A ClientIP affinity table with the contract of [`AffinityTable`](super::AffinityTable), for
/// `Copy` service keys and endpoints, with a hit cost close to one cache miss.
///
/// ```
/// use std::net::{IpAddr, Ipv4Addr, SocketAddr};
/// use std::time::{Duration, Instant};
/// use lb_core::affinity::{FlatAffinityTable, NewConnection, Outcome};
///
/// // Service ports identified by a compact id, endpoints by their socket address.
/// let table: FlatAffinityTable<u32, SocketAddr> = FlatAffinityTable::new();
/// let endpoints: Vec<SocketAddr> = vec!["10.0.0.1:80".parse()?, "10.0.0.2:80".parse()?];
/// let t0 = Instant::now();
/// let conn = NewConnection {
///     service: &7,
///     client: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
///     now: t0,
///     timeout: Duration::from_secs(10_800),
///     random: 0x9e37_79b9_7f4a_7c15,
/// };
/// let first = table.pick(conn, &endpoints).expect("there are endpoints");
/// assert_eq!(first.outcome, Outcome::Miss);
/// let later = NewConnection { now: t0 + Duration::from_secs(3600), random: 1, ..conn };
/// let again = table.pick(later, &endpoints).expect("there are endpoints");
/// assert_eq!((again.endpoint, again.outcome), (first.endpoint, Outcome::Hit));
/// assert_eq!(table.reap(t0 + Duration::from_secs(3600 + 10_800)), 1);
/// assert!(table.is_empty());
/// # Ok::<(), std::net::AddrParseError>(())
/// ```
pub struct FlatAffinityTable<K, E, S = DefaultHashBuilder> {
    shards: Box<[Shard<K, E>]>,
    hasher: S,
    /// The entry count against the bound, overflows, and the expiry floor, as in
    /// [`AffinityTable`](super::AffinityTable).
    occupancy: Occupancy,
    origin: OnceLock<Instant>,
}

/// One shard, on its own cache line so two threads locking neighbouring shards do not share
/// one.
#[repr(align(64))]
struct Shard<K, E> {
    slots: Mutex<Slots<K, E>>,
}

/// A shard's open-addressing array (empty, or a power of two long and at most 3/4 full) and
/// how many of its slots are used.
struct Slots<K, E> {
    array: Vec<Option<Slot<K, E>>>,
    used: usize,
}

/// One connection of a pick, hashed and with its times in the table's nanoseconds.
struct Probe<K> {
    hash: u64,
    service: K,
    client: IpAddr,
    now: Nanos,
    expires: Nanos,
    random: u64,
}

/// The outcome of the locked part of a pick.
enum Locked<E> {
    /// The pick's result.
    Done(Option<AffinityPick<E>>),
    /// The connection needs an entry and the table is full; nothing was changed.
    Full,
}

/// One remembered client, stored inline in the probed array.
#[derive(Debug, Clone, Copy)]
struct Slot<K, E> {
    service: K,
    client: IpAddr,
    /// Nanoseconds since the table's origin at which the entry expires.
    expires: Nanos,
    endpoint: E,
}

impl<K, E> FlatAffinityTable<K, E>
where
    K: Copy + Hash + Eq,
    E: Copy + Eq,
{
    /// An unbounded table.
    #[must_use]
    pub fn new() -> Self {
        Self::with_hasher(DefaultHashBuilder::default(), None)
    }

    /// A table that remembers at most `max_entries` clients (`0` remembers none).
    #[must_use]
    pub fn with_max_entries(max_entries: usize) -> Self {
        Self::with_hasher(DefaultHashBuilder::default(), Some(max_entries))
    }
}

impl<K, E> Default for FlatAffinityTable<K, E>
where
    K: Copy + Hash + Eq,
    E: Copy + Eq,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<K, E, S> FlatAffinityTable<K, E, S>
where
    K: Copy + Hash + Eq,
    E: Copy + Eq,
    S: BuildHasher,
{
    /// A table hashing with `hasher`, bounded to `max_entries` clients if given.
    #[must_use]
    pub fn with_hasher(hasher: S, max_entries: Option<usize>) -> Self {
        FlatAffinityTable {
            shards: (0..SHARDS)
                .map(|_| Shard {
                    slots: Mutex::new(Slots {
                        array: Vec::new(),
                        used: 0,
                    }),
                })
                .collect(),
            hasher,
            occupancy: Occupancy::new(max_entries),
            origin: OnceLock::new(),
        }
    }

    /// The endpoint for a new connection, choosing among `eligible` on a miss; `None` only when
    /// there is no usable entry and `eligible` is empty. See
    /// [`AffinityTable::pick`](super::AffinityTable::pick).
    #[inline]
    pub fn pick(&self, conn: NewConnection<'_, K>, eligible: &[E]) -> Option<AffinityPick<E>> {
        self.pick_with(conn, |e| eligible.contains(e), eligible)
    }

    /// Like [`FlatAffinityTable::pick`], with eligibility decided by `is_eligible` and a miss
    /// choosing uniformly among `candidates`, each of which must be eligible. See
    /// [`AffinityTable::pick_with`](super::AffinityTable::pick_with).
    ///
    /// `is_eligible` runs while a shard of the table is locked: it must not call back into this
    /// table (that could deadlock).
    pub fn pick_with<F>(
        &self,
        conn: NewConnection<'_, K>,
        is_eligible: F,
        candidates: &[E],
    ) -> Option<AffinityPick<E>>
    where
        F: Fn(&E) -> bool,
    {
        debug_assert!(
            candidates.iter().all(&is_eligible),
            "every candidate must be eligible"
        );
        let now = self.nanos(conn.now);
        let probe = Probe {
            hash: self.hash(conn.service, conn.client),
            service: *conn.service,
            client: conn.client,
            now,
            expires: now.saturating_add(saturating_nanos(conn.timeout)),
            random: conn.random,
        };
        self.pick_probe(&probe, &is_eligible, candidates)
    }

    /// Picks for many new connections at once: `out` is cleared, then holds one result per
    /// connection, in order, exactly what [`FlatAffinityTable::pick`] called on each connection
    /// in turn would have returned (a later connection of a client sees the entry an earlier
    /// one in the batch made or refreshed), with `eligible` for every connection. For
    /// connections with different endpoint sets, see [`FlatAffinityTable::pick_batch_with`].
    ///
    /// # Why batches
    ///
    /// In a table far larger than the CPU caches a pick waits for one cache miss, and picks made
    /// one after another do not overlap their misses (see the [module docs](self)). A batch
    /// reads the home slots of all its connections before deciding any of them, so their
    /// misses are in flight together: this is the API for embedders that receive connections
    /// in bursts (an `epoll_wait` or `io_uring` completion batch, a packet burst).
    ///
    /// # Concurrency
    ///
    /// The batch is not atomic: other threads may pick between its connections, and then the
    /// results are those of some interleaving, each one keeping the contract. The batch locks
    /// several shards at once (always in ascending order, so batches on several threads cannot
    /// deadlock) and calls nothing outside the table while holding them, except `is_eligible`
    /// in [`FlatAffinityTable::pick_batch_with`].
    pub fn pick_batch(
        &self,
        conns: &[NewConnection<'_, K>],
        eligible: &[E],
        out: &mut Vec<Option<AffinityPick<E>>>,
    ) {
        self.pick_batch_with(conns, |_, e| eligible.contains(e), |_| eligible, out);
    }

    /// Like [`FlatAffinityTable::pick_batch`], with each connection's eligibility and
    /// candidates given by its index in `conns`: `is_eligible(i, e)` and `candidates(i)` play
    /// the roles of [`FlatAffinityTable::pick_with`]'s arguments for `conns[i]`, so one batch
    /// can serve connections to different Services.
    ///
    /// `is_eligible` runs while shards of the table are locked: it must not call back into
    /// this table (that could deadlock).
    pub fn pick_batch_with<'e, F, C>(
        &self,
        conns: &[NewConnection<'_, K>],
        is_eligible: F,
        candidates: C,
        out: &mut Vec<Option<AffinityPick<E>>>,
    ) where
        F: Fn(usize, &E) -> bool,
        C: Fn(usize) -> &'e [E],
        E: 'e,
    {
        out.clear();
        out.resize(conns.len(), None);
        let mut start = 0;
        while start < conns.len() {
            let rest = conns.len() - start;
            // Picks on different shards commute as long as every insertion finds room: only
            // a full table (the bound, its reap and overflow) makes one shard's pick depend on
            // another's. So the batch goes shard by shard in chunks that cannot fill the
            // table, and one at a time when it is full.
            let chunk = match self.occupancy.max_entries {
                None => rest,
                Some(max) => max.saturating_sub(self.len()).min(rest),
            };
            if chunk == 0 {
                let c = conns[start];
                out[start] = self.pick_with(c, |e| is_eligible(start, e), candidates(start));
                start += 1;
            } else {
                let end = start + chunk;
                self.pick_chunk(conns, start..end, &is_eligible, &candidates, out);
                start = end;
            }
        }
    }

    /// Picks `conns[range]` into `out[range]`, grouped by shard: [`GROUP`] shards are locked at
    /// once (in ascending order), the home slots of all their connections are read, then each
    /// shard's connections are picked in their batch order. A connection that finds no room
    /// (only possible when other threads insert meanwhile) and the later ones of its shard are
    /// picked one at a time afterwards, with the locks released (a reap needs every shard).
    fn pick_chunk<'e, F, C>(
        &self,
        conns: &[NewConnection<'_, K>],
        range: std::ops::Range<usize>,
        is_eligible: &F,
        candidates: &C,
        out: &mut [Option<AffinityPick<E>>],
    ) where
        F: Fn(usize, &E) -> bool,
        C: Fn(usize) -> &'e [E],
        E: 'e,
    {
        let mut probes = Vec::with_capacity(range.len());
        // (shard << 32 | index): sorted, the connections of a shard in batch order.
        let mut order = Vec::with_capacity(range.len());
        let mut last: Option<(Instant, Nanos)> = None;
        for i in range {
            let c = &conns[i];
            debug_assert!(
                candidates(i).iter().all(|e| is_eligible(i, e)),
                "every candidate must be eligible"
            );
            let now = match last {
                Some((at, nanos)) if at == c.now => nanos,
                _ => {
                    let nanos = self.nanos(c.now);
                    last = Some((c.now, nanos));
                    nanos
                }
            };
            let hash = self.hash(c.service, c.client);
            order.push((shard_of(hash) as u64) << 32 | probes.len() as u64);
            probes.push((
                i,
                Probe {
                    hash,
                    service: *c.service,
                    client: c.client,
                    now,
                    expires: now.saturating_add(saturating_nanos(c.timeout)),
                    random: c.random,
                },
            ));
        }
        order.sort_unstable();
        let mut deferred = Vec::new();
        let mut guards = Vec::with_capacity(GROUP);
        let mut at = 0;
        while at < order.len() {
            // Lock up to GROUP shards, each with its run of `order`.
            while at < order.len() && guards.len() < GROUP {
                let shard = (order[at] >> 32) as usize;
                let begin = at;
                while at < order.len() && (order[at] >> 32) as usize == shard {
                    at += 1;
                }
                guards.push((lock(&self.shards[shard]), begin..at));
            }
            // Read every home slot first: independent loads whose misses overlap.
            let mut touched = 0usize;
            for (slots, run) in &guards {
                if slots.array.is_empty() {
                    continue;
                }
                let mask = slots.array.len() - 1;
                for &o in &order[run.clone()] {
                    let probe = &probes[(o & 0xffff_ffff) as usize].1;
                    touched += usize::from(slots.array[probe.hash as usize & mask].is_some());
                }
            }
            std::hint::black_box(touched);
            for (slots, run) in &mut guards {
                for (n, &o) in order[run.clone()].iter().enumerate() {
                    let (i, probe) = &probes[(o & 0xffff_ffff) as usize];
                    let i = *i;
                    match self.pick_locked(slots, probe, &|e| is_eligible(i, e), candidates(i)) {
                        Locked::Done(pick) => out[i] = pick,
                        Locked::Full => {
                            deferred.extend(order[run.start + n..run.end].iter().copied());
                            break;
                        }
                    }
                }
            }
            guards.clear();
        }
        // Rare: each waits for room as a single pick would, in batch order.
        deferred.sort_unstable_by_key(|&o| o & 0xffff_ffff);
        for o in deferred {
            let (i, probe) = &probes[(o & 0xffff_ffff) as usize];
            let i = *i;
            out[i] = self.pick_probe(probe, &|e| is_eligible(i, e), candidates(i));
        }
    }

    /// A single pick, given its probe: the shard's part, then, if the table is full, a reap
    /// for room (with the shard released) and one more try, then an overflow.
    fn pick_probe<F>(
        &self,
        probe: &Probe<K>,
        is_eligible: &F,
        candidates: &[E],
    ) -> Option<AffinityPick<E>>
    where
        F: Fn(&E) -> bool,
    {
        let shard = &self.shards[shard_of(probe.hash)];
        for attempt in 0..2 {
            let mut slots = lock(shard);
            match self.pick_locked(&mut slots, probe, is_eligible, candidates) {
                Locked::Done(pick) => return pick,
                Locked::Full => {
                    // Release the shard before reaping, which locks every shard.
                    drop(slots);
                    if attempt == 0 {
                        self.reap_for_room(probe.now);
                    }
                }
            }
        }
        self.occupancy.overflowed();
        Some(AffinityPick {
            endpoint: *pick::uniform(candidates, probe.random)?,
            outcome: Outcome::Overflow,
        })
    }

    /// The part of a pick done under its shard's lock: a hit, an in-place replacement, an
    /// insertion, `None` (no usable entry and no candidate), or [`Locked::Full`] when an
    /// insertion found the table full (nothing was changed then).
    #[inline]
    fn pick_locked<F>(
        &self,
        slots: &mut Slots<K, E>,
        probe: &Probe<K>,
        is_eligible: &F,
        candidates: &[E],
    ) -> Locked<E>
    where
        F: Fn(&E) -> bool,
    {
        if let Some(i) = find(&slots.array, probe.hash, &probe.service, probe.client) {
            if let Some(slot) = slots.array[i].as_mut() {
                return Locked::Done(self.use_or_replace(
                    slot,
                    probe.now,
                    probe.expires,
                    probe.random,
                    is_eligible,
                    candidates,
                ));
            }
        }
        let Some(&chosen) = pick::uniform(candidates, probe.random) else {
            return Locked::Done(None);
        };
        if !self.occupancy.reserve_slot() {
            return Locked::Full;
        }
        self.insert(
            slots,
            probe.hash,
            Slot {
                service: probe.service,
                client: probe.client,
                expires: probe.expires,
                endpoint: chosen,
            },
        );
        self.occupancy.note_expiry(probe.expires);
        Locked::Done(Some(AffinityPick {
            endpoint: chosen,
            outcome: Outcome::Miss,
        }))
    }

    /// The endpoint remembered for `client` of `service` if it has not expired at `now`,
    /// without refreshing it.
    #[must_use]
    pub fn peek(&self, service: &K, client: IpAddr, now: Instant) -> Option<E> {
        let now = self.nanos(now);
        let hash = self.hash(service, client);
        let slots = lock(&self.shards[shard_of(hash)]);
        let i = find(&slots.array, hash, service, client)?;
        slots.array[i]
            .as_ref()
            .filter(|s| now < s.expires)
            .map(|s| s.endpoint)
    }

    /// Removes every entry expired at `now` and returns how many were removed.
    ///
    /// Locks each shard in turn, O(entries). Call it periodically.
    pub fn reap(&self, now: Instant) -> usize {
        self.reap_at(self.nanos(now))
    }

    /// Keeps only the entries for which `keep(service, client, endpoint)` is true and returns
    /// how many were removed.
    ///
    /// `keep` runs while a shard of the table is locked: it must not call back into this table.
    pub fn retain<F>(&self, mut keep: F) -> usize
    where
        F: FnMut(&K, IpAddr, &E) -> bool,
    {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut slots = lock(shard);
            removed += self.retain_shard(&mut slots, |s| keep(&s.service, s.client, &s.endpoint));
        }
        self.occupancy.released(removed);
        removed
    }

    /// Forgets every client sent to `endpoint`; returns how many entries were removed.
    pub fn remove_endpoint(&self, endpoint: &E) -> usize {
        self.retain(|_, _, e| e != endpoint)
    }

    /// The number of remembered clients (including expired ones not yet reaped).
    #[must_use]
    pub fn len(&self) -> usize {
        self.occupancy.len()
    }

    /// Whether no client is remembered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bound given to [`FlatAffinityTable::with_max_entries`], if any.
    #[must_use]
    pub fn max_entries(&self) -> Option<usize> {
        self.occupancy.max_entries
    }

    /// How many picks returned [`Outcome::Overflow`] since the table was created.
    #[must_use]
    pub fn overflows(&self) -> u64 {
        self.occupancy.overflows()
    }

    #[inline]
    fn hash(&self, service: &K, client: IpAddr) -> u64 {
        self.hasher.hash_one((service, client))
    }

    #[inline]
    fn use_or_replace<F>(
        &self,
        slot: &mut Slot<K, E>,
        now: Nanos,
        expires: Nanos,
        random: u64,
        is_eligible: &F,
        candidates: &[E],
    ) -> Option<AffinityPick<E>>
    where
        F: Fn(&E) -> bool,
    {
        let outcome = if now < slot.expires && is_eligible(&slot.endpoint) {
            Outcome::Hit
        } else {
            slot.endpoint = *pick::uniform(candidates, random)?;
            Outcome::Miss
        };
        let earlier = expires < slot.expires;
        slot.expires = expires;
        if earlier {
            self.occupancy.note_expiry(expires);
        }
        Some(AffinityPick {
            endpoint: slot.endpoint,
            outcome,
        })
    }

    /// Inserts a slot known to be absent, whose key hashes to `hash`, growing the shard once it
    /// is 3/4 full.
    fn insert(&self, shard: &mut Slots<K, E>, hash: u64, slot: Slot<K, E>) {
        if (shard.used + 1) * 4 > shard.array.len() * 3 {
            let size = (shard.array.len() * 2).max(MIN_SLOTS);
            let mut grown = vec![None; size];
            for s in shard.array.drain(..).flatten() {
                place(&mut grown, self.hash(&s.service, s.client), s);
            }
            shard.array = grown;
        }
        place(&mut shard.array, hash, slot);
        shard.used += 1;
    }

    /// Removes the slots `keep` rejects by rebuilding the shard (linear probing has no
    /// tombstones); returns how many were removed.
    fn retain_shard<F>(&self, shard: &mut Slots<K, E>, mut keep: F) -> usize
    where
        F: FnMut(&Slot<K, E>) -> bool,
    {
        let mut removed = 0;
        for s in shard.array.iter_mut() {
            if s.as_ref().is_some_and(|s| !keep(s)) {
                *s = None;
                removed += 1;
            }
        }
        if removed > 0 {
            shard.used -= removed;
            // Shrink while at most 1/8 full, so a table that emptied gives its memory back.
            let mut size = shard.array.len();
            while size > MIN_SLOTS && shard.used * 8 <= size {
                size /= 2;
            }
            let size = if shard.used == 0 { 0 } else { size };
            let mut rebuilt = vec![None; size];
            for s in shard.array.drain(..).flatten() {
                place(&mut rebuilt, self.hash(&s.service, s.client), s);
            }
            shard.array = rebuilt;
        }
        removed
    }

    #[inline]
    fn nanos(&self, t: Instant) -> Nanos {
        nanos_since(*self.origin.get_or_init(|| t), t)
    }

    fn reap_at(&self, now: Nanos) -> usize {
        self.occupancy.begin_reap();
        let mut floor = Nanos::MAX;
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut slots = lock(shard);
            removed += self.retain_shard(&mut slots, |s| {
                let live = now < s.expires;
                if live {
                    floor = floor.min(s.expires);
                }
                live
            });
        }
        self.occupancy.end_reap(removed, floor);
        removed
    }

    /// See `AffinityTable::reap_for_room`: the same floor invariant, the same single reaper.
    fn reap_for_room(&self, now: Nanos) {
        self.occupancy.reap_for_room(now, || {
            self.reap_at(now);
        });
    }
}

impl<K, E, S> fmt::Debug for FlatAffinityTable<K, E, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("FlatAffinityTable");
        self.occupancy.fields(&mut d);
        d.finish_non_exhaustive()
    }
}

#[inline]
fn shard_of(hash: u64) -> usize {
    (hash >> (64 - SHARD_BITS)) as usize
}

/// A shard's slots. A panic while a shard is locked cannot leave a slot half-written (slots
/// are plain `Copy` values assigned whole), so a poisoned lock is used as is.
#[inline]
fn lock<K, E>(shard: &Shard<K, E>) -> MutexGuard<'_, Slots<K, E>> {
    shard
        .slots
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The index of the slot holding `(service, client)`, probing linearly from the hash.
#[inline]
fn find<K: Eq, E>(
    slots: &[Option<Slot<K, E>>],
    hash: u64,
    service: &K,
    client: IpAddr,
) -> Option<usize> {
    if slots.is_empty() {
        return None;
    }
    let mask = slots.len() - 1;
    let mut i = hash as usize & mask;
    loop {
        match &slots[i] {
            None => return None,
            Some(s) if s.client == client && s.service == *service => return Some(i),
            Some(_) => i = (i + 1) & mask,
        }
    }
}

/// Puts `slot` in the first free slot of its probe sequence; the array must have one.
#[inline]
fn place<K, E>(slots: &mut [Option<Slot<K, E>>], hash: u64, slot: Slot<K, E>) {
    let mask = slots.len() - 1;
    let mut i = hash as usize & mask;
    while slots[i].is_some() {
        i = (i + 1) & mask;
    }
    slots[i] = Some(slot);
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn concurrent_picks_never_exceed_the_bound_and_keep_len_exact() {
        let table = Arc::new(FlatAffinityTable::<u32, u32>::with_max_entries(500));
        let t0 = Instant::now();
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let table = Arc::clone(&table);
                std::thread::spawn(move || {
                    for i in 0..5_000u32 {
                        let now = t0 + Duration::from_millis(u64::from(i));
                        let conn = NewConnection {
                            service: &1,
                            client: IpAddr::V4(Ipv4Addr::from((i * 7 + t) % 2_000)),
                            now,
                            timeout: Duration::from_secs(1),
                            random: u64::from(i),
                        };
                        table.pick(conn, &[1, 2, 3]).expect("eligible");
                        assert!(table.len() <= 500);
                        if i % 1000 == 0 {
                            table.reap(now);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("no panic");
        }
        let stored: usize = table.shards.iter().map(|s| lock(s).used).sum();
        assert_eq!(table.len(), stored);
        assert!(table.len() <= 500);
    }

    #[test]
    fn a_table_that_emptied_gives_its_slots_back() {
        let table = FlatAffinityTable::<u32, u32>::new();
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let conn = NewConnection {
                service: &1,
                client: IpAddr::V4(Ipv4Addr::from(i)),
                now: t0,
                timeout: Duration::from_secs(1),
                random: u64::from(i),
            };
            table.pick(conn, &[1, 2, 3]).expect("eligible");
        }
        let slots = |t: &FlatAffinityTable<u32, u32>| -> usize {
            t.shards.iter().map(|s| lock(s).array.len()).sum()
        };
        assert!(slots(&table) >= 10_000 * 4 / 3);
        assert_eq!(table.reap(t0 + Duration::from_secs(1)), 10_000);
        assert_eq!(slots(&table), 0);
    }
}
