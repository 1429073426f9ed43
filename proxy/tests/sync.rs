//! The incremental path agrees with a full compile: after any sequence of Service and
//! EndpointSlice changes, what the (fake) kernel holds equals the table compiled from scratch,
//! and every transaction is small.

use lb_core::{
    Conditions, Endpoint, IpFamily, Node, Protocol, ServicePort, ServiceType, TrafficPolicy,
};
use lb_proxy::compile::{Config, compile};
use lb_proxy::convert::{ServiceKey, Slice, SlicePort};
use lb_proxy::nft::fake::Fake;
use lb_proxy::nft::ir::{Element, ElementData, Family, Ruleset, TableId, Value};
use lb_proxy::store::Store;
use lb_proxy::sync::Dataplane;
use proptest::prelude::*;

fn key(i: u8) -> ServiceKey {
    ServiceKey {
        namespace: "ns".into(),
        name: format!("svc{i}"),
    }
}

fn ports(i: u8, variant: u8) -> Vec<ServicePort> {
    let mut b = ServicePort::builder("ns", &format!("svc{i}"), "p", Protocol::Tcp, 80)
        .cluster_ips([format!("10.96.0.{i}"), format!("fd00::{i}")]);
    match variant % 4 {
        0 => {}
        1 => {
            b = b
                .service_type(ServiceType::NodePort)
                .node_port(30000 + i64::from(i))
        }
        2 => {
            b = b
                .service_type(ServiceType::LoadBalancer)
                .node_port(31000 + i64::from(i))
                .load_balancer_ips([format!("192.0.2.{i}")])
                .external_traffic_policy(TrafficPolicy::Local)
                .load_balancer_source_ranges(["10.0.0.0/8"])
        }
        _ => b = b.client_ip_affinity(Some(60 + i64::from(variant))),
    }
    if variant == 6 {
        // Affinity on every kind of address, split by eTP Local: two record chains.
        b = b.client_ip_affinity(Some(90));
    }
    vec![b.build().expect("valid")]
}

fn slice(i: u8, eps: &[(u8, bool, bool)]) -> Slice {
    Slice {
        service: key(i),
        family: lb_core::IpFamily::V4,
        ports: vec![SlicePort {
            name: "p".into(),
            protocol: Protocol::Tcp,
            port: std::num::NonZeroU16::new(8080).expect("non-zero"),
        }],
        endpoints: eps
            .iter()
            .map(|&(e, ready, local)| {
                Endpoint::builder(format!("10.244.{i}.{e}"), 1)
                    .conditions(if ready {
                        Conditions::READY
                    } else {
                        Conditions::SERVING_TERMINATING
                    })
                    .node_name(if local { "n1" } else { "n2" })
                    .build()
                    .expect("valid endpoint")
            })
            .collect(),
    }
}

#[derive(Debug, Clone)]
enum Change {
    Service(u8, Option<u8>),
    Slice(u8, Option<Vec<(u8, bool, bool)>>),
    Zone(bool),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (0..6u8, proptest::option::of(0..8u8)).prop_map(|(i, v)| Change::Service(i, v)),
        (
            0..6u8,
            proptest::option::of(proptest::collection::vec(
                (0..6u8, any::<bool>(), any::<bool>()),
                0..5
            ))
        )
            .prop_map(|(i, e)| Change::Slice(i, e)),
        any::<bool>().prop_map(Change::Zone),
    ]
}

