//! The report: each figure a median of several runs with min and max, written as
//! `target/bench/report.{json,md}` with the machine it ran on.

use std::{fmt::Write as _, process::Command};

use serde_json::Value;

/// Median, min and max of several runs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stat {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

pub(crate) fn stat(mut v: Vec<f64>) -> Stat {
    assert!(!v.is_empty());
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    };
    Stat {
        median,
        min: v[0],
        max: v[n - 1],
    }
}

/// One line of the report.
pub(crate) struct Row {
    pub(crate) section: &'static str,
    pub(crate) name: String,
    pub(crate) unit: &'static str,
    pub(crate) stat: Stat,
    pub(crate) target: Option<(String, bool)>,
}

#[derive(Default)]
pub(crate) struct Report {
    pub(crate) rows: Vec<Row>,
}

impl Report {
    pub(crate) fn add(
        &mut self,
        section: &'static str,
        name: impl Into<String>,
        unit: &'static str,
        stat: Stat,
        target: Option<(String, bool)>,
    ) {
        let row = Row {
            section,
            name: name.into(),
            unit,
            stat,
            target,
        };
        let t = row
            .target
            .as_ref()
            .map(|(t, met)| format!("  [{t}: {}]", if *met { "met" } else { "NOT met" }))
            .unwrap_or_default();
        println!(
            "{:<10} {:<52} {:>12.2} {:<8} (min {:.2}, max {:.2}){t}",
            row.section, row.name, row.stat.median, row.unit, row.stat.min, row.stat.max
        );
        self.rows.push(row);
    }
}

/// A count from the environment (at least 1), else `default`.
pub(crate) fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .max(1)
}

pub(crate) fn runs() -> usize {
    env_count("BENCH_RUNS", 5)
}

pub(crate) fn machine() -> Vec<(&'static str, String)> {
    let first = |cmd: &mut Command| {
        String::from_utf8_lossy(&cmd.output().map(|o| o.stdout).unwrap_or_default())
            .trim()
            .to_owned()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    vec![
        ("kernel", first(Command::new("uname").arg("-r"))),
        ("cpu", cpu),
        (
            "cores",
            std::thread::available_parallelism()
                .map(|n| n.to_string())
                .unwrap_or_default(),
        ),
        (
            "commit",
            first(Command::new("git").args(["rev-parse", "--short", "HEAD"])),
        ),
        ("runs", runs().to_string()),
    ]
}

pub(crate) fn write_reports(report: &Report, machine: &[(&str, String)]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let rows: Vec<Value> = report
        .rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "section": r.section, "name": r.name, "unit": r.unit,
                "median": r.stat.median, "min": r.stat.min, "max": r.stat.max,
                "target": r.target.as_ref().map(|t| &t.0), "met": r.target.as_ref().map(|t| t.1),
            })
        })
        .collect();
    let m: serde_json::Map<String, Value> = machine
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::from(v.as_str())))
        .collect();
    let json = serde_json::json!({ "machine": m, "results": rows });
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    let mut md = String::from("# eni-monitor benchmark\n\n");
    for (k, v) in machine {
        let _ = writeln!(md, "- {k}: {v}");
    }
    md.push_str("\n| section | measure | median | unit | min | max | target |\n|---|---|---:|---|---:|---:|---|\n");
    for r in &report.rows {
        let t = r
            .target
            .as_ref()
            .map(|(t, met)| format!("{t}: {}", if *met { "met" } else { "not met" }))
            .unwrap_or_default();
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {} | {:.2} | {:.2} | {t} |",
            r.section, r.name, r.stat.median, r.unit, r.stat.min, r.stat.max
        );
    }
    std::fs::write(dir.join("report.md"), md).unwrap();
    println!("\nwrote {}/report.json and report.md", dir.display());
}
