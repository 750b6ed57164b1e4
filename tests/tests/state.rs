//! State that survives the agent: a killed or upgraded agent's successor continues its
//! tracked flows and counters from the maps pinned in bpffs, with one program per hook.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::float_cmp)]

use std::{process::Command, time::Duration};

use monitor::{
    kernel::{self, KernelFacts},
    loader::Sizes,
};

use integration_tests::{
    Agent, BpfState, Scrape, SimNode, addr, monitor_bin, require_root, send_udp,
    servers::{TcpHold, UdpEcho, tcp_connections, udp_flows},
};

const TRACKED: &str = "eni_monitor_tracked_flows";
const CREATED: &str = "eni_monitor_flows_created_total";
const DROPS: &str = "eni_monitor_drops_total";
const UNANSWERED: &str = "eni_monitor_dns_unanswered_total";
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
/// A standard query for `a.example`.
const QUERY: &[u8] =
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x07example\x00\x00\x01\x00\x01";

/// The figures that must carry over from one agent to the next.
#[derive(Debug, PartialEq)]
struct Carried {
    tracked_tcp: f64,
    created_tcp: f64,
    created_udp: f64,
    drops: f64,
    unanswered: f64,
}

impl Carried {
    fn of(s: &Scrape) -> Self {
        let eth0 = |proto| [("device", "eth0"), ("protocol", proto)];
        Self {
            tracked_tcp: s.sum(TRACKED, &eth0("tcp")),
            created_tcp: s.sum(CREATED, &eth0("tcp")),
            created_udp: s.sum(CREATED, &eth0("udp")),
            drops: s.sum(DROPS, &[("device", "eth0"), ("reason", "NO_SOCKET")]),
            unanswered: s.sum(UNANSWERED, &[("device", "eth0")]),
        }
    }
}

/// The layout directory of this kernel's agent with a flow table of `flows`.
fn layout(flows: u32) -> String {
    let facts = KernelFacts::read(std::path::Path::new(kernel::BTF_PATH)).unwrap();
    monitor::loader::layout(&facts, Sizes::with_flows(flows)).unwrap()
}

