//! The classifiers driven with crafted and random packets through `BPF_PROG_TEST_RUN`:
//! the real programs in the real kernel, with their maps read back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

#[path = "../../tests/src/root.rs"]
mod root;

use aya::programs::{TestRun as _, TestRunOptions};
use monitor::{housekeeping::monotonic_ns, model::linklocal::Senders};
use monitor::{
    kernel::{self, KernelFacts},
    loader::{self, Maps, Programs, Sizes},
};
use monitor_common::{
    DnsCountKind, DnsFlightKey, LL_SENDER_SECONDS, LinkLocalService, MapFull, addr_from_ip,
};

/// The object loaded, with its maps.
struct Probe {
    programs: Programs,
    maps: Maps,
    /// Whether this is the object with BPF atomics (queries in flight in `DNS_PENDING`).
    atomics: bool,
}

/// The object loaded against this kernel, classifiers loaded, loopback (where test runs
/// happen) monitored in slot 0.
fn loaded() -> Probe {
    loaded_with(Sizes::with_flows(1024))
}

fn loaded_with(sizes: Sizes) -> Probe {
    loaded_object(sizes, None)
}

/// Both objects this kernel can load: the one it gets, and where it has BPF atomics the
/// one for kernels without them too (its `DNS_INFLIGHT` path is what 5.10 runs).
fn both_objects(sizes: Sizes) -> Vec<Probe> {
    let mut objects = vec![loaded_object(sizes, None)];
    if kernel::has_atomics() {
        objects.push(loaded_object(sizes, Some(false)));
    }
    objects
}

fn loaded_object(sizes: Sizes, atomics: Option<bool>) -> Probe {
    let mut facts = KernelFacts::read(Path::new(kernel::BTF_PATH)).unwrap();
    if let Some(atomics) = atomics {
        facts.atomics = atomics;
    }
    let loader::Loaded {
        mut programs,
        mut maps,
    } = loader::load(&facts, sizes, None).unwrap();
    programs.load_classifiers().unwrap();
    maps.monitored.set([("lo", 1, 0)]).unwrap();
    maps.addrs
        .set_service("169.254.169.253".parse().unwrap(), LinkLocalService::Dns)
        .unwrap();
    Probe {
        programs,
        maps,
        atomics: facts.atomics,
    }
}

fn run(probe: &Probe, program: &str, packet: &[u8]) -> u32 {
    run_with(&probe.programs, program, packet)
}

fn run_with(programs: &Programs, program: &str, packet: &[u8]) -> u32 {
    let prog = programs.classifier(program).unwrap();
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    prog.test_run(opts)
        .unwrap_or_else(|e| panic!("test run of {program} on {} bytes: {e:?}", packet.len()))
        .return_value
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    queries: u64,
    responses: u64,
    /// Copies replaced by a retransmission, counted unanswered.
    superseded: u64,
    /// Queries the table could not keep (refused, or ended to make room), untracked.
    untracked: u64,
    inflight: usize,
    linklocal: u64,
    /// TCP connections to port 53 refused.
    refused: u64,
}

/// The DNS counts by (resolver slot, kind), over every device and rcode.
fn by_slot(probe: &Probe) -> std::collections::BTreeMap<(u8, DnsCountKind), u64> {
    let mut out = std::collections::BTreeMap::new();
    for (key, n) in probe.maps.dns.snapshot().counts {
        let kind = DnsCountKind::from_u8(key.kind).unwrap();
        *out.entry((key.resolver, kind)).or_default() += n;
    }
    out
}

fn counts(probe: &Probe) -> Counts {
    let mut c = Counts::default();
    for ((_, kind), n) in by_slot(probe) {
        match kind {
            DnsCountKind::Query => c.queries += n,
            DnsCountKind::Response => c.responses += n,
            DnsCountKind::Superseded => c.superseded += n,
            DnsCountKind::Untracked => c.untracked += n,
            DnsCountKind::Unanswered => panic!("the agent's count, not the programs'"),
            DnsCountKind::ConnectFailure => c.refused += n,
        }
    }
    probe
        .maps
        .dns_inflight
        .for_each(|_, _| c.inflight += 1)
        .unwrap();
    c.inflight += probe.maps.dns_pending.waiting();
    c.linklocal = LinkLocalService::ALL
        .iter()
        .map(|s| probe.maps.ll_packets.get(0, *s as u32).iter().sum::<u64>())
        .sum();
    c
}

const SRC4: [u8; 4] = [10, 0, 0, 5];
const DST4: [u8; 4] = [10, 0, 0, 2];

