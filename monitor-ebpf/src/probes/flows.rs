//! The flow tables: one entry per direction-agnostic 5-tuple on each ENI, with first and
//! last seen second and the TCP close state, so the agent can model which connections
//! EC2 still tracks. An established flow costs a look into a per-CPU cache; the shared
//! tables are read and written once a second per flow, or when its flags change. An
//! IPv4 flow lives in its set of `FLOW_SETS` (one cache line, no helper call) while the
//! set has room, on kernels with BPF atomics; an IPv6 flow, or one whose set is full,
//! in the hash table `FLOWS`. A flow is in one table or the other, never both. An open
//! TCP flow's segments without SYN, FIN or RST look into `FLOW_RECENT` first, and go no
//! further once the flow was written this refresh period (`recent`).

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use monitor_common::{
    BPF_F_NO_PREALLOC, FLOW_AB, FLOW_BA, FLOW_CACHE_SETS, FLOW_CACHE_WAYS, FLOW_FIN_AB,
    FLOW_FIN_BA, FLOW_KEY_WORDS, FLOW_LOCAL_A, FLOW_LOCAL_B, FLOW_RST, Flow, FlowClass, FlowKey,
    MAX_DEVICES, bits_of, flow_hash, flow_hash_v4, flow_key_words, flow_set, marks_of,
    proto::{IPPROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

use super::{packet::Packet, recent};
use crate::{
    headers::has_ports,
    kernel::{layout, now_coarse_s},
    maps::{BPF_NOEXIST, EEXIST, bump, slot},
    tables::{
        flowsets::{self as sets, Insert, Want},
        room,
    },
};

/// Sized by the agent (`--flow-table-size`) at load; entries are allocated as flows
/// appear, so its memory follows the flows tracked, not the table's maximum. IPv6 flows,
/// IPv4 flows whose set in `FLOW_SETS` was full, and every flow on kernels without BPF
/// atomics.
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
pub(crate) type KeyWords = [u32; FLOW_KEY_WORDS];

/// A cache way's layout: the direction bits (`cache_bits`) in the low bits, then the
/// second the flow was last written to the table (its low 16 bits), then the fingerprint.
const WAY_BITS_MASK: u64 = 0xf;
const WAY_SECOND_SHIFT: u32 = 4;
const WAY_SECOND_MASK: u32 = 0xffff;
const WAY_FP_SHIFT: u32 = 20;
/// The fingerprint: the hash's low 64 - `WAY_FP_SHIFT` bits.
const WAY_FP_MASK: u64 = (1 << (64 - WAY_FP_SHIFT)) - 1;

#[inline(always)]
fn seed() -> u64 {
    u64::from(layout::flow_hash_key_lo()) | (u64::from(layout::flow_hash_key_hi()) << 32)
}

/// The direction bits a cache way keeps, in its low 4 bits (`WAY_BITS_MASK`).
#[inline(always)]
fn cache_bits(bits: u8) -> u64 {
    u64::from(bits & (FLOW_AB | FLOW_BA)) | (u64::from(bits & (FLOW_LOCAL_A | FLOW_LOCAL_B)) >> 3)
}

/// Flows that found the table full and were not tracked.
#[map]
static FLOW_TABLE_FULL: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// A packet's flow: found or begun in the tables, refreshed at most once a period.
// One body, over 60 lines: the object is held instruction for instruction to the one
// the kernel matrix verified (6.1's verifier walks within a fifth of its budget), and a
// split, even into functions inlined always, compiles to other eBPF.
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
    let words: KeyWords = flow_key_words(a, b, port_a, port_b, ifindex, p.proto);
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
        flow_hash(&words, seed())
    } else {
        flow_hash_v4(&words, seed())
    };
    // A TCP segment without SYN, FIN or RST changes what EC2 tracks only once a period:
    // when its flow's bit is set, the flow was written this period.
    let local = bits & (FLOW_LOCAL_A | FLOW_LOCAL_B);
    let segment = recent::segment(p.proto, tcp_flags);
    if recent::seen(h, now, local, segment) {
        return;
    }
    // The set from the hash's top 32 bits, by multiply and shift (any number of sets).
    let set = FLOW_CACHE.get_ptr_mut(flow_set(h, FLOW_CACHE_SETS));
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
    let packet = Stored {
        p,
        h,
        words: &words,
        bits,
        now,
        opening,
        ifindex,
    };
    let Some(flags) = store(&packet) else {
        return;
    };
    recent::mark(h, now, local, segment, flags);
    if let Some(set) = set {
        let way = tag | cache_bits(flags);
        // SAFETY: this CPU's own set; classifiers on one CPU do not interleave.
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
pub const CLOSED: u8 = FLOW_FIN_AB | FLOW_FIN_BA | FLOW_RST;

/// What `store` is given of a packet.
struct Stored<'a> {
    p: &'a Packet,
    h: u64,
    words: &'a KeyWords,
    bits: u8,
    now: u32,
    opening: bool,
    ifindex: u32,
}

/// Writes a packet into its flow, in whichever table holds it, or begins the flow: in its
/// set of `FLOW_SETS` when it can live there and the set has room, else in `FLOWS`. The
/// flow's bits after it; None when the tables hold `--flow-table-size` flows already, or
/// `FLOWS` is full. A function of its own in the program: the verifier walks its many
/// ways once, and what follows it (the DNS probes) once for all of them, where inlined it
/// walked what follows once for each (minutes on 6.1 under emulation).
#[inline(never)]
fn store(packet: &Stored) -> Option<u8> {
    let &Stored {
        p,
        h,
        words,
        bits,
        now,
        opening,
        ifindex,
    } = packet;
    // The flow's set, when it may live in one.
    let mut set = None;
    if crate::ATOMICS
        && !p.is_v6
        && let Some(s) = sets::set(h)
    {
        let want = Want::of(words, p.proto, h);
        if let Some((flags, begun)) = sets::refresh(s, &want, bits, now, opening) {
            if begun {
                created(p, ifindex);
            }
            return Some(flags);
        }
        set = Some((s, want));
    }
    // The key is built once, as words, because the hash, the cache and the sets read
    // words; the table's key is those same words taken as a `FlowKey`, not assembled
    // again field by field from the packet.
    // SAFETY: `FlowKey` is `repr(C)`, 11 words without padding between fields.
    let key: FlowKey = unsafe { core::mem::transmute(*words) };
    // A flow missing from its set is in `FLOWS` only if the set is marked spilled.
    let look = set.as_ref().is_none_or(|(s, _)| sets::spilled(*s));
    if look && let Some(flow) = FLOWS.get_ptr_mut(&key) {
        return Some(refresh(flow, bits, now, opening, p, ifindex));
    }
    // A new flow.
    if !room::take() {
        bump(&FLOW_TABLE_FULL, 0);
        return None;
    }
    if let Some((s, want)) = set {
        match sets::insert(s, &want, bits, now) {
            Some(Insert::New) => {
                created(p, ifindex);
                return Some(bits);
            }
            Some(Insert::Joined(flags)) => {
                room::give_back();
                return Some(flags);
            }
            None => sets::spill(s),
        }
    }
    insert(p, &key, bits, now, ifindex)
}

/// Writes a packet into its flow in the table: the second, and its bits set; or, a SYN
/// on a closed flow, the flow begun again. The flow's bits after it.
#[inline(always)]
fn refresh(flow: *mut Flow, bits: u8, now: u32, opening: bool, p: &Packet, ifindex: u32) -> u8 {
    // SAFETY: a value of the shared table, which the kernel keeps for the program's run;
    // other CPUs may write the same flow: a second is written whole and any CPU writes
    // the same, and each bit is a byte of its own (`mark`).
    unsafe {
        let flags = bits_of(core::ptr::read_volatile(&raw const (*flow).marks));
        if opening && flags & CLOSED != 0 {
            (*flow).first_seen = now;
            (*flow).last_seen = now;
            core::ptr::write_volatile(&raw mut (*flow).marks, marks_of(bits));
            created(p, ifindex);
            return bits;
        }
        if (*flow).last_seen != now {
            (*flow).last_seen = now;
        }
        let new = bits & !flags;
        if new != 0 {
            mark(flow, new);
        }
        flags | bits
    }
}

/// Sets each bit of `new` in the flow: a one-byte store of 1 into the bit's own byte,
/// which no other bit shares, so a CPU setting another bit at the same time loses
/// nothing and makes this one lose nothing (`Flow`).
#[inline(always)]
fn mark(flow: *mut Flow, new: u8) {
    // SAFETY: only the address of the flow's `marks` is taken.
    let marks = unsafe { (&raw mut (*flow).marks).cast::<u8>() };
    for i in 0..7 {
        if new & (1 << i) != 0 {
            // SAFETY: byte `i` of the flow's 8-byte `marks`, in the table's value the
            // kernel keeps for the program's run.
            unsafe { core::ptr::write_volatile(marks.wrapping_add(i), 1) };
        }
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

/// Inserts a new flow; the flow's bits after it, or None when it is not in the table
/// after all (the table full).
#[inline(always)]
fn insert(p: &Packet, key: &FlowKey, bits: u8, now: u32, ifindex: u32) -> Option<u8> {
    let flow = Flow::new(now, now, bits);
    match FLOWS.insert(key, &flow, BPF_NOEXIST) {
        Ok(()) => {
            created(p, ifindex);
            Some(bits)
        }
        // Another CPU inserted the same flow first (its first packet the other way, at
        // once): it counted it, and this packet's bits join it.
        Err(e) if e == EEXIST => {
            room::give_back();
            let flow = FLOWS.get_ptr_mut(key)?;
            Some(refresh(flow, bits, now, false, p, ifindex))
        }
        Err(_) => {
            room::give_back();
            bump(&FLOW_TABLE_FULL, 0);
            None
        }
    }
}
