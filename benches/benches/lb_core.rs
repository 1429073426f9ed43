//! Benches for lb-core's decisions: uniform pick, ClientIP affinity, Maglev, categorisation.
//!
//! Run with `cargo bench -p lb-benches` (add a filter such as `-- affinity` to run one group).
//! Under `cargo test` each bench runs once on small inputs, as a smoke test.
//!
//! Inputs come from a fixed-seed SplitMix64, so every run measures the same sequence.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lb_core::affinity::{AffinityPick, AffinityTable, FlatAffinityTable, NewConnection, Outcome};
use lb_core::maglev::{DEFAULT_TABLE_SIZE, Maglev};
use lb_core::pick;
use lb_core::{
    Conditions, Endpoint, Node, Protocol, ServicePort, ServiceType, TrafficPolicy, categorize,
};

/// Threads picking concurrently in the affinity benches.
const THREADS: u32 = 2;
/// Endpoints behind the benched Service.
const ENDPOINTS: usize = 10;
/// kube-proxy's default affinity timeout.
const TIMEOUT: Duration = Duration::from_secs(10_800);

/// A benched Service port, identified the way an embedder would: a compact id.
type ServiceId = u32;
const SERVICE: ServiceId = 7;

/// SplitMix64 (Steele et al.): tiny, fast, and good enough to drive benches.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Whether criterion is measuring (`cargo bench`) rather than smoke-testing (`cargo test`).
fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Distinct clients remembered by the affinity table: a million when measuring.
fn client_count() -> u32 {
    if measuring() { 1_000_000 } else { 1_000 }
}

/// Client `i` of the prefilled population: 10.0.0.0/8 holds 2^24 of them.
fn client(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i))
}

/// A client never seen before, distinct per thread and index.
fn new_client(thread: u32, i: u64) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(
        0x2001_0db8_u128 << 96 | u128::from(thread) << 64 | u128::from(i),
    ))
}

fn endpoints() -> Vec<SocketAddr> {
    (0..ENDPOINTS)
        .map(|i| SocketAddr::from(([10, 244, 0, i as u8], 8080)))
        .collect()
}

fn conn(
    client: IpAddr,
    now: Instant,
    timeout: Duration,
    random: u64,
) -> NewConnection<'static, ServiceId> {
    NewConnection {
        service: &SERVICE,
        client,
        now,
        timeout,
        random,
    }
}

/// The two affinity tables, benched by the same code: `dashmap`-based and flat
/// (open addressing, the entry in the slot).
trait BenchTable: Sync {
    /// The bench group's name.
    const GROUP: &'static str;
    fn empty() -> Self;
    fn pick(
        &self,
        conn: NewConnection<'_, ServiceId>,
        eps: &[SocketAddr],
    ) -> Option<AffinityPick<SocketAddr>>;
    /// Forgets the clients inserted by the miss bench (IPv6 ones).
    fn forget_new_clients(&self);
}

impl BenchTable for AffinityTable<ServiceId, SocketAddr> {
    const GROUP: &'static str = "affinity";
    fn empty() -> Self {
        AffinityTable::new()
    }
    fn pick(
        &self,
        conn: NewConnection<'_, ServiceId>,
        eps: &[SocketAddr],
    ) -> Option<AffinityPick<SocketAddr>> {
        AffinityTable::pick(self, conn, eps)
    }
    fn forget_new_clients(&self) {
        self.retain(|_, client, _| client.is_ipv4());
    }
}

impl BenchTable for FlatAffinityTable<ServiceId, SocketAddr> {
    const GROUP: &'static str = "affinity_flat";
    fn empty() -> Self {
        FlatAffinityTable::new()
    }
    fn pick(
        &self,
        conn: NewConnection<'_, ServiceId>,
        eps: &[SocketAddr],
    ) -> Option<AffinityPick<SocketAddr>> {
        FlatAffinityTable::pick(self, conn, eps)
    }
    fn forget_new_clients(&self) {
        self.retain(|_, client, _| client.is_ipv4());
    }
}

/// A table remembering clients `0..clients`, all picked at `t0` with `timeout`.
fn prefilled<T: BenchTable>(t0: Instant, timeout: Duration, eps: &[SocketAddr], clients: u32) -> T {
    let table = T::empty();
    let mut rng = SplitMix64(42);
    for i in 0..clients {
        table.pick(conn(client(i), t0, timeout, rng.next()), eps);
    }
    table
}

