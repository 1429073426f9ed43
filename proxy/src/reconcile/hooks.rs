//! The post-sync hooks: what the reconciler does after the kernel accepted a sync, in every
//! mode (`run` and `daemon` alike). Each keeps per-Service state, so a sync costs what
//! changed: the healthCheckNodePort table, the no-local-endpoints gauge, the conntrack
//! cleanup, and the change log behind kube-proxy's change metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Instant, SystemTime};

use crate::convert::ServiceKey;
use crate::metrics::Metrics;
use crate::store::{Event as StoreEventKind, ServiceEntry, SliceKey, StoreEvent};

use super::Voice;

/// Changes received and not yet programmed, for kube-proxy's change metrics.
#[derive(Debug)]
pub(super) struct ChangeLog {
    /// Trigger times before this are from before the daemon started: not observed (as
    /// kube-proxy ignores them).
    started: SystemTime,
    services: BTreeSet<ServiceKey>,
    slices: BTreeSet<SliceKey>,
    triggers: Vec<(SystemTime, lb_core::IpFamily)>,
}

impl ChangeLog {
    pub(super) fn new(started: SystemTime) -> Self {
        Self {
            started,
            services: BTreeSet::new(),
            slices: BTreeSet::new(),
            triggers: Vec::new(),
        }
    }

    /// Counts a Service or EndpointSlice change (re-lists and Node updates are not counted);
    /// `trigger` is a changed slice's `endpoints.kubernetes.io/last-change-trigger-time`.
    pub(super) fn note(
        &mut self,
        event: &StoreEvent,
        trigger: Option<SystemTime>,
        metrics: &Metrics,
    ) {
        match event {
            StoreEvent::Service(StoreEventKind::Apply(k, _) | StoreEventKind::Delete(k)) => {
                self.services.insert(k.clone());
                metrics.queued(true);
            }
            StoreEvent::Slice(e @ (StoreEventKind::Apply(k, _) | StoreEventKind::Delete(k))) => {
                self.slices.insert(k.clone());
                metrics.queued(false);
                if let (StoreEventKind::Apply(_, s), Some(t)) = (e, trigger)
                    && t >= self.started
                {
                    self.triggers.push((t, s.family));
                }
            }
            _ => return,
        }
        metrics
            .service_changes_pending
            .set(self.services.len() as i64);
        metrics.changes_pending.set(self.slices.len() as i64);
    }

    /// Everything noted was programmed at `acked`: observes the trigger-time latencies.
    pub(super) fn programmed(&mut self, metrics: &Metrics, acked: SystemTime) {
        for (t, family) in self.triggers.drain(..) {
            let latency = acked.duration_since(t).unwrap_or_default();
            metrics
                .network_programming_duration
                .get_or_create(&crate::metrics::FamilyLabel::of(family))
                .observe(latency.as_secs_f64());
        }
        self.services.clear();
        self.slices.clear();
        metrics.service_changes_pending.set(0);
        metrics.changes_pending.set(0);
    }
}

/// Counts, for `changed` Services, what `kubeproxy_sync_proxy_rules_no_local_endpoints_total`
/// sums ([`publish_no_local_endpoints`]): per family, the service ports with an internal
/// (resp. external) Local policy that have usable endpoints but none on this node — traffic to
/// them is dropped here (kube-proxy's count, kept per Service so a sync costs what changed).
pub(super) fn update_no_local_endpoints(
    node: &lb_core::Node,
    changed: &[(ServiceKey, Vec<ServiceEntry>)],
    table: &mut BTreeMap<ServiceKey, [i64; 4]>,
) {
    for (key, entries) in changed {
        let counts = crate::health::no_local_endpoints(node, entries);
        if counts == [0; 4] {
            table.remove(key);
        } else {
            table.insert(key.clone(), counts);
        }
    }
}

/// Sets `kubeproxy_sync_proxy_rules_no_local_endpoints_total` from the counts of every
/// Service ([`update_no_local_endpoints`]).
pub(super) fn publish_no_local_endpoints(
    table: &BTreeMap<ServiceKey, [i64; 4]>,
    metrics: &Metrics,
) {
    use lb_core::IpFamily;
    const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];
    let mut totals = [0i64; 4];
    for counts in table.values() {
        for (t, c) in totals.iter_mut().zip(counts) {
            *t += c;
        }
    }
    for (i, family) in FAMILIES.iter().enumerate() {
        let ip_family = crate::metrics::FamilyLabel::of(*family).ip_family;
        for (j, traffic_policy) in ["internal", "external"].into_iter().enumerate() {
            metrics
                .no_local_endpoints
                .get_or_create(&crate::metrics::NoLocalLabels {
                    ip_family,
                    traffic_policy,
                })
                .set(totals[2 * i + j]);
        }
    }
}

