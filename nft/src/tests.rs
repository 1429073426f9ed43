//! Unit tests for render, diff, the fake backend and the JSON reader.

use std::time::Duration;

use super::diff::diff;
use super::fake::Fake;
use super::ir::*;
use super::json::{from_nft_json, json_view};
use super::render;
use super::testing::{
    firewall_key, firewall_ruleset, firewall_table_id, sample_ruleset, sample_ruleset_v6, table_id,
};
use super::{ApplyError, Backend, Command, Transaction};

fn ip(s: &str) -> Value {
    Value::Ipv4(s.parse().expect("test address"))
}

fn applied(rs: &Ruleset) -> Fake {
    let mut f = Fake::default();
    f.apply(&Transaction::create(rs)).expect("create sample");
    f
}

fn svc_key(vip: &str, port: u16) -> Key {
    vec![ip(vip), Value::TCP, Value::Port(port)]
}

#[test]
fn durations_render_like_nft() {
    assert_eq!(render::duration(Duration::from_secs(10800)), "3h");
    assert_eq!(render::duration(Duration::from_secs(5400)), "1h30m");
    assert_eq!(render::duration(Duration::from_millis(1500)), "1s500ms");
}

#[test]
fn transaction_renders_every_verb_as_one_nft_line() {
    let t = table_id();
    let spec = SetSpec::map(
        KeySpec::Types(vec![
            DataType::Ipv4Addr,
            DataType::InetProto,
            DataType::InetService,
        ]),
        MapData::Verdict,
    );
    let tx = Transaction {
        commands: vec![
            Command::AddTable {
                table: t.clone(),
                comment: Some("c".into()),
            },
            Command::AddChain {
                table: t.clone(),
                chain: "pre".into(),
                spec: ChainSpec {
                    base: Some(BaseChain {
                        kind: ChainType::Nat,
                        hook: Hook::Prerouting,
                        priority: -100,
                        policy: Policy::Accept,
                    }),
                    comment: None,
                },
            },
            Command::AddSet {
                table: t.clone(),
                set: "svc".into(),
                spec,
            },
            Command::AddElements {
                table: t.clone(),
                set: "svc".into(),
                elements: vec![(svc_key("10.0.0.1", 80), Element::verdict(Verdict::Drop))],
            },
            Command::DeleteElements {
                table: t.clone(),
                set: "svc".into(),
                keys: vec![svc_key("10.0.0.1", 80)],
            },
            Command::FlushChain {
                table: t.clone(),
                chain: "pre".into(),
            },
            Command::AddRule {
                table: t.clone(),
                chain: "pre".into(),
                rule: Rule::new(vec![Stmt::Vmap {
                    key: super::testing::service_key(),
                    map: "svc".into(),
                }])
                .with_comment("dispatch"),
            },
            Command::FlushSet {
                table: t.clone(),
                set: "svc".into(),
                map: true,
            },
            Command::DeleteSet {
                table: t.clone(),
                set: "svc".into(),
                map: true,
            },
            Command::DeleteChain {
                table: t.clone(),
                chain: "pre".into(),
            },
            Command::DeleteTable { table: t },
        ],
    };
    let want = "\
add table ip lbt { comment \"c\"; }
add chain ip lbt pre { type nat hook prerouting priority -100; policy accept; }
add map ip lbt svc { type ipv4_addr . inet_proto . inet_service : verdict; }
create element ip lbt svc { 10.0.0.1 . tcp . 80 : drop }
delete element ip lbt svc { 10.0.0.1 . tcp . 80 }
flush chain ip lbt pre
add rule ip lbt pre ip daddr . meta l4proto . th dport vmap @svc comment \"dispatch\"
flush map ip lbt svc
delete map ip lbt svc
delete chain ip lbt pre
delete table ip lbt
";
    assert_eq!(tx.to_nft(), want);
}

