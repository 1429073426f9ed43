//! One test per categorisation rule (kube-proxy `CategorizeEndpoints`, Kubernetes 1.34+).
//! Each test fails if its rule is broken; the cases follow upstream's own test table where one
//! exists, restated in our model.

use lb_core::{
    Categorized, Conditions, Endpoint, EndpointBuilder, EndpointSet, Exclusion, Node, Protocol,
    ServicePort, ServicePortBuilder, ServiceType, TopologyMode, TopologyReason, TrafficPolicy,
    categorize,
};

const NODE: &str = "node-a";

fn node(zone: Option<&str>) -> Node {
    Node::new(NODE, zone).expect("valid node")
}

fn port() -> ServicePortBuilder {
    ServicePort::builder("ns", "svc", "http", Protocol::Tcp, 80).cluster_ips(["172.30.0.1"])
}

fn cluster_ip_service() -> ServicePort {
    port().build().expect("valid service")
}

fn node_port_service(etp: TrafficPolicy, itp: TrafficPolicy) -> ServicePort {
    port()
        .service_type(ServiceType::NodePort)
        .node_port(30080)
        .external_traffic_policy(etp)
        .internal_traffic_policy(itp)
        .build()
        .expect("valid service")
}

fn ep(ip: &str) -> EndpointBuilder {
    Endpoint::builder(ip, 80)
}

fn local(b: EndpointBuilder) -> EndpointBuilder {
    b.node_name(NODE)
}

fn remote(b: EndpointBuilder) -> EndpointBuilder {
    b.node_name("node-b")
}

fn build(eps: Vec<EndpointBuilder>) -> Vec<Endpoint> {
    eps.into_iter()
        .map(|b| b.build().expect("valid endpoint"))
        .collect()
}

fn ips(c: &Categorized<'_>, set: EndpointSet) -> Vec<String> {
    c.iter(set).map(|e| e.ip().to_string()).collect()
}

fn zoned(ip: &str, zones: &[&str]) -> EndpointBuilder {
    ep(ip).hints_for_zones(zones.iter().copied())
}

#[test]
fn ready_endpoints_are_used_and_unready_ones_are_not() {
    let eps = build(vec![
        ep("10.0.0.1").ready(false).serving(false),
        ep("10.0.0.2"),
    ]);
    let node = node(None);
    let c = categorize(&cluster_ip_service(), &eps, &node);
    assert_eq!(ips(&c, EndpointSet::Cluster), ["10.0.0.2"]);
    assert_eq!(ips(&c, EndpointSet::All), ["10.0.0.2"]);
    assert!(c.has_any_endpoints());
    assert_eq!(
        c.why_excluded(EndpointSet::Cluster, 0),
        Some(Exclusion::NotReady {
            serving: false,
            terminating: false
        })
    );
}

#[test]
fn no_ready_endpoints_means_an_empty_cluster_set_and_no_endpoints_at_all() {
    let eps = build(vec![
        ep("10.0.0.1").conditions(Conditions::NOT_READY),
        ep("10.0.0.2").conditions(Conditions::TERMINATING),
    ]);
    let node = node(None);
    let c = categorize(&cluster_ip_service(), &eps, &node);
    assert!(c.cluster_indices().is_empty());
    assert!(c.all_indices().is_empty());
    assert!(
        !c.has_any_endpoints(),
        "non-serving endpoints do not count as endpoints"
    );
}

#[test]
fn serving_terminating_endpoints_are_used_when_none_is_ready() {
    let eps = build(vec![
        local(ep("10.0.0.1")).conditions(Conditions::SERVING_TERMINATING),
        remote(ep("10.0.0.2")).conditions(Conditions::SERVING_TERMINATING),
        ep("10.0.0.3").conditions(Conditions::TERMINATING),
    ]);
    let node = node(None);
    let c = categorize(&cluster_ip_service(), &eps, &node);
    assert_eq!(ips(&c, EndpointSet::Cluster), ["10.0.0.1", "10.0.0.2"]);
    assert!(c.cluster_uses_terminating());
    assert!(c.has_any_endpoints());
    assert_eq!(
        c.why_excluded(EndpointSet::Cluster, 2),
        Some(Exclusion::NotReady {
            serving: false,
            terminating: true
        })
    );
}

