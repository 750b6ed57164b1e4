//! DNS over UDP: queries, responses matched to their query by (client, client port,
//! server, id), latency, and the queries still in flight for the agent to time out.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuHashMap},
    programs::TcContext,
};
use monitor_common::{
    Addr, BPF_F_NO_PREALLOC, DNS_COUNTS_MAX_ENTRIES, DNS_INFLIGHT_MAX_ENTRIES,
    DNS_LATENCY_BOUNDS_NS, DNS_LATENCY_BUCKETS, DNS_QUERY, DNS_RESPONSE, DnsCountKey, DnsFlight,
    DnsFlightKey, DnsLatency, DnsServerKey, MAP_FULL_DNS_COUNTS, MAP_FULL_DNS_INFLIGHT,
    MAP_FULL_DNS_LATENCY,
};

use super::packet::{Packet, read};
use crate::{
    kernel::now_ns,
    maps::{increment, map_full},
};

pub const PORT: u16 = 53;
const UDP_HLEN: usize = 8;
const BPF_NOEXIST: u64 = 1;

#[map]
static DNS_COUNTS: PerCpuHashMap<DnsCountKey, u64> =
    PerCpuHashMap::with_max_entries(DNS_COUNTS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
static DNS_LATENCY: PerCpuHashMap<DnsServerKey, DnsLatency> =
    PerCpuHashMap::with_max_entries(DNS_COUNTS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Queries awaiting a response. The agent deletes those older than `--dns-timeout`
/// and counts them unanswered; whoever deletes an entry first counts it, so a query is
/// either answered or unanswered, never both. Preallocated (1.8 MiB): a query inserts
/// on one CPU and its response deletes on another, which through the run-time
/// allocator's per-CPU caches cost twice as much (measured under dnsperf).
#[map]
static DNS_INFLIGHT: HashMap<DnsFlightKey, DnsFlight> =
    HashMap::with_max_entries(DNS_INFLIGHT_MAX_ENTRIES, 0);

/// Unanswered queries by (device, server): written by the agent's timeout sweep only,
/// here so that the count is pinned with the rest and survives the agent.
#[map]
static DNS_UNANSWERED: HashMap<DnsServerKey, u64> =
    HashMap::with_max_entries(DNS_COUNTS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Resolvers the agent names by address in the `resolver` label: written by the agent
/// only, here so that the names are pinned with the counts they label.
#[map]
static DNS_RESOLVERS: HashMap<Addr, u32> = HashMap::with_max_entries(64, BPF_F_NO_PREALLOC);

/// `-EEXIST`: a retransmitted query, already in flight.
const EEXIST: i32 = -17;

#[inline(always)]
pub fn handle(ctx: &TcContext, p: &Packet, ifindex: u32) {
    // In place where the linear data holds it, else copied out (a helper call).
    let off = p.l4 + UDP_HLEN;
    let Some(hdr) = read::<[u8; 12]>(ctx, off).or_else(|| ctx.load::<[u8; 12]>(off).ok()) else {
        return;
    };
    let id = u16::from_be_bytes([hdr[0], hdr[1]]);
    let flags = u16::from_be_bytes([hdr[2], hdr[3]]);
    let qdcount = u16::from_be_bytes([hdr[4], hdr[5]]);
    let is_response = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0x0f;
    // Standard queries with a question only: anything else is not what we match.
    if opcode != 0 || qdcount == 0 {
        return;
    }
    if !is_response {
        if p.dport != PORT {
            return;
        }
        increment(
            &DNS_COUNTS,
            &DnsCountKey {
                ifindex,
                kind: DNS_QUERY,
                rcode: 0,
                pad: [0; 2],
                server: p.dst,
            },
            MAP_FULL_DNS_COUNTS,
        );
        let key = DnsFlightKey {
            client: p.src,
            server: p.dst,
            client_port: p.sport,
            id,
            pad: 0,
        };
        // A retransmission keeps the first copy's time: one query in flight, not two.
        if let Err(e) = DNS_INFLIGHT.insert(
            &key,
            &DnsFlight {
                start_ns: now_ns(),
                ifindex,
                pad: 0,
            },
            BPF_NOEXIST,
        ) && e != EEXIST
        {
            map_full(MAP_FULL_DNS_INFLIGHT);
        }
    } else {
        if p.sport != PORT {
            return;
        }
        let key = DnsFlightKey {
            client: p.dst,
            server: p.src,
            client_port: p.dport,
            id,
            pad: 0,
        };
        let Some(flight) = (unsafe { DNS_INFLIGHT.get(&key) }) else {
            return;
        };
        let start = flight.start_ns;
        // Only the deleter counts: a duplicate response or the agent's timeout sweep
        // racing with this one loses.
        if DNS_INFLIGHT.remove(&key).is_err() {
            return;
        }
        let rcode = (flags & 0x0f) as u8;
        increment(
            &DNS_COUNTS,
            &DnsCountKey {
                ifindex,
                kind: DNS_RESPONSE,
                rcode,
                pad: [0; 2],
                server: p.src,
            },
            MAP_FULL_DNS_COUNTS,
        );
        observe(
            DnsServerKey {
                ifindex,
                server: p.src,
            },
            now_ns().saturating_sub(start),
        );
    }
}

static ZERO_LATENCY: DnsLatency = DnsLatency {
    buckets: [0; DNS_LATENCY_BUCKETS],
    sum_ns: 0,
};

#[inline(always)]
fn observe(key: DnsServerKey, latency_ns: u64) {
    let mut bucket = DNS_LATENCY_BUCKETS - 1;
    for (i, bound) in DNS_LATENCY_BOUNDS_NS.iter().enumerate() {
        if latency_ns <= *bound {
            bucket = i;
            break;
        }
    }
    let mut h = DNS_LATENCY.get_ptr_mut(&key);
    if h.is_none() {
        // From a zeroed global rather than the stack: the value is larger than the
        // classifier's stack can spare.
        if DNS_LATENCY
            .insert(&key, &ZERO_LATENCY, BPF_NOEXIST)
            .is_err()
        {
            map_full(MAP_FULL_DNS_LATENCY);
        }
        h = DNS_LATENCY.get_ptr_mut(&key);
    }
    let Some(h) = h else { return };
    unsafe {
        if let Some(b) = (*h).buckets.get_mut(bucket) {
            *b += 1;
        }
        (*h).sum_ns += latency_ns;
    }
}
