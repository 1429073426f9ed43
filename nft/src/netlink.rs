//! The netlink backend: every transaction is ONE nfnetlink batch (begin … end) sent with one
//! `sendto`, so the kernel applies it atomically or not at all.
//!
//! Built on the `nftnl` crate (the batch, tables and chains to delete, rules) and the `mnl`
//! crate (the socket, and [`mnl::cb_run`] to tell acknowledgements from errors); what they
//! lack (sets of every shape, elements, expressions without a type in `nftnl`, comments on
//! tables and chains, parsing dumped elements) is in [`sys`], on `nftnl-sys`.
//!
//! - Elements are packed many per `NEWSETELEM` message (never zero), each message kept well
//!   under the 64 KiB netlink attribute limit.
//! - The batch is written into one buffer sized for it (an `nftnl` batch page as large as the
//!   estimate; a batch that outgrows it is joined into one buffer), and sent in one piece: a
//!   batch split over several sends would be aborted by the kernel at the first one's end.
//! - The socket buffers are sized for the batch (`SO_SNDBUFFORCE`, falling back to
//!   `SO_SNDBUF`; `SO_RCVBUFFORCE` for the replies, one per message in the worst case).
//! - Every message asks for an acknowledgement (as `nftnl`'s own objects do); the kernel
//!   answers each with an ACK or an error carrying its sequence number, which maps back to
//!   the command. Any error means the kernel rolled the whole batch back.
//!
//! Expressions supported: payload (ip/ip6 saddr/daddr, th/tcp/udp sport/dport), meta
//! (l4proto, mark, iifname, oifname; mark set), ct (state, status, original ip/ip6
//! saddr/daddr, original proto-dst), fib (saddr/daddr type), cmp, bitwise (prefixes, mark
//! bits), lookup (sets, verdict maps, data maps), numgen random, nat dnat, masq, reject,
//! counter, immediate verdicts, dynset.
//!
//! Interval sets come in two kernel shapes, chosen by the key (see [`encode::elem_descs`]):
//! a single address field is an rbtree set whose prefixes are start and end elements; a
//! concatenation ending with an address (`addr . inet_proto . inet_service . addr`) is a
//! pipapo set (`NFT_SET_INTERVAL | NFT_SET_CONCAT`, field lengths in `NFTA_SET_DESC`) whose
//! elements carry `KEY` (first values) and `KEY_END` (last values). One difference from nft
//! 1.0.6 on purpose: for a lookup into such a set nft also emits `byteorder hton(size 2,
//! len 1)` after `meta l4proto`, which converts nothing (the kernel converts `len / size`
//! = 0 units, and a proposed kernel change refuses `len != size`); we leave it out, and nft
//! lists both rules the same.
//!
//! Reading back: [`Netlink::dump_elements`] (a dump checked for consistency: a hash set
//! being resized dumps inconsistently, which is how a listing right after a 100k-element
//! apply once showed 98,410 elements) and [`Netlink::missing_elements`] (lookups by key).

pub mod encode;
mod sys;

use std::io;
use std::path::Path;

use nftnl::{MsgType, NlMsg, ProtoFamily};

use self::encode::{ElemDesc, nfproto};
use self::sys::{AlignedBuf, ChainMsg, ElemsMsg, SetMsg, TableMsg};
use super::ir::{Family, Key, MapData, SetSpec, TableId};
use super::transaction::{Command, Transaction};
use super::{ApplyError, Backend, ElementCounter, ListedElement, short};

/// Estimated bytes of elements per message the batch packs (the attribute nest limit is
/// 64 KiB; [`ElemsMsg`] itself refuses more than [`MAX_ELEMS_BYTES`]).
pub const ELEMS_PER_MSG_BYTES: usize = 32 * 1024;

pub use self::sys::MAX_ELEMS_BYTES;

