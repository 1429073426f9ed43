//! Checks the kernel (or nft) would make, done cheaply on the IR: types and arity of keys and
//! data, references to chains and sets, family consistency, names and comments.
//!
//! Each check that fails returns one [`CheckError`] variant naming what it found. The object
//! being checked (table, set, chain, rule) is named by the caller: the fake wraps these in an
//! [`crate::ApplyError::Invalid`] that carries the command.

use super::ir::{
    ChainSpec, ChainType, CtKey, DataType, Element, ElementData, Expr, Family, Hook, Key, KeySpec,
    MapData, NatFamily, Payload, Rule, SetSpec, Stmt, Table, Value, valid_comment, valid_name,
};

/// Which check of this module failed, and on what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// A table, chain or set name nft would refuse.
    #[error("invalid {kind} name {name:?}")]
    Name {
        /// `table`, `chain` or `set`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// A comment nft would refuse (too long, or with a quote or NUL).
    #[error("invalid comment {comment:?}")]
    Comment {
        /// The comment.
        comment: String,
    },
    /// An expression of one address family in a table of the other.
    #[error("{expr:?} (IPv{version}) in an {family} table")]
    ExprFamily {
        /// The expression.
        expr: Expr,
        /// Its IP version (4 or 6).
        version: u8,
        /// The table's family.
        family: Family,
    },
    /// A set key or map data type with no field.
    #[error("empty {what}")]
    EmptyKey {
        /// `key` or `map data`.
        what: &'static str,
    },
    /// A key or data type longer than the 16 registers of 32 bits.
    #[error("{what} of {bytes} bytes is longer than 64 bytes (16 registers)")]
    KeyTooLong {
        /// `key` or `map data`.
        what: &'static str,
        /// Its length in register bytes.
        bytes: usize,
    },
    /// A `typeof` key with more expressions than nft stores.
    #[error("typeof {what} with {count} expressions (nft stores at most 4)")]
    TypeofTooLong {
        /// `key` or `map data`.
        what: &'static str,
        /// Number of expressions.
        count: usize,
    },
    /// An interface name in a set key (only comparisons take interface names).
    #[error("interface name {expr:?} in a set {what}")]
    IfnameInKey {
        /// `key` or `map data`.
        what: &'static str,
        /// The expression.
        expr: Expr,
    },
    /// A default timeout on a set without the `timeout` flag.
    #[error("default timeout without the timeout flag")]
    TimeoutWithoutFlag,
    /// A `constant` set that is also `dynamic` or has timeouts.
    #[error("constant set cannot be dynamic or have timeouts")]
    ConstantDynamic,
    /// An interval key whose last field is not an address.
    #[error("interval flag on a key whose last field is not an address ({types:?})")]
    IntervalKeyNotAddress {
        /// The key's types.
        types: Vec<DataType>,
    },
    /// An interval concatenation with more fields than libnftnl encodes.
    #[error("interval concatenation with {fields} fields (at most 15)")]
    IntervalTooManyFields {
        /// Number of fields.
        fields: usize,
    },
    /// A nat base chain on the forward hook.
    #[error("nat chains cannot hook forward")]
    NatForward,
    /// An element (or map data) with as many values as the type has fields.
    #[error("{values} values for a {fields}-field type")]
    Arity {
        /// Values given.
        values: usize,
        /// Fields of the type.
        fields: usize,
    },
    /// A value of another type than its field.
    #[error("value {value:?} does not fit type {}", .ty.as_str())]
    ValueType {
        /// The value.
        value: Value,
        /// The field's type.
        ty: DataType,
    },
    /// A prefix in a field of an interval key other than the last.
    #[error(
        "prefix {value:?} in field {field}: only the last field of an interval key is a prefix"
    )]
    PrefixNotLast {
        /// The value.
        value: Value,
        /// Its field (from 0).
        field: usize,
    },
    /// A prefix in a set without the interval flag.
    #[error("prefix {value:?} outside an interval set")]
    PrefixOutsideInterval {
        /// The value.
        value: Value,
    },
    /// An interval element whose last field is an address, not a prefix.
    #[error("interval set elements end with a prefix (use /32 or /128), not {value:?}")]
    IntervalWithoutPrefix {
        /// The value.
        value: Value,
    },
    /// A jump, goto or verdict element to a chain that does not exist.
    #[error("chain {chain} does not exist")]
    NoChain {
        /// The chain.
        chain: String,
    },
    /// A jump, goto or verdict element to a base chain.
    #[error("cannot jump to base chain {chain}")]
    JumpToBaseChain {
        /// The chain.
        chain: String,
    },
    /// Data (a verdict or values) in an element of a plain set.
    #[error("data in an element of a set")]
    DataInSet,
    /// A map element without data.
    #[error("map element without data")]
    MissingData,
    /// Verdict data in a value map, or values in a verdict map.
    #[error("element data of the wrong kind")]
    DataKind,
    /// An element timeout in a set without the `timeout` flag.
    #[error("element timeout in a set without the timeout flag")]
    ElementTimeoutWithoutFlag,
    /// A rule looks up a set or map that does not exist.
    #[error("set {set} does not exist")]
    NoSet {
        /// The set.
        set: String,
    },
    /// A lookup key whose types differ from the set's.
    #[error("key {got:?} does not match set type {want:?}")]
    KeyMismatch {
        /// The key's types.
        got: Vec<DataType>,
        /// The set's types.
        want: Vec<DataType>,
    },
    /// A rule without statements.
    #[error("empty rule")]
    EmptyRule,
    /// A comparison of an expression with a value of another type.
    #[error("cannot compare {left:?} with {right:?}")]
    Compare {
        /// The expression.
        left: Expr,
        /// The value.
        right: Value,
    },
    /// A `vmap` into a map without verdicts.
    #[error("{map} is not a verdict map")]
    NotVerdictMap {
        /// The map.
        map: String,
    },
    /// A `dnat` in a chain that is not a nat chain.
    #[error("dnat outside a nat chain")]
    DnatOutsideNat,
    /// A `dnat ip` in an ip6 table, or `dnat ip6` in an ip table.
    #[error("dnat {nat:?} does not match the {family} table")]
    DnatFamily {
        /// The dnat's family.
        nat: NatFamily,
        /// The table's family.
        family: Family,
    },
    /// A `dnat` map whose data is not `address . inet_service`.
    #[error("{map} does not map to address . inet_service")]
    NotDnatMap {
        /// The map.
        map: String,
    },
    /// An `update`/`add` into a set without the `dynamic` flag.
    #[error("{set} is not dynamic")]
    NotDynamic {
        /// The set.
        set: String,
    },
    /// Dynset data that does not match the set's data (or data for a plain set).
    #[error("dynset data does not match {set}")]
    DynsetData {
        /// The set.
        set: String,
    },
    /// Dynset key and data that do not fit the registers together.
    #[error("dynset key and data for {set} exceed 64 bytes")]
    DynsetTooLong {
        /// The set.
        set: String,
    },
    /// A `masquerade` in a chain that is not a nat chain.
    #[error("masquerade outside a nat chain")]
    MasqueradeOutsideNat,
}

