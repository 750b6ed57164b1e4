//! Known traffic for the kernel matrix: the small tool the booted kernels' scenario runs
//! inside its network namespaces. Every subcommand prints what it did, so the host test
//! compares the agent's counts with the traffic that was really sent and answered.
//!
//! ```text
//! nettool dns-server ADDR             answer every query, over UDP and TCP: NXDOMAIN for
//!                                     names under nx., else NOERROR
//! nettool dns-query SERVER NAME N     N queries, one socket each; prints how many were answered
//! nettool dns-query-tcp SERVER NAME N N queries over one TCP connection, all written at
//!                                     once; prints how many were answered
//! nettool tcp-connect ADDR N          N connections; prints how many were refused
//! nettool udp-send ADDR N             N datagrams from one socket
//! nettool udp-flows ADDR N            one datagram from each of N sockets (N flows)
//! nettool udp-sink ADDR               read and discard
//! nettool tcp-server ADDR             accept and hold every connection
//! nettool tcp-hold ADDR N             open N connections, print "held N", hold until killed
//! nettool tcp-sink ADDR               accept every connection, read and discard
//! nettool tcp-drip ADDR N             open N connections, print "held N"; then for each
//!                                     line SECONDS on stdin, write one byte to each
//!                                     connection in turn for SECONDS, print "sent K"
//! nettool udp-full ADDR SECONDS       bind with the smallest receive buffer, read nothing
//!                                     for SECONDS, then print "queued N" (what fitted)
//! nettool http-get ADDR PATH          print the status code, then the body
//! ```

use std::{
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::Duration,
};

#[path = "../../src/wire.rs"]
mod wire;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match run(&words) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nettool: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Binds `at` with the smallest receive buffer, reads nothing for `seconds`, then says
/// how many datagrams fitted.
fn udp_full(at: SocketAddr, seconds: usize) -> std::io::Result<()> {
    let sock = UdpSocket::bind(at)?;
    // SAFETY: a valid socket and an int option value; the kernel clamps it to its
    // minimum.
    let rc = unsafe {
        let bytes: libc::c_int = 1;
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const bytes).cast(),
            4,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::thread::sleep(Duration::from_secs(seconds as u64));
    sock.set_nonblocking(true)?;
    let mut buf = [0u8; 2048];
    let mut queued = 0;
    while sock.recv_from(&mut buf).is_ok() {
        queued += 1;
    }
    println!("queued {queued}");
    Ok(())
}

/// Refuses a flood's address unless the tool was started in a network namespace other
/// than its parent's (a test's own): from where it was launched only loopback may be
/// reached, so a slip cannot send a flood along the host's routes.
fn flood_target(to: SocketAddr) -> std::io::Result<SocketAddr> {
    let own = std::fs::read_link("/proc/self/ns/net")?;
    let parent = std::fs::read_link(format!(
        "/proc/{}/ns/net",
        std::os::unix::process::parent_id()
    ))?;
    if own == parent && !to.ip().is_loopback() {
        return Err(std::io::Error::other(format!(
            "refusing to flood {to} from the network namespace it was started in"
        )));
    }
    Ok(to)
}

/// Accepts every connection to `at` and reads and discards what each sends, all on one
/// thread (a thread a connection would be tens of thousands).
fn tcp_sink(at: SocketAddr) -> std::io::Result<()> {
    use std::io::Read as _;
    let listener = TcpListener::bind(at)?;
    listener.set_nonblocking(true)?;
    let mut conns: Vec<TcpStream> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let mut idle = true;
        while let Ok((c, _)) = listener.accept() {
            c.set_nonblocking(true)?;
            conns.push(c);
            idle = false;
        }
        conns.retain_mut(|c| match c.read(&mut buf) {
            Ok(0) => false,
            Ok(_) => {
                idle = false;
                true
            }
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        });
        if idle {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// `n` connections to `to`, then one byte to each in turn for each stdin line's seconds:
/// `n` established flows with their segments interleaved.
fn tcp_drip(to: SocketAddr, n: usize) -> std::io::Result<()> {
    use std::io::{BufRead as _, Write as _};
    let to = flood_target(to)?;
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let c = TcpStream::connect(to)?;
        c.set_nodelay(true)?;
        c.set_nonblocking(true)?;
        conns.push(c);
    }
    println!("held {}", conns.len());
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let secs: f64 = line
            .trim()
            .parse()
            .map_err(|e| std::io::Error::other(format!("{line}: {e}")))?;
        let end = std::time::Instant::now() + Duration::from_secs_f64(secs);
        let (mut sent, mut tried) = (0u64, 0u64);
        'run: loop {
            for c in &mut conns {
                // A full send buffer (the peer slow to read) skips the connection.
                if c.write(b"x").is_ok() {
                    sent += 1;
                }
                tried += 1;
                if tried % 256 == 0 && std::time::Instant::now() >= end {
                    break 'run;
                }
            }
        }
        println!("sent {sent}");
    }
    Ok(())
}

