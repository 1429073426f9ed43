//! Conversion at the edge, on its own: each Service and EndpointSlice field that can be wrong
//! is rejected with an error naming the object and the field (and nothing is wrapped, clamped
//! or guessed), each field that can be right reaches the model unchanged, and the objects
//! kube-proxy does not proxy are skipped with a reason.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_core::{IpFamily, Protocol, SessionAffinity};
use lb_k8s::convert::{self, MAX_ENDPOINTS_PER_SLICE, Slice};
use lb_k8s::{ConvertError, Converted, Filter};
use serde_json::{Value, json};

/// An EndpointSlice of Service `t/web` with one endpoint, with `edit` applied to its JSON.
fn slice_with(edit: impl FnOnce(&mut Value)) -> EndpointSlice {
    let mut v = json!({
        "metadata": {
            "namespace": "t",
            "name": "web-abc",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{
            "addresses": ["10.244.0.1"],
            "conditions": {"ready": true},
            "nodeName": "node-a",
            "zone": "zone-a",
        }],
    });
    edit(&mut v);
    serde_json::from_value(v).expect("an EndpointSlice")
}

/// A ClusterIP Service `t/web` with one port, with `edit` applied to its JSON.
fn service_with(edit: impl FnOnce(&mut Value)) -> Service {
    let mut v = json!({
        "metadata": {"namespace": "t", "name": "web"},
        "spec": {
            "clusterIP": "10.96.0.10",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    });
    edit(&mut v);
    serde_json::from_value(v).expect("a Service")
}

fn slice_of(s: &EndpointSlice) -> Result<(Slice, Vec<ConvertError>), ConvertError> {
    convert::endpoint_slice(s, &Filter::default()).map(|(c, errors)| match c {
        Converted::Accepted(slice) => (slice, errors),
        Converted::Skipped(why) => panic!("skipped: {why}"),
    })
}

fn slice_error(s: &EndpointSlice) -> String {
    slice_of(s).expect_err("invalid").to_string()
}

fn slice_skip(s: &EndpointSlice) -> String {
    match convert::endpoint_slice(s, &Filter::default()).expect("not invalid") {
        (Converted::Skipped(why), _) => why,
        (Converted::Accepted(_), _) => panic!("accepted"),
    }
}

fn ports_of(s: &Service) -> Result<Vec<lb_core::ServicePort>, ConvertError> {
    convert::service(s, &Filter::default()).map(|c| match c {
        Converted::Accepted(ports) => ports,
        Converted::Skipped(why) => panic!("skipped: {why}"),
    })
}

fn service_error(s: &Service) -> String {
    ports_of(s).expect_err("invalid").to_string()
}

fn service_skip(s: &Service) -> String {
    match convert::service(s, &Filter::default()).expect("not invalid") {
        Converted::Skipped(why) => why,
        Converted::Accepted(_) => panic!("accepted"),
    }
}

#[test]
fn a_slice_port_outside_1_to_65535_is_an_error_naming_the_slice_and_the_port_never_wrapped() {
    for bad in [70_000i64, 65_536, 0, -1, i64::from(i32::MAX)] {
        let s = slice_with(|v| v["ports"][0]["port"] = json!(bad));
        assert_eq!(
            slice_error(&s),
            format!("EndpointSlice t/web-abc: field ports[0].port: {bad} is not a valid port"),
        );
    }
    // The highest port and the lowest are ports, and a second port is checked as the first.
    for good in [1u16, 65_535] {
        let s = slice_with(|v| v["ports"][0]["port"] = json!(good));
        let (slice, errors) = slice_of(&s).expect("valid");
        assert!(errors.is_empty());
        assert_eq!(slice.ports[0].port.get(), good);
    }
    let s = slice_with(|v| {
        v["ports"]
            .as_array_mut()
            .expect("ports")
            .push(json!({"name": "metrics", "port": 70_000, "protocol": "TCP"}));
    });
    assert_eq!(
        slice_error(&s),
        "EndpointSlice t/web-abc: field ports[1].port: 70000 is not a valid port"
    );
}

#[test]
fn a_slice_port_reaches_the_model_with_its_name_protocol_and_number() {
    let s = slice_with(|v| {
        v["ports"] = json!([
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"port": 9000, "protocol": "SCTP"},
        ]);
    });
    let (slice, _) = slice_of(&s).expect("valid");
    let got: Vec<(&str, Protocol, u16)> = slice
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.protocol, p.port.get()))
        .collect();
    assert_eq!(
        got,
        [
            ("http", Protocol::Tcp, 8080),
            ("dns", Protocol::Udp, 53),
            ("", Protocol::Sctp, 9000),
        ]
    );
    // Each endpoint serves each port at its own address.
    let addrs: Vec<String> = slice
        .ports
        .iter()
        .flat_map(|p| slice.endpoints_for(p.port).map(|e| e.addr().to_string()))
        .collect();
    assert_eq!(
        addrs,
        ["10.244.0.1:8080", "10.244.0.1:53", "10.244.0.1:9000"]
    );
}

