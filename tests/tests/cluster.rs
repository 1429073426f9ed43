//! Driven by the cluster: `lb-proxy daemon` watches the API server emulator (real list/watch
//! protocol, real `kube` client) and programs a node namespace; real traffic shows it follows.

use std::time::Duration;

use lb_e2e::Topology;
use lb_e2e::apiserver::{ApiServer, Kind};
use serde_json::{Value, json};

fn node(zone: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a",
        "labels": {"topology.kubernetes.io/zone": zone}}})
}

fn service(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "t"},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
}

/// An EndpointSlice of `svc` with backends `eps` as (index, zone hint).
fn slice(svc: &str, eps: &[(usize, Option<&str>)]) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(i, zone)| {
            let mut e = json!({"addresses": [format!("10.244.1.1{i}")], "nodeName": "node-a",
                "conditions": {"ready": true}});
            if let Some(z) = zone {
                e["zone"] = json!(z);
                e["hints"] = json!({"forZones": [{"name": z}]});
            }
            e
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{svc}-abc"), "namespace": "t",
            "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints})
}

fn backends(t: &Topology, target: &str, n: usize) -> Vec<String> {
    t.spread(&t.client, target, n, false).into_keys().collect()
}

fn setup(extra: &[&str]) -> (Topology, ApiServer, usize) {
    let mut t = Topology::up(3);
    t.serve_all();
    let api = ApiServer::start(t.bind_in(&t.node));
    api.apply(Kind::Node, node("zone-a"));
    api.apply(Kind::Service, service("web", "10.96.0.10"));
    api.apply(Kind::EndpointSlice, slice("web", &[(0, None), (1, None)]));
    let kubeconfig = t.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("write kubeconfig");
    let proxy = t.start_daemon(&kubeconfig, extra);
    (t, api, proxy)
}

fn eventually(what: &str, f: impl FnMut() -> bool) {
    Topology::wait_until(what, Duration::from_secs(10), f);
}

#[test]
fn the_first_sync_programs_what_the_cluster_holds_and_a_new_service_works() {
    let (t, api, _) = setup(&[]);
    assert_eq!(backends(&t, "10.96.0.10:80", 30), ["b0", "b1"]);
    api.apply(Kind::Service, service("new", "10.96.0.11"));
    api.apply(Kind::EndpointSlice, slice("new", &[(2, None)]));
    eventually("the new Service serves", || {
        t.tcp(&t.client, "10.96.0.11:80").is_ok_and(|r| r.0 == "b2")
    });
}

#[test]
fn scaling_endpoints_up_and_down_is_followed() {
    let (t, api, _) = setup(&[]);
    api.apply(
        Kind::EndpointSlice,
        slice("web", &[(0, None), (1, None), (2, None)]),
    );
    eventually("three endpoints serve", || {
        backends(&t, "10.96.0.10:80", 30) == ["b0", "b1", "b2"]
    });
    api.apply(Kind::EndpointSlice, slice("web", &[(2, None)]));
    eventually("one endpoint serves", || {
        backends(&t, "10.96.0.10:80", 10) == ["b2"]
    });
}

#[test]
fn deleting_a_service_makes_its_address_stop_serving() {
    let (t, api, _) = setup(&[]);
    assert!(t.tcp(&t.client, "10.96.0.10:80").is_ok());
    api.delete(Kind::Service, "t", "web");
    eventually("the address no longer serves", || {
        t.tcp(&t.client, "10.96.0.10:80").is_err()
    });
}

#[test]
fn a_change_of_the_nodes_zone_changes_which_endpoints_it_uses() {
    let (t, api, _) = setup(&[]);
    api.apply(
        Kind::EndpointSlice,
        slice(
            "web",
            &[
                (0, Some("zone-a")),
                (1, Some("zone-b")),
                (2, Some("zone-b")),
            ],
        ),
    );
    eventually("zone-a hints apply", || {
        backends(&t, "10.96.0.10:80", 20) == ["b0"]
    });
    api.apply(Kind::Node, node("zone-b"));
    eventually("zone-b hints apply", || {
        backends(&t, "10.96.0.10:80", 30) == ["b1", "b2"]
    });
}

