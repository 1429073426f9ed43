//! Upstream kube-proxy's own packet-flow tables, run with real packets against lb-proxy.
//!
//! Upstream's `pkg/proxy/nftables/proxier_test.go` (kubernetes/kubernetes, v1.33–v1.35) checks
//! its rulesets with `runPacketFlowTests`: a source IP, a destination IP and port, and the
//! expected outcome (the endpoints that may be reached, `DROP` or `REJECT`, and whether the
//! packet is masqueraded). Those tables are transcribed here, group by group, each flow with
//! its provenance (upstream test, sub-test and flow name), and run as real TCP and UDP
//! connections through a node namespace that `lb-proxy run` programs.
//!
//! 220 flows in 38 groups (206 upstream flows in 37 groups, plus 14 flows derived from
//! `TestOverallNFTablesRules`, see below); every one of them holds. lb-proxy has no deliberate
//! difference from upstream in these tables: a flow that differed on purpose would carry
//! `differs_because_…` in its name and its expectation.
//!
//! | upstream test (sub-tests) | flows |
//! | --- | --- |
//! | `TestOverallNFTablesRules` (derived from its expected ruleset) | 14 |
//! | `TestNoEndpointsReject` | 6 |
//! | `TestClusterIPGeneral` | 9 |
//! | `TestNodePorts` (ipv4, ipv6, each with and without multiple nodeport-addresses) | 16 |
//! | `TestExternalTrafficPolicyLocal`, `TestExternalTrafficPolicyCluster` | 7 + 7 |
//! | `TestInternalTrafficPolicy` (4 cases, each then with its endpoints deleted) | 8 |
//! | `TestTerminatingEndpointsTrafficPolicyLocal` / `…Cluster` (4 cases each, then deleted) | 16 + 16 |
//! | `TestInternalExternalMasquerade` (base, masqueradeAll, no LocalTrafficDetector, both) | 4 × 27 |
//! | `TestLoadBalancer` | 13 |
//!
//! # Topology (`scripts/netns-upstream-flows`)
//!
//! Upstream's own addresses, used only inside the test's namespaces and never routed out of
//! them (no namespace has a link to the root namespace): pods in 10.0.0.0/8 and fd00:10::/64
//! (the cluster CIDRs, as upstream's `podCIDR`), one namespace per pod; the node 192.168.0.2
//! and 2001:db8::1 (plus 192.168.1.2, 2001:db8:1::2 and 192.168.99.11, as upstream's fake
//! network); external clients 203.0.113.2, 203.0.113.130 (inside and outside upstream's source
//! range 203.0.113.0/25) and 2600:5200::1. NodePorts are served on 192.168.0.2/32 and
//! 2001:db8::1/128, as upstream's fake proxier (`--nodeport-addresses`), except in the
//! sub-tests that change it.
//!
//! How an outcome is observed:
//! * an endpoint answers with the address and port it serves (`lb-testsrv serve @`), and the
//!   client address it saw: the node's pod-side address 10.0.0.1 (fd00:10::1) when the
//!   connection was masqueraded, the client's own address when not; a flow with several
//!   endpoints is repeated until each was reached, and at least max(8, 3N) times, every reply
//!   from a listed endpoint;
//! * `REJECT` is an immediate "connection refused" (TCP) or ICMP port unreachable (UDP);
//! * `DROP` is a timeout;
//! * a packet lb-proxy leaves alone is answered by the node itself (a listener named `node`)
//!   or, for service addresses routed off the node, by the namespace `up` (named `up`), so
//!   "not handled" never looks like a drop or a reject.
//!
//! # Re-mapping
//!
//! Upstream runs every sub-test on a fresh fake proxier. Here one topology serves every group,
//! and one lb-proxy run every group with the same settings (five runs in all): each group's
//! manifests replace the previous group's (`flows.yaml`), and its flows run, in parallel,
//! once lb-proxy reports the change applied. Addresses are upstream's, unchanged. Upstream's
//! "same node to LB, SNATted to LB" flows need the load-balancer IP on the node (the situation
//! they model), so `TestLoadBalancer` adds 1.2.3.4 and 5.6.7.8 to the node's loopback for its
//! own flows only. The sub-tests "no LocalTrafficDetector" run lb-proxy without
//! `--cluster-cidr` (upstream's no-op detector).
//!
//! # Left out
//!
//! * `TestClusterIPGeneral` "clusterIP with TCP, UDP, and SCTP on same port (SCTP)": the test
//!   peer has no SCTP (the SCTP service port is still programmed).
//! * `TestOverallNFTablesRules` has no flow table in v1.33–v1.35 (it compares the ruleset as
//!   text); the flows here are derived from that ruleset and say which rule each follows.

