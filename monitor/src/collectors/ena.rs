//! The ENA driver's allowance counters, and the instance's connection-tracking
//! allowance and its utilization (the model in `model::allowance`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::{Metric, NO_LABELS, encode_counters, encode_gauges, gauge};
use crate::{devices::Devices, ethtool, model::allowance::Allowance, model::flows::FlowCounts};

const AVAILABLE: Metric = Metric {
    name: "ena_conntrack_allowance_available",
    help: "Connections the instance can still track before its allowance is exceeded (ENA driver).",
};
const EXCEEDED: Metric = Metric {
    name: "ena_allowance_exceeded",
    help: "Packets the hypervisor queued or dropped because an allowance was exceeded (ENA driver), as the driver counts them.",
};
const ALLOWANCE: Metric = Metric {
    name: "conntrack_allowance",
    help: "The instance's connection-tracking allowance used for the ratio: from --conntrack-allowance (flag) or learned from the ENA driver (learned).",
};
const UTILIZATION: Metric = Metric {
    name: "conntrack_allowance_utilization_ratio",
    help: "Instance-wide tracked connections over the connection-tracking allowance.",
};

/// The ENA statistics exported as `allowance` counters, and their label.
pub const EXCEEDED_STATS: [(&str, &str); 5] = [
    ("bw_in_allowance_exceeded", "bw_in"),
    ("bw_out_allowance_exceeded", "bw_out"),
    ("pps_allowance_exceeded", "pps"),
    ("conntrack_allowance_exceeded", "conntrack"),
    ("linklocal_allowance_exceeded", "linklocal"),
];
pub const AVAILABLE_STAT: &str = "conntrack_allowance_available";

/// Where a device's driver statistics come from, by name.
pub trait DriverStats: Send + Sync {
    fn read(&self, device: &str) -> std::io::Result<BTreeMap<String, u64>>;
}

/// The driver, through the ethtool ioctls.
#[derive(Debug, Default)]
pub struct Ethtool;

impl DriverStats for Ethtool {
    fn read(&self, device: &str) -> std::io::Result<BTreeMap<String, u64>> {
        ethtool::stats(device)
    }
}

/// A device's statistics read at most once a `period`, however many scrapes ask: each
/// ethtool read takes the host-wide RTNL lock and reaches the device, and any pod can
/// scrape as often as it likes. A scrape within the period gets the last reading (a
/// failed read counts as a reading of nothing); scrapes that arrive during a read wait
/// for it and share it.
#[derive(Debug)]
pub struct AtMostEvery<S> {
    inner: S,
    period: Duration,
    last: Mutex<HashMap<String, Reading>>,
}

/// A device's statistics, and when they were read.
type Reading = (Instant, BTreeMap<String, u64>);

/// How often the ENA statistics are read at most.
pub const ENA_READ_PERIOD: Duration = Duration::from_secs(1);

impl<S> AtMostEvery<S> {
    pub fn new(inner: S, period: Duration) -> Self {
        Self {
            inner,
            period,
            last: Mutex::default(),
        }
    }
}

impl<S: DriverStats> DriverStats for AtMostEvery<S> {
    fn read(&self, device: &str) -> std::io::Result<BTreeMap<String, u64>> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if let Some((at, stats)) = last.get(device)
            && now.duration_since(*at) < self.period
        {
            return Ok(stats.clone());
        }
        let stats = self.inner.read(device).unwrap_or_default();
        // Devices gone long since are forgotten: the map holds the devices scraped now.
        last.retain(|_, (at, _)| now.duration_since(*at) < self.period * 60);
        last.insert(device.to_owned(), (now, stats.clone()));
        Ok(stats)
    }
}

#[derive(Debug)]
pub struct EnaCollector<S = AtMostEvery<Ethtool>> {
    pub stats: S,
    pub devices: Devices,
    pub flows: FlowCounts,
    /// The instance's allowance: `--conntrack-allowance`, or learned from the driver.
    pub allowance: Mutex<Allowance>,
}

