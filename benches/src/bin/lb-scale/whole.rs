//! Measures of whole processes, as a user sees them: the daemon against the API server
//! emulator, `lb-proxy run --once` against `nft -f` of the same ruleset, cluster dumps of
//! 50,000 Services, and the in-process memory breakdown.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lb_benches::cluster;
use lb_e2e::apiserver::{ApiServer, Kind, ListProtocol};

use super::summary::{self, Row};
use super::{Netns, ms};

/// `lb-proxy`, built beside this binary (`scripts/scale-bench` builds both).
fn lb_proxy() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    exe.with_file_name("lb-proxy")
}

/// A scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("lbt-scale-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A field of `/proc/PID/status` in MiB (`VmRSS`, `VmHWM`).
pub fn status_mib(pid: &str, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Runs `program args…` in `ns` under `/usr/bin/time`: wall time, peak RSS in MiB, success,
/// and the last line of its standard error.
fn timed(ns: &Netns, program: &Path, args: &[&str]) -> (Duration, f64, bool, String) {
    let out_file = std::env::temp_dir().join(format!("{}.time", ns.0));
    let started = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "/usr/bin/time", "-f", "%M", "-o"])
        .arg(&out_file)
        .arg(program)
        .args(args)
        .output()
        .expect("run /usr/bin/time");
    let took = started.elapsed();
    let kib = std::fs::read_to_string(&out_file)
        .ok()
        .and_then(|s| s.lines().last().and_then(|l| l.trim().parse::<f64>().ok()))
        .unwrap_or(f64::NAN);
    let _ = std::fs::remove_file(&out_file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or("").to_string();
    (took, kib / 1024.0, out.status.success(), last)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn node_args() -> [&'static str; 4] {
    ["--node", cluster::NODE, "--cluster-cidr", "10.128.0.0/9"]
}

/// Writes the cluster as multi-document YAML files of at most 1,000 documents each; returns
/// how many files and their total size in bytes.
pub fn write_yaml_files(dir: &Path, n: u32, m: u32) -> (usize, usize) {
    let objects: Vec<_> = cluster::objects(n, m).collect();
    let mut total = 0;
    let mut files = 0;
    for (i, chunk) in objects.chunks(1000).enumerate() {
        let text = cluster::yaml_stream(chunk.iter().cloned());
        total += text.len();
        files += 1;
        std::fs::write(dir.join(format!("part-{i:03}.yaml")), text).expect("write manifest");
    }
    (files, total)
}

/// One daemon run's figures.
#[derive(Debug, Clone, Copy)]
struct DaemonRun {
    /// Start → the first full sync applied.
    ready: Duration,
    /// RSS 1 s after the first sync, and 15 s after it.
    after_first: f64,
    steady: f64,
    /// RSS 3 s after the changes were sent, and 15 s after.
    after_changes: f64,
    steady_changes: f64,
    /// Peak RSS of the whole run.
    peak: f64,
    /// How long sending the changes took.
    sent_in: Duration,
    /// Requests the API server answered for the daemon's first lists (pages or streams).
    list_requests: usize,
}

/// `lb-proxy daemon` against the emulator holding `n` × `m`, with streaming lists (the
/// default) and with paginated lists (`--feature-gates=WatchListClient=false`), alternating,
/// `rounds` times each: start → all Services programmed, RSS after the first sync and once
/// settled, then after `changes` one-endpoint changes. Prints each run, then the medians.
pub fn daemon(n: u32, m: u32, changes: u32, rounds: usize) {
    println!("\n## lb-proxy daemon against the API server emulator, {n} Services x {m} endpoints");
    let ns = Netns::new("daemon");
    // The emulator listens on the namespace's loopback, which starts down.
    let lo_up = Command::new("ip")
        .args(["-n", &ns.0, "link", "set", "lo", "up"])
        .status()
        .map(|s| s.success());
    assert!(matches!(lo_up, Ok(true)), "cannot bring up lo in {}", ns.0);
    let path = ns.path();
    let listener = std::thread::spawn(move || {
        lb_proxy::nft::netlink::enter_netns(&path).expect("enter netns");
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind in the namespace")
    })
    .join()
    .expect("bind thread");
    let api = ApiServer::start(listener);
    api.apply(Kind::Node, cluster::node());
    for i in 0..n {
        api.apply(Kind::Service, cluster::service(i));
        api.apply(Kind::EndpointSlice, cluster::endpoint_slice(i, m, 0));
    }
    let scratch = Scratch::new("daemon");
    let kubeconfig = scratch.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("write kubeconfig");

    let protocols = [
        ("streaming lists", ListProtocol::Streaming),
        ("paginated lists", ListProtocol::Paginated),
    ];
    let mut runs: Vec<(usize, DaemonRun)> = Vec::new();
    for round in 0..rounds {
        for (p, (name, protocol)) in protocols.iter().enumerate() {
            // Every run starts from an empty ruleset, as a first start does.
            let _ = Command::new("ip")
                .args(["netns", "exec", &ns.0, "nft", "flush", "ruleset"])
                .status();
            let run = daemon_run(&ns, &api, &kubeconfig, n, m, changes, *protocol);
            println!(
                "DAEMON {name} (round {}): start -> all {n} Services programmed {}; {} list requests; RSS after the first sync {:.0} MiB, 15 s later {:.0} MiB; after {changes} endpoint changes (sent in {}) {:.0} MiB, 15 s later {:.0} MiB; peak {:.0} MiB",
                round + 1,
                ms(run.ready),
                run.list_requests,
                run.after_first,
                run.steady,
                ms(run.sent_in),
                run.after_changes,
                run.steady_changes,
                run.peak,
            );
            runs.push((p, run));
        }
    }
    println!(
        "\n| daemon, {n} x {m}, median of {rounds} | start -> programmed | list requests | RSS after first sync | steady | after {changes} changes | peak |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (p, (name, _)) in protocols.iter().enumerate() {
        let mine: Vec<DaemonRun> = runs
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, r)| *r)
            .collect();
        let med = |f: fn(&DaemonRun) -> f64| median(mine.iter().map(f).collect());
        summary::note(
            Row::DaemonSteady,
            format!(
                "{name}: {:.0} MiB ({:.0} MiB after {changes} changes, peak {:.0} MiB)",
                med(|r| r.steady),
                med(|r| r.steady_changes),
                med(|r| r.peak)
            ),
        );
        summary::note(
            Row::DaemonStart,
            format!(
                "{name}: {:.2} s (median of {rounds})",
                med(|r| r.ready.as_secs_f64())
            ),
        );
        println!(
            "| {name} | {:.0} ms | {:.0} | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.0} MiB |",
            med(|r| r.ready.as_secs_f64() * 1000.0),
            med(|r| r.list_requests as f64),
            med(|r| r.after_first),
            med(|r| r.steady),
            med(|r| r.steady_changes),
            med(|r| r.peak),
        );
    }
}

