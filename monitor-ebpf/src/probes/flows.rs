//! The flow table: one entry per direction-agnostic 5-tuple on each ENI, with first and
//! last seen second and the TCP close state, so the agent can model which connections
//! EC2 still tracks. An established flow costs one lookup, and a write only when its
//! last-seen second or its flags change.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use monitor_common::{
    BPF_F_NO_PREALLOC, FLOW_AB, FLOW_BA, FLOW_CLASSES, FLOW_FIN_AB, FLOW_FIN_BA, FLOW_LOCAL_A,
    FLOW_LOCAL_B, FLOW_RST, Flow, FlowKey, MAX_DEVICES, flow_class,
};

use super::packet::{IPPROTO_TCP, IPPROTO_UDP, Packet};
use crate::{kernel::now_coarse_s, maps::MONITORED};

const BPF_NOEXIST: u64 = 1;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

/// Sized by the agent (`--flow-table-size`) at load; entries are allocated as flows
/// appear, so its memory follows the flows tracked, not the table's maximum.
#[map]
static FLOWS: HashMap<FlowKey, Flow> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

/// New flows per (device slot, protocol class).
#[map]
static FLOWS_CREATED: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_DEVICES * FLOW_CLASSES, 0);

/// The flow each CPU refreshed last, and when: back-to-back packets of one flow (a bulk
/// transfer, a burst) skip the hash lookup while nothing would change in the table.
#[map]
static LAST_FLOW: PerCpuArray<LastFlow> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct LastFlow {
    key: FlowKey,
    second: u32,
    flags: u8,
    pad: [u8; 3],
}

/// Flows that found the table full and were not tracked.
#[map]
static FLOW_TABLE_FULL: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn track(p: &Packet, tcp_flags: u8, ifindex: u32, egress: bool) {
    // A later fragment has no ports; its first fragment already touched the flow.
    if p.l4 == 0 && (p.proto == IPPROTO_TCP || p.proto == IPPROTO_UDP) {
        return;
    }
    // Any total order will do to pick side a; words as they lie in memory are cheapest.
    let forward = (p.src, p.sport) <= (p.dst, p.dport);
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
    // The local side sends what leaves and receives what arrives: who owns the flow.
    bits |= if forward == egress {
        FLOW_LOCAL_A
    } else {
        FLOW_LOCAL_B
    };
    if p.proto == IPPROTO_TCP {
        if tcp_flags & TCP_RST != 0 {
            bits |= FLOW_RST;
        }
        if tcp_flags & TCP_FIN != 0 {
            bits |= if forward { FLOW_FIN_AB } else { FLOW_FIN_BA };
        }
    }
    let now = now_coarse_s();
    let last = LAST_FLOW.get_ptr_mut(0);
    if let Some(last) = last {
        let l = unsafe { &*last };
        if l.second == now && l.flags & bits == bits && l.key == key {
            return;
        }
    }
    if let Some(flow) = FLOWS.get_ptr_mut(&key) {
        unsafe {
            if (*flow).last_seen != now {
                (*flow).last_seen = now;
            }
            if (*flow).flags & bits != bits {
                (*flow).flags |= bits;
            }
            if let Some(last) = last {
                *last = LastFlow {
                    key,
                    second: now,
                    flags: (*flow).flags,
                    pad: [0; 3],
                };
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
            if let Some(n) = FLOWS_CREATED.get_ptr_mut(slot * FLOW_CLASSES + flow_class(p.proto)) {
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
