//! # lb-k8s: Kubernetes objects into lb-core's model
//!
//! placeholder
#![deny(missing_docs)]

pub mod convert;
pub mod store;
