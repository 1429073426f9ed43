//! The command line: raw arguments parsed by `clap`, validated into a [`Config`], then run.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use lb_core::IpFamily;

use crate::compile::{self, Config};
use crate::conntrack::ServicePorts;
use crate::convert::Filter;
use crate::manifests::{ManifestError, Sources};
use crate::metrics::{IgnoredLabel, KindLabel, Metrics};
use crate::nft::ir::Ruleset;
use crate::nft::{Backend, Transaction};
use crate::store::Store;
use crate::sync::Dataplane;

/// A kube-proxy replacement: Kubernetes Services compiled into nftables over netlink.
#[derive(Debug, Parser)]
#[command(name = "lb-proxy", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the nftables ruleset for the given manifests (`nft -f` syntax); touches nothing.
    /// Exits non-zero, printing nothing, when any input was skipped (unless `--keep-going`).
    Render {
        /// The manifests and node settings.
        #[command(flatten)]
        manifests: ManifestArgs,
        /// Render what is valid even when some inputs were skipped (never when read errors
        /// leave no Service at all).
        #[arg(long)]
        keep_going: bool,
    },
    /// Program the current network namespace from the manifests, then follow changes to the
    /// files and apply them incrementally (until interrupted, or once with `--once`).
    Run {
        /// The manifests and node settings.
        #[command(flatten)]
        manifests: ManifestArgs,
        /// Apply once and exit. Exits non-zero, programming nothing, when any input was
        /// skipped (unless `--keep-going`).
        #[arg(long)]
        once: bool,
        /// With `--once`: program what is valid even when some inputs were skipped (never an
        /// empty ruleset because of read errors).
        #[arg(long)]
        keep_going: bool,
        /// How often to look for changed manifest files.
        #[arg(long, default_value = "500ms", value_parser = parse_duration)]
        poll: Duration,
        /// How long a changed file must stay unchanged before it is read, so a file being
        /// written is never read half-way (default: twice `--poll`).
        #[arg(long, value_parser = parse_duration)]
        settle: Option<Duration>,
        /// Serve Prometheus `/metrics` on this address (e.g. 127.0.0.1:10249): syncs, and
        /// the inputs skipped, failing or ignored.
        #[arg(long)]
        metrics_bind_address: Option<std::net::SocketAddr>,
        /// Keep stale UDP/SCTP conntrack entries after a sync (by default they are deleted, so
        /// clients do not stay on removed endpoints; see `conntrack`).
        #[arg(long)]
        no_conntrack_cleanup: bool,
    },
    /// Run as the node's service proxy: watch the cluster's Services, EndpointSlices and this
    /// node, and keep the dataplane in this network namespace in sync, until SIGTERM.
    Daemon(DaemonArgs),
    /// Explain what happens to a connection: which Service port it hits, which endpoints may
    /// serve it on this node and why the others may not, masquerading, affinity.
    Explain {
        /// The manifests and node settings.
        #[command(flatten)]
        manifests: ManifestArgs,
        /// Destination: ADDR:PORT[/PROTO] (IPv6: [ADDR]:PORT), PROTO tcp (default), udp, sctp.
        #[arg(long)]
        to: String,
        /// Source address of the client.
        #[arg(long)]
        from: IpAddr,
        /// The client is the node itself (host network).
        #[arg(long)]
        from_node: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Ask the running daemon instead of reading manifests: its metrics address
        /// (`ADDR:PORT`, e.g. 127.0.0.1:10249).
        #[arg(long)]
        live: Option<std::net::SocketAddr>,
    },
    /// Remove everything lb-proxy installed in the current network namespace.
    Cleanup {
        /// Name of the nftables tables.
        #[arg(long, default_value = compile::TABLE)]
        table: String,
    },
}

