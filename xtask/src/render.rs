//! `cargo xtask render`: the files generated from others (the `PrometheusRule`, the
//! chart's copies of the rules and the dashboard, `daemonset.yaml` from the chart).

use std::process::Command;

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

pub fn render() -> Result<()> {
    let root = workspace_root()?;
    let dir = root.join("deploy/alerts");
    let rules = std::fs::read_to_string(dir.join("rules.yml")).context("reading rules.yml")?;
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
    std::fs::write(
        dir.join("prometheusrule.yaml"),
        format!("{PROMETHEUS_RULE_HEADER}{body}"),
    )
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
