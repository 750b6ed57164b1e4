//! `cargo xtask demo`: the incident replayed for a person, in a few minutes. A node's ENI
//! fills its EC2 connection-tracking allowance behind a hypervisor namespace that tracks
//! and drops as EC2 does; the timeline shows utilization, each alert as it reaches
//! Alertmanager, the first drop, DNS failing, and the lead time the page gave.
//! `--keep` leaves Prometheus and Alertmanager running until Enter is pressed.

use integration_tests::{
    incident::{Incident, runnable},
    timeline,
};

fn main() {
    let keep = std::env::args().any(|a| a == "--keep");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("error: the demo builds network namespaces: run it as root");
        std::process::exit(2);
    }
    if !runnable() {
        eprintln!(
            "error: Prometheus, Alertmanager, unbound or nft missing: run `cargo xtask setup`"
        );
        std::process::exit(2);
    }
    println!(
        "Building the node, the hypervisor and the VPC; starting the agent, Prometheus and Alertmanager..."
    );
    let incident = Incident::build();
    println!("Replaying the incident (about five minutes):\n");
    let out = incident.replay(&mut |t, what| println!("[{t:6.1} s] {what}"));
    println!();
    match out.lead() {
        Some(lead) => println!(
            "The page (EniMonitorConntrackAllowanceCritical) reached Alertmanager {lead:.0} s before the hypervisor's first drop."
        ),
        None => println!("The page did not come before the first drop: {out:?}"),
    }
    if let (Some(drop), Some(dns)) = (out.first_drop_at, out.dns_unanswered_alert_at) {
        println!(
            "DNS failing behind the ENI paged {:.0} s after the first drop, naming {}.",
            dns - drop,
            out.dns_alert_labels["eni"]
        );
    }
    match timeline::write(&incident, &out) {
        Ok((_, path)) => println!(
            "\nThe timeline, as a picture: {}",
            path.canonicalize().unwrap_or(path).display()
        ),
        Err(e) => eprintln!("error: {e}"),
    }
    if keep {
        println!(
            "\nPrometheus and Alertmanager keep running in namespace {}:\n  ip netns exec {} curl -s 'http://127.0.0.1:9090/api/v1/alerts'\n  ip netns exec {} curl -s 'http://127.0.0.1:9093/api/v2/alerts'\nPress Enter to stop.",
            incident.node.name, incident.node.name, incident.node.name
        );
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
}
