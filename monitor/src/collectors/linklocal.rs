//! Packets to EC2's link-local services per ENI, and the busiest second of the last minute.

use std::collections::BTreeMap;

use monitor_common::{LL_DNS, LL_IMDS, LL_NTP, LL_WINDOW, LinkLocalSecond};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::{dns::monotonic_ns, encode_counters, encode_gauges};
use crate::{devices::Devices, slots::SlotArray};

pub struct LinkLocalCollector {
    /// Packets per (slot, service).
    pub packets: SlotArray<u64>,
    /// Per-second counts per (slot, second in the window).
    pub seconds: SlotArray<LinkLocalSecond>,
    pub devices: Devices,
}

impl std::fmt::Debug for LinkLocalCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkLocalCollector").finish_non_exhaustive()
    }
}

/// The highest per-second total in `(now - window, now]`, summing CPUs per second.
pub fn peak(slots: impl IntoIterator<Item = LinkLocalSecond>, now_second: u64) -> u64 {
    let oldest = now_second.saturating_sub(u64::from(LL_WINDOW) - 1);
    let mut per_second: BTreeMap<u64, u64> = BTreeMap::new();
    for s in slots {
        let second = u64::from(s.second);
        if s.packets > 0 && (oldest..=now_second).contains(&second) {
            *per_second.entry(second).or_default() += u64::from(s.packets);
        }
    }
    per_second.into_values().max().unwrap_or(0)
}

impl Collector for LinkLocalCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let devices = self.devices.snapshot();
        let now_second = monotonic_ns() / 1_000_000_000;
        let mut totals = Vec::new();
        let mut peaks = Vec::new();
        for d in devices.values() {
            for (service, name) in [(LL_DNS, "dns"), (LL_IMDS, "imds"), (LL_NTP, "ntp")] {
                let n = self.packets.get(d.slot, service).iter().sum();
                totals.push((
                    [("device", d.name.clone()), ("service", name.to_owned())],
                    n,
                ));
            }
            let slots = (0..LL_WINDOW).flat_map(|i| self.seconds.get(d.slot, i));
            let p = i64::try_from(peak(slots, now_second)).unwrap_or(i64::MAX);
            peaks.push(([("device", d.name.clone())], p));
        }
        encode_counters(
            &mut encoder,
            "linklocal_packets",
            "Packets sent to EC2 link-local services (resolver, IMDS, time sync).",
            totals,
        )?;
        encode_gauges(
            &mut encoder,
            "linklocal_peak_packets_per_second",
            "Highest count of packets to link-local services in any one second of the last minute (EC2 allows 1024).",
            peaks,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(second: u32, packets: u32) -> LinkLocalSecond {
        LinkLocalSecond { second, packets }
    }

    #[test]
    fn peak_sums_cpus_per_second_inside_the_window() {
        // Two CPUs counted second 100; second 30 is older than the window.
        let slots = [s(100, 300), s(100, 450), s(99, 600), s(30, 5000), s(0, 0)];
        assert_eq!(peak(slots, 100), 750);
        assert_eq!(peak(slots, 158), 750);
        assert_eq!(peak(slots, 159), 750);
        assert_eq!(peak(slots, 160), 0);
        assert_eq!(peak([], 100), 0);
    }
}
