//! `explain` on the bundled example says what the rules do.

use lb_core::Protocol;
use lb_proxy::compile::Config;
use lb_proxy::convert::Filter;
use lb_proxy::explain::{Entry, Query, explain, parse_destination};
use lb_proxy::manifests::Objects;
use lb_proxy::store::Snapshot;

fn example() -> (Snapshot, Config) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/cluster");
    let (objects, _) = Objects::read_paths(&[dir]);
    let (store, _, _) = objects.into_store(Some("node-a"), &Filter::default());
    let config = Config {
        cluster_cidrs: vec!["10.244.0.0/16".parse().expect("literal")],
        ..Config::default()
    };
    (store.snapshot().expect("node"), config)
}

fn query(to: &str, from: &str) -> Query {
    let (to, port, protocol) = parse_destination(to).expect("valid destination");
    Query {
        to,
        port,
        protocol,
        from: from.parse().expect("ip"),
        from_node: false,
        to_node: true,
    }
}

#[test]
fn a_cluster_ip_from_outside_the_cluster_is_masqueraded_and_terminating_endpoints_explained() {
    let (snap, config) = example();
    let e = explain(&snap, &config, &query("10.96.0.10:80", "10.100.0.2"));
    assert_eq!(e.service_port.as_deref(), Some("demo/web:http"));
    assert_eq!(e.entry, Some(Entry::ClusterIp));
    assert_eq!(e.endpoints.iter().filter(|v| v.eligible).count(), 3);
    let terminating = e
        .endpoints
        .iter()
        .find(|v| v.endpoint == "10.244.1.13:8080")
        .expect("listed");
    assert_eq!(
        terminating.reason.as_deref(),
        Some("terminating, and ready endpoints are available")
    );
    assert!(
        e.masquerade
            .starts_with("yes: the source is outside the cluster CIDR"),
        "{}",
        e.masquerade
    );
    assert!(e.outcome.starts_with("dnat"));
}

#[test]
fn an_etp_local_load_balancer_ip_uses_local_endpoints_for_outside_clients_and_all_for_pods() {
    let (snap, config) = example();
    let e = explain(&snap, &config, &query("192.0.2.20:80", "10.100.0.2"));
    let eligible: Vec<_> = e
        .endpoints
        .iter()
        .filter(|v| v.eligible)
        .map(|v| v.endpoint.as_str())
        .collect();
    assert_eq!(eligible, ["10.244.1.10:8080"]);
    assert!(e.masquerade.starts_with("no"), "{}", e.masquerade);
    let pod = explain(&snap, &config, &query("192.0.2.20:80", "10.244.1.11"));
    assert_eq!(
        pod.endpoints.iter().filter(|v| v.eligible).count(),
        2,
        "short-circuit"
    );
}

#[test]
fn a_service_without_endpoints_is_rejected_and_an_unknown_destination_is_not_ours() {
    let (snap, config) = example();
    let e = explain(&snap, &config, &query("10.96.0.30:80", "10.244.1.10"));
    assert!(e.outcome.starts_with("reject"), "{}", e.outcome);
    let none = explain(&snap, &config, &query("10.96.9.9:80", "10.244.1.10"));
    assert!(none.service_port.is_none());
    let udp = explain(&snap, &config, &query("10.96.0.53:53/udp", "10.244.1.10"));
    assert_eq!(udp.service_port.as_deref(), Some("demo/echo-udp:dns/UDP"));
    let np = explain(&snap, &config, &query("10.100.0.1:30081", "10.100.0.2"));
    assert_eq!(np.entry, Some(Entry::NodePort));
    assert!(parse_destination("10.0.0.1:0").is_err());
    assert_eq!(
        parse_destination("[fd00::1]:80/sctp").map(|d| d.2),
        Ok(Protocol::Sctp)
    );
}

#[test]
fn a_port_a_cluster_ip_lacks_is_explained_as_the_reject_the_ruleset_applies() {
    // Issue 9, point 11: `service-endpoints-check` rejects it; explain must not say no-match.
    let (snap, config) = example();
    // 30081 is a node port of another Service: not on a cluster IP.
    for to in ["10.96.0.10:81", "10.96.0.10:80/udp", "10.96.0.10:30081"] {
        let e = explain(&snap, &config, &query(to, "10.244.1.10"));
        assert!(e.service_port.is_none(), "{to}: {e:?}");
        assert!(
            e.outcome
                .starts_with("reject: 10.96.0.10 is the cluster IP of demo/web"),
            "{to}: {}",
            e.outcome
        );
    }
    // An address that is no cluster IP is still not ours.
    let none = explain(&snap, &config, &query("10.96.9.9:81", "10.244.1.10"));
    assert!(none.outcome.starts_with("no-match"), "{}", none.outcome);
}

