//! `fedllm bench logits`: each product path's logit error against the f32 path on real text.

use std::path::Path as FsPath;

use anyhow::{bail, Context, Result};
use fedllm_model::accuracy;
use fedllm_model::qmatvec;

use crate::ModelArgs;

/// The first `limit` texts of a data file (any layout `fedllm_data::load` reads): each
/// record's instruction, input and output, joined by newlines.
fn texts(file: &FsPath, format: &str, limit: usize) -> Result<Vec<String>> {
    let (records, _) = fedllm_data::load(file, &format.parse()?)?;
    Ok(records
        .into_iter()
        .take(limit)
        .map(|r| {
            let parts = [r.instruction, r.input, r.output];
            let parts: Vec<String> = parts.into_iter().filter(|p| !p.is_empty()).collect();
            parts.join("\n")
        })
        .collect())
}

pub fn cmd_bench_logits(
    m: &ModelArgs,
    data: &FsPath,
    format: &str,
    limit: usize,
    max_tokens: usize,
    prefill: Option<usize>,
    ids_out: Option<&FsPath>,
) -> Result<()> {
    if limit == 0 || max_tokens == 0 || prefill == Some(0) {
        bail!("--texts, --max-tokens and --prefill-tokens must be at least 1");
    }
    let prefilled = prefill.unwrap_or(max_tokens);
    let texts = texts(data, format, limit)?;
    let loaded = m.load()?;
    let tok = loaded
        .tokenizer
        .as_ref()
        .with_context(|| format!("{}: no tokenizer", m.model.display()))?;
    let mut prompts = Vec::with_capacity(texts.len());
    for t in &texts {
        let mut ids = tok.encode(t, false)?;
        ids.truncate(max_tokens);
        prompts.push(ids);
    }
    if let Some(p) = ids_out {
        std::fs::write(p, serde_json::to_string(&prompts)?)
            .with_context(|| format!("{}", p.display()))?;
    }
    let reference = accuracy::reference_path();
    let paths: Vec<_> = qmatvec::available()
        .into_iter()
        .filter(|&p| p != reference)
        .collect();
    let positions: usize = prompts.iter().map(Vec::len).sum();
    let decoded: usize = prompts
        .iter()
        .map(|p| p.len().saturating_sub(prefilled))
        .sum();
    println!(
        "bench logits: {}, {} texts of {} ({positions} positions: {} prefilled, {decoded} decoded one by one)",
        m.model.display(),
        prompts.len(),
        data.display(),
        positions - decoded,
    );
    let names: Vec<&str> = paths.iter().map(|p| p.name()).collect();
    println!(
        "paths: {} against {} (f32 activations; a path whose prompt rows take the same f32 GEMM reads 0)",
        names.join(", "),
        reference.name()
    );
    println!("path       rms logit error   max    top choice differs");
    for (p, e) in accuracy::logit_errors(&loaded.model, &prompts, &paths, prefilled)? {
        println!(
            "{:9} {:>10.4} {:>12.3}    {} / {} ({:.2}%)",
            p.name(),
            e.rms(),
            e.max,
            e.top1_differs,
            e.positions,
            100.0 * e.top1_differs as f64 / e.positions.max(1) as f64
        );
    }
    Ok(())
}