fn ipv4_udp(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    frag: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p.extend_from_slice(&[0x08, 0x00]);
    let total = u16::try_from(20 + 8 + payload.len()).unwrap();
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1]);
    p.extend_from_slice(&frag.to_be_bytes());
    p.extend_from_slice(&[64, 17, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

fn ipv6_udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    p.extend_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
    p.extend_from_slice(&[17, 64]);
    p.extend_from_slice(&"fd00::5".parse::<std::net::Ipv6Addr>().unwrap().octets());
    p.extend_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// A DNS header and question: `flags` as on the wire, `qdcount` questions claimed.
fn dns(id: u16, flags: u16, qdcount: u16, question: &[u8]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d.extend_from_slice(&qdcount.to_be_bytes());
    d.extend_from_slice(&[0; 6]);
    d.extend_from_slice(question);
    d
}

const QUESTION: &[u8] = b"\x03www\x07example\x03com\x00\x00\x01\x00\x01";
const TC_ACT_UNSPEC: u32 = u32::MAX;

#[test]
fn a_query_and_its_response_are_matched() {
    if !root::require_root("a_query_and_its_response_are_matched") {
        return;
    }
    for probe in both_objects(Sizes::with_flows(1024)) {
        query_and_response_matched(&probe);
    }
}

fn query_and_response_matched(probe: &Probe) {
    let query = ipv4_udp(SRC4, DST4, 40000, 53, 0, &dns(7, 0x0100, 1, QUESTION));
    assert_eq!(run(probe, "tc_egress", &query), TC_ACT_UNSPEC);
    assert_eq!(
        counts(probe),
        Counts {
            queries: 1,
            responses: 0,
            superseded: 0,
            untracked: 0,
            inflight: 1,
            ..Counts::default()
        }
    );
    // The same query again is a retransmission: still one in flight, the first copy
    // unanswered.
    run(probe, "tc_egress", &query);
    assert_eq!(
        counts(probe),
        Counts {
            queries: 2,
            responses: 0,
            superseded: 1,
            untracked: 0,
            inflight: 1,
            ..Counts::default()
        }
    );
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
    assert_eq!(
        counts(probe),
        Counts {
            queries: 2,
            responses: 0,
            superseded: 1,
            untracked: 0,
            inflight: 1,
            ..Counts::default()
        }
    );
    let response = ipv4_udp(DST4, SRC4, 53, 40000, 0, &dns(7, 0x8183, 1, QUESTION));
    assert_eq!(run(probe, "tc_ingress", &response), TC_ACT_UNSPEC);
    assert_eq!(
        counts(probe),
        Counts {
            queries: 2,
            responses: 1,
            superseded: 1,
            untracked: 0,
            inflight: 0,
            ..Counts::default()
        }
    );
    // A duplicate response is not a second answer.
    run(probe, "tc_ingress", &response);
    assert_eq!(
        counts(probe),
        Counts {
            queries: 2,
            responses: 1,
            superseded: 1,
            untracked: 0,
            inflight: 0,
            ..Counts::default()
        }
    );
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
    bad_ihl[14] = 0x4f; // a 60-byte IP header in a packet that has none of it
    cases.push(("IHL beyond the packet", bad_ihl));
    let mut short_ihl = full.clone();
    short_ihl[14] = 0x43;
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
    assert_eq!(
        counts(&probe),
        Counts {
            queries: 2,
            responses: 0,
            superseded: 0,
            untracked: 0,
            inflight: 2,
            ..Counts::default()
        }
    );
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

/// `MAP_FULL[map]`, summed over CPUs.
fn map_full(probe: &Probe, map: MapFull) -> u64 {
    probe
        .maps
        .map_full
        .get(&(map as u32), 0)
        .unwrap()
        .iter()
        .sum()
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

/// An IPv6 UDP datagram whose fixed header is followed by `ext`, extension headers of
/// the given (type, length in bytes) chain.
fn ipv6_udp_past(
    ext: &[(u8, usize)],
    frag_offset: u16,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let plain = ipv6_udp(sport, dport, payload);
    let (head, udp) = plain.split_at(14 + 40);
    let mut p = head.to_vec();
    let mut chain = Vec::new();
    for (i, (kind, len)) in ext.iter().enumerate() {
        let next = ext.get(i + 1).map_or(17, |(k, _)| *k);
        let mut h = vec![0u8; *len];
        h[0] = next;
        if *kind == 44 {
            h[2..4].copy_from_slice(&(frag_offset << 3).to_be_bytes());
        } else {
            h[1] = u8::try_from(len / 8 - 1).unwrap();
        }
        chain.extend(h);
    }
    p[14 + 6] = ext.first().map_or(17, |(k, _)| *k);
    let plen = u16::try_from(chain.len() + udp.len()).unwrap();
    p[14 + 4..14 + 6].copy_from_slice(&plen.to_be_bytes());
    p.extend(chain);
    p.extend(udp);
    p
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

/// An IPv4 TCP segment with `flags` (FIN 0x01, RST 0x04, ACK 0x10) and no payload.
fn ipv4_tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    segment(src, dst, sport, dport, flags, &[])
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

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed CPU set with one CPU added, for the calling thread (0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set),
            0,
            "pinning to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn two_cpus_closing_one_flow_at_once_both_fins_stay() {
    const FLOWS: u16 = 20_000;

    use monitor_common::{FLOW_AB, FLOW_BA, FLOW_FIN_AB, FLOW_FIN_BA, FLOW_LOCAL_B, FlowKey};
    if !root::require_root("two_cpus_closing_one_flow_at_once_both_fins_stay") {
        return;
    }
    // IPv6: in the hash table `FLOWS` under either object (IPv4 flows live in the sets
    // where there are atomics). fd00::2 sorts first: side a the server, b local.
    let server = "fd00::2";
    let local = "fd00::5";
    let port = |i: u16| 10_000 + i;
    for probe in both_objects(Sizes::with_flows(u32::from(FLOWS) * 2)) {
        for i in 0..FLOWS {
            let out = ipv6_tcp_between((local, port(i)), (server, 443), ACK, &[]);
            let back = ipv6_tcp_between((server, 443), (local, port(i)), ACK, &[]);
            run(&probe, "tc_egress", &out);
            run(&probe, "tc_ingress", &back);
        }
        // The two FINs of each flow, one on each CPU, at once.
        let programs = &probe.programs;
        in_step(usize::from(FLOWS), |me, i| {
            let i = u16::try_from(i).unwrap();
            let (hook, fin) = if me == 0 {
                let fin = (local, port(i));
                (
                    "tc_egress",
                    ipv6_tcp_between(fin, (server, 443), FIN_ACK, &[]),
                )
            } else {
                let fin = (server, 443);
                (
                    "tc_ingress",
                    ipv6_tcp_between(fin, (local, port(i)), FIN_ACK, &[]),
                )
            };
            run_with(programs, hook, &fin);
        });
        let mut flags = std::collections::BTreeMap::<u8, usize>::new();
        probe
            .maps
            .flows
            .for_each(|_: &FlowKey, f| *flags.entry(f.flags()).or_default() += 1)
            .unwrap();
        let closed = FLOW_AB | FLOW_BA | FLOW_LOCAL_B | FLOW_FIN_AB | FLOW_FIN_BA;
        assert_eq!(
            flags,
            [(closed, usize::from(FLOWS))].into(),
            "atomics {}: flows by bits",
            probe.atomics
        );
    }
}

/// Runs `each(me, i)` for i in 0..n on CPUs 0 and 1 at once, in step: neither CPU begins
/// step i before the other has finished step i - 1, so both are at step i at about the
/// same moment.
fn in_step(n: usize, each: impl Fn(usize, usize) + Sync) {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    assert!(online >= 2, "this test needs two CPUs");
    let done = [AtomicUsize::new(0), AtomicUsize::new(0)];
    std::thread::scope(|s| {
        for me in 0..2 {
            let (done, each) = (&done, &each);
            s.spawn(move || {
                pin_to(me);
                for i in 0..n {
                    while done[1 - me].load(SeqCst) < i {
                        std::hint::spin_loop();
                    }
                    each(me, i);
                    done[me].fetch_add(1, SeqCst);
                }
            });
        }
    });
}

/// The flows the tables hold (their keys' words), each with how many times it is there.
fn held_keys(probe: &Probe) -> std::collections::BTreeMap<[u32; 11], usize> {
    let mut keys = std::collections::BTreeMap::new();
    probe
        .maps
        .flows
        .for_each(|k, _| *keys.entry(k.words()).or_default() += 1)
        .unwrap();
    keys
}

/// Flows of `class` begun on loopback (slot 0), from the `flows_created` map.
fn created(
    flows_created: &monitor::tables::slots::SlotArray<u64>,
    class: monitor_common::FlowClass,
) -> u64 {
    flows_created.get(0, class as u32).iter().sum()
}

/// The claim (compare-and-exchange) and publish (atomic or) of a flow's slot, on two CPUs
/// beginning the same flow at once: on x86 and on arm64 (whose loads and stores the CPU
/// may reorder where x86's may not) the flow begins once, in one slot, with both
/// packets' bits.
#[test]
fn two_cpus_beginning_one_flow_begin_it_once() {
    use monitor_common::{FLOW_AB, FLOW_BA};
    const FLOWS: u16 = 4000;
    if !root::require_root("two_cpus_beginning_one_flow_begin_it_once") {
        return;
    }
    for probe in both_objects(Sizes::with_flows(u32::from(FLOWS) * 4)) {
        let programs = &probe.programs;
        // Each flow's first packet out on CPU 0 and its reply on CPU 1, at once.
        in_step(usize::from(FLOWS), |me, i| {
            let port = 1 + u16::try_from(i).unwrap();
            if me == 0 {
                let out = ipv4_udp(SRC4, DST4, 40000, port, 0, b"x");
                run_with(programs, "tc_egress", &out);
            } else {
                let back = ipv4_udp(DST4, SRC4, port, 40000, 0, b"x");
                run_with(programs, "tc_ingress", &back);
            }
        });
        let keys = held_keys(&probe);
        let twice: Vec<_> = keys.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "atomics {}: in two places: {twice:?}",
            probe.atomics
        );
        assert_eq!(keys.len(), usize::from(FLOWS), "atomics {}", probe.atomics);
        assert_eq!(
            created(&probe.maps.flows_created, monitor_common::FlowClass::Udp),
            u64::from(FLOWS),
            "atomics {}",
            probe.atomics
        );
        let mut both = 0;
        probe
            .maps
            .flows
            .for_each(|_, f| {
                both += usize::from(f.flags() & (FLOW_AB | FLOW_BA) == FLOW_AB | FLOW_BA);
            })
            .unwrap();
        assert_eq!(
            both,
            usize::from(FLOWS),
            "atomics {}: flows with both bits",
            probe.atomics
        );
    }
}

/// Shares the flow sets' mapping with a thread that runs the pass over it while this one
/// runs programs writing it: memory of this process the kernel's programs share, written
/// through atomics and volatile words only.
struct Shared<'a>(&'a monitor::loader::maps::Flows);
// SAFETY: see above; the pass takes the sets by shared reference and writes them with
// compare-and-exchange and atomic or only.
unsafe impl Sync for Shared<'_> {}

impl Shared<'_> {
    /// A pass over the sets, as the agent's (the sets with flows in `FLOWS` read from
    /// it), that frees every flow of an even port; the slots freed.
    fn free_even_ports(&self) -> u64 {
        let flows = self.0;
        let mut spilled = flows.sets.begin_pass();
        flows
            .table
            .for_each(|k, _| {
                if let Some(set) = flows.sets.set_of(k) {
                    spilled.add(set);
                }
            })
            .unwrap();
        flows
            .sets
            .expire(&spilled, |k, _| k.port_a % 2 == 0, |_, _| {})
    }
}

/// A pass freeing slots while another CPU's packets refresh their flows and begin them
/// again: nothing is in two slots, and every flow begun is held or was freed (flows
/// created - flows freed = flows held), on x86 and on arm64.
#[test]
fn a_pass_freeing_slots_under_packets_loses_and_doubles_nothing() {
    const FLOWS: u16 = 4000;
    if !root::require_root("a_pass_freeing_slots_under_packets_loses_and_doubles_nothing") {
        return;
    }
    let probe = loaded_with(Sizes::with_flows(u32::from(FLOWS) * 4));
    if !probe.atomics {
        eprintln!("skipping: no flow sets without BPF atomics");
        return;
    }
    let flow = |port: u16| ipv4_udp(SRC4, DST4, 40000, port, 0, b"x");
    // Begun on CPU 0; refreshed on CPU 1, whose flow cache has never seen them (and the
    // second changes between rounds), so each packet reaches its slot.
    pin_to(0);
    for port in 1..=FLOWS {
        run(&probe, "tc_egress", &flow(port));
    }
    let mut in_table = 0;
    probe
        .maps
        .flows
        .table
        .for_each(|_, _| in_table += 1)
        .unwrap();
    let in_sets = usize::from(FLOWS) - in_table;
    assert!(
        in_sets > usize::from(FLOWS) / 2,
        "{in_sets} flows in the sets"
    );
    let sets = Shared(&probe.maps.flows);
    let freed = std::sync::atomic::AtomicU64::new(0);
    let programs = &probe.programs;
    // Passes on CPU 0 that free every flow of an even port, while CPU 1 sends each flow
    // a packet, three rounds.
    let rounds = 3;
    in_step(rounds, |me, _| {
        if me == 0 {
            for _ in 0..4 {
                let n = sets.free_even_ports();
                freed.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
            }
        } else {
            for port in 1..=FLOWS {
                run_with(programs, "tc_egress", &flow(port));
            }
        }
    });
    let keys = held_keys(&probe);
    let twice: Vec<_> = keys.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "in two places: {twice:?}");
    let freed = freed.into_inner();
    assert!(freed > 0, "the passes freed nothing");
    assert_eq!(
        created(&probe.maps.flows_created, monitor_common::FlowClass::Udp) - freed,
        keys.len() as u64,
        "flows created - freed ({freed}) = flows held"
    );
}