use std::collections::BTreeSet;
use std::process::Command;

use lb_e2e::upstream_flows::*;
use lb_e2e::{Topology, binary};

/// How long one attempt waits; a `DROP` is an attempt that times out.
const ATTEMPT_MS: &str = "2000";

// ---------------------------------------------------------------------------------------------
// Running flows with real packets.

/// What one attempt saw.
enum Seen {
    /// `server` (`ip:port` of an endpoint, or `node` / `up`) answered and saw `client`.
    Reply {
        server: String,
        client: String,
    },
    Refused,
    TimedOut,
    Other(String),
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seen::Reply { server, client } => {
                write!(f, "a reply from {server} (client seen: {client})")
            }
            Seen::Refused => write!(f, "REJECT (connection refused)"),
            Seen::TimedOut => write!(f, "DROP (timed out)"),
            Seen::Other(e) => write!(f, "error: {e}"),
        }
    }
}

/// The topology and lb-proxy, plus the namespaces flows start from.
struct Lab {
    t: Topology,
    clients: Clients,
    /// Manifest swaps so far.
    swaps: u8,
    /// The running lb-proxy.
    proxy: Option<usize>,
}

/// Where each source address lives.
struct Clients {
    external: String,
    node: String,
    /// The namespace of each of [`POD_IPS`].
    pods: Vec<String>,
}

impl Clients {
    /// The namespace a flow's source address lives in.
    fn namespace_of(&self, source: &str) -> &str {
        if source.starts_with("203.0.113.") || source == EXTERNAL_CLIENT_V6 {
            &self.external
        } else if let Some(i) = POD_IPS.iter().position(|p| *p == source) {
            &self.pods[i]
        } else if let Some((i, _)) = POD_IPV6.iter().find(|(_, p)| *p == source) {
            &self.pods[*i]
        } else {
            // The node's own addresses (and the load-balancer IPs it holds in TestLoadBalancer).
            &self.node
        }
    }

