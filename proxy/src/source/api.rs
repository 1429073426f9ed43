//! The API server source: `kube-runtime` watchers on Services, EndpointSlices, this node's
//! Node and ServiceCIDRs, converted at the edge into store events for the reconciler.
//!
//! * **Watches** (with backoff) apply kube-proxy's label selector
//!   (`!service.kubernetes.io/headless`, and `service.kubernetes.io/service-proxy-name`
//!   absent or equal to ours) on the server, and the same filters again on conversion. Each
//!   event is converted; an invalid object is logged with its name and field, counted, and
//!   skipped (the last good version of it stays).
//! * **Re-lists** (`Init` … `InitDone`) are passed on as they come: the store replaces
//!   everything of the kind at `InitDone` ([`crate::store::Store::apply`]), so nothing stale
//!   survives a watch restart. While the API server is unreachable nothing is sent, so the
//!   dataplane stays exactly as it is.
//! * **Node eligibility** (KEP-3836) is decided by the conversion
//!   ([`crate::convert::node_state`]).
//! * **First lists** are streaming lists (`sendInitialEvents`) when the API server offers
//!   them, paginated lists otherwise ([`watch_list`]).
//! * **Logs**: a watch that fails is logged once (naming the API server) and again when it
//!   recovers, not at every retry; a `--node` that names no Node is warned about once the
//!   Nodes are listed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::{Instant, SystemTime};

