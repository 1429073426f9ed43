//! An in-process Kubernetes API server emulator that the real `kube` client talks to over plain
//! HTTP, for tests of the proxy's watch layer.
//!
//! It serves LIST, WATCH and GET for Services, EndpointSlices and Nodes the way the real
//! apiserver does on the wire (see `shared/notes/kube-watch-protocol.md`): one global
//! resourceVersion counter, consistent paginated lists, label and field selectors evaluated per
//! watcher (an object that stops matching is sent as `DELETED`), bookmarks, streaming lists, and
//! `410 Expired` answered as an `ERROR` event inside an HTTP 200 watch.
//!
//! Streaming lists (KEP-3157) follow the API server: `ListOptions` are validated as
//! apimachinery's `ValidateListOptions` does (`sendInitialEvents` needs
//! `resourceVersionMatch=NotOlderThan`, is forbidden on a LIST, and without the `WatchList`
//! gate; `resourceVersionMatch` on a watch needs `sendInitialEvents`), answered `422 Invalid`
//! with the same message and causes; the end bookmark comes only when bookmarks were asked for
//! (the server's `isListWatchRequest`). [`Options::streaming_lists`] makes it a server that
//! offers them, rejects them (1.27–1.31 and 1.33 by default) or ignores them (before 1.19), and
//! [`ApiServer::initial_lists`] records which protocol each list used. Tests drive it with
//! synchronous hooks ([`ApiServer::apply`], [`ApiServer::delete`], [`ApiServer::compact`],
//! [`ApiServer::expire_watches`], [`ApiServer::pause`], …) and read its request log.
//!
//! ```no_run
//! use lb_e2e::apiserver::{ApiServer, Kind};
//! use serde_json::json;
//!
//! let api = ApiServer::start_local();
//! api.apply(Kind::Service, json!({"metadata": {"name": "web", "namespace": "default"}}));
//! api.write_kubeconfig(std::path::Path::new("/tmp/kubeconfig")).expect("kubeconfig");
//! // KUBECONFIG=/tmp/kubeconfig, or kube::Config::from_custom_kubeconfig(…)
//! ```
//!
//! Pointing the client at it: [`ApiServer::write_kubeconfig`] writes a kubeconfig with a plain
//! `http://` server and no credentials, which `Kubeconfig::read_from`, `Config::infer()` (via
//! `KUBECONFIG`) and `Config::from_custom_kubeconfig` accept. kube 5 needs only its `client`
//! feature for `http://`; with `rustls-tls` its connector is built `https_or_http`, so that works
//! too. One trap: kube takes `HTTPS_PROXY`/`https_proxy` from the environment even for an `http://`
//! server and, without its `http-proxy` feature, fails to build a client when one is set.
//!
//! Like the API server's watch cache, it encodes each object once, when it is written, and
//! sends that encoding in every list page and every streaming list's initial events (a list at
//! an older revision encodes its own): in the benches it runs on the two cores of the daemon it
//! serves, and encoding 20,000 objects again for each list weighed on the daemon's start.
//!
//! The listener is the caller's, so it may come from inside a network namespace; the server
//! thread never binds anything itself, which is also why [`ApiServer::pause`] keeps the socket.
//!
//! Where it is not the real thing: no writes over HTTP (only the hooks write), no admission or
//! validation of object contents, no authn/authz, JSON only (no protobuf, no gzip), every write
//! through a hook bumps the resourceVersion even when nothing changed, the event log is kept until
//! [`ApiServer::compact`] (the real server keeps a bounded window), `resourceVersion=0` lists are
//! served consistently (the real server may serve them stale from its cache), bookmarks are
//! sent every [`Options::bookmark_interval`] (the real server sends them about once a minute),
//! and a streaming list's end bookmark follows its last initial event at once (the cacher sends
//! it from its bookmark timer, usually within a second).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How long a request for a resourceVersion newer than the server's waits for it to appear
/// before failing with `504 Timeout` (the apiserver's cacher uses 3 s).
const TOO_LARGE_RV_WAIT: Duration = Duration::from_secs(3);

/// Watch duration when the client sends no `timeoutSeconds` (the real server picks a random
/// duration between 30 and 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// Annotation on the bookmark that ends the initial events of a streaming list.
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// The resource kinds the emulator serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `v1` Service, namespaced.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice, namespaced.
    EndpointSlice,
    /// `v1` Node, cluster-scoped.
    Node,
    /// `networking.k8s.io/v1` ServiceCIDR, cluster-scoped.
    ServiceCidr,
}

impl Kind {
    /// Every kind, in a fixed order.
    pub const ALL: [Kind; 4] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::ServiceCidr,
    ];

    /// The object's `kind`.
    pub fn kind(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::ServiceCidr => "ServiceCIDR",
        }
    }

    /// The object's `apiVersion`.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::ServiceCidr => "networking.k8s.io/v1",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node | Kind::ServiceCidr)
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
            Kind::ServiceCidr => "servicecidrs",
        }
    }

    fn index(self) -> usize {
        match self {
            Kind::Service => 0,
            Kind::EndpointSlice => 1,
            Kind::Node => 2,
            Kind::ServiceCidr => 3,
        }
    }
}

/// Tunables of the emulator.
#[derive(Clone, Debug)]
pub struct Options {
    /// How often an idle watch with `allowWatchBookmarks=true` gets a BOOKMARK (default 1 s).
    pub bookmark_interval: Duration,
    /// Whether the server offers streaming lists (default: it does, as 1.32 and 1.34 onwards).
    pub streaming_lists: StreamingLists,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bookmark_interval: Duration::from_secs(1),
            streaming_lists: StreamingLists::Offered,
        }
    }
}

/// How the server answers a streaming list (`watch=true&sendInitialEvents=true&
/// resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true`, KEP-3157).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamingLists {
    /// ADDED for every object, then a BOOKMARK annotated `k8s.io/initial-events-end`
    /// (Kubernetes 1.32 and 1.34 onwards; 1.27–1.31 and 1.33 with the `WatchList` gate on).
    #[default]
    Offered,
    /// `422 Invalid`: "sendInitialEvents is forbidden for watch unless the WatchList feature
    /// gate is enabled" (1.27–1.31 and 1.33 with the gate off, as by default).
    Rejected,
    /// The parameters are unknown and dropped (a server before 1.19, or a proxy that strips
    /// them): a watch from resourceVersion 0 sends ADDED for every object, never the end
    /// bookmark, then live events.
    Ignored,
}

/// How a client made its list of a kind, as [`ApiServer::initial_lists`] records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListProtocol {
    /// A LIST (its first page; the continuations are not counted).
    Paginated,
    /// A watch with `sendInitialEvents=true` and bookmarks: a streaming list.
    Streaming,
}

/// How [`ApiServer::break_next_streaming_list`] breaks a streaming list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Break {
    /// The connection is closed mid-body (no terminating chunk).
    Drop,
    /// An `ERROR` event with `410 Expired` ends the stream, as a compaction would.
    Expire,
}

/// A running API server emulator. Dropping it stops the server and closes every connection.
///
/// All methods are synchronous and thread-safe; call them from a test body, sync or async.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiServer")
            .field("addr", &self.addr)
            .field("resource_version", &self.resource_version())
            .finish()
    }
}

