//! DNS queries, matched responses, unanswered queries and latency, by device and
//! resolver, from the classifiers' maps and the timeout sweep's count; who is failing.

use std::collections::BTreeMap;

use monitor_common::{
    DNS_LATENCY_BOUNDS_NS, DNS_TCP, DnsCountKind, RESOLVER_RETIRED, RESOLVER_SLOTS,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet},
    metrics::MetricType,
};

use aya::maps::{MapData, PerCpuArray};

use super::{Metric, NO_LABELS, encode_counters, encode_gauges, gauge};
use crate::{
    devices::{Departed, Device, Devices},
    housekeeping::ResolverNames,
    model::dns::{RankedClients, rcode_name},
    tables::dns::{DnsSnapshot, DnsTables, Histogram},
};

const QUERIES: Metric = Metric {
    name: "dns_queries",
    help: "DNS queries leaving or entering through the ENI, by resolver (a named one, or other) and transport (udp, tcp).",
};
const RESPONSES: Metric = Metric {
    name: "dns_responses",
    help: "DNS responses matched to a query, by response code.",
};
const UNANSWERED: Metric = Metric {
    name: "dns_unanswered",
    help: "DNS queries with no response within --dns-timeout, or ended before it by the client sending the same query again (same port and id).",
};
const UNTRACKED: Metric = Metric {
    name: "dns_untracked",
    help: "DNS queries whose end the agent could not see, neither answered nor unanswered: the in-flight table had no room they could take (one client held its share of it), or they waited while no agent watched. queries = responses + unanswered + untracked + in flight.",
};
const CONNECT_FAILURES: Metric = Metric {
    name: "dns_tcp_connect_failures",
    help: "TCP connections to port 53 refused (RST to the SYN) or whose SYN had no answer within --dns-timeout: a full connection-tracking allowance drops new connections first.",
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
    help: "A resolver named by its address (Amazon's, and the busiest and failing others of the last minutes; the rest are other), and whether it is Amazon's (169.254.169.253, fd00:ec2::253, VPC+2); always 1.",
};

const DNS_TCP_UNREAD: Metric = Metric {
    name: "dns_tcp_unread_segments",
    help: "TCP segments to or from port 53 with DNS messages the programs did not read (past the 4 a segment they read on kernels before 5.17, a header the segment cuts, or bytes where a message should begin that do not read as one): those queries and responses are not counted.",
};

pub struct DnsCollector {
    pub dns: DnsTables,
    /// TCP segments with DNS messages left unread, per CPU.
    pub tcp_unread: PerCpuArray<MapData, u64>,
    /// Devices gone, whose counts are deleted once they have been for a while.
    pub departed: Departed,
    /// The resolver names in force, by slot.
    pub names: ResolverNames,
    /// The last ranking of the clients with unanswered queries (the sweep's).
    pub ranked: RankedClients,
    pub devices: Devices,
}

impl std::fmt::Debug for DnsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsCollector").finish_non_exhaustive()
    }
}