/// One `lb-proxy daemon` run in `ns` against `api`, its first lists made with `protocol`
/// (checked against the emulator's record).
fn daemon_run(
    ns: &Netns,
    api: &ApiServer,
    kubeconfig: &Path,
    n: u32,
    m: u32,
    changes: u32,
    protocol: ListProtocol,
) -> DaemonRun {
    let (lists_before, requests_before) = (api.initial_lists().len(), api.requests().len());
    let started = Instant::now();
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &ns.0])
        .arg(lb_proxy())
        .arg("daemon")
        .args(node_args())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
        .args(["--min-sync-period", "0"]);
    if protocol == ListProtocol::Paginated {
        command.arg("--feature-gates=WatchListClient=false");
    }
    let mut child = command
        .env("RUST_LOG", "warn,lb_proxy::reconcile=debug")
        .env("NO_COLOR", "1")
        // jemalloc's own statistics, printed when the daemon exits.
        .env(
            "_RJEM_MALLOC_CONF",
            "stats_print:true,stats_print_opts:gmdablxe",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lb-proxy daemon");
    let pid = child.id().to_string();
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut echoed = 0;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if echoed < 5 && (line.contains("ERROR") || line.contains("lb-proxy:")) {
                eprintln!("[daemon] {line}");
                echoed += 1;
            }
            let _ = tx.send(line);
        }
    });
    let mut ready = None;
    while ready.is_none() {
        match rx.recv_timeout(Duration::from_secs(180)) {
            Ok(line) if line.contains("full sync") => ready = Some(started.elapsed()),
            Ok(_) => {}
            Err(e) => panic!("the daemon did not program the node: {e}"),
        }
    }
    let ready = ready.unwrap_or_default();
    let lists = api.initial_lists().split_off(lists_before);
    assert!(
        !lists.is_empty() && lists.iter().all(|(_, p)| *p == protocol),
        "the daemon's lists were not all {protocol:?}: {lists:?}"
    );
    let list_requests = api.requests()[requests_before..]
        .iter()
        .filter(|r| !r.contains("watch=true") || r.contains("sendInitialEvents=true"))
        .count();
    std::thread::sleep(Duration::from_secs(1));
    let after_first = status_mib(&pid, "VmRSS");
    std::thread::sleep(Duration::from_secs(14));
    let steady = status_mib(&pid, "VmRSS");
    let t = Instant::now();
    for c in 0..changes {
        let i = (c * 7919) % n;
        api.apply(Kind::EndpointSlice, cluster::endpoint_slice(i, m, c + 1));
        std::thread::sleep(Duration::from_millis(2));
    }
    let sent_in = t.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let after_changes = status_mib(&pid, "VmRSS");
    std::thread::sleep(Duration::from_secs(12));
    let steady_changes = status_mib(&pid, "VmRSS");
    let peak = status_mib(&pid, "VmHWM");
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let _ = child.wait();
    DaemonRun {
        ready,
        after_first,
        steady,
        after_changes,
        steady_changes,
        peak,
        sent_in,
        list_requests,
    }
}

