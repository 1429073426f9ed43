//! The compiler's side of ClientIP affinity (`compile::affinity` has the maps and the
//! decisions): which destinations a plan may make stale, where their entries are read back,
//! and the transaction that purges or carries them over. It lives beside the incremental
//! compiler because it reads the compiler's fragments and owners.

use std::collections::{BTreeMap, BTreeSet};

use lb_core::ServicePortName;
use rustc_hash::FxHashMap as HashMap;

use crate::nft::Command;
use crate::nft::ir::Element;

use super::super::affinity::{
    AffinityMap, AffinityTargets, Purge, ReadBack, Touched, affinity_maps, belongs_to,
    stale_entries,
};
use super::super::packed::{KeyHash, key_hash};
use super::super::service::Fragment;
use super::{Compiler, Fragments, OwnerList, Plan};

impl Compiler {
    /// The ClientIP affinity destinations whose entries a plan may make stale, per timeout:
    /// those for which a changed service port loses an endpoint, or which it no longer has
    /// with that timeout (deleted, affinity dropped, timeout changed). A change that only
    /// adds endpoints touches nothing, so reads nothing back. Call it before
    /// [`Compiler::commit`].
    pub fn affinity_touched(&self, plan: &Plan) -> Touched {
        let mut touched = Touched::new();
        for (name, frag) in &plan.changes {
            let Some(old) = self.fragments.get(name) else {
                continue;
            };
            for (secs, dest, old_eps) in &old.affinity {
                let now = frag
                    .iter()
                    .flat_map(|f| &f.affinity)
                    .find(|(s, d, _)| s == secs && d == dest)
                    .map(|(_, _, eps)| eps);
                let lost =
                    now.is_none_or(|now| old_eps.iter().any(|e| now.binary_search(e).is_err()));
                if lost {
                    touched.entry(*secs).or_default().insert(dest.clone());
                }
            }
        }
        touched
    }

    /// For every touched (timeout, destination), the endpoints its affinity entries may still
    /// point to, as committed: the union over the service ports that now have that
    /// destination with that timeout (none: every entry is stale, e.g. the Service or its
    /// affinity is gone, or its timeout changed).
    pub fn affinity_targets(&self, touched: &Touched) -> BTreeMap<u64, AffinityTargets> {
        self.targets_with(
            touched,
            |k| self.owners.get(&k),
            |name| self.fragments.get(name),
        )
    }

    /// As [`Compiler::affinity_targets`], in the state `plan` leads to, before it is
    /// committed: so the transaction that takes endpoints away also deletes the affinity
    /// entries pointing to them.
    pub fn affinity_targets_after(
        &self,
        plan: &Plan,
        touched: &Touched,
    ) -> BTreeMap<u64, AffinityTargets> {
        let changed: HashMap<&ServicePortName, Option<&Fragment>> = plan
            .changes
            .iter()
            .map(|(n, f)| (&**n, f.as_ref()))
            .collect();
        self.targets_with(
            touched,
            |k| match plan.touched.get(&k) {
                Some(o) => Some(o),
                None if plan.gone.binary_search(&k).is_ok() => None,
                None => self.owners.get(&k),
            },
            |name| match changed.get(name) {
                Some(f) => *f,
                None => self.fragments.get(name),
            },
        )
    }