#[test]
fn a_slice_port_without_a_number_or_protocol_is_left_out_as_kube_proxy_does() {
    let s = slice_with(|v| {
        v["ports"] = json!([
            {"name": "no-number", "protocol": "TCP"},
            {"name": "no-protocol", "port": 81},
            {"name": "http", "port": 8080, "protocol": "TCP"},
        ]);
    });
    let (slice, errors) = slice_of(&s).expect("valid");
    assert!(errors.is_empty());
    let names: Vec<&str> = slice.ports.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["http"]);
}

#[test]
fn a_slice_with_an_unknown_protocol_or_address_type_is_an_error_naming_the_field() {
    let s = slice_with(|v| v["ports"][0]["protocol"] = json!("QUIC"));
    let e = slice_of(&s).expect_err("invalid");
    assert_eq!(
        (
            e.kind,
            e.namespace.as_str(),
            e.name.as_str(),
            e.field.as_str()
        ),
        ("EndpointSlice", "t", "web-abc", "ports[0].protocol")
    );
    let s = slice_with(|v| v["addressType"] = json!("IPv5"));
    assert_eq!(
        slice_error(&s),
        r#"EndpointSlice t/web-abc: field addressType: unknown value "IPv5""#
    );
}

#[test]
fn a_slice_over_the_endpoint_limit_is_refused_whole() {
    let endpoint = |i: usize| json!({"addresses": [format!("10.244.{}.{}", i / 256, i % 256)], "conditions": {"ready": true}});
    let at_limit = slice_with(|v| {
        v["endpoints"] = (1..=MAX_ENDPOINTS_PER_SLICE).map(endpoint).collect();
    });
    let (slice, errors) = slice_of(&at_limit).expect("valid");
    assert!(errors.is_empty());
    assert_eq!(slice.endpoints.len(), MAX_ENDPOINTS_PER_SLICE);
    let over = slice_with(|v| {
        v["endpoints"] = (1..=MAX_ENDPOINTS_PER_SLICE + 1).map(endpoint).collect();
    });
    assert_eq!(
        slice_error(&over),
        format!(
            "EndpointSlice t/web-abc: field endpoints: {} endpoints exceed the limit of {MAX_ENDPOINTS_PER_SLICE}",
            MAX_ENDPOINTS_PER_SLICE + 1
        )
    );
}

#[test]
fn a_bad_endpoint_is_dropped_with_an_error_naming_it_and_the_others_are_kept() {
    let s = slice_with(|v| {
        v["endpoints"] = json!([
            {"addresses": ["10.244.0.1"]},
            {"addresses": []},
            {"addresses": ["10.244.0.300"]},
            {"addresses": ["fd00::1"]},
            {"addresses": ["127.0.0.1"]},
            {"addresses": ["10.244.0.5"], "nodeName": ""},
            {"addresses": ["10.244.0.6"], "hints": {"forZones": [{"name": ""}]}},
            {"addresses": ["10.244.0.7"]},
        ]);
    });
    let (slice, errors) = slice_of(&s).expect("the slice itself is valid");
    let kept: Vec<String> = slice.endpoints.iter().map(|e| e.ip().to_string()).collect();
    assert_eq!(kept, ["10.244.0.1", "10.244.0.7"]);
    let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        [
            "EndpointSlice t/web-abc: field endpoints[1].addresses: empty",
            r#"EndpointSlice t/web-abc: field endpoints[2].addresses[0]: invalid IP address "10.244.0.300""#,
            "EndpointSlice t/web-abc: field endpoints[3].addresses[0]: fd00::1 is not an IPv4 address (addressType IPv4)",
            "EndpointSlice t/web-abc: field endpoints[4].addresses[0]: 127.0.0.1 cannot be an endpoint address",
            "EndpointSlice t/web-abc: field endpoints[5].nodeName: must not be empty",
            "EndpointSlice t/web-abc: field endpoints[6].hints.forZones[0].name: must not be empty",
        ]
    );
}