/// Settings of the daemon. Flags override the `--config` file; unset flags fall back to the
/// file, then to kube-proxy's defaults.
#[derive(Debug, Args, Clone)]
pub struct DaemonArgs {
    /// A `KubeProxyConfiguration` file (kubeproxy.config.k8s.io/v1alpha1).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Remove everything lb-proxy installed and exit (like `kube-proxy --cleanup`).
    #[arg(long)]
    pub cleanup: bool,
    /// Kubeconfig file (default: KUBECONFIG, ~/.kube/config, or the in-cluster service account).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name, as the Node object is named (`hostnameOverride`).
    #[arg(long = "node", alias = "hostname-override", env = "NODE_NAME")]
    pub node: Option<String>,
    /// Pod CIDRs, comma-separated (`clusterCIDR`).
    #[arg(long)]
    pub cluster_cidr: Option<String>,
    /// CIDRs of the addresses that accept NodePort traffic, comma-separated
    /// (`nodePortAddresses`; default: every local address but loopback).
    #[arg(long)]
    pub nodeport_addresses: Option<String>,
    /// Masquerade all traffic to cluster IPs (`nftables.masqueradeAll`).
    #[arg(long)]
    pub masquerade_all: bool,
    /// Mark bit that requests masquerading (`nftables.masqueradeBit`, default 14).
    #[arg(long)]
    pub masquerade_bit: Option<i64>,
    /// Name of the nftables tables.
    #[arg(long, default_value = compile::TABLE)]
    pub table: String,
    /// Handle only objects labelled `service.kubernetes.io/service-proxy-name=<this>`.
    #[arg(long)]
    pub service_proxy_name: Option<String>,
    /// Minimum interval between syncs, Go syntax (`nftables.minSyncPeriod`, default 1s; 0
    /// syncs every change at once).
    #[arg(long)]
    pub min_sync_period: Option<String>,
    /// Retry interval after a failed sync; health fails after twice this
    /// (`nftables.syncPeriod`, default 30s).
    #[arg(long)]
    pub sync_period: Option<String>,
    /// Interval between full resyncs (which also repair rules changed by others).
    #[arg(long, default_value = "60m", value_parser = parse_duration)]
    pub full_sync_period: Duration,
    /// Address of `/healthz` and `/livez` (`healthzBindAddress`, default 0.0.0.0:10256; empty
    /// disables).
    #[arg(long)]
    pub healthz_bind_address: Option<String>,
    /// Address of `/metrics` and `/explain` (`metricsBindAddress`, default 127.0.0.1:10249;
    /// empty disables).
    #[arg(long)]
    pub metrics_bind_address: Option<String>,
    /// Address the healthCheckNodePort responders listen on (`bindAddress`, default 0.0.0.0).
    #[arg(long)]
    pub bind_address: Option<String>,
    /// Do not delete stale UDP/SCTP conntrack entries after endpoint changes.
    #[arg(long)]
    pub no_conntrack_cleanup: bool,
}

/// Where the objects come from and how this node is set up.
#[derive(Debug, Args, Clone)]
pub struct ManifestArgs {
    /// YAML or JSON files or directories with Services, EndpointSlices and Nodes, in the shapes
    /// `kubectl get -o yaml` prints (multi-document and `List` included).
    #[arg(long = "manifests", short = 'f', num_args = 1..)]
    pub paths: Vec<PathBuf>,
    /// This node's name (defaults to the only Node in the manifests).
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,
    /// Pod CIDRs, comma-separated (kube-proxy's `--cluster-cidr`).
    #[arg(long, value_delimiter = ',')]
    pub cluster_cidr: Vec<IpNet>,
    /// CIDRs of the addresses that accept NodePort traffic (default: every local address but
    /// loopback).
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<IpNet>,
    /// Masquerade all traffic to cluster IPs.
    #[arg(long)]
    pub masquerade_all: bool,
    /// Mark bit that requests masquerading.
    #[arg(long, default_value_t = 14, value_parser = clap::value_parser!(u8).range(0..=31))]
    pub masquerade_bit: u8,
    /// Name of the nftables tables.
    #[arg(long, default_value = compile::TABLE)]
    pub table: String,
    /// Handle only objects labelled `service.kubernetes.io/service-proxy-name=<this>`.
    #[arg(long)]
    pub service_proxy_name: Option<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(format!("invalid duration unit in {s:?} (use ms, s or m)")),
    })
}

