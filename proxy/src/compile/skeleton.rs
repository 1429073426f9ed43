//! The fixed part of a table: the static sets and maps (without elements) and every chain
//! and rule. It depends only on the configuration, the endpoint counts in use (a `pick-N`
//! chain each) and the affinity timeouts in use, never on a Service, so a packet's cost and
//! the number of kernel objects do not grow with Services.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use crate::nft::ir::{
    BaseChain, Chain, ChainSpec, ChainType, CmpOp, CtKey, CtState, CtStatus, DataType, Element,
    Expr, FibAddr, Hook, KeySpec, MapData, MarkOp, Policy, Rule, Set, SetSpec, Stmt, Table, Value,
    Verdict,
};

use super::affinity::affinity_sets;
use super::config::Config;
use super::layout::*;

/// The `size` of sets, by name ([`crate::nft::ir::SetSpec::size`]).
pub(super) type Sizes = BTreeMap<String, u32>;

/// The smallest size a set is given: a fresh cluster's sets take this many elements before
/// the first one outgrows its size (a full sync then re-creates them larger). The kernel's
/// hash table for it is 16 KiB.
pub const MIN_SET_SIZE: u32 = 1024;

/// The size a full sync gives a set of `elements` elements: room for as many again, rounded
/// up to a power of two, so a set is re-created (by a full sync) only once it has doubled.
/// With a size the kernel allocates the set's hash table once, at four to eight buckets of 8
/// bytes per element (a fixed table: `nft_hash`), instead of rehashing a table that starts
/// small as a large batch fills it, which made those inserts the costliest part of a full
/// sync (`rhashtable_insert_slow` took a quarter of `run --once`'s CPU time, issue 13).
pub fn fit_size(elements: usize) -> u32 {
    let room = elements.saturating_mul(2).next_power_of_two();
    u32::try_from(room).unwrap_or(u32::MAX).max(MIN_SET_SIZE)
}

/// Whether a set gets a size: those whose elements only the compiler adds. Sets the data
/// path adds to (`dynamic`, the affinity maps) and interval sets (a few prefixes, in
/// another kind of kernel set) keep none.
fn sizable(spec: &SetSpec) -> bool {
    !spec.flags.dynamic && !spec.flags.timeout && !spec.flags.interval && !spec.flags.constant
}

/// The sizes for `table`'s sizable sets holding `elements(set)` elements (`None`: none).
pub(super) fn fit_sizes(table: &Table, elements: impl Fn(&str) -> Option<usize>) -> Sizes {
    table
        .sets
        .iter()
        .filter(|(_, s)| sizable(&s.spec))
        .map(|(name, _)| (name.clone(), fit_size(elements(name).unwrap_or(0))))
        .collect()
}

/// Gives `table`'s sets their sizes in `sizes` (those not listed keep none).
pub(super) fn apply_sizes(table: &mut Table, sizes: &Sizes) {
    for (name, set) in &mut table.sets {
        set.spec.size = sizes.get(name).copied();
    }
}

