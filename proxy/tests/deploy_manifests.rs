//! The deployment manifests in `deploy/*.yaml` are what `docs/replacing-kube-proxy.md` says they
//! are: every document parses into its Kubernetes type with no field Kubernetes would ignore,
//! and the DaemonSet, RBAC and configuration hold the properties a node's service proxy needs
//! (host network, node name from the downward API, probes on kube-proxy's health port, list and
//! watch only, kube-proxy's command line on kubeadm's `kube-proxy` ConfigMap, a configuration
//! the daemon accepts, the image as the kustomization's variable). The binary itself runs the
//! DaemonSet's command line in `tests/tests/operations.rs`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Where kubeadm's DaemonSet mounts the `kube-proxy` ConfigMap, and the file it reads.
const CONFIG_DIR: &str = "/var/lib/kube-proxy";
const CONFIG_KEY: &str = "config.conf";
/// The ConfigMap kubeadm creates (`deploy/kube-proxy-configmap.example.yaml` for others).
const CONFIG_MAP: &str = "kube-proxy";
/// kube-proxy's health port, which probes and cloud load balancers use.
const HEALTHZ_PORT: i32 = 10256;

/// Every object in `deploy/*.yaml`, by kind.
#[derive(Debug, Default)]
struct Manifests {
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    kustomizations: Vec<Value>,
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_files() -> Vec<PathBuf> {
    let dir = deploy_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("a readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML files in {}", dir.display());
    files
}

/// Converts `doc` into `T`, then checks that `T` serialises back to the same document: the
/// generated types skip fields they do not know, so a misspelt or misplaced field would
/// otherwise pass here and be silently dropped by the API server.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value, origin: &str) -> T {
    let object: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{origin}: not a valid object of its kind: {e}"));
    let back = serde_json::to_value(&object).expect("k8s-openapi types serialise to JSON");
    if let Some(path) = first_difference(doc, &back, String::new()) {
        panic!(
            "{origin}: field {path} is not part of the Kubernetes type (misspelt or misplaced?)"
        );
    }
    object
}

/// The path of the first place where `a` and `b` differ, if any.
fn first_difference(a: &Value, b: &Value, path: String) -> Option<String> {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter().find_map(|k| match (a.get(k), b.get(k)) {
                (Some(x), Some(y)) => first_difference(x, y, format!("{path}.{k}")),
                _ => Some(format!("{path}.{k}")),
            })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(if path.is_empty() { ".".into() } else { path }),
    }
}

fn load() -> Manifests {
    let mut m = Manifests::default();
    for file in yaml_files() {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", file.display()));
        for (i, doc) in docs.iter().enumerate() {
            if doc.is_null() {
                continue; // an empty document, e.g. after a leading `---`
            }
            let api_version = doc["apiVersion"].as_str().unwrap_or_default();
            let kind = doc["kind"].as_str().unwrap_or_default();
            let origin = format!("{} document {} ({kind})", file.display(), i + 1);
            match (api_version, kind) {
                ("v1", "ServiceAccount") => m.service_accounts.push(typed(doc, &origin)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    m.cluster_roles.push(typed(doc, &origin))
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    m.cluster_role_bindings.push(typed(doc, &origin))
                }
                ("v1", "ConfigMap") => m.config_maps.push(typed(doc, &origin)),
                ("apps/v1", "DaemonSet") => m.daemon_sets.push(typed(doc, &origin)),
                ("kustomize.config.k8s.io/v1beta1", "Kustomization") => {
                    m.kustomizations.push(doc.clone())
                }
                _ => panic!("{origin}: unexpected apiVersion {api_version:?} kind {kind:?}"),
            }
        }
    }
    m
}

fn only<'a, T>(items: &'a [T], what: &str) -> &'a T {
    assert_eq!(items.len(), 1, "expected exactly one {what}");
    &items[0]
}

impl Manifests {
    fn daemon_set(&self) -> &DaemonSet {
        only(&self.daemon_sets, "DaemonSet")
    }