    fn attempt(&self, f: &Flow) -> Seen {
        let target = if f.dest.contains(':') {
            format!("[{}]:{}", f.dest, f.port)
        } else {
            format!("{}:{}", f.dest, f.port)
        };
        let mode = match f.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        let out = Command::new("ip")
            .args(["netns", "exec", self.namespace_of(f.source)])
            .arg(binary("lb-testsrv"))
            .args([mode, &target, ATTEMPT_MS, f.source])
            .output()
            .expect("run lb-testsrv");
        let line = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        if let Some(e) = line.strip_prefix("ERROR ") {
            return if e.contains("refused") {
                Seen::Refused
            } else if e.contains("timed out") || e.contains("os error 11") {
                Seen::TimedOut
            } else {
                Seen::Other(e.to_string())
            };
        }
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some(server), Some(peer)) => Seen::Reply {
                server: server.to_string(),
                client: peer
                    .rsplit_once(':')
                    .map_or(peer, |(ip, _)| ip)
                    .trim_matches(['[', ']'])
                    .to_string(),
            },
            _ => Seen::Other(format!("no reply: {line:?}")),
        }
    }

    /// Runs one flow; `Err` says what differed from upstream's expectation.
    fn run(&self, f: &Flow) -> Result<(), String> {
        match f.output {
            Drop | Reject => {
                let seen = self.attempt(f);
                let ok = matches!(
                    (&f.output, &seen),
                    (Drop, Seen::TimedOut) | (Reject, Seen::Refused)
                );
                if ok {
                    Ok(())
                } else {
                    Err(format!("expected {:?}, got {seen}", f.output))
                }
            }
            NotHandled(peer) => match self.attempt(f) {
                Seen::Reply { server, .. } if server == peer => Ok(()),
                seen => Err(format!("expected no DNAT (answered by {peer}), got {seen}")),
            },
            Endpoints(list) => {
                let want: BTreeSet<&str> = list.split(", ").collect();
                let client = match (f.masq, f.dest.contains(':')) {
                    (false, _) => f.source,
                    (true, false) => MASQUERADED,
                    (true, true) => MASQUERADED_V6,
                };
                let mut reached = BTreeSet::new();
                // Random choice among N endpoints: try until each was reached, and at least
                // max(8, 3N) times, so an endpoint that must not be reached has its chances
                // too (a wrong one of two is missed by 8 attempts with probability 1/256).
                for i in 0..60 {
                    match self.attempt(f) {
                        Seen::Reply { server, client: c } => {
                            if !want.contains(server.as_str()) {
                                return Err(format!(
                                    "expected only {list}, reached {server} (attempt {i})"
                                ));
                            }
                            if c != client {
                                return Err(format!(
                                    "expected the endpoint to see {client} (masq {}), it saw {c}",
                                    f.masq
                                ));
                            }
                            reached.insert(server);
                        }
                        seen => return Err(format!("expected {list}, got {seen} (attempt {i})")),
                    }
                    if reached.len() == want.len() && i + 1 >= (3 * want.len()).max(8) {
                        return Ok(());
                    }
                }
                Err(format!(
                    "expected {list}, reached only {reached:?} in 60 attempts"
                ))
            }
        }
    }
}

/// Starts the topology and the test peers.
fn lab() -> Lab {
    let v6 = |i: usize| POD_IPV6.iter().find(|(j, _)| *j == i).map(|(_, ip)| *ip);
    let pods: Vec<String> = POD_IPS
        .iter()
        .enumerate()
        .map(|(i, ip)| match v6(i) {
            Some(ip6) => format!("{ip},{ip6}"),
            None => ip.to_string(),
        })
        .collect();
    let pods: Vec<&str> = pods.iter().map(String::as_str).collect();
    let mut t = Topology::up_with("netns-upstream-flows", &pods);
    for (i, ip) in POD_IPS.iter().enumerate() {
        let ns = t.ns(&format!("p{i}"));
        let mut cmd = t.ns_command(&ns, &binary("lb-testsrv"));
        cmd.args(["serve", "@"])
            .args(POD_PORTS.iter().map(|p| format!("{ip}:{p}")));
        if let Some(ip6) = v6(i) {
            cmd.args(POD_PORTS.iter().map(|p| format!("[{ip6}]:{p}")));
        }
        t.spawn_ready(cmd, "READY");
    }
    // `[::]` takes IPv4 too (the namespaces keep net.ipv6.bindv6only at 0).
    for (ns, name) in [(t.node.clone(), "node"), (t.ns("up"), "up")] {
        let mut cmd = t.ns_command(&ns, &binary("lb-testsrv"));
        cmd.args(["serve", name])
            .args(OTHER_PORTS.iter().map(|p| format!("[::]:{p}")));
        t.spawn_ready(cmd, "READY");
    }
    // Upstream's node: its name, and its IP in the Node object (allowFromNode).
    t.write_manifest("node.yaml", NODE_YAML);
    let clients = Clients {
        external: t.client.clone(),
        node: t.node.clone(),
        pods: (0..POD_IPS.len()).map(|i| t.ns(&format!("p{i}"))).collect(),
    };
    // The observation itself works: before lb-proxy runs, a service address is answered by
    // `up` and a node port by the node, from every kind of client.
    for f in [
        tcp(
            "harness: nothing handled yet",
            "10.0.0.2",
            "172.30.0.41",
            80,
            NotHandled("up"),
            false,
        ),
        tcp(
            "harness: nothing handled yet",
            EXTERNAL_CLIENT,
            "1.2.3.4",
            80,
            NotHandled("up"),
            false,
        ),
        tcp(
            "harness: nothing handled yet",
            EXTERNAL_CLIENT,
            NODE_IP,
            3001,
            NotHandled("node"),
            false,
        ),
        tcp(
            "harness: nothing handled yet",
            NODE_IP,
            "172.30.0.41",
            80,
            NotHandled("up"),
            false,
        ),
        tcp(
            "harness: nothing handled yet",
            "fd00:10::2",
            "fd00:172:30::41",
            80,
            NotHandled("up"),
            false,
        ),
        tcp(
            "harness: nothing handled yet",
            EXTERNAL_CLIENT_V6,
            NODE_IPV6,
            3001,
            NotHandled("node"),
            false,
        ),
    ] {
        // Retried for a while: the first packets of a new topology may wait for neighbour
        // resolution.
        let mut outcome = clients.run(&f);
        for _ in 0..5 {
            if outcome.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
            outcome = clients.run(&f);
        }
        if let Err(e) = outcome {
            panic!("{} -> {}:{}: {e}", f.source, f.dest, f.port);
        }
    }
    Lab {
        t,
        clients,
        swaps: 0,
        proxy: None,
    }
}

