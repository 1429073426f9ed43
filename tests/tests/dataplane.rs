//! The nftables dataplane with real packets: `lb-proxy run` programs a node namespace over
//! netlink from manifests; clients and backends in their own namespaces exchange traffic.

use std::collections::BTreeMap;
use std::time::Duration;

use lb_e2e::{NODE_YAML, Topology, slice_yaml};

fn service(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: t\nspec:\n{spec}"
    )
}

fn backends(m: &BTreeMap<String, usize>) -> Vec<String> {
    m.keys().cloned().collect()
}

fn setup(n: usize, manifests: &[(&str, String)]) -> Topology {
    let mut t = Topology::up(n);
    t.serve_all();
    t.write_manifest("node.yaml", NODE_YAML);
    for (name, yaml) in manifests {
        t.write_manifest(name, yaml);
    }
    t.start_proxy(&[]);
    t
}

const WEB: &str = "  clusterIP: 10.96.0.10\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n  - name: dns\n    port: 53\n    protocol: UDP\n";

fn web_slices(eps: &[(usize, &str, bool)]) -> String {
    format!(
        "{}---\n{}",
        slice_yaml("web", "IPv4", "http", "TCP", 8080, eps),
        slice_yaml("web", "IPv4", "dns", "UDP", 5353, eps)
            .replace("name: web-ipv4", "name: web-dns")
    )
}

#[test]
fn cluster_ip_tcp_and_udp_spread_over_all_endpoints() {
    let eps = [
        (0, "node-a", true),
        (1, "node-b", true),
        (2, "node-c", true),
    ];
    let t = setup(
        3,
        &[
            ("svc.yaml", service("web", WEB)),
            ("eps.yaml", web_slices(&eps)),
        ],
    );
    let tcp = t.spread(&t.client, "10.96.0.10:80", 60, false);
    assert_eq!(backends(&tcp), ["b0", "b1", "b2"], "{tcp:?}");
    assert!(tcp.values().all(|&n| n >= 8), "uneven TCP spread {tcp:?}");
    let udp = t.spread(&t.client, "10.96.0.10:53", 60, true);
    assert_eq!(backends(&udp), ["b0", "b1", "b2"], "{udp:?}");
}

#[test]
fn etp_cluster_masquerades_traffic_from_outside_the_cluster() {
    let eps = [(0, "node-a", true)];
    let t = setup(
        1,
        &[
            ("svc.yaml", service("web", WEB)),
            ("eps.yaml", web_slices(&eps)),
        ],
    );
    let (b, seen) = t.tcp(&t.client, "10.96.0.10:80").expect("reply");
    assert_eq!(b, "b0");
    assert_eq!(
        seen, "10.244.1.1",
        "off-cluster client must be masqueraded to the node"
    );
    // A pod inside the cluster CIDR keeps its address.
    let (_, seen) = t
        .tcp(&t.backends[0].clone(), "10.96.0.10:80")
        .expect("reply");
    assert_eq!(
        seen, "10.244.1.1",
        "hairpin (a pod reaching itself) is masqueraded"
    );
}

#[test]
fn a_pod_reaching_itself_through_its_service_is_hairpinned() {
    let eps = [(0, "node-a", true), (1, "node-a", true)];
    let t = setup(
        2,
        &[
            ("svc.yaml", service("web", WEB)),
            ("eps.yaml", web_slices(&eps)),
        ],
    );
    let mut saw_self = false;
    let mut saw_other = false;
    for _ in 0..30 {
        let (b, seen) = t
            .tcp(&t.backends[0], "10.96.0.10:80")
            .expect("hairpin must work");
        if b == "b0" {
            assert_eq!(seen, "10.244.1.1", "hairpin connections are masqueraded");
            saw_self = true;
        } else {
            assert_eq!(seen, "10.244.1.10", "pod-to-pod keeps the pod's address");
            saw_other = true;
        }
    }
    assert!(saw_self && saw_other);
}

#[test]
fn ipv6_cluster_ip_reaches_ipv6_endpoints() {
    let svc = service(
        "web6",
        "  clusterIP: fd00:96::10\n  clusterIPs: [\"fd00:96::10\"]\n  ipFamilies: [IPv6]\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n",
    );
    let eps = slice_yaml(
        "web6",
        "IPv6",
        "http",
        "TCP",
        8080,
        &[(0, "node-a", true), (1, "node-b", true)],
    );
    let t = setup(2, &[("svc.yaml", svc), ("eps.yaml", eps)]);
    let spread = t.spread(&t.client, "[fd00:96::10]:80", 30, false);
    assert_eq!(backends(&spread), ["b0", "b1"], "{spread:?}");
}

#[test]
fn node_port_and_load_balancer_ip_reach_endpoints() {
    let svc = service(
        "lb",
        "  type: LoadBalancer\n  clusterIP: 10.96.0.30\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    nodePort: 30080\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 192.0.2.30\n    - ip: 192.0.2.31\n      ipMode: Proxy\n",
    );
    let eps = slice_yaml(
        "lb",
        "IPv4",
        "http",
        "TCP",
        8080,
        &[(0, "node-a", true), (1, "node-b", true)],
    );
    let t = setup(2, &[("svc.yaml", svc), ("eps.yaml", eps)]);
    let np = t.spread(&t.client, "10.100.0.1:30080", 30, false);
    assert_eq!(backends(&np), ["b0", "b1"], "{np:?}");
    let lb = t.spread(&t.client, "192.0.2.30:80", 30, false);
    assert_eq!(backends(&lb), ["b0", "b1"], "{lb:?}");
    let (_, seen) = t.tcp(&t.client, "192.0.2.30:80").expect("reply");
    assert_eq!(
        seen, "10.244.1.1",
        "eTP Cluster external traffic is masqueraded"
    );
    // ipMode: Proxy ingress is the load balancer's business: not programmed here.
    assert!(t.tcp(&t.client, "192.0.2.31:80").is_err());
}

