//! A small "knftables in Rust": a typed nftables IR, its `nft -f` rendering, a diff from the
//! applied ruleset to the desired one, transactions, and backends that apply them atomically.
//!
//! It knows nothing about Kubernetes: how Services become chains and map elements lives in
//! `compile`. The pipeline is pure until the last step:
//!
//! ```text
//! desired: Ruleset ──► diff(applied, desired) ──► Transaction ──► Backend::apply
//!                                                   │                 ├─ Fake (in memory, validates)
//!                                                   └─ to_nft() text  └─ Netlink (one atomic batch)
//! ```
//!
//! Where to start: [`ir`] for the data model, [`diff::diff`], [`Backend`].
//!
//! ```
//! use lb_nft::{ir::*, diff::diff, fake::Fake, Backend};
//! let mut desired = Ruleset::default();
//! let t = desired.tables.entry(TableId::new(Family::Ip, "lb")).or_default();
//! t.sets.insert("ports".into(), Set::new(SetSpec::set(vec![DataType::InetService])));
//! let tx = diff(&Ruleset::default(), &desired);
//! assert!(tx.to_nft().contains("add set ip lb ports { type inet_service; }"));
//! let mut fake = Fake::default();
//! fake.apply(&tx).expect("valid transaction");
//! assert_eq!(fake.ruleset, desired);
//! ```

pub mod diff;
pub mod fake;
pub mod ir;
#[cfg(any(test, feature = "json"))]
pub mod json;
pub mod netlink;
pub mod render;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod transaction;
pub mod validate;

#[cfg(test)]
mod tests;

pub use transaction::{Command, Transaction};

/// Why a transaction was not applied. Whatever the variant, nothing was applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A command is invalid against the ruleset as it stands at that point of the transaction
    /// (the fake's and the encoder's checks).
    #[error("command {index} `{command}` is invalid: {reason}")]
    Invalid {
        /// Index of the command in the transaction.
        index: usize,
        /// The command, rendered (truncated).
        command: String,
        /// What is wrong.
        reason: String,
    },
    /// The kernel rejected a message of the batch; it rolled the whole batch back.
    #[error("kernel rejected command {index} `{command}`: {source}")]
    Kernel {
        /// Index of the command in the transaction (`None`: the batch itself).
        index: usize,
        /// The command, rendered (truncated).
        command: String,
        /// The errno.
        source: std::io::Error,
    },
    /// The kernel rejected the batch as a whole (e.g. permission).
    #[error("kernel rejected the batch: {0}")]
    Batch(std::io::Error),
    /// A netlink socket step failed.
    #[error("netlink {step} failed: {source}")]
    Netlink {
        /// Which step (`socket`, `sendmsg`, `recv`, …).
        step: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The backend cannot do this (e.g. read elements back).
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
}

impl ApplyError {
    /// Whether the kernel answered `ENOENT`: the table, set or element does not exist (an
    /// element may have expired between reading and deleting it).
    pub fn is_not_found(&self) -> bool {
        match self {
            ApplyError::Kernel { source, .. }
            | ApplyError::Batch(source)
            | ApplyError::Netlink { source, .. } => source.raw_os_error() == Some(libc::ENOENT),
            ApplyError::Invalid { .. } | ApplyError::Unsupported(_) => false,
        }
    }

    pub(crate) fn invalid(index: usize, cmd: &Command, reason: impl Into<String>) -> Self {
        ApplyError::Invalid {
            index,
            command: short(cmd),
            reason: reason.into(),
        }
    }
}

/// A command rendered for an error message, truncated to a readable length.
pub(crate) fn short(cmd: &Command) -> String {
    let mut s = render::command(cmd);
    if s.len() > 200 {
        let mut end = 200;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// One element of a set or map as read back from the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedElement {
    /// The key.
    pub key: ir::Key,
    /// A data map's values (`None` in a set; verdicts are not read back).
    pub data: Option<Vec<ir::Value>>,
    /// The element's counter, in a set with the `counter` flag.
    pub counter: Option<ElementCounter>,
}

/// What an element's counter has counted since the element was added.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ElementCounter {
    /// Packets.
    pub packets: u64,
    /// Bytes (of whole packets at the hook that counted them).
    pub bytes: u64,
}

/// Applies transactions. Contract: `apply` is atomic (all commands or none) and, on success,
/// the target holds the previous state with the transaction applied.
pub trait Backend {
    /// Applies `tx` atomically.
    fn apply(&mut self, tx: &Transaction) -> Result<(), ApplyError>;

    /// The elements `set` (declared as `spec`) holds now, including those the data path added
    /// (dynamic sets). Interval sets are not supported. A missing table or set is an error
    /// for which [`ApplyError::is_not_found`] holds.
    fn list_elements(
        &mut self,
        table: &ir::TableId,
        set: &str,
        spec: &ir::SetSpec,
    ) -> Result<Vec<ListedElement>, ApplyError> {
        let _ = (table, set, spec);
        Err(ApplyError::Unsupported("listing set elements"))
    }
}
