//! The agent's side of the kernel's tables: typed handles over the maps the loader hands
//! out, and the lock-free tables (`flowsets`, `pending`) read, claimed and freed in
//! place with the atomics the programs use (their side is the eBPF crate's `tables/`).
//! Nothing here loads or attaches: the loader builds each handle once, from its map.

pub(crate) mod batch;
pub mod dns;
pub mod flowsets;
mod mapped;
pub mod pending;
pub mod slots;
