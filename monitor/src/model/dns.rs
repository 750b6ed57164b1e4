//! How DNS is reported: response codes by name, which resolvers are named in the
//! `resolver` label, and which clients' queries went unanswered recently.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError, RwLock},
};

use monitor_common::Addr;

use super::top::top_per_device;

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
pub struct AmazonResolvers(Arc<RwLock<HashSet<IpAddr>>>);

impl AmazonResolvers {
    /// Adds `ip`; false when it was known already.
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

/// Minutes of unanswered queries kept per client: "recently".
pub const RECENT_MINUTES: u64 = 5;
/// Each client's counts, by minute: (minute, count) in a ring of `RECENT_MINUTES`.
type Minutes = [(u64, u64); 5];
const _: () = assert!(RECENT_MINUTES == 5);

/// The minute of a `CLOCK_MONOTONIC` reading.
pub fn minute(now_ns: u64) -> u64 {
    now_ns / 60_000_000_000
}

/// Clients tracked at once: the heaviest stay, so that a flood from many addresses
/// cannot grow the agent, nor push out the client that fails the most.
pub const RECENT_CLIENTS: usize = 1024;

/// Unanswered queries by (device, local client) for the last `RECENT_MINUTES`, minute by
/// minute: which pods' DNS is failing now. Bounded: at most `RECENT_CLIENTS`, a new
/// client taking the place of the one with the fewest in the window. Kept by the sweep,
/// which also ranks it; scrapes read the ranking.
#[derive(Debug, Default)]
pub struct RecentClients {
    clients: HashMap<(u32, Addr), Minutes>,
}

fn in_window(minutes: &[(u64, u64)], minute: u64) -> u64 {
    minutes
        .iter()
        .filter(|(m, _)| *m + RECENT_MINUTES > minute && *m <= minute)
        .map(|(_, n)| n)
        .sum()
}

impl RecentClients {
    pub fn add(&mut self, minute: u64, ifindex: u32, client: Addr) {
        let key = (ifindex, client);
        if !self.clients.contains_key(&key) && self.clients.len() >= RECENT_CLIENTS {
            let fewest = self
                .clients
                .iter()
                .min_by_key(|(k, v)| (in_window(&v[..], minute), **k))
                .map(|(k, _)| *k);
            if let Some(k) = fewest {
                self.clients.remove(&k);
            }
        }
        let minutes = self.clients.entry(key).or_insert([(0, 0); 5]);
        let i = usize::try_from(minute % RECENT_MINUTES).unwrap_or(0);
        if minutes[i].0 != minute {
            minutes[i] = (minute, 0);
        }
        minutes[i].1 += 1;
    }

    /// The `top` clients of each device by unanswered queries in the window ending at
    /// `minute`, most first (ties by address); clients with none in the window are
    /// forgotten.
    pub fn top(&mut self, minute: u64, top: usize) -> BTreeMap<u32, Vec<(IpAddr, u64)>> {
        self.clients
            .retain(|_, minutes| in_window(&minutes[..], minute) > 0);
        top_per_device(
            self.clients
                .iter()
                .map(|(k, minutes)| (*k, in_window(&minutes[..], minute))),
            top,
        )
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

/// The last ranking of [`RecentClients`], shared with the collector.
#[derive(Clone, Debug, Default)]
pub struct RankedClients(Arc<Mutex<Ranking>>);

/// The busiest addresses of each device, most first.
pub type Ranking = BTreeMap<u32, Vec<(IpAddr, u64)>>;

impl RankedClients {
    pub fn set(&self, ranked: Ranking) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = ranked;
    }

    pub fn get(&self) -> Ranking {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use monitor_common::addr_from_ip;

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
        let mut r = RecentClients::default();
        let a = addr_from_ip("10.210.1.2".parse().unwrap());
        let b = addr_from_ip("10.210.2.2".parse().unwrap());
        let c = addr_from_ip("10.210.3.2".parse().unwrap());
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
        // Five minutes on, minute 100 has gone, and its clients with it.
        assert_eq!(r.top(105, 10)[&2], [(ip("10.210.3.2"), 2)]);
        assert_eq!(r.len(), 1);
        assert!(r.top(107, 10).is_empty());
        assert!(r.is_empty());
    }

    #[test]
    fn a_spray_of_clients_stays_bounded_and_keeps_the_heaviest() {
        let mut r = RecentClients::default();
        let heavy = addr_from_ip("10.210.9.9".parse().unwrap());
        for _ in 0..50 {
            r.add(7, 2, heavy);
        }
        for i in 0..10_000u32 {
            r.add(7, 2, [0, 0, monitor_common::V4_MAPPED_WORD, i.to_be()]);
        }
        assert_eq!(r.len(), RECENT_CLIENTS);
        assert_eq!(r.top(7, 1)[&2], [("10.210.9.9".parse().unwrap(), 50)]);
    }
}