#[test]
fn an_unallocated_cluster_ip_of_a_service_cidr_is_explained_as_the_drop_it_gets() {
    // Issue 9, points 8 and 11: explain agrees with the ruleset's ServiceCIDR drop.
    let (snap, mut config) = example();
    let outside = explain(&snap, &config, &query("10.96.0.99:80", "10.100.0.2"));
    assert!(
        outside.outcome.starts_with("no-match"),
        "{}",
        outside.outcome
    );
    config.service_cidrs = vec!["10.96.0.0/16".parse().expect("literal")];
    let e = explain(&snap, &config, &query("10.96.0.99:80", "10.100.0.2"));
    assert!(
        e.outcome
            .starts_with("drop: 10.96.0.99 is in the ServiceCIDR 10.96.0.0/16"),
        "{}",
        e.outcome
    );
    // An allocated cluster IP is still dispatched.
    let e = explain(&snap, &config, &query("10.96.0.10:80", "10.100.0.2"));
    assert!(e.outcome.starts_with("dnat"), "{}", e.outcome);
}

#[test]
fn every_object_explain_reads_in_a_trace_exists_in_a_compiled_table() {
    // explain finds the Service port and the reasons by the names of the maps, sets and
    // chains a trace went through: a rename in the compiler must fail here, not blind explain.
    use lb_proxy::explain::names;
    let (snap, config) = example();
    let (_, table, _) = lb_proxy::compile::compile(&snap, &config, lb_core::IpFamily::V4);
    let mut all: Vec<&str> = vec![
        names::NO_ENDPOINT_SERVICES,
        names::NO_ENDPOINT_NODEPORTS,
        names::CLUSTER_IPS,
        names::SERVICE_CIDRS,
        names::HAIRPIN,
    ];
    for list in [
        names::ADDRESS_DISPATCH,
        names::NODEPORT_DISPATCH,
        names::LOCAL_DISPATCH,
        names::CLUSTER_DISPATCH,
        names::MASQ_CLUSTER,
        names::MASQ_LOCAL_SOURCE,
    ] {
        all.extend(list);
    }
    for name in all {
        assert!(table.sets.contains_key(name), "no set or map {name}");
    }
    for chain in [names::FIREWALL_CHECK, names::SERVICES] {
        assert!(table.chains.contains_key(chain), "no chain {chain}");
    }
}

#[test]
fn explain_reports_what_the_traced_rules_do_for_the_node_and_for_affinity() {
    let (snap, config) = example();
    // The node itself to an eTP Local load-balancer IP: short-circuited and masqueraded, as
    // the rule that dispatched it (`fib saddr type local`) says.
    let mut q = query("192.0.2.20:80", "10.100.0.1");
    q.from_node = true;
    let e = explain(&snap, &config, &q);
    assert_eq!(e.endpoints.iter().filter(|v| v.eligible).count(), 2, "{e}");
    assert!(
        e.endpoint_set
            .as_deref()
            .is_some_and(|s| s.contains("from the node itself")),
        "{e}"
    );
    assert!(
        e.masquerade
            .starts_with("yes: traffic from the node itself"),
        "{e}"
    );
    // A hairpin connection through a cluster IP: masqueraded only on the path to itself.
    let e = explain(&snap, &config, &query("10.96.0.10:80", "10.244.1.10"));
    assert_eq!(
        e.masquerade, "only if the endpoint chosen is the client itself (hairpin)",
        "{e}"
    );
}

#[test]
fn the_readme_example_prints_what_the_readme_shows() {
    // Issue 8: explain's output for the README example is unchanged by tracing the rules.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md is readable");
    let command = "$ lb-proxy explain -f examples/cluster --node node-a --cluster-cidr 10.244.0.0/16 --to 192.0.2.20:80 --from 10.100.0.2\n";
    let start = readme.find(command).expect("the README shows the example") + command.len();
    let shown = &readme[start..start + readme[start..].find("```").expect("the block ends")];
    let (snap, config) = example();
    let e = explain(&snap, &config, &query("192.0.2.20:80", "10.100.0.2"));
    assert_eq!(e.to_string(), shown);
}

#[test]
fn pods_told_by_interface_are_explained_by_the_interface_rule() {
    // detectLocalMode InterfaceNamePrefix: an address alone cannot tell a pod; explain traces
    // a packet from another interface and says what one from a pod's would change.
    let (snap, mut config) = example();
    config.detect_local = lb_proxy::compile::DetectLocal::InterfaceNamePrefix(
        lb_proxy::nft::ir::IfName::prefix("veth").expect("valid prefix"),
    );
    let e = explain(&snap, &config, &query("10.96.0.10:80", "10.100.0.2"));
    assert!(e.outcome.starts_with("dnat"), "{e}");
    assert_eq!(
        e.masquerade,
        "yes, unless the connection arrives on interface veth* (a pod's)"
    );
}

