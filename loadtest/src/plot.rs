//! Latency by percentile as an SVG a person can open in a browser: the
//! HdrHistogram way of looking at a tail. The x axis stretches towards 100 %
//! (each step is ten times rarer: 90 %, 99 %, 99.9 % …), the y axis is
//! logarithmic so that a 0.3 ms median and a 300 ms tail both show.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

const W: f64 = 860.0;
const H: f64 = 500.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The x position of quantile `q`: log10(1 / (1 - q)), so 0.99 → 2.
pub fn nines(q: f64) -> f64 {
    -(1.0 - q).max(1e-12).log10()
}

/// Points (nines, latency ms) of one histogram, from the median's left
/// (0 %) to as far right as its count supports (1 / count).
pub fn curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let x_max = (h.len() as f64).log10().clamp(0.0, 6.0);
    let steps = 120;
    (0..=steps)
        .map(|i| {
            let x = x_max * f64::from(i) / f64::from(steps);
            let q = 1.0 - 10f64.powf(-x);
            (x, h.value_at_quantile(q) as f64 / 1000.0)
        })
        .collect()
}

/// An SVG document with one line per named histogram.
pub fn svg(title: &str, series: &[(String, &Histogram<u64>)]) -> String {
    let curves: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(name, h)| (name.clone(), curve(h)))
        .collect();
    let x_max = curves
        .iter()
        .flat_map(|(_, c)| c.last().map(|p| p.0))
        .fold(2.0f64, f64::max)
        .ceil();
    let all = || curves.iter().flat_map(|(_, c)| c.iter().map(|p| p.1));
    let lo = all().fold(f64::INFINITY, f64::min).max(0.001);
    let hi = all().fold(0.0f64, f64::max).max(lo * 10.0);
    let (y0, y1) = (lo.log10().floor(), hi.log10().ceil());
    let px = |x: f64| LEFT + (W - LEFT - RIGHT) * x / x_max;
    let py = |ms: f64| {
        let v = ms.max(10f64.powf(y0)).log10();
        H - BOTTOM - (H - TOP - BOTTOM) * (v - y0) / (y1 - y0)
    };

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="22" font-size="15">{}</text>"#,
        escape(title)
    );
    // Grid: one vertical line per nine, one horizontal per power of ten.
    for k in 0..=(x_max as i32) {
        let x = px(f64::from(k));
        let label = match k {
            0 => "0%".to_owned(),
            1 => "90%".to_owned(),
            2 => "99%".to_owned(),
            k => format!("99.{}%", "9".repeat(k as usize - 2)),
        };
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 18.0
        );
    }
    for e in (y0 as i32)..=(y1 as i32) {
        let v = 10f64.powi(e);
        let y = py(v);
        let label = if v >= 1.0 {
            format!("{v:.0} ms")
        } else {
            format!("{v} ms")
        };
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 10.0
    );
    for (i, (name, c)) in curves.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<String> = c
            .iter()
            .map(|(x, ms)| format!("{:.1},{:.1}", px(*x), py(*ms)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        let ly = TOP + 10.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            W - RIGHT + 12.0,
            W - RIGHT + 32.0,
            W - RIGHT + 38.0,
            ly + 4.0,
            escape(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report;

    #[test]
    fn nines_stretch_the_tail() {
        assert!((nines(0.0) - 0.0).abs() < 1e-9);
        assert!((nines(0.9) - 1.0).abs() < 1e-9);
        assert!((nines(0.999) - 3.0).abs() < 1e-9);
    }

    #[test]
    fn a_curve_rises_and_ends_at_the_maximum() {
        let mut h = report::histogram();
        for v in 1..=10_000u64 {
            h.record(v * 10).unwrap();
        }
        let c = curve(&h);
        assert!((c.last().unwrap().0 - 4.0).abs() < 1e-9);
        assert!(c.windows(2).all(|w| w[1].1 >= w[0].1));
        assert!((c.last().unwrap().1 - 100.0).abs() < 0.2, "{:?}", c.last());
        assert!(curve(&report::histogram()).is_empty());
    }

    #[test]
    fn the_document_has_a_line_and_a_legend_per_series_and_escapes_text() {
        let mut a = report::histogram();
        let mut b = report::histogram();
        for v in 1..=1_000u64 {
            a.record(v * 100).unwrap();
            b.record(v * 1_000).unwrap();
        }
        let doc = svg(
            "gateway <async> & bare",
            &[("corrected".to_owned(), &a), ("uncorrected".to_owned(), &b)],
        );
        assert!(doc.starts_with("<svg") && doc.trim_end().ends_with("</svg>"));
        assert_eq!(doc.matches("<polyline").count(), 2);
        assert!(doc.contains("gateway &lt;async&gt; &amp; bare"));
        assert!(doc.contains(">99%<") && doc.contains(">99.9%<"), "{doc}");
        assert!(doc.contains(">corrected<") && doc.contains(">uncorrected<"));
    }
}
