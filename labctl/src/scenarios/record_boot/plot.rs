//! The report's picture: a record-boot series drawn with `plotters`, as SVG and as PNG.
//!
//! Two panels over one time axis: cumulative exits on top, the exit rate of each sampling
//! interval below, stacked by exit reason (the boot's top reasons, the rest as "other";
//! legend between the panels); the boot's phases shaded across both and labelled in place
//! with their exit counts. Text is DejaVu Sans (`fonts-dejavu-core`), read at run time and
//! drawn by `ab_glyph` into the PNG; the SVG names the family and lets the viewer draw it.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use exitlab_proto::msg::STAT_EXITS;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle, FontTransform};

use super::series::{rates, reason_name, reasons_between, Events, Phase, Point, Recorded};
use crate::doctor::{self, Need};
use crate::error::setup;

const W: u32 = 1100;
const H: u32 = 720;
const LEFT: i32 = 90;
const RIGHT: i32 = 30;
const TOP_Y: i32 = 90;
const TOP_H: i32 = 300;
const BOT_Y: i32 = 450;
const BOT_H: i32 = 200;
/// Left of a panel: its y labels and description; below it: its x labels, and under the
/// bottom panel the x axis' description.
const Y_LABELS: i32 = 80;
const X_LABELS: i32 = 25;
const X_DESC: i32 = 30;
const PHASE_COLORS: [RGBColor; 5] = [
    RGBColor(0xdf, 0xe8, 0xf5),
    RGBColor(0xfb, 0xe9, 0xc6),
    RGBColor(0xdc, 0xef, 0xd8),
    RGBColor(0xec, 0xe2, 0xf4),
    RGBColor(0xf3, 0xda, 0xda),
];
/// The reasons stacked, in order, then "other".
const REASON_COLORS: [RGBColor; 7] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0x9a, 0x9a, 0x9a),
];
const LINE_BLUE: RGBColor = RGBColor(0x1f, 0x4e, 0x9a);
const INK: RGBColor = RGBColor(0x22, 0x22, 0x22);
const FONT: &str = "sans-serif";
/// Where Debian's `fonts-dejavu-core` puts DejaVu Sans; `LABCTL_FONT_DIR` overrides it (the
/// flake's dev shell points it at nixpkgs' `dejavu_fonts`).
const DEJAVU: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
pub const FONT_DIR_ENV: &str = "LABCTL_FONT_DIR";
const FONT_FILES: [(FontStyle, &str); 2] = [
    (FontStyle::Normal, "DejaVuSans.ttf"),
    (FontStyle::Bold, "DejaVuSans-Bold.ttf"),
];

/// Registers the fonts once per process (plotters keeps them for its lifetime).
pub fn fonts() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let dir = match std::env::var_os(FONT_DIR_ENV) {
            Some(d) => std::path::PathBuf::from(d),
            None => {
                doctor::require(&[Need::File(DEJAVU)]).map_err(|e| format!("{e:#}"))?;
                Path::new(DEJAVU).parent().expect("a file path").to_path_buf()
            }
        };
        for (style, name) in FONT_FILES {
            let path = dir.join(name);
            let bytes = std::fs::read(&path).map_err(|e| {
                format!(
                    "{}: {e} (install fonts-dejavu-core, or set {FONT_DIR_ENV} to a directory holding {})",
                    path.display(),
                    FONT_FILES.map(|(_, n)| n).join(" and ")
                )
            })?;
            register_font(FONT, style, Box::leak(bytes.into_boxed_slice()))
                .map_err(|_| format!("{} is not a font plotters can read", path.display()))?;
        }
        Ok(())
    })
    .clone()
    .map_err(|e| setup(format!("the plot's font: {e}")))
}

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

/// What the plot shows, computed once for both formats.
struct Figure<'a> {
    title: &'a str,
    r: &'a Recorded,
    e: &'a Events,
    phases: &'a [Phase],
}

type PlotResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