    fn pod(&self) -> &PodSpec {
        self.daemon_set()
            .spec
            .template
            .spec
            .as_ref()
            .expect("the DaemonSet has a pod template spec")
    }

    fn container(&self) -> &Container {
        only(&self.pod().containers, "container in the DaemonSet's pod")
    }

    /// The text of `config.conf` in the example `kube-proxy` ConfigMap.
    fn config_text(&self) -> &str {
        only(&self.config_maps, "ConfigMap")
            .data
            .as_ref()
            .and_then(|d| d.get(CONFIG_KEY))
            .unwrap_or_else(|| panic!("the ConfigMap has no {CONFIG_KEY}"))
    }
}

fn strings(v: &Option<Vec<String>>) -> Vec<&str> {
    v.iter().flatten().map(String::as_str).collect()
}

#[test]
fn every_document_in_deploy_is_a_known_kind_with_only_fields_kubernetes_knows() {
    let m = load();
    assert_eq!(m.service_accounts.len(), 1, "one ServiceAccount");
    assert_eq!(m.cluster_roles.len(), 1, "one ClusterRole");
    assert_eq!(m.cluster_role_bindings.len(), 1, "one ClusterRoleBinding");
    assert_eq!(m.config_maps.len(), 1, "one (example) ConfigMap");
    assert_eq!(m.daemon_sets.len(), 1, "one DaemonSet");
    assert_eq!(m.kustomizations.len(), 1, "one Kustomization");
    let namespaced = [
        (
            "ServiceAccount",
            &m.service_accounts[0].metadata,
            "lb-proxy",
        ),
        ("ConfigMap", &m.config_maps[0].metadata, CONFIG_MAP),
        ("DaemonSet", &m.daemon_sets[0].metadata, "lb-proxy"),
    ];
    for (kind, meta, name) in namespaced {
        assert_eq!(meta.namespace.as_deref(), Some("kube-system"), "{kind}");
        assert_eq!(meta.name.as_deref(), Some(name), "{kind}");
    }
}

#[test]
fn the_image_is_the_kustomizations_variable_and_nothing_is_a_placeholder() {
    let m = load();
    let k = only(&m.kustomizations, "Kustomization");
    let image = m.container().image.as_deref().expect("an image");
    let entry = k["images"]
        .as_array()
        .and_then(|i| i.iter().find(|e| e["name"] == image))
        .unwrap_or_else(|| panic!("no images: entry for {image:?} in {k}"));
    assert!(entry["newTag"].is_string(), "{entry}");
    assert_eq!(k["namespace"], "kube-system");
    assert!(
        k["resources"]
            .as_array()
            .is_some_and(|r| r.contains(&Value::from("lb-proxy.yaml"))),
        "{k}"
    );
    let text = std::fs::read_to_string(deploy_dir().join("lb-proxy.yaml")).expect("manifest");
    for placeholder in ["ghcr.io/example", ".invalid", "EDIT", "placeholder"] {
        assert!(
            !text.contains(placeholder),
            "deploy/lb-proxy.yaml contains {placeholder:?}"
        );
    }
}

#[test]
fn the_daemonset_runs_on_the_host_network_of_every_node() {
    let m = load();
    let pod = m.pod();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
        }),
        "a toleration with operator Exists and no key or effect tolerates every taint"
    );
    let strategy = m
        .daemon_set()
        .spec
        .update_strategy
        .as_ref()
        .expect("an update strategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.as_ref()),
        Some(&IntOrString::Int(1))
    );
}

#[test]
fn the_daemonset_resolves_names_without_cluster_dns_it_has_yet_to_program() {
    let m = load();
    assert_eq!(m.pod().dns_policy.as_deref(), Some("Default"));
}

#[test]
fn the_node_name_comes_from_the_downward_api() {
    let m = load();
    let env = m.container().env.as_deref().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME is set");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME comes from a field reference");
    assert_eq!(field.field_path, "spec.nodeName");
}

