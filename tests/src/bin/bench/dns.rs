//! DNS under load: dnsperf against unbound through the classifiers, and the agent's
//! counts against dnsperf's.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::agent::cpu_seconds;
use crate::cost::{ProgStats, bpf_stats, floor_classifiers, over_floor, prog_stats, record_cost};
use crate::report::{Report, runs, stat};
use integration_tests::{
    Agent, Netns, Scrape, SimNode,
    dns::{OK_NAME, Resolver},
    sh,
};

/// dnsperf over `mode` (`udp`, or `tcp`: its queries pipelined on a few connections).
fn dnsperf(node: &Netns, server: &str, queryfile: &str, mode: &str) -> BTreeMap<String, f64> {
    let out = sh(node.command("dnsperf").args([
        "-m", mode, "-s", server, "-d", queryfile, "-l", "5", "-q", "500", "-t", "2",
    ]));
    let mut m = BTreeMap::new();
    for line in out.lines() {
        let line = line.trim();
        for key in [
            "Queries sent",
            "Queries completed",
            "Queries lost",
            "Queries per second",
        ] {
            if let Some(rest) = line.strip_prefix(key).and_then(|r| r.strip_prefix(':')) {
                let n = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0.0);
                m.insert(key.to_owned(), n);
            }
        }
    }
    m
}

/// One dnsperf run over `mode`, the classifiers' cost of it added to `per_packet`:
/// dnsperf's figures, and the programs' (time, runs) before and after.
fn costed_run(
    node: &Netns,
    server: &str,
    queryfile: &std::path::Path,
    mode: &str,
    per_packet: &mut BTreeMap<&'static str, Vec<f64>>,
) -> (BTreeMap<String, f64>, ProgStats, ProgStats) {
    let before = prog_stats();
    let d = dnsperf(node, server, queryfile.to_str().unwrap(), mode);
    let after = prog_stats();
    record_cost(
        per_packet,
        &["tc_ingress", "tc_egress", "floor_tc"],
        &before,
        &after,
    );
    (d, before, after)
}

/// Each classifier's cost over the floor against the DNS budget: queries leave through
/// `tc_egress`, responses arrive through `tc_ingress`. `label` names the row from the
/// program and the side.
fn report_cost(
    report: &mut Report,
    per_packet: &BTreeMap<&str, Vec<f64>>,
    label: impl Fn(&str, &str) -> String,
) {
    for (n, what) in [("tc_egress", "query"), ("tc_ingress", "response")] {
        if let Some(s) = over_floor(per_packet, n, "floor_tc") {
            report.add(
                "dns",
                label(n, what),
                "ns/pkt",
                s,
                Some(("<= 300 ns".into(), s.median <= 300.0)),
            );
        }
    }
}

/// Each run's figures of the DNS load, one vector a figure.
#[derive(Default)]
pub(crate) struct DnsRuns {
    pub(crate) rates: Vec<f64>,
    pub(crate) sent_diff: Vec<f64>,
    pub(crate) answered_diff: Vec<f64>,
    pub(crate) unanswered_diff: Vec<f64>,
    pub(crate) drops: Vec<f64>,
    pub(crate) full: Vec<f64>,
}

/// 3. DNS at the resolver's highest rate: the agent's counts against dnsperf's.
pub(crate) fn dns_load(report: &mut Report) -> f64 {
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let _resolver = Resolver::start(&sim.vpc, &[eth0.vpc_v4.parse().unwrap()]);
    let agent = Agent::start(&sim.node, &["--device", "eth0", "--dns-timeout", "2s"]);
    let floor = floor_classifiers(&sim.node, "eth0");
    let queryfile = std::env::temp_dir().join("eni-monitor-bench-queries");
    std::fs::write(&queryfile, format!("{OK_NAME} A\n")).unwrap();
    let mut r = DnsRuns::default();
    let cpu_before = cpu_seconds(agent.pid());
    let started = Instant::now();
    let mut per_dns_packet: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    bpf_stats(true);
    for _ in 0..runs() {
        let before = agent.scrape(&sim.node);
        let (d, _, _) = costed_run(
            &sim.node,
            &eth0.vpc_v4,
            &queryfile,
            "udp",
            &mut per_dns_packet,
        );
        // Past the agent's timeout, so that every lost query has been swept.
        std::thread::sleep(Duration::from_millis(2500));
        let after = agent.scrape(&sim.node);
        let delta = |name: &str| {
            after.sum(name, &[("device", "eth0")]) - before.sum(name, &[("device", "eth0")])
        };
        // A response that reached the ENI but was dropped by this kernel (dnsperf's
        // socket full, say) is matched at the ENI and counted as a DNS drop: dnsperf
        // calls it lost, the agent says where it was lost.
        let kernel_drops = delta("eni_monitor_dns_drops_total");
        r.rates.push(d["Queries per second"]);
        r.sent_diff
            .push(delta("eni_monitor_dns_queries_total") - d["Queries sent"]);
        r.answered_diff
            .push(delta("eni_monitor_dns_responses_total") - kernel_drops - d["Queries completed"]);
        r.unanswered_diff
            .push(delta("eni_monitor_dns_unanswered_total") + kernel_drops - d["Queries lost"]);
        r.drops.push(kernel_drops);
        let inflight_full = [("map", "dns_inflight")];
        r.full.push(
            after.sum("eni_monitor_map_full_total", &inflight_full)
                - before.sum("eni_monitor_map_full_total", &inflight_full),
        );
    }
    bpf_stats(false);
    drop(floor);
    let cpu = (cpu_seconds(agent.pid()) - cpu_before) / started.elapsed().as_secs_f64() * 60.0;
    if let Some(v) = per_dns_packet.get("floor_tc") {
        report.add(
            "dns",
            "floor: empty classifier",
            "ns",
            stat(v.clone()),
            None,
        );
    }
    report_cost(report, &per_dns_packet, |n, what| {
        format!("{n} over the floor, per DNS {what}")
    });
    let rate = stat(r.rates);
    report.add("dns", "dnsperf rate reached", "q/s", rate, None);
    report.add(
        "dns",
        "responses dropped by the node's kernel",
        "queries",
        stat(r.drops),
        None,
    );
    let s = stat(r.full);
    report.add(
        "dns",
        "queries the in-flight table had no room for",
        "queries",
        s,
        Some(("0".into(), s.max == 0.0)),
    );
    exact(
        report,
        [
            ("queries: agent - dnsperf sent", r.sent_diff),
            (
                "responses - kernel drops: agent - dnsperf completed",
                r.answered_diff,
            ),
            (
                "unanswered + kernel drops: agent - dnsperf lost",
                r.unanswered_diff,
            ),
        ],
    );
    let _ = std::fs::remove_file(queryfile);
    cpu
}

