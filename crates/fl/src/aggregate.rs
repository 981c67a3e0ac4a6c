//! Aggregation math as pure functions over flat parameter vectors (Flower's `aggregate.py`):
//! weighted mean, coordinate-wise median, trimmed mean, (multi-)Krum. Parallel over coordinates.

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

#[cfg(test)]
mod tests {
    use super::*;

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
