//! DNS: queries in flight, counts by server, latency.

use crate::{Addr, hash::XXH32_PRIME_1};

/// Resolver slots: the agent names a bounded number of resolver addresses, each in a
/// slot of its own, and the programs count by slot, never by an address a packet chose.
/// Slot 0 is `other`: every server without a slot.
pub const RESOLVER_OTHER: u8 = 0;
/// Slots, `other` included: Amazon's resolvers and up to `MAX_NAMED_RESOLVERS` others.
pub const RESOLVER_SLOTS: u32 = 32;
/// Resolvers other than Amazon's named at once.
pub const MAX_NAMED_RESOLVERS: usize = 16;

/// What a DNS count counts.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DnsCountKind {
    Query = 0,
    /// A matched response, by its rcode.
    Response = 1,
    /// A query in flight replaced by a copy of itself (same client, port, server and id)
    /// before any response came: the copy waits in its place, the first is unanswered.
    /// So every query packet ends answered or unanswered, retransmissions included.
    Superseded = 2,
    /// A query whose end could not be seen, so that it is neither answered nor
    /// unanswered: the in-flight table had no room it could take (the query refused, or
    /// ended to make room for another), its client already held its share of the table,
    /// or it waited while no agent watched (left by an agent that stopped).
    Untracked = 3,
    /// A query with no response within `--dns-timeout` (counted by the agent's sweep).
    Unanswered = 4,
    /// A TCP connection to port 53 refused (RST to its SYN), or whose SYN had no answer
    /// within `--dns-timeout` (counted by the agent's sweep).
    ConnectFailure = 5,
}

impl DnsCountKind {
    pub const fn from_u8(n: u8) -> Option<Self> {
        match n {
            0 => Some(Self::Query),
            1 => Some(Self::Response),
            2 => Some(Self::Superseded),
            3 => Some(Self::Untracked),
            4 => Some(Self::Unanswered),
            5 => Some(Self::ConnectFailure),
            _ => None,
        }
    }
}

/// How a DNS message travelled: the `transport` of a count or a latency key.
pub const DNS_UDP: u8 = 0;
pub const DNS_TCP: u8 = 1;
pub const DNS_TRANSPORTS: u32 = 2;

/// What waits in the in-flight table, the last word of its key: a query over UDP
/// ([`DNS_UDP`]) or TCP ([`DNS_TCP`]), or a TCP connection to port 53 waiting for the
/// server's answer to its SYN.
pub const FLIGHT_CONNECT: u32 = 2;

/// Key of the DNS counts (`DNS_COUNTS`, the programs'; `DNS_AGENT_COUNTS`, the agent's):
/// by (device, resolver slot, kind, transport), responses by rcode too.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsCountKey {
    pub ifindex: u32,
    /// A resolver slot; [`RESOLVER_OTHER`] for a server without one.
    pub resolver: u8,
    /// A [`DnsCountKind`].
    pub kind: u8,
    pub rcode: u8,
    /// [`DNS_UDP`] or [`DNS_TCP`] (connect failures: TCP).
    pub transport: u8,
}
const _: () = assert!(size_of::<DnsCountKey>() == 8);

/// The counts' resolver for queries of resolvers that gave their slot up (`retired`),
/// written by the agent only: outside the slots, so that a departed resolver's lifetime
/// counts never move into `other`, whose rate the alerts read.
pub const RESOLVER_RETIRED: u8 = 0xff;

/// Rcodes a response's header can carry (4 bits).
pub const DNS_RCODES: u32 = 16;
/// Keys the DNS counts can hold: every device, slot, transport, kind and rcode. The maps
/// are sized for all of them, so none is ever full; their memory follows the keys in use.
pub const DNS_COUNTS_MAX_ENTRIES: u32 =
    crate::MAX_DEVICES * RESOLVER_SLOTS * ((DNS_RCODES + 5) * DNS_TRANSPORTS + 1);

