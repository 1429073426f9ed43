//! `lb-nft`: a small "knftables in Rust": a typed nftables IR, its `nft -f` rendering, a diff
//! from the applied ruleset to the desired one, transactions, and backends that apply them
//! atomically.
//!
//! It knows nothing about Kubernetes: how Services become chains and map elements lives in
//! `lb-proxy`'s `compile` (which uses this crate as `lb_proxy::nft`). The pipeline is pure
//! until the last step:
//!
//! ```text
//! desired: Ruleset ──► diff(applied, desired) ──► Transaction ──► Backend::apply
//!                                                   │                 ├─ Fake (in memory, validates)
//!                                                   └─ to_nft() text  └─ Netlink (one atomic batch)
//! ```
//!
//! Where to start: [`ir`] for the data model, [`diff::diff`], [`Backend`]. Dependencies go one
//! way: [`ir`] ← [`transaction`] ← [`diff`], [`render`]; the backends ([`fake`], [`netlink`])
//! apply transactions and check them with [`validate`] (the fake) or while encoding (netlink).
//! Errors are typed ([`ApplyError`], and below it [`validate::CheckError`],
//! [`fake::StateError`], [`netlink::EncodeError`]); a cause is a `source`, never repeated in
//! the message.
//!
//! Test-only modules are behind features, so a daemon built without them does not carry
//! them: `testing` (fixture rulesets) and `json` (reading `nft -j list ruleset` back).
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
pub mod trace;
pub mod transaction;
pub mod validate;

#[cfg(test)]
mod tests;

pub use transaction::{Command, Transaction};