#[test]
fn a_relist_after_410_removes_what_disappeared_meanwhile() {
    let (t, api, _) = setup(&[]);
    api.apply(Kind::Service, service("gone", "10.96.0.12"));
    api.apply(Kind::EndpointSlice, slice("gone", &[(2, None)]));
    eventually("gone serves", || t.tcp(&t.client, "10.96.0.12:80").is_ok());
    // The API server goes away; meanwhile the Service is deleted and history compacted, so
    // the watch cannot resume: the re-list must notice the deletion.
    api.pause();
    api.delete(Kind::Service, "t", "gone");
    api.compact();
    api.resume();
    eventually("its rules are removed", || {
        t.tcp(&t.client, "10.96.0.12:80").is_err()
    });
    assert!(
        t.tcp(&t.client, "10.96.0.10:80").is_ok(),
        "other Services keep working"
    );
    // Paginated or streaming, whichever the server offers.
    let lists = api.initial_lists();
    assert!(
        lists.iter().filter(|(k, _)| *k == Kind::Service).count() >= 2,
        "a re-list happened: {lists:?}"
    );
}

#[test]
fn an_unreachable_api_server_leaves_traffic_flowing_and_a_restart_converges() {
    let (t, api, _) = setup(&[]);
    api.pause();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        backends(&t, "10.96.0.10:80", 20),
        ["b0", "b1"],
        "the dataplane stays as it was"
    );
    api.apply(Kind::EndpointSlice, slice("web", &[(2, None)]));
    api.resume();
    eventually("the change made during the outage is applied", || {
        backends(&t, "10.96.0.10:80", 10) == ["b2"]
    });
}

