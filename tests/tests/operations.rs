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

fn eventually(what: &str, f: impl FnMut() -> bool) {
    Topology::wait_until(what, Duration::from_secs(10), f);
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

/// kubeadm's `config.conf` as kubeadm writes it (kubeadm's kube-proxy ConfigMap).
fn kubeadm_config_conf() -> std::path::PathBuf {
    lb_e2e::repo().join("tests/data/kubeadm-config.conf")
}

/// A spawned process that is killed when dropped, so a failing test leaves nothing behind.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The API server emulator in the node namespace with the `shop` Service (two endpoints, one
/// on this node), and a kubeconfig for it.
fn cluster(t: &Topology) -> (ApiServer, std::path::PathBuf) {
    let api = ApiServer::start(t.bind_in(&t.node));
    api.apply(Kind::Node, node(json!([])));
    api.apply(Kind::Service, shop());
    api.apply(
        Kind::EndpointSlice,
        shop_slice(&[(0, "node-a"), (1, "node-b")]),
    );
    let kubeconfig = t.dir.join("kubeconfig.conf");
    api.write_kubeconfig(&kubeconfig).expect("write kubeconfig");
    (api, kubeconfig)
}

#[test]
fn kubeadms_own_config_conf_starts_the_daemon_with_kube_proxys_ports_and_programs_services() {
    let mut t = Topology::up(2);
    t.serve_all();
    let (_api, kubeconfig) = cluster(&t);
    // kube-proxy's command line as kubeadm's DaemonSet writes it; only the kubeconfig path
    // differs (the file names /var/lib/kube-proxy/kubeconfig.conf, the ConfigMap's mount).
    t.start_daemon_with([
        std::ffi::OsString::from("--config"),
        kubeadm_config_conf().into(),
        "--hostname-override=node-a".into(),
        "--kubeconfig".into(),
        kubeconfig.into(),
    ]);
    // healthzBindAddress "" → 0.0.0.0:10256: reachable on the node's address from outside.
    let (status, answer) = get(&t, &t.client, "10.100.0.1:10256", "/healthz");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(body(&answer)["healthy"], true);
    // metricsBindAddress "" → 127.0.0.1:10249: served on loopback, not on the node's address.
    let (status, metrics) = get(&t, &t.node, "127.0.0.1:10249", "/metrics");
    assert_eq!(status, 200, "{metrics}");
    assert!(
        metrics.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds"),
        "{metrics}"
    );
    assert_eq!(get(&t, &t.client, "10.100.0.1:10249", "/metrics").0, 0);
    // The Service is programmed: the cluster IP reaches an endpoint, the load-balancer IP
    // (externalTrafficPolicy Local) the local one.
    let (backend, _) = t.tcp(&t.client, "10.96.0.20:80").expect("served");
    assert!(["b0", "b1"].contains(&backend.as_str()), "{backend}");
    assert_eq!(t.tcp(&t.client, "192.0.2.20:80").expect("served").0, "b0");
    // kube-proxy's defaults are in force: minSyncPeriod 0s in the file means 1s.
    let (_, configz) = get(&t, &t.node, "127.0.0.1:10249", "/configz");
    let c = &body(&configz)["kubeproxy.config.k8s.io"];
    assert_eq!(c["nftables"]["minSyncPeriod"], "1s", "{configz}");
    assert_eq!(c["nftables"]["syncPeriod"], "30s", "{configz}");
    assert_eq!(c["healthzBindAddress"], "0.0.0.0:10256", "{configz}");
    assert_eq!(c["metricsBindAddress"], "127.0.0.1:10249", "{configz}");
}

/// The value of the first sample of `/metrics` line starting with `prefix` (name and labels).
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn kube_proxys_metrics_have_upstream_names_labels_and_a_trigger_time_based_latency() {
    let (t, api, _) = setup();
    // Trigger times from before the daemon started are not observed (as kube-proxy): wait
    // until a trigger time 2 s in the past is after the start.
    std::thread::sleep(Duration::from_secs(4));
    let trigger = std::time::SystemTime::now() - Duration::from_secs(2);
    let stamp = humantime::format_rfc3339_seconds(trigger).to_string();
    let mut slice = shop_slice(&[(1, "node-b")]);
    slice["metadata"]["annotations"] =
        json!({"endpoints.kubernetes.io/last-change-trigger-time": stamp});
    api.apply(Kind::EndpointSlice, slice);
    let count = "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"} ";
    eventually("the trigger-time latency is observed", || {
        let (_, m) = get(&t, &t.node, "127.0.0.1:10249", "/metrics");
        sample(&m, count) == Some(1.0)
    });
    let (status, m) = get(&t, &t.node, "127.0.0.1:10249", "/metrics");
    assert_eq!(status, 200);
    // Measured from the annotation (2–3 s ago), not from the change's arrival (milliseconds),
    // in kube-proxy's buckets.
    let bucket = |le: &str| {
        sample(
            &m,
            &format!(
                "kubeproxy_network_programming_duration_seconds_bucket{{le=\"{le}\",ip_family=\"IPv4\"}} "
            ),
        )
    };
    assert_eq!(bucket("1.0"), Some(0.0), "{m}");
    assert_eq!(bucket("0.25"), Some(0.0), "{m}");
    assert_eq!(bucket("5.0"), Some(1.0), "{m}");
    assert_eq!(bucket("115.0"), Some(1.0), "{m}");
    // The Service now has endpoints, none on this node, and externalTrafficPolicy Local.
    assert_eq!(
        sample(
            &m,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"} "
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"} "
        ),
        Some(0.0),
        "{m}"
    );
    assert!(
        sample(&m, "kubeproxy_sync_proxy_rules_endpoint_changes_total ").is_some_and(|v| v >= 1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "kubeproxy_sync_proxy_rules_endpoint_changes_pending "),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "kubeproxy_sync_proxy_rules_service_changes_pending "),
        Some(0.0),
        "{m}"
    );
    assert!(
        m.contains("# TYPE kubeproxy_sync_proxy_rules_service_changes counter"),
        "{m}"
    );
    let queued = sample(
        &m,
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family=\"IPv4\"} ",
    )
    .expect("last queued timestamp");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    assert!(queued > now - 60.0 && queued <= now, "{queued} vs {now}");
    for name in [
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_start_time_seconds ",
        "process_open_fds ",
        "process_max_fds ",
    ] {
        assert!(sample(&m, name).is_some(), "{name} missing:\n{m}");
    }
    // A local endpoint again: nothing is without local endpoints.
    api.apply(Kind::EndpointSlice, shop_slice(&[(0, "node-a")]));
    eventually("no Service lacks local endpoints", || {
        let (_, m) = get(&t, &t.node, "127.0.0.1:10249", "/metrics");
        sample(
            &m,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"} ",
        ) == Some(0.0)
    });
}