/// `run --once` (whole process) against `nft -f` of the very same ruleset, alternating, in
/// fresh namespaces; plus how fast the manifests are read (`render`: read + compile + print).
pub fn run_once_vs_nft(n: u32, m: u32, rounds: usize) {
    println!("\n## lb-proxy run --once vs nft -f, {n} Services x {m} endpoints, {rounds} rounds");
    let scratch = Scratch::new("once");
    let yaml_dir = scratch.0.join("yaml");
    std::fs::create_dir_all(&yaml_dir).expect("yaml dir");
    let (yaml_files, yaml_bytes) = write_yaml_files(&yaml_dir, n, m);
    let json_file = scratch.0.join("cluster.json");
    let json = cluster::json_list(n, m);
    std::fs::write(&json_file, &json).expect("write JSON list");
    let ruleset = scratch.0.join("ruleset.nft");
    let yaml_arg = yaml_dir.to_string_lossy().into_owned();
    let json_arg = json_file.to_string_lossy().into_owned();
    let render = Command::new(lb_proxy())
        .arg("render")
        .args(node_args())
        .args(["-f", &yaml_arg])
        .output()
        .expect("run lb-proxy render");
    assert!(
        render.status.success(),
        "render failed: {}",
        String::from_utf8_lossy(&render.stderr)
    );
    std::fs::write(&ruleset, &render.stdout).expect("write ruleset");
    let ruleset_arg = ruleset.to_string_lossy().into_owned();

    let (mut once_t, mut once_rss, mut nft_t, mut nft_rss) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let ns = Netns::new("once");
        let mut args = vec!["run", "--once"];
        args.extend(node_args());
        args.extend(["-f", &yaml_arg]);
        let (t, rss, ok, last) = timed(&ns, &lb_proxy(), &args);
        assert!(ok, "run --once failed: {last}");
        let programmed = service_ip_elements(&ns);
        assert_eq!(
            programmed, n as usize,
            "run --once programmed {programmed} of {n} Service IPs"
        );
        once_t.push(t.as_secs_f64());
        once_rss.push(rss);
        drop(ns);
        let ns = Netns::new("nft");
        let (t, rss, ok, last) = timed(&ns, Path::new("nft"), &["-f", &ruleset_arg]);
        assert!(ok, "nft -f failed: {last}");
        nft_t.push(t.as_secs_f64());
        nft_rss.push(rss);
    }
    let (once, nft) = (median(once_t), median(nft_t));
    let (once_rss, nft_rss) = (median(once_rss), median(nft_rss));
    println!(
        "RUN --ONCE whole process (YAML, {} files, {:.1} MB): median {:.2} s, peak RSS {:.0} MiB",
        yaml_files,
        yaml_bytes as f64 / 1e6,
        once,
        once_rss
    );
    println!(
        "NFT -F of the same ruleset: median {:.2} s, peak RSS {:.0} MiB  -> run --once is {:.2}x {}",
        nft,
        nft_rss,
        if once <= nft { nft / once } else { once / nft },
        if once <= nft { "faster" } else { "slower" }
    );
    summary::note(
        Row::OnceVsNft,
        format!(
            "{once:.2} s vs {nft:.2} s: {:.2}x {} (median of {rounds}, alternating)",
            if once <= nft { nft / once } else { once / nft },
            if once <= nft { "faster" } else { "slower" }
        ),
    );
    summary::note(
        Row::OncePeak,
        format!("{once_rss:.0} MiB (nft -f: {nft_rss:.0} MiB)"),
    );
    for (what, arg, bytes) in [
        ("YAML", &yaml_arg, yaml_bytes),
        ("JSON List", &json_arg, json.len()),
    ] {
        let t = Instant::now();
        let out = Command::new(lb_proxy())
            .arg("render")
            .args(node_args())
            .args(["-f", arg])
            .stdout(Stdio::null())
            .output()
            .expect("run lb-proxy render");
        let took = t.elapsed().as_secs_f64();
        println!(
            "READ {what} ({:.1} MB) via render (read + compile + print): {:.2} s = {:.0} MB/s{}",
            bytes as f64 / 1e6,
            took,
            bytes as f64 / 1e6 / took,
            if out.status.success() {
                ""
            } else {
                " (FAILED)"
            }
        );
    }
}

