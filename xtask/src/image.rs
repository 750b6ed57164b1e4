//! `cargo xtask image`: the container image, a static `monitor` on scratch, built by
//! buildah offline into an OCI layout.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use crate::{cargo, cross, run, workspace_root};

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

/// The statically linked `monitor` of each platform (OCI's architecture name, the
/// binary): the image holds it and nothing else.
fn build_static() -> Result<Vec<(&'static str, PathBuf)>> {
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
    let amd64 = workspace_root()?.join(format!("target/{triple}/release/monitor"));
    let arm64 = cross::build_aarch64(&["monitor"])?.join("monitor");
    Ok(vec![("amd64", amd64), ("arm64", arm64)])
}

/// Builds the image with buildah (vfs storage under target/image, no daemon, no base
/// image), one for each platform, under one image index, and writes it as an OCI
/// layout, `target/image/oci:eni-monitor:<version>`: a runtime pulls the manifest of its
/// node's architecture from the one reference.
pub fn image() -> Result<()> {
    let root = workspace_root()?;
    let binaries = build_static()?;
    let out = root.join("target/image");
    let tag = format!("localhost/{IMAGE_NAME}:{}", version()?);
    let buildah = |args: &[&str]| -> Result<()> { run(buildah_in(&out).args(args)) };
    // An earlier build's image or index of the tag, if any, goes first.
    let _ = buildah_in(&out).args(["manifest", "rm", &tag]).output();
    let _ = buildah_in(&out).args(["rmi", "--force", &tag]).output();
    buildah(&["manifest", "create", &tag])?;
    let containerfile = root.join("Containerfile");
    for (arch, binary) in &binaries {
        let context = out.join(format!("context-{arch}"));
        let _ = std::fs::remove_dir_all(&context);
        std::fs::create_dir_all(&context)?;
        std::fs::copy(binary, context.join("monitor"))
            .with_context(|| format!("copying the static {arch} monitor"))?;
        buildah(&[
            "bud",
            "--quiet",
            "--isolation",
            "chroot",
            "--platform",
            &format!("linux/{arch}"),
            "--manifest",
            &tag,
            "--file",
            &containerfile.to_string_lossy(),
            &context.to_string_lossy(),
        ])?;
    }
    let oci = out.join("oci");
    let _ = std::fs::remove_dir_all(&oci);
    let dest = format!("oci:{}:{IMAGE_NAME}:{}", oci.display(), version()?);
    buildah(&["manifest", "push", "--all", "--quiet", &tag, &dest])?;
    eprintln!(
        "image: {dest} (linux/amd64, linux/arm64)\n  push it with `skopeo copy --all {dest} docker://REGISTRY/{IMAGE_NAME}:{}`",
        version()?
    );
    Ok(())
}

/// buildah on the storage under `out` (vfs: no daemon, no kernel overlay).
fn buildah_in(out: &std::path::Path) -> Command {
    let mut cmd = Command::new("buildah");
    cmd.arg("--root")
        .arg(out.join("storage"))
        .arg("--runroot")
        .arg(out.join("run"))
        .args(["--storage-driver", "vfs"]);
    cmd
}
