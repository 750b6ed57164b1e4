//! DNS under load: dnsperf against unbound through the classifiers, and the agent's
//! counts against dnsperf's.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::agent::cpu_seconds;
use crate::cost::{bpf_stats, floor_classifiers, over_floor, prog_stats, record_cost};
use crate::report::{Report, runs, stat};
use integration_tests::{
    Agent, Netns, SimNode,
    dns::{OK_NAME, Resolver},
    sh,
};

pub(crate) fn dnsperf(node: &Netns, server: &str, queryfile: &str) -> BTreeMap<String, f64> {
    let out = sh(node.command("dnsperf").args([
        "-s", server, "-d", queryfile, "-l", "5", "-q", "500", "-t", "2",
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
        let progs_before = prog_stats();
        let d = dnsperf(&sim.node, &eth0.vpc_v4, queryfile.to_str().unwrap());
        let progs_after = prog_stats();
        record_cost(
            &mut per_dns_packet,
            &["tc_ingress", "tc_egress", "floor_tc"],
            &progs_before,
            &progs_after,
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
    // Queries leave through tc_egress, responses arrive through tc_ingress.
    for (n, what) in [("tc_egress", "query"), ("tc_ingress", "response")] {
        if let Some(s) = over_floor(&per_dns_packet, n, "floor_tc") {
            report.add(
                "dns",
                format!("{n} over the floor, per DNS {what}"),
                "ns/pkt",
                s,
                Some(("<= 300 ns".into(), s.median <= 300.0)),
            );
        }
    }
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
