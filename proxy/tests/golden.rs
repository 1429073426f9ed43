//! Golden files: small manifest sets, each with the ruleset `lb-proxy render` prints for it,
//! checked in, so a reviewer sees a change to the rules as a text diff.
//!
//! Every directory of `tests/golden/` is a case: `input.yaml` (Services and EndpointSlices as
//! `kubectl get -o yaml` prints them; the first line says what the case is about) and
//! `expected.nft`, the `nft -f` text of the desired ruleset. All cases run on node `node-a`
//! (zone `zone-a`, addresses 10.100.0.1 and fd00:100::1) with the cluster CIDRs
//! 10.244.0.0/16 and fd00:244::/32 and otherwise default settings.
//!
//! A difference fails the test with a unified diff. After an intended change, regenerate and
//! review: `LB_UPDATE_GOLDEN=1 cargo test -p lb-proxy --test golden`.

use std::path::{Path, PathBuf};

use lb_core::IpFamily;
use lb_proxy::compile::{Config, compile};
use lb_proxy::convert::Filter;
use lb_proxy::manifests::Objects;
use lb_proxy::nft::Transaction;
use lb_proxy::nft::ir::Ruleset;

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels:\n    topology.kubernetes.io/zone: zone-a\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 10.100.0.1\n  - type: InternalIP\n    address: fd00:100::1\n";

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/golden is readable")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    cases
}

/// What `render` prints for the case's manifests.
fn render(case: &Path) -> String {
    let input = std::fs::read_to_string(case.join("input.yaml")).expect("input.yaml is readable");
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    objects.add_text("node.yaml", NODE, &mut errors);
    objects.add_text("input.yaml", &input, &mut errors);
    assert!(errors.is_empty(), "{}: {errors:?}", case.display());
    let (store, _, _) = objects.into_store(Some("node-a"), &Filter::default());
    let snap = store.snapshot().expect("the node is known");
    let config = Config {
        cluster_cidrs: vec![
            "10.244.0.0/16".parse().expect("literal"),
            "fd00:244::/32".parse().expect("literal"),
        ],
        ..Config::default()
    };
    let mut rs = Ruleset::default();
    for family in [IpFamily::V4, IpFamily::V6] {
        let (id, table, _) = compile(&snap, &config, family);
        rs.tables.insert(id, table);
    }
    Transaction::create(&rs).to_nft()
}

#[test]
fn every_golden_case_renders_its_expected_ruleset() {
    let update = std::env::var_os("LB_UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let cases = cases();
    assert!(cases.len() >= 8, "only {} golden cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().expect("a name").to_string_lossy();
        let got = render(case);
        let path = case.join("expected.nft");
        if update {
            std::fs::write(&path, &got).expect("expected.nft is writable");
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        if want != got {
            let diff = similar::TextDiff::from_lines(&want, &got)
                .unified_diff()
                .context_radius(2)
                .header(
                    &format!("{name}/expected.nft"),
                    &format!("{name} (rendered)"),
                )
                .to_string();
            failures.push(diff);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} golden cases differ (LB_UPDATE_GOLDEN=1 regenerates them):\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
