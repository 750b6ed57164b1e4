//! A busy node: two ENIs, three resolvers (one too slow to answer in time), ten pods
//! behind `eth0`, drops of two reasons. The series budget counts its series; the bench
//! serves its exposition as a fleet.

use std::{net::IpAddr, time::Duration};

use crate::{
    Agent, Scrape, SimNode, addr,
    dns::{self, NX_NAME, OK_NAME, Resolver, SERVFAIL_NAME, SlowResolver},
    dns_tcp, send_udp,
    servers::{UdpEcho, udp_flows},
};

/// The node with its agent, servers and pods; all removed on drop.
pub struct BusyNode {
    pub sim: SimNode,
    pub agent: Agent,
    _resolver: Resolver,
    _slow: SlowResolver,
    _echo: UdpEcho,
    _pods: Vec<crate::Pod>,
}

/// The resolver that answers after the agent's `--dns-timeout`.
const SLOW: &str = "10.200.0.53";

impl BusyNode {
    /// Builds the node and sends its traffic: the three resolvers named first (each
    /// naming query counts under `other`), then three answers of three rcodes and two
    /// lost through eth0, UDP and TCP on eth1; a flow from each pod; a closed port on
    /// eth0's node address and a firewalled one on eth1's. Returns once all is counted.
    pub fn build() -> (Self, Scrape) {
        let mut sim = SimNode::ipv4_only();
        sim.add_eni("eth1");
        let (eth0, eth1) = (sim.eni("eth0"), sim.eni("eth1"));
        let (eth0_vpc, eth0_node, eth1_vpc, eth1_node) = (
            eth0.vpc_v4.clone(),
            eth0.node_v4.clone(),
            eth1.vpc_v4.clone(),
            eth1.node_v4.clone(),
        );
        sim.vpc.ip(&format!("addr add {SLOW}/24 dev vpc0"));
        let ip = |s: &str| -> IpAddr { s.parse().expect("an address") };
        let resolver = Resolver::start(&sim.vpc, &[ip(&eth0_vpc), ip(&eth1_vpc)]);
        let slow = SlowResolver::start(&sim.vpc, addr(SLOW, 53), Duration::from_secs(3));
        let echo = UdpEcho::start(&sim.vpc, addr(&eth0_vpc, 7000));
        let pods: Vec<_> = (0..10).map(|n| sim.add_pod(n)).collect();
        sim.node.nft("table inet busy {\n chain input {\n  type filter hook input priority 0;\n  udp dport 7777 drop\n }\n}\n");
        let agent = Agent::start(
            &sim.node,
            &[
                "--device",
                "eth*",
                "--dns-timeout",
                "1s",
                "--conntrack-allowance",
                "100000",
            ],
        );

        let wait = Duration::from_secs(2);
        let (resolver0, lost, resolver1) =
            (addr(&eth0_vpc, 53), addr(SLOW, 53), addr(&eth1_vpc, 53));
        for r in [resolver0, lost, resolver1] {
            agent.name_resolver(&sim.node, &sim.node, r);
        }
        for name in [OK_NAME, NX_NAME, SERVFAIL_NAME] {
            assert!(dns::query(&sim.node, resolver0, name, 1, wait).is_some());
        }
        let lost_wait = Duration::from_millis(500);
        assert_eq!(dns::queries(&sim.node, lost, OK_NAME, 2, lost_wait), 0);
        assert!(dns::query(&sim.node, resolver1, OK_NAME, 2, wait).is_some());
        let tcp = dns_tcp::pipelined(&sim.node, resolver1, &[&[(OK_NAME, 3)]], wait);
        assert_eq!(tcp.len(), 1);
        for pod in &pods {
            assert_eq!(udp_flows(&pod.ns, addr(&eth0_vpc, 7000), 1), 1);
        }
        send_udp(&sim.vpc, addr(&eth0_node, 9), 1, b"closed");
        send_udp(&sim.vpc, addr(&eth1_node, 7777), 1, b"firewalled");

        let s = agent.scrape_until(&sim.node, "the busy node's traffic counted", |s| {
            s.sum("eni_monitor_dns_unanswered_total", &[]) == 3.0
                && s.sum("eni_monitor_dns_drops_total", &[("device", "eth0")]) == 3.0
                && s.sum("eni_monitor_drops_total", &[("device", "eth1")]) >= 1.0
                && s.label_values(
                    "eni_monitor_top_flow_owners",
                    &[("device", "eth0")],
                    "address",
                )
                .len()
                    == 10
        });
        let node = Self {
            sim,
            agent,
            _resolver: resolver,
            _slow: slow,
            _echo: echo,
            _pods: pods,
        };
        (node, s)
    }
}
