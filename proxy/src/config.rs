//! The configuration file, in the shape of kube-proxy's `KubeProxyConfiguration`
//! (`kubeproxy.config.k8s.io/v1alpha1`), and the command-line flags that override it.
//!
//! * **Strict decoding**: every field of kube-proxy's v1alpha1 type is known; a field that is
//!   not one of them (`minSyncPerod`) is an error naming its path (`nftables.minSyncPerod`),
//!   as kube-proxy's strict decoder reports it. Fields lb-proxy has no use for (iptables,
//!   ipvs, winkernel, …) are accepted and ignored.
//! * **Defaulting as kube-proxy's v1alpha1 does**: in the file, zero or empty means "the
//!   default" (`syncPeriod: 0s` → 30s, `minSyncPeriod: 0s` → 1s, `healthzBindAddress: ""` →
//!   `0.0.0.0:10256`, `metricsBindAddress: ""` → `127.0.0.1:10249`, `masqueradeBit: null` →
//!   14), so kubeadm's generated `config.conf` works unchanged. A flag is taken as given:
//!   `--min-sync-period 0` syncs every change at once, `--metrics-bind-address ""` disables.
//! * With `mode: ""` (kube-proxy's iptables default) a sync period or masquerade bit left at
//!   zero in `nftables` is taken from `iptables`, so a tuned iptables-mode file keeps its
//!   meaning.
//! * Deliberate differences: `conntrack.maxPerCore`/`min`/`tcp*Timeout` left `null` leave the
//!   kernel alone (kube-proxy writes its defaults 32768/131072/24h/1h); only explicit values
//!   are written.
//!
//! Durations everywhere (file and flags) use one parser with Go's syntax ([`parse_go_duration`]).

// The settings types the command line validates into, so `cli` needs this module only.
pub use crate::compile::{Config as CompileConfig, NodePortAddresses, TABLE};
pub use crate::convert::Filter;
pub use crate::nft::ir::Ruleset;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{Value, json};

/// `KubeProxyConfiguration` (v1alpha1), every field kube-proxy knows. Absent and `null` are
/// both `None`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    /// Must be `kubeproxy.config.k8s.io/v1alpha1` when present.
    pub api_version: Option<String>,
    /// Must be `KubeProxyConfiguration` when present.
    pub kind: Option<String>,
    /// `featureGates`: `WatchListClient` applies ([`WATCH_LIST_CLIENT`]); others are
    /// accepted and warned about.
    pub feature_gates: Option<BTreeMap<String, bool>>,
    /// `clientConnection`.
    pub client_connection: Option<ClientConnection>,
    /// `logging`: `format` and `verbosity` are used.
    pub logging: Option<LoggingConfiguration>,
    /// `hostnameOverride`: the node name.
    pub hostname_override: Option<String>,
    /// `bindAddress`: where the healthCheckNodePort responders listen.
    pub bind_address: Option<String>,
    /// `healthzBindAddress` (`ADDR:PORT`; empty: the default).
    pub healthz_bind_address: Option<String>,
    /// `metricsBindAddress` (`ADDR:PORT`; empty: the default).
    pub metrics_bind_address: Option<String>,
    /// `bindAddressHardFail`: exit when the health or metrics port cannot be bound.
    pub bind_address_hard_fail: Option<bool>,
    /// `enableProfiling`: not supported (warned about when true).
    pub enable_profiling: Option<bool>,
    /// `showHiddenMetricsForVersion`: ignored.
    pub show_hidden_metrics_for_version: Option<String>,
    /// `""` or `nftables`; lb-proxy only does nftables.
    pub mode: Option<String>,
    /// `iptables.*`: see the module documentation for what is taken from it.
    pub iptables: Option<IptablesConfiguration>,
    /// `ipvs.*`: ignored.
    pub ipvs: Option<IpvsConfiguration>,
    /// `nftables.*`.
    pub nftables: Option<NftablesConfiguration>,
    /// `winkernel.*`: ignored.
    pub winkernel: Option<WinkernelConfiguration>,
    /// `detectLocalMode`: `ClusterCIDR` (default), `NodeCIDR`, `BridgeInterface`,
    /// `InterfaceNamePrefix`.
    pub detect_local_mode: Option<String>,
    /// `detectLocal.*`.
    pub detect_local: Option<DetectLocal>,
    /// `clusterCIDR`, comma-separated.
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    /// `nodePortAddresses`: CIDRs, or `primary`.
    pub node_port_addresses: Option<Vec<String>>,
    /// `oomScoreAdj` (-1000..=1000, default -999).
    pub oom_score_adj: Option<i64>,
    /// `conntrack.*`.
    pub conntrack: Option<ConntrackConfiguration>,
    /// `configSyncPeriod`: ignored (watches need no periodic re-list).
    pub config_sync_period: Option<String>,
    /// `portRange`: unused by kube-proxy too.
    pub port_range: Option<String>,
    /// `windowsRunAsService`: ignored.
    pub windows_run_as_service: Option<bool>,
    /// `udpIdleTimeout`: written by old kube-proxy versions, ignored.
    pub udp_idle_timeout: Option<String>,
    /// `syncPeriod` (v1alpha2 hoists it to the top level).
    pub sync_period: Option<String>,
    /// `minSyncPeriod` (top-level form).
    pub min_sync_period: Option<String>,
}

/// `nftables` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NftablesConfiguration {
    /// `masqueradeAll`.
    pub masquerade_all: Option<bool>,
    /// `masqueradeBit` (0..=31).
    pub masquerade_bit: Option<i64>,
    /// `syncPeriod`.
    pub sync_period: Option<String>,
    /// `minSyncPeriod`.
    pub min_sync_period: Option<String>,
}

/// `iptables` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IptablesConfiguration {
    /// `masqueradeAll`.
    pub masquerade_all: Option<bool>,
    /// `masqueradeBit`.
    pub masquerade_bit: Option<i64>,
    /// `localhostNodePorts`: ignored.
    pub localhost_node_ports: Option<bool>,
    /// `snatNodeInternalIP`: ignored.
    #[serde(rename = "snatNodeInternalIP")]
    pub snat_node_internal_ip: Option<bool>,
    /// `syncPeriod`.
    pub sync_period: Option<String>,
    /// `minSyncPeriod`.
    pub min_sync_period: Option<String>,
}

/// `ipvs` section (ignored).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpvsConfiguration {
    /// `syncPeriod`.
    pub sync_period: Option<Value>,
    /// `minSyncPeriod`.
    pub min_sync_period: Option<Value>,
    /// `scheduler`.
    pub scheduler: Option<Value>,
    /// `excludeCIDRs`.
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Value>,
    /// `strictARP`.
    #[serde(rename = "strictARP")]
    pub strict_arp: Option<Value>,
    /// `tcpTimeout`.
    pub tcp_timeout: Option<Value>,
    /// `tcpFinTimeout`.
    pub tcp_fin_timeout: Option<Value>,
    /// `udpTimeout`.
    pub udp_timeout: Option<Value>,
}

/// `winkernel` section (ignored).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WinkernelConfiguration {
    /// `networkName`.
    pub network_name: Option<Value>,
    /// `sourceVip`.
    pub source_vip: Option<Value>,
    /// `enableDSR`.
    #[serde(rename = "enableDSR")]
    pub enable_dsr: Option<Value>,
    /// `rootHnsEndpointName`.
    pub root_hns_endpoint_name: Option<Value>,
    /// `forwardHealthCheckVip`.
    pub forward_health_check_vip: Option<Value>,
}

/// `detectLocal` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DetectLocal {
    /// `bridgeInterface` (for `BridgeInterface`).
    pub bridge_interface: Option<String>,
    /// `interfaceNamePrefix` (for `InterfaceNamePrefix`).
    pub interface_name_prefix: Option<String>,
}

