//! A tiny user-space TCP proxy for Kubernetes Services, on tokio, with `lb-core` + `lb-k8s`.
//!
//! It reads Services, EndpointSlices and this node's Node from manifests (the shapes
//! `kubectl get -o yaml` prints), opens one loopback listener per TCP Service address, and for
//! each connection asks [`ServiceIndex::lookup`] which endpoints may serve it on this node,
//! picks one (uniformly, or sticky per client with `sessionAffinity: ClientIP`) and splices
//! the two sockets together. The manifests are re-read every `--reload-ms`, so new
//! connections follow edits (an endpoint that turns not-ready stops receiving them).
//!
//! ```sh
//! cargo run -p lb-k8s --example tcp_proxy -- -f examples/cluster --node node-a \
//!     --map 10.244.1.10:8080=127.0.0.1:9001
//! ```
//!
//! Pod addresses are usually not reachable from where you try this, and Kubernetes forbids
//! loopback endpoints, so `--map POD:PORT=ADDR:PORT` dials a local stand-in instead; with any
//! `--map` given, endpoints without one are not dialled at all (the connection is closed), so
//! a demo sends nothing off the machine. A real deployment would bind the Service addresses
//! themselves (or take redirected traffic) and dial pods directly; everything between accept
//! and connect stays the same.
//!
//! Not a production proxy: no UDP, no connection limits, no health checks.

use std::collections::HashMap;
use std::error::Error;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_core::affinity::{AffinityTable, NewConnection};
use lb_core::{Endpoint, Protocol, SessionAffinity, pick};
use lb_k8s::{Cluster, Filter, Frontend, ServiceIndex, Via};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Command-line options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Manifest files or directories (`-f`, repeatable).
    pub paths: Vec<PathBuf>,
    /// This node's name (`--node`): decides local endpoints and topology.
    pub node: String,
    /// Where listeners are opened (`--listen`, default 127.0.0.1).
    pub listen: IpAddr,
    /// Endpoint address → address actually dialled (`--map POD:PORT=ADDR:PORT`, repeatable).
    pub map: HashMap<SocketAddr, SocketAddr>,
    /// How often the manifests are re-read (`--reload-ms`, default 1000).
    pub reload: Duration,
}

