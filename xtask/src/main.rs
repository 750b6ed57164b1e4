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
];
/// `PyPI` packages the tests use: an offline validator carrying Kubernetes' schemas.
const PIP_PACKAGES: &[&str] = &["kubernetes-validate"];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13";
const PROMETHEUS_RULE_HEADER: &str =
    "# Written by `cargo xtask rules` from rules.yml: edit that file, not this one.
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
    /// Write deploy/alerts/prometheusrule.yaml from deploy/alerts/rules.yml.
    Rules,
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
        Cmd::Rules => {
            let dir = workspace_root()?.join("deploy/alerts");
            let rules =
                std::fs::read_to_string(dir.join("rules.yml")).context("reading rules.yml")?;
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
            let out = format!("{PROMETHEUS_RULE_HEADER}{body}");
            std::fs::write(dir.join("prometheusrule.yaml"), out)
                .context("writing prometheusrule.yaml")?;
            Ok(())
        }
        Cmd::Bench => {
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
                    "--bin",
                    "bench",
                ])
                .env("MONITOR_BIN", root.join("target/release/monitor")))
        }
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
    bpf_linker()
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