/// `logging` section (component-base `LoggingConfiguration`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoggingConfiguration {
    /// `format`: `text` (default) or `json`.
    pub format: Option<String>,
    /// `verbosity`: klog's `-v`.
    pub verbosity: Option<u32>,
    /// `flushFrequency`: ignored.
    pub flush_frequency: Option<Value>,
    /// `vmodule`: ignored.
    pub vmodule: Option<Value>,
    /// `options`: ignored.
    pub options: Option<Value>,
}

/// `conntrack` section: sysctls set at start in the proxy's network namespace (0 or absent
/// leaves a value alone).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConntrackConfiguration {
    /// `maxPerCore`.
    pub max_per_core: Option<i64>,
    /// `min`.
    pub min: Option<i64>,
    /// `tcpEstablishedTimeout`.
    pub tcp_established_timeout: Option<String>,
    /// `tcpCloseWaitTimeout`.
    pub tcp_close_wait_timeout: Option<String>,
    /// `tcpBeLiberal`.
    pub tcp_be_liberal: Option<bool>,
    /// `udpTimeout`.
    pub udp_timeout: Option<String>,
    /// `udpStreamTimeout`.
    pub udp_stream_timeout: Option<String>,
}

/// `clientConnection` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientConnection {
    /// `kubeconfig`.
    pub kubeconfig: Option<String>,
    /// `acceptContentTypes`: ignored (JSON is used).
    pub accept_content_types: Option<Value>,
    /// `contentType`: ignored.
    pub content_type: Option<Value>,
    /// `qps`: ignored (watches make no request stream to limit).
    pub qps: Option<Value>,
    /// `burst`: ignored.
    pub burst: Option<Value>,
}

/// A configuration value was invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// The field (`nftables.masqueradeBit`, `--min-sync-period`, …).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

fn bad(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Parses a Go duration (`1s`, `500ms`, `1h0m0s`, `0`).
pub fn parse_go_duration(field: &str, s: &str) -> Result<Duration, ConfigError> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad(field, "empty duration"));
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let n: f64 = num
            .parse()
            .map_err(|_| bad(field, format!("invalid duration {s:?}")))?;
        let secs = match unit {
            "h" => n * 3600.0,
            "m" => n * 60.0,
            "s" => n,
            "ms" => n / 1e3,
            "us" | "µs" => n / 1e6,
            "ns" => n / 1e9,
            _ => {
                return Err(bad(
                    field,
                    format!("invalid duration {s:?} (units: h, m, s, ms)"),
                ));
            }
        };
        total += Duration::try_from_secs_f64(secs)
            .map_err(|_| bad(field, format!("duration {s:?} out of range")))?;
        rest = tail;
    }
    Ok(total)
}

/// Formats a duration as Go's `time.Duration.String()` does (`30s`, `1h0m0s`, `500ms`, `0s`).
pub fn format_go_duration(d: Duration) -> String {
    let (secs, nanos) = (d.as_secs(), d.subsec_nanos());
    if secs == 0 {
        return match nanos {
            0 => "0s".into(),
            n if n % 1_000_000 == 0 => format!("{}ms", n / 1_000_000),
            n if n % 1_000 == 0 => format!("{}µs", n / 1_000),
            n => format!("{n}ns"),
        };
    }
    let frac = if nanos == 0 {
        String::new()
    } else {
        format!(".{nanos:09}").trim_end_matches('0').to_string()
    };
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}{frac}s"),
        (0, m) => format!("{m}m{s}{frac}s"),
        (h, m) => format!("{h}h{m}m{s}{frac}s"),
    }
}

impl KubeProxyConfiguration {
    /// Reads and strictly decodes a configuration file.
    pub fn read(path: &PathBuf) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad("--config", format!("{}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| ConfigError {
            field: e.field,
            reason: format!("{} (in {})", e.reason, path.display()),
        })
    }

    /// Strictly decodes a configuration (YAML or JSON): an unknown field is an error naming
    /// its path, as kube-proxy's strict decoder reports it.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let value: Value =
            serde_saphyr::from_str(text).map_err(|e| bad("--config", format!("{e}")))?;
        if value.is_null() {
            return Ok(Self::default());
        }
        let mut unknown = Vec::new();
        let c: KubeProxyConfiguration = serde_ignored::deserialize(value, |path| {
            // `?` marks a step through an `Option`: not part of the field's name.
            unknown.push(path.to_string().replace(".?", "").replace("?.", ""))
        })
        .map_err(|e| bad("--config", format!("{e}")))?;
        if let Some(field) = unknown.into_iter().next() {
            return Err(bad(
                &field,
                "unknown field (strict decoding: not a field of KubeProxyConfiguration v1alpha1; misspelt?)",
            ));
        }
        c.check_header()?;
        Ok(c)
    }

    fn check_header(&self) -> Result<(), ConfigError> {
        if let Some(v) = &self.api_version
            && v != "kubeproxy.config.k8s.io/v1alpha1"
        {
            return Err(bad(
                "apiVersion",
                format!("{v:?} is not kubeproxy.config.k8s.io/v1alpha1"),
            ));
        }
        if let Some(k) = &self.kind
            && k != "KubeProxyConfiguration"
        {
            return Err(bad("kind", format!("{k:?} is not KubeProxyConfiguration")));
        }
        check_mode("mode", self.mode.as_deref())?;
        DetectLocalMode::parse("detectLocalMode", self.detect_local_mode.as_deref(), "", "")
            .map(|_| ())
    }
}

/// `mode` / `--proxy-mode`: `""` or `nftables`.
fn check_mode(field: &str, mode: Option<&str>) -> Result<(), ConfigError> {
    match mode {
        None | Some("") | Some("nftables") => Ok(()),
        Some(m) => Err(bad(
            field,
            format!(
                "{m:?}: lb-proxy only implements the nftables mode (use nftables or leave it empty)"
            ),
        )),
    }
}

/// How traffic from local pods is recognised (`detectLocalMode`), as configured; the compiler
/// takes it as [`crate::compile::DetectLocal`] ([`DetectLocalMode::to_compile`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DetectLocalMode {
    /// `ClusterCIDR` (the default): sources in `clusterCIDR` are local pods.
    #[default]
    ClusterCidr,
    /// `NodeCIDR`: sources in the Node's `spec.podCIDRs`.
    NodeCidr,
    /// `BridgeInterface`: packets arriving from this bridge.
    BridgeInterface(String),
    /// `InterfaceNamePrefix`: packets arriving from interfaces with this name prefix.
    InterfaceNamePrefix(String),
}

impl DetectLocalMode {
    /// The compiler's setting, with the interface name validated: an empty or invalid name is
    /// an error naming `bridge_field` or `prefix_field`.
    pub fn to_compile(
        &self,
        bridge_field: &str,
        prefix_field: &str,
    ) -> Result<crate::compile::DetectLocal, ConfigError> {
        use crate::compile::DetectLocal as D;
        use crate::nft::ir::IfName;
        let name = |v: &str, field: &str, mode: &str, make: fn(&str) -> Option<IfName>| {
            if v.is_empty() {
                return Err(bad(
                    field,
                    format!("must be set with detectLocalMode {mode}"),
                ));
            }
            make(v).ok_or_else(|| {
                bad(
                    field,
                    format!("{v:?} is not an interface name (1 to 15 bytes, no '\"' or '*')"),
                )
            })
        };
        Ok(match self {
            Self::ClusterCidr => D::ClusterCidr,
            Self::NodeCidr => D::NodeCidr(Vec::new()),
            Self::BridgeInterface(b) => {
                D::BridgeInterface(name(b, bridge_field, "BridgeInterface", IfName::new)?)
            }
            Self::InterfaceNamePrefix(p) => D::InterfaceNamePrefix(name(
                p,
                prefix_field,
                "InterfaceNamePrefix",
                IfName::prefix,
            )?),
        })
    }

