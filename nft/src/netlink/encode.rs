//! Safe half of the netlink backend: IR → kernel-level descriptions (expression lists with
//! allocated registers, set attributes and userdata, element bytes). `sys` turns these into
//! libnftnl objects and netlink messages.
//!
//! The encodings mirror what nft 1.0.6 itself emits (checked with `nft --debug=netlink`), so
//! that `nft list ruleset` prints what we program exactly as it would print its own rules.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::ir::{
    ChainType, CmpOp, CtKey, CtState, CtStatus, DataType, DynsetOp, Element, ElementData, Expr,
    Family, FibAddr, Hook, KeySpec, MapData, MarkOp, MetaKey, NatFamily, Payload, Policy, Rule,
    SetSpec, Stmt, Value, Verdict,
};

/// One kernel expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Insn {
    /// `payload load len @ base + offset => dreg`
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// `meta load key => dreg`
    Meta { key: u32, dreg: u32 },
    /// `meta set key with sreg`
    MetaSet { key: u32, sreg: u32 },
    /// `ct load key => dreg [, dir]`
    Ct {
        key: u32,
        dir: Option<u8>,
        dreg: u32,
    },
    /// `fib flags result => dreg`
    Fib { flags: u32, result: u32, dreg: u32 },
    /// `cmp op sreg data`
    Cmp { op: u32, sreg: u32, data: Vec<u8> },
    /// `bitwise dreg = (sreg & mask) ^ xor`
    Bitwise {
        sreg: u32,
        dreg: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// `lookup sreg set [dreg] [inv]`
    Lookup {
        sreg: u32,
        set: String,
        dreg: Option<u32>,
        invert: bool,
    },
    /// `numgen dreg = random mod m`
    Numgen { dreg: u32, modulus: u32 },
    /// `hash dreg = jhash(sreg, len, seed 0) % m`
    Jhash {
        sreg: u32,
        len: u32,
        modulus: u32,
        dreg: u32,
    },
    /// `nat dnat family addr_min reg proto_min reg`
    Dnat {
        family: u32,
        addr_reg: u32,
        proto_reg: u32,
    },
    /// `masq flags`
    Masq { flags: u32 },
    /// `reject type code`
    Reject { kind: u32, code: u8 },
    /// `counter`
    Counter,
    /// `immediate reg 0 verdict [chain]`
    Verdict { code: i32, chain: Option<String> },
    /// `immediate reg N data`: a constant into registers, unpadded (the kernel zeroes the
    /// rest of the last 32-bit register), as nft loads a constant field of a concatenation.
    Immediate { dreg: u32, data: Vec<u8> },
    /// `dynset op reg_key set sreg_data`
    Dynset {
        op: u32,
        set: String,
        sreg_key: u32,
        sreg_data: Option<u32>,
    },
}

/// Register number for the 32-bit register at `off`, spelled as nft does: the 128-bit
/// register `NFT_REG_n` when aligned to one, else `NFT_REG32_xx`.
pub fn reg(off: usize) -> u32 {
    if off % 4 == 0 {
        1 + (off / 4) as u32
    } else {
        libc::NFT_REG32_00 as u32 + off as u32
    }
}

// nft's datatype numbers (src/datatype.h), concatenated 6 bits at a time.
fn type_id(t: DataType) -> u32 {
    match t {
        DataType::Integer => 4,
        DataType::Ipv4Addr => 7,
        DataType::Ipv6Addr => 8,
        DataType::InetProto => 12,
        DataType::InetService => 13,
        DataType::Mark => 19,
    }
}

fn byteorder(t: DataType) -> u32 {
    // BYTEORDER_HOST_ENDIAN = 1, BYTEORDER_BIG_ENDIAN = 2
    match t {
        DataType::Mark | DataType::Integer => 1,
        _ => 2,
    }
}

/// Concatenated type id, key length in bytes (single fields unpadded, concatenations padded
/// to 4 bytes per field) and byteorder for set userdata.
pub fn type_info(types: &[DataType]) -> (u32, u32, u32) {
    let id = types.iter().fold(0u32, |acc, t| (acc << 6) | type_id(*t));
    if let [t] = types {
        (id, t.byte_len() as u32, byteorder(*t))
    } else {
        (id, types.iter().map(|t| t.regs() as u32 * 4).sum(), 0)
    }
}

/// Bytes of one value as the kernel compares it (unpadded).
pub fn value_bytes(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    put_value(&mut out, v);
    out
}

/// Appends [`value_bytes`] of `v` to `out`.
fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Ipv4(a) => out.extend_from_slice(&a.octets()),
        Value::Ipv6(a) => out.extend_from_slice(&a.octets()),
        Value::Ipv4Net(n) => out.extend_from_slice(&n.network().octets()),
        Value::Ipv6Net(n) => out.extend_from_slice(&n.network().octets()),
        Value::Proto(p) => out.push(*p),
        Value::Port(p) => out.extend_from_slice(&p.to_be_bytes()),
        Value::Mark(m) | Value::Integer(m) => out.extend_from_slice(&m.to_ne_bytes()),
        Value::IfName(n) => out.extend_from_slice(&n.bytes()),
    }
}

/// Bytes of a key or data tuple: a single value unpadded, a concatenation padded per field.
pub fn tuple_bytes(vals: &[Value]) -> Vec<u8> {
    if let [v] = vals {
        return value_bytes(v);
    }
    // A field takes at most 16 bytes (an IPv6 address, an interface name).
    let mut out = Vec::with_capacity(vals.len() * 16);
    for v in vals {
        put_value(&mut out, v);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    out
}

/// One value of type `t` from its bytes as the kernel holds them (the inverse of
/// [`value_bytes`]); `None` when the length is wrong.
pub fn value_from_bytes(t: DataType, b: &[u8]) -> Option<Value> {
    Some(match t {
        DataType::Ipv4Addr => Value::Ipv4(Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?)),
        DataType::Ipv6Addr => Value::Ipv6(Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?)),
        DataType::InetProto => Value::Proto(u8::from_ne_bytes(b.try_into().ok()?)),
        DataType::InetService => Value::Port(u16::from_be_bytes(b.try_into().ok()?)),
        DataType::Mark => Value::Mark(u32::from_ne_bytes(b.try_into().ok()?)),
        DataType::Integer => Value::Integer(u32::from_ne_bytes(b.try_into().ok()?)),
    })
}

