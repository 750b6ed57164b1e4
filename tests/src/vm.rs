//! The kernel matrix: boots one of Debian's cloud kernels (fetched by `cargo xtask setup`
//! into `target/kernels/<name>`) under qemu with an initramfs holding busybox, the release
//! agent, the test's traffic tool, iproute2, bpftool and the scenario
//! (`tests/vm/scenario.sh`), and returns what the scenario printed on the serial console.

use std::{
    collections::BTreeSet,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::monitor_bin;

const SCENARIO: &str = include_str!("../vm/scenario.sh");
/// A boot and the scenario take about a minute under TCG; a hung kernel is cut off.
const BOOT_TIMEOUT: Duration = Duration::from_mins(7);

/// One kernel of README.md's Kernels table.
pub struct Kernel {
    /// The directory under `target/kernels`.
    pub name: &'static str,
    /// Booted with `lockdown=integrity`, as AL2023 and Bottlerocket run.
    pub lockdown: bool,
}

fn kernels_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/kernels")
}

impl Kernel {
    fn dir(&self) -> PathBuf {
        kernels_dir().join(self.name)
    }

    /// Whether `cargo xtask setup` fetched this kernel and qemu is installed.
    pub fn available(&self) -> bool {
        self.dir().join("vmlinuz").is_file() && which("qemu-system-x86_64").is_some()
    }

    /// Boots the kernel with the scenario as PID 1 on 2 vCPUs and returns the serial
    /// console.
    pub fn boot(&self, nettool: &Path) -> Console {
        self.boot_with(nettool, 2, "full")
    }

    /// Boots with `cpus` vCPUs and the scenario's part `scenario` (`full`, `memory`).
    pub fn boot_with(&self, nettool: &Path, cpus: u32, scenario: &str) -> Console {
        // Kept under target/vm for a look after a failure; replaced by the next boot.
        let work = kernels_dir()
            .join("../vm")
            .join(format!("{}-{scenario}-{cpus}", self.name));
        std::fs::create_dir_all(&work).unwrap();
        let initramfs = work.join("initramfs.cpio");
        build_initramfs(&initramfs, &self.dir().join("modules"), nettool);
        let serial = work.join("serial.log");
        let mut append =
            format!("console=ttyS0 panic=-1 quiet rdinit=/init em.scenario={scenario}");
        if self.lockdown {
            append.push_str(" lockdown=integrity");
        }
        let started = Instant::now();
        let mut child = Command::new("qemu-system-x86_64")
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

fn build_initramfs(path: &Path, modules: &Path, nettool: &Path) {
    let mut cpio = Cpio::new();
    for d in ["/proc", "/sys", "/dev", "/run", "/tmp", "/sys/fs/bpf"] {
        cpio.dir(Path::new(d));
    }
    let busybox = Path::new("/bin/busybox");
    cpio.file(Path::new("/bin/busybox"), busybox, 0o755);
    cpio.file(Path::new("/bin/sh"), busybox, 0o755);
    let tools = [
        ("/usr/local/bin/monitor", monitor_bin()),
        ("/usr/local/bin/nettool", nettool.to_path_buf()),
        ("/usr/local/bin/ip", which("ip").expect("iproute2's ip")),
        ("/usr/local/bin/tc", which("tc").expect("iproute2's tc")),
        ("/usr/local/bin/bpftool", which("bpftool").expect("bpftool")),
    ];
    let mut libs = BTreeSet::new();
    for (at, from) in &tools {
        cpio.file(Path::new(at), from, 0o755);
        libs.extend(libraries(from));
    }
    for lib in libs {
        cpio.file(&lib, &lib, 0o755);
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
