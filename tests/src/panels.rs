//! The shipped Grafana dashboard as Grafana runs it: each panel's queries with the
//! template variables and `$__rate_interval` substituted the way Grafana does, as range
//! queries against a real Prometheus.

use std::path::PathBuf;

use serde_json::Value;

use crate::{Netns, paging::Paging};

/// The shipped dashboard.
pub fn dashboard() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/eni-monitor.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// A panel: its title and its queries, as written.
pub struct Panel {
    pub title: String,
    pub exprs: Vec<String>,
}

/// The dashboard's panels that query something (rows do not).
pub fn panels(dash: &Value) -> Vec<Panel> {
    dash["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let exprs: Vec<String> = p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t["expr"].as_str().map(str::to_owned))
                .collect();
            (!exprs.is_empty()).then(|| Panel {
                title: p["title"].as_str().unwrap_or_default().to_owned(),
                exprs,
            })
        })
        .collect()
}

/// Grafana's `roundInterval`: a raw interval (milliseconds) to the step it shows.
fn round_interval(ms: f64) -> f64 {
    const STEPS: [(f64, f64); 16] = [
        (15.0, 10.0),
        (35.0, 20.0),
        (75.0, 50.0),
        (150.0, 100.0),
        (350.0, 200.0),
        (750.0, 500.0),
        (1_500.0, 1_000.0),
        (3_500.0, 2_000.0),
        (7_500.0, 5_000.0),
        (12_500.0, 10_000.0),
        (17_500.0, 15_000.0),
        (25_000.0, 20_000.0),
        (45_000.0, 30_000.0),
        (90_000.0, 60_000.0),
        (210_000.0, 120_000.0),
        (450_000.0, 300_000.0),
    ];
    STEPS
        .iter()
        .find(|(below, _)| ms < *below)
        .map_or(600_000.0, |(_, step)| *step)
}

/// What Grafana puts for `$__interval` and `$__rate_interval`, in seconds, for a panel
/// `width` pixels wide over `range` seconds, with the data source's scrape interval.
pub fn intervals(range: f64, width: f64, scrape: f64) -> (f64, f64) {
    let interval = (round_interval(range * 1000.0 / width) / 1000.0).max(scrape);
    (interval, (interval + scrape).max(4.0 * scrape))
}

/// A variable's value as Grafana writes it into a Prometheus regex matcher: one value
/// escaped, several as an alternation, "All" as the variable's `allValue`.
pub fn regex_value(values: &[&str], all: bool, all_value: &str) -> String {
    let escape = |v: &str| {
        v.chars()
            .flat_map(|c| {
                let special = "\\^$*+?.()|{}[]".contains(c);
                special.then_some('\\').into_iter().chain([c])
            })
            .collect::<String>()
    };
    match values {
        _ if all => all_value.to_owned(),
        [one] => escape(one),
        many => format!(
            "({})",
            many.iter().map(|v| escape(v)).collect::<Vec<_>>().join("|")
        ),
    }
}

