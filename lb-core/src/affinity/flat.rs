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
//! A second lock-free variant (a seqlocked mirror of each shard in atomic words, keys and
//! endpoints as keyed 64-bit fingerprints, a per-thread handle caching the arrays, the refresh
//! one tagged word) served single hits in 246–281 ns against 330–364 ns locked, alternating in
//! one run; but the mirror doubled the table's memory, and a locked or batched hit then read
//! two cache lines instead of one (locked 436–481 ns; batches of 256 190–221 ns instead of
//! 111–131), so it was dropped too. Two things it showed: a hit must be short for the CPU to
//! overlap consecutive hits' misses at all (the reorder buffer and schedulers hold a couple of
//! hundred instructions, and every instruction waiting on the miss holds a place), and it must
//! never reload, through a wider or narrower access, a value stored a moment before: a failed
//! store-to-load forwarding waits for the store to retire, hence for the outstanding miss.
//! Hashing an `IpAddr` read through a pointer, and comparing a copied array through one 16-byte
//! load, each serialised that variant's hits completely.
//!
//! Stand-alone loops on the same VM (2026-12-01; 1M keys in 2^21 64-byte slots, 2 threads,
//! uniformly random hits, the slowest thread of three runs or more each) bound what a redesign
//! could reach. The same binary's figure drifts up to 2× within minutes here, so the second
//! set ran every variant in turn, three rounds, beside this table:
//! - a locked hit (16 shard mutexes, plain slots, with the eligibility scan) costs 285–378 ns,
//!   and 237–290 ns with the home slot prefetched before the lock: the lock's
//!   read-modify-writes chain one hit to the next. This table, beside the variants below:
//!   362–435 ns;
//! - a lock-free hit (all-atomic slots read under the slot's version, the eligibility check
//!   through an index hint stored in the slot, the refresh by a 64-bit compare-and-swap in the
//!   slot) costs 186–247 ns as the API is: an `Instant` per connection, this table's keyed
//!   hash. The compare-and-swap was timed on another word of the slot, the same instruction on
//!   the same cache line as one on the version; the two plain stores a real refresh adds (the
//!   expiry, the version) were not timed;
//! - the same with the time given as integer nanoseconds: 131–145 ns; and with an unkeyed
//!   multiply for the hash as well: 93–116 ns;
//! - what each part costs, from those pairs: converting the `Instant` about 90 ns, the keyed
//!   hash about 25 ns, the index-hint check and a 64-bit compare-and-swap nothing measurable,
//!   a 128-bit compare-and-swap (`cmpxchg16b`) 35–75 ns, a scan of 10 endpoints instead of the
//!   hint 80–100 ns (its exit depends on the slot, and a mispredicted branch after the miss
//!   discards the next hits' work).
//!
//! A hit's cost follows its instruction count, about a nanosecond per instruction: consecutive
//! hits overlap only as far as the CPU's window (a couple of hundred instructions) reaches past
//! a 150–250 ns miss, and every instruction waiting on the slot holds its place. Converting an
//! `Instant` is about 60 instructions in std that are not inlined
//! (`Instant::checked_duration_since`, `Timespec::sub_timespec`).
//!
//! So with the API as it is (an `Instant` per connection, a keyed hash since clients choose
//! their addresses), no one-at-a-time design reaches 100 ns on this VM. A lock-free one would
//! halve the cost, at the price of all-atomic slots (keys and endpoints restricted to types
//! packed into words, growth without freeing arrays a reader may hold); it reaches 100 ns only
//! with an integer clock and an unkeyed hash, and then only on a quiet VM. Batches overlap the
//! misses of many hits and reach it on a quiet VM.
//!
//! # Batches
//!
//! So one-at-a-time picks cannot get much below one uncached read each. Embedders that see
//! connections in bursts (an `epoll_wait` or `io_uring` completion batch, a packet burst) can
//! call [`FlatAffinityTable::pick_batch`], which gives exactly the answers of single picks in
//! turn but overlaps their misses: it hashes every connection, groups them by shard (a
//! counting sort), locks the shards of about 16 connections at once (`try_lock`, a busy
//! shard is left for a later group, so it never waits while holding a lock), reads each
//! connection's home slot and the one after it (independent loads, whose misses the CPU
//! keeps in flight together), then picks each shard's connections in batch order. Picks on
//! different shards commute unless an insertion finds the table full, so a bounded table is
//! batched only in chunks that cannot fill it, and one connection at a time when it is full.
//! Each lock a batch takes after the other core is a cache-line transfer between the cores,
//! so the table has 16 shards rather than 64 (see `SHARD_BITS`).
//!
//! `lb-scale --affinity`, same shape as above, three runs: batches of 256 cost 85, 121 and
//! 87 ns per hit (single hits 358, 422, 332 ns; a dependent read 247–271 ns, an independent
//! one 21–31 ns); quiet runs gave 76–83 ns, runs beside other builds up to 110 ns of CPU
//! (their memory traffic slows every read). Batches of 32 cost 132–137 ns: each takes about
//! 14 of the 16 locks, and each lock taken after the other core is a cache-line transfer. The
//! single pick costs what it did (the same figures with 16 or 64 shards). With one thread and
//! the entries cached, a batched hit is about 40 ns of CPU work (hash, group, probe,
//! eligibility scan, expiry store, result); the rest is two independent reads (the home slot
//! and the next) and the lock transfers. On transparent huge pages (the same command prints
//! it last, from a child process) batches of 256 cost 76–91 ns.
//!
//! # Layout
//!
//! 16 shards, chosen by the top bits of the hash, each a [`Mutex`] around a power-of-two
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
use std::time::{Duration, Instant};

