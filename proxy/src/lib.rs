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
//! - [`nft`]: a small "knftables in Rust": typed nftables IR, `nft -f` rendering, diff,
//!   transactions, and backends (in-memory fake, netlink).
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
pub mod metrics;
pub mod nft;
pub mod process;
pub mod reconcile;
pub mod source;
pub mod sync;

// Conversion and the store live in the Apache-2.0 crate `lb-k8s` (no netlink, no tokio), so
// embedders get them without the daemon; re-exported here so `lb_proxy::convert` and
// `lb_proxy::store` keep working.
pub use lb_k8s::{convert, store};
