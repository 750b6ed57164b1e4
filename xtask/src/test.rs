//! `cargo xtask test`: clippy on every crate (the eBPF crate with its own toolchain and
//! target), then the whole suite.

use std::process::Command;

use anyhow::Result;

use crate::{cargo, run, workspace_root};

/// The eBPF crate's target, as `aya-build` builds it.
const BPF_TARGET: &str = "bpfel-unknown-none";

/// Clippy, warnings denied: the default members on the stable toolchain, the eBPF crate
/// on nightly for its target (with the flags `aya-build` gives it).
pub fn clippy() -> Result<()> {
    let root = workspace_root()?;
    run(Command::new(cargo())
        .current_dir(&root)
        .args(["clippy", "--release", "--all-targets", "--quiet"])
        .args(["--", "-D", "warnings"]))?;
    run(Command::new("cargo")
        .current_dir(root.join("monitor-ebpf"))
        .args([
            "+nightly",
            "clippy",
            "--package",
            "monitor-ebpf",
            "--bins",
            "--release",
        ])
        .args(["--target", BPF_TARGET, "-Z", "build-std=core", "--quiet"])
        .arg("--target-dir")
        .arg(root.join("target/ebpf-clippy"))
        .args(["--", "-D", "warnings"])
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        )
        // The stable toolchain's cargo set these for xtask; the nightly cargo picks its own.
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN"))
}

/// The whole suite, on the release agent; `args` go to `cargo test`.
pub fn test(args: &[String]) -> Result<()> {
    let root = workspace_root()?;
    run(Command::new(cargo())
        .current_dir(&root)
        .args(["test", "--release", "--no-fail-fast"])
        .args(args)
        .env("MONITOR_BIN", root.join("target/release/monitor")))
}
