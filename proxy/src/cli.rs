//! The command line: raw arguments parsed by `clap` and validated into a typed
//! [`Invocation`] (settings from [`crate::config`], manifest files from [`crate::source`]).
//!
//! Nothing runs here: `main` hands the invocation to `commands::execute`, which runs `render`,
//! `run`, `explain` and `cleanup`, or starts the daemon.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

use crate::config::{
    self, CompileConfig, Invocation, Launch, NodePortAddresses, Question, RunOptions,
};
use crate::source::files::Files;

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
    Daemon(Box<DaemonArgs>),
    /// Explain what happens to a connection: which Service port it hits, which endpoints may
    /// serve it on this node and why the others may not, masquerading, affinity.
    Explain {
        /// The manifests and node settings.
        #[command(flatten)]
        manifests: ManifestArgs,
        /// Destination: ADDR:PORT[/PROTO] (IPv6: `[ADDR]:PORT`), PROTO tcp (default), udp, sctp.
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
        /// Trace the tables this network namespace's kernel holds (`nft -j list table`)
        /// instead of compiling the manifests; the manifests still name the Service ports
        /// and the reasons. Needs `nft` and CAP_NET_ADMIN.
        #[arg(long, conflicts_with = "live")]
        kernel: bool,
    },
    /// Remove everything lb-proxy installed in the current network namespace.
    Cleanup {
        /// Name of the nftables tables.
        #[arg(long, default_value = config::TABLE)]
        table: String,
    },
}

