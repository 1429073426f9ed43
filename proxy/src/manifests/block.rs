//! A reader for plain block-style YAML, the style `kubectl get -o yaml`, `helm template` and
//! most hand-written manifests use, straight into the API types. libyaml's scanner (which
//! `serde_yaml_ng` runs) was most of the time it took to read a cluster dump: with this reader,
//! reading and typing a 10,000-Service YAML stream (19.7 MB) takes 0.34 CPU-seconds instead of
//! 1.50 (`lb-scale --read 10000 10`).
//!
//! It reads a subset of YAML and declines everything else (`None`), and the caller then reads
//! the document with `serde_yaml_ng` as before. Whatever it does read reaches the type's
//! `Deserialize` exactly as `serde_yaml_ng` would deliver it: the same mapping keys and
//! sequence elements, each scalar through the same visitor method with the same value. Where
//! `serde_yaml_ng`'s scalar rules give something this reader does not reproduce (a hex or
//! octal number, a float, `-0`, ...) it declines; a document that does not deserialize is
//! declined too, so every error is still `serde_yaml_ng`'s, with its line and column.
//!
//! The subset, by lines:
//!
//! * printable ASCII only (no tab, no carriage return, no byte-order mark), the top level a
//!   mapping at column 0;
//! * blank lines and comment lines anywhere; a comment after a value (` #`);
//! * `key: value` and `key:` with the value's block on the following lines, indented more (a
//!   sequence may also sit at the key's own column, as kubectl prints it); keys are plain;
//! * `- value`, `- key: value` (a mapping starting on the dash's line) and `-` with the value
//!   on the following lines;
//! * scalars on one line: plain, `'single'` and `"double"` quoted (escapes `\\ \" \/ \n \t
//!   \r \0 \xXX \uXXXX \UXXXXXXXX`), and the empty collections `{}` and `[]`.
//!
//! Declined: anchors, aliases, tags, flow collections with content, block scalars (`|`, `>`),
//! scalars over several lines, complex (`?`), quoted and over-long keys (libyaml's limit),
//! keys starting with `...` (a document end), merge keys (`<<`), directives, nesting deeper
//! than [`MAX_DEPTH`], and, while deserialising, more than [`MAX_LEVELS`] levels (newtypes
//! included) or a collection the type does not read to its end.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, MapAccess, SeqAccess, Visitor};

/// Nesting deeper than this is declined (`serde_yaml_ng` refuses more than 128 levels).
const MAX_DEPTH: usize = 100;

/// Levels a document may take while it is deserialised, each mapping, sequence and newtype
/// one, as `serde_yaml_ng` counts them (it refuses more than 128): beyond, declined.
const MAX_LEVELS: u32 = 100;

/// The longest key libyaml takes (its colon at most 1024 characters after the key's start).
const MAX_KEY: usize = 1024;

/// `text` (one document) as a `T`, or `None` when it is outside the subset or does not
/// deserialize as a `T`.
pub(super) fn from_str<T: DeserializeOwned>(text: &str) -> Option<T> {
    let items = parse(text)?;
    T::deserialize(Node {
        items: &items,
        at: 0,
        levels: MAX_LEVELS,
    })
    .ok()
}

/// One line of content: its indentation and its text after it, without trailing spaces.
#[derive(Debug, Clone, Copy)]
struct Line<'a> {
    indent: usize,
    text: &'a str,
}

/// What a node is.
#[derive(Debug, PartialEq)]
enum Kind<'a> {
    /// A plain scalar's text (`""` for a missing value).
    Plain(&'a str),
    /// A quoted scalar's value.
    Quoted(Cow<'a, str>),
    Map,
    Seq,
}

/// A node of the document, in preorder: a collection's children follow it, up to `end`.
#[derive(Debug)]
struct Item<'a> {
    /// The key of a mapping's value (`""` otherwise).
    key: &'a str,
    kind: Kind<'a>,
    /// The index after this node's subtree.
    end: usize,
}