#[test]
fn an_endpoint_reaches_the_model_with_its_conditions_location_and_hints() {
    let s = slice_with(|v| {
        v["addressType"] = json!("IPv6");
        v["endpoints"] = json!([
            {
                "addresses": ["fd00::1", "fd00::2"],
                "conditions": {"ready": false, "serving": true, "terminating": true},
                "nodeName": "node-b",
                "zone": "zone-b",
                "hints": {"forZones": [{"name": "zone-c"}, {"name": "zone-b"}], "forNodes": [{"name": "node-b"}]},
            },
            // Conditions the API leaves unset: ready and serving are unknown, so true;
            // terminating is false (kube-proxy's endpointslicecache.go).
            {"addresses": ["fd00::3"]},
        ]);
    });
    let (slice, errors) = slice_of(&s).expect("valid");
    assert!(errors.is_empty());
    assert_eq!(slice.family, IpFamily::V6);
    assert_eq!(
        (
            slice.service.namespace.as_str(),
            slice.service.name.as_str()
        ),
        ("t", "web")
    );
    let [first, second] = slice.endpoints.as_slice() else {
        panic!("two endpoints: {:?}", slice.endpoints);
    };
    // The first address is the endpoint's (the API's other addresses are never used).
    assert_eq!(first.ip().to_string(), "fd00::1");
    let c = first.conditions();
    assert_eq!((c.ready, c.serving, c.terminating), (false, true, true));
    assert_eq!(
        (first.node_name(), first.zone()),
        (Some("node-b"), Some("zone-b"))
    );
    assert_eq!(
        first.hints_for_zones(),
        [Box::from("zone-b"), Box::from("zone-c")]
    );
    assert_eq!(first.hints_for_nodes(), [Box::from("node-b")]);
    let c = second.conditions();
    assert_eq!((c.ready, c.serving, c.terminating), (true, true, false));
    assert_eq!((second.node_name(), second.zone()), (None, None));
    assert!(second.hints_for_zones().is_empty() && second.hints_for_nodes().is_empty());
}