#[test]
fn serving_terminating_endpoints_are_ignored_while_a_ready_one_exists() {
    let eps = build(vec![
        ep("10.0.0.1").conditions(Conditions::SERVING_TERMINATING),
        ep("10.0.0.2"),
    ]);
    let node = node(None);
    let c = categorize(&cluster_ip_service(), &eps, &node);
    assert_eq!(ips(&c, EndpointSet::Cluster), ["10.0.0.2"]);
    assert!(!c.cluster_uses_terminating());
    assert_eq!(
        c.why_excluded(EndpointSet::Cluster, 0),
        Some(Exclusion::TerminatingWhileReadyExist)
    );
}

#[test]
fn a_ready_endpoint_that_is_also_terminating_counts_as_ready() {
    // publishNotReadyAddresses keeps ready=true while terminating; kube-proxy goes by `ready`.
    let eps = build(vec![
        ep("10.0.0.1").terminating(true),
        ep("10.0.0.2").ready(false),
    ]);
    let node = node(None);
    let c = categorize(&cluster_ip_service(), &eps, &node);
    assert_eq!(ips(&c, EndpointSet::Cluster), ["10.0.0.1"]);
}

#[test]
fn zone_hints_keep_only_endpoints_hinted_for_the_nodes_zone() {
    let eps = build(vec![
        zoned("10.1.2.3", &["zone-a"]),
        zoned("10.1.2.4", &["zone-b"]),
        zoned("10.1.2.5", &["zone-c"]),
        zoned("10.1.2.6", &["zone-a"]),
    ]);
    let node = node(Some("zone-a"));
    let c = categorize(&cluster_ip_service(), &eps, &node);
    assert_eq!(ips(&c, EndpointSet::Cluster), ["10.1.2.3", "10.1.2.6"]);
    assert_eq!(c.topology().mode, TopologyMode::PreferSameZone);
    assert_eq!(
        c.why_excluded(EndpointSet::Cluster, 1)
            .map(|r| r.to_string())
            .as_deref(),
        Some("hinted for zones [zone-b], not for this node's zone zone-a")
    );
}

#[test]
fn an_endpoint_hinted_for_several_zones_serves_each_of_them() {
    let eps = build(vec![
        zoned("10.1.2.3", &["zone-a", "zone-b", "zone-c"]),
        zoned("10.1.2.4", &["zone-b", "zone-c"]),
        zoned("10.1.2.5", &["zone-b", "zone-d"]),
        zoned("10.1.2.6", &["zone-c"]),
    ]);
    let node = node(Some("zone-c"));
    let c = categorize(&cluster_ip_service(), &eps, &node);
    assert_eq!(
        ips(&c, EndpointSet::Cluster),
        ["10.1.2.3", "10.1.2.4", "10.1.2.6"]
    );
}

#[test]
fn zone_hints_are_ignored_when_one_ready_endpoint_lacks_them() {
    let eps = build(vec![
        zoned("10.1.2.3", &["zone-a"]),
        zoned("10.1.2.4", &["zone-b"]),
        ep("10.1.2.5"),
        zoned("10.1.2.6", &["zone-a"]),
    ]);
    let node = node(Some("zone-a"));
    let c = categorize(&cluster_ip_service(), &eps, &node);
    assert_eq!(c.cluster_indices().len(), 4);
    assert_eq!(c.topology().mode, TopologyMode::None);
    assert_eq!(
        c.topology().reason,
        TopologyReason::SomeEndpointLacksZoneHints
    );
}

