//! Streaming lists (KEP-3157, "watch-list"), with a fall-back to paginated lists.
//!
//! A watcher's first list can be a LIST in pages of 500 followed by a WATCH from the list's
//! resourceVersion, or one WATCH with `sendInitialEvents=true` that streams every object as
//! ADDED and marks the end of the initial state with a BOOKMARK annotated
//! `k8s.io/initial-events-end`. The second is served from the API server's watch cache one
//! object at a time, instead of a page buffer per request, which is what lets 5,000 nodes each
//! list 100k endpoints at start without a full list each.
//!
//! Servers that do not offer it either
//! * **reject** the request: 1.19–1.26 forbid `resourceVersionMatch` on a watch, and
//!   1.27–1.31 and 1.33 (whose `WatchList` feature gate is off by default; it is on in 1.32
//!   and from 1.34) forbid `sendInitialEvents` unless that gate is on — both
//!   `422 Invalid`; aggregated API servers and proxies may answer `400`; or
//! * **ignore** the parameters (a server older than them, or an intermediary that drops
//!   them): a watch from resourceVersion 0 then sends the objects as ADDED but never the end
//!   bookmark, and kube-runtime waits for it for good (dropping DELETEDs meanwhile).
//!
//! As client-go's reflector does (with its `WatchListClient` gate on), the daemon tries the
//! streaming list first and falls back to the paginated list. [`Detector`] decides from the
//! watcher's events alone (pure; the clock is an argument), [`watcher`] applies its verdict:
//! it drops the streaming watcher and starts a paginated one, whose `Init` restarts the
//! consumer's re-list buffer, so nothing of the abandoned attempt survives.
//!
//! Deliberate differences from client-go:
//! * An ignoring server is recognised after [`SILENCE`] without any event during the initial
//!   events (client-go waits for its watch to time out, 5–10 minutes), or when the initial
//!   watch ends at its timeout without the end bookmark (client-go's only rule).
//! * The fall-back is for the life of the process (client-go tries again at every re-list,
//!   paying the wait each time). A watch broken early (a dropped connection, `410 Gone`)
//!   during the initial events is no verdict: kube-runtime starts a new streaming list.
//!
//! `--feature-gates=WatchListClient=false` (or `featureGates: {WatchListClient: false}`)
//! uses paginated lists from the start, as it does for client-go.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::stream::BoxStream;
use kube::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};

use crate::metrics::{ListLabel, Metrics};

/// The watch timeout asked of the server, in seconds (kube-runtime's default, made explicit
/// because [`Detector`] compares against it).
const WATCH_TIMEOUT_SECS: u32 = 290;

/// The watch timeout asked of the server (290 s, kube-runtime's default).
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(WATCH_TIMEOUT_SECS as u64);

/// How long the initial events of a streaming list may pause before the server is taken as
/// one that ignores `sendInitialEvents`. A server that offers streaming lists sends them
/// back to back from its watch cache, and the end bookmark within about a second.
pub const SILENCE: Duration = Duration::from_secs(10);

/// What the daemon's watchers use for their first list, shared by all of them; completed
/// lists are counted in `lb_proxy_lists_total{kind,protocol}`.
#[derive(Debug)]
pub struct Lists {
    streaming: AtomicBool,
    reported: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Lists {
    /// `streaming`: try streaming lists first (the `WatchListClient` gate); false uses
    /// paginated lists only.
    pub fn new(streaming: bool, metrics: Arc<Metrics>) -> Arc<Lists> {
        Arc::new(Lists {
            streaming: AtomicBool::new(streaming),
            reported: AtomicBool::new(false),
            metrics,
        })
    }

    /// Whether watchers started now try a streaming list.
    pub fn streaming(&self) -> bool {
        self.streaming.load(Ordering::Relaxed)
    }

    /// Uses paginated lists from now on; logged once per process (then at debug level, for
    /// the other kinds).
    fn fall_back(&self, kind: &str, api_server: &str, why: &Unsupported) {
        self.streaming.store(false, Ordering::Relaxed);
        if self.reported.swap(true, Ordering::Relaxed) {
            tracing::debug!(kind, %why, "streaming list not offered; paginated list");
        } else {
            tracing::info!(
                kind,
                api_server,
                %why,
                "the API server does not offer streaming lists (sendInitialEvents); using paginated lists"
            );
        }
    }
}

/// A watcher event, as far as the [`Detector`] cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A (streaming) list starts: the watch request was accepted.
    Init,
    /// An object of the initial state, or any other sign of life of the stream.
    Activity,
    /// The end of the initial state: the server offers streaming lists.
    InitDone,
    /// The watch request was refused as invalid (`400`, `422`), with the server's message.
    Rejected { code: u16, message: String },
    /// The stream is gone and kube-runtime starts a new list: the request failed otherwise
    /// (unreachable, `5xx`, `403`), or a `410 Gone` ended it.
    Restart,
}

