//! Header parsing for the classifiers, with every access bounds-checked against the
//! packet's linear data.

use aya_ebpf::programs::TcContext;
use monitor_common::{
    Addr,
    proto::{
        ETH_HLEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, ETH_TYPE_OFF, IPPROTO_FRAGMENT, IPPROTO_TCP,
        IPV4_HLEN, IPV6_HLEN, TCP_FLAGS, VLAN_HLEN,
    },
};

/// IPv6 extension headers followed to the transport header.
const MAX_IPV6_EXTENSIONS: usize = 4;

use crate::headers;

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
    // SAFETY: the whole `T` lies inside the packet, checked just above.
    Some(unsafe { core::ptr::read_unaligned(p) })
}

/// The `n` words at `off` into the packet as they lie in memory, each with one load at
/// whatever alignment the packet has: the verifier allows misaligned packet loads
/// where the CPU does them at full speed (`x86_64`, arm64), and Rust would split an
/// unaligned read into one load per byte.
#[inline(always)]
pub fn words<const N: usize>(ctx: &TcContext, off: usize) -> Option<[u32; N]> {
    let p = ptr_at::<[u32; N]>(ctx, off)?.cast::<u32>();
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

/// The `M` words of a network header and the transport header's first word after it
/// (`N` = `M` + 1 words), in place where the linear data holds them, else copied out;
/// where the packet ends before that word, the header alone and `false`.
#[inline(always)]
fn header_and_ports<const N: usize, const M: usize>(
    ctx: &TcContext,
    off: usize,
) -> Option<([u32; N], bool)> {
    if let Some(h) = words::<N>(ctx, off) {
        return Some((h, true));
    }
    if let Ok(h) = ctx.load::<[u32; N]>(off) {
        // Copied out: `words` above read it in place where it could.
        return Some((h, true));
    }
    let h = ctx.load::<[u32; M]>(off).ok()?;
    let mut w = [0u32; N];
    for (w, h) in w.iter_mut().zip(h) {
        *w = h;
    }
    Some((w, false))
}

/// Parses Ethernet (one VLAN tag at most), IPv4 or IPv6, and the TCP or UDP ports,
/// reading each header in place after one bounds check for all of it; a header the
/// linear data does not hold is copied out (a slower helper call).
// One body, over 60 lines: the object is held instruction for instruction to the one
// the kernel matrix verified (6.1's verifier walks within a fifth of its budget), and a
// split, even into functions inlined always, compiles to other eBPF.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Option<Packet> {
    let mut l3 = ETH_HLEN;
    let mut ethertype = u16::from_be(read::<u16>(ctx, ETH_TYPE_OFF)?);
    if ethertype == ETH_P_8021Q {
        ethertype = u16::from_be(read::<u16>(ctx, ETH_TYPE_OFF + VLAN_HLEN)?);
        l3 += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IP => {
            // A header without options and the first word after it; a datagram too
            // short for that has no ports to read.
            let (h, whole) = header_and_ports::<6, 5>(ctx, l3)?;
            let ip = headers::ipv4(&headers::head(&h))?;
            let mut p = Packet {
                src: ip.src,
                dst: ip.dst,
                proto: ip.proto,
                is_v6: false,
                l4: if ip.first_fragment {
                    l3 + ip.ihl as usize
                } else {
                    0
                },
                sport: 0,
                dport: 0,
            };
            if p.l4 != 0 && headers::has_ports(p.proto) {
                let w = if ip.ihl == IPV4_HLEN {
                    whole.then_some(h[5])
                } else {
                    read::<u32>(ctx, p.l4).or_else(|| ctx.load::<u32>(p.l4).ok())
                };
                match w {
                    Some(w) => (p.sport, p.dport) = headers::ports(w),
                    None => p.l4 = 0,
                }
            }
            Some(p)
        }
        ETH_P_IPV6 => {
            let (h, whole) = header_and_ports::<11, 10>(ctx, l3)?;
            let ip = headers::ipv6(&headers::head(&h))?;
            let mut p = Packet {
                src: ip.src,
                dst: ip.dst,
                proto: ip.next,
                is_v6: true,
                l4: l3 + IPV6_HLEN,
                sport: 0,
                dport: 0,
            };
            if headers::has_ports(p.proto) {
                if whole {
                    (p.sport, p.dport) = headers::ports(h[10]);
                } else {
                    p.l4 = 0;
                }
            } else if headers::is_ipv6_extension(p.proto) {
                extensions(ctx, &mut p, whole.then_some(h[10]));
            }
            Some(p)
        }
        _ => None,
    }
}

/// A transport header's first word at `off`: in place, else copied out.
#[inline(always)]
fn word(ctx: &TcContext, off: usize) -> Option<u32> {
    read::<u32>(ctx, off).or_else(|| ctx.load::<u32>(off).ok())
}

/// Walks IPv6 extension headers (hop-by-hop, routing, destination options, fragment) to
/// the transport header, at most `MAX_IPV6_EXTENSIONS` of them; `first` is the first
/// one's leading word when already read. A first fragment carries the ports and matches
/// as a whole packet does; a later fragment, or a chain too long or cut short, has no
/// ports to read (`l4` 0).
#[inline(always)]
fn extensions(ctx: &TcContext, p: &mut Packet, mut first: Option<u32>) {
    for _ in 0..MAX_IPV6_EXTENSIONS {
        let Some(w) = first.take().or_else(|| word(ctx, p.l4)) else {
            p.l4 = 0;
            return;
        };
        let next = headers::byte(w, 0) as u8;
        let len = if p.proto == IPPROTO_FRAGMENT {
            // The fragment offset: the 13 bits above the flags in bytes 2 and 3.
            if u16::from_be((w >> 16) as u16) & 0xfff8 != 0 {
                p.proto = next;
                p.l4 = 0;
                return;
            }
            8
        } else {
            (headers::byte(w, 1) as usize + 1) * 8
        };
        p.proto = next;
        p.l4 += len;
        if !headers::is_ipv6_extension(next) {
            break;
        }
    }
    if !headers::has_ports(p.proto) {
        // Another protocol (its own header, no ports), or still an extension: too many.
        if headers::is_ipv6_extension(p.proto) {
            p.l4 = 0;
        }
        return;
    }
    match word(ctx, p.l4) {
        Some(w) => (p.sport, p.dport) = headers::ports(w),
        None => p.l4 = 0,
    }
}

/// The TCP flags byte, or 0 for anything else.
#[inline(always)]
pub fn tcp_flags(ctx: &TcContext, p: &Packet) -> u8 {
    if p.proto != IPPROTO_TCP || p.l4 == 0 {
        return 0;
    }
    read::<u8>(ctx, p.l4 + TCP_FLAGS)
        .or_else(|| ctx.load::<u8>(p.l4 + TCP_FLAGS).ok())
        .unwrap_or(0)
}
