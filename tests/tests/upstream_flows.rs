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

use lb_e2e::{Topology, binary};

/// Every pod address of every group, one namespace each (`p<index>`).
const POD_IPS: &[&str] = &[
    "10.0.0.2",
    "10.180.0.1",
    "10.180.0.2",
    "10.180.0.3",
    "10.180.0.4",
    "10.180.0.5",
    "10.180.1.1",
    "10.180.1.2",
    "10.180.1.3",
    "10.180.2.1",
    "10.0.1.1",
    "10.0.1.2",
    "10.0.1.3",
    "10.0.1.4",
    "10.0.1.5",
];
/// The pods that also have an IPv6 address (index in [`POD_IPS`], address), as upstream's
/// IPv6 `TestNodePorts` maps them: the pod 10.0.0.2 / fd00:10::2, the endpoints
/// 10.180.0.1 / fd00:10:180::1 and 10.180.2.1 / fd00:10:180::2:1.
const POD_IPV6: &[(usize, &str)] = &[
    (0, "fd00:10::2"),
    (1, "fd00:10:180::1"),
    (9, "fd00:10:180::2:1"),
];
/// The ports every pod serves (TCP and UDP): every target port of every group.
const POD_PORTS: &[u16] = &[53, 80, 5353, 8443];
/// The ports the node and `up` answer on when lb-proxy leaves a packet alone.
const OTHER_PORTS: &[u16] = &[53, 80, 443, 3001, 3002, 3003];

/// Upstream's `testNodeIP`.
const NODE_IP: &str = "192.168.0.2";
/// Upstream's `testNodeIPAlt`.
const NODE_IP_ALT: &str = "192.168.1.2";
/// Upstream's `testExternalClient` (inside the source range 203.0.113.0/25).
const EXTERNAL_CLIENT: &str = "203.0.113.2";
/// Upstream's `testExternalClientBlocked` (outside it).
const EXTERNAL_CLIENT_BLOCKED: &str = "203.0.113.130";
/// Upstream's `testNodeIPv6`.
const NODE_IPV6: &str = "2001:db8::1";
/// Upstream's `testNodeIPv6Alt`.
const NODE_IPV6_ALT: &str = "2001:db8:1::2";
/// Upstream's IPv6 external client.
const EXTERNAL_CLIENT_V6: &str = "2600:5200::1";
/// The node's address on its pod links: a masqueraded connection reaches a pod from it.
const MASQUERADED: &str = "10.0.0.1";
/// The same for IPv6.
const MASQUERADED_V6: &str = "fd00:10::1";

/// How long one attempt waits; a `DROP` is an attempt that times out.
const ATTEMPT_MS: &str = "2000";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Proto {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy)]
enum Output {
    /// Upstream's `output: "ip:port, ip:port"`: each listed endpoint is reached, no other.
    Endpoints(&'static str),
    Drop,
    Reject,
    /// Upstream's `output: ""`: lb-proxy does not touch the packet; the named peer (`node`
    /// or `up`) answers it.
    NotHandled(&'static str),
}

/// One row of an upstream `packetFlowTest` table.
#[derive(Debug, Clone, Copy)]
struct Flow {
    /// Upstream's flow name.
    name: &'static str,
    source: &'static str,
    proto: Proto,
    dest: &'static str,
    port: u16,
    output: Output,
    masq: bool,
}

const fn tcp(
    name: &'static str,
    source: &'static str,
    dest: &'static str,
    port: u16,
    output: Output,
    masq: bool,
) -> Flow {
    Flow {
        name,
        source,
        proto: Proto::Tcp,
        dest,
        port,
        output,
        masq,
    }
}

const fn udp(
    name: &'static str,
    source: &'static str,
    dest: &'static str,
    port: u16,
    output: Output,
    masq: bool,
) -> Flow {
    Flow {
        proto: Proto::Udp,
        ..tcp(name, source, dest, port, output, masq)
    }
}

use Output::{Drop, Endpoints, NotHandled, Reject};

/// The manifests of one upstream (sub-)test and its flows.
struct Group {
    /// Upstream test and sub-test, e.g. `TestInternalTrafficPolicy/internalTrafficPolicy is local…`.
    upstream: String,
    manifests: String,
    flows: Vec<Flow>,
}

// ---------------------------------------------------------------------------------------------
// Manifests: the shapes `kubectl get -o yaml` prints, transcribed from upstream's Go values.

/// A Service `ns/name` with `spec` (YAML lines indented by two) and optional load-balancer
/// ingress IPs.
fn service(ns: &str, name: &str, spec: &str, ingress: &[&str]) -> String {
    let mut s = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}"
    );
    if !ingress.is_empty() {
        s.push_str("status:\n  loadBalancer:\n    ingress:\n");
        for ip in ingress {
            s.push_str(&format!("    - ip: {ip}\n"));
        }
    }
    s
}

/// An endpoint: address, node name, and conditions `(ready, serving, terminating)` when
/// upstream sets them (absent conditions mean ready, as in the API).
type Ep = (
    &'static str,
    Option<&'static str>,
    Option<(bool, bool, bool)>,
);

/// An EndpointSlice `<svc>-<n>` of Service `ns/svc` with `ports` (`name, protocol, port`).
fn slice(ns: &str, svc: &str, n: u32, ports: &[(&str, &str, u16)], eps: &[Ep]) -> String {
    let mut s = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-{n}\n  namespace: {ns}\n  labels:\n    kubernetes.io/service-name: {svc}\naddressType: IPv4\nports:\n"
    );
    for (name, proto, port) in ports {
        s.push_str(&format!(
            "- name: \"{name}\"\n  port: {port}\n  protocol: {proto}\n"
        ));
    }
    s.push_str("endpoints:\n");
    for (ip, node, cond) in eps {
        s.push_str(&format!("- addresses: [\"{ip}\"]\n"));
        if let Some(node) = node {
            s.push_str(&format!("  nodeName: {node}\n"));
        }
        if let Some((r, sv, t)) = cond {
            s.push_str(&format!(
                "  conditions: {{ready: {r}, serving: {sv}, terminating: {t}}}\n"
            ));
        }
    }
    s
}

