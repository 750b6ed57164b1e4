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
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap},
};
use monitor_common::{
    Addr, AddrInfo, DnsFlight, DnsFlightKey, DropKey, FLOW_COUNT_BEGUN, FLOW_COUNT_ENDED,
    FLOW_RECENT_SIZE, Flow, FlowClass, FlowKey, LL_WINDOW, LinkLocalSecond, LinkLocalSenders,
    LinkLocalService, RESOLVER_OTHER, SERVICE_NONE, addr_from_ip, addr_to_ip, recent_index_bits,
    recent_size_bits,
};

use crate::tables::{
    batch,
    dns::{DnsTables, SeenServers},
    flowsets::FlowSets,
    pending::{ClientCounts, PendingTable},
    slots::SlotArray,
};

/// The map names of the object, as the eBPF crate declares them.
pub mod names {
    pub const MONITORED: &str = "MONITORED";
    pub const MAP_FULL: &str = "MAP_FULL";
    pub const FLOWS: &str = "FLOWS";
    pub const FLOW_SETS: &str = "FLOW_SETS";
    pub const FLOW_COUNT: &str = "FLOW_COUNT";
    pub const FLOWS_CREATED: &str = "FLOWS_CREATED";
    pub const FLOW_TABLE_FULL: &str = "FLOW_TABLE_FULL";
    pub const DNS_INFLIGHT: &str = "DNS_INFLIGHT";
    pub const DNS_PENDING: &str = "DNS_PENDING";
    pub const DNS_CLIENTS: &str = "DNS_CLIENTS";
    pub const DNS_COUNTS: &str = "DNS_COUNTS";
    pub const DNS_LATENCY: &str = "DNS_LATENCY";
    pub const DNS_AGENT_COUNTS: &str = "DNS_AGENT_COUNTS";
    pub const DNS_AGENT_LATENCY: &str = "DNS_AGENT_LATENCY";
    pub const DNS_SEEN: &str = "DNS_SEEN";
    pub const HASH_KEYS: &str = "HASH_KEYS";
    pub const DROPS: &str = "DROPS";
    pub const UDP_QUEUE_DROPS: &str = "UDP_QUEUE_DROPS";
    pub const ADDRS: &str = "ADDRS";
    pub const LL_PACKETS: &str = "LL_PACKETS";
    pub const LL_SECONDS: &str = "LL_SECONDS";
    pub const LL_SENDER_TABLES: &str = "LL_SENDER_TABLES";
    pub const DNS_TCP_UNREAD: &str = "DNS_TCP_UNREAD";
    pub const FLOW_RECENT: &str = "FLOW_RECENT";

