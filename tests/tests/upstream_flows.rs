//! kube-proxy's own packet-flow tests, with real packets.
//!
//! Upstream's `pkg/proxy/nftables/proxier_test.go` checks its rulesets with packet-flow tables
//! (`runPacketFlowTests`): a source address, a destination address and port, and what may
//! happen — the endpoints that may be reached, `DROP`, `REJECT`, or nothing (`""`: the proxy
//! does not touch the packet) — and whether the packet is masqueraded. Those tables are
//! transcribed here group by group (each flow names its upstream test and flow), and run against
//! lb-proxy with real connections between network namespaces: `lb-proxy run` programs the node
//! namespace, and each flow is one or more real TCP (or UDP) connections.
//!
//! Upstream's fake addresses are mapped onto the test topology (`scripts/netns-topology`);
//! Service addresses (cluster, external and load-balancer IPs) are kept as upstream has them:
//!
//! | upstream | here |
//! | --- | --- |
//! | node `test-node`, IP 192.168.0.2 / 2001:db8::1 | `node-a`, InternalIP 10.100.0.1 / fd00:100::1 |
//! | second node IP 192.168.1.2 / 2001:db8:1::2 | 10.200.0.1 / fd00:200::1 |
//! | external client 203.0.113.2 / 2600:5200::1 | the client namespace, 10.100.0.2 / fd00:100::2 |
//! | blocked external client 203.0.113.130 | the client namespace from 10.100.0.5 |
//! | pod CIDR 10.0.0.0/8, a pod (10.0.0.2, …) | 10.244.0.0/16, a backend namespace that is no endpoint |
//! | endpoints (10.180.x.y, 10.0.1.N, fd00:10:180::…) | backend namespaces `bN`, 10.244.1.1N / fd00:244:1::1N |
//! | ServiceCIDR 172.30.0.0/16 | `--service-cidr 172.30.0.0/16` |
//! | LB source range 192.168.0.0/24 (node IPs) | 10.200.0.0/24 (the node's other address) |
//! | LB source range 203.0.113.0/25 | 10.100.0.0/30 |
//!
//! A flow's outcome is observed, not inferred: the endpoint that answers (each backend
//! answers with its own `IP:port`); `REJECT` is a refused connection (ICMP port unreachable);
//! `DROP` a timeout; "not touched" an answer from a listener of the node itself on that
//! address and port; masquerading is seen as the node's address (10.244.1.1 / fd00:244:1::1)
//! as the backend's peer.
//!
//! Left out, with the reason: `TestClusterIPGeneral` "clusterIP with TCP, UDP, and SCTP on
//! same port (SCTP)" (the test peer has no SCTP client); `TestLoadBalancer` "same node to LB1
//! / LB2, SNATted to LB1 / LB2 (implicitly allowed)" (a connection whose source is the
//! load-balancer IP itself needs that IP on the node, which then owns it: not reproducible
//! with real packets here; the `allowFromNode` element is covered by
//! `tests/dataplane.rs`).

use std::collections::BTreeSet;
use std::time::Duration;

use lb_e2e::{Topology, binary, must};

/// Where a flow starts.
#[derive(Debug, Clone, Copy)]
enum From {
    /// The external client (upstream `testExternalClient`).
    Client,
    /// The external client from a source outside the load-balancer source ranges
    /// (upstream `testExternalClientBlocked`).
    Blocked,
    /// A pod: backend namespace `i`, which is no endpoint of the Service.
    Pod(usize),
    /// The node itself.
    Node,
}

/// What upstream expects.
#[derive(Debug, Clone, Copy)]
enum Out {
    /// Connections reach exactly these endpoints (`IP:port`).
    Endpoints(&'static [&'static str]),
    /// Refused (ICMP port unreachable).
    Reject,
    /// Dropped.
    Drop,
    /// Not touched by the proxy (upstream `""`): the node's own listener answers.
    NotTouched,
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    /// Upstream test and flow name.
    upstream: &'static str,
    from: From,
    /// `IP:port` or `[IPv6]:port`.
    to: &'static str,
    udp: bool,
    out: Out,
    masq: bool,
}

