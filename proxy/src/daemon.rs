//! The node daemon, wired: the API server source ([`crate::source::api`]) feeds the
//! reconciler ([`crate::reconcile`]), which programs the dataplane; beside them the health
//! (`/healthz`, `/livez`) and metrics (`/metrics`, `/configz`, `/flagz`, `/explain`) servers.
//!
//! * **Start-up** ([`main`]): the effective configuration, the privileged settings (conntrack
//!   sysctls, `oom_score_adj`), the check that kube-proxy does not program this node too, then
//!   [`run`] on a two-worker async runtime (watches and HTTP); kernel work runs on the
//!   reconciler's own thread.
//! * **Logs**: one start-up summary line; the rest comes from the source and the reconciler.
//! * **Network programming latency** — from the moment a change arrives to the moment the
//!   kernel acknowledged its rules — is observed in a histogram and logged at debug level;
//!   kube-proxy's `kubeproxy_network_programming_duration_seconds` is measured from an
//!   EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time` instead.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::mpsc;

use crate::compile::Config as CompileConfig;
use crate::health::{ProxyHealth, ServiceHealthServers};
use crate::metrics::Metrics;
use crate::nft::Backend;
use crate::reconcile::{self, Input, Options, Responders, Voice};
use crate::source::api;

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
    /// First lists are streaming lists when the API server offers them (the `WatchListClient`
    /// feature gate, default on); false lists in pages only.
    pub watch_list: bool,
    /// Where the configuration came from, for the start-up summary.
    pub source: String,
    /// The effective `KubeProxyConfiguration`, for `/configz`.
    pub configz: serde_json::Value,
    /// Every flag and its value, for `/flagz`.
    pub flagz: Vec<(String, String)>,
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
    let (client, api_server) =
        api::client(config.kubeconfig.as_ref(), config.master.as_deref()).await?;
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
    let options = Options {
        compile: config.compile.clone(),
        node: Some(config.node.clone()),
        min_sync_period: config.min_sync_period,
        sync_period: config.sync_period,
        full_sync_period: config.full_sync_period,
        conntrack_cleanup: config.conntrack_cleanup,
        once: false,
        first_sync_must_succeed: false,
        voice: Voice::Log,
    };
    let responders = Responders {
        servers: ServiceHealthServers::new(health.clone(), config.health_check_bind),
        runtime: tokio::runtime::Handle::current(),
    };
    let mut reconciler =
        reconcile::spawn(backend, options, metrics.clone(), health, Some(responders))?;
    // The HTTP handlers' questions go to the reconciler, which owns the store and the backend.
    let input = reconciler.input.clone();
    servers.push(tokio::spawn(async move {
        let (mut explain, mut traffic) = (explain_rx, traffic_rx);
        loop {
            let next = tokio::select! {
                Some(q) = explain.recv() => Input::Explain(q),
                Some(r) = traffic.recv() => Input::Traffic(r),
                else => return,
            };
            if input.send(next).is_err() {
                return;
            }
        }
    }));
    let watches = api::Watches {
        node: config.node.clone(),
        service_proxy_name: config.service_proxy_name.clone(),
        watch_list: config.watch_list,
    };
    let tasks = api::spawn(
        &client,
        &watches,
        &reconciler.input,
        &metrics,
        &Arc::from(api_server),
    );
    let result = tokio::select! {
        r = reconciler.finished() => r,
        Some(e) = bind_failed.recv() => Err(e),
        () = shutdown => {
            tracing::info!("shutting down; the dataplane stays in place");
            Ok(())
        }
    };
    for t in tasks.into_iter().chain(servers) {
        t.abort();
    }
    // Let a sync in progress finish (the kernel applies a batch whole either way).
    let _ = reconciler.input.send(Input::Stop);
    let _ = tokio::time::timeout(Duration::from_secs(5), reconciler.finished()).await;
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

pub use crate::config::Launch;