use anyhow::Context as _;
use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::{Node as K8sNode, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::runtime::watcher::{self, Event as WatchEvent};
use kube::{Api, Client};

use crate::convert::{
    self, Converted, Filter, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, ServiceKey,
};
use crate::metrics::Metrics;
use crate::reconcile::{Event, Input};
use crate::store::{Event as StoreEvent, SliceKey, StoreEvent as Kinded};

pub mod watch_list;

use watch_list::Lists;

/// What to watch.
#[derive(Debug, Clone)]
pub struct Watches {
    /// This node's name: only its Node is watched.
    pub node: String,
    /// Only objects labelled with this `service.kubernetes.io/service-proxy-name`.
    pub service_proxy_name: Option<String>,
    /// Try streaming lists first (client-go's `WatchListClient` gate; default on); false
    /// lists in pages only.
    pub watch_list: bool,
}

/// Starts the watchers on the current async runtime; each sends its events to `input` until
/// the reconciler is gone. Abort the returned tasks to stop them.
pub fn spawn(
    client: &Client,
    watches: &Watches,
    input: &Sender<Input>,
    metrics: &Arc<Metrics>,
    api_server: &Arc<str>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let filter = Filter {
        service_proxy_name: watches.service_proxy_name.clone(),
    };
    let selector = label_selector(watches.service_proxy_name.as_deref());
    let lists = Lists::new(watches.watch_list, metrics.clone());
    vec![
        tokio::spawn(watch_services(
            Api::all(client.clone()),
            selector.clone(),
            filter.clone(),
            input.clone(),
            metrics.clone(),
            api_server.clone(),
            lists.clone(),
        )),
        tokio::spawn(watch_slices(
            Api::all(client.clone()),
            selector,
            filter,
            input.clone(),
            metrics.clone(),
            api_server.clone(),
            lists.clone(),
        )),
        tokio::spawn(watch_node(
            Api::all(client.clone()),
            watches.node.clone(),
            input.clone(),
            metrics.clone(),
            api_server.clone(),
            lists.clone(),
        )),
        tokio::spawn(watch_service_cidrs(
            Api::all(client.clone()),
            input.clone(),
            metrics.clone(),
            api_server.clone(),
            lists,
        )),
    ]
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

/// Sends `event` as arrived at `arrived`; false when the reconciler is gone.
fn send(input: &Sender<Input>, arrived: Instant, event: Event) -> bool {
    input.send(Input::Event { arrived, event }).is_ok()
}

/// Watches one kind and passes its events on as store events (`wrap` makes them of the
/// kind). `convert` gives `Some(Some(v))` for an object of ours, `Some(None)` for one that is
/// not ours (it is removed), and `None` for an invalid one (reported; its last good version
/// stays, and a re-list leaves it out).
#[allow(clippy::too_many_arguments)]
async fn watch_kind<K, Key, V>(
    api: Api<K>,
    cfg: watcher::Config,
    kind: &'static str,
    key: impl Fn(&K) -> Key,
    convert: impl Fn(&K) -> Option<Option<V>>,
    wrap: impl Fn(StoreEvent<Key, V>) -> Event,
    input: Sender<Input>,
    metrics: Arc<Metrics>,
    api_server: Arc<str>,
    lists: Arc<Lists>,
) where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    // The events that are ready together go to the reconciler as one batch: a list's
    // thousands of objects wake it a few times per page instead of once per object (on two
    // cores those wake-ups took CPU from the parsing), and a single change still goes alone
    // and at once. The batch's arrival is its first event's, so latency is never understated.
    let mut stream = watch_list::watcher(api, cfg, kind, &lists, &api_server);
    let mut failing = WatchFailure::default();
    let mut ended = false;
    while !ended {
        let Some(first) = stream.next().await else {
            return;
        };
        let now = Instant::now();
        let mut events = Vec::new();
        let mut next = Some(first);
        while let Some(event) = next.take() {
            let event = store_event(
                event,
                kind,
                &key,
                &convert,
                &mut failing,
                &metrics,
                &api_server,
            );
            events.extend(event.map(&wrap));
            if events.len() < READY_BATCH {
                match stream.next().now_or_never() {
                    Some(Some(event)) => next = Some(event),
                    Some(None) => ended = true,
                    None => {}
                }
            }
        }
        if !events.is_empty()
            && input
                .send(Input::Batch {
                    arrived: now,
                    events,
                })
                .is_err()
        {
            return;
        }
    }
}

/// Events of a watch taken together at most (see `watch_kind`).
const READY_BATCH: usize = 512;

/// One watch event as a store event, or `None` for an invalid object (reported by `convert`)
/// or a failed watch (logged and counted).
fn store_event<K, Key, V>(
    event: Result<WatchEvent<K>, watcher::Error>,
    kind: &'static str,
    key: &impl Fn(&K) -> Key,
    convert: &impl Fn(&K) -> Option<Option<V>>,
    failing: &mut WatchFailure,
    metrics: &Metrics,
    api_server: &str,
) -> Option<StoreEvent<Key, V>> {
    if event.is_ok() {
        failing.recovered(kind, api_server);
    }
    Some(match event {
        Ok(WatchEvent::Init) => StoreEvent::Init,
        Ok(WatchEvent::InitApply(o)) => match convert(&o) {
            Some(Some(v)) => StoreEvent::InitApply(key(&o), v),
            _ => return None,
        },
        Ok(WatchEvent::InitDone) => StoreEvent::InitDone,
        Ok(WatchEvent::Apply(o)) => match convert(&o) {
            Some(Some(v)) => StoreEvent::Apply(key(&o), v),
            Some(None) => StoreEvent::Delete(key(&o)),
            None => return None,
        },
        Ok(WatchEvent::Delete(o)) => StoreEvent::Delete(key(&o)),
        Err(e) => {
            failing.failed(kind, api_server, &e);
            metrics
                .watch_errors
                .get_or_create(&crate::metrics::KindLabel { kind })
                .inc();
            return None;
        }
    })
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
    input: Sender<Input>,
    metrics: Arc<Metrics>,
    api_server: Arc<str>,
    lists: Arc<Lists>,
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
        |e| Event::from(Kinded::Service(e)),
        input,
        metrics,
        api_server,
        lists,
    )
    .await;
}

async fn watch_slices(
    api: Api<EndpointSlice>,
    selector: String,
    filter: Filter,
    input: Sender<Input>,
    metrics: Arc<Metrics>,
    api_server: Arc<str>,
    lists: Arc<Lists>,
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
    // The trigger time travels beside the event, for the latency metric; the store keeps
    // the slice only.
    let wrap = |e: StoreEvent<SliceKey, (convert::Slice, Option<SystemTime>)>| {
        let (event, trigger) = match e {
            StoreEvent::Apply(k, (s, t)) => (StoreEvent::Apply(k, s), t),
            StoreEvent::InitApply(k, (s, _)) => (StoreEvent::InitApply(k, s), None),
            StoreEvent::Delete(k) => (StoreEvent::Delete(k), None),
            StoreEvent::Init => (StoreEvent::Init, None),
            StoreEvent::InitDone => (StoreEvent::InitDone, None),
        };
        Event::Store {
            event: Kinded::Slice(event),
            trigger,
        }
    };
    let cfg = watcher::Config::default().labels(&selector);
    watch_kind(
        api,
        cfg,
        "EndpointSlice",
        object_key,
        convert,
        wrap,
        input,
        metrics,
        api_server,
        lists,
    )
    .await;
}

