//! The only module with `unsafe`: libnftnl objects serialised into netlink messages, the
//! netfilter netlink socket, and entering a network namespace.
//!
//! Every libnftnl object is owned by a small RAII wrapper, built, serialised into a scratch
//! buffer far larger than the message can be, copied out, and freed.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nftnl_sys as sys;
use nftnl_sys::libc::{c_char, c_void};

use super::encode::{ElemDesc, Insn, SetDesc};

/// Room for any message we build: rules are a few hundred bytes, element messages are packed
/// to at most [`super::ELEMS_PER_MSG_BYTES`] (estimated conservatively).
const SCRATCH: usize = 256 * 1024;

fn cstr(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("NUL byte in {s:?}"))
}

macro_rules! owned {
    ($name:ident, $ty:ty, $alloc:path, $free:path) => {
        struct $name(*mut $ty);
        impl $name {
            fn new() -> Result<Self, String> {
                // SAFETY: the allocator takes no arguments; a null return is handled.
                let p = unsafe { $alloc() };
                if p.is_null() {
                    Err("libnftnl allocation failed".into())
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
owned!(
    Rule,
    sys::nftnl_rule,
    sys::nftnl_rule_alloc,
    sys::nftnl_rule_free
);

/// Writes one message (header from libnftnl, payload from `fill`) and appends it to `out`.
fn with_msg(
    out: &mut Vec<u8>,
    msg_type: u16,
    family: u16,
    flags: u16,
    seq: u32,
    fill: impl FnOnce(*mut libc::nlmsghdr),
) {
    let mut scratch = vec![0u8; SCRATCH];
    // SAFETY: scratch is SCRATCH bytes, enough for the header and any payload we build (see
    // SCRATCH); the header pointer stays inside scratch for the duration of `fill`.
    let len = unsafe {
        let nlh = sys::nftnl_nlmsg_build_hdr(
            scratch.as_mut_ptr() as *mut c_char,
            msg_type,
            family,
            flags,
            seq,
        );
        fill(nlh);
        (*nlh).nlmsg_len as usize
    };
    assert!(
        len <= SCRATCH,
        "netlink message overflowed its scratch buffer"
    );
    out.extend_from_slice(&scratch[..len]);
}

/// NEWTABLE.
pub fn table_msg(
    out: &mut Vec<u8>,
    seq: u32,
    flags: u16,
    family: u16,
    name: &str,
    udata: Option<&[u8]>,
) -> Result<(), String> {
    let t = Table::new()?;
    let name = cstr(name)?;
    // SAFETY: t.0 is a live table; strings and data are copied by libnftnl.
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
    let msg = libc::NFT_MSG_NEWTABLE as u16;
    // SAFETY: nlh points into a scratch buffer large enough for a table message.
    with_msg(out, msg, family, flags, seq, |nlh| unsafe {
        sys::nftnl_table_nlmsg_build_payload(nlh, t.0)
    });
    Ok(())
}

/// Base chain properties: hook number, priority, type, policy.
pub type BaseDesc<'a> = (u32, i32, &'a str, u32);

/// NEWCHAIN.
#[allow(clippy::too_many_arguments)]
pub fn chain_msg(
    out: &mut Vec<u8>,
    seq: u32,
    flags: u16,
    family: u16,
    table: &str,
    name: &str,
    base: Option<BaseDesc<'_>>,
    udata: Option<&[u8]>,
) -> Result<(), String> {
    let c = Chain::new()?;
    let (table, name) = (cstr(table)?, cstr(name)?);
    let kind = base.map(|b| cstr(b.2)).transpose()?;
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
    let msg = libc::NFT_MSG_NEWCHAIN as u16;
    // SAFETY: nlh points into a scratch buffer large enough for a chain message.
    with_msg(out, msg, family, flags, seq, |nlh| unsafe {
        sys::nftnl_chain_nlmsg_build_payload(nlh, c.0)
    });
    Ok(())
}

/// NEWSET.
#[allow(clippy::too_many_arguments)]
pub fn set_msg(
    out: &mut Vec<u8>,
    seq: u32,
    flags: u16,
    family: u16,
    table: &str,
    name: &str,
    id: u32,
    d: &SetDesc,
) -> Result<(), String> {
    // libnftnl counts the field lengths up to the first zero in an array of 16.
    if d.concat.len() >= 16 || d.concat.contains(&0) {
        return Err(format!(
            "interval concatenation of {} fields is not encodable",
            d.concat.len()
        ));
    }
    let s = Set::new()?;
    let (table, name) = (cstr(table)?, cstr(name)?);
    // SAFETY: s.0 is a live set; libnftnl copies strings and data.
    unsafe {
        sys::nftnl_set_set_str(s.0, sys::NFTNL_SET_TABLE as u16, table.as_ptr());
        sys::nftnl_set_set_str(s.0, sys::NFTNL_SET_NAME as u16, name.as_ptr());
        sys::nftnl_set_set_u32(s.0, sys::NFTNL_SET_FAMILY as u16, u32::from(family));
        sys::nftnl_set_set_u32(s.0, sys::NFTNL_SET_ID as u16, id);
        sys::nftnl_set_set_u32(s.0, sys::NFTNL_SET_FLAGS as u16, d.flags);
        sys::nftnl_set_set_u32(s.0, sys::NFTNL_SET_KEY_TYPE as u16, d.key_type);
        sys::nftnl_set_set_u32(s.0, sys::NFTNL_SET_KEY_LEN as u16, d.key_len);
        if let Some(dt) = d.data_type {
            sys::nftnl_set_set_u32(s.0, sys::NFTNL_SET_DATA_TYPE as u16, dt);
            sys::nftnl_set_set_u32(s.0, sys::NFTNL_SET_DATA_LEN as u16, d.data_len);
        }
        if let Some(t) = d.timeout_ms {
            sys::nftnl_set_set_u64(s.0, sys::NFTNL_SET_TIMEOUT as u16, t);
        }
        if !d.concat.is_empty() {
            // Copied into a zeroed array of 16 (checked above).
            sys::nftnl_set_set_data(
                s.0,
                sys::NFTNL_SET_DESC_CONCAT as u16,
                d.concat.as_ptr() as *const c_void,
                d.concat.len() as u32,
            );
        }
        sys::nftnl_set_set_data(
            s.0,
            sys::NFTNL_SET_USERDATA as u16,
            d.udata.as_ptr() as *const c_void,
            d.udata.len() as u32,
        );
    }
    if d.counter {
        let mut e = Expr::new("counter")?;
        // SAFETY: the set takes ownership of the expression (freed with the set, and encoded
        // as NFTA_SET_EXPR when it is the only one); we null our pointer so Drop does not
        // free it again.
        unsafe { sys::nftnl_set_add_expr(s.0, e.0) };
        e.0 = std::ptr::null_mut();
    }
    let msg = libc::NFT_MSG_NEWSET as u16;
    // SAFETY: nlh points into a scratch buffer large enough for a set message.
    with_msg(out, msg, family, flags, seq, |nlh| unsafe {
        sys::nftnl_set_nlmsg_build_payload(nlh, s.0)
    });
    Ok(())
}

/// NEWSETELEM / DELSETELEM with a non-empty list of elements (the kernel rejects empty ones).
#[allow(clippy::too_many_arguments)]
pub fn elems_msg(
    out: &mut Vec<u8>,
    msg_type: u16,
    seq: u32,
    flags: u16,
    family: u16,
    table: &str,
    set: &str,
    elems: &[ElemDesc],
) -> Result<(), String> {
    if elems.is_empty() {
        return Err("empty element list".into());
    }
    let s = Set::new()?;
    let (table, set) = (cstr(table)?, cstr(set)?);
    // SAFETY: s.0 is a live set; every element is allocated, filled (libnftnl copies the
    // data) and handed over to the set, which frees it.
    unsafe {
        sys::nftnl_set_set_str(s.0, sys::NFTNL_SET_TABLE as u16, table.as_ptr());
        sys::nftnl_set_set_str(s.0, sys::NFTNL_SET_NAME as u16, set.as_ptr());
        sys::nftnl_set_set_u32(s.0, sys::NFTNL_SET_FAMILY as u16, u32::from(family));
        for e in elems {
            let el = sys::nftnl_set_elem_alloc();
            if el.is_null() {
                return Err("libnftnl allocation failed".into());
            }
            sys::nftnl_set_elem_set(
                el,
                sys::NFTNL_SET_ELEM_KEY as u16,
                e.key.as_ptr() as *const c_void,
                e.key.len() as u32,
            );
            if let Some(k) = &e.key_end {
                sys::nftnl_set_elem_set(
                    el,
                    sys::NFTNL_SET_ELEM_KEY_END as u16,
                    k.as_ptr() as *const c_void,
                    k.len() as u32,
                );
            }
            if e.flags != 0 {
                sys::nftnl_set_elem_set_u32(el, sys::NFTNL_SET_ELEM_FLAGS as u16, e.flags);
            }
            if let Some((code, chain)) = &e.verdict {
                sys::nftnl_set_elem_set_u32(el, sys::NFTNL_SET_ELEM_VERDICT as u16, *code as u32);
                if let Some(c) = chain {
                    let c = match cstr(c) {
                        Ok(c) => c,
                        Err(err) => {
                            sys::nftnl_set_elem_free(el);
                            return Err(err);
                        }
                    };
                    sys::nftnl_set_elem_set_str(el, sys::NFTNL_SET_ELEM_CHAIN as u16, c.as_ptr());
                }
            }
            if let Some(d) = &e.data {
                sys::nftnl_set_elem_set(
                    el,
                    sys::NFTNL_SET_ELEM_DATA as u16,
                    d.as_ptr() as *const c_void,
                    d.len() as u32,
                );
            }
            if let Some(t) = e.timeout_ms {
                sys::nftnl_set_elem_set_u64(el, sys::NFTNL_SET_ELEM_TIMEOUT as u16, t);
            }
            if let Some(u) = &e.udata {
                sys::nftnl_set_elem_set(
                    el,
                    sys::NFTNL_SET_ELEM_USERDATA as u16,
                    u.as_ptr() as *const c_void,
                    u.len() as u32,
                );
            }
            sys::nftnl_set_elem_add(s.0, el);
        }
    }
    // SAFETY: nlh points into a scratch buffer; the caller packs elements so that the
    // message stays far below SCRATCH (see ElemDesc::size_bound).
    with_msg(out, msg_type, family, flags, seq, |nlh| unsafe {
        sys::nftnl_set_elems_nlmsg_build_payload(nlh, s.0)
    });
    Ok(())
}

struct Expr(*mut sys::nftnl_expr);

impl Expr {
    fn new(name: &str) -> Result<Self, String> {
        let n = cstr(name)?;
        // SAFETY: n is a valid C string; a null return is handled.
        let p = unsafe { sys::nftnl_expr_alloc(n.as_ptr()) };
        if p.is_null() {
            Err(format!("libnftnl has no expression {name}"))
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
    fn str(&self, attr: u32, s: &str) -> Result<&Self, String> {
        let c = cstr(s)?;
        // SAFETY: as above; libnftnl copies the string.
        unsafe { sys::nftnl_expr_set_str(self.0, attr as u16, c.as_ptr()) };
        Ok(self)
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

fn build_expr(i: &Insn) -> Result<Expr, String> {
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
            e.u32(sys::NFTNL_EXPR_LOOKUP_SREG, *sreg)
                .str(sys::NFTNL_EXPR_LOOKUP_SET, set)?;
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
                e.str(sys::NFTNL_EXPR_IMM_CHAIN, c)?;
            }
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
                .str(sys::NFTNL_EXPR_DYNSET_SET_NAME, set)?;
            if let Some(d) = sreg_data {
                e.u32(sys::NFTNL_EXPR_DYNSET_SREG_DATA, *d);
            }
            e
        }
    })
}

/// NEWRULE (appended).
#[allow(clippy::too_many_arguments)]
pub fn rule_msg(
    out: &mut Vec<u8>,
    seq: u32,
    flags: u16,
    family: u16,
    table: &str,
    chain: &str,
    insns: &[Insn],
    udata: Option<&[u8]>,
) -> Result<(), String> {
    let r = Rule::new()?;
    let (table, chain) = (cstr(table)?, cstr(chain)?);
    // SAFETY: r.0 is a live rule; libnftnl copies strings and data.
    unsafe {
        sys::nftnl_rule_set_str(r.0, sys::NFTNL_RULE_TABLE as u16, table.as_ptr());
        sys::nftnl_rule_set_str(r.0, sys::NFTNL_RULE_CHAIN as u16, chain.as_ptr());
        sys::nftnl_rule_set_u32(r.0, sys::NFTNL_RULE_FAMILY as u16, u32::from(family));
        if let Some(u) = udata {
            sys::nftnl_rule_set_data(
                r.0,
                sys::NFTNL_RULE_USERDATA as u16,
                u.as_ptr() as *const c_void,
                u.len() as u32,
            );
        }
    }
    for i in insns {
        let mut e = build_expr(i)?;
        // SAFETY: the rule takes ownership of the expression; we null our pointer so Drop
        // does not free it again.
        unsafe { sys::nftnl_rule_add_expr(r.0, e.0) };
        e.0 = std::ptr::null_mut();
    }
    let msg = libc::NFT_MSG_NEWRULE as u16;
    // SAFETY: nlh points into a scratch buffer far larger than any rule message.
    with_msg(out, msg, family, flags, seq, |nlh| unsafe {
        sys::nftnl_rule_nlmsg_build_payload(nlh, r.0)
    });
    Ok(())
}

/// A `NETLINK_NETFILTER` socket.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn setsockopt_int(fd: &OwnedFd, level: i32, opt: i32, v: i32) -> io::Result<()> {
    // SAFETY: fd is open; the option value is a live c_int of the stated size.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            &v as *const i32 as *const c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    })
    .map(drop)
}

impl Socket {
    /// Opens and binds a netfilter netlink socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the fd is owned right away.
        let fd = check(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        })?;
        // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; zeroed is a valid value (pid 0: kernel assigns).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: sa is a valid sockaddr_nl of the given size.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        // Errors carry only the failing header, not a copy of a possibly huge message.
        setsockopt_int(&fd, libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1)?;
        Ok(Self { fd })
    }

    /// Sizes the send buffer (`SO_SNDBUFFORCE`, falling back to `SO_SNDBUF`, which the
    /// kernel caps at `net.core.wmem_max`).
    pub fn set_sndbuf(&self, bytes: usize) -> io::Result<()> {
        let v = i32::try_from(bytes).unwrap_or(i32::MAX);
        setsockopt_int(&self.fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, v)
            .or_else(|_| setsockopt_int(&self.fd, libc::SOL_SOCKET, libc::SO_SNDBUF, v))
    }

    /// Sizes the receive buffer (`SO_RCVBUFFORCE`, falling back to `SO_RCVBUF`).
    pub fn set_rcvbuf(&self, bytes: usize) -> io::Result<()> {
        let v = i32::try_from(bytes).unwrap_or(i32::MAX);
        setsockopt_int(&self.fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, v)
            .or_else(|_| setsockopt_int(&self.fd, libc::SOL_SOCKET, libc::SO_RCVBUF, v))
    }

    /// Sends the whole batch with one `sendmsg` (one iovec). The kernel processes the batch
    /// synchronously inside this call.
    pub fn send(&self, buf: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_nl zeroed = the kernel (pid 0).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        let mut iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut c_void,
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; zeroed then filled with pointers that outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = &mut sa as *mut libc::sockaddr_nl as *mut c_void;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_nl>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        // SAFETY: msg points at live, correctly sized buffers; the kernel only reads them.
        let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != buf.len() {
            return Err(io::Error::other(format!(
                "short send: {n} of {} bytes",
                buf.len()
            )));
        }
        Ok(())
    }

    /// Receives one datagram without blocking; `Ok(0)` when nothing is queued.
    pub fn recv_nonblocking(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is a live, writable buffer of the given length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        Ok(n as usize)
    }
}

impl Socket {
    /// Receives one datagram, waiting at most `timeout_ms` for it; `Ok(0)` on timeout.
    pub fn recv_wait(&self, buf: &mut [u8], timeout_ms: i32) -> io::Result<usize> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is one live pollfd.
        let n = check(unsafe { libc::poll(&mut pfd, 1, timeout_ms) })?;
        if n == 0 {
            return Ok(0);
        }
        self.recv_nonblocking(buf)
    }
}

/// Moves the calling *thread* into the network namespace `ns` (e.g. an open
/// `/run/netns/NAME`). Sockets opened afterwards by this thread live in that namespace.
pub fn enter_netns(ns: &std::fs::File) -> io::Result<()> {
    // SAFETY: setns(2) on an open namespace fd; it only affects the calling thread.
    check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }).map(drop)
}
