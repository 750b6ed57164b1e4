//! The incident's picture: utilization against the allowance, the link-local peak against
//! its 1024 packets/s, DNS queries unanswered, and each alert as Prometheus fired it to
//! Alertmanager (paged, or kept quiet there) and the hypervisor's first drop, on one time
//! axis. The series come from the replay's
//! own Prometheus; the SVG is drawn by `plotters`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use crate::{
    incident::{Incident, NODE, Outcome, VPC_SERVER},
    paging::Engine as _,
};

const GREEN: RGBColor = RGBColor(56, 142, 60);
const ORANGE: RGBColor = RGBColor(245, 124, 0);
const PURPLE: RGBColor = RGBColor(142, 36, 170);
const GREY: RGBColor = RGBColor(117, 117, 117);

/// Where `cargo xtask demo` and the incident test leave the picture.
pub fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/demo/timeline.svg")
}

/// One line of the picture: its legend, its colour and its points (seconds from the
/// start of the ramp, percent).
pub struct Curve {
    pub legend: &'static str,
    pub colour: RGBColor,
    pub points: Vec<(f64, f64)>,
}

/// What the picture shows, read from the replay's Prometheus.
pub struct Timeline {
    pub curves: Vec<Curve>,
    /// Seconds from the start of the ramp, and what happened.
    pub events: Vec<(f64, String)>,
    pub end: f64,
}

/// Runs `expr` over the replay and returns its one series in seconds from the ramp's
/// start, scaled to percent by `scale`.
fn series(incident: &Incident, out: &Outcome, expr: &str, scale: f64) -> Vec<(f64, f64)> {
    let range = (out.started_unix, out.ended_unix, 1.0);
    let mut result = incident.paging.query_range(&incident.node, expr, range);
    assert!(result.len() <= 1, "{expr} gave {} series", result.len());
    result
        .pop()
        .map(|(_, points)| {
            points
                .into_iter()
                .map(|(t, v)| (t - out.started_unix, v * scale))
                .collect()
        })
        .unwrap_or_default()
}

impl Timeline {
    /// The replay's series and events.
    pub fn read(incident: &Incident, out: &Outcome) -> Self {
        let node = format!("node=\"{NODE}\"");
        let dns = format!("{node}, device=\"eth0\", resolver=\"{VPC_SERVER}\"");
        let curves = vec![
            Curve {
                legend: "connection-tracking allowance used (%)",
                colour: RGBColor(211, 47, 47),
                points: series(
                    incident,
                    out,
                    &format!("max(eni_monitor_conntrack_allowance_utilization_ratio{{{node}}})"),
                    100.0,
                ),
            },
            Curve {
                legend: "link-local busiest second, % of 1024 packets/s",
                colour: RGBColor(25, 118, 210),
                points: series(
                    incident,
                    out,
                    &format!(
                        "max(eni_monitor_linklocal_peak_packets_per_second{{{node}, device=\"eth0\"}})"
                    ),
                    100.0 / 1024.0,
                ),
            },
            Curve {
                legend: "DNS queries to the VPC resolver unanswered (%)",
                colour: PURPLE,
                points: series(
                    incident,
                    out,
                    &format!(
                        "sum(rate(eni_monitor_dns_unanswered_total{{{dns}}}[10s])) / sum(rate(eni_monitor_dns_queries_total{{{dns}}}[10s]))"
                    ),
                    100.0,
                ),
            },
        ];
        // Each alert when it first fired: when Prometheus sent it to Alertmanager.
        let range = (out.started_unix, out.ended_unix, 1.0);
        let fired = incident.paging.query_range(
            &incident.node,
            &format!("ALERTS{{alertstate=\"firing\", {node}}}"),
            range,
        );
        let mut first: BTreeMap<String, f64> = BTreeMap::new();
        for (labels, points) in fired {
            let (Some(name), Some((t, _))) = (labels["alertname"].as_str(), points.first()) else {
                continue;
            };
            let t = t - out.started_unix;
            let at = first.entry(name.to_owned()).or_insert(t);
            *at = at.min(t);
        }
        // Paged: the pager received it. Not paged: it fired well before the end (every
        // alert is routed to the pager after a second) and never came, so Alertmanager
        // kept it quiet.
        let paged = incident.paged();
        let end = out.ended_unix - out.started_unix;
        let mut events: Vec<(f64, String)> = first
            .into_iter()
            .map(|(name, at)| {
                let short = name.strip_prefix("EniMonitor").unwrap_or(&name);
                let how = if paged.contains(&name) {
                    ", paged"
                } else if at < end - 5.0 {
                    ", not paged"
                } else {
                    ""
                };
                (at, format!("{short}{how}"))
            })
            .collect();
        if let Some(at) = out.first_drop_at {
            events.push((at, "first drop".to_owned()));
        }
        events.sort_by(|a, b| a.0.total_cmp(&b.0));
        Self {
            curves,
            events,
            end,
        }
    }

