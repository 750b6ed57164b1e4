//! The DNS sweep: takes queries older than `--dns-timeout` out of the table they wait in
//! (`DNS_PENDING`, or `DNS_INFLIGHT` on kernels without BPF atomics) and counts them
//! unanswered under the resolver slot and transport they were counted under (a TCP
//! connection whose SYN waited as long, a connect failure); keeps the clients whose
//! queries go unanswered; and names resolvers by what it saw (the model's
//! `ResolverSlots`), telling the programs. Only the one that takes a query out counts
//! it, so a response that matched in the meantime wins. A query that began before this
//! agent's programs watched (left in the pinned table by an agent that stopped) may have
//! been answered while nobody looked: it is untracked, never unanswered, and such a
//! connection is no failure. Each pass also recounts every client's queries in flight,
//! which the programs hold each client's share of the table to.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use monitor_common::{
    DNS_CLIENT_BUCKETS, DNS_TCP, DNS_UDP, DnsCountKind, DnsFlightKey, FLIGHT_CONNECT,
    RESOLVER_OTHER, addr_to_ip,
};

use crate::{
    housekeeping::ResolverNames,
    loader::maps::InflightTable,
    model::{
        dns::{RankedClients, RecentClients, minute},
        resolvers::Activity,
    },
    tables::{
        dns::{DnsTables, SeenServers, SlotKey},
        pending::{ClientCounts, Expired, PendingTable},
    },
};

pub struct Sweeper {
    inflight: InflightTable,
    pending: PendingTable,
    timeout: Duration,
    dns: DnsTables,
    seen: SeenServers,
    /// The resolvers' names, which each pass may change.
    names: ResolverNames,
    recent: RecentClients,
    /// The ranking of `recent`, for the collector.
    ranked: RankedClients,
    /// How many clients each device reports (`--top`).
    top: usize,
    /// Each slot's query count at the last pass: a slot whose count moved was active.
    last_queries: BTreeMap<u8, u64>,
    /// Queries in flight per client, recounted each pass.
    clients: ClientCounts,
    /// `CLOCK_MONOTONIC` nanoseconds from which this agent's programs watch: a query that
    /// began earlier may have had its answer while none did.
    watching_since_ns: u64,
}

/// The kernel's tables of DNS queries the sweep walks: in flight (one table or the other,
/// by the kernel), each client's count of them, and the servers seen without a name.
pub struct SweptTables {
    pub inflight: InflightTable,
    pub pending: PendingTable,
    pub clients: ClientCounts,
    pub seen: SeenServers,
    pub dns: DnsTables,
}

impl Sweeper {
    /// A sweep of `tables` that declares a query unanswered `timeout` after it began,
    /// ranks into `ranked` the `top` clients of each device, and takes none that began
    /// before `watching_since_ns` for unanswered.
    pub fn new(
        tables: SweptTables,
        names: ResolverNames,
        timeout: Duration,
        ranked: RankedClients,
        top: usize,
        watching_since_ns: u64,
    ) -> Self {
        let SweptTables {
            inflight,
            pending,
            clients,
            seen,
            dns,
        } = tables;
        Self {
            last_queries: slot_queries(&dns),
            inflight,
            pending,
            timeout,
            dns,
            seen,
            names,
            recent: RecentClients::default(),
            ranked,
            top,
            clients,
            watching_since_ns,
        }
    }

    /// One pass at `now_ns` (`CLOCK_MONOTONIC`).
    pub fn sweep(&mut self, now_ns: u64) -> std::io::Result<()> {
        let expired = self.take_expired(now_ns)?;
        let this_minute = minute(now_ns);
        let failing = self.count(&expired, this_minute);
        self.ranked.set(self.recent.top(this_minute, self.top));
        self.name_resolvers(now_ns / 1_000_000_000, failing.into_iter().collect());
        Ok(())
    }

