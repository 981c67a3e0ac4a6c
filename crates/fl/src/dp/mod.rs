//! Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): every client update
//! Δ = trained − received is clipped to L2 norm C on the client; Gaussian noise of standard
//! deviation z·C goes on the server's aggregate (`central`) or on each client's update
//! (`local`), scaled as the weighted mean requires. C may adapt to a quantile of the update
//! norms (Andrew et al. 2021). `accountant` turns (z, sampling, rounds) into ε.

use std::collections::BTreeMap;

use candle_core::Tensor;
use fedllm_rng::Rng;

use crate::error::Result;
use crate::params::ParamSet;

pub mod accountant;

/// The L2 norm of `new − old` over every tensor of `new`.
pub fn update_norm(new: &ParamSet, old: &ParamSet) -> Result<f64> {
    let mut s = 0.0f64;
    for (k, t) in new {
        let d = (t - &old[k])?;
        s += d
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(s.sqrt())
}

/// `new` with its update from `old` scaled to L2 norm at most `clip`; the norm before. An
/// update within the bound is returned untouched (bit for bit, so C = ∞ is no clipping).
pub fn clip(new: ParamSet, old: &ParamSet, clip: f64) -> Result<(ParamSet, f64)> {
    let norm = update_norm(&new, old)?;
    if norm <= clip {
        return Ok((new, norm));
    }
    let f = clip / norm;
    let mut out = BTreeMap::new();
    for (k, t) in new {
        let o = &old[&k];
        out.insert(k, (o + ((t - o)? * f)?)?);
    }
    Ok((out, norm))
}

/// Standard normal draws (Box–Muller on the seeded generator).
pub fn normals(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        let u1 = (rng.next_f64()).max(f64::MIN_POSITIVE);
        let u2 = rng.next_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        v.push((r * t.cos()) as f32);
        v.push((r * t.sin()) as f32);
    }
    v.truncate(n);
    v
}

/// `params` plus N(0, std²) noise on every coordinate; untouched when std is 0.
pub fn add_noise(params: ParamSet, std: f64, rng: &mut Rng) -> Result<ParamSet> {
    if std == 0.0 {
        return Ok(params);
    }
    let mut out = BTreeMap::new();
    for (k, t) in params {
        let z = normals(rng, t.elem_count());
        let z = Tensor::from_vec(z, t.shape(), t.device())?.to_dtype(t.dtype())?;
        out.insert(k, (t + (z * std)?)?);
    }
    Ok(out)
}

/// Andrew et al.'s geometric update of the clip: C ← C·exp(−η(b̄ − γ)), with b̄ the (noised)
/// fraction of clients whose update was within C and γ the target quantile.
pub fn adapt_clip(clip: f64, within: f64, target_quantile: f64, lr: f64) -> f64 {
    clip * (-lr * (within - target_quantile)).exp()
}

/// The noise multiplier left for the updates when σ_b of the privacy budget goes to counting
/// clipped clients: z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) (Andrew et al. 2021, Theorem 1).
pub fn update_noise_multiplier(z: f64, count_std: f64) -> Option<f64> {
    let r = z.powi(-2) - (2.0 * count_std).powi(-2);
    (r > 0.0).then(|| r.powf(-0.5))
}

/// How the accountant sees a run: its sampling, and the factor from the config's z to the
/// accountant's multiplier. The engine samples `sample` of `clients` without replacement,
/// accounted under replace-one (sensitivity 2C: z/2); local noise counts every round at full
/// participation (z itself).
fn accounting(
    cfg: &crate::config::DpCfg,
    clients: usize,
    sample: usize,
) -> (accountant::Sampling, f64) {
    use accountant::Sampling;
    match cfg.mode {
        crate::config::DpMode::Local => (Sampling::WithoutReplacement { q: 1.0 }, 1.0),
        _ => (
            Sampling::WithoutReplacement {
                q: sample as f64 / clients as f64,
            },
            0.5,
        ),
    }
}

