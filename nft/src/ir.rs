//! Typed nftables IR: tables, chains, named sets and maps, elements and rules.
//!
//! Everything is ordered (`BTreeMap`, `Vec` in rule order), so renders and diffs are
//! reproducible. Only *named* sets and maps exist: anonymous sets are not expressible on
//! purpose (each one is a kernel set, and their number is what makes a table slow to load).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};

/// Address family of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// `ip`
    Ip,
    /// `ip6`
    Ip6,
    /// `inet`
    Inet,
}

impl Family {
    /// The keyword nft uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
            Family::Inet => "inet",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A table's identity: family and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableId {
    /// Family.
    pub family: Family,
    /// Name.
    pub name: String,
}

impl TableId {
    /// Convenience constructor.
    pub fn new(family: Family, name: impl Into<String>) -> Self {
        Self {
            family,
            name: name.into(),
        }
    }
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.family, self.name)
    }
}

/// A whole ruleset: the tables this program owns (other tables are not modelled).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Tables by identity.
    pub tables: BTreeMap<TableId, Table>,
}

/// A table with its chains and its sets/maps (one namespace for both, as in nft).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// Table comment.
    pub comment: Option<String>,
    /// Chains by name.
    pub chains: BTreeMap<String, Chain>,
    /// Named sets and maps by name.
    pub sets: BTreeMap<String, Set>,
}

/// Chain type of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChainType {
    /// `filter`
    Filter,
    /// `nat`
    Nat,
}

impl ChainType {
    /// nft keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
        }
    }
}

/// Netfilter hook of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// `prerouting`
    Prerouting,
    /// `input`
    Input,
    /// `forward`
    Forward,
    /// `output`
    Output,
    /// `postrouting`
    Postrouting,
}

impl Hook {
    /// nft keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        }
    }
}

/// Base chain policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Policy {
    /// `accept`
    #[default]
    Accept,
    /// `drop`
    Drop,
}

impl Policy {
    /// nft keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Accept => "accept",
            Policy::Drop => "drop",
        }
    }
}

/// What makes a chain a base chain: attached to a hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BaseChain {
    /// `type filter|nat`
    pub kind: ChainType,
    /// `hook …`
    pub hook: Hook,
    /// `priority N` (numeric; nft lists well-known values by name, e.g. `dstnat` = -100).
    pub priority: i32,
    /// `policy …`
    pub policy: Policy,
}

/// A chain's properties without its rules (what `add chain` creates).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChainSpec {
    /// `Some` for a base chain, `None` for a regular chain (a jump/goto target).
    pub base: Option<BaseChain>,
    /// Chain comment.
    pub comment: Option<String>,
}

/// A chain: properties and an ordered rule list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// Properties.
    pub spec: ChainSpec,
    /// Rules in evaluation order.
    pub rules: Vec<Rule>,
}

/// An nft data type usable in set keys and map data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DataType {
    /// `ipv4_addr`
    Ipv4Addr,
    /// `ipv6_addr`
    Ipv6Addr,
    /// `inet_proto` (1 byte, padded to 4 in concatenations)
    InetProto,
    /// `inet_service` (2 bytes big endian, padded to 4 in concatenations)
    InetService,
    /// `mark` (4 bytes host order)
    Mark,
    /// `integer` (4 bytes host order): only reachable through `typeof` (e.g. `numgen`).
    Integer,
}

