//! `fedllm eval humaneval|gsm8k|mmlu|loss`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use fedllm_eval::{gsm8k, humaneval, mmlu, sandbox::Limits};
use fedllm_model::{CausalLm, LoadOptions};
use fedllm_peft::{Adapter, AdapterConfig};
use serde_json::json;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum Task {
    Humaneval,
    Gsm8k,
    Mmlu,
    Loss,
}

#[derive(Args)]
pub struct EvalArgs {
    #[arg(value_enum)]
    task: Task,
    /// Model (HF folder or GGUF); not needed with `humaneval --completions`
    #[arg(long)]
    model: Option<PathBuf>,
    /// Adapter folder (PEFT files) applied to the model
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Data file [default: $FEDLLM_DATA/{humaneval/HumanEval.jsonl.gz, gsm8k/test.jsonl, mmlu/mmlu.jsonl}]
    #[arg(long)]
    data: Option<PathBuf>,
    /// Evaluate only the first N items
    #[arg(long)]
    limit: Option<usize>,
    /// Result JSON; per-sample rows go to <out>.samples.jsonl (a re-run skips finished samples)
    #[arg(long)]
    out: Option<PathBuf>,
    /// HumanEval: score this completions file ({task_id, completion} lines) without a model
    #[arg(long)]
    completions: Option<PathBuf>,
    /// HumanEval: samples per task
    #[arg(long, default_value_t = 5)]
    n: usize,
    /// New tokens (HumanEval 128, GSM8K 256)
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// MMLU shots
    #[arg(long, default_value_t = 5)]
    shots: usize,
    /// MMLU: evaluate every N-th question (a sample across all topics)
    #[arg(long, default_value_t = 1)]
    every: usize,
    /// MMLU prompt budget in tokens (shots shrink to fit)
    #[arg(long, default_value_t = 1024)]
    max_len: usize,
    /// GSM8K generation batch
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Loss: template (alpaca, chat, raw) and whether the prompt counts too
    #[arg(long, default_value = "alpaca")]
    template: String,
    #[arg(long)]
    full_text: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep GGUF weights quantized (faster decoding, approximate)
    #[arg(long)]
    keep_quantized: bool,
}

fn default_data(rel: &str) -> PathBuf {
    let root = fedllm_data::federated::data_root();
    root.join(rel)
}

fn load(a: &EvalArgs) -> Result<(CausalLm, fedllm_model::Tokenizer, Option<Adapter>)> {
    let path = a.model.as_ref().context("--model is required")?;
    let quant = if a.keep_quantized {
        fedllm_model::QuantMode::Keep
    } else {
        fedllm_model::QuantMode::Dequantize
    };
    let loaded = CausalLm::load(
        path,
        LoadOptions {
            quant,
            ..Default::default()
        },
    )
    .context("loading model")?;
    let mut model = loaded.model;
    let tok = loaded.tokenizer.context("the model has no tokenizer")?;
    let adapter = match &a.adapter {
        Some(d) => {
            let ad = fedllm_peft::io::load(d, &model).context("loading adapter")?;
            ad.attach(&mut model, false)?;
            Some(ad)
        }
        None => None,
    };
    Ok((model, tok, adapter))
}

fn samples_path(out: &Option<PathBuf>) -> Option<PathBuf> {
    out.as_ref()
        .map(|o| PathBuf::from(format!("{}.samples.jsonl", o.display())))
}

fn finish(out: &Option<PathBuf>, result: serde_json::Value) -> Result<()> {
    if let Some(o) = out {
        std::fs::write(o, serde_json::to_string_pretty(&result)?)
            .with_context(|| o.display().to_string())?;
    }
    Ok(())
}

fn generation_adapter_ok(a: &Option<Adapter>) -> Result<()> {
    if let Some(ad) = a {
        if !matches!(ad.config, AdapterConfig::Lora(_) | AdapterConfig::Full(_)) {
            bail!("generation-based evaluation supports LoRA and full adapters (prompt-type adapters: use mmlu or loss)");
        }
    }
    Ok(())
}

