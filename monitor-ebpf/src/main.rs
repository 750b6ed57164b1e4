#![no_std]
#![no_main]
#![feature(asm_experimental_arch, core_intrinsics)]
#![allow(internal_features)]
#![allow(
    clippy::inline_always,
    reason = "BPF: helpers are inlined so that the verifier walks one function per program"
)]
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "aya-ebpf's maps take keys by `Borrow`: a reference keeps the key where it is"
)]
#![allow(
    clippy::needless_pass_by_value,
    reason = "program entry points take their context by value, as aya's macros declare them"
)]
#![allow(
    clippy::cast_possible_truncation,
    reason = "header fields and counters are cut from whole words by mask and shift"
)]

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
