//! The kernel matrix: boots one of Debian's cloud kernels (fetched by `cargo xtask setup`
//! into `target/kernels/<name>`) under qemu, `x86_64` or aarch64, with an initramfs holding
//! busybox, the release agent, the test's traffic tool (`nettool`), iproute2, bpftool and
//! the scenario (`tests/vm/scenario.sh`), all of the kernel's architecture, and returns
//! what the scenario printed on the serial console. The `x86_64` guests take the host's
//! tools; the aarch64 guests Debian's arm64 packages (unpacked by `cargo xtask setup`
//! under `target/kernels/arm64-userland`), the agent and `nettool` as `cargo xtask build
//! --target aarch64` builds them.

use std::{
    collections::BTreeSet,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{PoisonError, RwLock},
    time::{Duration, Instant},
};

use crate::monitor_bin;

/// A machine architecture of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    fn qemu(self) -> &'static str {
        match self {
            Self::X86_64 => "qemu-system-x86_64",
            Self::Aarch64 => "qemu-system-aarch64",
        }
    }

    /// The machine's qemu arguments and the kernel's console.
    fn machine(self) -> (&'static [&'static str], &'static str) {
        match self {
            Self::X86_64 => (&[], "ttyS0"),
            // The PL011 UART of the `virt` board; its driver is built into the kernel.
            Self::Aarch64 => (&["-M", "virt"], "ttyAMA0"),
        }
    }

    /// The binary `name` of this workspace, built for this architecture: the host's
    /// release build, or `cargo xtask build --target aarch64`'s (static; `probes` is
    /// `monitor`'s probe tests).
    pub fn built(self, name: &str) -> PathBuf {
        let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
        match self {
            Self::X86_64 if name == "monitor" => monitor_bin(),
            Self::X86_64 => target.join("release").join(name),
            Self::Aarch64 => target.join("aarch64-unknown-linux-gnu/release").join(name),
        }
    }
}

/// The arm64 guests' userland, as `cargo xtask setup` unpacks it.
fn arm64_root() -> PathBuf {
    kernels_dir().join("arm64-userland/root")
}

const SCENARIO: &str = include_str!("../vm/scenario.sh");
/// Boots of the usual two vCPUs share the host; a larger one takes it alone.
static HOST: RwLock<()> = RwLock::new(());

/// A boot and the scenario take 3 to 6 minutes under TCG, most of it the verifier: each
/// start of the agent verifies the classifiers again, which takes 1-3 s on a native CPU
/// and 50 s or more on an emulated arm64 one. A hung kernel is cut off.
const BOOT_TIMEOUT: Duration = Duration::from_mins(10);

/// One kernel of README.md's Kernels table.
pub struct Kernel {
    /// The directory under `target/kernels`.
    pub name: &'static str,
    /// Booted with `lockdown=integrity`, as AL2023 and Bottlerocket run.
    pub lockdown: bool,
    pub arch: Arch,
}

fn kernels_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/kernels")
}

impl Kernel {
    fn dir(&self) -> PathBuf {
        kernels_dir().join(self.name)
    }

    /// What this kernel's boot lacks (`cargo xtask setup` fetches the kernels, qemu and
    /// the arm64 userland; `cargo xtask build --target aarch64` builds the aarch64
    /// binaries), or None when it has everything.
    pub fn missing(&self) -> Option<String> {
        let mut needs = vec![self.dir().join("vmlinuz")];
        needs.push(self.arch.built("monitor"));
        needs.push(self.arch.built("nettool"));
        if self.arch == Arch::Aarch64 {
            needs.push(kernels_dir().join("arm64-userland/complete"));
            needs.push(self.arch.built("probes"));
        }
        let mut missing: Vec<String> = needs
            .iter()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if which(self.arch.qemu()).is_none() {
            missing.push(self.arch.qemu().to_owned());
        }
        (!missing.is_empty()).then(|| missing.join(", "))
    }

    /// Boots the kernel with the scenario as PID 1 on 2 vCPUs and returns the serial
    /// console.
    pub fn boot(&self) -> Console {
        self.boot_with(2, "full")
    }

