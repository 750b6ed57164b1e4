//! The agent beside the kernel's own `nf_conntrack` (what every node running kube-proxy
//! already pays), on the same packets in the same runs: established TCP (one-byte
//! segments and their acknowledgements, interleaved over 20 000 and 100 000 connections)
//! and UDP (interleaved over 20 000 and 100 000 flows, leaving the node).
//!
//! The node runs both: the agent on eth0, and an nftables chain on input and output that
//! matches on `ct state`, which engages `nf_conntrack`. Each is timed on its own hooks over
//! a floor on the same hooks:
//!
//! - the agent's classifiers by `bpf_stats`, over an empty classifier on each direction;
//! - `nf_conntrack`'s lookup and state machine (`nf_conntrack_in`, at priority -200 of
//!   `PRE_ROUTING` and `LOCAL_OUT`) by netfilter programs on either side of it, -201 and
//!   -199, over the same pair at -270 and -260 with nothing between (`HookTimer`).
//!
//! `nf_conntrack`'s figure leaves out what it costs past its lookup (the confirmation at the
//! last priority, the `ct state` match itself), so the ratio errs against the agent.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use crate::cost::{Spread, blast, bpf_stats, prog_stats, sockets};
use crate::established::connections;
use crate::report::{Report, runs, stat};
use integration_tests::{
    Agent, SimNode,
    floor::{
        BPF_TCX_EGRESS, BPF_TCX_INGRESS, FloorClassifier, HookTimer, NF_INET_LOCAL_OUT,
        NF_INET_PRE_ROUTING,
    },
};

/// Seconds of a measured run, and of the unmeasured one before them.
const RUN_S: f64 = 2.0;
const WARM_S: f64 = 3.0;

/// The `HookTimer` pairs: around `nf_conntrack`'s lookup, and the floor.
const AROUND_CONNTRACK: (i32, i32) = (-201, -199);
const TIMER_FLOOR: (i32, i32) = (-270, -260);

/// The node's chains, on input and output: accept what conntrack has seen both ways, count
/// the rest, as a node's firewall does.
const RULESET: &str = "table inet em_bench {
  chain input {
    type filter hook input priority 0; policy accept;
    ct state established,related counter accept
    meta l4proto { tcp, udp } counter
  }
  chain output {
    type filter hook output priority 0; policy accept;
    ct state established,related counter accept
    meta l4proto { tcp, udp } counter
  }
}
";

/// Section `conntrack`.
pub(crate) fn conntrack(report: &mut Report) {
    for n in [20_000, 100_000] {
        tcp_case(report, n);
        udp_case(report, n);
    }
}

/// The agent, its floors and the conntrack brackets on `sim`'s node.
struct Both {
    _agent: Agent,
    _floors: [FloorClassifier; 2],
    timer: HookTimer,
}

impl Both {
    fn start(sim: &SimNode) -> Self {
        let agent = Agent::start(&sim.node, &["--device", "eth0"]);
        sim.node.nft(RULESET);
        let ifindex = sim.node.ifindex("eth0");
        let (floors, timer) = sim.node.run(move || {
            let floors = [
                FloorClassifier::attach_named(ifindex, BPF_TCX_INGRESS, "floor_in"),
                FloorClassifier::attach_named(ifindex, BPF_TCX_EGRESS, "floor_out"),
            ]
            .map(|f| f.expect("attaching the floor classifiers"));
            let timer = HookTimer::attach(
                &[NF_INET_PRE_ROUTING, NF_INET_LOCAL_OUT],
                &[AROUND_CONNTRACK, TIMER_FLOOR],
            )
            .expect("attaching the netfilter brackets");
            (floors, timer)
        });
        Self {
            _agent: agent,
            _floors: floors,
            timer,
        }
    }

    /// Both brackets' (nanoseconds, packets).
    fn timers(&self) -> [(u64, u64); 2] {
        [0, 1].map(|i| self.timer.read(i).expect("reading the netfilter brackets"))
    }

