//! The operational surface with real HTTP and real traffic in network namespaces: health,
//! healthCheckNodePort responders, metrics, live `explain`, configuration, cleanup, SIGTERM.

use std::process::Command;
use std::time::Duration;

use lb_e2e::apiserver::{ApiServer, Kind};
use lb_e2e::{Topology, binary};
use serde_json::{Value, json};

fn node(taints: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "spec": {"taints": taints}})
}

fn shop() -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "shop", "namespace": "t"},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.20", "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 32000,
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30081}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.20"}]}}})
}

fn shop_slice(eps: &[(usize, &str)]) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(i, node)| json!({"addresses": [format!("10.244.1.1{i}")], "nodeName": node, "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "shop-abc", "namespace": "t", "labels": {"kubernetes.io/service-name": "shop"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints})
}

fn setup() -> (Topology, ApiServer, usize) {
    let mut t = Topology::up(2);
    t.serve_all();
    let api = ApiServer::start(t.bind_in(&t.node));
    api.apply(Kind::Node, node(json!([])));
    api.apply(Kind::Service, shop());
    api.apply(
        Kind::EndpointSlice,
        shop_slice(&[(0, "node-a"), (1, "node-b")]),
    );
    let kubeconfig = t.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("write kubeconfig");
    let p = t.start_daemon(&kubeconfig, &[]);
    (t, api, p)
}

/// HTTP GET from namespace `ns`: (status, whole answer).
fn get(t: &Topology, ns: &str, target: &str, path: &str) -> (u16, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(binary("lb-testsrv"))
        .args(["http", target, path])
        .output()
        .expect("run lb-testsrv http");
    let _ = t;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn body(answer: &str) -> Value {
    let b = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(b).unwrap_or(Value::Null)
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    assert!(
        Topology::eventually(Duration::from_secs(10), &mut f),
        "timed out waiting until {what}"
    );
}

#[test]
fn the_health_check_node_port_reports_local_endpoints_and_follows_the_service() {
    let (t, api, _) = setup();
    let (status, answer) = get(&t, &t.client, "10.100.0.1:32000", "/");
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer.contains("X-Load-Balancing-Endpoint-Weight: 1"),
        "{answer}"
    );
    assert!(
        answer.contains("Content-Type: application/json"),
        "{answer}"
    );
    let b = body(&answer);
    assert_eq!(b["service"], json!({"namespace": "t", "name": "shop"}));
    assert_eq!(b["localEndpoints"], 1);
    assert_eq!(b["serviceProxyHealthy"], true);
    // No local endpoint any more: the load balancer must stop sending traffic here.
    api.apply(Kind::EndpointSlice, shop_slice(&[(1, "node-b")]));
    eventually("the responder answers 503", || {
        let (s, a) = get(&t, &t.client, "10.100.0.1:32000", "/");
        s == 503 && a.contains("X-Load-Balancing-Endpoint-Weight: 0")
    });
    api.delete(Kind::Service, "t", "shop");
    eventually("the responder is gone", || {
        get(&t, &t.client, "10.100.0.1:32000", "/").0 == 0
    });
}

#[test]
fn healthz_and_livez_answer_like_kube_proxy_and_a_node_being_deleted_fails_healthz_only() {
    let (t, api, _) = setup();
    let (status, answer) = get(&t, &t.node, "127.0.0.1:10256", "/healthz");
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer.contains("X-Content-Type-Options: nosniff"),
        "{answer}"
    );
    let b = body(&answer);
    assert_eq!(b["healthy"], true);
    assert_eq!(b["nodeEligible"], true);
    assert!(
        b["lastUpdated"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{b}"
    );
    let (status, answer) = get(&t, &t.node, "127.0.0.1:10256", "/livez");
    assert_eq!(status, 200);
    assert!(
        body(&answer).get("nodeEligible").is_none(),
        "/livez does not judge the node"
    );
    api.apply(
        Kind::Node,
        node(json!([{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}])),
    );
    eventually("/healthz fails", || {
        get(&t, &t.node, "127.0.0.1:10256", "/healthz").0 == 503
    });
    assert_eq!(get(&t, &t.node, "127.0.0.1:10256", "/livez").0, 200);
}

#[test]
fn metrics_and_live_explain_are_served_from_the_running_daemon() {
    let (t, api, _) = setup();
    api.apply(Kind::EndpointSlice, shop_slice(&[(0, "node-a")]));
    eventually("the change is synced and measured", || {
        let (_, m) = get(&t, &t.node, "127.0.0.1:10249", "/metrics");
        m.contains("lb_proxy_network_programming_latency_seconds_count")
            && !m.contains("lb_proxy_network_programming_latency_seconds_count 0")
    });
    let (status, m) = get(&t, &t.node, "127.0.0.1:10249", "/metrics");
    assert_eq!(status, 200);
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
        "lb_proxy_nftables_elements_programmed_total",
        "kubeproxy_conntrack_reconciler_deleted_entries_total",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics:\n{m}");
    }
    let out = t
        .ns_command(&t.node, &binary("lb-proxy"))
        .args([
            "explain",
            "--live",
            "127.0.0.1:10249",
            "--to",
            "192.0.2.20:80",
            "--from",
            "10.100.0.2",
        ])
        .output()
        .expect("run lb-proxy explain");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("service port: t/shop:http (via its load-balancer IP)"),
        "{text}"
    );
    assert!(text.contains("✓ 10.244.1.10:8080"), "{text}");
    assert!(text.contains("masquerade:   no"), "{text}");
}

