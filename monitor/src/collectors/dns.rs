//! DNS queries, matched responses, unanswered queries and latency, from the
//! classifiers' maps; unanswered queries from the timeout sweep.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, HashSet, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use aya::maps::{HashMap, MapData, PerCpuHashMap};
use log::warn;
use monitor_common::{
    Addr, DNS_LATENCY_BOUNDS_NS, DNS_LATENCY_BUCKETS, DNS_QUERY, DNS_RESPONSE, DNS_SUPERSEDED,
    DnsCountKey, DnsFlight, DnsFlightKey, DnsLatency, DnsServerKey,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet},
    metrics::MetricType,
};

use super::{encode_counters, encode_gauges, top_per_device};
use crate::{batch, devices::Devices, pending::PendingTable, programs::addr_from_bytes};

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

/// The `resolver` label: the server's address for Amazon's resolvers and for the first
/// 16 others seen, then `other`. Once given, an address keeps its label, across restarts
/// too: the named resolvers are kept in the pinned `DNS_RESOLVERS` map. Which resolvers
/// are Amazon's (learned later, from IMDS) is `dns_resolver_info`, never a label change.
pub struct ResolverLabels {
    amazon: LinkLocalResolvers,
    named: Vec<IpAddr>,
    amazon_seen: Vec<IpAddr>,
    pinned: Option<HashMap<MapData, Addr, u32>>,
}

impl ResolverLabels {
    /// Labels that continue from the resolvers named in `pinned`.
    pub fn new(amazon: LinkLocalResolvers, pinned: Option<HashMap<MapData, Addr, u32>>) -> Self {
        let mut named: Vec<IpAddr> = pinned
            .iter()
            .flat_map(|m| m.keys().filter_map(Result::ok))
            .map(addr_from_bytes)
            .collect();
        named.sort();
        Self {
            amazon,
            named,
            amazon_seen: Vec::new(),
            pinned,
        }
    }

    pub fn label(&mut self, ip: IpAddr) -> String {
        if self.named.contains(&ip) {
            return ip.to_string();
        }
        if self.amazon.contains(&ip) {
            if !self.amazon_seen.contains(&ip) {
                self.amazon_seen.push(ip);
            }
            return ip.to_string();
        }
        if self.named.len() < MAX_NAMED_RESOLVERS {
            self.named.push(ip);
            if let Some(map) = &mut self.pinned
                && let Err(e) = map.insert(crate::programs::addr_bytes(ip), 1, 0)
            {
                warn!("keeping the resolver label {ip}: {e}");
            }
            return ip.to_string();
        }
        "other".to_owned()
    }

