//! Tests of the compiler as a whole: what a snapshot compiles to, read in the rendered
//! ruleset (`nft -f` text, as `lb-proxy render` prints it), so a failure shows the rule or
//! element that is wrong. The rules only the netns tests see with real packets (masquerade
//! marks, reject and drop verdicts, source ranges) are checked here cheaply.

use std::collections::BTreeMap;

use lb_core::{
    Endpoint, IpFamily, Node, Protocol, ServicePort, ServicePortBuilder, ServiceType, TrafficPolicy,
};

use crate::nft::Transaction;
use crate::nft::ir::Ruleset;
use crate::store::{ServiceEntry, Snapshot};

use super::{Config, compile};

fn node() -> Node {
    Node::new("node-a", None)
        .expect("valid node")
        .with_addresses(["192.168.1.10".parse().expect("literal address")])
}

fn config() -> Config {
    Config {
        cluster_cidrs: vec!["10.244.0.0/16".parse().expect("literal CIDR")],
        ..Config::default()
    }
}

fn port(name: &str) -> ServicePortBuilder {
    ServicePort::builder("ns", name, "http", Protocol::Tcp, 80).cluster_ips(["10.96.0.1"])
}

fn local(ip: &str) -> Endpoint {
    Endpoint::builder(ip, 8080)
        .node_name("node-a")
        .build()
        .expect("valid endpoint")
}

fn remote(ip: &str) -> Endpoint {
    Endpoint::builder(ip, 8080)
        .node_name("node-b")
        .build()
        .expect("valid endpoint")
}

/// The IPv4 ruleset of `services` (each a port and its endpoints), rendered.
fn render_with(config: &Config, services: Vec<(ServicePort, Vec<Endpoint>)>) -> String {
    let snapshot = Snapshot {
        node: node(),
        services: services
            .into_iter()
            .map(|(port, endpoints)| (port.name().clone(), ServiceEntry { port, endpoints }))
            .collect::<BTreeMap<_, _>>(),
    };
    let (id, table, _) = compile(&snapshot, config, IpFamily::V4);
    let mut rs = Ruleset::default();
    rs.tables.insert(id, table);
    Transaction::create(&rs).to_nft()
}

fn render(services: Vec<(ServicePort, Vec<Endpoint>)>) -> String {
    render_with(&config(), services)
}

/// The elements of `set` in the rendered ruleset (the text between the braces), or "".
fn elements<'t>(text: &'t str, set: &str) -> &'t str {
    text.lines()
        .find_map(|l| {
            let rest = l
                .strip_prefix("create element ip lb-proxy ")
                .or_else(|| l.strip_prefix("add element ip lb-proxy "))?;
            rest.strip_prefix(set)?
                .strip_prefix(" { ")?
                .strip_suffix(" }")
        })
        .unwrap_or("")
}

/// The rules of `chain`, one per line.
fn rules(text: &str, chain: &str) -> Vec<String> {
    let prefix = format!("add rule ip lb-proxy {chain} ");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix).map(str::to_string))
        .collect()
}

fn etp_local_lb() -> ServicePort {
    port("lb")
        .service_type(ServiceType::LoadBalancer)
        .node_port(30080)
        .load_balancer_ips(["192.0.2.1"])
        .external_traffic_policy(TrafficPolicy::Local)
        .build()
        .expect("valid service")
}

#[test]
fn etp_local_sends_outside_traffic_to_local_endpoints_and_short_circuits_the_rest() {
    let text = render(vec![(
        etp_local_lb(),
        vec![local("10.244.1.1"), remote("10.244.2.1")],
    )]);
    // Outside clients: the local endpoint only, through the `-local` maps.
    let ext = elements(&text, "external-local-ips");
    assert!(
        ext.contains("192.0.2.1 . tcp . 80 comment \"ns/lb:http\" : goto pick-local-1"),
        "{ext}"
    );
    let np = elements(&text, "nodeport-external-local");
    assert!(
        np.contains("tcp . 30080 comment \"ns/lb:http\" : goto nodeport-pick-local-1"),
        "{np}"
    );
    assert_eq!(
        elements(&text, "endpoints-local"),
        "192.0.2.1 . tcp . 80 . 0 : 10.244.1.1 . 8080"
    );
    // Pods and the node: both endpoints, through the ordinary maps.
    let ips = elements(&text, "service-ips");
    assert!(
        ips.contains("192.0.2.1 . tcp . 80 comment \"ns/lb:http\" : goto pick-2"),
        "{ips}"
    );
    // Masqueraded only from the node itself.
    assert_eq!(
        elements(&text, "masquerade-local-source-ips"),
        "192.0.2.1 . tcp . 80"
    );
    assert_eq!(
        elements(&text, "masquerade-local-source-nodeports"),
        "tcp . 30080"
    );
    assert_eq!(elements(&text, "masquerade-ips"), "");
    assert_eq!(elements(&text, "masquerade-nodeports"), "");
}

