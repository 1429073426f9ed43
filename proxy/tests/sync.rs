//! The incremental path agrees with a full compile: after any sequence of Service and
//! EndpointSlice changes, what the (fake) kernel holds equals the table compiled from scratch,
//! and every transaction is small.

use lb_core::{
    Conditions, Endpoint, IpFamily, Node, Protocol, ServicePort, ServiceType, TrafficPolicy,
};
use lb_proxy::compile::{Config, compile};
use lb_proxy::convert::{ServiceKey, Slice, SlicePort};
use lb_proxy::nft::fake::Fake;
use lb_proxy::nft::ir::Ruleset;
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
                Endpoint::builder(&format!("10.244.{i}.{e}"), 1)
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
            }
            if !report.full {
                prop_assert!(report.elements <= 200, "an incremental sync stays small: {:?}", report);
            }
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
