//! Types shared by the eBPF programs and the agent. Every map key and value is
//! `#[repr(C)]` with explicit padding so both sides agree byte for byte.
#![no_std]

/// Interface index used for drops that do not belong to a monitored device in the
/// agent's own network namespace.
pub const DEVICE_OTHER: u32 = 0;

/// Reason recorded when the running kernel's tracepoint carries no drop reason.
pub const REASON_UNKNOWN: u32 = u32::MAX;

/// Key of the `DROPS` per-CPU hash map, filled by the `skb:kfree_skb` tracepoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DropKey {
    /// Interface index of a monitored device, or [`DEVICE_OTHER`].
    pub ifindex: u32,
    /// The kernel's `enum skb_drop_reason` value, or [`REASON_UNKNOWN`].
    pub reason: u32,
    /// 1 when the packet was DNS (UDP or TCP, port 53 on either side), else 0.
    pub dns: u32,
    pub pad: u32,
}

/// Maximum number of distinct (device, reason, dns) keys kept by the kernel side.
pub const DROPS_MAX_ENTRIES: u32 = 4096;
/// Maximum number of monitored devices.
pub const MONITORED_MAX_ENTRIES: u32 = 256;

/// Kernel layout facts handed to the programs as load-time globals. Names of the
/// globals in the eBPF object; the agent fills them from BTF and tracefs.
pub mod globals {
    pub const SKB_HEAD: &str = "SKB_HEAD_OFF";
    pub const SKB_NETWORK_HEADER: &str = "SKB_NETWORK_HEADER_OFF";
    pub const SKB_TRANSPORT_HEADER: &str = "SKB_TRANSPORT_HEADER_OFF";
    pub const SKB_DEV: &str = "SKB_DEV_OFF";
    pub const DEV_IFINDEX: &str = "DEV_IFINDEX_OFF";
    pub const DEV_NET: &str = "DEV_NET_OFF";
    pub const NET_INUM: &str = "NET_INUM_OFF";
    pub const OWN_NETNS_INUM: &str = "OWN_NETNS_INUM";
    pub const TP_KFREE_SKBADDR: &str = "TP_KFREE_SKBADDR_OFF";
    pub const TP_KFREE_PROTOCOL: &str = "TP_KFREE_PROTOCOL_OFF";
    /// Offset of `reason`, or `u32::MAX` when the tracepoint has no such field.
    pub const TP_KFREE_REASON: &str = "TP_KFREE_REASON_OFF";
    /// Reasons at or below this value (`NOT_SPECIFIED` and the non-drops before it)
    /// are not counted.
    pub const REASON_NOT_SPECIFIED: &str = "REASON_NOT_SPECIFIED";
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers with no padding bytes left implicit.
    unsafe impl aya::Pod for super::DropKey {}
}