fn expected(store: &Store, config: &Config) -> Ruleset {
    let snap = store.snapshot().expect("node");
    let mut rs = Ruleset::default();
    for f in [IpFamily::V4, IpFamily::V6] {
        let (id, t, _) = compile(&snap, config, f);
        rs.tables.insert(id, t);
    }
    rs
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn incremental_syncs_hold_exactly_what_a_full_compile_produces(
        changes in proptest::collection::vec(change(), 1..25)
    ) {
        let config = Config::default();
        let mut store = Store::new();
        store.set_node(Node::new("n1", Some("z1")).expect("node"));
        let mut dp = Dataplane::new(Fake::default(), config.clone());
        dp.sync(&mut store).expect("first sync");
        for c in changes {
            match c {
                Change::Service(i, v) => store.apply_service(key(i), v.map(|v| ports(i, v))),
                Change::Slice(i, e) => store.apply_slice(("ns".into(), format!("s{i}")), e.map(|e| slice(i, &e))),
                Change::Zone(z) => store.set_node(Node::new("n1", Some(if z { "z1" } else { "z2" })).expect("node")),
            }
            let report = dp.sync(&mut store).expect("fake accepts every sync");
            let want = expected(&store, &config);
            // Unused pick-N chains and affinity sets linger until a full sync; compare the
            // committed view and the elements the kernel holds.
            prop_assert_eq!(dp.ruleset(), want.clone());
            for (id, t) in &want.tables {
                let have = &dp.backend().ruleset.tables[id];
                for (name, set) in &t.sets {
                    prop_assert_eq!(&have.sets[name].elements, &set.elements, "set {}", name);
                }
                for (name, chain) in &t.chains {
                    let kernel = &have.chains[name].rules;
                    if name == "services" || name == "affinity-record" {
                        // Rules for affinity timeouts no longer in use linger until a full
                        // sync (harmless: their maps only expire); all wanted ones are there.
                        for r in &chain.rules {
                            prop_assert!(kernel.contains(r), "chain {} lacks {:?}", name, r);
                        }
                    } else {
                        prop_assert_eq!(kernel, &chain.rules, "chain {}", name);
                    }
                }
                // A Service's record chains leave with it (ClientIP affinity per port).
                for name in have.chains.keys().filter(|n| n.starts_with("affinity-record.")) {
                    prop_assert!(t.chains.contains_key(name), "chain {} lingers", name);
                }
            }
            if !report.full {
                prop_assert!(report.elements <= 200, "an incremental sync stays small: {:?}", report);
            }
        }
    }
}

/// A full sync compiles the store a chunk of Services at a time: with more Services than one
/// chunk, in several namespaces, with two-port Services (whose ports order by name, not as
/// given) and node ports shared across chunks (the first owner in name order wins), the
/// kernel holds exactly what one compile of the whole store produces.
#[test]
fn a_full_sync_of_more_services_than_one_chunk_holds_what_a_full_compile_produces() {
    let config = Config::default();
    let mut store = Store::new();
    store.set_node(Node::new("n1", Some("z1")).expect("node"));
    let n = lb_proxy::sync::FULL_SYNC_SERVICES + 700;
    for i in 0..n {
        let (ns, name) = (format!("ns{}", i % 3), format!("svc{i}"));
        let ip = |k: usize| format!("10.{}.{}.{}", 96 + k, (i >> 8) & 255, i & 255);
        let port = |port_name: &str, k: usize| {
            ServicePort::builder(&ns, &name, port_name, Protocol::Tcp, 80 + k as i64)
                .cluster_ips([ip(k)])
                .service_type(ServiceType::NodePort)
                // Shared by Services far apart in name order, so in different chunks.
                .node_port(30000 + (i % 1000) as i64 + 1000 * k as i64)
                .build()
                .expect("valid port")
        };
        let ports = if i % 5 == 0 {
            vec![port("web", 0), port("api", 1)]
        } else {
            vec![port("", 0)]
        };
        let key = ServiceKey {
            namespace: ns.clone(),
            name: name.clone(),
        };
        store.apply_service(key.clone(), Some(ports));
        let endpoint = Endpoint::builder(format!("10.244.{}.{}", (i >> 8) & 255, i & 255), 1)
            .node_name(if i % 2 == 0 { "n1" } else { "n2" })
            .build()
            .expect("valid endpoint");
        let slice_ports = ["web", "api", ""].map(|p| SlicePort {
            name: p.into(),
            protocol: Protocol::Tcp,
            port: std::num::NonZeroU16::new(8080).expect("non-zero"),
        });
        store.apply_slice(
            (ns, format!("{name}-abc")),
            Some(Slice {
                service: key,
                family: IpFamily::V4,
                ports: slice_ports.to_vec(),
                endpoints: vec![endpoint],
            }),
        );
    }
    let mut dp = Dataplane::new(Fake::default(), config.clone());
    let report = dp.sync(&mut store).expect("fake accepts the sync");
    assert!(report.full);
    assert_eq!(report.service_ports, n + n.div_ceil(5));
    let want = expected(&store, &config);
    assert_eq!(dp.ruleset(), want, "the compilers' committed view");
    assert_eq!(dp.backend().ruleset, want, "what the kernel holds");
}