/// ε after `rounds` rounds of the run `cfg` describes (its noise multiplier already resolved).
pub fn epsilon_of(cfg: &crate::config::DpCfg, clients: usize, sample: usize, rounds: usize) -> f64 {
    if cfg.mode == crate::config::DpMode::None || rounds == 0 {
        return 0.0;
    }
    if cfg.noise_multiplier == 0.0 || !cfg.clip.is_finite() {
        return f64::INFINITY;
    }
    let (s, f) = accounting(cfg, clients, sample);
    accountant::epsilon_after(s, cfg.noise_multiplier * f, rounds, cfg.delta)
}

/// The noise multiplier z that reaches `target` ε after `rounds` rounds (see `epsilon_of`).
pub fn noise_for_target(
    cfg: &crate::config::DpCfg,
    clients: usize,
    sample: usize,
    rounds: usize,
    target: f64,
) -> Option<f64> {
    let (s, f) = accounting(cfg, clients, sample);
    accountant::noise_for(s, target, rounds, cfg.delta).map(|z| z / f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn set(v: &[f32]) -> ParamSet {
        ParamSet::from([(
            "w".to_string(),
            Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap(),
        )])
    }

    fn vals(p: &ParamSet) -> Vec<f32> {
        p["w"].to_vec1().unwrap()
    }

    /// A 3-4-0 update (norm 5) clipped to 1 becomes 0.6-0.8-0; within the bound it is untouched.
    #[test]
    fn clipping_by_hand() {
        let old = set(&[1.0, 1.0, 1.0]);
        let (c, n) = clip(set(&[4.0, 5.0, 1.0]), &old, 1.0).unwrap();
        assert_eq!(n, 5.0);
        let v = vals(&c);
        for (g, w) in v.iter().zip([1.6f32, 1.8, 1.0]) {
            assert!((g - w).abs() < 1e-6, "{v:?}");
        }
        let new = set(&[1.1, 0.3, 1.0 + 1e-7]);
        let (c, _) = clip(new.clone(), &old, f64::INFINITY).unwrap();
        assert_eq!(vals(&c), vals(&new));
    }

    /// Every clipped update's norm is at most C (plus f32 rounding), for random updates.
    #[test]
    fn clipping_bounds_every_update() {
        let mut rng = Rng::new(3);
        let old = set(&normals(&mut rng, 1000));
        for scale in [0.01f32, 1.0, 100.0] {
            let new: Vec<f32> = vals(&old)
                .iter()
                .zip(normals(&mut rng, 1000))
                .map(|(o, z)| o + scale * z)
                .collect();
            let (c, _) = clip(set(&new), &old, 2.0).unwrap();
            assert!(update_norm(&c, &old).unwrap() <= 2.0 * (1.0 + 1e-5));
        }
    }

    /// The noise's empirical standard deviation over 200,000 draws matches: its standard error
    /// is std/√(2n) ≈ 0.16%, so 1% is over six of them.
    #[test]
    fn noise_has_the_asked_standard_deviation() {
        let mut rng = Rng::new(11);
        let n = 200_000;
        let p = add_noise(set(&vec![0.0; n]), 0.3, &mut rng).unwrap();
        let v = vals(&p);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        assert!((var.sqrt() - 0.3).abs() < 0.003, "{}", var.sqrt());
        assert!(mean.abs() < 0.003, "{mean}");
    }

    /// Andrew et al.'s update by hand: all clients within C at γ = 0.5, η = 0.2 shrinks C by
    /// e^−0.1; the noise split leaves z_Δ = (1 − 1/4)^−½ for z = 1, σ_b = 1.
    #[test]
    fn adaptive_clip_and_noise_split_by_hand() {
        assert!((adapt_clip(2.0, 1.0, 0.5, 0.2) - 2.0 * (-0.1f64).exp()).abs() < 1e-12);
        assert!((adapt_clip(2.0, 0.5, 0.5, 0.2) - 2.0).abs() < 1e-12);
        assert!((update_noise_multiplier(1.0, 1.0).unwrap() - 0.75f64.powf(-0.5)).abs() < 1e-12);
        assert!(update_noise_multiplier(1.0, 0.4).is_none());
    }
}
