//! The flow expiry pass: reads the whole flow table in batches, deletes what EC2 would
//! have forgotten (by the model's timeouts) and publishes the counts; scrapes read the
//! published counts and never walk the table.

use std::{collections::BTreeMap, time::Duration};

use monitor_common::FlowKey;

use crate::{
    devices::{Device, Devices},
    loader::maps::FlowTable,
    model::flows::{FlowCounts, PassResult, Timeouts},
};

/// Owns the flow table and runs the expiry passes.
pub struct Expiry {
    pub flows: FlowTable,
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
        flow: &monitor_common::Flow,
        devices: &BTreeMap<u32, Device>,
    ) -> bool {
        self.timeouts.expired(now, key, flow) || !devices.contains_key(&key.ifindex)
    }

    /// Reads the table in batches: the flows still tracked, and those that looked stale.
    pub fn read(&self, now: u32) -> std::io::Result<(PassResult, Vec<FlowKey>)> {
        let mut result = PassResult::default();
        let mut stale: Vec<FlowKey> = Vec::new();
        let devices = self.devices.snapshot();
        self.flows.for_each(|key, flow| {
            if self.expired(now, key, flow, &devices) {
                stale.push(*key);
            } else {
                result.add(key, flow);
            }
        })?;
        Ok((result, stale))
    }

    /// Deletes the stale flows. A pass over a large table takes a while: a flow stale
    /// when read may have been refreshed since. Each is read again and deleted only if it
    /// is still stale, or it would be counted new at its next packet.
    pub fn reap(
        &self,
        now: u32,
        mut result: PassResult,
        stale: &[FlowKey],
    ) -> std::io::Result<PassResult> {
        let devices = self.devices.snapshot();
        for key in stale {
            match self.flows.get(key)? {
                Some(flow) if !self.expired(now, key, &flow, &devices) => result.add(key, &flow),
                Some(_) => {
                    self.flows.delete(key)?;
                }
                None => {}
            }
        }
        Ok(result)
    }

    /// How often to pass.
    pub fn period(&self) -> Duration {
        self.timeouts.pass_period()
    }
}
