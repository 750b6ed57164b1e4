//! Nothing silent, nothing racing: a burst of scrapes, devices that come, go and are
//! renamed a hundred times, and a machine that is not EC2.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::float_cmp)]

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    Agent, BpfState, Scrape, SimNode, addr, dns, floor::FloorClassifier, monitor_bin, require_root,
    send_udp, sh,
};

const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

#[test]
fn a_thousand_concurrent_scrapes_are_all_answered() {
    if !require_root("a_thousand_concurrent_scrapes_are_all_answered") {
        return;
    }
    // The test holds 1000 connections too.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain rlimit calls on a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit);
    }
    let sim = SimNode::ipv4_only();
    let agent = Agent::start(&sim.node, &["--device", "eth0"]);
    let at = agent.listen;
    // From 100 addresses of the node's loopback, ten each: the agent holds one address to
    // a share of its connections, as a pod has one address.
    let answered = sim.node.run(move || {
        let conns: Vec<TcpStream> = (0..1000u32)
            .map(|i| {
                let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .unwrap();
                let from =
                    std::net::SocketAddr::from(([127, 0, 1, u8::try_from(1 + i / 10).unwrap()], 0));
                sock.bind(&from.into()).unwrap();
                sock.connect_timeout(&at.into(), Duration::from_secs(5))
                    .unwrap();
                // The request follows its connect, as a scraper's does: a connection
                // that sends no request within the agent's header timeout (5 s) is closed.
                let mut c = TcpStream::from(sock);
                c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
                c
            })
            .collect();
        conns
            .into_iter()
            .enumerate()
            .filter_map(|(i, mut c)| {
                c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut body = String::new();
                let read = c.read_to_string(&mut body);
                let ok = read.is_ok()
                    && body.starts_with("HTTP/1.")
                    && body.contains(" 200 OK")
                    && body.contains("eni_monitor_build_info");
                (!ok).then(|| format!("{i}: {read:?} {:?}", body.lines().next()))
            })
            .collect::<Vec<_>>()
    });
    assert!(
        answered.is_empty(),
        "{} unanswered: {:?}",
        answered.len(),
        &answered[..answered.len().min(20)]
    );
    assert_eq!(agent.get(&sim.node, "/healthz").unwrap().0, 200);
    assert!(
        !agent.log_text().contains("accepting a connection"),
        "{}",
        agent.log_text()
    );
}

fn devices_in(s: &Scrape, metric: &str) -> Vec<String> {
    let mut d: Vec<String> = s
        .matching(metric, &[])
        .filter_map(|(l, _)| l.get("device").cloned())
        .filter(|d| !d.is_empty())
        .collect();
    d.sort();
    d.dedup();
    d
}

/// Entries of the pinned `MONITORED` map: the device slots in use.
fn monitored(state: &BpfState) -> usize {
    pinned_keys(state, "MONITORED")
}

/// Entries of the pinned map `name`.
fn pinned_keys(state: &BpfState, name: &str) -> usize {
    pinned_dump(state, name).len()
}

/// The pinned map `name` as bpftool dumps it.
fn pinned_dump(state: &BpfState, name: &str) -> Vec<serde_json::Value> {
    let pin = std::fs::read_dir(state.dir())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join(name);
    let out = sh(Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pin));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array().unwrap().clone()
}

/// Keys of a device in the per-device maps (drops, DNS counts and latencies): those
/// whose first word, the interface index, is not `other`'s 0.
fn device_keys(state: &BpfState) -> [usize; 3] {
    ["DROPS", "DNS_COUNTS", "DNS_LATENCY"].map(|m| {
        pinned_dump(state, m)
            .iter()
            .filter(|e| {
                e["key"].as_array().unwrap()[..4]
                    .iter()
                    .any(|b| b.as_str() != Some("0x00"))
            })
            .count()
    })
}

/// An ENI's life, the n-th (`eth{n+1}`, a name of its own, as EKS gives): attached, a
/// DNS query out through it, a DNS packet to a closed port dropped on it, and gone.
fn life(sim: &mut SimNode, agent: &Agent, n: usize) {
    let device = format!("eth{}", n + 1);
    let eni = sim.add_eni(&device);
    let (node, vpc) = (eni.node_v4.clone(), eni.vpc_v4.clone());
    agent.scrape_until(&sim.node, &format!("{device} attached"), |s| {
        s.get(
            "eni_monitor_program_attached",
            &[
                ("program", "tc_egress"),
                ("hook", "tc/egress"),
                ("device", &device),
            ],
        ) == Some(1.0)
    });
    send_udp(
        &sim.node,
        addr(&vpc, 53),
        1,
        &dns::query_packet(dns::OK_NAME, 1),
    );
    send_udp(&sim.vpc, addr(&node, 53), 1, b"closed");
    let counts = |s: &Scrape| {
        [
            "eni_monitor_dns_queries_total",
            "eni_monitor_dns_drops_total",
        ]
        .map(|m| s.sum(m, &[("device", &device)]))
    };
    let s = agent.scrape_until(&sim.node, &format!("{device} counted"), |s| {
        counts(s).iter().all(|n| *n >= 1.0)
    });
    let before = counts(&s);
    sim.node.ip(&format!("link del {device}"));
    // Gone: its counters end where they were, rather than vanish.
    let s = agent.scrape_until(&sim.node, &format!("{device} gone"), |s| {
        s.matching("eni_monitor_device_info", &[("device", &device)])
            .next()
            .is_none()
    });
    assert_eq!(counts(&s), before, "{}", s.text);
}