/// Runs `op(thread, i)` for `i in 0..iters` on each of `THREADS` threads at once and returns
/// the wall time of the slowest thread, so criterion reports the time one operation takes
/// while the other thread works on the same table (aggregate throughput is `THREADS` times
/// that rate). Thread start-up is not measured.
fn concurrently<F>(iters: u64, op: F) -> Duration
where
    F: Fn(u32, u64) + Sync,
{
    let barrier = Barrier::new(THREADS as usize);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (barrier, op) = (&barrier, &op);
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    for i in 0..iters {
                        op(t, i);
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread panicked"))
            .max()
            .unwrap_or_default()
    })
}

fn pick_benches(c: &mut Criterion) {
    let eps = endpoints();
    let mut rng = SplitMix64(1);
    c.bench_function("pick/uniform", |b| {
        b.iter(|| pick::uniform(black_box(&eps), rng.next()))
    });
}

fn affinity_benches(c: &mut Criterion) {
    affinity_benches_for::<AffinityTable<ServiceId, SocketAddr>>(c);
    affinity_benches_for::<FlatAffinityTable<ServiceId, SocketAddr>>(c);
    affinity_batch_benches(c);
}

/// Connections per `FlatAffinityTable::pick_batch` call in the batch benches.
const BATCH: usize = 256;

/// `affinity_flat/hit` and `hit_cached` again, through `FlatAffinityTable::pick_batch`: one
/// iteration is one batch of `BATCH` random remembered clients on each thread (criterion's
/// time is per batch, its throughput per hit).
fn affinity_batch_benches(c: &mut Criterion) {
    let eps = endpoints();
    let clients = client_count();
    let t0 = Instant::now();
    let mut group = c.benchmark_group("affinity_flat_batch");
    group.throughput(Throughput::Elements(BATCH as u64));
    for (name, clients) in [("hit", clients), ("hit_cached", clients.min(10_000))] {
        let table: FlatAffinityTable<ServiceId, SocketAddr> = prefilled(t0, TIMEOUT, &eps, clients);
        let now = t0 + Duration::from_secs(3600);
        group.bench_function(format!("{name}_{BATCH}"), |b| {
            b.iter_custom(|iters| {
                concurrently(iters, |t, i| {
                    let mut rng = SplitMix64(u64::from(t) << 32 ^ i);
                    let conns: Vec<_> = (0..BATCH)
                        .map(|_| {
                            let r = rng.next();
                            let who = pick::uniform_index(clients as usize, r).unwrap_or(0);
                            conn(client(who as u32), now, TIMEOUT, r)
                        })
                        .collect();
                    let mut out = Vec::with_capacity(BATCH);
                    table.pick_batch(&conns, &eps, &mut out);
                    debug_assert!(
                        out.iter()
                            .all(|p| p.as_ref().map(|p| p.outcome) == Some(Outcome::Hit))
                    );
                    black_box(out);
                })
            })
        });
    }
    group.finish();
}

