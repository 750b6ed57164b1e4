//! The recent filter of established TCP: a refresh once a period, never late by one,
//! and a full filter skips no first packet and no SYN, FIN or RST.

use monitor::{housekeeping::monotonic_ns, loader::Sizes};

use super::{frames::*, harness::*, root};

/// `CLOCK_MONOTONIC` seconds, the programs' clock.
fn now_s() -> u32 {
    u32::try_from(monotonic_ns() / 1_000_000_000).unwrap()
}

/// Sleeps until 200 ms into the next refresh period of `FLOW_RECENT` (clear of the
/// edge, where the programs' coarse clock may still read the last); that period.
fn next_period() -> u32 {
    let len = u64::from(monitor_common::FLOW_RECENT_PERIOD_S) * 1_000_000_000;
    let ns = monotonic_ns();
    let start = (ns / len + 1) * len + 200_000_000;
    std::thread::sleep(std::time::Duration::from_nanos(start - ns));
    monitor_common::recent_period(now_s())
}

/// The one TCP flow of `FLOWS`.
fn the_flow(probe: &Probe) -> (monitor_common::FlowKey, monitor_common::Flow) {
    let mut all = Vec::new();
    probe
        .maps
        .flows
        .table
        .for_each(|k, f| {
            if k.proto == 6 {
                all.push((*k, *f));
            }
        })
        .unwrap();
    assert_eq!(all.len(), 1, "{all:?}");
    all[0]
}

