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
//!   kernel acknowledged its rules — is observed in a histogram and logged at debug level;
//!   kube-proxy's `kubeproxy_network_programming_duration_seconds` is measured from an
//!   EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time` instead.
//! * **Logs**: one start-up summary line; a watch that fails is logged once (naming the API
//!   server) and again when it recovers, not at every retry; a `--node` that names no Node is
//!   warned about once the Nodes are listed.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

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
    /// The API server URL, overriding the kubeconfig's (`--master`).
    pub master: Option<String>,
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
    /// Exit when the health or metrics port cannot be bound (`bindAddressHardFail`).
    pub bind_address_hard_fail: bool,
    /// Delete stale UDP/SCTP conntrack entries after endpoint changes.
    pub conntrack_cleanup: bool,
    /// Where the configuration came from, for the start-up summary.
    pub source: String,
    /// The effective `KubeProxyConfiguration`, for `/configz`.
    pub configz: serde_json::Value,
    /// Every flag and its value, for `/flagz`.
    pub flagz: Vec<(String, String)>,
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
    /// One slice, with its `endpoints.kubernetes.io/last-change-trigger-time`.
    Slice(SliceKey, Option<convert::Slice>, Option<SystemTime>),
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

/// The annotation the EndpointSlice controller sets to the time of the change that caused an
/// update; kube-proxy's network programming latency is measured from it.
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The trigger time of `slice` (RFC 3339), if it has a valid one.
pub fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let v = slice
        .metadata
        .annotations
        .as_ref()?
        .get(LAST_CHANGE_TRIGGER_TIME)?;
    humantime::parse_rfc3339_weak(v).ok()
}