const fn tcp(upstream: &'static str, from: From, to: &'static str, out: Out, masq: bool) -> Flow {
    Flow {
        upstream,
        from,
        to,
        udp: false,
        out,
        masq,
    }
}

/// The node's addresses toward the backends: what a masqueraded connection comes from.
const MASQ_SOURCES: [&str; 2] = ["10.244.1.1", "fd00:244:1::1"];
const BLOCKED_SOURCE: &str = "10.100.0.5";

/// One connection: `Ok((answering endpoint, peer address it saw))` or `Err(error)`. A flow
/// expected to be dropped waits 1.5 s; others up to 6 s, as a fresh namespace's first IPv6
/// connection waits for neighbour discovery.
fn connect(t: &Topology, f: &Flow) -> Result<(String, String), String> {
    let ns = match f.from {
        From::Client | From::Blocked => t.client.clone(),
        From::Pod(i) => t.backends[i].clone(),
        From::Node => t.node.clone(),
    };
    let wait = if let Out::Drop = f.out {
        "1500"
    } else {
        "6000"
    };
    let mut args = vec![if f.udp { "udp" } else { "tcp" }, f.to, wait];
    if let From::Blocked = f.from {
        args.push(BLOCKED_SOURCE);
    }
    let line = t.peer(&ns, &args);
    if let Some(e) = line.strip_prefix("ERROR ") {
        return Err(e.to_string());
    }
    let mut it = line.split_whitespace();
    match (it.next(), it.next()) {
        (Some(name), Some(peer)) => {
            let ip = peer.rsplit_once(':').map_or(peer, |(ip, _)| ip);
            Ok((name.to_string(), ip.trim_matches(['[', ']']).to_string()))
        }
        _ => Err(format!("no reply ({line:?})")),
    }
}

/// Runs one flow; `Err` says how it differed from upstream's expectation.
fn check(t: &Topology, f: &Flow) -> Result<(), String> {
    match f.out {
        Out::Endpoints(want) => {
            // Enough tries that missing one of N uniformly chosen endpoints is improbable.
            let tries = if want.len() == 1 { 3 } else { 12 * want.len() };
            let mut seen = BTreeSet::new();
            for _ in 0..tries {
                let (endpoint, peer) = connect(t, f)?;
                let masqueraded = MASQ_SOURCES.contains(&peer.as_str());
                if masqueraded != f.masq {
                    return Err(format!(
                        "{endpoint} saw the connection from {peer}: masquerade {masqueraded}, upstream expects {}",
                        f.masq
                    ));
                }
                seen.insert(endpoint);
            }
            let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
            if seen != want {
                return Err(format!("reached {seen:?}, upstream expects {want:?}"));
            }
            Ok(())
        }
        Out::Reject => match connect(t, f) {
            Err(e) if e.contains("refused") => Ok(()),
            other => Err(format!("{other:?}, upstream expects REJECT")),
        },
        Out::Drop => match connect(t, f) {
            Err(e) if e.contains("timed out") || e.contains("temporarily unavailable") => Ok(()),
            other => Err(format!("{other:?}, upstream expects DROP")),
        },
        Out::NotTouched => match connect(t, f) {
            Ok((name, _)) if name == "node" => Ok(()),
            other => Err(format!(
                "{other:?}, upstream expects the packet untouched (the node's listener answers)"
            )),
        },
    }
}

/// Runs every flow and fails once, listing each flow that differs from upstream.
fn run(t: &Topology, group: &str, flows: &[Flow]) {
    let failures: Vec<String> = flows
        .iter()
        .filter_map(|f| {
            check(t, f)
                .err()
                .map(|e| format!("{group} / {:?} ({:?} → {}): {e}", f.upstream, f.from, f.to))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} upstream flows differ:\n{}",
        failures.len(),
        flows.len(),
        failures.join("\n")
    );
}

