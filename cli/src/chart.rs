//! Report charts (SPEC §11): a stacked bar chart of cost per period by group, as SVG or PNG
//! (drawn with `plotters`), and plain text bars for a terminal.
//!
//! Money is integer micro-USD throughout: sums (per period, per group, "other") are `i64`
//! (saturating); dollars appear only as labels, and `f64` only where plotters maps a value
//! to a pixel.
//!
//! - Groups are drawn in the order given, bottom to top, one colour each from a fixed
//!   palette. With more than [`MAX_GROUPS`] groups, the [`MAX_GROUPS`]` - 1` with the biggest
//!   totals are kept (still in the given order) and the rest are summed into [`OTHER`],
//!   stacked last in grey.
//! - No periods, no groups, or nothing spent: not an error. The SVG/PNG is the title and
//!   "No spend in this period"; the terminal text is the title and `no spend in this period`.
//! - Errors ([`ChartError`]) are for input that cannot be drawn faithfully: a series whose
//!   length is not the number of periods, or a negative cost.
//!
//! Text in the PNG is drawn with DejaVu Sans, embedded in the binary (`cli/assets/`, under
//! the Bitstream Vera license in `cli/assets/DejaVuSans-LICENSE`), so nothing is read from
//! the system. The SVG names `sans-serif` and lays text out with the same font's metrics.

use std::sync::OnceLock;

use plotters::backend::{BitMapBackend, SVGBackend};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use unicode_width::UnicodeWidthStr;

use crate::render::usd;

/// Size of the SVG and PNG charts, in pixels.
pub const WIDTH: u32 = 1200;
/// See [`WIDTH`].
pub const HEIGHT: u32 = 640;
/// Most groups drawn; beyond it, the smallest are folded into [`OTHER`].
pub const MAX_GROUPS: usize = 10;
/// Label of the folded groups.
pub const OTHER: &str = "other";
/// Side of a legend swatch, in pixels (bars are told apart from swatches by it in tests).
pub const SWATCH: u32 = 14;

const FONT: &str = "sans-serif";
const FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const TITLE_SIZE: u32 = 24;
const LABEL_SIZE: u32 = 15;
const LEGEND_MAX_CHARS: usize = 32;

/// Tableau 10: distinguishable, and kind to the colour-blind.
const PALETTE: [RGBColor; MAX_GROUPS] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0xff, 0x9d, 0xa7),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0xba, 0xb0, 0xac),
];
const OTHER_COLOUR: RGBColor = RGBColor(0x79, 0x70, 0x6e);
const GRID: RGBColor = RGBColor(0xe0, 0xe0, 0xe0);
const INK: RGBColor = RGBColor(0x33, 0x33, 0x33);

/// A stacked bar chart: cost per period, one bar per period, one segment per group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StackedBars {
    /// E.g. "Cost per day by team, 2026-11-01 to 2026-11-30 (UTC)".
    pub title: String,
    /// X labels in order, e.g. "2026-11-01", "2026-11-01 13:00", "2026-W45", "2026-11".
    pub periods: Vec<String>,
    /// (group label, e.g. "team=search"; cost in micro-USD per period, as long as `periods`).
    pub series: Vec<(String, Vec<i64>)>,
}

/// Why a chart could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("chart: group {group:?} has {len} values for {periods} periods")]
    SeriesLength {
        group: String,
        len: usize,
        periods: usize,
    },
    #[error(
        "chart: group {group:?} has a negative cost ({micros} micro-USD) in period {period:?}"
    )]
    NegativeCost {
        group: String,
        period: String,
        micros: i64,
    },
    #[error("chart: the embedded font could not be loaded")]
    Font,
    #[error("chart: drawing failed: {0}")]
    Draw(String),
    #[error("chart: PNG encoding failed: {0}")]
    Png(String),
}

/// The chart as an SVG document ([`WIDTH`] × [`HEIGHT`]).
pub fn render_svg(c: &StackedBars) -> Result<String, ChartError> {
    let prepared = prepare(c)?;
    load_font()?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, &prepared)?;
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

/// The chart as PNG bytes ([`WIDTH`] × [`HEIGHT`], 8-bit RGB).
pub fn render_png(c: &StackedBars) -> Result<Vec<u8>, ChartError> {
    let prepared = prepare(c)?;
    load_font()?;
    let mut rgb = vec![0u8; WIDTH as usize * HEIGHT as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, &prepared)?;
        root.present().map_err(draw_error)?;
    }
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder
        .write_header()
        .map_err(|e| ChartError::Png(e.to_string()))?;
    writer
        .write_image_data(&rgb)
        .map_err(|e| ChartError::Png(e.to_string()))?;
    writer
        .finish()
        .map_err(|e| ChartError::Png(e.to_string()))?;
    Ok(out)
}