impl Seen {
    /// Classifies one item of a streaming-list watcher.
    pub fn of<K>(item: &Result<Event<K>, watcher::Error>) -> Seen {
        match item {
            Ok(Event::Init) => Seen::Init,
            Ok(Event::InitDone) => Seen::InitDone,
            Ok(Event::InitApply(_) | Event::Apply(_) | Event::Delete(_)) => Seen::Activity,
            Err(watcher::Error::WatchStartFailed(kube::Error::Api(s)))
                if s.code == 400 || s.code == 422 =>
            {
                Seen::Rejected {
                    code: s.code,
                    message: s.message.clone(),
                }
            }
            Err(watcher::Error::WatchStartFailed(_)) => Seen::Restart,
            Err(watcher::Error::WatchError(s)) if s.code == 410 => Seen::Restart,
            Err(_) => Seen::Activity,
        }
    }
}

/// Why the server is taken as one without streaming lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsupported {
    /// It refused the request.
    Rejected { code: u16, message: String },
    /// The initial events stopped for this long without the end bookmark.
    Silent(Duration),
    /// The initial watch ran to its timeout, this long, without the end bookmark.
    NoEndBookmark(Duration),
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unsupported::Rejected { code, message } => {
                write!(f, "the watch was refused with {code}: {message}")
            }
            Unsupported::Silent(d) => write!(
                f,
                "no initial-events-end bookmark and no event for {} s",
                d.as_secs()
            ),
            Unsupported::NoEndBookmark(d) => write!(
                f,
                "the initial watch ended after {} s without the initial-events-end bookmark",
                d.as_secs()
            ),
        }
    }
}

/// Decides, from the events of a streaming-list watcher, whether the server offers streaming
/// lists. Pure: the caller passes the time of each event, and asks [`Detector::deadline`]
/// when silence would decide.
#[derive(Debug, Default)]
pub struct Detector {
    /// While the initial events of a streaming list are under way: when they started, and
    /// the last sign of life.
    initial: Option<(Instant, Instant)>,
}

impl Detector {
    /// Takes in one event seen at `now`; `Some` when it shows the server lacks streaming
    /// lists.
    pub fn seen(&mut self, seen: &Seen, now: Instant) -> Option<Unsupported> {
        match seen {
            Seen::Init => {
                // kube-runtime starts a new streaming list, without an error, when the last
                // one ended before its end bookmark: at the server's timeout, that is a
                // server that ignores the request; earlier, a broken connection.
                if let Some((started, _)) = self.initial {
                    let lasted = now.saturating_duration_since(started);
                    if lasted >= WATCH_TIMEOUT * 9 / 10 {
                        self.initial = None;
                        return Some(Unsupported::NoEndBookmark(lasted));
                    }
                }
                self.initial = Some((now, now));
            }
            Seen::Activity => {
                if let Some((_, last)) = &mut self.initial {
                    *last = now;
                }
            }
            Seen::InitDone | Seen::Restart => self.initial = None,
            Seen::Rejected { code, message } => {
                self.initial = None;
                return Some(Unsupported::Rejected {
                    code: *code,
                    message: message.clone(),
                });
            }
        }
        None
    }

