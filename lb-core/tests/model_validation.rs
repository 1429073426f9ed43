//! Validation of model values: every invalid field is rejected with an error naming it.

use std::time::Duration;

use lb_core::{
    Conditions, Endpoint, IpFamily, ModelError, Node, Protocol, ServicePort, ServicePortBuilder,
    ServiceType, SessionAffinity, TrafficDistribution, TrafficPolicy,
};

fn port() -> ServicePortBuilder {
    ServicePort::builder("ns", "web", "http", Protocol::Tcp, 80).cluster_ips(["10.96.0.1"])
}

fn field_of(r: Result<impl std::fmt::Debug, ModelError>) -> String {
    r.expect_err("must be rejected").field
}

#[test]
fn a_port_of_zero_or_above_65535_is_rejected_naming_the_port_field() {
    for bad in [0, -1, 65_536, i64::MAX] {
        let e = ServicePort::builder("ns", "web", "http", Protocol::Tcp, bad)
            .build()
            .unwrap_err();
        assert_eq!(e.field, "port");
        assert!(e.to_string().contains("service port ns/web:http"), "{e}");
    }
}

#[test]
fn a_node_port_of_zero_means_none_and_out_of_range_is_rejected() {
    assert_eq!(
        port().node_port(0).build().expect("valid").node_port(),
        None
    );
    assert_eq!(
        port().node_port(30080).build().expect("valid").node_port(),
        Some(30080)
    );
    assert_eq!(field_of(port().node_port(70_000).build()), "nodePort");
    assert_eq!(
        field_of(port().health_check_node_port(-5).build()),
        "healthCheckNodePort"
    );
}

#[test]
fn an_invalid_ip_is_rejected_naming_the_field_and_index() {
    assert_eq!(
        field_of(port().cluster_ips(["10.96.0.1", "nope"]).build()),
        "clusterIPs[1]"
    );
    assert_eq!(
        field_of(port().external_ips(["300.1.1.1"]).build()),
        "externalIPs[0]"
    );
    assert_eq!(
        field_of(port().load_balancer_ips(["1.2.3.4", "x"]).build()),
        "status.loadBalancer.ingress[1]"
    );
    assert_eq!(
        field_of(port().cluster_ips(["0.0.0.0"]).build()),
        "clusterIPs[0]"
    );
}

#[test]
fn dual_stack_cluster_ips_need_one_address_per_family() {
    let svc = port()
        .cluster_ips(["10.96.0.1", "fd00::1"])
        .build()
        .expect("dual-stack is valid");
    assert_eq!(svc.ip_families(), [IpFamily::V4, IpFamily::V6]);
    assert_eq!(
        field_of(port().cluster_ips(["10.96.0.1", "10.96.0.2"]).build()),
        "clusterIPs"
    );
    assert_eq!(
        field_of(
            port()
                .cluster_ips(["fd00::1"])
                .ip_families(["IPv4"])
                .build()
        ),
        "clusterIPs[0]"
    );
    assert_eq!(
        field_of(port().ip_families(["IPv5"]).build()),
        "ipFamilies[0]"
    );
}

#[test]
fn client_ip_affinity_defaults_to_10800_seconds() {
    let svc = port().client_ip_affinity(None).build().expect("valid");
    assert_eq!(
        svc.session_affinity().timeout(),
        Some(Duration::from_secs(10_800))
    );
    assert_eq!(
        port().build().expect("valid").session_affinity(),
        SessionAffinity::None
    );
}

#[test]
fn client_ip_affinity_accepts_1_to_86400_seconds_and_nothing_else() {
    for ok in [1, 60, 86_400] {
        let svc = port()
            .client_ip_affinity(Some(ok))
            .build()
            .expect("in range");
        assert_eq!(
            svc.session_affinity().timeout(),
            Some(Duration::from_secs(ok as u64))
        );
    }
    for bad in [0, -1, 86_401, i64::MAX] {
        assert_eq!(
            field_of(port().client_ip_affinity(Some(bad)).build()),
            "sessionAffinityConfig.clientIP.timeoutSeconds"
        );
    }
    let forged = SessionAffinity::ClientIp {
        timeout: Duration::from_millis(10),
    };
    assert_eq!(
        field_of(port().session_affinity(forged).build()),
        "sessionAffinityConfig.clientIP.timeoutSeconds"
    );
}

#[test]
fn load_balancer_source_ranges_must_be_cidrs_and_are_trimmed() {
    let svc = port()
        .load_balancer_source_ranges([" 192.0.2.0/24 ", "10.1.2.3/8"])
        .build();
    let svc = svc.expect("valid");
    let ranges: Vec<_> = svc
        .load_balancer_source_ranges()
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(ranges, ["192.0.2.0/24", "10.0.0.0/8"]);
    assert_eq!(
        field_of(port().load_balancer_source_ranges(["192.0.2.0/33"]).build()),
        "loadBalancerSourceRanges[0]"
    );
}

