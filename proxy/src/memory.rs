//! Giving freed memory back to the kernel at the moments a large part of the heap has just
//! been freed (the objects read from manifests, once converted), instead of a few seconds
//! later.
//!
//! The binary allocates with jemalloc (`main.rs`), which keeps freed pages for reuse and
//! returns them over about ten seconds (its `dirty_decay_ms`). Freed pages are reused only by
//! the arena that freed them, and jemalloc gives each new thread its own arena: memory freed by
//! the threads that parsed the manifests is not reused by the reconciler's thread, so the peak
//! is the sum of both (issue 13: `run --once` peak RSS). Setting an arena's decay time to zero
//! makes jemalloc purge its unused pages at once; the time is then set back, so later frees
//! are not paid for one by one.

use tikv_jemalloc_ctl::{Access as _, AsName as _, arenas};

/// jemalloc's default decay time, milliseconds (set back after the purge).
const DECAY_MS: isize = 10_000;

/// Returns the pages every jemalloc arena holds unused to the kernel. Without jemalloc as the
/// global allocator (unit tests), it purges jemalloc's own unused arenas: nothing.
pub fn release_freed() {
    let Ok(n) = arenas::narenas::read() else {
        return;
    };
    for i in 0..n {
        for kind in ["dirty", "muzzy"] {
            let name = format!("arena.{i}.{kind}_decay_ms\0");
            let key = name.as_bytes().name();
            // An arena not yet created refuses the write: nothing to purge there.
            if key.write(0isize).is_ok() {
                let _ = key.write(DECAY_MS);
            }
        }
    }
}
