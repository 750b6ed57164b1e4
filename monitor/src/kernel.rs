//! Facts about the running kernel that the eBPF programs need: struct offsets from BTF,
//! tracepoint field offsets from tracefs, drop-reason names, and the agent's own network
//! namespace. Nothing here is compiled in; all of it is read at start.

use std::{collections::BTreeMap, os::unix::fs::MetadataExt as _, path::Path};

use anyhow::{Context as _, Result, anyhow, ensure};
use log::warn;
use monitor_common::{REASON_UNKNOWN, globals};

use crate::{btf::Btf, tracefs::Format};

pub const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// Offsets into kernel structs, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StructOffsets {
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    pub skb_dev: u32,
    pub dev_ifindex: u32,
    pub dev_net: u32,
    pub net_inum: u32,
}

impl StructOffsets {
    pub fn from_btf(btf: &Btf) -> Result<Self> {
        let field = |ty: &str, path: &str, size: u32| -> Result<u32> {
            let f = btf.member(ty, path)?;
            ensure!(
                f.size == size,
                "{ty}.{path} is {} bytes, expected {size}",
                f.size
            );
            Ok(f.offset)
        };
        Ok(Self {
            skb_head: field("sk_buff", "head", 8)?,
            skb_network_header: field("sk_buff", "network_header", 2)?,
            skb_transport_header: field("sk_buff", "transport_header", 2)?,
            skb_dev: field("sk_buff", "dev", 8)?,
            dev_ifindex: field("net_device", "ifindex", 4)?,
            dev_net: field("net_device", "nd_net.net", 8)?,
            net_inum: field("net", "ns.inum", 4)?,
        })
    }
}

/// Field offsets of `skb:kfree_skb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KfreeSkbFields {
    pub skbaddr: u32,
    pub protocol: u32,
    /// `None` on kernels before drop reasons (5.17).
    pub reason: Option<u32>,
}

impl KfreeSkbFields {
    pub fn from_format(format: &Format) -> Result<Self> {
        Ok(Self {
            skbaddr: format.require("skbaddr", 8)?.offset,
            protocol: format.require("protocol", 2)?.offset,
            reason: match format.field("reason") {
                Some(f) => {
                    ensure!(f.size == 4, "field reason is {} bytes, expected 4", f.size);
                    Some(f.offset)
                }
                None => None,
            },
        })
    }
}

/// Port fields of `udp:udp_fail_queue_rcv_skb`. Kernels since 6.10 record both ports
/// of the datagram; older ones the socket's local port (`lport`) only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpFailFields {
    pub sport: Option<u32>,
    pub dport: Option<u32>,
}

impl UdpFailFields {
    pub fn from_format(format: &Format) -> Self {
        let port = |name: &str| format.require(name, 2).ok().map(|f| f.offset);
        Self {
            sport: port("sport"),
            dport: port("dport").or_else(|| port("lport")),
        }
    }
}

/// Names of the kernel's `enum skb_drop_reason` values, as the tracepoint prints them.
#[derive(Clone, Debug, Default)]
pub struct DropReasons {
    names: BTreeMap<u32, String>,
    /// Values at or below this are not drops worth counting (`NOT_SPECIFIED` and before).
    pub not_specified: u32,
}

impl DropReasons {
    /// From the BTF enum, whose names carry `SKB_DROP_REASON_` / `SKB_` prefixes.
    pub fn from_btf(btf: &Btf) -> Result<Self> {
        let values = btf.enum_values("skb_drop_reason")?;
        Self::from_pairs(values.into_iter().filter_map(|(name, v)| {
            let v = u32::try_from(v).ok()?;
            let short = name
                .strip_prefix("SKB_DROP_REASON_")
                .or_else(|| name.strip_prefix("SKB_"))
                .unwrap_or(&name)
                .to_owned();
            Some((v, short))
        }))
    }

