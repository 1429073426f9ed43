//! The command line: raw arguments parsed by `clap`, validated into a [`Config`], then run.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use lb_core::IpFamily;

use crate::compile::{self, Config, NodePortAddresses};
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
    Daemon(Box<DaemonArgs>),
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
    #[arg(long, default_value = compile::TABLE)]
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
    /// Ignored: kube-proxy feature gates.
    #[arg(long)]
    pub feature_gates: Option<String>,
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
            ("feature-gates", &self.feature_gates),
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
    #[arg(long, default_value = compile::TABLE)]
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
    fn config(&self) -> anyhow::Result<Config> {
        let detect_local = crate::config::DetectLocalMode::parse(
            "--detect-local-mode",
            self.detect_local_mode.as_deref(),
            self.pod_bridge_interface.as_deref().unwrap_or_default(),
            self.pod_interface_name_prefix
                .as_deref()
                .unwrap_or_default(),
        )?
        .to_compile("--pod-bridge-interface", "--pod-interface-name-prefix")?;
        Ok(Config {
            cluster_cidrs: self.cluster_cidr.clone(),
            masquerade_all: self.masquerade_all,
            masquerade_bit: self.masquerade_bit,
            nodeport_addresses: self.nodeport_addresses.clone(),
            service_cidrs: self.service_cidr.clone(),
            table: self.table.clone(),
            detect_local,
        })
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
                    "ServiceCIDR" => "ServiceCIDR",
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
        let mut load = Load {
            service_cidrs: None,
            changed: r.changed,
            problems: r.errors.len(),
            read_errors: read_errors > 0,
        };
        if !r.changed && !first {
            return Ok(load);
        }
        let (objects, mut ignored) = sources.objects();
        // Invalid ServiceCIDRs were reported when their file was read, as other objects.
        load.service_cidrs = Some(objects.service_cidrs(&mut |_| {}));
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
    fn load_once(&self, keep_going: bool) -> anyhow::Result<(Store, Vec<IpNet>)> {
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
        Ok((store, load.service_cidrs.unwrap_or_default()))
    }

    /// The desired ruleset for the manifests as they are now (what is valid of them).
    pub fn desired(&self) -> anyhow::Result<Ruleset> {
        self.desired_checked(true)
    }

    /// The desired ruleset; an error when any input was skipped, unless `keep_going`.
    fn desired_checked(&self, keep_going: bool) -> anyhow::Result<Ruleset> {
        let (store, service_cidrs) = self.load_once(keep_going)?;
        let snap = store.snapshot().context("node unknown")?;
        let mut config = self.config()?;
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
}

/// What one [`ManifestArgs::load`] found.
#[derive(Debug, Clone)]
struct Load {
    /// The CIDRs of the ServiceCIDR objects, when the objects were (re)loaded.
    service_cidrs: Option<Vec<IpNet>>,
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
            let (store, service_cidrs) = manifests.load_once(true)?;
            let snap = store.snapshot().context("node unknown")?;
            let q = crate::explain::Query {
                to,
                port,
                protocol,
                from,
                from_node,
                to_node: true,
            };
            let mut config = manifests.config()?;
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
        Command::Daemon(args) => daemon(*args),
    }
}

fn daemon(args: DaemonArgs) -> anyhow::Result<()> {
    if args.cleanup {
        init_logging(0, crate::config::LogFormat::Text);
        return cleanup(&args.table);
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
    };
    let s = crate::config::resolve(file.as_ref(), &overrides).context("invalid configuration")?;
    init_logging(s.verbosity, s.log_format);
    for warning in s.warnings.iter().chain(&args.kube_proxy_only.warnings()) {
        tracing::warn!("{warning}");
    }
    let configz = s.to_kube_proxy_configuration();
    if let Some(path) = &args.write_config_to {
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
    if args.init_only {
        tracing::info!("initialisation done (--init-only)");
        return Ok(());
    }
    crate::coexist::check(args.take_over)?;
    let nodeport_addresses = s.nodeport_addresses();
    let config = crate::daemon::DaemonConfig {
        kubeconfig: s.kubeconfig,
        master: s.master,
        node: s.node,
        compile: Config {
            cluster_cidrs: s.cluster_cidrs,
            masquerade_all: s.masquerade_all,
            masquerade_bit: s.masquerade_bit,
            nodeport_addresses,
            service_cidrs: args.service_cidr.clone(),
            table: args.table.clone(),
            detect_local: s
                .detect_local
                .to_compile(
                    "detectLocal.bridgeInterface",
                    "detectLocal.interfaceNamePrefix",
                )
                .context("invalid configuration")?,
        },
        service_proxy_name: args.service_proxy_name.clone(),
        min_sync_period: s.min_sync_period,
        sync_period: s.sync_period,
        full_sync_period: args.full_sync_period,
        healthz_bind: s.healthz_bind,
        metrics_bind: s.metrics_bind,
        health_check_bind: s.health_check_bind,
        bind_address_hard_fail: s.bind_address_hard_fail,
        conntrack_cleanup: !args.no_conntrack_cleanup,
        source: s.source,
        configz,
        flagz: args.flagz.clone(),
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
            Err(e) => eprintln!("lb-proxy: table {id}: {}", crate::error_chain(&e)),
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
    let mut dataplane = Dataplane::new(netlink()?, args.config()?);
    let mut store = Store::new();
    let mut load = args.load(&mut sources, &mut store, None, metrics)?;
    if let Some(cidrs) = load.service_cidrs.take() {
        dataplane.set_service_cidrs(cidrs);
    }
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
            Ok(mut load) => {
                if let Some(cidrs) = load.service_cidrs.take() {
                    dataplane.set_service_cidrs(cidrs);
                }
                load
            }
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
                    "lb-proxy: kernel rejected the change, the previous ruleset keeps serving: {}",
                    crate::error_chain(e)
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
                    let pages = std::sync::Arc::new(crate::health::StatusPages::default());
                    let _ = crate::health::serve_metrics(l, registry, None, None, pages).await;
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