#[test]
fn configz_and_flagz_show_the_effective_configuration_and_the_flags() {
    let (t, _api, _) = setup();
    let (status, answer) = get(&t, &t.node, "127.0.0.1:10249", "/configz");
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer.contains("Content-Type: application/json"),
        "{answer}"
    );
    let b = body(&answer);
    let c = &b["kubeproxy.config.k8s.io"];
    assert_eq!(c["kind"], "KubeProxyConfiguration", "{b}");
    assert_eq!(c["mode"], "nftables");
    assert_eq!(c["hostnameOverride"], "node-a");
    assert_eq!(c["clusterCIDR"], "10.244.0.0/16,fd00:244::/32");
    assert_eq!(c["nftables"]["minSyncPeriod"], "0s");
    assert_eq!(c["nftables"]["masqueradeBit"], 14);
    assert_eq!(c["healthzBindAddress"], "127.0.0.1:10256");
    assert_eq!(c["detectLocalMode"], "ClusterCIDR");
    let (status, flagz) = get(&t, &t.node, "127.0.0.1:10249", "/flagz");
    assert_eq!(status, 200, "{flagz}");
    assert!(flagz.contains("Content-Type: text/plain"), "{flagz}");
    assert!(flagz.contains("\r\n\r\nlb-proxy flags\n"), "{flagz}");
    for line in [
        "\nnode=node-a\n",
        "\nmin-sync-period=0\n",
        "\ncluster-cidr=10.244.0.0/16,fd00:244::/32\n",
        "\nfull-sync-period=1h\n",
    ] {
        assert!(flagz.contains(line), "{line:?} missing:\n{flagz}");
    }
}