/// The node `node-a` (upstream's `test-node`) with its primary addresses.
const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 10.100.0.1\n  - type: InternalIP\n    address: fd00:100::1\n";

fn service(ns_name: &str, spec: &str) -> String {
    let (ns, name) = ns_name.split_once('/').expect("ns/name");
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}"
    )
}

/// An EndpointSlice for `ns/name`: `ports` is YAML list items, `endpoints` too.
fn slice(ns_name: &str, family: &str, ports: &str, endpoints: &str) -> String {
    let (ns, name) = ns_name.split_once('/').expect("ns/name");
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: {ns}\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: {family}\nports:\n{ports}endpoints:\n{endpoints}"
    )
}

/// An endpoint item: backend `i` of `family`, on `node` (none: no nodeName), with conditions.
fn ep(i: usize, v6: bool, node: Option<&str>, conditions: &str) -> String {
    let ip = if v6 {
        format!("fd00:244:1::1{i}")
    } else {
        format!("10.244.1.1{i}")
    };
    let node = node.map_or(String::new(), |n| format!("  nodeName: {n}\n"));
    format!("- addresses: [\"{ip}\"]\n{node}  conditions: {conditions}\n")
}

const READY: &str = "{ready: true}";

/// A topology with `n` backends; backend `i` answers on each of `ports[i]` (TCP and UDP) with
/// its own `IP:port`; the node answers `node` on `node_listeners`.
fn topology(ports: &[&[u16]], v6: bool, node_listeners: &[&str]) -> Topology {
    let mut t = Topology::up(ports.len());
    for (i, ports) in ports.iter().enumerate() {
        for port in *ports {
            let addr = if v6 {
                format!("[fd00:244:1::1{i}]:{port}")
            } else {
                format!("10.244.1.1{i}:{port}")
            };
            let mut cmd = t.ns_command(&t.backends[i].clone(), &binary("lb-testsrv"));
            cmd.args(["serve", &addr, &addr]);
            t.spawn_ready(cmd, "READY");
        }
    }
    for addr in node_listeners {
        let mut cmd = t.ns_command(&t.node.clone(), &binary("lb-testsrv"));
        cmd.args(["serve", "node", addr]);
        t.spawn_ready(cmd, "READY");
    }
    // The blocked external client's address.
    must(std::process::Command::new("ip").args([
        "-n",
        &t.client,
        "addr",
        "add",
        &format!("{BLOCKED_SOURCE}/24"),
        "dev",
        "eth0",
    ]));
    t.write_manifest("node.yaml", NODE);
    t
}

fn start(t: &mut Topology, extra: &[&str]) {
    let mut args = vec!["--service-cidr", "172.30.0.0/16,fd00:172:30::/112"];
    args.extend_from_slice(extra);
    t.start_proxy(&args);
}

#[test]
fn upstream_no_endpoints_reject() {
    // TestNoEndpointsReject: a Service without endpoints rejects on every address.
    let mut t = topology(&[&[]], false, &[]);
    t.write_manifest(
        "svc.yaml",
        &service(
            "ns1/svc1",
            "  type: LoadBalancer\n  clusterIP: 172.30.0.41\n  externalIPs: [192.168.99.11]\n  ports:\n  - name: p80\n    port: 80\n    protocol: TCP\n    nodePort: 3001\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 1.2.3.4\n",
        ),
    );
    start(&mut t, &[]);
    let g = "TestNoEndpointsReject";
    run(
        &t,
        g,
        &[
            tcp(
                "pod to cluster IP with no endpoints",
                From::Pod(0),
                "172.30.0.41:80",
                Out::Reject,
                false,
            ),
            tcp(
                "external to external IP with no endpoints",
                From::Client,
                "192.168.99.11:80",
                Out::Reject,
                false,
            ),
            tcp(
                "pod to NodePort with no endpoints",
                From::Pod(0),
                "10.100.0.1:3001",
                Out::Reject,
                false,
            ),
            tcp(
                "external to NodePort with no endpoints",
                From::Client,
                "10.100.0.1:3001",
                Out::Reject,
                false,
            ),
            tcp(
                "pod to LoadBalancer IP with no endpoints",
                From::Pod(0),
                "1.2.3.4:80",
                Out::Reject,
                false,
            ),
            tcp(
                "external to LoadBalancer IP with no endpoints",
                From::Client,
                "1.2.3.4:80",
                Out::Reject,
                false,
            ),
        ],
    );
}

