//! A transaction: an ordered list of commands applied atomically (all or nothing).
//!
//! This module only holds the data. Transactions are built by [`super::diff`] (which also
//! provides [`Transaction::create`], the diff from nothing), rendered by [`super::render`] and
//! applied by a [`super::Backend`]; it depends on none of them.

use super::ir::{ChainSpec, Element, Key, Rule, SetSpec, TableId};

/// One command of a transaction (verb + object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `add table` (idempotent when the table exists with the same comment).
    AddTable {
        /// Table.
        table: TableId,
        /// Comment.
        comment: Option<String>,
    },
    /// `delete table` (with everything in it).
    DeleteTable {
        /// Table.
        table: TableId,
    },
    /// `add chain` (idempotent when the chain exists with the same spec).
    AddChain {
        /// Table.
        table: TableId,
        /// Chain name.
        chain: String,
        /// Properties.
        spec: ChainSpec,
    },
    /// `flush chain`: delete all its rules.
    FlushChain {
        /// Table.
        table: TableId,
        /// Chain name.
        chain: String,
    },
    /// `delete chain` (must be empty and unreferenced).
    DeleteChain {
        /// Table.
        table: TableId,
        /// Chain name.
        chain: String,
    },
    /// `add set|map` (idempotent when it exists with the same spec).
    AddSet {
        /// Table.
        table: TableId,
        /// Set name.
        set: String,
        /// Properties.
        spec: SetSpec,
    },
    /// `flush set|map`: delete all elements.
    FlushSet {
        /// Table.
        table: TableId,
        /// Set name.
        set: String,
        /// Whether it is a map (nft's `flush map` / `delete map` keyword).
        map: bool,
    },
    /// `delete set|map` (must be unreferenced by rules).
    DeleteSet {
        /// Table.
        table: TableId,
        /// Set name.
        set: String,
        /// Whether it is a map (nft's `flush map` / `delete map` keyword).
        map: bool,
    },
    /// `create element`: fails if any key already exists.
    AddElements {
        /// Table.
        table: TableId,
        /// Set name.
        set: String,
        /// Elements (key, payload), never empty.
        elements: Vec<(Key, Element)>,
    },
    /// `delete element`: fails if any key does not exist.
    DeleteElements {
        /// Table.
        table: TableId,
        /// Set name.
        set: String,
        /// Keys, never empty.
        keys: Vec<Key>,
    },
    /// `add rule`: append to the chain.
    AddRule {
        /// Table.
        table: TableId,
        /// Chain name.
        chain: String,
        /// Rule.
        rule: Rule,
    },
}

impl Command {
    /// The table the command acts on.
    pub fn table(&self) -> &TableId {
        match self {
            Command::AddTable { table, .. }
            | Command::DeleteTable { table }
            | Command::AddChain { table, .. }
            | Command::FlushChain { table, .. }
            | Command::DeleteChain { table, .. }
            | Command::AddSet { table, .. }
            | Command::FlushSet { table, .. }
            | Command::DeleteSet { table, .. }
            | Command::AddElements { table, .. }
            | Command::DeleteElements { table, .. }
            | Command::AddRule { table, .. } => table,
        }
    }
}

/// An ordered list of commands, applied atomically by a [`super::Backend`]. Built by hand, by
/// [`super::diff::diff`] or by [`Transaction::create`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transaction {
    /// Commands in order.
    pub commands: Vec<Command>,
}

impl Transaction {
    /// An empty transaction.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// Appends a command.
    pub fn push(&mut self, c: Command) {
        self.commands.push(c);
    }

    /// Number of elements added or deleted (a measure of the transaction's size).
    pub fn element_count(&self) -> usize {
        self.commands
            .iter()
            .map(|c| match c {
                Command::AddElements { elements, .. } => elements.len(),
                Command::DeleteElements { keys, .. } => keys.len(),
                _ => 0,
            })
            .sum()
    }
}
