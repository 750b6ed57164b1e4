//! The EC2 connection-tracking model end to end: real UDP flows and TCP connections
//! through the simulated ENIs, counted by the real flow table and expiry pass.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::float_cmp)]

use std::time::Duration;

use integration_tests::{
    Agent, SimNode, addr, monitor_bin, require_root,
    servers::{TcpHold, UdpEcho, tcp_connections, udp_flows},
};

const TRACKED: &str = "eni_monitor_tracked_flows";
const CREATED: &str = "eni_monitor_flows_created_total";
const IDLE: &str = "eni_monitor_tracked_flows_idle";

fn on<'a>(device: &'a str, protocol: &'a str) -> [(&'a str, &'a str); 2] {
    [("device", device), ("protocol", protocol)]
}

#[test]
fn udp_flows_and_tcp_connections_are_tracked_then_expire() {
    if !require_root("udp_flows_and_tcp_connections_are_tracked_then_expire") {
        return;
    }
    // IPv4 only: IPv6 would add neighbour discovery and listener reports as ICMP flows.
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let _echo = UdpEcho::start(&sim.vpc, addr(&eth0.vpc_v4, 7000));
    let _hold = TcpHold::start(&sim.vpc, addr(&eth0.vpc_v4, 8000));
    let agent = Agent::start(
        &sim.node,
        &[
            "--device",
            "eth0",
            "--udp-timeout",
            "2s",
            "--udp-stream-timeout",
            "3s",
            "--conntrack-allowance",
            "100",
        ],
    );

    assert_eq!(udp_flows(&sim.node, addr(&eth0.vpc_v4, 7000), 20), 20);
    let conns = tcp_connections(&sim.node, addr(&eth0.vpc_v4, 8000), 5);
    let s = agent.scrape_until(&sim.node, "20 UDP and 5 TCP flows", |s| {
        s.get(TRACKED, &on("eth0", "udp")) == Some(20.0)
            && s.get(TRACKED, &on("eth0", "tcp")) == Some(5.0)
    });
    assert_eq!(s.get(CREATED, &on("eth0", "udp")), Some(20.0), "{}", s.text);
    assert_eq!(s.get(CREATED, &on("eth0", "tcp")), Some(5.0), "{}", s.text);
    assert_eq!(s.get(TRACKED, &on("eth0", "icmp")), Some(0.0), "{}", s.text);
    assert_eq!(s.get("eni_monitor_flow_table_full_total", &[]), Some(0.0));
    // 25 tracked of the 100 the flag allows, instance-wide; a veth has no ENA
    // allowance statistics.
    assert_eq!(
        s.get("eni_monitor_conntrack_allowance_utilization_ratio", &[]),
        Some(0.25),
        "{}",
        s.text
    );
    assert_eq!(
        s.get("eni_monitor_conntrack_allowance", &[("source", "flag")]),
        Some(100.0)
    );
    assert_eq!(
        s.sum("eni_monitor_ena_allowance_exceeded_total", &[]),
        0.0,
        "{}",
        s.text
    );
    assert!(
        !s.text
            .contains("eni_monitor_ena_conntrack_allowance_available{"),
        "{}",
        s.text
    );

    // The UDP flows went both ways: they leave after the stream timeout; TCP stays.
    let s = agent.scrape_until(&sim.node, "UDP flows to expire", |s| {
        s.get(TRACKED, &on("eth0", "udp")) == Some(0.0)
    });
    assert_eq!(s.get(TRACKED, &on("eth0", "tcp")), Some(5.0), "{}", s.text);

    // Closed connections (FIN both ways) leave within the closed timeout.
    drop(conns);
    let s = agent.scrape_until(&sim.node, "closed TCP flows to leave", |s| {
        s.get(TRACKED, &on("eth0", "tcp")) == Some(0.0)
    });
    assert_eq!(s.get(CREATED, &on("eth0", "tcp")), Some(5.0), "{}", s.text);
}

