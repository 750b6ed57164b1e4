//! The shipped rules on a second engine: a simulated fleet (the busy node's real
//! exposition as eight nodes, trouble on the first) scraped every second by Debian's
//! Prometheus, and by two `vmagent`s that share the targets between them, writing to
//! `VictoriaMetrics`, where `vmalert` evaluates the same rules file and sends to
//! Alertmanager. The same alerts must fire on both, and every panel of the dashboard
//! must draw the same series with either as its data source.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use integration_tests::paging::Engine as _;
use integration_tests::{
    Netns,
    fleet::{agent_exposition, serve, static_targets, template},
    have,
    paging::{ALERTMANAGER, Alertmanager, Prometheus, wait_for},
    panels, require_root,
    victoria::Victoria,
};
use serde_json::Value;

/// The simulated fleet's size: node 0 is the troubled one, and each scraper gets some.
const NODES: usize = 8;

/// An alert as both engines name it: its labels, without vmalert's `alertgroup` (the
/// group's name, which Prometheus does not add).
type Alert = BTreeMap<String, String>;

fn labels(v: &Value) -> Alert {
    v.as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != "alertgroup")
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect()
}

/// Prometheus's firing alerts.
fn prometheus_firing(prom: &Prometheus, ns: &Netns) -> BTreeSet<Alert> {
    prom.api(ns, "/api/v1/alerts")
        .and_then(|v| v["data"]["alerts"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|a| a["state"] == "firing")
        .map(|a| labels(&a["labels"]))
        .collect()
}

/// What Alertmanager received from vmalert and holds, paged or inhibited.
fn alertmanager_holds(am: &Alertmanager, ns: &Netns) -> BTreeSet<Alert> {
    am.alerts(ns).iter().map(|a| labels(&a["labels"])).collect()
}

/// Each alert's name and node, to read in a failure.
fn names(alerts: &BTreeSet<Alert>) -> Vec<String> {
    alerts
        .iter()
        .map(|a| {
            format!(
                "{} {} {}",
                a["alertname"],
                a.get("node").map_or("", String::as_str),
                a.get("device").map_or("", String::as_str)
            )
        })
        .collect()
}

#[test]
fn vmalert_behind_sharded_vmagents_fires_what_prometheus_fires() {
    if !require_root("vmalert_behind_sharded_vmagents_fires_what_prometheus_fires") {
        return;
    }
    for tool in [
        "prometheus",
        "prometheus-alertmanager",
        "victoria-metrics",
        "vmagent",
        "vmalert",
    ] {
        assert!(
            have(tool),
            "{tool} is not installed (cargo xtask setup installs it)"
        );
    }
    let (comments, lines) = template(&agent_exposition());
    let started = unix_now();
    let ns = Netns::new("engines");
    let _fleet = serve(&ns, comments, lines);
    let job = format!(
        "  - job_name: eni-monitor\n    static_configs:\n{}",
        static_targets(NODES)
    );
    let rules = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/alerts/rules.yml")
        .canonicalize()
        .unwrap();
    let prom = Prometheus::with_config(
        &ns,
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n{job}",
            rules.display()
        ),
    );
    let am = Alertmanager::start(&ns);
    let vm = Victoria::start(&ns, &job, 1, ALERTMANAGER);

    // The targets shared: each scraper has some, together all, none twice.
    wait_for("both scrapers' targets up", Duration::from_mins(1), || {
        vm.targets_up(&ns, 0) + vm.targets_up(&ns, 1) == NODES
    });
    let shares = [vm.targets_up(&ns, 0), vm.targets_up(&ns, 1)];
    assert!(
        shares.iter().all(|&s| s > 0),
        "one scraper has every target: {shares:?}"
    );
    wait_for(
        "every node's series in VictoriaMetrics",
        Duration::from_mins(1),
        || {
            vm.query(&ns, "count(count by (node) (eni_monitor_build_info))")
                .is_some_and(|v| v["data"]["result"][0]["value"][1] == "8")
        },
    );
    // The troubled node's pages, on both: what its counters page on without a `for`.
    let troubled = |alerts: &BTreeSet<Alert>, name: &str| {
        alerts.iter().any(|a| {
            a["alertname"] == name && a.get("node").map(String::as_str) == Some("node-00000")
        })
    };
    let wanted = [
        "EniMonitorTableFull",
        "EniMonitorNodeConntrackInsertFailures",
    ];
    wait_for(
        "the troubled node's alerts on both engines",
        Duration::from_mins(2),
        || {
            let (p, v) = (prometheus_firing(&prom, &ns), alertmanager_holds(&am, &ns));
            wanted.iter().all(|w| troubled(&p, w) && troubled(&v, w))
        },
    );
    // Then the same alerts, label for label (an alert with a `for` may turn firing a
    // cycle apart on the two).
    let mut last = (BTreeSet::new(), BTreeSet::new());
    let same = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(
            "the same alerts on both engines",
            Duration::from_mins(1),
            || {
                last = (prometheus_firing(&prom, &ns), alertmanager_holds(&am, &ns));
                last.0 == last.1
            },
        )
    }));
    assert!(
        same.is_ok(),
        "Prometheus fires\n{:#?}\nvmalert sent\n{:#?}",
        names(&last.0),
        names(&last.1)
    );
    exactly_the_fleets_alerts(&last.0);
    every_panel_draws_the_same_on_both(&prom, &vm, &ns, started);
}

