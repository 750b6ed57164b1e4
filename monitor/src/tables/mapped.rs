//! An array map created `BPF_F_MMAPABLE`, mapped into the agent: the tables whose
//! entries the agent reads, claims and frees in place with the atomics the programs use.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
};

use aya::maps::MapData;

pub struct Mapped<T> {
    base: NonNull<T>,
    entries: usize,
    len: usize,
    _map: MapData,
}

// SAFETY: the mapping is shared memory owned by this value; its users access what the
// programs write concurrently only atomically or by volatile reads.
unsafe impl<T> Send for Mapped<T> {}

impl<T> Mapped<T> {
    /// Maps the whole array into the agent.
    pub fn map(map: MapData) -> io::Result<Self> {
        let info = map.info().map_err(io::Error::other)?;
        let entries = usize::try_from(info.max_entries()).map_err(io::Error::other)?;
        let len = entries * size_of::<T>();
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
            entries,
            len,
            _map: map,
        })
    }

    /// Entries of the array.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Entry `i`, inside the mapping.
    pub fn entry(&self, i: usize) -> *mut T {
        assert!(i < self.entries, "entry {i} of {}", self.entries);
        // SAFETY: inside the mapping.
        unsafe { self.base.as_ptr().add(i) }
    }
}

impl<T> Drop for Mapped<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