/// Key of the DNS latency histograms: (device, resolver slot, transport).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsSlotKey {
    pub ifindex: u32,
    pub resolver: u8,
    /// [`DNS_UDP`] or [`DNS_TCP`].
    pub transport: u8,
    pub pad: u16,
}
const _: () = assert!(size_of::<DnsSlotKey>() == 8);
pub const DNS_LATENCY_MAX_ENTRIES: u32 = crate::MAX_DEVICES * RESOLVER_SLOTS * DNS_TRANSPORTS;

/// Servers without a slot that queries went to recently (`DNS_SEEN`, least recently used
/// first out): what the agent picks the next named resolvers from. Bounded whatever pods
/// send.
pub const DNS_SEEN_MAX_ENTRIES: u32 = 512;

/// What the programs know of an address (`ADDRS`): the link-local service it is, and
/// the resolver slot the agent gave it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrInfo {
    /// A [`crate::LinkLocalService`], or [`SERVICE_NONE`].
    pub service: u8,
    /// A resolver slot, or [`RESOLVER_OTHER`].
    pub resolver: u8,
    pub pad: [u8; 2],
}
const _: () = assert!(size_of::<AddrInfo>() == 4);
/// Not a link-local service.
pub const SERVICE_NONE: u8 = 0xff;
/// Link-local service addresses and VPC+2 resolvers, and the named resolvers.
pub const ADDRS_MAX_ENTRIES: u32 = 64 + RESOLVER_SLOTS;

/// Upper bounds of the latency buckets, 100 µs to 5 s; one more bucket counts the rest.
pub const DNS_LATENCY_BOUNDS_NS: [u64; 15] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
];
pub const DNS_LATENCY_BUCKETS: usize = DNS_LATENCY_BOUNDS_NS.len() + 1;

/// Value of `DNS_LATENCY`: per-bucket (not cumulative) counts and the sum.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsLatency {
    pub buckets: [u64; DNS_LATENCY_BUCKETS],
    pub sum_ns: u64,
}
const _: () = assert!(size_of::<DnsLatency>() == (DNS_LATENCY_BUCKETS + 1) * 8);

/// Key of `DNS_INFLIGHT`, and of each way of `DNS_PENDING`: one query awaiting its
/// response, or one TCP connection to port 53 awaiting the answer to its SYN (`id` 0).
/// Over TCP the client's address and port and the server name the connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsFlightKey {
    pub client: Addr,
    pub server: Addr,
    pub client_port: u16,
    pub id: u16,
    /// [`DNS_UDP`] or [`DNS_TCP`] for a query, [`FLIGHT_CONNECT`] for a connection.
    pub what: u32,
}
/// The classifiers build and compare a key as its 10 words.
pub const DNS_FLIGHT_KEY_WORDS: usize = 10;
const _: () = assert!(size_of::<DnsFlightKey>() == DNS_FLIGHT_KEY_WORDS * 4);

/// Value of `DNS_INFLIGHT`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsFlight {
    /// `CLOCK_MONOTONIC` nanoseconds of the first copy of the query.
    pub start_ns: u64,
    pub ifindex: u32,
    /// The resolver slot the query was counted under; its response and its end as
    /// unanswered count there too.
    pub resolver: u8,
    /// 1 when the query left through the device (the client is local).
    pub egress: u8,
    pub pad: u16,
}
const _: () = assert!(size_of::<DnsFlight>() == 16);

/// Queries in flight at once in `DNS_INFLIGHT` (kernels before 5.12): answered ones leave
/// within milliseconds; at the default 2 s timeout this holds 8,000 unanswered queries a
/// second before a full map counts.
pub const DNS_INFLIGHT_MAX_ENTRIES: u32 = 16_384;

/// Ways of each `DNS_PENDING` set (one array element).
pub const DNS_PENDING_WAYS: usize = 4;

