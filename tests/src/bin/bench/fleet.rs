//! The fleet: a real agent's exposition served as a few thousand nodes (each its own
//! scrape target, `node` from the target's labels as a `PodMonitor` gives it, values
//! varied per node and growing over time), scraped by Debian's Prometheus with the
//! shipped rules: the series it holds, how long each rule evaluation takes, its memory.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use integration_tests::paging::Engine as _;
use integration_tests::{
    Netns,
    fleet::{agent_exposition, serve, static_targets, template},
    golden::metric_names,
    paging::{ALERTMANAGER, Alertmanager, Prometheus, wait_for},
    victoria::Victoria,
};
use serde_json::Value;

use crate::{
    agent::rss_mib,
    report::{Report, stat},
};

/// Prometheus's scrape and rule evaluation interval, as commonly configured.
const INTERVAL_S: u64 = 15;
/// Rule evaluations measured.
const CYCLES: usize = 5;
/// How long the fleet runs before the evaluations are measured: the rules' longest rate
/// window (5 minutes), so that every window is full, as in operation, and the burst of
/// 1 million new series in the head is past.
const WARM_UP: Duration = Duration::from_mins(5);

/// The shipped rules file.
fn shipped_rules() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/alerts/rules.yml")
        .canonicalize()
        .unwrap()
}

/// The selectors of the agents' series (and `up`) in the shipped rules' expressions,
/// each once, with its matchers.
fn raw_selectors(rules: &str) -> BTreeSet<String> {
    let exprs = expressions(rules);
    let mut names = metric_names(&exprs);
    names.insert("up".to_owned());
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut selectors = BTreeSet::new();
    for name in &names {
        for (at, _) in exprs.match_indices(name.as_str()) {
            let before = exprs[..at].chars().next_back();
            let after = &exprs[at + name.len()..];
            if before.is_some_and(word) || after.starts_with(word) {
                continue;
            }
            let matchers = match after.strip_prefix('{') {
                Some(m) => m.find('}').map_or("", |end| &after[..end + 2]),
                None => "",
            };
            selectors.insert(format!("{name}{matchers}"));
        }
    }
    selectors
}

/// The text of every `expr:` of a rules file, block scalars included.
fn expressions(rules: &str) -> String {
    let mut exprs = String::new();
    let mut lines = rules.lines().peekable();
    while let Some(l) = lines.next() {
        let Some(rest) = l.trim_start().strip_prefix("expr:") else {
            continue;
        };
        if rest.trim() != "|" {
            exprs.push_str(rest);
            exprs.push('\n');
            continue;
        }
        let indent = l.len() - l.trim_start().len();
        while let Some(body) = lines.next_if(|b| b.len() - b.trim_start().len() > indent) {
            exprs.push_str(body);
            exprs.push('\n');
        }
    }
    exprs
}

