//! The EC2 connection-tracking model: which flows EC2 still tracks, by its idle
//! timeouts, and who owns them. The expiry pass (housekeeping) applies it to the
//! classifiers' flow table; the collectors publish what it found.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use monitor_common::{
    Addr, FLOW_AB, FLOW_BA, FLOW_FIN_AB, FLOW_FIN_BA, FLOW_LOCAL_A, FLOW_LOCAL_B,
    FLOW_RECENT_GRACE_PERIODS, FLOW_RECENT_PERIOD_S, FLOW_RST, Flow, FlowClass, FlowKey,
    proto::IPPROTO_TCP,
};

use super::top::top_per_device;

/// How long EC2 keeps tracking a TCP connection once it has closed (both FINs, or RST).
pub const TCP_CLOSED_TIMEOUT: Duration = Duration::from_secs(5);

/// How long past EC2's established timeout the agent keeps an established TCP flow:
/// `FLOW_RECENT_GRACE_PERIODS` refresh periods.
pub const TCP_ESTABLISHED_GRACE: Duration =
    Duration::from_secs((FLOW_RECENT_GRACE_PERIODS * FLOW_RECENT_PERIOD_S) as u64);

/// EC2's idle tracking timeouts (`--tcp-established-timeout` and friends).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub tcp_established: Duration,
    pub udp: Duration,
    pub udp_stream: Duration,
}

/// Which of EC2's timeouts a tracked flow is under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimeoutClass {
    TcpEstablished,
    /// Closed (both FINs, or RST): tracked a few seconds more.
    TcpClosed,
    /// Seen one way (ICMP and the rest are treated as UDP).
    Udp,
    /// Seen both ways.
    UdpStream,
}

impl TimeoutClass {
    pub const ALL: [Self; 4] = [
        Self::TcpEstablished,
        Self::TcpClosed,
        Self::Udp,
        Self::UdpStream,
    ];

    pub fn of(key: &FlowKey, flow: &Flow) -> Self {
        let both_ways = flow.flags() & (FLOW_AB | FLOW_BA) == (FLOW_AB | FLOW_BA);
        match key.proto {
            IPPROTO_TCP => {
                let closed = flow.flags() & FLOW_RST != 0
                    || flow.flags() & (FLOW_FIN_AB | FLOW_FIN_BA) == (FLOW_FIN_AB | FLOW_FIN_BA);
                if closed {
                    Self::TcpClosed
                } else {
                    Self::TcpEstablished
                }
            }
            _ if both_ways => Self::UdpStream,
            _ => Self::Udp,
        }
    }

    /// The bounds of `IDLE_BOUNDS` the idle view shows for the class: the timeouts a user
    /// can set for it (closed TCP is tracked seconds only: its total alone).
    pub fn idle_bounds(self) -> &'static [u32] {
        match self {
            Self::TcpEstablished => &IDLE_BOUNDS[1..],
            Self::TcpClosed => &[],
            Self::Udp => &IDLE_BOUNDS[..2],
            Self::UdpStream => &IDLE_BOUNDS[1..4],
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::TcpEstablished => "tcp_established",
            Self::TcpClosed => "tcp_closed",
            Self::Udp => "udp",
            Self::UdpStream => "udp_stream",
        }
    }
}

/// The idle ages (seconds) the idle view counts flows under: the timeouts a user can
/// set on an ENI (TCP established 60-432000 s, UDP stream 60-180 s, UDP 30-60 s) at the
/// values worth weighing, 350 s being Nitro v6's default. Each class shows its own
/// (`TimeoutClass::idle_bounds`).
pub const IDLE_BOUNDS: [u32; 11] = [
    30, 60, 120, 180, 350, 600, 1800, 3600, 21_600, 86_400, 432_000,
];

/// Tracked flows by how long they have been idle: `[i]` counts those idle less than
/// `IDLE_BOUNDS[i]` seconds and not less than the bound before; the last, the rest.
pub type IdleAges = [u64; IDLE_BOUNDS.len() + 1];