#[test]
fn upstream_cluster_ip_general() {
    // TestClusterIPGeneral. Endpoints 10.180.0.1 (local) → b0, 10.180.2.1 (node2) → b1; the
    // source pod 10.180.0.2 → b2.
    let both: &[u16] = &[80, 8443, 53, 5353];
    let mut t = topology(&[both, both, &[]], false, &[]);
    t.write_manifest(
        "svc.yaml",
        &format!(
            "{}---\n{}",
            service(
                "ns1/svc1",
                "  clusterIP: 172.30.0.41\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n"
            ),
            service(
                "ns2/svc2",
                "  clusterIP: 172.30.0.42\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n  - name: https\n    port: 443\n    protocol: TCP\n    targetPort: 8443\n  - name: dns-udp\n    port: 53\n    protocol: UDP\n  - name: dns-tcp\n    port: 53\n    protocol: TCP\n    targetPort: 5353\n"
            )
        ),
    );
    t.write_manifest(
        "eps.yaml",
        &format!(
            "{}---\n{}",
            slice(
                "ns1/svc1",
                "IPv4",
                "- name: http\n  port: 80\n  protocol: TCP\n",
                &ep(0, false, Some("node-a"), READY)
            ),
            slice(
                "ns2/svc2",
                "IPv4",
                "- name: http\n  port: 80\n  protocol: TCP\n- name: https\n  port: 8443\n  protocol: TCP\n- name: dns-udp\n  port: 53\n  protocol: UDP\n- name: dns-tcp\n  port: 5353\n  protocol: TCP\n",
                &(ep(0, false, Some("node-a"), READY) + &ep(1, false, Some("node2"), READY))
            )
        ),
    );
    start(&mut t, &[]);
    let g = "TestClusterIPGeneral";
    let mut udp = tcp(
        "clusterIP with TCP, UDP, and SCTP on same port (UDP)",
        From::Pod(2),
        "172.30.0.42:53",
        Out::Endpoints(&["10.244.1.10:53", "10.244.1.11:53"]),
        false,
    );
    udp.udp = true;
    let mut udp_reject = tcp(
        "TCP-only port does not match UDP traffic",
        From::Pod(2),
        "172.30.0.42:80",
        Out::Reject,
        false,
    );
    udp_reject.udp = true;
    run(
        &t,
        g,
        &[
            tcp(
                "simple clusterIP",
                From::Pod(2),
                "172.30.0.41:80",
                Out::Endpoints(&["10.244.1.10:80"]),
                false,
            ),
            tcp(
                "hairpin to cluster IP",
                From::Pod(0),
                "172.30.0.41:80",
                Out::Endpoints(&["10.244.1.10:80"]),
                true,
            ),
            tcp(
                "clusterIP with multiple endpoints",
                From::Pod(2),
                "172.30.0.42:80",
                Out::Endpoints(&["10.244.1.10:80", "10.244.1.11:80"]),
                false,
            ),
            tcp(
                "clusterIP with TargetPort",
                From::Pod(2),
                "172.30.0.42:443",
                Out::Endpoints(&["10.244.1.10:8443", "10.244.1.11:8443"]),
                false,
            ),
            tcp(
                "clusterIP with TCP, UDP, and SCTP on same port (TCP)",
                From::Pod(2),
                "172.30.0.42:53",
                Out::Endpoints(&["10.244.1.10:5353", "10.244.1.11:5353"]),
                false,
            ),
            udp,
            udp_reject,
            tcp(
                "svc1 does not accept svc2's ports",
                From::Pod(2),
                "172.30.0.41:443",
                Out::Reject,
                false,
            ),
            tcp(
                "packet to unallocated cluster ip",
                From::Pod(2),
                "172.30.0.50:80",
                Out::Drop,
                false,
            ),
        ],
    );
}