/// Watches this node's Node. Its conversion decides its eligibility (KEP-3836); a re-list
/// that does not find it is warned about once (the store keeps the last known state).
async fn watch_node(
    api: Api<K8sNode>,
    name: String,
    input: Sender<Input>,
    metrics: Arc<Metrics>,
    api_server: Arc<str>,
    lists: Arc<Lists>,
) {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watch_list::watcher(api, cfg, "Node", &lists, &api_server);
    let mut failing = WatchFailure::default();
    // Whether the current list found the Node, and whether its absence was reported.
    let (mut found, mut warned) = (false, false);
    while let Some(event) = stream.next().await {
        let now = Instant::now();
        if event.is_ok() {
            failing.recovered("Node", &api_server);
        }
        let event = match event {
            Ok(WatchEvent::Init) => {
                found = false;
                StoreEvent::Init
            }
            Ok(WatchEvent::InitDone) => {
                if !found && !warned {
                    warned = true;
                    tracing::warn!(
                        node = %name,
                        api_server = %api_server,
                        "no Node named {name:?}: check --hostname-override/--node (NODE_NAME, hostnameOverride); until it exists, topology hints cannot be followed and the node's deletion is not seen"
                    );
                }
                StoreEvent::InitDone
            }
            Ok(WatchEvent::InitApply(n)) => {
                found = true;
                match convert::node_state(&n) {
                    Ok(state) => StoreEvent::InitApply(name.clone(), state),
                    Err(e) => {
                        invalid(&metrics, "Node", &e);
                        continue;
                    }
                }
            }
            Ok(WatchEvent::Apply(n)) => {
                found = true;
                match convert::node_state(&n) {
                    Ok(state) => StoreEvent::Apply(name.clone(), state),
                    Err(e) => {
                        invalid(&metrics, "Node", &e);
                        continue;
                    }
                }
            }
            Ok(WatchEvent::Delete(_)) => StoreEvent::Delete(name.clone()),
            Err(e) => {
                failing.failed("Node", &api_server, &e);
                metrics
                    .watch_errors
                    .get_or_create(&crate::metrics::KindLabel { kind: "Node" })
                    .inc();
                continue;
            }
        };
        if !send(&input, now, Event::from(Kinded::Node(event))) {
            return;
        }
    }
}

/// Watches `networking.k8s.io/v1` ServiceCIDRs and sends the CIDRs of all of them after every
/// change (a re-list replaces them). Not waited for before the first sync: an API server
/// without ServiceCIDRs (before Kubernetes 1.33) answers 404, and then `--service-cidr`
/// applies for good.
async fn watch_service_cidrs(
    api: Api<ServiceCIDR>,
    input: Sender<Input>,
    metrics: Arc<Metrics>,
    api_server: Arc<str>,
    lists: Arc<Lists>,
) {
    let config = watcher::Config::default();
    let mut stream = watch_list::watcher(api, config, "ServiceCIDR", &lists, &api_server);
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
            Ok(WatchEvent::Init) => {
                relist.clear();
                continue;
            }
            Ok(WatchEvent::InitApply(c)) => {
                if let Some(cidrs) = convert(&c) {
                    relist.insert(c.metadata.name.clone().unwrap_or_default(), cidrs);
                }
                continue;
            }
            Ok(WatchEvent::InitDone) => current = std::mem::take(&mut relist),
            Ok(WatchEvent::Apply(c)) => {
                let name = c.metadata.name.clone().unwrap_or_default();
                match convert(&c) {
                    Some(cidrs) => current.insert(name, cidrs),
                    None => current.remove(&name),
                };
            }
            Ok(WatchEvent::Delete(c)) => {
                current.remove(&c.metadata.name.clone().unwrap_or_default());
            }
            // A paginated list or a streaming list's watch, refused alike.
            Err(
                watcher::Error::InitialListFailed(kube::Error::Api(status))
                | watcher::Error::WatchStartFailed(kube::Error::Api(status)),
            ) if status.is_not_found() => {
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
        if !send(&input, now, Event::ServiceCidrs(all)) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