fn addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|e| format!("{s}: {e}"))
}

fn count(s: &str) -> Result<usize, String> {
    s.parse().map_err(|e| format!("{s}: {e}"))
}

fn run(args: &[&str]) -> Result<(), String> {
    let io = |e: std::io::Error| e.to_string();
    match args {
        ["dns-server", a] => dns_server(addr(a)?).map_err(io),
        ["dns-query", server, name, n] => {
            let answered = dns_query(addr(server)?, name, count(n)?).map_err(io)?;
            println!("answered {answered}");
            Ok(())
        }
        ["dns-query-tcp", server, name, n] => {
            let answered = dns_query_tcp(addr(server)?, name, count(n)?).map_err(io)?;
            println!("answered {answered}");
            Ok(())
        }
        ["tcp-connect", a, n] => {
            let mut refused = 0;
            for _ in 0..count(n)? {
                match TcpStream::connect_timeout(&addr(a)?, Duration::from_secs(2)) {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
                    Err(e) => return Err(io(e)),
                    Ok(_) => {}
                }
            }
            println!("refused {refused}");
            Ok(())
        }
        ["udp-send", a, n] => {
            let sock = UdpSocket::bind("0.0.0.0:0").map_err(io)?;
            for _ in 0..count(n)? {
                sock.send_to(b"x", addr(a)?).map_err(io)?;
            }
            Ok(())
        }
        ["udp-flows", a, n] => {
            let to = addr(a)?;
            // Every socket stays open until all have sent: a port freed and handed out
            // again would make two "flows" one.
            let mut open = Vec::new();
            for _ in 0..count(n)? {
                let s = UdpSocket::bind("0.0.0.0:0").map_err(io)?;
                s.send_to(b"x", to).map_err(io)?;
                open.push(s);
            }
            Ok(())
        }
        ["udp-sink", a] => {
            let sock = UdpSocket::bind(addr(a)?).map_err(io)?;
            let mut buf = [0u8; 2048];
            loop {
                sock.recv_from(&mut buf).map_err(io)?;
            }
        }
        ["tcp-server", a] => {
            let listener = TcpListener::bind(addr(a)?).map_err(io)?;
            let mut held = Vec::new();
            for conn in listener.incoming() {
                held.push(conn.map_err(io)?);
            }
            Ok(())
        }
        ["tcp-hold", a, n] => {
            let held: Vec<TcpStream> = (0..count(n)?)
                .map(|_| TcpStream::connect(addr(a)?).map_err(io))
                .collect::<Result<_, _>>()?;
            println!("held {}", held.len());
            loop {
                std::thread::sleep(Duration::from_hours(1));
            }
        }
        ["tcp-sink", a] => tcp_sink(addr(a)?).map_err(io),
        ["tcp-drip", a, n] => tcp_drip(addr(a)?, count(n)?).map_err(io),
        ["udp-full", a, seconds] => udp_full(addr(a)?, count(seconds)?).map_err(io),
        ["http-get", a, path] => {
            let (code, body) =
                wire::http_get(addr(a)?, path, Duration::from_secs(10)).map_err(io)?;
            println!("{code}");
            print!("{body}");
            Ok(())
        }
        _ => Err(format!("usage: see the source; got {args:?}")),
    }
}

