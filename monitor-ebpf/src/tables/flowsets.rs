//! `FLOW_SETS`: IPv4 flows in sets of `FLOW_SET_SLOTS` slots, a set a cache line, picked
//! by the flow's hash, in an array the agent maps. A slot is claimed with
//! compare-and-exchange and published with an atomic or; its control word carries the
//! flow's protocol, bits and a fingerprint of its key, so a packet finds its flow, or the
//! flow another CPU is writing, in the one line. No helper call, lock or allocation.
//!
//! Memory ordering, on both architectures. The claim (`cmpxchg_64`) and every or and
//! and on a control word are BPF atomics with a fetch, which the JITs make full barriers:
//! `lock cmpxchg` on `x86_64`; `casal`, `ldsetal`, `ldclral` on arm64 (or, without LSE, a
//! `ldxr`/`stlxr` loop and `dmb ish`). So whoever sees a slot's `SLOT_VALID` bit has seen
//! its key and second, written before the publishing or. A program reads the control
//! word and then the key with plain loads: x86 keeps loads in order; arm64 may not, and a
//! packet may then see a flow published a moment ago with the key words of before, take
//! it for another flow, and go on to begin its own. Its claim is a full barrier, and the
//! look at the lower slots after it finds the flow by its fingerprint and joins it; if
//! the flow sits in a higher slot (one freed below it in the meantime), the flow is in
//! two slots until the agent's next pass makes them one. The agent reads a control word
//! with an acquiring load (`ldar` on arm64) before the key, and frees with
//! compare-and-exchange. The probe tests of two CPUs writing one flow run on the arm64
//! guests of the kernel matrix too.

use core::intrinsics::{AtomicOrdering::SeqCst, atomic_and, atomic_cxchg, atomic_or};

use aya_ebpf::{macros::map, maps::Array};
use monitor_common::{
    FLOW_SET_SLOTS, FlowSet, FlowSlot, SET_MARKS, SET_SPILLED, SET_SPILLED_AGAIN, SLOT_CLAIMED,
    SLOT_FLAGS_SHIFT, SLOT_FP_SHIFT, SLOT_PROTO_SHIFT, SLOT_STATE_MASK, SLOT_VALID, flow_set,
};

use crate::{
    kernel::layout,
    maps::BPF_F_MMAPABLE,
    probes::flows::{CLOSED, KeyWords},
};

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
        self.load(FlowSlot::ADDRS) == want.addrs && self.load(FlowSlot::PORTS_DEV) == want.ports_dev
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