const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;
const FIN_ACK: u8 = 0x11;
const PSH_ACK: u8 = 0x18;
const SYN_ACK: u8 = 0x12;
const RST_ACK: u8 = 0x14;

/// An IPv4 TCP segment with `flags` and `payload` (a TCP header without options, or with
/// `doff` words of header).
fn ipv4_tcp_doff(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: u8,
    doff: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p.extend_from_slice(&[0x08, 0x00]);
    let tcp_len = usize::from(doff.max(5)) * 4;
    let total = u16::try_from(20 + tcp_len + payload.len()).unwrap();
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1]);
    p.extend_from_slice(&[doff << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p.resize(p.len() + tcp_len - 20, 1);
    p.extend_from_slice(payload);
    p
}

fn segment(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    ipv4_tcp_doff(src, dst, sport, dport, flags, 5, payload)
}

/// `segment` with sequence number `seq`.
fn segment_at(
    (src, sport): ([u8; 4], u16),
    (dst, dport): ([u8; 4], u16),
    seq: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = segment(src, dst, sport, dport, PSH_ACK, payload);
    p[38..42].copy_from_slice(&seq.to_be_bytes());
    p
}

/// A connection's segments one way, each at the sequence number the bytes before it
/// reach.
struct Stream {
    from: ([u8; 4], u16),
    to: ([u8; 4], u16),
    seq: std::cell::Cell<u32>,
}

impl Stream {
    fn new(from: ([u8; 4], u16), to: ([u8; 4], u16)) -> Self {
        Self {
            from,
            to,
            seq: std::cell::Cell::new(1),
        }
    }

    /// The next segment, carrying `payload`.
    fn next(&self, payload: &[u8]) -> Vec<u8> {
        let seq = self.seq.get();
        self.seq
            .set(seq.wrapping_add(u32::try_from(payload.len()).unwrap()));
        segment_at(self.from, self.to, seq, payload)
    }
}

fn ipv6_tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let (src, dst) = if dport == 53 {
        ("fd00::5", "fd00::2")
    } else {
        ("fd00::2", "fd00::5")
    };
    ipv6_tcp_between((src, sport), (dst, dport), flags, payload)
}

