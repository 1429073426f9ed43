//! Reading Kubernetes objects from YAML (or JSON) files, in the shapes `kubectl get -o yaml`
//! prints: single objects, multi-document streams and `List`s. Used by the no-cluster mode.
//!
//! Two entry points:
//!
//! * [`Objects::read_paths`] reads everything once, as it is (tests, `explain`).
//! * [`Sources`] follows files and directories for `render` and `run`, and never loses a
//!   working Service because of a bad input. Its rules:
//!   - **Per-file last-good state.** A file that cannot be read, is not UTF-8, does not parse
//!     as a whole, is empty (it was just truncated by a writer), or is not a regular file keeps
//!     the objects it last produced; the error names the file. An object that does not match
//!     its kind's schema (the error names the field path, `spec.ports[0].port`) or fails
//!     validation keeps its last good version. Only a file that parses as a whole can delete:
//!     an object missing from it is gone.
//!   - **Explicit deletion versus a vanished path.** A file removed from a directory that is
//!     still readable was removed on purpose: its objects go. A path given on the command line
//!     that disappears or cannot be listed (a renamed directory, a failing mount) is reported
//!     and everything read from it stays: read errors never empty the dataplane. To remove
//!     everything, remove the files, or write an empty `List`.
//!   - **Half-written files.** When following, a changed file is read only once its size,
//!     modification time and inode have stayed the same for a settle time, and only if they
//!     did not change while it was read; renames are atomic and fine.
//!   - **Non-regular files** (FIFOs, sockets, devices) are reported and never opened, so they
//!     cannot block; files are opened non-blocking anyway, in case one is swapped in.
//!   - **Ignored objects** ([`Ignored`]): kinds lb-proxy does not use, the losing copy of a
//!     duplicate (the last file in sort order wins), an EndpointSlice whose Service is missing
//!     or does not serve its address family. kube-proxy ignores them too; we say so once.
//!
//! Parsing: JSON goes through `serde_json` straight into the API types (no intermediate
//! tree). So do a YAML stream, or a YAML `List`, of objects of the kinds we use (each
//! document's or item's `kind` and name read from its lines, then checked against the typed
//! object): a document in plain block style, the style kubectl prints, is read by `block`
//! (a quarter of the CPU of libyaml's parser); any other document by `serde_yaml_ng`. Any other
//! file, and any file that path does not read cleanly, goes through `serde_yaml_ng` into JSON
//! values (see `yaml`: big streams and `List`s are cut into pieces parsed on every core),
//! which says what is wrong. The documents and `List` items are then typed on
//! every core. Nothing is bounded by size (real dumps of any size read), while the protections
//! against alias bombs (bounded alias replay) and absurd nesting (depth 128) stay. A type error
//! names the field path: a document that fails is read a second time with path tracking, which
//! is too slow to pay for on every document. [`Sources`] converts each file's objects as soon
//! as the file is read and keeps only the converted form.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use lb_core::{IpFamily, ServicePort};
use serde_json::Value;

use crate::convert::{self, ConvertError, Converted, Filter};
use crate::store::Store;

mod block;
mod yaml;

/// The objects found in a set of manifests.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    /// Services.
    pub services: Vec<Service>,
    /// EndpointSlices.
    pub endpoint_slices: Vec<EndpointSlice>,
    /// Nodes.
    pub nodes: Vec<Node>,
    /// ServiceCIDRs (`networking.k8s.io/v1`).
    pub service_cidrs: Vec<ServiceCIDR>,
}

/// The objects of a set of manifests, converted, borrowed from where they are kept
/// ([`Sources::objects`]): loading them into a store copies only what the store keeps.
#[derive(Debug, Default, Clone)]
pub struct ObjectRefs<'a> {
    services: Vec<(&'a ObjectKey, &'a Converted<Vec<ServicePort>>)>,
    slices: Vec<(&'a ObjectKey, &'a Converted<convert::Slice>)>,
    nodes: Vec<&'a lb_core::Node>,
    service_cidrs: Vec<&'a [ipnet::IpNet]>,
}

/// A problem with one document or object; reading goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read or is not YAML.
    #[error("{file}: {reason}")]
    File {
        /// The file.
        file: String,
        /// What went wrong.
        reason: String,
    },
    /// A document did not match its kind's schema.
    #[error("{file}: {kind} {name}: {reason}")]
    Object {
        /// The file.
        file: String,
        /// Its `kind`.
        kind: String,
        /// Its `metadata.namespace/name`.
        name: String,
        /// The parser's message, after the field path (`field spec.ports[0].port: …`).
        reason: String,
    },
    /// An object was invalid for the proxy.
    #[error("{file}: {source}")]
    Invalid {
        /// The file.
        file: String,
        /// What was invalid.
        source: ConvertError,
    },
}

/// An object read and deliberately not used, as kube-proxy would not use it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ignored {
    /// The file it came from.
    pub file: String,
    /// Its `kind`.
    pub kind: String,
    /// Its `namespace/name` (or name).
    pub name: String,
    /// Why it is not used.
    pub reason: String,
}

impl fmt::Display for Ignored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} {}: ignored: {}",
            self.file, self.kind, self.name, self.reason
        )
    }
}

/// What [`Objects::replace_in`] and [`ObjectRefs::replace_in`] loaded and left out.
#[derive(Debug, Default, Clone)]
pub struct Loaded {
    /// Invalid objects (or invalid endpoints of a slice that is otherwise used). Always empty
    /// from [`ObjectRefs::replace_in`]: [`Sources`] leaves invalid objects out as it reads.
    pub invalid: Vec<ConvertError>,
    /// Valid objects that are not ours (headless, another proxy's, ExternalName), with why.
    pub skipped: Vec<String>,
    /// EndpointSlices no Service uses here (missing Service, or an address family the
    /// Service does not serve), with why.
    pub ignored: Vec<Ignored>,
}

/// Identity of an object in the manifests: kind, namespace (empty for Nodes), name.
type ObjectKey = (&'static str, String, String);

/// One object of a kind we use, as read.
#[derive(Debug, Clone, PartialEq)]
enum Typed {
    Service(Box<Service>),
    Slice(Box<EndpointSlice>),
    Node(Box<Node>),
    ServiceCidr(Box<ServiceCIDR>),
}

/// One object of a kind we use, converted (and so validated) as the store takes it: what
/// [`Sources`] keeps of each file, under half the memory of the object as read, and not
/// converted a second time when the store is filled (issue 13).
#[derive(Debug, Clone, PartialEq)]
enum Object {
    Service(Converted<Vec<ServicePort>>),
    Slice(Converted<convert::Slice>),
    Node(Box<lb_core::Node>),
    ServiceCidr(Vec<ipnet::IpNet>),
}

impl Typed {
    fn metadata(&self) -> &ObjectMeta {
        match self {
            Typed::Service(s) => &s.metadata,
            Typed::Slice(s) => &s.metadata,
            Typed::Node(n) => &n.metadata,
            Typed::ServiceCidr(c) => &c.metadata,
        }
    }

    /// Converts the object; an EndpointSlice's invalid endpoints go to `errors` (the rest of
    /// it is used).
    fn convert(
        &self,
        filter: &Filter,
        errors: &mut Vec<ConvertError>,
    ) -> Result<Object, ConvertError> {
        Ok(match self {
            Typed::Service(s) => Object::Service(convert::service(s, filter)?),
            Typed::Slice(s) => {
                let (slice, endpoint_errors) = convert::endpoint_slice(s, filter)?;
                errors.extend(endpoint_errors);
                Object::Slice(slice)
            }
            Typed::Node(n) => Object::Node(Box::new(convert::node(n)?)),
            Typed::ServiceCidr(c) => Object::ServiceCidr(convert::service_cidr(c)?),
        })
    }
}

/// An object converted as soon as it was typed: the result, and the errors of an
/// EndpointSlice's invalid endpoints (the rest of it is used).
type Checked = (Result<Object, ConvertError>, Vec<ConvertError>);

/// The outcome of parsing one file that parsed as a whole.
#[derive(Debug, Default)]
struct Parsed {
    /// Objects of our kinds, in document order, with their key (read without a filter).
    objects: Vec<(ObjectKey, Typed)>,
    /// With a filter: each object converted as soon as it was typed, in document order, so
    /// the objects as read are never all held at once (issue 13: a 50,000-Service dump in
    /// one file peaked at 675 MiB while it was read, holding every object typed and then
    /// converted).
    converted: Vec<(ObjectKey, Checked)>,
    /// The filter objects are converted with (`None`: they are kept as typed).
    filter: Option<Filter>,
    /// Keys of objects whose document did not match their kind's schema.
    broken: Vec<ObjectKey>,
    errors: Vec<ManifestError>,
    ignored: Vec<Ignored>,
    /// Documents seen (null documents and empty `List`s count: they say "nothing").
    documents: usize,
}

/// Whether `text` looks like JSON (its first non-blank character opens an object or array).
fn looks_like_json(text: &str) -> bool {
    matches!(text.trim_start().as_bytes().first(), Some(b'{' | b'['))
}

/// Inputs smaller than this are parsed on one thread: below it, starting threads costs more
/// than it saves.
const PARALLEL_MIN_BYTES: usize = 256 << 10;

/// How many threads to parse on.
fn threads() -> usize {
    crate::par::cores()
}

/// One document: a YAML value, or the raw text of a JSON one, or the text of a plain YAML
/// one whose head was read from its lines ([`yaml_entries`]); the last two are deserialised
/// straight into their kind, without an intermediate tree.
#[derive(Debug)]
enum Doc<'a> {
    Value(Value),
    Raw(&'a str),
    Yaml(&'a str),
    /// A `List` item's text, moved to column 0 ([`yaml_list_entries`]).
    Item(String),
}

/// Just enough of a JSON document to know what it is.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct Head<'a> {
    #[serde(borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    metadata: Option<HeadMeta<'a>>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct HeadMeta<'a> {
    #[serde(borrow)]
    name: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    namespace: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Debug, serde::Deserialize)]
