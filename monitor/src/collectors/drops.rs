//! Kernel drops from the `skb:kfree_skb` program's `DROPS` map.

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
    time::Instant,
};

use aya::maps::{MapData, PerCpuHashMap};
use log::warn;
use monitor_common::{DEVICE_OTHER, DropKey};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::{Metric, encode_counters};
use crate::{
    devices::{Departed, Device, Devices},
    kernel::DropReasons,
};

const DROPS: Metric = Metric {
    name: "drops",
    help: "Packets the kernel dropped, by device and the kernel's drop reason (NOT_SPECIFIED excluded).",
};
const DNS_DROPS: Metric = Metric {
    name: "dns_drops",
    help: "DNS packets (port 53, UDP or TCP) the kernel dropped, by device and the kernel's drop reason.",
};

pub struct DropsCollector {
    /// Written here only to delete the keys of devices gone (`departed`).
    pub map: Mutex<PerCpuHashMap<MapData, DropKey, u64>>,
    pub devices: Devices,
    pub departed: Departed,
    pub reasons: DropReasons,
}

impl std::fmt::Debug for DropsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DropsCollector").finish_non_exhaustive()
    }
}

/// Drop counts folded into the exported label sets.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DropTotals {
    /// (device, reason) -> all drops.
    pub all: BTreeMap<(String, String), u64>,
    /// (device, reason) -> DNS drops.
    pub dns: BTreeMap<(String, String), u64>,
}

impl DropTotals {
    /// Folds per-key counts into label sets. Keys of devices not `counted` (gone a
    /// while, or before this agent) are left out: their series went with them.
    pub fn fold(
        entries: impl IntoIterator<Item = (DropKey, u64)>,
        counted: &BTreeMap<u32, Device>,
        reasons: &DropReasons,
    ) -> Self {
        let devices = counted;
        let mut totals = Self::default();
        for (key, count) in entries {
            let device = match devices.get(&key.ifindex) {
                Some(d) if key.ifindex != DEVICE_OTHER => d.name.clone(),
                // A device that went away takes its series with it.
                Some(_) | None if key.ifindex != DEVICE_OTHER => continue,
                _ => "other".to_owned(),
            };
            let reason = reasons.name(key.reason).to_owned();
            *totals
                .all
                .entry((device.clone(), reason.clone()))
                .or_default() += count;
            if key.dns != 0 {
                *totals.dns.entry((device, reason)).or_default() += count;
            }
        }
        totals
    }
}

impl Collector for DropsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let entries: Vec<(DropKey, u64)> = map
            .iter()
            .filter_map(|entry| match entry {
                Ok((key, per_cpu)) => Some((key, per_cpu.iter().sum::<u64>())),
                Err(e) => {
                    warn!("reading the drops map: {e}");
                    None
                }
            })
            .collect();
        let due = self.departed.due(
            entries.iter().map(|(k, _)| k.ifindex),
            &self.devices.snapshot(),
            Instant::now(),
        );
        for (key, _) in entries.iter().filter(|(k, _)| due.contains(&k.ifindex)) {
            if let Err(e) = map.remove(key) {
                warn!("deleting the drops of a device gone: {e}");
            }
        }
        drop(map);
        let counted = self.devices.counted(Instant::now());
        let totals = DropTotals::fold(entries, &counted, &self.reasons);
        encode_counters(
            &mut encoder,
            &DROPS,
            totals
                .all
                .into_iter()
                .map(|((device, reason), v)| ([("device", device), ("reason", reason)], v)),
        )?;
        encode_counters(
            &mut encoder,
            &DNS_DROPS,
            totals
                .dns
                .into_iter()
                .map(|((device, reason), v)| ([("device", device), ("reason", reason)], v)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::btf::tests::fixture;

    #[test]
    fn folds_keys_into_bounded_label_sets() {
        let reasons = DropReasons::from_btf(&fixture()).unwrap();
        let devices = Devices::default();
        devices.replace([Device {
            name: "eth0".into(),
            ifindex: 2,
            eni: "eni-0abc".into(),
            mac: String::new(),
            slot: 0,
        }]);
        let key = |ifindex, reason, dns| DropKey {
            ifindex,
            reason,
            dns,
            pad: 0,
        };
        let totals = DropTotals::fold(
            [
                (key(2, 3, 0), 5),
                (key(2, 3, 1), 2),
                (key(0, 3, 1), 7),
                // A device no longer monitored is left out.
                (key(9, 3, 1), 1),
                (key(2, 12, 0), 4),
            ],
            &devices.counted(Instant::now()),
            &reasons,
        );
        let all: Vec<_> = totals
            .all
            .iter()
            .map(|((d, r), v)| (d.as_str(), r.as_str(), *v))
            .collect();
        assert_eq!(
            all,
            [
                ("eth0", "NETFILTER_DROP", 4),
                ("eth0", "NO_SOCKET", 7),
                ("other", "NO_SOCKET", 7)
            ]
        );
        let dns: Vec<_> = totals
            .dns
            .iter()
            .map(|((d, r), v)| (d.as_str(), r.as_str(), *v))
            .collect();
        assert_eq!(dns, [("eth0", "NO_SOCKET", 2), ("other", "NO_SOCKET", 7)]);
    }
}