/// Why a command (or a request) cannot be encoded as netlink messages. The object is named;
/// the command is named by the [`ApplyError::Invalid`] that carries this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A name or string with a NUL byte (C strings end there).
    #[error("NUL byte in {what} {value:?}")]
    Nul {
        /// What the string is (`table name`, `rule comment`, …).
        what: &'static str,
        /// The string.
        value: String,
    },
    /// libnftnl could not allocate an object.
    #[error("libnftnl could not allocate a {object}")]
    Alloc {
        /// The libnftnl type.
        object: &'static str,
    },
    /// libnftnl does not know an expression (it is older than required).
    #[error("libnftnl has no expression {name}")]
    Expression {
        /// The expression's name.
        name: &'static str,
    },
    /// An interval concatenation libnftnl cannot describe (at most 15 fields, none empty).
    #[error("set {set}: interval concatenation of {fields} fields is not encodable")]
    Concat {
        /// The set.
        set: String,
        /// Its number of fields.
        fields: usize,
    },
    /// An element command without elements (the kernel would read it as a flush).
    #[error("empty element list for {set}")]
    NoElements {
        /// The set.
        set: String,
    },
    /// An element list too large for one message ([`ElemsMsg`] checks its own bound).
    #[error(
        "{elements} elements of {set} ({bytes} bytes) exceed one netlink message's {limit} bytes"
    )]
    ElementsTooLarge {
        /// The set.
        set: String,
        /// Elements in the list.
        elements: usize,
        /// Their size bound.
        bytes: usize,
        /// The message's limit ([`MAX_ELEMS_BYTES`]).
        limit: usize,
    },
    /// A rule comment libnftnl refuses (`nftnl`'s reason, a fixed text).
    #[error("rule comment {comment:?}: {reason}")]
    RuleComment {
        /// The comment.
        comment: String,
        /// Why.
        reason: &'static str,
    },
}

/// The receive buffer: larger than any datagram the kernel sends us.
const RECV_BYTES: usize = 256 * 1024;

/// Moves the calling thread into a network namespace given by path (e.g.
/// `/run/netns/NAME`). Open the [`Netlink`] backend afterwards, from the same thread.
pub fn enter_netns(path: &Path) -> io::Result<()> {
    let f = std::fs::File::open(path)?;
    sys::enter_netns(&f)
}

/// The netlink backend.
#[derive(Debug)]
pub struct Netlink {
    sock: sys::Socket,
    /// Sequence numbers of requests outside batches (dumps, lookups). Batches number their
    /// messages from 1 (`nftnl::Batch`); these start in the upper half, so that a late reply
    /// to one can never pass for the other.
    seq: u32,
    rbuf: AlignedBuf,
    /// The batch's page size, if not estimated from the transaction.
    page_size: Option<u32>,
}

impl Netlink {
    /// Opens a netfilter netlink socket in the calling thread's network namespace.
    pub fn new() -> Result<Self, ApplyError> {
        let sock = sys::Socket::open().map_err(|e| ApplyError::Netlink {
            step: "socket",
            source: e,
        })?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32);
        Ok(Self {
            sock,
            seq: seed | 0x8000_0000,
            rbuf: AlignedBuf::with_len(RECV_BYTES),
            page_size: None,
        })
    }

    /// Builds batches in pages of `bytes` instead of one page as large as the transaction's
    /// estimate (for tests: a batch that spans pages is still sent whole).
    pub fn with_batch_page_size(mut self, bytes: u32) -> Self {
        self.page_size = Some(bytes.max(4096));
        self
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1) | 0x8000_0000;
        self.seq
    }

    /// Discards replies left over from an earlier request that failed half-way.
    fn drain(&mut self) -> Result<(), ApplyError> {
        while self.sock.recv(&mut self.rbuf, 0).map_err(nl("recv"))? > 0 {}
        Ok(())
    }
}

fn nl(step: &'static str) -> impl Fn(io::Error) -> ApplyError {
    move |source| ApplyError::Netlink { step, source }
}

fn proto_family(f: Family) -> ProtoFamily {
    match f {
        Family::Ip => ProtoFamily::Ipv4,
        Family::Ip6 => ProtoFamily::Ipv6,
        Family::Inet => ProtoFamily::Inet,
    }
}

/// The batch being built, and which command each sequence number belongs to.
struct Batch {
    batch: nftnl::Batch,
    /// `(sequence number, command index)`, ascending.
    owners: Vec<(u32, usize)>,
    set_ids: u32,
}

impl Batch {
    /// Adds one message for command `cmd`, noting its sequence number.
    fn add(&mut self, cmd: usize, msg: &impl NlMsg, ty: MsgType) {
        let seq = std::cell::Cell::new(0);
        self.batch.add(&sys::Noted { msg, seq: &seq }, ty);
        self.owners.push((seq.get(), cmd));
    }
}