/// One set of `DNS_PENDING`, the table of queries in flight on kernels with BPF atomics
/// (5.12+): `DNS_PENDING_WAYS` ways, each claimed and released with compare-and-exchange
/// on its state by the query, its response and the agent's timeout sweep, so each query
/// ends answered or unanswered, never both. The states and start times share the first
/// cache line: a query or a response touches two or three lines, not one per way.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsPendingSet {
    /// `PENDING_*`; whole words, the width BPF's compare-and-exchange takes everywhere.
    pub state: [u64; DNS_PENDING_WAYS],
    /// `CLOCK_MONOTONIC` nanoseconds of the first copy of each query.
    pub start_ns: [u64; DNS_PENDING_WAYS],
    pub ifindex: [u32; DNS_PENDING_WAYS],
    pub key: [DnsFlightKey; DNS_PENDING_WAYS],
    /// The resolver slot each query was counted under.
    pub resolver: [u8; DNS_PENDING_WAYS],
    /// 1 for a query that left through the device (the client is local).
    pub egress: [u8; DNS_PENDING_WAYS],
    /// To 256 bytes, so that each set begins a cache line.
    pub pad: [u32; 2],
}
const _: () = assert!(size_of::<DnsPendingSet>() == 256);

impl DnsPendingSet {
    /// Way `i`'s element of the per-way field at byte `field` of the set at `set`
    /// (`offset_of!(DnsPendingSet, state)` ...), an element being a `T`. Only the address
    /// is computed, so it is safe; both sides reach a way field by field (other CPUs may
    /// be writing the others), never through a reference to the set.
    #[inline]
    pub fn way_field<T>(set: *mut Self, field: usize, i: usize) -> *mut T {
        set.cast::<u8>()
            .wrapping_add(field)
            .cast::<T>()
            .wrapping_add(i)
    }
}

/// A way no query holds.
pub const PENDING_FREE: u64 = 0;
/// One CPU (or the agent's sweep) holds the way, writing a query into it or reading one
/// out; only the holder moves it on.
pub const PENDING_WRITING: u64 = 1;
/// A query awaits its response.
pub const PENDING_WAITING: u64 = 2;

/// Sets of `DNS_PENDING`: 8,192 queries in flight in 512 KiB, which a CPU's L2 cache
/// holds (at 4,096 sets a query cost 40-80 ns more under dnsperf). Answered queries leave
/// within milliseconds; at the default 2 s timeout this holds 4,000 unanswered queries a
/// second before a full set counts.
pub const DNS_PENDING_SETS: u32 = 2048;

/// Buckets of `DNS_CLIENTS`: queries in flight per client, a client being its address
/// hashed to a bucket (a power of two).
pub const DNS_CLIENT_BUCKETS: u32 = 4096;

/// One client may hold at most this share of the in-flight table (1 / this): a client
/// that floods a server that never answers cannot push out the queries of the others.
pub const DNS_CLIENT_SHARE: u32 = 4;

/// The bucket of `DNS_CLIENTS` a client's queries count in: its address's words hashed
/// with the table's key (the agent's sweep recounts the buckets with the same function).
#[inline]
pub fn dns_client_bucket(client: [u32; 4], key: u32) -> u32 {
    let mut h = key;
    for w in client {
        // Multiplied after each word, so that which word a bit is in matters (an IPv4
        // address fills the last word of its IPv4-mapped form).
        h = (h ^ w).wrapping_mul(XXH32_PRIME_1);
    }
    h >> (32 - DNS_CLIENT_BUCKETS.trailing_zeros())
}

#[cfg(test)]
mod client_tests {
    use super::*;

    #[test]
    fn client_buckets_spread_and_stay_in_range() {
        let mut seen = [0u32; DNS_CLIENT_BUCKETS as usize];
        for i in 0..4096u32 {
            let b = dns_client_bucket([0, 0, crate::V4_MAPPED_WORD, (0x0a00_0000 + i).to_be()], 7);
            seen[b as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n <= 8), "{:?}", seen.iter().max());
        assert!(seen.iter().filter(|n| **n > 0).count() > 2000);
        let a = [0, 0, crate::V4_MAPPED_WORD, 0x0102_000a];
        assert_ne!(dns_client_bucket(a, 1), dns_client_bucket(a, 2));
    }
}
