//! Link-local traffic: the Amazon resolver is not a tracked flow, and a spray of
//! senders leaves the busy ones exact.

use monitor::{housekeeping::monotonic_ns, model::linklocal::Senders};
use monitor_common::{LL_SENDER_SECONDS, MapFull};

use super::{frames::*, harness::*, root};

#[test]
fn the_amazon_resolver_is_not_a_tracked_flow() {
    if !root::require_root("the_amazon_resolver_is_not_a_tracked_flow") {
        return;
    }
    let probe = loaded();
    let flows = |probe: &Probe| {
        let mut n = 0;
        probe.maps.flows.for_each(|_, _| n += 1).unwrap();
        n
    };
    let amazon = [169, 254, 169, 253];
    // A query to Amazon's resolver and its answer: link-local, counted as such, no flow.
    run(
        &probe,
        "tc_egress",
        &ipv4_udp(SRC4, amazon, 40000, 53, 0, &dns(1, 0x0100, 1, QUESTION)),
    );
    run(
        &probe,
        "tc_ingress",
        &ipv4_udp(amazon, SRC4, 53, 40000, 0, &dns(1, 0x8180, 1, QUESTION)),
    );
    let c = counts(&probe);
    assert_eq!((c.queries, c.responses, c.linklocal), (1, 1, 1));
    assert_eq!(flows(&probe), 0);
    // The same to a resolver of the VPC's own (a CoreDNS pod): a tracked flow.
    run(
        &probe,
        "tc_egress",
        &ipv4_udp(SRC4, DST4, 40000, 53, 0, &dns(2, 0x0100, 1, QUESTION)),
    );
    run(
        &probe,
        "tc_ingress",
        &ipv4_udp(DST4, SRC4, 53, 40000, 0, &dns(2, 0x8180, 1, QUESTION)),
    );
    assert_eq!(flows(&probe), 1);
    assert_eq!(counts(&probe).linklocal, 1);
}

#[test]
fn a_spray_of_link_local_senders_leaves_the_busy_ones_exact() {
    if !root::require_root("a_spray_of_link_local_senders_leaves_the_busy_ones_exact") {
        return;
    }
    // One CPU's table; all in one second of the programs' coarse clock (which lags by up
    // to a tick): 50 ms past a boundary.
    pin_to(0);
    let probe = loaded();
    let into = std::time::Duration::from_nanos(monotonic_ns() % 1_000_000_000);
    std::thread::sleep(std::time::Duration::from_millis(1050).saturating_sub(into));
    let amazon = [169, 254, 169, 253];
    let query = |src: [u8; 4]| ipv4_udp(src, amazon, 40000, 53, 0, &dns(1, 0x0100, 1, QUESTION));
    let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
    // Two pods at 700 and 300 packets, through a spray of 1000 addresses a packet each
    // (what a pod with CAP_NET_RAW can send).
    run(&probe, "tc_egress", &query(a));
    run(&probe, "tc_egress", &query(b));
    for k in 0..1000u16 {
        let [hi, lo] = k.to_be_bytes();
        run(&probe, "tc_egress", &query([10, 1, hi, lo]));
        if k < 699 {
            run(&probe, "tc_egress", &query(a));
        }
        if k < 299 {
            run(&probe, "tc_egress", &query(b));
        }
    }
    let second = monotonic_ns() / 1_000_000_000;
    let tables: Vec<_> = (0..LL_SENDER_SECONDS)
        .flat_map(|i| {
            probe
                .maps
                .ll_senders
                .get(&i, 0)
                .unwrap()
                .iter()
                .copied()
                .collect::<Vec<_>>()
        })
        .collect();
    let at = tables.iter().map(|t| u64::from(t.second)).max().unwrap();
    assert!(at == second || at + 1 == second, "{at} {second}");
    let mut senders = Senders::new(3);
    senders.gather(tables, at + 2);
    let busiest = senders.busiest(0, &std::collections::BTreeMap::from([(at, 2000)]));
    let named: Vec<(String, u64)> = busiest
        .iter()
        .map(|s| (s.addr.to_string(), s.packets))
        .collect();
    assert_eq!(
        named[..2],
        [("10.0.0.1".to_owned(), 700), ("10.0.0.2".to_owned(), 300)]
    );
    // The spray took turns in the sets' 30 other ways, each turn past them counted.
    assert_eq!(map_full(&probe, MapFull::LinkLocalSenders), 1000 - 30);
    assert_eq!(counts(&probe).linklocal, 2000);
}
