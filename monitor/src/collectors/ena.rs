//! The ENA driver's allowance counters, and the instance's connection-tracking
//! allowance and its utilization (the model in `model.rs`).

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::{encode_counters, encode_gauges, flows::FlowCounts};
use crate::{devices::Devices, ethtool, model::Allowance};

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
    /// The instance's allowance: `--conntrack-allowance`, or learned from the driver.
    pub allowance: Mutex<Allowance>,
}

impl Collector for EnaCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let devices = self.devices.snapshot();
        let estimate = self.flows.get().map(|p| p.total(&devices));
        let mut available = Vec::new();
        let mut exceeded = Vec::new();
        let mut instance_available: Option<u64> = None;
        for d in devices.values() {
            let stats: BTreeMap<String, u64> = ethtool::stats(&d.name).unwrap_or_default();
            let device = || ("device", d.name.clone());
            if let Some(&a) = stats.get(AVAILABLE) {
                available.push(([device()], i64::try_from(a).unwrap_or(i64::MAX)));
                // Every ENI reports the instance's figure; the lowest is the latest.
                instance_available = Some(instance_available.map_or(a, |m| m.min(a)));
            }
            // As the driver reads them: a driver reset is an ordinary counter reset, which
            // rate() and increase() already handle; an offset kept in the agent would
            // not survive the agent.
            for (stat, allowance) in EXCEEDED {
                if let Some(&raw) = stats.get(stat) {
                    exceeded.push(([device(), ("allowance", allowance.to_owned())], raw));
                }
            }
        }
        let assessment = self
            .allowance
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .assess(estimate, instance_available);
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
            "conntrack_allowance",
            "The instance's connection-tracking allowance used for the ratio: from --conntrack-allowance (flag) or learned from the ENA driver (learned).",
            assessment.map(|x| {
                (
                    [("source", x.source.label().to_owned())],
                    i64::try_from(x.allowance).unwrap_or(i64::MAX),
                )
            }),
        )?;
        let none: [(&'static str, String); 0] = [];
        encode_gauges(
            &mut encoder,
            "conntrack_allowance_utilization_ratio",
            "Instance-wide tracked connections over the connection-tracking allowance.",
            assessment.map(|x| (none, x.utilization)),
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
}
