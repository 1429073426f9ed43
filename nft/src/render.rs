//! Rendering the IR and transactions as `nft -f` input.
//!
//! The output is deterministic (the IR is ordered) and loads with nft 1.0.6. One known nft
//! limitation: `ct original proto-dst == 80` needs a protocol context in the same rule
//! (`meta l4proto tcp` first), otherwise nft 1.0.6 rejects it ("Can't parse symbolic invalid
//! expressions"); set keys fed by `ct original proto-dst` must be declared with `typeof`.

use std::fmt::Write as _;
use std::time::Duration;

use super::ir::{
    BaseChain, ChainSpec, CmpOp, CtKey, CtState, CtStatus, DynsetOp, Element, ElementData, Expr,
    FibAddr, Key, KeySpec, MapData, MarkOp, MetaKey, NatFamily, Rule, Ruleset, SetSpec, Stmt,
    TableId, Value, Verdict,
};
use super::transaction::{Command, Transaction};

/// Renders a duration the way nft writes it (`3h`, `1h30m`, `500ms`).
pub fn duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, len) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= len {
            let _ = write!(out, "{}{unit}", ms / len);
            ms %= len;
        }
    }
    if ms > 0 {
        let _ = write!(out, "{ms}ms");
    }
    out
}

/// Renders one value.
pub fn value(v: &Value) -> String {
    match v {
        Value::Ipv4(a) => a.to_string(),
        Value::Ipv6(a) => a.to_string(),
        Value::Ipv4Net(n) => n.to_string(),
        Value::Ipv6Net(n) => n.to_string(),
        Value::Proto(6) => "tcp".into(),
        Value::Proto(17) => "udp".into(),
        Value::Proto(132) => "sctp".into(),
        Value::Proto(p) => p.to_string(),
        Value::Port(p) => p.to_string(),
        Value::Mark(m) => format!("0x{m:08x}"),
        Value::Integer(i) => i.to_string(),
        Value::IfName(n) => format!("\"{}{}\"", n.as_str(), if n.is_prefix() { "*" } else { "" }),
    }
}

/// Renders an expression.
pub fn expr(e: &Expr) -> String {
    match e {
        Expr::Payload(p) => p.as_str().into(),
        Expr::Meta(MetaKey::L4Proto) => "meta l4proto".into(),
        Expr::Meta(MetaKey::Mark) => "meta mark".into(),
        Expr::Meta(MetaKey::IifName) => "iifname".into(),
        Expr::Meta(MetaKey::OifName) => "oifname".into(),
        Expr::Ct(CtKey::OriginalIpSaddr) => "ct original ip saddr".into(),
        Expr::Ct(CtKey::OriginalIpDaddr) => "ct original ip daddr".into(),
        Expr::Ct(CtKey::OriginalIp6Saddr) => "ct original ip6 saddr".into(),
        Expr::Ct(CtKey::OriginalIp6Daddr) => "ct original ip6 daddr".into(),
        Expr::Ct(CtKey::OriginalProtoDst) => "ct original proto-dst".into(),
        Expr::NumgenRandom { modulus } => format!("numgen random mod {modulus}"),
        Expr::Jhash { of, modulus } => format!("jhash {} mod {modulus} seed 0x0", of.as_str()),
        // nft 1.0.6 parses a protocol constant in a concatenated key only as a number (it
        // lists it by name).
        Expr::Const(Value::Proto(p)) => p.to_string(),
        Expr::Const(v) => value(v),
    }
}

fn concat(es: &[Expr]) -> String {
    es.iter().map(expr).collect::<Vec<_>>().join(" . ")
}

/// Renders a key or data tuple (`a . b . c`).
pub fn values(vs: &[Value]) -> String {
    vs.iter().map(value).collect::<Vec<_>>().join(" . ")
}

/// Renders a verdict.
pub fn verdict(v: &Verdict) -> String {
    match v {
        Verdict::Accept => "accept".into(),
        Verdict::Drop => "drop".into(),
        Verdict::Return => "return".into(),
        Verdict::Jump(c) => format!("jump {c}"),
        Verdict::Goto(c) => format!("goto {c}"),
    }
}

fn op(o: CmpOp) -> &'static str {
    match o {
        CmpOp::Eq => "",
        CmpOp::Ne => "!= ",
    }
}

