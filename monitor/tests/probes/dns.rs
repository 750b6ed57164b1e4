//! DNS over UDP: queries matched to responses, malformed headers, a full table,
//! resolver slots, IPv6 extension headers and the sweep of queries in flight.

use monitor::loader::Sizes;
use monitor_common::{DnsCountKind, DnsFlightKey, MapFull, addr_from_ip};

use super::{frames::*, harness::*, root};

#[test]
fn a_query_and_its_response_are_matched() {
    on_both_objects(
        "a_query_and_its_response_are_matched",
        Sizes::with_flows(1024),
        query_and_response_matched,
    );
}

fn query_and_response_matched(probe: &Probe) {
    let query = ipv4_udp(SRC4, DST4, 40000, 53, 0, &dns(7, 0x0100, 1, QUESTION));
    assert_eq!(run(probe, "tc_egress", &query), TC_ACT_UNSPEC);
    assert_eq!(counts(probe), Counts::dns(1, 0, 0, 0, 1));
    // The same query again is a retransmission: still one in flight, the first copy
    // unanswered.
    run(probe, "tc_egress", &query);
    assert_eq!(counts(probe), Counts::dns(2, 0, 1, 0, 1));
    // A response with another id, or from another port, matches nothing.
    run(
        probe,
        "tc_ingress",
        &ipv4_udp(DST4, SRC4, 53, 40000, 0, &dns(8, 0x8180, 1, QUESTION)),
    );
    run(
        probe,
        "tc_ingress",
        &ipv4_udp(DST4, SRC4, 53, 40001, 0, &dns(7, 0x8180, 1, QUESTION)),
    );
    assert_eq!(counts(probe), Counts::dns(2, 0, 1, 0, 1));
    let response = ipv4_udp(DST4, SRC4, 53, 40000, 0, &dns(7, 0x8183, 1, QUESTION));
    assert_eq!(run(probe, "tc_ingress", &response), TC_ACT_UNSPEC);
    assert_eq!(counts(probe), Counts::dns(2, 1, 1, 0, 0));
    // A duplicate response is not a second answer.
    run(probe, "tc_ingress", &response);
    assert_eq!(counts(probe), Counts::dns(2, 1, 1, 0, 0));
    // IPv6, and the link-local resolver.
    run(
        probe,
        "tc_egress",
        &ipv6_udp(40000, 53, &dns(9, 0x0100, 1, QUESTION)),
    );
    run(
        probe,
        "tc_egress",
        &ipv4_udp(
            SRC4,
            [169, 254, 169, 253],
            40000,
            53,
            0,
            &dns(10, 0x0100, 1, QUESTION),
        ),
    );
    assert_eq!(
        counts(probe),
        Counts {
            queries: 4,
            responses: 1,
            superseded: 1,
            untracked: 0,
            inflight: 2,
            linklocal: 1,
            refused: 0,
        }
    );
}

