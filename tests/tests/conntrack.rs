//! Conntrack cleanup with real UDP traffic: a client that keeps sending from one source port
//! rides one conntrack entry, so it follows the entry, not the ruleset. `lb-proxy run` deletes
//! the stale entries after each sync (`lb_proxy::conntrack`); with `--no-conntrack-cleanup` the
//! same scenarios show the client stuck.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use lb_e2e::{NODE_YAML, Topology, binary, must, slice_yaml};

const DNS: &str =
    "  clusterIP: 10.96.0.53\n  ports:\n  - name: dns\n    port: 53\n    protocol: UDP\n";
const DNS_NODE_PORT: &str = "  type: NodePort\n  clusterIP: 10.96.0.53\n  ports:\n  - name: dns\n    port: 53\n    nodePort: 30053\n    protocol: UDP\n";
const NO_CLEANUP: &[&str] = &["--no-conntrack-cleanup"];
/// Datagrams (100 ms apart) a client gets to reach its new backend after a change is applied.
const PATIENCE: usize = 30;

fn service(spec: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: dns\n  namespace: t\nspec:\n{spec}")
}

fn dns_slice(backends: &[usize]) -> String {
    let eps: Vec<(usize, &str, bool)> = backends.iter().map(|&i| (i, "node-a", true)).collect();
    slice_yaml("dns", "IPv4", "dns", "UDP", 5353, &eps)
}

fn setup(backends: usize, manifests: &[(&str, String)], proxy_args: &[&str]) -> Topology {
    let mut t = Topology::up(backends);
    t.serve_all();
    t.write_manifest("node.yaml", NODE_YAML);
    for (name, yaml) in manifests {
        t.write_manifest(name, yaml);
    }
    t.start_proxy(proxy_args);
    t
}

/// `lb-testsrv udp-stream` in the client namespace: one datagram every 100 ms, all from the
/// same source port. Killed on drop.
struct Stream {
    child: Child,
    lines: Receiver<String>,
    port: u16,
}

