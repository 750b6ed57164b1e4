//! What a client's queries in flight count in.

use aya_ebpf::{macros::map, maps::Array};
use monitor_common::{DNS_CLIENT_BUCKETS, DNS_CLIENT_SHARE, dns_client_bucket};

use crate::{kernel::layout, maps::BPF_F_MMAPABLE, probes::dns::KeyWords};

/// Queries in flight per client (its address hashed to a bucket), counted by the agent's
/// sweep in its walk of the table every pass (at most a second old): the programs only
/// read them. A client holding its share of the table takes no more room, and a full set
/// makes room from the client holding the most. Counting them here too would cost a map
/// update on every query and answer, and branches the verifier walks on every path
/// after them (6.1 under emulation then took minutes to load the classifiers). Whole words: an array's elements
/// are 8 bytes apart in the memory the agent maps, whatever their size.
#[map]
static DNS_CLIENTS: Array<u64> = Array::with_max_entries(DNS_CLIENT_BUCKETS, BPF_F_MMAPABLE);

/// The bucket of the client of `key`.
#[inline(always)]
pub fn of(key: &KeyWords) -> u32 {
    dns_client_bucket([key[0], key[1], key[2], key[3]], layout::dns_set_key())
}

/// Queries in flight of the clients of `bucket`.
#[inline(always)]
pub fn held(bucket: u32) -> u64 {
    DNS_CLIENTS
        .get_ptr(bucket)
        // SAFETY: a word of a map value the kernel keeps for the program's run.
        .map_or(0, |n| unsafe { core::ptr::read_volatile(n) })
}

/// Whether `held` queries are a client's whole share of a table of `room`.
#[inline(always)]
pub fn at_share(held: u64, room: u32) -> bool {
    held >= u64::from(room / DNS_CLIENT_SHARE)
}