/// The document's nodes in preorder, or `None` outside the subset.
fn parse(text: &str) -> Option<Vec<Item<'_>>> {
    // One pass over the bytes: each line's indentation and end, and the character check.
    let bytes = text.as_bytes();
    let mut lines = Vec::with_capacity(bytes.len() / 24);
    let mut at = 0;
    while at < bytes.len() {
        let start = at;
        while bytes.get(at) == Some(&b' ') {
            at += 1;
        }
        let body = at;
        while let Some(&b) = bytes.get(at) {
            if b == b'\n' {
                break;
            }
            if !(b' '..=b'~').contains(&b) {
                return None;
            }
            at += 1;
        }
        let line = text[body..at].trim_end_matches(' ');
        if !line.is_empty() && !line.starts_with('#') {
            lines.push(Line {
                indent: body - start,
                text: line,
            });
        }
        at += 1;
    }
    let first = lines.first()?;
    if first.indent != 0 || is_dash(first.text) {
        return None;
    }
    let mut parser = Parser {
        lines,
        at: 0,
        items: Vec::new(),
    };
    parser.map("", 0, 0)?;
    (parser.at == parser.lines.len()).then_some(parser.items)
}

/// Whether a line's text is a sequence entry.
fn is_dash(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

struct Parser<'a> {
    lines: Vec<Line<'a>>,
    /// The next line to read.
    at: usize,
    items: Vec<Item<'a>>,
}

impl<'a> Parser<'a> {
    /// A block mapping whose keys are at column `indent`, from the current line on.
    fn map(&mut self, key: &'a str, indent: usize, depth: usize) -> Option<()> {
        let me = self.open(key, Kind::Map, depth)?;
        while let Some(&line) = self.lines.get(self.at) {
            if line.indent < indent {
                break;
            }
            // Indented more and not a value's block: a scalar over several lines, or misplaced.
            if line.indent > indent || is_dash(line.text) {
                return None;
            }
            let (key, rest) = split_key(line.text)?;
            self.at += 1;
            self.value(key, rest, indent, depth + 1, true)?;
        }
        self.items[me].end = self.items.len();
        Some(())
    }

    /// A block sequence whose dashes are at column `indent`, from the current line on.
    fn seq(&mut self, key: &'a str, indent: usize, depth: usize) -> Option<()> {
        let me = self.open(key, Kind::Seq, depth)?;
        while let Some(&line) = self.lines.get(self.at) {
            if line.indent < indent || (line.indent == indent && !is_dash(line.text)) {
                break;
            }
            if line.indent > indent {
                return None;
            }
            let rest = line.text[1..].trim_start_matches(' ');
            if rest.is_empty() || rest.starts_with('#') {
                self.at += 1;
                self.value("", "", indent, depth + 1, false)?;
            } else if is_dash(rest) {
                return None;
            } else if split_key(rest).is_some() {
                // A mapping starting on the dash's line: its keys are at the first one's column.
                let column = indent + line.text.len() - rest.len();
                self.lines[self.at] = Line {
                    indent: column,
                    text: rest,
                };
                self.map("", column, depth + 1)?;
            } else {
                self.at += 1;
                self.value("", rest, indent, depth + 1, false)?;
            }
        }
        self.items[me].end = self.items.len();
        Some(())
    }

    /// The value of `key` (a mapping's key at column `indent`, or a sequence entry's dash
    /// there), whose line ended with `rest`: a scalar, or a block on the following lines.
    fn value(
        &mut self,
        key: &'a str,
        rest: &'a str,
        indent: usize,
        depth: usize,
        in_map: bool,
    ) -> Option<()> {
        let next = self.lines.get(self.at).copied();
        if !rest.is_empty() && !rest.starts_with('#') {
            // A line after it indented more would continue the scalar: the collection's loop
            // declines it.
            return self.leaf(key, scalar(rest)?, depth);
        }
        match next {
            Some(next) if next.indent > indent && is_dash(next.text) => {
                self.seq(key, next.indent, depth)
            }
            Some(next) if next.indent > indent => self.map(key, next.indent, depth),
            Some(next) if in_map && next.indent == indent && is_dash(next.text) => {
                self.seq(key, indent, depth)
            }
            _ => self.leaf(key, Kind::Plain(""), depth),
        }
    }

    /// Adds a collection, whose `end` its caller sets.
    fn open(&mut self, key: &'a str, kind: Kind<'a>, depth: usize) -> Option<usize> {
        (depth <= MAX_DEPTH).then_some(())?;
        self.items.push(Item { key, kind, end: 0 });
        Some(self.items.len() - 1)
    }

    /// Adds a node without children.
    fn leaf(&mut self, key: &'a str, kind: Kind<'a>, depth: usize) -> Option<()> {
        let me = self.open(key, kind, depth)?;
        self.items[me].end = me + 1;
        Some(())
    }
}