#[test]
fn zone_hints_are_ignored_when_none_matches_the_nodes_zone() {
    let eps = build(vec![zoned("10.1.2.3", &["zone-a"])]);
    let node = node(Some("zone-b"));
    let c = categorize(&cluster_ip_service(), &eps, &node);
    assert_eq!(ips(&c, EndpointSet::Cluster), ["10.1.2.3"]);
    assert_eq!(c.topology().reason, TopologyReason::NoEndpointHintedForZone);
}

#[test]
fn a_node_without_a_zone_label_gets_no_zone_filtering() {
    let eps = build(vec![
        zoned("10.1.2.3", &["zone-a"]),
        zoned("10.1.2.4", &["zone-b"]),
    ]);
    for zone in [None, Some("")] {
        let node = node(zone);
        let c = categorize(&cluster_ip_service(), &eps, &node);
        assert_eq!(c.cluster_indices().len(), 2, "zone label {zone:?}");
        assert_eq!(c.topology().reason, TopologyReason::NodeHasNoZone);
    }
}

#[test]
fn unready_endpoints_neither_count_for_nor_against_zone_hints() {
    // Only ready endpoints are read for hints: the unready ones lack hints here, yet the
    // ready ones' hints still apply; and unready endpoints in the zone do not make it match.
    let eps = build(vec![
        zoned("10.1.2.3", &["zone-a"]),
        zoned("10.1.2.4", &["zone-b"]),
        ep("10.1.2.5").ready(false).serving(false),
    ]);
    let node = node(Some("zone-a"));
    let c = categorize(&cluster_ip_service(), &eps, &node);
    assert_eq!(ips(&c, EndpointSet::Cluster), ["10.1.2.3"]);

    let eps = build(vec![
        zoned("10.1.2.3", &["zone-a"]).ready(false).serving(false),
        zoned("10.1.2.4", &["zone-b"]),
        zoned("10.1.2.5", &["zone-c"]),
    ]);
    let c = categorize(&cluster_ip_service(), &eps, &node);
    assert_eq!(ips(&c, EndpointSet::Cluster), ["10.1.2.4", "10.1.2.5"]);
    assert_eq!(c.topology().reason, TopologyReason::NoEndpointHintedForZone);
}

#[test]
fn node_hints_keep_only_endpoints_hinted_for_this_node() {
    let eps = build(vec![
        zoned("10.1.2.3", &["zone-a"]).hints_for_nodes([NODE]),
        zoned("10.1.2.4", &["zone-a"]).hints_for_nodes(["node-b"]),
        zoned("10.1.2.5", &["zone-b"]).hints_for_nodes(["node-c"]),
    ]);
    let node = node(Some("zone-a"));
    let c = categorize(&cluster_ip_service(), &eps, &node);
    assert_eq!(ips(&c, EndpointSet::Cluster), ["10.1.2.3"]);
    assert_eq!(c.topology().mode, TopologyMode::PreferSameNode);
    assert_eq!(
        c.why_excluded(EndpointSet::Cluster, 1),
        Some(Exclusion::HintedForOtherNodes {
            node: NODE.into(),
            hints: vec!["node-b".into()]
        })
    );
}

#[test]
fn node_hints_fall_back_to_zone_hints_when_none_is_for_this_node() {
    let eps = build(vec![
        zoned("10.1.2.3", &["zone-a"]).hints_for_nodes(["node-x"]),
        zoned("10.1.2.4", &["zone-a"]).hints_for_nodes(["node-y"]),
        zoned("10.1.2.5", &["zone-b"]).hints_for_nodes(["node-z"]),
    ]);
    let node = node(Some("zone-a"));
    let c = categorize(&cluster_ip_service(), &eps, &node);
    assert_eq!(ips(&c, EndpointSet::Cluster), ["10.1.2.3", "10.1.2.4"]);
    assert_eq!(c.topology().mode, TopologyMode::PreferSameZone);
}

