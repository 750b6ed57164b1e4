//! Packets to EC2's link-local services per ENI, the busiest second of the last minute,
//! and who sent that second's packets.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use monitor_common::{LL_WINDOW, LinkLocalSecond, LinkLocalService};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::{Metric, encode_counters, encode_gauges, gauge};
use crate::{
    devices::Devices,
    housekeeping::monotonic_ns,
    model::linklocal::{Senders, per_second},
    tables::slots::SlotArray,
};

const LINKLOCAL_PACKETS: Metric = Metric {
    name: "linklocal_packets",
    help: "Packets sent to EC2 link-local services (resolver, IMDS, time sync).",
};
const LINKLOCAL_PEAK: Metric = Metric {
    name: "linklocal_peak_packets_per_second",
    help: "Highest count of packets to link-local services in any one second of the last minute (EC2 allows 1024).",
};

const TOP_LINKLOCAL_SENDERS: Metric = Metric {
    name: "top_linklocal_senders",
    help: "Packets to link-local services of the busiest local addresses (the --top of them) in the ENI's busiest ended second of the last minute, by service (join kube_pod_info on pod_ip for the pod).",
};

pub struct LinkLocalCollector {
    /// Packets per (slot, service).
    pub packets: SlotArray<u64>,
    /// Per-second counts per (slot, second in the window).
    pub seconds: SlotArray<LinkLocalSecond>,
    /// Who sent, each second.
    pub senders: Arc<Mutex<Senders>>,
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
        let mut top = Vec::new();
        let senders = self.senders.lock().unwrap_or_else(PoisonError::into_inner);
        for d in self.devices.snapshot().values() {
            let slots = (0..LL_WINDOW).flat_map(|i| self.seconds.get(d.slot, i));
            let seconds = per_second(slots, now_second);
            let peak = seconds.values().max().copied().unwrap_or(0);
            peaks.push(([("device", d.name.clone())], gauge(peak)));
            for s in senders.busiest(d.slot, &seconds) {
                top.push((
                    [
                        ("device", d.name.clone()),
                        ("address", s.addr.to_string()),
                        ("service", s.service.label().to_owned()),
                    ],
                    gauge(s.packets),
                ));
            }
        }
        drop(senders);
        encode_counters(&mut encoder, &LINKLOCAL_PACKETS, totals)?;
        encode_gauges(&mut encoder, &LINKLOCAL_PEAK, peaks)?;
        encode_gauges(&mut encoder, &TOP_LINKLOCAL_SENDERS, top)
    }
}