#[test]
fn upstream_load_balancer_with_source_ranges() {
    // TestLoadBalancer. Endpoint 10.180.0.1 → b0; the pod 10.0.0.2 → b1.
    let mut t = topology(&[&[80], &[]], false, &[]);
    t.write_manifest(
        "svc.yaml",
        &service(
            "ns1/svc1",
            // The second range keeps upstream's leading space (a regression test there).
            "  type: LoadBalancer\n  clusterIP: 172.30.0.41\n  loadBalancerSourceRanges: [\"10.200.0.0/24\", \" 10.100.0.0/30\"]\n  ports:\n  - name: p80\n    port: 80\n    protocol: TCP\n    nodePort: 3001\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 1.2.3.4\n    - ip: 5.6.7.8\n",
        ),
    );
    t.write_manifest(
        "eps.yaml",
        &slice(
            "ns1/svc1",
            "IPv4",
            "- name: p80\n  port: 80\n  protocol: TCP\n",
            &ep(0, false, None, READY),
        ),
    );
    start(&mut t, &[]);
    const EP: Out = Out::Endpoints(&["10.244.1.10:80"]);
    run(
        &t,
        "TestLoadBalancer",
        &[
            tcp(
                "pod to cluster IP",
                From::Pod(1),
                "172.30.0.41:80",
                EP,
                false,
            ),
            tcp(
                "external to nodePort",
                From::Client,
                "10.100.0.1:3001",
                EP,
                true,
            ),
            tcp(
                "nodePort bypasses LoadBalancerSourceRanges",
                From::Blocked,
                "10.100.0.1:3001",
                EP,
                true,
            ),
            tcp(
                "accepted external to LB1",
                From::Client,
                "1.2.3.4:80",
                EP,
                true,
            ),
            tcp(
                "accepted external to LB2",
                From::Client,
                "5.6.7.8:80",
                EP,
                true,
            ),
            tcp(
                "blocked external to LB1",
                From::Blocked,
                "1.2.3.4:80",
                Out::Drop,
                false,
            ),
            tcp(
                "blocked external to LB2",
                From::Blocked,
                "5.6.7.8:80",
                Out::Drop,
                false,
            ),
            tcp(
                "pod to LB1 (blocked by LoadBalancerSourceRanges)",
                From::Pod(1),
                "1.2.3.4:80",
                Out::Drop,
                false,
            ),
            tcp(
                "pod to LB2 (blocked by LoadBalancerSourceRanges)",
                From::Pod(1),
                "5.6.7.8:80",
                Out::Drop,
                false,
            ),
            tcp(
                "node to LB1 (allowed by LoadBalancerSourceRanges)",
                From::Node,
                "1.2.3.4:80",
                EP,
                true,
            ),
            tcp(
                "node to LB2 (allowed by LoadBalancerSourceRanges)",
                From::Node,
                "5.6.7.8:80",
                EP,
                true,
            ),
        ],
    );
}

