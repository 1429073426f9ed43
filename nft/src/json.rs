//! Reading `nft -j list ruleset` (nft 1.0.6) back into the IR, for the subset this module
//! emits: for tests, and later for drift detection.
//!
//! nft 1.0.6's JSON is lossy in known ways, which [`json_view`] applies to an IR so that it
//! can be compared with what was read back:
//! - a `typeof` key or data is listed as types; a `ct original proto-dst` field is *missing*
//!   from the type list (its type is "invalid" to nft until a protocol is known), and its
//!   value from every element;
//! - the `dynamic` flag is not listed, nor are table and chain comments;
//! - timeouts are in whole seconds;
//! - a `update @map { … : … }` statement has no JSON form and is listed as its text, which
//!   this reader parses.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::Value as J;

use super::ir::{
    BaseChain, Chain, ChainSpec, ChainType, CmpOp, CtKey, CtState, CtStatus, DataType, DynsetOp,
    Element, ElementData, Expr, Family, FibAddr, Hook, IfName, Key, KeySpec, MapData, MarkOp,
    MetaKey, NatFamily, Payload, Policy, Rule, Ruleset, Set, SetFlags, SetSpec, Stmt, Table,
    TableId, Value, Verdict,
};

/// Why the JSON could not be read. Values and objects are quoted as JSON text.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// The text is not JSON.
    #[error("nft JSON does not parse")]
    Syntax(#[source] serde_json::Error),
    /// A field this reader needs is missing (or of another JSON type).
    #[error("nft JSON: no {field} in {object}")]
    Missing {
        /// The field.
        field: String,
        /// The object it is missing from.
        object: String,
    },
    /// Something this module never emits (drift should be loud).
    #[error("nft JSON: unsupported {what} {value}")]
    Unsupported {
        /// What kind of thing (`family`, `expression`, `set flag`, …).
        what: &'static str,
        /// The value.
        value: String,
    },
    /// A value that does not read as its type.
    #[error("nft JSON: bad {what} {value}")]
    Bad {
        /// What it should be (`verdict`, `ipv4_addr`, …).
        what: &'static str,
        /// The value.
        value: String,
    },
    /// A rule in a chain the listing did not declare before it.
    #[error("nft JSON: rule in unknown chain {chain}")]
    UnknownChain {
        /// The chain.
        chain: String,
    },
    /// An element or key that does not have the set's number of fields.
    #[error("nft JSON: {value} does not have the set's {fields} fields")]
    Arity {
        /// The element or key.
        value: String,
        /// The set's number of fields.
        fields: usize,
    },
}

fn unsupported(what: &'static str, value: impl std::fmt::Display) -> JsonError {
    JsonError::Unsupported {
        what,
        value: value.to_string(),
    }
}

fn bad(what: &'static str, value: impl std::fmt::Display) -> JsonError {
    JsonError::Bad {
        what,
        value: value.to_string(),
    }
}

fn missing(field: &str, object: impl std::fmt::Display) -> JsonError {
    JsonError::Missing {
        field: field.to_owned(),
        object: object.to_string(),
    }
}

fn s<'a>(o: &'a J, k: &str) -> Result<&'a str, JsonError> {
    o.get(k).and_then(J::as_str).ok_or_else(|| missing(k, o))
}

fn family(f: &str) -> Result<Family, JsonError> {
    Ok(match f {
        "ip" => Family::Ip,
        "ip6" => Family::Ip6,
        "inet" => Family::Inet,
        _ => return Err(unsupported("family", f)),
    })
}

fn table_id(o: &J, key: &str) -> Result<TableId, JsonError> {
    Ok(TableId::new(family(s(o, "family")?)?, s(o, key)?))
}

