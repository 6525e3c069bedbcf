//! A dependency-free SVG chart for the bench report: panels of horizontal
//! grouped bars, one group per system, one bar per series, each panel
//! scaled to its own largest value, values written at the bar ends.

use std::fmt::Write as _;

/// One panel: a title, the series names and per system its values (one per
/// series).
pub struct Panel<'a> {
    pub title: &'a str,
    pub series: &'a [&'a str],
    pub rows: &'a [(String, Vec<f64>)],
}

const WIDTH: f64 = 760.0;
const LABEL_W: f64 = 110.0;
const BAR_H: f64 = 14.0;
const COLORS: [&str; 4] = ["#4c78a8", "#f58518", "#54a24b", "#e45756"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The whole chart.
pub fn svg(panels: &[Panel]) -> String {
    let mut body = String::new();
    let mut y = 10.0;
    for p in panels {
        let _ = writeln!(
            body,
            r#"<text x="10" y="{:.0}" font-size="14" font-weight="bold">{}</text>"#,
            y + 14.0,
            esc(p.title)
        );
        // Legend.
        let mut lx = WIDTH - 200.0;
        for (i, s) in p.series.iter().enumerate() {
            let _ = writeln!(
                body,
                r#"<rect x="{lx:.0}" y="{:.0}" width="10" height="10" fill="{}"/><text x="{:.0}" y="{:.0}" font-size="11">{}</text>"#,
                y + 5.0,
                COLORS[i % COLORS.len()],
                lx + 14.0,
                y + 14.0,
                esc(s)
            );
            lx += 80.0;
        }
        y += 26.0;
        let max = p
            .rows
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .filter(|v| v.is_finite())
            .fold(0.0_f64, f64::max);
        let scale = if max > 0.0 {
            (WIDTH - LABEL_W - 70.0) / max
        } else {
            0.0
        };
        if p.rows.is_empty() {
            let _ = writeln!(
                body,
                r#"<text x="{LABEL_W}" y="{:.0}" font-size="11">no results</text>"#,
                y + 12.0
            );
            y += 20.0;
        }
        for (name, vals) in p.rows {
            let group_h = BAR_H * vals.len() as f64;
            let _ = writeln!(
                body,
                r#"<text x="{:.0}" y="{:.0}" font-size="12" text-anchor="end">{}</text>"#,
                LABEL_W - 6.0,
                y + group_h / 2.0 + 4.0,
                esc(name)
            );
            for (i, v) in vals.iter().enumerate() {
                let w = if v.is_finite() { v * scale } else { 0.0 };
                let by = y + BAR_H * i as f64;
                let _ = writeln!(
                    body,
                    r#"<rect x="{LABEL_W}" y="{by:.1}" width="{w:.1}" height="{:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="10">{v:.1}</text>"#,
                    BAR_H - 2.0,
                    COLORS[i % COLORS.len()],
                    LABEL_W + w + 4.0,
                    by + BAR_H - 4.0
                );
            }
            y += group_h + 8.0;
        }
        y += 16.0;
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH:.0}\" height=\"{y:.0}\" \
         font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_a_bar_per_value_and_escapes() {
        let rows = vec![
            ("a<b".to_string(), vec![1.0, 2.0]),
            ("c".into(), vec![4.0, f64::NAN]),
        ];
        let s = svg(&[Panel {
            title: "t",
            series: &["x", "y"],
            rows: &rows,
        }]);
        assert!(s.starts_with("<svg"));
        assert!(s.contains("a&lt;b"));
        // 2 legend squares, 4 bars, 1 background.
        assert_eq!(s.matches("<rect").count(), 7);
    }
}
