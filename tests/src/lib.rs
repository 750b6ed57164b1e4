//! The simulated node: network namespaces and veth pairs standing in for an EKS node,
//! its ENIs and the VPC behind them, with helpers to run the real `monitor` binary
//! inside the node namespace and scrape it. Everything created is removed on drop,
//! also when a test fails.
#![allow(
    clippy::missing_panics_doc,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::float_cmp
)]

pub mod dns;
pub mod floor;
pub mod imds;
pub mod incident;
pub mod paging;
pub mod servers;
pub mod vm;

use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, Command},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// Whether a root-only test may run. Outside CI a non-root run skips with a message;
/// in CI it fails, so a misconfigured runner cannot pass by skipping.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root, and CI must run it"
    );
    eprintln!("skipping {test}: needs root (network namespaces, eBPF)");
    false
}

/// Whether `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `cmd`, panicking with its output when it fails.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip` with arguments split on whitespace.
pub fn ip(args: &str) -> String {
    sh(Command::new("ip").args(args.split_whitespace()))
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A thread that runs until dropped: `work` is handed the stop flag to poll.
pub struct Background {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    pub fn spawn(work: impl FnOnce(&std::sync::atomic::AtomicBool) + Send + 'static) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || work(&flag));
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

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

/// The programs every agent attaches, with the device of each (empty for tracepoints).
pub const HOOKS: [(&str, &str); 4] = [
    ("kfree_skb", ""),
    ("udp_fail_queue_rcv_skb", ""),
    ("tc_ingress", "eth0"),
    ("tc_egress", "eth0"),
];

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

/// One ENI: `device` in the node namespace, cabled to `peer` in the VPC namespace.
pub struct Eni {
    pub device: String,
    pub node_v4: String,
    pub vpc_v4: String,
    pub node_v6: String,
    pub vpc_v6: String,
}

/// A pod of the simulated node.
pub struct Pod {
    pub ns: Netns,
    pub ip: String,
}

/// A node namespace with ENIs, and a VPC namespace on their far side.
pub struct SimNode {
    pub node: Netns,
    pub vpc: Netns,
    pub enis: Vec<Eni>,
    ipv6: bool,
}

impl SimNode {
    /// A node with one ENI, `eth0`, dual stack.
    pub fn new() -> Self {
        Self::build(true)
    }

    /// A node with one ENI and IPv6 off: no multicast listener reports, so nothing
    /// crosses the ENI but the test's own packets.
    pub fn ipv4_only() -> Self {
        Self::build(false)
    }

    fn build(ipv6: bool) -> Self {
        let node = Netns::new("node");
        let vpc = Netns::new("vpc");
        for ns in [&node, &vpc] {
            // No router solicitations: the namespaces carry only the test's traffic.
            ns.sysctl("net.ipv6.conf.default.accept_ra", "0");
            ns.sysctl("net.ipv6.conf.all.accept_ra", "0");
            if !ipv6 {
                ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
                ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
            }
        }
        let mut sim = Self {
            node,
            vpc,
            enis: Vec::new(),
            ipv6,
        };
        sim.add_eni("eth0");
        sim
    }

    /// Cables a new ENI `device` (the n-th, from 0) to the VPC namespace.
    pub fn add_eni(&mut self, device: &str) -> &Eni {
        let n = self.enis.len();
        let peer = format!("vpc{n}");
        self.node.ip(&format!(
            "link add {device} type veth peer name {peer} netns {}",
            self.vpc.name
        ));
        let eni = Eni {
            device: device.to_owned(),
            node_v4: format!("10.{}.0.2", 200 + n),
            vpc_v4: format!("10.{}.0.1", 200 + n),
            node_v6: format!("fd00:{}::2", 200 + n),
            vpc_v6: format!("fd00:{}::1", 200 + n),
        };
        self.node
            .ip(&format!("addr add {}/24 dev {device}", eni.node_v4));
        self.vpc
            .ip(&format!("addr add {}/24 dev {peer}", eni.vpc_v4));
        if self.ipv6 {
            self.node
                .ip(&format!("addr add {}/64 dev {device} nodad", eni.node_v6));
            self.vpc
                .ip(&format!("addr add {}/64 dev {peer} nodad", eni.vpc_v6));
        }
        self.node.ip(&format!("link set {device} up"));
        self.vpc.ip(&format!("link set {peer} up"));
        self.enis.push(eni);
        self.enis.last().expect("just pushed")
    }

    /// A pod: a namespace behind a veth `eni<n>` on the node, its address routed out
    /// through `eth0` to the VPC (which routes the pods' range back to the node).
    pub fn add_pod(&self, n: u8) -> Pod {
        let ns = Netns::new("pod");
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
        let host = format!("eni{n}");
        self.node.ip(&format!(
            "link add {host} type veth peer name eth0 netns {}",
            ns.name
        ));
        let ip = format!("10.210.{n}.2");
        self.node
            .ip(&format!("addr add 10.210.{n}.1/24 dev {host}"));
        self.node.ip(&format!("link set {host} up"));
        ns.ip(&format!("addr add {ip}/24 dev eth0"));
        ns.ip("link set eth0 up");
        ns.ip(&format!("route add default via 10.210.{n}.1"));
        self.node.sysctl("net.ipv4.ip_forward", "1");
        let eth0 = self.eni("eth0");
        let _ = self
            .vpc
            .command("ip")
            .args(["route", "replace", "10.210.0.0/16", "via", &eth0.node_v4])
            .status();
        Pod { ns, ip }
    }

    pub fn eni(&self, device: &str) -> &Eni {
        self.enis
            .iter()
            .find(|e| e.device == device)
            .unwrap_or_else(|| panic!("no ENI {device}"))
    }
}

impl Default for SimNode {
    fn default() -> Self {
        Self::new()
    }
}

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
        Scrape::parse(&body)
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
            // query: { u32 target; u32 attach_type; u32 query_flags; u32 attach_flags;
            // u64 prog_ids; u32 count; ... }; a null prog_ids asks for the count only.
            let mut attr = [0u8; 64];
            attr[0..4].copy_from_slice(&ifindex.to_ne_bytes());
            attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
            // SAFETY: a zero-padded query attribute of the size passed.
            let rc = unsafe { libc::syscall(libc::SYS_bpf, 16, attr.as_mut_ptr(), attr.len()) };
            assert_eq!(rc, 0, "BPF_PROG_QUERY: {}", std::io::Error::last_os_error());
            u32::from_ne_bytes(attr[24..28].try_into().unwrap())
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

/// `CLOCK_MONOTONIC`, the clock the agent's per-second counts use.
pub fn monotonic() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap(),
        u32::try_from(ts.tv_nsec).unwrap(),
    )
}

/// Asks for a receive buffer of `bytes` (the kernel rounds small values up).
pub fn set_rcvbuf(sock: &std::net::UdpSocket, bytes: i32) {
    // SAFETY: a valid socket and an int option value.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const bytes).cast(),
            u32::try_from(std::mem::size_of::<i32>()).unwrap(),
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
}

/// A minimal HTTP/1.0 GET from inside `ns`.
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let path = path.to_owned();
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        let (head, body) = resp.split_once("\r\n\r\n")?;
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, body.to_owned()))
    })
}

