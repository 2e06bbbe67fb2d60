//! Stage 7 of the pipeline, the report's picture: a record-boot series as an SVG (written
//! here, no plotting library) and a PNG of it (rendered by librsvg's `rsvg-convert`).
//!
//! Two panels over one time axis: cumulative exits on top, the exit rate of each sampling
//! interval below, stacked by exit reason (the boot's top reasons, the rest as "other";
//! legend between the panels); the boot's phases shaded across both and labelled in place
//! with their exit counts.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use exitlab_proto::msg::STAT_EXITS;
use xshell::{cmd, Shell};

use super::series::{rates, reason_name, reasons_between, Events, Phase, Point, Recorded};
use crate::doctor::{self, Need};
use crate::error::setup;

const W: f64 = 1100.0;
const H: f64 = 720.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 30.0;
const TOP_Y: f64 = 90.0;
const TOP_H: f64 = 300.0;
const BOT_Y: f64 = 450.0;
const BOT_H: f64 = 200.0;
const PHASE_COLORS: [&str; 5] = ["#dfe8f5", "#fbe9c6", "#dcefd8", "#ece2f4", "#f3dada"];
/// The reasons stacked, in order, then "other".
const REASON_COLORS: [&str; 7] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#9a9a9a",
];

/// The recording's top reasons by exits (at most six, the rest go to "other"), ranked as
/// the summary ranks them.
fn top_reasons(r: &Recorded) -> Vec<u32> {
    r.points.last().map_or(vec![], |last| {
        reasons_between(&Point::default(), last)
            .iter()
            .take(REASON_COLORS.len() - 1)
            .map(|p| p.reason)
            .collect()
    })
}

/// Per sampling interval (ending at sample i), the exit rate of each top reason and of the
/// others, in the stacking order.
fn reason_rates(r: &Recorded, top: &[u32]) -> Vec<Option<Vec<f64>>> {
    let mut out = vec![None; r.points.len()];
    for (i, w) in r.points.windows(2).enumerate() {
        let dt = (w[1].t_us.saturating_sub(w[0].t_us)) as f64 / 1e6;
        if dt <= 0.0 || w[1].reasons.is_empty() {
            continue;
        }
        let delta = |k: &u32| {
            let z = w[1].reasons.get(k).map_or(0, |c| c.exits);
            let a = w[0].reasons.get(k).map_or(0, |c| c.exits);
            z.saturating_sub(a) as f64 / dt
        };
        let mut v: Vec<f64> = top.iter().map(delta).collect();
        let other: f64 = w[1]
            .reasons
            .keys()
            .filter(|k| !top.contains(k))
            .map(delta)
            .sum();
        v.push(other);
        out[i + 1] = Some(v);
    }
    out
}

/// 1, 2 or 5 times a power of ten, so that `max` spans about `n` steps.
pub fn nice_step(max: f64, n: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / n;
    let p = 10f64.powf(raw.log10().floor());
    let m = raw / p;
    p * if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    }
}

/// 1234567 → "1.23M", 45600 → "45.6k".
pub fn human(x: f64) -> String {
    let (v, unit) = if x.abs() >= 1e6 {
        (x / 1e6, "M")
    } else if x.abs() >= 1e3 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    let s = if v.fract() == 0.0 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    format!("{s}{unit}")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

struct Axis {
    t_max: f64,
}

impl Axis {
    fn x(&self, t_s: f64) -> f64 {
        LEFT + (W - LEFT - RIGHT) * (t_s / self.t_max).clamp(0.0, 1.0)
    }
}

fn y_of(v: f64, max: f64, top: f64, h: f64) -> f64 {
    top + h - h * (v / max).clamp(0.0, 1.0)
}

fn y_axis(s: &mut String, max: f64, top: f64, h: f64, label: &str) -> f64 {
    let step = nice_step(max, 5.0);
    let top_v = (max / step).ceil().max(1.0) * step;
    let mut v = 0.0;
    while v <= top_v + step / 2.0 {
        let y = y_of(v, top_v, top, h);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#000" stroke-opacity="0.12"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="13">{}</text>"##,
            W - RIGHT,
            LEFT - 8.0,
            y + 4.0,
            human(v)
        );
        v += step;
    }
    let _ = writeln!(
        s,
        r##"<text transform="translate(22,{:.1}) rotate(-90)" text-anchor="middle" font-size="14">{}</text>"##,
        top + h / 2.0,
        esc(label)
    );
    top_v
}