    /// Boots with `cpus` vCPUs and the scenario's part `scenario` (`full`, `memory`).
    /// A boot of more vCPUs than the usual two has the host to itself: beside other
    /// emulated guests on a 2-core host its vCPUs starved (RCU stalls) past the timeout.
    pub fn boot_with(&self, cpus: u32, scenario: &str) -> Console {
        let _alone = (cpus > 2).then(|| HOST.write().unwrap_or_else(PoisonError::into_inner));
        let _shared = (cpus <= 2).then(|| HOST.read().unwrap_or_else(PoisonError::into_inner));
        // Kept under target/vm for a look after a failure; replaced by the next boot.
        let work = kernels_dir()
            .join("../vm")
            .join(format!("{}-{scenario}-{cpus}", self.name));
        std::fs::create_dir_all(&work).unwrap();
        let initramfs = work.join("initramfs.cpio");
        build_initramfs(&initramfs, &self.dir().join("modules"), self.arch);
        let serial = work.join("serial.log");
        let (machine, console) = self.arch.machine();
        let mut append =
            format!("console={console} panic=-1 quiet rdinit=/init em.scenario={scenario}");
        if self.lockdown {
            append.push_str(" lockdown=integrity");
        }
        let started = Instant::now();
        let mut child = Command::new(self.arch.qemu())
            .args(machine)
            .args(["-accel", "tcg", "-cpu", "max", "-m", "1024"])
            .args(["-smp", &cpus.to_string()])
            .args(["-display", "none", "-monitor", "none", "-nic", "none"])
            .arg("-no-reboot")
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-kernel")
            .arg(self.dir().join("vmlinuz"))
            .arg("-initrd")
            .arg(&initramfs)
            .args(["-append", &append])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting qemu: {e}"));
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if started.elapsed() > BOOT_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let text =
            String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).replace('\r', "");
        let console = Console {
            kernel: self.name,
            text,
            elapsed: started.elapsed(),
        };
        assert!(
            status.is_some(),
            "{} did not finish within {BOOT_TIMEOUT:?}:\n{}",
            self.name,
            console.text
        );
        assert!(
            console.text.contains("@@ DONE"),
            "{}: the scenario did not finish:\n{}",
            self.name,
            console.text
        );
        console
    }
}

/// The serial console of one boot.
pub struct Console {
    pub kernel: &'static str,
    pub text: String,
    pub elapsed: Duration,
}