use super::{
    AffinityPick, DefaultHashBuilder, Nanos, NewConnection, Occupancy, Outcome, nanos_since,
    saturating_nanos,
};
use crate::pick;

/// Shards: a power of two above the thread count of a proxy, so threads rarely meet on a lock,
/// and few, because a batch ([`FlatAffinityTable::pick_batch`]) locks every shard it touches
/// and each lock taken after another core's is a cache-line transfer between cores: with 64
/// shards a batch of 256 hits cost 105–110 ns per hit, with 16 shards 88–91 ns (same run
/// conditions, `lb-scale --affinity`); single picks measured the same with either.
const SHARD_BITS: u32 = 4;
const SHARDS: usize = 1 << SHARD_BITS;
// A batch keeps the shards it has still to visit as bits of a `u64`.
const _: () = assert!(SHARDS <= 64);
/// Slots of a shard before its first insertion grows it.
const MIN_SLOTS: usize = 8;
/// Connections a batch groups by shard at most at once (indexes are `u32`).
const MAX_CHUNK: usize = u32::MAX as usize;
/// Connections a batch reads the home slots of before picking them, with their shards locked:
/// enough to keep many cache misses in flight (the CPU tracks a few dozen), few enough that
/// another thread rarely waits for the locks. Measured (`lb-scale --affinity`, alternating):
/// batches of 256 cost about the same with 16 or 32 (80–83 ns per hit) and more with 64
/// (86–111 ns); batches of 32 cost least with 16 (112–130 ns, against 128–150 with 32).
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
    /// connection, in order: exactly what [`FlatAffinityTable::pick`] called on each connection
    /// in turn would have returned, with `eligible` for every connection. A later connection
    /// of a client sees the entry an earlier one in the batch made or refreshed; a bounded
    /// table fills, reaps and overflows at the same connection as with single picks. For
    /// connections with different endpoint sets, see [`FlatAffinityTable::pick_batch_with`].
    ///
    /// # Why batches
    ///
    /// In a table far larger than the CPU caches a pick waits for one cache miss, and picks made
    /// one after another do not overlap their misses (measured in the module docs of
    /// `lb-core/src/affinity/flat.rs`). A batch reads the slots where its connections' entries
    /// lie before deciding any of them, so their misses are in flight together: this is the
    /// API for embedders that receive connections in bursts (an `epoll_wait` or `io_uring`
    /// completion batch, a packet burst).
    ///
    /// ```
    /// use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    /// use std::time::{Duration, Instant};
    /// use lb_core::affinity::{FlatAffinityTable, NewConnection, Outcome};
    ///
    /// let table: FlatAffinityTable<u32, SocketAddr> = FlatAffinityTable::new();
    /// let endpoints: Vec<SocketAddr> = vec!["10.0.0.1:80".parse()?, "10.0.0.2:80".parse()?];
    /// let now = Instant::now();
    /// // A burst of three connections, the first and the last from one client.
    /// let conns: Vec<_> = [7, 8, 7]
    ///     .into_iter()
    ///     .zip([0, 1, u64::MAX])
    ///     .map(|(host, random)| NewConnection {
    ///         service: &1,
    ///         client: IpAddr::V4(Ipv4Addr::new(192, 0, 2, host)),
    ///         now,
    ///         timeout: Duration::from_secs(10_800),
    ///         random,
    ///     })
    ///     .collect();
    /// let mut picks = Vec::new();
    /// table.pick_batch(&conns, &endpoints, &mut picks);
    /// let picks: Vec<_> = picks.into_iter().flatten().map(|p| (p.endpoint, p.outcome)).collect();
    /// assert_eq!(picks[0], (endpoints[0], Outcome::Miss));
    /// assert_eq!(picks[2], (endpoints[0], Outcome::Hit));
    /// # Ok::<(), std::net::AddrParseError>(())
    /// ```
    ///
    /// # Concurrency
    ///
    /// "Exactly" holds when no other thread changes the table during the batch. The batch is
    /// not atomic: other threads may pick between its connections, and then each result
    /// keeps the contract (never an expired or ineligible endpoint, the bound never exceeded)
    /// as concurrent single picks do. The batch holds several shards' locks at once, but waits
    /// for a lock only while it holds none (so batches on several threads cannot deadlock),
    /// and calls nothing outside the table while holding them, except `is_eligible` in
    /// [`FlatAffinityTable::pick_batch_with`].
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
        debug_assert!(
            (0..conns.len()).all(|i| candidates(i).iter().all(|e| is_eligible(i, e))),
            "every candidate must be eligible"
        );
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
            }
            .min(MAX_CHUNK);
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

    /// Picks `conns[range]` into `out[range]`, grouped by shard: free shards holding about
    /// [`GROUP`] connections are locked at once, the home slots of all their connections are
    /// read, then each shard's connections are picked in their batch order. A connection that
    /// finds no room (only possible when other threads insert meanwhile) and the later ones of
    /// its shard are picked one at a time afterwards, with the locks released (a reap needs
    /// every shard).
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
        let first = range.start;
        let mut probes = Vec::with_capacity(range.len());
        // Connections per shard, then (prefix sums) where each shard's run starts in `order`.
        let mut starts = [0u32; SHARDS + 1];
        // The times of the previous connection, reused while they repeat (a burst's usual
        // case: one `now` and one timeout).
        let mut last: Option<(Instant, Duration, Nanos, Nanos)> = None;
        for c in &conns[range] {
            let (now, expires) = match last {
                Some((at, timeout, now, expires)) if at == c.now && timeout == c.timeout => {
                    (now, expires)
                }
                _ => {
                    let now = self.nanos(c.now);
                    let expires = now.saturating_add(saturating_nanos(c.timeout));
                    last = Some((c.now, c.timeout, now, expires));
                    (now, expires)
                }
            };
            let hash = self.hash(c.service, c.client);
            starts[shard_of(hash) + 1] += 1;
            probes.push(Probe {
                hash,
                service: *c.service,
                client: c.client,
                now,
                expires,
                random: c.random,
            });
        }
        for s in 1..=SHARDS {
            starts[s] += starts[s - 1];
        }
        // Probe indexes grouped by shard, each shard's in batch order (a counting sort).
        let mut order = vec![0u32; probes.len()];
        let mut next = starts;
        for (n, probe) in probes.iter().enumerate() {
            let shard = shard_of(probe.hash);
            order[next[shard] as usize] = n as u32;
            next[shard] += 1;
        }
        let run = |shard: usize| starts[shard] as usize..starts[shard + 1] as usize;
        // The shards with connections still to pick, one bit each.
        let mut pending = (0..SHARDS)
            .filter(|&s| starts[s] < starts[s + 1])
            .fold(0u64, |bits, s| bits | 1 << s);
        let mut deferred = Vec::new();
        let mut guards = Vec::new();
        while pending != 0 {
            // Lock pending shards that are free until they hold GROUP connections; a busy one
            // is left for a later group. Waiting only while holding no lock cannot deadlock.
            let mut grouped = 0;
            let mut bits = pending;
            while bits != 0 && grouped < GROUP {
                let shard = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if let Some(slots) = try_lock(&self.shards[shard]) {
                    pending &= !(1 << shard);
                    grouped += run(shard).len();
                    guards.push((slots, run(shard)));
                }
            }
            if guards.is_empty() {
                let shard = pending.trailing_zeros() as usize;
                pending &= !(1 << shard);
                guards.push((lock(&self.shards[shard]), run(shard)));
            }
            // Read every home slot and the one after it first: independent loads whose misses
            // overlap. (At the table's load a key is often one slot past its home; reading
            // that slot too measured 94–108 instead of 111–125 ns per hit, one thread.)
            let mut touched = 0usize;
            for (slots, run) in &guards {
                if slots.array.is_empty() {
                    continue;
                }
                let mask = slots.array.len() - 1;
                for &n in &order[run.clone()] {
                    let home = probes[n as usize].hash as usize & mask;
                    touched += usize::from(slots.array[home].is_some());
                    touched += usize::from(slots.array[(home + 1) & mask].is_some());
                }
            }
            std::hint::black_box(touched);
            for (slots, run) in &mut guards {
                for (k, &n) in order[run.clone()].iter().enumerate() {
                    let i = first + n as usize;
                    let probe = &probes[n as usize];
                    match self.pick_locked(slots, probe, &|e| is_eligible(i, e), candidates(i)) {
                        Locked::Done(pick) => out[i] = pick,
                        Locked::Full => {
                            deferred.extend_from_slice(&order[run.start + k..run.end]);
                            break;
                        }
                    }
                }
            }
            guards.clear();
        }
        // Rare: each waits for room as a single pick would, in batch order.
        deferred.sort_unstable();
        for n in deferred {
            let i = first + n as usize;
            let probe = &probes[n as usize];
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

    /// The hash of a key. The address is hashed as one `u128` (an IPv4 one mapped into IPv6
    /// space): one hasher step instead of `IpAddr`'s four (variant, length, bytes); the
    /// mapping's collisions only cost a probe, slots compare the real address.
    #[inline]
    fn hash(&self, service: &K, client: IpAddr) -> u64 {
        let client = match client {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        self.hasher.hash_one((service, client.to_bits()))
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

/// A shard's slots if no other thread holds them (poisoning as in [`lock`]).
#[inline]
fn try_lock<K, E>(shard: &Shard<K, E>) -> Option<MutexGuard<'_, Slots<K, E>>> {
    match shard.slots.try_lock() {
        Ok(slots) => Some(slots),
        Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
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

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn conn(client: u32, now: Instant, random: u64) -> NewConnection<'static, u32> {
        NewConnection {
            service: &1,
            client: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + client)),
            now,
            timeout: TIMEOUT,
            random,
        }
    }

    /// A random stream for the picks' `random` argument.
    fn randoms(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed | 1;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    type Results = Vec<Option<(u32, Outcome)>>;

    /// Picks `conns` one at a time on `single` and as one batch on `batched` (tables in the
    /// same state), requires the same results, counts and remembered endpoints, and returns
    /// the results.
    fn batch_matches_single_picks(
        single: &FlatAffinityTable<u32, u32>,
        batched: &FlatAffinityTable<u32, u32>,
        conns: &[NewConnection<'_, u32>],
        eligible: &[u32],
    ) -> Results {
        let one_by_one: Results = conns
            .iter()
            .map(|&c| single.pick(c, eligible).map(|p| (p.endpoint, p.outcome)))
            .collect();
        let mut out = vec![None; 3]; // stale contents are cleared
        batched.pick_batch(conns, eligible, &mut out);
        let out: Results = out
            .into_iter()
            .map(|p| p.map(|p| (p.endpoint, p.outcome)))
            .collect();
        assert_eq!(out, one_by_one);
        assert_eq!(batched.len(), single.len());
        assert_eq!(batched.overflows(), single.overflows());
        for c in conns {
            assert_eq!(
                batched.peek(c.service, c.client, c.now),
                single.peek(c.service, c.client, c.now)
            );
        }
        out
    }

    fn outcomes(results: &Results) -> [usize; 3] {
        let mut counts = [0; 3];
        for (_, outcome) in results.iter().flatten() {
            counts[*outcome as usize] += 1;
        }
        counts
    }

    #[test]
    fn a_batch_gives_the_picks_of_single_picks_in_turn() {
        let (single, batched) = (FlatAffinityTable::new(), FlatAffinityTable::new());
        let t0 = Instant::now();
        let mut random = randoms(7);
        let eps = [1, 2, 3, 4, 5];
        // 300 clients remembered, then a batch of 1,000 connections from 600 clients: hits,
        // misses, and many clients twice or more within the batch, over every shard.
        let first: Vec<_> = (0..300).map(|c| conn(c, t0, random())).collect();
        batch_matches_single_picks(&single, &batched, &first, &eps);
        let later = t0 + Duration::from_secs(1);
        let conns: Vec<_> = (0..1_000u32)
            .map(|_| {
                let r = random();
                conn((r >> 40) as u32 % 600, later, r)
            })
            .collect();
        let results = batch_matches_single_picks(&single, &batched, &conns, &eps);
        let [hits, misses, overflows] = outcomes(&results);
        assert!(
            hits > 500 && misses > 100 && overflows == 0,
            "{hits} {misses}"
        );
        assert_eq!(single.len(), 300 + misses);
    }

    #[test]
    fn a_later_connection_in_a_batch_sees_the_entry_an_earlier_one_made() {
        let (single, batched) = (FlatAffinityTable::new(), FlatAffinityTable::new());
        let t0 = Instant::now();
        let conns = [conn(1, t0, 0), conn(2, t0, u64::MAX), conn(1, t0, u64::MAX)];
        let results = batch_matches_single_picks(&single, &batched, &conns, &[1, 2]);
        assert_eq!(
            results,
            [
                Some((1, Outcome::Miss)),
                Some((2, Outcome::Miss)),
                Some((1, Outcome::Hit))
            ]
        );
    }

    #[test]
    fn a_batch_replaces_expired_entries_and_ineligible_endpoints_as_single_picks_do() {
        let (single, batched) = (FlatAffinityTable::new(), FlatAffinityTable::new());
        let t0 = Instant::now();
        let mut random = randoms(11);
        let early: Vec<_> = (0..100).map(|c| conn(c, t0, random())).collect();
        batch_matches_single_picks(&single, &batched, &early, &[1, 2, 3]);
        let late: Vec<_> = (100..200)
            .map(|c| conn(c, t0 + TIMEOUT / 2, random()))
            .collect();
        batch_matches_single_picks(&single, &batched, &late, &[1, 2, 3]);
        // At t0 + TIMEOUT the first 100 have expired; endpoint 3 no longer serves.
        let now = t0 + TIMEOUT;
        let conns: Vec<_> = (0..200).map(|c| conn(c, now, random())).collect();
        let results = batch_matches_single_picks(&single, &batched, &conns, &[1, 2]);
        for (c, result) in (0..200).zip(&results) {
            let (endpoint, outcome) = result.expect("eligible endpoints");
            assert!(endpoint != 3);
            if c < 100 {
                assert_eq!(outcome, Outcome::Miss, "client {c} expired");
            }
        }
        let [hits, misses, _] = outcomes(&results);
        assert!(hits > 30 && misses > 130, "{hits} {misses}");
        assert_eq!(single.len(), 200);
        // No eligible endpoint: `None` for every connection, entries kept.
        let results = batch_matches_single_picks(&single, &batched, &conns[..10], &[]);
        assert_eq!(results, vec![None; 10]);
    }

    #[test]
    fn a_bounded_table_fills_reaps_and_overflows_in_a_batch_where_single_picks_do() {
        let single = FlatAffinityTable::with_max_entries(50);
        let batched = FlatAffinityTable::with_max_entries(50);
        let t0 = Instant::now();
        let mut random = randoms(3);
        // 30 entries that expire at t0 + TIMEOUT, then 30 more clients at TIMEOUT / 2: the
        // batch fills the table at its 21st connection and overflows after that.
        let early: Vec<_> = (0..30).map(|c| conn(c, t0, random())).collect();
        batch_matches_single_picks(&single, &batched, &early, &[1, 2, 3]);
        let half = t0 + TIMEOUT / 2;
        let conns: Vec<_> = (100..130).map(|c| conn(c, half, random())).collect();
        let results = batch_matches_single_picks(&single, &batched, &conns, &[1, 2, 3]);
        assert_eq!(outcomes(&results), [0, 20, 10]);
        // At t0 + TIMEOUT, a batch of new clients, remembered ones and repeats: the first
        // miss on the full table reaps the 30 expired entries, and the batch goes on.
        let now = t0 + TIMEOUT;
        let conns: Vec<_> = (0..120u32)
            .map(|_| {
                let r = random();
                conn(100 + (r >> 40) as u32 % 80, now, r)
            })
            .collect();
        let results = batch_matches_single_picks(&single, &batched, &conns, &[1, 2, 3]);
        let [hits, misses, overflows] = outcomes(&results);
        assert!(
            hits > 0 && misses > 0 && overflows > 0,
            "{hits} {misses} {overflows}"
        );
        assert_eq!(single.len(), 50);
        // A table bounded to nothing overflows every connection.
        let (single, batched) = (
            FlatAffinityTable::with_max_entries(0),
            FlatAffinityTable::with_max_entries(0),
        );
        let results = batch_matches_single_picks(&single, &batched, &conns[..5], &[1]);
        assert_eq!(outcomes(&results), [0, 0, 5]);
    }

    #[test]
    fn pick_batch_with_serves_each_connection_from_its_own_endpoints() {
        let table = FlatAffinityTable::<u32, u32>::new();
        let t0 = Instant::now();
        let (web, db) = (1, 2);
        let web_eps = [10, 11];
        let db_eps = [20, 21, 22];
        let client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let conns = [
            NewConnection {
                service: &web,
                ..conn(0, t0, 0)
            },
            NewConnection {
                service: &db,
                ..conn(0, t0, u64::MAX)
            },
            NewConnection {
                service: &web,
                client,
                ..conn(0, t0, u64::MAX)
            },
        ];
        let endpoints = |i: usize| -> &[u32] {
            if *conns[i].service == web {
                &web_eps
            } else {
                &db_eps
            }
        };
        let mut out = Vec::new();
        table.pick_batch_with(&conns, |i, e| endpoints(i).contains(e), endpoints, &mut out);
        let got: Vec<_> = out
            .iter()
            .flatten()
            .map(|p| (p.endpoint, p.outcome))
            .collect();
        assert_eq!(
            got,
            [
                (10, Outcome::Miss),
                (22, Outcome::Miss),
                (11, Outcome::Miss)
            ]
        );
        // Again a second later: every one hits, whatever its random number.
        let again: Vec<_> = conns
            .iter()
            .map(|c| NewConnection {
                now: t0 + Duration::from_secs(1),
                random: 0,
                ..*c
            })
            .collect();
        table.pick_batch_with(&again, |i, e| endpoints(i).contains(e), endpoints, &mut out);
        let got: Vec<_> = out
            .iter()
            .flatten()
            .map(|p| (p.endpoint, p.outcome))
            .collect();
        assert_eq!(
            got,
            [(10, Outcome::Hit), (22, Outcome::Hit), (11, Outcome::Hit)]
        );
    }

    #[test]
    fn concurrent_batches_never_exceed_the_bound_and_keep_len_exact() {
        on_four_threads_bounded_to_500(|table, t, t0| {
            let mut out = Vec::new();
            for i in 0..500u32 {
                let now = t0 + Duration::from_millis(u64::from(i) * 10);
                let conns: Vec<_> = (0..16)
                    .map(|k| {
                        let c = (i * 16 + k) * 7 + t;
                        NewConnection {
                            timeout: Duration::from_secs(1),
                            ..conn(c % 2_000, now, u64::from(c))
                        }
                    })
                    .collect();
                table.pick_batch(&conns, &[1, 2, 3], &mut out);
                assert!(out.iter().all(Option::is_some));
                assert!(table.len() <= 500);
                if i % 100 == 0 {
                    table.reap(now);
                }
            }
        });
    }

    #[test]
    fn concurrent_picks_never_exceed_the_bound_and_keep_len_exact() {
        on_four_threads_bounded_to_500(|table, t, t0| {
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
        });
    }

    /// Runs `work(table, t, t0)` on threads `t` = 0..4 sharing one table bounded to 500
    /// entries, then checks that the count matches the slots in use and kept the bound.
    fn on_four_threads_bounded_to_500(
        work: impl Fn(&FlatAffinityTable<u32, u32>, u32, Instant) + Send + Sync + 'static,
    ) {
        let table = Arc::new(FlatAffinityTable::<u32, u32>::with_max_entries(500));
        let work = Arc::new(work);
        let t0 = Instant::now();
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let (table, work) = (Arc::clone(&table), Arc::clone(&work));
                std::thread::spawn(move || work(&table, t, t0))
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
