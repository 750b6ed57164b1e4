//! Self-description: build info, which programs are attached where, the monitored
//! devices and what they are, the kernel maps' memory, and kernel maps that refused an
//! update because they were full.

use aya::maps::{MapData, PerCpuArray};
use monitor_common::MapFull;
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::{Metric, NO_LABELS, encode_counters, encode_gauges};
use crate::{devices::Devices, loader::Attachments};

const BUILD_INFO: Metric = Metric {
    name: "build_info",
    help: "The agent's version; always 1.",
};
const PROGRAM_ATTACHED: Metric = Metric {
    name: "program_attached",
    help: "1 when the eBPF program is attached to its hook, 0 when attaching failed.",
};
const DEVICE_INFO: Metric = Metric {
    name: "device_info",
    help: "A monitored device: its ENI id (empty until IMDS answers) and MAC; always 1.",
};
const KERNEL_MAP_MEMORY: Metric = Metric {
    name: "kernel_map_memory_bytes",
    help: "Kernel memory of the agent's eBPF maps, charged to its memory cgroup (memlock; the memory in use on 6.4 and later).",
};
const MAP_FULL: Metric = Metric {
    name: "map_full",
    help: "Updates a kernel map refused because it was full: counts lost, not silently.",
};

/// The memory of every map this process holds, from each map fd's `memlock`.
pub fn map_memory() -> std::io::Result<i64> {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target.as_os_str() != "anon_inode:bpf-map" {
            continue;
        }
        let info = std::path::Path::new("/proc/self/fdinfo").join(entry.file_name());
        let Ok(text) = std::fs::read_to_string(info) else {
            continue;
        };
        total += text
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

pub struct AgentCollector {
    pub attachments: Attachments,
    pub devices: Devices,
    pub map_full: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCollector").finish_non_exhaustive()
    }
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode_gauges(
            &mut encoder,
            &BUILD_INFO,
            [([("version", env!("CARGO_PKG_VERSION").to_owned())], 1i64)],
        )?;
        encode_gauges(
            &mut encoder,
            &PROGRAM_ATTACHED,
            self.attachments.snapshot().into_iter().map(|a| {
                (
                    [
                        ("program", a.program.to_owned()),
                        ("hook", a.hook),
                        ("device", a.device),
                    ],
                    i64::from(a.attached),
                )
            }),
        )?;
        // Facts learned later (the ENI id from IMDS) live here, not on every series:
        // queries join on `device`, and no series changes its labels.
        encode_gauges(
            &mut encoder,
            &DEVICE_INFO,
            self.devices
                .snapshot()
                .into_values()
                .map(|d| ([("device", d.name), ("eni", d.eni), ("mac", d.mac)], 1i64)),
        )?;
        encode_gauges(
            &mut encoder,
            &KERNEL_MAP_MEMORY,
            [(NO_LABELS, map_memory().unwrap_or(0))],
        )?;
        encode_counters(
            &mut encoder,
            &MAP_FULL,
            MapFull::ALL.iter().map(|m| {
                let n = self
                    .map_full
                    .get(&(*m as u32), 0)
                    .map_or(0, |v| v.iter().sum());
                ([("map", m.label().to_owned())], n)
            }),
        )
    }
}
