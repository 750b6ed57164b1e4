//! The agent itself: CPU, resident memory, kernel map memory, scrape latency.

use std::time::{Duration, Instant};

use crate::report::{Report, runs, stat};
use integration_tests::{Agent, SimNode};

pub(crate) fn cpu_seconds(pid: u32) -> f64 {
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
pub(crate) fn map_mib(agent: &Agent, ns: &integration_tests::Netns) -> f64 {
    agent
        .scrape(ns)
        .get("eni_monitor_kernel_map_memory_bytes", &[])
        .unwrap()
        / 1024.0
        / 1024.0
}

pub(crate) use integration_tests::rss_mib;

/// The part of `pid`'s resident memory that is eBPF maps it mapped (the flow sets, the
/// DNS queries in flight): kernel map memory, charged once, and counted there.
pub(crate) fn mapped_maps_mib(pid: u32) -> f64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut in_map = false;
    let mut kb = 0.0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: range, perms, offset, device, inode, name.
            in_map = line.ends_with("bpf-map");
        } else if in_map && let Some(v) = line.strip_prefix("Rss:") {
            kb += v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or(0.0);
        }
    }
    kb / 1024.0
}

/// The agent's own resident memory: all of it but the maps it mapped.
pub(crate) fn own_rss_mib(pid: u32) -> f64 {
    rss_mib(pid) - mapped_maps_mib(pid)
}

/// 4. The agent itself: memory, CPU idle, scrape latency with 16 devices.
pub(crate) fn agent_itself(report: &mut Report, cpu_under_dns_load: f64) {
    let mut sim = SimNode::ipv4_only();
    for i in 1..16 {
        sim.add_eni(&format!("eth{i}"));
    }
    let (mut rss, mut mapped, mut maps, mut idle_cpu, mut p50, mut p99) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for _ in 0..runs() {
        let agent = Agent::start(&sim.node, &["--device", "eth*"]);
        // Past the first expiry pass, which reads every flow set.
        std::thread::sleep(Duration::from_secs(3));
        rss.push(own_rss_mib(agent.pid()));
        mapped.push(mapped_maps_mib(agent.pid()));
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
        "resident memory after start, its own (16 devices)",
        "MiB",
        r,
        Some(("<= 30 MiB".into(), r.median <= 30.0)),
    );
    report.add(
        "agent",
        "resident memory after start, the maps it maps (kernel map memory)",
        "MiB",
        stat(mapped),
        None,
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
