//! The flow table: one entry per direction-agnostic 5-tuple on each ENI, with first and
//! last seen second and the TCP close state, so the agent can model which connections
//! EC2 still tracks. An established flow costs a look into a per-CPU cache; the shared
//! table is read and written once a second per flow, or when its flags change.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use monitor_common::{
    BPF_F_NO_PREALLOC, FLOW_AB, FLOW_BA, FLOW_CACHE_SETS, FLOW_CACHE_WAYS, FLOW_FIN_AB,
    FLOW_FIN_BA, FLOW_KEY_WORDS, FLOW_LOCAL_A, FLOW_LOCAL_B, FLOW_RST, Flow, FlowClass, FlowKey,
    MAX_DEVICES,
    proto::{IPPROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

use super::packet::Packet;
use crate::{
    headers::has_ports,
    kernel::{layout, now_coarse_s},
    maps::{BPF_NOEXIST, EEXIST, bump, slot},
};

/// Sized by the agent (`--flow-table-size`) at load; entries are allocated as flows
/// appear, so its memory follows the flows tracked, not the table's maximum.
#[map]
static FLOWS: HashMap<FlowKey, Flow> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

/// New flows per (device slot, protocol class).
#[map]
static FLOWS_CREATED: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_DEVICES * FlowClass::COUNT, 0);

/// The flows each CPU refreshed recently, by a keyed hash of the flow: an established
/// flow's packet finds its flow here, written to the shared table this second with every
/// flag the packet carries, and goes no further. The hash's top bits pick a set of four
/// ways (up to four flows sharing a set all stay: with two, busy sets of three or more
/// flows took turns evicting each other); a way is one word,
/// `fingerprint << WAY_FP_SHIFT | second << WAY_SECOND_SHIFT | direction bits`, the
/// fingerprint the hash's low 44 bits. Two flows are taken for one only when 44 bits of a
/// keyed hash agree with one of the four ways of a set (4 in 2^44 a packet), and even then
/// only for the rest of that second, after which the packet goes to the table. Each CPU's sets are its own (no lock, no shared cache
/// line); packets that close a flow (FIN, RST) always go to the table.
#[map]
static FLOW_CACHE: PerCpuArray<[u64; FLOW_CACHE_WAYS]> =
    PerCpuArray::with_max_entries(FLOW_CACHE_SETS, 0);

/// A `FlowKey` as its words.
type KeyWords = [u32; FLOW_KEY_WORDS];

/// A cache way's layout: the direction bits (`cache_bits`) in the low bits, then the
/// second the flow was last written to the table (its low 16 bits), then the fingerprint.
const WAY_BITS_MASK: u64 = 0xf;
const WAY_SECOND_SHIFT: u32 = 4;
const WAY_SECOND_MASK: u32 = 0xffff;
const WAY_FP_SHIFT: u32 = 20;
/// The fingerprint: the hash's low 64 - `WAY_FP_SHIFT` bits.
const WAY_FP_MASK: u64 = (1 << (64 - WAY_FP_SHIFT)) - 1;

const K: u64 = 0x9e37_79b9_7f4a_7c15;
const K2: u64 = 0xc2b2_ae3d_27d4_eb4f;
const K3: u64 = 0x1656_67b1_9e37_79f9;

#[inline(always)]
fn pair(lo: u32, hi: u32) -> u64 {
    u64::from(lo) | (u64::from(hi) << 32)
}

#[inline(always)]
fn round(h: u64, v: u64) -> u64 {
    let h = (h ^ v).wrapping_mul(K);
    h ^ (h >> 29)
}

/// Joins two lanes into the hash.
#[inline(always)]
fn finish(x: u64, y: u64) -> u64 {
    let h = x.wrapping_add(y.wrapping_mul(K2));
    let h = (h ^ (h >> 32)).wrapping_mul(K);
    h ^ (h >> 29)
}

#[inline(always)]
fn seed() -> u64 {
    pair(layout::flow_cache_key_lo(), layout::flow_cache_key_hi())
}

