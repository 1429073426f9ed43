//! The only module with `unsafe`: what the `nftnl` and `mnl` crates lack, on `nftnl-sys` and
//! libc.
//!
//! - Our own [`nftnl::NlMsg`] objects for what `nftnl` cannot express: tables and chains with
//!   a comment (userdata), sets of any shape (concatenations, intervals, timeouts, counters,
//!   data and verdict maps), element lists (keys, range ends, data, verdicts, timeouts,
//!   comments), and rule expressions as [`nftnl::expr::Expression`]s built from
//!   [`Insn`]s: `nftnl`'s own expression types always load into and compare register 1, so
//!   they cannot build the concatenations our rules look up (several fields in consecutive
//!   32-bit registers), and it has no fib, numgen, dynset or reject. The rules themselves are
//!   `nftnl::Rule`s. Each libnftnl object is owned by a small RAII wrapper and serialised by
//!   libnftnl straight into the batch's buffer; element lists, the bulk of a full sync, are
//!   encoded in safe code instead (`encode::elem_list_attrs`, checked byte for byte against
//!   libnftnl's encoding in this module's tests) and only copied into the buffer here.
//! - Parsing dumped elements with libnftnl's own parser (`nftnl_set_elems_nlmsg_parse`).
//! - What `mnl::Socket` lacks: socket options, waiting for a reply with a timeout, `Send`.
//! - Entering a network namespace.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use nftnl::nftnl_sys as sys;
use nftnl::{MsgType, NlMsg};
use sys::libc::{c_char, c_int, c_void};

use super::encode::{self, ElemDesc, Insn, SetDesc};
use super::{DumpedElement, EncodeError};
use crate::ElementCounter;

/// `s` as a C string; `what` names it in the error (`table name`, `comment`, …).
pub fn cstr(what: &'static str, s: &str) -> Result<CString, EncodeError> {
    CString::new(s).map_err(|_| nul(what, s))
}

/// The error [`cstr`] gives if `s` holds a NUL, without making the C string (for names that
/// are encoded in safe code, such as every verdict chain of a full sync's elements).
fn no_nul(what: &'static str, s: &str) -> Result<(), EncodeError> {
    if s.as_bytes().contains(&0) {
        Err(nul(what, s))
    } else {
        Ok(())
    }
}

fn nul(what: &'static str, s: &str) -> EncodeError {
    EncodeError::Nul {
        what,
        value: s.to_owned(),
    }
}

macro_rules! owned {
    ($name:ident, $ty:ty, $alloc:path, $free:path) => {
        struct $name(*mut $ty);
        impl $name {
            fn new() -> Result<Self, EncodeError> {
                // SAFETY: the allocator takes no arguments; a null return is handled.
                let p = unsafe { $alloc() };
                if p.is_null() {
                    Err(EncodeError::Alloc {
                        object: stringify!($ty),
                    })
                } else {
                    Ok(Self(p))
                }
            }
        }
        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: self.0 came from the matching allocator and is freed exactly once.
                unsafe { $free(self.0) }
            }
        }
    };
}

owned!(
    Table,
    sys::nftnl_table,
    sys::nftnl_table_alloc,
    sys::nftnl_table_free
);
owned!(
    Chain,
    sys::nftnl_chain,
    sys::nftnl_chain_alloc,
    sys::nftnl_chain_free
);
owned!(
    Set,
    sys::nftnl_set,
    sys::nftnl_set_alloc,
    sys::nftnl_set_free
);

const ACK: u16 = libc::NLM_F_ACK as u16;
const CREATE: u16 = libc::NLM_F_CREATE as u16;
const EXCL: u16 = libc::NLM_F_EXCL as u16;

/// Writes a message header at `buf` (`NLM_F_REQUEST` is added by libnftnl).
///
/// # Safety
/// `buf` has room for [`nftnl::nft_nlmsg_maxsize`] bytes (the [`NlMsg`] contract).
unsafe fn header_at(
    buf: *mut c_void,
    msg_type: i32,
    family: u16,
    flags: u16,
    seq: u32,
) -> *mut libc::nlmsghdr {
    // SAFETY: the caller guarantees the room; the header is 20 bytes.
    unsafe { sys::nftnl_nlmsg_build_hdr(buf.cast::<c_char>(), msg_type as u16, family, flags, seq) }
}

/// NEWTABLE with a comment (`nftnl::Table` carries no userdata).
pub struct TableMsg {
    t: Table,
    family: u16,
}

// SAFETY: the libnftnl object is owned exclusively and never shared; libnftnl keeps no
// thread-local state for it.
unsafe impl Send for TableMsg {}

impl TableMsg {
    /// A table `name` of `family`, with optional userdata.
    pub fn new(family: u16, name: &str, udata: Option<&[u8]>) -> Result<Self, EncodeError> {
        let t = Table::new()?;
        let name = cstr("table name", name)?;
        // SAFETY: t.0 is a live table; libnftnl copies strings and data.
        unsafe {
            sys::nftnl_table_set_str(t.0, sys::NFTNL_TABLE_NAME as u16, name.as_ptr());
            sys::nftnl_table_set_u32(t.0, sys::NFTNL_TABLE_FAMILY as u16, u32::from(family));
            if let Some(u) = udata {
                sys::nftnl_table_set_data(
                    t.0,
                    sys::NFTNL_TABLE_USERDATA as u16,
                    u.as_ptr() as *const c_void,
                    u.len() as u32,
                );
            }
        }
        Ok(Self { t, family })
    }
}

// SAFETY: a table message is a few hundred bytes, far below nft_nlmsg_maxsize().
unsafe impl NlMsg for TableMsg {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let (ty, flags) = match msg_type {
            MsgType::Add => (libc::NFT_MSG_NEWTABLE, CREATE | ACK),
            MsgType::Del => (libc::NFT_MSG_DELTABLE, ACK),
        };
        // SAFETY: the caller provides the room (NlMsg contract); self.t.0 is a live table.
        unsafe {
            let nlh = header_at(buf, ty, self.family, flags, seq);
            sys::nftnl_table_nlmsg_build_payload(nlh, self.t.0);
        }
    }
}