/// Settings of the daemon. Flags override the `--config` file; unset flags fall back to the
/// file, then to kube-proxy's defaults. kube-proxy's own flags are accepted under their
/// names; those that do not apply to lb-proxy are accepted with a one-line warning
/// ([`KubeProxyOnlyFlags`]). `docs/configuration.md` lists every flag.
#[derive(Debug, Args, Clone)]
pub struct DaemonArgs {
    /// A `KubeProxyConfiguration` file (kubeproxy.config.k8s.io/v1alpha1).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Write the effective configuration (file, flags and defaults merged) to this file as a
    /// `KubeProxyConfiguration` and exit.
    #[arg(long)]
    pub write_config_to: Option<PathBuf>,
    /// Remove everything lb-proxy installed and exit (like `kube-proxy --cleanup`).
    #[arg(long)]
    pub cleanup: bool,
    /// Apply the settings that need privileges (conntrack sysctls, oom-score-adj) and exit.
    #[arg(long)]
    pub init_only: bool,
    /// Start even though kube-proxy's rules are present on this node (an nftables table
    /// `kube-proxy`, or iptables `KUBE-SERVICES` chains); without it lb-proxy refuses, so two
    /// proxies never program one node. Remove kube-proxy's rules afterwards with
    /// `kube-proxy --cleanup`.
    #[arg(long)]
    pub take_over: bool,
    /// Kubeconfig file (default: KUBECONFIG, ~/.kube/config, or the in-cluster service account).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The API server's URL, overriding the kubeconfig's (kube-proxy's `--master`).
    #[arg(long)]
    pub master: Option<String>,
    /// This node's name, as the Node object is named (`hostnameOverride`).
    #[arg(long = "node", visible_alias = "hostname-override", env = "NODE_NAME")]
    pub node: Option<String>,
    /// Proxy mode: `nftables` or empty; other modes are refused (`mode`).
    #[arg(long)]
    pub proxy_mode: Option<String>,
    /// Pod CIDRs, comma-separated (`clusterCIDR`).
    #[arg(long)]
    pub cluster_cidr: Option<String>,
    /// How local traffic is recognised: ClusterCIDR (default), NodeCIDR, BridgeInterface,
    /// InterfaceNamePrefix (`detectLocalMode`).
    #[arg(long)]
    pub detect_local_mode: Option<String>,
    /// The bridge for `--detect-local-mode BridgeInterface` (`detectLocal.bridgeInterface`).
    #[arg(long)]
    pub pod_bridge_interface: Option<String>,
    /// The interface name prefix for `--detect-local-mode InterfaceNamePrefix`
    /// (`detectLocal.interfaceNamePrefix`).
    #[arg(long)]
    pub pod_interface_name_prefix: Option<String>,
    /// Addresses that accept NodePort traffic (`nodePortAddresses`): `primary` (the default:
    /// the node's primary addresses from its Node object) or comma-separated CIDRs.
    #[arg(long)]
    pub nodeport_addresses: Option<String>,
    /// Masquerade all traffic to cluster IPs (`nftables.masqueradeAll`).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub masquerade_all: Option<bool>,
    /// Cluster IP ranges, comma-separated, used while the cluster has no `networking.k8s.io/v1`
    /// ServiceCIDR objects: traffic to an address inside them that no Service holds is dropped.
    #[arg(long, value_delimiter = ',')]
    pub service_cidr: Vec<IpNet>,
    /// Mark bit that requests masquerading (`nftables.masqueradeBit`, default 14).
    #[arg(long, visible_alias = "iptables-masquerade-bit")]
    pub masquerade_bit: Option<i64>,
    /// Name of the nftables tables.
    #[arg(long, default_value = config::TABLE)]
    pub table: String,
    /// Handle only objects labelled `service.kubernetes.io/service-proxy-name=<this>`.
    #[arg(long)]
    pub service_proxy_name: Option<String>,
    /// Minimum interval between syncs, Go syntax (`nftables.minSyncPeriod`, default 1s; 0
    /// syncs every change at once).
    #[arg(long, visible_alias = "iptables-min-sync-period")]
    pub min_sync_period: Option<String>,
    /// Retry interval after a failed sync; health fails after twice this
    /// (`nftables.syncPeriod`, default 30s).
    #[arg(long, visible_alias = "iptables-sync-period")]
    pub sync_period: Option<String>,
    /// Interval between full resyncs (which also repair rules changed by others), Go syntax.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub full_sync_period: Duration,
    /// Address of `/healthz` and `/livez` (`healthzBindAddress`, default 0.0.0.0:10256; empty
    /// disables).
    #[arg(long)]
    pub healthz_bind_address: Option<String>,
    /// Address of `/metrics`, `/configz`, `/flagz` and `/explain` (`metricsBindAddress`,
    /// default 127.0.0.1:10249; empty disables).
    #[arg(long)]
    pub metrics_bind_address: Option<String>,
    /// Address the healthCheckNodePort responders listen on (`bindAddress`, default 0.0.0.0).
    #[arg(long)]
    pub bind_address: Option<String>,
    /// Exit when the health or metrics port cannot be bound, instead of retrying
    /// (`bindAddressHardFail`).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub bind_address_hard_fail: Option<bool>,
    /// The process's OOM score adjustment, -1000..=1000 (`oomScoreAdj`, default -999).
    #[arg(long, allow_negative_numbers = true)]
    pub oom_score_adj: Option<i64>,
    /// `conntrack.maxPerCore`: nf_conntrack_max = this × CPUs (at least --conntrack-min); 0
    /// leaves it alone.
    #[arg(long)]
    pub conntrack_max_per_core: Option<i64>,
    /// `conntrack.min`.
    #[arg(long)]
    pub conntrack_min: Option<i64>,
    /// `conntrack.tcpEstablishedTimeout` (0 leaves it alone).
    #[arg(long)]
    pub conntrack_tcp_timeout_established: Option<String>,
    /// `conntrack.tcpCloseWaitTimeout` (0 leaves it alone).
    #[arg(long)]
    pub conntrack_tcp_timeout_close_wait: Option<String>,
    /// `conntrack.tcpBeLiberal`: set nf_conntrack_tcp_be_liberal.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub conntrack_tcp_be_liberal: Option<bool>,
    /// `conntrack.udpTimeout` (0 leaves it alone).
    #[arg(long)]
    pub conntrack_udp_timeout: Option<String>,
    /// `conntrack.udpStreamTimeout` (0 leaves it alone).
    #[arg(long)]
    pub conntrack_udp_timeout_stream: Option<String>,
    /// Log verbosity, klog style (`logging.verbosity`): 0–1 info, 2–3 debug for lb-proxy
    /// (every sync), 4 also the Kubernetes client, 5+ trace. `RUST_LOG` overrides.
    #[arg(short = 'v', long = "v")]
    pub verbosity: Option<u32>,
    /// Log format: text (default; colours only on a terminal) or json (`logging.format`).
    #[arg(long)]
    pub logging_format: Option<String>,
    /// Do not delete stale UDP/SCTP conntrack entries after endpoint changes.
    #[arg(long)]
    pub no_conntrack_cleanup: bool,
    /// Feature gates, `Name=true|false,…` (`featureGates`). `WatchListClient=false` makes
    /// every first list a paginated LIST instead of a streaming list; kube-proxy's other
    /// gates are accepted and warned about.
    #[arg(long)]
    pub feature_gates: Option<String>,
    /// kube-proxy's flags that do not apply to lb-proxy.
    #[command(flatten)]
    pub kube_proxy_only: KubeProxyOnlyFlags,
    /// Every flag and its value, as `/flagz` shows them (filled by [`parse`]).
    #[arg(skip)]
    pub flagz: Vec<(String, String)>,
}

