//! ENI ids and the VPC resolver from `IMDSv2` (a stand-in server: the real one cannot
//! exist here), and an IMDS that hangs or fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::float_cmp)]

use std::{net::SocketAddr, time::Duration};

use integration_tests::{
    Agent, SimNode,
    dns::{self, OK_NAME, Resolver},
    imds::{Behaviour, FakeImds},
    require_root,
};

const ENI: &str = "eni-0123456789abcdef0";

/// The stand-in IMDS naming `eth0`'s ENI in the VPC 10.250.0.0/16, on an
/// `instance_type`.
fn serving(sim: &SimNode, instance_type: &'static str) -> FakeImds {
    FakeImds::start(
        &sim.node,
        Behaviour::Serve {
            enis: vec![(
                sim.node.mac("eth0"),
                ENI.to_owned(),
                "10.250.0.0/16".to_owned(),
            )],
            instance_type,
        },
    )
}

#[test]
fn eni_ids_and_the_vpc_resolver_come_from_imds() {
    if !require_root("eni_ids_and_the_vpc_resolver_come_from_imds") {
        return;
    }
    let sim = SimNode::new();
    // The VPC is 10.250.0.0/16, so its resolver answers on 10.250.0.2.
    sim.vpc.ip("addr add 10.250.0.2/32 dev vpc0");
    sim.node.ip("route add 10.250.0.2/32 dev eth0");
    let _resolver = Resolver::start(&sim.vpc, &["10.250.0.2".parse().unwrap()]);
    let imds = serving(&sim, "m5.large");
    let agent = Agent::start(
        &sim.node,
        &["--device", "eth0", "--imds-endpoint", &imds.endpoint()],
    );
    // The ENI id is a fact of the device, in its info series; no other series changes.
    let info = [("device", "eth0"), ("eni", ENI)];
    let s = agent.scrape_until(&sim.node, "the ENI id", |s| {
        s.matching("eni_monitor_device_info", &info).count() == 1
    });
    let mac = sim.node.mac("eth0");
    assert_eq!(
        s.get(
            "eni_monitor_device_info",
            &[("device", "eth0"), ("eni", ENI), ("mac", &mac)]
        ),
        Some(1.0),
        "{}",
        s.text
    );

    let server = SocketAddr::new("10.250.0.2".parse().unwrap(), 53);
    assert_eq!(
        dns::queries(&sim.node, server, OK_NAME, 5, Duration::from_secs(2)),
        5
    );
    let s = agent.scrape_until(&sim.node, "5 responses", |s| {
        s.sum("eni_monitor_dns_responses_total", &[]) >= 5.0
    });
    // VPC+2 keeps its address as its label; IMDS made it Amazon's in the info series.
    let q = [
        ("device", "eth0"),
        ("resolver", "10.250.0.2"),
        ("transport", "udp"),
    ];
    assert_eq!(
        s.get("eni_monitor_dns_queries_total", &q),
        Some(5.0),
        "{}",
        s.text
    );
    let ll = [("device", "eth0"), ("service", "dns")];
    assert_eq!(
        s.get("eni_monitor_linklocal_packets_total", &ll),
        Some(5.0),
        "{}",
        s.text
    );
    assert_eq!(
        s.get(
            "eni_monitor_dns_resolver_info",
            &[("resolver", "10.250.0.2"), ("kind", "amazon")]
        ),
        Some(1.0),
        "{}",
        s.text
    );
}

fn stays_healthy(behaviour: Behaviour, what: &str) {
    let sim = SimNode::new();
    let imds = FakeImds::start(&sim.node, behaviour);
    let mut agent = Agent::start(
        &sim.node,
        &["--device", "eth0", "--imds-endpoint", &imds.endpoint()],
    );
    // The agent serves without waiting for IMDS: within less than one lookup's time-out
    // (1 s) of its first call, however long the verifier took before it.
    let serving = std::time::Instant::now();
    let waited = imds
        .first_call()
        .map(|first| serving.saturating_duration_since(first));
    assert!(
        waited.is_none_or(|w| w < Duration::from_secs(1)),
        "{what}: served {waited:?} after its first IMDS call"
    );
    eprintln!("{what}: served {waited:?} after its first IMDS call");
    assert_eq!(agent.get(&sim.node, "/readyz").unwrap().0, 200, "{what}");
    // Past a few lookups and their time-outs.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(agent.get(&sim.node, "/healthz").unwrap().0, 200, "{what}");
    assert!(imds.first_call().is_some(), "{what}: IMDS was never called");
    let s = agent.scrape(&sim.node);
    assert_eq!(
        s.get(
            "eni_monitor_linklocal_peak_packets_per_second",
            &[("device", "eth0")]
        ),
        Some(0.0),
        "{what}: {}",
        s.text
    );
    // No instance type known: EC2's general default.
    assert_eq!(
        s.get(
            "eni_monitor_tracking_timeout_seconds",
            &[("class", "tcp_established")]
        ),
        Some(432_000.0),
        "{what}: {}",
        s.text
    );
    assert!(agent.stop().success(), "{what}");
    let log = agent.log_text();
    assert_eq!(
        log.matches("IMDS: eth0:").count(),
        1,
        "{what}: one warning, then quiet retries:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn an_imds_that_hangs_leaves_the_agent_healthy() {
    if !require_root("an_imds_that_hangs_leaves_the_agent_healthy") {
        return;
    }
    stays_healthy(Behaviour::Hang, "hanging IMDS");
}

#[test]
fn an_imds_that_fails_leaves_the_agent_healthy() {
    if !require_root("an_imds_that_fails_leaves_the_agent_healthy") {
        return;
    }
    stays_healthy(Behaviour::Fail, "failing IMDS");
}

/// The TCP-established timeout the model applies once the stand-in IMDS names
/// `instance_type`, with `flags` added.
fn tcp_established_on(instance_type: &'static str, flags: &[&str]) -> f64 {
    let sim = SimNode::new();
    let imds = serving(&sim, instance_type);
    let endpoint = imds.endpoint();
    let mut args = vec!["--device", "eth0", "--imds-endpoint", &endpoint];
    args.extend(flags);
    let agent = Agent::start(&sim.node, &args);
    let learned = format!("instance type {instance_type}:");
    agent.scrape_until(&sim.node, "the instance type learned", |_| {
        agent.log_text().contains(&learned)
    });
    // The type is in use from the log line on.
    let s = agent.scrape(&sim.node);
    for (class, seconds) in [("udp", 30.0), ("udp_stream", 180.0)] {
        assert_eq!(
            s.get("eni_monitor_tracking_timeout_seconds", &[("class", class)]),
            Some(seconds),
            "{}",
            s.text
        );
    }
    s.get(
        "eni_monitor_tracking_timeout_seconds",
        &[("class", "tcp_established")],
    )
    .unwrap()
}

#[test]
fn the_tcp_established_timeout_follows_the_instance_type_and_the_flag_wins() {
    if !require_root("the_tcp_established_timeout_follows_the_instance_type_and_the_flag_wins") {
        return;
    }
    // EC2's default: 350 s on Nitro v6 types, five days elsewhere.
    assert_eq!(tcp_established_on("c8i.large", &[]), 350.0);
    assert_eq!(tcp_established_on("m5.large", &[]), 432_000.0);
    assert_eq!(tcp_established_on("p6e-gb200.36xlarge", &[]), 432_000.0);
    assert_eq!(
        tcp_established_on("c8i.large", &["--tcp-established-timeout", "900s"]),
        900.0
    );
}
