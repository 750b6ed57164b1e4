//! Header parsing for the classifiers, with every access bounds-checked against the
//! packet's linear data.

use aya_ebpf::programs::TcContext;
use monitor_common::Addr;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_HLEN: usize = 14;

/// A pointer to a `T` at `off` into the packet, if the whole `T` lies inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// Reads a `T` at `off`, bounds-checked right before the access.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let p = ptr_at::<T>(ctx, off)?;
    Some(unsafe { core::ptr::read_unaligned(p) })
}

/// What the classifiers need of one packet.
pub struct Packet {
    pub src: Addr,
    pub dst: Addr,
    pub proto: u8,
    pub is_v6: bool,
    /// Offset of the transport header; 0 when there is none to read (a later fragment).
    pub l4: usize,
    pub sport: u16,
    pub dport: u16,
}

/// `::ffff:0:0/96`, the third word of an IPv4-mapped address.
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Parses Ethernet (one VLAN tag at most), IPv4 or IPv6, and the TCP or UDP ports.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Option<Packet> {
    let mut l3 = ETH_HLEN;
    let mut ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    if ethertype == ETH_P_8021Q {
        ethertype = u16::from_be(read::<u16>(ctx, 16)?);
        l3 += 4;
    }
    let mut p = match ethertype {
        ETH_P_IP => {
            let vihl = read::<u8>(ctx, l3)?;
            if vihl >> 4 != 4 {
                return None;
            }
            let ihl = usize::from(vihl & 0x0f) * 4;
            if ihl < 20 {
                return None;
            }
            let frag = u16::from_be(read::<u16>(ctx, l3 + 6)?);
            // Both addresses in one copy into aligned words.
            let a = ctx.load::<[u32; 2]>(l3 + 12).ok()?;
            Packet {
                src: [0, 0, V4_MAPPED, a[0]],
                dst: [0, 0, V4_MAPPED, a[1]],
                proto: read::<u8>(ctx, l3 + 9)?,
                is_v6: false,
                // Only the first fragment carries the transport header.
                l4: if frag & 0x1fff == 0 { l3 + ihl } else { 0 },
                sport: 0,
                dport: 0,
            }
        }
        ETH_P_IPV6 => {
            if read::<u8>(ctx, l3)? >> 4 != 6 {
                return None;
            }
            // Extension headers are not followed: DNS and flows use the fixed header.
            let a = ctx.load::<[u32; 8]>(l3 + 8).ok()?;
            Packet {
                src: [a[0], a[1], a[2], a[3]],
                dst: [a[4], a[5], a[6], a[7]],
                proto: read::<u8>(ctx, l3 + 6)?,
                is_v6: true,
                l4: l3 + 40,
                sport: 0,
                dport: 0,
            }
        }
        _ => return None,
    };
    if p.l4 != 0 && (p.proto == IPPROTO_TCP || p.proto == IPPROTO_UDP) {
        match read::<[u8; 4]>(ctx, p.l4) {
            Some(ports) => {
                p.sport = u16::from_be_bytes([ports[0], ports[1]]);
                p.dport = u16::from_be_bytes([ports[2], ports[3]]);
            }
            None => p.l4 = 0,
        }
    }
    Some(p)
}

/// The TCP flags byte, or 0 for anything else.
#[inline(always)]
pub fn tcp_flags(ctx: &TcContext, p: &Packet) -> u8 {
    if p.proto != IPPROTO_TCP || p.l4 == 0 {
        return 0;
    }
    read::<u8>(ctx, p.l4 + 13).unwrap_or(0)
}
