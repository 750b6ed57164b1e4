//! DNS queries, matched responses, unanswered queries and latency, from the
//! classifiers' maps; unanswered queries from the timeout sweep.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use aya::maps::{HashMap, MapData, PerCpuHashMap};
use log::warn;
use monitor_common::{
    Addr, DNS_LATENCY_BOUNDS_NS, DNS_LATENCY_BUCKETS, DNS_QUERY, DNS_RESPONSE, DnsCountKey,
    DnsFlight, DnsFlightKey, DnsLatency, DnsServerKey,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet},
    metrics::MetricType,
};

use super::encode_counters;
use crate::{devices::Devices, programs::addr_from_bytes};

/// Distinct resolvers named by address before the rest are `other`.
pub const MAX_NAMED_RESOLVERS: usize = 16;

/// The DNS response code's name.
pub fn rcode_name(rcode: u8) -> String {
    let name = match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        11 => "DSOTYPENI",
        other => return format!("RCODE{other}"),
    };
    name.to_owned()
}

/// Addresses of the Amazon-provided resolver (fixed ones, VPC+2, `--linklocal-resolver`),
/// shared with whatever learns more of them.
#[derive(Clone, Debug, Default)]
pub struct LinkLocalResolvers(Arc<RwLock<HashSet<IpAddr>>>);

impl LinkLocalResolvers {
    pub fn add(&self, ip: IpAddr) -> bool {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(ip)
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(ip)
    }
}

/// The `resolver` label: `linklocal`, the address of one of the first 16 other
/// resolvers seen, or `other`. A resolver keeps its label for the agent's lifetime.
#[derive(Debug, Default)]
pub struct ResolverLabels {
    linklocal: LinkLocalResolvers,
    named: Vec<IpAddr>,
}

impl ResolverLabels {
    pub fn new(linklocal: LinkLocalResolvers) -> Self {
        Self {
            linklocal,
            named: Vec::new(),
        }
    }

    pub fn label(&mut self, ip: IpAddr) -> String {
        if self.linklocal.contains(&ip) {
            return "linklocal".to_owned();
        }
        if self.named.contains(&ip) {
            return ip.to_string();
        }
        if self.named.len() < MAX_NAMED_RESOLVERS {
            self.named.push(ip);
            return ip.to_string();
        }
        "other".to_owned()
    }
}

/// Unanswered queries by (ifindex, server), counted by the sweep.
#[derive(Clone, Debug, Default)]
pub struct Unanswered(Arc<Mutex<BTreeMap<(u32, Addr), u64>>>);

impl Unanswered {
    fn add(&self, ifindex: u32, server: Addr) {
        *self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((ifindex, server))
            .or_default() += 1;
    }

    fn snapshot(&self) -> BTreeMap<(u32, Addr), u64> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Deletes queries older than the timeout from `DNS_INFLIGHT` and counts them.
pub struct Sweeper {
    pub inflight: HashMap<MapData, DnsFlightKey, DnsFlight>,
    pub timeout: Duration,
    pub unanswered: Unanswered,
}

impl Sweeper {
    /// One pass.
    pub fn sweep(&mut self, now_ns: u64) {
        let timeout = u64::try_from(self.timeout.as_nanos()).unwrap_or(u64::MAX);
        let expired: Vec<(DnsFlightKey, DnsFlight)> = self
            .inflight
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, f)| now_ns.saturating_sub(f.start_ns) >= timeout)
            .collect();
        for (key, flight) in expired {
            // A response that matched in the meantime deleted it first.
            if self.inflight.remove(&key).is_ok() {
                self.unanswered.add(flight.ifindex, key.server);
            }
        }
    }

    /// How often to sweep: often enough that a query is declared unanswered soon after
    /// its timeout, rarely enough to cost nothing.
    pub fn period(&self) -> Duration {
        (self.timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}

pub struct DnsCollector {
    pub counts: PerCpuHashMap<MapData, DnsCountKey, u64>,
    pub latency: PerCpuHashMap<MapData, DnsServerKey, DnsLatency>,
    pub unanswered: Unanswered,
    pub devices: Devices,
    pub resolvers: Mutex<ResolverLabels>,
}

impl std::fmt::Debug for DnsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsCollector").finish_non_exhaustive()
    }
}