fn ipv6_tcp_between(
    (src, sport): (&str, u16),
    (dst, dport): (&str, u16),
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    p.extend_from_slice(&u16::try_from(20 + payload.len()).unwrap().to_be_bytes());
    p.extend_from_slice(&[6, 64]);
    p.extend_from_slice(&src.parse::<std::net::Ipv6Addr>().unwrap().octets());
    p.extend_from_slice(&dst.parse::<std::net::Ipv6Addr>().unwrap().octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p.extend_from_slice(payload);
    p
}

/// DNS messages as TCP carries them: each after its two-byte length.
fn framed(messages: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        out.extend_from_slice(&u16::try_from(m.len()).unwrap().to_be_bytes());
        out.extend_from_slice(m);
    }
    out
}

/// The DNS counts by (transport, kind), over every device, slot and rcode.
fn by_transport(probe: &Probe) -> std::collections::BTreeMap<(u8, DnsCountKind), u64> {
    let mut out = std::collections::BTreeMap::new();
    for (key, n) in probe.maps.dns.snapshot().counts {
        let kind = DnsCountKind::from_u8(key.kind).unwrap();
        *out.entry((key.transport, kind)).or_default() += n;
    }
    out
}

#[test]
fn dns_over_tcp_is_matched_by_connection_and_id() {
    if !root::require_root("dns_over_tcp_is_matched_by_connection_and_id") {
        return;
    }
    for probe in both_objects(Sizes::with_flows(1024)) {
        tcp_matched(&probe);
    }
}

