//! `DNS_PENDING` mapped into the agent: the queries in flight on kernels with BPF atomics,
//! whose ways the timeout sweep holds and frees in place with the same
//! compare-and-exchange the programs use, so a query ends answered or unanswered, never
//! both.

use std::{
    mem::offset_of,
    sync::atomic::{AtomicU64, Ordering::SeqCst},
};

use aya::maps::MapData;
use monitor_common::{
    DNS_CLIENT_BUCKETS, DNS_PENDING_WAYS, DnsFlightKey, DnsPendingSet, PENDING_FREE,
    PENDING_WAITING, PENDING_WRITING, dns_client_bucket,
};

use super::mapped::Mapped;

/// A query the sweep took out of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired {
    pub key: DnsFlightKey,
    /// `CLOCK_MONOTONIC` nanoseconds of its first copy.
    pub start_ns: u64,
    pub ifindex: u32,
    /// The resolver slot the query was counted under.
    pub resolver: u8,
    /// Whether the query left through the device (its client is local).
    pub egress: bool,
}

pub struct PendingTable {
    sets: Mapped<DnsPendingSet>,
    /// Ways seen held in the last pass, by (set, way, start).
    held: Vec<(usize, usize, u64)>,
}

impl PendingTable {
    /// Maps the array (created `BPF_F_MMAPABLE`) into the agent.
    pub fn map(map: MapData) -> std::io::Result<Self> {
        Ok(Self {
            sets: Mapped::map(map)?,
            held: Vec::new(),
        })
    }

    /// Takes every query waiting since `deadline_ns` or earlier out of the table and hands
    /// it to `f`. A way is held while it is read (from waiting to writing, as the
    /// programs hold it), then freed; one reused by a new query between the look and the
    /// hold goes back as it was. A hold lasts nanoseconds: a way still held, unchanged,
    /// a whole pass later was held by an agent killed between taking an expired query
    /// and freeing the way, and is taken now.
    pub fn sweep(&mut self, deadline_ns: u64, mut f: impl FnMut(Expired)) {
        let mut held = Vec::new();
        for s in 0..self.sets.entries() {
            let set = self.sets.entry(s);
            for i in 0..DNS_PENDING_WAYS {
                let way = Way { set, i };
                let taken = match way.state().load(SeqCst) {
                    PENDING_WAITING => way.expire(deadline_ns),
                    PENDING_WRITING => {
                        let start = way.start();
                        if self.held.contains(&(s, i, start)) {
                            way.abandoned()
                        } else {
                            held.push((s, i, start));
                            None
                        }
                    }
                    _ => None,
                };
                if let Some(e) = taken {
                    f(e);
                }
            }
        }
        self.held = held;
    }
}

/// Way `i` of a set in the mapping. Its state is only ever accessed atomically; its
/// other fields may change under us until the way is held.
#[derive(Clone, Copy)]
struct Way {
    set: *mut DnsPendingSet,
    i: usize,
}

impl Way {
    /// The way's element of the set's per-way field at byte `field`.
    fn field<T>(&self, field: usize) -> *mut T {
        DnsPendingSet::way_field(self.set, field, self.i)
    }

    /// A plain field of the way, as it is now (checked again once the way is held).
    fn read<T>(&self, field: usize) -> T {
        // SAFETY: an element of a per-way field, inside the mapping.
        unsafe { std::ptr::read_volatile(self.field(field)) }
    }

    fn state(&self) -> &AtomicU64 {
        // SAFETY: a word of the mapping, which outlives every `Way` (they live within a
        // sweep); accessed atomically by the programs too.
        unsafe { AtomicU64::from_ptr(self.field(offset_of!(DnsPendingSet, state))) }
    }

    fn start(&self) -> u64 {
        self.read(offset_of!(DnsPendingSet, start_ns))
    }

