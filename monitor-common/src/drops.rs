//! Kernel drops (`kfree_skb`) and UDP receive-queue overflows.

use crate::labelled;

/// Reason recorded when the running kernel's tracepoint carries no drop reason.
pub const REASON_UNKNOWN: u32 = u32::MAX;

/// Key of the `DROPS` per-CPU hash map, filled by the `kfree_skb` tracepoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DropKey {
    /// Interface index of a monitored device, or [`crate::DEVICE_OTHER`].
    pub ifindex: u32,
    /// The kernel's `enum skb_drop_reason` value, or [`REASON_UNKNOWN`].
    pub reason: u32,
    /// 1 when the packet was DNS (UDP or TCP, port 53 on either side), else 0.
    pub dns: u32,
    pub pad: u32,
}
const _: () = assert!(size_of::<DropKey>() == 16);

/// Maximum number of distinct (device, reason, dns) keys kept by the kernel side. The
/// map is preallocated (a tracing program's maps must be on 5.10): kept small.
pub const DROPS_MAX_ENTRIES: u32 = 1024;

labelled! {
    /// `UDP_QUEUE_DROPS` indexes: the `port` label of `udp_receive_queue_drops_total`.
    UdpQueuePort {
        /// Port 53 on either side.
        Dns = 0 => "dns",
        Other = 1 => "other",
    }
}
