//! Network programming latency harness: loads N Services (default 10,000, two endpoints each)
//! into the API server emulator, runs `lb-proxy daemon` in a node namespace, then makes one
//! endpoint change at a time and reports the daemon's own measurement — from the change's
//! arrival to the kernel's acknowledgement — as percentiles.
//!
//! `lb-latency [SERVICES] [CHANGES] [MIN_SYNC_PERIOD]`, as root; see `scripts/latency-bench`.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use lb_e2e::Topology;
use lb_e2e::apiserver::{ApiServer, Kind};
use serde_json::json;

fn slice(i: usize, generation: usize) -> serde_json::Value {
    let a = format!("10.{}.{}.{}", 128 + i / 65536, (i / 256) % 256, i % 256);
    let b = format!(
        "10.{}.{}.{}",
        160 + (i + generation) / 65536 % 32,
        ((i + generation) / 256) % 256,
        (i + generation) % 256
    );
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-abc"), "namespace": "bench",
            "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [a], "nodeName": "node-b", "conditions": {"ready": true}},
            {"addresses": [b], "nodeName": "node-c", "conditions": {"ready": true}}]})
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let services: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let changes: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200);
    let min_sync = args.get(2).cloned().unwrap_or_else(|| "0".into());
    let t = Topology::up(0);
    let api = ApiServer::start(t.bind_in(&t.node));
    api.apply(
        Kind::Node,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}),
    );
    let started = Instant::now();
    for i in 0..services {
        let ip = format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256);
        api.apply(
            Kind::Service,
            json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
        );
        api.apply(Kind::EndpointSlice, slice(i, 0));
    }
    println!(
        "loaded {services} Services into the emulator in {:?}",
        started.elapsed()
    );
    let kubeconfig = t.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("write kubeconfig");
    let mut cmd = t.ns_command(&t.node, &lb_e2e::binary("lb-proxy"));
    cmd.args([
        "daemon",
        "--node",
        "node-a",
        "--cluster-cidr",
        "10.128.0.0/9",
        "--min-sync-period",
        &min_sync,
    ])
    .arg("--kubeconfig")
    .arg(&kubeconfig)
    .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
    .env("RUST_LOG", "warn,lb_proxy::reconcile=debug")
    .env("NO_COLOR", "1")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start lb-proxy daemon");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = Instant::now();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("first sync");
        if line.contains("full sync") {
            println!("first full sync after {:?}: {line}", first.elapsed());
            break;
        }
    }
    while rx.try_recv().is_ok() {}
    let mut latencies = Vec::new();
    let spacing = Duration::from_millis(if min_sync == "0" { 20 } else { 350 });
    for c in 0..changes {
        let i = (c * 7919) % services;
        api.apply(Kind::EndpointSlice, slice(i, c + 1));
        let deadline = Instant::now() + Duration::from_secs(10);
        // Take the latency lines this change produced (one per change; several when coalesced).
        while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if let Some(ms) = line
                .split("latency_ms=")
                .nth(1)
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
            {
                latencies.push(ms);
                break;
            }
        }
        std::thread::sleep(spacing);
    }
    let _ = child.kill();
    let _ = child.wait();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "network programming latency, one endpoint change, {services} Services, minSyncPeriod {min_sync}: {} samples, p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
}