/// Runs `lb-proxy daemon` in the node namespace with stderr captured, until a stderr line
/// contains `until` (or 30 s pass); returns the stderr lines. The process is killed after.
fn daemon_log(t: &Topology, args: &[&std::ffi::OsStr], until: &str) -> Vec<String> {
    let log = t.dir.join("daemon.log");
    let file = std::fs::File::create(&log).expect("log file");
    let child = t
        .ns_command(&t.node, &binary("lb-proxy"))
        .arg("daemon")
        .args(args)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .env("TERM", "xterm-256color")
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .spawn()
        .expect("spawn lb-proxy");
    let _guard = KillOnDrop(Some(child));
    Topology::eventually(Duration::from_secs(30), || {
        std::fs::read_to_string(&log).is_ok_and(|s| s.contains(until))
    });
    let text = std::fs::read_to_string(&log).expect("read the log");
    text.lines().map(str::to_string).collect()
}

#[test]
fn json_logs_are_one_object_per_line_with_a_start_up_summary_and_text_logs_have_no_colours_off_a_terminal()
 {
    let t = Topology::up(0);
    let (api, kubeconfig) = cluster(&t);
    let kc = kubeconfig.as_os_str();
    let common = [
        "--node".as_ref(),
        "node-a".as_ref(),
        "--cluster-cidr=10.244.0.0/16".as_ref(),
        "--kubeconfig".as_ref(),
        kc,
        "--healthz-bind-address=127.0.0.1:10256".as_ref(),
        "--metrics-bind-address=127.0.0.1:10249".as_ref(),
    ];
    let mut args = common.to_vec();
    args.push("--logging-format=json".as_ref());
    let lines = daemon_log(&t, &args, "full sync");
    let objects: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let summary = objects
        .iter()
        .find(|o| o["message"] == "lb-proxy starting")
        .unwrap_or_else(|| panic!("no start-up summary in {lines:#?}"));
    assert_eq!(summary["level"], "INFO");
    assert_eq!(summary["node"], "node-a");
    assert_eq!(summary["mode"], "nftables");
    assert_eq!(summary["cluster_cidrs"], "10.244.0.0/16");
    assert_eq!(summary["healthz"], "127.0.0.1:10256");
    assert_eq!(summary["metrics"], "127.0.0.1:10249");
    assert_eq!(summary["config"], "flags");
    assert!(
        summary["api_server"]
            .as_str()
            .is_some_and(|s| s.starts_with(&api.url())),
        "{summary}"
    );
    assert!(summary["version"].is_string(), "{summary}");
    assert!(
        objects.iter().any(|o| o["message"] == "full sync"),
        "{lines:#?}"
    );
    // Text: TERM says colour, but stderr is a file, so no escape codes.
    let lines = daemon_log(&t, &common, "full sync");
    assert!(
        lines.iter().any(|l| l.contains("lb-proxy starting")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().all(|l| !l.contains('\u{1b}')),
        "ANSI escape codes off a terminal: {lines:#?}"
    );
}

/// Runs `cmd` and returns its output if it exits within `limit`; otherwise kills it and
/// returns `None` (so a daemon that should have refused to start cannot hang the test).
fn exits_within(mut cmd: Command, limit: Duration) -> Option<std::process::Output> {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut guard = KillOnDrop(Some(child));
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if let Some(c) = guard.0.as_mut()
            && let Ok(Some(_)) = c.try_wait()
        {
            return guard.0.take().and_then(|c| c.wait_with_output().ok());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn the_daemon_refuses_to_start_next_to_kube_proxys_nftables_table_unless_told_to_take_over() {
    let mut t = Topology::up(2);
    t.serve_all();
    let (_api, kubeconfig) = cluster(&t);
    for family in ["ip", "ip6", "inet"] {
        lb_e2e::must(Command::new("ip").args([
            "netns",
            "exec",
            &t.node,
            "nft",
            "add",
            "table",
            family,
            "kube-proxy",
        ]));
        let mut cmd = t.ns_command(&t.node, &binary("lb-proxy"));
        cmd.args(["daemon", "--node", "node-a", "--kubeconfig"])
            .arg(&kubeconfig);
        let out = exits_within(cmd, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("lb-proxy kept running next to kube-proxy's {family} table"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started next to kube-proxy: {err}");
        assert!(
            err.contains(&format!("nftables table {family} kube-proxy")),
            "{err}"
        );
        assert!(err.contains("refusing to start"), "{err}");
        assert!(err.contains("--take-over"), "{err}");
        let tables = lb_e2e::must(
            Command::new("ip").args(["netns", "exec", &t.node, "nft", "list", "tables"]),
        );
        assert!(
            !tables.contains("lb-proxy"),
            "programmed before refusing: {tables}"
        );
        lb_e2e::must(Command::new("ip").args([
            "netns",
            "exec",
            &t.node,
            "nft",
            "delete",
            "table",
            family,
            "kube-proxy",
        ]));
    }
    lb_e2e::must(Command::new("ip").args([
        "netns",
        "exec",
        &t.node,
        "nft",
        "add",
        "table",
        "ip",
        "kube-proxy",
    ]));
    t.start_daemon(&kubeconfig, &["--take-over"]);
    assert_eq!(t.tcp(&t.client, "192.0.2.20:80").expect("served").0, "b0");
    let tables =
        lb_e2e::must(Command::new("ip").args(["netns", "exec", &t.node, "nft", "list", "tables"]));
    assert!(
        tables.contains("table ip kube-proxy"),
        "kube-proxy's table is left to `kube-proxy --cleanup`: {tables}"
    );
}

/// The DaemonSet in `deploy/lb-proxy.yaml`: its container's args and env, and its volumes'
/// mount paths and ConfigMap names.
fn daemonset() -> Value {
    let text = std::fs::read_to_string(lb_e2e::repo().join("deploy/lb-proxy.yaml"))
        .expect("deploy/lb-proxy.yaml");
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("valid YAML");
    docs.into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet")
}

#[test]
fn the_daemonsets_command_line_and_mounted_kubeadm_config_are_accepted_by_the_binary() {
    let t = Topology::up(0);
    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    // The image is the kustomization's variable.
    let kustomization: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(lb_e2e::repo().join("deploy/kustomization.yaml"))
            .expect("deploy/kustomization.yaml"),
    )
    .expect("valid YAML");
    assert_eq!(container["image"], kustomization["images"][0]["name"]);
    assert!(
        kustomization["resources"]
            .as_array()
            .is_some_and(|r| r.contains(&json!("lb-proxy.yaml")))
    );
    // Mounted ConfigMaps: kubeadm's kube-proxy ConfigMap holds config.conf.
    let mounts = container["volumeMounts"].as_array().expect("mounts");
    let volumes = pod["volumes"].as_array().expect("volumes");
    let mut rewrites = Vec::new();
    for m in mounts {
        let v = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .expect("the mount's volume");
        if v["configMap"]["name"] == "kube-proxy" {
            let dir = t.dir.join("kube-proxy");
            std::fs::create_dir_all(&dir).expect("mount dir");
            std::fs::copy(kubeadm_config_conf(), dir.join("config.conf")).expect("config.conf");
            rewrites.push((
                m["mountPath"].as_str().expect("path").to_string(),
                dir.display().to_string(),
            ));
        }
    }
    assert!(
        !rewrites.is_empty(),
        "kubeadm's kube-proxy ConfigMap is mounted"
    );
    // The args as the kubelet runs them: $(NODE_NAME) expanded, mount paths where the test
    // put the files.
    let mut args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| {
            let mut a = a
                .as_str()
                .expect("string arg")
                .replace("$(NODE_NAME)", "node-a");
            for (from, to) in &rewrites {
                a = a.replace(from.as_str(), to);
            }
            a
        })
        .collect();
    assert_eq!(args.first().map(String::as_str), Some("daemon"));
    let written = t.dir.join("effective.yaml");
    args.push(format!("--write-config-to={}", written.display()));
    let out = t
        .ns_command(&t.node, &binary("lb-proxy"))
        .args(&args)
        .output()
        .expect("run lb-proxy");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(&written).expect("written config"))
            .expect("valid YAML");
    assert_eq!(effective["hostnameOverride"], "node-a");
    assert_eq!(effective["clusterCIDR"], "10.244.0.0/16");
    assert_eq!(effective["mode"], "nftables");
    assert_eq!(effective["healthzBindAddress"], "0.0.0.0:10256");
    assert_eq!(
        effective["clientConnection"]["kubeconfig"],
        "/var/lib/kube-proxy/kubeconfig.conf"
    );
    // The take-over overlay adds exactly --take-over, which the binary accepts.
    let overlay =
        std::fs::read_to_string(lb_e2e::repo().join("deploy/take-over/kustomization.yaml"))
            .expect("take-over overlay");
    assert!(overlay.contains("value: --take-over"), "{overlay}");
    args.push("--take-over".into());
    let out = t
        .ns_command(&t.node, &binary("lb-proxy"))
        .args(&args)
        .output()
        .expect("run lb-proxy");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kube_proxys_flags_are_accepted_and_the_inapplicable_ones_warned_about() {
    let t = Topology::up(0);
    let written = t.dir.join("effective.yaml");
    let out = t
        .ns_command(&t.node, &binary("lb-proxy"))
        .args([
            "daemon",
            "--hostname-override=node-a",
            "--proxy-mode=nftables",
            "--v=4",
            "--logging-format=text",
            "--detect-local-mode=InterfaceNamePrefix",
            "--pod-interface-name-prefix=veth",
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=24h",
            "--conntrack-tcp-be-liberal",
            "--masquerade-all=true",
            "--iptables-masquerade-bit=13",
            "--iptables-min-sync-period=2s",
            "--oom-score-adj=-999",
            "--bind-address-hard-fail",
            "--master=http://127.0.0.1:6443",
            "--full-sync-period=1h",
            "--profiling",
            "--ipvs-scheduler=rr",
            "--feature-gates=NFTablesProxyMode=true",
            "--kube-api-qps=50",
        ])
        .arg(format!("--write-config-to={}", written.display()))
        .output()
        .expect("run lb-proxy");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for flag in [
        "--profiling=true",
        "--ipvs-scheduler=rr",
        "--feature-gates=",
        "--kube-api-qps=50",
    ] {
        assert!(
            err.lines()
                .any(|l| l.contains(flag) && l.contains("does not apply to lb-proxy")),
            "no warning for {flag}: {err}"
        );
    }
    let c: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(&written).expect("written")).expect("YAML");
    assert_eq!(c["nftables"]["masqueradeAll"], true);
    assert_eq!(c["nftables"]["masqueradeBit"], 13);
    assert_eq!(c["nftables"]["minSyncPeriod"], "2s");
    assert_eq!(c["detectLocalMode"], "InterfaceNamePrefix");
    assert_eq!(c["detectLocal"]["interfaceNamePrefix"], "veth");
    assert_eq!(c["conntrack"]["tcpEstablishedTimeout"], "24h0m0s");
    assert_eq!(c["conntrack"]["tcpBeLiberal"], true);
    assert_eq!(c["bindAddressHardFail"], true);
    assert_eq!(c["logging"]["verbosity"], 4);
    let out = t
        .ns_command(&t.node, &binary("lb-proxy"))
        .args(["daemon", "--node", "node-a", "--proxy-mode=ipvs"])
        .output()
        .expect("run lb-proxy");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--proxy-mode: \"ipvs\": lb-proxy only implements the nftables mode"),
        "{err}"
    );
}

