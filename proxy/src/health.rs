//! Health and metrics endpoints, and the healthCheckNodePort responders, with kube-proxy's
//! semantics, paths, headers and JSON bodies.
//!
//! * `/healthz` and `/livez` (default `0.0.0.0:10256`): unhealthy (503) when a change has been
//!   waiting to be programmed for more than twice the sync period; `/healthz` is also unhealthy
//!   while the node is being deleted (deletion timestamp, or the cluster autoscaler's
//!   `ToBeDeletedByClusterAutoscaler` taint), so load balancers drain it.
//! * `/metrics` (default `127.0.0.1:10249`): Prometheus text format, with the per-Service-port
//!   traffic counters read from the kernel at each scrape; `/explain?to=…&from=…` answers
//!   `lb-proxy explain --live` from the running daemon's state; `/configz` (the effective
//!   configuration as JSON, `{"kubeproxy.config.k8s.io": {…}}`) and `/flagz` (every flag and
//!   its value, as text) as kube-proxy serves them on its metrics port.
//! * One HTTP server per `healthCheckNodePort` of a LoadBalancer Service with
//!   `externalTrafficPolicy: Local`: 200 with the number of local ready endpoints when there is
//!   at least one and the proxy is healthy, 503 otherwise; header
//!   `X-Load-Balancing-Endpoint-Weight`. Servers come and go with the Services.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lb_core::traffic::{self, Destination, Masquerading, Outcome, Source};
use lb_core::{IpFamily, Node};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::store::ServiceEntry;

/// The proxy's health, shared by the sync loop (writer) and the HTTP handlers (readers).
#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    state: Mutex<HealthState>,
}

#[derive(Debug, Clone, Copy)]
struct HealthState {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<(Instant, SystemTime)>,
    node_eligible: bool,
}

/// A health verdict and the JSON body that explains it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthBody {
    /// Last successful sync (RFC 3339); "now" while healthy, as kube-proxy reports it.
    pub last_updated: String,
    /// Current time (RFC 3339).
    pub current_time: String,
    /// Whether the node may receive traffic (`/healthz` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_eligible: Option<bool>,
    /// The verdict.
    pub healthy: bool,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl ProxyHealth {
    /// Health with `timeout` = twice the sync period.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            state: Mutex::new(HealthState {
                last_updated: None,
                oldest_pending: None,
                node_eligible: true,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        // A poisoned lock only means a panic elsewhere; the state is plain data.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A change is waiting to be programmed (keeps the oldest).
    pub fn queued(&self) {
        let mut s = self.lock();
        if s.oldest_pending.is_none() {
            s.oldest_pending = Some((Instant::now(), SystemTime::now()));
        }
    }

    /// Everything pending was programmed.
    pub fn updated(&self) {
        let mut s = self.lock();
        s.last_updated = Some(SystemTime::now());
        s.oldest_pending = None;
    }

    /// Whether the node may receive traffic.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    /// Whether the proxy is healthy: no change has waited longer than the timeout.
    pub fn healthy(&self) -> bool {
        let s = *self.lock();
        s.oldest_pending
            .is_none_or(|(t, _)| t.elapsed() < self.timeout)
    }

    /// The `/healthz` (with node eligibility) or `/livez` body.
    pub fn body(&self, with_node: bool) -> HealthBody {
        let s = *self.lock();
        let now = SystemTime::now();
        let healthy = self.healthy();
        let ok = healthy && (!with_node || s.node_eligible);
        HealthBody {
            last_updated: rfc3339(if healthy {
                now
            } else {
                s.last_updated.unwrap_or(now)
            }),
            current_time: rfc3339(now),
            node_eligible: with_node.then_some(s.node_eligible),
            healthy: ok,
        }
    }
}

fn json_response(
    status: StatusCode,
    body: String,
    extra: &[(&str, String)],
) -> Response<Full<Bytes>> {
    let mut b = Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .header("X-Content-Type-Options", "nosniff");
    for (k, v) in extra {
        b = b.header(*k, v.as_str());
    }
    b.body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::default()))
}

