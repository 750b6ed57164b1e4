//! The flow table: one entry per direction-agnostic 5-tuple on each ENI, with first and
//! last seen second and the TCP close state, so the agent can model which connections
//! EC2 still tracks. An established flow costs one lookup, and a write only when its
//! last-seen second or its flags change.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use monitor_common::{
    FLOW_AB, FLOW_BA, FLOW_CLASSES, FLOW_FIN_AB, FLOW_FIN_BA, FLOW_ICMP, FLOW_OTHER, FLOW_RST,
    FLOW_TCP, FLOW_UDP, Flow, FlowKey, MAX_DEVICES,
};

use super::packet::{IPPROTO_TCP, IPPROTO_UDP, Packet};
use crate::{kernel::now_ns, maps::MONITORED};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const BPF_NOEXIST: u64 = 1;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

/// Sized by the agent (`--flow-table-size`) at load.
#[map]
static FLOWS: HashMap<FlowKey, Flow> = HashMap::with_max_entries(1, 0);

/// New flows per (device slot, protocol class).
#[map]
static FLOWS_CREATED: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_DEVICES * FLOW_CLASSES, 0);

/// Flows that found the table full and were not tracked.
#[map]
static FLOW_TABLE_FULL: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn halves(a: &[u8; 16]) -> (u64, u64) {
    let hi = u64::from_be_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
    let lo = u64::from_be_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
    (hi, lo)
}

#[inline(always)]
fn class(proto: u8) -> u32 {
    match proto {
        IPPROTO_TCP => FLOW_TCP,
        IPPROTO_UDP => FLOW_UDP,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => FLOW_ICMP,
        _ => FLOW_OTHER,
    }
}

#[inline(always)]
pub fn track(p: &Packet, tcp_flags: u8, ifindex: u32) {
    // A later fragment has no ports; its first fragment already touched the flow.
    if p.l4 == 0 && (p.proto == IPPROTO_TCP || p.proto == IPPROTO_UDP) {
        return;
    }
    let src = (halves(&p.src), p.sport);
    let dst = (halves(&p.dst), p.dport);
    let forward = src <= dst;
    let key = if forward {
        FlowKey {
            addr_a: p.src,
            addr_b: p.dst,
            port_a: p.sport,
            port_b: p.dport,
            ifindex,
            proto: p.proto,
            pad: [0; 3],
        }
    } else {
        FlowKey {
            addr_a: p.dst,
            addr_b: p.src,
            port_a: p.dport,
            port_b: p.sport,
            ifindex,
            proto: p.proto,
            pad: [0; 3],
        }
    };
    let mut bits = if forward { FLOW_AB } else { FLOW_BA };
    if p.proto == IPPROTO_TCP {
        if tcp_flags & TCP_RST != 0 {
            bits |= FLOW_RST;
        }
        if tcp_flags & TCP_FIN != 0 {
            bits |= if forward { FLOW_FIN_AB } else { FLOW_FIN_BA };
        }
    }
    let now = (now_ns() / 1_000_000_000) as u32;
    if let Some(flow) = FLOWS.get_ptr_mut(&key) {
        unsafe {
            if (*flow).last_seen != now {
                (*flow).last_seen = now;
            }
            if (*flow).flags & bits != bits {
                (*flow).flags |= bits;
            }
        }
        return;
    }
    let flow = Flow {
        first_seen: now,
        last_seen: now,
        flags: bits,
        pad: [0; 3],
    };
    match FLOWS.insert(&key, &flow, BPF_NOEXIST) {
        Ok(()) => {
            let Some(&slot) = (unsafe { MONITORED.get(&ifindex) }) else {
                return;
            };
            if let Some(n) = FLOWS_CREATED.get_ptr_mut(slot * FLOW_CLASSES + class(p.proto)) {
                unsafe { *n += 1 };
            }
        }
        // Another CPU inserted the same flow first: it counted it.
        Err(e) if e == -17 => {}
        Err(_) => {
            if let Some(n) = FLOW_TABLE_FULL.get_ptr_mut(0) {
                unsafe { *n += 1 };
            }
        }
    }
}
