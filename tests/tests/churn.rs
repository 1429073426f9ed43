//! Issue 10: a churn soak with real packets. A Service with stable endpoints (b0, b1) and
//! churned ones (b2, b3) whose manifest is rewritten by rename, in place, and in slow pieces
//! (as a shell redirection writes), while clients connect continuously. No connection may
//! fail (a stable endpoint always exists), and none may reach an endpoint that was removed
//! and synced (a grace period after the write).
//!
//! `LB_SOAK_SECS` sets the duration (default 30 s); `scripts/soak` runs it longer and prints
//! the figures.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lb_e2e::{NODE_YAML, Topology, slice_yaml};

const TARGET: &str = "10.96.0.10:80";
/// After a write, how long lb-proxy may take to settle (200 ms), poll (100 ms) and sync.
const GRACE: Duration = Duration::from_millis(1500);
const PERIOD: Duration = Duration::from_millis(2500);

fn manifest(churned: &BTreeSet<usize>) -> String {
    let mut eps: Vec<(usize, &str, bool)> = vec![(0, "node-a", true), (1, "node-a", true)];
    eps.extend(churned.iter().map(|&i| (i, "node-a", true)));
    // Filler Services around the real ones, so a slow writer's pieces end in the middle of
    // documents and between them.
    let filler = |from: usize| -> String {
        (from..from + 15)
            .map(|i| {
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata:\n  name: filler-{i}\n  namespace: t\nspec:\n  clusterIP: 10.97.0.{}\n  ports:\n  - name: http\n    port: 80\n---\n",
                    i + 1
                )
            })
            .collect()
    };
    format!(
        "{}apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: t\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n---\n{}---\n{}",
        filler(0),
        slice_yaml("web", "IPv4", "http", "TCP", 8080, &eps),
        filler(100),
    )
}

#[derive(Debug, Clone, Copy)]
enum Write {
    Rename,
    InPlace,
    SlowPieces,
}

fn write(dir: &std::path::Path, how: Write, text: &str) {
    let path = dir.join("web.yaml");
    match how {
        Write::Rename => {
            let tmp = dir.join(".web.yaml.tmp");
            std::fs::write(&tmp, text).expect("write");
            std::fs::rename(&tmp, &path).expect("rename");
        }
        Write::InPlace => std::fs::write(&path, text).expect("write"),
        Write::SlowPieces => {
            let mut f = std::fs::File::create(&path).expect("truncate");
            let n = text.len();
            let mut at = 0;
            for cut in [n / 5, n / 2, 3 * n / 4, n] {
                std::thread::sleep(Duration::from_millis(60));
                f.write_all(&text.as_bytes()[at..cut]).expect("piece");
                f.flush().expect("flush");
                at = cut;
            }
        }
    }
}

/// One connection: the backend's name, or the error.
fn connect(target: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 128];
    let n = s.read(&mut buf).map_err(|e| format!("read: {e}"))?;
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| format!("no reply ({line:?})"))
}

#[test]
fn issue_10_churn_soak_fails_no_connection_and_reaches_no_removed_endpoint() {
    let secs: u64 = std::env::var("LB_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let mut t = Topology::up(4);
    t.serve_all();
    t.write_manifest("node.yaml", NODE_YAML);
    let mut churned: BTreeSet<usize> = [2].into();
    t.write_manifest("web.yaml", &manifest(&churned));
    t.start_proxy(&[]);
    // Each change: when its write finished, and the churned endpoints it left.
    let mut changes: Vec<(Instant, BTreeSet<usize>)> = vec![(Instant::now(), churned.clone())];
    let stop = Arc::new(AtomicBool::new(false));
    let netns = PathBuf::from(format!("/run/netns/{}", t.client));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            let netns = netns.clone();
            std::thread::spawn(move || {
                lb_proxy::nft::netlink::enter_netns(&netns).expect("enter the client namespace");
                let target: SocketAddr = TARGET.parse().expect("address");
                let mut seen = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    seen.push((started, connect(target)));
                    std::thread::sleep(Duration::from_millis(5));
                }
                seen
            })
        })
        .collect();
    let cycle: [BTreeSet<usize>; 4] = [[2, 3].into(), [3].into(), [].into(), [2].into()];
    let hows = [Write::Rename, Write::InPlace, Write::SlowPieces];
    let mut writes: BTreeMap<String, usize> = BTreeMap::new();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut i = 0;
    while Instant::now() + PERIOD < end {
        std::thread::sleep(PERIOD);
        churned = cycle[i % cycle.len()].clone();
        let how = hows[(i / cycle.len() + i) % hows.len()];
        write(&t.dir, how, &manifest(&churned));
        changes.push((Instant::now(), churned.clone()));
        *writes.entry(format!("{how:?}")).or_default() += 1;
        i += 1;
    }
    std::thread::sleep(PERIOD);
    stop.store(true, Ordering::SeqCst);
    let seen: Vec<(Instant, Result<String, String>)> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client thread"))
        .collect();
    t.drain_applied();
    // An endpoint is surely gone at `at` when no state in effect during the grace period
    // before it had it.
    let surely_gone = |b: usize, at: Instant| {
        let from = at.checked_sub(GRACE).unwrap_or(at);
        let in_effect_at_from = changes.iter().rev().find(|(w, _)| *w <= from);
        let during = changes.iter().filter(|(w, _)| *w > from && *w <= at);
        in_effect_at_from.is_some_and(|(_, s)| !s.contains(&b))
            && during.clone().all(|(_, s)| !s.contains(&b))
    };
    let mut by_backend: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = Vec::new();
    let mut misrouted = Vec::new();
    for (at, r) in &seen {
        match r {
            Ok(b) => {
                *by_backend.entry(b.clone()).or_default() += 1;
                let idx: Option<usize> = b.strip_prefix('b').and_then(|n| n.parse().ok());
                if idx.is_some_and(|i| i >= 2 && surely_gone(i, *at)) {
                    misrouted.push(b.clone());
                }
            }
            Err(e) => failed.push(e.clone()),
        }
    }
    eprintln!(
        "soak: {secs} s, {} file rewrites {writes:?}, {} connections, {} failed, {} misrouted; by backend {by_backend:?}",
        changes.len() - 1,
        seen.len(),
        failed.len(),
        misrouted.len()
    );
    assert!(changes.len() > 8, "enough churn");
    assert!(
        by_backend.get("b2").is_some_and(|n| *n > 0)
            && by_backend.get("b3").is_some_and(|n| *n > 0),
        "churned endpoints served while present: {by_backend:?}"
    );
    assert!(failed.is_empty(), "failed connections: {failed:?}");
    assert!(
        misrouted.is_empty(),
        "connections to removed endpoints: {misrouted:?}"
    );
}
