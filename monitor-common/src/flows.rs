//! The flow table: the EC2 tracking model's one row per flow.

use crate::{
    Addr, labelled,
    proto::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
};

/// Key of `FLOWS`: a direction-agnostic 5-tuple on one device. The (address, port) pair
/// that sorts first is side `a`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub addr_a: Addr,
    pub addr_b: Addr,
    pub port_a: u16,
    pub port_b: u16,
    pub ifindex: u32,
    /// IP protocol number.
    pub proto: u8,
    pub pad: [u8; 3],
}
/// The classifiers build and hash a key as its 11 words.
pub const FLOW_KEY_WORDS: usize = 11;
const _: () = assert!(size_of::<FlowKey>() == FLOW_KEY_WORDS * 4);

/// Value of `FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// `CLOCK_MONOTONIC` seconds.
    pub first_seen: u32,
    pub last_seen: u32,
    /// `FLOW_*` bits.
    pub flags: u8,
    pub pad: [u8; 3],
}
const _: () = assert!(size_of::<Flow>() == 12);

/// A packet went from side a to side b.
pub const FLOW_AB: u8 = 1;
/// A packet went from side b to side a.
pub const FLOW_BA: u8 = 2;
pub const FLOW_FIN_AB: u8 = 4;
pub const FLOW_FIN_BA: u8 = 8;
pub const FLOW_RST: u8 = 16;
/// Side a (or b) is local: the node or one of its pods, the sender of an egress packet.
pub const FLOW_LOCAL_A: u8 = 32;
pub const FLOW_LOCAL_B: u8 = 64;

/// Sets of each CPU's cache of recently refreshed flows in front of `FLOWS`: four ways of
/// 8 bytes each (half a cache line), 48 KiB per CPU.
pub const FLOW_CACHE_SETS: u32 = 1536;
/// Ways of each `FLOW_CACHE_SETS` set.
pub const FLOW_CACHE_WAYS: usize = 4;

labelled! {
    /// Protocol classes of the flow metrics: the index into a device's `FLOWS_CREATED`,
    /// and the `protocol` label.
    FlowClass {
        Tcp = 0 => "tcp",
        Udp = 1 => "udp",
        /// ICMP and `ICMPv6`.
        Icmp = 2 => "icmp",
        Other = 3 => "other",
    }
}

impl FlowClass {
    /// The class of an IP protocol number.
    #[inline]
    pub const fn from_proto(proto: u8) -> Self {
        match proto {
            IPPROTO_TCP => Self::Tcp,
            IPPROTO_UDP => Self::Udp,
            IPPROTO_ICMP | IPPROTO_ICMPV6 => Self::Icmp,
            _ => Self::Other,
        }
    }
}
