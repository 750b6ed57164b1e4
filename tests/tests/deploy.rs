//! What ships for deployment: alert rules (checked and unit-tested by promtool), the
//! PrometheusRule kept equal to them, the DaemonSet against Kubernetes' schemas, and
//! the dashboard's queries against the metric contract.
#![allow(
    clippy::doc_markdown,
    clippy::format_collect,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use integration_tests::golden;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Every series name the agent exports, from the golden exposition.
fn exported() -> BTreeSet<String> {
    golden::series_names(&golden::text())
}

/// The names of a rules file's alerts (`kind` "alert") or recording rules ("record").
fn named<'a>(rules: &'a str, kind: &str) -> Vec<&'a str> {
    let prefix = format!("- {kind}: ");
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .collect()
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let dir = root().join("deploy/alerts");
    let out = run(Command::new("promtool")
        .args(["check", "rules", "rules.yml"])
        .current_dir(&dir));
    assert!(out.contains("SUCCESS: 34 rules found"), "{out}");
    let out = run(Command::new("promtool")
        .args(["test", "rules", "rules.test.yml"])
        .current_dir(&dir));
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn every_alert_is_unit_tested_both_ways_and_documented() {
    let dir = root().join("deploy/alerts");
    let rules = std::fs::read_to_string(dir.join("rules.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("rules.test.yml")).unwrap();
    let runbook = std::fs::read_to_string(root().join("RUNBOOK.md")).unwrap();
    let alerts = named(&rules, "alert");
    assert_eq!(alerts.len(), 14);
    for a in alerts {
        // One firing case (exp_labels carries the alertname) and one silent case.
        let cases: Vec<&str> = tests
            .split("- eval_time:")
            .filter(|c| c.contains(&format!("alertname: {a}\n")))
            .collect();
        assert!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "{a} has no silent case"
        );
        assert!(
            cases
                .iter()
                .any(|c| c.contains(&format!("alertname: {a}\n      severity:"))
                    || c.contains("exp_labels")),
            "{a} has no firing case"
        );
        assert!(
            runbook.contains(&format!("## {a}\n")),
            "{a} has no runbook section"
        );
    }
    let exported = exported();
    for name in golden::metric_names(&rules) {
        assert!(
            exported.contains(&name),
            "rules use {name}, which the agent does not export"
        );
    }
}

/// Addresses a shipped file may hold: loopback, EC2's link-local services, and the
/// documentation's example domains. Anything else would be a link nobody can promise.
fn address_allowed(url: &str) -> bool {
    let host = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split(['/', '#'])
        .next()
        .unwrap_or_default();
    let host = host
        .rsplit_once(':')
        .filter(|(h, _)| !h.ends_with(':'))
        .map_or(host, |(h, _)| h);
    [
        "127.0.0.1",
        "localhost",
        "169.254.169.254",
        "[fd00:ec2::254]",
        "host",
        "{LISTEN}",
    ]
    .contains(&host)
        || host.ends_with(".example")
        || host == "example.com"
}

#[test]
fn shipped_files_hold_no_address_that_leads_nowhere() {
    let mut files = vec![
        root().join("README.md"),
        root().join("RUNBOOK.md"),
        root().join("Cargo.toml"),
        root().join("daemonset.yaml"),
        root().join("Containerfile"),
    ];
    let mut dirs = vec![root().join("deploy")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    let mut bad = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (i, _) in text.match_indices("://") {
            let start = text[..i]
                .rfind(|c: char| !c.is_ascii_alphanumeric())
                .map_or(0, |s| s + 1);
            let end = text[i..]
                .find(|c: char| c.is_whitespace() || "\"'`)>,".contains(c))
                .map_or(text.len(), |e| i + e);
            let url = &text[start..end];
            if url.starts_with("http") && !address_allowed(url) {
                bad.push(format!("{}: {url}", file.display()));
            }
        }
    }
    assert!(files.len() > 10, "{files:?}");
    assert!(bad.is_empty(), "addresses nobody can promise: {bad:#?}");
}

#[test]
fn the_chart_links_each_alert_to_its_runbook_section_when_told_where() {
    let Some(helm) = helm() else { return };
    let base = "https://runbooks.example/eni-monitor/RUNBOOK.md";
    let set = format!("prometheusRule.runbookBaseUrl={base}/");
    let yaml = helm_template(&helm, &[&OPERATOR_APIS[..], &["--set", &set][..]].concat());
    let rules = std::fs::read_to_string(root().join("deploy/alerts/rules.yml")).unwrap();
    let runbook = std::fs::read_to_string(root().join("RUNBOOK.md")).unwrap();
    let alerts = named(&rules, "alert");
    let links: Vec<&str> = yaml
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
        .collect();
    assert_eq!(links.len(), alerts.len(), "{yaml}");
    for a in &alerts {
        let link = format!("{base}#{}", a.to_lowercase());
        assert!(links.contains(&link.as_str()), "{a}: {links:?}");
        assert!(
            runbook.contains(&format!("\n## {a}\n")),
            "{a}: no section to link"
        );
    }
    // The templates of the annotations are untouched, the alerts all there.
    assert!(yaml.contains("{{ $labels.node }}"), "{yaml}");
    assert_eq!(yaml.matches("alert: Eni").count(), alerts.len());
    // Without a base, no link at all.
    let plain = helm_template(&helm, &OPERATOR_APIS);
    assert!(
        !plain.lines().any(|l| l.trim().starts_with("runbook_url:")),
        "{plain}"
    );
}

#[test]
fn every_recording_rule_is_unit_tested() {
    let dir = root().join("deploy/alerts");
    let rules = std::fs::read_to_string(dir.join("rules.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("rules.test.yml")).unwrap();
    let records = named(&rules, "record");
    assert_eq!(records.len(), 20);
    for r in records {
        assert!(
            tests
                .lines()
                .filter_map(|l| l.trim().strip_prefix("- expr: "))
                .any(|e| e.contains(r)),
            "{r} has no promql_expr_test"
        );
    }
}

#[test]
fn the_prometheus_rule_carries_the_same_rules() {
    let dir = root().join("deploy/alerts");
    let rules = std::fs::read_to_string(dir.join("rules.yml")).unwrap();
    let crd = std::fs::read_to_string(dir.join("prometheusrule.yaml")).unwrap();
    let spec = crd.split_once("\nspec:\n").expect("a spec").1;
    let dedented: String = spec
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l)))
        .collect();
    let body: String = rules
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        dedented, body,
        "prometheusrule.yaml is stale: run `cargo xtask render`"
    );
    assert!(crd.contains("kind: PrometheusRule"));
}

