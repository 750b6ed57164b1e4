//! Packets to EC2's link-local services (the VPC resolver, IMDS, time sync), which
//! share a 1024 packets/s allowance per ENI: totals, counts per second so the agent
//! can report the busiest second rather than an average that hides bursts, and who sent
//! them each second.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use monitor_common::{
    Addr, AddrInfo, LL_SENDER_SECONDS, LL_SENDER_SETS, LL_SENDER_WAYS, LL_WINDOW, LinkLocalSecond,
    LinkLocalSender, LinkLocalSenders, LinkLocalService, MAX_DEVICES, MapFull, RESOLVER_OTHER,
    SERVICE_NONE, hash::XXH32_PRIME_1, proto::DNS_PORT,
};

use super::packet::Packet;
use crate::{
    kernel::now_coarse_s,
    maps::{addr_info, bump, map_full, slot},
};

/// Packets per (device slot, service).
#[map]
static LL_PACKETS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_DEVICES * LinkLocalService::COUNT, 0);

/// Packets per (device slot, second modulo the window).
#[map]
static LL_SECONDS: PerCpuArray<LinkLocalSecond> =
    PerCpuArray::with_max_entries(MAX_DEVICES * LL_WINDOW, 0);

/// Each CPU's senders of the last `LL_SENDER_SECONDS` seconds (second modulo that), over
/// all devices: a few KiB a CPU, whatever pods send.
#[map]
static LL_SENDER_TABLES: PerCpuArray<LinkLocalSenders> =
    PerCpuArray::with_max_entries(LL_SENDER_SECONDS, 0);

/// `fd00:ec2::/32`, the first word of EC2's IPv6 link-local services as it lies in memory.
const EC2_V6_PREFIX: u32 = u32::from_ne_bytes([0xfd, 0, 0x0e, 0xc2]);

/// What the agent told of `addr`:`port` (the packet's far end), where it can be a
/// link-local service (the Amazon resolver: 169.254.169.253, `fd00:ec2::253`, VPC+2;
/// IMDS; time sync) or a resolver the agent named. A cheap test first, so that other
/// packets never pay the lookup.
/// Nothing known: not a link-local service, no resolver slot. A whole value on every
/// path (the verifier refuses a read of a stack slot some path left unwritten).
pub const UNKNOWN: AddrInfo = AddrInfo {
    service: SERVICE_NONE,
    resolver: RESOLVER_OTHER,
    pad: [0; 2],
};

#[inline(always)]
pub fn lookup(p: &Packet, addr: &Addr, port: u16) -> AddrInfo {
    let last = addr[3].to_ne_bytes();
    let v4_link_local = !p.is_v6 && last[0] == 169 && last[1] == 254;
    let v6_ec2 = p.is_v6 && addr[0] == EC2_V6_PREFIX;
    // A VPC+2 resolver can be any address, but only DNS goes there.
    if !(v4_link_local || v6_ec2 || port == DNS_PORT) {
        return UNKNOWN;
    }
    addr_info(addr).unwrap_or(UNKNOWN)
}

/// The link-local service `info` names, if any.
#[inline(always)]
pub fn service(info: AddrInfo) -> Option<u32> {
    (info.service != SERVICE_NONE).then_some(u32::from(info.service))
}

/// Counts a packet from local address `from` to link-local `service` on the device.
#[inline(always)]
pub fn count(service: u32, ifindex: u32, from: &Addr) {
    let Some(slot) = slot(ifindex) else {
        return;
    };
    if slot >= MAX_DEVICES || service >= LinkLocalService::COUNT {
        return;
    }
    bump(&LL_PACKETS, slot * LinkLocalService::COUNT + service);
    let second = now_coarse_s();
    let index = slot * LL_WINDOW + second % LL_WINDOW;
    if let Some(s) = LL_SECONDS.get_ptr_mut(index) {
        // SAFETY: this CPU's own slot of a per-CPU array; programs on one CPU do not
        // interleave.
        unsafe {
            if (*s).second != second {
                (*s).second = second;
                (*s).packets = 0;
            }
            (*s).packets += 1;
        }
    }
    sent(second, slot, service, from);
}

/// Counts a packet of `from` in this CPU's senders of `second`: in one set of
/// `LL_SENDER_WAYS` entries chosen by a hash, so that a packet compares a few entries
/// only and the verifier walks a short loop.
#[inline(always)]
fn sent(second: u32, slot: u32, service: u32, from: &Addr) {
    let Some(t) = LL_SENDER_TABLES.get_ptr_mut(second % LL_SENDER_SECONDS) else {
        return;
    };
    // SAFETY: this CPU's own slot of a per-CPU array; programs on one CPU do not
    // interleave.
    let t = unsafe { &mut *t };
    if t.second != second {
        t.second = second;
        t.used = 0;
    }
    // Slot and service fit a byte each (checked by the caller).
    let (slot, service) = (slot as u8, service as u8);
    let set = sender_set(from, slot, service) as usize;
    let used = t.used;
    let mut least = 0;
    let mut least_packets = u32::MAX;
    for way in 0..LL_SENDER_WAYS {
        let i = set * LL_SENDER_WAYS + way;
        let bit = 1u32 << i;
        let Some(e) = t.senders.get_mut(i) else {
            return;
        };
        if used & bit == 0 {
            // A free way: the newcomer's.
            *e = LinkLocalSender {
                addr: *from,
                packets: 1,
                slot,
                service,
                pad: [0; 2],
            };
            t.used = used | bit;
            return;
        }
        if e.addr == *from && e.slot == slot && e.service == service {
            e.packets += 1;
            return;
        }
        if e.packets < least_packets {
            least_packets = e.packets;
            least = i;
        }
    }
    // The set is full: the newcomer takes its least one's place and count.
    if let Some(e) = t.senders.get_mut(least) {
        *e = LinkLocalSender {
            addr: *from,
            packets: least_packets.saturating_add(1),
            slot,
            service,
            pad: [0; 2],
        };
        map_full(MapFull::LinkLocalSenders);
    }
}

/// Which set of a table a sender's packets are counted in.
#[inline(always)]
fn sender_set(from: &Addr, slot: u8, service: u8) -> u32 {
    let mixed =
        (from[0] ^ from[1] ^ from[2] ^ from[3] ^ (u32::from(slot) << 8) ^ u32::from(service))
            .wrapping_mul(XXH32_PRIME_1);
    // The product's top bits, which every bit of the sender moves (Fibonacci hashing).
    mixed >> (32 - LL_SENDER_SETS.trailing_zeros())
}