impl<S: DriverStats + std::fmt::Debug + 'static> Collector for EnaCollector<S> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let devices = self.devices.snapshot();
        let estimate = self
            .flows
            .get()
            .map(|p| p.total(|i| devices.contains_key(&i)));
        let mut available = Vec::new();
        let mut exceeded = Vec::new();
        let mut instance_available: Option<u64> = None;
        for d in devices.values() {
            let stats = self.stats.read(&d.name).unwrap_or_default();
            let device = || ("device", d.name.clone());
            if let Some(&a) = stats.get(AVAILABLE_STAT) {
                available.push(([device()], gauge(a)));
                // Every ENI reports the instance's figure; the lowest is the latest.
                instance_available = Some(instance_available.map_or(a, |m| m.min(a)));
            }
            // As the driver reads them: a driver reset is an ordinary counter reset, which
            // rate() and increase() already handle; an offset kept in the agent would
            // not survive the agent.
            for (stat, allowance) in EXCEEDED_STATS {
                if let Some(&raw) = stats.get(stat) {
                    exceeded.push(([device(), ("allowance", allowance.to_owned())], raw));
                }
            }
        }
        let assessment = self
            .allowance
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .assess(estimate, instance_available);
        encode_gauges(&mut encoder, &AVAILABLE, available)?;
        encode_counters(&mut encoder, &EXCEEDED, exceeded)?;
        encode_gauges(
            &mut encoder,
            &ALLOWANCE,
            assessment.map(|x| {
                (
                    [("source", x.source.label().to_owned())],
                    gauge(x.allowance),
                )
            }),
        )?;
        encode_gauges(
            &mut encoder,
            &UTILIZATION,
            assessment.map(|x| (NO_LABELS, x.utilization)),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::{
        devices::Device,
        ethtool::tests::{fixture, u64s},
        exposition::Exposition,
    };

    /// The driver as captured: each read returns the next of `readings` (the last one
    /// again once they run out), `eth0` only.
    #[derive(Debug)]
    struct Captured {
        readings: Vec<&'static str>,
        next: AtomicUsize,
    }

    impl DriverStats for Captured {
        fn read(&self, device: &str) -> std::io::Result<BTreeMap<String, u64>> {
            if device != "eth0" {
                return Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let name = self.readings[i.min(self.readings.len() - 1)];
            Ok(ethtool::parse(
                &fixture("gstrings.bin"),
                &u64s(&fixture(name)),
            ))
        }
    }

    fn scrape(registry: &Registry) -> Exposition {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        Exposition::parse(&text).unwrap()
    }

    /// Counts reads by device, each taking `delay`.
    #[derive(Debug, Default)]
    struct Counting {
        reads: Mutex<BTreeMap<String, usize>>,
        delay: Duration,
    }

    impl DriverStats for Counting {
        fn read(&self, device: &str) -> std::io::Result<BTreeMap<String, u64>> {
            std::thread::sleep(self.delay);
            *self
                .reads
                .lock()
                .unwrap()
                .entry(device.to_owned())
                .or_default() += 1;
            Ok(BTreeMap::from([(AVAILABLE_STAT.to_owned(), 5)]))
        }
    }

    #[test]
    fn a_scrape_storm_reads_each_device_at_most_once_a_period() {
        let period = Duration::from_millis(200);
        let stats = AtMostEvery::new(
            Counting {
                delay: Duration::from_millis(20),
                ..Counting::default()
            },
            period,
        );
        let started = Instant::now();
        // Eight scrapers as fast as they go, over two devices, for 5 periods.
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    while started.elapsed() < period * 5 {
                        for device in ["eth0", "eth1"] {
                            assert_eq!(stats.read(device).unwrap()[AVAILABLE_STAT], 5);
                        }
                    }
                });
            }
        });
        let reads = stats.inner.reads.lock().unwrap().clone();
        // One at the start, then one each period (a period begins when a read ends).
        for device in ["eth0", "eth1"] {
            let n = reads[device];
            assert!((4..=6).contains(&n), "{device}: {n} reads in 5 periods");
        }
    }

    #[test]
    fn the_collector_exports_the_drivers_counters_and_the_allowance() {
        let devices = Devices::default();
        devices.replace([
            Device::new("eth0", 2, 0),
            // A device without the ENA statistics (a veth, say): no series of its own.
            Device::new("eth1", 3, 1),
        ]);
        let mut registry = Registry::with_prefix("eni_monitor");
        registry.register_collector(Box::new(EnaCollector {
            stats: Captured {
                readings: vec!["gstats-1.bin", "gstats-2-after-reset.bin"],
                next: AtomicUsize::new(0),
            },
            devices,
            flows: FlowCounts::default(),
            allowance: Mutex::new(Allowance::new(Some(100_000))),
        }));
        let first = scrape(&registry);
        let exceeded = |s: &Exposition, a: &str| {
            s.get(
                "eni_monitor_ena_allowance_exceeded_total",
                &[("device", "eth0"), ("allowance", a)],
            )
        };
        assert_eq!(exceeded(&first, "conntrack"), Some(12.0));
        assert_eq!(exceeded(&first, "linklocal"), Some(3.0));
        assert_eq!(exceeded(&first, "pps"), Some(0.0));
        assert_eq!(exceeded(&first, "bw_in"), Some(41.0));
        assert_eq!(exceeded(&first, "bw_out"), Some(7.0));
        assert_eq!(
            first.get(
                "eni_monitor_ena_conntrack_allowance_available",
                &[("device", "eth0")]
            ),
            Some(87_211.0)
        );
        assert_eq!(
            first
                .matching(
                    "eni_monitor_ena_allowance_exceeded_total",
                    &[("device", "eth1")]
                )
                .count(),
            0
        );
        // Flag and driver: (T - a) / T, exact.
        assert_eq!(
            first.get("eni_monitor_conntrack_allowance", &[("source", "flag")]),
            Some(100_000.0)
        );
        assert_eq!(
            first.get("eni_monitor_conntrack_allowance_utilization_ratio", &[]),
            Some(0.127_89)
        );
        // The driver reset its counters: exported as it reads them.
        let second = scrape(&registry);
        assert_eq!(exceeded(&second, "conntrack"), Some(2.0));
    }

    /// The ENA families as the agent exports them from a captured driver, line for line
    /// (`tests/golden/ena.txt`): the simulated node's devices have no ENA statistics, so
    /// the node's golden exposition pins these families' help and type but no sample.
    /// `UPDATE_GOLDEN=1` rewrites it; review the diff.
    #[test]
    fn the_ena_families_are_the_golden_ones() {
        let devices = Devices::default();
        devices.replace([Device::new("eth0", 2, 0)]);
        let mut registry = Registry::with_prefix("eni_monitor");
        registry.register_collector(Box::new(EnaCollector {
            stats: Captured {
                readings: vec!["gstats-1.bin"],
                next: AtomicUsize::new(0),
            },
            devices,
            flows: FlowCounts::default(),
            allowance: Mutex::new(Allowance::new(None)),
        }));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/ena.txt");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &text).unwrap();
            return;
        }
        let golden = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, golden, "UPDATE_GOLDEN=1 rewrites {}", path.display());
    }
}