/// Replaces the manifests with `g`'s, waits until lb-proxy applied them, and runs its flows
/// in parallel; returns the failures, each with its provenance, and the number of flows on
/// which the tracer, given the same manifests and settings, predicted what the kernel did.
///
/// Each flow is checked against upstream's expectation; when the tracer predicts something
/// else, the kernel is also checked against the tracer's prediction, so a disagreement between
/// the tracer and the kernel is reported as such whatever upstream says.
fn run_group(lab: &mut Lab, s: &Settings, g: &Group) -> (Vec<String>, usize) {
    // Consecutive groups can compile to the same ruleset (a case without usable endpoints,
    // then its "endpoints deleted" step): a marker Service, a new one per group, makes every
    // swap a change lb-proxy reports. No flow goes near 172.30.255.0/24.
    lab.swaps += 1;
    let marker = service(
        "flows",
        "marker",
        &format!(
            "  clusterIP: 172.30.255.{}\n  ports:\n  - port: 9\n    protocol: TCP\n",
            lab.swaps
        ),
        &[],
    );
    let manifests = marker + &g.manifests;
    let rs = ruleset(&manifests, s);
    lab.t.drain_applied();
    lab.t.write_manifest("flows.yaml", &manifests);
    lab.t.wait_applied();
    // The tracer also runs on the tables as the kernel lists them (`nft -j list table`): it
    // must predict the same there as on the ruleset compiled in process.
    let mut listed = lb_proxy::nft::ir::Ruleset::default();
    for family in ["ip", "ip6"] {
        let json = lb_e2e::must(Command::new("ip").args([
            "netns",
            "exec",
            &lab.t.node,
            "nft",
            "-j",
            "list",
            "table",
            family,
            "lb-proxy",
        ]));
        let t = lb_proxy::nft::json::from_nft_json(&json).expect("nft -j list table parses");
        listed.tables.extend(t.tables);
    }
    let clients = &lab.clients;
    let rs = &rs;
    let listed = &listed;
    std::thread::scope(|sc| {
        let handles: Vec<_> = g
            .flows
            .iter()
            .map(|f| {
                sc.spawn(move || {
                    let kernel = clients.run(f);
                    let prediction = predict(rs, s, f);
                    let from_listed = predict(listed, s, f);
                    let traced = match prediction {
                        Ok(p) if from_listed.as_ref().ok().map(|l| format!("{l:?}"))
                            != Some(format!("{p:?}")) =>
                        {
                            Err(format!(
                                "the tracer predicts {p:?} on the compiled ruleset, {from_listed:?} on the kernel's listing"
                            ))
                        }
                        Err(e) => Err(format!("the tracer failed: {e}")),
                        Ok((output, masq)) if agrees(f, &output, masq) => match &kernel {
                            Ok(()) => Ok(()),
                            Err(e) => Err(format!("the kernel differs from the tracer: {e}")),
                        },
                        Ok((output, masq)) => {
                            let predicted = Flow { output, masq, ..*f };
                            clients.run(&predicted).map_err(|e| {
                                format!(
                                    "the kernel differs from the tracer's {output:?} (masq {masq}): {e}"
                                )
                            })
                        }
                    };
                    (f, kernel, traced)
                })
            })
            .collect();
        let mut failures = Vec::new();
        let mut agreed = 0;
        for h in handles {
            let (f, kernel, traced) = h.join().expect("flow thread");
            let at = format!(
                "{} / {:?} ({:?} {} -> {}:{})",
                g.upstream, f.name, f.proto, f.source, f.dest, f.port
            );
            if let Err(e) = kernel {
                failures.push(format!("{at}: {e}"));
            }
            match traced {
                Ok(()) => agreed += 1,
                Err(e) => failures.push(format!("{at}: {e}")),
            }
        }
        (failures, agreed)
    })
}

