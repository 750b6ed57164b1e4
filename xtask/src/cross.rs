//! The aarch64 build (Graviton): the nightly toolchain builds `std` for the target from
//! its `rust-src` (`-Z build-std`: the stable toolchain here has no aarch64 standard
//! library, and none is downloaded), and Debian's cross gcc links it against the arm64
//! static glibc (`libc6-dev-arm64-cross`), so the agent is a static binary as on `x86_64`.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use crate::{output, run, workspace_root};

pub const AARCH64: &str = "aarch64-unknown-linux-gnu";

/// Debian's cross toolchain for the target.
const CROSS_GCC: &str = "aarch64-linux-gnu-gcc";

/// Builds `packages` (release, static) for aarch64 into `target/<AARCH64>/release`.
pub fn build_aarch64(packages: &[&str]) -> Result<PathBuf> {
    let root = workspace_root()?;
    let mut cmd = nightly_cargo(&["build", "--quiet"])?;
    for p in packages {
        cmd.args(["--package", p]);
    }
    run(&mut cmd)?;
    Ok(root.join("target").join(AARCH64).join("release"))
}

/// What the kernel matrix's aarch64 rows boot: the agent, `nettool`, and `monitor`'s
/// probe tests as `target/<AARCH64>/release/probes`.
pub fn build_guest_aarch64() -> Result<()> {
    let dir = build_aarch64(&["monitor", "nettool"])?;
    let json = output(
        nightly_cargo(&["test", "--no-run", "--quiet", "--message-format=json"])?.args([
            "--package",
            "monitor",
            "--test",
            "probes",
        ]),
    )?;
    let built = json
        .lines()
        .filter(|l| l.contains("\"name\":\"probes\""))
        .find_map(|l| l.split_once("\"executable\":\"")?.1.split_once('"'))
        .map(|(path, _)| PathBuf::from(path))
        .context("no probes test binary in cargo's messages")?;
    std::fs::copy(&built, dir.join("probes"))
        .with_context(|| format!("copying {}", built.display()))?;
    Ok(())
}

/// The nightly cargo running `command` for aarch64 in release, static.
fn nightly_cargo(command: &[&str]) -> Result<Command> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root()?)
        .arg("+nightly")
        .args(command)
        .arg("--release")
        .args(["-Z", "build-std=std,panic_abort", "--target", AARCH64]);
    cmd.env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", CROSS_GCC)
        .env("CC_aarch64_unknown_linux_gnu", CROSS_GCC)
        .env("AR_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-ar")
        // Target-specific flags: the eBPF build, for bpfel, never sees them.
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        // The stable toolchain's cargo set these for xtask; the nightly cargo picks its own.
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN");
    Ok(cmd)
}
