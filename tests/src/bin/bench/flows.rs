//! The flow table at scale: the expiry pass and the memory of many flows.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use crate::agent::{cpu_seconds, map_mib, mapped_maps_mib, own_rss_mib};
use crate::report::{Report, runs, stat};
use integration_tests::{Agent, Netns, SimNode};

/// Sends one datagram to each of `ports` on each of `addrs` from one socket in `ns`:
/// that many distinct flows.
pub(crate) fn many_flows(
    ns: &Netns,
    addrs: Vec<std::net::IpAddr>,
    ports: std::ops::RangeInclusive<u16>,
) {
    ns.run(move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        for a in &addrs {
            for p in ports.clone() {
                while sock.send_to(b"f", SocketAddr::new(*a, p)).is_err() {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
    });
}

/// 4b. The flow table at size: the expiry pass over 100k flows, RSS after 1M.
pub(crate) fn flow_table(report: &mut Report) {
    let sim = SimNode::ipv4_only();
    let addrs: Vec<std::net::IpAddr> = (10..26)
        .map(|i| format!("10.200.0.{i}").parse().unwrap())
        .collect();
    for a in &addrs {
        sim.vpc.ip(&format!("addr add {a}/32 dev vpc0"));
    }
    // One-way UDP flows that stay tracked for the whole measurement.
    let agent = Agent::start(
        &sim.node,
        &[
            "--device",
            "eth0",
            "--flow-table-size",
            "1100000",
            "--udp-timeout",
            "600s",
        ],
    );
    let tracked = |n: f64| {
        move |s: &integration_tests::Scrape| {
            s.sum("eni_monitor_tracked_flows", &[("device", "eth0")]) >= n
        }
    };
    many_flows(&sim.node, addrs[..2].to_vec(), 1..=50_000);
    agent.scrape_until(&sim.node, "100k flows", tracked(100_000.0));
    // Passes run every 2.5 s here; the agent does nothing else meanwhile.
    let mut per_pass = Vec::new();
    for _ in 0..runs() {
        let c0 = cpu_seconds(agent.pid());
        std::thread::sleep(Duration::from_secs(5));
        per_pass.push((cpu_seconds(agent.pid()) - c0) / 2.0 * 1000.0);
    }
    let s = stat(per_pass);
    report.add(
        "flows",
        "expiry pass over 100k flows (CPU)",
        "ms",
        s,
        Some(("<= 50 ms".into(), s.median <= 50.0)),
    );
    many_flows(&sim.node, addrs.clone(), 1..=62_500);
    agent.scrape_until(&sim.node, "1M flows", tracked(1_000_000.0));
    std::thread::sleep(Duration::from_secs(3));
    let rss: Vec<f64> = (0..runs())
        .map(|_| {
            std::thread::sleep(Duration::from_millis(500));
            own_rss_mib(agent.pid())
        })
        .collect();
    let r = stat(rss);
    report.add(
        "flows",
        "agent resident memory with 1M flows tracked, its own",
        "MiB",
        r,
        Some(("<= 30 MiB".into(), r.median <= 30.0)),
    );
    report.add(
        "flows",
        "agent resident memory with 1M flows tracked, the maps it maps (kernel map memory)",
        "MiB",
        stat(vec![mapped_maps_mib(agent.pid())]),
        None,
    );
    report.add(
        "flows",
        "kernel map memory with 1M flows tracked",
        "MiB",
        stat(vec![map_mib(&agent, &sim.node)]),
        None,
    );
    let c0 = cpu_seconds(agent.pid());
    std::thread::sleep(Duration::from_secs(10));
    report.add(
        "flows",
        "expiry pass over 1M flows (CPU)",
        "ms",
        stat(vec![(cpu_seconds(agent.pid()) - c0) / 4.0 * 1000.0]),
        None,
    );
}
