//! The report's plot: mean evaluation reward (± standard error) of IRO per iteration, with each baseline as a
//! dashed horizontal line at its mean. Drawn on a plain RGB canvas with a built-in 3×5 pixel font, so the report
//! needs no fonts or plotting libraries on the machine.

use super::SummaryRow;
use super::png::encode_rgb;

const W: i32 = 760;
const H: i32 = 440;
const LEFT: i32 = 80;
const RIGHT: i32 = 560;
const TOP: i32 = 50;
const BOTTOM: i32 = 380;

const WHITE: [u8; 3] = [255, 255, 255];
const BLACK: [u8; 3] = [20, 20, 20];
const GREY: [u8; 3] = [200, 200, 200];
const IRO: [u8; 3] = [200, 30, 30];
const BASELINES: [[u8; 3]; 4] = [[40, 90, 200], [30, 150, 60], [150, 60, 180], [220, 140, 20]];

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self { px: WHITE.repeat((W * H) as usize) }
    }

    fn set(&mut self, x: i32, y: i32, c: [u8; 3]) {
        if (0..W).contains(&x) && (0..H).contains(&y) {
            let i = ((y * W + x) * 3) as usize;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x0: i32, y0: i32, w: i32, h: i32, c: [u8; 3]) {
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                self.set(x, y, c);
            }
        }
    }

    /// A 2-pixel line; `dash` > 0 leaves gaps of that many steps.
    fn line(&mut self, (x0, y0): (i32, i32), (x1, y1): (i32, i32), c: [u8; 3], dash: i32) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for s in 0..=steps {
            if dash > 0 && (s / dash) % 2 == 1 {
                continue;
            }
            let x = x0 + (x1 - x0) * s / steps;
            let y = y0 + (y1 - y0) * s / steps;
            self.rect(x, y, 2, 2, c);
        }
    }

    /// Text in the 3×5 font at `scale` pixels per font pixel; lower-case is drawn as upper-case.
    fn text(&mut self, x: i32, y: i32, s: &str, scale: i32, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let bits = glyph(ch.to_ascii_uppercase());
            for (j, b) in bits.bytes().enumerate() {
                if b == b'1' {
                    let (gx, gy) = ((j % 3) as i32, (j / 3) as i32);
                    self.rect(x + i as i32 * 4 * scale + gx * scale, y + gy * scale, scale, scale, c);
                }
            }
        }
    }
}

/// Both axes, with five labelled horizontal grid lines from `lo` to `hi` (`y_of` maps a value to its row).
fn y_axis(c: &mut Canvas, lo: f64, hi: f64, y_of: impl Fn(f64) -> i32) {
    for k in 0..=4 {
        let v = lo + (hi - lo) * f64::from(k) / 4.0;
        let y = y_of(v);
        c.line((LEFT, y), (RIGHT, y), GREY, 0);
        let label = format!("{v:.3}");
        c.text(LEFT - 8 - text_width(&label, 2), y - 5, &label, 2, BLACK);
    }
    c.line((LEFT, TOP), (LEFT, BOTTOM), BLACK, 0);
    c.line((LEFT, BOTTOM), (RIGHT, BOTTOM), BLACK, 0);
}

fn text_width(s: &str, scale: i32) -> i32 {
    s.chars().count() as i32 * 4 * scale
}