impl ManifestArgs {
    fn config(&self) -> Config {
        Config {
            cluster_cidrs: self.cluster_cidr.clone(),
            masquerade_all: self.masquerade_all,
            masquerade_bit: self.masquerade_bit,
            nodeport_cidrs: (!self.nodeport_addresses.is_empty())
                .then(|| self.nodeport_addresses.clone()),
            table: self.table.clone(),
        }
    }

    fn filter(&self) -> Filter {
        Filter {
            service_proxy_name: self.service_proxy_name.clone(),
        }
    }

    /// Looks at the manifests (see [`Sources::refresh`] for `settle`) and, if they changed,
    /// loads them into `store` (replacing what it held, as a re-list would). Problems are
    /// reported on stderr (ignored objects once each) and counted in `metrics`.
    fn load(
        &self,
        sources: &mut Sources,
        store: &mut Store,
        settle: Option<Duration>,
        metrics: Option<&Metrics>,
    ) -> anyhow::Result<Load> {
        let filter = self.filter();
        let first = store.node().is_none();
        let r = sources.refresh(&filter, settle);
        let mut read_errors = 0;
        for e in &r.errors {
            eprintln!("lb-proxy: skipped: {e}");
            let kind = match e {
                ManifestError::File { .. } => {
                    read_errors += 1;
                    continue;
                }
                ManifestError::Object { kind, .. } => kind.as_str(),
                ManifestError::Invalid { source, .. } => source.kind,
            };
            if let Some(m) = metrics {
                let kind = match kind {
                    "Service" => "Service",
                    "EndpointSlice" => "EndpointSlice",
                    _ => "Node",
                };
                m.invalid_objects.get_or_create(&KindLabel { kind }).inc();
            }
        }
        for (file, n) in &r.removed {
            eprintln!("lb-proxy: {file} was removed: deleting the {n} objects read from it");
        }
        if let Some(m) = metrics {
            m.manifest_read_errors.inc_by(read_errors);
            m.manifest_sources_failing
                .set(i64::try_from(sources.failing()).unwrap_or(i64::MAX));
        }
        let load = Load {
            changed: r.changed,
            problems: r.errors.len(),
            read_errors: read_errors > 0,
        };
        if !r.changed && !first {
            return Ok(load);
        }
        let (objects, mut ignored) = sources.objects();
        let loaded = objects.replace_in(store, self.node.as_deref(), &filter);
        // Invalid objects were reported when their file was read (and kept their last good
        // version), so `loaded.invalid` holds nothing new.
        for mut i in loaded.ignored {
            i.file = sources.file_of(&i.kind, &i.name).unwrap_or_default();
            ignored.push(i);
        }
        for i in sources.newly_ignored(ignored) {
            eprintln!("lb-proxy: {i}");
            if let Some(m) = metrics {
                m.ignored_objects
                    .get_or_create(&IgnoredLabel { kind: i.kind })
                    .inc();
            }
        }
        if store.node().is_none() {
            bail!("no node: pass --node NAME (or NODE_NAME), or give exactly one Node object");
        }
        Ok(load)
    }

    /// Reads the manifests once into a new store: an error for a missing path, for any
    /// skipped input unless `keep_going`, and always for read errors that leave no Service.
    fn load_once(&self, keep_going: bool) -> anyhow::Result<Store> {
        let mut sources = Sources::new(&self.paths);
        sources.check_paths().map_err(anyhow::Error::msg)?;
        let mut store = Store::new();
        let load = self.load(&mut sources, &mut store, None, None)?;
        if load.problems > 0 && !keep_going {
            bail!(
                "{} inputs skipped (see above), so nothing was done: fix them, or pass --keep-going to use the rest",
                load.problems
            );
        }
        if load.read_errors && store.service_count() == 0 {
            bail!("manifests could not be read and no Service was: refusing to use an empty set");
        }
        Ok(store)
    }

