//! ClientIP session affinity: a concurrent table remembering which endpoint each client was
//! sent to, for embedders that pick endpoints themselves.
//!
//! # The Kubernetes rule
//!
//! With `spec.sessionAffinity: ClientIP`, every new connection from one client IP to one
//! Service port goes to the same endpoint for as long as the client keeps opening connections:
//! the memory of a client expires `timeoutSeconds` (default 10800) after its **most recent new
//! connection**. Kube-proxy implements this with `-m recent --rcheck --seconds T` / `--set` in
//! iptables mode and with per-endpoint address sets with `update @set { ip saddr timeout T }`
//! in nftables mode; both refresh the timer on each new connection and both forget a client
//! whose endpoint is no longer serving. [`AffinityTable::pick`] gives the same answers.
//!
//! # The contract
//!
//! A pick never returns an endpoint that is expired or not eligible. On a **hit** (a remembered,
//! unexpired, still-eligible endpoint) it returns that endpoint and restarts its timer. On a
//! **miss** it chooses uniformly among the eligible endpoints with the caller's random `u64`
//! (see [`crate::pick`]) and remembers the choice, replacing any stale entry in place.
//!
//! Time and randomness are arguments, so the table is a deterministic function of the calls
//! made on it; it reads no clock. Expired entries are only removed by [`AffinityTable::reap`]
//! (call it periodically, for example once a second) or replaced when their client returns.
//!
//! # Bounded tables
//!
//! [`AffinityTable::with_max_entries`] caps the number of remembered clients, so a flood of
//! source addresses cannot exhaust memory. When a miss finds the table full it reaps expired
//! entries first; if the table is still full the client gets a fresh uniform pick that is not
//! remembered ([`Outcome::Overflow`], counted by [`AffinityTable::overflows`]). Affinity then
//! degrades to per-connection balancing for the clients that did not fit, never to an error.
//! The table only scans for expired entries when one can exist: it keeps a lower bound of all
//! entries' expiry times, so a table full of live entries costs a comparison per overflow, not
//! a scan.
//!
//! # Cost
//!
//! A hit hashes the key once, takes one shard's write lock, and clones the endpoint; it does
//! not allocate (the service key is looked up by reference, not cloned). Use a cheap-to-clone
//! endpoint type (`SocketAddr`, an index, an `Arc`) and a cheap-to-compare service key. When
//! the client's entry is in the CPU caches (clients that reconnect often) a hit takes well
//! under 100 ns. In a table far larger than the caches, hit by uniformly random clients, it is
//! bound by memory latency instead: two dependent cache misses (the hash table's control bytes,
//! then the entry), a few hundred nanoseconds on a small VM. A miss additionally clones the
//! service key when it inserts. `benches/benches/lb_core.rs` measures both cases.
//!
//! # Two tables, one contract
//!
//! [`AffinityTable`] (above) takes any hashable service key and any cloneable endpoint.
//! [`FlatAffinityTable`] takes `Copy` ones (a Service id, a `SocketAddr`) and stores the whole
//! entry in an open-addressing slot, so a cold hit is about one cache miss instead of two and
//! no read-write lock: prefer it when your keys allow. Both give the same answers to the same
//! calls (one model-based property test runs against both). [`FlatAffinityTable::pick_batch`]
//! picks for a burst of connections at once, with the answers of single picks in turn, and
//! overlaps their cache misses: about 85–90 ns per hit in batches of 256 where a single cold
//! hit costs about 350 ns (1M clients, 2 threads, `lb-scale --affinity`).

use std::borrow::Borrow;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::pick;

mod flat;

pub use flat::FlatAffinityTable;

/// The hasher an [`AffinityTable`] uses unless told otherwise: foldhash's "quality" variant.
///
/// Why foldhash: it is the default hasher of `hashbrown` (Rust's `HashMap` implementation),
/// small, dependency-free and maintained; on short keys such as an IP address it is several
/// times faster than std's SipHash. Why the "quality" variant: the key is partly chosen by
/// clients (their source address), and dashmap picks the shard from bits just below the top
/// of the hash, so we pay one extra multiply for a full avalanche. Each table gets its own
/// random seed, which affects only memory layout, never which endpoint is chosen; pass a fixed
/// hasher to [`AffinityTable::with_hasher`] if you need reproducible iteration order.
pub type DefaultHashBuilder = foldhash::quality::RandomState;

