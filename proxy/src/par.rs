//! Data parallelism for the few places where one pass over a whole cluster is most of the
//! work (a full sync's compile, converting a cluster read from manifests): the items are split
//! into as many parts as there are cores (at most 4), each mapped on a scoped thread, and the
//! results joined in order, so the outcome is the same as one pass on one thread.

/// Below this many items the work stays on the calling thread: an incremental sync touches a
/// handful of items, a full sync hundreds of thousands.
pub const PARALLEL_MIN: usize = 4096;

/// How many threads share the work of `items` items (1 below [`PARALLEL_MIN`]).
pub fn threads_for(items: usize) -> usize {
    threads_from(PARALLEL_MIN, items)
}

/// How many threads share the work of `items` items (1 below `min`).
fn threads_from(min: usize, items: usize) -> usize {
    if items < min.max(2) {
        return 1;
    }
    cores().min(4)
}

/// The cores this process may use, read once: the standard library reads the cgroup's CPU
/// quota from `/proc` on every call (two files), and a full sync maps in parallel dozens of
/// times.
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from))
}

/// `f` of every item, in order; computed on up to [`threads_for`] threads.
pub fn map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    map_from(PARALLEL_MIN, items, f)
}

/// Like [`map`], for items that each cost microseconds (converting an API object): on
/// several threads from `min` items on.
pub fn map_from<T: Sync, R: Send>(min: usize, items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let parts = threads_from(min, items.len());
    if parts <= 1 {
        return items.iter().map(f).collect();
    }
    let part_len = items.len().div_ceil(parts);
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(part_len)
            .map(|part| s.spawn(|| part.iter().map(&f).collect::<Vec<R>>()))
            .collect();
        join_in_order(handles).into_iter().flatten().collect()
    })
}

/// `f` of consecutive parts of `items` (the whole slice as one part below [`PARALLEL_MIN`]),
/// each on its own thread, the results in the parts' order; `f` may change the items (e.g.
/// move out of them).
pub fn map_parts_mut<T: Send, R: Send>(
    items: &mut [T],
    f: impl Fn(&mut [T]) -> R + Sync,
) -> Vec<R> {
    let parts = threads_for(items.len());
    if parts <= 1 {
        return vec![f(items)];
    }
    let part_len = items.len().div_ceil(parts);
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks_mut(part_len)
            .map(|part| s.spawn(|| f(part)))
            .collect();
        join_in_order(handles)
    })
}

fn join_in_order<R>(handles: Vec<std::thread::ScopedJoinHandle<'_, R>>) -> Vec<R> {
    handles
        .into_iter()
        .map(|h| h.join().expect("the mapped function does not panic"))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_parallel_map_keeps_the_order_of_the_items() {
        let items: Vec<u32> = (0..3 * super::PARALLEL_MIN as u32 + 7).collect();
        let doubled = super::map(&items, |i| i * 2);
        assert_eq!(doubled, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        assert_eq!(super::map(&items[..3], |i| i + 1), vec![1, 2, 3]);
        let few: Vec<u32> = (0..300).collect();
        let on_threads = super::map_from(256, &few, |i| (*i, std::thread::current().id()));
        assert_eq!(on_threads.iter().map(|(i, _)| *i).collect::<Vec<_>>(), few);
        let main = std::thread::current().id();
        let parallel = super::cores() > 1;
        assert_eq!(on_threads.iter().any(|(_, t)| *t != main), parallel);
    }

    #[test]
    fn parallel_parts_cover_the_items_in_order_and_may_change_them() {
        let mut items: Vec<u32> = (0..3 * super::PARALLEL_MIN as u32 + 7).collect();
        let sums = super::map_parts_mut(&mut items, |part| {
            part.iter_mut().for_each(|i| *i += 1);
            part.to_vec()
        });
        assert!(sums.len() > 1 || super::threads_for(items.len()) == 1);
        let joined: Vec<u32> = sums.into_iter().flatten().collect();
        assert_eq!(joined, items);
        assert_eq!(items[0], 1);
        let mut few = vec![1u32, 2, 3];
        assert_eq!(super::map_parts_mut(&mut few, |p| p.len()), vec![3]);
    }
}