impl ApiServer {
    /// Serves on `listener` (created by the caller, possibly inside a network namespace) from a
    /// tokio runtime on a background thread.
    ///
    /// # Panics
    /// If the listener has no local address or cannot be made non-blocking.
    pub fn start(listener: TcpListener) -> ApiServer {
        ApiServer::start_with(listener, Options::default())
    }

    /// [`ApiServer::start`] with non-default [`Options`].
    ///
    /// # Panics
    /// If the listener has no local address or cannot be made non-blocking.
    pub fn start_with(listener: TcpListener, options: Options) -> ApiServer {
        let addr = listener.local_addr().expect("listener has a local address");
        listener
            .set_nonblocking(true)
            .expect("listener can be made non-blocking");
        let store = Store::new();
        let (rv, _) = watch::channel(store.rv);
        let (control, _) = watch::channel(Control::default());
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            rv,
            control,
            faults: Mutex::new(Faults::default()),
            requests: Mutex::new(Vec::new()),
            open_watches: AtomicUsize::new(0),
            streaming_lists: Mutex::new(options.streaming_lists),
            initial_lists: Mutex::new(Vec::new()),
            break_streaming_list: Mutex::new(None),
            options,
        });
        let background = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("apiserver-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime for the API server emulator");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("listener registers with the tokio reactor");
                    accept_loop(listener, background).await;
                });
            })
            .expect("spawn the API server emulator thread");
        ApiServer {
            shared,
            addr,
            thread: Some(thread),
        }
    }

    /// Serves on `127.0.0.1` at a free port.
    ///
    /// # Panics
    /// If no loopback port can be bound.
    pub fn start_local() -> ApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        ApiServer::start(listener)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR:PORT` (IPv6 addresses in brackets).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig (YAML) for this server: plain `http://`, no credentials, namespace `default`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: emulator\n  cluster:\n    server: {url}\n\
             users:\n\
             - name: emulator\n  user: {{}}\n\
             contexts:\n\
             - name: emulator\n  context:\n    cluster: emulator\n    user: emulator\n    namespace: default\n\
             current-context: emulator\n",
            url = self.url()
        )
    }

    /// Writes [`ApiServer::kubeconfig`] to `path`, for `KUBECONFIG=path` / `Kubeconfig::read_from`.
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).rv
    }

    /// Creates or replaces an object (`metadata.name` required; a namespaced kind without
    /// `metadata.namespace` goes to `default`). Bumps the global resourceVersion, stamps it with
    /// `resourceVersion`, `uid` and `creationTimestamp` (both kept from the previous version on
    /// update), sets `kind`/`apiVersion`, and emits ADDED or MODIFIED. Returns the stored object.
    ///
    /// # Panics
    /// If `object` is not a JSON object with a string `metadata.name`.
    pub fn apply(&self, kind: Kind, object: Value) -> Value {
        let stored = lock(&self.shared.store).apply(kind, object);
        self.shared.notify(&stored);
        stored
    }

    /// Deletes an object (`namespace` is ignored for Nodes) and emits DELETED carrying its last
    /// state with the deletion's resourceVersion, which is returned. `None` if it did not exist.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let deleted = lock(&self.shared.store).delete(kind, &key(kind, namespace, name));
        if let Some(obj) = &deleted {
            self.shared.notify(obj);
        }
        deleted
    }

    /// The stored object (with `kind` and `apiVersion`), if any.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        lock(&self.shared.store).objects[kind.index()]
            .get(&key(kind, namespace, name))
            .cloned()
    }

    /// Every stored object of a kind, in key order.
    pub fn list(&self, kind: Kind) -> Vec<Value> {
        lock(&self.shared.store).objects[kind.index()]
            .values()
            .cloned()
            .collect()
    }

    /// Makes `objects` the whole content of `kind`: deletes the others, then applies each
    /// (one write, and one resourceVersion, per object, as separate API calls would).
    ///
    /// # Panics
    /// As [`ApiServer::apply`].
    pub fn replace_all(&self, kind: Kind, objects: impl IntoIterator<Item = Value>) {
        let objects: Vec<Value> = objects.into_iter().collect();
        let keep: Vec<String> = objects
            .iter()
            .map(|o| {
                let (ns, name) = object_names(kind, o);
                key(kind, &ns, &name)
            })
            .collect();
        let mut store = lock(&self.shared.store);
        let gone: Vec<String> = store.objects[kind.index()]
            .keys()
            .filter(|k| !keep.contains(k))
            .cloned()
            .collect();
        for k in gone {
            store.delete(kind, &k);
        }
        for o in objects {
            store.apply(kind, o);
        }
        let rv = store.rv;
        drop(store);
        self.shared.rv.send_replace(rv);
    }

    /// Forgets the event log up to now, as etcd compaction does: a watch or a continue token
    /// from an older resourceVersion then gets `410 Expired`.
    pub fn compact(&self) {
        let mut store = lock(&self.shared.store);
        store.compacted = store.rv;
        store.log.clear();
    }

    /// Closes every open watch stream abruptly, in the middle of the chunked body (a TCP FIN
    /// without the terminating chunk), as a restarting apiserver or a proxy would. The client
    /// sees an unexpected EOF and should resume from its last resourceVersion.
    pub fn drop_watches(&self) {
        self.shared.control.send_modify(|c| c.drop_gen += 1);
    }

    /// Resets the TCP connection of every open watch stream (RST).
    pub fn reset_watches(&self) {
        self.shared.control.send_modify(|c| c.reset_gen += 1);
    }

    /// Ends every open watch with an `ERROR` event carrying a `410 Expired` Status, as when etcd
    /// compacts past a slow watcher. The client must re-list.
    pub fn expire_watches(&self) {
        self.shared.control.send_modify(|c| c.expire_gen += 1);
    }

    /// Makes the server unreachable: every open connection is reset, and new connections are
    /// accepted and reset at once (the listening socket stays, so [`ApiServer::resume`] serves
    /// again on the same address, in the same network namespace, with the same state).
    pub fn pause(&self) {
        self.shared.control.send_modify(|c| {
            c.paused = true;
            c.pause_gen += 1;
        });
    }

    /// Serves again after [`ApiServer::pause`].
    pub fn resume(&self) {
        self.shared.control.send_modify(|c| c.paused = false);
    }

    /// Answers the next `n` LIST or WATCH requests with HTTP `status_code` and a `Status` body.
    /// kube's default client retries 429, 503 and 504 itself (up to 15 times, backing off from
    /// 5 ms) before a caller sees them: use e.g. 500 to reach the watcher at once.
    pub fn fail_next(&self, n: usize, status_code: u16) {
        *lock(&self.shared.faults) = Faults {
            remaining: n,
            code: status_code,
        };
    }

    /// Every request received, as `METHOD /path?query` (the query exactly as sent), oldest first.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared.requests).clone()
    }

    /// Empties the request log.
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// How many watch streams are open now.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// From now on, answers streaming lists as `mode` says (an upgrade or a downgrade of the
    /// server; open watches are not touched).
    pub fn set_streaming_lists(&self, mode: StreamingLists) {
        *lock(&self.shared.streaming_lists) = mode;
    }

    /// Every list served so far, oldest first: which kind, and whether as a paginated LIST
    /// or a streaming list. A watch from resourceVersion 0 without the end bookmark (see
    /// [`StreamingLists::Ignored`]) is neither.
    pub fn initial_lists(&self) -> Vec<(Kind, ListProtocol)> {
        lock(&self.shared.initial_lists).clone()
    }

    /// Breaks the next streaming list of `kind` after `after` of its initial events (before
    /// its end bookmark; it needs more objects than that): the connection is dropped, or a
    /// `410 Expired` ERROR ends it.
    pub fn break_next_streaming_list(&self, kind: Kind, after: usize, how: Break) {
        *lock(&self.shared.break_streaming_list) = Some((kind, after, how));
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.control.send_modify(|c| c.shutdown = true);
        if let Some(thread) = self.thread.take() {
            // A panic on the server thread has already been printed; don't double-panic here.
            let _ = thread.join();
        }
    }
}

