//! The EC2 connection-tracking model: flows in the classifiers' table that are still
//! inside EC2's tracking timeouts. An expiry pass reads the whole table in batches,
//! deletes what EC2 would have forgotten and publishes the counts; scrapes read the
//! published counts and never walk the table.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use aya::maps::{MapData, PerCpuArray};
use monitor_common::{
    Addr, FLOW_AB, FLOW_BA, FLOW_FIN_AB, FLOW_FIN_BA, FLOW_ICMP, FLOW_LOCAL_A, FLOW_LOCAL_B,
    FLOW_OTHER, FLOW_RST, FLOW_TCP, FLOW_UDP, Flow, FlowKey, flow_class,
};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::{encode_counters, encode_gauges, top_per_device};
use crate::{
    batch,
    devices::{Device, Devices},
    slots::SlotArray,
};

const IPPROTO_TCP: u8 = 6;

/// How long EC2 keeps tracking a TCP connection once it has closed (both FINs, or RST).
pub const TCP_CLOSED_TIMEOUT: Duration = Duration::from_secs(5);

pub const CLASS_NAMES: [(u32, &str); 4] = [
    (FLOW_TCP, "tcp"),
    (FLOW_UDP, "udp"),
    (FLOW_ICMP, "icmp"),
    (FLOW_OTHER, "other"),
];

/// EC2's idle tracking timeouts (`--tcp-established-timeout` and friends).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub tcp_established: Duration,
    pub udp: Duration,
    pub udp_stream: Duration,
}

impl Timeouts {
    /// How long `flow` stays tracked after it was last seen.
    pub fn for_flow(&self, key: &FlowKey, flow: &Flow) -> Duration {
        let both_ways = flow.flags & (FLOW_AB | FLOW_BA) == (FLOW_AB | FLOW_BA);
        match key.proto {
            IPPROTO_TCP => {
                let closed = flow.flags & FLOW_RST != 0
                    || flow.flags & (FLOW_FIN_AB | FLOW_FIN_BA) == (FLOW_FIN_AB | FLOW_FIN_BA);
                if closed {
                    TCP_CLOSED_TIMEOUT
                } else {
                    self.tcp_established
                }
            }
            // UDP seen both ways is a stream; ICMP and the rest are treated as UDP.
            _ if both_ways => self.udp_stream,
            _ => self.udp,
        }
    }
}

/// What the last expiry pass found.
#[derive(Clone, Debug, Default)]
pub struct PassResult {
    /// Tracked flows by (ifindex, class).
    pub tracked: BTreeMap<(u32, u32), u64>,
    /// Tracked flows by (ifindex, local address), while the pass runs.
    by_owner: HashMap<(u32, Addr), u64>,
    /// The busiest local addresses per ifindex, most flows first, `top` of them.
    pub owners: BTreeMap<u32, Vec<(IpAddr, u64)>>,
}

impl PassResult {
    fn add(&mut self, key: &FlowKey, flow: &Flow) {
        *self
            .tracked
            .entry((key.ifindex, flow_class(key.proto)))
            .or_default() += 1;
        let local = if flow.flags & FLOW_LOCAL_A != 0 {
            key.addr_a
        } else if flow.flags & FLOW_LOCAL_B != 0 {
            key.addr_b
        } else {
            return;
        };
        *self.by_owner.entry((key.ifindex, local)).or_default() += 1;
    }

    /// Keeps the `top` busiest local addresses of each device.
    fn rank(&mut self, top: usize) {
        self.owners = top_per_device(self.by_owner.drain(), top);
    }

    /// Tracked flows over the monitored devices: the instance-wide estimate.
    pub fn total(&self, devices: &BTreeMap<u32, Device>) -> u64 {
        self.tracked
            .iter()
            .filter(|((i, _), _)| devices.contains_key(i))
            .map(|(_, n)| n)
            .sum()
    }
}

/// The last pass's result, shared with the collectors.
#[derive(Clone, Debug, Default)]
pub struct FlowCounts(Arc<Mutex<Option<PassResult>>>);

impl FlowCounts {
    pub fn get(&self) -> Option<PassResult> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, r: PassResult) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
    }
}

/// Owns the `FLOWS` map and runs the expiry passes.
pub struct Expiry {
    pub flows: MapData,
    pub timeouts: Timeouts,
    pub counts: FlowCounts,
    /// Flows of devices no longer monitored are deleted.
    pub devices: Devices,
    /// How many of the busiest local addresses each device reports.
    pub top: usize,
}