/// Renders one statement.
pub fn stmt(s: &Stmt) -> String {
    match s {
        Stmt::Match { left, op: o, right } => format!("{} {}{}", expr(left), op(*o), value(right)),
        Stmt::MarkMatch { mask, op: o, value } => {
            let o = if *o == CmpOp::Eq { "==" } else { "!=" };
            format!("meta mark & 0x{mask:08x} {o} 0x{value:08x}")
        }
        Stmt::CtState(st) => format!(
            "ct state {}",
            match st {
                CtState::New => "new",
                CtState::Established => "established",
                CtState::Related => "related",
                CtState::Invalid => "invalid",
            }
        ),
        Stmt::CtStatus(st) => format!(
            "ct status {}",
            match st {
                CtStatus::Dnat => "dnat",
                CtStatus::Snat => "snat",
            }
        ),
        Stmt::FibLocal(FibAddr::Saddr) => "fib saddr type local".into(),
        Stmt::FibLocal(FibAddr::Daddr) => "fib daddr type local".into(),
        Stmt::Lookup { key, set, negate } => {
            format!("{} {}@{set}", concat(key), if *negate { "!= " } else { "" })
        }
        Stmt::Vmap { key, map } => format!("{} vmap @{map}", concat(key)),
        Stmt::DnatMap { family, key, map } => format!(
            "dnat {} to {} map @{map}",
            match family {
                NatFamily::Ip => "ip",
                NatFamily::Ip6 => "ip6",
            },
            concat(key)
        ),
        Stmt::SetMark(MarkOp::Or(b)) => format!("meta mark set meta mark | 0x{b:08x}"),
        Stmt::SetMark(MarkOp::Xor(b)) => format!("meta mark set meta mark ^ 0x{b:08x}"),
        Stmt::Dynset { op, set, key, data } => {
            let verb = match op {
                DynsetOp::Add => "add",
                DynsetOp::Update => "update",
            };
            if data.is_empty() {
                format!("{verb} @{set} {{ {} }}", concat(key))
            } else {
                format!("{verb} @{set} {{ {} : {} }}", concat(key), concat(data))
            }
        }
        Stmt::Counter => "counter".into(),
        Stmt::Masquerade { fully_random: true } => "masquerade fully-random".into(),
        Stmt::Masquerade {
            fully_random: false,
        } => "masquerade".into(),
        Stmt::Reject => "reject".into(),
        Stmt::Verdict(v) => verdict(v),
    }
}

/// Renders a rule body (statements and comment), as after `add rule <table> <chain>`.
pub fn rule(r: &Rule) -> String {
    let mut out = r.stmts.iter().map(stmt).collect::<Vec<_>>().join(" ");
    if let Some(c) = &r.comment {
        let _ = write!(out, " comment \"{c}\"");
    }
    out
}

fn base_chain(b: &BaseChain) -> String {
    format!(
        "type {} hook {} priority {}; policy {};",
        b.kind.as_str(),
        b.hook.as_str(),
        b.priority,
        b.policy.as_str()
    )
}

/// The `type …` / `typeof …` line of a set or map (without trailing separator).
pub fn set_type(spec: &SetSpec) -> String {
    let key_typeof = matches!(spec.key, KeySpec::Typeof(_));
    let data_typeof = matches!(spec.data, Some(MapData::Values(KeySpec::Typeof(_))));
    let kw = if key_typeof || data_typeof {
        "typeof"
    } else {
        "type"
    };
    let key = match &spec.key {
        KeySpec::Types(t) => t.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(" . "),
        KeySpec::Typeof(e) => concat(e),
    };
    let data = match &spec.data {
        None => String::new(),
        Some(MapData::Verdict) => " : verdict".into(),
        Some(MapData::Values(KeySpec::Types(t))) => {
            format!(
                " : {}",
                t.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(" . ")
            )
        }
        Some(MapData::Values(KeySpec::Typeof(e))) => format!(" : {}", concat(e)),
    };
    format!("{kw} {key}{data}")
}

