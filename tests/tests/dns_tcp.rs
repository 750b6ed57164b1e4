//! DNS over TCP end to end: a node-local cache (unbound) forwarding to the VPC's resolver
//! over TCP, clients pipelining queries, an upstream that stops answering, connections
//! refused or never answered, and a truncated UDP answer retried over TCP; counted by
//! the real classifiers on eth0 with `transport="tcp"`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::float_cmp)]

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use integration_tests::{
    Agent, Scrape, SimNode,
    dns::{self, BIG_NAME, NX_NAME, OK_NAME, Resolver},
    dns_tcp::{self, NodeLocalCache, SilentTcp},
    require_root,
};

const QUERIES: &str = "eni_monitor_dns_queries_total";
const RESPONSES: &str = "eni_monitor_dns_responses_total";
const UNANSWERED: &str = "eni_monitor_dns_unanswered_total";
const LATENCY_COUNT: &str = "eni_monitor_dns_latency_seconds_count";
const CONNECT_FAILURES: &str = "eni_monitor_dns_tcp_connect_failures_total";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The sum of `name` on eth0 over `transport`.
fn over(s: &Scrape, name: &str, transport: &str) -> f64 {
    s.sum(name, &[("device", "eth0"), ("transport", transport)])
}

fn rcode(s: &Scrape, transport: &str, rcode: &str) -> f64 {
    s.sum(
        RESPONSES,
        &[
            ("device", "eth0"),
            ("transport", transport),
            ("rcode", rcode),
        ],
    )
}

/// Scrapes until `done`, then once more past the timeout: nothing may have moved.
fn settled(agent: &Agent, sim: &SimNode, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let s = agent.scrape_until(&sim.node, what, done);
    std::thread::sleep(Duration::from_millis(1500));
    let again = agent.scrape(&sim.node);
    for name in [QUERIES, RESPONSES, UNANSWERED, CONNECT_FAILURES] {
        assert_eq!(
            again.sum(name, &[]),
            s.sum(name, &[]),
            "{name} moved: {}",
            again.text
        );
    }
    again
}

#[test]
fn a_node_local_cache_forwarding_over_tcp_is_counted_exactly() {
    if !require_root("a_node_local_cache_forwarding_over_tcp_is_counted_exactly") {
        return;
    }
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let _resolver = Resolver::start(&sim.vpc, &[ip(&eth0.vpc_v4)]);
    let cache_ip = ip("169.254.20.10");
    let _cache = NodeLocalCache::start(&sim.node, cache_ip, ip(&eth0.vpc_v4));
    let agent = Agent::start(&sim.node, &["--device", "eth0", "--dns-timeout", "1s"]);
    let cache = SocketAddr::new(cache_ip, 53);
    let wait = Duration::from_secs(2);
    // A pod-like client asks the cache over UDP (on the node: nothing crosses eth0); the
    // cache asks the VPC's resolver over TCP, once for each name it has not cached.
    assert_eq!(dns::query(&sim.node, cache, OK_NAME, 1, wait), Some(0));
    assert_eq!(dns::query(&sim.node, cache, OK_NAME, 2, wait), Some(0));
    for i in 0..10u16 {
        let name = format!("q{i}.{NX_NAME}");
        assert_eq!(dns::query(&sim.node, cache, &name, 10 + i, wait), Some(3));
    }
    let s = settled(&agent, &sim, "11 answers over TCP", |s| {
        over(s, RESPONSES, "tcp") >= 11.0
    });
    assert_eq!(over(&s, QUERIES, "tcp"), 11.0, "{}", s.text);
    assert_eq!(rcode(&s, "tcp", "NOERROR"), 1.0, "{}", s.text);
    assert_eq!(rcode(&s, "tcp", "NXDOMAIN"), 10.0, "{}", s.text);
    assert_eq!(over(&s, LATENCY_COUNT, "tcp"), 11.0, "{}", s.text);
    assert_eq!(s.sum(UNANSWERED, &[]), 0.0, "{}", s.text);
    assert_eq!(s.sum(QUERIES, &[("transport", "udp")]), 0.0, "{}", s.text);
    assert_eq!(s.sum(CONNECT_FAILURES, &[]), 0.0, "{}", s.text);
}

