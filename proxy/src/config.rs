//! The configuration file, in the shape of kube-proxy's `KubeProxyConfiguration`
//! (`kubeproxy.config.k8s.io/v1alpha1`), for the fields that apply to lb-proxy. Command-line
//! flags override the file; every value is validated at start, and an invalid one is an error
//! naming its field.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::compile::NodePortAddresses;

/// `KubeProxyConfiguration`, the fields lb-proxy reads. Others (iptables, ipvs, …) are
/// accepted and ignored, so an existing kube-proxy file can be reused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    /// Must be `kubeproxy.config.k8s.io/v1alpha1` when present.
    pub api_version: Option<String>,
    /// Must be `KubeProxyConfiguration` when present.
    pub kind: Option<String>,
    /// `""` or `nftables`; lb-proxy only does nftables.
    pub mode: Option<String>,
    /// `healthzBindAddress` (`ADDR:PORT`, empty disables).
    pub healthz_bind_address: Option<String>,
    /// `metricsBindAddress` (`ADDR:PORT`, empty disables).
    pub metrics_bind_address: Option<String>,
    /// `bindAddress`: where the healthCheckNodePort responders listen.
    pub bind_address: Option<String>,
    /// `clusterCIDR`, comma-separated.
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    /// `detectLocalMode`: only `ClusterCIDR` (or empty) is supported.
    pub detect_local_mode: Option<String>,
    /// `nodePortAddresses`: `["primary"]` or CIDRs.
    pub node_port_addresses: Option<Vec<String>>,
    /// `hostnameOverride`: the node name.
    pub hostname_override: Option<String>,
    /// `syncPeriod` (newer configs hoist it to the top level).
    pub sync_period: Option<String>,
    /// `minSyncPeriod` (top-level form).
    pub min_sync_period: Option<String>,
    /// `nftables.*`.
    pub nftables: Option<NftablesConfiguration>,
    /// `conntrack.*`.
    pub conntrack: Option<ConntrackConfiguration>,
    /// `clientConnection.kubeconfig`.
    pub client_connection: Option<ClientConnection>,
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

impl KubeProxyConfiguration {
    /// Reads and parses a configuration file.
    pub fn read(path: &PathBuf) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad("--config", format!("{}: {e}", path.display())))?;
        let c: KubeProxyConfiguration = serde_saphyr::from_str(&text)
            .map_err(|e| bad("--config", format!("{}: {e}", path.display())))?;
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
        match self.mode.as_deref() {
            None | Some("") | Some("nftables") => {}
            Some(m) => {
                return Err(bad(
                    "mode",
                    format!("{m:?}: lb-proxy only implements nftables"),
                ));
            }
        }
        match self.detect_local_mode.as_deref() {
            None | Some("") | Some("ClusterCIDR") => Ok(()),
            Some(m) => Err(bad(
                "detectLocalMode",
                format!("{m:?} is not supported (use ClusterCIDR)"),
            )),
        }
    }
}

/// Everything the daemon needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Kubeconfig path (`None`: infer).
    pub kubeconfig: Option<PathBuf>,
    /// Node name.
    pub node: String,
    /// Pod CIDRs.
    pub cluster_cidrs: Vec<IpNet>,
    /// Where NodePorts are served (default `primary`, as kube-proxy's nftables mode).
    pub nodeport_addresses: NodePortAddresses,
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
    /// Conntrack sysctls.
    pub conntrack: ConntrackConfiguration,
}

/// Values given on the command line (`None`: not given), which override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// `--node`.
    pub node: Option<String>,
    /// `--cluster-cidr`.
    pub cluster_cidr: Option<String>,
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

fn node_port_addresses(field: &str, items: &[&str]) -> Result<NodePortAddresses, ConfigError> {
    NodePortAddresses::from_items(items).map_err(|reason| bad(field, reason))
}

fn addr(field: &str, s: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| bad(field, format!("{s:?} is not ADDRESS:PORT")))
}