/// Reads a whole `nft -j list ruleset` output. Tables, chains and sets outside the subset
/// this module emits are an error (drift should be loud).
pub fn from_nft_json(text: &str) -> Result<Ruleset, JsonError> {
    let doc: J = serde_json::from_str(text).map_err(JsonError::Syntax)?;
    let items = doc
        .get("nftables")
        .and_then(J::as_array)
        .ok_or_else(|| missing("nftables array", "the document"))?;
    let mut rs = Ruleset::default();
    for item in items {
        let Some((kind, o)) = item.as_object().and_then(|m| m.iter().next()) else {
            continue;
        };
        match kind.as_str() {
            "metainfo" => {}
            "table" => {
                let t = Table {
                    comment: o.get("comment").and_then(J::as_str).map(str::to_owned),
                    ..Table::default()
                };
                rs.tables.insert(table_id(o, "name")?, t);
            }
            "set" | "map" => {
                let t = table_mut(&mut rs, o)?;
                t.sets
                    .insert(s(o, "name")?.to_owned(), set(o, kind == "map")?);
            }
            "chain" => {
                let t = table_mut(&mut rs, o)?;
                t.chains.insert(
                    s(o, "name")?.to_owned(),
                    Chain {
                        spec: chain(o)?,
                        rules: vec![],
                    },
                );
            }
            "rule" => {
                let r = rule(o)?;
                let t = table_mut(&mut rs, o)?;
                let c = s(o, "chain")?;
                t.chains
                    .get_mut(c)
                    .ok_or_else(|| JsonError::UnknownChain {
                        chain: c.to_owned(),
                    })?
                    .rules
                    .push(r);
            }
            other => return Err(unsupported("object", other)),
        }
    }
    Ok(rs)
}

/// A rule's counter: (table, chain, rule index in the chain, packets, bytes).
pub type RuleCounter = (TableId, String, usize, u64, u64);

/// Counter values of every rule with a counter.
pub fn counters(text: &str) -> Result<Vec<RuleCounter>, JsonError> {
    let doc: J = serde_json::from_str(text).map_err(JsonError::Syntax)?;
    let mut index: BTreeMap<(TableId, String), usize> = BTreeMap::new();
    let mut out = Vec::new();
    for item in doc
        .get("nftables")
        .and_then(J::as_array)
        .into_iter()
        .flatten()
    {
        let Some(o) = item.get("rule") else { continue };
        let key = (table_id(o, "table")?, s(o, "chain")?.to_owned());
        let i = index.entry(key.clone()).or_default();
        for e in o.get("expr").and_then(J::as_array).into_iter().flatten() {
            if let Some(c) = e.get("counter") {
                let n = |k| c.get(k).and_then(J::as_u64).unwrap_or(0);
                out.push((key.0.clone(), key.1.clone(), *i, n("packets"), n("bytes")));
            }
        }
        *i += 1;
    }
    Ok(out)
}

fn table_mut<'a>(rs: &'a mut Ruleset, o: &J) -> Result<&'a mut Table, JsonError> {
    // `nft -j list set|map|chain` prints no table object: create it on first use.
    Ok(rs.tables.entry(table_id(o, "table")?).or_default())
}

fn types(v: &J) -> Result<Vec<DataType>, JsonError> {
    let names: Vec<&str> = match v {
        J::String(s) => s.split(" . ").collect(),
        J::Array(a) => a.iter().filter_map(J::as_str).collect(),
        _ => return Err(bad("type", v)),
    };
    names
        .into_iter()
        .map(|n| DataType::from_name(n).ok_or_else(|| unsupported("type", n)))
        .collect()
}

