//! The golden exposition: the whole `/metrics` of the simulated node after known traffic,
//! compared with `tests/golden/metrics.txt`, values that depend on time or the machine
//! normalised. A renamed metric, label or help text fails here first. Regenerate it with
//! `UPDATE_GOLDEN=1 cargo xtask test --test golden` and review the diff.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::float_cmp)]

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use integration_tests::{
    Agent, SimNode, addr,
    dns::{self, NX_NAME, OK_NAME, Resolver, SERVFAIL_NAME},
    dns_tcp,
    golden::{self, VARIES},
    require_root, send_udp,
    servers::{TcpHold, UdpEcho, tcp_connections, udp_flows},
};

/// Series whose values depend on time or on the machine, not on the test's traffic.
const VARYING: [&str; 8] = [
    "eni_monitor_kernel_map_memory_bytes",
    "eni_monitor_dns_latency_seconds_bucket",
    "eni_monitor_dns_latency_seconds_sum",
    // Two queries a second boundary may split.
    "eni_monitor_linklocal_peak_packets_per_second",
    "eni_monitor_top_linklocal_senders",
    "eni_monitor_nf_conntrack_entries",
    "eni_monitor_nf_conntrack_limit",
    "eni_monitor_udp_receive_queue_drops_total",
];
/// Counted for every namespace of the machine: whatever else runs there shows up under
/// `device="other"`, with reasons of its own.
const MACHINE_WIDE: [&str; 2] = ["eni_monitor_drops_total", "eni_monitor_dns_drops_total"];
const EVENTS: &str = "eni_monitor_nf_conntrack_events_total";
/// The id of the one query whose response the node's firewall drops.
const DROPPED_ID: u16 = 0x0bad;