    /// Draws the picture as SVG at `path`.
    pub fn draw(&self, path: &Path) -> Result<(), String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        let root = SVGBackend::new(path, (1200, 620)).into_drawing_area();
        let e =
            |e: DrawingAreaErrorKind<std::io::Error>| format!("drawing {}: {e}", path.display());
        root.fill(&WHITE).map_err(e)?;
        // Past the allowance the agent still counts what the pods try: room for it.
        let highest = self
            .curves
            .iter()
            .flat_map(|c| c.points.iter().map(|p| p.1))
            .fold(100.0, f64::max);
        let top = (highest * 1.1).min(400.0);
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "The incident replayed: the allowance fills, the page comes first",
                ("sans-serif", 22),
            )
            .margin(20)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..self.end.max(1.0), 0.0..top)
            .map_err(e)?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_desc("seconds from the start of the ramp")
            .y_desc("% of each line's limit")
            .draw()
            .map_err(e)?;
        chart
            .draw_series(LineSeries::new(
                [(0.0, 100.0), (self.end, 100.0)],
                BLACK.stroke_width(1),
            ))
            .map_err(e)?
            .label("the allowance (100%)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
        for c in &self.curves {
            let colour = c.colour;
            chart
                .draw_series(LineSeries::new(
                    c.points.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(e)?
                .label(c.legend)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2))
                });
        }
        // Each event a vertical line, its name beside it, staggered so names do not meet.
        for ((at, what), i) in self.events.iter().zip(0u32..) {
            // The drop in orange, pages in green, the rest (kept quiet, or too late in the
            // replay to tell) in grey.
            let colour = if what.starts_with("first drop") {
                ORANGE
            } else if what.ends_with(", paged") {
                GREEN
            } else {
                GREY
            };
            let y = top * (0.97 - 0.05 * f64::from(i));
            chart
                .draw_series([PathElement::new(
                    [(*at, 0.0), (*at, y)],
                    colour.stroke_width(1),
                )])
                .map_err(e)?;
            // Names of events in the right half go on the line's left, inside the plot.
            let side = if *at > self.end * 0.6 {
                HPos::Right
            } else {
                HPos::Left
            };
            chart
                .draw_series([Text::new(
                    format!(" {what} ({at:.0} s) "),
                    (*at, y),
                    ("sans-serif", 13)
                        .into_font()
                        .color(&colour)
                        .pos(Pos::new(side, VPos::Center)),
                )])
                .map_err(e)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        root.present().map_err(e)
    }
}

/// Reads the replay's timeline and draws it at `path()`; the path written.
pub fn write(incident: &Incident, out: &Outcome) -> Result<(Timeline, PathBuf), String> {
    let timeline = Timeline::read(incident, out);
    let path = path();
    timeline.draw(&path)?;
    Ok((timeline, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replay's shape drawn: every legend and every event named in the SVG.
    #[test]
    fn the_picture_names_each_line_and_event() {
        let ramp = (0..300)
            .map(|t| (f64::from(t), 88.0 + f64::from(t) * 0.08))
            .collect();
        let dns = (160..300).map(|t| (f64::from(t), 100.0)).collect();
        let timeline = Timeline {
            curves: vec![
                Curve {
                    legend: "allowance used (%)",
                    colour: RED,
                    points: ramp,
                },
                Curve {
                    legend: "DNS unanswered (%)",
                    colour: PURPLE,
                    points: dns,
                },
            ],
            events: vec![
                (85.0, "ConntrackAllowanceCritical, paged".to_owned()),
                (150.0, "first drop".to_owned()),
                (285.0, "link-local peak pages".to_owned()),
            ],
            end: 300.0,
        };
        let path = std::env::temp_dir().join(format!("timeline-{}.svg", std::process::id()));
        timeline.draw(&path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        for text in [
            "allowance used (%)",
            "DNS unanswered (%)",
            "the allowance (100%)",
            "ConntrackAllowanceCritical, paged (85 s)",
            "first drop (150 s)",
            "link-local peak pages (285 s)",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
    }
}
