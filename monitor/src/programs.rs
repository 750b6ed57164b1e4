//! Loading the eBPF object with the kernel's layout, and attaching its programs.

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuHashMap},
    programs::TracePoint,
};
use log::{error, info, warn};
use monitor_common::DropKey;

use crate::{
    collectors::agent::{Attachment, Attachments},
    devices::Device,
    kernel::KernelFacts,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

pub fn load(facts: &KernelFacts) -> Result<Ebpf> {
    let globals = facts.globals();
    let mut loader = EbpfLoader::new();
    for (name, value) in &globals {
        loader.override_global(name, value, true);
    }
    loader.load(OBJECT).context("loading the eBPF object")
}

/// Attaches `skb:kfree_skb`. A failure is logged once and recorded, not fatal: the
/// agent keeps serving what it can, and `program_attached` says what is missing.
pub fn attach_kfree_skb(ebpf: &mut Ebpf, facts: &KernelFacts, attachments: &Attachments) {
    let hook = "tracepoint/skb/kfree_skb";
    let result = match facts.kfree_skb {
        None => Err(anyhow!("the skb:kfree_skb format could not be read")),
        Some(fields) => {
            if fields.reason.is_none() {
                warn!("skb:kfree_skb has no reason field on this kernel (before 5.17); drops are exported with reason=\"unknown\"");
            }
            attach_tracepoint(ebpf, "kfree_skb", "skb", "kfree_skb")
        }
    };
    match &result {
        Ok(()) => info!("attached {hook}"),
        Err(e) => error!("not attaching {hook}: {e:#}"),
    }
    attachments.record(Attachment {
        program: "kfree_skb",
        hook: hook.to_owned(),
        device: String::new(),
        attached: result.is_ok(),
    });
}

fn attach_tracepoint(ebpf: &mut Ebpf, program: &str, category: &str, name: &str) -> Result<()> {
    let prog: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("program {program} missing from the object"))?
        .try_into()?;
    prog.load().with_context(|| format!("loading {program}"))?;
    prog.attach(category, name).with_context(|| format!("attaching {program} to {category}:{name}"))?;
    Ok(())
}

pub fn take_drops(ebpf: &mut Ebpf) -> Result<PerCpuHashMap<MapData, DropKey, u64>> {
    let map = ebpf.take_map("DROPS").ok_or_else(|| anyhow!("map DROPS missing from the object"))?;
    Ok(PerCpuHashMap::try_from(map)?)
}

/// Makes the kernel's `MONITORED` set equal to `devices`.
pub fn set_monitored(ebpf: &mut Ebpf, devices: &[Device]) -> Result<()> {
    let mut map: HashMap<_, u32, u8> = ebpf
        .map_mut("MONITORED")
        .ok_or_else(|| anyhow!("map MONITORED missing from the object"))?
        .try_into()?;
    let stale: Vec<u32> = map.keys().filter_map(Result::ok).filter(|i| !devices.iter().any(|d| d.ifindex == *i)).collect();
    for ifindex in stale {
        map.remove(&ifindex).with_context(|| format!("removing ifindex {ifindex} from MONITORED"))?;
    }
    for d in devices {
        map.insert(d.ifindex, 1, 0).with_context(|| format!("adding {} to MONITORED", d.name))?;
    }
    Ok(())
}
