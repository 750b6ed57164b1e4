//! Facts about the running kernel that the eBPF programs need: struct offsets and
//! tracepoint prototypes from BTF, drop-reason names, the helpers the kernel offers, and
//! the agent's own network namespace. Nothing here is compiled in; all of it is read at
//! start, and none of it needs tracefs (a container's fresh sysfs has none).

use std::{collections::BTreeMap, os::unix::fs::MetadataExt as _, path::Path};

use anyhow::{Context as _, Result, anyhow, ensure};
use log::warn;
use monitor_common::{REASON_UNKNOWN, globals};

use self::btf::Btf;

pub mod bpf;
pub mod btf;

pub const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// Offsets into kernel structs, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StructOffsets {
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    pub skb_protocol: u32,
    pub skb_dev: u32,
    pub dev_ifindex: u32,
    pub dev_net: u32,
    pub net_inum: u32,
    pub sk_num: u32,
    pub sk_dport: u32,
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
            skb_protocol: field("sk_buff", "protocol", 2)?,
            skb_dev: field("sk_buff", "dev", 8)?,
            dev_ifindex: field("net_device", "ifindex", 4)?,
            dev_net: field("net_device", "nd_net.net", 8)?,
            net_inum: field("net", "ns.inum", 4)?,
            sk_num: field("sock", "__sk_common.skc_num", 2)?,
            sk_dport: field("sock", "__sk_common.skc_dport", 2)?,
        })
    }
}

/// What the `kfree_skb` raw tracepoint passes on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KfreeSkbArgs {
    /// The drop reason is the third argument (5.17+); before, every drop is `unknown`.
    pub has_reason: bool,
}

impl KfreeSkbArgs {
    /// From the prototype: `(struct sk_buff *skb, void *location[, enum skb_drop_reason
    /// reason[, ...]])`.
    pub fn from_params(params: &[String]) -> Result<Self> {
        ensure!(
            params.first().map(String::as_str) == Some("struct sk_buff *"),
            "kfree_skb's first argument is {:?}, not struct sk_buff *",
            params.first()
        );
        Ok(Self {
            has_reason: params.get(2).map(String::as_str) == Some("enum skb_drop_reason"),
        })
    }
}

/// Checks `udp_fail_queue_rcv_skb`'s prototype: `(int rc, struct sock *sk[, ...])`.
pub fn check_udp_fail_params(params: &[String]) -> Result<()> {
    ensure!(
        params.get(1).map(String::as_str) == Some("struct sock *"),
        "udp_fail_queue_rcv_skb's second argument is {:?}, not struct sock *",
        params.get(1)
    );
    Ok(())
}

/// Names of the kernel's `enum skb_drop_reason` values, as the kernel prints them.
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
        let names: BTreeMap<u32, String> = values
            .into_iter()
            .filter_map(|(name, v)| {
                let v = u32::try_from(v).ok()?;
                let short = name
                    .strip_prefix("SKB_DROP_REASON_")
                    .or_else(|| name.strip_prefix("SKB_"))
                    .unwrap_or(&name)
                    .to_owned();
                Some((v, short))
            })
            .collect();
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

/// Whether the kernel loads a socket filter of these instructions (what libbpf's
/// feature probes do). Any failure is "no": the programs then take the path every
/// kernel has.
fn loads(insns: &[u64]) -> bool {
    const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
    bpf::load_program(BPF_PROG_TYPE_SOCKET_FILTER, 0, "", insns).is_ok()
}

/// One instruction: opcode, destination and source registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | (u64::from(dst | (src << 4)) << 8)
        | (u64::from(off.cast_unsigned()) << 16)
        | (u64::from(imm.cast_unsigned()) << 32)
}

const EXIT: u8 = 0x95;
/// `BPF_ALU64 | BPF_MOV | BPF_K`: `dst = imm`.
const MOV_IMM: u8 = 0xb7;

/// Whether the kernel offers helper `id` to programs: `call id; r0 = 0; exit`.
pub fn has_helper(id: i32) -> bool {
    loads(&[
        insn(0x85, 0, 0, 0, id),
        insn(MOV_IMM, 0, 0, 0, 0),
        insn(EXIT, 0, 0, 0, 0),
    ])
}

/// Whether the kernel has the `bpf_loop` helper (5.17+), by its `enum bpf_func_id`.
fn has_bpf_loop(btf: &Btf) -> bool {
    btf.enum_values("bpf_func_id")
        .is_ok_and(|v| v.iter().any(|(name, _)| name == "BPF_FUNC_loop"))
}