#[test]
fn eni_churn_across_a_restart_leaves_no_keys_behind() {
    if !require_root("eni_churn_across_a_restart_leaves_no_keys_behind") {
        return;
    }
    let mut sim = SimNode::ipv4_only();
    let state = BpfState::new(&format!("churn-{}", std::process::id()));
    let args = ["--device", "eth*"];
    let mut agent = Agent::start_with_state(&sim.node, &args, &state);
    let idle = device_keys(&state);
    for n in 0..10 {
        life(&mut sim, &agent, n);
    }
    let busy = device_keys(&state);
    // Each ENI left a drop's key and a query's key (the latency map holds answered
    // queries only, and none was).
    assert!(
        busy[0] >= idle[0] + 10 && busy[1] >= idle[1] + 10,
        "{idle:?} {busy:?}"
    );
    // Killed with ten ENIs' keys left, and ten more under the next agent.
    agent.kill();
    agent = Agent::start_with_state(&sim.node, &args, &state);
    for n in 10..20 {
        life(&mut sim, &agent, n);
    }
    // A minute after, every gone ENI's keys are deleted: what is left is eth0's and
    // other's, as before the churn, and the gone ENIs' counters have ended.
    // (Scrapes find them gone, and delete them a minute after.)
    std::thread::sleep(monitor::devices::LINGER + Duration::from_secs(2));
    agent.scrape(&sim.node);
    let s = agent.scrape(&sim.node);
    let mut named: Vec<&str> = s
        .text
        .split("device=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .filter(|d| !d.is_empty())
        .collect();
    named.sort_unstable();
    named.dedup();
    assert_eq!(named, ["eth0", "other"], "{}", s.text);
    let after = device_keys(&state);
    assert_eq!(
        after,
        idle,
        "{:?}\n{:?}\n{}",
        pinned_dump(&state, "DROPS"),
        pinned_dump(&state, "DNS_COUNTS"),
        s.text
    );
    assert_eq!(agent.get(&sim.node, "/readyz").unwrap().0, 200);
}

#[test]
fn a_hundred_add_rename_remove_cycles_leave_nothing_behind() {
    if !require_root("a_hundred_add_rename_remove_cycles_leave_nothing_behind") {
        return;
    }
    let mut sim = SimNode::ipv4_only();
    let state = BpfState::new(&format!("cycles-{}", std::process::id()));
    let agent = Agent::start_with_state(&sim.node, &["--device", "eth*,ens*"], &state);
    let attached = |device: &str, s: &Scrape| {
        s.get(
            "eni_monitor_program_attached",
            &[
                ("program", "tc_ingress"),
                ("hook", "tc/ingress"),
                ("device", device),
            ],
        ) == Some(1.0)
    };

    // Once slowly, to see each step: attached, renamed in place (udev), removed.
    sim.add_eni("eth1");
    agent.scrape_until(&sim.node, "eth1 attached", |s| attached("eth1", s));
    for cmd in [
        "link set eth1 down",
        "link set eth1 name ens6",
        "link set ens6 up",
    ] {
        sim.node.ip(cmd);
    }
    let s = agent.scrape_until(&sim.node, "eth1 renamed ens6", |s| {
        attached("ens6", s) && !s.text.contains("device=\"eth1\"")
    });
    assert_eq!(devices_in(&s, "eni_monitor_device_info"), ["ens6", "eth0"]);
    sim.node.ip("link del ens6");
    agent.scrape_until(&sim.node, "ens6 gone", |s| {
        devices_in(s, "eni_monitor_device_info") == ["eth0"]
    });

    // Then 99 times as fast as the kernel will do it.
    let started = Instant::now();
    for _ in 1..100 {
        sim.node.ip("link add eth1 type veth peer name peer1");
        sim.node.ip("link set eth1 name ens6");
        sim.node.ip("link del ens6");
    }
    eprintln!("99 cycles in {:?}", started.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    let s = agent.scrape(&sim.node);
    for metric in [
        "eni_monitor_device_info",
        "eni_monitor_program_attached",
        "eni_monitor_tracked_flows",
    ] {
        assert_eq!(devices_in(&s, metric), ["eth0"], "{metric}: {}", s.text);
    }
    // Counters of the devices gone stay a minute, one series a name at most.
    let mut counters = devices_in(&s, "eni_monitor_linklocal_packets_total");
    counters.retain(|d| !["ens6", "eth1"].contains(&d.as_str()));
    assert_eq!(counters, ["eth0"], "{}", s.text);
    assert_eq!(monitored(&state), 1, "a slot left behind");
    for hook in [BPF_TCX_INGRESS, BPF_TCX_EGRESS] {
        assert_eq!(Agent::tcx_programs(&sim.node, "eth0", hook), 1);
    }
    // And a device after all that is watched as the first one was.
    sim.add_eni("eth2");
    agent.scrape_until(&sim.node, "eth2 attached", |s| attached("eth2", s));
    assert_eq!(monitored(&state), 2);
    assert_eq!(agent.get(&sim.node, "/readyz").unwrap().0, 200);
}

#[test]
fn off_ec2_the_metadata_service_is_never_called() {
    if !require_root("off_ec2_the_metadata_service_is_never_called") {
        return;
    }
    let vendor =
        |f: &str| std::fs::read_to_string(format!("/sys/class/dmi/id/{f}")).unwrap_or_default();
    if vendor("sys_vendor").contains("Amazon EC2") || vendor("board_vendor").contains("Amazon EC2")
    {
        eprintln!("skipping: this machine is an EC2 instance, where IMDS is called by design");
        return;
    }
    let sim = SimNode::ipv4_only();
    // A route that would carry any IMDS request out through the ENI, where the
    // classifier counts it.
    sim.node.ip("route add 169.254.169.254/32 dev eth0");
    let state = BpfState::new(&format!("offec2-{}", std::process::id()));
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &sim.node.name])
        .arg(monitor_bin())
        .args([
            "--listen",
            "127.0.0.1:9435",
            "--device",
            "eth0",
            "--state-dir",
        ])
        .arg(state.dir());
    let mut agent = Agent::start_command(&sim.node, command);
    std::thread::sleep(Duration::from_secs(3));
    let s = agent.scrape(&sim.node);
    assert_eq!(
        s.get(
            "eni_monitor_linklocal_packets_total",
            &[("device", "eth0"), ("service", "imds")]
        ),
        Some(0.0),
        "{}",
        s.text
    );
    assert!(agent.stop().success());
    let log = agent.log_text();
    assert_eq!(log.matches("not an EC2 instance (DMI)").count(), 1, "{log}");
    assert!(!log.contains("IMDS:"), "{log}");
}

