//! The Prometheus text exposition (and `OpenMetrics`) read back: the one parser that
//! `monitor status` and the tests use, so that both agree with what the agent writes.

use std::collections::BTreeMap;

/// One sample: the series' name, its labels, its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    /// The text as it came.
    pub text: String,
    samples: Vec<Sample>,
    /// Each family's type, from its `# TYPE` line.
    types: BTreeMap<String, String>,
}

/// What was wrong with the text, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub what: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.what)
    }
}

impl std::error::Error for ParseError {}

fn is_name_char(c: char, first: bool) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':' || (!first && c.is_ascii_digit())
}

/// Splits a leading metric or label name off `s`.
fn name(s: &str) -> Option<(&str, &str)> {
    let end = s
        .char_indices()
        .find(|&(i, c)| !is_name_char(c, i == 0))
        .map_or(s.len(), |(i, _)| i);
    (end > 0).then(|| s.split_at(end))
}

/// Parses `{a="x",b="y"}` at the start of `s`; the rest after the closing brace.
fn labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut out = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("expected {")?;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((out, after));
        }
        let (key, after) =
            name(rest).ok_or_else(|| format!("expected a label name at {rest:?}"))?;
        let after = after
            .strip_prefix("=\"")
            .ok_or_else(|| format!("expected =\" after label {key}"))?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, other)) => return Err(format!("unknown escape \\{other}")),
                    None => return Err("a label value ends in \\".to_owned()),
                },
                '"' => {
                    end = Some(i + 1);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.ok_or_else(|| format!("label {key}'s value is not closed"))?;
        if out.insert(key.to_owned(), value).is_some() {
            return Err(format!("label {key} given twice"));
        }
        rest = after[end..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|_| format!("bad value {s:?}")),
    }
}

fn sample(line: &str) -> Result<Sample, String> {
    let (name, rest) = name(line).ok_or("expected a metric name")?;
    let (labels, rest) = if rest.starts_with('{') {
        labels(rest)?
    } else {
        (BTreeMap::new(), rest)
    };
    // The value, then an optional timestamp and an `OpenMetrics` exemplar.
    let rest = rest.split(" # ").next().unwrap_or_default();
    let mut fields = rest.split_ascii_whitespace();
    let v = value(fields.next().ok_or("no value")?)?;
    if let Some(ts) = fields.next() {
        value(ts).map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if let Some(extra) = fields.next() {
        return Err(format!("unexpected {extra:?} after the value"));
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value: v,
    })
}

impl Exposition {
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_ascii_whitespace();
                if words.next() == Some("TYPE")
                    && let (Some(family), Some(kind)) = (words.next(), words.next())
                {
                    types.insert(family.to_owned(), kind.to_owned());
                }
                continue;
            }
            samples.push(sample(line).map_err(|what| ParseError { line: n + 1, what })?);
        }
        Ok(Self {
            text: text.to_owned(),
            samples,
            types,
        })
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Each family's type (`counter`, `gauge`, `histogram`, ...), by family name.
    pub fn types(&self) -> &BTreeMap<String, String> {
        &self.types
    }

    /// Samples of `name` whose labels include all of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (&'a BTreeMap<String, String>, f64)> + 'a {
        self.samples
            .iter()
            .filter(move |s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
            })
            .map(|s| (&s.labels, s.value))
    }

    /// Sum of the samples of `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|(_, v)| v).sum()
    }

    /// The one sample of `name` with exactly these labels, if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels)
            .find(|(l, _)| l.len() == labels.len())
            .map(|(_, v)| v)
    }

    /// The first sample of `name` whose labels include `labels`.
    pub fn first(
        &self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Option<(BTreeMap<String, String>, f64)> {
        self.matching(name, labels)
            .next()
            .map(|(l, v)| (l.clone(), v))
    }

    /// Values of label `key` over the samples of `name` matching `labels`, sorted, once each.
    pub fn label_values(&self, name: &str, labels: &[(&str, &str)], key: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .matching(name, labels)
            .filter_map(|(l, _)| l.get(key).cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;

    #[test]
    fn parses_openmetrics_samples_with_escapes() {
        let s = Exposition::parse(concat!(
            "# TYPE x counter\n",
            "x_total{device=\"eth0\",reason=\"NO_SOCKET\"} 3\n",
            "x_total{device=\"other\",reason=\"a,b\\\"c\\\\d\\ne f\"} 4\n",
            "h_bucket{le=\"+Inf\"} 2 1700000000\n",
            "y_total 5 # {trace_id=\"1\"} 1\n",
            "up 1\n# EOF\n"
        ))
        .unwrap();
        assert_eq!(
            s.get("x_total", &[("device", "eth0"), ("reason", "NO_SOCKET")]),
            Some(3.0)
        );
        assert_eq!(s.get("x_total", &[("device", "eth0")]), None);
        assert_eq!(s.sum("x_total", &[]), 7.0);
        assert_eq!(
            s.get(
                "x_total",
                &[("device", "other"), ("reason", "a,b\"c\\d\ne f")]
            ),
            Some(4.0)
        );
        assert_eq!(s.get("h_bucket", &[("le", "+Inf")]), Some(2.0));
        assert_eq!(s.get("y_total", &[]), Some(5.0));
        assert_eq!(s.get("up", &[]), Some(1.0));
        assert_eq!(s.types()["x"], "counter");
        assert_eq!(
            s.label_values("x_total", &[], "device"),
            ["eth0".to_owned(), "other".to_owned()]
        );
    }

    #[test]
    fn malformed_lines_are_errors_that_say_where() {
        for (text, line) in [
            ("up 1\nx{a=\"b} 1\n", 2),
            ("x{a=\"b\" 1\n", 1),
            ("x{a=b} 1\n", 1),
            ("x 1 2 3\n", 1),
            ("x abc\n", 1),
            ("{a=\"b\"} 1\n", 1),
            ("x{a=\"\\q\"} 1\n", 1),
            ("x{a=\"1\",a=\"2\"} 1\n", 1),
            ("x\n", 1),
        ] {
            let e = Exposition::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
        }
    }
}