    /// The query in the way, read while it is held.
    fn query(&self) -> Expired {
        Expired {
            start_ns: self.start(),
            key: self.read(offset_of!(DnsPendingSet, key)),
            ifindex: self.read(offset_of!(DnsPendingSet, ifindex)),
            resolver: self.read(offset_of!(DnsPendingSet, resolver)),
            egress: self.read::<u8>(offset_of!(DnsPendingSet, egress)) != 0,
        }
    }

    /// The waiting query, taken if it waits since `deadline_ns` or earlier.
    fn expire(&self, deadline_ns: u64) -> Option<Expired> {
        let start = self.start();
        if start > deadline_ns {
            return None;
        }
        self.state()
            .compare_exchange(PENDING_WAITING, PENDING_WRITING, SeqCst, SeqCst)
            .ok()?;
        if self.start() != start {
            // Freed and taken by a new query between the look and the hold.
            self.state().store(PENDING_WAITING, SeqCst);
            return None;
        }
        let e = self.query();
        self.state().store(PENDING_FREE, SeqCst);
        Some(e)
    }

    /// The query of a way held by no one since the last pass, taken. Only the holder
    /// writes a held way, so it is read before the way is freed.
    fn abandoned(&self) -> Option<Expired> {
        let e = self.query();
        self.state()
            .compare_exchange(PENDING_WRITING, PENDING_FREE, SeqCst, SeqCst)
            .ok()?;
        Some(e)
    }
}

impl PendingTable {
    /// Queries waiting for their response now.
    pub fn waiting(&self) -> usize {
        let mut n = 0;
        for s in 0..self.sets.entries() {
            let set = self.sets.entry(s);
            for i in 0..DNS_PENDING_WAYS {
                if (Way { set, i }).state().load(SeqCst) == PENDING_WAITING {
                    n += 1;
                }
            }
        }
        n
    }

    /// Calls `f` with the key of every query waiting now.
    pub fn for_each_waiting(&self, mut f: impl FnMut(&DnsFlightKey)) {
        for s in 0..self.sets.entries() {
            let set = self.sets.entry(s);
            for i in 0..DNS_PENDING_WAYS {
                let way = Way { set, i };
                if way.state().load(SeqCst) == PENDING_WAITING {
                    f(&way.query().key);
                }
            }
        }
    }

    /// Set `s` as the programs see it, for tests that write ways as the programs do.
    pub fn set_mut(&mut self, s: usize) -> &mut DnsPendingSet {
        // SAFETY: inside the mapping, borrowed mutably with the table.
        unsafe { &mut *self.sets.entry(s) }
    }
}

/// `DNS_CLIENTS` mapped into the agent: queries in flight per client bucket, written by
/// each sweep from its walk of the table and read by the programs, which hold each
/// client to its share of the table with them.
pub struct ClientCounts {
    buckets: Mapped<u64>,
    /// The key of the clients' hash (the DNS queries' key).
    key: u32,
}

impl ClientCounts {
    /// Maps the array (created `BPF_F_MMAPABLE`) into the agent.
    pub fn map(map: MapData, key: u32) -> std::io::Result<Self> {
        Ok(Self {
            buckets: Mapped::map(map)?,
            key,
        })
    }

    /// The bucket of `client`'s queries, as the programs hash it.
    pub fn bucket(&self, client: [u32; 4]) -> usize {
        dns_client_bucket(client, self.key) as usize
    }

    /// Writes the counts of a walk of the table, one a bucket.
    pub fn set(&self, counts: &[u64]) {
        for (i, n) in counts.iter().enumerate().take(self.buckets.entries()) {
            // SAFETY: an entry of the mapping; the programs read and write it with plain
            // loads and stores too.
            unsafe { std::ptr::write_volatile(self.buckets.entry(i), *n) };
        }
    }

    /// The counts as they are now.
    pub fn get(&self) -> Vec<u64> {
        (0..self.buckets.entries())
            // SAFETY: an entry of the mapping (`i` < its entries), written by the programs with plain stores.
            .map(|i| unsafe { std::ptr::read_volatile(self.buckets.entry(i)) })
            .collect()
    }
}

const _: () = assert!(DNS_CLIENT_BUCKETS.is_power_of_two());
