//! The one owner of the eBPF object: loads it with the kernel's layout, reuses or pins
//! its state, and hands out what the rest of the agent needs of it: the programs to
//! attach through, and each map as the typed handle of its one owner. Nothing else
//! touches the object.

pub mod attach;
mod batch;
pub mod dns;
pub mod maps;
pub mod pending;
pub mod pins;
pub mod slots;

use std::path::Path;

use anyhow::{Context as _, Result};
use aya::{
    EbpfLoader,
    maps::{Array, Map, MapData},
};
use monitor_common::{DNS_INFLIGHT_MAX_ENTRIES, DNS_PENDING_SETS, globals};

pub use self::{
    attach::{Attachment, Attachments, ClassifierLinks, Programs},
    maps::Maps,
};
use self::{maps::names, pins::MapShape};
use crate::kernel::KernelFacts;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));
/// The same programs for kernels without BPF atomics (before 5.12).
static OBJECT_COMPAT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor-compat"));

/// How large the sized maps are made.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// `FLOWS` entries (`--flow-table-size`).
    pub flows: u32,
    /// `DNS_INFLIGHT` entries, on kernels without BPF atomics.
    pub dns_inflight: u32,
    /// `DNS_PENDING` sets, on kernels with them.
    pub dns_pending_sets: u32,
}

impl Sizes {
    /// The defaults, with a flow table of `flows`.
    pub fn with_flows(flows: u32) -> Self {
        Self {
            flows,
            dns_inflight: DNS_INFLIGHT_MAX_ENTRIES,
            dns_pending_sets: DNS_PENDING_SETS,
        }
    }
}

/// The object loaded: its programs, and its maps taken out.
pub struct Loaded {
    pub programs: Programs,
    pub maps: Maps,
}

/// The object for `facts`'s kernel.
fn object(facts: &KernelFacts) -> &'static [u8] {
    if facts.atomics { OBJECT } else { OBJECT_COMPAT }
}

/// (`DNS_INFLIGHT` entries, `DNS_PENDING` sets): queries in flight wait in one table or
/// the other, by what the kernel can do; the other is left at one entry.
fn dns_tables(facts: &KernelFacts, sizes: Sizes) -> (u32, u32) {
    if facts.atomics {
        (1, sizes.dns_pending_sets)
    } else {
        (sizes.dns_inflight, 1)
    }
}

/// The shape this agent makes each pinned map on `facts`'s kernel: the object's
/// definition, with the sizes the agent sets.
pub fn pinned_shapes(facts: &KernelFacts, sizes: Sizes) -> Result<Vec<(&'static str, MapShape)>> {
    let object = aya_obj::Object::parse(object(facts)).context("parsing the eBPF object")?;
    let (inflight, pending_sets) = dns_tables(facts, sizes);
    names::PINNED
        .iter()
        .map(|&name| {
            let m = object
                .maps
                .get(name)
                .with_context(|| format!("map {name} missing from the object"))?;
            let max_entries = match name {
                names::FLOWS => sizes.flows,
                names::DNS_INFLIGHT => inflight,
                names::DNS_PENDING => pending_sets,
                _ => m.max_entries(),
            };
            Ok((
                name,
                MapShape {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries,
                    flags: m.map_flags(),
                },
            ))
        })
        .collect()
}

/// The directory the pinned maps of this agent live in on `facts`'s kernel, named by
/// their shapes: another release whose maps are shaped alike continues from them.
pub fn layout(facts: &KernelFacts, sizes: Sizes) -> Result<String> {
    Ok(pins::layout(&pinned_shapes(facts, sizes)?, sizes.flows))
}

/// Loads the object for `facts` with maps of `sizes`. With `pins`, the maps that carry
/// state are reused from there when pinned and shaped as this agent makes them, else
/// created and pinned there.
pub fn load(facts: &KernelFacts, sizes: Sizes, pins: Option<&Path>) -> Result<Loaded> {
    if let Some(dir) = pins {
        pins::replace_mismatched(dir, &pinned_shapes(facts, sizes)?);
    }
    let mut loader = EbpfLoader::new();
    let (inflight, pending_sets) = dns_tables(facts, sizes);
    loader.map_max_entries(names::FLOWS, sizes.flows);
    loader.map_max_entries(names::DNS_INFLIGHT, inflight);
    loader.map_max_entries(names::DNS_PENDING, pending_sets);
    let layout = facts.globals();
    for (name, value) in &layout {
        loader.override_global(name, value, true);
    }
    let keys = random_words::<3>();
    loader.override_global(globals::FLOW_CACHE_KEY_LO, &keys[0], true);
    loader.override_global(globals::FLOW_CACHE_KEY_HI, &keys[1], true);
    // The queries in flight are found by this key: a restarted agent keeps the one they
    // were filed by.
    let dns_set_key = pins
        .and_then(|dir| pinned_dns_set_key(&dir.join(names::DNS_KEYS)))
        .unwrap_or(keys[2]);
    loader.override_global(globals::DNS_SET_KEY, &dns_set_key, true);
    loader.override_global(globals::PENDING_SETS, &pending_sets, true);
    if let Some(dir) = pins {
        for name in names::PINNED {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    let mut ebpf = loader.load(object(facts)).with_context(|| match pins {
        Some(dir) => format!("loading the eBPF object with its maps in {}", dir.display()),
        None => "loading the eBPF object".to_owned(),
    })?;
    let mut dns_keys: Array<MapData, u32> = ebpf
        .take_map(names::DNS_KEYS)
        .context("map DNS_KEYS missing from the object")?
        .try_into()?;
    dns_keys
        .set(0, dns_set_key, 0)
        .context("keeping the DNS set key")?;
    let maps = Maps::take(&mut ebpf)?;
    Ok(Loaded {
        programs: Programs::new(ebpf, Attachments::default()),
        maps,
    })
}

/// The DNS set key a previous agent kept in its pinned `DNS_KEYS`, if there is one.
fn pinned_dns_set_key(path: &Path) -> Option<u32> {
    if !path.exists() {
        return None;
    }
    let data = MapData::from_pin(path)
        .map_err(|e| log::warn!("reading {}: {e}", path.display()))
        .ok()?;
    let keys: Array<MapData, u32> = Map::Array(data).try_into().ok()?;
    keys.get(&0, 0).ok()
}

/// `N` random words from the kernel, keys of the programs' hashes drawn afresh at each
/// load; zeros (still working keys) if it has none to give.
fn random_words<const N: usize>() -> [u32; N] {
    let mut w = [0u32; N];
    let len = size_of_val(&w);
    // SAFETY: getrandom writes at most the `len` bytes it is given.
    let n = unsafe { libc::getrandom(w.as_mut_ptr().cast(), len, 0) };
    if usize::try_from(n).ok() != Some(len) {
        log::warn!("no random keys for the programs' hashes: using fixed ones");
    }
    w
}
