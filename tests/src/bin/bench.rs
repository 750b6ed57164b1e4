//! `cargo xtask bench`: what the agent costs, measured on the simulated node. Every
//! figure is the median of several runs, with min and max; the machine is shared.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::similar_names
)]

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    Agent, Netns, SimNode,
    dns::{OK_NAME, Resolver},
    floor::{BPF_TCX_EGRESS, BPF_TCX_INGRESS, FloorClassifier, FloorTracepoint},
    sh,
};
use serde_json::Value;

/// Median, min and max of several runs.
#[derive(Clone, Copy, Debug)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(mut v: Vec<f64>) -> Stat {
    assert!(!v.is_empty());
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    };
    Stat {
        median,
        min: v[0],
        max: v[n - 1],
    }
}

/// One line of the report.
struct Row {
    section: &'static str,
    name: String,
    unit: &'static str,
    stat: Stat,
    target: Option<(String, bool)>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
}

impl Report {
    fn add(
        &mut self,
        section: &'static str,
        name: impl Into<String>,
        unit: &'static str,
        stat: Stat,
        target: Option<(String, bool)>,
    ) {
        let row = Row {
            section,
            name: name.into(),
            unit,
            stat,
            target,
        };
        let t = row
            .target
            .as_ref()
            .map(|(t, met)| format!("  [{t}: {}]", if *met { "met" } else { "NOT met" }))
            .unwrap_or_default();
        println!(
            "{:<10} {:<52} {:>12.2} {:<8} (min {:.2}, max {:.2}){t}",
            row.section, row.name, row.stat.median, row.unit, row.stat.min, row.stat.max
        );
        self.rows.push(row);
    }
}

/// A count from the environment (at least 1), else `default`.
fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .max(1)
}

fn runs() -> usize {
    env_count("BENCH_RUNS", 5)
}

/// (`run_time_ns`, `run_cnt`) of every loaded program, by name; needs `kernel.bpf_stats_enabled`.
fn prog_stats() -> ProgStats {
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

type ProgStats = BTreeMap<String, (u64, u64)>;

/// Adds each program's nanoseconds per run between two `prog_stats` readings.
fn record_cost<'a>(
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

/// Sends 64-byte datagrams from `ns` to `dst` as fast as one thread can, for `dur`,
/// cycling over `ports` destination ports from one socket: that many flows, their
/// packets interleaved.
fn blast(ns: &Netns, dst: SocketAddr, ports: u16, dur: Duration) -> std::thread::JoinHandle<u64> {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: a namespace fd; only this thread changes namespace.
        assert_eq!(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) },
            0
        );
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        let payload = [0u8; 22]; // 14 + 20 + 8 + 22 = 64 bytes on the wire
        let end = Instant::now() + dur;
        let mut n = 0u64;
        let mut to = dst;
        while Instant::now() < end {
            for _ in 0..256 {
                to.set_port(dst.port() + (n % u64::from(ports)) as u16);
                if sock.send_to(&payload, to).is_ok() {
                    n += 1;
                }
            }
        }
        n
    })
}

fn bpf_stats(on: bool) {
    sh(Command::new("sysctl").args([
        "-q",
        "-w",
        &format!("kernel.bpf_stats_enabled={}", u8::from(on)),
    ]));
}