/// TestNodePorts, one family: the default (upstream's fake: the primary node IP; here the
/// default `primary`), then "multiple nodeport-addresses".
fn node_ports(v6: bool) {
    let (svc_ip, eps, node_ip, alt_ip, extra_cidrs) = if v6 {
        (
            "fd00:172:30::41",
            ["[fd00:244:1::10]:80", "[fd00:244:1::11]:80"],
            "[fd00:100::1]:3001",
            "[fd00:200::1]:3001",
            "10.100.0.0/24,10.200.0.0/24,fd00:100::/64,fd00:200::1/128",
        )
    } else {
        (
            "172.30.0.41",
            ["10.244.1.10:80", "10.244.1.11:80"],
            "10.100.0.1:3001",
            "10.200.0.1:3001",
            "10.100.0.0/24,10.200.0.0/24,fd00:100::/64",
        )
    };
    let eps: &'static [&'static str] = Box::leak(Box::new(eps));
    let to_cluster: &'static str = Box::leak(
        if v6 {
            format!("[{svc_ip}]:80")
        } else {
            format!("{svc_ip}:80")
        }
        .into_boxed_str(),
    );
    for (case, extra, alt_allowed) in [
        (if v6 { "ipv6" } else { "ipv4" }, None, false),
        (
            if v6 {
                "ipv6, multiple nodeport-addresses"
            } else {
                "ipv4, multiple nodeport-addresses"
            },
            Some(extra_cidrs),
            true,
        ),
    ] {
        let mut t = topology(&[&[80], &[80], &[]], v6, &[alt_ip]);
        let family = if v6 { "IPv6" } else { "IPv4" };
        t.write_manifest(
            "svc.yaml",
            &service(
                "ns1/svc1",
                &format!(
                    "  type: NodePort\n  clusterIP: {svc_ip}\n  ipFamilies: [{family}]\n  ports:\n  - name: p80\n    port: 80\n    protocol: TCP\n    nodePort: 3001\n"
                ),
            ),
        );
        t.write_manifest(
            "eps.yaml",
            &slice(
                "ns1/svc1",
                family,
                "- name: p80\n  port: 80\n  protocol: TCP\n",
                &(ep(0, v6, None, READY) + &ep(1, v6, Some("node-a"), READY)),
            ),
        );
        match extra {
            Some(cidrs) => start(&mut t, &["--nodeport-addresses", cidrs]),
            None => start(&mut t, &[]),
        }
        let out = Out::Endpoints(eps);
        let alt = if alt_allowed {
            tcp(
                "external to nodePort on secondary IP",
                From::Client,
                alt_ip,
                out,
                true,
            )
        } else {
            tcp(
                "secondary nodeIP ignores NodePorts",
                From::Client,
                alt_ip,
                Out::NotTouched,
                false,
            )
        };
        run(
            &t,
            &format!("TestNodePorts/{case}"),
            &[
                tcp("pod to cluster IP", From::Pod(2), to_cluster, out, false),
                tcp("external to nodePort", From::Client, node_ip, out, true),
                tcp("node to nodePort", From::Node, node_ip, out, true),
                alt,
            ],
        );
    }
}

#[test]
fn upstream_node_ports_ipv4() {
    node_ports(false);
}

#[test]
fn upstream_node_ports_ipv6() {
    node_ports(true);
}

