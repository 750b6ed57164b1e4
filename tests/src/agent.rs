//! The agent under test: the real `monitor` binary in the node namespace, its pinned
//! state, and its scrapes.

use std::{
    fs::File,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use monitor::kernel::bpf::{bpf, cmd};

use crate::{Netns, http_get, sh};

/// One scrape of `/metrics`, parsed by the agent's own parser.
pub type Scrape = monitor::exposition::Exposition;

/// The programs every agent attaches, with the device of each (empty for tracepoints).
pub const HOOKS: [(&str, &str); 4] = [
    ("kfree_skb", ""),
    ("udp_fail_queue_rcv_skb", ""),
    ("tc_ingress", "eth0"),
    ("tc_egress", "eth0"),
];

/// The `monitor` binary under test.
pub fn monitor_bin() -> PathBuf {
    std::env::var_os("MONITOR_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/monitor"),
        PathBuf::from,
    )
}

/// A BPF filesystem of the test's own, mounted outside /sys (which `ip netns exec`
/// replaces), where agents pin their state: what a node's /sys/fs/bpf is to the
/// `DaemonSet`. Unmounted on drop, which frees the pinned maps.
pub struct BpfState {
    mount: PathBuf,
}

impl BpfState {
    pub fn new(name: &str) -> Self {
        let mount = PathBuf::from(format!("/run/em-bpf-{name}"));
        std::fs::create_dir_all(&mount).unwrap();
        sh(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&mount));
        Self { mount }
    }

    /// The agent's `--state-dir`.
    pub fn dir(&self) -> PathBuf {
        self.mount.join("eni-monitor")
    }
}

impl Drop for BpfState {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = std::fs::remove_dir(&self.mount);
    }
}

/// The prog-query member of `union bpf_attr`, to the count.
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    /// The interface's index.
    target: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    count: u32,
    pad: u32,
}

/// The agent running inside a namespace; stopped with SIGTERM on drop.
pub struct Agent {
    child: Option<Child>,
    ns_name: String,
    pub log: PathBuf,
    pub listen: SocketAddr,
    /// The state the agent pins, when it owns it; unmounted after the agent stops.
    owned_state: Option<BpfState>,
}

impl Agent {
    /// Starts `monitor` in `ns` listening on its loopback, and waits for `/healthz`.
    /// Unless `args` name one, IMDS is a closed port on the namespace's loopback, so
    /// that no test ever sends a packet toward a real metadata service.
    /// Its pinned state is its own, gone with it.
    pub fn start(ns: &Netns, args: &[&str]) -> Self {
        let state = BpfState::new(&ns.name);
        let mut agent = Self::start_with_state(ns, args, &state);
        agent.owned_state = Some(state);
        agent
    }

    /// Starts `monitor` as [`Agent::start`] does, pinning its state in `state`, which
    /// may outlive it for the next agent to continue from.
    pub fn start_with_state(ns: &Netns, args: &[&str], state: &BpfState) -> Self {
        // `ip netns exec` mounts a fresh sysfs, as a container has: no tracefs, no
        // debugfs. It execs the agent, so the child's pid is the agent's.
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &ns.name])
            .arg(monitor_bin())
            .args(Self::default_args(args))
            .arg("--state-dir")
            .arg(state.dir())
            .args(args);
        Self::start_command(ns, command)
    }

    /// The listen address, and a closed IMDS port unless `args` name an endpoint.
    pub fn default_args(args: &[&str]) -> Vec<String> {
        let mut out = vec!["--listen".to_owned(), Self::LISTEN.to_owned()];
        if !args.contains(&"--imds-endpoint") {
            out.extend([
                "--imds-endpoint".to_owned(),
                "http://127.0.0.1:1".to_owned(),
            ]);
        }
        out
    }

    const LISTEN: &str = "127.0.0.1:9435";

    /// Starts an agent with `command`, which must exec it in `ns` listening on
    /// [`Agent::default_args`]'s address, and waits for `/healthz`.
    pub fn start_command(ns: &Netns, mut command: Command) -> Self {
        let listen: SocketAddr = Self::LISTEN.parse().unwrap();
        let log = std::env::temp_dir().join(format!("{}.log", ns.name));
        let out = File::create(&log).unwrap();
        let child = command
            .env("RUST_LOG", "info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        let mut agent = Self {
            child: Some(child),
            ns_name: ns.name.clone(),
            log,
            listen,
            owned_state: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = agent.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "monitor exited with {status} at start:\n{}",
                    agent.log_text()
                );
            }
            if agent
                .get(ns, "/healthz")
                .is_some_and(|(code, _)| code == 200)
            {
                return agent;
            }
            assert!(
                Instant::now() < deadline,
                "monitor not healthy in 20s:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent stopped").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path` from the agent: (status, body), or `None` when it does not answer.
    pub fn get(&self, ns: &Netns, path: &str) -> Option<(u16, String)> {
        assert_eq!(ns.name, self.ns_name, "the agent runs in another namespace");
        http_get(ns, self.listen, path)
    }

    pub fn scrape(&self, ns: &Netns) -> Scrape {
        let (code, body) = self
            .get(ns, "/metrics")
            .unwrap_or_else(|| panic!("no answer from /metrics:\n{}", self.log_text()));
        assert_eq!(code, 200, "{body}");
        Scrape::parse(&body).unwrap_or_else(|e| panic!("a bad exposition: {e}\n{body}"))
    }

    /// Scrapes until `done` holds, for up to 10 s, and returns the last scrape.
    pub fn scrape_until(&self, ns: &Netns, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.scrape(ns);
            if done(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last scrape:\n{}",
                s.text
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Has the agent name the resolver at `server`: one query from `client`, then a wait
    /// until the name is in force. A resolver's first queries count under `other` until
    /// the agent has seen it and named it (within a sweep).
    pub fn name_resolver(&self, node: &Netns, client: &Netns, server: std::net::SocketAddr) {
        let _ = crate::dns::query(
            client,
            server,
            crate::dns::OK_NAME,
            0xfffe,
            Duration::from_millis(500),
        );
        let ip = server.ip().to_string();
        self.scrape_until(node, &format!("{ip} named"), |s| {
            s.sum(
                "eni_monitor_dns_resolver_info",
                &[("resolver", ip.as_str())],
            ) >= 1.0
        });
    }

    /// SIGKILL, as the OOM killer or a node under pressure ends an agent: nothing of
    /// it runs after.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("agent already stopped");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// The programs attached to `device`'s TCX hook (`BPF_TCX_INGRESS` or
    /// `BPF_TCX_EGRESS`) in `ns`, by `BPF_PROG_QUERY`.
    pub fn tcx_programs(ns: &Netns, device: &str, attach_type: u32) -> u32 {
        let device = std::ffi::CString::new(device).unwrap();
        ns.run(move || {
            // SAFETY: a NUL-terminated interface name.
            let ifindex = unsafe { libc::if_nametoindex(device.as_ptr()) };
            assert_ne!(ifindex, 0, "no such device");
            // A null `prog_ids` asks for the count only.
            let mut attr = ProgQueryAttr {
                target: ifindex,
                attach_type,
                ..ProgQueryAttr::default()
            };
            if let Err(e) = bpf(cmd::PROG_QUERY, &mut attr) {
                panic!("BPF_PROG_QUERY: {e}");
            }
            attr.count
        })
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent already stopped");
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "monitor did not exit within 10 s of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The resident memory of process `pid`, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for {pid}"));
    kib / 1024.0
}