fn set(o: &J, is_map: bool) -> Result<Set, JsonError> {
    let key = types(o.get("type").unwrap_or(&J::Null))?;
    let data = if is_map {
        match o.get("map") {
            Some(J::String(s)) if s == "verdict" => Some(MapData::Verdict),
            Some(v) => Some(MapData::Values(KeySpec::Types(types(v)?))),
            None => return Err(missing("map", o)),
        }
    } else {
        None
    };
    let mut flags = SetFlags::default();
    for f in o.get("flags").and_then(J::as_array).into_iter().flatten() {
        match f.as_str() {
            Some("constant") => flags.constant = true,
            Some("interval") => flags.interval = true,
            Some("timeout") => flags.timeout = true,
            Some("dynamic") => flags.dynamic = true,
            _ => return Err(unsupported("set flag", f)),
        }
    }
    for st in o.get("stmt").and_then(J::as_array).into_iter().flatten() {
        match st
            .as_object()
            .map(|m| m.keys().map(String::as_str).collect::<Vec<_>>())
        {
            Some(k) if k == ["counter"] => flags.counter = true,
            _ => return Err(unsupported("set statement", st)),
        }
    }
    let timeout = o
        .get("timeout")
        .and_then(J::as_u64)
        .map(Duration::from_secs);
    if timeout.is_some() {
        flags.timeout = true;
    }
    let spec = SetSpec {
        key: KeySpec::Types(key.clone()),
        data: data.clone(),
        flags,
        timeout,
        size: o
            .get("size")
            .and_then(J::as_u64)
            .and_then(|n| u32::try_from(n).ok()),
        comment: o.get("comment").and_then(J::as_str).map(str::to_owned),
    };
    let mut elements = BTreeMap::new();
    for e in o.get("elem").and_then(J::as_array).into_iter().flatten() {
        let (k, el) = element(e, &key, data.as_ref(), flags.interval)?;
        elements.insert(k, el);
    }
    Ok(Set { spec, elements })
}

fn element(
    e: &J,
    key: &[DataType],
    data: Option<&MapData>,
    interval: bool,
) -> Result<(Key, Element), JsonError> {
    let (k, d) = match (data, e) {
        (Some(_), J::Array(pair)) if pair.len() == 2 => (&pair[0], Some(&pair[1])),
        _ => (e, None),
    };
    let mut el = Element::default();
    let kv = match k.get("elem") {
        Some(inner) => {
            el.timeout = inner
                .get("timeout")
                .and_then(J::as_u64)
                .map(Duration::from_secs);
            el.comment = inner.get("comment").and_then(J::as_str).map(str::to_owned);
            inner.get("val").ok_or_else(|| missing("val", inner))?
        }
        None => k,
    };
    let key_vals = tuple(kv, key, interval)?;
    el.data = match (data, d) {
        (None, None) => None,
        (Some(MapData::Verdict), Some(v)) => Some(ElementData::Verdict(verdict(v)?)),
        (Some(MapData::Values(t)), Some(v)) => {
            Some(ElementData::Values(tuple(v, &t.types(), false)?))
        }
        _ => return Err(bad("element for the set", e)),
    };
    Ok((key_vals, el))
}

fn tuple(v: &J, types: &[DataType], interval: bool) -> Result<Vec<Value>, JsonError> {
    let parts: Vec<&J> = match v.get("concat").and_then(J::as_array) {
        Some(a) => a.iter().collect(),
        None => vec![v],
    };
    if parts.len() != types.len() {
        return Err(JsonError::Arity {
            value: v.to_string(),
            fields: types.len(),
        });
    }
    // In an interval set only the last field is a prefix (see `validate::element`); nft
    // lists a /32 or /128 there as a plain address.
    let last = parts.len().saturating_sub(1);
    parts
        .iter()
        .zip(types)
        .enumerate()
        .map(|(i, (p, t))| value(p, *t, interval && i == last))
        .collect()
}