/// `expr` with each `(variable, value)` and the interval variables substituted.
pub fn substitute(expr: &str, vars: &[(&str, String)], (interval, rate): (f64, f64)) -> String {
    let secs = |s: f64| format!("{}ms", (s * 1000.0).round());
    // Longer names first: `$__rate_interval` before `$__interval`.
    let mut out = expr
        .replace("$__rate_interval", &secs(rate))
        .replace("$__interval", &secs(interval));
    for (name, value) in vars {
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    out
}

/// A series a range query returned: its labels and its points (Unix seconds, value).
pub type Series = (Value, Vec<(f64, f64)>);

/// A data source's range query: expression, (start, end, step) to the series drawn.
pub type RangeQuery<'a> = &'a dyn Fn(&str, (f64, f64, f64)) -> Vec<Series>;

/// What one panel showed: per query (as run), its series.
pub struct Shown {
    pub title: String,
    pub queries: Vec<(String, Vec<Series>)>,
}

impl Shown {
    /// Whether any query of the panel drew a point.
    pub fn has_data(&self) -> bool {
        self.queries
            .iter()
            .any(|(_, series)| series.iter().any(|(_, points)| !points.is_empty()))
    }
}

/// Each of `vars` (name, values; no values is "All") as Grafana writes it into a query,
/// "All" as the dashboard's `allValue` for that variable.
fn selected<'a>(dash: &Value, vars: &[(&'a str, &[&str])]) -> Vec<(&'a str, String)> {
    let templating = dash["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    vars.iter()
        .map(|(name, values)| {
            let var = templating
                .iter()
                .find(|v| v["name"] == *name)
                .unwrap_or_else(|| panic!("the dashboard has no variable {name}"));
            let all_value = var["allValue"].as_str().unwrap_or(".*");
            (*name, regex_value(values, values.is_empty(), all_value))
        })
        .collect()
}

/// Every panel of `dash` over `[start, end]` (Unix seconds), each query run by `query`
/// (a data source's range query: expression, start, end, step), as a 1000-pixel-wide
/// panel would ask with `vars` selected (name, values; no values is "All") and the data
/// source's scrape interval `scrape`.
pub fn show(
    query: RangeQuery<'_>,
    dash: &Value,
    vars: &[(&str, &[&str])],
    (start, end, scrape): (f64, f64, f64),
) -> Vec<Shown> {
    let intervals = intervals(end - start, 1000.0, scrape);
    let values = selected(dash, vars);
    panels(dash)
        .into_iter()
        .map(|panel| Shown {
            queries: panel
                .exprs
                .iter()
                .map(|e| {
                    let q = substitute(e, &values, intervals);
                    let series = query(&q, (start, end, intervals.0));
                    (q, series)
                })
                .collect(),
            title: panel.title,
        })
        .collect()
}

/// Each query variable of `dash` (`label_values(selector, label)`), its selector with
/// `vars` substituted, and the values Prometheus lists for it.
pub fn variable_values(
    paging: &Paging,
    ns: &Netns,
    dash: &Value,
    vars: &[(&str, &[&str])],
) -> Vec<(String, Vec<String>)> {
    let values = selected(dash, vars);
    dash["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let name = v["name"].as_str().unwrap_or_default().to_owned();
            let query = v["query"].as_str().unwrap_or_default();
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .unwrap_or_else(|| panic!("variable {name}: not label_values(...): {query}"));
            let (selector, label) = inner
                .rsplit_once(',')
                .unwrap_or_else(|| panic!("variable {name}: no label in {query}"));
            let selector = substitute(selector.trim(), &values, (1.0, 4.0));
            let found = paging.label_values(ns, &selector, label.trim());
            (name, found)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grafana_rounds_intervals_and_floors_them_at_the_scrape_interval() {
        // Six minutes over a 1000-pixel panel, scraped every second.
        assert_eq!(intervals(360.0, 1000.0, 1.0), (1.0, 4.0));
        // Six hours: 21.6 s a pixel rounds to 20 s; the rate window one scrape more.
        assert_eq!(intervals(21_600.0, 1000.0, 15.0), (20.0, 60.0));
        assert_eq!(round_interval(400_000.0), 300_000.0);
    }

    #[test]
    fn variables_are_written_as_grafana_writes_regex_values() {
        assert_eq!(regex_value(&["node-a"], false, ".*"), "node-a");
        assert_eq!(regex_value(&["a.b", "c"], false, ".*"), "(a\\.b|c)");
        assert_eq!(regex_value(&["a"], true, ".*"), ".*");
        assert_eq!(
            substitute(
                "rate(x{node=~\"$node\"}[$__rate_interval]) + y[$__interval]",
                &[("node", "n1".to_owned())],
                (1.0, 4.0)
            ),
            "rate(x{node=~\"n1\"}[4000ms]) + y[1000ms]"
        );
    }
}