/// One new connection, as seen by [`AffinityTable::pick`]: who connects to what, when, for how
/// long the choice should be remembered, and the random number to use if a choice is needed.
#[derive(Debug, Clone, Copy)]
pub struct NewConnection<'a, K> {
    /// The Service port (or any key the caller groups affinity by).
    pub service: &'a K,
    /// The client's source address.
    pub client: IpAddr,
    /// The time of the connection, from the caller's monotonic clock.
    pub now: Instant,
    /// The Service's affinity timeout (`sessionAffinityConfig.clientIP.timeoutSeconds`).
    pub timeout: Duration,
    /// A uniformly random `u64`, used only if a new endpoint has to be chosen.
    pub random: u64,
}

/// How a pick was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The client's remembered endpoint was unexpired and eligible; its timer restarted.
    Hit,
    /// There was no usable entry (none, expired, or its endpoint no longer eligible): an
    /// endpoint was chosen uniformly and remembered.
    Miss,
    /// There was no usable entry and the table was full even after reaping: an endpoint was
    /// chosen uniformly and **not** remembered.
    Overflow,
}

/// The endpoint for a new connection and how it was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffinityPick<E> {
    /// The endpoint to send the connection to.
    pub endpoint: E,
    /// Whether it was remembered, newly chosen, or chosen without being remembered.
    pub outcome: Outcome,
}

/// A concurrent ClientIP affinity table: (service key, client IP) → endpoint and its timer.
///
/// `K` identifies a Service port; `E` an endpoint. All methods take `&self` and may be called
/// from many threads at once; the table is sharded (`dashmap`), so threads contend only when
/// their keys share a shard.
///
/// ```
/// use std::net::{IpAddr, Ipv4Addr, SocketAddr};
/// use std::time::{Duration, Instant};
/// use lb_core::affinity::{AffinityTable, NewConnection, Outcome};
///
/// let table: AffinityTable<&str, SocketAddr> = AffinityTable::new();
/// let endpoints: Vec<SocketAddr> = vec!["10.0.0.1:80".parse()?, "10.0.0.2:80".parse()?];
/// let t0 = Instant::now(); // any instant: the table only compares the ones it is given
/// let conn = NewConnection {
///     service: &"default/web:http",
///     client: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
///     now: t0,
///     timeout: Duration::from_secs(10_800),
///     random: 0x9e37_79b9_7f4a_7c15,
/// };
///
/// let first = table.pick(conn, &endpoints).expect("there are endpoints");
/// assert_eq!(first.outcome, Outcome::Miss);
///
/// // An hour later, whatever the random number, the client sticks to its endpoint.
/// let later = NewConnection { now: t0 + Duration::from_secs(3600), random: 1, ..conn };
/// let again = table.pick(later, &endpoints).expect("there are endpoints");
/// assert_eq!((again.endpoint, again.outcome), (first.endpoint, Outcome::Hit));
/// assert_eq!(table.len(), 1);
///
/// // Three hours after the last new connection, the entry has expired.
/// assert_eq!(table.reap(t0 + Duration::from_secs(3600 + 10_800)), 1);
/// assert!(table.is_empty());
/// # Ok::<(), std::net::AddrParseError>(())
/// ```
pub struct AffinityTable<K, E, S = DefaultHashBuilder> {
    map: DashMap<AffinityKey<K>, Remembered<E>, S>,
    /// The entry count against the bound, overflows, and the expiry floor.
    occupancy: Occupancy,
    /// The instant that times are measured from: the first one the table was given.
    origin: OnceLock<Instant>,
}

impl<K, E> AffinityTable<K, E>
where
    K: Hash + Eq + Clone,
    E: Clone + Eq,
{
    /// An unbounded table.
    #[must_use]
    pub fn new() -> Self {
        Self::with_hasher(DefaultHashBuilder::default(), None)
    }

    /// A table that remembers at most `max_entries` clients (`0` remembers none). See the
    /// [module docs](self) for what happens when it is full.
    #[must_use]
    pub fn with_max_entries(max_entries: usize) -> Self {
        Self::with_hasher(DefaultHashBuilder::default(), Some(max_entries))
    }
}