/// `monitor cleanup --state-dir dir`: whether it succeeded, and what it logged.
fn cleanup(dir: &std::path::Path) -> (bool, String) {
    let out = Command::new(monitor_bin())
        .args(["cleanup", "--state-dir"])
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Pins a map of another program's at `path`: (key, value) bytes.
fn foreign_map(path: &std::path::Path, key: u32, value: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(path)
        .args([
            "type",
            "array",
            "key",
            &key.to_string(),
            "value",
            &value.to_string(),
        ])
        .args(["entries", "1", "name", &name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn one_program_per_hook(sim: &SimNode) {
    for hook in [BPF_TCX_INGRESS, BPF_TCX_EGRESS] {
        assert_eq!(
            Agent::tcx_programs(&sim.node, "eth0", hook),
            1,
            "hook {hook}"
        );
    }
}

#[test]
fn flows_and_counters_survive_sigkill_and_an_upgrade() {
    if !require_root("flows_and_counters_survive_sigkill_and_an_upgrade") {
        return;
    }
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let _hold = TcpHold::start(&sim.vpc, addr(&eth0.vpc_v4, 8000));
    let _echo = UdpEcho::start(&sim.vpc, addr(&eth0.vpc_v4, 7000));
    let state = BpfState::new(&format!("restart-{}", std::process::id()));
    let args = ["--device", "eth0", "--dns-timeout", "1s"];
    let mut agent = Agent::start_with_state(&sim.node, &args, &state);

    // 40 idle connections: after a restart, EC2 still tracks them for days, and only
    // the pinned table knows them until each sends again.
    let _conns = tcp_connections(&sim.node, addr(&eth0.vpc_v4, 8000), 40);
    assert_eq!(udp_flows(&sim.node, addr(&eth0.vpc_v4, 7000), 10), 10);
    // 3 queries (each from its own socket) to a port nothing answers, 5 datagrams to a
    // closed port on the node.
    for _ in 0..3 {
        send_udp(&sim.node, addr(&eth0.vpc_v4, 53), 1, QUERY);
    }
    send_udp(&sim.vpc, addr(&eth0.node_v4, 9999), 5, b"closed");
    let before = agent.scrape_until(&sim.node, "the traffic counted", |s| {
        let c = Carried::of(s);
        c.tracked_tcp == 40.0 && c.unanswered == 3.0 && c.drops == 5.0
    });
    let expected = Carried {
        tracked_tcp: 40.0,
        created_tcp: 40.0,
        created_udp: Carried::of(&before).created_udp,
        drops: 5.0,
        unanswered: 3.0,
    };
    assert!(expected.created_udp >= 13.0, "{}", before.text);
    assert_eq!(Carried::of(&before), expected);

    // SIGKILL: the successor's first scrape carries everything over.
    agent.kill();
    let mut agent = Agent::start_with_state(&sim.node, &args, &state);
    let after = agent.scrape(&sim.node);
    assert_eq!(Carried::of(&after), expected, "{}", after.text);
    assert_eq!(
        agent.get(&sim.node, "/readyz").unwrap(),
        (200, "ready\n".to_owned())
    );
    one_program_per_hook(&sim);
    assert!(agent.log_text().contains("continuing from the state in"));
    assert!(agent.log_text().contains("eth0 keeps slot 0"));

    // Counting goes on, on top (the datagrams are one more UDP flow, too).
    send_udp(&sim.vpc, addr(&eth0.node_v4, 9999), 2, b"closed");
    let counted = agent.scrape_until(&sim.node, "7 drops", |s| Carried::of(s).drops == 7.0);
    let expected = Carried {
        drops: 7.0,
        created_udp: expected.created_udp + 1.0,
        ..expected
    };
    assert_eq!(Carried::of(&counted), expected, "{}", counted.text);

    // SIGTERM, as a rolling upgrade stops an agent: the same.
    assert!(agent.stop().success());
    let agent = Agent::start_with_state(&sim.node, &args, &state);
    let upgraded = agent.scrape(&sim.node);
    assert_eq!(Carried::of(&upgraded), expected, "{}", upgraded.text);
    one_program_per_hook(&sim);
}

#[test]
fn another_layout_starts_over_and_says_so_and_cleanup_removes_it() {
    if !require_root("another_layout_starts_over_and_says_so_and_cleanup_removes_it") {
        return;
    }
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let state = BpfState::new(&format!("layout-{}", std::process::id()));
    let mut agent = Agent::start_with_state(
        &sim.node,
        &["--device", "eth0", "--flow-table-size", "64"],
        &state,
    );
    send_udp(&sim.vpc, addr(&eth0.node_v4, 9999), 4, b"closed");
    agent.scrape_until(&sim.node, "4 drops", |s| Carried::of(s).drops == 4.0);
    assert!(agent.stop().success());

    // Another table size is another layout: replaced, said once, counts start over.
    let mut agent = Agent::start_with_state(&sim.node, &["--device", "eth0"], &state);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(Carried::of(&agent.scrape(&sim.node)).drops, 0.0);
    assert!(agent.stop().success());
    let log = agent.log_text();
    assert_eq!(
        log.matches(&format!(
            "replacing the state of another layout ({})",
            layout(64)
        ))
        .count(),
        1,
        "{log}"
    );

    // Uninstall: the pins go, and a second cleanup has nothing to do.
    let dir = state.dir();
    assert!(dir.join(layout(262_144)).join("FLOWS").exists());
    let (ok, log) = cleanup(&dir);
    assert!(
        ok && log.contains(&format!("removed {}", dir.display())),
        "{log}"
    );
    assert!(!dir.exists());
    let (ok, log) = cleanup(&dir);
    assert!(ok && log.contains("nothing to remove"), "{log}");
}

#[test]
fn other_programs_pins_are_kept_whatever_the_state_dir_says() {
    if !require_root("other_programs_pins_are_kept_whatever_the_state_dir_says") {
        return;
    }
    let sim = SimNode::ipv4_only();
    let state = BpfState::new(&format!("foreign-{}", std::process::id()));
    let bpffs = state.dir().parent().unwrap().to_path_buf();
    // A CNI's pins at the root of the bpffs, and one in the agent's own directory.
    let theirs = [
        bpffs.join("tc/globals/cni_policy"),
        bpffs.join("aws_node_map"),
        state.dir().join("not_ours"),
    ];
    for path in &theirs {
        foreign_map(path, 4, 4);
    }
    let kept = || theirs.iter().all(|p| p.exists());

    // The root of the bpffs as the state directory: refused, in one line, nothing touched.
    let out = Command::new("ip")
        .args(["netns", "exec", &sim.node.name])
        .arg(monitor_bin())
        .args([
            "--listen",
            "127.0.0.1:9436",
            "--device",
            "eth0",
            "--state-dir",
        ])
        .arg(&bpffs)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is the root of a BPF filesystem"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.contains("ERROR")).count(),
        1,
        "{err}"
    );
    assert!(kept());
    let (ok, log) = cleanup(&bpffs);
    assert!(
        !ok && log.contains("is the root of a BPF filesystem"),
        "{log}"
    );
    assert!(kept());

    // Its own directory: started and stopped, then cleaned up; the others stay.
    let mut agent = Agent::start_with_state(&sim.node, &["--device", "eth0"], &state);
    agent.scrape(&sim.node);
    assert!(agent.stop().success());
    let log = agent.log_text();
    assert!(
        log.contains("not_ours in the state directory: not this agent's"),
        "{log}"
    );
    assert!(kept());
    assert!(state.dir().join(layout(262_144)).join("FLOWS").exists());
    let (ok, log) = cleanup(&state.dir());
    assert!(ok, "{log}");
    assert!(!state.dir().join(layout(262_144)).exists(), "{log}");
    assert!(kept(), "{log}");
}

#[test]
fn a_pinned_map_of_another_shape_is_replaced_not_read() {
    if !require_root("a_pinned_map_of_another_shape_is_replaced_not_read") {
        return;
    }
    let sim = SimNode::ipv4_only();
    let eth0 = sim.eni("eth0");
    let state = BpfState::new(&format!("shape-{}", std::process::id()));
    let mut agent = Agent::start_with_state(&sim.node, &["--device", "eth0"], &state);
    send_udp(&sim.vpc, addr(&eth0.node_v4, 9999), 4, b"closed");
    agent.scrape_until(&sim.node, "4 drops", |s| Carried::of(s).drops == 4.0);
    assert!(agent.stop().success());

    // A release that changed a value's size and kept the map's name and the layout's:
    // the kernel's description of the pinned map says so.
    let dir = state.dir().join(layout(262_144));
    for name in ["HASH_KEYS", "DROPS"] {
        std::fs::remove_file(dir.join(name)).unwrap();
        foreign_map(&dir.join(name), 4, 8);
    }
    let mut agent = Agent::start_with_state(&sim.node, &["--device", "eth0"], &state);
    send_udp(&sim.vpc, addr(&eth0.node_v4, 9999), 2, b"closed");
    // The drop counts start over (their map was replaced); the rest continues.
    agent.scrape_until(&sim.node, "2 drops", |s| Carried::of(s).drops == 2.0);
    assert!(agent.stop().success());
    let log = agent.log_text();
    for name in ["HASH_KEYS", "DROPS"] {
        let line = format!("replacing the pinned map {}", dir.join(name).display());
        assert_eq!(log.matches(&line).count(), 1, "{log}");
    }
    assert!(log.contains("value 8 B, 1 entries"), "{log}");
    assert!(log.contains("continuing from the state in"), "{log}");
}
