//! Protocol numbers both sides read packets by, each defined once.

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_HLEN: usize = 14;
/// The ethertype's offset in an Ethernet header; after an 802.1Q tag, the inner one's is
/// `VLAN_HLEN` further.
pub const ETH_TYPE_OFF: usize = 12;
pub const VLAN_HLEN: usize = 4;
/// An IPv4 header without options; the fixed IPv6 header.
pub const IPV4_HLEN: u32 = 20;
pub const IPV6_HLEN: usize = 40;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers.
pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_DSTOPTS: u8 = 60;

/// Offsets in a TCP header: the sequence number, the data offset (its top four bits,
/// in words), the flags.
pub const TCP_SEQ: usize = 4;
pub const TCP_DATA_OFFSET: usize = 12;
pub const TCP_FLAGS: usize = 13;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const UDP_HLEN: usize = 8;

/// DNS, over UDP and TCP.
pub const DNS_PORT: u16 = 53;
/// Bytes of a DNS message's header.
pub const DNS_HLEN: usize = 12;
