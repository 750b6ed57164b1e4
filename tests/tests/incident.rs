//! The incident, replayed end to end (see `integration_tests::incident`): the page comes
//! before the hypervisor's first drop, DNS failing after it pages and names the ENI, and
//! the link-local limit pages before it drops.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::float_cmp)]

use integration_tests::{
    incident::{ALLOWANCE, AMAZON_RESOLVER, ENI_ID, Incident, NODE, runnable},
    require_root,
};

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
