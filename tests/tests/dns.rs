//! DNS end to end: a real resolver (unbound) in the VPC namespace, real queries from the
//! node, counted by the real classifiers on eth0.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::float_cmp,
    clippy::cast_precision_loss
)]

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use integration_tests::{
    Agent, BpfState, SimNode, addr,
    dns::{self, NX_NAME, OK_NAME, REFUSED_NAME, Resolver, SERVFAIL_NAME},
    require_root, send_udp,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A series of `device` and `resolver` over UDP.
fn on(device: &str, resolver: &str) -> [(&'static str, String); 3] {
    [
        ("device", device.to_owned()),
        ("resolver", resolver.to_owned()),
        ("transport", "udp".to_owned()),
    ]
}

fn labels<'a>(l: &'a [(&'static str, String)]) -> Vec<(&'a str, &'a str)> {
    l.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

const QUERIES: &str = "eni_monitor_dns_queries_total";
const RESPONSES: &str = "eni_monitor_dns_responses_total";
const UNANSWERED: &str = "eni_monitor_dns_unanswered_total";
const LATENCY_COUNT: &str = "eni_monitor_dns_latency_seconds_count";

#[test]
fn answered_queries_are_counted_exactly_by_rcode() {
    if !require_root("answered_queries_are_counted_exactly_by_rcode") {
        return;
    }
    let sim = SimNode::new();
    let eth0 = sim.eni("eth0");
    let resolver = Resolver::start(&sim.vpc, &[ip(&eth0.vpc_v4), ip(&eth0.vpc_v6)]);
    let agent = Agent::start(&sim.node, &["--device", "eth0", "--dns-timeout", "1s"]);
    let v4 = SocketAddr::new(ip(&eth0.vpc_v4), 53);
    let v6 = SocketAddr::new(ip(&eth0.vpc_v6), 53);
    let wait = Duration::from_secs(2);
    // One query each (under `other`) has the agent name both.
    agent.name_resolver(&sim.node, &sim.node, v4);
    agent.name_resolver(&sim.node, &sim.node, v6);

    assert_eq!(dns::queries(&sim.node, v4, OK_NAME, 40, wait), 40);
    assert_eq!(dns::queries(&sim.node, v6, OK_NAME, 10, wait), 10);
    assert_eq!(dns::queries(&sim.node, v4, NX_NAME, 3, wait), 3);
    assert_eq!(dns::queries(&sim.node, v4, SERVFAIL_NAME, 2, wait), 2);
    assert_eq!(dns::queries(&sim.node, v4, REFUSED_NAME, 1, wait), 1);

    let l4 = on("eth0", &eth0.vpc_v4);
    let l6 = on("eth0", &eth0.vpc_v6);
    let s = agent.scrape_until(&sim.node, "58 responses", |s| s.sum(RESPONSES, &[]) >= 58.0);
    // Past the timeout, so that an unmatched query would have been swept as unanswered.
    std::thread::sleep(Duration::from_millis(1500));
    let s = {
        let again = agent.scrape(&sim.node);
        assert_eq!(again.sum(RESPONSES, &[]), s.sum(RESPONSES, &[]));
        again
    };
    assert_eq!(s.get(QUERIES, &labels(&l4)), Some(46.0), "{}", s.text);
    assert_eq!(s.get(QUERIES, &labels(&l6)), Some(10.0), "{}", s.text);
    let rcode = |l: &[(&'static str, String)], rcode: &str| {
        let mut v = labels(l);
        v.push(("rcode", rcode));
        s.get(RESPONSES, &v)
    };
    assert_eq!(rcode(&l4, "NOERROR"), Some(40.0), "{}", s.text);
    assert_eq!(rcode(&l6, "NOERROR"), Some(10.0), "{}", s.text);
    assert_eq!(rcode(&l4, "NXDOMAIN"), Some(3.0), "{}", s.text);
    assert_eq!(rcode(&l4, "SERVFAIL"), Some(2.0), "{}", s.text);
    assert_eq!(rcode(&l4, "REFUSED"), Some(1.0), "{}", s.text);
    assert_eq!(s.get(LATENCY_COUNT, &labels(&l4)), Some(46.0), "{}", s.text);
    assert_eq!(s.get(LATENCY_COUNT, &labels(&l6)), Some(10.0), "{}", s.text);
    // Every answer took under 5 s; the sum is positive and below count * 5 s.
    let sum = s
        .get("eni_monitor_dns_latency_seconds_sum", &labels(&l4))
        .unwrap();
    assert!(sum > 0.0 && sum < 46.0 * 5.0, "{sum}");
    let mut inf = labels(&l4);
    inf.push(("le", "+Inf"));
    assert_eq!(
        s.get("eni_monitor_dns_latency_seconds_bucket", &inf),
        Some(46.0)
    );
    assert_eq!(s.sum(UNANSWERED, &[]), 0.0, "{}", s.text);
    drop(resolver);
}

#[test]
fn queries_dropped_beyond_the_node_are_unanswered_once() {
    if !require_root("queries_dropped_beyond_the_node_are_unanswered_once") {
        return;
    }
    let sim = SimNode::new();
    let eth0 = sim.eni("eth0");
    let _resolver = Resolver::start(&sim.vpc, &[ip(&eth0.vpc_v4)]);
    // The resolver's side loses every query: the kernel of the node never sees a drop.
    sim.vpc.nft("table inet lossy {\n chain input {\n  type filter hook input priority 0;\n  iif != lo udp dport 53 drop\n }\n}\n");
    let agent = Agent::start(&sim.node, &["--device", "eth0", "--dns-timeout", "1s"]);
    let server = SocketAddr::new(ip(&eth0.vpc_v4), 53);
    // One query (unanswered, under `other`) has the agent name the resolver.
    agent.name_resolver(&sim.node, &sim.node, server);

    assert_eq!(
        dns::queries(&sim.node, server, OK_NAME, 5, Duration::from_millis(100)),
        0
    );
    // One client query sent three times with the same id: each copy went unanswered, the
    // first two replaced by the next before any response, the last timed out. Every
    // query packet ends answered or unanswered.
    dns::retransmit(&sim.node, server, OK_NAME, 3);

    let l = on("eth0", &eth0.vpc_v4);
    let s = agent.scrape_until(&sim.node, "8 unanswered", |s| {
        s.get(UNANSWERED, &labels(&l)) >= Some(8.0)
    });
    std::thread::sleep(Duration::from_millis(1500));
    let s2 = agent.scrape(&sim.node);
    assert_eq!(s2.get(UNANSWERED, &labels(&l)), Some(8.0), "{}", s.text);
    assert_eq!(s2.get(QUERIES, &labels(&l)), Some(8.0), "{}", s2.text);
    assert_eq!(s2.sum(RESPONSES, &[]), 0.0, "{}", s2.text);
    assert_eq!(
        s2.sum("eni_monitor_dns_drops_total", &[("device", "eth0")]),
        0.0,
        "{}",
        s2.text
    );
}

#[test]
fn responses_dropped_by_netfilter_on_the_node_are_kernel_drops() {
    if !require_root("responses_dropped_by_netfilter_on_the_node_are_kernel_drops") {
        return;
    }
    let sim = SimNode::new();
    let eth0 = sim.eni("eth0");
    let _resolver = Resolver::start(&sim.vpc, &[ip(&eth0.vpc_v4)]);
    sim.node.nft("table inet deny {\n chain input {\n  type filter hook input priority 0;\n  udp sport 53 drop\n }\n}\n");
    let agent = Agent::start(&sim.node, &["--device", "eth0", "--dns-timeout", "1s"]);
    let server = SocketAddr::new(ip(&eth0.vpc_v4), 53);
    // One query has the agent name the resolver: its response is dropped too (5 in all).
    agent.name_resolver(&sim.node, &sim.node, server);

    assert_eq!(
        dns::queries(&sim.node, server, OK_NAME, 4, Duration::from_millis(200)),
        0
    );
    let dropped = [("device", "eth0"), ("reason", "NETFILTER_DROP")];
    let l = on("eth0", &eth0.vpc_v4);
    agent.scrape_until(&sim.node, "5 drops", |s| {
        s.get("eni_monitor_dns_drops_total", &dropped) >= Some(5.0)
    });
    std::thread::sleep(Duration::from_millis(1500));
    let s = agent.scrape(&sim.node);
    assert_eq!(
        s.get("eni_monitor_dns_drops_total", &dropped),
        Some(5.0),
        "{}",
        s.text
    );
    assert_eq!(
        s.get(
            "eni_monitor_drops_total",
            &[("device", "eth0"), ("reason", "NETFILTER_DROP")]
        ),
        Some(5.0)
    );
    // The classifier saw the responses arrive before netfilter dropped them: they
    // matched their queries, so these are not also counted unanswered.
    assert_eq!(s.get(UNANSWERED, &labels(&l)), None, "{}", s.text);
    let mut noerror = labels(&l);
    noerror.push(("rcode", "NOERROR"));
    assert_eq!(s.get(RESPONSES, &noerror), Some(4.0), "{}", s.text);
}

#[test]
fn a_burst_to_the_link_local_resolver_shows_its_peak() {
    if !require_root("a_burst_to_the_link_local_resolver_shows_its_peak") {
        return;
    }
    let sim = SimNode::new();
    // The Amazon-provided resolver's address, served from inside the simulated VPC.
    sim.vpc.ip("addr add 169.254.169.253/32 dev vpc0");
    sim.node.ip("route add 169.254.169.253/32 dev eth0");
    let _resolver = Resolver::start(&sim.vpc, &[ip("169.254.169.253")]);
    let agent = Agent::start(&sim.node, &["--device", "eth0"]);
    let server = SocketAddr::new(ip("169.254.169.253"), 53);

    // Start just after a second boundary so the whole burst falls in one second: 50 ms
    // after it, clear of the programs' coarse clock, which lags by up to a tick.
    let now = integration_tests::monotonic();
    std::thread::sleep(
        Duration::from_millis(1050)
            .saturating_sub(Duration::from_nanos(u64::from(now.subsec_nanos()))),
    );
    // The resolver's socket may overflow under the burst; every query still left the node.
    let answered = dns::burst(&sim.node, server, OK_NAME, 300);
    assert!(answered > 0);

    let ll = [("device", "eth0"), ("service", "dns")];
    let s = agent.scrape_until(&sim.node, "300 link-local packets", |s| {
        s.get("eni_monitor_linklocal_packets_total", &ll) >= Some(300.0)
    });
    assert_eq!(
        s.get("eni_monitor_linklocal_packets_total", &ll),
        Some(300.0),
        "{}",
        s.text
    );
    assert_eq!(
        s.get(
            "eni_monitor_linklocal_packets_total",
            &[("device", "eth0"), ("service", "imds")]
        ),
        Some(0.0)
    );
    assert_eq!(
        s.get(
            "eni_monitor_linklocal_peak_packets_per_second",
            &[("device", "eth0")]
        ),
        Some(300.0),
        "{}",
        s.text
    );
    let l = on("eth0", "169.254.169.253");
    assert_eq!(s.get(QUERIES, &labels(&l)), Some(300.0), "{}", s.text);
    let mut noerror = labels(&l);
    noerror.push(("rcode", "NOERROR"));
    // Every response that reached the node was either read by the client or dropped
    // by the kernel at its full socket, and the agent accounts for both.
    let at_socket = s.get(
        "eni_monitor_dns_drops_total",
        &[("device", "eth0"), ("reason", "SOCKET_RCVBUFF")],
    );
    assert_eq!(
        s.get(RESPONSES, &noerror),
        Some(answered as f64 + at_socket.unwrap_or(0.0)),
        "{}",
        s.text
    );
}

#[test]
fn a_vpc_plus_two_resolver_given_on_the_command_line_is_linklocal() {
    if !require_root("a_vpc_plus_two_resolver_given_on_the_command_line_is_linklocal") {
        return;
    }
    let sim = SimNode::new();
    let eth0 = sim.eni("eth0");
    let _resolver = Resolver::start(&sim.vpc, &[ip(&eth0.vpc_v4)]);
    let agent = Agent::start(
        &sim.node,
        &["--device", "eth0", "--linklocal-resolver", &eth0.vpc_v4],
    );
    assert_eq!(
        dns::queries(
            &sim.node,
            SocketAddr::new(ip(&eth0.vpc_v4), 53),
            OK_NAME,
            7,
            Duration::from_secs(2)
        ),
        7
    );
    let ll = [("device", "eth0"), ("service", "dns")];
    let s = agent.scrape_until(&sim.node, "7 link-local packets", |s| {
        s.get("eni_monitor_linklocal_packets_total", &ll) >= Some(7.0)
    });
    assert_eq!(
        s.get("eni_monitor_linklocal_packets_total", &ll),
        Some(7.0),
        "{}",
        s.text
    );
    let vpc2 = on("eth0", &eth0.vpc_v4);
    assert_eq!(s.get(QUERIES, &labels(&vpc2)), Some(7.0), "{}", s.text);
    assert_eq!(
        s.get(
            "eni_monitor_dns_resolver_info",
            &[("resolver", eth0.vpc_v4.as_str()), ("kind", "amazon")]
        ),
        Some(1.0),
        "{}",
        s.text
    );
}

#[test]
fn a_dns_socket_that_never_reads_overflows_and_is_counted() {
    if !require_root("a_dns_socket_that_never_reads_overflows_and_is_counted") {
        return;
    }
    let sim = SimNode::new();
    let eth0 = sim.eni("eth0");
    let agent = Agent::start(&sim.node, &["--device", "eth0"]);
    let before = agent
        .scrape(&sim.node)
        .get(
            "eni_monitor_udp_receive_queue_drops_total",
            &[("port", "dns")],
        )
        .unwrap();
    let errors_before = sim.node.snmp("Udp", "RcvbufErrors");
    // A DNS server socket that never reads, with the smallest receive buffer.
    let addr = SocketAddr::new(ip(&eth0.node_v4), 53);
    let sock = sim.node.run(move || {
        let sock = std::net::UdpSocket::bind(addr).unwrap();
        integration_tests::set_rcvbuf(&sock, 1);
        sock
    });
    send_udp(&sim.vpc, addr, 400, &dns::query_packet(OK_NAME, 9));
    std::thread::sleep(Duration::from_millis(300));
    let overflowed = sim.node.snmp("Udp", "RcvbufErrors") - errors_before;
    assert!(overflowed > 300, "only {overflowed} of 400 overflowed");
    let s = agent.scrape(&sim.node);
    drop(sock);
    let counted = s
        .get(
            "eni_monitor_udp_receive_queue_drops_total",
            &[("port", "dns")],
        )
        .unwrap()
        - before;
    // The tracepoint sees every namespace (CoreDNS runs in a pod's): other tests'
    // overflows may add to it, never take away. The per-device count is exact.
    assert!(
        counted >= overflowed as f64,
        "{counted} < {overflowed}: {}",
        s.text
    );
    assert_eq!(
        s.get(
            "eni_monitor_dns_drops_total",
            &[("device", "eth0"), ("reason", "SOCKET_RCVBUFF")]
        ),
        Some(overflowed as f64),
        "{}",
        s.text
    );
}

#[test]
fn queries_a_stopped_agent_left_waiting_are_untracked_not_unanswered() {
    if !require_root("queries_a_stopped_agent_left_waiting_are_untracked_not_unanswered") {
        return;
    }
    // A server that never answers: what its queries became while no agent watched cannot
    // be known, so a restart (a rollout) does not count them unanswered.
    let sim = SimNode::ipv4_only();
    sim.vpc.ip("addr add 10.200.0.250/32 dev vpc0");
    sim.vpc.nft("table inet dead {\n chain input {\n  type filter hook input priority 0;\n  ip daddr 10.200.0.250 udp dport 53 drop\n }\n}\n");
    let state = BpfState::new(&format!("untracked-{}", std::process::id()));
    let args = ["--device", "eth0", "--dns-timeout", "3s"];
    let mut agent = Agent::start_with_state(&sim.node, &args, &state);
    let dead = addr("10.200.0.250", 53);
    let eth0 = [("device", "eth0")];
    for id in 1..=5u16 {
        send_udp(&sim.node, dead, 1, &dns::query_packet(OK_NAME, id));
    }
    agent.scrape_until(&sim.node, "five queries", |s| s.sum(QUERIES, &eth0) == 5.0);
    agent.kill();
    agent = Agent::start_with_state(&sim.node, &args, &state);
    let s = agent.scrape_until(&sim.node, "the five swept", |s| {
        s.sum("eni_monitor_dns_untracked_total", &eth0) == 5.0
    });
    assert_eq!(s.sum(UNANSWERED, &eth0), 0.0, "{}", s.text);
    // The new agent's own queries to it are unanswered, as ever.
    for id in 6..=8u16 {
        send_udp(&sim.node, dead, 1, &dns::query_packet(OK_NAME, id));
    }
    let s = agent.scrape_until(&sim.node, "three unanswered", |s| {
        s.sum(UNANSWERED, &eth0) == 3.0
    });
    assert_eq!(s.sum(QUERIES, &eth0), 8.0, "{}", s.text);
    assert_eq!(s.sum("eni_monitor_dns_untracked_total", &eth0), 5.0);
}
