//! `kfree_skb` (BTF-typed raw tracepoint): every packet the kernel drops, by device and
//! drop reason. The arguments are the tracepoint's prototype: `skb` first, the reason
//! third where the kernel has one (5.17+), which the agent learns from BTF and hands over
//! at load. The verifier knows `skb`'s type, so its fields and the device's are plain
//! loads; only the packet's headers are copied with a helper.

use aya_ebpf::{
    macros::{btf_tracepoint, map},
    maps::PerCpuHashMap,
    programs::BtfTracePointContext,
};
use monitor_common::{DEVICE_OTHER, DROPS_MAX_ENTRIES, DropKey, MapFull, REASON_UNKNOWN};

use crate::{
    kernel::{field, layout, skb_dev_in_own_netns, skb_is_dns},
    maps::{increment, slot},
};

/// Drop counts by (device, reason, dns).
#[map]
static DROPS: PerCpuHashMap<DropKey, u64> = PerCpuHashMap::with_max_entries(DROPS_MAX_ENTRIES, 0);

#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb(ctx: BtfTracePointContext) -> i32 {
    count(&ctx);
    0
}

#[inline(always)]
fn count(ctx: &BtfTracePointContext) {
    // A constant at load: on kernels without the argument the verifier never walks the
    // read of a third argument, which the attach would refuse.
    let reason = if layout::kfree_skb_has_reason() != 0 {
        let r = ctx.arg::<u64>(2) as u32;
        if r <= layout::reason_not_specified() {
            return;
        }
        r
    } else {
        REASON_UNKNOWN
    };
    let skb: u64 = ctx.arg(0);
    let protocol = u16::from_be(field::<u16>(skb, layout::skb_protocol()));

    let ifindex = match skb_dev_in_own_netns(skb) {
        Some(i) if slot(i).is_some() => i,
        _ => DEVICE_OTHER,
    };
    let key = DropKey {
        ifindex,
        reason,
        dns: u32::from(skb_is_dns(skb, protocol)),
        pad: 0,
    };
    increment(&DROPS, &key, MapFull::Drops);
}