/// A key or data tuple of `types` from its bytes (the inverse of [`tuple_bytes`]: a single
/// value unpadded, a concatenation padded to 4 bytes per field); `None` when the length does
/// not match.
pub fn tuple_from_bytes(types: &[DataType], b: &[u8]) -> Option<Vec<Value>> {
    if let [t] = types {
        return Some(vec![value_from_bytes(*t, b)?]);
    }
    let mut out = Vec::with_capacity(types.len());
    let mut off = 0;
    for t in types {
        let field = b.get(off..off + t.byte_len())?;
        out.push(value_from_bytes(*t, field)?);
        off += t.regs() * 4;
    }
    (off == b.len()).then_some(out)
}

// ---------------------------------------------------------------------------------------
// nftnl userdata (TLV: u8 type, u8 len, value; u32 in host order)

fn ud_u32(out: &mut Vec<u8>, ty: u8, v: u32) {
    out.extend([ty, 4]);
    out.extend(v.to_ne_bytes());
}

fn ud_str(out: &mut Vec<u8>, ty: u8, s: &str) {
    out.extend([ty, (s.len() + 1) as u8]);
    out.extend(s.as_bytes());
    out.push(0);
}

fn ud_nest(out: &mut Vec<u8>, ty: u8, inner: &[u8]) {
    out.extend([ty, inner.len() as u8]);
    out.extend(inner);
}

/// Userdata holding just a comment (tables, chains, rules, elements: attribute 0).
pub fn comment_udata(c: &Option<String>) -> Option<Vec<u8>> {
    c.as_ref().map(|c| {
        let mut v = Vec::new();
        ud_str(&mut v, 0, c);
        v
    })
}

// nft's expression type numbers (enum expr_types) and per-expression udata.
fn expr_udata(e: &Expr) -> (u32, Vec<u8>) {
    let mut d = Vec::new();
    let (desc, field) = match e {
        Expr::Payload(p) => match p {
            Payload::IpSaddr => (12, 11),
            Payload::IpDaddr => (12, 12),
            // Field indexes in nft's ip6 header template (1 version, 2 dscp, 3 ecn,
            // 4 flowlabel, 5 length, 6 nexthdr, 7 hoplimit, 8 saddr, 9 daddr), not offsets.
            Payload::Ip6Saddr => (13, 8),
            Payload::Ip6Daddr => (13, 9),
            Payload::ThSport => (11, 1),
            Payload::ThDport => (11, 2),
            Payload::TcpSport => (8, 1),
            Payload::TcpDport => (8, 2),
            Payload::UdpSport => (6, 1),
            Payload::UdpDport => (6, 2),
        },
        Expr::Meta(k) => {
            ud_u32(&mut d, 0, meta_key(*k));
            return (9, d);
        }
        Expr::Ct(k) => {
            let (key, dir) = ct_key(*k);
            ud_u32(&mut d, 0, key);
            ud_u32(&mut d, 1, u32::from(dir.unwrap_or(0)));
            return (12, d);
        }
        // A jhash is never a set's `typeof` key here (maps are typed by `numgen`, the same
        // 32-bit integer); described as one so the match stays total. Nor is a constant
        // (key material of `update` statements only); described as a one-bucket `numgen`.
        Expr::Const(_) => {
            ud_u32(&mut d, 0, 1); // NFT_NG_RANDOM
            ud_u32(&mut d, 1, 1);
            ud_u32(&mut d, 2, 0);
            return (23, d);
        }
        Expr::NumgenRandom { modulus } | Expr::Jhash { modulus, .. } => {
            ud_u32(&mut d, 0, 1); // NFT_NG_RANDOM
            ud_u32(&mut d, 1, *modulus);
            ud_u32(&mut d, 2, 0);
            return (23, d);
        }
    };
    ud_u32(&mut d, 0, desc);
    ud_u32(&mut d, 1, field);
    (7, d)
}

fn typeof_udata(es: &[Expr]) -> Vec<u8> {
    let mut out = Vec::new();
    if let [e] = es {
        let (ty, d) = expr_udata(e);
        ud_u32(&mut out, 0, ty);
        ud_nest(&mut out, 1, &d);
        return out;
    }
    let mut concat = Vec::new();
    for (i, e) in es.iter().enumerate() {
        let (ty, d) = expr_udata(e);
        let mut sub = Vec::new();
        ud_u32(&mut sub, 0, ty);
        ud_nest(&mut sub, 1, &d);
        ud_nest(&mut concat, i as u8, &sub);
    }
    ud_u32(&mut out, 0, 13); // EXPR_CONCAT
    ud_nest(&mut out, 1, &concat);
    out
}

/// Kernel-level description of a set or map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetDesc {
    /// `NFT_SET_*` flags.
    pub flags: u32,
    /// Concatenated key type id.
    pub key_type: u32,
    /// Key length.
    pub key_len: u32,
    /// Data type id (`NFT_DATA_VERDICT` for verdict maps), maps only.
    pub data_type: Option<u32>,
    /// Data length.
    pub data_len: u32,
    /// Default timeout.
    pub timeout_ms: Option<u64>,
    /// The most elements the set may hold (`NFTA_SET_DESC_SIZE`).
    pub size: Option<u32>,
    /// Field lengths in bytes (unpadded) of an interval concatenation
    /// (`NFTA_SET_DESC_CONCAT`, which selects the kernel's pipapo set); empty otherwise.
    pub concat: Vec<u8>,
    /// Userdata (byteorder, typeof, comment) for nft's listing.
    pub udata: Vec<u8>,
    /// A counter expression on the set (`NFTA_SET_EXPR`), which the kernel gives every
    /// element, as nft does for `counter` in a set declaration.
    pub counter: bool,
}

/// `NFT_SET_CONCAT` (not in the libc crate): the key is a concatenation whose fields are
/// ranges; set together with `NFT_SET_INTERVAL`, as nft does.
pub const NFT_SET_CONCAT: u32 = 0x80;