#[test]
fn malformed_dns_moves_no_count() {
    if !root::require_root("malformed_dns_moves_no_count") {
        return;
    }
    let probe = loaded();
    let good = dns(1, 0x0100, 1, QUESTION);
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("no payload", ipv4_udp(SRC4, DST4, 40000, 53, 0, &[])),
        (
            "1-byte payload",
            ipv4_udp(SRC4, DST4, 40000, 53, 0, &[0x42]),
        ),
        (
            "11-byte header",
            ipv4_udp(SRC4, DST4, 40000, 53, 0, &good[..11]),
        ),
        (
            "qdcount 0",
            ipv4_udp(SRC4, DST4, 40000, 53, 0, &dns(2, 0x0100, 0, &[])),
        ),
        (
            "opcode NOTIFY",
            ipv4_udp(SRC4, DST4, 40000, 53, 0, &dns(3, 0x2000, 1, QUESTION)),
        ),
        (
            "query from port 53 to elsewhere",
            ipv4_udp(SRC4, DST4, 53, 40000, 0, &good),
        ),
        (
            "later fragment",
            ipv4_udp(SRC4, DST4, 40000, 53, 0x0010, &good),
        ),
        ("IPv6 short header", ipv6_udp(40000, 53, &good[..5])),
        (
            "IPv6 qdcount 0",
            ipv6_udp(40000, 53, &dns(4, 0x0100, 0, &[])),
        ),
        ("not DNS", ipv4_udp(SRC4, DST4, 40000, 5353, 0, &good)),
    ];
    // Packets that end inside the UDP or DNS header. (A test run refuses frames that
    // end inside the IP header itself, so those cannot be driven through here.)
    let full = ipv4_udp(SRC4, DST4, 40000, 53, 0, &good);
    for cut in [34, 36, 41, 45] {
        cases.push(("truncated IPv4", full[..cut].to_vec()));
    }
    let full6 = ipv6_udp(40000, 53, &good);
    for cut in [54, 57, 61, 70] {
        cases.push(("truncated IPv6", full6[..cut].to_vec()));
    }
    let mut bad_ihl = full.clone();
    bad_ihl[ETH_HLEN] = 0x4f; // a 60-byte IP header in a packet that has none of it
    cases.push(("IHL beyond the packet", bad_ihl));
    let mut short_ihl = full.clone();
    short_ihl[ETH_HLEN] = 0x43;
    cases.push(("IHL below 20", short_ihl));
    for (what, packet) in &cases {
        for program in ["tc_egress", "tc_ingress"] {
            assert_eq!(run(&probe, program, packet), TC_ACT_UNSPEC, "{what}");
            assert_eq!(
                counts(&probe),
                Counts::default(),
                "{what} through {program}"
            );
        }
    }
    // A first fragment carries the header, so a fragmented query is still a query;
    // a name that loops through compression pointers is never parsed, so cannot loop.
    run(
        &probe,
        "tc_egress",
        &ipv4_udp(SRC4, DST4, 40000, 53, 0x2000, &good),
    );
    run(
        &probe,
        "tc_egress",
        &ipv4_udp(
            SRC4,
            DST4,
            40001,
            53,
            0,
            &dns(5, 0x0100, 1, b"\xc0\x0c\x00\x01\x00\x01"),
        ),
    );
    assert_eq!(counts(&probe), Counts::dns(2, 0, 0, 0, 2));
}

#[test]
fn random_dns_headers_count_only_standard_queries() {
    if !root::require_root("random_dns_headers_count_only_standard_queries") {
        return;
    }
    let probe = loaded();
    // xorshift64: reproducible without a dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut expected = 0;
    for i in 0..2000u16 {
        let len = usize::try_from(next() % 40).unwrap();
        let payload: Vec<u8> = (0..len)
            .map(|_| u8::try_from(next() & 0xff).unwrap())
            .collect();
        let dport = if next() % 2 == 0 {
            53
        } else {
            u16::try_from(next() & 0xffff).unwrap()
        };
        // Distinct client ports: every counted query is a new one in flight.
        let packet = ipv4_udp(SRC4, DST4, 1024 + i, dport, 0, &payload);
        run(&probe, "tc_egress", &packet);
        let standard_query = payload.len() >= 12
            && payload[2] & 0x80 == 0
            && payload[2] & 0x78 == 0
            && (payload[4], payload[5]) != (0, 0);
        if dport == 53 && standard_query {
            expected += 1;
        }
    }
    assert!(
        expected > 10,
        "the generator should produce some valid queries"
    );
    let c = counts(&probe);
    assert_eq!((c.queries, c.responses, c.linklocal), (expected, 0, 0));
    assert_eq!(c.inflight, usize::try_from(expected).unwrap());
    // Random bytes as whole frames: nothing panics the verifier-checked program, and
    // only frames that happen to be valid could count (checked to be none here).
    for _ in 0..2000 {
        let len = 15 + usize::try_from(next() % 120).unwrap();
        let frame: Vec<u8> = (0..len)
            .map(|_| u8::try_from(next() & 0xff).unwrap())
            .collect();
        assert_eq!(run(&probe, "tc_ingress", &frame), TC_ACT_UNSPEC);
    }
    assert_eq!(counts(&probe).queries, expected);
}

#[test]
fn a_full_table_of_queries_in_flight_is_counted_not_silent() {
    if !root::require_root("a_full_table_of_queries_in_flight_is_counted_not_silent") {
        return;
    }
    // Room for four queries whichever table this kernel uses (one set of four ways).
    let sizes = Sizes {
        flows: 1024,
        dns_inflight: 4,
        dns_pending_sets: 1,
    };
    for probe in both_objects(sizes) {
        full_table_counted(&probe);
    }
}

