//! Maps more than one probe family uses.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuHashMap},
};
use monitor_common::MAX_DEVICES;

/// Monitored devices: interface index (in the agent's namespace) to a slot below
/// `MAX_DEVICES`, which indexes the per-device arrays.
#[map]
pub static MONITORED: HashMap<u32, u32> = HashMap::with_max_entries(MAX_DEVICES, 0);

/// Adds one to `key`'s count in a per-CPU counter map. The value is this CPU's own, so
/// a plain add is exact; a full map drops the new key, losing the count rather than
/// putting it under another key.
#[inline(always)]
pub fn increment<K>(map: &PerCpuHashMap<K, u64>, key: &K) {
    match map.get_ptr_mut(key) {
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = map.insert(key, &1, 0);
        }
    }
}