/// Binds a listener on `addr`. The IPv4 wildcard (`0.0.0.0`, kube-proxy's default for the
/// health servers) means both families, as it does for Go's listeners: a dual-stack `[::]`
/// socket with `IPV6_V6ONLY` off, so IPv6 load balancers and kubelets can probe too. On a
/// node without IPv6 it falls back to `0.0.0.0`.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    if addr.ip() == std::net::IpAddr::from([0, 0, 0, 0]) {
        let any6 = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), addr.port());
        if let Ok(l) = bind_dual_stack(any6) {
            return Ok(l);
        }
    }
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    listen(socket, addr)
}

fn bind_dual_stack(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
    socket.set_only_v6(false)?;
    listen(socket, addr)
}

fn listen(socket: socket2::Socket, addr: SocketAddr) -> std::io::Result<TcpListener> {
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// The local address a request came in on (in the request's extensions, set by [`serve`]).
#[derive(Debug, Clone, Copy)]
pub struct LocalAddr(pub SocketAddr);

impl LocalAddr {
    /// The address family the client used (an IPv4-mapped IPv6 address is IPv4).
    pub fn family(&self) -> lb_core::IpFamily {
        match self.0.ip() {
            std::net::IpAddr::V6(a) if a.to_ipv4_mapped().is_none() => lb_core::IpFamily::V6,
            _ => lb_core::IpFamily::V4,
        }
    }
}

/// Serves HTTP/1 on `listener`, answering every request with `handler`.
pub fn serve<F>(listener: TcpListener, handler: F) -> JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let local = stream.local_addr().ok().map(LocalAddr);
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    if let Some(l) = local {
                        req.extensions_mut().insert(l);
                    }
                    let r = handler(req);
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .title_case_headers(true)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

/// Serves `/healthz` and `/livez`.
pub fn serve_health(
    listener: TcpListener,
    health: Arc<ProxyHealth>,
    metrics: Arc<crate::metrics::Metrics>,
) -> JoinHandle<()> {
    serve(listener, move |req| {
        let with_node = match req.uri().path() {
            "/healthz" => true,
            "/livez" => false,
            _ => {
                return Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .body(Full::new(Bytes::from_static(b"404 page not found\n")))
                    .unwrap_or_else(|_| Response::new(Full::default()));
            }
        };
        let body = health.body(with_node);
        let status = if body.healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        metrics.health_response(with_node, status.as_u16());
        json_response(
            status,
            serde_json::to_string(&body).unwrap_or_default(),
            &[],
        )
    })
}

/// The body of a healthCheckNodePort response.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceHealthBody {
    service: NamespacedName,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(Debug, Clone, Serialize)]
struct NamespacedName {
    namespace: String,
    name: String,
}

/// The healthCheckNodePort responders: one server per port, created and removed as Services
/// come and go.
#[derive(Debug)]
pub struct ServiceHealthServers {
    health: Arc<ProxyHealth>,
    bind: std::net::IpAddr,
    servers: BTreeMap<u16, Responder>,
}

/// One healthCheckNodePort server: its Service, its local endpoint counts (IPv4, IPv6), its
/// task.
#[derive(Debug)]
struct Responder {
    namespace: String,
    name: String,
    local_endpoints: Arc<Mutex<LocalEndpoints>>,
    task: JoinHandle<()>,
}

/// A Service's ready local endpoints per family: IPv4, IPv6. Each family's probes see their
/// own family's count, as with kube-proxy's per-family proxiers (a dual-stack pod is one
/// endpoint of each family, not two).
pub type LocalEndpoints = [usize; 2];

/// Whether a healthCheckNodePort reports on `port`: when traffic from outside the cluster is
/// served by node-local endpoints only ([`traffic::classify`], an effective
/// `externalTrafficPolicy: Local`), so a load balancer must learn which nodes have some.
/// (The API server allocates the port only for LoadBalancer Services with that policy.)
fn reports_local_endpoints(port: &lb_core::ServicePort) -> bool {
    let outside = traffic::classify(
        port,
        Destination::LoadBalancerIp,
        Source::Elsewhere,
        Masquerading::default(),
    );
    outside.endpoints == lb_core::EndpointSet::Local
}

