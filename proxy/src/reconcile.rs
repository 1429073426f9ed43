//! The reconciler: one loop from the store to the kernel, whatever feeds the store.
//!
//! ```text
//! source::api (watchers) ─┐                        ┌─► Dataplane::sync (compile, diff, netlink)
//!                         ├─► Input ─► Store::apply ┤
//! source::files (poller) ─┘   (one channel)         └─► hooks: healthCheckNodePort table,
//!                                                        no-local-endpoints gauge, conntrack
//!                                                        cleanup, metrics, health status
//! ```
//!
//! Sources send [`Input`]s on one channel; the reconciler owns the [`Store`] and the
//! [`Dataplane`] and runs on a thread of its own ([`spawn`]), so netlink batches and conntrack
//! dumps never block the async runtime's workers. The contract (as cilium's
//! `pkg/loadbalancer` reconciler):
//!
//! * **Wait for the first listing**: nothing is programmed before every kind (Services,
//!   EndpointSlices, the Node) has listed once, so a start never programs half a cluster.
//! * **Coalesce**: a burst of changes is one sync, and syncs are at least `min_sync_period`
//!   apart (kube-proxy's `minSyncPeriod`).
//! * **Idempotent, retried**: a sync the kernel rejects leaves the previous ruleset serving
//!   and is retried with exponential backoff (capped at `sync_period`); the next sync is a
//!   full one.
//! * **Full resync** every `full_sync_period` replaces the tables, which also repairs rules
//!   someone else changed.
//! * **Post-sync hooks** (`hooks`) run after every successful sync in every mode.
//! * **Health** is one status value ([`ProxyHealth`]): changes pending since, last update.
//! * **Network programming latency**, from a change's arrival to the kernel's
//!   acknowledgement, is observed in a histogram.
//!
//! Live questions (`/explain`, the per-Service-port traffic counters of `/metrics`) arrive on
//! the same channel and are answered between syncs, from the state the kernel holds.

mod hooks;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;

use crate::compile::Config as CompileConfig;
use crate::convert::ServiceKey;
use crate::health::{ExplainRequest, LocalEndpoints, ProxyHealth, ServiceHealthServers};
use crate::metrics::{Metrics, TrafficRequest};
use crate::nft::Backend;
use crate::store::{Kind, ServiceEntry, Store, StoreEvent};
use crate::sync::{Dataplane, SyncReport};

/// A change from a source.
#[derive(Debug)]
pub enum Event {
    /// A store event. `trigger` is an EndpointSlice's
    /// `endpoints.kubernetes.io/last-change-trigger-time`, for kube-proxy's latency metric.
    Store {
        /// The event.
        event: StoreEvent,
        /// When the change that caused it happened, if the object says.
        trigger: Option<SystemTime>,
    },
    /// The CIDRs of every ServiceCIDR object, after any change to them (a full sync).
    ServiceCidrs(Vec<ipnet::IpNet>),
}

impl From<StoreEvent> for Event {
    fn from(event: StoreEvent) -> Self {
        Event::Store {
            event,
            trigger: None,
        }
    }
}

/// What the reconciler receives.
#[derive(Debug)]
pub enum Input {
    /// A change, with the moment it arrived (network programming latency starts there).
    Event {
        /// When the source received it.
        arrived: Instant,
        /// What changed.
        event: Event,
    },
    /// Changes that take effect together: no sync sees some of them without the others (a
    /// source's whole re-list of several kinds, say).
    Batch {
        /// When the source received them.
        arrived: Instant,
        /// What changed, in order.
        events: Vec<Event>,
    },
    /// A live `explain` question.
    Explain(ExplainRequest),
    /// A request for the per-Service-port traffic counters.
    Traffic(TrafficRequest),
    /// Stop after the current step (the dataplane stays in place).
    Stop,
}

impl Input {
    /// An event that arrived now.
    pub fn now(event: impl Into<Event>) -> Self {
        Input::Event {
            arrived: Instant::now(),
            event: event.into(),
        }
    }
}