fn value(v: &J, t: DataType, interval: bool) -> Result<Value, JsonError> {
    let bad_value = || bad(t.as_str(), v);
    if let Some(p) = v.get("prefix") {
        let addr = s(p, "addr")?;
        let len = p.get("len").and_then(J::as_u64).ok_or_else(bad_value)? as u8;
        return match t {
            DataType::Ipv4Addr => Ok(Value::Ipv4Net(
                Ipv4Net::new(addr.parse().map_err(|_| bad_value())?, len)
                    .map_err(|_| bad_value())?,
            )),
            DataType::Ipv6Addr => Ok(Value::Ipv6Net(
                Ipv6Net::new(addr.parse().map_err(|_| bad_value())?, len)
                    .map_err(|_| bad_value())?,
            )),
            _ => Err(bad_value()),
        };
    }
    Ok(match t {
        DataType::Ipv4Addr => {
            let a: Ipv4Addr = v
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad_value)?;
            if interval {
                Value::Ipv4Net(Ipv4Net::from(a))
            } else {
                Value::Ipv4(a)
            }
        }
        DataType::Ipv6Addr => {
            let a: Ipv6Addr = v
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad_value)?;
            if interval {
                Value::Ipv6Net(Ipv6Net::from(a))
            } else {
                Value::Ipv6(a)
            }
        }
        DataType::InetProto => Value::Proto(match v {
            J::String(s) => match s.as_str() {
                "tcp" => 6,
                "udp" => 17,
                "sctp" => 132,
                "icmp" => 1,
                "ipv6-icmp" => 58,
                _ => s.parse().map_err(|_| bad_value())?,
            },
            _ => v
                .as_u64()
                .and_then(|n| u8::try_from(n).ok())
                .ok_or_else(bad_value)?,
        }),
        DataType::InetService => Value::Port(
            v.as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(bad_value)?,
        ),
        DataType::Mark => Value::Mark(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(bad_value)?,
        ),
        DataType::Integer => Value::Integer(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(bad_value)?,
        ),
    })
}

fn verdict(v: &J) -> Result<Verdict, JsonError> {
    let Some((k, o)) = v.as_object().and_then(|m| m.iter().next()) else {
        return Err(bad("verdict", v));
    };
    Ok(match k.as_str() {
        "accept" => Verdict::Accept,
        "drop" => Verdict::Drop,
        "return" => Verdict::Return,
        "jump" => Verdict::Jump(s(o, "target")?.to_owned()),
        "goto" => Verdict::Goto(s(o, "target")?.to_owned()),
        _ => return Err(bad("verdict", v)),
    })
}

fn chain(o: &J) -> Result<ChainSpec, JsonError> {
    let base = match o.get("hook").and_then(J::as_str) {
        None => None,
        Some(h) => Some(BaseChain {
            kind: match s(o, "type")? {
                "filter" => ChainType::Filter,
                "nat" => ChainType::Nat,
                t => return Err(unsupported("chain type", t)),
            },
            hook: match h {
                "prerouting" => Hook::Prerouting,
                "input" => Hook::Input,
                "forward" => Hook::Forward,
                "output" => Hook::Output,
                "postrouting" => Hook::Postrouting,
                _ => return Err(unsupported("hook", h)),
            },
            priority: o.get("prio").and_then(J::as_i64).unwrap_or(0) as i32,
            policy: match o.get("policy").and_then(J::as_str) {
                Some("drop") => Policy::Drop,
                _ => Policy::Accept,
            },
        }),
    };
    Ok(ChainSpec {
        base,
        comment: o.get("comment").and_then(J::as_str).map(str::to_owned),
    })
}

