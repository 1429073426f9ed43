//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, §3.4).
//!
//! A [`Maglev`] table maps a flow's hash to one of N backends so that (1) every backend owns
//! almost exactly `M / N` of the `M` slots, and (2) when a backend joins or leaves, only about
//! `1 / N` of the slots change owner, so established flows mostly keep their backend even when
//! the per-connection state that pinned them is lost (for example after a restart, or on
//! another load-balancer instance holding the same table).
//!
//! # Stability across processes
//!
//! Each backend is identified by bytes the caller chooses (its name, or its address as text or
//! octets). The two hashes of the paper are XXH3-64 of those bytes with two fixed seeds
//! ([`OFFSET_SEED`] and [`SKIP_SEED`]). XXH3's output is specified and does not depend on the
//! process, the platform or the Rust version, so two processes given the same backends in the
//! same order and the same table size build identical tables.
//!
//! The order of the backend list matters only where two backends want the same slot in the same
//! round: the earlier one wins. Sort the list (as a snapshot does) to make tables independent of
//! discovery order.
//!
//! # Choosing `M`
//!
//! `M` must be prime (so every skip is coprime with it and each backend's preference list is a
//! permutation of all slots) and at least N. The paper recommends `M` much larger than N: it
//! measured that `M ≥ 100 · N` keeps every backend's share within about 1% of the others and
//! keeps disruption on a change close to the ideal `1 / N`. Use [`DEFAULT_TABLE_SIZE`]
//! (65,537, 256 KiB) for up to a few hundred backends and [`LARGE_TABLE_SIZE`] (655,373,
//! 2.5 MiB) for thousands.
//!
//! # Weights
//!
//! [`Maglev::weighted`] takes a weight per backend: in each round of population a backend gains
//! `weight` credit and claims one slot per `max_weight` of credit, so its share of the table is
//! `weight / Σ weight` (to within `max_weight / mean_weight + 1` slots). With equal weights
//! every backend claims one slot per round and the table is exactly the one [`Maglev::new`]
//! builds.
//!
//! # The disruption bound, and [`Maglev::successor`]
//!
//! A table built from scratch is a pure function of the backend set, so every process agrees
//! on it, but plain Maglev's disruption is only *about* ideal: on top of the slots of the
//! backend that changed, measured rebuilds move a mean 0.3–0.9 % of the table for N ≤ 300 at
//! M = 65,537, with a heavy tail (5 % has been seen at N = 3). To *guarantee* a bound, rebuild
//! with [`Maglev::successor`], which takes the previous table into account:
//!
//! > After one endpoint change (one backend added, removed, or re-weighted), at most
//! > `1 % of M + ⌈share · M⌉` slots change backend, where `share` is the larger of the changed
//! > backend's old and new share of the table — `1 % + 1/N` with equal weights.
//!
//! `successor` returns the canonical table for the new backend set (the one
//! [`Maglev::weighted`] builds) whenever it moves no more than that, which is nearly always, so
//! independent processes keep agreeing; otherwise it returns a minimal-disruption table derived
//! from the previous one (every remaining backend keeps its slots up to its new quota, and only
//! the slots of removed backends and over-quota slots are handed out). A later `successor` that
//! is within the bound again returns to the canonical table. The bound needs `M ≥ 200 · N`
//! (rounding costs up to a slot or two per backend); `lb-core/tests/pickers_props.rs` checks it
//! as a property.

use std::collections::HashMap;

