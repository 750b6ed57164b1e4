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

/// Maximum number of distinct (device, reason, dns) keys kept by the kernel side. The
/// map is preallocated (a tracing program's maps must be on 5.10): kept small.
pub const DROPS_MAX_ENTRIES: u32 = 1024;

/// `BPF_F_NO_PREALLOC`: a hash map that allocates an entry when it is first written, so
/// its memory follows what is used, not its maximum.
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// Maps whose refused inserts are counted in `MAP_FULL`, by index; the label names them.
pub const MAP_FULL_DNS_INFLIGHT: u32 = 0;
pub const MAP_FULL_DNS_COUNTS: u32 = 1;
pub const MAP_FULL_DNS_LATENCY: u32 = 2;
pub const MAP_FULL_DROPS: u32 = 3;
pub const MAP_FULL_MAPS: [&str; 4] = ["dns_inflight", "dns_counts", "dns_latency", "drops"];
/// Maximum number of monitored devices; `MONITORED` maps an ifindex to a slot below it.
pub const MAX_DEVICES: u32 = 64;

/// An address as 16 bytes in network order, IPv6 as is, IPv4 mapped (`::ffff:a.b.c.d`),
/// held as four words so the classifiers copy and compare it a word at a time.
pub type Addr = [u32; 4];

/// The address of `octets` (network order).
pub const fn addr_from_octets(o: [u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The octets (network order) of `a`.
pub const fn addr_octets(a: &Addr) -> [u8; 16] {
    let (w0, w1, w2, w3) = (
        a[0].to_ne_bytes(),
        a[1].to_ne_bytes(),
        a[2].to_ne_bytes(),
        a[3].to_ne_bytes(),
    );
    [
        w0[0], w0[1], w0[2], w0[3], w1[0], w1[1], w1[2], w1[3], w2[0], w2[1], w2[2], w2[3], w3[0],
        w3[1], w3[2], w3[3],
    ]
}

/// `DNS_COUNTS` kinds.
pub const DNS_QUERY: u8 = 0;
pub const DNS_RESPONSE: u8 = 1;
/// A query in flight replaced by a copy of itself (same client, port, server and id)
/// before any response came: the copy waits in its place, the first is unanswered. So
/// every query packet ends answered or unanswered, retransmissions included.
pub const DNS_SUPERSEDED: u8 = 2;

/// Key of `DNS_COUNTS`: queries by (device, server), responses by (device, server, rcode).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DnsCountKey {
    pub ifindex: u32,
    pub kind: u8,
    pub rcode: u8,
    pub pad: [u8; 2],
    pub server: Addr,
}

/// Key of `DNS_LATENCY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DnsServerKey {
    pub ifindex: u32,
    pub server: Addr,
}

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

/// Key of `DNS_INFLIGHT`: one query awaiting its response.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsFlightKey {
    pub client: Addr,
    pub server: Addr,
    pub client_port: u16,
    pub id: u16,
    pub pad: u32,
}

/// Value of `DNS_INFLIGHT`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsFlight {
    /// `CLOCK_MONOTONIC` nanoseconds of the first copy of the query.
    pub start_ns: u64,
    pub ifindex: u32,
    pub pad: u32,
}

/// Queries in flight at once in `DNS_INFLIGHT` (kernels before 5.12): answered ones leave
/// within milliseconds; at the default 2 s timeout this holds 8,000 unanswered queries a
/// second before a full map counts.
pub const DNS_INFLIGHT_MAX_ENTRIES: u32 = 16_384;

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
    /// To 256 bytes, so that each set begins a cache line.
    pub pad: [u64; 2],
}

/// A way no query holds.
pub const PENDING_FREE: u64 = 0;
/// One CPU (or the agent's sweep) holds the way, writing a query into it or reading one
/// out; only the holder moves it on.
pub const PENDING_WRITING: u64 = 1;
/// A query awaits its response.
pub const PENDING_WAITING: u64 = 2;

/// Ways of each `DNS_PENDING` set (one array element).
pub const DNS_PENDING_WAYS: usize = 4;
/// Sets of `DNS_PENDING`: 8,192 queries in flight in 512 KiB, which a CPU's L2 cache
/// holds (at 4,096 sets a query cost 40-80 ns more under dnsperf). Answered queries leave
/// within milliseconds; at the default 2 s timeout this holds 4,000 unanswered queries a
/// second before a full set counts.
pub const DNS_PENDING_SETS: u32 = 2048;
pub const DNS_COUNTS_MAX_ENTRIES: u32 = 4096;