impl DataType {
    /// nft keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Ipv4Addr => "ipv4_addr",
            DataType::Ipv6Addr => "ipv6_addr",
            DataType::InetProto => "inet_proto",
            DataType::InetService => "inet_service",
            DataType::Mark => "mark",
            DataType::Integer => "integer",
        }
    }

    /// Parses an nft type keyword.
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "ipv4_addr" => DataType::Ipv4Addr,
            "ipv6_addr" => DataType::Ipv6Addr,
            "inet_proto" => DataType::InetProto,
            "inet_service" => DataType::InetService,
            "mark" => DataType::Mark,
            "integer" => DataType::Integer,
            _ => return None,
        })
    }

    /// Bytes the value occupies in a register / set key, unpadded.
    pub fn byte_len(self) -> usize {
        match self {
            DataType::Ipv4Addr | DataType::Mark | DataType::Integer => 4,
            DataType::Ipv6Addr => 16,
            DataType::InetProto => 1,
            DataType::InetService => 2,
        }
    }

    /// Number of 32-bit registers the value occupies in a concatenation.
    pub fn regs(self) -> usize {
        self.byte_len().div_ceil(4)
    }
}

/// The type of a set key or of map data: a concatenation, declared by data types (`type a . b`)
/// or by the expressions that produce it (`typeof x . y`).
///
/// `typeof` is needed where nft 1.0.6 has no usable type name: `numgen` yields `integer`, and
/// `ct original proto-dst` has an "invalid" type until a protocol is known, so a map fed by them
/// must be declared with `typeof` or `nft -f` rejects the rule with "datatype mismatch".
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeySpec {
    /// `type a . b . c`
    Types(Vec<DataType>),
    /// `typeof expr . expr` (nft 1.0.6 stores at most 4 expressions in the set's userdata).
    Typeof(Vec<Expr>),
}

impl KeySpec {
    /// The concatenated data types, whichever way the key is declared.
    pub fn types(&self) -> Vec<DataType> {
        match self {
            KeySpec::Types(t) => t.clone(),
            KeySpec::Typeof(e) => e.iter().map(Expr::datatype).collect(),
        }
    }
}

/// What a map maps to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapData {
    /// `: verdict` (a verdict map, used with `vmap`)
    Verdict,
    /// `: ipv4_addr . inet_service` and the like.
    Values(KeySpec),
}

/// Set flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SetFlags {
    /// `constant`: elements cannot change after creation.
    pub constant: bool,
    /// `interval`: the key's last field is an address given as a prefix (a single address
    /// is a /32 or /128); other fields of a concatenated key are exact values, e.g.
    /// `192.0.2.50 . tcp . 80 . 10.100.0.0/24`. Ranges must not overlap (the kernel
    /// refuses an overlapping element): merge prefixes first.
    pub interval: bool,
    /// `timeout`: elements may expire.
    pub timeout: bool,
    /// `dynamic`: the data path may add elements (`update @set { … }`).
    pub dynamic: bool,
    /// `counter`: every element carries a packet and byte counter that a lookup matching it
    /// increments (not a kernel flag: a counter expression on the set, `NFTA_SET_EXPR`, that
    /// the kernel copies into each element). Counters are read back, not modelled.
    pub counter: bool,
}

/// A named set's or map's properties without its elements (what `add set|map` creates).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SetSpec {
    /// Key type.
    pub key: KeySpec,
    /// `Some` for a map.
    pub data: Option<MapData>,
    /// Flags.
    pub flags: SetFlags,
    /// Default element timeout (needs `flags.timeout`).
    pub timeout: Option<Duration>,
    /// `size`: the most elements the set may hold. The kernel sizes the set's hash table for
    /// it when the set is created (a set without a size starts small and rehashes as it
    /// grows, which makes a large transaction's element inserts several times dearer) and
    /// refuses an element beyond it (`ENFILE`, [`crate::ApplyError::is_set_full`]). `Some(0)`
    /// is no size, for the kernel as for the fake backend.
    pub size: Option<u32>,
    /// Comment.
    pub comment: Option<String>,
}

impl SetSpec {
    /// A plain set keyed by the given types.
    pub fn set(key: Vec<DataType>) -> Self {
        Self {
            key: KeySpec::Types(key),
            data: None,
            flags: SetFlags::default(),
            timeout: None,
            size: None,
            comment: None,
        }
    }

    /// A map keyed by `key` mapping to `data`.
    pub fn map(key: KeySpec, data: MapData) -> Self {
        Self {
            key,
            data: Some(data),
            flags: SetFlags::default(),
            timeout: None,
            size: None,
            comment: None,
        }
    }

