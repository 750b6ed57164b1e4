//! One collector per source of truth, each owning its metric descriptions. Kernel maps
//! are read at scrape time, never copied on a timer.

pub mod agent;
pub mod conntrack;
pub mod dns;
pub mod drops;
pub mod ena;
pub mod flows;
pub mod linklocal;
pub mod udp;

use std::{collections::BTreeMap, net::IpAddr};

use monitor_common::Addr;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};

use crate::programs::addr_from_bytes;

/// The `top` addresses of each device by count, most first, ties by address so that the
/// set is stable from one reading to the next: the `top_*` series.
pub(crate) fn top_per_device(
    counts: impl IntoIterator<Item = ((u32, Addr), u64)>,
    top: usize,
) -> BTreeMap<u32, Vec<(IpAddr, u64)>> {
    let mut out: BTreeMap<u32, Vec<(IpAddr, u64)>> = BTreeMap::new();
    for ((ifindex, addr), n) in counts {
        out.entry(ifindex)
            .or_default()
            .push((addr_from_bytes(addr), n));
    }
    for ranked in out.values_mut() {
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked.truncate(top);
    }
    out
}
use prometheus_client::metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge};

/// Encodes one counter family from (labels, value) rows.
pub(crate) fn encode_counters<const N: usize>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = ([(&'static str, String); N], u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in rows {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes one gauge family from (labels, value) rows.
pub(crate) fn encode_gauges<const N: usize, V>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = ([(&'static str, String); N], V)>,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<V>: prometheus_client::encoding::EncodeMetric,
{
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}