    /// From the tracepoint's `__print_symbolic` table.
    pub fn from_format(format: &Format) -> Result<Self> {
        Self::from_pairs(
            format
                .symbols("reason")
                .into_iter()
                .filter_map(|(v, n)| Some((u32::try_from(v).ok()?, n))),
        )
    }

    fn from_pairs(pairs: impl Iterator<Item = (u32, String)>) -> Result<Self> {
        let names: BTreeMap<u32, String> = pairs.collect();
        let not_specified = names
            .iter()
            .find(|(_, n)| *n == "NOT_SPECIFIED")
            .map(|(&v, _)| v)
            .ok_or_else(|| anyhow!("no NOT_SPECIFIED drop reason"))?;
        Ok(Self {
            names,
            not_specified,
        })
    }

    /// The label for a reason value: the kernel's name, or `unknown`.
    pub fn name(&self, value: u32) -> &str {
        if value == REASON_UNKNOWN {
            return "unknown";
        }
        self.names.get(&value).map_or("unknown", String::as_str)
    }
}

/// The inode number of the agent's network namespace, as the kernel's `ns.inum`.
pub fn own_netns_inum() -> Result<u32> {
    let meta = std::fs::metadata("/proc/self/ns/net").context("reading /proc/self/ns/net")?;
    u32::try_from(meta.ino()).context("network namespace inode does not fit 32 bits")
}

/// Everything the programs are loaded with.
#[derive(Clone, Debug)]
pub struct KernelFacts {
    pub offsets: StructOffsets,
    pub kfree_skb: Option<KfreeSkbFields>,
    pub udp_fail: Option<UdpFailFields>,
    pub reasons: DropReasons,
    pub netns_inum: u32,
}

impl KernelFacts {
    /// Reads BTF and, when `tracefs` is given, the tracepoint formats. A tracepoint whose
    /// format cannot be read leaves its fields `None`, and its program unattached.
    pub fn read(btf_path: &Path, tracefs: Option<&Path>) -> Result<Self> {
        let raw = std::fs::read(btf_path).with_context(|| {
            format!(
                "reading kernel BTF from {} (the kernel needs CONFIG_DEBUG_INFO_BTF)",
                btf_path.display()
            )
        })?;
        let btf = Btf::parse(&raw).with_context(|| format!("parsing {}", btf_path.display()))?;
        let offsets = StructOffsets::from_btf(&btf).context("reading struct offsets from BTF")?;
        let read_format = |category, name| {
            tracefs
                .map(|root| Format::read(root, category, name))
                .transpose()
                .unwrap_or_else(|e| {
                    warn!("{e:#}");
                    None
                })
        };
        let kfree_format = read_format("skb", "kfree_skb");
        let udp_fail =
            read_format("udp", "udp_fail_queue_rcv_skb").map(|f| UdpFailFields::from_format(&f));
        let kfree_skb = match &kfree_format {
            Some(f) => Some(KfreeSkbFields::from_format(f).context("skb:kfree_skb format")?),
            None => None,
        };
        let reasons = match DropReasons::from_btf(&btf) {
            Ok(r) => r,
            Err(btf_err) => match &kfree_format {
                Some(f) => DropReasons::from_format(f).with_context(|| {
                    format!(
                        "drop reasons neither in BTF ({btf_err:#}) nor in the tracepoint format"
                    )
                })?,
                None => DropReasons::default(),
            },
        };
        Ok(Self {
            offsets,
            kfree_skb,
            udp_fail,
            reasons,
            netns_inum: own_netns_inum()?,
        })
    }