    fn targets_with<'s>(
        &self,
        touched: &Touched,
        owners_of: impl Fn(KeyHash) -> Option<&'s OwnerList>,
        fragment_of: impl Fn(&ServicePortName) -> Option<&'s Fragment>,
    ) -> BTreeMap<u64, AffinityTargets> {
        let mut out: BTreeMap<u64, AffinityTargets> = BTreeMap::new();
        for (&secs, dests) in touched {
            let targets = out.entry(secs).or_default();
            for dest in dests {
                let set = dest.key_set(secs);
                let allowed = targets.entry(dest.clone()).or_default();
                let owners = owners_of(key_hash(set, dest.key()));
                for name in owners.iter().flat_map(|o| o.as_slice()) {
                    let Some(frag) = fragment_of(name) else {
                        continue;
                    };
                    for (s, d, eps) in &frag.affinity {
                        if *s == secs && d == dest {
                            allowed.extend(eps.iter().cloned());
                        }
                    }
                }
            }
        }
        out
    }

    /// Every affinity destination of every committed service port, by timeout (what a full
    /// sync checks carried-over entries against).
    pub fn all_affinity(&self) -> Touched {
        let mut all = Touched::new();
        for frag in self.fragments.values() {
            for (secs, dest, _) in &frag.affinity {
                all.entry(*secs).or_default().insert(dest.clone());
            }
        }
        all
    }

    /// The two affinity maps of timeout `secs`: service addresses (`affinity-T`) and node
    /// ports (`affinity-nodeport-T`), in that order.
    pub fn affinity_maps(&self, secs: u64) -> [AffinityMap; 2] {
        affinity_maps(self.f, secs)
    }

    /// The affinity maps the table holds once `fragments` are planned and applied: those to
    /// read back before a full sync replaces the table, to carry their entries over
    /// ([`Compiler::affinity_carry_over`]).
    pub fn affinity_maps_after(&self, fragments: &Fragments) -> Vec<AffinityMap> {
        let mut timeouts = self.installed_timeouts.clone();
        timeouts.extend(fragments.timeouts());
        timeouts
            .iter()
            .flat_map(|&secs| self.affinity_maps(secs))
            .collect()
    }

    /// The purge of the stale entries of `pending` destinations, as committed (a second look
    /// after the transaction, or a retry).
    pub fn affinity_purge(&self, pending: &Touched) -> Purge {
        Purge {
            table: self.table_id(),
            f: self.f,
            targets: self.affinity_targets(pending),
        }
    }

    /// The purge of the stale entries of `touched` destinations in the state `plan` leads to,
    /// so the transaction that takes endpoints away also deletes the entries pointing to them.
    pub fn affinity_purge_after(&self, plan: &Plan, touched: &Touched) -> Purge {
        Purge {
            table: self.table_id(),
            f: self.f,
            targets: self.affinity_targets_after(plan, touched),
        }
    }

    /// After a full sync replaced the table (and so emptied its affinity maps), the commands
    /// putting back the entries `read` before it that still point to an endpoint their
    /// destination may use, for destinations that still have affinity with that timeout.
    /// Entries come back with the map's full timeout, as if the client had just connected.
    pub fn affinity_carry_over(&self, read: ReadBack) -> Vec<Command> {
        let table = self.table_id();
        let all = self.all_affinity();
        let mut out = Vec::new();
        for (map, listed) in read {
            let secs = map.secs;
            let Some(dests) = all.get(&secs) else {
                continue;
            };
            let mut touched = Touched::new();
            touched.insert(secs, dests.clone());
            let Some(targets) = self.affinity_targets(&touched).remove(&secs) else {
                continue;
            };
            let stale: BTreeSet<_> =
                stale_entries(&targets, listed.iter().map(|e| (&e.key, e.data.as_ref())))
                    .into_iter()
                    .collect();
            let elements: Vec<_> = listed
                .into_iter()
                .filter(|e| !stale.contains(&e.key))
                .filter_map(|e| e.data.map(|d| (e.key, Element::values(d))))
                // Only entries for a destination that still has affinity with this timeout.
                .filter(|(k, _)| belongs_to(k, dests))
                .collect();
            if !elements.is_empty() {
                out.push(Command::AddElements {
                    table: table.clone(),
                    set: map.name,
                    elements,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::affinity::fixtures::*;
    use super::*;

    use crate::nft::ListedElement;
    use crate::nft::ir::Key;

    use crate::compile::Config;
    use crate::store::ServiceEntry;
    use lb_core::{Endpoint, IpFamily, Node, Protocol, ServicePort, ServiceType};

    fn node() -> Node {
        Node::new("node-a", None).expect("valid node")
    }

    /// A sticky NodePort service port (cluster IP 10.96.0.1:80, node port 30080) with
    /// endpoints `eps` on port 8080.
    fn sticky(eps: &[&str]) -> ServiceEntry {
        ServiceEntry {
            port: ServicePort::builder("ns", "sticky", "http", Protocol::Tcp, 80)
                .cluster_ips(["10.96.0.1"])
                .service_type(ServiceType::NodePort)
                .node_port(30080)
                .client_ip_affinity(Some(600))
                .build()
                .expect("valid service"),
            endpoints: eps
                .iter()
                .map(|ip| {
                    Endpoint::builder(*ip, 8080)
                        .build()
                        .expect("valid endpoint")
                })
                .collect(),
        }
    }

    fn listed((key, data): (Key, Key)) -> ListedElement {
        ListedElement {
            key,
            data: Some(data),
            counter: None,
        }
    }

    /// What the kernel could hold: entries to the kept and the removed endpoint, through the
    /// cluster IP and the node port, and one of another Service.
    fn read_back(maps: &[AffinityMap]) -> ReadBack {
        let (address, node_port) = (&maps[0], &maps[1]);
        vec![
            (
                address.clone(),
                vec![
                    listed(entry("10.100.0.2", "10.96.0.1", 80, "10.244.0.1")),
                    listed(entry("10.100.0.3", "10.96.0.1", 80, "10.244.0.2")),
                    listed(entry("10.100.0.4", "10.96.0.9", 80, "10.244.0.2")),
                ],
            ),
            (
                node_port.clone(),
                vec![
                    listed(np_entry("10.100.0.2", 30080, "10.244.0.1")),
                    listed(np_entry("10.100.0.3", 30080, "10.244.0.2")),
                ],
            ),
        ]
    }

    #[test]
    fn the_purge_deletes_the_read_back_entries_pointing_to_a_removed_endpoint() {
        let mut c = Compiler::new(Config::default(), IpFamily::V4);
        let before = sticky(&["10.244.0.1", "10.244.0.2"]);
        let name = before.port.name().clone();
        let p = c.plan(&node(), [(name.clone(), Some(&before))]);
        c.commit(p);

        let after = sticky(&["10.244.0.1"]);
        let plan = c.plan(&node(), [(name, Some(&after))]);
        let touched = c.affinity_touched(&plan);
        assert_eq!(
            touched,
            Touched::from([(600, [address("10.96.0.1", 80), node_port(30080)].into())])
        );
        let purge = c.affinity_purge_after(&plan, &touched);
        let maps = purge.maps();
        let names: Vec<&str> = maps.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["affinity-600", "affinity-nodeport-600"]);
        assert_eq!(maps, c.affinity_maps(600));
        let deletes = purge.deletes(read_back(&maps));
        assert_eq!(
            deletes,
            vec![
                Command::DeleteElements {
                    table: c.table_id(),
                    set: "affinity-600".into(),
                    keys: vec![entry("10.100.0.3", "10.96.0.1", 80, "10.244.0.2").0],
                },
                Command::DeleteElements {
                    table: c.table_id(),
                    set: "affinity-nodeport-600".into(),
                    keys: vec![np_entry("10.100.0.3", 30080, "10.244.0.2").0],
                },
            ]
        );
    }

    #[test]
    fn a_change_that_only_adds_endpoints_reads_nothing_back() {
        let mut c = Compiler::new(Config::default(), IpFamily::V4);
        let before = sticky(&["10.244.0.1"]);
        let name = before.port.name().clone();
        let p = c.plan(&node(), [(name.clone(), Some(&before))]);
        c.commit(p);
        let after = sticky(&["10.244.0.1", "10.244.0.2"]);
        let plan = c.plan(&node(), [(name, Some(&after))]);
        let touched = c.affinity_touched(&plan);
        assert!(touched.is_empty());
        assert!(c.affinity_purge_after(&plan, &touched).maps().is_empty());
    }

    #[test]
    fn a_full_sync_carries_over_only_entries_that_are_still_valid() {
        let mut c = Compiler::new(Config::default(), IpFamily::V4);
        let now = sticky(&["10.244.0.1"]);
        let f = c.fragments(&node(), [(now.port.name().clone(), Some(&now))]);
        let maps = c.affinity_maps_after(&f);
        let p = c.plan_fragments(f);
        assert_eq!(maps, c.affinity_maps(600));
        c.commit(p);
        let adds = c.affinity_carry_over(read_back(&maps));
        let kept = |set: &str, key: (Key, Key)| Command::AddElements {
            table: c.table_id(),
            set: set.into(),
            elements: vec![(key.0, Element::values(key.1))],
        };
        // Entries to the removed endpoint, and of a Service without affinity, stay out.
        assert_eq!(
            adds,
            vec![
                kept(
                    "affinity-600",
                    entry("10.100.0.2", "10.96.0.1", 80, "10.244.0.1")
                ),
                kept(
                    "affinity-nodeport-600",
                    np_entry("10.100.0.2", 30080, "10.244.0.1")
                ),
            ]
        );
    }
}