/// Counts the elements of map `service-ips` in `ns` (one per ClusterIP port).
fn service_ip_elements(ns: &Netns) -> usize {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            "nft",
            "-j",
            "list",
            "map",
            "ip",
            "lb-proxy",
            "service-ips",
        ])
        .output()
        .expect("run nft");
    String::from_utf8_lossy(&out.stdout)
        .matches("\"goto\"")
        .count()
}

/// Cluster dumps of `n` × `m` as one JSON `List`, one YAML `List` and one multi-document
/// YAML file, each through `run --once` into a fresh namespace.
pub fn dumps(n: u32, m: u32) {
    println!("\n## {n} Services x {m} endpoints as one file, lb-proxy run --once");
    let scratch = Scratch::new("dumps");
    let files = [
        ("JSON List", "list.json", cluster::json_list(n, m)),
        ("YAML List", "list.yaml", cluster::yaml_list(n, m)),
        (
            "multi-document YAML",
            "stream.yaml",
            cluster::yaml_stream(cluster::objects(n, m)),
        ),
    ];
    for (what, name, text) in files {
        let path = scratch.0.join(name);
        std::fs::write(&path, &text).expect("write dump");
        drop(text);
        let ns = Netns::new("dump");
        let file = path.to_string_lossy().into_owned();
        let mut args = vec!["run", "--once"];
        args.extend(node_args());
        args.extend(["-f", &file]);
        let (t, rss, ok, last) = timed(&ns, &lb_proxy(), &args);
        let programmed = service_ip_elements(&ns);
        summary::note(
            Row::Dumps,
            format!(
                "{what}: {} in {:.1} s, peak {rss:.0} MiB",
                if ok && programmed as u32 == n {
                    "read and programmed"
                } else {
                    "NOT fully programmed"
                },
                t.as_secs_f64()
            ),
        );
        println!(
            "DUMP {what} ({:.0} MB): {} in {:.2} s, peak RSS {rss:.0} MiB, {programmed} of {n} Service IPs programmed{}",
            std::fs::metadata(&path).map_or(0.0, |md| md.len() as f64 / 1e6),
            if ok && programmed as u32 == n {
                "read and programmed"
            } else {
                "NOT fully programmed"
            },
            t.as_secs_f64(),
            if ok {
                String::new()
            } else {
                format!(" ({last})")
            }
        );
        let _ = std::fs::remove_file(&path);
    }
}

