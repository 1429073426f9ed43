//! Fixtures shared by unit and netns tests: a Service-dataplane-shaped ruleset that uses every
//! construct the IR offers (it is an example layout, not the compiler's policy).

use std::time::Duration;

use super::ir::*;

fn ip(s: &str) -> Value {
    Value::Ipv4(s.parse().expect("fixture address"))
}

fn net(s: &str) -> Value {
    Value::Ipv4Net(s.parse().expect("fixture prefix"))
}

fn pd(p: Payload) -> Expr {
    Expr::Payload(p)
}

/// The fixture's table id.
pub fn table_id() -> TableId {
    TableId::new(Family::Ip, "lbt")
}

/// Key of the `service-ips` verdict map.
pub fn service_key() -> Vec<Expr> {
    vec![
        pd(Payload::IpDaddr),
        Expr::Meta(MetaKey::L4Proto),
        pd(Payload::ThDport),
    ]
}

/// Key of the `endpoints` DNAT map.
pub fn endpoint_key() -> Vec<Expr> {
    let mut k = service_key();
    k.push(Expr::NumgenRandom { modulus: 2 });
    k
}

/// A ruleset exercising sets, maps, verdict maps, DNAT maps, dynset, intervals, timeouts,
/// comments, base and regular chains.
pub fn sample_ruleset() -> Ruleset {
    let mut t = Table {
        comment: Some("lb test table".into()),
        ..Table::default()
    };

    let mut svc = Set::new(SetSpec::map(
        KeySpec::Types(vec![
            DataType::Ipv4Addr,
            DataType::InetProto,
            DataType::InetService,
        ]),
        MapData::Verdict,
    ));
    svc.spec.comment = Some("service VIPs".into());
    // Sized, as the compiler's full sync sizes its sets.
    svc.spec.size = Some(1024);
    svc.elements.insert(
        vec![ip("10.96.0.10"), Value::TCP, Value::Port(80)],
        Element::verdict(Verdict::Goto("svc-dnat".into())),
    );
    svc.elements.insert(
        vec![ip("10.96.0.11"), Value::UDP, Value::Port(53)],
        Element::verdict(Verdict::Drop),
    );
    t.sets.insert("service-ips".into(), svc);

    let mut eps = Set::new(SetSpec::map(
        KeySpec::Typeof(endpoint_key()),
        MapData::Values(KeySpec::Typeof(vec![
            pd(Payload::IpDaddr),
            pd(Payload::ThDport),
        ])),
    ));
    for (b, ep) in [(0, "10.244.1.5"), (1, "10.244.2.7")] {
        eps.elements.insert(
            vec![
                ip("10.96.0.10"),
                Value::TCP,
                Value::Port(80),
                Value::Integer(b),
            ],
            Element::values(vec![ip(ep), Value::Port(8080)]),
        );
    }
    t.sets.insert("endpoints".into(), eps);

    let mut hairpin = Set::new(SetSpec::set(vec![
        DataType::Ipv4Addr,
        DataType::Ipv4Addr,
        DataType::InetProto,
        DataType::InetService,
    ]));
    hairpin.elements.insert(
        vec![
            ip("10.244.1.5"),
            ip("10.244.1.5"),
            Value::TCP,
            Value::Port(8080),
        ],
        Element::key_only(),
    );
    t.sets.insert("hairpin".into(), hairpin);

    let mut cidrs = Set::new(SetSpec::set(vec![DataType::Ipv4Addr]));
    cidrs.spec.flags.interval = true;
    cidrs
        .elements
        .insert(vec![net("10.96.0.0/12")], Element::key_only());
    cidrs
        .elements
        .insert(vec![net("192.168.1.1/32")], Element::key_only());
    t.sets.insert("cluster-cidrs".into(), cidrs);

    let mut blocked = Set::new(SetSpec::set(vec![DataType::InetService]));
    blocked.spec.flags.constant = true;
    blocked
        .elements
        .insert(vec![Value::Port(31000)], Element::key_only());
    t.sets.insert("blocked-ports".into(), blocked);

    let mut banned = Set::new(SetSpec::set(vec![DataType::Ipv4Addr]));
    banned.spec.flags.timeout = true;
    banned.spec.timeout = Some(Duration::from_secs(600));
    banned.elements.insert(
        vec![ip("192.0.2.1")],
        Element {
            timeout: Some(Duration::from_secs(3600)),
            comment: Some("test".into()),
            data: None,
        },
    );
    t.sets.insert("banned".into(), banned);

    let mut aff = Set::new(SetSpec::map(
        KeySpec::Typeof(vec![
            pd(Payload::IpSaddr),
            Expr::Ct(CtKey::OriginalIpDaddr),
            Expr::Meta(MetaKey::L4Proto),
            Expr::Ct(CtKey::OriginalProtoDst),
        ]),
        MapData::Values(KeySpec::Typeof(vec![
            pd(Payload::IpDaddr),
            pd(Payload::ThDport),
        ])),
    ));
    aff.spec.flags.dynamic = true;
    aff.spec.flags.timeout = true;
    aff.spec.timeout = Some(Duration::from_secs(10800));
    t.sets.insert("affinity-10800".into(), aff);
    // Typed by header fields: nft parses (and lists) constants in an update's key only
    // against such a type, not against `ct original …` fields.
    let mut sticky = Set::new(SetSpec::map(
        KeySpec::Typeof(vec![
            pd(Payload::IpSaddr),
            pd(Payload::IpDaddr),
            Expr::Meta(MetaKey::L4Proto),
            pd(Payload::ThDport),
        ]),
        MapData::Values(KeySpec::Typeof(vec![
            pd(Payload::IpDaddr),
            pd(Payload::ThDport),
        ])),
    ));
    sticky.spec.flags.dynamic = true;
    sticky.spec.flags.timeout = true;
    sticky.spec.timeout = Some(Duration::from_secs(60));
    t.sets.insert("sticky-60".into(), sticky);

    let base = |kind, hook, priority| ChainSpec {
        base: Some(BaseChain {
            kind,
            hook,
            priority,
            policy: Policy::Accept,
        }),
        comment: None,
    };
    let chain = |spec: ChainSpec, rules: Vec<Rule>| Chain { spec, rules };
    let jump = |c: &str| Stmt::Verdict(Verdict::Jump(c.into()));
    t.chains.insert(
        "nat-prerouting".into(),
        chain(
            base(ChainType::Nat, Hook::Prerouting, -100),
            vec![Rule::new(vec![jump("services")])],
        ),
    );
    t.chains.insert(
        "nat-output".into(),
        chain(
            base(ChainType::Nat, Hook::Output, -100),
            vec![Rule::new(vec![jump("services")])],
        ),
    );
    t.chains.insert(
        "nat-postrouting".into(),
        chain(
            base(ChainType::Nat, Hook::Postrouting, 100),
            vec![
                Rule::new(vec![
                    Stmt::CtStatus(CtStatus::Dnat),
                    Stmt::Lookup {
                        key: vec![
                            pd(Payload::IpSaddr),
                            pd(Payload::IpDaddr),
                            Expr::Meta(MetaKey::L4Proto),
                            pd(Payload::ThDport),
                        ],
                        set: "hairpin".into(),
                        negate: false,
                    },
                    Stmt::Masquerade { fully_random: true },
                ]),
                Rule::new(vec![
                    Stmt::MarkMatch {
                        mask: 0x4000,
                        op: CmpOp::Ne,
                        value: 0,
                    },
                    Stmt::SetMark(MarkOp::Xor(0x4000)),
                    Stmt::Masquerade { fully_random: true },
                ]),
                Rule::new(vec![Stmt::Dynset {
                    op: DynsetOp::Update,
                    set: "affinity-10800".into(),
                    key: vec![
                        pd(Payload::IpSaddr),
                        Expr::Ct(CtKey::OriginalIpDaddr),
                        Expr::Meta(MetaKey::L4Proto),
                        Expr::Ct(CtKey::OriginalProtoDst),
                    ],
                    data: vec![pd(Payload::IpDaddr), pd(Payload::ThDport)],
                }]),
                // Constants in the key: one entry for another address of the service port.
                Rule::new(vec![Stmt::Dynset {
                    op: DynsetOp::Update,
                    set: "sticky-60".into(),
                    key: vec![
                        pd(Payload::IpSaddr),
                        Expr::Const(ip("192.0.2.20")),
                        Expr::Const(Value::TCP),
                        Expr::Const(Value::Port(80)),
                    ],
                    data: vec![pd(Payload::IpDaddr), pd(Payload::ThDport)],
                }]),
            ],
        ),
    );
    t.chains.insert(
        "services".into(),
        chain(
            ChainSpec {
                base: None,
                comment: Some("service dispatch".into()),
            },
            vec![
                Rule::new(vec![Stmt::Vmap {
                    key: service_key(),
                    map: "service-ips".into(),
                }]),
                Rule::new(vec![
                    Stmt::Lookup {
                        key: vec![pd(Payload::IpDaddr)],
                        set: "cluster-cidrs".into(),
                        negate: false,
                    },
                    Stmt::Match {
                        left: pd(Payload::IpSaddr),
                        op: CmpOp::Ne,
                        right: net("10.244.0.0/16"),
                    },
                    Stmt::SetMark(MarkOp::Or(0x4000)),
                ])
                .with_comment("masquerade clusterIP traffic from outside cluster"),
                Rule::new(vec![Stmt::FibLocal(FibAddr::Daddr), jump("nodeports")]),
            ],
        ),
    );
    t.chains.insert(
        "nodeports".into(),
        chain(
            ChainSpec::default(),
            vec![Rule::new(vec![
                Stmt::Match {
                    left: pd(Payload::TcpDport),
                    op: CmpOp::Eq,
                    right: Value::Port(30080),
                },
                Stmt::Counter,
                Stmt::Verdict(Verdict::Return),
            ])],
        ),
    );
    t.chains.insert(
        "svc-dnat".into(),
        chain(
            ChainSpec::default(),
            vec![Rule::new(vec![Stmt::DnatMap {
                family: NatFamily::Ip,
                key: endpoint_key(),
                map: "endpoints".into(),
            }])],
        ),
    );
    let ifname = IfName::new("eth0").expect("fixture ifname");
    t.chains.insert(
        "filter-input".into(),
        chain(
            base(ChainType::Filter, Hook::Input, 0),
            vec![
                Rule::new(vec![
                    Stmt::CtState(CtState::New),
                    Stmt::Lookup {
                        key: vec![pd(Payload::ThDport)],
                        set: "blocked-ports".into(),
                        negate: false,
                    },
                    Stmt::Reject,
                ]),
                Rule::new(vec![
                    Stmt::Match {
                        left: Expr::Meta(MetaKey::IifName),
                        op: CmpOp::Eq,
                        right: Value::IfName(ifname),
                    },
                    Stmt::Match {
                        left: pd(Payload::UdpDport),
                        op: CmpOp::Eq,
                        right: Value::Port(53),
                    },
                    Stmt::Counter,
                    Stmt::Verdict(Verdict::Drop),
                ]),
                Rule::new(vec![
                    Stmt::Match {
                        left: Expr::Meta(MetaKey::IifName),
                        op: CmpOp::Ne,
                        right: Value::IfName(IfName::prefix("veth").expect("fixture prefix")),
                    },
                    Stmt::Match {
                        left: pd(Payload::UdpDport),
                        op: CmpOp::Eq,
                        right: Value::Port(54),
                    },
                    Stmt::Verdict(Verdict::Drop),
                ]),
                Rule::new(vec![
                    Stmt::Lookup {
                        key: vec![pd(Payload::IpSaddr)],
                        set: "banned".into(),
                        negate: false,
                    },
                    Stmt::Verdict(Verdict::Drop),
                ]),
                Rule::new(vec![
                    Stmt::FibLocal(FibAddr::Saddr),
                    Stmt::Match {
                        left: pd(Payload::IpDaddr),
                        op: CmpOp::Eq,
                        right: ip("127.0.0.1"),
                    },
                    Stmt::Verdict(Verdict::Accept),
                ]),
            ],
        ),
    );
    let mut rs = Ruleset::default();
    rs.tables.insert(table_id(), t);
    rs
}

