//! Maps and map helpers more than one probe family uses.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
};
use monitor_common::{ADDRS_MAX_ENTRIES, Addr, AddrInfo, MAX_DEVICES, MapFull};

/// `BPF_NOEXIST`: insert only a key not yet in the map.
pub const BPF_NOEXIST: u64 = 1;
/// `BPF_F_MMAPABLE`: an array the agent maps into its memory, and reads and claims in
/// place.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// `-EEXIST`: the key was already there.
pub const EEXIST: i32 = -17;

/// Monitored devices: interface index (in the agent's namespace) to a slot below
/// `MAX_DEVICES`, which indexes the per-device arrays.
#[map]
pub static MONITORED: HashMap<u32, u32> = HashMap::with_max_entries(MAX_DEVICES, 0);

/// The keys of the programs' hashes (`HASH_KEY_*`: the DNS query's set in `DNS_PENDING`,
/// the flow's set in `FLOW_SETS`), kept by the agent beside the tables they key so that a
/// restarted agent finds what it left in them. The programs read them as globals.
#[map]
static HASH_KEYS: Array<u32> = Array::with_max_entries(monitor_common::HASH_KEYS, 0);

/// What the agent told the programs of an address: the link-local service it is (EC2's
/// services, VPC+2 resolvers) and the resolver slot it counts under.
#[map]
static ADDRS: HashMap<Addr, AddrInfo> = HashMap::with_max_entries(ADDRS_MAX_ENTRIES, 0);

/// What the agent told the programs of `addr`, if anything.
#[inline(always)]
pub fn addr_info(addr: &Addr) -> Option<AddrInfo> {
    // SAFETY: a read of a map value the kernel keeps alive for the program's run.
    unsafe { ADDRS.get(addr) }.copied()
}

/// Updates refused because a map was full, per CPU, by [`MapFull`] index: nothing
/// fills up silently.
#[map]
static MAP_FULL: PerCpuArray<u64> = PerCpuArray::with_max_entries(MapFull::COUNT, 0);

/// The slot of a monitored device.
#[inline(always)]
pub fn slot(ifindex: u32) -> Option<u32> {
    // SAFETY: a read of a map value the kernel keeps alive for the program's run.
    unsafe { MONITORED.get(&ifindex) }.copied()
}

/// Adds one to entry `index` of this CPU's copy of a per-CPU array.
#[inline(always)]
pub fn bump(array: &PerCpuArray<u64>, index: u32) {
    if let Some(n) = array.get_ptr_mut(index) {
        // SAFETY: this CPU's own slot of a per-CPU array; programs on one CPU do not
        // interleave.
        unsafe { *n += 1 };
    }
}

/// Counts one refused insert into `map`.
#[inline(always)]
pub fn map_full(map: MapFull) {
    bump(&MAP_FULL, map as u32);
}

/// Adds one to `key`'s count in a per-CPU counter map. The value is this CPU's own, so
/// a plain add is exact; a full map drops the new key, losing the count rather than
/// putting it under another key, and counts the loss in `MAP_FULL`.
#[inline(always)]
pub fn increment<K>(map: &PerCpuHashMap<K, u64>, key: &K, full: MapFull) {
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
