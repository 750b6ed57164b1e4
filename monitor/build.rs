use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("no workspace above {manifest_dir}"))?
        .join("monitor-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non UTF-8 path {}", root.display()))?;
    // aya-build re-emits every line the nested cargo prints as a build-script warning:
    // quiet, it prints only the compiler's own diagnostics, and those only when there are.
    // SAFETY: the build script has no other thread yet to read the environment.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "monitor-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