/// The bucket of `IdleAges` a flow idle `idle` seconds falls in.
pub fn idle_bucket(idle: u32) -> usize {
    IDLE_BOUNDS.partition_point(|b| *b <= idle)
}

impl Timeouts {
    /// How long `flow` stays tracked after it was last seen.
    pub fn for_flow(&self, key: &FlowKey, flow: &Flow) -> Duration {
        self.for_class(TimeoutClass::of(key, flow))
    }

    fn for_class(&self, class: TimeoutClass) -> Duration {
        match class {
            TimeoutClass::TcpEstablished => self.tcp_established,
            TimeoutClass::TcpClosed => TCP_CLOSED_TIMEOUT,
            TimeoutClass::Udp => self.udp,
            TimeoutClass::UdpStream => self.udp_stream,
        }
    }

    /// Whether EC2 has forgotten `flow` at `now` (`CLOCK_MONOTONIC` seconds). An
    /// established TCP flow's last second is written once a refresh period and may be a
    /// few periods late (the programs' filter, `FLOW_RECENT`), so it is let go
    /// `TCP_ESTABLISHED_GRACE` after EC2's timeout: never before EC2 lets it go.
    pub fn expired(&self, now: u32, key: &FlowKey, flow: &Flow) -> bool {
        let idle = u64::from(now.saturating_sub(flow.last_seen));
        let class = TimeoutClass::of(key, flow);
        let grace = if class == TimeoutClass::TcpEstablished {
            TCP_ESTABLISHED_GRACE
        } else {
            Duration::ZERO
        };
        idle >= (self.for_class(class) + grace).as_secs()
    }

    /// How often to pass over the table: often enough that the shortest timeout is
    /// honoured within a couple of seconds, never more than once a second.
    pub fn pass_period(&self) -> Duration {
        (self.udp.min(TCP_CLOSED_TIMEOUT) / 2).clamp(Duration::from_secs(1), Duration::from_secs(5))
    }
}

/// What an expiry pass found.
#[derive(Clone, Debug, Default)]
pub struct PassResult {
    /// When the pass read the tables (`CLOCK_MONOTONIC` seconds).
    now: u32,
    /// Tracked flows by (ifindex, class).
    pub tracked: BTreeMap<(u32, FlowClass), u64>,
    /// Tracked flows by (ifindex, timeout class), by idle age.
    pub idle: BTreeMap<(u32, TimeoutClass), IdleAges>,
    /// Tracked flows by (ifindex, local address), while the pass runs.
    by_owner: HashMap<(u32, Addr), u64>,
    /// The busiest local addresses per ifindex, most flows first, `top` of them.
    pub owners: BTreeMap<u32, Vec<(IpAddr, u64)>>,
}

impl PassResult {
    /// The result of a pass at `now`.
    pub fn at(now: u32) -> Self {
        Self {
            now,
            ..Self::default()
        }
    }

    /// Counts a flow still tracked.
    pub fn add(&mut self, key: &FlowKey, flow: &Flow) {
        *self
            .tracked
            .entry((key.ifindex, FlowClass::from_proto(key.proto)))
            .or_default() += 1;
        let idle = self.now.saturating_sub(flow.last_seen);
        self.idle
            .entry((key.ifindex, TimeoutClass::of(key, flow)))
            .or_insert([0; IDLE_BOUNDS.len() + 1])[idle_bucket(idle)] += 1;
        let local = if flow.flags() & FLOW_LOCAL_A != 0 {
            key.addr_a
        } else if flow.flags() & FLOW_LOCAL_B != 0 {
            key.addr_b
        } else {
            return;
        };
        *self.by_owner.entry((key.ifindex, local)).or_default() += 1;
    }

    /// Keeps the `top` busiest local addresses of each device.
    pub fn rank(&mut self, top: usize) {
        self.owners = top_per_device(self.by_owner.drain(), top);
    }