impl Stream {
    fn start(t: &Topology, target: &str) -> Stream {
        let mut cmd = t.ns_command(&t.client, &binary("lb-testsrv"));
        cmd.args(["udp-stream", target, "900", "100"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut s = Stream {
            child,
            lines,
            port: 0,
        };
        let first = s.line();
        s.port = first
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("udp-stream did not report its port: {first:?}"));
        s
    }

    fn line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(5))
            .expect("udp-stream stopped answering")
    }

    /// Who answered the next datagram: a backend name, `TIMEOUT` or `REFUSED`.
    fn next(&self) -> String {
        let line = self.line();
        match line.split_once(' ') {
            Some((_, answer)) => answer.to_string(),
            None => panic!("unexpected udp-stream line {line:?}"),
        }
    }

    /// The next `n` answers.
    fn take(&self, n: usize) -> Vec<String> {
        (0..n).map(|_| self.next()).collect()
    }

    /// Answers up to and including the first that is `want`, at most `limit`.
    fn until(&self, limit: usize, want: &str) -> Vec<String> {
        let mut seen = Vec::new();
        while seen.len() < limit {
            let a = self.next();
            let done = a == want;
            seen.push(a);
            if done {
                break;
            }
        }
        seen
    }

    /// Forgets the answers already queued, so the next ones are to datagrams sent from now on.
    fn skip_queued(&self) {
        loop {
            match self.lines.recv_timeout(Duration::ZERO) {
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return,
                Err(RecvTimeoutError::Disconnected) => panic!("udp-stream exited"),
            }
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The node's UDP conntrack entries from source port `port`: (original destination, reply
/// source) of each.
fn flows(t: &Topology, port: u16) -> Vec<(String, String)> {
    let out = must(Command::new("ip").args([
        "netns",
        "exec",
        &t.node,
        "conntrack",
        "-L",
        "-p",
        "udp",
        "--orig-port-src",
        &port.to_string(),
    ]));
    out.lines()
        .filter_map(|line| {
            let field = |key: &str, nth: usize| {
                line.split_whitespace()
                    .filter_map(|w| w.strip_prefix(key))
                    .nth(nth)
                    .map(str::to_string)
            };
            // `src= dst= sport= dport=` of the original direction, then of the reply.
            Some((field("dst=", 0)?, field("src=", 1)?))
        })
        .collect()
}

fn flow(dst: &str, reply_src: &str) -> Vec<(String, String)> {
    vec![(dst.to_string(), reply_src.to_string())]
}

/// A client streams to `target` from one port and is served by one of two backends, which is
/// then removed from the EndpointSlice. Returns the topology, the stream, the backend that
/// served it (index) and the one that remains.
fn served_then_backend_removed(
    spec: &str,
    target: &str,
    proxy_args: &[&str],
) -> (Topology, Stream, usize, usize) {
    let mut t = setup(
        2,
        &[
            ("svc.yaml", service(spec)),
            ("eps.yaml", dns_slice(&[0, 1])),
        ],
        proxy_args,
    );
    let s = Stream::start(&t, target);
    let first = s.next();
    let gone: usize = match first.as_str() {
        "b0" => 0,
        "b1" => 1,
        other => panic!("first datagram not served: {other}"),
    };
    let kept = 1 - gone;
    assert_eq!(
        s.take(3),
        [first.as_str(); 3],
        "one source port, one flow, one backend"
    );
    let dst = target.rsplit_once(':').expect("ADDR:PORT").0;
    assert_eq!(flows(&t, s.port), flow(dst, &Topology::backend_ip(gone)));
    t.write_manifest("eps.yaml", &dns_slice(&[kept]));
    t.wait_applied();
    s.skip_queued();
    (t, s, gone, kept)
}

fn moves_once_its_backend_leaves(spec: &str, target: &str) {
    let (t, s, gone, kept) = served_then_backend_removed(spec, target, &[]);
    let kept_name = format!("b{kept}");
    let seen = s.until(PATIENCE, &kept_name);
    assert_eq!(
        seen.last(),
        Some(&kept_name),
        "the client stayed on removed backend b{gone}: {seen:?}"
    );
    // Until then it hears from the removed backend; the reply to a datagram in flight when its
    // entry is deleted finds no entry on the way back and is lost (a TIMEOUT).
    let gone_name = format!("b{gone}");
    let lost = seen.iter().filter(|a| *a == "TIMEOUT").count();
    assert!(
        lost <= 2
            && seen
                .iter()
                .all(|a| *a == kept_name || *a == gone_name || *a == "TIMEOUT"),
        "{seen:?}"
    );
    assert_eq!(s.take(5), [kept_name.as_str(); 5], "and stays there");
    let dst = target.rsplit_once(':').expect("ADDR:PORT").0;
    assert_eq!(flows(&t, s.port), flow(dst, &Topology::backend_ip(kept)));
}

#[test]
fn udp_client_moves_to_the_remaining_backend_once_its_backend_leaves() {
    moves_once_its_backend_leaves(DNS, "10.96.0.53:53");
}

#[test]
fn udp_node_port_client_moves_to_the_remaining_backend_once_its_backend_leaves() {
    moves_once_its_backend_leaves(DNS_NODE_PORT, "10.100.0.1:30053");
}

#[test]
fn udp_client_stays_on_a_removed_backend_without_conntrack_cleanup() {
    let (t, s, gone, kept) = served_then_backend_removed(DNS, "10.96.0.53:53", NO_CLEANUP);
    let gone_name = format!("b{gone}");
    assert_eq!(
        s.take(PATIENCE),
        vec![gone_name; PATIENCE],
        "without cleanup the flow keeps its DNAT to the removed backend"
    );
    assert_eq!(
        flows(&t, s.port),
        flow("10.96.0.53", &Topology::backend_ip(gone))
    );
    // The ruleset itself is right: a new source port is served by the remaining backend.
    let (fresh, _) = t.udp(&t.client, "10.96.0.53:53").expect("reply");
    assert_eq!(fresh, format!("b{kept}"));
}

/// The client streams to 10.96.0.53:53 before any Service has that address: the datagrams pass
/// the node un-DNATed (towards its default route, where nothing answers) and conntrack records
/// that. Then the Service appears, with endpoint b0.
fn streaming_before_the_service_exists(proxy_args: &[&str]) -> (Topology, Stream) {
    let mut t = setup(1, &[], proxy_args);
    let s = Stream::start(&t, "10.96.0.53:53");
    assert_eq!(s.take(3), ["TIMEOUT"; 3]);
    assert_eq!(
        flows(&t, s.port),
        flow("10.96.0.53", "10.96.0.53"),
        "an un-DNATed entry"
    );
    t.write_manifest(
        "dns.yaml",
        &format!("{}\n---\n{}", service(DNS), dns_slice(&[0])),
    );
    t.wait_applied();
    s.skip_queued();
    (t, s)
}

#[test]
fn udp_flows_sent_before_their_service_existed_reach_its_first_endpoint() {
    let (t, s) = streaming_before_the_service_exists(&[]);
    let seen = s.until(PATIENCE, "b0");
    assert_eq!(seen.last().map(String::as_str), Some("b0"), "{seen:?}");
    assert_eq!(s.take(5), ["b0"; 5]);
    assert_eq!(
        flows(&t, s.port),
        flow("10.96.0.53", &Topology::backend_ip(0))
    );
}

#[test]
fn udp_flows_sent_before_their_service_existed_stay_unanswered_without_conntrack_cleanup() {
    let (t, s) = streaming_before_the_service_exists(NO_CLEANUP);
    // The stale entry keeps the flow un-DNATed: no datagram reaches a backend. (Each is
    // unanswered, or refused by the reject for ports a cluster IP's Service does not have —
    // the flow still looks like that to the rules; ICMP rate limits make it a mix.)
    let seen = s.take(PATIENCE);
    assert!(
        seen.iter().all(|r| r == "TIMEOUT" || r == "REFUSED"),
        "{seen:?}"
    );
    assert_eq!(flows(&t, s.port), flow("10.96.0.53", "10.96.0.53"));
    let (fresh, _) = t.udp(&t.client, "10.96.0.53:53").expect("reply");
    assert_eq!(fresh, "b0", "a new source port is served");
}

/// The "rejected" scenario, as it is on this dataplane: the reject verdict drops the
/// datagram before conntrack confirms its entry, so nothing is left to clean; the first
/// endpoint serves the same source port at once.
#[test]
fn rejected_udp_datagrams_leave_no_conntrack_entry_and_reach_the_first_endpoint() {
    let mut t = setup(1, &[("svc.yaml", service(DNS))], &[]);
    let s = Stream::start(&t, "10.96.0.53:53");
    assert_eq!(s.take(3), ["REFUSED"; 3]);
    assert_eq!(flows(&t, s.port), Vec::<(String, String)>::new());
    t.write_manifest("eps.yaml", &dns_slice(&[0]));
    t.wait_applied();
    s.skip_queued();
    let seen = s.until(PATIENCE, "b0");
    assert_eq!(seen.last().map(String::as_str), Some("b0"), "{seen:?}");
    assert_eq!(
        flows(&t, s.port),
        flow("10.96.0.53", &Topology::backend_ip(0))
    );
}

/// Loads synthetic conntrack entries into the node namespace (`conntrack -R`, one `-I …` per
/// line).
fn load_flows(t: &Topology, lines: &[String]) {
    let file = std::env::temp_dir().join(format!("{}-flows", t.node));
    std::fs::write(&file, lines.join("\n") + "\n").expect("write flows file");
    let loaded = Command::new("ip")
        .args(["netns", "exec", &t.node, "conntrack", "-R"])
        .arg(&file)
        .output();
    let _ = std::fs::remove_file(&file);
    let out = loaded.expect("run conntrack -R");
    assert!(
        out.status.success(),
        "conntrack -R: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Number of the node's conntrack entries matching `filter` (`conntrack -L` arguments).
fn count(t: &Topology, filter: &[&str]) -> usize {
    must(
        Command::new("ip")
            .args(["netns", "exec", &t.node, "conntrack", "-L"])
            .args(filter),
    )
    .lines()
    .count()
}

#[test]
fn cleanup_deletes_ten_thousand_stale_flows_and_keeps_every_other_flow() {
    let mut t = setup(
        2,
        &[("svc.yaml", service(DNS)), ("eps.yaml", dns_slice(&[0, 1]))],
        &[],
    );
    let flow = |proto: &str, src: &str, dst: &str, sport: u32, backend: usize| {
        let state = if proto == "tcp" {
            " --state ESTABLISHED"
        } else {
            ""
        };
        format!(
            "-I -p {proto} -s {src} -d {dst} --sport {sport} --dport 53 -r {} -q 10.244.1.1 \
             --reply-port-src 5353 --reply-port-dst {sport} -t 600{state}",
            Topology::backend_ip(backend)
        )
    };
    let mut lines = Vec::new();
    for sport in 20_000..30_000 {
        // Stale: DNATed to b0, which leaves.
        lines.push(flow("udp", "10.100.0.2", "10.96.0.53", sport, 0));
        // Another client's flows, DNATed to b1, which stays.
        lines.push(flow("udp", "10.100.0.3", "10.96.0.53", sport, 1));
    }
    for sport in 40_000..40_500 {
        // TCP is never cleaned; another address is another destination.
        lines.push(flow("tcp", "10.100.0.2", "10.96.0.53", sport, 0));
        lines.push(flow("udp", "10.100.0.2", "10.96.0.54", sport, 0));
    }
    load_flows(&t, &lines);
    let b0 = Topology::backend_ip(0);
    let stale = ["-p", "udp", "-d", "10.96.0.53", "--reply-src", b0.as_str()];
    assert_eq!(count(&t, &stale), 10_000);
    let total = count(&t, &[]);

    t.write_manifest("eps.yaml", &dns_slice(&[1]));
    t.wait_applied();
    let started = std::time::Instant::now();
    assert!(
        Topology::eventually(Duration::from_secs(10), || count(&t, &stale) == 0),
        "{} stale flows left",
        count(&t, &stale)
    );
    eprintln!(
        "10000 stale flows gone {:?} after the sync",
        started.elapsed()
    );
    assert_eq!(count(&t, &[]), total - 10_000, "nothing else deleted");
    assert_eq!(count(&t, &["-p", "tcp", "--reply-src", b0.as_str()]), 500);
    assert_eq!(count(&t, &["-p", "udp", "-d", "10.96.0.54"]), 500);
}

#[test]
fn a_udp_flow_whose_backend_left_while_lb_proxy_was_down_moves_after_the_restart() {
    // Issue 9, point 9: the diff-based cleanup knew nothing of what changed while it was not
    // running, so the flow stayed on the removed backend forever.
    let mut t = Topology::up(2);
    t.serve_all();
    t.write_manifest("node.yaml", NODE_YAML);
    t.write_manifest("svc.yaml", &service(DNS));
    t.write_manifest("eps.yaml", &dns_slice(&[0, 1]));
    let proxy = t.start_proxy(&[]);
    let s = Stream::start(&t, "10.96.0.53:53");
    let first = s.next();
    let gone: usize = match first.as_str() {
        "b0" => 0,
        "b1" => 1,
        other => panic!("first datagram not served: {other}"),
    };
    let kept_name = format!("b{}", 1 - gone);
    t.stop(proxy);
    // The endpoint leaves while lb-proxy is down: the ruleset (left in place) and the flow
    // still send the client to it.
    t.write_manifest("eps.yaml", &dns_slice(&[1 - gone]));
    s.skip_queued();
    assert_eq!(s.take(3), [first.as_str(); 3]);
    t.start_proxy(&[]);
    s.skip_queued();
    let seen = s.until(PATIENCE, &kept_name);
    assert_eq!(
        seen.last(),
        Some(&kept_name),
        "the client stayed on removed backend {first}: {seen:?}"
    );
    assert_eq!(s.take(5), [kept_name.as_str(); 5], "and stays there");
    assert_eq!(
        flows(&t, s.port),
        flow("10.96.0.53", &Topology::backend_ip(1 - gone))
    );
}
