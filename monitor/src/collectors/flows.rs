//! The EC2 tracking model's figures: flows tracked and how long they have been idle (from
//! the last expiry pass), flows created (from the classifiers), who owns the most, the
//! timeouts applied, and packets that found the table full.

use std::{collections::BTreeMap, time::Instant};

use aya::maps::{MapData, PerCpuArray};
use monitor_common::FlowClass;
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::{Metric, NO_LABELS, encode_counters, encode_gauges, gauge};
use crate::{
    devices::{Device, Devices},
    model::{
        flows::{FlowCounts, IDLE_BOUNDS, PassResult, TimeoutClass, Timeouts},
        instance::TcpEstablished,
    },
    tables::slots::SlotArray,
};

const TRACKED_FLOWS: Metric = Metric {
    name: "tracked_flows",
    help: "Flows crossing the ENI still inside EC2's tracking timeouts (estimate).",
};
const FLOWS_CREATED: Metric = Metric {
    name: "flows_created",
    help: "New flows seen on the ENI.",
};
const TOP_FLOW_OWNERS: Metric = Metric {
    name: "top_flow_owners",
    help: "Tracked flows of the busiest local addresses on the ENI (the --top of them; join kube_pod_info on pod_ip for the pod).",
};
const TRACKED_FLOWS_IDLE: Metric = Metric {
    name: "tracked_flows_idle",
    help: "Tracked flows idle less than le seconds, by the timeout they are under (cumulative, +Inf all of the class): +Inf minus le is what a timeout of le would free.",
};
const TRACKING_TIMEOUT: Metric = Metric {
    name: "tracking_timeout_seconds",
    help: "EC2's idle tracking timeout the model applies, by flow class (the flag's, else EC2's default for the instance type).",
};
const FLOW_TABLE_FULL: Metric = Metric {
    name: "flow_table_full",
    help: "Packets of flows that found the flow table full and were not tracked (the tracked estimate is then a lower bound).",
};

pub struct FlowsCollector {
    /// New flows per (slot, protocol class).
    pub created: SlotArray<u64>,
    pub table_full: PerCpuArray<MapData, u64>,
    pub counts: FlowCounts,
    pub devices: Devices,
    /// The timeouts of the model, TCP established's from `tcp_established`.
    pub timeouts: Timeouts,
    pub tcp_established: TcpEstablished,
}

impl std::fmt::Debug for FlowsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowsCollector").finish_non_exhaustive()
    }
}

/// The idle ages of the tracked flows of each device, cumulative at the bounds of each
/// timeout class.
fn idle(
    pass: &PassResult,
    devices: &BTreeMap<u32, Device>,
) -> Vec<([(&'static str, String); 3], i64)> {
    let mut idle = Vec::new();
    for d in devices.values() {
        for class in TimeoutClass::ALL {
            let ages = pass
                .idle
                .get(&(d.ifindex, class))
                .copied()
                .unwrap_or_default();
            let mut under = 0;
            for (i, n) in ages.iter().enumerate() {
                under += n;
                let le = match IDLE_BOUNDS.get(i) {
                    Some(b) if class.idle_bounds().contains(b) => b.to_string(),
                    Some(_) => continue,
                    None => "+Inf".to_owned(),
                };
                idle.push((
                    [
                        ("device", d.name.clone()),
                        ("class", class.label().to_owned()),
                        ("le", le),
                    ],
                    gauge(under),
                ));
            }
        }
    }
    idle
}

impl Collector for FlowsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let devices = self.devices.snapshot();
        let pass = self.counts.get();
        let labels = |d: &Device, class: &FlowClass| {
            [
                ("device", d.name.clone()),
                ("protocol", class.label().to_owned()),
            ]
        };
        let mut tracked = Vec::new();
        for d in devices.values() {
            for class in FlowClass::ALL {
                if let Some(p) = &pass {
                    let n = p.tracked.get(&(d.ifindex, *class)).copied().unwrap_or(0);
                    tracked.push((labels(d, class), gauge(n)));
                }
            }
        }
        let idle = pass.as_ref().map(|p| idle(p, &devices)).unwrap_or_default();
        let mut created = Vec::new();
        for d in self.devices.counted(Instant::now()).values() {
            for class in FlowClass::ALL {
                let n = self.created.get(d.slot, *class as u32).iter().sum();
                created.push((labels(d, class), n));
            }
        }
        encode_gauges(&mut encoder, &TRACKED_FLOWS, tracked)?;
        encode_gauges(&mut encoder, &TRACKED_FLOWS_IDLE, idle)?;
        encode_counters(&mut encoder, &FLOWS_CREATED, created)?;
        let mut owners = Vec::new();
        for d in devices.values() {
            for (addr, n) in pass
                .iter()
                .filter_map(|p| p.owners.get(&d.ifindex))
                .flatten()
            {
                owners.push((
                    [("device", d.name.clone()), ("address", addr.to_string())],
                    gauge(*n),
                ));
            }
        }
        encode_gauges(&mut encoder, &TOP_FLOW_OWNERS, owners)?;
        let timeouts = [
            ("tcp_established", self.tcp_established.get()),
            ("udp", self.timeouts.udp),
            ("udp_stream", self.timeouts.udp_stream),
        ]
        .map(|(class, t)| ([("class", class.to_owned())], gauge(t.as_secs())));
        encode_gauges(&mut encoder, &TRACKING_TIMEOUT, timeouts)?;
        let full = self.table_full.get(&0, 0).map_or(0, |v| v.iter().sum());
        encode_counters(&mut encoder, &FLOW_TABLE_FULL, [(NO_LABELS, full)])
    }
}
