//! Who is filling it: the local addresses (pods) behind an ENI's tracked flows and
//! behind its unanswered DNS, ranked and bounded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::float_cmp)]

use std::{net::SocketAddr, time::Duration};

use integration_tests::{
    Agent, Scrape, SimNode, require_root, send_udp,
    servers::{TcpHold, tcp_connections},
};

/// (address, value) of `metric` on eth0, most first.
fn ranked(s: &Scrape, metric: &str) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = s
        .matching(metric, &[("device", "eth0")])
        .map(|(l, v)| (l["address"].clone(), v))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

#[test]
fn the_pods_holding_the_flows_are_named_in_order_and_bounded() {
    if !require_root("the_pods_holding_the_flows_are_named_in_order_and_bounded") {
        return;
    }
    let sim = SimNode::ipv4_only();
    let server: SocketAddr = format!("{}:8000", sim.eni("eth0").vpc_v4).parse().unwrap();
    let _hold = TcpHold::start(&sim.vpc, server);
    let pods: Vec<_> = (1..=4).map(|n| sim.add_pod(n)).collect();
    let agent = Agent::start(&sim.node, &["--device", "eth0", "--top", "3"]);
    let mut held = Vec::new();
    for (pod, n) in pods.iter().zip([5, 50, 500, 1]) {
        held.push(tcp_connections(&pod.ns, server, n));
    }
    agent.scrape_until(&sim.node, "556 flows tracked", |s| {
        s.sum(
            "eni_monitor_tracked_flows",
            &[("device", "eth0"), ("protocol", "tcp")],
        ) == 556.0
    });
    let s = agent.scrape_until(&sim.node, "the owners ranked", |s| {
        ranked(s, "eni_monitor_top_flow_owners").len() == 3
    });
    assert_eq!(
        ranked(&s, "eni_monitor_top_flow_owners"),
        [
            (pods[2].ip.clone(), 500.0),
            (pods[1].ip.clone(), 50.0),
            (pods[0].ip.clone(), 5.0)
        ],
        "{}",
        s.text
    );
    // The fourth pod is past --top 3: not exported at all.
    assert!(
        !s.text.contains(&format!("address=\"{}\"", pods[3].ip)),
        "{}",
        s.text
    );
    drop(held);
}

#[test]
fn the_pod_whose_dns_goes_unanswered_tops_the_dns_list() {
    if !require_root("the_pod_whose_dns_goes_unanswered_tops_the_dns_list") {
        return;
    }
    let sim = SimNode::ipv4_only();
    // Nothing answers on the VPC side's port 53.
    let resolver: SocketAddr = format!("{}:53", sim.eni("eth0").vpc_v4).parse().unwrap();
    let (quiet, loud) = (sim.add_pod(1), sim.add_pod(2));
    let agent = Agent::start(&sim.node, &["--device", "eth0", "--dns-timeout", "1s"]);
    let query = integration_tests::dns::query_packet("a.ok.sim", 7);
    for (pod, n) in [(&loud, 7), (&quiet, 2)] {
        for _ in 0..n {
            // Each from its own socket: a query each, not a retransmission.
            send_udp(&pod.ns, resolver, 1, &query);
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let s = agent.scrape_until(&sim.node, "9 unanswered", |s| {
        s.sum("eni_monitor_dns_unanswered_total", &[("device", "eth0")]) == 9.0
    });
    assert_eq!(
        ranked(&s, "eni_monitor_top_dns_clients_unanswered"),
        [(loud.ip.clone(), 7.0), (quiet.ip.clone(), 2.0)],
        "{}",
        s.text
    );
}
