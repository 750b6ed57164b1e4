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

//! The programs of `main.rs` for kernels without BPF atomics (before 5.12): the same
//! modules, with queries in flight in the `DNS_INFLIGHT` hash table.

const ATOMICS: bool = false;

#[path = "headers.rs"]
mod headers;
#[path = "kernel.rs"]
mod kernel;
#[path = "maps.rs"]
mod maps;
#[path = "probes/mod.rs"]
mod probes;
#[path = "runtime.rs"]
mod runtime;