    /// Whether this is a map (`map` keyword) rather than a set.
    pub fn is_map(&self) -> bool {
        self.data.is_some()
    }
}

/// One constant value in an element key, map data or a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Value {
    /// IPv4 address.
    Ipv4(Ipv4Addr),
    /// IPv6 address.
    Ipv6(Ipv6Addr),
    /// IPv4 prefix (interval sets and `==` comparisons).
    Ipv4Net(Ipv4Net),
    /// IPv6 prefix.
    Ipv6Net(Ipv6Net),
    /// L4 protocol number (`tcp` = 6, `udp` = 17, `sctp` = 132).
    Proto(u8),
    /// Port.
    Port(u16),
    /// Packet mark.
    Mark(u32),
    /// Plain integer (e.g. a `numgen` bucket).
    Integer(u32),
    /// Interface name (comparisons only).
    IfName(IfName),
}

impl Value {
    /// TCP.
    pub const TCP: Value = Value::Proto(6);
    /// UDP.
    pub const UDP: Value = Value::Proto(17);
    /// SCTP.
    pub const SCTP: Value = Value::Proto(132);

    /// Whether the value can stand where `ty` is expected (a prefix stands for an address).
    pub fn fits(&self, ty: DataType) -> bool {
        matches!(
            (self, ty),
            (Value::Ipv4(_) | Value::Ipv4Net(_), DataType::Ipv4Addr)
                | (Value::Ipv6(_) | Value::Ipv6Net(_), DataType::Ipv6Addr)
                | (Value::Proto(_), DataType::InetProto)
                | (Value::Port(_), DataType::InetService)
                | (Value::Mark(_), DataType::Mark)
                | (Value::Integer(_), DataType::Integer)
        )
    }

    /// The value's type (a prefix has its address's; an interface name, not set-key
    /// material here, is typed as integer, as [`Expr::datatype`] types `iifname`).
    pub fn datatype(&self) -> DataType {
        match self {
            Value::Ipv4(_) | Value::Ipv4Net(_) => DataType::Ipv4Addr,
            Value::Ipv6(_) | Value::Ipv6Net(_) => DataType::Ipv6Addr,
            Value::Proto(_) => DataType::InetProto,
            Value::Port(_) => DataType::InetService,
            Value::Mark(_) => DataType::Mark,
            Value::Integer(_) | Value::IfName(_) => DataType::Integer,
        }
    }

    /// Whether this is a prefix (only valid in interval sets and `==`/`!=` comparisons).
    pub fn is_prefix(&self) -> bool {
        matches!(self, Value::Ipv4Net(_) | Value::Ipv6Net(_))
    }
}

/// An interface name (at most 15 bytes, no NUL), as matched by `iifname`, or a name prefix
/// (`"veth*"`, nft's wildcard: every interface whose name starts with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IfName {
    bytes: [u8; 16],
    prefix: bool,
}

impl IfName {
    /// Validates an interface name.
    pub fn new(name: &str) -> Option<Self> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() > 15 || b.contains(&0) || b.contains(&b'"') || b.contains(&b'*')
        {
            return None;
        }
        let mut bytes = [0u8; 16];
        bytes[..b.len()].copy_from_slice(b);
        Some(Self {
            bytes,
            prefix: false,
        })
    }

    /// Validates an interface name prefix: it matches every name that starts with it.
    pub fn prefix(prefix: &str) -> Option<Self> {
        Self::new(prefix).map(|n| Self { prefix: true, ..n })
    }

    /// Reads nft's spelling: `"eth0"`, or `"veth*"` for a prefix.
    pub fn parse(s: &str) -> Option<Self> {
        match s.strip_suffix('*') {
            Some(p) => Self::prefix(p),
            None => Self::new(s),
        }
    }

    /// The name (without the `*` of a prefix).
    pub fn as_str(&self) -> &str {
        let end = self.bytes.iter().position(|&c| c == 0).unwrap_or(16);
        std::str::from_utf8(&self.bytes[..end]).unwrap_or("")
    }

    /// Whether this is a prefix.
    pub fn is_prefix(&self) -> bool {
        self.prefix
    }

    /// The bytes the kernel compares: the 16 NUL-padded bytes of a name, or only the bytes of
    /// a prefix (so the comparison ignores the rest of the name).
    pub fn bytes(&self) -> Vec<u8> {
        if self.prefix {
            self.as_str().as_bytes().to_vec()
        } else {
            self.bytes.to_vec()
        }
    }
}

