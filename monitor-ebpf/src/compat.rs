#![no_std]
#![no_main]
#![feature(asm_experimental_arch, core_intrinsics)]
#![allow(internal_features)]

//! The programs of `main.rs` for kernels without BPF atomics or `bpf_loop` (before
//! 5.17): the same modules, with queries in flight in the `DNS_INFLIGHT` hash table and
//! a TCP segment's DNS messages read in a loop of a bounded count.

const ATOMICS: bool = false;
const BPF_LOOP: bool = false;

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
#[path = "tables/mod.rs"]
mod tables;
