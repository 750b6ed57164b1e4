//! How DNS is reported: response codes by name, which resolvers are named in the
//! `resolver` label, and which clients' queries went unanswered recently.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError, RwLock},
};

use monitor_common::Addr;

use super::top::top_per_device;

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

/// The `resolver` label: the server's address for Amazon's resolvers and for the first
/// 16 others seen, then `other`. Once given, an address keeps its label (the caller
/// keeps the named ones across restarts). Which resolvers are Amazon's (learned later,
/// from IMDS) is `dns_resolver_info`, never a label change.
#[derive(Debug)]
pub struct ResolverLabels {
    amazon: AmazonResolvers,
    named: Vec<IpAddr>,
    amazon_seen: Vec<IpAddr>,
}

/// A label, and whether it named an address for the first time.
#[derive(Debug, PartialEq, Eq)]
pub struct Label {
    pub text: String,
    pub newly_named: bool,
}

impl ResolverLabels {
    /// Labels that continue from the resolvers `named` before.
    pub fn new(amazon: AmazonResolvers, mut named: Vec<IpAddr>) -> Self {
        named.sort();
        Self {
            amazon,
            named,
            amazon_seen: Vec::new(),
        }
    }

    pub fn label(&mut self, ip: IpAddr) -> Label {
        let named = |newly_named| Label {
            text: ip.to_string(),
            newly_named,
        };
        if self.named.contains(&ip) {
            return named(false);
        }
        if self.amazon.contains(&ip) {
            if !self.amazon_seen.contains(&ip) {
                self.amazon_seen.push(ip);
            }
            return named(false);
        }
        if self.named.len() < MAX_NAMED_RESOLVERS {
            self.named.push(ip);
            return named(true);
        }
        Label {
            text: "other".to_owned(),
            newly_named: false,
        }
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

/// Minutes of unanswered queries kept per client: "recently".
pub const RECENT_MINUTES: u64 = 5;

/// The minute of a `CLOCK_MONOTONIC` reading.
pub fn minute(now_ns: u64) -> u64 {
    now_ns / 60_000_000_000
}

/// Unanswered queries by (device, local client), per minute, for the last
/// `RECENT_MINUTES`: which pods' DNS is failing now. Kept by the sweep, in memory.
#[derive(Clone, Debug, Default)]
pub struct RecentClients(Arc<Mutex<VecDeque<(u64, ClientCounts)>>>);

/// Unanswered queries by (ifindex, client) in one minute.
type ClientCounts = HashMap<(u32, Addr), u64>;

impl RecentClients {
    pub fn add(&self, minute: u64, ifindex: u32, client: Addr) {
        let mut minutes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if minutes.back().is_none_or(|(m, _)| *m != minute) {
            minutes.push_back((minute, HashMap::new()));
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
        let mut sums: HashMap<(u32, Addr), u64> = HashMap::new();
        for (_, counts) in minutes.iter().filter(|(m, _)| *m + RECENT_MINUTES > minute) {
            for (k, n) in counts {
                *sums.entry(*k).or_default() += n;
            }
        }
        top_per_device(sums, top)
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
        let r = RecentClients::default();
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
        // Five minutes on, minute 100 has gone.
        assert_eq!(r.top(105, 10)[&2], [(ip("10.210.3.2"), 2)]);
        assert!(r.top(107, 10).is_empty());
    }

    #[test]
    fn resolver_labels_are_addresses_bounded_and_stable() {
        let amazon = AmazonResolvers::default();
        for a in ["169.254.169.253", "fd00:ec2::253"] {
            amazon.add(a.parse().unwrap());
        }
        let mut labels = ResolverLabels::new(amazon.clone(), Vec::new());
        let text = |labels: &mut ResolverLabels, s: &str| labels.label(s.parse().unwrap()).text;
        // Amazon's resolvers are named by address and never count against the bound.
        assert_eq!(text(&mut labels, "169.254.169.253"), "169.254.169.253");
        assert_eq!(text(&mut labels, "fd00:ec2::253"), "fd00:ec2::253");
        // VPC+2, seen before IMDS said it is Amazon's: named, and to be kept.
        assert_eq!(
            labels.label("10.0.0.2".parse().unwrap()),
            Label {
                text: "10.0.0.2".to_owned(),
                newly_named: true
            }
        );
        for i in 1..MAX_NAMED_RESOLVERS {
            let ip: IpAddr = format!("192.0.2.{i}").parse().unwrap();
            assert_eq!(labels.label(ip).text, ip.to_string());
        }
        assert_eq!(text(&mut labels, "198.51.100.1"), "other");
        // The first ones keep their names, and are not named anew.
        assert_eq!(
            labels.label("192.0.2.1".parse().unwrap()),
            Label {
                text: "192.0.2.1".to_owned(),
                newly_named: false
            }
        );
        // IMDS names VPC+2: its label stays, its kind changes in the info metric.
        amazon.add("10.0.0.2".parse().unwrap());
        assert_eq!(text(&mut labels, "10.0.0.2"), "10.0.0.2");
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
        assert_eq!(text(&mut labels, "198.51.100.9"), "198.51.100.9");
    }

    #[test]
    fn labels_continue_from_the_names_kept() {
        let kept: Vec<IpAddr> = (0..MAX_NAMED_RESOLVERS)
            .map(|i| format!("192.0.2.{i}").parse().unwrap())
            .collect();
        let mut labels = ResolverLabels::new(AmazonResolvers::default(), kept);
        assert_eq!(labels.label("192.0.2.7".parse().unwrap()).text, "192.0.2.7");
        assert_eq!(labels.label("198.51.100.1".parse().unwrap()).text, "other");
    }
}