/// A set/map element key: one value per key field.
pub type Key = Vec<Value>;

/// A verdict.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// `accept`
    Accept,
    /// `drop`
    Drop,
    /// `return`
    Return,
    /// `jump chain`
    Jump(String),
    /// `goto chain`
    Goto(String),
}

impl Verdict {
    /// The chain this verdict transfers to, if any.
    pub fn target(&self) -> Option<&str> {
        match self {
            Verdict::Jump(c) | Verdict::Goto(c) => Some(c),
            _ => None,
        }
    }
}

/// Map element data.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ElementData {
    /// Concatenated values (data map).
    Values(Vec<Value>),
    /// A verdict (verdict map).
    Verdict(Verdict),
}

/// A set/map element's payload besides its key.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    /// Map data; `None` in a set.
    pub data: Option<ElementData>,
    /// Per-element timeout (set needs the timeout flag).
    pub timeout: Option<Duration>,
    /// Element comment.
    pub comment: Option<String>,
}

impl Element {
    /// A set element.
    pub fn key_only() -> Self {
        Self::default()
    }

    /// A verdict-map element.
    pub fn verdict(v: Verdict) -> Self {
        Self {
            data: Some(ElementData::Verdict(v)),
            ..Self::default()
        }
    }

    /// A data-map element.
    pub fn values(v: Vec<Value>) -> Self {
        Self {
            data: Some(ElementData::Values(v)),
            ..Self::default()
        }
    }
}

/// A named set or map with its elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    /// Properties.
    pub spec: SetSpec,
    /// Elements by key.
    pub elements: BTreeMap<Key, Element>,
}

impl Set {
    /// An empty set/map.
    pub fn new(spec: SetSpec) -> Self {
        Self {
            spec,
            elements: BTreeMap::new(),
        }
    }
}

/// Packet header fields that can be loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Payload {
    /// `ip saddr`
    IpSaddr,
    /// `ip daddr`
    IpDaddr,
    /// `ip6 saddr`
    Ip6Saddr,
    /// `ip6 daddr`
    Ip6Daddr,
    /// `th sport` (any transport header with ports)
    ThSport,
    /// `th dport`
    ThDport,
    /// `tcp dport` (implies `meta l4proto tcp`)
    TcpDport,
    /// `tcp sport`
    TcpSport,
    /// `udp dport` (implies `meta l4proto udp`)
    UdpDport,
    /// `udp sport`
    UdpSport,
}

impl Payload {
    /// nft syntax.
    pub fn as_str(self) -> &'static str {
        match self {
            Payload::IpSaddr => "ip saddr",
            Payload::IpDaddr => "ip daddr",
            Payload::Ip6Saddr => "ip6 saddr",
            Payload::Ip6Daddr => "ip6 daddr",
            Payload::ThSport => "th sport",
            Payload::ThDport => "th dport",
            Payload::TcpDport => "tcp dport",
            Payload::TcpSport => "tcp sport",
            Payload::UdpDport => "udp dport",
            Payload::UdpSport => "udp sport",
        }
    }

    /// The L4 protocol this field implies, if any.
    pub fn implied_l4proto(self) -> Option<u8> {
        match self {
            Payload::TcpDport | Payload::TcpSport => Some(6),
            Payload::UdpDport | Payload::UdpSport => Some(17),
            _ => None,
        }
    }
}

