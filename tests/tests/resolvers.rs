//! DNS numbers on a node that moves and next to a pod that misbehaves: a resolver moved
//! to dozens of addresses in turn, the current one stopping, a pod spraying thousands
//! of servers and flooding a dead one, the agent killed and restarted (and upgraded)
//! with queries in flight, then a fresh resolver. At every step the device's totals are
//! exact, the failing and the fresh resolver are named, and the series and the agent's
//! memory stay bounded.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::float_cmp,
    clippy::cast_precision_loss,
    clippy::too_many_lines
)]

use std::{net::SocketAddr, time::Duration};

use integration_tests::{
    Agent, BpfState, Scrape, SimNode, addr,
    dns::{self, OK_NAME, Resolver, SlowResolver},
    require_root, rss_mib,
};

const QUERIES: &str = "eni_monitor_dns_queries_total";
const RESPONSES: &str = "eni_monitor_dns_responses_total";
const UNANSWERED: &str = "eni_monitor_dns_unanswered_total";
const UNTRACKED: &str = "eni_monitor_dns_untracked_total";
const INFO: &str = "eni_monitor_dns_resolver_info";

/// What the test sent and what came back, to hold the agent's totals to.
#[derive(Debug, Default)]
struct Sent {
    queries: f64,
    answered: f64,
}

impl Sent {
    fn add(&mut self, queries: usize, answered: usize) {
        self.queries += queries as f64;
        self.answered += answered as f64;
    }
}

/// Waits until every query has ended (answered, swept unanswered, or untracked), then
/// holds the device's totals to what was sent: queries = answered + unanswered +
/// untracked, exactly.
fn settled(agent: &Agent, sim: &SimNode, sent: &Sent, what: &str) -> Scrape {
    let eth0 = [("device", "eth0")];
    let s = agent.scrape_until(&sim.node, what, |s| {
        s.sum(QUERIES, &eth0) == sent.queries
            && s.sum(RESPONSES, &eth0) + s.sum(UNANSWERED, &eth0) + s.sum(UNTRACKED, &eth0)
                == sent.queries
    });
    assert_eq!(s.sum(QUERIES, &eth0), sent.queries, "{what}\n{}", s.text);
    assert_eq!(s.sum(RESPONSES, &eth0), sent.answered, "{what}\n{}", s.text);
    assert_eq!(
        s.sum(UNANSWERED, &eth0) + s.sum(UNTRACKED, &eth0),
        sent.queries - sent.answered,
        "{what}\n{}",
        s.text
    );
    // Bounded series: Amazon's two resolvers, 16 others and `other`, on one device.
    let resolvers = s.label_values(QUERIES, &eth0, "resolver");
    assert!(resolvers.len() <= 19, "{what}: {resolvers:?}");
    assert!(
        s.samples().len() < 600,
        "{what}: {} series",
        s.samples().len()
    );
    s
}

fn named(s: &Scrape, resolver: &str) -> bool {
    s.get(INFO, &[("resolver", resolver), ("kind", "custom")]) == Some(1.0)
}