#[test]
fn rules_render_with_nft_syntax() {
    let rs = sample_ruleset();
    let text = rs.to_nft();
    for line in [
        "\t\ttypeof ip daddr . meta l4proto . th dport . numgen random mod 2 : ip daddr . th dport\n",
        "\t\tflags timeout,dynamic\n\t\ttimeout 3h\n",
        "\t\tdnat ip to ip daddr . meta l4proto . th dport . numgen random mod 2 map @endpoints\n",
        "\t\tct status dnat ip saddr . ip daddr . meta l4proto . th dport @hairpin masquerade fully-random\n",
        "\t\tmeta mark & 0x00004000 != 0x00000000 meta mark set meta mark ^ 0x00004000 masquerade fully-random\n",
        "\t\tupdate @affinity-10800 { ip saddr . ct original ip daddr . meta l4proto . ct original proto-dst : ip daddr . th dport }\n",
        "\t\tupdate @sticky-60 { ip saddr . 192.0.2.20 . 6 . 80 : ip daddr . th dport }\n",
        "\t\tct state new th dport @blocked-ports reject\n",
        "\t\tiifname \"eth0\" udp dport 53 counter drop\n",
        "\t\tiifname != \"veth*\" udp dport 54 drop\n",
        "\t\telements = { 192.0.2.1 timeout 1h comment \"test\" }\n",
        "\t\tfib saddr type local ip daddr 127.0.0.1 accept\n",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

#[test]
fn diff_of_identical_rulesets_is_empty() {
    let rs = sample_ruleset();
    assert!(diff(&rs, &rs).is_empty());
}

#[test]
fn create_then_diff_reaches_the_desired_ruleset_on_the_fake() {
    let rs = sample_ruleset();
    let f = applied(&rs);
    assert_eq!(f.ruleset, rs);
}

#[test]
fn changed_element_data_is_one_delete_and_one_add_of_that_element_only() {
    let rs = sample_ruleset();
    let mut want = rs.clone();
    let t = want.tables.get_mut(&table_id()).expect("table");
    let k = svc_key("10.96.0.10", 80);
    t.sets
        .get_mut("service-ips")
        .expect("map")
        .elements
        .insert(k.clone(), Element::verdict(Verdict::Drop));
    let tx = diff(&rs, &want);
    assert_eq!(
        tx.commands,
        vec![
            Command::DeleteElements {
                table: table_id(),
                set: "service-ips".into(),
                keys: vec![k.clone()]
            },
            Command::AddElements {
                table: table_id(),
                set: "service-ips".into(),
                elements: vec![(k, Element::verdict(Verdict::Drop))],
            },
        ]
    );
    let mut f = applied(&rs);
    f.apply(&tx).expect("apply delta");
    assert_eq!(f.ruleset, want);
}

#[test]
fn changed_rules_flush_and_rewrite_only_that_chain() {
    let rs = sample_ruleset();
    let mut want = rs.clone();
    let t = want.tables.get_mut(&table_id()).expect("table");
    t.chains
        .get_mut("nodeports")
        .expect("chain")
        .rules
        .push(Rule::new(vec![Stmt::Verdict(Verdict::Drop)]));
    let tx = diff(&rs, &want);
    assert_eq!(tx.commands.len(), 3, "{}", tx.to_nft());
    assert_eq!(
        tx.commands[0],
        Command::FlushChain {
            table: table_id(),
            chain: "nodeports".into()
        }
    );
    let mut f = applied(&rs);
    f.apply(&tx).expect("apply");
    assert_eq!(f.ruleset, want);
}

#[test]
fn removed_chain_and_set_are_deleted_after_their_references() {
    let rs = sample_ruleset();
    let mut want = rs.clone();
    let t = want.tables.get_mut(&table_id()).expect("table");
    // Drop the DNAT chain, its map, and the verdict element pointing at it.
    t.chains.remove("svc-dnat");
    t.sets.remove("endpoints");
    t.sets
        .get_mut("service-ips")
        .expect("map")
        .elements
        .remove(&svc_key("10.96.0.10", 80));
    let tx = diff(&rs, &want);
    let mut f = applied(&rs);
    f.apply(&tx)
        .unwrap_or_else(|e| panic!("{e}\n{}", tx.to_nft()));
    assert_eq!(f.ruleset, want);
    // And back again.
    f.apply(&diff(&want, &rs)).expect("re-create");
    assert_eq!(f.ruleset, rs);
}

#[test]
fn changed_set_spec_recreates_the_set_and_rewrites_referencing_chains() {
    let rs = sample_ruleset();
    let mut want = rs.clone();
    let t = want.tables.get_mut(&table_id()).expect("table");
    t.sets.get_mut("hairpin").expect("set").spec.comment = Some("now with a comment".into());
    let tx = diff(&rs, &want);
    let text = tx.to_nft();
    assert!(
        text.contains("flush chain ip lbt nat-postrouting"),
        "{text}"
    );
    assert!(text.contains("delete set ip lbt hairpin"), "{text}");
    let mut f = applied(&rs);
    f.apply(&tx).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(f.ruleset, want);
}

fn expect_invalid(f: &mut Fake, tx: Transaction, needle: &str) {
    let before = f.ruleset.clone();
    match f.apply(&tx) {
        Err(ApplyError::Invalid { reason, .. }) => {
            let reason = reason.to_string();
            assert!(reason.contains(needle), "{reason}")
        }
        other => panic!("expected invalid ({needle}), got {other:?}"),
    }
    assert_eq!(f.ruleset, before, "a failed apply must change nothing");
}

#[test]
fn fake_rejects_a_rule_referencing_an_unknown_set() {
    let mut f = applied(&sample_ruleset());
    let rule = Rule::new(vec![Stmt::Lookup {
        key: vec![Expr::Payload(Payload::IpSaddr)],
        set: "nope".into(),
        negate: false,
    }]);
    let tx = Transaction {
        commands: vec![Command::AddRule {
            table: table_id(),
            chain: "services".into(),
            rule,
        }],
    };
    expect_invalid(&mut f, tx, "does not exist");
}

#[test]
fn fake_rejects_an_element_with_the_wrong_arity() {
    let mut f = applied(&sample_ruleset());
    let tx = Transaction {
        commands: vec![Command::AddElements {
            table: table_id(),
            set: "hairpin".into(),
            elements: vec![(vec![ip("1.2.3.4")], Element::key_only())],
        }],
    };
    expect_invalid(&mut f, tx, "values for a 4-field type");
}

#[test]
fn fake_rejects_adding_an_existing_element_and_rolls_back_the_whole_transaction() {
    let mut f = applied(&sample_ruleset());
    let new = (svc_key("10.96.0.99", 80), Element::verdict(Verdict::Drop));
    let dup = (svc_key("10.96.0.10", 80), Element::verdict(Verdict::Drop));
    let tx = Transaction {
        commands: vec![
            Command::AddElements {
                table: table_id(),
                set: "service-ips".into(),
                elements: vec![new],
            },
            Command::AddElements {
                table: table_id(),
                set: "service-ips".into(),
                elements: vec![dup],
            },
        ],
    };
    expect_invalid(&mut f, tx, "already exists");
}

#[test]
fn fake_rejects_deleting_what_does_not_exist() {
    let mut f = applied(&sample_ruleset());
    let tx = Transaction {
        commands: vec![Command::DeleteElements {
            table: table_id(),
            set: "service-ips".into(),
            keys: vec![svc_key("10.1.1.1", 1)],
        }],
    };
    expect_invalid(&mut f, tx, "does not exist");
    let tx = Transaction {
        commands: vec![Command::DeleteChain {
            table: table_id(),
            chain: "x".into(),
        }],
    };
    expect_invalid(&mut f, tx, "no chain");
}

#[test]
fn fake_rejects_deleting_a_chain_still_referenced_by_a_verdict_element() {
    let mut f = applied(&sample_ruleset());
    let tx = Transaction {
        commands: vec![
            Command::FlushChain {
                table: table_id(),
                chain: "svc-dnat".into(),
            },
            Command::DeleteChain {
                table: table_id(),
                chain: "svc-dnat".into(),
            },
        ],
    };
    expect_invalid(&mut f, tx, "still referenced");
}

#[test]
fn fake_rejects_a_goto_to_a_missing_chain_in_a_verdict_map() {
    let mut f = applied(&sample_ruleset());
    let tx = Transaction {
        commands: vec![Command::AddElements {
            table: table_id(),
            set: "service-ips".into(),
            elements: vec![(
                svc_key("10.9.9.9", 80),
                Element::verdict(Verdict::Goto("gone".into())),
            )],
        }],
    };
    expect_invalid(&mut f, tx, "chain gone does not exist");
}

#[test]
fn json_reader_parses_an_nft_1_0_6_listing() {
    // Abridged from `nft -j list ruleset` (nft 1.0.6) of the sample ruleset.
    let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
 {"table": {"family": "ip", "name": "lbt", "handle": 8}},
 {"map": {"family": "ip", "name": "service-ips", "table": "lbt", "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 7, "comment": "svc", "map": "verdict", "elem": [[{"concat": ["10.96.0.10", "tcp", 80]}, {"goto": {"target": "svc-dnat"}}]]}},
 {"set": {"family": "ip", "name": "cidrs", "table": "lbt", "type": "ipv4_addr", "handle": 9, "flags": ["interval"], "elem": [{"prefix": {"addr": "10.0.0.0", "len": 8}}, "192.168.1.1"]}},
 {"chain": {"family": "ip", "table": "lbt", "name": "svc-dnat", "handle": 1}},
 {"chain": {"family": "ip", "table": "lbt", "name": "post", "handle": 3, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}},
 {"rule": {"family": "ip", "table": "lbt", "chain": "post", "handle": 22, "expr": [{"match": {"op": "!=", "left": {"&": [{"meta": {"key": "mark"}}, 16384]}, "right": 0}}, {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"^": [{"meta": {"key": "mark"}}, 16384]}}}, {"masquerade": {"flags": "fully-random"}}]}},
 {"rule": {"family": "ip", "table": "lbt", "chain": "post", "handle": 24, "expr": ["update @aff { ip saddr . ct original ip daddr . meta l4proto . ct original proto-dst : ip daddr . th dport }"]}},
 {"rule": {"family": "ip", "table": "lbt", "chain": "post", "handle": 26, "expr": ["update @aff { ip saddr . 10.96.0.53 . udp . 53 : ip daddr . th dport }"]}},
 {"rule": {"family": "ip", "table": "lbt", "chain": "post", "handle": 25, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 80}}, {"counter": {"packets": 3, "bytes": 180}}, {"accept": null}]}}
]}"#;
    let rs = from_nft_json(json).expect("parse");
    let t = &rs.tables[&table_id()];
    assert_eq!(
        t.sets["service-ips"].elements[&svc_key("10.96.0.10", 80)],
        Element::verdict(Verdict::Goto("svc-dnat".into()))
    );
    let cidrs: Vec<&Key> = t.sets["cidrs"].elements.keys().collect();
    assert_eq!(cidrs.len(), 2);
    assert!(cidrs.iter().all(|k| k[0].is_prefix()));
    let post = &t.chains["post"];
    assert_eq!(post.rules[0].stmts[1], Stmt::SetMark(MarkOp::Xor(0x4000)));
    assert!(
        matches!(&post.rules[1].stmts[0], Stmt::Dynset { key, data, .. } if key.len() == 4 && data.len() == 2)
    );
    // Constants in an update's key: an address, a protocol listed by name, a port.
    assert!(
        matches!(&post.rules[2].stmts[0], Stmt::Dynset { key, .. } if key[1..] == [
            Expr::Const(Value::Ipv4("10.96.0.53".parse().expect("address"))),
            Expr::Const(Value::UDP),
            Expr::Const(Value::Port(53)),
        ]),
        "{:?}",
        post.rules[2]
    );
    let counters = super::json::counters(json).expect("counters");
    assert_eq!(counters, vec![(table_id(), "post".to_owned(), 3, 3, 180)]);
    // json_view of an IR is a fixed point of what the reader can produce.
    assert_eq!(json_view(&rs), rs);
}

