//! The flow tables: each flow once in its set or in `FLOWS`, the flow cache, closed
//! tuples begun again, the expiry pass and the tables' room.

use monitor::loader::Sizes;

use super::{frames::*, harness::*, root};

/// The expiry pass over `flows`, on `lo` (slot 0), with the model's default timeouts
/// but UDP's 30 s.
fn expiry_of(flows: monitor::loader::maps::Flows) -> monitor::housekeeping::Expiry {
    use monitor::{
        devices::{Device, Devices},
        housekeeping::Expiry,
        model::flows::{FlowCounts, Timeouts},
    };
    use std::time::Duration;
    let devices = Devices::default();
    devices.replace([Device {
        name: "lo".into(),
        ifindex: 1,
        eni: String::new(),
        mac: String::new(),
        slot: 0,
    }]);
    Expiry {
        flows,
        timeouts: Timeouts {
            tcp_established: Duration::from_hours(120),
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_mins(3),
        },
        tcp_established: monitor::model::instance::TcpEstablished::new(None),
        counts: FlowCounts::default(),
        devices,
        top: 10,
    }
}

#[test]
fn a_flow_refreshed_during_a_pass_is_not_deleted() {
    use monitor_common::{FLOW_AB, Flow, FlowClass, FlowKey};

    if !root::require_root("a_flow_refreshed_during_a_pass_is_not_deleted") {
        return;
    }
    let probe = loaded();
    let key = |port: u16| FlowKey {
        addr_a: [1, 0, 0, 0],
        addr_b: [2, 0, 0, 0],
        port_a: port,
        port_b: 53,
        ifindex: 1,
        proto: 17,
        pad: [0; 3],
    };
    let seen = |last_seen: u32| Flow::new(100, last_seen, FLOW_AB);
    let table = probe.maps.flows;
    // Both idle past the UDP timeout (30 s) at second 1000.
    table.table.insert(&key(1), &seen(900)).unwrap();
    table.table.insert(&key(2), &seen(900)).unwrap();
    let expiry = expiry_of(table);
    let (result, stale) = expiry.read(1000).unwrap();
    assert_eq!((stale.keys.len(), stale.freed), (2, 0));
    // Between the read and the deletes, a packet of flow 1 arrives.
    expiry.flows.table.insert(&key(1), &seen(1000)).unwrap();
    let (result, deleted) = expiry.reap(1000, result, &stale.keys).unwrap();
    assert_eq!(deleted, 1);
    assert_eq!(result.tracked.get(&(1, FlowClass::Udp)), Some(&1));
    assert_eq!(expiry.flows.table.get(&key(1)).unwrap(), Some(seen(1000)));
    assert_eq!(expiry.flows.table.get(&key(2)).unwrap(), None);
}

#[test]
fn the_flow_cache_passes_on_every_flag_and_every_flow() {
    use monitor_common::{FLOW_AB, FLOW_BA, FLOW_FIN_AB, FLOW_FIN_BA, FLOW_LOCAL_B, Flow, FlowKey};
    if !root::require_root("the_flow_cache_passes_on_every_flag_and_every_flow") {
        return;
    }
    let probe = loaded_with(Sizes::with_flows(8192));
    let table = |probe: &Probe| -> Vec<(FlowKey, Flow)> {
        let mut t = Vec::new();
        probe.maps.flows.for_each(|k, f| t.push((*k, *f))).unwrap();
        t
    };
    // Many packets one way, then one back, all within a second: the cached way must not
    // hide the new direction, nor the local side it brings.
    for _ in 0..100 {
        run(&probe, "tc_egress", &ipv4_tcp(SRC4, DST4, 40000, 443, 0x10));
    }
    run(
        &probe,
        "tc_ingress",
        &ipv4_tcp(DST4, SRC4, 443, 40000, 0x10),
    );
    let t = table(&probe);
    assert_eq!(t.len(), 1);
    // 10.0.0.2:443 sorts before 10.0.0.5:40000: side a is the server, side b local.
    let both = FLOW_AB | FLOW_BA | FLOW_LOCAL_B;
    assert_eq!(t[0].1.flags(), both, "{t:?}");
    // A FIN each way after the cached packets: both reach the table.
    run(&probe, "tc_egress", &ipv4_tcp(SRC4, DST4, 40000, 443, 0x11));
    run(
        &probe,
        "tc_ingress",
        &ipv4_tcp(DST4, SRC4, 443, 40000, 0x11),
    );
    assert_eq!(
        table(&probe)[0].1.flags(),
        both | FLOW_FIN_AB | FLOW_FIN_BA,
        "{t:?}"
    );
    // 3000 flows interleaved, several rounds: each is in the table once, none hidden by
    // another's cached way.
    for _ in 0..3 {
        for port in 1..=3000u16 {
            run(
                &probe,
                "tc_egress",
                &ipv4_udp(SRC4, DST4, 50000, port, 0, b"x"),
            );
        }
    }
    let t = table(&probe);
    assert_eq!(t.len(), 3001);
    let udp: Vec<_> = t.iter().filter(|(k, _)| k.proto == 17).collect();
    assert_eq!(udp.len(), 3000);
    // 10.0.0.2:port sorts first: the local sender is side b, seen sending b to a.
    assert!(udp.iter().all(|(_, f)| f.flags() == FLOW_BA | FLOW_LOCAL_B));
    // The same ports over IPv6 (another hash), and over UDP where TCP had them: flows of
    // their own, none hidden by the cached way of the flow it resembles.
    for _ in 0..3 {
        for port in 1..=3000u16 {
            run(&probe, "tc_egress", &ipv6_udp(50000, port, b"x"));
        }
    }
    run(
        &probe,
        "tc_egress",
        &ipv4_udp(SRC4, DST4, 40000, 443, 0, b"x"),
    );
    let t = table(&probe);
    assert_eq!(t.len(), 6002);
    assert_eq!(t.iter().filter(|(k, _)| k.proto == 6).count(), 1);
}

