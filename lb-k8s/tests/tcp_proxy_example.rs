//! Runs the `tcp_proxy` example (compiled in as a module) on loopback against manifests, with
//! real TCP backends on loopback, and checks that connections are balanced across the ready
//! endpoints, stick to one endpoint under ClientIP affinity, are refused without endpoints, and
//! follow edits to the manifests.

#[path = "../examples/tcp_proxy.rs"]
#[allow(dead_code, reason = "the example's main is not called from the test")]
mod tcp_proxy;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir =
            std::env::temp_dir().join(format!("lb-k8s-tcp-proxy-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `text` to `dir/name` atomically, so the proxy never reads half a file.
fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write manifest");
    std::fs::rename(&tmp, dir.join(name)).expect("rename manifest");
}

/// A backend that answers every connection with its name and closes it.
async fn backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("backend address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(name.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// Connects through the proxy and returns what the backend said ("" when refused or closed).
async fn ask(proxy: SocketAddr) -> String {
    let Ok(mut s) = TcpStream::connect(proxy).await else {
        return String::new();
    };
    let mut out = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
    match read {
        Ok(Ok(_)) => out,
        _ => String::new(),
    }
}

async fn tally(proxy: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        *counts.entry(ask(proxy).await).or_insert(0) += 1;
    }
    counts
}

const SERVICES: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: demo}
  spec:
    clusterIP: 10.96.0.10
    ports: [{name: http, port: 80, protocol: TCP}]
- apiVersion: v1
  kind: Service
  metadata: {name: sticky, namespace: demo}
  spec:
    clusterIP: 10.96.0.11
    sessionAffinity: ClientIP
    ports: [{name: http, port: 80, protocol: TCP}]
- apiVersion: v1
  kind: Service
  metadata: {name: empty, namespace: demo}
  spec:
    clusterIP: 10.96.0.12
    ports: [{name: http, port: 80, protocol: TCP}]
- apiVersion: v1
  kind: Service
  metadata: {name: unmapped, namespace: demo}
  spec:
    clusterIP: 10.96.0.13
    ports: [{name: http, port: 80, protocol: TCP}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: unmapped-1
    namespace: demo
    labels: {kubernetes.io/service-name: unmapped}
  addressType: IPv4
  ports: [{name: http, port: 8080, protocol: TCP}]
  endpoints: [{addresses: [10.244.9.9], nodeName: node-a}]
"#;

fn slice(service: &str, web3_ready: bool) -> String {
    format!(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-1
  namespace: demo
  labels: {{kubernetes.io/service-name: {service}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
- addresses: [10.244.1.1]
  nodeName: node-a
- addresses: [10.244.1.2]
  nodeName: node-b
- addresses: [10.244.1.3]
  nodeName: node-b
  conditions: {{ready: {web3_ready}}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_proxy_example_balances_connections_and_follows_the_manifests() {
    let dir = TempDir::new();
    write(dir.path(), "services.yaml", SERVICES);
    write(dir.path(), "web.yaml", &slice("web", true));
    write(dir.path(), "sticky.yaml", &slice("sticky", true));
    let mut args: Vec<String> = ["-f", &dir.path().display().to_string(), "--node", "node-a"]
        .map(String::from)
        .into();
    args.extend(["--reload-ms".into(), "50".into()]);
    for (i, name) in ["b1", "b2", "b3"].into_iter().enumerate() {
        let local = backend(name).await;
        args.extend(["--map".into(), format!("10.244.1.{}:8080={local}", i + 1)]);
    }
    let opts = tcp_proxy::parse_args(args).expect("valid arguments");
    let running = tcp_proxy::start(opts).await.expect("proxy starts");
    let ip = |s: &str| s.parse::<IpAddr>().expect("an address");
    let web = running
        .listener_for(ip("10.96.0.10"), 80)
        .expect("web listener");
    let sticky = running
        .listener_for(ip("10.96.0.11"), 80)
        .expect("sticky listener");
    let empty = running
        .listener_for(ip("10.96.0.12"), 80)
        .expect("empty listener");
    let unmapped = running
        .listener_for(ip("10.96.0.13"), 80)
        .expect("unmapped listener");

    // Uniform over the three ready endpoints: each expects 100 of 300 (σ ≈ 8).
    let counts = tally(web, 300).await;
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["b1", "b2", "b3"],
        "{counts:?}"
    );
    assert!(counts.values().all(|&c| c >= 60), "unbalanced: {counts:?}");

    // ClientIP affinity: every connection from this client reaches the same endpoint.
    let counts = tally(sticky, 30).await;
    assert_eq!(counts.len(), 1, "not sticky: {counts:?}");

    // No endpoints: the connection is closed without reaching anything.
    assert_eq!(ask(empty).await, "");
    // An endpoint without a --map entry is not dialled (nothing leaves the machine): the
    // connection is closed at once rather than waiting on a connect to an unreachable pod.
    let asked = Instant::now();
    assert_eq!(ask(unmapped).await, "");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );

    // b3 turns not ready in the manifests: within a few reloads it gets no new connections.
    write(dir.path(), "web.yaml", &slice("web", false));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let counts = tally(web, 40).await;
        if !counts.contains_key("b3") {
            break;
        }
        assert!(Instant::now() < deadline, "b3 still serving: {counts:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counts = tally(web, 200).await;
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["b1", "b2"],
        "{counts:?}"
    );
    assert!(counts.values().all(|&c| c >= 60), "unbalanced: {counts:?}");

    // A manifest that does not parse: the reload fails and the last good state keeps serving.
    write(
        dir.path(),
        "web.yaml",
        "kind: EndpointSlice\nendpoints: [[[\n",
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = tally(web, 60).await;
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["b1", "b2"],
        "{counts:?}"
    );
}

#[test]
fn the_tcp_proxy_example_rejects_bad_arguments_naming_the_flag() {
    let err = |args: &[&str]| {
        tcp_proxy::parse_args(args.iter().map(|s| s.to_string())).expect_err("invalid")
    };
    assert!(err(&["--node", "a"]).starts_with("-f:"));
    assert!(err(&["-f", "x"]).starts_with("--node:"));
    assert!(err(&["-f", "x", "--node", "a", "--map", "1.2.3.4:80"]).starts_with("--map:"));
    assert!(err(&["-f", "x", "--node", "a", "--listen", "nope"]).starts_with("--listen:"));
    assert!(err(&["-f", "x", "--bogus"]).starts_with("unknown argument"));
}