/// An open connection's segments write its flow's second once a refresh period: a
/// segment after the first of a period is skipped (the second the test wrote stays),
/// the first of the next period is written, and the flow's last second is never older
/// than the period's start while segments flow: late by less than a period.
#[test]
fn an_open_flow_is_refreshed_once_a_period_never_late_by_a_period() {
    use monitor_common::{FLOW_AB, FLOW_BA, FLOW_RECENT_PERIOD_S, Flow, recent_period};
    if !root::require_root("an_open_flow_is_refreshed_once_a_period_never_late_by_a_period") {
        return;
    }
    let probe = loaded();
    let out = ipv6_tcp(40000, 443, PSH_ACK, b"x");
    let back = ipv6_tcp_between(("fd00::5", 443), ("fd00::2", 40000), ACK, &[]);
    let p0 = next_period();
    run(&probe, "tc_egress", &out);
    run(&probe, "tc_ingress", &back);
    let (key, flow) = the_flow(&probe);
    assert_eq!(flow.flags() & (FLOW_AB | FLOW_BA), FLOW_AB | FLOW_BA);
    assert_eq!(recent_period(flow.last_seen), p0);
    // Its second zeroed: the segments of this period leave it so, both ways.
    let zeroed = Flow::new(flow.first_seen, 0, flow.flags());
    probe.maps.flows.table.insert(&key, &zeroed).unwrap();
    for _ in 0..10 {
        run(&probe, "tc_egress", &out);
        run(&probe, "tc_ingress", &back);
    }
    assert_eq!(the_flow(&probe).1, zeroed, "skipped within the period");
    // The next period's first segment writes it.
    let p1 = next_period();
    run(&probe, "tc_ingress", &back);
    let refreshed = the_flow(&probe).1;
    assert_eq!(recent_period(refreshed.last_seen), p1, "{refreshed:?}");
    assert_eq!(refreshed.flags(), flow.flags());
    // A segment every 100 ms for three periods: the flow's second is always in the
    // period the segment is in, less than a period behind it.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(12);
    let mut looked = 0;
    while std::time::Instant::now() < end {
        run(&probe, "tc_egress", &out);
        let before = monotonic_ns() % (u64::from(FLOW_RECENT_PERIOD_S) * 1_000_000_000);
        let last = the_flow(&probe).1.last_seen;
        let now = now_s();
        // Clear of a period's edge, where the programs' coarse clock may lag by a tick.
        if before > 100_000_000 && before < 3_900_000_000 {
            assert_eq!(recent_period(last), recent_period(now), "{last} at {now}");
            assert!(now - last < FLOW_RECENT_PERIOD_S, "{last} at {now}");
            looked += 1;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(looked > 80, "{looked} looks");
}

/// With every bit of the filter set (as if a million flows had been refreshed this
/// period), what changes EC2's tracking still reaches the tables: a UDP flow's first
/// packet, a SYN, a SYN-ACK, a FIN and a RST. Only segments without those flags are
/// skipped, a new connection's mid-stream segment among them, and that one begins its
/// flow in the next period (the pickup delay after a fresh install).
#[test]
fn a_full_filter_skips_no_first_packet_and_no_syn_fin_or_rst() {
    use monitor_common::{FLOW_FIN_AB, FLOW_FIN_BA, FLOW_RECENT_WORDS, FLOW_RST, FlowClass};
    if !root::require_root("a_full_filter_skips_no_first_packet_and_no_syn_fin_or_rst") {
        return;
    }
    for mut probe in both_objects(Sizes::with_flows(1024)) {
        let period = next_period();
        for i in 0..FLOW_RECENT_WORDS {
            let full = (u64::from(period) << 32) | 0xffff_ffff;
            probe.maps.flows.recent.set_word(i, full).unwrap();
        }
        assert_eq!(monitor_common::recent_period(now_s()), period);
        let flows = &probe.maps.flows_created;
        run(
            &probe,
            "tc_egress",
            &ipv4_udp(SRC4, DST4, 40000, 53, 0, b"x"),
        );
        assert_eq!(created(flows, FlowClass::Udp), 1);
        // A connection opened, both ways: every segment with SYN reaches the table.
        run(&probe, "tc_egress", &ipv6_tcp(40001, 443, SYN, &[]));
        let syn_ack = ipv6_tcp_between(("fd00::5", 443), ("fd00::2", 40001), SYN_ACK, &[]);
        run(&probe, "tc_ingress", &syn_ack);
        assert_eq!(created(flows, FlowClass::Tcp), 1);
        let open = the_flow(&probe).1.flags();
        // Its data is skipped; each FIN is not.
        run(&probe, "tc_egress", &ipv6_tcp(40001, 443, PSH_ACK, b"x"));
        run(&probe, "tc_egress", &ipv6_tcp(40001, 443, FIN_ACK, &[]));
        let fin_back = ipv6_tcp_between(("fd00::5", 443), ("fd00::2", 40001), FIN_ACK, &[]);
        run(&probe, "tc_ingress", &fin_back);
        let (key, closed) = the_flow(&probe);
        assert_eq!(
            closed.flags(),
            open | FLOW_FIN_AB | FLOW_FIN_BA,
            "{closed:?}"
        );
        probe.maps.flows.table.delete(&key).unwrap();
        // A RST on a connection the table had: applied.
        run(&probe, "tc_egress", &ipv6_tcp(40002, 443, SYN, &[]));
        run(&probe, "tc_egress", &ipv6_tcp(40002, 443, RST_ACK, &[]));
        assert_ne!(the_flow(&probe).1.flags() & FLOW_RST, 0);
        assert_eq!(created(flows, FlowClass::Tcp), 2);
        let (key, _) = the_flow(&probe);
        probe.maps.flows.table.delete(&key).unwrap();
        // A connection the table never saw, mid-stream: skipped this period, begun in
        // the next.
        let mid = ipv6_tcp(40003, 443, ACK, b"x");
        run(&probe, "tc_egress", &mid);
        assert_eq!(created(flows, FlowClass::Tcp), 2);
        next_period();
        run(&probe, "tc_egress", &mid);
        assert_eq!(created(flows, FlowClass::Tcp), 3);
        assert_eq!(created(flows, FlowClass::Udp), 1);
    }
}

/// The agent sizes the filter to the flows the tables hold: larger at once, smaller only
/// at half the fill. The programs look only at the words the size names: with every
/// word past them full, a flow's segment still reaches the table, and the segments after
/// it are skipped on the bit it set.
#[test]
fn the_filter_follows_the_flows_and_the_programs_use_the_size_it_names() {
    use monitor_common::{
        FLOW_RECENT_INDEX_BITS, FLOW_RECENT_MIN_INDEX_BITS, FLOW_RECENT_WORDS, Flow, recent_period,
    };
    if !root::require_root("the_filter_follows_the_flows_and_the_programs_use_the_size_it_names") {
        return;
    }
    let mut probe = loaded();
    let filter = &mut probe.maps.flows.recent;
    // Loaded with no flows pinned: the smallest.
    assert_eq!(filter.index_bits().unwrap(), FLOW_RECENT_MIN_INDEX_BITS);
    let sizes = [2000, 1500, 600, 500, 100_000, 20_000, 0].map(|n| filter.fit(n).unwrap());
    assert_eq!(sizes, [9, 9, 9, 8, FLOW_RECENT_INDEX_BITS, 14, 6]);
    assert_eq!(filter.index_bits().unwrap(), 6);
    let out = ipv6_tcp(40000, 443, PSH_ACK, b"x");
    let back = ipv6_tcp_between(("fd00::5", 443), ("fd00::2", 40000), ACK, &[]);
    run(&probe, "tc_egress", &out);
    run(&probe, "tc_ingress", &back);
    let (key, flow) = the_flow(&probe);
    let zeroed = Flow::new(flow.first_seen, 0, flow.flags());
    for (flows, bits) in [(0, 6), (2000, 9), (20_000, 13)] {
        // A period of its own for each size, its first second past the flow cache's.
        let period = next_period();
        let full = (u64::from(period) << 32) | 0xffff_ffff;
        let filter = &mut probe.maps.flows.recent;
        assert_eq!(filter.fit(flows).unwrap(), bits);
        for i in 0..FLOW_RECENT_WORDS {
            let word = if i < 1 << bits { 0 } else { full };
            filter.set_word(i, word).unwrap();
        }
        probe.maps.flows.table.insert(&key, &zeroed).unwrap();
        run(&probe, "tc_egress", &out);
        let written = the_flow(&probe).1;
        assert_eq!(
            recent_period(written.last_seen),
            period,
            "{bits} bits: {written:?}"
        );
        probe.maps.flows.table.insert(&key, &zeroed).unwrap();
        for _ in 0..5 {
            run(&probe, "tc_egress", &out);
            run(&probe, "tc_ingress", &back);
        }
        assert_eq!(the_flow(&probe).1, zeroed, "skipped at {bits} bits");
        assert_eq!(
            recent_period(now_s()),
            period,
            "the test crossed a period's edge"
        );
    }
}