#[test]
fn node_hints_fall_back_to_zone_hints_when_one_endpoint_lacks_a_node_hint() {
    let eps = build(vec![
        zoned("10.1.2.3", &["zone-a"]).hints_for_nodes([NODE]),
        zoned("10.1.2.4", &["zone-a"]),
        zoned("10.1.2.5", &["zone-b"]).hints_for_nodes(["node-z"]),
    ]);
    let node = node(Some("zone-a"));
    let c = categorize(&cluster_ip_service(), &eps, &node);
    assert_eq!(ips(&c, EndpointSet::Cluster), ["10.1.2.3", "10.1.2.4"]);
    assert_eq!(c.topology().mode, TopologyMode::PreferSameZone);
}

#[test]
fn node_hints_apply_even_on_a_node_without_a_zone_label_as_upstream_does() {
    // Upstream reads node hints by node name only; the zone label does not enter into it.
    let eps = build(vec![
        ep("10.1.2.3").hints_for_nodes([NODE]),
        ep("10.1.2.4").hints_for_nodes(["node-b"]),
    ]);
    let node = node(None);
    let c = categorize(&cluster_ip_service(), &eps, &node);
    assert_eq!(ips(&c, EndpointSet::Cluster), ["10.1.2.3"]);
}

#[test]
fn topology_is_not_applied_to_serving_terminating_fallback() {
    let eps = build(vec![
        zoned("10.1.2.3", &["zone-b"]).conditions(Conditions::SERVING_TERMINATING),
        zoned("10.1.2.4", &["zone-c"]).conditions(Conditions::SERVING_TERMINATING),
    ]);
    let node = node(Some("zone-a"));
    let c = categorize(&cluster_ip_service(), &eps, &node);
    assert_eq!(ips(&c, EndpointSet::Cluster), ["10.1.2.3", "10.1.2.4"]);
    assert_eq!(c.topology().reason, TopologyReason::NoReadyEndpoints);
}

#[test]
fn internal_traffic_policy_local_uses_only_local_endpoints_and_no_cluster_set() {
    let svc = port()
        .internal_traffic_policy(TrafficPolicy::Local)
        .build()
        .expect("valid");
    let eps = build(vec![remote(ep("10.0.0.0")), local(ep("10.0.0.1"))]);
    let node = node(None);
    let c = categorize(&svc, &eps, &node);
    assert!(!c.uses_cluster());
    assert!(c.cluster_indices().is_empty());
    assert_eq!(ips(&c, EndpointSet::Local), ["10.0.0.1"]);
    assert_eq!(ips(&c, EndpointSet::All), ["10.0.0.1"]);
    assert_eq!(
        c.why_excluded(EndpointSet::Local, 0),
        Some(Exclusion::NotOnThisNode {
            endpoint_node: Some("node-b".into())
        })
    );
    assert_eq!(
        c.why_excluded(EndpointSet::Cluster, 1),
        Some(Exclusion::ClusterSetNotUsed)
    );
}

#[test]
fn internal_traffic_policy_local_with_only_remote_endpoints_still_has_endpoints() {
    let svc = port()
        .internal_traffic_policy(TrafficPolicy::Local)
        .build()
        .expect("valid");
    let eps = build(vec![remote(ep("10.0.0.0")), remote(ep("10.0.0.1"))]);
    let node = node(None);
    let c = categorize(&svc, &eps, &node);
    assert!(c.local_indices().is_empty());
    assert!(c.all_indices().is_empty());
    assert!(
        c.has_any_endpoints(),
        "remote endpoints exist: drop, not reject"
    );
}

#[test]
fn internal_traffic_policy_local_with_no_endpoints_has_none() {
    let svc = port()
        .internal_traffic_policy(TrafficPolicy::Local)
        .build()
        .expect("valid");
    let node = node(None);
    let c = categorize(&svc, &[], &node);
    assert!(c.uses_local());
    assert!(!c.has_any_endpoints());
}