/// Text bars for a terminal `width` columns wide: the title, then one line per period,
/// `PERIOD  ████▌  $12.34  team=search 62%, team=ads 30%`. The bar is proportional to the
/// period's total (the largest fills the bar space; a zero period has none, any non-zero one
/// at least `▏`); with more than one group, the period's top three groups and their shares
/// follow the amount. Invalid input (see [`ChartError`]) is reported as a line of text.
pub fn render_terminal(c: &StackedBars, width: usize) -> String {
    let p = match prepare(c) {
        Ok(p) => p,
        Err(e) => return format!("{e}\n"),
    };
    let mut out = String::new();
    if !p.title.is_empty() {
        out.push_str(&p.title);
        out.push('\n');
    }
    if p.is_empty() {
        out.push_str("no spend in this period\n");
        return out;
    }
    let amounts: Vec<String> = p.totals.iter().map(|&t| usd(t)).collect();
    let share_cap = (width / 3).max(12);
    let shares: Vec<String> = (0..p.periods.len())
        .map(|i| p.shares(i, share_cap))
        .collect();
    let label_w = p.periods.iter().map(|s| s.width()).max().unwrap_or(0);
    let amount_w = amounts.iter().map(|s| s.width()).max().unwrap_or(0);
    let shares_w = shares.iter().map(|s| s.width()).max().unwrap_or(0);
    let fixed = label_w + 2 + 2 + amount_w + if shares_w > 0 { 2 + shares_w } else { 0 };
    let bar_w = width.saturating_sub(fixed).max(10);
    for (i, period) in p.periods.iter().enumerate() {
        let bar = text_bar(p.totals[i], p.max_total, bar_w);
        let mut line = format!(
            "{period}{}  {bar}{}  {:>amount_w$}",
            pad(period, label_w),
            pad(&bar, bar_w),
            amounts[i]
        );
        if !shares[i].is_empty() {
            line.push_str("  ");
            line.push_str(&shares[i]);
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The input checked, folded to at most [`MAX_GROUPS`] groups, with totals.
struct Prepared {
    title: String,
    periods: Vec<String>,
    /// (label, micro-USD per period, colour), bottom to top.
    groups: Vec<(String, Vec<i64>, RGBColor)>,
    totals: Vec<i64>,
    max_total: i64,
}

impl Prepared {
    fn is_empty(&self) -> bool {
        self.max_total == 0
    }

    /// "team=search 62%, team=ads 30%, other 8%": the top three groups of period `i`, fewer
    /// if they would not fit in `max` columns (empty with one group or nothing spent).
    fn shares(&self, i: usize, max: usize) -> String {
        let total = self.totals[i];
        if self.groups.len() < 2 || total == 0 {
            return String::new();
        }
        let mut parts: Vec<(&str, i64)> = self
            .groups
            .iter()
            .map(|(label, values, _)| (label.as_str(), values[i]))
            .filter(|&(_, v)| v > 0)
            .collect();
        parts.sort_by_key(|&(_, v)| std::cmp::Reverse(v));
        let mut out = String::new();
        for &(label, v) in parts.iter().take(3) {
            let pct = (i128::from(v) * 100 + i128::from(total) / 2) / i128::from(total);
            let part = format!("{label} {pct}%");
            if out.is_empty() {
                out = truncate(&part, max);
            } else if out.width() + 2 + part.width() <= max {
                out = format!("{out}, {part}");
            } else {
                break;
            }
        }
        out
    }
}

fn prepare(c: &StackedBars) -> Result<Prepared, ChartError> {
    let n = c.periods.len();
    for (group, values) in &c.series {
        if values.len() != n {
            return Err(ChartError::SeriesLength {
                group: group.clone(),
                len: values.len(),
                periods: n,
            });
        }
        if let Some((i, &micros)) = values.iter().enumerate().find(|(_, &v)| v < 0) {
            return Err(ChartError::NegativeCost {
                group: group.clone(),
                period: c.periods[i].clone(),
                micros,
            });
        }
    }
    let group_total = |values: &[i64]| values.iter().fold(0i64, |a, &v| a.saturating_add(v));
    let mut groups: Vec<(String, Vec<i64>, RGBColor)> = Vec::new();
    if c.series.len() <= MAX_GROUPS {
        for (k, (label, values)) in c.series.iter().enumerate() {
            groups.push((label.clone(), values.clone(), PALETTE[k % PALETTE.len()]));
        }
    } else {
        // The biggest MAX_GROUPS - 1 by total (ties: the earlier), drawn in the given order.
        let mut order: Vec<usize> = (0..c.series.len()).collect();
        order.sort_by(|&a, &b| {
            group_total(&c.series[b].1)
                .cmp(&group_total(&c.series[a].1))
                .then(a.cmp(&b))
        });
        let mut kept = order[..MAX_GROUPS - 1].to_vec();
        kept.sort_unstable();
        let mut other = vec![0i64; n];
        for &k in &order[MAX_GROUPS - 1..] {
            for (o, &v) in other.iter_mut().zip(&c.series[k].1) {
                *o = o.saturating_add(v);
            }
        }
        for (slot, &k) in kept.iter().enumerate() {
            let (label, values) = &c.series[k];
            groups.push((label.clone(), values.clone(), PALETTE[slot]));
        }
        groups.push((OTHER.to_string(), other, OTHER_COLOUR));
    }
    let totals: Vec<i64> = (0..n)
        .map(|i| {
            groups
                .iter()
                .fold(0i64, |a, (_, values, _)| a.saturating_add(values[i]))
        })
        .collect();
    let max_total = totals.iter().copied().max().unwrap_or(0);
    Ok(Prepared {
        title: c.title.clone(),
        periods: c.periods.clone(),
        groups,
        totals,
        max_total,
    })
}

fn load_font() -> Result<(), ChartError> {
    static LOADED: OnceLock<bool> = OnceLock::new();
    let ok = *LOADED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(ChartError::Font)
    }
}

fn draw_error<E: std::fmt::Display>(e: E) -> ChartError {
    ChartError::Draw(e.to_string())
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, p: &Prepared) -> Result<(), ChartError> {
    root.fill(&WHITE).map_err(draw_error)?;
    let title_style = (FONT, TITLE_SIZE).into_font().color(&INK);
    let label_style = (FONT, LABEL_SIZE).into_font().color(&INK);
    let title = fit_text(root, &p.title, &title_style, WIDTH.saturating_sub(40))?;
    let body = root
        .margin(10, 6, 4, 4)
        .titled(&title, title_style.clone())
        .map_err(draw_error)?;
    if p.is_empty() {
        let (w, h) = body.dim_in_pixel();
        let (w, h) = (i32::try_from(w).unwrap_or(0), i32::try_from(h).unwrap_or(0));
        let style = (FONT, 20)
            .into_font()
            .color(&INK)
            .pos(Pos::new(HPos::Center, VPos::Center));
        body.draw(&Text::new("No spend in this period", (w / 2, h / 2), style))
            .map_err(draw_error)?;
        return Ok(());
    }

    // Legend on the right: labels shortened to LEGEND_MAX_CHARS, width from the longest.
    let legend_labels: Vec<String> = p
        .groups
        .iter()
        .rev()
        .map(|(label, _, _)| truncate(label, LEGEND_MAX_CHARS))
        .collect();
    let mut legend_text_w = 0;
    for label in &legend_labels {
        legend_text_w = legend_text_w.max(text_width(root, label, &label_style)?);
    }
    let legend_w = legend_text_w + SWATCH + 40;
    let (plot_area, legend_area) = body.split_horizontally(WIDTH.saturating_sub(legend_w));

    // Y axis: micro-USD, ticks at a 1-2-5 step, the top tick at or above the largest bar.
    let step = nice_step(p.max_total, 6);
    let ticks = p.max_total.div_euclid(step) + i64::from(p.max_total % step != 0);
    let top = step.saturating_mul(ticks.max(1));
    // (Saturated near i64::MAX micro-USD, where the top is the largest bar, not a tick.)
    let y_keys: Vec<i64> = (0..=ticks.max(1))
        .filter_map(|k| k.checked_mul(step))
        .collect();
    let mut y_label_w = 0;
    for &y in &y_keys {
        y_label_w = y_label_w.max(text_width(root, &tick_label(y, step), &label_style)?);
    }

    // X axis: a label at the middle of every `every`-th bar, so that labels do not collide.
    const MARGIN: u32 = 12;
    let n = p.periods.len();
    let mut x_label_w = 0;
    for period in &p.periods {
        x_label_w = x_label_w.max(text_width(root, period, &label_style)?);
    }
    let y_area = y_label_w + 40;
    let plot_w = WIDTH.saturating_sub(legend_w + y_area + 2 * MARGIN).max(1);
    let slot = f64::from(plot_w) / n as f64;
    let every = label_step((f64::from(x_label_w + 16) / slot).ceil() as usize);
    // X coordinates in 1/SLOT of a period (plotters formats integer axes with key points).
    const SLOT: i64 = 20;
    let x_keys: Vec<i64> = (0..n)
        .step_by(every)
        .map(|i| slot_of(i) * SLOT + SLOT / 2)
        .collect();

    let periods = &p.periods;
    let x_label = |x: &i64| -> String {
        usize::try_from(x.div_euclid(SLOT))
            .ok()
            .and_then(|i| periods.get(i))
            .cloned()
            .unwrap_or_default()
    };
    let y_label = |y: &i64| tick_label(*y, step);

    let mut chart = ChartBuilder::on(&plot_area)
        .margin(MARGIN)
        .x_label_area_size(LABEL_SIZE * 2 + 6)
        .y_label_area_size(y_area)
        .build_cartesian_2d(
            (0i64..slot_of(n) * SLOT).with_key_points(x_keys),
            (0i64..top).with_key_points(y_keys),
        )
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .bold_line_style(GRID)
        .axis_style(INK)
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .label_style(label_style.clone())
        .y_desc("Cost (USD)")
        .axis_desc_style(label_style.clone())
        .draw()
        .map_err(draw_error)?;

    // The bars: segment k of period i spans [sum of groups < k, sum of groups <= k].
    let gap = if n > 60 { 1 } else { 3 };
    for (group_index, (_, values, colour)) in p.groups.iter().enumerate() {
        let bars = values.iter().enumerate().filter_map(|(i, &v)| {
            if v == 0 {
                return None;
            }
            let below = p.groups[..group_index]
                .iter()
                .fold(0i64, |a, (_, vs, _)| a.saturating_add(vs[i]));
            let x = slot_of(i) * SLOT;
            Some(Rectangle::new(
                [(x + gap, below), (x + SLOT - gap, below.saturating_add(v))],
                colour.filled(),
            ))
        });
        chart.draw_series(bars).map_err(draw_error)?;
    }

    // The legend, top to bottom as the stack reads (the last group on top).
    let line_h = i32::try_from(LABEL_SIZE).unwrap_or(15) + 10;
    let sw = i32::try_from(SWATCH).unwrap_or(14);
    let top_y = i32::try_from(MARGIN).unwrap_or(12) + 4;
    for (row, ((_, _, colour), label)) in p.groups.iter().rev().zip(&legend_labels).enumerate() {
        let y = top_y + line_h * i32::try_from(row).unwrap_or(0);
        legend_area
            .draw(&Rectangle::new([(8, y), (8 + sw, y + sw)], colour.filled()))
            .map_err(draw_error)?;
        let style = label_style.clone().pos(Pos::new(HPos::Left, VPos::Center));
        legend_area
            .draw(&Text::new(label.clone(), (8 + sw + 8, y + sw / 2), style))
            .map_err(draw_error)?;
    }
    Ok(())
}

/// The smallest of 1, 2, 3, 4, 6, 12, 24, 48, … at least `need`: steps that divide hours of a
/// day, and make round numbers of days, weeks and months.
fn label_step(need: usize) -> usize {
    let mut step = 1;
    for s in [1, 2, 3, 4, 6, 12] {
        step = s;
        if s >= need {
            return s;
        }
    }
    while step < need {
        step = step.saturating_mul(2);
    }
    step
}

fn slot_of(i: usize) -> i64 {
    i64::try_from(i).unwrap_or(i64::MAX / 64)
}

fn text_width<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    style: &TextStyle,
) -> Result<u32, ChartError> {
    area.estimate_text_size(text, style)
        .map(|(w, _)| w)
        .map_err(draw_error)
}

/// `text`, shortened with "…" until it is at most `max` pixels wide.
fn fit_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    style: &TextStyle,
    max: u32,
) -> Result<String, ChartError> {
    let mut chars = text.chars().count();
    let mut fitted = text.to_string();
    while chars > 1 && text_width(area, &fitted, style)? > max {
        chars -= 1;
        fitted = format!("{}…", text.chars().take(chars - 1).collect::<String>());
    }
    Ok(fitted)
}