/// A mapping line's plain key and what follows its colon; `None` if the line is not one.
fn split_key(text: &str) -> Option<(&str, &str)> {
    if text.starts_with([
        '\'', '"', '[', ']', '{', '}', '&', '*', '!', '|', '>', '%', '@', '`', '?', '#', ',', ':',
        '-',
    ]) || text.starts_with("...")
    {
        // `... ` at column 0 ends the document.
        return None;
    }
    let (key, rest) = match find_pair(text, b':', b' ') {
        Some(i) => (&text[..i], text[i + 2..].trim_start_matches(' ')),
        None => (text.strip_suffix(':')?, ""),
    };
    if key.len() > MAX_KEY
        || key.ends_with(' ')
        || find_pair(key, b' ', b'#').is_some()
        || key == "<<"
    {
        return None;
    }
    Some((key, rest))
}

/// Where `a` followed by `b` first occurs in `text` (lines are short: a plain loop beats a
/// substring search's setup).
fn find_pair(text: &str, a: u8, b: u8) -> Option<usize> {
    let bytes = text.as_bytes();
    (1..bytes.len())
        .find(|&i| bytes[i - 1] == a && bytes[i] == b)
        .map(|i| i - 1)
}

/// A scalar written on one line (after a key's colon or an entry's dash).
fn scalar(text: &str) -> Option<Kind<'_>> {
    match text.as_bytes() {
        [b'"', ..] => quoted(&text[1..], b'"'),
        [b'\'', ..] => quoted(&text[1..], b'\''),
        b"{}" => Some(Kind::Map),
        b"[]" => Some(Kind::Seq),
        [
            b'[' | b']' | b'{' | b'}' | b'&' | b'*' | b'!' | b'|' | b'>' | b'%' | b'@' | b'`'
            | b',',
            ..,
        ]
        | [b'-' | b'?' | b':']
        | [b'-' | b'?' | b':', b' ', ..] => None,
        _ => {
            let text = match find_pair(text, b' ', b'#') {
                Some(i) => text[..i].trim_end_matches(' '),
                None => text,
            };
            (find_pair(text, b':', b' ').is_none() && !text.ends_with(':'))
                .then_some(Kind::Plain(text))
        }
    }
}

/// A quoted scalar closing on its line, given the text after its opening `quote`; only a
/// comment may follow it.
fn quoted(body: &str, quote: u8) -> Option<Kind<'_>> {
    let bytes = body.as_bytes();
    let mut owned: Option<String> = None;
    let (mut from, mut i) = (0, 0);
    loop {
        match *bytes.get(i)? {
            b if b == quote && quote == b'\'' && bytes.get(i + 1) == Some(&b'\'') => {
                let s = owned.get_or_insert_with(String::new);
                s.push_str(&body[from..=i]);
                i += 2;
                from = i;
            }
            b if b == quote => break,
            b'\\' if quote == b'"' => {
                let s = owned.get_or_insert_with(String::new);
                s.push_str(&body[from..i]);
                let (c, len) = escape(&body[i + 1..])?;
                s.push(c);
                i += 1 + len;
                from = i;
            }
            _ => i += 1,
        }
    }
    let value = match owned {
        Some(mut s) => {
            s.push_str(&body[from..i]);
            Cow::Owned(s)
        }
        None => Cow::Borrowed(&body[..i]),
    };
    let after = &body[i + 1..];
    (after.is_empty() || after.starts_with(' ') && after.trim_start().starts_with('#'))
        .then_some(Kind::Quoted(value))
}

/// The character a double-quoted escape stands for and the length of the escape after its
/// backslash.
fn escape(after: &str) -> Option<(char, usize)> {
    let hex = |digits: usize| {
        let h = after.get(1..=digits)?;
        let code = u32::from_str_radix(h, 16).ok()?;
        (h.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| char::from_u32(code))
            .flatten()
            .map(|c| (c, 1 + digits))
    };
    match *after.as_bytes().first()? {
        b'\\' => Some(('\\', 1)),
        b'"' => Some(('"', 1)),
        b'/' => Some(('/', 1)),
        b'n' => Some(('\n', 1)),
        b't' => Some(('\t', 1)),
        b'r' => Some(('\r', 1)),
        b'0' => Some(('\0', 1)),
        b'x' => hex(2),
        b'u' => hex(4),
        b'U' => hex(8),
        _ => None,
    }
}

/// What a plain scalar is when the type does not say (`deserialize_any`), by the rules of
/// `serde_yaml_ng`; `Other` for what this reader leaves to it.
enum Plain {
    Null,
    Bool(bool),
    Unsigned(u64),
    Negative(i64),
    Str,
    Other,
}