    /// Every resolver labelled by its address, with its kind (`amazon`, `custom`).
    pub fn info(&self) -> Vec<(String, &'static str)> {
        let mut out: Vec<(String, &'static str)> = self
            .named
            .iter()
            .chain(&self.amazon_seen)
            .map(|ip| {
                let kind = if self.amazon.contains(ip) {
                    "amazon"
                } else {
                    "custom"
                };
                (ip.to_string(), kind)
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Unanswered queries by (device, server), in the pinned `DNS_UNANSWERED` map so that
/// the count survives the agent: the sweep adds to it, scrapes read it.
#[derive(Clone)]
pub struct Unanswered(Arc<Mutex<HashMap<MapData, DnsServerKey, u64>>>);

impl Unanswered {
    pub fn new(map: HashMap<MapData, DnsServerKey, u64>) -> Self {
        Self(Arc::new(Mutex::new(map)))
    }

    fn add(&self, counts: BTreeMap<(u32, Addr), u64>) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for ((ifindex, server), n) in counts {
            let key = DnsServerKey { ifindex, server };
            let total = map.get(&key, 0).unwrap_or(0) + n;
            if let Err(e) = map.insert(key, total, 0) {
                warn!("counting {n} unanswered DNS queries: {e}");
            }
        }
    }

    fn snapshot(&self) -> Vec<((u32, Addr), u64)> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.iter()
            .filter_map(Result::ok)
            .map(|(k, n)| ((k.ifindex, k.server), n))
            .collect()
    }
}

/// Minutes of unanswered queries kept per client: "recently".
pub const RECENT_MINUTES: u64 = 5;

/// Unanswered queries by (device, local client), per minute, for the last
/// `RECENT_MINUTES`: which pods' DNS is failing now. Kept by the sweep, in memory.
#[derive(Clone, Debug, Default)]
pub struct RecentClients(Arc<Mutex<VecDeque<(u64, ClientCounts)>>>);

/// Unanswered queries by (ifindex, client) in one minute.
type ClientCounts = StdHashMap<(u32, Addr), u64>;

impl RecentClients {
    fn add(&self, minute: u64, ifindex: u32, client: Addr) {
        let mut minutes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if minutes.back().is_none_or(|(m, _)| *m != minute) {
            minutes.push_back((minute, StdHashMap::new()));
        }
        while minutes
            .front()
            .is_some_and(|(m, _)| *m + RECENT_MINUTES <= minute)
        {
            minutes.pop_front();
        }
        if let Some((_, counts)) = minutes.back_mut() {
            *counts.entry((ifindex, client)).or_default() += 1;
        }
    }

    /// The `top` clients of each device by unanswered queries in the window ending at
    /// `minute`, most first (ties by address).
    pub fn top(&self, minute: u64, top: usize) -> BTreeMap<u32, Vec<(IpAddr, u64)>> {
        let minutes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut sums: StdHashMap<(u32, Addr), u64> = StdHashMap::new();
        for (_, counts) in minutes.iter().filter(|(m, _)| *m + RECENT_MINUTES > minute) {
            for (k, n) in counts {
                *sums.entry(*k).or_default() += n;
            }
        }
        top_per_device(sums, top)
    }
}

pub fn minute(now_ns: u64) -> u64 {
    now_ns / 60_000_000_000
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

/// Takes queries older than the timeout out of the table they wait in (`DNS_PENDING`, or
/// `DNS_INFLIGHT` on kernels without BPF atomics) and counts them. Runs on a thread of
/// its own: a full table is tens of thousands of queries.
pub struct Sweeper {
    pub inflight: MapData,
    pub pending: PendingTable,
    pub timeout: Duration,
    pub unanswered: Unanswered,
    pub recent: RecentClients,
}

impl Sweeper {
    /// One pass. `DNS_PENDING`: each expired way claimed in place. `DNS_INFLIGHT`: the
    /// table read in batches, each expired query deleted by key. Either way only the
    /// claimer counts it, so a response that matched in the meantime wins.
    pub fn sweep(&mut self, now_ns: u64) -> std::io::Result<()> {
        let timeout = u64::try_from(self.timeout.as_nanos()).unwrap_or(u64::MAX);
        let fd = std::os::fd::AsFd::as_fd(self.inflight.fd());
        let mut expired: Vec<(DnsFlightKey, u32)> = Vec::new();
        let this_minute = minute(now_ns);
        let mut counts: BTreeMap<(u32, Addr), u64> = BTreeMap::new();
        self.pending.sweep(now_ns.saturating_sub(timeout), |e| {
            *counts.entry((e.ifindex, e.key.server)).or_default() += 1;
            self.recent.add(this_minute, e.ifindex, e.key.client);
        });
        // SAFETY: DNS_INFLIGHT maps DnsFlightKey to DnsFlight, plain `#[repr(C)]` data.
        unsafe {
            batch::lookup_all::<DnsFlightKey, DnsFlight>(fd, 4096, |key, flight| {
                if now_ns.saturating_sub(flight.start_ns) >= timeout {
                    expired.push((*key, flight.ifindex));
                }
            })?;
        }
        for (key, ifindex) in expired {
            // SAFETY: as above.
            if unsafe { batch::delete_one(fd, &key)? } {
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

pub struct DnsCollector {
    pub recent: RecentClients,
    /// How many clients each device reports (`--top`).
    pub top: usize,
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
        devices: &BTreeMap<u32, crate::devices::Device>,
    ) -> Option<Labels2> {
        let d = devices.get(&ifindex)?;
        let resolver = self
            .resolvers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .label(addr_from_bytes(server));
        Some((d.name.clone(), resolver))
    }
}

impl DnsCollector {
    /// `top_dns_clients_unanswered`: who is failing, per device.
    fn encode_top_clients(
        &self,
        encoder: &mut DescriptorEncoder,
        devices: &BTreeMap<u32, crate::devices::Device>,
    ) -> Result<(), std::fmt::Error> {
        let mut clients = Vec::new();
        for (ifindex, top) in self.recent.top(minute(monotonic_ns()), self.top) {
            let Some(d) = devices.get(&ifindex) else {
                continue;
            };
            for (addr, n) in top {
                clients.push((
                    [("device", d.name.clone()), ("address", addr.to_string())],
                    i64::try_from(n).unwrap_or(i64::MAX),
                ));
            }
        }
        encode_gauges(
            encoder,
            "top_dns_clients_unanswered",
            "The local clients with the most DNS queries unanswered in the last 5 minutes (the --top of them per ENI).",
            clients,
        )
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
            match key.kind {
                DNS_QUERY => *queries.entry(labels).or_default() += n,
                DNS_RESPONSE => {
                    *responses
                        .entry((labels, rcode_name(key.rcode)))
                        .or_default() += n;
                }
                DNS_SUPERSEDED => *unanswered.entry(labels).or_default() += n,
                _ => {}
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
            "dns_queries",
            "DNS queries (UDP) leaving or entering through the ENI.",
            queries.into_iter().map(|(l, v)| (with(l), v)),
        )?;
        encode_counters(
            &mut encoder,
            "dns_responses",
            "DNS responses matched to a query, by response code.",
            responses.into_iter().map(|((l, rcode), v)| {
                let [d, r] = with(l);
                ([d, r, ("rcode", rcode)], v)
            }),
        )?;
        encode_counters(
            &mut encoder,
            "dns_unanswered",
            "DNS queries with no response within --dns-timeout, or before the client sent the same query again (same port and id).",
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
        self.encode_top_clients(&mut encoder, &devices)?;
        let info = self
            .resolvers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .info();
        encode_gauges(
            &mut encoder,
            "dns_resolver_info",
            "A resolver labelled by its address, and whether it is Amazon's (169.254.169.253, fd00:ec2::253, VPC+2); always 1.",
            info.into_iter().map(|(resolver, kind)| {
                ([("resolver", resolver), ("kind", kind.to_owned())], 1i64)
            }),
        )
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
    fn recent_clients_are_ranked_bounded_and_forgotten() {
        let r = RecentClients::default();
        let a = crate::programs::addr_bytes("10.210.1.2".parse().unwrap());
        let b = crate::programs::addr_bytes("10.210.2.2".parse().unwrap());
        let c = crate::programs::addr_bytes("10.210.3.2".parse().unwrap());
        for _ in 0..3 {
            r.add(100, 2, a);
        }
        r.add(100, 2, b);
        for _ in 0..2 {
            r.add(102, 2, c);
        }
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            r.top(102, 2)[&2],
            [(ip("10.210.1.2"), 3), (ip("10.210.3.2"), 2)]
        );
        // Five minutes on, minute 100 has gone.
        assert_eq!(r.top(105, 10)[&2], [(ip("10.210.3.2"), 2)]);
        assert!(r.top(107, 10).is_empty());
    }

    #[test]
    fn resolver_labels_are_addresses_bounded_and_stable() {
        let amazon = LinkLocalResolvers::default();
        for a in ["169.254.169.253", "fd00:ec2::253"] {
            amazon.add(a.parse().unwrap());
        }
        let mut labels = ResolverLabels::new(amazon.clone(), None);
        // Amazon's resolvers are named by address and never count against the bound.
        assert_eq!(
            labels.label("169.254.169.253".parse().unwrap()),
            "169.254.169.253"
        );
        assert_eq!(
            labels.label("fd00:ec2::253".parse().unwrap()),
            "fd00:ec2::253"
        );
        // VPC+2, seen before IMDS said it is Amazon's.
        assert_eq!(labels.label("10.0.0.2".parse().unwrap()), "10.0.0.2");
        for i in 1..MAX_NAMED_RESOLVERS {
            let ip: IpAddr = format!("192.0.2.{i}").parse().unwrap();
            assert_eq!(labels.label(ip), ip.to_string());
        }
        assert_eq!(labels.label("198.51.100.1".parse().unwrap()), "other");
        // The first ones keep their names.
        assert_eq!(labels.label("192.0.2.1".parse().unwrap()), "192.0.2.1");
        // IMDS names VPC+2: its label stays, its kind changes in the info metric.
        amazon.add("10.0.0.2".parse().unwrap());
        assert_eq!(labels.label("10.0.0.2".parse().unwrap()), "10.0.0.2");
        let info = labels.info();
        assert!(
            info.contains(&("10.0.0.2".to_owned(), "amazon")),
            "{info:?}"
        );
        assert!(info.contains(&("169.254.169.253".to_owned(), "amazon")));
        assert!(info.contains(&("192.0.2.1".to_owned(), "custom")));
        assert!(!info.iter().any(|(r, _)| r == "198.51.100.1"));
        assert_eq!(info.len(), MAX_NAMED_RESOLVERS + 2);
        // A later Amazon resolver is still named, past the bound.
        amazon.add("198.51.100.9".parse().unwrap());
        assert_eq!(
            labels.label("198.51.100.9".parse().unwrap()),
            "198.51.100.9"
        );
    }
}
