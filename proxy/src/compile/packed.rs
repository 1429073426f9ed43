//! A compact, exact encoding of a fragment's elements, and the 128-bit hash of an element key
//! the compiler's ownership map is keyed by (issue 13: the applied state of 10k Services × 10
//! endpoints took 130 MiB as `Vec<Value>` keys and `Element`s; packed it takes a few bytes per
//! value).
//!
//! A record is `key length (u8) · key · element length (u16) · element`, the key being the set
//! and the values, so a lookup compares byte slices and decodes only what it returns. The
//! encoding is injective (equal bytes ⇔ equal element), so fragments compare as bytes.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};

use crate::nft::ir::{Element, ElementData, IfName, Value, Verdict};

use super::layout::*;

/// The static sets a fragment may put elements in, by index in the encoding.
const STATIC_SETS: [&str; 22] = [
    NODEPORT_IPS,
    CLUSTER_IPS,
    SERVICE_IPS,
    EXTERNAL_LOCAL_IPS,
    SERVICE_NODEPORTS,
    NODEPORT_EXTERNAL_LOCAL,
    ENDPOINTS,
    ENDPOINTS_LOCAL,
    NODEPORT_ENDPOINTS,
    NODEPORT_ENDPOINTS_LOCAL,
    MASQ_IPS,
    MASQ_LOCAL_SOURCE_IPS,
    MASQ_NODEPORTS,
    MASQ_LOCAL_SOURCE_NODEPORTS,
    NO_ENDPOINT_SERVICES,
    NO_ENDPOINT_NODEPORTS,
    FIREWALL_IPS,
    FIREWALL_ALLOW,
    HAIRPIN,
    SERVICE_CIDRS,
    SERVICE_TRAFFIC,
    NODEPORT_TRAFFIC,
];

/// The 128-bit hash of an element key (its set and values): what the ownership map is keyed
/// by instead of the key itself. Two distinct keys of one table collide with a probability
/// around n²/2¹²⁹ (10⁻²⁸ for a million elements). Two `u64`s rather than a `u128`, whose
/// 16-byte alignment would pad every map entry by 8 bytes.
pub(super) type KeyHash = [u64; 2];

/// The hash of the encoded key `key` (as [`Record::key`] holds it).
pub(super) fn hash_encoded(key: &[u8]) -> KeyHash {
    let h = xxhash_rust::xxh3::xxh3_128(key);
    [h as u64, (h >> 64) as u64]
}

/// The set's part of an encoded key (as [`Record::key`] holds it): equal for the keys of one
/// set, different for keys of different sets.
pub(super) fn set_prefix(key: &[u8]) -> &[u8] {
    match key.first() {
        Some(0) => &key[..2],
        _ => &key[..9],
    }
}

/// The set a [`set_prefix`] names.
pub(super) fn set_of_prefix(prefix: &[u8]) -> SetRef {
    Record {
        key: prefix,
        elem: &[],
    }
    .decode_key()
    .0
}

/// The hash of the key `values` of `set`.
pub(super) fn key_hash(set: SetRef, values: &[Value]) -> KeyHash {
    let mut b = Vec::with_capacity(64);
    put_key(&mut b, set, values);
    hash_encoded(&b)
}

/// A fragment's elements, packed. Later records with the same key replace earlier ones (as
/// they would in one transaction).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packed(Vec<u8>);

/// One element, encoded.
#[derive(Debug, Clone, Copy)]
pub(super) struct Record<'a> {
    /// The encoded key (set and values): [`hash_encoded`] of it keys the ownership map.
    pub(super) key: &'a [u8],
    /// The encoded element.
    pub(super) elem: &'a [u8],
}

impl Record<'_> {
    /// The set and values of the key.
    pub(super) fn decode_key(&self) -> (SetRef, Vec<Value>) {
        let mut r = Reader(self.key);
        let set = match r.u8() {
            0 => SetRef::Static(STATIC_SETS[usize::from(r.u8())]),
            1 => SetRef::AffinityKeys(r.u64()),
            _ => SetRef::AffinityNodePortKeys(r.u64()),
        };
        let mut values = Vec::with_capacity(4);
        while !r.0.is_empty() {
            values.push(r.value());
        }
        (set, values)
    }

    /// The element.
    pub(super) fn decode_elem(&self) -> Element {
        decode_elem(self.elem)
    }
}

impl Packed {
    /// Appends an element.
    pub(super) fn push(&mut self, set: SetRef, key: &[Value], e: &Element) {
        let b = &mut self.0;
        let at = b.len();
        b.push(0);
        put_key(b, set, key);
        b[at] = u8::try_from(b.len() - at - 1).expect("an element key encodes in < 256 bytes");
        let at = b.len();
        b.extend_from_slice(&[0, 0]);
        put_elem(b, e);
        let len = u16::try_from(b.len() - at - 2).expect("an element encodes in < 64 KiB");
        b[at..at + 2].copy_from_slice(&len.to_le_bytes());
    }