fn add_allow(family: Family, key: Key) -> Transaction {
    Transaction {
        commands: vec![Command::AddElements {
            table: firewall_table_id(family),
            set: "firewall-allow".into(),
            elements: vec![(key, Element::key_only())],
        }],
    }
}

#[test]
fn fake_applies_interval_concatenations_and_the_ip6_sample() {
    for rs in [
        firewall_ruleset(Family::Ip),
        firewall_ruleset(Family::Ip6),
        sample_ruleset_v6(),
    ] {
        assert_eq!(applied(&rs).ruleset, rs);
    }
}

#[test]
fn fake_rejects_a_prefix_outside_the_last_field_of_an_interval_key() {
    let mut f = applied(&firewall_ruleset(Family::Ip));
    let mut key = firewall_key("192.0.2.60", Value::TCP, 80, "10.0.0.0/8");
    key[0] = Value::Ipv4Net("192.0.2.0/24".parse().expect("test prefix"));
    expect_invalid(&mut f, add_allow(Family::Ip, key), "only the last field");
    let mut key = firewall_key("192.0.2.60", Value::TCP, 80, "10.0.0.0/8");
    key[3] = ip("10.0.0.1");
    expect_invalid(&mut f, add_allow(Family::Ip, key), "end with a prefix");
}

