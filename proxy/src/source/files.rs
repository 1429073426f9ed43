//! The files source: manifest files and directories ([`crate::manifests::Sources`], each file
//! keeping its last good state), converted at the edge and sent to the reconciler as store
//! events.
//!
//! Every time the files change, everything they hold is sent as one re-list per kind
//! ([`Store::into_relist`]): the store replaces each kind at `InitDone` and marks exactly the
//! Services that differ, so a sync costs what changed, as with the API server's watches.
//!
//! Problems are reported on stderr (ignored objects once each) and counted in the metrics.
//! Read errors never empty the dataplane: while they leave no Service at all, the first
//! re-list is held back ([`FileSource::follow`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use anyhow::bail;
use ipnet::IpNet;

use crate::convert::Filter;
use crate::manifests::{ManifestError, Sources};
use crate::metrics::{IgnoredLabel, KindLabel, Metrics};
use crate::reconcile::{Event, Input};
use crate::store::{Store, StoreEvent};

/// Which manifests to read, for which node.
#[derive(Debug, Clone)]
pub struct Files {
    /// Files and directories.
    pub paths: Vec<PathBuf>,
    /// This node's name (`None`: the only Node in the manifests).
    pub node: Option<String>,
    /// Which objects are ours.
    pub filter: Filter,
}

/// What one look at the files found.
#[derive(Debug)]
pub struct Loaded {
    /// The objects as store events (one re-list per kind), when they changed (or on the first
    /// load).
    pub events: Option<Vec<StoreEvent>>,
    /// The CIDRs of the ServiceCIDR objects, when the objects were (re)loaded.
    pub service_cidrs: Option<Vec<IpNet>>,
    /// Inputs skipped: files not read, objects invalid (each kept its last good state).
    pub problems: usize,
    /// Some file or path could not be read or parsed.
    pub read_errors: bool,
    /// Services loaded, as of the last load that changed anything.
    pub services: usize,
}

impl Loaded {
    /// The input for the reconciler, if anything was loaded: one batch, the ServiceCIDRs
    /// first, then the store events, so no sync sees part of a load.
    pub fn input(&mut self, arrived: Instant) -> Option<Input> {
        let cidrs = self.service_cidrs.take().map(Event::ServiceCidrs);
        let events: Vec<Event> = cidrs
            .into_iter()
            .chain(self.events.take().into_iter().flatten().map(Event::from))
            .collect();
        (!events.is_empty()).then_some(Input::Batch { arrived, events })
    }

    /// A store holding what was loaded (for `render` and `explain`), and the ServiceCIDRs.
    pub fn into_store(mut self) -> (Store, Vec<IpNet>) {
        let mut store = Store::new();
        for e in self.events.take().into_iter().flatten() {
            store.apply(e);
        }
        (store, self.service_cidrs.unwrap_or_default())
    }
}

/// The manifests, followed.
#[derive(Debug)]
pub struct FileSource {
    files: Files,
    sources: Sources,
    metrics: Arc<Metrics>,
    /// Whether a load found this node yet (later loads without it keep it).
    node_known: bool,
    loaded_once: bool,
    services: usize,
}

impl FileSource {
    /// Checks that every path exists (a mistyped path is an error, not an empty cluster);
    /// nothing is read yet.
    pub fn open(files: Files, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let sources = Sources::new(&files.paths);
        sources.check_paths().map_err(anyhow::Error::msg)?;
        Ok(Self {
            files,
            sources,
            metrics,
            node_known: false,
            loaded_once: false,
            services: 0,
        })
    }

    /// Reads the manifests once: an error for a missing path, for any skipped input unless
    /// `keep_going`, and always for read errors that leave no Service (`render`, `explain`).
    pub fn read_once(files: Files, keep_going: bool) -> anyhow::Result<(Store, Vec<IpNet>)> {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let loaded = FileSource::open(files, metrics)?.load(None)?;
        if loaded.problems > 0 && !keep_going {
            bail!(
                "{} inputs skipped (see above), so nothing was done: fix them, or pass --keep-going to use the rest",
                loaded.problems
            );
        }
        if loaded.read_errors && loaded.services == 0 {
            bail!("manifests could not be read and no Service was: refusing to use an empty set");
        }
        Ok(loaded.into_store())
    }