fn resolve(s: &str) -> Plain {
    if is_null(s) {
        return Plain::Null;
    }
    if let Some(b) = boolean(s) {
        return Plain::Bool(b);
    }
    let digits = s.strip_prefix('-').unwrap_or(s);
    let decimal = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits.len() == 1 || !digits.starts_with('0'));
    if decimal && digits != "0" && s.starts_with('-') {
        return s.parse().map_or(Plain::Other, Plain::Negative);
    }
    if decimal && !s.starts_with('-') {
        return s.parse().map_or(Plain::Other, Plain::Unsigned);
    }
    // What may be a number in another form (a sign, leading zeros, hex, octal, binary, a
    // float, `.inf`, `NaN`) is left to serde_yaml_ng; the rest (an address, a name) is text.
    let unsigned = s.trim_start_matches(['+', '-']);
    let other = unsigned.starts_with("0x")
        || unsigned.starts_with("0o")
        || unsigned.starts_with("0b")
        || (!unsigned.is_empty() && unsigned.bytes().all(|b| b.is_ascii_digit()))
        || s.parse::<f64>().is_ok()
        || s.strip_prefix('+')
            .is_some_and(|u| u.parse::<f64>().is_ok())
        || [".inf", ".nan"]
            .iter()
            .any(|w| unsigned.eq_ignore_ascii_case(w));
    if other { Plain::Other } else { Plain::Str }
}

/// A plain scalar that is null: empty, `~` or `null` in the three spellings.
fn is_null(s: &str) -> bool {
    matches!(s, "" | "~" | "null" | "Null" | "NULL")
}

fn boolean(s: &str) -> Option<bool> {
    match s {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

/// Why a document was declined; never shown (the document is read again by `serde_yaml_ng`,
/// which reports the error if there is one).
#[derive(Debug)]
struct Declined;

impl fmt::Display for Declined {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("declined by the block-YAML reader")
    }
}

impl std::error::Error for Declined {}

impl de::Error for Declined {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Declined
    }
}

/// A node of the document as a serde deserializer.
#[derive(Clone, Copy)]
struct Node<'t, 'a> {
    items: &'t [Item<'a>],
    at: usize,
    /// Levels left ([`MAX_LEVELS`]).
    levels: u32,
}

impl<'t, 'a> Node<'t, 'a> {
    fn kind(&self) -> &'t Kind<'a> {
        &self.items[self.at].kind
    }

    /// `visit` given the node's children (its entries or elements; none for a missing
    /// value), taking a level for a mapping or sequence; declined unless it read every child
    /// (`serde_yaml_ng` fails then: "invalid length").
    fn children<T>(
        self,
        visit: impl FnOnce(&mut Children<'t, 'a>) -> Result<T, Declined>,
    ) -> Result<T, Declined> {
        let levels = match self.kind() {
            Kind::Map | Kind::Seq => self.levels.checked_sub(1).ok_or(Declined)?,
            Kind::Plain(_) | Kind::Quoted(_) => self.levels,
        };
        let mut children = Children {
            items: self.items,
            next: self.at + 1,
            end: self.items[self.at].end,
            levels,
        };
        let value = visit(&mut children)?;
        (children.next >= children.end)
            .then_some(value)
            .ok_or(Declined)
    }

    fn plain(&self) -> Option<&'a str> {
        match self.kind() {
            Kind::Plain(s) => Some(*s),
            _ => None,
        }
    }

    fn signed<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        match self.plain().map(resolve) {
            Some(Plain::Unsigned(n)) => visitor.visit_i64(i64::try_from(n).map_err(|_| Declined)?),
            Some(Plain::Negative(n)) => visitor.visit_i64(n),
            _ => Err(Declined),
        }
    }

    fn unsigned<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        match self.plain().map(resolve) {
            Some(Plain::Unsigned(n)) => visitor.visit_u64(n),
            _ => Err(Declined),
        }
    }

    /// What this reader leaves to `serde_yaml_ng`: floats, characters, bytes.
    fn declined<'de, V: Visitor<'de>>(self, _: V) -> Result<V::Value, Declined> {
        Err(Declined)
    }
}