    /// The maps that carry state across a restart, pinned under the state directory.
    pub const PINNED: [&str; 18] = [
        MONITORED,
        FLOWS,
        FLOW_SETS,
        FLOW_COUNT,
        FLOWS_CREATED,
        FLOW_TABLE_FULL,
        DNS_INFLIGHT,
        DNS_PENDING,
        HASH_KEYS,
        DNS_COUNTS,
        DNS_LATENCY,
        DNS_AGENT_COUNTS,
        DNS_AGENT_LATENCY,
        ADDRS,
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

/// The raw data of an array, to map into the agent.
fn take_array(ebpf: &mut Ebpf, name: &str) -> Result<MapData> {
    match take(ebpf, name)? {
        Map::Array(data) => Ok(data),
        _ => Err(anyhow!("map {name} is not an array")),
    }
}

/// Every map the agent reads or writes, taken out of the object.
pub struct Maps {
    pub monitored: Monitored,
    pub map_full: PerCpuArray<MapData, u64>,
    pub flows: Flows,
    /// New flows per (slot, [`FlowClass`]).
    pub flows_created: SlotArray<u64>,
    pub flow_table_full: PerCpuArray<MapData, u64>,
    pub dns_inflight: InflightTable,
    pub dns_pending: PendingTable,
    /// Queries in flight per client bucket, which the sweep recounts.
    pub dns_clients: ClientCounts,
    pub dns: DnsTables,
    pub dns_seen: SeenServers,
    pub drops: PerCpuHashMap<MapData, DropKey, u64>,
    pub udp_queue_drops: PerCpuArray<MapData, u64>,
    pub addrs: Addresses,
    /// Packets per (slot, [`LinkLocalService`]).
    pub ll_packets: SlotArray<u64>,
    /// Per-second counts per (slot, second in the window).
    pub ll_seconds: SlotArray<LinkLocalSecond>,
    /// Each CPU's link-local senders of its last seconds.
    pub ll_senders: PerCpuArray<MapData, LinkLocalSenders>,
    /// TCP segments with DNS messages the programs left unread, per CPU.
    pub dns_tcp_unread: PerCpuArray<MapData, u64>,
}

impl Maps {
    /// The maps of `ebpf`, whose flow hash is keyed with `flow_seed` and DNS queries'
    /// (and their clients') with `dns_key`.
    pub(super) fn take(ebpf: &mut Ebpf, flow_seed: u64, dns_key: u32) -> Result<Self> {
        use names::{
            ADDRS, DNS_AGENT_COUNTS, DNS_AGENT_LATENCY, DNS_CLIENTS, DNS_COUNTS, DNS_INFLIGHT,
            DNS_LATENCY, DNS_PENDING, DNS_SEEN, DNS_TCP_UNREAD, DROPS, FLOW_COUNT, FLOW_RECENT,
            FLOW_SETS, FLOW_TABLE_FULL, FLOWS, FLOWS_CREATED, LL_PACKETS, LL_SECONDS,
            LL_SENDER_TABLES, MAP_FULL, MONITORED, UDP_QUEUE_DROPS,
        };
        let pending = PendingTable::map(take_array(ebpf, DNS_PENDING)?)
            .context("mapping DNS_PENDING into the agent")?;
        let dns_clients = ClientCounts::map(take_array(ebpf, DNS_CLIENTS)?, dns_key)
            .context("mapping DNS_CLIENTS into the agent")?;
        let sets = FlowSets::map(take_array(ebpf, FLOW_SETS)?, flow_seed)
            .context("mapping FLOW_SETS into the agent")?;
        Ok(Self {
            monitored: Monitored(take_typed(ebpf, MONITORED)?),
            map_full: take_typed(ebpf, MAP_FULL)?,
            flows: Flows {
                table: FlowTable(take_hash(ebpf, FLOWS)?),
                sets,
                count: FlowCount(take_typed(ebpf, FLOW_COUNT)?),
                recent: RecentFilter(take_typed(ebpf, FLOW_RECENT)?),
            },
            flows_created: SlotArray::new(take_typed(ebpf, FLOWS_CREATED)?, FlowClass::COUNT),
            flow_table_full: take_typed(ebpf, FLOW_TABLE_FULL)?,
            dns_inflight: InflightTable(take_hash(ebpf, DNS_INFLIGHT)?),
            dns_pending: pending,
            dns_clients,
            dns: DnsTables::new(
                take_typed(ebpf, DNS_COUNTS)?,
                take_typed(ebpf, DNS_LATENCY)?,
                take_typed(ebpf, DNS_AGENT_COUNTS)?,
                take_typed(ebpf, DNS_AGENT_LATENCY)?,
            ),
            dns_seen: SeenServers::new(take_typed(ebpf, DNS_SEEN)?),
            drops: take_typed(ebpf, DROPS)?,
            udp_queue_drops: take_typed(ebpf, UDP_QUEUE_DROPS)?,
            addrs: Addresses(Arc::new(Mutex::new(take_typed(ebpf, ADDRS)?))),
            ll_packets: SlotArray::new(take_typed(ebpf, LL_PACKETS)?, LinkLocalService::COUNT),
            ll_seconds: SlotArray::new(take_typed(ebpf, LL_SECONDS)?, LL_WINDOW),
            ll_senders: take_typed(ebpf, LL_SENDER_TABLES)?,
            dns_tcp_unread: take_typed(ebpf, DNS_TCP_UNREAD)?,
        })
    }
}

/// `FLOW_RECENT`: the established TCP flows the programs wrote this refresh period. It
/// empties itself as periods turn, so the agent neither reads nor clears its words; it
/// sizes it to the flows the tables hold (`FLOW_RECENT_SIZE`).
pub struct RecentFilter(Array<MapData, u64>);

impl RecentFilter {
    /// Word `index` (`period << 32 | bits`).
    pub fn word(&self, index: u32) -> Result<u64> {
        Ok(self.0.get(&index, 0)?)
    }

    pub fn set_word(&mut self, index: u32, word: u64) -> Result<()> {
        Ok(self.0.set(index, word, 0)?)
    }

    /// The index bits the programs use.
    pub fn index_bits(&self) -> Result<u32> {
        Ok(recent_size_bits(self.word(FLOW_RECENT_SIZE)?))
    }

    /// Sizes the filter for `flows`: larger at once when they need it, smaller only when
    /// they would fit at half the fill, so that a count moving about one size does not
    /// turn it over each pass (each change sends every flow's next segment to the tables
    /// once, as a period's turn does). The index bits after it.
    pub fn fit(&mut self, flows: u64) -> Result<u32> {
        let word = self.word(FLOW_RECENT_SIZE)?;
        let now = recent_size_bits(word);
        let want = recent_index_bits(flows);
        let bits = if want > now {
            want
        } else {
            recent_index_bits(flows.saturating_mul(2)).min(now)
        };
        if u64::from(bits) != word {
            self.set_word(FLOW_RECENT_SIZE, u64::from(bits))?;
        }
        Ok(bits)
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

/// `ADDRS`: what the programs are told of an address: the link-local service it is, and
/// the resolver slot it counts under. Written by the agent alone (at start, by the IMDS
/// labeller, by the sweep), read by the programs.
#[derive(Clone)]
pub struct Addresses(Arc<Mutex<HashMap<MapData, Addr, AddrInfo>>>);

impl Addresses {
    fn update(&self, ip: IpAddr, f: impl FnOnce(&mut AddrInfo)) -> Result<()> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let key = addr_from_ip(ip);
        let mut info = map.get(&key, 0).unwrap_or(AddrInfo {
            service: SERVICE_NONE,
            resolver: RESOLVER_OTHER,
            pad: [0; 2],
        });
        f(&mut info);
        if info.service == SERVICE_NONE && info.resolver == RESOLVER_OTHER {
            return match map.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(e).with_context(|| format!("removing {ip} from ADDRS")),
            };
        }
        map.insert(key, info, 0)
            .with_context(|| format!("adding {ip} to ADDRS"))
    }

    /// `ip` is link-local `service`.
    pub fn set_service(&self, ip: IpAddr, service: LinkLocalService) -> Result<()> {
        self.update(ip, |i| i.service = service as u8)
    }

    /// `ip` counts under resolver `slot` (`RESOLVER_OTHER`: no slot).
    pub fn set_resolver(&self, ip: IpAddr, slot: u8) -> Result<()> {
        self.update(ip, |i| i.resolver = slot)
    }

    /// Every address with a resolver slot, as a previous agent left them.
    pub fn resolvers(&self) -> Vec<(IpAddr, u8)> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.iter()
            .filter_map(Result::ok)
            .filter(|(_, i)| i.resolver != RESOLVER_OTHER)
            .map(|(a, i)| (addr_to_ip(a), i.resolver))
            .collect()
    }
}

/// The flows of both tables: `FLOW_SETS` (IPv4 flows while their set has room, on
/// kernels with BPF atomics) and `FLOWS` (the rest). A flow is in one or the other.
pub struct Flows {
    pub table: FlowTable,
    pub sets: FlowSets,
    pub count: FlowCount,
    /// The filter of established TCP flows in front of both, sized to the flows they hold.
    pub recent: RecentFilter,
}

impl Flows {
    /// Calls `f` with every flow of both tables.
    pub fn for_each(&self, mut f: impl FnMut(&FlowKey, &Flow)) -> std::io::Result<()> {
        self.sets.for_each(&mut f);
        self.table.for_each(f)
    }

