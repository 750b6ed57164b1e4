//! Packets to EC2's link-local services (the VPC resolver, IMDS, time sync), which
//! share a 1024 packets/s allowance per ENI: totals, and counts per second so the agent
//! can report the busiest second rather than an average that hides bursts.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use monitor_common::{
    Addr, LL_WINDOW, LinkLocalSecond, LinkLocalService, MAX_DEVICES, proto::DNS_PORT,
};

use super::packet::Packet;
use crate::{
    kernel::now_coarse_s,
    maps::{bump, slot},
};

/// Link-local service addresses (and the VPC+2 resolvers) to their [`LinkLocalService`].
#[map]
static LINKLOCAL: HashMap<Addr, u32> = HashMap::with_max_entries(64, 0);

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

/// The link-local service at `addr`:`port` (the packet's far end), if it is one: the
/// Amazon resolver (169.254.169.253, `fd00:ec2::253`, VPC+2), IMDS or time sync. A cheap
/// test first, so that other packets never pay the lookup.
#[inline(always)]
pub fn service(p: &Packet, addr: &Addr, port: u16) -> Option<u32> {
    let last = addr[3].to_ne_bytes();
    let v4_link_local = !p.is_v6 && last[0] == 169 && last[1] == 254;
    let v6_ec2 = p.is_v6 && addr[0] == EC2_V6_PREFIX;
    // A VPC+2 resolver can be any address, but only DNS goes there.
    if !(v4_link_local || v6_ec2 || port == DNS_PORT) {
        return None;
    }
    // SAFETY: a read of a map value the kernel keeps alive for the program's run.
    unsafe { LINKLOCAL.get(addr) }.copied()
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
