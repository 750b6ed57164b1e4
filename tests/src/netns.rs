//! Named network namespaces, and entering them.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::{ip, sh};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Moves the calling thread into namespace `ns_name` for good (a thread of its own,
/// as a background traffic source needs).
pub fn enter(ns_name: &str) {
    let path = PathBuf::from("/run/netns").join(ns_name);
    let file = File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    // SAFETY: a valid namespace fd; setns affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> Self {
        let name = format!(
            "em-{role}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&format!("netns add {name}"));
        let ns = Self { name };
        ns.ip("link set lo up");
        ns
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &str) -> String {
        ip(&format!("-n {} {args}", self.name))
    }

    /// A command that runs inside the namespace. Only the network namespace changes;
    /// the mounts stay the host's.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets made there stay in
    /// the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let name = self.name.clone();
        std::thread::spawn(move || {
            enter(&name);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Loads an nftables ruleset (`nft -f -`) into the namespace.
    pub fn nft(&self, ruleset: &str) {
        use std::io::Write as _;
        let mut child = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("starting nft");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(ruleset.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "nft rejected:\n{ruleset}");
    }

    /// A kernel counter from `/proc/net/snmp` (e.g. `Udp`, `RcvbufErrors`) in this namespace.
    pub fn snmp(&self, group: &str, field: &str) -> u64 {
        let text = sh(self.command("cat").arg("/proc/net/snmp"));
        let mut lines = text.lines().filter(|l| l.starts_with(&format!("{group}:")));
        let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
        let i = names
            .split_whitespace()
            .position(|n| n == field)
            .unwrap_or_else(|| panic!("no {group} {field}"));
        values.split_whitespace().nth(i).unwrap().parse().unwrap()
    }

    /// The MAC address of `device` in this namespace.
    /// The interface index of `device` as this namespace sees it.
    pub fn ifindex(&self, device: &str) -> u32 {
        // "N: eth0@ifM: ..."
        self.ip(&format!("-o link show dev {device}"))
            .split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no interface {device} in {}", self.name))
    }

    pub fn mac(&self, device: &str) -> String {
        let out = self.ip(&format!("-o link show dev {device}"));
        let after = out
            .split("link/ether ")
            .nth(1)
            .unwrap_or_else(|| panic!("no MAC in {out:?}"));
        after.split_whitespace().next().unwrap().to_owned()
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        sh(self
            .command("sysctl")
            .args(["-q", "-w", &format!("{key}={value}")]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