use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The table size for up to a few hundred backends: the prime 65,537 (the paper's smaller size).
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;

/// The table size for thousands of backends: the prime 655,373 (the paper's larger size).
pub const LARGE_TABLE_SIZE: u32 = 655_373;

/// Seed of the XXH3 hash that gives a backend's first slot (`offset`, the paper's `h1`).
pub const OFFSET_SEED: u64 = 0x6d61_676c_6576_3031; // "maglev01"

/// Seed of the XXH3 hash that gives a backend's stride (`skip`, the paper's `h2`).
pub const SKIP_SEED: u64 = 0x6d61_676c_6576_3032; // "maglev02"

/// Slot value meaning "not yet owned" during population; never present in a built table.
const EMPTY: u32 = u32::MAX;

/// Why a Maglev table could not be built; each variant names the offending input.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MaglevError {
    /// `table_size` must be prime so that every backend's preference list covers every slot.
    #[error(
        "table_size: {table_size} is not prime (use {DEFAULT_TABLE_SIZE} or {LARGE_TABLE_SIZE})"
    )]
    TableSizeNotPrime {
        /// The size that was asked for.
        table_size: u32,
    },
    /// `table_size` must be at least the number of backends, or some backend would own nothing.
    #[error("table_size: {table_size} is smaller than the number of backends ({backends})")]
    TableSizeTooSmall {
        /// The size that was asked for.
        table_size: u32,
        /// How many backends were given.
        backends: usize,
    },
    /// Two backends had the same identity; they would be indistinguishable to the hash.
    #[error("backends[{second}]: same identity as backends[{first}]")]
    DuplicateBackend {
        /// Index of the first occurrence.
        first: usize,
        /// Index of the repeated identity.
        second: usize,
    },
    /// A weight of 0: leave the backend out instead.
    #[error("backends[{index}].weight: must be at least 1 (leave a drained backend out)")]
    ZeroWeight {
        /// Index of the backend.
        index: usize,
    },
}

/// A built Maglev lookup table: `M` slots, each holding the index of the backend that owns it.
///
/// Immutable once built; rebuild from the new backend list when the set changes (building for
/// 1,000 backends and `M` = 65,537 takes about 1.5 ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maglev {
    /// `slots[j]` is the index (into the backend list given to [`Maglev::new`]) owning slot `j`.
    /// Empty when there are no backends.
    slots: Vec<u32>,
    /// `M`, kept even when `slots` is empty so it can be reported.
    table_size: u32,
    /// Each backend's identity bytes and weight, in the order given; [`Maglev::successor`]
    /// matches backends across tables by identity.
    backends: Vec<(Box<[u8]>, u32)>,
}

impl Maglev {
    /// Builds the table for `backends` (identified by their bytes) with `table_size` slots.
    ///
    /// Population follows the paper's Algorithm 1: backend `i` has `offset = h1 mod M` and
    /// `skip = h2 mod (M − 1) + 1`, and its preference list is `offset, offset + skip, …`
    /// (mod `M`). Backends take turns claiming their next preferred free slot until all `M` are
    /// owned, so any two backends' slot counts differ by at most one.
    ///
    /// An empty backend list is allowed and gives a table whose lookups return `None`.
    ///
    /// # Errors
    ///
    /// [`MaglevError::TableSizeNotPrime`] if `table_size` is not prime,
    /// [`MaglevError::TableSizeTooSmall`] if it is smaller than `backends.len()`, and
    /// [`MaglevError::DuplicateBackend`] if two backends have equal bytes.
    ///
    /// ```
    /// use lb_core::maglev::{Maglev, MaglevError, DEFAULT_TABLE_SIZE};
    ///
    /// let backends = ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"];
    /// let table = Maglev::new(&backends, DEFAULT_TABLE_SIZE)?;
    /// let flow_hash = xxhash_rust::xxh3::xxh3_64(b"192.0.2.7:41000->10.96.0.10:80/TCP");
    /// let backend = table.lookup(flow_hash).expect("there are backends");
    /// assert!(backend < backends.len());
    ///
    /// assert_eq!(
    ///     Maglev::new(&backends, 65_536),
    ///     Err(MaglevError::TableSizeNotPrime { table_size: 65_536 })
    /// );
    /// # Ok::<(), MaglevError>(())
    /// ```
    pub fn new<B: AsRef<[u8]>>(backends: &[B], table_size: u32) -> Result<Self, MaglevError> {
        let weighted: Vec<(&[u8], u32)> = backends.iter().map(|b| (b.as_ref(), 1)).collect();
        Self::weighted(&weighted, table_size)
    }