fn expr(v: &J) -> Result<Expr, JsonError> {
    let bad = || unsupported("expression", v);
    if let Some(p) = v.get("payload") {
        return Ok(Expr::Payload(match (s(p, "protocol")?, s(p, "field")?) {
            ("ip", "saddr") => Payload::IpSaddr,
            ("ip", "daddr") => Payload::IpDaddr,
            ("ip6", "saddr") => Payload::Ip6Saddr,
            ("ip6", "daddr") => Payload::Ip6Daddr,
            ("th", "sport") => Payload::ThSport,
            ("th", "dport") => Payload::ThDport,
            ("tcp", "sport") => Payload::TcpSport,
            ("tcp", "dport") => Payload::TcpDport,
            ("udp", "sport") => Payload::UdpSport,
            ("udp", "dport") => Payload::UdpDport,
            _ => return Err(bad()),
        }));
    }
    if let Some(m) = v.get("meta") {
        return Ok(Expr::Meta(match s(m, "key")? {
            "l4proto" => MetaKey::L4Proto,
            "mark" => MetaKey::Mark,
            "iifname" => MetaKey::IifName,
            "oifname" => MetaKey::OifName,
            _ => return Err(bad()),
        }));
    }
    if let Some(c) = v.get("ct") {
        if c.get("dir").and_then(J::as_str) != Some("original") {
            return Err(bad());
        }
        return Ok(Expr::Ct(match s(c, "key")? {
            "ip saddr" => CtKey::OriginalIpSaddr,
            "ip daddr" => CtKey::OriginalIpDaddr,
            "ip6 saddr" => CtKey::OriginalIp6Saddr,
            "ip6 daddr" => CtKey::OriginalIp6Daddr,
            "proto-dst" => CtKey::OriginalProtoDst,
            _ => return Err(bad()),
        }));
    }
    if let Some(n) = v.get("numgen") {
        if s(n, "mode")? != "random" || n.get("offset").and_then(J::as_u64).unwrap_or(0) != 0 {
            return Err(bad());
        }
        let m = n.get("mod").and_then(J::as_u64).ok_or_else(bad)?;
        return Ok(Expr::NumgenRandom { modulus: m as u32 });
    }
    if let Some(h) = v.get("jhash") {
        if h.get("seed").and_then(J::as_u64).unwrap_or(0) != 0
            || h.get("offset").and_then(J::as_u64).unwrap_or(0) != 0
        {
            return Err(bad());
        }
        let m = h.get("mod").and_then(J::as_u64).ok_or_else(bad)?;
        let Expr::Payload(of) = expr(h.get("expr").ok_or_else(bad)?)? else {
            return Err(bad());
        };
        return Ok(Expr::Jhash {
            of,
            modulus: m as u32,
        });
    }
    Err(bad())
}

fn exprs(v: &J) -> Result<Vec<Expr>, JsonError> {
    match v.get("concat").and_then(J::as_array) {
        Some(a) => a.iter().map(expr).collect(),
        None => Ok(vec![expr(v)?]),
    }
}

fn set_ref(v: &J) -> Option<String> {
    v.as_str()
        .and_then(|s| s.strip_prefix('@'))
        .map(str::to_owned)
}

fn matcher(m: &J) -> Result<Stmt, JsonError> {
    let op = s(m, "op")?;
    let left = m.get("left").ok_or_else(|| missing("left", m))?;
    let right = m.get("right").ok_or_else(|| missing("right", m))?;
    let cmp = match op {
        "==" | "in" => CmpOp::Eq,
        "!=" => CmpOp::Ne,
        _ => return Err(unsupported("operator", op)),
    };
    if let Some(set) = set_ref(right) {
        return Ok(Stmt::Lookup {
            key: exprs(left)?,
            set,
            negate: cmp == CmpOp::Ne,
        });
    }
    if let Some(ct) = left.get("ct").filter(|c| c.get("dir").is_none()) {
        let r = right.as_str().unwrap_or_default();
        return Ok(match (s(ct, "key")?, r) {
            ("state", "new") => Stmt::CtState(CtState::New),
            ("state", "established") => Stmt::CtState(CtState::Established),
            ("state", "related") => Stmt::CtState(CtState::Related),
            ("state", "invalid") => Stmt::CtState(CtState::Invalid),
            ("status", "dnat") => Stmt::CtStatus(CtStatus::Dnat),
            ("status", "snat") => Stmt::CtStatus(CtStatus::Snat),
            _ => return Err(unsupported("ct match", m)),
        });
    }
    if let Some(fib) = left.get("fib") {
        let flags: Vec<&str> = fib
            .get("flags")
            .and_then(J::as_array)
            .into_iter()
            .flatten()
            .filter_map(J::as_str)
            .collect();
        return match (flags.as_slice(), right.as_str()) {
            (["saddr"], Some("local")) => Ok(Stmt::FibLocal(FibAddr::Saddr)),
            (["daddr"], Some("local")) => Ok(Stmt::FibLocal(FibAddr::Daddr)),
            _ => Err(unsupported("fib match", m)),
        };
    }
    if let Some(and) = left.get("&").and_then(J::as_array) {
        let is_mark = and
            .first()
            .and_then(|x| x.get("meta"))
            .and_then(|x| x.get("key"))
            == Some(&J::String("mark".into()));
        let mask = and.get(1).and_then(J::as_u64);
        let value = right.as_u64();
        return match (is_mark, mask, value) {
            (true, Some(mask), Some(value)) => Ok(Stmt::MarkMatch {
                mask: mask as u32,
                op: cmp,
                value: value as u32,
            }),
            _ => Err(unsupported("bitmask match", m)),
        };
    }
    let left = expr(left)?;
    let right = if left.is_ifname() {
        Value::IfName(
            right
                .as_str()
                .and_then(IfName::parse)
                .ok_or_else(|| bad("ifname", right))?,
        )
    } else {
        value(right, left.datatype(), false)?
    };
    Ok(Stmt::Match {
        left,
        op: cmp,
        right,
    })
}