    /// When, without another event, [`Detector::silent`] decides.
    pub fn deadline(&self) -> Option<Instant> {
        self.initial.map(|(_, last)| last + SILENCE)
    }

    /// No event came until [`Detector::deadline`] (`now`): the server ignores the request.
    pub fn silent(&mut self, now: Instant) -> Option<Unsupported> {
        let (_, last) = self.initial?;
        let quiet = now.saturating_duration_since(last);
        (quiet >= SILENCE).then(|| {
            self.initial = None;
            Unsupported::Silent(quiet)
        })
    }
}

/// A kube-runtime watcher (with the default backoff) whose first list, and every re-list, is
/// a streaming list while `lists` says so, falling back to paginated lists for good when the
/// server shows it has none (see the module documentation). `kind` and `api_server` name the
/// log line.
pub fn watcher<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: &'static str,
    lists: &Arc<Lists>,
    api_server: &Arc<str>,
) -> BoxStream<'static, Result<Event<K>, watcher::Error>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + fmt::Debug + Send + Sync + 'static,
{
    let mut watch = Watch {
        api,
        config: config.timeout(WATCH_TIMEOUT_SECS),
        kind,
        lists: Arc::clone(lists),
        api_server: Arc::clone(api_server),
        inner: futures::stream::empty().boxed(),
        detector: None,
    };
    watch.start();
    futures::stream::unfold(watch, |mut w| async move {
        let item = w.next().await?;
        Some((item, w))
    })
    .boxed()
}

struct Watch<K: kube::Resource + Clone + 'static> {
    api: Api<K>,
    config: watcher::Config,
    kind: &'static str,
    lists: Arc<Lists>,
    api_server: Arc<str>,
    inner: BoxStream<'static, Result<Event<K>, watcher::Error>>,
    /// `Some` while this watcher uses streaming lists.
    detector: Option<Detector>,
}

impl<K> Watch<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + fmt::Debug + Send + Sync + 'static,
{
    fn start(&mut self) {
        let streaming = self.lists.streaming();
        let config = if streaming {
            self.config.clone().streaming_lists()
        } else {
            self.config.clone()
        };
        self.inner = watcher::watcher(self.api.clone(), config)
            .default_backoff()
            .boxed();
        self.detector = streaming.then(Detector::default);
    }

    async fn next(&mut self) -> Option<Result<Event<K>, watcher::Error>> {
        loop {
            let Some(detector) = &mut self.detector else {
                let item = self.inner.next().await?;
                if matches!(item, Ok(Event::InitDone)) {
                    self.listed("paginated");
                }
                return Some(item);
            };
            let item = match detector.deadline() {
                Some(at) => {
                    let at = tokio::time::Instant::from_std(at);
                    match tokio::time::timeout_at(at, self.inner.next()).await {
                        Ok(item) => item,
                        Err(_elapsed) => {
                            if let Some(why) = detector.silent(Instant::now()) {
                                self.fall_back(&why);
                            }
                            continue;
                        }
                    }
                }
                None => self.inner.next().await,
            };
            let item = item?;
            match detector.seen(&Seen::of(&item), Instant::now()) {
                None => {
                    if matches!(item, Ok(Event::InitDone)) {
                        self.listed("streaming");
                    }
                    return Some(item);
                }
                // The event that decided is not passed on: the paginated watcher's `Init`
                // restarts the consumer's list.
                Some(why) => self.fall_back(&why),
            }
        }
    }

    fn listed(&self, protocol: &'static str) {
        let label = ListLabel {
            kind: self.kind,
            protocol,
        };
        self.lists.metrics.lists.get_or_create(&label).inc();
    }