/// kube-proxy's flags that have no meaning for lb-proxy: accepted, so an existing unit file
/// or manifest works, and each reported with a one-line warning.
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "kube-proxy flags accepted and ignored")]
pub struct KubeProxyOnlyFlags {
    /// Ignored: the client speaks JSON.
    #[arg(long)]
    pub kube_api_content_type: Option<String>,
    /// Ignored: watches need no request rate limit.
    #[arg(long)]
    pub kube_api_burst: Option<String>,
    /// Ignored: watches need no request rate limit.
    #[arg(long)]
    pub kube_api_qps: Option<String>,
    /// Ignored: no pprof.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub profiling: Option<String>,
    /// Ignored.
    #[arg(long)]
    pub show_hidden_metrics_for_version: Option<String>,
    /// Ignored: iptables mode only.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub iptables_localhost_nodeports: Option<String>,
    /// Ignored: IPVS mode only.
    #[arg(long)]
    pub ipvs_sync_period: Option<String>,
    /// Ignored: IPVS mode only.
    #[arg(long)]
    pub ipvs_min_sync_period: Option<String>,
    /// Ignored: IPVS mode only.
    #[arg(long)]
    pub ipvs_scheduler: Option<String>,
    /// Ignored: IPVS mode only.
    #[arg(long)]
    pub ipvs_exclude_cidrs: Option<String>,
    /// Ignored: IPVS mode only.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub ipvs_strict_arp: Option<String>,
    /// Ignored: IPVS mode only.
    #[arg(long)]
    pub ipvs_tcp_timeout: Option<String>,
    /// Ignored: IPVS mode only.
    #[arg(long)]
    pub ipvs_tcpfin_timeout: Option<String>,
    /// Ignored: IPVS mode only.
    #[arg(long)]
    pub ipvs_udp_timeout: Option<String>,
    /// Ignored: watches need no periodic re-list.
    #[arg(long)]
    pub config_sync_period: Option<String>,
    /// Ignored (deprecated in kube-proxy): use --healthz-bind-address.
    #[arg(long)]
    pub healthz_port: Option<String>,
    /// Ignored (deprecated in kube-proxy): use --metrics-bind-address.
    #[arg(long)]
    pub metrics_port: Option<String>,
    /// Ignored: logs are written as they happen.
    #[arg(long)]
    pub log_flush_frequency: Option<String>,
    /// Ignored.
    #[arg(long)]
    pub log_json_info_buffer_size: Option<String>,
    /// Ignored.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub log_json_split_stream: Option<String>,
    /// Ignored.
    #[arg(long)]
    pub log_text_info_buffer_size: Option<String>,
    /// Ignored.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub log_text_split_stream: Option<String>,
    /// Ignored: use RUST_LOG for per-module levels.
    #[arg(long)]
    pub vmodule: Option<String>,
    /// Ignored: Windows only.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub windows_service: Option<String>,
}

