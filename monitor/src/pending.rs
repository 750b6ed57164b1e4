//! `DNS_PENDING` mapped into the agent: the queries in flight on kernels with BPF atomics,
//! whose ways the timeout sweep claims in place with the same compare-and-exchange the
//! programs use, so a query ends answered or unanswered, never both.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering::SeqCst},
};

use aya::maps::MapData;
use monitor_common::{
    DNS_PENDING_WAYS, DnsFlightKey, DnsPendingSet, PENDING_FREE, PENDING_WAITING,
};

/// A query the sweep took out of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired {
    pub key: DnsFlightKey,
    pub ifindex: u32,
}

pub struct PendingTable {
    base: NonNull<DnsPendingSet>,
    sets: usize,
    len: usize,
    _map: MapData,
}

// SAFETY: the mapping is shared memory owned by this value; every access to a way's
// state is atomic, and the other fields are read only after a claim.
unsafe impl Send for PendingTable {}

impl PendingTable {
    /// Maps the array (created `BPF_F_MMAPABLE`) into the agent.
    pub fn map(map: MapData) -> io::Result<Self> {
        let info = map.info().map_err(io::Error::other)?;
        let sets = usize::try_from(info.max_entries()).map_err(io::Error::other)?;
        let len = sets * size_of::<DnsPendingSet>();
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a shared mapping of the map's own size, unmapped on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self {
            base,
            sets,
            len,
            _map: map,
        })
    }

    /// Takes every query waiting since `deadline_ns` or earlier out of the table and hands
    /// it to `f`. A way is only taken by winning its state from waiting to free; one
    /// reused by a new query between the look and the claim is put back.
    pub fn sweep(&self, deadline_ns: u64, mut f: impl FnMut(Expired)) {
        for set in 0..self.sets {
            // SAFETY: inside the mapping.
            let set = unsafe { self.base.as_ptr().add(set) };
            for i in 0..DNS_PENDING_WAYS {
                if let Some(e) = Self::expire(set, i, deadline_ns) {
                    f(e);
                }
            }
        }
    }

    /// Way `i` of `set`, claimed if it waits since `deadline_ns` or earlier.
    fn expire(set: *mut DnsPendingSet, i: usize, deadline_ns: u64) -> Option<Expired> {
        // SAFETY: the state word of a way, only ever accessed atomically; the other
        // fields may change under us, which the claim and the second look catch.
        unsafe {
            let state = AtomicU64::from_ptr((&raw mut (*set).state).cast::<u64>().add(i));
            if state.load(SeqCst) != PENDING_WAITING {
                return None;
            }
            let start_ptr = (&raw const (*set).start_ns).cast::<u64>().add(i);
            let start = std::ptr::read_volatile(start_ptr);
            if start > deadline_ns {
                return None;
            }
            state
                .compare_exchange(PENDING_WAITING, PENDING_FREE, SeqCst, SeqCst)
                .ok()?;
            let key =
                std::ptr::read_volatile((&raw const (*set).key).cast::<DnsFlightKey>().add(i));
            let ifindex = std::ptr::read_volatile((&raw const (*set).ifindex).cast::<u32>().add(i));
            if std::ptr::read_volatile(start_ptr) != start {
                // Freed and taken by a new query between the look and the claim.
                let _ = state.compare_exchange(PENDING_FREE, PENDING_WAITING, SeqCst, SeqCst);
                return None;
            }
            Some(Expired { key, ifindex })
        }
    }
}

impl Drop for PendingTable {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
