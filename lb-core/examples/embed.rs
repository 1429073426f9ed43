//! Embedding lb-core in a user-space load balancer: categorise a Service's endpoints for this
//! node, then pick an endpoint for each new connection, with ClientIP affinity and with Maglev
//! consistent hashing. Run with `cargo run -p lb-core --example embed`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use lb_core::affinity::{AffinityTable, NewConnection};
use lb_core::maglev::{DEFAULT_TABLE_SIZE, Maglev};
use lb_core::{
    Conditions, Endpoint, EndpointSet, Node, Protocol, ServicePort, ServiceType, TrafficPolicy,
    categorize, pick,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The Service and its endpoints, from plain values (no Kubernetes types needed).
    let web = ServicePort::builder("shop", "web", "http", Protocol::Tcp, 80)
        .cluster_ips(["10.96.0.10"])
        .service_type(ServiceType::LoadBalancer)
        .node_port(30080)
        .load_balancer_ips(["192.0.2.10"])
        .external_traffic_policy(TrafficPolicy::Local)
        .client_ip_affinity(Some(600))
        .build()?;
    let endpoints = vec![
        Endpoint::builder("10.0.1.5", 8080)
            .node_name("node-a")
            .zone("zone-a")
            .build()?,
        Endpoint::builder("10.0.1.6", 8080)
            .node_name("node-a")
            .zone("zone-a")
            .build()?,
        Endpoint::builder("10.0.2.7", 8080)
            .node_name("node-b")
            .zone("zone-b")
            .build()?,
        Endpoint::builder("10.0.2.8", 8080)
            .node_name("node-b")
            .conditions(Conditions::SERVING_TERMINATING)
            .build()?,
    ];
    let node = Node::new("node-a", Some("zone-a"))?;

    // Which endpoints may serve which traffic on this node, and why the others may not.
    let c = categorize(&web, &endpoints, &node);
    for set in [EndpointSet::Cluster, EndpointSet::Local] {
        let chosen: Vec<String> = c.iter(set).map(|e| e.addr().to_string()).collect();
        println!("{set:?} endpoints: {chosen:?}");
        for (i, why) in c.exclusions(set) {
            println!("  {} left out: {why}", endpoints[i]);
        }
    }

    // External clients (eTP Local) use the local set; a random u64 drives each choice.
    let local: Vec<SocketAddr> = c.local().map(Endpoint::addr).collect();
    let mut rng = 0x2545_f491_4f6c_dd1d_u64; // the embedder's RNG; xorshift here
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let first = pick::uniform(&local, next()).ok_or("no local endpoint")?;
    println!("uniform pick: {first}");

    // ClientIP affinity: the same client keeps its endpoint until 600 s pass without a new
    // connection from it.
    let table: AffinityTable<String, SocketAddr> = AffinityTable::new();
    let key = web.name().to_string();
    let timeout = web
        .session_affinity()
        .timeout()
        .ok_or("affinity configured above")?;
    let t0 = Instant::now();
    let client: IpAddr = "198.51.100.7".parse()?;
    let mut seen = BTreeMap::new();
    for second in 0..5 {
        let conn = NewConnection {
            service: &key,
            client,
            now: t0 + Duration::from_secs(second * 60),
            timeout,
            random: next(),
        };
        let p = table.pick(conn, &local).ok_or("no eligible endpoint")?;
        *seen.entry(p.endpoint).or_insert(0) += 1;
    }
    println!("one client, 5 connections over 4 minutes: {seen:?}");

    // Maglev: consistent hashing of flows onto the cluster set; removing one endpoint moves
    // only about 1/N of the flows.
    let cluster: Vec<String> = c.cluster().map(|e| e.addr().to_string()).collect();
    let maglev = Maglev::new(&cluster, DEFAULT_TABLE_SIZE)?;
    let flow_hash = 0xdead_beef_u64;
    let i = maglev.lookup(flow_hash).ok_or("empty table")?;
    println!("flow {flow_hash:#x} -> {}", cluster[i]);
    Ok(())
}
