//! DNS queries, matched responses, unanswered queries and latency, by device and
//! resolver, from the classifiers' maps and the timeout sweep's count; who is failing.

use std::{collections::BTreeMap, sync::Arc};

use aya::maps::{MapData, PerCpuHashMap};
use log::warn;
use monitor_common::{
    Addr, DNS_LATENCY_BOUNDS_NS, DNS_LATENCY_BUCKETS, DnsCountKey, DnsCountKind, DnsLatency,
    DnsServerKey, addr_to_ip,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet},
    metrics::MetricType,
};

use super::{Metric, encode_counters, encode_gauges, gauge};
use crate::{
    devices::{Device, Devices},
    housekeeping::{Resolvers, monotonic_ns},
    loader::maps::UnansweredCounts,
    model::dns::{RecentClients, minute, rcode_name},
};

const QUERIES: Metric = Metric {
    name: "dns_queries",
    help: "DNS queries (UDP) leaving or entering through the ENI.",
};
const RESPONSES: Metric = Metric {
    name: "dns_responses",
    help: "DNS responses matched to a query, by response code.",
};
const UNANSWERED: Metric = Metric {
    name: "dns_unanswered",
    help: "DNS queries with no response within --dns-timeout, or before the client sent the same query again (same port and id).",
};
const LATENCY: Metric = Metric {
    name: "dns_latency_seconds",
    help: "Time from a DNS query to its response.",
};
const TOP_CLIENTS_UNANSWERED: Metric = Metric {
    name: "top_dns_clients_unanswered",
    help: "The local clients with the most DNS queries unanswered in the last 5 minutes (the --top of them per ENI).",
};
const RESOLVER_INFO: Metric = Metric {
    name: "dns_resolver_info",
    help: "A resolver labelled by its address, and whether it is Amazon's (169.254.169.253, fd00:ec2::253, VPC+2); always 1.",
};

pub struct DnsCollector {
    pub counts: PerCpuHashMap<MapData, DnsCountKey, u64>,
    pub latency: PerCpuHashMap<MapData, DnsServerKey, DnsLatency>,
    pub unanswered: UnansweredCounts,
    pub resolvers: Arc<Resolvers>,
    pub recent: RecentClients,
    /// How many clients each device reports (`--top`).
    pub top: usize,
    pub devices: Devices,
}

impl std::fmt::Debug for DnsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsCollector").finish_non_exhaustive()
    }
}

/// (device, resolver).
type Labels2 = (String, String);

#[derive(Default)]
struct Histogram {
    buckets: [u64; DNS_LATENCY_BUCKETS],
    sum_ns: u64,
}

impl DnsCollector {
    /// Labels for a key, or `None` for a device no longer monitored (its series go).
    fn labels(
        &self,
        ifindex: u32,
        server: Addr,
        devices: &BTreeMap<u32, Device>,
    ) -> Option<Labels2> {
        let d = devices.get(&ifindex)?;
        Some((d.name.clone(), self.resolvers.label(addr_to_ip(server))))
    }

    /// `top_dns_clients_unanswered`: who is failing, per device.
    fn encode_top_clients(
        &self,
        encoder: &mut DescriptorEncoder,
        devices: &BTreeMap<u32, Device>,
    ) -> Result<(), std::fmt::Error> {
        let mut clients = Vec::new();
        for (ifindex, top) in self.recent.top(minute(monotonic_ns()), self.top) {
            let Some(d) = devices.get(&ifindex) else {
                continue;
            };
            for (addr, n) in top {
                clients.push((
                    [("device", d.name.clone()), ("address", addr.to_string())],
                    gauge(n),
                ));
            }
        }
        encode_gauges(encoder, &TOP_CLIENTS_UNANSWERED, clients)
    }
}

fn encode_histogram(family: &mut MetricEncoder, h: &Histogram) -> Result<(), std::fmt::Error> {
    #[expect(
        clippy::cast_precision_loss,
        reason = "nanoseconds to seconds for display"
    )]
    let secs = |ns: u64| ns as f64 / 1e9;
    let buckets: Vec<(f64, u64)> = DNS_LATENCY_BOUNDS_NS
        .iter()
        .map(|&b| secs(b))
        .chain(std::iter::once(f64::INFINITY))
        .zip(h.buckets.iter().copied())
        .collect();
    family.encode_histogram::<NoLabelSet>(secs(h.sum_ns), h.buckets.iter().sum(), &buckets, None)
}

impl Collector for DnsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let devices = self.devices.snapshot();
        let mut queries: BTreeMap<Labels2, u64> = BTreeMap::new();
        let mut responses: BTreeMap<(Labels2, String), u64> = BTreeMap::new();
        // Copies replaced by a retransmission before any response, counted by the
        // classifiers; the rest of the unanswered by the sweep.
        let mut unanswered: BTreeMap<Labels2, u64> = BTreeMap::new();
        for entry in &self.counts {
            let (key, per_cpu) = match entry {
                Ok(e) => e,
                Err(e) => {
                    warn!("reading DNS_COUNTS: {e}");
                    continue;
                }
            };
            let n: u64 = per_cpu.iter().sum();
            let Some(labels) = self.labels(key.ifindex, key.server, &devices) else {
                continue;
            };
            match DnsCountKind::from_u8(key.kind) {
                Some(DnsCountKind::Query) => *queries.entry(labels).or_default() += n,
                Some(DnsCountKind::Response) => {
                    *responses
                        .entry((labels, rcode_name(key.rcode)))
                        .or_default() += n;
                }
                Some(DnsCountKind::Superseded) => *unanswered.entry(labels).or_default() += n,
                None => {}
            }
        }
        for ((ifindex, server), n) in self.unanswered.snapshot() {
            if let Some(labels) = self.labels(ifindex, server, &devices) {
                *unanswered.entry(labels).or_default() += n;
            }
        }
        let mut latency: BTreeMap<Labels2, Histogram> = BTreeMap::new();
        for entry in &self.latency {
            let Ok((key, per_cpu)) = entry else { continue };
            let Some(labels) = self.labels(key.ifindex, key.server, &devices) else {
                continue;
            };
            let h = latency.entry(labels).or_default();
            for cpu in per_cpu.iter() {
                for (sum, b) in h.buckets.iter_mut().zip(cpu.buckets) {
                    *sum += b;
                }
                h.sum_ns += cpu.sum_ns;
            }
        }

        let with = |(device, resolver): Labels2| [("device", device), ("resolver", resolver)];
        encode_counters(
            &mut encoder,
            &QUERIES,
            queries.into_iter().map(|(l, v)| (with(l), v)),
        )?;
        encode_counters(
            &mut encoder,
            &RESPONSES,
            responses.into_iter().map(|((l, rcode), v)| {
                let [d, r] = with(l);
                ([d, r, ("rcode", rcode)], v)
            }),
        )?;
        encode_counters(
            &mut encoder,
            &UNANSWERED,
            unanswered.into_iter().map(|(l, v)| (with(l), v)),
        )?;
        let mut family =
            encoder.encode_descriptor(LATENCY.name, LATENCY.help, None, MetricType::Histogram)?;
        for (l, h) in latency {
            encode_histogram(&mut family.encode_family(&with(l))?, &h)?;
        }
        self.encode_top_clients(&mut encoder, &devices)?;
        encode_gauges(
            &mut encoder,
            &RESOLVER_INFO,
            self.resolvers.info().into_iter().map(|(resolver, kind)| {
                ([("resolver", resolver), ("kind", kind.to_owned())], 1i64)
            }),
        )
    }
}