    /// The desired ruleset for the manifests as they are now (what is valid of them).
    pub fn desired(&self) -> anyhow::Result<Ruleset> {
        self.desired_checked(true)
    }

    /// The desired ruleset; an error when any input was skipped, unless `keep_going`.
    fn desired_checked(&self, keep_going: bool) -> anyhow::Result<Ruleset> {
        let store = self.load_once(keep_going)?;
        let snap = store.snapshot().context("node unknown")?;
        let config = self.config();
        let mut rs = Ruleset::default();
        for family in [IpFamily::V4, IpFamily::V6] {
            let (id, table, _stats) = compile::compile(&snap, &config, family);
            rs.tables.insert(id, table);
        }
        Ok(rs)
    }
}

/// What one [`ManifestArgs::load`] found.
#[derive(Debug, Clone, Copy)]
struct Load {
    /// The objects changed (the store was reloaded).
    changed: bool,
    /// Inputs skipped: files not read, objects invalid (each kept its last good state).
    problems: usize,
    /// Some file or path could not be read or parsed.
    read_errors: bool,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Render {
            manifests,
            keep_going,
        } => {
            let rs = manifests.desired_checked(keep_going)?;
            let text = Transaction::create(&rs).to_nft();
            std::io::stdout()
                .write_all(text.as_bytes())
                .context("writing to stdout")?;
            Ok(())
        }
        Command::Run {
            manifests,
            once,
            keep_going,
            poll,
            settle,
            metrics_bind_address,
            no_conntrack_cleanup,
        } => run_manifests(
            &manifests,
            &RunOptions {
                once,
                keep_going,
                poll,
                settle: settle.unwrap_or(poll * 2),
                metrics_bind_address,
                conntrack_cleanup: !no_conntrack_cleanup,
            },
        ),
        Command::Cleanup { table } => cleanup(&table),
        Command::Explain {
            manifests,
            to,
            from,
            from_node,
            json,
            live,
        } => {
            let (to_ip, port, protocol) =
                crate::explain::parse_destination(&to).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
            if let Some(addr) = live {
                let path = format!("/explain?to={to}&from={from}&fromNode={from_node}");
                let (status, body) = http_get(addr, &path)?;
                if status != 200 {
                    bail!("{addr}{path}: HTTP {status}: {}", body.trim());
                }
                if json {
                    println!("{}", body.trim());
                } else {
                    let e: crate::explain::Explanation =
                        serde_json::from_str(&body).context("decoding the daemon's answer")?;
                    print!("{e}");
                }
                return Ok(());
            }
            let to = to_ip;
            let store = manifests.load_once(true)?;
            let snap = store.snapshot().context("node unknown")?;
            let q = crate::explain::Query {
                to,
                port,
                protocol,
                from,
                from_node,
                to_node: true,
            };
            let e = crate::explain::explain(&snap, &manifests.config(), &q);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&e).context("encoding JSON")?
                );
            } else {
                print!("{e}");
            }
            Ok(())
        }
        Command::Daemon(args) => daemon(args),
    }
}

