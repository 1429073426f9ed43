//! Issue 10, "nothing lost": a bad, half-written or missing input never removes working
//! Services from the live dataplane, and every skipped or ignored input is said and counted.
//! Real packets through `lb-proxy run` (poll 100 ms, settle 200 ms) in network namespaces.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use lb_e2e::{NODE_YAML, Topology, binary, slice_yaml};

fn service(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: t\nspec:\n  clusterIP: {ip}\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n"
    )
}

/// `web` (10.96.0.10, endpoints b0 and b1) and `api` (10.96.0.11, endpoint b1), in one file.
fn web_file(web_endpoints: &[(usize, &str, bool)]) -> String {
    format!(
        "{}---\n{}---\n{}---\n{}",
        service("web", "10.96.0.10"),
        slice_yaml("web", "IPv4", "http", "TCP", 8080, web_endpoints),
        service("api", "10.96.0.11"),
        slice_yaml("api", "IPv4", "http", "TCP", 8080, &[(1, "node-a", true)]),
    )
}

const BOTH: &[(usize, &str, bool)] = &[(0, "node-a", true), (1, "node-a", true)];

fn setup(extra: &[&str]) -> Topology {
    let mut t = Topology::up(2);
    t.serve_all();
    t.write_manifest("node.yaml", NODE_YAML);
    t.write_manifest("web.yaml", &web_file(BOTH));
    t.start_proxy(extra);
    assert_served(&t, "at start");
    t
}

/// Long enough for lb-proxy to have seen, settled and acted on a change.
fn wait_for_proxy() {
    std::thread::sleep(Duration::from_millis(1200));
}

fn assert_served(t: &Topology, when: &str) {
    for target in ["10.96.0.10:80", "10.96.0.11:80"] {
        for _ in 0..5 {
            if let Err(e) = t.tcp(&t.client, target) {
                panic!("{when}: {target} is not served: {e}");
            }
        }
    }
}

/// Puts `make` (given a path to create) in place of `name` by renaming, atomically.
fn replace_with(t: &Topology, name: &str, make: impl FnOnce(&Path)) {
    let tmp = t.dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    make(&tmp);
    std::fs::rename(&tmp, t.dir.join(name)).expect("rename into place");
}

fn mkfifo(p: &Path) {
    let ok = Command::new("mkfifo").arg(p).status().expect("mkfifo");
    assert!(ok.success());
}

fn lb_proxy(t: &Topology, args: &[&str], dir: &Path) -> Output {
    let mut cmd = t.ns_command(&t.node, &binary("lb-proxy"));
    cmd.args(args)
        .args(["--node", "node-a", "--cluster-cidr", "10.244.0.0/16", "-f"])
        .arg(dir)
        .stdin(Stdio::null());
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lb-proxy");
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().expect("lb-proxy output");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("lb-proxy {args:?} hangs");
}

#[test]
fn issue_10_a_file_that_cannot_be_read_or_parsed_keeps_serving_its_services() {
    let mut t = setup(&[]);
    let good = web_file(BOTH);
    type Make<'a> = Box<dyn Fn(&Path) + 'a>;
    let bad: Vec<(&str, Make<'_>)> = vec![
        (
            "a malformed document appended",
            Box::new(|p: &Path| {
                std::fs::write(p, format!("{good}---\nkind: Service\n  bad: [indent\n"))
                    .expect("write")
            }),
        ),
        (
            "an invalid UTF-8 byte appended",
            Box::new(|p: &Path| {
                std::fs::write(p, [good.as_bytes(), b"\xff\n"].concat()).expect("write")
            }),
        ),
        (
            "a 0-byte truncation",
            Box::new(|p: &Path| std::fs::write(p, "").expect("write")),
        ),
        (
            "a dangling symlink",
            Box::new(|p: &Path| {
                std::os::unix::fs::symlink("/nonexistent/web.yaml", p).expect("symlink")
            }),
        ),
        ("a FIFO", Box::new(|p: &Path| mkfifo(p))),
    ];
    for (what, make) in &bad {
        replace_with(&t, "web.yaml", make);
        wait_for_proxy();
        assert_served(&t, what);
        // The file comes back with a change, which is applied: the loop never froze.
        replace_with(&t, "web.yaml", |p| {
            std::fs::write(p, web_file(&[(0, "node-a", true)])).expect("write")
        });
        t.drain_applied();
        assert!(
            Topology::eventually(Duration::from_secs(5), || t
                .spread(&t.client, "10.96.0.10:80", 6, false)
                .keys()
                .all(|b| b == "b0")),
            "after {what}: the restored file is applied"
        );
        replace_with(&t, "web.yaml", |p| std::fs::write(p, &good).expect("write"));
        assert!(Topology::eventually(Duration::from_secs(5), || t
            .spread(&t.client, "10.96.0.10:80", 8, false)
            .contains_key("b1")));
    }
    // An object that turns invalid keeps its last good version (both endpoints), while the
    // rest of the file is applied (api loses its only endpoint, so it is rejected).
    let invalid = format!(
        "{}---\n{}---\n{}",
        service("web", "10.96.0.10"),
        slice_yaml("web", "IPv4", "http", "TCP", 8080, &[(1, "node-a", true)])
            .replace("addressType: IPv4", "addressType: IPv5"),
        service("api", "10.96.0.11"),
    );
    t.write_manifest("web.yaml", &invalid);
    assert!(
        Topology::eventually(Duration::from_secs(5), || t
            .tcp(&t.client, "10.96.0.11:80")
            .is_err()),
        "the valid part of the file is applied"
    );
    let spread = t.spread(&t.client, "10.96.0.10:80", 20, false);
    assert_eq!(
        spread.keys().cloned().collect::<Vec<_>>(),
        ["b0", "b1"],
        "web's last good slice stays: {spread:?}"
    );
    // An explicit deletion still removes.
    std::fs::remove_file(t.dir.join("web.yaml")).expect("remove");
    assert!(
        Topology::eventually(Duration::from_secs(5), || t
            .tcp(&t.client, "10.96.0.10:80")
            .is_err()),
        "a removed file's Services are gone"
    );
}