fn tcp_matched(probe: &Probe) {
    use monitor_common::{DNS_TCP, DNS_UDP};
    let q = |id: u16| dns(id, 0x0100, 1, QUESTION);
    let r = |id: u16| dns(id, 0x8180, 1, QUESTION);
    let (queries, answers) = (
        Stream::new((SRC4, 40000), (DST4, 53)),
        Stream::new((DST4, 53), (SRC4, 40000)),
    );
    let out = |payload: &[u8]| queries.next(payload);
    let back = |payload: &[u8]| answers.next(payload);
    // The connection opens: nothing counted, nothing left waiting.
    run(
        probe,
        "tc_egress",
        &segment(SRC4, DST4, 40000, 53, SYN, &[]),
    );
    assert_eq!(counts(probe).inflight, 1, "the SYN waits for its answer");
    run(
        probe,
        "tc_ingress",
        &segment(DST4, SRC4, 53, 40000, SYN_ACK, &[]),
    );
    run(probe, "tc_egress", &out(&[]));
    assert_eq!(counts(probe), Counts::default());
    // One query; the same segment sent again is not a second query.
    let once = out(&framed(&[q(7)]));
    run(probe, "tc_egress", &once);
    run(probe, "tc_egress", &once);
    assert_eq!((counts(probe).queries, counts(probe).inflight), (1, 1));
    // Three pipelined queries in one segment.
    run(probe, "tc_egress", &out(&framed(&[q(8), q(9), q(10)])));
    assert_eq!((counts(probe).queries, counts(probe).inflight), (4, 4));
    // Two responses in one segment, out of order.
    run(probe, "tc_ingress", &back(&framed(&[r(8), r(7)])));
    assert_eq!((counts(probe).responses, counts(probe).inflight), (2, 2));
    // A response split across two segments: counted where its header is; the tail,
    // which begins inside the message, moves nothing.
    let whole = framed(&[r(9)]);
    let (head, tail) = whole.split_at(2 + 12 + 3);
    run(probe, "tc_ingress", &back(head));
    assert_eq!(counts(probe).responses, 3);
    run(probe, "tc_ingress", &back(tail));
    // A UDP response from the same ports is not the TCP query's answer.
    run(
        probe,
        "tc_ingress",
        &ipv4_udp(DST4, SRC4, 53, 40000, 0, &r(10)),
    );
    assert_eq!((counts(probe).responses, counts(probe).inflight), (3, 1));
    run(probe, "tc_ingress", &back(&framed(&[r(10)])));
    let c = counts(probe);
    assert_eq!(
        (c.queries, c.responses, c.superseded, c.inflight),
        (4, 4, 0, 0),
        "{c:?}"
    );
    // Every count is TCP's, latency included.
    let by = by_transport(probe);
    assert_eq!(by.get(&(DNS_TCP, DnsCountKind::Query)), Some(&4));
    assert_eq!(by.get(&(DNS_TCP, DnsCountKind::Response)), Some(&4));
    assert!(by.keys().all(|(t, _)| *t == DNS_TCP), "{by:?}");
    let latency = probe.maps.dns.snapshot().latency;
    assert_eq!(latency.len(), 1);
    let (key, h) = latency.iter().next().unwrap();
    assert_eq!((key.transport, h.buckets.iter().sum::<u64>()), (DNS_TCP, 4));
    // The same over IPv6; and a UDP query with the same port and id is another query.
    run(
        probe,
        "tc_egress",
        &ipv6_tcp(40000, 53, PSH_ACK, &framed(&[q(11)])),
    );
    run(
        probe,
        "tc_egress",
        &ipv4_udp(SRC4, DST4, 40000, 53, 0, &q(12)),
    );
    run(probe, "tc_egress", &out(&framed(&[q(12)])));
    run(
        probe,
        "tc_ingress",
        &ipv6_tcp(53, 40000, PSH_ACK, &framed(&[r(11)])),
    );
    run(probe, "tc_ingress", &back(&framed(&[r(12)])));
    run(
        probe,
        "tc_ingress",
        &ipv4_udp(DST4, SRC4, 53, 40000, 0, &r(12)),
    );
    let by = by_transport(probe);
    assert_eq!(by.get(&(DNS_TCP, DnsCountKind::Query)), Some(&6));
    assert_eq!(by.get(&(DNS_TCP, DnsCountKind::Response)), Some(&6));
    assert_eq!(by.get(&(DNS_UDP, DnsCountKind::Query)), Some(&1));
    assert_eq!(by.get(&(DNS_UDP, DnsCountKind::Response)), Some(&1));
    assert_eq!(counts(probe).inflight, 0);
}