#[test]
fn the_daemonset_is_valid_kubernetes() {
    let out = run(Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "daemonset.yaml"])
        .current_dir(root()));
    for resource in [
        "namespace/eni-monitor",
        "serviceaccount/eni-monitor",
        "daemonset/eni-monitor",
        "service/eni-monitor",
    ] {
        assert!(
            out.contains(&format!("passed for resource {resource}")),
            "{resource}:\n{out}"
        );
    }
    let text = std::fs::read_to_string(root().join("daemonset.yaml")).unwrap();
    for must in [
        "hostNetwork: true",
        "priorityClassName: system-node-critical",
        "- operator: Exists",
        "readOnlyRootFilesystem: true",
        "privileged: false",
        "drop: [\"ALL\"]",
        "type: RuntimeDefault",
        "mountPath: /sys/fs/bpf/eni-monitor",
        "path: /healthz",
        "path: /readyz",
        "maxUnavailable:",
    ] {
        assert!(text.contains(must), "daemonset.yaml lacks {must}");
    }
    // It applies on a cluster without prometheus-operator: no object of its kinds, and
    // of the host's bpffs only the agent's own directory.
    assert!(
        !text.contains("kind: PodMonitor"),
        "daemonset.yaml holds a PodMonitor"
    );
    assert!(
        !text.contains("mountPath: /sys/fs/bpf }"),
        "the whole bpffs is mounted"
    );
    // Only the capabilities the agent needs.
    let added: Vec<&str> = text
        .split("add:")
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .map(str::trim)
        .take_while(|l| l.starts_with('-') || l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("- "))
        .collect();
    assert_eq!(added, ["BPF", "PERFMON", "NET_ADMIN"]);
}

