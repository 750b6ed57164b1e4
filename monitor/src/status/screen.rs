//! The screen's sections: the instance's allowance, then each ENI's flows, ENA counters,
//! link-local peak, DNS, busiest addresses and drops, from two scrapes a window apart.

use std::fmt::Write as _;

use super::{Finding, Level};
use crate::{
    exposition::Exposition,
    model::thresholds::{
        CONNTRACK_CRITICAL, CONNTRACK_HIGH, DNS_UNANSWERED, EXHAUSTION_HORIZON_MINUTES,
        LINKLOCAL_LIMIT, LINKLOCAL_PEAK_HIGH,
    },
};

/// A rate per second over the window, from two samples of a counter.
pub(super) fn rate(now: f64, before: f64, secs: f64) -> f64 {
    if now < before || secs <= 0.0 {
        // A reset: what was counted since is all there is.
        return now / secs.max(1.0);
    }
    (now - before) / secs
}

/// The latency quantile `q` from the growth of a histogram's buckets over the window.
pub(super) fn quantile(
    now: &Exposition,
    before: &Exposition,
    labels: &[(&str, &str)],
    q: f64,
) -> Option<f64> {
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

pub(super) fn secs_text(s: f64) -> String {
    if s.is_infinite() {
        "> 5 s".to_owned()
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1000.0)
    } else {
        format!("{s:.1} s")
    }
}

/// The instance's allowance: one line, and a finding when it is high or filling fast.
pub(super) fn instance(
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
pub(super) struct Window<'a> {
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
pub(super) fn eni(
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
pub(super) fn ena(
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
pub(super) fn link_local(
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
pub(super) fn drops(
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
pub(super) fn dns(
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
pub(super) fn who(d: &[(&str, &str)], now: &Exposition, body: &mut String) {
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
pub(super) fn idle(d: &[(&str, &str); 1], now: &Exposition, body: &mut String) {
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