impl Figure<'_> {
    /// Seconds since KVM created the VM, of a time on the recording's clock.
    fn rel(&self, t_us: u64) -> f64 {
        let t0 = self.e.vm_created_us.unwrap_or(0) as f64 / 1e6;
        (t_us as f64 / 1e6 - t0).max(0.0)
    }

    fn t_max(&self) -> f64 {
        self.e
            .vm_exited_us
            .or(self.r.points.last().map(|p| p.t_us))
            .map_or(1.0, |t| self.rel(t))
            .max(0.001)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> PlotResult<()>
    where
        DB::ErrorType: 'static,
    {
        let t0 = self.e.vm_created_us.unwrap_or(0) as f64 / 1e6;
        let t_max = self.t_max();
        let r = self.r;
        root.fill(&WHITE)?;
        let font = |size: u32| (FONT, size).into_font();
        let bold = |size: u32| (FONT, size, FontStyle::Bold).into_font();
        root.draw(&Text::new(self.title.to_string(), (LEFT, 16), bold(20)))?;
        let total = r.points.last().map_or(0, |p| p.get(STAT_EXITS));
        root.draw(&Text::new(
            format!(
                "{} exits in {t_max:.2} s from VM creation to exit; shaded: boot phases (exits in each); time on L1's clock",
                human(total as f64)
            ),
            (LEFT, 44),
            font(14).color(&RGBColor(0x44, 0x44, 0x44)),
        ))?;

        // The panels: each a chart over [0, t_max] with its own y range.
        // Each panel's area holds its plot, its y labels to the left and its x labels below.
        let panel = |top: i32, h: i32, below: i32| {
            root.clone().shrink(
                (LEFT - Y_LABELS, top - 5),
                ((W as i32 - RIGHT) - (LEFT - Y_LABELS), h + 5 + below),
            )
        };
        let top_max = nice_ceiling(total.max(1) as f64, 5.0);
        let rs: Vec<(f64, f64)> = r
            .points
            .iter()
            .zip(rates(r))
            .filter_map(|(p, v)| v.map(|v| (self.rel(p.t_us), v)))
            .collect();
        let bot_max = nice_ceiling(rs.iter().map(|(_, v)| *v).fold(1.0, f64::max), 5.0);
        let top_area = panel(TOP_Y, TOP_H, X_LABELS);
        let bot_area = panel(BOT_Y, BOT_H, X_LABELS + X_DESC);
        let mut top = chart(
            &top_area,
            t_max,
            top_max,
            "exits since the VM was created",
            None,
        )?;
        let mut bot = chart(
            &bot_area,
            t_max,
            bot_max,
            "exits per second",
            Some("seconds since KVM created the VM"),
        )?;

        // Phases, across both panels, labelled on top.
        for (i, p) in self.phases.iter().enumerate() {
            let (x0, x1) = (p.start_s - t0, p.end_s - t0);
            let color = PHASE_COLORS[i % PHASE_COLORS.len()].filled();
            top.draw_series([Rectangle::new([(x0, 0.0), (x1, top_max)], color)])?;
            bot.draw_series([Rectangle::new([(x0, 0.0), (x1, bot_max)], color)])?;
            let label = format!("{} · {}", p.name, human(p.exits as f64));
            let (px0, _) = top.backend_coord(&(x0, 0.0));
            let (px1, _) = top.backend_coord(&(x1, 0.0));
            // At the top of the panel, centred on the phase.
            let (x, y) = top.backend_coord(&((x0 + x1) / 2.0, top_max));
            let ink = RGBColor(0x33, 0x33, 0x33);
            let (style, dx) = if f64::from(px1 - px0) > 9.0 * label.chars().count() as f64 {
                let centred = Pos::new(HPos::Center, VPos::Top);
                (bold(14).color(&ink).pos(centred), 0)
            } else {
                // Narrow phases get their label turned, reading downwards.
                (bold(12).color(&ink).transform(FontTransform::Rotate90), 6)
            };
            root.draw(&Text::new(label, (x + dx, y + 8), style))?;
        }

        // Top: cumulative exits.
        top.draw_series(LineSeries::new(
            r.points
                .iter()
                .map(|p| (self.rel(p.t_us), p.get(STAT_EXITS) as f64)),
            LINE_BLUE.stroke_width(2),
        ))?;

        // Bottom: the rate per sampling interval as steps, stacked by reason; the total on top.
        let reasons = top_reasons(r);
        if !reasons.is_empty() {
            let by_reason = reason_rates(r, &reasons);
            for layer in 0..=reasons.len() {
                let (mut upper, mut lower) = (Vec::new(), Vec::new());
                let mut prev_t = r.points.first().map_or(0.0, |p| self.rel(p.t_us));
                for (p, v) in r.points.iter().zip(&by_reason) {
                    let t = self.rel(p.t_us);
                    if let Some(v) = v {
                        let below: f64 = v[..layer].iter().sum();
                        let (y0, y1) = (below.min(bot_max), (below + v[layer]).min(bot_max));
                        upper.extend([(prev_t, y1), (t, y1)]);
                        lower.extend([(t, y0), (prev_t, y0)]);
                    }
                    prev_t = t;
                }
                lower.reverse();
                upper.extend(lower);
                bot.draw_series([Polygon::new(upper, REASON_COLORS[layer].mix(0.85).filled())])?;
            }
            // The legend, between the panels.
            let mut x = LEFT;
            let y = BOT_Y - 36;
            let names = reasons
                .iter()
                .map(|k| reason_name(*k).to_string())
                .chain(["other".to_string()]);
            for (i, name) in names.enumerate() {
                root.draw(&Rectangle::new(
                    [(x, y), (x + 12, y + 12)],
                    REASON_COLORS[i].filled(),
                ))?;
                root.draw(&Text::new(name.clone(), (x + 16, y), font(12)))?;
                x += 30 + (7.5 * name.len() as f64) as i32;
            }
        }
        let mut steps = Vec::new();
        let mut prev_t = r.points.first().map_or(0.0, |p| self.rel(p.t_us));
        for (t, v) in &rs {
            steps.extend([(prev_t, v.min(bot_max)), (*t, v.min(bot_max))]);
            prev_t = *t;
        }
        let (color, width) = if reasons.is_empty() {
            (RGBColor(0xb3, 0x46, 0x1f), 2)
        } else {
            (INK, 1)
        };
        bot.draw_series(LineSeries::new(steps, color.stroke_width(width)))?;

        // Events: dashed lines through both panels, labelled on top (one label above the
        // other: the events can be close together).
        let events = [
            (self.e.login_ready_us, "multi-user (login ready)"),
            (self.e.boot_done_us, "boot done"),
        ];
        for (i, (t, label)) in events.into_iter().enumerate() {
            let Some(t) = t else { continue };
            let x = self.rel(t);
            for (c, max) in [(&mut top, top_max), (&mut bot, bot_max)] {
                c.draw_series(DashedLineSeries::new(
                    [(x, 0.0), (x, max)],
                    5,
                    4,
                    INK.stroke_width(1),
                ))?;
            }
            let style = font(12)
                .color(&INK)
                .pos(Pos::new(HPos::Right, VPos::Bottom));
            let (px, py) = top.backend_coord(&(x, 0.0));
            root.draw(&Text::new(label, (px - 4, py - 8 - 16 * i as i32), style))?;
        }
        root.present()?;
        Ok(())
    }
}