#[test]
fn dns_totals_stay_exact_through_churn_sprays_floods_and_restarts() {
    if !require_root("dns_totals_stay_exact_through_churn_sprays_floods_and_restarts") {
        return;
    }
    let sim = SimNode::ipv4_only();
    // CoreDNS rescheduled 24 times: one resolver, a new address each time.
    let moves: Vec<String> = (0..24).map(|i| format!("10.200.0.{}", 100 + i)).collect();
    for a in &moves {
        sim.vpc.ip(&format!("addr add {a}/32 dev vpc0"));
    }
    // And one no query reaches until the end: a fresh resolver.
    let fresh = "10.200.0.99";
    sim.vpc.ip(&format!("addr add {fresh}/32 dev vpc0"));
    let ips: Vec<_> = moves
        .iter()
        .map(String::as_str)
        .chain([fresh])
        .map(|a| a.parse().unwrap())
        .collect();
    let _resolver = Resolver::start(&sim.vpc, &ips);
    // Servers that never answer: the spray's (routed to the VPC, which drops them) and
    // a dead one the pod floods.
    sim.node
        .ip("route add 10.250.0.0/16 via 10.200.0.1 dev eth0");
    sim.vpc.ip("addr add 10.200.0.250/32 dev vpc0");
    sim.vpc.nft("table inet dead {\n chain input {\n  type filter hook input priority 0;\n  ip daddr 10.200.0.250 udp dport 53 drop\n }\n}\n");
    let state = BpfState::new(&format!("resolvers-{}", std::process::id()));
    let args_waiting = |dns_timeout| {
        [
            "--device",
            "eth0",
            "--dns-timeout",
            dns_timeout,
            "--resolver-idle",
            "3s",
        ]
    };
    let args = args_waiting("3s");
    let mut agent = Agent::start_with_state(&sim.node, &args, &state);
    let mut sent = Sent::default();
    let wait = Duration::from_secs(2);

    // 1. The resolver moves: each address answers a few queries, then the next.
    for (i, a) in moves.iter().enumerate() {
        let server = addr(a, 53);
        let answered = dns::from_one_socket(&sim.node, server, &[(OK_NAME, 5)], wait);
        assert_eq!(answered, 5, "{a}");
        sent.add(5, answered);
        if i % 6 == 5 {
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    let s = settled(&agent, &sim, &sent, "the resolver moved 24 times");
    assert_eq!(s.sum(UNANSWERED, &[]), 0.0);

    // 2. The current one stops answering: it is named, and its queries unanswered.
    let current = moves.last().unwrap();
    agent.scrape_until(&sim.node, "the current resolver named", |s| {
        named(s, current)
    });
    sim.vpc.nft(&format!("table inet stopped {{\n chain input {{\n  type filter hook input priority 0;\n  ip daddr {current} udp dport 53 drop\n }}\n}}\n"));
    let failed = dns::from_one_socket(&sim.node, addr(current, 53), &[(OK_NAME, 4)], wait);
    assert_eq!(failed, 0);
    sent.add(4, 0);
    let s = settled(&agent, &sim, &sent, "the current resolver stopped");
    assert!(named(&s, current), "{}", s.text);
    assert_eq!(
        s.get(
            UNANSWERED,
            &[
                ("device", "eth0"),
                ("resolver", current),
                ("transport", "udp")
            ]
        ),
        Some(4.0),
        "{}",
        s.text
    );

    // 3. A pod sprays 3000 servers, then floods a dead one with 20000 queries.
    let spray: Vec<SocketAddr> = (0..3000u32)
        .map(|i| addr(&format!("10.250.{}.{}", i / 250, 1 + i % 250), 53))
        .collect();
    dns::spray(&sim.node, spray);
    sent.add(3000, 0);
    dns::flood(&sim.node, addr("10.200.0.250", 53), 20_000);
    sent.add(20_000, 0);
    let s = settled(&agent, &sim, &sent, "a spray and a flood");
    assert!(
        s.get("eni_monitor_map_full_total", &[("map", "dns_inflight")]) > Some(0.0),
        "the flood filled sets of the in-flight table: {}",
        s.text
    );
    assert_eq!(
        s.get("eni_monitor_map_full_total", &[("map", "dns_counts")]),
        Some(0.0)
    );
    let maps = s.get("eni_monitor_kernel_map_memory_bytes", &[]).unwrap() / 1_048_576.0;
    assert!(maps < 16.0, "kernel maps {maps:.1} MiB");
    let rss = rss_mib(agent.pid());
    assert!(rss < 30.0, "agent RSS {rss:.1} MiB");
    eprintln!(
        "after the spray and the flood: {} series, resolvers {:?}, kernel maps {maps:.2} MiB, agent RSS {rss:.1} MiB, {} queries ended to make room",
        s.samples().len(),
        s.label_values(QUERIES, &[], "resolver"),
        s.get("eni_monitor_map_full_total", &[("map", "dns_inflight")])
            .unwrap_or(0.0),
    );
    // The clients reported are the node's own, at most --top (10) of them.
    let clients = s.label_values("eni_monitor_top_dns_clients_unanswered", &[], "address");
    assert_eq!(clients, ["10.200.0.2".to_owned()], "{}", s.text);

    // 4. Queries in flight when the agent is killed, and when it is upgraded, are
    //    answered after it is back, not swept as unanswered. The resolver holds its
    //    answers until the new agent serves (its classifiers attached), and that agent
    //    waits 30 s for an answer: they are in flight across the restart however long
    //    the verifier takes on the machine.
    sim.vpc.ip("addr add 10.200.0.251/32 dev vpc0");
    let slow = addr("10.200.0.251", 53);
    let restarted = args_waiting("30s");
    for restart in ["SIGKILL", "upgrade"] {
        let slow_server = SlowResolver::held(&sim.vpc, slow);
        let client = std::thread::spawn({
            let node = sim.node.name.clone();
            move || {
                integration_tests::enter(&node);
                let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                for id in 0..10u16 {
                    sock.send_to(&dns::query_packet(OK_NAME, id), slow).unwrap();
                }
                let mut buf = [0u8; 512];
                (0..10).filter(|_| sock.recv_from(&mut buf).is_ok()).count()
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        let down = std::time::Instant::now();
        if restart == "SIGKILL" {
            agent.kill();
        } else {
            agent.stop();
        }
        agent = Agent::start_with_state(&sim.node, &restarted, &state);
        eprintln!("{restart}: serving again after {:?}", down.elapsed());
        slow_server.release();
        let answered = client.join().unwrap();
        assert_eq!(answered, 10, "{restart}");
        sent.add(10, answered);
        let s = settled(&agent, &sim, &sent, restart);
        assert_eq!(s.sum(RESPONSES, &[]), sent.answered, "{restart}");
    }

    // 5. The fresh resolver: named, and counted under its name.
    let first = dns::from_one_socket(&sim.node, addr(fresh, 53), &[(OK_NAME, 3)], wait);
    sent.add(3, first);
    agent.scrape_until(&sim.node, "the fresh resolver named", |s| named(s, fresh));
    let answered = dns::from_one_socket(&sim.node, addr(fresh, 53), &[(OK_NAME, 7)], wait);
    assert_eq!(answered, 7);
    sent.add(7, answered);
    let s = settled(&agent, &sim, &sent, "a fresh resolver");
    assert!(
        s.get(
            QUERIES,
            &[
                ("device", "eth0"),
                ("resolver", fresh),
                ("transport", "udp")
            ]
        ) >= Some(7.0),
        "{}",
        s.text
    );
}