/// A rules file that reads each of those selectors once a cycle and does nothing else:
/// the least any rules that page on the same series can read, whatever their shape.
fn raw_reads_rules(dir: &Path) -> PathBuf {
    let selectors = raw_selectors(&std::fs::read_to_string(shipped_rules()).unwrap());
    let mut text = String::from("groups:\n  - name: raw-reads\n    rules:\n");
    for (i, sel) in selectors.iter().enumerate() {
        let name = sel.split('{').next().unwrap_or_default();
        let _ = writeln!(
            text,
            "      - record: raw:{name}:selector_{i}\n        expr: count by (node) ({sel})"
        );
    }
    let path = dir.join("raw-reads.yml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Prometheus's configuration: the rules file `rules`, and the fleet's `nodes` scraped
/// (none: the rules alone, on what the head holds).
fn config(rules: &Path, nodes: usize) -> String {
    let scrapes = match nodes {
        0 => String::new(),
        _ => format!(
            "scrape_configs:\n  - job_name: eni-monitor\n    static_configs:\n{}",
            static_targets(nodes)
        ),
    };
    format!(
        "global:\n  scrape_interval: {INTERVAL_S}s\n  evaluation_interval: {INTERVAL_S}s\nrule_files:\n  - {}\n{scrapes}",
        rules.display(),
    )
}

/// A group's evaluation time in seconds: its own where the engine gives it (Prometheus),
/// else the sum of its rules' (vmalert).
fn group_time(g: &Value) -> f64 {
    g["evaluationTime"].as_f64().unwrap_or_else(|| {
        g["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["evaluationTime"].as_f64())
            .sum()
    })
}

/// Each rule group's last evaluation from a `/api/v1/rules` answer: (when, seconds).
fn groups(v: &Value) -> BTreeMap<String, (String, f64)> {
    v["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            (
                g["name"].as_str().unwrap_or_default().to_owned(),
                (
                    g["lastEvaluation"].as_str().unwrap_or_default().to_owned(),
                    group_time(g),
                ),
            )
        })
        .collect()
}

/// Each rule's last evaluation time, in seconds, by group and name (an alert's or a
/// recording rule's).
fn rules(v: &Value) -> Vec<(String, f64)> {
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

/// `CYCLES` evaluations of every group, each a cycle in which every group evaluated
/// anew, read from an engine's `/api/v1/rules`: every group's sum a cycle, each group's,
/// each rule's (milliseconds).
struct Cycles {
    all: Vec<f64>,
    each: BTreeMap<String, Vec<f64>>,
    by_rule: BTreeMap<String, Vec<f64>>,
}

fn cycles(api: &dyn Fn() -> Option<Value>) -> Cycles {
    let read = || api().unwrap_or_default();
    let mut c = Cycles {
        all: Vec::new(),
        each: BTreeMap::new(),
        by_rule: BTreeMap::new(),
    };
    let mut last = groups(&read());
    let deadline = Instant::now() + Duration::from_secs(INTERVAL_S * (CYCLES as u64 + 4));
    while c.all.len() < CYCLES {
        assert!(
            Instant::now() < deadline,
            "the rules stopped evaluating: {last:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
        let v = read();
        let now = groups(&v);
        if !now.is_empty()
            && now.values().all(|g| !g.0.is_empty())
            && now
                .iter()
                .all(|(name, g)| last.get(name).is_some_and(|l| l.0 != g.0))
        {
            c.all.push(now.values().map(|g| g.1 * 1000.0).sum());
            for (name, g) in &now {
                c.each.entry(name.clone()).or_default().push(g.1 * 1000.0);
            }
            for (name, t) in rules(&v) {
                c.by_rule.entry(name).or_default().push(t * 1000.0);
            }
            last = now;
        }
    }
    c
}

/// An engine's figures: its series, its rule evaluations, its memory.
fn add(report: &mut Report, engine: &str, nodes: usize, series: f64, c: Cycles, rss: f64) {
    report.add(
        "fleet",
        format!("{engine}: series held, {nodes} nodes"),
        "series",
        stat(vec![series]),
        None,
    );
    let all = stat(c.all);
    // The budget: a tenth of the interval, with the fleet at EKS's largest.
    let met = all.median <= RULES_BUDGET_MS;
    report.add(
        "fleet",
        format!("{engine}: rule evaluation, every group, {nodes} nodes"),
        "ms",
        all,
        Some((
            format!("<= {RULES_BUDGET_MS} ms a {INTERVAL_S} s cycle"),
            met,
        )),
    );
    for (name, times) in c.each {
        report.add(
            "fleet",
            format!("{engine}: group {name}, {nodes} nodes"),
            "ms",
            stat(times),
            None,
        );
    }
    let mut by_rule: Vec<_> = c.by_rule.into_iter().map(|(n, t)| (n, stat(t))).collect();
    by_rule.sort_by(|a, b| b.1.median.total_cmp(&a.1.median));
    for (name, times) in by_rule.into_iter().take(DEAREST_RULES) {
        report.add(
            "fleet",
            format!("{engine}: rule {name}, {nodes} nodes"),
            "ms",
            times,
            None,
        );
    }
    report.add(
        "fleet",
        format!("{engine}: resident memory, {nodes} nodes"),
        "MiB",
        stat(vec![rss]),
        None,
    );
}

/// Every group's evaluation a cycle, at most (median of `CYCLES`).
const RULES_BUDGET_MS: f64 = 1500.0;

/// The fleet on Debian's Prometheus, scraping and evaluating every `INTERVAL_S`.
fn on_prometheus(report: &mut Report, ns: &Netns, nodes: usize, per_node: usize) {
    let shipped = shipped_rules();
    let prom = Prometheus::with_config(ns, &config(&shipped, nodes));
    // Every target scraped, and the head holding the whole fleet.
    let head = || {
        prom.api(ns, "/api/v1/status/tsdb")
            .and_then(|v| v["data"]["headStats"]["numSeries"].as_f64())
            .unwrap_or(0.0)
    };
    let want = (nodes * per_node) as f64;
    wait_for(
        "the fleet in Prometheus's head",
        Duration::from_mins(5),
        || head() >= want,
    );
    std::thread::sleep(WARM_UP);
    let c = cycles(&|| prom.api(ns, "/api/v1/rules"));
    add(report, "Prometheus", nodes, head(), c, rss_mib(prom.pid()));
    // Reloaded with `config`, one cycle left to pass, then measured as `label`.
    let mut after_reload = |label: &str, config: &str| {
        prom.reload(config);
        std::thread::sleep(Duration::from_secs(INTERVAL_S));
        let c = cycles(&|| prom.api(ns, "/api/v1/rules"));
        add(report, label, nodes, head(), c, rss_mib(prom.pid()));
    };
    // The same rules on the same head with the scrapes stopped: the rules' own work,
    // without the ingestion that shares the cores with them. Measured within the 5
    // minutes in which every window still holds the fleet's samples.
    after_reload("Prometheus, scrapes stopped", &config(&shipped, 0));
    // The floor under any rules on the same head, scraping again: each selector the
    // shipped rules use, read once, and nothing else.
    after_reload(
        "Prometheus, the rules' selectors alone (each read once, nothing else)",
        &config(&raw_reads_rules(prom.dir()), nodes),
    );
}

/// The fleet scraped by two vmagents sharing the targets, into `VictoriaMetrics`, the
/// rules evaluated by vmalert and sent to Alertmanager, all every `INTERVAL_S`.
fn on_victoria(report: &mut Report, ns: &Netns, nodes: usize, per_node: usize) {
    let _am = Alertmanager::start(ns);
    let job = format!(
        "  - job_name: eni-monitor\n    static_configs:\n{}",
        static_targets(nodes)
    );
    let vm = Victoria::start(ns, &job, INTERVAL_S, ALERTMANAGER);
    let series = || {
        vm.api(ns, "/api/v1/series/count")
            .and_then(|v| v["data"][0].as_f64())
            .unwrap_or(0.0)
    };
    let want = (nodes * per_node) as f64;
    wait_for(
        "the fleet in VictoriaMetrics",
        Duration::from_mins(5),
        || series() >= want,
    );
    std::thread::sleep(WARM_UP);
    let c = cycles(&|| vm.rules(ns));
    let rss = vm.pids().iter().map(|&p| rss_mib(p)).sum();
    add(
        report,
        "VictoriaMetrics (2 vmagents, vmalert)",
        nodes,
        series(),
        c,
        rss,
    );
}

/// The seventh part, the fleet at each of the `BENCH_FLEET_NODES` sizes (default 3000
/// and 5000, EKS's largest), on Prometheus and then on the sharded second engine.
pub(crate) fn fleet(report: &mut Report) {
    let sizes: Vec<usize> = std::env::var("BENCH_FLEET_NODES").ok().map_or_else(
        || vec![3000, 5000],
        |v| v.split(',').filter_map(|n| n.parse().ok()).collect(),
    );
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
    // BENCH_FLEET_ENGINES=prometheus (or victoria) runs one engine only.
    let engines = std::env::var("BENCH_FLEET_ENGINES").unwrap_or_default();
    let runs = |engine: &str| engines.is_empty() || engines.contains(engine);
    for nodes in sizes {
        if runs("prometheus") {
            on_prometheus(report, &ns, nodes, per_node);
        }
        if runs("victoria") {
            on_victoria(report, &ns, nodes, per_node);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raw_reads_are_the_expressions_selectors_and_up() {
        let rules = "      - record: a:b:c\n        expr: sum (rate(eni_monitor_x_total{a!=\"b\"}[5m]))\n      - alert: A\n        expr: |\n          a:eni_monitor_x_total:c > 0\n          * on (node) group_left eni_monitor_y or up{job=\"j\"} == 0\n        annotations:\n          description: \"see eni_monitor_z\"\n";
        let selectors: Vec<_> = raw_selectors(rules).into_iter().collect();
        assert_eq!(
            selectors,
            [
                "eni_monitor_x_total{a!=\"b\"}",
                "eni_monitor_y",
                "up{job=\"j\"}"
            ]
        );
        let shipped = raw_selectors(&std::fs::read_to_string(shipped_rules()).unwrap());
        assert!(shipped.contains("eni_monitor_program_attached"));
        assert!(shipped.contains(
            "eni_monitor_nf_conntrack_events_total{event=~\"insert_failed|drop|early_drop\"}"
        ));
        // Named in annotations only, never read by a rule.
        assert!(!shipped.iter().any(|s| s.contains("top_flow_owners")));
    }
}