    /// Builds the table for weighted backends: `(identity, weight)` pairs, each backend owning
    /// about `weight / Σ weight` of the slots. Equal weights build the same table as
    /// [`Maglev::new`]. Building costs O(M · max weight / mean weight), so keep weights within a
    /// few orders of magnitude of each other.
    ///
    /// # Errors
    ///
    /// As [`Maglev::new`], and [`MaglevError::ZeroWeight`] for a weight of 0.
    ///
    /// ```
    /// use lb_core::maglev::{Maglev, DEFAULT_TABLE_SIZE};
    ///
    /// let table = Maglev::weighted(&[("10.0.0.1:80", 3), ("10.0.0.2:80", 1)], DEFAULT_TABLE_SIZE)?;
    /// let heavy = table.slots().iter().filter(|&&b| b == 0).count();
    /// assert!(heavy.abs_diff(DEFAULT_TABLE_SIZE as usize * 3 / 4) <= 2);
    /// # Ok::<(), lb_core::maglev::MaglevError>(())
    /// ```
    pub fn weighted<B: AsRef<[u8]>>(
        backends: &[(B, u32)],
        table_size: u32,
    ) -> Result<Self, MaglevError> {
        if !is_prime(table_size) {
            return Err(MaglevError::TableSizeNotPrime { table_size });
        }
        let n = backends.len();
        if usize::try_from(table_size).is_ok_and(|m| m < n) {
            return Err(MaglevError::TableSizeTooSmall {
                table_size,
                backends: n,
            });
        }
        let mut seen: HashMap<&[u8], usize> = HashMap::with_capacity(n);
        for (second, (b, w)) in backends.iter().enumerate() {
            if *w == 0 {
                return Err(MaglevError::ZeroWeight { index: second });
            }
            if let Some(&first) = seen.get(b.as_ref()) {
                return Err(MaglevError::DuplicateBackend { first, second });
            }
            seen.insert(b.as_ref(), second);
        }
        Ok(Maglev {
            slots: populate(backends, table_size),
            table_size,
            backends: backends
                .iter()
                .map(|(b, w)| (Box::from(b.as_ref()), *w))
                .collect(),
        })
    }

