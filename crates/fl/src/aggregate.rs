//! Aggregation math as pure functions over flat parameter vectors (Flower's `aggregate.py`):
//! weighted mean, coordinate-wise median, trimmed mean, (multi-)Krum, Bulyan, norm bounding.
//! Parallel over coordinates.

use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// Σ wᵢ xᵢ / Σ wᵢ.
pub fn weighted_mean(updates: &[&[f32]], weights: &[f64]) -> Vec<f32> {
    assert_eq!(updates.len(), weights.len());
    let n = updates.first().map_or(0, |u| u.len());
    let total: f64 = weights.iter().sum();
    let w: Vec<f32> = weights.iter().map(|x| (x / total) as f32).collect();
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let (at, len) = (c * CHUNK, o.len());
        for (u, &wi) in updates.iter().zip(&w) {
            for (d, &x) in o.iter_mut().zip(&u[at..at + len]) {
                *d += wi * x;
            }
        }
    });
    out
}

fn per_coordinate(updates: &[&[f32]], f: impl Fn(&mut [f32]) -> f32 + Sync) -> Vec<f32> {
    let n = updates.first().map_or(0, |u| u.len());
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let at = c * CHUNK;
        let mut col = vec![0f32; updates.len()];
        for (j, d) in o.iter_mut().enumerate() {
            for (k, u) in updates.iter().enumerate() {
                col[k] = u[at + j];
            }
            *d = f(&mut col);
        }
    });
    out
}

/// Coordinate-wise median (mean of the two middle values for an even count).
pub fn median(updates: &[&[f32]]) -> Vec<f32> {
    per_coordinate(updates, |col| {
        col.sort_by(f32::total_cmp);
        let n = col.len();
        if n % 2 == 1 {
            col[n / 2]
        } else {
            (col[n / 2 - 1] + col[n / 2]) / 2.0
        }
    })
}

/// Coordinate-wise mean after dropping the `beta` fraction of smallest and of largest values.
pub fn trimmed_mean(updates: &[&[f32]], beta: f64) -> Vec<f32> {
    let n = updates.len();
    let cut = ((beta * n as f64).floor() as usize).min((n - 1) / 2);
    per_coordinate(updates, move |col| {
        col.sort_by(f32::total_cmp);
        let kept = &col[cut..n - cut];
        kept.iter().sum::<f32>() / kept.len() as f32
    })
}

fn sq_dist(a: &[f32], b: &[f32]) -> f64 {
    // Partial sums in parallel, added in a fixed order: the result must not depend on scheduling.
    let parts: Vec<f64> = a
        .par_chunks(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .map(|(x, y)| {
            x.iter()
                .zip(y)
                .map(|(p, q)| ((p - q) as f64).powi(2))
                .sum::<f64>()
        })
        .collect();
    parts.iter().sum()
}

/// Krum (Blanchard et al. 2017): each update is scored by the summed squared distance to its
/// n − f − 2 nearest others; the `m` best are averaged (m = 1: plain Krum). Returns the
/// aggregate and the chosen indices.
pub fn krum(updates: &[&[f32]], f: usize, m: usize) -> (Vec<f32>, Vec<usize>) {
    let n = updates.len();
    let k = n.saturating_sub(f + 2).max(1).min(n - 1);
    let mut d = vec![vec![0f64; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            let x = sq_dist(updates[i], updates[j]);
            d[i][j] = x;
            d[j][i] = x;
        }
    }
    let mut scores: Vec<(f64, usize)> = (0..n)
        .map(|i| {
            let mut row: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| d[i][j]).collect();
            row.sort_by(f64::total_cmp);
            (row.iter().take(k).sum(), i)
        })
        .collect();
    scores.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let chosen: Vec<usize> = scores.iter().take(m.clamp(1, n)).map(|s| s.1).collect();
    let sel: Vec<&[f32]> = chosen.iter().map(|&i| updates[i]).collect();
    (weighted_mean(&sel, &vec![1.0; sel.len()]), chosen)
}

