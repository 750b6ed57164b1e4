//! Loading the eBPF object with the kernel's layout, and attaching its programs.

use std::{net::IpAddr, path::Path};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    maps::{HashMap, Map, MapData},
    programs::{
        BtfTracePoint, LinkOrder, RawTracePoint, SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcError},
    },
};
use log::{error, info, warn};
use monitor_common::{Addr, addr_from_octets, addr_octets};

use crate::{
    collectors::agent::{Attachment, Attachments},
    devices::Device,
    kernel::KernelFacts,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));
/// The same programs for kernels without BPF atomics (before 5.12).
static OBJECT_COMPAT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor-compat"));

/// Loads the object with the kernel's layout, maps sized as `sizes` says (name, entries).
/// With `pins`, the maps that carry state are reused from there when pinned, else
/// created and pinned there.
pub fn load(facts: &KernelFacts, sizes: &[(&str, u32)], pins: Option<&Path>) -> Result<Ebpf> {
    let globals = facts.globals();
    let mut loader = EbpfLoader::new();
    for (map, entries) in sizes {
        loader.map_max_entries(map, *entries);
    }
    for (name, value) in &globals {
        loader.override_global(name, value, true);
    }
    // The flow cache's hash is keyed afresh at each load: no one outside can aim
    // flows at one slot and fingerprint.
    let seed = random_words();
    loader.override_global(monitor_common::globals::FLOW_HASH_SEED_LO, &seed[0], true);
    loader.override_global(monitor_common::globals::FLOW_HASH_SEED_HI, &seed[1], true);
    let pending_sets = sizes
        .iter()
        .find(|(map, _)| *map == "DNS_PENDING")
        .map_or(monitor_common::DNS_PENDING_SETS, |(_, n)| *n);
    loader.override_global(monitor_common::globals::PENDING_SETS, &pending_sets, true);
    if let Some(dir) = pins {
        for name in crate::state::PINNED {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    let object = if facts.atomics { OBJECT } else { OBJECT_COMPAT };
    loader.load(object).with_context(|| match pins {
        Some(dir) => format!("loading the eBPF object with its maps in {}", dir.display()),
        None => "loading the eBPF object".to_owned(),
    })
}

/// Two random words from the kernel; zeros (still a working key) if it has none to give.
fn random_words() -> [u32; 2] {
    let mut w = [0u32; 2];
    // SAFETY: getrandom writes at most the 8 bytes it is given.
    let n = unsafe { libc::getrandom(w.as_mut_ptr().cast(), 8, 0) };
    if n != 8 {
        log::warn!("no random key for the flow cache's hash: using a fixed one");
    }
    w
}

/// An address as the programs key it: IPv6 as is, IPv4 mapped.
pub fn addr_bytes(ip: IpAddr) -> Addr {
    addr_from_octets(match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    })
}

/// The address the programs recorded, IPv4 unmapped.
pub fn addr_from_bytes(addr: Addr) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(addr_octets(&addr));
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

fn record<T>(
    attachments: &Attachments,
    program: &'static str,
    hook: &str,
    device: &str,
    result: &Result<T>,
) {
    let on = if device.is_empty() {
        String::new()
    } else {
        format!(" on {device}")
    };
    match result {
        Ok(_) => info!("attached {hook}{on}"),
        Err(e) => error!("not attaching {hook}{on}: {e:#}"),
    }
    attachments.record(Attachment {
        program,
        hook: hook.to_owned(),
        device: device.to_owned(),
        attached: result.is_ok(),
    });
}

/// Attaches the raw tracepoints. A failure is logged once and recorded, not fatal: the
/// agent keeps serving what it can, and `program_attached` says what is missing.
pub fn attach_tracepoints(ebpf: &mut Ebpf, facts: &KernelFacts, attachments: &Attachments) {
    let result = match &facts.kfree_skb {
        Err(e) => Err(anyhow!("{e}")),
        Ok(args) => {
            if !args.has_reason {
                warn!(
                    "kfree_skb passes no drop reason on this kernel (before 5.17); drops are exported with reason=\"unknown\""
                );
            }
            attach_btf_tracepoint(ebpf, "kfree_skb")
        }
    };
    record(attachments, "kfree_skb", "raw_tp/kfree_skb", "", &result);

    let name = "udp_fail_queue_rcv_skb";
    let result = match &facts.udp_fail {
        Err(e) => Err(anyhow!("{e}")),
        Ok(()) => attach_raw_tracepoint(ebpf, name),
    };
    record(
        attachments,
        name,
        "raw_tp/udp_fail_queue_rcv_skb",
        "",
        &result,
    );
}

/// Attaches program `name` to the raw tracepoint of the same name, typed by the
/// kernel's BTF (its pointer arguments are then read without helper calls).
fn attach_btf_tracepoint(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let btf = Btf::parse_file(crate::kernel::BTF_PATH, Endianness::default())
        .with_context(|| format!("reading {}", crate::kernel::BTF_PATH))?;
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?
        .try_into()?;
    prog.load(name, &btf)
        .with_context(|| format!("loading {name}"))?;
    prog.attach()
        .with_context(|| format!("attaching {name} to raw tracepoint {name}"))?;
    Ok(())
}

/// Attaches program `name` to the raw tracepoint of the same name.
fn attach_raw_tracepoint(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let prog: &mut RawTracePoint = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?
        .try_into()?;
    prog.load().with_context(|| format!("loading {name}"))?;
    prog.attach(name)
        .with_context(|| format!("attaching {name} to raw tracepoint {name}"))?;
    Ok(())
}

/// Loads both classifiers; done once, before any device is attached.
pub fn load_classifiers(ebpf: &mut Ebpf) -> Result<()> {
    for name in ["tc_ingress", "tc_egress"] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))?
            .try_into()?;
        prog.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(())
}

