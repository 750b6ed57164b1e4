//! Queries in flight in `DNS_PENDING`, an array the agent maps: a set of ways picked by
//! a hash of the query, each way claimed with compare-and-exchange. No helper call, no
//! lock, no allocation: what a hash map's insert and delete cost is most of a DNS
//! packet's price.
//!
//! Memory ordering, on both architectures: a way is claimed (free or waiting to writing)
//! with `cmpxchg_64`, a full barrier (`lock cmpxchg` on `x86_64`, `casal` on arm64), and
//! released by `release`: a plain store where the CPU keeps stores after earlier loads
//! and stores (`x86_64`), an `xchg_64` (`swpal`, a full barrier) where it does not
//! (arm64). A program looks at a way's state and key with plain loads, which arm64 may
//! reorder; it acts only after holding the way, and `hold` reads the key again after the
//! claim. The agent's sweep claims the same way before it reads or frees one.

use core::{
    intrinsics::{AtomicOrdering::SeqCst, atomic_cxchg, atomic_xchg},
    mem::offset_of,
};

use aya_ebpf::{macros::map, maps::Array};
use monitor_common::{
    DNS_FLIGHT_KEY_WORDS, DNS_PENDING_SETS, DNS_PENDING_WAYS, DnsFlightKey, DnsPendingSet, MapFull,
    PENDING_FREE, PENDING_WAITING, PENDING_WRITING,
    hash::{MURMUR3_FMIX_1, MURMUR3_FMIX_2, XXH32_PRIME_1},
};

use super::clients;
use crate::{
    kernel::{layout, now_ns},
    maps::{BPF_F_MMAPABLE, map_full},
    probes::dns::{Ended, KeyWords, Meta},
};

#[map]
static DNS_PENDING: Array<DnsPendingSet> =
    Array::with_max_entries(DNS_PENDING_SETS, BPF_F_MMAPABLE);

/// Way `i` of a set.
#[derive(Clone, Copy)]
struct Way {
    set: *mut DnsPendingSet,
    i: usize,
}

impl Way {
    /// The way's element of the set's per-way field at byte `field`.
    #[inline(always)]
    fn field<T>(self, field: usize) -> *mut T {
        DnsPendingSet::way_field(self.set, field, self.i)
    }

    fn state(self) -> *mut u64 {
        self.field(offset_of!(DnsPendingSet, state))
    }

    fn start(self) -> *mut u64 {
        self.field(offset_of!(DnsPendingSet, start_ns))
    }

    fn ifindex(self) -> *mut u32 {
        self.field(offset_of!(DnsPendingSet, ifindex))
    }

    fn resolver(self) -> *mut u8 {
        self.field(offset_of!(DnsPendingSet, resolver))
    }

    fn egress(self) -> *mut u8 {
        self.field(offset_of!(DnsPendingSet, egress))
    }

    /// The device, slot, direction and kind of what waits in a way this CPU holds.
    fn meta(self) -> Meta {
        // SAFETY: words of the way this CPU holds.
        unsafe {
            Meta {
                ifindex: core::ptr::read_volatile(self.ifindex()),
                resolver: core::ptr::read_volatile(self.resolver()),
                egress: core::ptr::read_volatile(self.egress()),
                what: core::ptr::read_volatile(self.key().wrapping_add(DNS_FLIGHT_KEY_WORDS - 1))
                    as u8,
            }
        }
    }

    /// The first word of the way's key.
    fn key(self) -> *mut u32 {
        self.field::<DnsFlightKey>(offset_of!(DnsPendingSet, key))
            .cast()
    }

    /// The client bucket of the query in the way (read as it is: decided on again
    /// once the way is held).
    fn client(self) -> u32 {
        let k = self.key();
        // SAFETY: inside the way's key.
        let w = |j: usize| unsafe { core::ptr::read_volatile(k.wrapping_add(j)) };
        clients::of(&[w(0), w(1), w(2), w(3), 0, 0, 0, 0, 0, 0])
    }

    /// Whether the way holds `key`, read word by word (the way may be changing).
    fn holds(self, key: &KeyWords) -> bool {
        let k = self.key();
        let mut diff = 0;
        for (j, w) in key.iter().enumerate() {
            // SAFETY: inside the way's key.
            diff |= unsafe { core::ptr::read_volatile(k.wrapping_add(j)) } ^ w;
        }
        diff == 0
    }

