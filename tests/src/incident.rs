//! The incident, replayed. A node's ENI leads to a hypervisor namespace that forwards to
//! the VPC and tracks connections as EC2 does: `nf_conntrack` with EC2's timeouts,
//! `notrack` for the Amazon resolver, an nftables `ct count over N` drop as the
//! allowance, and a 1024 packets/s limit to the link-local resolver. The agent watches
//! the ENI with `--conntrack-allowance N`; Prometheus and Alertmanager page with the
//! shipped rules. Connections ramp toward the allowance; the page must come before the
//! hypervisor's first drop, and DNS failing after it must page too, naming the ENI.

use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    Agent, Background, Netns,
    dns::{self, OK_NAME, Resolver},
    imds::{Behaviour, FakeImds},
    monitor_bin,
    paging::{Paging, wait_for},
    servers::TcpHold,
};

/// The instance's connection-tracking allowance, in the hypervisor and on the flag.
pub const ALLOWANCE: u32 = 300;
pub const ENI_ID: &str = "eni-0incident00000";
pub const NODE: &str = "node-incident";
const NODE_IP: &str = "10.70.0.10";
const HV_NODE_SIDE: &str = "10.70.0.1";
const HV_VPC_SIDE: &str = "10.71.0.1";
/// The VPC's own resolver (a `CoreDNS` pod, say) and the servers the pods talk to.
pub const VPC_SERVER: &str = "10.71.0.2";
/// The Amazon-provided resolver.
pub const AMAZON_RESOLVER: &str = "169.254.169.253";
const TCP_PORT: u16 = 8000;
/// The ramp: this many connections at once, then one more every `RAMP_STEP`.
const RAMP_START: u32 = 266;
const RAMP_STEP: Duration = Duration::from_secs(4);

/// What happened, in seconds from the start of the ramp.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub critical_alert_at: Option<f64>,
    pub high_alert_at: Option<f64>,
    pub first_drop_at: Option<f64>,
    pub utilization_at_alert: f64,
    pub dns_unanswered_alert_at: Option<f64>,
    pub dns_alert_labels: serde_json::Value,
    pub critical_alert_labels: serde_json::Value,
    pub linklocal_alert_before_drop: bool,
    pub linklocal_alert_labels: serde_json::Value,
    pub linklocal_drops: f64,
    pub linklocal_unanswered: f64,
    pub tracked_when_dropping: f64,
    /// The highest utilization the agent reported while the hypervisor had dropped
    /// nothing yet.
    pub max_utilization_before_drop: f64,
    pub status_screen: String,
    /// The alerts paged for the node while the allowance was exceeded and DNS failed
    /// (each notification's firing alerts), and those that reached Alertmanager but were
    /// inhibited, by name.
    pub paged: Vec<String>,
    pub inhibited: Vec<String>,
    /// When the ramp began and the replay ended, in Unix seconds: the range of the
    /// replay's series in Prometheus.
    pub started_unix: f64,
    pub ended_unix: f64,
}

impl Outcome {
    /// How long before the first drop the page reached Alertmanager.
    pub fn lead(&self) -> Option<f64> {
        Some(self.first_drop_at? - self.critical_alert_at?)
    }
}

/// The node, the hypervisor and the VPC, with the agent, the resolver and the pager.
pub struct Incident {
    pub node: Netns,
    pub hv: Netns,
    pub vpc: Netns,
    pub agent: Agent,
    pub paging: Paging,
    _imds: FakeImds,
    _resolver: Resolver,
    _tcp: TcpHold,
}