/// Keys with several owners: three NodePort Services share one node port (the first in name
/// order programs it) and one endpoint (its hairpin key). Deleting them one at a time takes
/// those keys from three owners to two, to one, to none; after each step the kernel holds
/// what a whole compile of the store produces.
#[test]
fn keys_shared_by_several_services_follow_their_first_owner_as_the_services_go() {
    let config = Config::default();
    let mut store = Store::new();
    store.set_node(Node::new("n1", None).expect("node"));
    let svc = |i: u8| ServiceKey {
        namespace: "ns".into(),
        name: format!("shared{i}"),
    };
    for i in 0..3u8 {
        let name = format!("shared{i}");
        let port = ServicePort::builder("ns", &name, "p", Protocol::Tcp, 80)
            .cluster_ips([format!("10.96.1.{i}")])
            .service_type(ServiceType::NodePort)
            .node_port(30080)
            .build()
            .expect("valid port");
        store.apply_service(svc(i), Some(vec![port]));
        let endpoint = Endpoint::builder("10.244.9.9", 1)
            .node_name("n1")
            .build()
            .expect("valid endpoint");
        store.apply_slice(
            ("ns".into(), format!("{name}-abc")),
            Some(Slice {
                service: svc(i),
                family: IpFamily::V4,
                ports: vec![SlicePort {
                    name: "p".into(),
                    protocol: Protocol::Tcp,
                    port: std::num::NonZeroU16::new(8080 + u16::from(i)).expect("non-zero"),
                }],
                endpoints: vec![endpoint],
            }),
        );
    }
    let mut dp = Dataplane::new(Fake::default(), config.clone());
    dp.sync(&mut store).expect("first sync");
    let check = |dp: &Dataplane<Fake>, store: &Store, step: &str| {
        let want = expected(store, &config);
        assert_eq!(dp.ruleset(), want, "{step}: the compilers' view");
        for (id, t) in &want.tables {
            for (name, set) in &t.sets {
                assert_eq!(
                    &dp.backend().ruleset.tables[id].sets[name].elements,
                    &set.elements,
                    "{step}: set {name}"
                );
            }
        }
    };
    check(&dp, &store, "three owners");
    let node_port_target = |dp: &Dataplane<Fake>| {
        let id = TableId::new(Family::Ip, lb_proxy::compile::TABLE);
        format!(
            "{:?}",
            dp.backend().ruleset.tables[&id].sets["service-nodeports"].elements
        )
    };
    assert!(
        node_port_target(&dp).contains("shared0"),
        "{}",
        node_port_target(&dp)
    );
    for (i, step) in ["two owners", "one owner", "none"].iter().enumerate() {
        store.apply_service(svc(i as u8), None);
        let report = dp.sync(&mut store).expect("sync");
        assert!(!report.full, "{step}: an incremental sync");
        check(&dp, &store, step);
        if i < 2 {
            let next = format!("shared{}", i + 1);
            assert!(
                node_port_target(&dp).contains(&next),
                "{step}: {}",
                node_port_target(&dp)
            );
        }
    }
}

/// A backend that fails the next apply on request, like a kernel rejecting a batch.
#[derive(Debug, Default)]
struct Flaky {
    fake: Fake,
    fail_next: bool,
}

impl lb_proxy::nft::Backend for Flaky {
    fn apply(&mut self, tx: &lb_proxy::nft::Transaction) -> Result<(), lb_proxy::nft::ApplyError> {
        if std::mem::take(&mut self.fail_next) {
            return Err(lb_proxy::nft::ApplyError::Batch(
                std::io::Error::from_raw_os_error(22),
            ));
        }
        self.fake.apply(tx)
    }
}

#[test]
fn a_rejected_transaction_leaves_the_previous_ruleset_and_the_next_sync_is_full() {
    let config = Config::default();
    let mut store = Store::new();
    store.set_node(Node::new("n1", None).expect("node"));
    store.apply_service(key(1), Some(ports(1, 0)));
    let mut dp = Dataplane::new(Flaky::default(), config.clone());
    dp.sync(&mut store).expect("first sync");
    let before = dp.backend().fake.ruleset.clone();
    store.apply_slice(
        ("ns".into(), "s1".into()),
        Some(slice(1, &[(1, true, true)])),
    );
    dp.backend_mut().fail_next = true;
    assert!(dp.sync(&mut store).is_err(), "the kernel said no");
    assert_eq!(
        dp.backend().fake.ruleset,
        before,
        "the previous ruleset keeps serving"
    );
    let report = dp.sync(&mut store).expect("retry");
    assert!(report.full, "after a failure the next sync is a full one");
    assert_eq!(dp.backend().fake.ruleset, expected(&store, &config));
}

