//! The golden exposition: the whole `/metrics` of the simulated node after known
//! traffic (`tests/golden/metrics.txt`), with the values that depend on time or on the
//! machine normalised. It pins every metric's name, help, type and labels: a renamed
//! metric or label fails one obvious test, and what the rules, the dashboard and
//! `monitor status` read is checked against it.

use std::{collections::BTreeSet, path::PathBuf};

/// Stands for a value that depends on time or on the machine.
pub const VARIES: &str = "<varies>";

/// The golden file.
pub fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden/metrics.txt")
}

/// The golden file's text.
pub fn text() -> String {
    std::fs::read_to_string(path()).unwrap_or_else(|e| panic!("reading {}: {e}", path().display()))
}

/// Every series name a query may use of an exposition: each sample's name, and for each
/// family its names by type (a counter `x` is `x_total`, a histogram `x` is `x_bucket`,
/// `x_sum` and `x_count`), so that a family with no sample on the simulated node (the
/// ENA driver's, say) still counts as exported.
pub fn series_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (Some(family), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{family}{s}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// The `eni_monitor_*` names that appear in `text` (a rule, a query, a source file).
pub fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("eni_monitor_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // `level:eni_monitor_...:operation` is a recording rule's series, not the agent's.
        if !rest[..i].ends_with(':') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_series_are_not_the_agents() {
        let names =
            metric_names("max by (node) (node:eni_monitor_x:max) / eni_monitor_y_total{a=\"b\"}");
        assert_eq!(names, BTreeSet::from(["eni_monitor_y_total".to_owned()]));
    }

    #[test]
    fn families_name_their_series_by_type() {
        let names = series_names(
            "# TYPE a counter\n# TYPE h histogram\n# TYPE g gauge\ng{x=\"1\"} 2\nb_total 3\n",
        );
        let want: BTreeSet<String> = ["a_total", "b_total", "g", "h_bucket", "h_count", "h_sum"]
            .map(str::to_owned)
            .into();
        assert_eq!(names, want);
        assert_eq!(
            metric_names("rate(eni_monitor_x_total[5m]) / eni_monitor_y"),
            ["eni_monitor_x_total".to_owned(), "eni_monitor_y".to_owned()].into()
        );
    }
}
