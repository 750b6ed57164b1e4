//! The 64-byte UDP packet rate with the agent against without it (iperf3).

use std::time::Duration;

use crate::report::{Report, env_count, stat};
use integration_tests::{Agent, Netns, SimNode, sh};
use serde_json::Value;

/// Alternations of the packet-rate measure, each a second with and a second without.
pub(crate) fn rate_rounds() -> usize {
    env_count("BENCH_RATE_ROUNDS", 15)
}

pub(crate) fn iperf_pps(node: &Netns, server: &str) -> f64 {
    // The client on CPU 0, the server on CPU 1 (-A client,server).
    let out = sh(node.command("iperf3").args([
        "-c", server, "-u", "-l", "22", "-b", "0", "-t", "1", "-A", "0,1", "-J",
    ]));
    let v: Value = serde_json::from_str(&out).unwrap();
    let sum = &v["end"]["sum"];
    let packets = sum["packets"].as_f64().unwrap_or(0.0);
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    (packets - lost) / sum["seconds"].as_f64().unwrap_or(3.0)
}

/// Section 2, packets per second through the ENI without and with the agent, alternating a
/// second of each many times, the sender and the receiver pinned to their CPUs.
pub(crate) fn packet_rate(report: &mut Report) {
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let mut server = sim
        .vpc
        .command("iperf3")
        .args(["-s", "-B", &eth0.vpc_v4])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..rate_rounds() {
        without.push(iperf_pps(&sim.node, &eth0.vpc_v4));
        let agent = Agent::start(&sim.node, &["--device", "eth0"]);
        with.push(iperf_pps(&sim.node, &eth0.vpc_v4));
        drop(agent);
    }
    let _ = server.kill();
    let _ = server.wait();
    let ratios: Vec<f64> = with.iter().zip(&without).map(|(w, o)| w / o).collect();
    report.add(
        "rate",
        "64-byte UDP without the agent",
        "pkt/s",
        stat(without),
        None,
    );
    report.add(
        "rate",
        "64-byte UDP with the agent",
        "pkt/s",
        stat(with),
        None,
    );
    let r = stat(ratios);
    report.add(
        "rate",
        "with / without",
        "ratio",
        r,
        Some((">= 0.97".into(), r.median >= 0.97)),
    );
}
