//! Two CPUs writing one flow at once (these run on the arm64 guests of the kernel
//! matrix too): begun once, both FINs kept, a pass freeing slots under packets.

use monitor::loader::Sizes;

use super::{frames::*, harness::*, root};

#[test]
fn two_cpus_closing_one_flow_at_once_both_fins_stay() {
    const FLOWS: u16 = 20_000;

    use monitor_common::{FLOW_AB, FLOW_BA, FLOW_FIN_AB, FLOW_FIN_BA, FLOW_LOCAL_B, FlowKey};
    if !root::require_root("two_cpus_closing_one_flow_at_once_both_fins_stay") {
        return;
    }
    // IPv6: in the hash table `FLOWS` under either object (IPv4 flows live in the sets
    // where there are atomics). fd00::2 sorts first: side a the server, b local.
    let server = "fd00::2";
    let local = "fd00::5";
    let port = |i: u16| 10_000 + i;
    for probe in both_objects(Sizes::with_flows(u32::from(FLOWS) * 2)) {
        for i in 0..FLOWS {
            let out = ipv6_tcp_between((local, port(i)), (server, 443), ACK, &[]);
            let back = ipv6_tcp_between((server, 443), (local, port(i)), ACK, &[]);
            run(&probe, "tc_egress", &out);
            run(&probe, "tc_ingress", &back);
        }
        // The two FINs of each flow, one on each CPU, at once.
        let programs = &probe.programs;
        in_step(usize::from(FLOWS), |me, i| {
            let i = u16::try_from(i).unwrap();
            let (hook, fin) = if me == 0 {
                let fin = (local, port(i));
                (
                    "tc_egress",
                    ipv6_tcp_between(fin, (server, 443), FIN_ACK, &[]),
                )
            } else {
                let fin = (server, 443);
                (
                    "tc_ingress",
                    ipv6_tcp_between(fin, (local, port(i)), FIN_ACK, &[]),
                )
            };
            run_with(programs, hook, &fin);
        });
        let mut flags = std::collections::BTreeMap::<u8, usize>::new();
        probe
            .maps
            .flows
            .for_each(|_: &FlowKey, f| *flags.entry(f.flags()).or_default() += 1)
            .unwrap();
        let closed = FLOW_AB | FLOW_BA | FLOW_LOCAL_B | FLOW_FIN_AB | FLOW_FIN_BA;
        assert_eq!(
            flags,
            [(closed, usize::from(FLOWS))].into(),
            "atomics {}: flows by bits",
            probe.atomics
        );
    }
}

/// The flows the tables hold (their keys' words), each with how many times it is there.
fn held_keys(probe: &Probe) -> std::collections::BTreeMap<[u32; 11], usize> {
    let mut keys = std::collections::BTreeMap::new();
    probe
        .maps
        .flows
        .for_each(|k, _| *keys.entry(k.words()).or_default() += 1)
        .unwrap();
    keys
}

/// The claim (compare-and-exchange) and publish (atomic or) of a flow's slot, on two CPUs
/// beginning the same flow at once: on x86 and on arm64 (whose loads and stores the CPU
/// may reorder where x86's may not) the flow begins once, in one slot, with both
/// packets' bits.
#[test]
fn two_cpus_beginning_one_flow_begin_it_once() {
    use monitor_common::{FLOW_AB, FLOW_BA};
    const FLOWS: u16 = 4000;
    if !root::require_root("two_cpus_beginning_one_flow_begin_it_once") {
        return;
    }
    for probe in both_objects(Sizes::with_flows(u32::from(FLOWS) * 4)) {
        let programs = &probe.programs;
        // Each flow's first packet out on CPU 0 and its reply on CPU 1, at once.
        in_step(usize::from(FLOWS), |me, i| {
            let port = 1 + u16::try_from(i).unwrap();
            if me == 0 {
                let out = ipv4_udp(SRC4, DST4, 40000, port, 0, b"x");
                run_with(programs, "tc_egress", &out);
            } else {
                let back = ipv4_udp(DST4, SRC4, port, 40000, 0, b"x");
                run_with(programs, "tc_ingress", &back);
            }
        });
        let keys = held_keys(&probe);
        let twice: Vec<_> = keys.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "atomics {}: in two places: {twice:?}",
            probe.atomics
        );
        assert_eq!(keys.len(), usize::from(FLOWS), "atomics {}", probe.atomics);
        assert_eq!(
            created(&probe.maps.flows_created, monitor_common::FlowClass::Udp),
            u64::from(FLOWS),
            "atomics {}",
            probe.atomics
        );
        let mut both = 0;
        probe
            .maps
            .flows
            .for_each(|_, f| {
                both += usize::from(f.flags() & (FLOW_AB | FLOW_BA) == FLOW_AB | FLOW_BA);
            })
            .unwrap();
        assert_eq!(
            both,
            usize::from(FLOWS),
            "atomics {}: flows with both bits",
            probe.atomics
        );
    }
}

