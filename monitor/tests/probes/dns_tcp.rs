//! DNS over TCP: messages matched by connection and id, segments read whole or
//! counted unread, malformed segments and refused connections.

use monitor::loader::Sizes;
use monitor_common::DnsCountKind;

use super::{frames::*, harness::*};

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
    on_both_objects(
        "dns_over_tcp_is_matched_by_connection_and_id",
        Sizes::with_flows(1024),
        tcp_matched,
    );
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
    on_both_objects(
        "malformed_tcp_segments_move_no_count",
        Sizes::with_flows(1024),
        tcp_malformed,
    );
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
    on_both_objects(
        "a_refused_dns_connection_is_counted_once",
        Sizes::with_flows(1024),
        connect_refused,
    );
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

#[test]
fn every_dns_message_of_a_tcp_segment_is_read_or_counted_unread() {
    on_both_objects(
        "every_dns_message_of_a_tcp_segment_is_read_or_counted_unread",
        Sizes::with_flows(1024),
        tcp_segments_read_whole,
    );
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
