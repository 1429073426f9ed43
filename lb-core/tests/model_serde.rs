//! The `serde` feature: model values round-trip through JSON in the Kubernetes API's spelling,
//! and deserialising validates exactly as the builders do (run with `--features serde`).

use lb_core::{Conditions, Endpoint, Node, Protocol, ServicePort, ServiceType, TrafficPolicy};

fn full_port() -> ServicePort {
    ServicePort::builder("shop", "web", "http", Protocol::Tcp, 80_u16)
        .cluster_ips(["10.96.0.10", "fd00::10"])
        .ip_families(["IPv4", "IPv6"])
        .service_type(ServiceType::LoadBalancer)
        .node_port(30080)
        .health_check_node_port(32000)
        .load_balancer_ips(["192.0.2.10"])
        .external_ips(["198.51.100.1"])
        .load_balancer_source_ranges(["203.0.113.0/24"])
        .external_traffic_policy(TrafficPolicy::Local)
        .client_ip_affinity(Some(600))
        .traffic_distribution(Some("PreferClose".parse().expect("infallible")))
        .build()
        .expect("valid")
}

#[test]
fn a_service_port_round_trips_through_json_in_the_api_spelling() {
    let port = full_port();
    let json = serde_json::to_value(&port).expect("serialises");
    assert_eq!(
        json["clusterIPs"],
        serde_json::json!(["10.96.0.10", "fd00::10"])
    );
    assert_eq!(json["protocol"], "TCP");
    assert_eq!(json["type"], "LoadBalancer");
    assert_eq!(json["externalTrafficPolicy"], "Local");
    assert_eq!(
        json["sessionAffinity"],
        serde_json::json!({"type": "ClientIP", "timeoutSeconds": 600})
    );
    assert_eq!(json["trafficDistribution"], "PreferSameZone");
    let back: ServicePort = serde_json::from_value(json).expect("deserialises");
    assert_eq!(back, port);
}

#[test]
fn an_endpoint_and_a_node_round_trip_through_json() {
    let ep = Endpoint::builder("10.244.1.5", 8080)
        .conditions(Conditions::SERVING_TERMINATING)
        .node_name("node-a")
        .zone("zone-a")
        .hints_for_zones(["zone-a"])
        .build()
        .expect("valid");
    let text = serde_json::to_string(&ep).expect("serialises");
    assert_eq!(serde_json::from_str::<Endpoint>(&text).expect("parses"), ep);
    let node = Node::new("node-a", Some("zone-a")).expect("valid");
    let text = serde_json::to_string(&node).expect("serialises");
    assert_eq!(text, r#"{"name":"node-a","zone":"zone-a"}"#);
    assert_eq!(serde_json::from_str::<Node>(&text).expect("parses"), node);
}

#[test]
fn deserialising_an_invalid_service_port_fails_naming_the_object_and_field() {
    let err = serde_json::from_str::<ServicePort>(
        r#"{"namespace":"shop","name":"web","port":80,"clusterIPs":["10.96.0.1","nope"]}"#,
    )
    .expect_err("invalid cluster IP");
    assert!(
        err.to_string()
            .starts_with("service port shop/web: field clusterIPs[1]: invalid IP address \"nope\""),
        "{err}"
    );
    let err =
        serde_json::from_str::<ServicePort>(r#"{"namespace":"shop","name":"web","port":70000}"#)
            .expect_err("port out of range");
    assert!(
        err.to_string()
            .contains("field port: 70000 is not a valid port"),
        "{err}"
    );
}

#[test]
fn deserialising_an_invalid_endpoint_or_affinity_fails_naming_the_field() {
    let err = serde_json::from_str::<Endpoint>(r#"{"address":"127.0.0.1","port":80}"#)
        .expect_err("loopback");
    assert!(err.to_string().contains("field addresses[0]"), "{err}");
    let err = serde_json::from_str::<ServicePort>(
        r#"{"namespace":"a","name":"b","port":80,"clusterIPs":["10.96.0.1"],
            "sessionAffinity":{"type":"ClientIP","timeoutSeconds":0}}"#,
    )
    .expect_err("timeout 0");
    assert!(err.to_string().contains("timeoutSeconds"), "{err}");
    let err = serde_json::from_str::<Node>(r#"{"name":""}"#).expect_err("empty name");
    assert!(err.to_string().contains("field metadata.name"), "{err}");
}

#[test]
fn unknown_fields_are_rejected_so_typos_do_not_pass_silently() {
    let err =
        serde_json::from_str::<Endpoint>(r#"{"address":"10.0.0.1","port":80,"nodename":"x"}"#)
            .expect_err("typo");
    assert!(
        err.to_string().contains("unknown field `nodename`"),
        "{err}"
    );
}
