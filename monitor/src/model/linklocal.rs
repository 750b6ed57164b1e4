//! EC2's link-local services, the busiest second of the last minute (1024 packets/s
//! per ENI is the allowance), and who sent that second's packets.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use monitor_common::{LL_WINDOW, LinkLocalSecond, LinkLocalSenders, LinkLocalService, addr_to_ip};

/// EC2's link-local service addresses.
pub const SERVICES: [(IpAddr, LinkLocalService); 6] = {
    use std::net::{Ipv4Addr, Ipv6Addr};
    const fn v6(last: u16) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, last))
    }
    [
        (
            IpAddr::V4(Ipv4Addr::new(169, 254, 169, 253)),
            LinkLocalService::Dns,
        ),
        (v6(0x253), LinkLocalService::Dns),
        (
            IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
            LinkLocalService::Imds,
        ),
        (v6(0x254), LinkLocalService::Imds),
        (
            IpAddr::V4(Ipv4Addr::new(169, 254, 169, 123)),
            LinkLocalService::Ntp,
        ),
        (v6(0x123), LinkLocalService::Ntp),
    ]
};

/// Each second's packets of one device, summing CPUs, inside `(now - window, now]`.
pub fn per_second(
    slots: impl IntoIterator<Item = LinkLocalSecond>,
    now_second: u64,
) -> BTreeMap<u64, u64> {
    let oldest = now_second.saturating_sub(u64::from(LL_WINDOW) - 1);
    let mut per_second: BTreeMap<u64, u64> = BTreeMap::new();
    for s in slots {
        let second = u64::from(s.second);
        if s.packets > 0 && (oldest..=now_second).contains(&second) {
            *per_second.entry(second).or_default() += u64::from(s.packets);
        }
    }
    per_second
}

/// A local address's packets to a link-local service in one second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sender {
    pub addr: IpAddr,
    pub service: LinkLocalService,
    pub packets: u64,
}

/// Each device's busiest senders in each second of the last minute, gathered from the
/// CPUs' tables once the second has ended. At most `top` a device a second, for the
/// seconds that had packets: bounded by devices × `LL_WINDOW` × `top`.
#[derive(Debug)]
pub struct Senders {
    /// By (slot, second), busiest first.
    seconds: BTreeMap<(u32, u64), Vec<Sender>>,
    /// Seconds up to this one are gathered.
    gathered: u64,
    top: usize,
}

impl Senders {
    pub fn new(top: usize) -> Self {
        Self {
            seconds: BTreeMap::new(),
            gathered: 0,
            top,
        }
    }

    /// Gathers from `tables` (every CPU's ring) the seconds that ended a second or more
    /// before `now_second`: a CPU whose coarse clock lags may still count the one just
    /// ended.
    pub fn gather(&mut self, tables: impl IntoIterator<Item = LinkLocalSenders>, now_second: u64) {
        let until = now_second.saturating_sub(2);
        let oldest = now_second.saturating_sub(u64::from(LL_WINDOW) - 1);
        let mut merged: HashMap<(u32, u64), HashMap<(IpAddr, u8), u64>> = HashMap::new();
        for t in tables {
            let second = u64::from(t.second);
            if second <= self.gathered || second > until || second < oldest {
                continue;
            }
            let used = t
                .senders
                .iter()
                .enumerate()
                .filter(|(i, _)| t.used & (1 << i) != 0);
            for (_, e) in used {
                *merged
                    .entry((u32::from(e.slot), second))
                    .or_default()
                    .entry((addr_to_ip(e.addr), e.service))
                    .or_default() += u64::from(e.packets);
            }
        }
        for (at, senders) in merged {
            let mut ranked: Vec<Sender> = senders
                .into_iter()
                .filter_map(|((addr, service), packets)| {
                    Some(Sender {
                        addr,
                        service: LinkLocalService::from_u32(u32::from(service))?,
                        packets,
                    })
                })
                .collect();
            ranked.sort_by(|a, b| {
                b.packets
                    .cmp(&a.packets)
                    .then(a.addr.cmp(&b.addr))
                    .then((a.service as u32).cmp(&(b.service as u32)))
            });
            ranked.truncate(self.top);
            self.seconds.insert(at, ranked);
        }
        self.gathered = self.gathered.max(until);
        self.seconds.retain(|(_, second), _| *second >= oldest);
    }