impl<K, E> Default for AffinityTable<K, E>
where
    K: Hash + Eq + Clone,
    E: Clone + Eq,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<K, E, S> AffinityTable<K, E, S>
where
    K: Hash + Eq + Clone,
    E: Clone + Eq,
    S: BuildHasher + Clone,
{
    /// A table hashing with `hasher`, bounded to `max_entries` clients if given.
    #[must_use]
    pub fn with_hasher(hasher: S, max_entries: Option<usize>) -> Self {
        AffinityTable {
            map: DashMap::with_hasher(hasher),
            occupancy: Occupancy::new(max_entries),
            origin: OnceLock::new(),
        }
    }

    /// The endpoint for a new connection, choosing among `eligible` on a miss; `None` only when
    /// there is no usable entry and `eligible` is empty.
    ///
    /// A remembered endpoint is used only if it is still in `eligible`. The check is a linear
    /// scan, which is the fastest choice for the endpoint counts of typical Services; with
    /// hundreds of endpoints, use [`AffinityTable::pick_with`] and a set lookup.
    #[inline]
    pub fn pick(&self, conn: NewConnection<'_, K>, eligible: &[E]) -> Option<AffinityPick<E>> {
        self.pick_with(conn, |e| eligible.contains(e), eligible)
    }

    /// Like [`AffinityTable::pick`], with eligibility decided by `is_eligible`, and a miss
    /// choosing uniformly among `candidates`.
    ///
    /// Every element of `candidates` must satisfy `is_eligible` (checked in debug builds); the
    /// result then always does. Returns `None` only when there is no usable entry and
    /// `candidates` is empty; an unusable entry is then left for [`AffinityTable::reap`] or
    /// the next pick.
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
        let expires = now.saturating_add(saturating_nanos(conn.timeout));
        let view = (conn.service, conn.client);
        if let Some(mut remembered) = self.map.get_mut(&view as &dyn KeyView<K>) {
            return self.use_or_replace(
                &mut remembered,
                now,
                expires,
                &conn,
                &is_eligible,
                candidates,
            );
        }

        let chosen = pick::uniform(candidates, conn.random)?;
        let mut key = AffinityKey {
            service: conn.service.clone(),
            client: conn.client,
        };
        for attempt in 0..2 {
            match self.map.entry(key) {
                Entry::Occupied(mut occupied) => {
                    // Another thread remembered this client since our lookup.
                    return self.use_or_replace(
                        occupied.get_mut(),
                        now,
                        expires,
                        &conn,
                        &is_eligible,
                        candidates,
                    );
                }
                Entry::Vacant(vacant) => {
                    if self.occupancy.reserve_slot() {
                        vacant.insert(Remembered {
                            endpoint: chosen.clone(),
                            expires,
                        });
                        self.occupancy.note_expiry(expires);
                        return Some(AffinityPick {
                            endpoint: chosen.clone(),
                            outcome: Outcome::Miss,
                        });
                    }
                    // Release the shard lock before reaping, which locks every shard.
                    key = vacant.into_key();
                    if attempt == 0 {
                        self.reap_for_room(now);
                    }
                }
            }
        }
        self.occupancy.overflowed();
        Some(AffinityPick {
            endpoint: chosen.clone(),
            outcome: Outcome::Overflow,
        })
    }

    /// The endpoint remembered for `client` of `service` if it has not expired at `now`,
    /// without refreshing it (for inspection: "why did this client go there?").
    #[must_use]
    pub fn peek(&self, service: &K, client: IpAddr, now: Instant) -> Option<E> {
        let now = self.nanos(now);
        let view = (service, client);
        self.map
            .get(&view as &dyn KeyView<K>)
            .filter(|r| !r.is_expired(now))
            .map(|r| r.endpoint.clone())
    }

    /// Removes every entry expired at `now` and returns how many were removed.
    ///
    /// Takes each shard's write lock in turn, O(entries). Call it periodically.
    pub fn reap(&self, now: Instant) -> usize {
        self.reap_at(self.nanos(now))
    }

    /// Keeps only the entries for which `keep(service, client, endpoint)` is true and returns
    /// how many were removed. Use it to forget a Service that was deleted.
    ///
    /// `keep` runs while a shard of the table is locked: it must not call back into this table.
    pub fn retain<F>(&self, mut keep: F) -> usize
    where
        F: FnMut(&K, IpAddr, &E) -> bool,
    {
        let mut removed = 0;
        self.map.retain(|key, remembered| {
            let kept = keep(&key.service, key.client, &remembered.endpoint);
            if !kept {
                removed += 1;
            }
            kept
        });
        self.occupancy.released(removed);
        removed
    }

    /// Forgets every client sent to `endpoint` (for example when it left the Service), so
    /// their next connections choose anew; returns how many entries were removed.
    ///
    /// Not required for correctness — a pick never returns an ineligible endpoint — but it
    /// frees the memory at once instead of at expiry.
    pub fn remove_endpoint(&self, endpoint: &E) -> usize {
        self.retain(|_, _, e| e != endpoint)
    }

    /// The number of remembered clients (including expired ones not yet reaped).
    ///
    /// Exact whenever no call is in progress; while insertions run concurrently it may count
    /// them slightly early, and it never exceeds the bound.
    #[must_use]
    pub fn len(&self) -> usize {
        self.occupancy.len()
    }

    /// Whether no client is remembered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bound given to [`AffinityTable::with_max_entries`], if any.
    #[must_use]
    pub fn max_entries(&self) -> Option<usize> {
        self.occupancy.max_entries
    }

    /// How many picks returned [`Outcome::Overflow`] since the table was created.
    #[must_use]
    pub fn overflows(&self) -> u64 {
        self.occupancy.overflows()
    }

    /// A hit if `remembered` is usable at `now`, otherwise replace it in place with a fresh
    /// choice; either way it now expires at `expires`.
    #[inline]
    fn use_or_replace<F>(
        &self,
        remembered: &mut Remembered<E>,
        now: Nanos,
        expires: Nanos,
        conn: &NewConnection<'_, K>,
        is_eligible: &F,
        candidates: &[E],
    ) -> Option<AffinityPick<E>>
    where
        F: Fn(&E) -> bool,
    {
        let outcome = if !remembered.is_expired(now) && is_eligible(&remembered.endpoint) {
            Outcome::Hit
        } else {
            remembered.endpoint = pick::uniform(candidates, conn.random)?.clone();
            Outcome::Miss
        };
        // The expiry only moves earlier if the timeout shrank or time went backwards; only then
        // can the floor need lowering.
        let earlier = expires < remembered.expires;
        remembered.expires = expires;
        if earlier {
            self.occupancy.note_expiry(expires);
        }
        Some(AffinityPick {
            endpoint: remembered.endpoint.clone(),
            outcome,
        })
    }

    /// `t` in nanoseconds since the table's origin (negative before it, saturating at about
    /// ±292 years). The first instant the table is given becomes the origin.
    #[inline]
    fn nanos(&self, t: Instant) -> Nanos {
        nanos_since(*self.origin.get_or_init(|| t), t)
    }

    /// Removes the entries expired at `now`; see [`AffinityTable::reap`].
    fn reap_at(&self, now: Nanos) -> usize {
        self.occupancy.begin_reap();
        let mut floor = Nanos::MAX;
        let mut removed = 0;
        self.map.retain(|_, remembered| {
            let expired = remembered.is_expired(now);
            if expired {
                removed += 1;
            } else {
                floor = floor.min(remembered.expires);
            }
            !expired
        });
        self.occupancy.end_reap(removed, floor);
        removed
    }

    /// The "reap expired first" step of a miss on a full table. Skipped when no entry can have
    /// expired yet, or when another thread is already reaping.
    ///
    /// The floor makes a table full of live entries cost one comparison per overflow instead of
    /// a scan. Invariant: every entry expires at or after the floor. A write that makes an
    /// expiry earlier lowers the floor after writing the entry ([`Occupancy::note_expiry`]);
    /// a reap raises the floor to "none" *before* scanning and lowers it to the earliest expiry
    /// it kept afterwards. An entry written during a scan is therefore either seen by the scan
    /// (its shard was scanned after the write) or was written after the raise, in which case
    /// its writer saw the raised floor and lowered it.
    fn reap_for_room(&self, now: Nanos) {
        self.occupancy.reap_for_room(now, || {
            self.reap_at(now);
        });
    }
}