/// The classifiers attached to one device.
pub type ClassifierLinks = Vec<(&'static str, SchedClassifierLinkId)>;

const CLASSIFIERS: [&str; 2] = ["tc_ingress", "tc_egress"];

/// Attaches both classifiers to `device`: TCX where the kernel has it (6.6+), first in
/// order, so that a CNI's program never redirects a packet before we see it; else
/// `cls_bpf` under clsact. Both programs return "next" (`TC_ACT_UNSPEC`), so no verdict of
/// ours changes a packet's path. When `loaded` is false the programs failed to load, and
/// each is recorded as not attached.
pub fn attach_classifiers(
    ebpf: &mut Ebpf,
    device: &Device,
    attachments: &Attachments,
    loaded: bool,
) -> ClassifierLinks {
    let mut links = Vec::new();
    for (name, attach_type, hook) in [
        (CLASSIFIERS[0], TcAttachType::Ingress, "tc/ingress"),
        (CLASSIFIERS[1], TcAttachType::Egress, "tc/egress"),
    ] {
        let result = if loaded {
            attach_classifier(ebpf, name, &device.name, attach_type)
        } else {
            Err(anyhow!("{name} did not load"))
        };
        record(attachments, name, hook, &device.name, &result);
        if let Ok(id) = result {
            links.push((name, id));
        }
    }
    links
}

fn attach_classifier(
    ebpf: &mut Ebpf,
    name: &str,
    device: &str,
    attach_type: TcAttachType,
) -> Result<SchedClassifierLinkId> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?
        .try_into()?;
    let tcx = match prog.attach_with_options(
        device,
        attach_type,
        TcAttachOptions::TcxOrder(LinkOrder::first()),
    ) {
        Ok(id) => return Ok(id),
        Err(e) => e,
    };
    // No TCX (before 6.6): the clsact qdisc, added when absent and never removed (a CNI
    // may hang its own filters there), and cls_bpf filters, which outlive a killed agent:
    // ours left behind are recognised by name and replaced rather than stacked.
    match tc::qdisc_add_clsact(device) {
        Ok(()) => info!("added the clsact qdisc to {device}"),
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => {
            return Err(anyhow!(e))
                .with_context(|| format!("adding clsact to {device} (TCX refused too: {tcx})"));
        }
    }
    match tc::qdisc_detach_program(device, attach_type, name) {
        Ok(()) => info!("removed a {name} filter a previous agent left on {device}"),
        Err(TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!("looking for {name} filters left on {device}: {e}"),
    }
    prog.attach_with_options(
        device,
        attach_type,
        TcAttachOptions::Netlink(NlOptions {
            priority: 1,
            ..NlOptions::default()
        }),
    )
    .with_context(|| format!("attaching {name} to {device} with cls_bpf (TCX refused: {tcx})"))
}

/// Detaches what [`attach_classifiers`] attached. A device that is gone took its
/// links with it, so failures are expected and ignored.
pub fn detach_classifiers(ebpf: &mut Ebpf, links: ClassifierLinks) {
    for (name, id) in links {
        if let Some(prog) = ebpf.program_mut(name)
            && let Ok(prog) = <&mut SchedClassifier>::try_from(prog)
        {
            let _ = prog.detach(id);
        }
    }
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("map {name} missing from the object"))
}

/// Takes a map out of the object for a collector to own.
pub fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the object"))
}

/// The raw data of a hash map, for the batch operations.
pub fn take_hash_map(ebpf: &mut Ebpf, name: &str) -> Result<MapData> {
    match take_map(ebpf, name)? {
        Map::HashMap(data) => Ok(data),
        _ => Err(anyhow!("map {name} is not a hash map")),
    }
}

/// The kernel's `MONITORED` map as (ifindex, slot).
pub fn monitored(ebpf: &mut Ebpf) -> Result<Vec<(u32, u32)>> {
    let map: HashMap<&mut MapData, u32, u32> = map_mut(ebpf, "MONITORED")?.try_into()?;
    Ok(map.iter().filter_map(Result::ok).collect())
}

/// Makes the kernel's `MONITORED` set equal to `devices`.
pub fn set_monitored<'a>(
    ebpf: &mut Ebpf,
    devices: impl IntoIterator<Item = &'a Device> + Clone,
) -> Result<()> {
    let mut map: HashMap<&mut MapData, u32, u32> = map_mut(ebpf, "MONITORED")?.try_into()?;
    let stale: Vec<u32> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|i| !devices.clone().into_iter().any(|d| d.ifindex == *i))
        .collect();
    for ifindex in stale {
        map.remove(&ifindex)
            .with_context(|| format!("removing ifindex {ifindex} from MONITORED"))?;
    }
    for d in devices {
        map.insert(d.ifindex, d.slot, 0)
            .with_context(|| format!("adding {} to MONITORED", d.name))?;
    }
    Ok(())
}

/// `LINKLOCAL`: link-local service addresses (and VPC+2 resolvers) to their service.
pub type LinkLocalMap = HashMap<MapData, Addr, u32>;

pub fn add_linklocal(map: &mut LinkLocalMap, ip: IpAddr, service: u32) -> Result<()> {
    map.insert(addr_bytes(ip), service, 0)
        .with_context(|| format!("adding {ip} to LINKLOCAL"))
}