/// Builds the Kubernetes client: the given kubeconfig, or kube's standard inference; `master`
/// replaces the API server URL (kube-proxy's `--master`). Returns the client and the API
/// server's URL.
pub async fn client(
    kubeconfig: Option<&PathBuf>,
    master: Option<&str>,
) -> anyhow::Result<(Client, String)> {
    let master = master
        .map(|m| {
            m.parse::<hyper::Uri>()
                .with_context(|| format!("--master: {m:?} is not a URL"))
        })
        .transpose()?;
    let mut config = match (kubeconfig, &master) {
        (Some(path), _) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        // Like kube-proxy: --master alone is enough (no credentials).
        (None, Some(url)) => match kube::Config::infer().await {
            Ok(c) => c,
            Err(_) => kube::Config::new(url.clone()),
        },
        (None, None) => kube::Config::infer().await.context(
            "no Kubernetes configuration: pass --kubeconfig or --master, set KUBECONFIG, or run in a pod with a service account",
        )?,
    };
    if let Some(url) = master {
        config.cluster_url = url;
    }
    let url = config.cluster_url.to_string();
    let client = Client::try_from(config)
        .with_context(|| format!("building the Kubernetes client for {url}"))?;
    Ok((client, url))
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
    let (client, api_server) = client(config.kubeconfig.as_ref(), config.master.as_deref()).await?;
    let show =
        |a: Option<std::net::SocketAddr>| a.map_or("disabled".to_string(), |a| a.to_string());
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        node = %config.node,
        api_server = %api_server,
        mode = "nftables",
        healthz = %show(config.healthz_bind),
        metrics = %show(config.metrics_bind),
        cluster_cidrs = %config.compile.cluster_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        config = %config.source,
        "lb-proxy starting"
    );
    let api_server: Arc<str> = api_server.into();
    let health = Arc::new(ProxyHealth::new(config.sync_period * 2));
    // As kube-proxy with bindAddressHardFail false: a port that cannot be bound yet (say, the
    // old proxy still holds it) is retried in the background; the dataplane does not wait for
    // it. With bindAddressHardFail the daemon exits instead.
    let mut servers = Vec::new();
    let (bind_failed_tx, mut bind_failed) = mpsc::unbounded_channel::<anyhow::Error>();
    let hard_fail = config.bind_address_hard_fail;
    if let Some(addr) = config.healthz_bind {
        let (health, metrics) = (health.clone(), metrics.clone());
        let failed = bind_failed_tx.clone();
        servers.push(tokio::spawn(async move {
            match bind_retrying(addr, "health", hard_fail).await {
                Ok(l) => {
                    let _ = crate::health::serve_health(l, health, metrics).await;
                }
                Err(e) => {
                    let _ = failed.send(e);
                }
            }
        }));
    }
    let (explain_tx, explain_rx) = mpsc::unbounded_channel();
    let (traffic_tx, traffic_rx) = mpsc::unbounded_channel();
    if let Some(addr) = config.metrics_bind {
        let traffic = crate::health::TrafficSource {
            requests: traffic_tx,
            collector: metrics.service_traffic.clone(),
        };
        let pages = Arc::new(crate::health::StatusPages::new(
            &config.configz,
            &config.flagz,
        ));
        let failed = bind_failed_tx.clone();
        servers.push(tokio::spawn(async move {
            match bind_retrying(addr, "metrics", hard_fail).await {
                Ok(l) => {
                    let _ = crate::health::serve_metrics(
                        l,
                        registry,
                        Some(explain_tx),
                        Some(traffic),
                        pages,
                    )
                    .await;
                }
                Err(e) => {
                    let _ = failed.send(e);
                }
            }
        }));
    }
    drop(bind_failed_tx);
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
            api_server.clone(),
        )),
        tokio::spawn(watch_slices(
            Api::all(client.clone()),
            selector,
            filter,
            tx.clone(),
            metrics.clone(),
            api_server.clone(),
        )),
        tokio::spawn(watch_node(
            Api::all(client.clone()),
            config.node.clone(),
            tx.clone(),
            metrics.clone(),
            api_server,
        )),
        tokio::spawn(watch_service_cidrs(Api::all(client), tx, metrics.clone())),
    ];
    let result = tokio::select! {
        r = sync_loop(config, backend, rx, Queries { explain: explain_rx, traffic: traffic_rx }, metrics, health) => r,
        Some(e) = bind_failed.recv() => Err(e),
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

/// Binds `addr`, retrying every 5 s (and logging) until it succeeds; with `hard_fail` the
/// first failure is an error.
async fn bind_retrying(
    addr: std::net::SocketAddr,
    what: &'static str,
    hard_fail: bool,
) -> anyhow::Result<tokio::net::TcpListener> {
    loop {
        match crate::health::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) if hard_fail => {
                return Err(anyhow::Error::new(e).context(format!(
                    "binding the {what} server to {addr} (bindAddressHardFail)"
                )));
            }
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
    api_server: Arc<str>,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    let mut buffer = Vec::new();
    let mut failing = WatchFailure::default();
    while let Some(event) = stream.next().await {
        let now = Instant::now();
        if event.is_ok() {
            failing.recovered(kind, &api_server);
        }
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
                failing.failed(kind, &api_server, &e);
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

/// Logs a watch's failures once per outage: the first error at warn level (with the API
/// server), the retries' at debug level, and the recovery at info level — at the watch's next
/// event, the first sign that it works again (kube-runtime does not surface a resumed watch
/// that has nothing to report).
#[derive(Debug, Default)]
struct WatchFailure {
    since: Option<Instant>,
    retries: u64,
}

impl WatchFailure {
    fn failed(&mut self, kind: &str, api_server: &str, e: &watcher::Error) {
        if self.since.is_none() {
            self.since = Some(Instant::now());
            tracing::warn!(kind, api_server, error = %e, "watch failed; retrying with backoff (logged again when it recovers)");
        } else {
            self.retries += 1;
            tracing::debug!(kind, api_server, error = %e, "watch still failing");
        }
    }

    fn recovered(&mut self, kind: &str, api_server: &str) {
        if let Some(since) = self.since.take() {
            tracing::info!(
                kind,
                api_server,
                down_s = since.elapsed().as_secs_f64(),
                retries = std::mem::take(&mut self.retries),
                "watch recovered"
            );
        }
    }
}

async fn watch_services(
    api: Api<Service>,
    selector: String,
    filter: Filter,
    tx: mpsc::UnboundedSender<(Instant, Update)>,
    metrics: Arc<Metrics>,
    api_server: Arc<str>,
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
        api_server,
    )
    .await;
}

async fn watch_slices(
    api: Api<EndpointSlice>,
    selector: String,
    filter: Filter,
    tx: mpsc::UnboundedSender<(Instant, Update)>,
    metrics: Arc<Metrics>,
    api_server: Arc<str>,
) {
    let m = metrics.clone();
    let convert = move |s: &EndpointSlice| match convert::endpoint_slice(s, &filter) {
        Ok((Converted::Accepted(slice), errors)) => {
            for e in &errors {
                invalid(&m, "EndpointSlice", e);
            }
            Some(Some((slice, trigger_time(s))))
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
        |all: Vec<(SliceKey, (convert::Slice, Option<SystemTime>))>| {
            Update::Slices(all.into_iter().map(|(k, (s, _))| (k, s)).collect())
        },
        |k, v| match v {
            Some((s, t)) => Update::Slice(k, Some(s), t),
            None => Update::Slice(k, None, None),
        },
        tx,
        metrics,
        api_server,
    )
    .await;
}

async fn watch_node(
    api: Api<K8sNode>,
    name: String,
    tx: mpsc::UnboundedSender<(Instant, Update)>,
    metrics: Arc<Metrics>,
    api_server: Arc<str>,
) {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    let mut failing = WatchFailure::default();
    // Whether the current list found the Node, and whether its absence was reported.
    let (mut found, mut warned) = (false, false);
    while let Some(event) = stream.next().await {
        let now = Instant::now();
        if event.is_ok() {
            failing.recovered("Node", &api_server);
        }
        let node = match event {
            Ok(Event::Apply(n) | Event::InitApply(n)) => {
                found = true;
                n
            }
            Ok(Event::InitDone) => {
                if !found && !warned {
                    warned = true;
                    tracing::warn!(
                        node = %name,
                        api_server = %api_server,
                        "no Node named {name:?}: check --hostname-override/--node (NODE_NAME, hostnameOverride); until it exists, topology hints cannot be followed and the node's deletion is not seen"
                    );
                }
                if tx.send((now, Update::NodeListed)).is_err() {
                    return;
                }
                continue;
            }
            Ok(Event::Init) => {
                found = false;
                continue;
            }
            Ok(Event::Delete(_)) => continue,
            Err(e) => {
                failing.failed("Node", &api_server, &e);
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
    let mut changes = ChangeLog::new(SystemTime::now());
    let mut no_local: BTreeMap<ServiceKey, [i64; 4]> = BTreeMap::new();
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
                    Err(e) => tracing::warn!(error = %crate::error_chain(&e), "reading the service traffic counters failed"),
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
                changes.note(&update, &metrics);
                // ServiceCIDRs go to the dataplane (a change is a full sync), the rest to the store.
                let mut apply = |update: Update| match update {
                    Update::ServiceCidrs(cidrs) => {
                        dataplane.set_service_cidrs(cidrs);
                        true
                    }
                    update => apply(&mut store, &mut listed, update),
                };
                let counts_as_change = apply(update);
                if counts_as_change {
                    pending.push(arrived);
                }
                // Drain what else is queued, so a burst is one sync.
                while let Ok((arrived, update)) = rx.try_recv() {
                    changes.note(&update, &metrics);
                    if apply(update) {
                        pending.push(arrived);
                    }
                }
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
                changes.programmed(&metrics, SystemTime::now());
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
                    update_no_local_endpoints(node, &changed, &mut no_local, &metrics);
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
                tracing::warn!(
                    error = %crate::error_chain(&e),
                    retry_in_ms = backoff.as_millis() as u64,
                    "the kernel rejected the sync; the previous ruleset keeps serving"
                );
                metrics.sync_failures.inc();
                retry_after = Some(Instant::now() + backoff);
                last_sync = Some(Instant::now());
            }
        }
    }
}

/// Changes received and not yet programmed, for kube-proxy's change metrics.
#[derive(Debug)]
struct ChangeLog {
    /// Trigger times before this are from before the daemon started: not observed (as
    /// kube-proxy ignores them).
    started: SystemTime,
    services: BTreeSet<ServiceKey>,
    slices: BTreeSet<SliceKey>,
    triggers: Vec<(SystemTime, lb_core::IpFamily)>,
}

impl ChangeLog {
    fn new(started: SystemTime) -> Self {
        Self {
            started,
            services: BTreeSet::new(),
            slices: BTreeSet::new(),
            triggers: Vec::new(),
        }
    }

    /// Counts a Service or EndpointSlice change (re-lists and Node updates are not counted).
    fn note(&mut self, update: &Update, metrics: &Metrics) {
        match update {
            Update::Service(k, _) => {
                self.services.insert(k.clone());
                metrics.queued(true);
            }
            Update::Slice(k, slice, trigger) => {
                self.slices.insert(k.clone());
                metrics.queued(false);
                if let (Some(s), Some(t)) = (slice, trigger)
                    && *t >= self.started
                {
                    self.triggers.push((*t, s.family));
                }
            }
            _ => return,
        }
        metrics
            .service_changes_pending
            .set(self.services.len() as i64);
        metrics.changes_pending.set(self.slices.len() as i64);
    }

    /// Everything noted was programmed at `acked`: observes the trigger-time latencies.
    fn programmed(&mut self, metrics: &Metrics, acked: SystemTime) {
        for (t, family) in self.triggers.drain(..) {
            let latency = acked.duration_since(t).unwrap_or_default();
            metrics
                .network_programming_duration
                .get_or_create(&crate::metrics::FamilyLabel::of(family))
                .observe(latency.as_secs_f64());
        }
        self.services.clear();
        self.slices.clear();
        metrics.service_changes_pending.set(0);
        metrics.changes_pending.set(0);
    }
}

/// Refreshes `kubeproxy_sync_proxy_rules_no_local_endpoints_total` for `changed` Services:
/// per family, the service ports with an internal (resp. external) Local policy that have
/// usable endpoints but none on this node — traffic to them is dropped here (kube-proxy's
/// count, kept per Service so a sync costs what changed).
fn update_no_local_endpoints(
    node: &lb_core::Node,
    changed: &[(ServiceKey, Vec<ServiceEntry>)],
    table: &mut BTreeMap<ServiceKey, [i64; 4]>,
    metrics: &Metrics,
) {
    use lb_core::IpFamily;
    const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];
    for (key, entries) in changed {
        // [v4 internal, v4 external, v6 internal, v6 external]
        let mut counts = [0i64; 4];
        for e in entries {
            for (i, family) in FAMILIES.iter().enumerate() {
                let endpoints: Vec<lb_core::Endpoint> = e
                    .endpoints
                    .iter()
                    .filter(|ep| IpFamily::of(&ep.ip()) == *family)
                    .cloned()
                    .collect();
                let c = lb_core::categorize(&e.port, &endpoints, node);
                if !c.has_any_endpoints() || c.local().len() > 0 {
                    continue;
                }
                if e.port.internal_policy_local() {
                    counts[2 * i] += 1;
                }
                if e.port.external_policy_local() {
                    counts[2 * i + 1] += 1;
                }
            }
        }
        if counts == [0; 4] {
            table.remove(key);
        } else {
            table.insert(key.clone(), counts);
        }
    }
    let mut totals = [0i64; 4];
    for counts in table.values() {
        for (t, c) in totals.iter_mut().zip(counts) {
            *t += c;
        }
    }
    for (i, family) in FAMILIES.iter().enumerate() {
        let ip_family = crate::metrics::FamilyLabel::of(*family).ip_family;
        for (j, traffic_policy) in ["internal", "external"].into_iter().enumerate() {
            metrics
                .no_local_endpoints
                .get_or_create(&crate::metrics::NoLocalLabels {
                    ip_family,
                    traffic_policy,
                })
                .set(totals[2 * i + j]);
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
        Update::Slice(k, s, _) => store.apply_slice(k, s),
        Update::Node(n, _) => store.set_node(n),
        Update::NodeListed => {
            listed.node = true;
        }
        Update::ServiceCidrs(_) => {}
    }
    store.has_changes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trigger_time_annotation_is_read_as_rfc3339() {
        let mut slice = EndpointSlice::default();
        assert_eq!(trigger_time(&slice), None);
        slice.metadata.annotations = Some(BTreeMap::from([(
            LAST_CHANGE_TRIGGER_TIME.to_string(),
            "2024-05-06T07:08:09Z".to_string(),
        )]));
        assert_eq!(
            trigger_time(&slice),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_979_289))
        );
        slice.metadata.annotations = Some(BTreeMap::from([(
            LAST_CHANGE_TRIGGER_TIME.to_string(),
            "yesterday".to_string(),
        )]));
        assert_eq!(trigger_time(&slice), None);
    }
}
