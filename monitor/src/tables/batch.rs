//! Raw map operations: `BPF_MAP_LOOKUP_BATCH`, which aya 0.14 lacks, and single lookups
//! and deletes on a bare map fd. In batches a table of 100k flows is read in a few dozen
//! syscalls, not 200k.

use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use crate::kernel::bpf::{BatchAttr, ElemAttr, bpf, cmd};

/// The value of `key`, `None` when absent.
///
/// # Safety
/// `K` and `V` must be the map's key and value types, plain data valid for any bytes.
pub unsafe fn lookup_one<K: Copy, V: Copy>(fd: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut value = MaybeUninit::<V>::uninit();
    let mut attr = ElemAttr {
        map_fd: map_fd(fd),
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        ..ElemAttr::default()
    };
    match bpf(cmd::MAP_LOOKUP_ELEM, &mut attr).map(drop) {
        // SAFETY: the kernel wrote the value.
        Ok(()) => Ok(Some(unsafe { value.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `key`'s value.
///
/// # Safety
/// `K` and `V` must be the map's key and value types.
pub unsafe fn update_one<K: Copy, V: Copy>(
    fd: BorrowedFd<'_>,
    key: &K,
    value: &V,
) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map_fd(fd),
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_ref(value) as u64,
        ..ElemAttr::default()
    };
    bpf(cmd::MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Deletes `key`; `false` when it was already gone.
///
/// # Safety
/// `K` must be the map's key type.
pub unsafe fn delete_one<K: Copy>(fd: BorrowedFd<'_>, key: &K) -> io::Result<bool> {
    let mut attr = ElemAttr {
        map_fd: map_fd(fd),
        key: std::ptr::from_ref(key) as u64,
        ..ElemAttr::default()
    };
    match bpf(cmd::MAP_DELETE_ELEM, &mut attr).map(drop) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

fn map_fd(fd: BorrowedFd<'_>) -> u32 {
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

/// Calls `f` with every (key, value) of a hash map, `chunk` entries per syscall.
///
/// # Safety
/// `K` and `V` must be the map's key and value types, plain data valid for any bytes.
pub unsafe fn lookup_all<K: Copy, V: Copy>(
    fd: BorrowedFd<'_>,
    chunk: usize,
    mut f: impl FnMut(&K, &V),
) -> io::Result<()> {
    let mut chunk = chunk.max(1);
    let mut keys: Vec<MaybeUninit<K>> = Vec::new();
    let mut values: Vec<MaybeUninit<V>> = Vec::new();
    // The hash map's batch token is a bucket index; room for a u64 either way.
    let mut token_in = 0u64;
    let mut token_out = 0u64;
    let mut first = true;
    loop {
        keys.resize_with(chunk, MaybeUninit::uninit);
        values.resize_with(chunk, MaybeUninit::uninit);
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::from_mut(&mut token_in) as u64
            },
            out_batch: std::ptr::from_mut(&mut token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(chunk).unwrap_or(u32::MAX),
            map_fd: map_fd(fd),
            ..BatchAttr::default()
        };
        let result = bpf(cmd::MAP_LOOKUP_BATCH, &mut attr).map(drop);
        let done = match &result {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            // One bucket holds more entries than the buffer: grow it and ask again.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                chunk *= 2;
                continue;
            }
            Err(_) => return result,
        };
        let n = (attr.count as usize).min(chunk);
        for i in 0..n {
            // SAFETY: the kernel wrote `n` keys and values; the caller vouches for the types.
            unsafe { f(keys[i].assume_init_ref(), values[i].assume_init_ref()) };
        }
        if done {
            return Ok(());
        }
        token_in = token_out;
        first = false;
    }
}