#[test]
fn etp_local_without_local_endpoints_stops_outside_traffic_and_drops_it() {
    let text = render(vec![(etp_local_lb(), vec![remote("10.244.2.1")])]);
    let ext = elements(&text, "external-local-ips");
    assert!(
        ext.contains("192.0.2.1 . tcp . 80 comment \"ns/lb:http\" : return"),
        "{ext}"
    );
    let none = elements(&text, "no-endpoint-services");
    assert!(
        none.contains("192.0.2.1 . tcp . 80 comment \"ns/lb:http\" : drop"),
        "{none}"
    );
    let none = elements(&text, "no-endpoint-nodeports");
    assert!(
        none.contains("tcp . 30080 comment \"ns/lb:http\" : drop"),
        "{none}"
    );
    // Pods and the node still reach the remote endpoint.
    let ips = elements(&text, "service-ips");
    assert!(
        ips.contains("192.0.2.1 . tcp . 80 comment \"ns/lb:http\" : goto pick-1"),
        "{ips}"
    );
}

#[test]
fn etp_cluster_masquerades_every_external_address_and_node_port() {
    let port = port("lb")
        .service_type(ServiceType::LoadBalancer)
        .node_port(30080)
        .load_balancer_ips(["192.0.2.1"])
        .external_ips(["203.0.113.1"])
        .build()
        .expect("valid service");
    let text = render(vec![(port, vec![remote("10.244.2.1")])]);
    assert_eq!(
        elements(&text, "masquerade-ips"),
        "192.0.2.1 . tcp . 80, 203.0.113.1 . tcp . 80"
    );
    assert_eq!(elements(&text, "masquerade-nodeports"), "tcp . 30080");
    assert_eq!(elements(&text, "masquerade-local-source-ips"), "");
    assert_eq!(elements(&text, "external-local-ips"), "");
}

#[test]
fn itp_local_uses_local_endpoints_for_the_cluster_ip_and_drops_without_them() {
    let itp = |eps| {
        let p = port("itp")
            .internal_traffic_policy(TrafficPolicy::Local)
            .build()
            .expect("valid service");
        render(vec![(p, eps)])
    };
    let text = itp(vec![local("10.244.1.1"), remote("10.244.2.1")]);
    assert_eq!(
        elements(&text, "endpoints"),
        "10.96.0.1 . tcp . 80 . 0 : 10.244.1.1 . 8080"
    );
    assert!(
        elements(&text, "service-ips").contains(": goto pick-1"),
        "{text}"
    );
    let text = itp(vec![remote("10.244.2.1")]);
    assert_eq!(elements(&text, "endpoints"), "");
    assert_eq!(
        elements(&text, "no-endpoint-services"),
        "10.96.0.1 . tcp . 80 comment \"ns/itp:http\" : drop"
    );
}

#[test]
fn client_ip_affinity_dispatches_by_client_hash_and_records_its_addresses() {
    let p = port("sticky")
        .service_type(ServiceType::NodePort)
        .node_port(30080)
        .client_ip_affinity(Some(600))
        .build()
        .expect("valid service");
    let text = render(vec![(p, vec![remote("10.244.2.1"), remote("10.244.2.2")])]);
    assert!(
        elements(&text, "service-ips").contains(": goto pick-sticky-2"),
        "{text}"
    );
    assert!(
        elements(&text, "service-nodeports").contains(": goto nodeport-pick-sticky-2"),
        "{text}"
    );
    // Every address of the port sends its connections to one record chain, which records
    // the endpoint for all of them (issue 9 point 2: affinity per service port).
    assert_eq!(
        elements(&text, "affinity-keys-600"),
        "10.96.0.1 . tcp . 80 : goto affinity-record.ns.sticky.http"
    );
    assert_eq!(
        elements(&text, "affinity-nodeport-keys-600"),
        "tcp . 30080 : goto affinity-record.ns.sticky.http"
    );
    assert_eq!(
        rules(&text, "affinity-record.ns.sticky.http"),
        [
            "update @affinity-600 { ip saddr . 10.96.0.1 . 6 . 80 : ip daddr . th dport }",
            "update @affinity-nodeport-600 { ip saddr . 6 . 30080 : ip daddr . th dport }",
        ]
    );
    assert!(text.contains("add map ip lb-proxy affinity-600 "), "{text}");
    assert!(
        rules(&text, "pick-sticky-2")
            .iter()
            .any(|r| r.contains("jhash ip saddr mod 2")),
        "{text}"
    );
}