/// How fast manifests are read, in this process (no root needed): the cluster of `n` × `m` as
/// a multi-document YAML stream, a YAML `List` and a `kubectl get -o json` `List`, each read
/// whole by `Objects::add_text` (parse and type every object), median of `rounds`.
pub fn read_throughput(n: u32, m: u32, rounds: usize) {
    println!("\n## reading manifests in process, {n} Services x {m} endpoints, median of {rounds}");
    let inputs = [
        ("YAML stream", cluster::yaml_stream(cluster::objects(n, m))),
        ("YAML List", cluster::yaml_list(n, m)),
        ("JSON List", cluster::json_list(n, m)),
    ];
    for (what, text) in inputs {
        let mut times = Vec::with_capacity(rounds);
        let mut cpu = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let c = cpu_seconds();
            let t = Instant::now();
            let mut objects = lb_proxy::manifests::Objects::default();
            let mut errors = Vec::new();
            objects.add_text(what, &text, &mut errors);
            times.push(t.elapsed().as_secs_f64());
            cpu.push(cpu_seconds() - c);
            assert!(errors.is_empty(), "{what}: {:?}", errors.first());
            assert_eq!(
                objects.services.len(),
                n as usize,
                "{what}: every Service read"
            );
        }
        let (took, cpu) = (median(times), median(cpu));
        let mb = text.len() as f64 / 1e6;
        summary::note(
            Row::Read,
            format!("{what} {:.0} MB/s (median of {rounds})", mb / took),
        );
        println!(
            "READ {what} ({mb:.1} MB) in process: median {took:.2} s = {:.0} MB/s (CPU {cpu:.2} s = {:.0} MB per CPU-second, so less sensitive to other load)",
            mb / took,
            mb / cpu
        );
    }
}

/// CPU time of this process so far (user + system), from `/proc/self/stat`, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime and stime are the 12th
    // and 13th, in clock ticks of 1/100 s on Linux.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: f64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

/// Where the memory of a synced dataplane goes, measured with jemalloc's own counters in
/// this process: the store (model values), the compiler's applied state, a `ruleset()` copy.
pub fn memory_breakdown(n: u32, m: u32) {
    use tikv_jemalloc_ctl::{epoch, stats};
    println!(
        "\n## where the memory goes, {n} Services x {m} endpoints (jemalloc counters, in process)"
    );
    let allocated = || {
        let _ = epoch::advance();
        stats::allocated::read().unwrap_or(0)
    };
    let resident = || {
        let _ = epoch::advance();
        stats::resident::read().unwrap_or(0)
    };
    let ns = Netns::new("memory");
    let path = ns.path();
    std::thread::scope(|s| {
        s.spawn(move || {
            lb_proxy::nft::netlink::enter_netns(&path).expect("enter netns");
            let base = allocated();
            let store = lb_benches::store(n, m);
            let with_store = allocated();
            println!("MEMORY store (model values, slices merged per Service): {}", mib(with_store - base));
            let config = lb_proxy::compile::Config {
                cluster_cidrs: vec!["10.128.0.0/9".parse().expect("literal")],
                ..lb_proxy::compile::Config::default()
            };
            let mut dp = lb_proxy::sync::Dataplane::new(
                lb_proxy::nft::netlink::Netlink::new().expect("netlink socket"),
                config,
            );
            dp.full_sync(&store).expect("full sync");
            let with_dp = allocated();
            println!(
                "MEMORY dataplane after the full sync (compiler's applied state; transaction freed): {}",
                mib(with_dp - with_store)
            );
            let rs = dp.ruleset();
            println!(
                "MEMORY one ruleset() copy (the whole IR, e.g. for explain or render): {}",
                mib(allocated() - with_dp)
            );
            drop(rs);
            println!(
                "MEMORY heap in use {} vs resident {} (allocator retention and metadata: {})",
                mib(allocated()),
                mib(resident()),
                mib(resident().saturating_sub(allocated()))
            );
            drop(dp);
            drop(store);
        });
    });
}

/// In a child process, so its peak RSS is its own: a full sync of `n` × `m` through the sync
/// path (store, compile, one netlink batch) and the process's RSS.
pub fn in_process_rss(n: u32, m: u32) {
    let exe = std::env::current_exe().expect("own path");
    let out = Command::new(exe)
        .args(["--in-process", &n.to_string(), &m.to_string()])
        .output()
        .expect("run lb-scale --in-process");
    let out = String::from_utf8_lossy(&out.stdout);
    print!("{out}");
    note_sync_lines(&out);
}

/// Notes the full-sync, one-change and RSS lines of a section's output in the summary.
pub fn note_sync_lines(out: &str) {
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("one endpoint change with ") {
            // "N Services loaded, …, median of 21: 0.1 ms (p90 0.2 ms; …)"
            let services = rest.split(' ').next().unwrap_or("?");
            let figure = rest.split(": ").nth(1).unwrap_or(rest);
            let figure = figure.split(';').next().unwrap_or(figure);
            summary::note(
                Row::OneChange,
                format!("{services} Services: median {figure})"),
            );
        } else if line.starts_with("FULL SYNC 50000") {
            summary::note(Row::Full50k, line.trim_start_matches("FULL SYNC "));
        } else if let Some(rest) = line.strip_prefix("IN-PROCESS 50000") {
            summary::note(Row::Full50k, format!("50000{rest}"));
        }
    }
}

