//! The object's maps: each name written once, each map taken out of the object once,
//! into the typed handle its one owner holds.

use std::{
    net::IpAddr,
    os::fd::AsFd as _,
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, PerCpuArray, PerCpuHashMap},
};
use log::warn;
use monitor_common::{
    Addr, DnsCountKey, DnsFlight, DnsFlightKey, DnsLatency, DnsServerKey, DropKey, Flow, FlowClass,
    FlowKey, LL_WINDOW, LinkLocalSecond, LinkLocalService, addr_from_ip, addr_to_ip,
};

use super::{batch, pending::PendingTable, slots::SlotArray};

/// The map names of the object, as the eBPF crate declares them.
pub mod names {
    pub const MONITORED: &str = "MONITORED";
    pub const MAP_FULL: &str = "MAP_FULL";
    pub const FLOWS: &str = "FLOWS";
    pub const FLOWS_CREATED: &str = "FLOWS_CREATED";
    pub const FLOW_TABLE_FULL: &str = "FLOW_TABLE_FULL";
    pub const DNS_INFLIGHT: &str = "DNS_INFLIGHT";
    pub const DNS_PENDING: &str = "DNS_PENDING";
    pub const DNS_COUNTS: &str = "DNS_COUNTS";
    pub const DNS_LATENCY: &str = "DNS_LATENCY";
    pub const DNS_UNANSWERED: &str = "DNS_UNANSWERED";
    pub const DNS_RESOLVERS: &str = "DNS_RESOLVERS";
    pub const DROPS: &str = "DROPS";
    pub const UDP_QUEUE_DROPS: &str = "UDP_QUEUE_DROPS";
    pub const LINKLOCAL: &str = "LINKLOCAL";
    pub const LL_PACKETS: &str = "LL_PACKETS";
    pub const LL_SECONDS: &str = "LL_SECONDS";

    /// The maps that carry state across a restart, pinned under the state directory.
    pub const PINNED: [&str; 14] = [
        MONITORED,
        FLOWS,
        FLOWS_CREATED,
        FLOW_TABLE_FULL,
        DNS_INFLIGHT,
        DNS_PENDING,
        DNS_COUNTS,
        DNS_LATENCY,
        DNS_UNANSWERED,
        DNS_RESOLVERS,
        DROPS,
        UDP_QUEUE_DROPS,
        LL_PACKETS,
        LL_SECONDS,
    ];
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the object"))
}

fn take_typed<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    T::try_from(take(ebpf, name)?).with_context(|| format!("map {name}"))
}

/// The raw data of a hash map, for the batch operations.
fn take_hash(ebpf: &mut Ebpf, name: &str) -> Result<MapData> {
    match take(ebpf, name)? {
        Map::HashMap(data) => Ok(data),
        _ => Err(anyhow!("map {name} is not a hash map")),
    }
}

/// Every map the agent reads or writes, taken out of the object.
pub struct Maps {
    pub monitored: Monitored,
    pub map_full: PerCpuArray<MapData, u64>,
    pub flows: FlowTable,
    /// New flows per (slot, [`FlowClass`]).
    pub flows_created: SlotArray<u64>,
    pub flow_table_full: PerCpuArray<MapData, u64>,
    pub dns_inflight: InflightTable,
    pub dns_pending: PendingTable,
    pub dns_counts: PerCpuHashMap<MapData, DnsCountKey, u64>,
    pub dns_latency: PerCpuHashMap<MapData, DnsServerKey, DnsLatency>,
    pub dns_unanswered: UnansweredCounts,
    pub dns_resolvers: ResolverNames,
    pub drops: PerCpuHashMap<MapData, DropKey, u64>,
    pub udp_queue_drops: PerCpuArray<MapData, u64>,
    pub linklocal: LinkLocalAddrs,
    /// Packets per (slot, [`LinkLocalService`]).
    pub ll_packets: SlotArray<u64>,
    /// Per-second counts per (slot, second in the window).
    pub ll_seconds: SlotArray<LinkLocalSecond>,
}

impl Maps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self> {
        use names::{
            DNS_COUNTS, DNS_INFLIGHT, DNS_LATENCY, DNS_PENDING, DNS_RESOLVERS, DNS_UNANSWERED,
            DROPS, FLOW_TABLE_FULL, FLOWS, FLOWS_CREATED, LINKLOCAL, LL_PACKETS, LL_SECONDS,
            MAP_FULL, MONITORED, UDP_QUEUE_DROPS,
        };
        let pending = match take(ebpf, DNS_PENDING)? {
            Map::Array(data) => {
                PendingTable::map(data).context("mapping DNS_PENDING into the agent")?
            }
            _ => return Err(anyhow!("map {DNS_PENDING} is not an array")),
        };
        Ok(Self {
            monitored: Monitored(take_typed(ebpf, MONITORED)?),
            map_full: take_typed(ebpf, MAP_FULL)?,
            flows: FlowTable(take_hash(ebpf, FLOWS)?),
            flows_created: SlotArray::new(take_typed(ebpf, FLOWS_CREATED)?, FlowClass::COUNT),
            flow_table_full: take_typed(ebpf, FLOW_TABLE_FULL)?,
            dns_inflight: InflightTable(take_hash(ebpf, DNS_INFLIGHT)?),
            dns_pending: pending,
            dns_counts: take_typed(ebpf, DNS_COUNTS)?,
            dns_latency: take_typed(ebpf, DNS_LATENCY)?,
            dns_unanswered: UnansweredCounts(Arc::new(Mutex::new(take_typed(
                ebpf,
                DNS_UNANSWERED,
            )?))),
            dns_resolvers: ResolverNames(take_typed(ebpf, DNS_RESOLVERS)?),
            drops: take_typed(ebpf, DROPS)?,
            udp_queue_drops: take_typed(ebpf, UDP_QUEUE_DROPS)?,
            linklocal: LinkLocalAddrs(take_typed(ebpf, LINKLOCAL)?),
            ll_packets: SlotArray::new(take_typed(ebpf, LL_PACKETS)?, LinkLocalService::COUNT),
            ll_seconds: SlotArray::new(take_typed(ebpf, LL_SECONDS)?, LL_WINDOW),
        })
    }
}

