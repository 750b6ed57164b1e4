//! Established TCP at scale: what a segment of an open connection costs the classifiers
//! over an empty classifier on the same packets, at 1, 2000, 20 000 and 100 000
//! connections, each write one byte to the next connection (their segments interleaved,
//! and their acknowledgements back). A process holds at most 20 000 descriptors, so the
//! connections are spread over processes of `nettool` (`tcp-drip` on the node, `tcp-sink`
//! in the VPC), at most `PER_PROCESS` each.
//!
//! Each direction has its floor of its own (data leaves, acknowledgements arrive: their
//! floors differ). A second pass puts a classifier that reads two bytes of the headers in
//! front of the agent's: the agent's cost then, and the reader's, split off what the
//! first touch of a packet's header costs whoever reads it first.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use crate::cost::{bpf_stats, over_floor, prog_stats, record_cost};
use crate::report::{Report, runs, stat};
use integration_tests::{
    Agent, Eni, Netns, SimNode,
    floor::{BPF_TCX_EGRESS, BPF_TCX_INGRESS, FloorClassifier, Place},
    monitor_bin,
};

/// Connections a process holds, clear of its 20 000 descriptors.
const PER_PROCESS: u32 = 17_000;

/// The cases: (name, connections, target). A target is nanoseconds over the floor, or
/// with `Ratio`, a multiple of the floor (so that it holds across machines of a kind).
const CASES: [(&str, u32, Target); 4] = [
    ("1 connection", 1, Target::Ratio(1.0)),
    ("2000 connections", 2000, Target::Ratio(2.0)),
    ("20000 connections", 20_000, Target::Ns(150.0)),
    ("100000 connections", 100_000, Target::Ns(150.0)),
];

#[derive(Clone, Copy)]
enum Target {
    Ns(f64),
    Ratio(f64),
}

/// Seconds each measured run writes for.
const RUN_S: &str = "2";

fn nettool(ns: &Netns) -> Command {
    ns.command(monitor_bin().with_file_name("nettool").to_str().unwrap())
}

/// A killed-on-drop process of `nettool`.
pub(crate) struct Tool(Child);