#[test]
fn fake_rejects_overlapping_ranges_like_the_kernel_but_accepts_adjacent_ones() {
    let mut f = applied(&firewall_ruleset(Family::Ip));
    // 10.100.0.0/24 is there: a wider range over it, or a narrower one inside it, overlaps.
    for over in ["10.100.0.0/16", "10.100.0.128/25"] {
        let key = firewall_key("192.0.2.50", Value::TCP, 80, over);
        expect_invalid(&mut f, add_allow(Family::Ip, key), "overlaps");
    }
    // Same range under other exact fields, and the adjacent range, are fine.
    let other_port = firewall_key("192.0.2.50", Value::TCP, 8080, "10.100.0.0/16");
    f.apply(&add_allow(Family::Ip, other_port))
        .expect("another port is another range");
    let adjacent = firewall_key("192.0.2.50", Value::TCP, 80, "10.100.2.0/24");
    f.apply(&add_allow(Family::Ip, adjacent))
        .expect("adjacent ranges do not overlap");
    // Two overlapping ranges in one command are refused too.
    let tx = Transaction {
        commands: vec![Command::AddElements {
            table: firewall_table_id(Family::Ip6),
            set: "nodeport-ips".into(),
            elements: vec![
                (
                    vec![Value::Ipv6Net("fd00:9::/32".parse().expect("p"))],
                    Element::key_only(),
                ),
                (
                    vec![Value::Ipv6Net("fd00:9:1::/48".parse().expect("p"))],
                    Element::key_only(),
                ),
            ],
        }],
    };
    let mut f6 = applied(&firewall_ruleset(Family::Ip6));
    expect_invalid(&mut f6, tx, "overlaps");
}

