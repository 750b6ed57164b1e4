//! The two classifiers on each ENI, one per direction. Each parses a packet once and
//! hands it to every probe family. They return `TC_ACT_UNSPEC` (TCX's "next") so that
//! whatever else is attached, a CNI for one, still sees every packet.

use aya_ebpf::{macros::classifier, programs::TcContext};

use monitor_common::proto::{DNS_PORT, IPPROTO_TCP, IPPROTO_UDP};

use super::{dns, flows, linklocal, packet};

const TC_ACT_UNSPEC: i32 = -1;

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    handle(&ctx, false);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    handle(&ctx, true);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn handle(ctx: &TcContext, egress: bool) {
    let Some(p) = packet::parse(ctx) else { return };
    // SAFETY: the context's skb is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let (far, far_port) = if egress {
        (&p.dst, p.dport)
    } else {
        (&p.src, p.sport)
    };
    let info = linklocal::lookup(&p, far, far_port);
    let flags = packet::tcp_flags(ctx, &p);
    match linklocal::service(info) {
        // EC2 does not track flows to its link-local services: they have their own
        // allowance (1024 packets/s), counted on the way out.
        Some(service) => {
            if egress {
                linklocal::count(service, ifindex, &p.src);
            }
        }
        None => flows::track(&p, flags, ifindex, egress),
    }
    if p.l4 != 0 && (p.sport == DNS_PORT || p.dport == DNS_PORT) {
        if p.proto == IPPROTO_UDP {
            dns::handle(ctx, &p, ifindex, egress, info);
        } else if p.proto == IPPROTO_TCP {
            dns::handle_tcp(ctx, &p, flags, ifindex, egress, info);
        }
    }
}
