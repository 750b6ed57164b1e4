//! The series budget: what one node costs the Prometheus that scrapes it. A busy node
//! (`integration_tests::busy`: two ENIs, three resolvers, ten pods behind one ENI, drops
//! of two reasons) is counted series by series; the worst case follows from the bounds
//! the agent keeps.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::collections::BTreeMap;

use integration_tests::{Scrape, busy::BusyNode, require_root};
use monitor_common::{
    DNS_LATENCY_BUCKETS, DNS_RCODES, DNS_TRANSPORTS, FlowClass, MAX_DEVICES, RESOLVER_SLOTS,
};

/// Series per family on the busy node, the machine's own drops (`device="other"`, whatever
/// else runs on this machine) left out.
fn families(s: &Scrape) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for sample in s.samples() {
        if sample.name.contains("drops_total")
            && sample.labels.get("device").is_some_and(|d| d == "other")
        {
            continue;
        }
        *out.entry(sample.name.clone()).or_default() += 1;
    }
    out
}

/// The busy node's series, family by family: each figure follows from the traffic.
const BUSY: [(&str, usize); 33] = [
    ("eni_monitor_build_info", 1),
    // Two raw tracepoints, and tc ingress and egress on each ENI.
    ("eni_monitor_program_attached", 6),
    ("eni_monitor_device_info", 2),
    ("eni_monitor_kernel_map_memory_bytes", 1),
    ("eni_monitor_map_full_total", 5),
    // NO_SOCKET on eth0 (a closed port, the late answers), NETFILTER_DROP on eth1.
    ("eni_monitor_drops_total", 2),
    // The slow resolver's answers, after their clients gave up.
    ("eni_monitor_dns_drops_total", 1),
    ("eni_monitor_udp_receive_queue_drops_total", 2),
    // eth0: `other`, 10.200.0.1 and the slow 10.200.0.53 over UDP; eth1: `other` and
    // 10.201.0.1 over UDP, 10.201.0.1 over TCP.
    ("eni_monitor_dns_queries_total", 6),
    // eth0: `other` NOERROR, 10.200.0.1 NOERROR, NXDOMAIN, SERVFAIL; eth1: `other`
    // NOERROR, 10.201.0.1 NOERROR over UDP and over TCP.
    ("eni_monitor_dns_responses_total", 7),
    // eth0: the slow resolver, and its naming query under `other`.
    ("eni_monitor_dns_unanswered_total", 2),
    ("eni_monitor_dns_tcp_connect_failures_total", 0),
    // One for the node, at 0: every TCP segment read whole.
    ("eni_monitor_dns_tcp_unread_segments_total", 1),
    // One histogram for each (device, resolver, transport) with an answer.
    (
        "eni_monitor_dns_latency_seconds_bucket",
        5 * DNS_LATENCY_BUCKETS,
    ),
    ("eni_monitor_dns_latency_seconds_sum", 5),
    ("eni_monitor_dns_latency_seconds_count", 5),
    ("eni_monitor_top_dns_clients_unanswered", 1),
    // The three named, and Amazon's two.
    ("eni_monitor_dns_resolver_info", 5),
    ("eni_monitor_nf_conntrack_entries", 1),
    ("eni_monitor_nf_conntrack_limit", 1),
    ("eni_monitor_nf_conntrack_events_total", 16),
    ("eni_monitor_conntrack_allowance", 1),
    ("eni_monitor_conntrack_allowance_utilization_ratio", 1),
    ("eni_monitor_tracked_flows", 2 * FlowClass::COUNT as usize),
    // Each ENI: TCP established at 10 bounds and +Inf, closed TCP's total, UDP at 2 and
    // +Inf, UDP streams at 3 and +Inf.
    ("eni_monitor_tracked_flows_idle", 2 * IDLE_SERIES),
    ("eni_monitor_tracking_timeout_seconds", 3),
    // No pod of the busy node sends to a link-local service.
    ("eni_monitor_top_linklocal_senders", 0),
    (
        "eni_monitor_flows_created_total",
        2 * FlowClass::COUNT as usize,
    ),
    // The node's own address on each ENI and ten pods on eth0: eth0 holds its top ten.
    ("eni_monitor_top_flow_owners", 11),
    ("eni_monitor_flow_table_full_total", 1),
    ("eni_monitor_linklocal_packets_total", 2 * 3),
    ("eni_monitor_linklocal_peak_packets_per_second", 2),
    ("eni_monitor_ena_conntrack_allowance_available", 0),
];

/// Idle-age series an ENI exports.
const IDLE_SERIES: usize = 11 + 1 + 3 + 4;

/// Series the agent can export at most, by construction: `MAX_DEVICES` ENIs, every
/// resolver slot named on each with every rcode over both transports, `top` addresses
/// in each top list, every drop reason of the running kernel on every ENI and `other`.
fn worst_case(top: usize, reasons: usize) -> usize {
    let devices = MAX_DEVICES as usize;
    let (resolvers, transports) = (RESOLVER_SLOTS as usize, DNS_TRANSPORTS as usize);
    let per_resolver = transports // queries
        + transports * DNS_RCODES as usize // responses
        + transports // unanswered
        + 1 // TCP connect failures
        + transports * (DNS_LATENCY_BUCKETS + 2); // histogram buckets, sum, count
    let per_device = 1 // device_info
        + 2 // program_attached, tc ingress and egress
        + 2 * FlowClass::COUNT as usize // tracked, created
        + IDLE_SERIES // tracked flows by idle age
        + 3 + 1 // link-local packets by service, peak
        + 1 + 5 // ENA available, exceeded by allowance
        + resolvers * per_resolver
        + 3 * top // top owners, top unanswered clients, top link-local senders
        + 2 * reasons; // drops, DNS drops
    let node = 1 + 2 // build_info, raw tracepoints
        + 1 + 5 // map memory, map_full
        + 3 // tracking timeouts
        + 1 // DNS TCP segments unread
        + 2 // UDP queue drops
        + resolvers // resolver_info
        + 2 + 16 // nf_conntrack entries, limit, events
        + 1 + 1 + 1 // allowance, utilization, flow table full
        + 2 * reasons; // drops and DNS drops on `other`
    devices * per_device + node
}

/// Drop reasons the running kernel names (after `NOT_SPECIFIED`, before the end marker).
fn kernel_reasons() -> usize {
    let btf = monitor::kernel::btf::Btf::parse(&std::fs::read("/sys/kernel/btf/vmlinux").unwrap())
        .unwrap();
    let values = btf.enum_values("skb_drop_reason").unwrap();
    let not_specified = values
        .iter()
        .find(|(n, _)| n == "SKB_DROP_REASON_NOT_SPECIFIED")
        .unwrap()
        .1;
    values
        .iter()
        .filter(|(n, v)| *v > not_specified && !n.ends_with("_MAX"))
        .count()
}

#[test]
fn a_busy_node_costs_the_series_the_budget_says() {
    if !require_root("a_busy_node_costs_the_series_the_budget_says") {
        return;
    }
    let (_node, s) = BusyNode::build();
    let got = families(&s);
    let want: BTreeMap<String, usize> = BUSY
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(name, n)| ((*name).to_owned(), *n))
        .collect();
    assert_eq!(got, want, "{}", s.text);
    let total: usize = got.values().sum();
    assert_eq!(
        total,
        187 + 2 * IDLE_SERIES + 3 + 1,
        "the busy node's series"
    );
    let worst = worst_case(10, kernel_reasons());
    eprintln!("series: busy node {total}, worst case by construction {worst} (--top 10)");
    assert!(total < worst);
}