const P80: &[(&str, &str, u16)] = &[("p80", "TCP", 80)];
const UNNAMED_80: &[(&str, &str, u16)] = &[("", "TCP", 80)];
const LOCAL: Option<&str> = Some("test-node");
const READY: Option<(bool, bool, bool)> = Some((true, true, false));
const SERVING_TERMINATING: Option<(bool, bool, bool)> = Some((false, true, true));
const NOT_SERVING: Option<(bool, bool, bool)> = Some((false, false, true));

// ---------------------------------------------------------------------------------------------
// The groups, in upstream's order.

fn no_endpoints_reject() -> Group {
    let manifests = service(
        "ns1",
        "svc1",
        "  type: LoadBalancer\n  clusterIP: 172.30.0.41\n  externalIPs: [192.168.99.11]\n  ports:\n  - name: p80\n    protocol: TCP\n    port: 80\n    nodePort: 3001\n",
        &["1.2.3.4"],
    );
    Group {
        upstream: "TestNoEndpointsReject".into(),
        manifests,
        flows: vec![
            tcp(
                "pod to cluster IP with no endpoints",
                "10.0.0.2",
                "172.30.0.41",
                80,
                Reject,
                false,
            ),
            tcp(
                "external to external IP with no endpoints",
                EXTERNAL_CLIENT,
                "192.168.99.11",
                80,
                Reject,
                false,
            ),
            tcp(
                "pod to NodePort with no endpoints",
                "10.0.0.2",
                NODE_IP,
                3001,
                Reject,
                false,
            ),
            tcp(
                "external to NodePort with no endpoints",
                EXTERNAL_CLIENT,
                NODE_IP,
                3001,
                Reject,
                false,
            ),
            tcp(
                "pod to LoadBalancer IP with no endpoints",
                "10.0.0.2",
                "1.2.3.4",
                80,
                Reject,
                false,
            ),
            tcp(
                "external to LoadBalancer IP with no endpoints",
                EXTERNAL_CLIENT,
                "1.2.3.4",
                80,
                Reject,
                false,
            ),
        ],
    }
}

fn cluster_ip_general() -> Group {
    let mut manifests = service(
        "ns1",
        "svc1",
        "  clusterIP: 172.30.0.41\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n",
        &[],
    );
    manifests += &service(
        "ns2",
        "svc2",
        "  clusterIP: 172.30.0.42\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n  - name: https\n    port: 443\n    protocol: TCP\n    targetPort: 8443\n  - name: dns-udp\n    port: 53\n    protocol: UDP\n  - name: dns-tcp\n    port: 53\n    protocol: TCP\n    targetPort: 5353\n  - name: dns-sctp\n    port: 53\n    protocol: SCTP\n",
        &[],
    );
    manifests += &slice(
        "ns1",
        "svc1",
        1,
        &[("http", "TCP", 80)],
        &[("10.180.0.1", LOCAL, None)],
    );
    manifests += &slice(
        "ns2",
        "svc2",
        1,
        &[
            ("http", "TCP", 80),
            ("https", "TCP", 8443),
            ("dns-udp", "UDP", 53),
            ("dns-tcp", "TCP", 5353),
            ("dns-sctp", "SCTP", 53),
        ],
        &[
            ("10.180.0.1", LOCAL, None),
            ("10.180.2.1", Some("node2"), None),
        ],
    );
    let both = |p: &'static str| Endpoints(p);
    Group {
        upstream: "TestClusterIPGeneral".into(),
        manifests,
        flows: vec![
            tcp(
                "simple clusterIP",
                "10.180.0.2",
                "172.30.0.41",
                80,
                Endpoints("10.180.0.1:80"),
                false,
            ),
            tcp(
                "hairpin to cluster IP",
                "10.180.0.1",
                "172.30.0.41",
                80,
                Endpoints("10.180.0.1:80"),
                true,
            ),
            tcp(
                "clusterIP with multiple endpoints",
                "10.180.0.2",
                "172.30.0.42",
                80,
                both("10.180.0.1:80, 10.180.2.1:80"),
                false,
            ),
            tcp(
                "clusterIP with TargetPort",
                "10.180.0.2",
                "172.30.0.42",
                443,
                both("10.180.0.1:8443, 10.180.2.1:8443"),
                false,
            ),
            tcp(
                "clusterIP with TCP, UDP, and SCTP on same port (TCP)",
                "10.180.0.2",
                "172.30.0.42",
                53,
                both("10.180.0.1:5353, 10.180.2.1:5353"),
                false,
            ),
            // Upstream names this UDP flow "(TCP)" too.
            udp(
                "clusterIP with TCP, UDP, and SCTP on same port (TCP)",
                "10.180.0.2",
                "172.30.0.42",
                53,
                both("10.180.0.1:53, 10.180.2.1:53"),
                false,
            ),
            udp(
                "TCP-only port does not match UDP traffic",
                "10.180.0.2",
                "172.30.0.42",
                80,
                Reject,
                false,
            ),
            tcp(
                "svc1 does not accept svc2's ports",
                "10.180.0.2",
                "172.30.0.41",
                443,
                Reject,
                false,
            ),
            tcp(
                "packet to unallocated cluster ip",
                "10.180.0.2",
                "172.30.0.50",
                80,
                Drop,
                false,
            ),
        ],
    }
}