#[test]
fn a_syn_on_a_closed_tuple_is_a_live_connection_again() {
    use monitor_common::{FLOW_AB, FLOW_BA, FLOW_LOCAL_B, FLOW_RST, FlowClass};
    if !root::require_root("a_syn_on_a_closed_tuple_is_a_live_connection_again") {
        return;
    }
    let probe = loaded();
    let flow = |probe: &Probe| {
        let mut all = Vec::new();
        probe.maps.flows.for_each(|_, f| all.push(*f)).unwrap();
        assert_eq!(all.len(), 1, "{all:?}");
        all[0]
    };
    // A connection (SYN, SYN-ACK, ACK), then reset: closed, expired 5 s after.
    run(&probe, "tc_egress", &ipv4_tcp(SRC4, DST4, 40000, 443, 0x02));
    run(
        &probe,
        "tc_ingress",
        &ipv4_tcp(DST4, SRC4, 443, 40000, 0x12),
    );
    run(&probe, "tc_egress", &ipv4_tcp(SRC4, DST4, 40000, 443, 0x10));
    run(
        &probe,
        "tc_ingress",
        &ipv4_tcp(DST4, SRC4, 443, 40000, 0x04),
    );
    assert_ne!(flow(&probe).flags() & FLOW_RST, 0);
    assert_eq!(created(&probe.maps.flows_created, FlowClass::Tcp), 1);
    // The same 5-tuple opens again (a reused port behind SNAT): a live connection, no
    // close bits, counted as a new flow. A SYN-ACK on an open flow changes nothing.
    run(&probe, "tc_egress", &ipv4_tcp(SRC4, DST4, 40000, 443, 0x02));
    assert_eq!(flow(&probe).flags(), FLOW_BA | FLOW_LOCAL_B);
    run(
        &probe,
        "tc_ingress",
        &ipv4_tcp(DST4, SRC4, 443, 40000, 0x12),
    );
    assert_eq!(flow(&probe).flags(), FLOW_AB | FLOW_BA | FLOW_LOCAL_B);
    assert_eq!(created(&probe.maps.flows_created, FlowClass::Tcp), 2);
}

/// The flows in the sets, by set, and those in `FLOWS`.
fn flows_by_place(
    probe: &Probe,
) -> (
    Vec<Vec<monitor_common::FlowKey>>,
    Vec<monitor_common::FlowKey>,
) {
    let sets = &probe.maps.flows.sets;
    let mut in_sets = vec![Vec::new(); sets.sets()];
    for (s, keys) in in_sets.iter_mut().enumerate() {
        for i in 0..monitor_common::FLOW_SET_SLOTS {
            let slot = sets.get(s, i);
            if slot.is_valid() {
                let key = slot.flow().0;
                // The agent finds the set a flow lives in as the programs picked it.
                assert_eq!(sets.set_of(&key), Some(s));
                keys.push(key);
            }
        }
    }
    let mut in_table = Vec::new();
    probe
        .maps
        .flows
        .table
        .for_each(|k, _| in_table.push(*k))
        .unwrap();
    in_table.sort_by_key(|k| k.port_a);
    (in_sets, in_table)
}