#[test]
fn etp_local_serves_only_local_endpoints_and_keeps_the_client_address() {
    let svc = service(
        "loc",
        "  type: LoadBalancer\n  clusterIP: 10.96.0.40\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    nodePort: 30040\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 192.0.2.40\n",
    );
    let eps = slice_yaml(
        "loc",
        "IPv4",
        "http",
        "TCP",
        8080,
        &[
            (0, "node-a", true),
            (1, "node-b", true),
            (2, "node-b", true),
        ],
    );
    let t = setup(3, &[("svc.yaml", svc), ("eps.yaml", eps)]);
    for target in ["192.0.2.40:80", "10.100.0.1:30040"] {
        for _ in 0..15 {
            let (b, seen) = t.tcp(&t.client, target).expect("reply");
            assert_eq!(
                b, "b0",
                "{target}: only the local endpoint serves external traffic"
            );
            assert_eq!(
                seen, "10.100.0.2",
                "{target}: the backend sees the real client"
            );
        }
    }
    // The cluster IP still uses every endpoint.
    let ci = t.spread(&t.client, "10.96.0.40:80", 40, false);
    assert_eq!(backends(&ci), ["b0", "b1", "b2"], "{ci:?}");
    // A pod is short-circuited to all endpoints even via the load-balancer IP.
    let pod = t.spread(&t.backends[1], "192.0.2.40:80", 40, false);
    assert_eq!(backends(&pod), ["b0", "b1", "b2"], "{pod:?}");
}

#[test]
fn etp_local_drops_external_traffic_when_no_endpoint_is_local() {
    let svc = service(
        "loc",
        "  type: NodePort\n  clusterIP: 10.96.0.41\n  externalTrafficPolicy: Local\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    nodePort: 30041\n",
    );
    let eps = slice_yaml("loc", "IPv4", "http", "TCP", 8080, &[(1, "node-b", true)]);
    let t = setup(2, &[("svc.yaml", svc), ("eps.yaml", eps)]);
    let err = t
        .tcp(&t.client, "10.100.0.1:30041")
        .expect_err("must not connect");
    assert!(err.contains("timed out"), "dropped, not rejected: {err}");
    assert_eq!(
        t.tcp(&t.client, "10.96.0.41:80")
            .expect("cluster IP still works")
            .0,
        "b1"
    );
}

#[test]
fn a_service_without_endpoints_refuses_connections_at_once() {
    let t = setup(1, &[("svc.yaml", service("web", WEB))]);
    let started = std::time::Instant::now();
    let err = t.tcp(&t.client, "10.96.0.10:80").expect_err("no endpoints");
    assert!(
        err.contains("refused"),
        "ICMP reject means connection refused: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a reject, not a timeout"
    );
    let err = t.udp(&t.client, "10.96.0.10:53").expect_err("no endpoints");
    assert!(err.contains("refused"), "UDP gets port unreachable: {err}");
}

#[test]
fn load_balancer_source_ranges_admit_and_block() {
    let spec = |range: &str| {
        service(
            "fw",
            &format!(
                "  type: LoadBalancer\n  clusterIP: 10.96.0.50\n  loadBalancerSourceRanges: [\"{range}\"]\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    nodePort: 30050\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 192.0.2.50\n"
            ),
        )
    };
    let eps = slice_yaml("fw", "IPv4", "http", "TCP", 8080, &[(0, "node-a", true)]);
    let mut t = setup(1, &[("svc.yaml", spec("10.100.0.0/24")), ("eps.yaml", eps)]);
    assert_eq!(t.tcp(&t.client, "192.0.2.50:80").expect("admitted").0, "b0");
    t.write_manifest("svc.yaml", &spec("203.0.113.0/24"));
    t.wait_applied();
    let err = t.tcp(&t.client, "192.0.2.50:80").expect_err("blocked");
    assert!(err.contains("timed out"), "dropped: {err}");
    // Source ranges do not apply to the cluster IP.
    assert_eq!(
        t.tcp(&t.client, "10.96.0.50:80").expect("cluster IP").0,
        "b0"
    );
}

