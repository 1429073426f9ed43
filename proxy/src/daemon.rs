//! The node daemon: watches Services, EndpointSlices and this node's Node, keeps the store,
//! and syncs the dataplane.
//!
//! * **Watches** (`kube-runtime` watchers, with backoff) apply kube-proxy's label selector
//!   (`!service.kubernetes.io/headless`, and `service.kubernetes.io/service-proxy-name`
//!   absent or equal to ours) on the server, and the same filters again on conversion. Each
//!   event is converted at the edge; an invalid object is logged with its name and field,
//!   counted, and skipped (the last good version of it stays).
//! * **The store** is updated by one task; a re-list (`Init` … `InitDone`) replaces everything
//!   of its kind, so nothing stale survives a watch restart.
//! * **The sync loop** waits until every watch has listed once (no half-programmed start),
//!   then coalesces changes with `min_sync_period` between syncs, applies only what changed,
//!   runs a full resync every `full_sync_period` (which also repairs rules someone else
//!   changed), and retries with backoff when the kernel rejects a transaction. While the API
//!   server is unreachable nothing changes in the store, so the dataplane stays exactly as it
//!   is.
//! * **Network programming latency** — from the moment a change arrives to the moment the
//!   kernel acknowledged its rules — is observed in a histogram and logged at debug level.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node as K8sNode, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio::sync::mpsc;

use crate::compile::Config as CompileConfig;
use crate::convert::{
    self, Converted, Filter, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, ServiceKey,
};
use crate::health::{ExplainRequest, ProxyHealth, ServiceHealthServers};
use crate::metrics::Metrics;
use crate::nft::Backend;
use crate::store::{ServiceEntry, SliceKey, Store};
use crate::sync::Dataplane;

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Kubeconfig file; `None` infers (`KUBECONFIG`, `~/.kube/config`, in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// This node's name.
    pub node: String,
    /// What to compile.
    pub compile: CompileConfig,
    /// Only objects labelled with this `service.kubernetes.io/service-proxy-name`.
    pub service_proxy_name: Option<String>,
    /// Minimum time between syncs (kube-proxy's `minSyncPeriod`, default 1 s; 0 syncs at once).
    pub min_sync_period: Duration,
    /// Retry interval after a failed sync, and the health timeout is twice this
    /// (kube-proxy's `syncPeriod`, default 30 s).
    pub sync_period: Duration,
    /// Interval of full resyncs (table replaced, drift repaired).
    pub full_sync_period: Duration,
    /// Where `/healthz` and `/livez` listen (`None`: disabled).
    pub healthz_bind: Option<std::net::SocketAddr>,
    /// Where `/metrics` and `/explain` listen (`None`: disabled).
    pub metrics_bind: Option<std::net::SocketAddr>,
    /// Address the healthCheckNodePort responders listen on.
    pub health_check_bind: std::net::IpAddr,
    /// Delete stale UDP/SCTP conntrack entries after endpoint changes.
    pub conntrack_cleanup: bool,
}

/// Which kinds have listed at least once.
#[derive(Debug, Default, Clone, Copy)]
struct Listed {
    services: bool,
    slices: bool,
    node: bool,
}

impl Listed {
    fn all(&self) -> bool {
        self.services && self.slices && self.node
    }
}

/// A converted watch event for the store.
#[derive(Debug)]
enum Update {
    Services(Vec<(ServiceKey, Vec<lb_core::ServicePort>)>),
    Service(ServiceKey, Option<Vec<lb_core::ServicePort>>),
    Slices(Vec<(SliceKey, convert::Slice)>),
    Slice(SliceKey, Option<convert::Slice>),
    Node(lb_core::Node, bool),
    NodeListed,
    /// The CIDRs of every ServiceCIDR object, after any change to them.
    ServiceCidrs(Vec<ipnet::IpNet>),
}

/// Kube-proxy's label selector for Services and EndpointSlices.
pub fn label_selector(service_proxy_name: Option<&str>) -> String {
    match service_proxy_name {
        Some(name) => format!("{LABEL_SERVICE_PROXY_NAME}={name},!{LABEL_HEADLESS}"),
        None => format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}"),
    }
}

/// Builds the Kubernetes client: the given kubeconfig, or kube's standard inference.
pub async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes configuration: pass --kubeconfig, set KUBECONFIG, or run in a pod with a service account",
        )?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// Runs the daemon until `shutdown` resolves. The dataplane is left in place on return, so
