//! What a tuning run shows afterwards: every trial's metric per round (each trial evaluates
//! every round, so low-fidelity values exist for all) as an SVG, and how well the ranking at
//! round r predicts the ranking at the largest budget reached (Spearman's ρ over the trials
//! that reached it): the paper's "low-fidelity signals mislead" question, measured.

use std::collections::BTreeMap;
use std::path::Path;

use super::{trial_dir, Tune};
use crate::error::{FlError, Result};

fn io(path: &Path, e: impl std::fmt::Display) -> FlError {
    FlError::File {
        path: path.into(),
        msg: e.to_string(),
    }
}

/// Ranks 1..n, ties sharing their mean rank.
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let mean = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = mean;
        }
        i = j + 1;
    }
    r
}

/// Spearman's rank correlation: Pearson's r of the ranks (ties averaged). None for fewer than
/// two points or a side without spread.
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 2 {
        return None;
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    (va > 0.0 && vb > 0.0).then(|| cov / (va * vb).sqrt())
}

/// Each trial's metric by round, from its `metrics.jsonl` (trials that never started: none).
pub fn curves(
    tune: &Tune,
    out: &Path,
    trials: usize,
) -> Result<BTreeMap<usize, Vec<(usize, f64)>>> {
    let mut all = BTreeMap::new();
    for id in 0..trials {
        let p = trial_dir(out, id).join("metrics.jsonl");
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        let mut c = Vec::new();
        for l in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(l).map_err(|e| io(&p, e))?;
            let round = v["round"].as_u64().unwrap_or(0) as usize;
            if let (true, Some(m)) = (round > 0, v[&tune.metric].as_f64()) {
                c.push((round, m));
            }
        }
        all.insert(id, c);
    }
    Ok(all)
}

/// (round r, ρ between the metric at r and at the largest round reached, trials counted).
pub fn fidelity_correlations(
    curves: &BTreeMap<usize, Vec<(usize, f64)>>,
) -> Vec<(usize, f64, usize)> {
    let top = curves.values().filter_map(|c| c.last().map(|x| x.0)).max();
    let Some(top) = top else { return vec![] };
    let at = |c: &[(usize, f64)], r: usize| c.iter().find(|x| x.0 == r).map(|x| x.1);
    let full: Vec<&Vec<(usize, f64)>> = curves.values().filter(|c| at(c, top).is_some()).collect();
    (1..top)
        .filter_map(|r| {
            let pairs: Vec<(f64, f64)> = full
                .iter()
                .filter_map(|c| Some((at(c, r)?, at(c, top)?)))
                .collect();
            let (a, b): (Vec<f64>, Vec<f64>) = pairs.iter().copied().unzip();
            spearman(&a, &b).map(|rho| (r, rho, pairs.len()))
        })
        .collect()
}

/// `trials.svg`: one line per trial, metric against rounds.
pub fn plot(path: &Path, metric: &str, curves: &BTreeMap<usize, Vec<(usize, f64)>>) -> Result<()> {
    use plotters::prelude::*;
    let pts: Vec<(usize, f64)> = curves.values().flatten().copied().collect();
    if pts.is_empty() {
        return Ok(());
    }
    let x1 = pts.iter().map(|p| p.0).max().unwrap_or(1) as f64;
    let (y0, y1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
        (a.0.min(p.1), a.1.max(p.1))
    });
    let pad = ((y1 - y0) * 0.1).max(1e-3);
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("{metric} per round, one line per trial"),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(56)
            .build_cartesian_2d(0.5f64..x1 + 0.5, (y0 - pad)..(y1 + pad))?;
        chart
            .configure_mesh()
            .x_desc("round")
            .y_desc(metric)
            .draw()?;
        for (i, c) in curves.values().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let data: Vec<(f64, f64)> = c.iter().map(|&(r, m)| (r as f64, m)).collect();
            chart.draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))?;
            chart.draw_series(data.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ρ by hand: identical orders 1, reversed −1; with a tie, ranks (1, 2.5, 2.5, 4) against
    /// (1, 2, 3, 4): cov 4.5, variances 4.5 and 5 → 4.5/√22.5 = 0.9487.
    #[test]
    fn spearman_hand_computed() {
        let a = [0.3, 0.1, 0.2, 0.9];
        assert_eq!(spearman(&a, &a), Some(1.0));
        let rev: Vec<f64> = a.iter().map(|x| -x).collect();
        assert_eq!(spearman(&a, &rev), Some(-1.0));
        let r = spearman(&[1.0, 2.0, 2.0, 4.0], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!((r - 4.5 / 22.5f64.sqrt()).abs() < 1e-12, "{r}");
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), None);
    }

    /// Three trials' curves: round 1 orders them as round 3 does (ρ = 1), round 2 reverses the
    /// order (ρ = −1); a trial stopped at round 1 does not count.
    #[test]
    fn fidelity_correlations_use_the_trials_that_reached_the_top() {
        let c = BTreeMap::from([
            (0, vec![(1, 1.0), (2, 3.0), (3, 1.0)]),
            (1, vec![(1, 2.0), (2, 2.0), (3, 2.0)]),
            (2, vec![(1, 3.0), (2, 1.0), (3, 3.0)]),
            (3, vec![(1, 0.5)]),
        ]);
        assert_eq!(fidelity_correlations(&c), vec![(1, 1.0, 3), (2, -1.0, 3)]);
    }
}
