#![no_std]
#![no_main]
#![feature(asm_experimental_arch, core_intrinsics)]
#![allow(internal_features)]

//! The programs of `main.rs` for kernels without BPF atomics (before 5.12): the same
//! modules, with queries in flight in the `DNS_INFLIGHT` hash table.

const ATOMICS: bool = false;

#[path = "kernel.rs"]
mod kernel;
#[path = "maps.rs"]
mod maps;
#[path = "probes/mod.rs"]
mod probes;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible: bpf_probe_read_kernel is a GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
