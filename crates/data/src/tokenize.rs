//! Tokenised samples: prompt ids then target ids (output + EOS), labels -100 on the prompt.
//! Truncation at `tok_len` never leaves a sample without target tokens: such samples (FS-LLM's
//! NaN-loss source) are counted and dropped.

use fedllm_model::Tokenizer;
use serde::Serialize;

use crate::error::{DataError, Result};
use crate::record::Record;
use crate::template::Template;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub ids: Vec<u32>,
    /// -100 where no loss is taken; the token id elsewhere (labels are shifted in the loss).
    pub labels: Vec<i64>,
    /// Index of the first target token.
    pub target_start: usize,
    pub category: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TokenizeReport {
    pub kept: usize,
    /// Samples whose prompt filled `tok_len`, leaving no target token.
    pub dropped_no_target: usize,
    /// Samples whose target was cut short by `tok_len`.
    pub truncated: usize,
}

pub fn tokenize(
    r: &Record,
    template: Template,
    tok: &Tokenizer,
    tok_len: usize,
) -> Result<Option<(Sample, bool)>> {
    let eos = *tok
        .eos_token_ids
        .first()
        .ok_or_else(|| DataError::Config("the tokenizer has no EOS token".into()))?;
    let prompt = tok.encode(&template.prompt(r, tok)?, true)?;
    let mut target = tok.encode(&r.output, false)?;
    target.push(eos);
    let full = prompt.len() + target.len();
    let keep = full.min(tok_len);
    // The first target token is predicted from the last prompt token, so the prompt must be
    // non-empty and at least one target token must survive truncation.
    if prompt.is_empty() || prompt.len() >= keep {
        return Ok(None);
    }
    let mut ids = prompt.clone();
    ids.extend_from_slice(&target);
    ids.truncate(keep);
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| if i < prompt.len() { -100 } else { t as i64 })
        .collect();
    Ok(Some((
        Sample {
            ids,
            labels,
            target_start: prompt.len(),
            category: r.category.clone(),
        },
        keep < full,
    )))
}

pub fn tokenize_all(
    records: &[Record],
    template: Template,
    tok: &Tokenizer,
    tok_len: usize,
) -> Result<(Vec<Sample>, TokenizeReport)> {
    let mut rep = TokenizeReport::default();
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        match tokenize(r, template, tok, tok_len)? {
            Some((s, truncated)) => {
                rep.truncated += truncated as usize;
                out.push(s);
            }
            None => rep.dropped_no_target += 1,
        }
    }
    rep.kept = out.len();
    Ok((out, rep))
}