/// The plot as a PNG file.
pub fn reward_plot(rows: &[SummaryRow]) -> Vec<u8> {
    let mut c = Canvas::new();
    let iro: Vec<&SummaryRow> = rows.iter().filter(|r| r.method == "iro" && r.reward.mean.is_finite()).collect();
    let baselines: Vec<&SummaryRow> = rows.iter().filter(|r| r.method != "iro" && r.reward.mean.is_finite()).collect();
    c.text(LEFT, 16, "mean eval reward +- s.e. per iro iteration", 2, BLACK);

    let spans = rows.iter().filter(|r| r.reward.mean.is_finite()).flat_map(|r| {
        let se = if r.reward.se.is_finite() { r.reward.se } else { 0.0 };
        [r.reward.mean - se, r.reward.mean + se]
    });
    let (lo, hi) = spans.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo, hi)
    } else if lo.is_finite() {
        (lo - 1.0, lo + 1.0)
    } else {
        (0.0, 1.0)
    };
    let pad = (hi - lo) * 0.08;
    let (lo, hi) = (lo - pad, hi + pad);
    let y_of = |v: f64| BOTTOM - ((v - lo) / (hi - lo) * f64::from(BOTTOM - TOP)).round() as i32;
    let iterations = iro.iter().map(|r| r.iteration).max().unwrap_or(1).max(1) as i32;
    let x_of = |t: i32| LEFT + 30 + (t - 1) * (RIGHT - LEFT - 60) / (iterations - 1).max(1);

    // Axes, y grid with labels, x ticks at the iterations.
    y_axis(&mut c, lo, hi, y_of);
    for t in 1..=iterations {
        let x = x_of(t);
        c.line((x, BOTTOM), (x, BOTTOM + 6), BLACK, 0);
        let label = t.to_string();
        c.text(x - text_width(&label, 2) / 2, BOTTOM + 12, &label, 2, BLACK);
    }
    c.text((LEFT + RIGHT) / 2 - text_width("iteration", 2) / 2, BOTTOM + 32, "iteration", 2, BLACK);

    let mut legend_y = TOP;
    for (i, b) in baselines.iter().enumerate() {
        let color = BASELINES[i % BASELINES.len()];
        let y = y_of(b.reward.mean);
        c.line((LEFT + 2, y), (RIGHT, y), color, 6);
        c.rect(RIGHT + 20, legend_y, 14, 10, color);
        c.text(RIGHT + 40, legend_y, &b.label(), 2, BLACK);
        legend_y += 22;
    }
    let points: Vec<(i32, i32)> = iro.iter().map(|r| (x_of(r.iteration as i32), y_of(r.reward.mean))).collect();
    for pair in points.windows(2) {
        c.line(pair[0], pair[1], IRO, 0);
    }
    for (r, &(x, y)) in iro.iter().zip(&points) {
        let se = if r.reward.se.is_finite() { r.reward.se } else { 0.0 };
        let (top, bottom) = (y_of(r.reward.mean + se), y_of(r.reward.mean - se));
        c.line((x, top), (x, bottom), IRO, 0);
        c.line((x - 5, top), (x + 5, top), IRO, 0);
        c.line((x - 5, bottom), (x + 5, bottom), IRO, 0);
        c.rect(x - 4, y - 4, 9, 9, IRO);
    }
    if !iro.is_empty() {
        c.rect(RIGHT + 20, legend_y, 14, 10, IRO);
        c.text(RIGHT + 40, legend_y, "iro", 2, BLACK);
    }
    encode_rgb(W as u32, H as u32, &c.px)
}

/// A series of the sample-efficiency plot: points (x = tokens per prompt, mean, s.e.), joined when `line`.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64, f64)>,
    pub line: bool,
}