/// The healthCheckNodePorts of one Service (`entries`: its service ports) and, for each, the
/// number of the Service's distinct ready endpoints on `node`, per family, whatever the port
/// (kube-proxy counts endpoints, not endpoint ports). Empty: the Service needs no responder.
pub fn health_check_ports(node: &Node, entries: &[ServiceEntry]) -> Vec<(u16, LocalEndpoints)> {
    let addresses = entries
        .iter()
        .flat_map(|e| &e.endpoints)
        .filter(|ep| ep.is_ready() && ep.is_local_to(node))
        .map(lb_core::Endpoint::ip)
        .collect::<BTreeSet<_>>();
    let v4 = addresses.iter().filter(|ip| ip.is_ipv4()).count();
    let local = [v4, addresses.len() - v4];
    let mut ports = Vec::new();
    for e in entries {
        let Some(port) = e.port.health_check_node_port() else {
            continue;
        };
        if reports_local_endpoints(&e.port) && !ports.iter().any(|(p, _)| *p == port) {
            ports.push((port, local));
        }
    }
    ports
}

/// How many of one Service's ports (`entries`) drop traffic on `node` because a Local
/// traffic policy leaves no endpoint here while the Service has some elsewhere (kube-proxy's
/// `sync_proxy_rules_no_local_endpoints_total`): `[IPv4 internal, IPv4 external, IPv6
/// internal, IPv6 external]`. Internal is traffic to a cluster IP, external to the other
/// addresses, as [`traffic::classify`] classes traffic from outside the node.
pub fn no_local_endpoints(node: &Node, entries: &[ServiceEntry]) -> [i64; 4] {
    let mut counts = [0i64; 4];
    for e in entries {
        let classes = counted_classes(&e.port);
        if !classes
            .iter()
            .any(|c| c.endpoints == lb_core::EndpointSet::Local)
        {
            continue;
        }
        for (i, family) in [IpFamily::V4, IpFamily::V6].into_iter().enumerate() {
            let endpoints: Vec<lb_core::Endpoint> = e
                .endpoints
                .iter()
                .filter(|ep| IpFamily::of(&ep.ip()) == family)
                .cloned()
                .collect();
            let c = lb_core::categorize(&e.port, &endpoints, node);
            for (j, class) in classes.iter().enumerate() {
                if class.endpoints == lb_core::EndpointSet::Local
                    && class.outcome(&c) == Outcome::Drop
                {
                    counts[2 * i + j] += 1;
                }
            }
        }
    }
    counts
}

/// The two traffic classes [`no_local_endpoints`] counts drops of: traffic from elsewhere to
/// a cluster IP (internal) and to a load-balancer IP (external).
fn counted_classes(port: &lb_core::ServicePort) -> [traffic::TrafficClass; 2] {
    [Destination::ClusterIp, Destination::LoadBalancerIp].map(|destination| {
        traffic::classify(
            port,
            destination,
            Source::Elsewhere,
            Masquerading::default(),
        )
    })
}

/// Whether [`health_check_ports`] or [`no_local_endpoints`] can find anything in `port`'s
/// endpoints: it has a health check node port, or a Local policy sends some of its traffic
/// only to this node's endpoints. For any other port both give nothing whatever the endpoints.
pub fn reads_endpoints(port: &lb_core::ServicePort) -> bool {
    port.health_check_node_port().is_some()
        || counted_classes(port)
            .iter()
            .any(|c| c.endpoints == lb_core::EndpointSet::Local)
}

impl ServiceHealthServers {
    /// Responders bound to `bind` (e.g. `0.0.0.0`).
    pub fn new(health: Arc<ProxyHealth>, bind: std::net::IpAddr) -> Self {
        Self {
            health,
            bind,
            servers: BTreeMap::new(),
        }
    }