    /// The program's load-time globals as (name, value).
    pub fn globals(&self) -> Vec<(&'static str, u32)> {
        let o = &self.offsets;
        let mut g = vec![
            (globals::SKB_HEAD, o.skb_head),
            (globals::SKB_NETWORK_HEADER, o.skb_network_header),
            (globals::SKB_TRANSPORT_HEADER, o.skb_transport_header),
            (globals::SKB_DEV, o.skb_dev),
            (globals::DEV_IFINDEX, o.dev_ifindex),
            (globals::DEV_NET, o.dev_net),
            (globals::NET_INUM, o.net_inum),
            (globals::OWN_NETNS_INUM, self.netns_inum),
            (globals::REASON_NOT_SPECIFIED, self.reasons.not_specified),
        ];
        if let Some(k) = self.kfree_skb {
            g.push((globals::TP_KFREE_SKBADDR, k.skbaddr));
            g.push((globals::TP_KFREE_PROTOCOL, k.protocol));
            g.push((globals::TP_KFREE_REASON, k.reason.unwrap_or(u32::MAX)));
        }
        if let Some(u) = self.udp_fail {
            g.push((globals::TP_UDPFAIL_SPORT, u.sport.unwrap_or(u32::MAX)));
            g.push((globals::TP_UDPFAIL_DPORT, u.dport.unwrap_or(u32::MAX)));
        }
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::tracefs::tests::fixture as format;

    #[test]
    fn kfree_skb_fields_by_kernel() {
        let new = KfreeSkbFields::from_format(&format("kfree_skb-6.18.format")).unwrap();
        assert_eq!(
            new,
            KfreeSkbFields {
                skbaddr: 8,
                protocol: 32,
                reason: Some(36)
            }
        );
        let old = KfreeSkbFields::from_format(&format("kfree_skb-5.10.format")).unwrap();
        assert_eq!(
            old,
            KfreeSkbFields {
                skbaddr: 8,
                protocol: 24,
                reason: None
            }
        );
    }

    #[test]
    fn udp_fail_ports_by_kernel() {
        let new = UdpFailFields::from_format(&format("udp_fail_queue_rcv_skb-6.18.format"));
        assert_eq!(
            new,
            UdpFailFields {
                sport: Some(12),
                dport: Some(14)
            }
        );
        let old = Format::parse(
            "\tfield:int rc;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:__u16 lport;\toffset:12;\tsize:2;\tsigned:0;\n",
        )
        .unwrap();
        assert_eq!(
            UdpFailFields::from_format(&old),
            UdpFailFields {
                sport: None,
                dport: Some(12)
            }
        );
        let none = Format::parse("\tfield:int rc;\toffset:8;\tsize:4;\tsigned:1;\n").unwrap();
        assert_eq!(
            UdpFailFields::from_format(&none),
            UdpFailFields {
                sport: None,
                dport: None
            }
        );
    }

    #[test]
    fn reason_names_from_the_format_file() {
        let r = DropReasons::from_format(&format("kfree_skb-6.18.format")).unwrap();
        assert_eq!(r.not_specified, 2);
        assert_eq!(r.name(3), "NO_SOCKET");
        assert_eq!(r.name(12), "NETFILTER_DROP");
        assert_eq!(r.name(6), "SOCKET_RCVBUFF");
        assert_eq!(r.name(9999), "unknown");
        assert_eq!(r.name(REASON_UNKNOWN), "unknown");
        assert!(DropReasons::from_format(&format("kfree_skb-5.10.format")).is_err());
    }

    #[test]
    fn reason_names_agree_between_btf_and_format() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/btf/vmlinux-6.18.btf.gz"
        );
        let mut raw = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()),
            &mut raw,
        )
        .unwrap();
        let from_btf = DropReasons::from_btf(&Btf::parse(&raw).unwrap()).unwrap();
        let from_format = DropReasons::from_format(&format("kfree_skb-6.18.format")).unwrap();
        assert_eq!(from_btf.not_specified, from_format.not_specified);
        for (v, name) in &from_format.names {
            assert_eq!(from_btf.name(*v), name, "reason {v}");
        }
        assert_eq!(from_btf.name(0), "NOT_DROPPED_YET");
        assert_eq!(from_btf.name(1), "CONSUMED");
    }
}
