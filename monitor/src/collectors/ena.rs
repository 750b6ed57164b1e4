//! The ENA driver's allowance counters, and the connection-tracking allowance
//! utilization they and the flow table's estimate give together.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, PoisonError},
};

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

/// Counters kept monotonic across driver resets: a value below the last one read
/// (a reset, or a read that returned zeros) carries the last one forward.
#[derive(Debug, Default)]
pub struct Monotonic {
    /// (last raw value, carried) by key.
    seen: HashMap<(u32, &'static str), (u64, u64)>,
}

impl Monotonic {
    pub fn update(&mut self, ifindex: u32, stat: &'static str, raw: u64) -> u64 {
        let (last, carried) = self.seen.entry((ifindex, stat)).or_insert((raw, 0));
        if raw < *last {
            *carried += *last;
        }
        *last = raw;
        *carried + raw
    }

    /// Forgets devices no longer monitored.
    pub fn retain(&mut self, keep: impl Fn(u32) -> bool) {
        self.seen.retain(|(i, _), _| keep(*i));
    }
}

#[derive(Debug)]
pub struct EnaCollector {
    pub devices: Devices,
    pub flows: FlowCounts,
    /// `--conntrack-allowance`, for devices whose driver reports no allowance.
    pub allowance: Option<u64>,
    pub monotonic: Mutex<Monotonic>,
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
        {
            let mut mono = self
                .monotonic
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            mono.retain(|i| devices.contains_key(&i));
            for d in devices.values() {
                let stats: BTreeMap<String, u64> = ethtool::stats(&d.name).unwrap_or_default();
                let labels = || [("device", d.name.clone()), ("eni", d.eni.clone())];
                let avail = stats.get(AVAILABLE).copied();
                if let Some(a) = avail {
                    available.push((labels(), i64::try_from(a).unwrap_or(i64::MAX)));
                }
                for (stat, allowance) in EXCEEDED {
                    if let Some(&raw) = stats.get(stat) {
                        let [dev, eni] = labels();
                        exceeded.push((
                            [dev, eni, ("allowance", allowance.to_owned())],
                            mono.update(d.ifindex, stat, raw),
                        ));
                    }
                }
                if let Some(r) = estimate.and_then(|e| utilization(e, avail, self.allowance)) {
                    ratios.push((labels(), r));
                }
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
            "Packets the hypervisor queued or dropped because an allowance was exceeded (ENA driver), monotonic across driver resets.",
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
    fn counters_stay_monotonic_across_a_driver_reset() {
        let strings = fixture("gstrings.bin");
        let before = ethtool::parse(&strings, &u64s(&fixture("gstats-1.bin")));
        let after = ethtool::parse(&strings, &u64s(&fixture("gstats-2-after-reset.bin")));
        let mut m = Monotonic::default();
        let ct = "conntrack_allowance_exceeded";
        assert_eq!(m.update(2, ct, before[ct]), 12);
        // The driver reset: 2 new exceedances since, on top of the 12 before.
        assert_eq!(m.update(2, ct, after[ct]), 14);
        assert_eq!(m.update(2, ct, after[ct] + 1), 15);
        let ll = "linklocal_allowance_exceeded";
        assert_eq!(m.update(2, ll, before[ll]), 3);
        assert_eq!(m.update(2, ll, after[ll]), 3);
        // A read of zeros, then the real value again: never backwards.
        assert_eq!(m.update(2, ll, 0), 3);
        assert_eq!(m.update(2, ll, 2), 5);
        // Devices are independent, and forgotten when they go.
        assert_eq!(m.update(3, ct, 1), 1);
        m.retain(|i| i == 3);
        assert_eq!(m.update(2, ct, 0), 0);
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