/// Sends `count` UDP datagrams with `payload` from inside `ns` to `dst`.
pub fn send_udp(ns: &Netns, dst: SocketAddr, count: usize, payload: &[u8]) {
    let payload = payload.to_vec();
    ns.run(move || {
        let bind: SocketAddr = if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
            .parse()
            .unwrap();
        let sock = std::net::UdpSocket::bind(bind).unwrap();
        for _ in 0..count {
            sock.send_to(&payload, dst)
                .unwrap_or_else(|e| panic!("sending to {dst}: {e}"));
        }
    });
}

/// Every `PromQL` expression of a Grafana dashboard, in panel order.
pub fn dashboard_queries(dash: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(e) = target["expr"].as_str() {
                out.push(e.to_owned());
            }
        }
    }
    out
}

/// One scrape of `/metrics`, parsed.
pub struct Scrape {
    pub text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            samples.push((name.to_owned(), labels, value));
        }
        Self {
            text: text.to_owned(),
            samples,
        }
    }

    /// Sum of the samples of `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|(_, v)| v).sum()
    }

    /// The one sample of `name` with exactly these labels, if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
            })
            .map(|(_, _, v)| *v)
    }

    /// Samples of `name` whose labels include all of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (&'a BTreeMap<String, String>, f64)> + 'a {
        self.samples
            .iter()
            .filter(move |(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
            })
            .map(|(_, l, v)| (l, *v))
    }
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(match n {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_owned(), value);
        rest = &after[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openmetrics_samples() {
        let s = Scrape::parse(
            "# TYPE x counter\nx_total{device=\"eth0\",reason=\"NO_SOCKET\"} 3\nx_total{device=\"other\",reason=\"a,b\\\"c\"} 4\nup 1\n# EOF\n",
        );
        assert_eq!(
            s.get("x_total", &[("device", "eth0"), ("reason", "NO_SOCKET")]),
            Some(3.0)
        );
        assert_eq!(s.get("x_total", &[("device", "eth0")]), None);
        assert_eq!(s.sum("x_total", &[]), 7.0);
        assert_eq!(
            s.get("x_total", &[("device", "other"), ("reason", "a,b\"c")]),
            Some(4.0)
        );
        assert_eq!(s.get("up", &[]), Some(1.0));
    }
}
