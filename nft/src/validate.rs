//! Checks the kernel (or nft) would make, done cheaply on the IR: types and arity of keys and
//! data, references to chains and sets, family consistency, names and comments.

use super::ir::{
    ChainSpec, ChainType, CtKey, DataType, Element, ElementData, Expr, Family, Hook, Key, KeySpec,
    MapData, NatFamily, Payload, Rule, SetSpec, Stmt, Table, Value, valid_comment, valid_name,
};

/// Checks a name.
pub fn name(kind: &str, n: &str) -> Result<(), String> {
    if valid_name(n) {
        Ok(())
    } else {
        Err(format!("invalid {kind} name {n:?}"))
    }
}

/// Checks an optional comment.
pub fn comment(c: &Option<String>) -> Result<(), String> {
    match c {
        Some(c) if !valid_comment(c) => Err(format!("invalid comment {c:?}")),
        _ => Ok(()),
    }
}

fn key_bytes(types: &[DataType]) -> usize {
    types.iter().map(|t| t.regs() * 4).sum()
}

fn expr_family(e: &Expr, family: Family) -> Result<(), String> {
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
        (Family::Ip6, true, _) => Err("IPv4 expression in an ip6 table".into()),
        (Family::Ip, _, true) => Err("IPv6 expression in an ip table".into()),
        _ => Ok(()),
    }
}

fn key_spec(k: &KeySpec, family: Family, what: &str) -> Result<(), String> {
    let types = k.types();
    if types.is_empty() {
        return Err(format!("empty {what}"));
    }
    if key_bytes(&types) > 64 {
        return Err(format!("{what} longer than 64 bytes (16 registers)"));
    }
    if let KeySpec::Typeof(es) = k {
        // nft 1.0.6 stores at most 4 typeof expressions (NFT_REG32_SIZE) and lists garbage
        // beyond that; refuse instead.
        if es.len() > 4 {
            return Err(format!("typeof {what} with more than 4 expressions"));
        }
        for e in es {
            expr_family(e, family)?;
            if e.is_ifname() {
                return Err(format!("interface name in {what}"));
            }
        }
    }
    Ok(())
}

/// Checks a set/map spec.
pub fn set_spec(s: &SetSpec, family: Family) -> Result<(), String> {
    key_spec(&s.key, family, "key")?;
    if let Some(MapData::Values(d)) = &s.data {
        key_spec(d, family, "map data")?;
    }
    if s.timeout.is_some() && !s.flags.timeout {
        return Err("default timeout without the timeout flag".into());
    }
    if s.flags.interval {
        interval_key(&s.key.types())?;
    }
    if s.flags.constant && (s.flags.dynamic || s.flags.timeout) {
        return Err("constant set cannot be dynamic or have timeouts".into());
    }
    comment(&s.comment)
}

/// An interval set's key: its last field is an address (the field elements give as a
/// prefix), the others are matched exactly. A concatenation makes the kernel pick its pipapo
/// set type, which takes at most 16 fields; libnftnl encodes at most 15.
fn interval_key(types: &[DataType]) -> Result<(), String> {
    match types.last() {
        Some(DataType::Ipv4Addr | DataType::Ipv6Addr) if types.len() <= 15 => Ok(()),
        Some(DataType::Ipv4Addr | DataType::Ipv6Addr) => {
            Err("interval concatenation with more than 15 fields".into())
        }
        _ => Err("interval flag on a key whose last field is not an address".into()),
    }
}

/// Checks a chain spec.
pub fn chain_spec(c: &ChainSpec) -> Result<(), String> {
    if let Some(b) = &c.base {
        if b.kind == ChainType::Nat && matches!(b.hook, Hook::Forward) {
            return Err("nat chains cannot hook forward".into());
        }
    }
    comment(&c.comment)
}

