//! `udp:udp_fail_queue_rcv_skb`: a UDP socket's receive queue was full, DNS split out.

use aya_ebpf::{
    macros::{map, tracepoint},
    maps::PerCpuArray,
    programs::TracePointContext,
};
use monitor_common::{UDP_QUEUE_DNS, UDP_QUEUE_OTHER};

use crate::kernel::layout;

#[map]
static UDP_QUEUE_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

#[inline(always)]
fn port(ctx: &TracePointContext, off: u32) -> u16 {
    if off == u32::MAX {
        return 0;
    }
    // The tracepoint stores ports in host order.
    unsafe { ctx.read_at::<u16>(off as usize) }.unwrap_or(0)
}

#[tracepoint]
pub fn udp_fail_queue_rcv_skb(ctx: TracePointContext) -> u32 {
    let dns = port(&ctx, layout::tp_udpfail_sport()) == 53
        || port(&ctx, layout::tp_udpfail_dport()) == 53;
    let index = if dns { UDP_QUEUE_DNS } else { UDP_QUEUE_OTHER };
    if let Some(n) = UDP_QUEUE_DROPS.get_ptr_mut(index) {
        unsafe { *n += 1 };
    }
    0
}