/// The exposition with what varies replaced by [`VARIES`], and the machine's own drops
/// left out. Help and type lines are kept as they are.
fn normalise(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let name = &line[..line.find(['{', ' ']).unwrap_or(line.len())];
        if MACHINE_WIDE.contains(&name) && line.contains("device=\"other\"") {
            continue;
        }
        let mut line = line.to_owned();
        if let Some(start) = line.find("mac=\"") {
            let end = start + 5 + line[start + 5..].find('"').unwrap();
            line.replace_range(start + 5..end, VARIES);
        }
        if VARYING.contains(&name) || name == EVENTS {
            let cut = line.rfind(' ').unwrap();
            line.replace_range(cut + 1.., VARIES);
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Two queries in one segment over TCP, answered; a TCP connection to the resolver that
/// does not listen on TCP, refused. Both connections closed and forgotten (5 s after
/// their close) before the rest, so that the tracked flows are the held ones.
fn dns_over_tcp(sim: &SimNode, agent: &Agent, resolver: SocketAddr, dead: SocketAddr) {
    let wait = Duration::from_secs(2);
    let answers = dns_tcp::pipelined(&sim.node, resolver, &[&[(OK_NAME, 1), (NX_NAME, 2)]], wait);
    assert_eq!(answers.len(), 2);
    assert_eq!(dns_tcp::connect_attempts(&sim.node, dead, 1, wait), (1, 0));
    let tcp = [("protocol", "tcp")];
    agent.scrape_until(&sim.node, "the DNS connections counted and tracked", |s| {
        s.sum("eni_monitor_dns_tcp_connect_failures_total", &[]) == 1.0
            && s.sum("eni_monitor_dns_responses_total", &[("transport", "tcp")]) == 2.0
            && s.sum("eni_monitor_tracked_flows", &tcp) == 2.0
    });
    agent.scrape_until(&sim.node, "the DNS connections forgotten", |s| {
        s.sum("eni_monitor_tracked_flows", &tcp) == 0.0
    });
}

#[test]
fn the_exposition_is_the_golden_one() {
    if !require_root("the_exposition_is_the_golden_one") {
        return;
    }
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    // Amazon's resolver and a resolver that never answers, both in the VPC.
    sim.vpc.ip("addr add 169.254.169.253/32 dev vpc0");
    sim.node.ip("route add 169.254.169.253/32 dev eth0");
    sim.vpc.ip("addr add 10.200.0.9/32 dev vpc0");
    sim.vpc.nft("table inet dead {\n chain input {\n  type filter hook input priority 0;\n  ip daddr 10.200.0.9 udp dport 53 drop\n }\n}\n");
    // Connection tracking in the node's namespace: its metrics, whatever ran before. And
    // the node's firewall drops the response to one query, by its id (`DROPPED_ID`, the
    // 16 bits after the UDP header): a DNS drop, with the kernel's reason. The classifier
    // on eth0 sees the response before netfilter does, so the query counts answered.
    sim.node.nft(&format!("table inet tracked {{\n chain input {{\n  type filter hook input priority 0;\n  ct state invalid counter\n  udp sport 53 @th,64,16 {DROPPED_ID} drop\n }}\n}}\n"));
    let _resolver = Resolver::start(
        &sim.vpc,
        &[
            eth0.vpc_v4.parse().unwrap(),
            "169.254.169.253".parse().unwrap(),
        ],
    );
    let _echo = UdpEcho::start(&sim.vpc, addr(&eth0.vpc_v4, 7000));
    let _hold = TcpHold::start(&sim.vpc, addr(&eth0.vpc_v4, 8000));
    let agent = Agent::start(
        &sim.node,
        &[
            "--device",
            "eth0",
            "--dns-timeout",
            "1s",
            "--conntrack-allowance",
            "1000",
        ],
    );
    let wait = Duration::from_secs(2);
    let vpc_resolver = addr(&eth0.vpc_v4, 53);
    let dead = addr("10.200.0.9", 53);
    // A resolver's first queries count as other until the agent names it.
    let short = Duration::from_millis(10);
    assert_eq!(
        dns::from_one_socket(&sim.node, vpc_resolver, &[(OK_NAME, 1)], wait),
        1
    );
    assert_eq!(
        dns::from_one_socket(&sim.node, dead, &[(OK_NAME, 1)], short),
        0
    );
    agent.scrape_until(&sim.node, "both resolvers named", |s| {
        ["10.200.0.1", "10.200.0.9"].iter().all(|r| {
            s.get(
                "eni_monitor_dns_resolver_info",
                &[("resolver", r), ("kind", "custom")],
            ) == Some(1.0)
        })
    });
    dns_over_tcp(&sim, &agent, vpc_resolver, dead);
    let names = [(OK_NAME, 5), (NX_NAME, 2), (SERVFAIL_NAME, 1)];
    assert_eq!(
        dns::from_one_socket(&sim.node, vpc_resolver, &names, wait),
        8
    );
    let amazon = addr("169.254.169.253", 53);
    assert_eq!(
        dns::from_one_socket(&sim.node, amazon, &[(OK_NAME, 2)], wait),
        2
    );
    assert_eq!(
        dns::from_one_socket(&sim.node, dead, &[(OK_NAME, 2)], short),
        0
    );
    assert_eq!(udp_flows(&sim.node, addr(&eth0.vpc_v4, 7000), 3), 3);
    let _connections = tcp_connections(&sim.node, addr(&eth0.vpc_v4, 8000), 2);
    send_udp(&sim.vpc, addr(&eth0.node_v4, 9999), 3, b"closed");
    assert_eq!(
        dns::query(&sim.node, vpc_resolver, OK_NAME, DROPPED_ID, short),
        None
    );

    agent.scrape_until(&sim.node, "3 unanswered, 3 drops, 1 DNS drop", |s| {
        s.sum("eni_monitor_dns_unanswered_total", &[]) == 3.0
            && s.get(
                "eni_monitor_drops_total",
                &[("device", "eth0"), ("reason", "NO_SOCKET")],
            ) == Some(3.0)
            && s.get(
                "eni_monitor_dns_drops_total",
                &[("device", "eth0"), ("reason", "NETFILTER_DROP")],
            ) == Some(1.0)
    });
    // An expiry pass after the last packet (one runs every 2.5 s at the default timeouts).
    std::thread::sleep(Duration::from_secs(3));
    let scrape = agent.scrape(&sim.node);
    let now = normalise(&scrape.text);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(golden::path(), &now).unwrap();
        eprintln!("wrote {}", golden::path().display());
        return;
    }
    let golden_text = golden::text();
    if now != golden_text {
        let diff: Vec<String> = diff_lines(&golden_text, &now);
        panic!(
            "/metrics differs from {} (UPDATE_GOLDEN=1 rewrites it; review the diff):\n{}",
            golden::path().display(),
            diff.join("\n")
        );
    }
}

/// The lines only one side has, marked `-` (golden) and `+` (now).
fn diff_lines(want: &str, got: &str) -> Vec<String> {
    let w: BTreeSet<&str> = want.lines().collect();
    let g: BTreeSet<&str> = got.lines().collect();
    w.difference(&g)
        .map(|l| format!("- {l}"))
        .chain(g.difference(&w).map(|l| format!("+ {l}")))
        .collect()
}

#[test]
fn what_the_rules_the_dashboard_and_status_read_is_exported() {
    let exported = golden::series_names(&golden::text());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let read = |path: &str| {
        std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    for (what, path) in [
        ("the alert rules", "deploy/alerts/rules.yml"),
        ("the dashboard", "deploy/grafana/eni-monitor.json"),
        ("monitor status", "monitor/src/status/mod.rs"),
        ("monitor status's sections", "monitor/src/status/screen.rs"),
        ("the runbook", "RUNBOOK.md"),
    ] {
        let used = golden::metric_names(&read(path));
        assert!(!used.is_empty(), "{what} reads no metric?");
        for name in used {
            assert!(
                exported.contains(&name),
                "{what} ({path}) reads {name}, which the golden /metrics does not have"
            );
        }
    }
    // What no query reads is still exported: the golden holds every family.
    for family in [
        "eni_monitor_ena_allowance_exceeded_total",
        "eni_monitor_build_info",
    ] {
        assert!(exported.contains(family), "{family}");
    }
}

#[test]
fn normalising_keeps_descriptors_and_hides_only_what_varies() {
    let text = "# HELP eni_monitor_kernel_map_memory_bytes Kernel memory.\n# TYPE eni_monitor_kernel_map_memory_bytes gauge\neni_monitor_kernel_map_memory_bytes 123\neni_monitor_drops_total{device=\"other\",reason=\"X\"} 9\neni_monitor_drops_total{device=\"eth0\",reason=\"NO_SOCKET\"} 3\neni_monitor_device_info{device=\"eth0\",eni=\"\",mac=\"0e:aa\"} 1\n";
    assert_eq!(
        normalise(text),
        "# HELP eni_monitor_kernel_map_memory_bytes Kernel memory.\n# TYPE eni_monitor_kernel_map_memory_bytes gauge\neni_monitor_kernel_map_memory_bytes <varies>\neni_monitor_drops_total{device=\"eth0\",reason=\"NO_SOCKET\"} 3\neni_monitor_device_info{device=\"eth0\",eni=\"\",mac=\"<varies>\"} 1\n"
    );
}

/// The ENA families' samples, pinned by the collector's unit test on a driver capture
/// (`tests/golden/ena.txt`), are of the families the node exports: each help and type
/// line there is the same in the node's golden exposition, and each family has samples.
#[test]
fn the_ena_golden_is_of_the_nodes_families() {
    let ena = std::fs::read_to_string(golden::path().with_file_name("ena.txt")).unwrap();
    let node = golden::text();
    let descriptors: Vec<&str> = ena.lines().filter(|l| l.starts_with('#')).collect();
    assert!(!descriptors.is_empty());
    for line in &descriptors {
        if line.starts_with("# EOF") {
            continue;
        }
        assert!(
            node.lines().any(|l| l == *line),
            "{line}: not in the node's golden"
        );
    }
    for family in [
        "eni_monitor_ena_allowance_exceeded_total{",
        "eni_monitor_ena_conntrack_allowance_available{",
    ] {
        assert!(ena.contains(family), "no sample of {family} in ena.txt");
    }
}
