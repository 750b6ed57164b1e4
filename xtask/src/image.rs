//! `cargo xtask image`: the container image, a static `monitor` on scratch, built by
//! buildah offline into an OCI layout.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use crate::{cargo, run, workspace_root};

const IMAGE_NAME: &str = "eni-monitor";

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
pub fn image() -> Result<()> {
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