fn load_balancer() -> Group {
    let ep = Endpoints("10.180.0.1:80");
    let mut manifests = service(
        "ns1",
        "svc1",
        "  type: LoadBalancer\n  clusterIP: 172.30.0.41\n  ports:\n  - name: p80\n    port: 80\n    protocol: TCP\n    nodePort: 3001\n  loadBalancerSourceRanges: [\"192.168.0.0/24\", \" 203.0.113.0/25\"]\n",
        &["1.2.3.4", "5.6.7.8"],
    );
    manifests += &slice("ns1", "svc1", 1, P80, &[("10.180.0.1", None, None)]);
    Group {
        upstream: "TestLoadBalancer".into(),
        manifests,
        flows: vec![
            tcp(
                "pod to cluster IP",
                "10.0.0.2",
                "172.30.0.41",
                80,
                ep,
                false,
            ),
            tcp(
                "external to nodePort",
                EXTERNAL_CLIENT,
                NODE_IP,
                3001,
                ep,
                true,
            ),
            tcp(
                "nodePort bypasses LoadBalancerSourceRanges",
                EXTERNAL_CLIENT_BLOCKED,
                NODE_IP,
                3001,
                ep,
                true,
            ),
            tcp(
                "accepted external to LB1",
                EXTERNAL_CLIENT,
                "1.2.3.4",
                80,
                ep,
                true,
            ),
            tcp(
                "accepted external to LB2",
                EXTERNAL_CLIENT,
                "5.6.7.8",
                80,
                ep,
                true,
            ),
            tcp(
                "blocked external to LB1",
                EXTERNAL_CLIENT_BLOCKED,
                "1.2.3.4",
                80,
                Drop,
                false,
            ),
            tcp(
                "blocked external to LB2",
                EXTERNAL_CLIENT_BLOCKED,
                "5.6.7.8",
                80,
                Drop,
                false,
            ),
            tcp(
                "pod to LB1 (blocked by LoadBalancerSourceRanges)",
                "10.0.0.2",
                "1.2.3.4",
                80,
                Drop,
                false,
            ),
            tcp(
                "pod to LB2 (blocked by LoadBalancerSourceRanges)",
                "10.0.0.2",
                "5.6.7.8",
                80,
                Drop,
                false,
            ),
            tcp(
                "node to LB1 (allowed by LoadBalancerSourceRanges)",
                NODE_IP,
                "1.2.3.4",
                80,
                ep,
                true,
            ),
            tcp(
                "node to LB2 (allowed by LoadBalancerSourceRanges)",
                NODE_IP,
                "5.6.7.8",
                80,
                ep,
                true,
            ),
            tcp(
                "same node to LB1, SNATted to LB1 (implicitly allowed)",
                "1.2.3.4",
                "1.2.3.4",
                80,
                ep,
                true,
            ),
            tcp(
                "same node to LB2, SNATted to LB2 (implicitly allowed)",
                "5.6.7.8",
                "5.6.7.8",
                80,
                ep,
                true,
            ),
        ],
    }
}

fn node_ports_ipv4() -> Group {
    let both = Endpoints("10.180.0.1:80, 10.180.2.1:80");
    let mut manifests = service(
        "ns1",
        "svc1",
        "  type: NodePort\n  clusterIP: 172.30.0.41\n  ports:\n  - name: p80\n    port: 80\n    protocol: TCP\n    nodePort: 3001\n",
        &[],
    );
    manifests += &slice(
        "ns1",
        "svc1",
        1,
        P80,
        &[("10.180.0.1", None, None), ("10.180.2.1", LOCAL, None)],
    );
    Group {
        upstream: "TestNodePorts/ipv4".into(),
        manifests,
        flows: vec![
            tcp(
                "pod to cluster IP",
                "10.0.0.2",
                "172.30.0.41",
                80,
                both,
                false,
            ),
            tcp(
                "external to nodePort",
                EXTERNAL_CLIENT,
                NODE_IP,
                3001,
                both,
                true,
            ),
            tcp("node to nodePort", NODE_IP, NODE_IP, 3001, both, true),
            tcp(
                "secondary nodeIP ignores NodePorts",
                EXTERNAL_CLIENT,
                NODE_IP_ALT,
                3001,
                NotHandled("node"),
                false,
            ),
        ],
    }
}

/// `TestNodePorts/ipv4, multiple nodeport-addresses`: lb-proxy runs with upstream's
/// `--nodeport-addresses 192.168.0.0/24,192.168.1.0/24,2001:db8::/64`.
fn node_ports_ipv4_multiple_addresses() -> Group {
    let mut g = node_ports_ipv4();
    g.upstream = "TestNodePorts/ipv4, multiple nodeport-addresses".into();
    let both = Endpoints("10.180.0.1:80, 10.180.2.1:80");
    g.flows.pop();
    g.flows.push(tcp(
        "external to nodePort on secondary IP",
        EXTERNAL_CLIENT,
        NODE_IP_ALT,
        3001,
        both,
        true,
    ));
    g
}

/// `TestNodePorts/ipv6`: upstream's IPv6 addresses, NodePorts on 2001:db8::1/128.
fn node_ports_ipv6() -> Group {
    let both = Endpoints("[fd00:10:180::1]:80, [fd00:10:180::2:1]:80");
    let mut manifests = service(
        "ns1",
        "svc1",
        "  type: NodePort\n  clusterIP: fd00:172:30::41\n  clusterIPs: [\"fd00:172:30::41\"]\n  ipFamilies: [IPv6]\n  ports:\n  - name: p80\n    port: 80\n    protocol: TCP\n    nodePort: 3001\n",
        &[],
    );
    manifests += &slice(
        "ns1",
        "svc1",
        1,
        P80,
        &[
            ("fd00:10:180::1", None, None),
            ("fd00:10:180::2:1", LOCAL, None),
        ],
    )
    .replace("addressType: IPv4", "addressType: IPv6");
    Group {
        upstream: "TestNodePorts/ipv6".into(),
        manifests,
        flows: vec![
            tcp(
                "pod to cluster IP",
                "fd00:10::2",
                "fd00:172:30::41",
                80,
                both,
                false,
            ),
            tcp(
                "external to nodePort",
                EXTERNAL_CLIENT_V6,
                NODE_IPV6,
                3001,
                both,
                true,
            ),
            tcp("node to nodePort", NODE_IPV6, NODE_IPV6, 3001, both, true),
            tcp(
                "secondary nodeIP ignores NodePorts",
                EXTERNAL_CLIENT_V6,
                NODE_IPV6_ALT,
                3001,
                NotHandled("node"),
                false,
            ),
        ],
    }
}

/// `TestNodePorts/ipv6, multiple nodeport-addresses`: lb-proxy runs with upstream's
/// `--nodeport-addresses 192.168.0.0/24,192.168.1.0/24,2001:db8::/64,2001:db8:1::2/128`.
fn node_ports_ipv6_multiple_addresses() -> Group {
    let mut g = node_ports_ipv6();
    g.upstream = "TestNodePorts/ipv6, multiple nodeport-addresses".into();
    let both = Endpoints("[fd00:10:180::1]:80, [fd00:10:180::2:1]:80");
    g.flows.pop();
    g.flows.push(tcp(
        "external to nodePort on secondary IP",
        EXTERNAL_CLIENT_V6,
        NODE_IPV6_ALT,
        3001,
        both,
        true,
    ));
    g
}