/// Describes a set for the kernel.
pub fn set_desc(spec: &SetSpec) -> SetDesc {
    let key_types = spec.key.types();
    let (key_type, key_len, key_order) = type_info(&key_types);
    let mut flags = 0u32;
    let f = spec.flags;
    let concat = if f.interval && key_types.len() > 1 {
        flags |= NFT_SET_CONCAT;
        key_types.iter().map(|t| t.byte_len() as u8).collect()
    } else {
        Vec::new()
    };
    for (on, bit) in [
        (f.constant, libc::NFT_SET_CONSTANT),
        (f.interval, libc::NFT_SET_INTERVAL),
        (f.timeout, libc::NFT_SET_TIMEOUT),
        (f.dynamic, libc::NFT_SET_EVAL),
        (spec.data.is_some(), libc::NFT_SET_MAP),
    ] {
        if on {
            flags |= bit as u32;
        }
    }
    let mut udata = Vec::new();
    ud_u32(&mut udata, 0, key_order);
    let (data_type, data_len) = match &spec.data {
        None => (None, 0),
        Some(MapData::Verdict) => {
            ud_u32(&mut udata, 1, 0);
            (Some(libc::NFT_DATA_VERDICT), 0)
        }
        Some(MapData::Values(d)) => {
            let (id, len, order) = type_info(&d.types());
            ud_u32(&mut udata, 1, order);
            (Some(id), len)
        }
    };
    if let KeySpec::Typeof(es) = &spec.key {
        ud_nest(&mut udata, 3, &typeof_udata(es));
    }
    if let Some(MapData::Values(KeySpec::Typeof(es))) = &spec.data {
        ud_nest(&mut udata, 4, &typeof_udata(es));
    }
    if let Some(MapData::Values(_)) = &spec.data {
        ud_u32(&mut udata, 6, 0); // NFTNL_UDATA_SET_DATA_INTERVAL, as nft writes it
    }
    if let Some(c) = &spec.comment {
        ud_str(&mut udata, 7, c);
    }
    SetDesc {
        flags,
        key_type,
        key_len,
        data_type,
        data_len,
        timeout_ms: spec.timeout.map(|t| t.as_millis() as u64),
        size: spec.size,
        concat,
        udata,
        counter: f.counter,
    }
}

/// Kernel-level description of one element (a single-field interval prefix becomes two).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElemDesc {
    /// Key bytes (for a range in a concatenation: each field's first value).
    pub key: Vec<u8>,
    /// Range end of an interval concatenation (`NFTA_SET_ELEM_KEY_END`): each field's last
    /// value, inclusive.
    pub key_end: Option<Vec<u8>>,
    /// `NFT_SET_ELEM_INTERVAL_END` or 0.
    pub flags: u32,
    /// Verdict data.
    pub verdict: Option<(i32, Option<String>)>,
    /// Value data.
    pub data: Option<Vec<u8>>,
    /// Timeout.
    pub timeout_ms: Option<u64>,
    /// Userdata (comment).
    pub udata: Option<Vec<u8>>,
}

impl ElemDesc {
    /// Conservative upper bound of the element's netlink size, for packing messages.
    pub fn size_bound(&self) -> usize {
        96 + self.key.len()
            + self.key_end.as_ref().map_or(0, |k| k.len() + 8)
            + self.data.as_ref().map_or(0, Vec::len)
            + self
                .verdict
                .as_ref()
                .and_then(|(_, c)| c.as_ref())
                .map_or(0, |c| c.len() + 8)
            + self.udata.as_ref().map_or(0, |u| u.len() + 8)
    }
}

// Attribute numbers of nf_tables' element messages and of netlink nests, from the kernel's
// `include/uapi/linux/netfilter/nf_tables.h` and `linux/netlink.h` (stable ABI; the `libc`
// crate does not carry these).
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NLA_F_NESTED: u16 = 1 << 15;

