//! `FLOW_SETS` mapped into the agent: the IPv4 flows the programs keep in sets of slots.
//! The expiry pass reads each slot in place and frees an expired one with the same
//! compare-and-exchange the programs claim slots with, so a flow a packet changed
//! meanwhile stays.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use aya::maps::MapData;
use monitor_common::{
    FLOW_SET_SLOTS, Flow, FlowKey, FlowSet, FlowSlot, SET_MARKS, SET_SPILLED, SET_SPILLED_AGAIN,
    SLOT_FLAGS_SHIFT,
};

use super::mapped::Mapped;

pub struct FlowSets {
    sets: Mapped<FlowSet>,
    /// The key of the programs' flow hash, which picks a flow's set.
    seed: u64,
}

/// Which sets have flows in `FLOWS`, a bit a set.
pub struct SpilledSets(Vec<u64>);

impl SpilledSets {
    pub fn add(&mut self, set: usize) {
        if let Some(w) = self.0.get_mut(set / 64) {
            *w |= 1 << (set % 64);
        }
    }

    fn has(&self, set: usize) -> bool {
        self.0
            .get(set / 64)
            .is_some_and(|w| w & (1 << (set % 64)) != 0)
    }
}

/// Slot `i` of a set in the mapping: its control word only ever accessed atomically, its
/// other words read as they are (a program may be writing them).
#[derive(Clone, Copy)]
struct Slot {
    set: *mut FlowSet,
    i: usize,
}

impl Slot {
    fn word(self, at: usize) -> *mut u64 {
        FlowSet::slot_word(self.set, self.i, at)
    }

    fn ctl(self) -> &'static AtomicU64 {
        // SAFETY: the control word, inside the mapping, which outlives every `Slot` (they
        // live within one call); the programs access it atomically too.
        unsafe { AtomicU64::from_ptr(self.word(FlowSlot::CTL)) }
    }

    /// The slot as it is now, its control word `ctl`.
    fn read(self, ctl: u64) -> FlowSlot {
        // SAFETY: words inside the mapping.
        unsafe {
            FlowSlot {
                addrs: std::ptr::read_volatile(self.word(FlowSlot::ADDRS)),
                ports_dev: std::ptr::read_volatile(self.word(FlowSlot::PORTS_DEV)),
                seen: std::ptr::read_volatile(self.word(FlowSlot::SEEN)),
                ctl,
            }
        }
    }

    /// The flow in the slot, if it holds one. The control word is loaded first, with an
    /// acquiring load (`ldar` on arm64; a plain load on `x86_64`), so the key and second read
    /// after it are those written before the program's publishing or.
    fn flow(self) -> Option<FlowSlot> {
        Some(self.read(self.ctl().load(SeqCst))).filter(FlowSlot::is_valid)
    }

    /// Frees the slot if its control word is still `ctl`: no packet changed its flow's
    /// bits, and no program took the slot for another flow. The set's marks stay.
    fn free(self, ctl: u64) -> bool {
        self.ctl()
            .compare_exchange(ctl, ctl & SET_MARKS, SeqCst, SeqCst)
            .is_ok()
    }
}

impl FlowSets {
    pub fn map(map: MapData, seed: u64) -> std::io::Result<Self> {
        Ok(Self {
            sets: Mapped::map(map)?,
            seed,
        })
    }

    /// Begins a pass: each set marked spilled forgets that a flow spilled since the last
    /// pass, so that one spilling from now on is seen.
    pub fn begin_pass(&self) -> SpilledSets {
        for s in 0..self.sets.entries() {
            let ctl = Slot {
                set: self.sets.entry(s),
                i: 0,
            }
            .ctl();
            if ctl.load(SeqCst) & SET_SPILLED != 0 {
                ctl.fetch_and(!SET_SPILLED_AGAIN, SeqCst);
            }
        }
        SpilledSets(vec![0; self.sets.entries().div_ceil(64)])
    }

    /// The set a flow of `FLOWS` would have lived in, if it is an IPv4 flow.
    pub fn set_of(&self, key: &FlowKey) -> Option<usize> {
        let sets = u32::try_from(self.sets.entries()).ok()?;
        key.is_v4().then(|| key.set(self.seed, sets) as usize)
    }

