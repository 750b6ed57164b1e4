//! Maps more than one probe family uses.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
};
use monitor_common::{MAP_FULL_MAPS, MAX_DEVICES};

/// Monitored devices: interface index (in the agent's namespace) to a slot below
/// `MAX_DEVICES`, which indexes the per-device arrays.
#[map]
pub static MONITORED: HashMap<u32, u32> = HashMap::with_max_entries(MAX_DEVICES, 0);

/// Updates refused because a map was full, per CPU, by `MAP_FULL_*` index: nothing
/// fills up silently.
#[map]
static MAP_FULL: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAP_FULL_MAPS.len() as u32, 0);

/// Counts one refused insert into map `index` (a `MAP_FULL_*`).
#[inline(always)]
pub fn map_full(index: u32) {
    if let Some(n) = MAP_FULL.get_ptr_mut(index) {
        // SAFETY: this CPU's own slot of a per-CPU array.
        unsafe { *n += 1 };
    }
}

/// Adds one to `key`'s count in a per-CPU counter map. The value is this CPU's own, so
/// a plain add is exact; a full map drops the new key, losing the count rather than
/// putting it under another key, and counts the loss in `MAP_FULL[full]`.
#[inline(always)]
pub fn increment<K>(map: &PerCpuHashMap<K, u64>, key: &K, full: u32) {
    match map.get_ptr_mut(key) {
        // SAFETY: this CPU's own value.
        Some(n) => unsafe { *n += 1 },
        None => {
            if map.insert(key, &1, 0).is_err() {
                map_full(full);
            }
        }
    }
}
