//! eni-monitor: a node agent that warns before an ENI runs out of its EC2 allowances or
//! DNS packets start to vanish.
//!
//! The data's way, from the kernel up: `kernel` reads the running kernel's layout;
//! `tables` holds the typed handles over the kernel's maps and the lock-free tables the
//! agent shares with the programs; `loader` alone owns the eBPF object (loads, pins,
//! attaches, hands out each map as its `tables` handle); `model` decides (allowance, EC2 timeouts, resolver labels, link-local
//! peak) with no kernel in it; `housekeeping` runs the periodic passes over the kernel's
//! tables; `collectors` read and encode; `http` serves. `agent` wires them, `watch`
//! follows devices as they come and go. Imports point down that list.

pub mod agent;
pub mod cli;
pub mod collectors;
pub mod devices;
pub mod ethtool;
pub mod exposition;
pub mod housekeeping;
pub mod http;
pub mod imds;
pub mod kernel;
pub mod loader;
pub mod model;
pub mod status;
pub mod tables;
pub mod watch;
pub mod webconfig;

#[cfg(test)]
#[path = "../../tests/src/root.rs"]
mod root;