fn values_fit(vals: &[Value], types: &[DataType], interval: bool) -> Result<(), String> {
    if vals.len() != types.len() {
        return Err(format!(
            "{} values for a {}-field type",
            vals.len(),
            types.len()
        ));
    }
    let last = vals.len().saturating_sub(1);
    for (i, (v, t)) in vals.iter().zip(types).enumerate() {
        if !v.fits(*t) {
            return Err(format!("value {v:?} does not fit type {}", t.as_str()));
        }
        match (v.is_prefix(), interval && i == last) {
            (true, false) if interval => {
                return Err(format!(
                    "prefix {v:?} in field {i}: only the last field of an interval key is a prefix"
                ));
            }
            (true, false) => return Err(format!("prefix {v:?} outside an interval set")),
            // Interval keys always end with a prefix (a single address is a /32 or /128),
            // so that an element says by itself that it spans an interval.
            (false, true) => {
                return Err(format!(
                    "interval set elements end with a prefix (use /32 or /128), not {v:?}"
                ));
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

fn regular_chain(table: &Table, c: &str) -> Result<(), String> {
    match table.chains.get(c) {
        None => Err(format!("chain {c} does not exist")),
        Some(ch) if ch.spec.base.is_some() => Err(format!("cannot jump to base chain {c}")),
        Some(_) => Ok(()),
    }
}

/// Checks an element against its set and the table (verdict targets).
pub fn element(table: &Table, spec: &SetSpec, key: &Key, e: &Element) -> Result<(), String> {
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
        (None, Some(_)) => return Err("data in an element of a set".into()),
        (Some(_), None) => return Err("map element without data".into()),
        (Some(_), Some(_)) => return Err("element data of the wrong kind".into()),
    }
    if e.timeout.is_some() && !spec.flags.timeout {
        return Err("element timeout in a set without the timeout flag".into());
    }
    comment(&e.comment)
}

fn set_of<'a>(table: &'a Table, n: &str) -> Result<&'a SetSpec, String> {
    table
        .sets
        .get(n)
        .map(|s| &s.spec)
        .ok_or_else(|| format!("set {n} does not exist"))
}

fn key_matches(key: &[Expr], types: &[DataType], family: Family) -> Result<(), String> {
    for e in key {
        expr_family(e, family)?;
        if e.is_ifname() {
            return Err("interface name in a set key".into());
        }
    }
    let got: Vec<DataType> = key.iter().map(Expr::datatype).collect();
    if got != types {
        return Err(format!("key {got:?} does not match set type {types:?}"));
    }
    Ok(())
}

/// Checks a rule against the table it goes into and its chain.
pub fn rule(table: &Table, family: Family, chain: &ChainSpec, r: &Rule) -> Result<(), String> {
    comment(&r.comment)?;
    if r.stmts.is_empty() {
        return Err("empty rule".into());
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
                    return Err(format!("cannot compare {left:?} with {right:?}"));
                }
            }
            Stmt::Lookup { key, set, .. } => {
                key_matches(key, &set_of(table, set)?.key.types(), family)?
            }
            Stmt::Vmap { key, map } => {
                let spec = set_of(table, map)?;
                if spec.data != Some(MapData::Verdict) {
                    return Err(format!("{map} is not a verdict map"));
                }
                key_matches(key, &spec.key.types(), family)?;
            }
            Stmt::DnatMap {
                family: nf,
                key,
                map,
            } => {
                if !nat {
                    return Err("dnat outside a nat chain".into());
                }
                let addr = match (nf, family) {
                    (NatFamily::Ip, Family::Ip | Family::Inet) => DataType::Ipv4Addr,
                    (NatFamily::Ip6, Family::Ip6 | Family::Inet) => DataType::Ipv6Addr,
                    _ => return Err("dnat family does not match the table".into()),
                };
                let spec = set_of(table, map)?;
                match &spec.data {
                    Some(MapData::Values(d)) if d.types() == [addr, DataType::InetService] => {}
                    _ => return Err(format!("{map} does not map to address . inet_service")),
                }
                key_matches(key, &spec.key.types(), family)?;
            }
            Stmt::Dynset { set, key, data, .. } => {
                let spec = set_of(table, set)?;
                if !spec.flags.dynamic {
                    return Err(format!("{set} is not dynamic"));
                }
                key_matches(key, &spec.key.types(), family)?;
                match &spec.data {
                    None if data.is_empty() => {}
                    Some(MapData::Values(d)) => key_matches(data, &d.types(), family)?,
                    _ => return Err(format!("dynset data does not match {set}")),
                }
                // Key and data are loaded into the 16 32-bit registers side by side.
                let types = |es: &[Expr]| es.iter().map(Expr::datatype).collect::<Vec<_>>();
                if key_bytes(&types(key)) + key_bytes(&types(data)) > 64 {
                    return Err(format!("dynset key and data for {set} exceed 64 bytes"));
                }
            }
            Stmt::Masquerade { .. } if !nat => return Err("masquerade outside a nat chain".into()),
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