struct ListItems<'a> {
    #[serde(borrow, default)]
    items: Option<Vec<&'a serde_json::value::RawValue>>,
}

/// A document's `kind`, `metadata.name` and `metadata.namespace`, where they are strings.
type DocHead = (Option<String>, Option<String>, Option<String>);

impl<'a> Doc<'a> {
    fn is_null(&self) -> bool {
        match self {
            Doc::Value(v) => v.is_null(),
            Doc::Raw(r) => r.trim() == "null",
            Doc::Yaml(_) | Doc::Item(_) => false,
        }
    }

    /// `kind`, `metadata.name` and `metadata.namespace`, where they are strings.
    fn head(&self) -> DocHead {
        match self {
            Doc::Value(v) => {
                let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
                let meta = v.get("metadata");
                (
                    s(v.get("kind")),
                    s(meta.and_then(|m| m.get("name"))),
                    s(meta.and_then(|m| m.get("namespace"))),
                )
            }
            Doc::Raw(r) => {
                let h: Head<'_> = serde_json::from_str(r).unwrap_or_default();
                let m = h.metadata.unwrap_or_default();
                (
                    h.kind.map(Into::into),
                    m.name.map(Into::into),
                    m.namespace.map(Into::into),
                )
            }
            Doc::Yaml(y) => head_of(y),
            Doc::Item(y) => head_of(y),
        }
    }

    /// The `items` of a `List` (`None` when absent or null).
    fn items(self) -> Result<Option<Vec<Doc<'a>>>, String> {
        match self {
            Doc::Value(Value::Object(mut map)) => match map.remove("items") {
                Some(Value::Array(items)) => Ok(Some(items.into_iter().map(Doc::Value).collect())),
                None | Some(Value::Null) => Ok(None),
                Some(_) => Err("field items: not a list".into()),
            },
            Doc::Value(_) => Err("not a mapping".into()),
            Doc::Yaml(y) => match serde_yaml_ng::from_str::<Value>(y) {
                Ok(v) => Doc::Value(v).items(),
                Err(e) => Err(e.to_string()),
            },
            Doc::Item(y) => match serde_yaml_ng::from_str::<Value>(&y) {
                Ok(v) => Doc::Value(v).items(),
                Err(e) => Err(e.to_string()),
            },
            Doc::Raw(r) => serde_json::from_str::<ListItems<'a>>(r)
                .map(|l| {
                    l.items
                        .map(|items| items.into_iter().map(|i| Doc::Raw(i.get())).collect())
                })
                .map_err(|e| format!("field items: {e}")),
        }
    }

    /// Deserialises the document as its kind; the error names the field path.
    ///
    /// Tracking the path costs a string per key, so the document is first read without it,
    /// and read again with it only when that fails (the second read finds the same error).
    fn typed<T: serde::de::DeserializeOwned>(self) -> Result<T, String> {
        fn message<E: fmt::Display>(e: serde_path_to_error::Error<E>) -> String {
            let path = e.path().to_string();
            if path == "." || path.is_empty() {
                e.into_inner().to_string()
            } else {
                format!("field {path}: {}", e.into_inner())
            }
        }
        match self {
            Doc::Value(v) => T::deserialize(&v)
                .or_else(|_| serde_path_to_error::deserialize(&v).map_err(message)),
            Doc::Raw(r) => serde_json::from_str(r).or_else(|_| {
                let mut de = serde_json::Deserializer::from_str(r);
                serde_path_to_error::deserialize(&mut de).map_err(message)
            }),
            // Any error sends the whole file through the general path (`Parsed::from_text`),
            // which reports it.
            Doc::Yaml(y) => yaml_typed(y),
            Doc::Item(y) => yaml_typed(&y),
        }
    }
}

/// One YAML document as a `T`: plain block style is read by `block`; what it declines,
/// `serde_yaml_ng` reads (and reports).
fn yaml_typed<T: serde::de::DeserializeOwned>(doc: &str) -> Result<T, String> {
    block::from_str(doc).map_or_else(
        || serde_yaml_ng::from_str(doc).map_err(|e| e.to_string()),
        Ok,
    )
}

/// The kinds lb-proxy reads, each as its `'static` name; `None` for any other.
fn used_kind(kind: &str) -> Option<&'static str> {
    ["Service", "EndpointSlice", "Node", "ServiceCIDR"]
        .into_iter()
        .find(|k| *k == kind)
}

/// A JSON document's head and, for a `List`, its items: what [`json_entries`] reads in one pass.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct Top<'a> {
    #[serde(borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    metadata: Option<HeadMeta<'a>>,
    #[serde(borrow)]
    items: Option<Vec<&'a serde_json::value::RawValue>>,
}

fn is_list(kind: &str) -> bool {
    kind == "List" || kind.ends_with("List")
}

/// The documents of a JSON text, with the items of its `List`s in their place, in one pass
/// over the text (a 40 MB `List` is otherwise scanned three times on one core before the
/// cores share its items). `None` when any document is not an object of the usual shape
/// (`kind` not a string, `items` not a list, `null`): then the general path reads it, and
/// reports what is wrong the same way as for YAML.
fn json_entries(text: &str) -> Option<(usize, Vec<Entry<'_>>)> {
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Top<'_>>();
    let mut entries = Vec::new();
    let (mut documents, mut start) = (0, 0);
    while let Some(top) = stream.next() {
        let top = top.ok()?;
        let end = stream.byte_offset();
        let raw = text.get(start..end)?.trim_start();
        start = end;
        let doc = documents;
        documents += 1;
        let meta = top.metadata.unwrap_or_default();
        let head: DocHead = (
            top.kind.map(Into::into),
            meta.name.map(Into::into),
            meta.namespace.map(Into::into),
        );
        match (&head.0, top.items) {
            (Some(kind), items) if is_list(kind) => {
                let items = items.unwrap_or_default().into_iter().enumerate();
                entries.extend(items.map(|(j, item)| {
                    let pos = Pos { doc, item: Some(j) };
                    (pos, Doc::Raw(item.get()), None)
                }));
            }
            _ => entries.push((Pos { doc, item: None }, Doc::Raw(raw), Some(head))),
        }
    }
    Some((documents, entries))
}

/// The documents of a YAML stream, cut at its document markers, when each marker is a bare
/// `---` (no directive, no `...`, nothing after a marker). Each document's `kind`,
/// `metadata.name` and `metadata.namespace` are read from its lines ([`yaml_head`]) when it is
/// typed, on the typing threads: a document that is not one object of a kind we use, in block
/// style, sends the file to the general path then ([`Parsed::add_value`]).
fn yaml_entries(text: &str) -> Option<(usize, Vec<Entry<'_>>)> {
    if text.starts_with('%') || text.contains("\n%") {
        return None;
    }
    // The text of each document, from its marker (or the stream's start) to the next.
    fn add<'a>(entries: &mut Vec<Entry<'a>>, doc: &'a str, explicit: bool) -> Option<()> {
        let blank = |l: &str| {
            let l = l.trim_start();
            l.is_empty() || l.starts_with('#')
        };
        if doc.lines().all(blank) {
            // Before the first marker: no document. After a marker: an empty one.
            return (!explicit).then_some(());
        }
        let pos = Pos {
            doc: entries.len(),
            item: None,
        };
        entries.push((pos, Doc::Yaml(doc), None));
        Some(())
    }
    // Where the lines starting with `---` or `...` start: one search of the whole text for
    // each (a 1 MB file has 40,000 lines and 1,000 markers).
    let mut markers: Vec<usize> = Vec::new();
    if text.starts_with("---") || text.starts_with("...") {
        markers.push(0);
    }
    for marker in ["\n---", "\n..."] {
        markers.extend(text.match_indices(marker).map(|(i, _)| i + 1));
    }
    markers.sort_unstable();
    let mut entries = Vec::new();
    let (mut start, mut explicit) = (0, false);
    for at in markers {
        let end = text[at..].find('\n').map_or(text.len(), |e| at + e);
        if text[at..end].trim_end_matches('\r') != "---" {
            return None;
        }
        add(&mut entries, &text[start..at], explicit)?;
        (start, explicit) = ((end + 1).min(text.len()), true);
    }
    add(&mut entries, &text[start..], explicit)?;
    Some((entries.len(), entries))
}

/// The items of a one-document YAML `List` when each is one object of a kind we use, in
/// block style ([`yaml_head`]), each moved to column 0 (`kubectl get -o yaml` prints the
/// sequence at column 0, entries as `- apiVersion: v1` and the rest indented by two). The
/// document without its items must read as a `List`. `None` otherwise: the general path reads
/// the file then.
fn yaml_list_entries(text: &str) -> Option<(usize, Vec<Entry<'static>>)> {
    if text.starts_with('%') || text.contains("\n%") {
        return None;
    }
    let list = yaml::list_entries(text)?;
    let rest: Value = serde_yaml_ng::from_str(&list.rest).ok()?;
    if !rest
        .get("kind")
        .and_then(Value::as_str)
        .is_some_and(is_list)
        || rest.get("items") != Some(&Value::Array(Vec::new()))
    {
        return None;
    }
    let ends = list.starts.iter().skip(1).copied().chain([list.end]);
    let mut entries = Vec::with_capacity(list.starts.len());
    for (j, (&start, end)) in list.starts.iter().zip(ends).enumerate() {
        let item = dedent(&text[start..end], list.indent)?;
        let (kind, name, namespace) = yaml_head(&item)?;
        used_kind(kind)?;
        let head = (
            Some(kind.into()),
            Some(name.into()),
            namespace.map(Into::into),
        );
        let pos = Pos {
            doc: 0,
            item: Some(j),
        };
        entries.push((pos, Doc::Item(item), Some(head)));
    }
    Some((1, entries))
}