/// State shared by the hooks and the server tasks.
#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    /// The latest resourceVersion; watchers wake up when it changes.
    rv: watch::Sender<u64>,
    control: watch::Sender<Control>,
    faults: Mutex<Faults>,
    requests: Mutex<Vec<String>>,
    open_watches: AtomicUsize,
    /// [`Options::streaming_lists`], changed by [`ApiServer::set_streaming_lists`].
    streaming_lists: Mutex<StreamingLists>,
    /// Every initial list served, oldest first.
    initial_lists: Mutex<Vec<(Kind, ListProtocol)>>,
    /// [`ApiServer::break_next_streaming_list`]: of which kind, after how many initial
    /// events, and how.
    break_streaming_list: Mutex<Option<(Kind, usize, Break)>>,
    options: Options,
}

impl Shared {
    fn notify(&self, written: &Value) {
        if let Some(rv) = resource_version(written) {
            self.rv.send_if_modified(|cur| {
                let newer = rv > *cur;
                if newer {
                    *cur = rv;
                }
                newer
            });
        }
    }
}

/// Commands from the hooks to the server tasks, as generation counters: a task compares the
/// value it started with to the current one.
#[derive(Clone, Copy, Debug, Default)]
struct Control {
    paused: bool,
    pause_gen: u64,
    drop_gen: u64,
    reset_gen: u64,
    expire_gen: u64,
    shutdown: bool,
}

#[derive(Debug, Default)]
struct Faults {
    remaining: usize,
    code: u16,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The objects and the event log, the emulator's etcd.
#[derive(Debug)]
struct Store {
    /// The global revision: the resourceVersion of the latest write, of any kind.
    rv: u64,
    /// Events at or below this revision are forgotten.
    compacted: u64,
    /// Per kind, objects by key (`namespace/name`, or `name` for cluster-scoped kinds).
    objects: [BTreeMap<String, Value>; 4],
    /// The same objects encoded, under the same keys.
    encoded: [BTreeMap<String, Encoded>; 4],
    /// Every write since `compacted`, in revision order.
    log: Vec<Change>,
    next_uid: u64,
}

/// An object's JSON, encoded once when it is written and shared by every list and watch that
/// sends it, as the API server's watch cache shares one encoding among its watchers
/// (`cachingObject`; why: the module docs).
#[derive(Debug, Clone)]
struct Encoded {
    /// As a watch event carries it.
    object: Bytes,
    /// As a list item: without `kind` and `apiVersion`, which the real server leaves out there.
    item: Bytes,
}

impl Encoded {
    fn of(object: &Value) -> Encoded {
        Encoded {
            object: Bytes::from(object.to_string()),
            item: Bytes::from(list_item(object).to_string()),
        }
    }
}

/// An object as a list item: the real server omits `kind` and `apiVersion` there.
fn list_item(object: &Value) -> Value {
    let mut item = object.clone();
    if let Some(map) = item.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
    item
}

#[derive(Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    key: String,
    old: Option<Value>,
    new: Option<Value>,
}

fn key(kind: Kind, namespace: &str, name: &str) -> String {
    if kind.namespaced() {
        format!("{namespace}/{name}")
    } else {
        name.to_string()
    }
}

/// `(namespace, name)` of an object handed to a hook; the namespace defaults to `default`.
fn object_names(kind: Kind, object: &Value) -> (String, String) {
    let meta = object.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("a {} needs a string metadata.name: {object}", kind.kind()));
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    (ns.to_string(), name.to_string())
}

fn resource_version(obj: &Value) -> Option<u64> {
    obj.pointer("/metadata/resourceVersion")?
        .as_str()?
        .parse()
        .ok()
}

impl Store {
    fn new() -> Store {
        // Start above 0: "0" means "any version" to a client, never a real revision.
        Store {
            rv: 1,
            compacted: 1,
            objects: Default::default(),
            encoded: Default::default(),
            log: Vec::new(),
            next_uid: 1,
        }
    }

    fn apply(&mut self, kind: Kind, mut object: Value) -> Value {
        let (ns, name) = object_names(kind, &object);
        let key = key(kind, &ns, &name);
        let old = self.objects[kind.index()].get(&key).cloned();
        self.rv += 1;
        let rv = self.rv;
        let obj = object
            .as_object_mut()
            .unwrap_or_else(|| panic!("a {} must be a JSON object", kind.kind()));
        obj.insert("kind".into(), kind.kind().into());
        obj.insert("apiVersion".into(), kind.api_version().into());
        let meta = obj
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .expect("object_names checked metadata");
        if kind.namespaced() {
            meta.insert("namespace".into(), ns.into());
        } else {
            meta.remove("namespace");
        }
        meta.insert("resourceVersion".into(), rv.to_string().into());
        for field in ["uid", "creationTimestamp"] {
            let previous = old.as_ref().and_then(|o| o["metadata"].get(field)).cloned();
            let value = match previous {
                Some(v) => v,
                None if meta.contains_key(field) => continue,
                None if field == "uid" => {
                    self.next_uid += 1;
                    format!("00000000-0000-4000-8000-{:012x}", self.next_uid).into()
                }
                None => now_rfc3339().into(),
            };
            meta.insert(field.into(), value);
        }
        self.objects[kind.index()].insert(key.clone(), object.clone());
        self.encoded[kind.index()].insert(key.clone(), Encoded::of(&object));
        self.log.push(Change {
            rv,
            kind,
            key,
            old,
            new: Some(object.clone()),
        });
        object
    }

    fn delete(&mut self, kind: Kind, key: &str) -> Option<Value> {
        let mut last = self.objects[kind.index()].remove(key)?;
        self.encoded[kind.index()].remove(key);
        self.rv += 1;
        last["metadata"]["resourceVersion"] = self.rv.to_string().into();
        self.log.push(Change {
            rv: self.rv,
            kind,
            key: key.to_string(),
            old: Some(last.clone()),
            new: None,
        });
        Some(last)
    }

    /// The objects of `kind` as they were at revision `rv` (`rv <= self.rv`), rebuilt by undoing
    /// the log; `None` if the log no longer reaches back that far.
    fn objects_at(&self, kind: Kind, rv: u64) -> Option<Cow<'_, BTreeMap<String, Value>>> {
        let current = &self.objects[kind.index()];
        if rv >= self.rv {
            return Some(Cow::Borrowed(current));
        }
        if rv < self.compacted {
            return None;
        }
        let mut past = current.clone();
        for c in self.log.iter().rev().take_while(|c| c.rv > rv) {
            if c.kind != kind {
                continue;
            }
            match &c.old {
                Some(o) => past.insert(c.key.clone(), o.clone()),
                None => past.remove(&c.key),
            };
        }
        Some(Cow::Owned(past))
    }
}

