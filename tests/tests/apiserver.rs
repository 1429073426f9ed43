//! The real kube 5 client (`kube::runtime::watcher`, `Api`) against the API server emulator in
//! `lb_e2e::apiserver`: each test starts its own emulator on 127.0.0.1 and needs no privileges.
//!
//! These pin down the list/watch behaviour the proxy's watch layer relies on: paginated initial
//! lists, resume from the last resourceVersion after a dropped stream, a full re-list after a
//! 410, bookmarks, selector-driven deletes, streaming lists and an unreachable apiserver.

use std::net::TcpListener;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Client, Config, ResourceExt};
use lb_e2e::apiserver::{ApiServer, Break, Kind, ListProtocol, Options, StreamingLists};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The longest any single expected step may take.
const WAIT: Duration = Duration::from_secs(5);

async fn client(api: &ApiServer) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&api.kubeconfig()).expect("the kubeconfig parses");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube accepts the kubeconfig");
    Client::try_from(config).expect("kube builds a client for http://")
}

fn service(name: &str, labels: Value) -> Value {
    json!({
        "metadata": {"namespace": "default", "name": name, "labels": labels},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10",
                 "ports": [{"port": 80, "protocol": "TCP"}]},
    })
}

fn node(name: &str) -> Value {
    json!({"metadata": {"name": name}})
}

fn rv_of(obj: &Value) -> String {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .expect("stored objects carry a resourceVersion")
        .to_string()
}

/// Requests in the emulator's log that contain every one of `parts`.
fn requests_with(api: &ApiServer, parts: &[&str]) -> Vec<String> {
    api.requests()
        .into_iter()
        .filter(|r| parts.iter().all(|p| r.contains(p)))
        .collect()
}

fn lists(api: &ApiServer) -> usize {
    requests_with(api, &["GET /api/v1/services"])
        .iter()
        .filter(|r| !r.contains("watch=true"))
        .count()
}

async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

type Item = Result<Event<Service>, watcher::Error>;