/// `MONITORED`: interface index to slot, what the programs count under.
pub struct Monitored(HashMap<MapData, u32, u32>);

impl Monitored {
    /// Every (ifindex, slot).
    pub fn entries(&self) -> Vec<(u32, u32)> {
        self.0.iter().filter_map(Result::ok).collect()
    }

    /// Makes the map equal to `devices` as (name, ifindex, slot).
    pub fn set<'a>(
        &mut self,
        devices: impl IntoIterator<Item = (&'a str, u32, u32)>,
    ) -> Result<()> {
        let devices: Vec<_> = devices.into_iter().collect();
        let stale: Vec<u32> = self
            .0
            .keys()
            .filter_map(Result::ok)
            .filter(|i| !devices.iter().any(|(_, ifindex, _)| ifindex == i))
            .collect();
        for ifindex in stale {
            self.0
                .remove(&ifindex)
                .with_context(|| format!("removing ifindex {ifindex} from MONITORED"))?;
        }
        for (name, ifindex, slot) in devices {
            self.0
                .insert(ifindex, slot, 0)
                .with_context(|| format!("adding {name} to MONITORED"))?;
        }
        Ok(())
    }
}

/// `LINKLOCAL`: link-local service addresses (and VPC+2 resolvers) to their service.
pub struct LinkLocalAddrs(HashMap<MapData, Addr, u32>);

impl LinkLocalAddrs {
    pub fn add(&mut self, ip: IpAddr, service: LinkLocalService) -> Result<()> {
        self.0
            .insert(addr_from_ip(ip), service as u32, 0)
            .with_context(|| format!("adding {ip} to LINKLOCAL"))
    }
}

/// `DNS_RESOLVERS`: the resolvers named by address, pinned with the counts they label.
pub struct ResolverNames(HashMap<MapData, Addr, u32>);

impl ResolverNames {
    pub fn named(&self) -> Vec<IpAddr> {
        self.0
            .keys()
            .filter_map(Result::ok)
            .map(addr_to_ip)
            .collect()
    }

    pub fn keep(&mut self, ip: IpAddr) {
        if let Err(e) = self.0.insert(addr_from_ip(ip), 1, 0) {
            warn!("keeping the resolver label {ip}: {e}");
        }
    }
}

/// `DNS_UNANSWERED`: unanswered queries by (device, server), pinned so that the count
/// survives the agent. The sweep adds to it, scrapes read it.
#[derive(Clone)]
pub struct UnansweredCounts(Arc<Mutex<HashMap<MapData, DnsServerKey, u64>>>);

impl UnansweredCounts {
    /// Adds `n` to each (ifindex, server).
    pub fn add(&self, counts: impl IntoIterator<Item = ((u32, Addr), u64)>) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for ((ifindex, server), n) in counts {
            let key = DnsServerKey { ifindex, server };
            let total = map.get(&key, 0).unwrap_or(0) + n;
            if let Err(e) = map.insert(key, total, 0) {
                warn!("counting {n} unanswered DNS queries: {e}");
            }
        }
    }

    pub fn snapshot(&self) -> Vec<((u32, Addr), u64)> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.iter()
            .filter_map(Result::ok)
            .map(|(k, n)| ((k.ifindex, k.server), n))
            .collect()
    }
}

/// `FLOWS`, read in batches by the expiry pass.
pub struct FlowTable(MapData);

impl FlowTable {
    /// Calls `f` with every flow, a few thousand a syscall.
    pub fn for_each(&self, f: impl FnMut(&FlowKey, &Flow)) -> std::io::Result<()> {
        // SAFETY: FLOWS maps FlowKey to Flow, both plain `#[repr(C)]` data.
        unsafe { batch::lookup_all(self.0.fd().as_fd(), 4096, f) }
    }

    pub fn get(&self, key: &FlowKey) -> std::io::Result<Option<Flow>> {
        // SAFETY: as above.
        unsafe { batch::lookup_one(self.0.fd().as_fd(), key) }
    }

    /// Deletes `key`; false when it was gone already.
    pub fn delete(&self, key: &FlowKey) -> std::io::Result<bool> {
        // SAFETY: as above.
        unsafe { batch::delete_one(self.0.fd().as_fd(), key) }
    }

    /// Writes a flow as a packet would (for tests that stand in for packets).
    pub fn insert(&self, key: &FlowKey, flow: &Flow) -> std::io::Result<()> {
        // SAFETY: as above.
        unsafe { batch::update_one(self.0.fd().as_fd(), key, flow) }
    }
}

/// `DNS_INFLIGHT`, the queries in flight on kernels without BPF atomics.
pub struct InflightTable(MapData);

impl InflightTable {
    /// Calls `f` with every query in flight.
    pub fn for_each(&self, f: impl FnMut(&DnsFlightKey, &DnsFlight)) -> std::io::Result<()> {
        // SAFETY: DNS_INFLIGHT maps DnsFlightKey to DnsFlight, plain `#[repr(C)]` data.
        unsafe { batch::lookup_all(self.0.fd().as_fd(), 4096, f) }
    }

    /// Deletes `key`; false when a response (or another sweep) took it first.
    pub fn delete(&self, key: &DnsFlightKey) -> std::io::Result<bool> {
        // SAFETY: as above.
        unsafe { batch::delete_one(self.0.fd().as_fd(), key) }
    }
}