/// RFC 3339 UTC, second precision, as Kubernetes writes `metav1.Time`.
fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days(i64::try_from(secs / 86_400).unwrap_or(0));
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

// ---------------------------------------------------------------------------------------------
// Selectors

/// Which objects a request sees: the namespace from the path, and its selectors.
#[derive(Debug, Default)]
struct Filter {
    namespace: Option<String>,
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        let str_of = |field: &str| meta.get(field).and_then(Value::as_str).unwrap_or("");
        if let Some(ns) = &self.namespace
            && str_of("namespace") != ns
        {
            return false;
        }
        let labels = meta.get("labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.labels.iter().all(|r| r.matches(label(r.key())))
            && self.fields.iter().all(|f| {
                let actual = match f.field {
                    Field::Name => str_of("name"),
                    Field::Namespace => str_of("namespace"),
                };
                (actual == f.value) != f.negated
            })
    }

    fn has_selectors(&self) -> bool {
        !self.labels.is_empty() || !self.fields.is_empty()
    }
}

/// One term of a label selector, with `k8s.io/apimachinery/pkg/labels` semantics: `!=` and
/// `notin` also match objects without the label.
#[derive(Debug, PartialEq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

impl LabelRequirement {
    fn key(&self) -> &str {
        match self {
            LabelRequirement::Equals(k, _)
            | LabelRequirement::NotEquals(k, _)
            | LabelRequirement::In(k, _)
            | LabelRequirement::NotIn(k, _)
            | LabelRequirement::Exists(k)
            | LabelRequirement::DoesNotExist(k)
            | LabelRequirement::GreaterThan(k, _)
            | LabelRequirement::LessThan(k, _) => k,
        }
    }

    fn matches(&self, value: Option<&str>) -> bool {
        let number = || value.and_then(|v| v.parse::<i64>().ok());
        match self {
            LabelRequirement::Equals(_, v) => value == Some(v.as_str()),
            LabelRequirement::NotEquals(_, v) => value != Some(v.as_str()),
            LabelRequirement::In(_, vs) => value.is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelRequirement::NotIn(_, vs) => !value.is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelRequirement::Exists(_) => value.is_some(),
            LabelRequirement::DoesNotExist(_) => value.is_none(),
            LabelRequirement::GreaterThan(_, n) => number().is_some_and(|x| x > *n),
            LabelRequirement::LessThan(_, n) => number().is_some_and(|x| x < *n),
        }
    }
}

/// Parses a `labelSelector`: comma-separated `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`,
/// `k notin (a,b)`, `k>n`, `k<n`.
fn parse_label_selector(s: &str) -> Result<Vec<LabelRequirement>, String> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    if terms.len() == 1 && terms[0].trim().is_empty() {
        return Ok(Vec::new());
    }
    terms
        .into_iter()
        .map(|t| parse_requirement(t.trim()))
        .collect()
}

fn parse_requirement(t: &str) -> Result<LabelRequirement, String> {
    let invalid = || format!("unable to parse requirement: {t:?}");
    if let Some(k) = t.strip_prefix('!') {
        return Ok(LabelRequirement::DoesNotExist(label_key(k.trim())?));
    }
    if let Some(open) = t.find('(') {
        let inner = t[open + 1..].strip_suffix(')').ok_or_else(invalid)?;
        let mut head = t[..open].split_whitespace();
        let (k, op) = (head.next(), head.next());
        if head.next().is_some() {
            return Err(invalid());
        }
        let k = label_key(k.ok_or_else(invalid)?)?;
        let values = inner
            .split(',')
            .map(|v| label_value(v.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        return match op {
            Some("in") => Ok(LabelRequirement::In(k, values)),
            Some("notin") => Ok(LabelRequirement::NotIn(k, values)),
            _ => Err(invalid()),
        };
    }
    if let Some((k, v)) = t.split_once("!=") {
        return Ok(LabelRequirement::NotEquals(
            label_key(k.trim())?,
            label_value(v.trim())?,
        ));
    }
    if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
        return Ok(LabelRequirement::Equals(
            label_key(k.trim())?,
            label_value(v.trim())?,
        ));
    }
    for (op, greater) in [('>', true), ('<', false)] {
        if let Some((k, v)) = t.split_once(op) {
            let n = v.trim().parse::<i64>().map_err(|_| invalid())?;
            let k = label_key(k.trim())?;
            return Ok(if greater {
                LabelRequirement::GreaterThan(k, n)
            } else {
                LabelRequirement::LessThan(k, n)
            });
        }
    }
    Ok(LabelRequirement::Exists(label_key(t)?))
}

fn label_key(k: &str) -> Result<String, String> {
    let ok = !k.is_empty()
        && k.matches('/').count() <= 1
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok {
        Ok(k.to_string())
    } else {
        Err(format!("invalid label key {k:?}"))
    }
}

fn label_value(v: &str) -> Result<String, String> {
    if v.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Ok(v.to_string())
    } else {
        Err(format!("invalid label value {v:?}"))
    }
}

#[derive(Debug, PartialEq)]
enum Field {
    Name,
    Namespace,
}

#[derive(Debug, PartialEq)]
struct FieldRequirement {
    field: Field,
    value: String,
    negated: bool,
}

/// Parses a `fieldSelector` over `metadata.name` and `metadata.namespace` (`=`, `==`, `!=`).
fn parse_field_selector(s: &str) -> Result<Vec<FieldRequirement>, String> {
    let mut out = Vec::new();
    for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (field, value, negated) = if let Some((f, v)) = term.split_once("!=") {
            (f, v, true)
        } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (f, v, false)
        } else {
            return Err(format!(
                "invalid selector: '{term}'; can't understand '{term}'"
            ));
        };
        let field = match field.trim() {
            "metadata.name" => Field::Name,
            "metadata.namespace" => Field::Namespace,
            other => return Err(format!("field label not supported: {other}")),
        };
        out.push(FieldRequirement {
            field,
            value: value.trim().to_string(),
            negated,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// HTTP

type Body = UnsyncBoxBody<Bytes, io::Error>;

/// A failure answered with a `Status` object.
#[derive(Debug)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    /// `details`, for `422 Invalid`.
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason: reason_for(code),
            message: message.into(),
            details: None,
        }
    }

    fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }

    fn response(&self) -> Response<Body> {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(code, &self.status())
    }
}

fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    }
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    bytes_response(code, Bytes::from(body.to_string()))
}

/// A response with a JSON body already encoded.
fn bytes_response(code: StatusCode, bytes: Bytes) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let mut control = shared.control.subscribe();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if control.borrow().paused {
                        // Unreachable: complete the handshake, then reset.
                        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                        drop(stream);
                    } else {
                        tokio::spawn(serve_connection(Arc::clone(&shared), stream));
                    }
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            changed = control.changed() => {
                if changed.is_err() || control.borrow().shutdown {
                    return;
                }
            }
        }
    }
}

/// Per-connection state the request handlers share with the connection task.
#[derive(Debug, Default)]
struct ConnState {
    /// Open watch streams on this connection.
    watches: AtomicUsize,
    /// Set when the connection must end with RST rather than FIN.
    reset: AtomicBool,
}

