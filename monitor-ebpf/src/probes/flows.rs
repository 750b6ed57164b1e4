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

use self::sets::{Insert, Want};

use super::{packet::Packet, recent};
use crate::{
    headers::has_ports,
    kernel::{layout, now_coarse_s},
    maps::{BPF_NOEXIST, EEXIST, bump, slot},
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
type KeyWords = [u32; FLOW_KEY_WORDS];

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

/// How many flows the tables hold, against `--flow-table-size`, on kernels with BPF
/// atomics (where the sets and `FLOWS` together have more room than that); without, the
/// size of `FLOWS` is the limit.
mod room {
    use core::intrinsics::{AtomicOrdering::SeqCst, atomic_xadd, atomic_xsub};

    use aya_ebpf::{macros::map, maps::Array};
    use monitor_common::{FLOW_COUNT_BEGUN, FLOW_COUNT_ENDED};

    use crate::kernel::layout;

    /// Flows the programs began (`FLOW_COUNT_BEGUN`, atomically) and flows the agent's
    /// pass ended (`FLOW_COUNT_ENDED`, written by the agent only).
    #[map]
    static FLOW_COUNT: Array<u64> = Array::with_max_entries(2, 0);

    /// Takes room for a new flow; false when the tables hold all they may.
    #[inline(always)]
    pub fn take() -> bool {
        if !crate::ATOMICS {
            return true;
        }
        let (Some(begun), Some(ended)) = (
            FLOW_COUNT.get_ptr_mut(FLOW_COUNT_BEGUN),
            FLOW_COUNT.get_ptr(FLOW_COUNT_ENDED),
        ) else {
            return true;
        };
        // The count taken first and read after (an atomic add's result is not to be had
        // on every kernel): flows begun at once on other CPUs may make this one give its
        // room back too, never let one more in than there is room for. The add has no
        // fetch, so arm64 runs it unordered (`stadd`); what this needs is coherence on
        // the one word alone: of two CPUs adding at once, the one whose add comes second
        // reads both.
        // SAFETY: words of a map value the kernel keeps for the program's run.
        unsafe {
            atomic_xadd::<u64, u64, { SeqCst }>(begun, 1);
            let held =
                core::ptr::read_volatile(begun).saturating_sub(core::ptr::read_volatile(ended));
            if held <= u64::from(layout::flow_table_size()) {
                return true;
            }
            atomic_xsub::<u64, u64, { SeqCst }>(begun, 1);
        }
        false
    }

    /// Gives back the room taken for a flow that did not begin after all.
    #[inline(always)]
    pub fn give_back() {
        if !crate::ATOMICS {
            return;
        }
        if let Some(begun) = FLOW_COUNT.get_ptr_mut(FLOW_COUNT_BEGUN) {
            // SAFETY: a word of FLOW_COUNT's value, which the kernel keeps for the program's run.
            unsafe { atomic_xsub::<u64, u64, { SeqCst }>(begun, 1) };
        }
    }
}

/// `FLOW_SETS`: IPv4 flows in sets of `FLOW_SET_SLOTS` slots, a set a cache line, picked
/// by the flow's hash, in an array the agent maps. A slot is claimed with
/// compare-and-exchange and published with an atomic or; its control word carries the
/// flow's protocol, bits and a fingerprint of its key, so a packet finds its flow, or the
/// flow another CPU is writing, in the one line. No helper call, lock or allocation.
///
/// Memory ordering, on both architectures. The claim (`cmpxchg_64`) and every or and
/// and on a control word are BPF atomics with a fetch, which the JITs make full barriers:
/// `lock cmpxchg` on `x86_64`; `casal`, `ldsetal`, `ldclral` on arm64 (or, without LSE, a
/// `ldxr`/`stlxr` loop and `dmb ish`). So whoever sees a slot's `SLOT_VALID` bit has seen
/// its key and second, written before the publishing or. A program reads the control
/// word and then the key with plain loads: x86 keeps loads in order; arm64 may not, and a
/// packet may then see a flow published a moment ago with the key words of before, take
/// it for another flow, and go on to begin its own. Its claim is a full barrier, and the
/// look at the lower slots after it finds the flow by its fingerprint and joins it; if
/// the flow sits in a higher slot (one freed below it in the meantime), the flow is in
/// two slots until the agent's next pass makes them one. The agent reads a control word
/// with an acquiring load (`ldar` on arm64) before the key, and frees with
/// compare-and-exchange. The probe tests of two CPUs writing one flow run on the arm64
/// guests of the kernel matrix too.
mod sets {
    use core::intrinsics::{AtomicOrdering::SeqCst, atomic_and, atomic_cxchg, atomic_or};

    use aya_ebpf::{macros::map, maps::Array};
    use monitor_common::{
        FLOW_SET_SLOTS, FlowSet, FlowSlot, SET_MARKS, SET_SPILLED, SET_SPILLED_AGAIN, SLOT_CLAIMED,
        SLOT_FLAGS_SHIFT, SLOT_FP_SHIFT, SLOT_PROTO_SHIFT, SLOT_STATE_MASK, SLOT_VALID, flow_set,
    };

    use super::{CLOSED, KeyWords};
    use crate::{kernel::layout, maps::BPF_F_MMAPABLE};

    /// Sized by the agent at load (`flow_sets_for`); one set on kernels without atomics.
    #[map]
    static FLOW_SETS: Array<FlowSet> = Array::with_max_entries(1, BPF_F_MMAPABLE);

    /// The protocol and fingerprint bits of a control word: what names a flow in it.
    const ID_MASK: u64 = !((1 << SLOT_PROTO_SHIFT) - 1);
    const FLAGS_MASK: u64 = 0xff << SLOT_FLAGS_SHIFT;

    /// A flow as its slot holds it.
    pub struct Want {
        addrs: u64,
        ports_dev: u64,
        /// Protocol and fingerprint (the hash's low bits), in place.
        id: u64,
    }

    impl Want {
        #[inline(always)]
        pub fn of(w: &KeyWords, proto: u8, h: u64) -> Self {
            let [addrs, ports_dev] = FlowSlot::key_of(w);
            Self {
                addrs,
                ports_dev,
                id: (u64::from(proto) << SLOT_PROTO_SHIFT) | (h << SLOT_FP_SHIFT),
            }
        }
    }

    /// The set of a flow's hash, from its top 32 bits (as the cache picks its set).
    #[inline(always)]
    pub fn set(h: u64) -> Option<*mut FlowSet> {
        FLOW_SETS.get_ptr_mut(flow_set(h, layout::flow_sets()))
    }

    /// Slot `i` of a set.
    #[derive(Clone, Copy)]
    struct Slot {
        set: *mut FlowSet,
        i: usize,
    }

    #[inline(always)]
    fn flags_of(ctl: u64) -> u8 {
        (ctl >> SLOT_FLAGS_SHIFT) as u8
    }

    impl Slot {
        fn word(self, at: usize) -> *mut u64 {
            FlowSet::slot_word(self.set, self.i, at)
        }

        fn ctl(self) -> *mut u64 {
            self.word(FlowSlot::CTL)
        }

        /// A word of the slot, as it is now (another CPU may be writing it).
        fn load(self, at: usize) -> u64 {
            // SAFETY: a word of a map value the kernel keeps for the program's run.
            unsafe { core::ptr::read_volatile(self.word(at)) }
        }

        fn holds(self, want: &Want) -> bool {
            self.load(FlowSlot::ADDRS) == want.addrs
                && self.load(FlowSlot::PORTS_DEV) == want.ports_dev
        }

        /// Ors `bits` into the control word (atomic, with a full barrier on every CPU:
        /// what was written before is seen by whoever sees the bits); the word before.
        fn or(self, bits: u64) -> u64 {
            // SAFETY: the control word of a map value the kernel keeps for the program's run.
            unsafe { atomic_or::<u64, u64, { SeqCst }>(self.ctl(), bits) }
        }

        fn cxchg(self, from: u64, to: u64) -> bool {
            // SAFETY: the control word of a map value the kernel keeps for the program's run.
            unsafe { atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(self.ctl(), from, to).1 }
        }

        /// Writes a second into the slot's `seen` word: its high half, or both.
        fn seen(self, first: Option<u32>, last: u32) {
            // SAFETY: the slot's `seen` word, in a map value the kernel keeps for the program's run; a second is written whole, and any CPU writes the same.
            unsafe {
                match first {
                    Some(f) => core::ptr::write_volatile(
                        self.word(FlowSlot::SEEN),
                        u64::from(f) | (u64::from(last) << 32),
                    ),
                    None => {
                        core::ptr::write_volatile(
                            self.word(FlowSlot::SEEN).cast::<u32>().wrapping_add(1),
                            last,
                        );
                    }
                }
            }
        }
    }

    /// Writes a packet into its flow if the set holds it: the second, and its bits; or,
    /// a SYN on a closed flow, the flow begun again. The flow's bits after it, and
    /// whether it began again.
    #[inline(always)]
    pub fn refresh(
        set: *mut FlowSet,
        want: &Want,
        bits: u8,
        now: u32,
        opening: bool,
    ) -> Option<(u8, bool)> {
        for i in 0..FLOW_SET_SLOTS {
            let slot = Slot { set, i };
            let c = slot.load(FlowSlot::CTL);
            if c & ID_MASK != want.id || c & SLOT_STATE_MASK == 0 {
                continue;
            }
            if c & SLOT_VALID == 0 {
                // This flow's first packet, on another CPU, is writing it: this packet's
                // bits join it.
                return Some((
                    flags_of(slot.or(u64::from(bits) << SLOT_FLAGS_SHIFT)) | bits,
                    false,
                ));
            }
            if !slot.holds(want) {
                continue;
            }
            if opening && flags_of(c) & CLOSED != 0 {
                let begun = (c & !FLAGS_MASK) | (u64::from(bits) << SLOT_FLAGS_SHIFT);
                if slot.cxchg(c, begun) {
                    slot.seen(Some(now), now);
                    return Some((bits, true));
                }
            }
            if (slot.load(FlowSlot::SEEN) >> 32) as u32 != now {
                slot.seen(None, now);
            }
            if flags_of(c) & bits != bits {
                return Some((
                    flags_of(slot.or(u64::from(bits) << SLOT_FLAGS_SHIFT)) | bits,
                    false,
                ));
            }
            return Some((flags_of(c), false));
        }
        None
    }

    /// Whether flows of the set live in `FLOWS` (it was full when they began): only
    /// then may a flow missing from the set be there.
    #[inline(always)]
    pub fn spilled(set: *mut FlowSet) -> bool {
        Slot { set, i: 0 }.load(FlowSlot::CTL) & SET_SPILLED != 0
    }

    /// Marks the set before a flow of it goes to `FLOWS`.
    #[inline(always)]
    pub fn spill(set: *mut FlowSet) {
        Slot { set, i: 0 }.or(SET_SPILLED | SET_SPILLED_AGAIN);
    }

    pub enum Insert {
        /// The flow begins in a slot of its own.
        New,
        /// Another CPU began the same flow in this set first: the packet joined it.
        Joined(u8),
    }

    /// Begins a flow in a free slot of its set; None when the set is full.
    #[inline(always)]
    pub fn insert(set: *mut FlowSet, want: &Want, bits: u8, now: u32) -> Option<Insert> {
        let mine = u64::from(bits) << SLOT_FLAGS_SHIFT;
        for i in 0..FLOW_SET_SLOTS {
            let slot = Slot { set, i };
            let c = slot.load(FlowSlot::CTL);
            if c & SLOT_STATE_MASK == 0 && slot.cxchg(c, want.id | SLOT_CLAIMED | (c & SET_MARKS)) {
                // Slots are claimed lowest first: the same flow begun on another CPU
                // meanwhile holds a lower slot, and this CPU, which claimed after it, sees
                // it and joins it (a full barrier lies between each claim and each look).
                for j in 0..i {
                    let other = Slot { set, i: j };
                    let oc = other.load(FlowSlot::CTL);
                    if oc & ID_MASK == want.id && oc & SLOT_STATE_MASK != 0 {
                        // SAFETY: the slot this CPU claimed, freed (the set's marks kept).
                        unsafe { atomic_and::<u64, u64, { SeqCst }>(slot.ctl(), SET_MARKS) };
                        return Some(Insert::Joined(flags_of(other.or(mine)) | bits));
                    }
                }
                // SAFETY: the slot is this CPU's until it is published.
                unsafe {
                    core::ptr::write_volatile(slot.word(FlowSlot::ADDRS), want.addrs);
                    core::ptr::write_volatile(slot.word(FlowSlot::PORTS_DEV), want.ports_dev);
                }
                slot.seen(Some(now), now);
                slot.or(SLOT_VALID | mine);
                return Some(Insert::New);
            }
            // Taken, perhaps by this flow's first packet on another CPU since the look.
            let c = slot.load(FlowSlot::CTL);
            if c & ID_MASK == want.id
                && c & SLOT_STATE_MASK != 0
                && (c & SLOT_VALID == 0 || slot.holds(want))
            {
                return Some(Insert::Joined(flags_of(slot.or(mine)) | bits));
            }
        }
        None
    }
}
