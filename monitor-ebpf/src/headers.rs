//! Network headers as the probes read them: whole words copied from the packet as they
//! lay in memory. One parse of each header, shared by the classifiers and the tracing
//! programs.

use monitor_common::{
    V4_MAPPED_WORD,
    proto::{
        DNS_PORT, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT, IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_TCP,
        IPPROTO_UDP, IPV4_HLEN,
    },
};

/// Byte `i` of a word copied from the packet as it lay in memory.
#[inline(always)]
pub fn byte(w: u32, i: u32) -> u32 {
    (w >> (8 * i)) & 0xff
}

/// The two port fields of a transport header's first word, in host order.
#[inline(always)]
pub fn ports(w: u32) -> (u16, u16) {
    (
        u16::from_be((w & 0xffff) as u16),
        u16::from_be((w >> 16) as u16),
    )
}

/// Whether a transport header's first word has port 53 on either side.
#[inline(always)]
pub fn is_dns(ports_word: u32) -> bool {
    let dns = u32::from(DNS_PORT.to_be());
    ports_word & 0xffff == dns || ports_word >> 16 == dns
}

/// Whether `proto` carries ports (TCP or UDP).
#[inline(always)]
pub fn has_ports(proto: u8) -> bool {
    proto == IPPROTO_TCP || proto == IPPROTO_UDP
}

/// Whether `next` is an IPv6 extension header the probes walk past.
#[inline(always)]
pub fn is_ipv6_extension(next: u8) -> bool {
    matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_DSTOPTS
    )
}

/// What the probes use of an IPv4 header.
pub struct Ipv4 {
    /// Header length in bytes, options included (20 or more).
    pub ihl: u32,
    pub proto: u8,
    /// The fragment offset is zero: the only fragment that carries the transport header.
    pub first_fragment: bool,
    /// Source and destination as IPv4-mapped addresses.
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

/// Parses an IPv4 header from its first five words; `None` when it is not IPv4 or its
/// length is impossible.
#[inline(always)]
pub fn ipv4(h: &[u32; 5]) -> Option<Ipv4> {
    let vihl = byte(h[0], 0);
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = (vihl & 0x0f) * 4;
    if ihl < IPV4_HLEN {
        return None;
    }
    Some(Ipv4 {
        ihl,
        proto: byte(h[2], 1) as u8,
        // The 13 bits of bytes 6 and 7 after the flags.
        first_fragment: (h[1] >> 16) & 0xff1f == 0,
        src: [0, 0, V4_MAPPED_WORD, h[3]],
        dst: [0, 0, V4_MAPPED_WORD, h[4]],
    })
}

/// What the probes use of the fixed IPv6 header.
pub struct Ipv6 {
    /// The next header: a transport protocol, or the first extension header.
    pub next: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

/// Parses the fixed IPv6 header from its ten words; `None` when it is not IPv6.
#[inline(always)]
pub fn ipv6(h: &[u32; 10]) -> Option<Ipv6> {
    if byte(h[0], 0) >> 4 != 6 {
        return None;
    }
    Some(Ipv6 {
        next: byte(h[1], 2) as u8,
        src: [h[2], h[3], h[4], h[5]],
        dst: [h[6], h[7], h[8], h[9]],
    })
}

/// The first `N` words of `w`.
#[inline(always)]
pub fn head<const M: usize, const N: usize>(w: &[u32; M]) -> [u32; N] {
    let mut out = [0u32; N];
    for (o, v) in out.iter_mut().zip(w.iter()) {
        *o = *v;
    }
    out
}
