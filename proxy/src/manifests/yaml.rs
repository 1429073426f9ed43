//! YAML streams into JSON values, on every core for big inputs: the general path, for what
//! the fast paths (`block`, straight into the API types) do not read.
//!
//! The parser is `serde_yaml_ng` (libyaml's parser ported to Rust): about three times as fast
//! as `serde-saphyr` on `kubectl get -o yaml` output. Its protections stay in force on every
//! piece: an alias may not replay more than 100 times the events of its document (so alias
//! bombs fail fast, in memory proportional to the input), and nesting deeper than 128 levels
//! is refused. Nothing else is bounded: the input's size is the budget.
//!
//! Two cuts let both cores work without changing what is read:
//!
//! * a multi-document stream is cut at document markers (`---` at the start of a line, which
//!   cannot occur inside content);
//! * one big document whose top-level `items:` is a block sequence (a `List`, as kubectl
//!   prints it) has that sequence cut between entries: each run of entries parses as a
//!   sequence of its own, and the rest of the document with `items: []`.
//!
//! Either cut falls back to reading the input whole when any piece fails to parse (an alias
//! to an anchor in another piece, a quoted scalar spanning a cut, a real error), so an error is
//! always reported as the whole input produces it.

use serde::Deserialize as _;
use serde_json::Value;

use super::{PARALLEL_MIN_BYTES, threads};

/// Parses a YAML stream into its documents (an empty document is `null`).
pub(super) fn parse(text: &str) -> Result<Vec<Value>, String> {
    let n = threads();
    if n < 2 || text.len() < PARALLEL_MIN_BYTES || text.starts_with('%') || text.contains("\n%") {
        return parse_whole(text);
    }
    let pieces = split_stream(text, piece_count(text.len(), n));
    if pieces.len() > 1 {
        if let Some(docs) = in_parallel(&pieces) {
            return Ok(docs.into_iter().flatten().collect());
        }
        return parse_whole(text);
    }
    if let Some(list) = split_list(text, piece_count(text.len(), n)) {
        if let Some(doc) = list.parse() {
            return Ok(vec![doc]);
        }
    }
    parse_whole(text)
}

/// The documents of `text`, on this thread. A stream of only blank and comment lines has no
/// document (the parser would call it one `null`): that is how a file just truncated reads.
pub(super) fn parse_whole(text: &str) -> Result<Vec<Value>, String> {
    let blank = |l: &str| {
        let l = l.trim_start();
        l.is_empty() || l.starts_with('#')
    };
    if text.lines().all(blank) {
        return Ok(Vec::new());
    }
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).map_err(|e| e.to_string()))
        .collect()
}

/// Parses the pieces on every core (each thread a contiguous share of them, in order);
/// `None` if any fails.
fn in_parallel(pieces: &[&str]) -> Option<Vec<Vec<Value>>> {
    let per = pieces.len().div_ceil(threads().max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = pieces
            .chunks(per)
            .map(|share| {
                s.spawn(move || {
                    share
                        .iter()
                        .map(|p| parse_whole(p).ok())
                        .collect::<Option<Vec<_>>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(pieces.len());
        for h in handles {
            all.extend(h.join().ok().flatten()?);
        }
        Some(all)
    })
}

/// How many pieces to cut `len` bytes into: one per core at least, and pieces of about
/// [`PIECE_BYTES`] (the parser holds a whole document's events at once, and small documents
/// stay in cache: one 80 MB document parses at half the speed of 160 half-megabyte ones).
fn piece_count(len: usize, threads: usize) -> usize {
    threads.max(len / PIECE_BYTES)
}

/// The size of the pieces a big input is cut into.
const PIECE_BYTES: usize = 512 << 10;

/// Cuts a multi-document stream into about `n` pieces, each starting at a document marker.
fn split_stream(text: &str, n: usize) -> Vec<&str> {
    let mut pieces = Vec::with_capacity(n);
    let mut start = 0;
    for k in 1..n {
        let from = (text.len() * k / n).max(start);
        let Some(at) = text.get(from..).and_then(|rest| {
            rest.match_indices("\n---").find_map(|(i, _)| {
                let after = rest.as_bytes().get(i + 4).copied();
                matches!(after, None | Some(b'\n' | b'\r' | b' ' | b'\t')).then_some(from + i + 1)
            })
        }) else {
            break;
        };
        pieces.push(&text[start..at]);
        start = at;
    }
    pieces.push(&text[start..]);
    pieces
}

/// A document cut around its top-level `items:` sequence.
#[derive(Debug)]
struct ListCut<'a> {
    /// The document with `items: []` in place of the sequence.
    rest: String,
    /// Runs of whole entries of the sequence, in order.
    runs: Vec<&'a str>,
}

impl ListCut<'_> {
    /// The document, or `None` if any piece does not parse as expected.
    fn parse(&self) -> Option<Value> {
        let mut pieces: Vec<&str> = self.runs.clone();
        pieces.push(&self.rest);
        let mut parsed = in_parallel(&pieces)?;
        let mut rest = parsed.pop()?;
        let Some(Value::Object(mut doc)) = rest.pop().filter(|_| rest.is_empty()) else {
            return None;
        };
        if doc.get("items") != Some(&Value::Array(Vec::new())) {
            return None;
        }
        let mut items = Vec::new();
        for mut run in parsed {
            match run.pop() {
                Some(Value::Array(entries)) if run.is_empty() => items.extend(entries),
                _ => return None,
            }
        }
        doc.insert("items".into(), Value::Array(items));
        Some(Value::Object(doc))
    }
}

/// A one-document `text`'s top-level `items:` block sequence, found by its lines.
#[derive(Debug)]
pub(super) struct ListEntries {
    /// The document with `items: []` in place of the sequence.
    pub(super) rest: String,
    /// The byte offset of each entry's first line (`- ` at the sequence's indentation).
    pub(super) starts: Vec<usize>,
    /// Where the sequence ends.
    pub(super) end: usize,
    /// The sequence's indentation (kubectl prints it at column 0).
    pub(super) indent: usize,
}

/// Finds a top-level `items:` block sequence in a one-document `text`, and where each of its
/// entries starts: lines that start an entry at the sequence's own indentation.
pub(super) fn list_entries(text: &str) -> Option<ListEntries> {
    if text.contains("\n---") || text.contains("\n...") {
        return None;
    }
    // Byte offsets of line starts, with the line (without its end).
    let lines = || {
        let mut at = 0;
        text.split_inclusive('\n').map(move |l| {
            let start = at;
            at += l.len();
            (start, l.trim_end_matches(['\n', '\r']))
        })
    };
    let mut it = lines().skip_while(|(_, l)| l.trim_end() != "items:");
    let (items_at, _) = it.next()?;
    // The first entry fixes the sequence's indentation.
    let (first, first_line) =
        it.find(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))?;
    let indent = first_line.len() - first_line.trim_start_matches(' ').len();
    let entry = |l: &str| {
        l.len() > indent
            && l.as_bytes()[..indent].iter().all(|b| *b == b' ')
            && (l[indent..].starts_with("- ") || &l[indent..] == "-")
    };
    if !entry(first_line) {
        return None;
    }
    let mut starts = vec![first];
    let mut end = text.len();
    for (at, l) in lines().skip_while(|(at, _)| *at <= first) {
        if l.trim().is_empty() {
            continue;
        }
        let this = l.len() - l.trim_start_matches(' ').len();
        if entry(l) {
            starts.push(at);
        } else if this <= indent && !l.trim_start().starts_with('#') {
            end = at;
            break;
        }
    }
    let rest = format!("{}items: []\n{}", &text[..items_at], &text[end..]);
    Some(ListEntries {
        rest,
        starts,
        end,
        indent,
    })
}

