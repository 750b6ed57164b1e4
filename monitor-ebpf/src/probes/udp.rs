//! `udp_fail_queue_rcv_skb` (raw tracepoint): a UDP socket's receive queue was full, DNS
//! split out. Every kernel passes `(int rc, struct sock *sk, ...)`; the socket's ports say
//! whether it is DNS: a server bound to 53, or a client connected to a server's 53.

use aya_ebpf::{
    macros::{map, raw_tracepoint},
    maps::PerCpuArray,
    programs::RawTracePointContext,
};
use monitor_common::{UDP_QUEUE_DNS, UDP_QUEUE_OTHER};

use crate::kernel::{layout, read};

#[map]
static UDP_QUEUE_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

const DNS_PORT: u16 = 53;

#[raw_tracepoint(tracepoint = "udp_fail_queue_rcv_skb")]
pub fn udp_fail_queue_rcv_skb(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(1);
    let local = read::<u16>(sk, layout::sk_num()).unwrap_or(0);
    let remote = u16::from_be(read::<u16>(sk, layout::sk_dport()).unwrap_or(0));
    let index = if local == DNS_PORT || remote == DNS_PORT {
        UDP_QUEUE_DNS
    } else {
        UDP_QUEUE_OTHER
    };
    if let Some(n) = UDP_QUEUE_DROPS.get_ptr_mut(index) {
        // SAFETY: this CPU's own slot of a per-CPU array.
        unsafe { *n += 1 };
    }
    0
}