/// traffic keeps flowing across a restart or an upgrade.
pub async fn run<B: Backend + Send + 'static>(
    config: DaemonConfig,
    backend: B,
    metrics: Arc<Metrics>,
    registry: Arc<prometheus_client::registry::Registry>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let client = client(config.kubeconfig.as_ref()).await?;
    let health = Arc::new(ProxyHealth::new(config.sync_period * 2));
    // As kube-proxy (bindAddressHardFail false): a port that cannot be bound yet (say, the old
    // proxy still holds it) is retried in the background; the dataplane does not wait for it.
    let mut servers = Vec::new();
    if let Some(addr) = config.healthz_bind {
        let (health, metrics) = (health.clone(), metrics.clone());
        servers.push(tokio::spawn(async move {
            let l = bind_retrying(addr, "health").await;
            let _ = crate::health::serve_health(l, health, metrics).await;
        }));
    }
    let (explain_tx, explain_rx) = mpsc::unbounded_channel();
    let (traffic_tx, traffic_rx) = mpsc::unbounded_channel();
    if let Some(addr) = config.metrics_bind {
        let traffic = crate::health::TrafficSource {
            requests: traffic_tx,
            collector: metrics.service_traffic.clone(),
        };
        servers.push(tokio::spawn(async move {
            let l = bind_retrying(addr, "metrics").await;
            let _ =
                crate::health::serve_metrics(l, registry, Some(explain_tx), Some(traffic)).await;
        }));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let filter = Filter {
        service_proxy_name: config.service_proxy_name.clone(),
    };
    let selector = label_selector(config.service_proxy_name.as_deref());
    let tasks = vec![
        tokio::spawn(watch_services(
            Api::all(client.clone()),
            selector.clone(),
            filter.clone(),
            tx.clone(),
            metrics.clone(),
        )),
        tokio::spawn(watch_slices(
            Api::all(client.clone()),
            selector,
            filter,
            tx.clone(),
            metrics.clone(),
        )),
        tokio::spawn(watch_node(
            Api::all(client.clone()),
            config.node.clone(),
            tx.clone(),
            metrics.clone(),
        )),
        tokio::spawn(watch_service_cidrs(Api::all(client), tx, metrics.clone())),
    ];
    let result = tokio::select! {
        r = sync_loop(config, backend, rx, Queries { explain: explain_rx, traffic: traffic_rx }, metrics, health) => r,
        () = shutdown => {
            tracing::info!("shutting down; the dataplane stays in place");
            Ok(())
        }
    };
    for t in tasks.into_iter().chain(servers) {
        t.abort();
    }
    result
}