#[test]
fn malformed_tcp_segments_move_no_count() {
    if !root::require_root("malformed_tcp_segments_move_no_count") {
        return;
    }
    for probe in both_objects(Sizes::with_flows(1024)) {
        tcp_malformed(&probe);
    }
}

/// Random payloads to port 53 never fail the program.
fn random_segments_pass(probe: &Probe) {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..500 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = usize::try_from(seed % 80).unwrap();
        let payload: Vec<u8> = (0..len)
            .map(|i| u8::try_from((seed >> (i % 8 * 8)) & 0xff).unwrap())
            .collect();
        let packet = segment(SRC4, DST4, 40003, 53, PSH_ACK, &payload);
        assert_eq!(run(probe, "tc_egress", &packet), TC_ACT_UNSPEC);
    }
}

/// Segments to and from port 53 that hold no DNS message to count, by what is wrong.
fn malformed_segments() -> Vec<(&'static str, Vec<u8>)> {
    let q = dns(1, 0x0100, 1, QUESTION);
    let with_length = |len: u16, body: &[u8]| {
        let mut m = len.to_be_bytes().to_vec();
        m.extend_from_slice(body);
        m
    };
    vec![
        ("one byte", segment(SRC4, DST4, 40000, 53, PSH_ACK, &[0])),
        (
            "a length and part of a header",
            segment(SRC4, DST4, 40000, 53, PSH_ACK, &with_length(40, &q[..11])),
        ),
        (
            "a length shorter than a header",
            segment(SRC4, DST4, 40000, 53, PSH_ACK, &with_length(11, &q)),
        ),
        (
            "a length of zero",
            segment(SRC4, DST4, 40000, 53, PSH_ACK, &with_length(0, &q)),
        ),
        (
            "no question",
            segment(
                SRC4,
                DST4,
                40000,
                53,
                PSH_ACK,
                &framed(&[dns(2, 0x0100, 0, &[])]),
            ),
        ),
        (
            "not port 53",
            segment(
                SRC4,
                DST4,
                40000,
                5353,
                PSH_ACK,
                &framed(std::slice::from_ref(&q)),
            ),
        ),
        (
            "a header length past the segment",
            ipv4_tcp_doff(SRC4, DST4, 40000, 53, PSH_ACK, 15, &[]),
        ),
        (
            "a query from the server's port",
            segment(
                DST4,
                SRC4,
                53,
                40000,
                PSH_ACK,
                &framed(std::slice::from_ref(&q)),
            ),
        ),
        (
            "a response nobody asked for",
            segment(
                DST4,
                SRC4,
                53,
                40000,
                PSH_ACK,
                &framed(&[dns(3, 0x8180, 1, QUESTION)]),
            ),
        ),
    ]
}