/// Rows whose every run must be 0: the agent's counts against dnsperf's.
pub(crate) fn exact(report: &mut Report, rows: [(&str, Vec<f64>); 3]) {
    for (what, v) in rows {
        let s = stat(v);
        report.add(
            "dns",
            what,
            "queries",
            s,
            Some(("0 (exact)".into(), s.min == 0.0 && s.max == 0.0)),
        );
    }
}

/// 3b. DNS over TCP at the resolver's highest rate, dnsperf pipelining up to 500 queries
/// on its connections: the classifiers' cost per packet over the floor (a segment's
/// every message read, the `bpf_loop` included: its time is the classifier's), the
/// messages a segment carried, the agent's count against dnsperf's, and the segments it
/// owned up to not reading.
pub(crate) fn dns_tcp_load(report: &mut Report) {
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let _resolver = Resolver::start(&sim.vpc, &[eth0.vpc_v4.parse().unwrap()]);
    let agent = Agent::start(&sim.node, &["--device", "eth0", "--dns-timeout", "2s"]);
    let floor = floor_classifiers(&sim.node, "eth0");
    let queryfile = std::env::temp_dir().join("eni-monitor-bench-queries-tcp");
    std::fs::write(&queryfile, format!("{OK_NAME} A\n")).unwrap();
    let mut per_packet: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let (mut per_segment, mut sent_diff, mut counted, mut unread) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    bpf_stats(true);
    for _ in 0..runs() {
        let before = agent.scrape(&sim.node);
        let (d, progs_before, progs_after) =
            costed_run(&sim.node, &eth0.vpc_v4, &queryfile, "tcp", &mut per_packet);
        std::thread::sleep(Duration::from_millis(2500));
        let after = agent.scrape(&sim.node);
        let queries = after.sum("eni_monitor_dns_queries_total", &[("device", "eth0")])
            - before.sum("eni_monitor_dns_queries_total", &[("device", "eth0")]);
        sent_diff.push(queries - d["Queries sent"]);
        let unread_total = |s: &Scrape| s.sum("eni_monitor_dns_tcp_unread_segments_total", &[]);
        unread.push(unread_total(&after) - unread_total(&before));
        counted.push(queries / d["Queries sent"].max(1.0));
        let egress = |s: &ProgStats| s.get("tc_egress").map_or(0, |p| p.1);
        let packets = egress(&progs_after).saturating_sub(egress(&progs_before));
        #[expect(clippy::cast_precision_loss, reason = "a ratio for the report")]
        per_segment.push(queries / (packets.max(1) as f64));
    }
    bpf_stats(false);
    drop(floor);
    report_cost(report, &per_packet, |n, what| {
        format!("{n} over the floor, per packet of DNS over TCP ({what} side)")
    });
    report.add(
        "dns",
        "DNS over TCP: queries per packet leaving (dnsperf pipelining)",
        "q/pkt",
        stat(per_segment),
        None,
    );
    let share = stat(counted);
    report.add(
        "dns",
        "DNS over TCP: share of dnsperf's queries the agent counted",
        "ratio",
        share,
        Some(("≥ 0.999".into(), share.min >= 0.999)),
    );
    let s = stat(sent_diff);
    report.add(
        "dns",
        "DNS over TCP: queries counted minus dnsperf's sent",
        "queries",
        s,
        None,
    );
    report.add(
        "dns",
        "DNS over TCP: segments counted unread (a header cut by its segment's end)",
        "segments",
        stat(unread),
        None,
    );
}
