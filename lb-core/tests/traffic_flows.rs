//! Upstream kube-proxy's packet-flow tables, decided by `traffic::classify` and `categorize`
//! without a dataplane.
//!
//! Upstream's `pkg/proxy/nftables/proxier_test.go` (kubernetes/kubernetes, v1.33–v1.35) checks
//! its rulesets with flow tables: a source, a destination, and the outcome (the endpoints that
//! may be reached, DROP or REJECT, and whether the packet is masqueraded). The cases of the
//! tests that are about traffic policy are transcribed here, in our model, each flow named as
//! upstream names it: `TestInternalExternalMasquerade` (its four sub-tests),
//! `TestExternalTrafficPolicyLocal` / `…Cluster`, `TestNoEndpointsReject`,
//! `TestInternalTrafficPolicy` and the source ranges of `TestLoadBalancer`. The same tables run
//! with real packets in `tests/tests/upstream_flows.rs`; here a broken rule fails in
//! milliseconds.
//!
//! Upstream's addresses: pods 10.0.0.0/8, the node 192.168.0.2, external clients
//! 203.0.113.0/24. A source is given as what the node can tell of it ([`Source`]).

use lb_core::traffic::{self, Destination, Masquerading, Outcome, Source};
use lb_core::{Endpoint, Node, Protocol, ServicePort, ServiceType, TrafficPolicy, categorize};

const NODE: &str = "test-node";

fn node() -> Node {
    Node::new(NODE, None)
        .expect("valid node")
        .with_addresses(["192.168.0.2".parse().expect("literal address")])
}

/// What a flow sees: the endpoints it may reach (sorted `ip`s), or DROP / REJECT; and whether
/// it is masqueraded (only meaningful when served).
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    output: String,
    masq: bool,
}

fn flow(
    port: &ServicePort,
    endpoints: &[Endpoint],
    destination: Destination,
    source: Source,
    rules: Masquerading,
) -> Seen {
    let node = node();
    let c = categorize(port, endpoints, &node);
    let class = traffic::classify(port, destination, source, rules);
    match class.outcome(&c) {
        Outcome::Serve(set) => {
            let mut ips: Vec<String> = c.iter(set).map(|e| e.ip().to_string()).collect();
            ips.sort();
            Seen {
                output: ips.join(", "),
                masq: class.masquerade(),
            }
        }
        Outcome::Drop => Seen {
            output: "DROP".into(),
            masq: false,
        },
        Outcome::Reject => Seen {
            output: "REJECT".into(),
            masq: false,
        },
    }
}

fn seen(output: &str, masq: bool) -> Seen {
    Seen {
        output: output.into(),
        masq,
    }
}

fn ep(ip: &str, node: Option<&str>) -> Endpoint {
    let b = Endpoint::builder(ip, 80);
    match node {
        Some(n) => b.node_name(n),
        None => b,
    }
    .build()
    .expect("valid endpoint")
}

const DETECTOR: Masquerading = Masquerading {
    masquerade_all: false,
    detects_pods: true,
};

// ---------------------------------------------------------------------------------------------
// TestInternalExternalMasquerade

/// svc1: plain LoadBalancer; svc2: eTP Local; svc3: iTP Local. Each with one endpoint on this
/// node (10.180.0.N) and one elsewhere (10.180.1.N).
fn masquerade_services() -> Vec<(ServicePort, Vec<Endpoint>)> {
    (1..=3)
        .map(|n| {
            let port = ServicePort::builder(
                &format!("ns{n}"),
                &format!("svc{n}"),
                "p80",
                Protocol::Tcp,
                80,
            )
            .cluster_ips([format!("172.30.0.4{n}").as_str()])
            .service_type(ServiceType::LoadBalancer)
            .node_port(3000 + n)
            .health_check_node_port(30000 + n)
            .load_balancer_ips([["1.2.3.4", "5.6.7.8", "9.10.11.12"][n as usize - 1]])
            .external_traffic_policy(if n == 2 {
                TrafficPolicy::Local
            } else {
                TrafficPolicy::Cluster
            })
            .internal_traffic_policy(if n == 3 {
                TrafficPolicy::Local
            } else {
                TrafficPolicy::Cluster
            })
            .build()
            .expect("valid service");
            let eps = vec![
                ep(&format!("10.180.0.{n}"), Some(NODE)),
                ep(&format!("10.180.1.{n}"), Some("remote")),
            ];
            (port, eps)
        })
        .collect()
}