/// Finds a top-level `items:` block sequence in a one-document `text` and cuts it into about
/// `n` runs of entries ([`list_entries`]).
fn split_list(text: &str, n: usize) -> Option<ListCut<'_>> {
    let ListEntries {
        rest, starts, end, ..
    } = list_entries(text)?;
    if starts.len() < 4 {
        return None;
    }
    let first = starts[0];
    let section = end - first;
    let mut runs = Vec::with_capacity(n);
    let mut from = first;
    for k in 1..n {
        let target = first + section * k / n;
        let Some(&cut) = starts.iter().find(|&&s| s >= target && s > from) else {
            break;
        };
        runs.push(&text[from..cut]);
        from = cut;
    }
    runs.push(&text[from..end]);
    Some(ListCut { rest, runs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_big_stream_is_cut_only_at_document_markers_and_reads_the_same() {
        let doc = "kind: Service\nmetadata:\n  name: x\ntext: |\n  ---not a marker\n  --- neither, indented\n";
        let mut text = String::new();
        while text.len() < 3 << 20 {
            text.push_str("---\n");
            text.push_str(doc);
        }
        let pieces = split_stream(&text, 3);
        assert_eq!(pieces.len(), 3);
        assert_eq!(pieces.concat(), text);
        assert!(pieces.iter().all(|p| p.starts_with("---\n")));
        let whole = parse_whole(&text).expect("YAML");
        assert_eq!(parse(&text).expect("YAML"), whole);
    }

    fn list(entries: usize, indent: &str) -> String {
        let mut text = String::from("apiVersion: v1\nitems:\n");
        for i in 0..entries {
            text.push_str(&format!(
                "{indent}- kind: Service\n{indent}  metadata:\n{indent}    name: s{i}\n{indent}  note: |\n{indent}    - not an entry\n{indent}  ports:\n{indent}  - port: 80\n"
            ));
        }
        text.push_str("kind: List\nmetadata:\n  resourceVersion: \"\"\n");
        text
    }

    #[test]
    fn a_big_list_is_cut_between_its_entries_and_reads_the_same() {
        for indent in ["", "  "] {
            let text = list(20_000, indent);
            let cut = split_list(&text, 3).expect("a List to cut");
            assert_eq!(cut.runs.len(), 3);
            assert_eq!(cut.runs.concat().matches("- kind: Service").count(), 20_000);
            assert!(
                cut.runs
                    .iter()
                    .all(|r| r.starts_with(&format!("{indent}- kind")))
            );
            let whole = parse_whole(&text).expect("YAML");
            assert_eq!(cut.parse().as_ref(), whole.first());
            assert_eq!(parse(&text).expect("YAML"), whole);
        }
    }

    #[test]
    fn a_list_whose_pieces_do_not_parse_alone_is_read_whole() {
        // An anchor in the first entry, used by the last: the last run cannot parse alone.
        let mut text = list(20_000, "");
        text = text.replacen("- kind: Service", "- kind: &svc Service", 1);
        let at = text.rfind("- kind: Service").expect("an entry");
        text.replace_range(at..at + "- kind: Service".len(), "- kind: *svc");
        let cut = split_list(&text, 2).expect("a List to cut");
        assert!(cut.parse().is_none());
        let docs = parse(&text).expect("YAML");
        assert_eq!(docs, parse_whole(&text).expect("YAML"));
        assert_eq!(docs[0]["items"][19_999]["kind"], "Service");
    }
}