impl KubeProxyOnlyFlags {
    /// One warning per flag given.
    pub fn warnings(&self) -> Vec<String> {
        let given = [
            ("kube-api-content-type", &self.kube_api_content_type),
            ("kube-api-burst", &self.kube_api_burst),
            ("kube-api-qps", &self.kube_api_qps),
            ("profiling", &self.profiling),
            (
                "show-hidden-metrics-for-version",
                &self.show_hidden_metrics_for_version,
            ),
            (
                "iptables-localhost-nodeports",
                &self.iptables_localhost_nodeports,
            ),
            ("ipvs-sync-period", &self.ipvs_sync_period),
            ("ipvs-min-sync-period", &self.ipvs_min_sync_period),
            ("ipvs-scheduler", &self.ipvs_scheduler),
            ("ipvs-exclude-cidrs", &self.ipvs_exclude_cidrs),
            ("ipvs-strict-arp", &self.ipvs_strict_arp),
            ("ipvs-tcp-timeout", &self.ipvs_tcp_timeout),
            ("ipvs-tcpfin-timeout", &self.ipvs_tcpfin_timeout),
            ("ipvs-udp-timeout", &self.ipvs_udp_timeout),
            ("config-sync-period", &self.config_sync_period),
            ("healthz-port", &self.healthz_port),
            ("metrics-port", &self.metrics_port),
            ("log-flush-frequency", &self.log_flush_frequency),
            ("log-json-info-buffer-size", &self.log_json_info_buffer_size),
            ("log-json-split-stream", &self.log_json_split_stream),
            ("log-text-info-buffer-size", &self.log_text_info_buffer_size),
            ("log-text-split-stream", &self.log_text_split_stream),
            ("vmodule", &self.vmodule),
            ("windows-service", &self.windows_service),
        ];
        given
            .into_iter()
            .filter_map(|(name, v)| {
                v.as_ref().map(|v| {
                    format!(
                        "--{name}={v}: a kube-proxy flag that does not apply to lb-proxy; ignored"
                    )
                })
            })
            .collect()
    }
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
    /// How pod traffic is recognised: ClusterCIDR (default), NodeCIDR (the Node's
    /// `spec.podCIDRs`), BridgeInterface or InterfaceNamePrefix (kube-proxy's
    /// `--detect-local-mode`).
    #[arg(long)]
    pub detect_local_mode: Option<String>,
    /// The pods' bridge, with `--detect-local-mode BridgeInterface`.
    #[arg(long)]
    pub pod_bridge_interface: Option<String>,
    /// The prefix of the pods' interface names, with `--detect-local-mode InterfaceNamePrefix`.
    #[arg(long)]
    pub pod_interface_name_prefix: Option<String>,
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
    #[arg(long, default_value = config::TABLE)]
    pub table: String,
    /// Handle only objects labelled `service.kubernetes.io/service-proxy-name=<this>`.
    #[arg(long)]
    pub service_proxy_name: Option<String>,
}

/// Go duration syntax (`500ms`, `1m30s`, `1h`), the same parser as the configuration file's.
fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::parse_go_duration("duration", s).map_err(|e| e.reason)
}

/// Parses the command line, and records every daemon flag with its value for `/flagz`.
pub fn parse() -> Cli {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let command = Cli::command();
    let matches = command.clone().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let (Command::Daemon(args), Some(sub), Some(daemon)) = (
        &mut cli.command,
        matches.subcommand_matches("daemon"),
        command.find_subcommand("daemon"),
    ) {
        args.flagz = flagz(daemon, sub);
    }
    cli
}

/// `name=value` for every flag of `command` that has a value (given or default), by name.
fn flagz(command: &clap::Command, matches: &clap::ArgMatches) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = command
        .get_arguments()
        .filter_map(|arg| {
            let long = arg.get_long()?;
            let raw = matches.try_get_raw(arg.get_id().as_str()).ok().flatten()?;
            let values: Vec<String> = raw.map(|v| v.to_string_lossy().into_owned()).collect();
            let value = if values.is_empty() {
                "true".to_string()
            } else {
                values.join(",")
            };
            Some((long.to_string(), value))
        })
        .collect();
    out.sort();
    out
}

impl ManifestArgs {
    /// The compiler settings these flags give.
    pub fn config(&self) -> anyhow::Result<CompileConfig> {
        let detect_local = crate::config::DetectLocalMode::parse(
            "--detect-local-mode",
            self.detect_local_mode.as_deref(),
            self.pod_bridge_interface.as_deref().unwrap_or_default(),
            self.pod_interface_name_prefix
                .as_deref()
                .unwrap_or_default(),
        )?
        .to_compile("--pod-bridge-interface", "--pod-interface-name-prefix")?;
        Ok(CompileConfig {
            cluster_cidrs: self.cluster_cidr.clone(),
            masquerade_all: self.masquerade_all,
            masquerade_bit: self.masquerade_bit,
            nodeport_addresses: self.nodeport_addresses.clone(),
            service_cidrs: self.service_cidr.clone(),
            table: self.table.clone(),
            detect_local,
        })
    }

    /// Which manifests to read, for which node.
    pub fn files(&self) -> Files {
        Files {
            paths: self.paths.clone(),
            node: self.node.clone(),
            filter: crate::config::Filter {
                service_proxy_name: self.service_proxy_name.clone(),
            },
        }
    }
}