/// Merges the file and the flags (flags win) and validates everything.
pub fn resolve(
    file: Option<&KubeProxyConfiguration>,
    flags: &Overrides,
) -> Result<Settings, ConfigError> {
    let empty = KubeProxyConfiguration::default();
    let f = file.unwrap_or(&empty);
    let nft = f.nftables.clone().unwrap_or_default();
    let pick = |flag: &Option<String>,
                flag_name: &'static str,
                file: Option<String>,
                file_name: &'static str| {
        flag.clone()
            .map(|v| (v, flag_name))
            .or(file.map(|v| (v, file_name)))
    };
    let node = flags
        .node
        .clone()
        .or_else(|| f.hostname_override.clone().filter(|h| !h.is_empty()))
        .ok_or_else(|| {
            bad(
                "--node",
                "the node name is required (--node, NODE_NAME or hostnameOverride)",
            )
        })?;
    let cluster_cidrs = match pick(
        &flags.cluster_cidr,
        "--cluster-cidr",
        f.cluster_cidr.clone(),
        "clusterCIDR",
    ) {
        Some((v, field)) => cidrs(field, &v.split(',').map(str::to_string).collect::<Vec<_>>())?,
        None => Vec::new(),
    };
    // kube-proxy's nftables mode treats an absent or empty list as `primary`.
    let nodeport_addresses = match (&flags.nodeport_addresses, &f.node_port_addresses) {
        (Some(v), _) => node_port_addresses(
            "--nodeport-addresses",
            &v.split(',').map(str::trim).collect::<Vec<_>>(),
        )?,
        (None, Some(list)) => node_port_addresses(
            "nodePortAddresses",
            &list.iter().map(|s| s.trim()).collect::<Vec<_>>(),
        )?,
        (None, None) => NodePortAddresses::Primary,
    };
    let bit = flags.masquerade_bit.or(nft.masquerade_bit).unwrap_or(14);
    let field = if flags.masquerade_bit.is_some() {
        "--masquerade-bit"
    } else {
        "nftables.masqueradeBit"
    };
    let masquerade_bit = u8::try_from(bit)
        .ok()
        .filter(|b| *b <= 31)
        .ok_or_else(|| bad(field, format!("{bit} is out of range 0..=31")))?;
    let duration =
        |v: Option<(String, &str)>, default: Duration| -> Result<Duration, ConfigError> {
            v.map_or(Ok(default), |(v, field)| parse_go_duration(field, &v))
        };
    let sync_period = duration(
        pick(
            &flags.sync_period,
            "--sync-period",
            nft.sync_period.clone().or(f.sync_period.clone()),
            "nftables.syncPeriod",
        ),
        Duration::from_secs(30),
    )?;
    let min_sync_period = duration(
        pick(
            &flags.min_sync_period,
            "--min-sync-period",
            nft.min_sync_period.clone().or(f.min_sync_period.clone()),
            "nftables.minSyncPeriod",
        ),
        Duration::from_secs(1),
    )?;
    if sync_period.is_zero() {
        return Err(bad("nftables.syncPeriod", "must be greater than 0"));
    }
    if min_sync_period > sync_period {
        return Err(bad("nftables.minSyncPeriod", "must not exceed syncPeriod"));
    }
    let healthz_bind = match pick(
        &flags.healthz_bind_address,
        "--healthz-bind-address",
        f.healthz_bind_address.clone(),
        "healthzBindAddress",
    ) {
        Some((v, field)) => addr(field, &v)?,
        None => Some(SocketAddr::from(([0, 0, 0, 0], 10256))),
    };
    let metrics_bind = match pick(
        &flags.metrics_bind_address,
        "--metrics-bind-address",
        f.metrics_bind_address.clone(),
        "metricsBindAddress",
    ) {
        Some((v, field)) => addr(field, &v)?,
        None => Some(SocketAddr::from(([127, 0, 0, 1], 10249))),
    };
    let health_check_bind = match pick(
        &flags.bind_address,
        "--bind-address",
        f.bind_address.clone(),
        "bindAddress",
    ) {
        Some((v, field)) if !v.is_empty() => v
            .parse()
            .map_err(|_| bad(field, format!("{v:?} is not an IP address")))?,
        _ => IpAddr::from([0, 0, 0, 0]),
    };
    let conntrack = f.conntrack.clone().unwrap_or_default();
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
    Ok(Settings {
        kubeconfig: flags.kubeconfig.clone().or_else(|| {
            f.client_connection
                .as_ref()
                .and_then(|c| c.kubeconfig.clone())
                .filter(|k| !k.is_empty())
                .map(PathBuf::from)
        }),
        node,
        cluster_cidrs,
        nodeport_addresses,
        masquerade_all: flags.masquerade_all.or(nft.masquerade_all).unwrap_or(false),
        masquerade_bit,
        min_sync_period,
        sync_period,
        healthz_bind,
        metrics_bind,
        health_check_bind,
        conntrack,
    })
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
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(yaml: &str) -> KubeProxyConfiguration {
        let c: KubeProxyConfiguration = serde_saphyr::from_str(yaml).expect("valid YAML");
        c.check_header().expect("valid header");
        c
    }

    #[test]
    fn go_durations_parse_like_kube_proxy_writes_them() {
        assert_eq!(
            parse_go_duration("f", "1h0m0s"),
            Ok(Duration::from_secs(3600))
        );
        assert_eq!(
            parse_go_duration("f", "500ms"),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(parse_go_duration("f", "0"), Ok(Duration::ZERO));
        assert_eq!(
            parse_go_duration("f", "1.5s"),
            Ok(Duration::from_millis(1500))
        );
        assert!(parse_go_duration("f", "5 parsecs").is_err());
    }

    #[test]
    fn the_file_is_read_and_flags_override_it() {
        let f = file(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\nclusterCIDR: 10.244.0.0/16\nhostnameOverride: n1\nmetricsBindAddress: 0.0.0.0:10249\nnftables:\n  masqueradeBit: 15\n  minSyncPeriod: 0s\n  syncPeriod: 30s\niptables:\n  masqueradeBit: 14\n",
        );
        let s = resolve(Some(&f), &Overrides::default()).expect("valid");
        assert_eq!(s.node, "n1");
        assert_eq!(s.masquerade_bit, 15);
        assert_eq!(s.min_sync_period, Duration::ZERO);
        assert_eq!(
            s.metrics_bind,
            Some("0.0.0.0:10249".parse().expect("literal"))
        );
        let flags = Overrides {
            node: Some("n2".into()),
            masquerade_bit: Some(3),
            ..Overrides::default()
        };
        let s = resolve(Some(&f), &flags).expect("valid");
        assert_eq!((s.node.as_str(), s.masquerade_bit), ("n2", 3));
    }

    #[test]
    fn node_port_addresses_default_to_primary_and_accept_primary_from_the_file_and_the_flag() {
        let flags = Overrides {
            node: Some("n".into()),
            ..Overrides::default()
        };
        let primary = |f: Option<&KubeProxyConfiguration>, flags: &Overrides| {
            resolve(f, flags).map(|s| s.nodeport_addresses)
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
        for bad in ["primary,10.0.0.0/8", "eth0"] {
            assert_eq!(
                primary(None, &with_flag(bad)).map_err(|e| e.field),
                Err("--nodeport-addresses".into()),
                "{bad}"
            );
        }
        let f = file("nodePortAddresses: [primary, 10.0.0.0/8]\n");
        assert_eq!(
            primary(Some(&f), &flags).map_err(|e| e.field),
            Err("nodePortAddresses".into())
        );
    }

    #[test]
    fn invalid_values_are_rejected_naming_the_field() {
        let f = file("nftables:\n  masqueradeBit: 40\n");
        let flags = Overrides {
            node: Some("n".into()),
            ..Overrides::default()
        };
        assert_eq!(
            resolve(Some(&f), &flags).map_err(|e| e.field),
            Err("nftables.masqueradeBit".into())
        );
        let f = file("clusterCIDR: 10.0.0.0/33\n");
        assert_eq!(
            resolve(Some(&f), &flags).map_err(|e| e.field),
            Err("clusterCIDR".into())
        );
        let f = file("nftables:\n  minSyncPeriod: 1m\n  syncPeriod: 30s\n");
        assert_eq!(
            resolve(Some(&f), &flags).map_err(|e| e.field),
            Err("nftables.minSyncPeriod".into())
        );
        let f = file("healthzBindAddress: nowhere\n");
        assert_eq!(
            resolve(Some(&f), &flags).map_err(|e| e.field),
            Err("healthzBindAddress".into())
        );
        let f = file("conntrack:\n  udpTimeout: soon\n");
        assert_eq!(
            resolve(Some(&f), &flags).map_err(|e| e.field),
            Err("conntrack.udpTimeout".into())
        );
        assert_eq!(
            resolve(None, &Overrides::default()).map_err(|e| e.field),
            Err("--node".into())
        );
        let c: KubeProxyConfiguration = serde_saphyr::from_str("mode: ipvs\n").expect("yaml");
        assert_eq!(c.check_header().map_err(|e| e.field), Err("mode".into()));
    }
}