#[test]
fn issue_10_a_mistyped_path_exits_non_zero_and_a_vanished_directory_keeps_the_dataplane() {
    let t = setup(&[]);
    let out = lb_proxy(&t, &["run", "--once"], &t.dir.join("clustr"));
    assert!(!out.status.success(), "a missing path fails run --once");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("clustr: No such file or directory"), "{err}");
    assert_served(&t, "after run --once on a mistyped path");
    // The followed directory is renamed away: everything stays.
    let moved = t.dir.with_extension("moved");
    std::fs::rename(&t.dir, &moved).expect("rename the directory away");
    wait_for_proxy();
    let served = std::panic::catch_unwind(|| assert_served(&t, "after the directory vanished"));
    std::fs::rename(&moved, &t.dir).expect("rename the directory back");
    if let Err(e) = served {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn issue_10_a_file_written_in_slow_pieces_is_never_read_half_way() {
    let t = setup(&[]);
    let good = web_file(BOTH);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = t.client.clone();
    let s = stop.clone();
    let prober = std::thread::spawn(move || {
        let (mut ok, mut failed) = (0, Vec::new());
        while !s.load(std::sync::atomic::Ordering::SeqCst) {
            for target in ["10.96.0.10:80", "10.96.0.11:80"] {
                match lb_e2e::tcp_from(&client, target) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(format!("{target}: {e}")),
                }
            }
        }
        (ok, failed)
    });
    use std::io::Write as _;
    for round in 0..4 {
        // As a shell redirection does: truncate, then write in pieces (the first ends at a
        // document boundary, so a reader would see a valid file without api).
        let cut = good
            .find("---\napiVersion: v1\nkind: Service\nmetadata:\n  name: api")
            .expect("api document");
        let mut f = std::fs::File::create(t.dir.join("web.yaml")).expect("truncate");
        std::thread::sleep(Duration::from_millis(120));
        f.write_all(&good.as_bytes()[..cut / 2]).expect("piece");
        f.flush().expect("flush");
        std::thread::sleep(Duration::from_millis(120));
        f.write_all(&good.as_bytes()[cut / 2..cut]).expect("piece");
        std::thread::sleep(Duration::from_millis(120));
        f.write_all(&good.as_bytes()[cut..]).expect("piece");
        drop(f);
        std::thread::sleep(Duration::from_millis(400 + 100 * round));
    }
    wait_for_proxy();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed) = prober.join().expect("prober");
    assert!(ok > 20, "{ok} connections");
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
}

#[test]
fn issue_10_streams_beyond_the_old_parser_budget_are_programmed_whole() {
    let mut t = Topology::up(2);
    t.serve_all();
    t.write_manifest("node.yaml", NODE_YAML);
    // 2,000 documents before web's: more than the old 1,024-document budget.
    let mut big = String::new();
    for i in 0..2000 {
        big.push_str(&service(
            &format!("filler-{i}"),
            &format!("10.97.{}.{}", i / 250, i % 250 + 1),
        ));
        big.push_str("---\n");
    }
    big.push_str(&web_file(BOTH));
    t.write_manifest("web.yaml", &big);
    t.start_proxy(&[]);
    assert_served(&t, "a 2,000-document stream");
}