/// Upstream's base table (a detector, no masqueradeAll): name, source, service (1–3),
/// destination, reaches only the local endpoint (else both), masqueraded.
#[rustfmt::skip]
const MASQUERADE_BASE: [(&str, Source, usize, Destination, bool, bool); 27] = {
    use Destination::*;
    use Source::*;
    [
        ("pod to ClusterIP", Pod, 1, ClusterIp, false, false),
        ("pod to NodePort", Pod, 1, NodePort, false, true),
        ("pod to LB", Pod, 1, LoadBalancerIp, false, true),
        ("node to ClusterIP", Node, 1, ClusterIp, false, true),
        ("node to NodePort", Node, 1, NodePort, false, true),
        ("node to LB", Node, 1, LoadBalancerIp, false, true),
        ("external to ClusterIP", Elsewhere, 1, ClusterIp, false, true),
        ("external to NodePort", Elsewhere, 1, NodePort, false, true),
        ("external to LB", Elsewhere, 1, LoadBalancerIp, false, true),
        ("pod to ClusterIP with eTP:Local", Pod, 2, ClusterIp, false, false),
        ("pod to NodePort with eTP:Local", Pod, 2, NodePort, false, false),
        ("pod to LB with eTP:Local", Pod, 2, LoadBalancerIp, false, false),
        ("node to ClusterIP with eTP:Local", Node, 2, ClusterIp, false, true),
        // Upstream's flow targets port 3001, svc1's node port (eTP Cluster).
        ("node to NodePort with eTP:Local", Node, 1, NodePort, false, true),
        ("node to LB with eTP:Local", Node, 2, LoadBalancerIp, false, true),
        ("external to ClusterIP with eTP:Local", Elsewhere, 2, ClusterIp, false, true),
        ("external to NodePort with eTP:Local", Elsewhere, 2, NodePort, true, false),
        ("external to LB with eTP:Local", Elsewhere, 2, LoadBalancerIp, true, false),
        ("pod to ClusterIP with iTP:Local", Pod, 3, ClusterIp, true, false),
        ("pod to NodePort with iTP:Local", Pod, 3, NodePort, false, true),
        ("pod to LB with iTP:Local", Pod, 3, LoadBalancerIp, false, true),
        ("node to ClusterIP with iTP:Local", Node, 3, ClusterIp, true, true),
        ("node to NodePort with iTP:Local", Node, 3, NodePort, false, true),
        ("node to LB with iTP:Local", Node, 3, LoadBalancerIp, false, true),
        ("external to ClusterIP with iTP:Local", Elsewhere, 3, ClusterIp, true, true),
        ("external to NodePort with iTP:Local", Elsewhere, 3, NodePort, false, true),
        ("external to LB with iTP:Local", Elsewhere, 3, LoadBalancerIp, false, true),
    ]
};