/// The smallest 1-2-5 × 10^k micro-USD step that divides `max` into at most `ticks` steps.
fn nice_step(max: i64, ticks: i64) -> i64 {
    let want = (max / ticks.max(1)).max(1);
    let mut scale = 1i64;
    loop {
        for m in [1, 2, 5] {
            let step = scale.saturating_mul(m);
            if step >= want || step == i64::MAX {
                return step;
            }
        }
        if scale > i64::MAX / 10 {
            return i64::MAX;
        }
        scale *= 10;
    }
}

/// An axis label: "$0", "$1.50", "$0.005", "$1,200": as many decimals as the step needs (at
/// least two below a dollar), thousands separated.
fn tick_label(micros: i64, step: i64) -> String {
    let decimals = if step % 1_000_000 == 0 {
        0
    } else {
        let mut d = 2;
        let mut unit = 10_000;
        while unit > 1 && step % unit != 0 {
            unit /= 10;
            d += 1;
        }
        d
    };
    let whole = micros / 1_000_000;
    let frac = micros % 1_000_000;
    let digits = whole.to_string();
    let mut grouped = String::new();
    for (k, ch) in digits.chars().enumerate() {
        if k > 0 && (digits.len() - k) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(ch);
    }
    if decimals == 0 {
        format!("${grouped}")
    } else {
        let frac_text = format!("{frac:06}");
        format!("${grouped}.{}", &frac_text[..decimals])
    }
}