/// Puts ClientIP affinity entries into the fake kernel's `affinity-<secs>` map, as the data
/// path does: `(client, vip . tcp . 80) → endpoint`.
fn record_affinity(dp: &mut Dataplane<Fake>, secs: u64, entries: &[(&str, &str, &[Value])]) {
    let entries: Vec<_> = entries.iter().map(|&(c, v, e)| (c, v, 80, e)).collect();
    record_affinity_on(dp, secs, &entries);
}

/// As [`record_affinity`], with the service port: `(client, vip . tcp . port) → endpoint`.
fn record_affinity_on(
    dp: &mut Dataplane<Fake>,
    secs: u64,
    entries: &[(&str, &str, u16, &[Value])],
) {
    let id = TableId::new(Family::Ip, lb_proxy::compile::TABLE);
    let map = dp
        .backend_mut()
        .ruleset
        .tables
        .get_mut(&id)
        .and_then(|t| t.sets.get_mut(&format!("affinity-{secs}")))
        .expect("the affinity map exists");
    for (client, vip, port, endpoint) in entries {
        let ip = |s: &str| Value::Ipv4(s.parse().expect("address"));
        map.elements.insert(
            vec![ip(client), ip(vip), Value::TCP, Value::Port(*port)],
            Element::values(endpoint.to_vec()),
        );
    }
}

/// Puts node port affinity entries into the fake kernel's `affinity-nodeport-<secs>` map:
/// `(client . tcp . node port) → endpoint`.
fn record_nodeport_affinity(
    dp: &mut Dataplane<Fake>,
    secs: u64,
    entries: &[(&str, u16, &[Value])],
) {
    let id = TableId::new(Family::Ip, lb_proxy::compile::TABLE);
    let map = dp
        .backend_mut()
        .ruleset
        .tables
        .get_mut(&id)
        .and_then(|t| t.sets.get_mut(&format!("affinity-nodeport-{secs}")))
        .expect("the node port affinity map exists");
    for (client, port, endpoint) in entries {
        map.elements.insert(
            vec![
                Value::Ipv4(client.parse().expect("address")),
                Value::TCP,
                Value::Port(*port),
            ],
            Element::values(endpoint.to_vec()),
        );
    }
}

/// The endpoints (`ip . port`) the fake kernel's `endpoints` map holds for `vip`.
fn endpoint_values(dp: &Dataplane<Fake>, vip: &str) -> Vec<Vec<Value>> {
    let id = TableId::new(Family::Ip, lb_proxy::compile::TABLE);
    let vip = Value::Ipv4(vip.parse().expect("address"));
    dp.backend().ruleset.tables[&id].sets["endpoints"]
        .elements
        .iter()
        .filter(|(k, _)| k.first() == Some(&vip))
        .filter_map(|(_, e)| match &e.data {
            Some(ElementData::Values(v)) => Some(v.clone()),
            _ => None,
        })
        .collect()
}

fn affinity_keys(dp: &Dataplane<Fake>, secs: u64) -> Vec<Vec<Value>> {
    let id = TableId::new(Family::Ip, lb_proxy::compile::TABLE);
    dp.backend().ruleset.tables[&id].sets[&format!("affinity-{secs}")]
        .elements
        .keys()
        .cloned()
        .collect()
}