    /// Makes the set of responders match `wanted`: port → (namespace, name, local ready
    /// endpoints per family). Ports that fail to bind are reported and retried on the next
    /// call.
    pub async fn sync(&mut self, wanted: &BTreeMap<u16, (String, String, LocalEndpoints)>) {
        self.servers.retain(|port, r| {
            let keep = wanted
                .get(port)
                .is_some_and(|(n, m, _)| *n == r.namespace && *m == r.name);
            if !keep {
                r.task.abort();
            }
            keep
        });
        for (&port, (ns, name, count)) in wanted {
            if let Some(r) = self.servers.get(&port) {
                *r.local_endpoints
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = *count;
                continue;
            }
            let listener = match bind(SocketAddr::new(self.bind, port)) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(port, service = %format!("{ns}/{name}"), error = %e, "cannot start healthCheckNodePort responder");
                    continue;
                }
            };
            let counter = Arc::new(Mutex::new(*count));
            let (c, h) = (counter.clone(), self.health.clone());
            let (n, m) = (ns.clone(), name.clone());
            let task = serve(listener, move |req| {
                let counts = *c.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let family = req
                    .extensions()
                    .get::<LocalAddr>()
                    .map_or(lb_core::IpFamily::V4, LocalAddr::family);
                let local = counts[usize::from(family == lb_core::IpFamily::V6)];
                let healthy = h.healthy();
                let body = ServiceHealthBody {
                    service: NamespacedName {
                        namespace: n.clone(),
                        name: m.clone(),
                    },
                    local_endpoints: local,
                    service_proxy_healthy: healthy,
                };
                let status = if local > 0 && healthy {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json_response(
                    status,
                    serde_json::to_string_pretty(&body).unwrap_or_default(),
                    &[("X-Load-Balancing-Endpoint-Weight", local.to_string())],
                )
            });
            let responder = Responder {
                namespace: ns.clone(),
                name: name.clone(),
                local_endpoints: counter,
                task,
            };
            self.servers.insert(port, responder);
        }
    }

    /// The ports served now.
    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }
}

/// Where `/metrics` gets the per-Service-port traffic counters: the sync loop, which owns
/// the backend, reads them on request, and the collector encodes the answer.
#[derive(Debug, Clone)]
pub struct TrafficSource {
    /// Requests to the sync loop.
    pub requests: tokio::sync::mpsc::UnboundedSender<crate::metrics::TrafficRequest>,
    /// The collector registered in the registry.
    pub collector: crate::metrics::ServiceTraffic,
}

impl TrafficSource {
    /// Asks the sync loop for the counters (waiting at most 5 s, e.g. behind a long sync) and
    /// hands them to the collector; without an answer the scrape has no traffic series.
    async fn refresh(&self) {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let answer = if self.requests.send(reply).is_ok() {
            tokio::time::timeout(Duration::from_secs(5), rx)
                .await
                .ok()
                .and_then(Result::ok)
        } else {
            None
        };
        self.collector.set(answer.unwrap_or_default());
    }
}

/// The bodies of `/configz` and `/flagz`, fixed at start.
#[derive(Debug, Clone, Default)]
pub struct StatusPages {
    /// `/configz`: JSON.
    pub configz: String,
    /// `/flagz`: text.
    pub flagz: String,
}

impl StatusPages {
    /// `/configz` from the effective `KubeProxyConfiguration` (JSON), `/flagz` from every
    /// flag and its value.
    pub fn new(config: &serde_json::Value, flags: &[(String, String)]) -> Self {
        let configz = serde_json::json!({ "kubeproxy.config.k8s.io": config }).to_string();
        let mut flagz = String::from(
            "lb-proxy flags\nWarning: This endpoint is not meant to be machine parseable, has no formatting compatibility guarantees and is for debugging purposes only.\n\n",
        );
        for (name, value) in flags {
            flagz.push_str(&format!("{name}={value}\n"));
        }
        Self { configz, flagz }
    }
}