fn rule(o: &J) -> Result<Rule, JsonError> {
    let mut stmts = Vec::new();
    for e in o.get("expr").and_then(J::as_array).into_iter().flatten() {
        stmts.push(statement(e)?);
    }
    Ok(Rule {
        stmts,
        comment: o.get("comment").and_then(J::as_str).map(str::to_owned),
    })
}

fn statement(e: &J) -> Result<Stmt, JsonError> {
    if let Some(text) = e.as_str() {
        return dynset_text(text);
    }
    let Some((k, o)) = e.as_object().and_then(|m| m.iter().next()) else {
        return Err(bad("statement", e));
    };
    Ok(match k.as_str() {
        "match" => matcher(o)?,
        "vmap" => Stmt::Vmap {
            key: exprs(o.get("key").unwrap_or(&J::Null))?,
            map: o
                .get("data")
                .and_then(set_ref)
                .ok_or_else(|| missing("data map", o))?,
        },
        "dnat" => {
            let family = match o.get("family").and_then(J::as_str) {
                Some("ip") => NatFamily::Ip,
                Some("ip6") => NatFamily::Ip6,
                _ => return Err(unsupported("dnat", o)),
            };
            let m = o
                .get("addr")
                .and_then(|a| a.get("map"))
                .ok_or_else(|| unsupported("dnat", o))?;
            Stmt::DnatMap {
                family,
                key: exprs(m.get("key").unwrap_or(&J::Null))?,
                map: m
                    .get("data")
                    .and_then(set_ref)
                    .ok_or_else(|| missing("data map", m))?,
            }
        }
        "mangle" => {
            let v = o.get("value").unwrap_or(&J::Null);
            match (v.get("|"), v.get("^")) {
                (Some(a), _) => Stmt::SetMark(MarkOp::Or(a[1].as_u64().unwrap_or(0) as u32)),
                (_, Some(a)) => Stmt::SetMark(MarkOp::Xor(a[1].as_u64().unwrap_or(0) as u32)),
                _ => return Err(unsupported("mangle", o)),
            }
        }
        "set" | "map" => {
            let op = match o.get("op").and_then(J::as_str) {
                Some("add") => DynsetOp::Add,
                Some("update") => DynsetOp::Update,
                _ => return Err(unsupported("set statement", o)),
            };
            let set = o
                .get("set")
                .and_then(set_ref)
                .ok_or_else(|| missing("set", o))?;
            let data = match o.get("data") {
                Some(d) => exprs(d)?,
                None => vec![],
            };
            Stmt::Dynset {
                op,
                set,
                key: exprs(o.get("elem").unwrap_or(&J::Null))?,
                data,
            }
        }
        "counter" => Stmt::Counter,
        "masquerade" => Stmt::Masquerade {
            fully_random: o.get("flags").is_some_and(|f| {
                f.as_str() == Some("fully-random")
                    || f.as_array()
                        .is_some_and(|a| a.iter().any(|x| x.as_str() == Some("fully-random")))
            }),
        },
        "reject" => Stmt::Reject,
        "accept" | "drop" | "return" | "jump" | "goto" => Stmt::Verdict(verdict(e)?),
        _ => return Err(unsupported("statement", e)),
    })
}