#[test]
fn pipelined_queries_and_several_in_one_segment_are_matched() {
    if !require_root("pipelined_queries_and_several_in_one_segment_are_matched") {
        return;
    }
    let sim = SimNode::new();
    let eth0 = sim.eni("eth0");
    let _resolver = Resolver::start(&sim.vpc, &[ip(&eth0.vpc_v4), ip(&eth0.vpc_v6)]);
    let agent = Agent::start(&sim.node, &["--device", "eth0", "--dns-timeout", "1s"]);
    let v4 = SocketAddr::new(ip(&eth0.vpc_v4), 53);
    let v6 = SocketAddr::new(ip(&eth0.vpc_v6), 53);
    let wait = Duration::from_secs(2);
    // Three queries in one segment, two more in the next, on one connection.
    let answers = dns_tcp::pipelined(
        &sim.node,
        v4,
        &[
            &[(OK_NAME, 1), (NX_NAME, 2), (OK_NAME, 3)],
            &[(OK_NAME, 4), (NX_NAME, 5)],
        ],
        wait,
    );
    assert_eq!(answers.len(), 5, "{answers:?}");
    let answers = dns_tcp::pipelined(&sim.node, v6, &[&[(OK_NAME, 1), (OK_NAME, 2)]], wait);
    assert_eq!(answers.len(), 2, "{answers:?}");
    let s = settled(&agent, &sim, "7 answers over TCP", |s| {
        over(s, RESPONSES, "tcp") >= 7.0
    });
    assert_eq!(over(&s, QUERIES, "tcp"), 7.0, "{}", s.text);
    assert_eq!(rcode(&s, "tcp", "NOERROR"), 5.0, "{}", s.text);
    assert_eq!(rcode(&s, "tcp", "NXDOMAIN"), 2.0, "{}", s.text);
    assert_eq!(over(&s, LATENCY_COUNT, "tcp"), 7.0, "{}", s.text);
    assert_eq!(s.sum(UNANSWERED, &[]), 0.0, "{}", s.text);
    assert_eq!(s.sum(QUERIES, &[("transport", "udp")]), 0.0, "{}", s.text);
}

#[test]
fn forty_and_two_hundred_pipelined_queries_are_counted_with_their_answers() {
    if !require_root("forty_and_two_hundred_pipelined_queries_are_counted_with_their_answers") {
        return;
    }
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let _resolver = Resolver::start(&sim.vpc, &[ip(&eth0.vpc_v4)]);
    let agent = Agent::start(&sim.node, &["--device", "eth0", "--dns-timeout", "2s"]);
    let server = SocketAddr::new(ip(&eth0.vpc_v4), 53);
    // 40 queries written at once, as a busy forwarder pipelines them, then 200: each
    // write one or a few segments (the larger cut inside messages), answered in as many
    // as the server writes.
    let forty: Vec<(&str, u16)> = (1..=40).map(|id| (OK_NAME, id)).collect();
    let two_hundred: Vec<(&str, u16)> = (41..=240).map(|id| (OK_NAME, id)).collect();
    let wait = Duration::from_secs(5);
    let answers = dns_tcp::pipelined(&sim.node, server, &[&forty], wait);
    assert_eq!(answers.len(), 40, "{answers:?}");
    let answers = dns_tcp::pipelined(&sim.node, server, &[&two_hundred], wait);
    assert_eq!(answers.len(), 200, "{answers:?}");
    let s = settled(&agent, &sim, "240 answers over TCP", |s| {
        over(s, RESPONSES, "tcp") >= 240.0
    });
    assert_eq!(over(&s, QUERIES, "tcp"), 240.0, "{}", s.text);
    assert_eq!(rcode(&s, "tcp", "NOERROR"), 240.0, "{}", s.text);
    assert_eq!(over(&s, LATENCY_COUNT, "tcp"), 240.0, "{}", s.text);
    assert_eq!(s.sum(UNANSWERED, &[]), 0.0, "{}", s.text);
    assert_eq!(
        s.get("eni_monitor_dns_tcp_unread_segments_total", &[]),
        Some(0.0),
        "{}",
        s.text
    );
}

