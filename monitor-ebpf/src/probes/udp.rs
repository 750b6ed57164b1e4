//! `udp_fail_queue_rcv_skb` (raw tracepoint): a UDP socket's receive queue was full, DNS
//! split out. Every kernel passes `(int rc, struct sock *sk, ...)`; the socket's ports say
//! whether it is DNS: a server bound to 53, or a client connected to a server's 53.

use aya_ebpf::{
    macros::{map, raw_tracepoint},
    maps::PerCpuArray,
    programs::RawTracePointContext,
};
use monitor_common::{UdpQueuePort, proto::DNS_PORT};

use crate::{
    kernel::{layout, read},
    maps::bump,
};

#[map]
static UDP_QUEUE_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(UdpQueuePort::COUNT, 0);

#[raw_tracepoint(tracepoint = "udp_fail_queue_rcv_skb")]
pub fn udp_fail_queue_rcv_skb(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(1);
    let local = read::<u16>(sk, layout::sk_num()).unwrap_or(0);
    let remote = u16::from_be(read::<u16>(sk, layout::sk_dport()).unwrap_or(0));
    let port = if local == DNS_PORT || remote == DNS_PORT {
        UdpQueuePort::Dns
    } else {
        UdpQueuePort::Other
    };
    bump(&UDP_QUEUE_DROPS, port as u32);
    0
}