    /// Parses the mode (`field` names it in errors) with its parameter.
    pub fn parse(
        field: &str,
        mode: Option<&str>,
        bridge: &str,
        prefix: &str,
    ) -> Result<Self, ConfigError> {
        Ok(match mode.unwrap_or("") {
            "" | "ClusterCIDR" => Self::ClusterCidr,
            "NodeCIDR" => Self::NodeCidr,
            "BridgeInterface" => Self::BridgeInterface(bridge.to_string()),
            "InterfaceNamePrefix" => Self::InterfaceNamePrefix(prefix.to_string()),
            m => {
                return Err(bad(
                    field,
                    format!(
                        "{m:?} is not one of ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix"
                    ),
                ));
            }
        })
    }

    /// kube-proxy's name of the mode.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::ClusterCidr => "ClusterCIDR",
            Self::NodeCidr => "NodeCIDR",
            Self::BridgeInterface(_) => "BridgeInterface",
            Self::InterfaceNamePrefix(_) => "InterfaceNamePrefix",
        }
    }
}

/// Log output format (`--logging-format`, `logging.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (ANSI colours only on a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// Parses `text` or `json`.
    pub fn parse(field: &str, s: &str) -> Result<Self, ConfigError> {
        match s {
            "" | "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(bad(field, format!("{other:?} is not text or json"))),
        }
    }
}

/// Everything the daemon needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Kubeconfig path (`None`: infer).
    pub kubeconfig: Option<PathBuf>,
    /// `--master`: the API server URL, overriding the kubeconfig's.
    pub master: Option<String>,
    /// Node name.
    pub node: String,
    /// Pod CIDRs.
    pub cluster_cidrs: Vec<IpNet>,
    /// `detectLocalMode` with its parameter.
    pub detect_local: DetectLocalMode,
    /// NodePort CIDRs (`None`: every local address).
    pub nodeport_cidrs: Option<Vec<IpNet>>,
    /// `nodePortAddresses` contains `primary`: the Node's primary addresses.
    pub nodeport_primary: bool,
    /// `masqueradeAll`.
    pub masquerade_all: bool,
    /// `masqueradeBit`.
    pub masquerade_bit: u8,
    /// `minSyncPeriod`.
    pub min_sync_period: Duration,
    /// `syncPeriod`.
    pub sync_period: Duration,
    /// `/healthz` address.
    pub healthz_bind: Option<SocketAddr>,
    /// `/metrics` address.
    pub metrics_bind: Option<SocketAddr>,
    /// healthCheckNodePort responders' address.
    pub health_check_bind: IpAddr,
    /// `bindAddressHardFail`.
    pub bind_address_hard_fail: bool,
    /// `oomScoreAdj`.
    pub oom_score_adj: i32,
    /// Conntrack sysctls.
    pub conntrack: ConntrackConfiguration,
    /// klog verbosity (`--v`, `logging.verbosity`).
    pub verbosity: u32,
    /// `--logging-format`, `logging.format`.
    pub log_format: LogFormat,
    /// Where the configuration came from, for the start-up summary.
    pub source: String,
    /// Streaming lists first (client-go's `WatchListClient` feature gate, default on).
    pub watch_list: bool,
    /// Things accepted but not applied, one line each, to log once logging is up.
    pub warnings: Vec<String>,
}

impl Settings {
    /// Where NodePorts are served, as kube-proxy's nftables mode reads `nodePortAddresses`:
    /// `primary` (also when nothing is given: its default; with CIDRs as well, `primary`
    /// decides), the CIDRs, or every local address for `0.0.0.0/0` together with `::/0`.
    pub fn nodeport_addresses(&self) -> NodePortAddresses {
        match (&self.nodeport_cidrs, self.nodeport_primary) {
            (_, true) | (None, false) => NodePortAddresses::Primary,
            (Some(cidrs), false) => {
                let everything = |v4: bool| {
                    cidrs
                        .iter()
                        .any(|n| n.prefix_len() == 0 && n.addr().is_ipv4() == v4)
                };
                if everything(true) && everything(false) {
                    NodePortAddresses::All
                } else {
                    NodePortAddresses::Cidrs(cidrs.clone())
                }
            }
        }
    }
}

/// Values given on the command line (`None`: not given), which override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--config` (only for the summary).
    pub config: Option<PathBuf>,
    /// `--kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// `--master`.
    pub master: Option<String>,
    /// `--node` / `--hostname-override`.
    pub node: Option<String>,
    /// `--proxy-mode`.
    pub proxy_mode: Option<String>,
    /// `--cluster-cidr`.
    pub cluster_cidr: Option<String>,
    /// `--detect-local-mode`.
    pub detect_local_mode: Option<String>,
    /// `--pod-bridge-interface`.
    pub pod_bridge_interface: Option<String>,
    /// `--pod-interface-name-prefix`.
    pub pod_interface_name_prefix: Option<String>,
    /// `--nodeport-addresses`.
    pub nodeport_addresses: Option<String>,
    /// `--masquerade-all`.
    pub masquerade_all: Option<bool>,
    /// `--masquerade-bit`.
    pub masquerade_bit: Option<i64>,
    /// `--min-sync-period`.
    pub min_sync_period: Option<String>,
    /// `--sync-period`.
    pub sync_period: Option<String>,
    /// `--healthz-bind-address`.
    pub healthz_bind_address: Option<String>,
    /// `--metrics-bind-address`.
    pub metrics_bind_address: Option<String>,
    /// `--bind-address`.
    pub bind_address: Option<String>,
    /// `--bind-address-hard-fail`.
    pub bind_address_hard_fail: Option<bool>,
    /// `--oom-score-adj`.
    pub oom_score_adj: Option<i64>,
    /// `--conntrack-*`.
    pub conntrack: ConntrackConfiguration,
    /// `--v`.
    pub verbosity: Option<u32>,
    /// `--logging-format`.
    pub logging_format: Option<String>,
    /// `--feature-gates`.
    pub feature_gates: Option<String>,
}

/// The one feature gate lb-proxy follows: client-go's `WatchListClient`, which kube-proxy's
/// informers obey. On (the default), each watch's first list is a streaming list when the API
/// server offers one; `false` lists in pages, as before Kubernetes 1.27.
pub const WATCH_LIST_CLIENT: &str = "WatchListClient";

/// Parses `--feature-gates` as Kubernetes components do: `Name=bool` pairs separated by
/// commas (`true`, `false`, `1`, `0`, `t`, `f`, any case as Go's `strconv.ParseBool`);
/// empty means none.
pub fn parse_feature_gates(field: &str, s: &str) -> Result<BTreeMap<String, bool>, ConfigError> {
    let mut gates = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| bad(field, format!("{pair:?}: expected NAME=true|false")))?;
        let on = match value.trim() {
            "1" | "t" | "T" | "true" | "TRUE" | "True" => true,
            "0" | "f" | "F" | "false" | "FALSE" | "False" => false,
            other => {
                return Err(bad(
                    field,
                    format!("{}: {other:?} is not a boolean", name.trim()),
                ));
            }
        };
        gates.insert(name.trim().to_string(), on);
    }
    Ok(gates)
}

fn cidrs(field: &str, items: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|_| bad(field, format!("{s:?} is not a CIDR")))
        })
        .collect()
}