#[test]
fn affinity_entries_of_an_endpoint_that_left_are_purged_and_the_others_kept() {
    let mut store = Store::new();
    store.set_node(Node::new("n1", None).expect("node"));
    store.apply_service(key(3), Some(ports(3, 3)));
    let eps = |v: &[u8]| slice(3, &v.iter().map(|&e| (e, true, true)).collect::<Vec<_>>());
    store.apply_slice(("ns".into(), "s3".into()), Some(eps(&[1, 2, 3])));
    let mut dp = Dataplane::new(Fake::default(), Config::default());
    dp.sync(&mut store).expect("first sync");
    let before = endpoint_values(&dp, "10.96.0.3");
    assert_eq!(before.len(), 3);
    let gone = before
        .iter()
        .find(|e| e[0] == Value::Ipv4("10.244.3.1".parse().expect("address")))
        .expect("endpoint 1")
        .clone();
    let stays = before
        .iter()
        .find(|e| e[0] == Value::Ipv4("10.244.3.2".parse().expect("address")))
        .expect("endpoint 2")
        .clone();
    // Timeout 60 + variant 3.
    record_affinity(
        &mut dp,
        63,
        &[
            ("10.100.0.2", "10.96.0.3", &gone),
            ("10.100.0.3", "10.96.0.3", &stays),
            ("10.100.0.4", "10.96.0.3", &gone),
        ],
    );

    store.apply_slice(("ns".into(), "s3".into()), Some(eps(&[2, 3])));
    let applies = dp.backend().applies;
    let report = dp.sync(&mut store).expect("sync");
    assert_eq!(report.affinity_purged, 2, "{report:?}");
    assert_eq!(report.affinity_purge_error, None);
    assert_eq!(
        dp.backend().applies,
        applies + 1,
        "the endpoint change and the purge of its affinity entries are one transaction"
    );
    let ip = |s: &str| Value::Ipv4(s.parse().expect("address"));
    assert_eq!(
        affinity_keys(&dp, 63),
        vec![vec![
            ip("10.100.0.3"),
            ip("10.96.0.3"),
            Value::TCP,
            Value::Port(80)
        ]],
        "only the entry of the remaining endpoint is left"
    );

    // A change that leaves every endpoint in place purges nothing.
    store.apply_slice(("ns".into(), "s3".into()), Some(eps(&[2, 3, 4])));
    let report = dp.sync(&mut store).expect("sync");
    assert_eq!(report.affinity_purged, 0);
    assert_eq!(affinity_keys(&dp, 63).len(), 1);

    // The Service goes away: its remaining entries go too (the map lingers until a full sync).
    store.apply_service(key(3), None);
    let report = dp.sync(&mut store).expect("sync");
    assert_eq!(report.affinity_purged, 1, "{report:?}");
    assert!(affinity_keys(&dp, 63).is_empty());
}

#[test]
fn a_backend_that_cannot_list_elements_still_syncs_and_reports_the_purge_failure() {
    let mut store = Store::new();
    store.set_node(Node::new("n1", None).expect("node"));
    store.apply_service(key(3), Some(ports(3, 3)));
    store.apply_slice(
        ("ns".into(), "s3".into()),
        Some(slice(3, &[(1, true, true), (2, true, true)])),
    );
    let mut dp = Dataplane::new(Flaky::default(), Config::default());
    dp.sync(&mut store).expect("first sync");
    store.apply_slice(
        ("ns".into(), "s3".into()),
        Some(slice(3, &[(1, true, true)])),
    );
    let report = dp.sync(&mut store).expect("the ruleset is applied");
    assert!(
        report
            .affinity_purge_error
            .as_deref()
            .is_some_and(|e| e.contains("not supported")),
        "{report:?}"
    );
    // Not retried: the backend cannot do it.
    let report = dp.sync(&mut store).expect("nothing to do");
    assert_eq!(report.affinity_purge_error, None);
}

#[test]
fn service_traffic_sums_the_counters_of_a_service_ports_addresses_and_node_port() {
    use lb_proxy::nft::ElementCounter;
    let mut store = Store::new();
    store.set_node(Node::new("n1", None).expect("node"));
    // Variant 2: cluster IPs 10.96.0.2 and fd00::2, load-balancer IP 192.0.2.2, node port 31002.
    store.apply_service(key(2), Some(ports(2, 2)));
    store.apply_service(key(4), Some(ports(4, 0)));
    let mut dp = Dataplane::new(Fake::default(), Config::default());
    dp.sync(&mut store).expect("first sync");
    let v4 = TableId::new(Family::Ip, lb_proxy::compile::TABLE);
    let ip = |s: &str| Value::Ipv4(s.parse().expect("address"));
    let counted = [
        (
            "service-traffic",
            vec![ip("10.96.0.2"), Value::TCP, Value::Port(80)],
            10,
            1000,
        ),
        (
            "service-traffic",
            vec![ip("192.0.2.2"), Value::TCP, Value::Port(80)],
            5,
            500,
        ),
        (
            "nodeport-traffic",
            vec![Value::TCP, Value::Port(31002)],
            1,
            60,
        ),
        (
            "service-traffic",
            vec![ip("10.96.0.4"), Value::TCP, Value::Port(80)],
            7,
            700,
        ),
    ];
    for (set, key, packets, bytes) in counted {
        dp.backend_mut().counters.insert(
            (v4.clone(), set.to_string(), key),
            ElementCounter { packets, bytes },
        );
    }
    let traffic = dp.service_traffic().expect("the fake lists elements");
    let seen: Vec<(String, IpFamily, u64, u64)> = traffic
        .iter()
        .map(|t| (t.service_port.to_string(), t.family, t.packets, t.bytes))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("ns/svc2:p".to_string(), IpFamily::V4, 16, 1560),
            ("ns/svc2:p".to_string(), IpFamily::V6, 0, 0),
            ("ns/svc4:p".to_string(), IpFamily::V4, 7, 700),
            ("ns/svc4:p".to_string(), IpFamily::V6, 0, 0),
        ]
    );
}