#[test]
fn slices_kube_proxy_does_not_proxy_are_skipped_with_a_reason() {
    let s = slice_with(|v| v["addressType"] = json!("FQDN"));
    assert_eq!(slice_skip(&s), "addressType FQDN");
    let s = slice_with(|v| v["metadata"]["labels"] = json!({}));
    assert_eq!(slice_skip(&s), "no kubernetes.io/service-name label");
    let s = slice_with(|v| {
        v["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    });
    assert_eq!(slice_skip(&s), "labelled service.kubernetes.io/headless");
    let s = slice_with(|v| {
        v["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = json!("other");
    });
    assert_eq!(
        slice_skip(&s),
        "service.kubernetes.io/service-proxy-name=other is another proxy's"
    );
    // With a proxy name configured, only objects carrying it are ours.
    let ours = Filter {
        service_proxy_name: Some("lb".into()),
    };
    let (c, _) = convert::endpoint_slice(&slice_with(|_| {}), &ours).expect("not invalid");
    assert_eq!(
        c,
        Converted::Skipped("not labelled service.kubernetes.io/service-proxy-name=lb".into())
    );
    let labelled = slice_with(|v| {
        v["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = json!("lb");
    });
    let (c, _) = convert::endpoint_slice(&labelled, &ours).expect("not invalid");
    assert!(matches!(c, Converted::Accepted(_)));
}

#[test]
fn a_service_port_outside_1_to_65535_is_an_error_naming_the_service_and_the_field() {
    for bad in [70_000i64, 65_536, 0, -1] {
        let s = service_with(|v| v["spec"]["ports"][0]["port"] = json!(bad));
        assert_eq!(
            service_error(&s),
            format!(
                "Service t/web: field spec.ports[0].port: {bad} is not a valid port (1..=65535)"
            ),
        );
    }
    let s = service_with(|v| {
        v["spec"]["type"] = json!("NodePort");
        v["spec"]["ports"][0]["nodePort"] = json!(70_000);
    });
    assert_eq!(
        service_error(&s),
        "Service t/web: field spec.ports[0].nodePort: 70000 is not a valid port (1..=65535)"
    );
    let s = service_with(|v| {
        v["spec"]["type"] = json!("LoadBalancer");
        v["spec"]["externalTrafficPolicy"] = json!("Local");
        v["spec"]["healthCheckNodePort"] = json!(65_536);
    });
    assert_eq!(
        service_error(&s),
        "Service t/web: field spec.healthCheckNodePort: 65536 is not a valid port (1..=65535)"
    );
    let s = service_with(|v| v["spec"]["ports"][0]["port"] = json!(65_535));
    assert_eq!(ports_of(&s).expect("valid")[0].port(), 65_535);
}

#[test]
fn a_service_with_a_bad_field_is_an_error_naming_it() {
    type Edit = fn(&mut Value);
    let cases: [(Edit, &str); 9] = [
        (
            |v| v["spec"]["clusterIP"] = json!("10.96.0.300"),
            r#"field spec.clusterIPs[0]: invalid IP address "10.96.0.300""#,
        ),
        (
            |v| v["spec"]["type"] = json!("Internal"),
            "field spec.type: ",
        ),
        (
            |v| v["spec"]["ports"][0]["protocol"] = json!("QUIC"),
            "field spec.ports[0].protocol: ",
        ),
        (
            |v| v["spec"]["externalTrafficPolicy"] = json!("Sometimes"),
            "field spec.externalTrafficPolicy: ",
        ),
        (
            |v| v["spec"]["internalTrafficPolicy"] = json!("Sometimes"),
            "field spec.internalTrafficPolicy: ",
        ),
        (
            |v| v["spec"]["sessionAffinity"] = json!("Sticky"),
            r#"field spec.sessionAffinity: unknown value "Sticky""#,
        ),
        (
            |v| v["spec"]["ports"] = json!([]),
            "field spec.ports: a Service needs at least one port",
        ),
        (
            |v| v["spec"]["externalIPs"] = json!(["198.51.100.5", "nonsense"]),
            "field spec.externalIPs[1]: ",
        ),
        (
            |v| v["spec"]["loadBalancerSourceRanges"] = json!(["10.0.0.0/33"]),
            r#"field spec.loadBalancerSourceRanges[0]: invalid CIDR "10.0.0.0/33""#,
        ),
    ];
    for (edit, want) in cases {
        let e = service_error(&service_with(edit));
        assert!(
            e.starts_with("Service t/web: ") && e.contains(want),
            "{e:?} should name {want:?}"
        );
    }
    let s = service_with(|v| v["metadata"]["name"] = json!(""));
    assert_eq!(
        service_error(&s),
        "Service t/: field metadata.name: must not be empty"
    );
}

#[test]
fn an_affinity_timeout_outside_1_to_86400_seconds_is_an_error_and_inside_it_is_kept() {
    let with_timeout = |secs: i64| {
        service_with(move |v| {
            v["spec"]["sessionAffinity"] = json!("ClientIP");
            v["spec"]["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": secs}});
        })
    };
    for bad in [0i64, -5, 86_401, i64::from(i32::MAX)] {
        let e = ports_of(&with_timeout(bad)).expect_err("invalid");
        assert_eq!(
            (e.kind, e.name.as_str(), e.field.as_str()),
            (
                "Service",
                "web",
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
            ),
            "timeout {bad}: {e}"
        );
    }
    for good in [1u64, 10_800, 86_400] {
        let ports = ports_of(&with_timeout(good as i64)).expect("valid");
        assert_eq!(
            ports[0].session_affinity(),
            SessionAffinity::ClientIp {
                timeout: std::time::Duration::from_secs(good)
            }
        );
    }
    // ClientIP without a config takes the API's default, three hours.
    let s = service_with(|v| v["spec"]["sessionAffinity"] = json!("ClientIP"));
    assert_eq!(
        ports_of(&s).expect("valid")[0].session_affinity(),
        SessionAffinity::ClientIp {
            timeout: std::time::Duration::from_secs(10_800)
        }
    );
}

#[test]
fn a_service_reaches_the_model_field_by_field() {
    let s = service_with(|v| {
        v["spec"] = json!({
            "type": "LoadBalancer",
            "clusterIPs": ["10.96.0.10", "fd00:96::10"],
            "ipFamilies": ["IPv4", "IPv6"],
            "externalIPs": ["198.51.100.5"],
            "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 32_000,
            "ports": [
                {"name": "http", "port": 80, "nodePort": 30_080, "protocol": "TCP"},
                {"name": "dns", "port": 53, "nodePort": 30_053, "protocol": "UDP"},
            ],
        });
        v["status"] = json!({"loadBalancer": {"ingress": [
            {"ip": "203.0.113.7"},
            // Served by the load balancer itself (KEP-1860): not ours.
            {"ip": "203.0.113.8", "ipMode": "Proxy"},
            {"hostname": "lb.example"},
        ]}});
    });
    let ports = ports_of(&s).expect("valid");
    assert_eq!(ports.len(), 2);
    let dns = &ports[1];
    assert_eq!(&*dns.name().port_name, "dns");
    assert_eq!(
        (dns.protocol(), dns.port(), dns.node_port()),
        (Protocol::Udp, 53, Some(30_053))
    );
    let ips = |v: &[std::net::IpAddr]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert_eq!(ips(dns.cluster_ips()), ["10.96.0.10", "fd00:96::10"]);
    assert_eq!(ips(dns.load_balancer_ips()), ["203.0.113.7"]);
    assert_eq!(dns.health_check_node_port(), Some(32_000));
    // A health check node port is a LoadBalancer eTP Local's only.
    let s = service_with(|v| {
        v["spec"]["type"] = json!("NodePort");
        v["spec"]["externalTrafficPolicy"] = json!("Local");
        v["spec"]["healthCheckNodePort"] = json!(32_000);
    });
    assert_eq!(
        ports_of(&s).expect("valid")[0].health_check_node_port(),
        None
    );
}

#[test]
fn services_kube_proxy_does_not_proxy_are_skipped_with_a_reason() {
    let s = service_with(|v| {
        v["spec"] = json!({"type": "ExternalName", "externalName": "db.example"});
    });
    assert_eq!(service_skip(&s), "type ExternalName is not proxied");
    for none in [json!("None"), json!("")] {
        let s = service_with(|v| v["spec"]["clusterIP"] = none);
        assert_eq!(service_skip(&s), "no cluster IP (headless)");
    }
    let s = service_with(|v| {
        v["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "other"});
    });
    assert_eq!(
        service_skip(&s),
        "service.kubernetes.io/service-proxy-name=other is another proxy's"
    );
}

#[test]
fn a_service_cidr_is_read_truncated_and_a_bad_one_is_an_error_naming_it() {
    let cidr = |cidrs: Value| -> k8s_openapi::api::networking::v1::ServiceCIDR {
        serde_json::from_value(
            json!({"metadata": {"name": "kubernetes"}, "spec": {"cidrs": cidrs}}),
        )
        .expect("a ServiceCIDR")
    };
    let got =
        convert::service_cidr(&cidr(json!(["10.96.0.1/12", "fd00:96::/108"]))).expect("valid");
    let got: Vec<String> = got.iter().map(ToString::to_string).collect();
    assert_eq!(got, ["10.96.0.0/12", "fd00:96::/108"]);
    let e =
        convert::service_cidr(&cidr(json!(["10.96.0.0/12", "10.96.0.0/40"]))).expect_err("invalid");
    assert_eq!(
        e.to_string(),
        r#"ServiceCIDR kubernetes: field spec.cidrs[1]: "10.96.0.0/40" is not a CIDR"#
    );
}

#[test]
fn a_cluster_scoped_object_is_named_without_a_namespace() {
    let n: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
        "metadata": {"name": "node-a"},
        "spec": {"podCIDRs": ["nonsense"]},
    }))
    .expect("a Node");
    let e = convert::node(&n).expect_err("invalid").to_string();
    assert!(
        e.starts_with("Node node-a: field spec.podCIDRs[0]: "),
        "{e}"
    );
}