/// Checks a name.
pub fn name(kind: &'static str, n: &str) -> Result<(), CheckError> {
    if valid_name(n) {
        Ok(())
    } else {
        Err(CheckError::Name {
            kind,
            name: n.to_owned(),
        })
    }
}

/// Checks an optional comment.
pub fn comment(c: &Option<String>) -> Result<(), CheckError> {
    match c {
        Some(c) if !valid_comment(c) => Err(CheckError::Comment { comment: c.clone() }),
        _ => Ok(()),
    }
}

fn key_bytes(types: &[DataType]) -> usize {
    types.iter().map(|t| t.regs() * 4).sum()
}

fn expr_family(e: &Expr, family: Family) -> Result<(), CheckError> {
    let v4 = matches!(
        e,
        Expr::Payload(Payload::IpSaddr | Payload::IpDaddr)
            | Expr::Ct(CtKey::OriginalIpSaddr | CtKey::OriginalIpDaddr)
    );
    let v6 = matches!(
        e,
        Expr::Payload(Payload::Ip6Saddr | Payload::Ip6Daddr)
            | Expr::Ct(CtKey::OriginalIp6Saddr | CtKey::OriginalIp6Daddr)
    );
    match (family, v4, v6) {
        (Family::Ip6, true, _) => Err(CheckError::ExprFamily {
            expr: *e,
            version: 4,
            family,
        }),
        (Family::Ip, _, true) => Err(CheckError::ExprFamily {
            expr: *e,
            version: 6,
            family,
        }),
        _ => Ok(()),
    }
}

fn key_spec(k: &KeySpec, family: Family, what: &'static str) -> Result<(), CheckError> {
    let types = k.types();
    if types.is_empty() {
        return Err(CheckError::EmptyKey { what });
    }
    let bytes = key_bytes(&types);
    if bytes > 64 {
        return Err(CheckError::KeyTooLong { what, bytes });
    }
    if let KeySpec::Typeof(es) = k {
        // nft 1.0.6 stores at most 4 typeof expressions (NFT_REG32_SIZE) and lists garbage
        // beyond that; refuse instead.
        if es.len() > 4 {
            return Err(CheckError::TypeofTooLong {
                what,
                count: es.len(),
            });
        }
        for e in es {
            expr_family(e, family)?;
            if e.is_ifname() {
                return Err(CheckError::IfnameInKey { what, expr: *e });
            }
        }
    }
    Ok(())
}

