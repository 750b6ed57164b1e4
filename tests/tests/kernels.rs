//! The kernel matrix: every kernel of README.md's Kernels table, booted under qemu with the
//! release agent and `tests/vm/scenario.sh`, must hold every scenario exactly.
#![allow(clippy::float_cmp)]

use integration_tests::{
    HOOKS, Scrape, kernels, require_root,
    vm::{Arch, Console, Kernel},
};

const ATTACHED: &str = "eni_monitor_program_attached";
const DROPS: &str = "eni_monitor_drops_total";
const DNS_DROPS: &str = "eni_monitor_dns_drops_total";
const TRACKED: &str = "eni_monitor_tracked_flows";
const CREATED: &str = "eni_monitor_flows_created_total";
const QUERIES: &str = "eni_monitor_dns_queries_total";
const RESPONSES: &str = "eni_monitor_dns_responses_total";
const UNANSWERED: &str = "eni_monitor_dns_unanswered_total";

/// What a kernel has, as the scenario should find it.
struct Expect {
    kernel: Kernel,
    /// The kernel's version string starts with this.
    release: &'static str,
    /// TCX (6.6+): classifiers attach without clsact and die with the agent.
    tcx: bool,
    /// The drop reason the kernel gives a datagram to a closed port.
    no_socket: &'static str,
    /// `bpf_loop` (5.17+): every DNS message of a TCP segment is read.
    bpf_loop: bool,
}

impl Expect {
    /// What the matrix's row `name` says of its kernel.
    fn of(name: &str) -> Self {
        let row = kernels::named(name);
        Self {
            kernel: Kernel {
                name: row.name,
                lockdown: row.lockdown,
                arch: if row.arm64 {
                    Arch::Aarch64
                } else {
                    Arch::X86_64
                },
            },
            release: row.release,
            tcx: row.tcx,
            no_socket: row.no_socket,
            bpf_loop: row.bpf_loop,
        }
    }
}

fn boot(expect: &Expect) -> Option<Console> {
    let name = expect.kernel.name;
    if !require_root(&format!("kernel {name}")) {
        return None;
    }
    if let Some(missing) = expect.kernel.missing() {
        assert!(
            std::env::var_os("CI").is_none(),
            "kernel {name}: missing {missing} (`cargo xtask test` fetches and builds them)"
        );
        eprintln!(
            "skipping kernel {name}: missing {missing} (run `cargo xtask setup` and `cargo xtask build --target aarch64`)"
        );
        return None;
    }
    let console = expect.kernel.boot();
    eprintln!(
        "kernel {name}: boot and scenario took {:?}",
        console.elapsed
    );
    Some(console)
}

fn attached(s: &Scrape, program: &str, device: &str) -> Option<f64> {
    s.matching(ATTACHED, &[("program", program), ("device", device)])
        .map(|(_, v)| v)
        .next()
}

/// The console of one boot, with the kernel's expectations.
struct Run<'a> {
    c: &'a Console,
    expect: &'a Expect,
}

