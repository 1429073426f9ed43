//! Prometheus metrics, with kube-proxy's names, labels and buckets where they have a
//! counterpart (`pkg/proxy/metrics` upstream), the standard `process_*` metrics, and ours
//! (`lb_proxy_*`) as extras. `docs/metrics.md` is the reference.

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::sync::{ServicePortTraffic, SyncReport};

/// Label naming an object kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KindLabel {
    /// `Service`, `EndpointSlice` or `Node`.
    pub kind: &'static str,
}

/// Labels of a completed list: the kind, and how it was listed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ListLabel {
    /// `Service`, `EndpointSlice`, `Node` or `ServiceCIDR`.
    pub kind: &'static str,
    /// `streaming` (one watch with `sendInitialEvents`) or `paginated` (LIST pages).
    pub protocol: &'static str,
}

/// Label naming the kind of an ignored object (any kind: unknown ones too).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct IgnoredLabel {
    /// The object's `kind`.
    pub kind: String,
}

/// Label with an IP family, as kube-proxy's per-family metrics carry it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FamilyLabel {
    /// `IPv4` or `IPv6`.
    pub ip_family: &'static str,
}

impl FamilyLabel {
    /// The label of `family`.
    pub fn of(family: lb_core::IpFamily) -> Self {
        Self {
            ip_family: match family {
                lb_core::IpFamily::V4 => "IPv4",
                lb_core::IpFamily::V6 => "IPv6",
            },
        }
    }

    /// Both families.
    pub fn both() -> [Self; 2] {
        [
            Self::of(lb_core::IpFamily::V4),
            Self::of(lb_core::IpFamily::V6),
        ]
    }
}

/// Labels of `kubeproxy_sync_proxy_rules_no_local_endpoints_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct NoLocalLabels {
    /// `IPv4` or `IPv6`.
    pub ip_family: &'static str,
    /// `internal` (internalTrafficPolicy Local) or `external` (externalTrafficPolicy Local).
    pub traffic_policy: &'static str,
}

/// kube-proxy's buckets of `kubeproxy_network_programming_duration_seconds`: 0, 0.25 s,
/// 0.5 s, every second to 59 s, every 5 s to 115 s, every 30 s to 5 min.
pub fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.0, 0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