    /// The senders of `slot` in its busiest gathered second, by the device's `totals`
    /// per second (the latest of equals). A second the totals do not count (a slot
    /// given to a new device starts them again) names nobody.
    pub fn busiest(&self, slot: u32, totals: &BTreeMap<u64, u64>) -> &[Sender] {
        self.seconds
            .range((slot, 0)..=(slot, u64::MAX))
            .filter_map(|((_, second), s)| Some(((*totals.get(second)?, *second), s)))
            .max_by_key(|(at, _)| *at)
            .map_or(&[], |(_, s)| s.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(second: u32, packets: u32) -> LinkLocalSecond {
        LinkLocalSecond { second, packets }
    }

    #[test]
    fn seconds_sum_cpus_inside_the_window() {
        // Two CPUs counted second 100; second 30 is older than the window.
        let slots = [s(100, 300), s(100, 450), s(99, 600), s(30, 5000), s(0, 0)];
        let seconds = |now| per_second(slots, now).into_iter().collect::<Vec<_>>();
        assert_eq!(seconds(100), [(99, 600), (100, 750)]);
        assert_eq!(seconds(158), [(99, 600), (100, 750)]);
        assert_eq!(seconds(159), [(100, 750)]);
        assert_eq!(seconds(160), []);
        assert!(per_second([], 100).is_empty());
    }

    fn table(second: u32, senders: &[(&str, u8, u8, u32)]) -> LinkLocalSenders {
        let mut t = LinkLocalSenders {
            second,
            used: 0,
            senders: [monitor_common::LinkLocalSender::default(); monitor_common::LL_SENDERS],
        };
        for (i, (addr, slot, service, packets)) in senders.iter().enumerate() {
            // Scattered over the table, as the sets put them.
            let at = (i * 5) % monitor_common::LL_SENDERS;
            t.used |= 1 << at;
            t.senders[at] = monitor_common::LinkLocalSender {
                addr: monitor_common::addr_from_ip(addr.parse().unwrap()),
                packets: *packets,
                slot: *slot,
                service: *service,
                pad: [0; 2],
            };
        }
        t
    }

    #[test]
    fn senders_sum_cpus_per_second_and_name_the_busiest_second() {
        let mut s = Senders::new(2);
        let tables = [
            // Second 100 on two CPUs: pod .1 sent 400 + 300, pod .2 300, pod .3 5;
            // another device (slot 1) has its own.
            table(100, &[("10.0.0.1", 0, 0, 400), ("10.0.0.2", 0, 0, 300)]),
            table(
                100,
                &[
                    ("10.0.0.1", 0, 0, 300),
                    ("10.0.0.3", 0, 0, 5),
                    ("10.0.0.9", 1, 1, 7),
                ],
            ),
            // Second 101: quieter.
            table(101, &[("10.0.0.2", 0, 0, 50)]),
            // Second 102 has not ended a second ago at 103: not gathered yet.
            table(102, &[("10.0.0.4", 0, 0, 9000)]),
        ];
        s.gather(tables, 103);
        let ip = |a: &str| a.parse::<IpAddr>().unwrap();
        let totals = BTreeMap::from([(100, 1005), (101, 50), (102, 9000)]);
        let sender = |a: &str, packets| Sender {
            addr: ip(a),
            service: LinkLocalService::Dns,
            packets,
        };
        // The top 2 of the busiest gathered second.
        assert_eq!(
            s.busiest(0, &totals),
            [sender("10.0.0.1", 700), sender("10.0.0.2", 300)]
        );
        assert_eq!(
            s.busiest(1, &BTreeMap::from([(100, 7)])),
            [Sender {
                addr: ip("10.0.0.9"),
                service: LinkLocalService::Imds,
                packets: 7
            }]
        );
        // Totals that no longer count second 100 (the slot was given to a new device).
        assert_eq!(
            s.busiest(0, &BTreeMap::from([(101, 50)])),
            [sender("10.0.0.2", 50)]
        );
        assert!(s.busiest(0, &BTreeMap::new()).is_empty());
        // Second 102 once it ended a second ago; each second gathered once, however
        // often its table is read.
        s.gather(tables, 104);
        s.gather(tables, 104);
        assert_eq!(s.busiest(0, &totals), [sender("10.0.0.4", 9000)]);
        assert_eq!(
            s.busiest(0, &BTreeMap::from([(100, 1005)])),
            [sender("10.0.0.1", 700), sender("10.0.0.2", 300)]
        );
        // A minute on, all are gone.
        s.gather([], 102 + u64::from(LL_WINDOW));
        assert!(s.busiest(0, &totals).is_empty());
    }

    #[test]
    fn the_services_are_ec2s_addresses() {
        let names: Vec<String> = SERVICES.iter().map(|(ip, _)| ip.to_string()).collect();
        assert_eq!(
            names,
            [
                "169.254.169.253",
                "fd00:ec2::253",
                "169.254.169.254",
                "fd00:ec2::254",
                "169.254.169.123",
                "fd00:ec2::123"
            ]
        );
    }
}
