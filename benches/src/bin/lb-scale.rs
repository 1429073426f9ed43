//! Scale bench: compile and apply full rulesets for large synthetic clusters into fresh network
//! namespaces, one-endpoint changes on top, and the same rulesets through `nft -f`, plus a
//! kube-proxy-like per-Service, per-endpoint layout as a reference.
//!
//! Run as root through `scripts/scale-bench` (it builds in release mode). Every namespace it
//! creates is named `lbt-scale-<pid>-*` and removed at the end, or when a signal interrupts the
//! run (with the processes in it); the root namespace is not touched.

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::io::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

use lb_benches::{service_entry, slice, slice_key, store};
use lb_proxy::compile::Config;
use lb_proxy::nft::Transaction;
use lb_proxy::nft::netlink::{Netlink, enter_netns};
use lb_proxy::sync::Dataplane;

#[path = "lb-scale/summary.rs"]
mod summary;
#[path = "lb-scale/whole.rs"]
mod whole;

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("lbt-scale-{}-{tag}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success());
        assert!(
            matches!(ok, Ok(true)),
            "cannot create network namespace {name} (need root)"
        );
        Netns(name)
    }
    fn path(&self) -> std::path::PathBuf {
        std::path::PathBuf::from(format!("/run/netns/{}", self.0))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn nft_file(ns: &Netns, text: &str) -> Duration {
    let path = std::env::temp_dir().join(format!("{}.nft", ns.0));
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .expect("write nft file");
    let started = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "nft", "-f"])
        .arg(&path)
        .output()
        .expect("run nft");
    let took = started.elapsed();
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "nft -f failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// kube-proxy's (nftables mode, before 1.36) layout: a chain per Service with a
/// `numgen … vmap` over per-endpoint chains that DNAT.
fn kube_proxy_like(services: u32, endpoints: u32) -> String {
    let mut s = String::from(
        "add table ip kp\nadd chain ip kp nat-prerouting { type nat hook prerouting priority -100; }\nadd chain ip kp services\nadd rule ip kp nat-prerouting jump services\nadd map ip kp service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }\nadd rule ip kp services ip daddr . meta l4proto . th dport vmap @service-ips\n",
    );
    for i in 0..services {
        let e = service_entry(i, endpoints, 0);
        let svc = format!("service-{i}");
        s.push_str(&format!("add chain ip kp {svc}\n"));
        let mut vmap = Vec::new();
        for (j, ep) in e.endpoints.iter().enumerate() {
            let ch = format!("endpoint-{i}-{j}");
            s.push_str(&format!("add chain ip kp {ch}\nadd rule ip kp {ch} ip saddr {ip} meta mark set meta mark | 0x4000\nadd rule ip kp {ch} meta l4proto tcp dnat to {ip}:8080\n", ip = ep.ip()));
            vmap.push(format!("{j} : goto {ch}"));
        }
        s.push_str(&format!(
            "add rule ip kp {svc} numgen random mod {} vmap {{ {} }}\n",
            endpoints,
            vmap.join(", ")
        ));
        s.push_str(&format!(
            "add element ip kp service-ips {{ {} . tcp . 80 : goto {svc} }}\n",
            e.port.cluster_ips()[0]
        ));
    }
    s
}

/// A full sync of `services` x `endpoints` into a fresh namespace through the daemon's sync
/// path (store snapshot, compile, one netlink batch), one-endpoint changes on top, and the
/// same ruleset loaded with `nft -f` for comparison.
fn full(services: u32, endpoints: u32) {
    println!("\n## {services} Services x {endpoints} endpoints");
    one_change_at(services, endpoints, true);
}