#[test]
fn client_ip_affinity_sticks_and_its_entry_expires_after_its_timeout() {
    let svc = service(
        "sticky",
        "  clusterIP: 10.96.0.60\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 2\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n",
    );
    let eps = slice_yaml(
        "sticky",
        "IPv4",
        "http",
        "TCP",
        8080,
        &[
            (0, "node-a", true),
            (1, "node-a", true),
            (2, "node-b", true),
        ],
    );
    let t = setup(3, &[("svc.yaml", svc), ("eps.yaml", eps)]);
    let first = t.tcp(&t.client, "10.96.0.60:80").expect("reply").0;
    for _ in 0..20 {
        assert_eq!(
            t.tcp(&t.client, "10.96.0.60:80").expect("reply").0,
            first,
            "sticks"
        );
    }
    // After the timeout without new connections, the kernel has dropped the client's entry.
    // (Its next first connection is again chosen by a hash of its address, so that every
    // address of the service port agrees: with the same endpoints, the same one.)
    let entries = || {
        lb_e2e::must(std::process::Command::new("ip").args([
            "netns",
            "exec",
            &t.node,
            "nft",
            "list",
            "map",
            "ip",
            "lb-proxy",
            "affinity-2",
        ]))
    };
    assert!(
        entries().contains("10.100.0.2 . 10.96.0.60"),
        "{}",
        entries()
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert!(!entries().contains("10.100.0.2"), "{}", entries());
    assert_eq!(t.tcp(&t.client, "10.96.0.60:80").expect("reply").0, first);
}

#[test]
fn an_endpoint_change_applies_without_disturbing_established_connections() {
    let eps = |v: &[(usize, &str, bool)]| web_slices(v);
    let mut t = setup(
        3,
        &[
            ("svc.yaml", service("web", WEB)),
            ("eps.yaml", eps(&[(0, "node-a", true), (1, "node-a", true)])),
        ],
    );
    // A long-lived connection, held across the changes.
    let holder = std::thread::spawn({
        let node_client = t.client.clone();
        let bin = lb_e2e::binary("lb-testsrv");
        move || {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &node_client])
                .arg(bin)
                .args(["tcp-hold", "10.96.0.10:80", "4"])
                .output()
                .expect("run tcp-hold");
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    t.write_manifest(
        "eps.yaml",
        &eps(&[
            (0, "node-a", true),
            (1, "node-a", true),
            (2, "node-a", true),
        ]),
    );
    t.wait_applied();
    let spread = t.spread(&t.client, "10.96.0.10:80", 45, false);
    assert_eq!(
        backends(&spread),
        ["b0", "b1", "b2"],
        "added endpoint serves: {spread:?}"
    );
    t.write_manifest("eps.yaml", &eps(&[(2, "node-a", true)]));
    t.wait_applied();
    let spread = t.spread(&t.client, "10.96.0.10:80", 10, false);
    assert_eq!(
        backends(&spread),
        ["b2"],
        "removed endpoints get no new connections: {spread:?}"
    );
    let held = holder.join().expect("holder thread");
    assert!(
        held.contains("HELD"),
        "the established connection survived: {held}"
    );
}

#[test]
fn the_ruleset_read_back_with_nft_json_matches_the_ir() {
    use lb_proxy::nft::json::{from_nft_json, json_view};
    let mut t = Topology::up(1);
    let example = lb_e2e::repo().join("examples/cluster");
    for f in ["node.yaml", "services.yaml", "endpointslices.yaml"] {
        let text = std::fs::read_to_string(example.join(f)).expect("example manifest");
        t.write_manifest(f, &text);
    }
    // The bundled example plus a Service with ClientIP affinity and source ranges, so every
    // kind of object the compiler emits is read back.
    t.write_manifest(
        "extra.yaml",
        &service(
            "sticky",
            "  type: LoadBalancer\n  clusterIP: 10.96.0.70\n  sessionAffinity: ClientIP\n  loadBalancerSourceRanges: [\"10.100.0.0/24\"]\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    nodePort: 30070\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 192.0.2.70\n",
        ),
    );
    t.start_proxy(&[]);
    let args = lb_proxy::cli::ManifestArgs {
        paths: vec![t.dir.clone()],
        node: Some("node-a".into()),
        cluster_cidr: vec![
            "10.244.0.0/16".parse().expect("cidr"),
            "fd00:244::/32".parse().expect("cidr"),
        ],
        detect_local_mode: None,
        pod_bridge_interface: None,
        pod_interface_name_prefix: None,
        nodeport_addresses: lb_proxy::compile::NodePortAddresses::Primary,
        service_cidr: vec![],
        masquerade_all: false,
        masquerade_bit: 14,
        table: lb_proxy::compile::TABLE.into(),
        service_proxy_name: None,
    };
    let desired = lb_proxy::commands::desired(args.files(), args.config().expect("settings"), true)
        .expect("compile the manifests");
    let kernel = from_nft_json(&t.nft_json()).expect("parse nft -j list ruleset");
    let want = json_view(&desired);
    assert_eq!(
        kernel.tables.keys().collect::<Vec<_>>(),
        want.tables.keys().collect::<Vec<_>>()
    );
    for (id, table) in &want.tables {
        let have = &kernel.tables[id];
        for (name, set) in &table.sets {
            assert_eq!(have.sets.get(name), Some(set), "set {name} of {id}");
        }
        for (name, chain) in &table.chains {
            assert_eq!(have.chains.get(name), Some(chain), "chain {name} of {id}");
        }
        assert_eq!(have, table, "table {id}");
    }
}

#[test]
fn node_ports_are_served_only_on_the_configured_node_addresses_and_overlapping_ranges_merge() {
    let svc = service(
        "np",
        "  type: LoadBalancer\n  clusterIP: 10.96.0.80\n  loadBalancerSourceRanges: [\"10.100.0.0/16\", \"10.100.0.0/24\", \"10.100.0.2/32\"]\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    nodePort: 30080\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 192.0.2.80\n",
    );
    let eps = slice_yaml("np", "IPv4", "http", "TCP", 8080, &[(0, "node-a", true)]);
    let mut t = Topology::up(1);
    t.serve_all();
    t.write_manifest("node.yaml", NODE_YAML);
    t.write_manifest("svc.yaml", &svc);
    t.write_manifest("eps.yaml", &eps);
    t.start_proxy(&["--nodeport-addresses", "10.100.0.0/24,10.100.0.1/32"]);
    assert_eq!(
        t.tcp(&t.client, "10.100.0.1:30080")
            .expect("served on 10.100.0.1")
            .0,
        "b0"
    );
    // 10.200.0.1 is also the node's, but outside --nodeport-addresses: not a NodePort address.
    assert!(t.tcp(&t.client, "10.200.0.1:30080").is_err());
    // Overlapping source ranges were merged, so the sync succeeded and they apply.
    assert_eq!(t.tcp(&t.client, "192.0.2.80:80").expect("admitted").0, "b0");
}

#[test]
fn a_sticky_client_moves_at_once_when_its_endpoint_leaves_the_service() {
    let svc = service(
        "sticky",
        "  clusterIP: 10.96.0.62\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 600\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n",
    );
    let eps = |v: &[usize]| {
        let v: Vec<(usize, &str, bool)> = v.iter().map(|&i| (i, "node-a", true)).collect();
        slice_yaml("sticky", "IPv4", "http", "TCP", 8080, &v)
    };
    let mut t = setup(3, &[("svc.yaml", svc), ("eps.yaml", eps(&[0, 1, 2]))]);
    let affinity_map = |t: &Topology| {
        lb_e2e::must(std::process::Command::new("ip").args([
            "netns",
            "exec",
            &t.node,
            "nft",
            "list",
            "map",
            "ip",
            "lb-proxy",
            "affinity-600",
        ]))
    };
    let first = t.tcp(&t.client, "10.96.0.62:80").expect("reply").0;
    for _ in 0..10 {
        assert_eq!(
            t.tcp(&t.client, "10.96.0.62:80").expect("reply").0,
            first,
            "sticks"
        );
    }
    let x: usize = first
        .strip_prefix('b')
        .and_then(|i| i.parse().ok())
        .expect("backend name bN");
    let x_ip = format!(": {} . 8080", Topology::backend_ip(x));
    assert!(affinity_map(&t).contains(&x_ip), "{}", affinity_map(&t));

    let rest: Vec<usize> = (0..3).filter(|&i| i != x).collect();
    t.write_manifest("eps.yaml", &eps(&rest));
    t.wait_applied();
    let map = affinity_map(&t);
    assert!(
        !map.contains(&x_ip),
        "the entry pointing to the removed endpoint is gone: {map}"
    );
    let next = t.tcp(&t.client, "10.96.0.62:80").expect("reply").0;
    assert_ne!(next, first, "the client moved off the removed endpoint");
    for _ in 0..10 {
        assert_eq!(
            t.tcp(&t.client, "10.96.0.62:80").expect("reply").0,
            next,
            "and sticks to its new endpoint"
        );
    }
}

#[test]
fn client_ip_affinity_survives_a_full_sync() {
    let svc = service(
        "keep",
        "  clusterIP: 10.96.0.90\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 600\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n",
    );
    let eps = slice_yaml(
        "keep",
        "IPv4",
        "http",
        "TCP",
        8080,
        &[
            (0, "node-a", true),
            (1, "node-a", true),
            (2, "node-a", true),
        ],
    );
    let mut t = setup(3, &[("svc.yaml", svc), ("eps.yaml", eps)]);
    let first = t.tcp(&t.client, "10.96.0.90:80").expect("reply").0;
    let node = t.node.clone();
    let map = || {
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &node,
                "nft",
                "list",
                "map",
                "ip",
                "lb-proxy",
                "affinity-600",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    assert!(
        map().contains("10.100.0.2 . 10.96.0.90"),
        "the kernel remembers the client: {}",
        map()
    );
    // A new zone label on the node forces a full sync, which replaces the tables.
    t.write_manifest("node.yaml", &NODE_YAML.replace("zone-a", "zone-b"));
    t.wait_applied();
    assert!(
        map().contains("10.100.0.2 . 10.96.0.90"),
        "the entry was carried over: {}",
        map()
    );
    for _ in 0..10 {
        assert_eq!(
            t.tcp(&t.client, "10.96.0.90:80").expect("reply").0,
            first,
            "still sticky"
        );
    }
}

#[test]
fn lb_proxy_render_output_loads_with_nft_including_affinity_and_source_ranges() {
    let t = Topology::up(0);
    let example = lb_e2e::repo().join("examples/cluster");
    let out = std::process::Command::new(lb_e2e::binary("lb-proxy"))
        .args([
            "render",
            // The example holds a broken Service and a bad endpoint on purpose.
            "--keep-going",
            "--node",
            "node-a",
            "--cluster-cidr",
            "10.244.0.0/16",
            "-f",
        ])
        .arg(&example)
        .output()
        .expect("run lb-proxy render");
    assert!(out.status.success());
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("add table ip lb-proxy"));
    // And a ruleset with ClientIP affinity and source ranges.
    t.write_manifest("node.yaml", NODE_YAML);
    t.write_manifest(
        "svc.yaml",
        &service(
            "sticky",
            "  type: LoadBalancer\n  clusterIP: 10.96.0.70\n  sessionAffinity: ClientIP\n  loadBalancerSourceRanges: [\"10.100.0.0/24\"]\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    nodePort: 30070\n  - name: dns\n    port: 53\n    protocol: UDP\n    nodePort: 30053\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 192.0.2.70\n",
        ),
    );
    let out = std::process::Command::new(lb_e2e::binary("lb-proxy"))
        .args(["render", "--node", "node-a", "--table", "lb-proxy-2", "-f"])
        .arg(&t.dir)
        .output()
        .expect("run lb-proxy render");
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &t.node, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nft");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed nft");
    let out = child.wait_with_output().expect("nft finished");
    assert!(
        out.status.success(),
        "nft -f refused the render: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_cluster_ip_port_the_service_does_not_have_is_rejected_not_routed_away() {
    let eps = [(0, "node-a", true)];
    let t = setup(
        1,
        &[
            ("svc.yaml", service("web", WEB)),
            ("eps.yaml", web_slices(&eps)),
        ],
    );
    assert_eq!(
        t.tcp(&t.client, "10.96.0.10:80")
            .expect("the real port serves")
            .0,
        "b0"
    );
    let started = std::time::Instant::now();
    let err = t.tcp(&t.client, "10.96.0.10:81").expect_err("no such port");
    assert!(err.contains("refused"), "rejected: {err}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn explain_reports_the_reject_of_a_port_a_cluster_ip_lacks_as_the_packets_see_it() {
    // Issue 9, point 11: explain said "no-match, lb-proxy does not touch it".
    let eps = [(0, "node-a", true)];
    let t = setup(
        1,
        &[
            ("svc.yaml", service("web", WEB)),
            ("eps.yaml", web_slices(&eps)),
        ],
    );
    let err = t.tcp(&t.client, "10.96.0.10:81").expect_err("no such port");
    assert!(err.contains("refused"), "rejected: {err}");
    let out = std::process::Command::new(lb_e2e::binary("lb-proxy"))
        .args(["explain", "--to", "10.96.0.10:81", "--from", "10.100.0.2"])
        .arg("-f")
        .arg(&t.dir)
        .output()
        .expect("run lb-proxy explain");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.starts_with("reject: 10.96.0.10 is the cluster IP of t/web"),
        "{text}"
    );
}

/// `nft list map ip lb-proxy NAME` in the node namespace (empty when it does not exist).
fn nft_map(t: &Topology, name: &str) -> String {
    std::process::Command::new("ip")
        .args([
            "netns", "exec", &t.node, "nft", "list", "map", "ip", "lb-proxy", name,
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[test]
fn a_service_without_affinity_on_another_services_node_port_number_is_not_sticky_and_forgets_a_removed_backend()
 {
    // Issue 9, point 1: Service A has ClientIP affinity and nodePort 30080; Service B has no
    // affinity and listens on port 30080 of its cluster IP. B's connections were recorded as
    // A's node port affinity: B became sticky, and kept sending clients to a removed backend.
    let a = service(
        "a",
        "  type: NodePort\n  clusterIP: 10.96.0.70\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 600\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    nodePort: 30080\n",
    );
    let b = service(
        "b",
        "  clusterIP: 10.96.0.71\n  ports:\n  - name: http\n    port: 30080\n    protocol: TCP\n",
    );
    let b_slice = |eps: &[usize]| {
        let v: Vec<(usize, &str, bool)> = eps.iter().map(|&i| (i, "node-a", true)).collect();
        slice_yaml("b", "IPv4", "http", "TCP", 8080, &v)
    };
    let mut t = setup(
        3,
        &[
            ("a.yaml", a),
            ("b.yaml", b),
            (
                "a-eps.yaml",
                slice_yaml("a", "IPv4", "http", "TCP", 8080, &[(0, "node-a", true)]),
            ),
            ("b-eps.yaml", b_slice(&[1, 2])),
        ],
    );
    assert_eq!(
        t.tcp(&t.client, "10.100.0.1:30080")
            .expect("A's node port")
            .0,
        "b0"
    );
    let spread = t.spread(&t.client, "10.96.0.71:30080", 20, false);
    assert_eq!(
        backends(&spread),
        ["b1", "b2"],
        "B is not sticky: {spread:?}"
    );
    let recorded = nft_map(&t, "affinity-nodeport-600") + &nft_map(&t, "affinity-600");
    for b in [1, 2] {
        assert!(
            !recorded.contains(&Topology::backend_ip(b)),
            "B's connections are not recorded: {recorded}"
        );
    }
    t.write_manifest("b-eps.yaml", &b_slice(&[1]));
    t.wait_applied();
    let spread = t.spread(&t.client, "10.96.0.71:30080", 10, false);
    assert_eq!(
        backends(&spread),
        ["b1"],
        "no connection reaches the removed backend: {spread:?}"
    );
}

#[test]
fn node_port_affinity_holds_whatever_node_address_the_client_uses() {
    // Issue 9, point 2 (node port part): entries were keyed by the node address used.
    let svc = service(
        "np",
        "  type: NodePort\n  clusterIP: 10.96.0.72\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 600\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    nodePort: 30090\n",
    );
    let eps = slice_yaml(
        "np",
        "IPv4",
        "http",
        "TCP",
        8080,
        &[
            (0, "node-a", true),
            (1, "node-a", true),
            (2, "node-a", true),
        ],
    );
    let t = setup(3, &[("svc.yaml", svc), ("eps.yaml", eps)]);
    // Each round starts from empty maps, so a chance match of two independent choices
    // (1 in 3) cannot pass five rounds (1 in 243).
    for round in 0..5 {
        for map in ["affinity-600", "affinity-nodeport-600"] {
            let _ = std::process::Command::new("ip")
                .args([
                    "netns", "exec", &t.node, "nft", "flush", "map", "ip", "lb-proxy", map,
                ])
                .output();
        }
        let first = t.tcp(&t.client, "10.100.0.1:30090").expect("reply").0;
        for target in ["10.200.0.1:30090", "10.100.0.1:30090", "10.200.0.1:30090"] {
            assert_eq!(
                t.tcp(&t.client, target).expect("reply").0,
                first,
                "round {round}: {target} sticks to the endpoint chosen through 10.100.0.1"
            );
        }
    }
}

#[test]
fn affinity_to_an_endpoint_on_the_node_itself_is_recorded_and_sticks() {
    // Issue 9, point 3: a host-network endpoint (the node's own address) was never recorded,
    // because locally delivered connections never reach postrouting.
    let svc = service(
        "host",
        "  clusterIP: 10.96.0.73\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 600\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n",
    );
    let mut t = Topology::up(1);
    t.serve_all();
    let server = t.ns_command(&t.node.clone(), &lb_e2e::binary("lb-testsrv"));
    let mut server = server;
    server.args(["serve", "node", "10.200.0.1:8080"]);
    t.spawn_ready(server, "READY");
    t.write_manifest("node.yaml", NODE_YAML);
    t.write_manifest("svc.yaml", &svc);
    let mut eps = slice_yaml("host", "IPv4", "http", "TCP", 8080, &[(0, "node-a", true)]);
    eps.push_str(
        "- addresses: [\"10.200.0.1\"]\n  nodeName: node-a\n  conditions: {ready: true}\n",
    );
    t.write_manifest("eps.yaml", &eps);
    t.start_proxy(&[]);
    // Reach the node's own endpoint once (each new client choice is 1 in 2).
    let mut reached = false;
    for _ in 0..40 {
        for map in ["affinity-600", "affinity-nodeport-600"] {
            let _ = std::process::Command::new("ip")
                .args([
                    "netns", "exec", &t.node, "nft", "flush", "map", "ip", "lb-proxy", map,
                ])
                .output();
        }
        if t.tcp(&t.client, "10.96.0.73:80").expect("reply").0 == "node" {
            reached = true;
            break;
        }
    }
    assert!(reached, "the node's endpoint never answered");
    let map = nft_map(&t, "affinity-600");
    assert!(
        map.contains(": 10.200.0.1 . 8080"),
        "the choice of the node itself is recorded: {map}"
    );
    for _ in 0..10 {
        assert_eq!(
            t.tcp(&t.client, "10.96.0.73:80").expect("reply").0,
            "node",
            "sticks"
        );
    }
}

#[test]
fn the_node_reaches_a_load_balancer_ip_assigned_to_itself_when_a_source_range_holds_its_ip() {
    // Issue 9, point 7 (kube-proxy's allowFromNode): a load-balancer IP assigned to the node
    // (MetalLB, kube-vip) is reached from the node with the load-balancer IP as source. When a
    // source range contains the node's IP, kube-proxy admits that traffic; we dropped it.
    let svc = service(
        "fw",
        "  type: LoadBalancer\n  clusterIP: 10.96.0.51\n  loadBalancerSourceRanges: [\"10.100.0.0/24\"]\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    nodePort: 30051\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 192.0.2.51\n",
    );
    let eps = slice_yaml("fw", "IPv4", "http", "TCP", 8080, &[(0, "node-a", true)]);
    let mut t = setup(1, &[("svc.yaml", svc), ("eps.yaml", eps)]);
    lb_e2e::must(std::process::Command::new("ip").args([
        "-n",
        &t.node,
        "addr",
        "add",
        "192.0.2.51/32",
        "dev",
        "lo",
    ]));
    // The Node lists no address: nothing is known to be in the range, the node is blocked.
    let err = t.tcp(&t.node, "192.0.2.51:80").expect_err("blocked");
    assert!(err.contains("timed out"), "dropped: {err}");
    // Its InternalIP is in the range: the node may reach its own load-balancer IP.
    t.write_manifest(
        "node.yaml",
        &format!(
            "{NODE_YAML}status:\n  addresses:\n  - type: InternalIP\n    address: 10.100.0.1\n"
        ),
    );
    t.wait_applied();
    assert_eq!(t.tcp(&t.node, "192.0.2.51:80").expect("admitted").0, "b0");
    assert_eq!(
        t.tcp(&t.client, "192.0.2.51:80")
            .expect("client in range")
            .0,
        "b0"
    );
    // Sources outside the range are still blocked.
    let up = t.node.replace("-node", "-up");
    lb_e2e::must(std::process::Command::new("ip").args([
        "-n",
        &up,
        "route",
        "add",
        "192.0.2.51/32",
        "via",
        "10.200.0.1",
    ]));
    let err = t.tcp(&up, "192.0.2.51:80").expect_err("blocked");
    assert!(err.contains("timed out"), "dropped: {err}");
    let out = std::process::Command::new(lb_e2e::binary("lb-proxy"))
        .args(["explain", "--to", "192.0.2.51:80", "--from", "192.0.2.51"])
        .arg("-f")
        .arg(&t.dir)
        .output()
        .expect("run lb-proxy explain");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("source ranges: allowed"), "{text}");
}

#[test]
fn node_ports_are_served_only_on_the_nodes_primary_address_by_default_and_follow_its_changes() {
    // Issue 9, point 5: kube-proxy's nftables mode defaults to `nodePortAddresses: primary`,
    // the node's primary IP of each family from its Node object, not every local address.
    let node = |ip: &str| {
        format!(
            "{NODE_YAML}status:\n  addresses:\n  - type: Hostname\n    address: node-a\n  - type: InternalIP\n    address: {ip}\n"
        )
    };
    let svc = service(
        "np",
        "  type: NodePort\n  clusterIP: 10.96.0.85\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    nodePort: 30085\n",
    );
    let eps = slice_yaml("np", "IPv4", "http", "TCP", 8080, &[(0, "node-a", true)]);
    let mut t = Topology::up(1);
    t.serve_all();
    t.write_manifest("node.yaml", &node("10.100.0.1"));
    t.write_manifest("svc.yaml", &svc);
    t.write_manifest("eps.yaml", &eps);
    t.start_proxy(&[]);
    assert_eq!(
        t.tcp(&t.client, "10.100.0.1:30085")
            .expect("served on the primary address")
            .0,
        "b0"
    );
    // 10.200.0.1 is the node's too, but not its primary address.
    assert!(t.tcp(&t.client, "10.200.0.1:30085").is_err());
    assert_eq!(
        t.tcp(&t.client, "10.96.0.85:80").expect("cluster IP").0,
        "b0"
    );

    // The Node's address changes: NodePorts move with it.
    t.write_manifest("node.yaml", &node("10.200.0.1"));
    t.wait_applied();
    assert_eq!(
        t.tcp(&t.client, "10.200.0.1:30085")
            .expect("served on the new primary address")
            .0,
        "b0"
    );
    assert!(t.tcp(&t.client, "10.100.0.1:30085").is_err());
}

#[test]
fn node_ports_are_served_on_every_node_address_when_the_node_lists_none_or_all_is_asked() {
    // `primary` cannot be resolved without the Node's addresses: every local address, as
    // before; and `0.0.0.0/0,::/0` asks for every local address explicitly.
    let svc = service(
        "np",
        "  type: NodePort\n  clusterIP: 10.96.0.86\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    nodePort: 30086\n",
    );
    let eps = slice_yaml("np", "IPv4", "http", "TCP", 8080, &[(0, "node-a", true)]);
    for extra in [&[][..], &["--nodeport-addresses", "0.0.0.0/0,::/0"][..]] {
        let mut t = Topology::up(1);
        t.serve_all();
        t.write_manifest("node.yaml", NODE_YAML);
        t.write_manifest("svc.yaml", &svc);
        t.write_manifest("eps.yaml", &eps);
        t.start_proxy(extra);
        for addr in ["10.100.0.1:30086", "10.200.0.1:30086"] {
            assert_eq!(
                t.tcp(&t.client, addr).expect("served").0,
                "b0",
                "{addr} with {extra:?}"
            );
        }
    }
}

/// Serves `10.96.0.99:80` from the topology's upstream namespace (where the node routes what
/// it does not DNAT), answering `up`: a packet to that address that leaves the node is seen.
fn serve_upstream(t: &mut Topology, addr: &str) {
    let up = t.node.replace("-node", "-up");
    lb_e2e::must(std::process::Command::new("ip").args([
        "-n",
        &up,
        "addr",
        "add",
        &format!("{addr}/32"),
        "dev",
        "lo",
    ]));
    lb_e2e::must(std::process::Command::new("ip").args([
        "-n",
        &up,
        "route",
        "add",
        "10.100.0.0/24",
        "via",
        "10.200.0.1",
    ]));
    let mut cmd = t.ns_command(&up, &lb_e2e::binary("lb-testsrv"));
    cmd.args(["serve", "up", &format!("{addr}:80")]);
    t.spawn_ready(cmd, "READY");
}

const SERVICE_CIDR_YAML: &str = "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: kubernetes\nspec:\n  cidrs:\n  - 10.96.0.0/16\n  - fd00:96::/108\n";

#[test]
fn traffic_to_an_unallocated_cluster_ip_of_a_service_cidr_is_dropped_not_routed_off_the_node() {
    // Issue 9, point 8: kube-proxy drops traffic to an address of a ServiceCIDR that no
    // Service holds ("Drop traffic to unallocated ClusterIPs").
    let svc = service(
        "web",
        "  clusterIP: 10.96.0.90\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n",
    );
    let eps = slice_yaml("web", "IPv4", "http", "TCP", 8080, &[(0, "node-a", true)]);
    let mut t = setup(1, &[("svc.yaml", svc), ("eps.yaml", eps)]);
    serve_upstream(&mut t, "10.96.0.99");
    // No ServiceCIDR known yet: the packet is routed upstream, as before.
    assert_eq!(
        t.tcp(&t.client, "10.96.0.99:80")
            .expect("routed upstream")
            .0,
        "up"
    );

    t.write_manifest("servicecidr.yaml", SERVICE_CIDR_YAML);
    t.wait_applied();
    let err = t
        .tcp(&t.client, "10.96.0.99:80")
        .expect_err("dropped on the node");
    assert!(err.contains("timed out"), "dropped, not rejected: {err}");
    // From the node itself too.
    let err = t
        .tcp(&t.node, "10.96.0.99:80")
        .expect_err("dropped on the node");
    assert!(err.contains("timed out"), "dropped, not rejected: {err}");
    // An allocated cluster IP still works, and its missing ports are still rejected.
    assert_eq!(
        t.tcp(&t.client, "10.96.0.90:80").expect("allocated").0,
        "b0"
    );
    let err = t.tcp(&t.client, "10.96.0.90:81").expect_err("rejected");
    assert!(
        err.contains("refused"),
        "a port the Service lacks is rejected: {err}"
    );

    // The ServiceCIDR goes away: nothing is dropped any more.
    std::fs::remove_file(t.dir.join("servicecidr.yaml")).expect("remove the ServiceCIDR");
    t.wait_applied();
    assert_eq!(
        t.tcp(&t.client, "10.96.0.99:80")
            .expect("routed upstream")
            .0,
        "up"
    );
}

#[test]
fn the_service_cidr_flag_drops_unallocated_cluster_ips_while_the_cluster_has_no_service_cidr() {
    let svc = service(
        "web",
        "  clusterIP: 10.96.0.91\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n",
    );
    let eps = slice_yaml("web", "IPv4", "http", "TCP", 8080, &[(0, "node-a", true)]);
    let mut t = Topology::up(1);
    t.serve_all();
    t.write_manifest("node.yaml", NODE_YAML);
    t.write_manifest("svc.yaml", &svc);
    t.write_manifest("eps.yaml", &eps);
    serve_upstream(&mut t, "10.96.0.99");
    serve_upstream_extra(&mut t, "10.97.0.99");
    t.start_proxy(&["--service-cidr", "10.96.0.0/16"]);
    assert!(
        t.tcp(&t.client, "10.96.0.99:80").is_err(),
        "dropped on the node"
    );
    assert_eq!(
        t.tcp(&t.client, "10.96.0.91:80").expect("allocated").0,
        "b0"
    );
    assert_eq!(t.tcp(&t.client, "10.97.0.99:80").expect("outside").0, "up");
    // A ServiceCIDR object replaces the flag.
    t.write_manifest(
        "servicecidr.yaml",
        &SERVICE_CIDR_YAML.replace("10.96.0.0/16", "10.97.0.0/16"),
    );
    t.wait_applied();
    assert!(
        t.tcp(&t.client, "10.97.0.99:80").is_err(),
        "dropped on the node"
    );
    assert_eq!(
        t.tcp(&t.client, "10.96.0.99:80")
            .expect("routed upstream")
            .0,
        "up"
    );
}

/// One more upstream address, once [`serve_upstream`] set the route.
fn serve_upstream_extra(t: &mut Topology, addr: &str) {
    let up = t.node.replace("-node", "-up");
    lb_e2e::must(std::process::Command::new("ip").args([
        "-n",
        &up,
        "addr",
        "add",
        &format!("{addr}/32"),
        "dev",
        "lo",
    ]));
    let mut cmd = t.ns_command(&up, &lb_e2e::binary("lb-testsrv"));
    cmd.args(["serve", "up", &format!("{addr}:80")]);
    t.spawn_ready(cmd, "READY");
}

#[test]
fn a_sticky_client_lands_on_one_endpoint_through_every_address_of_the_service_port() {
    // Issue 9, point 2: ClientIP affinity is per service port: the same client through the
    // cluster IP, an external IP, a load-balancer IP and the node port (on either node
    // address) reaches the same endpoint.
    let svc = service(
        "sticky",
        "  type: LoadBalancer\n  clusterIP: 10.96.0.77\n  externalIPs: [192.0.2.177]\n  sessionAffinity: ClientIP\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    nodePort: 30077\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 192.0.2.77\n",
    );
    let eps = slice_yaml(
        "sticky",
        "IPv4",
        "http",
        "TCP",
        8080,
        &[
            (0, "node-a", true),
            (1, "node-a", true),
            (2, "node-a", true),
        ],
    );
    let t = setup(3, &[("svc.yaml", svc), ("eps.yaml", eps)]);
    lb_e2e::must(std::process::Command::new("ip").args([
        "-n",
        &t.client,
        "addr",
        "add",
        "10.100.0.5/24",
        "dev",
        "eth0",
    ]));
    let targets = [
        "10.96.0.77:80",
        "192.0.2.177:80",
        "192.0.2.77:80",
        "10.100.0.1:30077",
        "10.200.0.1:30077",
    ];
    for source in ["10.100.0.2", "10.100.0.5"] {
        let reached: BTreeMap<String, Vec<&str>> =
            targets.iter().fold(BTreeMap::new(), |mut m, target| {
                for _ in 0..3 {
                    let line = t.peer(&t.client, &["tcp", target, "3000", source]);
                    let backend = line.split_whitespace().next().unwrap_or("").to_string();
                    m.entry(backend).or_default().push(target);
                }
                m
            });
        assert_eq!(
            reached.len(),
            1,
            "client {source} reached several endpoints: {reached:?}"
        );
        assert!(reached.keys().all(|b| b.starts_with('b')), "{reached:?}");
    }
}

#[test]
fn a_sticky_ipv6_client_lands_on_one_endpoint_through_the_cluster_ip_and_the_node_port() {
    // Issue 9, point 2, IPv6: the hash reads the 16-byte source address.
    let svc = service(
        "sticky6",
        "  type: NodePort\n  clusterIP: fd00:96::77\n  ipFamilies: [IPv6]\n  sessionAffinity: ClientIP\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    nodePort: 30078\n",
    );
    let eps = slice_yaml(
        "sticky6",
        "IPv6",
        "http",
        "TCP",
        8080,
        &[
            (0, "node-a", true),
            (1, "node-a", true),
            (2, "node-a", true),
        ],
    );
    let t = setup(3, &[("svc.yaml", svc), ("eps.yaml", eps)]);
    let mut reached = BTreeMap::new();
    for target in [
        "[fd00:96::77]:80",
        "[fd00:100::1]:30078",
        "[fd00:200::1]:30078",
    ] {
        for _ in 0..3 {
            let line = t.peer(&t.client, &["tcp", target, "6000"]);
            let backend = line.split_whitespace().next().unwrap_or("").to_string();
            reached.entry(backend).or_insert_with(Vec::new).push(target);
        }
    }
    assert_eq!(reached.len(), 1, "several endpoints: {reached:?}");
    assert!(reached.keys().all(|b| b.starts_with('b')), "{reached:?}");
}

/// The endpoint a client at `source` reaches at `target` (`bN`), from the test peer's reply.
fn backend_from(t: &Topology, source: &str, target: &str) -> String {
    let line = t.peer(&t.client, &["tcp", target, "3000", source]);
    line.split_whitespace().next().unwrap_or("").to_string()
}

#[test]
fn a_sticky_client_keeps_its_endpoint_on_every_address_of_the_service_port_after_the_endpoints_change()
 {
    // Issue 9, point 2: Kubernetes keeps ClientIP affinity per service port. A client that was
    // sent to E through the cluster IP must reach E through the external IP and the node port
    // too, also when the endpoints changed meanwhile so that a fresh choice (a hash of the
    // client address over the new endpoint list) would pick another one.
    let svc = service(
        "stick",
        "  type: NodePort\n  clusterIP: 10.96.0.78\n  externalIPs: [192.0.2.178]\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 600\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    nodePort: 30079\n",
    );
    let eps = |v: &[usize]| {
        let v: Vec<(usize, &str, bool)> = v.iter().map(|&i| (i, "node-a", true)).collect();
        slice_yaml("stick", "IPv4", "http", "TCP", 8080, &v)
    };
    let mut t = setup(5, &[("svc.yaml", svc), ("eps.yaml", eps(&[0, 1, 2]))]);
    let sources = ["10.100.0.2", "10.100.0.5", "10.100.0.6", "10.100.0.7"];
    for s in &sources[1..] {
        lb_e2e::must(std::process::Command::new("ip").args([
            "-n",
            &t.client,
            "addr",
            "add",
            &format!("{s}/24"),
            "dev",
            "eth0",
        ]));
    }
    // Every client is sent somewhere through the cluster IP only.
    let first: BTreeMap<&str, String> = sources
        .iter()
        .map(|&s| (s, backend_from(&t, s, "10.96.0.78:80")))
        .collect();
    assert!(first.values().all(|b| b.starts_with('b')), "{first:?}");

    // Two more endpoints: a fresh choice now hashes over five.
    t.write_manifest("eps.yaml", &eps(&[0, 1, 2, 3, 4]));
    t.wait_applied();
    let mut moved = Vec::new();
    for (&s, e) in &first {
        for target in ["192.0.2.178:80", "10.100.0.1:30079", "10.96.0.78:80"] {
            let b = backend_from(&t, s, target);
            if &b != e {
                moved.push(format!("{s} via {target}: {b}, held {e}"));
            }
        }
    }
    assert!(moved.is_empty(), "clients left their endpoint: {moved:?}");

    // The endpoint of the first client leaves: every address moves it, and to one endpoint.
    let (s, e) = first.iter().next().expect("a client");
    let gone: usize = e[1..].parse().expect("backend name bN");
    let rest: Vec<usize> = (0..5).filter(|&i| i != gone).collect();
    t.write_manifest("eps.yaml", &eps(&rest));
    t.wait_applied();
    let next = backend_from(&t, s, "192.0.2.178:80");
    assert!(next.starts_with('b') && &next != e, "{next} after {e} left");
    for target in ["10.96.0.78:80", "10.100.0.1:30079", "192.0.2.178:80"] {
        assert_eq!(backend_from(&t, s, target), next, "{s} via {target}");
    }
}
