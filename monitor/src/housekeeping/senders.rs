//! Gathers who sent link-local packets each second from the CPUs' tables, before their
//! ring comes round (`LL_SENDER_SECONDS`).

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use aya::maps::{MapData, PerCpuArray};
use monitor_common::{LL_SENDER_SECONDS, LinkLocalSenders};

use crate::model::linklocal::Senders;

/// Owns the senders' tables; the collector reads what it gathered.
pub struct SenderGatherer {
    pub tables: PerCpuArray<MapData, LinkLocalSenders>,
    pub senders: Arc<Mutex<Senders>>,
}

impl SenderGatherer {
    /// Reads every CPU's ring and gathers the seconds ended by `now_ns`.
    pub fn gather(&self, now_ns: u64) -> std::io::Result<()> {
        let mut tables = Vec::new();
        for i in 0..LL_SENDER_SECONDS {
            let per_cpu = self.tables.get(&i, 0).map_err(std::io::Error::other)?;
            tables.extend(per_cpu.iter().copied());
        }
        self.senders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .gather(tables, now_ns / 1_000_000_000);
        Ok(())
    }

    /// Often enough that each second is read before its table is reused, with a couple
    /// of periods to spare.
    pub const PERIOD: Duration = Duration::from_millis(500);
}
