//! Maps more than one probe family uses.

use aya_ebpf::{macros::map, maps::HashMap};
use monitor_common::MAX_DEVICES;

/// Monitored devices: interface index (in the agent's namespace) to a slot below
/// `MAX_DEVICES`, which indexes the per-device arrays.
#[map]
pub static MONITORED: HashMap<u32, u32> = HashMap::with_max_entries(MAX_DEVICES, 0);
