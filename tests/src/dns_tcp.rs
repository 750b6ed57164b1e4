//! DNS over TCP for the simulated node: a client that pipelines queries on one
//! connection, connection attempts, a server that accepts and never answers, a UDP query
//! whose answer comes back truncated, and a node-local cache (unbound) that forwards to
//! the VPC's resolver over TCP, as `NodeLocal DNSCache` does with `force_tcp`.

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};

use crate::{Background, Netns, dns::query_packet};

/// Queries over one TCP connection from inside `ns`: each batch of (name, id) written at
/// once (one segment, several messages), the batches 50 ms apart; then the answers read
/// until every query has one or `wait` passes. The rcode of each answer, by id.
pub fn pipelined(
    ns: &Netns,
    server: SocketAddr,
    batches: &[&[(&str, u16)]],
    wait: Duration,
) -> BTreeMap<u16, u8> {
    let total: usize = batches.iter().map(|b| b.len()).sum();
    let batches: Vec<Vec<u8>> = batches
        .iter()
        .map(|b| {
            let mut out = Vec::new();
            for (name, id) in *b {
                let q = query_packet(name, *id);
                out.extend_from_slice(&u16::try_from(q.len()).unwrap().to_be_bytes());
                out.extend_from_slice(&q);
            }
            out
        })
        .collect();
    ns.run(move || {
        let mut conn = TcpStream::connect_timeout(&server, Duration::from_secs(2)).unwrap();
        conn.set_nodelay(true).unwrap();
        for b in &batches {
            conn.write_all(b).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        let deadline = Instant::now() + wait;
        let mut answers = BTreeMap::new();
        while answers.len() < total {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            conn.set_read_timeout(Some(left)).unwrap();
            let mut len = [0u8; 2];
            if conn.read_exact(&mut len).is_err() {
                break;
            }
            let mut m = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if conn.read_exact(&mut m).is_err() || m.len() < 12 {
                break;
            }
            answers.insert(u16::from_be_bytes([m[0], m[1]]), m[3] & 0x0f);
        }
        answers
    })
}

/// `n` connection attempts to `server` from inside `ns`, each given up after `timeout`:
/// (refused, never answered).
pub fn connect_attempts(
    ns: &Netns,
    server: SocketAddr,
    n: usize,
    timeout: Duration,
) -> (usize, usize) {
    ns.run(move || {
        let (mut refused, mut silent) = (0, 0);
        for _ in 0..n {
            match TcpStream::connect_timeout(&server, timeout) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => refused += 1,
                Err(e) if e.kind() == ErrorKind::TimedOut => silent += 1,
                Err(e) => panic!("connecting to {server}: {e}"),
            }
        }
        (refused, silent)
    })
}

/// A server on `addr` (TCP) that accepts every connection and reads what comes, and
/// never answers: an upstream that stopped answering. Stopped on drop.
pub struct SilentTcp {
    _server: Background,
}

impl SilentTcp {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let listener = ns.run(move || TcpListener::bind(addr).unwrap());
        listener.set_nonblocking(true).unwrap();
        let server = Background::spawn(move |stop| {
            let mut held: Vec<TcpStream> = Vec::new();
            let mut buf = [0u8; 4096];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((conn, _)) = listener.accept() {
                    conn.set_nonblocking(true).unwrap();
                    held.push(conn);
                }
                for c in &mut held {
                    while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self { _server: server }
    }
}

/// One query over UDP without EDNS (so at most 512 bytes come back) from inside `ns`:
/// whether the answer was truncated (TC), and its rcode; `None` on timeout.
pub fn udp_truncated(ns: &Netns, server: SocketAddr, name: &str, id: u16) -> Option<(bool, u8)> {
    let packet = query_packet(name, id);
    ns.run(move || {
        let sock = crate::dns::bind_for(server);
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        sock.send_to(&packet, server).unwrap();
        let mut buf = [0u8; 1500];
        let (n, _) = sock.recv_from(&mut buf).ok()?;
        (n >= 12 && buf[..2] == id.to_be_bytes()).then_some((buf[2] & 0x02 != 0, buf[3] & 0x0f))
    })
}

/// unbound on the node as its DNS cache (`NodeLocal DNSCache`'s role), on `listen` port 53
/// (an address of the node's loopback, where `NodeLocal DNSCache` uses a dummy device), forwarding every name to `upstream` over TCP only
/// (`tcp-upstream`), without query name minimisation, so each name a client asks that
/// is not in its cache is one query upstream. Stopped on drop.
pub struct NodeLocalCache {
    unbound: Child,
    dir: PathBuf,
}

impl NodeLocalCache {
    pub fn start(node: &Netns, listen: IpAddr, upstream: IpAddr) -> Self {
        node.ip("link set lo up");
        node.ip(&format!("addr add {listen}/32 dev lo"));
        let dir = std::env::temp_dir().join(format!("{}-nodelocal", node.name));
        std::fs::create_dir_all(&dir).unwrap();
        let server =
            "  qname-minimisation: no\n  prefetch: no\n  tcp-upstream: yes\n  do-ip6: no\n";
        let zones = format!("forward-zone:\n  name: \".\"\n  forward-addr: {upstream}\n");
        let unbound = crate::dns::unbound(node, &dir, &[listen], server, &zones);
        let cache = Self { unbound, dir };
        // Listening: a name the upstream does not know, asked until the cache answers.
        let at = SocketAddr::new(listen, 53);
        crate::dns::await_answer(node, at, "ready.nx.sim", "the node-local cache");
        cache
    }
}

impl Drop for NodeLocalCache {
    fn drop(&mut self) {
        let _ = self.unbound.kill();
        let _ = self.unbound.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