#[test]
fn the_api_server_is_reached_directly_not_through_the_kubernetes_service() {
    let m = load();
    // No in-cluster override in the DaemonSet: the kubeconfig of the mounted ConfigMap names
    // the API server (kubeadm's controlPlaneEndpoint), with the pod's own token.
    let env = m.container().env.as_deref().unwrap_or_default();
    assert!(
        !env.iter()
            .any(|e| e.name.starts_with("KUBERNETES_SERVICE_")),
        "no placeholder API server address"
    );
    let config: Value = serde_saphyr::from_str(m.config_text()).expect("config.conf is YAML");
    assert_eq!(
        config["clientConnection"]["kubeconfig"],
        format!("{CONFIG_DIR}/kubeconfig.conf")
    );
    let kubeconfig: Value = serde_saphyr::from_str(
        only(&m.config_maps, "ConfigMap")
            .data
            .as_ref()
            .and_then(|d| d.get("kubeconfig.conf"))
            .expect("kubeconfig.conf"),
    )
    .expect("kubeconfig.conf is YAML");
    let cluster = &kubeconfig["clusters"][0]["cluster"];
    let server = cluster["server"].as_str().expect("a server");
    assert!(server.starts_with("https://"), "{server}");
    assert!(
        !server.contains("kubernetes.default") && !server.contains("10.96.0.1"),
        "{server}"
    );
    assert_eq!(
        kubeconfig["users"][0]["user"]["tokenFile"],
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    );
    assert_eq!(
        cluster["certificate-authority"],
        "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    );
}

#[test]
fn liveness_probes_livez_and_readiness_probes_healthz_on_port_10256() {
    let m = load();
    let c = m.container();
    for (probe, path) in [
        (c.liveness_probe.as_ref(), "/livez"),
        (c.readiness_probe.as_ref(), "/healthz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("an HTTP GET probe on {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::Int(HEALTHZ_PORT), "{path}");
    }
}

#[test]
fn the_daemon_runs_kube_proxys_command_line_on_the_config_map_mounted_where_kubeadm_mounts_it() {
    let m = load();
    let c = m.container();
    assert_eq!(
        strings(&c.args),
        [
            "daemon",
            &format!("--config={CONFIG_DIR}/{CONFIG_KEY}"),
            "--hostname-override=$(NODE_NAME)"
        ]
    );
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|v| v.mount_path == CONFIG_DIR)
        .expect("a volume mounted at /var/lib/kube-proxy");
    assert_eq!(mount.read_only, Some(true));
    let volume = m
        .pod()
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the mounted volume is declared");
    let source = volume.config_map.as_ref().expect("a ConfigMap volume");
    assert_eq!(source.name, CONFIG_MAP);
    let config_map = only(&m.config_maps, "ConfigMap");
    assert_eq!(Some(&source.name), config_map.metadata.name.as_ref());
    let modules = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|v| v.mount_path == "/lib/modules")
        .expect("/lib/modules is mounted");
    assert_eq!(modules.read_only, Some(true));
}

#[test]
fn the_container_holds_net_admin_and_no_other_privilege() {
    let m = load();
    let sc = m
        .container()
        .security_context
        .as_ref()
        .expect("a security context");
    assert_ne!(sc.privileged, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(strings(&caps.add), ["NET_ADMIN"]);
    assert_eq!(strings(&caps.drop), ["ALL"]);
}

#[test]
fn the_daemonset_runs_as_the_service_account_the_binding_names() {
    let m = load();
    let account = only(&m.service_accounts, "ServiceAccount");
    let account_name = account.metadata.name.as_deref().expect("a name");
    let binding = only(&m.cluster_role_bindings, "ClusterRoleBinding");
    let role = only(&m.cluster_roles, "ClusterRole");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        binding.role_ref.api_group.as_deref(),
        Some("rbac.authorization.k8s.io")
    );
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    let subject = only(subjects, "subject in the ClusterRoleBinding");
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(subject.name, account_name);
    assert_eq!(subject.namespace, account.metadata.namespace);
    assert_eq!(m.pod().service_account_name.as_deref(), Some(account_name));
    assert_eq!(
        m.daemon_set().metadata.namespace,
        account.metadata.namespace
    );
}