/// `ADDR:PORT`, or an address alone (kube-proxy appends the default port).
fn bind_addr(field: &str, s: &str, port: u16) -> Result<SocketAddr, ConfigError> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let ip = s.trim_start_matches('[').trim_end_matches(']');
    ip.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, port))
        .map_err(|_| bad(field, format!("{s:?} is not ADDRESS:PORT")))
}

/// A value from a flag (taken as given) or else from the file (where empty or zero means
/// "the default"), with the name of the field it came from.
fn pick<'a>(
    flag: Option<&'a str>,
    flag_name: &'static str,
    file: &[(Option<&'a str>, &'static str)],
) -> Option<(&'a str, &'static str, bool)> {
    if let Some(v) = flag {
        return Some((v, flag_name, true));
    }
    file.iter()
        .find_map(|(v, name)| v.filter(|v| !v.is_empty()).map(|v| (v, *name, false)))
}

/// A duration from a flag or the file; zero in the file means the default.
fn duration(
    v: Option<(&str, &'static str, bool)>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some((v, field, from_flag)) => {
            let d = parse_go_duration(field, v)?;
            Ok(if d.is_zero() && !from_flag {
                default
            } else {
                d
            })
        }
    }
}

/// Merges the file and the flags (flags win), applies kube-proxy's defaulting and validates
/// everything.
pub fn resolve(
    file: Option<&KubeProxyConfiguration>,
    flags: &Overrides,
) -> Result<Settings, ConfigError> {
    let empty = KubeProxyConfiguration::default();
    let f = file.unwrap_or(&empty);
    let nft = f.nftables.clone().unwrap_or_default();
    let ipt = f.iptables.clone().unwrap_or_default();
    let mut warnings = Vec::new();
    check_mode("--proxy-mode", flags.proxy_mode.as_deref())?;
    // `mode: ""` is kube-proxy's iptables mode: its section fills what nftables leaves unset.
    let legacy = matches!(f.mode.as_deref(), None | Some("")) && flags.proxy_mode.is_none();
    let ipt_if_legacy = |v: Option<String>| if legacy { v } else { None };
    let node = flags
        .node
        .as_deref()
        .map(str::trim)
        .or_else(|| f.hostname_override.as_deref().map(str::trim))
        .filter(|h| !h.is_empty())
        .map(str::to_lowercase)
        .ok_or_else(|| {
            bad(
                "--node",
                "the node name is required (--node/--hostname-override, NODE_NAME or hostnameOverride)",
            )
        })?;
    let cluster_cidrs = match pick(
        flags.cluster_cidr.as_deref(),
        "--cluster-cidr",
        &[(f.cluster_cidr.as_deref(), "clusterCIDR")],
    ) {
        Some((v, field, _)) => cidrs(field, &v.split(',').map(str::to_string).collect::<Vec<_>>())?,
        None => Vec::new(),
    };
    let dl = f.detect_local.clone().unwrap_or_default();
    let (mode, mode_field) = match &flags.detect_local_mode {
        Some(m) => (Some(m.as_str()), "--detect-local-mode"),
        None => (f.detect_local_mode.as_deref(), "detectLocalMode"),
    };
    let bridge = flags
        .pod_bridge_interface
        .clone()
        .or(dl.bridge_interface)
        .unwrap_or_default();
    let prefix = flags
        .pod_interface_name_prefix
        .clone()
        .or(dl.interface_name_prefix)
        .unwrap_or_default();
    let detect_local = DetectLocalMode::parse(mode_field, mode, &bridge, &prefix)?;
    match &detect_local {
        DetectLocalMode::BridgeInterface(b) if b.is_empty() => {
            return Err(bad(
                "detectLocal.bridgeInterface",
                "must be set with detectLocalMode BridgeInterface (--pod-bridge-interface)",
            ));
        }
        DetectLocalMode::InterfaceNamePrefix(p) if p.is_empty() => {
            return Err(bad(
                "detectLocal.interfaceNamePrefix",
                "must be set with detectLocalMode InterfaceNamePrefix (--pod-interface-name-prefix)",
            ));
        }
        _ => {}
    }
    detect_local.to_compile(
        "detectLocal.bridgeInterface",
        "detectLocal.interfaceNamePrefix",
    )?;
    let nodeport_items: Option<(Vec<String>, &str)> =
        match (&flags.nodeport_addresses, &f.node_port_addresses) {
            (Some(v), _) => Some((
                v.split(',').map(str::to_string).collect(),
                "--nodeport-addresses",
            )),
            (None, Some(list)) => Some((list.clone(), "nodePortAddresses")),
            (None, None) => None,
        };
    let mut nodeport_primary = false;
    let nodeport_cidrs = match nodeport_items {
        Some((items, field)) => {
            let (keywords, cidr_items): (Vec<String>, Vec<String>) = items
                .into_iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .partition(|s| s == "primary");
            nodeport_primary = !keywords.is_empty();
            Some(cidrs(field, &cidr_items)?)
        }
        None => None,
    }
    .filter(|v| !v.is_empty());
    let (bit, field) = match (flags.masquerade_bit, nft.masquerade_bit, ipt.masquerade_bit) {
        (Some(b), _, _) => (b, "--masquerade-bit"),
        (None, Some(b), _) => (b, "nftables.masqueradeBit"),
        (None, None, Some(b)) if legacy => (b, "iptables.masqueradeBit"),
        _ => (14, "nftables.masqueradeBit"),
    };
    let masquerade_bit = u8::try_from(bit)
        .ok()
        .filter(|b| *b <= 31)
        .ok_or_else(|| bad(field, format!("{bit} is out of range 0..=31")))?;
    let nft_sync = nft.sync_period.clone();
    let ipt_sync = ipt_if_legacy(ipt.sync_period.clone());
    let sync_period = duration(
        pick(
            flags.sync_period.as_deref(),
            "--sync-period",
            &[
                (
                    nft_sync.as_deref().filter(|v| !is_zero(v)),
                    "nftables.syncPeriod",
                ),
                (
                    f.sync_period.as_deref().filter(|v| !is_zero(v)),
                    "syncPeriod",
                ),
                (
                    ipt_sync.as_deref().filter(|v| !is_zero(v)),
                    "iptables.syncPeriod",
                ),
            ],
        ),
        Duration::from_secs(30),
    )?;
    let nft_min = nft.min_sync_period.clone();
    let ipt_min = ipt_if_legacy(ipt.min_sync_period.clone());
    let min_sync_period = duration(
        pick(
            flags.min_sync_period.as_deref(),
            "--min-sync-period",
            &[
                (
                    nft_min.as_deref().filter(|v| !is_zero(v)),
                    "nftables.minSyncPeriod",
                ),
                (
                    f.min_sync_period.as_deref().filter(|v| !is_zero(v)),
                    "minSyncPeriod",
                ),
                (
                    ipt_min.as_deref().filter(|v| !is_zero(v)),
                    "iptables.minSyncPeriod",
                ),
            ],
        ),
        Duration::from_secs(1),
    )?;
    if sync_period.is_zero() {
        return Err(bad("--sync-period", "must be greater than 0"));
    }
    if min_sync_period > sync_period {
        return Err(bad(
            if flags.min_sync_period.is_some() {
                "--min-sync-period"
            } else {
                "nftables.minSyncPeriod"
            },
            format!(
                "{} must not exceed syncPeriod {}",
                format_go_duration(min_sync_period),
                format_go_duration(sync_period)
            ),
        ));
    }
    // Defaults follow the family of bindAddress, as kube-proxy's.
    let bind_address = match pick(
        flags.bind_address.as_deref(),
        "--bind-address",
        &[(f.bind_address.as_deref(), "bindAddress")],
    ) {
        Some((v, field, _)) if !v.is_empty() => v
            .parse()
            .map_err(|_| bad(field, format!("{v:?} is not an IP address")))?,
        _ => IpAddr::from([0, 0, 0, 0]),
    };
    let (any, loopback): (IpAddr, IpAddr) = if bind_address.is_ipv4() {
        ([0, 0, 0, 0].into(), [127, 0, 0, 1].into())
    } else {
        (
            std::net::Ipv6Addr::UNSPECIFIED.into(),
            std::net::Ipv6Addr::LOCALHOST.into(),
        )
    };
    let server_addr = |flag: Option<&str>,
                       flag_name: &'static str,
                       file: Option<&str>,
                       file_name: &'static str,
                       default: SocketAddr|
     -> Result<Option<SocketAddr>, ConfigError> {
        match pick(flag, flag_name, &[(file, file_name)]) {
            // An empty flag disables the server; an empty file value is the default.
            Some(("", _, true)) => Ok(None),
            Some((v, field, _)) => bind_addr(field, v, default.port()).map(Some),
            None => Ok(Some(default)),
        }
    };
    let healthz_bind = server_addr(
        flags.healthz_bind_address.as_deref(),
        "--healthz-bind-address",
        f.healthz_bind_address.as_deref(),
        "healthzBindAddress",
        SocketAddr::new(any, 10256),
    )?;
    let metrics_bind = server_addr(
        flags.metrics_bind_address.as_deref(),
        "--metrics-bind-address",
        f.metrics_bind_address.as_deref(),
        "metricsBindAddress",
        SocketAddr::new(loopback, 10249),
    )?;
    let file_ct = f.conntrack.clone().unwrap_or_default();
    let fl = &flags.conntrack;
    let conntrack = ConntrackConfiguration {
        max_per_core: fl.max_per_core.or(file_ct.max_per_core),
        min: fl.min.or(file_ct.min),
        tcp_established_timeout: fl
            .tcp_established_timeout
            .clone()
            .or(file_ct.tcp_established_timeout),
        tcp_close_wait_timeout: fl
            .tcp_close_wait_timeout
            .clone()
            .or(file_ct.tcp_close_wait_timeout),
        tcp_be_liberal: fl.tcp_be_liberal.or(file_ct.tcp_be_liberal),
        udp_timeout: fl.udp_timeout.clone().or(file_ct.udp_timeout),
        udp_stream_timeout: fl.udp_stream_timeout.clone().or(file_ct.udp_stream_timeout),
    };
    for (field, v) in [
        (
            "conntrack.tcpEstablishedTimeout",
            &conntrack.tcp_established_timeout,
        ),
        (
            "conntrack.tcpCloseWaitTimeout",
            &conntrack.tcp_close_wait_timeout,
        ),
        ("conntrack.udpTimeout", &conntrack.udp_timeout),
        ("conntrack.udpStreamTimeout", &conntrack.udp_stream_timeout),
    ] {
        if let Some(v) = v {
            parse_go_duration(field, v)?;
        }
    }
    for (field, v) in [
        ("conntrack.maxPerCore", conntrack.max_per_core),
        ("conntrack.min", conntrack.min),
    ] {
        if v.is_some_and(|v| v < 0) {
            return Err(bad(field, "must not be negative"));
        }
    }
    let (oom, oom_field) = match (flags.oom_score_adj, f.oom_score_adj) {
        (Some(v), _) => (v, "--oom-score-adj"),
        (None, Some(v)) => (v, "oomScoreAdj"),
        (None, None) => (-999, "oomScoreAdj"),
    };
    let oom_score_adj = i32::try_from(oom)
        .ok()
        .filter(|v| (-1000..=1000).contains(v))
        .ok_or_else(|| bad(oom_field, format!("{oom} is out of range -1000..=1000")))?;
    let logging = f.logging.clone().unwrap_or_default();
    let log_format = match (&flags.logging_format, &logging.format) {
        (Some(v), _) => LogFormat::parse("--logging-format", v)?,
        (None, Some(v)) => LogFormat::parse("logging.format", v)?,
        (None, None) => LogFormat::Text,
    };
    let verbosity = flags.verbosity.or(logging.verbosity).unwrap_or(0);
    if f.enable_profiling == Some(true) {
        warnings.push("enableProfiling: not supported by lb-proxy; ignored".into());
    }
    let file_gates = f.feature_gates.clone().unwrap_or_default();
    let flag_gates = flags
        .feature_gates
        .as_deref()
        .map(|g| parse_feature_gates("--feature-gates", g))
        .transpose()?
        .unwrap_or_default();
    let not_ours = |name: &&String| name.as_str() != WATCH_LIST_CLIENT;
    for (name, on) in file_gates.iter().filter(|(n, _)| not_ours(n)) {
        warnings.push(format!(
            "featureGates.{name}: {on}: a kube-proxy feature gate that does not apply to lb-proxy; ignored"
        ));
    }
    for (name, on) in flag_gates.iter().filter(|(n, _)| not_ours(n)) {
        warnings.push(format!(
            "--feature-gates={name}={on}: a kube-proxy feature gate that does not apply to lb-proxy; ignored"
        ));
    }
    let watch_list = flag_gates
        .get(WATCH_LIST_CLIENT)
        .or_else(|| file_gates.get(WATCH_LIST_CLIENT))
        .copied()
        .unwrap_or(true);
    let source = match &flags.config {
        Some(p) => format!("file {} and flags", p.display()),
        None => "flags".into(),
    };
    Ok(Settings {
        kubeconfig: flags.kubeconfig.clone().or_else(|| {
            f.client_connection
                .as_ref()
                .and_then(|c| c.kubeconfig.clone())
                .filter(|k| !k.is_empty())
                .map(PathBuf::from)
        }),
        master: flags.master.clone().filter(|m| !m.is_empty()),
        node,
        cluster_cidrs,
        detect_local,
        nodeport_cidrs,
        nodeport_primary,
        masquerade_all: flags
            .masquerade_all
            .or(nft.masquerade_all.filter(|m| *m))
            .or(ipt.masquerade_all.filter(|m| *m && legacy))
            .unwrap_or(false),
        masquerade_bit,
        min_sync_period,
        sync_period,
        healthz_bind,
        metrics_bind,
        health_check_bind: bind_address,
        bind_address_hard_fail: flags
            .bind_address_hard_fail
            .or(f.bind_address_hard_fail)
            .unwrap_or(false),
        oom_score_adj,
        conntrack,
        verbosity,
        log_format,
        source,
        watch_list,
        warnings,
    })
}