fn encode_command(b: &mut Batch, i: usize, c: &Command) -> Result<(), EncodeError> {
    let id = c.table();
    let fam = nfproto(id.family);
    let tname = id.name.as_str();
    // nftnl's objects, for the commands they express fully.
    let table =
        || sys::cstr("table name", tname).map(|n| nftnl::Table::new(n, proto_family(id.family)));
    match c {
        Command::AddTable { comment, .. } => {
            let ud = encode::comment_udata(comment);
            b.add(i, &TableMsg::new(fam, tname, ud.as_deref())?, MsgType::Add);
        }
        Command::DeleteTable { .. } => b.add(i, &table()?, MsgType::Del),
        Command::AddChain { chain, spec, .. } => {
            let base = spec.base.map(|x| {
                (
                    encode::hooknum(x.hook),
                    x.priority,
                    x.kind.as_str(),
                    encode::policy(x.policy),
                )
            });
            let ud = encode::comment_udata(&spec.comment);
            let msg = ChainMsg::new(fam, tname, chain, base, ud.as_deref())?;
            b.add(i, &msg, MsgType::Add);
        }
        Command::FlushChain { chain, .. } => {
            // DELRULE naming only the chain: every rule of it.
            let t = table()?;
            let ch = nftnl::Chain::new(sys::cstr("chain name", chain)?, &t);
            b.add(i, &nftnl::Rule::new(&ch), MsgType::Del);
        }
        Command::DeleteChain { chain, .. } => {
            let t = table()?;
            let ch = nftnl::Chain::new(sys::cstr("chain name", chain)?, &t);
            b.add(i, &ch, MsgType::Del);
        }
        Command::AddSet { set, spec, .. } => {
            b.set_ids += 1;
            let d = encode::set_desc(spec);
            let msg = SetMsg::new(fam, tname, set, b.set_ids, &d)?;
            b.add(i, &msg, MsgType::Add);
        }
        Command::FlushSet { set, .. } => {
            // DELSETELEM without elements: every element.
            b.add(i, &ElemsMsg::new(fam, tname, set, &[])?, MsgType::Del);
        }
        Command::DeleteSet { set, .. } => {
            b.add(i, &SetMsg::delete(fam, tname, set)?, MsgType::Del);
        }
        Command::AddElements { set, elements, .. } => {
            if elements.is_empty() {
                return Err(EncodeError::NoElements { set: set.clone() });
            }
            let groups = elements.iter().map(|(k, e)| encode::elem_descs(k, e));
            pack_elems(groups, |chunk| {
                b.add(i, &ElemsMsg::new(fam, tname, set, chunk)?, MsgType::Add);
                Ok(())
            })?;
        }
        Command::DeleteElements { set, keys, .. } => {
            if keys.is_empty() {
                return Err(EncodeError::NoElements { set: set.clone() });
            }
            let groups = keys.iter().map(|k| encode::elem_key_descs(k));
            pack_elems(groups, |chunk| {
                b.add(i, &ElemsMsg::new(fam, tname, set, chunk)?, MsgType::Del);
                Ok(())
            })?;
        }
        Command::AddRule { chain, rule, .. } => {
            let insns = encode::rule_insns(id.family, rule);
            let t = table()?;
            let ch = nftnl::Chain::new(sys::cstr("chain name", chain)?, &t);
            let r = sys::rule(&ch, &insns, rule.comment.as_deref())?;
            b.add(i, &r, MsgType::Add);
        }
    }
    Ok(())
}

/// Packs element groups (an element and, for an interval, its end) into chunks of about
/// [`ELEMS_PER_MSG_BYTES`], never splitting a group, and hands each non-empty chunk to
/// `emit`.
fn pack_elems(
    groups: impl Iterator<Item = Vec<ElemDesc>>,
    mut emit: impl FnMut(&[ElemDesc]) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let mut chunk: Vec<ElemDesc> = Vec::new();
    let mut size = 0;
    for g in groups {
        let gsize: usize = g.iter().map(ElemDesc::size_bound).sum();
        if !chunk.is_empty() && size + gsize > ELEMS_PER_MSG_BYTES {
            emit(&chunk)?;
            chunk.clear();
            size = 0;
        }
        size += gsize;
        chunk.extend(g);
    }
    if !chunk.is_empty() {
        emit(&chunk)?;
    }
    Ok(())
}

/// A generous estimate of the batch's size, for its buffer (only what is written is touched,
/// so too much costs address space, not memory).
fn estimated_bytes(tx: &Transaction) -> usize {
    tx.commands
        .iter()
        .map(|c| match c {
            Command::AddElements { elements, .. } => 2048 + elements.len() * 256,
            Command::DeleteElements { keys, .. } => 2048 + keys.len() * 256,
            _ => 2048,
        })
        .sum()
}

/// The page of a batch given in pieces, whose size is not known in advance (only what is
/// written is touched: 64 MiB holds a 50,000-Service full sync in one page).
const STREAMED_PAGE_BYTES: u32 = 64 << 20;

