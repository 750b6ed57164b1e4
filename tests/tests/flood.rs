//! One client's flood does not move another's DNS numbers: while the node floods a
//! server that never answers from its address on eth0, a client on eth1 whose resolver
//! answers in 300 ms has its queries counted answered and none unanswered, and a second
//! client on eth0 itself keeps its queries tracked. What the table could not keep is
//! untracked, never unanswered; every device's totals add up exactly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::float_cmp,
    clippy::cast_precision_loss
)]

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use integration_tests::{
    Agent, Scrape, SimNode, addr,
    dns::{OK_NAME, SlowResolver, query_packet},
    enter, require_root,
};

const QUERIES: &str = "eni_monitor_dns_queries_total";
const RESPONSES: &str = "eni_monitor_dns_responses_total";
const UNANSWERED: &str = "eni_monitor_dns_unanswered_total";
const UNTRACKED: &str = "eni_monitor_dns_untracked_total";

/// Queries from `from` to `server` as fast as one socket sends them, for `how_long`,
/// nothing read; how many were sent. Runs in a thread of its own inside `ns`, the test's
/// own namespace.
fn flood(ns: &str, from: SocketAddr, server: SocketAddr, how_long: Duration) -> u64 {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        enter(&ns);
        let sock = UdpSocket::bind(from).unwrap();
        let deadline = Instant::now() + how_long;
        let mut sent = 0u64;
        while Instant::now() < deadline {
            for _ in 0..256 {
                let id = u16::try_from(sent % 65_536).unwrap();
                if sock.send_to(&query_packet(OK_NAME, id), server).is_ok() {
                    sent += 1;
                }
            }
        }
        sent
    })
    .join()
    .unwrap()
}

/// `rounds` of `per_round` queries from `from` to `server`, a round a second, each
/// read back; (sent, answered).
fn steady(
    ns: &str,
    from: SocketAddr,
    server: SocketAddr,
    rounds: u16,
    per_round: u16,
) -> (u64, u64) {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        enter(&ns);
        let sock = UdpSocket::bind(from).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let (mut sent, mut answered) = (0u64, 0u64);
        let mut buf = [0u8; 512];
        for r in 0..rounds {
            let start = Instant::now();
            for i in 0..per_round {
                sock.send_to(&query_packet(OK_NAME, r * per_round + i + 1), server)
                    .unwrap();
                sent += 1;
            }
            while start.elapsed() < Duration::from_secs(1) {
                if sock.recv_from(&mut buf).is_ok() {
                    answered += 1;
                }
            }
        }
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            if sock.recv_from(&mut buf).is_ok() {
                answered += 1;
            }
        }
        (sent, answered)
    })
    .join()
    .unwrap()
}

/// A device's totals, once nothing is in flight: queries = responses + unanswered +
/// untracked.
fn totals(s: &Scrape, device: &str) -> (f64, f64, f64, f64) {
    let d = [("device", device)];
    (
        s.sum(QUERIES, &d),
        s.sum(RESPONSES, &d),
        s.sum(UNANSWERED, &d),
        s.sum(UNTRACKED, &d),
    )
}