/// One panel: an x axis in seconds (labelled only under the bottom panel), a y axis from 0
/// to `y_max` with light horizontal grid lines.
fn chart<'a, DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    t_max: f64,
    y_max: f64,
    y_desc: &str,
    x_desc: Option<&str>,
) -> PlotResult<
    ChartContext<
        'a,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
>
where
    DB::ErrorType: 'static,
{
    let below = X_LABELS + if x_desc.is_some() { X_DESC } else { 0 };
    let mut c = ChartBuilder::on(area)
        .x_label_area_size(below)
        .y_label_area_size(Y_LABELS)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)?;
    let mut mesh = c.configure_mesh();
    mesh.disable_x_mesh()
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(TRANSPARENT)
        .y_labels(6)
        .x_labels(11)
        .y_label_formatter(&|v| human(*v))
        .x_label_formatter(&|v| human(*v))
        .y_desc(y_desc)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14));
    if let Some(d) = x_desc {
        mesh.x_desc(d);
    }
    mesh.draw()?;
    Ok(c)
}

/// `max` rounded up to a whole number of [`nice_step`]s (at least one).
fn nice_ceiling(max: f64, n: f64) -> f64 {
    let step = nice_step(max, n);
    (max / step).ceil().max(1.0) * step
}

/// Draws the plot of one recording into `svg` and `png`.
pub fn write(
    title: &str,
    r: &Recorded,
    e: &Events,
    phases: &[Phase],
    svg: &Path,
    png: &Path,
) -> Result<()> {
    fonts()?;
    let fig = Figure {
        title,
        r,
        e,
        phases,
    };
    let failed =
        |what: &Path, e: Box<dyn std::error::Error>| anyhow!("drawing {}: {e}", what.display());
    fig.draw(&SVGBackend::new(svg, (W, H)).into_drawing_area())
        .map_err(|e| failed(svg, e))?;
    fig.draw(&BitMapBackend::new(png, (W, H)).into_drawing_area())
        .map_err(|e| failed(png, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic boot drawn to both formats: the files are there, the SVG holds the
    /// title, the phases' labels and the axis' description as text, the PNG is a PNG.
    #[test]
    fn a_boot_is_drawn_as_svg_and_png() {
        let r = Recorded::from_msgs(&super::super::testdata::boot());
        let e = super::super::series::events(&r);
        let phases = super::super::series::phases(&r, &e);
        let dir = std::env::temp_dir().join(format!("plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (svg, png) = (dir.join("exits.svg"), dir.join("exits.png"));
        write("VM exits <test>", &r, &e, &phases, &svg, &png).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg"), "{text}");
        assert!(text.contains("VM exits &lt;test&gt;"), "the title, escaped");
        assert!(text.contains("seconds since KVM created the VM"));
        for p in &phases {
            assert!(text.contains(p.name), "phase {} labelled", p.name);
        }
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