/// A batch being encoded: the messages, the number of commands, and, for a batch given in
/// pieces (which no longer holds its commands when the kernel answers), each command's
/// rendering for error messages.
struct Encoder {
    b: Batch,
    commands: usize,
    shorts: Option<Vec<String>>,
}

impl Encoder {
    /// `keep_shorts`: whether to keep each command's rendering.
    fn new(page: u32, keep_shorts: bool) -> Self {
        Encoder {
            b: Batch {
                batch: nftnl::Batch::with_page_size(page),
                owners: Vec::new(),
                set_ids: 0,
            },
            commands: 0,
            shorts: keep_shorts.then(Vec::new),
        }
    }

    fn push(&mut self, c: &Command) -> Result<(), ApplyError> {
        let i = self.commands;
        encode_command(&mut self.b, i, c).map_err(|r| ApplyError::invalid(i, c, r))?;
        if let Some(shorts) = &mut self.shorts {
            shorts.push(short(c));
        }
        self.commands += 1;
        Ok(())
    }
}

impl Backend for Netlink {
    fn apply(&mut self, tx: &Transaction) -> Result<(), ApplyError> {
        if tx.is_empty() {
            return Ok(());
        }
        let page = self.page_size.unwrap_or_else(|| {
            let bytes = estimated_bytes(tx).clamp(
                nftnl::default_batch_page_size() as usize,
                1 << 30, // nftnl's page size is a u32 (with a page of room on top)
            );
            bytes as u32
        });
        let mut e = Encoder::new(page, false);
        for c in &tx.commands {
            e.push(c)?;
        }
        self.send(e, &|i| short(&tx.commands[i]))
    }

    /// Encodes each piece as it comes and frees it: the kernel gets one batch, and only the
    /// encoded batch is held whole.
    fn apply_streamed(
        &mut self,
        produce: &mut dyn FnMut(&mut super::Sink<'_>) -> Result<(), ApplyError>,
    ) -> Result<(), ApplyError> {
        let mut e = Encoder::new(self.page_size.unwrap_or(STREAMED_PAGE_BYTES), true);
        produce(&mut |piece: Transaction| {
            for c in &piece.commands {
                e.push(c)?;
            }
            Ok(())
        })?;
        if e.commands == 0 {
            return Ok(());
        }
        let shorts = e.shorts.take().unwrap_or_default();
        self.send(e, &|i| shorts.get(i).cloned().unwrap_or_default())
    }
    /// A consistent dump ([`Netlink::dump_elements`]) decoded with the set's types.
    fn list_elements(
        &mut self,
        table: &TableId,
        set: &str,
        spec: &SetSpec,
    ) -> Result<Vec<ListedElement>, ApplyError> {
        if spec.flags.interval {
            return Err(ApplyError::Unsupported("listing interval sets"));
        }
        let key_types = spec.key.types();
        let data_types = match &spec.data {
            Some(MapData::Values(d)) => Some(d.types()),
            Some(MapData::Verdict) | None => None,
        };
        let undecodable = |part: &'static str| ApplyError::Undecodable {
            table: table.clone(),
            set: set.to_owned(),
            part,
        };
        self.dump_elements(table, set)?
            .into_iter()
            .map(|d| {
                let key = encode::tuple_from_bytes(&key_types, &d.key)
                    .ok_or_else(|| undecodable("key"))?;
                let data = match (&data_types, &d.data) {
                    (Some(types), Some(bytes)) => Some(
                        encode::tuple_from_bytes(types, bytes)
                            .ok_or_else(|| undecodable("data"))?,
                    ),
                    _ => None,
                };
                Ok(ListedElement {
                    key,
                    data,
                    counter: d.counter,
                })
            })
            .collect()
    }
}