    /// The state, a plain load: what is decided on it is decided again by a
    /// compare-and-exchange.
    fn is(self, state: u64) -> bool {
        // SAFETY: a word of a map value the kernel keeps for the program's run.
        unsafe { core::ptr::read_volatile(self.state()) == state }
    }

    /// Holds the way (waiting to writing) if it waits with `key`. Only the holder
    /// moves a held way on, so one freed and reused by another query between the look
    /// and the hold goes back as it was.
    #[inline(always)]
    fn hold(self, key: &KeyWords) -> bool {
        if !self.is(PENDING_WAITING) || !self.holds(key) {
            return false;
        }
        if !self.claim(PENDING_WAITING, PENDING_WRITING) {
            return false;
        }
        if self.holds(key) {
            return true;
        }
        release(self, PENDING_WAITING);
        false
    }

    /// Moves the way from state `from` to `to`; false when it was not in `from`.
    /// (The target has no `AtomicU64` with compare-and-exchange; this intrinsic is
    /// what it would call.)
    fn claim(self, from: u64, to: u64) -> bool {
        // SAFETY: the way's state word, in a map value the kernel keeps for the program's run.
        unsafe { atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(self.state(), from, to).1 }
    }
}

#[inline(always)]
fn set(key: &KeyWords) -> Option<*mut DnsPendingSet> {
    // Each address folded to one word by XOR, then one multiply an address rather than
    // one a word (this runs on every query and answer). Addresses that fold alike share
    // a set, which its four ways and each client's share of the table bound.
    let c = key[0] ^ key[1] ^ key[2] ^ key[3];
    let s = key[4] ^ key[5] ^ key[6] ^ key[7];
    let h = (c ^ layout::dns_set_key()).wrapping_mul(XXH32_PRIME_1)
        ^ s.wrapping_mul(MURMUR3_FMIX_1)
        ^ key[8].wrapping_mul(MURMUR3_FMIX_2);
    let h = h ^ (h >> 15);
    DNS_PENDING.get_ptr_mut(((u64::from(h) * u64::from(layout::pending_sets())) >> 32) as u32)
}

/// Records a query, and what it ended: a copy of itself still waiting, whose way it
/// takes over (`replace`; else the copy keeps its way); or, where it cannot take a
/// free way, the query of the set's heaviest client (the one with the most queries
/// in flight; its oldest), whose way it takes, or itself. A client at its share of
/// the table takes no free way, and never pushes out a client lighter than itself:
/// one client's flood ends its own queries, untracked, not the others'.
#[inline(always)]
pub fn query(key: &KeyWords, meta: Meta, replace: bool) -> Ended {
    let Some(set) = set(key) else {
        return Ended::evicted(meta);
    };
    for i in 0..DNS_PENDING_WAYS {
        let way = Way { set, i };
        if !replace {
            if way.is(PENDING_WAITING) && way.holds(key) {
                return Ended::waiting();
            }
            continue;
        }
        // Held as a response or the sweep would hold it: whoever holds the copy
        // first ends it.
        if way.hold(key) {
            let copy = way.meta();
            publish(way, key, meta);
            return Ended::superseded(copy);
        }
    }
    let client = clients::of(key);
    let held = clients::held(client);
    // The table's ways: its sets (a load-time constant) times the ways of each.
    if clients::at_share(held, layout::pending_sets() * DNS_PENDING_WAYS as u32) {
        map_full(MapFull::DnsInflight);
        return Ended::evicted(meta);
    }
    for i in 0..DNS_PENDING_WAYS {
        let way = Way { set, i };
        if way.is(PENDING_FREE) && way.claim(PENDING_FREE, PENDING_WRITING) {
            publish(way, key, meta);
            return Ended::none();
        }
    }
    map_full(MapFull::DnsInflight);
    make_room(set, key, meta, client, held)
}

/// A query `key` of client bucket `client` (holding `held`) in full set `set`: takes
/// the way of the heaviest client's oldest query, if that client is itself or holds
/// more than it; else the new query ends here.
#[inline(always)]
fn make_room(set: *mut DnsPendingSet, key: &KeyWords, meta: Meta, client: u32, held: u64) -> Ended {
    let chosen = heaviest(set);
    let victim = (chosen & 0xff) as usize;
    let victim_client = ((chosen >> 8) & 0x00ff_ffff) as u32;
    let victim_held = chosen >> 32;
    if victim >= DNS_PENDING_WAYS || (victim_client != client && victim_held <= held) {
        return Ended::evicted(meta);
    }
    let way = Way { set, i: victim };
    if way.claim(PENDING_WAITING, PENDING_WRITING) {
        // The way's query as it is now that it is held (it may have changed since
        // the look).
        let evicted = way.meta();
        publish(way, key, meta);
        return Ended::evicted(evicted);
    }
    // The way held this instant: the new query ends here.
    Ended::evicted(meta)
}

