//! Kernel layout read at load time. The agent reads every offset from the running
//! kernel's BTF and writes it into these globals before loading; the
//! zero defaults are never used on a real load.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_probe_read_kernel};
use monitor_common::proto::{ETH_P_IP, ETH_P_IPV6, IPV4_HLEN};

use crate::headers;

/// Declares each load-time global (a `u32` the loader patches, found by its symbol) and
/// its getter in `layout`, from the one list in `monitor_common::with_globals`.
macro_rules! layout_globals {
    ($($(#[$doc:meta])* $getter:ident => $symbol:ident),* $(,)?) => {
        $(
            $(#[$doc])*
            #[unsafe(no_mangle)]
            static $symbol: u32 = 0;
        )*

        pub mod layout {
            $(
                #[inline(always)]
                pub fn $getter() -> u32 {
                    super::global(&super::$symbol)
                }
            )*
        }
    };
}

monitor_common::with_globals!(layout_globals);

/// Reads a load-time global; volatile so the compiler keeps the load the loader patched.
/// The globals live in a frozen read-only map, so the verifier knows their values and
/// does not walk a branch they rule out (a helper or argument the kernel lacks).
#[inline(always)]
pub fn global(v: &'static u32) -> u32 {
    // SAFETY: a plain read of a static the loader initialised.
    unsafe { core::ptr::read_volatile(v) }
}

/// Reads a `T` at `base + off` in kernel memory.
#[inline(always)]
pub fn read<T>(base: u64, off: u32) -> Result<T, ()> {
    // SAFETY: the helper checks the address and fails rather than fault.
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const T) }.map_err(|_| ())
}

/// `skb->network_header` / `transport_header` value meaning "not set".
const HEADER_UNSET: u16 = 0xffff;

/// A field of a kernel object the verifier knows the type of (a BTF-typed tracepoint's
/// argument, or a pointer loaded from one): one load, which the JIT guards against a
/// fault (a NULL or stale pointer reads as zero), where `read` is a helper call.
#[inline(always)]
pub fn field<T: Copy>(base: u64, off: u32) -> T {
    // SAFETY: the verifier checks the access against the object's BTF type and turns it
    // into a load that cannot fault.
    unsafe { core::ptr::read_volatile((base + u64::from(off)) as *const T) }
}

/// Whether the packet in `skb` (a BTF-typed pointer) is DNS: TCP or UDP with port 53 on
/// either side. `protocol` is the host-order ethertype. Anything unreadable is not DNS.
/// The headers are read in one copy: the network header and the first transport word
/// when they lie where a header without options puts them.
#[inline(always)]
pub fn skb_is_dns(skb: u64, protocol: u16) -> bool {
    let head: u64 = field(skb, layout::skb_head());
    let nh: u16 = field(skb, layout::skb_network_header());
    if nh == HEADER_UNSET || head == 0 {
        return false;
    }
    let l3 = head + u64::from(nh);
    let ports = match protocol {
        ETH_P_IP => {
            let Ok(h) = read::<[u32; 6]>(l3, 0) else {
                return false;
            };
            let Some(ip) = headers::ipv4(&headers::head(&h)) else {
                return false;
            };
            // Only the first fragment carries ports.
            if !headers::has_ports(ip.proto) || !ip.first_fragment {
                return false;
            }
            if ip.ihl == IPV4_HLEN {
                h[5]
            } else {
                let Ok(w) = read::<u32>(l3, ip.ihl) else {
                    return false;
                };
                w
            }
        }
        ETH_P_IPV6 => {
            let Ok(h) = read::<[u32; 11]>(l3, 0) else {
                return false;
            };
            let Some(ip) = headers::ipv6(&headers::head(&h)) else {
                return false;
            };
            if headers::has_ports(ip.next) {
                h[10]
            } else {
                // Extension headers: trust the kernel's transport header when set.
                let th: u16 = field(skb, layout::skb_transport_header());
                if th == HEADER_UNSET || th <= nh {
                    return false;
                }
                let Ok(w) = read::<u32>(head, u32::from(th)) else {
                    return false;
                };
                w
            }
        }
        _ => return false,
    };
    headers::is_dns(ports)
}

/// The interface index of `skb->dev` (`skb` a BTF-typed pointer) when that device lives
/// in the agent's own network namespace, else `None` (no device, a device in another
/// namespace, or `dev` reused as scratch space by the UDP receive path).
#[inline(always)]
pub fn skb_dev_in_own_netns(skb: u64) -> Option<u32> {
    let dev: u64 = field(skb, layout::skb_dev());
    if dev == 0 {
        return None;
    }
    let net: u64 = field(dev, layout::dev_net());
    if net == 0 {
        return None;
    }
    let inum: u32 = field(net, layout::net_inum());
    if inum != layout::own_netns_inum() {
        return None;
    }
    Some(field(dev, layout::dev_ifindex()))
}

/// `CLOCK_MONOTONIC` nanoseconds, as the agent's `clock_gettime` sees them.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
}

/// The last reading of the clock, shared by every CPU: the low 32 bits of the jiffy it
/// was taken in over the second it read (one word, so that no CPU reads one CPU's jiffy
/// with another's second). A global, not a map's element: its address is a constant of
/// the program, so a packet reads it with one load, where a map's element costs the
/// lookup's loads first (and on kernels before 6.10, a per-CPU array's a helper call).
/// Written once a jiffy by whichever CPU first sees the jiffy turn.
static mut CLOCK_READING: u64 = 0;

/// `CLOCK_MONOTONIC` seconds, read from the clock once per jiffy: a packet pays for
/// `bpf_jiffies64`, which the verifier inlines to one load, and the shared reading,
/// where a helper call costs a return through the kernel's return thunk (15-20 ns on
/// CPUs that need one). The second can lag by a tick, nothing at one-second resolution;
/// a reading is taken for current only in a jiffy whose low 32 bits are its own, so one
/// 2^32 jiffies old (49 days at 1000 Hz) with no packet since would be, for one jiffy.
#[inline(always)]
pub fn now_coarse_s() -> u32 {
    // SAFETY: a helper without arguments (5.5+).
    let jiffy = unsafe { bpf_jiffies64() } as u32;
    let reading = &raw mut CLOCK_READING;
    // SAFETY: a global of the program's own data, which the kernel keeps for its run; an
    // aligned 8-byte load cannot be torn by another CPU's store.
    let r = unsafe { core::ptr::read_volatile(reading) };
    if r != 0 && (r >> 32) as u32 == jiffy {
        return r as u32;
    }
    let second = read_clock_s();
    // SAFETY: as above; CPUs that race here write the same reading of the same jiffy,
    // or one a tick apart that the next jiffy replaces.
    unsafe { core::ptr::write_volatile(reading, u64::from(jiffy) << 32 | u64::from(second)) };
    second
}

/// `CLOCK_MONOTONIC` seconds from the coarse clock where the kernel has it (5.11+): no
/// clock-source read; older kernels read the precise clock.
#[inline(always)]
fn read_clock_s() -> u32 {
    let ns = if layout::have_coarse_clock() != 0 {
        // SAFETY: a helper without arguments; only reached where the kernel has it.
        unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns() }
    } else {
        now_ns()
    };
    (ns / 1_000_000_000) as u32
}