fn affinity_benches_for<T: BenchTable>(c: &mut Criterion) {
    let eps = endpoints();
    let clients = client_count();
    let t0 = Instant::now();

    // Hit: a random remembered client, an hour after it was remembered; both threads draw from
    // the whole population, so they sometimes share shards as real traffic would. With a
    // million clients the table (~100 MB) dwarfs the caches and a hit pays for memory latency;
    // `hit_cached` repeats it with 10,000 clients, whose entries stay in cache, as clients that
    // reconnect often do.
    for (name, clients) in [("hit", clients), ("hit_cached", clients.min(10_000))] {
        let table: T = prefilled(t0, TIMEOUT, &eps, clients);
        let name = format!("{}/{name}", T::GROUP);
        let now = t0 + Duration::from_secs(3600);
        c.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                concurrently(iters, |t, i| {
                    let r = SplitMix64(u64::from(t) << 32 ^ i).next();
                    let who = client(pick::uniform_index(clients as usize, r).unwrap_or(0) as u32);
                    let p = table.pick(conn(who, now, TIMEOUT, r), &eps);
                    debug_assert_eq!(p.as_ref().map(|p| p.outcome), Some(Outcome::Hit));
                    black_box(p);
                })
            })
        });
    }

    // Miss: a client never seen before is chosen for and inserted into a table already holding
    // the population. The inserted clients are removed again (unmeasured) after each sample, so
    // the table's size stays near the population; its capacity stays grown.
    {
        let table: T = prefilled(t0, TIMEOUT, &eps, clients);
        let now = t0 + Duration::from_secs(1);
        c.bench_function(&format!("{}/miss", T::GROUP), |b| {
            b.iter_custom(|iters| {
                let elapsed = concurrently(iters, |t, i| {
                    let r = SplitMix64(u64::from(t) << 32 ^ i).next();
                    let p = table.pick(conn(new_client(t, i), now, TIMEOUT, r), &eps);
                    debug_assert_eq!(p.as_ref().map(|p| p.outcome), Some(Outcome::Miss));
                    black_box(p);
                });
                table.forget_new_clients();
                elapsed
            })
        });
    }

    // Expired: a returning client whose entry has expired, so a new endpoint is chosen and
    // written in place. Each thread owns half of the clients and its clock advances faster
    // than the (1 ms) timeout, so every pick misses.
    {
        let timeout = Duration::from_millis(1);
        let table: T = prefilled(t0, timeout, &eps, clients);
        let half = u64::from(clients / THREADS);
        let round = std::sync::atomic::AtomicU64::new(1);
        c.bench_function(&format!("{}/miss_expired", T::GROUP), |b| {
            b.iter_custom(|iters| {
                let base = round.fetch_add(iters + 1, std::sync::atomic::Ordering::Relaxed);
                concurrently(iters, |t, i| {
                    let now = t0 + Duration::from_millis(2 * (base + i));
                    let who = client((((i % half) * u64::from(THREADS)) + u64::from(t)) as u32);
                    let r = SplitMix64(u64::from(t) << 32 ^ i).next();
                    let p = table.pick(conn(who, now, timeout, r), &eps);
                    debug_assert_eq!(p.as_ref().map(|p| p.outcome), Some(Outcome::Miss));
                    black_box(p);
                })
            })
        });
    }
}

fn maglev_benches(c: &mut Criterion) {
    let backends: Vec<String> = (0..1000)
        .map(|i| format!("10.244.{}.{}:8080", i / 256, i % 256))
        .collect();
    let mut group = c.benchmark_group("maglev");
    group.bench_function("build_1000_65537", |b| {
        b.iter(|| Maglev::new(black_box(&backends), DEFAULT_TABLE_SIZE))
    });
    let table = Maglev::new(&backends, DEFAULT_TABLE_SIZE).expect("valid maglev input");
    let mut rng = SplitMix64(3);
    group.bench_function("lookup", |b| b.iter(|| table.lookup(rng.next())));
    group.finish();
}

/// Endpoints of a Service spread over 3 zones and 50 nodes; with `hints`, each carries a zone
/// hint for its own zone (what the EndpointSlice controller writes for PreferSameZone).
fn zoned_endpoints(n: usize, hints: bool) -> Vec<Endpoint> {
    (0..n)
        .map(|i| {
            let zone = format!("zone-{}", i % 3);
            let mut b = Endpoint::builder(
                format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256),
                8080,
            )
            .node_name(&format!("node-{}", i % 50))
            .zone(&zone);
            if hints {
                b = b.hints_for_zones([zone.as_str()]);
            }
            if i % 10 == 9 {
                b = b.conditions(Conditions::SERVING_TERMINATING);
            }
            b.build().expect("bench endpoint is valid")
        })
        .collect()
}

/// Categorising 10, 100 and 1000 endpoints, with and without zone hints, for a NodePort
/// Service with externalTrafficPolicy Local (so both the cluster and the local sets are built).
fn categorize_benches(c: &mut Criterion) {
    let svc = ServicePort::builder("bench", "web", "http", Protocol::Tcp, 80)
        .cluster_ips(["10.96.0.10"])
        .service_type(ServiceType::NodePort)
        .node_port(30080)
        .external_traffic_policy(TrafficPolicy::Local)
        .build()
        .expect("bench service is valid");
    let node = Node::new("node-7", Some("zone-1")).expect("bench node is valid");
    let mut group = c.benchmark_group("categorize");
    for n in [10, 100, 1000] {
        for hints in [false, true] {
            let eps = zoned_endpoints(n, hints);
            let name = format!("{n}_endpoints{}", if hints { "_zone_hints" } else { "" });
            group.bench_function(name, |b| {
                b.iter(|| {
                    let r = categorize(black_box(&svc), black_box(&eps), &node);
                    black_box(r.cluster_indices().len() + r.local_indices().len())
                })
            });
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_millis(2500))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = pick_benches, affinity_benches, maglev_benches, categorize_benches
}
criterion_main!(benches);