fn full_table_counted(probe: &Probe) {
    // Clients A to E: A = SRC4, the others beside it.
    let client = |c: u8| [10, 0, 0, 100 + c];
    let query =
        |c: u8, id: u16| ipv4_udp(client(c), DST4, 40000, 53, 0, &dns(id, 0x0100, 1, QUESTION));
    let answer =
        |c: u8, id: u16| ipv4_udp(DST4, client(c), 53, 40000, 0, &dns(id, 0x8180, 1, QUESTION));
    // What each client holds, as the agent's sweep counts it from the table.
    let counted = |held: &[(u8, u64)]| {
        let clients = &probe.maps.dns_clients;
        let mut counts = vec![0; monitor_common::DNS_CLIENT_BUCKETS as usize];
        for (c, n) in held {
            counts[clients.bucket(addr_from_ip(client(*c).into()))] = *n;
        }
        clients.set(&counts);
    };
    run(probe, "tc_egress", &query(0, 0));
    // A retransmission of a query in flight is not a full table: it takes the copy's way.
    run(probe, "tc_egress", &query(0, 0));
    assert_eq!(map_full(probe, MapFull::DnsInflight), 0);
    counted(&[(0, 1)]);
    run(probe, "tc_egress", &query(0, 1));
    for c in 1..=3 {
        run(probe, "tc_egress", &query(c, 0));
    }
    counted(&[(0, 1), (1, 1), (2, 1), (3, 1)]);
    run(probe, "tc_egress", &query(4, 0));
    // With sets (one of four ways here), each client holds at most a quarter of the
    // table: A's second query is refused, B, C and D take the free ways, and E, holding
    // none, makes room from the heaviest client's oldest (A's first). The hash table of
    // older kernels (four entries here, the share of its full size) refuses whatever
    // finds it full: D and E. Every query ends answered, unanswered, untracked or in
    // flight.
    let c = counts(probe);
    assert_eq!(
        (c.queries, c.superseded, c.untracked, c.inflight),
        (7, 1, 2, 4),
        "{c:?}"
    );
    assert_eq!(c.queries, c.superseded + c.untracked + c.inflight as u64);
    assert_eq!(map_full(probe, MapFull::DnsInflight), 2);
    assert_eq!(map_full(probe, MapFull::DnsCounts), 0);
    // (client, id) of the queries the table did not keep, and of those waiting.
    let (ended, waiting) = if probe.atomics {
        ([(0u8, 0u16), (0, 1)], [(1u8, 0u16), (2, 0), (3, 0), (4, 0)])
    } else {
        ([(3, 0), (4, 0)], [(0, 0), (0, 1), (1, 0), (2, 0)])
    };
    for (c, id) in ended {
        run(probe, "tc_ingress", &answer(c, id));
    }
    assert_eq!(
        counts(probe).responses,
        0,
        "an untracked query's response matches nothing"
    );
    for (c, id) in waiting {
        run(probe, "tc_ingress", &answer(c, id));
    }
    let c = counts(probe);
    assert_eq!((c.responses, c.inflight), (4, 0), "{c:?}");
}

#[test]
fn queries_count_under_their_resolvers_slot_and_the_rest_under_other() {
    use monitor_common::{RESOLVER_OTHER, RESOLVER_RETIRED};
    if !root::require_root("queries_count_under_their_resolvers_slot_and_the_rest_under_other") {
        return;
    }
    for mut probe in both_objects(Sizes::with_flows(1024)) {
        // DST4 named in slot 3; 10.0.0.9 has no slot.
        probe
            .maps
            .addrs
            .set_resolver(std::net::IpAddr::from(DST4), 3)
            .unwrap();
        let unnamed = [10, 0, 0, 9];
        for (server, id) in [(DST4, 1), (DST4, 2), (unnamed, 3)] {
            run(
                &probe,
                "tc_egress",
                &ipv4_udp(SRC4, server, 40000, 53, 0, &dns(id, 0x0100, 1, QUESTION)),
            );
        }
        // The slot is taken away while query 2 waits: its response still counts where
        // its query did.
        probe
            .maps
            .addrs
            .set_resolver(std::net::IpAddr::from(DST4), RESOLVER_OTHER)
            .unwrap();
        for (server, id) in [(DST4, 2), (unnamed, 3)] {
            run(
                &probe,
                "tc_ingress",
                &ipv4_udp(server, SRC4, 53, 40000, 0, &dns(id, 0x8180, 1, QUESTION)),
            );
        }
        let s = by_slot(&probe);
        assert_eq!(s.get(&(3, DnsCountKind::Query)), Some(&2), "{s:?}");
        assert_eq!(s.get(&(3, DnsCountKind::Response)), Some(&1), "{s:?}");
        assert_eq!(s.get(&(RESOLVER_OTHER, DnsCountKind::Query)), Some(&1));
        assert_eq!(s.get(&(RESOLVER_OTHER, DnsCountKind::Response)), Some(&1));
        // Only the server without a slot is noted for the agent to consider.
        let seen = probe.maps.dns_seen.drain();
        assert_eq!(seen, [(std::net::IpAddr::from(unnamed), 1)]);
        assert!(probe.maps.dns_seen.drain().is_empty());
        // Retired (as a restarted agent retires a slot it finds no name for): the slot's
        // counts move to `retired`, never into `other`, and the slot starts from zero.
        probe.maps.dns.retire_unnamed(&[]);
        let s = by_slot(&probe);
        assert_eq!(s.get(&(3, DnsCountKind::Query)), None, "{s:?}");
        assert_eq!(s.get(&(RESOLVER_RETIRED, DnsCountKind::Query)), Some(&2));
        assert_eq!(s.get(&(RESOLVER_RETIRED, DnsCountKind::Response)), Some(&1));
        assert_eq!(s.get(&(RESOLVER_OTHER, DnsCountKind::Query)), Some(&1));
        assert_eq!(s.get(&(RESOLVER_OTHER, DnsCountKind::Response)), Some(&1));
    }
}

