//! The flow expiry pass: reads both flow tables (the sets in place, the hash table in
//! batches), deletes what EC2 would have forgotten (by the model's timeouts) and
//! publishes the counts; scrapes read the published counts and never walk the tables.

use std::{collections::BTreeMap, time::Duration};

use monitor_common::FlowKey;

use crate::{
    devices::{Device, Devices},
    loader::maps::Flows,
    model::{
        flows::{FlowCounts, PassResult, Timeouts},
        instance::TcpEstablished,
    },
};

/// What a read of the tables found stale: the hash table's flows to delete, and how many
/// flows of the sets it freed.
pub struct Stale {
    pub keys: Vec<FlowKey>,
    pub freed: u64,
}

/// Owns the flow tables and runs the expiry passes.
pub struct Expiry {
    pub flows: Flows,
    pub timeouts: Timeouts,
    /// Where `timeouts.tcp_established` comes from: it changes once, when IMDS names the
    /// instance type.
    pub tcp_established: TcpEstablished,
    pub counts: FlowCounts,
    /// Flows of devices no longer monitored are deleted.
    pub devices: Devices,
    /// How many of the busiest local addresses each device reports.
    pub top: usize,
}

impl Expiry {
    /// One pass at `now` (`CLOCK_MONOTONIC` seconds).
    pub fn pass(&mut self, now: u32) -> anyhow::Result<PassResult> {
        self.timeouts.tcp_established = self.tcp_established.get();
        let (result, stale) = self.read(now)?;
        let (mut result, deleted) = self.reap(now, result, &stale.keys)?;
        self.flows.count.ended(stale.freed + deleted)?;
        self.flows.recent.fit(result.tcp())?;
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

    /// Reads both tables: the flows still tracked, and those of the hash table that
    /// looked stale. Stale flows in the sets are freed as they are read.
    pub fn read(&self, now: u32) -> std::io::Result<(PassResult, Stale)> {
        let mut result = PassResult::at(now);
        let mut stale: Vec<FlowKey> = Vec::new();
        let devices = self.devices.snapshot();
        let mut spilled = self.flows.sets.begin_pass();
        self.flows.table.for_each(|key, flow| {
            if let Some(set) = self.flows.sets.set_of(key) {
                spilled.add(set);
            }
            if self.expired(now, key, flow, &devices) {
                stale.push(*key);
            } else {
                result.add(key, flow);
            }
        })?;
        let freed = self.flows.sets.expire(
            &spilled,
            |key, flow| self.expired(now, key, flow, &devices),
            |key, flow| result.add(key, flow),
        );
        Ok((result, Stale { keys: stale, freed }))
    }

    /// Deletes the stale flows of the hash table. A pass over a large table takes a while: a flow stale
    /// when read may have been refreshed since. Each is read again and deleted only if it
    /// is still stale, or it would be counted new at its next packet.
    /// With the flows deleted.
    pub fn reap(
        &self,
        now: u32,
        mut result: PassResult,
        stale: &[FlowKey],
    ) -> std::io::Result<(PassResult, u64)> {
        let devices = self.devices.snapshot();
        let mut deleted = 0;
        for key in stale {
            match self.flows.table.get(key)? {
                Some(flow) if !self.expired(now, key, &flow, &devices) => result.add(key, &flow),
                Some(_) => deleted += u64::from(self.flows.table.delete(key)?),
                None => {}
            }
        }
        Ok((result, deleted))
    }

    /// How often to pass.
    pub fn period(&self) -> Duration {
        self.timeouts.pass_period()
    }
}
