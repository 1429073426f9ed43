//! End-to-end test harness: network namespaces joined by veth pairs, test peers in them, and
//! `lb-proxy` programming the node namespace over netlink.
//!
//! Everything lives in namespaces named `lbt-<id>-…` that the harness creates and removes on
//! drop, even when a test panics. The root namespace is never touched. The tests need root:
//! without it, creating a namespace fails and the test fails with that message (never skips).
//!
//! Topology (see `scripts/netns-topology`):
//!
//! ```text
//! client 10.100.0.2 ─ 10.100.0.1 node 10.244.1.1 ─ bN 10.244.1.1N   (IPv6: fd00:100::/64, fd00:244:1::1N)
//! ```

pub mod apiserver;
pub mod upstream_flows;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The ids taken down when a signal ends this process ([`take_down_on_signal`]).
static LIVE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<String>> {
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Takes down `id`'s namespaces (`lbt-<id>-*`, with the processes in them, by
/// `scripts/netns-topology down`) and its scratch directories (`lbt-<id>` and `lbt-<id>-*` in
/// the temporary directory).
pub fn take_down(id: &str) {
    let _ = Command::new("bash")
        .arg(repo().join("scripts/netns-topology"))
        .args(["down", id])
        .status();
    let (exact, prefix) = (format!("lbt-{id}"), format!("lbt-{id}-"));
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name == exact || name.starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Takes `id` down ([`take_down`]) if SIGINT, SIGTERM or SIGHUP (Ctrl-C, a test runner's
/// timeout) ends this process, then exits 130: the `Drop`s that take things down at the end
/// do not run then. The first call installs the handler, the one for the whole process.
pub fn take_down_on_signal(id: &str) {
    static HANDLER: std::sync::Once = std::sync::Once::new();
    HANDLER.call_once(|| {
        let handler = || {
            let ids = std::mem::take(&mut *live());
            eprintln!("interrupted: taking down lbt-{{{}}}-*", ids.join(","));
            for id in &ids {
                take_down(id);
            }
            std::process::exit(130);
        };
        if let Err(e) = ctrlc::set_handler(handler) {
            eprintln!(
                "cannot handle signals ({e}): an interrupted run leaves its lbt-* namespaces"
            );
        }
    });
    live().push(id.to_string());
}

/// Undoes [`take_down_on_signal`] for `id`, once it is taken down.
pub fn forget_on_signal(id: &str) {
    live().retain(|live| live != id);
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A binary built by this workspace (`lb-proxy`, `lb-testsrv`), next to the test executable.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // Tests run from target/<profile>/deps, binaries from target/<profile>.
    let mut dir = exe.parent().expect("executable directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile> directory");
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo test --workspace`",
        p.display()
    );
    p
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command and panics with its output unless it succeeds.
pub fn must(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A test topology. Dropping it kills its processes and deletes its namespaces.
#[derive(Debug)]
pub struct Topology {
    id: String,
    /// Node namespace (where lb-proxy programs nftables).
    pub node: String,
    /// Client namespace (outside the cluster).
    pub client: String,
    /// Backend namespaces, `b0`, `b1`, ….
    pub backends: Vec<String>,
    children: Vec<Child>,
    /// Scratch directory for manifests.
    pub dir: PathBuf,
    proxy_events: Option<std::sync::mpsc::Receiver<String>>,
}

impl Topology {
    /// Creates the namespaces with `backends` backends.
    pub fn up(backends: usize) -> Topology {
        let t = Topology::named(backends);
        // Build inside the guard so a failure half-way still cleans up.
        must(
            Command::new("bash")
                .arg(repo().join("scripts/netns-topology"))
                .args(["up", &t.id, &backends.to_string()]),
        );
        t
    }

    /// Creates namespaces with `scripts/<script> up <id> <args>…` instead of the standard
    /// topology. The script must name every namespace `lbt-<id>-…` (all are removed on drop),
    /// the node `lbt-<id>-node` and the client `lbt-<id>-client`; [`Topology::ns`] names the
    /// others. No backends are started.
    pub fn up_with(script: &str, args: &[&str]) -> Topology {
        let t = Topology::named(0);
        must(
            Command::new("bash")
                .arg(repo().join("scripts").join(script))
                .args(["up", &t.id])
                .args(args),
        );
        t
    }

    /// A new topology's names (a fresh id, `backends` backends) and scratch directory, taken
    /// down on drop or when a signal ends the process; no namespace exists yet.
    fn named(backends: usize) -> Topology {
        // The process, then its topology: a separator, so no two (process, topology) pairs
        // give one id (1234 and 50, 12345 and 0).
        let id = format!(
            "{}-{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        take_down_on_signal(&id);
        let dir = std::env::temp_dir().join(format!("lbt-{id}"));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Topology {
            node: format!("lbt-{id}-node"),
            client: format!("lbt-{id}-client"),
            backends: (0..backends).map(|i| format!("lbt-{id}-b{i}")).collect(),
            id,
            children: Vec::new(),
            dir,
            proxy_events: None,
        }
    }

    /// The namespace `lbt-<id>-<suffix>` of this topology.
    pub fn ns(&self, suffix: &str) -> String {
        format!("lbt-{}-{suffix}", self.id)
    }

    /// Runs `lb-proxy` in the node namespace with exactly `args` (a `run` command line; the
    /// caller names the manifests) and waits for the first sync. Returns the index of the
    /// process, for [`Topology::stop`].
    pub fn start_proxy_with(&mut self, args: &[&str]) -> usize {
        let mut cmd = self.ns_command(&self.node.clone(), &binary("lb-proxy"));
        cmd.args(args);
        self.start_logged(
            cmd,
            "lb-proxy",
            &["programmed", "applied"],
            Duration::from_secs(20),
        )
    }

    /// The address of backend `i`.
    pub fn backend_ip(i: usize) -> String {
        format!("10.244.1.1{i}")
    }

    /// Starts `lb-testsrv serve` in every backend on TCP/UDP 8080 and 5353 (IPv4 and IPv6).
    pub fn serve_all(&mut self) {
        for i in 0..self.backends.len() {
            let ns = self.backends[i].clone();
            let addrs = [
                format!("10.244.1.1{i}:8080"),
                format!("10.244.1.1{i}:5353"),
                format!("[fd00:244:1::1{i}]:8080"),
            ];
            let mut cmd = self.ns_command(&ns, &binary("lb-testsrv"));
            cmd.arg("serve").arg(format!("b{i}")).args(addrs);
            self.spawn_ready(cmd, "READY");
        }
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn ns_command(&self, ns: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Spawns a long-running process and waits until it prints a line containing `ready`.
    pub fn spawn_ready(&mut self, mut cmd: Command, ready: &str) {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let ready = ready.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains(&ready) {
                    let _ = tx.send(());
                }
            }
        });
        self.children.push(child);
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("{cmd:?} never got ready"));
    }

    /// Writes `yaml` as manifest file `name` in the scratch directory, atomically. The
    /// temporary file lives outside the directory: lb-proxy watches the directory's newest
    /// modification time, and a poll between creating a temporary file inside it and the
    /// rename (both in one clock tick) would take the rename for already seen, so the change
    /// would never be loaded.
    pub fn write_manifest(&self, name: &str, yaml: &str) {
        let tmp = self.dir.with_extension(format!("{name}.tmp"));
        std::fs::write(&tmp, yaml).expect("write manifest");
        std::fs::rename(&tmp, self.dir.join(name)).expect("rename manifest");
    }

    /// Runs `lb-proxy run` in the node namespace on the scratch directory, with the cluster
    /// CIDR 10.244.0.0/16 and node `node-a`, plus `extra` arguments, and waits for the first
    /// sync. Returns the index of the process, for [`Topology::stop`].
    pub fn start_proxy(&mut self, extra: &[&str]) -> usize {
        let mut cmd = self.ns_command(&self.node.clone(), &binary("lb-proxy"));
        cmd.args([
            "run",
            "--node",
            "node-a",
            "--cluster-cidr",
            "10.244.0.0/16,fd00:244::/32",
        ])
        .arg("--poll")
        .arg("100ms")
        .args(extra)
        .arg("-f")
        .arg(&self.dir);
        self.start_logged(
            cmd,
            "lb-proxy",
            &["programmed", "applied"],
            Duration::from_secs(20),
        )
    }

    /// Spawns `cmd` (an lb-proxy), echoes its stderr prefixed with `name`, and waits until a
    /// line contains one of `markers` (a sync); later such lines feed
    /// [`Topology::wait_applied`]. Returns the index of the process.
    fn start_logged(
        &mut self,
        mut cmd: Command,
        name: &str,
        markers: &[&str],
        wait: Duration,
    ) -> usize {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let (name, markers): (String, Vec<String>) = (
            name.to_string(),
            markers.iter().map(|m| m.to_string()).collect(),
        );
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{name}] {line}");
                if markers.iter().any(|m| line.contains(m.as_str())) {
                    let _ = tx.send(line);
                }
            }
        });
        self.children.push(child);
        rx.recv_timeout(wait)
            .unwrap_or_else(|_| panic!("{cmd:?} did not program the node"));
        self.proxy_events = Some(rx);
        self.children.len() - 1
    }

    /// Binds a TCP listener on 127.0.0.1 (free port) inside namespace `ns`: a server on it is
    /// reachable from processes in that namespace (e.g. the API server emulator for lb-proxy).
    pub fn bind_in(&self, ns: &str) -> std::net::TcpListener {
        let path = PathBuf::from(format!("/run/netns/{ns}"));
        std::thread::spawn(move || {
            lb_proxy::nft::netlink::enter_netns(&path).expect("enter the network namespace");
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 in the namespace")
        })
        .join()
        .expect("bind thread")
    }

    /// Runs `lb-proxy daemon` in the node namespace with `kubeconfig`, node `node-a`, the
    /// cluster CIDR, `--min-sync-period 0` unless `extra` sets it, and waits for the first
    /// (full) sync. Returns the index of the process, for [`Topology::stop`].
    pub fn start_daemon(&mut self, kubeconfig: &Path, extra: &[&str]) -> usize {
        let mut cmd = self.ns_command(&self.node.clone(), &binary("lb-proxy"));
        cmd.args([
            "daemon",
            "--node",
            "node-a",
            "--cluster-cidr",
            "10.244.0.0/16,fd00:244::/32",
        ])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--healthz-bind-address", "127.0.0.1:10256"])
        .args(["--metrics-bind-address", "127.0.0.1:10249"]);
        if !extra.contains(&"--min-sync-period") {
            cmd.args(["--min-sync-period", "0"]);
        }
        cmd.args(extra)
            .env("RUST_LOG", "info,lb_proxy=debug")
            .env("NO_COLOR", "1");
        self.start_logged(
            cmd,
            "lb-proxy daemon",
            &["full sync", " synced"],
            Duration::from_secs(30),
        )
    }

    /// Runs `lb-proxy daemon` in the node namespace with exactly `args` (no defaults added),
    /// and waits for the first (full) sync. Returns the index of the process.
    pub fn start_daemon_with<I, S>(&mut self, args: I) -> usize
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.ns_command(&self.node.clone(), &binary("lb-proxy"));
        cmd.arg("daemon").args(args);
        self.start_logged(
            cmd,
            "lb-proxy daemon",
            &["full sync", " synced"],
            Duration::from_secs(30),
        )
    }

    /// Stops process `index` (from [`Topology::start_daemon`]) with SIGTERM and waits for it.
    pub fn stop(&mut self, index: usize) {
        let c = &mut self.children[index];
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Drops pending "applied" notifications.
    pub fn drain_applied(&mut self) {
        if let Some(rx) = &self.proxy_events {
            while rx.try_recv().is_ok() {}
        }
    }

    /// The sync lines lb-proxy printed since the last call or wait (those with its markers:
    /// `programmed`/`applied` for `run`, `full sync`/`synced` for the daemon).
    pub fn sync_lines(&mut self) -> Vec<String> {
        let rx = self.proxy_events.as_ref().expect("proxy started");
        rx.try_iter().collect()
    }

    /// Waits until lb-proxy reports it applied a change.
    pub fn wait_applied(&mut self) {
        let rx = self.proxy_events.as_ref().expect("proxy started");
        rx.recv_timeout(Duration::from_secs(10))
            .expect("lb-proxy did not apply the change");
    }

    /// Runs `lb-testsrv <args>` in `ns` and returns its first output line.
    pub fn peer(&self, ns: &str, args: &[&str]) -> String {
        let out = run(self.ns_command(ns, &binary("lb-testsrv")).args(args));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    }

    /// One TCP request from `ns` to `target`: `Ok((backend, source seen))` or `Err(message)`.
    pub fn tcp(&self, ns: &str, target: &str) -> Result<(String, String), String> {
        parse_reply(&self.peer(ns, &["tcp", target, "1500"]))
    }

    /// One UDP request from `ns` to `target`.
    pub fn udp(&self, ns: &str, target: &str) -> Result<(String, String), String> {
        parse_reply(&self.peer(ns, &["udp", target, "1500"]))
    }

    /// `n` TCP requests; counts of replies by backend name (errors under `ERROR …`).
    pub fn spread(&self, ns: &str, target: &str, n: usize, udp: bool) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for _ in 0..n {
            let r = if udp {
                self.udp(ns, target)
            } else {
                self.tcp(ns, target)
            };
            let k = match r {
                Ok((b, _)) => b,
                Err(e) => format!("ERROR {e}"),
            };
            *m.entry(k).or_insert(0) += 1;
        }
        m
    }

    /// `nft -j list ruleset` in the node namespace.
    pub fn nft_json(&self) -> String {
        must(Command::new("ip").args(["netns", "exec", &self.node, "nft", "-j", "list", "ruleset"]))
    }

    /// Runs `f` until it returns true or `timeout` passes.
    pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        f()
    }

    /// Waits up to `timeout` for `f` to hold, and fails the test naming `what` if it does not.
    pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        assert!(
            Self::eventually(timeout, &mut f),
            "timed out waiting until {what}"
        );
    }
}

impl Topology {
    fn kill_children(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.kill_children();
        take_down(&self.id);
        forget_on_signal(&self.id);
    }
}

/// One TCP request from namespace `ns` to `target` (no [`Topology`] needed, e.g. from
/// another thread): `Ok((backend, source seen))` or `Err(message)`.
pub fn tcp_from(ns: &str, target: &str) -> Result<(String, String), String> {
    let out = run(Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(binary("lb-testsrv"))
        .args(["tcp", target, "1500"]));
    parse_reply(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or(""),
    )
}

fn parse_reply(line: &str) -> Result<(String, String), String> {
    if let Some(e) = line.strip_prefix("ERROR ") {
        return Err(e.to_string());
    }
    let mut it = line.split_whitespace();
    match (it.next(), it.next()) {
        (Some(b), Some(peer)) => {
            let ip = peer.rsplit_once(':').map_or(peer, |(ip, _)| ip);
            Ok((b.to_string(), ip.trim_matches(['[', ']']).to_string()))
        }
        _ => Err(format!("no reply ({line:?})")),
    }
}

/// YAML for a Node `node-a` in `zone-a`.
pub const NODE_YAML: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels:\n    topology.kubernetes.io/zone: zone-a\n";

/// YAML for an EndpointSlice of Service `svc` in namespace `t` with endpoints
/// `(backend index, node, ready, serving, terminating)` on `port`/`proto`, named `name`.
pub fn slice_yaml(
    svc: &str,
    family: &str,
    port_name: &str,
    proto: &str,
    port: u16,
    endpoints: &[(usize, &str, bool)],
) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-{}\n  namespace: t\n  labels:\n    kubernetes.io/service-name: {svc}\naddressType: {family}\nports:\n- name: {port_name}\n  port: {port}\n  protocol: {proto}\nendpoints:\n",
        family.to_lowercase()
    );
    for (i, node, ready) in endpoints {
        let ip = if family == "IPv6" {
            format!("fd00:244:1::1{i}")
        } else {
            format!("10.244.1.1{i}")
        };
        s.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  nodeName: {node}\n  conditions: {{ready: {ready}, serving: {ready}, terminating: false}}\n"
        ));
    }
    s
}