/// The helm binary `cargo xtask setup` puts under target/tools, when present.
fn helm() -> Option<PathBuf> {
    let path = root().join("target/tools/helm");
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "helm is missing: `cargo xtask setup` installs it"
    );
    eprintln!("skipping: helm missing (run `cargo xtask setup`)");
    None
}

const CHART: &str = "deploy/helm/eni-monitor";
/// The prometheus-operator kinds, as a cluster with its CRDs offers them.
const OPERATOR_APIS: [&str; 4] = [
    "--api-versions",
    "monitoring.coreos.com/v1/PodMonitor",
    "--api-versions",
    "monitoring.coreos.com/v1/PrometheusRule",
];

fn helm_template(helm: &Path, extra: &[&str]) -> String {
    run(Command::new(helm)
        .current_dir(root())
        .args([
            "template",
            "eni-monitor",
            CHART,
            "--namespace",
            "eni-monitor",
        ])
        .args(extra))
}

/// The kinds in rendered YAML, in order.
fn kinds(yaml: &str) -> Vec<&str> {
    yaml.lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .collect()
}

/// `kubernetes-validate --strict` on `yaml`; returns its report.
fn validate(yaml: &str, name: &str) -> String {
    let path = std::env::temp_dir().join(format!("em-{name}-{}.yaml", std::process::id()));
    std::fs::write(&path, yaml).unwrap();
    let out = run(Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .arg(&path));
    std::fs::remove_file(&path).unwrap();
    out
}

#[test]
fn the_daemonset_is_the_chart_rendered() {
    let Some(helm) = helm() else { return };
    // `cargo xtask render`'s arguments.
    let rendered = helm_template(
        &helm,
        &[
            "--set",
            "namespace.create=true,prometheusRule.enabled=false",
            "--skip-tests",
        ],
    );
    let body = |file: &str| {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        text.split_once("\n---\n")
            .map(|(_, rest)| format!("---\n{rest}"))
            .unwrap()
    };
    assert_eq!(
        body("daemonset.yaml"),
        rendered,
        "daemonset.yaml is stale: run `cargo xtask render`"
    );
    // The PodMonitor beside it, for clusters with the operator.
    let podmonitor = helm_template(
        &helm,
        &[
            OPERATOR_APIS[0],
            OPERATOR_APIS[1],
            "--show-only",
            "templates/podmonitor.yaml",
            "--skip-tests",
        ],
    );
    assert_eq!(
        body("deploy/podmonitor.yaml"),
        podmonitor,
        "deploy/podmonitor.yaml is stale: run `cargo xtask render`"
    );
    assert_eq!(kinds(&podmonitor), ["PodMonitor"]);
}

#[test]
fn the_chart_carries_the_shipped_rules_and_dashboard() {
    for (shipped, copy) in [
        ("deploy/alerts/rules.yml", "files/rules.yml"),
        ("deploy/grafana/eni-monitor.json", "files/eni-monitor.json"),
    ] {
        assert_eq!(
            std::fs::read(root().join(shipped)).unwrap(),
            std::fs::read(root().join(CHART).join(copy)).unwrap(),
            "{copy} is stale: run `cargo xtask render`"
        );
    }
}