/// The Service and endpoints of `TestExternalTrafficPolicyLocal` and `…Cluster`.
fn etp_manifests(policy: &str) -> String {
    let mut m = service(
        "ns1",
        "svc1",
        &format!(
            "  type: LoadBalancer\n  externalTrafficPolicy: {policy}\n  clusterIP: 172.30.0.41\n  externalIPs: [192.168.99.11]\n  healthCheckNodePort: 30000\n  ports:\n  - name: p80\n    port: 80\n    protocol: TCP\n    nodePort: 3001\n    targetPort: 80\n"
        ),
        &["1.2.3.4"],
    );
    if policy == "Cluster" {
        m = m.replace("  healthCheckNodePort: 30000\n", "");
    }
    m + &slice(
        "ns1",
        "svc1",
        1,
        P80,
        &[("10.180.0.1", None, None), ("10.180.2.1", LOCAL, None)],
    )
}

fn external_traffic_policy_local() -> Group {
    let both = Endpoints("10.180.0.1:80, 10.180.2.1:80");
    let local = Endpoints("10.180.2.1:80");
    Group {
        upstream: "TestExternalTrafficPolicyLocal".into(),
        manifests: etp_manifests("Local"),
        flows: vec![
            tcp(
                "pod to cluster IP hits both endpoints, unmasqueraded",
                "10.0.0.2",
                "172.30.0.41",
                80,
                both,
                false,
            ),
            tcp(
                "pod to external IP hits both endpoints, unmasqueraded",
                "10.0.0.2",
                "192.168.99.11",
                80,
                both,
                false,
            ),
            tcp(
                "external to external IP hits only local endpoint, unmasqueraded",
                EXTERNAL_CLIENT,
                "192.168.99.11",
                80,
                local,
                false,
            ),
            tcp(
                "pod to LB IP hits only both endpoints, unmasqueraded",
                "10.0.0.2",
                "1.2.3.4",
                80,
                both,
                false,
            ),
            tcp(
                "external to LB IP hits only local endpoint, unmasqueraded",
                EXTERNAL_CLIENT,
                "1.2.3.4",
                80,
                local,
                false,
            ),
            tcp(
                "pod to NodePort hits both endpoints, unmasqueraded",
                "10.0.0.2",
                NODE_IP,
                3001,
                both,
                false,
            ),
            tcp(
                "external to NodePort hits only local endpoint, unmasqueraded",
                EXTERNAL_CLIENT,
                NODE_IP,
                3001,
                local,
                false,
            ),
        ],
    }
}

fn external_traffic_policy_cluster() -> Group {
    let both = Endpoints("10.180.0.1:80, 10.180.2.1:80");
    Group {
        upstream: "TestExternalTrafficPolicyCluster".into(),
        manifests: etp_manifests("Cluster"),
        flows: vec![
            tcp(
                "pod to cluster IP hits both endpoints, unmasqueraded",
                "10.0.0.2",
                "172.30.0.41",
                80,
                both,
                false,
            ),
            tcp(
                "pod to external IP hits both endpoints, masqueraded",
                "10.0.0.2",
                "192.168.99.11",
                80,
                both,
                true,
            ),
            tcp(
                "external to external IP hits both endpoints, masqueraded",
                EXTERNAL_CLIENT,
                "192.168.99.11",
                80,
                both,
                true,
            ),
            tcp(
                "pod to LB IP hits both endpoints, masqueraded",
                "10.0.0.2",
                "1.2.3.4",
                80,
                both,
                true,
            ),
            tcp(
                "external to LB IP hits both endpoints, masqueraded",
                EXTERNAL_CLIENT,
                "1.2.3.4",
                80,
                both,
                true,
            ),
            tcp(
                "pod to NodePort hits both endpoints, masqueraded",
                "10.0.0.2",
                NODE_IP,
                3001,
                both,
                true,
            ),
            tcp(
                "external to NodePort hits both endpoints, masqueraded",
                EXTERNAL_CLIENT,
                NODE_IP,
                3001,
                both,
                true,
            ),
        ],
    }
}

/// A `TestInternalTrafficPolicy` case: name, policy, endpoints (address, node), its flow.
type ItpCase = (
    &'static str,
    &'static str,
    [(&'static str, &'static str); 3],
    Flow,
);

/// `TestInternalTrafficPolicy`: each case, then the same Service with its slice deleted.
fn internal_traffic_policy() -> Vec<Group> {
    let cases: [ItpCase; 4] = [
        (
            "internalTrafficPolicy is cluster",
            "Cluster",
            [
                ("10.0.1.1", "test-node"),
                ("10.0.1.2", "node1"),
                ("10.0.1.3", "node2"),
            ],
            tcp(
                "pod to ClusterIP hits all endpoints",
                "10.0.0.2",
                "172.30.1.1",
                80,
                Endpoints("10.0.1.1:80, 10.0.1.2:80, 10.0.1.3:80"),
                false,
            ),
        ),
        (
            "internalTrafficPolicy is local and there is one local endpoint",
            "Local",
            [
                ("10.0.1.1", "test-node"),
                ("10.0.1.2", "node1"),
                ("10.0.1.3", "node2"),
            ],
            tcp(
                "pod to ClusterIP hits only local endpoint",
                "10.0.0.2",
                "172.30.1.1",
                80,
                Endpoints("10.0.1.1:80"),
                false,
            ),
        ),
        (
            "internalTrafficPolicy is local and there are multiple local endpoints",
            "Local",
            [
                ("10.0.1.1", "test-node"),
                ("10.0.1.2", "test-node"),
                ("10.0.1.3", "node2"),
            ],
            tcp(
                "pod to ClusterIP hits all local endpoints",
                "10.0.0.2",
                "172.30.1.1",
                80,
                Endpoints("10.0.1.1:80, 10.0.1.2:80"),
                false,
            ),
        ),
        (
            "internalTrafficPolicy is local and there are no local endpoints",
            "Local",
            [
                ("10.0.1.1", "node0"),
                ("10.0.1.2", "node1"),
                ("10.0.1.3", "node2"),
            ],
            tcp("no endpoints", "10.0.0.2", "172.30.1.1", 80, Drop, false),
        ),
    ];
    let mut groups = Vec::new();
    for (case, policy, eps, flow) in cases {
        let svc = service(
            "ns1",
            "svc1",
            &format!(
                "  clusterIP: 172.30.1.1\n  internalTrafficPolicy: {policy}\n  selector: {{foo: bar}}\n  ports:\n  - port: 80\n    protocol: TCP\n"
            ),
            &[],
        );
        let eps: Vec<Ep> = eps
            .iter()
            .map(|(ip, node)| (*ip, Some(*node), Some((true, true, false))))
            .collect();
        groups.push(Group {
            upstream: format!("TestInternalTrafficPolicy/{case}"),
            manifests: svc.clone() + &slice("ns1", "svc1", 1, UNNAMED_80, &eps),
            flows: vec![flow],
        });
        groups.push(Group {
            upstream: format!("TestInternalTrafficPolicy/{case} (endpoints deleted)"),
            manifests: svc,
            flows: vec![tcp(
                "endpoints deleted",
                "10.0.0.2",
                "172.30.1.1",
                80,
                Reject,
                false,
            )],
        });
    }
    groups
}