/// Every metric the daemon exports.
#[derive(Debug)]
pub struct Metrics {
    /// `kubeproxy_network_programming_duration_seconds{ip_family}`: from the
    /// `endpoints.kubernetes.io/last-change-trigger-time` of a changed EndpointSlice to the
    /// kernel's acknowledgement of its rules.
    pub network_programming_duration: Family<FamilyLabel, Histogram>,
    /// `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family}`.
    pub last_queued_timestamp: Family<FamilyLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// `kubeproxy_sync_proxy_rules_endpoint_changes_total`.
    pub endpoint_changes: Counter,
    /// `kubeproxy_sync_proxy_rules_service_changes_total`.
    pub service_changes: Counter,
    /// `kubeproxy_sync_proxy_rules_service_changes_pending`: Services changed and not yet
    /// programmed.
    pub service_changes_pending: Gauge,
    /// `kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family,traffic_policy}` (a
    /// gauge, as upstream): service ports with a Local policy, endpoints, and none of them
    /// local.
    pub no_local_endpoints: Family<NoLocalLabels, Gauge>,
    /// `kubeproxy_sync_proxy_rules_duration_seconds`.
    pub sync_duration: Histogram,
    /// `kubeproxy_sync_full_proxy_rules_duration_seconds`.
    pub full_sync_duration: Histogram,
    /// `kubeproxy_sync_partial_proxy_rules_duration_seconds`.
    pub partial_sync_duration: Histogram,
    /// `kubeproxy_sync_proxy_rules_last_timestamp_seconds`.
    pub last_sync_timestamp: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `lb_proxy_network_programming_latency_seconds`: change arrival → kernel acknowledgement.
    pub network_programming_latency: Histogram,
    /// `kubeproxy_sync_proxy_rules_nftables_sync_failures_total`.
    pub sync_failures: Counter,
    /// `kubeproxy_sync_proxy_rules_endpoint_changes_pending`: Services whose endpoints
    /// changed and are not yet programmed.
    pub changes_pending: Gauge,
    /// `lb_proxy_nftables_elements_programmed_total`.
    pub elements_programmed: Counter,
    /// `lb_proxy_invalid_objects_total{kind}`.
    pub invalid_objects: Family<KindLabel, Counter>,
    /// `lb_proxy_watch_errors_total{kind}`.
    pub watch_errors: Family<KindLabel, Counter>,
    /// `lb_proxy_lists_total{kind,protocol}`: lists completed (first lists and re-lists).
    pub lists: Family<ListLabel, Counter>,
    /// `lb_proxy_ignored_objects_total{kind}`: objects read and deliberately not used, as
    /// kube-proxy would not use them (counted once per object while it stays ignored).
    pub ignored_objects: Family<IgnoredLabel, Counter>,
    /// `lb_proxy_manifest_read_errors_total`: manifest files or paths that could not be
    /// read or parsed (each keeps the objects it last produced).
    pub manifest_read_errors: Counter,
    /// `lb_proxy_manifest_sources_failing`: manifest files or paths currently failing.
    pub manifest_sources_failing: Gauge,
    /// `kubeproxy_conntrack_reconciler_deleted_entries_total`.
    pub conntrack_deleted: Counter,
    /// `lb_proxy_affinity_entries_purged_total`: ClientIP affinity entries deleted because
    /// their endpoint left.
    pub affinity_purged: Counter,
    /// `kubeproxy_proxy_healthz_total{code}`.
    pub healthz: Family<CodeLabel, Counter>,
    /// `kubeproxy_proxy_livez_total{code}`.
    pub livez: Family<CodeLabel, Counter>,
    /// `lb_proxy_service_port_packets_total` and `lb_proxy_service_port_bytes_total`.
    pub service_traffic: ServiceTraffic,
}

/// A request for the current per-Service-port traffic, answered by the sync loop (which
/// owns the backend).
pub type TrafficRequest = tokio::sync::oneshot::Sender<Vec<ServicePortTraffic>>;

/// `lb_proxy_service_port_packets_total{service_port, family}` and
/// `lb_proxy_service_port_bytes_total{…}`: the kernel's per-Service-port counters
/// ([`crate::sync::Dataplane::service_traffic`]). The `/metrics` handler refreshes them from
/// the sync loop right before it encodes a scrape; the collector only encodes the last
/// reading.
#[derive(Debug, Clone, Default)]
pub struct ServiceTraffic {
    last: Arc<Mutex<Vec<ServicePortTraffic>>>,
}

/// Labels of the traffic counters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TrafficLabels {
    /// `ns/name:port` (`/PROTO` appended for non-TCP ports).
    service_port: String,
    /// `IPv4` or `IPv6`.
    family: &'static str,
}

impl ServiceTraffic {
    /// Replaces the reading.
    pub fn set(&self, traffic: Vec<ServicePortTraffic>) {
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = traffic;
    }
}

impl Collector for ServiceTraffic {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if last.is_empty() {
            return Ok(());
        }
        let labels = |t: &ServicePortTraffic| TrafficLabels {
            service_port: t.service_port.to_string(),
            family: match t.family {
                lb_core::IpFamily::V4 => "IPv4",
                lb_core::IpFamily::V6 => "IPv6",
            },
        };
        type Value = fn(&ServicePortTraffic) -> u64;
        let families: [(&str, &str, Value); 2] = [
            (
                "service_port_packets",
                "Packets of connections to the service port's addresses and node port, both directions, since its counters were created (new Service, full sync)",
                |t| t.packets,
            ),
            (
                "service_port_bytes",
                "Bytes of connections to the service port's addresses and node port, both directions, since its counters were created (new Service, full sync)",
                |t| t.bytes,
            ),
        ];
        for (name, help, value) in families {
            let counter = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            for t in &last {
                let l = labels(t);
                ConstCounter::new(value(t)).encode(family.encode_family(&l)?)?;
            }
        }
        Ok(())
    }
}

