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

/// The `n` words at `off` into the packet as they lie in memory, each with one load at
/// whatever alignment the packet has: the verifier allows misaligned packet loads
/// where the CPU does them at full speed (x86_64, arm64), and Rust would split an
/// unaligned read into one load per byte.
#[inline(always)]
pub fn words<const N: usize>(ctx: &TcContext, off: usize) -> Option<[u32; N]> {
    let p = ptr_at::<[u32; N]>(ctx, off)? as *const u32;
    let mut w = [0u32; N];
    for (i, v) in w.iter_mut().enumerate() {
        let word: u64;
        // SAFETY: inside the bounds checked above; the load only reads.
        unsafe {
            core::arch::asm!(
                "{w} = *(u32 *)({p} + 0)",
                w = lateout(reg) word,
                p = in(reg) p.wrapping_add(i),
                options(pure, readonly, nostack, preserves_flags),
            );
        }
        *v = word as u32;
    }
    Some(w)
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

/// Byte `i` of a word copied from the packet as it lay in memory.
#[inline(always)]
fn byte(w: u32, i: u32) -> u32 {
    (w >> (8 * i)) & 0xff
}

/// The two port fields of a transport header's first word, in host order.
#[inline(always)]
fn ports(w: u32) -> (u16, u16) {
    (
        u16::from_be((w & 0xffff) as u16),
        u16::from_be((w >> 16) as u16),
    )
}

/// Parses Ethernet (one VLAN tag at most), IPv4 or IPv6, and the TCP or UDP ports,
/// reading each header in place after one bounds check for all of it; a header the
/// linear data does not hold is copied out (a slower helper call).
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Option<Packet> {
    let mut l3 = ETH_HLEN;
    let mut ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    if ethertype == ETH_P_8021Q {
        ethertype = u16::from_be(read::<u16>(ctx, 16)?);
        l3 += 4;
    }
    match ethertype {
        ETH_P_IP => {
            // A header without options and the first word after it; a datagram too
            // short for that has no ports to read.
            let (h, whole) = match words::<6>(ctx, l3) {
                Some(h) => (h, true),
                None => match ctx.load::<[u32; 6]>(l3) {
                    Ok(h) => (h, true),
                    Err(_) => {
                        let h = ctx.load::<[u32; 5]>(l3).ok()?;
                        ([h[0], h[1], h[2], h[3], h[4], 0], false)
                    }
                },
            };
            let vihl = byte(h[0], 0);
            if vihl >> 4 != 4 {
                return None;
            }
            let ihl = (vihl & 0x0f) as usize * 4;
            if ihl < 20 {
                return None;
            }
            // Fragment offset (13 bits of bytes 6 and 7) zero: the first fragment,
            // the only one carrying the transport header.
            let first = (h[1] >> 16) & 0xff1f == 0;
            let mut p = Packet {
                src: [0, 0, V4_MAPPED, h[3]],
                dst: [0, 0, V4_MAPPED, h[4]],
                proto: byte(h[2], 1) as u8,
                is_v6: false,
                l4: if first { l3 + ihl } else { 0 },
                sport: 0,
                dport: 0,
            };
            if p.l4 != 0 && (p.proto == IPPROTO_TCP || p.proto == IPPROTO_UDP) {
                let w = if ihl == 20 {
                    Some(h[5]).filter(|_| whole)
                } else {
                    read::<u32>(ctx, p.l4).or_else(|| ctx.load::<u32>(p.l4).ok())
                };
                match w {
                    Some(w) => (p.sport, p.dport) = ports(w),
                    None => p.l4 = 0,
                }
            }
            Some(p)
        }
        ETH_P_IPV6 => {
            // Extension headers are not followed: DNS and flows use the fixed header.
            let (h, whole) = match words::<11>(ctx, l3) {
                Some(h) => (h, true),
                None => match ctx.load::<[u32; 11]>(l3) {
                    Ok(h) => (h, true),
                    Err(_) => {
                        let h = ctx.load::<[u32; 10]>(l3).ok()?;
                        (
                            [
                                h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9], 0,
                            ],
                            false,
                        )
                    }
                },
            };
            if byte(h[0], 0) >> 4 != 6 {
                return None;
            }
            let mut p = Packet {
                src: [h[2], h[3], h[4], h[5]],
                dst: [h[6], h[7], h[8], h[9]],
                proto: byte(h[1], 2) as u8,
                is_v6: true,
                l4: l3 + 40,
                sport: 0,
                dport: 0,
            };
            if p.proto == IPPROTO_TCP || p.proto == IPPROTO_UDP {
                if whole {
                    (p.sport, p.dport) = ports(h[10]);
                } else {
                    p.l4 = 0;
                }
            }
            Some(p)
        }
        _ => None,
    }
}

/// The TCP flags byte, or 0 for anything else.
#[inline(always)]
pub fn tcp_flags(ctx: &TcContext, p: &Packet) -> u8 {
    if p.proto != IPPROTO_TCP || p.l4 == 0 {
        return 0;
    }
    read::<u8>(ctx, p.l4 + 13)
        .or_else(|| ctx.load::<u8>(p.l4 + 13).ok())
        .unwrap_or(0)
}