#[test]
fn dns_past_ipv6_extension_headers_is_seen_a_later_fragment_is_not() {
    if !root::require_root("dns_past_ipv6_extension_headers_is_seen_a_later_fragment_is_not") {
        return;
    }
    let probe = loaded();
    let q = dns(7, 0x0100, 1, QUESTION);
    // Hop-by-hop and destination options, then UDP: a query.
    run(
        &probe,
        "tc_egress",
        &ipv6_udp_past(&[(0, 8), (60, 16)], 0, 40000, 53, &q),
    );
    // A routing header, then the first fragment: a query too.
    run(
        &probe,
        "tc_egress",
        &ipv6_udp_past(&[(43, 24), (44, 8)], 0, 40001, 53, &q),
    );
    assert_eq!(counts(&probe).queries, 2);
    // A later fragment has no ports; five extension headers are more than are walked.
    run(
        &probe,
        "tc_egress",
        &ipv6_udp_past(&[(44, 8)], 100, 40002, 53, &q),
    );
    run(
        &probe,
        "tc_egress",
        &ipv6_udp_past(
            &[(0, 8), (60, 8), (60, 8), (60, 8), (60, 8)],
            0,
            40003,
            53,
            &q,
        ),
    );
    assert_eq!(counts(&probe).queries, 2);
}

#[test]
fn the_sweep_takes_expired_queries_once_and_ways_a_killed_agent_held() {
    use monitor_common::{PENDING_FREE, PENDING_WAITING, PENDING_WRITING};

    use monitor::tables::pending::{Expired, PendingTable};
    if !root::require_root("the_sweep_takes_expired_queries_once_and_ways_a_killed_agent_held") {
        return;
    }
    let mut table = loaded().maps.dns_pending;
    let key = |id: u16| DnsFlightKey {
        client: addr_from_ip(SRC4.into()),
        server: addr_from_ip(DST4.into()),
        client_port: 40000,
        id,
        what: 0,
    };
    // Way 0 waiting since 100 ns, way 1 since 10 s, way 2 held by an agent that died
    // holding it, way 3 free.
    let set = table.set_mut(7);
    set.state = [
        PENDING_WAITING,
        PENDING_WAITING,
        PENDING_WRITING,
        PENDING_FREE,
    ];
    set.start_ns = [100, 10_000_000_000, 50, 0];
    set.ifindex = [3, 3, 4, 0];
    set.resolver = [5, 5, 0, 0];
    set.egress = [1, 1, 0, 0];
    set.key = [key(1), key(2), key(3), key(4)];
    let sweep = |table: &mut PendingTable| {
        let mut out = Vec::new();
        table.sweep(1_000_000_000, |e| out.push(e));
        out
    };
    // The expired query at once; the held way only once it is still held a pass later.
    assert_eq!(
        sweep(&mut table),
        vec![Expired {
            key: key(1),
            start_ns: 100,
            ifindex: 3,
            resolver: 5,
            egress: true,
        }]
    );
    assert_eq!(
        sweep(&mut table),
        vec![Expired {
            key: key(3),
            start_ns: 50,
            ifindex: 4,
            resolver: 0,
            egress: false,
        }]
    );
    assert_eq!(sweep(&mut table), vec![]);
    let set = table.set_mut(7);
    assert_eq!(
        set.state,
        [PENDING_FREE, PENDING_WAITING, PENDING_FREE, PENDING_FREE]
    );
}