#[test]
fn a_device_that_refuses_the_first_attach_is_attached_later_without_a_restart() {
    if !require_root("a_device_that_refuses_the_first_attach_is_attached_later_without_a_restart") {
        return;
    }
    let sim = SimNode::ipv4_only();
    // eth0's egress hook full (as many programs as TCX takes), and a clsact qdisc whose
    // filter blocks are shared, which takes no filter by device: the egress attach fails
    // every way the agent can make it.
    let ifindex = sim.node.ifindex("eth0");
    let mut blockers = sim.node.run(move || {
        let mut held = Vec::new();
        loop {
            match FloorClassifier::attach(ifindex, BPF_TCX_EGRESS) {
                Ok(p) => held.push(p),
                Err(e) if e.raw_os_error() == Some(libc::ERANGE) => return held,
                Err(e) => panic!("filling eth0's egress hook: {e}"),
            }
        }
    });
    assert!(blockers.len() >= 60, "{}", blockers.len());
    sh(sim
        .node
        .command("tc")
        .args(["qdisc", "add", "dev", "eth0", "ingress_block", "10"])
        .args(["egress_block", "20", "clsact"]));
    let agent = Agent::start(&sim.node, &["--device", "eth0"]);
    let egress = [("program", "tc_egress"), ("device", "eth0")];
    let s = agent.scrape(&sim.node);
    assert_eq!(
        s.sum("eni_monitor_program_attached", &egress),
        0.0,
        "{}",
        agent.log_text()
    );
    let (code, body) = agent.get(&sim.node, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("tc/egress on eth0"), "{body}");

    // Room on the hook again: the agent attaches on its next try, with no restart.
    blockers.pop();
    agent.scrape_until(&sim.node, "tc_egress attached on a later try", |s| {
        s.sum("eni_monitor_program_attached", &egress) == 1.0
    });
    assert_eq!(
        agent.get(&sim.node, "/readyz").unwrap(),
        (200, "ready\n".to_owned())
    );
    let log = agent.log_text();
    assert_eq!(
        log.matches("eth0: every hook attached on a later try")
            .count(),
        1,
        "{log}"
    );
    // The ingress hook, attached at once, was never detached for the retry.
    assert_eq!(
        log.matches("attached tc/ingress on eth0").count(),
        1,
        "{log}"
    );
    drop(blockers);
}
