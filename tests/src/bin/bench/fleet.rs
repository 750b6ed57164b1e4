//! The fleet: a real agent's exposition served as a few thousand nodes (each its own
//! scrape target, `node` from the target's labels as a `PodMonitor` gives it, values
//! varied per node and growing over time), scraped by Debian's Prometheus with the
//! shipped rules: the series it holds, how long each rule evaluation takes, its memory.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use integration_tests::{
    Netns,
    fleet::{agent_exposition, serve, static_targets, template},
    paging::{Prometheus, wait_for},
};

use crate::{
    agent::rss_mib,
    report::{Report, env_count, stat},
};

/// Prometheus's scrape and rule evaluation interval, as commonly configured.
const INTERVAL_S: u64 = 15;
/// Rule evaluations measured.
const CYCLES: usize = 5;

fn config(nodes: usize) -> String {
    let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/alerts/rules.yml")
        .canonicalize()
        .unwrap();
    format!(
        "global:\n  scrape_interval: {INTERVAL_S}s\n  evaluation_interval: {INTERVAL_S}s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: eni-monitor\n    static_configs:\n{}",
        rules.display(),
        static_targets(nodes)
    )
}

/// Each rule group's last evaluation: (when, seconds it took).
fn groups(prom: &Prometheus, ns: &Netns) -> BTreeMap<String, (String, f64)> {
    let v = prom.api(ns, "/api/v1/rules").unwrap_or_default();
    v["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            (
                g["name"].as_str().unwrap_or_default().to_owned(),
                (
                    g["lastEvaluation"].as_str().unwrap_or_default().to_owned(),
                    g["evaluationTime"].as_f64().unwrap_or(0.0),
                ),
            )
        })
        .collect()
}

/// Each rule's last evaluation time, in seconds, by group and name (an alert's or a
/// recording rule's).
fn rules(prom: &Prometheus, ns: &Netns) -> Vec<(String, f64)> {
    let v = prom.api(ns, "/api/v1/rules").unwrap_or_default();
    let mut out = Vec::new();
    for g in v["data"]["groups"].as_array().into_iter().flatten() {
        for r in g["rules"].as_array().into_iter().flatten() {
            out.push((
                format!(
                    "{} {}",
                    g["name"].as_str().unwrap_or_default(),
                    r["name"].as_str().unwrap_or_default()
                ),
                r["evaluationTime"].as_f64().unwrap_or(0.0),
            ));
        }
    }
    out
}

/// Rules reported one by one: the dearest.
const DEAREST_RULES: usize = 8;

/// 7. The fleet: `BENCH_FLEET_NODES` nodes (default 3000) on one Prometheus.
pub(crate) fn fleet(report: &mut Report) {
    let nodes = env_count("BENCH_FLEET_NODES", 3000);
    let text = agent_exposition();
    let (comments, lines) = template(&text);
    let per_node = lines.len();
    report.add(
        "fleet",
        "series of one node (a real agent's, the busy node)",
        "series",
        stat(vec![per_node as f64]),
        None,
    );
    let ns = Netns::new("fleet");
    let _server = serve(&ns, comments, lines);
    let prom = Prometheus::with_config(&ns, &config(nodes));
    // Every target scraped, and the head holding the whole fleet.
    let head = || {
        prom.api(&ns, "/api/v1/status/tsdb")
            .and_then(|v| v["data"]["headStats"]["numSeries"].as_f64())
            .unwrap_or(0.0)
    };
    let want = (nodes * per_node) as f64;
    wait_for(
        "the fleet in Prometheus's head",
        Duration::from_mins(5),
        || head() >= want,
    );
    // Evaluations of every group, each cycle's sum, and each group's own.
    let mut all = Vec::new();
    let mut each: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut by_rule: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut last = groups(&prom, &ns);
    let deadline = Instant::now() + Duration::from_secs(INTERVAL_S * (CYCLES as u64 + 4));
    while all.len() < CYCLES {
        assert!(
            Instant::now() < deadline,
            "the rules stopped evaluating: {last:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
        let now = groups(&prom, &ns);
        if now.values().all(|g| !g.0.is_empty())
            && now
                .iter()
                .all(|(name, g)| last.get(name).is_some_and(|l| l.0 != g.0))
        {
            all.push(now.values().map(|g| g.1 * 1000.0).sum());
            for (name, g) in &now {
                each.entry(name.clone()).or_default().push(g.1 * 1000.0);
            }
            for (name, t) in rules(&prom, &ns) {
                by_rule.entry(name).or_default().push(t * 1000.0);
            }
            last = now;
        }
    }
    let series = head();
    let rss = rss_mib(prom.pid());
    report.add(
        "fleet",
        format!("series in Prometheus, {nodes} nodes"),
        "series",
        stat(vec![series]),
        None,
    );
    let all = stat(all);
    // An evaluation longer than the interval misses the next one.
    let met = all.max < (INTERVAL_S * 1000) as f64;
    report.add(
        "fleet",
        format!("rule evaluation, every group, {nodes} nodes"),
        "ms",
        all,
        Some((format!("< {INTERVAL_S} s, the interval"), met)),
    );
    for (name, times) in each {
        report.add(
            "fleet",
            format!("group {name}, {nodes} nodes"),
            "ms",
            stat(times),
            None,
        );
    }
    let mut by_rule: Vec<_> = by_rule.into_iter().map(|(n, t)| (n, stat(t))).collect();
    by_rule.sort_by(|a, b| b.1.median.total_cmp(&a.1.median));
    for (name, times) in by_rule.into_iter().take(DEAREST_RULES) {
        report.add(
            "fleet",
            format!("rule {name}, {nodes} nodes"),
            "ms",
            times,
            None,
        );
    }
    report.add(
        "fleet",
        format!("Prometheus resident memory, {nodes} nodes"),
        "MiB",
        stat(vec![rss]),
        None,
    );
}