/// Checks a set/map spec.
pub fn set_spec(s: &SetSpec, family: Family) -> Result<(), CheckError> {
    key_spec(&s.key, family, "key")?;
    if let Some(MapData::Values(d)) = &s.data {
        key_spec(d, family, "map data")?;
    }
    if s.timeout.is_some() && !s.flags.timeout {
        return Err(CheckError::TimeoutWithoutFlag);
    }
    if s.flags.interval {
        interval_key(&s.key.types())?;
    }
    if s.flags.constant && (s.flags.dynamic || s.flags.timeout) {
        return Err(CheckError::ConstantDynamic);
    }
    comment(&s.comment)
}

/// An interval set's key: its last field is an address (the field elements give as a
/// prefix), the others are matched exactly. A concatenation makes the kernel pick its pipapo
/// set type, which takes at most 16 fields; libnftnl encodes at most 15.
fn interval_key(types: &[DataType]) -> Result<(), CheckError> {
    match types.last() {
        Some(DataType::Ipv4Addr | DataType::Ipv6Addr) if types.len() <= 15 => Ok(()),
        Some(DataType::Ipv4Addr | DataType::Ipv6Addr) => Err(CheckError::IntervalTooManyFields {
            fields: types.len(),
        }),
        _ => Err(CheckError::IntervalKeyNotAddress {
            types: types.to_vec(),
        }),
    }
}

/// Checks a chain spec.
pub fn chain_spec(c: &ChainSpec) -> Result<(), CheckError> {
    if let Some(b) = &c.base {
        if b.kind == ChainType::Nat && matches!(b.hook, Hook::Forward) {
            return Err(CheckError::NatForward);
        }
    }
    comment(&c.comment)
}

fn values_fit(vals: &[Value], types: &[DataType], interval: bool) -> Result<(), CheckError> {
    if vals.len() != types.len() {
        return Err(CheckError::Arity {
            values: vals.len(),
            fields: types.len(),
        });
    }
    let last = vals.len().saturating_sub(1);
    for (i, (v, t)) in vals.iter().zip(types).enumerate() {
        if !v.fits(*t) {
            return Err(CheckError::ValueType { value: *v, ty: *t });
        }
        match (v.is_prefix(), interval && i == last) {
            (true, false) if interval => {
                return Err(CheckError::PrefixNotLast {
                    value: *v,
                    field: i,
                });
            }
            (true, false) => {
                return Err(CheckError::PrefixOutsideInterval { value: *v });
            }
            // Interval keys always end with a prefix (a single address is a /32 or /128),
            // so that an element says by itself that it spans an interval.
            (false, true) => {
                return Err(CheckError::IntervalWithoutPrefix { value: *v });
            }
            _ => {}
        }
    }
    Ok(())
}

/// Start and end (inclusive) of a prefix as numbers; `None` for other values.
fn prefix_span(v: &Value) -> Option<(u128, u128)> {
    match v {
        Value::Ipv4Net(n) => Some((
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        )),
        Value::Ipv6Net(n) => Some((u128::from(n.network()), u128::from(n.broadcast()))),
        _ => None,
    }
}

/// The first two keys of an interval set that overlap: same exact fields, intersecting
/// last-field prefixes (e.g. `10.0.0.0/8` and `10.1.0.0/16`). The kernel refuses such an
/// element with `EEXIST`, in single-field (rbtree) and concatenated (pipapo) interval sets
/// alike, so a caller must merge overlapping prefixes first. Adjacent prefixes do not
/// overlap. `O(n log n)`.
pub fn overlapping<'a>(keys: impl IntoIterator<Item = &'a Key>) -> Option<(&'a Key, &'a Key)> {
    let mut spans: Vec<(&[Value], u128, u128, &Key)> = keys
        .into_iter()
        .filter_map(|k| {
            let (last, exact) = k.split_last()?;
            let (lo, hi) = prefix_span(last)?;
            Some((exact, lo, hi, k))
        })
        .collect();
    spans.sort_unstable();
    // Sorted by exact fields then start: if any two overlap, two neighbours do.
    spans
        .windows(2)
        .find(|w| w[0].0 == w[1].0 && w[1].1 <= w[0].2)
        .map(|w| (w[0].3, w[1].3))
}

fn regular_chain(table: &Table, c: &str) -> Result<(), CheckError> {
    match table.chains.get(c) {
        None => Err(CheckError::NoChain {
            chain: c.to_owned(),
        }),
        Some(ch) if ch.spec.base.is_some() => Err(CheckError::JumpToBaseChain {
            chain: c.to_owned(),
        }),
        Some(_) => Ok(()),
    }
}

