//! Upstream kube-proxy's packet-flow tables (the same groups, manifests and settings as
//! `upstream_flows.rs`) run through the packet tracer over the compiled ruleset: no root, no
//! namespace, milliseconds. The netns test stays the ground truth and also checks that the
//! tracer predicts what the kernel does; this one makes the tables a fast unit test of the
//! compiler: ETP/iTP, terminating endpoints, source ranges, reject vs drop, masquerade, on
//! IPv4 and IPv6.

use lb_e2e::upstream_flows::{agrees, predict, ruleset, schedule};

#[test]
fn upstream_packet_flow_tables_hold_in_the_tracer() {
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    let mut flows = 0;
    let (mut v6, mut drop, mut reject, mut masq) = (0, 0, 0, 0);
    for (s, g) in schedule() {
        let rs = ruleset(&g.manifests, &s);
        for f in &g.flows {
            flows += 1;
            v6 += usize::from(f.dest.contains(':'));
            drop += usize::from(matches!(f.output, lb_e2e::upstream_flows::Output::Drop));
            reject += usize::from(matches!(f.output, lb_e2e::upstream_flows::Output::Reject));
            masq += usize::from(f.masq);
            match predict(&rs, &s, f) {
                Ok((output, m)) if agrees(f, &output, m) => {}
                Ok((output, m)) => failures.push(format!(
                    "{} / {:?} ({:?} {} -> {}:{}): expected {:?} masq {}, traced {output:?} masq {m}",
                    g.upstream, f.name, f.proto, f.source, f.dest, f.port, f.output, f.masq
                )),
                Err(e) => failures.push(format!("{} / {:?}: {e}", g.upstream, f.name)),
            }
        }
    }
    eprintln!(
        "{flows} flows ({v6} IPv6, {drop} DROP, {reject} REJECT, {masq} masqueraded), {} differ, in {:?}",
        failures.len(),
        started.elapsed()
    );
    assert!(flows >= 200, "the schedule holds {flows} flows");
    assert!(
        failures.is_empty(),
        "{} of {flows} flows differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
