//! The packets the tests craft: Ethernet, IPv4 or IPv6, UDP or TCP, DNS. Each builder
//! stacks the same layers (`ethernet`, `ipv4` or `ipv6`, `udp` or `tcp`), so an offset
//! is written once.

use std::net::Ipv6Addr;

pub const SRC4: [u8; 4] = [10, 0, 0, 5];
pub const DST4: [u8; 4] = [10, 0, 0, 2];

/// The Ethernet header's length; the IP header begins here.
pub const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const TCP_HLEN: usize = 20;
/// IPv4's "don't fragment" bit, in its fragment word.
const IPV4_DF: u16 = 0x4000;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

fn len16(n: usize) -> [u8; 2] {
    u16::try_from(n).unwrap().to_be_bytes()
}

/// An Ethernet header (zero addresses) with `ethertype`, then `l3`.
fn ethernet(ethertype: u16, l3: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(l3);
    p
}

/// An IPv4 frame: a 20-byte header (id 1, TTL 64, no checksum) over `l4`.
fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&len16(IPV4_HLEN + l4.len()));
    h.extend_from_slice(&[0, 1]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(l4);
    ethernet(0x0800, &h)
}

/// An IPv6 frame: the fixed header (hop limit 64), `next` naming what follows, over `rest`.
fn ipv6(src: &str, dst: &str, next: u8, rest: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&len16(rest.len()));
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src.parse::<Ipv6Addr>().unwrap().octets());
    h.extend_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
    h.extend_from_slice(rest);
    ethernet(0x86dd, &h)
}

/// A UDP header (no checksum) and `payload`.
fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len16(UDP_HLEN + payload.len()));
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// A TCP header of `doff` words (at least 5; options filled with 1s), sequence and
/// acknowledgement 1, `flags`, then `payload`.
fn tcp(sport: u16, dport: u16, flags: u8, doff: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1]);
    t.extend_from_slice(&[doff << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t.resize((usize::from(doff) * 4).max(TCP_HLEN), 1);
    t.extend_from_slice(payload);
    t
}

pub fn ipv4_udp(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    frag: u16,
    payload: &[u8],
) -> Vec<u8> {
    ipv4(src, dst, IPPROTO_UDP, frag, &udp(sport, dport, payload))
}

pub fn ipv6_udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    ipv6(
        "fd00::5",
        "fd00::2",
        IPPROTO_UDP,
        &udp(sport, dport, payload),
    )
}

/// A DNS header and question: `flags` as on the wire, `qdcount` questions claimed.
pub fn dns(id: u16, flags: u16, qdcount: u16, question: &[u8]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d.extend_from_slice(&qdcount.to_be_bytes());
    d.extend_from_slice(&[0; 6]);
    d.extend_from_slice(question);
    d
}

pub const QUESTION: &[u8] = b"\x03www\x07example\x03com\x00\x00\x01\x00\x01";
pub const TC_ACT_UNSPEC: u32 = u32::MAX;

/// An IPv6 UDP datagram whose fixed header is followed by `ext`, extension headers of
/// the given (type, length in bytes) chain.
pub fn ipv6_udp_past(
    ext: &[(u8, usize)],
    frag_offset: u16,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, (kind, len)) in ext.iter().enumerate() {
        let next = ext.get(i + 1).map_or(IPPROTO_UDP, |(k, _)| *k);
        let mut h = vec![0u8; *len];
        h[0] = next;
        if *kind == 44 {
            h[2..4].copy_from_slice(&(frag_offset << 3).to_be_bytes());
        } else {
            h[1] = u8::try_from(len / 8 - 1).unwrap();
        }
        chain.extend(h);
    }
    chain.extend(udp(sport, dport, payload));
    let first = ext.first().map_or(IPPROTO_UDP, |(k, _)| *k);
    ipv6("fd00::5", "fd00::2", first, &chain)
}

/// An IPv4 TCP segment with `flags` (FIN 0x01, RST 0x04, ACK 0x10) and no payload.
pub fn ipv4_tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    segment(src, dst, sport, dport, flags, &[])
}

pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;
pub const FIN_ACK: u8 = 0x11;
pub const PSH_ACK: u8 = 0x18;
pub const SYN_ACK: u8 = 0x12;
pub const RST_ACK: u8 = 0x14;

/// An IPv4 TCP segment with `flags` and `payload` (a TCP header without options, or with
/// `doff` words of header).
pub fn ipv4_tcp_doff(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: u8,
    doff: u8,
    payload: &[u8],
) -> Vec<u8> {
    let l4 = tcp(sport, dport, flags, doff, payload);
    ipv4(src, dst, IPPROTO_TCP, IPV4_DF, &l4)
}

pub fn segment(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    ipv4_tcp_doff(src, dst, sport, dport, flags, 5, payload)
}

/// `segment` with sequence number `seq`.
pub fn segment_at(
    (src, sport): ([u8; 4], u16),
    (dst, dport): ([u8; 4], u16),
    seq: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = segment(src, dst, sport, dport, PSH_ACK, payload);
    let at = ETH_HLEN + IPV4_HLEN + 4;
    p[at..at + 4].copy_from_slice(&seq.to_be_bytes());
    p
}

/// A connection's segments one way, each at the sequence number the bytes before it
/// reach.
pub struct Stream {
    from: ([u8; 4], u16),
    to: ([u8; 4], u16),
    seq: std::cell::Cell<u32>,
}

impl Stream {
    pub fn new(from: ([u8; 4], u16), to: ([u8; 4], u16)) -> Self {
        Self {
            from,
            to,
            seq: std::cell::Cell::new(1),
        }
    }

    /// The next segment, carrying `payload`.
    pub fn next(&self, payload: &[u8]) -> Vec<u8> {
        let seq = self.seq.get();
        self.seq
            .set(seq.wrapping_add(u32::try_from(payload.len()).unwrap()));
        segment_at(self.from, self.to, seq, payload)
    }
}

pub fn ipv6_tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let (src, dst) = if dport == 53 {
        ("fd00::5", "fd00::2")
    } else {
        ("fd00::2", "fd00::5")
    };
    ipv6_tcp_between((src, sport), (dst, dport), flags, payload)
}

pub fn ipv6_tcp_between(
    (src, sport): (&str, u16),
    (dst, dport): (&str, u16),
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    ipv6(src, dst, IPPROTO_TCP, &tcp(sport, dport, flags, 5, payload))
}

/// DNS messages as TCP carries them: each after its two-byte length.
pub fn framed(messages: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        out.extend_from_slice(&u16::try_from(m.len()).unwrap().to_be_bytes());
        out.extend_from_slice(m);
    }
    out
}