/// A keyed 64-bit hash of a key, in two lanes of three rounds that the CPU runs side
/// by side (one chain of six multiplications waits on each in turn), joined at the end.
#[inline(always)]
fn hash(w: &KeyWords) -> u64 {
    let seed = seed();
    let (mut x, mut y) = (seed, seed ^ K2);
    x = round(x, pair(w[0], w[1]));
    y = round(y, pair(w[2], w[3]));
    x = round(x, pair(w[4], w[5]));
    y = round(y, pair(w[6], w[7]));
    x = round(x, pair(w[8], w[9]));
    y = round(y, u64::from(w[10]));
    finish(x, y)
}

/// `hash` of an IPv4 flow's key, whose addresses' first three words are the same for
/// every IPv4 flow: one round a lane over the words that differ, keyed apart from
/// `hash` so that the two kinds of key are no likelier to meet than any two keys.
#[inline(always)]
fn hash_v4(w: &KeyWords) -> u64 {
    let seed = seed();
    let x = round(seed ^ K3, pair(w[3], w[7]));
    let y = round(seed ^ K2 ^ K3, pair(w[8], w[9]));
    // The protocol by a multiplication of its own, beside the lanes: keys that differ in
    // it alone always differ in the hash.
    finish(x, y ^ u64::from(w[10]).wrapping_mul(K3))
}

/// The direction bits a cache way keeps, in its low 4 bits (`WAY_BITS_MASK`).
#[inline(always)]
fn cache_bits(bits: u8) -> u64 {
    u64::from(bits & (FLOW_AB | FLOW_BA)) | (u64::from(bits & (FLOW_LOCAL_A | FLOW_LOCAL_B)) >> 3)
}

/// Flows that found the table full and were not tracked.
#[map]
static FLOW_TABLE_FULL: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn track(p: &Packet, tcp_flags: u8, ifindex: u32, egress: bool) {
    // A later fragment has no ports; its first fragment already touched the flow.
    if p.l4 == 0 && has_ports(p.proto) {
        return;
    }
    // Any total order will do to pick side a; words as they lie in memory are cheapest.
    // IPv4 addresses differ only in their last word: the same order, with less to compare.
    let forward = if p.is_v6 {
        (p.src, p.sport) <= (p.dst, p.dport)
    } else {
        (p.src[3], p.sport) <= (p.dst[3], p.dport)
    };
    let (a, b, port_a, port_b) = if forward {
        (&p.src, &p.dst, p.sport, p.dport)
    } else {
        (&p.dst, &p.src, p.dport, p.sport)
    };
    // The key as the words `FlowKey` lays out, built and hashed a word at a time.
    let words: KeyWords = [
        a[0],
        a[1],
        a[2],
        a[3],
        b[0],
        b[1],
        b[2],
        b[3],
        u32::from(port_a) | (u32::from(port_b) << 16),
        ifindex,
        u32::from(p.proto),
    ];
    let mut bits = if forward { FLOW_AB } else { FLOW_BA };
    // The local side sends what leaves and receives what arrives: who owns the flow.
    bits |= if forward == egress {
        FLOW_LOCAL_A
    } else {
        FLOW_LOCAL_B
    };
    if p.proto == IPPROTO_TCP {
        if tcp_flags & TCP_RST != 0 {
            bits |= FLOW_RST;
        }
        if tcp_flags & TCP_FIN != 0 {
            bits |= if forward { FLOW_FIN_AB } else { FLOW_FIN_BA };
        }
    }
    let now = now_coarse_s();
    // A SYN without ACK opens a connection: on a 5-tuple that was closed (a port reused,
    // SNAT) it is a new connection EC2 tracks as established again.
    let opening = p.proto == IPPROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // Packets that change a flow's state always go to the table.
    let closing = bits & CLOSED != 0 || opening;
    let h = if p.is_v6 {
        hash(&words)
    } else {
        hash_v4(&words)
    };
    // The set from the hash's top 32 bits, by multiply and shift (any number of sets).
    let set = FLOW_CACHE.get_ptr_mut((((h >> 32) * u64::from(FLOW_CACHE_SETS)) >> 32) as u32);
    let tag = ((h & WAY_FP_MASK) << WAY_FP_SHIFT)
        | (u64::from(now & WAY_SECOND_MASK) << WAY_SECOND_SHIFT);
    let want = cache_bits(bits);
    if let Some(set) = set
        && !closing
    {
        // SAFETY: this CPU's own set; classifiers on one CPU do not interleave.
        let ways = unsafe { *set };
        if ways
            .iter()
            .any(|&w| w & !WAY_BITS_MASK == tag && w & want == want)
        {
            return;
        }
    }
    // SAFETY: `FlowKey` is `repr(C)`, 11 words without padding between fields.
    let key: FlowKey = unsafe { core::mem::transmute(words) };
    let flags = if let Some(flow) = FLOWS.get_ptr_mut(&key) {
        refresh(flow, bits, now, opening, p, ifindex)
    } else {
        if !insert(p, &key, bits, now, ifindex) {
            return;
        }
        bits
    };
    if let Some(set) = set {
        let way = tag | cache_bits(flags);
        // SAFETY: as above.
        let ways = unsafe { &mut *set };
        // The flow's own way when it has one (from an earlier second), else the newest
        // in front and the oldest dropped.
        let fp = way >> WAY_FP_SHIFT;
        if let Some(own) = ways.iter_mut().find(|w| **w >> WAY_FP_SHIFT == fp) {
            *own = way;
        } else {
            for j in (1..FLOW_CACHE_WAYS).rev() {
                ways[j] = ways[j - 1];
            }
            ways[0] = way;
        }
    }
}