#[test]
fn the_chart_lints_and_renders_valid_kubernetes() {
    let Some(helm) = helm() else { return };
    let custom = "agent.devices={eth*,ens*},agent.conntrackAllowance=300,\
        agent.linklocalResolvers={10.0.0.2},agent.dnsTimeout=1s,agent.udpTimeout=60s,\
        agent.flowTableSize=65536,resources.limits.memory=256Mi,\
        image.repository=registry.example/eni-monitor,image.tag=1.2.3,\
        grafanaDashboard.enabled=true,podMonitor.enabled=false";
    let cases: [(&str, Vec<&str>, &[&str]); 4] = [
        (
            "defaults",
            vec![],
            &["ServiceAccount", "Service", "DaemonSet"],
        ),
        (
            "operator",
            OPERATOR_APIS.to_vec(),
            &[
                "ServiceAccount",
                "Service",
                "DaemonSet",
                "PodMonitor",
                "PrometheusRule",
            ],
        ),
        (
            "custom",
            [&["--set", custom][..], &OPERATOR_APIS[..]].concat(),
            &[
                "ServiceAccount",
                "ConfigMap",
                "Service",
                "DaemonSet",
                "PrometheusRule",
            ],
        ),
        (
            "namespace",
            vec![
                "--set",
                "namespace.create=true,prometheusRule.enabled=false",
            ],
            &["Namespace", "ServiceAccount", "Service", "DaemonSet"],
        ),
    ];
    for (name, args, expected) in &cases {
        let sets: Vec<&str> = args
            .iter()
            .copied()
            .skip_while(|a| *a != "--set")
            .take(2)
            .collect();
        let lint = run(Command::new(&helm)
            .current_dir(root())
            .args(["lint", "--strict", CHART])
            .args(&sets));
        assert!(lint.contains("0 chart(s) failed"), "{name}: {lint}");
        let yaml = helm_template(&helm, args);
        assert_eq!(&kinds(&yaml), expected, "{name}:\n{yaml}");
        let report = validate(&yaml, name);
        let core = expected
            .iter()
            .filter(|k| !matches!(**k, "PodMonitor" | "PrometheusRule"));
        for kind in core {
            assert!(
                report.contains(&format!("passed for resource {}/", kind.to_lowercase())),
                "{name}: {kind} did not validate:\n{report}"
            );
        }
        assert!(!report.contains("ERROR"), "{name}:\n{report}");
    }

    // Every agent value reaches the command line as the agent spells its flags.
    let custom_yaml = helm_template(&helm, &["--set", custom]);
    let args = "          args:
            - --listen=0.0.0.0:9435
            - --device=eth*
            - --device=ens*
            - --conntrack-allowance=300
            - --linklocal-resolver=10.0.0.2
            - --dns-timeout=1s
            - --udp-timeout=60s
            - --flow-table-size=65536
          env:";
    assert!(custom_yaml.contains(args), "{custom_yaml}");
    for must in [
        "image: \"registry.example/eni-monitor:1.2.3\"",
        "memory: 256Mi",
        "grafana_dashboard: \"1\"",
        "eni-monitor.json: |-",
    ] {
        assert!(custom_yaml.contains(must), "{must}:\n{custom_yaml}");
    }
    // The rules in the PrometheusRule are the shipped ones, their templates untouched.
    let operator = helm_template(&helm, &OPERATOR_APIS);
    assert!(operator.contains("{{ $labels.node }}"), "{operator}");
    assert_eq!(
        operator.matches("- alert: ").count(),
        std::fs::read_to_string(root().join("deploy/alerts/rules.yml"))
            .unwrap()
            .matches("- alert: ")
            .count()
    );
}