/// `TestTerminatingEndpointsTrafficPolicyLocal` and `…Cluster`: each case, then the same
/// Service with its slice deleted.
fn terminating_endpoints(policy: &str) -> Vec<Group> {
    let local = policy == "Local";
    let svc = service(
        "ns1",
        "svc1",
        &format!(
            "  type: LoadBalancer\n  externalTrafficPolicy: {policy}\n  clusterIP: 172.30.1.1\n  healthCheckNodePort: 30000\n  ports:\n  - port: 80\n    targetPort: 80\n    protocol: TCP\n"
        ),
        &["1.2.3.4"],
    );
    let svc = if local {
        svc
    } else {
        svc.replace("  healthCheckNodePort: 30000\n", "")
    };
    let other = if local { "node-1" } else { "another-node" };
    let test = format!("TestTerminatingEndpointsTrafficPolicy{policy}");
    let pod = |name, output| tcp(name, "10.0.0.2", "172.30.1.1", 80, output, false);
    let ext = |name, output, masq| tcp(name, EXTERNAL_CLIENT, "1.2.3.4", 80, output, masq);
    let cases: Vec<(&str, Vec<Ep>, Vec<Flow>)> = vec![
        (
            "ready endpoints exist",
            vec![
                ("10.0.1.1", LOCAL, READY),
                ("10.0.1.2", LOCAL, READY),
                (
                    "10.0.1.3",
                    if local { LOCAL } else { Some(other) },
                    SERVING_TERMINATING,
                ),
                (
                    "10.0.1.4",
                    if local { LOCAL } else { Some(other) },
                    NOT_SERVING,
                ),
                ("10.0.1.5", Some(other), READY),
            ],
            vec![
                pod(
                    "pod to clusterIP",
                    Endpoints("10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80"),
                ),
                if local {
                    ext(
                        "external to LB",
                        Endpoints("10.0.1.1:80, 10.0.1.2:80"),
                        false,
                    )
                } else {
                    ext(
                        "external to LB",
                        Endpoints("10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80"),
                        true,
                    )
                },
            ],
        ),
        (
            "only terminating endpoints exist",
            vec![
                ("10.0.1.2", LOCAL, SERVING_TERMINATING),
                ("10.0.1.3", LOCAL, SERVING_TERMINATING),
                (
                    "10.0.1.4",
                    if local { LOCAL } else { Some(other) },
                    NOT_SERVING,
                ),
                (
                    "10.0.1.5",
                    Some(other),
                    if local { READY } else { SERVING_TERMINATING },
                ),
            ],
            if local {
                vec![
                    pod("pod to clusterIP", Endpoints("10.0.1.5:80")),
                    ext(
                        "external to LB",
                        Endpoints("10.0.1.2:80, 10.0.1.3:80"),
                        false,
                    ),
                ]
            } else {
                vec![
                    pod(
                        "pod to clusterIP",
                        Endpoints("10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80"),
                    ),
                    ext(
                        "external to LB",
                        Endpoints("10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80"),
                        true,
                    ),
                ]
            },
        ),
        (
            "terminating endpoints on remote node",
            vec![("10.0.1.5", Some("node-1"), SERVING_TERMINATING)],
            if local {
                vec![
                    pod("pod to clusterIP", Endpoints("10.0.1.5:80")),
                    ext("external to LB, no locally-usable endpoints", Drop, false),
                ]
            } else {
                vec![
                    pod("pod to clusterIP", Endpoints("10.0.1.5:80")),
                    ext("external to LB", Endpoints("10.0.1.5:80"), true),
                ]
            },
        ),
        (
            "no usable endpoints on any node",
            vec![
                ("10.0.1.5", LOCAL, NOT_SERVING),
                ("10.0.1.5", Some("node-1"), NOT_SERVING),
            ],
            if local {
                vec![
                    pod("pod to clusterIP, no usable endpoints", Reject),
                    ext("external to LB, no usable endpoints", Reject, false),
                ]
            } else {
                vec![
                    pod("pod to clusterIP", Reject),
                    ext("external to LB", Reject, false),
                ]
            },
        ),
    ];
    let mut groups = Vec::new();
    for (case, eps, flows) in cases {
        groups.push(Group {
            upstream: format!("{test}/{case}"),
            manifests: svc.clone() + &slice("ns1", "svc1", 1, UNNAMED_80, &eps),
            flows,
        });
        groups.push(Group {
            upstream: format!("{test}/{case} (endpoints deleted)"),
            manifests: svc.clone(),
            flows: vec![
                pod("pod to clusterIP after endpoints deleted", Reject),
                ext("external to LB after endpoints deleted", Reject, false),
            ],
        });
    }
    groups
}