/// (device, resolver).
type Labels2 = (String, String);
/// (device, resolver, transport).
type Labels3 = (String, String, &'static str);

/// The `transport` label of a count's or a histogram's key.
fn transport(t: u8) -> &'static str {
    if t == DNS_TCP { "tcp" } else { "udp" }
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

/// The DNS series by their labels, summed from the counts' keys.
#[derive(Default)]
struct Series {
    queries: BTreeMap<Labels3, u64>,
    responses: BTreeMap<(Labels3, String), u64>,
    unanswered: BTreeMap<Labels3, u64>,
    untracked: BTreeMap<Labels3, u64>,
    refused: BTreeMap<Labels2, u64>,
    latency: BTreeMap<Labels3, Histogram>,
}

impl Series {
    /// `labels` names a key's (device, resolver slot), or `None` for a device no longer
    /// monitored.
    fn of(snapshot: DnsSnapshot, labels: impl Fn(u32, usize) -> Option<Labels2>) -> Self {
        let mut out = Self::default();
        for (key, n) in snapshot.counts {
            let Some((device, resolver)) = labels(key.ifindex, usize::from(key.resolver)) else {
                continue;
            };
            let l = (device, resolver, transport(key.transport));
            match DnsCountKind::from_u8(key.kind) {
                Some(DnsCountKind::Query) => *out.queries.entry(l).or_default() += n,
                Some(DnsCountKind::Response) => {
                    *out.responses.entry((l, rcode_name(key.rcode))).or_default() += n;
                }
                // Every way a query ends without its response.
                Some(DnsCountKind::Superseded | DnsCountKind::Unanswered) => {
                    *out.unanswered.entry(l).or_default() += n;
                }
                Some(DnsCountKind::Untracked) => *out.untracked.entry(l).or_default() += n,
                Some(DnsCountKind::ConnectFailure) => {
                    *out.refused.entry((l.0, l.1)).or_default() += n;
                }
                None => {}
            }
        }
        for (key, h) in snapshot.latency {
            let Some((device, resolver)) = labels(key.ifindex, usize::from(key.resolver)) else {
                continue;
            };
            let l = (device, resolver, transport(key.transport));
            let sum = out.latency.entry(l).or_default();
            for (s, b) in sum.buckets.iter_mut().zip(h.buckets) {
                *s += b;
            }
            sum.sum_ns += h.sum_ns;
        }
        out
    }
}

impl DnsCollector {
    /// The clients with the most unanswered queries, by device.
    fn top_clients(
        &self,
        devices: &BTreeMap<u32, Device>,
    ) -> Vec<([(&'static str, String); 2], i64)> {
        let mut clients = Vec::new();
        for (ifindex, top) in self.ranked.get() {
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
        clients
    }
}

impl Series {
    /// Encodes the families of DNS counts and latency.
    fn encode(self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Self {
            queries,
            responses,
            unanswered,
            untracked,
            refused,
            latency,
        } = self;
        let with = |(device, resolver, transport): Labels3| {
            [
                ("device", device),
                ("resolver", resolver),
                ("transport", transport.to_owned()),
            ]
        };
        encode_counters(
            encoder,
            &QUERIES,
            queries.into_iter().map(|(l, v)| (with(l), v)),
        )?;
        encode_counters(
            encoder,
            &RESPONSES,
            responses.into_iter().map(|((l, rcode), v)| {
                let [d, r, t] = with(l);
                ([d, r, ("rcode", rcode), t], v)
            }),
        )?;
        encode_counters(
            encoder,
            &UNANSWERED,
            unanswered.into_iter().map(|(l, v)| (with(l), v)),
        )?;
        encode_counters(
            encoder,
            &UNTRACKED,
            untracked.into_iter().map(|(l, v)| (with(l), v)),
        )?;
        encode_counters(
            encoder,
            &CONNECT_FAILURES,
            refused
                .into_iter()
                .map(|((device, resolver), v)| ([("device", device), ("resolver", resolver)], v)),
        )?;
        let mut family =
            encoder.encode_descriptor(LATENCY.name, LATENCY.help, None, MetricType::Histogram)?;
        for (l, h) in latency {
            encode_histogram(&mut family.encode_family(&with(l))?, &h)?;
        }
        Ok(())
    }
}

impl DnsCollector {
    /// This scrape's series, and the resolvers' info. The names and the counts are read
    /// together: the sweep moves a slot's counts to `other` under the same lock as it
    /// renames the slot. Keys of devices gone a while are deleted, found in the counts
    /// read anyway (their series are left out either way).
    fn series(&self, devices: &BTreeMap<u32, Device>) -> (Series, Vec<(String, &'static str)>) {
        let (names, retired, snapshot, info) = {
            let slots = self.names.read();
            let names: Vec<String> = (0..=u8::MAX)
                .take(RESOLVER_SLOTS as usize)
                .map(|s| slots.label(s))
                .collect();
            let retired = slots.label(RESOLVER_RETIRED);
            (names, retired, self.dns.snapshot(), slots.info())
        };
        let keyed = snapshot
            .counts
            .keys()
            .map(|k| k.ifindex)
            .chain(snapshot.latency.keys().map(|k| k.ifindex));
        self.dns
            .forget(&self.departed.due(keyed, devices, std::time::Instant::now()));
        // Labels for a key, or `None` for a device not counted (gone a while).
        let counted = self.devices.counted(std::time::Instant::now());
        let labels = |ifindex: u32, resolver: usize| -> Option<Labels2> {
            let d = counted.get(&ifindex)?;
            let name = if resolver == usize::from(RESOLVER_RETIRED) {
                retired.as_str()
            } else {
                names.get(resolver).map_or("other", String::as_str)
            };
            Some((d.name.clone(), name.to_owned()))
        };
        (Series::of(snapshot, labels), info)
    }
}

impl Collector for DnsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let devices = self.devices.snapshot();
        let (series, info) = self.series(&devices);
        series.encode(&mut encoder)?;
        encode_gauges(
            &mut encoder,
            &TOP_CLIENTS_UNANSWERED,
            self.top_clients(&devices),
        )?;
        let unread = self.tcp_unread.get(&0, 0).map_or(0, |v| v.iter().sum());
        encode_counters(&mut encoder, &DNS_TCP_UNREAD, [(NO_LABELS, unread)])?;
        encode_gauges(
            &mut encoder,
            &RESOLVER_INFO,
            info.into_iter().map(|(resolver, kind)| {
                ([("resolver", resolver), ("kind", kind.to_owned())], 1i64)
            }),
        )
    }
}