/// Whether programs may use BPF atomics (5.12+): a compare-and-exchange on the stack.
pub fn has_atomics() -> bool {
    const ST_DW: u8 = 0x7a; // BPF_ST | BPF_MEM | BPF_DW
    const ATOMIC_DW: u8 = 0xdb; // BPF_STX | BPF_ATOMIC | BPF_DW
    const BPF_CMPXCHG: i32 = 0xf0 | 0x01; // with BPF_FETCH
    loads(&[
        insn(ST_DW, 10, 0, -8, 0),
        insn(MOV_IMM, 0, 0, 0, 0),
        insn(MOV_IMM, 1, 0, 0, 1),
        insn(ATOMIC_DW, 10, 1, -8, BPF_CMPXCHG),
        insn(MOV_IMM, 0, 0, 0, 0),
        insn(EXIT, 0, 0, 0, 0),
    ])
}

/// `BPF_FUNC_ktime_get_coarse_ns` (5.11+).
const HELPER_KTIME_GET_COARSE_NS: i32 = 160;

/// Everything the programs are loaded with.
#[derive(Clone, Debug)]
pub struct KernelFacts {
    pub offsets: StructOffsets,
    /// The `kfree_skb` prototype, or why the program cannot attach.
    pub kfree_skb: Result<KfreeSkbArgs, String>,
    /// `Ok` when `udp_fail_queue_rcv_skb` has the prototype the program reads.
    pub udp_fail: Result<(), String>,
    pub reasons: DropReasons,
    pub netns_inum: u32,
    pub coarse_clock: bool,
    /// BPF atomics (5.12+) and `bpf_loop` (5.17+): the object whose DNS queries in flight
    /// go to `DNS_PENDING`, and that reads every DNS message of a TCP segment, loads;
    /// before, the one without an atomic instruction or a `bpf_loop` in it.
    pub atomics: bool,
}

impl KernelFacts {
    /// Reads BTF and probes the kernel. A tracepoint whose prototype is missing or
    /// unexpected leaves its program unattached (and says why), not the agent down.
    pub fn read(btf_path: &Path) -> Result<Self> {
        let raw = std::fs::read(btf_path).with_context(|| {
            format!(
                "reading kernel BTF from {} (the kernel needs CONFIG_DEBUG_INFO_BTF)",
                btf_path.display()
            )
        })?;
        let btf = Btf::parse(&raw).with_context(|| format!("parsing {}", btf_path.display()))?;
        Ok(Self::from_btf(&btf)?.with_probes())
    }

    /// The facts BTF alone gives; what only a probe program tells is left at "absent"
    /// (the coarse clock) or taken as absent if BTF says so (`bpf_loop`).
    pub fn from_btf(btf: &Btf) -> Result<Self> {
        let offsets = StructOffsets::from_btf(btf).context("reading struct offsets from BTF")?;
        let mut kfree_skb = btf
            .tracepoint_params("kfree_skb")
            .and_then(|p| KfreeSkbArgs::from_params(&p))
            .map_err(|e| format!("{e:#}"));
        let mut reasons = DropReasons::default();
        if let Ok(args) = &mut kfree_skb
            && args.has_reason
        {
            match DropReasons::from_btf(btf) {
                Ok(r) => reasons = r,
                Err(e) => {
                    warn!("kfree_skb has a reason argument but its names are unreadable: {e:#}");
                    args.has_reason = false;
                }
            }
        }
        let udp_fail = btf
            .tracepoint_params("udp_fail_queue_rcv_skb")
            .and_then(|p| check_udp_fail_params(&p))
            .map_err(|e| format!("{e:#}"));
        Ok(Self {
            offsets,
            kfree_skb,
            udp_fail,
            reasons,
            netns_inum: own_netns_inum()?,
            coarse_clock: false,
            // A probe program could not call it without a callback and the BTF that
            // names one: the kernel's own list of helpers says whether it has it.
            atomics: has_bpf_loop(btf),
        })
    }

    fn with_probes(mut self) -> Self {
        self.coarse_clock = has_helper(HELPER_KTIME_GET_COARSE_NS);
        self.atomics &= has_atomics();
        self
    }