impl Run<'_> {
    fn fail(&self, what: &str) -> String {
        format!("kernel {}: {what}\n{}", self.c.kernel, self.c.text)
    }

    fn scrape(&self, block: &str) -> Scrape {
        let text = self.c.block(block);
        Scrape::parse(&text).unwrap_or_else(|e| panic!("block {block}: {e}\n{text}"))
    }

    fn by_reason(&self) -> [(&'static str, &'static str); 2] {
        [("device", "eth0"), ("reason", self.expect.no_socket)]
    }

    fn kernel(&self) {
        let release = self.c.mark("KERNEL").unwrap_or_default();
        assert!(
            release.starts_with(self.expect.release),
            "{}",
            self.fail("not the kernel expected")
        );
        if self.expect.kernel.lockdown {
            let lockdown = self.c.mark("LOCKDOWN").unwrap_or_default();
            assert!(
                lockdown.contains("[integrity]"),
                "{}",
                self.fail("lockdown")
            );
        }
    }

    /// Without `sch_ingress` and `cls_bpf` a kernel before TCX cannot take a classifier: the
    /// agent says so in `program_attached` and `/readyz`. On TCX nothing is missing.
    /// What the verifier walked of each classifier, against its limit of a million: a
    /// fifth of it spare on every kernel that says (5.16+; those with `bpf_loop` do), so
    /// that the next branch in the flow path fails here, not on a node.
    fn verifier_margin(&self) {
        if !self.expect.bpf_loop {
            return;
        }
        let block = self.c.block("verifier");
        for program in ["tc_ingress", "tc_egress"] {
            let walked: u64 = block
                .lines()
                .find_map(|l| l.strip_prefix(program)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("{}", self.fail(program)));
            eprintln!(
                "kernel {}: the verifier walked {walked} instructions of {program}",
                self.c.kernel
            );
            assert!(
                walked <= 800_000,
                "kernel {}: {program}: the verifier walked {walked} of its 1 000 000 instructions",
                self.c.kernel
            );
        }
    }

    fn without_modules(&self) {
        let s = self.scrape("no-modules");
        for program in ["kfree_skb", "udp_fail_queue_rcv_skb"] {
            assert_eq!(
                attached(&s, program, ""),
                Some(1.0),
                "{}",
                self.fail(program)
            );
        }
        let tc = if self.expect.tcx { 1.0 } else { 0.0 };
        for program in ["tc_ingress", "tc_egress"] {
            assert_eq!(
                attached(&s, program, "eth0"),
                Some(tc),
                "{}",
                self.fail(program)
            );
        }
        let expected = if self.expect.tcx {
            "200\nready"
        } else {
            "503\nnot attached: tc/ingress on eth0, tc/egress on eth0"
        };
        assert_eq!(
            self.c.block("no-modules-readyz"),
            expected,
            "{}",
            self.fail("readyz")
        );
    }

    /// With the modules every hook attaches, nothing prepared by hand, and the drops
    /// through eth0 are exact: 5 plain and 3 DNS datagrams to closed ports.
    fn drops(&self) {
        let s = self.scrape("drops");
        assert_eq!(
            self.c.block("drops-readyz"),
            "200\nready",
            "{}",
            self.fail("readyz")
        );
        for (program, device) in HOOKS {
            assert_eq!(
                attached(&s, program, device),
                Some(1.0),
                "{}",
                self.fail(program)
            );
        }
        let by_reason = self.by_reason();
        assert_eq!(
            s.sum(DROPS, &[("device", "eth0")]),
            8.0,
            "{}",
            self.fail("drops")
        );
        assert_eq!(
            s.sum(DROPS, &by_reason),
            8.0,
            "{}",
            self.fail("drop reason")
        );
        assert_eq!(
            s.sum(DNS_DROPS, &by_reason),
            3.0,
            "{}",
            self.fail("DNS drops")
        );
    }

    /// Flows leaving through eth0: 20 UDP flows and 5 held TCP connections.
    fn flows(&self) {
        assert_eq!(
            self.c.block("tcp-hold"),
            "held 5",
            "{}",
            self.fail("tcp-hold")
        );
        let before = self.scrape("drops");
        let s = self.scrape("flows");
        let on_eth0 = |s: &Scrape, metric, protocol| {
            s.sum(metric, &[("device", "eth0"), ("protocol", protocol)])
        };
        assert_eq!(
            on_eth0(&s, TRACKED, "tcp"),
            5.0,
            "{}",
            self.fail("tcp tracked")
        );
        assert_eq!(
            on_eth0(&s, CREATED, "tcp"),
            5.0,
            "{}",
            self.fail("tcp created")
        );
        assert_eq!(
            on_eth0(&s, CREATED, "udp") - on_eth0(&before, CREATED, "udp"),
            20.0,
            "{}",
            self.fail("udp created")
        );
        // With 600 s UDP timeouts nothing expires during the scenario: every flow created
        // is still tracked.
        assert_eq!(
            on_eth0(&s, TRACKED, "udp"),
            on_eth0(&s, CREATED, "udp"),
            "{}",
            self.fail("udp tracked")
        );
    }

    /// DNS through eth0: 10 NOERROR and 3 NXDOMAIN, all answered, under the resolver's
    /// name (the one query before it was named under `other`); over TCP 3, 40 and 200
    /// pipelined, every one read where the kernel has `bpf_loop`, and 4 a segment where
    /// it has not, with the segments past that counted unread.
    fn dns(&self) {
        assert_eq!(
            self.c.block("dns-client"),
            "answered 10\nanswered 3",
            "{}",
            self.fail("dns client")
        );
        assert_eq!(
            self.c.block("dns-tcp"),
            "answered 3\nanswered 40",
            "{}",
            self.fail("dns over tcp client")
        );
        assert_eq!(
            self.c.block("dns-tcp-200"),
            "answered 200\nrefused 1",
            "{}",
            self.fail("dns over tcp client")
        );
        let server = [("device", "eth0"), ("resolver", "10.0.0.2")];
        let tcp = [server[0], server[1], ("transport", "tcp")];
        let unread = |s: &Scrape| s.sum("eni_monitor_dns_tcp_unread_segments_total", &[]);
        // The 40 were written at once, less than a segment: one segment, all of it read
        // or 4 of it. Each of the 4 queries read is answered in a segment whose first 4
        // answers it is among, however the server's answers are cut.
        let forty = self.scrape("dns-tcp-40");
        let read = if self.expect.bpf_loop { 43.0 } else { 7.0 };
        assert_eq!(forty.sum(QUERIES, &tcp), read, "{}", self.fail("40 read"));
        assert_eq!(
            forty.sum(RESPONSES, &tcp),
            read,
            "{}",
            self.fail("40 answered")
        );
        if self.expect.bpf_loop {
            assert_eq!(unread(&forty), 0.0, "{}", self.fail("40 unread"));
        } else {
            assert!(unread(&forty) >= 1.0, "{}", self.fail("40 unread"));
        }
        let s = self.scrape("dns");
        assert_eq!(
            s.sum(QUERIES, &[server[0], server[1], ("transport", "udp")]),
            13.0,
            "{}",
            self.fail("udp")
        );
        for (rcode, n) in [("NOERROR", 10.0), ("NXDOMAIN", 3.0)] {
            let labels = [server[0], server[1], ("rcode", rcode), ("transport", "udp")];
            assert_eq!(s.sum(RESPONSES, &labels), n, "{}", self.fail(rcode));
        }
        let queries = s.sum(QUERIES, &tcp);
        let answered = s.sum(RESPONSES, &[server[0], server[1], ("transport", "tcp")]);
        let latency = s.sum("eni_monitor_dns_latency_seconds_count", &tcp);
        let unanswered = s.sum(UNANSWERED, &[server[0], server[1], ("transport", "tcp")]);
        if self.expect.bpf_loop {
            assert_eq!(
                (queries, answered, latency, unanswered, unread(&s)),
                (243.0, 243.0, 243.0, 0.0, 0.0),
                "{}",
                self.fail("tcp: queries, answered, latency, unanswered, unread")
            );
        } else {
            // How the 200 were cut into segments is the kernel's to choose: at least
            // 4 of them read, and the segment they came in counted unread.
            assert!(
                queries >= 7.0 + 4.0 && answered == latency && answered <= queries,
                "{}",
                self.fail("tcp: 200 read to the bound")
            );
            assert!(unread(&s) > unread(&forty), "{}", self.fail("200 unread"));
        }
        let other = [("device", "eth0"), ("resolver", "other")];
        assert_eq!(s.sum(QUERIES, &other), 1.0, "{}", self.fail("other"));
        assert_eq!(
            s.sum(UNANSWERED, &[("device", "eth0"), ("transport", "udp")]),
            0.0,
            "{}",
            self.fail("unanswered")
        );
        assert_eq!(
            s.sum("eni_monitor_dns_tcp_connect_failures_total", &other),
            1.0,
            "{}",
            self.fail("refused")
        );
    }

    /// A DNS socket that never reads: every datagram that did not fit its queue is one
    /// receive-queue drop on the DNS port and one DNS drop on eth0.
    fn overflow(&self) {
        let queued: f64 = self
            .c
            .block("udp-full")
            .strip_prefix("queued ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{}", self.fail("udp-full printed no count")));
        let overflowed = 200.0 - queued;
        assert!(overflowed >= 100.0, "{}", self.fail("too few overflowed"));
        let before = self.scrape("dns");
        let s = self.scrape("overflow");
        let queue = |s: &Scrape, port| {
            s.sum(
                "eni_monitor_udp_receive_queue_drops_total",
                &[("port", port)],
            )
        };
        assert_eq!(queue(&s, "dns"), overflowed, "{}", self.fail("queue drops"));
        assert_eq!(
            queue(&s, "other"),
            0.0,
            "{}",
            self.fail("other queue drops")
        );
        let eth0 = [("device", "eth0")];
        assert_eq!(
            s.sum(DNS_DROPS, &eth0) - before.sum(DNS_DROPS, &eth0),
            overflowed,
            "{}",
            self.fail("DNS drops on eth0")
        );
    }

    /// SIGKILL: TCX links die with the agent; `cls_bpf` filters stay behind, and the
    /// restarted agent replaces them: one classifier per hook, never two. Another tool's
    /// filter on ingress, whose program has our classifier's name (a pin of it), is left
    /// where it is by every agent.
    fn restart(&self) {
        let count = |block: &str, kind: &str, program: &str| {
            self.c
                .block(block)
                .lines()
                .filter(|l| l.starts_with(kind) && l.ends_with(program))
                .count()
        };
        let netlink = usize::from(!self.expect.tcx);
        for (dir, program) in [("ingress", "tc_ingress"), ("egress", "tc_egress")] {
            let filter = format!("filter {dir}");
            let foreign = usize::from(dir == "ingress");
            for (block, kind, n) in [
                ("classifiers-attached", filter.as_str(), netlink),
                ("classifiers-attached", "loaded", 1),
                ("classifiers-killed", filter.as_str(), netlink + foreign),
                ("classifiers-restarted", filter.as_str(), netlink + foreign),
                ("classifiers-restarted", "loaded", 1 + foreign),
            ] {
                assert_eq!(
                    count(block, kind, program),
                    n,
                    "{}",
                    self.fail(&format!("{block}: {kind} {program}"))
                );
            }
        }
        assert_eq!(
            self.c.block("foreign-filter"),
            "1",
            "{}",
            self.fail("the foreign filter")
        );
        // The state was pinned: the held connections are still tracked, and the
        // counters go on from where the killed agent left them.
        let s = self.scrape("restarted");
        let before = self.scrape("overflow");
        assert_eq!(
            self.c.block("restarted-readyz"),
            "200\nready",
            "{}",
            self.fail("readyz")
        );
        assert_eq!(
            s.sum(DROPS, &self.by_reason()),
            before.sum(DROPS, &self.by_reason()) + 4.0,
            "{}",
            self.fail("drops go on after the restart")
        );
        let tcp = [("device", "eth0"), ("protocol", "tcp")];
        assert_eq!(
            s.sum(TRACKED, &tcp),
            5.0,
            "{}",
            self.fail("tracked after restart")
        );
        // The held connections, and the four of DNS over TCP (closed since).
        assert_eq!(
            s.sum(CREATED, &tcp),
            9.0,
            "{}",
            self.fail("created after restart")
        );
        assert!(
            self.c
                .block("agent-log")
                .contains("continuing from the state in"),
            "{}",
            self.fail("continued")
        );
        let log = self.c.block("agent-log");
        assert!(!log.contains("panicked"), "{}", self.fail("panic"));
        let replaced = if self.expect.tcx { 0 } else { 2 };
        assert_eq!(
            log.matches("a previous agent left on eth0").count(),
            replaced,
            "{}",
            self.fail("stale filters replaced")
        );
        // A kernel without drop reasons is said once.
        let unknown = usize::from(self.expect.no_socket == "unknown");
        assert_eq!(
            log.matches("passes no drop reason on this kernel").count(),
            unknown,
            "{}",
            self.fail("no drop reason said once")
        );
        assert_eq!(
            self.c.marks("AGENT-EXIT"),
            ["0", "0"],
            "{}",
            self.fail("exit status")
        );
    }
}

