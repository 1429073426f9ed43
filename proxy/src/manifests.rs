//! Reading Kubernetes objects from YAML (or JSON) files, in the shapes `kubectl get -o yaml`
//! prints: single objects, multi-document streams and `List`s. Used by the no-cluster mode.
//!
//! Objects of other kinds are ignored; a document that does not parse as its kind is reported
//! with its kind, name and the parser's message, and the rest are still read.

use std::path::Path;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use serde_json::Value;

use crate::convert::{self, ConvertError, Converted, Filter};
use crate::store::Store;

/// The objects found in a set of manifests.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    /// Services.
    pub services: Vec<Service>,
    /// EndpointSlices.
    pub endpoint_slices: Vec<EndpointSlice>,
    /// Nodes.
    pub nodes: Vec<Node>,
    /// ServiceCIDRs (`networking.k8s.io/v1`).
    pub service_cidrs: Vec<ServiceCIDR>,
}

/// A problem with one document or object; reading goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read or is not YAML.
    #[error("{file}: {reason}")]
    File {
        /// The file.
        file: String,
        /// What went wrong.
        reason: String,
    },
    /// A document did not match its kind's schema.
    #[error("{file}: {kind} {name}: {reason}")]
    Object {
        /// The file.
        file: String,
        /// Its `kind`.
        kind: String,
        /// Its `metadata.namespace/name`.
        name: String,
        /// The parser's message.
        reason: String,
    },
    /// An object was invalid for the proxy.
    #[error("{file}: {source}")]
    Invalid {
        /// The file.
        file: String,
        /// What was invalid.
        source: ConvertError,
    },
}

impl Objects {
    /// Reads every file (or every `.yaml`, `.yml` and `.json` file in a directory, sorted).
    pub fn read_paths(paths: &[impl AsRef<Path>]) -> (Objects, Vec<ManifestError>) {
        let mut objects = Objects::default();
        let mut errors = Vec::new();
        for p in paths {
            let p = p.as_ref();
            let files = if p.is_dir() {
                match std::fs::read_dir(p) {
                    Ok(rd) => {
                        let mut v: Vec<_> = rd
                            .filter_map(Result::ok)
                            .map(|e| e.path())
                            .filter(|f| {
                                matches!(
                                    f.extension().and_then(|e| e.to_str()),
                                    Some("yaml" | "yml" | "json")
                                )
                            })
                            .collect();
                        v.sort();
                        v
                    }
                    Err(e) => {
                        errors.push(ManifestError::File {
                            file: p.display().to_string(),
                            reason: e.to_string(),
                        });
                        continue;
                    }
                }
            } else {
                vec![p.to_path_buf()]
            };
            for f in files {
                let name = f.display().to_string();
                match std::fs::read_to_string(&f) {
                    Ok(text) => objects.add_text(&name, &text, &mut errors),
                    Err(e) => errors.push(ManifestError::File {
                        file: name,
                        reason: e.to_string(),
                    }),
                }
            }
        }
        (objects, errors)
    }

    /// Parses one multi-document YAML (or JSON) text named `file`.
    pub fn add_text(&mut self, file: &str, text: &str, errors: &mut Vec<ManifestError>) {
        let docs: Vec<Value> = match serde_saphyr::from_multiple(text) {
            Ok(d) => d,
            Err(e) => {
                errors.push(ManifestError::File {
                    file: file.into(),
                    reason: e.to_string(),
                });
                return;
            }
        };
        for doc in docs {
            self.add_value(file, doc, errors);
        }
    }

