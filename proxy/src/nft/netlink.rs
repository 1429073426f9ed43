//! The netlink backend: every transaction is ONE nfnetlink batch (begin … end) sent with one
//! `sendmsg`, so the kernel applies it atomically or not at all.
//!
//! - Elements are packed many per `NEWSETELEM` message (never zero), each message kept well
//!   under the 64 KiB netlink attribute limit.
//! - The socket buffers are sized for the batch (`SO_SNDBUFFORCE`, falling back to
//!   `SO_SNDBUF`; `SO_RCVBUFFORCE` for the replies).
//! - Only the last message asks for an ACK; the kernel reports every failing message with an
//!   error carrying its sequence number, which maps back to the command. Any error means the
//!   kernel rolled the whole batch back.
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

use self::encode::{ElemDesc, nfproto};
use super::ir::{Family, Key, MapData, SetSpec, TableId};
use super::transaction::{Command, Transaction};
use super::{ApplyError, Backend, ElementCounter, ListedElement, short};

/// Estimated bytes of elements per message (the attribute nest limit is 64 KiB).
pub const ELEMS_PER_MSG_BYTES: usize = 32 * 1024;

const NFNL_SUBSYS_NFTABLES: u16 = libc::NFNL_SUBSYS_NFTABLES as u16;

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
    seq: u32,
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
        Ok(Self { sock, seq: seed })
    }
}

fn put_attr(out: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    out.extend(((4 + payload.len()) as u16).to_ne_bytes());
    out.extend(ty.to_ne_bytes());
    out.extend(payload);
    out.resize(out.len().div_ceil(4) * 4, 0);
}

fn str_attr(out: &mut Vec<u8>, ty: u16, s: &str) {
    let mut b = s.as_bytes().to_vec();
    b.push(0);
    put_attr(out, ty, &b);
}

/// A message built without libnftnl: header, nfgenmsg, attributes.
fn raw_msg(
    out: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &[u8],
) {
    let len = 16 + 4 + attrs.len();
    out.extend((len as u32).to_ne_bytes());
    out.extend(ty.to_ne_bytes());
    out.extend(flags.to_ne_bytes());
    out.extend(seq.to_ne_bytes());
    out.extend(0u32.to_ne_bytes());
    out.extend([family, 0]); // nfgen_family, version NFNETLINK_V0
    out.extend(res_id.to_be_bytes());
    out.extend(attrs);
}

fn nft_msg(out: &mut Vec<u8>, msg: i32, flags: u16, seq: u32, family: u16, names: &[(u16, &str)]) {
    let mut attrs = Vec::new();
    for (ty, s) in names {
        str_attr(&mut attrs, *ty, s);
    }
    let ty = (NFNL_SUBSYS_NFTABLES << 8) | msg as u16;
    raw_msg(
        out,
        ty,
        flags | libc::NLM_F_REQUEST as u16,
        seq,
        family as u8,
        0,
        &attrs,
    );
}

/// The batch being built: bytes, and which command each sequence number belongs to.
struct Batch {
    buf: Vec<u8>,
    seq: u32,
    owners: Vec<(u32, usize)>,
    last_msg: Option<usize>,
    set_ids: u32,
}

impl Batch {
    fn next(&mut self, cmd: usize) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.owners.push((self.seq, cmd));
        self.last_msg = Some(self.buf.len());
        self.seq
    }
}

const REQ: u16 = libc::NLM_F_REQUEST as u16;
const CREATE: u16 = libc::NLM_F_CREATE as u16;

