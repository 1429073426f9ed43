//! `lb-proxy` library: the node daemon's building blocks.
//!
//! - [`nft`]: the crate `lb-nft`, a small "knftables in Rust": typed nftables IR, `nft -f`
//!   rendering, diff, transactions, and backends (in-memory fake, netlink).

pub mod cli;
pub mod coexist;
pub mod compile;
pub mod config;
pub mod conntrack;
pub mod daemon;
pub mod explain;
pub mod health;
pub mod manifests;
pub mod metrics;
pub mod process;
pub mod sync;

// Conversion and the store live in the Apache-2.0 crate `lb-k8s` (no netlink, no tokio), so
// embedders get them without the daemon; re-exported here so `lb_proxy::convert` and
// `lb_proxy::store` keep working.
pub use lb_k8s::{convert, store};

// The nftables layer is the crate `lb-nft` (it knows nothing of Kubernetes); re-exported as
// `nft` so that `crate::nft::…` and `lb_proxy::nft::…` keep working.
pub use lb_nft as nft;
