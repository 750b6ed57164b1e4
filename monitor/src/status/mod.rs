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

use crate::{
    exposition::Exposition,
    model::thresholds::{
        CONNTRACK_CRITICAL, CONNTRACK_HIGH, DNS_UNANSWERED, EXHAUSTION_HORIZON_MINUTES,
        LINKLOCAL_LIMIT, LINKLOCAL_PEAK_HIGH,
    },
};

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

/// A rate per second over the window, from two samples of a counter.
fn rate(now: f64, before: f64, secs: f64) -> f64 {
    if now < before || secs <= 0.0 {
        // A reset: what was counted since is all there is.
        return now / secs.max(1.0);
    }
    (now - before) / secs
}

/// The latency quantile `q` from the growth of a histogram's buckets over the window.
fn quantile(now: &Exposition, before: &Exposition, labels: &[(&str, &str)], q: f64) -> Option<f64> {
    let mut buckets: Vec<(f64, f64)> = now
        .matching("eni_monitor_dns_latency_seconds_bucket", labels)
        .filter_map(|(l, v)| {
            let le = l.get("le")?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let mut key: Vec<(&str, &str)> = labels.to_vec();
            key.push(("le", le));
            let old = before.sum("eni_monitor_dns_latency_seconds_bucket", &key);
            Some((bound, (v - old).max(0.0)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Cumulative over le across the devices' resolvers: sum equal bounds.
    let mut merged: Vec<(f64, f64)> = Vec::new();
    for (b, c) in buckets {
        match merged.last_mut() {
            Some((lb, lc))
                if (*lb - b).abs() < f64::EPSILON || (lb.is_infinite() && b.is_infinite()) =>
            {
                *lc += c;
            }
            _ => merged.push((b, c)),
        }
    }
    let total = merged.last()?.1;
    if total <= 0.0 {
        return None;
    }
    merged
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(b, _)| *b)
}

fn secs_text(s: f64) -> String {
    if s.is_infinite() {
        "> 5 s".to_owned()
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1000.0)
    } else {
        format!("{s:.1} s")
    }
}

/// The instance's allowance: one line, and a finding when it is high or filling fast.
fn instance(
    now: &Exposition,
    before: &Exposition,
    secs: f64,
    body: &mut String,
    findings: &mut Vec<Finding>,
) {
    // The instance's allowance.
    let ratio = now
        .first("eni_monitor_conntrack_allowance_utilization_ratio", &[])
        .map(|(_, v)| v);
    let allowance = now.first("eni_monitor_conntrack_allowance", &[]);
    let tracked_total = now.sum("eni_monitor_tracked_flows", &[]);
    match (ratio, allowance) {
        (Some(r), Some((l, t))) => {
            let trend = before
                .first("eni_monitor_conntrack_allowance_utilization_ratio", &[])
                .map(|(_, b)| (r - b) * 100.0 * 60.0 / secs.max(1.0));
            let source = l.get("source").map_or("", String::as_str);
            let trend_text = trend.map_or(String::new(), |t| format!(", {t:+.1} points/min"));
            let _ = writeln!(
                body,
                "instance  allowance {:.1}% of {t:.0} ({source}){trend_text}, {tracked_total:.0} flows tracked",
                r * 100.0
            );
            let minutes_left = trend.filter(|t| *t > 0.0).map(|t| (100.0 - r * 100.0) / t);
            if r >= CONNTRACK_CRITICAL {
                findings.push(Finding {
                    level: Level::Critical,
                    text: format!(
                        "connection-tracking allowance at {:.1}% of {t:.0}",
                        r * 100.0
                    ),
                });
            } else if r >= CONNTRACK_HIGH
                || minutes_left.is_some_and(|m| m <= EXHAUSTION_HORIZON_MINUTES)
            {
                findings.push(Finding {
                    level: Level::Warning,
                    text: format!(
                        "connection-tracking allowance at {:.1}% of {t:.0}{}",
                        r * 100.0,
                        minutes_left.map_or(String::new(), |m| format!(
                            ", full in {m:.0} min at this rate"
                        ))
                    ),
                });
            }
        }
        _ => {
            let _ = writeln!(
                body,
                "instance  allowance unknown (no --conntrack-allowance, no ENA statistics), {tracked_total:.0} flows tracked"
            );
        }
    }
}

/// The two scrapes a screen compares, `secs` apart.
struct Window<'a> {
    now: &'a Exposition,
    before: &'a Exposition,
    secs: f64,
}

impl Window<'_> {
    /// The rate per second of the counter `metric`, summed over the series `labels` pick.
    fn rate(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        rate(
            self.now.sum(metric, labels),
            self.before.sum(metric, labels),
            self.secs,
        )
    }
}