async fn serve_connection(shared: Arc<Shared>, stream: tokio::net::TcpStream) {
    // A second descriptor for the same socket, so the connection can be reset (SO_LINGER=0)
    // after hyper has been handed the stream.
    let Ok((stream, socket)) = duplicate(stream) else {
        return;
    };
    let conn_state = Arc::new(ConnState::default());
    let service = {
        let shared = Arc::clone(&shared);
        let conn_state = Arc::clone(&conn_state);
        service_fn(move |req| handle(Arc::clone(&shared), Arc::clone(&conn_state), req))
    };
    let mut control = shared.control.subscribe();
    let started = *control.borrow_and_update();
    let mut last = started;
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let mut reset = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            changed = control.changed() => {
                let c = *control.borrow_and_update();
                let prev = std::mem::replace(&mut last, c);
                if changed.is_err() || c.shutdown || c.pause_gen != started.pause_gen {
                    reset = true;
                    break;
                }
                // Drops and resets apply to the watches open when they were issued.
                let watching = conn_state.watches.load(Ordering::SeqCst) > 0;
                if watching && c.reset_gen != prev.reset_gen {
                    reset = true;
                    break;
                }
                if watching && c.drop_gen != prev.drop_gen {
                    break;
                }
            }
        }
    }
    if reset || conn_state.reset.load(Ordering::SeqCst) {
        let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
    }
    // Dropping the connection (and then the duplicate) closes the socket mid-stream.
}

fn duplicate(
    stream: tokio::net::TcpStream,
) -> io::Result<(tokio::net::TcpStream, std::net::TcpStream)> {
    let std_stream = stream.into_std()?;
    let dup = std_stream.try_clone()?;
    Ok((tokio::net::TcpStream::from_std(std_stream)?, dup))
}

/// Where a request goes.
#[derive(Debug, PartialEq)]
enum Target {
    Collection {
        kind: Kind,
        namespace: Option<String>,
    },
    Object {
        kind: Kind,
        namespace: String,
        name: String,
    },
}

fn route(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
        ["apis", group, "v1", rest @ ..] => (format!("{group}/v1"), rest),
        _ => return None,
    };
    let kind_of = |plural: &str| {
        Kind::ALL
            .into_iter()
            .find(|k| k.plural() == plural && k.api_version() == version)
    };
    match rest {
        [plural] => Some(Target::Collection {
            kind: kind_of(plural)?,
            namespace: None,
        }),
        ["namespaces", ns, plural] => {
            let kind = kind_of(plural).filter(|k| k.namespaced())?;
            Some(Target::Collection {
                kind,
                namespace: Some((*ns).to_string()),
            })
        }
        ["namespaces", ns, plural, name] => {
            let kind = kind_of(plural).filter(|k| k.namespaced())?;
            Some(Target::Object {
                kind,
                namespace: (*ns).to_string(),
                name: (*name).to_string(),
            })
        }
        [plural, name] => {
            let kind = kind_of(plural).filter(|k| !k.namespaced())?;
            Some(Target::Object {
                kind,
                namespace: String::new(),
                name: (*name).to_string(),
            })
        }
        _ => None,
    }
}

/// The query parameters the emulator understands.
#[derive(Debug, Default)]
struct Params {
    watch: bool,
    resource_version: Option<String>,
    resource_version_match: Option<String>,
    limit: Option<usize>,
    continue_token: Option<String>,
    label_selector: Option<String>,
    field_selector: Option<String>,
    timeout_seconds: Option<u64>,
    allow_watch_bookmarks: bool,
    send_initial_events: Option<bool>,
}

fn parse_params(query: &str) -> Result<Params, ApiError> {
    let mut p = Params::default();
    let boolean = |v: &str| matches!(v, "true" | "1" | "True" | "TRUE" | "t" | "T");
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let number = || {
            v.parse::<u64>()
                .map_err(|_| ApiError::new(400, format!("invalid {k}: {v:?}")))
        };
        match k.as_ref() {
            "watch" => p.watch = boolean(&v),
            "resourceVersion" => p.resource_version = Some(v.to_string()),
            "resourceVersionMatch" => {
                p.resource_version_match = Some(v.to_string()).filter(|m| !m.is_empty())
            }
            "limit" => {
                p.limit = Some(usize::try_from(number()?).unwrap_or(usize::MAX)).filter(|&l| l > 0)
            }
            "continue" => p.continue_token = Some(v.to_string()).filter(|t| !t.is_empty()),
            "labelSelector" => p.label_selector = Some(v.to_string()),
            "fieldSelector" => p.field_selector = Some(v.to_string()),
            "timeoutSeconds" => p.timeout_seconds = Some(number()?),
            "allowWatchBookmarks" => p.allow_watch_bookmarks = boolean(&v),
            "sendInitialEvents" => p.send_initial_events = Some(boolean(&v)),
            _ => {}
        }
    }
    Ok(p)
}

impl Params {
    fn filter(&self, namespace: Option<String>) -> Result<Filter, ApiError> {
        let labels = parse_label_selector(self.label_selector.as_deref().unwrap_or(""))
            .map_err(|e| ApiError::new(400, format!("unable to parse labelSelector: {e}")))?;
        let fields = parse_field_selector(self.field_selector.as_deref().unwrap_or(""))
            .map_err(|e| ApiError::new(400, e))?;
        Ok(Filter {
            namespace,
            labels,
            fields,
        })
    }