/// A bar of `total / max × width` cells, in eighths; at least `▏` when `total > 0`.
fn text_bar(total: i64, max: i64, width: usize) -> String {
    if total <= 0 || max <= 0 {
        return String::new();
    }
    let eighths = (i128::from(total) * (width as i128) * 8 / i128::from(max)).max(1);
    let full = usize::try_from(eighths / 8).unwrap_or(0);
    let part = usize::try_from(eighths % 8).unwrap_or(0);
    let mut bar = "█".repeat(full);
    if part > 0 {
        bar.push(['▏', '▎', '▍', '▌', '▋', '▊', '▉'][part - 1]);
    }
    bar
}

/// Spaces that bring `text` to `width` columns.
fn pad(text: &str, width: usize) -> String {
    " ".repeat(width.saturating_sub(text.width()))
}

/// `text` cut to at most `max` columns, ending in "…" when cut.
fn truncate(text: &str, max: usize) -> String {
    if text.width() <= max {
        return text.to_string();
    }
    let mut out = String::new();
    for ch in text.chars() {
        if (out.clone() + &ch.to_string()).width() + 1 > max {
            break;
        }
        out.push(ch);
    }
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: i64 = 1_000_000;

    /// (x, y, width, height, fill) of every `<rect>`.
    fn rects(svg: &str) -> Vec<(i64, i64, i64, i64, String)> {
        let attr = |tag: &str, name: &str| -> String {
            let key = format!(" {name}=\"");
            tag.split(&key)
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_default()
                .to_string()
        };
        svg.split("<rect")
            .skip(1)
            .map(|rest| {
                let tag = rest.split("/>").next().unwrap_or_default();
                let num = |name: &str| attr(tag, name).parse::<i64>().unwrap_or(-1);
                (
                    num("x"),
                    num("y"),
                    num("width"),
                    num("height"),
                    attr(tag, "fill"),
                )
            })
            .collect()
    }

    /// The content of every `<text>`.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|rest| {
                let body = rest.split_once('>')?.1;
                Some(body.split("</text>").next()?.trim().to_string())
            })
            .collect()
    }

    fn hex(c: RGBColor) -> String {
        format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
    }

    fn three_groups() -> StackedBars {
        StackedBars {
            title: "Cost per day by team, 2026-11-01 to 2026-11-04 (UTC)".into(),
            periods: vec![
                "2026-11-01".into(),
                "2026-11-02".into(),
                "2026-11-03".into(),
                "2026-11-04".into(),
            ],
            series: vec![
                ("team=search".into(), vec![D, 0, 3 * D, D / 2]),
                ("team=ads".into(), vec![2 * D, 0, 0, D / 2]),
                ("team=infra".into(), vec![D, 0, D, 0]),
            ],
        }
    }

    #[test]
    fn svg_has_title_legend_and_dollar_ticks() -> Result<(), ChartError> {
        let svg = render_svg(&three_groups())?;
        let texts = texts(&svg);
        assert!(texts.contains(&"Cost per day by team, 2026-11-01 to 2026-11-04 (UTC)".into()));
        for label in ["team=search", "team=ads", "team=infra"] {
            assert!(texts.contains(&label.to_string()), "{label} in {texts:?}");
        }
        for tick in ["$0", "$1", "$2", "$3", "$4"] {
            assert!(texts.contains(&tick.to_string()), "{tick} in {texts:?}");
        }
        for period in &three_groups().periods {
            assert!(texts.contains(period), "{period} in {texts:?}");
        }
        assert!(!texts.contains(&OTHER.to_string()));
        // One swatch per group in the legend.
        let swatch = i64::from(SWATCH);
        let swatches = rects(&svg)
            .into_iter()
            .filter(|r| r.2 == swatch && r.3 == swatch)
            .count();
        assert_eq!(swatches, 3);
        Ok(())
    }

    #[test]
    fn svg_bars_are_stacked() -> Result<(), ChartError> {
        let chart = three_groups();
        let svg = render_svg(&chart)?;
        let colours: Vec<String> = PALETTE[..3].iter().map(|&c| hex(c)).collect();
        let bars: Vec<_> = rects(&svg)
            .into_iter()
            .filter(|r| r.2 > i64::from(SWATCH) && colours.contains(&r.4))
            .collect();
        // One rectangle per non-zero (period, group).
        assert_eq!(bars.len(), 7, "{bars:?}");
        let mut xs: Vec<i64> = bars.iter().map(|r| r.0).collect();
        xs.sort_unstable();
        xs.dedup();
        assert_eq!(xs.len(), 3, "periods with spend: {xs:?}");
        // Bottom to top, in the given group order, each segment on the previous one, all from
        // the same baseline.
        let stack = |x: i64| {
            let mut s: Vec<_> = bars.iter().filter(|r| r.0 == x).cloned().collect();
            s.sort_by_key(|r| std::cmp::Reverse(r.1));
            s
        };
        let first = stack(xs[0]);
        let baseline = first[0].1 + first[0].3;
        for &x in &xs {
            let s = stack(x);
            assert_eq!(s[0].1 + s[0].3, baseline, "bar at {x} starts on the axis");
            for pair in s.windows(2) {
                assert_eq!(pair[1].1 + pair[1].3, pair[0].1, "segments touch: {s:?}");
            }
        }
        let fills: Vec<&str> = first.iter().map(|r| r.4.as_str()).collect();
        assert_eq!(
            fills,
            colours.iter().map(String::as_str).collect::<Vec<_>>()
        );
        // The top of a stack is at its total: $4 (the top tick) for 2026-11-01, $1 for
        // 2026-11-04, a quarter of the height.
        let top = |x: i64| stack(x).last().map(|r| r.1).unwrap_or(-1);
        let full = baseline - top(xs[0]);
        let quarter = baseline - top(xs[2]);
        assert!(full > 300, "{full}");
        assert!((quarter * 4 - full).abs() <= 4, "{quarter} × 4 vs {full}");
        assert_eq!(top(xs[0]), top(xs[1]), "both $4");
        // The segments' heights are their costs: search $1, ads $2, infra $1 of $4.
        let heights: Vec<i64> = first.iter().map(|r| r.3).collect();
        assert!((heights[1] - 2 * heights[0]).abs() <= 2, "{heights:?}");
        assert!((heights[0] - heights[2]).abs() <= 1, "{heights:?}");
        Ok(())
    }

    #[test]
    fn many_groups_fold_into_other() -> Result<(), ChartError> {
        // Twelve groups, g0 the smallest: g0, g1, g2 are folded.
        let series: Vec<(String, Vec<i64>)> = (0..12)
            .map(|g| (format!("user=u{g:02}"), vec![(g + 1) * D, D]))
            .collect();
        let chart = StackedBars {
            title: "t".into(),
            periods: vec!["2026-11".into(), "2026-12".into()],
            series,
        };
        let svg = render_svg(&chart)?;
        let texts = texts(&svg);
        assert!(texts.contains(&OTHER.to_string()));
        for g in 0..12 {
            let label = format!("user=u{g:02}");
            assert_eq!(texts.contains(&label), g >= 3, "{label}");
        }
        let swatch = i64::from(SWATCH);
        let legend: Vec<_> = rects(&svg)
            .into_iter()
            .filter(|r| r.2 == swatch && r.3 == swatch)
            .collect();
        assert_eq!(legend.len(), MAX_GROUPS);
        // "other" holds g0 + g1 + g2: $6 and $3.
        let p = prepare(&chart)?;
        assert_eq!(p.groups.len(), MAX_GROUPS);
        assert_eq!(p.groups[MAX_GROUPS - 1].0, OTHER);
        assert_eq!(p.groups[MAX_GROUPS - 1].1, vec![6 * D, 3 * D]);
        assert_eq!(
            p.groups[0].0, "user=u03",
            "kept groups stay in the given order"
        );
        assert_eq!(p.totals[0], (1..=12).sum::<i64>() * D);
        let others = rects(&svg)
            .into_iter()
            .filter(|r| r.4 == hex(OTHER_COLOUR) && r.2 > swatch)
            .count();
        assert_eq!(others, 2);
        Ok(())
    }

    #[test]
    fn many_periods_thin_the_labels() -> Result<(), ChartError> {
        let periods: Vec<String> = (1..=31).map(|d| format!("2026-12-{d:02}")).collect();
        let chart = StackedBars {
            title: "t".into(),
            series: vec![("team=a".into(), (1..=31).map(|d| d * D).collect())],
            periods: periods.clone(),
        };
        let texts = texts(&render_svg(&chart)?);
        let shown = periods.iter().filter(|p| texts.contains(p)).count();
        assert!(texts.contains(&periods[0]));
        assert!((4..31).contains(&shown), "{shown} of 31 labels");
        Ok(())
    }

    #[test]
    fn tick_labels_are_dollars() {
        assert_eq!(tick_label(12_500_000, 500_000), "$12.50");
        assert_eq!(tick_label(0, 500_000), "$0.00");
        assert_eq!(tick_label(1_200_000_000, 200_000_000), "$1,200");
        assert_eq!(tick_label(5_000, 1_000), "$0.005");
        assert_eq!(tick_label(20_000_000, 5_000_000), "$20");
        assert_eq!(nice_step(4 * D, 6), D);
        assert_eq!(nice_step(202 * D, 6), 50 * D);
        assert_eq!(nice_step(3, 6), 1);
        assert_eq!(nice_step(i64::MAX, 6), 2_000_000_000_000_000_000);
    }

    #[test]
    fn png_is_a_png_of_the_chart_size() -> Result<(), ChartError> {
        let bytes = render_png(&three_groups())?;
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&bytes[12..16], b"IHDR");
        assert_eq!(bytes[16..20], WIDTH.to_be_bytes());
        assert_eq!(bytes[20..24], HEIGHT.to_be_bytes());
        let decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
        let mut reader = decoder
            .read_info()
            .map_err(|e| ChartError::Png(e.to_string()))?;
        let mut pixels = vec![0; reader.output_buffer_size()];
        let info = reader
            .next_frame(&mut pixels)
            .map_err(|e| ChartError::Png(e.to_string()))?;
        assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
        // The bars are there: pixels of the first group's colour.
        let blue = PALETTE[0];
        let hits = pixels
            .chunks(3)
            .filter(|p| p[0] == blue.0 && p[1] == blue.1 && p[2] == blue.2)
            .count();
        assert!(hits > 1000, "{hits}");
        Ok(())
    }

    #[test]
    fn empty_charts_say_so() -> Result<(), ChartError> {
        let none = StackedBars {
            title: "Cost per day".into(),
            ..StackedBars::default()
        };
        let zeros = StackedBars {
            title: "Cost per day".into(),
            periods: vec!["2026-11-01".into()],
            series: vec![("team=a".into(), vec![0])],
        };
        for chart in [&none, &zeros] {
            let svg = render_svg(chart)?;
            assert!(texts(&svg).contains(&"No spend in this period".to_string()));
            assert!(texts(&svg).contains(&"Cost per day".to_string()));
            assert!(render_png(chart)?.starts_with(b"\x89PNG"));
            let text = render_terminal(chart, 80);
            assert_eq!(text, "Cost per day\nno spend in this period\n");
        }
        Ok(())
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut short = three_groups();
        short.series[1].1.pop();
        let e = render_svg(&short).err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("chart: group \"team=ads\" has 3 values for 4 periods")
        );
        assert!(render_png(&short).is_err());
        let mut negative = three_groups();
        negative.series[2].1[2] = -5;
        assert!(matches!(
            render_svg(&negative),
            Err(ChartError::NegativeCost { ref period, .. }) if period == "2026-11-03"
        ));
        assert!(render_terminal(&negative, 80).starts_with("chart: group \"team=infra\""));
    }

    #[test]
    fn terminal_bars_follow_the_totals() {
        let text = render_terminal(&three_groups(), 100);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert_eq!(lines[0], three_groups().title);
        let bar_len = |line: &str| {
            line.chars()
                .filter(|c| ('\u{2588}'..='\u{258f}').contains(c))
                .count()
        };
        let eighths = |line: &str| {
            line.chars()
                .map(|c| match c {
                    '█' => 8,
                    '▉'..='▏' => 0x2590 - c as usize,
                    _ => 0,
                })
                .sum::<usize>()
        };
        // 2026-11-01 and 2026-11-03 ($4) are the longest, 2026-11-04 ($1) a quarter, 11-02 none.
        assert_eq!(eighths(lines[1]), eighths(lines[3]));
        assert_eq!(bar_len(lines[2]), 0, "{}", lines[2]);
        assert!(lines[2].starts_with("2026-11-02") && lines[2].ends_with("$0.00"));
        assert_eq!(eighths(lines[1]), eighths(lines[4]) * 4);
        assert!(lines[1].contains("$4.00"));
        assert!(lines[4].contains("$1.00"));
        // As many of the top three shares as fit in a third of the width.
        assert!(
            lines[1].ends_with("  team=ads 50%, team=search 25%"),
            "{}",
            lines[1]
        );
        let wide = render_terminal(&three_groups(), 150);
        assert!(wide.contains("  team=ads 50%, team=search 25%, team=infra 25%\n"));
        assert!(lines[4].contains("team=search 50%, team=ads 50%"));
        for line in &lines {
            assert!(line.width() <= 100, "{line}");
        }
        // Every bar starts in the same column.
        let col = |line: &str| line.find(['█', '▏', '▎', '▍', '▌', '▋', '▊', '▉']);
        assert_eq!(col(lines[1]), col(lines[4]));
    }

    #[test]
    fn odd_input_still_draws() -> Result<(), ChartError> {
        // No title, glyphs the font lacks, one period, a tiny amount, a huge one.
        for chart in [
            StackedBars {
                title: String::new(),
                periods: vec!["週1".into()],
                series: vec![("team=研究 & <dev>".into(), vec![1])],
            },
            StackedBars {
                title: "x".repeat(500),
                periods: vec!["a".into(), "b".into()],
                series: vec![("a".into(), vec![i64::MAX, 0]), ("b".into(), vec![1, 1])],
            },
        ] {
            let svg = render_svg(&chart)?;
            assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
            assert!(render_png(&chart)?.starts_with(b"\x89PNG"));
            assert!(!render_terminal(&chart, 40).is_empty());
        }
        let escaped = render_svg(&StackedBars {
            title: "t".into(),
            periods: vec!["p".into()],
            series: vec![("team=R&D <x>".into(), vec![D])],
        })?;
        assert!(escaped.contains("team=R&amp;D &lt;x&gt;"));
        // A long hourly range: every bar drawn, few labels.
        let n = 24 * 90;
        let chart = StackedBars {
            title: "hours".into(),
            periods: (0..n)
                .map(|i| format!("2026-09-{:02} {:02}:00", i / 24, i % 24))
                .collect(),
            series: vec![("a".into(), vec![D; n]), ("b".into(), vec![2 * D; n])],
        };
        let svg = render_svg(&chart)?;
        let labels = texts(&svg).iter().filter(|t| t.ends_with(":00")).count();
        assert!((2..=24).contains(&labels), "{labels}");
        assert!(render_png(&chart)?.starts_with(b"\x89PNG"));
        Ok(())
    }

    #[test]
    fn terminal_labels_are_padded_by_display_width() {
        let chart = StackedBars {
            title: String::new(),
            periods: vec!["週1".into(), "week 2".into()],
            series: vec![("a".into(), vec![D, 2 * D])],
        };
        let text = render_terminal(&chart, 60);
        let lines: Vec<&str> = text.lines().collect();
        let col = |line: &str| {
            let at = line.find('█').unwrap_or(0);
            line[..at].width()
        };
        assert_eq!(col(lines[0]), col(lines[1]), "{text}");
        assert!(lines[1].width() <= 60);
    }
}
