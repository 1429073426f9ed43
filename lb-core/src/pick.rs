//! Uniform choice among candidates, driven by a random number the caller supplies.
//!
//! Kube-proxy spreads new connections over a Service's endpoints with equal probability
//! (`-m statistic --mode random` in iptables mode, `numgen random mod N` in nftables mode). This
//! module is that choice as a pure function: the caller draws a `u64` from whatever generator it
//! likes and passes it in, so the same inputs always give the same endpoint and tests need no
//! seeded RNG.
//!
//! # How a `u64` becomes an index
//!
//! Lemire's multiply-shift range reduction ("Fast Random Integer Generation in an Interval",
//! 2019, without its rejection step): `index = (random * n) >> 64`, computed in 128 bits. It
//! costs one multiplication instead of a division. Of the 2^64 possible `random` values, each
//! index receives either ⌊2^64 / n⌋ or ⌈2^64 / n⌉, so the largest bias is `n / 2^64` — below
//! 10^-13 for any realistic `n`, far under what any load balancer could observe. That is the only
//! bias: there is no modulo bias on top of it.
//!
//! The index is taken from the **high** bits of the product, so `random` must be uniform across
//! all 64 bits. A 32-bit random number widened to `u64` would always give index 0; use a full
//! 64-bit draw.

/// Maps `random` to an index in `0..n` with Lemire's multiply-shift; `None` when `n == 0`.
///
/// Each index is hit by ⌊2^64 / n⌋ or ⌈2^64 / n⌉ of the 2^64 possible `random` values (see the
/// [module docs](self)). Monotone in `random`: larger randoms never give a smaller index.
///
/// ```
/// use lb_core::pick::uniform_index;
///
/// assert_eq!(uniform_index(0, 42), None);
/// assert_eq!(uniform_index(3, 0), Some(0));
/// assert_eq!(uniform_index(3, u64::MAX), Some(2));
/// assert_eq!(uniform_index(2, 1 << 63), Some(1));
/// ```
#[inline]
#[must_use]
pub fn uniform_index(n: usize, random: u64) -> Option<usize> {
    if n == 0 {
        return None;
    }
    // `usize` is at most 64 bits on every supported target, so `n as u128` is exact; the result
    // is `< n` because `random < 2^64`, so it fits back into `usize`.
    let index = (u128::from(random) * n as u128) >> 64;
    Some(index as usize)
}

/// Picks one of `candidates` uniformly, driven by the caller's random `u64`; `None` when empty.
///
/// This is the choice for a Service without session affinity, and the choice on an affinity
/// miss. Deterministic: the same slice and `random` always give the same element.
///
/// ```
/// use lb_core::pick::uniform;
///
/// let endpoints = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"];
/// assert_eq!(uniform(&endpoints, 0), Some(&"10.0.0.1:80"));
/// assert_eq!(uniform(&endpoints, u64::MAX), Some(&"10.0.0.3:80"));
/// assert_eq!(uniform::<&str>(&[], 7), None);
/// ```
#[inline]
#[must_use]
pub fn uniform<T>(candidates: &[T], random: u64) -> Option<&T> {
    uniform_index(candidates.len(), random).and_then(|i| candidates.get(i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_returns_none_for_no_candidates() {
        assert_eq!(uniform::<u8>(&[], 0), None);
        assert_eq!(uniform::<u8>(&[], u64::MAX), None);
    }

    #[test]
    fn uniform_with_one_candidate_always_returns_it() {
        for r in [0, 1, u64::MAX / 2, u64::MAX] {
            assert_eq!(uniform(&[7], r), Some(&7));
        }
    }

    #[test]
    fn uniform_index_splits_the_random_range_into_equal_intervals() {
        // With n = 4 the interval boundaries are exact multiples of 2^62.
        let q = 1u64 << 62;
        assert_eq!(uniform_index(4, q - 1), Some(0));
        assert_eq!(uniform_index(4, q), Some(1));
        assert_eq!(uniform_index(4, 2 * q), Some(2));
        assert_eq!(uniform_index(4, 3 * q), Some(3));
        assert_eq!(uniform_index(4, u64::MAX), Some(3));
    }

    #[test]
    fn uniform_index_is_always_below_n_even_for_the_largest_random() {
        for n in [1, 2, 3, 7, 1000, usize::MAX] {
            let i = uniform_index(n, u64::MAX).expect("n is non-zero");
            assert!(i < n, "{i} >= {n}");
        }
    }
}
