//! Who is filling it: the local addresses (pods) behind an ENI's tracked flows and
//! behind its unanswered DNS, ranked and bounded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::float_cmp)]

use std::{net::SocketAddr, time::Duration};

use integration_tests::{
    Agent, Scrape, SimNode,
    dns::{self, OK_NAME, Resolver},
    monotonic, require_root, send_udp,
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

#[test]
fn the_pods_sending_link_local_packets_are_named_with_their_busiest_second() {
    if !require_root("the_pods_sending_link_local_packets_are_named_with_their_busiest_second") {
        return;
    }
    let sim = SimNode::ipv4_only();
    // The Amazon-provided resolver's address, served from inside the simulated VPC.
    sim.vpc.ip("addr add 169.254.169.253/32 dev vpc0");
    sim.node.ip("route add 169.254.169.253/32 dev eth0");
    let _resolver = Resolver::start(&sim.vpc, &["169.254.169.253".parse().unwrap()]);
    let pods = [sim.add_pod(1), sim.add_pod(2)];
    let agent = Agent::start(&sim.node, &["--device", "eth0"]);
    let server: SocketAddr = "169.254.169.253:53".parse().unwrap();

    // Both pods at once, just after a second boundary (clear of the programs' coarse
    // clock, which lags by up to a tick), so that all 1000 packets fall in one second.
    let now = monotonic();
    std::thread::sleep(
        Duration::from_millis(1050)
            .saturating_sub(Duration::from_nanos(u64::from(now.subsec_nanos()))),
    );
    std::thread::scope(|s| {
        for (pod, n) in pods.iter().zip([700, 300]) {
            s.spawn(move || dns::burst(&pod.ns, server, OK_NAME, n));
        }
    });

    let senders = |s: &Scrape| {
        let mut v: Vec<(String, String, f64)> = s
            .matching("eni_monitor_top_linklocal_senders", &[("device", "eth0")])
            .map(|(l, v)| (l["address"].clone(), l["service"].clone(), v))
            .collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    };
    let s = agent.scrape_until(&sim.node, "both senders named", |s| senders(s).len() == 2);
    assert_eq!(
        s.get(
            "eni_monitor_linklocal_peak_packets_per_second",
            &[("device", "eth0")]
        ),
        Some(1000.0),
        "{}",
        s.text
    );
    assert_eq!(
        senders(&s),
        [
            (pods[0].ip.clone(), "dns".to_owned(), 700.0),
            (pods[1].ip.clone(), "dns".to_owned(), 300.0)
        ],
        "{}",
        s.text
    );
}
