//! The issue-13 table, filled in by the sections of one run and printed at its end: each
//! section notes its figure for its row as it prints it; a row no section of this run
//! measured says so.

use std::sync::Mutex;

/// The rows, in the order of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row {
    DaemonSteady,
    DaemonStart,
    OnceVsNft,
    OncePeak,
    Read,
    Dumps,
    Full50k,
    OneChange,
    Affinity,
}

const ROWS: [(Row, &str, &str); 9] = [
    (
        Row::DaemonSteady,
        "daemon RSS, 10k x 10, steady after first sync",
        "<= 100 MiB",
    ),
    (
        Row::DaemonStart,
        "daemon start -> all Services programmed, 10k x 10",
        "<= 1.5 s",
    ),
    (
        Row::OnceVsNft,
        "run --once whole process vs nft -f of the same ruleset (same run)",
        ">= 2x faster",
    ),
    (Row::OncePeak, "run --once peak RSS, 10k x 10", "<= 100 MiB"),
    (
        Row::Read,
        "read manifests, YAML / JSON",
        ">= 40 MB/s YAML, >= 150 MB/s JSON",
    ),
    (
        Row::Dumps,
        "50k x 10 as one List (JSON and YAML), and as one multi-document file",
        "read and programmed",
    ),
    (
        Row::Full50k,
        "50k x 10 full sync in process; RSS",
        "<= 5 s; <= 300 MiB",
    ),
    (
        Row::OneChange,
        "one endpoint change at 10k and 50k Services",
        "stays <= 5 ms",
    ),
    (
        Row::Affinity,
        "lb-core affinity hit, 1M clients, 2 threads",
        "<= 100 ns",
    ),
];

static NOTED: Mutex<Vec<(Row, String)>> = Mutex::new(Vec::new());

/// Adds `figure` to `row` (a row may collect several, e.g. YAML and JSON).
pub fn note(row: Row, figure: impl Into<String>) {
    NOTED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push((row, figure.into()));
}

/// Prints the table with what this run noted.
pub fn print() {
    let noted = NOTED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    println!("\n## issue 13 table, from this run\n");
    println!("| measure (2-core VM) | this run | target |");
    println!("| --- | --- | --- |");
    for (row, measure, target) in ROWS {
        let figures: Vec<&str> = noted
            .iter()
            .filter(|(r, _)| *r == row)
            .map(|(_, f)| f.as_str())
            .collect();
        let now = if figures.is_empty() {
            "not measured in this run".to_string()
        } else {
            figures.join("; ")
        };
        println!("| {measure} | {now} | {target} |");
    }
}