/// lb-core's affinity table in the shape: 1M remembered clients, 2 threads hitting
/// uniformly random ones; the mean time of one hit per thread, picked one at a time and in
/// batches (`FlatAffinityTable::pick_batch`) of 32 and of 256 connections. Then, for
/// reference, the same two threads doing nothing but random reads in an array the size of the
/// table: independent reads (the CPU overlaps their misses) and dependent ones (each address
/// comes from the previous read, so every read waits for its miss) — the floor and the
/// ceiling of a lookup whose entry is not in the caches. Last, all of it again in a child
/// process on transparent huge pages.
///
/// Each line gives the wall time (what the target is about) and, where Linux reports
/// it, the CPU time the thread itself ran, which does not grow when other processes share the
/// cores.
pub fn affinity_hits() {
    use lb_core::affinity::{FlatAffinityTable, NewConnection, Outcome};
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    const CLIENTS: u32 = 1_000_000;
    const HITS: u64 = 4_000_000;
    /// Connections per `pick_batch` call: a modest `epoll_wait` burst, and a large one.
    const BATCHES: [usize; 2] = [32, 256];
    println!("\n## lb-core FlatAffinityTable, {CLIENTS} clients, 2 threads, uniformly random hits");
    let table: FlatAffinityTable<u32, SocketAddr> = FlatAffinityTable::new();
    let eps: Vec<SocketAddr> = (0..10u8)
        .map(|i| SocketAddr::from(([10, 244, 0, i], 8080)))
        .collect();
    let t0 = Instant::now();
    let conn = |client: u32, random: u64| NewConnection {
        service: &7,
        client: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | client)),
        now: t0,
        timeout: Duration::from_secs(10_800),
        random,
    };
    for i in 0..CLIENTS {
        table.pick(
            conn(i, u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            &eps,
        );
    }
    let per_hit = on_two_threads(HITS, |r| {
        let client = (((r >> 32) * u64::from(CLIENTS)) >> 32) as u32;
        let p = table.pick(conn(client, r), &eps);
        assert_eq!(
            p.map(|p| p.outcome),
            Some(Outcome::Hit),
            "every pick of a remembered client hits"
        );
    });
    println!(
        "AFFINITY hit, 1M clients, 2 threads: {} per hit (slowest thread)",
        per_hit.show()
    );
    let mut batches = Vec::new();
    for batch in BATCHES {
        let per_hit = on_two_threads_batched(HITS, batch, |randoms, conns, out| {
            conns.clear();
            conns.extend(randoms.iter().map(|&r| {
                let client = (((r >> 32) * u64::from(CLIENTS)) >> 32) as u32;
                conn(client, r)
            }));
            table.pick_batch(conns, &eps, out);
            assert!(
                out.iter()
                    .all(|p| p.as_ref().map(|p| p.outcome) == Some(Outcome::Hit)),
                "every pick of a remembered client hits"
            );
        });
        println!(
            "AFFINITY hit, batches of {batch}, 1M clients, 2 threads: {} per hit (slowest thread)",
            per_hit.show()
        );
        batches.push(format!("batches of {batch}: {}", per_hit.show()));
    }
    summary::note(
        Row::Affinity,
        format!("one at a time {}; {}", per_hit.show(), batches.join("; ")),
    );
    drop(table);

    // The table's slot array at 1M clients: 2^21 slots of 64 bytes (at most 3/4 full).
    let data: Vec<u64> = {
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        (0..(128usize << 20) / 8)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            })
            .collect()
    };
    let index = |r: u64| (((r >> 32) * data.len() as u64) >> 32) as usize;
    let independent = on_two_threads(HITS, |r| {
        std::hint::black_box(data[index(r)]);
    });
    println!(
        "AFFINITY reference, random read in 128 MiB, independent: {} per read",
        independent.show()
    );
    let dependent = {
        let data = &data;
        on_two_threads_chained(HITS, move |r, previous| {
            data[index(r ^ ((previous & 1) << 40))]
        })
    };
    println!(
        "AFFINITY reference, random read in 128 MiB, dependent: {} per read",
        dependent.show()
    );
    drop(data);

    // Not the headline: the same lines with the table on transparent huge pages (a child
    // process whose allocator asks for them; this VM gives them only on request), which
    // spares the TLB misses of 4 KiB pages.
    if std::env::var_os(THP_CONF).is_none() {
        let exe = std::env::current_exe().expect("own path");
        match Command::new(exe)
            .arg("--affinity")
            .env(THP_CONF, "thp:always")
            .output()
        {
            Ok(out) => {
                let out = String::from_utf8_lossy(&out.stdout);
                for line in out.lines().filter(|l| l.starts_with("AFFINITY ")) {
                    println!(
                        "{}",
                        line.replacen("AFFINITY ", "AFFINITY (huge pages) ", 1)
                    );
                }
            }
            Err(e) => println!("AFFINITY (huge pages): not measured: {e}"),
        }
    }
}

