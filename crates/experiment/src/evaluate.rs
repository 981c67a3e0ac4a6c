//! A trained adapter (or none: the base model) scored on its table's task, with FS-LLM's
//! protocols (`fedllm-eval`). Per-sample rows go to a JSON-lines file, so an interrupted
//! evaluation continues where it stopped.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use fedllm_eval::{gsm8k, humaneval, mmlu, sandbox::Limits};
use fedllm_model::{CausalLm, LoadOptions, QuantMode};
use serde::{Deserialize, Serialize};

use crate::error::{file_err, Result};
use crate::study::{EvalSpec, Task};

/// One adapter's score: the task's metric with a 95% interval over `count` items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    pub value: f64,
    pub ci95: (f64, f64),
    pub count: usize,
}

/// What to score: the model, an adapter folder, and (Fed-MMLU) the question indices held out
/// from training.
pub struct Target<'a> {
    pub model: &'a Path,
    pub adapter: Option<&'a Path>,
    pub data_root: &'a Path,
    pub held_out: Option<&'a BTreeSet<usize>>,
    /// Per-sample results (`<x>.samples.jsonl`; HumanEval also keeps `<x>.completions.jsonl`).
    pub out: PathBuf,
}

/// Wilson's 95% interval for a proportion `p` observed over `n` items (n may carry fractional
/// successes, as pass@1 averaged over tasks does).
pub fn wilson(p: f64, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (z, n) = (1.959_963_984_540_054_f64, n as f64);
    let d = 1.0 + z * z / n;
    let c = (p + z * z / (2.0 * n)) / d;
    let h = z * ((p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt()) / d;
    ((c - h).max(0.0), (c + h).min(1.0))
}

fn with_ext(p: &Path, ext: &str) -> PathBuf {
    PathBuf::from(format!("{}.{ext}", p.display()))
}

/// Loads the model (GGUF computed as dequantized to f32, as evaluation does everywhere; the
/// blocks stay packed) with the adapter attached.
fn load(
    t: &Target,
) -> Result<(
    CausalLm,
    fedllm_model::Tokenizer,
    Option<fedllm_peft::Adapter>,
)> {
    let opts = LoadOptions {
        quant: QuantMode::Packed,
        ..Default::default()
    };
    let loaded = CausalLm::load(t.model, opts)?;
    let mut model = loaded.model;
    let tok = loaded.tokenizer.ok_or_else(|| {
        file_err(
            t.model,
            "the model has no tokenizer (evaluation generates text)",
        )
    })?;
    let ad = match t.adapter {
        Some(d) => {
            let ad = fedllm_peft::io::load(d, &model)?;
            ad.attach(&mut model, false)?;
            Some(ad)
        }
        None => None,
    };
    Ok((model, tok, ad))
}

/// Scores `t` on `task`.
pub fn score(task: Task, spec: &EvalSpec, t: &Target) -> Result<Scored> {
    let (model, tok, ad) = load(t)?;
    let start = match &ad {
        Some(a) => a.generation_prefix(&model)?,
        None => None,
    };
    let samples = with_ext(&t.out, "samples.jsonl");
    let scored = match task {
        Task::Gsm8k => {
            let s = &spec.gsm8k;
            let mut qs: Vec<gsm8k::Question> =
                humaneval::read_jsonl(&t.data_root.join("gsm8k/test.jsonl"))?;
            qs.truncate(s.limit);
            let r = gsm8k::evaluate(
                &model,
                start.as_ref(),
                &tok,
                &qs,
                s.max_new_tokens,
                s.batch,
                Some(&samples),
            )?;
            Scored {
                value: r.accuracy,
                ci95: r.ci95,
                count: r.count,
            }
        }
        Task::Humaneval => {
            let s = &spec.humaneval;
            let mut problems: Vec<humaneval::Problem> =
                humaneval::read_jsonl(&t.data_root.join("humaneval/HumanEval.jsonl.gz"))?;
            problems.truncate(s.limit);
            // Completions are kept whole once generated: sampling is seeded per problem, so a
            // rerun would only repeat them.
            let cpath = with_ext(&t.out, "completions.jsonl");
            let comps = match humaneval::read_jsonl::<humaneval::Completion>(&cpath) {
                Ok(c) if c.len() == problems.len() * s.n => c,
                _ => {
                    let c = humaneval::generate_completions(
                        &model,
                        start.as_ref(),
                        &tok,
                        &problems,
                        s.n,
                        s.max_new_tokens,
                        s.seed,
                    )?;
                    let text: String = c
                        .iter()
                        .map(|x| serde_json::to_string(x).expect("json") + "\n")
                        .collect();
                    std::fs::write(&cpath, text).map_err(|e| file_err(&cpath, e))?;
                    c
                }
            };
            let r = humaneval::score(&problems, &comps, &Limits::default(), &[1], Some(&samples))?;
            let p = r.pass_at.get(&1).copied().unwrap_or(0.0);
            // Samples of one task are not independent: the interval counts tasks.
            Scored {
                value: p,
                ci95: wilson(p, r.tasks),
                count: r.tasks,
            }
        }
        Task::Mmlu => {
            let s = &spec.mmlu;
            let qs = mmlu::load(&t.data_root.join("mmlu/mmlu.jsonl"))?;
            let pool: Vec<usize> = match t.held_out {
                Some(h) => h.iter().copied().filter(|&i| i < qs.len()).collect(),
                None => (0..qs.len()).collect(),
            };
            // An even spread over the pool (and so over topics), `limit` questions at most.
            let stride = pool.len().div_ceil(s.limit.max(1)).max(1);
            let only: BTreeSet<usize> = pool.into_iter().step_by(stride).take(s.limit).collect();
            let o = mmlu::Options {
                limit: None,
                every: 1,
                shots: s.shots,
                max_len: s.max_len,
                only: Some(only),
            };
            let r = mmlu::evaluate(&model, ad.as_ref(), &tok, &qs, &o, Some(&samples))?;
            Scored {
                value: r.accuracy,
                ci95: r.ci95,
                count: r.count,
            }
        }
    };
    Ok(scored)
}

/// The server's held-out record indices of a finished run (`data_manifest.json`).
pub fn held_out(run: &Path) -> Result<BTreeSet<usize>> {
    let p = run.join("data_manifest.json");
    let text = std::fs::read_to_string(&p).map_err(|e| file_err(&p, e))?;
    let m: fedllm_data::federated::Manifest =
        serde_json::from_str(&text).map_err(|e| file_err(&p, e))?;
    Ok(m.server_test.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the closed form evaluated by hand: p = 0.5, n = 10 → centre 0.5, half-width
    /// z·sqrt(0.025 + z²/400)/(1 + z²/10) = 0.2634 (Wilson 1927; z = 1.96).
    #[test]
    fn wilson_interval_matches_the_closed_form() {
        let (lo, hi) = wilson(0.5, 10);
        assert!(
            (lo - 0.2366).abs() < 1e-4 && (hi - 0.7634).abs() < 1e-4,
            "{lo} {hi}"
        );
        // No successes: the lower end is 0 and the upper z²/(n + z²) = 0.2775 for n = 10.
        let (lo, hi) = wilson(0.0, 10);
        assert!(lo == 0.0 && (hi - 0.2775).abs() < 1e-4, "{lo} {hi}");
    }
}