/// How the reconciler reports syncs: `run`'s plain lines on stderr (`lb-proxy: programmed …`,
/// `lb-proxy: applied …`), or the daemon's structured logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Voice {
    /// One `lb-proxy: …` line per sync that changed something, on stderr.
    Plain,
    /// `tracing` events: `full sync` at info, every other sync at debug.
    Log,
}

/// How the reconciler runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// What to compile.
    pub compile: CompileConfig,
    /// This node's name, known before its Node object is (no zone until then).
    pub node: Option<String>,
    /// Minimum time between syncs (0: every change at once).
    pub min_sync_period: Duration,
    /// Cap of the retry backoff after a failed sync.
    pub sync_period: Duration,
    /// Interval of full resyncs.
    pub full_sync_period: Duration,
    /// Delete stale UDP/SCTP conntrack entries after syncs.
    pub conntrack_cleanup: bool,
    /// Stop after the first successful sync; a failed first sync is an error.
    pub once: bool,
    /// A failed first sync is an error (instead of being retried).
    pub first_sync_must_succeed: bool,
    /// How syncs are reported.
    pub voice: Voice,
}

/// The healthCheckNodePort responders and the runtime that serves them.
#[derive(Debug)]
pub struct Responders {
    /// The responders.
    pub servers: ServiceHealthServers,
    /// The async runtime their listeners run on.
    pub runtime: tokio::runtime::Handle,
}

/// A reconciler running on its thread.
#[derive(Debug)]
pub struct Running {
    /// Where sources send their inputs.
    pub input: Sender<Input>,
    done: tokio::sync::oneshot::Receiver<anyhow::Result<()>>,
}

impl Running {
    /// Waits (blocking this thread) until the reconciler stops, and returns why.
    pub fn wait(self) -> anyhow::Result<()> {
        self.done.blocking_recv().unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "the reconciler thread stopped unexpectedly"
            ))
        })
    }

    /// Waits until the reconciler stops, and returns why.
    pub async fn finished(&mut self) -> anyhow::Result<()> {
        (&mut self.done).await.unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "the reconciler thread stopped unexpectedly"
            ))
        })
    }
}

