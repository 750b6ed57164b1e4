//! What each program costs per packet, over an empty program on the same hook seeing
//! the same packets in the same run (`bpf_stats`).

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use crate::report::{Report, Stat, runs, stat};
use integration_tests::{
    Agent, Netns, SimNode,
    floor::{BPF_TCX_EGRESS, BPF_TCX_INGRESS, FloorClassifier, FloorTracepoint},
    sh,
};
use serde_json::Value;

/// (`run_time_ns`, `run_cnt`) of every loaded program, by name; needs `kernel.bpf_stats_enabled`.
pub(crate) fn prog_stats() -> ProgStats {
    let out = sh(Command::new("bpftool").args(["prog", "show", "-j"]));
    let progs: Value = serde_json::from_str(&out).unwrap();
    let mut m: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for p in progs.as_array().unwrap() {
        let Some(name) = p["name"].as_str() else {
            continue;
        };
        let e = m.entry(name.to_owned()).or_default();
        e.0 += p["run_time_ns"].as_u64().unwrap_or(0);
        e.1 += p["run_cnt"].as_u64().unwrap_or(0);
    }
    m
}

pub(crate) type ProgStats = BTreeMap<String, (u64, u64)>;

/// Adds each program's nanoseconds per run between two `prog_stats` readings.
pub(crate) fn record_cost<'a>(
    per: &mut BTreeMap<&'a str, Vec<f64>>,
    names: &[&'a str],
    before: &ProgStats,
    after: &ProgStats,
) {
    for &n in names {
        let (t0, c0) = before.get(n).copied().unwrap_or_default();
        let (t1, c1) = after.get(n).copied().unwrap_or_default();
        if c1 > c0 {
            per.entry(n)
                .or_default()
                .push((t1 - t0) as f64 / (c1 - c0) as f64);
        }
    }
}

/// Flows of the interleaved cases: `sockets` source sockets, each sending to `ports`
/// destination ports in turn.
#[derive(Clone, Copy)]
pub(crate) struct Spread {
    pub(crate) sockets: u16,
    pub(crate) ports: u16,
}

impl Spread {
    pub(crate) fn flows(self) -> u32 {
        u32::from(self.sockets) * u32::from(self.ports)
    }
}

/// The source sockets of `spread`'s flows, bound in `ns`: kept across a case's runs, so
/// every run sends on flows the table already holds.
pub(crate) fn sockets(ns: &Netns, spread: Spread) -> Vec<UdpSocket> {
    ns.run(move || {
        (0..spread.sockets)
            .map(|_| UdpSocket::bind("0.0.0.0:0").unwrap())
            .collect()
    })
}