    /// The table for a new backend list, given that this table was serving until now: the
    /// canonical table ([`Maglev::weighted`]) when it moves no more slots than the documented
    /// bound (see the [module documentation](self)), otherwise a minimal-disruption table
    /// derived from this one. Backends are matched across the two lists by identity; the table
    /// size stays the same.
    ///
    /// # Errors
    ///
    /// As [`Maglev::weighted`].
    ///
    /// ```
    /// use lb_core::maglev::{Maglev, DEFAULT_TABLE_SIZE};
    ///
    /// let names: Vec<String> = (0..10).map(|i| format!("10.0.0.{i}:80")).collect();
    /// let before = Maglev::weighted(&names.iter().map(|n| (n, 1)).collect::<Vec<_>>(), DEFAULT_TABLE_SIZE)?;
    /// let after_list: Vec<(&String, u32)> = names[1..].iter().map(|n| (n, 1)).collect();
    /// let after = before.successor(&after_list)?;
    /// let moved = before.slots().iter().zip(after.slots())
    ///     .filter(|&(&b, &a)| names[b as usize] != *after_list[a as usize].0)
    ///     .count();
    /// assert!(moved <= DEFAULT_TABLE_SIZE as usize / 100 + DEFAULT_TABLE_SIZE as usize / 10 + 1);
    /// # Ok::<(), lb_core::maglev::MaglevError>(())
    /// ```
    pub fn successor<B: AsRef<[u8]>>(&self, backends: &[(B, u32)]) -> Result<Self, MaglevError> {
        let canonical = Self::weighted(backends, self.table_size)?;
        if self.slots.is_empty() || canonical.slots.is_empty() {
            return Ok(canonical);
        }
        // Old backend index → new backend index, by identity.
        let new_index: HashMap<&[u8], usize> = canonical
            .backends
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (&**id, i))
            .collect();
        let old_to_new: Vec<Option<u32>> = self
            .backends
            .iter()
            .map(|(id, _)| new_index.get(&**id).map(|&i| i as u32))
            .collect();
        let moved = |table: &[u32]| {
            self.slots
                .iter()
                .zip(table)
                .filter(|&(&old, &new)| old_to_new[old as usize] != Some(new))
                .count()
        };
        if moved(&canonical.slots) <= self.disruption_bound(&canonical) {
            return Ok(canonical);
        }
        let quotas = quotas(&canonical.backends, self.table_size);
        let mut kept = vec![0u32; quotas.len()];
        let mut slots = Vec::with_capacity(self.slots.len());
        let mut free = Vec::new();
        for (j, &old) in self.slots.iter().enumerate() {
            match old_to_new[old as usize] {
                Some(b) if kept[b as usize] < quotas[b as usize] => {
                    kept[b as usize] += 1;
                    slots.push(b);
                }
                _ => {
                    slots.push(EMPTY);
                    free.push(j);
                }
            }
        }
        let mut free = free.into_iter();
        for (b, (&quota, &have)) in quotas.iter().zip(&kept).enumerate() {
            for j in free.by_ref().take((quota - have) as usize) {
                slots[j] = b as u32;
            }
        }
        Ok(Maglev { slots, ..canonical })
    }

    /// The most slots one change may move from `self` to `next`: 1 % of M, plus for every
    /// backend added, removed or re-weighted the larger of its old slot count and its new quota.
    fn disruption_bound(&self, next: &Maglev) -> usize {
        let m = self.table_size as usize;
        let mut old_count = vec![0usize; self.backends.len()];
        for &b in &self.slots {
            old_count[b as usize] += 1;
        }
        let old: HashMap<&[u8], (u32, usize)> = self
            .backends
            .iter()
            .zip(&old_count)
            .map(|((id, w), &c)| (&**id, (*w, c)))
            .collect();
        let new_quota = quotas(&next.backends, next.table_size);
        let mut bound = m.div_ceil(100);
        let mut present = 0usize;
        for ((id, w), &q) in next.backends.iter().zip(&new_quota) {
            match old.get(&**id) {
                Some(&(old_w, c)) => {
                    present += 1;
                    if old_w != *w {
                        bound += c.max(q as usize);
                    }
                }
                None => bound += q as usize,
            }
        }
        if present < self.backends.len() {
            let next_ids: std::collections::HashSet<&[u8]> =
                next.backends.iter().map(|(id, _)| &**id).collect();
            for ((id, _), &c) in self.backends.iter().zip(&old_count) {
                if !next_ids.contains(&**id) {
                    bound += c;
                }
            }
        }
        bound
    }

    /// The backend index (into the list given to [`Maglev::new`]) for a flow; `None` when the
    /// table has no backends. O(1): one multiplication and one load.
    ///
    /// `flow_hash` must be a well-mixed 64-bit hash of whatever identifies the flow (for
    /// example XXH3 of the 5-tuple, or of the client address for per-client stickiness): the
    /// slot is `(flow_hash · M) >> 64` (Lemire's range reduction, as in [`crate::pick`]), which
    /// uses the hash's high bits and so needs them to be random. Callers that want the paper's
    /// `flow_hash mod M` instead can index [`Maglev::slots`] themselves.
    #[inline]
    #[must_use]
    pub fn lookup(&self, flow_hash: u64) -> Option<usize> {
        let slot = (u128::from(flow_hash) * u128::from(self.table_size)) >> 64;
        // `slot < M` fits in `usize`; `get` returns `None` only for an empty table.
        self.slots.get(slot as usize).map(|&b| b as usize)
    }

    /// The table: slot `j` holds the index of the backend owning it. Empty when there are no
    /// backends, otherwise exactly [`Maglev::table_size`] long.
    #[must_use]
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// `M`, the number of slots asked for.
    #[must_use]
    pub fn table_size(&self) -> u32 {
        self.table_size
    }

    /// N, the number of backends the table was built for.
    #[must_use]
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// The weight of backend `index` (1 for tables built by [`Maglev::new`]).
    #[must_use]
    pub fn weight(&self, index: usize) -> Option<u32> {
        self.backends.get(index).map(|&(_, w)| w)
    }
}

/// Each backend's exact share of `m` slots by weight (largest remainder; ties to the earlier
/// backend), summing to `m`.
fn quotas(backends: &[(Box<[u8]>, u32)], m: u32) -> Vec<u32> {
    let total: u64 = backends.iter().map(|&(_, w)| u64::from(w)).sum();
    if total == 0 {
        return Vec::new();
    }
    let m = u64::from(m);
    let mut q: Vec<u32> = Vec::with_capacity(backends.len());
    let mut rest: Vec<(u64, usize)> = Vec::with_capacity(backends.len());
    let mut given = 0u64;
    for (i, &(_, w)) in backends.iter().enumerate() {
        let exact = m * u64::from(w);
        // `exact / total ≤ m < 2^32`.
        q.push((exact / total) as u32);
        given += exact / total;
        rest.push((exact % total, i));
    }
    rest.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in rest.iter().take((m - given) as usize) {
        q[i] += 1;
    }
    q
}