/// A watcher polled by its own task, so it makes progress while the test works the emulator.
struct Watch {
    rx: mpsc::UnboundedReceiver<Item>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    fn spawn(stream: impl Stream<Item = Item> + Send + 'static) -> Watch {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                if tx.send(item).is_err() {
                    return;
                }
            }
        });
        Watch { rx, task }
    }

    async fn next(&mut self) -> Item {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("a watcher event within 5 s")
            .expect("the watcher stream does not end")
    }

    async fn next_ok(&mut self) -> Event<Service> {
        self.next()
            .await
            .unwrap_or_else(|e| panic!("unexpected watcher error: {e}"))
    }

    /// The next non-error event (errors are expected, e.g. while the server is unreachable);
    /// also returns how many errors came first.
    async fn next_after_errors(&mut self) -> (Event<Service>, usize) {
        let mut errors = 0;
        loop {
            match self.next().await {
                Ok(event) => return (event, errors),
                Err(_) => errors += 1,
            }
        }
    }

    /// Init, InitApply…, InitDone: the names listed.
    async fn init(&mut self) -> Vec<String> {
        match self.next_ok().await {
            Event::Init => {}
            other => panic!("expected Init, got {other:?}"),
        }
        self.init_rest().await
    }

    /// InitApply…, InitDone after an Init.
    async fn init_rest(&mut self) -> Vec<String> {
        let mut names = Vec::new();
        loop {
            match self.next_ok().await {
                Event::InitApply(s) => names.push(s.name_any()),
                Event::InitDone => return names,
                other => panic!("expected InitApply or InitDone, got {other:?}"),
            }
        }
    }

    async fn applied(&mut self) -> Service {
        match self.next_ok().await {
            Event::Apply(s) => s,
            other => panic!("expected Apply, got {other:?}"),
        }
    }

    async fn deleted(&mut self) -> Service {
        match self.next_ok().await {
            Event::Delete(s) => s,
            other => panic!("expected Delete, got {other:?}"),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn watcher_lists_in_pages_then_streams_changes() {
    let api = ApiServer::start_local();
    for i in 0..1203 {
        api.apply(Kind::Service, service(&format!("svc-{i:04}"), json!({})));
    }
    let list_rv = api.resource_version();
    let services = Api::<Service>::all(client(&api).await);
    let mut w = Watch::spawn(watcher(services, watcher::Config::default()));

    let names = w.init().await;
    assert_eq!(names.len(), 1203);
    assert!(
        names.windows(2).all(|p| p[0] < p[1]),
        "each object listed once"
    );
    let pages = requests_with(&api, &["limit=500"]);
    assert_eq!(pages.len(), 3, "{pages:#?}");
    assert_eq!(pages[0], "GET /api/v1/services?&limit=500");
    assert!(
        pages[1..].iter().all(|p| p.contains("&continue=")),
        "{pages:#?}"
    );
    let watch = format!(
        "GET /api/v1/services?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion={list_rv}"
    );
    eventually("the watch from the list's resourceVersion", || {
        api.requests().contains(&watch)
    })
    .await;

    // Writes to other kinds move the global resourceVersion but reach no Service watcher.
    api.apply(Kind::Node, node("n1"));
    let added = api.apply(Kind::Service, service("new", json!({})));
    let s = w.applied().await;
    assert_eq!(s.name_any(), "new");
    assert_eq!(s.resource_version(), Some(rv_of(&added)));

    api.apply(Kind::Service, service("svc-0001", json!({"app": "x"})));
    let s = w.applied().await;
    assert_eq!(s.name_any(), "svc-0001");
    assert_eq!(s.labels().get("app").map(String::as_str), Some("x"));

    let gone = api
        .delete(Kind::Service, "default", "svc-0002")
        .expect("svc-0002 exists");
    let s = w.deleted().await;
    assert_eq!(s.name_any(), "svc-0002");
    assert_eq!(
        s.resource_version(),
        Some(rv_of(&gone)),
        "DELETED carries the deletion's resourceVersion"
    );
    assert_eq!(lists(&api), 3, "no re-list");
    assert_eq!(
        api.initial_lists(),
        [(Kind::Service, ListProtocol::Paginated)],
        "one list, its continuations not counted"
    );
}

#[tokio::test]
async fn paginated_list_is_one_snapshot_and_its_continue_token_expires_with_compaction() {
    let api = ApiServer::start_local();
    for name in ["a", "b", "c", "d"] {
        api.apply(Kind::Service, service(name, json!({})));
    }
    let client = client(&api).await;
    let services = Api::<Service>::all(client.clone());
    let names = |l: &kube::api::ObjectList<Service>| {
        l.items
            .iter()
            .map(ResourceExt::name_any)
            .collect::<Vec<_>>()
    };

    let page1 = services
        .list(&ListParams::default().limit(2))
        .await
        .expect("page 1");
    assert_eq!(names(&page1), ["a", "b"]);
    let token = page1.metadata.continue_.clone().expect("a continue token");

    // Writes between pages don't show in the rest of the list.
    api.delete(Kind::Service, "default", "c");
    api.apply(Kind::Service, service("e", json!({})));
    let page2 = services
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .expect("page 2");
    assert_eq!(names(&page2), ["c", "d"]);
    assert_eq!(
        page2.metadata.resource_version, page1.metadata.resource_version,
        "every page reports the snapshot's resourceVersion"
    );
    assert!(page2.metadata.continue_.unwrap_or_default().is_empty());

    let fresh = services.list(&ListParams::default()).await.expect("list");
    assert_eq!(names(&fresh), ["a", "b", "d", "e"]);

    // Items come without kind/apiVersion, the list with them, as from a real apiserver.
    let raw = client
        .request_text(
            http::Request::get("/api/v1/services?limit=1")
                .body(Vec::new())
                .expect("request"),
        )
        .await
        .expect("raw list");
    let raw: Value = serde_json::from_str(&raw).expect("JSON");
    assert_eq!(raw["kind"], "ServiceList");
    assert_eq!(raw["apiVersion"], "v1");
    assert_eq!(raw["metadata"]["remainingItemCount"], 3);
    assert!(raw["items"][0].get("kind").is_none());
    assert!(raw["items"][0].get("apiVersion").is_none());

    api.compact();
    let err = services
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .expect_err("the token outlived compaction");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 410 && s.reason == "Expired"),
        "{err:?}"
    );
}

