//! A real resolver for the simulated VPC (unbound, with dnsmasq as a refusing upstream
//! so that SERVFAIL is real too), and a small DNS client.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::Netns;

pub use crate::wire::query_packet;

/// Names the resolver answers: NOERROR, NXDOMAIN, SERVFAIL, REFUSED.
pub const OK_NAME: &str = "a.ok.sim";
pub const NX_NAME: &str = "x.nx.sim";
pub const SERVFAIL_NAME: &str = "y.fail.sim";
pub const REFUSED_NAME: &str = "z.refused.sim";
/// A name whose answer (40 A records, 656 bytes) does not fit 512 bytes: truncated over
/// UDP without EDNS, whole over TCP.
pub const BIG_NAME: &str = "big.ok.sim";

/// unbound on `addresses` port 53 inside `ns`; stopped on drop.
pub struct Resolver {
    unbound: Child,
    upstream: Child,
    dir: PathBuf,
}

impl Resolver {
    pub fn start(ns: &Netns, addresses: &[IpAddr]) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-resolver", ns.name));
        std::fs::create_dir_all(&dir).unwrap();
        let big = (1..=40).fold(String::new(), |acc, i| {
            acc + &format!("  local-data: \"{BIG_NAME}. 60 IN A 10.9.0.{i}\"\n")
        });
        let server = format!(
            "  access-control: ::/0 allow\n  local-zone: \"ok.sim.\" static\n  local-data: \"{OK_NAME}. 60 IN A 10.1.2.3\"\n{big}  local-zone: \"nx.sim.\" always_nxdomain\n  local-zone: \"refused.sim.\" always_refuse\n"
        );
        let zones = "forward-zone:\n  name: \"fail.sim.\"\n  forward-addr: 127.0.0.1@5353\n";
        // dnsmasq with no upstream refuses everything; unbound turns that into SERVFAIL.
        let upstream = ns
            .command("dnsmasq")
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
            ])
            .args(["--listen-address=127.0.0.1", "--port=5353", "--pid-file="])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting dnsmasq");
        let unbound = unbound(ns, &dir, addresses, &server, zones);
        let resolver = Self {
            unbound,
            upstream,
            dir,
        };
        // Ask from inside the VPC, so that the agent on the node sees nothing of it.
        await_answer(ns, SocketAddr::new(addresses[0], 53), OK_NAME, "unbound");
        resolver
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        for child in [&mut self.unbound, &mut self.upstream] {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// unbound in `ns`, its files in `dir`: on `interfaces` port 53, in the foreground,
/// without logs, the iterator alone on one thread, answering anyone; then `server`'s
/// lines of the server section, and `zones` after it.
pub(crate) fn unbound(
    ns: &Netns,
    dir: &Path,
    interfaces: &[IpAddr],
    server: &str,
    zones: &str,
) -> Child {
    let interfaces = interfaces
        .iter()
        .fold(String::new(), |acc, a| acc + &format!("  interface: {a}\n"));
    let conf = format!(
        "server:\n{interfaces}  port: 53\n  do-daemonize: no\n  use-syslog: no\n  logfile: \"\"\n  username: \"\"\n  chroot: \"\"\n  directory: \"{dir}\"\n  pidfile: \"\"\n  verbosity: 0\n  access-control: 0.0.0.0/0 allow\n  do-not-query-localhost: no\n  module-config: \"iterator\"\n  num-threads: 1\n{server}{zones}",
        dir = dir.display()
    );
    let conf_path = dir.join("unbound.conf");
    std::fs::write(&conf_path, conf).unwrap();
    ns.command("unbound")
        .args(["-d", "-c", conf_path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting unbound")
}

/// Asks `server` for `name` from inside `ns` until it answers; `what` it is, for the
/// failure after 10 s.
pub(crate) fn await_answer(ns: &Netns, server: SocketAddr, name: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while query(ns, server, name, 1, Duration::from_millis(200)).is_none() {
        assert!(
            Instant::now() < deadline,
            "{what} did not answer on {server} within 10 s"
        );
    }
}

pub(crate) fn bind_for(server: SocketAddr) -> UdpSocket {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .unwrap();
    UdpSocket::bind(bind).unwrap()
}

/// One query from inside `ns`: the response code, or `None` on timeout.
pub fn query(ns: &Netns, server: SocketAddr, name: &str, id: u16, timeout: Duration) -> Option<u8> {
    let packet = query_packet(name, id);
    ns.run(move || {
        let sock = bind_for(server);
        sock.set_read_timeout(Some(timeout)).unwrap();
        sock.send_to(&packet, server).unwrap();
        let mut buf = [0u8; 512];
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let Ok((n, _)) = sock.recv_from(&mut buf) else {
                return None;
            };
            if n >= 12 && buf[..2] == id.to_be_bytes() {
                return Some(buf[3] & 0x0f);
            }
        }
        None
    })
}

/// `count` queries one after another, each waiting for its answer; returns how many
/// were answered.
pub fn queries(ns: &Netns, server: SocketAddr, name: &str, count: u16, timeout: Duration) -> usize {
    (0..count)
        .filter(|i| query(ns, server, name, 1000 + i, timeout).is_some())
        .count()
}

/// `count` queries sent back to back from one socket, then the answers collected.
/// Returns how many were answered.
pub fn burst(ns: &Netns, server: SocketAddr, name: &str, count: u16) -> usize {
    let packets: Vec<Vec<u8>> = (0..count).map(|i| query_packet(name, i)).collect();
    ns.run(move || {
        let sock = bind_for(server);
        for p in &packets {
            sock.send_to(p, server).unwrap();
        }
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 512];
        let mut answered = 0;
        while answered < packets.len() && sock.recv_from(&mut buf).is_ok() {
            answered += 1;
        }
        answered
    })
}

/// `count` queries from one socket whose receive buffer is as small as the kernel allows
/// and which reads nothing: past the first answer or two, this kernel drops each answer
/// at the socket (`SOCKET_RCVBUFF`), on the device it arrived by. Sent 5 ms apart, so
/// that the server's own queue never overflows.
pub fn unread(ns: &Netns, server: SocketAddr, name: &str, count: u16) {
    let packets: Vec<Vec<u8>> = (0..count).map(|i| query_packet(name, i)).collect();
    ns.run(move || {
        let sock = bind_for(server);
        socket2::SockRef::from(&sock)
            .set_recv_buffer_size(1)
            .unwrap();
        for p in &packets {
            sock.send_to(p, server).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        // The last answers arrive before the socket closes.
        std::thread::sleep(Duration::from_millis(200));
    });
}

/// The same query (same socket, same id) sent `copies` times: a client retransmitting.
pub fn retransmit(ns: &Netns, server: SocketAddr, name: &str, copies: usize) {
    let packet = query_packet(name, 4242);
    ns.run(move || {
        let sock = bind_for(server);
        for _ in 0..copies {
            sock.send_to(&packet, server).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

/// Each (name, count) as queries from one socket (one flow), distinct ids from 1, sent
/// back to back; returns how many were answered within `wait`.
pub fn from_one_socket(
    ns: &Netns,
    server: SocketAddr,
    names: &[(&str, u16)],
    wait: Duration,
) -> usize {
    let packets: Vec<Vec<u8>> = names
        .iter()
        .flat_map(|(name, n)| (0..*n).map(move |_| *name))
        .zip(1u16..)
        .map(|(name, id)| query_packet(name, id))
        .collect();
    ns.run(move || {
        let sock = bind_for(server);
        for p in &packets {
            sock.send_to(p, server).unwrap();
        }
        sock.set_read_timeout(Some(wait)).unwrap();
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 512];
        let mut answered = 0;
        while answered < packets.len() && Instant::now() < deadline {
            if sock.recv_from(&mut buf).is_err() {
                break;
            }
            answered += 1;
        }
        answered
    })
}

/// One query to each of `servers` from one socket, nothing read: a pod spraying
/// addresses.
pub fn spray(ns: &Netns, servers: Vec<SocketAddr>) {
    let packet = query_packet(OK_NAME, 7);
    ns.run(move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        for s in servers {
            sock.send_to(&packet, s).unwrap();
        }
    });
}

/// `count` queries to `server` from one socket as fast as it sends, ids 0.., nothing
/// read: a pod flooding a server.
pub fn flood(ns: &Netns, server: SocketAddr, count: u32) {
    ns.run(move || {
        let sock = bind_for(server);
        for i in 0..count {
            let id = u16::try_from(i % 65_536).unwrap();
            sock.send_to(&query_packet(OK_NAME, id), server).unwrap();
        }
    });
}

/// A DNS server on `addr` (UDP) that answers every query NOERROR after `delay`: queries
/// are still in flight a while after they were sent. Stopped on drop.
pub struct SlowResolver {
    _server: crate::Background,
    released: Arc<AtomicBool>,
}

impl SlowResolver {
    pub fn start(ns: &Netns, addr: SocketAddr, delay: Duration) -> Self {
        Self::serve(ns, addr, Some(delay))
    }

    /// One that holds every answer until [`SlowResolver::release`], then answers at once:
    /// queries stay in flight for as long as the caller needs, on a machine of any speed.
    pub fn held(ns: &Netns, addr: SocketAddr) -> Self {
        Self::serve(ns, addr, None)
    }

    /// Sends the answers held, and answers from now on without waiting.
    pub fn release(&self) {
        self.released.store(true, Ordering::Release);
    }

    fn serve(ns: &Netns, addr: SocketAddr, delay: Option<Duration>) -> Self {
        let sock = ns.run(move || UdpSocket::bind(addr).unwrap());
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let released = Arc::new(AtomicBool::new(false));
        let open = Arc::clone(&released);
        let server = crate::Background::spawn(move |stop| {
            let mut waiting: Vec<(Option<Instant>, Vec<u8>, SocketAddr)> = Vec::new();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf)
                    && n >= 12
                {
                    let mut answer = buf[..n].to_vec();
                    answer[2] |= 0x80;
                    waiting.push((delay.map(|d| Instant::now() + d), answer, peer));
                }
                let now = Instant::now();
                let open = open.load(Ordering::Acquire);
                waiting.retain(|(due, answer, peer)| {
                    if !open && due.is_none_or(|due| due > now) {
                        return true;
                    }
                    let _ = sock.send_to(answer, *peer);
                    false
                });
            }
        });
        Self {
            _server: server,
            released,
        }
    }
}