/// The allocator's configuration variable (jemalloc as built by `tikv-jemallocator`).
const THP_CONF: &str = "_RJEM_MALLOC_CONF";

/// Time per operation on the slowest of two threads: wall clock, and CPU time where known.
struct PerOp {
    wall: Duration,
    cpu: Option<Duration>,
}

impl PerOp {
    fn show(&self) -> String {
        let ns = |d: Duration| d.as_nanos();
        match self.cpu {
            Some(cpu) => format!("{} ns (CPU {} ns)", ns(self.wall), ns(cpu)),
            None => format!("{} ns", ns(self.wall)),
        }
    }
}

/// Runs `op(r)` `n` times on each of two threads with an xorshift64* stream of `r`.
fn on_two_threads(n: u64, op: impl Fn(u64) + Sync) -> PerOp {
    on_two_threads_chained(n, |r, _| {
        op(r);
        0
    })
}

/// Like [`on_two_threads`], feeding each call the previous call's result, so that calls
/// whose next input depends on it cannot overlap.
fn on_two_threads_chained(n: u64, op: impl Fn(u64, u64) -> u64 + Sync) -> PerOp {
    timed_on_two_threads(|t| {
        let mut x = xorshift_seed(t);
        let mut previous = 0;
        for _ in 0..n {
            previous = op(xorshift(&mut x), previous);
        }
        std::hint::black_box(previous);
        n
    })
}

/// Like [`on_two_threads`] for an operation on `batch` random numbers at once (with a
/// connection and a result buffer the operation may reuse); the time is per number.
fn on_two_threads_batched<C, P>(
    n: u64,
    batch: usize,
    op: impl Fn(&[u64], &mut Vec<C>, &mut Vec<P>) + Sync,
) -> PerOp {
    timed_on_two_threads(|t| {
        let mut x = xorshift_seed(t);
        let mut randoms = vec![0; batch];
        let (mut conns, mut out) = (Vec::with_capacity(batch), Vec::new());
        let calls = n / batch as u64;
        for _ in 0..calls {
            for r in randoms.iter_mut() {
                *r = xorshift(&mut x);
            }
            op(&randoms, &mut conns, &mut out);
        }
        calls * batch as u64
    })
}

/// Runs `work(t)` on threads `t` = 0 and 1; `work` returns how many operations it did. The
/// time per operation of the slowest thread: wall clock, and the thread's CPU time.
fn timed_on_two_threads(work: impl Fn(u64) -> u64 + Sync) -> PerOp {
    let per_thread: Vec<PerOp> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2u64)
            .map(|t| {
                let work = &work;
                s.spawn(move || {
                    let (started, cpu_started) = (Instant::now(), thread_cpu_time());
                    let done = work(t).max(1) as u32;
                    let cpu = cpu_started
                        .zip(thread_cpu_time())
                        .map(|(a, b)| b.saturating_sub(a) / done);
                    PerOp {
                        wall: started.elapsed() / done,
                        cpu,
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .collect()
    });
    PerOp {
        wall: per_thread.iter().map(|p| p.wall).max().unwrap_or_default(),
        cpu: per_thread.iter().map(|p| p.cpu).max().flatten(),
    }
}

/// The start of thread `t`'s random stream.
fn xorshift_seed(t: u64) -> u64 {
    0x1234_5678_u64 ^ t << 40
}

/// The next number of an xorshift64* stream: a cheap uniform one.
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// The CPU time the calling thread has run (Linux: the first field of its `schedstat`).
fn thread_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}