/// Checks that each of `n` flows is in one place, and in `FLOWS` only if its set is full
/// and marked; the flows in `FLOWS`.
fn each_flow_once(probe: &Probe, n: usize) -> Vec<monitor_common::FlowKey> {
    let (in_sets, in_table) = flows_by_place(probe);
    let mut all: Vec<_> = in_sets.iter().flatten().chain(&in_table).copied().collect();
    assert_eq!(all.len(), n, "sets {in_sets:?} table {in_table:?}");
    all.sort_by_key(|k| k.port_a);
    all.dedup();
    assert_eq!(all.len(), n, "a flow in two places");
    for k in &in_table {
        let s = probe.maps.flows.sets.set_of(k).unwrap();
        assert_eq!(in_sets[s].len(), 2, "{k:?} spilled from a set with room");
        assert_ne!(
            probe.maps.flows.sets.get(s, 0).ctl & monitor_common::SET_SPILLED,
            0
        );
    }
    in_table
}

#[test]
fn ipv4_flows_fill_their_sets_then_the_table_each_flow_once() {
    use monitor_common::{FlowClass, SET_SPILLED};
    if !root::require_root("ipv4_flows_fill_their_sets_then_the_table_each_flow_once") {
        return;
    }
    if !monitor::kernel::has_atomics() {
        eprintln!("skipping: no BPF atomics, every flow is in FLOWS");
        return;
    }
    // 96 slots in 48 sets: 48 flows fill some sets past their two slots.
    let probe = loaded_with(Sizes::with_flows(128));
    let round = |probe: &Probe| {
        for port in 1..=48u16 {
            run(
                probe,
                "tc_egress",
                &ipv4_udp(SRC4, DST4, 40000, port, 0, b"x"),
            );
        }
    };
    round(&probe);
    let spilled = each_flow_once(&probe, 48);
    assert!(
        !spilled.is_empty(),
        "48 flows in 32 sets of two: some spill"
    );
    assert_eq!(created(&probe.maps.flows_created, FlowClass::Udp), 48);
    // Later packets find each flow where it is.
    round(&probe);
    round(&probe);
    assert_eq!(each_flow_once(&probe, 48), spilled);
    assert_eq!(created(&probe.maps.flows_created, FlowClass::Udp), 48);

    // The flows in FLOWS gone: the pass unmarks their sets, and their next packets find
    // the sets full, spill again, and are new flows.
    for k in &spilled {
        assert!(probe.maps.flows.table.delete(k).unwrap());
    }
    let expiry = expiry_of(probe.maps.flows);
    let (result, stale) = expiry.read(0).unwrap();
    assert!(stale.keys.is_empty());
    assert_eq!(
        result.tracked.get(&(1, FlowClass::Udp)),
        Some(&(48 - spilled.len() as u64))
    );
    let sets = &expiry.flows.sets;
    for s in 0..sets.sets() {
        assert_eq!(sets.get(s, 0).ctl & SET_SPILLED, 0, "set {s} still marked");
    }
    // Past the second the flow cache remembers them for.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    for port in 1..=48u16 {
        run_with(
            &probe.programs,
            "tc_egress",
            &ipv4_udp(SRC4, DST4, 40000, port, 0, b"x"),
        );
    }
    let mut again = Vec::new();
    expiry.flows.table.for_each(|k, _| again.push(*k)).unwrap();
    again.sort_by_key(|k| k.port_a);
    assert_eq!(again, spilled);
    for k in &again {
        let s = sets.set_of(k).unwrap();
        assert_ne!(sets.get(s, 0).ctl & SET_SPILLED, 0);
    }
    assert_eq!(
        created(&probe.maps.flows_created, FlowClass::Udp),
        48 + spilled.len() as u64
    );
}