#[test]
fn the_dashboard_queries_only_exported_metrics() {
    let text = std::fs::read_to_string(root().join("deploy/grafana/eni-monitor.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let exprs = integration_tests::dashboard_queries(&dash);
    assert!(exprs.len() >= 18, "{}", exprs.len());
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| golden::metric_names(e)).collect();
    let exported = exported();
    // The one metric not ours: kube-state-metrics' pod info, joined on the pod's address.
    assert!(exprs.iter().any(|e| e.contains("kube_pod_info")));
    for name in &used {
        assert!(
            exported.contains(name),
            "the dashboard uses {name}, which the agent does not export"
        );
    }
    for must in [
        "eni_monitor_conntrack_allowance_utilization_ratio",
        "eni_monitor_linklocal_peak_packets_per_second",
        "eni_monitor_dns_unanswered_total",
        "eni_monitor_nf_conntrack_entries",
    ] {
        assert!(used.contains(must), "no panel shows {must}");
    }
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(
        vars.contains(&"node") && vars.contains(&"device"),
        "{vars:?}"
    );
}

#[test]
fn a_web_config_reaches_the_agent_the_probes_and_the_pod_monitor() {
    let Some(helm) = helm() else { return };
    // A web configuration: the agent reads it from the Secret, the probes use HTTPS, the
    // PodMonitor scrapes over https with what it is given.
    let web = helm_template(
        &helm,
        &[
            "--set",
            "webConfig.secretName=eni-monitor-web,podMonitor.basicAuth.username.name=scrape,podMonitor.basicAuth.username.key=user,podMonitor.tlsConfig.serverName=eni-monitor",
            OPERATOR_APIS[0],
            OPERATOR_APIS[1],
        ],
    );
    for must in [
        "- --web-config-file=/etc/eni-monitor/web/web-config.yml",
        "httpGet: { path: /healthz, port: metrics, scheme: HTTPS }",
        "httpGet: { path: /readyz, port: metrics, scheme: HTTPS }",
        "- { name: web, mountPath: /etc/eni-monitor/web, readOnly: true }",
        "secret: { secretName: eni-monitor-web }",
        "scheme: https",
        "serverName: eni-monitor",
        "key: user",
    ] {
        assert!(web.contains(must), "{must}:\n{web}");
    }
    let report = validate(&web, "web");
    assert!(
        report.contains("passed for resource daemonset/"),
        "{report}"
    );
    assert!(!report.contains("ERROR"), "{report}");
}

/// The expression of the rule named `name` in the rules file: from its `expr:` to the
/// next key of the rule.
fn expr_of(rules: &str, name: &str) -> String {
    let at = ["alert", "record"]
        .iter()
        .find_map(|kind| rules.find(&format!("- {kind}: {name}\n")))
        .unwrap_or_else(|| panic!("no rule {name}"));
    let rule = &rules[at..];
    let expr = &rule[rule.find("expr:").unwrap()..];
    expr.lines()
        .enumerate()
        .take_while(|(i, l)| {
            *i == 0
                || !(l.trim_start().starts_with("for:") || l.trim_start().starts_with("labels:"))
        })
        .map(|(_, l)| l.trim())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `monitor status` flags what the rules page on, at the same numbers: each threshold
/// the screen reads (`model::thresholds`) is found in its rule's expression.
#[test]
fn the_status_screen_and_the_rules_share_their_thresholds() {
    use monitor::model::thresholds::{
        CONNTRACK_CRITICAL, CONNTRACK_HIGH, DNS_UNANSWERED, EXHAUSTION_HORIZON_MINUTES,
        LINKLOCAL_LIMIT, LINKLOCAL_PEAK_HIGH,
    };
    let rules = std::fs::read_to_string(root().join("deploy/alerts/rules.yml")).unwrap();
    for (alert, needle) in [
        (
            "EniMonitorConntrackAllowanceHigh",
            format!(":max > {CONNTRACK_HIGH}"),
        ),
        (
            "EniMonitorConntrackAllowanceCritical",
            format!(":max > {CONNTRACK_CRITICAL}"),
        ),
        (
            "EniMonitorConntrackAllowanceExhaustionPredicted",
            format!("[15m], {}) >= 1", EXHAUSTION_HORIZON_MINUTES * 60.0),
        ),
        // The per-ENI alerts page on their condition's record.
        (
            "node_device:eni_monitor_linklocal_peak_packets_per_second:max_high",
            format!("(eni_monitor_linklocal_peak_packets_per_second) > {LINKLOCAL_PEAK_HIGH}"),
        ),
        (
            "node_device_resolver:eni_monitor_dns_unanswered:ratio_rate5m_high",
            format!("rate5m_unanswered_devices > 0.1) > {DNS_UNANSWERED}"),
        ),
    ] {
        let expr = expr_of(&rules, alert);
        assert!(expr.contains(&needle), "{alert}: {needle:?} not in {expr}");
    }
    let summary = &rules[rules
        .find("- alert: EniMonitorLinkLocalPeakHigh\n")
        .unwrap()..];
    let summary = summary.lines().find(|l| l.contains("summary:")).unwrap();
    assert!(
        summary.contains(&format!("(limit {LINKLOCAL_LIMIT})")),
        "{summary}"
    );
}