#[test]
fn a_misspelt_configuration_field_is_refused_naming_it() {
    let t = Topology::up(0);
    let cfg = t.dir.join("config.conf");
    std::fs::write(
        &cfg,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nnftables:\n  minSyncPerod: 0s\n",
    )
    .expect("write config");
    let out = t
        .ns_command(&t.node, &binary("lb-proxy"))
        .args(["daemon", "--node", "node-a", "--config"])
        .arg(&cfg)
        .output()
        .expect("run lb-proxy");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("nftables.minSyncPerod: unknown field"),
        "{err}"
    );
}

#[test]
fn an_api_server_outage_is_logged_once_per_watch_naming_the_server_and_again_when_it_ends() {
    let t = Topology::up(0);
    let (api, kubeconfig) = cluster(&t);
    let log = t.dir.join("outage.log");
    let child = t
        .ns_command(&t.node, &binary("lb-proxy"))
        .args(["daemon", "--node", "node-a", "--logging-format=json"])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--healthz-bind-address=", "--metrics-bind-address="])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn lb-proxy");
    let _guard = KillOnDrop(Some(child));
    let lines = || -> Vec<Value> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let count =
        |lines: &[Value], message: &str| lines.iter().filter(|o| o["message"] == message).count();
    assert!(
        Topology::eventually(Duration::from_secs(30), || count(&lines(), "full sync")
            == 1),
        "no first sync: {:#?}",
        lines()
    );
    // Unreachable for long enough that every watch retries several times.
    api.pause();
    std::thread::sleep(Duration::from_secs(5));
    api.resume();
    // A watch is known to work again at its next event: change one object of each kind.
    let mut service = shop();
    service["metadata"]["labels"] = json!({"changed": "yes"});
    api.apply(Kind::Service, service);
    api.apply(Kind::EndpointSlice, shop_slice(&[(0, "node-a")]));
    let mut n = node(json!([]));
    n["metadata"]["labels"]["changed"] = json!("yes");
    api.apply(Kind::Node, n);
    assert!(
        Topology::eventually(Duration::from_secs(40), || count(
            &lines(),
            "watch recovered"
        ) == 3),
        "the watches did not all recover: {:#?}",
        lines()
    );
    let lines = lines();
    for kind in ["Service", "EndpointSlice", "Node"] {
        let failed: Vec<&Value> = lines
            .iter()
            .filter(|o| {
                o["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("watch failed"))
                    && o["kind"] == kind
            })
            .collect();
        assert_eq!(failed.len(), 1, "{kind}: {lines:#?}");
        assert_eq!(failed[0]["level"], "WARN");
        assert_eq!(failed[0]["api_server"], format!("{}/", api.url()), "{kind}");
        let recovered = lines
            .iter()
            .find(|o| o["message"] == "watch recovered" && o["kind"] == kind)
            .unwrap_or_else(|| panic!("{kind} did not recover: {lines:#?}"));
        assert!(
            recovered["retries"].as_u64().is_some_and(|r| r >= 1),
            "{recovered}"
        );
    }
}