#[test]
fn the_cluster_role_grants_only_list_and_watch_on_services_endpointslices_nodes_and_servicecidrs() {
    let m = load();
    let role = only(&m.cluster_roles, "ClusterRole");
    assert!(role.aggregation_rule.is_none(), "no aggregation");
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(
            rule.resource_names.is_none(),
            "resourceNames would not restrict a list"
        );
        assert!(rule.non_resource_urls.is_none(), "no non-resource URLs");
        for group in strings(&rule.api_groups) {
            for resource in strings(&rule.resources) {
                for verb in &rule.verbs {
                    granted.insert((group, resource, verb.as_str()));
                }
            }
        }
    }
    let wanted: BTreeSet<_> = [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
        ("networking.k8s.io", "servicecidrs"),
    ]
    .into_iter()
    .flat_map(|(g, r)| [(g, r, "list"), (g, r, "watch")])
    .collect();
    assert_eq!(granted, wanted);
}

#[test]
fn the_config_map_holds_a_kube_proxy_configuration_in_nftables_mode() {
    let m = load();
    let config: Value = serde_saphyr::from_str(m.config_text()).expect("config.conf is YAML");
    assert_eq!(
        config["apiVersion"].as_str(),
        Some("kubeproxy.config.k8s.io/v1alpha1")
    );
    assert_eq!(config["kind"].as_str(), Some("KubeProxyConfiguration"));
    assert_eq!(config["mode"].as_str(), Some("nftables"));
}

#[test]
fn the_daemon_accepts_the_configuration_and_serves_health_where_the_probes_look() {
    use lb_proxy::config::{KubeProxyConfiguration, Overrides, resolve};
    let m = load();
    // The example ConfigMap's and kubeadm's own config.conf, strictly decoded.
    let kubeadm = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/kubeadm-config.conf"),
    )
    .expect("kubeadm's config.conf");
    for (origin, text) in [("the example", m.config_text()), ("kubeadm's", &kubeadm)] {
        let file = KubeProxyConfiguration::parse(text)
            .unwrap_or_else(|e| panic!("{origin} config.conf: {e}"));
        // The DaemonSet gives the node name through --hostname-override=$(NODE_NAME).
        let flags = Overrides {
            node: Some("node-a".into()),
            ..Overrides::default()
        };
        let settings = resolve(Some(&file), &flags).expect("the daemon accepts the configuration");
        let healthz = settings.healthz_bind.expect("health endpoints enabled");
        assert_eq!(i32::from(healthz.port()), HEALTHZ_PORT, "{origin}");
        assert!(healthz.ip().is_unspecified(), "kubelet probes the node IP");
        assert!(
            !settings.cluster_cidrs.is_empty(),
            "{origin}: clusterCIDR is set, so traffic from outside the pod network is masqueraded"
        );
    }
}

#[test]
fn the_configuration_sets_no_conntrack_sysctls_because_the_container_is_unprivileged() {
    use lb_proxy::config::KubeProxyConfiguration;
    let m = load();
    let file = KubeProxyConfiguration::parse(m.config_text())
        .expect("config.conf is a KubeProxyConfiguration");
    let ct = file.conntrack.unwrap_or_default();
    for (field, v) in [("maxPerCore", ct.max_per_core), ("min", ct.min)] {
        assert!(
            v.unwrap_or(0) == 0,
            "conntrack.{field} would write /proc/sys"
        );
    }
    for (field, v) in [
        ("tcpEstablishedTimeout", &ct.tcp_established_timeout),
        ("tcpCloseWaitTimeout", &ct.tcp_close_wait_timeout),
        ("udpTimeout", &ct.udp_timeout),
        ("udpStreamTimeout", &ct.udp_stream_timeout),
    ] {
        let zero = v.as_deref().is_none_or(|v| {
            lb_proxy::config::parse_go_duration(field, v).is_ok_and(|d| d.is_zero())
        });
        assert!(zero, "conntrack.{field} would write /proc/sys");
    }
}