impl Netlink {
    /// Sends an encoded batch and reads the kernel's answers: the first error, with the
    /// command it belongs to (`describe`: the rendering of command `i`).
    fn send(&mut self, e: Encoder, describe: &dyn Fn(usize) -> String) -> Result<(), ApplyError> {
        let Encoder { b, .. } = e;
        let Batch { batch, owners, .. } = b;
        let batch = batch.finalize();
        let seqs = batch.sequence_numbers();
        let pages: Vec<&[u8]> = batch.iter().collect();
        let joined;
        let bytes: &[u8] = match pages.as_slice() {
            [one] => one,
            more => {
                joined = more.concat();
                &joined
            }
        };

        self.drain()?;
        self.sock
            .set_sndbuf(bytes.len() + 64 * 1024)
            .map_err(nl("setsockopt(SO_SNDBUF)"))?;
        // Worst case every message fails: room for one small reply skb per message.
        let rcv = ((owners.len() + 2) * 1024).clamp(1 << 20, 256 << 20);
        self.sock
            .set_rcvbuf(rcv)
            .map_err(nl("setsockopt(SO_RCVBUF)"))?;
        let sent = self.sock.mnl().send(bytes).map_err(nl("sendto"))?;
        if sent != bytes.len() {
            return Err(ApplyError::ShortSend {
                sent,
                len: bytes.len(),
            });
        }

        // The kernel handles the batch inside the send, so every reply is queued by now.
        let portid = self.sock.mnl().portid();
        let mut first_err: Option<(u32, i32)> = None;
        let mut acked = std::collections::HashSet::new();
        loop {
            let n = self.sock.recv(&mut self.rbuf, 0).map_err(nl("recv"))?;
            if n == 0 {
                break;
            }
            for msg in mnl::NlMessages::new(&self.rbuf.bytes_mut()[..n]) {
                let msg = msg.map_err(nl("recv"))?;
                let Some(seq) = sys::header(msg).map(|h| h.nlmsg_seq) else {
                    continue;
                };
                if !seqs.contains(&seq) {
                    continue; // not ours (a late reply to an earlier request)
                }
                match mnl::cb_run(msg, seq, portid) {
                    Ok(mnl::CbResult::Stop) => {
                        acked.insert(seq);
                    }
                    Ok(mnl::CbResult::Ok) => {}
                    Err(e) => {
                        let errno = e.raw_os_error().unwrap_or(libc::EIO);
                        if first_err.is_none_or(|(s, _)| seq < s) {
                            first_err = Some((seq, errno));
                        }
                    }
                }
            }
        }
        if let Some((seq, errno)) = first_err {
            let source = io::Error::from_raw_os_error(errno);
            let owner = owners
                .binary_search_by_key(&seq, |&(s, _)| s)
                .ok()
                .map(|k| owners[k].1);
            return Err(match owner {
                Some(i) => ApplyError::Kernel {
                    index: i,
                    command: describe(i),
                    source,
                },
                None => ApplyError::Batch(source),
            });
        }
        let last = owners.last().map(|&(s, _)| s);
        if !last.is_some_and(|s| acked.contains(&s)) {
            return Err(ApplyError::NoAck);
        }
        Ok(())
    }
}

/// The family's netfilter number (re-exported for tests of raw encodings).
pub fn family_number(f: Family) -> u16 {
    nfproto(f)
}

/// One element as a kernel dump shows it: raw key bytes (an interval concatenation's range
/// end in `key_end`) and `NFT_SET_ELEM_*` flags (`1`: an interval's end).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DumpedElement {
    /// `NFTA_SET_ELEM_KEY`.
    pub key: Vec<u8>,
    /// `NFTA_SET_ELEM_KEY_END`.
    pub key_end: Option<Vec<u8>>,
    /// `NFTA_SET_ELEM_FLAGS`.
    pub flags: u32,
    /// `NFTA_SET_ELEM_DATA`'s value (a data map's element).
    pub data: Option<Vec<u8>>,
    /// The element's `counter` expression (`NFTA_SET_ELEM_EXPR` or one of
    /// `NFTA_SET_ELEM_EXPRESSIONS`).
    pub counter: Option<ElementCounter>,
}

/// The elements of one set as one netlink dump returned them.
#[derive(Debug, Clone, Default)]
struct ElementDump {
    /// Elements in dump order (repeats kept: see [`Netlink::dump_elements`]).
    elements: Vec<DumpedElement>,
    /// A part of the dump was flagged `NLM_F_DUMP_INTR`: the ruleset changed while it ran.
    interrupted: bool,
}

const NLM_F_DUMP_INTR: u16 = libc::NLM_F_DUMP_INTR as u16;

/// Data messages of a reply, as [`Netlink::replies`] hands them over.
#[derive(Debug, Default)]
struct Parsed {
    /// Elements parsed (when asked for).
    elements: Vec<DumpedElement>,
    /// Tables parsed, as (family number, name) (when asked for).
    tables: Vec<(u32, String)>,
    /// Data messages seen.
    messages: usize,
    /// The first message libnftnl could not parse.
    error: Option<io::Error>,
}

/// [`mnl::cb_run2`] callback: counts a data message.
fn count_message(_: &libc::nlmsghdr, p: &mut Parsed) -> libc::c_int {
    p.messages += 1;
    mnl::mnl_sys::MNL_CB_OK
}

/// [`mnl::cb_run2`] callback: the elements of a `NEWSETELEM` message, parsed by libnftnl.
fn parse_elements(nlh: &libc::nlmsghdr, p: &mut Parsed) -> libc::c_int {
    p.messages += 1;
    if let Err(e) = sys::parse_elements(nlh, &mut p.elements) {
        p.error.get_or_insert(e);
    }
    mnl::mnl_sys::MNL_CB_OK
}