/// The paper's population loop, tuned: a bitset of owned slots (8 KiB for `M` = 65,537, so it
/// stays in L1) answers "is this slot free?", the table itself is only written `M` times, and
/// the next preference is `cur + skip` minus `M` when it overflows, with no division per step.
///
/// Weights: each round a backend gains `weight` credit and claims one slot per `max_weight` of
/// credit; with equal weights that is one slot per backend per round, the paper's loop.
fn populate<B: AsRef<[u8]>>(backends: &[(B, u32)], table_size: u32) -> Vec<u32> {
    let n = backends.len();
    if n == 0 {
        return Vec::new();
    }
    let m = u64::from(table_size);
    // `offset < M` and `skip ∈ 1..M`, so `cur + skip < 2M < 2^33`: no u64 overflow.
    let mut cur: Vec<u64> = Vec::with_capacity(n);
    let mut skip: Vec<u64> = Vec::with_capacity(n);
    let weight: Vec<u64> = backends.iter().map(|&(_, w)| u64::from(w)).collect();
    let max_weight = weight.iter().copied().max().unwrap_or(1);
    // Equal weights: every backend claims a slot every round, no credit to keep.
    let uniform = weight.iter().all(|&w| w == max_weight);
    let mut credit = vec![0u64; n];
    for (b, _) in backends {
        let bytes = b.as_ref();
        cur.push(xxh3_64_with_seed(bytes, OFFSET_SEED) % m);
        // M is prime, so M ≥ 2 and M − 1 ≥ 1.
        skip.push(xxh3_64_with_seed(bytes, SKIP_SEED) % (m - 1) + 1);
    }

    let len = table_size as usize;
    let mut slots = vec![EMPTY; len];
    let mut owned = vec![0u64; len.div_ceil(64)];
    let mut filled = 0usize;
    // Each round gives every backend of the largest weight exactly one more slot (lighter ones
    // proportionally fewer), until the table is full. A backend's preferences are a permutation
    // of all M slots and fewer than M are owned when it takes its turn, so its inner loop always
    // finds a free slot.
    'rounds: loop {
        for i in 0..n {
            if !uniform {
                credit[i] += weight[i];
                if credit[i] < max_weight {
                    continue;
                }
                credit[i] -= max_weight;
            }
            let mut c = cur[i];
            loop {
                let word = (c / 64) as usize;
                let bit = 1u64 << (c % 64);
                c += skip[i];
                if c >= m {
                    c -= m;
                }
                if owned[word] & bit == 0 {
                    owned[word] |= bit;
                    let slot = (word * 64) | (bit.trailing_zeros() as usize);
                    slots[slot] = i as u32;
                    break;
                }
            }
            cur[i] = c;
            filled += 1;
            if filled == len {
                break 'rounds;
            }
        }
    }
    slots
}