/// Checks an element against its set and the table (verdict targets).
pub fn element(table: &Table, spec: &SetSpec, key: &Key, e: &Element) -> Result<(), CheckError> {
    values_fit(key, &spec.key.types(), spec.flags.interval)?;
    match (&spec.data, &e.data) {
        (None, None) => {}
        (Some(MapData::Verdict), Some(ElementData::Verdict(v))) => {
            if let Some(c) = v.target() {
                regular_chain(table, c)?;
            }
        }
        (Some(MapData::Values(k)), Some(ElementData::Values(v))) => {
            values_fit(v, &k.types(), false)?
        }
        (None, Some(_)) => return Err(CheckError::DataInSet),
        (Some(_), None) => return Err(CheckError::MissingData),
        (Some(_), Some(_)) => return Err(CheckError::DataKind),
    }
    if e.timeout.is_some() && !spec.flags.timeout {
        return Err(CheckError::ElementTimeoutWithoutFlag);
    }
    comment(&e.comment)
}

fn set_of<'a>(table: &'a Table, n: &str) -> Result<&'a SetSpec, CheckError> {
    table
        .sets
        .get(n)
        .map(|s| &s.spec)
        .ok_or_else(|| CheckError::NoSet { set: n.to_owned() })
}

fn key_matches(key: &[Expr], types: &[DataType], family: Family) -> Result<(), CheckError> {
    for e in key {
        expr_family(e, family)?;
        if e.is_ifname() {
            return Err(CheckError::IfnameInKey {
                what: "key",
                expr: *e,
            });
        }
    }
    let got: Vec<DataType> = key.iter().map(Expr::datatype).collect();
    if got != types {
        return Err(CheckError::KeyMismatch {
            got,
            want: types.to_vec(),
        });
    }
    Ok(())
}

/// Checks a rule against the table it goes into and its chain.
pub fn rule(table: &Table, family: Family, chain: &ChainSpec, r: &Rule) -> Result<(), CheckError> {
    comment(&r.comment)?;
    if r.stmts.is_empty() {
        return Err(CheckError::EmptyRule);
    }
    let nat = chain.base.is_none_or(|b| b.kind == ChainType::Nat);
    for s in &r.stmts {
        match s {
            Stmt::Match { left, right, .. } => {
                expr_family(left, family)?;
                let ok = if left.is_ifname() {
                    matches!(right, Value::IfName(_))
                } else {
                    right.fits(left.datatype())
                };
                if !ok {
                    return Err(CheckError::Compare {
                        left: *left,
                        right: *right,
                    });
                }
            }
            Stmt::Lookup { key, set, .. } => {
                key_matches(key, &set_of(table, set)?.key.types(), family)?
            }
            Stmt::Vmap { key, map } => {
                let spec = set_of(table, map)?;
                if spec.data != Some(MapData::Verdict) {
                    return Err(CheckError::NotVerdictMap { map: map.clone() });
                }
                key_matches(key, &spec.key.types(), family)?;
            }
            Stmt::DnatMap {
                family: nf,
                key,
                map,
            } => {
                if !nat {
                    return Err(CheckError::DnatOutsideNat);
                }
                let addr = match (nf, family) {
                    (NatFamily::Ip, Family::Ip | Family::Inet) => DataType::Ipv4Addr,
                    (NatFamily::Ip6, Family::Ip6 | Family::Inet) => DataType::Ipv6Addr,
                    _ => return Err(CheckError::DnatFamily { nat: *nf, family }),
                };
                let spec = set_of(table, map)?;
                match &spec.data {
                    Some(MapData::Values(d)) if d.types() == [addr, DataType::InetService] => {}
                    _ => return Err(CheckError::NotDnatMap { map: map.clone() }),
                }
                key_matches(key, &spec.key.types(), family)?;
            }
            Stmt::Dynset { set, key, data, .. } => {
                let spec = set_of(table, set)?;
                if !spec.flags.dynamic {
                    return Err(CheckError::NotDynamic { set: set.clone() });
                }
                key_matches(key, &spec.key.types(), family)?;
                match &spec.data {
                    None if data.is_empty() => {}
                    Some(MapData::Values(d)) => key_matches(data, &d.types(), family)?,
                    _ => return Err(CheckError::DynsetData { set: set.clone() }),
                }
                // Key and data are loaded into the 16 32-bit registers side by side.
                let types = |es: &[Expr]| es.iter().map(Expr::datatype).collect::<Vec<_>>();
                if key_bytes(&types(key)) + key_bytes(&types(data)) > 64 {
                    return Err(CheckError::DynsetTooLong { set: set.clone() });
                }
            }
            Stmt::Masquerade { .. } if !nat => return Err(CheckError::MasqueradeOutsideNat),
            Stmt::Verdict(v) => {
                if let Some(c) = v.target() {
                    regular_chain(table, c)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}