#[test]
fn interval_flag_needs_an_address_as_the_last_key_field() {
    let mut spec = SetSpec::set(vec![DataType::Ipv4Addr, DataType::InetService]);
    spec.flags.interval = true;
    let err = super::validate::set_spec(&spec, Family::Ip).expect_err("port ranges");
    assert!(
        matches!(
            err,
            super::validate::CheckError::IntervalKeyNotAddress { .. }
        ),
        "{err}"
    );
    spec.key = KeySpec::Types(vec![DataType::InetService, DataType::Ipv4Addr]);
    super::validate::set_spec(&spec, Family::Ip).expect("address last");
}

#[test]
fn interval_concatenation_renders_with_add_and_loads_the_listing_back() {
    let rs = firewall_ruleset(Family::Ip);
    let text = Transaction::create(&rs).to_nft();
    assert!(
        text.contains("add set ip lbt-fw firewall-allow { type ipv4_addr . inet_proto . inet_service . ipv4_addr; flags interval;"),
        "{text}"
    );
    assert!(
        text.contains(
            "add element ip lbt-fw firewall-allow { 192.0.2.50 . tcp . 80 . 10.100.0.0/24, "
        ),
        "{text}"
    );
    assert!(
        text.contains("ip daddr . meta l4proto . th dport . ip saddr != @firewall-allow drop"),
        "{text}"
    );
    // Captured from `nft -j list set` (nft 1.0.6): a /32 in the last field is listed as an
    // address, and only the last field of an interval key is read as a prefix.
    let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
 {"set": {"family": "ip", "name": "firewall-allow", "table": "lbt-fw", "type": ["ipv4_addr", "inet_proto", "inet_service", "ipv4_addr"], "handle": 1, "flags": ["interval"], "elem": [{"concat": ["192.0.2.50", "tcp", 80, {"prefix": {"addr": "10.100.0.0", "len": 24}}]}, {"concat": ["192.0.2.51", "udp", 53, "10.0.0.1"]}]}}]}"#;
    let listed = from_nft_json(json).expect("parse");
    let keys: Vec<&Key> = listed.tables[&firewall_table_id(Family::Ip)].sets["firewall-allow"]
        .elements
        .keys()
        .collect();
    assert_eq!(
        keys,
        vec![
            &firewall_key("192.0.2.50", Value::TCP, 80, "10.100.0.0/24"),
            &firewall_key("192.0.2.51", Value::UDP, 53, "10.0.0.1/32"),
        ]
    );
}