impl Incident {
    pub fn build() -> Self {
        let node = Netns::new("node");
        let hv = Netns::new("hv");
        let vpc = Netns::new("vpc");
        for ns in [&node, &hv, &vpc] {
            // IPv4 only: nothing crosses but the replay's own packets.
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
        }
        node.ip(&format!(
            "link add eth0 type veth peer name h0 netns {}",
            hv.name
        ));
        hv.ip(&format!(
            "link add h1 type veth peer name v0 netns {}",
            vpc.name
        ));
        node.ip(&format!("addr add {NODE_IP}/24 dev eth0"));
        hv.ip(&format!("addr add {HV_NODE_SIDE}/24 dev h0"));
        hv.ip(&format!("addr add {HV_VPC_SIDE}/24 dev h1"));
        vpc.ip(&format!("addr add {VPC_SERVER}/24 dev v0"));
        vpc.ip(&format!("addr add {AMAZON_RESOLVER}/32 dev lo"));
        for (ns, dev) in [(&node, "eth0"), (&hv, "h0"), (&hv, "h1"), (&vpc, "v0")] {
            ns.ip(&format!("link set {dev} up"));
        }
        node.ip(&format!("route add default via {HV_NODE_SIDE}"));
        vpc.ip(&format!("route add default via {HV_VPC_SIDE}"));
        hv.ip(&format!("route add {AMAZON_RESOLVER}/32 via {VPC_SERVER}"));
        hv.sysctl("net.ipv4.ip_forward", "1");
        // EC2's tracking, as the hypervisor's.
        hv.nft(&format!(
            "table inet ec2 {{
  counter allowance_drops {{}}
  counter linklocal_drops {{}}
  chain raw {{
    type filter hook prerouting priority raw; policy accept;
    ip daddr {AMAZON_RESOLVER} notrack
    ip saddr {AMAZON_RESOLVER} notrack
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ip daddr {AMAZON_RESOLVER} limit rate over 1024/second burst 1024 packets counter name \"linklocal_drops\" drop
    ct state new ct count over {ALLOWANCE} counter name \"allowance_drops\" drop
  }}
}}
"
        ));
        for (key, value) in [
            (
                "net.netfilter.nf_conntrack_tcp_timeout_established",
                "432000",
            ),
            ("net.netfilter.nf_conntrack_udp_timeout", "30"),
            ("net.netfilter.nf_conntrack_udp_timeout_stream", "180"),
        ] {
            hv.sysctl(key, value);
        }
        let resolver = Resolver::start(
            &vpc,
            &[
                VPC_SERVER.parse().expect("an address"),
                AMAZON_RESOLVER.parse().expect("an address"),
            ],
        );
        let tcp = TcpHold::start(
            &vpc,
            SocketAddr::new(VPC_SERVER.parse().expect("an address"), TCP_PORT),
        );
        // The ENI's id from a stand-in IMDS; its VPC+2 is nobody here.
        let imds = FakeImds::start(
            &node,
            Behaviour::Serve {
                enis: vec![(
                    node.mac("eth0"),
                    ENI_ID.to_owned(),
                    "10.80.0.0/16".to_owned(),
                )],
                instance_type: "m5.large",
            },
        );
        let allowance = ALLOWANCE.to_string();
        let endpoint = imds.endpoint();
        let agent = Agent::start(
            &node,
            &[
                "--device",
                "eth0",
                "--conntrack-allowance",
                &allowance,
                "--imds-endpoint",
                &endpoint,
            ],
        );
        let paging = Paging::start(&node, agent.listen, NODE);
        Self {
            node,
            hv,
            vpc,
            agent,
            paging,
            _imds: imds,
            _resolver: resolver,
            _tcp: tcp,
        }
    }

    /// A named counter of the hypervisor's ruleset, in packets.
    pub fn hv_drops(&self, counter: &str) -> f64 {
        let out = crate::sh(
            self.hv
                .command("nft")
                .args(["-j", "list", "counter", "inet", "ec2", counter]),
        );
        let v: serde_json::Value = serde_json::from_str(&out).expect("nft's JSON");
        v["nftables"]
            .as_array()
            .and_then(|a| a.iter().find_map(|o| o["counter"]["packets"].as_f64()))
            .unwrap_or(0.0)
    }

    fn utilization(&self) -> f64 {
        self.agent
            .scrape(&self.node)
            .get("eni_monitor_conntrack_allowance_utilization_ratio", &[])
            .unwrap_or(0.0)
    }

    /// The first alert named `alertname` with `labels` in Alertmanager, paged or
    /// inhibited, if any.
    fn alert(&self, alertname: &str, labels: &[(&str, &str)]) -> Option<serde_json::Value> {
        self.paging
            .received(&self.node, alertname, labels)
            .into_iter()
            .next()
    }

    /// The names of the alerts for the node paged so far, in the order they were.
    pub fn paged(&self) -> Vec<String> {
        let mut names = Vec::new();
        for page in self.paging.pages() {
            for a in page["alerts"].as_array().into_iter().flatten() {
                let name = a["labels"]["alertname"].as_str().unwrap_or_default();
                if a["status"] == "firing"
                    && a["labels"]["node"] == NODE
                    && !names.iter().any(|n| n == name)
                {
                    names.push(name.to_owned());
                }
            }
        }
        names
    }

    /// Which of the alerts the allowance's page stands for reached Alertmanager for the
    /// node and are kept quiet by an inhibit rule.
    fn inhibited(&self) -> Vec<String> {
        [
            "EniMonitorConntrackAllowanceHigh",
            "EniMonitorConntrackAllowanceExhaustionPredicted",
            "EniMonitorDnsUnanswered",
            "EniMonitorDnsTcpConnectFailures",
            "EniMonitorDnsPacketsDropped",
        ]
        .into_iter()
        .filter(|name| {
            self.paging
                .received(&self.node, name, &[("node", NODE)])
                .iter()
                .any(|a| {
                    a["status"]["state"] == "suppressed"
                        && a["status"]["inhibitedBy"]
                            .as_array()
                            .is_some_and(|by| !by.is_empty())
                })
        })
        .map(str::to_owned)
        .collect()
    }

    /// Runs the replay, telling `say` each step as it happens (seconds, what).
    pub fn replay(&self, say: &mut dyn FnMut(f64, &str)) -> Outcome {
        let mut out = Outcome {
            started_unix: unix_now(),
            ..Outcome::default()
        };
        let start = Instant::now();
        let held = self.ramp(&mut out, start, say);
        self.dns_fails(&mut out, start, say);
        self.linklocal(&mut out, start, say);
        drop(held);
        out.ended_unix = unix_now();
        out
    }

    /// Connections ramp until the hypervisor drops one; the held connections returned.
    fn ramp(
        &self,
        out: &mut Outcome,
        start: Instant,
        say: &mut dyn FnMut(f64, &str),
    ) -> Arc<Mutex<Vec<TcpStream>>> {
        let at = |start: Instant| start.elapsed().as_secs_f64();

        // Connections ramp toward the allowance: RAMP_START at once, then one more every
        // RAMP_STEP, held open (idle, as EC2 keeps tracking them for days).
        let server = SocketAddr::new(VPC_SERVER.parse().expect("an address"), TCP_PORT);
        let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let ramp = {
            let (held, stop) = (Arc::clone(&held), Arc::clone(&stop));
            let ns = self.node.name.clone();
            Background::spawn(move |bg_stop| {
                crate::enter(&ns);
                let connect = || TcpStream::connect_timeout(&server, Duration::from_secs(1));
                for _ in 0..RAMP_START {
                    if let Ok(c) = connect() {
                        held.lock().expect("not poisoned").push(c);
                    }
                }
                while !stop.load(Ordering::Relaxed) && !bg_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(RAMP_STEP);
                    if let Ok(c) = connect() {
                        held.lock().expect("not poisoned").push(c);
                    }
                }
            })
        };
        say(
            0.0,
            &format!(
                "ramp: {RAMP_START} connections, then one more every {RAMP_STEP:?}; allowance {ALLOWANCE}"
            ),
        );
        let mut last_shown = -10.0;
        wait_for(
            "the hypervisor's first drop",
            Duration::from_mins(5),
            || {
                let t = at(start);
                let u = self.utilization();
                if t - last_shown >= 10.0 {
                    say(
                        t,
                        &format!(
                            "utilization {:.1}%, {} connections held",
                            u * 100.0,
                            held.lock().expect("not poisoned").len()
                        ),
                    );
                    last_shown = t;
                }
                for (name, slot) in [
                    (
                        "EniMonitorConntrackAllowanceCritical",
                        &mut out.critical_alert_at,
                    ),
                    ("EniMonitorConntrackAllowanceHigh", &mut out.high_alert_at),
                ] {
                    if slot.is_none()
                        && let Some(a) = self.alert(name, &[("node", NODE)])
                    {
                        *slot = Some(t);
                        if name.ends_with("Critical") {
                            out.utilization_at_alert = u;
                            out.critical_alert_labels = a["labels"].clone();
                        }
                        say(
                            t,
                            &format!(
                                "{name} reached Alertmanager ({:.1}%): {}",
                                u * 100.0,
                                a["annotations"]["summary"]
                            ),
                        );
                    }
                }
                let drops = self.hv_drops("allowance_drops");
                if drops == 0.0 {
                    out.max_utilization_before_drop = out.max_utilization_before_drop.max(u);
                } else {
                    out.first_drop_at = Some(t);
                    out.tracked_when_dropping = u * f64::from(ALLOWANCE);
                    say(
                        t,
                        "the hypervisor drops its first new connection: the allowance is exceeded",
                    );
                }
                drops > 0.0
            },
        );
        stop.store(true, Ordering::Relaxed);
        drop(ramp);
        if let Some(lead) = out.lead() {
            say(
                at(start),
                &format!("the page came {lead:.0} s before the first drop"),
            );
        }
        held
    }

    /// DNS through the ENI fails once the allowance is exceeded: it must page.
    fn dns_fails(&self, out: &mut Outcome, start: Instant, say: &mut dyn FnMut(f64, &str)) {
        let at = |start: Instant| start.elapsed().as_secs_f64();
        // DNS through the ENI now fails: each query is a new flow the hypervisor drops.
        let querying = Arc::new(AtomicBool::new(true));
        let querier = {
            let ns = self.node.name.clone();
            let querying = Arc::clone(&querying);
            Background::spawn(move |bg_stop| {
                crate::enter(&ns);
                let server = SocketAddr::new(VPC_SERVER.parse().expect("an address"), 53);
                let mut id = 0u16;
                while querying.load(Ordering::Relaxed) && !bg_stop.load(Ordering::Relaxed) {
                    id = id.wrapping_add(1);
                    if let Ok(s) = UdpSocket::bind("0.0.0.0:0") {
                        let _ = s.send_to(&dns::query_packet(OK_NAME, id), server);
                    }
                    // Once a second a client falls back to TCP (a truncated answer, say):
                    // its SYN is a new connection, and the hypervisor drops it.
                    if id.is_multiple_of(4) {
                        let _ = TcpStream::connect_timeout(&server, Duration::from_millis(100));
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            })
        };
        say(
            at(start),
            &format!(
                "pods query their resolver at {VPC_SERVER}, 4 a second over UDP and once over TCP"
            ),
        );
        wait_for("the DNS alert", Duration::from_mins(5), || {
            let Some(a) = self.alert("EniMonitorDnsUnanswered", &[("device", "eth0")]) else {
                return false;
            };
            out.dns_unanswered_alert_at = Some(at(start));
            out.dns_alert_labels = a["labels"].clone();
            say(
                at(start),
                &format!(
                    "EniMonitorDnsUnanswered reached Alertmanager: {}",
                    a["annotations"]["summary"]
                ),
            );
            true
        });
        out.paged = self.paged();
        out.inhibited = self.inhibited();
        say(
            at(start),
            &format!(
                "pages for {NODE} so far: {}; inhibited: {}",
                out.paged.join(", "),
                out.inhibited.join(", ")
            ),
        );
        out.status_screen = self.status();
        say(
            at(start),
            &format!("`monitor status` on the node:\n{}", out.status_screen),
        );
        querying.store(false, Ordering::Relaxed);
        drop(querier);
    }

    /// The link-local allowance: a burst under the limit pages before one over it drops.
    fn linklocal(&self, out: &mut Outcome, start: Instant, say: &mut dyn FnMut(f64, &str)) {
        let at = |start: Instant| start.elapsed().as_secs_f64();
        // The link-local allowance: a burst under 1024 packets/s pages before a burst
        // over it is dropped.
        let amazon = SocketAddr::new(AMAZON_RESOLVER.parse().expect("an address"), 53);
        // A pod that reads none of its answers: this kernel drops them on eth0, and the
        // dashboard's kernel-drop panel shows it (the bursts' own losses fall on either
        // side, the client's socket or the server's, as the two keep pace).
        dns::unread(&self.node, amazon, OK_NAME, 100);
        let eth0 = [("device", "eth0")];
        let s = self
            .agent
            .scrape_until(&self.node, "the kernel's DNS drops on eth0", |s| {
                s.sum("eni_monitor_dns_drops_total", &eth0) > 0.0
            });
        say(
            at(start),
            &format!(
                "a pod reads none of 100 answers: this kernel dropped {} DNS packets on eth0",
                s.sum("eni_monitor_dns_drops_total", &eth0)
            ),
        );
        let answered = dns::burst(&self.node, amazon, OK_NAME, 900);
        say(
            at(start),
            &format!("a burst of 900 queries to {AMAZON_RESOLVER}: {answered} answered"),
        );
        wait_for("the link-local alert", Duration::from_mins(1), || {
            let Some(a) = self.alert("EniMonitorLinkLocalPeakHigh", &[("device", "eth0")]) else {
                return false;
            };
            out.linklocal_alert_labels = a["labels"].clone();
            out.linklocal_alert_before_drop = self.hv_drops("linklocal_drops") == 0.0;
            say(
                at(start),
                &format!(
                    "EniMonitorLinkLocalPeakHigh reached Alertmanager: {}",
                    a["annotations"]["summary"]
                ),
            );
            true
        });
        let answered = dns::burst(&self.node, amazon, OK_NAME, 1500);
        out.linklocal_drops = self.hv_drops("linklocal_drops");
        say(
            at(start),
            &format!(
                "a burst of 1500: {answered} answered, {} dropped by the hypervisor's 1024 packets/s",
                out.linklocal_drops
            ),
        );
        let resolver = [("device", "eth0"), ("resolver", AMAZON_RESOLVER)];
        let s = self
            .agent
            .scrape_until(&self.node, "the dropped queries unanswered", |s| {
                s.sum("eni_monitor_dns_unanswered_total", &resolver) >= out.linklocal_drops
            });
        out.linklocal_unanswered = s.sum("eni_monitor_dns_unanswered_total", &resolver);
    }

    /// `monitor status` against the agent, from the node, as `kubectl exec` would run it.
    pub fn status(&self) -> String {
        let out = self
            .node
            .command(monitor_bin().to_str().expect("a UTF-8 path"))
            .args([
                "status",
                "--interval",
                "2s",
                "--endpoint",
                &format!("http://{}", self.agent.listen),
            ])
            .output()
            .expect("running monitor status");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Whether Debian's packages the replay uses are installed.
pub fn runnable() -> bool {
    ["prometheus", "prometheus-alertmanager", "unbound", "nft"]
        .iter()
        .all(|p| crate::have(p))
}
