//! What the test library and `nettool` both put on the wire: a standard DNS query and a
//! minimal HTTP/1.0 GET. The standard library alone, so that `nettool` (a crate of its
//! own, built for aarch64 too) includes this very file.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// A standard query for `name`, type A, class IN, with transaction `id`. A label longer
/// than DNS allows is cut to 63 bytes; empty labels (a trailing dot) are left out.
pub fn query_packet(name: &str, id: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        let label = &label.as_bytes()[..label.len().min(63)];
        q.push(u8::try_from(label.len()).unwrap_or(63));
        q.extend_from_slice(label);
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// GET `path` from `at` over HTTP/1.0: (status, body). Connects within 2 s and reads
/// the whole reply within `read`.
pub fn http_get(at: SocketAddr, path: &str, read: Duration) -> std::io::Result<(u16, String)> {
    let mut conn = TcpStream::connect_timeout(&at, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(read))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {at}\r\n\r\n")?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {head:?}")))?;
    Ok((code, body.to_owned()))
}