/// What both affinity tables keep beside their entries: the entry count against the bound, the
/// overflow count, and, for bounded tables, the expiry floor with its single reaper (the
/// invariant is described at [`AffinityTable::reap_for_room`]).
struct Occupancy {
    /// Entries, plus insertions in flight. Never below the real count, never above
    /// `max_entries`; equal to the real count whenever no call is in progress.
    len: AtomicUsize,
    max_entries: Option<usize>,
    overflows: AtomicU64,
    /// Maintained for bounded tables only: no entry expires before this.
    expiry_floor: AtomicI64,
    /// Held by the one thread doing an overflow reap, so a full table is not scanned by every
    /// thread that misses at the same moment.
    reaping: AtomicBool,
}

impl Occupancy {
    fn new(max_entries: Option<usize>) -> Self {
        Occupancy {
            len: AtomicUsize::new(0),
            max_entries,
            overflows: AtomicU64::new(0),
            expiry_floor: AtomicI64::new(Nanos::MAX),
            reaping: AtomicBool::new(false),
        }
    }

    #[inline]
    fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    #[inline]
    fn overflows(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }

    /// Counts a pick that could not be remembered.
    #[inline]
    fn overflowed(&self) {
        self.overflows.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one more entry if the bound allows it.
    #[inline]
    fn reserve_slot(&self) -> bool {
        match self.max_entries {
            None => {
                self.len.fetch_add(1, Ordering::AcqRel);
                true
            }
            Some(max) => self
                .len
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok(),
        }
    }

    /// Counts `n` entries removed.
    #[inline]
    fn released(&self, n: usize) {
        self.len.fetch_sub(n, Ordering::AcqRel);
    }

    /// Keeps the expiry floor a lower bound after an entry was written to expire at `expires`.
    #[inline]
    fn note_expiry(&self, expires: Nanos) {
        if self.max_entries.is_some() && expires < self.expiry_floor.load(Ordering::SeqCst) {
            self.expiry_floor.fetch_min(expires, Ordering::SeqCst);
        }
    }

    /// Before a reap scans: raises the floor to "none" (bounded tables).
    fn begin_reap(&self) {
        if self.max_entries.is_some() {
            self.expiry_floor.store(Nanos::MAX, Ordering::SeqCst);
        }
    }

    /// After a reap scanned: counts what it removed and lowers the floor to the earliest
    /// expiry it kept (bounded tables).
    fn end_reap(&self, removed: usize, floor: Nanos) {
        self.released(removed);
        if self.max_entries.is_some() {
            self.expiry_floor.fetch_min(floor, Ordering::SeqCst);
        }
    }

    /// Runs `reap` for a miss on a full table, unless no entry can have expired at `now` yet
    /// or another thread is already reaping.
    fn reap_for_room(&self, now: Nanos, reap: impl FnOnce()) {
        if now < self.expiry_floor.load(Ordering::SeqCst) {
            return;
        }
        if self
            .reaping
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        reap();
        self.reaping.store(false, Ordering::Release);
    }

    /// The fields a table's `Debug` shows.
    fn fields(&self, d: &mut fmt::DebugStruct<'_, '_>) {
        d.field("len", &self.len.load(Ordering::Relaxed))
            .field("max_entries", &self.max_entries)
            .field("overflows", &self.overflows.load(Ordering::Relaxed));
    }
}

impl<K, E, S> fmt::Debug for AffinityTable<K, E, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("AffinityTable");
        self.occupancy.fields(&mut d);
        d.finish_non_exhaustive()
    }
}