/// Reward against tokens sampled per prompt (x on a log2 scale), one colour per series: the paper's
/// sample-efficiency claim as one picture.
pub fn efficiency_plot(title: &str, series: &[Series]) -> Vec<u8> {
    let mut c = Canvas::new();
    c.text(LEFT, 16, title, 2, BLACK);
    let all: Vec<(f64, f64, f64)> =
        series.iter().flat_map(|s| s.points.iter().copied()).filter(|p| p.1.is_finite()).collect();
    let fold = |f: fn(&(f64, f64, f64)) -> f64, min: bool| {
        all.iter()
            .map(f)
            .fold(if min { f64::INFINITY } else { f64::NEG_INFINITY }, |a, v| if min { a.min(v) } else { a.max(v) })
    };
    let (x_lo, x_hi) = (fold(|p| p.0.max(1.0).log2(), true), fold(|p| p.0.max(1.0).log2(), false));
    let (mut lo, mut hi) = (fold(|p| p.1 - p.2, true), fold(|p| p.1 + p.2, false));
    if !(lo.is_finite() && hi > lo) {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = (hi - lo) * 0.08;
    let (lo, hi) = (lo - pad, hi + pad);
    let (x_lo, x_hi) = if x_hi > x_lo { (x_lo - 0.2, x_hi + 0.2) } else { (x_lo - 1.0, x_lo + 1.0) };
    let y_of = |v: f64| BOTTOM - ((v - lo) / (hi - lo) * f64::from(BOTTOM - TOP)).round() as i32;
    let x_of = |v: f64| LEFT + ((v.max(1.0).log2() - x_lo) / (x_hi - x_lo) * f64::from(RIGHT - LEFT)).round() as i32;
    y_axis(&mut c, lo, hi, y_of);
    let mut tick = 2f64.powi(x_lo.ceil() as i32);
    while tick.log2() <= x_hi {
        let x = x_of(tick);
        c.line((x, BOTTOM), (x, BOTTOM + 6), BLACK, 0);
        let label = format!("{tick:.0}");
        c.text(x - text_width(&label, 2) / 2, BOTTOM + 12, &label, 2, BLACK);
        tick *= 2.0;
    }
    let x_label = "tokens sampled per prompt";
    c.text((LEFT + RIGHT) / 2 - text_width(x_label, 2) / 2, BOTTOM + 32, x_label, 2, BLACK);
    let palette = [IRO, BASELINES[0], BASELINES[1], BASELINES[2], BASELINES[3], BLACK];
    for (i, s) in series.iter().enumerate() {
        let color = palette[i % palette.len()];
        let pts: Vec<(i32, i32, f64, f64)> =
            s.points.iter().filter(|p| p.1.is_finite()).map(|p| (x_of(p.0), y_of(p.1), p.1, p.2)).collect();
        if s.line {
            for pair in pts.windows(2) {
                c.line((pair[0].0, pair[0].1), (pair[1].0, pair[1].1), color, 0);
            }
        }
        for &(x, y, mean, se) in &pts {
            let se = if se.is_finite() { se } else { 0.0 };
            c.line((x, y_of(mean + se)), (x, y_of(mean - se)), color, 0);
            c.rect(x - 4, y - 4, 9, 9, color);
        }
        let legend_y = TOP + 22 * i as i32;
        c.rect(RIGHT + 20, legend_y, 14, 10, color);
        c.text(RIGHT + 40, legend_y, &s.label, 2, BLACK);
    }
    encode_rgb(W as u32, H as u32, &c.px)
}

/// 3×5 glyphs, row-major from the top-left; unknown characters draw as a blank.
fn glyph(c: char) -> &'static str {
    match c {
        '0' => "111101101101111",
        '1' => "010110010010111",
        '2' => "111001111100111",
        '3' => "111001111001111",
        '4' => "101101111001001",
        '5' => "111100111001111",
        '6' => "111100111101111",
        '7' => "111001001001001",
        '8' => "111101111101111",
        '9' => "111101111001111",
        'A' => "010101111101101",
        'B' => "110101110101110",
        'C' => "011100100100011",
        'D' => "110101101101110",
        'E' => "111100110100111",
        'F' => "111100110100100",
        'G' => "011100101101011",
        'H' => "101101111101101",
        'I' => "111010010010111",
        'J' => "001001001101010",
        'K' => "101101110101101",
        'L' => "100100100100111",
        'M' => "101111111101101",
        'N' => "110101101101101",
        'O' => "010101101101010",
        'P' => "110101110100100",
        'Q' => "010101101110011",
        'R' => "110101110101101",
        'S' => "011100010001110",
        'T' => "111010010010010",
        'U' => "101101101101111",
        'V' => "101101101101010",
        'W' => "101101111111101",
        'X' => "101101010101101",
        'Y' => "101101010010010",
        'Z' => "111001010100111",
        '.' => "000000000000010",
        '-' => "000000111000000",
        '_' => "000000000000111",
        '+' => "000010111010000",
        '/' => "001001010100100",
        '(' => "010100100100010",
        ')' => "010001001001010",
        _ => "000000000000000",
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Estimate, SummaryRow};
    use super::*;

    fn row(method: &str, t: u32, mean: f64) -> SummaryRow {
        SummaryRow {
            method: method.into(),
            iteration: t,
            prompts: 4,
            reward: Estimate { mean, se: 0.05 },
            win_rate_vs_reference: None,
            win_rate_vs_base: None,
            mean_length: 10.0,
            kl_bound: None,
            tokens: 40,
            seconds: 1.0,
            diff_vs_base: None,
            diff_vs_best_of_n: None,
        }
    }

    #[test]
    fn the_plot_is_a_png_with_the_series_colours() {
        let rows = [row("base", 1, 0.2), row("best_of_n", 1, 0.3), row("iro", 1, 0.35), row("iro", 2, 0.4)];
        let png = reward_plot(&rows);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // Stored blocks keep the pixels verbatim: the IRO colour and a baseline colour are in the file.
        let has = |c: [u8; 3]| png.windows(3).any(|w| w == c);
        assert!(has(IRO) && has(BASELINES[0]) && has(BASELINES[1]));
        // Degenerate inputs still draw.
        assert_eq!(&reward_plot(&[])[..4], b"\x89PNG");
        assert_eq!(&reward_plot(&[row("iro", 1, 0.0)])[..4], b"\x89PNG");
    }
}