/// One ENI: its flows, ENA counters, link-local peak, DNS and kernel drops.
fn eni(
    device: &str,
    now: &Exposition,
    before: &Exposition,
    secs: f64,
    body: &mut String,
    findings: &mut Vec<Finding>,
) {
    let w = Window { now, before, secs };
    let d = [("device", device)];
    let info = now
        .first("eni_monitor_device_info", &d)
        .map(|(l, _)| l.clone())
        .unwrap_or_default();
    let eni = info
        .get("eni")
        .filter(|e| !e.is_empty())
        .map_or("eni unknown", String::as_str);
    let name = format!("{device} ({eni})");
    let tracked = now.sum("eni_monitor_tracked_flows", &d);
    let new = w.rate("eni_monitor_flows_created_total", &d);
    let _ = writeln!(body, "\n{name}  {tracked:.0} flows tracked, {new:.1} new/s");
    idle(&d, now, body);
    ena(&name, &d, &w, body, findings);
    link_local(&name, &d, &w, body, findings);
    dns(&name, &d, now, before, body, findings);
    who(&d, now, body);
    drops(&name, &d, &w, body, findings);
}

/// The hypervisor's own counters of one ENI.
fn ena(
    name: &str,
    d: &[(&str, &str); 1],
    w: &Window,
    body: &mut String,
    findings: &mut Vec<Finding>,
) {
    let mut exceeded = Vec::new();
    for a in w
        .now
        .label_values("eni_monitor_ena_allowance_exceeded_total", d, "allowance")
    {
        let l = [d[0], ("allowance", a.as_str())];
        let total = w.now.sum("eni_monitor_ena_allowance_exceeded_total", &l);
        let r = w.rate("eni_monitor_ena_allowance_exceeded_total", &l);
        if r > 0.0 {
            findings.push(Finding {
                level: Level::Critical,
                text: format!("{name}: {a} allowance exceeded, {r:.1} packets/s"),
            });
        }
        exceeded.push(format!("{a} {total:.0} ({r:+.1}/s)"));
    }
    if !exceeded.is_empty() {
        let _ = writeln!(body, "  ENA exceeded  {}", exceeded.join(", "));
    }
}

/// One ENI's packets to link-local services: the busiest second, and the resolver's rate.
fn link_local(
    name: &str,
    d: &[(&str, &str); 1],
    w: &Window,
    body: &mut String,
    findings: &mut Vec<Finding>,
) {
    let peak = w
        .now
        .sum("eni_monitor_linklocal_peak_packets_per_second", d);
    let dns_ll = w.rate(
        "eni_monitor_linklocal_packets_total",
        &[d[0], ("service", "dns")],
    );
    let _ = writeln!(
        body,
        "  link-local    peak {peak:.0} packets/s of {LINKLOCAL_LIMIT} (last minute), resolver {dns_ll:.1}/s"
    );
    if peak > LINKLOCAL_PEAK_HIGH {
        findings.push(Finding {
            level: if peak >= LINKLOCAL_LIMIT {
                Level::Critical
            } else {
                Level::Warning
            },
            text: format!("{name}: link-local peak {peak:.0} packets/s of {LINKLOCAL_LIMIT}"),
        });
    }
}

/// One ENI's kernel drops, the top three reasons, and whether DNS is among them.
fn drops(
    name: &str,
    d: &[(&str, &str); 1],
    w: &Window,
    body: &mut String,
    findings: &mut Vec<Finding>,
) {
    let mut drops: Vec<(String, f64)> = w
        .now
        .label_values("eni_monitor_drops_total", d, "reason")
        .into_iter()
        .map(|r| {
            let v = w.rate("eni_monitor_drops_total", &[d[0], ("reason", r.as_str())]);
            (r, v)
        })
        .filter(|(_, v)| *v > 0.0)
        .collect();
    drops.sort_by(|a, b| b.1.total_cmp(&a.1));
    if !drops.is_empty() {
        let top: Vec<String> = drops
            .iter()
            .take(3)
            .map(|(r, v)| format!("{r} {v:.1}/s"))
            .collect();
        let _ = writeln!(body, "  kernel drops  {}", top.join(", "));
    }
    let dns_drops = w.rate("eni_monitor_dns_drops_total", d);
    if dns_drops > 0.0 {
        findings.push(Finding {
            level: Level::Warning,
            text: format!("{name}: the kernel drops DNS packets, {dns_drops:.1}/s"),
        });
    }
}