    fn fall_back(&mut self, why: &Unsupported) {
        self.lists.fall_back(self.kind, &self.api_server, why);
        self.start();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn a_streaming_list_ended_by_its_bookmark_is_no_verdict_and_stops_the_clock() {
        let t0 = Instant::now();
        let mut d = Detector::default();
        assert_eq!(d.seen(&Seen::Init, t0), None);
        assert_eq!(d.deadline(), Some(at(t0, 10)));
        assert_eq!(d.seen(&Seen::Activity, at(t0, 8)), None);
        assert_eq!(
            d.deadline(),
            Some(at(t0, 18)),
            "each event restarts the clock"
        );
        assert_eq!(d.seen(&Seen::InitDone, at(t0, 9)), None);
        assert_eq!(d.deadline(), None);
        assert_eq!(d.silent(at(t0, 100)), None, "a live watch may be quiet");
    }

    #[test]
    fn a_rejected_watch_is_a_verdict_with_the_servers_message() {
        let mut d = Detector::default();
        let rejected = Seen::Rejected {
            code: 422,
            message: "sendInitialEvents is forbidden".into(),
        };
        assert_eq!(
            d.seen(&rejected, Instant::now()),
            Some(Unsupported::Rejected {
                code: 422,
                message: "sendInitialEvents is forbidden".into()
            })
        );
    }

    #[test]
    fn initial_events_that_stop_without_the_bookmark_mean_the_server_ignores_the_request() {
        let t0 = Instant::now();
        let mut d = Detector::default();
        d.seen(&Seen::Init, t0);
        d.seen(&Seen::Activity, at(t0, 1));
        assert_eq!(d.silent(at(t0, 5)), None, "not yet");
        assert_eq!(
            d.silent(at(t0, 11)),
            Some(Unsupported::Silent(Duration::from_secs(10)))
        );
    }

    #[test]
    fn an_initial_watch_that_ends_at_its_timeout_without_the_bookmark_is_a_verdict() {
        let t0 = Instant::now();
        let mut d = Detector::default();
        d.seen(&Seen::Init, t0);
        // Live changes keep it from being silent …
        for s in (5..290).step_by(5) {
            d.seen(&Seen::Activity, at(t0, s));
        }
        // … until the server ends the watch and kube-runtime starts a new streaming list.
        assert_eq!(
            d.seen(&Seen::Init, at(t0, 290)),
            Some(Unsupported::NoEndBookmark(Duration::from_secs(290)))
        );
    }

    #[test]
    fn a_watch_broken_early_or_gone_during_the_initial_events_is_retried_not_judged() {
        let t0 = Instant::now();
        let mut d = Detector::default();
        d.seen(&Seen::Init, t0);
        d.seen(&Seen::Activity, at(t0, 1));
        // Connection dropped: kube-runtime starts again without an error.
        assert_eq!(d.seen(&Seen::Init, at(t0, 2)), None);
        // 410 Gone, then the server is unreachable for a while: no clock runs.
        assert_eq!(d.seen(&Seen::Restart, at(t0, 3)), None);
        assert_eq!(d.deadline(), None);
        assert_eq!(d.silent(at(t0, 60)), None);
        assert_eq!(d.seen(&Seen::Init, at(t0, 61)), None);
        assert_eq!(d.seen(&Seen::InitDone, at(t0, 62)), None);
    }

    #[test]
    fn watch_errors_are_classified_for_the_detector() {
        let status = |code: u16| {
            Box::new(kube::core::Status {
                code,
                message: format!("m{code}"),
                ..Default::default()
            })
        };
        let seen = |e: watcher::Error| Seen::of::<()>(&Err(e));
        assert_eq!(
            seen(watcher::Error::WatchStartFailed(kube::Error::Api(status(
                422
            )))),
            Seen::Rejected {
                code: 422,
                message: "m422".into()
            }
        );
        assert!(matches!(
            seen(watcher::Error::WatchStartFailed(kube::Error::Api(status(
                400
            )))),
            Seen::Rejected { code: 400, .. }
        ));
        assert_eq!(
            seen(watcher::Error::WatchStartFailed(kube::Error::Api(status(
                503
            )))),
            Seen::Restart
        );
        assert_eq!(seen(watcher::Error::WatchError(status(410))), Seen::Restart);
        assert_eq!(
            seen(watcher::Error::WatchError(status(500))),
            Seen::Activity
        );
        assert_eq!(Seen::of::<()>(&Ok(Event::InitDone)), Seen::InitDone);
    }
}
