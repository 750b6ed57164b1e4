//! The incident, replayed end to end (see `integration_tests::incident`): the page comes
//! before the hypervisor's first drop, DNS failing after it pages and names the ENI, and
//! the link-local limit pages before it drops.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::float_cmp)]

use integration_tests::paging::Engine as _;
use integration_tests::{
    incident::{ALLOWANCE, AMAZON_RESOLVER, ENI_ID, Incident, NODE, Outcome, runnable},
    panels, require_root, timeline,
};

/// Panels that cannot draw anything in the replay, and why: their source does not exist
/// on a veth. Each must stay empty, so the list cannot go stale.
const EMPTY_IN_REPLAY: [(&str, &str); 2] = [
    (
        "Allowance available (ENA driver)",
        "the ENA driver's counters: the replay's ENI is a veth",
    ),
    (
        "ENA allowance exceeded (packets per interval)",
        "the ENA driver's counters: the replay's ENI is a veth",
    ),
];

/// The critical alert's threshold, from the shipped rules.
fn critical_threshold() -> f64 {
    let rules = std::fs::read_to_string(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/alerts/rules.yml"),
    )
    .unwrap();
    let block = rules
        .split("- alert: ")
        .find(|b| b.starts_with("EniMonitorConntrackAllowanceCritical"))
        .unwrap();
    let expr = block
        .lines()
        .find(|l| l.trim().starts_with("expr:"))
        .unwrap();
    expr.rsplit('>').next().unwrap().trim().parse().unwrap()
}

/// Every panel of the shipped dashboard, run as Grafana runs it with the incident's node
/// and ENI selected, over the replay: each draws something (but those that cannot here),
/// and the allowance panel crosses the critical threshold.
fn the_dashboard_shows_the_incident(incident: &Incident, out: &Outcome) {
    let dash = panels::dashboard();
    let selected: [(&str, &[&str]); 2] = [("node", &[NODE]), ("device", &["eth0"])];
    for (name, values) in
        panels::variable_values(&incident.paging, &incident.node, &dash, &selected)
    {
        let want = if name == "node" { NODE } else { "eth0" };
        assert!(
            values.iter().any(|v| v == want),
            "variable {name} lists {values:?}"
        );
    }
    let shown = panels::show(
        &|q, range| incident.paging.query_range(&incident.node, q, range),
        &dash,
        &selected,
        (out.started_unix, out.ended_unix, 1.0),
    );
    let mut missing = Vec::new();
    for panel in &shown {
        let expected_empty = EMPTY_IN_REPLAY.iter().any(|(t, _)| *t == panel.title);
        eprintln!(
            "panel {:?}: {}",
            panel.title,
            if panel.has_data() { "data" } else { "no data" }
        );
        if panel.has_data() == expected_empty {
            missing.push(panel.title.clone());
        }
    }
    assert!(missing.is_empty(), "panels not as expected: {missing:?}");
    assert_eq!(shown.len(), panels::panels(&dash).len(), "every panel ran");

    let allowance = shown
        .iter()
        .find(|p| p.title.starts_with("Allowance utilization"))
        .unwrap();
    let threshold = critical_threshold();
    let points = &allowance.queries[0].1[0].1;
    let first_over = points.iter().position(|(_, v)| *v > threshold);
    assert!(
        first_over.is_some_and(|i| i > 0 && points[..i].iter().all(|(_, v)| *v <= threshold)),
        "the allowance panel does not cross {threshold}: {points:?}"
    );
}

