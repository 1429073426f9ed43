//! A synthetic cluster as Kubernetes objects (JSON values), the shape the issue measures: N
//! Services × M endpoints, 5 % of them NodePort with `externalTrafficPolicy: Local`, 10 % with
//! ClientIP affinity, one EndpointSlice each, endpoints spread over 100 nodes (`node-0` … ),
//! plus the manifest files a user would feed `lb-proxy run -f`: multi-document YAML, a
//! `kubectl get -o json` `List`, and the same `List` as YAML.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use serde_json::{Value, json};

use crate::nth;

/// The node the measured proxy runs as.
pub const NODE: &str = "node-0";

/// Service `i` (namespace `bench`, name `svc-i`, ClusterIP `10.96.0.0 + i`, TCP 80).
pub fn service(i: u32) -> Value {
    let mut spec = json!({
        "clusterIP": nth(Ipv4Addr::new(10, 96, 0, 0), i).to_string(),
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
    });
    if i.is_multiple_of(20) {
        spec["type"] = json!("NodePort");
        spec["externalTrafficPolicy"] = json!("Local");
        spec["ports"][0]["nodePort"] = json!(30000 + (i / 20) % 2768);
    }
    if i % 10 == 1 {
        spec["sessionAffinity"] = json!("ClientIP");
        spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 10800}});
    }
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench",
            "resourceVersion": "1", "uid": format!("00000000-0000-0000-0000-{i:012}")},
        "spec": spec})
}

/// The EndpointSlice of Service `i` with `m` ready endpoints `10.128.0.0 + i·m + j`;
/// `generation` > 0 replaces the last endpoint's address (a one-endpoint change).
pub fn endpoint_slice(i: u32, m: u32, generation: u32) -> Value {
    let endpoints: Vec<Value> = (0..m)
        .map(|j| {
            let ip = if generation > 0 && j + 1 == m {
                nth(Ipv4Addr::new(10, 64, 0, 0), generation)
            } else {
                nth(Ipv4Addr::new(10, 128, 0, 0), i * m + j)
            };
            json!({"addresses": [ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": format!("node-{}", (i + j) % 100),
                "zone": format!("zone-{}", (i + j) % 3)})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "bench",
            "resourceVersion": "1",
            "labels": {"kubernetes.io/service-name": format!("svc-{i}"),
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints})
}

/// This proxy's Node.
pub fn node() -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "zone-0"}}})
}

/// Every object of the cluster: the Node, then each Service followed by its slice.
pub fn objects(n: u32, m: u32) -> impl Iterator<Item = Value> {
    std::iter::once(node()).chain((0..n).flat_map(move |i| [service(i), endpoint_slice(i, m, 0)]))
}

/// The cluster as a `kubectl get -o json` `List`.
pub fn json_list(n: u32, m: u32) -> String {
    let list = json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
        "items": objects(n, m).collect::<Vec<_>>()});
    serde_json::to_string_pretty(&list).expect("a JSON value serialises")
}

/// The cluster as one YAML `List`.
pub fn yaml_list(n: u32, m: u32) -> String {
    let list = json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
        "items": objects(n, m).collect::<Vec<_>>()});
    yaml(&list)
}

/// The objects `from..to` of [`objects`] as a multi-document YAML stream.
pub fn yaml_stream(objects: impl Iterator<Item = Value>) -> String {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&yaml(&o));
    }
    out
}

/// Block-style YAML for a JSON value, as `kubectl get -o yaml` prints it (strings are quoted
/// only where plain style would change their meaning; here: always when not alphanumeric).
pub fn yaml(v: &Value) -> String {
    let mut out = String::new();
    emit(&mut out, v, 0);
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s)
            if !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-./_".contains(c))
                && s.parse::<f64>().is_err()
                && !["true", "false", "null", "yes", "no", "on", "off"].contains(&s.as_str()) =>
        {
            s.clone()
        }
        other => other.to_string(),
    }
}

fn emit(out: &mut String, v: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match v {
                    Value::Object(c) if !c.is_empty() => {
                        let _ = writeln!(out, "{pad}{k}:");
                        emit(out, v, indent + 2);
                    }
                    Value::Array(a) if !a.is_empty() => {
                        let _ = writeln!(out, "{pad}{k}:");
                        emit(out, v, indent);
                    }
                    Value::Object(_) => {
                        let _ = writeln!(out, "{pad}{k}: {{}}");
                    }
                    Value::Array(_) => {
                        let _ = writeln!(out, "{pad}{k}: []");
                    }
                    _ => {
                        let _ = writeln!(out, "{pad}{k}: {}", scalar(v));
                    }
                }
            }
        }
        Value::Array(a) => {
            for item in a {
                match item {
                    Value::Object(m) if !m.is_empty() => {
                        // The first key on the dash line, the rest indented under it.
                        let mut inner = String::new();
                        emit(&mut inner, item, indent + 2);
                        let rest = &inner[indent + 2..];
                        let _ = write!(out, "{pad}- {rest}");
                    }
                    _ => {
                        let _ = writeln!(out, "{pad}- {}", scalar(item));
                    }
                }
            }
        }
        _ => {
            let _ = writeln!(out, "{pad}{}", scalar(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_of_the_cluster_reads_back_as_the_same_values() {
        for v in objects(30, 3) {
            let text = yaml(&v);
            let back: Value = serde_saphyr::from_str(&text).expect("valid YAML");
            assert_eq!(back, v, "{text}");
        }
        let stream = yaml_stream(objects(2, 2));
        assert_eq!(stream.matches("---\n").count(), 5);
    }
}
