//! Packets to EC2's link-local services.

use crate::labelled;

labelled! {
    /// Link-local services: the values of the `LINKLOCAL` address map, the index into a
    /// device's `LL_PACKETS`, and the `service` label.
    LinkLocalService {
        /// The Amazon-provided DNS resolver (169.254.169.253, `fd00:ec2::253`, VPC+2).
        Dns = 0 => "dns",
        Imds = 1 => "imds",
        Ntp = 2 => "ntp",
    }
}

/// Seconds of per-second link-local counts kept per device.
pub const LL_WINDOW: u32 = 60;

/// One second of link-local packets on one device (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkLocalSecond {
    /// `CLOCK_MONOTONIC` second this slot counts.
    pub second: u32,
    pub packets: u32,
}
const _: () = assert!(size_of::<LinkLocalSecond>() == 8);

/// Senders a CPU keeps per second of link-local packets, over all devices: sets of
/// `LL_SENDER_WAYS`, a sender's set chosen by a hash of it.
pub const LL_SENDERS: usize = LL_SENDER_SETS as usize * LL_SENDER_WAYS;
pub const LL_SENDER_SETS: u32 = 8;
const _: () = assert!(LL_SENDER_SETS.is_power_of_two());
pub const LL_SENDER_WAYS: usize = 4;
/// Seconds of senders each CPU keeps (a ring): the agent reads each second within this
/// many seconds of its end.
pub const LL_SENDER_SECONDS: u32 = 4;

/// A local address sending to a link-local service through a device, in one second on
/// one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkLocalSender {
    pub addr: crate::Addr,
    pub packets: u32,
    /// The device's slot.
    pub slot: u8,
    /// A `LinkLocalService`.
    pub service: u8,
    pub pad: [u8; 2],
}
const _: () = assert!(size_of::<LinkLocalSender>() == 24);

/// One second's senders on one CPU: the entries whose bit is set in `used` are valid.
/// Past `LL_SENDER_WAYS` senders in a set in a second, the least of the set gives its
/// place to the newcomer, which inherits its count plus one (the space-saving sketch):
/// a sender with more than 1/`LL_SENDER_WAYS` of its set's packets that second is
/// always kept, its count overstated by at most what the evicted had. Each eviction is
/// counted (`MapFull::LinkLocalSenders`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LinkLocalSenders {
    /// `CLOCK_MONOTONIC` second these count.
    pub second: u32,
    /// A bit per entry of `senders`, set when the entry is in use.
    pub used: u32,
    pub senders: [LinkLocalSender; LL_SENDERS],
}
const _: () = assert!(size_of::<LinkLocalSenders>() == 8 + 24 * LL_SENDERS);
const _: () = assert!(LL_SENDERS <= 32, "a bit of `used` per entry");
