//! `lb-proxy explain --kernel`: the tracer on the tables the kernel holds, read back with
//! `nft -j list table`, answers as it does on the ruleset compiled from the same manifests.

use lb_e2e::{Topology, binary};

#[test]
fn explain_on_the_kernels_tables_answers_as_on_the_compiled_ruleset() {
    let mut t = Topology::up(1);
    let example = lb_e2e::repo().join("examples/cluster");
    for f in ["node.yaml", "services.yaml", "endpointslices.yaml"] {
        let text = std::fs::read_to_string(example.join(f)).expect("example manifest");
        t.write_manifest(f, &text);
    }
    t.start_proxy(&[]);
    let explain = |kernel: bool, to: &str, from: &str| {
        let mut cmd = t.ns_command(&t.node, &binary("lb-proxy"));
        cmd.args([
            "explain",
            "--node",
            "node-a",
            "--cluster-cidr",
            "10.244.0.0/16,fd00:244::/32",
        ])
        .args(["--to", to, "--from", from, "-f"])
        .arg(&t.dir);
        if kernel {
            cmd.arg("--kernel");
        }
        let out = cmd.output().expect("run lb-proxy explain");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut compared = 0;
    for to in [
        "192.0.2.20:80",
        "10.96.0.10:80",
        "10.96.0.30:80",
        "10.96.0.53:53/udp",
        "10.96.0.10:81",
        "10.96.9.9:80",
    ] {
        for from in ["10.100.0.2", "10.244.1.11"] {
            let compiled = explain(false, to, from);
            assert_eq!(explain(true, to, from), compiled, "{to} from {from}");
            compared += 1;
        }
    }
    // The README's example, from the kernel.
    let readme = explain(true, "192.0.2.20:80", "10.100.0.2");
    assert!(
        readme.starts_with("service port: demo/shop:http (via its load-balancer IP)\n"),
        "{readme}"
    );
    assert_eq!(compared, 12);
}