#[test]
fn a_flood_on_one_client_leaves_the_others_answered_and_tracked() {
    if !require_root("a_flood_on_one_client_leaves_the_others_answered_and_tracked") {
        return;
    }
    let mut sim = SimNode::ipv4_only();
    sim.add_eni("eth1");
    // A second client on eth0 beside the flooder (the node's own address there).
    sim.node.ip("addr add 10.200.0.3/24 dev eth0");
    // The flooded server never answers; the two resolvers answer in 300 ms.
    sim.vpc.ip("addr add 10.200.0.250/32 dev vpc0");
    sim.vpc.nft("table inet dead {\n chain input {\n  type filter hook input priority 0;\n  ip daddr 10.200.0.250 udp dport 53 drop\n }\n}\n");
    let slow = Duration::from_millis(300);
    let _eth0_resolver = SlowResolver::start(&sim.vpc, addr("10.200.0.1", 53), slow);
    let _eth1_resolver = SlowResolver::start(&sim.vpc, addr("10.201.0.1", 53), slow);
    let agent = Agent::start(&sim.node, &["--device", "eth*", "--dns-timeout", "2s"]);

    let flooding = std::thread::spawn({
        let node = sim.node.name.clone();
        move || {
            flood(
                &node,
                addr("10.200.0.2", 0),
                addr("10.200.0.250", 53),
                Duration::from_secs(14),
            )
        }
    });
    // The flood holds its share of the table before the others begin.
    std::thread::sleep(Duration::from_secs(2));
    let beside = std::thread::spawn({
        let node = sim.node.name.clone();
        move || {
            steady(
                &node,
                addr("10.200.0.3", 0),
                addr("10.200.0.1", 53),
                10,
                100,
            )
        }
    });
    let (sent1, answered1) = steady(
        &sim.node.name,
        addr("10.201.0.2", 0),
        addr("10.201.0.1", 53),
        10,
        100,
    );
    let (sent2, answered2) = beside.join().unwrap();
    let flooded = flooding.join().unwrap() as f64;
    assert_eq!((sent1, sent2), (1000, 1000));
    assert!(
        answered1 >= 990 && answered2 >= 990,
        "{answered1} {answered2}"
    );

    // Everything in flight ends within the timeout and a sweep.
    let s = agent.scrape_until(&sim.node, "every query ended", |s| {
        let (q0, r0, u0, t0) = totals(s, "eth0");
        let (q1, r1, u1, t1) = totals(s, "eth1");
        q0 == flooded + sent2 as f64
            && q0 == r0 + u0 + t0
            && q1 == sent1 as f64
            && q1 == r1 + u1 + t1
    });
    let (q0, r0, u0, t0) = totals(&s, "eth0");
    let (q1, r1, u1, t1) = totals(&s, "eth1");
    eprintln!(
        "flood: {flooded} queries; eth1 client: {sent1} sent, {answered1} answered, counted {r1} answered / {u1} unanswered / {t1} untracked; eth0 client beside the flood: {sent2} sent, {answered2} answered, counted {r0} answered; eth0 in all: {q0} queries, {u0} unanswered, {t0} untracked; dns_inflight full {:?}",
        s.get("eni_monitor_map_full_total", &[("map", "dns_inflight")])
    );
    // The client on eth1: every query it had answered is counted answered, none
    // unanswered.
    assert_eq!(q1, sent1 as f64, "{}", s.text);
    assert_eq!(r1, answered1 as f64, "{}", s.text);
    assert_eq!(u1, 0.0, "{}", s.text);
    assert_eq!(t1, q1 - r1, "{}", s.text);
    // The client beside the flooder: at least 90% of its queries tracked to their
    // answer (every answer it got is one it was sent, so these are its own).
    assert!(
        r0 >= 0.9 * answered2 as f64,
        "{r0} of {answered2}\n{}",
        s.text
    );
    // The flooder's queries: all unanswered or untracked, exactly, with the beside
    // client's queries the table could not keep.
    assert_eq!(u0 + t0, flooded + sent2 as f64 - r0, "{}", s.text);
    assert!(t0 > 0.0 && u0 > 0.0, "{}", s.text);
    // The full table is said, and the flooder named among the failing clients.
    assert!(
        s.get("eni_monitor_map_full_total", &[("map", "dns_inflight")]) > Some(0.0),
        "{}",
        s.text
    );
    let top = s.label_values(
        "eni_monitor_top_dns_clients_unanswered",
        &[("device", "eth0")],
        "address",
    );
    assert!(
        top.contains(&"10.200.0.2".to_owned()),
        "{top:?}\n{}",
        s.text
    );
    assert!(!top.contains(&"10.200.0.3".to_owned()), "{top:?}");
}
