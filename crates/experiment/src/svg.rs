//! Two small SVG charts written by hand (no plotting dependency): lines of a value per round,
//! and bars with 95% interval whiskers.

const W: f64 = 720.0;
const H: f64 = 400.0;
const L: f64 = 70.0;
const R: f64 = 210.0;
const T: f64 = 40.0;
const B: f64 = 60.0;
const COLOURS: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn head(title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        (L + W - R) / 2.0,
        esc(title)
    )
}

/// The y range padded by 5% (a flat series gets ±0.5).
fn range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = vals
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

fn y_axis(out: &mut String, lo: f64, hi: f64, label: &str) {
    let py = |v: f64| T + (H - T - B) * (1.0 - (v - lo) / (hi - lo));
    for i in 0..=4 {
        let v = lo + (hi - lo) * i as f64 / 4.0;
        let y = py(v);
        out.push_str(&format!(
            "<line x1=\"{L}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\n<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.3}</text>\n",
            W - R,
            L - 6.0,
            y + 4.0
        ));
    }
    out.push_str(&format!(
        "<text x=\"16\" y=\"{:.1}\" transform=\"rotate(-90 16 {:.1})\" text-anchor=\"middle\">{}</text>\n",
        (T + H - B) / 2.0,
        (T + H - B) / 2.0,
        esc(label)
    ));
}

/// One polyline per series of (x, y) points, with a legend on the right.
pub fn lines(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let mut s = head(title);
    let (lo, hi) = range(series.iter().flat_map(|x| x.1.iter().map(|p| p.1)));
    let (x0, x1) = series
        .iter()
        .flat_map(|x| x.1.iter().map(|p| p.0))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    let (x0, x1) = if x0.is_finite() && x1 > x0 {
        (x0, x1)
    } else {
        (0.0, 1.0)
    };
    let px = |v: f64| L + (W - L - R) * (v - x0) / (x1 - x0);
    let py = |v: f64| T + (H - T - B) * (1.0 - (v - lo) / (hi - lo));
    y_axis(&mut s, lo, hi, y_label);
    let ticks = (x1 - x0).round() as usize;
    for i in 0..=ticks.min(20) {
        let v = x0 + (x1 - x0) * i as f64 / ticks.clamp(1, 20) as f64;
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{v:.0}</text>\n",
            px(v),
            H - B + 18.0
        ));
    }
    s.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
        (L + W - R) / 2.0,
        H - 14.0,
        esc(x_label)
    ));
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = pts
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1)))
            .collect();
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n",
            path.join(" ")
        ));
        for p in &path {
            let (x, y) = p.split_once(',').expect("x,y");
            s.push_str(&format!(
                "<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"{c}\"/>\n"
            ));
        }
        let ly = T + 16.0 * i as f64;
        s.push_str(&format!(
            "<rect x=\"{}\" y=\"{:.1}\" width=\"12\" height=\"3\" fill=\"{c}\"/><text x=\"{}\" y=\"{:.1}\">{}</text>\n",
            W - R + 12.0,
            ly + 4.0,
            W - R + 28.0,
            ly + 8.0,
            esc(name)
        ));
    }
    s + "</svg>\n"
}

/// One bar per (name, value, (low, high)) with its interval as a whisker; labels under the bars.
pub fn bars(title: &str, y_label: &str, items: &[(String, f64, (f64, f64))]) -> String {
    let mut s = head(title);
    let hi = items
        .iter()
        .map(|x| x.2 .1.max(x.1))
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.05;
    let lo = 0.0;
    let py = |v: f64| T + (H - T - B) * (1.0 - (v - lo) / (hi - lo));
    y_axis(&mut s, lo, hi, y_label);
    let n = items.len().max(1) as f64;
    let slot = (W - L - R + 150.0) / n;
    for (i, (name, v, (a, b))) in items.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let x = L + slot * i as f64 + slot * 0.15;
        let w = slot * 0.7;
        s.push_str(&format!(
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{c}\" opacity=\"0.8\"/>\n",
            py(*v),
            (py(lo) - py(*v)).max(0.0)
        ));
        let cx = x + w / 2.0;
        s.push_str(&format!(
            "<line x1=\"{cx:.1}\" y1=\"{:.1}\" x2=\"{cx:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n",
            py(*a),
            py(*b),
            cx - 4.0,
            py(*a),
            cx + 4.0,
            py(*a),
            cx - 4.0,
            py(*b),
            cx + 4.0,
            py(*b)
        ));
        let ty = H - B + 12.0;
        s.push_str(&format!(
            "<text x=\"{cx:.1}\" y=\"{ty}\" text-anchor=\"end\" font-size=\"10\" transform=\"rotate(-35 {cx:.1} {ty})\">{}</text>\n",
            esc(name)
        ));
    }
    s + "</svg>\n"
}