#[test]
fn a_node_name_without_a_node_and_a_missing_cluster_cidr_are_warned_about() {
    let t = Topology::up(0);
    let (_api, kubeconfig) = cluster(&t);
    let kc = kubeconfig.as_os_str();
    let args = [
        "--hostname-override=ghost".as_ref(),
        "--kubeconfig".as_ref(),
        kc,
        "--healthz-bind-address=".as_ref(),
        "--metrics-bind-address=".as_ref(),
    ];
    let lines = daemon_log(&t, &args, "full sync");
    let warned = |needle: &str| {
        lines
            .iter()
            .any(|l| l.contains("WARN") && l.contains(needle))
    };
    assert!(warned("no Node named \"ghost\""), "{lines:#?}");
    assert!(warned("no cluster CIDR"), "{lines:#?}");
    // With the right name and a cluster CIDR, neither.
    let args = [
        "--hostname-override=node-a".as_ref(),
        "--cluster-cidr=10.244.0.0/16".as_ref(),
        "--kubeconfig".as_ref(),
        kc,
        "--healthz-bind-address=".as_ref(),
        "--metrics-bind-address=".as_ref(),
    ];
    let lines = daemon_log(&t, &args, "full sync");
    assert!(lines.iter().any(|l| l.contains("full sync")), "{lines:#?}");
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("no Node named") || l.contains("no cluster CIDR")),
        "{lines:#?}"
    );
}