/// The static sets and maps, without elements.
pub(super) fn skeleton_sets(f: Fam, config: &Config) -> Table {
    let mut table = Table {
        comment: Some(TABLE_COMMENT.into()),
        ..Table::default()
    };
    let key3 = || vec![f.addr, DataType::InetProto, DataType::InetService];
    let np2 = || vec![DataType::InetProto, DataType::InetService];
    let mut add = |name: &str, spec: SetSpec, comment: &str| {
        let spec = SetSpec {
            comment: Some(comment.into()),
            ..spec
        };
        table.sets.insert(name.into(), Set::new(spec));
    };
    add(
        CLUSTER_IPS,
        SetSpec::set(vec![f.addr]),
        "active cluster IPs",
    );
    add(
        SERVICE_IPS,
        SetSpec::map(KeySpec::Types(key3()), MapData::Verdict),
        "cluster, external and load-balancer IPs: dispatch to endpoints",
    );
    add(
        EXTERNAL_LOCAL_IPS,
        SetSpec::map(KeySpec::Types(key3()), MapData::Verdict),
        "external traffic to eTP Local services: node-local endpoints",
    );
    add(
        SERVICE_NODEPORTS,
        SetSpec::map(KeySpec::Types(np2()), MapData::Verdict),
        "NodePort traffic: dispatch to endpoints",
    );
    add(
        NODEPORT_EXTERNAL_LOCAL,
        SetSpec::map(KeySpec::Types(np2()), MapData::Verdict),
        "external NodePort traffic to eTP Local services",
    );
    let ep_map = |with_daddr: bool| {
        let mut key = Vec::new();
        if with_daddr {
            key.push(pl(f.daddr));
        }
        key.extend([L4PROTO, DPORT, Expr::NumgenRandom { modulus: 1 }]);
        SetSpec::map(
            KeySpec::Typeof(key),
            MapData::Values(KeySpec::Typeof(vec![pl(f.daddr), DPORT])),
        )
    };
    add(
        ENDPOINTS,
        ep_map(true),
        "service address . bucket -> endpoint",
    );
    add(
        ENDPOINTS_LOCAL,
        ep_map(true),
        "as endpoints, node-local endpoints only",
    );
    add(
        NODEPORT_ENDPOINTS,
        ep_map(false),
        "node port . bucket -> endpoint",
    );
    add(
        NODEPORT_ENDPOINTS_LOCAL,
        ep_map(false),
        "as nodeport-endpoints, node-local only",
    );
    add(
        MASQ_IPS,
        SetSpec::set(key3()),
        "external addresses of eTP Cluster services",
    );
    add(
        MASQ_LOCAL_SOURCE_IPS,
        SetSpec::set(key3()),
        "external addresses of eTP Local services: masquerade the node's own traffic",
    );
    add(
        MASQ_NODEPORTS,
        SetSpec::set(np2()),
        "node ports of eTP Cluster services",
    );
    add(
        MASQ_LOCAL_SOURCE_NODEPORTS,
        SetSpec::set(np2()),
        "node ports of eTP Local services",
    );
    add(
        NO_ENDPOINT_SERVICES,
        SetSpec::map(KeySpec::Types(key3()), MapData::Verdict),
        "reject or drop traffic to service addresses without usable endpoints",
    );
    add(
        NO_ENDPOINT_NODEPORTS,
        SetSpec::map(KeySpec::Types(np2()), MapData::Verdict),
        "reject or drop traffic to node ports without usable endpoints",
    );
    add(
        FIREWALL_IPS,
        SetSpec::set(key3()),
        "load-balancer IPs with source ranges",
    );
    let mut allow = SetSpec::set({
        let mut k = key3();
        k.push(f.addr);
        k
    });
    allow.flags.interval = true;
    add(
        FIREWALL_ALLOW,
        allow,
        "load-balancer IP . proto . port . allowed source range",
    );
    add(
        HAIRPIN,
        SetSpec::set(vec![f.addr, f.addr]),
        "endpoint . endpoint: hairpin",
    );
    for (name, spec) in traffic_sets(f) {
        let comment = spec.comment.clone().unwrap_or_default();
        add(name, spec, &comment);
    }
    let mut cidrs = SetSpec::set(vec![f.addr]);
    cidrs.flags.interval = true;
    add(SERVICE_CIDRS, cidrs, "ServiceCIDRs: cluster IP ranges");
    if config.nodeport_cidrs().is_some() {
        let mut s = SetSpec::set(vec![f.addr]);
        s.flags.interval = true;
        add(NODEPORT_IPS, s, "addresses that accept NodePort traffic");
        // Overlapping intervals are refused by the kernel: merge them first.
        let cidrs: Vec<IpNet> = config
            .nodeport_cidrs()
            .into_iter()
            .flatten()
            .filter(|n| f.is(&n.addr()))
            .copied()
            .collect();
        if let Some(set) = table.sets.get_mut(NODEPORT_IPS) {
            for n in IpNet::aggregate(&cidrs) {
                set.elements.insert(vec![net_value(n)], Element::key_only());
            }
        }
    }
    let in_family: Vec<IpNet> = config
        .service_cidrs
        .iter()
        .filter(|n| f.is(&n.addr()))
        .copied()
        .collect();
    if let Some(set) = table.sets.get_mut(SERVICE_CIDRS) {
        // Overlapping intervals are refused by the kernel: merge them first.
        for n in IpNet::aggregate(&in_family) {
            set.elements.insert(vec![net_value(n)], Element::key_only());
        }
    }
    table
}