fn ip6(s: &str) -> Value {
    Value::Ipv6(s.parse().expect("fixture address"))
}

fn net6(s: &str) -> Value {
    Value::Ipv6Net(s.parse().expect("fixture prefix"))
}

/// The firewall fixture's table id for `family` (`ip` or `ip6`).
pub fn firewall_table_id(family: Family) -> TableId {
    TableId::new(family, "lbt-fw")
}

/// One `firewall-allow` key: `vip . proto . port . source range`.
pub fn firewall_key(vip: &str, proto: Value, port: u16, range: &str) -> Key {
    if vip.contains(':') {
        vec![ip6(vip), proto, Value::Port(port), net6(range)]
    } else {
        vec![ip(vip), proto, Value::Port(port), net(range)]
    }
}

/// loadBalancerSourceRanges-shaped interval sets for `family` (`ip` or `ip6`): an interval
/// concatenation `addr . inet_proto . inet_service . addr` looked up negated, and a
/// single-field interval set of node addresses. Elements cover the edges: adjacent ranges,
/// a single address (/32, /128), the whole space (/0), a range starting at address zero and
/// one ending at the top.
pub fn firewall_ruleset(family: Family) -> Ruleset {
    let v6 = family == Family::Ip6;
    let (addr, daddr, saddr) = if v6 {
        (DataType::Ipv6Addr, Payload::Ip6Daddr, Payload::Ip6Saddr)
    } else {
        (DataType::Ipv4Addr, Payload::IpDaddr, Payload::IpSaddr)
    };
    let pick = |a: &'static str, b: &'static str| if v6 { b } else { a };
    let mut t = Table::default();

    let mut ips = Set::new(SetSpec::set(vec![
        addr,
        DataType::InetProto,
        DataType::InetService,
    ]));
    let mut allow = Set::new(SetSpec::set(vec![
        addr,
        DataType::InetProto,
        DataType::InetService,
        addr,
    ]));
    allow.spec.flags.interval = true;
    allow.spec.comment = Some("vip . proto . port . allowed source range".into());
    let vip50 = pick("192.0.2.50", "2001:db8::50");
    let vip51 = pick("192.0.2.51", "2001:db8::51");
    let vip52 = pick("192.0.2.52", "2001:db8::52");
    for (vip, proto, port, range) in [
        (
            vip50,
            Value::TCP,
            80,
            pick("10.100.0.0/24", "fd00:100::/64"),
        ),
        (
            vip50,
            Value::TCP,
            80,
            pick("10.100.1.0/24", "fd00:100:0:1::/64"),
        ),
        (
            vip50,
            Value::TCP,
            80,
            pick("172.16.0.0/12", "fd00:200::/40"),
        ),
        (
            vip50,
            Value::UDP,
            80,
            pick("10.100.0.0/16", "fd00:100::/48"),
        ),
        (vip51, Value::UDP, 53, pick("10.0.0.1/32", "fd00::1/128")),
        (vip52, Value::TCP, 443, pick("0.0.0.0/0", "::/0")),
    ] {
        let key = firewall_key(vip, proto, port, range);
        ips.elements.insert(key[..3].to_vec(), Element::key_only());
        allow.elements.insert(key, Element::key_only());
    }
    t.sets.insert("firewall-ips".into(), ips);
    t.sets.insert("firewall-allow".into(), allow);

    let mut np = Set::new(SetSpec::set(vec![addr]));
    np.spec.flags.interval = true;
    for n in if v6 {
        [
            "::/64",
            "fd00:1::/64",
            "fd00:1:0:1::/64",
            "2001:db8::7/128",
            "ffff::/16",
        ]
    } else {
        [
            "0.0.0.0/8",
            "10.0.0.0/24",
            "10.0.1.0/24",
            "192.168.5.5/32",
            "255.255.255.255/32",
        ]
    } {
        let v = if v6 { net6(n) } else { net(n) };
        np.elements.insert(vec![v], Element::key_only());
    }
    t.sets.insert("nodeport-ips".into(), np);

    let key3 = vec![
        Expr::Payload(daddr),
        Expr::Meta(MetaKey::L4Proto),
        Expr::Payload(Payload::ThDport),
    ];
    let mut key4 = key3.clone();
    key4.push(Expr::Payload(saddr));
    t.chains.insert(
        "firewall-check".into(),
        Chain {
            spec: ChainSpec::default(),
            rules: vec![Rule::new(vec![
                Stmt::Lookup {
                    key: key3,
                    set: "firewall-ips".into(),
                    negate: false,
                },
                Stmt::Lookup {
                    key: key4,
                    set: "firewall-allow".into(),
                    negate: true,
                },
                Stmt::Verdict(Verdict::Drop),
            ])],
        },
    );
    t.chains.insert(
        "filter-prerouting".into(),
        Chain {
            spec: ChainSpec {
                base: Some(BaseChain {
                    kind: ChainType::Filter,
                    hook: Hook::Prerouting,
                    priority: -110,
                    policy: Policy::Accept,
                }),
                comment: None,
            },
            rules: vec![
                Rule::new(vec![Stmt::Verdict(Verdict::Jump("firewall-check".into()))]),
                Rule::new(vec![
                    Stmt::Lookup {
                        key: vec![Expr::Payload(daddr)],
                        set: "nodeport-ips".into(),
                        negate: false,
                    },
                    Stmt::Counter,
                ]),
            ],
        },
    );
    let mut rs = Ruleset::default();
    rs.tables.insert(firewall_table_id(family), t);
    rs
}