    /// `resourceVersion` as a revision; `None` for unset, `""` and `"0"` ("any").
    fn revision(&self) -> Result<Option<u64>, ApiError> {
        match self.resource_version.as_deref() {
            None | Some("" | "0") => Ok(None),
            Some(s) => s
                .parse()
                .map(Some)
                .map_err(|_| ApiError::new(400, format!("invalid resource version: {s:?}"))),
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_string(), ToString::to_string);
    lock(&shared.requests).push(format!("{} {}", req.method(), path_and_query));
    Ok(match respond(&shared, &conn, &req).await {
        Ok(resp) => resp,
        Err(e) => e.response(),
    })
}

async fn respond(
    shared: &Arc<Shared>,
    conn: &Arc<ConnState>,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let not_found = || ApiError::new(404, "the server could not find the requested resource");
    let target = route(req.uri().path()).ok_or_else(not_found)?;
    if req.method() != Method::GET {
        return Err(ApiError::new(
            405,
            "the emulator serves GET only (LIST, WATCH and GET); write through its hooks",
        ));
    }
    let mut params = parse_params(req.uri().query().unwrap_or(""))?;
    let streaming_lists = *lock(&shared.streaming_lists);
    if streaming_lists == StreamingLists::Ignored {
        // A server that predates the parameters never sees them.
        params.send_initial_events = None;
        params.resource_version_match = None;
    }
    match target {
        Target::Object {
            kind,
            namespace,
            name,
        } => {
            let store = lock(&shared.store);
            let obj = store.objects[kind.index()].get(&key(kind, &namespace, &name));
            match obj {
                Some(obj) => Ok(json_response(StatusCode::OK, obj)),
                None => Err(ApiError::new(
                    404,
                    format!("{} \"{name}\" not found", kind.plural()),
                )),
            }
        }
        Target::Collection { kind, namespace } => {
            {
                let mut faults = lock(&shared.faults);
                if faults.remaining > 0 {
                    faults.remaining -= 1;
                    return Err(ApiError::new(
                        faults.code,
                        format!("injected failure ({} more)", faults.remaining),
                    ));
                }
            }
            let filter = params.filter(namespace)?;
            if params.watch {
                let watch_list = streaming_lists == StreamingLists::Offered;
                start_watch(shared, conn, kind, filter, &params, watch_list)
            } else {
                validate_list(&params)?;
                let listed = list(shared, kind, &filter, &params).await?;
                if params.continue_token.is_none() {
                    lock(&shared.initial_lists).push((kind, ListProtocol::Paginated));
                }
                Ok(listed)
            }
        }
    }
}

/// One invalid query parameter, as apimachinery's `field.Error` words it.
#[derive(Debug)]
struct FieldError {
    field: &'static str,
    /// `FieldValueForbidden`, `FieldValueNotSupported`.
    reason: &'static str,
    /// `Forbidden: …`, `Unsupported value: …`.
    body: String,
}

fn forbidden(field: &'static str, detail: &str) -> FieldError {
    FieldError {
        field,
        reason: "FieldValueForbidden",
        body: format!("Forbidden: {detail}"),
    }
}

fn not_supported(field: &'static str, value: &str, supported: &[&str]) -> FieldError {
    let supported: Vec<String> = supported.iter().map(|v| format!("{v:?}")).collect();
    FieldError {
        field,
        reason: "FieldValueNotSupported",
        body: format!(
            "Unsupported value: {value:?}: supported values: {}",
            supported.join(", ")
        ),
    }
}

/// `422 Invalid` for `ListOptions` when there are errors, worded as the API server's
/// `errors.NewInvalid` (one error inline, several in brackets).
fn invalid_list_options(errors: &[FieldError]) -> Result<(), ApiError> {
    let text: Vec<String> = errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.body))
        .collect();
    let listed = match text.as_slice() {
        [] => return Ok(()),
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    };
    let causes: Vec<Value> = errors
        .iter()
        .map(|e| json!({"reason": e.reason, "message": e.body, "field": e.field}))
        .collect();
    let mut e = ApiError::new(
        422,
        format!("ListOptions.meta.k8s.io \"\" is invalid: {listed}"),
    );
    e.details = Some(json!({"group": "meta.k8s.io", "kind": "ListOptions", "causes": causes}));
    Err(e)
}

/// apimachinery's `ValidateListOptions` for a LIST.
fn validate_list(params: &Params) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    if let Some(m) = params.resource_version_match.as_deref() {
        if params.resource_version.as_deref().unwrap_or("").is_empty() {
            errors.push(forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        if params.continue_token.is_some() {
            errors.push(forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden when continue is provided",
            ));
        }
        if m != "Exact" && m != "NotOlderThan" {
            errors.push(not_supported(
                "resourceVersionMatch",
                m,
                &["Exact", "NotOlderThan", ""],
            ));
        }
        if m == "Exact" && params.resource_version.as_deref() == Some("0") {
            errors.push(forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
            ));
        }
    }
    if params.send_initial_events.is_some() {
        errors.push(forbidden(
            "sendInitialEvents",
            "sendInitialEvents is forbidden for list",
        ));
    }
    invalid_list_options(&errors)
}