/// [`mnl::cb_run2`] callback: the table of a `NEWTABLE` message, parsed by libnftnl.
fn parse_table(nlh: &libc::nlmsghdr, p: &mut Parsed) -> libc::c_int {
    p.messages += 1;
    match sys::parse_table(nlh) {
        Ok(t) => p.tables.push(t),
        Err(e) => {
            p.error.get_or_insert(e);
        }
    }
    mnl::mnl_sys::MNL_CB_OK
}

/// How the replies to a request outside a batch ended.
#[derive(Debug, Default)]
struct Ended {
    /// The error the kernel answered with (`None`: an ACK or `NLMSG_DONE`).
    errno: Option<i32>,
    /// A message was flagged `NLM_F_DUMP_INTR`: the ruleset changed during the dump.
    interrupted: bool,
}

impl Netlink {
    /// The elements of `set`, from a `GETSETELEM` dump (what `nft list set` reads), retried
    /// until one dump is consistent.
    ///
    /// Why retry: a dump comes in many messages, and for each the kernel walks the set
    /// afresh, skipping as many elements as it already sent. A hash set (`nft_rhash`, the
    /// kernel's choice for a set without flags) that its deferred worker is resizing, as it
    /// does for a while after a large transaction, walks in another order from one message
    /// to the next, so such a dump repeats some elements and misses as many others: the
    /// count is right, the content is not, although the set holds every element (measured:
    /// 93–95k distinct keys of 100k in a dump started right after a 100k-element apply; all
    /// 100k found by lookups, and by a dump 0.5 s later). The walks count every element they
    /// visit, so an element skipped by mistake means another one sent twice: a dump that
    /// repeats no element missed none. A dump during which the ruleset changed
    /// (`NLM_F_DUMP_INTR`) is retried too, as nft does.
    ///
    /// `nft list` has no such check: its listing right after a large change can miss
    /// elements the kernel holds. [`Netlink::missing_elements`] asks by key instead.
    pub fn dump_elements(
        &mut self,
        table: &TableId,
        set: &str,
    ) -> Result<Vec<DumpedElement>, ApplyError> {
        const ATTEMPTS: u64 = 20;
        for attempt in 1..=ATTEMPTS {
            let dump = self.dump_once(table, set)?;
            let mut seen = std::collections::HashSet::with_capacity(dump.elements.len());
            let repeated = dump
                .elements
                .iter()
                .any(|e| !seen.insert((&e.key, e.flags)));
            if !repeated && !dump.interrupted {
                return Ok(dump.elements);
            }
            std::thread::sleep(std::time::Duration::from_millis(25 * attempt));
        }
        Err(ApplyError::InconsistentDump {
            what: format!("table {table} set {set}"),
            attempts: ATTEMPTS,
        })
    }

    /// One `GETSETELEM` dump, as the kernel sent it (see [`Netlink::dump_elements`]).
    fn dump_once(&mut self, table: &TableId, set: &str) -> Result<ElementDump, ApplyError> {
        let seq = self.next_seq();
        let request =
            ElemsMsg::new(nfproto(table.family), &table.name, set, &[]).map_err(|source| {
                ApplyError::Request {
                    step: "dump",
                    source,
                }
            })?;
        let mut buf = AlignedBuf::default();
        let req = request.request(&mut buf, libc::NLM_F_DUMP as u16, seq);
        self.sock
            .set_rcvbuf(4 << 20)
            .map_err(nl("setsockopt(SO_RCVBUF)"))?;
        let (parsed, interrupted) = self.dump(req, seq, parse_elements, "decode element")?;
        Ok(ElementDump {
            elements: parsed.elements,
            interrupted,
        })
    }

    /// Sends the dump request `req` (sequence number `seq`) and collects its replies, each
    /// data message handed to `callback`. Returns what the callbacks parsed and whether the
    /// dump was interrupted by a concurrent change; a kernel error is a `dump` error, a
    /// message the callback could not parse a `decode_step` error.
    fn dump(
        &mut self,
        req: &[u8],
        seq: u32,
        callback: mnl::Callback<Parsed>,
        decode_step: &'static str,
    ) -> Result<(Parsed, bool), ApplyError> {
        self.sock.mnl().send(req).map_err(nl("sendto"))?;
        let mut parsed = Parsed::default();
        let ended = self.replies(seq, "dump", callback, &mut parsed)?;
        if let Some(errno) = ended.errno {
            return Err(ApplyError::Netlink {
                step: "dump",
                source: io::Error::from_raw_os_error(errno),
            });
        }
        if let Some(e) = parsed.error.take() {
            return Err(ApplyError::Netlink {
                step: decode_step,
                source: e,
            });
        }
        Ok((parsed, ended.interrupted))
    }