#[tokio::test]
async fn watch_from_a_compacted_version_gets_a_410_error_event_in_a_200_stream() {
    let api = ApiServer::start_local();
    let old = rv_of(&api.apply(Kind::Service, service("a", json!({}))));
    api.apply(Kind::Service, service("b", json!({})));
    api.compact();
    let services = Api::<Service>::all(client(&api).await);
    let stream = services
        .watch(&WatchParams::default(), &old)
        .await
        .expect("the watch request itself succeeds (HTTP 200)");
    let mut stream = std::pin::pin!(stream);
    let first = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("an event");
    match first {
        Some(Ok(WatchEvent::Error(s))) => {
            assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    let end = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("the stream ends");
    assert!(end.is_none(), "the stream closes after the error");
}

#[tokio::test]
async fn expired_watch_relists_and_drops_objects_deleted_meanwhile() {
    let api = ApiServer::start_local();
    for name in ["a", "b", "c"] {
        api.apply(Kind::Service, service(name, json!({})));
    }
    let services = Api::<Service>::all(client(&api).await);
    let mut w = Watch::spawn(watcher(services, watcher::Config::default()));
    assert_eq!(w.init().await, ["a", "b", "c"]);
    eventually("an open watch", || api.open_watches() == 1).await;

    api.expire_watches();
    api.delete(Kind::Service, "default", "b");
    match w.next().await {
        Err(watcher::Error::WatchError(s)) if s.code == 410 => {}
        other => panic!("expected a 410 watch error, got {other:?}"),
    }
    assert_eq!(w.init().await, ["a", "c"], "the re-list no longer has b");
    assert_eq!(lists(&api), 2, "a second LIST");

    api.apply(Kind::Service, service("d", json!({})));
    assert_eq!(w.applied().await.name_any(), "d");
}

#[tokio::test]
async fn dropped_watch_resumes_from_the_last_resource_version_without_relist() {
    let api = ApiServer::start_local();
    api.apply(Kind::Service, service("a", json!({})));
    let services = Api::<Service>::all(client(&api).await);
    let mut w = Watch::spawn(watcher(services, watcher::Config::default()));
    assert_eq!(w.init().await, ["a"]);
    eventually("an open watch", || api.open_watches() == 1).await;
    let last = rv_of(&api.apply(Kind::Service, service("b", json!({}))));
    assert_eq!(w.applied().await.name_any(), "b");

    api.drop_watches();
    api.apply(Kind::Service, service("c", json!({})));
    // An unexpected EOF ends the stream quietly: no error, no Init, just the missed event.
    assert_eq!(w.applied().await.name_any(), "c");
    let resumed = requests_with(&api, &["watch=true", &format!("resourceVersion={last}")]);
    assert_eq!(resumed.len(), 1, "{:#?}", api.requests());
    assert_eq!(lists(&api), 1, "no re-list");
}

#[tokio::test]
async fn reset_watch_connection_resumes_without_relist() {
    let api = ApiServer::start_local();
    api.apply(Kind::Service, service("a", json!({})));
    let services = Api::<Service>::all(client(&api).await);
    let mut w = Watch::spawn(watcher(services, watcher::Config::default()));
    assert_eq!(w.init().await, ["a"]);
    eventually("an open watch", || api.open_watches() == 1).await;

    api.reset_watches();
    api.apply(Kind::Service, service("b", json!({})));
    // A reset surfaces as a watch error, then the watcher resumes.
    match w.next_after_errors().await {
        (Event::Apply(s), errors) => {
            assert_eq!(s.name_any(), "b");
            assert_eq!(errors, 1, "one WatchFailed for the reset stream");
        }
        (other, _) => panic!("expected Apply, got {other:?}"),
    }
    assert_eq!(requests_with(&api, &["watch=true"]).len(), 2);
    assert_eq!(lists(&api), 1, "no re-list");
}

#[tokio::test]
async fn bookmarks_carry_the_watch_past_compaction_without_a_relist() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let options = Options {
        bookmark_interval: Duration::from_millis(50),
        ..Options::default()
    };
    let api = ApiServer::start_with(listener, options);
    api.apply(Kind::Service, service("a", json!({})));
    let services = Api::<Service>::all(client(&api).await);
    let mut w = Watch::spawn(watcher(services, watcher::Config::default()));
    assert_eq!(w.init().await, ["a"]);
    eventually("an open watch", || api.open_watches() == 1).await;

    // Only Nodes change: the Service watch sees no event, only bookmarks with the new version.
    for name in ["n1", "n2", "n3"] {
        api.apply(Kind::Node, node(name));
    }
    let latest = api.resource_version();
    // Bookmarks are invisible to the consumer; give the emulator a few intervals to send one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    api.compact();
    api.drop_watches();

    let resume = format!("resourceVersion={latest}");
    eventually("a watch resumed from the bookmark's version", || {
        !requests_with(&api, &["watch=true", &resume]).is_empty()
    })
    .await;
    api.apply(Kind::Service, service("b", json!({})));
    assert_eq!(w.applied().await.name_any(), "b", "no 410, no Init");
    assert_eq!(lists(&api), 1, "no re-list");
}

#[tokio::test]
async fn timed_out_watch_ends_cleanly_and_resumes() {
    let api = ApiServer::start_local();
    api.apply(Kind::Service, service("a", json!({})));
    let services = Api::<Service>::all(client(&api).await);
    let mut w = Watch::spawn(watcher(services, watcher::Config::default().timeout(1)));
    assert_eq!(w.init().await, ["a"]);
    eventually("a second watch after timeoutSeconds=1", || {
        requests_with(&api, &["watch=true&timeoutSeconds=1&"]).len() >= 2
    })
    .await;
    api.apply(Kind::Service, service("b", json!({})));
    assert_eq!(w.applied().await.name_any(), "b", "no error, no Init");
    assert_eq!(lists(&api), 1, "no re-list");
}

#[tokio::test]
async fn label_selector_hides_headless_services_and_deletes_those_that_gain_the_label() {
    let headless = json!({"service.kubernetes.io/headless": ""});
    let api = ApiServer::start_local();
    api.apply(Kind::Service, service("a", json!({})));
    api.apply(Kind::Service, service("h", headless.clone()));
    let services = Api::<Service>::all(client(&api).await);
    let config = watcher::Config::default().labels("!service.kubernetes.io/headless");
    let mut w = Watch::spawn(watcher(services, config));
    assert_eq!(w.init().await, ["a"]);
    assert!(
        !requests_with(&api, &["labelSelector=%21service.kubernetes.io%2Fheadless"]).is_empty()
    );
    eventually("an open watch", || api.open_watches() == 1).await;

    // a stops matching: the watcher gets DELETED, at the version of the update.
    let update = api.apply(Kind::Service, service("a", headless.clone()));
    let s = w.deleted().await;
    assert_eq!(s.name_any(), "a");
    assert_eq!(s.resource_version(), Some(rv_of(&update)));
    // h starts matching: ADDED.
    api.apply(Kind::Service, service("h", json!({})));
    assert_eq!(w.applied().await.name_any(), "h");
    // A headless newcomer is never seen.
    api.apply(Kind::Service, service("x", headless));
    api.apply(Kind::Service, service("y", json!({})));
    assert_eq!(w.applied().await.name_any(), "y");
}

#[tokio::test]
async fn paused_server_fails_the_watcher_until_resumed() {
    let api = ApiServer::start_local();
    api.apply(Kind::Service, service("a", json!({})));
    let services = Api::<Service>::all(client(&api).await);
    let stream = watcher(services, watcher::Config::default()).default_backoff();
    let mut w = Watch::spawn(stream);
    assert_eq!(w.init().await, ["a"]);
    eventually("an open watch", || api.open_watches() == 1).await;

    api.pause();
    assert!(w.next().await.is_err(), "an unreachable server is an error");
    api.apply(Kind::Service, service("b", json!({})));
    api.resume();
    match w.next_after_errors().await {
        (Event::Apply(s), _) => assert_eq!(s.name_any(), "b"),
        (other, _) => panic!("expected Apply after resume, got {other:?}"),
    }
    assert_eq!(lists(&api), 1, "resumed from its version, no re-list");
}

#[tokio::test]
async fn streaming_list_sends_initial_events_then_changes() {
    let api = ApiServer::start_local();
    for name in ["a", "b", "c"] {
        api.apply(Kind::Service, service(name, json!({})));
    }
    let services = Api::<Service>::all(client(&api).await);
    let config = watcher::Config::default().streaming_lists();
    let mut w = Watch::spawn(watcher(services, config));
    assert_eq!(w.init().await, ["a", "b", "c"]);
    let initial = "sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=0";
    assert_eq!(requests_with(&api, &[initial]).len(), 1);
    assert_eq!(lists(&api), 0, "only the streaming watch, no LIST");
    assert_eq!(
        api.initial_lists(),
        [(Kind::Service, ListProtocol::Streaming)]
    );

    api.apply(Kind::Service, service("d", json!({})));
    assert_eq!(w.applied().await.name_any(), "d");

    eventually("an open watch", || api.open_watches() == 1).await;
    api.drop_watches();
    api.apply(Kind::Service, service("e", json!({})));
    assert_eq!(w.applied().await.name_any(), "e");
    let watches = requests_with(&api, &["watch=true"]);
    assert_eq!(watches.len(), 2);
    assert!(!watches[1].contains("sendInitialEvents"), "{watches:#?}");
}

/// The emulator encodes each object once when it is written and sends that encoding in every
/// list (as the API server's watch cache shares one): a list or a streaming list sends the
/// object as last written, without the deleted ones, and a list at an older revision sends
/// the objects as they were then.
#[tokio::test]
async fn lists_send_each_object_as_last_written_and_past_lists_as_it_was() {
    let api = ApiServer::start_local();
    api.apply(Kind::Service, service("a", json!({"v": "1"})));
    api.apply(Kind::Service, service("b", json!({})));
    let before = api.resource_version();
    api.apply(Kind::Service, service("a", json!({"v": "2"})));
    api.delete(Kind::Service, "default", "b");

    let (code, list) = raw_get(&api, "/api/v1/services");
    assert_eq!(code, 200, "{list}");
    let mut a = api.get(Kind::Service, "default", "a").expect("a is stored");
    if let Some(a) = a.as_object_mut() {
        a.remove("kind");
        a.remove("apiVersion");
    }
    assert_eq!(
        list["items"],
        json!([a]),
        "the list item is a as last written"
    );
    assert_eq!(a["metadata"]["labels"]["v"], "2");

    let (code, past) = raw_get(
        &api,
        &format!("/api/v1/services?resourceVersion={before}&resourceVersionMatch=Exact"),
    );
    assert_eq!(code, 200, "{past}");
    let labels: Vec<(&Value, &Value)> = past["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| (&i["metadata"]["name"], &i["metadata"]["labels"]))
        .collect();
    assert_eq!(
        labels,
        [(&json!("a"), &json!({"v": "1"})), (&json!("b"), &json!({}))]
    );

    let services = Api::<Service>::all(client(&api).await);
    let config = watcher::Config::default().streaming_lists();
    let mut w = Watch::spawn(watcher(services, config));
    assert!(matches!(w.next_ok().await, Event::Init));
    match w.next_ok().await {
        Event::InitApply(s) => {
            assert_eq!(s.name_any(), "a");
            assert_eq!(s.labels().get("v").map(String::as_str), Some("2"));
            assert_eq!(s.resource_version(), Some(rv_of(&a)));
        }
        other => panic!("expected a's InitApply, got {other:?}"),
    }
    assert!(matches!(w.next_ok().await, Event::InitDone));
}

/// A server started with streaming lists `mode`, holding Services a, b and c.
fn server_with_three(mode: StreamingLists) -> ApiServer {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let api = ApiServer::start_with(
        listener,
        Options {
            streaming_lists: mode,
            ..Options::default()
        },
    );
    for name in ["a", "b", "c"] {
        api.apply(Kind::Service, service(name, json!({})));
    }
    api
}

#[tokio::test]
async fn a_server_without_the_watch_list_gate_rejects_streaming_lists_with_422_until_upgraded() {
    let api = server_with_three(StreamingLists::Rejected);
    let services = Api::<Service>::all(client(&api).await);
    let config = watcher::Config::default().streaming_lists();
    let mut w = Watch::spawn(watcher(services, config).default_backoff());
    match w.next().await {
        Err(watcher::Error::WatchStartFailed(kube::Error::Api(s))) => {
            assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
            assert_eq!(
                s.message,
                "ListOptions.meta.k8s.io \"\" is invalid: sendInitialEvents: Forbidden: \
                 sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled"
            );
        }
        other => panic!("expected a refused watch, got {other:?}"),
    }
    assert_eq!(api.initial_lists(), []);
    // The paginated list still works there.
    let services = Api::<Service>::all(client(&api).await);
    let mut paged = Watch::spawn(watcher(services, watcher::Config::default()));
    assert_eq!(paged.init().await, ["a", "b", "c"]);
    assert_eq!(
        api.initial_lists(),
        [(Kind::Service, ListProtocol::Paginated)]
    );

    api.set_streaming_lists(StreamingLists::Offered);
    let (first, _) = w.next_after_errors().await;
    assert!(matches!(first, Event::Init), "{first:?}");
    assert_eq!(w.init_rest().await, ["a", "b", "c"]);
    assert_eq!(
        api.initial_lists().last(),
        Some(&(Kind::Service, ListProtocol::Streaming))
    );
}

#[tokio::test]
async fn a_server_that_ignores_streaming_lists_sends_the_objects_but_never_the_end_bookmark() {
    let api = server_with_three(StreamingLists::Ignored);
    let services = Api::<Service>::all(client(&api).await);
    let config = watcher::Config::default().streaming_lists();
    let mut w = Watch::spawn(watcher(services, config));
    assert!(matches!(w.next_ok().await, Event::Init));
    for name in ["a", "b", "c"] {
        match w.next_ok().await {
            Event::InitApply(s) => assert_eq!(s.name_any(), name),
            other => panic!("expected InitApply, got {other:?}"),
        }
    }
    // Live changes arrive as more initial objects; the list never ends.
    api.apply(Kind::Service, service("d", json!({})));
    match w.next_ok().await {
        Event::InitApply(s) => assert_eq!(s.name_any(), "d"),
        other => panic!("expected InitApply, got {other:?}"),
    }
    let more = tokio::time::timeout(Duration::from_secs(2), w.rx.recv()).await;
    assert!(more.is_err(), "no InitDone: {more:?}");
    assert_eq!(
        api.initial_lists(),
        [],
        "a watch from 0, not a streaming list"
    );
}

#[tokio::test]
async fn a_streaming_list_broken_mid_way_starts_again_and_ends_with_every_object() {
    for how in [Break::Drop, Break::Expire] {
        let api = server_with_three(StreamingLists::Offered);
        api.break_next_streaming_list(Kind::Service, 1, how);
        let services = Api::<Service>::all(client(&api).await);
        let config = watcher::Config::default().streaming_lists();
        let mut w = Watch::spawn(watcher(services, config));
        assert!(matches!(w.next_ok().await, Event::Init));
        match w.next_ok().await {
            Event::InitApply(s) => assert_eq!(s.name_any(), "a"),
            other => panic!("expected InitApply, got {other:?}"),
        }
        if how == Break::Expire {
            match w.next().await {
                Err(watcher::Error::WatchError(s)) => assert_eq!(s.code, 410),
                other => panic!("expected the 410 ERROR event, got {other:?}"),
            }
        }
        // A dropped stream ends without an error: kube-runtime starts the list again.
        assert_eq!(w.init().await, ["a", "b", "c"], "{how:?}");
        assert_eq!(
            api.initial_lists(),
            [(Kind::Service, ListProtocol::Streaming); 2],
            "{how:?}"
        );
    }
}

/// GET `path_and_query` over a fresh connection: the status code and the body as JSON.
fn raw_get(api: &ApiServer, path_and_query: &str) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(api.addr()).expect("connect");
    conn.set_read_timeout(Some(WAIT)).expect("read timeout");
    write!(
        conn,
        "GET {path_and_query} HTTP/1.1\r\nHost: emulator\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("the whole answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn list_options_are_validated_as_the_api_server_does() {
    let api = ApiServer::start_local();
    let invalid = |query: &str| {
        let (code, status) = raw_get(&api, &format!("/api/v1/services?{query}"));
        assert_eq!(code, 422, "{query}: {status}");
        assert_eq!(status["reason"], "Invalid", "{query}");
        assert_eq!(status["details"]["kind"], "ListOptions", "{query}");
        let message = status["message"].as_str().expect("a message").to_string();
        message
            .strip_prefix("ListOptions.meta.k8s.io \"\" is invalid: ")
            .unwrap_or_else(|| panic!("{query}: {message}"))
            .to_string()
    };
    assert_eq!(
        invalid("watch=true&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersion=0"),
        "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan"
    );
    assert_eq!(
        invalid("watch=true&resourceVersionMatch=NotOlderThan&resourceVersion=0"),
        "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided"
    );
    assert_eq!(
        invalid("watch=true&sendInitialEvents=false&resourceVersionMatch=Exact"),
        "[resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan, \
         resourceVersionMatch: Unsupported value: \"Exact\": supported values: \"NotOlderThan\"]"
    );
    assert_eq!(
        invalid("sendInitialEvents=true"),
        "sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list"
    );
    assert_eq!(
        invalid("resourceVersionMatch=NotOlderThan"),
        "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided"
    );
    let (code, _) = raw_get(
        &api,
        "/api/v1/services?resourceVersion=0&resourceVersionMatch=NotOlderThan&limit=1",
    );
    assert_eq!(code, 200);
    assert_eq!(
        api.initial_lists(),
        [(Kind::Service, ListProtocol::Paginated)]
    );
}

#[test]
fn send_initial_events_without_bookmarks_sends_the_objects_but_no_end_bookmark() {
    // The API server's `isListWatchRequest` needs both; with one, it is a plain watch that
    // starts with the current state.
    let api = ApiServer::start_local();
    api.apply(Kind::Service, service("a", json!({})));
    let (mut conn, head, body) = raw_watch(
        &api,
        "watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=0",
    );
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let body = read_until(&mut conn, body, "}\n\r\n");
    api.apply(Kind::Service, service("b", json!({})));
    let body = read_until(&mut conn, body, r#""name":"b""#);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains(r#""name":"a""#), "{text}");
    assert!(!text.contains("initial-events-end"), "{text}");
    assert_eq!(api.initial_lists(), []);
}

#[tokio::test]
async fn injected_failures_surface_as_api_errors_then_the_watcher_recovers() {
    let api = ApiServer::start_local();
    api.apply(Kind::Service, service("a", json!({})));
    api.fail_next(1, 500);
    let services = Api::<Service>::all(client(&api).await);
    let mut w = Watch::spawn(watcher(services, watcher::Config::default()));
    assert!(matches!(w.next_ok().await, Event::Init));
    match w.next().await {
        Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) => assert_eq!(s.code, 500),
        other => panic!("expected a failed list, got {other:?}"),
    }
    assert_eq!(w.init().await, ["a"]);
}

#[tokio::test]
async fn kubeconfig_file_points_the_real_client_at_the_emulator() {
    let api = ApiServer::start_local();
    api.apply(Kind::Node, node("n1"));
    api.apply(
        Kind::EndpointSlice,
        json!({
            "metadata": {"namespace": "web", "name": "web-abcde",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.10"], "conditions": {"ready": true}}],
            "ports": [{"port": 8080, "protocol": "TCP"}],
        }),
    );
    let path = std::env::temp_dir().join(format!(
        "lb-e2e-kubeconfig-{}-{}",
        std::process::id(),
        api.addr().port()
    ));
    api.write_kubeconfig(&path).expect("write the kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("read the kubeconfig");
    std::fs::remove_file(&path).expect("remove the kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    assert_eq!(config.cluster_url.to_string(), format!("{}/", api.url()));
    let client = Client::try_from(config).expect("client");

    let n1 = Api::<Node>::all(client.clone())
        .get("n1")
        .await
        .expect("get n1");
    assert!(n1.metadata.uid.is_some() && n1.metadata.creation_timestamp.is_some());
    let web = Api::<EndpointSlice>::namespaced(client.clone(), "web")
        .list(&ListParams::default())
        .await
        .expect("list web");
    assert_eq!(web.items.len(), 1);
    let endpoints = web.items[0].endpoints.as_deref().unwrap_or_default();
    assert_eq!(endpoints[0].addresses, ["10.244.1.10"]);
    let other = Api::<EndpointSlice>::namespaced(client.clone(), "other")
        .list(&ListParams::default())
        .await
        .expect("list other");
    assert!(other.items.is_empty());
    let missing = Api::<Service>::default_namespaced(client)
        .get("missing")
        .await
        .expect_err("no such Service");
    assert!(
        matches!(&missing, kube::Error::Api(s) if s.code == 404),
        "{missing:?}"
    );
}

/// A raw HTTP/1.1 watch request; returns the connection and what followed the response head.
fn raw_watch(api: &ApiServer, query: &str) -> (std::net::TcpStream, String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(api.addr()).expect("connect");
    conn.set_read_timeout(Some(WAIT)).expect("read timeout");
    write!(
        conn,
        "GET /api/v1/services?{query} HTTP/1.1\r\nHost: emulator\r\nAccept: application/json\r\n\r\n"
    )
    .expect("send the request");
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = conn
            .read(&mut buf)
            .expect("the response head arrives without any event");
        assert!(n > 0, "closed before the response head");
        received.extend_from_slice(&buf[..n]);
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
            return (conn, head, received[end + 4..].to_vec());
        }
    }
}

/// Reads until `pattern` has been received (or the peer closes); returns the result of the
/// last read and everything received.
fn read_until(conn: &mut std::net::TcpStream, mut got: Vec<u8>, pattern: &str) -> Vec<u8> {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(pattern) {
        let n = conn.read(&mut buf).expect("read the watch body");
        assert!(
            n > 0,
            "closed before {pattern:?}: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    got
}

#[test]
fn watch_is_chunked_json_lines_and_drop_cuts_the_body_mid_stream() {
    use std::io::Read;
    let api = ApiServer::start_local();
    let rv = api.resource_version();
    let (mut conn, head, body) = raw_watch(&api, &format!("watch=true&resourceVersion={rv}"));
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");

    api.apply(Kind::Service, service("a", json!({})));
    let body = read_until(&mut conn, body, "}\n\r\n");
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains(r#""type":"ADDED""#), "{text}");

    api.drop_watches();
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).expect("a FIN, not a reset");
    assert!(
        !rest.ends_with(b"0\r\n\r\n"),
        "no terminating chunk: {}",
        String::from_utf8_lossy(&rest)
    );
}

#[test]
fn expire_ends_the_watch_cleanly_and_reset_sends_rst() {
    use std::io::Read;
    let api = ApiServer::start_local();
    let rv = api.resource_version();
    let query = format!("watch=true&resourceVersion={rv}");

    let (mut conn, _, body) = raw_watch(&api, &query);
    api.expire_watches();
    let body = read_until(&mut conn, body, "0\r\n\r\n");
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains(r#""type":"ERROR""#) && text.contains(r#""code":410"#),
        "{text}"
    );
    assert!(
        text.ends_with("}\n\r\n0\r\n\r\n"),
        "the chunked body ends cleanly: {text}"
    );

    let (mut conn, _, _) = raw_watch(&api, &query);
    api.reset_watches();
    let mut rest = Vec::new();
    let err = conn.read_to_end(&mut rest).expect_err("a reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}