/// Base chain properties: hook number, priority, type, policy.
pub type BaseDesc<'a> = (u32, i32, &'a str, u32);

/// NEWCHAIN with a comment (`nftnl::Chain` carries no userdata).
pub struct ChainMsg {
    c: Chain,
    family: u16,
}

// SAFETY: as for TableMsg.
unsafe impl Send for ChainMsg {}

impl ChainMsg {
    /// A chain `name` in `table`: a base chain when `base` is given.
    pub fn new(
        family: u16,
        table: &str,
        name: &str,
        base: Option<BaseDesc<'_>>,
        udata: Option<&[u8]>,
    ) -> Result<Self, EncodeError> {
        let c = Chain::new()?;
        let (table, name) = (cstr("table name", table)?, cstr("chain name", name)?);
        let kind = base.map(|b| cstr("chain type", b.2)).transpose()?;
        // SAFETY: c.0 is a live chain; libnftnl copies strings and data.
        unsafe {
            sys::nftnl_chain_set_str(c.0, sys::NFTNL_CHAIN_TABLE as u16, table.as_ptr());
            sys::nftnl_chain_set_str(c.0, sys::NFTNL_CHAIN_NAME as u16, name.as_ptr());
            sys::nftnl_chain_set_u32(c.0, sys::NFTNL_CHAIN_FAMILY as u16, u32::from(family));
            if let (Some((hook, prio, _, policy)), Some(kind)) = (base, &kind) {
                sys::nftnl_chain_set_u32(c.0, sys::NFTNL_CHAIN_HOOKNUM as u16, hook);
                sys::nftnl_chain_set_s32(c.0, sys::NFTNL_CHAIN_PRIO as u16, prio);
                sys::nftnl_chain_set_str(c.0, sys::NFTNL_CHAIN_TYPE as u16, kind.as_ptr());
                sys::nftnl_chain_set_u32(c.0, sys::NFTNL_CHAIN_POLICY as u16, policy);
            }
            if let Some(u) = udata {
                sys::nftnl_chain_set_data(
                    c.0,
                    sys::NFTNL_CHAIN_USERDATA as u16,
                    u.as_ptr() as *const c_void,
                    u.len() as u32,
                );
            }
        }
        Ok(Self { c, family })
    }
}

// SAFETY: a chain message is a few hundred bytes, far below nft_nlmsg_maxsize().
unsafe impl NlMsg for ChainMsg {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let (ty, flags) = match msg_type {
            MsgType::Add => (libc::NFT_MSG_NEWCHAIN, CREATE | ACK),
            MsgType::Del => (libc::NFT_MSG_DELCHAIN, ACK),
        };
        // SAFETY: the caller provides the room (NlMsg contract); self.c.0 is a live chain.
        unsafe {
            let nlh = header_at(buf, ty, self.family, flags, seq);
            sys::nftnl_chain_nlmsg_build_payload(nlh, self.c.0);
        }
    }
}

/// A set as NEWSET (all of [`SetDesc`]) or, by name only, DELSET (`nftnl::set::Set` is typed
/// by a single key type and has no concatenations, intervals, timeouts or expressions).
pub struct SetMsg {
    s: Set,
    family: u16,
}

// SAFETY: as for TableMsg.
unsafe impl Send for SetMsg {}

impl SetMsg {
    fn named(family: u16, table: &str, name: &str) -> Result<Self, EncodeError> {
        let s = Set::new()?;
        let (table, name) = (cstr("table name", table)?, cstr("set name", name)?);
        // SAFETY: s.0 is a live set; libnftnl copies strings.
        unsafe {
            sys::nftnl_set_set_str(s.0, sys::NFTNL_SET_TABLE as u16, table.as_ptr());
            sys::nftnl_set_set_str(s.0, sys::NFTNL_SET_NAME as u16, name.as_ptr());
            sys::nftnl_set_set_u32(s.0, sys::NFTNL_SET_FAMILY as u16, u32::from(family));
        }
        Ok(Self { s, family })
    }

    /// The set to delete (names only).
    pub fn delete(family: u16, table: &str, name: &str) -> Result<Self, EncodeError> {
        Self::named(family, table, name)
    }

    /// The set to create: `id` names it within the batch (`NFTA_SET_ID`).
    pub fn new(
        family: u16,
        table: &str,
        name: &str,
        id: u32,
        d: &SetDesc,
    ) -> Result<Self, EncodeError> {
        // libnftnl counts the field lengths up to the first zero in an array of 16.
        if d.concat.len() >= 16 || d.concat.contains(&0) {
            return Err(EncodeError::Concat {
                set: name.to_owned(),
                fields: d.concat.len(),
            });
        }
        let msg = Self::named(family, table, name)?;
        let s = msg.s.0;
        // SAFETY: s is a live set; libnftnl copies data.
        unsafe {
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_ID as u16, id);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FLAGS as u16, d.flags);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_TYPE as u16, d.key_type);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_LEN as u16, d.key_len);
            if let Some(dt) = d.data_type {
                sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DATA_TYPE as u16, dt);
                sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DATA_LEN as u16, d.data_len);
            }
            if let Some(t) = d.timeout_ms {
                sys::nftnl_set_set_u64(s, sys::NFTNL_SET_TIMEOUT as u16, t);
            }
            if let Some(n) = d.size {
                sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DESC_SIZE as u16, n);
            }
            if !d.concat.is_empty() {
                // Copied into a zeroed array of 16 (checked above).
                sys::nftnl_set_set_data(
                    s,
                    sys::NFTNL_SET_DESC_CONCAT as u16,
                    d.concat.as_ptr() as *const c_void,
                    d.concat.len() as u32,
                );
            }
            sys::nftnl_set_set_data(
                s,
                sys::NFTNL_SET_USERDATA as u16,
                d.udata.as_ptr() as *const c_void,
                d.udata.len() as u32,
            );
        }
        if d.counter {
            let e = Expr::new("counter")?;
            // SAFETY: the set takes ownership of the expression (freed with the set, and
            // encoded as NFTA_SET_EXPR when it is the only one).
            unsafe { sys::nftnl_set_add_expr(s, e.into_raw()) };
        }
        Ok(msg)
    }
}