fn daemon(args: DaemonArgs) -> anyhow::Result<()> {
    init_logging();
    if args.cleanup {
        return cleanup(&args.table);
    }
    let file = args
        .config
        .as_ref()
        .map(crate::config::KubeProxyConfiguration::read)
        .transpose()
        .context("invalid configuration")?;
    let overrides = crate::config::Overrides {
        kubeconfig: args.kubeconfig.clone(),
        node: args.node.clone(),
        cluster_cidr: args.cluster_cidr.clone(),
        nodeport_addresses: args.nodeport_addresses.clone(),
        masquerade_all: args.masquerade_all.then_some(true),
        masquerade_bit: args.masquerade_bit,
        min_sync_period: args.min_sync_period.clone(),
        sync_period: args.sync_period.clone(),
        healthz_bind_address: args.healthz_bind_address.clone(),
        metrics_bind_address: args.metrics_bind_address.clone(),
        bind_address: args.bind_address.clone(),
    };
    let s = crate::config::resolve(file.as_ref(), &overrides).context("invalid configuration")?;
    for problem in crate::config::apply_conntrack_sysctls(&s.conntrack) {
        tracing::warn!(problem, "could not set a conntrack sysctl");
    }
    let config = crate::daemon::DaemonConfig {
        kubeconfig: s.kubeconfig,
        node: s.node,
        compile: Config {
            cluster_cidrs: s.cluster_cidrs,
            masquerade_all: s.masquerade_all,
            masquerade_bit: s.masquerade_bit,
            nodeport_cidrs: s.nodeport_cidrs,
            table: args.table.clone(),
        },
        service_proxy_name: args.service_proxy_name.clone(),
        min_sync_period: s.min_sync_period,
        sync_period: s.sync_period,
        full_sync_period: args.full_sync_period,
        healthz_bind: s.healthz_bind,
        metrics_bind: s.metrics_bind,
        health_check_bind: s.health_check_bind,
        conntrack_cleanup: !args.no_conntrack_cleanup,
    };
    let backend = netlink()?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new(&mut registry));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let registry = std::sync::Arc::new(registry);
    runtime.block_on(crate::daemon::run(
        config,
        backend,
        metrics,
        registry,
        shutdown_signal(),
    ))
}

/// A plain HTTP/1.0 GET on a local address: (status, body).
fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::Read as _;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .context("socket timeout")?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").context("sending the request")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).context("reading the answer")?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{addr}: not an HTTP answer"))?;
    Ok((status, body.to_string()))
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

/// Structured logs on stderr; `RUST_LOG` overrides the default level (`info`: start-up, full
/// syncs, warnings).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,kube=warn,tower=warn,hyper=warn")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn netlink() -> anyhow::Result<crate::nft::netlink::Netlink> {
    crate::nft::netlink::Netlink::new().context("opening the netfilter netlink socket")
}

fn cleanup(table: &str) -> anyhow::Result<()> {
    let mut backend = netlink()?;
    for family in [crate::nft::ir::Family::Ip, crate::nft::ir::Family::Ip6] {
        let id = crate::nft::ir::TableId::new(family, table);
        let tx = Transaction {
            commands: vec![crate::nft::Command::DeleteTable { table: id.clone() }],
        };
        match backend.apply(&tx) {
            Ok(()) => eprintln!("lb-proxy: deleted table {id}"),
            Err(e) => eprintln!("lb-proxy: table {id}: {e}"),
        }
    }
    Ok(())
}

/// How `run` runs.
#[derive(Debug)]
struct RunOptions {
    once: bool,
    keep_going: bool,
    poll: Duration,
    settle: Duration,
    metrics_bind_address: Option<std::net::SocketAddr>,
    conntrack_cleanup: bool,
}