/// Serves `/metrics` (Prometheus text; the traffic counters refreshed from `traffic` first),
/// `/explain` (through `explain`, which asks the sync loop), `/configz` and `/flagz`.
pub fn serve_metrics(
    listener: TcpListener,
    registry: Arc<prometheus_client::registry::Registry>,
    explain: Option<tokio::sync::mpsc::UnboundedSender<ExplainRequest>>,
    traffic: Option<TrafficSource>,
    pages: Arc<StatusPages>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let registry = registry.clone();
            let explain = explain.clone();
            let traffic = traffic.clone();
            let pages = pages.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let registry = registry.clone();
                    let explain = explain.clone();
                    let traffic = traffic.clone();
                    let pages = pages.clone();
                    async move {
                        Ok::<_, Infallible>(
                            metrics_route(req, &registry, explain, traffic, &pages).await,
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .title_case_headers(true)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

/// A live `explain` question for the sync loop, with where to send the answer.
pub type ExplainRequest = (
    crate::explain::Query,
    tokio::sync::oneshot::Sender<crate::explain::Explanation>,
);

async fn metrics_route(
    req: Request<Incoming>,
    registry: &prometheus_client::registry::Registry,
    explain: Option<tokio::sync::mpsc::UnboundedSender<ExplainRequest>>,
    traffic: Option<TrafficSource>,
    pages: &StatusPages,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, ct: &str, body: String| {
        Response::builder()
            .status(status)
            .header("Content-Type", ct)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::default()))
    };
    match req.uri().path() {
        "/metrics" => {
            if let Some(t) = &traffic {
                t.refresh().await;
            }
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, registry) {
                Ok(()) => text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    out,
                ),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/proxyMode" => text(StatusCode::OK, "text/plain", "nftables".into()),
        "/configz" => json_response(StatusCode::OK, pages.configz.clone(), &[]),
        "/flagz" => text(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            pages.flagz.clone(),
        ),
        "/explain" => {
            let Some(tx) = explain else {
                return text(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "explain is not available\n".into(),
                );
            };
            let query = req.uri().query().unwrap_or("");
            let q = match parse_explain_query(query) {
                Ok(q) => q,
                Err(e) => return text(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
            };
            let (reply, rx) = tokio::sync::oneshot::channel();
            if tx.send((q, reply)).is_err() {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "sync loop stopped\n".into(),
                );
            }
            match rx.await {
                Ok(e) => json_response(
                    StatusCode::OK,
                    serde_json::to_string_pretty(&e).unwrap_or_default(),
                    &[],
                ),
                Err(_) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "no answer\n".into(),
                ),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "404 page not found\n".into(),
        ),
    }
}

/// Parses `to=ADDR:PORT[/PROTO]&from=ADDR[&fromNode=true]`.
pub fn parse_explain_query(query: &str) -> Result<crate::explain::Query, String> {
    let mut to = None;
    let mut from = None;
    let mut from_node = false;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let v = v.into_owned();
        match k.as_ref() {
            "to" => to = Some(v),
            "from" => {
                from = Some(
                    v.parse()
                        .map_err(|_| format!("from: invalid address {v:?}"))?,
                )
            }
            "fromNode" => from_node = v == "true",
            _ => {}
        }
    }
    let to = to.ok_or("missing to=ADDR:PORT[/PROTO]")?;
    let (to, port, protocol) = crate::explain::parse_destination(&to)?;
    let from = from.ok_or("missing from=ADDR")?;
    Ok(crate::explain::Query {
        to,
        port,
        protocol,
        from,
        from_node,
        to_node: true,
    })
}

#[cfg(test)]
mod tests {
    use lb_core::{Endpoint, Protocol, ServicePort, ServiceType, TrafficPolicy};

    use super::*;

    fn node() -> Node {
        Node::new("node-a", None).expect("valid node")
    }

    fn lb(port_name: &str, etp: TrafficPolicy, itp: TrafficPolicy) -> ServicePort {
        ServicePort::builder("ns", "lb", port_name, Protocol::Tcp, 80)
            .cluster_ips(["10.96.0.1", "fd00::1"])
            .service_type(ServiceType::LoadBalancer)
            .node_port(30080)
            .health_check_node_port(32000)
            .external_traffic_policy(etp)
            .internal_traffic_policy(itp)
            .build()
            .expect("valid service")
    }

    fn ep(ip: &str, node: &str, ready: bool) -> Endpoint {
        Endpoint::builder(ip, 8080)
            .node_name(node)
            .ready(ready)
            .serving(ready)
            .build()
            .expect("valid endpoint")
    }

