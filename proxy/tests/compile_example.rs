//! The bundled example compiles into a ruleset the fake kernel accepts, with the expected
//! elements.

use lb_core::IpFamily;
use lb_proxy::compile::{Config, compile};
use lb_proxy::convert::Filter;
use lb_proxy::manifests::Objects;
use lb_proxy::nft::fake::Fake;
use lb_proxy::nft::ir::Ruleset;
use lb_proxy::nft::{Backend, Transaction};

fn example() -> Ruleset {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/cluster");
    let (objects, errors) = Objects::read_paths(&[dir]);
    assert!(errors.is_empty(), "{errors:?}");
    let (store, errors, _skipped) = objects.into_store(Some("node-a"), &Filter::default());
    assert_eq!(
        errors.len(),
        2,
        "the broken Service and the bad endpoint: {errors:?}"
    );
    let snap = store.snapshot().expect("node known");
    let config = Config {
        cluster_cidrs: vec!["10.244.0.0/16".parse().expect("literal CIDR")],
        ..Config::default()
    };
    let mut rs = Ruleset::default();
    for fam in [IpFamily::V4, IpFamily::V6] {
        let (id, table, _) = compile(&snap, &config, fam);
        rs.tables.insert(id, table);
    }
    rs
}

#[test]
fn the_example_compiles_into_a_ruleset_the_fake_kernel_accepts() {
    let rs = example();
    let tx = Transaction::create(&rs);
    let mut fake = Fake::default();
    fake.apply(&tx).expect("valid transaction");
    assert_eq!(fake.ruleset, rs);
    let text = tx.to_nft();
    assert!(
        text.contains(r#"10.96.0.10 . tcp . 80 comment "demo/web:http" : goto pick-3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"192.0.2.20 . tcp . 80 comment "demo/shop:http" : goto pick-local-1"#),
        "{text}"
    );
}