/// Runs the base table with upstream's overrides for one sub-test: `(flow, only local, masq)`.
fn run_masquerade_table(rules: Masquerading, overrides: &[(&str, Option<bool>, Option<bool>)]) {
    let services = masquerade_services();
    let mut failures = Vec::new();
    for (name, source, n, destination, only_local, masq) in MASQUERADE_BASE {
        let (port, eps) = &services[n - 1];
        let o = overrides.iter().find(|(o, _, _)| *o == name);
        let only_local = o.and_then(|o| o.1).unwrap_or(only_local);
        let masq = o.and_then(|o| o.2).unwrap_or(masq);
        let expected = if only_local {
            seen(&format!("10.180.0.{n}"), masq)
        } else {
            seen(&format!("10.180.0.{n}, 10.180.1.{n}"), masq)
        };
        let got = flow(port, eps, destination, source, rules);
        if got != expected {
            failures.push(format!("{name}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn internal_external_masquerade_base_flows_hold() {
    run_masquerade_table(DETECTOR, &[]);
}

#[test]
fn internal_external_masquerade_with_masquerade_all_masquerades_pods_to_cluster_ips() {
    let rules = Masquerading {
        masquerade_all: true,
        detects_pods: true,
    };
    run_masquerade_table(
        rules,
        &[
            ("pod to ClusterIP", None, Some(true)),
            ("pod to ClusterIP with eTP:Local", None, Some(true)),
            ("pod to ClusterIP with iTP:Local", None, Some(true)),
        ],
    );
}

/// Upstream's overrides without a local-traffic detector: nothing to a cluster IP is
/// masqueraded (unless masqueradeAll), and pods are not short-circuited under eTP Local.
fn no_detector_overrides(masquerade_all: bool) -> Vec<(&'static str, Option<bool>, Option<bool>)> {
    let mut o = Vec::new();
    if !masquerade_all {
        for name in [
            "node to ClusterIP",
            "node to ClusterIP with eTP:Local",
            "node to ClusterIP with iTP:Local",
            "external to ClusterIP",
            "external to ClusterIP with eTP:Local",
            "external to ClusterIP with iTP:Local",
        ] {
            o.push((name, None, Some(false)));
        }
    }
    o.push(("pod to NodePort with eTP:Local", Some(true), None));
    o.push(("pod to LB with eTP:Local", Some(true), None));
    if masquerade_all {
        for name in [
            "pod to ClusterIP",
            "pod to ClusterIP with eTP:Local",
            "pod to ClusterIP with iTP:Local",
        ] {
            o.push((name, None, Some(true)));
        }
    }
    o
}

#[test]
fn internal_external_masquerade_without_a_detector_treats_pods_as_outside_traffic() {
    let rules = Masquerading {
        masquerade_all: false,
        detects_pods: false,
    };
    run_masquerade_table(rules, &no_detector_overrides(false));
}

#[test]
fn internal_external_masquerade_with_masquerade_all_and_no_detector_masquerades_every_cluster_ip_flow()
 {
    let rules = Masquerading {
        masquerade_all: true,
        detects_pods: false,
    };
    run_masquerade_table(rules, &no_detector_overrides(true));
}

// ---------------------------------------------------------------------------------------------
// TestExternalTrafficPolicyLocal / TestExternalTrafficPolicyCluster

fn etp_service(etp: TrafficPolicy) -> (ServicePort, Vec<Endpoint>) {
    let port = ServicePort::builder("ns1", "svc1", "p80", Protocol::Tcp, 80)
        .cluster_ips(["172.30.0.41"])
        .external_ips(["192.168.99.11"])
        .service_type(ServiceType::LoadBalancer)
        .node_port(3001)
        .load_balancer_ips(["1.2.3.4"])
        .external_traffic_policy(etp)
        .build()
        .expect("valid service");
    // One endpoint with no nodeName, one on this node.
    (
        port,
        vec![ep("10.180.0.1", None), ep("10.180.2.1", Some(NODE))],
    )
}

#[test]
fn etp_local_sends_outside_clients_to_local_endpoints_unmasqueraded_and_pods_to_all() {
    use Destination::*;
    use Source::*;
    let (port, eps) = etp_service(TrafficPolicy::Local);
    let both = "10.180.0.1, 10.180.2.1";
    let local = "10.180.2.1";
    #[rustfmt::skip]
    let table = [
        ("pod to cluster IP hits both endpoints, unmasqueraded", Pod, ClusterIp, both, false),
        ("pod to external IP hits both endpoints, unmasqueraded", Pod, ExternalIp, both, false),
        ("external to external IP hits only local endpoint, unmasqueraded", Elsewhere, ExternalIp, local, false),
        ("pod to LB IP hits only both endpoints, unmasqueraded", Pod, LoadBalancerIp, both, false),
        ("external to LB IP hits only local endpoint, unmasqueraded", Elsewhere, LoadBalancerIp, local, false),
        ("pod to NodePort hits both endpoints, unmasqueraded", Pod, NodePort, both, false),
        ("external to NodePort hits only local endpoint, unmasqueraded", Elsewhere, NodePort, local, false),
    ];
    for (name, source, destination, output, masq) in table {
        let got = flow(&port, &eps, destination, source, DETECTOR);
        assert_eq!(got, seen(output, masq), "{name}");
    }
}

#[test]
fn etp_cluster_masquerades_every_external_flow_and_not_pods_to_the_cluster_ip() {
    use Destination::*;
    use Source::*;
    let (port, eps) = etp_service(TrafficPolicy::Cluster);
    let both = "10.180.0.1, 10.180.2.1";
    #[rustfmt::skip]
    let table = [
        ("pod to cluster IP hits both endpoints, unmasqueraded", Pod, ClusterIp, false),
        ("pod to external IP hits both endpoints, masqueraded", Pod, ExternalIp, true),
        ("external to external IP hits both endpoints, masqueraded", Elsewhere, ExternalIp, true),
        ("pod to LB IP hits both endpoints, masqueraded", Pod, LoadBalancerIp, true),
        ("external to LB IP hits both endpoints, masqueraded", Elsewhere, LoadBalancerIp, true),
        ("pod to NodePort hits both endpoints, masqueraded", Pod, NodePort, true),
        ("external to NodePort hits both endpoints, masqueraded", Elsewhere, NodePort, true),
    ];
    for (name, source, destination, masq) in table {
        let got = flow(&port, &eps, destination, source, DETECTOR);
        assert_eq!(got, seen(both, masq), "{name}");
    }
}

#[test]
fn etp_local_without_local_endpoints_drops_outside_clients_and_still_serves_pods() {
    let (port, _) = etp_service(TrafficPolicy::Local);
    let eps = vec![ep("10.180.0.1", Some("other-node"))];
    for d in [
        Destination::ExternalIp,
        Destination::LoadBalancerIp,
        Destination::NodePort,
    ] {
        assert_eq!(
            flow(&port, &eps, d, Source::Elsewhere, DETECTOR),
            seen("DROP", false)
        );
        assert_eq!(
            flow(&port, &eps, d, Source::Pod, DETECTOR),
            seen("10.180.0.1", false)
        );
        assert_eq!(
            flow(&port, &eps, d, Source::Node, DETECTOR),
            seen("10.180.0.1", true)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// TestNoEndpointsReject

#[test]
fn a_service_without_endpoints_rejects_every_destination_from_every_source() {
    let port = ServicePort::builder("ns1", "svc1", "p80", Protocol::Tcp, 80)
        .cluster_ips(["172.30.0.41"])
        .external_ips(["192.168.99.11"])
        .service_type(ServiceType::LoadBalancer)
        .node_port(3001)
        .load_balancer_ips(["1.2.3.4"])
        .build()
        .expect("valid service");
    use Destination::*;
    use Source::*;
    #[rustfmt::skip]
    let table = [
        ("pod to cluster IP with no endpoints", Pod, ClusterIp),
        ("external to external IP with no endpoints", Elsewhere, ExternalIp),
        ("pod to NodePort with no endpoints", Pod, NodePort),
        ("external to NodePort with no endpoints", Elsewhere, NodePort),
        ("pod to LoadBalancer IP with no endpoints", Pod, LoadBalancerIp),
        ("external to LoadBalancer IP with no endpoints", Elsewhere, LoadBalancerIp),
    ];
    for (name, source, destination) in table {
        let got = flow(&port, &[], destination, source, DETECTOR);
        assert_eq!(got, seen("REJECT", false), "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// TestInternalTrafficPolicy

/// A case: name, policy, endpoints (address, node), what a pod reaching the cluster IP sees.
type ItpCase = (
    &'static str,
    TrafficPolicy,
    [(&'static str, &'static str); 3],
    &'static str,
);

#[test]
fn internal_traffic_policy_cases_hold_and_reject_once_their_endpoints_are_deleted() {
    use TrafficPolicy::*;
    #[rustfmt::skip]
    let cases: [ItpCase; 4] = [
        ("internalTrafficPolicy is cluster", Cluster,
            [("10.0.1.1", NODE), ("10.0.1.2", "node1"), ("10.0.1.3", "node2")], "10.0.1.1, 10.0.1.2, 10.0.1.3"),
        ("internalTrafficPolicy is local and there is one local endpoint", Local,
            [("10.0.1.1", NODE), ("10.0.1.2", "node1"), ("10.0.1.3", "node2")], "10.0.1.1"),
        ("internalTrafficPolicy is local and there are multiple local endpoints", Local,
            [("10.0.1.1", NODE), ("10.0.1.2", NODE), ("10.0.1.3", "node2")], "10.0.1.1, 10.0.1.2"),
        ("internalTrafficPolicy is local and there are no local endpoints", Local,
            [("10.0.1.1", "node0"), ("10.0.1.2", "node1"), ("10.0.1.3", "node2")], "DROP"),
    ];
    for (case, itp, eps, output) in cases {
        let port = ServicePort::builder("ns1", "svc1", "", Protocol::Tcp, 80)
            .cluster_ips(["172.30.1.1"])
            .internal_traffic_policy(itp)
            .build()
            .expect("valid service");
        let eps: Vec<Endpoint> = eps.iter().map(|(ip, n)| ep(ip, Some(n))).collect();
        assert_eq!(
            flow(&port, &eps, Destination::ClusterIp, Source::Pod, DETECTOR),
            seen(output, false),
            "{case}"
        );
        assert_eq!(
            flow(&port, &[], Destination::ClusterIp, Source::Pod, DETECTOR),
            seen("REJECT", false),
            "{case} (endpoints deleted)"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// TestLoadBalancer: loadBalancerSourceRanges

#[test]
fn source_ranges_let_through_their_ranges_and_the_node_connecting_from_the_load_balancer_ip() {
    let port = ServicePort::builder("ns1", "svc1", "p80", Protocol::Tcp, 80)
        .cluster_ips(["172.30.0.41"])
        .service_type(ServiceType::LoadBalancer)
        .node_port(3001)
        .load_balancer_ips(["1.2.3.4", "5.6.7.8"])
        .load_balancer_source_ranges(["192.168.0.0/24", "203.0.113.0/25"])
        .build()
        .expect("valid service");
    let node = node();
    for lb in ["1.2.3.4", "5.6.7.8"] {
        let lb_ip = lb.parse().expect("literal address");
        let allowed = traffic::allowed_sources(&port, lb_ip, &node).expect("filtered");
        let allows = |src: &str| {
            let ip: std::net::IpAddr = src.parse().expect("literal address");
            allowed.iter().any(|n| n.contains(&ip))
        };
        assert!(allows("203.0.113.2"), "accepted external to {lb}");
        assert!(!allows("203.0.113.130"), "blocked external to {lb}");
        assert!(
            !allows("10.0.0.2"),
            "pod to {lb} (blocked by LoadBalancerSourceRanges)"
        );
        assert!(
            allows("192.168.0.2"),
            "node to {lb} (allowed by LoadBalancerSourceRanges)"
        );
        assert!(
            allows(lb),
            "same node to {lb}, SNATted to {lb} (implicitly allowed)"
        );
    }
    // Node ports and the cluster IP are not filtered.
    let cluster_ip = "172.30.0.41".parse().expect("literal address");
    assert_eq!(traffic::allowed_sources(&port, cluster_ip, &node), None);
}

#[test]
fn source_ranges_without_the_nodes_address_do_not_allow_the_load_balancer_ip_itself() {
    let port = ServicePort::builder("ns1", "svc1", "p80", Protocol::Tcp, 80)
        .cluster_ips(["172.30.0.41"])
        .service_type(ServiceType::LoadBalancer)
        .node_port(3001)
        .load_balancer_ips(["1.2.3.4"])
        .load_balancer_source_ranges(["203.0.113.0/25"])
        .build()
        .expect("valid service");
    let lb_ip = "1.2.3.4".parse().expect("literal address");
    let allowed = traffic::allowed_sources(&port, lb_ip, &node()).expect("filtered");
    assert_eq!(
        allowed,
        vec!["203.0.113.0/25".parse().expect("literal CIDR")]
    );
}
