//! `lb-proxy` library: the node daemon's building blocks.
//!
//! ```text
//! source::api | source::files ─► reconcile::Input ─► reconcile (Store::apply, Dataplane::sync, hooks)
//! ```
//!
//! - [`source`]: where objects come from (the API server's watchers, manifest files), both
//!   producing the same store events.
//! - [`reconcile`]: the one loop for `run` and `daemon`, on its own thread: coalescing,
//!   backoff, full resyncs, post-sync hooks, health, live queries.
//! - [`sync`]: the dataplane (compile, diff, apply); [`compile`]: Services → nftables IR.
//! - [`nft`]: the crate `lb-nft`, a small "knftables in Rust": typed nftables IR, `nft -f`
//!   rendering, diff, transactions, a packet tracer, and backends (in-memory fake, netlink).
//! - [`cli`] parses and dispatches to [`commands`] (`render`, `run`, `explain`, `cleanup`) and
//!   [`daemon`] (start-up and wiring).

pub mod cli;
pub mod coexist;
pub mod commands;
pub mod compile;
pub mod config;
pub mod conntrack;
pub mod daemon;
pub mod explain;
pub mod health;
pub mod manifests;
pub mod memory;
pub mod metrics;
pub mod par;
pub mod process;
pub mod reconcile;
pub mod source;
pub mod sync;

// Conversion and the store live in the Apache-2.0 crate `lb-k8s` (no netlink, no tokio), so
// embedders get them without the daemon; re-exported here so `lb_proxy::convert` and
// `lb_proxy::store` keep working.
pub use lb_k8s::{convert, store};

// The nftables layer is the crate `lb-nft` (it knows nothing of Kubernetes); re-exported as
// `nft` so that `crate::nft::…` and `lb_proxy::nft::…` keep working.
pub use lb_nft as nft;

/// An error and its sources joined by `: `, as anyhow's `{:#}` prints them. Library errors
/// (`nft::ApplyError`, …) keep their cause as a source only, so a log field `%e` alone would
/// drop it; log `error = %lb_proxy::error_chain(&e)` instead.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(e), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_chain_shows_a_kernel_rejection_and_its_errno_once() {
        let e = crate::nft::ApplyError::Kernel {
            index: 2,
            command: "delete table ip lb".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        let text = super::error_chain(&e);
        let errno = std::io::Error::from_raw_os_error(libc::ENOENT).to_string();
        assert!(
            text.starts_with("kernel rejected command 2 `delete table ip lb`: "),
            "{text}"
        );
        assert_eq!(text.matches(&errno).count(), 1, "{text}");
    }
}