/// Binds `addr`, retrying every 5 s (and logging) until it succeeds.
async fn bind_retrying(addr: std::net::SocketAddr, what: &'static str) -> tokio::net::TcpListener {
    loop {
        match crate::health::bind(addr) {
            Ok(l) => return l,
            Err(e) => {
                tracing::error!(%addr, error = %e, "cannot bind the {what} server; retrying in 5 s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

fn invalid(metrics: &Metrics, kind: &'static str, e: &convert::ConvertError) {
    tracing::warn!(error = %e, "invalid object skipped");
    metrics
        .invalid_objects
        .get_or_create(&crate::metrics::KindLabel { kind })
        .inc();
}

/// Namespace and name of an object (`default` when the namespace is unset).
fn object_key<K: kube::Resource>(o: &K) -> (String, String) {
    let m = o.meta();
    (
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.name.clone().unwrap_or_default(),
    )
}

/// Watches one kind and turns its events into store updates: a re-list (`Init` … `InitDone`)
/// becomes one `relisted` update holding every object; `Apply`/`Delete` become `one`.
/// `convert` gives `Some(Some(v))` for an object of ours, `Some(None)` for one that is not ours
/// (it is removed), and `None` for an invalid one (reported; its last good version stays).
#[allow(clippy::too_many_arguments)]
async fn watch_kind<K, Key, V>(
    api: Api<K>,
    cfg: watcher::Config,
    kind: &'static str,
    key: impl Fn(&K) -> Key,
    convert: impl Fn(&K) -> Option<Option<V>>,
    relisted: impl Fn(Vec<(Key, V)>) -> Update,
    one: impl Fn(Key, Option<V>) -> Update,
    tx: mpsc::UnboundedSender<(Instant, Update)>,
    metrics: Arc<Metrics>,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    let mut buffer = Vec::new();
    while let Some(event) = stream.next().await {
        let now = Instant::now();
        let update = match event {
            Ok(Event::Init) => {
                buffer.clear();
                continue;
            }
            Ok(Event::InitApply(o)) => {
                if let Some(Some(v)) = convert(&o) {
                    buffer.push((key(&o), v));
                }
                continue;
            }
            Ok(Event::InitDone) => relisted(std::mem::take(&mut buffer)),
            Ok(Event::Apply(o)) => match convert(&o) {
                Some(v) => one(key(&o), v),
                None => continue,
            },
            Ok(Event::Delete(o)) => one(key(&o), None),
            Err(e) => {
                tracing::warn!(error = %e, kind, "watch failed; retrying with backoff");
                metrics
                    .watch_errors
                    .get_or_create(&crate::metrics::KindLabel { kind })
                    .inc();
                continue;
            }
        };
        if tx.send((now, update)).is_err() {
            return;
        }
    }
}

async fn watch_services(
    api: Api<Service>,
    selector: String,
    filter: Filter,
    tx: mpsc::UnboundedSender<(Instant, Update)>,
    metrics: Arc<Metrics>,
) {
    let m = metrics.clone();
    let convert = move |s: &Service| match convert::service(s, &filter) {
        Ok(Converted::Accepted(ports)) => Some(Some(ports)),
        Ok(Converted::Skipped(why)) => {
            tracing::debug!(service = ?object_key(s), why, "service skipped");
            Some(None)
        }
        Err(e) => {
            invalid(&m, "Service", &e);
            None
        }
    };
    let key = |s: &Service| {
        let (namespace, name) = object_key(s);
        ServiceKey { namespace, name }
    };
    let cfg = watcher::Config::default().labels(&selector);
    watch_kind(
        api,
        cfg,
        "Service",
        key,
        convert,
        Update::Services,
        Update::Service,
        tx,
        metrics,
    )
    .await;
}

async fn watch_slices(
    api: Api<EndpointSlice>,
    selector: String,
    filter: Filter,
    tx: mpsc::UnboundedSender<(Instant, Update)>,
    metrics: Arc<Metrics>,
) {
    let m = metrics.clone();
    let convert = move |s: &EndpointSlice| match convert::endpoint_slice(s, &filter) {
        Ok((Converted::Accepted(slice), errors)) => {
            for e in &errors {
                invalid(&m, "EndpointSlice", e);
            }
            Some(Some(slice))
        }
        Ok((Converted::Skipped(_), _)) => Some(None),
        Err(e) => {
            invalid(&m, "EndpointSlice", &e);
            None
        }
    };
    let cfg = watcher::Config::default().labels(&selector);
    watch_kind(
        api,
        cfg,
        "EndpointSlice",
        object_key,
        convert,
        Update::Slices,
        Update::Slice,
        tx,
        metrics,
    )
    .await;
}

async fn watch_node(
    api: Api<K8sNode>,
    name: String,
    tx: mpsc::UnboundedSender<(Instant, Update)>,
    metrics: Arc<Metrics>,
) {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        let now = Instant::now();
        let node = match event {
            Ok(Event::Apply(n) | Event::InitApply(n)) => n,
            Ok(Event::InitDone) => {
                if tx.send((now, Update::NodeListed)).is_err() {
                    return;
                }
                continue;
            }
            Ok(Event::Init | Event::Delete(_)) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "Node watch failed; retrying with backoff");
                metrics
                    .watch_errors
                    .get_or_create(&crate::metrics::KindLabel { kind: "Node" })
                    .inc();
                continue;
            }
        };
        // KEP-3836: a node being deleted, or marked for deletion by the cluster autoscaler, is
        // no longer eligible for load-balancer traffic.
        let eligible = node.metadata.deletion_timestamp.is_none()
            && !node
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| t.iter().any(|t| t.key == "ToBeDeletedByClusterAutoscaler"));
        match convert::node(&node) {
            Ok(n) => {
                if tx.send((now, Update::Node(n, eligible))).is_err() {
                    return;
                }
            }
            Err(e) => invalid(&metrics, "Node", &e),
        }
    }
}

/// Watches `networking.k8s.io/v1` ServiceCIDRs and sends the CIDRs of all of them after every
/// change (a re-list replaces them). Not waited for before the first sync: an API server
/// without ServiceCIDRs (before Kubernetes 1.33) answers 404, and then `--service-cidr`
/// applies for good.
async fn watch_service_cidrs(
    api: Api<ServiceCIDR>,
    tx: mpsc::UnboundedSender<(Instant, Update)>,
    metrics: Arc<Metrics>,
) {
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut current: BTreeMap<String, Vec<ipnet::IpNet>> = BTreeMap::new();
    let mut relist: BTreeMap<String, Vec<ipnet::IpNet>> = BTreeMap::new();
    let convert = |c: &ServiceCIDR| match convert::service_cidr(c) {
        Ok(cidrs) => Some(cidrs),
        Err(e) => {
            invalid(&metrics, "ServiceCIDR", &e);
            None
        }
    };
    while let Some(event) = stream.next().await {
        let now = Instant::now();
        match event {
            Ok(Event::Init) => {
                relist.clear();
                continue;
            }
            Ok(Event::InitApply(c)) => {
                if let Some(cidrs) = convert(&c) {
                    relist.insert(c.metadata.name.clone().unwrap_or_default(), cidrs);
                }
                continue;
            }
            Ok(Event::InitDone) => current = std::mem::take(&mut relist),
            Ok(Event::Apply(c)) => {
                let name = c.metadata.name.clone().unwrap_or_default();
                match convert(&c) {
                    Some(cidrs) => current.insert(name, cidrs),
                    None => current.remove(&name),
                };
            }
            Ok(Event::Delete(c)) => {
                current.remove(&c.metadata.name.clone().unwrap_or_default());
            }
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                if status.is_not_found() =>
            {
                tracing::info!("the API server has no ServiceCIDRs; --service-cidr applies");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "ServiceCIDR watch failed; retrying with backoff");
                metrics
                    .watch_errors
                    .get_or_create(&crate::metrics::KindLabel {
                        kind: "ServiceCIDR",
                    })
                    .inc();
                continue;
            }
        }
        let all: Vec<ipnet::IpNet> = current.values().flatten().copied().collect();
        if tx.send((now, Update::ServiceCidrs(all))).is_err() {
            return;
        }
    }
}