/// The way of the waiting query whose client holds the most queries in flight (the
/// oldest of that client's) in a full set, packed: the way in the low byte (or
/// `DNS_PENDING_WAYS` when none waits), its client bucket above it, what that client
/// holds in the high word. A function of its own in the program: its comparisons
/// are walked once by the verifier, and what follows once for each way it can return
/// rather than for each path through them (6.1 under emulation took longer than its
/// scenario's limit with it inlined).
#[inline(never)]
fn heaviest(set: *mut DnsPendingSet) -> u64 {
    let mut best = Heaviest {
        way: DNS_PENDING_WAYS as u64,
        client: 0,
        held: 0,
        start: u64::MAX,
    };
    // Written out, not a loop: LLVM leaves a loop of four here rolled, and 6.1's
    // verifier refuses a loop around a helper call ("back-edge").
    best.consider(Way { set, i: 0 });
    best.consider(Way { set, i: 1 });
    best.consider(Way { set, i: 2 });
    best.consider(Way { set, i: 3 });
    best.way | best.client << 8 | best.held.min(u64::from(u32::MAX)) << 32
}

const _: () = assert!(DNS_PENDING_WAYS == 4, "heaviest considers four ways");

/// The heaviest client's oldest query seen so far.
struct Heaviest {
    way: u64,
    client: u64,
    held: u64,
    start: u64,
}

impl Heaviest {
    #[inline(always)]
    fn consider(&mut self, way: Way) {
        if !way.is(PENDING_WAITING) {
            return;
        }
        let c = way.client();
        let h = clients::held(c);
        // SAFETY: a word of a map value the kernel keeps for the program's run; what
        // is decided on it is decided again once the way is held.
        let start = unsafe { core::ptr::read_volatile(way.start()) };
        if h > self.held || (h == self.held && start < self.start) {
            self.way = way.i as u64;
            self.client = u64::from(c);
            self.held = h;
            self.start = start;
        }
    }
}

/// Writes a query into a way this CPU claimed (state `PENDING_WRITING`), then marks it
/// waiting.
#[inline(always)]
fn publish(way: Way, key: &KeyWords, meta: Meta) {
    // SAFETY: the way is ours until it is marked waiting. Volatile stores: the
    // compiler keeps them in this order.
    unsafe {
        let k = way.key();
        for (j, w) in key.iter().enumerate() {
            core::ptr::write_volatile(k.wrapping_add(j), *w);
        }
        core::ptr::write_volatile(way.ifindex(), meta.ifindex);
        core::ptr::write_volatile(way.resolver(), meta.resolver);
        core::ptr::write_volatile(way.egress(), meta.egress);
        core::ptr::write_volatile(way.start(), now_ns());
    }
    release(way, PENDING_WAITING);
}

/// Ends the query `key` names; its start time and resolver slot if this response is
/// the one that ends it (a duplicate response or the agent's timeout sweep may have).
#[inline(always)]
pub fn answer(key: &KeyWords) -> Option<(u64, u8)> {
    let set = set(key)?;
    for i in 0..DNS_PENDING_WAYS {
        let way = Way { set, i };
        if way.hold(key) {
            // SAFETY: words of the way this CPU holds.
            let (start, resolver) = unsafe {
                (
                    core::ptr::read_volatile(way.start()),
                    core::ptr::read_volatile(way.resolver()),
                )
            };
            release(way, PENDING_FREE);
            return Some((start, resolver));
        }
    }
    None
}

/// Ends this CPU's hold on a way (state `PENDING_WRITING`), leaving it in `state`:
/// whoever sees the new state must see what was written or read before it. A CPU
/// that keeps stores in order after earlier loads and stores (x86) needs a plain
/// store for that, one that does not (arm64) a full barrier. A constant at load.
#[inline(always)]
fn release(way: Way, state: u64) {
    // SAFETY: the state word of a way this CPU holds.
    unsafe {
        if layout::stores_in_order() != 0 {
            core::ptr::write_volatile(way.state(), state);
        } else {
            atomic_xchg::<u64, { SeqCst }>(way.state(), state);
        }
    }
}