    /// Looks at the manifests (see [`Sources::refresh`] for `settle`) and, if they changed (or
    /// on the first call), converts them into events. An error when no node is known.
    pub fn load(&mut self, settle: Option<Duration>) -> anyhow::Result<Loaded> {
        let first = !self.loaded_once;
        let r = self.sources.refresh(&self.files.filter, settle);
        let mut read_errors = 0;
        for e in &r.errors {
            eprintln!("lb-proxy: skipped: {e}");
            let kind = match e {
                ManifestError::File { .. } => {
                    read_errors += 1;
                    continue;
                }
                ManifestError::Object { kind, .. } => kind.as_str(),
                ManifestError::Invalid { source, .. } => source.kind,
            };
            let kind = match kind {
                "Service" => "Service",
                "EndpointSlice" => "EndpointSlice",
                "ServiceCIDR" => "ServiceCIDR",
                _ => "Node",
            };
            self.metrics
                .invalid_objects
                .get_or_create(&KindLabel { kind })
                .inc();
        }
        for (file, n) in &r.removed {
            eprintln!("lb-proxy: {file} was removed: deleting the {n} objects read from it");
        }
        self.metrics.manifest_read_errors.inc_by(read_errors);
        self.metrics
            .manifest_sources_failing
            .set(i64::try_from(self.sources.failing()).unwrap_or(i64::MAX));
        let mut loaded = Loaded {
            events: None,
            service_cidrs: None,
            problems: r.errors.len(),
            read_errors: read_errors > 0,
            services: self.services,
        };
        if !r.changed && !first {
            return Ok(loaded);
        }
        // What parsing used (the documents, the objects as read) is freed: return it before
        // the store is filled, or the peak holds both (issue 13).
        crate::memory::release_freed();
        let (objects, mut ignored) = self.sources.objects();
        // Invalid ServiceCIDRs were reported when their file was read, as other objects.
        let service_cidrs = objects.service_cidrs();
        let mut store = Store::new();
        let converted = objects.replace_in(&mut store, self.files.node.as_deref());
        // Invalid objects were reported when their file was read (and kept their last good
        // version), so `converted.invalid` is empty.
        for mut i in converted.ignored {
            i.file = self.sources.file_of(&i.kind, &i.name).unwrap_or_default();
            ignored.push(i);
        }
        for i in self.sources.newly_ignored(ignored) {
            eprintln!("lb-proxy: {i}");
            self.metrics
                .ignored_objects
                .get_or_create(&IgnoredLabel { kind: i.kind })
                .inc();
        }
        // A load without this node's Node (and no --node) keeps the node an earlier one found.
        self.node_known |= store.node().is_some();
        if !self.node_known {
            bail!("no node: pass --node NAME (or NODE_NAME), or give exactly one Node object");
        }
        self.loaded_once = true;
        self.services = store.service_count();
        loaded.services = self.services;
        loaded.service_cidrs = Some(service_cidrs);
        loaded.events = Some(store.into_relist());
        Ok(loaded)
    }