impl Expiry {
    /// One pass at `now` (`CLOCK_MONOTONIC` seconds).
    pub fn pass(&mut self, now: u32) -> std::io::Result<PassResult> {
        let (result, stale) = self.read(now)?;
        let mut result = self.reap(now, result, &stale)?;
        result.rank(self.top);
        self.counts.set(result.clone());
        Ok(result)
    }

    /// Whether `flow` is past its timeout at `now`, or its device is gone.
    fn expired(
        &self,
        now: u32,
        key: &FlowKey,
        flow: &Flow,
        devices: &BTreeMap<u32, Device>,
    ) -> bool {
        let idle = u64::from(now.saturating_sub(flow.last_seen));
        idle >= self.timeouts.for_flow(key, flow).as_secs() || !devices.contains_key(&key.ifindex)
    }

    /// Reads the table in batches: the flows still tracked, and those that looked stale.
    pub(crate) fn read(&self, now: u32) -> std::io::Result<(PassResult, Vec<FlowKey>)> {
        let mut result = PassResult::default();
        let mut stale: Vec<FlowKey> = Vec::new();
        let fd = std::os::fd::AsFd::as_fd(self.flows.fd());
        let devices = self.devices.snapshot();
        // SAFETY: FLOWS maps FlowKey to Flow, both plain `#[repr(C)]` data.
        unsafe {
            batch::lookup_all::<FlowKey, Flow>(fd, 4096, |key, flow| {
                if self.expired(now, key, flow, &devices) {
                    stale.push(*key);
                } else {
                    result.add(key, flow);
                }
            })?;
        }
        Ok((result, stale))
    }

    /// Deletes the stale flows. A pass over a large table takes a while: a flow stale
    /// when read may have been refreshed since. Each is read again and deleted only if it
    /// is still stale, or it would be counted new at its next packet.
    pub(crate) fn reap(
        &self,
        now: u32,
        mut result: PassResult,
        stale: &[FlowKey],
    ) -> std::io::Result<PassResult> {
        let fd = std::os::fd::AsFd::as_fd(self.flows.fd());
        let devices = self.devices.snapshot();
        for key in stale {
            // SAFETY: as in `read`.
            match unsafe { batch::lookup_one::<FlowKey, Flow>(fd, key)? } {
                Some(flow) if !self.expired(now, key, &flow, &devices) => result.add(key, &flow),
                Some(_) => {
                    // SAFETY: as above.
                    unsafe { batch::delete_one(fd, key)? };
                }
                None => {}
            }
        }
        Ok(result)
    }

    /// How often to pass: often enough that the shortest timeout is honoured within a
    /// couple of seconds, never more than once a second.
    pub fn period(&self) -> Duration {
        (self.timeouts.udp.min(TCP_CLOSED_TIMEOUT) / 2)
            .clamp(Duration::from_secs(1), Duration::from_secs(5))
    }
}

pub struct FlowsCollector {
    /// New flows per (slot, protocol class).
    pub created: SlotArray<u64>,
    pub table_full: PerCpuArray<MapData, u64>,
    pub counts: FlowCounts,
    pub devices: Devices,
}

impl std::fmt::Debug for FlowsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowsCollector").finish_non_exhaustive()
    }
}

