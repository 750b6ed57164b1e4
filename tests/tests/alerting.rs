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

use std::{net::SocketAddr, time::Duration, time::Instant};

use integration_tests::{
    Agent, SimNode,
    dns::{self, OK_NAME, Resolver},
    paging::{Paging, wait_for},
    require_root,
};

#[test]
fn dns_loss_pages_through_alertmanager_and_resolves() {
    if !require_root("dns_loss_pages_through_alertmanager_and_resolves") {
        return;
    }
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let _resolver = Resolver::start(&sim.vpc, &[eth0.vpc_v4.parse().unwrap()]);
    let agent = Agent::start(&sim.node, &["--device", "eth0", "--dns-timeout", "1s"]);

    let paging = Paging::start(&sim.node, agent.listen, "simulated-node");
    let active = |alertname: &str| {
        paging
            .active(&sim.node, alertname, &[("device", "eth0")])
            .len()
    };

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
        || active("EniMonitorDnsPacketsDropped") == 1,
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
        active("EniMonitorDnsPacketsDropped") == 0
    });
    eprintln!("EniMonitorDnsPacketsDropped resolved {resolved:?} after the loss stopped");
    drop(paging);
    drop(agent);
}
