//! Shared fixtures for the benches: synthetic clusters of any size.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use lb_core::{Endpoint, Node, Protocol, ServicePort};
use lb_proxy::store::{ServiceEntry, Snapshot};

pub mod cluster;

/// The `i`-th address counting from `base`.
pub fn nth(base: Ipv4Addr, i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + i)
}

/// Service port `i` of a synthetic cluster: ClusterIP `10.96.0.0 + i`, TCP port 80, with
/// `endpoints` ready endpoints `10.128.0.0 + i * endpoints + j`, port 8080, spread over 100
/// nodes. `generation` shifts endpoint addresses so a changed endpoint can be produced.
pub fn service_entry(i: u32, endpoints: u32, generation: u32) -> ServiceEntry {
    let port = ServicePort::builder("bench", &format!("svc-{i}"), "http", Protocol::Tcp, 80)
        .cluster_ips([nth(Ipv4Addr::new(10, 96, 0, 0), i).to_string()])
        .build()
        .expect("synthetic service is valid");
    let endpoints = (0..endpoints)
        .map(|j| {
            let ip = nth(
                Ipv4Addr::new(10, 128, 0, 0),
                i * endpoints + j + generation * 7_000_000,
            );
            Endpoint::builder(ip.to_string(), 8080)
                .node_name(&format!("node-{}", (i + j) % 100))
                .build()
                .expect("synthetic endpoint is valid")
        })
        .collect();
    ServiceEntry { port, endpoints }
}

/// A snapshot of `services` service ports with `endpoints` endpoints each, seen from `node-0`.
pub fn snapshot(services: u32, endpoints: u32) -> Snapshot {
    let mut map = BTreeMap::new();
    for i in 0..services {
        let e = service_entry(i, endpoints, 0);
        map.insert(e.port.name().clone(), e);
    }
    Snapshot {
        node: Node::new("node-0", Some("zone-a")).expect("valid node"),
        services: map,
    }
}

/// The same synthetic cluster as a [`lb_proxy::store::Store`] (Services and EndpointSlices),
/// for benches that go through the sync path.
pub fn store(services: u32, endpoints: u32) -> lb_proxy::store::Store {
    let mut store = lb_proxy::store::Store::new();
    store.set_node(Node::new("node-0", Some("zone-a")).expect("valid node"));
    for i in 0..services {
        let e = service_entry(i, endpoints, 0);
        store.apply_service(service_key(i), Some(vec![e.port]));
        store.apply_slice(slice_key(i), Some(slice(i, endpoints, 0)));
    }
    store.take_changes();
    store
}

/// Key of synthetic Service `i`.
pub fn service_key(i: u32) -> lb_proxy::convert::ServiceKey {
    lb_proxy::convert::ServiceKey {
        namespace: "bench".into(),
        name: format!("svc-{i}"),
    }
}

/// Key of the EndpointSlice of synthetic Service `i`.
pub fn slice_key(i: u32) -> (String, String) {
    ("bench".into(), format!("svc-{i}-abcde"))
}

/// The EndpointSlice of synthetic Service `i`; `changed` replaces its last endpoint with a
/// new address (a different one for each value).
pub fn slice(i: u32, endpoints: u32, changed: u32) -> lb_proxy::convert::Slice {
    let e = service_entry(i, endpoints, 0);
    let mut eps: Vec<Endpoint> = e.endpoints.clone();
    if let (true, Some(last)) = (changed > 0, eps.last_mut()) {
        let ip = nth(Ipv4Addr::new(10, 200, 0, 0), changed + i * 16).to_string();
        *last = Endpoint::builder(&ip, 1)
            .node_name("node-1")
            .build()
            .expect("valid endpoint");
    }
    lb_proxy::convert::Slice {
        service: service_key(i),
        family: lb_core::IpFamily::V4,
        ports: vec![lb_proxy::convert::SlicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: std::num::NonZeroU16::new(8080).expect("non-zero"),
        }],
        endpoints: eps,
    }
}
