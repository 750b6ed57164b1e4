//! The DNS counts, the programs' and the agent's, behind one lock; and the servers the
//! programs saw without a name.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

use aya::maps::{HashMap, MapData, PerCpuHashMap};
use log::warn;
use monitor_common::{
    Addr, DNS_LATENCY_BUCKETS, DnsCountKey, DnsCountKind, DnsLatency, DnsSlotKey, RESOLVER_OTHER,
    RESOLVER_RETIRED, addr_to_ip,
};

/// `DNS_SEEN`: servers without a slot that queries went to, least recently used out
/// first. The sweep drains it.
pub struct SeenServers(HashMap<MapData, Addr, u64>);

impl SeenServers {
    pub fn new(map: HashMap<MapData, Addr, u64>) -> Self {
        Self(map)
    }

    /// Every server seen since the last drain, with its rough count; the map left empty.
    pub fn drain(&mut self) -> Vec<(IpAddr, u64)> {
        let seen: Vec<(Addr, u64)> = self.0.iter().filter_map(Result::ok).collect();
        for (addr, _) in &seen {
            let _ = self.0.remove(addr);
        }
        seen.into_iter().map(|(a, n)| (addr_to_ip(a), n)).collect()
    }
}

/// (device, resolver slot, transport): what the agent's counts are kept by.
pub type SlotKey = (u32, u8, u8);

/// A latency histogram, summed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Histogram {
    pub buckets: [u64; DNS_LATENCY_BUCKETS],
    pub sum_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: [0; DNS_LATENCY_BUCKETS],
            sum_ns: 0,
        }
    }
}

impl Histogram {
    fn add(&mut self, l: &DnsLatency) {
        for (sum, b) in self.buckets.iter_mut().zip(l.buckets) {
            *sum += b;
        }
        self.sum_ns += l.sum_ns;
    }

    fn as_latency(&self) -> DnsLatency {
        DnsLatency {
            buckets: self.buckets,
            sum_ns: self.sum_ns,
        }
    }
}

/// The DNS counts of the programs and of the agent, summed by key.
#[derive(Clone, Debug, Default)]
pub struct DnsSnapshot {
    pub counts: BTreeMap<DnsCountKey, u64>,
    pub latency: BTreeMap<DnsSlotKey, Histogram>,
}

struct Tables {
    counts: PerCpuHashMap<MapData, DnsCountKey, u64>,
    latency: PerCpuHashMap<MapData, DnsSlotKey, DnsLatency>,
    agent_counts: HashMap<MapData, DnsCountKey, u64>,
    agent_latency: HashMap<MapData, DnsSlotKey, DnsLatency>,
}

/// The DNS counts: the programs' (`DNS_COUNTS`, `DNS_LATENCY`, per CPU) and the agent's
/// (`DNS_AGENT_COUNTS`, `DNS_AGENT_LATENCY`: unanswered queries, and the counts of slots
/// retired into `other`). One lock over all four: a scrape never sees a slot's counts
/// half moved.
#[derive(Clone)]
pub struct DnsTables(Arc<Mutex<Tables>>);

impl DnsTables {
    /// The four maps, the programs' (per CPU) then the agent's.
    pub fn new(
        counts: PerCpuHashMap<MapData, DnsCountKey, u64>,
        latency: PerCpuHashMap<MapData, DnsSlotKey, DnsLatency>,
        agent_counts: HashMap<MapData, DnsCountKey, u64>,
        agent_latency: HashMap<MapData, DnsSlotKey, DnsLatency>,
    ) -> Self {
        Self(Arc::new(Mutex::new(Tables {
            counts,
            latency,
            agent_counts,
            agent_latency,
        })))
    }

    /// Every count, the programs' and the agent's summed by key.
    pub fn snapshot(&self) -> DnsSnapshot {
        let t = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut snap = DnsSnapshot::default();
        for (k, per_cpu) in t.counts.iter().filter_map(Result::ok) {
            *snap.counts.entry(k).or_default() += per_cpu.iter().sum::<u64>();
        }
        for (k, n) in t.agent_counts.iter().filter_map(Result::ok) {
            *snap.counts.entry(k).or_default() += n;
        }
        for (k, per_cpu) in t.latency.iter().filter_map(Result::ok) {
            let h = snap.latency.entry(k).or_default();
            for l in per_cpu.iter() {
                h.add(l);
            }
        }
        for (k, l) in t.agent_latency.iter().filter_map(Result::ok) {
            snap.latency.entry(k).or_default().add(&l);
        }
        snap
    }

    /// Adds the agent's counts: `n` of `kind` for each (ifindex, resolver slot, transport).
    pub fn add(&self, kind: DnsCountKind, counts: impl IntoIterator<Item = (SlotKey, u64)>) {
        let mut t = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for ((ifindex, resolver, transport), n) in counts {
            let key = DnsCountKey {
                ifindex,
                resolver,
                kind: kind as u8,
                rcode: 0,
                transport,
            };
            add_count(&mut t.agent_counts, key, n);
        }
    }