/// `TestOverallNFTablesRules` compares its whole ruleset as text and has no flow table in
/// v1.33–v1.35. Its six Services are transcribed, and the flows below are *derived* from its
/// expected ruleset (each names the rule it follows), not upstream's own flows.
fn overall_nftables_rules_derived() -> Group {
    let mut m = service(
        "ns1",
        "svc1",
        "  clusterIP: 172.30.0.41\n  ports:\n  - name: p80\n    port: 80\n    protocol: TCP\n",
        &[],
    );
    m += &service(
        "ns2",
        "svc2",
        "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  clusterIP: 172.30.0.42\n  externalIPs: [192.168.99.22]\n  healthCheckNodePort: 30000\n  ports:\n  - name: p80\n    port: 80\n    protocol: TCP\n    nodePort: 3001\n",
        &["1.2.3.4"],
    );
    m += &service(
        "ns3",
        "svc3",
        "  type: NodePort\n  clusterIP: 172.30.0.43\n  ports:\n  - name: p80\n    port: 80\n    protocol: TCP\n    nodePort: 3003\n",
        &[],
    );
    m += &service(
        "ns4",
        "svc4",
        "  type: NodePort\n  clusterIP: 172.30.0.44\n  externalIPs: [192.168.99.33]\n  ports:\n  - name: p80\n    port: 80\n    protocol: TCP\n    targetPort: 80\n",
        &[],
    );
    m += &service(
        "ns5",
        "svc5",
        "  type: LoadBalancer\n  externalTrafficPolicy: Cluster\n  clusterIP: 172.30.0.45\n  healthCheckNodePort: 30000\n  loadBalancerSourceRanges: [\" 203.0.113.0/25\"]\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 10800\n  ports:\n  - name: p80\n    port: 80\n    protocol: TCP\n    nodePort: 3002\n",
        &["5.6.7.8"],
    );
    m += &service(
        "ns6",
        "svc6",
        "  type: ClusterIP\n  clusterIP: 172.30.0.46\n  ports:\n  - name: p80\n    port: 80\n    protocol: TCP\n    targetPort: 80\n",
        &[],
    );
    m += &slice("ns1", "svc1", 1, P80, &[("10.180.0.1", None, None)]);
    // Not local (no node name), so svc2 has no local endpoint.
    m += &slice("ns2", "svc2", 1, P80, &[("10.180.0.2", None, None)]);
    m += &slice("ns3", "svc3", 1, P80, &[("10.180.0.3", None, None)]);
    m += &slice(
        "ns4",
        "svc4",
        1,
        P80,
        &[("10.180.0.4", None, None), ("10.180.0.5", LOCAL, None)],
    );
    m += &slice("ns5", "svc5", 1, P80, &[("10.180.0.3", None, None)]);
    let (pod, ext, blocked) = ("10.0.0.2", EXTERNAL_CLIENT, EXTERNAL_CLIENT_BLOCKED);
    let svc4 = Endpoints("10.180.0.4:80, 10.180.0.5:80");
    Group {
        upstream: "TestOverallNFTablesRules (flows derived from its expected ruleset)".into(),
        manifests: m,
        flows: vec![
            tcp(
                "svc1 service-ips: pod to cluster IP",
                pod,
                "172.30.0.41",
                80,
                Endpoints("10.180.0.1:80"),
                false,
            ),
            tcp(
                "svc1 `ip saddr != 10.0.0.0/8 jump mark-for-masquerade`: external to cluster IP",
                ext,
                "172.30.0.41",
                80,
                Endpoints("10.180.0.1:80"),
                true,
            ),
            tcp(
                "svc2 external chain `short-circuit pod traffic`: pod to LB IP",
                pod,
                "1.2.3.4",
                80,
                Endpoints("10.180.0.2:80"),
                false,
            ),
            tcp(
                "svc2 no-endpoint-services `1.2.3.4 . tcp . 80 : drop`: external to LB IP",
                ext,
                "1.2.3.4",
                80,
                Drop,
                false,
            ),
            tcp(
                "svc2 no-endpoint-services `192.168.99.22 . tcp . 80 : drop`: external to external IP",
                ext,
                "192.168.99.22",
                80,
                Drop,
                false,
            ),
            tcp(
                "svc2 no-endpoint-nodeports `tcp . 3001 : drop`: external to NodePort",
                ext,
                NODE_IP,
                3001,
                Drop,
                false,
            ),
            tcp(
                "svc2 external chain `short-circuit local traffic`, masqueraded: node to NodePort",
                NODE_IP,
                NODE_IP,
                3001,
                Endpoints("10.180.0.2:80"),
                true,
            ),
            tcp(
                "svc3 service-nodeports `tcp . 3003`: external to NodePort",
                ext,
                NODE_IP,
                3003,
                Endpoints("10.180.0.3:80"),
                true,
            ),
            tcp(
                "svc4 service-ips `192.168.99.33 . tcp . 80`: external to external IP",
                ext,
                "192.168.99.33",
                80,
                svc4,
                true,
            ),
            tcp(
                "svc4 service-ips: pod to cluster IP",
                pod,
                "172.30.0.44",
                80,
                svc4,
                false,
            ),
            tcp(
                "svc5 firewall `ip saddr != { 203.0.113.0/25 } drop`: allowed external to LB IP",
                ext,
                "5.6.7.8",
                80,
                Endpoints("10.180.0.3:80"),
                true,
            ),
            tcp(
                "svc5 firewall `ip saddr != { 203.0.113.0/25 } drop`: blocked external to LB IP",
                blocked,
                "5.6.7.8",
                80,
                Drop,
                false,
            ),
            tcp(
                "svc5 service-nodeports `tcp . 3002` (no firewall on NodePorts): blocked external to NodePort",
                blocked,
                NODE_IP,
                3002,
                Endpoints("10.180.0.3:80"),
                true,
            ),
            tcp(
                "svc6 no-endpoint-services `goto reject-chain`: pod to cluster IP",
                pod,
                "172.30.0.46",
                80,
                Reject,
                false,
            ),
        ],
    }
}