/// The property lines of a set or map (`type`, `size`, `flags`, `timeout`, `comment`).
fn set_lines(spec: &SetSpec) -> Vec<String> {
    let mut lines = vec![set_type(spec)];
    if let Some(n) = spec.size {
        lines.push(format!("size {n}"));
    }
    let f = spec.flags;
    let flags: Vec<&str> = [
        (f.constant, "constant"),
        (f.interval, "interval"),
        (f.timeout, "timeout"),
        (f.dynamic, "dynamic"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    if !flags.is_empty() {
        lines.push(format!("flags {}", flags.join(",")));
    }
    if let Some(t) = spec.timeout {
        lines.push(format!("timeout {}", duration(t)));
    }
    if f.counter {
        lines.push("counter".into());
    }
    if let Some(c) = &spec.comment {
        lines.push(format!("comment \"{c}\""));
    }
    lines
}

/// Renders one element (`key [timeout t] [comment "c"] [: data]`).
pub fn element(key: &Key, e: &Element) -> String {
    let mut out = values(key);
    if let Some(t) = e.timeout {
        let _ = write!(out, " timeout {}", duration(t));
    }
    if let Some(c) = &e.comment {
        let _ = write!(out, " comment \"{c}\"");
    }
    match &e.data {
        None => {}
        Some(ElementData::Values(v)) => {
            let _ = write!(out, " : {}", values(v));
        }
        Some(ElementData::Verdict(v)) => {
            let _ = write!(out, " : {}", verdict(v));
        }
    }
    out
}

fn set_kw(map: bool) -> &'static str {
    if map { "map" } else { "set" }
}

fn chain_props(spec: &ChainSpec) -> Vec<String> {
    let mut props = Vec::new();
    if let Some(b) = &spec.base {
        props.push(base_chain(b));
    }
    if let Some(c) = &spec.comment {
        props.push(format!("comment \"{c}\";"));
    }
    props
}

/// Renders one command as one `nft -f` line (without newline).
pub fn command(c: &Command) -> String {
    match c {
        Command::AddTable { table, comment } => match comment {
            Some(c) => format!("add table {table} {{ comment \"{c}\"; }}"),
            None => format!("add table {table}"),
        },
        Command::DeleteTable { table } => format!("delete table {table}"),
        Command::AddChain { table, chain, spec } => {
            let props = chain_props(spec);
            if props.is_empty() {
                format!("add chain {table} {chain}")
            } else {
                format!("add chain {table} {chain} {{ {} }}", props.join(" "))
            }
        }
        Command::FlushChain { table, chain } => format!("flush chain {table} {chain}"),
        Command::DeleteChain { table, chain } => format!("delete chain {table} {chain}"),
        Command::AddSet { table, set, spec } => format!(
            "add {} {table} {set} {{ {}; }}",
            set_kw(spec.is_map()),
            set_lines(spec).join("; ")
        ),
        Command::FlushSet { table, set, map } => format!("flush {} {table} {set}", set_kw(*map)),
        Command::DeleteSet { table, set, map } => format!("delete {} {table} {set}", set_kw(*map)),
        Command::AddElements {
            table,
            set,
            elements,
        } => format!(
            // `create` fails on an existing element, like the netlink backend (NLM_F_EXCL).
            // nft 1.0.6 wrongly reports "File exists" for `create` into a fresh interval
            // set, so prefixes (interval sets) use `add`.
            "{} element {table} {set} {{ {} }}",
            if elements.iter().any(|(k, _)| k.iter().any(Value::is_prefix)) {
                "add"
            } else {
                "create"
            },
            elements
                .iter()
                .map(|(k, e)| element(k, e))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Command::DeleteElements { table, set, keys } => format!(
            "delete element {table} {set} {{ {} }}",
            keys.iter()
                .map(|k| values(k))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Command::AddRule {
            table,
            chain,
            rule: r,
        } => {
            format!("add rule {table} {chain} {}", rule(r))
        }
    }
}

impl Transaction {
    /// Renders the transaction as `nft -f` input (one command per line). `nft -f` applies a
    /// file atomically, like the netlink backend.
    pub fn to_nft(&self) -> String {
        let mut out = String::new();
        for c in &self.commands {
            out.push_str(&command(c));
            out.push('\n');
        }
        out
    }
}

impl Ruleset {
    /// Renders the ruleset in nft's block syntax (what `nft list ruleset` prints, modulo
    /// handles and nft's symbolic priorities), loadable with `nft -f`.
    pub fn to_nft(&self) -> String {
        let mut out = String::new();
        for (id, t) in &self.tables {
            table_block(&mut out, id, t);
        }
        out
    }
}

fn table_block(out: &mut String, id: &TableId, t: &super::ir::Table) {
    let _ = writeln!(out, "table {id} {{");
    if let Some(c) = &t.comment {
        let _ = writeln!(out, "\tcomment \"{c}\"");
    }
    for (name, s) in &t.sets {
        let _ = writeln!(out, "\t{} {name} {{", set_kw(s.spec.is_map()));
        for l in set_lines(&s.spec) {
            let _ = writeln!(out, "\t\t{l}");
        }
        if !s.elements.is_empty() {
            let elems: Vec<String> = s.elements.iter().map(|(k, e)| element(k, e)).collect();
            let _ = writeln!(out, "\t\telements = {{ {} }}", elems.join(",\n\t\t\t     "));
        }
        let _ = writeln!(out, "\t}}");
    }
    for (name, c) in &t.chains {
        let _ = writeln!(out, "\tchain {name} {{");
        if let Some(b) = &c.spec.base {
            let _ = writeln!(out, "\t\t{}", base_chain(b));
        }
        if let Some(cm) = &c.spec.comment {
            let _ = writeln!(out, "\t\tcomment \"{cm}\"");
        }
        for r in &c.rules {
            let _ = writeln!(out, "\t\t{}", rule(r));
        }
        let _ = writeln!(out, "\t}}");
    }
    let _ = writeln!(out, "}}");
}
