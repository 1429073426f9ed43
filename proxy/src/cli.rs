//! The command line: raw arguments parsed by `clap`, validated into a [`Config`], then run.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use lb_core::IpFamily;

use crate::compile::{self, Config, NodePortAddresses};
use crate::conntrack::ServicePorts;
use crate::convert::Filter;
use crate::manifests::Objects;
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
    Render(ManifestArgs),
    /// Program the current network namespace from the manifests, then follow changes to the
    /// files and apply them incrementally (until interrupted, or once with `--once`).
    Run {
        /// The manifests and node settings.
        #[command(flatten)]
        manifests: ManifestArgs,
        /// Apply once and exit.
        #[arg(long)]
        once: bool,
        /// How often to look for changed manifest files.
        #[arg(long, default_value = "500ms", value_parser = parse_duration)]
        poll: Duration,
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
    /// Addresses that accept NodePort traffic (`nodePortAddresses`): `primary` (the default:
    /// the node's primary addresses from its Node object) or comma-separated CIDRs.
    #[arg(long)]
    pub nodeport_addresses: Option<String>,
    /// Masquerade all traffic to cluster IPs (`nftables.masqueradeAll`).
    #[arg(long)]
    pub masquerade_all: bool,
    /// Cluster IP ranges, comma-separated, used while the cluster has no `networking.k8s.io/v1`
    /// ServiceCIDR objects: traffic to an address inside them that no Service holds is dropped.
    #[arg(long, value_delimiter = ',')]
    pub service_cidr: Vec<IpNet>,
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
    /// Addresses that accept NodePort traffic: `primary` (the default: the Node's primary
    /// addresses, or every local address when the Node lists none) or comma-separated CIDRs
    /// (`0.0.0.0/0,::/0`: every local address).
    #[arg(long, default_value = "primary")]
    pub nodeport_addresses: NodePortAddresses,
    /// Masquerade all traffic to cluster IPs.
    #[arg(long)]
    pub masquerade_all: bool,
    /// Cluster IP ranges, comma-separated, used when the manifests hold no ServiceCIDR object:
    /// traffic to an address inside them that no Service holds is dropped.
    #[arg(long, value_delimiter = ',')]
    pub service_cidr: Vec<IpNet>,
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
            nodeport_addresses: self.nodeport_addresses.clone(),
            service_cidrs: self.service_cidr.clone(),
            table: self.table.clone(),
        }
    }

    /// Re-reads the manifests into `store` (replacing what it held, as a re-list would),
    /// reporting bad objects on stderr. Returns the CIDRs of the ServiceCIDR objects.
    fn reload(&self, store: &mut Store) -> anyhow::Result<Vec<IpNet>> {
        if self.paths.is_empty() {
            bail!("-f/--manifests: give at least one file or directory");
        }
        let (objects, errors) = Objects::read_paths(&self.paths);
        for e in &errors {
            eprintln!("lb-proxy: skipped: {e}");
        }
        let filter = Filter {
            service_proxy_name: self.service_proxy_name.clone(),
        };
        let service_cidrs =
            objects.service_cidrs(&mut |e| eprintln!("lb-proxy: invalid, skipped: {e}"));
        let (invalid, _skipped) = objects.replace_in(store, self.node.as_deref(), &filter);
        for e in &invalid {
            eprintln!("lb-proxy: invalid, skipped: {e}");
        }
        if store.node().is_none() {
            bail!("no node: pass --node NAME (or NODE_NAME), or give exactly one Node object");
        }
        Ok(service_cidrs)
    }

    /// The desired ruleset for the manifests as they are now.
    pub fn desired(&self) -> anyhow::Result<Ruleset> {
        let mut store = Store::new();
        let service_cidrs = self.reload(&mut store)?;
        let snap = store.snapshot().context("node unknown")?;
        let mut config = self.config();
        if !service_cidrs.is_empty() {
            config.service_cidrs = service_cidrs;
        }
        let mut rs = Ruleset::default();
        for family in [IpFamily::V4, IpFamily::V6] {
            let (id, table, _stats) = compile::compile(&snap, &config, family);
            rs.tables.insert(id, table);
        }
        Ok(rs)
    }

    fn newest_mtime(&self) -> Option<SystemTime> {
        let mut newest = None;
        for p in &self.paths {
            let mut consider = |p: &std::path::Path| {
                if let Ok(m) = std::fs::metadata(p).and_then(|m| m.modified()) {
                    newest = newest.max(Some(m));
                }
            };
            consider(p);
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    consider(&e.path());
                }
            }
        }
        newest
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Render(args) => {
            let rs = args.desired()?;
            let text = Transaction::create(&rs).to_nft();
            std::io::stdout()
                .write_all(text.as_bytes())
                .context("writing to stdout")?;
            Ok(())
        }
        Command::Run {
            manifests,
            once,
            poll,
            no_conntrack_cleanup,
        } => run_manifests(&manifests, once, poll, !no_conntrack_cleanup),
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
            let mut store = Store::new();
            let service_cidrs = manifests.reload(&mut store)?;
            let snap = store.snapshot().context("node unknown")?;
            let q = crate::explain::Query {
                to,
                port,
                protocol,
                from,
                from_node,
                to_node: true,
            };
            let mut config = manifests.config();
            if !service_cidrs.is_empty() {
                config.service_cidrs = service_cidrs;
            }
            let e = crate::explain::explain(&snap, &config, &q);
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
            nodeport_addresses: s.nodeport_addresses,
            service_cidrs: args.service_cidr.clone(),
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

fn run_manifests(
    args: &ManifestArgs,
    once: bool,
    poll: Duration,
    conntrack_cleanup: bool,
) -> anyhow::Result<()> {
    let mut dataplane = Dataplane::new(netlink()?, args.config());
    let mut store = Store::new();
    // Read before the manifests are: a file changed while they are read and programmed is
    // then seen as a change (after, it would be missed until the next one).
    let mut seen = args.newest_mtime();
    dataplane.set_service_cidrs(args.reload(&mut store)?);
    let report = dataplane
        .sync(&mut store)
        .context("programming the ruleset")?;
    eprintln!(
        "lb-proxy: programmed {} service ports ({} commands, {} elements) in {:?} + {:?}",
        report.service_ports, report.commands, report.elements, report.compute, report.apply
    );
    let mut tracked = ServicePorts::new();
    if conntrack_cleanup {
        clean_conntrack(&store, &mut tracked);
    }
    if once {
        return Ok(());
    }
    loop {
        std::thread::sleep(poll);
        let now = args.newest_mtime();
        if now == seen {
            continue;
        }
        seen = now;
        match args.reload(&mut store) {
            Ok(cidrs) => dataplane.set_service_cidrs(cidrs),
            Err(e) => {
                eprintln!("lb-proxy: keeping the current ruleset: {e:#}");
                continue;
            }
        }
        let synced = dataplane.sync(&mut store);
        match &synced {
            Ok(r) if r.commands == 0 => {}
            Ok(r) => eprintln!(
                "lb-proxy: applied {} service ports ({} commands, {} elements{}) in {:?} + {:?}",
                r.service_ports,
                r.commands,
                r.elements,
                if r.full { ", full" } else { "" },
                r.compute,
                r.apply
            ),
            Err(e) => eprintln!(
                "lb-proxy: kernel rejected the change, the previous ruleset keeps serving: {e}"
            ),
        }
        if synced.is_ok() && conntrack_cleanup {
            clean_conntrack(&store, &mut tracked);
        }
    }
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
    match crate::conntrack::cleanup(previous, &next, &next) {
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
