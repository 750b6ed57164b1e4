//! Packets to EC2's link-local services (the VPC resolver, IMDS, time sync), which
//! share a 1024 packets/s allowance per ENI: totals, and counts per second so the agent
//! can report the busiest second rather than an average that hides bursts.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use monitor_common::{
    Addr, AddrInfo, LL_WINDOW, LinkLocalSecond, LinkLocalService, MAX_DEVICES, RESOLVER_OTHER,
    SERVICE_NONE, proto::DNS_PORT,
};

use super::packet::Packet;
use crate::{
    kernel::now_coarse_s,
    maps::{addr_info, bump, slot},
};

/// Packets per (device slot, service).
#[map]
static LL_PACKETS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_DEVICES * LinkLocalService::COUNT, 0);

/// Packets per (device slot, second modulo the window).
#[map]
static LL_SECONDS: PerCpuArray<LinkLocalSecond> =
    PerCpuArray::with_max_entries(MAX_DEVICES * LL_WINDOW, 0);

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

/// Counts a packet to link-local `service` on the device.
#[inline(always)]
pub fn count(service: u32, ifindex: u32) {
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
}