/// Why a transaction was not applied (or a read failed). Whatever the variant, nothing was
/// applied.
///
/// The message of each variant says what failed and where; the cause is its
/// [`source`](std::error::Error::source), never also part of the message, so a chain printed
/// whole (anyhow's `{:#}`, or tracing-subscriber's `error.sources`) shows it once.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A command is invalid against the ruleset as it stands at that point of the transaction
    /// (the fake's and the encoder's checks).
    #[error("command {index} `{command}` is invalid")]
    Invalid {
        /// Index of the command in the transaction.
        index: usize,
        /// The command, rendered (truncated).
        command: String,
        /// What is wrong.
        #[source]
        reason: InvalidCommand,
    },
    /// The kernel rejected a message of the batch; it rolled the whole batch back.
    #[error("kernel rejected command {index} `{command}`")]
    Kernel {
        /// Index of the command in the transaction.
        index: usize,
        /// The command, rendered (truncated).
        command: String,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// The kernel rejected the batch as a whole (e.g. permission).
    #[error("kernel rejected the batch")]
    Batch(#[source] std::io::Error),
    /// A netlink socket step failed, or the kernel answered a request outside a batch (a
    /// dump, a lookup) with an error.
    #[error("netlink {step} failed")]
    Netlink {
        /// Which step (`socket`, `sendto`, `recv`, `dump`, …).
        step: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel took only part of the batch: it would have aborted it at the cut.
    #[error("netlink sendto sent {sent} of the batch's {len} bytes")]
    ShortSend {
        /// Bytes sent.
        sent: usize,
        /// The batch's size.
        len: usize,
    },
    /// No acknowledgement came for the batch's last message (so it cannot be known to have
    /// been applied).
    #[error("no acknowledgement for the batch's last message")]
    NoAck,
    /// No reply came to a request outside a batch within its timeout.
    #[error("no reply from the kernel to netlink {step}")]
    NoReply {
        /// The request (`dump`, `get element`).
        step: &'static str,
    },
    /// Every dump of a set or of the tables was inconsistent (the ruleset kept changing, or a
    /// hash set kept being resized): see [`netlink::Netlink::dump_elements`].
    #[error("no consistent dump of {what} in {attempts} attempts")]
    InconsistentDump {
        /// What was dumped (`table ip lb set services`, `the tables`).
        what: String,
        /// Attempts made.
        attempts: u64,
    },
    /// A dumped element's key or data does not decode with the set's declared types.
    #[error("an element's {part} in {table} set {set} does not match the set's types")]
    Undecodable {
        /// The table.
        table: ir::TableId,
        /// The set.
        set: String,
        /// `key` or `data`.
        part: &'static str,
    },
    /// A request outside a batch (a dump, a lookup) could not be encoded.
    #[error("encoding a netlink {step} request")]
    Request {
        /// The request.
        step: &'static str,
        /// Why.
        #[source]
        source: netlink::EncodeError,
    },
    /// The backend cannot do this (e.g. read elements back).
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
}

/// Why a command is invalid: the reason of [`ApplyError::Invalid`].
#[derive(Debug, thiserror::Error)]
pub enum InvalidCommand {
    /// A check on the command and the ruleset (the fake's, as the kernel would refuse it).
    #[error(transparent)]
    State(#[from] fake::StateError),
    /// The netlink encoder cannot express the command.
    #[error(transparent)]
    Encode(#[from] netlink::EncodeError),
}

impl ApplyError {
    /// Whether the kernel answered `ENOENT`: the table, set or element does not exist (an
    /// element may have expired between reading and deleting it).
    pub fn is_not_found(&self) -> bool {
        match self {
            ApplyError::Kernel { source, .. }
            | ApplyError::Batch(source)
            | ApplyError::Netlink { source, .. } => source.raw_os_error() == Some(libc::ENOENT),
            ApplyError::Invalid { .. }
            | ApplyError::ShortSend { .. }
            | ApplyError::NoAck
            | ApplyError::NoReply { .. }
            | ApplyError::InconsistentDump { .. }
            | ApplyError::Undecodable { .. }
            | ApplyError::Request { .. }
            | ApplyError::Unsupported(_) => false,
        }
    }

    /// Whether the kernel answered `ENFILE` to an element: the set holds as many elements as
    /// its `size` allows ([`ir::SetSpec::size`]). Re-creating the set larger is the way out.
    pub fn is_set_full(&self) -> bool {
        match self {
            ApplyError::Kernel { source, .. } => source.raw_os_error() == Some(libc::ENFILE),
            ApplyError::Invalid {
                reason: InvalidCommand::State(fake::StateError::SetFull { .. }),
                ..
            } => true,
            _ => false,
        }
    }

    pub(crate) fn invalid(index: usize, cmd: &Command, reason: impl Into<InvalidCommand>) -> Self {
        ApplyError::Invalid {
            index,
            command: short(cmd),
            reason: reason.into(),
        }
    }
}

/// A command rendered for an error message, truncated to a readable length. Only the first
/// elements of a large element command are rendered: what fits in the length, not all of
/// them.
pub(crate) fn short(cmd: &Command) -> String {
    /// More elements than fit in 200 characters (each renders to at least 6, with its comma).
    const SHOWN: usize = 40;
    let head;
    let cmd = match cmd {
        Command::AddElements {
            table,
            set,
            elements,
        } if elements.len() > SHOWN => {
            head = Command::AddElements {
                table: table.clone(),
                set: set.clone(),
                elements: elements[..SHOWN].to_vec(),
            };
            &head
        }
        Command::DeleteElements { table, set, keys } if keys.len() > SHOWN => {
            head = Command::DeleteElements {
                table: table.clone(),
                set: set.clone(),
                keys: keys[..SHOWN].to_vec(),
            };
            &head
        }
        _ => cmd,
    };
    let mut s = render::command(cmd);
    if s.len() > 200 {
        let mut end = 200;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
        // Rendered with its first elements, kept for every command of a streamed batch.
        s.shrink_to_fit();
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

/// Where the pieces of a transaction given in pieces go ([`Backend::apply_streamed`]).
pub type Sink<'a> = dyn FnMut(Transaction) -> Result<(), ApplyError> + 'a;

/// Applies transactions. Contract: `apply` is atomic (all commands or none) and, on success,
/// the target holds the previous state with the transaction applied.
pub trait Backend {
    /// Applies `tx` atomically.
    fn apply(&mut self, tx: &Transaction) -> Result<(), ApplyError>;

    /// Applies atomically, as one transaction, the pieces `produce` hands to the sink it is
    /// given, in order. A backend may encode each piece as it comes and free it, so that the
    /// whole transaction is never held at once (a full sync of a large cluster); the default
    /// collects the pieces and calls [`Backend::apply`]. When `produce` or the sink fails,
    /// nothing is applied.
    fn apply_streamed(
        &mut self,
        produce: &mut dyn FnMut(&mut Sink<'_>) -> Result<(), ApplyError>,
    ) -> Result<(), ApplyError> {
        let mut tx = Transaction::new();
        produce(&mut |mut piece: Transaction| {
            tx.commands.append(&mut piece.commands);
            Ok(())
        })?;
        self.apply(&tx)
    }

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
