//! Packet-flow tables traced through the compiled ruleset, without root: what kube-proxy's
//! upstream tables (run in `lb-e2e`'s `upstream_flows_traced`) do not cover — ClientIP
//! affinity, and eTP Local, source ranges, reject vs drop and masquerade on IPv6 as on IPv4.
//! Each row: source, destination, and the expected outcome and masquerade.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use lb_core::IpFamily;
use lb_proxy::compile::{Config, affinity_map, compile};
use lb_proxy::convert::Filter;
use lb_proxy::manifests::Objects;
use lb_proxy::nft::ir::{Element, Family, Ruleset, TableId, Value};
use lb_proxy::nft::trace::{Host, Origin, Outcome, Packet, trace};

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 10.100.0.1\n  - type: InternalIP\n    address: fd00:100::1\n";

/// Dual-stack Services: `shop` (LoadBalancer, eTP Local, source ranges), `web` (ClusterIP with
/// ClientIP affinity), `empty` (no endpoints) and `remote` (eTP Local, only remote endpoints).
const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: shop, namespace: t}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, "fd00:96::20"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  loadBalancerSourceRanges: [203.0.113.0/24, "2001:db8:1::/48"]
  ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30081}]
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.20}, {ip: "2001:db8:20::20"}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: t}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}
  ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: t}
spec:
  clusterIP: 10.96.0.30
  clusterIPs: [10.96.0.30, "fd00:96::30"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: remote, namespace: t}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.31
  clusterIPs: [10.96.0.31, "fd00:96::31"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  externalTrafficPolicy: Local
  healthCheckNodePort: 32001
  ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30083}]
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.31}, {ip: "2001:db8:20::31"}]
"#;

/// EndpointSlices of one family: a local and a remote endpoint for `shop` and `web`, a remote
/// one for `remote`.
fn slices(family: &str, local: &str, remote: &str) -> String {
    let mut s = String::new();
    for (svc, eps) in [
        ("shop", vec![(local, "node-a"), (remote, "node-b")]),
        ("web", vec![(local, "node-a"), (remote, "node-b")]),
        ("remote", vec![(remote, "node-b")]),
    ] {
        s += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-{family}\n  namespace: t\n  labels:\n    kubernetes.io/service-name: {svc}\naddressType: {family}\nports:\n- {{name: http, port: 8080, protocol: TCP}}\nendpoints:\n"
        );
        for (ip, node) in eps {
            s += &format!("- addresses: [\"{ip}\"]\n  nodeName: {node}\n");
        }
    }
    s
}

fn ruleset() -> Ruleset {
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    objects.add_text("node.yaml", NODE, &mut errors);
    objects.add_text("services.yaml", MANIFESTS, &mut errors);
    objects.add_text(
        "v4.yaml",
        &slices("IPv4", "10.244.1.10", "10.244.2.10"),
        &mut errors,
    );
    objects.add_text(
        "v6.yaml",
        &slices("IPv6", "fd00:244:1::10", "fd00:244:2::10"),
        &mut errors,
    );
    assert!(errors.is_empty(), "{errors:?}");
    let (store, _, _) = objects.into_store(Some("node-a"), &Filter::default());
    let snap = store.snapshot().expect("the node is known");
    let config = Config {
        cluster_cidrs: vec![
            "10.244.0.0/16".parse().expect("literal"),
            "fd00:244::/32".parse().expect("literal"),
        ],
        ..Config::default()
    };
    let mut rs = Ruleset::default();
    for family in [IpFamily::V4, IpFamily::V6] {
        let (id, table, _) = compile(&snap, &config, family);
        rs.tables.insert(id, table);
    }
    rs
}

#[derive(Debug, Clone, Copy)]
enum Want {
    Endpoints(&'static [&'static str]),
    Drop,
    Reject,
}