/// The interface index of `dev` as `ns` sees it.
fn ifindex(ns: &Netns, dev: &str) -> u32 {
    // "N: eth0@ifM: ..."
    ns.ip(&format!("-o link show dev {dev}"))
        .split(':')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Empty classifiers on both directions of `dev`, beside the agent's: the floor.
fn floor_classifiers(ns: &Netns, dev: &str) -> (FloorClassifier, FloorClassifier) {
    let ifindex = ifindex(ns, dev);
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
fn over_floor(per: &BTreeMap<&str, Vec<f64>>, n: &str, floor: &str) -> Option<Stat> {
    let (v, f) = (per.get(n)?, per.get(floor)?);
    Some(stat(v.iter().zip(f).map(|(x, f)| x - f).collect()))
}

/// Flows interleaved on the busy case: each packet of a different flow than the last.
const INTERLEAVED_FLOWS: u16 = 2000;

/// Section 1, cost per packet of the classifiers and per drop of `kfree_skb`, beside empty
/// programs on the same events in the same run: one flow each way, then 2000 flows each
/// way with their packets interleaved, every packet to a closed port (a drop).
fn program_cost(report: &mut Report) {
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let _agent = Agent::start(&sim.node, &["--device", "eth0"]);
    let floor_tc = floor_classifiers(&sim.node, "eth0");
    let floor_tp = sim
        .node
        .run(|| FloorTracepoint::attach("kfree_skb").expect("attaching the floor tracepoint"));
    bpf_stats(true);
    let names = [
        "tc_ingress",
        "tc_egress",
        "kfree_skb",
        "floor_tc",
        "floor_tp",
    ];
    for (case, flows) in [("1 flow", 1), ("2000 flows", INTERLEAVED_FLOWS)] {
        let mut per: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for _ in 0..runs() {
            let before = prog_stats();
            let a = blast(
                &sim.vpc,
                SocketAddr::new(eth0.node_v4.parse().unwrap(), 20_000),
                flows,
                Duration::from_secs(2),
            );
            let b = blast(
                &sim.node,
                SocketAddr::new(eth0.vpc_v4.parse().unwrap(), 20_000),
                flows,
                Duration::from_secs(2),
            );
            a.join().unwrap();
            b.join().unwrap();
            let after = prog_stats();
            record_cost(&mut per, &names, &before, &after);
        }
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
        let target = if flows == 1 { 40.0 } else { 80.0 };
        for n in ["tc_ingress", "tc_egress"] {
            if let Some(s) = over_floor(&per, n, "floor_tc") {
                report.add(
                    "programs",
                    format!("{case}: {n} over the floor"),
                    "ns/pkt",
                    s,
                    Some((format!("<= {target} ns"), s.median <= target)),
                );
            }
        }
        if let Some(s) = over_floor(&per, "kfree_skb", "floor_tp") {
            report.add(
                "programs",
                format!("{case}: kfree_skb over the floor"),
                "ns/drop",
                s,
                Some(("<= 150 ns".into(), s.median <= 150.0)),
            );
        }
    }
    bpf_stats(false);
    drop((floor_tc, floor_tp));
}

/// Alternations of the packet-rate measure, each a second with and a second without.
fn rate_rounds() -> usize {
    env_count("BENCH_RATE_ROUNDS", 15)
}

fn iperf_pps(node: &Netns, server: &str) -> f64 {
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
fn packet_rate(report: &mut Report) {
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

fn dnsperf(node: &Netns, server: &str, queryfile: &str) -> BTreeMap<String, f64> {
    let out = sh(node.command("dnsperf").args([
        "-s", server, "-d", queryfile, "-l", "5", "-q", "500", "-t", "2",
    ]));
    let mut m = BTreeMap::new();
    for line in out.lines() {
        let line = line.trim();
        for key in [
            "Queries sent",
            "Queries completed",
            "Queries lost",
            "Queries per second",
        ] {
            if let Some(rest) = line.strip_prefix(key).and_then(|r| r.strip_prefix(':')) {
                let n = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0.0);
                m.insert(key.to_owned(), n);
            }
        }
    }
    m
}

/// Each run's figures of the DNS load, one vector a figure.
#[derive(Default)]
struct DnsRuns {
    rates: Vec<f64>,
    sent_diff: Vec<f64>,
    answered_diff: Vec<f64>,
    unanswered_diff: Vec<f64>,
    drops: Vec<f64>,
    full: Vec<f64>,
}

/// 3. DNS at the resolver's highest rate: the agent's counts against dnsperf's.
fn dns_load(report: &mut Report) -> f64 {
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let _resolver = Resolver::start(&sim.vpc, &[eth0.vpc_v4.parse().unwrap()]);
    let agent = Agent::start(&sim.node, &["--device", "eth0", "--dns-timeout", "2s"]);
    let floor = floor_classifiers(&sim.node, "eth0");
    let queryfile = std::env::temp_dir().join("eni-monitor-bench-queries");
    std::fs::write(&queryfile, format!("{OK_NAME} A\n")).unwrap();
    let mut r = DnsRuns::default();
    let cpu_before = cpu_seconds(agent.pid());
    let started = Instant::now();
    let mut per_dns_packet: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    bpf_stats(true);
    for _ in 0..runs() {
        let before = agent.scrape(&sim.node);
        let progs_before = prog_stats();
        let d = dnsperf(&sim.node, &eth0.vpc_v4, queryfile.to_str().unwrap());
        let progs_after = prog_stats();
        record_cost(
            &mut per_dns_packet,
            &["tc_ingress", "tc_egress", "floor_tc"],
            &progs_before,
            &progs_after,
        );
        // Past the agent's timeout, so that every lost query has been swept.
        std::thread::sleep(Duration::from_millis(2500));
        let after = agent.scrape(&sim.node);
        let delta = |name: &str| {
            after.sum(name, &[("device", "eth0")]) - before.sum(name, &[("device", "eth0")])
        };
        // A response that reached the ENI but was dropped by this kernel (dnsperf's
        // socket full, say) is matched at the ENI and counted as a DNS drop: dnsperf
        // calls it lost, the agent says where it was lost.
        let kernel_drops = delta("eni_monitor_dns_drops_total");
        r.rates.push(d["Queries per second"]);
        r.sent_diff
            .push(delta("eni_monitor_dns_queries_total") - d["Queries sent"]);
        r.answered_diff
            .push(delta("eni_monitor_dns_responses_total") - kernel_drops - d["Queries completed"]);
        r.unanswered_diff
            .push(delta("eni_monitor_dns_unanswered_total") + kernel_drops - d["Queries lost"]);
        r.drops.push(kernel_drops);
        let inflight_full = [("map", "dns_inflight")];
        r.full.push(
            after.sum("eni_monitor_map_full_total", &inflight_full)
                - before.sum("eni_monitor_map_full_total", &inflight_full),
        );
    }
    bpf_stats(false);
    drop(floor);
    let cpu = (cpu_seconds(agent.pid()) - cpu_before) / started.elapsed().as_secs_f64() * 60.0;
    if let Some(v) = per_dns_packet.get("floor_tc") {
        report.add(
            "dns",
            "floor: empty classifier",
            "ns",
            stat(v.clone()),
            None,
        );
    }
    // Queries leave through tc_egress, responses arrive through tc_ingress.
    for (n, what) in [("tc_egress", "query"), ("tc_ingress", "response")] {
        if let Some(s) = over_floor(&per_dns_packet, n, "floor_tc") {
            report.add(
                "dns",
                format!("{n} over the floor, per DNS {what}"),
                "ns/pkt",
                s,
                Some(("<= 300 ns".into(), s.median <= 300.0)),
            );
        }
    }
    let rate = stat(r.rates);
    report.add("dns", "dnsperf rate reached", "q/s", rate, None);
    report.add(
        "dns",
        "responses dropped by the node's kernel",
        "queries",
        stat(r.drops),
        None,
    );
    let s = stat(r.full);
    report.add(
        "dns",
        "queries the in-flight table had no room for",
        "queries",
        s,
        Some(("0".into(), s.max == 0.0)),
    );
    exact(
        report,
        [
            ("queries: agent - dnsperf sent", r.sent_diff),
            (
                "responses - kernel drops: agent - dnsperf completed",
                r.answered_diff,
            ),
            (
                "unanswered + kernel drops: agent - dnsperf lost",
                r.unanswered_diff,
            ),
        ],
    );
    let _ = std::fs::remove_file(queryfile);
    cpu
}

/// Rows whose every run must be 0: the agent's counts against dnsperf's.
fn exact(report: &mut Report, rows: [(&str, Vec<f64>); 3]) {
    for (what, v) in rows {
        let s = stat(v);
        report.add(
            "dns",
            what,
            "queries",
            s,
            Some(("0 (exact)".into(), s.min == 0.0 && s.max == 0.0)),
        );
    }
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15; here counted from field 3.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The agent's own account of its kernel maps' memory.
fn map_mib(agent: &Agent, ns: &integration_tests::Netns) -> f64 {
    agent
        .scrape(ns)
        .get("eni_monitor_kernel_map_memory_bytes", &[])
        .unwrap()
        / 1024.0
        / 1024.0
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    kb / 1024.0
}

/// 4. The agent itself: memory, CPU idle, scrape latency with 16 devices.
fn agent_itself(report: &mut Report, cpu_under_dns_load: f64) {
    let mut sim = SimNode::ipv4_only();
    for i in 1..16 {
        sim.add_eni(&format!("eth{i}"));
    }
    let (mut rss, mut maps, mut idle_cpu, mut p50, mut p99) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs() {
        let agent = Agent::start(&sim.node, &["--device", "eth*"]);
        std::thread::sleep(Duration::from_millis(500));
        rss.push(rss_mib(agent.pid()));
        maps.push(map_mib(&agent, &sim.node));
        let c0 = cpu_seconds(agent.pid());
        std::thread::sleep(Duration::from_secs(6));
        idle_cpu.push((cpu_seconds(agent.pid()) - c0) * 10.0);
        let addr = agent.listen;
        let mut lat: Vec<f64> = sim.node.run(move || {
            (0..1000)
                .map(|_| {
                    let t = Instant::now();
                    let mut s = std::net::TcpStream::connect(addr).unwrap();
                    std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
                    let mut body = Vec::new();
                    std::io::Read::read_to_end(&mut s, &mut body).unwrap();
                    assert!(body.len() > 1000);
                    t.elapsed().as_secs_f64() * 1000.0
                })
                .collect()
        });
        lat.sort_by(f64::total_cmp);
        p50.push(lat[lat.len() / 2]);
        p99.push(lat[lat.len() * 99 / 100]);
    }
    let r = stat(rss);
    report.add(
        "agent",
        "RSS after start (16 devices)",
        "MiB",
        r,
        Some(("<= 30 MiB".into(), r.median <= 30.0)),
    );
    // The maps are charged to the pod's memory cgroup as much as the RSS is.
    let m = stat(maps);
    report.add(
        "agent",
        "kernel map memory, idle (16 devices)",
        "MiB",
        m,
        Some(("<= 16 MiB".into(), m.median <= 16.0)),
    );
    report.add("agent", "CPU idle", "s/min", stat(idle_cpu), None);
    report.add(
        "agent",
        "CPU under the DNS load",
        "s/min",
        stat(vec![cpu_under_dns_load]),
        None,
    );
    report.add(
        "agent",
        "/metrics scrape p50 (16 devices)",
        "ms",
        stat(p50),
        None,
    );
    let s = stat(p99);
    report.add(
        "agent",
        "/metrics scrape p99 (16 devices)",
        "ms",
        s,
        Some(("<= 5 ms".into(), s.median <= 5.0)),
    );
}

/// Sends one datagram to each of `ports` on each of `addrs` from one socket in `ns`:
/// that many distinct flows.
fn many_flows(ns: &Netns, addrs: Vec<std::net::IpAddr>, ports: std::ops::RangeInclusive<u16>) {
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
fn flow_table(report: &mut Report) {
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
            rss_mib(agent.pid())
        })
        .collect();
    let r = stat(rss);
    report.add(
        "flows",
        "agent RSS with 1M flows tracked",
        "MiB",
        r,
        Some(("<= 30 MiB".into(), r.median <= 30.0)),
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

fn machine() -> Vec<(&'static str, String)> {
    let first = |cmd: &mut Command| {
        String::from_utf8_lossy(&cmd.output().map(|o| o.stdout).unwrap_or_default())
            .trim()
            .to_owned()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    vec![
        ("kernel", first(Command::new("uname").arg("-r"))),
        ("cpu", cpu),
        (
            "cores",
            std::thread::available_parallelism()
                .map(|n| n.to_string())
                .unwrap_or_default(),
        ),
        (
            "commit",
            first(Command::new("git").args(["rev-parse", "--short", "HEAD"])),
        ),
        ("runs", runs().to_string()),
    ]
}

fn write_reports(report: &Report, machine: &[(&str, String)]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let rows: Vec<Value> = report
        .rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "section": r.section, "name": r.name, "unit": r.unit,
                "median": r.stat.median, "min": r.stat.min, "max": r.stat.max,
                "target": r.target.as_ref().map(|t| &t.0), "met": r.target.as_ref().map(|t| t.1),
            })
        })
        .collect();
    let m: serde_json::Map<String, Value> = machine
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::from(v.as_str())))
        .collect();
    let json = serde_json::json!({ "machine": m, "results": rows });
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    let mut md = String::from("# eni-monitor benchmark\n\n");
    for (k, v) in machine {
        let _ = writeln!(md, "- {k}: {v}");
    }
    md.push_str("\n| section | measure | median | unit | min | max | target |\n|---|---|---:|---|---:|---:|---|\n");
    for r in &report.rows {
        let t = r
            .target
            .as_ref()
            .map(|(t, met)| format!("{t}: {}", if *met { "met" } else { "not met" }))
            .unwrap_or_default();
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {} | {:.2} | {:.2} | {t} |",
            r.section, r.name, r.stat.median, r.unit, r.stat.min, r.stat.max
        );
    }
    std::fs::write(dir.join("report.md"), md).unwrap();
    println!("\nwrote {}/report.json and report.md", dir.display());
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("error: the benchmark needs root (network namespaces, eBPF)");
        std::process::exit(1);
    }
    let machine = machine();
    for (k, v) in &machine {
        println!("{k}: {v}");
    }
    let mut report = Report::default();
    // BENCH_ONLY=dns,agent runs a subset while working on one part.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let want = |s: &str| only.is_empty() || only.split(',').any(|o| o == s);
    if want("programs") {
        program_cost(&mut report);
    }
    if want("rate") {
        packet_rate(&mut report);
    }
    let cpu = if want("dns") {
        dns_load(&mut report)
    } else {
        0.0
    };
    if want("agent") {
        agent_itself(&mut report, cpu);
    }
    if want("flows") {
        flow_table(&mut report);
    }
    write_reports(&report, &machine);
}