/// `run`: program the node from the manifests, then follow them. Bad inputs keep what they
/// last produced ([`Sources`]); a sync happens only when what was read changed, and never
/// empties the dataplane because of read errors.
fn run_manifests(args: &ManifestArgs, opts: &RunOptions) -> anyhow::Result<()> {
    let mut sources = Sources::new(&args.paths);
    sources.check_paths().map_err(anyhow::Error::msg)?;
    let metrics = opts
        .metrics_bind_address
        .map(serve_run_metrics)
        .transpose()?;
    let metrics = metrics.as_deref();
    let mut dataplane = Dataplane::new(netlink()?, args.config());
    let mut store = Store::new();
    let load = args.load(&mut sources, &mut store, None, metrics)?;
    if opts.once && load.problems > 0 && !opts.keep_going {
        bail!(
            "{} inputs skipped (see above), so nothing was programmed: fix them, or pass --keep-going to program the rest",
            load.problems
        );
    }
    let mut pending_empty = load.read_errors && store.service_count() == 0;
    if pending_empty {
        if opts.once {
            bail!(
                "manifests could not be read and no Service was: refusing to program an empty ruleset"
            );
        }
        eprintln!(
            "lb-proxy: manifests could not be read and no Service was: not programming an empty ruleset; waiting for readable manifests"
        );
    }
    let mut tracked = ServicePorts::new();
    if !pending_empty {
        let report = dataplane
            .sync(&mut store)
            .context("programming the ruleset")?;
        if let Some(m) = metrics {
            m.observe_sync(&report, report.compute + report.apply);
        }
        eprintln!(
            "lb-proxy: programmed {} service ports ({} commands, {} elements) in {:?} + {:?}",
            report.service_ports, report.commands, report.elements, report.compute, report.apply
        );
        if opts.conntrack_cleanup {
            clean_conntrack(&store, &mut tracked);
        }
    }
    if opts.once {
        return Ok(());
    }
    loop {
        std::thread::sleep(opts.poll);
        let load = match args.load(&mut sources, &mut store, Some(opts.settle), metrics) {
            Ok(load) => load,
            Err(e) => {
                eprintln!("lb-proxy: keeping the current ruleset: {e:#}");
                continue;
            }
        };
        if !load.changed && !pending_empty {
            continue;
        }
        if pending_empty {
            if store.service_count() == 0 && sources.failing() > 0 {
                continue;
            }
            pending_empty = false;
        }
        let synced = dataplane.sync(&mut store);
        match &synced {
            Ok(r) if r.commands == 0 => {}
            Ok(r) => {
                if let Some(m) = metrics {
                    m.observe_sync(r, r.compute + r.apply);
                }
                eprintln!(
                    "lb-proxy: applied {} service ports ({} commands, {} elements{}) in {:?} + {:?}",
                    r.service_ports,
                    r.commands,
                    r.elements,
                    if r.full { ", full" } else { "" },
                    r.compute,
                    r.apply
                )
            }
            Err(e) => {
                if let Some(m) = metrics {
                    m.sync_failures.inc();
                }
                eprintln!(
                    "lb-proxy: kernel rejected the change, the previous ruleset keeps serving: {e}"
                )
            }
        }
        if synced.is_ok() && opts.conntrack_cleanup {
            clean_conntrack(&store, &mut tracked);
        }
    }
}

/// Serves `/metrics` for `run` on a thread of its own.
fn serve_run_metrics(addr: std::net::SocketAddr) -> anyhow::Result<std::sync::Arc<Metrics>> {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = std::sync::Arc::new(Metrics::new(&mut registry));
    let registry = std::sync::Arc::new(registry);
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("--metrics-bind-address {addr}"))?;
    listener.set_nonblocking(true).context("metrics listener")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the metrics server")?;
    std::thread::spawn(move || {
        runtime.block_on(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => {
                    let _ = crate::health::serve_metrics(l, registry, None, None).await;
                }
                Err(e) => eprintln!("lb-proxy: metrics server: {e}"),
            }
        });
    });
    Ok(metrics)
}

/// Conntrack cleanup after a successful sync ([`crate::conntrack`]): deletes the UDP/SCTP
/// flows that would keep clients on a removed endpoint, or on a service address that had no
/// endpoints. `previous` advances only when the cleanup succeeds, so a failed one is retried
/// after the next sync.
fn clean_conntrack(store: &Store, previous: &mut ServicePorts) {
    let Some(snapshot) = store.snapshot() else {
        return;
    };
    let next = ServicePorts::from_snapshot(&snapshot);
    let started = std::time::Instant::now();
    match crate::conntrack::cleanup(previous, &next) {
        Ok(0) => {}
        Ok(n) => eprintln!(
            "lb-proxy: conntrack: deleted {n} stale UDP/SCTP flows in {:?}",
            started.elapsed()
        ),
        Err(e) => {
            eprintln!(
                "lb-proxy: conntrack cleanup failed, retrying after the next sync: {:#}",
                anyhow::Error::new(e)
            );
            return;
        }
    }
    *previous = next;
}