/// Questions the HTTP handlers ask the sync loop, which owns the store and the backend.
struct Queries {
    explain: mpsc::UnboundedReceiver<ExplainRequest>,
    traffic: mpsc::UnboundedReceiver<crate::metrics::TrafficRequest>,
}

/// Applies store updates and syncs the dataplane. Returns only if every watch task ended.
async fn sync_loop<B: Backend>(
    config: DaemonConfig,
    backend: B,
    mut rx: mpsc::UnboundedReceiver<(Instant, Update)>,
    mut queries: Queries,
    metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
) -> anyhow::Result<()> {
    let mut responders = ServiceHealthServers::new(health.clone(), config.health_check_bind);
    let mut health_checks: BTreeMap<ServiceKey, Vec<(u16, crate::health::LocalEndpoints)>> =
        BTreeMap::new();
    let mut conntrack_seen: BTreeMap<
        ServiceKey,
        Vec<(lb_core::ServicePortName, crate::conntrack::ServicePortState)>,
    > = BTreeMap::new();
    let mut store = Store::new();
    // Until the Node object is listed, this node has no zone label: no topology filtering.
    store.set_node(lb_core::Node::new(&config.node, None).context("node name")?);
    let mut dataplane = Dataplane::new(backend, config.compile.clone());
    let mut listed = Listed::default();
    // Arrival time of every change not yet programmed, for the latency histogram.
    let mut pending: Vec<Instant> = Vec::new();
    let mut last_sync: Option<Instant> = None;
    // Whether a sync succeeded yet: until then `explain` cannot speak for the kernel.
    let mut synced_once = false;
    let mut last_full = Instant::now();
    let mut retry_after: Option<Instant> = None;
    let mut failures = 0u32;
    loop {
        let first = last_sync.is_none();
        let due = if !listed.all() || (pending.is_empty() && retry_after.is_none() && !first) {
            None
        } else {
            let earliest = last_sync.map_or_else(Instant::now, |t| t + config.min_sync_period);
            Some(retry_after.map_or(earliest, |r| r.max(earliest)))
        };
        let full_due = last_full + config.full_sync_period;
        let wake = due.map_or(full_due, |d| d.min(full_due));
        tokio::select! {
            Some((q, reply)) = queries.explain.recv() => {
                if !synced_once {
                    let _ = reply.send(crate::explain::Explanation::not_synced());
                } else if let Some(snap) = store.snapshot() {
                    let mut compile = config.compile.clone();
                    if !dataplane.service_cidrs().is_empty() {
                        compile.service_cidrs = dataplane.service_cidrs().to_vec();
                    }
                    let _ = reply.send(crate::explain::explain(&snap, &compile, &q));
                }
                continue;
            }
            Some(reply) = queries.traffic.recv() => {
                match dataplane.service_traffic() {
                    Ok(t) => {
                        let _ = reply.send(t);
                    }
                    Err(e) => tracing::warn!(error = %e, "reading the service traffic counters failed"),
                }
                continue;
            }
            msg = rx.recv() => {
                let Some((arrived, update)) = msg else {
                    anyhow::bail!("every watch ended");
                };
                if let Update::Node(_, eligible) = &update {
                    health.set_node_eligible(*eligible);
                }
                if let Update::ServiceCidrs(cidrs) = update {
                    dataplane.set_service_cidrs(cidrs);
                    pending.push(arrived);
                    metrics.changes_pending.set(pending.len() as i64);
                    continue;
                }
                let counts_as_change = apply(&mut store, &mut listed, update);
                if counts_as_change {
                    pending.push(arrived);
                    metrics.changes_pending.set(pending.len() as i64);
                }
                // Drain what else is queued, so a burst is one sync.
                while let Ok((arrived, update)) = rx.try_recv() {
                    if apply(&mut store, &mut listed, update) {
                        pending.push(arrived);
                    }
                }
                metrics.changes_pending.set(pending.len() as i64);
                if !pending.is_empty() {
                    health.queued();
                }
                if listed.all() && last_sync.is_none() && !pending.is_empty() {
                    tracing::info!("every watch has listed once; programming the dataplane");
                }
                continue;
            }
            () = tokio::time::sleep_until(wake.into()) => {}
        }
        let now = Instant::now();
        if now >= full_due {
            dataplane.request_full_sync();
            last_full = now;
            if !listed.all() {
                continue;
            }
        } else if due.is_none_or(|d| now < d) {
            continue;
        }
        let started = Instant::now();
        match dataplane.sync(&mut store) {
            Ok(report) => {
                let acked = Instant::now();
                failures = 0;
                retry_after = None;
                last_sync = Some(acked);
                synced_once = true;
                metrics.observe_sync(&report, started.elapsed());
                for arrived in pending.drain(..) {
                    let latency = acked.duration_since(arrived);
                    metrics
                        .network_programming_latency
                        .observe(latency.as_secs_f64());
                    tracing::debug!(
                        latency_ms = latency.as_secs_f64() * 1000.0,
                        "network programming latency"
                    );
                }
                metrics.changes_pending.set(0);
                health.updated();
                // The merged entries of every recompiled Service, read once for the health
                // checks and the conntrack cleanup.
                let changed: Vec<(ServiceKey, Vec<ServiceEntry>)> = report
                    .changed_services
                    .iter()
                    .map(|k| (k.clone(), store.entries(k)))
                    .collect();
                if let Some(node) = store.node() {
                    update_health_checks(node, &changed, &mut health_checks);
                }
                let wanted = health_checks
                    .iter()
                    .flat_map(|(k, v)| {
                        v.iter()
                            .map(move |&(port, n)| (port, (k.namespace.clone(), k.name.clone(), n)))
                    })
                    .collect();
                responders.sync(&wanted).await;
                if config.conntrack_cleanup {
                    clean_conntrack(&changed, &mut conntrack_seen, &metrics);
                }
                if report.affinity_purged > 0 {
                    tracing::debug!(
                        purged = report.affinity_purged,
                        "deleted ClientIP affinity entries of endpoints that left"
                    );
                }
                if report.full {
                    tracing::info!(
                        service_ports = report.service_ports,
                        elements = report.elements,
                        compute_ms = report.compute.as_secs_f64() * 1000.0,
                        apply_ms = report.apply.as_secs_f64() * 1000.0,
                        "full sync"
                    );
                } else if report.commands > 0 {
                    tracing::debug!(
                        full = report.full,
                        service_ports = report.service_ports,
                        commands = report.commands,
                        elements = report.elements,
                        compute_ms = report.compute.as_secs_f64() * 1000.0,
                        apply_ms = report.apply.as_secs_f64() * 1000.0,
                        "synced"
                    );
                }
            }
            Err(e) => {
                failures += 1;
                let backoff = Duration::from_millis(500)
                    .saturating_mul(1u32 << failures.min(8))
                    .min(config.sync_period);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "the kernel rejected the sync; the previous ruleset keeps serving");
                metrics.sync_failures.inc();
                retry_after = Some(Instant::now() + backoff);
                last_sync = Some(Instant::now());
            }
        }
    }
}