    /// Frees unused capacity (once the fragment is complete).
    pub(super) fn shrink_to_fit(&mut self) {
        self.0.shrink_to_fit();
    }

    /// The records, in order.
    pub(super) fn records(&self) -> impl Iterator<Item = Record<'_>> {
        let mut rest = self.0.as_slice();
        std::iter::from_fn(move || {
            let (&klen, r) = rest.split_first()?;
            let (key, r) = r.split_at(usize::from(klen));
            let (len, r) = r.split_at(2);
            let elen = usize::from(u16::from_le_bytes([len[0], len[1]]));
            let (elem, r) = r.split_at(elen);
            rest = r;
            Some(Record { key, elem })
        })
    }

    /// The element for the encoded key `key` (the last record with it).
    pub(super) fn find<'s>(&'s self, key: &[u8]) -> Option<&'s [u8]> {
        self.records()
            .filter(|r| r.key == key)
            .last()
            .map(|r| r.elem)
    }
}

fn put_key(b: &mut Vec<u8>, set: SetRef, values: &[Value]) {
    match set {
        SetRef::Static(name) => {
            let i = STATIC_SETS
                .iter()
                .position(|s| *s == name)
                .expect("every static set a fragment uses is listed in STATIC_SETS");
            b.extend_from_slice(&[0, i as u8]);
        }
        SetRef::AffinityKeys(t) => {
            b.push(1);
            b.extend_from_slice(&t.to_le_bytes());
        }
        SetRef::AffinityNodePortKeys(t) => {
            b.push(2);
            b.extend_from_slice(&t.to_le_bytes());
        }
    }
    for v in values {
        put_value(b, v);
    }
}

fn put_value(b: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Ipv4(a) => {
            b.push(0);
            b.extend_from_slice(&a.octets());
        }
        Value::Ipv6(a) => {
            b.push(1);
            b.extend_from_slice(&a.octets());
        }
        Value::Ipv4Net(n) => {
            b.push(2);
            b.extend_from_slice(&n.addr().octets());
            b.push(n.prefix_len());
        }
        Value::Ipv6Net(n) => {
            b.push(3);
            b.extend_from_slice(&n.addr().octets());
            b.push(n.prefix_len());
        }
        Value::Proto(p) => b.extend_from_slice(&[4, *p]),
        Value::Port(p) => {
            b.push(5);
            b.extend_from_slice(&p.to_le_bytes());
        }
        Value::Mark(m) => {
            b.push(6);
            b.extend_from_slice(&m.to_le_bytes());
        }
        Value::Integer(i) => {
            b.push(7);
            b.extend_from_slice(&i.to_le_bytes());
        }
        Value::IfName(n) => {
            b.push(if n.is_prefix() { 9 } else { 8 });
            put_str(b, n.as_str());
        }
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("a name or comment is shorter than 64 KiB");
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn put_elem(b: &mut Vec<u8>, e: &Element) {
    match &e.data {
        None => b.push(0),
        Some(ElementData::Values(vs)) => {
            b.push(1);
            b.push(u8::try_from(vs.len()).expect("map data has fewer than 256 values"));
            for v in vs {
                put_value(b, v);
            }
        }
        Some(ElementData::Verdict(v)) => match v {
            Verdict::Accept => b.push(2),
            Verdict::Drop => b.push(3),
            Verdict::Return => b.push(4),
            Verdict::Jump(c) => {
                b.push(5);
                put_str(b, c);
            }
            Verdict::Goto(c) => {
                b.push(6);
                put_str(b, c);
            }
        },
    }
    match e.timeout {
        None => b.push(0),
        Some(t) => {
            b.push(1);
            b.extend_from_slice(&t.as_secs().to_le_bytes());
            b.extend_from_slice(&t.subsec_nanos().to_le_bytes());
        }
    }
    match &e.comment {
        None => b.push(0),
        Some(c) => {
            b.push(1);
            put_str(b, c);
        }
    }
}

/// Reads what the `put_…` functions wrote (always well formed: only they write).
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().expect("split_at(N) yields N bytes")
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn str(&mut self) -> &'a str {
        let len = usize::from(self.u16());
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        std::str::from_utf8(s).expect("encoded from a str")
    }
    fn value(&mut self) -> Value {
        match self.u8() {
            0 => Value::Ipv4(Ipv4Addr::from(self.take::<4>())),
            1 => Value::Ipv6(Ipv6Addr::from(self.take::<16>())),
            2 => {
                let a = Ipv4Addr::from(self.take::<4>());
                Value::Ipv4Net(Ipv4Net::new(a, self.u8()).expect("encoded from a valid prefix"))
            }
            3 => {
                let a = Ipv6Addr::from(self.take::<16>());
                Value::Ipv6Net(Ipv6Net::new(a, self.u8()).expect("encoded from a valid prefix"))
            }
            4 => Value::Proto(self.u8()),
            5 => Value::Port(self.u16()),
            6 => Value::Mark(self.u32()),
            7 => Value::Integer(self.u32()),
            8 => Value::IfName(IfName::new(self.str()).expect("encoded from a valid name")),
            _ => Value::IfName(IfName::prefix(self.str()).expect("encoded from a valid prefix")),
        }
    }
}