/// A sequence entry's text at `indent` (`- ` then the node, the rest indented two more) as a
/// document at column 0; comment lines indented less are left out (they are not content).
/// `None` if a line of content is indented less.
fn dedent(entry: &str, indent: usize) -> Option<String> {
    let mut out = String::with_capacity(entry.len());
    for (i, line) in entry.split_inclusive('\n').enumerate() {
        if i == 0 {
            out.push_str(line.get(indent..)?.strip_prefix("- ")?);
            continue;
        }
        let body = line.trim_end_matches(['\n', '\r']);
        let lead = body.len() - body.trim_start_matches(' ').len();
        if lead >= indent + 2 {
            out.push_str(&line[indent + 2..]);
        } else if body.trim().is_empty() {
            out.push_str(&line[lead..]);
        } else if !body.trim_start().starts_with('#') {
            return None;
        }
    }
    Some(out)
}

/// [`Doc::head`] of a document read by its lines ([`yaml_head`]).
fn head_of(y: &str) -> DocHead {
    yaml_head(y).map_or((None, None, None), |(kind, name, namespace)| {
        (
            Some(kind.into()),
            Some(name.into()),
            namespace.map(Into::into),
        )
    })
}

/// `kind`, `metadata.name` and `metadata.namespace` of a block-style YAML document, read from
/// its lines: a `kind: K` line and a `metadata:` line at column 0, and `name: N` and
/// `namespace: S` among the first-level lines under `metadata:`, each once, each value a plain
/// word (letters, digits, `-`, `.`, `_`) or one in double quotes. `None` otherwise. What is
/// read is checked against the object once it is typed.
fn yaml_head(doc: &str) -> Option<(&str, &str, Option<&str>)> {
    fn word(v: &str) -> Option<&str> {
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|q| q.strip_suffix('"'))
            .unwrap_or(v);
        let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
        (!v.is_empty() && v.chars().all(ok)).then_some(v)
    }
    let (mut kind, mut name, mut namespace) = (None, None, None);
    let (mut metadata, mut in_metadata, mut child) = (false, false, None);
    for l in doc.lines() {
        let l = l.trim_end_matches('\r');
        let t = l.trim_start_matches(' ');
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if t.starts_with('\t') {
            return None;
        }
        let indent = l.len() - t.len();
        if indent == 0 {
            in_metadata = false;
            if let Some(v) = t.strip_prefix("kind:") {
                if kind.replace(word(v)?).is_some() {
                    return None;
                }
            } else if let Some(rest) = t.strip_prefix("metadata:") {
                if !rest.trim().is_empty() || metadata {
                    return None;
                }
                (metadata, in_metadata) = (true, true);
            }
        } else if in_metadata && *child.get_or_insert(indent) == indent {
            if let Some(v) = t.strip_prefix("name:") {
                if name.replace(word(v)?).is_some() {
                    return None;
                }
            } else if let Some(v) = t.strip_prefix("namespace:") {
                if namespace.replace(word(v)?).is_some() {
                    return None;
                }
            }
        }
    }
    Some((kind?, name?, namespace))
}

/// Parses `text` into documents: JSON (one value or a stream of them) through `serde_json`,
/// anything else as a multi-document YAML stream.
fn parse_documents(text: &str) -> Result<Vec<Doc<'_>>, String> {
    if looks_like_json(text) {
        let json: Result<Vec<&serde_json::value::RawValue>, _> =
            serde_json::Deserializer::from_str(text)
                .into_iter()
                .collect();
        return match json {
            Ok(docs) => Ok(docs.into_iter().map(|d| Doc::Raw(d.get())).collect()),
            // YAML flow style also starts with `{` or `[`: try YAML before giving up, and
            // report the JSON error if that fails too.
            Err(e) => yaml::parse(text)
                .map(|docs| docs.into_iter().map(Doc::Value).collect())
                .map_err(|_| format!("not valid JSON: {e}")),
        };
    }
    yaml::parse(text).map(|docs| docs.into_iter().map(Doc::Value).collect())
}

/// `namespace/name` (or `name` for cluster-scoped objects) from a document's metadata.
fn display_name(namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        name.to_string()
    } else {
        format!("{namespace}/{name}")
    }
}

/// Where an object sits in its file, for messages: `document 3`, or `document 1, items[7]`.
#[derive(Debug, Clone, Copy)]
struct Pos {
    doc: usize,
    item: Option<usize>,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.doc + 1)?;
        match self.item {
            Some(i) => write!(f, ", items[{i}]"),
            None => Ok(()),
        }
    }
}

/// A document or `List` item to type, with its head when already known.
type Entry<'a> = (Pos, Doc<'a>, Option<DocHead>);

impl Parsed {
    /// Parses one whole file's text. `Err` when the file as a whole cannot be trusted: not
    /// YAML/JSON, or a document without a `kind` or a name (it could be any object, so no
    /// object of the file may be deleted because of it).
    ///
    /// The documents, with the items of top-level `List`s in their place, are typed on every
    /// core in contiguous runs, and the results joined in document order.
    fn from_text(file: &str, text: &str) -> Result<Parsed, String> {
        Parsed::read(file, text, None)
    }

    /// [`Parsed::from_text`], converting each object with `filter` as soon as it is typed
    /// (into [`Parsed::converted`]) when there is one.
    fn read(file: &str, text: &str, filter: Option<&Filter>) -> Result<Parsed, String> {
        if !looks_like_json(text) {
            // Plain YAML objects of our kinds (a `kubectl get -o yaml` dump split into
            // documents, generated manifests) are typed straight from their text. Anything
            // this path does not read cleanly is read again by the general path, which says
            // what is wrong exactly as before.
            let clean = |read: Option<(usize, Vec<Entry<'_>>)>| {
                let (documents, entries) = read?;
                let p = Parsed::type_entries(file, text.len(), documents, entries, filter).ok()?;
                (p.errors.is_empty() && p.broken.is_empty() && p.ignored.is_empty()).then_some(p)
            };
            if let Some(p) = clean(yaml_entries(text)).or_else(|| clean(yaml_list_entries(text))) {
                return Ok(p);
            }
        }
        Parsed::general(file, text, filter)
    }

    /// [`Parsed::from_text`] through YAML values for YAML.
    #[cfg(test)]
    fn from_text_general(file: &str, text: &str) -> Result<Parsed, String> {
        Parsed::general(file, text, None)
    }

    /// [`Parsed::read`] through YAML values for YAML.
    fn general(file: &str, text: &str, filter: Option<&Filter>) -> Result<Parsed, String> {
        let fast = looks_like_json(text).then(|| json_entries(text)).flatten();
        let (documents, entries) = match fast {
            Some(read) => read,
            None => Parsed::entries(parse_documents(text)?)?,
        };
        Parsed::type_entries(file, text.len(), documents, entries, filter)
    }

    /// The documents to type: each one, or the items of a `List` in its place.
    fn entries(docs: Vec<Doc<'_>>) -> Result<(usize, Vec<Entry<'_>>), String> {
        let documents = docs.len();
        let mut entries: Vec<Entry<'_>> = Vec::with_capacity(docs.len());
        for (i, doc) in docs.into_iter().enumerate() {
            if doc.is_null() {
                continue;
            }
            let pos = Pos { doc: i, item: None };
            let head = doc.head();
            match &head.0 {
                Some(kind) if is_list(kind) => {
                    let items = doc
                        .items()
                        .map_err(|e| format!("{pos}: {kind}: {e}"))?
                        .unwrap_or_default();
                    entries.extend(items.into_iter().enumerate().map(|(j, item)| {
                        let at = Pos {
                            doc: i,
                            item: Some(j),
                        };
                        (at, item, None)
                    }));
                }
                _ => entries.push((pos, doc, Some(head))),
            }
        }
        Ok((documents, entries))
    }