fn encode_command(b: &mut Batch, i: usize, c: &Command) -> Result<(), String> {
    let fam = nfproto(c.table().family);
    let tname = c.table().name.as_str();
    match c {
        Command::AddTable { comment, .. } => {
            let seq = b.next(i);
            let ud = encode::comment_udata(comment);
            sys::table_msg(&mut b.buf, seq, REQ | CREATE, fam, tname, ud.as_deref())?;
        }
        Command::DeleteTable { .. } => {
            let seq = b.next(i);
            nft_msg(
                &mut b.buf,
                libc::NFT_MSG_DELTABLE,
                0,
                seq,
                fam,
                &[(1, tname)],
            );
        }
        Command::AddChain { chain, spec, .. } => {
            let seq = b.next(i);
            let base = spec.base.map(|x| {
                (
                    encode::hooknum(x.hook),
                    x.priority,
                    x.kind.as_str(),
                    encode::policy(x.policy),
                )
            });
            let ud = encode::comment_udata(&spec.comment);
            sys::chain_msg(
                &mut b.buf,
                seq,
                REQ | CREATE,
                fam,
                tname,
                chain,
                base,
                ud.as_deref(),
            )?;
        }
        Command::FlushChain { chain, .. } => {
            let seq = b.next(i);
            let names = [(1, tname), (2, chain.as_str())];
            nft_msg(&mut b.buf, libc::NFT_MSG_DELRULE, 0, seq, fam, &names);
        }
        Command::DeleteChain { chain, .. } => {
            let seq = b.next(i);
            let names = [(1, tname), (3, chain.as_str())];
            nft_msg(&mut b.buf, libc::NFT_MSG_DELCHAIN, 0, seq, fam, &names);
        }
        Command::AddSet { set, spec, .. } => {
            let seq = b.next(i);
            b.set_ids += 1;
            let d = encode::set_desc(spec);
            sys::set_msg(
                &mut b.buf,
                seq,
                REQ | CREATE,
                fam,
                tname,
                set,
                b.set_ids,
                &d,
            )?;
        }
        Command::FlushSet { set, .. } => {
            let seq = b.next(i);
            let names = [(1, tname), (2, set.as_str())];
            nft_msg(&mut b.buf, libc::NFT_MSG_DELSETELEM, 0, seq, fam, &names);
        }
        Command::DeleteSet { set, .. } => {
            let seq = b.next(i);
            let names = [(1, tname), (2, set.as_str())];
            nft_msg(&mut b.buf, libc::NFT_MSG_DELSET, 0, seq, fam, &names);
        }
        Command::AddElements { set, elements, .. } => {
            if elements.is_empty() {
                return Err("empty element list".into());
            }
            let groups = elements.iter().map(|(k, e)| encode::elem_descs(k, e));
            let flags = REQ | CREATE | libc::NLM_F_EXCL as u16;
            pack_elems(
                b,
                i,
                libc::NFT_MSG_NEWSETELEM as u16,
                flags,
                fam,
                tname,
                set,
                groups,
            )?;
        }
        Command::DeleteElements { set, keys, .. } => {
            if keys.is_empty() {
                return Err("empty element list".into());
            }
            let groups = keys.iter().map(|k| encode::elem_key_descs(k));
            pack_elems(
                b,
                i,
                libc::NFT_MSG_DELSETELEM as u16,
                REQ,
                fam,
                tname,
                set,
                groups,
            )?;
        }
        Command::AddRule { chain, rule, .. } => {
            let seq = b.next(i);
            let insns = encode::rule_insns(c.table().family, rule);
            let ud = encode::comment_udata(&rule.comment);
            let flags = REQ | CREATE | libc::NLM_F_APPEND as u16;
            sys::rule_msg(
                &mut b.buf,
                seq,
                flags,
                fam,
                tname,
                chain,
                &insns,
                ud.as_deref(),
            )?;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn pack_elems(
    b: &mut Batch,
    i: usize,
    msg: u16,
    flags: u16,
    fam: u16,
    table: &str,
    set: &str,
    groups: impl Iterator<Item = Vec<ElemDesc>>,
) -> Result<(), String> {
    let mut chunk: Vec<ElemDesc> = Vec::new();
    let mut size = 0;
    for g in groups {
        let gsize: usize = g.iter().map(ElemDesc::size_bound).sum();
        if !chunk.is_empty() && size + gsize > ELEMS_PER_MSG_BYTES {
            let seq = b.next(i);
            sys::elems_msg(&mut b.buf, msg, seq, flags, fam, table, set, &chunk)?;
            chunk.clear();
            size = 0;
        }
        size += gsize;
        chunk.extend(g);
    }
    if !chunk.is_empty() {
        let seq = b.next(i);
        sys::elems_msg(&mut b.buf, msg, seq, flags, fam, table, set, &chunk)?;
    }
    Ok(())
}

fn batch_marker(out: &mut Vec<u8>, ty: i32, seq: u32) {
    raw_msg(
        out,
        ty as u16,
        REQ,
        seq,
        libc::AF_UNSPEC as u8,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
}

/// Replies parsed from the socket: `(seq, errno)`, errno 0 for an ACK.
fn parse_replies(buf: &[u8], out: &mut Vec<(u32, i32)>) {
    let mut off = 0;
    while off + 16 <= buf.len() {
        let u32_at = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let len = u32_at(off) as usize;
        let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        let seq = u32_at(off + 8);
        if len < 16 || off + len > buf.len() {
            break;
        }
        if ty == libc::NLMSG_ERROR as u16 && len >= 20 {
            out.push((seq, -(u32_at(off + 16) as i32)));
        }
        off += len.div_ceil(4) * 4;
    }
}

impl Backend for Netlink {
    fn apply(&mut self, tx: &Transaction) -> Result<(), ApplyError> {
        if tx.is_empty() {
            return Ok(());
        }
        let begin = self.seq.wrapping_add(1);
        let mut b = Batch {
            buf: Vec::new(),
            seq: begin,
            owners: vec![],
            last_msg: None,
            set_ids: 0,
        };
        batch_marker(&mut b.buf, libc::NFNL_MSG_BATCH_BEGIN, begin);
        for (i, c) in tx.commands.iter().enumerate() {
            encode_command(&mut b, i, c).map_err(|r| ApplyError::invalid(i, c, r))?;
        }
        // Ask for an ACK on the last message only: errors are reported regardless.
        let last = b
            .last_msg
            .expect("a non-empty transaction encodes at least one message");
        let fl = u16::from_ne_bytes([b.buf[last + 6], b.buf[last + 7]]) | libc::NLM_F_ACK as u16;
        b.buf[last + 6..last + 8].copy_from_slice(&fl.to_ne_bytes());
        let last_seq = b.seq;
        let end = b.seq.wrapping_add(1);
        batch_marker(&mut b.buf, libc::NFNL_MSG_BATCH_END, end);
        self.seq = end;

        let nl = |step| move |e| ApplyError::Netlink { step, source: e };
        self.sock
            .set_sndbuf(b.buf.len() + 64 * 1024)
            .map_err(nl("setsockopt(SO_SNDBUF)"))?;
        // Worst case every message fails: room for one small error skb per message.
        let rcv = (b.owners.len() * 1024).clamp(1 << 20, 256 << 20);
        self.sock
            .set_rcvbuf(rcv)
            .map_err(nl("setsockopt(SO_RCVBUF)"))?;
        self.sock.send(&b.buf).map_err(nl("sendmsg"))?;

        let mut replies = Vec::new();
        let mut rbuf = vec![0u8; 256 * 1024];
        loop {
            let n = self.sock.recv_nonblocking(&mut rbuf).map_err(nl("recv"))?;
            if n == 0 {
                break;
            }
            parse_replies(&rbuf[..n], &mut replies);
        }
        let cmd_of = |seq: u32| b.owners.iter().find(|(s, _)| *s == seq).map(|(_, i)| *i);
        let mut first_err: Option<(u32, i32)> = None;
        for &(seq, errno) in &replies {
            let in_batch = seq.wrapping_sub(begin) <= end.wrapping_sub(begin);
            if errno != 0 && in_batch && first_err.is_none_or(|(s, _)| seq < s) {
                first_err = Some((seq, errno));
            }
        }
        if let Some((seq, errno)) = first_err {
            let source = io::Error::from_raw_os_error(errno);
            return Err(match cmd_of(seq) {
                Some(i) => ApplyError::Kernel {
                    index: i,
                    command: short(&tx.commands[i]),
                    source,
                },
                None => ApplyError::Batch(source),
            });
        }
        if !replies.iter().any(|&(s, e)| s == last_seq && e == 0) {
            return Err(ApplyError::Netlink {
                step: "ack",
                source: io::Error::other("no acknowledgement for the batch's last message"),
            });
        }
        Ok(())
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
        let undecodable = |what: &str| ApplyError::Netlink {
            step: "decode element",
            source: io::Error::other(format!(
                "an element's {what} in {table} {set} does not match the set's types"
            )),
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

const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Netlink attributes in `buf`: `(type without flags, payload)`.
fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off + 4 > buf.len() {
            return None;
        }
        let len = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]) & NLA_TYPE_MASK;
        if len < 4 || off + len > buf.len() {
            return None;
        }
        let payload = &buf[off + 4..off + len];
        off += len.div_ceil(4) * 4;
        Some((ty, payload))
    })
}

fn attr(buf: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(buf).find(|(t, _)| *t == ty).map(|(_, p)| p)
}

/// The messages of one received datagram that answer `seq`: `(type, flags, message)`.
fn messages(buf: &[u8], seq: u32) -> impl Iterator<Item = (u16, u16, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        loop {
            if off + 16 > buf.len() {
                return None;
            }
            let u32_at =
                |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
            let len = u32_at(off) as usize;
            if len < 16 || off + len > buf.len() {
                return None;
            }
            let msg = &buf[off..off + len];
            off += len.div_ceil(4) * 4;
            if u32_at(off - len.div_ceil(4) * 4 + 8) == seq {
                let ty = u16::from_ne_bytes([msg[4], msg[5]]);
                let flags = u16::from_ne_bytes([msg[6], msg[7]]);
                return Some((ty, flags, msg));
            }
        }
    })
}