/// apimachinery's `ValidateListOptions` for a WATCH; `watch_list`: the server's `WatchList`
/// feature gate.
fn validate_watch(params: &Params, watch_list: bool) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    let m = params.resource_version_match.as_deref();
    if params.send_initial_events.is_some() {
        if m != Some("NotOlderThan") {
            errors.push(forbidden(
                "resourceVersionMatch",
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
        if !watch_list {
            errors.push(forbidden(
                "sendInitialEvents",
                "sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled",
            ));
        }
    }
    if let Some(m) = m {
        if params.send_initial_events.is_none() {
            errors.push(forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
        if m != "NotOlderThan" {
            errors.push(not_supported("resourceVersionMatch", m, &["NotOlderThan"]));
        }
        if params.continue_token.is_some() {
            errors.push(forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden when continue is provided",
            ));
        }
    }
    invalid_list_options(&errors)
}

fn too_large(wanted: u64, current: u64) -> ApiError {
    ApiError::new(
        504,
        format!("Timeout: Too large resource version: {wanted}, current: {current}"),
    )
}

/// Waits until the server has reached revision `wanted`, as the cacher does for a
/// resourceVersion from the future.
async fn wait_for_revision(shared: &Shared, wanted: u64) -> Result<(), ApiError> {
    let mut rvs = shared.rv.subscribe();
    match tokio::time::timeout(TOO_LARGE_RV_WAIT, rvs.wait_for(|rv| *rv >= wanted)).await {
        Ok(Ok(_)) => Ok(()),
        _ => Err(too_large(wanted, *shared.rv.borrow())),
    }
}

async fn list(
    shared: &Shared,
    kind: Kind,
    filter: &Filter,
    params: &Params,
) -> Result<Response<Body>, ApiError> {
    // Which snapshot, and where in it.
    let (at, after) = if let Some(token) = &params.continue_token {
        if params.revision()?.is_some() {
            return Err(ApiError::new(
                400,
                "specifying resource version is not allowed when using continue",
            ));
        }
        let (rv, after) = token
            .split_once(':')
            .and_then(|(rv, after)| Some((rv.parse::<u64>().ok()?, after.to_string())))
            .ok_or_else(|| ApiError::new(400, format!("continue key is not valid: {token:?}")))?;
        (Some(rv), Some(after))
    } else {
        let exact = params.resource_version_match.as_deref() == Some("Exact");
        match params.revision()? {
            Some(rv) if exact => (Some(rv), None),
            Some(rv) => {
                wait_for_revision(shared, rv).await?;
                (None, None)
            }
            None => (None, None),
        }
    };
    let store = lock(&shared.store);
    let at = at.unwrap_or(store.rv);
    if at > store.rv {
        return Err(too_large(at, store.rv));
    }
    let objects = store.objects_at(kind, at).ok_or_else(|| match &after {
        Some(_) => ApiError::new(
            410,
            "The provided continue parameter is too old to display a consistent list result. \
             You can start a new list without the continue parameter.",
        ),
        None => ApiError::new(410, "The resourceVersion for the provided list is too old."),
    })?;
    // The current objects' encodings are kept; a list at an older revision encodes its own.
    let encoded = (at >= store.rv).then(|| &store.encoded[kind.index()]);
    let start = after.as_ref().map_or(Bound::Unbounded, Bound::Excluded);
    let mut matching = objects
        .range::<String, _>((start, Bound::Unbounded))
        .filter(|(_, o)| filter.matches(o));
    let mut items: Vec<Bytes> = Vec::new();
    let mut last = None;
    for (k, o) in matching.by_ref().take(params.limit.unwrap_or(usize::MAX)) {
        let item = match encoded.and_then(|e| e.get(k)) {
            Some(e) => e.item.clone(),
            None => Bytes::from(list_item(o).to_string()),
        };
        items.push(item);
        last = Some(k.clone());
    }
    let remaining = matching.count();
    let mut meta = Map::new();
    meta.insert("resourceVersion".into(), at.to_string().into());
    if remaining > 0
        && let Some(last) = last
    {
        meta.insert("continue".into(), format!("{at}:{last}").into());
        if !filter.has_selectors() {
            meta.insert("remainingItemCount".into(), remaining.into());
        }
    }
    // Written around the items' encodings (kind and apiVersion are plain ASCII names).
    let head = format!(
        "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{},\"items\":[",
        kind.kind(),
        kind.api_version(),
        Value::Object(meta)
    );
    let mut body =
        Vec::with_capacity(head.len() + items.iter().map(|i| i.len() + 1).sum::<usize>() + 2);
    body.extend_from_slice(head.as_bytes());
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item);
    }
    body.extend_from_slice(b"]}");
    Ok(bytes_response(StatusCode::OK, Bytes::from(body)))
}

/// Where a watch starts.
#[derive(Debug)]
enum Start {
    /// Synthetic ADDED for every object at a revision at least this one, then live events.
    /// `end_bookmark`: a streaming list, which ends the initial events with an annotated bookmark.
    Initial {
        not_older_than: u64,
        end_bookmark: bool,
    },
    /// Live events after this revision.
    After(u64),
}

#[derive(Debug)]
struct WatchSpec {
    kind: Kind,
    filter: Filter,
    start: Start,
    /// Break the initial events after this many, so.
    broken: Option<(usize, Break)>,
    timeout: Duration,
    bookmarks: bool,
}

/// Starts a watch after validating it as the API server does; `watch_list`: whether the
/// server offers streaming lists (its `WatchList` gate).
fn start_watch(
    shared: &Arc<Shared>,
    conn: &Arc<ConnState>,
    kind: Kind,
    filter: Filter,
    params: &Params,
    watch_list: bool,
) -> Result<Response<Body>, ApiError> {
    validate_watch(params, watch_list)?;
    let rv = params.revision()?;
    let start = match params.send_initial_events {
        // Without bookmarks it is no streaming list (the apiserver's `isListWatchRequest`):
        // the initial events come, the end bookmark does not.
        Some(true) => Start::Initial {
            not_older_than: rv.unwrap_or(0),
            end_bookmark: params.allow_watch_bookmarks,
        },
        Some(false) => Start::After(rv.unwrap_or_else(|| *shared.rv.borrow())),
        None => rv.map_or(
            Start::Initial {
                not_older_than: 0,
                end_bookmark: false,
            },
            Start::After,
        ),
    };
    let broken = match start {
        Start::Initial {
            end_bookmark: true, ..
        } => {
            lock(&shared.initial_lists).push((kind, ListProtocol::Streaming));
            let mut broken = lock(&shared.break_streaming_list);
            match *broken {
                Some((k, after, how)) if k == kind => {
                    *broken = None;
                    Some((after, how))
                }
                _ => None,
            }
        }
        _ => None,
    };
    let spec = WatchSpec {
        kind,
        filter,
        start,
        broken,
        timeout: params
            .timeout_seconds
            .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs),
        bookmarks: params.allow_watch_bookmarks,
    };
    let (tx, mut rx) = mpsc::channel::<Result<Frame<Bytes>, io::Error>>(64);
    // Counted before the response leaves, so a drop or reset issued after the client saw the
    // headers always finds this connection watching.
    conn.watches.fetch_add(1, Ordering::SeqCst);
    shared.open_watches.fetch_add(1, Ordering::SeqCst);
    let guard = WatchGuard {
        shared: Arc::clone(shared),
        conn: Arc::clone(conn),
    };
    // Commands issued once the client has the response head apply to this watch, even before
    // its task first runs.
    let started = *shared.control.borrow();
    tokio::spawn(run_watch(guard, started, spec, tx));
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// Counts an open watch for as long as its task runs.
#[derive(Debug)]
struct WatchGuard {
    shared: Arc<Shared>,
    conn: Arc<ConnState>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.conn.watches.fetch_sub(1, Ordering::SeqCst);
        self.shared.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The sending half of one watch stream.
struct Out {
    tx: mpsc::Sender<Result<Frame<Bytes>, io::Error>>,
    kind: Kind,
}

impl Out {
    /// Sends one event line; false once the client is gone.
    async fn send(&self, event_type: &str, object: &Value) -> bool {
        self.send_encoded(event_type, object.to_string().as_bytes())
            .await
    }

    /// Sends one event line around an object already encoded; false once the client is gone.
    async fn send_encoded(&self, event_type: &str, object: &[u8]) -> bool {
        // Written around the object rather than through a new `Value`, which would copy it:
        // the emulator shares the daemon's cores in the benches (issue 13).
        let head = format!("{{\"type\":{},\"object\":", Value::from(event_type));
        let mut line = Vec::with_capacity(head.len() + object.len() + 2);
        line.extend_from_slice(head.as_bytes());
        line.extend_from_slice(object);
        line.extend_from_slice(b"}\n");
        self.tx
            .send(Ok(Frame::data(Bytes::from(line))))
            .await
            .is_ok()
    }

    async fn bookmark(&self, rv: u64, initial_events_end: bool) -> bool {
        let mut metadata = Map::new();
        metadata.insert("resourceVersion".into(), rv.to_string().into());
        if initial_events_end {
            let mut annotations = Map::new();
            annotations.insert(INITIAL_EVENTS_END.into(), "true".into());
            metadata.insert("annotations".into(), annotations.into());
        }
        let object = json!({
            "kind": self.kind.kind(),
            "apiVersion": self.kind.api_version(),
            "metadata": metadata,
        });
        self.send("BOOKMARK", &object).await
    }

    async fn error(&self, e: &ApiError) -> bool {
        self.send("ERROR", &e.status()).await
    }
}

fn expired(message: String) -> ApiError {
    ApiError::new(410, message)
}

/// The event a watcher with `filter` sees for a change, if any (the cacher's
/// `convertToWatchEvent`): an object that stops matching is DELETED with its previous content and
/// the change's resourceVersion.
fn event_for(change: &Change, filter: &Filter) -> Option<(&'static str, Value)> {
    let new = change.new.as_ref().filter(|o| filter.matches(o));
    let old = change.old.as_ref().filter(|o| filter.matches(o));
    match (new, old) {
        (Some(n), None) => Some(("ADDED", n.clone())),
        (Some(n), Some(_)) => Some(("MODIFIED", n.clone())),
        (None, Some(o)) => {
            let mut o = o.clone();
            o["metadata"]["resourceVersion"] = change.rv.to_string().into();
            Some(("DELETED", o))
        }
        (None, None) => None,
    }
}

/// Events after `*cursor` for this watcher, advancing the cursor to the latest revision;
/// `Err` if the log no longer reaches back to the cursor.
fn drain(
    shared: &Shared,
    spec: &WatchSpec,
    cursor: &mut u64,
) -> Result<Vec<(&'static str, Value)>, ApiError> {
    let store = lock(&shared.store);
    if *cursor < store.compacted {
        return Err(expired(format!(
            "too old resource version: {} ({})",
            *cursor, store.compacted
        )));
    }
    let from = store.log.partition_point(|c| c.rv <= *cursor);
    let events = store.log[from..]
        .iter()
        .filter(|c| c.kind == spec.kind)
        .filter_map(|c| event_for(c, &spec.filter))
        .collect();
    *cursor = (*cursor).max(store.rv);
    Ok(events)
}

async fn run_watch(
    guard: WatchGuard,
    started: Control,
    spec: WatchSpec,
    tx: mpsc::Sender<Result<Frame<Bytes>, io::Error>>,
) {
    let shared = Arc::clone(&guard.shared);
    let out = Out {
        tx,
        kind: spec.kind,
    };
    let mut control = shared.control.subscribe();
    let mut rvs = shared.rv.subscribe();
    let deadline = Instant::now() + spec.timeout;

    let mut cursor = match spec.start {
        Start::Initial {
            not_older_than,
            end_bookmark,
        } => {
            if let Err(e) = wait_for_revision(&shared, not_older_than).await {
                out.error(&e).await;
                return;
            }
            let (rv, objects) = {
                let store = lock(&shared.store);
                let encoded = &store.encoded[spec.kind.index()];
                let objects: Vec<Bytes> = store.objects[spec.kind.index()]
                    .iter()
                    .filter(|(_, o)| spec.filter.matches(o))
                    .map(|(k, o)| match encoded.get(k) {
                        Some(e) => e.object.clone(),
                        None => Bytes::from(o.to_string()),
                    })
                    .collect();
                (store.rv, objects)
            };
            for (i, o) in objects.iter().enumerate() {
                match spec.broken {
                    Some((after, Break::Expire)) if i == after => {
                        let e = expired(
                            "The resourceVersion for the provided watch is too old.".into(),
                        );
                        out.error(&e).await;
                        return;
                    }
                    Some((after, Break::Drop)) if i == after => {
                        // Once the events sent are on the wire (hyper drops what it has not
                        // written yet), a body error: hyper closes the connection without the
                        // last chunk.
                        while out.tx.capacity() < out.tx.max_capacity() {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let cut = io::Error::new(io::ErrorKind::ConnectionAborted, "cut");
                        let _ = out.tx.send(Err(cut)).await;
                        return;
                    }
                    _ => {}
                }
                if !out.send_encoded("ADDED", o).await {
                    return;
                }
            }
            if end_bookmark && !out.bookmark(rv, true).await {
                return;
            }
            rv
        }
        Start::After(rv) => {
            if let Err(e) = wait_for_revision(&shared, rv).await {
                out.error(&e).await;
                return;
            }
            rv
        }
    };
    rvs.mark_unchanged();

    let interval = shared.options.bookmark_interval;
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ending = false;
    loop {
        // Commands first: an event written after `expire_watches()` returned must not reach
        // this stream, whatever woke the task.
        let command = *control.borrow_and_update();
        match stop(&started, &command) {
            Some(Stop::Expire) => {
                let e = expired("The resourceVersion for the provided watch is too old.".into());
                out.error(&e).await;
                return;
            }
            Some(Stop::Abort { reset }) => {
                if reset {
                    guard.conn.reset.store(true, Ordering::SeqCst);
                }
                // Hold the body open (no clean end) until the connection task drops it.
                out.tx.closed().await;
                return;
            }
            None => {}
        }
        match drain(&shared, &spec, &mut cursor) {
            Ok(events) => {
                for (event_type, object) in events {
                    if !out.send(event_type, &object).await {
                        return;
                    }
                }
            }
            Err(e) => {
                out.error(&e).await;
                return;
            }
        }
        if ending {
            // The real server ends a timed-out watch with a bookmark, when bookmarks are on.
            if spec.bookmarks {
                out.bookmark(cursor, false).await;
            }
            return;
        }
        tokio::select! {
            biased;
            changed = control.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = out.tx.closed() => return,
            () = tokio::time::sleep_until(deadline) => ending = true,
            changed = rvs.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = ticker.tick() => {
                if spec.bookmarks && !out.bookmark(cursor, false).await {
                    return;
                }
            }
        }
    }
}

/// Why a watch stream stops on a command from the hooks.
#[derive(Debug, PartialEq)]
enum Stop {
    /// `expire_watches`: a 410 ERROR event, then a clean end.
    Expire,
    /// `drop_watches`, `reset_watches`, `pause` or shutdown: the connection is cut under it.
    Abort { reset: bool },
}

fn stop(started: &Control, now: &Control) -> Option<Stop> {
    if now.reset_gen != started.reset_gen {
        Some(Stop::Abort { reset: true })
    } else if now.shutdown || now.pause_gen != started.pause_gen || now.drop_gen != started.drop_gen
    {
        Some(Stop::Abort { reset: false })
    } else if now.expire_gen != started.expire_gen {
        Some(Stop::Expire)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn label_selectors_follow_apimachinery_semantics() {
        let sel = |s: &str, labels: Value| {
            let filter = Filter {
                labels: parse_label_selector(s).unwrap(),
                ..Filter::default()
            };
            filter.matches(&json!({"metadata": {"labels": labels}}))
        };
        assert!(sel("", json!({})));
        assert!(sel("a=1", json!({"a": "1"})));
        assert!(sel("a==1,b", json!({"a": "1", "b": ""})));
        assert!(!sel("a=1,b", json!({"a": "1"})));
        assert!(sel("a!=1", json!({})), "!= matches a missing label");
        assert!(!sel("a!=1", json!({"a": "1"})));
        assert!(sel("!service.kubernetes.io/headless", json!({"x": "y"})));
        assert!(!sel(
            "!service.kubernetes.io/headless",
            json!({"service.kubernetes.io/headless": ""})
        ));
        assert!(sel("env in (a, b),tier notin (x)", json!({"env": "b"})));
        assert!(!sel("env in (a,b)", json!({"env": "c"})));
        assert!(!sel("env notin (a,b)", json!({"env": "a"})));
        assert!(sel("n>3,n<5", json!({"n": "4"})));
        assert!(parse_label_selector("a=(").is_err());
        assert!(parse_label_selector("a b").is_err());
    }

    #[test]
    fn field_selectors_support_name_and_namespace_only() {
        let f = parse_field_selector("metadata.name=web,metadata.namespace!=kube-system").unwrap();
        assert_eq!(f.len(), 2);
        assert!(f[1].negated);
        assert!(parse_field_selector("spec.clusterIP=None").is_err());
    }

    #[test]
    fn routes_cover_cluster_wide_namespaced_and_single_objects() {
        assert_eq!(
            route("/api/v1/services"),
            Some(Target::Collection {
                kind: Kind::Service,
                namespace: None
            })
        );
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices"),
            Some(Target::Collection {
                kind: Kind::EndpointSlice,
                namespace: Some("ns".into())
            })
        );
        assert_eq!(
            route("/api/v1/nodes/n1"),
            Some(Target::Object {
                kind: Kind::Node,
                namespace: String::new(),
                name: "n1".into()
            })
        );
        assert_eq!(route("/api/v1/endpointslices"), None);
        assert_eq!(route("/api/v1/namespaces/ns/nodes"), None);
        assert_eq!(route("/apis/discovery.k8s.io/v1/services"), None);
    }

    #[test]
    fn past_snapshots_are_rebuilt_from_the_log_until_compaction() {
        let mut store = Store::new();
        store.apply(Kind::Service, json!({"metadata": {"name": "a"}}));
        let rv = store.rv;
        store.apply(Kind::Service, json!({"metadata": {"name": "b"}}));
        store.delete(Kind::Service, "default/a");
        let past = store.objects_at(Kind::Service, rv).unwrap();
        assert_eq!(past.keys().collect::<Vec<_>>(), ["default/a"]);
        store.compacted = store.rv;
        store.log.clear();
        assert!(store.objects_at(Kind::Service, rv).is_none());
    }
}
