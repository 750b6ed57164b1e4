//! `cargo xtask`: setup, build, run and test eni-monitor.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod cross;
mod image;
mod render;
mod setup;
mod test;

use setup::setup;

const CHART: &str = "deploy/helm/eni-monitor";

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
    Build {
        /// Also for this architecture: `aarch64` builds the static agent, and the kernel
        /// matrix's `nettool` and probe tests, for Graviton into
        /// target/aarch64-unknown-linux-gnu/release.
        #[arg(long, value_enum)]
        target: Option<Target>,
    },
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
    Render {
        /// Where your team serves RUNBOOK.md: also write target/render/rules.yml and
        /// target/render/prometheusrule.yaml with each alert's `runbook_url` at
        /// `<URL>#<alert name in lower case>` (as the chart's
        /// `prometheusRule.runbookBaseUrl` does).
        #[arg(long, value_name = "URL")]
        runbook_base_url: Option<String>,
    },
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

/// An architecture besides the host's.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Target {
    Aarch64,
}

fn main() -> Result<()> {
    match Args::parse().command {
        Cmd::Setup => setup(),
        Cmd::Build { target } => {
            setup()?;
            build()?;
            match target {
                Some(Target::Aarch64) => cross::build_guest_aarch64(),
                None => Ok(()),
            }
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
        Cmd::Render { runbook_base_url } => {
            setup::setup_helm()?;
            render::render()?;
            match runbook_base_url {
                Some(base) => render::with_runbooks(&base),
                None => Ok(()),
            }
        }
        Cmd::Image => {
            setup()?;
            image::image()
        }
        Cmd::Demo { keep } => run_tool("demo", keep.then_some("--keep")),
        Cmd::Bench => run_tool("bench", None),
        Cmd::Test { args } => {
            setup()?;
            build()?;
            // The kernel matrix's aarch64 rows boot these.
            cross::build_guest_aarch64()?;
            test::clippy()?;
            test::test(&args)
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

/// The release agent, and the kernel matrix's traffic tool (`cargo test` builds no
/// binary of a crate without integration tests).
fn build() -> Result<()> {
    run(Command::new(cargo()).current_dir(workspace_root()?).args([
        "build",
        "--release",
        "--package",
        "monitor",
        "--package",
        "nettool",
    ]))
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