    /// Receives the replies to request `seq` until they end (an ACK, `NLMSG_DONE` or an
    /// error: [`mnl::cb_run2`] tells them apart), handing each data message to `callback`.
    /// Replies to other requests are skipped. A message flagged `NLM_F_DUMP_INTR` (which
    /// `mnl` refuses) is noted and skipped: the caller retries such a dump.
    fn replies(
        &mut self,
        seq: u32,
        step: &'static str,
        callback: mnl::Callback<Parsed>,
        parsed: &mut Parsed,
    ) -> Result<Ended, ApplyError> {
        let portid = self.sock.mnl().portid();
        let mut ended = Ended::default();
        loop {
            let n = self.sock.recv(&mut self.rbuf, 5000).map_err(nl("recv"))?;
            if n == 0 {
                return Err(ApplyError::NoReply { step });
            }
            for msg in mnl::NlMessages::new(&self.rbuf.bytes_mut()[..n]) {
                let msg = msg.map_err(nl("recv"))?;
                let Some(h) = sys::header(msg) else { continue };
                if h.nlmsg_seq != seq {
                    continue;
                }
                if h.nlmsg_flags & NLM_F_DUMP_INTR != 0 {
                    ended.interrupted = true;
                    let last = [libc::NLMSG_DONE, libc::NLMSG_ERROR].map(|t| t as u16);
                    if last.contains(&h.nlmsg_type) {
                        return Ok(ended);
                    }
                    continue;
                }
                match mnl::cb_run2(msg, seq, portid, callback, parsed) {
                    Ok(mnl::CbResult::Stop) => return Ok(ended),
                    Ok(mnl::CbResult::Ok) => {}
                    Err(e) => {
                        ended.errno = Some(e.raw_os_error().unwrap_or(libc::EIO));
                        return Ok(ended);
                    }
                }
            }
        }
    }
}

impl Netlink {
    /// Every nftables table in this network namespace, of every family, as
    /// `(family keyword, name)` (`("ip", "kube-proxy")`), from a `GETTABLE` dump (what
    /// `nft list tables` reads) parsed by libnftnl. Families nft has no keyword for are named
    /// by number. A dump interrupted by a concurrent change is retried, as nft does.
    pub fn list_tables(&mut self) -> Result<Vec<(String, String)>, ApplyError> {
        const ATTEMPTS: u32 = 5;
        for _ in 0..ATTEMPTS {
            let seq = self.next_seq();
            let req = nftnl::table::get_tables_nlmsg(seq);
            // The buffer is libnftnl's maximum message size; send only the message.
            let len = sys::header(&req).map_or(req.len(), |h| h.nlmsg_len as usize);
            let (parsed, interrupted) =
                self.dump(&req[..len.min(req.len())], seq, parse_table, "decode table")?;
            if interrupted {
                continue;
            }
            return Ok(parsed
                .tables
                .into_iter()
                .map(|(family, name)| (family_keyword(family), name))
                .collect());
        }
        Err(ApplyError::InconsistentDump {
            what: "the tables".into(),
            attempts: ATTEMPTS.into(),
        })
    }
}

/// nft's keyword for an nftables family number (`NFPROTO_*`).
fn family_keyword(family: u32) -> String {
    match family {
        1 => "inet".into(),
        2 => "ip".into(),
        3 => "arp".into(),
        5 => "netdev".into(),
        7 => "bridge".into(),
        10 => "ip6".into(),
        other => other.to_string(),
    }
}

