//! Small servers for the far side of the simulated node: a UDP echo and a TCP listener
//! that holds its connections. Stopped on drop.

use std::{
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::atomic::Ordering,
    time::Duration,
};

use crate::{Background, Netns};

/// Answers every datagram with itself.
pub struct UdpEcho {
    _server: Background,
}

impl UdpEcho {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let sock = ns.run(move || UdpSocket::bind(addr).unwrap());
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let server = Background::spawn(move |stop| {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], peer);
                }
            }
        });
        Self { _server: server }
    }
}

/// Accepts TCP connections and keeps them open until dropped.
pub struct TcpHold {
    _server: Background,
}

impl TcpHold {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let listener = ns.run(move || TcpListener::bind(addr).unwrap());
        listener.set_nonblocking(true).unwrap();
        let server = Background::spawn(move |stop| {
            let mut held: Vec<TcpStream> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => held.push(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
                // A peer that closed gets our FIN back at once.
                held.retain(|s| {
                    let mut b = [0u8; 1];
                    s.set_nonblocking(true).ok();
                    !matches!(s.peek(&mut b), Ok(0))
                });
            }
        });
        Self { _server: server }
    }
}

/// `n` UDP flows from `ns` to `dst`, one datagram each from its own port, each answered.
/// The sockets stay open until all have sent: a port freed and handed out again would
/// make two flows one.
pub fn udp_flows(ns: &Netns, dst: SocketAddr, n: usize) -> usize {
    ns.run(move || {
        let sockets: Vec<UdpSocket> = (0..n)
            .map(|_| UdpSocket::bind("0.0.0.0:0").unwrap())
            .collect();
        sockets
            .iter()
            .filter(|s| {
                s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                s.send_to(b"flow", dst).unwrap();
                let mut b = [0u8; 16];
                s.recv_from(&mut b).is_ok()
            })
            .count()
    })
}

/// `n` TCP connections from `ns` to `dst`, kept open by the returned streams.
pub fn tcp_connections(ns: &Netns, dst: SocketAddr, n: usize) -> Vec<TcpStream> {
    ns.run(move || {
        (0..n)
            .map(|_| TcpStream::connect_timeout(&dst, Duration::from_secs(2)).unwrap())
            .collect()
    })
}

/// Echoes what each TCP connection sends back to it, a thread a connection, until
/// dropped.
pub struct TcpEcho {
    _server: Background,
}

impl TcpEcho {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let listener = ns.run(move || TcpListener::bind(addr).unwrap());
        listener.set_nonblocking(true).unwrap();
        let server = Background::spawn(move |stop| {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        std::thread::spawn(move || {
                            use std::io::{Read as _, Write as _};
                            s.set_nonblocking(false).unwrap();
                            s.set_nodelay(true).unwrap();
                            let mut buf = [0u8; 2048];
                            while let Ok(n) = s.read(&mut buf) {
                                if n == 0 || s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self { _server: server }
    }
}