// SAFETY: a set message is well under a kilobyte (names, a few integers, userdata of a
// comment), far below nft_nlmsg_maxsize().
unsafe impl NlMsg for SetMsg {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let (ty, flags) = match msg_type {
            MsgType::Add => (libc::NFT_MSG_NEWSET, CREATE | ACK),
            MsgType::Del => (libc::NFT_MSG_DELSET, ACK),
        };
        // SAFETY: the caller provides the room (NlMsg contract); self.s.0 is a live set.
        unsafe {
            let nlh = header_at(buf, ty, self.family, flags, seq);
            sys::nftnl_set_nlmsg_build_payload(nlh, self.s.0);
        }
    }
}

/// Elements of one set: NEWSETELEM (add) or DELSETELEM (delete; with no elements, a flush),
/// and as a request of its own, GETSETELEM ([`ElemsMsg::request`]). Its attributes are
/// encoded in safe code ([`encode::elem_list_attrs`], the bytes libnftnl would write) and
/// copied behind the message's headers: a full sync's hundreds of thousands of elements are
/// not each made, filled and freed as a libnftnl object.
pub struct ElemsMsg {
    attrs: Vec<u8>,
    family: u16,
}

/// The largest serialised element list we let into one message ([`ElemsMsg::new`] refuses
/// more): the element list is one netlink attribute, whose length is 16 bits.
pub const MAX_ELEMS_BYTES: usize = 60 * 1024;

/// The most attribute bytes a message holds: the element list and the two names (each
/// checked in [`ElemsMsg::new`]), below `nft_nlmsg_maxsize()` (64 KiB and a page) less the
/// 20 bytes of headers.
const MAX_ATTR_BYTES: usize = 64 * 1024;

impl ElemsMsg {
    /// The elements `elems` of `set`; none for a flush or a dump.
    ///
    /// The message checks its own size: if the [`ElemDesc::size_bound`]s add up to more than
    /// [`MAX_ELEMS_BYTES`] it is refused with [`EncodeError::ElementsTooLarge`], whoever
    /// packed the list (the batch packs by the smaller [`super::ELEMS_PER_MSG_BYTES`]); so is
    /// a message whose encoding exceeds `MAX_ATTR_BYTES`, which the `unsafe` [`NlMsg`]
    /// implementation relies on.
    pub fn new(
        family: u16,
        table: &str,
        set: &str,
        elems: &[ElemDesc],
    ) -> Result<Self, EncodeError> {
        let size_bound: usize = elems.iter().map(ElemDesc::size_bound).sum();
        let too_large = |bytes| EncodeError::ElementsTooLarge {
            set: set.to_owned(),
            elements: elems.len(),
            bytes,
            limit: MAX_ELEMS_BYTES,
        };
        if size_bound > MAX_ELEMS_BYTES {
            return Err(too_large(size_bound));
        }
        // Names go to the kernel NUL-terminated: refuse what libnftnl could not carry.
        no_nul("table name", table)?;
        no_nul("set name", set)?;
        for chain in elems.iter().filter_map(|e| e.verdict.as_ref()?.1.as_ref()) {
            no_nul("verdict chain", chain)?;
        }
        let mut attrs = Vec::with_capacity(size_bound + 2 * 256);
        encode::elem_list_attrs(&mut attrs, table, set, elems);
        if attrs.len() > MAX_ATTR_BYTES {
            return Err(too_large(attrs.len()));
        }
        Ok(Self { attrs, family })
    }

    /// # Safety
    /// `buf` has room for [`nftnl::nft_nlmsg_maxsize`] bytes.
    unsafe fn build(&self, buf: *mut c_void, msg_type: i32, flags: u16, seq: u32) {
        // SAFETY: the caller provides nft_nlmsg_maxsize() bytes; the headers take 20 and
        // `new` keeps the attributes within MAX_ATTR_BYTES, which together fit. The
        // attributes are copied right after the headers (whose length is a multiple of 4)
        // and counted in the message's length.
        unsafe {
            let nlh = header_at(buf, msg_type, self.family, flags, seq);
            let len = (*nlh).nlmsg_len as usize;
            std::ptr::copy_nonoverlapping(
                self.attrs.as_ptr(),
                buf.cast::<u8>().add(len),
                self.attrs.len(),
            );
            (*nlh).nlmsg_len += self.attrs.len() as u32;
        }
    }

    /// This message as a request of its own (`GETSETELEM`: a dump with `NLM_F_DUMP`, a
    /// lookup of the elements otherwise), written into `buf`.
    pub fn request<'b>(&self, buf: &'b mut AlignedBuf, flags: u16, seq: u32) -> &'b [u8] {
        let room = nftnl::nft_nlmsg_maxsize() as usize;
        buf.reserve(room);
        let bytes = buf.bytes_mut();
        let ptr = bytes.as_mut_ptr().cast::<c_void>();
        // SAFETY: bytes holds at least nft_nlmsg_maxsize() bytes (reserved above).
        unsafe { self.build(ptr, libc::NFT_MSG_GETSETELEM, flags | ACK, seq) };
        let len = header(bytes)
            .map_or(0, |h| h.nlmsg_len as usize)
            .min(bytes.len());
        &bytes[..len]
    }
}

