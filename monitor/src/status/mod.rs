//! `monitor status`: one screen, for `kubectl exec` during an incident, from a running
//! agent's `/metrics` read twice an interval apart: the instance's allowance and its
//! trend, then per ENI the ENA exceeded counters, the link-local peak, DNS answered and
//! unanswered with latency, and the top drop reasons. What needs attention comes first.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};

mod screen;

use self::screen::{eni, instance};
use crate::exposition::Exposition;

/// GET `path` from `endpoint` (`http://host:port`): the body of a 200.
pub fn fetch(endpoint: &str, path: &str) -> Result<String> {
    let authority = endpoint
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("{endpoint}: only http:// endpoints"))?
        .trim_end_matches('/');
    let addr = authority
        .to_socket_addrs()
        .with_context(|| format!("resolving {authority}"))?
        .next()
        .ok_or_else(|| anyhow!("{authority}: no address"))?;
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to {endpoint} (is the agent running?)"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n")?;
    let mut text = String::new();
    conn.read_to_string(&mut text)
        .with_context(|| format!("reading {endpoint}{path}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("{endpoint}{path}: no HTTP response"))?;
    if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
        bail!(
            "{endpoint}{path}: {}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(body.to_owned())
}

/// How bad a finding is; the worst come first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Critical,
    Warning,
}

struct Finding {
    level: Level,
    text: String,
}

/// Renders the screen from two samples `secs` apart. `colour` adds ANSI colour to the
/// findings (on a terminal only).
pub fn render(
    endpoint: &str,
    now: &Exposition,
    before: &Exposition,
    secs: f64,
    colour: bool,
) -> String {
    let mut findings: Vec<Finding> = Vec::new();
    let mut body = String::new();
    let version = now
        .first("eni_monitor_build_info", &[])
        .and_then(|(l, _)| l.get("version").cloned())
        .unwrap_or_default();
    let header = format!("eni-monitor {version} at {endpoint}, rates over the last {secs:.0} s");

    instance(now, before, secs, &mut body, &mut findings);
    for device in now.label_values("eni_monitor_device_info", &[], "device") {
        eni(&device, now, before, secs, &mut body, &mut findings);
    }

    let unattached = now
        .matching("eni_monitor_program_attached", &[])
        .filter(|(_, v)| *v == 0.0)
        .count();
    if unattached > 0 {
        findings.push(Finding {
            level: Level::Warning,
            text: format!("{unattached} program(s) not attached: see /readyz"),
        });
    }

    findings.sort_by_key(|f| f.level);
    let mut out = String::new();
    let _ = writeln!(out, "{header}");
    if findings.is_empty() {
        let _ = writeln!(out, "OK    nothing needs attention");
    }
    for f in &findings {
        let (tag, code) = match f.level {
            Level::Critical => ("CRIT", "\x1b[1;31m"),
            Level::Warning => ("WARN", "\x1b[33m"),
        };
        if colour {
            let _ = writeln!(out, "{code}{tag}\x1b[0m  {}", f.text);
        } else {
            let _ = writeln!(out, "{tag}  {}", f.text);
        }
    }
    let _ = writeln!(out);
    out.push_str(&body);
    // One screen of at most 100 columns.
    out.lines()
        .map(|l| {
            let width = if colour { 111 } else { 100 };
            let mut s: String = l.chars().take(width).collect();
            s.push('\n');
            s
        })
        .collect()
}

/// `monitor status`: two scrapes `interval` apart, rendered.
pub fn run(endpoint: &str, interval: Duration) -> Result<String> {
    let scrape = || -> Result<Exposition> {
        Exposition::parse(&fetch(endpoint, "/metrics")?)
            .with_context(|| format!("reading {endpoint}/metrics"))
    };
    let before = scrape()?;
    std::thread::sleep(interval);
    let now = scrape()?;
    // SAFETY: isatty has no preconditions.
    let colour = unsafe { libc::isatty(1) } == 1 && std::env::var_os("NO_COLOR").is_none();
    Ok(render(
        endpoint,
        &now,
        &before,
        interval.as_secs_f64(),
        colour,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"
eni_monitor_build_info{version="0.1.0"} 1
eni_monitor_conntrack_allowance{source="flag"} 300
eni_monitor_conntrack_allowance_utilization_ratio{} 0.9
eni_monitor_device_info{device="eth0",eni="eni-0abc",mac="02:00:00:00:00:01"} 1
eni_monitor_tracked_flows{device="eth0",protocol="tcp"} 270
eni_monitor_flows_created_total{device="eth0",protocol="tcp"} 400
eni_monitor_dns_queries_total{device="eth0",resolver="10.0.0.2"} 100
eni_monitor_dns_responses_total{device="eth0",resolver="10.0.0.2",rcode="NOERROR"} 100
eni_monitor_dns_unanswered_total{device="eth0",resolver="10.0.0.2"} 0
eni_monitor_dns_latency_seconds_bucket{device="eth0",resolver="10.0.0.2",le="0.001"} 50
eni_monitor_dns_latency_seconds_bucket{device="eth0",resolver="10.0.0.2",le="0.01"} 100
eni_monitor_dns_latency_seconds_bucket{device="eth0",resolver="10.0.0.2",le="+Inf"} 100
eni_monitor_linklocal_peak_packets_per_second{device="eth0"} 100
eni_monitor_drops_total{device="eth0",reason="NETFILTER_DROP"} 5
eni_monitor_program_attached{program="tc_ingress",hook="tc/ingress",device="eth0"} 1
"#;

    const NOW: &str = r#"
eni_monitor_build_info{version="0.1.0"} 1
eni_monitor_conntrack_allowance{source="flag"} 300
eni_monitor_conntrack_allowance_utilization_ratio{} 0.95
eni_monitor_device_info{device="eth0",eni="eni-0abc",mac="02:00:00:00:00:01"} 1
eni_monitor_tracked_flows{device="eth0",protocol="tcp"} 285
eni_monitor_flows_created_total{device="eth0",protocol="tcp"} 450
eni_monitor_dns_queries_total{device="eth0",resolver="10.0.0.2"} 200
eni_monitor_dns_responses_total{device="eth0",resolver="10.0.0.2",rcode="NOERROR"} 180
eni_monitor_dns_unanswered_total{device="eth0",resolver="10.0.0.2"} 20
eni_monitor_dns_latency_seconds_bucket{device="eth0",resolver="10.0.0.2",le="0.001"} 100
eni_monitor_dns_latency_seconds_bucket{device="eth0",resolver="10.0.0.2",le="0.01"} 180
eni_monitor_dns_latency_seconds_bucket{device="eth0",resolver="10.0.0.2",le="+Inf"} 180
eni_monitor_linklocal_peak_packets_per_second{device="eth0"} 900
eni_monitor_drops_total{device="eth0",reason="NETFILTER_DROP"} 15
eni_monitor_drops_total{device="eth0",reason="NO_SOCKET"} 2
eni_monitor_program_attached{program="tc_ingress",hook="tc/ingress",device="eth0"} 1
eni_monitor_top_flow_owners{device="eth0",address="10.210.1.2"} 5
eni_monitor_top_flow_owners{device="eth0",address="10.210.3.2"} 500
eni_monitor_top_flow_owners{device="eth0",address="10.210.2.2"} 50
eni_monitor_top_flow_owners{device="eth0",address="10.210.4.2"} 1
eni_monitor_top_dns_clients_unanswered{device="eth0",address="10.210.1.2"} 20
"#;

    #[test]
    fn the_worst_comes_first_and_every_line_fits() {
        let out = render(
            "http://127.0.0.1:9435",
            &Exposition::parse(NOW).unwrap(),
            &Exposition::parse(BEFORE).unwrap(),
            10.0,
            false,
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "eni-monitor 0.1.0 at http://127.0.0.1:9435, rates over the last 10 s"
        );
        assert_eq!(
            lines[1],
            "CRIT  connection-tracking allowance at 95.0% of 300"
        );
        assert_eq!(
            lines[2],
            "CRIT  eth0 (eni-0abc): 20.0% of DNS queries unanswered (20 of 100)"
        );
        assert_eq!(
            lines[3],
            "WARN  eth0 (eni-0abc): link-local peak 900 packets/s of 1024"
        );
        assert!(
            out.contains(
                "instance  allowance 95.0% of 300 (flag), +30.0 points/min, 285 flows tracked"
            ),
            "{out}"
        );
        assert!(
            out.contains("eth0 (eni-0abc)  285 flows tracked, 5.0 new/s"),
            "{out}"
        );
        assert!(out.contains("  DNS           100 queries, 80 answered, 20 unanswered (20.0%), p50 1.0 ms, p99 10.0 ms"), "{out}");
        assert!(
            out.contains("  kernel drops  NETFILTER_DROP 1.0/s, NO_SOCKET 0.2/s"),
            "{out}"
        );
        assert!(
            out.contains("  top flows     10.210.3.2 500, 10.210.2.2 50, 10.210.1.2 5\n"),
            "{out}"
        );
        assert!(out.contains("  top DNS lost  10.210.1.2 20\n"), "{out}");
        assert!(lines.iter().all(|l| l.chars().count() <= 100), "{out}");
        assert!(!out.contains('\x1b'));
    }

    #[test]
    fn colour_only_when_asked_and_a_quiet_agent_says_ok() {
        let quiet = Exposition::parse(BEFORE.replace(" 0.9\n", " 0.5\n").as_str()).unwrap();
        let out = render("http://x:1", &quiet, &quiet, 5.0, true);
        assert!(
            out.lines()
                .nth(1)
                .unwrap()
                .starts_with("OK    nothing needs attention"),
            "{out}"
        );
        let loud = render(
            "http://x:1",
            &Exposition::parse(NOW).unwrap(),
            &Exposition::parse(BEFORE).unwrap(),
            10.0,
            true,
        );
        assert!(loud.contains("\x1b[1;31mCRIT\x1b[0m"));
    }

    #[test]
    fn idle_flows_name_what_each_lower_timeout_frees() {
        let mut text = String::from(
            "eni_monitor_device_info{device=\"eth0\",eni=\"\",mac=\"m\"} 1\n\
             eni_monitor_conntrack_allowance{source=\"flag\"} 100\n\
             eni_monitor_conntrack_allowance_utilization_ratio{} 0.12\n\
             eni_monitor_tracking_timeout_seconds{class=\"tcp_established\"} 3600\n",
        );
        // 12 established: 3 idle under 30 s, 7 between 60 and 120 s, 2 past 1800 s.
        for (le, n) in [
            ("30", 3),
            ("60", 3),
            ("120", 10),
            ("180", 10),
            ("350", 10),
            ("600", 10),
            ("1800", 10),
            ("3600", 12),
            ("+Inf", 12),
        ] {
            let _ = writeln!(
                text,
                "eni_monitor_tracked_flows_idle{{device=\"eth0\",class=\"tcp_established\",le=\"{le}\"}} {n}"
            );
        }
        let now = Exposition::parse(&text).unwrap();
        let out = render("http://x:1", &now, &now, 5.0, false);
        let line = out.lines().find(|l| l.contains("idle TCP")).unwrap();
        assert_eq!(
            line,
            "  idle TCP      12 established; fewer at 60 s: 9 (3.0%), 1800 s: 2 (10.0%)"
        );
        let none =
            Exposition::parse(&text.replace("} 10\n", "} 3\n").replace("} 12\n", "} 3\n")).unwrap();
        let out = render("http://x:1", &none, &none, 5.0, false);
        assert!(
            out.contains("  idle TCP      none of 3 established is idle 60 s or more"),
            "{out}"
        );
    }

    #[test]
    fn a_missing_agent_is_one_clear_error() {
        let err = fetch("http://127.0.0.1:1", "/metrics").unwrap_err();
        assert_eq!(
            format!("{err:#}").split(':').next(),
            Some("connecting to http")
        );
        assert!(fetch("https://x", "/").is_err());
    }
}