/// Bulyan (El Mhamdi et al. 2018) for `f` Byzantine among n ≥ 4f + 3 updates: Krum picks
/// θ = n − 2f updates one at a time (each pick leaves the pool); per coordinate, the β = θ − 2f
/// selected values closest to their median are averaged. None when n < 4f + 3.
pub fn bulyan(updates: &[&[f32]], f: usize) -> Option<Vec<f32>> {
    let n = updates.len();
    if n < 4 * f + 3 {
        return None;
    }
    let mut pool: Vec<usize> = (0..n).collect();
    let mut selected: Vec<&[f32]> = Vec::with_capacity(n - 2 * f);
    while selected.len() < n - 2 * f {
        let cands: Vec<&[f32]> = pool.iter().map(|&i| updates[i]).collect();
        let (_, chosen) = krum(&cands, f, 1);
        selected.push(cands[chosen[0]]);
        pool.remove(chosen[0]);
    }
    let beta = selected.len() - 2 * f;
    Some(per_coordinate(&selected, move |col| {
        col.sort_by(f32::total_cmp);
        let k = col.len();
        let med = if k % 2 == 1 {
            col[k / 2]
        } else {
            (col[k / 2 - 1] + col[k / 2]) / 2.0
        };
        // The β closest to the median form a contiguous window of the sorted column.
        let start = (0..=k - beta)
            .min_by(|&a, &b| {
                let spread = |s: usize| (col[s] - med).abs().max((col[s + beta - 1] - med).abs());
                spread(a).total_cmp(&spread(b))
            })
            .unwrap_or(0);
        col[start..start + beta].iter().sum::<f32>() / beta as f32
    }))
}

/// Norm bounding (Sun et al. 2019): each client's update Δ = w − global is scaled to norm at most
/// `bound` (Δ·min(1, bound/‖Δ‖)), then the clipped models are averaged with `weights`.
pub fn norm_bounded_mean(
    global: &[f32],
    updates: &[&[f32]],
    weights: &[f64],
    bound: f64,
) -> Vec<f32> {
    let clipped: Vec<Vec<f32>> = updates
        .iter()
        .map(|u| {
            let norm = sq_dist(u, global).sqrt();
            let scale = if norm > bound {
                (bound / norm) as f32
            } else {
                1.0
            };
            u.iter()
                .zip(global)
                .map(|(x, g)| g + (x - g) * scale)
                .collect()
        })
        .collect();
    let refs: Vec<&[f32]> = clipped.iter().map(|v| v.as_slice()).collect();
    weighted_mean(&refs, weights)
}

