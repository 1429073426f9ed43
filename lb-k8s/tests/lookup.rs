//! `Cluster` and `ServiceIndex`: Kubernetes objects in, (address, protocol, port) → the
//! endpoints that serve it on this node out, following kube-proxy's rules per entry point.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_core::{EndpointSet, Exclusion, Protocol};
use lb_k8s::{Cluster, Filter, Via};
use serde_json::{Value, json};

fn service(v: Value) -> Service {
    serde_json::from_value(v).expect("a Service")
}

fn slice(v: Value) -> EndpointSlice {
    serde_json::from_value(v).expect("an EndpointSlice")
}

fn node(name: &str, zone: Option<&str>) -> Node {
    let labels = zone.map(|z| json!({"topology.kubernetes.io/zone": z}));
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).expect("a Node")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an address")
}

/// A LoadBalancer Service with every kind of entry point, `externalTrafficPolicy: Local`.
fn shop() -> Service {
    service(json!({
        "metadata": {"namespace": "demo", "name": "shop"},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "10.96.0.20",
            "externalIPs": ["198.51.100.5"],
            "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 32000,
            "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}],
        },
        "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.20"}]}},
    }))
}

fn shop_slice(name: &str, endpoints: Value) -> EndpointSlice {
    slice(json!({
        "metadata": {"namespace": "demo", "name": name,
                     "labels": {"kubernetes.io/service-name": "shop"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
}

fn shop_cluster() -> Cluster {
    let mut c = Cluster::new(Filter::default());
    c.apply_service(&shop()).expect("valid");
    let errors = c
        .apply_endpoint_slice(&shop_slice(
            "shop-a",
            json!([
                {"addresses": ["10.244.1.10"], "nodeName": "node-a"},
                {"addresses": ["10.244.2.10"], "nodeName": "node-b"},
            ]),
        ))
        .expect("valid");
    assert!(errors.is_empty());
    c.set_node(&node("node-a", None)).expect("valid");
    c
}

fn addrs(endpoints: &[lb_core::Endpoint]) -> Vec<String> {
    endpoints.iter().map(|e| e.addr().to_string()).collect()
}

#[test]
fn the_index_is_none_until_this_node_is_known() {
    let mut c = Cluster::new(Filter::default());
    c.apply_service(&shop()).expect("valid");
    assert!(c.index().is_none());
    c.set_node(&node("node-a", None)).expect("valid");
    assert!(c.index().is_some());
}

#[test]
fn a_cluster_ip_lookup_needs_the_right_protocol_and_port_and_uses_the_cluster_set() {
    let index = shop_cluster().index().expect("node known");
    let hit = index
        .lookup(ip("10.96.0.20"), Protocol::Tcp, 80)
        .expect("the cluster IP");
    assert_eq!(hit.via(), Via::ClusterIp);
    assert_eq!(hit.service_port().name().to_string(), "demo/shop:http");
    assert_eq!(hit.endpoint_set(), EndpointSet::Cluster);
    assert_eq!(
        addrs(hit.endpoints()),
        ["10.244.1.10:8080", "10.244.2.10:8080"]
    );
    assert!(index.lookup(ip("10.96.0.20"), Protocol::Udp, 80).is_none());
    assert!(index.lookup(ip("10.96.0.20"), Protocol::Tcp, 81).is_none());
    assert!(index.lookup(ip("10.96.0.21"), Protocol::Tcp, 80).is_none());
}

#[test]
fn external_entry_points_with_etp_local_serve_only_this_nodes_endpoints_and_say_why() {
    let index = shop_cluster().index().expect("node known");
    for (addr, via) in [
        ("192.0.2.20", Via::LoadBalancerIp),
        ("198.51.100.5", Via::ExternalIp),
    ] {
        let hit = index.lookup(ip(addr), Protocol::Tcp, 80).expect(addr);
        assert_eq!(hit.via(), via);
        assert_eq!(hit.endpoint_set(), EndpointSet::Local);
        assert_eq!(addrs(hit.endpoints()), ["10.244.1.10:8080"], "{addr}");
        let c = hit.categorized();
        assert_eq!(
            c.why_excluded(EndpointSet::Local, 1),
            Some(Exclusion::NotOnThisNode {
                endpoint_node: Some("node-b".into())
            })
        );
    }
}

#[test]
fn a_node_port_answers_on_any_node_address_of_the_services_family_unless_restricted() {
    let c = shop_cluster();
    let index = c.index().expect("node known");
    let hit = index
        .lookup(ip("172.18.0.2"), Protocol::Tcp, 30080)
        .expect("node port");
    assert_eq!(hit.via(), Via::NodePort);
    assert_eq!(addrs(hit.endpoints()), ["10.244.1.10:8080"]);
    // An IPv4-only Service has no IPv6 node port, and the node port is not on Service IPs.
    assert!(index.lookup(ip("fd00::2"), Protocol::Tcp, 30080).is_none());
    assert!(
        index
            .lookup(ip("10.96.0.20"), Protocol::Tcp, 30080)
            .is_none()
    );

    let restricted = c
        .with_node_port_addresses(["172.18.0.0/24".parse().expect("a CIDR")])
        .index()
        .expect("node known");
    assert!(
        restricted
            .lookup(ip("172.18.0.2"), Protocol::Tcp, 30080)
            .is_some()
    );
    assert!(
        restricted
            .lookup(ip("192.168.1.2"), Protocol::Tcp, 30080)
            .is_none()
    );
}

#[test]
fn internal_traffic_policy_local_gives_the_cluster_ip_only_this_nodes_endpoints() {
    let mut c = Cluster::new(Filter::default());
    c.apply_service(&service(json!({
        "metadata": {"namespace": "demo", "name": "shop"},
        "spec": {"clusterIP": "10.96.0.20", "internalTrafficPolicy": "Local",
                 "ports": [{"name": "http", "port": 80}]},
    })))
    .expect("valid");
    c.apply_endpoint_slice(&shop_slice(
        "shop-a",
        json!([
            {"addresses": ["10.244.1.10"], "nodeName": "node-a"},
            {"addresses": ["10.244.2.10"], "nodeName": "node-b"},
        ]),
    ))
    .expect("valid");
    c.set_node(&node("node-b", None)).expect("valid");
    let index = c.index().expect("node known");
    let hit = index
        .lookup(ip("10.96.0.20"), Protocol::Tcp, 80)
        .expect("hit");
    assert_eq!(hit.endpoint_set(), EndpointSet::Local);
    assert_eq!(addrs(hit.endpoints()), ["10.244.2.10:8080"]);
}

#[test]
fn slices_of_a_service_are_merged_deduplicated_and_removed_with_their_slice() {
    let mut c = shop_cluster();
    c.apply_endpoint_slice(&shop_slice(
        "shop-b",
        json!([
            {"addresses": ["10.244.1.11"], "nodeName": "node-a"},
            {"addresses": ["10.244.1.10"], "nodeName": "node-a"},
        ]),
    ))
    .expect("valid");
    let index = c.index().expect("node known");
    let hit = index
        .lookup(ip("10.96.0.20"), Protocol::Tcp, 80)
        .expect("hit");
    assert_eq!(
        addrs(hit.endpoints()),
        ["10.244.1.10:8080", "10.244.2.10:8080", "10.244.1.11:8080"]
    );
    c.delete_endpoint_slice(&shop_slice("shop-a", json!([])));
    let index = c.index().expect("node known");
    let hit = index
        .lookup(ip("10.96.0.20"), Protocol::Tcp, 80)
        .expect("hit");
    assert_eq!(
        addrs(hit.endpoints()),
        ["10.244.1.11:8080", "10.244.1.10:8080"]
    );
}

#[test]
fn not_ready_endpoints_are_left_out_and_terminating_ones_serve_only_when_nothing_is_ready() {
    let mut c = shop_cluster();
    c.apply_endpoint_slice(&shop_slice(
        "shop-a",
        json!([
            {"addresses": ["10.244.1.10"], "nodeName": "node-a",
             "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.244.2.10"], "nodeName": "node-b", "conditions": {"ready": false}},
        ]),
    ))
    .expect("valid");
    let index = c.index().expect("node known");
    let hit = index
        .lookup(ip("10.96.0.20"), Protocol::Tcp, 80)
        .expect("hit");
    assert_eq!(addrs(hit.endpoints()), ["10.244.1.10:8080"]);
    assert_eq!(hit.all_endpoints().len(), 2);
}

#[test]
fn an_invalid_service_update_is_an_error_naming_the_field_and_the_last_good_version_stays() {
    let mut c = shop_cluster();
    let mut bad = shop();
    if let Some(spec) = bad.spec.as_mut() {
        spec.external_traffic_policy = Some("Sometimes".into());
        spec.cluster_ip = Some("10.96.0.99".into());
    }
    let err = c.apply_service(&bad).expect_err("invalid policy");
    assert_eq!(err.kind, "Service");
    assert_eq!(err.field, "spec.externalTrafficPolicy");
    assert!(
        err.to_string()
            .starts_with("Service demo/shop: field spec.externalTrafficPolicy")
    );
    let index = c.index().expect("node known");
    assert!(index.lookup(ip("10.96.0.20"), Protocol::Tcp, 80).is_some());
    assert!(index.lookup(ip("10.96.0.99"), Protocol::Tcp, 80).is_none());
}

#[test]
fn a_service_that_becomes_headless_or_is_deleted_disappears_from_the_index() {
    let mut c = shop_cluster();
    let mut headless = shop();
    headless.metadata.labels = Some(
        [("service.kubernetes.io/headless".to_string(), String::new())]
            .into_iter()
            .collect(),
    );
    c.apply_service(&headless).expect("valid, skipped");
    assert!(c.index().expect("node known").is_empty());
    c.apply_service(&shop()).expect("valid");
    assert_eq!(c.index().expect("node known").len(), 1);
    c.delete_service(&shop());
    assert!(
        c.index()
            .expect("node known")
            .lookup(ip("10.96.0.20"), Protocol::Tcp, 80)
            .is_none()
    );
}

#[test]
fn invalid_endpoints_are_reported_and_the_rest_of_the_slice_is_used() {
    let mut c = shop_cluster();
    let errors = c
        .apply_endpoint_slice(&shop_slice(
            "shop-a",
            json!([
                {"addresses": ["not-an-ip"], "nodeName": "node-a"},
                {"addresses": ["10.244.1.12"], "nodeName": "node-a"},
            ]),
        ))
        .expect("the slice is valid as a whole");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].field, "endpoints[0].addresses[0]");
    let index = c.index().expect("node known");
    let hit = index
        .lookup(ip("10.96.0.20"), Protocol::Tcp, 80)
        .expect("hit");
    assert_eq!(addrs(hit.endpoints()), ["10.244.1.12:8080"]);
}

#[test]
fn frontends_list_every_entry_point_once_in_order() {
    let index = shop_cluster().index().expect("node known");
    let f: Vec<String> = index
        .frontends()
        .iter()
        .map(|(f, p)| {
            let addr = f.address.map_or("*".to_string(), |a| a.to_string());
            format!("{addr} {}/{} {:?} {}", f.protocol, f.port, f.via, p.name())
        })
        .collect();
    assert_eq!(
        f,
        [
            "* TCP/30080 NodePort demo/shop:http",
            "10.96.0.20 TCP/80 ClusterIp demo/shop:http",
            "192.0.2.20 TCP/80 LoadBalancerIp demo/shop:http",
            "198.51.100.5 TCP/80 ExternalIp demo/shop:http",
        ]
    );
}

#[test]
fn a_relist_replaces_everything_so_objects_deleted_meanwhile_are_gone() {
    let mut c = shop_cluster();
    let other = service(json!({
        "metadata": {"namespace": "demo", "name": "other"},
        "spec": {"clusterIP": "10.96.0.30", "ports": [{"port": 53, "protocol": "UDP"}]},
    }));
    let mut broken = other.clone();
    broken.metadata.name = Some("broken".into());
    if let Some(spec) = broken.spec.as_mut() {
        spec.session_affinity = Some("Sometimes".into());
    }
    // The re-list no longer has shop; it has other, and an invalid one that is reported.
    let errors = c.replace_services([&other, &broken]);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].field, "spec.sessionAffinity");
    let errors = c.replace_endpoint_slices([&shop_slice(
        "shop-b",
        json!([{"addresses": ["10.244.1.99"], "nodeName": "node-a"}]),
    )]);
    assert!(errors.is_empty());
    let index = c.index().expect("node known");
    assert!(index.lookup(ip("10.96.0.20"), Protocol::Tcp, 80).is_none());
    assert!(index.lookup(ip("10.96.0.30"), Protocol::Udp, 53).is_some());
    assert_eq!(index.len(), 1);
    // shop comes back: only the re-listed slice's endpoint, shop-a is gone.
    c.apply_service(&shop()).expect("valid");
    let index = c.index().expect("node known");
    let hit = index
        .lookup(ip("10.96.0.20"), Protocol::Tcp, 80)
        .expect("hit");
    assert_eq!(addrs(hit.all_endpoints()), ["10.244.1.99:8080"]);
}