impl Drop for Tool {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `tcp-drip` process: its connections open, ready for runs.
pub(crate) struct Drip {
    _tool: Tool,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Drip {
    fn open(ns: &Netns, to: SocketAddr, n: u32) -> Self {
        let mut child = nettool(ns)
            .args(["tcp-drip", &to.to_string(), &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting nettool tcp-drip");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut drip = Self {
            _tool: Tool(child),
            stdin,
            stdout,
        };
        assert_eq!(drip.line(), format!("held {n}"));
        drip
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).unwrap();
        l.trim().to_owned()
    }

    pub(crate) fn start(&mut self, secs: &str) {
        writeln!(self.stdin, "{secs}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Segments written in the run.
    pub(crate) fn sent(&mut self) -> f64 {
        let l = self.line();
        l.strip_prefix("sent ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("tcp-drip said {l:?}"))
    }
}

/// Section `established`: every case on a node of its own, the agent on eth0.
pub(crate) fn established_tcp(report: &mut Report) {
    // BENCH_CONNECTIONS=1,2000 runs those cases alone while working on one.
    let only = std::env::var("BENCH_CONNECTIONS").unwrap_or_default();
    for (case, n, target) in CASES {
        if only.is_empty() || only.split(',').any(|c| c.trim() == n.to_string()) {
            one_case(report, case, n, target);
        }
    }
}

fn one_case(report: &mut Report, case: &str, n: u32, target: Target) {
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let agent = Agent::start(&sim.node, &["--device", "eth0"]);
    let (_sinks, mut drips) = connections(&sim, eth0, n);
    let ifindex = sim.node.ifindex("eth0");
    let floors = sim.node.run(move || {
        [
            FloorClassifier::attach_named(ifindex, BPF_TCX_INGRESS, "floor_in"),
            FloorClassifier::attach_named(ifindex, BPF_TCX_EGRESS, "floor_out"),
        ]
        .map(|f| f.expect("attaching the floor classifiers"))
    });
    let names = ["tc_ingress", "tc_egress", "floor_in", "floor_out"];
    let (per, sent) = measure(&mut drips, &names, true);
    let readers = sim.node.run(move || {
        [
            FloorClassifier::attach_reader(ifindex, BPF_TCX_INGRESS, "reader_in", Place::First),
            FloorClassifier::attach_reader(ifindex, BPF_TCX_EGRESS, "reader_out", Place::First),
        ]
        .map(|f| f.expect("attaching the header readers"))
    });
    let names = [
        "tc_ingress",
        "tc_egress",
        "floor_in",
        "floor_out",
        "reader_in",
        "reader_out",
    ];
    let (read_ahead, _) = measure(&mut drips, &names, false);
    drop(readers);
    drop(floors);
    let s = agent.scrape(&sim.node);
    let tcp = [("device", "eth0"), ("protocol", "tcp")];
    let created = s.sum("eni_monitor_flows_created_total", &tcp) - f64::from(n);
    let tracked = s.sum("eni_monitor_tracked_flows", &tcp) - f64::from(n);
    drop(drips);
    report_case(report, (case, n, target), &per, sent, (created, tracked));
    report_read_ahead(report, case, &read_ahead);
}

/// `n` connections from the node to sinks in the VPC, spread over processes: the sinks,
/// and the drips ready for runs.
pub(crate) fn connections(sim: &SimNode, eth0: &Eni, n: u32) -> (Vec<Tool>, Vec<Drip>) {
    let vpc: std::net::IpAddr = eth0.vpc_v4.parse().unwrap();
    let processes = n.div_ceil(PER_PROCESS);
    let ports: Vec<SocketAddr> = (0..processes)
        .map(|i| SocketAddr::new(vpc, 30_000 + u16::try_from(i).unwrap()))
        .collect();
    let sinks: Vec<Tool> = ports
        .iter()
        .map(|p| {
            Tool(
                nettool(&sim.vpc)
                    .args(["tcp-sink", &p.to_string()])
                    .spawn()
                    .expect("starting nettool tcp-sink"),
            )
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let drips = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let first = u32::try_from(i).unwrap() * PER_PROCESS;
            Drip::open(&sim.node, *p, (n - first).min(PER_PROCESS))
        })
        .collect();
    (sinks, drips)
}

/// Each classifier's cost per segment over `runs()` measured runs of every drip, and the
/// segments each run wrote; an unmeasured run first when `warm` (every connection has
/// written before the measured runs).
fn measure<'a>(
    drips: &mut [Drip],
    names: &[&'a str],
    warm: bool,
) -> (BTreeMap<&'a str, Vec<f64>>, Vec<f64>) {
    let mut per: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut sent = Vec::new();
    for measured in std::iter::repeat_n(false, usize::from(warm)).chain((0..runs()).map(|_| true)) {
        bpf_stats(measured);
        let before = prog_stats();
        for d in drips.iter_mut() {
            d.start(if measured { RUN_S } else { "1" });
        }
        let total: f64 = drips.iter_mut().map(Drip::sent).sum();
        let after = prog_stats();
        if measured {
            record_cost(&mut per, names, &before, &after);
            sent.push(total);
        }
    }
    bpf_stats(false);
    (per, sent)
}

/// Each direction's floor.
const FLOORS: [(&str, &str, &str); 2] = [
    ("tc_egress", "floor_out", "reader_out"),
    ("tc_ingress", "floor_in", "reader_in"),
];

/// The second pass's rows: the header reader over the floor, and the agent's classifiers
/// over the floor once the reader has touched the headers.
fn report_read_ahead(report: &mut Report, case: &str, per: &BTreeMap<&str, Vec<f64>>) {
    for (prog, floor, reader) in FLOORS {
        for (n, what) in [
            (reader, "a two-byte header read, first on the hook,"),
            (prog, "with the headers read ahead of it,"),
        ] {
            if let Some(s) = over_floor(per, n, floor) {
                report.add(
                    "established",
                    format!("{case}: {what} {n} over the floor"),
                    "ns/pkt",
                    s,
                    None,
                );
            }
        }
    }
}

/// A case's rows: segments a run, the agent's count against the connections, the floor,
/// each classifier over it.
fn report_case(
    report: &mut Report,
    (case, n, target): (&str, u32, Target),
    per: &BTreeMap<&str, Vec<f64>>,
    sent: Vec<f64>,
    (created, tracked): (f64, f64),
) {
    let section = "established";
    report.add(
        section,
        format!("{case}: segments written a run"),
        "pkts",
        stat(sent),
        None,
    );
    report.add(
        section,
        format!("{case}: TCP flows created and tracked by the agent - {n} connections"),
        "flows",
        stat(vec![created, tracked]),
        Some(("0 and 0".into(), created == 0.0 && tracked == 0.0)),
    );
    for (prog, floor, _) in FLOORS {
        let Some(f) = per.get(floor).cloned() else {
            continue;
        };
        report.add(
            section,
            format!("{case}: floor, empty classifier ({floor})"),
            "ns",
            stat(f),
            None,
        );
        let Some(s) = over_floor(per, prog, floor) else {
            continue;
        };
        let (shown, unit, check) = match target {
            Target::Ns(t) => (s, "ns/pkt", (format!("<= {t} ns"), s.median <= t)),
            Target::Ratio(r) => {
                let ratio = stat(
                    per[prog]
                        .iter()
                        .zip(&per[floor])
                        .map(|(x, f)| (x - f) / f)
                        .collect(),
                );
                (
                    ratio,
                    "x floor",
                    (format!("<= {r}x the floor"), ratio.median <= r),
                )
            }
        };
        report.add(
            section,
            format!("{case}: {prog} over the floor"),
            unit,
            shown,
            Some(check),
        );
    }
}
