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
