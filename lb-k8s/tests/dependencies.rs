//! lb-k8s is for embedders: its normal dependency tree must stay free of the Kubernetes client,
//! the async runtime and the GPL netlink libraries the `lb-proxy` binary links.

use std::process::Command;

/// Crates that must never be normal dependencies of lb-k8s (at any depth).
const FORBIDDEN: &[&str] = &[
    "kube",
    "kube-client",
    "kube-runtime",
    "kube-core",
    "tokio",
    "nftnl",
    "nftnl-sys",
    "mnl",
    "mnl-sys",
    "lb-nft",
    "lb-proxy",
];

#[test]
fn lb_k8s_normal_dependencies_have_no_kube_tokio_nftnl_or_mnl() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--manifest-path",
            concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
            "-p",
            "lb-k8s",
            "-e",
            "normal",
            "--all-features",
            "--prefix",
            "none",
            "--format",
            "{p}",
            "--locked",
            "--offline",
        ])
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    // The tree is real: it names what lb-k8s does depend on.
    assert!(
        names.contains(&"lb-core") && names.contains(&"k8s-openapi"),
        "{tree}"
    );
    let bad: Vec<&&str> = FORBIDDEN.iter().filter(|f| names.contains(f)).collect();
    assert!(bad.is_empty(), "lb-k8s depends on {bad:?}:\n{tree}");
}
