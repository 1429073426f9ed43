//! The daemon's first lists against the API server emulator (real `kube` client, real rules in a
//! node namespace, real traffic): streaming lists (`sendInitialEvents`) when the server offers
//! them, paginated lists when it rejects or ignores them, and the same rules either way. The
//! emulator records which protocol each list used, so a test sees which path was taken.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use lb_e2e::apiserver::{ApiServer, Break, Kind, ListProtocol, Options, StreamingLists};
use lb_e2e::{Topology, binary, must};
use serde_json::{Value, json};

fn node() -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}})
}

fn service(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "t"},
        "spec": {"clusterIP": ip, "clusterIPs": [ip],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
}

/// An EndpointSlice of `svc` with backends `eps` (indexes of the topology's backends).
fn slice(svc: &str, eps: &[usize]) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|i| {
            json!({"addresses": [Topology::backend_ip(*i)], "nodeName": "node-a",
            "conditions": {"ready": true}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{svc}-abc"), "namespace": "t",
            "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints})
}

/// Three Services (web: b0–b2, api: b0–b1, db: b2) on a server answering streaming lists as
/// `mode` says; returns the topology, the server and its kubeconfig.
fn cluster(mode: StreamingLists) -> (Topology, ApiServer, std::path::PathBuf) {
    let mut t = Topology::up(3);
    t.serve_all();
    let options = Options {
        streaming_lists: mode,
        ..Options::default()
    };
    let api = ApiServer::start_with(t.bind_in(&t.node), options);
    api.apply(Kind::Node, node());
    for (name, ip, eps) in [
        ("web", "10.96.0.10", &[0, 1, 2][..]),
        ("api", "10.96.0.11", &[0, 1]),
        ("db", "10.96.0.12", &[2]),
    ] {
        api.apply(Kind::Service, service(name, ip));
        api.apply(Kind::EndpointSlice, slice(name, eps));
    }
    let kubeconfig = t.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("write kubeconfig");
    (t, api, kubeconfig)
}

fn backends(t: &Topology, target: &str, n: usize) -> Vec<String> {
    t.spread(&t.client, target, n, false).into_keys().collect()
}

/// Every Service serves from its backends.
fn all_serve(t: &Topology) {
    assert_eq!(backends(t, "10.96.0.10:80", 30), ["b0", "b1", "b2"]);
    assert_eq!(backends(t, "10.96.0.11:80", 20), ["b0", "b1"]);
    assert_eq!(backends(t, "10.96.0.12:80", 5), ["b2"]);
}

fn ruleset(t: &Topology) -> String {
    must(Command::new("ip").args(["netns", "exec", &t.node, "nft", "list", "ruleset"]))
}

/// The daemon's `lb_proxy_lists_total` samples, as `kind protocol count` lines, sorted.
fn lists_metric(t: &Topology) -> Vec<String> {
    let out = must(
        Command::new("ip")
            .args(["netns", "exec", &t.node])
            .arg(binary("lb-testsrv"))
            .args(["http", "127.0.0.1:10249", "/metrics"]),
    );
    let mut samples: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix("lb_proxy_lists_total{"))
        .map(|l| {
            l.replace(['"', '}', ','], " ")
                .replace("kind=", "")
                .replace("protocol=", "")
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    samples.sort();
    samples
}

/// The kinds listed with `protocol` among `lists`.
fn kinds(lists: &[(Kind, ListProtocol)], protocol: ListProtocol) -> BTreeSet<Kind> {
    lists
        .iter()
        .filter(|(_, p)| *p == protocol)
        .map(|(k, _)| *k)
        .collect()
}

/// Every kind's first list among `lists` used `protocol`, none the other, and the daemon's
/// `lb_proxy_lists_total` counted one list per kind under `label`.
fn every_kind_listed_by(
    t: &Topology,
    lists: &[(Kind, ListProtocol)],
    protocol: ListProtocol,
    label: &str,
) {
    let other = match protocol {
        ListProtocol::Streaming => ListProtocol::Paginated,
        ListProtocol::Paginated => ListProtocol::Streaming,
    };
    assert_eq!(
        kinds(lists, protocol),
        BTreeSet::from(Kind::ALL),
        "{lists:?}"
    );
    assert_eq!(kinds(lists, other), BTreeSet::new(), "{lists:?}");
    let expected: Vec<String> = ["EndpointSlice", "Node", "Service", "ServiceCIDR"]
        .iter()
        .map(|k| format!("{k} {label} 1"))
        .collect();
    assert_eq!(lists_metric(t), expected);
}

fn eventually(what: &str, f: impl FnMut() -> bool) {
    Topology::wait_until(what, Duration::from_secs(15), f);
}

#[test]
fn the_daemon_programs_the_same_rules_from_streaming_lists_and_from_paginated_lists() {
    let (mut t, api, kubeconfig) = cluster(StreamingLists::Offered);
    let streaming = t.start_daemon(&kubeconfig, &[]);
    let from_streaming = ruleset(&t);
    every_kind_listed_by(
        &t,
        &api.initial_lists(),
        ListProtocol::Streaming,
        "streaming",
    );
    t.stop(streaming);
    must(Command::new("ip").args(["netns", "exec", &t.node, "nft", "flush", "ruleset"]));

    let before = api.initial_lists().len();
    t.start_daemon(&kubeconfig, &["--feature-gates=WatchListClient=false"]);
    let from_pages = ruleset(&t);
    let lists = api.initial_lists().split_off(before);
    every_kind_listed_by(&t, &lists, ListProtocol::Paginated, "paginated");
    assert!(from_streaming.contains("10.96.0.12"), "{from_streaming}");
    assert_eq!(from_streaming, from_pages);
    all_serve(&t);
}

#[test]
fn the_daemon_falls_back_to_paginated_lists_for_good_when_the_server_rejects_streaming_lists() {
    let (mut t, api, kubeconfig) = cluster(StreamingLists::Rejected);
    t.start_daemon(&kubeconfig, &[]);
    all_serve(&t);
    let lists = api.initial_lists();
    assert_eq!(
        kinds(&lists, ListProtocol::Paginated),
        BTreeSet::from(Kind::ALL),
        "{lists:?}"
    );
    let tried = |api: &ApiServer| {
        api.requests()
            .iter()
            .filter(|r| r.contains("sendInitialEvents=true"))
            .count()
    };
    // One attempt per kind at most (a watcher started after another fell back asks none).
    let attempts = tried(&api);
    assert!((1..=Kind::ALL.len()).contains(&attempts), "{attempts}");

    // A re-list after 410 is paginated at once, without asking again.
    api.compact();
    api.expire_watches();
    api.apply(Kind::Service, service("new", "10.96.0.13"));
    api.apply(Kind::EndpointSlice, slice("new", &[1]));
    eventually("the new Service serves", || {
        t.tcp(&t.client, "10.96.0.13:80").is_ok_and(|r| r.0 == "b1")
    });
    assert_eq!(tried(&api), attempts, "no second attempt");
    assert_eq!(
        kinds(&api.initial_lists(), ListProtocol::Streaming),
        BTreeSet::new()
    );
}

#[test]
fn the_daemon_falls_back_to_paginated_lists_when_the_server_ignores_streaming_lists() {
    // The server sends the objects but never the end bookmark; the daemon gives up waiting
    // for it after ten seconds of silence.
    let (mut t, api, kubeconfig) = cluster(StreamingLists::Ignored);
    t.start_daemon(&kubeconfig, &[]);
    all_serve(&t);
    let lists = api.initial_lists();
    assert_eq!(
        kinds(&lists, ListProtocol::Paginated),
        BTreeSet::from(Kind::ALL),
        "{lists:?}"
    );
    // Deletions are seen (a watch stuck in its initial events would drop them).
    api.delete(Kind::Service, "t", "db");
    eventually("the deleted Service stops serving", || {
        t.tcp(&t.client, "10.96.0.12:80").is_err()
    });
}

#[test]
fn a_streaming_list_broken_by_a_dropped_connection_or_a_410_is_listed_again_by_streaming() {
    let (mut t, api, kubeconfig) = cluster(StreamingLists::Offered);
    api.break_next_streaming_list(Kind::EndpointSlice, 1, Break::Drop);
    t.start_daemon(&kubeconfig, &[]);
    all_serve(&t);
    let slices = |api: &ApiServer| {
        api.initial_lists()
            .into_iter()
            .filter(|(k, _)| *k == Kind::EndpointSlice)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        slices(&api),
        [(Kind::EndpointSlice, ListProtocol::Streaming); 2],
        "broken once, then listed again by streaming"
    );

    // Every watch expires; the Services' new streaming list ends with a 410 after one object.
    api.break_next_streaming_list(Kind::Service, 1, Break::Expire);
    api.delete(Kind::Service, "t", "db");
    api.compact();
    api.expire_watches();
    api.apply(Kind::Service, service("new", "10.96.0.13"));
    api.apply(Kind::EndpointSlice, slice("new", &[1]));
    eventually("the new Service serves", || {
        t.tcp(&t.client, "10.96.0.13:80").is_ok_and(|r| r.0 == "b1")
    });
    eventually(
        "the Service deleted during the outage stops serving",
        || t.tcp(&t.client, "10.96.0.12:80").is_err(),
    );
    let lists = api.initial_lists();
    let services = lists.iter().filter(|(k, _)| *k == Kind::Service).count();
    assert_eq!(
        services, 3,
        "first list, broken re-list, re-list: {lists:?}"
    );
    assert_eq!(
        kinds(&lists, ListProtocol::Paginated),
        BTreeSet::new(),
        "no fall-back: {lists:?}"
    );
}

#[test]
fn a_server_that_stops_offering_streaming_lists_is_listed_in_pages_at_the_next_relist() {
    // As during a downgrade, or behind a load balancer over API servers of two versions.
    let (mut t, api, kubeconfig) = cluster(StreamingLists::Offered);
    t.start_daemon(&kubeconfig, &[]);
    let first = api.initial_lists();
    assert_eq!(
        kinds(&first, ListProtocol::Streaming),
        BTreeSet::from(Kind::ALL)
    );
    api.set_streaming_lists(StreamingLists::Rejected);
    api.delete(Kind::Service, "t", "db");
    api.compact();
    api.expire_watches();
    api.apply(Kind::Service, service("new", "10.96.0.13"));
    api.apply(Kind::EndpointSlice, slice("new", &[1]));
    eventually("the new Service serves", || {
        t.tcp(&t.client, "10.96.0.13:80").is_ok_and(|r| r.0 == "b1")
    });
    eventually("the Service deleted meanwhile stops serving", || {
        t.tcp(&t.client, "10.96.0.12:80").is_err()
    });
    let relists = api.initial_lists().split_off(first.len());
    assert_eq!(
        kinds(&relists, ListProtocol::Paginated),
        BTreeSet::from(Kind::ALL),
        "{relists:?}"
    );
    assert_eq!(kinds(&relists, ListProtocol::Streaming), BTreeSet::new());
}