/// Nanoseconds since a table's origin; `i64` spans ±292 years.
type Nanos = i64;

/// What the table remembers about one client of one service.
#[derive(Debug)]
struct Remembered<E> {
    endpoint: E,
    /// The client's most recent new connection plus the timeout in force then. Eight bytes
    /// rather than an `Instant` and a `Duration` (32), so that with a `u32` key and a
    /// `SocketAddr` endpoint a table slot is 64 bytes instead of 88.
    expires: Nanos,
}

impl<E> Remembered<E> {
    /// Kube-proxy's rule: usable while less than `timeout` has passed since the last new
    /// connection, i.e. expired from `last_new + timeout` on.
    #[inline]
    fn is_expired(&self, now: Nanos) -> bool {
        now >= self.expires
    }
}

/// `t` in nanoseconds since `origin`, negative before it.
#[inline]
fn nanos_since(origin: Instant, t: Instant) -> Nanos {
    match t.checked_duration_since(origin) {
        Some(after) => saturating_nanos(after),
        None => saturating_nanos(origin.duration_since(t)).saturating_neg(),
    }
}

fn saturating_nanos(d: Duration) -> Nanos {
    Nanos::try_from(d.as_nanos()).unwrap_or(Nanos::MAX)
}

/// The table's key: a service key and a client address, owned.
#[derive(Debug, Clone)]
struct AffinityKey<K> {
    service: K,
    client: IpAddr,
}