#[test]
fn the_page_comes_before_the_allowance_fills_and_says_why() {
    if !require_root("the_page_comes_before_the_allowance_fills_and_says_why") {
        return;
    }
    assert!(
        runnable() || std::env::var_os("CI").is_none(),
        "Prometheus, Alertmanager, unbound or nft missing: `cargo xtask setup` installs them"
    );
    if !runnable() {
        eprintln!("skipping: Prometheus, Alertmanager, unbound or nft missing");
        return;
    }
    let incident = Incident::build();
    let out = incident.replay(&mut |t, what| eprintln!("[{t:6.1} s] {what}"));
    the_dashboard_shows_the_incident(&incident, &out);
    let (picture, path) = timeline::write(&incident, &out).unwrap();
    eprintln!("the timeline: {}", path.canonicalize().unwrap().display());
    // The picture has every line and every event the replay produced.
    assert!(
        picture.curves.iter().all(|c| c.points.len() >= 10),
        "a line of the picture is (almost) empty"
    );
    for event in [
        "ConntrackAllowanceCritical, paged",
        "first drop",
        "DnsUnanswered, not paged",
        "DnsTcpConnectFailures, not paged",
        "LinkLocalPeakHigh",
    ] {
        assert!(
            picture.events.iter().any(|(_, what)| what.contains(event)),
            "{event} missing from {:?}",
            picture.events
        );
    }

    // The page came first, and with time to act.
    let lead = out.lead().expect("both the page and the drop happened");
    eprintln!("lead time: {lead:.1} s");
    assert!(
        lead >= 20.0,
        "the page came only {lead:.1} s before the drop: {out:?}"
    );
    assert!(out.utilization_at_alert >= 0.9, "{out:?}");
    assert_eq!(out.critical_alert_labels["node"], NODE);
    // The agent's estimate is the hypervisor's count: at most the allowance while
    // nothing was dropped, give or take the attempt in flight (the node sees a SYN leave
    // before the hypervisor refuses it), and at the allowance when the drops began.
    let slack = (f64::from(ALLOWANCE) + 3.0) / f64::from(ALLOWANCE);
    assert!(out.max_utilization_before_drop <= slack, "{out:?}");
    let at_drop = out.tracked_when_dropping;
    assert!(
        (f64::from(ALLOWANCE)..=f64::from(ALLOWANCE) + 3.0).contains(&at_drop),
        "{out:?}"
    );

    // After the drops, DNS fails and pages, naming the ENI.
    assert!(out.dns_unanswered_alert_at.unwrap() > out.first_drop_at.unwrap());
    assert_eq!(out.dns_alert_labels["device"], "eth0");
    assert_eq!(out.dns_alert_labels["eni"], ENI_ID);
    assert_eq!(out.dns_alert_labels["resolver"], "10.71.0.2");

    // One page for one problem: while the allowance is exceeded and DNS fails, the node
    // paged once; the DNS alerts reached Alertmanager and the shipped inhibit rules kept
    // them quiet.
    assert_eq!(
        out.paged,
        ["EniMonitorConntrackAllowanceCritical"],
        "{out:?}"
    );
    for quiet in ["EniMonitorDnsUnanswered", "EniMonitorDnsTcpConnectFailures"] {
        assert!(out.inhibited.iter().any(|i| i == quiet), "{quiet}: {out:?}");
    }

    // The link-local limit pages before it drops, and the drops are unanswered queries.
    assert!(out.linklocal_alert_before_drop, "{out:?}");
    assert_eq!(out.linklocal_alert_labels["eni"], ENI_ID);
    assert!(out.linklocal_drops > 0.0, "{out:?}");
    assert!(out.linklocal_unanswered >= out.linklocal_drops, "{out:?}");
    assert!(
        !out.linklocal_alert_labels
            .to_string()
            .contains(AMAZON_RESOLVER)
    );

    // `monitor status` says it at a glance: the worst first, on one screen.
    let screen = &out.status_screen;
    let lines: Vec<&str> = screen.lines().collect();
    assert!(
        lines[1].starts_with("CRIT  connection-tracking allowance at "),
        "{screen}"
    );
    assert!(
        screen.contains(&format!(
            "CRIT  eth0 ({ENI_ID}): 100.0% of DNS queries unanswered"
        )),
        "{screen}"
    );
    assert!(lines.iter().all(|l| l.chars().count() <= 100), "{screen}");
    assert!(
        !screen.contains('\x1b'),
        "no colour off a terminal: {screen}"
    );
}