/// Appends a netlink attribute (`struct nlattr`, then the value, padded to 4 bytes).
fn put_attr(out: &mut Vec<u8>, ty: u16, value: &[u8]) {
    let len = u16::try_from(4 + value.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// Appends a string attribute with its terminating NUL.
fn put_strz(out: &mut Vec<u8>, ty: u16, s: &str) {
    let len = u16::try_from(4 + s.len() + 1).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(s.as_bytes());
    out.push(0);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// Opens a nested attribute; [`nest_end`] writes its length.
fn nest_start(out: &mut Vec<u8>, ty: u16) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    at
}

fn nest_end(out: &mut [u8], at: usize) {
    let len = u16::try_from(out.len() - at).unwrap_or(u16::MAX);
    out[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

/// The attributes of an element-list message (NEWSETELEM, DELSETELEM, GETSETELEM) after its
/// headers: the set and table names, then each element of `elems` (none: a flush or a dump
/// of the whole set), byte for byte as libnftnl's `nftnl_set_elems_nlmsg_build_payload`
/// writes them, without its per-element objects. Names must hold no NUL (the caller checks).
pub fn elem_list_attrs(out: &mut Vec<u8>, table: &str, set: &str, elems: &[ElemDesc]) {
    put_strz(out, NFTA_SET_ELEM_LIST_SET, set);
    put_strz(out, NFTA_SET_ELEM_LIST_TABLE, table);
    if elems.is_empty() {
        return;
    }
    let list = nest_start(out, NFTA_SET_ELEM_LIST_ELEMENTS);
    for (i, e) in elems.iter().enumerate() {
        // libnftnl numbers the list's entries from 1; the kernel reads them in order.
        let elem = nest_start(
            out,
            u16::try_from(i + 1).unwrap_or(u16::MAX) & !NLA_F_NESTED,
        );
        if e.flags != 0 {
            put_attr(out, NFTA_SET_ELEM_FLAGS, &e.flags.to_be_bytes());
        }
        if let Some(t) = e.timeout_ms {
            put_attr(out, NFTA_SET_ELEM_TIMEOUT, &t.to_be_bytes());
        }
        let key = nest_start(out, NFTA_SET_ELEM_KEY);
        put_attr(out, NFTA_DATA_VALUE, &e.key);
        nest_end(out, key);
        if let Some(k) = &e.key_end {
            let key_end = nest_start(out, NFTA_SET_ELEM_KEY_END);
            put_attr(out, NFTA_DATA_VALUE, k);
            nest_end(out, key_end);
        }
        if let Some((code, chain)) = &e.verdict {
            let data = nest_start(out, NFTA_SET_ELEM_DATA);
            let verdict = nest_start(out, NFTA_DATA_VERDICT);
            put_attr(out, NFTA_VERDICT_CODE, &code.to_be_bytes());
            if let Some(c) = chain {
                put_strz(out, NFTA_VERDICT_CHAIN, c);
            }
            nest_end(out, verdict);
            nest_end(out, data);
        }
        if let Some(d) = &e.data {
            let data = nest_start(out, NFTA_SET_ELEM_DATA);
            put_attr(out, NFTA_DATA_VALUE, d);
            nest_end(out, data);
        }
        if let Some(u) = &e.udata {
            put_attr(out, NFTA_SET_ELEM_USERDATA, u);
        }
        nest_end(out, elem);
    }
    nest_end(out, list);
}

fn verdict_code(v: &Verdict) -> (i32, Option<String>) {
    match v {
        Verdict::Accept => (libc::NF_ACCEPT, None),
        Verdict::Drop => (libc::NF_DROP, None),
        Verdict::Return => (libc::NFT_RETURN, None),
        Verdict::Jump(c) => (libc::NFT_JUMP, Some(c.clone())),
        Verdict::Goto(c) => (libc::NFT_GOTO, Some(c.clone())),
    }
}

/// End of a single-field interval (exclusive): the address after the prefix, `None` at the
/// top of the address space (the interval then runs to the end).
fn interval_end(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::Ipv4Net(n) => {
            let b = u32::from(n.broadcast()).checked_add(1)?;
            Some(Ipv4Addr::from(b).octets().to_vec())
        }
        Value::Ipv6Net(n) => {
            let b = u128::from(n.broadcast()).checked_add(1)?;
            Some(Ipv6Addr::from(b).octets().to_vec())
        }
        Value::Ipv4(a) => Some(
            Ipv4Addr::from(u32::from(*a).checked_add(1)?)
                .octets()
                .to_vec(),
        ),
        Value::Ipv6(a) => Some(
            Ipv6Addr::from(u128::from(*a).checked_add(1)?)
                .octets()
                .to_vec(),
        ),
        _ => None,
    }
}

/// Last value of a field (inclusive): a prefix's last address, any other value itself.
fn range_last(v: &Value) -> Value {
    match v {
        Value::Ipv4Net(n) => Value::Ipv4(n.broadcast()),
        Value::Ipv6Net(n) => Value::Ipv6(n.broadcast()),
        other => *other,
    }
}

/// Describes an element to add. The key's shape picks the encoding, as nft 1.0.6 does:
/// - no prefix: one element;
/// - a single-field prefix (rbtree interval set): a start element and an
///   `NFT_SET_ELEM_INTERVAL_END` element at the address after the prefix (none when the
///   prefix reaches the top of the address space);
/// - a concatenation with a prefix (pipapo interval set): ONE element whose `KEY` holds each
///   field's first value and `KEY_END` each field's last value (a prefix's last address,
///   an exact field repeated), and no separate end element.
pub fn elem_descs(key: &[Value], e: &Element) -> Vec<ElemDesc> {
    let has_prefix = key.iter().any(Value::is_prefix);
    let mut d = ElemDesc {
        key: tuple_bytes(key),
        key_end: None,
        flags: 0,
        verdict: None,
        data: None,
        timeout_ms: e.timeout.map(|t| t.as_millis() as u64),
        udata: comment_udata(&e.comment),
    };
    match &e.data {
        Some(ElementData::Verdict(v)) => d.verdict = Some(verdict_code(v)),
        Some(ElementData::Values(v)) => d.data = Some(tuple_bytes(v)),
        None => {}
    }
    if has_prefix && key.len() > 1 {
        let last: Vec<Value> = key.iter().map(range_last).collect();
        d.key_end = Some(tuple_bytes(&last));
        return vec![d];
    }
    if has_prefix && key.first().and_then(interval_end).is_none() {
        // The interval reaches the top of the address space and has no end element; nft
        // marks it open in the element's userdata (NFTNL_UDATA_SET_ELEM_FLAGS =
        // NFTNL_SET_ELEM_F_INTERVAL_OPEN) and so do we.
        ud_u32(d.udata.get_or_insert_with(Vec::new), 1, 1);
    }
    let mut out = vec![d];
    if has_prefix {
        if let Some(end) = key.first().and_then(interval_end) {
            out.push(ElemDesc {
                key: end,
                key_end: None,
                flags: libc::NFT_SET_ELEM_INTERVAL_END as u32,
                verdict: None,
                data: None,
                timeout_ms: None,
                udata: None,
            });
        }
    }
    out
}

/// Describes an element to delete: key only, with the same interval shape as
/// [`elem_descs`] (the kernel finds an interval by its start and end).
pub fn elem_key_descs(key: &[Value]) -> Vec<ElemDesc> {
    elem_descs(key, &Element::default())
}

// ---------------------------------------------------------------------------------------
// Rules

fn meta_key(k: MetaKey) -> u32 {
    (match k {
        MetaKey::L4Proto => libc::NFT_META_L4PROTO,
        MetaKey::Mark => libc::NFT_META_MARK,
        MetaKey::IifName => libc::NFT_META_IIFNAME,
        MetaKey::OifName => libc::NFT_META_OIFNAME,
    }) as u32
}

fn ct_key(k: CtKey) -> (u32, Option<u8>) {
    let key = match k {
        CtKey::OriginalIpSaddr => libc::NFT_CT_SRC_IP,
        CtKey::OriginalIpDaddr => libc::NFT_CT_DST_IP,
        CtKey::OriginalIp6Saddr => libc::NFT_CT_SRC_IP6,
        CtKey::OriginalIp6Daddr => libc::NFT_CT_DST_IP6,
        CtKey::OriginalProtoDst => libc::NFT_CT_PROTO_DST,
    };
    (key as u32, Some(0)) // IP_CT_DIR_ORIGINAL
}

/// Where a hashed field is loaded before `jhash` reads it: the last four 32-bit registers
/// (`NFT_REG32_12`..`15`), above any key built here (at most ten 32-bit registers), as nft
/// itself loads it past the key.
const JHASH_SCRATCH: u32 = libc::NFT_REG32_12 as u32;

fn load(e: &Expr, dreg: u32, out: &mut Vec<Insn>) {
    let nh = libc::NFT_PAYLOAD_NETWORK_HEADER as u32;
    let th = libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32;
    let insn = match e {
        Expr::Jhash { of, modulus } => {
            load(&Expr::Payload(*of), JHASH_SCRATCH, out);
            let len = match of {
                Payload::Ip6Saddr | Payload::Ip6Daddr => 16,
                Payload::IpSaddr | Payload::IpDaddr => 4,
                _ => 2,
            };
            Insn::Jhash {
                sreg: JHASH_SCRATCH,
                len,
                modulus: *modulus,
                dreg,
            }
        }
        Expr::Payload(p) => {
            let (base, offset, len) = match p {
                Payload::IpSaddr => (nh, 12, 4),
                Payload::IpDaddr => (nh, 16, 4),
                Payload::Ip6Saddr => (nh, 8, 16),
                Payload::Ip6Daddr => (nh, 24, 16),
                Payload::ThSport | Payload::TcpSport | Payload::UdpSport => (th, 0, 2),
                Payload::ThDport | Payload::TcpDport | Payload::UdpDport => (th, 2, 2),
            };
            Insn::Payload {
                base,
                offset,
                len,
                dreg,
            }
        }
        Expr::Meta(k) => Insn::Meta {
            key: meta_key(*k),
            dreg,
        },
        Expr::Ct(k) => {
            let (key, dir) = ct_key(*k);
            Insn::Ct { key, dir, dreg }
        }
        Expr::NumgenRandom { modulus } => Insn::Numgen {
            dreg,
            modulus: *modulus,
        },
        // The value's own length, as nft sends it (the kernel zeroes the rest of the last
        // register; nft's listing reads a protocol back as one byte).
        Expr::Const(v) => Insn::Immediate {
            dreg,
            data: value_bytes(v),
        },
    };
    out.push(insn);
}

/// `meta l4proto == p` for `tcp dport` and friends (nft folds it back when listing).
fn l4proto_guards(es: &[Expr], out: &mut Vec<Insn>) {
    for e in es {
        if let Expr::Payload(p) = e {
            if let Some(proto) = p.implied_l4proto() {
                out.push(Insn::Meta {
                    key: libc::NFT_META_L4PROTO as u32,
                    dreg: reg(0),
                });
                out.push(Insn::Cmp {
                    op: libc::NFT_CMP_EQ as u32,
                    sreg: reg(0),
                    data: vec![proto],
                });
            }
        }
    }
}

/// Loads a concatenation from register offset `off`; returns the offset after it.
fn load_concat(es: &[Expr], mut off: usize, out: &mut Vec<Insn>) -> usize {
    for e in es {
        load(e, reg(off), out);
        off += e.datatype().regs();
    }
    off
}

fn cmp_op(op: CmpOp) -> u32 {
    (match op {
        CmpOp::Eq => libc::NFT_CMP_EQ,
        CmpOp::Ne => libc::NFT_CMP_NEQ,
    }) as u32
}

fn prefix_mask(bits: usize, len: u8) -> Vec<u8> {
    (0..bits / 8)
        .map(|i| {
            let start = i * 8;
            let ones = (len as usize).saturating_sub(start).min(8);
            if ones == 0 { 0 } else { 0xffu8 << (8 - ones) }
        })
        .collect()
}

fn bit_test(load_insn: Insn, bits: u32, op: u32, out: &mut Vec<Insn>) {
    out.push(load_insn);
    out.push(Insn::Bitwise {
        sreg: reg(0),
        dreg: reg(0),
        mask: bits.to_ne_bytes().to_vec(),
        xor: vec![0; 4],
    });
    out.push(Insn::Cmp {
        op,
        sreg: reg(0),
        data: vec![0; 4],
    });
}

/// Compiles a rule to kernel expressions. `family` picks the `reject` flavour.
pub fn rule_insns(family: Family, r: &Rule) -> Vec<Insn> {
    let mut out = Vec::new();
    let r1 = reg(0);
    for s in &r.stmts {
        match s {
            Stmt::Match { left, op, right } => {
                l4proto_guards(std::slice::from_ref(left), &mut out);
                load(left, r1, &mut out);
                let mut data = value_bytes(right);
                let plen = match right {
                    Value::Ipv4Net(n) if n.prefix_len() < 32 => Some((32, n.prefix_len())),
                    Value::Ipv6Net(n) if n.prefix_len() < 128 => Some((128, n.prefix_len())),
                    _ => None,
                };
                if let Some((bits, len)) = plen {
                    let mask = prefix_mask(bits, len);
                    out.push(Insn::Bitwise {
                        sreg: r1,
                        dreg: r1,
                        xor: vec![0; mask.len()],
                        mask,
                    });
                }
                if left.is_ifname() && !matches!(right, Value::IfName(n) if n.is_prefix()) {
                    data.resize(16, 0);
                }
                out.push(Insn::Cmp {
                    op: cmp_op(*op),
                    sreg: r1,
                    data,
                });
            }
            Stmt::MarkMatch { mask, op, value } => {
                out.push(Insn::Meta {
                    key: libc::NFT_META_MARK as u32,
                    dreg: r1,
                });
                out.push(Insn::Bitwise {
                    sreg: r1,
                    dreg: r1,
                    mask: mask.to_ne_bytes().to_vec(),
                    xor: vec![0; 4],
                });
                out.push(Insn::Cmp {
                    op: cmp_op(*op),
                    sreg: r1,
                    data: value.to_ne_bytes().to_vec(),
                });
            }
            Stmt::CtState(st) => {
                let bit = match st {
                    CtState::Invalid => 1,
                    CtState::Established => 2,
                    CtState::Related => 4,
                    CtState::New => 8,
                };
                let ld = Insn::Ct {
                    key: libc::NFT_CT_STATE as u32,
                    dir: None,
                    dreg: r1,
                };
                bit_test(ld, bit, libc::NFT_CMP_NEQ as u32, &mut out);
            }
            Stmt::CtStatus(st) => {
                let bit = match st {
                    CtStatus::Snat => 0x10,
                    CtStatus::Dnat => 0x20,
                };
                let ld = Insn::Ct {
                    key: libc::NFT_CT_STATUS as u32,
                    dir: None,
                    dreg: r1,
                };
                bit_test(ld, bit, libc::NFT_CMP_NEQ as u32, &mut out);
            }
            Stmt::FibLocal(a) => {
                let flags = match a {
                    FibAddr::Saddr => 1,
                    FibAddr::Daddr => 2,
                };
                out.push(Insn::Fib {
                    flags,
                    result: 3,
                    dreg: r1,
                }); // NFT_FIB_RESULT_ADDRTYPE
                out.push(Insn::Cmp {
                    op: libc::NFT_CMP_EQ as u32,
                    sreg: r1,
                    data: 2u32.to_ne_bytes().to_vec(), // RTN_LOCAL
                });
            }
            Stmt::Lookup { key, set, negate } => {
                l4proto_guards(key, &mut out);
                load_concat(key, 0, &mut out);
                out.push(Insn::Lookup {
                    sreg: r1,
                    set: set.clone(),
                    dreg: None,
                    invert: *negate,
                });
            }
            Stmt::Vmap { key, map } => {
                l4proto_guards(key, &mut out);
                load_concat(key, 0, &mut out);
                let dreg = Some(libc::NFT_REG_VERDICT as u32);
                out.push(Insn::Lookup {
                    sreg: r1,
                    set: map.clone(),
                    dreg,
                    invert: false,
                });
            }
            Stmt::DnatMap {
                family: nf,
                key,
                map,
            } => {
                l4proto_guards(key, &mut out);
                load_concat(key, 0, &mut out);
                out.push(Insn::Lookup {
                    sreg: r1,
                    set: map.clone(),
                    dreg: Some(r1),
                    invert: false,
                });
                let (fam, addr_regs) = match nf {
                    NatFamily::Ip => (libc::NFPROTO_IPV4 as u32, 1),
                    NatFamily::Ip6 => (libc::NFPROTO_IPV6 as u32, 4),
                };
                out.push(Insn::Dnat {
                    family: fam,
                    addr_reg: r1,
                    proto_reg: reg(addr_regs),
                });
            }
            Stmt::SetMark(op) => {
                let (mask, xor) = match op {
                    MarkOp::Or(b) => (!b, *b),
                    MarkOp::Xor(b) => (u32::MAX, *b),
                };
                out.push(Insn::Meta {
                    key: libc::NFT_META_MARK as u32,
                    dreg: r1,
                });
                out.push(Insn::Bitwise {
                    sreg: r1,
                    dreg: r1,
                    mask: mask.to_ne_bytes().to_vec(),
                    xor: xor.to_ne_bytes().to_vec(),
                });
                out.push(Insn::MetaSet {
                    key: libc::NFT_META_MARK as u32,
                    sreg: r1,
                });
            }
            Stmt::Dynset { op, set, key, data } => {
                let end = load_concat(key, 0, &mut out);
                let sreg_data = if data.is_empty() {
                    None
                } else {
                    // nft starts the data at the next 128-bit register. An IPv6 affinity
                    // key (40 bytes) and its data (20 bytes) do not fit that way (the kernel
                    // says ERANGE, nft 1.0.6 aborts), so the data then follows the key in
                    // the next 32-bit register.
                    let need: usize = data.iter().map(|e| e.datatype().regs()).sum();
                    let aligned = end.div_ceil(4) * 4;
                    let doff = if aligned + need <= 16 { aligned } else { end };
                    load_concat(data, doff, &mut out);
                    Some(reg(doff))
                };
                let op = match op {
                    DynsetOp::Add => libc::NFT_DYNSET_OP_ADD,
                    DynsetOp::Update => libc::NFT_DYNSET_OP_UPDATE,
                } as u32;
                out.push(Insn::Dynset {
                    op,
                    set: set.clone(),
                    sreg_key: r1,
                    sreg_data,
                });
            }
            Stmt::Counter => out.push(Insn::Counter),
            Stmt::Masquerade { fully_random } => {
                // NF_NAT_RANGE_PROTO_RANDOM_FULLY
                out.push(Insn::Masq {
                    flags: if *fully_random { 0x10 } else { 0 },
                });
            }
            Stmt::Reject => out.push(match family {
                Family::Ip => Insn::Reject { kind: 0, code: 3 }, // icmp port-unreachable
                Family::Ip6 => Insn::Reject { kind: 0, code: 4 }, // icmpv6 port-unreachable
                Family::Inet => Insn::Reject { kind: 2, code: 1 }, // icmpx port-unreachable
            }),
            Stmt::Verdict(v) => {
                let (code, chain) = verdict_code(v);
                out.push(Insn::Verdict { code, chain });
            }
        }
    }
    out
}

/// Netfilter protocol family number.
pub fn nfproto(f: Family) -> u16 {
    (match f {
        Family::Ip => libc::NFPROTO_IPV4,
        Family::Ip6 => libc::NFPROTO_IPV6,
        Family::Inet => libc::NFPROTO_INET,
    }) as u16
}

/// Hook number.
pub fn hooknum(h: Hook) -> u32 {
    (match h {
        Hook::Prerouting => libc::NF_INET_PRE_ROUTING,
        Hook::Input => libc::NF_INET_LOCAL_IN,
        Hook::Forward => libc::NF_INET_FORWARD,
        Hook::Output => libc::NF_INET_LOCAL_OUT,
        Hook::Postrouting => libc::NF_INET_POST_ROUTING,
    }) as u32
}

/// Chain type keyword.
pub fn chain_type(t: ChainType) -> &'static str {
    t.as_str()
}

/// Policy verdict.
pub fn policy(p: Policy) -> u32 {
    (match p {
        Policy::Accept => libc::NF_ACCEPT,
        Policy::Drop => libc::NF_DROP,
    }) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Expr, MetaKey, Payload};

    #[test]
    fn dnat_map_rule_allocates_registers_like_nft() {
        let key = vec![
            Expr::Payload(Payload::IpDaddr),
            Expr::Meta(MetaKey::L4Proto),
            Expr::Payload(Payload::ThDport),
            Expr::NumgenRandom { modulus: 3 },
        ];
        let r = Rule::new(vec![Stmt::DnatMap {
            family: NatFamily::Ip,
            key,
            map: "ep".into(),
        }]);
        let insns = rule_insns(Family::Ip, &r);
        // nft: payload => reg 1, meta => reg 9, payload => reg 10, numgen reg 11,
        // lookup reg 1 set ep dreg 1, nat dnat ip addr_min reg 1 proto_min reg 9
        let regs: Vec<u32> = insns
            .iter()
            .filter_map(|i| match i {
                Insn::Payload { dreg, .. } | Insn::Meta { dreg, .. } => Some(*dreg),
                Insn::Numgen { dreg, .. } => Some(*dreg),
                _ => None,
            })
            .collect();
        assert_eq!(regs, vec![1, 9, 10, 11]);
        assert_eq!(
            insns[5],
            Insn::Dnat {
                family: 2,
                addr_reg: 1,
                proto_reg: 9
            }
        );
    }

    #[test]
    fn affinity_dynset_puts_data_in_the_next_128_bit_register() {
        let r = Rule::new(vec![Stmt::Dynset {
            op: DynsetOp::Update,
            set: "aff".into(),
            key: vec![
                Expr::Payload(Payload::IpSaddr),
                Expr::Ct(CtKey::OriginalIpDaddr),
                Expr::Meta(MetaKey::L4Proto),
                Expr::Ct(CtKey::OriginalProtoDst),
            ],
            data: vec![
                Expr::Payload(Payload::IpDaddr),
                Expr::Payload(Payload::ThDport),
            ],
        }]);
        let insns = rule_insns(Family::Ip, &r);
        assert_eq!(
            insns.last(),
            Some(&Insn::Dynset {
                op: 1,
                set: "aff".into(),
                sreg_key: 1,
                sreg_data: Some(2)
            })
        );
        assert!(matches!(insns[5], Insn::Payload { dreg: 13, .. }));
    }

    #[test]
    fn constants_in_a_dynset_key_are_immediates_in_its_registers_as_nft_loads_them() {
        // nft --debug=netlink for
        // `update @aff { ip saddr . 10.96.0.10 . 6 . 80 : ip daddr . th dport }`:
        // payload => reg 1, immediate reg 9 0x0a00600a, reg 10 0x00000006, reg 11 0x00005000,
        // payload => reg 2, payload => reg 13, dynset update reg_key 1 sreg_data 2.
        let r = Rule::new(vec![Stmt::Dynset {
            op: DynsetOp::Update,
            set: "aff".into(),
            key: vec![
                Expr::Payload(Payload::IpSaddr),
                Expr::Const(Value::Ipv4("10.96.0.10".parse().expect("address"))),
                Expr::Const(Value::TCP),
                Expr::Const(Value::Port(80)),
            ],
            data: vec![
                Expr::Payload(Payload::IpDaddr),
                Expr::Payload(Payload::ThDport),
            ],
        }]);
        let insns = rule_insns(Family::Ip, &r);
        assert_eq!(
            insns[1..4],
            [
                Insn::Immediate {
                    dreg: 9,
                    data: vec![10, 96, 0, 10]
                },
                Insn::Immediate {
                    dreg: 10,
                    data: vec![6]
                },
                Insn::Immediate {
                    dreg: 11,
                    data: vec![0, 80]
                },
            ]
        );
        assert!(matches!(insns[4], Insn::Payload { dreg: 2, .. }));
        assert!(matches!(insns[5], Insn::Payload { dreg: 13, .. }));
        assert_eq!(
            insns.last(),
            Some(&Insn::Dynset {
                op: 1,
                set: "aff".into(),
                sreg_key: 1,
                sreg_data: Some(2)
            })
        );
    }

    #[test]
    fn typeof_userdata_matches_the_bytes_nft_writes() {
        // Captured from `nft --debug=mnl` for
        // `typeof ip daddr . meta l4proto . th dport . numgen random mod 3 : ip daddr . th dport`
        let spec = SetSpec::map(
            KeySpec::Typeof(vec![
                Expr::Payload(Payload::IpDaddr),
                Expr::Meta(MetaKey::L4Proto),
                Expr::Payload(Payload::ThDport),
                Expr::NumgenRandom { modulus: 3 },
            ]),
            MapData::Values(KeySpec::Typeof(vec![
                Expr::Payload(Payload::IpDaddr),
                Expr::Payload(Payload::ThDport),
            ])),
        );
        let d = set_desc(&spec);
        assert_eq!(
            (d.key_type, d.key_len, d.data_type, d.data_len),
            (0x1cc344, 16, Some(0x1cd), 8)
        );
        assert_eq!(d.udata.len(), 6 + 6 + 98 + 54 + 6);
        assert_eq!(&d.udata[12..20], &[3, 96, 0, 4, 13, 0, 0, 0]);
    }

    #[test]
    fn tuples_read_back_from_their_bytes() {
        let key = vec![
            v4("10.100.0.2"),
            v4("10.96.0.1"),
            Value::TCP,
            Value::Port(80),
        ];
        let types = [
            DataType::Ipv4Addr,
            DataType::Ipv4Addr,
            DataType::InetProto,
            DataType::InetService,
        ];
        assert_eq!(tuple_from_bytes(&types, &tuple_bytes(&key)), Some(key));
        let six = vec![
            Value::Ipv6("fd00::1".parse().expect("v6")),
            Value::Port(8080),
        ];
        let types6 = [DataType::Ipv6Addr, DataType::InetService];
        assert_eq!(tuple_from_bytes(&types6, &tuple_bytes(&six)), Some(six));
        let one = vec![Value::Port(443)];
        assert_eq!(
            tuple_from_bytes(&[DataType::InetService], &tuple_bytes(&one)),
            Some(one)
        );
        assert_eq!(tuple_from_bytes(&types, &[0; 15]), None, "too short");
        assert_eq!(tuple_from_bytes(&types, &[0; 20]), None, "too long");
    }

    #[test]
    fn concatenated_keys_pad_each_field_to_four_bytes() {
        let k = [
            Value::Ipv4("1.2.3.4".parse().expect("test address")),
            Value::TCP,
            Value::Port(80),
        ];
        assert_eq!(tuple_bytes(&k), vec![1, 2, 3, 4, 6, 0, 0, 0, 0, 80, 0, 0]);
    }

    fn v4(s: &str) -> Value {
        Value::Ipv4(s.parse().expect("test address"))
    }

    fn net4(s: &str) -> Value {
        Value::Ipv4Net(s.parse().expect("test prefix"))
    }

    fn firewall_spec(addr: DataType) -> SetSpec {
        let mut spec = SetSpec::set(vec![addr, DataType::InetProto, DataType::InetService, addr]);
        spec.flags.interval = true;
        spec
    }

    #[test]
    fn interval_concatenation_set_is_flagged_concat_with_field_lengths_like_nft() {
        // `nft --debug=mnl` for `type ipv4_addr . inet_proto . inet_service . ipv4_addr;
        // flags interval`: flags 0x84, key type 0x1cc347, key len 16, desc concat 4 1 2 4.
        let d = set_desc(&firewall_spec(DataType::Ipv4Addr));
        assert_eq!(
            (d.flags, d.key_type, d.key_len),
            (0x84, 0x1cc347, 16),
            "{d:?}"
        );
        assert_eq!(d.concat, vec![4, 1, 2, 4]);
        let d6 = set_desc(&firewall_spec(DataType::Ipv6Addr));
        assert_eq!((d6.key_len, d6.concat.clone()), (40, vec![16, 1, 2, 16]));
        // A single-field interval set stays an rbtree set: no concat flag, no field lengths.
        let mut single = SetSpec::set(vec![DataType::Ipv4Addr]);
        single.flags.interval = true;
        let d1 = set_desc(&single);
        assert_eq!(
            (d1.flags, d1.concat.len()),
            (libc::NFT_SET_INTERVAL as u32, 0)
        );
    }

    #[test]
    fn interval_concatenation_element_is_one_key_and_key_end_like_nft() {
        // Bytes `nft --debug=mnl` sends for `192.0.2.50 . tcp . 80 . 10.100.0.0/24`.
        let key = [
            v4("192.0.2.50"),
            Value::TCP,
            Value::Port(80),
            net4("10.100.0.0/24"),
        ];
        let d = elem_descs(&key, &Element::key_only());
        assert_eq!(d.len(), 1, "no separate interval-end element");
        let start = [192, 0, 2, 50, 6, 0, 0, 0, 0, 80, 0, 0, 10, 100, 0, 0];
        let end = [192, 0, 2, 50, 6, 0, 0, 0, 0, 80, 0, 0, 10, 100, 0, 255];
        assert_eq!(d[0].key, start);
        assert_eq!(d[0].key_end.as_deref(), Some(&end[..]));
        assert_eq!(d[0].flags, 0);
        // A /32 is a range of one address; deletion names the same range.
        let one = [
            v4("192.0.2.51"),
            Value::UDP,
            Value::Port(53),
            net4("10.0.0.1/32"),
        ];
        let d = elem_key_descs(&one);
        assert_eq!(d[0].key_end.as_ref(), Some(&d[0].key));
    }

    #[test]
    fn single_field_interval_is_a_start_and_an_end_element_open_at_the_top() {
        let d = elem_descs(&[net4("10.0.0.0/24")], &Element::key_only());
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].key.clone(), d[0].flags), (vec![10, 0, 0, 0], 0));
        assert_eq!((d[1].key.clone(), d[1].flags), (vec![10, 0, 1, 0], 1));
        assert!(d.iter().all(|e| e.key_end.is_none()));
        let top = elem_descs(&[net4("255.255.255.255/32")], &Element::key_only());
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].udata.as_deref(), Some(&[1, 4, 1, 0, 0, 0][..]));
    }

    #[test]
    fn ip6_typeof_userdata_names_saddr_and_daddr_like_nft() {
        // Captured from `nft --debug=mnl` for `typeof ip6 saddr : ip6 daddr`: the payload
        // field is the index in nft's ip6 template (saddr 8, daddr 9).
        let spec = SetSpec::map(
            KeySpec::Typeof(vec![Expr::Payload(Payload::Ip6Saddr)]),
            MapData::Values(KeySpec::Typeof(vec![Expr::Payload(Payload::Ip6Daddr)])),
        );
        let want: Vec<u8> = [
            &[0, 4, 2, 0, 0, 0, 1, 4, 2, 0, 0, 0][..],
            &[
                3, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 13, 0, 0, 0, 1, 4, 8, 0, 0, 0,
            ],
            &[
                4, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 13, 0, 0, 0, 1, 4, 9, 0, 0, 0,
            ],
            &[6, 4, 0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(set_desc(&spec).udata, want);
    }

    #[test]
    fn ip6_affinity_dynset_data_follows_the_key_when_the_next_128_bit_register_overflows() {
        let r = Rule::new(vec![Stmt::Dynset {
            op: DynsetOp::Update,
            set: "aff".into(),
            key: vec![
                Expr::Payload(Payload::Ip6Saddr),
                Expr::Ct(CtKey::OriginalIp6Daddr),
                Expr::Meta(MetaKey::L4Proto),
                Expr::Ct(CtKey::OriginalProtoDst),
            ],
            data: vec![
                Expr::Payload(Payload::Ip6Daddr),
                Expr::Payload(Payload::ThDport),
            ],
        }]);
        let insns = rule_insns(Family::Ip6, &r);
        // Key in 32-bit registers 0..10, data in 10..15 (NFT_REG32_10 = 18).
        assert_eq!(
            insns.last(),
            Some(&Insn::Dynset {
                op: 1,
                set: "aff".into(),
                sreg_key: 1,
                sreg_data: Some(18)
            })
        );
        assert!(matches!(insns[4], Insn::Payload { dreg: 18, .. }));
        assert!(matches!(insns[5], Insn::Payload { dreg: 22, .. }));
    }
}
