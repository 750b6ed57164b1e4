//! `skb:kfree_skb`: every packet the kernel drops, by device and drop reason.

use aya_ebpf::{
    macros::{map, tracepoint},
    maps::PerCpuHashMap,
    programs::TracePointContext,
};
use monitor_common::{DEVICE_OTHER, DROPS_MAX_ENTRIES, DropKey, REASON_UNKNOWN};

use crate::{
    kernel::{layout, skb_dev_in_own_netns, skb_is_dns},
    maps::{MONITORED, increment},
};

/// Drop counts by (device, reason, dns).
#[map]
static DROPS: PerCpuHashMap<DropKey, u64> = PerCpuHashMap::with_max_entries(DROPS_MAX_ENTRIES, 0);

#[tracepoint]
pub fn kfree_skb(ctx: TracePointContext) -> u32 {
    let _ = try_kfree_skb(&ctx);
    0
}

#[inline(always)]
fn try_kfree_skb(ctx: &TracePointContext) -> Result<(), ()> {
    let reason_off = layout::tp_kfree_reason();
    let reason = if reason_off == u32::MAX {
        REASON_UNKNOWN
    } else {
        let r: u32 = unsafe { ctx.read_at(reason_off as usize) }.map_err(|_| ())?;
        if r <= layout::reason_not_specified() {
            return Ok(());
        }
        r
    };
    let skb: u64 = unsafe { ctx.read_at(layout::tp_kfree_skbaddr() as usize) }.map_err(|_| ())?;
    let protocol: u16 =
        unsafe { ctx.read_at(layout::tp_kfree_protocol() as usize) }.map_err(|_| ())?;

    let ifindex = match skb_dev_in_own_netns(skb) {
        Some(i) if MONITORED.get_ptr(i).is_some() => i,
        _ => DEVICE_OTHER,
    };
    let key = DropKey {
        ifindex,
        reason,
        dns: u32::from(skb_is_dns(skb, protocol)),
        pad: 0,
    };
    increment(&DROPS, &key);
    Ok(())
}