impl Collector for FlowsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let devices = self.devices.snapshot();
        let pass = self.counts.get();
        let mut tracked = Vec::new();
        let mut created = Vec::new();
        for d in devices.values() {
            for (c, name) in CLASS_NAMES {
                let labels = [("device", d.name.clone()), ("protocol", name.to_owned())];
                if let Some(p) = &pass {
                    let n = p.tracked.get(&(d.ifindex, c)).copied().unwrap_or(0);
                    tracked.push((labels.clone(), i64::try_from(n).unwrap_or(i64::MAX)));
                }
                let n = self.created.get(d.slot, c).iter().sum();
                created.push((labels, n));
            }
        }
        encode_gauges(
            &mut encoder,
            "tracked_flows",
            "Flows crossing the ENI still inside EC2's tracking timeouts (estimate).",
            tracked,
        )?;
        encode_counters(
            &mut encoder,
            "flows_created",
            "New flows seen on the ENI.",
            created,
        )?;
        let mut owners = Vec::new();
        for d in devices.values() {
            for (addr, n) in pass
                .iter()
                .filter_map(|p| p.owners.get(&d.ifindex))
                .flatten()
            {
                owners.push((
                    [("device", d.name.clone()), ("address", addr.to_string())],
                    i64::try_from(*n).unwrap_or(i64::MAX),
                ));
            }
        }
        encode_gauges(
            &mut encoder,
            "top_flow_owners",
            "Tracked flows of the busiest local addresses on the ENI (the --top of them; join kube_pod_info on pod_ip for the pod).",
            owners,
        )?;
        let full = self.table_full.get(&0, 0).map_or(0, |v| v.iter().sum());
        encode_counters(
            &mut encoder,
            "flow_table_full",
            "Packets of flows that found the flow table full and were not tracked (the tracked estimate is then a lower bound).",
            [([] as [(&'static str, String); 0], full)],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_the_local_side_ranked_and_bounded() {
        let addr = |s: &str| crate::programs::addr_bytes(s.parse().unwrap());
        let key = |a: &str, b: &str, port: u16| FlowKey {
            addr_a: addr(a),
            addr_b: addr(b),
            port_a: port,
            port_b: 443,
            ifindex: 2,
            proto: 6,
            pad: [0; 3],
        };
        let flow = |flags: u8| Flow {
            first_seen: 0,
            last_seen: 0,
            flags,
            pad: [0; 3],
        };
        let mut r = PassResult::default();
        for port in 0..5 {
            r.add(
                &key("10.0.0.5", "10.9.9.9", port),
                &flow(FLOW_AB | FLOW_LOCAL_A),
            );
        }
        for port in 0..3 {
            // The local address sorted second: side b.
            r.add(
                &key("10.0.0.1", "10.0.0.7", port),
                &flow(FLOW_BA | FLOW_LOCAL_B),
            );
        }
        r.add(
            &key("10.0.0.8", "10.9.9.9", 1),
            &flow(FLOW_AB | FLOW_LOCAL_A),
        );
        // A flow from before the local bit (a previous agent's): no owner.
        r.add(&key("10.0.0.9", "10.9.9.9", 1), &flow(FLOW_AB));
        r.rank(2);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(r.owners[&2], [(ip("10.0.0.5"), 5), (ip("10.0.0.7"), 3)]);
        assert_eq!(r.tracked[&(2, FLOW_TCP)], 10);
    }

    fn key(proto: u8) -> FlowKey {
        FlowKey {
            addr_a: [0; 4],
            addr_b: [1; 4],
            port_a: 1,
            port_b: 2,
            ifindex: 2,
            proto,
            pad: [0; 3],
        }
    }

    fn flow(flags: u8) -> Flow {
        Flow {
            first_seen: 0,
            last_seen: 0,
            flags,
            pad: [0; 3],
        }
    }

    #[test]
    fn ec2_timeouts_by_state() {
        let t = Timeouts {
            tcp_established: Duration::from_hours(120),
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_mins(3),
        };
        assert_eq!(
            t.for_flow(&key(6), &flow(FLOW_AB | FLOW_BA)),
            Duration::from_hours(120)
        );
        assert_eq!(
            t.for_flow(&key(6), &flow(FLOW_AB)),
            Duration::from_hours(120)
        );
        assert_eq!(
            t.for_flow(&key(6), &flow(FLOW_AB | FLOW_BA | FLOW_RST)),
            TCP_CLOSED_TIMEOUT
        );
        assert_eq!(
            t.for_flow(&key(6), &flow(FLOW_AB | FLOW_BA | FLOW_FIN_AB)),
            Duration::from_hours(120)
        );
        assert_eq!(
            t.for_flow(
                &key(6),
                &flow(FLOW_AB | FLOW_BA | FLOW_FIN_AB | FLOW_FIN_BA)
            ),
            TCP_CLOSED_TIMEOUT
        );
        assert_eq!(
            t.for_flow(&key(17), &flow(FLOW_AB)),
            Duration::from_secs(30)
        );
        assert_eq!(
            t.for_flow(&key(17), &flow(FLOW_BA)),
            Duration::from_secs(30)
        );
        assert_eq!(
            t.for_flow(&key(17), &flow(FLOW_AB | FLOW_BA)),
            Duration::from_mins(3)
        );
        assert_eq!(t.for_flow(&key(1), &flow(FLOW_AB)), Duration::from_secs(30));
    }
}