/// Refreshes the healthCheckNodePort table for `changed` Services: port and number of distinct
/// local ready endpoints, for LoadBalancer Services with `externalTrafficPolicy: Local`.
pub(super) fn update_health_checks(
    node: &lb_core::Node,
    changed: &[(ServiceKey, Vec<ServiceEntry>)],
    table: &mut BTreeMap<ServiceKey, Vec<(u16, crate::health::LocalEndpoints)>>,
) {
    for (key, entries) in changed {
        let ports = crate::health::health_check_ports(node, entries);
        if ports.is_empty() {
            table.remove(key);
        } else {
            table.insert(key.clone(), ports);
        }
    }
}

/// Whether any hook after a sync reads `port`'s endpoints: its health check node port or
/// Local policies ([`crate::health::reads_endpoints`]) or conntrack cleanup (UDP and SCTP).
/// For other ports every hook gives the same answer with no endpoints at all.
pub(super) fn reads_endpoints(port: &lb_core::ServicePort) -> bool {
    crate::conntrack::cleaned(port.protocol()) || crate::health::reads_endpoints(port)
}

/// The UDP and SCTP service ports of a Service's `entries`, as conntrack cleanup compares
/// them ([`clean_conntrack`]).
pub(super) fn conntrack_states(
    entries: &[ServiceEntry],
) -> Vec<(lb_core::ServicePortName, crate::conntrack::ServicePortState)> {
    entries
        .iter()
        .filter_map(|e| {
            crate::conntrack::ServicePortState::from_entry(e).map(|s| (e.port.name().clone(), s))
        })
        .collect()
}

/// Deletes conntrack entries that the changes to the `fresh` Services (each with its
/// [`conntrack_states`] now) left stale (UDP and SCTP flows to endpoints that left;
/// un-DNATed flows to service ports that gained endpoints), and reconciles the whole table
/// against every Service's serving endpoints ([`crate::conntrack::Reconciler`]), which also
/// repairs what went stale before a restart.
pub(super) fn clean_conntrack(
    fresh: Vec<(
        ServiceKey,
        Vec<(lb_core::ServicePortName, crate::conntrack::ServicePortState)>,
    )>,
    seen: &mut BTreeMap<
        ServiceKey,
        Vec<(lb_core::ServicePortName, crate::conntrack::ServicePortState)>,
    >,
    metrics: &Metrics,
    voice: Voice,
) {
    use crate::conntrack::ServicePorts;
    let mut previous = ServicePorts::new();
    let mut next = ServicePorts::new();
    for (key, now) in &fresh {
        for (name, state) in seen.get(key).into_iter().flatten() {
            previous.insert(name.clone(), state.clone());
        }
        for (name, state) in now {
            next.insert(name.clone(), state.clone());
        }
    }
    // Every UDP and SCTP service port as it is now, for the whole-table reconciliation.
    let mut serving = ServicePorts::new();
    let changed: std::collections::BTreeSet<&ServiceKey> = fresh.iter().map(|(k, _)| k).collect();
    for (key, states) in seen.iter() {
        if changed.contains(key) {
            continue;
        }
        for (name, state) in states {
            serving.insert(name.clone(), state.clone());
        }
    }
    for (_, now) in &fresh {
        for (name, state) in now {
            serving.insert(name.clone(), state.clone());
        }
    }
    let started = Instant::now();
    match crate::conntrack::cleanup(&previous, &next, &serving) {
        Ok(deleted) => {
            for (key, now) in fresh {
                if now.is_empty() {
                    seen.remove(&key);
                } else {
                    seen.insert(key, now);
                }
            }
            if deleted > 0 {
                match voice {
                    Voice::Plain => eprintln!(
                        "lb-proxy: conntrack: deleted {deleted} stale UDP/SCTP flows in {:?}",
                        started.elapsed()
                    ),
                    Voice::Log => tracing::debug!(
                        deleted,
                        took_ms = started.elapsed().as_secs_f64() * 1000.0,
                        "conntrack cleanup"
                    ),
                }
            }
            metrics.conntrack_deleted.inc_by(deleted as u64);
        }
        Err(e) => match voice {
            Voice::Plain => eprintln!(
                "lb-proxy: conntrack cleanup failed, retrying after the next sync: {:#}",
                anyhow::Error::new(e)
            ),
            Voice::Log => {
                tracing::warn!(error = %crate::error_chain(&e), "conntrack cleanup failed; retried after the next sync")
            }
        },
    }
}