/// Label with an HTTP status code.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CodeLabel {
    /// `200` or `503`.
    pub code: u16,
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn new(registry: &mut Registry) -> Self {
        let buckets = || Histogram::new(exponential_buckets(0.000_1, 2.0, 20));
        // kube-proxy's sync duration buckets: 1 ms doubling to about 16 s.
        let kube_proxy_buckets = || Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let m = Metrics {
            network_programming_duration: Family::new_with_constructor(|| {
                Histogram::new(network_programming_buckets())
            }),
            last_queued_timestamp: Family::default(),
            endpoint_changes: Counter::default(),
            service_changes: Counter::default(),
            service_changes_pending: Gauge::default(),
            no_local_endpoints: Family::default(),
            sync_duration: kube_proxy_buckets(),
            full_sync_duration: kube_proxy_buckets(),
            partial_sync_duration: kube_proxy_buckets(),
            last_sync_timestamp: Gauge::default(),
            network_programming_latency: buckets(),
            sync_failures: Counter::default(),
            changes_pending: Gauge::default(),
            elements_programmed: Counter::default(),
            invalid_objects: Family::default(),
            watch_errors: Family::default(),
            lists: Family::default(),
            ignored_objects: Family::default(),
            manifest_read_errors: Counter::default(),
            manifest_sources_failing: Gauge::default(),
            conntrack_deleted: Counter::default(),
            affinity_purged: Counter::default(),
            service_traffic: ServiceTraffic::default(),
            healthz: Family::default(),
            livez: Family::default(),
        };
        let kp = registry.sub_registry_with_prefix("kubeproxy");
        kp.register(
            "sync_proxy_rules_duration_seconds",
            "Sync latency (compute + kernel), full or partial",
            m.sync_duration.clone(),
        );
        kp.register(
            "sync_full_proxy_rules_duration_seconds",
            "Full sync latency",
            m.full_sync_duration.clone(),
        );
        kp.register(
            "sync_partial_proxy_rules_duration_seconds",
            "Partial (incremental) sync latency",
            m.partial_sync_duration.clone(),
        );
        kp.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "Unix time of the last successful sync",
            m.last_sync_timestamp.clone(),
        );
        kp.register(
            "sync_proxy_rules_nftables_sync_failures",
            "Transactions the kernel rejected",
            m.sync_failures.clone(),
        );
        kp.register(
            "sync_proxy_rules_endpoint_changes_pending",
            "Changes received and not yet programmed",
            m.changes_pending.clone(),
        );
        kp.register(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            m.network_programming_duration.clone(),
        );
        kp.register(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            m.last_queued_timestamp.clone(),
        );
        kp.register(
            "sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            m.endpoint_changes.clone(),
        );
        kp.register(
            "sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            m.service_changes.clone(),
        );
        kp.register(
            "sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            m.service_changes_pending.clone(),
        );
        kp.register(
            "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
        );
        for f in FamilyLabel::both() {
            for traffic_policy in ["internal", "external"] {
                // Every series exists from the start, at 0, as upstream's.
                m.no_local_endpoints
                    .get_or_create(&NoLocalLabels {
                        ip_family: f.ip_family,
                        traffic_policy,
                    })
                    .set(0);
            }
        }
        kp.register(
            "proxy_healthz",
            "/healthz responses by code",
            m.healthz.clone(),
        );
        kp.register("proxy_livez", "/livez responses by code", m.livez.clone());
        kp.register(
            "conntrack_reconciler_deleted_entries",
            "Stale conntrack entries deleted",
            m.conntrack_deleted.clone(),
        );
        let ours = registry.sub_registry_with_prefix("lb_proxy");
        ours.register(
            "network_programming_latency_seconds",
            "From a change's arrival at the proxy to the kernel's acknowledgement of its rules",
            m.network_programming_latency.clone(),
        );
        ours.register(
            "nftables_elements_programmed",
            "Set and map elements added or deleted",
            m.elements_programmed.clone(),
        );
        ours.register(
            "invalid_objects",
            "Objects rejected as invalid",
            m.invalid_objects.clone(),
        );
        ours.register(
            "ignored_objects",
            "Objects read and not used, as kube-proxy would not use them (unknown kinds, duplicates, EndpointSlices without a matching Service or family)",
            m.ignored_objects.clone(),
        );
        ours.register(
            "manifest_read_errors",
            "Manifest files or paths that could not be read or parsed (their last good objects stay)",
            m.manifest_read_errors.clone(),
        );
        ours.register(
            "manifest_sources_failing",
            "Manifest files or paths currently failing (their last good objects stay)",
            m.manifest_sources_failing.clone(),
        );
        ours.register(
            "watch_errors",
            "Watch errors (retried)",
            m.watch_errors.clone(),
        );
        ours.register(
            "lists",
            "Lists completed, by kind and protocol (streaming or paginated)",
            m.lists.clone(),
        );
        ours.register(
            "affinity_entries_purged",
            "ClientIP affinity entries deleted because their endpoint no longer serves their destination",
            m.affinity_purged.clone(),
        );
        ours.register_collector(Box::new(m.service_traffic.clone()));
        registry.register_collector(Box::new(crate::process::ProcessCollector::new()));
        m
    }

    /// A change was queued for the next sync (a Service when `service`, else an
    /// EndpointSlice).
    pub fn queued(&self, service: bool) {
        if service {
            self.service_changes.inc();
        } else {
            self.endpoint_changes.inc();
        }
        let now = unix_now();
        for f in FamilyLabel::both() {
            self.last_queued_timestamp.get_or_create(&f).set(now);
        }
    }

    /// Counts a `/healthz` (`with_node`) or `/livez` response.
    pub fn health_response(&self, with_node: bool, code: u16) {
        let family = if with_node {
            &self.healthz
        } else {
            &self.livez
        };
        family.get_or_create(&CodeLabel { code }).inc();
    }

    /// Records a successful sync.
    pub fn observe_sync(&self, report: &SyncReport, took: std::time::Duration) {
        self.affinity_purged.inc_by(report.affinity_purged as u64);
        if report.commands == 0 {
            return;
        }
        let secs = took.as_secs_f64();
        self.sync_duration.observe(secs);
        if report.full {
            self.full_sync_duration.observe(secs);
        } else {
            self.partial_sync_duration.observe(secs);
        }
        self.elements_programmed.inc_by(report.elements as u64);
        self.last_sync_timestamp.set(unix_now());
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_programming_buckets_are_kube_proxys() {
        let b = network_programming_buckets();
        assert_eq!(b.len(), 3 + 59 + 12 + 7);
        assert_eq!(&b[..5], &[0.0, 0.25, 0.5, 1.0, 2.0]);
        assert!(b.contains(&59.0) && b.contains(&115.0) && b.contains(&300.0));
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn service_port_traffic_is_encoded_as_two_counters_per_service_port_and_family() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        let name = lb_core::ServicePort::builder("t", "web", "http", lb_core::Protocol::Tcp, 80)
            .cluster_ips(["10.96.0.10"])
            .build()
            .expect("valid")
            .name()
            .clone();
        m.service_traffic.set(vec![ServicePortTraffic {
            service_port: name,
            family: lb_core::IpFamily::V4,
            packets: 12,
            bytes: 3400,
        }]);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encode");
        assert!(
            out.contains("# TYPE lb_proxy_service_port_packets counter"),
            "{out}"
        );
        assert!(
            out.contains(
                "lb_proxy_service_port_packets_total{service_port=\"t/web:http\",family=\"IPv4\"} 12"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "lb_proxy_service_port_bytes_total{service_port=\"t/web:http\",family=\"IPv4\"} 3400"
            ),
            "{out}"
        );
        assert!(out.contains("process_start_time_seconds"), "{out}");
        m.service_traffic.set(Vec::new());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encode");
        assert!(!out.contains("service_port_packets"), "{out}");
    }
}