/// TestExternalTrafficPolicyLocal and TestExternalTrafficPolicyCluster: endpoints 10.180.0.1
/// (no node) → b0 and 10.180.2.1 (this node) → b1; the pod 10.0.0.2 → b2.
fn external_traffic_policy(local: bool) {
    let mut t = topology(&[&[80], &[80], &[]], false, &[]);
    let policy = if local { "Local" } else { "Cluster" };
    t.write_manifest(
        "svc.yaml",
        &service(
            "ns1/svc1",
            &format!(
                "  type: LoadBalancer\n  clusterIP: 172.30.0.41\n  externalIPs: [192.168.99.11]\n  externalTrafficPolicy: {policy}\n{}  ports:\n  - name: p80\n    port: 80\n    protocol: TCP\n    targetPort: 80\n    nodePort: 3001\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 1.2.3.4\n",
                if local { "  healthCheckNodePort: 30000\n" } else { "" }
            ),
        ),
    );
    t.write_manifest(
        "eps.yaml",
        &slice(
            "ns1/svc1",
            "IPv4",
            "- name: p80\n  port: 80\n  protocol: TCP\n",
            &(ep(0, false, None, READY) + &ep(1, false, Some("node-a"), READY)),
        ),
    );
    start(&mut t, &[]);
    const BOTH: Out = Out::Endpoints(&["10.244.1.10:80", "10.244.1.11:80"]);
    const LOCAL: Out = Out::Endpoints(&["10.244.1.11:80"]);
    if local {
        run(
            &t,
            "TestExternalTrafficPolicyLocal",
            &[
                tcp(
                    "pod to cluster IP hits both endpoints, unmasqueraded",
                    From::Pod(2),
                    "172.30.0.41:80",
                    BOTH,
                    false,
                ),
                tcp(
                    "pod to external IP hits both endpoints, unmasqueraded",
                    From::Pod(2),
                    "192.168.99.11:80",
                    BOTH,
                    false,
                ),
                tcp(
                    "external to external IP hits only local endpoint, unmasqueraded",
                    From::Client,
                    "192.168.99.11:80",
                    LOCAL,
                    false,
                ),
                tcp(
                    "pod to LB IP hits only both endpoints, unmasqueraded",
                    From::Pod(2),
                    "1.2.3.4:80",
                    BOTH,
                    false,
                ),
                tcp(
                    "external to LB IP hits only local endpoint, unmasqueraded",
                    From::Client,
                    "1.2.3.4:80",
                    LOCAL,
                    false,
                ),
                tcp(
                    "pod to NodePort hits both endpoints, unmasqueraded",
                    From::Pod(2),
                    "10.100.0.1:3001",
                    BOTH,
                    false,
                ),
                tcp(
                    "external to NodePort hits only local endpoint, unmasqueraded",
                    From::Client,
                    "10.100.0.1:3001",
                    LOCAL,
                    false,
                ),
            ],
        );
    } else {
        run(
            &t,
            "TestExternalTrafficPolicyCluster",
            &[
                tcp(
                    "pod to cluster IP hits both endpoints, unmasqueraded",
                    From::Pod(2),
                    "172.30.0.41:80",
                    BOTH,
                    false,
                ),
                tcp(
                    "pod to external IP hits both endpoints, masqueraded",
                    From::Pod(2),
                    "192.168.99.11:80",
                    BOTH,
                    true,
                ),
                tcp(
                    "external to external IP hits both endpoints, masqueraded",
                    From::Client,
                    "192.168.99.11:80",
                    BOTH,
                    true,
                ),
                tcp(
                    "pod to LB IP hits both endpoints, masqueraded",
                    From::Pod(2),
                    "1.2.3.4:80",
                    BOTH,
                    true,
                ),
                tcp(
                    "external to LB IP hits both endpoints, masqueraded",
                    From::Client,
                    "1.2.3.4:80",
                    BOTH,
                    true,
                ),
                tcp(
                    "pod to NodePort hits both endpoints, masqueraded",
                    From::Pod(2),
                    "10.100.0.1:3001",
                    BOTH,
                    true,
                ),
                tcp(
                    "external to NodePort hits both endpoints, masqueraded",
                    From::Client,
                    "10.100.0.1:3001",
                    BOTH,
                    true,
                ),
            ],
        );
    }
}

#[test]
fn upstream_external_traffic_policy_local() {
    external_traffic_policy(true);
}

#[test]
fn upstream_external_traffic_policy_cluster() {
    external_traffic_policy(false);
}