// SAFETY: `new` keeps the attributes within MAX_ATTR_BYTES, so a message stays below
// nft_nlmsg_maxsize() (64 KiB + a page).
unsafe impl NlMsg for ElemsMsg {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let (ty, flags) = match msg_type {
            MsgType::Add => (libc::NFT_MSG_NEWSETELEM, CREATE | EXCL | ACK),
            MsgType::Del => (libc::NFT_MSG_DELSETELEM, ACK),
        };
        // SAFETY: the caller provides the room (NlMsg contract).
        unsafe { self.build(buf, ty, flags, seq) }
    }
}

/// A message that notes the sequence number the batch gives it (`nftnl::Batch` numbers its
/// messages itself and does not tell).
pub struct Noted<'a, T> {
    /// The message.
    pub msg: &'a T,
    /// Where its sequence number goes.
    pub seq: &'a Cell<u32>,
}

// SAFETY: writes exactly what the wrapped message writes.
unsafe impl<T: NlMsg> NlMsg for Noted<'_, T> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        self.seq.set(seq);
        // SAFETY: the caller's guarantee (room for the largest message) is passed on.
        unsafe { self.msg.write(buf, seq, msg_type) }
    }
}

/// A rule for `nftnl`'s batch: `nftnl::Rule` with our expressions and comment.
pub fn rule<'a>(
    chain: &'a nftnl::Chain<'a>,
    insns: &[Insn],
    comment: Option<&str>,
) -> Result<nftnl::Rule<'a>, EncodeError> {
    // Built first, so that a failure leaves no half-built rule.
    let exprs = insns
        .iter()
        .map(build_expr)
        .collect::<Result<Vec<_>, _>>()?;
    let comment = comment.map(|c| cstr("rule comment", c)).transpose()?;
    let mut r = nftnl::Rule::new(chain);
    for e in exprs {
        r.add_expr(&Handover(Cell::new(Some(e))));
    }
    if let Some(c) = comment {
        r.set_comment(&c)
            .map_err(|reason| EncodeError::RuleComment {
                comment: c.to_string_lossy().into_owned(),
                reason,
            })?;
    }
    Ok(r)
}

/// An expression built by [`build_expr`], handed to `nftnl::Rule::add_expr` (which takes
/// ownership of what `to_expr` returns) exactly once.
struct Handover(Cell<Option<Expr>>);

impl nftnl::expr::Expression for Handover {
    fn to_expr(&self, _rule: &nftnl::Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let e = self
            .0
            .take()
            .expect("a Handover is passed to one add_expr call, which calls to_expr once");
        NonNull::new(e.into_raw()).expect("Expr::new never holds a null expression")
    }
}

struct Expr(*mut sys::nftnl_expr);

impl Expr {
    fn new(name: &'static str) -> Result<Self, EncodeError> {
        let n = cstr("expression name", name)?;
        // SAFETY: n is a valid C string; a null return is handled.
        let p = unsafe { sys::nftnl_expr_alloc(n.as_ptr()) };
        if p.is_null() {
            Err(EncodeError::Expression { name })
        } else {
            Ok(Self(p))
        }
    }
    fn u32(&self, attr: u32, v: u32) -> &Self {
        // SAFETY: self.0 is a live expression; attr is one of its attributes.
        unsafe { sys::nftnl_expr_set_u32(self.0, attr as u16, v) };
        self
    }
    fn u8(&self, attr: u32, v: u8) -> &Self {
        // SAFETY: as above.
        unsafe { sys::nftnl_expr_set_u8(self.0, attr as u16, v) };
        self
    }
    fn data(&self, attr: u32, d: &[u8]) -> &Self {
        // SAFETY: as above; libnftnl copies `d`.
        unsafe {
            sys::nftnl_expr_set(
                self.0,
                attr as u16,
                d.as_ptr() as *const c_void,
                d.len() as u32,
            )
        };
        self
    }
    fn str(&self, attr: u32, what: &'static str, s: &str) -> Result<&Self, EncodeError> {
        let c = cstr(what, s)?;
        // SAFETY: as above; libnftnl copies the string.
        unsafe { sys::nftnl_expr_set_str(self.0, attr as u16, c.as_ptr()) };
        Ok(self)
    }
}

impl Expr {
    /// Gives up ownership (to a rule or a set, which frees the expression).
    fn into_raw(mut self) -> *mut sys::nftnl_expr {
        std::mem::replace(&mut self.0, std::ptr::null_mut())
    }
}

impl Drop for Expr {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: not yet handed to a rule (the pointer is nulled when it is).
            unsafe { sys::nftnl_expr_free(self.0) }
        }
    }
}

