//! One collector per source of truth. Each declares its metrics (name and help) at the
//! top of its file, reads its source at scrape time and encodes; none writes a kernel
//! map or decides anything the model decides.

pub mod agent;
pub mod conntrack;
pub mod dns;
pub mod drops;
pub mod ena;
pub mod flows;
pub mod linklocal;
pub mod udp;

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

/// A metric's name (without the `eni_monitor_` prefix and a counter's `_total`) and help.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    pub name: &'static str,
    pub help: &'static str,
}

/// No labels.
pub(crate) const NO_LABELS: [(&str, String); 0] = [];

/// Encodes one counter family from (labels, value) rows.
pub(crate) fn encode_counters<const N: usize>(
    encoder: &mut DescriptorEncoder,
    metric: &Metric,
    rows: impl IntoIterator<Item = ([(&'static str, String); N], u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family =
        encoder.encode_descriptor(metric.name, metric.help, None, MetricType::Counter)?;
    for (labels, value) in rows {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes one gauge family from (labels, value) rows.
pub(crate) fn encode_gauges<const N: usize, V>(
    encoder: &mut DescriptorEncoder,
    metric: &Metric,
    rows: impl IntoIterator<Item = ([(&'static str, String); N], V)>,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<V>: prometheus_client::encoding::EncodeMetric,
{
    let mut family =
        encoder.encode_descriptor(metric.name, metric.help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A count as a gauge's value.
pub(crate) fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
