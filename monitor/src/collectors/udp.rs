//! UDP receive-queue overflows from `udp:udp_fail_queue_rcv_skb`.

use aya::maps::{MapData, PerCpuArray};
use monitor_common::{UDP_QUEUE_DNS, UDP_QUEUE_OTHER};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::encode_counters;

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
        let rows = [(UDP_QUEUE_DNS, "dns"), (UDP_QUEUE_OTHER, "other")].map(|(index, port)| {
            let n = self.drops.get(&index, 0).map_or(0, |v| v.iter().sum());
            ([("port", port.to_owned())], n)
        });
        encode_counters(
            &mut encoder,
            "udp_receive_queue_drops",
            "Datagrams dropped because a UDP socket's receive queue was full (port 53 either side is dns).",
            rows,
        )
    }
}
