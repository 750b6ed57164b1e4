//! A simulated fleet: a real agent's exposition served as many nodes (each its own
//! scrape target at `/node/<n>`, values varied per node and growing over time, trouble
//! on one node in a hundred), for the fleet bench and the second-engine test.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{Background, Netns, busy::BusyNode};

/// Where the fleet's expositions are served, inside the caller's namespace.
pub const FLEET: &str = "127.0.0.1:9100";

/// A real agent's exposition on a busy node (the series budget's).
pub fn agent_exposition() -> String {
    let (_node, scrape) = BusyNode::build();
    scrape.text
}

/// One sample line: its name-and-labels and its value.
pub struct Line {
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
    /// Counts trouble: grows on the troubled nodes, 0 on the others.
    Trouble,
}

/// Counters that count trouble (what the rules page on), by a piece of the series.
const TROUBLE: [&str; 8] = [
    "dns_drops",
    "map_full",
    "table_full",
    "unanswered",
    "connect_failures",
    "event=\"insert_failed\"",
    "event=\"drop\"",
    "event=\"early_drop\"",
];

/// The exposition's samples, and its comment lines kept for the text served.
pub fn template(text: &str) -> (Vec<String>, Vec<Line>) {
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
    let x =
        f64::from(u16::try_from((n.wrapping_mul(2_654_435_761) >> 8) % 1000).unwrap_or(0)) / 1000.0;
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
        } else if l.kind == Kind::Trouble {
            // A node without trouble never had any: its trouble counters are 0.
            0.0
        } else {
            l.value * f
        };
        // The node's ENI ids, as IMDS names them on EC2 (the busy node has no IMDS).
        if l.series.contains("eni=\"\"") {
            let (before, after) = l.series.split_once("eni=\"\"").unwrap_or_default();
            let dev = u8::from(l.series.contains("device=\"eth1\""));
            let _ = writeln!(out, "{before}eni=\"eni-{n:08x}{dev:09x}\"{after} {v}");
            continue;
        }
        let _ = writeln!(out, "{} {v}", l.series);
    }
    out
}

/// Serves `/node/<n>` with node n's exposition until dropped.
pub fn serve(ns: &Netns, comments: Vec<String>, lines: Vec<Line>) -> Background {
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

/// `static_configs` entries (YAML, indented under a job) for nodes `0..nodes`, each
/// labelled `node` as a `PodMonitor` gives it.
pub fn static_targets(nodes: usize) -> String {
    let mut c = String::new();
    for n in 0..nodes {
        let _ = writeln!(
            c,
            "      - targets: ['{FLEET}']\n        labels: {{node: node-{n:05}, __metrics_path__: /node/{n}}}"
        );
    }
    c
}