#[test]
fn client_ip_affinity_records_every_address_that_shares_the_endpoints_and_splits_on_etp_local() {
    // eTP Cluster: the cluster IP, the load-balancer IP and the node port dispatch to the same
    // endpoints, so one chain records all three.
    let cluster = port("sticky")
        .service_type(ServiceType::LoadBalancer)
        .node_port(30080)
        .load_balancer_ips(["192.0.2.1"])
        .client_ip_affinity(Some(600))
        .build()
        .expect("valid service");
    let text = render(vec![(
        cluster,
        vec![local("10.244.1.1"), remote("10.244.2.1")],
    )]);
    assert_eq!(
        rules(&text, "affinity-record.ns.sticky.http"),
        [
            "update @affinity-600 { ip saddr . 10.96.0.1 . 6 . 80 : ip daddr . th dport }",
            "update @affinity-600 { ip saddr . 192.0.2.1 . 6 . 80 : ip daddr . th dport }",
            "update @affinity-nodeport-600 { ip saddr . 6 . 30080 : ip daddr . th dport }",
        ],
        "{text}"
    );
    assert!(rules(&text, "affinity-record.ns.sticky.http.external").is_empty());

    // eTP Local: outside clients of the external addresses reach node-local endpoints only,
    // so those addresses record among themselves, apart from the cluster IP.
    let local_lb = port("sticky")
        .service_type(ServiceType::LoadBalancer)
        .node_port(30080)
        .load_balancer_ips(["192.0.2.1"])
        .external_traffic_policy(TrafficPolicy::Local)
        .client_ip_affinity(Some(600))
        .build()
        .expect("valid service");
    let text = render(vec![(
        local_lb,
        vec![local("10.244.1.1"), remote("10.244.2.1")],
    )]);
    assert_eq!(
        rules(&text, "affinity-record.ns.sticky.http"),
        ["update @affinity-600 { ip saddr . 10.96.0.1 . 6 . 80 : ip daddr . th dport }"],
        "{text}"
    );
    assert_eq!(
        rules(&text, "affinity-record.ns.sticky.http.external"),
        [
            "update @affinity-600 { ip saddr . 192.0.2.1 . 6 . 80 : ip daddr . th dport }",
            "update @affinity-nodeport-600 { ip saddr . 6 . 30080 : ip daddr . th dport }",
        ],
        "{text}"
    );
    assert_eq!(
        elements(&text, "affinity-keys-600"),
        "10.96.0.1 . tcp . 80 : goto affinity-record.ns.sticky.http, \
         192.0.2.1 . tcp . 80 : goto affinity-record.ns.sticky.http.external"
    );
}

#[test]
fn a_record_chain_name_too_long_for_nft_is_a_hash_of_it() {
    let long = "n".repeat(60);
    let p = ServicePort::builder("ns", &long, "http", Protocol::Tcp, 80)
        .cluster_ips(["10.96.0.1"])
        .client_ip_affinity(Some(600))
        .build()
        .expect("valid service");
    let text = render(vec![(p, vec![remote("10.244.2.1")])]);
    let keys = elements(&text, "affinity-keys-600");
    let chain = keys
        .strip_prefix("10.96.0.1 . tcp . 80 : goto ")
        .expect("one key");
    assert!(
        chain.len() == "affinity-record.".len() + 16 && chain.starts_with("affinity-record."),
        "{chain}"
    );
    assert_eq!(rules(&text, chain).len(), 1, "{text}");
}