#[test]
fn master_replaces_the_kubeconfigs_api_server_and_bind_address_hard_fail_exits_on_a_taken_port() {
    let (mut t, api, _) = setup();
    // A kubeconfig naming a server where nothing listens: --master must win.
    let wrong = t.dir.join("wrong-kubeconfig");
    std::fs::write(
        &wrong,
        api.kubeconfig().replace(&api.url(), "http://127.0.0.1:1"),
    )
    .expect("write kubeconfig");
    let master = format!("--master={}", api.url());
    // The first daemon (from setup) holds 127.0.0.1:10256 and :10249.
    let mut cmd = t.ns_command(&t.node, &binary("lb-proxy"));
    cmd.args(["daemon", "--node", "node-a", "--table", "second"])
        .arg("--kubeconfig")
        .arg(&wrong)
        .arg(&master)
        .args([
            "--healthz-bind-address=127.0.0.1:10256",
            "--metrics-bind-address=",
            "--bind-address-hard-fail",
        ]);
    let out = exits_within(cmd, Duration::from_secs(30)).expect("exits on the taken port");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("binding the health server to 127.0.0.1:10256 (bindAddressHardFail)"),
        "{err}"
    );
    assert!(
        err.contains(&format!("api_server={}/", api.url())),
        "the summary names --master's server: {err}"
    );
    // Without the hard failure, the same daemon syncs through --master (its own table).
    t.start_daemon_with([
        "--node",
        "node-a",
        "--table",
        "second",
        "--kubeconfig",
        wrong.to_str().expect("utf-8 path"),
        &master,
        "--healthz-bind-address=",
        "--metrics-bind-address=",
    ]);
    let tables =
        lb_e2e::must(Command::new("ip").args(["netns", "exec", &t.node, "nft", "list", "tables"]));
    assert!(tables.contains("table ip second"), "{tables}");
    // --init-only applies the privileged settings and exits.
    let out = t
        .ns_command(&t.node, &binary("lb-proxy"))
        .args(["daemon", "--node", "node-a", "--init-only"])
        .output()
        .expect("run lb-proxy");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