impl Console {
    /// The values of the one-line marks `@@ NAME value`, in order.
    pub fn marks(&self, name: &str) -> Vec<&str> {
        let prefix = format!("@@ {name} ");
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str()))
            .map(str::trim)
            .collect()
    }

    /// The value of the first mark `@@ NAME value`.
    pub fn mark(&self, name: &str) -> Option<&str> {
        self.marks(name).first().copied()
    }

    /// The lines between `@@ BEGIN name` and `@@ END name`; panics when absent.
    pub fn block(&self, name: &str) -> String {
        let begin = format!("@@ BEGIN {name}");
        let end = format!("@@ END {name}");
        let mut lines = self.text.lines().skip_while(|l| l.trim() != begin);
        assert!(
            lines.next().is_some(),
            "{}: no block {name} on the console:\n{}",
            self.kernel,
            self.text
        );
        let body: Vec<&str> = lines.take_while(|l| l.trim() != end).collect();
        body.join("\n")
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// The shared libraries `binary` loads, as absolute paths (from `ldd`).
fn libraries(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(binary).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The libraries a foreign-architecture `binary` loads, found under `root` (an unpacked
/// Debian tree) by its `NEEDED` entries, transitively, and its interpreter: as (path in
/// the guest, path on the host).
fn needed_under(root: &Path, binary: &Path) -> BTreeSet<(PathBuf, PathBuf)> {
    let dirs = ["lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu"];
    let mut found = BTreeSet::new();
    let mut todo = vec![binary.to_path_buf()];
    while let Some(elf) = todo.pop() {
        let out = Command::new("readelf")
            .args(["--dynamic", "--program-headers", "--wide"])
            .arg(&elf)
            .output()
            .unwrap_or_else(|e| panic!("readelf {}: {e}", elf.display()));
        let text = String::from_utf8_lossy(&out.stdout);
        let mut wanted: Vec<String> = text
            .lines()
            .filter(|l| l.contains("(NEEDED)"))
            .filter_map(|l| Some(l.split_once('[')?.1.split_once(']')?.0.to_owned()))
            .collect();
        // The program interpreter, `/lib/ld-linux-aarch64.so.1`.
        if let Some(interp) = text
            .lines()
            .find_map(|l| l.split_once("[Requesting program interpreter: "))
            .and_then(|(_, rest)| rest.split_once(']'))
            .map(|(p, _)| p.trim_start_matches('/').to_owned())
        {
            let at = PathBuf::from("/").join(&interp);
            if found.insert((at, root.join(&interp))) {
                wanted.push(
                    Path::new(&interp)
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into(),
                );
            }
        }
        for name in wanted {
            let dir = dirs
                .iter()
                .find(|d| root.join(d).join(&name).exists())
                .unwrap_or_else(|| {
                    panic!(
                        "{name} (for {}) not under {}",
                        elf.display(),
                        root.display()
                    )
                });
            let at = PathBuf::from("/").join(dir).join(&name);
            let host = root.join(dir).join(&name);
            if found.insert((at, host.clone())) {
                todo.push(host);
            }
        }
    }
    found
}

/// A `newc` cpio archive, as the kernel unpacks an initramfs.
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<PathBuf>,
}

impl Cpio {
    fn new() -> Self {
        Self {
            out: Vec::new(),
            ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let name = name.trim_start_matches('/');
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            u32::try_from(data.len()).unwrap(),
            0,
            0,
            0,
            0,
            u32::try_from(name.len() + 1).unwrap(),
            0,
        ];
        self.ino += 1;
        self.out.extend_from_slice(b"070701");
        for f in fields {
            write!(self.out, "{f:08x}").unwrap();
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// A directory and its parents, each once.
    fn dir(&mut self, path: &Path) {
        let mut partial = PathBuf::from("/");
        for part in path.components().skip(1) {
            partial.push(part);
            if self.dirs.insert(partial.clone()) {
                self.entry(&partial.to_string_lossy(), 0o040_755, &[]);
            }
        }
    }

    /// A file at `at` with the contents of `from` (symlinks followed).
    fn file(&mut self, at: &Path, from: &Path, mode: u32) {
        if let Some(parent) = at.parent() {
            self.dir(parent);
        }
        let data = std::fs::read(from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
        self.entry(&at.to_string_lossy(), 0o100_000 | mode, &data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

fn build_initramfs(path: &Path, modules: &Path, arch: Arch) {
    let mut cpio = Cpio::new();
    for d in ["/proc", "/sys", "/dev", "/run", "/tmp", "/sys/fs/bpf"] {
        cpio.dir(Path::new(d));
    }
    // (where in the guest, where on the host)
    let (busybox, tools, libs) = match arch {
        Arch::X86_64 => {
            let tools = [
                ("/usr/local/bin/ip", which("ip").expect("iproute2's ip")),
                ("/usr/local/bin/tc", which("tc").expect("iproute2's tc")),
                ("/usr/local/bin/bpftool", which("bpftool").expect("bpftool")),
                ("/usr/local/bin/nettool", arch.built("nettool")),
            ];
            let mut libs = BTreeSet::new();
            for (_, from) in &tools {
                libs.extend(libraries(from).into_iter().map(|l| (l.clone(), l)));
            }
            (PathBuf::from("/bin/busybox"), tools, libs)
        }
        Arch::Aarch64 => {
            let root = arm64_root();
            let tools = [
                ("/usr/local/bin/ip", root.join("bin/ip")),
                ("/usr/local/bin/tc", root.join("sbin/tc")),
                ("/usr/local/bin/bpftool", root.join("usr/sbin/bpftool")),
                ("/usr/local/bin/nettool", arch.built("nettool")),
            ];
            let mut libs = BTreeSet::new();
            for (_, from) in &tools {
                libs.extend(needed_under(&root, from));
            }
            (root.join("bin/busybox"), tools, libs)
        }
    };
    cpio.file(Path::new("/bin/busybox"), &busybox, 0o755);
    cpio.file(Path::new("/bin/sh"), &busybox, 0o755);
    cpio.file(
        Path::new("/usr/local/bin/monitor"),
        &arch.built("monitor"),
        0o755,
    );
    for (at, from) in &tools {
        cpio.file(Path::new(at), from, 0o755);
    }
    if arch == Arch::Aarch64 {
        cpio.file(
            Path::new("/usr/local/bin/probes"),
            &arch.built("probes"),
            0o755,
        );
    }
    for (at, from) in libs {
        cpio.file(&at, &from, 0o755);
    }
    for module in ["veth", "sch_ingress", "cls_bpf"] {
        let name = format!("{module}.ko");
        cpio.file(
            &Path::new("/lib/modules").join(&name),
            &modules.join(&name),
            0o644,
        );
    }
    cpio.entry("init", 0o100_755, SCENARIO.as_bytes());
    std::fs::write(path, cpio.finish()).unwrap();
}
