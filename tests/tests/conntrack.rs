//! The node's netfilter conntrack table: the agent's figures against the kernel's own,
//! read through ctnetlink by conntrack(8), for the agent's namespace.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::float_cmp,
    clippy::cast_precision_loss
)]

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use integration_tests::{
    Agent, SimNode, require_root,
    servers::{UdpEcho, udp_flows},
    sh,
};

#[test]
fn nf_conntrack_figures_equal_the_kernels() {
    if !require_root("nf_conntrack_figures_equal_the_kernels") {
        return;
    }
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    // A rule that uses conntrack turns it on for the namespace.
    sim.node.nft("table inet tracking {\n chain out {\n  type filter hook output priority 0;\n  ct state invalid drop\n }\n}\n");
    let echo_addr = SocketAddr::new(eth0.vpc_v4.parse().unwrap(), 7000);
    let _echo = UdpEcho::start(&sim.vpc, echo_addr);
    let agent = Agent::start(&sim.node, &["--device", "eth0"]);
    assert_eq!(udp_flows(&sim.node, echo_addr, 6), 6);
    std::thread::sleep(Duration::from_millis(200));

    let s = agent.scrape(&sim.node);
    let count: f64 = sh(sim.node.command("conntrack").arg("-C"))
        .trim()
        .parse()
        .unwrap();
    assert!(count >= 6.0, "{count}");
    assert_eq!(
        s.get("eni_monitor_nf_conntrack_entries", &[]),
        Some(count),
        "{}",
        s.text
    );
    let max: f64 = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(s.get("eni_monitor_nf_conntrack_limit", &[]), Some(max));

    // conntrack -S: "cpu=0 found=0 invalid=3 insert=0 ..." per CPU, from ctnetlink.
    let mut kernel: BTreeMap<String, f64> = BTreeMap::new();
    for line in sh(sim.node.command("conntrack").arg("-S")).lines() {
        for field in line.split_whitespace().skip(1) {
            let (k, v) = field.split_once('=').unwrap();
            *kernel.entry(k.to_owned()).or_default() += v.parse::<f64>().unwrap();
        }
    }
    for (ours, theirs) in [
        ("found", "found"),
        ("invalid", "invalid"),
        ("insert", "insert"),
        ("insert_failed", "insert_failed"),
        ("drop", "drop"),
        ("early_drop", "early_drop"),
        ("icmp_error", "error"),
        ("search_restart", "search_restart"),
        ("clashres", "clash_resolve"),
        ("chainlength", "chaintoolong"),
    ] {
        assert_eq!(
            s.get("eni_monitor_nf_conntrack_events_total", &[("event", ours)]),
            Some(kernel[theirs]),
            "{ours}: {}",
            s.text
        );
    }
}