/// Logs on stderr: text (ANSI colours only when stderr is a terminal and `NO_COLOR` is
/// unset) or JSON lines. `verbosity` is klog's `--v`, mapped onto tracing levels:
///
/// | `--v` | lb-proxy | Kubernetes client and HTTP libraries |
/// | --- | --- | --- |
/// | 0–1 | info: start-up, full syncs, warnings | warn |
/// | 2–3 | debug: every sync, programming latency, conntrack cleanup | warn |
/// | 4 | debug | debug (requests, watch restarts) |
/// | 5+ | trace | trace |
///
/// `RUST_LOG` (tracing's `EnvFilter` syntax) overrides the mapping.
pub fn init_logging(verbosity: u32, format: crate::config::LogFormat) {
    use std::io::IsTerminal as _;
    // Below 4, the Kubernetes client's own request errors are off: every one of them also
    // ends a watch, which lb-proxy logs once with the API server's address (the client would
    // log each retry).
    let default = match verbosity {
        0..=1 => "info,kube=warn,kube_client=off,kube_runtime=error,tower=warn,hyper=warn",
        2..=3 => {
            "info,lb_proxy=debug,kube=warn,kube_client=off,kube_runtime=error,tower=warn,hyper=warn"
        }
        4 => "debug,tower=info,hyper=info,rustls=info",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        crate::config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        crate::config::LogFormat::Text => {
            let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_ansi(ansi).try_init()
        }
    };
}

/// Starts the daemon from resolved settings (logging is initialised): writes the effective
/// configuration (`--write-config-to`), applies the privileged settings, checks for
/// kube-proxy, then runs until SIGTERM or SIGINT.
pub fn main(s: crate::config::Settings, launch: Launch) -> anyhow::Result<()> {
    let configz = s.to_kube_proxy_configuration();
    if let Some(path) = &launch.write_config_to {
        let text = serde_saphyr::to_string(&configz).context("encoding the configuration")?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        tracing::info!(file = %path.display(), "wrote the effective configuration");
        return Ok(());
    }
    if s.cluster_cidrs.is_empty() {
        tracing::warn!(
            "no cluster CIDR (--cluster-cidr, clusterCIDR): pod traffic cannot be told apart, so traffic to cluster IPs from outside the pod network is not masqueraded and pods reaching an externalTrafficPolicy: Local address are not short-circuited to every endpoint"
        );
    }
    set_oom_score_adj(s.oom_score_adj);
    for problem in crate::config::apply_conntrack_sysctls(&s.conntrack) {
        tracing::warn!(problem, "could not set a conntrack sysctl");
    }
    if launch.init_only {
        tracing::info!("initialisation done (--init-only)");
        return Ok(());
    }
    crate::coexist::check(launch.take_over)?;
    let nodeport_addresses = s.nodeport_addresses();
    let config = DaemonConfig {
        kubeconfig: s.kubeconfig,
        master: s.master,
        node: s.node,
        compile: CompileConfig {
            cluster_cidrs: s.cluster_cidrs,
            masquerade_all: s.masquerade_all,
            masquerade_bit: s.masquerade_bit,
            nodeport_addresses,
            service_cidrs: launch.service_cidrs,
            table: launch.table,
            detect_local: s
                .detect_local
                .to_compile(
                    "detectLocal.bridgeInterface",
                    "detectLocal.interfaceNamePrefix",
                )
                .context("invalid configuration")?,
        },
        service_proxy_name: launch.service_proxy_name,
        min_sync_period: s.min_sync_period,
        sync_period: s.sync_period,
        full_sync_period: launch.full_sync_period,
        healthz_bind: s.healthz_bind,
        metrics_bind: s.metrics_bind,
        health_check_bind: s.health_check_bind,
        bind_address_hard_fail: s.bind_address_hard_fail,
        conntrack_cleanup: launch.conntrack_cleanup,
        watch_list: s.watch_list,
        source: s.source,
        configz,
        flagz: launch.flagz,
    };
    let backend = crate::sync::netlink()?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let registry = Arc::new(registry);
    runtime.block_on(run(config, backend, metrics, registry, shutdown_signal()))
}

/// Sets this process's `oom_score_adj` as kube-proxy does (lowering it needs
/// CAP_SYS_RESOURCE: without it, a warning).
fn set_oom_score_adj(value: i32) {
    let path = "/proc/self/oom_score_adj";
    let current = std::fs::read_to_string(path).ok();
    if current.as_deref().map(str::trim) == Some(value.to_string().as_str()) {
        return;
    }
    if let Err(e) = std::fs::write(path, value.to_string()) {
        tracing::warn!(value, error = %e, "could not set oom_score_adj (oomScoreAdj, --oom-score-adj)");
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