fn build_expr(i: &Insn) -> Result<Expr, EncodeError> {
    Ok(match i {
        Insn::Payload {
            base,
            offset,
            len,
            dreg,
        } => {
            let e = Expr::new("payload")?;
            e.u32(sys::NFTNL_EXPR_PAYLOAD_DREG, *dreg)
                .u32(sys::NFTNL_EXPR_PAYLOAD_BASE, *base)
                .u32(sys::NFTNL_EXPR_PAYLOAD_OFFSET, *offset)
                .u32(sys::NFTNL_EXPR_PAYLOAD_LEN, *len);
            e
        }
        Insn::Meta { key, dreg } => {
            let e = Expr::new("meta")?;
            e.u32(sys::NFTNL_EXPR_META_KEY, *key)
                .u32(sys::NFTNL_EXPR_META_DREG, *dreg);
            e
        }
        Insn::MetaSet { key, sreg } => {
            let e = Expr::new("meta")?;
            e.u32(sys::NFTNL_EXPR_META_KEY, *key)
                .u32(sys::NFTNL_EXPR_META_SREG, *sreg);
            e
        }
        Insn::Ct { key, dir, dreg } => {
            let e = Expr::new("ct")?;
            e.u32(sys::NFTNL_EXPR_CT_KEY, *key)
                .u32(sys::NFTNL_EXPR_CT_DREG, *dreg);
            if let Some(d) = dir {
                e.u8(sys::NFTNL_EXPR_CT_DIR, *d);
            }
            e
        }
        Insn::Fib {
            flags,
            result,
            dreg,
        } => {
            let e = Expr::new("fib")?;
            e.u32(sys::NFTNL_EXPR_FIB_FLAGS, *flags)
                .u32(sys::NFTNL_EXPR_FIB_RESULT, *result)
                .u32(sys::NFTNL_EXPR_FIB_DREG, *dreg);
            e
        }
        Insn::Cmp { op, sreg, data } => {
            let e = Expr::new("cmp")?;
            e.u32(sys::NFTNL_EXPR_CMP_SREG, *sreg)
                .u32(sys::NFTNL_EXPR_CMP_OP, *op)
                .data(sys::NFTNL_EXPR_CMP_DATA, data);
            e
        }
        Insn::Bitwise {
            sreg,
            dreg,
            mask,
            xor,
        } => {
            let e = Expr::new("bitwise")?;
            e.u32(sys::NFTNL_EXPR_BITWISE_SREG, *sreg)
                .u32(sys::NFTNL_EXPR_BITWISE_DREG, *dreg)
                .u32(sys::NFTNL_EXPR_BITWISE_LEN, mask.len() as u32)
                .data(sys::NFTNL_EXPR_BITWISE_MASK, mask)
                .data(sys::NFTNL_EXPR_BITWISE_XOR, xor);
            e
        }
        Insn::Lookup {
            sreg,
            set,
            dreg,
            invert,
        } => {
            let e = Expr::new("lookup")?;
            e.u32(sys::NFTNL_EXPR_LOOKUP_SREG, *sreg).str(
                sys::NFTNL_EXPR_LOOKUP_SET,
                "set name",
                set,
            )?;
            if let Some(d) = dreg {
                e.u32(sys::NFTNL_EXPR_LOOKUP_DREG, *d);
            }
            if *invert {
                e.u32(sys::NFTNL_EXPR_LOOKUP_FLAGS, libc::NFT_LOOKUP_F_INV as u32);
            }
            e
        }
        Insn::Jhash {
            sreg,
            len,
            modulus,
            dreg,
        } => {
            let e = Expr::new("hash")?;
            e.u32(sys::NFTNL_EXPR_HASH_SREG, *sreg)
                .u32(sys::NFTNL_EXPR_HASH_LEN, *len)
                .u32(sys::NFTNL_EXPR_HASH_MODULUS, *modulus)
                .u32(sys::NFTNL_EXPR_HASH_SEED, 0)
                .u32(sys::NFTNL_EXPR_HASH_OFFSET, 0)
                .u32(sys::NFTNL_EXPR_HASH_TYPE, 0) // NFT_HASH_JENKINS
                .u32(sys::NFTNL_EXPR_HASH_DREG, *dreg);
            e
        }
        Insn::Numgen { dreg, modulus } => {
            let e = Expr::new("numgen")?;
            e.u32(sys::NFTNL_EXPR_NG_DREG, *dreg)
                .u32(sys::NFTNL_EXPR_NG_MODULUS, *modulus)
                .u32(sys::NFTNL_EXPR_NG_TYPE, 1) // NFT_NG_RANDOM
                .u32(sys::NFTNL_EXPR_NG_OFFSET, 0);
            e
        }
        Insn::Dnat {
            family,
            addr_reg,
            proto_reg,
        } => {
            let e = Expr::new("nat")?;
            e.u32(sys::NFTNL_EXPR_NAT_TYPE, libc::NFT_NAT_DNAT as u32)
                .u32(sys::NFTNL_EXPR_NAT_FAMILY, *family)
                .u32(sys::NFTNL_EXPR_NAT_REG_ADDR_MIN, *addr_reg)
                .u32(sys::NFTNL_EXPR_NAT_REG_PROTO_MIN, *proto_reg);
            e
        }
        Insn::Masq { flags } => {
            let e = Expr::new("masq")?;
            if *flags != 0 {
                e.u32(sys::NFTNL_EXPR_MASQ_FLAGS, *flags);
            }
            e
        }
        Insn::Reject { kind, code } => {
            let e = Expr::new("reject")?;
            e.u32(sys::NFTNL_EXPR_REJECT_TYPE, *kind)
                .u8(sys::NFTNL_EXPR_REJECT_CODE, *code);
            e
        }
        Insn::Counter => Expr::new("counter")?,
        Insn::Verdict { code, chain } => {
            let e = Expr::new("immediate")?;
            e.u32(sys::NFTNL_EXPR_IMM_DREG, libc::NFT_REG_VERDICT as u32)
                .u32(sys::NFTNL_EXPR_IMM_VERDICT, *code as u32);
            if let Some(c) = chain {
                e.str(sys::NFTNL_EXPR_IMM_CHAIN, "chain name", c)?;
            }
            e
        }
        Insn::Immediate { dreg, data } => {
            let e = Expr::new("immediate")?;
            e.u32(sys::NFTNL_EXPR_IMM_DREG, *dreg)
                .data(sys::NFTNL_EXPR_IMM_DATA, data);
            e
        }
        Insn::Dynset {
            op,
            set,
            sreg_key,
            sreg_data,
        } => {
            let e = Expr::new("dynset")?;
            e.u32(sys::NFTNL_EXPR_DYNSET_OP, *op)
                .u32(sys::NFTNL_EXPR_DYNSET_SREG_KEY, *sreg_key)
                .str(sys::NFTNL_EXPR_DYNSET_SET_NAME, "set name", set)?;
            if let Some(d) = sreg_data {
                e.u32(sys::NFTNL_EXPR_DYNSET_SREG_DATA, *d);
            }
            e
        }
    })
}

/// A receive (or request) buffer aligned for `nlmsghdr`, as `mnl` requires.
#[derive(Debug, Default)]
pub struct AlignedBuf(Vec<u64>);

impl AlignedBuf {
    /// A buffer of at least `bytes` bytes.
    pub fn with_len(bytes: usize) -> Self {
        let mut b = Self::default();
        b.reserve(bytes);
        b
    }