fn internal_external_masquerade_manifests() -> String {
    let mut m = String::new();
    for (n, extra, lb) in [
        (1, "", "1.2.3.4"),
        (2, "  externalTrafficPolicy: Local\n", "5.6.7.8"),
        (3, "  internalTrafficPolicy: Local\n", "9.10.11.12"),
    ] {
        m += &service(
            &format!("ns{n}"),
            &format!("svc{n}"),
            &format!(
                "  type: LoadBalancer\n  clusterIP: 172.30.0.4{n}\n  healthCheckNodePort: 3000{n}\n{extra}  ports:\n  - name: p80\n    port: 80\n    protocol: TCP\n    nodePort: 300{n}\n"
            ),
            &[lb],
        );
        m += &slice(
            &format!("ns{n}"),
            &format!("svc{n}"),
            1,
            P80,
            &[
                (
                    ["10.180.0.1", "10.180.0.2", "10.180.0.3"][n - 1],
                    LOCAL,
                    None,
                ),
                (
                    ["10.180.1.1", "10.180.1.2", "10.180.1.3"][n - 1],
                    Some("remote"),
                    None,
                ),
            ],
        );
    }
    m
}

/// `TestInternalExternalMasquerade`: one flow table for four sub-tests, each with upstream's
/// overrides of the base expectations (`output` for eTP:Local short-circuits, `masq`).
/// lb-proxy runs with `--masquerade-all` for `masqueradeAll`, and without `--cluster-cidr`
/// (no local-traffic detector) for `no LocalTrafficDetector`.
fn internal_external_masquerade(sub_test: &str) -> Group {
    let mut g = internal_external_masquerade_base();
    let no_detector = sub_test.contains("no LocalTrafficDetector");
    let masquerade_all = sub_test.starts_with("masqueradeAll");
    let only_local = Endpoints("10.180.0.2:80");
    let mut overrides: Vec<(&str, Option<Output>, Option<bool>)> = Vec::new();
    if no_detector {
        // With no local-traffic detector, all traffic to a ClusterIP is assumed to come from
        // a pod (no masquerading unless masqueradeAll), and there is no eTP:Local
        // short-circuit for pods.
        if !masquerade_all {
            for name in [
                "node to ClusterIP",
                "node to ClusterIP with eTP:Local",
                "node to ClusterIP with iTP:Local",
                "external to ClusterIP",
                "external to ClusterIP with eTP:Local",
                "external to ClusterIP with iTP:Local",
            ] {
                overrides.push((name, None, Some(false)));
            }
        }
        overrides.push(("pod to NodePort with eTP:Local", Some(only_local), None));
        overrides.push(("pod to LB with eTP:Local", Some(only_local), None));
    }
    if masquerade_all {
        for name in [
            "pod to ClusterIP",
            "pod to ClusterIP with eTP:Local",
            "pod to ClusterIP with iTP:Local",
        ] {
            overrides.push((name, None, Some(true)));
        }
    }
    for (name, output, masq) in overrides {
        let f = g
            .flows
            .iter_mut()
            .find(|f| f.name == name)
            .expect("an override names a flow of the table");
        if let Some(o) = output {
            f.output = o;
        }
        if let Some(m) = masq {
            f.masq = m;
        }
    }
    g.upstream = format!("TestInternalExternalMasquerade/{sub_test}");
    g
}