/// Parses one expression as [`super::render::expr`] writes it.
pub fn expr_text(t: &str) -> Option<Expr> {
    Some(match t.trim() {
        "ip saddr" => Expr::Payload(Payload::IpSaddr),
        "ip daddr" => Expr::Payload(Payload::IpDaddr),
        "ip6 saddr" => Expr::Payload(Payload::Ip6Saddr),
        "ip6 daddr" => Expr::Payload(Payload::Ip6Daddr),
        "th sport" => Expr::Payload(Payload::ThSport),
        "th dport" => Expr::Payload(Payload::ThDport),
        "tcp sport" => Expr::Payload(Payload::TcpSport),
        "tcp dport" => Expr::Payload(Payload::TcpDport),
        "udp sport" => Expr::Payload(Payload::UdpSport),
        "udp dport" => Expr::Payload(Payload::UdpDport),
        "meta l4proto" => Expr::Meta(MetaKey::L4Proto),
        "meta mark" => Expr::Meta(MetaKey::Mark),
        "ct original ip saddr" => Expr::Ct(CtKey::OriginalIpSaddr),
        "ct original ip daddr" => Expr::Ct(CtKey::OriginalIpDaddr),
        "ct original ip6 saddr" => Expr::Ct(CtKey::OriginalIp6Saddr),
        "ct original ip6 daddr" => Expr::Ct(CtKey::OriginalIp6Daddr),
        "ct original proto-dst" => Expr::Ct(CtKey::OriginalProtoDst),
        other => {
            let m = other.strip_prefix("numgen random mod ")?.parse().ok()?;
            Expr::NumgenRandom { modulus: m }
        }
    })
}

/// A constant field of a listed `update` key ([`Expr::Const`]): an address, a protocol (nft
/// lists a known one by name) or a port (the only bare number such keys hold here).
fn const_text(t: &str) -> Option<Expr> {
    let v = match t {
        "tcp" => Value::TCP,
        "udp" => Value::UDP,
        "sctp" => Value::SCTP,
        _ => match t.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => Value::Ipv4(a),
            Ok(IpAddr::V6(a)) => Value::Ipv6(a),
            Err(_) => Value::Port(t.parse().ok()?),
        },
    };
    Some(Expr::Const(v))
}