/// A key by reference, so that a hit can look up `(&K, IpAddr)` without cloning `K`: the map's
/// key borrows as `dyn KeyView`, and both hash and compare through this trait, which keeps
/// `Borrow`'s contract (equal keys, equal hashes) by construction.
trait KeyView<K> {
    fn service(&self) -> &K;
    fn client(&self) -> IpAddr;
}

impl<K> KeyView<K> for AffinityKey<K> {
    fn service(&self) -> &K {
        &self.service
    }
    fn client(&self) -> IpAddr {
        self.client
    }
}

impl<K> KeyView<K> for (&K, IpAddr) {
    fn service(&self) -> &K {
        self.0
    }
    fn client(&self) -> IpAddr {
        self.1
    }
}

impl<'a, K: Hash> Hash for dyn KeyView<K> + 'a {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.service().hash(state);
        self.client().hash(state);
    }
}

impl<'a, K: Eq> PartialEq for dyn KeyView<K> + 'a {
    fn eq(&self, other: &Self) -> bool {
        self.client() == other.client() && self.service() == other.service()
    }
}

impl<'a, K: Eq> Eq for dyn KeyView<K> + 'a {}

impl<'a, K: 'a> Borrow<dyn KeyView<K> + 'a> for AffinityKey<K> {
    fn borrow(&self) -> &(dyn KeyView<K> + 'a) {
        self
    }
}

impl<K: Hash> Hash for AffinityKey<K> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self as &dyn KeyView<K>).hash(state);
    }
}

impl<K: Eq> PartialEq for AffinityKey<K> {
    fn eq(&self, other: &Self) -> bool {
        self.client == other.client && self.service == other.service
    }
}