#[test]
fn issue_10_render_and_run_once_exit_non_zero_on_skipped_inputs_and_never_hang_on_a_fifo() {
    let t = Topology::up(0);
    t.write_manifest("node.yaml", NODE_YAML);
    t.write_manifest("web.yaml", &web_file(BOTH));
    t.write_manifest(
        "bad.yaml",
        &service("bad", "10.96.0.12").replace("port: 80", "port: eighty"),
    );
    let out = lb_proxy(&t, &["render"], &t.dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "render fails on a skipped input");
    assert!(out.stdout.is_empty(), "and prints no ruleset");
    assert!(
        err.contains("bad.yaml: Service t/bad: field spec.ports[0].port: invalid type: string \"eighty\", expected i32"),
        "{err}"
    );
    assert!(err.contains("--keep-going"), "{err}");
    let out = lb_proxy(&t, &["render", "--keep-going"], &t.dir);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.96.0.10"));
    // run --once programs nothing on skipped inputs, the rest with --keep-going.
    let tables = || {
        lb_e2e::must(Command::new("ip").args(["netns", "exec", &t.node, "nft", "list", "tables"]))
    };
    let out = lb_proxy(&t, &["run", "--once"], &t.dir);
    assert!(!out.status.success());
    assert!(!tables().contains("lb-proxy"), "nothing programmed");
    let out = lb_proxy(&t, &["run", "--once", "--keep-going"], &t.dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(tables().contains("lb-proxy"));
    // A FIFO named *.yaml: reported, never opened, so nothing hangs.
    std::fs::remove_file(t.dir.join("bad.yaml")).expect("rm");
    mkfifo(&t.dir.join("pipe.yaml"));
    let out = lb_proxy(&t, &["render"], &t.dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("pipe.yaml: not a regular file (a FIFO)"),
        "{err}"
    );
    // Only unreadable input: never an empty ruleset, even with --keep-going.
    let fifo_only = t.dir.join("only");
    std::fs::create_dir_all(&fifo_only).expect("dir");
    std::fs::write(fifo_only.join("node.yaml"), NODE_YAML).expect("node");
    mkfifo(&fifo_only.join("web.yaml"));
    let out = lb_proxy(&t, &["run", "--once", "--keep-going"], &fifo_only);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to program an empty ruleset"));
}

#[test]
fn issue_10_ignored_and_invalid_inputs_are_logged_once_and_counted_in_metrics() {
    let mut t = Topology::up(1);
    t.serve_all();
    t.write_manifest("node.yaml", NODE_YAML);
    t.write_manifest(
        "a.yaml",
        &format!(
            "{}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: t\n---\n{}---\n{}",
            service("web", "10.96.0.10"),
            slice_yaml("web", "IPv6", "http", "TCP", 8080, &[(0, "node-a", true)]),
            slice_yaml("gone", "IPv4", "http", "TCP", 8080, &[(0, "node-a", true)]),
        ),
    );
    t.write_manifest("b.yaml", &service("web", "10.96.0.10"));
    t.start_proxy(&["--metrics-bind-address", "127.0.0.1:10249"]);
    let metrics = || {
        let out = Command::new("ip")
            .args(["netns", "exec", &t.node])
            .arg(binary("lb-testsrv"))
            .args(["http", "127.0.0.1:10249", "/metrics"])
            .output()
            .expect("GET /metrics");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let expect = |m: &str, lines: &[&str]| {
        for l in lines {
            assert!(m.lines().any(|x| x == *l), "missing {l:?} in:\n{m}");
        }
    };
    let m = metrics();
    expect(
        &m,
        &[
            "lb_proxy_ignored_objects_total{kind=\"Pod\"} 1",
            "lb_proxy_ignored_objects_total{kind=\"Service\"} 1",
            "lb_proxy_ignored_objects_total{kind=\"EndpointSlice\"} 2",
            "lb_proxy_manifest_sources_failing 0",
        ],
    );
    // Another change: the same objects are still ignored, and not counted again. A bad
    // file and an invalid object are counted.
    t.write_manifest(
        "c.yaml",
        &service("api", "10.96.0.11").replace("port: 80", "port: eighty"),
    );
    t.write_manifest("d.yaml", "kind: Service\n  bad: [indent\n");
    wait_for_proxy();
    let m = metrics();
    expect(
        &m,
        &[
            "lb_proxy_ignored_objects_total{kind=\"Pod\"} 1",
            "lb_proxy_ignored_objects_total{kind=\"EndpointSlice\"} 2",
            "lb_proxy_invalid_objects_total{kind=\"Service\"} 1",
            "lb_proxy_manifest_read_errors_total 1",
            "lb_proxy_manifest_sources_failing 1",
        ],
    );
}
