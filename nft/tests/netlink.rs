//! Netlink backend tests inside throwaway network namespaces (run as root; never skipped).
//!
//! Each test creates `lbt-<pid>-<n>` with `ip netns add`, programs it over netlink from a
//! thread that entered it, reads it back with `nft -j list ruleset` inside it, and deletes it
//! on drop (also on panic). The root namespace is never touched.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command as Proc, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use lb_nft::diff::diff;
use lb_nft::fake::{Fake, StateError};
use lb_nft::ir::*;
use lb_nft::json::{from_nft_json, json_view};
use lb_nft::netlink::encode::tuple_bytes;
use lb_nft::netlink::{Netlink, enter_netns};
use lb_nft::testing::{
    firewall_key, firewall_ruleset, firewall_table_id, sample_ruleset, sample_ruleset_v6, table_id,
};
use lb_nft::{ApplyError, Backend, Command, InvalidCommand, Transaction};

/// A network namespace deleted on drop.
struct NetNs {
    name: String,
}

/// Deletes the namespaces of earlier runs of this suite that were killed before their
/// guards dropped: `lbt-<pid>-<n>` whose process is gone. Others' namespaces never match.
fn remove_stale_namespaces() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((pid, n)) = name.strip_prefix("lbt-").and_then(|r| r.split_once('-')) else {
            continue;
        };
        let ours = pid.parse::<u32>().is_ok() && n.parse::<u32>().is_ok();
        if ours && !std::path::Path::new("/proc").join(pid).exists() {
            let _ = Proc::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

impl NetNs {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        static STALE: std::sync::Once = std::sync::Once::new();
        STALE.call_once(remove_stale_namespaces);
        let name = format!(
            "lbt-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let st = Proc::new("ip").args(["netns", "add", &name]).status();
        assert!(
            matches!(st, Ok(s) if s.success()),
            "`ip netns add {name}` failed ({st:?}): these tests need root and iproute2"
        );
        Self { name }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread that entered the namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                enter_netns(&path).expect("setns into the test namespace");
                f()
            })
            .join()
            .expect("netns thread panicked")
        })
    }

    fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        use std::io::Write;
        let mut child = Proc::new("ip")
            .args(["netns", "exec", &self.name, "nft"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nft");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write");
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("nft output");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn listing(&self) -> Ruleset {
        let json = self
            .nft(&["-j", "list", "ruleset"], None)
            .expect("nft -j list ruleset");
        from_nft_json(&json).unwrap_or_else(|e| panic!("{e}\n{json}"))
    }

    fn apply(&self, tx: &Transaction) -> Result<(), ApplyError> {
        self.run(|| Netlink::new()?.apply(tx))
    }

    /// Whether the kernel finds `elem` (nft syntax, e.g. `1.2.3.4 . tcp . 80 . 10.0.0.7`) in
    /// the set: `nft get element` asks the kernel to look the key up, as a packet would.
    fn has_element(&self, table: &TableId, set: &str, elem: &str) -> bool {
        let family = table.family.as_str();
        let body = format!("{{ {elem} }}");
        let args = ["get", "element", family, &table.name, set, &body];
        match self.nft(&args, None) {
            Ok(_) => true,
            Err(e) if e.contains("No such file or directory") => false,
            Err(e) => panic!("nft get element {elem}: {e}"),
        }
    }
}

/// Asserts equality, naming the first differing set or chain.
fn assert_same(got: &Ruleset, want: &Ruleset, context: &str) {
    for (id, w) in &want.tables {
        let g = got
            .tables
            .get(id)
            .unwrap_or_else(|| panic!("table {id} missing\n{context}"));
        assert_eq!(g.comment, w.comment, "table comment");
        for (n, ws) in &w.sets {
            assert_eq!(g.sets.get(n), Some(ws), "set {n} differs\n{context}");
        }
        for (n, wc) in &w.chains {
            assert_eq!(g.chains.get(n), Some(wc), "chain {n} differs\n{context}");
        }
    }
    assert_eq!(got, want, "{context}");
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Proc::new("ip").args(["netns", "del", &self.name]).status();
    }
}

