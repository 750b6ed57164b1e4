#![no_std]
#![no_main]
#![feature(asm_experimental_arch, core_intrinsics)]
#![allow(internal_features)]

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
