//! Packets to EC2's link-local services per ENI, and the busiest second of the last minute.

use std::time::Instant;

use monitor_common::{LL_WINDOW, LinkLocalSecond, LinkLocalService};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::{Metric, encode_counters, encode_gauges, gauge};
use crate::{
    devices::Devices, housekeeping::monotonic_ns, loader::slots::SlotArray, model::linklocal::peak,
};

const LINKLOCAL_PACKETS: Metric = Metric {
    name: "linklocal_packets",
    help: "Packets sent to EC2 link-local services (resolver, IMDS, time sync).",
};
const LINKLOCAL_PEAK: Metric = Metric {
    name: "linklocal_peak_packets_per_second",
    help: "Highest count of packets to link-local services in any one second of the last minute (EC2 allows 1024).",
};

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

impl Collector for LinkLocalCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now_second = monotonic_ns() / 1_000_000_000;
        let mut totals = Vec::new();
        for d in self.devices.counted(Instant::now()).values() {
            for service in LinkLocalService::ALL {
                let n = self.packets.get(d.slot, *service as u32).iter().sum();
                totals.push((
                    [
                        ("device", d.name.clone()),
                        ("service", service.label().to_owned()),
                    ],
                    n,
                ));
            }
        }
        let mut peaks = Vec::new();
        for d in self.devices.snapshot().values() {
            let slots = (0..LL_WINDOW).flat_map(|i| self.seconds.get(d.slot, i));
            peaks.push(([("device", d.name.clone())], gauge(peak(slots, now_second))));
        }
        encode_counters(&mut encoder, &LINKLOCAL_PACKETS, totals)?;
        encode_gauges(&mut encoder, &LINKLOCAL_PEAK, peaks)
    }
}