/// Whether a duration string is zero (`0`, `0s`, `0m0s`, …); unparsable is not zero.
fn is_zero(v: &str) -> bool {
    parse_go_duration("", v).is_ok_and(|d| d.is_zero())
}

impl Settings {
    /// The effective configuration as a v1alpha1 `KubeProxyConfiguration` (what `/configz`
    /// serves and `--write-config-to` writes; reading it back gives the same settings).
    pub fn to_kube_proxy_configuration(&self) -> Value {
        let addr = |a: &Option<SocketAddr>| a.map_or(String::new(), |a| a.to_string());
        let dur = |v: &Option<String>| -> Value {
            v.as_deref()
                .and_then(|v| parse_go_duration("", v).ok())
                .map_or(Value::Null, |d| Value::from(format_go_duration(d)))
        };
        let (bridge, prefix) = match &self.detect_local {
            DetectLocalMode::BridgeInterface(b) => (b.clone(), String::new()),
            DetectLocalMode::InterfaceNamePrefix(p) => (String::new(), p.clone()),
            _ => (String::new(), String::new()),
        };
        let mut nodeport: Vec<String> = self
            .nodeport_cidrs
            .iter()
            .flatten()
            .map(ToString::to_string)
            .collect();
        if self.nodeport_primary {
            nodeport.insert(0, "primary".into());
        }
        let mut effective = json!({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "bindAddress": self.health_check_bind.to_string(),
            "bindAddressHardFail": self.bind_address_hard_fail,
            "clientConnection": {
                "kubeconfig": self.kubeconfig.as_ref().map_or(String::new(), |k| k.display().to_string()),
            },
            "clusterCIDR": self.cluster_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            "conntrack": {
                "maxPerCore": self.conntrack.max_per_core,
                "min": self.conntrack.min,
                "tcpBeLiberal": self.conntrack.tcp_be_liberal.unwrap_or(false),
                "tcpCloseWaitTimeout": dur(&self.conntrack.tcp_close_wait_timeout),
                "tcpEstablishedTimeout": dur(&self.conntrack.tcp_established_timeout),
                "udpStreamTimeout": dur(&self.conntrack.udp_stream_timeout),
                "udpTimeout": dur(&self.conntrack.udp_timeout),
            },
            "detectLocal": {"bridgeInterface": bridge, "interfaceNamePrefix": prefix},
            "detectLocalMode": self.detect_local.as_str(),
            "healthzBindAddress": addr(&self.healthz_bind),
            "hostnameOverride": self.node,
            "logging": {
                "format": match self.log_format { LogFormat::Text => "text", LogFormat::Json => "json" },
                "verbosity": self.verbosity,
            },
            "metricsBindAddress": addr(&self.metrics_bind),
            "mode": "nftables",
            "nftables": {
                "masqueradeAll": self.masquerade_all,
                "masqueradeBit": self.masquerade_bit,
                "minSyncPeriod": format_go_duration(self.min_sync_period),
                "syncPeriod": format_go_duration(self.sync_period),
            },
            "nodePortAddresses": if nodeport.is_empty() { Value::Null } else { json!(nodeport) },
            "oomScoreAdj": self.oom_score_adj,
        });
        // Only when off: the default needs no gate, and the other gates are not applied.
        if !self.watch_list {
            effective["featureGates"] = json!({ WATCH_LIST_CLIENT: false });
        }
        effective
    }
}

