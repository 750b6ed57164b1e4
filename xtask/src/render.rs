//! `cargo xtask render`: the files generated from others (the `PrometheusRule`, the
//! chart's copies of the rules and the dashboard, `daemonset.yaml` from the chart).

use std::{fmt::Write as _, process::Command};

use anyhow::{Context as _, Result};

use crate::{CHART, output, setup::helm, workspace_root};

const PROMETHEUS_RULE_HEADER: &str =
    "# Written by `cargo xtask render` from rules.yml: edit that file, not this one.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: eni-monitor
  namespace: eni-monitor
  labels:
    app.kubernetes.io/name: eni-monitor
spec:
";

/// The header of `daemonset.yaml`, which `cargo xtask render` writes from the chart.
const MANIFEST_HEADER: &str =
    "# eni-monitor: one agent per node, in the node's network namespace, serving /metrics on
# :9435. Apply with `kubectl apply -f daemonset.yaml` (and, with prometheus-operator,
# deploy/podmonitor.yaml), or install the Helm chart in deploy/helm/eni-monitor. Written
# by `cargo xtask render` from the chart's default values: edit the chart, not this file.
";

/// The arguments that render `daemonset.yaml` from the chart: no prometheus-operator
/// object, so that it applies on any cluster.
pub const MANIFEST_ARGS: [&str; 8] = [
    "template",
    "eni-monitor",
    CHART,
    "--namespace",
    "eni-monitor",
    "--set",
    "namespace.create=true,prometheusRule.enabled=false",
    "--skip-tests",
];

/// The header of `deploy/podmonitor.yaml`.
const PODMONITOR_HEADER: &str =
    "# The PodMonitor for clusters with prometheus-operator, beside daemonset.yaml. Written by
# `cargo xtask render` from the chart's default values: edit the chart, not this file.
";

/// The arguments that render `deploy/podmonitor.yaml`: the chart's `PodMonitor` alone.
pub const PODMONITOR_ARGS: [&str; 10] = [
    "template",
    "eni-monitor",
    CHART,
    "--namespace",
    "eni-monitor",
    "--api-versions",
    "monitoring.coreos.com/v1/PodMonitor",
    "--show-only",
    "templates/podmonitor.yaml",
    "--skip-tests",
];

/// The `PrometheusRule` carrying `rules` (a rules file's text).
fn prometheus_rule(rules: &str) -> String {
    let body: String = rules
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| {
            if l.is_empty() {
                "\n".to_owned()
            } else {
                format!("  {l}\n")
            }
        })
        .collect();
    format!("{PROMETHEUS_RULE_HEADER}{body}")
}

/// `rules` with a `runbook_url` annotation on each alert, `<base>#<name in lower case>`
/// (the anchor of the alert's section in RUNBOOK.md), first among its annotations.
pub fn add_runbook_urls(rules: &str, base: &str) -> String {
    let base = base.trim_end_matches('/');
    let mut out = String::with_capacity(rules.len() * 2);
    let mut alert: Option<String> = None;
    for line in rules.lines() {
        out.push_str(line);
        out.push('\n');
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- alert: ") {
            alert = Some(name.trim().to_lowercase());
        } else if trimmed == "annotations:"
            && let Some(name) = alert.take()
        {
            let indent = line.len() - trimmed.len() + 2;
            let _ = writeln!(out, "{:indent$}runbook_url: \"{base}#{name}\"", "");
        }
    }
    out
}

/// Writes target/render/rules.yml and target/render/prometheusrule.yaml with each alert
/// linking its runbook section under `base`.
pub fn with_runbooks(base: &str) -> Result<()> {
    let root = workspace_root()?;
    let rules = std::fs::read_to_string(root.join("deploy/alerts/rules.yml"))
        .context("reading rules.yml")?;
    let linked = add_runbook_urls(&rules, base);
    let out = root.join("target/render");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("rules.yml"), &linked).context("writing target/render/rules.yml")?;
    std::fs::write(out.join("prometheusrule.yaml"), prometheus_rule(&linked))
        .context("writing target/render/prometheusrule.yaml")?;
    println!(
        "wrote {0}/rules.yml and {0}/prometheusrule.yaml, runbooks under {base}",
        out.display()
    );
    Ok(())
}

pub fn render() -> Result<()> {
    let root = workspace_root()?;
    let dir = root.join("deploy/alerts");
    let rules = std::fs::read_to_string(dir.join("rules.yml")).context("reading rules.yml")?;
    std::fs::write(dir.join("prometheusrule.yaml"), prometheus_rule(&rules))
        .context("writing prometheusrule.yaml")?;
    let files = root.join(CHART).join("files");
    std::fs::copy(dir.join("rules.yml"), files.join("rules.yml"))
        .context("copying rules.yml into the chart")?;
    std::fs::copy(
        root.join("deploy/grafana/eni-monitor.json"),
        files.join("eni-monitor.json"),
    )
    .context("copying the dashboard into the chart")?;
    let rendered = output(Command::new(helm()?).current_dir(&root).args(MANIFEST_ARGS))?;
    std::fs::write(
        root.join("daemonset.yaml"),
        format!("{MANIFEST_HEADER}{rendered}"),
    )
    .context("writing daemonset.yaml")?;
    let rendered = output(
        Command::new(helm()?)
            .current_dir(&root)
            .args(PODMONITOR_ARGS),
    )?;
    std::fs::write(
        root.join("deploy/podmonitor.yaml"),
        format!("{PODMONITOR_HEADER}{rendered}"),
    )
    .context("writing deploy/podmonitor.yaml")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shipped alert gets its link, to its own section, and nothing else changes.
    #[test]
    fn each_alert_links_its_runbook_section() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/alerts/rules.yml");
        let rules = std::fs::read_to_string(path).unwrap();
        let linked = add_runbook_urls(&rules, "https://runbooks.example/eni-monitor/RUNBOOK.md/");
        let alerts: Vec<&str> = rules
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- alert: "))
            .collect();
        assert!(!alerts.is_empty());
        let links: Vec<&str> = linked
            .lines()
            .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
            .collect();
        assert_eq!(links.len(), alerts.len());
        for (alert, link) in alerts.iter().zip(&links) {
            assert_eq!(
                *link,
                format!(
                    "\"https://runbooks.example/eni-monitor/RUNBOOK.md#{}\"",
                    alert.to_lowercase()
                )
            );
        }
        let without: String = linked
            .lines()
            .filter(|l| !l.trim().starts_with("runbook_url: "))
            .flat_map(|l| [l, "\n"])
            .collect();
        assert_eq!(without, rules);
    }
}
