//! Upstream kube-proxy's packet-flow tables (`pkg/proxy/nftables/proxier_test.go`,
//! `runPacketFlowTests`), transcribed as data: each group's manifests and its flows (source,
//! destination, expected endpoints or `DROP`/`REJECT`, masquerade), in the order and with the
//! settings [`schedule`] runs them.
//!
//! Two tests read them: `tests/upstream_flows.rs` sends real packets through a node namespace
//! that `lb-proxy run` programs (and checks that the tracer predicts what the kernel does), and
//! `tests/upstream_flows_traced.rs` runs the same table through the tracer alone, without root,
//! in milliseconds. The provenance of every group and flow is in `tests/upstream_flows.rs`.

use std::collections::BTreeSet;

/// Every pod address of every group, one namespace each (`p<index>`).
pub const POD_IPS: &[&str] = &[
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
pub const POD_IPV6: &[(usize, &str)] = &[
    (0, "fd00:10::2"),
    (1, "fd00:10:180::1"),
    (9, "fd00:10:180::2:1"),
];
/// The ports every pod serves (TCP and UDP): every target port of every group.
pub const POD_PORTS: &[u16] = &[53, 80, 5353, 8443];
/// The ports the node and `up` answer on when lb-proxy leaves a packet alone.
pub const OTHER_PORTS: &[u16] = &[53, 80, 443, 3001, 3002, 3003];

/// Upstream's `testNodeIP`.
pub const NODE_IP: &str = "192.168.0.2";
/// Upstream's `testNodeIPAlt`.
pub const NODE_IP_ALT: &str = "192.168.1.2";
/// Upstream's `testExternalClient` (inside the source range 203.0.113.0/25).
pub const EXTERNAL_CLIENT: &str = "203.0.113.2";
/// Upstream's `testExternalClientBlocked` (outside it).
pub const EXTERNAL_CLIENT_BLOCKED: &str = "203.0.113.130";
/// Upstream's `testNodeIPv6`.
pub const NODE_IPV6: &str = "2001:db8::1";
/// Upstream's `testNodeIPv6Alt`.
pub const NODE_IPV6_ALT: &str = "2001:db8:1::2";
/// Upstream's IPv6 external client.
pub const EXTERNAL_CLIENT_V6: &str = "2600:5200::1";
/// The node's address on its pod links: a masqueraded connection reaches a pod from it.
pub const MASQUERADED: &str = "10.0.0.1";
/// The same for IPv6.
pub const MASQUERADED_V6: &str = "fd00:10::1";

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Proto {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy)]
pub enum Output {
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
pub struct Flow {
    /// Upstream's flow name.
    pub name: &'static str,
    pub source: &'static str,
    pub proto: Proto,
    pub dest: &'static str,
    pub port: u16,
    pub output: Output,
    pub masq: bool,
}

pub const fn tcp(
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

pub const fn udp(
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

pub use self::Output::{Drop, Endpoints, NotHandled, Reject};

/// The manifests of one upstream (sub-)test and its flows.
#[derive(Debug, Clone)]
pub struct Group {
    /// Upstream test and sub-test, e.g. `TestInternalTrafficPolicy/internalTrafficPolicy is local…`.
    pub upstream: String,
    pub manifests: String,
    pub flows: Vec<Flow>,
}

// ---------------------------------------------------------------------------------------------
// Manifests: the shapes `kubectl get -o yaml` prints, transcribed from upstream's Go values.

/// A Service `ns/name` with `spec` (YAML lines indented by two) and optional load-balancer
/// ingress IPs.
pub fn service(ns: &str, name: &str, spec: &str, ingress: &[&str]) -> String {
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
pub type Ep = (
    &'static str,
    Option<&'static str>,
    Option<(bool, bool, bool)>,
);

/// An EndpointSlice `<svc>-<n>` of Service `ns/svc` with `ports` (`name, protocol, port`).
pub fn slice(ns: &str, svc: &str, n: u32, ports: &[(&str, &str, u16)], eps: &[Ep]) -> String {
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

pub const P80: &[(&str, &str, u16)] = &[("p80", "TCP", 80)];
pub const UNNAMED_80: &[(&str, &str, u16)] = &[("", "TCP", 80)];
pub const LOCAL: Option<&str> = Some("test-node");
pub const READY: Option<(bool, bool, bool)> = Some((true, true, false));
pub const SERVING_TERMINATING: Option<(bool, bool, bool)> = Some((false, true, true));
pub const NOT_SERVING: Option<(bool, bool, bool)> = Some((false, false, true));

// ---------------------------------------------------------------------------------------------
// The groups, in upstream's order.

pub fn no_endpoints_reject() -> Group {
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

pub fn cluster_ip_general() -> Group {
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

pub fn load_balancer() -> Group {
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

pub fn node_ports_ipv4() -> Group {
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
pub fn node_ports_ipv4_multiple_addresses() -> Group {
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
pub fn node_ports_ipv6() -> Group {
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
pub fn node_ports_ipv6_multiple_addresses() -> Group {
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
pub fn etp_manifests(policy: &str) -> String {
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

pub fn external_traffic_policy_local() -> Group {
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

pub fn external_traffic_policy_cluster() -> Group {
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
pub type ItpCase = (
    &'static str,
    &'static str,
    [(&'static str, &'static str); 3],
    Flow,
);

/// `TestInternalTrafficPolicy`: each case, then the same Service with its slice deleted.
pub fn internal_traffic_policy() -> Vec<Group> {
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
pub fn terminating_endpoints(policy: &str) -> Vec<Group> {
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
pub fn overall_nftables_rules_derived() -> Group {
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

pub fn internal_external_masquerade_manifests() -> String {
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
pub fn internal_external_masquerade(sub_test: &str) -> Group {
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
pub fn internal_external_masquerade_base() -> Group {
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
// The schedule, and what the tracer predicts.

/// The fake proxier's settings a group runs with (one lb-proxy run per distinct value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// `--cluster-cidr 10.0.0.0/8,fd00:10::/64` (upstream's pod CIDRs); `false`: no
    /// local-traffic detector.
    pub cluster_cidr: bool,
    /// `--nodeport-addresses`.
    pub nodeport_addresses: &'static str,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// Load-balancer IPs the node holds during the group (`TestLoadBalancer`).
    pub node_holds: &'static [&'static str],
}

/// Upstream's `NewFakeProxier`: pod CIDRs 10.0.0.0/8 and fd00:10::/64, NodePorts on
/// 192.168.0.2/32 and 2001:db8::1/128.
pub const FAKE_NODEPORTS: &str = "192.168.0.2/32,2001:db8::1/128";

const FAKE: Settings = Settings {
    cluster_cidr: true,
    nodeport_addresses: FAKE_NODEPORTS,
    masquerade_all: false,
    node_holds: &[],
};

/// Upstream's ServiceCIDRs (`--service-cidr`).
pub const SERVICE_CIDRS: &str = "172.30.0.0/16,fd00:10:96::/112";

/// Upstream's node object (its name, and its IP for allowFromNode).
pub const NODE_YAML: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: test-node\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 192.168.0.2\n";

/// Every group with the settings it runs with, in the order the netns test runs them.
pub fn schedule() -> Vec<(Settings, Group)> {
    let mut s = vec![
        (FAKE, overall_nftables_rules_derived()),
        (FAKE, no_endpoints_reject()),
        (FAKE, cluster_ip_general()),
        (FAKE, node_ports_ipv4()),
        (FAKE, node_ports_ipv6()),
        (FAKE, external_traffic_policy_local()),
        (FAKE, external_traffic_policy_cluster()),
    ];
    s.extend(internal_traffic_policy().into_iter().map(|g| (FAKE, g)));
    s.extend(
        terminating_endpoints("Local")
            .into_iter()
            .map(|g| (FAKE, g)),
    );
    s.extend(
        terminating_endpoints("Cluster")
            .into_iter()
            .map(|g| (FAKE, g)),
    );
    s.push((FAKE, internal_external_masquerade("base")));
    // TestLoadBalancer models a node that holds its load-balancer IPs.
    s.push((
        Settings {
            node_holds: &["1.2.3.4", "5.6.7.8"],
            ..FAKE
        },
        load_balancer(),
    ));
    s.push((
        Settings {
            nodeport_addresses: "192.168.0.0/24,192.168.1.0/24,2001:db8::/64",
            ..FAKE
        },
        node_ports_ipv4_multiple_addresses(),
    ));
    s.push((
        Settings {
            nodeport_addresses: "192.168.0.0/24,192.168.1.0/24,2001:db8::/64,2001:db8:1::2/128",
            ..FAKE
        },
        node_ports_ipv6_multiple_addresses(),
    ));
    s.push((
        Settings {
            masquerade_all: true,
            ..FAKE
        },
        internal_external_masquerade("masqueradeAll"),
    ));
    s.push((
        Settings {
            cluster_cidr: false,
            ..FAKE
        },
        internal_external_masquerade("no LocalTrafficDetector"),
    ));
    s.push((
        Settings {
            cluster_cidr: false,
            masquerade_all: true,
            ..FAKE
        },
        internal_external_masquerade("masqueradeAll, no LocalTrafficDetector"),
    ));
    s
}

/// The node namespace's own addresses (`fib daddr type local`), besides `node_holds`.
pub const NODE_ADDRESSES: &[&str] = &[
    NODE_IP,
    NODE_IP_ALT,
    "192.168.99.11",
    NODE_IPV6,
    NODE_IPV6_ALT,
    MASQUERADED,
    MASQUERADED_V6,
];

/// Whether a flow's source is the node itself (its packets are generated locally).
pub fn from_node(source: &str, s: &Settings) -> bool {
    NODE_ADDRESSES.contains(&source) || s.node_holds.contains(&source)
}

/// The ruleset `lb-proxy run` programs for `manifests` (plus a `marker`-free node object)
/// with settings `s`, compiled in process.
pub fn ruleset(manifests: &str, s: &Settings) -> lb_proxy::nft::ir::Ruleset {
    use lb_proxy::compile::{Config, NodePortAddresses, compile};
    let mut objects = lb_proxy::manifests::Objects::default();
    let mut errors = Vec::new();
    objects.add_text("node.yaml", NODE_YAML, &mut errors);
    objects.add_text("flows.yaml", manifests, &mut errors);
    assert!(errors.is_empty(), "manifests: {errors:?}");
    let (store, _, _) =
        objects.into_store(Some("test-node"), &lb_proxy::convert::Filter::default());
    let snap = store.snapshot().expect("the node is known");
    let nets = |s: &str| -> Vec<ipnet::IpNet> {
        s.split(',')
            .map(|n| n.parse().expect("literal CIDR"))
            .collect()
    };
    let items: Vec<&str> = s.nodeport_addresses.split(',').collect();
    let config = Config {
        cluster_cidrs: if s.cluster_cidr {
            nets("10.0.0.0/8,fd00:10::/64")
        } else {
            Vec::new()
        },
        masquerade_all: s.masquerade_all,
        nodeport_addresses: NodePortAddresses::from_items(&items).expect("literal addresses"),
        service_cidrs: nets(SERVICE_CIDRS),
        ..Config::default()
    };
    let mut rs = lb_proxy::nft::ir::Ruleset::default();
    for family in [lb_core::IpFamily::V4, lb_core::IpFamily::V6] {
        let (id, table, _) = compile(&snap, &config, family);
        rs.tables.insert(id, table);
    }
    rs
}

/// What the tracer predicts for `f`, in the table's terms: the output (endpoints as upstream
/// lists them, in sorted order) and masquerade. Paths that end differently, or DNATed paths
/// that differ in masquerading, are an `Err` describing them.
pub fn predict(
    rs: &lb_proxy::nft::ir::Ruleset,
    s: &Settings,
    f: &Flow,
) -> Result<(Output, bool), String> {
    use lb_proxy::nft::trace::{Host, Origin, Outcome, Packet, trace};
    let ip = |a: &str| -> std::net::IpAddr { a.parse().expect("literal address") };
    let host = Host::new(NODE_ADDRESSES.iter().chain(s.node_holds).map(|a| ip(a)));
    let origin = if from_node(f.source, s) {
        Origin::Local { oif: None }
    } else {
        Origin::Arriving { iif: None }
    };
    let proto = match f.proto {
        Proto::Tcp => 6,
        Proto::Udp => 17,
    };
    let p = Packet::new(ip(f.source), ip(f.dest), proto, f.port, origin);
    let t = trace(rs, &host, &p).map_err(|e| e.to_string())?;
    let masq = t.masquerade_always();
    if masq != t.masquerade_sometimes() {
        return Err(format!(
            "masqueraded on some paths only: {:?}",
            t.masqueraded_targets()
        ));
    }
    Ok(match t.outcome() {
        Outcome::Dnat(to) => {
            let list: Vec<String> = to.iter().map(|a| a.to_string()).collect();
            (
                Output::Endpoints(Box::leak(list.join(", ").into_boxed_str())),
                masq,
            )
        }
        Outcome::Drop => (Output::Drop, masq),
        Outcome::Reject => (Output::Reject, masq),
        Outcome::Accept => {
            let peer = if host.is_local(ip(f.dest)) {
                "node"
            } else {
                "up"
            };
            (Output::NotHandled(peer), masq)
        }
        Outcome::Mixed(ends) => return Err(format!("paths end differently: {ends:?}")),
    })
}

/// Whether a prediction says what upstream's table says (endpoint lists compared as sets; a
/// flow that upstream leaves alone is not masqueraded, whatever its `masq` says).
pub fn agrees(f: &Flow, output: &Output, masq: bool) -> bool {
    let set = |l: &str| -> BTreeSet<String> { l.split(", ").map(str::to_string).collect() };
    match (&f.output, output) {
        (Output::Endpoints(a), Output::Endpoints(b)) => set(a) == set(b) && f.masq == masq,
        (Output::Drop, Output::Drop) | (Output::Reject, Output::Reject) => true,
        (Output::NotHandled(a), Output::NotHandled(b)) => a == b,
        _ => false,
    }
}