impl Netlink {
    /// The keys among `keys` that `set` does not hold, found by asking the kernel to look
    /// each one up (`GETSETELEM` without a dump, as `nft get element` does), so the answer
    /// does not depend on a dump's walk (see [`Netlink::dump_elements`]). Keys go 256 to a
    /// message; the kernel answers each found key with one message, in order, and stops a
    /// message at the first key it does not hold (`ENOENT`), so the next message resumes
    /// after that key.
    pub fn missing_elements(
        &mut self,
        table: &TableId,
        set: &str,
        keys: &[Key],
    ) -> Result<Vec<Key>, ApplyError> {
        let fam = nfproto(table.family);
        self.sock
            .set_rcvbuf(4 << 20)
            .map_err(nl("setsockopt(SO_RCVBUF)"))?;
        let mut missing = Vec::new();
        let mut buf = AlignedBuf::default();
        let mut rest = keys;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(256)];
            let descs: Vec<ElemDesc> = chunk
                .iter()
                .filter_map(|k| encode::elem_key_descs(k).into_iter().next())
                .collect();
            let seq = self.next_seq();
            let request = ElemsMsg::new(fam, &table.name, set, &descs).map_err(|source| {
                ApplyError::Request {
                    step: "get element",
                    source,
                }
            })?;
            let req = request.request(&mut buf, 0, seq);
            self.sock.mnl().send(req).map_err(nl("sendto"))?;
            let mut parsed = Parsed::default();
            let ended = self.replies(seq, "get element", count_message, &mut parsed)?;
            let found = parsed.messages;
            match ended.errno {
                None => rest = &rest[chunk.len()..],
                Some(libc::ENOENT) if found < chunk.len() => {
                    missing.push(chunk[found].clone());
                    rest = &rest[found + 1..];
                }
                Some(e) => {
                    return Err(ApplyError::Netlink {
                        step: "get element",
                        source: io::Error::from_raw_os_error(e),
                    });
                }
            }
        }
        Ok(missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Element, Value};

    /// Single-address elements `10.0.x.y` (one element each), `n` of them.
    fn address_elements(n: u32) -> Vec<ElemDesc> {
        (0..n)
            .flat_map(|i| {
                let addr = std::net::Ipv4Addr::from(0x0a00_0000 | i);
                encode::elem_descs(&[Value::Ipv4(addr)], &Element::key_only())
            })
            .collect()
    }

    #[test]
    fn an_element_message_refuses_a_list_over_its_size_bound_whoever_packed_it() {
        let fits = address_elements(100);
        let per_element = fits[0].size_bound();
        ElemsMsg::new(2, "lb", "ips", &fits).expect("100 elements fit one message");
        let n = (MAX_ELEMS_BYTES / per_element + 1) as u32;
        match ElemsMsg::new(2, "lb", "ips", &address_elements(n)) {
            Err(EncodeError::ElementsTooLarge {
                set,
                elements,
                bytes,
                limit,
            }) => {
                assert_eq!((set.as_str(), elements as u32), ("ips", n));
                assert!(
                    bytes > limit && limit == MAX_ELEMS_BYTES,
                    "{bytes} of {limit}"
                );
            }
            Err(other) => panic!("expected ElementsTooLarge, got {other}"),
            Ok(_) => panic!("{n} elements accepted in one message"),
        }
    }

    #[test]
    fn a_large_element_command_is_encoded_as_several_messages_of_that_command() {
        let elements: Vec<_> = (0..5_000u32)
            .map(|i| {
                let key = vec![Value::Ipv4(std::net::Ipv4Addr::from(0x0a00_0000 | i))];
                (key, Element::key_only())
            })
            .collect();
        let cmd = Command::AddElements {
            table: TableId::new(Family::Ip, "lb"),
            set: "ips".into(),
            elements,
        };
        let mut b = Batch {
            batch: nftnl::Batch::new(),
            owners: Vec::new(),
            set_ids: 0,
        };
        encode_command(&mut b, 7, &cmd).expect("5,000 elements encode");
        assert!(b.owners.len() > 1, "{} message(s)", b.owners.len());
        assert!(b.owners.iter().all(|&(_, cmd)| cmd == 7));
    }

    #[test]
    fn packed_element_messages_stay_under_the_limit_and_keep_each_interval_whole() {
        // Single-field prefixes: each is a start and an end element that must share a message.
        let groups: Vec<Vec<ElemDesc>> = (0..5_000u32)
            .map(|i| {
                let net = ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(i << 8), 24)
                    .expect("valid prefix");
                encode::elem_descs(&[Value::Ipv4Net(net)], &Element::key_only())
            })
            .collect();
        assert!(groups.iter().all(|g| g.len() == 2));
        let mut chunks: Vec<Vec<ElemDesc>> = Vec::new();
        pack_elems(groups.iter().cloned(), |c| {
            chunks.push(c.to_vec());
            Ok(())
        })
        .expect("packing");
        assert!(chunks.len() > 1, "5,000 intervals need several messages");
        for c in &chunks {
            let bytes: usize = c.iter().map(ElemDesc::size_bound).sum();
            assert!(bytes <= ELEMS_PER_MSG_BYTES, "{bytes} bytes in one message");
            assert_eq!(c.len() % 2, 0, "an interval was split across messages");
        }
        let all: Vec<ElemDesc> = chunks.concat();
        assert_eq!(all, groups.concat(), "every element, in order");
    }
}
