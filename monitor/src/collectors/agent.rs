//! Self-description: build info, which programs are attached where, the monitored
//! devices and what they are, and kernel maps that refused an update because they were
//! full.

use std::sync::{Arc, RwLock};

use aya::maps::{MapData, PerCpuArray};
use monitor_common::MAP_FULL_MAPS;
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::{encode_counters, encode_gauges};
use crate::devices::Devices;

/// One program attachment the agent tried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub program: &'static str,
    pub hook: String,
    /// The device for per-device hooks, empty for tracepoints.
    pub device: String,
    pub attached: bool,
}

/// Attachments, shared between the loader and the collector.
#[derive(Clone, Debug, Default)]
pub struct Attachments(Arc<RwLock<Vec<Attachment>>>);

impl Attachments {
    pub fn record(&self, attachment: Attachment) {
        let mut all = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        all.retain(|a| !(a.program == attachment.program && a.device == attachment.device));
        all.push(attachment);
    }

    /// Forgets every attachment on `device`.
    pub fn forget_device(&self, device: &str) {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|a| a.device != device);
    }

    pub fn snapshot(&self) -> Vec<Attachment> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

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
            "build_info",
            "The agent's version; always 1.",
            [([("version", env!("CARGO_PKG_VERSION").to_owned())], 1i64)],
        )?;
        encode_gauges(
            &mut encoder,
            "program_attached",
            "1 when the eBPF program is attached to its hook, 0 when attaching failed.",
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
            "device_info",
            "A monitored device: its ENI id (empty until IMDS answers) and MAC; always 1.",
            self.devices
                .snapshot()
                .into_values()
                .map(|d| ([("device", d.name), ("eni", d.eni), ("mac", d.mac)], 1i64)),
        )?;
        encode_gauges(
            &mut encoder,
            "kernel_map_memory_bytes",
            "Kernel memory of the agent's eBPF maps, charged to its memory cgroup (memlock; the memory in use on 6.4 and later).",
            [([] as [(&'static str, String); 0], map_memory().unwrap_or(0))],
        )?;
        encode_counters(
            &mut encoder,
            "map_full",
            "Updates a kernel map refused because it was full: counts lost, not silently.",
            MAP_FULL_MAPS.iter().zip(0u32..).map(|(name, i)| {
                let n = self.map_full.get(&i, 0).map_or(0, |v| v.iter().sum());
                ([("map", (*name).to_owned())], n)
            }),
        )
    }
}
