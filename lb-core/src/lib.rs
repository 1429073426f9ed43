//! # lb-core: Kubernetes Service endpoint selection, exactly as kube-proxy does it
//!
//! A small, pure library: data and decisions only. No I/O, no clock, no random number
//! generator: time (`now`) and randomness (a `u64`) are arguments, so every decision is a
//! deterministic function you can test. `lb-proxy` compiles these decisions into nftables;
//! user-space load balancers call them per connection.
//!
//! ## The pipeline
//!
//! ```text
//! plain values ──► model (validated) ──► categorize(port, endpoints, node) ──► sets + reasons
//!                                                          │
//!             traffic::classify(port, destination, source) ──► which set serves a connection,
//!                                                          │   masquerade, reject or drop
//!                         pick::uniform / affinity::AffinityTable / maglev::Maglev ◄┘
//! ```
//!
//! ## Where to start
//!
//! * [`model`]: [`ServicePort`], [`Endpoint`], [`Node`], built with validating builders; an
//!   invalid value is an error naming the field.
//! * [`categorize()`](categorize::categorize): which endpoints serve cluster-wide and node-local traffic on a node
//!   (readiness, terminating fallback, traffic policies, topology hints), and a readable
//!   reason for every endpoint left out — kube-proxy's `CategorizeEndpoints`, restated.
//! * [`traffic`]: the traffic class of a connection to a service port (cluster IP, external
//!   IP, load-balancer IP or node port, from a pod, the node or elsewhere): which endpoint set
//!   serves it, whether it is masqueraded, and reject vs drop when that set is empty.
//! * [`pick`]: uniform choice from a caller-supplied random value.
//! * [`affinity`]: ClientIP session affinity on a concurrent table, with kube-proxy's timeout
//!   semantics, never returning an expired or ineligible endpoint.
//! * [`maglev`]: Maglev consistent hashing for minimal disruption when endpoints change.
//!
//! ## Example
//!
//! ```
//! use lb_core::{categorize, Endpoint, Node, Protocol, ServicePort, pick};
//!
//! let svc = ServicePort::builder("default", "web", "http", Protocol::Tcp, 80)
//!     .cluster_ips(["10.96.0.10"])
//!     .build()?;
//! let endpoints = [
//!     Endpoint::builder("10.0.0.1", 8080).build()?,
//!     Endpoint::builder("10.0.0.2", 8080).ready(false).build()?,
//! ];
//! let node = Node::new("node-a", None)?;
//! let c = categorize(&svc, &endpoints, &node);
//! let usable: Vec<_> = c.cluster().collect();
//! let chosen = pick::uniform(&usable, 0x1234_5678_9abc_def0).expect("one is ready");
//! assert_eq!(chosen.addr().to_string(), "10.0.0.1:8080");
//! # Ok::<(), lb_core::ModelError>(())
//! ```
#![deny(missing_docs)]

pub mod affinity;
pub mod categorize;
pub mod maglev;
pub mod model;
pub mod pick;
pub mod traffic;

pub use categorize::{
    Categorized, EndpointSet, Exclusion, Topology, TopologyMode, TopologyReason, categorize,
};
pub use model::{
    Conditions, Endpoint, EndpointBuilder, IpFamily, IpInput, ModelError, Node, Protocol,
    ServicePort, ServicePortBuilder, ServicePortName, ServiceType, SessionAffinity,
    TrafficDistribution, TrafficPolicy,
};