/// The traffic counting sets: service addresses and node ports, a counter per element.
pub(super) fn traffic_sets(f: Fam) -> [(&'static str, SetSpec); 2] {
    let counted = |key: Vec<DataType>, comment: &str| {
        let mut s = SetSpec::set(key);
        s.flags.counter = true;
        s.comment = Some(comment.into());
        s
    };
    [
        (
            SERVICE_TRAFFIC,
            counted(
                vec![f.addr, DataType::InetProto, DataType::InetService],
                "service addresses: packets and bytes of their connections",
            ),
        ),
        (
            NODEPORT_TRAFFIC,
            counted(
                vec![DataType::InetProto, DataType::InetService],
                "node ports: packets and bytes of their connections",
            ),
        ),
    ]
}

/// The whole table without elements: static sets, affinity sets for `timeouts`, and chains,
/// with a `pick-N` chain for every endpoint count in `counts`.
pub(super) fn skeleton(
    f: Fam,
    cfg: &Config,
    counts: &BTreeSet<(Dispatch, usize)>,
    timeouts: &BTreeSet<u64>,
) -> Table {
    let mut table = skeleton_sets(f, cfg);
    for &secs in timeouts {
        affinity_sets(f, &mut table, secs);
    }
    let mark = cfg.mark();
    let mut chains: BTreeMap<String, Chain> = BTreeMap::new();
    let base = |kind, hook, priority| ChainSpec {
        base: Some(BaseChain {
            kind,
            hook,
            priority,
            policy: Policy::Accept,
        }),
        comment: None,
    };
    let regular = |comment: &str| ChainSpec {
        base: None,
        comment: Some(comment.into()),
    };
    let jump = |c: &str| Stmt::Verdict(Verdict::Jump(c.into()));
    let new = Stmt::CtState(CtState::New);
    let set_mark = Stmt::SetMark(MarkOp::Or(mark));
    let k3 = || vec![pl(f.daddr), L4PROTO, DPORT];
    let k2 = || vec![L4PROTO, DPORT];
    let lookup = |key: Vec<Expr>, set: &str| Stmt::Lookup {
        key,
        set: set.into(),
        negate: false,
    };
    let vmap = |key: Vec<Expr>, map: &str| Stmt::Vmap {
        key,
        map: map.into(),
    };
    let fib_saddr_local = Stmt::FibLocal(FibAddr::Saddr);
    // Destination is a NodePort address of this node.
    let nodeport_dest: Vec<Stmt> = match cfg.nodeport_cidrs() {
        None => vec![
            Stmt::FibLocal(FibAddr::Daddr),
            Stmt::Match {
                left: pl(f.daddr),
                op: CmpOp::Ne,
                right: f.loopback(),
            },
        ],
        Some(_) => vec![
            Stmt::FibLocal(FibAddr::Daddr),
            lookup(vec![pl(f.daddr)], NODEPORT_IPS),
        ],
    };
    let with = |pre: &[Stmt], more: Vec<Stmt>| -> Rule {
        let mut v = pre.to_vec();
        v.extend(more);
        Rule::new(v)
    };
    let local = cfg.local_matches(f);

    // nat: masquerade marks, affinity, dispatch.
    let mut services = Vec::new();
    if cfg.masquerade_all {
        services.push(
            Rule::new(vec![
                lookup(vec![pl(f.daddr)], CLUSTER_IPS),
                set_mark.clone(),
            ])
            .with_comment("masquerade all cluster IP traffic"),
        );
    } else {
        for (left, right) in &local {
            services.push(
                Rule::new(vec![
                    lookup(vec![pl(f.daddr)], CLUSTER_IPS),
                    Stmt::Match {
                        left: *left,
                        op: CmpOp::Ne,
                        right: *right,
                    },
                    set_mark.clone(),
                ])
                .with_comment("masquerade cluster IP traffic from outside the cluster"),
            );
        }
    }
    services.push(Rule::new(vec![lookup(k3(), MASQ_IPS), set_mark.clone()]));
    services.push(Rule::new(vec![
        fib_saddr_local.clone(),
        lookup(k3(), MASQ_LOCAL_SOURCE_IPS),
        set_mark.clone(),
    ]));
    services.push(with(
        &nodeport_dest,
        vec![lookup(k2(), MASQ_NODEPORTS), set_mark.clone()],
    ));
    services.push(with(
        &nodeport_dest,
        vec![
            fib_saddr_local.clone(),
            lookup(k2(), MASQ_LOCAL_SOURCE_NODEPORTS),
            set_mark.clone(),
        ],
    ));
    for &secs in timeouts {
        services.push(
            Rule::new(vec![Stmt::DnatMap {
                family: f.nat,
                key: vec![pl(f.saddr), pl(f.daddr), L4PROTO, DPORT],
                map: affinity_map(secs),
            }])
            .with_comment("ClientIP affinity"),
        );
    }
    // Node ports after every service address, as dispatch does: a service address (e.g. an
    // external IP that is also a node address) never takes a node port's affinity.
    for &secs in timeouts {
        services.push(
            with(
                &nodeport_dest,
                vec![
                    Stmt::Lookup {
                        key: k3(),
                        set: SERVICE_TRAFFIC.into(),
                        negate: true,
                    },
                    Stmt::DnatMap {
                        family: f.nat,
                        key: vec![pl(f.saddr), L4PROTO, DPORT],
                        map: affinity_nodeport_map(secs),
                    },
                ],
            )
            .with_comment("ClientIP affinity on node ports"),
        );
    }
    // Dispatch. Pods and the node itself are short-circuited to all endpoints before the
    // eTP Local maps are consulted for everything else.
    services.push(Rule::new(vec![
        fib_saddr_local.clone(),
        vmap(k3(), SERVICE_IPS),
    ]));
    for (left, right) in &local {
        services.push(Rule::new(vec![
            Stmt::Match {
                left: *left,
                op: CmpOp::Eq,
                right: *right,
            },
            vmap(k3(), SERVICE_IPS),
        ]));
    }
    services.push(Rule::new(vec![vmap(k3(), EXTERNAL_LOCAL_IPS)]));
    services.push(Rule::new(vec![vmap(k3(), SERVICE_IPS)]));
    services.push(with(
        &nodeport_dest,
        vec![fib_saddr_local.clone(), vmap(k2(), SERVICE_NODEPORTS)],
    ));
    for (left, right) in &local {
        services.push(with(
            &nodeport_dest,
            vec![
                Stmt::Match {
                    left: *left,
                    op: CmpOp::Eq,
                    right: *right,
                },
                vmap(k2(), SERVICE_NODEPORTS),
            ],
        ));
    }
    services.push(with(
        &nodeport_dest,
        vec![vmap(k2(), NODEPORT_EXTERNAL_LOCAL)],
    ));
    services.push(with(&nodeport_dest, vec![vmap(k2(), SERVICE_NODEPORTS)]));
    chains.insert(
        SERVICES.into(),
        Chain {
            spec: regular("dispatch to service endpoints"),
            rules: services,
        },
    );

    for &(d, n) in counts {
        let mut key = Vec::new();
        if d.has_daddr() {
            key.push(pl(f.daddr));
        }
        let (bucket, what) = if d.is_sticky() {
            (
                Expr::Jhash {
                    of: f.saddr,
                    modulus: n as u32,
                },
                "choice by client address",
            )
        } else {
            (Expr::NumgenRandom { modulus: n as u32 }, "uniform choice")
        };
        key.extend([L4PROTO, DPORT, bucket]);
        chains.insert(
            d.chain(n),
            Chain {
                spec: regular(&format!("{what} among {n} endpoints")),
                rules: vec![Rule::new(vec![Stmt::DnatMap {
                    family: f.nat,
                    key,
                    map: d.map().into(),
                }])],
            },
        );
    }

    chains.insert(
        MASQUERADING.into(),
        Chain {
            spec: regular("masquerade marked and hairpin connections"),
            rules: vec![
                Rule::new(vec![
                    Stmt::MarkMatch {
                        mask: mark,
                        op: CmpOp::Ne,
                        value: 0,
                    },
                    Stmt::SetMark(MarkOp::Xor(mark)),
                    Stmt::Masquerade { fully_random: true },
                ]),
                Rule::new(vec![
                    Stmt::CtStatus(CtStatus::Dnat),
                    lookup(vec![pl(f.saddr), pl(f.daddr)], HAIRPIN),
                    Stmt::Masquerade { fully_random: true },
                ]),
            ],
        },
    );

    // Affinity: remember the endpoint every new connection was sent to, right where it was
    // chosen: just after the nat hooks of prerouting and output, which every connection
    // traverses (postrouting is never reached by connections delivered to the node itself, e.g.
    // to a host-network endpoint). Only connections dispatched for a service address or node
    // port with affinity are recorded: a node port entry needs an original destination that is
    // no service address (another Service's cluster IP on the same port number is not it).
    // The key maps send a connection to its service port's record chain, which records it for
    // every address of the port that shares its endpoints (`sticky`).
    if !timeouts.is_empty() {
        let mut rules = Vec::new();
        let orig3 = || {
            vec![
                Expr::Ct(f.ct_daddr),
                L4PROTO,
                Expr::Ct(CtKey::OriginalProtoDst),
            ]
        };
        for &secs in timeouts {
            // One rule per protocol: nft 1.0.6 only parses `ct original proto-dst` in a
            // concatenation once the rule has fixed the protocol.
            for proto in [Value::TCP, Value::UDP, Value::SCTP] {
                let l4 = Stmt::Match {
                    left: L4PROTO,
                    op: CmpOp::Eq,
                    right: proto,
                };
                rules.push(Rule::new(vec![
                    l4.clone(),
                    new.clone(),
                    Stmt::CtStatus(CtStatus::Dnat),
                    vmap(orig3(), &affinity_keys(secs)),
                ]));
                rules.push(Rule::new(vec![
                    l4,
                    new.clone(),
                    Stmt::CtStatus(CtStatus::Dnat),
                    Stmt::Lookup {
                        key: orig3(),
                        set: SERVICE_TRAFFIC.into(),
                        negate: true,
                    },
                    vmap(
                        vec![L4PROTO, Expr::Ct(CtKey::OriginalProtoDst)],
                        &affinity_nodeport_keys(secs),
                    ),
                ]));
            }
        }
        chains.insert(
            AFFINITY_RECORD.into(),
            Chain {
                spec: regular("remember the endpoint chosen for a ClientIP affinity service"),
                rules,
            },
        );
        for (name, hook) in [
            (AFFINITY_RECORD_PREROUTING, Hook::Prerouting),
            (AFFINITY_RECORD_OUTPUT, Hook::Output),
        ] {
            chains.insert(
                name.into(),
                Chain {
                    spec: base(ChainType::Filter, hook, -99),
                    rules: vec![Rule::new(vec![jump(AFFINITY_RECORD)])],
                },
            );
        }
    }

    // filter: source ranges before DNAT, no-endpoint verdicts after.
    chains.insert(
        FIREWALL_CHECK.into(),
        Chain {
            spec: regular("loadBalancerSourceRanges"),
            rules: vec![Rule::new(vec![
                lookup(k3(), FIREWALL_IPS),
                Stmt::Lookup {
                    key: vec![pl(f.daddr), L4PROTO, DPORT, pl(f.saddr)],
                    set: FIREWALL_ALLOW.into(),
                    negate: true,
                },
                Stmt::Verdict(Verdict::Drop),
            ])],
        },
    );
    chains.insert(
        SERVICE_ENDPOINTS_CHECK.into(),
        Chain {
            spec: regular("service addresses without usable endpoints"),
            rules: vec![
                Rule::new(vec![vmap(k3(), NO_ENDPOINT_SERVICES)]),
                // Still addressed to a cluster IP after DNAT: a port the Service does not have.
                // Reject it, as kube-proxy does, rather than route it off the node.
                Rule::new(vec![lookup(vec![pl(f.daddr)], CLUSTER_IPS), Stmt::Reject])
                    .with_comment("reject traffic to invalid ports of cluster IPs"),
                // An address of a ServiceCIDR that no Service holds: dropped, as kube-proxy's
                // "Drop traffic to unallocated ClusterIPs".
                Rule::new(vec![
                    lookup(vec![pl(f.daddr)], SERVICE_CIDRS),
                    Stmt::Verdict(Verdict::Drop),
                ])
                .with_comment("drop traffic to unallocated cluster IPs"),
            ],
        },
    );
    chains.insert(
        NODEPORT_ENDPOINTS_CHECK.into(),
        Chain {
            spec: regular("node ports without usable endpoints"),
            rules: vec![with(
                &nodeport_dest,
                vec![vmap(k2(), NO_ENDPOINT_NODEPORTS)],
            )],
        },
    );
    // Counters: the original destination of every packet of a DNATed connection. nft 1.0.6
    // parses `ct original proto-dst` in a concatenation only once the protocol is known,
    // hence one rule per protocol.
    let mut counting = Vec::new();
    for proto in [Value::TCP, Value::UDP, Value::SCTP] {
        let l4 = Stmt::Match {
            left: L4PROTO,
            op: CmpOp::Eq,
            right: proto,
        };
        let orig_port = Expr::Ct(CtKey::OriginalProtoDst);
        for (key, set) in [
            (
                vec![Expr::Ct(f.ct_daddr), L4PROTO, orig_port],
                SERVICE_TRAFFIC,
            ),
            (vec![L4PROTO, orig_port], NODEPORT_TRAFFIC),
        ] {
            counting.push(Rule::new(vec![
                l4.clone(),
                lookup(key, set),
                Stmt::Verdict(Verdict::Return),
            ]));
        }
    }
    chains.insert(
        COUNT_SERVICE_TRAFFIC.into(),
        Chain {
            spec: regular("count the packets of connections to service addresses and node ports"),
            rules: counting,
        },
    );
    chains.insert(
        REJECT_CHAIN.into(),
        Chain {
            spec: regular("reject: the service has no endpoints"),
            rules: vec![Rule::new(vec![Stmt::Reject])],
        },
    );

    // Base chains, at kube-proxy's hooks and priorities.
    let count = vec![Stmt::CtStatus(CtStatus::Dnat), jump(COUNT_SERVICE_TRAFFIC)];
    let base_rules = [
        (
            FILTER_PREROUTING_PRE_DNAT,
            ChainType::Filter,
            Hook::Prerouting,
            -110,
            vec![vec![new.clone(), jump(FIREWALL_CHECK)]],
        ),
        (
            FILTER_OUTPUT_PRE_DNAT,
            ChainType::Filter,
            Hook::Output,
            -110,
            vec![vec![new.clone(), jump(FIREWALL_CHECK)]],
        ),
        (
            FILTER_INPUT,
            ChainType::Filter,
            Hook::Input,
            0,
            vec![
                vec![new.clone(), jump(NODEPORT_ENDPOINTS_CHECK)],
                vec![new.clone(), jump(SERVICE_ENDPOINTS_CHECK)],
                count.clone(),
            ],
        ),
        (
            FILTER_FORWARD,
            ChainType::Filter,
            Hook::Forward,
            0,
            vec![
                vec![new.clone(), jump(SERVICE_ENDPOINTS_CHECK)],
                count.clone(),
            ],
        ),
        (
            FILTER_OUTPUT,
            ChainType::Filter,
            Hook::Output,
            0,
            vec![
                vec![new.clone(), jump(SERVICE_ENDPOINTS_CHECK)],
                count.clone(),
            ],
        ),
        (
            NAT_PREROUTING,
            ChainType::Nat,
            Hook::Prerouting,
            -100,
            vec![vec![jump(SERVICES)]],
        ),
        (
            NAT_OUTPUT,
            ChainType::Nat,
            Hook::Output,
            -100,
            vec![vec![jump(SERVICES)]],
        ),
        (
            NAT_POSTROUTING,
            ChainType::Nat,
            Hook::Postrouting,
            100,
            vec![vec![jump(MASQUERADING)]],
        ),
    ];
    for (name, kind, hook, prio, rules) in base_rules {
        chains.insert(
            name.into(),
            Chain {
                spec: base(kind, hook, prio),
                rules: rules.into_iter().map(Rule::new).collect(),
            },
        );
    }
    table.chains = chains;
    table
}

#[cfg(test)]
mod tests {
    use lb_core::IpFamily;

    use super::*;
    use crate::compile::config::NodePortAddresses;

    fn config() -> Config {
        Config {
            cluster_cidrs: vec!["10.244.0.0/16".parse().expect("literal CIDR")],
            service_cidrs: vec![
                "10.96.0.0/16".parse().expect("literal CIDR"),
                "10.96.1.0/24".parse().expect("literal CIDR"),
            ],
            nodeport_addresses: NodePortAddresses::Cidrs(vec![
                "192.168.1.0/24".parse().expect("literal CIDR"),
            ]),
            ..Config::default()
        }
    }

    /// Every chain a rule jumps or goes to, and every set or map a rule reads or updates.
    fn references(table: &Table) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut chains = BTreeSet::new();
        let mut sets = BTreeSet::new();
        for stmt in table
            .chains
            .values()
            .flat_map(|c| &c.rules)
            .flat_map(|r| &r.stmts)
        {
            match stmt {
                Stmt::Verdict(Verdict::Jump(c) | Verdict::Goto(c)) => {
                    chains.insert(c.clone());
                }
                Stmt::Lookup { set, .. } | Stmt::Dynset { set, .. } => {
                    sets.insert(set.clone());
                }
                Stmt::Vmap { map, .. } | Stmt::DnatMap { map, .. } => {
                    sets.insert(map.clone());
                }
                _ => {}
            }
        }
        (chains, sets)
    }

    #[test]
    fn the_skeleton_depends_only_on_its_inputs_and_not_on_their_order() {
        let f = Fam::new(IpFamily::V4);
        let counts: BTreeSet<_> = [(Dispatch::Ips, 2), (Dispatch::StickyNodePorts, 1)].into();
        let reversed: BTreeSet<_> = counts.iter().rev().copied().collect();
        let a = skeleton(f, &config(), &counts, &[600, 10800].into());
        let b = skeleton(f, &config(), &reversed, &[10800, 600].into());
        assert_eq!(a, b);
        assert!(a.chains.contains_key("pick-2"));
        assert!(a.chains.contains_key("nodeport-pick-sticky-1"));
        assert!(a.sets.contains_key("affinity-600") && a.sets.contains_key("affinity-10800"));
        // Service CIDRs are merged (the kernel refuses overlapping intervals).
        let cidrs: Vec<_> = a.sets[SERVICE_CIDRS].elements.keys().collect();
        assert_eq!(
            cidrs,
            [&vec![Value::Ipv4Net("10.96.0.0/16".parse().expect("CIDR"))]]
        );
    }

    #[test]
    fn without_counts_or_timeouts_there_is_no_pick_chain_and_no_affinity_object() {
        let t = skeleton(
            Fam::new(IpFamily::V6),
            &config(),
            &BTreeSet::new(),
            &BTreeSet::new(),
        );
        assert!(
            t.chains.keys().all(|c| !c.contains("pick-")),
            "{:?}",
            t.chains.keys()
        );
        assert!(t.chains.keys().all(|c| !c.starts_with("affinity")));
        assert!(t.sets.keys().all(|s| !s.starts_with("affinity")));
        // Only configuration-derived elements: no IPv6 service CIDR or node-port CIDR given.
        assert!(t.sets.values().all(|s| s.elements.is_empty()));
    }

    #[test]
    fn every_chain_and_set_a_rule_names_exists() {
        for family in [IpFamily::V4, IpFamily::V6] {
            let counts: BTreeSet<_> = [
                (Dispatch::Ips, 1),
                (Dispatch::IpsLocal, 2),
                (Dispatch::StickyNodePortsLocal, 3),
            ]
            .into();
            let t = skeleton(Fam::new(family), &config(), &counts, &[60].into());
            let (chains, sets) = references(&t);
            for c in &chains {
                assert!(t.chains.contains_key(c), "{family:?}: no chain {c}");
            }
            for s in &sets {
                assert!(t.sets.contains_key(s), "{family:?}: no set {s}");
            }
            // And every regular chain is reached from a rule, or (`pick-N`, `reject-chain`)
            // from the verdicts of map elements.
            for (name, chain) in &t.chains {
                let from_elements = name.contains("pick-") || name == REJECT_CHAIN;
                assert!(
                    chain.spec.base.is_some() || chains.contains(name) || from_elements,
                    "{family:?}: chain {name} is never jumped to"
                );
            }
        }
    }
}