fn dns_query(server: SocketAddr, name: &str, n: usize) -> std::io::Result<usize> {
    let mut answered = 0;
    for i in 0..n {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        let id = u16::try_from(i % 65536).unwrap_or(0) ^ 0x5a5a;
        sock.send_to(&wire::query_packet(name, id), server)?;
        let mut buf = [0u8; 512];
        if let Ok((len, _)) = sock.recv_from(&mut buf)
            && len >= 12
            && buf[..2] == id.to_be_bytes()
        {
            answered += 1;
        }
    }
    Ok(answered)
}

/// N queries with ids from 1 over one connection, written in one segment; the answers
/// matched by id.
fn dns_query_tcp(server: SocketAddr, name: &str, n: usize) -> std::io::Result<usize> {
    use std::io::{Read as _, Write as _};
    let mut conn = TcpStream::connect_timeout(&server, Duration::from_secs(2))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut out = Vec::new();
    for i in 0..n {
        let q = wire::query_packet(name, u16::try_from(i + 1).unwrap_or(0));
        out.extend_from_slice(&u16::try_from(q.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&q);
    }
    conn.write_all(&out)?;
    let mut answered = 0;
    for _ in 0..n {
        let mut len = [0u8; 2];
        if conn.read_exact(&mut len).is_err() {
            break;
        }
        let mut m = vec![0u8; usize::from(u16::from_be_bytes(len))];
        conn.read_exact(&mut m)?;
        if m.len() >= 12 && m[2] & 0x80 != 0 {
            answered += 1;
        }
    }
    Ok(answered)
}

/// The answer to a query: the query itself, flagged a response, NXDOMAIN for a name
/// whose first label is `nx`.
fn answer(q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 13 {
        return None;
    }
    // The first label of the question.
    let first = usize::from(q[12]);
    let nx = q.get(13..13 + first) == Some(b"nx".as_slice());
    let mut reply = q.to_vec();
    reply[2] = 0x81; // QR, RD
    reply[3] = if nx { 0x83 } else { 0x80 }; // RA, rcode
    Some(reply)
}

fn dns_server(bind: SocketAddr) -> std::io::Result<()> {
    let tcp = TcpListener::bind(bind)?;
    std::thread::spawn(move || {
        for conn in tcp.incoming().flatten() {
            std::thread::spawn(move || serve_tcp(conn));
        }
    });
    let sock = UdpSocket::bind(bind)?;
    let mut buf = [0u8; 512];
    loop {
        let (len, peer) = sock.recv_from(&mut buf)?;
        if let Some(reply) = answer(&buf[..len]) {
            sock.send_to(&reply, peer)?;
        }
    }
}

/// Answers each length-prefixed query on a connection until the client closes it.
fn serve_tcp(mut conn: TcpStream) {
    use std::io::{Read as _, Write as _};
    loop {
        let mut len = [0u8; 2];
        if conn.read_exact(&mut len).is_err() {
            return;
        }
        let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if conn.read_exact(&mut q).is_err() {
            return;
        }
        if let Some(reply) = answer(&q) {
            let mut out = u16::try_from(reply.len())
                .unwrap_or(0)
                .to_be_bytes()
                .to_vec();
            out.extend_from_slice(&reply);
            if conn.write_all(&out).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_a_well_formed_dns_message() {
        let q = wire::query_packet("nx.example", 0x1234);
        assert_eq!(&q[..12], &[0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&q[12..], b"\x02nx\x07example\x00\x00\x01\x00\x01");
    }

    #[test]
    fn the_server_answers_pipelined_queries_over_tcp() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = server.local_addr().unwrap();
        drop(server);
        std::thread::spawn(move || dns_server(at));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(dns_query_tcp(at, "a.example", 3).unwrap(), 3);
    }

    #[test]
    fn the_server_answers_by_name_on_loopback() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let at = server.local_addr().unwrap();
        drop(server);
        std::thread::spawn(move || dns_server(at));
        std::thread::sleep(Duration::from_millis(100));
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 512];
        for (name, rcode) in [("a.example", 0), ("nx.example", 3)] {
            sock.send_to(&wire::query_packet(name, 7), at).unwrap();
            let (len, _) = sock.recv_from(&mut buf).unwrap();
            assert_eq!(len, wire::query_packet(name, 7).len());
            assert_eq!((buf[2] & 0x80, buf[3] & 0x0f), (0x80, rcode), "{name}");
        }
    }
}