    /// The program's load-time globals as (name, value).
    pub fn globals(&self) -> Vec<(&'static str, u32)> {
        let o = &self.offsets;
        vec![
            (globals::SKB_HEAD_OFF, o.skb_head),
            (globals::SKB_NETWORK_HEADER_OFF, o.skb_network_header),
            (globals::SKB_TRANSPORT_HEADER_OFF, o.skb_transport_header),
            (globals::SKB_PROTOCOL_OFF, o.skb_protocol),
            (globals::SKB_DEV_OFF, o.skb_dev),
            (globals::DEV_IFINDEX_OFF, o.dev_ifindex),
            (globals::DEV_NET_OFF, o.dev_net),
            (globals::NET_INUM_OFF, o.net_inum),
            (globals::SK_NUM_OFF, o.sk_num),
            (globals::SK_DPORT_OFF, o.sk_dport),
            (globals::OWN_NETNS_INUM, self.netns_inum),
            (
                globals::KFREE_SKB_HAS_REASON,
                u32::from(self.kfree_skb.as_ref().is_ok_and(|k| k.has_reason)),
            ),
            (globals::REASON_NOT_SPECIFIED, self.reasons.not_specified),
            (globals::HAVE_COARSE_CLOCK, u32::from(self.coarse_clock)),
            // The programs run on the agent's own architecture.
            (
                globals::STORES_IN_ORDER,
                u32::from(cfg!(target_arch = "x86_64")),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn kfree_skb_arguments_by_kernel() {
        // 6.12 and later: a receiving socket after the reason.
        let new = strings(&[
            "struct sk_buff *",
            "void *",
            "enum skb_drop_reason",
            "struct sock *",
        ]);
        assert_eq!(
            KfreeSkbArgs::from_params(&new).unwrap(),
            KfreeSkbArgs { has_reason: true }
        );
        // 5.17 to 6.11.
        let mid = strings(&["struct sk_buff *", "void *", "enum skb_drop_reason"]);
        assert!(KfreeSkbArgs::from_params(&mid).unwrap().has_reason);
        // 5.10: no reason.
        let old = strings(&["struct sk_buff *", "void *"]);
        assert_eq!(
            KfreeSkbArgs::from_params(&old).unwrap(),
            KfreeSkbArgs { has_reason: false }
        );
        let odd = strings(&["int"]);
        assert_eq!(
            KfreeSkbArgs::from_params(&odd).unwrap_err().to_string(),
            "kfree_skb's first argument is Some(\"int\"), not struct sk_buff *"
        );
    }

    #[test]
    fn udp_fail_arguments_by_kernel() {
        check_udp_fail_params(&strings(&["int", "struct sock *"])).unwrap();
        check_udp_fail_params(&strings(&["int", "struct sock *", "struct sk_buff *"])).unwrap();
        assert!(check_udp_fail_params(&strings(&["int"])).is_err());
    }

    #[test]
    fn facts_from_a_6_18_kernel() {
        let facts = KernelFacts::from_btf(&btf::tests::fixture()).unwrap();
        assert_eq!(facts.kfree_skb, Ok(KfreeSkbArgs { has_reason: true }));
        assert_eq!(facts.udp_fail, Ok(()));
        let r = &facts.reasons;
        assert_eq!(r.not_specified, 2);
        assert_eq!(r.name(0), "NOT_DROPPED_YET");
        assert_eq!(r.name(1), "CONSUMED");
        assert_eq!(r.name(3), "NO_SOCKET");
        assert_eq!(r.name(6), "SOCKET_RCVBUFF");
        assert_eq!(r.name(12), "NETFILTER_DROP");
        assert_eq!(r.name(9999), "unknown");
        assert_eq!(r.name(REASON_UNKNOWN), "unknown");
        // Expected: offsetof compiled against a header dumped from the same BTF.
        assert_eq!(facts.offsets.skb_protocol, 176);
        assert_eq!(facts.offsets.sk_num, 14);
        assert_eq!(facts.offsets.sk_dport, 12);
        let globals = facts.globals();
        let get = |n: &str| globals.iter().find(|(k, _)| *k == n).map(|&(_, v)| v);
        assert_eq!(get(globals::KFREE_SKB_HAS_REASON), Some(1));
        assert_eq!(get(globals::HAVE_COARSE_CLOCK), Some(0));
    }

    #[test]
    fn helper_probe_answers_for_this_kernel() {
        if !crate::root::require_root("helper_probe_answers_for_this_kernel") {
            return;
        }
        // Every kernel has bpf_ktime_get_ns (5); no kernel has helper 100000.
        assert!(has_helper(5));
        assert!(!has_helper(100_000));
    }
}