/// `meta` keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MetaKey {
    /// `meta l4proto`
    L4Proto,
    /// `meta mark`
    Mark,
    /// `iifname`
    IifName,
    /// `oifname`
    OifName,
}

/// Conntrack keys (`ct …`). `Original*` read the original-direction tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CtKey {
    /// `ct original ip saddr`
    OriginalIpSaddr,
    /// `ct original ip daddr`
    OriginalIpDaddr,
    /// `ct original ip6 saddr`
    OriginalIp6Saddr,
    /// `ct original ip6 daddr`
    OriginalIp6Daddr,
    /// `ct original proto-dst`
    OriginalProtoDst,
}

/// An expression producing a value (left side of a match, part of a set key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Expr {
    /// Header field.
    Payload(Payload),
    /// `meta …`
    Meta(MetaKey),
    /// `ct …`
    Ct(CtKey),
    /// `numgen random mod N`
    NumgenRandom {
        /// Modulus N (> 0).
        modulus: u32,
    },
    /// `jhash <field> mod N seed 0x0`: a deterministic bucket of a header field (the same
    /// field value always gives the same bucket).
    Jhash {
        /// The hashed field (a source or destination address).
        of: Payload,
        /// Modulus N (> 0).
        modulus: u32,
    },
    /// A constant (an address, protocol or port) as one field of a concatenated key, as in
    /// `update @m { ip saddr . 10.96.0.10 . 6 . 80 : … }`: loaded into its registers as an
    /// immediate. Only key material here: a match compares with a [`Value`] on its right.
    Const(Value),
}

impl Expr {
    /// The value's type.
    pub fn datatype(&self) -> DataType {
        match self {
            Expr::Payload(Payload::IpSaddr | Payload::IpDaddr) => DataType::Ipv4Addr,
            Expr::Payload(Payload::Ip6Saddr | Payload::Ip6Daddr) => DataType::Ipv6Addr,
            Expr::Payload(_) => DataType::InetService,
            Expr::Meta(MetaKey::L4Proto) => DataType::InetProto,
            Expr::Meta(MetaKey::Mark) => DataType::Mark,
            // Interface names are not set-key material here; typed as integer for arity checks.
            Expr::Meta(MetaKey::IifName | MetaKey::OifName) => DataType::Integer,
            Expr::Ct(CtKey::OriginalIpSaddr | CtKey::OriginalIpDaddr) => DataType::Ipv4Addr,
            Expr::Ct(CtKey::OriginalIp6Saddr | CtKey::OriginalIp6Daddr) => DataType::Ipv6Addr,
            Expr::Ct(CtKey::OriginalProtoDst) => DataType::InetService,
            Expr::NumgenRandom { .. } | Expr::Jhash { .. } => DataType::Integer,
            Expr::Const(v) => v.datatype(),
        }
    }

    /// Whether the expression is an interface name (compared as a 16-byte string).
    pub fn is_ifname(&self) -> bool {
        matches!(self, Expr::Meta(MetaKey::IifName | MetaKey::OifName))
    }
}

/// Comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CmpOp {
    /// `==` (nft prints nothing)
    Eq,
    /// `!=`
    Ne,
}

/// `ct state` flags that can be tested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CtState {
    /// `new`
    New,
    /// `established`
    Established,
    /// `related`
    Related,
    /// `invalid`
    Invalid,
}

/// `ct status` bits that can be tested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CtStatus {
    /// `dnat`
    Dnat,
    /// `snat`
    Snat,
}

/// Which address `fib … type` classifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FibAddr {
    /// `fib saddr type`
    Saddr,
    /// `fib daddr type`
    Daddr,
}

/// Address family for `dnat ip|ip6 to …`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NatFamily {
    /// `ip`
    Ip,
    /// `ip6`
    Ip6,
}

/// How `meta mark set` changes the mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MarkOp {
    /// `meta mark set meta mark | bits`
    Or(u32),
    /// `meta mark set meta mark ^ bits`
    Xor(u32),
}