/// Shares the flow sets' mapping with a thread that runs the pass over it while this one
/// runs programs writing it: memory of this process the kernel's programs share, written
/// through atomics and volatile words only.
struct Shared<'a>(&'a monitor::loader::maps::Flows);
// SAFETY: see above; the pass takes the sets by shared reference and writes them with
// compare-and-exchange and atomic or only.
unsafe impl Sync for Shared<'_> {}

impl Shared<'_> {
    /// A pass over the sets, as the agent's (the sets with flows in `FLOWS` read from
    /// it), that frees every flow of an even port; the slots freed.
    fn free_even_ports(&self) -> u64 {
        let flows = self.0;
        let mut spilled = flows.sets.begin_pass();
        flows
            .table
            .for_each(|k, _| {
                if let Some(set) = flows.sets.set_of(k) {
                    spilled.add(set);
                }
            })
            .unwrap();
        flows
            .sets
            .expire(&spilled, |k, _| k.port_a % 2 == 0, |_, _| {})
    }
}

/// A pass freeing slots while another CPU's packets refresh their flows and begin them
/// again: nothing is in two slots, and every flow begun is held or was freed (flows
/// created - flows freed = flows held), on x86 and on arm64.
#[test]
fn a_pass_freeing_slots_under_packets_loses_and_doubles_nothing() {
    const FLOWS: u16 = 4000;
    if !root::require_root("a_pass_freeing_slots_under_packets_loses_and_doubles_nothing") {
        return;
    }
    let probe = loaded_with(Sizes::with_flows(u32::from(FLOWS) * 4));
    if !probe.atomics {
        eprintln!("skipping: no flow sets without BPF atomics");
        return;
    }
    let flow = |port: u16| ipv4_udp(SRC4, DST4, 40000, port, 0, b"x");
    // Begun on CPU 0; refreshed on CPU 1, whose flow cache has never seen them (and the
    // second changes between rounds), so each packet reaches its slot.
    pin_to(0);
    for port in 1..=FLOWS {
        run(&probe, "tc_egress", &flow(port));
    }
    let mut in_table = 0;
    probe
        .maps
        .flows
        .table
        .for_each(|_, _| in_table += 1)
        .unwrap();
    let in_sets = usize::from(FLOWS) - in_table;
    assert!(
        in_sets > usize::from(FLOWS) / 2,
        "{in_sets} flows in the sets"
    );
    let sets = Shared(&probe.maps.flows);
    let freed = std::sync::atomic::AtomicU64::new(0);
    let programs = &probe.programs;
    // Passes on CPU 0 that free every flow of an even port, while CPU 1 sends each flow
    // a packet, three rounds.
    let rounds = 3;
    in_step(rounds, |me, _| {
        if me == 0 {
            for _ in 0..4 {
                let n = sets.free_even_ports();
                freed.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
            }
        } else {
            for port in 1..=FLOWS {
                run_with(programs, "tc_egress", &flow(port));
            }
        }
    });
    let keys = held_keys(&probe);
    let twice: Vec<_> = keys.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "in two places: {twice:?}");
    let freed = freed.into_inner();
    assert!(freed > 0, "the passes freed nothing");
    assert_eq!(
        created(&probe.maps.flows_created, monitor_common::FlowClass::Udp) - freed,
        keys.len() as u64,
        "flows created - freed ({freed}) = flows held"
    );
}