/// The error chain as the binary prints it (`main` formats an `anyhow::Error` with `{:#}`).
fn chain(e: ApplyError) -> String {
    format!("{:#}", anyhow::Error::from(e))
}

#[test]
fn apply_errors_print_their_os_error_exactly_once_in_the_chain() {
    // Issue 8: a kernel rejection printed `…: File exists (os error 17): File exists (os
    // error 17)`, the cause being both in the message and the source.
    let eexist = || std::io::Error::from_raw_os_error(libc::EEXIST);
    let os_text = eexist().to_string();
    let errors = [
        ApplyError::Kernel {
            index: 3,
            command: "add element ip lb services { 10.0.0.1 }".into(),
            source: eexist(),
        },
        ApplyError::Batch(eexist()),
        ApplyError::Netlink {
            step: "dump",
            source: eexist(),
        },
    ];
    for e in errors {
        let text = chain(e);
        assert_eq!(text.matches(&os_text).count(), 1, "{text}");
    }
}

#[test]
fn an_invalid_command_prints_the_command_and_its_reason_once() {
    let mut f = applied(&sample_ruleset());
    let tx = Transaction {
        commands: vec![Command::AddElements {
            table: table_id(),
            set: "service-ips".into(),
            elements: vec![(
                svc_key("10.9.9.9", 80),
                Element::verdict(Verdict::Goto("gone".into())),
            )],
        }],
    };
    let text = chain(f.apply(&tx).expect_err("goto to a missing chain"));
    assert!(
        text.starts_with("command 0 `create element ip lbt service-ips "),
        "{text}"
    );
    assert_eq!(
        text.matches("chain gone does not exist").count(),
        1,
        "{text}"
    );
}

#[test]
fn json_reader_errors_say_what_was_unsupported_or_missing() {
    use super::json::JsonError;
    assert!(matches!(
        from_nft_json("{not json"),
        Err(JsonError::Syntax(_))
    ));
    let arp = r#"{"nftables": [{"table": {"family": "arp", "name": "t", "handle": 1}}]}"#;
    match from_nft_json(arp) {
        Err(JsonError::Unsupported { what, value }) => {
            assert_eq!((what, &*value), ("family", "arp"))
        }
        other => panic!("expected an unsupported family, got {other:?}"),
    }
    let nameless = r#"{"nftables": [{"table": {"family": "ip", "handle": 1}}]}"#;
    match from_nft_json(nameless) {
        Err(JsonError::Missing { field, .. }) => assert_eq!(field, "name"),
        other => panic!("expected a missing name, got {other:?}"),
    }
}