fn node_ip(lab: &Lab, verb: &str, ip: &str) {
    lb_e2e::must(Command::new("ip").args([
        "-n",
        &lab.t.node,
        "addr",
        verb,
        &format!("{ip}/32"),
        "dev",
        "lo",
    ]));
}

/// Restarts lb-proxy with upstream's fake-proxier settings `s`.
fn restart(lab: &mut Lab, s: &Settings) {
    if let Some(i) = lab.proxy.take() {
        lab.t.stop(i);
    }
    let dir = lab.t.dir.to_string_lossy().into_owned();
    let mut args = vec!["run", "--node", "test-node"];
    if s.cluster_cidr {
        args.extend(["--cluster-cidr", "10.0.0.0/8,fd00:10::/64"]);
    }
    args.extend(["--nodeport-addresses", s.nodeport_addresses]);
    // Upstream's fake proxier knows the ServiceCIDRs 172.30.0.0/16 and fd00:10:96::/112.
    args.extend(["--service-cidr", SERVICE_CIDRS]);
    if s.masquerade_all {
        args.push("--masquerade-all");
    }
    args.extend(["--poll", "100ms", "-f", &dir]);
    lab.proxy = Some(lab.t.start_proxy_with(&args));
}

#[test]
fn upstream_packet_flow_tables_hold_with_real_packets_and_the_tracer_predicts_each() {
    let started = std::time::Instant::now();
    let mut lab = lab();
    let mut failures = Vec::new();
    let (mut flows, mut groups, mut agreed) = (0, 0, 0);
    let mut running: Option<Settings> = None;
    for (s, g) in schedule() {
        // One lb-proxy run per set of flags; the load-balancer IPs a group needs on the node
        // are added for that group only.
        let flags = Settings {
            node_holds: &[],
            ..s
        };
        if running != Some(flags) {
            restart(&mut lab, &flags);
            running = Some(flags);
        }
        for ip in s.node_holds {
            node_ip(&lab, "add", ip);
        }
        let (f, a) = run_group(&mut lab, &s, &g);
        for ip in s.node_holds {
            node_ip(&lab, "del", ip);
        }
        failures.extend(f);
        agreed += a;
        flows += g.flows.len();
        groups += 1;
    }
    eprintln!(
        "{flows} upstream flows in {groups} groups, {} failed, the tracer agreed with the kernel on {agreed}, in {:?}",
        failures.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {flows} upstream flows differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Issue 8: the tracer and the kernel agree on at least 30 (source, destination) pairs.
    assert!(agreed >= 30, "the tracer agreed on {agreed} flows only");
}
