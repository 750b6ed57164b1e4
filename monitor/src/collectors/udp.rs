//! UDP receive-queue overflows from `udp_fail_queue_rcv_skb`.

use aya::maps::{MapData, PerCpuArray};
use monitor_common::UdpQueuePort;
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::{Metric, encode_counters};

const UDP_RECEIVE_QUEUE_DROPS: Metric = Metric {
    name: "udp_receive_queue_drops",
    help: "Datagrams dropped because a UDP socket's receive queue was full (port 53 either side is dns).",
};

pub struct UdpQueueCollector {
    pub drops: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for UdpQueueCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpQueueCollector").finish_non_exhaustive()
    }
}

impl Collector for UdpQueueCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows = UdpQueuePort::ALL.iter().map(|port| {
            let n = self
                .drops
                .get(&(*port as u32), 0)
                .map_or(0, |v| v.iter().sum());
            ([("port", port.label().to_owned())], n)
        });
        encode_counters(&mut encoder, &UDP_RECEIVE_QUEUE_DROPS, rows)
    }
}