fn tcp_malformed(probe: &Probe) {
    let q = dns(1, 0x0100, 1, QUESTION);
    let with_length = |len: u16, body: &[u8]| {
        let mut m = len.to_be_bytes().to_vec();
        m.extend_from_slice(body);
        m
    };
    for (what, packet) in malformed_segments() {
        assert_eq!(run(probe, "tc_egress", &packet), TC_ACT_UNSPEC, "{what}");
        run(probe, "tc_ingress", &packet);
        assert_eq!(counts(probe), Counts::default(), "{what}");
    }
    // A length longer than the segment: the header is there, the message is counted;
    // nothing after it is read. Options before the payload are skipped. (A connection of
    // its own: on 40000 a cut header said where its next message begins.)
    run(
        probe,
        "tc_egress",
        &segment(SRC4, DST4, 40004, 53, PSH_ACK, &with_length(u16::MAX, &q)),
    );
    run(
        probe,
        "tc_egress",
        &ipv4_tcp_doff(
            SRC4,
            DST4,
            40001,
            53,
            PSH_ACK,
            8,
            &framed(std::slice::from_ref(&q)),
        ),
    );
    assert_eq!((counts(probe).queries, counts(probe).inflight), (2, 2));
    // Five messages in one segment: every one read, or 4 on kernels without `bpf_loop`.
    let five: Vec<Vec<u8>> = (10..15).map(|id| dns(id, 0x0100, 1, QUESTION)).collect();
    run(
        probe,
        "tc_egress",
        &segment(SRC4, DST4, 40002, 53, PSH_ACK, &framed(&five)),
    );
    assert_eq!(counts(probe).queries, if probe.atomics { 7 } else { 6 });
    random_segments_pass(probe);
}

#[test]
fn a_refused_dns_connection_is_counted_once() {
    if !root::require_root("a_refused_dns_connection_is_counted_once") {
        return;
    }
    for probe in both_objects(Sizes::with_flows(1024)) {
        connect_refused(&probe);
    }
}

