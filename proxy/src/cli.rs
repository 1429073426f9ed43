//! The command line: raw arguments parsed by `clap`, validated into a [`Config`], then run.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use lb_core::IpFamily;

use crate::compile::{self, Config};
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
    },
    /// Remove everything lb-proxy installed in the current network namespace.
    Cleanup {
        /// Name of the nftables tables.
        #[arg(long, default_value = compile::TABLE)]
        table: String,
    },
}

/// Where the objects come from and how this node is set up.
#[derive(Debug, Args, Clone)]
pub struct ManifestArgs {
    /// YAML or JSON files or directories with Services, EndpointSlices and Nodes, in the shapes
    /// `kubectl get -o yaml` prints (multi-document and `List` included).
    #[arg(long = "manifests", short = 'f', required = true, num_args = 1..)]
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

    /// Re-reads the manifests into `store` (replacing what it held, as a re-list would),
    /// reporting bad objects on stderr.
    fn reload(&self, store: &mut Store) -> anyhow::Result<()> {
        let (objects, errors) = Objects::read_paths(&self.paths);
        for e in &errors {
            eprintln!("lb-proxy: skipped: {e}");
        }
        let filter = Filter {
            service_proxy_name: self.service_proxy_name.clone(),
        };
        let (invalid, _skipped) = objects.replace_in(store, self.node.as_deref(), &filter);
        for e in &invalid {
            eprintln!("lb-proxy: invalid, skipped: {e}");
        }
        if store.node().is_none() {
            bail!("no node: pass --node NAME (or NODE_NAME), or give exactly one Node object");
        }
        Ok(())
    }

    /// The desired ruleset for the manifests as they are now.
    pub fn desired(&self) -> anyhow::Result<Ruleset> {
        let mut store = Store::new();
        self.reload(&mut store)?;
        let snap = store.snapshot().context("node unknown")?;
        let config = self.config();
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
        } => run_manifests(&manifests, once, poll),
        Command::Cleanup { table } => cleanup(&table),
    }
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

fn run_manifests(args: &ManifestArgs, once: bool, poll: Duration) -> anyhow::Result<()> {
    let mut dataplane = Dataplane::new(netlink()?, args.config());
    let mut store = Store::new();
    args.reload(&mut store)?;
    let report = dataplane
        .sync(&mut store)
        .context("programming the ruleset")?;
    eprintln!(
        "lb-proxy: programmed {} service ports ({} commands, {} elements) in {:?} + {:?}",
        report.service_ports, report.commands, report.elements, report.compute, report.apply
    );
    if once {
        return Ok(());
    }
    let mut seen = args.newest_mtime();
    loop {
        std::thread::sleep(poll);
        let now = args.newest_mtime();
        if now == seen {
            continue;
        }
        seen = now;
        if let Err(e) = args.reload(&mut store) {
            eprintln!("lb-proxy: keeping the current ruleset: {e:#}");
            continue;
        }
        match dataplane.sync(&mut store) {
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
    }
}