/// Parses the arguments after the program name.
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
    let mut opts = Options {
        paths: Vec::new(),
        node: String::new(),
        listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
        map: HashMap::new(),
        reload: Duration::from_secs(1),
    };
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag}: missing value"));
        match flag.as_str() {
            "-f" => opts.paths.push(value()?.into()),
            "--node" => opts.node = value()?,
            "--listen" => {
                let v = value()?;
                opts.listen = v
                    .parse()
                    .map_err(|_| format!("--listen: {v:?} is not an IP address"))?;
            }
            "--map" => {
                let v = value()?;
                let (from, to) = v
                    .split_once('=')
                    .ok_or(format!("--map: {v:?} is not POD:PORT=ADDR:PORT"))?;
                let parse = |s: &str| {
                    s.parse::<SocketAddr>()
                        .map_err(|_| format!("--map: {s:?} is not an address:port"))
                };
                opts.map.insert(parse(from)?, parse(to)?);
            }
            "--reload-ms" => {
                let v = value()?;
                let ms: u64 = v
                    .parse()
                    .map_err(|_| format!("--reload-ms: {v:?} is not a number"))?;
                opts.reload = Duration::from_millis(ms.max(10));
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if opts.paths.is_empty() {
        return Err("-f: at least one manifest file or directory is required".into());
    }
    if opts.node.is_empty() {
        return Err("--node: required".into());
    }
    Ok(opts)
}

/// Reads the manifests into a fresh [`Cluster`] and indexes it. Objects that do not parse or
/// are invalid are skipped, as `lb-proxy run` does, and returned as warnings.
pub fn load(opts: &Options) -> Result<(ServiceIndex, Vec<String>), String> {
    let mut cluster = Cluster::new(Filter::default());
    let mut warnings = Vec::new();
    let mut node_seen = false;
    for doc in read_documents(&opts.paths)? {
        let kind = doc
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let outcome = match kind.as_str() {
            "Service" => serde_json::from_value::<Service>(doc)
                .map_err(|e| e.to_string())
                .and_then(|s| cluster.apply_service(&s).map_err(|e| e.to_string())),
            "EndpointSlice" => serde_json::from_value::<EndpointSlice>(doc)
                .map_err(|e| e.to_string())
                .and_then(|s| {
                    let errors = cluster
                        .apply_endpoint_slice(&s)
                        .map_err(|e| e.to_string())?;
                    for e in errors {
                        warnings.push(format!("skipped endpoint: {e}"));
                    }
                    Ok(())
                }),
            "Node" => serde_json::from_value::<Node>(doc)
                .map_err(|e| e.to_string())
                .and_then(|n| {
                    if n.metadata.name.as_deref() == Some(opts.node.as_str()) {
                        node_seen = true;
                        cluster.set_node(&n).map_err(|e| e.to_string())?;
                    }
                    Ok(())
                }),
            _ => Ok(()),
        };
        if let Err(e) = outcome {
            warnings.push(format!("skipped {kind}: {e}"));
        }
    }
    if !node_seen {
        // No Node object: this node has no zone label, so no topology filtering.
        let node = lb_core::Node::new(&opts.node, None).map_err(|e| e.to_string())?;
        cluster.set_node_model(node);
    }
    let index = cluster
        .index()
        .ok_or_else(|| "the node is unknown".to_string())?;
    Ok((index, warnings))
}

fn report(warnings: &[String]) {
    for w in warnings {
        eprintln!("tcp_proxy: {w}");
    }
}

fn read_documents(paths: &[PathBuf]) -> Result<Vec<Value>, String> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|f| {
                    matches!(
                        f.extension().and_then(|e| e.to_str()),
                        Some("yaml" | "yml" | "json")
                    )
                })
                .collect();
            v.sort();
            files.extend(v);
        } else {
            files.push(p.clone());
        }
    }
    let mut docs = Vec::new();
    for f in files {
        docs.extend(read_file(&f)?);
    }
    Ok(docs)
}

fn read_file(f: &Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
    let parsed: Vec<Value> =
        serde_saphyr::from_multiple(&text).map_err(|e| format!("{}: {e}", f.display()))?;
    let mut out = Vec::new();
    for doc in parsed {
        match doc.get("kind").and_then(Value::as_str) {
            Some("List") => {
                if let Some(Value::Array(items)) = doc.get("items") {
                    out.extend(items.iter().cloned());
                }
            }
            Some(_) => out.push(doc),
            None => {}
        }
    }
    Ok(out)
}

/// A running proxy: its listeners, one per TCP Service address. Dropping it stops it.
#[derive(Debug)]
pub struct Running {
    /// Each Service entry point and the local address serving it.
    pub listeners: Vec<(Frontend, SocketAddr)>,
    _tasks: JoinSet<()>,
}

impl Running {
    /// The local address serving Service address `address`:`port` (TCP), if any.
    pub fn listener_for(&self, address: IpAddr, port: u16) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(f, _)| f.address == Some(address) && f.port == port)
            .map(|&(_, local)| local)
    }
}

/// State shared by the connection tasks.
struct Shared {
    index: RwLock<Arc<ServiceIndex>>,
    affinity: AffinityTable<(IpAddr, u16), SocketAddr>,
    map: HashMap<SocketAddr, SocketAddr>,
    started: Instant,
}