pub fn run(a: EvalArgs) -> Result<()> {
    let t0 = Instant::now();
    let samples = samples_path(&a.out);
    let config = json!({"model": a.model, "adapter": a.adapter, "limit": a.limit, "seed": a.seed});
    match a.task {
        Task::Humaneval => {
            let data = a
                .data
                .clone()
                .unwrap_or_else(|| default_data("humaneval/HumanEval.jsonl.gz"));
            let mut problems: Vec<humaneval::Problem> = humaneval::read_jsonl(&data)?;
            problems.truncate(a.limit.unwrap_or(usize::MAX));
            let comps = match &a.completions {
                Some(c) => humaneval::read_jsonl(c)?,
                None => {
                    let (model, tok, ad) = load(&a)?;
                    generation_adapter_ok(&ad)?;
                    humaneval::generate_completions(
                        &model,
                        &tok,
                        &problems,
                        a.n,
                        a.max_new_tokens.unwrap_or(128),
                        a.seed,
                    )?
                }
            };
            let ks: Vec<usize> = [1, 5, 10, 100]
                .into_iter()
                .filter(|&k| k <= a.n.max(1))
                .collect();
            let s = humaneval::score(
                &problems,
                &comps,
                &Limits::default(),
                &ks,
                samples.as_deref(),
            )?;
            println!(
                "humaneval: {} tasks, {} samples, {} timed out",
                s.tasks, s.samples, s.timed_out
            );
            for (k, v) in &s.pass_at {
                println!("  pass@{k} = {v:.4}");
            }
            println!("  wall time {:.1} s", t0.elapsed().as_secs_f64());
            finish(
                &a.out,
                json!({"metric": "pass@k", "pass_at": s.pass_at, "count": s.tasks, "samples": s.samples, "config": config, "seconds": t0.elapsed().as_secs_f64()}),
            )
        }
        Task::Gsm8k => {
            let data = a
                .data
                .clone()
                .unwrap_or_else(|| default_data("gsm8k/test.jsonl"));
            let mut qs: Vec<gsm8k::Question> = humaneval::read_jsonl(&data)?;
            qs.truncate(a.limit.unwrap_or(usize::MAX));
            let (model, tok, ad) = load(&a)?;
            generation_adapter_ok(&ad)?;
            let s = gsm8k::evaluate(
                &model,
                &tok,
                &qs,
                a.max_new_tokens.unwrap_or(256),
                a.batch,
                samples.as_deref(),
            )?;
            println!(
                "gsm8k: accuracy {:.4} ({} / {}), 95% CI [{:.4}, {:.4}], {:.1} s",
                s.accuracy,
                s.correct,
                s.count,
                s.ci95.0,
                s.ci95.1,
                t0.elapsed().as_secs_f64()
            );
            finish(
                &a.out,
                json!({"metric": "accuracy", "value": s.accuracy, "ci95": s.ci95, "count": s.count, "config": config, "seconds": t0.elapsed().as_secs_f64()}),
            )
        }
        Task::Mmlu => {
            let data = a
                .data
                .clone()
                .unwrap_or_else(|| default_data("mmlu/mmlu.jsonl"));
            let qs = mmlu::load(&data)?;
            let (model, tok, ad) = load(&a)?;
            let o = mmlu::Options {
                limit: a.limit,
                every: a.every,
                shots: a.shots,
                max_len: a.max_len,
            };
            let s = mmlu::evaluate(&model, ad.as_ref(), &tok, &qs, &o, samples.as_deref())?;
            println!(
                "mmlu: accuracy {:.4} ({} / {}), 95% CI [{:.4}, {:.4}], {} topics, {:.1} s",
                s.accuracy,
                s.correct,
                s.count,
                s.ci95.0,
                s.ci95.1,
                s.per_topic.len(),
                t0.elapsed().as_secs_f64()
            );
            let topics: serde_json::Map<String, serde_json::Value> = s
                .per_topic
                .iter()
                .map(|(k, (n, c))| {
                    (
                        k.clone(),
                        json!({"count": n, "accuracy": *c as f64 / *n as f64}),
                    )
                })
                .collect();
            finish(
                &a.out,
                json!({"metric": "accuracy", "value": s.accuracy, "ci95": s.ci95, "count": s.count, "per_topic": topics, "config": config, "seconds": t0.elapsed().as_secs_f64()}),
            )
        }
        Task::Loss => {
            let data = a.data.clone().context("--data is required for loss")?;
            let (recs, _) = fedllm_data::load(&data, &fedllm_data::record::Format::Auto)?;
            let (model, tok, ad) = load(&a)?;
            let template: fedllm_data::Template = a.template.parse()?;
            let (mut samples, rep) = fedllm_data::tokenize_all(&recs, template, &tok, usize::MAX)?;
            samples.truncate(a.limit.unwrap_or(usize::MAX));
            if a.full_text {
                for s in &mut samples {
                    s.labels = s.ids.iter().map(|&i| i as i64).collect();
                }
            }
            let pad = tok
                .pad_token_id
                .or(tok.eos_token_ids.first().copied())
                .unwrap_or(0);
            let batches = fedllm_train::finetune::eval_batches(&samples, 4, pad, &model.device)?;
            let (loss, n) = match &ad {
                Some(adapter) => fedllm_train::finetune::eval_loss(&model, adapter, &batches)?,
                None => {
                    let (mut sum, mut n) = (0f64, 0usize);
                    for b in &batches {
                        let h = model.forward_hidden(&b.input_ids, Some(&b.mask), None)?;
                        let (l, c) = model.loss_from_hidden(&h, &b.labels)?;
                        sum += l.to_scalar::<f32>()? as f64 * c as f64;
                        n += c;
                    }
                    (sum / n.max(1) as f64, n)
                }
            };
            println!("loss {loss:.4}, perplexity {:.3} over {n} tokens ({} samples, {} dropped), {:.1} s", loss.exp(), samples.len(), rep.dropped_no_target, t0.elapsed().as_secs_f64());
            finish(
                &a.out,
                json!({"metric": "loss", "value": loss, "perplexity": loss.exp(), "tokens": n, "count": samples.len(), "config": config}),
            )
        }
    }
}