    #[test]
    fn a_health_check_node_port_counts_distinct_local_ready_endpoints_per_family() {
        let eps = vec![
            ep("10.244.1.1", "node-a", true),
            ep("fd00:244::1", "node-a", true),
            ep("10.244.1.2", "node-a", false),
            ep("10.244.2.1", "node-b", true),
        ];
        let entries = [
            ServiceEntry {
                port: lb("http", TrafficPolicy::Local, TrafficPolicy::Cluster),
                endpoints: eps.clone(),
            },
            // A second port of the Service: the same endpoints count once, one responder.
            ServiceEntry {
                port: lb("https", TrafficPolicy::Local, TrafficPolicy::Cluster),
                endpoints: eps,
            },
        ];
        assert_eq!(health_check_ports(&node(), &entries), vec![(32000, [1, 1])]);
    }

    #[test]
    fn an_etp_cluster_service_has_no_health_check_responder() {
        let entries = [ServiceEntry {
            port: lb("http", TrafficPolicy::Cluster, TrafficPolicy::Cluster),
            endpoints: vec![ep("10.244.1.1", "node-a", true)],
        }];
        assert!(health_check_ports(&node(), &entries).is_empty());
    }

    #[test]
    fn no_local_endpoints_counts_local_policies_left_without_local_endpoints_per_family() {
        let count = |etp, itp, eps: Vec<Endpoint>| {
            let entries = [ServiceEntry {
                port: lb("http", etp, itp),
                endpoints: eps,
            }];
            no_local_endpoints(&node(), &entries)
        };
        use TrafficPolicy::{Cluster, Local};
        let remote4 = || vec![ep("10.244.2.1", "node-b", true)];
        assert_eq!(count(Cluster, Local, remote4()), [1, 0, 0, 0]);
        assert_eq!(count(Local, Cluster, remote4()), [0, 1, 0, 0]);
        assert_eq!(count(Local, Local, remote4()), [1, 1, 0, 0]);
        let remote6 = vec![ep("fd00:244::2", "node-b", true)];
        assert_eq!(count(Local, Local, remote6), [0, 0, 1, 1]);
        // A local endpoint serves the Local policies; no endpoint at all is a reject.
        let local4 = vec![ep("10.244.1.1", "node-a", true)];
        assert_eq!(count(Local, Local, local4), [0; 4]);
        assert_eq!(count(Local, Local, vec![]), [0; 4]);
        assert_eq!(count(Cluster, Cluster, remote4()), [0; 4]);
    }

    #[test]
    fn a_port_that_reads_no_endpoints_gets_nothing_from_its_endpoints() {
        use TrafficPolicy::{Cluster, Local};
        let cluster_ip = |itp| {
            ServicePort::builder("ns", "web", "http", Protocol::Tcp, 80)
                .cluster_ips(["10.96.0.2"])
                .internal_traffic_policy(itp)
                .build()
                .expect("valid service")
        };
        let node_port = |etp| {
            ServicePort::builder("ns", "np", "http", Protocol::Tcp, 80)
                .cluster_ips(["10.96.0.3"])
                .service_type(ServiceType::NodePort)
                .node_port(30081)
                .external_traffic_policy(etp)
                .build()
                .expect("valid service")
        };
        let ports = [
            (cluster_ip(Cluster), false),
            (node_port(Cluster), false),
            (lb("http", Cluster, Cluster), true), // a health check node port
            (cluster_ip(Local), true),
            (node_port(Local), true),
            (lb("http", Local, Local), true),
        ];
        let endpoint_sets = [
            vec![],
            vec![ep("10.244.1.1", "node-a", true)],
            vec![
                ep("10.244.2.1", "node-b", true),
                ep("fd00:244::2", "node-b", true),
            ],
            vec![
                ep("10.244.1.2", "node-a", false),
                ep("10.244.2.2", "node-b", false),
            ],
        ];
        for (port, reads) in ports {
            assert_eq!(reads_endpoints(&port), reads, "{port:?}");
            if reads {
                continue;
            }
            for endpoints in &endpoint_sets {
                let entries = [ServiceEntry {
                    port: port.clone(),
                    endpoints: endpoints.clone(),
                }];
                assert!(health_check_ports(&node(), &entries).is_empty());
                assert_eq!(no_local_endpoints(&node(), &entries), [0; 4]);
            }
        }
    }
}
