//! The fleet: a real agent's exposition served as a few thousand nodes (each its own
//! scrape target, `node` from the target's labels as a `PodMonitor` gives it, values
//! varied per node and growing over time), scraped by Debian's Prometheus with the
//! shipped rules: the series it holds, how long each rule evaluation takes, its memory.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use integration_tests::{
    Background, Netns,
    busy::BusyNode,
    paging::{Prometheus, wait_for},
};

use crate::{
    agent::rss_mib,
    report::{Report, env_count, stat},
};

/// Where the fleet's expositions are served, inside the bench's namespace.
const FLEET: &str = "127.0.0.1:9100";
/// Prometheus's scrape and rule evaluation interval, as commonly configured.
const INTERVAL_S: u64 = 15;
/// Rule evaluations measured.
const CYCLES: usize = 5;

/// A real agent's exposition on a busy node (the series budget's).
fn agent_exposition() -> String {
    let (_node, scrape) = BusyNode::build();
    scrape.text
}

/// One sample line: its name-and-labels and its value.
struct Line {
    series: String,
    value: f64,
    kind: Kind,
}

/// How a line's value moves across the fleet and over time.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Gauge,
    /// Grows with the node's traffic.
    Traffic,
    /// Counts trouble: grows only on the troubled nodes.
    Trouble,
}

/// Counters that count trouble (what the rules page on), by a piece of the series.
const TROUBLE: [&str; 7] = [
    "map_full",
    "table_full",
    "unanswered",
    "connect_failures",
    "event=\"insert_failed\"",
    "event=\"drop\"",
    "event=\"early_drop\"",
];

/// The exposition's samples, and its comment lines kept for the text served.
fn template(text: &str) -> (Vec<String>, Vec<Line>) {
    let mut comments = Vec::new();
    let mut lines = Vec::new();
    for l in text.lines() {
        if l.starts_with('#') {
            comments.push(l.to_owned());
            continue;
        }
        let Some((series, value)) = l.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or_default();
        let counter = ["_total", "_count", "_sum", "_bucket"]
            .iter()
            .any(|s| name.ends_with(s));
        let kind = match counter {
            false => Kind::Gauge,
            true if TROUBLE.iter().any(|t| series.contains(t)) => Kind::Trouble,
            true => Kind::Traffic,
        };
        lines.push(Line {
            series: series.to_owned(),
            value: value.parse().unwrap_or(0.0),
            kind,
        });
    }
    (comments, lines)
}

/// Node `n`'s exposition `elapsed` seconds in: gauges scaled by a factor of its own,
/// traffic counters scaled and growing, trouble growing on one node in a hundred, and
/// utilization spread over the fleet as fleets are: most nodes far from the allowance,
/// a few near it.
fn render(comments: &[String], lines: &[Line], n: usize, elapsed: f64) -> String {
    // A spread in [0, 1) from the node's number.
    let x = ((n.wrapping_mul(2_654_435_761) >> 8) % 1000) as f64 / 1000.0;
    let f = 0.5 + x;
    let troubled = n.is_multiple_of(100);
    let mut out = String::with_capacity(lines.len() * 96);
    for c in comments {
        out.push_str(c);
        out.push('\n');
    }
    for l in lines {
        let grows = match l.kind {
            Kind::Gauge => false,
            Kind::Traffic => true,
            Kind::Trouble => troubled,
        };
        let v = if l
            .series
            .starts_with("eni_monitor_conntrack_allowance_utilization_ratio")
        {
            0.98 * x * x * x
        } else if grows {
            (l.value + elapsed) * f
        } else {
            l.value * f
        };
        let _ = writeln!(out, "{} {v}", l.series);
    }
    out
}

/// Serves `/node/<n>` with node n's exposition until dropped.
fn serve(ns: &Netns, comments: Vec<String>, lines: Vec<Line>) -> Background {
    let listener = ns.run(|| TcpListener::bind(FLEET).unwrap());
    listener.set_nonblocking(true).unwrap();
    let data = Arc::new((comments, lines));
    let started = Instant::now();
    Background::spawn(move |stop| {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => {
                    let data = Arc::clone(&data);
                    std::thread::spawn(move || answer(conn, &data.0, &data.1, started));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    })
}

/// Answers the requests of one connection (Prometheus keeps it open).
fn answer(conn: TcpStream, comments: &[String], lines: &[Line], started: Instant) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_mins(1)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request).unwrap_or(0) == 0 {
            return;
        }
        // The headers, up to the blank line.
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" || h == "\n" {
                break;
            }
        }
        let n: usize = request
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.strip_prefix("/node/"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let body = render(comments, lines, n, started.elapsed().as_secs_f64());
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        if conn.write_all(head.as_bytes()).is_err() || conn.write_all(body.as_bytes()).is_err() {
            return;
        }
    }
}

fn config(nodes: usize) -> String {
    let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/alerts/rules.yml")
        .canonicalize()
        .unwrap();
    let mut c = format!(
        "global:\n  scrape_interval: {INTERVAL_S}s\n  evaluation_interval: {INTERVAL_S}s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: eni-monitor\n    static_configs:\n",
        rules.display()
    );
    for n in 0..nodes {
        let _ = writeln!(
            c,
            "      - targets: ['{FLEET}']\n        labels: {{node: node-{n:05}, __metrics_path__: /node/{n}}}"
        );
    }
    c
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