#[test]
fn sigterm_leaves_the_dataplane_in_place_and_cleanup_removes_it() {
    let (mut t, _api, p) = setup();
    t.stop(p);
    assert_eq!(
        t.tcp(&t.client, "192.0.2.20:80").expect("still served").0,
        "b0"
    );
    let out = t
        .ns_command(&t.node, &binary("lb-proxy"))
        .args(["daemon", "--cleanup"])
        .output()
        .expect("cleanup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = Command::new("ip")
        .args(["netns", "exec", &t.node, "nft", "list", "tables"])
        .output()
        .expect("nft");
    assert!(
        !String::from_utf8_lossy(&listing.stdout).contains("lb-proxy"),
        "tables removed"
    );
    assert!(
        t.tcp(&t.client, "192.0.2.20:80").is_err(),
        "no longer served"
    );
}

#[test]
fn an_invalid_configuration_is_rejected_at_start_naming_the_field() {
    let t = Topology::up(0);
    let cfg = t.dir.join("config.yaml");
    std::fs::write(
        &cfg,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nhostnameOverride: node-a\nnftables:\n  masqueradeBit: 40\n",
    )
    .expect("write config");
    let out = t
        .ns_command(&t.node, &binary("lb-proxy"))
        .args(["daemon", "--config"])
        .arg(&cfg)
        .output()
        .expect("run lb-proxy");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nftables.masqueradeBit: 40 is out of range 0..=31"),
        "{err}"
    );
    let out = t
        .ns_command(&t.node, &binary("lb-proxy"))
        .args(["daemon", "--config"])
        .arg(&cfg)
        .args([
            "--masquerade-bit",
            "13",
            "--kubeconfig",
            "/nonexistent/kubeconfig",
        ])
        .output()
        .expect("run lb-proxy");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("/nonexistent/kubeconfig"),
        "the flag overrode the file, then the kubeconfig was missing: {err}"
    );
}

/// `lb_proxy_service_port_{packets,bytes}_total` for `t/shop:http` (IPv4) in a scrape.
fn shop_traffic(t: &Topology) -> (u64, u64) {
    let (status, m) = get(t, &t.node, "127.0.0.1:10249", "/metrics");
    assert_eq!(status, 200, "{m}");
    let value = |metric: &str| {
        let prefix = format!("{metric}{{service_port=\"t/shop:http\",family=\"IPv4\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{metric} for t/shop:http missing from /metrics:\n{m}"))
    };
    (
        value("lb_proxy_service_port_packets_total"),
        value("lb_proxy_service_port_bytes_total"),
    )
}

#[test]
fn service_port_traffic_counters_grow_with_every_path_into_the_service() {
    let (t, _api, _) = setup();
    const N: u64 = 8;
    let mut last = shop_traffic(&t);
    // The cluster IP, the load-balancer IP and the node port all count for the service port.
    for target in ["10.96.0.20:80", "192.0.2.20:80", "10.100.0.1:30081"] {
        for _ in 0..N {
            t.tcp(&t.client, target).expect("reply");
        }
        let now = shop_traffic(&t);
        assert!(
            now.0 >= last.0 + N,
            "{target}: {N} requests, packets {} -> {}",
            last.0,
            now.0
        );
        assert!(now.1 > last.1, "{target}: bytes {} -> {}", last.1, now.1);
        last = now;
    }
}