/// The plot of one recording.
pub fn svg(title: &str, r: &Recorded, e: &Events, phases: &[Phase]) -> String {
    let t0 = e.vm_created_us.unwrap_or(0) as f64 / 1e6;
    let rel = |t_us: u64| (t_us as f64 / 1e6 - t0).max(0.0);
    let end = e
        .vm_exited_us
        .or(r.points.last().map(|p| p.t_us))
        .map_or(1.0, rel);
    let ax = Axis {
        t_max: end.max(0.001),
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="DejaVu Sans, Verdana, sans-serif">"##
    );
    let _ = writeln!(s, r##"<rect width="{W}" height="{H}" fill="#fff"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="32" font-size="20" font-weight="bold">{}</text>"##,
        esc(title)
    );
    let total = r.points.last().map_or(0, |p| p.get(STAT_EXITS));
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="56" font-size="14" fill="#444">{} exits in {:.2} s from VM creation to exit; shaded: boot phases (exits in each); time on L1's clock</text>"##,
        human(total as f64),
        end
    );
    // Phases, across both panels.
    for (i, p) in phases.iter().enumerate() {
        let (x0, x1) = (ax.x(p.start_s - t0), ax.x(p.end_s - t0));
        let color = PHASE_COLORS[i % PHASE_COLORS.len()];
        for (top, h) in [(TOP_Y, TOP_H), (BOT_Y, BOT_H)] {
            let _ = writeln!(
                s,
                r##"<rect x="{x0:.1}" y="{top}" width="{:.1}" height="{h}" fill="{color}"/>"##,
                (x1 - x0).max(0.5)
            );
        }
        // Narrow phases get their label rotated.
        let cx = (x0 + x1) / 2.0;
        let text = format!("{} · {}", p.name, human(p.exits as f64));
        if x1 - x0 > 9.0 * text.len() as f64 {
            let _ = writeln!(
                s,
                r##"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-size="14" font-weight="bold" fill="#333">{}</text>"##,
                TOP_Y + 20.0,
                esc(&text)
            );
        } else {
            let _ = writeln!(
                s,
                r##"<text transform="translate({:.1},{:.1}) rotate(90)" font-size="12" font-weight="bold" fill="#333">{}</text>"##,
                cx - 4.0,
                TOP_Y + 8.0,
                esc(&text)
            );
        }
    }
    // Top: cumulative exits.
    let max_exits = y_axis(
        &mut s,
        total.max(1) as f64,
        TOP_Y,
        TOP_H,
        "exits since the VM was created",
    );
    let pts: Vec<String> = r
        .points
        .iter()
        .map(|p| {
            format!(
                "{:.1},{:.1}",
                ax.x(rel(p.t_us)),
                y_of(p.get(STAT_EXITS) as f64, max_exits, TOP_Y, TOP_H)
            )
        })
        .collect();
    let _ = writeln!(
        s,
        r##"<polyline points="{}" fill="none" stroke="#1f4e9a" stroke-width="2.2"/>"##,
        pts.join(" ")
    );
    // Bottom: rate per sampling interval, as steps, stacked by reason; the total on top.
    let rs: Vec<(u64, f64)> = r
        .points
        .iter()
        .zip(rates(r))
        .filter_map(|(p, v)| v.map(|v| (p.t_us, v)))
        .collect();
    let max_rate = rs.iter().map(|(_, v)| *v).fold(1.0, f64::max);
    let max_rate = y_axis(&mut s, max_rate, BOT_Y, BOT_H, "exits per second");
    let top = top_reasons(r);
    if !top.is_empty() {
        let layers = top.len() + 1;
        let by_reason = reason_rates(r, &top);
        // Each layer: its upper edge left to right, then its lower edge back.
        for layer in 0..layers {
            let (mut upper, mut lower) = (Vec::new(), Vec::new());
            let mut prev_t = r.points.first().map_or(0.0, |p| rel(p.t_us));
            for (p, v) in r.points.iter().zip(&by_reason) {
                let Some(v) = v else {
                    prev_t = rel(p.t_us);
                    continue;
                };
                let below: f64 = v[..layer].iter().sum();
                let (y0, y1) = (
                    y_of(below.min(max_rate), max_rate, BOT_Y, BOT_H),
                    y_of((below + v[layer]).min(max_rate), max_rate, BOT_Y, BOT_H),
                );
                let (x0, x1) = (ax.x(prev_t), ax.x(rel(p.t_us)));
                upper.push(format!("{x0:.1},{y1:.1} {x1:.1},{y1:.1}"));
                lower.push(format!("{x1:.1},{y0:.1} {x0:.1},{y0:.1}"));
                prev_t = rel(p.t_us);
            }
            lower.reverse();
            let _ = writeln!(
                s,
                r##"<polygon points="{} {}" fill="{}" fill-opacity="0.85" stroke="none"/>"##,
                upper.join(" "),
                lower.join(" "),
                REASON_COLORS[layer]
            );
        }
        // The legend, between the panels.
        let mut x = LEFT;
        let y = BOT_Y - 26.0;
        let names = top
            .iter()
            .map(|k| reason_name(*k).to_string())
            .chain(["other".to_string()]);
        for (i, name) in names.enumerate() {
            let _ = writeln!(
                s,
                r##"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{y:.1}" font-size="12">{}</text>"##,
                y - 10.0,
                REASON_COLORS[i],
                x + 16.0,
                esc(&name)
            );
            x += 30.0 + 7.5 * name.len() as f64;
        }
    }
    let mut steps = Vec::new();
    let mut prev_t = r.points.first().map_or(0.0, |p| rel(p.t_us));
    for (t, v) in &rs {
        let y = y_of(*v, max_rate, BOT_Y, BOT_H);
        steps.push(format!("{:.1},{y:.1}", ax.x(prev_t)));
        steps.push(format!("{:.1},{y:.1}", ax.x(rel(*t))));
        prev_t = rel(*t);
    }
    let _ = writeln!(
        s,
        r##"<polyline points="{}" fill="none" stroke="{}" stroke-width="{}"/>"##,
        steps.join(" "),
        if top.is_empty() { "#b3461f" } else { "#222" },
        if top.is_empty() { 1.4 } else { 0.8 }
    );
    // Events as vertical lines.
    let events = [
        (e.login_ready_us, "multi-user (login ready)"),
        (e.boot_done_us, "boot done"),
    ];
    // Labels one above the other: the events can be close together.
    for (i, (t, label)) in events.into_iter().enumerate() {
        if let Some(t) = t {
            let x = ax.x(rel(t));
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{TOP_Y}" x2="{x:.1}" y2="{:.1}" stroke="#222" stroke-dasharray="5,4"/><text x="{:.1}" y="{:.1}" font-size="12" text-anchor="end" fill="#222">{label}</text>"##,
                BOT_Y + BOT_H,
                x - 4.0,
                TOP_Y + TOP_H - 8.0 - 16.0 * i as f64
            );
        }
    }
    // Time axis under each panel.
    let step = nice_step(ax.t_max, 10.0);
    for (top, h) in [(TOP_Y, TOP_H), (BOT_Y, BOT_H)] {
        let base = top + h;
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{base}" x2="{:.1}" y2="{base}" stroke="#000"/><line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{base}" stroke="#000"/>"##,
            W - RIGHT
        );
        let mut t = 0.0;
        while t <= ax.t_max + step / 1000.0 {
            let x = ax.x(t);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{base}" x2="{x:.1}" y2="{:.1}" stroke="#000"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="13">{}</text>"##,
                base + 5.0,
                base + 20.0,
                human(t)
            );
            t += step;
        }
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="14">seconds since KVM created the VM</text>"##,
        (LEFT + W - RIGHT) / 2.0,
        H - 8.0
    );
    s.push_str("</svg>\n");
    s
}

/// Renders `svg` to `png` with rsvg-convert.
pub fn png(svg: &Path, png: &Path) -> Result<()> {
    doctor::require(&[Need::Executable("rsvg-convert")])?;
    let sh = Shell::new()?;
    cmd!(sh, "rsvg-convert --background-color=white -o {png} {svg}")
        .quiet()
        .run()
        .map_err(|e| setup(format!("rendering {} to PNG failed: {e}", svg.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_nice() {
        assert_eq!(nice_step(1000.0, 5.0), 200.0);
        assert_eq!(nice_step(37_000.0, 5.0), 10_000.0);
        assert_eq!(nice_step(9.0, 10.0), 1.0);
        assert_eq!(nice_step(0.0, 5.0), 1.0);
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(human(0.0), "0");
        assert_eq!(human(1_234_567.0), "1.23M");
        assert_eq!(human(45_600.0), "45.6k");
        assert_eq!(human(2_000_000.0), "2M");
        assert_eq!(human(0.5), "0.50");
    }
}