/// The state bits of a closed TCP connection.
const CLOSED: u8 = FLOW_FIN_AB | FLOW_FIN_BA | FLOW_RST;

/// Writes a packet into its flow in the table: the second, and its bits or-ed in; or, a
/// SYN on a closed flow, the flow begun again. The flow's bits after it.
#[inline(always)]
fn refresh(flow: *mut Flow, bits: u8, now: u32, opening: bool, p: &Packet, ifindex: u32) -> u8 {
    // SAFETY: a value of the shared table; other CPUs may write the same flow, and the
    // writes are idempotent (a second, bits or-ed in).
    unsafe {
        if opening && (*flow).flags & CLOSED != 0 {
            (*flow).first_seen = now;
            (*flow).last_seen = now;
            (*flow).flags = bits;
            created(p, ifindex);
            return bits;
        }
        if (*flow).last_seen != now {
            (*flow).last_seen = now;
        }
        if (*flow).flags & bits != bits {
            (*flow).flags |= bits;
        }
        (*flow).flags | bits
    }
}

/// Counts a new flow on the device.
#[inline(always)]
fn created(p: &Packet, ifindex: u32) {
    if let Some(slot) = slot(ifindex) {
        let class = FlowClass::from_proto(p.proto) as u32;
        bump(&FLOWS_CREATED, slot * FlowClass::COUNT + class);
    }
}

/// Inserts a new flow; false when it is not in the table after all (the table full).
#[inline(always)]
fn insert(p: &Packet, key: &FlowKey, bits: u8, now: u32, ifindex: u32) -> bool {
    // SAFETY: `Flow` is `repr(C)`: two seconds, then the flags byte and its padding.
    let flow: Flow = unsafe { core::mem::transmute([now, now, u32::from(bits)]) };
    match FLOWS.insert(key, &flow, BPF_NOEXIST) {
        Ok(()) => {
            created(p, ifindex);
            true
        }
        // Another CPU inserted the same flow first: it counted it.
        Err(e) if e == EEXIST => true,
        Err(_) => {
            bump(&FLOW_TABLE_FULL, 0);
            false
        }
    }
}
