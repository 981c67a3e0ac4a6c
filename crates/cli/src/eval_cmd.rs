//! `fedllm eval humaneval|gsm8k|mmlu|loss`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use fedllm_eval::{gsm8k, humaneval, mmlu, sandbox::Limits};
use fedllm_model::{CausalLm, LoadOptions};
use fedllm_peft::Adapter;
use serde_json::json;

/// What every evaluation shares: the model, an adapter, the data, a limit and the result file.
#[derive(Args)]
pub struct Common {
    /// Hugging Face folder (config.json + safetensors) or .gguf file
    #[arg(long)]
    model: Option<PathBuf>,
    /// Adapter folder (PEFT files) applied to the model
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Data file [default: the task's file under $FEDLLM_DATA, else data/]
    #[arg(long)]
    data: Option<PathBuf>,
    /// Evaluate only the first N items
    #[arg(long)]
    limit: Option<usize>,
    /// Result JSON; per-sample rows go to <out>.samples.jsonl (a re-run skips finished samples)
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep GGUF weights quantized (faster, approximate; evaluation dequantizes by default)
    #[arg(long, conflicts_with = "dequantize")]
    keep_quantized: bool,
    /// Compute with GGUF weights dequantized to f32, as transformers does (the default for
    /// evaluation; the blocks stay packed in memory and are widened in the kernels)
    #[arg(long)]
    dequantize: bool,
}

#[derive(Subcommand)]
pub enum EvalCmd {
    /// HumanEval pass@k: sample completions (FS-LLM's settings) and run each in the sandbox
    Humaneval {
        #[command(flatten)]
        common: Common,
        /// Score this completions file ({task_id, completion} lines) instead of generating
        #[arg(long)]
        completions: Option<PathBuf>,
        /// Samples per task
        #[arg(long, default_value_t = 5)]
        n: usize,
        /// New tokens per completion
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// Sampling seed (problem i uses seed + i)
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// GSM8K 8-shot chain of thought, greedy, FS-LLM's answer extraction
    Gsm8k {
        #[command(flatten)]
        common: Common,
        /// New tokens per answer
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        /// Questions decoded together (continuous batching: a finished question's slot takes the next)
        #[arg(long, default_value_t = 8)]
        batch: usize,
    },
    /// MMLU k-shot accuracy (shots from the same topic), per topic
    Mmlu {
        #[command(flatten)]
        common: Common,
        /// Shots per question (fewer when the prompt would exceed --max-len)
        #[arg(long, default_value_t = 5)]
        shots: usize,
        /// Evaluate every N-th question (a sample across all topics)
        #[arg(long, default_value_t = 1)]
        every: usize,
        /// Prompt budget in tokens
        #[arg(long, default_value_t = 1024)]
        max_len: usize,
    },
    /// Held-out loss and perplexity: mean NLL of the response tokens within --tok-len
    Loss {
        #[command(flatten)]
        common: Common,
        /// Prompt template
        #[arg(long, value_enum, default_value = "alpaca")]
        template: TemplateArg,
        /// Count the prompt's tokens too (language-model loss over the whole text)
        #[arg(long)]
        full_text: bool,
        /// Tokens per sample (prompt + response); longer samples are truncated, as in training
        /// [default: the model's context length]
        #[arg(long)]
        tok_len: Option<usize>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TemplateArg {
    /// FS-LLM's Alpaca prompts
    Alpaca,
    /// The model's chat template
    Chat,
    /// The instruction as is
    Raw,
}

impl From<TemplateArg> for fedllm_data::Template {
    fn from(t: TemplateArg) -> Self {
        match t {
            TemplateArg::Alpaca => Self::Alpaca,
            TemplateArg::Chat => Self::Chat,
            TemplateArg::Raw => Self::Raw,
        }
    }
}

fn default_data(rel: &str) -> PathBuf {
    fedllm_data::federated::data_root().join(rel)
}

fn load(a: &Common) -> Result<(CausalLm, fedllm_model::Tokenizer, Option<Adapter>)> {
    let path = a.model.as_ref().context("--model is required")?;
    // The dequantized weights' numbers, from the blocks kept packed (a sixth of the memory).
    let quant = if a.keep_quantized {
        fedllm_model::QuantMode::Keep
    } else {
        fedllm_model::QuantMode::Packed
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

/// What generation continues from: a prompt-type adapter's virtual tokens (LoRA and full
/// adapters are in the weights already).
fn generation_start(
    model: &CausalLm,
    a: &Option<Adapter>,
) -> Result<Option<fedllm_model::KvCache>> {
    Ok(match a {
        Some(ad) => ad.generation_prefix(model)?,
        None => None,
    })
}

pub fn run(cmd: EvalCmd) -> Result<()> {
    let t0 = Instant::now();
    let a = match &cmd {
        EvalCmd::Humaneval { common, .. }
        | EvalCmd::Gsm8k { common, .. }
        | EvalCmd::Mmlu { common, .. }
        | EvalCmd::Loss { common, .. } => common,
    };
    let samples = samples_path(&a.out);
    let config = json!({"model": a.model, "adapter": a.adapter, "limit": a.limit});
    match &cmd {
        EvalCmd::Humaneval {
            completions,
            n,
            max_new_tokens,
            seed,
            ..
        } => {
            let (n, seed) = (*n, *seed);
            let data = a
                .data
                .clone()
                .unwrap_or_else(|| default_data("humaneval/HumanEval.jsonl.gz"));
            let mut problems: Vec<humaneval::Problem> = humaneval::read_jsonl(&data)?;
            problems.truncate(a.limit.unwrap_or(usize::MAX));
            let comps = match completions {
                Some(c) => humaneval::read_jsonl(c)?,
                None => {
                    let (model, tok, ad) = load(a)?;
                    let start = generation_start(&model, &ad)?;
                    humaneval::generate_completions(
                        &model,
                        start.as_ref(),
                        &tok,
                        &problems,
                        n,
                        *max_new_tokens,
                        seed,
                    )?
                }
            };
            let ks: Vec<usize> = [1, 5, 10, 100]
                .into_iter()
                .filter(|&k| k <= n.max(1))
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
                json!({"metric": "pass@k", "pass_at": s.pass_at, "count": s.tasks, "samples": s.samples, "config": config, "seed": seed, "seconds": t0.elapsed().as_secs_f64()}),
            )
        }
        EvalCmd::Gsm8k {
            max_new_tokens,
            batch,
            ..
        } => {
            let data = a
                .data
                .clone()
                .unwrap_or_else(|| default_data("gsm8k/test.jsonl"));
            let mut qs: Vec<gsm8k::Question> = humaneval::read_jsonl(&data)?;
            qs.truncate(a.limit.unwrap_or(usize::MAX));
            let (model, tok, ad) = load(a)?;
            let start = generation_start(&model, &ad)?;
            let s = gsm8k::evaluate(
                &model,
                start.as_ref(),
                &tok,
                &qs,
                *max_new_tokens,
                *batch,
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
        EvalCmd::Mmlu {
            shots,
            every,
            max_len,
            ..
        } => {
            let data = a
                .data
                .clone()
                .unwrap_or_else(|| default_data("mmlu/mmlu.jsonl"));
            let qs = mmlu::load(&data)?;
            let (model, tok, ad) = load(a)?;
            let o = mmlu::Options {
                limit: a.limit,
                every: *every,
                shots: *shots,
                max_len: *max_len,
                only: None,
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
        EvalCmd::Loss {
            template,
            full_text,
            tok_len,
            ..
        } => {
            let data = a.data.clone().context("--data is required for loss")?;
            let (recs, _) = fedllm_data::load(&data, &fedllm_data::record::Format::Auto)?;
            let (model, tok, ad) = load(a)?;
            let tok_len = tok_len.unwrap_or(model.config.context_length());
            let (mut samples, rep) =
                fedllm_data::tokenize_all(&recs, (*template).into(), &tok, tok_len)?;
            samples.truncate(a.limit.unwrap_or(usize::MAX));
            if *full_text {
                for s in &mut samples {
                    s.labels = s.ids.iter().map(|&i| i as i64).collect();
                }
            }
            let pad = tok
                .pad_token_id
                .or(tok.eos_token_ids.first().copied())
                .unwrap_or(0);
            let (loss, n) =
                fedllm_train::finetune::heldout_loss(&model, ad.as_ref(), &samples, 4, pad)?;
            println!(
                "loss {loss:.4}, perplexity {:.3} over {n} tokens ({} samples; tok_len {tok_len}: {} truncated, {} dropped with no response token inside), {:.1} s",
                loss.exp(),
                samples.len(),
                rep.truncated,
                rep.dropped_no_target,
                t0.elapsed().as_secs_f64()
            );
            finish(
                &a.out,
                json!({"metric": "loss", "value": loss, "perplexity": loss.exp(), "tokens": n, "count": samples.len(), "tok_len": tok_len, "truncated": rep.truncated, "dropped": rep.dropped_no_target, "config": config}),
            )
        }
    }
}
