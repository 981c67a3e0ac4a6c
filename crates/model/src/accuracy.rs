//! How far each product path's logits lie from the f32 path's on the same prompts: the cost in
//! accuracy of rounding activations to 16 or 8 bits (`qmatvec::Path`), measured as a user
//! choosing a path would want it — every position's logits, the rms and largest difference,
//! and how often the top choice (greedy decoding's token) differs. `fedllm bench logits`
//! prints it; `scripts/w3/transformers_logits.py` measures transformers' bf16 against its
//! fp32 on the same token ids, in the same terms.

use candle_core::{DType, Tensor};

use crate::cache::KvCache;
use crate::error::Result;
use crate::generate::argmax;
use crate::model::CausalLm;
use crate::ops::qmatvec::{self, Path};

/// Differences of one path's logits from the reference's, summed over positions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogitError {
    /// Positions compared (one logit row each).
    pub positions: usize,
    /// Logits compared (positions × vocabulary).
    pub values: usize,
    /// Σ (got − want)² over every logit.
    pub squares: f64,
    /// max |got − want| over every logit.
    pub max: f32,
    /// Positions whose largest logit is at another token than the reference's.
    pub top1_differs: usize,
}

impl LogitError {
    /// Adds one position's logits against the reference's (same length).
    pub fn add(&mut self, got: &[f32], want: &[f32]) {
        assert_eq!(
            got.len(),
            want.len(),
            "logit rows of different vocabularies"
        );
        for (g, w) in got.iter().zip(want) {
            let d = g - w;
            self.squares += (d as f64) * (d as f64);
            self.max = self.max.max(d.abs());
        }
        self.values += got.len();
        self.positions += 1;
        self.top1_differs += usize::from(argmax(got) != argmax(want));
    }

    /// Root mean square difference over every logit (0 with none compared).
    pub fn rms(&self) -> f64 {
        if self.values == 0 {
            0.0
        } else {
            (self.squares / self.values as f64).sqrt()
        }
    }
}

/// The path whose activations stay f32 on this CPU: AVX-512F, else its AVX2 twin (the same
/// bits), else the portable loops.
pub fn reference_path() -> Path {
    [Path::Avx512, Path::Avx2]
        .into_iter()
        .find(|p| p.supported())
        .unwrap_or(Path::Portable)
}

/// Every position's logits [t, vocab] of one prompt on `path`, as generation computes them:
/// the first `prefilled` tokens through one prefill (prompt rows on the path's prompt GEMM),
/// each later one as a decode step on the cache (teacher-forced: the text's own next token).
fn all_logits(
    model: &CausalLm,
    ids: &[u32],
    path: Path,
    prefilled: usize,
) -> Result<Vec<Vec<f32>>> {
    let p = prefilled.clamp(1, ids.len());
    qmatvec::with_path(path, || -> Result<Vec<Vec<f32>>> {
        let mut cache = KvCache::new();
        let mut out = Vec::with_capacity(ids.len());
        for part in std::iter::once(&ids[..p]).chain(ids[p..].chunks(1)) {
            let t = Tensor::from_vec(part.to_vec(), (1, part.len()), &model.device)?;
            let h = model.forward_hidden(&t, None, Some(&mut cache))?;
            let l = model.logits(&h)?.squeeze(0)?.to_dtype(DType::F32)?;
            out.extend(l.to_vec2::<f32>()?);
        }
        Ok(out)
    })
}

/// Each of `paths`' logit error against [`reference_path`] over every position of `prompts`,
/// the first `prefilled` tokens of each prefilled and the rest decoded ([`all_logits`]; one
/// prompt at a time, so memory holds two prompts' logits at most).
pub fn logit_errors(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    paths: &[Path],
    prefilled: usize,
) -> Result<Vec<(Path, LogitError)>> {
    let mut out: Vec<(Path, LogitError)> =
        paths.iter().map(|&p| (p, LogitError::default())).collect();
    for ids in prompts.iter().filter(|p| !p.is_empty()) {
        let want = all_logits(model, ids, reference_path(), prefilled)?;
        for (path, err) in out.iter_mut() {
            for (g, w) in all_logits(model, ids, *path, prefilled)?.iter().zip(&want) {
                err.add(g, w);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::LogitError;

    /// Hand-computed: rows (1, 2, 3) vs (1, 2, 3) and (0, 5, 1) vs (0, 2, 4) give squares
    /// 0 + 9 + 9 = 18 over 6 logits (rms √3), max 3, and one top choice moved (index 2 → 1).
    #[test]
    fn errors_sum_squares_maxima_and_moved_top_choices() {
        let mut e = LogitError::default();
        e.add(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]);
        e.add(&[0.0, 5.0, 1.0], &[0.0, 2.0, 4.0]);
        assert_eq!(e.positions, 2);
        assert_eq!(e.values, 6);
        assert_eq!(e.squares, 18.0);
        assert_eq!(e.max, 3.0);
        assert_eq!(e.top1_differs, 1);
        assert!((e.rms() - 3f64.sqrt()).abs() < 1e-12);
        assert_eq!(LogitError::default().rms(), 0.0);
    }
}
