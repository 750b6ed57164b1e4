//! Loading the object against this kernel, running a classifier on a packet, and
//! reading its maps back.

use std::path::Path;

use aya::programs::{TestRun as _, TestRunOptions};
use monitor::{
    kernel::{self, KernelFacts},
    loader::{self, Maps, Programs, Sizes},
};
use monitor_common::{DnsCountKind, LinkLocalService, MapFull};

/// The object loaded, with its maps.
pub struct Probe {
    pub programs: Programs,
    pub maps: Maps,
    /// Whether this is the object with BPF atomics (queries in flight in `DNS_PENDING`).
    pub atomics: bool,
}

/// The object loaded against this kernel, classifiers loaded, loopback (where test runs
/// happen) monitored in slot 0.
pub fn loaded() -> Probe {
    loaded_with(Sizes::with_flows(1024))
}

pub fn loaded_with(sizes: Sizes) -> Probe {
    loaded_object(sizes, None)
}

/// Both objects this kernel can load: the one it gets, and where it has BPF atomics the
/// one for kernels without them too (its `DNS_INFLIGHT` path is what 5.10 runs).
pub fn both_objects(sizes: Sizes) -> Vec<Probe> {
    let mut objects = vec![loaded_object(sizes, None)];
    if kernel::has_atomics() {
        objects.push(loaded_object(sizes, Some(false)));
    }
    objects
}

/// Runs `check` on both objects this kernel loads (`both_objects`), as test `test`, which
/// needs root.
pub fn on_both_objects(test: &str, sizes: Sizes, check: impl Fn(&Probe)) {
    if !crate::root::require_root(test) {
        return;
    }
    for probe in both_objects(sizes) {
        check(&probe);
    }
}

pub fn loaded_object(sizes: Sizes, atomics: Option<bool>) -> Probe {
    let mut facts = KernelFacts::read(Path::new(kernel::BTF_PATH)).unwrap();
    if let Some(atomics) = atomics {
        facts.atomics = atomics;
    }
    let loader::Loaded {
        mut programs,
        mut maps,
    } = loader::load(&facts, sizes, None).unwrap();
    programs.load_classifiers().unwrap();
    maps.monitored.set([("lo", 1, 0)]).unwrap();
    maps.addrs
        .set_service("169.254.169.253".parse().unwrap(), LinkLocalService::Dns)
        .unwrap();
    Probe {
        programs,
        maps,
        atomics: facts.atomics,
    }
}

pub fn run(probe: &Probe, program: &str, packet: &[u8]) -> u32 {
    run_with(&probe.programs, program, packet)
}

pub fn run_with(programs: &Programs, program: &str, packet: &[u8]) -> u32 {
    let prog = programs.classifier(program).unwrap();
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    prog.test_run(opts)
        .unwrap_or_else(|e| panic!("test run of {program} on {} bytes: {e:?}", packet.len()))
        .return_value
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub queries: u64,
    pub responses: u64,
    /// Copies replaced by a retransmission, counted unanswered.
    pub superseded: u64,
    /// Queries the table could not keep (refused, or ended to make room), untracked.
    pub untracked: u64,
    pub inflight: usize,
    pub linklocal: u64,
    /// TCP connections to port 53 refused.
    pub refused: u64,
}

/// The DNS counts by (resolver slot, kind), over every device and rcode.
impl Counts {
    /// The DNS counts alone: (queries, responses, superseded, untracked, in flight).
    pub fn dns(
        queries: u64,
        responses: u64,
        superseded: u64,
        untracked: u64,
        inflight: usize,
    ) -> Self {
        Self {
            queries,
            responses,
            superseded,
            untracked,
            inflight,
            ..Self::default()
        }
    }
}

/// The DNS counts by (resolver slot, kind), over every device and rcode.
pub fn by_slot(probe: &Probe) -> std::collections::BTreeMap<(u8, DnsCountKind), u64> {
    let mut out = std::collections::BTreeMap::new();
    for (key, n) in probe.maps.dns.snapshot().counts {
        let kind = DnsCountKind::from_u8(key.kind).unwrap();
        *out.entry((key.resolver, kind)).or_default() += n;
    }
    out
}

pub fn counts(probe: &Probe) -> Counts {
    let mut c = Counts::default();
    for ((_, kind), n) in by_slot(probe) {
        match kind {
            DnsCountKind::Query => c.queries += n,
            DnsCountKind::Response => c.responses += n,
            DnsCountKind::Superseded => c.superseded += n,
            DnsCountKind::Untracked => c.untracked += n,
            DnsCountKind::Unanswered => panic!("the agent's count, not the programs'"),
            DnsCountKind::ConnectFailure => c.refused += n,
        }
    }
    probe
        .maps
        .dns_inflight
        .for_each(|_, _| c.inflight += 1)
        .unwrap();
    c.inflight += probe.maps.dns_pending.waiting();
    c.linklocal = LinkLocalService::ALL
        .iter()
        .map(|s| probe.maps.ll_packets.get(0, *s as u32).iter().sum::<u64>())
        .sum();
    c
}

/// `MAP_FULL[map]`, summed over CPUs.
pub fn map_full(probe: &Probe, map: MapFull) -> u64 {
    probe
        .maps
        .map_full
        .get(&(map as u32), 0)
        .unwrap()
        .iter()
        .sum()
}

/// Pins the calling thread to `cpu`.
pub fn pin_to(cpu: usize) {
    // SAFETY: a zeroed CPU set with one CPU added, for the calling thread (0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set),
            0,
            "pinning to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Runs `each(me, i)` for i in 0..n on CPUs 0 and 1 at once, in step: neither CPU begins
/// step i before the other has finished step i - 1, so both are at step i at about the
/// same moment.
pub fn in_step(n: usize, each: impl Fn(usize, usize) + Sync) {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    assert!(online >= 2, "this test needs two CPUs");
    let done = [AtomicUsize::new(0), AtomicUsize::new(0)];
    std::thread::scope(|s| {
        for me in 0..2 {
            let (done, each) = (&done, &each);
            s.spawn(move || {
                pin_to(me);
                for i in 0..n {
                    while done[1 - me].load(SeqCst) < i {
                        std::hint::spin_loop();
                    }
                    each(me, i);
                    done[me].fetch_add(1, SeqCst);
                }
            });
        }
    });
}

/// Flows of `class` begun on loopback (slot 0), from the `flows_created` map.
pub fn created(
    flows_created: &monitor::tables::slots::SlotArray<u64>,
    class: monitor_common::FlowClass,
) -> u64 {
    flows_created.get(0, class as u32).iter().sum()
}