/// The errno of an `NLMSG_ERROR` message (0 for an acknowledgement).
fn error_of(msg: &[u8]) -> i32 {
    match msg.get(16..20) {
        Some(e) => -i32::from_ne_bytes([e[0], e[1], e[2], e[3]]),
        None => 0,
    }
}

/// `NFTA_SET_ELEM_LIST_ELEMENTS` of one NEWSETELEM message (after nlmsghdr and nfgenmsg).
fn dumped_elements(payload: &[u8], out: &mut Vec<DumpedElement>) {
    let value = |nest: Option<&[u8]>| nest.and_then(|n| attr(n, 1)).map(<[u8]>::to_vec);
    let Some(list) = attr(payload, 3) else { return };
    for (_, e) in attrs(list) {
        let flags = attr(e, 3)
            .and_then(|f| <[u8; 4]>::try_from(f).ok())
            .map_or(0, u32::from_be_bytes);
        // NFTA_SET_ELEM_EXPR (one expression), or NFTA_SET_ELEM_EXPRESSIONS (a list).
        let exprs = attr(e, 7).into_iter().chain(
            attr(e, 11)
                .into_iter()
                .flat_map(|l| attrs(l).map(|(_, x)| x)),
        );
        out.push(DumpedElement {
            key: value(attr(e, 1)).unwrap_or_default(),
            key_end: value(attr(e, 10)),
            flags,
            data: value(attr(e, 2)),
            counter: exprs.filter_map(counter_of).next(),
        });
    }
}