impl Run<'_> {
    /// On the arm64 guests, the probe tests of two CPUs writing one flow at once (`-smp
    /// 2`): each of the three passes, as on x86.
    fn probes(&self) {
        if self.expect.kernel.arch != Arch::Aarch64 {
            return;
        }
        let block = self.c.block("probes");
        for test in [
            "cpus::two_cpus_beginning_one_flow_begin_it_once",
            "cpus::two_cpus_closing_one_flow_at_once_both_fins_stay",
            "cpus::a_pass_freeing_slots_under_packets_loses_and_doubles_nothing",
        ] {
            assert!(
                block.contains(&format!("test {test} ... ok")),
                "{}",
                self.fail(test)
            );
        }
        assert!(
            block.contains("test result: ok. 3 passed"),
            "{}",
            self.fail("probes")
        );
    }
}

fn check(expect: &Expect) {
    let Some(c) = boot(expect) else { return };
    let run = Run { c: &c, expect };
    run.kernel();
    run.without_modules();
    run.verifier_margin();
    run.drops();
    run.flows();
    run.dns();
    run.overflow();
    run.restart();
    run.probes();
}

/// The agent's kernel maps, idle, with the defaults: 16 MiB at most on 2 CPUs, and at
/// most 0.1 MiB more per CPU, measured by booting the same kernel with 2 and 8 vCPUs.
#[test]
fn kernel_map_memory_fits_and_grows_little_per_cpu() {
    let kernel = Expect::of("6.12").kernel;
    if !require_root("kernel map memory") {
        return;
    }
    if let Some(missing) = kernel.missing() {
        assert!(
            std::env::var_os("CI").is_none(),
            "kernel 6.12: missing {missing}"
        );
        eprintln!("skipping: kernel 6.12: missing {missing} (run `cargo xtask setup`)");
        return;
    }
    let memory = |cpus: u32| {
        let c = kernel.boot_with(cpus, "memory");
        assert_eq!(c.mark("CPUS"), Some(cpus.to_string().as_str()));
        let s = Scrape::parse(&c.block("memory")).unwrap_or_else(|e| panic!("{e}"));
        s.get("eni_monitor_kernel_map_memory_bytes", &[])
            .unwrap_or_else(|| panic!("no map memory on {cpus} CPUs:\n{}", c.text))
    };
    let (two, eight) = (memory(2), memory(8));
    let mib = 1024.0 * 1024.0;
    let per_cpu = (eight - two) / 6.0 / mib;
    eprintln!(
        "kernel map memory: {:.2} MiB on 2 CPUs, {:.2} MiB on 8: {per_cpu:.3} MiB per CPU",
        two / mib,
        eight / mib
    );
    assert!(two <= 16.0 * mib, "{:.2} MiB on 2 CPUs", two / mib);
    assert!(per_cpu <= 0.1, "{per_cpu:.3} MiB per CPU");
}