fn connect_refused(probe: &Probe) {
    let syn = |port: u16| segment(SRC4, DST4, port, 53, SYN, &[]);
    let reply = |port: u16, flags: u8| segment(DST4, SRC4, 53, port, flags, &[]);
    // Refused: a SYN, sent again, answered by a RST.
    run(probe, "tc_egress", &syn(41000));
    run(probe, "tc_egress", &syn(41000));
    run(probe, "tc_ingress", &reply(41000, RST_ACK));
    assert_eq!((counts(probe).refused, counts(probe).inflight), (1, 0));
    // A RST nobody's SYN waits for, and one closing an established connection.
    run(probe, "tc_ingress", &reply(41001, RST));
    run(probe, "tc_egress", &syn(41002));
    run(probe, "tc_ingress", &reply(41002, SYN_ACK));
    run(probe, "tc_ingress", &reply(41002, RST_ACK));
    // A SYN to another port is no DNS connection.
    run(
        probe,
        "tc_egress",
        &segment(SRC4, DST4, 41003, 80, SYN, &[]),
    );
    run(
        probe,
        "tc_ingress",
        &segment(DST4, SRC4, 80, 41003, RST_ACK, &[]),
    );
    let c = counts(probe);
    assert_eq!((c.refused, c.inflight, c.queries), (1, 0, 0), "{c:?}");
    // Over IPv6.
    run(probe, "tc_egress", &ipv6_tcp(41004, 53, SYN, &[]));
    run(probe, "tc_ingress", &ipv6_tcp(53, 41004, RST_ACK, &[]));
    assert_eq!(counts(probe).refused, 2);
    // A SYN left unanswered waits for the agent's sweep.
    run(probe, "tc_egress", &syn(41005));
    assert_eq!(counts(probe).inflight, 1);
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
    if !kernel::has_atomics() {
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

#[test]
fn every_dns_message_of_a_tcp_segment_is_read_or_counted_unread() {
    if !root::require_root("every_dns_message_of_a_tcp_segment_is_read_or_counted_unread") {
        return;
    }
    for probe in both_objects(Sizes::with_flows(1024)) {
        tcp_segments_read_whole(&probe);
    }
}

/// TCP segments unread, summed over CPUs.
fn tcp_unread(probe: &Probe) -> u64 {
    probe.maps.dns_tcp_unread.get(&0, 0).unwrap().iter().sum()
}

fn tcp_segments_read_whole(probe: &Probe) {
    // Every message where the kernel has `bpf_loop`; 4 a segment where it has not.
    let read = |n: u64| if probe.atomics { n } else { n.min(4) };
    let past_bound = |n: u64| u64::from(read(n) < n);
    let q = |id: u16| dns(id, 0x0100, 1, QUESTION);
    let r = |id: u16| dns(id, 0x8180, 1, QUESTION);
    let (queries, answers) = (
        Stream::new((SRC4, 40001), (DST4, 53)),
        Stream::new((DST4, 53), (SRC4, 40001)),
    );
    let qc = |p: &Probe| {
        (
            counts(p).queries,
            counts(p).responses,
            counts(p).inflight as u64,
        )
    };
    // 40 queries pipelined in one segment, as a busy forwarder sends them, and their
    // 40 answers in one.
    let ids: Vec<u16> = (1..=40).collect();
    run(
        probe,
        "tc_egress",
        &queries.next(&framed(&ids.iter().map(|i| q(*i)).collect::<Vec<_>>())),
    );
    let n = read(40);
    assert_eq!(qc(probe), (n, 0, n));
    run(
        probe,
        "tc_ingress",
        &answers.next(&framed(&ids.iter().map(|i| r(*i)).collect::<Vec<_>>())),
    );
    assert_eq!(qc(probe), (n, n, 0));
    let mut unread = 2 * past_bound(40);
    assert_eq!(tcp_unread(probe), unread);
    // 10 more, and their answers in three segments cut inside messages (one inside a
    // header, whose message is then unread): each counted in the segment that holds its
    // header, and the segment after each cut read from where the cut message ends.
    let ids: Vec<u16> = (41..=50).collect();
    run(
        probe,
        "tc_egress",
        &queries.next(&framed(&ids.iter().map(|i| q(*i)).collect::<Vec<_>>())),
    );
    let n10 = read(10);
    assert_eq!(qc(probe), (n + n10, n, n10));
    unread += past_bound(10);
    let stream = framed(&ids.iter().map(|i| r(*i)).collect::<Vec<_>>());
    let each = stream.len() / 10;
    let cut_body = 3 * each + 20;
    let cut_header = 6 * each + 5;
    run(probe, "tc_ingress", &answers.next(&stream[..cut_body]));
    assert_eq!(qc(probe), (n + n10, n + 4, n10 - 4));
    run(
        probe,
        "tc_ingress",
        &answers.next(&stream[cut_body..cut_header]),
    );
    // Answers 5 and 6 whole; the 7th's header cut.
    unread += 1;
    assert_eq!(tcp_unread(probe), unread);
    run(probe, "tc_ingress", &answers.next(&stream[cut_header..]));
    // Answers 8 to 10 read: every answer but the 7th, where every query was read; where
    // only the first 4 were, their 4 answers (in the first segment).
    let answered = if probe.atomics { 9 } else { 4 };
    assert_eq!(qc(probe), (n + n10, n + answered, n10 - answered));
    // The unread answer's query is swept as unanswered in time: what the unread counter
    // owns up to.
    // 246 header-only queries in one segment, as many as a test run carries.
    let bare = |id: u16| {
        let mut m = vec![0u8; 12];
        m[..2].copy_from_slice(&id.to_be_bytes());
        m[2..4].copy_from_slice(&0x0100u16.to_be_bytes());
        m[4..6].copy_from_slice(&1u16.to_be_bytes());
        m
    };
    let many: Vec<Vec<u8>> = (1000..1246).map(bare).collect();
    run(probe, "tc_egress", &queries.next(&framed(&many)));
    assert_eq!(qc(probe).0, n + n10 + read(246));
    unread += past_bound(246);
    assert_eq!(tcp_unread(probe), unread);
}

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
            probe.maps.flow_recent.set_word(i, full).unwrap();
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