fn decode_elem(bytes: &[u8]) -> Element {
    let mut r = Reader(bytes);
    let data = match r.u8() {
        0 => None,
        1 => {
            let n = r.u8();
            Some(ElementData::Values((0..n).map(|_| r.value()).collect()))
        }
        2 => Some(ElementData::Verdict(Verdict::Accept)),
        3 => Some(ElementData::Verdict(Verdict::Drop)),
        4 => Some(ElementData::Verdict(Verdict::Return)),
        5 => Some(ElementData::Verdict(Verdict::Jump(r.str().to_string()))),
        _ => Some(ElementData::Verdict(Verdict::Goto(r.str().to_string()))),
    };
    let timeout = match r.u8() {
        0 => None,
        _ => {
            let secs = r.u64();
            Some(Duration::new(secs, r.u32()))
        }
    };
    let comment = match r.u8() {
        0 => None,
        _ => Some(r.str().to_string()),
    };
    Element {
        data,
        timeout,
        comment,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_and_element_kind_decodes_to_what_was_packed() {
        let keys: Vec<(SetRef, Vec<Value>)> = vec![
            (
                SetRef::Static(ENDPOINTS),
                vec![
                    Value::Ipv4("10.96.0.1".parse().expect("literal")),
                    Value::TCP,
                    Value::Port(80),
                    Value::Integer(7),
                ],
            ),
            (
                SetRef::Static(FIREWALL_ALLOW),
                vec![
                    Value::Ipv6("fd00::1".parse().expect("literal")),
                    Value::Ipv4Net("10.0.0.0/8".parse().expect("literal")),
                    Value::Ipv6Net("fd00::/64".parse().expect("literal")),
                ],
            ),
            (SetRef::AffinityKeys(10_800), vec![Value::Mark(0x4000)]),
            (
                SetRef::AffinityNodePortKeys(60),
                vec![
                    Value::IfName(IfName::new("eth0").expect("literal")),
                    Value::IfName(IfName::prefix("veth").expect("literal")),
                ],
            ),
        ];
        let elems = [
            Element::key_only(),
            Element::values(vec![
                Value::Ipv4("10.244.0.1".parse().expect("literal")),
                Value::Port(8080),
            ]),
            Element {
                comment: Some("ns/svc:http".into()),
                timeout: Some(Duration::new(3, 5)),
                ..Element::verdict(Verdict::Goto("pick-3".into()))
            },
            Element::verdict(Verdict::Jump("x".into())),
            Element::verdict(Verdict::Accept),
            Element::verdict(Verdict::Drop),
            Element::verdict(Verdict::Return),
        ];
        let mut p = Packed::default();
        let mut want = Vec::new();
        for (i, e) in elems.iter().enumerate() {
            let (set, key) = &keys[i % keys.len()];
            p.push(*set, key, e);
            want.push((*set, key.clone(), e.clone()));
        }
        let got: Vec<_> = p
            .records()
            .map(|r| {
                let (set, key) = r.decode_key();
                (set, key, r.decode_elem())
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_lookup_returns_the_last_element_with_the_key_and_hashes_tell_keys_apart() {
        let k1 = vec![Value::Ipv4("10.96.0.1".parse().expect("literal"))];
        let k2 = vec![Value::Ipv4("10.96.0.2".parse().expect("literal"))];
        let mut p = Packed::default();
        p.push(
            SetRef::Static(CLUSTER_IPS),
            &k1,
            &Element::verdict(Verdict::Drop),
        );
        p.push(SetRef::Static(CLUSTER_IPS), &k2, &Element::key_only());
        p.push(
            SetRef::Static(CLUSTER_IPS),
            &k1,
            &Element::verdict(Verdict::Accept),
        );
        let r = p.records().next().expect("one record");
        let found = p.find(r.key).map(decode_elem);
        assert_eq!(found, Some(Element::verdict(Verdict::Accept)));
        assert_eq!(
            hash_encoded(r.key),
            key_hash(SetRef::Static(CLUSTER_IPS), &k1)
        );
        assert_ne!(
            key_hash(SetRef::Static(CLUSTER_IPS), &k1),
            key_hash(SetRef::Static(SERVICE_TRAFFIC), &k1)
        );
        assert_ne!(
            key_hash(SetRef::Static(CLUSTER_IPS), &k1),
            key_hash(SetRef::Static(CLUSTER_IPS), &k2)
        );
    }
}