    /// Deletes every count and latency of the devices `gone`, the programs' and the
    /// agent's.
    pub fn forget(&self, gone: &BTreeSet<u32>) {
        if gone.is_empty() {
            return;
        }
        let mut t = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for k in of_devices(t.counts.keys(), gone, |k| k.ifindex) {
            let _ = t.counts.remove(&k);
        }
        for k in of_devices(t.agent_counts.keys(), gone, |k| k.ifindex) {
            let _ = t.agent_counts.remove(&k);
        }
        for k in of_devices(t.latency.keys(), gone, |k| k.ifindex) {
            let _ = t.latency.remove(&k);
        }
        for k in of_devices(t.agent_latency.keys(), gone, |k| k.ifindex) {
            let _ = t.agent_latency.remove(&k);
        }
    }

    /// Moves to `retired` the counts of every slot but `other` and those in `named`: what
    /// a killed agent left in slots it had given up and not yet retired.
    pub fn retire_unnamed(&self, named: &[u8]) {
        let snapshot = self.snapshot();
        let mut left: Vec<u8> = snapshot
            .counts
            .keys()
            .map(|k| k.resolver)
            .chain(snapshot.latency.keys().map(|k| k.resolver))
            .filter(|s| *s != RESOLVER_OTHER && *s != RESOLVER_RETIRED && !named.contains(s))
            .collect();
        left.sort_unstable();
        left.dedup();
        for slot in left {
            self.retire(slot);
        }
    }

    /// Moves every count of resolver slot `slot` to `retired`: the programs' and the
    /// agent's keys of the slot are summed into the agent's `retired` keys and deleted,
    /// so that the slot starts from zero for whoever is named in it next.
    pub fn retire(&self, slot: u8) {
        let mut t = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        t.retire_counts(slot);
        t.retire_latency(slot);
    }
}

impl Tables {
    /// The counts of `slot`, the programs' and the agent's, summed into `retired`.
    fn retire_counts(&mut self, slot: u8) {
        let mut moved: BTreeMap<DnsCountKey, u64> = BTreeMap::new();
        let kernel: Vec<(DnsCountKey, u64)> = self
            .counts
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.resolver == slot)
            .map(|(k, per_cpu)| (k, per_cpu.iter().sum()))
            .collect();
        for (k, n) in &kernel {
            *moved.entry(*k).or_default() += n;
            let _ = self.counts.remove(k);
        }
        let agent: Vec<(DnsCountKey, u64)> = self
            .agent_counts
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.resolver == slot)
            .collect();
        for (k, n) in &agent {
            *moved.entry(*k).or_default() += n;
            let _ = self.agent_counts.remove(k);
        }
        for (k, n) in moved {
            let other = DnsCountKey {
                resolver: RESOLVER_RETIRED,
                ..k
            };
            add_count(&mut self.agent_counts, other, n);
        }
    }

    /// The latency of `slot`, the programs' and the agent's, summed into `retired` by
    /// (device, transport).
    fn retire_latency(&mut self, slot: u8) {
        let mut latency: BTreeMap<(u32, u8), Histogram> = BTreeMap::new();
        let kernel: Vec<(DnsSlotKey, Histogram)> = self
            .latency
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.resolver == slot)
            .map(|(k, per_cpu)| {
                let mut h = Histogram::default();
                per_cpu.iter().for_each(|l| h.add(l));
                (k, h)
            })
            .collect();
        for (k, h) in &kernel {
            let sum = latency.entry((k.ifindex, k.transport)).or_default();
            sum.add(&h.as_latency());
            let _ = self.latency.remove(k);
        }
        let agent: Vec<(DnsSlotKey, DnsLatency)> = self
            .agent_latency
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.resolver == slot)
            .collect();
        for (k, l) in &agent {
            latency.entry((k.ifindex, k.transport)).or_default().add(l);
            let _ = self.agent_latency.remove(k);
        }
        for ((ifindex, transport), h) in latency {
            let other = DnsSlotKey {
                ifindex,
                resolver: RESOLVER_RETIRED,
                transport,
                pad: 0,
            };
            let mut total = Histogram::default();
            if let Ok(l) = self.agent_latency.get(&other, 0) {
                total.add(&l);
            }
            total.add(&h.as_latency());
            if let Err(e) = self.agent_latency.insert(other, total.as_latency(), 0) {
                warn!("moving DNS latency to retired: {e}");
            }
        }
    }
}

/// The keys of a map's key iterator whose device (`ifindex`) is among `gone`.
fn of_devices<K>(
    keys: impl Iterator<Item = Result<K, aya::maps::MapError>>,
    gone: &BTreeSet<u32>,
    ifindex: impl Fn(&K) -> u32,
) -> Vec<K> {
    keys.filter_map(Result::ok)
        .filter(|k| gone.contains(&ifindex(k)))
        .collect()
}

fn add_count(map: &mut HashMap<MapData, DnsCountKey, u64>, key: DnsCountKey, n: u64) {
    let total = map.get(&key, 0).unwrap_or(0) + n;
    if let Err(e) = map.insert(key, total, 0) {
        warn!("counting {n} DNS queries: {e}");
    }
}