#[test]
fn a_service_without_endpoints_is_rejected_on_every_address() {
    let p = port("none")
        .service_type(ServiceType::NodePort)
        .node_port(30080)
        .build()
        .expect("valid service");
    let text = render(vec![(p, vec![])]);
    assert_eq!(
        elements(&text, "no-endpoint-services"),
        "10.96.0.1 . tcp . 80 comment \"ns/none:http\" : goto reject-chain"
    );
    assert_eq!(
        elements(&text, "no-endpoint-nodeports"),
        "tcp . 30080 comment \"ns/none:http\" : goto reject-chain"
    );
    assert_eq!(elements(&text, "service-ips"), "");
    assert_eq!(rules(&text, "reject-chain"), ["reject"]);
    // The filter hooks that see new connections look the verdicts up.
    for chain in ["filter-input", "filter-forward", "filter-output"] {
        assert!(
            rules(&text, chain)
                .iter()
                .any(|r| r == "ct state new jump service-endpoints-check"),
            "{chain}: {text}"
        );
    }
    // A cluster IP's missing port is rejected too.
    assert!(
        rules(&text, "service-endpoints-check")
            .iter()
            .any(|r| r.starts_with("ip daddr @cluster-ips reject")),
        "{text}"
    );
}

#[test]
fn source_ranges_filter_load_balancer_ips_and_let_the_node_through_its_own_address() {
    let p = port("ranges")
        .service_type(ServiceType::LoadBalancer)
        .node_port(30080)
        .load_balancer_ips(["192.0.2.1"])
        .external_ips(["203.0.113.1"])
        .load_balancer_source_ranges(["192.168.0.0/16", "198.51.100.0/24", "198.51.100.128/25"])
        .build()
        .expect("valid service");
    let text = render(vec![(p, vec![remote("10.244.2.1")])]);
    // Only the load-balancer IP is filtered, not the external IP.
    assert_eq!(elements(&text, "firewall-ips"), "192.0.2.1 . tcp . 80");
    // Ranges merged; the address itself allowed since a range holds the node's address.
    assert_eq!(
        elements(&text, "firewall-allow"),
        "192.0.2.1 . tcp . 80 . 192.0.2.1/32, 192.0.2.1 . tcp . 80 . 192.168.0.0/16, 192.0.2.1 . tcp . 80 . 198.51.100.0/24"
    );
    assert_eq!(
        rules(&text, "firewall-check"),
        [
            "ip daddr . meta l4proto . th dport @firewall-ips ip daddr . meta l4proto . th dport . ip saddr != @firewall-allow drop"
        ]
    );
}

#[test]
fn masquerade_marks_cluster_ip_traffic_from_outside_the_cluster_cidr_and_masquerades_marked_connections()
 {
    let p = port("web").build().expect("valid service");
    let text = render(vec![(p, vec![remote("10.244.2.1")])]);
    let services = rules(&text, "services");
    assert_eq!(
        services[0],
        "ip daddr @cluster-ips ip saddr != 10.244.0.0/16 meta mark set meta mark | 0x00004000 comment \"masquerade cluster IP traffic from outside the cluster\""
    );
    assert_eq!(
        rules(&text, "masquerading"),
        [
            "meta mark & 0x00004000 != 0x00000000 meta mark set meta mark ^ 0x00004000 masquerade fully-random",
            "ct status dnat ip saddr . ip daddr @hairpin masquerade fully-random",
        ]
    );
    assert_eq!(rules(&text, "nat-postrouting"), ["jump masquerading"]);
    assert_eq!(elements(&text, "hairpin"), "10.244.2.1 . 10.244.2.1");
}

#[test]
fn masquerade_all_marks_every_cluster_ip_connection_with_the_configured_bit() {
    let p = port("web").build().expect("valid service");
    let config = Config {
        masquerade_all: true,
        masquerade_bit: 3,
        ..config()
    };
    let text = render_with(&config, vec![(p, vec![remote("10.244.2.1")])]);
    assert_eq!(
        rules(&text, "services")[0],
        "ip daddr @cluster-ips meta mark set meta mark | 0x00000008 comment \"masquerade all cluster IP traffic\""
    );
    assert!(rules(&text, "masquerading")[0].starts_with("meta mark & 0x00000008 != 0x00000000"));
}

#[test]
fn without_a_local_traffic_detector_cluster_ip_traffic_is_not_masqueraded_and_pods_are_not_short_circuited()
 {
    let text = render_with(
        &Config::default(),
        vec![(etp_local_lb(), vec![local("10.244.1.1")])],
    );
    let services = rules(&text, "services");
    assert!(
        services.iter().all(|r| !r.contains("@cluster-ips")),
        "{services:#?}"
    );
    // Only the node itself is short-circuited: no rule sends by source address.
    assert!(
        services.iter().all(|r| !r.contains("saddr 10.")),
        "{services:#?}"
    );
}
