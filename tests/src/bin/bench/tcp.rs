//! DNS over TCP: what a segment carrying a DNS message costs the classifiers, and what a
//! TCP segment that is not DNS costs, each over an empty classifier in the same run. One
//! connection, one query written and its answer read at a time, so nearly every segment
//! carries a message (the acknowledgements ride on the data); the same exchange over UDP
//! beside it. One packet at a time, each program runs with caches the network stack and
//! the client have just used: dearer than the back-to-back packets of the programs
//! section.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use crate::cost::{bpf_stats, floor_classifiers, over_floor, prog_stats, record_cost};
use crate::report::{Report, runs, stat};
use integration_tests::{
    Agent, Netns, SimNode,
    dns::{OK_NAME, Resolver, query_packet},
    servers::TcpEcho,
};

/// Queries and their answers from one UDP socket in `ns` for `dur`, one at a time: the
/// same exchange as `ping_pong`, over UDP.
fn ping_pong_udp(ns: &Netns, server: SocketAddr, dur: Duration) -> u64 {
    ns.run(move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.connect(server).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let end = Instant::now() + dur;
        let mut n = 0u64;
        let mut buf = vec![0u8; 2048];
        while Instant::now() < end {
            sock.send(&query_packet(OK_NAME, (n % 65_536) as u16))
                .unwrap();
            sock.recv(&mut buf).unwrap();
            n += 1;
        }
        n
    })
}

/// Queries and their answers over one connection from `ns` for `dur`, one at a time;
/// how many were answered.
fn ping_pong(ns: &Netns, server: SocketAddr, udp: bool, dur: Duration) -> u64 {
    if udp {
        return ping_pong_udp(ns, server, dur);
    }
    ns.run(move || {
        let mut conn = TcpStream::connect(server).unwrap();
        conn.set_nodelay(true).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let end = Instant::now() + dur;
        let mut n = 0u64;
        let mut buf = vec![0u8; 2048];
        while Instant::now() < end {
            let q = query_packet(OK_NAME, (n % 65_536) as u16);
            let mut m = u16::try_from(q.len()).unwrap().to_be_bytes().to_vec();
            m.extend_from_slice(&q);
            conn.write_all(&m).unwrap();
            let mut len = [0u8; 2];
            conn.read_exact(&mut len).unwrap();
            let len = usize::from(u16::from_be_bytes(len));
            conn.read_exact(&mut buf[..len]).unwrap();
            n += 1;
        }
        n
    })
}

/// Section `tcp`: a DNS-over-TCP segment (unbound answering), and a TCP segment that is
/// not DNS (an echo server on another port, the same bytes), over the floor; and the
/// agent's count of TCP queries against the client's.
pub(crate) fn tcp_segments(report: &mut Report) {
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let vpc: std::net::IpAddr = eth0.vpc_v4.parse().unwrap();
    let _resolver = Resolver::start(&sim.vpc, &[vpc]);
    let _echo = TcpEcho::start(&sim.vpc, SocketAddr::new(vpc, 7001));
    let agent = Agent::start(&sim.node, &["--device", "eth0", "--dns-timeout", "2s"]);
    let floor = floor_classifiers(&sim.node, "eth0");
    let names = ["tc_ingress", "tc_egress", "floor_tc"];
    bpf_stats(true);
    let mut counted = Vec::new();
    for (case, port, udp) in [
        ("DNS over TCP", 53, false),
        ("DNS over UDP, one at a time", 53, true),
        ("TCP, not DNS", 7001, false),
    ] {
        let mut per: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for _ in 0..runs() {
            let before = agent.scrape(&sim.node);
            let progs_before = prog_stats();
            let sent = ping_pong(
                &sim.node,
                SocketAddr::new(vpc, port),
                udp,
                Duration::from_secs(2),
            );
            let progs_after = prog_stats();
            record_cost(&mut per, &names, &progs_before, &progs_after);
            if port == 53 && !udp {
                let after = agent.scrape(&sim.node);
                let tcp = [("device", "eth0"), ("transport", "tcp")];
                let q = "eni_monitor_dns_queries_total";
                counted.push(after.sum(q, &tcp) - before.sum(q, &tcp) - sent as f64);
            }
        }
        if let Some(v) = per.get("floor_tc") {
            report.add(
                "tcp",
                format!("{case}: floor, empty classifier"),
                "ns",
                stat(v.clone()),
                None,
            );
        }
        for (n, what) in [("tc_egress", "query"), ("tc_ingress", "answer")] {
            let Some(s) = over_floor(&per, n, "floor_tc") else {
                continue;
            };
            // A DNS message over TCP: the DNS budget. The others are what it compares
            // with: the same exchange over UDP, and TCP segments that are not DNS, whose
            // cost the TCP path must not raise (compared with the release before it by
            // running this section with MONITOR_BIN set to that release's binary).
            let row = if port == 53 {
                format!("{case}: {n} over the floor, per {what}")
            } else {
                format!("{case}: {n} over the floor, per segment")
            };
            let target = (port == 53 && !udp).then(|| ("<= 300 ns".to_owned(), s.median <= 300.0));
            report.add("tcp", row, "ns/pkt", s, target);
        }
    }
    bpf_stats(false);
    drop(floor);
    let s = stat(counted);
    report.add(
        "tcp",
        "queries over TCP: agent - client sent",
        "queries",
        s,
        Some(("0 (exact)".into(), s.min == 0.0 && s.max == 0.0)),
    );
}
