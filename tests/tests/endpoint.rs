//! What a pod on the node can do to the endpoint: a thousand connections that trickle
//! their headers (10 KiB a second each) and never finish, and readers that take a scrape
//! one byte at a time.
//! The agent's memory stays within its budget, `/healthz` answers the kubelet within
//! 500 ms throughout, and a well-behaved scrape succeeds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use integration_tests::{Agent, SimNode, enter, require_root, rss_mib, wire};

/// The attacker's source: another address of the node's loopback, as a pod has its own.
const ATTACKER: &str = "127.0.0.2:0";

fn connect(agent: SocketAddr) -> Option<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    sock.bind(&ATTACKER.parse::<SocketAddr>().unwrap().into())
        .ok()?;
    sock.connect_timeout(&agent.into(), Duration::from_secs(1))
        .ok()?;
    Some(sock.into())
}

/// Holds `n` connections that each trickle a KiB of one header every round (never its
/// end); opens a new one for each the agent closes. Counts the connections opened.
fn slowloris(ns: &str, agent: SocketAddr, n: usize, stop: &AtomicBool, opened: &AtomicU64) {
    enter(ns);
    let mut conns: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for c in &mut conns {
            if c.is_none() {
                *c = connect(agent).map(|mut s| {
                    opened.fetch_add(1, Ordering::Relaxed);
                    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ");
                    s
                });
            }
            let alive = c
                .as_mut()
                .is_some_and(|s| s.write_all(&[b'a'; 1024]).is_ok());
            if !alive {
                *c = None;
            }
        }
        round += 1;
        std::thread::sleep(Duration::from_millis(if round < 3 { 10 } else { 100 }));
    }
}

/// Asks for scrapes with a small receive buffer and reads them a byte at a time.
fn slow_readers(ns: &str, agent: SocketAddr, n: usize, stop: &AtomicBool) {
    enter(ns);
    let mut conns: Vec<TcpStream> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        while conns.len() < n {
            let Some(mut s) = connect(agent) else { break };
            let _ = socket2::SockRef::from(&s).set_recv_buffer_size(1024);
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
            conns.push(s);
        }
        let mut byte = [0u8; 1];
        conns.retain_mut(|s| {
            s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
            !matches!(s.read(&mut byte), Ok(0))
        });
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One GET from the node's own address: (status, 0 when none came; how long it took).
fn timed_get(agent: SocketAddr, path: &str) -> (u16, Duration) {
    let started = Instant::now();
    let code = wire::http_get(agent, path, Duration::from_secs(5)).map_or(0, |(code, _)| code);
    (code, started.elapsed())
}

#[test]
fn slow_clients_neither_grow_the_agent_nor_shut_out_the_probes() {
    if !require_root("slow_clients_neither_grow_the_agent_nor_shut_out_the_probes") {
        return;
    }
    let sim = SimNode::ipv4_only();
    let agent = Agent::start(&sim.node, &["--device", "eth0"]);
    let at = agent.listen;
    let idle_rss = rss_mib(agent.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    let loris = std::thread::spawn({
        let (ns, stop, opened) = (
            sim.node.name.clone(),
            Arc::clone(&stop),
            Arc::clone(&opened),
        );
        move || slowloris(&ns, at, 1000, &stop, &opened)
    });
    let readers = std::thread::spawn({
        let (ns, stop) = (sim.node.name.clone(), Arc::clone(&stop));
        move || slow_readers(&ns, at, 50, &stop)
    });
    // The kubelet's probe every 200 ms and Prometheus's scrape every 2 s, for 20 s; the
    // agent's resident memory read at each probe.
    let pid = agent.pid();
    let (probes, worst_probe, scrapes, rss) = sim.node.run(move || {
        let mut worst = Duration::ZERO;
        let mut probes = Vec::new();
        let mut scrapes = Vec::new();
        let mut peak: f64 = 0.0;
        let started = Instant::now();
        let mut next_scrape = started;
        while started.elapsed() < Duration::from_secs(20) {
            let (code, took) = timed_get(at, "/healthz");
            probes.push(code);
            worst = worst.max(took);
            if Instant::now() >= next_scrape {
                scrapes.push(timed_get(at, "/metrics").0);
                next_scrape += Duration::from_secs(2);
            }
            peak = peak.max(rss_mib(pid));
            std::thread::sleep(Duration::from_millis(200));
        }
        (probes, worst, scrapes, peak)
    });
    stop.store(true, Ordering::Relaxed);
    loris.join().unwrap();
    readers.join().unwrap();
    let opened = opened.load(Ordering::Relaxed);
    eprintln!(
        "slow connections opened: {opened}; agent RSS idle {idle_rss:.1} MiB, peak under the flood {rss:.1} MiB; worst /healthz {worst_probe:?}; probes {}, scrapes {:?}",
        probes.len(),
        scrapes
    );
    assert!(opened >= 1000, "{opened}");
    assert!(probes.iter().all(|c| *c == 200), "{probes:?}");
    assert!(worst_probe < Duration::from_millis(500), "{worst_probe:?}");
    assert!(scrapes.iter().all(|c| *c == 200), "{scrapes:?}");
    assert!(rss < 64.0, "agent RSS {rss:.1} MiB under the flood");
    // The agent still answers once the flood is gone.
    assert_eq!(agent.get(&sim.node, "/healthz").map(|r| r.0), Some(200));
}