/// Starts the reconciler on a thread of its own. It stops on [`Input::Stop`], when every
/// sender is gone (an error: every source ended), after the first sync with
/// [`Options::once`], or on a fatal error.
pub fn spawn<B: Backend + Send + 'static>(
    backend: B,
    options: Options,
    metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
    responders: Option<Responders>,
) -> anyhow::Result<Running> {
    let mut store = Store::new();
    if let Some(name) = &options.node {
        // Until the Node object is listed, this node has no zone label: no topology filtering.
        store.set_node(lb_core::Node::new(name, None).context("node name")?);
    }
    let reconciler = Reconciler {
        dataplane: Dataplane::new(backend, options.compile.clone()),
        store,
        options,
        metrics,
        health,
        responders,
        pending: Vec::new(),
        changes: hooks::ChangeLog::new(SystemTime::now()),
        health_checks: BTreeMap::new(),
        no_local: BTreeMap::new(),
        conntrack_seen: BTreeMap::new(),
        synced_once: false,
    };
    let (input, rx) = std::sync::mpsc::channel();
    let (done_tx, done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("reconciler".into())
        .spawn(move || {
            let mut reconciler = reconciler;
            let result = reconciler.run(&rx);
            // Told before the store and the dataplane are freed: after `run --once` the
            // process exits without waiting for that (a tenth of a second at 10k Services).
            let _ = done_tx.send(result);
            drop(reconciler);
        })
        .context("starting the reconciler thread")?;
    Ok(Running { input, done })
}

/// The conntrack state of a Service's UDP and SCTP ports at the last cleanup.
type ConntrackSeen =
    BTreeMap<ServiceKey, Vec<(lb_core::ServicePortName, crate::conntrack::ServicePortState)>>;

struct Reconciler<B> {
    store: Store,
    dataplane: Dataplane<B>,
    options: Options,
    metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
    responders: Option<Responders>,
    /// Arrival time of every change not yet programmed, for the latency histogram.
    pending: Vec<Instant>,
    changes: hooks::ChangeLog,
    health_checks: BTreeMap<ServiceKey, Vec<(u16, LocalEndpoints)>>,
    no_local: BTreeMap<ServiceKey, [i64; 4]>,
    conntrack_seen: ConntrackSeen,
    /// Whether a sync succeeded yet: until then `explain` cannot speak for the kernel.
    synced_once: bool,
}

/// What to do after an input.
enum Flow {
    Continue,
    Stop,
}

impl<B: Backend> Reconciler<B> {
    fn listed(&self) -> bool {
        [Kind::Service, Kind::Slice, Kind::Node]
            .into_iter()
            .all(|k| self.store.listed(k))
    }

    fn run(&mut self, rx: &Receiver<Input>) -> anyhow::Result<()> {
        let mut last_sync: Option<Instant> = None;
        let mut last_full = Instant::now();
        let mut retry_after: Option<Instant> = None;
        let mut failures = 0u32;
        loop {
            let first = last_sync.is_none();
            let due =
                if !self.listed() || (self.pending.is_empty() && retry_after.is_none() && !first) {
                    None
                } else {
                    let earliest =
                        last_sync.map_or_else(Instant::now, |t| t + self.options.min_sync_period);
                    Some(retry_after.map_or(earliest, |r| r.max(earliest)))
                };
            let full_due = last_full + self.options.full_sync_period;
            let wake = due.map_or(full_due, |d| d.min(full_due));
            match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(input) => {
                    let was_listed = self.listed();
                    if let Flow::Stop = self.take(input) {
                        return Ok(());
                    }
                    // Drain what else is queued, so a burst is one sync.
                    while let Ok(input) = rx.try_recv() {
                        if let Flow::Stop = self.take(input) {
                            return Ok(());
                        }
                    }
                    if !self.pending.is_empty() {
                        self.health.queued();
                    }
                    if !was_listed && self.listed() && self.options.voice == Voice::Log {
                        tracing::info!("every watch has listed once; programming the dataplane");
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => anyhow::bail!("every source ended"),
                Err(RecvTimeoutError::Timeout) => {}
            }
            let now = Instant::now();
            if now >= full_due {
                self.dataplane.request_full_sync();
                last_full = now;
                if !self.listed() {
                    continue;
                }
            } else if due.is_none_or(|d| now < d) {
                continue;
            }
            let started = Instant::now();
            match self.dataplane.sync(&mut self.store) {
                Ok(report) => {
                    failures = 0;
                    retry_after = None;
                    last_sync = Some(Instant::now());
                    self.synced(&report, started, first);
                    if self.options.once {
                        return Ok(());
                    }
                    if report.full {
                        // A full sync's transaction and working memory are freed: return
                        // them now, not over the allocator's next seconds (a daemon's RSS
                        // right after its first sync).
                        crate::memory::release_freed();
                    }
                }
                Err(e) if first && self.options.first_sync_must_succeed => {
                    self.metrics.sync_failures.inc();
                    return Err(anyhow::Error::new(e).context("programming the ruleset"));
                }
                Err(e) => {
                    failures += 1;
                    let backoff = Duration::from_millis(500)
                        .saturating_mul(1u32 << failures.min(8))
                        .min(self.options.sync_period);
                    match self.options.voice {
                        Voice::Plain => eprintln!(
                            "lb-proxy: kernel rejected the change, the previous ruleset keeps serving: {}",
                            crate::error_chain(&e)
                        ),
                        Voice::Log => tracing::warn!(
                            error = %crate::error_chain(&e),
                            retry_in_ms = backoff.as_millis() as u64,
                            "the kernel rejected the sync; the previous ruleset keeps serving"
                        ),
                    }
                    self.metrics.sync_failures.inc();
                    retry_after = Some(Instant::now() + backoff);
                    last_sync = Some(Instant::now());
                }
            }
        }
    }

    /// Takes one input: an event into the store, or a question answered at once.
    fn take(&mut self, input: Input) -> Flow {
        match input {
            Input::Stop => return Flow::Stop,
            Input::Explain((q, reply)) => {
                if !self.synced_once {
                    let _ = reply.send(crate::explain::Explanation::not_synced());
                } else if let Some(snap) = self.store.snapshot() {
                    let mut compile = self.options.compile.clone();
                    if !self.dataplane.service_cidrs().is_empty() {
                        compile.service_cidrs = self.dataplane.service_cidrs().to_vec();
                    }
                    // The ruleset the last apply programmed: the kernel's, after every atomic
                    // apply.
                    let rs = self.dataplane.ruleset();
                    let _ = reply.send(crate::explain::answer_or_report(&rs, &snap, &compile, &q));
                }
            }
            Input::Traffic(reply) => match self.dataplane.service_traffic() {
                Ok(t) => {
                    let _ = reply.send(t);
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "reading the service traffic counters failed")
                }
            },
            Input::Event { arrived, event } => self.apply(arrived, event),
            Input::Batch { arrived, events } => {
                for event in events {
                    self.apply(arrived, event);
                }
            }
        }
        Flow::Continue
    }

    /// Applies one change to the store (or the ServiceCIDRs to the dataplane).
    fn apply(&mut self, arrived: Instant, event: Event) {
        let changed = match event {
            // ServiceCIDRs go to the dataplane (a change is a full sync).
            Event::ServiceCidrs(cidrs) => {
                self.dataplane.set_service_cidrs(cidrs);
                true
            }
            Event::Store { event, trigger } => {
                self.changes.note(&event, trigger, &self.metrics);
                let changed = self.store.apply(event);
                self.health.set_node_eligible(self.store.node_eligible());
                changed
            }
        };
        if changed {
            self.pending.push(arrived);
        }
    }

    /// After a successful sync: latency, metrics, health, then the hooks.
    fn synced(&mut self, report: &SyncReport, started: Instant, first: bool) {
        let acked = Instant::now();
        self.synced_once = true;
        self.metrics.observe_sync(report, started.elapsed());
        for arrived in self.pending.drain(..) {
            let latency = acked.duration_since(arrived);
            self.metrics
                .network_programming_latency
                .observe(latency.as_secs_f64());
            tracing::debug!(
                latency_ms = latency.as_secs_f64() * 1000.0,
                "network programming latency"
            );
        }
        self.changes.programmed(&self.metrics, SystemTime::now());
        self.health.updated();
        // The merged entries of every recompiled Service, read for the hooks a few hundred
        // Services at a time: after a full sync, all of them at once would be another copy of
        // the store (issue 13: peak memory). Conntrack cleanup keeps only UDP and SCTP ports.
        // A Service none of whose ports the hooks read endpoints of (no health check node
        // port, no Local policy, no UDP or SCTP: most of them) is passed with no entries,
        // which gives every hook the same answer without merging its slices.
        let mut conntrack = Vec::new();
        for keys in report.changed_services.chunks(HOOK_CHUNK) {
            let changed: Vec<(ServiceKey, Vec<ServiceEntry>)> = keys
                .iter()
                .map(|k| {
                    let read = self.store.ports(k).iter().any(hooks::reads_endpoints);
                    let entries = if read {
                        self.store.entries(k)
                    } else {
                        Vec::new()
                    };
                    (k.clone(), entries)
                })
                .collect();
            if let Some(node) = self.store.node() {
                hooks::update_health_checks(node, &changed, &mut self.health_checks);
                hooks::update_no_local_endpoints(node, &changed, &mut self.no_local);
            }
            if self.options.conntrack_cleanup {
                conntrack.extend(
                    changed
                        .iter()
                        .map(|(k, entries)| (k.clone(), hooks::conntrack_states(entries))),
                );
            }
        }
        if self.store.node().is_some() {
            hooks::publish_no_local_endpoints(&self.no_local, &self.metrics);
        }
        if let Some(r) = &mut self.responders {
            let wanted = self
                .health_checks
                .iter()
                .flat_map(|(k, v)| {
                    v.iter()
                        .map(move |&(port, n)| (port, (k.namespace.clone(), k.name.clone(), n)))
                })
                .collect();
            r.runtime.block_on(r.servers.sync(&wanted));
        }
        if self.options.conntrack_cleanup {
            hooks::clean_conntrack(
                conntrack,
                &mut self.conntrack_seen,
                &self.metrics,
                self.options.voice,
            );
        }
        if report.affinity_purged > 0 {
            tracing::debug!(
                purged = report.affinity_purged,
                "deleted ClientIP affinity entries of endpoints that left"
            );
        }
        report_sync(self.options.voice, report, first);
    }
}

/// How many changed Services' entries the hooks after a sync get at a time.
const HOOK_CHUNK: usize = 512;

/// Reports a successful sync in `voice`.
fn report_sync(voice: Voice, r: &SyncReport, first: bool) {
    match voice {
        Voice::Plain if first => eprintln!(
            "lb-proxy: programmed {} service ports ({} commands, {} elements) in {:?} + {:?}",
            r.service_ports, r.commands, r.elements, r.compute, r.apply
        ),
        Voice::Plain if r.commands > 0 => eprintln!(
            "lb-proxy: applied {} service ports ({} commands, {} elements{}) in {:?} + {:?}",
            r.service_ports,
            r.commands,
            r.elements,
            if r.full { ", full" } else { "" },
            r.compute,
            r.apply
        ),
        Voice::Plain => {}
        Voice::Log if r.full => tracing::info!(
            service_ports = r.service_ports,
            elements = r.elements,
            compute_ms = r.compute.as_secs_f64() * 1000.0,
            apply_ms = r.apply.as_secs_f64() * 1000.0,
            "full sync"
        ),
        Voice::Log if r.commands > 0 => tracing::debug!(
            full = r.full,
            service_ports = r.service_ports,
            commands = r.commands,
            elements = r.elements,
            compute_ms = r.compute.as_secs_f64() * 1000.0,
            apply_ms = r.apply.as_secs_f64() * 1000.0,
            "synced"
        ),
        Voice::Log => {}
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU16;

    use lb_core::{Conditions, IpFamily, Protocol, ServicePort, TrafficPolicy};

    use super::*;
    use crate::convert::{Slice, SlicePort};
    use crate::metrics::NoLocalLabels;
    use crate::nft::fake::Fake;
    use crate::store::{Event as E, NodeState};

    fn options(voice: Voice) -> Options {
        Options {
            compile: CompileConfig::default(),
            node: None,
            min_sync_period: Duration::ZERO,
            sync_period: Duration::from_secs(1),
            full_sync_period: Duration::from_secs(3600),
            conntrack_cleanup: false,
            once: true,
            first_sync_must_succeed: true,
            voice,
        }
    }

    /// A reconciler on the fake backend, with its metrics and health.
    fn start(voice: Voice) -> (Running, Arc<Metrics>, Arc<ProxyHealth>) {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let health = Arc::new(ProxyHealth::new(Duration::from_secs(60)));
        let running = spawn(
            Fake::default(),
            options(voice),
            metrics.clone(),
            health.clone(),
            None,
        )
        .expect("reconciler thread");
        (running, metrics, health)
    }

    fn key() -> ServiceKey {
        ServiceKey {
            namespace: "ns".into(),
            name: "web".into(),
        }
    }

    /// One Service with `internalTrafficPolicy: Local` whose only endpoint is on node-b.
    fn relist(node: bool) -> Vec<Input> {
        relist_events(node).into_iter().map(Input::now).collect()
    }

    fn relist_events(node: bool) -> Vec<StoreEvent> {
        let port = ServicePort::builder("ns", "web", "http", Protocol::Tcp, 80)
            .cluster_ips(["10.96.0.1"])
            .internal_traffic_policy(TrafficPolicy::Local)
            .build()
            .expect("valid port");
        let endpoint = lb_core::Endpoint::builder("10.244.2.7", 1)
            .conditions(Conditions::READY)
            .node_name("node-b")
            .build()
            .expect("valid endpoint");
        let slice = Slice {
            service: key(),
            family: IpFamily::V4,
            ports: vec![SlicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: NonZeroU16::new(8080).expect("non-zero"),
            }],
            endpoints: vec![endpoint],
        };
        let mut events = vec![
            StoreEvent::Service(E::Init),
            StoreEvent::Service(E::InitApply(key(), vec![port])),
            StoreEvent::Service(E::InitDone),
            StoreEvent::Slice(E::Init),
            StoreEvent::Slice(E::InitApply(("ns".into(), "web-1".into()), slice)),
            StoreEvent::Slice(E::InitDone),
        ];
        if node {
            let state = NodeState {
                node: lb_core::Node::new("node-a", None).expect("valid node"),
                eligible: true,
            };
            events.extend([
                StoreEvent::Node(E::Init),
                StoreEvent::Node(E::InitApply("node-a".into(), state)),
                StoreEvent::Node(E::InitDone),
            ]);
        }
        events
    }

    fn no_local_internal_v4(metrics: &Metrics) -> i64 {
        metrics
            .no_local_endpoints
            .get_or_create(&NoLocalLabels {
                ip_family: "IPv4",
                traffic_policy: "internal",
            })
            .get()
    }

    #[test]
    fn nothing_is_programmed_before_every_kind_has_listed_once() {
        let (mut running, metrics, _) = start(Voice::Log);
        for i in relist(false) {
            running.input.send(i).expect("reconciler running");
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            running.done.try_recv().is_err(),
            "with `once`, a sync would have ended the reconciler"
        );
        assert_eq!(no_local_internal_v4(&metrics), 0);
        for i in relist(true).into_iter().skip(6) {
            running.input.send(i).expect("reconciler running");
        }
        running.wait().expect("the sync succeeds");
        assert_eq!(no_local_internal_v4(&metrics), 1);
    }

    #[test]
    fn the_post_sync_hooks_run_in_both_modes() {
        for voice in [Voice::Plain, Voice::Log] {
            let (running, metrics, health) = start(voice);
            for i in relist(true) {
                running.input.send(i).expect("reconciler running");
            }
            running.wait().expect("the sync succeeds");
            assert_eq!(no_local_internal_v4(&metrics), 1, "{voice:?}");
            assert!(health.body(true).healthy, "{voice:?}");
        }
    }

    #[test]
    fn the_hooks_see_every_service_of_a_sync_larger_than_one_chunk() {
        // Each Service like `relist`'s: internalTrafficPolicy Local, its endpoint elsewhere.
        let n = 2 * HOOK_CHUNK + 100;
        let mut events = Vec::new();
        for event in relist_events(true) {
            match event {
                StoreEvent::Service(E::InitApply(_, ports)) => {
                    for i in 0..n {
                        let key = ServiceKey {
                            namespace: "ns".into(),
                            name: format!("web-{i}"),
                        };
                        let port = ServicePort::builder("ns", &key.name, "http", Protocol::Tcp, 80)
                            .cluster_ips([format!("10.96.{}.{}", i / 250, i % 250 + 1)])
                            .internal_traffic_policy(TrafficPolicy::Local)
                            .build()
                            .expect("valid port");
                        assert_eq!(ports.len(), 1);
                        events.push(StoreEvent::Service(E::InitApply(key, vec![port])));
                    }
                }
                StoreEvent::Slice(E::InitApply(_, slice)) => {
                    for i in 0..n {
                        let mut slice = slice.clone();
                        slice.service.name = format!("web-{i}");
                        let key = ("ns".to_string(), format!("web-{i}-1"));
                        events.push(StoreEvent::Slice(E::InitApply(key, slice)));
                    }
                }
                other => events.push(other),
            }
        }
        let (running, metrics, _) = start(Voice::Log);
        for e in events {
            running
                .input
                .send(Input::now(e))
                .expect("reconciler running");
        }
        running.wait().expect("the sync succeeds");
        assert_eq!(no_local_internal_v4(&metrics), n as i64);
    }

    #[test]
    fn live_explain_says_not_synced_until_the_first_sync() {
        let (running, _, _) = start(Voice::Log);
        let q = crate::health::parse_explain_query("to=10.96.0.1:80&from=10.244.0.5")
            .expect("a valid query");
        let (tx, rx) = tokio::sync::oneshot::channel();
        running
            .input
            .send(Input::Explain((q, tx)))
            .expect("reconciler running");
        let answer = rx.blocking_recv().expect("an answer");
        assert_eq!(answer, crate::explain::Explanation::not_synced());
        running.input.send(Input::Stop).expect("reconciler running");
        running.wait().expect("stopped cleanly");
    }
}