    /// Types the entries of a file of `len` bytes, on every core when it is big.
    fn type_entries(
        file: &str,
        len: usize,
        documents: usize,
        mut entries: Vec<Entry<'_>>,
        filter: Option<&Filter>,
    ) -> Result<Parsed, String> {
        let n = threads();
        let mut parsed = if n < 2 || len < PARALLEL_MIN_BYTES || entries.len() < 2 * n {
            Parsed::from_entries(file, entries, filter)?
        } else {
            let per = entries.len().div_ceil(n);
            let mut runs = Vec::with_capacity(n);
            while entries.len() > per {
                let rest = entries.split_off(per);
                runs.push(std::mem::replace(&mut entries, rest));
            }
            runs.push(entries);
            let results: Vec<Result<Parsed, String>> = std::thread::scope(|s| {
                let handles: Vec<_> = runs
                    .into_iter()
                    .map(|run| s.spawn(move || Parsed::from_entries(file, run, filter)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err("the manifest reader panicked".into()))
                    })
                    .collect()
            });
            let mut all = Parsed::default();
            for r in results {
                let p = r?;
                all.objects.extend(p.objects);
                all.converted.extend(p.converted);
                all.broken.extend(p.broken);
                all.errors.extend(p.errors);
                all.ignored.extend(p.ignored);
            }
            all
        };
        parsed.documents = documents;
        Ok(parsed)
    }

    /// Types a run of documents and items, in order.
    fn from_entries(
        file: &str,
        entries: Vec<Entry<'_>>,
        filter: Option<&Filter>,
    ) -> Result<Parsed, String> {
        let mut parsed = Parsed {
            filter: filter.cloned(),
            ..Parsed::default()
        };
        for (pos, doc, head) in entries {
            parsed.add_value(file, doc, &pos, head)?;
        }
        Ok(parsed)
    }

    fn add_value(
        &mut self,
        file: &str,
        doc: Doc<'_>,
        at: &dyn fmt::Display,
        head: Option<DocHead>,
    ) -> Result<(), String> {
        if doc.is_null() {
            return Ok(());
        }
        let (kind, name, namespace) = head.unwrap_or_else(|| doc.head());
        let Some(kind) = kind else {
            return Err(format!("{at}: no kind"));
        };
        let used = used_kind(&kind);
        // The fast paths read documents of our kinds only: the general path reads the file.
        let sniffed = matches!(doc, Doc::Yaml(_) | Doc::Item(_));
        if sniffed && used.is_none() {
            return Err(format!("{at}: {kind}"));
        }
        if is_list(&kind) {
            for (i, item) in doc
                .items()
                .map_err(|e| format!("{at}: {kind}: {e}"))?
                .unwrap_or_default()
                .into_iter()
                .enumerate()
            {
                self.add_value(file, item, &format!("{at}, items[{i}]"), None)?;
            }
            return Ok(());
        }
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            return Err(format!("{at}: {kind} without metadata.name"));
        };
        let Some(kind_key) = used else {
            self.ignored.push(Ignored {
                file: file.into(),
                kind: kind.clone(),
                name: display_name(namespace.as_deref().unwrap_or(""), &name),
                reason: format!("lb-proxy does not use {kind} objects"),
            });
            return Ok(());
        };
        let namespace = if kind_key == "Node" || kind_key == "ServiceCIDR" {
            String::new()
        } else {
            namespace.unwrap_or_else(|| "default".into())
        };
        let key = (kind_key, namespace, name);
        let typed = match kind_key {
            "Service" => doc.typed().map(|s| Typed::Service(Box::new(s))),
            "EndpointSlice" => doc.typed().map(|mut s: EndpointSlice| {
                // The API server defaults a port's protocol to TCP; files are not defaulted.
                for p in s.ports.iter_mut().flatten() {
                    p.protocol.get_or_insert_with(|| "TCP".into());
                }
                Typed::Slice(Box::new(s))
            }),
            "ServiceCIDR" => doc.typed().map(|c| Typed::ServiceCidr(Box::new(c))),
            _ => doc.typed().map(|n| Typed::Node(Box::new(n))),
        };
        // A head read from the document's lines must be the one the object has.
        let typed = typed.and_then(|o| {
            let m = o.metadata();
            let namespace =
                m.namespace
                    .as_deref()
                    .unwrap_or(if key.1.is_empty() { "" } else { "default" });
            if sniffed && (m.name.as_deref() != Some(key.2.as_str()) || namespace != key.1) {
                return Err("its name or namespace read differently".into());
            }
            Ok(o)
        });
        match typed {
            Ok(o) => match &self.filter {
                Some(filter) => {
                    let mut endpoint_errors = Vec::new();
                    let converted = o.convert(filter, &mut endpoint_errors);
                    self.converted.push((key, (converted, endpoint_errors)));
                }
                None => self.objects.push((key, o)),
            },
            Err(reason) => {
                self.errors.push(ManifestError::Object {
                    file: file.into(),
                    kind,
                    name: display_name(&key.1, &key.2),
                    reason,
                });
                self.broken.push(key);
            }
        }
        Ok(())
    }
}

impl Objects {
    /// Reads every file (or every `.yaml`, `.yml` and `.json` file in a directory, sorted), as
    /// it is now, without validating the objects. See [`Sources`] for reading that keeps the
    /// last good state.
    pub fn read_paths(paths: &[impl AsRef<Path>]) -> (Objects, Vec<ManifestError>) {
        let mut objects = Objects::default();
        let mut errors = Vec::new();
        for p in paths {
            let p = p.as_ref();
            let files = match list_path(p) {
                Ok(files) => files,
                Err(reason) => {
                    errors.push(ManifestError::File {
                        file: p.display().to_string(),
                        reason,
                    });
                    continue;
                }
            };
            for f in files {
                let name = f.display().to_string();
                match read_file(&f) {
                    Ok((bytes, _)) => objects.add_bytes(&name, &bytes, &mut errors),
                    Err(e) => errors.push(ManifestError::File {
                        file: name,
                        reason: e.to_string(),
                    }),
                }
            }
        }
        (objects, errors)
    }

    /// Parses one multi-document YAML (or JSON) text named `file`.
    pub fn add_text(&mut self, file: &str, text: &str, errors: &mut Vec<ManifestError>) {
        match Parsed::from_text(file, text) {
            Ok(parsed) => {
                errors.extend(parsed.errors);
                for (_, o) in parsed.objects {
                    self.push(o);
                }
            }
            Err(reason) => errors.push(ManifestError::File {
                file: file.into(),
                reason,
            }),
        }
    }

    fn add_bytes(&mut self, file: &str, bytes: &[u8], errors: &mut Vec<ManifestError>) {
        match utf8(bytes) {
            Ok(text) => self.add_text(file, text, errors),
            Err(reason) => errors.push(ManifestError::File {
                file: file.into(),
                reason,
            }),
        }
    }

    fn push(&mut self, o: Typed) {
        match o {
            Typed::Service(s) => self.services.push(*s),
            Typed::Slice(s) => self.endpoint_slices.push(*s),
            Typed::Node(n) => self.nodes.push(*n),
            Typed::ServiceCidr(c) => self.service_cidrs.push(*c),
        }
    }

    /// The CIDRs of every ServiceCIDR object (sorted, without duplicates); an invalid one is
    /// reported through `invalid` and left out.
    pub fn service_cidrs(&self, invalid: &mut dyn FnMut(ConvertError)) -> Vec<ipnet::IpNet> {
        let mut all = BTreeSet::new();
        for c in &self.service_cidrs {
            match convert::service_cidr(c) {
                Ok(cidrs) => all.extend(cidrs),
                Err(e) => invalid(e),
            }
        }
        all.into_iter().collect()
    }

    /// Converts the objects into a store for node `node_name` (or the only Node given, when
    /// `None`). Invalid objects are reported and left out; the rest are loaded.
    pub fn into_store(
        self,
        node_name: Option<&str>,
        filter: &Filter,
    ) -> (Store, Vec<ConvertError>, Vec<String>) {
        let mut store = Store::new();
        let loaded = self.replace_in(&mut store, node_name, filter);
        (store, loaded.invalid, loaded.skipped)
    }

    /// Replaces everything in `store` with these objects (as a re-list would), so the store
    /// records exactly which Services changed. Returns the invalid objects, the skipped ones
    /// and the ignored EndpointSlices (with the reason). Conversion is independent per object,
    /// so a large cluster converts on every core.
    pub fn replace_in(self, store: &mut Store, node_name: Option<&str>, filter: &Filter) -> Loaded {
        let mut loaded = Loaded::default();
        let key = |kind: &'static str, m: &ObjectMeta| -> ObjectKey {
            let namespace = m.namespace.clone().unwrap_or_else(|| "default".into());
            (kind, namespace, m.name.clone().unwrap_or_default())
        };
        let converted = crate::par::map(&self.services, |s| convert::service(s, filter));
        let services: Vec<_> = (self.services.iter().zip(converted))
            .filter_map(|(s, c)| match c {
                Ok(c) => Some((key("Service", &s.metadata), c)),
                Err(e) => {
                    loaded.invalid.push(e);
                    None
                }
            })
            .collect();
        let converted = crate::par::map(&self.endpoint_slices, |s| {
            convert::endpoint_slice(s, filter)
        });
        let slices: Vec<_> = (self.endpoint_slices.iter().zip(converted))
            .filter_map(|(s, c)| match c {
                Ok((c, endpoint_errors)) => {
                    loaded.invalid.extend(endpoint_errors);
                    Some((key("EndpointSlice", &s.metadata), c))
                }
                Err(e) => {
                    loaded.invalid.push(e);
                    None
                }
            })
            .collect();
        let node = match node_name {
            Some(n) => self
                .nodes
                .iter()
                .find(|k| k.metadata.name.as_deref() == Some(n)),
            None if self.nodes.len() == 1 => self.nodes.first(),
            None => None,
        };
        let node = match (node, node_name) {
            (Some(k), _) => convert::node(k).map_err(|e| loaded.invalid.push(e)).ok(),
            (None, n) => n.and_then(|n| lb_core::Node::new(n, None).ok()),
        };
        let refs = ObjectRefs {
            services: services.iter().map(|(k, c)| (k, c)).collect(),
            slices: slices.iter().map(|(k, c)| (k, c)).collect(),
            ..ObjectRefs::default()
        };
        refs.load(store, node, &mut loaded);
        loaded
    }
}

impl<'a> ObjectRefs<'a> {
    fn push(&mut self, key: &'a ObjectKey, o: &'a Object) {
        match o {
            Object::Service(c) => self.services.push((key, c)),
            Object::Slice(c) => self.slices.push((key, c)),
            Object::Node(n) => self.nodes.push(n),
            Object::ServiceCidr(c) => self.service_cidrs.push(c),
        }
    }

    /// The CIDRs of every ServiceCIDR object, sorted, without duplicates.
    pub fn service_cidrs(&self) -> Vec<ipnet::IpNet> {
        let all: BTreeSet<ipnet::IpNet> = self
            .service_cidrs
            .iter()
            .copied()
            .flatten()
            .copied()
            .collect();
        all.into_iter().collect()
    }

    /// Replaces everything in `store` with these objects (as a re-list would), for node
    /// `node_name` (or the only Node given, when `None`), so the store records exactly which
    /// Services changed. Returns the skipped objects and the ignored EndpointSlices (with the
    /// reason); invalid ones were left out when read.
    pub fn replace_in(&self, store: &mut Store, node_name: Option<&str>) -> Loaded {
        let node = match node_name {
            Some(n) => self.nodes.iter().find(|k| k.name() == n),
            None if self.nodes.len() == 1 => self.nodes.first(),
            None => None,
        };
        // A node without a Node object: no zone label, so no topology filtering.
        let node = node
            .map(|n| (*n).clone())
            .or_else(|| node_name.and_then(|n| lb_core::Node::new(n, None).ok()));
        let mut loaded = Loaded::default();
        self.load(store, node, &mut loaded);
        loaded
    }