/// The example compiled in process, as `explain` compiles it, for tests that alter it.
fn compiled(snap: &Snapshot, config: &Config) -> lb_proxy::nft::ir::Ruleset {
    let mut rs = lb_proxy::nft::ir::Ruleset::default();
    for family in [lb_core::IpFamily::V4, lb_core::IpFamily::V6] {
        let (id, table, _) = lb_proxy::compile::compile(snap, config, family);
        rs.tables.insert(id, table);
    }
    rs
}

/// Removes every element of the set or map `name` from every table.
fn empty_set(rs: &mut lb_proxy::nft::ir::Ruleset, name: &str) {
    for table in rs.tables.values_mut() {
        table
            .sets
            .get_mut(name)
            .expect("the compiler creates the set")
            .elements
            .clear();
    }
}

#[test]
fn rules_that_dispatch_to_another_endpoint_set_than_the_traffic_policy_win_and_say_so() {
    // The traffic class (lb-core) says node-local endpoints for outside traffic to an eTP
    // Local load-balancer IP; a ruleset without its eTP Local dispatch sends it to every
    // endpoint. explain reports what the rules do, and names the policy it contradicts.
    let (snap, config) = example();
    let q = query("192.0.2.20:80", "10.100.0.2");
    let mut rs = compiled(&snap, &config);
    let agreed = lb_proxy::explain::answer(&rs, &snap, &config, &q).expect("traces");
    assert_eq!(
        agreed.endpoint_set.as_deref(),
        Some(
            "local: externalTrafficPolicy Local: node-local endpoints only, client address preserved"
        )
    );
    empty_set(&mut rs, lb_proxy::compile::names::EXTERNAL_LOCAL_IPS);
    let e = lb_proxy::explain::answer(&rs, &snap, &config, &q).expect("traces");
    assert_eq!(
        e.endpoint_set.as_deref(),
        Some(
            "cluster: every usable endpoint, as the rules dispatch it, although the traffic \
             policy says \"externalTrafficPolicy Local: node-local endpoints only, client \
             address preserved\""
        ),
        "{e}"
    );
    assert_eq!(e.endpoints.iter().filter(|v| v.eligible).count(), 2, "{e}");
}

#[test]
fn rules_that_do_not_masquerade_what_the_traffic_policy_masquerades_win_and_say_so() {
    // A node port of an eTP Cluster Service is masqueraded by policy; a ruleset that lost the
    // mark's element does not masquerade it, and explain says both.
    let (snap, config) = example();
    let q = query("10.100.0.1:30080", "10.100.0.2");
    let mut rs = compiled(&snap, &config);
    let agreed = lb_proxy::explain::answer(&rs, &snap, &config, &q).expect("traces");
    assert_eq!(
        agreed.masquerade,
        "yes: externalTrafficPolicy Cluster masquerades external traffic"
    );
    empty_set(&mut rs, lb_proxy::compile::names::MASQ_NODEPORTS);
    let e = lb_proxy::explain::answer(&rs, &snap, &config, &q).expect("traces");
    assert_eq!(
        e.masquerade,
        "no: the backend sees the client's address, as the rules do it, although the traffic \
         policy says to masquerade (\"externalTrafficPolicy Cluster masquerades external \
         traffic\")",
        "{e}"
    );
}

#[test]
fn the_node_reaching_an_etp_local_service_without_endpoints_is_short_circuited_not_local() {
    // The node's (and a pod's) traffic to an eTP Local address is short-circuited to every
    // endpoint, however many there are; with none at all it is rejected. explain used to call
    // this "node-local endpoints only, client address preserved", because the rules then fall
    // through to the eTP Local map; the class of the traced source says what it is.
    let (mut objects, _) = Objects::read_paths(&[concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/cluster/node.yaml"
    )]);
    let mut errors = Vec::new();
    objects.add_text(
        "lonely.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: lonely, namespace: demo}\n\
         spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.40\n  externalTrafficPolicy: Local\n  \
         ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30090}]\n\
         status: {loadBalancer: {ingress: [{ip: 192.0.2.40}]}}\n",
        &mut errors,
    );
    assert!(errors.is_empty(), "{errors:?}");
    let (store, _, _) = objects.into_store(Some("node-a"), &Filter::default());
    let snap = store.snapshot().expect("node");
    let (_, config) = example();
    let mut q = query("192.0.2.40:80", "10.100.0.1");
    q.from_node = true;
    let e = explain(&snap, &config, &q);
    assert_eq!(
        e.endpoint_set.as_deref(),
        Some(
            "cluster: externalTrafficPolicy Local, but traffic from the node itself is \
             short-circuited to every endpoint"
        ),
        "{e}"
    );
    assert!(e.outcome.starts_with("reject"), "{e}");
    // From elsewhere: the node-local set, as the rules dispatch it.
    let e = explain(&snap, &config, &query("192.0.2.40:80", "10.100.0.2"));
    assert!(
        e.endpoint_set
            .as_deref()
            .is_some_and(|s| s.starts_with("local: externalTrafficPolicy Local")),
        "{e}"
    );
}