#[test]
fn topology_is_ignored_for_local_endpoints() {
    let eps = build(vec![
        local(zoned("10.1.2.3", &["zone-a"])),
        local(zoned("10.1.2.4", &["zone-b"])),
        zoned("10.1.2.5", &["zone-c"]),
        zoned("10.1.2.6", &["zone-a"]),
    ]);
    let node = node(Some("zone-a"));
    for svc in [
        node_port_service(TrafficPolicy::Local, TrafficPolicy::Cluster),
        node_port_service(TrafficPolicy::Cluster, TrafficPolicy::Local),
    ] {
        let c = categorize(&svc, &eps, &node);
        assert_eq!(ips(&c, EndpointSet::Cluster), ["10.1.2.3", "10.1.2.6"]);
        assert_eq!(ips(&c, EndpointSet::Local), ["10.1.2.3", "10.1.2.4"]);
        assert_eq!(
            ips(&c, EndpointSet::All),
            ["10.1.2.3", "10.1.2.4", "10.1.2.6"]
        );
    }
}

#[test]
fn external_traffic_policy_local_keeps_a_cluster_set_for_short_circuited_traffic() {
    let svc = node_port_service(TrafficPolicy::Local, TrafficPolicy::Cluster);
    let eps = build(vec![local(ep("10.0.0.0")), remote(ep("10.0.0.1"))]);
    let node = node(None);
    let c = categorize(&svc, &eps, &node);
    assert!(c.uses_cluster() && c.uses_local());
    assert_eq!(ips(&c, EndpointSet::Cluster), ["10.0.0.0", "10.0.0.1"]);
    assert_eq!(ips(&c, EndpointSet::Local), ["10.0.0.0"]);
    assert_eq!(ips(&c, EndpointSet::All), ["10.0.0.0", "10.0.0.1"]);
}

#[test]
fn both_policies_local_on_an_external_service_still_use_cluster_endpoints() {
    let svc = node_port_service(TrafficPolicy::Local, TrafficPolicy::Local);
    let eps = build(vec![remote(ep("10.0.0.0")), remote(ep("10.0.0.1"))]);
    let node = node(None);
    let c = categorize(&svc, &eps, &node);
    assert_eq!(ips(&c, EndpointSet::Cluster), ["10.0.0.0", "10.0.0.1"]);
    assert!(c.local_indices().is_empty());
    assert_eq!(ips(&c, EndpointSet::All), ["10.0.0.0", "10.0.0.1"]);
}

#[test]
fn the_local_set_falls_back_to_local_serving_terminating_endpoints_on_its_own() {
    let svc = node_port_service(TrafficPolicy::Local, TrafficPolicy::Cluster);
    let eps = build(vec![
        remote(ep("10.0.0.0")),
        local(ep("10.0.0.1")).conditions(Conditions::NOT_READY),
        local(ep("10.0.0.2")).conditions(Conditions::SERVING_TERMINATING),
        remote(ep("10.0.0.3")).conditions(Conditions::SERVING_TERMINATING),
    ]);
    let node = node(None);
    let c = categorize(&svc, &eps, &node);
    assert_eq!(ips(&c, EndpointSet::Cluster), ["10.0.0.0"]);
    assert_eq!(ips(&c, EndpointSet::Local), ["10.0.0.2"]);
    assert!(c.local_uses_terminating() && !c.cluster_uses_terminating());
    assert_eq!(ips(&c, EndpointSet::All), ["10.0.0.0", "10.0.0.2"]);
    assert_eq!(
        c.why_excluded(EndpointSet::Local, 1),
        Some(Exclusion::NotReady {
            serving: false,
            terminating: false
        })
    );
}

#[test]
fn all_remote_terminating_endpoints_serve_cluster_traffic_but_not_local() {
    let svc = node_port_service(TrafficPolicy::Local, TrafficPolicy::Local);
    let eps = build(vec![
        remote(ep("10.0.0.0")).conditions(Conditions::SERVING_TERMINATING),
        remote(ep("10.0.0.1")).conditions(Conditions::SERVING_TERMINATING),
    ]);
    let node = node(None);
    let c = categorize(&svc, &eps, &node);
    assert_eq!(ips(&c, EndpointSet::Cluster), ["10.0.0.0", "10.0.0.1"]);
    assert!(c.local_indices().is_empty());
    assert!(c.has_any_endpoints());
}

