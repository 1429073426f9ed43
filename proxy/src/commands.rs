//! The subcommands other than `daemon` ([`crate::daemon`]), once the command line is parsed:
//! `render`, `run` (the files source feeding the reconciler), `explain` and `cleanup`.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use lb_core::IpFamily;

use crate::compile::{self, Config};
use crate::health::ProxyHealth;
use crate::metrics::Metrics;
use crate::nft::ir::Ruleset;
use crate::nft::{Backend as _, Transaction};
use crate::reconcile::{self, Options, Voice};
use crate::source::files::{FileSource, Files};

/// The desired ruleset for the manifests as they are now; an error when any input was
/// skipped, unless `keep_going`.
pub fn desired(files: Files, mut config: Config, keep_going: bool) -> anyhow::Result<Ruleset> {
    let (store, service_cidrs) = FileSource::read_once(files, keep_going)?;
    let snap = store.snapshot().context("node unknown")?;
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

/// `render`: prints the desired ruleset in `nft -f` syntax.
pub fn render(files: Files, config: Config, keep_going: bool) -> anyhow::Result<()> {
    let rs = desired(files, config, keep_going)?;
    let text = Transaction::create(&rs).to_nft();
    std::io::stdout()
        .write_all(text.as_bytes())
        .context("writing to stdout")
}

pub use crate::config::{Question, RunOptions};

/// Carries out a validated command line.
pub fn execute(invocation: crate::config::Invocation) -> anyhow::Result<()> {
    use crate::config::Invocation;
    match invocation {
        Invocation::Render {
            files,
            config,
            keep_going,
        } => render(files, config, keep_going),
        Invocation::Run {
            files,
            config,
            options,
        } => run(files, config, &options),
        Invocation::Explain {
            files,
            config,
            question,
        } => explain(files, config, &question),
        Invocation::ExplainLive { addr, question } => explain_live(addr, &question),
        Invocation::Cleanup { table } => {
            crate::daemon::init_logging(0, crate::config::LogFormat::Text);
            cleanup(&table)
        }
        Invocation::Daemon {
            settings,
            warnings,
            launch,
        } => {
            crate::daemon::init_logging(settings.verbosity, settings.log_format);
            for warning in settings.warnings.iter().chain(&warnings) {
                tracing::warn!("{warning}");
            }
            crate::daemon::main(*settings, launch)
        }
    }
}

/// `run`: programs the node from the manifests, then follows them. Bad inputs keep what they
/// last produced; a sync happens only when what was read changed, and never empties the
/// dataplane because of read errors.
pub fn run(files: Files, config: Config, opts: &RunOptions) -> anyhow::Result<()> {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let mut source = FileSource::open(files, metrics.clone())?;
    if let Some(addr) = opts.metrics_bind_address {
        serve_run_metrics(addr, registry)?;
    }
    let backend = crate::sync::netlink()?;
    let mut loaded = source.load(None)?;
    if opts.once && loaded.problems > 0 && !opts.keep_going {
        bail!(
            "{} inputs skipped (see above), so nothing was programmed: fix them, or pass --keep-going to program the rest",
            loaded.problems
        );
    }
    let hold = loaded.read_errors && loaded.services == 0;
    if hold {
        if opts.once {
            bail!(
                "manifests could not be read and no Service was: refusing to program an empty ruleset"
            );
        }
        eprintln!(
            "lb-proxy: manifests could not be read and no Service was: not programming an empty ruleset; waiting for readable manifests"
        );
    }
    let options = Options {
        compile: config,
        node: None,
        // Files change seldom and are already debounced by `settle`: sync every change.
        min_sync_period: Duration::ZERO,
        sync_period: Duration::from_secs(30),
        full_sync_period: Duration::from_secs(3600),
        conntrack_cleanup: opts.conntrack_cleanup,
        once: opts.once,
        first_sync_must_succeed: true,
        voice: Voice::Plain,
    };
    // Not served in `run`; kept so the reconciler works the same in both modes.
    let health = Arc::new(ProxyHealth::new(options.sync_period * 2));
    let running = reconcile::spawn(backend, options, metrics, health, None)?;
    let input = loaded.input(Instant::now());
    let source = if opts.once {
        // The objects as read (kept to hold each file's last good version) are not needed
        // once converted: freeing them before the sync lowers the peak (issue 13).
        drop(source);
        crate::memory::release_freed();
        None
    } else {
        Some(source)
    };
    let held = if hold {
        input
    } else {
        if let Some(i) = input {
            running
                .input
                .send(i)
                .context("the reconciler stopped before the first sync")?;
        }
        None
    };
    if let Some(source) = source {
        source
            .follow(running.input.clone(), opts.poll, opts.settle, held)
            .context("starting the manifest poller")?;
    }
    running.wait()
}

/// Serves `/metrics` for `run` on a thread of its own.
fn serve_run_metrics(
    addr: std::net::SocketAddr,
    registry: prometheus_client::registry::Registry,
) -> anyhow::Result<()> {
    let registry = Arc::new(registry);
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
                    let pages = Arc::new(crate::health::StatusPages::default());
                    let _ = crate::health::serve_metrics(l, registry, None, None, pages).await;
                }
                Err(e) => eprintln!("lb-proxy: metrics server: {e}"),
            }
        });
    });
    Ok(())
}

/// `explain` from manifests: what happens to a connection, by the rules compiled from them.
pub fn explain(files: Files, mut config: Config, question: &Question) -> anyhow::Result<()> {
    let (to, port, protocol) = crate::explain::parse_destination(&question.to)
        .map_err(|e| anyhow::anyhow!("--to: {e}"))?;
    let q = crate::explain::Query {
        to,
        port,
        protocol,
        from: question.from,
        from_node: question.from_node,
        to_node: true,
    };
    let (store, service_cidrs) = FileSource::read_once(files, true)?;
    let snap = store.snapshot().context("node unknown")?;
    if !service_cidrs.is_empty() {
        config.service_cidrs = service_cidrs;
    }
    let e = if question.kernel {
        let rs = crate::explain::kernel_ruleset(&config.table)?;
        crate::explain::answer(&rs, &snap, &config, &q)?
    } else {
        crate::explain::explain(&snap, &config, &q)
    };
    if question.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&e).context("encoding JSON")?
        );
    } else {
        print!("{e}");
    }
    Ok(())
}

/// `explain --live`: asks the running daemon's `/explain` at `addr`.
pub fn explain_live(addr: std::net::SocketAddr, question: &Question) -> anyhow::Result<()> {
    crate::explain::parse_destination(&question.to).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
    let Question {
        to,
        from,
        from_node,
        json,
        kernel: _,
    } = question;
    let path = format!("/explain?to={to}&from={from}&fromNode={from_node}");
    let (status, body) = http_get(addr, &path)?;
    if status != 200 {
        bail!("{addr}{path}: HTTP {status}: {}", body.trim());
    }
    if *json {
        println!("{}", body.trim());
    } else {
        let e: crate::explain::Explanation =
            serde_json::from_str(&body).context("decoding the daemon's answer")?;
        print!("{e}");
    }
    Ok(())
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

/// `cleanup` (and `daemon --cleanup`): deletes lb-proxy's tables in both families.
pub fn cleanup(table: &str) -> anyhow::Result<()> {
    let mut backend = crate::sync::netlink()?;
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