/// Each series' labels, to compare what two data sources drew.
fn drawn(series: &[panels::Series]) -> BTreeSet<String> {
    series
        .iter()
        .map(|(labels, _)| labels.to_string())
        .collect()
}

/// Every panel of the shipped dashboard, as Grafana runs it with the troubled node and
/// its ENI selected, against Prometheus and against `VictoriaMetrics` as data sources:
/// each query draws the same series on both, and most panels draw something.
fn every_panel_draws_the_same_on_both(prom: &Prometheus, vm: &Victoria, ns: &Netns, started: f64) {
    let dash = panels::dashboard();
    let selected: [(&str, &[&str]); 2] = [("node", &["node-00000"]), ("device", &["eth0"])];
    let range = (started, unix_now(), 1.0);
    let on_prom = panels::show(&|q, r| prom.query_range(ns, q, r), &dash, &selected, range);
    let on_vm = panels::show(&|q, r| vm.query_range(ns, q, r), &dash, &selected, range);
    assert_eq!(
        on_prom.len(),
        panels::panels(&dash).len(),
        "every panel ran"
    );
    let mut differ = Vec::new();
    for (p, v) in on_prom.iter().zip(&on_vm) {
        for ((q, ps), (_, vs)) in p.queries.iter().zip(&v.queries) {
            if drawn(ps) != drawn(vs) {
                differ.push(format!(
                    "{}: {q}\n  Prometheus {:?}\n  VictoriaMetrics {:?}",
                    p.title,
                    drawn(ps),
                    drawn(vs)
                ));
            }
        }
    }
    assert!(
        differ.is_empty(),
        "panels drawn differently:\n{}",
        differ.join("\n")
    );
    let with_data = on_prom.iter().filter(|p| p.has_data()).count();
    eprintln!("{with_data} of {} panels draw data on both", on_prom.len());
    assert!(
        with_data * 2 > on_prom.len(),
        "{with_data} of {} panels drew data",
        on_prom.len()
    );
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Exactly what the fleet's series call for: the troubled node's DNS drops on its ENI
/// (named with the ENI's id), its three conntrack events and six full tables; nothing
/// on the other nodes, whose trouble counters stay 0.
fn exactly_the_fleets_alerts(alerts: &BTreeSet<Alert>) {
    let mut by_name: BTreeMap<&str, (usize, BTreeSet<&str>)> = BTreeMap::new();
    for a in alerts {
        let e = by_name.entry(a["alertname"].as_str()).or_default();
        e.0 += 1;
        e.1.insert(a.get("node").map_or("", String::as_str));
    }
    let troubled_only = BTreeSet::from(["node-00000"]);
    assert_eq!(by_name.len(), 3, "{:#?}", names(alerts));
    assert_eq!(
        by_name["EniMonitorDnsPacketsDropped"],
        (1, troubled_only.clone())
    );
    assert!(
        alerts
            .iter()
            .filter(|a| a["alertname"] == "EniMonitorDnsPacketsDropped")
            .all(|a| a.get("eni").is_some_and(|e| e.starts_with("eni-")))
    );
    assert_eq!(
        by_name["EniMonitorNodeConntrackInsertFailures"],
        (3, troubled_only.clone())
    );
    assert_eq!(by_name["EniMonitorTableFull"], (6, troubled_only));
}