/// Refreshes the healthCheckNodePort table for `changed` Services: port and number of distinct
/// local ready endpoints, for LoadBalancer Services with `externalTrafficPolicy: Local`.
fn update_health_checks(
    node: &lb_core::Node,
    changed: &[(ServiceKey, Vec<ServiceEntry>)],
    table: &mut BTreeMap<ServiceKey, Vec<(u16, crate::health::LocalEndpoints)>>,
) {
    for (key, entries) in changed {
        // Distinct local ready endpoints of the Service, whatever the port, per family.
        let addresses = entries
            .iter()
            .flat_map(|e| &e.endpoints)
            .filter(|ep| ep.is_ready() && ep.is_local_to(node))
            .map(lb_core::Endpoint::ip)
            .collect::<std::collections::BTreeSet<_>>();
        let v4 = addresses.iter().filter(|ip| ip.is_ipv4()).count();
        let local = [v4, addresses.len() - v4];
        let mut ports = Vec::new();
        for e in entries {
            let Some(port) = e.port.health_check_node_port() else {
                continue;
            };
            if e.port.external_policy_local() && !ports.iter().any(|(p, _)| *p == port) {
                ports.push((port, local));
            }
        }
        if ports.is_empty() {
            table.remove(key);
        } else {
            table.insert(key.clone(), ports);
        }
    }
}

