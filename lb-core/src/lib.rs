//! # lb-core: Kubernetes Service endpoint selection, exactly as kube-proxy does it
//!
//! (Crate tour is written below the module list once the API settles.)
#![deny(missing_docs)]

pub mod affinity;
pub mod categorize;
pub mod maglev;
pub mod model;
pub mod pick;

pub use categorize::{
    Categorized, EndpointSet, Exclusion, Topology, TopologyMode, TopologyReason, categorize,
};
pub use model::{
    Conditions, Endpoint, EndpointBuilder, IpFamily, ModelError, Node, Protocol, ServicePort,
    ServicePortBuilder, ServicePortName, ServiceType, SessionAffinity, TrafficDistribution,
    TrafficPolicy,
};