/// Link-local services, the values of the `LINKLOCAL` address map.
pub const LL_DNS: u32 = 0;
pub const LL_IMDS: u32 = 1;
pub const LL_NTP: u32 = 2;
pub const LL_SERVICES: u32 = 3;
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

/// Sets of each CPU's cache of recently refreshed flows in front of `FLOWS`: four ways of
/// 8 bytes each (half a cache line), 48 KiB per CPU.
pub const FLOW_CACHE_SETS: u32 = 1536;
/// Ways of each `FLOW_CACHE_SETS` set.
pub const FLOW_CACHE_WAYS: usize = 4;

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

/// Protocol classes of the flow metrics, the index into `FLOWS_CREATED` per slot.
pub const FLOW_TCP: u32 = 0;
pub const FLOW_UDP: u32 = 1;
pub const FLOW_ICMP: u32 = 2;
pub const FLOW_OTHER: u32 = 3;
pub const FLOW_CLASSES: u32 = 4;

/// The protocol class of an IP protocol number.
#[inline]
pub fn flow_class(proto: u8) -> u32 {
    match proto {
        6 => FLOW_TCP,
        17 => FLOW_UDP,
        1 | 58 => FLOW_ICMP,
        _ => FLOW_OTHER,
    }
}

/// `UDP_QUEUE_DROPS` indexes.
pub const UDP_QUEUE_DNS: u32 = 0;
pub const UDP_QUEUE_OTHER: u32 = 1;

/// Kernel layout facts handed to the programs as load-time globals. Names of the
/// globals in the eBPF object; the agent fills them from BTF and probes at start.
pub mod globals {
    pub const SKB_HEAD: &str = "SKB_HEAD_OFF";
    pub const SKB_NETWORK_HEADER: &str = "SKB_NETWORK_HEADER_OFF";
    pub const SKB_TRANSPORT_HEADER: &str = "SKB_TRANSPORT_HEADER_OFF";
    pub const SKB_PROTOCOL: &str = "SKB_PROTOCOL_OFF";
    pub const SKB_DEV: &str = "SKB_DEV_OFF";
    pub const DEV_IFINDEX: &str = "DEV_IFINDEX_OFF";
    pub const DEV_NET: &str = "DEV_NET_OFF";
    pub const NET_INUM: &str = "NET_INUM_OFF";
    /// `sock.__sk_common.skc_num` (local port, host order) and `skc_dport` (remote port,
    /// network order).
    pub const SK_NUM: &str = "SK_NUM_OFF";
    pub const SK_DPORT: &str = "SK_DPORT_OFF";
    pub const OWN_NETNS_INUM: &str = "OWN_NETNS_INUM";
    /// 1 when the `kfree_skb` raw tracepoint's third argument is the drop reason (5.17+).
    pub const KFREE_SKB_HAS_REASON: &str = "KFREE_SKB_HAS_REASON";
    /// Reasons at or below this value (`NOT_SPECIFIED` and the non-drops before it)
    /// are not counted.
    pub const REASON_NOT_SPECIFIED: &str = "REASON_NOT_SPECIFIED";
    /// 1 when the kernel has `bpf_ktime_get_coarse_ns` (5.11+).
    pub const HAVE_COARSE_CLOCK: &str = "HAVE_COARSE_CLOCK";
    /// The key of the flow cache's hash (two words), random at each load.
    pub const FLOW_HASH_SEED_LO: &str = "FLOW_HASH_SEED_LO";
    pub const FLOW_HASH_SEED_HI: &str = "FLOW_HASH_SEED_HI";
    /// Sets in `DNS_PENDING` as loaded (`DNS_PENDING_SETS` unless sized otherwise).
    pub const PENDING_SETS: &str = "PENDING_SETS";
    /// 1 on CPUs that make stores visible in program order (`x86_64`): a query is then
    /// published with a plain store rather than an atomic exchange.
    pub const STORES_IN_ORDER: &str = "STORES_IN_ORDER";
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers with no padding bytes left implicit.
    unsafe impl aya::Pod for super::DropKey {}
    unsafe impl aya::Pod for super::DnsCountKey {}
    unsafe impl aya::Pod for super::DnsServerKey {}
    unsafe impl aya::Pod for super::DnsLatency {}
    unsafe impl aya::Pod for super::DnsFlightKey {}
    unsafe impl aya::Pod for super::DnsFlight {}
    unsafe impl aya::Pod for super::DnsPendingSet {}
    unsafe impl aya::Pod for super::LinkLocalSecond {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
}