#[test]
fn affinity_entries_of_external_addresses_and_node_ports_follow_the_endpoints_they_may_use() {
    // eTP Local: outside clients go to local endpoints, pods and the node to all of them, so
    // entries to a remote endpoint stay valid while it serves the Service.
    let mut store = Store::new();
    store.set_node(Node::new("n1", None).expect("node"));
    let port = ServicePort::builder("ns", "svc7", "p", Protocol::Tcp, 80)
        .cluster_ips(["10.96.0.7"])
        .service_type(ServiceType::LoadBalancer)
        .node_port(31007)
        .load_balancer_ips(["192.0.2.7"])
        .external_traffic_policy(TrafficPolicy::Local)
        .client_ip_affinity(Some(100))
        .build()
        .expect("valid");
    store.apply_service(key(7), Some(vec![port]));
    // 10.244.7.1 local, 10.244.7.2 and 10.244.7.3 remote.
    let eps = |v: &[(u8, bool)]| {
        let v: Vec<_> = v.iter().map(|&(e, local)| (e, true, local)).collect();
        slice(7, &v)
    };
    store.apply_slice(
        ("ns".into(), "s7".into()),
        Some(eps(&[(1, true), (2, false), (3, false)])),
    );
    let mut dp = Dataplane::new(Fake::default(), Config::default());
    dp.sync(&mut store).expect("first sync");
    let all = endpoint_values(&dp, "10.96.0.7");
    let ep = |n: &str| {
        all.iter()
            .find(|e| e[0] == Value::Ipv4(n.parse().expect("address")))
            .expect("endpoint")
            .clone()
    };
    let (e1, e2, e3) = (ep("10.244.7.1"), ep("10.244.7.2"), ep("10.244.7.3"));
    record_affinity_on(
        &mut dp,
        100,
        &[
            ("10.100.0.2", "192.0.2.7", 80, &e1),
            ("10.244.9.9", "192.0.2.7", 80, &e2),
            ("10.244.9.9", "192.0.2.7", 80 + 1, &e2),
        ],
    );
    record_nodeport_affinity(
        &mut dp,
        100,
        &[
            ("10.100.0.3", 31007, &e1),
            ("10.100.0.4", 31007, &e3),
            ("10.100.0.5", 31008, &e3),
        ],
    );
    // Endpoint 3 leaves.
    store.apply_slice(
        ("ns".into(), "s7".into()),
        Some(eps(&[(1, true), (2, false)])),
    );
    let report = dp.sync(&mut store).expect("sync");
    assert_eq!(report.affinity_purged, 1, "{report:?}");
    let ip = |s: &str| Value::Ipv4(s.parse().expect("address"));
    let k = |c: &str, v: &str, p: u16| vec![ip(c), ip(v), Value::TCP, Value::Port(p)];
    assert_eq!(
        affinity_keys(&dp, 100),
        vec![
            k("10.100.0.2", "192.0.2.7", 80),
            k("10.244.9.9", "192.0.2.7", 80),
            k("10.244.9.9", "192.0.2.7", 81),
        ],
        "address entries of endpoints that still serve stay"
    );
    let id = TableId::new(Family::Ip, lb_proxy::compile::TABLE);
    let np: Vec<_> = dp.backend().ruleset.tables[&id].sets["affinity-nodeport-100"]
        .elements
        .keys()
        .cloned()
        .collect();
    assert_eq!(
        np,
        vec![
            vec![ip("10.100.0.3"), Value::TCP, Value::Port(31007)],
            vec![ip("10.100.0.5"), Value::TCP, Value::Port(31008)],
        ],
        "the node port entry of the endpoint that left is gone, another node port's stays"
    );
}

/// A fake kernel in which the affinity entries a transaction deletes expire just before it
/// is applied (once): the batch fails with `ENOENT`, as the kernel's would.
#[derive(Debug, Default)]
struct Expiring {
    fake: Fake,
    expire_next: bool,
}