    /// Puts the Services and EndpointSlices, and `node`, in `store`.
    fn load(&self, store: &mut Store, node: Option<lb_core::Node>, loaded: &mut Loaded) {
        let mut services = Vec::new();
        for ((_, namespace, name), converted) in &self.services {
            match converted {
                Converted::Accepted(ports) => {
                    if let Some(p) = ports.first() {
                        let key = convert::ServiceKey {
                            namespace: p.name().namespace.to_string(),
                            name: p.name().name.to_string(),
                        };
                        services.push((key, ports.clone()));
                    }
                }
                Converted::Skipped(why) => loaded
                    .skipped
                    .push(format!("Service {namespace}/{name}: {why}")),
            }
        }
        // Which families each Service serves: those of its cluster IPs (kube-proxy programs a
        // Service only in the families it has a cluster IP in).
        let families: BTreeMap<convert::ServiceKey, BTreeSet<IpFamily>> = services
            .iter()
            .map(|(k, ports)| {
                let fams = ports
                    .iter()
                    .flat_map(|p| p.cluster_ips().iter().map(IpFamily::of))
                    .collect();
                (k.clone(), fams)
            })
            .collect();
        store.replace_services(services);
        let mut slices = Vec::new();
        for ((_, namespace, name), converted) in &self.slices {
            match converted {
                Converted::Accepted(slice) => {
                    let why = match families.get(&slice.service) {
                        None => Some(format!(
                            "its Service {} is not in the manifests (or not proxied)",
                            slice.service
                        )),
                        Some(f) if !f.contains(&slice.family) => Some(format!(
                            "addressType {} but Service {} has no {} cluster IP",
                            slice.family, slice.service, slice.family
                        )),
                        Some(_) => None,
                    };
                    if let Some(reason) = why {
                        loaded.ignored.push(Ignored {
                            file: String::new(),
                            kind: "EndpointSlice".into(),
                            name: format!("{namespace}/{name}"),
                            reason,
                        });
                    }
                    slices.push(((namespace.clone(), name.clone()), slice.clone()));
                }
                Converted::Skipped(why) => loaded
                    .skipped
                    .push(format!("EndpointSlice {namespace}/{name}: {why}")),
            }
        }
        store.replace_slices(slices);
        if let Some(n) = node {
            store.set_node(n);
        }
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(bytes).map_err(|e| {
        format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.valid_up_to()
        )
    })
}

/// What identifies a file's content without reading it: if none of these changed, neither did
/// the content (as far as a poller can tell).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    changed: (i64, i64),
    inode: (u64, u64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt as _;
        Stamp {
            len: m.len(),
            modified: m.modified().ok(),
            changed: (m.ctime(), m.ctime_nsec()),
            inode: (m.dev(), m.ino()),
        }
    }
}

/// Why a file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum ReadError {
    /// Not there, not readable, or a dangling symlink.
    #[error("{0}")]
    Io(String),
    /// A FIFO, socket, device or directory.
    #[error("not a regular file ({0}); skipped without opening it")]
    NotRegular(&'static str),
    /// It changed while it was read: try again later.
    #[error("changed while being read")]
    Changed,
}

fn file_type_name(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else if t.is_dir() {
        "a directory"
    } else {
        "not a file"
    }
}

/// Reads a regular file whole, making sure it did not change while it was read. Never opens
/// anything else, and opens non-blocking, so a FIFO swapped in cannot hang the reader.
fn read_file(path: &Path) -> Result<(Vec<u8>, Stamp), ReadError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let before = std::fs::metadata(path).map_err(|e| io_error(path, &e))?;
    if !before.is_file() {
        return Err(ReadError::NotRegular(file_type_name(before.file_type())));
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| io_error(path, &e))?;
    let opened = f.metadata().map_err(|e| io_error(path, &e))?;
    if !opened.is_file() {
        return Err(ReadError::NotRegular(file_type_name(opened.file_type())));
    }
    let stamp = Stamp::of(&before);
    let mut bytes = Vec::with_capacity(usize::try_from(before.len()).unwrap_or(0));
    f.read_to_end(&mut bytes).map_err(|e| io_error(path, &e))?;
    let after = std::fs::metadata(path).map_err(|e| io_error(path, &e))?;
    if Stamp::of(&opened) != stamp || Stamp::of(&after) != stamp {
        return Err(ReadError::Changed);
    }
    Ok((bytes, stamp))
}

fn io_error(path: &Path, e: &std::io::Error) -> ReadError {
    if e.kind() == std::io::ErrorKind::NotFound && std::fs::symlink_metadata(path).is_ok() {
        return ReadError::Io("a symlink to a missing file".into());
    }
    ReadError::Io(e.to_string())
}

