//! The one owner of the eBPF object: loads it with the kernel's layout, reuses or pins
//! its state, and hands out what the rest of the agent needs of it: the programs to
//! attach through, and each map as the typed handle of its one owner. Nothing else
//! touches the object.

pub mod attach;
pub mod maps;
pub mod pins;

use std::path::Path;

use anyhow::{Context as _, Result};
use aya::{
    EbpfLoader,
    maps::{Array, Map, MapData},
};
use monitor_common::{
    DNS_INFLIGHT_MAX_ENTRIES, DNS_PENDING_SETS, HASH_KEY_DNS, HASH_KEY_FLOW_HI, HASH_KEY_FLOW_LO,
    HASH_KEYS, flow_sets_for, globals,
};

pub use self::{
    attach::{Attachment, Attachments, ClassifierLinks, Programs},
    maps::Maps,
};
use self::{maps::names, pins::MapShape};
use crate::kernel::KernelFacts;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));
/// The same programs for kernels without BPF atomics or `bpf_loop` (before 5.17).
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

/// `FLOW_SETS` sets: IPv4 flows live there on kernels with BPF atomics; without, every
/// flow is in `FLOWS` and the array is left at one set.
fn flow_sets(facts: &KernelFacts, sizes: Sizes) -> u32 {
    if facts.atomics {
        flow_sets_for(sizes.flows)
    } else {
        1
    }
}

/// The maps the agent sizes, with their entries on `facts`'s kernel.
fn sized_maps(facts: &KernelFacts, sizes: Sizes) -> [(&'static str, u32); 4] {
    let (inflight, pending_sets) = dns_tables(facts, sizes);
    [
        (names::FLOWS, sizes.flows),
        (names::FLOW_SETS, flow_sets(facts, sizes)),
        (names::DNS_INFLIGHT, inflight),
        (names::DNS_PENDING, pending_sets),
    ]
}

/// Every load-time global with its value: the kernel's layout (`facts`), then what this
/// load sizes and the keys of its hashes. Each global of `globals::ALL` once.
fn load_globals(
    facts: &KernelFacts,
    sizes: Sizes,
    keys: &[u32; HASH_KEYS as usize],
) -> Vec<(&'static str, u32)> {
    let (_, pending_sets) = dns_tables(facts, sizes);
    let mut all = facts.globals();
    all.extend([
        (globals::FLOW_TABLE_SIZE, sizes.flows),
        (globals::FLOW_TABLE_SETS, flow_sets(facts, sizes)),
        (globals::PENDING_SETS, pending_sets),
        (globals::FLOW_HASH_KEY_LO, keys[HASH_KEY_FLOW_LO as usize]),
        (globals::FLOW_HASH_KEY_HI, keys[HASH_KEY_FLOW_HI as usize]),
        (globals::DNS_SET_KEY, keys[HASH_KEY_DNS as usize]),
    ]);
    all
}

/// The keys of the hashes that pick sets in the pinned tables: a restarted agent keeps
/// the ones their entries were filed by. Without them, what those tables hold cannot be
/// found, so they start empty, and new keys are drawn.
fn hash_keys(pins: Option<&Path>) -> Result<[u32; HASH_KEYS as usize]> {
    let Some(dir) = pins else {
        return Ok(random_words());
    };
    if let Some(kept) = pinned_hash_keys(&dir.join(names::HASH_KEYS)) {
        return Ok(kept);
    }
    for name in [names::FLOW_SETS, names::DNS_PENDING] {
        let path = dir.join(name);
        if path.exists() {
            pins::unpin(&path, "its hash keys are gone, so it starts empty")?;
        }
    }
    Ok(random_words())
}

/// The shape this agent makes each pinned map on `facts`'s kernel: the object's
/// definition, with the sizes the agent sets.
pub fn pinned_shapes(facts: &KernelFacts, sizes: Sizes) -> Result<Vec<(&'static str, MapShape)>> {
    let object = aya_obj::Object::parse(object(facts)).context("parsing the eBPF object")?;
    let sized_entries = sized_maps(facts, sizes);
    names::PINNED
        .iter()
        .map(|&name| {
            let m = object
                .maps
                .get(name)
                .with_context(|| format!("map {name} missing from the object"))?;
            let max_entries = sized_entries
                .iter()
                .find(|(sized, _)| *sized == name)
                .map_or(m.max_entries(), |&(_, entries)| entries);
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
    let keys = hash_keys(pins)?;
    let mut loader = EbpfLoader::new();
    for (name, entries) in sized_maps(facts, sizes) {
        loader.map_max_entries(name, entries);
    }
    let globals = load_globals(facts, sizes, &keys);
    for (name, value) in &globals {
        loader.override_global(name, value, true);
    }
    if let Some(dir) = pins {
        for name in names::PINNED {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    let mut ebpf = loader.load(object(facts)).with_context(|| match pins {
        Some(dir) => format!("loading the eBPF object with its maps in {}", dir.display()),
        None => "loading the eBPF object".to_owned(),
    })?;
    let mut hash_keys: Array<MapData, u32> = ebpf
        .take_map(names::HASH_KEYS)
        .context("map HASH_KEYS missing from the object")?
        .try_into()?;
    for (i, key) in (0..).zip(keys) {
        hash_keys.set(i, key, 0).context("keeping the hash keys")?;
    }
    let flow_seed = u64::from(keys[HASH_KEY_FLOW_LO as usize])
        | (u64::from(keys[HASH_KEY_FLOW_HI as usize]) << 32);
    let mut maps = Maps::take(&mut ebpf, flow_seed, keys[HASH_KEY_DNS as usize])?;
    maps.flows.recount().context("counting the pinned flows")?;
    Ok(Loaded {
        programs: Programs::new(ebpf, Attachments::default()),
        maps,
    })
}

/// The hash keys a previous agent kept in its pinned `HASH_KEYS`, if there are any.
fn pinned_hash_keys(path: &Path) -> Option<[u32; HASH_KEYS as usize]> {
    if !path.exists() {
        return None;
    }
    let data = MapData::from_pin(path)
        .map_err(|e| log::warn!("reading {}: {e}", path.display()))
        .ok()?;
    let keys: Array<MapData, u32> = Map::Array(data).try_into().ok()?;
    let mut out = [0; HASH_KEYS as usize];
    for (i, k) in (0..).zip(&mut out) {
        *k = keys.get(&i, 0).ok()?;
    }
    Some(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every load-time global the object declares is set at load, and once: the kernel's
    /// layout and the load's own sizes and keys together make `globals::ALL`.
    #[test]
    fn every_global_is_set_once() {
        let facts = KernelFacts::from_btf(&crate::kernel::btf::tests::fixture()).unwrap();
        for atomics in [true, false] {
            let facts = KernelFacts {
                atomics,
                ..facts.clone()
            };
            let mut set: Vec<&str> =
                load_globals(&facts, Sizes::with_flows(1024), &[0; HASH_KEYS as usize])
                    .into_iter()
                    .map(|(name, _)| name)
                    .collect();
            set.sort_unstable();
            let mut all = globals::ALL.to_vec();
            all.sort_unstable();
            assert_eq!(set, all);
        }
    }
}