    /// Grows the buffer to at least `bytes` bytes.
    pub fn reserve(&mut self, bytes: usize) {
        let words = bytes.div_ceil(8);
        if self.0.len() < words {
            self.0.resize(words, 0);
        }
    }

    /// The buffer as bytes.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.0.len() * 8;
        // SAFETY: the Vec holds `len` initialised bytes; u8 has no alignment requirement and
        // any byte written is a valid part of a u64.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), len) }
    }
}

/// The header of a netlink message (`None` if `msg` is shorter than one).
pub fn header(msg: &[u8]) -> Option<libc::nlmsghdr> {
    if msg.len() < std::mem::size_of::<libc::nlmsghdr>() {
        return None;
    }
    // SAFETY: msg holds at least size_of::<nlmsghdr>() readable bytes; read_unaligned has no
    // alignment requirement; nlmsghdr is plain integers, valid for any bytes.
    Some(unsafe { std::ptr::read_unaligned(msg.as_ptr().cast::<libc::nlmsghdr>()) })
}

/// The family number and name of the table in one `NEWTABLE` message of a dump, as libnftnl
/// parses it (`nftnl_table_nlmsg_parse`).
pub fn parse_table(nlh: &libc::nlmsghdr) -> io::Result<(u32, String)> {
    // SAFETY: plain allocation; the result is checked for null before use.
    let t = unsafe { sys::nftnl_table_alloc() };
    if t.is_null() {
        return Err(io::Error::other("nftnl_table_alloc failed"));
    }
    // SAFETY: nlh is a whole message inside the received buffer (mnl validated its length
    // before calling us); t is a live table that receives the parsed attributes.
    let parsed = if unsafe { sys::nftnl_table_nlmsg_parse(nlh, t) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        // SAFETY: t is live and parsed; nftnl_table_get_str returns null or a NUL-terminated
        // string owned by t, copied here before t is freed below.
        let name = unsafe { sys::nftnl_table_get_str(t, sys::NFTNL_TABLE_NAME as u16) };
        // SAFETY: t is live; the family is a plain u32 attribute (0 when absent).
        let family = unsafe { sys::nftnl_table_get_u32(t, sys::NFTNL_TABLE_FAMILY as u16) };
        if name.is_null() {
            Err(io::Error::other("a dumped table has no name"))
        } else {
            // SAFETY: name is non-null and NUL-terminated (see above), valid while t lives.
            let name = unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned();
            Ok((family, name))
        }
    };
    // SAFETY: t was allocated above and is not used after this.
    unsafe { sys::nftnl_table_free(t) };
    parsed
}

/// Appends the elements of one `NEWSETELEM` message of a dump to `out`, as libnftnl parses
/// them (`nftnl_set_elems_nlmsg_parse`).
pub fn parse_elements(nlh: &libc::nlmsghdr, out: &mut Vec<DumpedElement>) -> io::Result<()> {
    let s = Set::new().map_err(io::Error::other)?;
    // SAFETY: nlh is a whole message inside the received buffer (mnl validated its length
    // before calling us); s.0 is a live set that receives the parsed elements.
    if unsafe { sys::nftnl_set_elems_nlmsg_parse(nlh, s.0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: s.0 is live; the callback gets `out` back as the data pointer, which lives and
    // is not otherwise borrowed for the duration of the call.
    unsafe {
        sys::nftnl_set_elem_foreach(
            s.0,
            Some(dumped_element),
            (out as *mut Vec<DumpedElement>).cast::<c_void>(),
        )
    };
    Ok(())
}

/// `nftnl_set_elem_foreach` callback: one parsed element into the `Vec<DumpedElement>` at
/// `data`.
unsafe extern "C" fn dumped_element(e: *mut sys::nftnl_set_elem, data: *mut c_void) -> c_int {
    // SAFETY: data is the &mut Vec<DumpedElement> given to nftnl_set_elem_foreach by
    // parse_elements; e is a live element of the set being walked.
    unsafe {
        let out = &mut *data.cast::<Vec<DumpedElement>>();
        let bytes = |attr: u32| -> Option<Vec<u8>> {
            if !sys::nftnl_set_elem_is_set(e, attr as u16) {
                return None;
            }
            let mut len = 0u32;
            let p = sys::nftnl_set_elem_get(e, attr as u16, &mut len);
            (!p.is_null())
                .then(|| std::slice::from_raw_parts(p.cast::<u8>(), len as usize).to_vec())
        };
        let flags = if sys::nftnl_set_elem_is_set(e, sys::NFTNL_SET_ELEM_FLAGS as u16) {
            sys::nftnl_set_elem_get_u32(e, sys::NFTNL_SET_ELEM_FLAGS as u16)
        } else {
            0
        };
        let mut counter: Option<ElementCounter> = None;
        sys::nftnl_set_elem_expr_foreach(
            e,
            Some(counter_of),
            (&mut counter as *mut Option<ElementCounter>).cast::<c_void>(),
        );
        out.push(DumpedElement {
            key: bytes(sys::NFTNL_SET_ELEM_KEY).unwrap_or_default(),
            key_end: bytes(sys::NFTNL_SET_ELEM_KEY_END),
            flags,
            data: bytes(sys::NFTNL_SET_ELEM_DATA),
            counter,
        });
    }
    0
}

/// `nftnl_set_elem_expr_foreach` callback: the first `counter` expression's values into the
/// `Option<ElementCounter>` at `data`.
unsafe extern "C" fn counter_of(e: *mut sys::nftnl_expr, data: *mut c_void) -> c_int {
    // SAFETY: data is the &mut Option<ElementCounter> given by dumped_element; e is a live
    // expression of the element; the name is a NUL-terminated string owned by libnftnl.
    unsafe {
        let out = &mut *data.cast::<Option<ElementCounter>>();
        let name = sys::nftnl_expr_get_str(e, sys::NFTNL_EXPR_NAME as u16);
        if out.is_none() && !name.is_null() && CStr::from_ptr(name) == c"counter" {
            *out = Some(ElementCounter {
                packets: sys::nftnl_expr_get_u64(e, sys::NFTNL_EXPR_CTR_PACKETS as u16),
                bytes: sys::nftnl_expr_get_u64(e, sys::NFTNL_EXPR_CTR_BYTES as u16),
            });
        }
    }
    0
}

/// A `NETLINK_NETFILTER` socket: `mnl::Socket`, plus what it lacks.
pub struct Socket {
    inner: mnl::Socket,
}

// SAFETY: mnl::Socket owns a heap-allocated `struct mnl_socket` (an fd and an address) that
// nothing else references; libmnl keeps no thread-local state, so moving it to another thread
// is sound. It is not shared between threads (no Sync).
unsafe impl Send for Socket {}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("fd", &self.inner.as_raw_fd())
            .field("portid", &self.inner.portid())
            .finish()
    }
}