/// Loads `services` x `endpoints` through the sync path, then changes one endpoint of a
/// different Service each round and syncs incrementally, as the daemon does.
fn one_change_at(services: u32, endpoints: u32, compare_nft: bool) {
    let ns = Netns::new("change");
    let path = ns.path();
    let (load, times, ruleset) = std::thread::scope(|s| {
        s.spawn(move || {
            enter_netns(&path).expect("enter netns");
            let mut store = store(services, endpoints);
            let config = Config {
                cluster_cidrs: vec!["10.128.0.0/9".parse().expect("literal")],
                ..Config::default()
            };
            let mut dp = Dataplane::new(Netlink::new().expect("netlink socket"), config);
            let t = Instant::now();
            let full = dp.full_sync(&store).expect("full sync");
            let load = (t.elapsed(), full);
            let mut times = Vec::new();
            for round in 1..=21u32 {
                let i = round * 37 % services;
                let t = Instant::now();
                store.apply_slice(slice_key(i), Some(slice(i, endpoints, round)));
                let r = dp.sync(&mut store).expect("incremental sync");
                times.push((t.elapsed(), r));
            }
            let ruleset = compare_nft.then(|| dp.ruleset());
            (load, times, ruleset)
        })
        .join()
        .expect("netns thread")
    });
    println!(
        "FULL SYNC {services} x {endpoints} (snapshot + compile + netlink apply, fresh namespace): {} (compute {} + apply {} + commit {}, {} elements)",
        ms(load.0),
        ms(load.1.compute),
        ms(load.1.apply),
        ms(load.1.commit),
        load.1.elements
    );
    let mut totals: Vec<Duration> = times.iter().map(|(t, _)| *t).collect();
    totals.sort();
    let (_, r) = &times[times.len() / 2];
    summary::note(
        summary::Row::OneChange,
        format!(
            "{services} Services: median {} (p90 {})",
            ms(totals[totals.len() / 2]),
            ms(totals[totals.len() * 9 / 10])
        ),
    );
    println!(
        "one endpoint change with {services} Services loaded, store update + sync, median of {}: {} (p90 {}; e.g. compute {} + kernel {}, {} elements)",
        totals.len(),
        ms(totals[totals.len() / 2]),
        ms(totals[totals.len() * 9 / 10]),
        ms(r.compute),
        ms(r.apply),
        r.elements
    );
    if let Some(rs) = ruleset {
        let text = Transaction::create(&rs).to_nft();
        let ns2 = Netns::new("nft");
        let nft_t = nft_file(&ns2, &text);
        println!(
            "nft -f of the same ruleset (fresh namespace): {}  (the sync path is {:.1}x faster)",
            ms(nft_t),
            nft_t.as_secs_f64() / load.0.as_secs_f64()
        );
    }
}

