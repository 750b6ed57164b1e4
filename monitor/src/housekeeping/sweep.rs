//! The DNS timeout sweep: takes queries older than `--dns-timeout` out of the table
//! they wait in (`DNS_PENDING`, or `DNS_INFLIGHT` on kernels without BPF atomics) and
//! counts them unanswered, by server and by client. Only the one that takes a query out
//! counts it, so a response that matched in the meantime wins.

use std::{collections::BTreeMap, time::Duration};

use monitor_common::{Addr, DnsFlightKey};

use crate::{
    loader::{
        maps::{InflightTable, UnansweredCounts},
        pending::PendingTable,
    },
    model::dns::{RecentClients, minute},
};

pub struct Sweeper {
    pub inflight: InflightTable,
    pub pending: PendingTable,
    pub timeout: Duration,
    pub unanswered: UnansweredCounts,
    pub recent: RecentClients,
}

impl Sweeper {
    /// One pass. `DNS_PENDING`: each expired way claimed in place. `DNS_INFLIGHT`: the
    /// table read in batches, each expired query deleted by key.
    pub fn sweep(&mut self, now_ns: u64) -> std::io::Result<()> {
        let timeout = u64::try_from(self.timeout.as_nanos()).unwrap_or(u64::MAX);
        let this_minute = minute(now_ns);
        let mut counts: BTreeMap<(u32, Addr), u64> = BTreeMap::new();
        self.pending.sweep(now_ns.saturating_sub(timeout), |e| {
            *counts.entry((e.ifindex, e.key.server)).or_default() += 1;
            self.recent.add(this_minute, e.ifindex, e.key.client);
        });
        let mut expired: Vec<(DnsFlightKey, u32)> = Vec::new();
        self.inflight.for_each(|key, flight| {
            if now_ns.saturating_sub(flight.start_ns) >= timeout {
                expired.push((*key, flight.ifindex));
            }
        })?;
        for (key, ifindex) in expired {
            if self.inflight.delete(&key)? {
                *counts.entry((ifindex, key.server)).or_default() += 1;
                self.recent.add(this_minute, ifindex, key.client);
            }
        }
        if !counts.is_empty() {
            self.unanswered.add(counts);
        }
        Ok(())
    }

    /// How often to sweep: often enough that a query is declared unanswered soon after
    /// its timeout, rarely enough to cost nothing.
    pub fn period(&self) -> Duration {
        (self.timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}