    /// Takes every query waiting past the timeout out of the table it waits in, and
    /// recounts each client's queries still in flight.
    fn take_expired(&mut self, now_ns: u64) -> std::io::Result<Vec<Expired>> {
        let timeout = u64::try_from(self.timeout.as_nanos()).unwrap_or(u64::MAX);
        let mut expired: Vec<Expired> = Vec::new();
        self.pending
            .sweep(now_ns.saturating_sub(timeout), |e| expired.push(e));
        let mut clients = vec![0u64; DNS_CLIENT_BUCKETS as usize];
        let mut stale: Vec<(DnsFlightKey, Expired)> = Vec::new();
        self.inflight.for_each(|key, flight| {
            if now_ns.saturating_sub(flight.start_ns) >= timeout {
                stale.push((
                    *key,
                    Expired {
                        key: *key,
                        start_ns: flight.start_ns,
                        ifindex: flight.ifindex,
                        resolver: flight.resolver,
                        egress: flight.egress != 0,
                    },
                ));
            } else if let Some(n) = clients.get_mut(self.clients.bucket(key.client)) {
                *n += 1;
            }
        })?;
        for (key, e) in stale {
            if self.inflight.delete(&key)? {
                expired.push(e);
            }
        }
        self.pending.for_each_waiting(|key| {
            if let Some(n) = clients.get_mut(self.clients.bucket(key.client)) {
                *n += 1;
            }
        });
        self.clients.set(&clients);
        Ok(expired)
    }

    /// Counts the expired queries (unanswered, refused, or untracked when they began
    /// before this agent watched), and the clients behind them; the servers that failed
    /// them, with how many.
    fn count(&mut self, expired: &[Expired], this_minute: u64) -> BTreeMap<IpAddr, u64> {
        let mut unanswered: BTreeMap<SlotKey, u64> = BTreeMap::new();
        let mut untracked: BTreeMap<SlotKey, u64> = BTreeMap::new();
        let mut refused: BTreeMap<SlotKey, u64> = BTreeMap::new();
        let mut failing: BTreeMap<IpAddr, u64> = BTreeMap::new();
        for e in expired {
            let transport = u8::try_from(e.key.what).unwrap_or(DNS_UDP);
            if e.start_ns < self.watching_since_ns {
                // Its answer may have come while no program watched.
                if e.key.what != FLIGHT_CONNECT {
                    *untracked
                        .entry((e.ifindex, e.resolver, transport))
                        .or_default() += 1;
                }
                continue;
            }
            *failing.entry(addr_to_ip(e.key.server)).or_default() += 1;
            // Under the slot its query was counted under: a slot drains for longer than
            // a query waits, so it still is that resolver's (or `other`).
            if e.key.what == FLIGHT_CONNECT {
                // A SYN to port 53 the server never answered.
                *refused.entry((e.ifindex, e.resolver, DNS_TCP)).or_default() += 1;
                continue;
            }
            *unanswered
                .entry((e.ifindex, e.resolver, transport))
                .or_default() += 1;
            // Only a local client's (a query that left through the device) is a pod's.
            if e.egress {
                self.recent.add(this_minute, e.ifindex, e.key.client);
            }
        }
        if !unanswered.is_empty() {
            self.dns.add(DnsCountKind::Unanswered, unanswered);
        }
        if !refused.is_empty() {
            self.dns.add(DnsCountKind::ConnectFailure, refused);
        }
        if !untracked.is_empty() {
            self.dns.add(DnsCountKind::Untracked, untracked);
        }
        failing
    }

    /// Names resolvers by what this pass saw, and tells the programs.
    fn name_resolvers(&mut self, now: u64, failing: Vec<(IpAddr, u64)>) {
        let queries = self.slot_queries();
        let active = queries
            .iter()
            .filter(|(s, n)| self.last_queries.get(s).is_none_or(|last| *n > last))
            .map(|(s, _)| *s)
            .collect();
        self.last_queries = queries;
        let activity = Activity {
            now,
            queried: self.seen.drain(),
            active,
            failing,
        };
        let changes = self.names.change(|slots| slots.pass(&activity));
        for slot in &changes.retired {
            self.last_queries.remove(slot);
        }
    }

    fn slot_queries(&self) -> BTreeMap<u8, u64> {
        slot_queries(&self.dns)
    }

    /// How often to sweep: often enough that a query is declared unanswered soon after
    /// its timeout, rarely enough to cost nothing.
    pub fn period(&self) -> Duration {
        (self.timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// Seconds a resolver slot given up drains before it is retired: every query counted
    /// under it has ended by then (answered, or swept a timeout later).
    pub fn grace(timeout: Duration) -> u64 {
        timeout.as_secs() + 2
    }
}

/// Queries counted under each slot but `other`, over every device: what the first pass
/// compares with, so that a restarted agent takes no slot for active on what it counted
/// before.
pub fn slot_queries(dns: &DnsTables) -> BTreeMap<u8, u64> {
    let mut out = BTreeMap::new();
    for (k, n) in dns.snapshot().counts {
        if k.kind == DnsCountKind::Query as u8 && k.resolver != RESOLVER_OTHER {
            *out.entry(k.resolver).or_default() += n;
        }
    }
    out
}
