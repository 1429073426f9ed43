//! Property tests: invariants of categorisation over arbitrary endpoints, services and nodes.

use lb_core::{
    Conditions, Endpoint, EndpointSet, Node, Protocol, ServicePort, ServiceType, TrafficPolicy,
    categorize,
};
use proptest::prelude::*;

const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];
const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

fn conditions() -> impl Strategy<Value = Conditions> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(ready, serving, terminating)| {
        // A ready endpoint is serving by definition (the builder rejects the contradiction).
        Conditions {
            ready,
            serving: serving || ready,
            terminating,
        }
    })
}

fn endpoint(i: usize) -> impl Strategy<Value = Endpoint> {
    (
        conditions(),
        proptest::option::of(0..3usize),
        proptest::sample::subsequence(ZONES.to_vec(), 0..=2),
        proptest::sample::subsequence(NODES.to_vec(), 0..=1),
    )
        .prop_map(move |(c, node, zones, nodes)| {
            let mut b = Endpoint::builder(format!("10.0.{}.{}", i / 250, i % 250 + 1), 8080)
                .conditions(c)
                .hints_for_zones(zones)
                .hints_for_nodes(nodes);
            if let Some(n) = node {
                b = b.node_name(NODES[n]).zone(ZONES[n]);
            }
            b.build().expect("generated endpoint is valid")
        })
}

fn endpoints() -> impl Strategy<Value = Vec<Endpoint>> {
    (0..12usize).prop_flat_map(|n| (0..n).map(endpoint).collect::<Vec<_>>())
}

fn policy() -> impl Strategy<Value = TrafficPolicy> {
    prop_oneof![Just(TrafficPolicy::Cluster), Just(TrafficPolicy::Local)]
}

fn service() -> impl Strategy<Value = ServicePort> {
    (policy(), policy(), 0..3u8, any::<bool>()).prop_map(|(etp, itp, kind, node_port)| {
        let ty = [
            ServiceType::ClusterIp,
            ServiceType::NodePort,
            ServiceType::LoadBalancer,
        ][kind as usize];
        let mut b = ServicePort::builder("ns", "svc", "p", Protocol::Tcp, 80)
            .cluster_ips(["172.30.0.1"])
            .service_type(ty)
            .external_traffic_policy(etp)
            .internal_traffic_policy(itp);
        if node_port && ty != ServiceType::ClusterIp {
            b = b.node_port(30000);
        }
        b.build().expect("generated service is valid")
    })
}

fn node() -> impl Strategy<Value = Node> {
    (0..3usize, proptest::option::of(0..3usize))
        .prop_map(|(n, z)| Node::new(NODES[n], z.map(|z| ZONES[z])).expect("valid node"))
}

proptest! {
    #[test]
    fn no_non_serving_endpoint_is_ever_chosen(svc in service(), eps in endpoints(), node in node()) {
        let c = categorize(&svc, &eps, &node);
        for set in [EndpointSet::Cluster, EndpointSet::Local, EndpointSet::All] {
            for e in c.iter(set) {
                prop_assert!(e.is_serving(), "{e} in {set:?} is not serving");
                prop_assert!(e.conditions().usable());
            }
        }
    }

    #[test]
    fn the_local_set_is_within_all_usable_and_on_this_node(svc in service(), eps in endpoints(), node in node()) {
        let c = categorize(&svc, &eps, &node);
        for &i in c.local_indices() {
            prop_assert!(c.all_indices().contains(&i));
            prop_assert!(eps[i as usize].is_local_to(&node));
        }
        for &i in c.cluster_indices() {
            prop_assert!(c.all_indices().contains(&i));
        }
        for &i in c.all_indices() {
            prop_assert!(c.cluster_indices().contains(&i) || c.local_indices().contains(&i));
        }
    }

    #[test]
    fn every_left_out_endpoint_has_a_reason_and_every_chosen_one_has_none(
        svc in service(), eps in endpoints(), node in node()
    ) {
        let c = categorize(&svc, &eps, &node);
        for set in [EndpointSet::Cluster, EndpointSet::Local, EndpointSet::All] {
            for i in 0..eps.len() {
                let included = c.indices(set).contains(&(i as u32));
                let reason = c.why_excluded(set, i);
                prop_assert_eq!(included, reason.is_none(), "{:?} {} {:?}", set, i, reason);
                if let Some(r) = reason {
                    prop_assert!(!r.to_string().is_empty());
                }
            }
        }
    }

    #[test]
    fn ready_endpoints_exclude_terminating_ones_from_the_same_set(
        svc in service(), eps in endpoints(), node in node()
    ) {
        let c = categorize(&svc, &eps, &node);
        let cluster: Vec<_> = c.cluster().collect();
        if cluster.iter().any(|e| e.is_ready()) {
            prop_assert!(cluster.iter().all(|e| e.is_ready()));
        }
        let local: Vec<_> = c.local().collect();
        if local.iter().any(|e| e.is_ready()) {
            prop_assert!(local.iter().all(|e| e.is_ready()));
        }
    }

    #[test]
    fn the_cluster_set_is_empty_only_when_nothing_is_usable(
        svc in service(), eps in endpoints(), node in node()
    ) {
        let c = categorize(&svc, &eps, &node);
        let any_usable = eps.iter().any(|e| e.conditions().usable());
        prop_assert_eq!(c.has_any_endpoints(), any_usable);
        if c.uses_cluster() {
            prop_assert_eq!(c.cluster_indices().is_empty(), !any_usable);
        }
    }
}