    /// An unmeasured run of `traffic`, then `runs()` measured: each run's cost per
    /// packet of the agent and of `nf_conntrack`, each over its floor.
    fn measure(&self, mut traffic: impl FnMut(f64)) -> Costs {
        traffic(WARM_S);
        let mut c = Costs::default();
        bpf_stats(true);
        for _ in 0..runs() {
            let (p0, t0) = (prog_stats(), self.timers());
            traffic(RUN_S);
            let (p1, t1) = (prog_stats(), self.timers());
            let delta = |n: &str| {
                let (a, b) = (p0.get(n).copied().unwrap_or_default(), p1[n]);
                (b.0 - a.0, b.1 - a.1)
            };
            let (progs, floors) = (
                [delta("tc_ingress"), delta("tc_egress")],
                [delta("floor_in"), delta("floor_out")],
            );
            let ns = |d: [(u64, u64); 2]| (d[0].0 + d[1].0) as f64;
            let packets = (progs[0].1 + progs[1].1) as f64;
            c.agent.push((ns(progs) - ns(floors)) / packets);
            let per = |i: usize| (t1[i].0 - t0[i].0) as f64 / (t1[i].1 - t0[i].1) as f64;
            c.conntrack.push(per(0) - per(1));
            c.bracket.push(per(1));
        }
        bpf_stats(false);
        c
    }
}

/// Each run's nanoseconds a packet: the agent's and `nf_conntrack`'s over their floors,
/// and the brackets' own (their floor).
#[derive(Default)]
struct Costs {
    agent: Vec<f64>,
    conntrack: Vec<f64>,
    bracket: Vec<f64>,
}

fn tcp_case(report: &mut Report, n: u32) {
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let (_sinks, mut drips) = connections(&sim, eth0, n);
    let both = Both::start(&sim);
    let costs = both.measure(|secs| {
        let secs = secs.to_string();
        for d in &mut drips {
            d.start(&secs);
        }
        for d in &mut drips {
            d.sent();
        }
    });
    report_case(report, &format!("TCP, {n} connections"), costs);
}

fn udp_case(report: &mut Report, n: u32) {
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    // Four sockets, each to n / 4 ports in turn; the VPC drops them before routing, so
    // no port-unreachable comes back.
    let spread = Spread {
        sockets: 4,
        ports: u16::try_from(n / 4).unwrap(),
    };
    sim.vpc.nft(&format!(
        "table inet em_sink {{
  chain pre {{
    type filter hook prerouting priority -300;
    udp dport 20000-{} drop
  }}
}}
",
        20_000 + u32::from(spread.ports)
    ));
    let dst = SocketAddr::new(eth0.vpc_v4.parse().unwrap(), 20_000);
    let mut socks: Option<Vec<UdpSocket>> = Some(sockets(&sim.node, spread));
    let both = Both::start(&sim);
    let costs = both.measure(|secs| {
        let s = socks.take().unwrap();
        let (s, _) = blast(s, dst, spread, Some(Duration::from_secs_f64(secs)))
            .join()
            .unwrap();
        socks = Some(s);
    });
    report_case(report, &format!("UDP, {n} flows"), costs);
}

/// A case's rows: each one's cost per packet over its floor, and the agent's over
/// `nf_conntrack`'s run by run.
fn report_case(report: &mut Report, case: &str, c: Costs) {
    let section = "conntrack";
    let ratio: Vec<f64> = c
        .agent
        .iter()
        .zip(&c.conntrack)
        .map(|(a, c)| a / c)
        .collect();
    report.add(
        section,
        format!("{case}: the netfilter brackets' floor"),
        "ns/pkt",
        stat(c.bracket),
        None,
    );
    report.add(
        section,
        format!("{case}: nf_conntrack's lookup over its floor"),
        "ns/pkt",
        stat(c.conntrack),
        None,
    );
    report.add(
        section,
        format!("{case}: the agent's classifiers over theirs"),
        "ns/pkt",
        stat(c.agent),
        None,
    );
    let ratio = stat(ratio);
    report.add(
        section,
        format!("{case}: the agent over nf_conntrack"),
        "x",
        ratio,
        Some(("<= 0.5x".into(), ratio.median <= 0.5)),
    );
}