#[test]
fn a_truncated_udp_answer_retried_over_tcp_counts_once_on_each() {
    if !require_root("a_truncated_udp_answer_retried_over_tcp_counts_once_on_each") {
        return;
    }
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let _resolver = Resolver::start(&sim.vpc, &[ip(&eth0.vpc_v4)]);
    let agent = Agent::start(&sim.node, &["--device", "eth0", "--dns-timeout", "1s"]);
    let server = SocketAddr::new(ip(&eth0.vpc_v4), 53);
    assert_eq!(
        dns_tcp::udp_truncated(&sim.node, server, BIG_NAME, 77),
        Some((true, 0)),
        "the answer does not fit 512 bytes"
    );
    let answers = dns_tcp::pipelined(
        &sim.node,
        server,
        &[&[(BIG_NAME, 77)]],
        Duration::from_secs(2),
    );
    assert_eq!(answers.get(&77), Some(&0));
    let s = settled(&agent, &sim, "an answer on each transport", |s| {
        over(s, RESPONSES, "tcp") >= 1.0 && over(s, RESPONSES, "udp") >= 1.0
    });
    for transport in ["udp", "tcp"] {
        assert_eq!(over(&s, QUERIES, transport), 1.0, "{transport}: {}", s.text);
        assert_eq!(
            rcode(&s, transport, "NOERROR"),
            1.0,
            "{transport}: {}",
            s.text
        );
        assert_eq!(
            over(&s, LATENCY_COUNT, transport),
            1.0,
            "{transport}: {}",
            s.text
        );
    }
    assert_eq!(s.sum(UNANSWERED, &[]), 0.0, "{}", s.text);
}

#[test]
fn an_upstream_that_stops_answering_leaves_exact_unanswered_and_failed_connects() {
    if !require_root("an_upstream_that_stops_answering_leaves_exact_unanswered_and_failed_connects")
    {
        return;
    }
    let sim = SimNode::ipv4_only();
    // Beside the resolver's address: one that accepts and never answers, one where
    // nothing listens (refused), one whose SYNs the VPC drops (never answered).
    for host in [53, 54, 55] {
        sim.vpc.ip(&format!("addr add 10.200.0.{host}/24 dev vpc0"));
    }
    sim.vpc.nft("table inet blackhole {\n chain input {\n  type filter hook input priority 0;\n  ip daddr 10.200.0.55 tcp dport 53 drop\n }\n}\n");
    let silent = SocketAddr::new(ip("10.200.0.53"), 53);
    let _upstream = SilentTcp::start(&sim.vpc, silent);
    let agent = Agent::start(&sim.node, &["--device", "eth0", "--dns-timeout", "1s"]);
    // Four queries, three in one segment: none answered.
    let answers = dns_tcp::pipelined(
        &sim.node,
        silent,
        &[&[(OK_NAME, 1), (OK_NAME, 2), (OK_NAME, 3)], &[(OK_NAME, 4)]],
        Duration::from_millis(1500),
    );
    assert!(answers.is_empty(), "{answers:?}");
    let refused = SocketAddr::new(ip("10.200.0.54"), 53);
    assert_eq!(
        dns_tcp::connect_attempts(&sim.node, refused, 3, Duration::from_secs(2)),
        (3, 0)
    );
    // Given up before the first retransmission of the SYN (1 s): one SYN each.
    let dropped = SocketAddr::new(ip("10.200.0.55"), 53);
    assert_eq!(
        dns_tcp::connect_attempts(&sim.node, dropped, 2, Duration::from_millis(300)),
        (0, 2)
    );
    let s = settled(&agent, &sim, "4 unanswered and 5 failed connections", |s| {
        over(s, UNANSWERED, "tcp") >= 4.0 && s.sum(CONNECT_FAILURES, &[]) >= 5.0
    });
    assert_eq!(over(&s, QUERIES, "tcp"), 4.0, "{}", s.text);
    assert_eq!(over(&s, UNANSWERED, "tcp"), 4.0, "{}", s.text);
    assert_eq!(over(&s, RESPONSES, "tcp"), 0.0, "{}", s.text);
    assert_eq!(
        s.sum(CONNECT_FAILURES, &[("device", "eth0")]),
        5.0,
        "{}",
        s.text
    );
    assert_eq!(
        s.sum(UNANSWERED, &[("transport", "udp")]),
        0.0,
        "{}",
        s.text
    );
}