#[test]
fn conflicting_topology_and_locality_merge_into_all_endpoints() {
    let svc = node_port_service(TrafficPolicy::Local, TrafficPolicy::Cluster);
    let eps = build(vec![
        local(zoned("10.0.0.0", &["zone-a"])),
        local(zoned("10.0.0.1", &["zone-b"])),
        remote(zoned("10.0.0.2", &["zone-a"])),
        remote(zoned("10.0.0.3", &["zone-b"])),
    ]);
    let node = node(Some("zone-a"));
    let c = categorize(&svc, &eps, &node);
    assert_eq!(ips(&c, EndpointSet::Cluster), ["10.0.0.0", "10.0.0.2"]);
    assert_eq!(ips(&c, EndpointSet::Local), ["10.0.0.0", "10.0.0.1"]);
    assert_eq!(
        ips(&c, EndpointSet::All),
        ["10.0.0.0", "10.0.0.1", "10.0.0.2"]
    );
    assert!(c.why_excluded(EndpointSet::All, 3).is_some());
    assert!(c.why_excluded(EndpointSet::All, 1).is_none());
}

#[test]
fn external_traffic_policy_is_ignored_for_a_service_without_external_access() {
    let svc = port()
        .external_traffic_policy(TrafficPolicy::Local)
        .build()
        .expect("valid");
    assert!(!svc.external_policy_local());
    let eps = build(vec![remote(ep("10.0.0.0")), local(ep("10.0.0.1"))]);
    let node = node(None);
    let c = categorize(&svc, &eps, &node);
    assert!(!c.uses_local());
    assert_eq!(ips(&c, EndpointSet::Cluster), ["10.0.0.0", "10.0.0.1"]);
    assert_eq!(
        c.why_excluded(EndpointSet::Local, 0),
        Some(Exclusion::LocalSetNotUsed)
    );
}

#[test]
fn external_traffic_policy_local_applies_to_a_cluster_ip_service_with_external_ips() {
    let svc = port()
        .external_ips(["192.0.2.10"])
        .external_traffic_policy(TrafficPolicy::Local)
        .build()
        .expect("valid");
    assert!(svc.external_policy_local());
    let eps = build(vec![remote(ep("10.0.0.0")), local(ep("10.0.0.1"))]);
    let node = node(None);
    let c = categorize(&svc, &eps, &node);
    assert_eq!(ips(&c, EndpointSet::Local), ["10.0.0.1"]);
}

#[test]
fn a_node_port_service_with_etp_local_but_no_node_port_uses_no_local_set() {
    // allocateLoadBalancerNodePorts=false and no ingress IP yet: no external entry point.
    let svc = port()
        .service_type(ServiceType::LoadBalancer)
        .external_traffic_policy(TrafficPolicy::Local)
        .build()
        .expect("valid");
    let eps = build(vec![local(ep("10.0.0.1"))]);
    let node = node(None);
    let c = categorize(&svc, &eps, &node);
    assert!(!c.uses_local());
}

#[test]
fn an_empty_endpoint_list_has_no_endpoints() {
    let node = node(Some("zone-a"));
    let c = categorize(&cluster_ip_service(), &[], &node);
    assert!(c.all_indices().is_empty());
    assert!(!c.has_any_endpoints());
}

#[test]
fn exclusion_reasons_read_as_sentences() {
    let cases = [
        (
            Exclusion::TerminatingWhileReadyExist,
            "terminating, and ready endpoints are available",
        ),
        (
            Exclusion::NotOnThisNode {
                endpoint_node: Some("n2".into()),
            },
            "runs on node n2, not on this node",
        ),
        (
            Exclusion::NotOnThisNode {
                endpoint_node: None,
            },
            "has no nodeName, so it is not on this node",
        ),
    ];
    for (reason, text) in cases {
        assert_eq!(reason.to_string(), text);
    }
}