/// Deletes conntrack entries that the changes to `changed` Services left stale (UDP and SCTP
/// flows to endpoints that left; un-DNATed flows to service ports that gained endpoints), and
/// reconciles the whole table against every Service's serving endpoints
/// ([`crate::conntrack::Reconciler`]), which also repairs what went stale before a restart.
fn clean_conntrack(
    changed: &[(ServiceKey, Vec<ServiceEntry>)],
    seen: &mut BTreeMap<
        ServiceKey,
        Vec<(lb_core::ServicePortName, crate::conntrack::ServicePortState)>,
    >,
    metrics: &Metrics,
) {
    use crate::conntrack::{ServicePortState, ServicePorts};
    let mut previous = ServicePorts::new();
    let mut next = ServicePorts::new();
    let mut fresh = Vec::new();
    for (key, entries) in changed {
        for (name, state) in seen.get(key).into_iter().flatten() {
            previous.insert(name.clone(), state.clone());
        }
        let now: Vec<_> = entries
            .iter()
            .filter_map(|e| ServicePortState::from_entry(e).map(|s| (e.port.name().clone(), s)))
            .collect();
        for (name, state) in &now {
            next.insert(name.clone(), state.clone());
        }
        fresh.push((key.clone(), now));
    }
    // Every UDP and SCTP service port as it is now, for the whole-table reconciliation.
    let mut serving = ServicePorts::new();
    for (key, states) in seen.iter() {
        if fresh.iter().any(|(k, _)| k == key) {
            continue;
        }
        for (name, state) in states {
            serving.insert(name.clone(), state.clone());
        }
    }
    for (_, now) in &fresh {
        for (name, state) in now {
            serving.insert(name.clone(), state.clone());
        }
    }
    let started = Instant::now();
    match crate::conntrack::cleanup(&previous, &next, &serving) {
        Ok(deleted) => {
            for (key, now) in fresh {
                if now.is_empty() {
                    seen.remove(&key);
                } else {
                    seen.insert(key, now);
                }
            }
            if deleted > 0 {
                tracing::debug!(
                    deleted,
                    took_ms = started.elapsed().as_secs_f64() * 1000.0,
                    "conntrack cleanup"
                );
            }
            metrics.conntrack_deleted.inc_by(deleted as u64);
        }
        Err(e) => {
            tracing::warn!(error = %e, "conntrack cleanup failed; retried after the next sync")
        }
    }
}

/// Applies one update to the store; returns whether it may change the dataplane.
fn apply(store: &mut Store, listed: &mut Listed, update: Update) -> bool {
    match update {
        Update::Services(all) => {
            listed.services = true;
            store.replace_services(all);
        }
        Update::Service(k, p) => store.apply_service(k, p),
        Update::Slices(all) => {
            listed.slices = true;
            let mut by_key = BTreeMap::new();
            for (k, s) in all {
                by_key.insert(k, s);
            }
            store.replace_slices(by_key);
        }
        Update::Slice(k, s) => store.apply_slice(k, s),
        Update::Node(n, _) => store.set_node(n),
        Update::NodeListed => {
            listed.node = true;
        }
        Update::ServiceCidrs(_) => {}
    }
    store.has_changes()
}
