//! The simulated node: a node namespace with ENIs cabled to a VPC namespace, and pods.

use crate::Netns;

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