impl<K: Eq> Eq for AffinityKey<K> {}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    fn conn(
        service: &'static &'static str,
        client: u32,
        now: Instant,
        random: u64,
    ) -> NewConnection<'static, &'static str> {
        NewConnection {
            service,
            client: ip(client),
            now,
            timeout: TIMEOUT,
            random,
        }
    }

    fn pick(
        table: &AffinityTable<&'static str, u32>,
        c: NewConnection<'_, &'static str>,
        eligible: &[u32],
    ) -> (u32, Outcome) {
        let p = table.pick(c, eligible).expect("eligible is not empty");
        (p.endpoint, p.outcome)
    }

    #[test]
    fn affinity_entry_expires_timeout_after_last_new_connection() {
        let table = AffinityTable::new();
        let t0 = Instant::now();
        let eps = [1, 2, 3];
        let (first, outcome) = pick(&table, conn(&"svc", 1, t0, 0), &eps);
        assert_eq!((first, outcome), (1, Outcome::Miss));
        // A new connection 9 s later hits and restarts the timer...
        let at9 = t0 + Duration::from_secs(9);
        assert_eq!(
            pick(&table, conn(&"svc", 1, at9, u64::MAX), &eps),
            (1, Outcome::Hit)
        );
        // ...so 18 s after t0 (9 s after the last new connection) it still hits...
        let at18 = t0 + Duration::from_secs(18);
        assert_eq!(
            pick(&table, conn(&"svc", 1, at18, u64::MAX), &eps),
            (1, Outcome::Hit)
        );
        // ...and exactly `timeout` after the last one it has expired.
        let at28 = at18 + TIMEOUT;
        assert_eq!(
            pick(&table, conn(&"svc", 1, at28, u64::MAX), &eps),
            (3, Outcome::Miss)
        );
    }

    #[test]
    fn an_entry_whose_endpoint_is_no_longer_eligible_is_replaced() {
        let table = AffinityTable::new();
        let t0 = Instant::now();
        assert_eq!(
            pick(&table, conn(&"svc", 1, t0, 0), &[1, 2]),
            (1, Outcome::Miss)
        );
        assert_eq!(
            pick(&table, conn(&"svc", 1, t0, 0), &[2, 3]),
            (2, Outcome::Miss)
        );
        assert_eq!(table.len(), 1);
        // The replacement is remembered even if the old endpoint comes back.
        assert_eq!(
            pick(&table, conn(&"svc", 1, t0, 0), &[1, 2, 3]),
            (2, Outcome::Hit)
        );
    }

    #[test]
    fn no_eligible_endpoints_gives_none_and_keeps_the_entry() {
        let table: AffinityTable<&str, u32> = AffinityTable::new();
        let t0 = Instant::now();
        assert!(table.pick(conn(&"svc", 1, t0, 0), &[]).is_none());
        assert!(table.is_empty());
        pick(&table, conn(&"svc", 1, t0, 0), &[4]);
        assert!(table.pick(conn(&"svc", 1, t0, 0), &[]).is_none());
        assert_eq!(table.peek(&"svc", ip(1), t0), Some(4));
    }

    #[test]
    fn clients_and_services_are_remembered_separately() {
        let table = AffinityTable::new();
        let t0 = Instant::now();
        let eps = [1, 2];
        pick(&table, conn(&"a", 1, t0, 0), &eps);
        pick(&table, conn(&"a", 2, t0, u64::MAX), &eps);
        pick(&table, conn(&"b", 1, t0, u64::MAX), &eps);
        assert_eq!(table.len(), 3);
        assert_eq!(table.peek(&"a", ip(1), t0), Some(1));
        assert_eq!(table.peek(&"a", ip(2), t0), Some(2));
        assert_eq!(table.peek(&"b", ip(1), t0), Some(2));
    }

    #[test]
    fn pick_with_uses_the_eligibility_predicate_for_the_remembered_endpoint() {
        let table = AffinityTable::new();
        let t0 = Instant::now();
        let first = table
            .pick_with(conn(&"svc", 1, t0, 0), |_| true, &[7, 8])
            .expect("candidates");
        assert_eq!(first.endpoint, 7);
        // 7 is still eligible though not among this call's candidates: it is a hit.
        let hit = table
            .pick_with(conn(&"svc", 1, t0, 0), |&e| e == 7 || e == 9, &[9])
            .expect("candidates");
        assert_eq!((hit.endpoint, hit.outcome), (7, Outcome::Hit));
    }

    #[test]
    fn reap_removes_only_expired_entries() {
        let table = AffinityTable::new();
        let t0 = Instant::now();
        pick(&table, conn(&"svc", 1, t0, 0), &[1]);
        pick(
            &table,
            conn(&"svc", 2, t0 + Duration::from_secs(5), 0),
            &[1],
        );
        assert_eq!(table.reap(t0 + TIMEOUT), 1);
        assert_eq!(table.len(), 1);
        assert_eq!(table.map.len(), 1);
        assert_eq!(table.peek(&"svc", ip(2), t0 + TIMEOUT), Some(1));
    }

    #[test]
    fn remove_endpoint_forgets_the_clients_sent_to_it() {
        let table = AffinityTable::new();
        let t0 = Instant::now();
        for client in 0..10 {
            pick(
                &table,
                conn(&"svc", client, t0, u64::from(client) << 60),
                &[1, 2],
            );
        }
        let removed = table.remove_endpoint(&1);
        assert_eq!(removed, 8); // randoms 0..8 << 60 are below 2^63
        assert_eq!(table.len(), 2);
        assert_eq!(table.map.len(), 2);
    }

    #[test]
    fn a_full_table_reaps_expired_entries_before_refusing_to_remember() {
        let table = AffinityTable::with_max_entries(2);
        let t0 = Instant::now();
        pick(&table, conn(&"svc", 1, t0, 0), &[1]);
        pick(
            &table,
            conn(&"svc", 2, t0 + Duration::from_secs(5), 0),
            &[1],
        );
        // Full of live entries: the third client is served but not remembered.
        assert_eq!(
            pick(&table, conn(&"svc", 3, t0, 0), &[1]),
            (1, Outcome::Overflow)
        );
        assert_eq!(table.overflows(), 1);
        // Once client 1 has expired, client 3 takes its place.
        assert_eq!(
            pick(&table, conn(&"svc", 3, t0 + TIMEOUT, 0), &[1]),
            (1, Outcome::Miss)
        );
        assert_eq!(table.len(), 2);
        assert_eq!(table.peek(&"svc", ip(1), t0 + TIMEOUT), None);
    }

    #[test]
    fn a_table_bounded_to_zero_entries_remembers_nobody() {
        let table = AffinityTable::with_max_entries(0);
        let t0 = Instant::now();
        assert_eq!(
            pick(&table, conn(&"svc", 1, t0, 0), &[1]),
            (1, Outcome::Overflow)
        );
        assert!(table.is_empty());
    }

    #[test]
    fn a_shorter_timeout_lowers_the_expiry_floor_so_a_full_table_can_reap() {
        let table = AffinityTable::with_max_entries(1);
        let t0 = Instant::now();
        let long = NewConnection {
            timeout: Duration::from_secs(1000),
            ..conn(&"svc", 1, t0, 0)
        };
        pick(&table, long, &[1]);
        // The same client reconnects under a 1 s timeout: its entry now expires at t0 + 1 s.
        let short = NewConnection {
            timeout: Duration::from_secs(1),
            ..long
        };
        assert_eq!(pick(&table, short, &[1]), (1, Outcome::Hit));
        let later = conn(&"svc", 2, t0 + Duration::from_secs(2), 0);
        assert_eq!(pick(&table, later, &[1]), (1, Outcome::Miss));
    }

    #[test]
    fn a_timeout_beyond_what_instant_can_represent_never_expires() {
        let table = AffinityTable::new();
        let t0 = Instant::now();
        let forever = NewConnection {
            timeout: Duration::MAX,
            ..conn(&"svc", 1, t0, 0)
        };
        assert_eq!(pick(&table, forever, &[1, 2]), (1, Outcome::Miss));
        let much_later = t0 + Duration::from_secs(100 * 365 * 86_400);
        assert_eq!(table.reap(much_later), 0);
        assert_eq!(table.peek(&"svc", ip(1), much_later), Some(1));
    }

    #[test]
    fn instants_earlier_than_the_first_one_seen_are_compared_correctly() {
        let table = AffinityTable::with_max_entries(1);
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(100);
        // The table's origin becomes t1; t0 is 100 s before it.
        pick(&table, conn(&"svc", 1, t1, 0), &[1]);
        table.reap(t1 + TIMEOUT);
        assert_eq!(
            pick(&table, conn(&"svc", 2, t0, 0), &[1]),
            (1, Outcome::Miss)
        );
        assert_eq!(
            table.peek(&"svc", ip(2), t0 + TIMEOUT - Duration::from_nanos(1)),
            Some(1)
        );
        assert_eq!(table.peek(&"svc", ip(2), t0 + TIMEOUT), None);
        // The floor knows client 2 expires at t0 + 10 s, before the origin: a full table reaps.
        assert_eq!(
            pick(&table, conn(&"svc", 3, t0 + TIMEOUT, 0), &[1]),
            (1, Outcome::Miss)
        );
    }

    #[test]
    fn concurrent_picks_never_exceed_the_bound_and_keep_len_exact() {
        let table = Arc::new(AffinityTable::<&'static str, u32>::with_max_entries(500));
        let t0 = Instant::now();
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let table = Arc::clone(&table);
                std::thread::spawn(move || {
                    for i in 0..5_000u32 {
                        let now = t0 + Duration::from_millis(u64::from(i));
                        let c = conn(&"svc", (i * 7 + t) % 2_000, now, u64::from(i));
                        table.pick(c, &[1, 2, 3]).expect("eligible");
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
        assert_eq!(table.len(), table.map.len());
        assert!(table.len() <= 500);
    }
}