/// `update @set { k . k : d . d }` as nft 1.0.6 lists it in JSON (as a string).
fn dynset_text(t: &str) -> Result<Stmt, JsonError> {
    let bad = || unsupported("statement text", format!("{t:?}"));
    let (op, rest) = if let Some(r) = t.strip_prefix("update @") {
        (DynsetOp::Update, r)
    } else if let Some(r) = t.strip_prefix("add @") {
        (DynsetOp::Add, r)
    } else {
        return Err(bad());
    };
    let (set, body) = rest.split_once(" { ").ok_or_else(bad)?;
    let body = body.strip_suffix(" }").ok_or_else(bad)?;
    let (k, d) = match body.split_once(" : ") {
        Some((k, d)) => (k, Some(d)),
        None => (body, None),
    };
    // Once a rule has fixed the protocol (`meta l4proto tcp`), nft prints the transport
    // header's `th dport` as `tcp dport` (`udp`, `sctp`): the same field.
    let parse = |s: &str| {
        s.split(" . ")
            .map(|t| match t.trim() {
                "tcp dport" | "udp dport" | "sctp dport" => Some(Expr::Payload(Payload::ThDport)),
                "tcp sport" | "udp sport" | "sctp sport" => Some(Expr::Payload(Payload::ThSport)),
                other => expr_text(other).or_else(|| const_text(other)),
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad)
    };
    Ok(Stmt::Dynset {
        op,
        set: set.to_owned(),
        key: parse(k)?,
        data: d.map(parse).transpose()?.unwrap_or_default(),
    })
}

/// The size the kernel gives a set without one when a dynamic set statement writes to it.
pub const DYNSET_DEFAULT_SIZE: u32 = 65_535;

/// What nft 1.0.6's JSON listing can show of `rs` (see the module doc): compare
/// `from_nft_json(listing)` with `json_view(&applied)`.
pub fn json_view(rs: &Ruleset) -> Ruleset {
    let mut out = rs.clone();
    let view = |k: &KeySpec| match k {
        KeySpec::Types(t) => KeySpec::Types(t.clone()),
        KeySpec::Typeof(es) => KeySpec::Types(
            es.iter()
                .filter(|e| **e != Expr::Ct(CtKey::OriginalProtoDst))
                .map(Expr::datatype)
                .collect(),
        ),
    };
    for t in out.tables.values_mut() {
        t.comment = None;
        for c in t.chains.values_mut() {
            c.spec.comment = None;
            // nft drops a `meta l4proto tcp` match that a later transport-header field of
            // the rule depends on (it prints `th dport` as `tcp dport` instead).
            for r in &mut c.rules {
                let implied = r.stmts.iter().any(|s| {
                    matches!(s, Stmt::Dynset { data, .. }
                        if data.iter().any(|e| matches!(e, Expr::Payload(Payload::ThDport | Payload::ThSport))))
                });
                if implied {
                    r.stmts.retain(|s| {
                        !matches!(
                            s,
                            Stmt::Match {
                                left: Expr::Meta(MetaKey::L4Proto),
                                op: CmpOp::Eq,
                                ..
                            }
                        )
                    });
                }
            }
        }
        // The kernel gives a set without a size that a dynamic set statement (`update`, `add`)
        // writes to a size of 65,535 (`nft_dynset_init`), and lists it.
        let updated: std::collections::BTreeSet<String> = t
            .chains
            .values()
            .flat_map(|c| &c.rules)
            .flat_map(|r| &r.stmts)
            .filter_map(|s| match s {
                Stmt::Dynset { set, .. } => Some(set.clone()),
                _ => None,
            })
            .collect();
        for (name, set) in &mut t.sets {
            if set.spec.size.is_none() && updated.contains(name) {
                set.spec.size = Some(DYNSET_DEFAULT_SIZE);
            }
            let key_kept = listed_fields(&set.spec.key);
            let data_kept = match &set.spec.data {
                Some(MapData::Values(d)) => listed_fields(d),
                _ => vec![],
            };
            set.spec.key = view(&set.spec.key);
            if let Some(MapData::Values(d)) = &set.spec.data {
                set.spec.data = Some(MapData::Values(view(d)));
            }
            set.spec.flags.dynamic = false;
            set.spec.timeout = set.spec.timeout.map(|d| Duration::from_secs(d.as_secs()));
            set.elements = std::mem::take(&mut set.elements)
                .into_iter()
                .map(|(k, mut e)| {
                    e.timeout = e.timeout.map(|d| Duration::from_secs(d.as_secs()));
                    if let Some(ElementData::Values(v)) = &mut e.data {
                        *v = keep(v, &data_kept);
                    }
                    (keep(&k, &key_kept), e)
                })
                .collect();
        }
    }
    out
}

/// Which fields of a key or data tuple nft 1.0.6's JSON lists: all but those of a typeof
/// `ct original proto-dst` (its type is "invalid" to nft, so the value is left out too).
fn listed_fields(k: &KeySpec) -> Vec<bool> {
    match k {
        KeySpec::Types(t) => vec![true; t.len()],
        KeySpec::Typeof(es) => es
            .iter()
            .map(|e| *e != Expr::Ct(CtKey::OriginalProtoDst))
            .collect(),
    }
}

fn keep(vals: &[Value], kept: &[bool]) -> Vec<Value> {
    vals.iter()
        .zip(kept.iter().chain(std::iter::repeat(&true)))
        .filter(|(_, k)| **k)
        .map(|(v, _)| *v)
        .collect()
}
