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

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The platforms (`os/architecture`) of the OCI layout `oci`'s one reference, an image
/// index tagged `eni-monitor:<version>`, each manifest's platform checked against its
/// config's.
fn platforms(oci: &Path, version: &str) -> Vec<String> {
    let blob = |digest: &serde_json::Value| {
        let digest = digest.as_str().unwrap();
        oci.join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap())
    };
    let top = json(&oci.join("index.json"));
    let refs = top["manifests"].as_array().unwrap();
    assert_eq!(refs.len(), 1, "{top}");
    assert_eq!(
        refs[0]["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{top}"
    );
    assert_eq!(
        refs[0]["annotations"]["org.opencontainers.image.ref.name"],
        format!("eni-monitor:{version}")
    );
    let index = json(&blob(&refs[0]["digest"]));
    let mut platforms: Vec<String> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let manifest = json(&blob(&m["digest"]));
            let config = json(&blob(&manifest["config"]["digest"]));
            assert_eq!(
                config["architecture"], m["platform"]["architecture"],
                "{config}"
            );
            format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap(),
                m["platform"]["architecture"].as_str().unwrap()
            )
        })
        .collect();
    platforms.sort();
    platforms
}

/// The image of `arch` as a runtime of that architecture pulls it from the index
/// (`skopeo` picks it), unpacked with umoci: the static agent alone, run as root from
/// /monitor. The bundle, in a directory of its own.
fn unpack(image: &str, arch: &str) -> PathBuf {
    let single = std::env::temp_dir().join(format!("em-image-{arch}-{}", std::process::id()));
    let bundle = single.join("bundle");
    let _ = std::fs::remove_dir_all(&single);
    std::fs::create_dir_all(&single).unwrap();
    sh(Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--override-os",
            "linux",
            "--override-arch",
            arch,
        ])
        .arg(format!("oci:{image}"))
        .arg(format!("oci:{}:one", single.join("oci").display())));
    sh(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:one", single.join("oci").display()))
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    assert_eq!(tree(&rootfs), ["monitor"]);
    let config = json(&bundle.join("config.json"));
    assert_eq!(config["process"]["args"], serde_json::json!(["/monitor"]));
    assert_eq!(config["process"]["user"]["uid"], 0);
    bundle
}

/// A 64-bit little-endian ELF executable's machine (`e_machine`), and whether it asks for
/// an interpreter (`PT_INTERP`: dynamically linked); None for anything else.
fn elf_machine(elf: &[u8]) -> Option<(u16, bool)> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?));
    // Magic, ELFCLASS64, ELFDATA2LSB; ET_EXEC or ET_DYN (static-pie).
    if elf.get(..6)? != b"\x7fELF\x02\x01" || !matches!(u16_at(16)?, 2 | 3) {
        return None;
    }
    let (phoff, phentsize, phnum) = (
        usize::try_from(u64_at(32)?).ok()?,
        usize::from(u16_at(54)?),
        usize::from(u16_at(56)?),
    );
    let mut interp = false;
    for i in 0..phnum {
        interp |= u32_at(phoff + i * phentsize)? == 3;
    }
    Some((u16_at(18)?, interp))
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
    let oci = root().join("target/image/oci");
    let image = format!("{}:eni-monitor:{version}", oci.display());

    // One reference, an image index of two platforms.
    assert_eq!(platforms(&oci, version), ["linux/amd64", "linux/arm64"]);
    let mut amd64 = None;
    // ELF machines: EM_X86_64, EM_AARCH64.
    for (arch, machine) in [("amd64", 62), ("arm64", 183)] {
        let bundle = unpack(&image, arch);
        let elf = std::fs::read(bundle.join("rootfs/monitor")).unwrap();
        assert_eq!(
            elf_machine(&elf),
            Some((machine, false)),
            "{arch}: (machine, interpreter)"
        );
        if arch == "amd64" {
            amd64 = Some(bundle);
        } else {
            std::fs::remove_dir_all(bundle.parent().unwrap()).unwrap();
        }
    }
    // The amd64 image runs here.
    let bundle = amd64.unwrap();
    let rootfs = bundle.join("rootfs");

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
    std::fs::remove_dir_all(bundle.parent().unwrap()).unwrap();
}
