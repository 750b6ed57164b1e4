#![no_std]
#![no_main]
#![feature(asm_experimental_arch, core_intrinsics)]
#![allow(internal_features)]

//! The programs for kernels with BPF atomics (5.12+). `compat.rs` builds the same
//! programs for older kernels, which refuse an object that so much as contains an atomic
//! instruction, used or not.

/// Whether the DNS probe keeps queries in flight in `DNS_PENDING` (claimed with
/// compare-and-exchange) rather than in the `DNS_INFLIGHT` hash table.
const ATOMICS: bool = true;

mod headers;
mod kernel;
mod maps;
mod probes;
mod runtime;
