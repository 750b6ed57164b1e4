//! What the tests send and read: datagrams, HTTP, socket options, the clock.

use std::{net::SocketAddr, os::fd::AsRawFd as _, time::Duration};

use crate::Netns;

/// `ip`:`port`, for the test's own addresses.
pub fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}")), port)
}

/// `CLOCK_MONOTONIC`, the clock the agent's per-second counts use.
pub fn monotonic() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap(),
        u32::try_from(ts.tv_nsec).unwrap(),
    )
}

/// Asks for a receive buffer of `bytes` (the kernel rounds small values up).
pub fn set_rcvbuf(sock: &std::net::UdpSocket, bytes: i32) {
    // SAFETY: a valid socket and an int option value.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const bytes).cast(),
            u32::try_from(std::mem::size_of::<i32>()).unwrap(),
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
}

/// A minimal HTTP/1.0 GET from inside `ns`: (status, body), or `None` when nothing
/// answers within 2 s or the reply takes more than 5.
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let path = path.to_owned();
    ns.run(move || crate::wire::http_get(addr, &path, Duration::from_secs(5)).ok())
}

/// Sends `count` UDP datagrams with `payload` from inside `ns` to `dst`.
pub fn send_udp(ns: &Netns, dst: SocketAddr, count: usize, payload: &[u8]) {
    let payload = payload.to_vec();
    ns.run(move || {
        let bind: SocketAddr = if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
            .parse()
            .unwrap();
        let sock = std::net::UdpSocket::bind(bind).unwrap();
        for _ in 0..count {
            sock.send_to(&payload, dst)
                .unwrap_or_else(|e| panic!("sending to {dst}: {e}"));
        }
    });
}
