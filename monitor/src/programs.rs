//! Loading the eBPF object with the kernel's layout, and attaching its programs.

use std::net::IpAddr;

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData},
    programs::{SchedClassifier, TcAttachType, TracePoint, tc::SchedClassifierLinkId},
};
use log::{error, info, warn};
use monitor_common::{Addr, addr_from_octets, addr_octets};

use crate::{
    collectors::agent::{Attachment, Attachments},
    devices::Device,
    kernel::KernelFacts,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

pub fn load(facts: &KernelFacts, flow_table_size: u32) -> Result<Ebpf> {
    let globals = facts.globals();
    let mut loader = EbpfLoader::new();
    loader.map_max_entries("FLOWS", flow_table_size);
    for (name, value) in &globals {
        loader.override_global(name, value, true);
    }
    loader.load(OBJECT).context("loading the eBPF object")
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

/// Attaches the tracepoints. A failure is logged once and recorded, not fatal: the
/// agent keeps serving what it can, and `program_attached` says what is missing.
pub fn attach_tracepoints(ebpf: &mut Ebpf, facts: &KernelFacts, attachments: &Attachments) {
    let result = match facts.kfree_skb {
        None => Err(anyhow!("the skb:kfree_skb format could not be read")),
        Some(fields) => {
            if fields.reason.is_none() {
                warn!(
                    "skb:kfree_skb has no reason field on this kernel (before 5.17); drops are exported with reason=\"unknown\""
                );
            }
            attach_tracepoint(ebpf, "kfree_skb", "skb", "kfree_skb")
        }
    };
    record(
        attachments,
        "kfree_skb",
        "tracepoint/skb/kfree_skb",
        "",
        &result,
    );

    let result = match facts.udp_fail {
        None => Err(anyhow!(
            "the udp:udp_fail_queue_rcv_skb format could not be read"
        )),
        Some(fields) => {
            if fields.sport.is_none() && fields.dport.is_none() {
                warn!(
                    "udp:udp_fail_queue_rcv_skb has no port fields on this kernel; overflows count as port=\"other\""
                );
            }
            attach_tracepoint(
                ebpf,
                "udp_fail_queue_rcv_skb",
                "udp",
                "udp_fail_queue_rcv_skb",
            )
        }
    };
    record(
        attachments,
        "udp_fail_queue_rcv_skb",
        "tracepoint/udp/udp_fail_queue_rcv_skb",
        "",
        &result,
    );
}

fn attach_tracepoint(ebpf: &mut Ebpf, program: &str, category: &str, name: &str) -> Result<()> {
    let prog: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("program {program} missing from the object"))?
        .try_into()?;
    prog.load().with_context(|| format!("loading {program}"))?;
    prog.attach(category, name)
        .with_context(|| format!("attaching {program} to {category}:{name}"))?;
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

/// Attaches both classifiers to `device` (TCX where the kernel has it, else clsact).
pub fn attach_classifiers(
    ebpf: &mut Ebpf,
    device: &Device,
    attachments: &Attachments,
) -> ClassifierLinks {
    let mut links = Vec::new();
    for (name, attach_type, hook) in [
        (CLASSIFIERS[0], TcAttachType::Ingress, "tc/ingress"),
        (CLASSIFIERS[1], TcAttachType::Egress, "tc/egress"),
    ] {
        let result = (|| -> Result<SchedClassifierLinkId> {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()?;
            Ok(prog.attach(&device.name, attach_type)?)
        })();
        record(attachments, name, hook, &device.name, &result);
        if let Ok(id) = result {
            links.push((name, id));
        }
    }
    links
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
