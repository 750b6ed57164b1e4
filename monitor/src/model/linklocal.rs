//! EC2's link-local services and the busiest second of the last minute (1024 packets/s
//! per ENI is the allowance).

use std::{collections::BTreeMap, net::IpAddr};

use monitor_common::{LL_WINDOW, LinkLocalSecond, LinkLocalService};

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

/// The highest per-second total in `(now - window, now]`, summing CPUs per second.
pub fn peak(slots: impl IntoIterator<Item = LinkLocalSecond>, now_second: u64) -> u64 {
    let oldest = now_second.saturating_sub(u64::from(LL_WINDOW) - 1);
    let mut per_second: BTreeMap<u64, u64> = BTreeMap::new();
    for s in slots {
        let second = u64::from(s.second);
        if s.packets > 0 && (oldest..=now_second).contains(&second) {
            *per_second.entry(second).or_default() += u64::from(s.packets);
        }
    }
    per_second.into_values().max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(second: u32, packets: u32) -> LinkLocalSecond {
        LinkLocalSecond { second, packets }
    }

    #[test]
    fn peak_sums_cpus_per_second_inside_the_window() {
        // Two CPUs counted second 100; second 30 is older than the window.
        let slots = [s(100, 300), s(100, 450), s(99, 600), s(30, 5000), s(0, 0)];
        assert_eq!(peak(slots, 100), 750);
        assert_eq!(peak(slots, 158), 750);
        assert_eq!(peak(slots, 159), 750);
        assert_eq!(peak(slots, 160), 0);
        assert_eq!(peak([], 100), 0);
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