fn check(ret: c_int) -> io::Result<c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl Socket {
    /// Opens and binds a netfilter netlink socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        let inner = mnl::Socket::new(mnl::Bus::Netfilter)?;
        let fd = inner.as_raw_fd();
        // SAFETY: fcntl(2) on the fd mnl just opened (mnl opens without SOCK_CLOEXEC).
        check(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) })?;
        let sock = Self { inner };
        // Errors carry only the failing header, not a copy of a possibly huge message.
        sock.setsockopt_int(libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1)?;
        Ok(sock)
    }

    /// The socket as `mnl` sees it (send, port id).
    pub fn mnl(&self) -> &mnl::Socket {
        &self.inner
    }

    fn setsockopt_int(&self, level: c_int, opt: c_int, v: c_int) -> io::Result<()> {
        // SAFETY: the fd is open; the option value is a live c_int of the stated size.
        check(unsafe {
            libc::setsockopt(
                self.inner.as_raw_fd(),
                level,
                opt,
                &v as *const c_int as *const c_void,
                std::mem::size_of::<c_int>() as libc::socklen_t,
            )
        })
        .map(drop)
    }

    /// Sizes the send buffer (`SO_SNDBUFFORCE`, falling back to `SO_SNDBUF`, which the
    /// kernel caps at `net.core.wmem_max`).
    pub fn set_sndbuf(&self, bytes: usize) -> io::Result<()> {
        let v = c_int::try_from(bytes).unwrap_or(c_int::MAX);
        self.setsockopt_int(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, v)
            .or_else(|_| self.setsockopt_int(libc::SOL_SOCKET, libc::SO_SNDBUF, v))
    }

    /// Sizes the receive buffer (`SO_RCVBUFFORCE`, falling back to `SO_RCVBUF`).
    pub fn set_rcvbuf(&self, bytes: usize) -> io::Result<()> {
        let v = c_int::try_from(bytes).unwrap_or(c_int::MAX);
        self.setsockopt_int(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, v)
            .or_else(|_| self.setsockopt_int(libc::SOL_SOCKET, libc::SO_RCVBUF, v))
    }

    /// Receives one datagram into `buf` with `mnl`, waiting at most `timeout_ms` for it (0:
    /// only what is queued); `Ok(0)` when none came.
    pub fn recv(&self, buf: &mut AlignedBuf, timeout_ms: c_int) -> io::Result<usize> {
        let mut pfd = libc::pollfd {
            fd: self.inner.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is one live pollfd.
        if check(unsafe { libc::poll(&mut pfd, 1, timeout_ms) })? == 0 {
            return Ok(0);
        }
        self.inner.recv_raw(buf.bytes_mut())
    }
}