#[test]
fn policies_types_and_distribution_parse_from_their_api_spelling() {
    assert_eq!("Local".parse::<TrafficPolicy>(), Ok(TrafficPolicy::Local));
    assert_eq!("".parse::<TrafficPolicy>(), Ok(TrafficPolicy::Cluster));
    assert!("local".parse::<TrafficPolicy>().is_err());
    assert_eq!(
        "LoadBalancer".parse::<ServiceType>(),
        Ok(ServiceType::LoadBalancer)
    );
    assert!("ExternalName".parse::<ServiceType>().is_err());
    assert_eq!("SCTP".parse::<Protocol>(), Ok(Protocol::Sctp));
    assert!("ICMP".parse::<Protocol>().is_err());
    assert_eq!(
        "PreferClose".parse(),
        Ok(TrafficDistribution::PreferSameZone)
    );
    assert_eq!(
        "PreferSameNode".parse(),
        Ok(TrafficDistribution::PreferSameNode)
    );
}

#[test]
fn an_endpoint_with_a_bad_address_or_port_is_rejected_naming_the_field() {
    assert_eq!(
        field_of(Endpoint::builder("10.0.0.300", 80).build()),
        "addresses[0]"
    );
    assert_eq!(
        field_of(Endpoint::builder("127.0.0.1", 80).build()),
        "addresses[0]"
    );
    assert_eq!(field_of(Endpoint::builder("10.0.0.1", 0).build()), "port");
    let e = Endpoint::builder("fd00::5", 8443)
        .build()
        .expect("IPv6 endpoints are valid");
    assert_eq!(e.addr().to_string(), "[fd00::5]:8443");
}

#[test]
fn every_endpoint_error_names_the_endpoint_as_given() {
    // The name is formatted only when an error is made: each path must still give it.
    let message = |b: lb_core::EndpointBuilder| b.build().expect_err("invalid").to_string();
    assert_eq!(
        message(Endpoint::builder("10.0.0.300", 80)),
        "endpoint 10.0.0.300:80: field addresses[0]: invalid IP address \"10.0.0.300\""
    );
    assert_eq!(
        message(Endpoint::builder("10.0.0.1", 70_000)),
        "endpoint 10.0.0.1:70000: field port: 70000 is not a valid port (1..=65535)"
    );
    assert_eq!(
        message(Endpoint::builder("fd00::5", 80).zone("")),
        "endpoint fd00::5:80: field zone: must not be empty"
    );
    assert_eq!(
        message(Endpoint::builder("10.0.0.1", 80).hints_for_nodes(["n1", ""])),
        "endpoint 10.0.0.1:80: field hints.forNodes[1].name: must not be empty"
    );
}

#[test]
fn a_ready_endpoint_that_is_not_serving_is_accepted_and_used_as_kube_proxy_does() {
    // Issue 9, point 4: kube-proxy reads each condition on its own; a ready endpoint is used
    // whatever `serving` says.
    let e = Endpoint::builder("10.0.0.1", 80)
        .ready(true)
        .serving(false)
        .build()
        .expect("ready with serving false is valid");
    assert!(e.is_ready());
    assert!(e.conditions().usable());
}

#[test]
fn unset_api_conditions_mean_ready_serving_and_not_terminating() {
    assert_eq!(Conditions::from_api(None, None, None), Conditions::READY);
    assert_eq!(
        Conditions::from_api(Some(false), Some(true), Some(true)),
        Conditions::SERVING_TERMINATING
    );
}

#[test]
fn empty_hint_and_node_names_are_rejected() {
    assert_eq!(
        field_of(
            Endpoint::builder("10.0.0.1", 80)
                .hints_for_zones([""])
                .build()
        ),
        "hints.forZones[0].name"
    );
    assert_eq!(
        field_of(Endpoint::builder("10.0.0.1", 80).node_name("").build()),
        "nodeName"
    );
    assert_eq!(field_of(Node::new("", None)), "metadata.name");
}

#[test]
fn hints_are_deduplicated_and_sorted() {
    let e = Endpoint::builder("10.0.0.1", 80)
        .hints_for_zones(["b", "a", "b"])
        .build()
        .expect("valid");
    let zones: Vec<&str> = e.hints_for_zones().iter().map(|z| &**z).collect();
    assert_eq!(zones, ["a", "b"]);
}

#[test]
fn external_policy_local_counts_only_for_externally_accessible_services() {
    let local = |b: ServicePortBuilder| {
        b.external_traffic_policy(TrafficPolicy::Local)
            .build()
            .expect("valid")
            .external_policy_local()
    };
    assert!(!local(port()));
    assert!(local(port().service_type(ServiceType::NodePort)));
    assert!(local(port().service_type(ServiceType::LoadBalancer)));
    assert!(local(port().external_ips(["192.0.2.1"])));
}