    /// Follows the manifests on a thread of its own: every `poll`, reads what changed (once
    /// it has stayed unchanged for `settle`) and sends it to `input`, until the reconciler is
    /// gone. `held` is the first load's input when it was not sent because read errors
    /// left no Service: they (or newer ones) go out once the files are readable or hold a
    /// Service.
    pub fn follow(
        mut self,
        input: Sender<Input>,
        poll: Duration,
        settle: Duration,
        mut held: Option<Input>,
    ) -> anyhow::Result<std::thread::JoinHandle<()>> {
        let thread = std::thread::Builder::new()
            .name("manifests".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(poll);
                    let mut loaded = match self.load(Some(settle)) {
                        Ok(loaded) => loaded,
                        Err(e) => {
                            eprintln!("lb-proxy: keeping the current ruleset: {e:#}");
                            continue;
                        }
                    };
                    let mut out = loaded.input(Instant::now());
                    if held.is_some() {
                        // A newer load replaces the held one (each is a whole re-list).
                        if out.is_some() {
                            held = out.take();
                        }
                        if loaded.services > 0 || self.sources.failing() == 0 {
                            out = held.take();
                        }
                    }
                    if let Some(i) = out
                        && input.send(i).is_err()
                    {
                        return;
                    }
                }
            })?;
        Ok(thread)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::ServiceKey;

    const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n";

    fn service(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: t\nspec:\n  clusterIP: {ip}\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n"
        )
    }

    fn slice(service: &str, ip: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: t\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:\n- addresses: [\"{ip}\"]\n"
        )
    }

    /// A scratch directory removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let p = std::env::temp_dir().join(format!("lb-files-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("scratch directory");
            Dir(p)
        }
        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.0.join(name), text).expect("write");
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn apply(store: &mut Store, loaded: Loaded) -> Vec<String> {
        for e in loaded.events.into_iter().flatten() {
            store.apply(e);
        }
        let (changed, _) = store.take_changes();
        changed.into_iter().map(|k| k.name).collect()
    }

    fn addrs(store: &Store, name: &str) -> Vec<String> {
        let key = ServiceKey {
            namespace: "t".into(),
            name: name.into(),
        };
        store
            .entries(&key)
            .iter()
            .flat_map(|e| e.endpoints.iter().map(|ep| ep.addr().to_string()))
            .collect()
    }

    #[test]
    fn a_changed_file_is_sent_as_a_relist_that_marks_only_what_changed() {
        let dir = Dir::new("relist");
        dir.write("node.yaml", NODE);
        dir.write(
            "web.yaml",
            &(service("web", "10.96.0.10") + "---\n" + &slice("web", "10.244.1.10")),
        );
        dir.write(
            "api.yaml",
            &(service("api", "10.96.0.11") + "---\n" + &slice("api", "10.244.1.11")),
        );
        let mut registry = prometheus_client::registry::Registry::default();
        let files = Files {
            paths: vec![dir.0.clone()],
            node: None,
            filter: Filter::default(),
        };
        let mut source =
            FileSource::open(files, Arc::new(Metrics::new(&mut registry))).expect("paths exist");
        let mut store = Store::new();
        assert_eq!(
            apply(&mut store, source.load(None).expect("a node")),
            ["api", "web"]
        );
        assert_eq!(store.node().map(lb_core::Node::name), Some("node-a"));
        // Nothing changed: no events.
        assert!(source.load(None).expect("loads").events.is_none());
        // web's endpoint moves; api is untouched.
        dir.write(
            "web.yaml",
            &(service("web", "10.96.0.10") + "---\n" + &slice("web", "10.244.1.12")),
        );
        assert_eq!(
            apply(&mut store, source.load(None).expect("loads")),
            ["web"]
        );
        assert_eq!(addrs(&store, "web"), ["10.244.1.12:8080"]);
        // web's slice is gone from its file: so are its endpoints, while the Service stays.
        dir.write("web.yaml", &service("web", "10.96.0.10"));
        assert_eq!(
            apply(&mut store, source.load(None).expect("loads")),
            ["web"]
        );
        assert_eq!(addrs(&store, "web"), Vec::<String>::new());
        assert_eq!(store.service_count(), 2);
        assert_eq!(addrs(&store, "api"), ["10.244.1.11:8080"]);
    }

    #[test]
    fn manifests_without_a_node_are_an_error_until_one_is_named() {
        let dir = Dir::new("nonode");
        dir.write("web.yaml", &service("web", "10.96.0.10"));
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let mut files = Files {
            paths: vec![dir.0.clone()],
            node: None,
            filter: Filter::default(),
        };
        let mut source = FileSource::open(files.clone(), metrics.clone()).expect("paths exist");
        let e = source.load(None).expect_err("no node");
        assert!(e.to_string().contains("no node"), "{e}");
        files.node = Some("node-a".into());
        let mut source = FileSource::open(files, metrics).expect("paths exist");
        let mut store = Store::new();
        assert_eq!(
            apply(&mut store, source.load(None).expect("named")),
            ["web"]
        );
        assert_eq!(store.node().map(lb_core::Node::name), Some("node-a"));
    }

    #[test]
    fn a_load_reaches_the_reconciler_as_one_batch_service_cidrs_first() {
        let dir = Dir::new("batch");
        dir.write("node.yaml", NODE);
        dir.write(
            "web.yaml",
            &(service("web", "10.96.0.10") + "---\n" + &slice("web", "10.244.1.10")),
        );
        let mut registry = prometheus_client::registry::Registry::default();
        let files = Files {
            paths: vec![dir.0.clone()],
            node: None,
            filter: Filter::default(),
        };
        let mut source =
            FileSource::open(files, Arc::new(Metrics::new(&mut registry))).expect("paths exist");
        let mut loaded = source.load(None).expect("a node");
        let Some(Input::Batch { events, .. }) = loaded.input(Instant::now()) else {
            panic!("one batch");
        };
        assert!(matches!(events.first(), Some(Event::ServiceCidrs(_))));
        // Services, slices and the node: three complete re-lists (3 + 3 + 3 events).
        assert_eq!(events.len(), 1 + 9);
        assert!(loaded.input(Instant::now()).is_none(), "taken");
    }
}
