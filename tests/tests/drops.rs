//! Kernel drops end to end: real packets into a simulated node, counted by the real
//! `skb:kfree_skb` program, read from a real scrape.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::float_cmp)]

use std::{
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use integration_tests::{Agent, Netns, SimNode, addr, monitor_bin, require_root, send_udp};

const DROPS: &str = "eni_monitor_drops_total";
const DNS_DROPS: &str = "eni_monitor_dns_drops_total";

/// A TCP connection attempt from inside `ns`; a closed port answers with a reset.
fn tcp_connect_refused(ns: &Netns, dst: SocketAddr) {
    ns.run(move || {
        let err = TcpStream::connect_timeout(&dst, Duration::from_secs(2))
            .expect_err("port should be closed");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{dst}: {err}"
        );
    });
}

#[test]
fn closed_port_drops_are_counted_on_the_eni() {
    if !require_root("closed_port_drops_are_counted_on_the_eni") {
        return;
    }
    let sim = SimNode::new();
    let agent = Agent::start(&sim.node, &["--device", "eth0"]);
    let eth0 = sim.eni("eth0");

    send_udp(&sim.vpc, addr(&eth0.node_v4, 9999), 7, b"not dns");
    send_udp(
        &sim.vpc,
        addr(&eth0.node_v4, 53),
        3,
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00",
    );
    send_udp(&sim.vpc, addr(&eth0.node_v6, 53), 2, b"v6 dns");
    send_udp(&sim.vpc, addr(&eth0.node_v6, 5353), 4, b"v6 not dns");
    tcp_connect_refused(&sim.vpc, addr(&eth0.node_v4, 53));
    tcp_connect_refused(&sim.vpc, addr(&eth0.node_v6, 8080));

    let all = [("device", "eth0"), ("reason", "NO_SOCKET")];
    let dns = [("device", "eth0"), ("reason", "NO_SOCKET")];
    let s = agent.scrape_until(&sim.node, "18 drops on eth0", |s| {
        s.get(DROPS, &all) >= Some(18.0)
    });
    // Let any stragglers arrive before asserting exact figures.
    std::thread::sleep(Duration::from_millis(300));
    let s2 = agent.scrape(&sim.node);
    assert_eq!(s2.get(DROPS, &all), Some(18.0), "{}", s.text);
    assert_eq!(s2.get(DNS_DROPS, &dns), Some(6.0), "{}", s2.text);
    // Nothing else on eth0 was dropped, and drops carry only monitored devices or other.
    for (labels, _) in s2.matching(DROPS, &[]) {
        assert!(
            ["eth0", "other"].contains(&labels["device"].as_str()),
            "{labels:?}"
        );
    }
    assert_eq!(s2.sum(DROPS, &[("device", "eth0")]), 18.0, "{}", s2.text);
    assert_eq!(
        s2.get(
            "eni_monitor_program_attached",
            &[
                ("program", "kfree_skb"),
                ("hook", "raw_tp/kfree_skb"),
                ("device", "")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        s2.get(
            "eni_monitor_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
}

#[test]
fn drops_in_other_namespaces_never_count_on_the_eni() {
    if !require_root("drops_in_other_namespaces_never_count_on_the_eni") {
        return;
    }
    let sim = SimNode::new();
    // A second node whose device is also named eth0, very likely with the same ifindex.
    let pod = SimNode::new();
    let agent = Agent::start(&sim.node, &["--device", "eth0"]);

    send_udp(
        &pod.vpc,
        addr(&pod.eni("eth0").node_v4, 53),
        5,
        b"elsewhere",
    );
    send_udp(&sim.vpc, addr(&sim.eni("eth0").node_v4, 53), 2, b"here");

    let dns = [("device", "eth0"), ("reason", "NO_SOCKET")];
    let other = [("device", "other"), ("reason", "NO_SOCKET")];
    agent.scrape_until(&sim.node, "drops here and elsewhere", |s| {
        s.get(DNS_DROPS, &dns) >= Some(2.0) && s.get(DNS_DROPS, &other) >= Some(5.0)
    });
    std::thread::sleep(Duration::from_millis(300));
    let s = agent.scrape(&sim.node);
    assert_eq!(s.get(DNS_DROPS, &dns), Some(2.0), "{}", s.text);
    assert!(s.get(DNS_DROPS, &other) >= Some(5.0), "{}", s.text);
}

/// The agent runs as a container runs it, with a fresh sysfs and no tracefs (the harness
/// starts it with `ip netns exec`): every hook attaches and `/readyz` says so.
#[test]
fn every_hook_attaches_without_tracefs() {
    if !require_root("every_hook_attaches_without_tracefs") {
        return;
    }
    let sim = SimNode::new();
    let mut agent = Agent::start(&sim.node, &["--device", "eth0"]);
    assert!(
        !std::path::Path::new(&format!(
            "/proc/{}/root/sys/kernel/tracing/events",
            agent.pid()
        ))
        .exists(),
        "the agent sees tracefs; the test would prove nothing"
    );
    let s = agent.scrape(&sim.node);
    for (program, hook, device) in [
        ("kfree_skb", "raw_tp/kfree_skb", ""),
        (
            "udp_fail_queue_rcv_skb",
            "raw_tp/udp_fail_queue_rcv_skb",
            "",
        ),
        ("tc_ingress", "tc/ingress", "eth0"),
        ("tc_egress", "tc/egress", "eth0"),
    ] {
        assert_eq!(
            s.get(
                "eni_monitor_program_attached",
                &[("program", program), ("hook", hook), ("device", device)]
            ),
            Some(1.0),
            "{program}: {}",
            s.text
        );
    }
    assert_eq!(
        agent.get(&sim.node, "/readyz").unwrap(),
        (200, "ready\n".to_owned())
    );
    assert!(agent.stop().success());
    let log = agent.log_text();
    assert!(!log.contains("tracefs"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn a_device_that_does_not_exist_is_one_warning() {
    if !require_root("a_device_that_does_not_exist_is_one_warning") {
        return;
    }
    let sim = SimNode::new();
    let mut agent = Agent::start(&sim.node, &["--device", "eth0", "--device", "eth9"]);
    assert_eq!(agent.get(&sim.node, "/readyz").unwrap().0, 200);
    assert!(agent.stop().success());
    let log = agent.log_text();
    assert_eq!(
        log.matches("--device eth9: no such interface").count(),
        1,
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn sigterm_detaches_and_exits_cleanly() {
    if !require_root("sigterm_detaches_and_exits_cleanly") {
        return;
    }
    let sim = SimNode::new();
    let mut agent = Agent::start(&sim.node, &["--device", "eth0"]);
    assert_eq!(
        agent.get(&sim.node, "/readyz").unwrap(),
        (200, "ready\n".to_owned())
    );
    let status = agent.stop();
    assert!(status.success(), "{status}");
    assert!(agent.log_text().contains("SIGTERM: detaching and exiting"));
    // Nothing is left listening.
    assert!(agent.get(&sim.node, "/healthz").is_none());
}

#[test]
fn bad_flags_are_one_line_naming_the_flag() {
    for (args, flag) in [
        (&["--listen", "nowhere"][..], "--listen"),
        (&["--dns-timeout", "0s"], "--dns-timeout"),
        (&["--flow-table-size=-3"], "--flow-table-size"),
        (
            &["--linklocal-resolver", "not-an-ip"],
            "--linklocal-resolver",
        ),
    ] {
        let out = std::process::Command::new(monitor_bin())
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
    // The same through the environment.
    let out = std::process::Command::new(monitor_bin())
        .env("MONITOR_DNS_TIMEOUT", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--dns-timeout"), "{stderr}");
}

#[test]
fn a_listen_address_in_use_is_one_line() {
    if !require_root("a_listen_address_in_use_is_one_line") {
        return;
    }
    let sim = SimNode::new();
    let _agent = Agent::start(&sim.node, &["--device", "eth0"]);
    let out = sim
        .node
        .command(monitor_bin().to_str().unwrap())
        .args(["--listen", "127.0.0.1:9435", "--device", "eth0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("listening on 127.0.0.1:9435 (--listen)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("Address in use") || stderr.contains("in use"),
        "{stderr}"
    );
}