/// The fixture's IPv6 table id.
pub fn table_id_v6() -> TableId {
    TableId::new(Family::Ip6, "lbt6")
}

/// An `ip6` table shaped like the compiler's: typeof maps whose data is `ip6 daddr . th
/// dport`, DNAT maps, verdict maps, an interval set, affinity with a dynset update keyed by
/// `ip6 saddr . ct original ip6 daddr . …`, masquerade, reject and fib.
pub fn sample_ruleset_v6() -> Ruleset {
    let mut t = Table::default();
    let ep_data = || {
        MapData::Values(KeySpec::Typeof(vec![
            pd(Payload::Ip6Daddr),
            pd(Payload::ThDport),
        ]))
    };
    let svc_key = vec![
        pd(Payload::Ip6Daddr),
        Expr::Meta(MetaKey::L4Proto),
        pd(Payload::ThDport),
    ];
    let mut ep_key = svc_key.clone();
    ep_key.push(Expr::NumgenRandom { modulus: 2 });
    let np_key = vec![
        Expr::Meta(MetaKey::L4Proto),
        pd(Payload::ThDport),
        Expr::NumgenRandom { modulus: 1 },
    ];
    let aff_key = vec![
        pd(Payload::Ip6Saddr),
        Expr::Ct(CtKey::OriginalIp6Daddr),
        Expr::Meta(MetaKey::L4Proto),
        Expr::Ct(CtKey::OriginalProtoDst),
    ];
    let aff_lookup_key = vec![
        Expr::Ct(CtKey::OriginalIp6Daddr),
        Expr::Meta(MetaKey::L4Proto),
        Expr::Ct(CtKey::OriginalProtoDst),
    ];

    let mut svc = Set::new(SetSpec::map(
        KeySpec::Types(vec![
            DataType::Ipv6Addr,
            DataType::InetProto,
            DataType::InetService,
        ]),
        MapData::Verdict,
    ));
    svc.elements.insert(
        vec![ip6("fd00:96::10"), Value::TCP, Value::Port(80)],
        Element::verdict(Verdict::Goto("svc-dnat".into())),
    );
    svc.elements.insert(
        vec![ip6("fd00:96::11"), Value::UDP, Value::Port(53)],
        Element::verdict(Verdict::Drop),
    );
    t.sets.insert("service-ips".into(), svc);

    let mut eps = Set::new(SetSpec::map(KeySpec::Typeof(ep_key.clone()), ep_data()));
    for (b, ep) in [(0, "fd00:244:1::5"), (1, "fd00:244:2::7")] {
        eps.elements.insert(
            vec![
                ip6("fd00:96::10"),
                Value::TCP,
                Value::Port(80),
                Value::Integer(b),
            ],
            Element::values(vec![ip6(ep), Value::Port(8080)]),
        );
    }
    t.sets.insert("endpoints".into(), eps);

    let mut np = Set::new(SetSpec::map(KeySpec::Typeof(np_key.clone()), ep_data()));
    np.elements.insert(
        vec![Value::TCP, Value::Port(30080), Value::Integer(0)],
        Element::values(vec![ip6("fd00:244:1::5"), Value::Port(8080)]),
    );
    t.sets.insert("nodeport-endpoints".into(), np);

    let mut cidrs = Set::new(SetSpec::set(vec![DataType::Ipv6Addr]));
    cidrs.spec.flags.interval = true;
    cidrs
        .elements
        .insert(vec![net6("fd00:96::/108")], Element::key_only());
    cidrs
        .elements
        .insert(vec![net6("2001:db8::1/128")], Element::key_only());
    t.sets.insert("cluster-cidrs".into(), cidrs);

    let mut aff = Set::new(SetSpec::map(KeySpec::Typeof(aff_key.clone()), ep_data()));
    aff.spec.flags.dynamic = true;
    aff.spec.flags.timeout = true;
    aff.spec.timeout = Some(Duration::from_secs(10800));
    t.sets.insert("affinity-10800".into(), aff);
    let mut aff_keys = Set::new(SetSpec {
        key: KeySpec::Typeof(aff_lookup_key.clone()),
        data: None,
        flags: SetFlags::default(),
        timeout: None,
        size: None,
        comment: None,
    });
    aff_keys.elements.insert(
        vec![ip6("fd00:96::10"), Value::TCP, Value::Port(80)],
        Element::key_only(),
    );
    t.sets.insert("affinity-keys-10800".into(), aff_keys);

    let base = |kind, hook, priority| ChainSpec {
        base: Some(BaseChain {
            kind,
            hook,
            priority,
            policy: Policy::Accept,
        }),
        comment: None,
    };
    let chain = |spec: ChainSpec, rules: Vec<Rule>| Chain { spec, rules };
    let jump = |c: &str| Stmt::Verdict(Verdict::Jump(c.into()));
    t.chains.insert(
        "nat-prerouting".into(),
        chain(
            base(ChainType::Nat, Hook::Prerouting, -100),
            vec![Rule::new(vec![jump("services")])],
        ),
    );
    t.chains.insert(
        "services".into(),
        chain(
            ChainSpec::default(),
            vec![
                Rule::new(vec![Stmt::DnatMap {
                    family: NatFamily::Ip6,
                    key: vec![
                        pd(Payload::Ip6Saddr),
                        pd(Payload::Ip6Daddr),
                        Expr::Meta(MetaKey::L4Proto),
                        pd(Payload::ThDport),
                    ],
                    map: "affinity-10800".into(),
                }])
                .with_comment("ClientIP affinity"),
                Rule::new(vec![Stmt::Vmap {
                    key: svc_key,
                    map: "service-ips".into(),
                }]),
                Rule::new(vec![
                    Stmt::Lookup {
                        key: vec![pd(Payload::Ip6Daddr)],
                        set: "cluster-cidrs".into(),
                        negate: false,
                    },
                    Stmt::Match {
                        left: pd(Payload::Ip6Saddr),
                        op: CmpOp::Ne,
                        right: net6("fd00:244::/32"),
                    },
                    Stmt::SetMark(MarkOp::Or(0x4000)),
                ]),
                Rule::new(vec![Stmt::FibLocal(FibAddr::Daddr), jump("nodeports")]),
            ],
        ),
    );
    t.chains.insert(
        "nodeports".into(),
        chain(
            ChainSpec::default(),
            vec![Rule::new(vec![Stmt::DnatMap {
                family: NatFamily::Ip6,
                key: np_key,
                map: "nodeport-endpoints".into(),
            }])],
        ),
    );
    t.chains.insert(
        "svc-dnat".into(),
        chain(
            ChainSpec::default(),
            vec![Rule::new(vec![Stmt::DnatMap {
                family: NatFamily::Ip6,
                key: ep_key,
                map: "endpoints".into(),
            }])],
        ),
    );
    t.chains.insert(
        "nat-postrouting".into(),
        chain(
            base(ChainType::Nat, Hook::Postrouting, 100),
            vec![Rule::new(vec![
                Stmt::MarkMatch {
                    mask: 0x4000,
                    op: CmpOp::Ne,
                    value: 0,
                },
                Stmt::SetMark(MarkOp::Xor(0x4000)),
                Stmt::Masquerade { fully_random: true },
            ])],
        ),
    );
    t.chains.insert(
        "affinity-record".into(),
        chain(
            base(ChainType::Filter, Hook::Postrouting, 99),
            vec![Rule::new(vec![
                Stmt::CtState(CtState::New),
                Stmt::CtStatus(CtStatus::Dnat),
                Stmt::Lookup {
                    key: aff_lookup_key,
                    set: "affinity-keys-10800".into(),
                    negate: false,
                },
                Stmt::Dynset {
                    op: DynsetOp::Update,
                    set: "affinity-10800".into(),
                    key: aff_key,
                    data: vec![pd(Payload::Ip6Daddr), pd(Payload::ThDport)],
                },
            ])],
        ),
    );
    t.chains.insert(
        "filter-input".into(),
        chain(
            base(ChainType::Filter, Hook::Input, 0),
            vec![
                Rule::new(vec![
                    Stmt::CtState(CtState::New),
                    Stmt::Match {
                        left: Expr::Ct(CtKey::OriginalIp6Daddr),
                        op: CmpOp::Eq,
                        right: ip6("fd00:96::11"),
                    },
                    Stmt::Reject,
                ]),
                Rule::new(vec![
                    Stmt::FibLocal(FibAddr::Saddr),
                    Stmt::Match {
                        left: pd(Payload::Ip6Daddr),
                        op: CmpOp::Eq,
                        right: ip6("::1"),
                    },
                    Stmt::Verdict(Verdict::Accept),
                ]),
            ],
        ),
    );
    let mut rs = Ruleset::default();
    rs.tables.insert(table_id_v6(), t);
    rs
}