impl lb_proxy::nft::Backend for Expiring {
    fn apply(&mut self, tx: &lb_proxy::nft::Transaction) -> Result<(), lb_proxy::nft::ApplyError> {
        if self.expire_next {
            let mut expired = false;
            for c in &tx.commands {
                if let lb_proxy::nft::Command::DeleteElements { table, set, keys } = c
                    && set.starts_with("affinity-")
                    && let Some(s) = self
                        .fake
                        .ruleset
                        .tables
                        .get_mut(table)
                        .and_then(|t| t.sets.get_mut(set))
                {
                    for k in keys {
                        s.elements.remove(k);
                    }
                    expired = true;
                }
            }
            if expired {
                self.expire_next = false;
                return Err(lb_proxy::nft::ApplyError::Batch(
                    std::io::Error::from_raw_os_error(libc::ENOENT),
                ));
            }
        }
        self.fake.apply(tx)
    }

    fn list_elements(
        &mut self,
        table: &TableId,
        set: &str,
        spec: &lb_proxy::nft::ir::SetSpec,
    ) -> Result<Vec<lb_proxy::nft::ListedElement>, lb_proxy::nft::ApplyError> {
        self.fake.list_elements(table, set, spec)
    }
}

#[test]
fn an_affinity_entry_expiring_before_the_transaction_does_not_fail_the_endpoint_change() {
    let mut store = Store::new();
    store.set_node(Node::new("n1", None).expect("node"));
    store.apply_service(key(3), Some(ports(3, 3)));
    let eps = |v: &[u8]| slice(3, &v.iter().map(|&e| (e, true, true)).collect::<Vec<_>>());
    store.apply_slice(("ns".into(), "s3".into()), Some(eps(&[1, 2])));
    let mut dp = Dataplane::new(Expiring::default(), Config::default());
    dp.sync(&mut store).expect("first sync");
    let id = TableId::new(Family::Ip, lb_proxy::compile::TABLE);
    let ip = |s: &str| Value::Ipv4(s.parse().expect("address"));
    let entry = |client: &str, to: &str| {
        (
            vec![ip(client), ip("10.96.0.3"), Value::TCP, Value::Port(80)],
            Element::values(vec![ip(to), Value::Port(8080)]),
        )
    };
    let map = dp
        .backend_mut()
        .fake
        .ruleset
        .tables
        .get_mut(&id)
        .and_then(|t| t.sets.get_mut("affinity-63"))
        .expect("the affinity map exists");
    for (k, e) in [
        entry("10.100.0.2", "10.244.3.1"),
        entry("10.100.0.3", "10.244.3.2"),
    ] {
        map.elements.insert(k, e);
    }
    dp.backend_mut().expire_next = true;
    store.apply_slice(("ns".into(), "s3".into()), Some(eps(&[2])));
    let report = dp.sync(&mut store).expect("the endpoint change is applied");
    assert!(!report.full, "{report:?}");
    let rs = &dp.backend().fake.ruleset.tables[&id];
    assert!(
        rs.sets["endpoints"].elements.values().all(|e| e.data
            != Some(ElementData::Values(vec![
                ip("10.244.3.1"),
                Value::Port(8080)
            ]))),
        "the endpoint is gone"
    );
    assert_eq!(
        rs.sets["affinity-63"]
            .elements
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        vec![entry("10.100.0.3", "10.244.3.2").0]
    );
}

/// Services `from..to`: ClusterIP, one endpoint each (the first with ClientIP affinity).
fn add_plain_services(store: &mut Store, range: std::ops::Range<usize>) {
    for i in range {
        let name = format!("plain{i}");
        let key = ServiceKey {
            namespace: "ns".into(),
            name: name.clone(),
        };
        let mut port = ServicePort::builder("ns", &name, "p", Protocol::Tcp, 80)
            .cluster_ips([format!("10.97.{}.{}", i / 256, i % 256)]);
        if i == 0 {
            port = port.client_ip_affinity(Some(60));
        }
        store.apply_service(key.clone(), Some(vec![port.build().expect("valid port")]));
        let endpoint = Endpoint::builder(format!("10.245.{}.{}", i / 256, i % 256), 1)
            .node_name("n2")
            .build()
            .expect("valid endpoint");
        store.apply_slice(
            ("ns".into(), format!("{name}-abc")),
            Some(Slice {
                service: key,
                family: IpFamily::V4,
                ports: vec![SlicePort {
                    name: "p".into(),
                    protocol: Protocol::Tcp,
                    port: std::num::NonZeroU16::new(8080).expect("non-zero"),
                }],
                endpoints: vec![endpoint],
            }),
        );
    }
}