#[test]
fn upstream_terminating_endpoints_traffic_policy_cluster() {
    // TestTerminatingEndpointsTrafficPolicyCluster: endpoints 10.0.1.N → b(N-1); the pod
    // 10.0.0.2 → b5. Each case's slice is added, its flows run, then the slice is deleted and
    // both flows must be rejected, as upstream does it.
    let mut t = topology(&[&[80], &[80], &[80], &[80], &[80], &[]], false, &[]);
    t.write_manifest(
        "svc.yaml",
        &service(
            "ns1/svc1",
            "  type: LoadBalancer\n  clusterIP: 172.30.1.1\n  externalTrafficPolicy: Cluster\n  ports:\n  - name: \"\"\n    port: 80\n    protocol: TCP\n    targetPort: 80\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 1.2.3.4\n",
        ),
    );
    start(&mut t, &[]);
    let ready = "{ready: true, serving: true, terminating: false}";
    let terminating = "{ready: false, serving: true, terminating: true}";
    let gone = "{ready: false, serving: false, terminating: true}";
    let cases: [(&str, String, Out); 4] = [
        (
            "ready endpoints exist",
            ep(0, false, Some("node-a"), ready)
                + &ep(1, false, Some("node-a"), ready)
                + &ep(2, false, Some("another-node"), terminating)
                + &ep(3, false, Some("another-node"), gone)
                + &ep(4, false, Some("another-node"), ready),
            Out::Endpoints(&["10.244.1.10:80", "10.244.1.11:80", "10.244.1.14:80"]),
        ),
        (
            "only terminating endpoints exist",
            ep(1, false, Some("node-a"), terminating)
                + &ep(2, false, Some("node-a"), terminating)
                + &ep(3, false, Some("another-node"), gone)
                + &ep(4, false, Some("another-node"), terminating),
            Out::Endpoints(&["10.244.1.11:80", "10.244.1.12:80", "10.244.1.14:80"]),
        ),
        (
            "terminating endpoints on remote node",
            ep(4, false, Some("node-1"), terminating),
            Out::Endpoints(&["10.244.1.14:80"]),
        ),
        (
            "no usable endpoints on any node",
            ep(4, false, Some("node-a"), gone) + &ep(4, false, Some("node-1"), gone),
            Out::Reject,
        ),
    ];
    let g = "TestTerminatingEndpointsTrafficPolicyCluster";
    for (case, endpoints, out) in cases {
        t.write_manifest(
            "eps.yaml",
            &slice(
                "ns1/svc1",
                "IPv4",
                "- name: \"\"\n  port: 80\n  protocol: TCP\n",
                &endpoints,
            ),
        );
        let pod = tcp(
            "pod to clusterIP",
            From::Pod(5),
            "172.30.1.1:80",
            out,
            false,
        );
        settle(&t, case, &pod);
        run(
            &t,
            &format!("{g}/{case}"),
            &[
                pod,
                tcp("external to LB", From::Client, "1.2.3.4:80", out, true),
            ],
        );
        std::fs::remove_file(t.dir.join("eps.yaml")).expect("delete the slice");
        let after = tcp(
            "pod to clusterIP after endpoints deleted",
            From::Pod(5),
            "172.30.1.1:80",
            Out::Reject,
            false,
        );
        settle(&t, case, &after);
        run(
            &t,
            &format!("{g}/{case}"),
            &[
                after,
                tcp(
                    "external to LB after endpoints deleted",
                    From::Client,
                    "1.2.3.4:80",
                    Out::Reject,
                    false,
                ),
            ],
        );
    }
}

/// Waits (up to 10 s) until `f`'s outcome is of the expected kind: lb-proxy has applied the
/// manifest change (a change that alters nothing is not reported, so its log is no signal).
fn settle(t: &Topology, case: &str, f: &Flow) {
    let mut last = Err(String::new());
    let kind_ok = || {
        last = connect(t, f);
        match (f.out, &last) {
            (Out::Endpoints(want), Ok((name, _))) => want.contains(&name.as_str()),
            (Out::Reject, Err(e)) => e.contains("refused"),
            _ => false,
        }
    };
    assert!(
        Topology::eventually(Duration::from_secs(15), kind_ok),
        "{case} / {:?}: still {last:?}: lb-proxy did not apply the change",
        f.upstream
    );
}
