//! Reading cluster dumps of real size (issues 10 and 13): a 50k-Service `List` as JSON and as
//! YAML, and a 5,000-document stream, all read whole, with the throughput printed. Debug
//! builds read 5,000 Services instead of 50,000 (the parsers are ~20× slower unoptimised) and
//! say so; `scripts/test-all` (and so CI) also runs
//! `cargo test --release -p lb-proxy --test manifests_scale`, which reads 50,000 (add
//! `-- --nocapture` to see MB/s).

use std::time::Instant;

use lb_proxy::manifests::Objects;
use serde_json::{Value, json};

fn service(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "scale",
            "labels": {"app": format!("svc-{i}")}, "resourceVersion": "12345", "uid": format!("0000-{i}")},
        "spec": {"type": "ClusterIP", "clusterIP": format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256),
            "clusterIPs": [format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256)],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
            "selector": {"app": format!("svc-{i}")}},
        "status": {"loadBalancer": {}}})
}

fn slice(i: usize) -> Value {
    let endpoints: Vec<Value> = (0..10)
        .map(|j| json!({"addresses": [format!("10.{}.{}.{}", 128 + i / 6000, (i / 25) % 240, (i % 25) * 10 + j)],
            "conditions": {"ready": true, "serving": true, "terminating": false},
            "nodeName": format!("node-{}", j % 3), "zone": "zone-a",
            "targetRef": {"kind": "Pod", "name": format!("svc-{i}-pod-{j}"), "namespace": "scale"}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "scale",
            "labels": {"kubernetes.io/service-name": format!("svc-{i}"), "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints})
}

fn list(n: usize) -> Value {
    let mut items = Vec::with_capacity(2 * n);
    for i in 0..n {
        items.push(service(i));
        items.push(slice(i));
    }
    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items})
}

fn read(name: &str, text: &str) -> Objects {
    let started = Instant::now();
    let mut o = Objects::default();
    let mut errors = Vec::new();
    o.add_text(name, text, &mut errors);
    let took = started.elapsed();
    assert!(
        errors.is_empty(),
        "{name}: {:?}",
        &errors[..errors.len().min(3)]
    );
    eprintln!(
        "{name}: {:.1} MB in {took:.2?}: {:.0} MB/s",
        text.len() as f64 / 1e6,
        text.len() as f64 / 1e6 / took.as_secs_f64()
    );
    o
}

fn count() -> usize {
    if cfg!(debug_assertions) {
        eprintln!("debug build: 5,000 Services; the release run reads 50,000");
        5_000
    } else {
        50_000
    }
}

#[test]
fn a_50k_service_list_reads_whole_as_json_and_as_yaml() {
    let n = count();
    let value = list(n);
    let json_text = serde_json::to_string_pretty(&value).expect("JSON");
    let o = read("list.json", &json_text);
    assert_eq!((o.services.len(), o.endpoint_slices.len()), (n, n));
    let yaml_text = serde_saphyr::to_string(&value).expect("YAML");
    drop(value);
    let o = read("list.yaml", &yaml_text);
    assert_eq!((o.services.len(), o.endpoint_slices.len()), (n, n));
}

#[test]
fn a_5000_document_stream_reads_whole() {
    let mut text = String::new();
    for i in 0..2_500 {
        for doc in [service(i), slice(i)] {
            text.push_str("---\n");
            text.push_str(&serde_saphyr::to_string(&doc).expect("YAML"));
        }
    }
    let o = read("stream.yaml", &text);
    assert_eq!((o.services.len(), o.endpoint_slices.len()), (2_500, 2_500));
}