    fn add_value(&mut self, file: &str, doc: Value, errors: &mut Vec<ManifestError>) {
        if doc.is_null() {
            return;
        }
        let kind = doc
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if kind == "List" || kind.ends_with("List") {
            if let Some(Value::Array(items)) = doc.get("items") {
                for item in items.clone() {
                    self.add_value(file, item, errors);
                }
            }
            return;
        }
        let name = {
            let m = doc.get("metadata");
            let ns = m.and_then(|m| m.get("namespace")).and_then(Value::as_str);
            let n = m
                .and_then(|m| m.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("<unnamed>");
            ns.map_or_else(|| n.to_string(), |ns| format!("{ns}/{n}"))
        };
        let bad = |reason: String| ManifestError::Object {
            file: file.into(),
            kind: kind.clone(),
            name: name.clone(),
            reason,
        };
        match kind.as_str() {
            "Service" => match serde_json::from_value(doc) {
                Ok(s) => self.services.push(s),
                Err(e) => errors.push(bad(e.to_string())),
            },
            "EndpointSlice" => match serde_json::from_value::<EndpointSlice>(doc) {
                Ok(mut s) => {
                    // The API server defaults a port's protocol to TCP; files are not defaulted.
                    for p in s.ports.iter_mut().flatten() {
                        p.protocol.get_or_insert_with(|| "TCP".into());
                    }
                    self.endpoint_slices.push(s)
                }
                Err(e) => errors.push(bad(e.to_string())),
            },
            "Node" => match serde_json::from_value(doc) {
                Ok(n) => self.nodes.push(n),
                Err(e) => errors.push(bad(e.to_string())),
            },
            "ServiceCIDR" => match serde_json::from_value(doc) {
                Ok(c) => self.service_cidrs.push(c),
                Err(e) => errors.push(bad(e.to_string())),
            },
            _ => {}
        }
    }

    /// The CIDRs of every ServiceCIDR object (sorted, without duplicates); an invalid one is
    /// reported through `invalid` and left out.
    pub fn service_cidrs(&self, invalid: &mut dyn FnMut(ConvertError)) -> Vec<ipnet::IpNet> {
        let mut all = std::collections::BTreeSet::new();
        for c in &self.service_cidrs {
            match convert::service_cidr(c) {
                Ok(cidrs) => all.extend(cidrs),
                Err(e) => invalid(e),
            }
        }
        all.into_iter().collect()
    }

    /// Converts the objects into a store for node `node_name` (or the only Node given, when
    /// `None`). Invalid objects are reported and left out; the rest are loaded.
    pub fn into_store(
        self,
        node_name: Option<&str>,
        filter: &Filter,
    ) -> (Store, Vec<ConvertError>, Vec<String>) {
        let mut store = Store::new();
        let (errors, skipped) = self.replace_in(&mut store, node_name, filter);
        (store, errors, skipped)
    }

    /// Replaces everything in `store` with these objects (as a re-list would), so the store
    /// records exactly which Services changed. Returns the invalid objects and the skipped
    /// ones (with the reason).
    pub fn replace_in(
        self,
        store: &mut Store,
        node_name: Option<&str>,
        filter: &Filter,
    ) -> (Vec<ConvertError>, Vec<String>) {
        let mut errors = Vec::new();
        let mut skipped = Vec::new();
        let mut services = Vec::new();
        for s in &self.services {
            match convert::service(s, filter) {
                Ok(Converted::Accepted(ports)) => {
                    if let Some(p) = ports.first() {
                        let key = convert::ServiceKey {
                            namespace: p.name().namespace.to_string(),
                            name: p.name().name.to_string(),
                        };
                        services.push((key, ports));
                    }
                }
                Ok(Converted::Skipped(why)) => skipped.push(format!(
                    "Service {}/{}: {why}",
                    s.metadata.namespace.as_deref().unwrap_or("default"),
                    s.metadata.name.as_deref().unwrap_or("")
                )),
                Err(e) => errors.push(e),
            }
        }
        store.replace_services(services);
        let mut slices = Vec::new();
        for s in &self.endpoint_slices {
            let key = (
                s.metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                s.metadata.name.clone().unwrap_or_default(),
            );
            match convert::endpoint_slice(s, filter) {
                Ok((Converted::Accepted(slice), errs)) => {
                    errors.extend(errs);
                    slices.push((key, slice));
                }
                Ok((Converted::Skipped(why), _)) => {
                    skipped.push(format!("EndpointSlice {}/{}: {why}", key.0, key.1))
                }
                Err(e) => errors.push(e),
            }
        }
        store.replace_slices(slices);
        let node = match node_name {
            Some(n) => self
                .nodes
                .iter()
                .find(|k| k.metadata.name.as_deref() == Some(n)),
            None if self.nodes.len() == 1 => self.nodes.first(),
            None => None,
        };
        match (node, node_name) {
            (Some(k), _) => match convert::node(k) {
                Ok(n) => store.set_node(n),
                Err(e) => errors.push(e),
            },
            (None, Some(n)) => {
                // A node without a Node object: no zone label, so no topology filtering.
                if let Ok(n) = lb_core::Node::new(n, None) {
                    store.set_node(n);
                }
            }
            (None, None) => {}
        }
        (errors, skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_cidrs_are_read_from_the_manifests_and_a_bad_one_is_reported_by_field() {
        // Issue 9, point 8.
        let yaml = "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: kubernetes\nspec:\n  cidrs: [10.96.0.0/16, \"fd00:96::/108\"]\n---\napiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: extra\nspec:\n  cidrs: [10.97.0.1/16]\n---\napiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: broken\nspec:\n  cidrs: [10.98.0.0/40]\n";
        let mut objects = Objects::default();
        let mut errors = Vec::new();
        objects.add_text("test.yaml", yaml, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let mut invalid = Vec::new();
        let cidrs: Vec<String> = objects
            .service_cidrs(&mut |e| invalid.push(e.to_string()))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(cidrs, ["10.96.0.0/16", "10.97.0.0/16", "fd00:96::/108"]);
        assert_eq!(
            invalid,
            ["ServiceCIDR /broken: field spec.cidrs[0]: \"10.98.0.0/40\" is not a CIDR"]
        );
    }

    #[test]
    fn a_slice_port_without_a_protocol_means_tcp_as_the_api_server_defaults_it() {
        // Issue 9, point 12.
        let yaml = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: t\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - name: http\n    port: 80\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: t\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nports:\n- name: http\n  port: 8080\nendpoints:\n- addresses: [\"10.244.1.10\"]\n";
        let mut objects = Objects::default();
        let mut errors = Vec::new();
        objects.add_text("test.yaml", yaml, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let (store, errors, _) = objects.into_store(Some("node-a"), &Filter::default());
        assert!(errors.is_empty(), "{errors:?}");
        let snap = store.snapshot().expect("node known");
        let endpoints: Vec<String> = snap
            .services
            .values()
            .flat_map(|e| e.endpoints.iter().map(|e| e.addr().to_string()))
            .collect();
        assert_eq!(endpoints, ["10.244.1.10:8080"]);
    }
}
