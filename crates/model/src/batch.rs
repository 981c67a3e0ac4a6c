//! A training/evaluation batch as every crate passes it around.

use candle_core::{DType, Result, Tensor};

/// ids [B, T] (u32), the 0/1 attention mask, labels [B, T] (i64, -100 = no loss).
#[derive(Debug, Clone)]
pub struct Batch {
    pub input_ids: Tensor,
    pub mask: Vec<Vec<u8>>,
    pub labels: Tensor,
}

impl Batch {
    /// Tokens that carry loss (after the causal shift: position 0 never does).
    pub fn target_tokens(&self) -> Result<usize> {
        let l: Vec<Vec<i64>> = self.labels.to_dtype(DType::I64)?.to_vec2()?;
        Ok(l.iter()
            .map(|r| r.iter().skip(1).filter(|&&x| x != -100).count())
            .sum())
    }

    pub fn size(&self) -> usize {
        self.mask.len()
    }

    /// Real (unpadded) tokens in the batch.
    pub fn tokens(&self) -> usize {
        self.mask
            .iter()
            .map(|r| r.iter().filter(|&&m| m == 1).count())
            .sum()
    }
}