#[test]
fn live_explain_before_the_first_sync_says_not_synced_yet() {
    // Issue 9, point 11: before its first sync the daemon answered from a half-listed store.
    let t = Topology::up(1);
    let api = ApiServer::start(t.bind_in(&t.node));
    api.apply(Kind::Node, node(json!([])));
    api.apply(Kind::Service, shop());
    api.apply(Kind::EndpointSlice, shop_slice(&[(0, "node-a")]));
    api.pause();
    let kubeconfig = t.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("write kubeconfig");
    struct Daemon(std::process::Child);
    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _daemon = Daemon(
        t.ns_command(&t.node, &binary("lb-proxy"))
            .args([
                "daemon",
                "--node",
                "node-a",
                "--cluster-cidr",
                "10.244.0.0/16",
            ])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--healthz-bind-address", "127.0.0.1:10256"])
            .args(["--metrics-bind-address", "127.0.0.1:10249"])
            .args(["--min-sync-period", "0"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn lb-proxy daemon"),
    );
    let explain = || {
        let out = t
            .ns_command(&t.node, &binary("lb-proxy"))
            .args(["explain", "--live", "127.0.0.1:10249"])
            .args(["--to", "192.0.2.20:80", "--from", "10.100.0.2"])
            .output()
            .expect("run lb-proxy explain");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let mut answer = None;
    eventually("the metrics server answers", || {
        answer = explain();
        answer.is_some()
    });
    let answer = answer.unwrap_or_default();
    assert!(answer.starts_with("not synced yet"), "{answer}");
    api.resume();
    eventually("the daemon synced and explains the Service", || {
        explain().is_some_and(|a| a.contains("service port: t/shop:http"))
    });
}

#[test]
fn a_ready_endpoint_listed_again_as_terminating_in_another_slice_keeps_the_health_check_at_200() {
    // Issue 9, point 4: the copy in the slice whose name sorts first won, so a ready local
    // endpoint also listed as terminating (a slice move) made the node report 503.
    let (t, api, _) = setup();
    let mut moved = shop_slice(&[(0, "node-a")]);
    moved["metadata"]["name"] = json!("shop-aaa");
    moved["endpoints"][0]["conditions"] =
        json!({"ready": false, "serving": true, "terminating": true});
    api.apply(Kind::EndpointSlice, moved);
    // A change after it, so the test knows the daemon has seen the terminating copy.
    api.apply(Kind::EndpointSlice, shop_slice(&[(0, "node-a")]));
    eventually("the change is synced", || {
        let (_, m) = get(&t, &t.node, "127.0.0.1:10249", "/metrics");
        m.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
    });
    std::thread::sleep(Duration::from_millis(500));
    let (status, answer) = get(&t, &t.client, "10.100.0.1:32000", "/");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(body(&answer)["localEndpoints"], 1, "{answer}");
    assert_eq!(
        t.tcp(&t.client, "192.0.2.20:80").expect("served").0,
        "b0",
        "and the endpoint still serves"
    );
}

#[test]
fn the_health_check_node_port_answers_ipv6_probes_and_counts_local_endpoints_per_family() {
    // Issue 9, point 6: the responders listened on IPv4 only (an IPv6 load balancer's probe
    // was refused), and a dual-stack pod counted as two local endpoints.
    let mut t = Topology::up(2);
    t.serve_all();
    let api = ApiServer::start(t.bind_in(&t.node));
    api.apply(Kind::Node, node(json!([])));
    let mut svc = shop();
    svc["spec"]["clusterIPs"] = json!(["10.96.0.20", "fd00:96::20"]);
    svc["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
    svc["spec"]["ipFamilyPolicy"] = json!("RequireDualStack");
    api.apply(Kind::Service, svc);
    // b0 (local) is dual-stack; b1 (local) has an IPv4 address only.
    api.apply(
        Kind::EndpointSlice,
        shop_slice(&[(0, "node-a"), (1, "node-a")]),
    );
    let mut v6 = shop_slice(&[(0, "node-a")]);
    v6["metadata"]["name"] = json!("shop-v6");
    v6["addressType"] = json!("IPv6");
    v6["endpoints"][0]["addresses"] = json!(["fd00:244:1::10"]);
    api.apply(Kind::EndpointSlice, v6);
    let kubeconfig = t.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("write kubeconfig");
    t.start_daemon(&kubeconfig, &[]);
    let mut v4 = (0, String::new());
    eventually("the IPv4 probe sees both local IPv4 endpoints", || {
        v4 = get(&t, &t.client, "10.100.0.1:32000", "/");
        v4.0 == 200 && body(&v4.1)["localEndpoints"] == 2
    });
    let (status, answer) = get(&t, &t.client, "[fd00:100::1]:32000", "/");
    assert_eq!(status, 200, "the IPv6 probe is answered: {answer}");
    assert_eq!(
        body(&answer)["localEndpoints"],
        1,
        "one local IPv6 endpoint: {answer}"
    );
    assert!(
        answer.contains("X-Load-Balancing-Endpoint-Weight: 1"),
        "{answer}"
    );
}