/// `Deserializer` methods that each call the reader named beside them.
macro_rules! read_with {
    ($($method:ident => $reader:ident),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
            self.$reader(visitor)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for Node<'_, '_> {
    type Error = Declined;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        match self.kind() {
            Kind::Map => self.children(|c| visitor.visit_map(c)),
            Kind::Seq => self.children(|c| visitor.visit_seq(c)),
            Kind::Quoted(s) => visitor.visit_str(s),
            Kind::Plain(s) => match resolve(s) {
                Plain::Null => visitor.visit_unit(),
                Plain::Bool(b) => visitor.visit_bool(b),
                Plain::Unsigned(n) => visitor.visit_u64(n),
                Plain::Negative(n) => visitor.visit_i64(n),
                Plain::Str => visitor.visit_str(s),
                Plain::Other => Err(Declined),
            },
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        match self.plain().and_then(boolean) {
            Some(b) => visitor.visit_bool(b),
            None => Err(Declined),
        }
    }

    read_with! {
        deserialize_i8 => signed,
        deserialize_i16 => signed,
        deserialize_i32 => signed,
        deserialize_i64 => signed,
        deserialize_u8 => unsigned,
        deserialize_u16 => unsigned,
        deserialize_u32 => unsigned,
        deserialize_u64 => unsigned,
        deserialize_f32 => declined,
        deserialize_f64 => declined,
        deserialize_char => declined,
        deserialize_bytes => declined,
        deserialize_byte_buf => declined,
        deserialize_string => deserialize_str,
        deserialize_identifier => deserialize_str,
    }

    /// Any scalar as its text, as `serde_yaml_ng` does (a plain `80` or `null` included).
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        match self.kind() {
            Kind::Plain(s) => visitor.visit_str(s),
            Kind::Quoted(s) => visitor.visit_str(s),
            Kind::Map | Kind::Seq => Err(Declined),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        if self.plain().is_some_and(is_null) {
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        if self.plain().is_some_and(is_null) {
            visitor.visit_unit()
        } else {
            Err(Declined)
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Declined> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Declined> {
        let levels = self.levels.checked_sub(1).ok_or(Declined)?;
        visitor.visit_newtype_struct(Node { levels, ..self })
    }

    /// A sequence, or a missing value as an empty one (as `serde_yaml_ng` does).
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        match self.kind() {
            Kind::Seq | Kind::Plain("") => self.children(|c| visitor.visit_seq(c)),
            _ => Err(Declined),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _: usize,
        visitor: V,
    ) -> Result<V::Value, Declined> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        visitor: V,
    ) -> Result<V::Value, Declined> {
        self.deserialize_seq(visitor)
    }

    /// A mapping, or a missing value as an empty one (as `serde_yaml_ng` does).
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        match self.kind() {
            Kind::Map | Kind::Plain("") => self.children(|c| visitor.visit_map(c)),
            _ => Err(Declined),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Declined> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Declined> {
        Err(Declined)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        visitor.visit_unit()
    }
}

/// A collection's entries (mapping) or elements (sequence), in order.
struct Children<'t, 'a> {
    items: &'t [Item<'a>],
    next: usize,
    end: usize,
    /// Levels left for the children.
    levels: u32,
}

impl<'t, 'a> Children<'t, 'a> {
    /// The next child (a mapping's value, a sequence's element), moving past its subtree.
    fn take(&mut self) -> Node<'t, 'a> {
        let at = self.next;
        self.next = self.items[at].end;
        Node {
            items: self.items,
            at,
            levels: self.levels,
        }
    }
}

impl<'de> MapAccess<'de> for Children<'_, '_> {
    type Error = Declined;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Declined> {
        if self.next >= self.end {
            return Ok(None);
        }
        // Keys are plain scalars, read by the same rules as values.
        let key = [Item {
            key: "",
            kind: Kind::Plain(self.items[self.next].key),
            end: 1,
        }];
        seed.deserialize(Node {
            items: &key,
            at: 0,
            levels: self.levels,
        })
        .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Declined> {
        seed.deserialize(self.take())
    }
}

impl<'de> SeqAccess<'de> for Children<'_, '_> {
    type Error = Declined;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Declined> {
        if self.next >= self.end {
            return Ok(None);
        }
        seed.deserialize(self.take()).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{Node as ApiNode, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use k8s_openapi::api::networking::v1::ServiceCIDR;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use proptest::prelude::*;
    use serde::de::DeserializeOwned;
    use serde_json::Value;

    use super::from_str;

    /// What `serde_yaml_ng` reads from `doc` as a `T` (`None` on an error).
    fn reference<T: DeserializeOwned>(doc: &str) -> Option<T> {
        serde_yaml_ng::from_str(doc).ok()
    }

    /// The reader's result, checked against `serde_yaml_ng`'s: whatever it reads must equal
    /// that, and it must decline what that refuses. Returns whether it read the document.
    #[track_caller]
    fn agrees<T: DeserializeOwned + PartialEq + std::fmt::Debug>(doc: &str) -> bool {
        let ours = from_str::<T>(doc);
        if let Some(ours) = &ours {
            assert_eq!(
                Some(ours),
                reference::<T>(doc).as_ref(),
                "read differently from serde_yaml_ng:\n{doc}"
            );
        }
        ours.is_some()
    }

    const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  annotations:
    example.com/note: 'it''s: here'
    example.com/json: \"{\\\"a\\\": [1, 2]}\"
    empty: \"\"
  creationTimestamp: \"2026-11-30T10:00:00Z\"
  labels:
    app: web
    version: \"1.0\"
    tier: 2
  name: web
  namespace: demo
  resourceVersion: \"4711\"
  uid: 3f0c6d7e-0000-4000-8000-000000000001
spec:
  clusterIP: 10.96.0.10
  clusterIPs:
  - 10.96.0.10
  - fd00:10:96::a
  externalTrafficPolicy: Local   # as kubectl never prints it, but people write it
  healthCheckNodePort: 32000
  internalTrafficPolicy: Cluster
  ipFamilies:
  - IPv4
  - IPv6
  ipFamilyPolicy: PreferDualStack
  ports:
  - name: http
    nodePort: 30080
    port: 80
    protocol: TCP
    targetPort: 8080
  -   name: metrics
      port: 9090
      protocol: TCP
      targetPort: metrics
  selector:
    app: web
  sessionAffinity: ClientIP
  sessionAffinityConfig:
    clientIP:
      timeoutSeconds: 10800
  trafficDistribution: PreferClose
  type: LoadBalancer
status:
  loadBalancer: {}
";

    const SLICE: &str = "\
addressType: IPv4
apiVersion: discovery.k8s.io/v1
endpoints:
- addresses:
  - 10.244.1.5
  conditions:
    ready: true
    serving: true
    terminating: false
  hints:
    forNodes:
    - name: node-a
    forZones:
    - name: zone-a
  nodeName: node-a
  targetRef:
    kind: Pod
    name: web-0
    namespace: demo
  zone: zone-a

# a terminating endpoint, indented the other way
-
    addresses:
        - 10.244.2.7
    conditions:
        ready: false
        serving: ~
        terminating: True
    nodeName: node-b
kind: EndpointSlice
metadata:
  labels:
    kubernetes.io/service-name: web
  name: web-abc12
  namespace: demo
ports:
- name: http
  port: 8080
  protocol: TCP
  appProtocol: http
- name: ''
  port: 53
  protocol: UDP
";

    const NODE: &str = "\
apiVersion: v1
kind: Node
metadata:
  labels:
    topology.kubernetes.io/zone: zone-a
  name: node-a
spec:
  podCIDR: 10.244.1.0/24
  podCIDRs:
  - 10.244.1.0/24
status:
  addresses:
  - address: 192.0.2.10
    type: InternalIP
";

    const SERVICE_CIDR: &str = "\
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata:
  name: kubernetes
spec:
  cidrs:
  - 10.96.0.0/12
  - fd00:10:96::/112
";

    #[test]
    fn objects_in_kubectls_block_style_are_read_as_serde_yaml_ng_reads_them() {
        assert!(agrees::<Service>(SERVICE));
        assert!(agrees::<EndpointSlice>(SLICE));
        assert!(agrees::<ApiNode>(NODE));
        assert!(agrees::<ServiceCIDR>(SERVICE_CIDR));
        // The same objects as untyped values: every key and scalar, not only the typed ones.
        for doc in [SERVICE, SLICE, NODE, SERVICE_CIDR] {
            assert!(agrees::<Value>(doc), "{doc}");
        }
        let slice = from_str::<EndpointSlice>(SLICE).expect("read");
        let endpoints = slice.endpoints.as_deref().unwrap_or_default();
        assert_eq!(endpoints.len(), 2);
        assert_eq!(endpoints[1].conditions.as_ref().unwrap().serving, None);
        assert_eq!(slice.ports.as_ref().unwrap()[1].name.as_deref(), Some(""));
    }

    #[test]
    fn a_document_that_does_not_fit_its_type_is_declined_for_serde_yaml_ng_to_report() {
        // serde_yaml_ng fails on each; the reader must not return a value for any.
        for doc in [
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n  ports:\n  - port: http\n",
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n  ports:\n  - port: 4294967296\n",
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n  ports: 80\n",
            "apiVersion: v1\nkind: Service\nmetadata: [a]\n",
        ] {
            assert!(reference::<Service>(doc).is_none(), "{doc}");
            assert!(from_str::<Service>(doc).is_none(), "{doc}");
        }
    }

    /// A type nesting itself through a newtype: each level is a mapping and a newtype.
    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Nested(BTreeMap<String, Nested>);

    #[test]
    fn what_serde_yaml_ng_refuses_is_declined() {
        #[track_caller]
        fn refused<T: DeserializeOwned + PartialEq + std::fmt::Debug>(doc: &str) {
            assert!(reference::<T>(doc).is_none(), "serde_yaml_ng reads:\n{doc}");
            assert!(!agrees::<T>(doc), "read:\n{doc}");
        }
        // `...` at column 0 ends the document.
        refused::<BTreeMap<String, i32>>("a: 1\n... b: 2\n");
        refused::<Value>("... a: b\n");
        // libyaml takes keys of at most 1024 characters.
        refused::<Value>(&format!("{}: v\n", "x".repeat(1025)));
        refused::<Value>(&format!("a:\n- {}: v\n", "y".repeat(1030)));
        assert!(agrees::<Value>(&format!("{}: v\n", "x".repeat(1024))));
        // A sequence longer than the tuple or array it is read as.
        refused::<BTreeMap<String, (i32, i32)>>("a:\n- 1\n- 2\n- 3\n");
        refused::<BTreeMap<String, [i32; 2]>>("a:\n- 1\n- 2\n- 3\n");
        assert!(agrees::<BTreeMap<String, (i32, i32)>>("a:\n- 1\n- 2\n"));
        // Newtypes count toward serde_yaml_ng's depth limit as mappings do.
        let deep = |n: usize| {
            (0..n)
                .map(|i| format!("{}k{i}:\n", "  ".repeat(i)))
                .collect::<String>()
        };
        refused::<Nested>(&deep(70));
        assert!(agrees::<Nested>(&deep(30)));
    }

    /// `k: <scalar>` read as a map of `T`, by both readers.
    #[track_caller]
    fn scalar_agrees<T: DeserializeOwned + PartialEq + std::fmt::Debug>(scalar: &str) -> bool {
        agrees::<BTreeMap<String, T>>(&format!("k: {scalar}\n"))
    }

    #[test]
    fn each_scalar_reaches_the_type_as_serde_yaml_ng_delivers_it() {
        let spellings = [
            "",
            "~",
            "null",
            "Null",
            "NULL",
            "true",
            "True",
            "TRUE",
            "false",
            "FALSE",
            "yes",
            "0",
            "7",
            "-7",
            "+7",
            "-0",
            "007",
            "0x1F",
            "0o17",
            "0b11",
            "1e3",
            "1.5",
            ".5",
            ".inf",
            "-.inf",
            ".nan",
            "inf",
            "NaN",
            "Infinity",
            "65535",
            "65536",
            "2147483648",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775809",
            "10.0.0.1",
            "fd00::1",
            "a#b",
            "a # comment",
            "http://x:80/y",
            "a:b",
            "'7'",
            "'it''s'",
            "''",
            "\"\"",
            "\"null\"",
            "\"a\\\"b\\\\c\\/d\"",
            "\"\\x41\\u00e9\\U0001F600\"",
            "\"tab\\there\\n\"",
            "'a' # c",
            "\"a\" # c",
            "x y  z",
            "- a",
            "? a",
            ": a",
            "a: b",
            "a:",
            "[a]",
            "{a: 1}",
            "[]",
            "{}",
            "&a x",
            "*a",
            "!!str 7",
            "|",
            ">",
            "@x",
            "`x`",
            "%x",
            "\"open",
            "'open",
            "\"a\"b",
            "\"\\q\"",
            "\"\\u12\"",
            "\"\\x+1\"",
        ];
        for s in spellings {
            scalar_agrees::<Value>(s);
            scalar_agrees::<String>(s);
            scalar_agrees::<Option<String>>(s);
            scalar_agrees::<i32>(s);
            scalar_agrees::<u16>(s);
            scalar_agrees::<i64>(s);
            scalar_agrees::<u64>(s);
            scalar_agrees::<bool>(s);
            scalar_agrees::<Option<i32>>(s);
            scalar_agrees::<IntOrString>(s);
            scalar_agrees::<()>(s);
            scalar_agrees::<Vec<String>>(s);
            scalar_agrees::<BTreeMap<String, String>>(s);
        }
        // And the everyday ones are read, not left to serde_yaml_ng.
        assert!(scalar_agrees::<i32>("80"));
        assert!(scalar_agrees::<i32>("-1"));
        assert!(scalar_agrees::<u16>("65535"));
        assert!(scalar_agrees::<bool>("true"));
        assert!(scalar_agrees::<String>("10.0.0.1"));
        assert!(scalar_agrees::<String>("80"));
        assert!(scalar_agrees::<String>("'it''s'"));
        assert!(scalar_agrees::<String>("\"a\\\"b\""));
        assert!(scalar_agrees::<Option<String>>(""));
        assert!(scalar_agrees::<Option<String>>("~"));
        assert!(scalar_agrees::<IntOrString>("8080"));
        assert!(scalar_agrees::<IntOrString>("http"));
        assert!(scalar_agrees::<IntOrString>("'8080'"));
        assert!(scalar_agrees::<Value>("a # comment"));
        assert!(scalar_agrees::<Vec<String>>("[]"));
        assert!(scalar_agrees::<Vec<String>>(""));
        assert!(scalar_agrees::<BTreeMap<String, String>>("{}"));
    }

    #[test]
    fn block_layouts_are_read_as_serde_yaml_ng_reads_them() {
        let docs = [
            // A sequence at its key's column and indented under it.
            "a:\n- 1\n- 2\nb:\n  - x\n  - y\nc: z\n",
            // Entries whose mapping starts on the dash's line, with extra spaces after it.
            "a:\n-   k: 1\n    l: 2\n- k: 3\n",
            // An entry's value on the following lines, and nested sequences.
            "a:\n-\n  k: 1\n-\n  - x\n  -\n    - y\n",
            // Missing values: null, an empty sequence and mapping through the type.
            "a:\nb:\n  c:\nd: 1\n",
            // Comments everywhere, blank lines, comment lines less indented.
            "# head\na: # after a key\n  # inside\n  b: 1 # after a value\n\n# out\n  c: 2\nd: 'x' # q\n",
            // Trailing spaces.
            "a: 1   \nb:   \n  - x  \n",
            // A key with dots, slashes and colons.
            "example.com/a:b: v\nx.y/z: w\n",
            // Deep nesting within the limit.
            &(0..40)
                .map(|i| format!("{}k{i}:\n", "  ".repeat(i)))
                .collect::<String>(),
        ];
        for doc in docs {
            assert!(agrees::<Value>(doc), "declined:\n{doc}");
        }
    }

    #[test]
    fn what_the_subset_leaves_out_is_declined() {
        for doc in [
            "a: &x 1\nb: *x\n",
            "a: !!str 1\n",
            "a: {b: 1}\n",
            "a: [1, 2]\n",
            "a: |\n  text\n",
            "a: >-\n  text\n",
            "a: one\n  two\n",
            "a:\n  one\n",
            "- 1\n- 2\n",
            "  a: 1\n",
            "\"a\": 1\n",
            "? a\n: 1\n",
            "<<: {b: 1}\n",
            "a:\t1\n",
            "a: 1\r\n",
            "a: caf\u{e9}\n",
            "\u{feff}a: 1\n",
            "a: 1\n b: 2\n",
            "a:\n  - 1\n - 2\n",
            "a: - 1\n",
            "a: \"two\n  lines\"\n",
            "a: 'x'y\n",
            "a: b: c\n",
            "a:b\n",
            "%YAML 1.2\n---\na: 1\n",
            "",
            "# only a comment\n",
            &(0..120)
                .map(|i| format!("{}k{i}:\n", "  ".repeat(i)))
                .collect::<String>(),
        ] {
            assert!(from_str::<Value>(doc).is_none(), "read:\n{doc}");
        }
    }

    /// Keys and strings made of characters YAML treats specially.
    fn word() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[a-z0-9 .:#'\"~-]{0,8}").expect("regex")
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            word().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                proptest::collection::btree_map(word(), inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Documents as serde_yaml_ng writes them (block style, quoting what would read as
        /// another type): whatever the reader reads equals what serde_yaml_ng reads.
        #[test]
        fn written_documents_read_the_same(
            map in proptest::collection::btree_map(word(), value(), 1..6),
        ) {
            let doc = serde_yaml_ng::to_string(&map).expect("written");
            agrees::<Value>(&doc);
            agrees::<BTreeMap<String, Value>>(&doc);
        }
    }
}