/// How a `dynset` statement changes the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DynsetOp {
    /// `add @set { … }`: insert if absent.
    Add,
    /// `update @set { … }`: insert or refresh the timeout.
    Update,
}

/// One statement of a rule. Matches come first, then actions, as nft requires.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stmt {
    /// `left [!=] value` (value may be a prefix for addresses).
    Match {
        /// Field.
        left: Expr,
        /// Operator.
        op: CmpOp,
        /// Constant.
        right: Value,
    },
    /// `meta mark & mask ==|!= value`
    MarkMatch {
        /// Mask.
        mask: u32,
        /// Operator.
        op: CmpOp,
        /// Compared value (after masking).
        value: u32,
    },
    /// `ct state <flag>`
    CtState(CtState),
    /// `ct status <flag>`
    CtStatus(CtStatus),
    /// `fib saddr|daddr type local`
    FibLocal(FibAddr),
    /// `k1 . k2 [!=] @set`
    Lookup {
        /// Key expressions, concatenated.
        key: Vec<Expr>,
        /// Set name.
        set: String,
        /// `!=` (not in set).
        negate: bool,
    },
    /// `k1 . k2 vmap @map`
    Vmap {
        /// Key expressions.
        key: Vec<Expr>,
        /// Verdict map name.
        map: String,
    },
    /// `dnat ip|ip6 to k1 . k2 map @map` where the map data is `addr . inet_service`.
    DnatMap {
        /// Family keyword.
        family: NatFamily,
        /// Key expressions.
        key: Vec<Expr>,
        /// Map name.
        map: String,
    },
    /// `meta mark set meta mark | x` / `^ x`
    SetMark(MarkOp),
    /// `update|add @set { key : data }`
    Dynset {
        /// Operation.
        op: DynsetOp,
        /// Set or map name.
        set: String,
        /// Key expressions.
        key: Vec<Expr>,
        /// Data expressions (maps only).
        data: Vec<Expr>,
    },
    /// `counter` (anonymous; values are read back from the kernel, not modelled here).
    Counter,
    /// `masquerade [fully-random]`
    Masquerade {
        /// `fully-random`
        fully_random: bool,
    },
    /// `reject` with nft's default (ICMP port unreachable; icmpx in `inet`).
    Reject,
    /// Verdict.
    Verdict(Verdict),
}

/// A rule: statements and an optional comment.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// Statements in order.
    pub stmts: Vec<Stmt>,
    /// `comment "…"`
    pub comment: Option<String>,
}

impl Rule {
    /// A rule from statements.
    pub fn new(stmts: Vec<Stmt>) -> Self {
        Self {
            stmts,
            comment: None,
        }
    }

    /// Adds a comment.
    pub fn with_comment(mut self, c: impl Into<String>) -> Self {
        self.comment = Some(c.into());
        self
    }

    /// Chains this rule jumps or goes to.
    pub fn chain_targets(&self) -> impl Iterator<Item = &str> {
        self.stmts.iter().filter_map(|s| match s {
            Stmt::Verdict(v) => v.target(),
            _ => None,
        })
    }

    /// Sets and maps this rule references.
    pub fn set_refs(&self) -> impl Iterator<Item = &str> {
        self.stmts.iter().filter_map(|s| match s {
            Stmt::Lookup { set, .. } | Stmt::Dynset { set, .. } => Some(set.as_str()),
            Stmt::Vmap { map, .. } | Stmt::DnatMap { map, .. } => Some(map.as_str()),
            _ => None,
        })
    }
}

/// Whether `name` is acceptable as a table/chain/set name: renders unquoted and lists back.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !matches!(name, "map" | "set" | "table" | "chain" | "element" | "rule")
}

/// Whether `c` is acceptable as a comment: printable, no quotes, fits nft's 128-byte limit.
pub fn valid_comment(c: &str) -> bool {
    c.len() < 128
        && !c
            .chars()
            .any(|ch| ch == '"' || ch == '\\' || ch.is_control())
}
