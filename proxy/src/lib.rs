//! `lb-proxy` library: the node daemon's building blocks.
//!
//! - [`nft`]: a small "knftables in Rust": typed nftables IR, `nft -f` rendering, diff,
//!   transactions, and backends (in-memory fake, netlink).

pub mod cli;
pub mod coexist;
pub mod compile;
pub mod config;
pub mod conntrack;
pub mod convert;
pub mod daemon;
pub mod explain;
pub mod health;
pub mod manifests;
pub mod metrics;
pub mod nft;
pub mod process;
pub mod store;
pub mod sync;