    /// Counts the flows the tables hold, before the programs run: what `FLOW_COUNT`
    /// starts from (pinned tables hold what a previous agent left).
    pub fn recount(&mut self) -> Result<()> {
        let mut n = 0u64;
        self.for_each(|_, _| n += 1)?;
        self.recent.fit(n)?;
        self.count.start(n)
    }
}

/// `FLOW_COUNT`: flows the programs began and flows the agent's passes ended, whose
/// difference the programs hold to `--flow-table-size` where the two tables together
/// have more room (kernels with BPF atomics).
pub struct FlowCount(Array<MapData, u64>);

impl FlowCount {
    fn start(&mut self, flows: u64) -> Result<()> {
        self.0.set(FLOW_COUNT_BEGUN, flows, 0)?;
        self.0.set(FLOW_COUNT_ENDED, 0, 0)?;
        Ok(())
    }

    /// Counts `n` more flows ended (the agent is the only writer).
    pub fn ended(&mut self, n: u64) -> Result<()> {
        if n > 0 {
            let ended = self.0.get(&FLOW_COUNT_ENDED, 0)?;
            self.0.set(FLOW_COUNT_ENDED, ended + n, 0)?;
        }
        Ok(())
    }

    /// Flows the tables hold by the count.
    pub fn held(&self) -> Result<u64> {
        let begun = self.0.get(&FLOW_COUNT_BEGUN, 0)?;
        Ok(begun.saturating_sub(self.0.get(&FLOW_COUNT_ENDED, 0)?))
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
        // SAFETY: FLOWS maps FlowKey to Flow, both plain `#[repr(C)]` data.
        unsafe { batch::lookup_one(self.0.fd().as_fd(), key) }
    }

    /// Deletes `key`; false when it was gone already.
    pub fn delete(&self, key: &FlowKey) -> std::io::Result<bool> {
        // SAFETY: FLOWS maps FlowKey to Flow, both plain `#[repr(C)]` data.
        unsafe { batch::delete_one(self.0.fd().as_fd(), key) }
    }

    /// Writes a flow as a packet would (for tests that stand in for packets).
    pub fn insert(&self, key: &FlowKey, flow: &Flow) -> std::io::Result<()> {
        // SAFETY: FLOWS maps FlowKey to Flow, both plain `#[repr(C)]` data.
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
        // SAFETY: DNS_INFLIGHT maps DnsFlightKey to DnsFlight, plain `#[repr(C)]` data.
        unsafe { batch::delete_one(self.0.fd().as_fd(), key) }
    }
}
