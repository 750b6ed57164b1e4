#![no_std]
#![no_main]
#![feature(asm_experimental_arch, core_intrinsics)]
#![allow(internal_features)]

//! The programs for kernels with BPF atomics and `bpf_loop` (5.17+). `compat.rs` builds the same
//! programs for older kernels, which refuse an object that so much as contains an atomic
//! instruction, used or not.

/// Whether the DNS probe keeps queries in flight in `DNS_PENDING` (claimed with
/// compare-and-exchange) rather than in the `DNS_INFLIGHT` hash table.
const ATOMICS: bool = true;
/// Whether a TCP segment's DNS messages are read in a `bpf_loop` (5.17+), every one,
/// rather than in a loop of a bounded count.
const BPF_LOOP: bool = true;

mod headers;
mod kernel;
mod maps;
mod probes;
mod runtime;
mod tables;
