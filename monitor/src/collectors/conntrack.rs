//! The node's netfilter connection tracking (`nf_conntrack`) for the agent's network
//! namespace: entries, the table's size, and the per-CPU statistics summed.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context as _, Result, anyhow};
use log::info;
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::{Metric, NO_LABELS, encode_counters, encode_gauges};

const ENTRIES: Metric = Metric {
    name: "nf_conntrack_entries",
    help: "Entries in the node's netfilter conntrack table.",
};
const LIMIT: Metric = Metric {
    name: "nf_conntrack_limit",
    help: "Size of the node's netfilter conntrack table (nf_conntrack_max).",
};
const EVENTS: Metric = Metric {
    name: "nf_conntrack_events",
    help: "Netfilter conntrack statistics, summed over CPUs (insert_failed, drop, early_drop, ...).",
};

/// Per-CPU statistics summed over CPUs, by the kernel's column name. `entries` is left
/// out: it is the table's fill, exported as a gauge from `nf_conntrack_count`.
pub fn parse_stats(text: &str) -> Result<BTreeMap<String, u64>> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| anyhow!("empty statistics"))?
        .split_whitespace()
        .collect();
    let mut sums: BTreeMap<String, u64> = BTreeMap::new();
    for (n, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let values: Vec<&str> = line.split_whitespace().collect();
        if values.len() != header.len() {
            return Err(anyhow!(
                "CPU line {} has {} columns, the header {}",
                n + 1,
                values.len(),
                header.len()
            ));
        }
        for (name, v) in header.iter().zip(values) {
            if *name == "entries" {
                continue;
            }
            let v = u64::from_str_radix(v, 16)
                .with_context(|| format!("{name} = {v:?} is not hexadecimal"))?;
            *sums.entry((*name).to_owned()).or_default() += v;
        }
    }
    Ok(sums)
}

#[derive(Debug)]
pub struct ConntrackCollector {
    pub proc_root: PathBuf,
    /// Said once, when the module is not loaded.
    pub absent_logged: AtomicBool,
}

impl Default for ConntrackCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl ConntrackCollector {
    pub fn new() -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            absent_logged: AtomicBool::new(false),
        }
    }

    fn read_number(&self, path: &str) -> Option<i64> {
        std::fs::read_to_string(self.proc_root.join(path))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Collector for ConntrackCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let count = self.read_number("sys/net/netfilter/nf_conntrack_count");
        let limit = self.read_number("sys/net/netfilter/nf_conntrack_max");
        let (Some(count), Some(limit)) = (count, limit) else {
            if !self.absent_logged.swap(true, Ordering::Relaxed) {
                info!(
                    "nf_conntrack is not loaded in this network namespace; its metrics appear once it is"
                );
            }
            return Ok(());
        };
        encode_gauges(&mut encoder, &ENTRIES, [(NO_LABELS, count)])?;
        encode_gauges(&mut encoder, &LIMIT, [(NO_LABELS, limit)])?;
        let stats = std::fs::read_to_string(self.proc_root.join("net/stat/nf_conntrack"))
            .map_err(|e| anyhow!("{e}"))
            .and_then(|t| parse_stats(&t));
        match stats {
            Ok(stats) => encode_counters(
                &mut encoder,
                &EVENTS,
                stats.into_iter().map(|(event, v)| ([("event", event)], v)),
            ),
            Err(e) => {
                log::warn!("reading /proc/net/stat/nf_conntrack: {e:#}");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!(
            "{}/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn sums_cpus_by_column() {
        let s = parse_stats(&fixture("nf_conntrack-busy.stat")).unwrap();
        assert_eq!(s["insert"], 0x1f4 + 0x12c);
        assert_eq!(s["insert_failed"], 4);
        assert_eq!(s["drop"], 2);
        assert_eq!(s["early_drop"], 16);
        assert_eq!(s["invalid"], 256);
        assert_eq!(s["search_restart"], 0xabd);
        assert_eq!(s["found"], 21);
        assert!(!s.contains_key("entries"));
        assert_eq!(s.len(), 16);
    }

    #[test]
    fn an_idle_kernel_reads_as_zeros() {
        let s = parse_stats(&fixture("nf_conntrack-6.18.stat")).unwrap();
        assert!(s.values().all(|v| *v == 0));
        assert!(s.contains_key("clashres") && s.contains_key("chainlength"));
    }

    #[test]
    fn malformed_statistics_are_errors() {
        assert!(parse_stats("").is_err());
        assert!(parse_stats("entries insert\n0000 zzzz\n").is_err());
        assert!(parse_stats("entries insert\n0000\n").is_err());
    }
}