/// One ENI's DNS over the window: queries, answered, unanswered, latency.
fn dns(
    name: &str,
    d: &[(&str, &str)],
    now: &Exposition,
    before: &Exposition,
    body: &mut String,
    findings: &mut Vec<Finding>,
) {
    // DNS.
    let queries = now.sum("eni_monitor_dns_queries_total", d)
        - before.sum("eni_monitor_dns_queries_total", d);
    let answered = now.sum("eni_monitor_dns_responses_total", d)
        - before.sum("eni_monitor_dns_responses_total", d);
    let unanswered = now.sum("eni_monitor_dns_unanswered_total", d)
        - before.sum("eni_monitor_dns_unanswered_total", d);
    let settled = answered + unanswered;
    let lost = if settled > 0.0 {
        unanswered / settled
    } else {
        0.0
    };
    let p50 = quantile(now, before, d, 0.5).map_or("-".to_owned(), secs_text);
    let p99 = quantile(now, before, d, 0.99).map_or("-".to_owned(), secs_text);
    let _ = writeln!(
        body,
        "  DNS           {queries:.0} queries, {answered:.0} answered, {unanswered:.0} unanswered ({:.1}%), p50 {p50}, p99 {p99}",
        lost * 100.0
    );
    if unanswered > 0.0 && lost > DNS_UNANSWERED {
        findings.push(Finding {
            level: Level::Critical,
            text: format!(
                "{name}: {:.1}% of DNS queries unanswered ({unanswered:.0} of {settled:.0})",
                lost * 100.0
            ),
        });
    }
}

/// Who: the busiest local addresses of one ENI (pods, with the AWS VPC CNI), three each.
fn who(d: &[(&str, &str)], now: &Exposition, body: &mut String) {
    for (metric, what) in [
        ("eni_monitor_top_flow_owners", "top flows   "),
        ("eni_monitor_top_dns_clients_unanswered", "top DNS lost"),
    ] {
        let mut top: Vec<(String, f64)> = now
            .matching(metric, d)
            .filter_map(|(l, v)| Some((l.get("address")?.clone(), v)))
            .collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if !top.is_empty() {
            let three: Vec<String> = top
                .iter()
                .take(3)
                .map(|(a, v)| format!("{a} {v:.0}"))
                .collect();
            let _ = writeln!(body, "  {what}  {}", three.join(", "));
        }
    }
}

/// What lowering the ENI's TCP-established timeout would free: for each timeout under the
/// one in use (at least EC2's least, 60 s), the established flows idle that long or more,
/// and the instance's utilization without them. Of timeouts that free as many, the
/// longest is named; the three shortest so named are shown.
fn idle(d: &[(&str, &str); 1], now: &Exposition, body: &mut String) {
    const IDLE: &str = "eni_monitor_tracked_flows_idle";
    let class = [d[0], ("class", "tcp_established")];
    let Some(all) = now.get(IDLE, &[class[0], class[1], ("le", "+Inf")]) else {
        return;
    };
    let timeout = now
        .get(
            "eni_monitor_tracking_timeout_seconds",
            &[("class", "tcp_established")],
        )
        .unwrap_or(f64::INFINITY);
    let allowance = now
        .first("eni_monitor_conntrack_allowance", &[])
        .map(|(_, t)| t);
    let ratio = now
        .first("eni_monitor_conntrack_allowance_utilization_ratio", &[])
        .map(|(_, r)| r);
    let mut bounds: Vec<(f64, f64)> = now
        .matching(IDLE, &class)
        .filter_map(|(l, under)| Some((l.get("le")?.parse::<f64>().ok()?, under)))
        .filter(|(le, _)| le.is_finite() && *le >= 60.0 && *le < timeout)
        .map(|(le, under)| (le, all - under))
        .collect();
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let choices: Vec<String> = bounds
        .iter()
        .enumerate()
        .filter(|(i, (_, freed))| {
            *freed > 0.0
                && bounds
                    .get(i + 1)
                    .is_none_or(|(_, next)| (next - freed).abs() >= 0.5)
        })
        .map(|(_, (le, freed))| {
            let left = match (ratio, allowance) {
                (Some(r), Some(t)) if t > 0.0 => {
                    format!(" ({:.1}%)", (r - freed / t).max(0.0) * 100.0)
                }
                _ => String::new(),
            };
            format!("{le:.0} s: {freed:.0}{left}")
        })
        .take(3)
        .collect();
    let line = if choices.is_empty() {
        format!("none of {all:.0} established is idle 60 s or more")
    } else {
        format!("{all:.0} established; fewer at {}", choices.join(", "))
    };
    let _ = writeln!(body, "  idle TCP      {line}");
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