type Labels3 = (String, String, String);

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
        devices: &BTreeMap<u32, crate::devices::Device>,
    ) -> Option<Labels3> {
        let d = devices.get(&ifindex)?;
        let resolver = self
            .resolvers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .label(addr_from_bytes(server));
        Some((d.name.clone(), d.eni.clone(), resolver))
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
        let mut queries: BTreeMap<Labels3, u64> = BTreeMap::new();
        let mut responses: BTreeMap<(Labels3, String), u64> = BTreeMap::new();
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
            match key.kind {
                DNS_QUERY => *queries.entry(labels).or_default() += n,
                DNS_RESPONSE => {
                    *responses
                        .entry((labels, rcode_name(key.rcode)))
                        .or_default() += n;
                }
                _ => {}
            }
        }
        let mut unanswered: BTreeMap<Labels3, u64> = BTreeMap::new();
        for ((ifindex, server), n) in self.unanswered.snapshot() {
            if let Some(labels) = self.labels(ifindex, server, &devices) {
                *unanswered.entry(labels).or_default() += n;
            }
        }
        let mut latency: BTreeMap<Labels3, Histogram> = BTreeMap::new();
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

        let with = |(device, eni, resolver): Labels3| {
            [("device", device), ("eni", eni), ("resolver", resolver)]
        };
        encode_counters(
            &mut encoder,
            "dns_queries",
            "DNS queries (UDP) leaving or entering through the ENI.",
            queries.into_iter().map(|(l, v)| (with(l), v)),
        )?;
        encode_counters(
            &mut encoder,
            "dns_responses",
            "DNS responses matched to a query, by response code.",
            responses.into_iter().map(|((l, rcode), v)| {
                let [d, e, r] = with(l);
                ([d, e, r, ("rcode", rcode)], v)
            }),
        )?;
        encode_counters(
            &mut encoder,
            "dns_unanswered",
            "DNS queries with no response within --dns-timeout.",
            unanswered.into_iter().map(|(l, v)| (with(l), v)),
        )?;
        let mut family = encoder.encode_descriptor(
            "dns_latency_seconds",
            "Time from a DNS query to its response.",
            None,
            MetricType::Histogram,
        )?;
        for (l, h) in latency {
            encode_histogram(&mut family.encode_family(&with(l))?, &h)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rcodes_are_named() {
        assert_eq!(rcode_name(0), "NOERROR");
        assert_eq!(rcode_name(2), "SERVFAIL");
        assert_eq!(rcode_name(3), "NXDOMAIN");
        assert_eq!(rcode_name(5), "REFUSED");
        assert_eq!(rcode_name(15), "RCODE15");
    }

    #[test]
    fn resolver_labels_are_bounded_and_stable() {
        let linklocal = LinkLocalResolvers::default();
        for a in ["169.254.169.253", "fd00:ec2::253"] {
            linklocal.add(a.parse().unwrap());
        }
        linklocal.add("10.0.0.2".parse().unwrap());
        let mut labels = ResolverLabels::new(linklocal.clone());
        assert_eq!(
            labels.label("169.254.169.253".parse().unwrap()),
            "linklocal"
        );
        assert_eq!(labels.label("fd00:ec2::253".parse().unwrap()), "linklocal");
        assert_eq!(labels.label("10.0.0.2".parse().unwrap()), "linklocal");
        for i in 0..MAX_NAMED_RESOLVERS {
            let ip: IpAddr = format!("192.0.2.{i}").parse().unwrap();
            assert_eq!(labels.label(ip), ip.to_string());
        }
        assert_eq!(labels.label("198.51.100.1".parse().unwrap()), "other");
        // The first ones keep their names.
        assert_eq!(labels.label("192.0.2.0".parse().unwrap()), "192.0.2.0");
        // A resolver learned later (VPC+2 from IMDS) becomes linklocal.
        linklocal.add("198.51.100.1".parse().unwrap());
        assert_eq!(labels.label("198.51.100.1".parse().unwrap()), "linklocal");
    }
}