/// Deterministic primality test by trial division (at most ~32,768 odd divisors for `u32`).
#[must_use]
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n % 2 == 0 {
        return false;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.1.{}.{}:8080", i / 256, i % 256))
            .collect()
    }

    fn counts(table: &Maglev) -> Vec<usize> {
        let mut c = vec![0; table.backend_count()];
        for &s in table.slots() {
            c[s as usize] += 1;
        }
        c
    }

    #[test]
    fn is_prime_agrees_with_known_small_primes_and_the_default_sizes() {
        let primes: Vec<u32> = (0..60).filter(|&n| is_prime(n)).collect();
        assert_eq!(
            primes,
            [
                2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59
            ]
        );
        assert!(is_prime(DEFAULT_TABLE_SIZE));
        assert!(is_prime(LARGE_TABLE_SIZE));
        assert!(is_prime(4_294_967_291)); // largest prime below 2^32
        assert!(!is_prime(u32::MAX));
        assert!(!is_prime(65_536));
    }

    #[test]
    fn a_non_prime_table_size_is_rejected_naming_the_field() {
        let err = Maglev::new(&names(3), 100).expect_err("100 is not prime");
        assert_eq!(err, MaglevError::TableSizeNotPrime { table_size: 100 });
        assert!(err.to_string().starts_with("table_size: 100 is not prime"));
    }

    #[test]
    fn a_table_smaller_than_the_backend_list_is_rejected() {
        let err = Maglev::new(&names(20), 17).expect_err("17 < 20");
        assert_eq!(
            err,
            MaglevError::TableSizeTooSmall {
                table_size: 17,
                backends: 20
            }
        );
    }

    #[test]
    fn duplicate_backends_are_rejected_with_both_positions() {
        let err = Maglev::new(&["a", "b", "a"], 7).expect_err("duplicate");
        assert_eq!(
            err,
            MaglevError::DuplicateBackend {
                first: 0,
                second: 2
            }
        );
    }

    #[test]
    fn a_table_without_backends_looks_up_nothing() {
        let table = Maglev::new::<&str>(&[], DEFAULT_TABLE_SIZE).expect("valid");
        assert_eq!(table.lookup(12345), None);
        assert!(table.slots().is_empty());
        assert_eq!(table.table_size(), DEFAULT_TABLE_SIZE);
    }

    #[test]
    fn a_table_as_large_as_the_backend_list_gives_each_backend_one_slot() {
        let table = Maglev::new(&names(7), 7).expect("valid");
        assert_eq!(counts(&table), vec![1; 7]);
    }

    #[test]
    fn every_slot_is_owned_and_shares_differ_by_at_most_one() {
        let table = Maglev::new(&names(1000), DEFAULT_TABLE_SIZE).expect("valid");
        assert_eq!(table.slots().len(), DEFAULT_TABLE_SIZE as usize);
        let c = counts(&table);
        let (min, max) = (c.iter().min(), c.iter().max());
        assert_eq!(min, Some(&65)); // ⌊65537 / 1000⌋
        assert_eq!(max, Some(&66));
    }

    #[test]
    fn the_table_is_a_pure_function_of_backends_and_size() {
        let a = Maglev::new(&names(50), 251).expect("valid");
        let b = Maglev::new(&names(50), 251).expect("valid");
        assert_eq!(a, b);
    }

    #[test]
    fn the_table_for_fixed_inputs_never_changes_across_versions() {
        // A golden value: if this changes, tables built by different versions of this crate
        // disagree and flows move on upgrade.
        let table = Maglev::new(&["a", "b", "c"], 13).expect("valid");
        assert_eq!(table.slots(), GOLDEN_ABC_13);
    }

    const GOLDEN_ABC_13: &[u32] = &[1, 0, 0, 2, 0, 0, 1, 0, 1, 2, 2, 2, 1];

    /// Algorithm 1 of the paper, transcribed literally: a permutation row per backend and a
    /// `next` index into it.
    fn reference_populate(backends: &[String], m: u32) -> Vec<u32> {
        let m = u64::from(m);
        let permutation: Vec<Vec<u64>> = backends
            .iter()
            .map(|b| {
                let offset = xxh3_64_with_seed(b.as_bytes(), OFFSET_SEED) % m;
                let skip = xxh3_64_with_seed(b.as_bytes(), SKIP_SEED) % (m - 1) + 1;
                (0..m).map(|j| (offset + j * skip) % m).collect()
            })
            .collect();
        let mut next = vec![0usize; backends.len()];
        let mut entry = vec![EMPTY; m as usize];
        let mut n = 0;
        loop {
            for i in 0..backends.len() {
                let mut c = permutation[i][next[i]];
                while entry[c as usize] != EMPTY {
                    next[i] += 1;
                    c = permutation[i][next[i]];
                }
                entry[c as usize] = i as u32;
                next[i] += 1;
                n += 1;
                if n == m {
                    return entry;
                }
            }
        }
    }

    #[test]
    fn population_matches_the_papers_algorithm_transcribed_literally() {
        for (n, m) in [(1, 2), (3, 13), (10, 251), (100, 1009), (300, 4099)] {
            let backends = names(n);
            let table = Maglev::new(&backends, m).expect("valid");
            assert_eq!(
                table.slots(),
                reference_populate(&backends, m),
                "n={n} m={m}"
            );
        }
    }

    #[test]
    fn equal_weights_build_exactly_the_unweighted_table() {
        let names = names(40);
        let weighted: Vec<(&String, u32)> = names.iter().map(|n| (n, 7)).collect();
        let a = Maglev::new(&names, 251).expect("valid");
        let b = Maglev::weighted(&weighted, 251).expect("valid");
        assert_eq!(a.slots(), b.slots());
        assert_eq!(
            Maglev::new(&["a", "b", "c"], 13).expect("valid").slots(),
            GOLDEN_ABC_13
        );
    }

    #[test]
    fn a_zero_weight_is_rejected_naming_the_backend() {
        let err = Maglev::weighted(&[("a", 1), ("b", 0)], 13).expect_err("zero weight");
        assert_eq!(err, MaglevError::ZeroWeight { index: 1 });
        assert!(err.to_string().starts_with("backends[1].weight"));
    }

    #[test]
    fn quotas_split_the_table_by_weight_and_sum_to_its_size() {
        let b = |w: &[u32]| -> Vec<(Box<[u8]>, u32)> {
            w.iter().map(|&w| (Box::from(&b"x"[..]), w)).collect()
        };
        assert_eq!(quotas(&b(&[1, 1, 1]), 13), [5, 4, 4]);
        assert_eq!(quotas(&b(&[3, 1]), 13), [10, 3]);
        assert_eq!(
            quotas(&b(&[1, 2, 3, 4]), 65_537).iter().sum::<u32>(),
            65_537
        );
    }

    proptest::proptest! {
        /// Whatever the previous table (here an arbitrary balanced assignment, far from any
        /// canonical table, so the fallback runs every time), one removal moves exactly the
        /// removed backend's slots and leaves the others balanced.
        #[test]
        fn successor_from_any_previous_table_moves_only_the_removed_backends_slots(
            n in 2usize..=12,
            stride in 1u32..=1008,
            removed in 0usize..12,
        ) {
            let removed = removed % n;
            let names = names(n);
            let m = 1009u32;
            let previous = Maglev {
                slots: (0..m).map(|j| (j * stride % m) % n as u32).collect(),
                table_size: m,
                backends: names.iter().map(|x| (Box::from(x.as_bytes()), 1)).collect(),
            };
            let rest: Vec<(&String, u32)> =
                names.iter().enumerate().filter(|&(i, _)| i != removed).map(|(_, x)| (x, 1)).collect();
            let next = previous.successor(&rest).expect("valid");
            let removed_slots = previous.slots().iter().filter(|&&b| b as usize == removed).count();
            let moved = previous
                .slots()
                .iter()
                .zip(next.slots())
                .filter(|&(&b, &a)| names[b as usize] != *rest[a as usize].0)
                .count();
            // The removed backend's slots, plus at most one per survivor for rounding.
            proptest::prop_assert!(moved >= removed_slots);
            proptest::prop_assert!(moved <= removed_slots + n, "moved {moved}, removed owned {removed_slots}");
            let c = counts(&next);
            let (lo, hi) = (m as usize / (n - 1), (m as usize).div_ceil(n - 1));
            proptest::prop_assert!(c.iter().all(|&c| c == lo || c == hi), "{c:?}");
        }
    }

    #[test]
    fn successor_falls_back_to_minimal_disruption_when_the_canonical_table_moves_too_much() {
        // A previous table unlike any canonical one: five backends in contiguous blocks.
        let names = names(5);
        let m = 1009u32;
        let block = m.div_ceil(5);
        let previous = Maglev {
            slots: (0..m).map(|j| j / block).collect(),
            table_size: m,
            backends: names.iter().map(|n| (Box::from(n.as_bytes()), 1)).collect(),
        };
        let rest: Vec<(&String, u32)> = names[1..].iter().map(|n| (n, 1)).collect();
        let next = previous.successor(&rest).expect("valid");
        let canonical = Maglev::weighted(&rest, m).expect("valid");
        assert_ne!(next, canonical);
        // Exactly the removed backend's slots moved, and the new table is balanced.
        let moved = previous
            .slots()
            .iter()
            .zip(next.slots())
            .filter(|&(&b, &a)| names[b as usize] != *rest[a as usize].0)
            .count();
        assert_eq!(moved, block as usize);
        let c = counts(&next);
        assert!(c.iter().all(|&c| c == 252 || c == 253), "{c:?}");
        // Within the bound again, the next successor returns to the canonical table.
        let again = canonical.successor(&rest).expect("valid");
        assert_eq!(again, canonical);
    }

    #[test]
    fn lookup_maps_the_whole_hash_range_onto_the_table() {
        let table = Maglev::new(&names(3), 13).expect("valid");
        assert_eq!(table.lookup(0), Some(table.slots()[0] as usize));
        assert_eq!(table.lookup(u64::MAX), Some(table.slots()[12] as usize));
    }
}