/// Applies the conntrack sysctls of `c` in the current network namespace (kube-proxy does this
/// at start). A value that cannot be written is reported, not fatal.
pub fn apply_conntrack_sysctls(c: &ConntrackConfiguration) -> Vec<String> {
    let mut problems = Vec::new();
    let mut write = |name: &str, value: String| {
        let path = format!("/proc/sys/net/netfilter/{name}");
        if let Err(e) = std::fs::write(&path, &value) {
            problems.push(format!("{path} = {value}: {e}"));
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as i64);
    let max = c
        .max_per_core
        .unwrap_or(0)
        .saturating_mul(cores)
        .max(c.min.unwrap_or(0));
    if c.max_per_core.unwrap_or(0) > 0 && max > 0 {
        write("nf_conntrack_max", max.to_string());
    }
    for (name, v) in [
        (
            "nf_conntrack_tcp_timeout_established",
            &c.tcp_established_timeout,
        ),
        (
            "nf_conntrack_tcp_timeout_close_wait",
            &c.tcp_close_wait_timeout,
        ),
        ("nf_conntrack_udp_timeout", &c.udp_timeout),
        ("nf_conntrack_udp_timeout_stream", &c.udp_stream_timeout),
    ] {
        if let Some(d) = v
            .as_deref()
            .and_then(|v| parse_go_duration(name, v).ok())
            .filter(|d| !d.is_zero())
        {
            write(name, d.as_secs().to_string());
        }
    }
    if c.tcp_be_liberal == Some(true) {
        write("nf_conntrack_tcp_be_liberal", "1".into());
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(yaml: &str) -> KubeProxyConfiguration {
        KubeProxyConfiguration::parse(yaml).expect("valid configuration")
    }

    fn node_flag() -> Overrides {
        Overrides {
            node: Some("n".into()),
            ..Overrides::default()
        }
    }

    /// kubeadm's `config.conf` (kubeadm's kube-proxy ConfigMap, v1alpha1 with kubeadm's
    /// defaults), as `kubectl -n kube-system get cm kube-proxy` shows it.
    pub(crate) const KUBEADM_CONFIG_CONF: &str =
        include_str!("../../tests/data/kubeadm-config.conf");

    #[test]
    fn go_durations_parse_like_kube_proxy_writes_them() {
        assert_eq!(
            parse_go_duration("f", "1h0m0s"),
            Ok(Duration::from_secs(3600))
        );
        assert_eq!(parse_go_duration("f", "1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_go_duration("f", "1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(
            parse_go_duration("f", "500ms"),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(parse_go_duration("f", "0"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("f", "0s"), Ok(Duration::ZERO));
        assert_eq!(
            parse_go_duration("f", "1.5s"),
            Ok(Duration::from_millis(1500))
        );
        assert!(parse_go_duration("f", "5 parsecs").is_err());
        assert!(parse_go_duration("f", "30").is_err(), "Go requires a unit");
    }

    #[test]
    fn go_durations_format_like_go() {
        for (d, s) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_millis(1500), "1.5s"),
        ] {
            assert_eq!(format_go_duration(d), s);
            assert_eq!(parse_go_duration("f", s), Ok(d));
        }
    }

    #[test]
    fn kubeadms_config_conf_gets_kube_proxys_defaults() {
        let f = file(KUBEADM_CONFIG_CONF);
        let s = resolve(Some(&f), &node_flag()).expect("kubeadm's file is valid");
        assert_eq!(s.sync_period, Duration::from_secs(30));
        assert_eq!(s.min_sync_period, Duration::from_secs(1));
        assert_eq!(
            s.healthz_bind,
            Some("0.0.0.0:10256".parse().expect("literal"))
        );
        assert_eq!(
            s.metrics_bind,
            Some("127.0.0.1:10249".parse().expect("literal"))
        );
        assert_eq!(s.masquerade_bit, 14);
        assert_eq!(s.nodeport_cidrs, None);
        assert_eq!(s.detect_local, DetectLocalMode::ClusterCidr);
        assert_eq!(
            s.cluster_cidrs,
            vec!["10.244.0.0/16".parse::<IpNet>().expect("literal")]
        );
        assert_eq!(
            s.kubeconfig,
            Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        assert_eq!(s.oom_score_adj, -999);
        assert_eq!(
            s.conntrack.max_per_core, None,
            "null leaves the kernel alone"
        );
    }

    #[test]
    fn zero_in_the_file_is_the_default_but_a_zero_flag_is_taken_as_given() {
        let f =
            file("nftables:\n  minSyncPeriod: 0s\n  syncPeriod: 0s\nmetricsBindAddress: \"\"\n");
        let s = resolve(Some(&f), &node_flag()).expect("valid");
        assert_eq!(s.min_sync_period, Duration::from_secs(1));
        assert_eq!(s.sync_period, Duration::from_secs(30));
        assert!(s.metrics_bind.is_some());
        let flags = Overrides {
            min_sync_period: Some("0".into()),
            metrics_bind_address: Some(String::new()),
            ..node_flag()
        };
        let s = resolve(Some(&f), &flags).expect("valid");
        assert_eq!(s.min_sync_period, Duration::ZERO);
        assert_eq!(s.metrics_bind, None, "an empty flag disables the server");
    }

    #[test]
    fn an_address_without_port_gets_the_default_port_and_ipv6_bind_moves_the_defaults() {
        let f = file("healthzBindAddress: 10.0.0.1\n");
        let s = resolve(Some(&f), &node_flag()).expect("valid");
        assert_eq!(
            s.healthz_bind,
            Some("10.0.0.1:10256".parse().expect("literal"))
        );
        let f = file("bindAddress: \"::\"\n");
        let s = resolve(Some(&f), &node_flag()).expect("valid");
        assert_eq!(s.healthz_bind, Some("[::]:10256".parse().expect("literal")));
        assert_eq!(
            s.metrics_bind,
            Some("[::1]:10249".parse().expect("literal"))
        );
    }

    #[test]
    fn an_empty_mode_takes_sync_periods_and_the_bit_from_the_iptables_section() {
        let f = file(
            "mode: \"\"\niptables:\n  minSyncPeriod: 5s\n  masqueradeBit: 12\nnftables:\n  minSyncPeriod: 0s\n",
        );
        let s = resolve(Some(&f), &node_flag()).expect("valid");
        assert_eq!(s.min_sync_period, Duration::from_secs(5));
        assert_eq!(s.masquerade_bit, 12);
        let f = file("mode: nftables\niptables:\n  minSyncPeriod: 5s\n");
        let s = resolve(Some(&f), &node_flag()).expect("valid");
        assert_eq!(s.min_sync_period, Duration::from_secs(1));
    }

    #[test]
    fn a_misspelt_field_is_an_error_naming_its_path() {
        let e =
            KubeProxyConfiguration::parse("nftables:\n  minSyncPerod: 0s\n").expect_err("strict");
        assert_eq!(e.field, "nftables.minSyncPerod");
        assert!(e.reason.contains("unknown field"), "{e}");
        let e = KubeProxyConfiguration::parse("clusterCidr: 10.0.0.0/8\n").expect_err("strict");
        assert_eq!(e.field, "clusterCidr");
    }

    #[test]
    fn the_file_is_read_and_flags_override_it() {
        let f = file(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\nclusterCIDR: 10.244.0.0/16\nhostnameOverride: n1\nmetricsBindAddress: 0.0.0.0:10249\nnftables:\n  masqueradeBit: 15\n  minSyncPeriod: 2s\n  syncPeriod: 30s\niptables:\n  masqueradeBit: 14\n",
        );
        let s = resolve(Some(&f), &Overrides::default()).expect("valid");
        assert_eq!(s.node, "n1");
        assert_eq!(s.masquerade_bit, 15);
        assert_eq!(s.min_sync_period, Duration::from_secs(2));
        assert_eq!(
            s.metrics_bind,
            Some("0.0.0.0:10249".parse().expect("literal"))
        );
        let flags = Overrides {
            node: Some("N2".into()),
            masquerade_bit: Some(3),
            ..Overrides::default()
        };
        let s = resolve(Some(&f), &flags).expect("valid");
        assert_eq!((s.node.as_str(), s.masquerade_bit), ("n2", 3));
    }

    #[test]
    fn the_watch_list_client_gate_is_on_by_default_and_the_flag_overrides_the_file() {
        let s = resolve(None, &node_flag()).expect("valid");
        assert!(s.watch_list);
        assert!(
            s.to_kube_proxy_configuration()
                .get("featureGates")
                .is_none()
        );
        let f = file("featureGates:\n  WatchListClient: false\n  NFTablesProxyMode: true\n");
        let s = resolve(Some(&f), &node_flag()).expect("valid");
        assert!(!s.watch_list);
        assert_eq!(
            s.to_kube_proxy_configuration()["featureGates"]["WatchListClient"],
            false
        );
        assert_eq!(
            s.warnings,
            [
                "featureGates.NFTablesProxyMode: true: a kube-proxy feature gate that does not apply to lb-proxy; ignored"
            ]
        );
        let flags = Overrides {
            feature_gates: Some("WatchListClient=true, Other=0".into()),
            ..node_flag()
        };
        let s = resolve(Some(&f), &flags).expect("valid");
        assert!(s.watch_list, "the flag wins");
        assert!(
            s.warnings
                .iter()
                .any(|w| w.starts_with("--feature-gates=Other=false: ")),
            "{:?}",
            s.warnings
        );
        for (gates, reason) in [
            ("WatchListClient", "expected NAME=true|false"),
            ("WatchListClient=maybe", "is not a boolean"),
        ] {
            let flags = Overrides {
                feature_gates: Some(gates.into()),
                ..node_flag()
            };
            let e = resolve(None, &flags).expect_err("invalid gate");
            assert_eq!(e.field, "--feature-gates");
            assert!(e.reason.contains(reason), "{e}");
        }
        assert_eq!(
            parse_feature_gates("f", "").expect("empty is none"),
            BTreeMap::new()
        );
    }

    #[test]
    fn node_port_addresses_default_to_primary_and_accept_primary_from_the_file_and_the_flag() {
        // Issue 9, point 5.
        let flags = Overrides {
            node: Some("n".into()),
            ..Overrides::default()
        };
        let primary = |f: Option<&KubeProxyConfiguration>, flags: &Overrides| {
            resolve(f, flags).map(|s| s.nodeport_addresses())
        };
        assert_eq!(primary(None, &flags), Ok(NodePortAddresses::Primary));
        let f = file("nodePortAddresses: [primary]\n");
        assert_eq!(primary(Some(&f), &flags), Ok(NodePortAddresses::Primary));
        let f = file("nodePortAddresses: []\n");
        assert_eq!(primary(Some(&f), &flags), Ok(NodePortAddresses::Primary));
        let f = file("nodePortAddresses: [10.0.0.0/8]\n");
        assert_eq!(
            primary(Some(&f), &flags),
            Ok(NodePortAddresses::Cidrs(vec![
                "10.0.0.0/8".parse().expect("cidr")
            ]))
        );
        let f = file("nodePortAddresses: [0.0.0.0/0, \"::/0\"]\n");
        assert_eq!(primary(Some(&f), &flags), Ok(NodePortAddresses::All));
        let with_flag = |v: &str| Overrides {
            nodeport_addresses: Some(v.into()),
            ..flags.clone()
        };
        assert_eq!(
            primary(Some(&f), &with_flag("primary")),
            Ok(NodePortAddresses::Primary)
        );
        assert_eq!(
            primary(None, &with_flag("eth0")).map_err(|e| e.field),
            Err("--nodeport-addresses".into())
        );
    }

    #[test]
    fn the_effective_configuration_reads_back_as_the_same_settings() {
        let f = file(KUBEADM_CONFIG_CONF);
        let flags = Overrides {
            conntrack: ConntrackConfiguration {
                udp_timeout: Some("30s".into()),
                ..ConntrackConfiguration::default()
            },
            detect_local_mode: Some("InterfaceNamePrefix".into()),
            pod_interface_name_prefix: Some("veth".into()),
            nodeport_addresses: Some("primary,10.0.0.0/8".into()),
            ..node_flag()
        };
        let s = resolve(Some(&f), &flags).expect("valid");
        let written = serde_json::to_string(&s.to_kube_proxy_configuration()).expect("json");
        let back = resolve(Some(&file(&written)), &Overrides::default()).expect("valid");
        assert_eq!(
            Settings {
                source: String::new(),
                warnings: Vec::new(),
                ..back
            },
            Settings {
                source: String::new(),
                warnings: Vec::new(),
                ..s
            }
        );
    }

    #[test]
    fn detect_local_modes_and_primary_are_accepted_and_others_refused() {
        let s = resolve(
            Some(&file(
                "detectLocalMode: NodeCIDR\nnodePortAddresses: [primary]\n",
            )),
            &node_flag(),
        )
        .expect("valid");
        assert_eq!(s.detect_local, DetectLocalMode::NodeCidr);
        assert!(s.nodeport_primary);
        assert_eq!(s.nodeport_cidrs, None);
        let e = KubeProxyConfiguration::parse("detectLocalMode: Magic\n").expect_err("invalid");
        assert_eq!(e.field, "detectLocalMode");
        let e = resolve(
            Some(&file("detectLocalMode: BridgeInterface\n")),
            &node_flag(),
        )
        .expect_err("needs the bridge");
        assert_eq!(e.field, "detectLocal.bridgeInterface");
        let flags = Overrides {
            proxy_mode: Some("iptables".into()),
            ..node_flag()
        };
        let e = resolve(None, &flags).expect_err("only nftables");
        assert_eq!(e.field, "--proxy-mode");
        assert!(
            e.reason.contains("only implements the nftables mode"),
            "{e}"
        );
    }

    #[test]
    fn every_detect_local_mode_becomes_the_compilers_setting_with_its_interface() {
        use crate::compile::DetectLocal;
        use crate::nft::ir::IfName;
        let mode = |yaml: &str| {
            resolve(Some(&file(yaml)), &node_flag())
                .and_then(|s| s.detect_local.to_compile("bridge", "prefix"))
        };
        assert_eq!(
            mode("clusterCIDR: 10.0.0.0/8\n"),
            Ok(DetectLocal::ClusterCidr)
        );
        assert_eq!(
            mode("detectLocalMode: NodeCIDR\n"),
            Ok(DetectLocal::NodeCidr(Vec::new()))
        );
        assert_eq!(
            mode("detectLocalMode: BridgeInterface\ndetectLocal:\n  bridgeInterface: cbr0\n"),
            Ok(DetectLocal::BridgeInterface(
                IfName::new("cbr0").expect("name")
            ))
        );
        assert_eq!(
            mode(
                "detectLocalMode: InterfaceNamePrefix\ndetectLocal:\n  interfaceNamePrefix: veth\n"
            ),
            Ok(DetectLocal::InterfaceNamePrefix(
                IfName::prefix("veth").expect("prefix")
            ))
        );
        // The flags win over the file.
        let over = Overrides {
            detect_local_mode: Some("InterfaceNamePrefix".into()),
            pod_interface_name_prefix: Some("cali".into()),
            ..node_flag()
        };
        assert_eq!(
            resolve(Some(&file("detectLocalMode: NodeCIDR\n")), &over)
                .and_then(|s| s.detect_local.to_compile("bridge", "prefix")),
            Ok(DetectLocal::InterfaceNamePrefix(
                IfName::prefix("cali").expect("prefix")
            ))
        );
    }

    #[test]
    fn an_interface_name_the_kernel_cannot_hold_is_an_error_naming_the_field() {
        for yaml in [
            "detectLocalMode: BridgeInterface\ndetectLocal:\n  bridgeInterface: a-name-longer-than-15\n",
            "detectLocalMode: BridgeInterface\ndetectLocal:\n  bridgeInterface: \"br*\"\n",
        ] {
            assert_eq!(
                resolve(Some(&file(yaml)), &node_flag()).map_err(|e| e.field),
                Err("detectLocal.bridgeInterface".into()),
                "{yaml}"
            );
        }
        let e = resolve(
            Some(&file(
                "detectLocalMode: InterfaceNamePrefix\ndetectLocal:\n  interfaceNamePrefix: \"ve\\\"th\"\n",
            )),
            &node_flag(),
        )
        .expect_err("invalid prefix");
        assert_eq!(e.field, "detectLocal.interfaceNamePrefix");
    }

    #[test]
    fn invalid_values_are_rejected_naming_the_field() {
        let flags = node_flag();
        for (yaml, field) in [
            ("nftables:\n  masqueradeBit: 40\n", "nftables.masqueradeBit"),
            ("clusterCIDR: 10.0.0.0/33\n", "clusterCIDR"),
            (
                "nftables:\n  minSyncPeriod: 1m\n  syncPeriod: 30s\n",
                "nftables.minSyncPeriod",
            ),
            ("healthzBindAddress: nowhere\n", "healthzBindAddress"),
            ("conntrack:\n  udpTimeout: soon\n", "conntrack.udpTimeout"),
            ("oomScoreAdj: 5000\n", "oomScoreAdj"),
            ("logging:\n  format: xml\n", "logging.format"),
        ] {
            assert_eq!(
                resolve(Some(&file(yaml)), &flags).map_err(|e| e.field),
                Err(field.into()),
                "{yaml}"
            );
        }
        assert_eq!(
            resolve(None, &Overrides::default()).map_err(|e| e.field),
            Err("--node".into())
        );
        let e = KubeProxyConfiguration::parse("mode: ipvs\n").expect_err("not nftables");
        assert_eq!(e.field, "mode");
    }
}

// ---------------------------------------------------------------------------------------------
// What the command line asks for, typed: `cli` builds these, `commands` and `daemon` run them.

/// How `run` runs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Apply once and exit.
    pub once: bool,
    /// With `once`: program what is valid even when some inputs were skipped.
    pub keep_going: bool,
    /// How often to look for changed files.
    pub poll: Duration,
    /// How long a changed file must stay unchanged before it is read.
    pub settle: Duration,
    /// Where to serve `/metrics`.
    pub metrics_bind_address: Option<SocketAddr>,
    /// Delete stale UDP/SCTP conntrack entries after syncs.
    pub conntrack_cleanup: bool,
}

/// An `explain` question as the command line gives it.
#[derive(Debug, Clone)]
pub struct Question {
    /// Destination: ADDR:PORT[/PROTO].
    pub to: String,
    /// Source address of the client.
    pub from: IpAddr,
    /// The client is the node itself.
    pub from_node: bool,
    /// Print JSON.
    pub json: bool,
    /// Trace the ruleset read back from the kernel (`nft -j`) instead of the compiled one.
    pub kernel: bool,
}

/// What the daemon's command line adds to the resolved configuration.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Write the effective configuration here and exit.
    pub write_config_to: Option<PathBuf>,
    /// Apply the privileged settings and exit.
    pub init_only: bool,
    /// Start even though kube-proxy's rules are present.
    pub take_over: bool,
    /// `--service-cidr`.
    pub service_cidrs: Vec<IpNet>,
    /// Name of the nftables tables.
    pub table: String,
    /// `--service-proxy-name`.
    pub service_proxy_name: Option<String>,
    /// Interval of full resyncs.
    pub full_sync_period: Duration,
    /// Delete stale UDP/SCTP conntrack entries after syncs.
    pub conntrack_cleanup: bool,
    /// Every flag and its value, for `/flagz`.
    pub flagz: Vec<(String, String)>,
}

/// What the command line asks for, validated: built by `cli`, carried out by
/// `commands::execute`.
#[derive(Debug)]
pub enum Invocation {
    /// `render`: print the ruleset for the manifests.
    Render {
        /// The manifests.
        files: crate::source::files::Files,
        /// Compiler settings.
        config: CompileConfig,
        /// Render what is valid even when some inputs were skipped.
        keep_going: bool,
    },
    /// `run`: program the node from the manifests.
    Run {
        /// The manifests.
        files: crate::source::files::Files,
        /// Compiler settings.
        config: CompileConfig,
        /// How.
        options: RunOptions,
    },
    /// `explain` from the manifests.
    Explain {
        /// The manifests.
        files: crate::source::files::Files,
        /// Compiler settings.
        config: CompileConfig,
        /// The question.
        question: Question,
    },
    /// `explain --live`: ask the running daemon.
    ExplainLive {
        /// The daemon's health address.
        addr: SocketAddr,
        /// The question.
        question: Question,
    },
    /// `cleanup` (also `daemon --cleanup`): delete the tables.
    Cleanup {
        /// Table name.
        table: String,
    },
    /// `daemon`.
    Daemon {
        /// The resolved configuration.
        settings: Box<Settings>,
        /// Warnings about kube-proxy flags that do not apply, logged once logging is up.
        warnings: Vec<String>,
        /// What the command line adds.
        launch: Launch,
    },
}