#[test]
fn idle_ages_show_what_a_lower_timeout_would_free() {
    if !require_root("idle_ages_show_what_a_lower_timeout_would_free") {
        return;
    }
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let _hold = TcpHold::start(&sim.vpc, addr(&eth0.vpc_v4, 8000));
    let agent = Agent::start(
        &sim.node,
        &["--device", "eth0", "--conntrack-allowance", "100"],
    );
    // Seven connections left idle past a minute, then three new ones.
    let old = tcp_connections(&sim.node, addr(&eth0.vpc_v4, 8000), 7);
    std::thread::sleep(Duration::from_secs(65));
    let new = tcp_connections(&sim.node, addr(&eth0.vpc_v4, 8000), 3);
    let s = agent.scrape_until(&sim.node, "10 TCP flows", |s| {
        s.get(TRACKED, &on("eth0", "tcp")) == Some(10.0)
    });
    let idle =
        |class: &str, le: &str| s.get(IDLE, &[("device", "eth0"), ("class", class), ("le", le)]);
    // Idle under 60 s: the three new; under 120 s: all ten.
    for (le, n) in [
        ("60", 3.0),
        ("120", 10.0),
        ("350", 10.0),
        ("432000", 10.0),
        ("+Inf", 10.0),
    ] {
        assert_eq!(idle("tcp_established", le), Some(n), "le={le}: {}", s.text);
    }
    for class in ["tcp_closed", "udp", "udp_stream"] {
        assert_eq!(idle(class, "+Inf"), Some(0.0), "{class}: {}", s.text);
    }
    // EC2 at 60 s would have let the seven go: 3 of the 100 allowed, not 10.
    let status = sim
        .node
        .command(monitor_bin().to_str().unwrap())
        .args([
            "status",
            "--interval",
            "1s",
            "--endpoint",
            &format!("http://{}", agent.listen),
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(
        out.contains("  idle TCP      10 established; fewer at 60 s: 7 (3.0%)\n"),
        "{out}"
    );
    drop((old, new));
}

#[test]
fn flows_through_a_second_eni_count_there_only() {
    if !require_root("flows_through_a_second_eni_count_there_only") {
        return;
    }
    let mut sim = SimNode::ipv4_only();
    sim.add_eni("eth1");
    let (eth0, eth1) = (sim.eni("eth0"), sim.eni("eth1"));
    let _echo0 = UdpEcho::start(&sim.vpc, addr(&eth0.vpc_v4, 7000));
    let _echo1 = UdpEcho::start(&sim.vpc, addr(&eth1.vpc_v4, 7000));
    let agent = Agent::start(&sim.node, &["--device", "eth*"]);
    assert_eq!(udp_flows(&sim.node, addr(&eth0.vpc_v4, 7000), 3), 3);
    assert_eq!(udp_flows(&sim.node, addr(&eth1.vpc_v4, 7000), 11), 11);
    let s = agent.scrape_until(&sim.node, "flows on both ENIs", |s| {
        s.get(TRACKED, &on("eth0", "udp")) == Some(3.0)
            && s.get(TRACKED, &on("eth1", "udp")) == Some(11.0)
    });
    assert_eq!(s.get(CREATED, &on("eth1", "udp")), Some(11.0), "{}", s.text);
    assert_eq!(s.get(CREATED, &on("eth0", "udp")), Some(3.0), "{}", s.text);
}

#[test]
fn a_full_flow_table_counts_evictions_and_keeps_working() {
    if !require_root("a_full_flow_table_counts_evictions_and_keeps_working") {
        return;
    }
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let _echo = UdpEcho::start(&sim.vpc, addr(&eth0.vpc_v4, 7000));
    let agent = Agent::start(&sim.node, &["--device", "eth0", "--flow-table-size", "8"]);
    assert_eq!(udp_flows(&sim.node, addr(&eth0.vpc_v4, 7000), 20), 20);
    let s = agent.scrape_until(&sim.node, "a full table", |s| {
        s.get(TRACKED, &on("eth0", "udp")) == Some(8.0)
    });
    assert_eq!(s.get(CREATED, &on("eth0", "udp")), Some(8.0), "{}", s.text);
    // Each left-out flow was seen twice (request and reply) and counted each time.
    assert_eq!(
        s.get("eni_monitor_flow_table_full_total", &[]),
        Some(24.0),
        "{}",
        s.text
    );
    assert_eq!(agent.get(&sim.node, "/readyz").unwrap().0, 200);
}

#[test]
fn devices_that_come_and_go_are_attached_and_let_go() {
    if !require_root("devices_that_come_and_go_are_attached_and_let_go") {
        return;
    }
    let mut sim = SimNode::ipv4_only();
    let agent = Agent::start(&sim.node, &["--device", "eth*"]);
    let attached = |device: &'static str| {
        move |s: &integration_tests::Scrape| {
            s.get(
                "eni_monitor_program_attached",
                &[
                    ("program", "tc_egress"),
                    ("hook", "tc/egress"),
                    ("device", device),
                ],
            ) == Some(1.0)
        }
    };
    agent.scrape_until(&sim.node, "eth0 attached", attached("eth0"));

    // EKS attaches an ENI at run time.
    let started = std::time::Instant::now();
    sim.add_eni("eth1");
    agent.scrape_until(&sim.node, "eth1 attached", attached("eth1"));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    let eth1 = sim.eni("eth1");
    let _echo = UdpEcho::start(&sim.vpc, addr(&eth1.vpc_v4, 7000));
    assert_eq!(udp_flows(&sim.node, addr(&eth1.vpc_v4, 7000), 4), 4);
    agent.scrape_until(&sim.node, "flows on the new ENI", |s| {
        s.get(TRACKED, &on("eth1", "udp")) == Some(4.0)
    });

    // And detaches it: what it is goes at once; its counters stay, with their last
    // values, for a minute, so a scrape after the detach still sees how they ended.
    sim.node.ip("link del eth1");
    let s = agent.scrape_until(&sim.node, "eth1 gone", |s| {
        s.matching("eni_monitor_device_info", &[("device", "eth1")])
            .next()
            .is_none()
    });
    for gauge in ["eni_monitor_program_attached", TRACKED] {
        assert_eq!(
            s.matching(gauge, &[("device", "eth1")]).count(),
            0,
            "{gauge}: {}",
            s.text
        );
    }
    assert_eq!(s.get(CREATED, &on("eth1", "udp")), Some(4.0), "{}", s.text);
    assert!(attached("eth0")(&s), "{}", s.text);
    assert_eq!(agent.get(&sim.node, "/readyz").unwrap().0, 200);
}