#[test]
fn the_pass_frees_expired_slots_joins_a_flow_in_two_and_unmarks_sets() {
    use monitor_common::{
        FLOW_AB, FLOW_BA, FlowClass, FlowSlot, SET_SPILLED, SET_SPILLED_AGAIN, SLOT_FLAGS_SHIFT,
        SLOT_PROTO_SHIFT, SLOT_VALID,
    };
    if !root::require_root("the_pass_frees_expired_slots_joins_a_flow_in_two_and_unmarks_sets") {
        return;
    }
    let mut probe = loaded();
    // A UDP flow on lo between two IPv4 addresses, as a program writes it.
    let slot = |port: u16, last_seen: u32, flags: u8, marks: u64| FlowSlot {
        addrs: 0x0200_000a | (0x0500_000a << 32),
        ports_dev: u64::from(port) | (1 << 32),
        seen: 0x64 | (u64::from(last_seen) << 32),
        ctl: SLOT_VALID
            | marks
            | (u64::from(flags) << SLOT_FLAGS_SHIFT)
            | (17 << SLOT_PROTO_SHIFT)
            | (u64::from(port) << 24),
    };
    let sets = &mut probe.maps.flows.sets;
    // Set 0: one flow idle past UDP's 30 s at second 1000, one fresh.
    sets.write(0, 0, slot(1, 900, FLOW_AB, 0));
    sets.write(0, 1, slot(2, 990, FLOW_AB, 0));
    // Set 1: one flow in both slots (its first packets on two CPUs at once).
    sets.write(1, 0, slot(3, 980, FLOW_AB, SET_SPILLED));
    sets.write(1, 1, slot(3, 995, FLOW_BA, 0));
    // Set 2: marked, no flow of it in FLOWS, none spilled since.
    sets.write(2, 0, slot(4, 990, FLOW_AB, SET_SPILLED | SET_SPILLED_AGAIN));
    let expiry = expiry_of(probe.maps.flows);
    let (result, stale) = expiry.read(1000).unwrap();
    // The expired flow and the second copy of the doubled one.
    assert_eq!((stale.keys.len(), stale.freed), (0, 2));
    assert_eq!(result.tracked.get(&(1, FlowClass::Udp)), Some(&3));
    let sets = &expiry.flows.sets;
    assert!(!sets.get(0, 0).is_valid());
    assert_eq!(sets.get(0, 1), slot(2, 990, FLOW_AB, 0));
    assert_eq!(sets.get(1, 0), slot(3, 995, FLOW_AB | FLOW_BA, 0));
    assert!(!sets.get(1, 1).is_valid());
    assert_eq!(sets.get(2, 0), slot(4, 990, FLOW_AB, 0));

    // A flow that spills while the pass looks keeps its set marked.
    let mut sets = expiry.flows.sets;
    sets.write(3, 0, slot(5, 990, FLOW_AB, SET_SPILLED));
    let spilled = sets.begin_pass();
    sets.write(3, 0, slot(5, 990, FLOW_AB, SET_SPILLED | SET_SPILLED_AGAIN));
    sets.expire(&spilled, |_, _| false, |_, _| {});
    assert_eq!(sets.get(3, 0).ctl & SET_SPILLED, SET_SPILLED);
    // The next pass, with none spilled, unmarks it.
    let spilled = sets.begin_pass();
    sets.expire(&spilled, |_, _| false, |_, _| {});
    assert_eq!(sets.get(3, 0).ctl & SET_SPILLED, 0);
}

#[test]
fn the_tables_hold_the_flow_table_size_and_room_comes_back_as_flows_end() {
    use monitor_common::Flow;
    if !root::require_root("the_tables_hold_the_flow_table_size_and_room_comes_back_as_flows_end") {
        return;
    }
    let mut probe = loaded_with(Sizes::with_flows(8));
    let full =
        |probe: &Probe| -> u64 { probe.maps.flow_table_full.get(&0, 0).unwrap().iter().sum() };
    let send = |probe: &Probe, first: u16| {
        for port in first..first + 20 {
            run(
                probe,
                "tc_egress",
                &ipv4_udp(SRC4, DST4, 40000, port, 0, b"x"),
            );
        }
    };
    let flows = |probe: &Probe| {
        let mut all: Vec<Flow> = Vec::new();
        probe.maps.flows.for_each(|_, f| all.push(*f)).unwrap();
        all
    };
    send(&probe, 1);
    let held = flows(&probe);
    assert_eq!(held.len(), 8);
    assert_eq!(full(&probe), 12);
    if probe.atomics {
        assert_eq!(probe.maps.flows.count.held().unwrap(), 8);
    }
    // Every flow past UDP's timeout: the pass ends them all, and there is room again.
    let mut expiry = expiry_of(probe.maps.flows);
    expiry.pass(held[0].last_seen + 100).unwrap();
    let mut left = 0;
    expiry.flows.for_each(|_, _| left += 1).unwrap();
    assert_eq!(left, 0);
    if probe.atomics {
        assert_eq!(expiry.flows.count.held().unwrap(), 0);
    }
    probe.maps.flows = expiry.flows;
    send(&probe, 1000);
    assert_eq!(flows(&probe).len(), 8);
    assert_eq!(full(&probe), 24);
}
