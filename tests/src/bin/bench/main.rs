//! `cargo xtask bench`: what the agent costs, measured on the simulated node. Every
//! figure is the median of several runs, with min and max; the machine is shared.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::similar_names
)]

mod agent;
mod conntrack;
mod cost;
mod dns;
mod established;
mod fleet;
mod flows;
mod rate;
mod report;
mod tcp;

use report::{Report, machine, write_reports};

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("error: the benchmark needs root (network namespaces, eBPF)");
        std::process::exit(1);
    }
    let machine = machine();
    for (k, v) in &machine {
        println!("{k}: {v}");
    }
    let mut report = Report::default();
    // BENCH_ONLY=dns,agent runs a subset while working on one part.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let want = |s: &str| only.is_empty() || only.split(',').any(|o| o == s);
    if want("programs") {
        cost::program_cost(&mut report);
        cost::new_flow_cost(&mut report);
    }
    if want("established") {
        established::established_tcp(&mut report);
    }
    if want("rate") {
        rate::packet_rate(&mut report);
    }
    let cpu = if want("dns") {
        dns::dns_load(&mut report)
    } else {
        0.0
    };
    if want("dns-tcp") {
        dns::dns_tcp_load(&mut report);
    }
    if want("tcp") {
        tcp::tcp_segments(&mut report);
    }
    if want("agent") {
        agent::agent_itself(&mut report, cpu);
    }
    if want("flows") {
        flows::flow_table(&mut report);
    }
    if want("conntrack") {
        conntrack::conntrack(&mut report);
    }
    if want("fleet") {
        fleet::fleet(&mut report);
    }
    write_reports(&report, &machine);
}