#[test]
fn builders_accept_typed_addresses_and_ports_and_build_the_same_value_as_from_text() {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let typed = ServicePort::builder("ns", "web", "http", Protocol::Tcp, 80_u16)
        .cluster_ips([
            IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)),
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
        ])
        .external_ips([Ipv4Addr::new(192, 0, 2, 1)])
        .node_port(30080_u16)
        .build()
        .expect("valid");
    let text = ServicePort::builder("ns", "web", "http", Protocol::Tcp, 80)
        .cluster_ips(["10.96.0.1", "fd00::1"])
        .external_ips(["192.0.2.1"])
        .node_port(30080)
        .build()
        .expect("valid");
    assert_eq!(typed, text);
    let typed = Endpoint::builder(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, 5), 8080_u16)
        .build()
        .expect("valid");
    assert_eq!(typed.addr().to_string(), "[fd00::1:5]:8080");
}

#[test]
fn a_typed_address_is_still_validated_naming_the_field() {
    use std::net::{IpAddr, Ipv4Addr};
    let err = ServicePort::builder("ns", "web", "http", Protocol::Tcp, 80_u16)
        .cluster_ips([IpAddr::V4(Ipv4Addr::UNSPECIFIED)])
        .build()
        .expect_err("0.0.0.0");
    assert_eq!(err.field, "clusterIPs[0]");
    let err = Endpoint::builder(Ipv4Addr::LOCALHOST, 80_u16)
        .build()
        .expect_err("loopback");
    assert_eq!(err.field, "addresses[0]");
    assert_eq!(
        err.to_string(),
        "endpoint 127.0.0.1:80: field addresses[0]: 127.0.0.1 cannot be an endpoint address"
    );
}

#[test]
fn a_node_keeps_its_first_address_of_each_family_as_its_primary_addresses() {
    let n = lb_core::Node::new("n1", None)
        .expect("valid node")
        .with_addresses(
            ["10.0.0.1", "fd00::1", "10.0.0.2", "fd00::2"].map(|a| a.parse().expect("address")),
        );
    let got: Vec<String> = n.addresses().iter().map(|a| a.to_string()).collect();
    assert_eq!(got, ["10.0.0.1", "fd00::1"]);
}

#[test]
fn a_node_keeps_its_first_pod_cidr_of_each_family_truncated_to_the_network() {
    let n = lb_core::Node::new("n1", None)
        .expect("valid node")
        .with_pod_cidrs(
            ["10.244.1.7/24", "fd00:244:1::/64", "10.244.9.0/24"].map(|c| c.parse().expect("CIDR")),
        );
    let got: Vec<String> = n.pod_cidrs().iter().map(|c| c.to_string()).collect();
    assert_eq!(got, ["10.244.1.0/24", "fd00:244:1::/64"]);
}

#[test]
fn an_endpoint_without_hints_is_80_bytes_and_its_hints_read_back_sorted() {
    // The layout figures are for 64-bit targets (8-byte pointers).
    #[cfg(target_pointer_width = "64")]
    assert_eq!(std::mem::size_of::<Endpoint>(), 80);
    let plain = Endpoint::builder("10.0.0.1", 80).build().expect("valid");
    assert!(plain.hints_for_zones().is_empty() && plain.hints_for_nodes().is_empty());
    let hinted = Endpoint::builder("10.0.0.1", 80)
        .hints_for_zones(["z2", "z1", "z2"])
        .build()
        .expect("valid");
    assert_eq!(hinted.hints_for_zones(), ["z1".into(), "z2".into()]);
    assert!(hinted.hints_for_nodes().is_empty());
    assert_ne!(plain, hinted);
    // No hints given and empty hints given are the same endpoint.
    let empty = Endpoint::builder("10.0.0.1", 80)
        .hints_for_zones(Vec::<String>::new())
        .build()
        .expect("valid");
    assert_eq!(plain, empty);
}

#[test]
fn endpoints_sharing_names_hold_one_copy_of_each_and_stay_equal() {
    let build = || {
        Endpoint::builder("10.0.0.1", 80)
            .node_name("node-1")
            .zone("z1")
            .build()
            .expect("valid")
    };
    let (mut a, mut b) = (build(), build());
    let before = a.clone();
    let mut names = std::collections::HashSet::new();
    a.share_names(&mut names);
    b.share_names(&mut names);
    assert_eq!(names.len(), 2, "one node name and one zone");
    assert_eq!((a.node_name(), a.zone()), (Some("node-1"), Some("z1")));
    assert_eq!(a, before, "sharing changes no value");
    assert!(std::ptr::eq(
        a.node_name().expect("node"),
        b.node_name().expect("node")
    ));
    assert!(std::ptr::eq(
        a.zone().expect("zone"),
        b.zone().expect("zone")
    ));
}