impl Cli {
    /// Validates the parsed command line into what is to be done. Nothing runs here.
    pub fn invocation(self) -> anyhow::Result<Invocation> {
        Ok(match self.command {
            Command::Render {
                manifests,
                keep_going,
            } => Invocation::Render {
                config: manifests.config()?,
                files: manifests.files(),
                keep_going,
            },
            Command::Run {
                manifests,
                once,
                keep_going,
                poll,
                settle,
                metrics_bind_address,
                no_conntrack_cleanup,
            } => Invocation::Run {
                config: manifests.config()?,
                files: manifests.files(),
                options: RunOptions {
                    once,
                    keep_going,
                    poll,
                    settle: settle.unwrap_or(poll * 2),
                    metrics_bind_address,
                    conntrack_cleanup: !no_conntrack_cleanup,
                },
            },
            Command::Cleanup { table } => Invocation::Cleanup { table },
            Command::Explain {
                manifests,
                to,
                from,
                from_node,
                json,
                live,
                kernel,
            } => {
                let question = Question {
                    to,
                    from,
                    from_node,
                    json,
                    kernel,
                };
                match live {
                    Some(addr) => Invocation::ExplainLive { addr, question },
                    None => Invocation::Explain {
                        config: manifests.config()?,
                        files: manifests.files(),
                        question,
                    },
                }
            }
            Command::Daemon(args) => daemon(*args)?,
        })
    }
}

/// The daemon's flags, resolved with its configuration file.
fn daemon(args: DaemonArgs) -> anyhow::Result<Invocation> {
    if args.cleanup {
        return Ok(Invocation::Cleanup { table: args.table });
    }
    let file = args
        .config
        .as_ref()
        .map(crate::config::KubeProxyConfiguration::read)
        .transpose()
        .context("invalid configuration")?;
    let overrides = crate::config::Overrides {
        config: args.config.clone(),
        kubeconfig: args.kubeconfig.clone(),
        master: args.master.clone(),
        node: args.node.clone(),
        proxy_mode: args.proxy_mode.clone(),
        cluster_cidr: args.cluster_cidr.clone(),
        detect_local_mode: args.detect_local_mode.clone(),
        pod_bridge_interface: args.pod_bridge_interface.clone(),
        pod_interface_name_prefix: args.pod_interface_name_prefix.clone(),
        nodeport_addresses: args.nodeport_addresses.clone(),
        masquerade_all: args.masquerade_all,
        masquerade_bit: args.masquerade_bit,
        min_sync_period: args.min_sync_period.clone(),
        sync_period: args.sync_period.clone(),
        healthz_bind_address: args.healthz_bind_address.clone(),
        metrics_bind_address: args.metrics_bind_address.clone(),
        bind_address: args.bind_address.clone(),
        bind_address_hard_fail: args.bind_address_hard_fail,
        oom_score_adj: args.oom_score_adj,
        conntrack: crate::config::ConntrackConfiguration {
            max_per_core: args.conntrack_max_per_core,
            min: args.conntrack_min,
            tcp_established_timeout: args.conntrack_tcp_timeout_established.clone(),
            tcp_close_wait_timeout: args.conntrack_tcp_timeout_close_wait.clone(),
            tcp_be_liberal: args.conntrack_tcp_be_liberal,
            udp_timeout: args.conntrack_udp_timeout.clone(),
            udp_stream_timeout: args.conntrack_udp_timeout_stream.clone(),
        },
        verbosity: args.verbosity,
        logging_format: args.logging_format.clone(),
        feature_gates: args.feature_gates.clone(),
    };
    let settings =
        crate::config::resolve(file.as_ref(), &overrides).context("invalid configuration")?;
    let warnings = args.kube_proxy_only.warnings();
    Ok(Invocation::Daemon {
        settings: Box::new(settings),
        warnings,
        launch: Launch {
            write_config_to: args.write_config_to.clone(),
            init_only: args.init_only,
            take_over: args.take_over,
            service_cidrs: args.service_cidr.clone(),
            table: args.table.clone(),
            service_proxy_name: args.service_proxy_name.clone(),
            full_sync_period: args.full_sync_period,
            conntrack_cleanup: !args.no_conntrack_cleanup,
            flagz: args.flagz.clone(),
        },
    })
}