/// Loads the manifests, opens the listeners and starts serving (on the current tokio runtime).
pub async fn start(opts: Options) -> Result<Running, Box<dyn Error>> {
    let (index, warnings) = load(&opts)?;
    report(&warnings);
    let mut tasks = JoinSet::new();
    let mut listeners = Vec::new();
    let frontends: Vec<Frontend> = index
        .frontends()
        .into_iter()
        .map(|(f, _)| f)
        .filter(|f| f.protocol == Protocol::Tcp && f.via != Via::NodePort)
        .collect();
    let shared = Arc::new(Shared {
        index: RwLock::new(Arc::new(index)),
        affinity: AffinityTable::new(),
        map: opts.map.clone(),
        started: Instant::now(),
    });
    for frontend in frontends {
        let listener = TcpListener::bind(SocketAddr::new(opts.listen, 0)).await?;
        listeners.push((frontend, listener.local_addr()?));
        tasks.spawn(accept_loop(listener, frontend, shared.clone()));
    }
    tasks.spawn(reload_loop(opts, shared, warnings));
    Ok(Running {
        listeners,
        _tasks: tasks,
    })
}

async fn reload_loop(opts: Options, shared: Arc<Shared>, mut reported: Vec<String>) {
    loop {
        tokio::time::sleep(opts.reload).await;
        match load(&opts) {
            Ok((index, warnings)) => {
                // Report problems when they change, not on every reload.
                if warnings != reported {
                    report(&warnings);
                    reported = warnings;
                }
                match shared.index.write() {
                    Ok(mut guard) => *guard = Arc::new(index),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(index),
                }
            }
            // The last good index keeps serving.
            Err(e) => eprintln!("tcp_proxy: reload failed, keeping the previous state: {e}"),
        }
    }
}

async fn accept_loop(listener: TcpListener, frontend: Frontend, shared: Arc<Shared>) {
    let mut rng = 0x2545_f491_4f6c_dd1d_u64 ^ u64::from(frontend.port);
    loop {
        let Ok((client, peer)) = listener.accept().await else {
            continue;
        };
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let random = rng;
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(client, peer, frontend, random, &shared).await {
                eprintln!("tcp_proxy: {peer} → {frontend:?}: {e}");
            }
        });
    }
}

/// Chooses the endpoint for a new connection from `client` to `frontend`, or `None` when the
/// Service port has no endpoint that may serve it (the connection is then refused).
fn choose(shared: &Shared, frontend: Frontend, client: IpAddr, random: u64) -> Option<SocketAddr> {
    let index = match shared.index.read() {
        Ok(guard) => guard.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    let address = frontend.address?;
    let hit = index.lookup(address, frontend.protocol, frontend.port)?;
    let candidates: Vec<SocketAddr> = hit.endpoints().iter().map(Endpoint::addr).collect();
    match hit.service_port().session_affinity() {
        SessionAffinity::None => pick::uniform(&candidates, random).copied(),
        SessionAffinity::ClientIp { timeout } => {
            let key = (address, frontend.port);
            let conn = NewConnection {
                service: &key,
                client,
                now: shared.started + shared.started.elapsed(),
                timeout,
                random,
            };
            shared.affinity.pick(conn, &candidates).map(|p| p.endpoint)
        }
    }
}

async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    frontend: Frontend,
    random: u64,
    shared: &Shared,
) -> std::io::Result<()> {
    // No endpoint: close at once, the user-space equivalent of kube-proxy's reject.
    let Some(endpoint) = choose(shared, frontend, peer.ip(), random) else {
        return Ok(());
    };
    // With `--map`, only mapped endpoints are dialled: a demo never sends traffic off the
    // machine to pod addresses that are not reachable from here.
    let dial = match shared.map.get(&endpoint) {
        Some(&local) => local,
        None if shared.map.is_empty() => endpoint,
        None => {
            return Err(std::io::Error::other(format!(
                "endpoint {endpoint} has no --map entry; not dialled"
            )));
        }
    };
    let mut upstream = TcpStream::connect(dial).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let opts = parse_args(std::env::args().skip(1)).map_err(|e| {
        format!("{e}\nusage: tcp_proxy -f MANIFESTS --node NAME [--listen IP] [--map POD:PORT=ADDR:PORT]… [--reload-ms N]")
    })?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let running = start(opts).await?;
        for (frontend, local) in &running.listeners {
            if let Some(address) = frontend.address {
                println!(
                    "{address}:{} ({:?}) → listening on {local}",
                    frontend.port, frontend.via
                );
            }
        }
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}