/// The values of a `counter` expression (`NFTA_EXPR_NAME` "counter", `NFTA_EXPR_DATA` with
/// `NFTA_COUNTER_BYTES` and `NFTA_COUNTER_PACKETS`, big endian); `None` for other expressions.
fn counter_of(expr: &[u8]) -> Option<ElementCounter> {
    if attr(expr, 1)? != b"counter\0" {
        return None;
    }
    let data = attr(expr, 2)?;
    let u64_of = |ty| {
        attr(data, ty)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
    };
    Some(ElementCounter {
        packets: u64_of(2)?,
        bytes: u64_of(1)?,
    })
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
        Err(ApplyError::Netlink {
            step: "dump",
            source: io::Error::other(format!(
                "no consistent dump of {table} {set} in {ATTEMPTS} attempts"
            )),
        })
    }

    /// One `GETSETELEM` dump, as the kernel sent it (see [`Netlink::dump_elements`]).
    fn dump_once(&mut self, table: &TableId, set: &str) -> Result<ElementDump, ApplyError> {
        let nl = |step| move |e| ApplyError::Netlink { step, source: e };
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut req = Vec::new();
        let names = [(1, table.name.as_str()), (2, set)];
        nft_msg(
            &mut req,
            libc::NFT_MSG_GETSETELEM,
            NLM_F_DUMP | libc::NLM_F_ACK as u16,
            seq,
            nfproto(table.family),
            &names,
        );
        self.sock
            .set_rcvbuf(4 << 20)
            .map_err(nl("setsockopt(SO_RCVBUF)"))?;
        self.sock.send(&req).map_err(nl("sendmsg"))?;
        let mut dump = ElementDump::default();
        let mut rbuf = vec![0u8; 256 * 1024];
        loop {
            let n = self.sock.recv_wait(&mut rbuf, 5000).map_err(nl("recv"))?;
            if n == 0 {
                return Err(ApplyError::Netlink {
                    step: "dump",
                    source: io::Error::new(io::ErrorKind::TimedOut, "no NLMSG_DONE"),
                });
            }
            for (ty, flags, msg) in messages(&rbuf[..n], seq) {
                if flags & NLM_F_DUMP_INTR != 0 {
                    dump.interrupted = true;
                }
                match ty {
                    t if t == libc::NLMSG_DONE as u16 => return Ok(dump),
                    t if t == libc::NLMSG_ERROR as u16 => {
                        let errno = error_of(msg);
                        if errno != 0 {
                            return Err(ApplyError::Netlink {
                                step: "dump",
                                source: io::Error::from_raw_os_error(errno),
                            });
                        }
                    }
                    _ => dumped_elements(&msg[20.min(msg.len())..], &mut dump.elements),
                }
            }
        }
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
        let nl = |step| move |e| ApplyError::Netlink { step, source: e };
        let fam = nfproto(table.family);
        let msg_type = libc::NFT_MSG_GETSETELEM as u16;
        let flags = REQ | libc::NLM_F_ACK as u16;
        self.sock
            .set_rcvbuf(4 << 20)
            .map_err(nl("setsockopt(SO_RCVBUF)"))?;
        let mut missing = Vec::new();
        let mut rbuf = vec![0u8; 256 * 1024];
        let mut rest = keys;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(256)];
            let descs: Vec<ElemDesc> = chunk
                .iter()
                .filter_map(|k| encode::elem_key_descs(k).into_iter().next())
                .collect();
            self.seq = self.seq.wrapping_add(1);
            let seq = self.seq;
            let mut req = Vec::new();
            sys::elems_msg(
                &mut req,
                msg_type,
                seq,
                flags,
                fam,
                &table.name,
                set,
                &descs,
            )
            .map_err(|r| ApplyError::Netlink {
                step: "encode",
                source: io::Error::other(r),
            })?;
            self.sock.send(&req).map_err(nl("sendmsg"))?;
            let mut found = 0;
            let errno = 'reply: loop {
                let n = self.sock.recv_wait(&mut rbuf, 5000).map_err(nl("recv"))?;
                if n == 0 {
                    return Err(ApplyError::Netlink {
                        step: "get element",
                        source: io::Error::new(io::ErrorKind::TimedOut, "no acknowledgement"),
                    });
                }
                for (ty, _, msg) in messages(&rbuf[..n], seq) {
                    if ty == libc::NLMSG_ERROR as u16 {
                        break 'reply error_of(msg);
                    }
                    found += 1;
                }
            };
            match errno {
                0 => rest = &rest[chunk.len()..],
                libc::ENOENT if found < chunk.len() => {
                    missing.push(chunk[found].clone());
                    rest = &rest[found + 1..];
                }
                e => {
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

impl Netlink {
    /// Every nftables table in this network namespace, of every family, as
    /// `(family keyword, name)` (`("ip", "kube-proxy")`), from a `GETTABLE` dump (what
    /// `nft list tables` reads). Families nft has no keyword for here are named by number.
    pub fn list_tables(&mut self) -> Result<Vec<(String, String)>, ApplyError> {
        let nl = |step| move |e| ApplyError::Netlink { step, source: e };
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut req = Vec::new();
        // NFPROTO_UNSPEC: every family.
        nft_msg(
            &mut req,
            libc::NFT_MSG_GETTABLE,
            NLM_F_DUMP | libc::NLM_F_ACK as u16,
            seq,
            0,
            &[],
        );
        self.sock.send(&req).map_err(nl("sendmsg"))?;
        let mut tables = Vec::new();
        let mut rbuf = vec![0u8; 64 * 1024];
        loop {
            let n = self.sock.recv_wait(&mut rbuf, 5000).map_err(nl("recv"))?;
            if n == 0 {
                return Err(ApplyError::Netlink {
                    step: "dump",
                    source: io::Error::new(io::ErrorKind::TimedOut, "no NLMSG_DONE"),
                });
            }
            for (ty, _flags, msg) in messages(&rbuf[..n], seq) {
                match ty {
                    t if t == libc::NLMSG_DONE as u16 => return Ok(tables),
                    t if t == libc::NLMSG_ERROR as u16 => {
                        let errno = error_of(msg);
                        if errno != 0 {
                            return Err(ApplyError::Netlink {
                                step: "dump",
                                source: io::Error::from_raw_os_error(errno),
                            });
                        }
                    }
                    _ => {
                        // nlmsghdr (16 bytes), then nfgenmsg: family, version, resource id.
                        let family = match msg.get(16) {
                            Some(1) => "inet".to_string(),
                            Some(2) => "ip".to_string(),
                            Some(3) => "arp".to_string(),
                            Some(5) => "netdev".to_string(),
                            Some(7) => "bridge".to_string(),
                            Some(10) => "ip6".to_string(),
                            Some(other) => other.to_string(),
                            None => continue,
                        };
                        // NFTA_TABLE_NAME (1), NUL-terminated.
                        if let Some(name) = attr(&msg[20.min(msg.len())..], 1) {
                            let name = name.split(|b| *b == 0).next().unwrap_or_default();
                            tables.push((family, String::from_utf8_lossy(name).into_owned()));
                        }
                    }
                }
            }
        }
    }
}
