//! The `top_*` series: the busiest addresses of each device.

use std::{collections::BTreeMap, net::IpAddr};

use monitor_common::{Addr, addr_to_ip};

/// The `top` addresses of each device by count, most first, ties by address so that the
/// set is stable from one reading to the next.
pub fn top_per_device(
    counts: impl IntoIterator<Item = ((u32, Addr), u64)>,
    top: usize,
) -> BTreeMap<u32, Vec<(IpAddr, u64)>> {
    let mut out: BTreeMap<u32, Vec<(IpAddr, u64)>> = BTreeMap::new();
    for ((ifindex, addr), n) in counts {
        out.entry(ifindex).or_default().push((addr_to_ip(addr), n));
    }
    for ranked in out.values_mut() {
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked.truncate(top);
    }
    out
}
