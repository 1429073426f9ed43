//! kube-proxy's `detectLocalMode` with real packets (issue 9, point 10): which traffic counts
//! as coming from a pod decides whether a connection to a cluster IP is masqueraded and
//! whether an `externalTrafficPolicy: Local` address short-circuits it to every endpoint.
//!
//! Each test picks a setting under which the client namespace (10.100.0.2, interface
//! `eth-client` on the node) counts as a pod and backend b0 (10.244.1.10, `veth-b0`) does not:
//! the opposite of the default `ClusterCIDR` mode with the harness's cluster CIDR
//! 10.244.0.0/16, so each test fails if the mode is ignored.

use lb_e2e::{Topology, slice_yaml};

fn service(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: t\nspec:\n{spec}"
    )
}

/// Node `node-a` with `spec.podCIDRs`.
fn node_yaml(pod_cidrs: &[&str]) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\nspec:\n  podCIDRs: [{}]\n",
        pod_cidrs.join(", ")
    )
}

/// A cluster IP Service `web` (10.96.0.70:80) and an eTP Local Service `ext` with external IP
/// 192.0.2.70:80, both served only by b1 on another node.
fn setup(node: &str, args: &[&str]) -> Topology {
    let mut t = Topology::up(2);
    t.serve_all();
    t.write_manifest("node.yaml", node);
    t.write_manifest(
        "svc.yaml",
        &format!(
            "{}---\n{}",
            service(
                "web",
                "  clusterIP: 10.96.0.70\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n"
            ),
            service(
                "ext",
                "  clusterIP: 10.96.0.71\n  externalIPs: [192.0.2.70]\n  externalTrafficPolicy: Local\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n"
            )
        ),
    );
    t.write_manifest(
        "eps.yaml",
        &format!(
            "{}---\n{}",
            slice_yaml("web", "IPv4", "http", "TCP", 8080, &[(1, "node-b", true)]),
            slice_yaml("ext", "IPv4", "http", "TCP", 8080, &[(1, "node-b", true)])
        ),
    );
    t.start_proxy(args);
    t
}

/// The source b1 sees for a connection from `ns` to the cluster IP.
fn seen_by_backend(t: &Topology, ns: &str) -> String {
    let (b, seen) = t.tcp(ns, "10.96.0.70:80").expect("the cluster IP answers");
    assert_eq!(b, "b1");
    seen
}

/// Asserts the client counts as a pod and b0 does not.
fn assert_client_is_the_pod(t: &Topology, mode: &str) {
    assert_eq!(
        seen_by_backend(t, &t.client),
        "10.100.0.2",
        "{mode}: traffic from a pod to a cluster IP is not masqueraded"
    );
    assert_eq!(
        seen_by_backend(t, &t.backends[0]),
        "10.244.1.1",
        "{mode}: traffic from outside the pods to a cluster IP is masqueraded"
    );
    let (b, _) = t
        .tcp(&t.client, "192.0.2.70:80")
        .expect("a pod reaches an eTP Local external IP without local endpoints");
    assert_eq!(
        b, "b1",
        "{mode}: pod traffic is short-circuited to every endpoint"
    );
    let err = t
        .tcp(&t.backends[0], "192.0.2.70:80")
        .expect_err("traffic from outside the pods has no local endpoint");
    assert!(err.contains("timed out"), "{mode}: dropped: {err}");
}

#[test]
fn detect_local_mode_node_cidr_takes_pods_from_the_nodes_pod_cidrs_and_follows_the_node() {
    let mut t = setup(
        &node_yaml(&["10.100.0.0/24", "fd00:100::/64"]),
        &["--detect-local-mode", "NodeCIDR"],
    );
    assert_client_is_the_pod(&t, "NodeCIDR 10.100.0.0/24");
    // The Node's pod CIDR changes: the next sync follows it.
    t.drain_applied();
    t.write_manifest("node.yaml", &node_yaml(&["10.244.1.0/24"]));
    t.wait_applied();
    assert!(
        Topology::eventually(std::time::Duration::from_secs(5), || seen_by_backend(
            &t, &t.client
        ) == "10.244.1.1"),
        "NodeCIDR 10.244.1.0/24: the client is outside the pods now, so masqueraded"
    );
    assert_eq!(
        seen_by_backend(&t, &t.backends[0]),
        "10.244.1.10",
        "NodeCIDR 10.244.1.0/24: b0 is a pod now"
    );
}

#[test]
fn detect_local_mode_interface_name_prefix_takes_pods_from_their_interfaces() {
    let t = setup(
        &node_yaml(&[]),
        &[
            "--detect-local-mode",
            "InterfaceNamePrefix",
            "--pod-interface-name-prefix",
            "eth-cl",
        ],
    );
    assert_client_is_the_pod(&t, "InterfaceNamePrefix eth-cl");
}

#[test]
fn detect_local_mode_bridge_interface_takes_pods_from_that_interface() {
    let t = setup(
        &node_yaml(&[]),
        &[
            "--detect-local-mode",
            "BridgeInterface",
            "--pod-bridge-interface",
            "eth-client",
        ],
    );
    assert_client_is_the_pod(&t, "BridgeInterface eth-client");
}

#[test]
fn detect_local_mode_without_its_interface_is_refused_naming_the_flag() {
    let t = Topology::up(0);
    t.write_manifest("node.yaml", &node_yaml(&[]));
    let out = std::process::Command::new(lb_e2e::binary("lb-proxy"))
        .args(["render", "--detect-local-mode", "BridgeInterface", "-f"])
        .arg(&t.dir)
        .output()
        .expect("run lb-proxy render");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--pod-bridge-interface") && stderr.contains("BridgeInterface"),
        "{stderr}"
    );
}