    /// Tracked TCP flows over every device: what the programs' filter of established
    /// TCP flows is sized for.
    pub fn tcp(&self) -> u64 {
        self.sum(|_, class| class == FlowClass::Tcp)
    }

    /// Tracked flows over the devices `monitored` says are: the instance-wide estimate.
    pub fn total(&self, monitored: impl Fn(u32) -> bool) -> u64 {
        self.sum(|ifindex, _| monitored(ifindex))
    }

    /// Tracked flows of the (ifindex, class) pairs `take` keeps.
    fn sum(&self, take: impl Fn(u32, FlowClass) -> bool) -> u64 {
        self.tracked
            .iter()
            .filter(|((i, class), _)| take(*i, *class))
            .map(|(_, n)| n)
            .sum()
    }
}

/// The last pass's result, shared with the collectors.
#[derive(Clone, Debug, Default)]
pub struct FlowCounts(Arc<Mutex<Option<PassResult>>>);

impl FlowCounts {
    pub fn get(&self) -> Option<PassResult> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set(&self, r: PassResult) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
    }
}

#[cfg(test)]
mod tests {
    use monitor_common::addr_from_ip;

    use super::*;

    #[test]
    fn owners_are_the_local_side_ranked_and_bounded() {
        let addr = |s: &str| addr_from_ip(s.parse().unwrap());
        let key = |a: &str, b: &str, port: u16| FlowKey {
            addr_a: addr(a),
            addr_b: addr(b),
            port_a: port,
            port_b: 443,
            ifindex: 2,
            proto: 6,
            pad: [0; 3],
        };
        let flow = |flags: u8| Flow::new(0, 0, flags);
        let mut r = PassResult::default();
        for port in 0..5 {
            r.add(
                &key("10.0.0.5", "10.9.9.9", port),
                &flow(FLOW_AB | FLOW_LOCAL_A),
            );
        }
        for port in 0..3 {
            // The local address sorted second: side b.
            r.add(
                &key("10.0.0.1", "10.0.0.7", port),
                &flow(FLOW_BA | FLOW_LOCAL_B),
            );
        }
        r.add(
            &key("10.0.0.8", "10.9.9.9", 1),
            &flow(FLOW_AB | FLOW_LOCAL_A),
        );
        // A flow from before the local bit (a previous agent's): no owner.
        r.add(&key("10.0.0.9", "10.9.9.9", 1), &flow(FLOW_AB));
        r.rank(2);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(r.owners[&2], [(ip("10.0.0.5"), 5), (ip("10.0.0.7"), 3)]);
        assert_eq!(r.tracked[&(2, FlowClass::Tcp)], 10);
        assert_eq!(r.total(|i| i == 2), 10);
        assert_eq!(r.total(|i| i == 3), 0);
    }

    fn key(proto: u8) -> FlowKey {
        FlowKey {
            addr_a: [0; 4],
            addr_b: [1; 4],
            port_a: 1,
            port_b: 2,
            ifindex: 2,
            proto,
            pad: [0; 3],
        }
    }

    fn flow(flags: u8) -> Flow {
        Flow::new(0, 0, flags)
    }