/// The manifest files of one command-line path: itself, or the `.yaml`, `.yml` and `.json`
/// entries of a directory (whatever their type, so bad ones are reported), sorted.
fn list_path(p: &Path) -> Result<Vec<PathBuf>, String> {
    let meta = std::fs::metadata(p).map_err(|e| e.to_string())?;
    if !meta.is_dir() {
        return Ok(vec![p.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(p).map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let f = entry.path();
        if matches!(
            f.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            files.push(f);
        }
    }
    files.sort();
    Ok(files)
}

/// What is known about one file.
#[derive(Debug, Default)]
struct FileState {
    /// Index of the command-line path it was found under.
    root: usize,
    /// The content last acted on (applied, or reported as bad).
    acted: Option<Stamp>,
    /// A changed content seen, and since when: read once it has settled.
    pending: Option<(Stamp, Instant)>,
    /// The objects it last produced: each one's last good version.
    objects: BTreeMap<ObjectKey, Object>,
    /// Why it is currently not read, if it is not.
    failing: Option<String>,
    /// Objects of its last good read that are not used (kinds lb-proxy does not use).
    ignored: Vec<Ignored>,
}

/// Manifest files and directories followed with per-file last-good state (see the module
/// documentation for the rules).
#[derive(Debug)]
pub struct Sources {
    roots: Vec<PathBuf>,
    files: BTreeMap<PathBuf, FileState>,
    /// Command-line paths that currently cannot be listed, with why.
    failing_roots: BTreeMap<usize, String>,
    /// Ignored objects already reported.
    reported: BTreeSet<Ignored>,
}

/// The outcome of one [`Sources::refresh`].
#[derive(Debug, Default)]
pub struct Refresh {
    /// Whether the objects changed.
    pub changed: bool,
    /// Problems found by this refresh. A file's problems are reported when it is read (so
    /// once per change of it); a path's when it starts failing.
    pub errors: Vec<ManifestError>,
    /// Files removed on purpose (their objects are gone), with how many objects they had.
    pub removed: Vec<(String, usize)>,
    /// Whether a changed file is waiting to settle.
    pub pending: bool,
}

impl Sources {
    /// Follows these files and directories; nothing is read until [`Sources::refresh`].
    pub fn new(paths: &[impl AsRef<Path>]) -> Sources {
        Sources {
            roots: paths.iter().map(|p| p.as_ref().to_path_buf()).collect(),
            files: BTreeMap::new(),
            failing_roots: BTreeMap::new(),
            reported: BTreeSet::new(),
        }
    }

    /// Checks that every path exists, for the start: a mistyped path is an error, not an
    /// empty cluster.
    pub fn check_paths(&self) -> Result<(), String> {
        if self.roots.is_empty() {
            return Err("-f/--manifests: give at least one file or directory".into());
        }
        for p in &self.roots {
            if let Err(e) = std::fs::metadata(p) {
                return Err(format!("-f {}: {e}", p.display()));
            }
        }
        Ok(())
    }

    /// Looks at every file and reads those that changed. With `settle`, a changed file is
    /// read only once it has stayed unchanged for that long (following); without, at once
    /// (`render`, `run --once`, the first read).
    pub fn refresh(&mut self, filter: &Filter, settle: Option<Duration>) -> Refresh {
        let mut out = Refresh::default();
        for (i, root) in self.roots.clone().iter().enumerate() {
            let listed = match list_path(root) {
                Ok(files) => files,
                Err(reason) => {
                    let kept: usize = self
                        .files
                        .values()
                        .filter(|f| f.root == i)
                        .map(|f| f.objects.len())
                        .sum();
                    let reason = format!(
                        "{reason}; keeping the {kept} objects read from it (remove its files to delete them)"
                    );
                    if self.failing_roots.get(&i) != Some(&reason) {
                        out.errors.push(ManifestError::File {
                            file: root.display().to_string(),
                            reason: reason.clone(),
                        });
                        self.failing_roots.insert(i, reason);
                    }
                    continue;
                }
            };
            self.failing_roots.remove(&i);
            let gone: Vec<PathBuf> = self
                .files
                .iter()
                .filter(|(p, f)| f.root == i && !listed.contains(p))
                .map(|(p, _)| p.clone())
                .collect();
            for p in gone {
                if let Some(f) = self.files.remove(&p) {
                    if !f.objects.is_empty() {
                        out.changed = true;
                        out.removed.push((p.display().to_string(), f.objects.len()));
                    }
                }
            }
            for f in listed {
                self.files.entry(f.clone()).or_insert_with(|| FileState {
                    root: i,
                    ..FileState::default()
                });
                self.look_at(&f, filter, settle, &mut out);
            }
        }
        out
    }

    fn look_at(
        &mut self,
        path: &Path,
        filter: &Filter,
        settle: Option<Duration>,
        out: &mut Refresh,
    ) {
        let Some(state) = self.files.get_mut(path) else {
            return;
        };
        let file = path.display().to_string();
        let fail = |state: &mut FileState, reason: String, out: &mut Refresh| {
            let kept = state.objects.len();
            let reason = if kept > 0 {
                format!("{reason}; keeping the {kept} objects it last produced")
            } else {
                reason
            };
            out.errors.push(ManifestError::File {
                file: file.clone(),
                reason: reason.clone(),
            });
            state.failing = Some(reason);
        };
        let stamp = match std::fs::metadata(path) {
            Ok(m) => Stamp::of(&m),
            Err(e) => {
                // Reported once, when it starts failing.
                let reason = io_error(path, &e).to_string();
                if state
                    .failing
                    .as_ref()
                    .is_none_or(|f| !f.starts_with(&reason))
                {
                    state.acted = None;
                    fail(state, reason, out);
                }
                return;
            }
        };
        if state.acted == Some(stamp) {
            return;
        }
        if let Some(settle) = settle {
            match state.pending {
                Some((s, since)) if s == stamp && since.elapsed() >= settle => {}
                Some((s, _)) if s == stamp => {
                    out.pending = true;
                    return;
                }
                _ => {
                    state.pending = Some((stamp, Instant::now()));
                    out.pending = true;
                    return;
                }
            }
        }
        state.pending = None;
        let parsed = match read_file(path) {
            Err(ReadError::Changed) => {
                out.pending = true;
                return;
            }
            Err(e) => Err(e.to_string()),
            Ok((bytes, _)) => utf8(&bytes).and_then(|text| Parsed::read(&file, text, Some(filter))),
        };
        state.acted = Some(stamp);
        let mut parsed = match parsed {
            Ok(p) if p.documents == 0 && !state.objects.is_empty() => {
                fail(
                    state,
                    "empty (being rewritten?); remove the file, or write an empty List, to delete its objects".into(),
                    out,
                );
                return;
            }
            Ok(p) => p,
            Err(reason) => {
                fail(state, reason, out);
                return;
            }
        };
        state.failing = None;
        state.ignored = std::mem::take(&mut parsed.ignored);
        let (objects, errors) = validate(&file, parsed, &state.objects, filter);
        out.errors.extend(errors);
        // Compared converted: an edit of what the proxy does not use (an annotation, a label
        // it does not read) changes nothing.
        if objects != state.objects {
            state.objects = objects;
            out.changed = true;
        }
    }

    /// Every object, merged across files; for a duplicate, the last file in sort order wins
    /// and the others are returned as ignored.
    pub fn objects(&self) -> (ObjectRefs<'_>, Vec<Ignored>) {
        let mut merged: BTreeMap<&ObjectKey, (&Path, &Object)> = BTreeMap::new();
        let mut ignored = Vec::new();
        for (path, state) in &self.files {
            ignored.extend(state.ignored.iter().cloned());
            for (key, o) in &state.objects {
                if let Some((loser, _)) = merged.insert(key, (path, o)) {
                    ignored.push(Ignored {
                        file: loser.display().to_string(),
                        kind: key.0.into(),
                        name: display_name(&key.1, &key.2),
                        reason: format!(
                            "also defined in {}, which wins (the last file in sort order)",
                            path.display()
                        ),
                    });
                }
            }
        }
        let mut objects = ObjectRefs::default();
        for (key, (_, o)) in merged {
            objects.push(key, o);
        }
        (objects, ignored)
    }

    /// The file an object (kind, `namespace/name`) was read from, if any.
    pub fn file_of(&self, kind: &str, name: &str) -> Option<String> {
        self.files.iter().find_map(|(p, s)| {
            s.objects
                .keys()
                .any(|k| k.0 == kind && display_name(&k.1, &k.2) == name)
                .then(|| p.display().to_string())
        })
    }

    /// Files and paths currently failing (each keeps what it last produced).
    pub fn failing(&self) -> usize {
        self.failing_roots.len() + self.files.values().filter(|f| f.failing.is_some()).count()
    }

    /// Of the objects ignored now, those not reported before (each is reported once while it
    /// stays ignored).
    pub fn newly_ignored(&mut self, now: Vec<Ignored>) -> Vec<Ignored> {
        let now: BTreeSet<Ignored> = now.into_iter().collect();
        let new = now.difference(&self.reported).cloned().collect();
        self.reported = now;
        new
    }
}

/// Converts a file's objects as the store takes them. An object that is invalid, or whose
/// document did not match its schema, keeps its last good version from `old` (if any);
/// everything else is taken, converted. Returns the objects and the problems.
fn validate(
    file: &str,
    parsed: Parsed,
    old: &BTreeMap<ObjectKey, Object>,
    filter: &Filter,
) -> (BTreeMap<ObjectKey, Object>, Vec<ManifestError>) {
    let mut errors = parsed.errors;
    let mut objects = BTreeMap::new();
    let invalid = |e: ConvertError| ManifestError::Invalid {
        file: file.into(),
        source: e,
    };
    let mut keep_old = Vec::new();
    // Converted as they were typed ([`Parsed::read`] with the filter); any read without one
    // are converted here.
    let mut checked = parsed.converted;
    checked.extend(parsed.objects.into_iter().map(|(key, o)| {
        let mut endpoint_errors = Vec::new();
        (
            key,
            (o.convert(filter, &mut endpoint_errors), endpoint_errors),
        )
    }));
    for (key, (converted, endpoint_errors)) in checked {
        match converted {
            Ok(o) => {
                errors.extend(endpoint_errors.into_iter().map(invalid));
                objects.insert(key, o);
            }
            Err(e) => {
                errors.push(invalid(e));
                keep_old.push(key);
            }
        }
    }
    for key in keep_old.into_iter().chain(parsed.broken) {
        if let Some(o) = old.get(&key) {
            objects.entry(key).or_insert_with(|| o.clone());
        }
    }
    (objects, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: t\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n";
    const SVC2: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: api\n  namespace: t\nspec:\n  clusterIP: 10.96.0.11\n  ports:\n  - name: http\n    port: 80\n";

    /// A scratch directory removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let p =
                std::env::temp_dir().join(format!("lb-manifests-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("scratch directory");
            Dir(p)
        }
        fn write(&self, name: &str, text: impl AsRef<[u8]>) {
            std::fs::write(self.0.join(name), text).expect("write");
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn names(s: &Sources) -> Vec<String> {
        let (o, _) = s.objects();
        o.services
            .iter()
            .map(|((_, _, name), _)| name.clone())
            .collect()
    }

    fn refresh(s: &mut Sources) -> Refresh {
        s.refresh(&Filter::default(), None)
    }

    #[test]
    fn issue_10_a_type_error_names_the_field_path() {
        let mut o = Objects::default();
        let mut errors = Vec::new();
        o.add_text(
            "f.yaml",
            &SVC.replace("port: 80", "port: eighty"),
            &mut errors,
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        let text = errors[0].to_string();
        assert!(
            text.contains(r#"Service t/web: field spec.ports[0].port: invalid type: string "eighty", expected i32"#),
            "{text}"
        );
    }

    #[test]
    fn issue_10_more_than_1024_documents_and_250000_nodes_are_read_whole() {
        let mut text = String::new();
        for i in 0..3000 {
            text.push_str(&SVC.replace("name: web", &format!("name: web-{i}")));
            text.push_str("---\n");
        }
        let mut o = Objects::default();
        let mut errors = Vec::new();
        o.add_text("big.yaml", &text, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(o.services.len(), 3000);
        // One List of 30,000 endpoints: far more than 250,000 parser nodes.
        let mut list = String::from("apiVersion: v1\nkind: List\nitems:\n");
        for i in 0..30 {
            list.push_str(&format!("- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: s{i}\n    namespace: t\n    labels: {{kubernetes.io/service-name: web}}\n  addressType: IPv4\n  endpoints:\n"));
            for j in 0..1000 {
                list.push_str(&format!(
                    "  - addresses: [\"10.1.{}.{}\"]\n    conditions: {{ready: true, serving: true, terminating: false}}\n    nodeName: node-a\n",
                    j / 250,
                    j % 250
                ));
            }
        }
        let mut errors = Vec::new();
        o.add_text("list.yaml", &list, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(o.endpoint_slices.len(), 30);
    }

    /// What `Parsed::from_text` reads from `text`, and whether the general path reads the
    /// same: objects, problems and document count, or the same error.
    fn read_both(text: &str) -> Result<(usize, usize), String> {
        type Seen = (
            Vec<(ObjectKey, Typed)>,
            Vec<ManifestError>,
            Vec<ObjectKey>,
            Vec<Ignored>,
            usize,
        );
        let seen = |p: Parsed| -> Seen { (p.objects, p.errors, p.broken, p.ignored, p.documents) };
        let fast = Parsed::from_text("f.yaml", text).map(seen);
        let general = Parsed::from_text_general("f.yaml", text).map(seen);
        assert_eq!(fast, general, "{text}");
        fast.map(|s| (s.0.len(), s.1.len()))
    }

    const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\nmetadata:\n  labels:\n    kubernetes.io/service-name: web\n    name: not-this-one\n  name: web-1\n  namespace: t\nendpoints:\n- addresses:\n  - 10.0.0.1\nports:\n- port: 8080\n";
    const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels:\n    topology.kubernetes.io/zone: z1\n";

    #[test]
    fn plain_yaml_objects_typed_from_their_text_read_as_through_yaml_values() {
        let cidr = "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: kubernetes\nspec:\n  cidrs:\n  - 10.96.0.0/16\n";
        let plain = [
            // A dump split into documents, as kubectl prints them.
            format!("---\n{SVC}---\n{SLICE}---\n{NODE}---\n{cidr}"),
            // No leading marker, a comment first, comments between.
            format!("# generated\n{SVC}---\n# the slice\n{SLICE}"),
            // Quoted names, no namespace (the default one), deeper indentation.
            SVC.replace("name: web", "name: \"web\"")
                .replace("  namespace: t\n", ""),
            "kind: Service\napiVersion: v1\nmetadata:\n    namespace: t\n    name: web\nspec:\n    ports:\n    - port: 80\n".into(),
            // Windows line ends.
            format!("{SVC}---\n{SLICE}").replace('\n', "\r\n"),
        ];
        for text in &plain {
            assert!(yaml_entries(text).is_some(), "read from its lines: {text}");
            let (objects, errors) = read_both(text).expect("reads");
            assert!(objects > 0 && errors == 0, "{text}");
        }
        // Other shapes go through the general path, whose reading is the reference.
        let other = [
            format!("{SVC}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n"),
            "{kind: Service, apiVersion: v1, metadata: {name: web, namespace: t}}\n".into(),
            format!("{SVC}---\n"),
            format!("{SVC}...\n---\n{SLICE}"),
            format!("--- {SVC}"),
            SVC.replace("port: 80", "port: eighty"),
            SVC.replace("kind: Service", "kind: Service\nkind: Node"),
            format!("%YAML 1.2\n---\n{SVC}"),
            format!("{SVC}---\nmetadata:\n  name: no-kind\n"),
            "apiVersion: v1\nkind: List\nitems:\n- ".to_string() + &SVC.replace('\n', "\n  "),
        ];
        for text in &other {
            let _ = read_both(text);
        }
        // `List`s as kubectl prints them (sequence at column 0), and indented by two, with a
        // block scalar whose lines look like entries and comments, and comments between items.
        let item = |doc: &str, indent: &str| -> String {
            let mut lines = doc.lines();
            let mut out = format!("{indent}- {}\n", lines.next().unwrap_or_default());
            for l in lines {
                // An empty line stays empty (inside a block scalar too).
                match l {
                    "" => out.push('\n'),
                    l => out.push_str(&format!("{indent}  {l}\n")),
                }
            }
            out
        };
        let noted = SVC.replace(
            "metadata:\n",
            "metadata:\n  annotations:\n    note: |\n      - not an item\n      # not a comment\n\n      end\n",
        );
        for indent in ["", "  "] {
            let list = format!(
                "apiVersion: v1\nitems:\n{}# a comment\n{}{}kind: List\nmetadata:\n  resourceVersion: \"\"\n",
                item(&noted, indent),
                item(SLICE, indent),
                item(NODE, indent),
            );
            assert!(
                yaml_list_entries(&list).is_some(),
                "read from its lines: {list}"
            );
            let (objects, errors) = read_both(&list).expect("reads");
            assert_eq!((objects, errors), (3, 0), "{list}");
            for odd in [
                list.replace("kind: Node", "kind: Pod"),
                list.replace("port: 80", "port: eighty"),
                list.replace("kind: List", "kind: Lost"),
                list.replace("  name: web\n", "name: web\n"),
            ] {
                let _ = read_both(&odd);
            }
        }
        // Read wrongly from the lines (a head inside a multi-line quoted scalar): the typed
        // object's name differs from it, so the general path reads the file.
        let fooled = "apiVersion: v1\nkind: Service\nspec:\n  clusterIP: \"10.96.0.10\n\nmetadata:\n  name: wrong\n  \"\n";
        assert!(yaml_entries(fooled).is_some());
        let read = read_both(fooled);
        assert_eq!(
            read,
            Err("document 1: Service without metadata.name".into())
        );
    }

    #[test]
    fn a_big_file_typed_on_every_core_keeps_document_order_and_positions() {
        // Over the parallel threshold: the runs are joined in document order, so the later
        // of two copies of an object wins and a position names the right document.
        let mut text = String::new();
        for i in 0..3000 {
            let ip = if i == 2999 { "10.96.9.9" } else { "10.96.0.10" };
            let name = if i == 0 || i == 2999 {
                "name: dup".to_string()
            } else {
                format!("name: web-{i}")
            };
            text.push_str(&SVC.replace("name: web", &name).replace("10.96.0.10", ip));
            text.push_str("---\n");
        }
        assert!(text.len() > PARALLEL_MIN_BYTES);
        let parsed = Parsed::from_text("f.yaml", &text).expect("parses");
        let (objects, errors) = validate("f.yaml", parsed, &BTreeMap::new(), &Filter::default());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(objects.len(), 2999);
        let dup = ("Service", "t".to_string(), "dup".to_string());
        let Some(Object::Service(Converted::Accepted(ports))) = objects.get(&dup) else {
            panic!("dup read");
        };
        let ip = ports[0].cluster_ips().first().map(|ip| ip.to_string());
        assert_eq!(ip.as_deref(), Some("10.96.9.9"), "the later copy wins");
        text.push_str("metadata:\n  name: no-kind\n");
        let err = Parsed::from_text("f.yaml", &text).expect_err("a document without kind");
        assert_eq!(err, "document 3001: no kind");
        let list = format!(
            "{{\"kind\":\"List\",\"items\":[{}{{\"metadata\":{{}}}}]}}",
            r#"{"kind":"Service","metadata":{"name":"x","namespace":"t"},"spec":{"ports":[{"port":80}]}},"#
                .repeat(4000)
        );
        let err = Parsed::from_text("f.json", &list).expect_err("an item without kind");
        assert_eq!(err, "document 1, items[4000]: no kind");
    }

    /// Read with a filter (as [`Sources`] reads), a big file's objects are converted as they
    /// are typed, on every core: none is kept as read, and each one's conversion, an invalid
    /// one's error included, is in document order, as validating them afterwards gives.
    #[test]
    fn a_file_read_with_a_filter_keeps_its_objects_converted_not_as_read() {
        let mut text = String::new();
        for i in 0..3000 {
            let port = if i == 1500 { "port: 0" } else { "port: 80" };
            text.push_str(
                &SVC.replace("name: web", &format!("name: web-{i}"))
                    .replace("port: 80", port),
            );
            text.push_str("---\n");
        }
        assert!(text.len() > PARALLEL_MIN_BYTES);
        let filter = Filter::default();
        let parsed = Parsed::read("f.yaml", &text, Some(&filter)).expect("parses");
        assert!(parsed.objects.is_empty(), "no object kept as read");
        assert_eq!(parsed.converted.len(), 3000);
        let names: Vec<&str> = parsed.converted.iter().map(|(k, _)| k.2.as_str()).collect();
        let want: Vec<String> = (0..3000).map(|i| format!("web-{i}")).collect();
        assert_eq!(names, want);
        assert!(parsed.converted[1500].1.0.is_err(), "port 0 is invalid");
        let (objects, errors) = validate("f.yaml", parsed, &BTreeMap::new(), &filter);
        let typed = Parsed::from_text("f.yaml", &text).expect("parses");
        assert_eq!(typed.converted.len(), 0);
        let (objects_typed, errors_typed) = validate("f.yaml", typed, &BTreeMap::new(), &filter);
        assert_eq!(objects, objects_typed);
        assert_eq!(objects.len(), 2999);
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let errors_typed: Vec<String> = errors_typed.iter().map(ToString::to_string).collect();
        assert_eq!(errors, errors_typed);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].contains("Service t/web-1500: field spec.ports[0].port"),
            "{errors:?}"
        );
    }

    #[test]
    fn yaml_alias_bombs_and_absurd_nesting_are_still_refused() {
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        // Expanded, the bomb would be 10^12 nodes: it is refused by the alias budget (no
        // timing is asserted; an unbounded expansion would not finish).
        assert!(parse_documents(&bomb).is_err(), "an alias bomb is refused");
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(
            Parsed::from_text("f", &deep).is_err(),
            "absurd JSON nesting"
        );
        // Deep nesting inside an object: refused or skipped, never a stack overflow.
        let svc = format!(
            r#"{{"kind":"Service","metadata":{{"name":"x"}},"spec":{{"ports":[{{"port":80}}],"x":{}1{}}}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let _ = Parsed::from_text("f", &svc);
        let deep_yaml = format!("a: {}1{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(parse_documents(&deep_yaml).is_err(), "absurd YAML nesting");
    }

    #[test]
    fn json_is_read_as_one_value_a_stream_or_a_list() {
        let svc = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"t"},"spec":{"clusterIP":"10.96.0.10","ports":[{"port":80}]}}"#;
        for text in [
            svc.to_string(),
            format!("{svc}\n{}", svc.replace("\"web\"", "\"api\"")),
            format!(r#"{{"apiVersion":"v1","kind":"List","items":[{svc}]}}"#),
        ] {
            let mut o = Objects::default();
            let mut errors = Vec::new();
            o.add_text("f.json", &text, &mut errors);
            assert!(errors.is_empty(), "{errors:?}");
            assert!(!o.services.is_empty());
        }
        let mut errors = Vec::new();
        Objects::default().add_text("f.json", r#"{"kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": "eighty"}]}}"#, &mut errors);
        assert!(
            errors[0]
                .to_string()
                .contains("field spec.ports[0].port: invalid type"),
            "{errors:?}"
        );
    }

    #[test]
    fn issue_10_a_file_that_stops_parsing_keeps_its_objects_until_it_parses_again() {
        let d = Dir::new("parse");
        d.write("a.yaml", format!("{SVC}---\n{SVC2}"));
        let mut s = Sources::new(&[&d.0]);
        assert!(refresh(&mut s).changed);
        assert_eq!(names(&s), ["api", "web"]);
        for bad in [
            format!("{SVC}---\n{SVC2}---\nkind: Service\n  bad: [indent\n").into_bytes(),
            [format!("{SVC}---\n{SVC2}").as_bytes(), b"\xff\n"].concat(),
            Vec::new(),
            b"# nothing yet\n".to_vec(),
            format!("{SVC}---\n{SVC2}---\nmetadata:\n  name: no-kind\n").into_bytes(),
        ] {
            d.write("a.yaml", &bad);
            let r = refresh(&mut s);
            assert!(!r.changed, "{}", String::from_utf8_lossy(&bad));
            assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
            assert!(
                r.errors[0].to_string().contains("a.yaml")
                    && r.errors[0].to_string().contains("keeping the 2 objects"),
                "{}",
                r.errors[0]
            );
            assert_eq!(names(&s), ["api", "web"]);
            assert_eq!(s.failing(), 1);
        }
        // An object deleted from a file that parses is gone.
        d.write("a.yaml", SVC);
        assert!(refresh(&mut s).changed);
        assert_eq!(names(&s), ["web"]);
        assert_eq!(s.failing(), 0);
    }

    #[test]
    fn an_edit_of_what_the_proxy_does_not_use_is_no_change() {
        let d = Dir::new("unused");
        d.write("a.yaml", SVC);
        let mut s = Sources::new(&[&d.0]);
        assert!(refresh(&mut s).changed);
        d.write(
            "a.yaml",
            SVC.replace(
                "metadata:\n",
                "metadata:\n  annotations:\n    note: edited\n",
            ),
        );
        let r = refresh(&mut s);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert!(!r.changed, "an annotation the proxy does not read");
        d.write("a.yaml", SVC.replace("10.96.0.10", "10.96.0.100"));
        assert!(refresh(&mut s).changed, "a new cluster IP");
    }

    #[test]
    fn issue_10_an_invalid_object_keeps_its_last_good_version() {
        let d = Dir::new("object");
        d.write("a.yaml", format!("{SVC}---\n{SVC2}"));
        let mut s = Sources::new(&[&d.0]);
        refresh(&mut s);
        // A schema error and a validation error: both keep the last good version, while
        // the other object's change is taken.
        for bad in ["port: eighty", "port: 0"] {
            d.write(
                "a.yaml",
                format!(
                    "{}---\n{}",
                    SVC.replace("port: 80", bad),
                    SVC2.replace("10.96.0.11", "10.96.0.12")
                ),
            );
            let r = refresh(&mut s);
            assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
            assert!(
                r.errors[0].to_string().contains("spec.ports[0].port"),
                "{}",
                r.errors[0]
            );
            let (o, _) = s.objects();
            let port = |n: &str| {
                o.services
                    .iter()
                    .find(|((_, _, name), _)| name == n)
                    .and_then(|(_, c)| match c {
                        Converted::Accepted(ports) => ports.first(),
                        Converted::Skipped(_) => None,
                    })
                    .map(|p| (p.cluster_ips()[0].to_string(), p.port()))
            };
            assert_eq!(port("web"), Some(("10.96.0.10".into(), 80)));
            assert_eq!(port("api").map(|p| p.0), Some("10.96.0.12".into()));
        }
        // A new object that is invalid from the start is simply left out.
        d.write(
            "b.yaml",
            SVC2.replace("name: api", "name: new")
                .replace("port: 80", "port: 0"),
        );
        assert_eq!(refresh(&mut s).errors.len(), 1);
        assert_eq!(names(&s), ["api", "web"]);
    }

    #[test]
    fn issue_10_a_removed_file_deletes_its_objects_but_a_vanished_directory_keeps_them() {
        let d = Dir::new("vanish");
        let sub = d.0.join("cluster");
        std::fs::create_dir_all(&sub).expect("dir");
        std::fs::write(sub.join("a.yaml"), SVC).expect("write");
        std::fs::write(sub.join("b.yaml"), SVC2).expect("write");
        let mut s = Sources::new(&[&sub]);
        refresh(&mut s);
        assert_eq!(names(&s), ["api", "web"]);
        // Removed on purpose from a directory that is still there: gone.
        std::fs::remove_file(sub.join("b.yaml")).expect("rm");
        let r = refresh(&mut s);
        assert!(r.changed);
        assert_eq!(r.removed.len(), 1);
        assert_eq!(names(&s), ["web"]);
        // The directory itself disappears: reported once, everything stays.
        std::fs::rename(&sub, d.0.join("elsewhere")).expect("rename");
        let r = refresh(&mut s);
        assert!(!r.changed);
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert!(
            r.errors[0].to_string().contains("keeping the 1 objects"),
            "{}",
            r.errors[0]
        );
        assert!(refresh(&mut s).errors.is_empty(), "reported once");
        assert_eq!(names(&s), ["web"]);
        // A followed file that disappears: the same.
        let f = d.0.join("elsewhere/a.yaml");
        let mut s = Sources::new(&[&f]);
        refresh(&mut s);
        std::fs::remove_file(&f).expect("rm");
        assert_eq!(refresh(&mut s).errors.len(), 1);
        assert_eq!(names(&s), ["web"]);
    }

    #[test]
    fn issue_10_dangling_symlinks_and_fifos_are_reported_and_never_block() {
        let d = Dir::new("special");
        d.write("a.yaml", SVC);
        std::os::unix::fs::symlink(d.0.join("a.yaml"), d.0.join("link.yaml")).expect("symlink");
        let fifo = d.0.join("pipe.yaml");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success(), "mkfifo");
        let mut s = Sources::new(&[&d.0]);
        let r = refresh(&mut s);
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert!(r.errors[0].to_string().contains("FIFO"), "{}", r.errors[0]);
        // The symlinked copy is a duplicate of a.yaml: the last in sort order wins.
        let (_, ignored) = s.objects();
        assert_eq!(ignored.len(), 1, "{ignored:?}");
        assert!(
            ignored[0].reason.contains("link.yaml, which wins"),
            "{}",
            ignored[0]
        );
        // The symlink's target goes: link.yaml keeps its objects, reported.
        std::fs::rename(d.0.join("a.yaml"), d.0.join("a.yml.bak")).expect("rename");
        let r = refresh(&mut s);
        assert!(
            r.errors.iter().any(|e| e
                .to_string()
                .contains("link.yaml: a symlink to a missing file; keeping the 1 objects")),
            "{:?}",
            r.errors
        );
        assert_eq!(names(&s), ["web"]);
        assert!(refresh(&mut s).errors.is_empty(), "reported once");
    }

    #[test]
    fn issue_10_a_changed_file_is_read_only_once_it_has_settled() {
        let d = Dir::new("settle");
        d.write("a.yaml", SVC);
        let mut s = Sources::new(&[&d.0]);
        refresh(&mut s);
        let settle = Some(Duration::from_millis(300));
        d.write("a.yaml", SVC2);
        let r = s.refresh(&Filter::default(), settle);
        assert!(!r.changed && r.pending);
        std::thread::sleep(Duration::from_millis(100));
        // Written again before it settled: the clock restarts.
        d.write("a.yaml", format!("{SVC2}---\n{SVC}"));
        assert!(!s.refresh(&Filter::default(), settle).changed);
        std::thread::sleep(Duration::from_millis(200));
        assert!(!s.refresh(&Filter::default(), settle).changed);
        std::thread::sleep(Duration::from_millis(150));
        assert!(s.refresh(&Filter::default(), settle).changed);
        assert_eq!(names(&s), ["api", "web"]);
    }

    #[test]
    fn issue_10_ignored_objects_are_reported_once_each() {
        let d = Dir::new("ignored");
        let slice = |name: &str, svc: &str, family: &str, ip: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: t\n  labels:\n    kubernetes.io/service-name: {svc}\naddressType: {family}\nendpoints:\n- addresses: [\"{ip}\"]\n"
            )
        };
        d.write(
            "a.yaml",
            format!(
                "{SVC}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: t\n---\n{}---\n{}",
                slice("web-v6", "web", "IPv6", "fd00::1"),
                slice("gone-1", "gone", "IPv4", "10.0.0.1"),
            ),
        );
        d.write("b.yaml", SVC);
        let mut s = Sources::new(&[&d.0]);
        refresh(&mut s);
        let (objects, mut ignored) = s.objects();
        let mut store = Store::new();
        let loaded = objects.replace_in(&mut store, Some("node-a"));
        ignored.extend(loaded.ignored);
        let reported = s.newly_ignored(ignored.clone());
        let text: Vec<String> = reported.iter().map(|i| i.to_string()).collect();
        assert_eq!(text.len(), 4, "{text:#?}");
        let has = |s: &str| text.iter().any(|t| t.contains(s));
        assert!(
            has("Pod t/p: ignored: lb-proxy does not use Pod objects"),
            "{text:#?}"
        );
        assert!(has("Service t/web: ignored: also defined in"), "{text:#?}");
        assert!(
            has(
                "EndpointSlice t/web-v6: ignored: addressType IPv6 but Service t/web has no IPv6 cluster IP"
            ),
            "{text:#?}"
        );
        assert!(
            has("EndpointSlice t/gone-1: ignored: its Service t/gone is not in the manifests"),
            "{text:#?}"
        );
        assert!(s.newly_ignored(ignored).is_empty(), "once");
    }
}

#[cfg(test)]
mod default_tests {
    use super::*;

    #[test]
    fn service_cidrs_are_read_from_the_manifests_and_a_bad_one_is_reported_by_field() {
        // Issue 9, point 8.
        let yaml = "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: kubernetes\nspec:\n  cidrs: [10.96.0.0/16, \"fd00:96::/108\"]\n---\napiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: extra\nspec:\n  cidrs: [10.97.0.1/16]\n---\napiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: broken\nspec:\n  cidrs: [10.98.0.0/40]\n";
        let mut objects = Objects::default();
        let mut errors = Vec::new();
        objects.add_text("test.yaml", yaml, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let mut invalid = Vec::new();
        let cidrs: Vec<String> = objects
            .service_cidrs(&mut |e| invalid.push(e.to_string()))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(cidrs, ["10.96.0.0/16", "10.97.0.0/16", "fd00:96::/108"]);
        assert_eq!(
            invalid,
            ["ServiceCIDR broken: field spec.cidrs[0]: \"10.98.0.0/40\" is not a CIDR"]
        );
    }

    #[test]
    fn a_slice_port_without_a_protocol_means_tcp_as_the_api_server_defaults_it() {
        // Issue 9, point 12.
        let yaml = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: t\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - name: http\n    port: 80\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: t\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nports:\n- name: http\n  port: 8080\nendpoints:\n- addresses: [\"10.244.1.10\"]\n";
        let mut objects = Objects::default();
        let mut errors = Vec::new();
        objects.add_text("test.yaml", yaml, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let (store, errors, _) = objects.into_store(Some("node-a"), &Filter::default());
        assert!(errors.is_empty(), "{errors:?}");
        let snap = store.snapshot().expect("node known");
        let endpoints: Vec<String> = snap
            .services
            .values()
            .flat_map(|e| e.endpoints.iter().map(|e| e.addr().to_string()))
            .collect();
        assert_eq!(endpoints, ["10.244.1.10:8080"]);
    }
}