/// `(what, source, destination, from the node itself, expected, masquerade)`.
type Row = (&'static str, &'static str, &'static str, bool, Want, bool);

const LOCAL_V4: &[&str] = &["10.244.1.10:8080"];
const BOTH_V4: &[&str] = &["10.244.1.10:8080", "10.244.2.10:8080"];
const LOCAL_V6: &[&str] = &["[fd00:244:1::10]:8080"];
const BOTH_V6: &[&str] = &["[fd00:244:1::10]:8080", "[fd00:244:2::10]:8080"];

const ROWS: &[Row] = &[
    // eTP Local with source ranges: outside clients in range reach the local endpoint with
    // their own address; out of range they are dropped before DNAT.
    (
        "external in range to LB, eTP Local",
        "203.0.113.5",
        "192.0.2.20:80",
        false,
        Want::Endpoints(LOCAL_V4),
        false,
    ),
    (
        "external in range to LB, eTP Local",
        "2001:db8:1::5",
        "[2001:db8:20::20]:80",
        false,
        Want::Endpoints(LOCAL_V6),
        false,
    ),
    (
        "external out of range to LB",
        "198.51.100.1",
        "192.0.2.20:80",
        false,
        Want::Drop,
        false,
    ),
    (
        "external out of range to LB",
        "2001:db8:99::1",
        "[2001:db8:20::20]:80",
        false,
        Want::Drop,
        false,
    ),
    // The node itself is short-circuited to every endpoint and masqueraded.
    (
        "node to eTP Local node port",
        "10.100.0.1",
        "10.100.0.1:30081",
        true,
        Want::Endpoints(BOTH_V4),
        true,
    ),
    (
        "node to eTP Local node port",
        "fd00:100::1",
        "[fd00:100::1]:30081",
        true,
        Want::Endpoints(BOTH_V6),
        true,
    ),
    (
        "external to eTP Local node port",
        "203.0.113.5",
        "10.100.0.1:30081",
        false,
        Want::Endpoints(LOCAL_V4),
        false,
    ),
    (
        "external to eTP Local node port",
        "2001:db8:1::5",
        "[fd00:100::1]:30081",
        false,
        Want::Endpoints(LOCAL_V6),
        false,
    ),
    // Cluster IPs: pods keep their address, outside the cluster CIDR is masqueraded.
    (
        "pod to cluster IP with affinity",
        "10.244.3.3",
        "10.96.0.10:80",
        false,
        Want::Endpoints(BOTH_V4),
        false,
    ),
    (
        "pod to cluster IP with affinity",
        "fd00:244:3::3",
        "[fd00:96::10]:80",
        false,
        Want::Endpoints(BOTH_V6),
        false,
    ),
    (
        "external to cluster IP",
        "203.0.113.5",
        "10.96.0.10:80",
        false,
        Want::Endpoints(BOTH_V4),
        true,
    ),
    (
        "external to cluster IP",
        "2001:db8:1::5",
        "[fd00:96::10]:80",
        false,
        Want::Endpoints(BOTH_V6),
        true,
    ),
    (
        "hairpin through the cluster IP",
        "10.244.1.10",
        "10.96.0.20:80",
        false,
        Want::Endpoints(BOTH_V4),
        false,
    ),
    // No endpoints: rejected; eTP Local with only remote endpoints: outside traffic dropped.
    (
        "pod to a Service without endpoints",
        "10.244.3.3",
        "10.96.0.30:80",
        false,
        Want::Reject,
        false,
    ),
    (
        "pod to a Service without endpoints",
        "fd00:244:3::3",
        "[fd00:96::30]:80",
        false,
        Want::Reject,
        false,
    ),
    (
        "external to eTP Local without local endpoints",
        "203.0.113.5",
        "192.0.2.31:80",
        false,
        Want::Drop,
        false,
    ),
    (
        "external to eTP Local without local endpoints",
        "2001:db8:1::5",
        "[2001:db8:20::31]:80",
        false,
        Want::Drop,
        false,
    ),
    (
        "pod to eTP Local without local endpoints",
        "fd00:244:3::3",
        "[2001:db8:20::31]:80",
        false,
        Want::Endpoints(&["[fd00:244:2::10]:8080"]),
        false,
    ),
];

fn packet(from: &str, to: &str, from_node: bool) -> Packet {
    let to: SocketAddr = to.parse().expect("literal destination");
    let origin = if from_node {
        Origin::Local { oif: None }
    } else {
        Origin::Arriving { iif: None }
    };
    Packet::new(
        from.parse().expect("literal source"),
        to.ip(),
        6,
        to.port(),
        origin,
    )
}

fn node() -> Host {
    Host::new(["10.100.0.1", "fd00:100::1"].map(|a| a.parse::<IpAddr>().expect("literal")))
}

#[test]
fn etp_local_source_ranges_reject_drop_and_masquerade_hold_on_ipv4_and_ipv6() {
    let rs = ruleset();
    let mut failures = Vec::new();
    for &(what, from, to, from_node, want, masq) in ROWS {
        let t = trace(&rs, &node(), &packet(from, to, from_node)).expect("traceable");
        let got = t.outcome();
        let ok = match want {
            Want::Endpoints(list) => {
                let want: BTreeSet<SocketAddr> =
                    list.iter().map(|a| a.parse().expect("literal")).collect();
                // A hairpin connection is masqueraded on the path back to the client only.
                let masq_ok = if what.starts_with("hairpin") {
                    t.masqueraded_targets()
                        .iter()
                        .all(|a| a.ip().to_string() == from)
                        && t.masquerade_sometimes()
                } else {
                    t.masquerade_always() == masq && t.masquerade_sometimes() == masq
                };
                got == Outcome::Dnat(want) && masq_ok
            }
            Want::Drop => got == Outcome::Drop,
            Want::Reject => got == Outcome::Reject,
        };
        if !ok {
            failures.push(format!(
                "{what} ({from} -> {to}): expected {want:?} masq {masq}, traced {got:?} masq {}",
                t.masquerade_always()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn clientip_affinity_reaches_every_endpoint_by_hash_until_an_entry_pins_the_client() {
    let mut rs = ruleset();
    let first =
        trace(&rs, &node(), &packet("10.244.3.3", "10.96.0.10:80", false)).expect("traceable");
    assert!(
        first.chose_by_hash(),
        "a client without an entry is placed by a hash"
    );
    assert_eq!(
        first.outcome(),
        Outcome::Dnat(BTreeSet::from([
            "10.244.1.10:8080".parse().expect("literal"),
            "10.244.2.10:8080".parse().expect("literal")
        ]))
    );
    // The kernel recorded the client on the remote endpoint: the next connection follows it.
    let table = rs
        .tables
        .get_mut(&TableId::new(Family::Ip, "lb-proxy"))
        .expect("the IPv4 table");
    let map = table
        .sets
        .get_mut(&affinity_map(300))
        .expect("the affinity map for 300 s");
    map.elements.insert(
        vec![
            Value::Ipv4("10.244.3.3".parse().expect("literal")),
            Value::Ipv4("10.96.0.10".parse().expect("literal")),
            Value::TCP,
            Value::Port(80),
        ],
        Element::values(vec![
            Value::Ipv4("10.244.2.10".parse().expect("literal")),
            Value::Port(8080),
        ]),
    );
    let pinned =
        trace(&rs, &node(), &packet("10.244.3.3", "10.96.0.10:80", false)).expect("traceable");
    assert!(!pinned.chose_by_hash());
    assert_eq!(
        pinned.outcome(),
        Outcome::Dnat(BTreeSet::from(["10.244.2.10:8080"
            .parse()
            .expect("literal")]))
    );
    // Another client is still placed by the hash.
    let other =
        trace(&rs, &node(), &packet("10.244.3.4", "10.96.0.10:80", false)).expect("traceable");
    assert!(other.chose_by_hash());
}
