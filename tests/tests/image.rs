//! The container image, as a user builds it (`cargo xtask image`: buildah, no daemon, no
//! base image), unpacked with umoci and its entrypoint run the way a container runtime
//! runs it: its own root filesystem, `/proc` and `/sys` mounted, the `DaemonSet`'s
//! capabilities only, in the simulated node's network namespace.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::float_cmp)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use integration_tests::{Agent, HOOKS, SimNode, have, require_root, send_udp, sh};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every path under `dir`, relative to it.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let rel = path
            .strip_prefix(dir)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if path.is_dir() {
            out.extend(tree(&path).into_iter().map(|p| format!("{rel}/{p}")));
        }
        out.push(rel);
    }
    out.sort();
    out
}

#[test]
fn the_image_holds_the_agent_alone_and_its_entrypoint_serves_metrics() {
    if !require_root("the_image_holds_the_agent_alone_and_its_entrypoint_serves_metrics") {
        return;
    }
    if !(have("buildah") && have("umoci")) {
        assert!(
            std::env::var_os("CI").is_none(),
            "buildah and umoci are missing: `cargo xtask setup` installs them"
        );
        eprintln!("skipping: buildah or umoci missing (run `cargo xtask setup`)");
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    sh(Command::new(cargo)
        .current_dir(root())
        .args(["xtask", "image"]));

    let version = env!("CARGO_PKG_VERSION");
    let bundle = std::env::temp_dir().join(format!("em-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&bundle);
    let image = format!(
        "{}:eni-monitor:{version}",
        root().join("target/image/oci").display()
    );
    sh(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));

    // The binary and nothing else; it runs as root from /monitor.
    let rootfs = bundle.join("rootfs");
    assert_eq!(tree(&rootfs), ["monitor"]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["process"]["args"], serde_json::json!(["/monitor"]));
    assert_eq!(config["process"]["user"]["uid"], 0);

    // What a runtime adds: mount points for /proc and /sys.
    for dir in ["proc", "sys"] {
        std::fs::create_dir(rootfs.join(dir)).unwrap();
    }
    let sim = SimNode::ipv4_only();
    let args = Agent::default_args(&[]).join(" ");
    let r = rootfs.display();
    // The DaemonSet's capabilities, and CAP_SYS_CHROOT, which the chroot step needs (a
    // runtime enters the root filesystem before it drops capabilities), under the
    // seccomp profile containerd generates for them (`seccompProfile: RuntimeDefault`).
    // bpffs where the DaemonSet mounts the host's, for the state the agent pins.
    let profile =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/seccomp/containerd-default.json");
    let seccomp = env!("CARGO_BIN_EXE_seccomp-exec");
    let p = profile.display();
    let script = format!(
        "mount -t proc proc {r}/proc && mount -t sysfs sysfs {r}/sys && \
         mount -t bpf bpf {r}/sys/fs/bpf && \
         exec {seccomp} {p} \
         setpriv --inh-caps=-all --bounding-set=-all,+bpf,+perfmon,+net_admin,+sys_chroot \
         chroot {r} /monitor {args} --device eth0"
    );
    let mut command = Command::new("ip");
    command.args(["netns", "exec", &sim.node.name, "sh", "-c", &script]);
    let mut agent = Agent::start_command(&sim.node, command);

    // The agent runs under the filter (mode 2), and every hook loaded and attached.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    assert!(status.contains("Seccomp:\t2"), "{status}");
    let s = agent.scrape(&sim.node);
    for (program, device) in HOOKS {
        assert_eq!(
            s.matching(
                "eni_monitor_program_attached",
                &[("program", program), ("device", device)]
            )
            .map(|(_, v)| v)
            .next(),
            Some(1.0),
            "{program}: {}",
            s.text
        );
    }
    let to: SocketAddr = format!("{}:9999", sim.eni("eth0").node_v4).parse().unwrap();
    send_udp(&sim.vpc, to, 6, b"closed port");
    let by_reason = [("device", "eth0"), ("reason", "NO_SOCKET")];
    agent.scrape_until(&sim.node, "6 drops on eth0", |s| {
        s.sum("eni_monitor_drops_total", &by_reason) >= 6.0
    });
    std::thread::sleep(Duration::from_millis(300));
    let s = agent.scrape(&sim.node);
    assert_eq!(
        s.sum("eni_monitor_drops_total", &by_reason),
        6.0,
        "{}",
        s.text
    );
    assert_eq!(
        agent.get(&sim.node, "/readyz").unwrap(),
        (200, "ready\n".to_owned())
    );
    assert!(agent.stop().success(), "{}", agent.log_text());
    std::fs::remove_dir_all(&bundle).unwrap();
}