/// `TestInternalExternalMasquerade`'s base flow table (a working local-traffic detector, no
/// masqueradeAll).
fn internal_external_masquerade_base() -> Group {
    const S1: Output = Endpoints("10.180.0.1:80, 10.180.1.1:80");
    const S2: Output = Endpoints("10.180.0.2:80, 10.180.1.2:80");
    const S3: Output = Endpoints("10.180.0.3:80, 10.180.1.3:80");
    const POD: &str = "10.0.0.2";
    Group {
        upstream: "TestInternalExternalMasquerade/base".into(),
        manifests: internal_external_masquerade_manifests(),
        flows: vec![
            tcp("pod to ClusterIP", POD, "172.30.0.41", 80, S1, false),
            tcp("pod to NodePort", POD, NODE_IP, 3001, S1, true),
            tcp("pod to LB", POD, "1.2.3.4", 80, S1, true),
            tcp("node to ClusterIP", NODE_IP, "172.30.0.41", 80, S1, true),
            tcp("node to NodePort", NODE_IP, NODE_IP, 3001, S1, true),
            tcp("node to LB", NODE_IP, "1.2.3.4", 80, S1, true),
            tcp(
                "external to ClusterIP",
                EXTERNAL_CLIENT,
                "172.30.0.41",
                80,
                S1,
                true,
            ),
            tcp(
                "external to NodePort",
                EXTERNAL_CLIENT,
                NODE_IP,
                3001,
                S1,
                true,
            ),
            tcp("external to LB", EXTERNAL_CLIENT, "1.2.3.4", 80, S1, true),
            tcp(
                "pod to ClusterIP with eTP:Local",
                POD,
                "172.30.0.42",
                80,
                S2,
                false,
            ),
            tcp(
                "pod to NodePort with eTP:Local",
                POD,
                NODE_IP,
                3002,
                S2,
                false,
            ),
            tcp("pod to LB with eTP:Local", POD, "5.6.7.8", 80, S2, false),
            tcp(
                "node to ClusterIP with eTP:Local",
                NODE_IP,
                "172.30.0.42",
                80,
                S2,
                true,
            ),
            // Upstream's flow targets port 3001 (svc1's NodePort), hence svc1's endpoints.
            tcp(
                "node to NodePort with eTP:Local",
                NODE_IP,
                NODE_IP,
                3001,
                S1,
                true,
            ),
            tcp(
                "node to LB with eTP:Local",
                NODE_IP,
                "5.6.7.8",
                80,
                S2,
                true,
            ),
            tcp(
                "external to ClusterIP with eTP:Local",
                EXTERNAL_CLIENT,
                "172.30.0.42",
                80,
                S2,
                true,
            ),
            tcp(
                "external to NodePort with eTP:Local",
                EXTERNAL_CLIENT,
                NODE_IP,
                3002,
                Endpoints("10.180.0.2:80"),
                false,
            ),
            tcp(
                "external to LB with eTP:Local",
                EXTERNAL_CLIENT,
                "5.6.7.8",
                80,
                Endpoints("10.180.0.2:80"),
                false,
            ),
            tcp(
                "pod to ClusterIP with iTP:Local",
                POD,
                "172.30.0.43",
                80,
                Endpoints("10.180.0.3:80"),
                false,
            ),
            tcp(
                "pod to NodePort with iTP:Local",
                POD,
                NODE_IP,
                3003,
                S3,
                true,
            ),
            tcp("pod to LB with iTP:Local", POD, "9.10.11.12", 80, S3, true),
            tcp(
                "node to ClusterIP with iTP:Local",
                NODE_IP,
                "172.30.0.43",
                80,
                Endpoints("10.180.0.3:80"),
                true,
            ),
            tcp(
                "node to NodePort with iTP:Local",
                NODE_IP,
                NODE_IP,
                3003,
                S3,
                true,
            ),
            tcp(
                "node to LB with iTP:Local",
                NODE_IP,
                "9.10.11.12",
                80,
                S3,
                true,
            ),
            tcp(
                "external to ClusterIP with iTP:Local",
                EXTERNAL_CLIENT,
                "172.30.0.43",
                80,
                Endpoints("10.180.0.3:80"),
                true,
            ),
            tcp(
                "external to NodePort with iTP:Local",
                EXTERNAL_CLIENT,
                NODE_IP,
                3003,
                S3,
                true,
            ),
            tcp(
                "external to LB with iTP:Local",
                EXTERNAL_CLIENT,
                "9.10.11.12",
                80,
                S3,
                true,
            ),
        ],
    }
}

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
    t.write_manifest(
        "node.yaml",
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: test-node\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 192.168.0.2\n",
    );
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
/// in parallel; returns the failures, each with its provenance.
fn run_group(lab: &mut Lab, g: &Group) -> Vec<String> {
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
    lab.t.drain_applied();
    lab.t.write_manifest("flows.yaml", &(marker + &g.manifests));
    lab.t.wait_applied();
    let clients = &lab.clients;
    std::thread::scope(|s| {
        let handles: Vec<_> = g
            .flows
            .iter()
            .map(|f| s.spawn(move || (f, clients.run(f))))
            .collect();
        handles
            .into_iter()
            .filter_map(|h| match h.join().expect("flow thread") {
                (_, Ok(())) => None,
                (f, Err(e)) => Some(format!(
                    "{} / {:?} ({:?} {} -> {}:{}): {e}",
                    g.upstream, f.name, f.proto, f.source, f.dest, f.port
                )),
            })
            .collect()
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

/// Restarts lb-proxy with upstream's fake-proxier settings changed by `flags` (e.g.
/// `--masquerade-all`); `cluster_cidr: false` runs it without a local-traffic detector.
fn restart(lab: &mut Lab, cluster_cidr: bool, nodeport_addresses: &str, flags: &[&str]) {
    if let Some(i) = lab.proxy.take() {
        lab.t.stop(i);
    }
    let dir = lab.t.dir.to_string_lossy().into_owned();
    let mut args = vec!["run", "--node", "test-node"];
    if cluster_cidr {
        args.extend(["--cluster-cidr", "10.0.0.0/8,fd00:10::/64"]);
    }
    args.extend(["--nodeport-addresses", nodeport_addresses]);
    // Upstream's fake proxier knows the ServiceCIDRs 172.30.0.0/16 and fd00:10:96::/112.
    args.extend(["--service-cidr", "172.30.0.0/16,fd00:10:96::/112"]);
    args.extend(flags);
    args.extend(["--poll", "100ms", "-f", &dir]);
    lab.proxy = Some(lab.t.start_proxy_with(&args));
}

#[test]
fn upstream_packet_flow_tables_hold_with_real_packets() {
    let started = std::time::Instant::now();
    let mut lab = lab();
    let mut failures = Vec::new();
    let (mut flows, mut groups) = (0, 0);
    let mut run = |lab: &mut Lab, g: Group| {
        failures.extend(run_group(lab, &g));
        flows += g.flows.len();
        groups += 1;
    };

    // Upstream's NewFakeProxier: pod CIDRs 10.0.0.0/8 and fd00:10::/64, NodePorts on
    // 192.168.0.2/32 and 2001:db8::1/128.
    let fake_nodeports = "192.168.0.2/32,2001:db8::1/128";
    restart(&mut lab, true, fake_nodeports, &[]);
    run(&mut lab, overall_nftables_rules_derived());
    run(&mut lab, no_endpoints_reject());
    run(&mut lab, cluster_ip_general());
    run(&mut lab, node_ports_ipv4());
    run(&mut lab, node_ports_ipv6());
    run(&mut lab, external_traffic_policy_local());
    run(&mut lab, external_traffic_policy_cluster());
    for g in internal_traffic_policy() {
        run(&mut lab, g);
    }
    for g in terminating_endpoints("Local") {
        run(&mut lab, g);
    }
    for g in terminating_endpoints("Cluster") {
        run(&mut lab, g);
    }
    run(&mut lab, internal_external_masquerade("base"));
    // TestLoadBalancer models a node that holds its load-balancer IPs.
    node_ip(&lab, "add", "1.2.3.4");
    node_ip(&lab, "add", "5.6.7.8");
    run(&mut lab, load_balancer());
    node_ip(&lab, "del", "1.2.3.4");
    node_ip(&lab, "del", "5.6.7.8");

    // Sub-tests that change the fake proxier's settings: one lb-proxy run each.
    restart(
        &mut lab,
        true,
        "192.168.0.0/24,192.168.1.0/24,2001:db8::/64",
        &[],
    );
    run(&mut lab, node_ports_ipv4_multiple_addresses());
    restart(
        &mut lab,
        true,
        "192.168.0.0/24,192.168.1.0/24,2001:db8::/64,2001:db8:1::2/128",
        &[],
    );
    run(&mut lab, node_ports_ipv6_multiple_addresses());
    restart(&mut lab, true, fake_nodeports, &["--masquerade-all"]);
    run(&mut lab, internal_external_masquerade("masqueradeAll"));
    restart(&mut lab, false, fake_nodeports, &[]);
    run(
        &mut lab,
        internal_external_masquerade("no LocalTrafficDetector"),
    );
    restart(&mut lab, false, fake_nodeports, &["--masquerade-all"]);
    run(
        &mut lab,
        internal_external_masquerade("masqueradeAll, no LocalTrafficDetector"),
    );

    eprintln!(
        "{flows} upstream flows in {groups} groups, {} failed, in {:?}",
        failures.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {flows} upstream flows differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
