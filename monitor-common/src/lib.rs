//! The vocabulary the eBPF programs and the agent share: map keys and values laid out
//! byte for byte alike (`#[repr(C)]`, padding explicit, sizes asserted), the stable
//! numbers both sides index by, each with the label it is exported as, and the names of
//! the load-time globals.
#![no_std]

mod addr;
mod dns;
mod drops;
mod flows;
pub mod globals;
pub mod hash;
mod linklocal;
pub mod proto;

pub use addr::*;
pub use dns::*;
pub use drops::*;
pub use flows::*;
pub use linklocal::*;

/// `BPF_F_NO_PREALLOC`: a hash map that allocates an entry when it is first written, so
/// its memory follows what is used, not its maximum.
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// Maximum number of monitored devices; `MONITORED` maps an ifindex to a slot below it.
pub const MAX_DEVICES: u32 = 64;

/// Interface index used for drops that do not belong to a monitored device in the
/// agent's own network namespace.
pub const DEVICE_OTHER: u32 = 0;

/// Declares a `#[repr(u32)]` enum of stable numbers (indexes into kernel maps), each
/// with the label value it is exported as, and `ALL` in numeric order.
macro_rules! labelled {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $n:literal => $label:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $n),+
        }

        impl $name {
            /// Every value, in numeric order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];
            /// How many values there are: the stride of a per-device array indexed by them.
            #[allow(clippy::cast_possible_truncation, reason = "a handful of values")]
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// The label value this number is exported as.
            pub const fn label(self) -> &'static str {
                match self {
                    $(Self::$variant => $label),+
                }
            }

            /// The value numbered `n`.
            pub const fn from_u32(n: u32) -> Option<Self> {
                match n {
                    $($n => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }
    };
}
pub(crate) use labelled;

labelled! {
    /// Kernel maps whose refused inserts are counted in `MAP_FULL`, by index; the `map`
    /// label of `map_full_total`.
    MapFull {
        DnsInflight = 0 => "dns_inflight",
        DnsCounts = 1 => "dns_counts",
        DnsLatency = 2 => "dns_latency",
        Drops = 3 => "drops",
        /// A set of a CPU's link-local senders was full: its least sender gave way.
        LinkLocalSenders = 4 => "linklocal_senders",
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers with every padding byte an explicit field.
    unsafe impl aya::Pod for super::DropKey {}
    // SAFETY: `DnsCountKey` is `#[repr(C)]` integers and arrays of them, its padding explicit fields.
    unsafe impl aya::Pod for super::DnsCountKey {}
    // SAFETY: `DnsSlotKey` is `#[repr(C)]` integers and arrays of them, its padding explicit fields.
    unsafe impl aya::Pod for super::DnsSlotKey {}
    // SAFETY: `AddrInfo` is `#[repr(C)]` integers and arrays of them, its padding explicit fields.
    unsafe impl aya::Pod for super::AddrInfo {}
    // SAFETY: `DnsLatency` is `#[repr(C)]` integers and arrays of them, its padding explicit fields.
    unsafe impl aya::Pod for super::DnsLatency {}
    // SAFETY: `DnsFlightKey` is `#[repr(C)]` integers and arrays of them, its padding explicit fields.
    unsafe impl aya::Pod for super::DnsFlightKey {}
    // SAFETY: `DnsFlight` is `#[repr(C)]` integers and arrays of them, its padding explicit fields.
    unsafe impl aya::Pod for super::DnsFlight {}
    // SAFETY: `DnsPendingSet` is `#[repr(C)]` integers and arrays of them, its padding explicit fields.
    unsafe impl aya::Pod for super::DnsPendingSet {}
    // SAFETY: `LinkLocalSecond` is `#[repr(C)]` integers and arrays of them, its padding explicit fields.
    unsafe impl aya::Pod for super::LinkLocalSecond {}
    // SAFETY: `repr(C)` plain integers with explicit padding.
    unsafe impl aya::Pod for super::LinkLocalSenders {}
    // SAFETY: `FlowKey` is `#[repr(C)]` integers and arrays of them, its padding explicit fields.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: `Flow` is `#[repr(C)]` integers and arrays of them, its padding explicit fields.
    unsafe impl aya::Pod for super::Flow {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_numbers_are_stable_and_dense() {
        for (i, m) in MapFull::ALL.iter().enumerate() {
            assert_eq!(*m as u32, u32::try_from(i).unwrap());
            assert_eq!(MapFull::from_u32(*m as u32), Some(*m));
        }
        assert_eq!(MapFull::from_u32(MapFull::COUNT), None);
        assert_eq!(MapFull::Drops.label(), "drops");
        assert_eq!(LinkLocalService::Imds as u32, 1);
        assert_eq!(FlowClass::from_proto(58), FlowClass::Icmp);
        assert_eq!(FlowClass::Other.label(), "other");
        assert_eq!(UdpQueuePort::Dns.label(), "dns");
        assert_eq!(DnsCountKind::from_u8(2), Some(DnsCountKind::Superseded));
        assert_eq!(DnsCountKind::from_u8(4), Some(DnsCountKind::Unanswered));
        assert_eq!(DnsCountKind::from_u8(5), Some(DnsCountKind::ConnectFailure));
        assert_eq!(DnsCountKind::from_u8(6), None);
    }
}
