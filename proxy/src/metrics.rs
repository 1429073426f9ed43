//! Prometheus metrics, with kube-proxy's names where they have a counterpart.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::sync::SyncReport;

/// Label naming an object kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KindLabel {
    /// `Service`, `EndpointSlice` or `Node`.
    pub kind: &'static str,
}

/// Every metric the daemon exports.
#[derive(Debug)]
pub struct Metrics {
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
    /// `kubeproxy_sync_proxy_rules_endpoint_changes_pending` (all kinds).
    pub changes_pending: Gauge,
    /// `lb_proxy_nftables_elements_programmed_total`.
    pub elements_programmed: Counter,
    /// `lb_proxy_invalid_objects_total{kind}`.
    pub invalid_objects: Family<KindLabel, Counter>,
    /// `lb_proxy_watch_errors_total{kind}`.
    pub watch_errors: Family<KindLabel, Counter>,
    /// `kubeproxy_conntrack_reconciler_deleted_entries_total`.
    pub conntrack_deleted: Counter,
    /// `kubeproxy_proxy_healthz_total{code}`.
    pub healthz: Family<CodeLabel, Counter>,
    /// `kubeproxy_proxy_livez_total{code}`.
    pub livez: Family<CodeLabel, Counter>,
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
        let m = Metrics {
            sync_duration: buckets(),
            full_sync_duration: buckets(),
            partial_sync_duration: buckets(),
            last_sync_timestamp: Gauge::default(),
            network_programming_latency: buckets(),
            sync_failures: Counter::default(),
            changes_pending: Gauge::default(),
            elements_programmed: Counter::default(),
            invalid_objects: Family::default(),
            watch_errors: Family::default(),
            conntrack_deleted: Counter::default(),
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
            "proxy_healthz",
            "/healthz responses by code",
            m.healthz.clone(),
        );
        kp.register("proxy_livez", "/livez responses by code", m.livez.clone());
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
            "watch_errors",
            "Watch errors (retried)",
            m.watch_errors.clone(),
        );
        m
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
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_sync_timestamp.set(now);
    }
}