/// pFedMe's server step: (1 − β)·global + β·mean, coordinate by coordinate (β = 1: the mean).
pub fn beta_mix(global: &[f32], mean: &[f32], beta: f64) -> Vec<f32> {
    let b = beta as f32;
    global
        .iter()
        .zip(mean)
        .map(|(&g, &m)| (1.0 - b) * g + b * m)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// β = 0.5 halves the way from the global to the mean; β = 1 is the mean itself; β = 2
    /// (the paper's over-relaxation) goes as far past it.
    #[test]
    fn beta_mix_hand_computed() {
        let (g, m) = ([1.0f32, -2.0], [3.0f32, 2.0]);
        assert_eq!(beta_mix(&g, &m, 0.5), vec![2.0, 0.0]);
        assert_eq!(beta_mix(&g, &m, 1.0), vec![3.0, 2.0]);
        assert_eq!(beta_mix(&g, &m, 2.0), vec![5.0, 6.0]);
    }

    /// Bulyan with f = 1 over 7 one-coordinate updates, by hand: Krum (each scored by its
    /// n − f − 2 nearest) peels off 5 = n − 2f updates, which drops the two outliers; of those
    /// five, the β = 3 values nearest their median are averaged.
    #[test]
    fn bulyan_hand_computed() {
        let vals = [1.0f32, 2.0, 3.0, 4.0, 5.0, 100.0, -100.0];
        let cols: Vec<[f32; 1]> = vals.iter().map(|&v| [v]).collect();
        let refs: Vec<&[f32]> = cols.iter().map(|c| c.as_slice()).collect();
        // Selected {1..5}; median 3; nearest three: 2, 3, 4 → mean 3.
        assert_eq!(bulyan(&refs, 1), Some(vec![3.0]));
        assert_eq!(bulyan(&refs[..6], 1), None, "needs n ≥ 4f + 3");
        // Two coordinates: Krum keeps the five honest rows; per coordinate the three values
        // nearest the median: (10, 11, 12.5) around 11 → 33.5/3, and (1, 2, 3) around 2 → 2.
        let rows = [
            [10.0f32, 0.0],
            [11.0, 1.0],
            [12.5, 2.0],
            [20.0, 3.0],
            [9.0, 4.0],
            [500.0, 500.0],
            [-500.0, 500.0],
        ];
        let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        let b = bulyan(&refs, 1).unwrap();
        assert!(
            (b[0] - 33.5 / 3.0).abs() < 1e-5 && (b[1] - 2.0).abs() < 1e-6,
            "{b:?}"
        );
    }

    /// Norm bounding by hand: global 0, updates (3, 4) (norm 5) and (0.6, 0.8) (norm 1), bound 2:
    /// the first is scaled to (1.2, 1.6), the second kept; equal weights average them.
    #[test]
    fn norm_bounding_hand_computed() {
        let g = [0.0f32, 0.0];
        let (a, b) = ([3.0f32, 4.0], [0.6f32, 0.8]);
        let m = norm_bounded_mean(&g, &[&a, &b], &[1.0, 1.0], 2.0);
        assert!(
            (m[0] - 0.9).abs() < 1e-6 && (m[1] - 1.2).abs() < 1e-6,
            "{m:?}"
        );
        // Around a non-zero global, only the update (the difference) is clipped.
        let g = [10.0f32, -10.0];
        let a = [13.0f32, -6.0];
        let m = norm_bounded_mean(&g, &[&a], &[1.0], 1.0);
        assert!(
            (m[0] - 10.6).abs() < 1e-5 && (m[1] + 9.2).abs() < 1e-5,
            "{m:?}"
        );
    }

    #[test]
    fn hand_computed() {
        let a = [1.0f32, 2.0, 10.0];
        let b = [3.0f32, 4.0, -2.0];
        let c = [5.0f32, 0.0, 1.0];
        // weights 1, 1, 2 → (1+3+10)/4, (2+4+0)/4, (10−2+2)/4
        assert_eq!(
            weighted_mean(&[&a, &b, &c], &[1.0, 1.0, 2.0]),
            vec![3.5, 1.5, 2.5]
        );
        assert_eq!(median(&[&a, &b, &c]), vec![3.0, 2.0, 1.0]);
        assert_eq!(median(&[&a, &b]), vec![2.0, 3.0, 4.0]);
        let d = [100.0f32, -100.0, 0.0];
        let e = [2.0f32, 2.0, 2.0];
        // 5 values per coordinate, beta 0.2 drops one at each end.
        let t = trimmed_mean(&[&a, &b, &c, &d, &e], 0.2);
        assert_eq!(
            t,
            vec![
                (2.0 + 3.0 + 5.0) / 3.0,
                (0.0 + 2.0 + 2.0) / 3.0,
                (0.0 + 1.0 + 2.0) / 3.0
            ]
        );
    }

    #[test]
    fn krum_rejects_the_outlier() {
        let good: Vec<Vec<f32>> = (0..5)
            .map(|i| vec![1.0 + i as f32 * 0.01, 2.0, 3.0])
            .collect();
        let bad = vec![100.0f32, -50.0, 7.0];
        let mut all: Vec<&[f32]> = good.iter().map(|v| v.as_slice()).collect();
        all.push(&bad);
        let (agg, chosen) = krum(&all, 1, 1);
        assert!(!chosen.contains(&5));
        assert!((agg[0] - 1.02).abs() < 0.03, "{agg:?}");
        let (_, multi) = krum(&all, 1, 3);
        assert_eq!(multi.len(), 3);
        assert!(!multi.contains(&5));
    }
}