    #[test]
    fn idle_ages_by_class_at_the_bounds() {
        let at = |last_seen: u32, flags: u8| {
            let mut f = flow(flags);
            f.last_seen = last_seen;
            f
        };
        let now = 500_000;
        let mut r = PassResult::at(now);
        // TCP established idle 0, 59, 60, 349, 350, 431999, 432000 s.
        for idle in [0, 59, 60, 349, 350, 431_999, 432_000] {
            r.add(&key(6), &at(now - idle, FLOW_AB | FLOW_BA));
        }
        // Closed TCP idle 2 s; UDP one way idle 10 s; UDP both ways idle 100 and 200 s.
        r.add(&key(6), &at(now - 2, FLOW_AB | FLOW_RST));
        r.add(&key(17), &at(now - 10, FLOW_AB));
        r.add(&key(17), &at(now - 100, FLOW_AB | FLOW_BA));
        r.add(&key(17), &at(now - 200, FLOW_AB | FLOW_BA));
        // A last-seen later than the pass (a packet during it) is idle 0.
        r.add(&key(17), &at(now + 3, FLOW_AB));
        //                   30 60 120 180 350 600 1800 3600 21600 86400 432000 +Inf
        let tcp: IdleAges = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0, 1, 1];
        assert_eq!(r.idle[&(2, TimeoutClass::TcpEstablished)], tcp);
        assert_eq!(
            r.idle[&(2, TimeoutClass::TcpClosed)],
            [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            r.idle[&(2, TimeoutClass::Udp)],
            [2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            r.idle[&(2, TimeoutClass::UdpStream)],
            [0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0]
        );
        // What a TCP-established timeout of 350 s would free: those idle 350 s and the
        // grace (32 s) or more, as `expired` has it.
        let t = Timeouts {
            tcp_established: Duration::from_secs(350),
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_mins(3),
        };
        let freed: Vec<u32> = [0, 59, 60, 349, 350, 381, 382, 431_999, 432_000]
            .into_iter()
            .filter(|idle| t.expired(now, &key(6), &at(now - *idle, FLOW_AB | FLOW_BA)))
            .collect();
        let under = IDLE_BOUNDS.iter().position(|b| *b == 350).unwrap();
        assert_eq!(freed, [382, 431_999, 432_000]);
        // A closed connection and UDP have no grace: their packets are all written.
        assert!(t.expired(now, &key(6), &at(now - 5, FLOW_AB | FLOW_RST)));
        assert!(!t.expired(now, &key(6), &at(now - 4, FLOW_AB | FLOW_RST)));
        assert!(t.expired(now, &key(17), &at(now - 30, FLOW_AB)));
        assert_eq!(TimeoutClass::TcpEstablished.idle_bounds()[0], 60);
        assert_eq!(TimeoutClass::Udp.idle_bounds(), [30, 60]);
        assert_eq!(TimeoutClass::UdpStream.idle_bounds(), [60, 120, 180]);
        assert_eq!(tcp[under + 1..].iter().sum::<u64>(), 3);
    }

    #[test]
    fn ec2_timeouts_by_state() {
        let t = Timeouts {
            tcp_established: Duration::from_hours(120),
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_mins(3),
        };
        assert_eq!(
            t.for_flow(&key(6), &flow(FLOW_AB | FLOW_BA)),
            Duration::from_hours(120)
        );
        assert_eq!(
            t.for_flow(&key(6), &flow(FLOW_AB)),
            Duration::from_hours(120)
        );
        assert_eq!(
            t.for_flow(&key(6), &flow(FLOW_AB | FLOW_BA | FLOW_RST)),
            TCP_CLOSED_TIMEOUT
        );
        assert_eq!(
            t.for_flow(&key(6), &flow(FLOW_AB | FLOW_BA | FLOW_FIN_AB)),
            Duration::from_hours(120)
        );
        assert_eq!(
            t.for_flow(
                &key(6),
                &flow(FLOW_AB | FLOW_BA | FLOW_FIN_AB | FLOW_FIN_BA)
            ),
            TCP_CLOSED_TIMEOUT
        );
        assert_eq!(
            t.for_flow(&key(17), &flow(FLOW_AB)),
            Duration::from_secs(30)
        );
        assert_eq!(
            t.for_flow(&key(17), &flow(FLOW_BA)),
            Duration::from_secs(30)
        );
        assert_eq!(
            t.for_flow(&key(17), &flow(FLOW_AB | FLOW_BA)),
            Duration::from_mins(3)
        );
        assert_eq!(t.for_flow(&key(1), &flow(FLOW_AB)), Duration::from_secs(30));
        // Idle for the timeout exactly: forgotten.
        let mut udp = flow(FLOW_AB);
        udp.last_seen = 100;
        assert!(!t.expired(129, &key(17), &udp));
        assert!(t.expired(130, &key(17), &udp));
        assert_eq!(t.pass_period(), Duration::from_millis(2500));
    }
}