#[test]
fn linux_5_10_amazon_linux_2() {
    check(&Expect::of("5.10"));
}

#[test]
fn linux_6_1_al2023_bottlerocket_under_lockdown() {
    check(&Expect::of("6.1"));
}

#[test]
fn linux_6_12_under_lockdown_on_tcx() {
    check(&Expect::of("6.12"));
}

#[test]
fn linux_5_10_amazon_linux_2_on_graviton() {
    check(&Expect::of("arm64-5.10"));
}

#[test]
fn linux_6_1_on_graviton_under_lockdown() {
    check(&Expect::of("arm64-6.1"));
}

#[test]
fn linux_6_12_on_graviton_under_lockdown_on_tcx() {
    check(&Expect::of("arm64-6.12"));
}

/// README's Kernels table has a row for each kernel of the matrix, booted from the suite
/// the matrix fetches it from.
#[test]
fn the_readme_names_every_kernel_of_the_matrix() {
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
    )
    .unwrap();
    for row in kernels::ROWS {
        let shown = row.name.replace("arm64-", "arm64 ");
        let line = readme
            .lines()
            .find(|l| l.starts_with(&format!("| {shown} (")))
            .unwrap_or_else(|| panic!("README's Kernels table has no row for {}", row.name));
        assert!(
            line.contains(&format!("Debian {} ", row.suite))
                || line.contains(&format!("Debian {} |", row.suite)),
            "{}: {line}",
            row.name
        );
    }
}
