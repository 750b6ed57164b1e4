//! Paging end to end: Debian's Prometheus scrapes the agent every second with the
//! shipped rules, Debian's Alertmanager receives the alerts. DNS loss in the simulated
//! node must show in Alertmanager's API, then resolve when the loss stops.
#![allow(
    clippy::too_many_lines,
    clippy::doc_markdown,
    clippy::format_collect,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    Agent, Netns, SimNode,
    dns::{self, OK_NAME, Resolver},
    http_get, require_root,
};
use serde_json::Value;

const PROMETHEUS: &str = "127.0.0.1:9090";
const ALERTMANAGER: &str = "127.0.0.1:9093";

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(ns: &Netns, program: &str, args: &[String]) -> Daemon {
    Daemon(
        ns.command(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program}: {e}")),
    )
}

fn get_json(ns: &Netns, addr: &str, path: &str) -> Option<Value> {
    let (code, body) = http_get(ns, addr.parse().unwrap(), path)?;
    (code == 200)
        .then(|| serde_json::from_str(&body).ok())
        .flatten()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !f() {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    started.elapsed()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Alerts Alertmanager holds for `alertname` on `device` that have not ended.
fn active(ns: &Netns, alertname: &str, device: &str) -> usize {
    let Some(alerts) = get_json(ns, ALERTMANAGER, "/api/v2/alerts") else {
        return 0;
    };
    let now = std::time::SystemTime::now();
    alerts
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["labels"]["alertname"] == alertname && a["labels"]["device"] == device)
        .filter(|a| a["status"]["state"] == "active")
        .filter(|a| {
            // Prometheus sends endsAt in the past once the alert resolved.
            let ends = a["endsAt"].as_str().unwrap_or("");
            ends.is_empty() || ends > humantime::format_rfc3339(now).to_string().as_str()
        })
        .count()
}

#[test]
fn dns_loss_pages_through_alertmanager_and_resolves() {
    if !require_root("dns_loss_pages_through_alertmanager_and_resolves") {
        return;
    }
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let _resolver = Resolver::start(&sim.vpc, &[eth0.vpc_v4.parse().unwrap()]);
    let agent = Agent::start(&sim.node, &["--device", "eth0", "--dns-timeout", "1s"]);

    let dir = std::env::temp_dir().join(format!("{}-alerting", sim.node.name));
    std::fs::create_dir_all(&dir).unwrap();
    let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/alerts/rules.yml")
        .canonicalize()
        .unwrap();
    std::fs::write(
        dir.join("alertmanager.yml"),
        "route:\n  receiver: 'null'\n  group_wait: 1s\n  group_interval: 1s\nreceivers:\n  - name: 'null'\n",
    )
    .unwrap();
    // The evaluation interval is the test's; the rules are the shipped ones, unchanged.
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nalerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{ALERTMANAGER}']\nscrape_configs:\n  - job_name: eni-monitor\n    static_configs:\n      - targets: ['{}']\n        labels:\n          node: simulated-node\n",
            rules.display(),
            agent.listen
        ),
    )
    .unwrap();
    let d = |p: &str| dir.join(p).display().to_string();
    let _alertmanager = start(
        &sim.node,
        "prometheus-alertmanager",
        &[
            format!("--config.file={}", d("alertmanager.yml")),
            format!("--storage.path={}", d("am")),
            format!("--web.listen-address={ALERTMANAGER}"),
            "--cluster.listen-address=".into(),
        ],
    );
    let _prometheus = start(
        &sim.node,
        "prometheus",
        &[
            format!("--config.file={}", d("prometheus.yml")),
            format!("--storage.tsdb.path={}", d("tsdb")),
            format!("--web.listen-address={PROMETHEUS}"),
        ],
    );
    wait_for(
        "Prometheus to scrape the agent",
        Duration::from_mins(1),
        || {
            get_json(
                &sim.node,
                PROMETHEUS,
                "/api/v1/query?query=up%7Bjob%3D%22eni-monitor%22%7D",
            )
            .is_some_and(|v| v["data"]["result"][0]["value"][1] == "1")
        },
    );
    wait_for("Alertmanager", Duration::from_secs(30), || {
        get_json(&sim.node, ALERTMANAGER, "/api/v2/status").is_some()
    });

    // Every dashboard query runs against the real Prometheus.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/eni-monitor.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for expr in integration_tests::dashboard_queries(&dash) {
        let q = expr
            .replace("$node", ".*")
            .replace("$device", ".*")
            .replace("$__rate_interval", "1m");
        let v = get_json(
            &sim.node,
            PROMETHEUS,
            &format!("/api/v1/query?query={}", percent_encode(&q)),
        );
        assert_eq!(
            v.as_ref().map(|v| v["status"].clone()),
            Some(Value::from("success")),
            "{q}"
        );
    }

    // DNS loss: the node's firewall drops every answer.
    sim.node.nft("table inet loss {\n chain input {\n  type filter hook input priority 0;\n  udp sport 53 drop\n }\n}\n");
    let server = SocketAddr::new(eth0.vpc_v4.parse().unwrap(), 53);
    let loss_began = Instant::now();
    assert_eq!(
        dns::queries(&sim.node, server, OK_NAME, 5, Duration::from_millis(200)),
        0
    );
    wait_for(
        "the DNS alert in Alertmanager",
        Duration::from_secs(90),
        || active(&sim.node, "EniMonitorDnsPacketsDropped", "eth0") == 1,
    );
    eprintln!(
        "EniMonitorDnsPacketsDropped reached Alertmanager {:?} after the loss began",
        loss_began.elapsed()
    );

    // The loss stops; the alert resolves once the window holds no drops.
    sim.node.nft("delete table inet loss\n");
    assert_eq!(
        dns::queries(&sim.node, server, OK_NAME, 3, Duration::from_secs(2)),
        3
    );
    let resolved = wait_for("the DNS alert to resolve", Duration::from_mins(4), || {
        active(&sim.node, "EniMonitorDnsPacketsDropped", "eth0") == 0
    });
    eprintln!("EniMonitorDnsPacketsDropped resolved {resolved:?} after the loss stopped");
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}