#[test]
fn restarting_the_proxy_replaces_its_rules_without_a_gap() {
    let (mut t, api, proxy) = setup(&[]);
    let kubeconfig = t.dir.join("kubeconfig");
    // Traffic keeps flowing while the proxy is down (rules stay in the kernel) and while the
    // new one replaces them.
    t.stop(proxy);
    assert_eq!(backends(&t, "10.96.0.10:80", 20), ["b0", "b1"]);
    api.apply(Kind::EndpointSlice, slice("web", &[(1, None), (2, None)]));
    let client = t.client.clone();
    let prober = std::thread::spawn(move || {
        let mut failures = 0;
        for _ in 0..60 {
            if lb_e2e::tcp_from(&client, "10.96.0.10:80").is_err() {
                failures += 1;
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        failures
    });
    t.start_daemon(&kubeconfig, &[]);
    assert_eq!(
        prober.join().expect("prober"),
        0,
        "no connection failed across the restart"
    );
    eventually("the new state is programmed", || {
        backends(&t, "10.96.0.10:80", 30) == ["b1", "b2"]
    });
}

#[test]
fn the_daemon_drops_unallocated_cluster_ips_of_the_watched_service_cidrs_and_follows_them() {
    // Issue 9, point 8: the daemon watches networking.k8s.io/v1 ServiceCIDRs.
    let (mut t, api, _) = setup(&[]);
    // Upstream of the node, 10.96.0.99 answers `up`: a packet that leaves the node is seen.
    let up = t.node.replace("-node", "-up");
    for args in [
        &["-n", &up, "addr", "add", "10.96.0.99/32", "dev", "lo"][..],
        &[
            "-n",
            &up,
            "route",
            "add",
            "10.100.0.0/24",
            "via",
            "10.200.0.1",
        ][..],
    ] {
        lb_e2e::must(std::process::Command::new("ip").args(args));
    }
    let mut cmd = t.ns_command(&up, &lb_e2e::binary("lb-testsrv"));
    cmd.args(["serve", "up", "10.96.0.99:80"]);
    t.spawn_ready(cmd, "READY");
    assert_eq!(
        t.tcp(&t.client, "10.96.0.99:80")
            .expect("no ServiceCIDR yet")
            .0,
        "up"
    );

    api.apply(
        Kind::ServiceCidr,
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
            "metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["10.96.0.0/16"]}}),
    );
    eventually("the unallocated cluster IP is dropped", || {
        t.tcp(&t.client, "10.96.0.99:80")
            .is_err_and(|e| e.contains("timed out"))
    });
    assert_eq!(backends(&t, "10.96.0.10:80", 20), ["b0", "b1"]);

    api.delete(Kind::ServiceCidr, "", "kubernetes");
    eventually("the ServiceCIDR's removal is followed", || {
        t.tcp(&t.client, "10.96.0.99:80").is_ok_and(|r| r.0 == "up")
    });
}

/// `(size, elements)` of a set of the IPv4 table, as the kernel lists it.
fn set_size_and_len(t: &Topology, set: &str) -> (Option<u64>, usize) {
    let out = lb_e2e::must(std::process::Command::new("ip").args([
        "netns", "exec", &t.node, "nft", "-j", "list", "set", "ip", "lb-proxy", set,
    ]));
    let v: Value = serde_json::from_str(&out).expect("nft -j output");
    let s = v["nftables"]
        .as_array()
        .and_then(|a| a.iter().find_map(|o| o.get("set")))
        .unwrap_or_else(|| panic!("no set {set} in {out}"));
    (s["size"].as_u64(), s["elem"].as_array().map_or(0, Vec::len))
}

/// A full sync sizes each set for twice its elements, so the kernel allocates the set's hash
/// table once instead of rehashing it while a large batch fills it. Services that outgrow a
/// set are refused by the kernel as a whole (`ENFILE`), and the refusal becomes a full sync
/// that re-creates the sets larger: with the real kernel, every Service ends up programmed,
/// the one programmed before answers, and so do the new ones.
#[test]
fn services_that_outgrow_a_set_are_programmed_by_a_full_sync_that_enlarges_it() {
    let (mut t, api, _) = setup(&[]);
    assert_eq!(set_size_and_len(&t, "cluster-ips"), (Some(1024), 1));
    const MORE: usize = 1_100;
    let ip = |i: usize| format!("10.97.{}.{}", i / 256, i % 256);
    for i in 0..MORE {
        let name = format!("extra-{i}");
        api.apply(Kind::Service, service(&name, &ip(i)));
        api.apply(Kind::EndpointSlice, slice(&name, &[(2, None)]));
    }
    Topology::wait_until(
        "every Service is programmed",
        Duration::from_secs(60),
        || set_size_and_len(&t, "cluster-ips").1 == MORE + 1,
    );
    // 1,101 cluster IPs outgrew 1,024: the full sync gave the set room for twice them.
    assert_eq!(set_size_and_len(&t, "cluster-ips"), (Some(4096), MORE + 1));
    // In the sync the kernel refused, not after a failure and a retry.
    let lines = t.sync_lines();
    assert!(
        lines.iter().any(|l| l.contains("a set is full")),
        "{lines:#?}"
    );
    let metrics = lb_e2e::must(t.ns_command(&t.node, &lb_e2e::binary("lb-testsrv")).args([
        "http",
        "127.0.0.1:10249",
        "/metrics",
    ]));
    assert!(
        metrics
            .lines()
            .any(|l| l == "kubeproxy_sync_proxy_rules_nftables_sync_failures_total 0"),
        "{metrics}"
    );
    assert_eq!(backends(&t, "10.96.0.10:80", 20), ["b0", "b1"]);
    for i in [0, MORE / 2, MORE - 1] {
        let target = format!("{}:80", ip(i));
        assert_eq!(
            t.tcp(&t.client, &target).map(|r| r.0),
            Ok("b2".to_string()),
            "{target}"
        );
    }
}