/// A full sync sizes each set the compiler fills for twice its elements (a power of two, at
/// least `MIN_SET_SIZE`); the sets the data path fills and the interval sets get no size. A
/// change keeps the sizes while the sets have room; a change that outgrows one is refused by
/// the kernel as a whole and becomes, in the same sync, a full sync that sizes them anew.
#[test]
fn a_change_that_outgrows_a_set_becomes_a_full_sync_that_sizes_the_sets_anew() {
    use lb_proxy::compile::{MIN_SET_SIZE, fit_size};
    assert_eq!(
        [0, 512, 513, 1100, 100_000].map(fit_size),
        [MIN_SET_SIZE, 1024, 2048, 4096, 262_144]
    );
    let config = Config::default();
    let mut store = Store::new();
    store.set_node(Node::new("n1", None).expect("node"));
    add_plain_services(&mut store, 0..500);
    let mut dp = Dataplane::new(Fake::default(), config.clone());
    assert!(dp.sync(&mut store).expect("first sync").full);
    let id = TableId::new(Family::Ip, lb_proxy::compile::TABLE);
    let size =
        |dp: &Dataplane<Fake>, set: &str| dp.backend().ruleset.tables[&id].sets[set].spec.size;
    let len =
        |dp: &Dataplane<Fake>, set: &str| dp.backend().ruleset.tables[&id].sets[set].elements.len();
    assert_eq!(len(&dp, "cluster-ips"), 500);
    for set in [
        "cluster-ips",
        "service-ips",
        "endpoints",
        "hairpin",
        "affinity-keys-60",
    ] {
        assert_eq!(size(&dp, set), Some(1024), "{set}");
    }
    for set in ["affinity-60", "service-cidrs", "firewall-allow"] {
        assert_eq!(
            size(&dp, set),
            None,
            "{set}: filled by the data path, or intervals"
        );
    }
    assert_eq!(dp.backend().ruleset, expected(&store, &config));

    // 400 more fit: an incremental sync, the sizes unchanged.
    add_plain_services(&mut store, 500..900);
    let report = dp.sync(&mut store).expect("sync");
    assert!(!report.full, "{report:?}");
    assert_eq!(
        (len(&dp, "cluster-ips"), size(&dp, "cluster-ips")),
        (900, Some(1024))
    );
    // The committed view is the kernel's, sizes included; a full sync now would size the set
    // for its 900 elements. The elements are a whole compile's.
    assert_eq!(dp.ruleset(), dp.backend().ruleset);
    let want = expected(&store, &config);
    assert_eq!(want.tables[&id].sets["cluster-ips"].spec.size, Some(2048));
    for (name, set) in &want.tables[&id].sets {
        assert_eq!(
            dp.backend().ruleset.tables[&id].sets[name].elements,
            set.elements,
            "{name}"
        );
    }

    // 200 more do not fit in 1,024: the kernel refuses the change, and the same sync
    // replaces the tables with sets sized for the 1,100.
    let applies = dp.backend().applies;
    add_plain_services(&mut store, 900..1100);
    let report = dp.sync(&mut store).expect("the full sync succeeds");
    assert!(report.full, "{report:?}");
    assert_eq!(
        dp.backend().applies,
        applies + 1,
        "the refused change applied nothing"
    );
    assert_eq!(
        (len(&dp, "cluster-ips"), size(&dp, "cluster-ips")),
        (1100, Some(4096))
    );
    assert_eq!(size(&dp, "masquerade-nodeports"), Some(MIN_SET_SIZE));
    assert_eq!(dp.backend().ruleset, expected(&store, &config));
    assert_eq!(dp.ruleset(), dp.backend().ruleset);
    // And the next change is incremental again.
    store.apply_service(
        ServiceKey {
            namespace: "ns".into(),
            name: "plain7".into(),
        },
        None,
    );
    assert!(!dp.sync(&mut store).expect("sync").full);
    // A change that needs a new set (the key map of a new affinity timeout) creates it with
    // the smallest size.
    let sticky = ServicePort::builder("ns", "sticky", "p", Protocol::Tcp, 80)
        .cluster_ips(["10.98.0.1"])
        .client_ip_affinity(Some(90))
        .build()
        .expect("valid port");
    let key = ServiceKey {
        namespace: "ns".into(),
        name: "sticky".into(),
    };
    store.apply_service(key, Some(vec![sticky]));
    assert!(!dp.sync(&mut store).expect("sync").full);
    assert_eq!(size(&dp, "affinity-keys-90"), Some(MIN_SET_SIZE));
    assert_eq!(size(&dp, "affinity-90"), None);
    assert_eq!(dp.ruleset(), dp.backend().ruleset);
}