fn main() {
    // Namespaces and scratch directories are all `lbt-scale-<pid>-*`: an interrupted run
    // takes them down, with the processes in them (a daemon under test).
    lb_e2e::take_down_on_signal(&format!("scale-{}", std::process::id()));
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    println!(
        "# lb-scale (kernel {})",
        String::from_utf8_lossy(&kernel).trim()
    );
    let number = |flag: &str, k: usize, default: u32| -> u32 {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + k))
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    if args.iter().any(|a| a == "--in-process") {
        // Child of `whole::in_process_rss`: one full sync, then this process's memory.
        let (n, m) = (
            number("--in-process", 1, 50_000),
            number("--in-process", 2, 10),
        );
        one_change_at(n, m, false);
        println!(
            "IN-PROCESS {n} x {m}: RSS {:.0} MiB after the syncs, peak {:.0} MiB",
            whole::status_mib("self", "VmRSS"),
            whole::status_mib("self", "VmHWM")
        );
        return;
    }
    // Single measurements of whole processes (see `whole`), for profiling and iterating.
    if args.iter().any(|a| a == "--memory") {
        whole::memory_breakdown(number("--memory", 1, 10_000), number("--memory", 2, 10));
        return;
    }
    if args.iter().any(|a| a == "--daemon") {
        let (n, m) = (number("--daemon", 1, 10_000), number("--daemon", 2, 10));
        let rounds = number("--daemon", 4, 3) as usize;
        whole::daemon(n, m, number("--daemon", 3, 1_000), rounds);
        return;
    }
    if args.iter().any(|a| a == "--once") {
        whole::run_once_vs_nft(number("--once", 1, 10_000), number("--once", 2, 10), 3);
        return;
    }
    if args.iter().any(|a| a == "--dumps") {
        whole::dumps(number("--dumps", 1, 50_000), number("--dumps", 2, 10));
        return;
    }
    if args.iter().any(|a| a == "--read") {
        // Manifest reading alone, in this process (no root needed).
        whole::read_throughput(number("--read", 1, 10_000), number("--read", 2, 10), 3);
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--write-yaml") {
        // The `--once` input, kept for profiling `lb-proxy run --once -f DIR` by hand.
        let dir = std::path::PathBuf::from(args.get(i + 1).expect("--write-yaml DIR [N M]"));
        std::fs::create_dir_all(&dir).expect("create the YAML directory");
        let (files, bytes) = whole::write_yaml_files(
            &dir,
            number("--write-yaml", 2, 10_000),
            number("--write-yaml", 3, 10),
        );
        println!("wrote {files} files, {bytes} bytes to {}", dir.display());
        return;
    }
    if args.iter().any(|a| a == "--affinity") {
        whole::affinity_hits();
        return;
    }
    if quick {
        full(1_000, 10);
        whole::memory_breakdown(1_000, 10);
        whole::daemon(1_000, 10, 100, 1);
        whole::run_once_vs_nft(1_000, 10, 1);
        whole::read_throughput(1_000, 10, 1);
        whole::dumps(5_000, 10);
        whole::in_process_rss(5_000, 10);
        println!("\n(--quick: smaller clusters than the rows name; a smoke run, not figures)");
        summary::print();
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--sync-only") {
        // One full sync of N x M and one-endpoint changes, without the `nft -f` comparison
        // (for before/after comparisons of the netlink backend).
        let n: u32 = args
            .get(i + 1)
            .and_then(|a| a.parse().ok())
            .unwrap_or(10_000);
        let m: u32 = args.get(i + 2).and_then(|a| a.parse().ok()).unwrap_or(10);
        println!("\n## {n} Services x {m} endpoints");
        one_change_at(n, m, false);
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--compute-only") {
        // Compute of a full sync without the kernel (for profiling): store → transaction.
        let n: u32 = args
            .get(i + 1)
            .and_then(|a| a.parse().ok())
            .unwrap_or(10_000);
        let m: u32 = args.get(i + 2).and_then(|a| a.parse().ok()).unwrap_or(10);
        let store = store(n, m);
        for _ in 0..3 {
            let mut dp = Dataplane::new(lb_proxy::nft::fake::Fake::default(), Config::default());
            let t = Instant::now();
            let r = dp.full_sync(&store).expect("fake full sync");
            println!(
                "compute {} (fake apply {}), {} elements, total {}",
                ms(r.compute),
                ms(r.apply),
                r.elements,
                ms(t.elapsed())
            );
        }
        return;
    }
    full(10_000, 10);
    full(5_000, 50);
    println!("\n## one endpoint change at 50,000 Services (a child process, for its RSS)");
    whole::in_process_rss(50_000, 10);
    whole::memory_breakdown(10_000, 10);
    whole::daemon(10_000, 10, 1_000, 3);
    whole::run_once_vs_nft(10_000, 10, 3);
    whole::read_throughput(10_000, 10, 3);
    whole::dumps(50_000, 10);
    whole::affinity_hits();
    let (n, m) = (2_000, 10);
    println!("\n## kube-proxy-like layout (chain per Service and per endpoint), {n} x {m}, nft -f");
    let ns = Netns::new("kp");
    let t = nft_file(&ns, &kube_proxy_like(n, m));
    println!("nft -f: {}", ms(t));
    summary::print();
}
