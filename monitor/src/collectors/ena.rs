//! The ENA driver's allowance counters, and the connection-tracking allowance
//! utilization they and the flow table's estimate give together.

use std::collections::BTreeMap;

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::{encode_counters, encode_gauges, flows::FlowCounts};
use crate::{devices::Devices, ethtool};

/// The ENA statistics exported as `allowance` counters.
pub const EXCEEDED: [(&str, &str); 5] = [
    ("bw_in_allowance_exceeded", "bw_in"),
    ("bw_out_allowance_exceeded", "bw_out"),
    ("pps_allowance_exceeded", "pps"),
    ("conntrack_allowance_exceeded", "conntrack"),
    ("linklocal_allowance_exceeded", "linklocal"),
];
pub const AVAILABLE: &str = "conntrack_allowance_available";

#[derive(Debug)]
pub struct EnaCollector {
    pub devices: Devices,
    pub flows: FlowCounts,
    /// `--conntrack-allowance`, for devices whose driver reports no allowance.
    pub allowance: Option<u64>,
}

/// In-use over allowance. The allowance is instance-wide, so the estimate is too: the
/// tracked flows of every monitored ENI.
pub fn utilization(estimate: u64, available: Option<u64>, configured: Option<u64>) -> Option<f64> {
    let allowance = match available {
        Some(a) => a.checked_add(estimate)?,
        None => configured?,
    };
    #[expect(clippy::cast_precision_loss, reason = "flow counts are far below 2^52")]
    (allowance > 0).then(|| estimate as f64 / allowance as f64)
}

impl Collector for EnaCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let devices = self.devices.snapshot();
        let estimate = self.flows.get().map(|p| p.total(&devices));
        let mut available = Vec::new();
        let mut exceeded = Vec::new();
        let mut ratios = Vec::new();
        for d in devices.values() {
            let stats: BTreeMap<String, u64> = ethtool::stats(&d.name).unwrap_or_default();
            let device = || ("device", d.name.clone());
            let avail = stats.get(AVAILABLE).copied();
            if let Some(a) = avail {
                available.push(([device()], i64::try_from(a).unwrap_or(i64::MAX)));
            }
            // As the driver reads them: a driver reset is an ordinary counter reset, which
            // rate() and increase() already handle; an offset kept in the agent would
            // not survive the agent.
            for (stat, allowance) in EXCEEDED {
                if let Some(&raw) = stats.get(stat) {
                    exceeded.push(([device(), ("allowance", allowance.to_owned())], raw));
                }
            }
            if let Some(r) = estimate.and_then(|e| utilization(e, avail, self.allowance)) {
                ratios.push(([device()], r));
            }
        }
        encode_gauges(
            &mut encoder,
            "ena_conntrack_allowance_available",
            "Connections the instance can still track before its allowance is exceeded (ENA driver).",
            available,
        )?;
        encode_counters(
            &mut encoder,
            "ena_allowance_exceeded",
            "Packets the hypervisor queued or dropped because an allowance was exceeded (ENA driver), as the driver counts them.",
            exceeded,
        )?;
        encode_gauges(
            &mut encoder,
            "conntrack_allowance_utilization_ratio",
            "Estimated tracked connections over the instance's connection-tracking allowance.",
            ratios,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ethtool::tests::{fixture, u64s};

    #[test]
    fn exceeded_counters_are_exported_as_the_driver_reads_them() {
        let strings = fixture("gstrings.bin");
        let before = ethtool::parse(&strings, &u64s(&fixture("gstats-1.bin")));
        let after = ethtool::parse(&strings, &u64s(&fixture("gstats-2-after-reset.bin")));
        assert_eq!(before["conntrack_allowance_exceeded"], 12);
        assert_eq!(after["conntrack_allowance_exceeded"], 2);
        assert_eq!(before["linklocal_allowance_exceeded"], 3);
    }

    #[test]
    fn utilization_from_the_driver_or_the_flag() {
        assert_eq!(utilization(200, Some(800), None), Some(0.2));
        assert_eq!(utilization(200, Some(800), Some(100)), Some(0.2));
        assert_eq!(utilization(50, None, Some(100)), Some(0.5));
        assert_eq!(utilization(50, None, None), None);
        assert_eq!(utilization(0, Some(0), None), None);
    }
}