    /// Calls `f` with every flow in the sets.
    pub fn for_each(&self, mut f: impl FnMut(&FlowKey, &Flow)) {
        self.slots(|slot| {
            if let Some(s) = slot.flow() {
                let (key, flow) = s.flow();
                f(&key, &flow);
            }
        });
    }

    fn slots(&self, mut f: impl FnMut(Slot)) {
        for s in 0..self.sets.entries() {
            let set = self.sets.entry(s);
            for i in 0..FLOW_SET_SLOTS {
                f(Slot { set, i });
            }
        }
    }

    /// The expiry pass over the sets: every flow `expired` rules out is freed, the rest
    /// handed to `kept`. An expired flow is read again before it is freed, and freed
    /// only if no packet changed it since: a flow refreshed meanwhile is kept. Two slots
    /// of a set holding one flow (its first packets on two CPUs at once, a race the
    /// programs close in all but rare cases) become one: the higher slot's bits and
    /// second go to the lower, and the higher is freed. A set marked spilled with no flow
    /// in `FLOWS` (`spilled`, read since `begin_pass`) and none spilled since is unmarked.
    /// The flows freed.
    pub fn expire(
        &self,
        spilled: &SpilledSets,
        mut expired: impl FnMut(&FlowKey, &Flow) -> bool,
        mut kept: impl FnMut(&FlowKey, &Flow),
    ) -> u64 {
        let mut freed = 0;
        for s in 0..self.sets.entries() {
            let set = self.sets.entry(s);
            let mut held: [Option<(Slot, FlowKey)>; FLOW_SET_SLOTS] = [None; FLOW_SET_SLOTS];
            for i in 0..FLOW_SET_SLOTS {
                let slot = Slot { set, i };
                let Some(s) = slot.flow() else {
                    continue;
                };
                let (key, flow) = s.flow();
                if expired(&key, &flow) {
                    // Read again: a packet may have refreshed it since.
                    if let Some(s) = slot.flow() {
                        let (key, flow) = s.flow();
                        if expired(&key, &flow) && slot.free(s.ctl) {
                            freed += 1;
                            continue;
                        }
                        held[i] = Some((slot, key));
                        kept(&key, &flow);
                    }
                    continue;
                }
                if let Some((lower, _)) = held.iter().flatten().find(|(_, k)| *k == key) {
                    if slot.free(s.ctl) {
                        freed += 1;
                        lower
                            .ctl()
                            .fetch_or(u64::from(flow.flags()) << SLOT_FLAGS_SHIFT, SeqCst);
                        let seen = lower.word(FlowSlot::SEEN).cast::<u32>().wrapping_add(1);
                        // SAFETY: the lower slot's last second, inside the mapping; a
                        // program writes it whole too.
                        unsafe {
                            if std::ptr::read_volatile(seen) < flow.last_seen {
                                std::ptr::write_volatile(seen, flow.last_seen);
                            }
                        }
                    }
                    continue;
                }
                held[i] = Some((slot, key));
                kept(&key, &flow);
            }
            let first = Slot { set, i: 0 }.ctl();
            let ctl = first.load(SeqCst);
            if ctl & SET_MARKS == SET_SPILLED && !spilled.has(s) {
                // Fails, harmlessly, when anything changed the word since the load.
                let _ = first.compare_exchange(ctl, ctl & !SET_SPILLED, SeqCst, SeqCst);
            }
        }
        freed
    }

    /// Writes a flow into slot `i` of set `s` as a program would, for tests.
    pub fn write(&mut self, s: usize, i: usize, slot: FlowSlot) {
        let at = Slot {
            set: self.sets.entry(s),
            i,
        };
        // SAFETY: words inside the mapping.
        unsafe {
            std::ptr::write_volatile(at.word(FlowSlot::ADDRS), slot.addrs);
            std::ptr::write_volatile(at.word(FlowSlot::PORTS_DEV), slot.ports_dev);
            std::ptr::write_volatile(at.word(FlowSlot::SEEN), slot.seen);
        }
        at.ctl().store(slot.ctl, SeqCst);
    }

    /// Sets of the table.
    pub fn sets(&self) -> usize {
        self.sets.entries()
    }

    /// Slot `i` of set `s` as it is now, for tests.
    pub fn get(&self, s: usize, i: usize) -> FlowSlot {
        let at = Slot {
            set: self.sets.entry(s),
            i,
        };
        at.read(at.ctl().load(SeqCst))
    }
}