/// Moves the calling *thread* into the network namespace `ns` (e.g. an open
/// `/run/netns/NAME`). Sockets opened afterwards by this thread live in that namespace.
pub fn enter_netns(ns: &std::fs::File) -> io::Result<()> {
    // SAFETY: setns(2) on an open namespace fd; it only affects the calling thread.
    check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message libnftnl writes for `elems` (the way elements were encoded before
    /// `encode::elem_list_attrs`): the reference our bytes must equal.
    fn libnftnl_message(family: u16, table: &str, set: &str, elems: &[ElemDesc]) -> Vec<u8> {
        let s = SetMsg::named(family, table, set).expect("names").s;
        for e in elems {
            // SAFETY: s.0 is a live set; each element is allocated, filled (libnftnl copies
            // the data) and handed over to the set, which frees it.
            unsafe {
                let el = sys::nftnl_set_elem_alloc();
                assert!(!el.is_null());
                sys::nftnl_set_elem_add(s.0, el);
                let put = |attr: u32, b: &[u8]| {
                    sys::nftnl_set_elem_set(el, attr as u16, b.as_ptr().cast(), b.len() as u32)
                };
                put(sys::NFTNL_SET_ELEM_KEY, &e.key);
                if let Some(k) = &e.key_end {
                    put(sys::NFTNL_SET_ELEM_KEY_END, k);
                }
                if e.flags != 0 {
                    sys::nftnl_set_elem_set_u32(el, sys::NFTNL_SET_ELEM_FLAGS as u16, e.flags);
                }
                if let Some((code, chain)) = &e.verdict {
                    sys::nftnl_set_elem_set_u32(
                        el,
                        sys::NFTNL_SET_ELEM_VERDICT as u16,
                        *code as u32,
                    );
                    if let Some(c) = chain {
                        let c = cstr("verdict chain", c).expect("no NUL");
                        sys::nftnl_set_elem_set_str(
                            el,
                            sys::NFTNL_SET_ELEM_CHAIN as u16,
                            c.as_ptr(),
                        );
                    }
                }
                if let Some(d) = &e.data {
                    put(sys::NFTNL_SET_ELEM_DATA, d);
                }
                if let Some(t) = e.timeout_ms {
                    sys::nftnl_set_elem_set_u64(el, sys::NFTNL_SET_ELEM_TIMEOUT as u16, t);
                }
                if let Some(u) = &e.udata {
                    put(sys::NFTNL_SET_ELEM_USERDATA, u);
                }
            }
        }
        let mut buf = AlignedBuf::with_len(nftnl::nft_nlmsg_maxsize() as usize);
        let bytes = buf.bytes_mut();
        // SAFETY: bytes holds nft_nlmsg_maxsize() bytes; s.0 is a live set.
        unsafe {
            let nlh = header_at(
                bytes.as_mut_ptr().cast(),
                libc::NFT_MSG_NEWSETELEM,
                family,
                CREATE | EXCL | ACK,
                9,
            );
            sys::nftnl_set_elems_nlmsg_build_payload(nlh, s.0);
        }
        let len = header(bytes).expect("a header").nlmsg_len as usize;
        bytes[..len].to_vec()
    }

    fn ours(family: u16, table: &str, set: &str, elems: &[ElemDesc]) -> Vec<u8> {
        let msg = ElemsMsg::new(family, table, set, elems).expect("fits");
        let mut buf = AlignedBuf::with_len(nftnl::nft_nlmsg_maxsize() as usize);
        let bytes = buf.bytes_mut();
        // SAFETY: bytes holds nft_nlmsg_maxsize() bytes (the NlMsg contract).
        unsafe { msg.write(bytes.as_mut_ptr().cast(), 9, MsgType::Add) };
        let len = header(bytes).expect("a header").nlmsg_len as usize;
        bytes[..len].to_vec()
    }

    fn elem(key: &[u8]) -> ElemDesc {
        ElemDesc {
            key: key.to_vec(),
            key_end: None,
            flags: 0,
            verdict: None,
            data: None,
            timeout_ms: None,
            udata: None,
        }
    }

    #[test]
    fn element_lists_are_encoded_byte_for_byte_as_libnftnl_encodes_them() {
        let v4 = [10, 96, 0, 10];
        // ip . proto . port . bucket, each field padded to 4 bytes.
        let concat = [10, 96, 0, 10, 6, 0, 0, 0, 0, 80, 0, 0, 3, 0, 0, 0];
        let cases: Vec<(&str, Vec<ElemDesc>)> = vec![
            ("a flush or a dump: no elements", vec![]),
            ("one address", vec![elem(&v4)]),
            (
                "odd key lengths are padded",
                vec![elem(&[6]), elem(&[0, 80]), elem(&[1, 2, 3])],
            ),
            ("an IPv6 address", vec![elem(&[0xfd; 16])]),
            (
                "endpoint map: concatenated key and data",
                vec![ElemDesc {
                    data: Some(vec![10, 244, 1, 10, 31, 144, 0, 0]),
                    ..elem(&concat)
                }],
            ),
            (
                "verdict map: goto a chain, with a comment",
                vec![ElemDesc {
                    verdict: Some((libc::NFT_GOTO, Some("pick-3".into()))),
                    udata: Some(vec![
                        0, 14, b'd', b'e', b'm', b'o', b'/', b'w', b'e', b'b', b':', b'h', b't',
                        b't', b'p', 0,
                    ]),
                    ..elem(&concat[..12])
                }],
            ),
            (
                "verdicts without a chain, chain names of every length mod 4",
                ["r", "re", "rej", "reje", "rejec"]
                    .iter()
                    .map(|c| ElemDesc {
                        verdict: Some((libc::NFT_JUMP, Some((*c).into()))),
                        ..elem(&v4)
                    })
                    .chain([ElemDesc {
                        verdict: Some((libc::NF_DROP, None)),
                        ..elem(&v4)
                    }])
                    .collect(),
            ),
            (
                "interval: a range end and an end flag",
                vec![
                    ElemDesc {
                        key_end: Some(vec![10, 255, 255, 255]),
                        ..elem(&[10, 0, 0, 0])
                    },
                    ElemDesc {
                        flags: libc::NFT_SET_ELEM_INTERVAL_END as u32,
                        ..elem(&[11, 0, 0, 0])
                    },
                ],
            ),
            (
                "affinity entry: a timeout and data",
                vec![ElemDesc {
                    timeout_ms: Some(10_800_000),
                    data: Some(vec![10, 244, 1, 11, 0x1f, 0x90, 0, 0]),
                    ..elem(&[10, 100, 0, 2, 10, 96, 0, 10, 6, 0, 0, 0, 0, 80, 0, 0])
                }],
            ),
        ];
        for (what, elems) in &cases {
            for family in [2, 10] {
                assert_eq!(
                    ours(family, "lb-proxy", "endpoints", elems),
                    libnftnl_message(family, "lb-proxy", "endpoints", elems),
                    "{what}, family {family}"
                );
            }
        }
        // A full message of a full sync's size.
        let many: Vec<ElemDesc> = (0..300u32)
            .map(|i| ElemDesc {
                data: Some(i.to_be_bytes().repeat(2)),
                ..elem(&i.to_be_bytes().repeat(4))
            })
            .collect();
        assert_eq!(
            ours(2, "t", "s", &many),
            libnftnl_message(2, "t", "s", &many),
            "300 elements"
        );
    }

    #[test]
    fn names_with_a_nul_are_refused_naming_what_holds_it() {
        let e = ElemDesc {
            verdict: Some((libc::NFT_GOTO, Some("pick\0".into()))),
            ..elem(&[1, 2, 3, 4])
        };
        let err = |r: Result<ElemsMsg, EncodeError>| match r {
            Err(EncodeError::Nul { what, .. }) => what,
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("accepted"),
        };
        assert_eq!(err(ElemsMsg::new(2, "t", "s", &[e])), "verdict chain");
        assert_eq!(err(ElemsMsg::new(2, "t\0", "s", &[])), "table name");
        assert_eq!(err(ElemsMsg::new(2, "t", "s\0", &[])), "set name");
    }
}