/// Sends 64-byte datagrams on `socks` to `dst` as fast as one thread can, for `dur` (or,
/// with `dur` None, one to each flow), over `spread`'s flows, each packet to the next
/// flow: their packets interleaved. The sockets come back with the packets sent.
pub(crate) fn blast(
    socks: Vec<UdpSocket>,
    dst: SocketAddr,
    spread: Spread,
    dur: Option<Duration>,
) -> std::thread::JoinHandle<(Vec<UdpSocket>, u64)> {
    std::thread::spawn(move || {
        let payload = [0u8; 22]; // 14 + 20 + 8 + 22 = 64 bytes on the wire
        let flows = u64::from(spread.flows());
        let end = dur.map(|d| Instant::now() + d);
        let mut n = 0u64;
        let mut to = dst;
        let send = |n: u64, to: &mut SocketAddr| {
            let flow = n % flows;
            let sock = &socks[(flow % u64::from(spread.sockets)) as usize];
            to.set_port(dst.port() + (flow / u64::from(spread.sockets)) as u16);
            sock.send_to(&payload, *to).is_ok()
        };
        match end {
            Some(end) => {
                while Instant::now() < end {
                    for _ in 0..256 {
                        if send(n, &mut to) {
                            n += 1;
                        }
                    }
                }
            }
            None => {
                while n < flows {
                    if send(n, &mut to) {
                        n += 1;
                    } else {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
            }
        }
        (socks, n)
    })
}

pub(crate) fn bpf_stats(on: bool) {
    sh(Command::new("sysctl").args([
        "-q",
        "-w",
        &format!("kernel.bpf_stats_enabled={}", u8::from(on)),
    ]));
}

/// Empty classifiers on both directions of `dev`, beside the agent's: the floor.
pub(crate) fn floor_classifiers(ns: &Netns, dev: &str) -> (FloorClassifier, FloorClassifier) {
    let ifindex = ns.ifindex(dev);
    ns.run(move || {
        (
            FloorClassifier::attach(ifindex, BPF_TCX_INGRESS)
                .expect("attaching the floor classifier"),
            FloorClassifier::attach(ifindex, BPF_TCX_EGRESS)
                .expect("attaching the floor classifier"),
        )
    })
}

/// Each run's cost per event of `n` minus the floor's in the same run.
pub(crate) fn over_floor(per: &BTreeMap<&str, Vec<f64>>, n: &str, floor: &str) -> Option<Stat> {
    let (v, f) = (per.get(n)?, per.get(floor)?);
    Some(stat(v.iter().zip(f).map(|(x, f)| x - f).collect()))
}

/// The interleaved cases: (name, flows each way, target over the floor in ns). Past a
/// CPU's flow cache (about 6000 flows) every packet misses it.
pub(crate) const CURVE: [(&str, Spread, f64); 4] = [
    (
        "1 flow",
        Spread {
            sockets: 1,
            ports: 1,
        },
        40.0,
    ),
    (
        "2000 flows",
        Spread {
            sockets: 1,
            ports: 2000,
        },
        80.0,
    ),
    (
        "20000 flows",
        Spread {
            sockets: 1,
            ports: 20_000,
        },
        150.0,
    ),
    (
        "100000 flows",
        Spread {
            sockets: 4,
            ports: 25_000,
        },
        150.0,
    ),
];

/// Section 1, cost per packet of the classifiers and per drop of `kfree_skb`, beside empty
/// programs on the same events in the same run: 1, 2000, 20 000 and 100 000 flows each
/// way with their packets interleaved, every packet to a closed port (a drop). A case's
/// flows are opened before its runs (one packet each) and its runs send on them: what is
/// measured is the packets of established flows. The table is the default size, which
/// holds every case's flows (about 200 000 at 100 000 each way) and must never be full.
pub(crate) fn program_cost(report: &mut Report) {
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let agent = Agent::start(&sim.node, &["--device", "eth0"]);
    let floor_tc = floor_classifiers(&sim.node, "eth0");
    let floor_tp = sim
        .node
        .run(|| FloorTracepoint::attach("kfree_skb").expect("attaching the floor tracepoint"));
    let names = [
        "tc_ingress",
        "tc_egress",
        "kfree_skb",
        "floor_tc",
        "floor_tp",
    ];
    let to_node = SocketAddr::new(eth0.node_v4.parse().unwrap(), 20_000);
    let to_vpc = SocketAddr::new(eth0.vpc_v4.parse().unwrap(), 20_000);
    for (case, spread, target) in CURVE {
        let mut per: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let (mut in_socks, mut out_socks) = (sockets(&sim.vpc, spread), sockets(&sim.node, spread));
        let mut sent = Vec::new();
        let mut created = Vec::new();
        for dur in std::iter::once(None).chain((0..runs()).map(|_| Some(Duration::from_secs(2)))) {
            bpf_stats(dur.is_some());
            let flows_before = agent
                .scrape(&sim.node)
                .sum("eni_monitor_flows_created_total", &[]);
            let before = prog_stats();
            let a = blast(in_socks, to_node, spread, dur);
            let b = blast(out_socks, to_vpc, spread, dur);
            let (a, na) = a.join().unwrap();
            let (b, nb) = b.join().unwrap();
            (in_socks, out_socks) = (a, b);
            let after = prog_stats();
            if dur.is_some() {
                record_cost(&mut per, &names, &before, &after);
                sent.push((na + nb) as f64);
                created.push(
                    agent
                        .scrape(&sim.node)
                        .sum("eni_monitor_flows_created_total", &[])
                        - flows_before,
                );
            }
        }
        bpf_stats(false);
        report_case(report, case, target, &per, sent, created);
    }
    drop((floor_tc, floor_tp));
    let full = agent
        .scrape(&sim.node)
        .sum("eni_monitor_flow_table_full_total", &[]);
    report.add(
        "programs",
        "flows that found the table full, every case",
        "flows",
        stat(vec![full]),
        Some(("0".into(), full == 0.0)),
    );
}

/// One interleaved case's rows: packets and new flows a run, the floors, each program
/// over its floor.
fn report_case(
    report: &mut Report,
    case: &str,
    target: f64,
    per: &BTreeMap<&str, Vec<f64>>,
    sent: Vec<f64>,
    created: Vec<f64>,
) {
    report.add(
        "programs",
        format!("{case}: packets a run, both ways"),
        "pkts",
        stat(sent),
        None,
    );
    report.add(
        "programs",
        format!("{case}: flows created a run"),
        "flows",
        stat(created),
        None,
    );
    for (name, floor) in [
        ("floor_tc", "empty classifier"),
        ("floor_tp", "empty kfree_skb"),
    ] {
        if let Some(v) = per.get(name) {
            report.add(
                "programs",
                format!("{case}: floor, {floor}"),
                "ns",
                stat(v.clone()),
                None,
            );
        }
    }
    for n in ["tc_ingress", "tc_egress"] {
        if let Some(s) = over_floor(per, n, "floor_tc") {
            report.add(
                "programs",
                format!("{case}: {n} over the floor"),
                "ns/pkt",
                s,
                Some((format!("<= {target} ns"), s.median <= target)),
            );
        }
    }
    if let Some(s) = over_floor(per, "kfree_skb", "floor_tp") {
        report.add(
            "programs",
            format!("{case}: kfree_skb over the floor"),
            "ns/drop",
            s,
            Some(("<= 150 ns".into(), s.median <= 150.0)),
        );
    }
}

/// New flows a run opens: `NEW_FLOW_SOCKETS` fresh sockets, each sending one datagram to
/// each of `NEW_FLOW_PORTS` ports.
const NEW_FLOW_SOCKETS: u16 = 8;
const NEW_FLOW_PORTS: u16 = 5000;

/// Section 1b, the first packet of a new flow: every datagram leaving is a 5-tuple the
/// flow table has not seen, against the empty classifier on the same packets. The table
/// is sized for every run's flows, so none finds it full.
pub(crate) fn new_flow_cost(report: &mut Report) {
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let agent = Agent::start(
        &sim.node,
        &["--device", "eth0", "--flow-table-size", "1048576"],
    );
    let floor = floor_classifiers(&sim.node, "eth0");
    let names = ["tc_egress", "floor_tc"];
    let dst: std::net::IpAddr = eth0.vpc_v4.parse().unwrap();
    bpf_stats(true);
    let mut per: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut opened = 0u32;
    for _ in 0..runs() {
        let before = prog_stats();
        opened += sim.node.run(move || {
            let socks: Vec<UdpSocket> = (0..NEW_FLOW_SOCKETS)
                .map(|_| UdpSocket::bind("0.0.0.0:0").unwrap())
                .collect();
            let mut sent = 0u32;
            for port in 0..NEW_FLOW_PORTS {
                for sock in &socks {
                    let to = SocketAddr::new(dst, 20_000 + port);
                    while sock.send_to(&[0u8; 22], to).is_err() {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    sent += 1;
                }
            }
            sent
        });
        let after = prog_stats();
        record_cost(&mut per, &names, &before, &after);
    }
    bpf_stats(false);
    drop(floor);
    let s = agent.scrape(&sim.node);
    let full = s.sum("eni_monitor_flow_table_full_total", &[]);
    let created = s.sum(
        "eni_monitor_flows_created_total",
        &[("device", "eth0"), ("protocol", "udp")],
    );
    if let Some(v) = per.get("floor_tc") {
        report.add(
            "programs",
            "new flows: floor, empty classifier",
            "ns",
            stat(v.clone()),
            None,
        );
    }
    if let Some(s) = over_floor(&per, "tc_egress", "floor_tc") {
        report.add(
            "programs",
            format!(
                "new flows: tc_egress over the floor, the first packet of each ({opened} flows)"
            ),
            "ns/pkt",
            s,
            Some(("<= 300 ns".into(), s.median <= 300.0)),
        );
    }
    report.add(
        "programs",
        "new flows: created by the agent's count - opened",
        "flows",
        stat(vec![created - f64::from(opened)]),
        Some((
            "0, table never full".into(),
            created >= f64::from(opened) && full == 0.0,
        )),
    );
}
