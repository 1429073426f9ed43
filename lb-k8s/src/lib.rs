//! # lb-k8s: Kubernetes Services and EndpointSlices as lb-core's model, per node
//!
//! The Kubernetes edge of [`lb_core`], for anyone building a user-space proxy or load balancer
//! in Rust: `k8s-openapi` objects in, validated model values out (or an error naming the object
//! and field), EndpointSlices merged per Service, and a lookup from "a connection arrived for
//! this address, protocol and port" to the endpoints that may serve it on this node — the
//! decisions kube-proxy makes, without kube-proxy's dataplane.
//!
//! It depends on `lb-core` and `k8s-openapi` only: no `kube` client, no async runtime, no
//! netlink. Feed it objects from wherever you get them (a `kube` watcher, manifests on disk, a
//! test) with plain synchronous calls. Apache-2.0.
//!
//! ## The pipeline
//!
//! ```text
//! Service / EndpointSlice / Node (k8s-openapi)
//!     ──► convert (validate, filter)  ──► store (merge slices per Service)
//!     ──► Cluster::index() ──► ServiceIndex::lookup(addr, proto, port)
//!                                   └──► Lookup: service port, entry point, serving endpoints
//!                                              (lb_core::categorize, with reasons)
//! ```
//!
//! ## Where to start
//!
//! * [`Cluster`]: apply and delete objects as a watch delivers them (and replace them all on a
//!   re-list); [`Cluster::index`] freezes the state into a [`ServiceIndex`].
//! * [`ServiceIndex::lookup`]: cluster IPs, external IPs, load-balancer IPs and node ports.
//! * [`convert`]: the conversion functions on their own (kube-proxy's filtering: headless,
//!   `service-proxy-name`, ExternalName; a Node's load-balancer eligibility), and [`store`]:
//!   the merging store the `lb-proxy` daemon also uses, updated one [`StoreEvent`] at a time
//!   with kube-runtime's re-list semantics (`Init` … `InitDone` replaces a kind).
//! * `examples/tcp_proxy.rs`: a tiny TCP proxy on tokio serving manifests.
//!
//! ## Example
//!
//! ```
//! use k8s_openapi::api::core::v1::{Node, Service};
//! use k8s_openapi::api::discovery::v1::EndpointSlice;
//! use lb_core::Protocol;
//! use lb_k8s::{Cluster, Via, convert::Filter};
//! use serde_json::json;
//!
//! let service: Service = serde_json::from_value(json!({
//!     "metadata": {"namespace": "shop", "name": "web"},
//!     "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]},
//! }))?;
//! let slice: EndpointSlice = serde_json::from_value(json!({
//!     "metadata": {"namespace": "shop", "name": "web-1",
//!                  "labels": {"kubernetes.io/service-name": "web"}},
//!     "addressType": "IPv4",
//!     "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
//!     "endpoints": [
//!         {"addresses": ["10.244.1.5"], "nodeName": "node-a"},
//!         {"addresses": ["10.244.2.7"], "nodeName": "node-b", "conditions": {"ready": false}},
//!     ],
//! }))?;
//! let node: Node = serde_json::from_value(json!({"metadata": {"name": "node-a"}}))?;
//!
//! let mut cluster = Cluster::new(Filter::default());
//! cluster.apply_service(&service)?;
//! cluster.apply_endpoint_slice(&slice)?;
//! cluster.set_node(&node)?;
//! let index = cluster.index().expect("the node is known");
//!
//! let hit = index.lookup("10.96.0.10".parse()?, Protocol::Tcp, 80).expect("a Service port");
//! assert_eq!(hit.via(), Via::ClusterIp);
//! let serving: Vec<String> = hit.endpoints().iter().map(|e| e.addr().to_string()).collect();
//! assert_eq!(serving, ["10.244.1.5:8080"]);   // 10.244.2.7 is not ready
//! assert!(index.lookup("10.96.0.10".parse()?, Protocol::Udp, 80).is_none());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod cluster;
pub mod convert;
pub mod store;

pub use cluster::{Cluster, Frontend, Lookup, ServiceIndex, Via};
pub use convert::{ConvertError, Converted, Filter, NodeState, ServiceKey};
pub use store::{Event, Kind, StoreEvent};