#[test]
fn netlink_apply_lists_back_as_the_same_ruleset() {
    let ns = NetNs::new();
    let rs = sample_ruleset();
    ns.apply(&Transaction::create(&rs)).expect("apply sample");
    let text = ns
        .nft(&["list", "ruleset"], None)
        .expect("nft list ruleset");
    for line in [
        "typeof ip daddr . meta l4proto . th dport . numgen random mod 2 : ip daddr . th dport",
        "typeof ip saddr . ct original ip daddr . meta l4proto . ct original proto-dst : ip daddr . th dport",
        "update @affinity-10800 { ip saddr . ct original ip daddr . meta l4proto . ct original proto-dst : ip daddr . th dport }",
        "dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 2 map @endpoints",
        "ip daddr . meta l4proto . th dport vmap @service-ips",
        "10.96.0.10 . tcp . 80 : goto svc-dnat",
        "ip saddr != 10.244.0.0/16 meta mark set meta mark | 0x00004000 comment \"masquerade clusterIP traffic from outside cluster\"",
        "iifname \"eth0\" udp dport 53 counter packets 0 bytes 0 drop",
        "iifname != \"veth*\" udp dport 54 drop",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert_same(&ns.listing(), &json_view(&rs), &text);
}

#[test]
fn rendered_ruleset_loads_with_nft_and_lists_like_the_netlink_one() {
    let ns = NetNs::new();
    let rs = sample_ruleset();
    ns.nft(&["-f", "-"], Some(&rs.to_nft()))
        .expect("nft -f of the block render");
    assert_same(&ns.listing(), &json_view(&rs), "");
    let ns2 = NetNs::new();
    ns2.nft(&["-f", "-"], Some(&Transaction::create(&rs).to_nft()))
        .expect("nft -f of the transaction");
    assert_same(&ns2.listing(), &json_view(&rs), "");
}

fn changed(rs: &Ruleset) -> Ruleset {
    let mut d = rs.clone();
    let t = d.tables.get_mut(&table_id()).expect("table");
    let eps = &mut t.sets.get_mut("endpoints").expect("endpoints").elements;
    let k1 = vec![
        Value::Ipv4("10.96.0.10".parse().expect("test address")),
        Value::TCP,
        Value::Port(80),
        Value::Integer(1),
    ];
    eps.insert(
        k1,
        Element::values(vec![
            Value::Ipv4("10.244.3.9".parse().expect("test address")),
            Value::Port(8080),
        ]),
    );
    let svc = &mut t.sets.get_mut("service-ips").expect("svc").elements;
    svc.remove(&vec![
        Value::Ipv4("10.96.0.11".parse().expect("test address")),
        Value::UDP,
        Value::Port(53),
    ]);
    svc.insert(
        vec![
            Value::Ipv4("10.96.0.12".parse().expect("test address")),
            Value::TCP,
            Value::Port(443),
        ],
        Element::verdict(Verdict::Goto("svc-dnat".into())),
    );
    d
}

#[test]
fn netlink_incremental_element_changes_touch_only_elements() {
    let ns = NetNs::new();
    let rs = sample_ruleset();
    ns.apply(&Transaction::create(&rs)).expect("apply sample");
    let want = changed(&rs);
    let tx = diff(&rs, &want);
    assert!(tx.commands.iter().all(|c| matches!(
        c,
        Command::AddElements { .. } | Command::DeleteElements { .. }
    )));
    ns.apply(&tx).expect("apply delta");
    assert_same(&ns.listing(), &json_view(&want), "");
    // And back.
    ns.apply(&diff(&want, &rs)).expect("apply reverse delta");
    assert_same(&ns.listing(), &json_view(&rs), "");
}

#[test]
fn netlink_rejected_batch_leaves_the_previous_ruleset_intact() {
    let ns = NetNs::new();
    let rs = sample_ruleset();
    ns.apply(&Transaction::create(&rs)).expect("apply sample");
    let mut tx = diff(&rs, &changed(&rs));
    let good = tx.commands.len();
    tx.push(existing_hairpin_element());
    match ns.apply(&tx) {
        Err(ApplyError::Kernel { index, source, .. }) => {
            assert_eq!(index, good);
            assert_eq!(source.raw_os_error(), Some(libc_eexist()));
        }
        other => panic!("expected a kernel rejection, got {other:?}"),
    }
    assert_same(&ns.listing(), &json_view(&rs), "");
}

fn libc_eexist() -> i32 {
    17
}

/// A command the kernel refuses after the sample ruleset (NLM_F_EXCL): its hairpin element
/// exists.
fn existing_hairpin_element() -> Command {
    Command::AddElements {
        table: table_id(),
        set: "hairpin".into(),
        elements: vec![(
            vec![
                Value::Ipv4("10.244.1.5".parse().expect("test address")),
                Value::Ipv4("10.244.1.5".parse().expect("test address")),
                Value::TCP,
                Value::Port(8080),
            ],
            Element::key_only(),
        )],
    }
}

/// Applies `pieces` through [`Backend::apply_streamed`] in the namespace.
fn apply_pieces(ns: &NetNs, pieces: Vec<Transaction>) -> Result<(), ApplyError> {
    ns.run(move || {
        let mut pieces = Some(pieces);
        Netlink::new()?.apply_streamed(&mut |sink| {
            for piece in pieces.take().into_iter().flatten() {
                sink(piece)?;
            }
            Ok(())
        })
    })
}

/// One command per piece.
fn one_per_piece(tx: Transaction) -> Vec<Transaction> {
    tx.commands
        .into_iter()
        .map(|c| Transaction { commands: vec![c] })
        .collect()
}

#[test]
fn netlink_a_transaction_given_in_pieces_is_applied_whole_or_not_at_all() {
    let ns = NetNs::new();
    let rs = sample_ruleset();
    ns.apply(&Transaction::create(&rs)).expect("apply sample");
    // A rejection in the last piece: the error names the command by its index in the whole
    // transaction, and nothing of the earlier pieces was applied.
    let mut pieces = one_per_piece(diff(&rs, &changed(&rs)));
    let good = pieces.len();
    pieces.push(Transaction {
        commands: vec![existing_hairpin_element()],
    });
    match apply_pieces(&ns, pieces) {
        Err(ApplyError::Kernel {
            index,
            command,
            source,
        }) => {
            assert_eq!(index, good);
            assert!(command.contains("hairpin"), "{command}");
            assert_eq!(source.raw_os_error(), Some(libc_eexist()));
        }
        other => panic!("expected a kernel rejection, got {other:?}"),
    }
    assert_same(&ns.listing(), &json_view(&rs), "after a rejected batch");
    // A producer that fails after handing on pieces: nothing is sent.
    let failed = ns.run(|| {
        Netlink::new()?.apply_streamed(&mut |sink| {
            sink(diff(&rs, &changed(&rs)))?;
            Err(ApplyError::Unsupported("a producer giving up"))
        })
    });
    assert!(
        matches!(failed, Err(ApplyError::Unsupported(_))),
        "{failed:?}"
    );
    assert_same(&ns.listing(), &json_view(&rs), "after a failed producer");
    // The same change in pieces: applied as a whole.
    apply_pieces(&ns, one_per_piece(diff(&rs, &changed(&rs)))).expect("apply in pieces");
    assert_same(
        &ns.listing(),
        &json_view(&changed(&rs)),
        "after the change in pieces",
    );
}

/// Regression (a run listed 98,410 of 100,000 elements): the kernel held all of them; the
/// listing had raced the kernel's resize of the hash table, which makes one dump repeat some
/// elements and miss as many (see `Netlink::dump_elements`). What the kernel holds is asked
/// key by key and by a dump checked for repeats; nft's own listing is retried.
#[test]
fn netlink_applies_100k_elements_in_one_transaction() {
    let ns = NetNs::new();
    let id = TableId::new(Family::Ip, "big");
    let mut rs = Ruleset::default();
    let t = rs.tables.entry(id.clone()).or_default();
    let mut s = Set::new(SetSpec::map(
        KeySpec::Types(vec![
            DataType::Ipv4Addr,
            DataType::InetProto,
            DataType::InetService,
        ]),
        MapData::Values(KeySpec::Types(vec![
            DataType::Ipv4Addr,
            DataType::InetService,
        ])),
    ));
    for i in 0..100_000u32 {
        let vip = std::net::Ipv4Addr::from(0x0a60_0000 + i);
        s.elements.insert(
            vec![Value::Ipv4(vip), Value::TCP, Value::Port(80)],
            Element::values(vec![
                Value::Ipv4(std::net::Ipv4Addr::from(0x0af4_0000 + i)),
                Value::Port(8080),
            ]),
        );
    }
    let keys: Vec<Key> = s.elements.keys().cloned().collect();
    t.sets.insert("endpoints".into(), s);
    let tx = Transaction::create(&rs);
    assert_eq!(tx.element_count(), 100_000);
    let (missing, dumped) = ns
        .run(|| {
            let mut nl = Netlink::new()?;
            nl.apply(&tx)?;
            let missing = nl.missing_elements(&id, "endpoints", &keys)?;
            Ok::<_, ApplyError>((missing, nl.dump_elements(&id, "endpoints")?))
        })
        .expect("apply, look up and dump 100k elements");
    assert!(
        missing.is_empty(),
        "{} of 100000 keys not in the kernel, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    let want: BTreeSet<Vec<u8>> = keys.iter().map(|k| tuple_bytes(k)).collect();
    let got: BTreeSet<Vec<u8>> = dumped.into_iter().map(|e| e.key).collect();
    assert_eq!(got.len(), 100_000, "distinct keys in a consistent dump");
    assert!(got == want, "the dump holds other keys than applied");

    // nft's listing parses our encoding of every element. It has no consistency check, so
    // a listing that raced a resize is retried.
    let mut last = (0, 0);
    for attempt in 0..3 {
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        let json = ns
            .nft(&["-j", "list", "map", "ip", "big", "endpoints"], None)
            .expect("list map");
        let listed = from_nft_json(&json).expect("parse");
        let n = listed.tables[&id].sets["endpoints"].elements.len();
        let text = ns
            .nft(&["list", "map", "ip", "big", "endpoints"], None)
            .expect("list map");
        // One " : " per element plus the type line.
        last = (n, text.matches(" : ").count() - 1);
        if last == (100_000, 100_000) {
            return;
        }
    }
    panic!("nft listed (json, text) = {last:?} of 100000 elements in 3 attempts");
}

/// Applies `rs` over netlink and checks the listing, then applies a delta and its reverse.
fn apply_and_compare(ns: &NetNs, rs: &Ruleset) -> String {
    ns.apply(&Transaction::create(rs))
        .unwrap_or_else(|e| panic!("apply: {e}"));
    let text = ns
        .nft(&["list", "ruleset"], None)
        .expect("nft list ruleset");
    assert_same(&ns.listing(), &json_view(rs), &text);
    text
}

fn firewall_changed(rs: &Ruleset, family: Family) -> Ruleset {
    let v6 = family == Family::Ip6;
    let mut d = rs.clone();
    let t = d.tables.get_mut(&firewall_table_id(family)).expect("table");
    let allow = &mut t.sets.get_mut("firewall-allow").expect("set").elements;
    let (vip, gone, new) = if v6 {
        ("2001:db8::50", "fd00:100::/64", "fd00:100:0:2::/64")
    } else {
        ("192.0.2.50", "10.100.0.0/24", "10.100.2.0/24")
    };
    assert!(
        allow
            .remove(&firewall_key(vip, Value::TCP, 80, gone))
            .is_some()
    );
    allow.insert(firewall_key(vip, Value::TCP, 80, new), Element::key_only());
    let np = &mut t.sets.get_mut("nodeport-ips").expect("set").elements;
    let first = np.keys().next().expect("an element").clone();
    np.remove(&first);
    d
}

fn check_interval_sets(family: Family) {
    let v6 = family == Family::Ip6;
    let id = firewall_table_id(family);
    let rs = firewall_ruleset(family);
    let ns = NetNs::new();
    let text = apply_and_compare(&ns, &rs);
    let (d, s) = if v6 { ("ip6", "ip6") } else { ("ip", "ip") };
    let rule = format!("{d} daddr . meta l4proto . th dport . {s} saddr != @firewall-allow drop");
    assert!(text.contains(&rule), "missing {rule:?} in\n{text}");
    assert!(text.contains("flags interval"), "{text}");

    // The kernel's lookup: inside and outside each range.
    let cases: &[(&str, bool)] = if v6 {
        &[
            ("2001:db8::50 . tcp . 80 . fd00:100::7", true),
            (
                "2001:db8::50 . tcp . 80 . fd00:100:0:1:ffff:ffff:ffff:ffff",
                true,
            ),
            ("2001:db8::50 . tcp . 80 . fd00:100:0:2::1", false),
            ("2001:db8::50 . tcp . 81 . fd00:100::7", false),
            ("2001:db8::50 . udp . 80 . fd00:100:0:ff::1", true),
            ("2001:db8::50 . udp . 80 . fd00:101::1", false),
            ("2001:db8::50 . tcp . 80 . fd00:200:ff:ffff::1", true),
            ("2001:db8::50 . tcp . 80 . fd00:201::1", false),
            ("2001:db8::51 . udp . 53 . fd00::1", true),
            ("2001:db8::51 . udp . 53 . fd00::2", false),
            ("2001:db8::52 . tcp . 443 . 2a00::1", true),
            ("2001:db8::53 . tcp . 443 . 2a00::1", false),
        ]
    } else {
        &[
            ("192.0.2.50 . tcp . 80 . 10.100.0.7", true),
            ("192.0.2.50 . tcp . 80 . 10.100.1.255", true),
            ("192.0.2.50 . tcp . 80 . 10.100.2.0", false),
            ("192.0.2.50 . tcp . 80 . 10.99.255.255", false),
            ("192.0.2.50 . tcp . 81 . 10.100.0.7", false),
            ("192.0.2.50 . udp . 80 . 10.100.200.1", true),
            ("192.0.2.50 . udp . 80 . 10.101.0.1", false),
            ("192.0.2.50 . tcp . 80 . 172.31.255.255", true),
            ("192.0.2.50 . tcp . 80 . 172.32.0.0", false),
            ("192.0.2.51 . udp . 53 . 10.0.0.1", true),
            ("192.0.2.51 . udp . 53 . 10.0.0.2", false),
            ("192.0.2.51 . udp . 53 . 10.0.0.0", false),
            ("192.0.2.52 . tcp . 443 . 203.0.113.9", true),
            ("192.0.2.53 . tcp . 443 . 203.0.113.9", false),
        ]
    };
    for (elem, want) in cases {
        assert_eq!(
            ns.has_element(&id, "firewall-allow", elem),
            *want,
            "firewall-allow lookup of {elem}"
        );
    }
    let np: &[(&str, bool)] = if v6 {
        &[
            ("::1", true),
            ("fd00:1::9", true),
            ("fd00:1:0:1::9", true),
            ("fd00:1:0:2::", false),
            ("2001:db8::7", true),
            ("2001:db8::8", false),
            ("ffff:ffff::1", true),
            ("fffe::1", false),
        ]
    } else {
        &[
            ("0.0.0.1", true),
            ("1.0.0.0", false),
            ("10.0.0.9", true),
            ("10.0.1.255", true),
            ("10.0.2.0", false),
            ("192.168.5.5", true),
            ("192.168.5.6", false),
            ("255.255.255.255", true),
            ("255.255.255.254", false),
        ]
    };
    for (elem, want) in np {
        assert_eq!(
            ns.has_element(&id, "nodeport-ips", elem),
            *want,
            "nodeport-ips lookup of {elem}"
        );
    }

    // Asked key by key, the kernel names exactly the keys it lacks (with a range end for
    // the concatenation, by its start for the single-field set).
    for set in ["firewall-allow", "nodeport-ips"] {
        let mut keys: Vec<Key> = rs.tables[&id].sets[set].elements.keys().cloned().collect();
        let absent = keys[0].iter().map(|v| match v {
            Value::Ipv4Net(_) => Value::Ipv4Net("198.51.100.0/24".parse().expect("p")),
            Value::Ipv6Net(_) => Value::Ipv6Net("2001:db8:ff::/48".parse().expect("p")),
            other => *other,
        });
        let absent: Key = absent.collect();
        keys.insert(1, absent.clone());
        keys.push(absent.clone());
        let missing = ns
            .run(|| Netlink::new()?.missing_elements(&id, set, &keys))
            .expect("look up");
        assert_eq!(missing, vec![absent.clone(), absent], "{set}");
    }

    // Incremental changes: one range removed and one added, in both directions.
    let want = firewall_changed(&rs, family);
    ns.apply(&diff(&rs, &want)).expect("apply delta");
    assert_same(&ns.listing(), &json_view(&want), "after delta");
    ns.apply(&diff(&want, &rs)).expect("apply reverse delta");
    assert_same(&ns.listing(), &json_view(&rs), "after reverse delta");

    // An overlapping range is refused by the kernel and the fake alike, and nothing changes:
    // in the concatenation (pipapo) and in the single-field set (rbtree).
    let (vip, over, np_over) = if v6 {
        ("2001:db8::50", "fd00:100::/56", "fd00:1::/63")
    } else {
        ("192.0.2.50", "10.100.0.0/23", "10.0.0.0/23")
    };
    let np_key = if v6 {
        Value::Ipv6Net(np_over.parse().expect("test prefix"))
    } else {
        Value::Ipv4Net(np_over.parse().expect("test prefix"))
    };
    let mut fake = Fake::default();
    fake.apply(&Transaction::create(&rs)).expect("fake create");
    for (set, key) in [
        ("firewall-allow", firewall_key(vip, Value::TCP, 80, over)),
        ("nodeport-ips", vec![np_key]),
    ] {
        let mut tx = Transaction::new();
        tx.push(Command::AddElements {
            table: id.clone(),
            set: set.into(),
            elements: vec![(key, Element::key_only())],
        });
        match ns.apply(&tx) {
            Err(ApplyError::Kernel { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc_eexist()), "{set}")
            }
            other => panic!("expected EEXIST for an overlapping range in {set}, got {other:?}"),
        }
        let err = fake
            .apply(&tx)
            .expect_err("the fake refuses the overlap too");
        assert!(
            matches!(
                err,
                ApplyError::Invalid {
                    reason: InvalidCommand::State(StateError::Overlap { .. }),
                    ..
                }
            ),
            "{err:?}"
        );
    }
    assert_same(&ns.listing(), &json_view(&rs), "after the refused overlaps");

    // nft itself loads the rendered text and lists the same ruleset.
    let ns2 = NetNs::new();
    ns2.nft(&["-f", "-"], Some(&Transaction::create(&rs).to_nft()))
        .expect("nft -f of the transaction");
    assert_same(&ns2.listing(), &json_view(&rs), "nft -f of the transaction");
    ns2.nft(&["-f", "-"], Some(&diff(&rs, &want).to_nft()))
        .expect("nft -f of the delta");
    assert_same(&ns2.listing(), &json_view(&want), "nft -f of the delta");
    let ns3 = NetNs::new();
    ns3.nft(&["-f", "-"], Some(&rs.to_nft()))
        .expect("nft -f of the block render");
    assert_same(
        &ns3.listing(),
        &json_view(&rs),
        "nft -f of the block render",
    );
}

#[test]
fn netlink_interval_concatenation_matches_inside_its_ranges_and_lists_back_ipv4() {
    check_interval_sets(Family::Ip);
}

#[test]
fn netlink_interval_concatenation_matches_inside_its_ranges_and_lists_back_ipv6() {
    check_interval_sets(Family::Ip6);
}

/// Regression: the typeof userdata named `ip6 daddr` by its byte offset's neighbour field
/// index, so nft listed `… : ip6 saddr . th dport` for a map declared `: ip6 daddr . th dport`.
#[test]
fn netlink_ip6_table_lists_back_with_ip6_daddr_in_typeof_map_data() {
    let ns = NetNs::new();
    let rs = sample_ruleset_v6();
    let text = apply_and_compare(&ns, &rs);
    for line in [
        "typeof meta l4proto . th dport . numgen random mod 1 : ip6 daddr . th dport",
        "typeof ip6 daddr . meta l4proto . th dport . numgen random mod 2 : ip6 daddr . th dport",
        "typeof ip6 saddr . ct original ip6 daddr . meta l4proto . ct original proto-dst : ip6 daddr . th dport",
        "typeof ct original ip6 daddr . meta l4proto . ct original proto-dst",
        "update @affinity-10800 { ip6 saddr . ct original ip6 daddr . meta l4proto . ct original proto-dst : ip6 daddr . th dport }",
        "dnat ip6 to meta l4proto . th dport . numgen random mod 1 map @nodeport-endpoints",
        "dnat ip6 to ip6 saddr . ip6 daddr . meta l4proto . th dport map @affinity-10800",
        "ip6 daddr . meta l4proto . th dport vmap @service-ips",
        "fd00:96::10 . tcp . 80 . 1 : fd00:244:2::7 . 8080",
        "ct original ip6 daddr fd00:96::11 reject",
        "fib saddr type local ip6 daddr ::1 accept",
        "masquerade fully-random",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(!text.contains(": ip6 saddr"), "{text}");
}

/// A set with per-element counters (`counter`) and a data map, read back element by element
/// with `Backend::list_elements`: keys, data and counters, as packets of the namespace's own
/// traffic counted them.
#[test]
fn netlink_counter_set_counts_each_element_and_list_elements_reads_keys_data_and_counters() {
    use lb_nft::ElementCounter;
    let ns = NetNs::new();
    let up = Proc::new("ip")
        .args(["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"])
        .status();
    assert!(matches!(up, Ok(s) if s.success()), "lo up: {up:?}");
    let id = TableId::new(Family::Ip, "lbt");
    let lo = Value::Ipv4("127.0.0.1".parse().expect("address"));
    let mut counted = SetSpec::set(vec![
        DataType::Ipv4Addr,
        DataType::InetProto,
        DataType::InetService,
    ]);
    counted.flags.counter = true;
    counted.comment = Some("counted".into());
    let mut traffic = Set::new(counted.clone());
    traffic.elements.insert(
        vec![lo, Value::UDP, Value::Port(9)],
        Element {
            comment: Some("t/discard:udp/UDP".into()),
            ..Element::key_only()
        },
    );
    traffic
        .elements
        .insert(vec![lo, Value::UDP, Value::Port(10)], Element::key_only());
    let map_spec = SetSpec::map(
        KeySpec::Types(vec![
            DataType::Ipv4Addr,
            DataType::InetProto,
            DataType::InetService,
        ]),
        MapData::Values(KeySpec::Types(vec![
            DataType::Ipv4Addr,
            DataType::InetService,
        ])),
    );
    let mut map = Set::new(map_spec.clone());
    let endpoint = vec![
        Value::Ipv4("10.244.1.10".parse().expect("address")),
        Value::Port(8080),
    ];
    map.elements.insert(
        vec![lo, Value::TCP, Value::Port(80)],
        Element::values(endpoint.clone()),
    );
    let mut rs = Ruleset::default();
    let t = rs.tables.entry(id.clone()).or_default();
    t.sets.insert("traffic".into(), traffic);
    t.sets.insert("aff".into(), map);
    t.chains.insert(
        "out".into(),
        Chain {
            spec: ChainSpec {
                base: Some(BaseChain {
                    kind: ChainType::Filter,
                    hook: Hook::Output,
                    priority: 0,
                    policy: Policy::Accept,
                }),
                comment: None,
            },
            rules: vec![Rule::new(vec![Stmt::Lookup {
                key: vec![
                    Expr::Payload(Payload::IpDaddr),
                    Expr::Meta(MetaKey::L4Proto),
                    Expr::Payload(Payload::ThDport),
                ],
                set: "traffic".into(),
                negate: false,
            }])],
        },
    );
    ns.apply(&Transaction::create(&rs)).expect("apply");
    let text = ns
        .nft(&["list", "set", "ip", "lbt", "traffic"], None)
        .expect("list");
    assert!(text.contains("\t\tcounter\n"), "{text}");
    assert_same(&ns.listing(), &json_view(&rs), &text);
    // The render loads with nft and means the same.
    let ns2 = NetNs::new();
    ns2.nft(&["-f", "-"], Some(&rs.to_nft()))
        .expect("nft -f of the render");
    assert_same(&ns2.listing(), &json_view(&rs), "nft -f of the render");

    let listed = ns
        .run(|| {
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            for _ in 0..5 {
                sock.send_to(b"x", "127.0.0.1:9").expect("send");
            }
            let mut nl = Netlink::new()?;
            Ok::<_, ApplyError>((
                nl.list_elements(&id, "traffic", &counted)?,
                nl.list_elements(&id, "aff", &map_spec)?,
            ))
        })
        .expect("list elements");
    let (traffic, aff) = listed;
    let counter = |port: u16| {
        traffic
            .iter()
            .find(|e| e.key == vec![lo, Value::UDP, Value::Port(port)])
            .and_then(|e| e.counter)
    };
    // 5 packets of 20 (IP) + 8 (UDP) + 1 bytes.
    assert_eq!(
        counter(9),
        Some(ElementCounter {
            packets: 5,
            bytes: 5 * 29
        })
    );
    assert_eq!(counter(10), Some(ElementCounter::default()));
    assert_eq!(aff.len(), 1);
    assert_eq!(aff[0].key, vec![lo, Value::TCP, Value::Port(80)]);
    assert_eq!(aff[0].data.as_ref(), Some(&endpoint));
    assert_eq!(aff[0].counter, None);
}

/// A transaction whose batch spans many `nftnl` batch pages still reaches the kernel as one
/// batch: with a failing last command (on the last page) nothing of the first pages is
/// applied, and without it every element is.
#[test]
fn netlink_batch_spanning_many_pages_is_sent_whole_and_applied_atomically() {
    let ns = NetNs::new();
    let id = TableId::new(Family::Ip, "pages");
    let mut rs = Ruleset::default();
    let t = rs.tables.entry(id.clone()).or_default();
    let mut s = Set::new(SetSpec::set(vec![
        DataType::Ipv4Addr,
        DataType::InetService,
    ]));
    for i in 0..20_000u32 {
        s.elements.insert(
            vec![
                Value::Ipv4(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
                Value::Port(80),
            ],
            Element::key_only(),
        );
    }
    t.sets.insert("many".into(), s);
    let good = Transaction::create(&rs);
    let mut bad = good.clone();
    // A duplicate of an element added earlier in the batch: the kernel refuses it (EEXIST).
    bad.push(Command::AddElements {
        table: id.clone(),
        set: "many".into(),
        elements: vec![(
            vec![
                Value::Ipv4("10.0.0.0".parse().expect("literal")),
                Value::Port(80),
            ],
            Element::key_only(),
        )],
    });
    let page = 16 * 1024;
    match ns.run(|| Netlink::new()?.with_batch_page_size(page).apply(&bad)) {
        Err(ApplyError::Kernel { index, source, .. }) => {
            assert_eq!(
                index,
                bad.commands.len() - 1,
                "the failing command is named"
            );
            assert_eq!(source.raw_os_error(), Some(libc_eexist()));
        }
        other => panic!("expected the kernel to refuse the duplicate, got {other:?}"),
    }
    let listed = ns
        .nft(&["list", "ruleset"], None)
        .expect("nft list ruleset");
    assert!(
        listed.trim().is_empty(),
        "nothing of a refused batch may be applied:\n{listed}"
    );

    let dumped = ns
        .run(|| {
            let mut nl = Netlink::new()?.with_batch_page_size(page);
            nl.apply(&good)?;
            nl.dump_elements(&id, "many")
        })
        .expect("apply over many pages and dump");
    assert_eq!(dumped.len(), 20_000);
}

/// A set with a `size` takes that many elements and refuses the next with `ENFILE`
/// ([`ApplyError::is_set_full`]), rolling the whole batch back; elements deleted earlier in
/// a batch make room for as many. The fake backend agrees with the kernel on each outcome.
#[test]
fn netlink_a_sized_set_refuses_an_element_beyond_its_size_whole_and_the_fake_agrees() {
    let ns = NetNs::new();
    let id = table_id();
    let addr = |i: u8| vec![Value::Ipv4(std::net::Ipv4Addr::new(10, 96, 0, i))];
    let mut sized = Set::new(SetSpec::set(vec![DataType::Ipv4Addr]));
    sized.spec.size = Some(4);
    for i in 1..=3 {
        sized.elements.insert(addr(i), Element::key_only());
    }
    let mut other = Set::new(SetSpec::set(vec![DataType::Ipv4Addr]));
    other.elements.insert(addr(1), Element::key_only());
    let mut table = Table::default();
    table.sets.insert("sized".into(), sized);
    table.sets.insert("other".into(), other);
    let mut rs = Ruleset::default();
    rs.tables.insert(id.clone(), table);
    let mut fake = Fake::default();
    let create = Transaction::create(&rs);
    ns.apply(&create).expect("the kernel creates the sized set");
    fake.apply(&create).expect("the fake creates the sized set");
    // The size reaches the kernel (`nft -j` lists it) and reads back.
    assert_same(&ns.listing(), &json_view(&rs), "created");

    let add = |set: &str, keys: &[u8]| Command::AddElements {
        table: id.clone(),
        set: set.into(),
        elements: keys
            .iter()
            .map(|&i| (addr(i), Element::key_only()))
            .collect(),
    };
    let delete = |keys: &[u8]| Command::DeleteElements {
        table: id.clone(),
        set: "sized".into(),
        keys: keys.iter().map(|&i| addr(i)).collect(),
    };
    let both = |fake: &mut Fake, commands: Vec<Command>| {
        let tx = Transaction { commands };
        (ns.apply(&tx), fake.apply(&tx))
    };
    // The fourth element fits.
    let (kernel, fake_says) = both(&mut fake, vec![add("sized", &[4])]);
    kernel.expect("the kernel takes a fourth element");
    fake_says.expect("the fake takes a fourth element");
    // A fifth does not, and the batch goes whole: the other set's new element too.
    let (kernel, fake_says) = both(&mut fake, vec![add("other", &[2]), add("sized", &[5])]);
    let kernel = kernel.expect_err("the kernel refuses a fifth element");
    assert!(kernel.is_set_full(), "{kernel:?}");
    match &kernel {
        ApplyError::Kernel { index, source, .. } => {
            assert_eq!(*index, 1, "the command adding to the full set");
            assert_eq!(source.raw_os_error(), Some(23), "ENFILE");
        }
        other => panic!("expected a kernel rejection, got {other:?}"),
    }
    let fake_says = fake_says.expect_err("the fake refuses a fifth element");
    assert!(fake_says.is_set_full(), "{fake_says:?}");
    let mut held = rs.clone();
    held.tables
        .get_mut(&id)
        .expect("table")
        .sets
        .get_mut("sized")
        .expect("set")
        .elements
        .insert(addr(4), Element::key_only());
    assert_same(
        &ns.listing(),
        &json_view(&held),
        "the refused batch left nothing",
    );
    assert_eq!(fake.ruleset, held);
    // Deleting one makes room for one in the same batch.
    let (kernel, fake_says) = both(&mut fake, vec![delete(&[1]), add("sized", &[5])]);
    kernel.expect("the kernel takes an element in place of one deleted before it");
    fake_says.expect("the fake too");
    let sized = &mut held
        .tables
        .get_mut(&id)
        .expect("table")
        .sets
        .get_mut("sized")
        .expect("set")
        .elements;
    sized.remove(&addr(1));
    sized.insert(addr(5), Element::key_only());
    assert_same(&ns.listing(), &json_view(&held), "one swapped for another");
    assert_eq!(fake.ruleset, held);
}
